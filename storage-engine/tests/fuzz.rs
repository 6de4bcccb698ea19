//! Fuzzing on stable Rust (proptest; no cargo-fuzz): the NBD server's handshake and transmission
//! phase fed random and mutated byte streams in-process over a unix socket, every on-disk decoder
//! fed random and mutated files, the requests an engine cannot serve, each checked for the
//! error the NBD spec names with the connection kept in step, and the replication apply path (a
//! secondary's `apply_batch`, a draining primary's `apply_drain`) fed random and mutated batches,
//! checked against a model of the data file, `applied_seq`, the epoch and the drain table.
//!
//! Case counts come from `TANDEM_FUZZ_CASES` (default 32: the file runs in seconds). Full size:
//!
//! ```text
//! TANDEM_FUZZ_CASES=5000 cargo test -p storage-engine --release --test fuzz
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Once,
    },
    time::Duration,
};

use proptest::{prelude::*, test_runner::Config};
use storage_engine::{
    bitmap::Bitmap,
    format,
    meta::{Meta, Role},
    nbd::{self, proto as p},
    volume::{Volume, VolumeConfig},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
    runtime::Runtime,
    sync::watch,
};

const SIZE: u64 = 1 << 20;
const NAME: &str = "fuzz";

fn cases() -> u32 {
    std::env::var("TANDEM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32)
}

fn config() -> Config {
    Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    }
}

/// Panics on the server's threads (its connection tasks run on tokio, which would swallow them)
/// are counted, so a case that panics a task fails the test. A test thread's own panic fails
/// that test by itself and is not counted (it would fail the others too).
static PANICS: AtomicUsize = AtomicUsize::new(0);
fn count_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() == Some("tokio-runtime-worker") {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            prev(info);
        }));
    });
}

/// A standalone volume served by the real NBD server on a unix socket, in this process.
struct Server {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    rt: Runtime,
    _stop: watch::Sender<bool>,
}

fn volume_config(dir: &Path) -> VolumeConfig {
    VolumeConfig {
        name: NAME.into(),
        data: dir.join("data.img"),
        size: SIZE,
        state_dir: dir.join("state"),
        initial_role: Role::Primary,
        pair: None,
        secondary_access: Default::default(),
        proxy_timeout: Duration::from_secs(1),
        implicit_takeover: false,
    }
}

fn start_server() -> Server {
    count_panics();
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let sock = dir.path().join("nbd.sock");
    let (tx, rx) = watch::channel(false);
    let cfg = volume_config(dir.path());
    rt.block_on(async {
        let vol = Volume::open(&cfg).unwrap();
        let l = UnixListener::bind(&sock).unwrap();
        tokio::spawn(nbd::serve_unix(
            l,
            vol,
            nbd::Admission::new(nbd::Policy::default()),
            rx,
        ));
    });
    Server {
        _dir: dir,
        sock,
        rt,
        _stop: tx,
    }
}

/// Sends `input`, half-closes, and reads until the server closes. The server must answer or
/// close: a stream that never ends within the deadline is a hang. Returns the bytes received.
async fn exchange(sock: &Path, input: Vec<u8>) -> Result<Vec<u8>, String> {
    let s = UnixStream::connect(sock).await.map_err(|e| e.to_string())?;
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let _ = w.write_all(&input).await;
        let _ = w.shutdown().await;
    });
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                // Keep the start only: enough for the assertions, bounded for big reads.
                Ok(n) if out.len() < 1 << 20 => out.extend_from_slice(&buf[..n]),
                Ok(_) => {}
            }
        }
    })
    .await;
    writer.abort();
    read.map(|_| out)
        .map_err(|_| "the server neither answered nor closed".into())
}

fn go_option(name: &str) -> Vec<u8> {
    let data = p::encode_go(name, &[p::INFO_BLOCK_SIZE]);
    let mut v = Vec::new();
    v.extend_from_slice(&p::IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&p::OPT_GO.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(&data);
    v
}

fn option(opt: u32, declared_len: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&p::IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&declared_len.to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// Client flags and a successful OPT_GO: what precedes the transmission phase.
fn session_prefix() -> Vec<u8> {
    let mut v = (p::CLIENT_FIXED_NEWSTYLE | p::CLIENT_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    v.extend_from_slice(&go_option(NAME));
    v
}

fn request(kind: u16, flags: u16, handle: u64, offset: u64, length: u32) -> Vec<u8> {
    p::Request {
        flags,
        kind,
        handle,
        offset,
        length,
    }
    .encode()
    .to_vec()
}

/// A raw client on the unix socket, for the checks that need exact replies.
struct Raw {
    s: UnixStream,
}

impl Raw {
    async fn greeting(sock: &Path) -> Raw {
        let mut s = UnixStream::connect(sock).await.unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).await.unwrap();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        Raw { s }
    }

    /// Greeting, flags and OPT_GO: ready for transmission.
    async fn go(sock: &Path) -> Raw {
        let mut r = Raw::greeting(sock).await;
        r.s.write_all(&session_prefix()).await.unwrap();
        loop {
            let (_, kind, _) = r.option_reply().await;
            if kind == p::REP_ACK {
                return r;
            }
            assert_eq!(kind, p::REP_INFO);
        }
    }

    /// (option, reply type, data)
    async fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).await.unwrap();
        assert_eq!(&h[0..8], &p::OPT_REPLY_MAGIC.to_be_bytes());
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).await.unwrap();
        (opt, kind, data)
    }

    /// (errno, handle) of the next simple reply.
    async fn reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).await.unwrap();
        assert_eq!(&h[0..4], &p::SIMPLE_REPLY_MAGIC.to_be_bytes());
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    async fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).await.unwrap();
    }

    async fn data(&mut self, n: usize) -> Vec<u8> {
        let mut d = vec![0u8; n];
        self.s.read_exact(&mut d).await.unwrap();
        d
    }

    /// The server closed the connection (EOF, or reset).
    async fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(10), self.s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    async fn write_read_back(&mut self, offset: u64, fill: u8, len: u32) {
        let mut w = request(p::CMD_WRITE, 0, 77, offset, len);
        w.extend(std::iter::repeat_n(fill, len as usize));
        self.send(&w).await;
        assert_eq!(self.reply().await, (0, 77));
        self.send(&request(p::CMD_READ, 0, 78, offset, len)).await;
        assert_eq!(self.reply().await, (0, 78));
        assert!(self.data(len as usize).await.iter().all(|b| *b == fill));
    }
}

/// After any input, a fresh well-behaved session still reads back what it writes.
async fn valid_session_works(sock: &Path, round: u64) {
    let mut c = Raw::go(sock).await;
    let fill = (round % 251) as u8 + 1;
    let offset = (round * 4096) % (SIZE - 4096);
    c.write_read_back(offset, fill, 4096).await;
    c.send(&request(p::CMD_DISC, 0, 0, 0, 0)).await;
    assert!(c.closed().await);
}

fn mutate(mut v: Vec<u8>, flips: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    if !v.is_empty() {
        for (i, x) in flips {
            let n = v.len();
            v[i % n] ^= x;
        }
    }
    if let Some(c) = cut {
        v.truncate(c % (v.len() + 1));
    }
    v
}

fn any_offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        0..SIZE,
        Just(SIZE - 512),
        Just(SIZE),
        Just(u64::MAX - 100),
        any::<u64>(),
    ]
}

fn any_length() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        1u32..9000,
        Just(4096),
        Just(SIZE as u32),
        Just(p::MAX_PAYLOAD + 1),
        Just(u32::MAX),
        any::<u32>(),
    ]
}

#[derive(Debug, Clone)]
struct Req {
    kind: u16,
    flags: u16,
    offset: u64,
    length: u32,
}

fn any_request() -> impl Strategy<Value = Req> {
    (
        prop_oneof![0u16..=8, any::<u16>()],
        prop_oneof![
            Just(0u16),
            Just(p::CMD_FLAG_FUA),
            Just(p::CMD_FLAG_NO_HOLE),
            any::<u16>()
        ],
        any_offset(),
        any_length(),
    )
        .prop_map(|(kind, flags, offset, length)| Req {
            kind,
            flags,
            offset,
            length,
        })
}

/// A transmission stream: requests, each WRITE followed by its payload when that is small (a
/// large one is cut short, so the server is left waiting for bytes that never come).
fn encode_requests(reqs: &[Req]) -> Vec<u8> {
    let mut v = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        if r.kind == p::CMD_DISC {
            continue; // tested on its own; here it would end the stream early
        }
        v.extend_from_slice(&request(r.kind, r.flags, i as u64, r.offset, r.length));
        if r.kind == p::CMD_WRITE {
            let n = if r.length <= 64 << 10 { r.length } else { 100 };
            v.extend(std::iter::repeat_n(0x5a, n as usize));
        }
    }
    v
}

#[test]
fn fuzz_nbd_transmission_never_panics_hangs_or_breaks_the_server() {
    let srv = start_server();
    let round = AtomicU64::new(0);
    proptest!(config(), |(
        reqs in proptest::collection::vec(any_request(), 1..8),
        flips in proptest::collection::vec((any::<usize>(), 1u8..), 0..4),
        cut in proptest::option::of(any::<usize>()),
    )| {
        let mut input = session_prefix();
        let body = mutate(encode_requests(&reqs), &flips, cut);
        input.extend_from_slice(&body);
        let round = round.fetch_add(1, Ordering::SeqCst) + 1;
        let r = srv.rt.block_on(exchange(&srv.sock, input));
        prop_assert!(r.is_ok(), "{:?}", r.err());
        srv.rt.block_on(valid_session_works(&srv.sock, round));
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), 0);
    });
}

#[test]
fn fuzz_nbd_handshake_never_panics_hangs_or_breaks_the_server() {
    let srv = start_server();
    let round = AtomicU64::new(0);
    let opt = (
        prop_oneof![1u32..=12, any::<u32>()],
        prop_oneof![
            0u32..300,
            Just(p::MAX_OPTION_LEN),
            Just(p::MAX_OPTION_LEN + 1),
            any::<u32>()
        ],
        proptest::collection::vec(any::<u8>(), 0..300),
    );
    proptest!(config(), |(
        cflags in prop_oneof![Just(3u32), Just(1u32), Just(0u32), any::<u32>()],
        opts in proptest::collection::vec(opt, 0..5),
        then_go in any::<bool>(),
        raw in proptest::collection::vec(any::<u8>(), 0..200),
        flips in proptest::collection::vec((any::<usize>(), 1u8..), 0..3),
        cut in proptest::option::of(any::<usize>()),
    )| {
        let mut input = cflags.to_be_bytes().to_vec();
        for (o, len, data) in &opts {
            // The declared length is honest only when it fits what we send.
            let send = &data[..data.len().min(*len as usize)];
            input.extend_from_slice(&option(*o, *len, send));
        }
        if then_go {
            input.extend_from_slice(&go_option(NAME));
        }
        input.extend_from_slice(&raw);
        let input = mutate(input, &flips, cut);
        let round = round.fetch_add(1, Ordering::SeqCst) + 1;
        let r = srv.rt.block_on(exchange(&srv.sock, input));
        prop_assert!(r.is_ok(), "{:?}", r.err());
        srv.rt.block_on(valid_session_works(&srv.sock, round));
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), 0);
    });
}

#[test]
fn fuzz_nbd_random_bytes_from_the_first_byte() {
    let srv = start_server();
    let round = AtomicU64::new(0);
    proptest!(config(), |(raw in proptest::collection::vec(any::<u8>(), 0..2048))| {
        let round = round.fetch_add(1, Ordering::SeqCst) + 1;
        let r = srv.rt.block_on(exchange(&srv.sock, raw));
        prop_assert!(r.is_ok(), "{:?}", r.err());
        srv.rt.block_on(valid_session_works(&srv.sock, round));
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), 0);
    });
}

/// Every request an engine cannot serve gets the error the NBD spec names ("Error values",
/// "Block size constraints", "Request types"), and the connection stays in step.
#[test]
fn requests_the_engine_cannot_serve_get_the_spec_errors() {
    let srv = start_server();
    srv.rt.block_on(async {
        let mut c = Raw::go(&srv.sock).await;
        let cases: &[(u16, u16, u64, u32, u32, &str)] = &[
            (5, 0, 0, 4096, 22, "CACHE, not advertised"),
            (7, 0, 0, 4096, 22, "BLOCK_STATUS, no metadata context"),
            (8, 0, 0, 0, 22, "RESIZE"),
            (999, 0, 0, 0, 22, "unknown command"),
            (
                p::CMD_READ,
                1 << 2,
                0,
                4096,
                22,
                "DF without structured replies",
            ),
            (
                p::CMD_READ,
                p::CMD_FLAG_NO_HOLE,
                0,
                4096,
                22,
                "NO_HOLE on READ",
            ),
            (p::CMD_TRIM, 1 << 15, 0, 4096, 22, "unknown flag"),
            (
                p::CMD_WRITE_ZEROES,
                1 << 4,
                0,
                4096,
                22,
                "FAST_ZERO, not advertised",
            ),
            (
                p::CMD_READ,
                0,
                0,
                p::MAX_PAYLOAD + 1,
                22,
                "READ over the maximum",
            ),
            (p::CMD_READ, 0, SIZE - 512, 1024, 22, "READ past the end"),
            (
                p::CMD_READ,
                0,
                u64::MAX - 10,
                512,
                22,
                "READ offset overflow",
            ),
            (p::CMD_TRIM, 0, SIZE, 4096, 22, "TRIM past the end"),
            (
                p::CMD_WRITE_ZEROES,
                0,
                SIZE - 4096,
                8192,
                28,
                "WRITE_ZEROES past the end",
            ),
            (
                p::CMD_TRIM,
                0,
                0,
                u32::MAX,
                22,
                "TRIM longer than the export",
            ),
        ];
        for (i, (kind, flags, offset, len, errno, what)) in cases.iter().enumerate() {
            let h = 1000 + i as u64;
            c.send(&request(*kind, *flags, h, *offset, *len)).await;
            assert_eq!(c.reply().await, (*errno, h), "{what}");
        }
        // Refused WRITEs: the payload is skipped, so the next request is read in step.
        let refused: &[(u16, u64, u32, u32, &str)] = &[
            (p::CMD_FLAG_NO_HOLE, 0, 4096, 22, "NO_HOLE on WRITE"),
            (0, SIZE - 512, 4096, 28, "WRITE past the end"),
            (0, 0, p::MAX_PAYLOAD + 1, 22, "WRITE over the maximum"),
        ];
        for (i, (flags, offset, len, errno, what)) in refused.iter().enumerate() {
            let h = 2000 + i as u64;
            let mut w = request(p::CMD_WRITE, *flags, h, *offset, *len);
            w.extend(std::iter::repeat_n(0xee, *len as usize));
            c.send(&w).await;
            assert_eq!(c.reply().await, (*errno, h), "{what}");
            c.write_read_back(8192, i as u8 + 1, 4096).await;
        }
        // Length 0: valid for every command, answered without data, nothing touched.
        for (i, kind) in [p::CMD_READ, p::CMD_WRITE, p::CMD_TRIM, p::CMD_WRITE_ZEROES]
            .into_iter()
            .enumerate()
        {
            let h = 3000 + i as u64;
            c.send(&request(kind, 0, h, 4096, 0)).await;
            assert_eq!(c.reply().await, (0, h), "length 0, command {kind}");
        }
        // FUA is accepted on every command (the spec requires it once SEND_FUA is advertised).
        c.send(&request(p::CMD_READ, p::CMD_FLAG_FUA, 4000, 0, 512))
            .await;
        assert_eq!(c.reply().await, (0, 4000));
        c.data(512).await;
        c.send(&request(p::CMD_FLUSH, p::CMD_FLAG_FUA, 4001, 0, 0))
            .await;
        assert_eq!(c.reply().await, (0, 4001));
        // Misaligned requests are served byte-exact (the FUSE path sends them).
        let mut w = request(p::CMD_WRITE, 0, 4002, 4096 + 3, 5);
        w.extend_from_slice(b"hello");
        c.send(&w).await;
        assert_eq!(c.reply().await, (0, 4002));
        c.send(&request(p::CMD_READ, 0, 4003, 4096, 10)).await;
        assert_eq!(c.reply().await, (0, 4003));
        assert_eq!(&c.data(10).await[3..8], b"hello");
        // A bad magic cannot be answered in step: the connection closes, nothing else does.
        c.send(&[0xde; 28]).await;
        assert!(c.closed().await);
        valid_session_works(&srv.sock, 1).await;
    });
    assert_eq!(PANICS.load(Ordering::SeqCst), 0);
}

/// Handshake: options the engine cannot serve get the spec's option errors; an over-long option is
/// skipped (never buffered) and refused with NBD_REP_ERR_TOO_BIG; the session goes on.
#[test]
fn handshake_options_the_engine_cannot_serve_get_the_spec_errors() {
    let srv = start_server();
    srv.rt.block_on(async {
        let mut c = Raw::greeting(&srv.sock).await;
        c.send(&3u32.to_be_bytes()).await;
        for (opt, what) in [
            (5u32, "STARTTLS"),
            (8, "STRUCTURED_REPLY"),
            (9, "LIST_META_CONTEXT"),
            (10, "SET_META_CONTEXT"),
            (11, "EXTENDED_HEADERS"),
            (0xdead, "unknown"),
        ] {
            c.send(&option(opt, 0, &[])).await;
            let (o, kind, _) = c.option_reply().await;
            assert_eq!((o, kind), (opt, p::REP_ERR_UNSUP), "{what}");
        }
        c.send(&option(p::OPT_LIST, 3, b"abc")).await;
        assert_eq!(c.option_reply().await.1, p::REP_ERR_INVALID);
        c.send(&option(p::OPT_GO, 4, &[0, 0, 0, 9])).await;
        assert_eq!(c.option_reply().await.1, p::REP_ERR_INVALID);
        // An option 1 MiB long: refused as too big, its bytes skipped.
        let big = vec![0x41u8; 1 << 20];
        c.send(&option(p::OPT_INFO, big.len() as u32, &big)).await;
        let (o, kind, msg) = c.option_reply().await;
        assert_eq!((o, kind), (p::OPT_INFO, p::REP_ERR_TOO_BIG));
        assert!(msg.len() <= p::MAX_STRING);
        // An unknown export name as long as allowed: the error message stays within 4096 bytes.
        let name = "\u{1}".repeat(p::MAX_OPTION_LEN as usize - 100);
        c.send(&go_option(&name)).await;
        let (_, kind, msg) = c.option_reply().await;
        assert_eq!(kind, p::REP_ERR_UNKNOWN);
        assert!(msg.len() <= p::MAX_STRING, "message of {} bytes", msg.len());
        // Still in step: GO succeeds and the session works.
        c.send(&go_option(NAME)).await;
        loop {
            let (_, kind, _) = c.option_reply().await;
            if kind == p::REP_ACK {
                break;
            }
            assert_eq!(kind, p::REP_INFO);
        }
        c.write_read_back(0, 0x33, 4096).await;

        // An option claiming 4 GiB: nothing is allocated; the client hanging up ends it.
        let mut c = Raw::greeting(&srv.sock).await;
        c.send(&3u32.to_be_bytes()).await;
        c.send(&option(p::OPT_GO, u32::MAX, &[1, 2, 3])).await;
        c.s.shutdown().await.unwrap();
        assert!(c.closed().await);
        // EXPORT_NAME cannot carry an error: too long, or unknown, closes the connection.
        for (len, data) in [(p::MAX_OPTION_LEN + 1, vec![]), (5, b"other".to_vec())] {
            let mut c = Raw::greeting(&srv.sock).await;
            c.send(&3u32.to_be_bytes()).await;
            c.send(&option(p::OPT_EXPORT_NAME, len, &data)).await;
            assert!(c.closed().await);
        }
        // Unknown client flags: the spec says drop the connection.
        let mut c = Raw::greeting(&srv.sock).await;
        c.send(&(1u32 << 7).to_be_bytes()).await;
        assert!(c.closed().await);
        // ABORT is acknowledged, then the server closes.
        let mut c = Raw::greeting(&srv.sock).await;
        c.send(&3u32.to_be_bytes()).await;
        c.send(&option(p::OPT_ABORT, 2, b"xx")).await;
        assert_eq!(c.option_reply().await.1, p::REP_ACK);
        assert!(c.closed().await);
        valid_session_works(&srv.sock, 2).await;
    });
    assert_eq!(PANICS.load(Ordering::SeqCst), 0);
}

// ---- on-disk decoders ----

/// Recomputes a checksum over `body` into `at..at+4` (little-endian), so mutations reach the
/// structural checks behind it.
fn fix_crc(v: &mut [u8], at: usize, body_from: usize, body_to: usize) {
    if v.len() >= body_to.max(at + 4) && body_from <= body_to {
        let c = crc32c::crc32c(&v[body_from..body_to]);
        v[at..at + 4].copy_from_slice(&c.to_le_bytes());
    }
}

fn check_bitmap(b: &Bitmap, bits: u64) -> Result<(), TestCaseError> {
    prop_assert_eq!(b.len(), bits);
    prop_assert!(b.count() <= bits, "{} bits set of {}", b.count(), bits);
    for i in b.iter_ones() {
        prop_assert!(i < bits);
    }
    Ok(())
}

#[test]
fn fuzz_bitmap_decoders() {
    count_panics();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bm");
    proptest!(config(), |(
        bits in prop_oneof![0u64..200, 1u64..70_000],
        ones in proptest::collection::vec(any::<u64>(), 0..40),
        dense_ones in any::<bool>(),
        raw in proptest::collection::vec(any::<u8>(), 0..300),
        flips in proptest::collection::vec((any::<usize>(), 1u8..), 0..4),
        cut in proptest::option::of(any::<usize>()),
        crc in any::<bool>(),
        load_bits in prop_oneof![Just(None), any::<u64>().prop_map(Some)],
    )| {
        // Raw bytes to the in-memory decoders.
        if let Some(b) = Bitmap::from_bytes(bits, &raw) { check_bitmap(&b, bits)?; }
        if let Some(b) = Bitmap::from_sparse(bits, &raw) { check_bitmap(&b, bits)?; }
        // A real file, mutated.
        let mut bm = Bitmap::new(bits);
        if bits > 0 {
            if dense_ones { bm.set_range(0, bits); }
            for o in &ones { bm.set(o % bits); }
        }
        bm.store(&path).unwrap();
        let good = std::fs::read(&path).unwrap();
        let mut bad = mutate(good.clone(), &flips, cut);
        if crc && bad.len() >= 24 {
            let n = bad.len();
            fix_crc(&mut bad, 20, 24, n);
        }
        std::fs::write(&path, &bad).unwrap();
        let want = load_bits.unwrap_or(bits);
        match Bitmap::load(&path, want) {
            Ok(Some(b)) => {
                // Bits past the end never count, whatever the file says.
                prop_assert_eq!(b.len(), want);
                prop_assert!(b.iter_ones().all(|i| i < want), "a bit past the end loaded");
                prop_assert_eq!(b.count(), b.iter_ones().count() as u64);
                // A file that changed without a fixed checksum never loads.
                prop_assert!(crc || bad == good, "a corrupt bitmap file loaded");
                if bad == good { prop_assert_eq!(b.count(), bm.count()); }
            }
            Ok(None) => prop_assert!(false, "a present file loaded as absent"),
            Err(_) => prop_assert!(bad != good || want != bits, "a good file was refused"),
        }
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), 0);
    });
}

fn sample_meta() -> Meta {
    Meta {
        volume: NAME.into(),
        size: SIZE,
        block_size: 4096,
        epoch: 3,
        role: Role::Secondary,
        peer: Some("10.0.0.2:7000".into()),
        acked_seq: 40,
        clean_shutdown: false,
        takeover: Default::default(),
        boot_id: String::new(),
        grown_from: Vec::new(),
    }
}

#[test]
fn fuzz_meta_decoder() {
    count_panics();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta");
    let good = format::meta::encode(&sample_meta());
    proptest!(config(), |(
        raw in proptest::collection::vec(any::<u8>(), 0..300),
        flips in proptest::collection::vec((any::<usize>(), 1u8..), 0..4),
        cut in proptest::option::of(any::<usize>()),
        crc in any::<bool>(),
    )| {
        let _ = format::meta::decode::<Meta>(&raw);
        let mut bad = mutate(good.clone(), &flips, cut);
        if crc && bad.len() >= 20 {
            let n = bad.len();
            fix_crc(&mut bad, 16, 20, n);
        }
        std::fs::write(&path, &bad).unwrap();
        match Meta::load(&path) {
            Ok(Some(m)) => prop_assert!(crc || bad == good || m == sample_meta(), "corrupt meta loaded: {m:?}"),
            Ok(None) => prop_assert!(false, "a present meta file loaded as absent"),
            Err(_) => prop_assert!(bad != good),
        }
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), 0);
    });
}

fn progress_bytes(seq: u64, flags: u32) -> Vec<u8> {
    // The format of `progress` (storage-engine/ARCHITECTURE.md): magic, seq, flags, crc32c.
    let mut b = b"TNDPROG\0".to_vec();
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    let c = crc32c::crc32c(&b);
    b.extend_from_slice(&c.to_le_bytes());
    b
}

/// The progress codec (`format::progress`), reached through `Volume::open` on a state dir whose
/// `progress` file is random or mutated. Open must not panic, and a damaged file is an error
/// at open (falling back to `meta` could open a torn replica as consistent); an empty one is a
/// progress file never written.
#[test]
fn fuzz_progress_file_through_volume_open() {
    count_panics();
    let dir = tempfile::tempdir().unwrap();
    let cfg = volume_config(dir.path());
    drop(Volume::open(&cfg).unwrap());
    let path = cfg.state_dir.join("progress");
    let good = progress_bytes(7, 1);
    std::fs::write(&path, &good).unwrap();
    {
        // The intact file is read: seq 7, inconsistent.
        let v = Volume::open(&cfg).unwrap();
        let rs = v.replica();
        assert_eq!((rs.applied_seq, rs.inconsistent()), (7, true));
    }
    proptest!(Config { cases: cases().min(256), ..config() }, |(
        raw in proptest::collection::vec(any::<u8>(), 0..64),
        use_raw in any::<bool>(),
        flips in proptest::collection::vec((any::<usize>(), 1u8..), 0..3),
        cut in proptest::option::of(any::<usize>()),
    )| {
        let bytes = if use_raw { raw } else { mutate(good.clone(), &flips, cut) };
        std::fs::write(&path, &bytes).unwrap();
        match Volume::open(&cfg) {
            Ok(v) => {
                prop_assert!(bytes == good || bytes.is_empty(), "a damaged progress file opened");
                let rs = v.replica();
                if bytes == good {
                    prop_assert_eq!((rs.applied_seq, rs.inconsistent()), (7, true));
                }
            }
            Err(e) => prop_assert!(bytes != good && !bytes.is_empty(), "{}", e),
        }
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), 0);
    });
}

#[test]
fn served_volume_survives_a_flood_of_payload_free_requests() {
    // Memory stays bounded and the reader never waits on a reservation it cannot get: 5000
    // pipelined whole-volume TRIMs and FLUSHes on one connection, then a read still answers.
    let srv = start_server();
    srv.rt.block_on(async {
        let mut c = Raw::go(&srv.sock).await;
        let mut batch = Vec::new();
        for h in 0..5000u64 {
            let kind = if h % 2 == 0 {
                p::CMD_TRIM
            } else {
                p::CMD_FLUSH
            };
            let len = if kind == p::CMD_TRIM { SIZE as u32 } else { 0 };
            batch.extend_from_slice(&request(kind, 0, h, 0, len));
        }
        batch.extend_from_slice(&request(p::CMD_READ, 0, 99_999, 0, 4096));
        let (mut r, mut w) = c.s.into_split();
        let writer = tokio::spawn(async move {
            w.write_all(&batch).await.unwrap();
            w
        });
        let mut seen = 0;
        // Every reply, not just the read's: a TRIM still running when the next session writes
        // would (rightly) zero that write.
        let res = tokio::time::timeout(Duration::from_secs(60), async {
            while seen < 5001 {
                let mut h = [0u8; 16];
                r.read_exact(&mut h).await.unwrap();
                assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), 0);
                seen += 1;
                if u64::from_be_bytes(h[8..16].try_into().unwrap()) == 99_999 {
                    let mut d = vec![0u8; 4096];
                    r.read_exact(&mut d).await.unwrap();
                }
            }
        })
        .await;
        assert!(
            res.is_ok(),
            "a flood of TRIM/FLUSH hung the connection after {seen} replies"
        );
        let w = writer.await.unwrap();
        c.s = r.reunite(w).unwrap();
        valid_session_works(&srv.sock, 3).await;
    });
    assert_eq!(PANICS.load(Ordering::SeqCst), 0);
}

// ---- The replication apply path -------------------------------------------------------------
//
// A secondary (and a primary draining its old primary's table) fed random and mutated batches of
// `ReplicationMessage`s in-process, against a model of what the apply path promises:
// - a batch with a message for another volume, a stale epoch, a record whose checksum is wrong or
//   an image of the wrong size or checksum is refused before anything is written;
// - otherwise messages apply in order: a record already applied is skipped, the next one is
//   written, a gap or a record / image out of range or a malformed heartbeat set refuses the rest
//   of the batch (what came before it in the batch stays written, and `applied_seq` says so);
// - an accepted batch reports the replica's `applied_seq`.
// The data file, `applied_seq` and the epoch must match the model after every batch.

use bytes::Bytes;
use storage_engine::{
    pb::{self as pbm, replication_message::Body},
    repl::Mode,
    volume::PairConfig,
};

const BS: u64 = 4096;
const BLOCKS: u64 = SIZE / BS;
const EPOCH: u64 = 5;

/// How one message of a batch is made from the stream's current position.
#[derive(Debug, Clone)]
enum MsgSpec {
    Write(RecSpec),
    Batch(Vec<RecSpec>),
    Image {
        block: u64,
        len: usize,
        bad_crc: bool,
        fill: u8,
    },
    Heartbeat(HbSpec),
    ResyncDone {
        next_delta: u64,
        full: bool,
    },
    DrainComplete,
    Empty,
}

#[derive(Debug, Clone)]
struct RecSpec {
    /// Relative to the next expected seq: 0 is next, 1.. is a gap; `back` goes below it.
    delta: u64,
    back: bool,
    offset: u64,
    len: u64,
    zero_length: u64,
    bad_crc: bool,
    fill: u8,
}

#[derive(Debug, Clone)]
enum HbSpec {
    Absent,
    Sparse(Vec<u64>),
    RawWords(Vec<u8>),
    RawBitmap(Vec<u8>),
}

#[derive(Debug, Clone)]
struct Envelope {
    other_volume: bool,
    /// -1 stale, 0 current, +1 newer.
    epoch_shift: i8,
    body: MsgSpec,
}

fn rec_spec() -> impl Strategy<Value = RecSpec> {
    (
        prop_oneof![8 => Just(0u64), 1 => 1..4u64, 1 => Just(u64::MAX / 2)],
        prop::bool::weighted(0.1),
        prop_oneof![
            6 => (0..SIZE / 512).prop_map(|s| s * 512),
            1 => Just(SIZE - 512),
            1 => Just(SIZE),
            1 => any::<u64>(),
        ],
        prop_oneof![4 => (1..16u64).prop_map(|n| n * 512), 1 => 1..9000u64, 1 => Just(0u64)],
        prop_oneof![
            6 => Just(0u64),
            1 => (1..64u64).prop_map(|n| n * 512),
            1 => Just(u64::MAX),
            1 => Just(SIZE + 1),
        ],
        prop::bool::weighted(0.05),
        any::<u8>(),
    )
        .prop_map(
            |(delta, back, offset, len, zero_length, bad_crc, fill)| RecSpec {
                delta,
                back,
                offset,
                len,
                zero_length,
                bad_crc,
                fill,
            },
        )
}

fn msg_spec() -> impl Strategy<Value = MsgSpec> {
    prop_oneof![
        8 => rec_spec().prop_map(MsgSpec::Write),
        3 => prop::collection::vec(rec_spec(), 0..5).prop_map(MsgSpec::Batch),
        3 => (
            prop_oneof![6 => 0..BLOCKS, 1 => Just(BLOCKS), 1 => any::<u64>()],
            prop_oneof![6 => Just(BS as usize), 1 => 0..9000usize],
            prop::bool::weighted(0.1),
            any::<u8>(),
        )
            .prop_map(|(block, len, bad_crc, fill)| MsgSpec::Image {
                block,
                len,
                bad_crc,
                fill,
            }),
        2 => prop_oneof![
            Just(HbSpec::Absent),
            prop::collection::vec(0..BLOCKS, 0..8).prop_map(HbSpec::Sparse),
            prop::collection::vec(any::<u8>(), 0..64).prop_map(HbSpec::RawWords),
            prop::collection::vec(any::<u8>(), 0..64).prop_map(HbSpec::RawBitmap),
        ]
        .prop_map(MsgSpec::Heartbeat),
        1 => (0..3u64, any::<bool>())
            .prop_map(|(next_delta, full)| MsgSpec::ResyncDone { next_delta, full }),
        1 => Just(MsgSpec::DrainComplete),
        1 => Just(MsgSpec::Empty),
    ]
}

fn envelope() -> impl Strategy<Value = Envelope> {
    (
        prop::bool::weighted(0.03),
        prop_oneof![20 => Just(0i8), 1 => Just(-1i8), 1 => Just(1i8)],
        msg_spec(),
    )
        .prop_map(|(other_volume, epoch_shift, body)| Envelope {
            other_volume,
            epoch_shift,
            body,
        })
}

fn fill_bytes(fill: u8, seq: u64, len: usize) -> Bytes {
    (0..len)
        .map(|i| fill ^ (i as u8) ^ (seq as u8))
        .collect::<Vec<u8>>()
        .into()
}

/// One record at the stream's position `seq` (advanced when the record is the next one).
fn record_at(seq: &mut u64, r: &RecSpec) -> pbm::WriteRecord {
    let s = if r.back {
        seq.saturating_sub(1 + r.delta % 3)
    } else {
        seq.saturating_add(r.delta)
    };
    if !r.back && r.delta == 0 {
        *seq += 1;
    }
    let data = if r.zero_length > 0 {
        Bytes::new()
    } else {
        fill_bytes(r.fill, s, r.len as usize)
    };
    let crc = crc32c::crc32c(&data) ^ u32::from(r.bad_crc);
    pbm::WriteRecord {
        seq: s,
        timestamp_us: 0,
        offset: r.offset,
        data,
        crc32c: crc,
        zero_length: r.zero_length,
    }
}

/// The messages of one batch, made concrete from where the stream stands (`next` expected seq).
fn build(specs: &[Envelope], epoch: u64, next: u64) -> Vec<pbm::ReplicationMessage> {
    let mut seq = next;
    specs
        .iter()
        .map(|e| {
            let body = match &e.body {
                MsgSpec::Write(r) => Some(Body::Write(record_at(&mut seq, r))),
                MsgSpec::Batch(rs) => Some(Body::WriteBatch(pbm::WriteBatch {
                    records: rs.iter().map(|r| record_at(&mut seq, r)).collect(),
                    flush: false,
                })),
                MsgSpec::Image {
                    block,
                    len,
                    bad_crc,
                    fill,
                } => {
                    let data = fill_bytes(*fill, *block, *len);
                    Some(Body::Block(pbm::BlockImage {
                        block: *block,
                        generation: 1,
                        crc32c: crc32c::crc32c(&data) ^ u32::from(*bad_crc),
                        data,
                        lazy: false,
                    }))
                }
                MsgSpec::Heartbeat(h) => {
                    let mut hb = pbm::Heartbeat {
                        last_seq: seq,
                        ..Default::default()
                    };
                    match h {
                        HbSpec::Absent => {}
                        HbSpec::Sparse(bits) => {
                            let mut b = Bitmap::new(BLOCKS);
                            for &i in bits {
                                b.set(i);
                            }
                            hb.pending_words = Some(b.to_sparse().into());
                        }
                        HbSpec::RawWords(w) => hb.pending_words = Some(w.clone().into()),
                        HbSpec::RawBitmap(w) => hb.pending_bitmap = w.clone().into(),
                    }
                    Some(Body::Heartbeat(hb))
                }
                MsgSpec::ResyncDone { next_delta, full } => {
                    Some(Body::ResyncDone(pbm::ResyncDone {
                        consistent_seq: seq,
                        full: *full,
                        next_seq: seq + next_delta,
                    }))
                }
                MsgSpec::DrainComplete => {
                    Some(Body::DrainComplete(pbm::DrainComplete { final_seq: seq }))
                }
                MsgSpec::Empty => None,
            };
            pbm::ReplicationMessage {
                volume: if e.other_volume {
                    "other".into()
                } else {
                    NAME.into()
                },
                epoch: epoch.saturating_add_signed(i64::from(e.epoch_shift)),
                body,
            }
        })
        .collect()
}

/// What a secondary must hold after a batch.
#[derive(Debug, Clone)]
struct SecondaryModel {
    data: Vec<u8>,
    applied: u64,
    epoch: u64,
}

impl SecondaryModel {
    /// Applies `batch` as the apply path promises; Err(true) = refused before writing anything.
    fn apply(&mut self, batch: &[pbm::ReplicationMessage]) -> Result<(), bool> {
        let mut newest = self.epoch;
        for m in batch {
            if m.volume != NAME || m.epoch < self.epoch {
                return Err(true);
            }
            newest = newest.max(m.epoch);
            let bad =
                |w: &pbm::WriteRecord| w.zero_length == 0 && crc32c::crc32c(&w.data) != w.crc32c;
            match &m.body {
                Some(Body::Write(w)) if bad(w) => return Err(true),
                Some(Body::WriteBatch(b)) if b.records.iter().any(bad) => return Err(true),
                Some(Body::Block(b))
                    if crc32c::crc32c(&b.data) != b.crc32c || b.data.len() != BS as usize =>
                {
                    return Err(true)
                }
                _ => {}
            }
        }
        self.epoch = newest;
        for m in batch {
            match &m.body {
                Some(Body::Write(w)) => self.record(w)?,
                Some(Body::WriteBatch(b)) => {
                    for w in &b.records {
                        self.record(w)?;
                    }
                }
                Some(Body::Block(b)) => {
                    if b.block >= BLOCKS {
                        return Err(false);
                    }
                    let at = (b.block * BS) as usize;
                    self.data[at..at + BS as usize].copy_from_slice(&b.data);
                }
                Some(Body::ResyncDone(d)) => {
                    if d.next_seq > 0 {
                        self.applied = self.applied.max(d.next_seq - 1);
                    }
                }
                Some(Body::Heartbeat(h)) => {
                    let ok = if let Some(w) = &h.pending_words {
                        Bitmap::from_sparse(BLOCKS, w).is_some()
                    } else {
                        h.pending_bitmap.is_empty()
                            || Bitmap::from_bytes(BLOCKS, &h.pending_bitmap).is_some()
                    };
                    if !ok {
                        return Err(false);
                    }
                }
                Some(Body::DrainComplete(_)) | None => {}
            }
        }
        Ok(())
    }

    fn record(&mut self, w: &pbm::WriteRecord) -> Result<(), bool> {
        if w.seq <= self.applied {
            return Ok(());
        }
        if w.seq != self.applied + 1 {
            return Err(false);
        }
        let len = if w.zero_length > 0 {
            w.zero_length
        } else {
            w.data.len() as u64
        };
        match w.offset.checked_add(len) {
            Some(end) if end <= SIZE => {}
            _ => return Err(false),
        }
        let at = w.offset as usize;
        if w.zero_length > 0 {
            self.data[at..at + len as usize].fill(0);
        } else {
            self.data[at..at + len as usize].copy_from_slice(&w.data);
        }
        self.applied = w.seq;
        Ok(())
    }
}

/// A current-thread runtime for the apply paths, which must run inside one.
fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn pair_config() -> Option<PairConfig> {
    Some(PairConfig {
        peer: "127.0.0.1:9".into(),
        token: None,
        mode: Mode::Async,
        journal_bytes: 1 << 20,
        rate: 0,
        sync_timeout: Duration::from_secs(1),
        lease_ms: 0,
        lease_wait: Duration::from_secs(1),
    })
}

/// A volume of this pair opened with `role` at `epoch`; `prepare` edits the meta before.
fn paired_volume(
    dir: &Path,
    role: Role,
    prepare: impl FnOnce(&mut Meta),
) -> std::sync::Arc<Volume> {
    let mut cfg = volume_config(dir);
    cfg.initial_role = Role::Secondary;
    cfg.pair = pair_config();
    drop(Volume::open(&cfg).unwrap());
    let meta_path = cfg.state_dir.join("meta");
    let mut m = Meta::load(&meta_path).unwrap().unwrap();
    m.epoch = EPOCH;
    m.role = role;
    prepare(&mut m);
    m.store(&meta_path).unwrap();
    Volume::open(&cfg).unwrap()
}

fn data_file(dir: &Path) -> Vec<u8> {
    let mut d = std::fs::read(dir.join("data.img")).unwrap();
    d.resize(SIZE as usize, 0);
    d
}

/// Runs `f`, turning a panic into a test failure that names the batch.
fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, TestCaseError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|_| TestCaseError::fail(format!("apply path panicked on {what}")))
}

#[test]
fn fuzz_secondary_apply_batch_matches_its_contract() {
    let rt = current_thread();
    let _in_rt = rt.enter();
    proptest!(config(), |(batches in prop::collection::vec(
        prop::collection::vec(envelope(), 0..6), 1..6))| {
        let d = tempfile::tempdir().unwrap();
        let vol = paired_volume(d.path(), Role::Secondary, |_| {});
        let mut model = SecondaryModel {
            data: data_file(d.path()),
            applied: vol.replica().applied_seq,
            epoch: vol.epoch(),
        };
        prop_assert_eq!(model.epoch, EPOCH);
        for specs in &batches {
            let batch = build(specs, model.epoch, model.applied + 1);
            let before = data_file(d.path());
            let want = model.apply(&batch);
            let got = no_panic(&format!("{batch:?}"), || vol.apply_batch(batch.clone()))?;
            let after = data_file(d.path());
            match (&want, &got) {
                (Ok(()), Ok(out)) => {
                    prop_assert_eq!(out.applied_seq, vol.replica().applied_seq);
                }
                (Err(true), Err(_)) => {
                    prop_assert!(after == before, "a refused batch wrote: {:?}", got);
                }
                (Err(false), Err(_)) => {}
                _ => prop_assert!(false, "model says {:?}, engine {:?}", want, got.as_ref().map(|o| o.applied_seq)),
            }
            prop_assert_eq!(vol.replica().applied_seq, model.applied);
            prop_assert_eq!(vol.epoch(), model.epoch);
            prop_assert!(after == model.data, "data file differs from the model after {:?}", specs);
        }
        // Durable and reopened: the same.
        vol.make_durable().unwrap();
        drop(vol);
        let mut cfg = volume_config(d.path());
        cfg.pair = pair_config();
        let vol = Volume::open(&cfg).unwrap();
        prop_assert_eq!(vol.replica().applied_seq, model.applied);
        prop_assert!(data_file(d.path()) == model.data);
    });
}

/// The case the fuzzer above shrank to once the secondary gathered adjacent images into one write:
/// an image in range, then one out of range. The batch is refused, and the first image has landed
/// (a batch applies in order up to the message it refuses), as the model says.
#[test]
fn an_image_out_of_range_after_a_gathered_one_lands_the_first_and_refuses_the_batch() {
    let rt = current_thread();
    let _in_rt = rt.enter();
    let d = tempfile::tempdir().unwrap();
    let vol = paired_volume(d.path(), Role::Secondary, |_| {});
    let image = |block| Envelope {
        other_volume: false,
        epoch_shift: 0,
        body: MsgSpec::Image {
            block,
            len: BS as usize,
            bad_crc: false,
            fill: 0x3c,
        },
    };
    let applied = vol.replica().applied_seq;
    let batch = build(&[image(0), image(BLOCKS)], EPOCH, applied + 1);
    let mut model = SecondaryModel {
        data: data_file(d.path()),
        applied,
        epoch: vol.epoch(),
    };
    assert_eq!(model.apply(&batch), Err(false));
    assert!(vol.apply_batch(batch).is_err());
    let after = data_file(d.path());
    assert!(
        after[..BS as usize].iter().any(|&b| b != 0),
        "the first image did not land"
    );
    assert!(after == model.data);
}

/// A primary draining its old primary's table after a takeover: images land only where the
/// handed-off table still wants them, DrainComplete ends the phase; anything else, any other
/// epoch, a bad image refuse the whole batch before anything is written.
#[test]
fn fuzz_draining_primary_apply_drain_matches_its_contract() {
    use storage_engine::meta::Phase;
    let rt = current_thread();
    let _in_rt = rt.enter();
    proptest!(config(), |(
        wanted in prop::collection::vec(0..BLOCKS, 0..40),
        batches in prop::collection::vec(prop::collection::vec(envelope(), 0..6), 1..6),
        via_apply_batch in any::<bool>(),
    )| {
        let d = tempfile::tempdir().unwrap();
        let mut table = Bitmap::new(BLOCKS);
        for &b in &wanted {
            table.set(b);
        }
        let state = d.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        let vol = paired_volume(d.path(), Role::Primary, |m| {
            m.takeover.phase = Phase::Draining;
            table.store(&state.join("peer_pending")).unwrap();
        });
        prop_assert_eq!(vol.state().phase, Phase::Draining);
        prop_assert!(vol.handed_off_table() == table);
        let mut data = data_file(d.path());
        let mut pending = table.clone();
        let mut drained = false;
        for specs in &batches {
            let batch = build(specs, EPOCH, 1);
            let before = data_file(d.path());
            // The model: all-or-nothing validation, then images where still wanted.
            let valid = batch.iter().all(|m| {
                m.volume == NAME
                    && m.epoch == EPOCH
                    && match &m.body {
                        Some(Body::Block(b)) => {
                            b.block < BLOCKS
                                && b.data.len() == BS as usize
                                && crc32c::crc32c(&b.data) == b.crc32c
                        }
                        Some(Body::DrainComplete(_)) | Some(Body::Heartbeat(_)) | None => true,
                        Some(_) => false,
                    }
            });
            let got = no_panic(&format!("{batch:?}"), || {
                if via_apply_batch {
                    vol.apply_batch(batch.clone())
                } else {
                    vol.apply_drain(batch.clone())
                }
            })?;
            prop_assert_eq!(valid, got.is_ok(), "{:?}", got.map(|o| o.applied_seq));
            if !valid {
                prop_assert!(data_file(d.path()) == before, "a refused drain batch wrote");
                prop_assert!(vol.handed_off_table() == pending);
                continue;
            }
            for m in &batch {
                match &m.body {
                    Some(Body::Block(b)) if pending.get(b.block) => {
                        let at = (b.block * BS) as usize;
                        data[at..at + BS as usize].copy_from_slice(&b.data);
                        pending.clear(b.block);
                    }
                    Some(Body::DrainComplete(_)) => {
                        if !drained {
                            pending.clear_all();
                        }
                        drained = true;
                    }
                    _ => {}
                }
            }
            prop_assert!(data_file(d.path()) == data, "data file differs from the model");
            prop_assert!(vol.handed_off_table() == pending);
            let phase = if drained { Phase::Merging } else { Phase::Draining };
            prop_assert_eq!(vol.state().phase, phase);
        }
    });
}
