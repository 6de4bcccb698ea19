//! The NBD server: the handshake as a runtime task, then a pipelined transmission phase on a
//! thread of the connection's own that sleeps in recv and runs quick requests itself; slow ones
//! run as runtime tasks, and replies leave as they finish (out of order, matched by handle).

use std::{
    collections::BTreeMap,
    io::{self, Read, Write},
    os::fd::AsFd,
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
/// Requests up to this size run inline on the connection's thread.
const INLINE_MAX: u32 = 128 * 1024;
/// Reply data from this size on leaves by its own iovec instead of being copied into the queue.
const DIRECT_MIN: usize = 16 * 1024;
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

async fn run_connection<S: Conn>(sock: S, volume: Arc<Volume>, mut ticket: Ticket) {
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
            // The handshake's last reply is still in `w`: the place is marked established before
            // the client can hear it, so a newcomer the client lets in next cannot evict this
            // connection as a haggler (tests/nbd_limits.rs `over_the_cap_with_every_connection_
            // established_a_newcomer_is_closed_at_once`, which failed once on that race).
            if !ticket.established() {
                return;
            }
            if let Err(e) = w.flush().await {
                debug!(error = %e, "nbd connection closed before its transmission began");
                return;
            }
            // Nothing waits in `w` now; the requests `r` has read ahead go over to the
            // connection's thread.
            let buffered = r.buffer().to_vec();
            let sock = r.into_inner().unsplit(w.into_inner());
            match sock.into_blocking() {
                Ok(sock) => transmission(sock, buffered, volume, target).await,
                Err(e) => warn!(error = %e, "nbd connection closed: its socket cannot block"),
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
/// The final reply is left in `w`, unflushed: the caller marks the place established first.
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
                    if opt == p::OPT_GO {
                        return Ok(t);
                    }
                    w.flush().await?;
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
                if opt == p::OPT_GO {
                    return Ok(Target::Volume { read_only, size });
                }
                w.flush().await?;
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

/// A connection's socket once it is in transmission: in blocking mode, served by its own thread.
enum StdSock {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl StdSock {
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            StdSock::Tcp(s) => s.as_fd(),
            StdSock::Unix(s) => s.as_fd(),
        }
    }

    fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        match self {
            StdSock::Tcp(s) => s.shutdown(how),
            StdSock::Unix(s) => s.shutdown(how),
        }
    }
}

impl Read for &StdSock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            StdSock::Tcp(s) => (&*s).read(buf),
            StdSock::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for &StdSock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            StdSock::Tcp(s) => (&*s).write(buf),
            StdSock::Unix(s) => (&*s).write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The sockets the listeners accept; after the handshake each becomes blocking, for its thread.
trait Conn: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn into_blocking(self) -> io::Result<StdSock>;
}

impl Conn for tokio::net::TcpStream {
    fn into_blocking(self) -> io::Result<StdSock> {
        let s = self.into_std()?;
        s.set_nonblocking(false)?;
        Ok(StdSock::Tcp(s))
    }
}

impl Conn for tokio::net::UnixStream {
    fn into_blocking(self) -> io::Result<StdSock> {
        let s = self.into_std()?;
        s.set_nonblocking(false)?;
        Ok(StdSock::Unix(s))
    }
}

/// Replies waiting to leave, whole frames in order. The connection's thread and its slow
/// requests share it; the thread may block on the socket, a runtime worker never does.
struct Out {
    sock: Arc<StdSock>,
    buf: Vec<u8>,
}

/// Replies buffered past this many bytes leave before the thread reads on (a client that does not
/// read its replies stops being read).
const OUT_MAX: usize = 256 * 1024;

impl Out {
    fn push(&mut self, header: [u8; 16], data: Option<&[u8]>) {
        self.buf.extend_from_slice(&header);
        if let Some(d) = data {
            self.buf.extend_from_slice(d);
        }
    }

    /// Sends everything, blocking while the client's receive queue is full.
    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            (&*self.sock).write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Sends what the socket takes without blocking; true when nothing is left.
    fn flush_now(&mut self) -> io::Result<bool> {
        let sent = send_parts(self.sock.fd(), &[&self.buf], false)?;
        self.buf.drain(..sent);
        Ok(self.buf.is_empty())
    }

    /// Sends the queue and then a reply whose large `data` is not copied: all of it when `wait`,
    /// else what the socket takes at once, keeping only the rest (copied) in the queue. True when
    /// nothing is left.
    fn send_direct(&mut self, header: [u8; 16], data: &[u8], wait: bool) -> io::Result<bool> {
        let parts = [&self.buf[..], &header[..], data];
        let sent = send_parts(self.sock.fd(), &parts, wait)?;
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if sent == total {
            self.buf.clear();
            return Ok(true);
        }
        let mut rest = Vec::with_capacity(total - sent);
        let mut skip = sent;
        for part in parts {
            let from = skip.min(part.len());
            skip -= from;
            rest.extend_from_slice(&part[from..]);
        }
        self.buf = rest;
        Ok(false)
    }
}

/// Sends `parts` in order with as few system calls as the socket allows; all of them when
/// `wait`, else what it takes without blocking. Returns the bytes sent.
fn send_parts(fd: std::os::fd::BorrowedFd<'_>, parts: &[&[u8]], wait: bool) -> io::Result<usize> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendFlags};
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let flags = if wait {
        SendFlags::NOSIGNAL
    } else {
        SendFlags::NOSIGNAL | SendFlags::DONTWAIT
    };
    let mut sent = 0;
    while sent < total {
        let mut iov = [io::IoSlice::new(&[]); 3];
        let mut n = 0;
        let mut skip = sent;
        for part in parts {
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            if n == iov.len() {
                break;
            }
            iov[n] = io::IoSlice::new(&part[skip..]);
            skip = 0;
            n += 1;
        }
        match sendmsg(fd, &iov[..n], &mut SendAncillaryBuffer::default(), flags) {
            Ok(k) => sent += k,
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::AGAIN) if !wait => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(sent)
}

type SharedOut = Arc<Mutex<Out>>;

fn out(w: &SharedOut) -> std::sync::MutexGuard<'_, Out> {
    // Every statement leaves whole frames in `buf` (a send error ends the connection anyway).
    w.lock().unwrap_or_else(|e| e.into_inner())
}

/// Queues a reply from the connection's thread; sends when `flush` or when the queue is long.
fn send_reply(w: &SharedOut, header: [u8; 16], data: Option<&[u8]>, flush: bool) -> io::Result<()> {
    let mut w = out(w);
    if let Some(d) = data.filter(|d| d.len() >= DIRECT_MIN) {
        w.send_direct(header, d, true)?;
        return Ok(());
    }
    w.push(header, data);
    if flush || w.buf.len() >= OUT_MAX {
        w.flush()?;
    }
    Ok(())
}

/// A slow request's reply, from a runtime worker: sent at once (the lease argument in
/// `write_is_quick`: no reply waits behind a slow one), on a blocking thread only if the client
/// is not reading. The budget permit goes once the reply has left, bounding what waits here.
async fn send_slow_reply(
    w: SharedOut,
    header: [u8; 16],
    data: Option<Vec<u8>>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    // The connection's thread may hold the lock while it blocks on a client that does not read:
    // a runtime worker never waits for it, the whole engine runs on those workers (tests/
    // nbd_limits.rs `a_client_that_never_reads_its_replies_stalls_only_itself`).
    let queued = {
        let guard = match w.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        match guard {
            Some(mut o) => {
                let sent = match data.as_deref().filter(|d| d.len() >= DIRECT_MIN) {
                    Some(d) => o.send_direct(header, d, false),
                    None => {
                        o.push(header, data.as_deref());
                        o.flush_now()
                    }
                };
                match sent {
                    // Sent, or the connection is broken (its thread sees that too).
                    Ok(true) | Err(_) => return,
                    Ok(false) => true,
                }
            }
            None => false,
        }
    };
    let _ = tokio::task::spawn_blocking(move || {
        let mut o = out(&w);
        if !queued {
            o.push(header, data.as_deref());
        }
        let _ = o.flush();
        drop(permit);
    })
    .await;
}

/// Shuts the socket down when dropped: the connection's thread, blocked in recv, sees the end.
struct ShutOnDrop(Arc<StdSock>, std::net::Shutdown);

impl Drop for ShutOnDrop {
    fn drop(&mut self) {
        let _ = self.0.shutdown(self.1);
    }
}

/// The transmission phase on a thread of its own that sleeps in recv: a QD1 request costs recv,
/// the request's own system calls and send, with no epoll and no hand-off between threads
/// (docs/benchmarks.md, issue 17: less CPU per request than nbdkit's reader-and-worker threads).
async fn transmission(sock: StdSock, buffered: Vec<u8>, volume: Arc<Volume>, target: Target) {
    let sock = Arc::new(sock);
    // Runtime shutdown drops this task: the thread must not go on serving without it.
    let _stop = ShutOnDrop(Arc::clone(&sock), std::net::Shutdown::Both);
    let (done_tx, mut done) = oneshot::channel();
    let rt = tokio::runtime::Handle::current();
    let is_snapshot = matches!(target, Target::Snapshot(_));
    let mut fenced = volume.fenced.subscribe();
    let thread_fenced = fenced.clone();
    let thread_sock = Arc::clone(&sock);
    let spawned = std::thread::Builder::new()
        .name("nbd-conn".into())
        .spawn(move || {
            let out = serve_requests(thread_sock, buffered, &volume, &target, &rt, thread_fenced);
            let _ = done_tx.send(out);
        });
    if let Err(e) = spawned {
        warn!(error = %e, "nbd connection closed: no thread to serve it");
        return;
    }
    let out = tokio::select! {
        r = &mut done => r,
        // A fence (takeover by the peer) closes the session: the old host must not go on. A
        // snapshot export is read-only and outside the epochs: it stays open. Shutting the read
        // side ends the thread's recv; replies already computed still leave (tests/takeover.rs
        // `at20_fencing_cuts_the_old_host_and_refuses_its_writes`).
        _ = fenced.changed(), if !is_snapshot => {
            let _ = sock.shutdown(std::net::Shutdown::Read);
            done.await
        }
    };
    match out {
        Ok(Err(e)) => debug!(error = %e, "nbd connection closed"),
        Ok(Ok(())) => {}
        Err(_) => warn!("nbd connection thread ended without a word"),
    }
}

/// Bytes of requests one connection reads ahead, at most.
const READ_AHEAD: usize = 256 * 1024;
/// What a connection's read-ahead buffer starts with. It doubles, up to `READ_AHEAD`, each time one
/// `recv` fills it (a client that pipelines), so an idle or QD1 connection holds 16 KiB (issue 17:
/// <= 64 KiB per idle connection; a 256 KiB buffer from a thread's malloc arena came back partly
/// touched). Test: `tests::the_read_ahead_buffer_grows_only_when_a_recv_fills_it`.
const READ_AHEAD_START: usize = 16 * 1024;

/// A buffered reader of the connection's socket. Not `std::io::BufReader`: that one zeroes its
/// whole buffer on the first read; this one starts small and touches only what the client sends.
struct Reader<'a> {
    sock: &'a StdSock,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    /// `ahead`: what the handshake's reader had read past the handshake (at most its capacity).
    fn new(sock: &'a StdSock, ahead: &[u8]) -> Self {
        let mut buf = vec![0u8; READ_AHEAD_START.max(ahead.len())];
        buf[..ahead.len()].copy_from_slice(ahead);
        Reader {
            sock,
            buf,
            pos: 0,
            end: ahead.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.pos == self.end
    }

    /// A request's payload of `len` bytes, received into fresh memory that is never zeroed first
    /// (zeroing a 1 MiB payload cost a quarter of a large write's CPU).
    fn read_payload(&mut self, len: usize) -> io::Result<Vec<u8>> {
        // `with_capacity` allocates exactly `len`: a recv into the spare capacity cannot read
        // past the payload into the next request.
        let mut d = Vec::with_capacity(len);
        let have = (self.end - self.pos).min(len);
        d.extend_from_slice(&self.buf[self.pos..self.pos + have]);
        self.pos += have;
        while d.len() < len {
            let spare = rustix::buffer::spare_capacity(&mut d);
            match rustix::net::recv(self.sock.fd(), spare, rustix::net::RecvFlags::empty()) {
                Ok((0, _)) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(d)
    }
}

impl Read for Reader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.is_empty() {
            if out.len() >= self.buf.len() {
                // A large payload goes straight into its own buffer.
                return self.sock.read(out);
            }
            self.pos = 0;
            self.end = self.sock.read(&mut self.buf)?;
            if self.end == self.buf.len() && self.buf.len() < READ_AHEAD {
                // More was waiting: read further ahead next time (what is buffered stays).
                self.buf.resize((self.buf.len() * 2).min(READ_AHEAD), 0);
            }
        }
        let n = out.len().min(self.end - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Reads and drops `n` bytes (a refused payload) with a small fixed buffer.
fn skip_blocking<R: Read>(r: &mut R, n: u64) -> io::Result<()> {
    let copied = io::copy(&mut r.take(n), &mut io::sink())?;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// The connection's thread: reads requests; quick ones (reads, plain writes) run right here, so
/// a queue depth of one costs one wakeup, on the thread the client's write woke; slow ones (flush,
/// FUA, trim, zeroing, waits for the peer) run as runtime tasks. Replies are flushed once no
/// further request is buffered, batching them under load.
fn serve_requests(
    sock: Arc<StdSock>,
    buffered: Vec<u8>,
    volume: &Arc<Volume>,
    target: &Target,
    rt: &tokio::runtime::Handle,
    fenced: tokio::sync::watch::Receiver<u64>,
) -> Result<(), ConnError> {
    let w: SharedOut = Arc::new(Mutex::new(Out {
        sock: Arc::clone(&sock),
        buf: Vec::new(),
    }));
    let budget = Arc::new(Semaphore::new(CONN_BUDGET / PERMIT_BYTES));
    // The handshake's reader may have read requests already: they come first.
    let mut r = Reader::new(&sock, &buffered);
    drop(buffered);
    let result = read_requests(&mut r, &w, volume, &budget, target, rt, &fenced);
    // Let slow requests finish (they hold budget permits) before closing.
    let _ = rt.block_on(budget.acquire_many((CONN_BUDGET / PERMIT_BYTES) as u32));
    let _ = out(&w).flush();
    let _ = sock.shutdown(std::net::Shutdown::Write);
    result
}

fn read_requests(
    r: &mut Reader<'_>,
    w: &SharedOut,
    volume: &Arc<Volume>,
    budget: &Arc<Semaphore>,
    target: &Target,
    rt: &tokio::runtime::Handle,
    fenced: &tokio::sync::watch::Receiver<u64>,
) -> Result<(), ConnError> {
    let mut hdr = [0u8; Request::LEN];
    let snapshot = match target {
        Target::Snapshot(s) => Some(Arc::clone(s)),
        Target::Volume { .. } => None,
    };
    let (size, read_only) = (target.size(), target.read_only());
    loop {
        if r.is_empty() {
            out(w).flush()?;
        }
        // A fence ends the session before the next request, also one already read ahead (the
        // shut read side only stops the socket); a snapshot export stays open.
        if snapshot.is_none() && fenced.has_changed().unwrap_or(true) {
            return Ok(());
        }
        // EOF here is the client leaving, or a fence shutting the read side.
        match r.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
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
                skip_blocking(r, u64::from(req.length))?;
            }
            send_reply(w, p::simple_reply(errno, req.handle), None, false)?;
            continue;
        }
        if req.length == 0 && req.kind != p::CMD_FLUSH {
            // Nothing to read, write or zero (the spec leaves length 0 open; answer it plainly).
            send_reply(w, p::simple_reply(0, req.handle), None, false)?;
            continue;
        }
        let n = permits(&req);
        let permit = match Arc::clone(budget).try_acquire_many_owned(n) {
            Ok(p) => p,
            Err(_) => {
                // Over budget: slow requests hold it; their replies must not wait for ours.
                out(w).flush()?;
                rt.block_on(Arc::clone(budget).acquire_many_owned(n))
                    .map_err(|_| io::Error::other("request budget closed"))?
            }
        };
        let payload = if req.has_payload() {
            Some(r.read_payload(req.length as usize)?)
        } else {
            None
        };
        let fua = req.flags & p::CMD_FLAG_FUA != 0;
        if let Some(s) = &snapshot {
            let (err, data) = execute_snapshot(volume, s, &req);
            send_reply(w, p::simple_reply(err, req.handle), data.as_deref(), false)?;
            drop(permit);
            continue;
        }
        // A change that waits for the write-intent log's fdatasync (a cold extent) runs on a
        // blocking thread: neither the reader nor a runtime worker sits in the sync, and the
        // connection's queued changes to cold extents share one (`Tracker::intent_durable`).
        // Past `COLD_DISPATCH_MAX` of them the change goes where it would without the slot.
        let cold_slot = (matches!(req.kind, p::CMD_WRITE | p::CMD_WRITE_ZEROES | p::CMD_TRIM)
            && volume.write_waits_for_intent(req.offset, u64::from(req.length)))
        .then(|| ColdSlot::take(volume))
        .flatten();
        // Large transfers run in parallel instead: copying them costs more than a task wakeup.
        let inline = req.length <= INLINE_MAX
            && match req.kind {
                p::CMD_READ => volume.read_is_quick(req.offset, req.length),
                p::CMD_WRITE => !fua && cold_slot.is_none() && volume.write_is_quick(),
                _ => false,
            };
        if inline {
            let (err, data) = rt.block_on(execute(volume, &req, payload));
            send_reply(w, p::simple_reply(err, req.handle), data.as_deref(), false)?;
            drop(permit);
            continue;
        }
        let v = Arc::clone(volume);
        let w = Arc::clone(w);
        let job = async move {
            let (err, data) = execute(&v, &req, payload).await;
            send_slow_reply(w, p::simple_reply(err, req.handle), data, permit).await;
        };
        if let Some(slot) = cold_slot {
            let h = rt.clone();
            rt.spawn_blocking(move || {
                let _slot = slot;
                h.block_on(job)
            });
        } else {
            rt.spawn(job);
        }
    }
}

/// Changes to cold extents running on blocking threads, per volume, at most. Each holds a thread of
/// tokio's blocking pool while it waits for an intent sync (which can take seconds behind other
/// writeback), and `block_in_place` needs a thread from that same pool to keep a runtime worker's
/// tasks running (`crate::blocking`): a client with thousands of cold writes queued must not
/// take them all. Past the cap a write runs on the connection's thread, one at a time.
pub const COLD_DISPATCH_MAX: u64 = 32;

/// One of the `COLD_DISPATCH_MAX` places; given back when dropped.
struct ColdSlot(Arc<Volume>);

impl ColdSlot {
    fn take(v: &Arc<Volume>) -> Option<Self> {
        v.counters
            .cold_dispatched
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < COLD_DISPATCH_MAX).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(Arc::clone(v)))
    }
}

impl Drop for ColdSlot {
    fn drop(&mut self) {
        self.0
            .counters
            .cold_dispatched
            .fetch_sub(1, Ordering::AcqRel);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply queue on one end of a socket pair, and the other end.
    fn queue(queued: &[u8]) -> (Out, std::os::unix::net::UnixStream) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let out = Out {
            sock: Arc::new(StdSock::Unix(a)),
            buf: queued.to_vec(),
        };
        (out, b)
    }

    /// A thread reading everything from `b` until the other end shuts down.
    fn read_all(b: std::os::unix::net::UnixStream) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut got = Vec::new();
            (&b).read_to_end(&mut got).unwrap();
            got
        })
    }

    /// A large reply the socket takes only in part leaves the rest queued, in order, and a later
    /// flush sends exactly the queue, the header and the data (no byte lost, none twice).
    #[test]
    fn a_direct_reply_the_socket_takes_in_part_keeps_its_rest_in_order() {
        let (mut o, b) = queue(b"queued");
        let header = [7u8; 16];
        let data: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
        // 4 MiB is far more than a unix socket buffers: with nobody reading yet, the send without
        // waiting is partial.
        assert!(!o.send_direct(header, &data, false).unwrap());
        assert!(!o.buf.is_empty() && o.buf.len() < data.len());
        let reader = read_all(b);
        o.flush().unwrap();
        o.sock.shutdown(std::net::Shutdown::Write).unwrap();
        let mut want = b"queued".to_vec();
        want.extend_from_slice(&header);
        want.extend_from_slice(&data);
        assert!(reader.join().unwrap() == want);
    }

    #[test]
    fn the_read_ahead_buffer_grows_only_when_a_recv_fills_it() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let sock = StdSock::Unix(a);
        let mut r = Reader::new(&sock, b"ahead");
        assert_eq!(r.buf.len(), READ_AHEAD_START);
        let mut got = [0u8; 5];
        r.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ahead");
        // A client that sends little at a time never grows it.
        (&b).write_all(&[1u8; 28]).unwrap();
        let mut hdr = [0u8; 28];
        r.read_exact(&mut hdr).unwrap();
        assert_eq!(r.buf.len(), READ_AHEAD_START);
        // One that pipelines fills it: it doubles, and every byte still arrives in order.
        let sent: Vec<u8> = (0..600_000u32).map(|i| (i % 253) as u8).collect();
        let writer = {
            let (b, sent) = (b.try_clone().unwrap(), sent.clone());
            std::thread::spawn(move || (&b).write_all(&sent).unwrap())
        };
        let mut back = vec![0u8; sent.len()];
        for chunk in back.chunks_mut(100) {
            r.read_exact(chunk).unwrap();
        }
        writer.join().unwrap();
        assert!(back == sent);
        assert!(
            r.buf.len() > READ_AHEAD_START && r.buf.len() <= READ_AHEAD,
            "{}",
            r.buf.len()
        );
    }

    /// With `wait`, everything leaves at once and nothing stays queued.
    #[test]
    fn a_direct_reply_with_wait_sends_it_all() {
        let (mut o, b) = queue(b"q");
        let reader = read_all(b);
        let data = vec![3u8; 1 << 20];
        assert!(o.send_direct([1u8; 16], &data, true).unwrap());
        assert!(o.buf.is_empty());
        o.sock.shutdown(std::net::Shutdown::Write).unwrap();
        let got = reader.join().unwrap();
        assert_eq!(got.len(), 1 + 16 + data.len());
        assert!(got[..1] == *b"q" && got[1..17] == [1u8; 16] && got[17..] == data[..]);
    }

    /// The blocking threads cold writes may hold are capped per volume, and a finished write gives
    /// its place back.
    #[test]
    fn cold_writes_hold_at_most_their_share_of_blocking_threads() {
        let d = tempfile::tempdir().unwrap();
        let v = Volume::open(&crate::takeover::tests::base_config(d.path())).unwrap();
        let slots: Vec<ColdSlot> = std::iter::from_fn(|| ColdSlot::take(&v))
            .take(1000)
            .collect();
        assert_eq!(slots.len() as u64, COLD_DISPATCH_MAX);
        assert!(ColdSlot::take(&v).is_none());
        drop(slots);
        assert!(ColdSlot::take(&v).is_some());
        assert_eq!(v.counters.cold_dispatched.load(Ordering::Acquire), 0);
    }
}
