//! The NBD server: handshake, then a pipelined transmission phase where one reader task parses
//! requests, each request runs as its own task, and one writer task sends replies as they finish
//! (out of order, matched by handle).

use std::{
    collections::BTreeMap,
    io,
    sync::{atomic::Ordering, Arc, Mutex},
    time::Duration,
};

use tandem_api::accept::Backoff;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter},
    net::{TcpListener, UnixListener},
    sync::{oneshot, watch, Semaphore},
};
use tracing::{debug, info, warn};

use super::proto::{self as p, Request};
use crate::{
    geometry::BLOCK_SIZE,
    snapshot::Snapshot,
    volume::{Counters, ExportName, Volume},
};

/// Bytes of request payload and read replies one connection may hold in memory at once.
const CONN_BUDGET: usize = 64 * 1024 * 1024;
/// Budget unit: one permit per 4 KiB.
const PERMIT_BYTES: usize = 4096;
/// Requests up to this size run inline on the reader task.
const INLINE_MAX: u32 = 128 * 1024;
/// TRIM / WRITE_ZEROES run in pieces of this many bytes, so the engine's per-request work (block
/// locks, table entries) is that of one maximal WRITE whatever length the client sends.
const ZERO_PIECE: u64 = p::MAX_PAYLOAD as u64;

// Liveness: every request's reservation fits in the budget, so none can wait for permits that
// never exist (the 1 GiB TRIM deadlock; tests/nbd_clients.rs `large_trim_and_zeroes_*`).
const _: () = assert!(p::MAX_PAYLOAD as usize <= CONN_BUDGET);

/// Budget permits a validated request holds until its reply is sent: a WRITE's payload or a
/// READ's reply buffer (at most `MAX_PAYLOAD`, by validation); payload-free commands one permit.
fn permits(req: &Request) -> u32 {
    match req.kind {
        p::CMD_READ | p::CMD_WRITE => (req.length as usize).div_ceil(PERMIT_BYTES).max(1) as u32,
        _ => 1,
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("protocol: {0}")]
    Proto(#[from] p::ProtoError),
    #[error("client sent unknown handshake flags {0:#x}")]
    ClientFlags(u32),
    #[error("client asked for unknown export {0:?}")]
    UnknownExport(String),
    #[error("client ended the handshake")]
    Aborted,
}

/// How an engine bounds its NBD clients (`--nbd-max-connections`, `--nbd-handshake-timeout-ms`,
/// `--nbd-pinned-exports-only`).
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Connections at once, in handshake or transmission, TCP and unix together.
    pub max_connections: usize,
    /// A client must have entered transmission within this long after accept.
    pub handshake_timeout: Duration,
    /// Only `<volume>@<epoch>` opens; the bare names are refused.
    pub pinned_only: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_connections: 64,
            handshake_timeout: Duration::from_secs(10),
            pinned_only: false,
        }
    }
}

/// The connection table the NBD listeners of one engine share: who is connected, who is still
/// haggling, and the right to close the oldest haggler when the table is full.
pub struct Admission {
    policy: Policy,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    next: u64,
    /// By admission order: the first handshaking entry is the oldest one.
    conns: BTreeMap<u64, Slot>,
}

struct Slot {
    /// Present while the connection is in handshake: sending on it (or dropping it) evicts it.
    evict: Option<oneshot::Sender<()>>,
}

/// One admitted connection's place in the table; dropping it frees the place.
pub struct Ticket {
    id: u64,
    evicted: oneshot::Receiver<()>,
    admission: Arc<Admission>,
}

impl Admission {
    pub fn new(policy: Policy) -> Arc<Admission> {
        Arc::new(Admission {
            policy,
            table: Mutex::new(Table::default()),
        })
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        // The table is consistent after every statement; a panicking holder leaves it usable.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a new connection, evicting the oldest one still in handshake when the table is full;
    /// `None` (close it at once) when every admitted connection is established.
    // Limit: at most `max_connections` are admitted at once, and idle handshakers cannot lock a
    // real client out: they make room for it (tests/nbd_limits.rs `idle_handshakers_*`,
    // `over_the_cap_*`).
    pub fn admit(self: &Arc<Self>, counters: &Counters) -> Option<Ticket> {
        let mut t = self.table();
        if t.conns.len() >= self.policy.max_connections {
            let oldest = t
                .conns
                .iter()
                .find(|(_, s)| s.evict.is_some())
                .map(|(id, _)| *id);
            match oldest.and_then(|id| t.conns.remove(&id)) {
                Some(slot) => {
                    if let Some(tx) = slot.evict {
                        let _ = tx.send(());
                    }
                    counters.nbd_evicted.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    counters.nbd_refused.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            }
        }
        let id = t.next;
        t.next += 1;
        let (tx, rx) = oneshot::channel();
        t.conns.insert(id, Slot { evict: Some(tx) });
        Some(Ticket {
            id,
            evicted: rx,
            admission: Arc::clone(self),
        })
    }
}

impl Ticket {
    /// The handshake is over: the connection can no longer be evicted. False when it was evicted
    /// meanwhile (the table no longer holds it, so it must close).
    fn established(&mut self) -> bool {
        match self.admission.table().conns.get_mut(&self.id) {
            Some(slot) => {
                slot.evict = None;
                true
            }
            None => false,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.table().conns.remove(&self.id);
    }
}

/// Accepts NBD clients on a TCP listener until `shutdown` fires.
pub async fn serve_tcp(
    listener: TcpListener,
    volume: Arc<Volume>,
    admission: Arc<Admission>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new("nbd");
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((sock, peer)) => {
                    backoff.succeeded();
                    let Some(ticket) = admission.admit(&volume.counters) else {
                        debug!(%peer, "nbd connection refused: at --nbd-max-connections");
                        continue;
                    };
                    let _ = sock.set_nodelay(true);
                    debug!(%peer, "nbd client connected");
                    tokio::spawn(run_connection(sock, Arc::clone(&volume), ticket));
                }
                Err(e) => tokio::select! {
                    _ = backoff.failed(&e, &volume.counters.nbd_accept_errors) => {}
                    _ = shutdown.changed() => return,
                },
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// Accepts NBD clients on a unix socket until `shutdown` fires.
pub async fn serve_unix(
    listener: UnixListener,
    volume: Arc<Volume>,
    admission: Arc<Admission>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new("nbd");
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((sock, _)) => {
                    backoff.succeeded();
                    let Some(ticket) = admission.admit(&volume.counters) else {
                        debug!("nbd connection refused: at --nbd-max-connections");
                        continue;
                    };
                    tokio::spawn(run_connection(sock, Arc::clone(&volume), ticket));
                }
                Err(e) => tokio::select! {
                    _ = backoff.failed(&e, &volume.counters.nbd_accept_errors) => {}
                    _ = shutdown.changed() => return,
                },
            },
            _ = shutdown.changed() => return,
        }
    }
}

struct ConnGuard(Arc<Volume>);
impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0
            .counters
            .nbd_connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

async fn run_connection<S: AsyncRead + AsyncWrite + Send + 'static>(
    sock: S,
    volume: Arc<Volume>,
    mut ticket: Ticket,
) {
    volume
        .counters
        .nbd_connections
        .fetch_add(1, Ordering::Relaxed);
    let _guard = ConnGuard(Arc::clone(&volume));
    let (r, w) = tokio::io::split(sock);
    let mut r = BufReader::with_capacity(256 * 1024, r);
    let mut w = BufWriter::with_capacity(256 * 1024, w);
    let policy = ticket.admission.policy();
    // Limit: a client gets `handshake_timeout` to reach transmission, and loses its place sooner
    // if the table is full and it is the oldest haggler (tests/nbd_limits.rs `idle_handshakers_*`).
    let outcome = tokio::select! {
        r = tokio::time::timeout(policy.handshake_timeout, handshake(&mut r, &mut w, &volume, policy.pinned_only)) => r,
        _ = &mut ticket.evicted => {
            debug!("nbd connection in handshake closed to make room for a new one");
            return;
        }
    };
    match outcome {
        Err(_) => {
            volume
                .counters
                .nbd_handshake_timeouts
                .fetch_add(1, Ordering::Relaxed);
            debug!(timeout = ?policy.handshake_timeout, "nbd handshake timed out; connection closed");
        }
        Ok(Ok(target)) => {
            if !ticket.established() {
                return;
            }
            if let Err(e) = transmission(r, w, volume, target).await {
                debug!(error = %e, "nbd connection closed");
            }
        }
        Ok(Err(ConnError::Aborted)) => {}
        Ok(Err(e)) => info!(error = %e, "nbd handshake failed; connection closed"),
    }
}

/// With pinned exports only, whether `name` is one of the bare names (`""`, `<volume>`) that would
/// open at any epoch.
// Safety: in pods an attachment can only be made to the epoch its stager saw, so it can never
// follow the volume into a later epoch (tests/nbd_limits.rs `pinned_only_*`).
fn unpinned(pinned_only: bool, name: &str, volume: &Volume) -> bool {
    pinned_only && (name.is_empty() || name == volume.name())
}

/// What a connection serves once in transmission.
#[derive(Clone)]
enum Target {
    /// The volume itself (read-only: a secondary's consistent replica), at the size the session
    /// negotiated.
    Volume { read_only: bool, size: u64 },
    /// A snapshot's export (`<volume>@snapshot/<id>`): read-only, whatever the role.
    Snapshot(Arc<Snapshot>),
}

impl Target {
    fn read_only(&self) -> bool {
        match self {
            Target::Volume { read_only, .. } => *read_only,
            Target::Snapshot(_) => true,
        }
    }

    fn size(&self) -> u64 {
        match self {
            Target::Volume { size, .. } => *size,
            Target::Snapshot(s) => s.meta.size,
        }
    }
}

/// `Some(id)` when `name` is a snapshot export of this volume (`contract::snapshot_export`).
fn snapshot_id<'a>(volume: &Volume, name: &'a str) -> Option<&'a str> {
    name.strip_prefix(volume.name())?.strip_prefix("@snapshot/")
}

/// The snapshot export `name` asks for, or why not. Snapshot exports open on every listener and
/// in every role, also with pinned exports only: they are read-only and never follow an epoch.
fn snapshot_target(volume: &Volume, id: &str) -> Result<Target, String> {
    match volume.snapshot(id) {
        Some(s) => Ok(Target::Snapshot(s)),
        None => Err(format!(
            "volume {:?} has no snapshot {id:?} on this engine",
            volume.name()
        )),
    }
}

fn tflags(read_only: bool) -> u16 {
    let mut f = p::TFLAG_HAS_FLAGS
        | p::TFLAG_SEND_FLUSH
        | p::TFLAG_SEND_FUA
        | p::TFLAG_SEND_TRIM
        | p::TFLAG_SEND_WRITE_ZEROES
        | p::TFLAG_CAN_MULTI_CONN;
    if read_only {
        f |= p::TFLAG_READ_ONLY;
    }
    f
}

/// Runs the option haggling; returns what the connection serves once transmission starts (for
/// the volume, the size the client was told: the session's size, even after the volume grows).
async fn handshake<R, W>(
    r: &mut R,
    w: &mut W,
    volume: &Volume,
    pinned_only: bool,
) -> Result<Target, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    w.write_all(&p::NBDMAGIC.to_be_bytes()).await?;
    w.write_all(&p::IHAVEOPT.to_be_bytes()).await?;
    w.write_all(&(p::FLAG_FIXED_NEWSTYLE | p::FLAG_NO_ZEROES).to_be_bytes())
        .await?;
    w.flush().await?;
    let cflags = r.read_u32().await?;
    if cflags & !(p::CLIENT_FIXED_NEWSTYLE | p::CLIENT_NO_ZEROES) != 0 {
        return Err(ConnError::ClientFlags(cflags));
    }
    let no_zeroes = cflags & p::CLIENT_NO_ZEROES != 0;
    loop {
        let mut hdr = [0u8; 16];
        r.read_exact(&mut hdr).await?;
        let (opt, len) = p::parse_option_header(&hdr)?;
        if len > p::MAX_OPTION_LEN {
            // Never buffer it: skip the bytes so the client stays in step and can go on.
            if opt == p::OPT_EXPORT_NAME {
                // That option cannot be answered with an error: the spec says close.
                return Err(p::ProtoError::OptionTooLong(len).into());
            }
            skip(r, u64::from(len)).await?;
            let msg = format!(
                "option {opt} carries {len} bytes; this server accepts at most {}",
                p::MAX_OPTION_LEN
            );
            w.write_all(&p::option_reply(opt, p::REP_ERR_TOO_BIG, msg.as_bytes()))
                .await?;
            w.flush().await?;
            continue;
        }
        let mut payload = vec![0u8; len as usize];
        r.read_exact(&mut payload).await?;
        match opt {
            p::OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&payload).into_owned();
                if let Some(id) = snapshot_id(volume, &name) {
                    let Ok(t) = snapshot_target(volume, id) else {
                        return Err(ConnError::UnknownExport(name));
                    };
                    w.write_all(&t.size().to_be_bytes()).await?;
                    w.write_all(&tflags(true).to_be_bytes()).await?;
                    if !no_zeroes {
                        w.write_all(&[0u8; 124]).await?;
                    }
                    w.flush().await?;
                    return Ok(t);
                }
                // No way to send an error here: the protocol says close the connection.
                if volume.export_access(&name) != ExportName::Ok
                    || unpinned(pinned_only, &name, volume)
                {
                    return Err(ConnError::UnknownExport(name));
                }
                let Ok(read_only) = volume.open_session().await else {
                    return Err(ConnError::UnknownExport(name));
                };
                let size = volume.size();
                w.write_all(&size.to_be_bytes()).await?;
                w.write_all(&tflags(read_only).to_be_bytes()).await?;
                if !no_zeroes {
                    w.write_all(&[0u8; 124]).await?;
                }
                w.flush().await?;
                return Ok(Target::Volume { read_only, size });
            }
            p::OPT_GO | p::OPT_INFO => {
                let go = match p::parse_go(&payload) {
                    Ok(g) => g,
                    Err(e) => {
                        let msg = e.to_string();
                        w.write_all(&p::option_reply(opt, p::REP_ERR_INVALID, msg.as_bytes()))
                            .await?;
                        w.flush().await?;
                        continue;
                    }
                };
                if let Some(id) = snapshot_id(volume, &go.name) {
                    let t = match snapshot_target(volume, id) {
                        Ok(t) => t,
                        Err(msg) => {
                            let msg = p::bounded_message(&msg);
                            w.write_all(&p::option_reply(opt, p::REP_ERR_UNKNOWN, msg.as_bytes()))
                                .await?;
                            w.flush().await?;
                            continue;
                        }
                    };
                    let info = p::info_export(t.size(), tflags(true));
                    w.write_all(&p::option_reply(opt, p::REP_INFO, &info))
                        .await?;
                    for i in &go.infos {
                        let extra = match *i {
                            p::INFO_BLOCK_SIZE => {
                                p::info_block_size(512, BLOCK_SIZE, p::MAX_PAYLOAD)
                            }
                            p::INFO_NAME => p::info_name(&go.name),
                            p::INFO_DESCRIPTION => {
                                p::info_description("Tandem volume snapshot (read-only)")
                            }
                            _ => continue,
                        };
                        w.write_all(&p::option_reply(opt, p::REP_INFO, &extra))
                            .await?;
                    }
                    w.write_all(&p::option_reply(opt, p::REP_ACK, &[])).await?;
                    w.flush().await?;
                    if opt == p::OPT_GO {
                        return Ok(t);
                    }
                    continue;
                }
                let refusal = match volume.export_access(&go.name) {
                    ExportName::Ok if unpinned(pinned_only, &go.name, volume) => Some((
                        p::REP_ERR_POLICY,
                        format!(
                            "export {:?} is not pinned to an epoch and this engine serves only \
                             pinned exports (--nbd-pinned-exports-only): ask for \
                             \"{}@<epoch>\" with the epoch the engine's status reports",
                            go.name,
                            volume.name()
                        ),
                    )),
                    ExportName::Ok => None,
                    ExportName::Unknown => Some((
                        p::REP_ERR_UNKNOWN,
                        format!(
                            "no export named {:?}; this engine serves {:?}",
                            go.name,
                            volume.name()
                        ),
                    )),
                    ExportName::StaleEpoch(e) => Some((
                        p::REP_ERR_POLICY,
                        format!(
                            "export {:?} is pinned to epoch {e}; volume {:?} is at epoch {} now \
                             (a takeover happened: stage the volume again)",
                            go.name,
                            volume.name(),
                            volume.epoch()
                        ),
                    )),
                };
                if let Some((code, msg)) = refusal {
                    // The message quotes the client's name, which may be up to 64 KiB.
                    let msg = p::bounded_message(&msg);
                    w.write_all(&p::option_reply(opt, code, msg.as_bytes()))
                        .await?;
                    w.flush().await?;
                    continue;
                }
                let access = if opt == p::OPT_GO {
                    volume.open_session().await
                } else {
                    volume.host_access()
                };
                let read_only = match access {
                    Ok(ro) => ro,
                    Err(e) => {
                        let msg = format!(
                        "volume {:?}: {e} (epoch {}); connect to the primary or take over first",
                        volume.name(),
                        volume.epoch()
                    );
                        w.write_all(&p::option_reply(opt, p::REP_ERR_POLICY, msg.as_bytes()))
                            .await?;
                        w.flush().await?;
                        continue;
                    }
                };
                let size = volume.size();
                let info = p::info_export(size, tflags(read_only));
                w.write_all(&p::option_reply(opt, p::REP_INFO, &info))
                    .await?;
                for i in &go.infos {
                    let extra = match *i {
                        p::INFO_BLOCK_SIZE => p::info_block_size(512, BLOCK_SIZE, p::MAX_PAYLOAD),
                        p::INFO_NAME => p::info_name(volume.name()),
                        p::INFO_DESCRIPTION => p::info_description("Tandem mirrored volume"),
                        _ => continue,
                    };
                    w.write_all(&p::option_reply(opt, p::REP_INFO, &extra))
                        .await?;
                }
                w.write_all(&p::option_reply(opt, p::REP_ACK, &[])).await?;
                w.flush().await?;
                if opt == p::OPT_GO {
                    return Ok(Target::Volume { read_only, size });
                }
            }
            p::OPT_LIST => {
                if len != 0 {
                    w.write_all(&p::option_reply(
                        opt,
                        p::REP_ERR_INVALID,
                        b"OPT_LIST takes no data",
                    ))
                    .await?;
                } else {
                    w.write_all(&p::option_reply(
                        opt,
                        p::REP_SERVER,
                        &p::rep_server(volume.name()),
                    ))
                    .await?;
                    w.write_all(&p::option_reply(opt, p::REP_ACK, &[])).await?;
                }
                w.flush().await?;
            }
            p::OPT_ABORT => {
                w.write_all(&p::option_reply(opt, p::REP_ACK, &[])).await?;
                w.flush().await?;
                return Err(ConnError::Aborted);
            }
            _ => {
                w.write_all(&p::option_reply(opt, p::REP_ERR_UNSUP, &[]))
                    .await?;
                w.flush().await?;
            }
        }
    }
}

/// Reads and drops `n` bytes (a refused payload) with a small fixed buffer.
async fn skip<R: AsyncRead + Unpin>(r: &mut R, n: u64) -> io::Result<()> {
    let mut take = r.take(n);
    let copied = tokio::io::copy(&mut take, &mut tokio::io::sink()).await?;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

type SharedWriter<W> = Arc<tokio::sync::Mutex<BufWriter<W>>>;

async fn send_reply<W: AsyncWrite + Unpin>(
    w: &SharedWriter<W>,
    header: [u8; 16],
    data: Option<&[u8]>,
    flush: bool,
) -> io::Result<()> {
    let mut w = w.lock().await;
    w.write_all(&header).await?;
    if let Some(d) = data {
        w.write_all(d).await?;
    }
    if flush {
        w.flush().await?;
    }
    Ok(())
}

async fn transmission<R, W>(
    mut r: BufReader<R>,
    w: BufWriter<W>,
    volume: Arc<Volume>,
    target: Target,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let w = Arc::new(tokio::sync::Mutex::new(w));
    let budget = Arc::new(Semaphore::new(CONN_BUDGET / PERMIT_BYTES));
    let result = read_requests(&mut r, &w, &volume, &budget, &target).await;
    // Let spawned requests finish (they hold budget permits) before closing.
    let _ = budget
        .acquire_many((CONN_BUDGET / PERMIT_BYTES) as u32)
        .await;
    let mut w = w.lock().await;
    let _ = w.flush().await;
    let _ = w.shutdown().await;
    result
}

/// Reads requests; quick ones (reads, plain writes) run inline so a queue depth of one costs one
/// wakeup, slow ones (flush, FUA, trim, zeroing, waits for the peer) run as their own tasks.
/// Replies are flushed once the reader has no more buffered requests, batching them under load.
async fn read_requests<R, W>(
    r: &mut BufReader<R>,
    w: &SharedWriter<W>,
    volume: &Arc<Volume>,
    budget: &Arc<Semaphore>,
    target: &Target,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut hdr = [0u8; Request::LEN];
    // A fence (takeover by the peer) closes the session: the old host must not go on. A snapshot
    // export is read-only and outside the epochs: it stays open.
    let mut fenced = volume.fenced.subscribe();
    let snapshot = match target {
        Target::Snapshot(s) => Some(Arc::clone(s)),
        Target::Volume { .. } => None,
    };
    let (size, read_only) = (target.size(), target.read_only());
    loop {
        if r.buffer().is_empty() {
            w.lock().await.flush().await?;
        }
        tokio::select! {
            res = r.read_exact(&mut hdr) => { res?; }
            _ = fenced.changed(), if snapshot.is_none() => return Ok(()),
        }
        let req = Request::parse(&hdr)?;
        if req.kind == p::CMD_DISC {
            return Ok(());
        }
        // The size this session was told: after a grow, only a new session reaches the new
        // blocks (its client learned the new size); this one is refused past its end as before.
        if let Err(errno) = req.validate(size, read_only) {
            if snapshot.is_some() && errno == p::EPERM {
                debug!(
                    kind = req.kind,
                    "write refused: a snapshot export is read-only (restore it into a new volume)"
                );
            }
            if req.has_payload() {
                // Stay in step with the stream without buffering a payload we refuse.
                skip(r, u64::from(req.length)).await?;
            }
            send_reply(w, p::simple_reply(errno, req.handle), None, false).await?;
            continue;
        }
        if req.length == 0 && req.kind != p::CMD_FLUSH {
            // Nothing to read, write or zero (the spec leaves length 0 open; answer it plainly).
            send_reply(w, p::simple_reply(0, req.handle), None, false).await?;
            continue;
        }
        let permit = Arc::clone(budget)
            .acquire_many_owned(permits(&req))
            .await
            .map_err(|_| io::Error::other("request budget closed"))?;
        let payload = if req.has_payload() {
            let mut d = vec![0u8; req.length as usize];
            r.read_exact(&mut d).await?;
            Some(d)
        } else {
            None
        };
        let fua = req.flags & p::CMD_FLAG_FUA != 0;
        // Large transfers run in parallel instead: copying them costs more than a task wakeup.
        if let Some(s) = &snapshot {
            let (err, data) = execute_snapshot(volume, s, &req);
            send_reply(w, p::simple_reply(err, req.handle), data.as_deref(), false).await?;
            drop(permit);
            continue;
        }
        let inline = req.length <= INLINE_MAX
            && match req.kind {
                p::CMD_READ => volume.read_is_quick(req.offset, req.length),
                p::CMD_WRITE => !fua && volume.write_is_quick(),
                _ => false,
            };
        if inline {
            let (err, data) = execute(volume, &req, payload).await;
            send_reply(w, p::simple_reply(err, req.handle), data.as_deref(), false).await?;
            drop(permit);
            continue;
        }
        let v = Arc::clone(volume);
        let w = Arc::clone(w);
        tokio::spawn(async move {
            let (err, data) = execute(&v, &req, payload).await;
            let _ = send_reply(&w, p::simple_reply(err, req.handle), data.as_deref(), true).await;
            drop(permit);
        });
    }
}

/// TRIM / WRITE_ZEROES as consecutive pieces of at most `ZERO_PIECE` bytes. FUA rides on the
/// last piece: its flush makes every earlier piece durable too.
async fn zero_in_pieces(
    v: &Volume,
    req: &Request,
    fua: bool,
) -> Result<(), crate::volume::HostError> {
    let end = req.offset + u64::from(req.length);
    let mut at = req.offset;
    while at < end {
        let n = (end - at).min(ZERO_PIECE);
        let last = at + n == end;
        if req.kind == p::CMD_TRIM {
            v.trim(at, n, fua && last).await?;
        } else {
            let no_hole = req.flags & p::CMD_FLAG_NO_HOLE != 0;
            v.write_zeroes(at, n, no_hole, fua && last).await?;
        }
        at += n;
    }
    Ok(())
}

/// A validated request on a snapshot export: reads, and flushes (nothing to make durable).
fn execute_snapshot(v: &Volume, s: &Snapshot, req: &Request) -> (u32, Option<Vec<u8>>) {
    match req.kind {
        p::CMD_READ => {
            let mut buf = vec![0u8; req.length as usize];
            match v.read_snapshot(s, &mut buf, req.offset) {
                Ok(()) => (0, Some(buf)),
                Err(e) => {
                    warn!(error = %e, id = %s.meta.id, offset = req.offset, "snapshot read failed");
                    (p::EIO, None)
                }
            }
        }
        p::CMD_FLUSH => (0, None),
        _ => (p::EPERM, None),
    }
}

/// Runs one validated request, timed for the metrics; returns (errno, read data).
async fn execute(v: &Volume, req: &Request, payload: Option<Vec<u8>>) -> (u32, Option<Vec<u8>>) {
    let started = std::time::Instant::now();
    let out = run(v, req, payload).await;
    let op = match req.kind {
        p::CMD_READ => "read",
        p::CMD_WRITE => "write",
        p::CMD_FLUSH => "flush",
        p::CMD_TRIM => "trim",
        p::CMD_WRITE_ZEROES => "write_zeroes",
        _ => "other",
    };
    v.counters
        .instruments
        .host_request(op, started.elapsed(), out.0 != 0);
    out
}

async fn run(v: &Volume, req: &Request, payload: Option<Vec<u8>>) -> (u32, Option<Vec<u8>>) {
    let fua = req.flags & p::CMD_FLAG_FUA != 0;
    let res = match req.kind {
        p::CMD_READ => match v.read(req.offset, req.length).await {
            Ok(d) => return (0, Some(d)),
            Err(e) => Err(e),
        },
        p::CMD_WRITE => v.write(req.offset, payload.unwrap_or_default(), fua).await,
        p::CMD_FLUSH => v.flush().await,
        p::CMD_TRIM | p::CMD_WRITE_ZEROES => zero_in_pieces(v, req, fua).await,
        _ => return (p::EINVAL, None),
    };
    match res {
        Ok(()) => (0, None),
        Err(e) => {
            match e {
                // A refused role is the client's business; anything else is worth a line.
                crate::volume::HostError::NotServing(_) => {
                    debug!(error = %e, kind = req.kind, "nbd request refused")
                }
                _ => {
                    warn!(error = %e, kind = req.kind, offset = req.offset, len = req.length, "nbd request failed")
                }
            }
            (e.errno(), None)
        }
    }
}
