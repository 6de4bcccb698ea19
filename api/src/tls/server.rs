//! The server side: accepted TCP connections become plaintext or TLS streams, each carrying the
//! verdict on its peer ([`PeerAuth`]) as tonic connection info, so the engine's authorization
//! reads who is calling from the request's extensions.
//!
//! Limits: at most `max_connections` connections at once (at the cap a newcomer replaces the
//! oldest connection still in its handshake, or is closed at once if there is none, as the NBD
//! listeners do), a TLS handshake (or the first byte of a plaintext one) within
//! `handshake_timeout`, and an accept error (EMFILE, ENFILE, ENOBUFS) backs off instead of
//! spinning.

use std::{
    collections::BTreeMap,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use rustls::pki_types::UnixTime;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};
use tokio_rustls::server::TlsStream;

use super::{identity::Identity, material::check_chain, material::TlsSource};

/// Default cap on concurrent gRPC connections per engine.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Default bound on a TLS handshake (and on a client's silence before its first byte).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the server knows about the peer of one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerAuth {
    /// The server runs without TLS: nothing is known, nothing is required.
    NotRequired,
    /// TLS is required but the client spoke plaintext HTTP/2.
    Plaintext,
    /// A TLS client whose certificate is missing or not acceptable; why.
    Refused(String),
    /// A TLS client whose certificate chains to the CA and names this identity.
    Verified(Identity),
}

/// Connection info of every gRPC request (tonic puts it in the request's extensions).
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    pub auth: PeerAuth,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// One accepted connection. Holds its slot under the connection cap until dropped.
pub struct ServerIo {
    stream: Stream,
    info: PeerInfo,
    _slot: Slot,
}

/// The connections under the cap, by admission order; an entry with a sender is still in its
/// handshake and may be evicted (sending on it, or dropping it, closes that connection).
struct Slots {
    max: usize,
    table: Mutex<Table>,
}

/// The next id, and the connections by id.
type Table = (u64, BTreeMap<u64, Option<oneshot::Sender<()>>>);

/// One connection's place under the cap; dropping it frees the place.
struct Slot {
    id: u64,
    slots: Arc<Slots>,
}

impl Slots {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        // Consistent after every statement: a panicking holder leaves it usable.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a new connection and the signal that it was evicted; at the cap the oldest
    /// connection still in handshake makes room, and None (close at once) if there is none.
    // Limit: at most `max` connections at once, and idle handshakers cannot lock a real client
    // out (storage-engine tests/tls.rs `grpc_idle_handshakers_*`, `grpc_over_the_cap_*`).
    fn admit(self: &Arc<Self>) -> Option<(Slot, oneshot::Receiver<()>)> {
        let mut t = self.table();
        if t.1.len() >= self.max {
            let oldest = t.1.iter().find(|(_, e)| e.is_some()).map(|(id, _)| *id);
            // Dropping its sender wakes the handshake task, which closes the connection.
            t.1.remove(&oldest?);
        }
        let id = t.0;
        t.0 += 1;
        let (tx, rx) = oneshot::channel();
        t.1.insert(id, Some(tx));
        let slot = Slot {
            id,
            slots: Arc::clone(self),
        };
        Some((slot, rx))
    }
}

impl Slot {
    /// The handshake is over: no longer evictable. False if it was evicted meanwhile.
    fn established(&self) -> bool {
        match self.slots.table().1.get_mut(&self.id) {
            Some(e) => {
                *e = None;
                true
            }
            None => false,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.table().1.remove(&self.id);
    }
}

impl tonic::transport::server::Connected for ServerIo {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for ServerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// What the acceptor turned away, for the engine's metrics.
#[derive(Debug, Default)]
pub struct AcceptStats {
    /// Closed at accept: the cap was reached and no connection was still in its handshake.
    pub refused: AtomicU64,
    /// Closed in their handshake to make room for a newcomer at the cap.
    pub evicted: AtomicU64,
    /// Closed for not finishing the handshake within the timeout.
    pub handshake_timeouts: AtomicU64,
    /// Failed accepts (descriptors or memory exhausted); each paused the listener.
    pub accept_errors: AtomicU64,
}

/// How the server accepts connections.
#[derive(Clone, Debug)]
pub struct AcceptOptions {
    /// None: plaintext only, every peer [`PeerAuth::NotRequired`].
    pub tls: Option<TlsSource>,
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub stats: Arc<AcceptStats>,
}

impl AcceptOptions {
    pub fn new(tls: Option<TlsSource>) -> Self {
        Self {
            tls,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            stats: Arc::default(),
        }
    }
}

/// The first byte of a TLS ClientHello record.
const TLS_HANDSHAKE: u8 = 0x16;

async fn establish(tcp: TcpStream, tls: Option<TlsSource>) -> io::Result<(Stream, PeerAuth)> {
    let Some(tls) = tls else {
        return Ok((Stream::Plain(tcp), PeerAuth::NotRequired));
    };
    let mut first = [0u8; 1];
    if tcp.peek(&mut first).await? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    if first[0] != TLS_HANDSHAKE {
        // Served by the same router so the client hears UNAUTHENTICATED, not a reset.
        return Ok((Stream::Plain(tcp), PeerAuth::Plaintext));
    }
    // New connections take the material current now; live ones keep theirs (rotation).
    let material = tls.current();
    let stream = tokio_rustls::TlsAcceptor::from(material.server_config())
        .accept(tcp)
        .await?;
    let auth = match stream.get_ref().1.peer_certificates() {
        None | Some([]) => PeerAuth::Refused("no client certificate".into()),
        // The deferred chain check (material::DeferredClientVerifier): every TLS connection
        // passes here before its first request (tls::refused_clients_get_unauthenticated).
        Some(chain) => match check_chain(
            material.anchors(),
            chain,
            webpki::KeyUsage::client_auth(),
            UnixTime::now(),
        ) {
            Ok(id) => PeerAuth::Verified(id),
            Err(r) => PeerAuth::Refused(r.0),
        },
    };
    Ok((Stream::Tls(Box::new(stream)), auth))
}

/// Accepts on `listener` for tonic's `serve_with_incoming*`: `tune` runs on every accepted
/// socket (socket options), then the handshake runs in its own task under the timeout. The
/// stream ends when the server drops it.
pub fn incoming(
    listener: TcpListener,
    opts: AcceptOptions,
    tune: impl Fn(&TcpStream) + Send + Sync + 'static,
) -> impl tokio_stream::Stream<Item = io::Result<ServerIo>> + Send + 'static {
    let (tx, rx) = mpsc::channel::<io::Result<ServerIo>>(16);
    let slots = Arc::new(Slots {
        max: opts.max_connections.max(1),
        table: Mutex::default(),
    });
    tokio::spawn(async move {
        let mut backoff = crate::accept::Backoff::new("grpc");
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = tx.closed() => return,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => {
                    backoff.succeeded();
                    a
                }
                Err(e) => {
                    // A full fd table must not turn into a busy loop (accept::Backoff).
                    tokio::select! {
                        _ = backoff.failed(&e, &opts.stats.accept_errors) => continue,
                        _ = tx.closed() => return,
                    }
                }
            };
            // The cap: a connection beyond it, with no handshaker to replace, is closed at once
            // rather than left to hang.
            let Some((slot, evicted)) = slots.admit() else {
                opts.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%remote, max = opts.max_connections, "gRPC connection refused: too many connections");
                drop(tcp);
                continue;
            };
            tune(&tcp);
            let tx = tx.clone();
            let tls = opts.tls.clone();
            let limit = opts.handshake_timeout;
            let stats = Arc::clone(&opts.stats);
            tokio::spawn(async move {
                let done = tokio::select! {
                    r = tokio::time::timeout(limit, establish(tcp, tls)) => r,
                    _ = evicted => {
                        stats.evicted.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%remote, "gRPC connection in handshake closed to make room for a new one");
                        return;
                    }
                };
                match done {
                    Ok(Ok((stream, auth))) if slot.established() => {
                        let info = PeerInfo {
                            remote: Some(remote),
                            auth,
                        };
                        let io = ServerIo {
                            stream,
                            info,
                            _slot: slot,
                        };
                        let _ = tx.send(Ok(io)).await;
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::debug!(%remote, error = %e, "gRPC handshake failed"),
                    Err(_) => {
                        stats.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%remote, "gRPC handshake timed out");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
