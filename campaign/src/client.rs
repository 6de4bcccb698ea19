//! A pipelined NBD client per simulated host: up to `qd` requests in flight over one TCP
//! connection, a random mix of READ, WRITE (FUA or not, 4 KiB..32 MiB, aligned to 4 KiB or only to
//! 512 bytes), TRIM, WRITE_ZEROES and FLUSH, every op recorded in the history. A cut connection
//! makes its in-flight ops indeterminate; the client then reconnects to whichever engine serves.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tandem_api::nbd::{self as p, client::handshake_async, SimpleReply};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadHalf},
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UnixStream},
    sync::Semaphore,
};

use crate::{
    history::{Kind, Op, Outcome, Time},
    prng::{mix, Rng},
    stamp::{self, SECTOR},
};

/// What every client shares: the clock, the id counter, where the engines listen, the stop flag.
pub struct Shared {
    pub t0: Instant,
    pub stop: AtomicBool,
    /// While set, the clients send nothing new (what is in flight completes): lets a campaign
    /// see the pair converge under a pause of the load instead of a stop.
    pub hold: AtomicBool,
    pub next_id: AtomicU64,
    pub addrs: Vec<String>,
    pub export: String,
    pub size: u64,
    /// Half of the ops fall in the first `hot` bytes, so that ops race on the same blocks.
    pub hot: u64,
    /// Largest op in bytes (a multiple of 4 KiB, at least one block).
    pub max_op: u64,
    /// Which engine each client may use (all of them, unless a nemesis says otherwise).
    pub route: Route,
}

/// Where clients may go: by default anywhere that serves. A nemesis may pin some clients to one
/// engine (a host that keeps talking to the old primary through a partition) and send the others
/// away from one (hosts that follow the volume to its new primary). A session on an engine it may
/// no longer use stops sending, lets what is in flight complete and disconnects.
#[derive(Debug, Default)]
pub struct Route {
    /// Bit per client: the clients that use only `pin_to`.
    pinned: AtomicU64,
    pin_to: AtomicUsize,
    /// The engine the other clients may not use, + 1 (0: none).
    avoid: AtomicUsize,
    /// Sessions open on each engine.
    open: [AtomicU64; 2],
    /// Requests sent and not answered yet (nor given up as cut).
    inflight: AtomicU64,
}

impl Route {
    /// Whether `client` may send to `engine`.
    pub fn allowed(&self, client: u32, engine: usize) -> bool {
        let bit = 1u64.checked_shl(client).unwrap_or(0);
        if self.pinned.load(Ordering::Acquire) & bit != 0 {
            engine == self.pin_to.load(Ordering::Acquire)
        } else {
            self.avoid.load(Ordering::Acquire) != engine + 1
        }
    }

    /// Pins the clients of the bit mask `clients` to `engine`.
    pub fn pin(&self, clients: u64, engine: usize) {
        self.pin_to.store(engine, Ordering::Release);
        self.pinned.store(clients, Ordering::Release);
    }

    /// Sends every client that is not pinned away from `engine` (None: back to anywhere).
    pub fn avoid(&self, engine: Option<usize>) {
        self.avoid
            .store(engine.map_or(0, |e| e + 1), Ordering::Release);
    }

    /// Every client may go anywhere again.
    pub fn clear(&self) {
        self.pinned.store(0, Ordering::Release);
        self.avoid(None);
    }

    /// Requests in flight over all sessions.
    pub fn inflight(&self) -> u64 {
        self.inflight.load(Ordering::SeqCst)
    }

    /// How many sessions are open on `engine`.
    pub fn open_on(&self, engine: usize) -> u64 {
        self.open
            .get(engine)
            .map_or(0, |n| n.load(Ordering::Acquire))
    }
}

/// Counts a session as open on its engine while it lives.
struct Open<'a>(&'a AtomicU64);

impl<'a> Open<'a> {
    fn new(n: &'a AtomicU64) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        Open(n)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Shared {
    pub fn now(&self) -> Time {
        self.t0.elapsed().as_nanos() as u64 + 1
    }
    pub fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
    fn holding(&self) -> bool {
        self.hold.load(Ordering::SeqCst)
    }
}

#[derive(Debug, Default)]
pub struct Stats {
    pub connects: u64,
    pub connect_failures: u64,
    pub errnos: BTreeMap<u32, u64>,
    /// Ops still unanswered when the client gave up waiting at the end (a hang).
    pub stuck: u64,
    pub bytes_written: u64,
    pub bytes_read: u64,
}

fn other(msg: impl ToString) -> io::Error {
    io::Error::other(msg.to_string())
}

/// A connection to an engine: TCP, or its unix socket (`unix:PATH`, an engine in another
/// network namespace that shares this filesystem).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}
pub type Conn = Box<dyn Stream>;

async fn connect(addr: &str) -> io::Result<Conn> {
    if let Some(path) = addr.strip_prefix("unix:") {
        return Ok(Box::new(UnixStream::connect(path).await?));
    }
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(Box::new(s))
}

/// Fixed-newstyle handshake with OPT_GO; the export size, or an error if the engine refuses
/// (a secondary, a fenced engine, a stale epoch).
pub async fn handshake(addr: &str, export: &str) -> io::Result<(Conn, u64)> {
    let mut s = connect(addr).await?;
    let info = handshake_async(&mut s, export, &[])
        .await
        .map_err(io::Error::other)?;
    Ok((s, info.size))
}

/// One random request: the op to record, the NBD header, the WRITE payload.
fn generate(rng: &mut Rng, sh: &Shared, client: u32) -> (Op, p::Request, Option<Vec<u8>>) {
    let id = sh.id();
    let roll = rng.below(100);
    let kind = match roll {
        0..40 => Kind::Read,
        40..78 => Kind::Write,
        78..84 => Kind::Trim,
        84..90 => Kind::Zero,
        _ => Kind::Flush,
    };
    if kind == Kind::Flush {
        let op = Op::new(id, client, kind, 0, 0, 0);
        let req = p::Request {
            flags: 0,
            kind: p::CMD_FLUSH,
            handle: id,
            offset: 0,
            length: 0,
        };
        return (op, req, None);
    }
    // Mostly small; some up to 1 MiB; a few up to 32 MiB.
    let size = match rng.below(1000) {
        0..850 => 4096 * rng.range(1, 17),
        850..990 => 4096 * rng.range(17, 257),
        _ => 4096 * rng.range(257, 8193),
    };
    // A quarter only sector-aligned: partial blocks, read-modify-write territory.
    let unit = if rng.pct(25) { SECTOR } else { 4096 };
    let len = if unit == SECTOR {
        SECTOR * rng.range(1, size / SECTOR + 1)
    } else {
        size
    }
    .min(sh.size)
    .min(sh.max_op);
    let region = if rng.pct(50) && sh.hot >= len {
        sh.hot
    } else {
        sh.size
    };
    let offset = unit * rng.below((region - len) / unit + 1);
    let mut op = Op::new(id, client, kind, offset / SECTOR, len / SECTOR, 0);
    let mut flags = 0;
    if kind != Kind::Read && rng.pct(if kind == Kind::Write { 15 } else { 10 }) {
        op.fua = true;
        flags |= p::CMD_FLAG_FUA;
    }
    if kind == Kind::Zero && rng.pct(50) {
        flags |= p::CMD_FLAG_NO_HOLE;
    }
    let cmd = match kind {
        Kind::Read => p::CMD_READ,
        Kind::Write => p::CMD_WRITE,
        Kind::Trim => p::CMD_TRIM,
        _ => p::CMD_WRITE_ZEROES,
    };
    let payload = (kind == Kind::Write).then(|| {
        let mut b = vec![0u8; len as usize];
        stamp::fill(&mut b, id, offset / SECTOR);
        b
    });
    let req = p::Request {
        flags,
        kind: cmd,
        handle: id,
        offset,
        length: len as u32,
    };
    (op, req, payload)
}

type Pending = Arc<Mutex<HashMap<u64, Op>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads replies until the connection fails; each completes its pending op.
async fn read_replies(
    mut rd: ReadHalf<Conn>,
    pending: Pending,
    done: Arc<Mutex<Vec<Op>>>,
    sem: Arc<Semaphore>,
    sh: Arc<Shared>,
) {
    let _ = reply_loop(&mut rd, &pending, &done, &sem, &sh).await;
    // Wakes the sender: this connection is over.
    sem.close();
}

async fn reply_loop(
    rd: &mut ReadHalf<Conn>,
    pending: &Pending,
    done: &Mutex<Vec<Op>>,
    sem: &Semaphore,
    sh: &Shared,
) -> io::Result<()> {
    loop {
        let mut h = [0u8; SimpleReply::LEN];
        rd.read_exact(&mut h).await?;
        let SimpleReply { error: err, handle } = SimpleReply::parse(&h).map_err(other)?;
        let Some(mut op) = lock(pending).remove(&handle) else {
            return Err(other(format!("reply for unknown handle {handle}")));
        };
        sh.route.inflight.fetch_sub(1, Ordering::AcqRel);
        if op.kind == Kind::Read && err == 0 {
            let mut buf = vec![0u8; (op.sectors * SECTOR) as usize];
            if let Err(e) = rd.read_exact(&mut buf).await {
                lock(done).push(op);
                return Err(e);
            }
            op.comp = sh.now();
            op.seen = stamp::decode(&buf, op.sector);
        } else {
            op.comp = sh.now();
        }
        op.outcome = if err == 0 {
            Outcome::Ok
        } else {
            Outcome::Err(err)
        };
        lock(done).push(op);
        sem.add_permits(1);
    }
}

/// Runs one connection to `engine` until it fails, the client may no longer use that engine, or
/// the campaign stops; appends its ops to `ops`.
#[allow(clippy::too_many_arguments)]
async fn session(
    stream: Conn,
    engine: usize,
    sh: &Arc<Shared>,
    rng: &mut Rng,
    client: u32,
    qd: usize,
    ops: &mut Vec<Op>,
    stats: &mut Stats,
) {
    let _open = sh.route.open.get(engine).map(Open::new);
    let (rd, mut wr) = tokio::io::split(stream);
    let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
    let done = Arc::new(Mutex::new(Vec::new()));
    let sem = Arc::new(Semaphore::new(qd));
    let reader = tokio::spawn(read_replies(
        rd,
        pending.clone(),
        done.clone(),
        sem.clone(),
        sh.clone(),
    ));
    let mut left = false;
    let sent: io::Result<()> = async {
        while !sh.stopping() {
            if !sh.route.allowed(client, engine) {
                left = true;
                break;
            }
            // The engine closed the connection (a fence, a kill): what it had in flight is cut.
            // Seen here too, not only at the next send: a held client sends nothing, and its
            // cut requests must not count as in flight while a settle waits for none.
            if reader.is_finished() {
                break;
            }
            // Counted in flight before `hold` is looked at, with both sequentially consistent:
            // a settle that raises `hold` and then sees nothing in flight knows that no client
            // is between its look and a send (one that waited for a permit had sent a 32 MiB
            // write just after a settle's compare began).
            sh.route.inflight.fetch_add(1, Ordering::SeqCst);
            let unreserve = || sh.route.inflight.fetch_sub(1, Ordering::SeqCst);
            if sh.holding() {
                unreserve();
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            let permit =
                match tokio::time::timeout(Duration::from_millis(100), sem.clone().acquire_owned())
                    .await
                {
                    Err(_) => {
                        unreserve();
                        continue;
                    }
                    Ok(Err(_)) => {
                        unreserve();
                        return Ok(()); // the reader is gone
                    }
                    Ok(Ok(p)) => p,
                };
            permit.forget();
            let (mut op, req, payload) = generate(rng, sh, client);
            op.engine = engine;
            op.inv = sh.now();
            stats.bytes_written += payload.as_ref().map_or(0, |b| b.len() as u64);
            if op.kind == Kind::Read {
                stats.bytes_read += op.sectors * SECTOR;
            }
            lock(&pending).insert(req.handle, op);
            wr.write_all(&req.encode()).await?;
            if let Some(b) = payload {
                wr.write_all(&b).await?;
            }
        }
        Ok::<(), io::Error>(())
    }
    .await;
    // Let what is in flight complete (the nemesis has stopped by now), then leave cleanly.
    let deadline = Instant::now() + Duration::from_secs(60);
    while sent.is_ok() && !reader.is_finished() && !lock(&pending).is_empty() {
        if Instant::now() > deadline {
            stats.stuck += lock(&pending).len() as u64;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if sh.stopping() || left {
        let disc = p::Request {
            flags: 0,
            kind: p::CMD_DISC,
            handle: 0,
            offset: 0,
            length: 0,
        };
        let _ = wr.write_all(&disc.encode()).await;
    }
    reader.abort();
    let _ = reader.await;
    for op in std::mem::take(&mut *lock(&done)) {
        if let Outcome::Err(e) = op.outcome {
            *stats.errnos.entry(e).or_default() += 1;
        }
        ops.push(op);
    }
    // Cut in flight: may or may not have happened.
    let cut: Vec<Op> = lock(&pending).drain().map(|(_, op)| op).collect();
    sh.route
        .inflight
        .fetch_sub(cut.len() as u64, Ordering::AcqRel);
    ops.extend(cut);
}

/// One simulated host until the stop flag: connect to whichever engine serves, run, reconnect.
pub async fn run_client(sh: Arc<Shared>, client: u32, qd: usize, seed: u64) -> (Vec<Op>, Stats) {
    let mut rng = Rng::new(seed ^ mix(u64::from(client) + 1));
    let mut ops = Vec::new();
    let mut stats = Stats::default();
    let mut prefer = 0usize;
    'outer: while !sh.stopping() {
        for k in 0..sh.addrs.len() {
            let i = (prefer + k) % sh.addrs.len();
            if !sh.route.allowed(client, i) {
                continue;
            }
            // A stopped engine accepts TCP but never answers: bound the handshake.
            match tokio::time::timeout(Duration::from_secs(2), handshake(&sh.addrs[i], &sh.export))
                .await
            {
                Ok(Ok((stream, _))) => {
                    prefer = i;
                    stats.connects += 1;
                    session(stream, i, &sh, &mut rng, client, qd, &mut ops, &mut stats).await;
                    continue 'outer;
                }
                _ => stats.connect_failures += 1,
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (ops, stats)
}

/// The final read of the whole volume, in `chunk`-byte requests, through `addr`.
pub async fn final_read(sh: &Shared, addr: &str, chunk: u64) -> io::Result<Vec<Op>> {
    let (mut s, size) = handshake(addr, &sh.export).await?;
    let mut ops = Vec::new();
    let mut off = 0;
    while off < size {
        let len = chunk.min(size - off);
        let mut op = Op::new(
            sh.id(),
            u32::MAX,
            Kind::Read,
            off / SECTOR,
            len / SECTOR,
            sh.now(),
        );
        op.final_read = true;
        let req = p::Request {
            flags: 0,
            kind: p::CMD_READ,
            handle: op.id,
            offset: off,
            length: len as u32,
        };
        s.write_all(&req.encode()).await?;
        let mut h = [0u8; SimpleReply::LEN];
        s.read_exact(&mut h).await?;
        let reply =
            SimpleReply::parse(&h).map_err(|e| other(format!("final read at {off}: {e}")))?;
        if reply.handle != op.id || reply.error != 0 {
            return Err(other(format!(
                "final read at {off}: reply for handle {} errno {}",
                reply.handle, reply.error
            )));
        }
        let mut buf = vec![0u8; len as usize];
        s.read_exact(&mut buf).await?;
        op.comp = sh.now();
        op.outcome = Outcome::Ok;
        op.seen = stamp::decode(&buf, op.sector);
        ops.push(op);
        off += len;
    }
    Ok(ops)
}
