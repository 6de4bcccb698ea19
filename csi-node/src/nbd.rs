//! A small NBD client: the fixed-newstyle handshake with `NBD_OPT_GO`, then pipelined transmission with
//! simple replies (READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, DISC), and reconnection.
//!
//! The FUSE daemon (`attach-fuse`) forwards every kernel request to one [`NbdClient`]. Requests are
//! pipelined on one connection: each gets a fresh 64-bit handle, a reader thread matches replies to
//! handles and completes them, so the kernel can keep many requests in flight. When the connection
//! breaks (engine restart, network blip) the supervisor thread reconnects and resends every request that
//! has not been answered, in handle order, FLUSHes included. Resending is safe because nothing was
//! acknowledged to the kernel for those requests, and an NBD write or zeroing is idempotent (the
//! same bytes land again); a FLUSH resent covers every write acknowledged before it.
//!
//! Two bounds (issue 12 item 4: an engine restart is a stall, not an error):
//! - while the engine is unreachable, requests wait; once it has been unreachable for the
//!   reconnect limit ([`ClientOptions::reconnect_timeout`], 120 s by default) every waiting
//!   request fails with `EIO`, and so does every new one until the engine is back;
//! - on a live connection a request unanswered within the I/O timeout fails with `ETIMEDOUT` (the
//!   block layer turns that into an I/O error, as nbd.ko's dead-connection timeout does), and the
//!   connection is replaced. A resent request's I/O time starts again at the resend.
//!
//! A server that answers but refuses the export by policy (the engine is now fenced or a secondary)
//! is not an outage to wait out: while it refuses, every request fails at once with `EIO`, so the old
//! primary's node sees the fence immediately and unmounts there do not wait an I/O timeout per
//! request. The client keeps reconnecting, and I/O resumes if the engine serves the export again.
//!
//! Wire format (NBD protocol, "fixed newstyle"): all integers big-endian.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

// The wire format is the shared one (tandem_api::nbd): one definition of the protocol, and one
// client codec, in the workspace.
pub use tandem_api::nbd::client::ExportInfo;
use tandem_api::nbd::client::{handshake, NbdError as WireError};
use tandem_api::nbd::{Request, SimpleReply, INFO_BLOCK_SIZE};
pub use tandem_api::nbd::{
    CMD_DISC, CMD_FLAG_FUA, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
    TFLAG_HAS_FLAGS as TF_HAS_FLAGS, TFLAG_READ_ONLY as TF_READ_ONLY,
    TFLAG_SEND_FLUSH as TF_SEND_FLUSH, TFLAG_SEND_FUA as TF_SEND_FUA,
    TFLAG_SEND_TRIM as TF_SEND_TRIM, TFLAG_SEND_WRITE_ZEROES as TF_SEND_WRITE_ZEROES,
};

/// Where an NBD server listens: `host:port` or `unix:/path` (also `unix:///path`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddr {
    Tcp(String),
    Unix(PathBuf),
}

impl NbdAddr {
    pub fn parse(s: &str) -> Result<Self, NbdError> {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix("unix:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if !path.starts_with('/') {
                return Err(NbdError::Address(format!(
                    "{s:?}: a unix address needs an absolute path"
                )));
            }
            return Ok(NbdAddr::Unix(PathBuf::from(path)));
        }
        let s = s.strip_prefix("nbd://").unwrap_or(s);
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(NbdAddr::Tcp(s.to_string()))
            }
            _ => Err(NbdError::Address(format!(
                "{s:?}: expected host:port or unix:/path"
            ))),
        }
    }
}

impl fmt::Display for NbdAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdAddr::Tcp(a) => write!(f, "{a}"),
            NbdAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("invalid NBD address {0}")]
    Address(String),
    #[error("cannot reach NBD server {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    /// The handshake or the connection failed (the shared codec's error).
    #[error(transparent)]
    Wire(#[from] WireError),
}

impl From<io::Error> for NbdError {
    fn from(e: io::Error) -> Self {
        NbdError::Wire(WireError::Io(e))
    }
}

impl NbdError {
    /// True when retrying the same request cannot help until the server changes its mind (it named a
    /// reason, e.g. "this engine is the secondary").
    pub fn is_refusal(&self) -> bool {
        matches!(self, NbdError::Wire(w) if w.is_refusal())
    }

    /// True when the server refused the export by policy (`NBD_REP_ERR_POLICY`): the engine is
    /// fenced or a secondary, a role and not a passing state such as a shutdown.
    pub fn is_policy_refusal(&self) -> bool {
        matches!(self, NbdError::Wire(w) if w.is_policy_refusal())
    }
}

/// A connected byte stream to the server (TCP or unix socket).
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn connect(addr: &NbdAddr, timeout: Duration) -> Result<Self, NbdError> {
        let err = |source| NbdError::Connect {
            addr: addr.to_string(),
            source,
        };
        match addr {
            NbdAddr::Unix(p) => UnixStream::connect(p).map(Stream::Unix).map_err(err),
            NbdAddr::Tcp(a) => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address resolved");
                for sa in a.to_socket_addrs().map_err(err)? {
                    match TcpStream::connect_timeout(&sa, timeout) {
                        Ok(s) => {
                            s.set_nodelay(true).map_err(err)?;
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(err(last))
            }
        }
    }

    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    pub fn shutdown(&self) {
        // Errors only mean it is already closed.
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// Connects and negotiates; the returned stream is ready for transmission.
pub fn connect(
    addr: &NbdAddr,
    export: &str,
    timeout: Duration,
) -> Result<(Stream, ExportInfo), NbdError> {
    let mut s = Stream::connect(addr, timeout)?;
    s.set_timeouts(Some(timeout))?;
    let info = handshake(&mut s, export, &[INFO_BLOCK_SIZE])?;
    s.set_timeouts(None)?;
    Ok((s, info))
}

/// One request, before it gets a handle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    pub kind: u16,
    pub flags: u16,
    pub offset: u64,
    pub len: u32,
    pub data: Option<Vec<u8>>,
}

impl Command {
    pub fn read(offset: u64, len: u32) -> Self {
        Command {
            kind: CMD_READ,
            flags: 0,
            offset,
            len,
            data: None,
        }
    }
    pub fn write(offset: u64, data: Vec<u8>) -> Self {
        Command {
            kind: CMD_WRITE,
            flags: 0,
            offset,
            len: data.len() as u32,
            data: Some(data),
        }
    }
    pub fn flush() -> Self {
        Command {
            kind: CMD_FLUSH,
            flags: 0,
            offset: 0,
            len: 0,
            data: None,
        }
    }
    pub fn trim(offset: u64, len: u32) -> Self {
        Command {
            kind: CMD_TRIM,
            flags: 0,
            offset,
            len,
            data: None,
        }
    }
    pub fn write_zeroes(offset: u64, len: u32) -> Self {
        Command {
            kind: CMD_WRITE_ZEROES,
            flags: 0,
            offset,
            len,
            data: None,
        }
    }

    /// The 28-byte request header; a write's payload follows it on the wire.
    fn header(&self, handle: u64) -> [u8; Request::LEN] {
        Request {
            flags: self.flags,
            kind: self.kind,
            handle,
            offset: self.offset,
            length: self.len,
        }
        .encode()
    }
}

/// One request on the wire: header and (for writes) the payload, sent without concatenating them.
#[derive(Clone)]
struct Wire {
    header: [u8; Request::LEN],
    payload: Option<Arc<Vec<u8>>>,
}

impl Wire {
    fn send(&self, s: &mut Stream) -> io::Result<()> {
        let payload = self.payload.as_deref().map(Vec::as_slice).unwrap_or(&[]);
        let mut bufs = [io::IoSlice::new(&self.header), io::IoSlice::new(payload)];
        let mut slices: &mut [io::IoSlice<'_>] = if payload.is_empty() {
            &mut bufs[..1]
        } else {
            &mut bufs[..]
        };
        while !slices.is_empty() {
            let n = s.write_vectored(slices)?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            io::IoSlice::advance_slices(&mut slices, n);
        }
        Ok(())
    }
}

/// The result of one request: the data read (empty for other commands) or an errno.
pub type Reply = Result<Vec<u8>, i32>;
/// Called exactly once with the request's result, from the reader or supervisor thread.
pub type Completion = Box<dyn FnOnce(Reply) + Send>;

/// Connection state, reported to the daemon's status file on every change.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LinkState {
    pub connected: bool,
    /// The server answers but refuses the export by policy; requests fail at once meanwhile.
    #[serde(default)]
    pub refused: bool,
    pub reconnects: u64,
    pub timeouts: u64,
    /// The engine has been unreachable for longer than the reconnect limit: requests fail at
    /// once with EIO until it is back.
    #[serde(default)]
    pub gave_up: bool,
    pub last_error: Option<String>,
}

pub type LinkObserver = Box<dyn Fn(&LinkState) + Send + Sync>;

#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// A request sent on a live connection and unanswered for this long fails with ETIMEDOUT.
    pub io_timeout: Duration,
    /// Connect + handshake timeout for each attempt.
    pub connect_timeout: Duration,
    /// How long requests wait for an unreachable engine (from the moment the connection broke)
    /// before they fail with EIO: the longest stall an engine restart may cause.
    pub reconnect_timeout: Duration,
}

/// The default reconnect limit: room for an engine container's restart (its crash-loop back-off
/// starts at 10 s) plus a lease wait, and below the kernel's 120 s hung-task warning.
pub const DEFAULT_RECONNECT_TIMEOUT: Duration = Duration::from_secs(120);

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            io_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            reconnect_timeout: DEFAULT_RECONNECT_TIMEOUT,
        }
    }
}

struct Pending {
    wire: Wire,
    kind: u16,
    len: u32,
    deadline: Instant,
    sent_gen: Option<u64>,
    done: Completion,
}

struct State {
    next_handle: u64,
    pending: BTreeMap<u64, Pending>,
    connected_gen: Option<u64>,
    /// When the connection broke; `None` while connected.
    down_since: Option<Instant>,
    shutdown: bool,
    link: LinkState,
}

struct Writer {
    stream: Option<Stream>,
    gen: u64,
}

struct Shared {
    addr: NbdAddr,
    export: String,
    /// As negotiated first; the size may grow since (`size`), never shrink.
    info: ExportInfo,
    /// The size the current connection negotiated: a reconnect may find the export grown (an
    /// online expansion) and adopts the larger size; a smaller one is refused.
    size: std::sync::atomic::AtomicU64,
    opts: ClientOptions,
    state: Mutex<State>,
    wake: Condvar,
    writer: Mutex<Writer>,
    observer: Option<LinkObserver>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks is a bug; keep serving rather than cascade.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A pipelined, reconnecting NBD client for one export.
pub struct NbdClient {
    shared: Arc<Shared>,
    supervisor: Option<thread::JoinHandle<()>>,
}

impl NbdClient {
    /// Connects (once, failing fast: the caller reports the server's refusal) and starts the
    /// supervisor and reader threads.
    pub fn connect(
        addr: NbdAddr,
        export: &str,
        opts: ClientOptions,
        observer: Option<LinkObserver>,
    ) -> Result<Self, NbdError> {
        let (stream, info) = connect(&addr, export, opts.connect_timeout)?;
        let reader = stream.try_clone()?;
        let shared = Arc::new(Shared {
            addr,
            export: export.to_string(),
            size: info.size.into(),
            info,
            opts,
            state: Mutex::new(State {
                next_handle: 1,
                pending: BTreeMap::new(),
                connected_gen: Some(1),
                down_since: None,
                shutdown: false,
                link: LinkState {
                    connected: true,
                    ..LinkState::default()
                },
            }),
            wake: Condvar::new(),
            writer: Mutex::new(Writer {
                stream: Some(stream),
                gen: 1,
            }),
            observer,
        });
        shared.notify_link();
        spawn_reader(shared.clone(), 1, reader);
        let sup = shared.clone();
        let supervisor = thread::Builder::new()
            .name("nbd-supervisor".into())
            .spawn(move || supervise(sup))?;
        Ok(NbdClient {
            shared,
            supervisor: Some(supervisor),
        })
    }

    /// The export as negotiated, with the size of the current connection.
    pub fn info(&self) -> ExportInfo {
        ExportInfo {
            size: self.shared.size.load(std::sync::atomic::Ordering::Acquire),
            ..self.shared.info
        }
    }

    /// Asks the engine for the export's size now (a handshake of its own). When it grew (online
    /// expansion), the current connection, which negotiated the old size and would be refused
    /// past it, is replaced: requests in flight are resent on the new one, as after any outage.
    /// Returns the size served from now on (once the new connection is up, at most the connect
    /// timeout twice).
    pub fn refresh_size(&self) -> Result<u64, NbdError> {
        use std::sync::atomic::Ordering;
        let sh = &self.shared;
        let (probe, info) = connect(&sh.addr, &sh.export, sh.opts.connect_timeout)?;
        probe.shutdown();
        let now = sh.size.load(Ordering::Acquire);
        if info.size <= now {
            return Ok(now);
        }
        if let Some(s) = lock(&sh.writer).stream.as_ref() {
            // The reader sees the end and marks the connection broken; the supervisor reconnects.
            s.shutdown();
        }
        let deadline = Instant::now() + sh.opts.connect_timeout * 2;
        let mut st = lock(&sh.state);
        loop {
            let size = sh.size.load(Ordering::Acquire);
            if size >= info.size && st.connected_gen.is_some() {
                return Ok(size);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || st.shutdown {
                return Err(NbdError::Wire(WireError::Protocol(format!(
                    "the export grew to {} bytes but no connection at that size came up ({})",
                    info.size,
                    st.link.last_error.clone().unwrap_or_default()
                ))));
            }
            st = sh
                .wake
                .wait_timeout(st, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    pub fn link_state(&self) -> LinkState {
        lock(&self.shared.state).link.clone()
    }

    /// Queues a request; `done` runs once with its result.
    pub fn submit(&self, cmd: Command, done: Completion) {
        let sh = &self.shared;
        let (kind, len) = (cmd.kind, cmd.len);
        let mut wire = Wire {
            header: cmd.header(0),
            payload: cmd.data.map(Arc::new),
        };
        let handle = {
            let mut st = lock(&sh.state);
            if st.shutdown {
                drop(st);
                done(Err(libc_errno::ESHUTDOWN));
                return;
            }
            if st.link.refused || st.link.gave_up {
                drop(st);
                done(Err(libc_errno::EIO));
                return;
            }
            let h = st.next_handle;
            st.next_handle += 1;
            // The handle sits at bytes 8..16 of the request header.
            wire.header[8..16].copy_from_slice(&h.to_be_bytes());
            st.pending.insert(
                h,
                Pending {
                    wire,
                    kind,
                    len,
                    deadline: Instant::now() + sh.opts.io_timeout,
                    sent_gen: None,
                    done,
                },
            );
            h
        };
        sh.send_one(handle);
    }

    /// Submits and waits.
    pub fn call(&self, cmd: Command) -> Reply {
        let (tx, rx) = mpsc::channel();
        self.submit(
            cmd,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv().unwrap_or(Err(libc_errno::EIO))
    }

    /// Flushes, says goodbye (NBD_CMD_DISC) and stops the threads. Requests still queued fail.
    pub fn close(mut self) {
        self.close_inner();
    }

    fn close_inner(&mut self) {
        let sh = self.shared.clone();
        if lock(&sh.state).shutdown {
            return;
        }
        // Flush on the way out, unless the engine is unreachable (it would only time out).
        let connected = lock(&sh.state).connected_gen.is_some();
        if connected && !sh.info.read_only() && sh.info.can(TF_SEND_FLUSH) {
            let _ = self.call(Command::flush());
        }
        let orphans: Vec<Pending> = {
            let mut st = lock(&sh.state);
            st.shutdown = true;
            std::mem::take(&mut st.pending).into_values().collect()
        };
        for p in orphans {
            (p.done)(Err(libc_errno::ESHUTDOWN));
        }
        {
            let mut w = lock(&sh.writer);
            if let Some(s) = w.stream.as_mut() {
                let disc = Command {
                    kind: CMD_DISC,
                    flags: 0,
                    offset: 0,
                    len: 0,
                    data: None,
                };
                let _ = s.write_all(&disc.header(0));
                s.shutdown();
            }
            w.stream = None;
        }
        sh.wake.notify_all();
        if let Some(t) = self.supervisor.take() {
            let _ = t.join();
        }
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.close_inner();
    }
}

impl Shared {
    fn notify_link(&self) {
        if let Some(obs) = &self.observer {
            let link = lock(&self.state).link.clone();
            obs(&link);
        }
    }

    /// Sends one queued request if a connection is up and nobody sent it on this connection yet.
    fn send_one(&self, handle: u64) {
        let mut w = lock(&self.writer);
        let gen = w.gen;
        let Some(stream) = w.stream.as_mut() else {
            return; // disconnected: the supervisor sends it after reconnecting
        };
        let wire = {
            let mut st = lock(&self.state);
            match st.pending.get_mut(&handle) {
                Some(p) if p.sent_gen.is_none() => {
                    p.sent_gen = Some(gen);
                    p.wire.clone()
                }
                _ => return,
            }
        };
        if let Err(e) = wire.send(stream) {
            stream.shutdown();
            w.stream = None;
            drop(w);
            self.mark_broken(gen, &format!("send: {e}"));
        }
    }

    fn mark_broken(&self, gen: u64, why: &str) {
        let changed = {
            let mut st = lock(&self.state);
            if st.shutdown {
                false // closing: the server hanging up after NBD_CMD_DISC is expected
            } else if st.connected_gen == Some(gen) {
                st.connected_gen = None;
                st.down_since.get_or_insert_with(Instant::now);
                st.link.connected = false;
                st.link.last_error = Some(why.to_string());
                true
            } else {
                false
            }
        };
        self.wake.notify_all();
        if changed {
            tracing::warn!(addr = %self.addr, export = %self.export, "NBD connection lost: {why}");
            self.notify_link();
        }
    }
}

fn spawn_reader(shared: Arc<Shared>, gen: u64, stream: Stream) {
    let spawned = thread::Builder::new()
        .name(format!("nbd-reader-{gen}"))
        .spawn(move || {
            let why = read_replies(&shared, gen, stream);
            shared.mark_broken(gen, &why);
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start NBD reader thread: {e}");
    }
}

/// Reads replies until the connection fails; returns why it stopped.
fn read_replies(sh: &Shared, gen: u64, s: Stream) -> String {
    // Buffered: a small reply's header and payload usually arrive in one read(2).
    let closer = s.try_clone().ok();
    let mut s = io::BufReader::with_capacity(256 << 10, s);
    let shutdown = |why: String| {
        if let Some(c) = &closer {
            c.shutdown();
        }
        why
    };
    loop {
        let mut hdr = [0u8; SimpleReply::LEN];
        if let Err(e) = s.read_exact(&mut hdr) {
            return format!("receive: {e}");
        }
        let SimpleReply { error, handle } = match SimpleReply::parse(&hdr) {
            Ok(r) => r,
            Err(e) => return shutdown(e.to_string()),
        };
        let (kind, len) = {
            let st = lock(&sh.state);
            match st.pending.get(&handle) {
                Some(p) if p.sent_gen == Some(gen) => (p.kind, p.len),
                _ => {
                    drop(st);
                    return shutdown(format!("reply for unknown handle {handle}"));
                }
            }
        };
        let mut data = Vec::new();
        if kind == CMD_READ && error == 0 {
            data = vec![0u8; len as usize];
            if let Err(e) = s.read_exact(&mut data) {
                return format!("receive read payload: {e}");
            }
        }
        let p = lock(&sh.state).pending.remove(&handle);
        if let Some(p) = p {
            let result = if error == 0 {
                Ok(data)
            } else {
                Err(reply_errno(error))
            };
            (p.done)(result);
        }
    }
}

/// The errno a failed request reports: the values the NBD spec defines pass through, anything
/// else counts as EINVAL (the spec's advice to clients), never a number the kernel cannot map.
fn reply_errno(error: u32) -> i32 {
    match error {
        1 | 5 | 12 | 22 | 28 | 75 | 95 | 108 => error as i32,
        _ => libc_errno::EINVAL,
    }
}

enum Action {
    Reconnect,
    Break(u64),
    /// The reconnect limit passed: the requests taken out fail with EIO.
    GiveUp,
}

/// Supervises the connection: fails expired requests, replaces broken connections, resends.
fn supervise(sh: Arc<Shared>) {
    let mut backoff = Duration::from_millis(100);
    let mut failures: u64 = 0;
    loop {
        let (action, expired) = {
            let mut st = lock(&sh.state);
            loop {
                if st.shutdown {
                    return;
                }
                let now = Instant::now();
                if st.connected_gen.is_none() {
                    // Disconnected: requests wait for the engine (their I/O timeout starts again
                    // at the resend), up to the reconnect limit for all of them.
                    let outage = st.down_since.map(|t| now.duration_since(t));
                    if !st.link.gave_up && outage.is_some_and(|d| d >= sh.opts.reconnect_timeout) {
                        st.link.gave_up = true;
                        let failed: Vec<Pending> =
                            std::mem::take(&mut st.pending).into_values().collect();
                        break (Some(Action::GiveUp), failed);
                    }
                    break (Some(Action::Reconnect), Vec::new());
                }
                let late: Vec<u64> = st
                    .pending
                    .iter()
                    .filter(|(_, p)| p.deadline <= now)
                    .map(|(h, _)| *h)
                    .collect();
                let mut expired = Vec::new();
                let mut stuck_gen = None;
                for h in late {
                    if let Some(p) = st.pending.remove(&h) {
                        if p.sent_gen.is_some() && p.sent_gen == st.connected_gen {
                            stuck_gen = st.connected_gen;
                        }
                        expired.push(p);
                    }
                }
                st.link.timeouts += expired.len() as u64;
                if let Some(g) = stuck_gen {
                    break (Some(Action::Break(g)), expired);
                }
                if !expired.is_empty() {
                    break (None, expired);
                }
                st = sh
                    .wake
                    .wait_timeout(st, Duration::from_millis(250))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
        };
        if let Some(Action::GiveUp) = action {
            tracing::error!(
                addr = %sh.addr,
                export = %sh.export,
                failed = expired.len(),
                "the engine has been unreachable for {:?}: I/O fails with EIO until it is back",
                sh.opts.reconnect_timeout
            );
            for p in expired {
                (p.done)(Err(libc_errno::EIO));
            }
            sh.notify_link();
            continue;
        }
        if !expired.is_empty() {
            tracing::warn!(
                export = %sh.export,
                "{} NBD request(s) timed out after {:?}",
                expired.len(),
                sh.opts.io_timeout
            );
        }
        for p in expired {
            (p.done)(Err(libc_errno::ETIMEDOUT));
        }
        match action {
            None | Some(Action::GiveUp) => {}
            Some(Action::Break(gen)) => {
                {
                    let mut w = lock(&sh.writer);
                    if w.gen == gen {
                        if let Some(s) = w.stream.take() {
                            s.shutdown();
                        }
                    }
                }
                sh.mark_broken(gen, "server did not answer within the I/O timeout");
            }
            Some(Action::Reconnect) => {
                match reconnect(&sh) {
                    Ok(()) => {
                        backoff = Duration::from_millis(100);
                        failures = 0;
                    }
                    Err(e) => {
                        failures += 1;
                        if failures == 1 || failures.is_power_of_two() {
                            tracing::warn!(addr = %sh.addr, export = %sh.export, attempt = failures, "NBD reconnect failed: {e}");
                        }
                        let (refused_now, failed, news) = {
                            let mut st = lock(&sh.state);
                            // A new reason is worth publishing (e.g. "at epoch 3 now" after a
                            // failback); the same one again is not.
                            let message = e.to_string();
                            let news = st.link.last_error.as_deref() != Some(message.as_str());
                            st.link.last_error = Some(message);
                            let refused = e.is_policy_refusal();
                            let changed = st.link.refused != refused;
                            st.link.refused = refused;
                            // Nothing waiting can be served while the engine refuses the export.
                            let failed: Vec<Pending> = if refused {
                                std::mem::take(&mut st.pending).into_values().collect()
                            } else {
                                Vec::new()
                            };
                            (changed && refused, failed, news)
                        };
                        if refused_now {
                            tracing::warn!(addr = %sh.addr, export = %sh.export, failed = failed.len(), "the engine refuses the export: I/O fails until it serves it again");
                        }
                        for p in failed {
                            (p.done)(Err(libc_errno::EIO));
                        }
                        if failures == 1 || refused_now || news {
                            sh.notify_link();
                        }
                        // Sleep, but wake at once for shutdown.
                        let st = lock(&sh.state);
                        if !st.shutdown {
                            let _ = sh.wake.wait_timeout(st, backoff);
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
        }
    }
}

fn reconnect(sh: &Arc<Shared>) -> Result<(), NbdError> {
    let (stream, info) = connect(&sh.addr, &sh.export, sh.opts.connect_timeout)?;
    let before = sh.size.load(std::sync::atomic::Ordering::Acquire);
    if info.size < before {
        stream.shutdown();
        return Err(NbdError::Wire(WireError::Protocol(format!(
            "export shrank from {before} to {} bytes",
            info.size
        ))));
    }
    let reader = stream.try_clone()?;
    let gen;
    let mut outage = Duration::ZERO;
    let reconnects;
    {
        let mut w = lock(&sh.writer);
        w.gen += 1;
        gen = w.gen;
        w.stream = Some(stream);
        let wires: Vec<Wire> = {
            let mut st = lock(&sh.state);
            if st.shutdown {
                if let Some(s) = w.stream.take() {
                    s.shutdown();
                }
                return Ok(());
            }
            // Grown (online expansion): requests may reach the new size on this connection.
            sh.size
                .store(info.size, std::sync::atomic::Ordering::Release);
            st.connected_gen = Some(gen);
            if let Some(t) = st.down_since.take() {
                outage = t.elapsed();
            }
            st.link.connected = true;
            st.link.refused = false;
            st.link.gave_up = false;
            st.link.reconnects += 1;
            reconnects = st.link.reconnects;
            let deadline = Instant::now() + sh.opts.io_timeout;
            st.pending
                .values_mut()
                .map(|p| {
                    p.sent_gen = Some(gen);
                    p.deadline = deadline;
                    p.wire.clone()
                })
                .collect()
        };
        let resent = wires.len();
        if let Some(s) = w.stream.as_mut() {
            for wire in wires {
                if let Err(e) = wire.send(s) {
                    s.shutdown();
                    w.stream = None;
                    drop(w);
                    drop(reader);
                    sh.mark_broken(gen, &format!("resend: {e}"));
                    return Ok(());
                }
            }
        }
        tracing::info!(addr = %sh.addr, export = %sh.export, resent, ?outage, reconnects, "NBD connection re-established");
    }
    spawn_reader(sh.clone(), gen, reader);
    sh.notify_link();
    // `refresh_size` waits for this connection.
    sh.wake.notify_all();
    Ok(())
}

/// The errno values we hand back (Linux numbering, which NBD's error field also uses).
pub mod libc_errno {
    pub const EIO: i32 = 5;
    pub const EINVAL: i32 = 22;
    pub const ENOSPC: i32 = 28;
    pub const EROFS: i32 = 30;
    pub const EOPNOTSUPP: i32 = 95;
    pub const ESHUTDOWN: i32 = 108;
    pub const ETIMEDOUT: i32 = 110;
}

#[cfg(test)]
pub(crate) mod testserver {
    //! A tiny in-memory NBD server for unit tests: fixed newstyle, OPT_GO, simple replies.
    use super::*;
    pub(crate) use tandem_api::nbd::{
        FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_EXPORT, NBDMAGIC, OPT_ABORT, OPT_GO,
        OPT_REPLY_MAGIC, REP_ACK, REP_FLAG_ERROR, REP_INFO, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
    };

    pub(crate) fn read_u16(r: &mut impl Read) -> io::Result<u16> {
        let mut b = [0u8; 2];
        r.read_exact(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }
    pub(crate) fn read_u32(r: &mut impl Read) -> io::Result<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }
    pub(crate) fn read_u64(r: &mut impl Read) -> io::Result<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    pub struct TestServer {
        pub path: PathBuf,
        pub data: Arc<Mutex<Vec<u8>>>,
        pub refuse: Arc<Mutex<Option<String>>>,
        pub flushes: Arc<AtomicU64>,
        /// When set, the next request's connection is dropped without a reply.
        pub drop_next: Arc<AtomicBool>,
        /// While set, the server is "down": a new connection is closed before the handshake.
        pub down: Arc<AtomicBool>,
        /// The export name of every OPT_GO, in order.
        pub names: Arc<Mutex<Vec<String>>>,
        _dir: tempfile::TempDir,
    }

    impl TestServer {
        pub fn start(size: usize) -> TestServer {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("nbd.sock");
            let listener = UnixListener::bind(&path).unwrap();
            let data = Arc::new(Mutex::new(vec![0u8; size]));
            let refuse = Arc::new(Mutex::new(None::<String>));
            let flushes = Arc::new(AtomicU64::new(0));
            let drop_next = Arc::new(AtomicBool::new(false));
            let names = Arc::new(Mutex::new(Vec::new()));
            let down = Arc::new(AtomicBool::new(false));
            let (d, r, f, dn, nm, dw) = (
                data.clone(),
                refuse.clone(),
                flushes.clone(),
                drop_next.clone(),
                names.clone(),
                down.clone(),
            );
            thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { return };
                    if dw.load(Ordering::SeqCst) {
                        continue; // dropped: the client sees its handshake fail
                    }
                    let (d, r, f, dn, nm) =
                        (d.clone(), r.clone(), f.clone(), dn.clone(), nm.clone());
                    thread::spawn(move || {
                        let _ = serve(conn, d, r, f, dn, nm);
                    });
                }
            });
            TestServer {
                path,
                data,
                refuse,
                flushes,
                drop_next,
                down,
                names,
                _dir: dir,
            }
        }

        pub fn addr(&self) -> NbdAddr {
            NbdAddr::Unix(self.path.clone())
        }
    }

    fn serve(
        mut c: UnixStream,
        data: Arc<Mutex<Vec<u8>>>,
        refuse: Arc<Mutex<Option<String>>>,
        flushes: Arc<AtomicU64>,
        drop_next: Arc<AtomicBool>,
        names: Arc<Mutex<Vec<String>>>,
    ) -> io::Result<()> {
        c.write_all(&NBDMAGIC.to_be_bytes())?;
        c.write_all(&IHAVEOPT.to_be_bytes())?;
        c.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
        let _client_flags = read_u32(&mut c)?;
        loop {
            assert_eq!(read_u64(&mut c)?, IHAVEOPT);
            let opt = read_u32(&mut c)?;
            let len = read_u32(&mut c)?;
            let mut body = vec![0u8; len as usize];
            c.read_exact(&mut body)?;
            if opt == OPT_ABORT {
                return Ok(());
            }
            assert_eq!(opt, OPT_GO);
            let name_len = u32::from_be_bytes(body[..4].try_into().unwrap()) as usize;
            lock(&names).push(String::from_utf8_lossy(&body[4..4 + name_len]).into_owned());
            let reply = |c: &mut UnixStream, rep: u32, payload: &[u8]| -> io::Result<()> {
                c.write_all(&OPT_REPLY_MAGIC.to_be_bytes())?;
                c.write_all(&OPT_GO.to_be_bytes())?;
                c.write_all(&rep.to_be_bytes())?;
                c.write_all(&(payload.len() as u32).to_be_bytes())?;
                c.write_all(payload)
            };
            if let Some(msg) = lock(&refuse).clone() {
                reply(&mut c, REP_FLAG_ERROR | 2, msg.as_bytes())?;
                continue;
            }
            let size = lock(&data).len() as u64;
            let mut info = INFO_EXPORT.to_be_bytes().to_vec();
            info.extend_from_slice(&size.to_be_bytes());
            info.extend_from_slice(
                &(TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES).to_be_bytes(),
            );
            reply(&mut c, REP_INFO, &info)?;
            reply(&mut c, REP_ACK, &[])?;
            break;
        }
        loop {
            let magic = read_u32(&mut c)?;
            assert_eq!(magic, REQUEST_MAGIC);
            let _flags = read_u16(&mut c)?;
            let kind = read_u16(&mut c)?;
            let handle = read_u64(&mut c)?;
            let offset = read_u64(&mut c)? as usize;
            let len = read_u32(&mut c)? as usize;
            let mut payload = Vec::new();
            if kind == CMD_WRITE {
                payload = vec![0u8; len];
                c.read_exact(&mut payload)?;
            }
            if drop_next.swap(false, Ordering::SeqCst) {
                return Ok(()); // connection dies with the request unanswered
            }
            let mut out = Vec::new();
            let mut err = 0u32;
            {
                let mut d = lock(&data);
                if kind != CMD_FLUSH && kind != CMD_DISC && offset + len > d.len() {
                    err = 22;
                } else {
                    match kind {
                        CMD_READ => out = d[offset..offset + len].to_vec(),
                        CMD_WRITE => d[offset..offset + len].copy_from_slice(&payload),
                        CMD_TRIM | CMD_WRITE_ZEROES => d[offset..offset + len].fill(0),
                        CMD_FLUSH => {
                            flushes.fetch_add(1, Ordering::SeqCst);
                        }
                        CMD_DISC => return Ok(()),
                        _ => err = 22,
                    }
                }
            }
            c.write_all(&SIMPLE_REPLY_MAGIC.to_be_bytes())?;
            c.write_all(&err.to_be_bytes())?;
            c.write_all(&handle.to_be_bytes())?;
            if err == 0 {
                c.write_all(&out)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testserver::{TestServer, REP_FLAG_ERROR};
    use super::*;
    use std::sync::atomic::Ordering;
    use tandem_api::nbd::client::rep_error_name;

    fn opts() -> ClientOptions {
        ClientOptions {
            io_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            reconnect_timeout: Duration::from_secs(30),
        }
    }

    #[test]
    fn parses_addresses() {
        assert_eq!(
            NbdAddr::parse("10.0.0.1:10809").unwrap(),
            NbdAddr::Tcp("10.0.0.1:10809".into())
        );
        assert_eq!(
            NbdAddr::parse("[::1]:10809").unwrap(),
            NbdAddr::Tcp("[::1]:10809".into())
        );
        assert_eq!(
            NbdAddr::parse("unix:///run/e.sock").unwrap(),
            NbdAddr::Unix("/run/e.sock".into())
        );
        assert_eq!(
            NbdAddr::parse("unix:/run/e.sock").unwrap(),
            NbdAddr::Unix("/run/e.sock".into())
        );
        assert!(NbdAddr::parse("unix:relative").is_err());
        assert!(NbdAddr::parse("no-port").is_err());
        assert!(NbdAddr::parse("host:notaport").is_err());
    }

    #[test]
    fn request_encoding_matches_the_protocol() {
        let c = Command::write(4096, vec![7u8; 3]);
        let mut w = c.header(0x0102_0304_0506_0708).to_vec();
        w.extend_from_slice(c.data.as_deref().unwrap());
        assert_eq!(&w[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&w[4..6], &[0, 0]);
        assert_eq!(&w[6..8], &[0, 1]);
        assert_eq!(&w[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&w[16..24], &4096u64.to_be_bytes());
        assert_eq!(&w[24..28], &3u32.to_be_bytes());
        assert_eq!(&w[28..], &[7, 7, 7]);
    }

    #[test]
    fn reads_back_what_it_wrote() {
        let srv = TestServer::start(1 << 20);
        let c = NbdClient::connect(srv.addr(), "vol", opts(), None).unwrap();
        assert_eq!(c.info().size, 1 << 20);
        assert!(c.info().can(TF_SEND_FLUSH));
        let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        c.call(Command::write(512, pattern.clone())).unwrap();
        assert_eq!(c.call(Command::read(512, 8192)).unwrap(), pattern);
        assert_eq!(&lock(&srv.data)[512..512 + 8192], &pattern[..]);
        c.call(Command::write_zeroes(512, 4096)).unwrap();
        let back = c.call(Command::read(512, 8192)).unwrap();
        assert!(back[..4096].iter().all(|b| *b == 0));
        assert_eq!(&back[4096..], &pattern[4096..]);
        c.call(Command::flush()).unwrap();
        assert_eq!(srv.flushes.load(Ordering::SeqCst), 1);
        // Out of range: the server's EINVAL comes back as the errno.
        assert_eq!(c.call(Command::read(1 << 20, 512)), Err(22));
        c.close();
        assert_eq!(srv.flushes.load(Ordering::SeqCst), 2, "close flushes");
    }

    #[test]
    fn many_requests_in_flight_complete() {
        let srv = TestServer::start(1 << 20);
        let c = NbdClient::connect(srv.addr(), "vol", opts(), None).unwrap();
        let (tx, rx) = mpsc::channel();
        for i in 0..64u64 {
            let tx = tx.clone();
            c.submit(
                Command::write(i * 4096, vec![i as u8; 4096]),
                Box::new(move |r| tx.send((i, r)).unwrap()),
            );
        }
        for _ in 0..64 {
            let (_, r) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
            r.unwrap();
        }
        for i in 0..64u64 {
            assert_eq!(
                c.call(Command::read(i * 4096, 4096)).unwrap(),
                vec![i as u8; 4096]
            );
        }
    }

    #[test]
    fn refusal_names_the_servers_reason() {
        let srv = TestServer::start(4096);
        *lock(&srv.refuse) = Some("volume v is secondary".into());
        let err = NbdClient::connect(srv.addr(), "v", opts(), None)
            .err()
            .unwrap();
        assert!(err.is_refusal());
        assert!(err.is_policy_refusal());
        let shutting_down = NbdError::Wire(WireError::Refused {
            export: "v".into(),
            reason: rep_error_name(REP_FLAG_ERROR | 7),
            message: String::new(),
            code: REP_FLAG_ERROR | 7,
        });
        assert!(shutting_down.is_refusal() && !shutting_down.is_policy_refusal());
        let msg = err.to_string();
        assert!(msg.contains("secondary"), "{msg}");
        assert!(msg.contains("forbidden by policy"), "{msg}");
    }

    #[test]
    fn reconnects_and_resends_an_unanswered_request() {
        let srv = TestServer::start(1 << 16);
        let states = Arc::new(Mutex::new(Vec::<LinkState>::new()));
        let s2 = states.clone();
        let c = NbdClient::connect(
            srv.addr(),
            "vol",
            opts(),
            Some(Box::new(move |l: &LinkState| lock(&s2).push(l.clone()))),
        )
        .unwrap();
        srv.drop_next.store(true, Ordering::SeqCst);
        // The server drops the connection instead of answering; the client reconnects and resends.
        c.call(Command::write(0, vec![9u8; 4096])).unwrap();
        assert_eq!(c.call(Command::read(0, 4096)).unwrap(), vec![9u8; 4096]);
        assert_eq!(c.link_state().reconnects, 1);
        let seen = lock(&states).clone();
        assert!(seen.iter().any(|l| !l.connected), "{seen:?}");
        assert!(seen.last().unwrap().connected);
    }

    #[test]
    fn a_grown_export_replaces_the_connection_and_keeps_the_data() {
        let srv = TestServer::start(1 << 16);
        let c = NbdClient::connect(srv.addr(), "vol", opts(), None).unwrap();
        c.call(Command::write(4096, vec![7u8; 4096])).unwrap();
        // Nothing grew: the connection stays.
        assert_eq!(c.refresh_size().unwrap(), 1 << 16);
        assert_eq!(c.link_state().reconnects, 0);
        lock(&srv.data).resize(1 << 17, 0);
        assert_eq!(c.info().size, 1 << 16, "grown only when asked");
        assert_eq!(c.refresh_size().unwrap(), 1 << 17);
        assert_eq!(c.info().size, 1 << 17);
        assert_eq!(c.link_state().reconnects, 1);
        c.call(Command::write((1 << 17) - 4096, vec![8u8; 4096]))
            .unwrap();
        assert!(c.call(Command::read((1 << 17) - 4096, 4096)).unwrap() == vec![8u8; 4096]);
        assert!(c.call(Command::read(4096, 4096)).unwrap() == vec![7u8; 4096]);
        // Asked again at the same size: nothing replaced.
        assert_eq!(c.refresh_size().unwrap(), 1 << 17);
        assert_eq!(c.link_state().reconnects, 1);
    }

    /// Submits `cmd`; the receiver gets its result.
    fn submit(c: &NbdClient, cmd: Command) -> mpsc::Receiver<Reply> {
        let (tx, rx) = mpsc::channel();
        c.submit(
            cmd,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx
    }

    /// An engine restart: the connection drops with a write and a flush unanswered and the
    /// engine stays away longer than the I/O timeout. Nothing fails: both wait, are resent on the
    /// new connection, and the write reaches the server exactly as submitted.
    #[test]
    fn an_outage_longer_than_the_io_timeout_is_a_stall_not_an_error() {
        let srv = TestServer::start(1 << 16);
        let o = ClientOptions {
            io_timeout: Duration::from_millis(300),
            connect_timeout: Duration::from_secs(1),
            reconnect_timeout: Duration::from_secs(30),
        };
        let c = NbdClient::connect(srv.addr(), "vol@4", o, None).unwrap();
        srv.down.store(true, Ordering::SeqCst);
        srv.drop_next.store(true, Ordering::SeqCst);
        let write = submit(&c, Command::write(4096, vec![5u8; 8192]));
        let flush = submit(&c, Command::flush());
        // Three I/O timeouts pass with the engine away: still waiting, not failed.
        assert!(write.recv_timeout(Duration::from_millis(900)).is_err());
        let link = c.link_state();
        assert!(
            !link.connected && !link.gave_up && !link.refused,
            "{link:?}"
        );
        srv.down.store(false, Ordering::SeqCst);
        assert_eq!(
            write.recv_timeout(Duration::from_secs(10)).unwrap(),
            Ok(vec![])
        );
        assert_eq!(
            flush.recv_timeout(Duration::from_secs(10)).unwrap(),
            Ok(vec![])
        );
        assert_eq!(&lock(&srv.data)[4096..4096 + 8192], &[5u8; 8192][..]);
        assert!(
            srv.flushes.load(Ordering::SeqCst) >= 1,
            "the flush was not resent"
        );
        let link = c.link_state();
        assert!(link.connected && link.reconnects >= 1, "{link:?}");
        assert_eq!(link.timeouts, 0, "{link:?}");
        // Every connection opened the pinned export.
        assert!(lock(&srv.names).iter().all(|n| n == "vol@4"));
    }

    /// The stall is bounded: past the reconnect limit waiting requests fail with EIO, new ones
    /// fail at once, and I/O resumes when the engine is back.
    #[test]
    fn an_outage_past_the_reconnect_limit_fails_with_eio_until_the_engine_is_back() {
        let srv = TestServer::start(1 << 16);
        let o = ClientOptions {
            io_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(1),
            reconnect_timeout: Duration::from_millis(500),
        };
        let c = NbdClient::connect(srv.addr(), "vol", o, None).unwrap();
        srv.down.store(true, Ordering::SeqCst);
        srv.drop_next.store(true, Ordering::SeqCst);
        let started = Instant::now();
        assert_eq!(
            c.call(Command::write(0, vec![1u8; 512])),
            Err(libc_errno::EIO)
        );
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(500) && waited < Duration::from_secs(10),
            "{waited:?}"
        );
        assert!(c.link_state().gave_up);
        let t = Instant::now();
        assert_eq!(c.call(Command::read(0, 512)), Err(libc_errno::EIO));
        assert!(t.elapsed() < Duration::from_millis(200));
        srv.down.store(false, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.call(Command::read(0, 512)).is_err() {
            assert!(Instant::now() < deadline, "never reconnected");
            thread::sleep(Duration::from_millis(20));
        }
        let link = c.link_state();
        assert!(link.connected && !link.gave_up, "{link:?}");
        // The failed write was never acknowledged; the server never saw it either.
        assert_eq!(&lock(&srv.data)[..512], &[0u8; 512][..]);
    }

    /// A pinned export (`vol@3`) is what every reconnect opens again, never the bare name.
    #[test]
    fn reconnects_open_the_same_pinned_export() {
        let srv = TestServer::start(1 << 16);
        let c = NbdClient::connect(srv.addr(), "vol@3", opts(), None).unwrap();
        srv.drop_next.store(true, Ordering::SeqCst);
        c.call(Command::write(0, vec![7u8; 4096])).unwrap();
        assert_eq!(c.link_state().reconnects, 1);
        assert_eq!(*lock(&srv.names), vec!["vol@3".to_string(); 2]);
    }

    #[test]
    fn requests_fail_at_once_while_the_server_refuses() {
        let srv = TestServer::start(1 << 16);
        let c = NbdClient::connect(
            srv.addr(),
            "vol",
            ClientOptions {
                io_timeout: Duration::from_secs(30),
                connect_timeout: Duration::from_secs(1),
                reconnect_timeout: Duration::from_secs(30),
            },
            None,
        )
        .unwrap();
        *lock(&srv.refuse) = Some("fenced".into());
        srv.drop_next.store(true, Ordering::SeqCst);
        // The request in flight when the connection is cut, then new ones: all fail long before
        // the I/O timeout, because the server said it will not serve this export.
        let started = Instant::now();
        assert_eq!(c.call(Command::read(0, 512)), Err(libc_errno::EIO));
        assert_eq!(
            c.call(Command::write(0, vec![1u8; 512])),
            Err(libc_errno::EIO)
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        let link = c.link_state();
        assert!(link.refused && !link.connected, "{link:?}");
        assert!(link.last_error.unwrap().contains("fenced"));
        // Once the server accepts again, I/O resumes.
        *lock(&srv.refuse) = None;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if c.call(Command::read(0, 512)).is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "never reconnected");
            thread::sleep(Duration::from_millis(20));
        }
        assert!(!c.link_state().refused);
    }
}

/// Fuzzing of this client against a fake server sending random and mutated handshake and reply
/// bytes (stable Rust: a seeded generator, no cargo-fuzz). No panic, in this thread or in the
/// client's reader and supervisor threads; every failure is an `NbdError` or an errno the kernel
/// understands. Cases: `TANDEM_FUZZ_CASES` (default 16); full size:
/// `TANDEM_FUZZ_CASES=2000 cargo test -p csi-node --release fuzz_`.
#[cfg(test)]
mod fuzz {
    use super::testserver::*;
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Once;

    static PANICS: AtomicUsize = AtomicUsize::new(0);

    fn count_panics() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            let prev = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                PANICS.fetch_add(1, Ordering::SeqCst);
                prev(info);
            }));
        });
    }

    fn cases() -> u64 {
        std::env::var("TANDEM_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(16)
    }

    /// xorshift64*: reproducible from the case number printed on failure.
    struct Rng(u64);
    impl Rng {
        fn new(seed: u64) -> Rng {
            Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
        }
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    fn opt_reply(rep: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&OPT_GO.to_be_bytes());
        v.extend_from_slice(&rep.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// A correct server side of the handshake for an export of `size` bytes.
    fn good_handshake(size: u64) -> Vec<u8> {
        let mut v = NBDMAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&size.to_be_bytes());
        info.extend_from_slice(&(TF_HAS_FLAGS | TF_SEND_FLUSH).to_be_bytes());
        v.extend_from_slice(&opt_reply(REP_INFO, &info));
        let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for w in [512u32, 4096, 32 << 20] {
            bs.extend_from_slice(&w.to_be_bytes());
        }
        v.extend_from_slice(&opt_reply(REP_INFO, &bs));
        v.extend_from_slice(&opt_reply(REP_ACK, &[]));
        v
    }

    /// Random bytes, or `good` with some bytes flipped, cut short, or extended with junk.
    fn mutated(rng: &mut Rng, good: &[u8]) -> Vec<u8> {
        match rng.below(4) {
            0 => {
                let n = rng.below(200) as usize;
                rng.bytes(n)
            }
            _ => {
                let mut v = good.to_vec();
                for _ in 0..=rng.below(3) {
                    let i = rng.below(v.len() as u64) as usize;
                    v[i] ^= (rng.next() as u8) | 1;
                }
                if rng.below(3) == 0 {
                    v.truncate(rng.below(v.len() as u64 + 1) as usize);
                }
                if rng.below(3) == 0 {
                    let n = rng.below(64) as usize;
                    v.extend(rng.bytes(n));
                }
                v
            }
        }
    }

    #[test]
    fn fuzz_handshake_against_a_fake_server() {
        count_panics();
        let good = good_handshake(1 << 20);
        let mut ok = 0;
        for case in 0..cases() {
            let mut rng = Rng::new(case);
            let script = mutated(&mut rng, &good);
            let (mut client, mut server) = UnixStream::pair().unwrap();
            let feeder = thread::spawn(move || {
                let _ = server.write_all(&script);
                let _ = server.shutdown(Shutdown::Write);
                let mut sink = Vec::new();
                let _ = server.read_to_end(&mut sink);
            });
            client
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            match handshake(&mut client, "vol", &[INFO_BLOCK_SIZE]) {
                Ok(info) => {
                    ok += 1;
                    assert!(info.min_block >= 1 && info.max_payload >= 1, "case {case}");
                }
                Err(e) => {
                    let msg = e.to_string();
                    assert!(!msg.is_empty(), "case {case}");
                    // A hang would show as a timeout here: the fake server always ends its stream.
                    assert!(
                        !msg.contains("timed out") && !msg.contains("WouldBlock"),
                        "case {case}: {msg}"
                    );
                }
            }
            drop(client);
            feeder.join().unwrap();
            assert_eq!(PANICS.load(Ordering::SeqCst), 0, "case {case}");
        }
        // The unmutated script must still work (sanity of the generator).
        let (mut client, mut server) = UnixStream::pair().unwrap();
        server.write_all(&good).unwrap();
        assert_eq!(
            handshake(&mut client, "vol", &[INFO_BLOCK_SIZE])
                .unwrap()
                .size,
            1 << 20
        );
        eprintln!("handshake fuzz: {} cases, {ok} accepted", cases());
    }

    #[test]
    fn endless_option_replies_end_the_handshake() {
        let (mut client, mut server) = UnixStream::pair().unwrap();
        let mut script = good_handshake(1 << 20);
        let ack = opt_reply(REP_ACK, &[]);
        script.truncate(script.len() - ack.len());
        let info = opt_reply(REP_INFO, &[0, 9]);
        let feeder = thread::spawn(move || {
            let _ = server.write_all(&script);
            // Unknown info replies, forever (until the client hangs up).
            while server.write_all(&info).is_ok() {}
        });
        let err = handshake(&mut client, "vol", &[INFO_BLOCK_SIZE]).unwrap_err();
        assert!(err.to_string().contains("replies to NBD_OPT_GO"), "{err}");
        drop(client);
        feeder.join().unwrap();
    }

    /// One fake server connection: a good handshake, then every request is answered with
    /// `reply(handle)` (random or mutated bytes) and the connection closes.
    fn fake_server(
        script: Arc<dyn Fn(u64) -> Vec<u8> + Send + Sync>,
    ) -> (tempfile::TempDir, NbdAddr) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fake.sock");
        let listener = UnixListener::bind(&path).unwrap();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut c) = conn else { return };
                let script = script.clone();
                thread::spawn(move || -> io::Result<()> {
                    c.write_all(&good_handshake(1 << 20)[..18])?;
                    let _flags = read_u32(&mut c)?;
                    let _ = read_u64(&mut c)?;
                    let _opt = read_u32(&mut c)?;
                    let len = read_u32(&mut c)?;
                    let mut body = vec![0u8; len as usize];
                    c.read_exact(&mut body)?;
                    c.write_all(&good_handshake(1 << 20)[18..])?;
                    loop {
                        let mut h = [0u8; 28];
                        c.read_exact(&mut h)?;
                        let kind = u16::from_be_bytes([h[6], h[7]]);
                        let handle = u64::from_be_bytes(h[8..16].try_into().unwrap_or([0; 8]));
                        let len = u32::from_be_bytes([h[24], h[25], h[26], h[27]]);
                        if kind == CMD_WRITE {
                            let mut p = vec![0u8; len as usize];
                            c.read_exact(&mut p)?;
                        }
                        if kind == CMD_DISC {
                            return Ok(());
                        }
                        c.write_all(&script(handle))?;
                        c.shutdown(Shutdown::Write)?;
                    }
                });
            }
        });
        let addr = NbdAddr::Unix(path);
        (dir, addr)
    }

    fn good_reply(handle: u64, error: u32, data: &[u8]) -> Vec<u8> {
        let mut v = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&error.to_be_bytes());
        v.extend_from_slice(&handle.to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn fuzz_replies_against_a_fake_server() {
        count_panics();
        let known = [1, 5, 12, 22, 28, 75, 95, 108, libc_errno::ETIMEDOUT];
        for case in 0..cases() {
            let seed = Arc::new(Mutex::new(Rng::new(case ^ 0x5eed)));
            let kind_read = case % 2 == 0;
            let script: Arc<dyn Fn(u64) -> Vec<u8> + Send + Sync> = Arc::new(move |handle| {
                let mut rng = lock(&seed);
                let error = match rng.below(3) {
                    0 => 0,
                    1 => rng.next() as u32,
                    _ => 5,
                };
                let data = if kind_read && error == 0 {
                    vec![7u8; 4096]
                } else {
                    Vec::new()
                };
                mutated(&mut rng, &good_reply(handle, error, &data))
            });
            let (_dir, addr) = fake_server(script);
            let opts = ClientOptions {
                io_timeout: Duration::from_millis(300),
                connect_timeout: Duration::from_millis(300),
                reconnect_timeout: Duration::from_millis(300),
            };
            let client = NbdClient::connect(addr, "vol", opts, None).unwrap();
            let cmd = if kind_read {
                Command::read(0, 4096)
            } else {
                Command::write(0, vec![1u8; 4096])
            };
            match client.call(cmd) {
                Ok(data) => {
                    let want = if kind_read { 4096 } else { 0 };
                    assert_eq!(data.len(), want, "case {case}");
                }
                Err(errno) => assert!(known.contains(&errno), "case {case}: errno {errno}"),
            }
            drop(client);
            assert_eq!(PANICS.load(Ordering::SeqCst), 0, "case {case}");
        }
    }
}
