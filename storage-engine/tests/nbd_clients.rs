//! One engine, driven by real NBD clients (nbdinfo, qemu-io, nbdcopy) and by a raw socket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use common::*;

#[test]
fn nbdinfo_reports_size_and_block_sizes() {
    let d = tempfile::tempdir().unwrap();
    let e = start_engine(d.path(), "vol-info", "64M", &[]);
    let out = run_ok("nbdinfo", &["--json", &e.uri()]);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ex = &j["exports"][0];
    assert_eq!(ex["export-name"], "vol-info");
    assert_eq!(ex["export-size"], 64u64 << 20);
    assert_eq!(ex["block_size_minimum"], 512);
    assert_eq!(ex["block_size_preferred"], 4096);
    assert_eq!(ex["can_flush"], true);
    assert_eq!(ex["can_fua"], true);
    assert_eq!(ex["can_trim"], true);
    assert_eq!(ex["can_zero"], true);
    // OPT_LIST names the export; the unix socket serves the same volume.
    let list = run_ok("nbdinfo", &["--list", &e.uri()]);
    assert!(list.contains("vol-info"), "{list}");
    let size = run_ok("nbdinfo", &["--size", &e.unix_uri()]);
    assert_eq!(size.trim(), (64u64 << 20).to_string());
    // An unknown export name is refused with a clear error.
    let bad = run("nbdinfo", &[&format!("nbd://{}/nope", e.nbd)]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("nope"));
}

#[test]
fn qemu_io_patterns_unaligned_last_sector_and_past_end() {
    let d = tempfile::tempdir().unwrap();
    let e = start_engine(d.path(), "vol-q", "8M", &[]);
    let last = (8 << 20) - 512;
    qemu_io_ok(
        &e.uri(),
        &[
            "write -P 0xa5 0 64k",
            "write -P 0x3c 1536 1000",
            "write -P 0x77 4097 3",
            &format!("write -P 0xee {last} 512"),
            "write -z 1M 64k",
            "write -P 0x11 2M 8k",
            "discard 2M 4k",
            "flush",
        ],
    );
    qemu_io_ok(
        &e.uri(),
        &[
            "read -P 0xa5 0 1536",
            "read -P 0x3c 1536 1000",
            "read -P 0xa5 2536 1561",
            "read -P 0x77 4097 3",
            "read -P 0xa5 4100 61436",
            &format!("read -P 0xee {last} 512"),
            "read -P 0 1M 64k",
            "read -P 0 2M 4k",
            "read -P 0x11 2052k 4k",
        ],
    );
    // The unix socket sees the same bytes.
    qemu_io_ok(&e.unix_uri(), &["read -P 0x77 4097 3"]);
    // Past the end: both fail, and the connection still serves afterwards.
    let out = qemu_io(
        &e.uri(),
        &[
            "read 8M 512",
            "write -P 1 8M 512",
            "read -P 0xee 8388096 512",
        ],
    );
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(text.matches("failed").count(), 2, "{text}");
    assert!(
        text.contains("read 512/512 bytes at offset 8388096"),
        "{text}"
    );
}

#[test]
fn nbdcopy_roundtrip_of_random_data_tcp_and_unix() {
    let d = tempfile::tempdir().unwrap();
    let e = start_engine(d.path(), "vol-copy", "32M", &[]);
    let src = d.path().join("src.bin");
    std::fs::write(&src, pattern(7, 32 << 20)).unwrap();
    run_ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=16",
            src.to_str().unwrap(),
            &e.uri(),
        ],
    );
    let back = d.path().join("back.bin");
    run_ok("nbdcopy", &[&e.unix_uri(), back.to_str().unwrap()]);
    assert!(std::fs::read(&src).unwrap() == std::fs::read(&back).unwrap());
    // The data file is a raw image holding the same bytes.
    assert!(std::fs::read(&src).unwrap() == std::fs::read(e.data()).unwrap());
}

#[test]
fn many_concurrent_clients_keep_their_bytes() {
    let d = tempfile::tempdir().unwrap();
    let e = start_engine(d.path(), "vol-many", "64M", &[]);
    let uri = e.uri();
    let handles: Vec<_> = (0..12)
        .map(|i| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                let off = i * (4 << 20);
                let pat = 0x10 + i;
                qemu_io_ok(
                    &uri,
                    &[
                        &format!("aio_write -P {pat} {off} 1M"),
                        &format!("aio_write -P {pat} {} 1M", off + (1 << 20)),
                        &format!("aio_write -P {pat} {} 2M", off + (2 << 20)),
                        "aio_flush",
                        &format!("read -P {pat} {off} 4M"),
                    ],
                );
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    for i in 0..12u64 {
        qemu_io_ok(
            &uri,
            &[&format!("read -P {} {} 4M", 0x10 + i, i * (4 << 20))],
        );
    }
}

#[test]
fn flush_then_sigkill_then_restart_keeps_data() {
    let d = tempfile::tempdir().unwrap();
    let mut e = start_engine(d.path(), "vol-kill", "16M", &[]);
    let src = d.path().join("src.bin");
    std::fs::write(&src, pattern(99, 16 << 20)).unwrap();
    run_ok("nbdcopy", &["--flush", src.to_str().unwrap(), &e.uri()]);
    e.kill();
    e.restart().unwrap();
    let back = d.path().join("back.bin");
    run_ok("nbdcopy", &[&e.uri(), back.to_str().unwrap()]);
    assert!(std::fs::read(&src).unwrap() == std::fs::read(&back).unwrap());
    assert_eq!(
        status(&e)["bytes_written"],
        0,
        "counters restart with the process"
    );
}

#[test]
fn sigterm_is_a_clean_shutdown() {
    let d = tempfile::tempdir().unwrap();
    let mut e = start_engine(d.path(), "vol-term", "4M", &[]);
    qemu_io_ok(&e.uri(), &["write -P 0x42 0 4k"]);
    assert!(e.terminate(), "engine must exit 0 on SIGTERM: {}", e.log());
    assert!(!e.socket().exists(), "unix socket removed on shutdown");
    assert!(e.log().contains("stopped cleanly"));
    let data = std::fs::read(e.data()).unwrap();
    assert!(data[..4096].iter().all(|b| *b == 0x42));
}

#[test]
fn existing_data_file_of_another_size_is_refused_untouched() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("data.img"), vec![7u8; 1 << 20]).unwrap();
    let engine = Bin::Engine.path().unwrap();
    let engine = engine.to_str().unwrap();
    let out = run(
        engine,
        &[
            "serve",
            "--volume",
            "v",
            "--size",
            "2M",
            "--data",
            d.path().join("data.img").to_str().unwrap(),
            "--state-dir",
            d.path().join("state").to_str().unwrap(),
            "--nbd-listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "127.0.0.1:0",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to truncate"), "{err}");
    assert_eq!(
        std::fs::read(d.path().join("data.img")).unwrap(),
        vec![7u8; 1 << 20]
    );
    let bad = run(
        engine,
        &[
            "serve",
            "--volume",
            "v",
            "--size",
            "12Q",
            "--data",
            "x",
            "--state-dir",
            "y",
        ],
    );
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown suffix"));
}

// ---- raw-socket abuse: the server must close only the offending connection and keep serving ----

fn connect(e: &Engine) -> TcpStream {
    let s = TcpStream::connect(&e.nbd).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn read_greeting(s: &mut TcpStream) {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[0..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
}

/// Completes a handshake with OPT_GO for `name`; returns the stream in transmission phase.
fn go(e: &Engine) -> TcpStream {
    let mut s = connect(e);
    read_greeting(&mut s);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = Vec::new();
    opt.extend_from_slice(b"IHAVEOPT");
    opt.extend_from_slice(&7u32.to_be_bytes());
    let name = e.volume().as_bytes();
    opt.extend_from_slice(&((4 + name.len() + 2) as u32).to_be_bytes());
    opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
    opt.extend_from_slice(name);
    opt.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&opt).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut body = vec![0u8; len as usize];
        s.read_exact(&mut body).unwrap();
        if ty == 1 {
            return s;
        }
        assert_eq!(ty, 3, "expected INFO or ACK");
    }
}

fn request(kind: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&handle.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

fn reply(s: &mut TcpStream) -> (u32, u64) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), 0x6744_6698);
    (
        u32::from_be_bytes(h[4..8].try_into().unwrap()),
        u64::from_be_bytes(h[8..16].try_into().unwrap()),
    )
}

fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(_) => return false,
        }
    }
}

#[test]
fn malformed_handshakes_close_only_that_connection() {
    let d = tempfile::tempdir().unwrap();
    let e = start_engine(d.path(), "vol-raw", "4M", &[]);
    // Unknown client flags.
    let mut s = connect(&e);
    read_greeting(&mut s);
    s.write_all(&0xffff_0000u32.to_be_bytes()).unwrap();
    assert!(closed(&mut s));
    // Bad option magic.
    let mut s = connect(&e);
    read_greeting(&mut s);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(b"NOTMAGIC\0\0\0\x07\0\0\0\0").unwrap();
    assert!(closed(&mut s));
    // An option claiming a 1 GiB payload is skipped, never buffered (it is refused with
    // ERR_TOO_BIG once its bytes are read: tests/fuzz.rs); a client hanging up ends it.
    let mut s = connect(&e);
    read_greeting(&mut s);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut o = b"IHAVEOPT".to_vec();
    o.extend_from_slice(&7u32.to_be_bytes());
    o.extend_from_slice(&(1u32 << 30).to_be_bytes());
    s.write_all(&o).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(closed(&mut s));
    // A truncated OPT_GO payload gets ERR_INVALID and the haggling continues.
    let mut s = connect(&e);
    read_greeting(&mut s);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut o = b"IHAVEOPT".to_vec();
    o.extend_from_slice(&7u32.to_be_bytes());
    o.extend_from_slice(&3u32.to_be_bytes());
    o.extend_from_slice(&[0, 0, 9]);
    s.write_all(&o).unwrap();
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(
        u32::from_be_bytes(h[12..16].try_into().unwrap()),
        (1 << 31) + 3
    );
    // Unsupported option: ERR_UNSUP.
    let mut len = [0u8; 4];
    len.copy_from_slice(&h[16..20]);
    let mut msg = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut msg).unwrap();
    let mut o = b"IHAVEOPT".to_vec();
    o.extend_from_slice(&99u32.to_be_bytes());
    o.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&o).unwrap();
    s.read_exact(&mut h).unwrap();
    assert_eq!(
        u32::from_be_bytes(h[12..16].try_into().unwrap()),
        (1 << 31) + 1
    );
    // Garbage then disconnect mid-handshake.
    let mut s = connect(&e);
    s.write_all(&[1, 2, 3]).unwrap();
    drop(s);
    // The server still serves real clients.
    qemu_io_ok(&e.uri(), &["write -P 0x5a 0 4k", "read -P 0x5a 0 4k"]);
}

#[test]
fn malformed_requests_get_errors_or_close_and_server_lives() {
    let d = tempfile::tempdir().unwrap();
    let e = start_engine(d.path(), "vol-req", "4M", &[]);
    let mut s = go(&e);
    // Read past the end: EINVAL, connection lives.
    s.write_all(&request(0, 1, 4 << 20, 512)).unwrap();
    assert_eq!(reply(&mut s), (22, 1));
    // Write past the end: ENOSPC; the payload is consumed so the stream stays in step.
    let mut w = request(1, 2, (4 << 20) - 512, 4096);
    w.extend_from_slice(&[0xab; 4096]);
    s.write_all(&w).unwrap();
    assert_eq!(reply(&mut s), (28, 2));
    // Over-large read: EINVAL (over the advertised maximum block size), no allocation.
    s.write_all(&request(0, 3, 0, u32::MAX)).unwrap();
    assert_eq!(reply(&mut s), (22, 3));
    // Unknown command: EINVAL.
    s.write_all(&request(42, 4, 0, 0)).unwrap();
    assert_eq!(reply(&mut s), (22, 4));
    // Offset overflow: EINVAL.
    s.write_all(&request(0, 5, u64::MAX - 10, 512)).unwrap();
    assert_eq!(reply(&mut s), (22, 5));
    // A good write then read on the same connection.
    let mut w = request(1, 6, 8192, 4096);
    w.extend_from_slice(&[0x61; 4096]);
    s.write_all(&w).unwrap();
    assert_eq!(reply(&mut s), (0, 6));
    s.write_all(&request(0, 7, 8192, 4096)).unwrap();
    assert_eq!(reply(&mut s), (0, 7));
    let mut data = vec![0u8; 4096];
    s.read_exact(&mut data).unwrap();
    assert!(data.iter().all(|b| *b == 0x61));
    // Bad request magic: the connection is closed.
    s.write_all(&[0xde; 28]).unwrap();
    assert!(closed(&mut s));
    // Pipelined requests on one connection are all answered, matched by handle.
    let mut s = go(&e);
    let mut batch = Vec::new();
    for h in 100..164u64 {
        batch.extend_from_slice(&request(0, h, (h - 100) * 4096, 4096));
    }
    s.write_all(&batch).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..64 {
        let (err, h) = reply(&mut s);
        assert_eq!(err, 0);
        s.read_exact(&mut data).unwrap();
        seen.insert(h);
    }
    assert_eq!(seen, (100..164).collect());
    // Clean disconnect.
    s.write_all(&request(2, 0, 0, 0)).unwrap();
    assert!(closed(&mut s));
    qemu_io_ok(&e.uri(), &["read -P 0x61 8192 4096"]);
}

#[test]
fn grpc_status_counts_io() {
    let d = tempfile::tempdir().unwrap();
    let e = start_engine(d.path(), "vol-st", "4M", &[]);
    qemu_io_ok(&e.uri(), &["write -P 1 0 64k", "read 0 32k", "flush"]);
    let s = status(&e);
    assert_eq!(s["volume"], "vol-st");
    assert_eq!(s["role"], "primary");
    assert_eq!(s["size"], 4u64 << 20);
    assert_eq!(s["block_size"], 4096);
    assert_eq!(s["bytes_written"], 65536);
    assert_eq!(s["bytes_read"], 32768);
    assert_eq!(s["nbd_connections"], 0);
    assert!(s["epoch"].as_u64().unwrap() >= 1);
    // Unknown volume: NOT_FOUND.
    let out = e
        .command()
        .args(["status", "--grpc", &e.grpc, "--volume", "other", "--json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown volume"));
}

/// Issue 11: a TRIM or WRITE_ZEROES longer than the connection's 64 MiB budget used to wait
/// forever for permits it could never get, and the connection's reader with it (`fstrim` through
/// the FUSE attach path, which sends 1 GiB pieces, hung the volume). Now both complete, the range
/// reads back zero, data outside it survives, and a READ pipelined behind them is answered.
#[test]
fn large_trim_and_zeroes_complete_and_reads_still_answer() {
    use storage_engine::nbd::{client::NbdClient, proto as p};
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    let d = tempfile::tempdir().unwrap();
    let e = start_engine(d.path(), "vol-trim", "3G", &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr = e.nbd.clone();
    let run = async move {
        let mut c = NbdClient::connect(&addr, "vol-trim").await.unwrap();
        let pattern = vec![0xabu8; 64 << 10];
        // Two marks inside the trimmed range, two inside the zeroed range, one outside both.
        let (trim_at, trim_len) = (0u64, GIB + 64 * MIB);
        let (zero_at, zero_len) = (trim_at + trim_len, GIB + 64 * MIB);
        let inside = [
            4096,
            GIB + 8 * MIB,
            zero_at + 4096,
            zero_at + GIB + 32 * MIB,
        ];
        let outside = zero_at + zero_len + 4096;
        for at in inside.iter().chain([&outside]) {
            c.write(*at, &pattern).await.unwrap();
        }
        // Pipelined: TRIM, READ, WRITE_ZEROES (FUA, so its last piece flushes), READ.
        let t = c
            .send(p::CMD_TRIM, 0, trim_at, trim_len as u32, None)
            .await
            .unwrap();
        let r1 = c.send(p::CMD_READ, 0, outside, 4096, None).await.unwrap();
        let z = c
            .send(
                p::CMD_WRITE_ZEROES,
                p::CMD_FLAG_FUA,
                zero_at,
                zero_len as u32,
                None,
            )
            .await
            .unwrap();
        let r2 = c.send(p::CMD_READ, 0, outside, 4096, None).await.unwrap();
        let mut answered = std::collections::BTreeMap::new();
        for _ in 0..4 {
            let (h, err, data) = c
                .recv(|h| if h == r1 || h == r2 { 4096 } else { 0 })
                .await
                .unwrap();
            answered.insert(h, (err, data));
        }
        assert_eq!(answered[&t].0, 0, "TRIM failed");
        assert_eq!(answered[&z].0, 0, "WRITE_ZEROES failed");
        for r in [r1, r2] {
            assert_eq!(answered[&r], (0, pattern[..4096].to_vec()));
        }
        for at in inside {
            let got = c.read(at, pattern.len() as u32).await.unwrap();
            assert!(got.iter().all(|b| *b == 0), "mark at {at} not zeroed");
        }
        assert_eq!(
            c.read(outside, pattern.len() as u32).await.unwrap(),
            pattern
        );
        c.disconnect().await.unwrap();
    };
    rt.block_on(async {
        tokio::time::timeout(std::time::Duration::from_secs(60), run)
            .await
            .expect("a large TRIM / WRITE_ZEROES hung the NBD connection")
    });
    // Another client sees the same bytes.
    qemu_io_ok(
        &e.uri(),
        &[
            "read -P 0 4096 64k",
            &format!("read -P 0xab {} 64k", 2 * (GIB + 64 * MIB) + 4096),
        ],
    );
}
