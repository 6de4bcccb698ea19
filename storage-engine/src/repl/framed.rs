//! The replication stream over length-prefixed frames (`tandem_api::framed`) instead of the gRPC
//! call `Peer.Replicate`: the same conversation, the same receiver (`PeerService::accept`), the
//! same token and rights, without HTTP/2 framing and its connection task on either side.
//!
//! - Server: the gRPC acceptor routes framed connections here ([`serve`]); the hello frame's token
//!   and the connection's identity are checked as the gRPC call's are, a refusal is an error frame.
//! - Client: [`open`] returns the same [`Opened`] as the gRPC call; messages go through one writer
//!   task that drains everything queued into one write, acks are read in the caller's task.
//! - Liveness: the server pings while it has nothing to acknowledge; a client that hears nothing
//!   for the peer timeout ends the stream (the receiver already ends a stream silent that long).

use std::{
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::BytesMut;
use tandem_api::{
    framed::{self, FrameReader, Kind},
    tls::server::ServerIo,
};
use tokio::{
    io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf},
    sync::{mpsc, watch},
};
use tonic::Status;
use tracing::{debug, warn};

use super::{receiver::PeerService, sender::Opened};
use crate::{
    authz::{Authz, Call},
    grpc::AuthInterceptor,
    pb,
};

/// `--repl-transport`: how this engine's replication streams travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// Framed where the peer serves it, the gRPC call where it does not (an older engine).
    Auto,
    /// The gRPC call only; as a receiver, the framed stream is not offered.
    Grpc,
    /// Framed only: a peer that does not serve it is not replicated to.
    Framed,
}

static TRANSPORT: AtomicU8 = AtomicU8::new(0);

/// Sets the process-wide transport (`serve` does, once, before any stream opens).
pub fn set_transport(t: Transport) {
    TRANSPORT.store(t as u8, Ordering::Relaxed);
}

/// The process-wide transport (default [`Transport::Auto`]).
pub fn transport() -> Transport {
    match TRANSPORT.load(Ordering::Relaxed) {
        1 => Transport::Grpc,
        2 => Transport::Framed,
        _ => Transport::Auto,
    }
}

/// Which transport a stream runs over (status `link_transport`, metric `link_transport`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Grpc = 1,
    Framed = 2,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Grpc => "grpc",
            Via::Framed => "framed",
        }
    }

    pub(crate) fn of(v: u8) -> Option<Via> {
        match v {
            1 => Some(Via::Grpc),
            2 => Some(Via::Framed),
            _ => None,
        }
    }
}

type Conn = Box<dyn framed::Io>;

/// The acknowledgement half of an opened stream, over either transport.
pub enum Acks {
    Grpc(tonic::Streaming<pb::ReplicationAck>),
    Framed(FramedAcks),
}

impl Acks {
    /// The next acknowledgement; None when the peer ended the stream.
    pub async fn message(&mut self) -> Result<Option<pb::ReplicationAck>, Status> {
        match self {
            Acks::Grpc(s) => s.message().await,
            Acks::Framed(f) => f.message().await,
        }
    }

    pub fn via(&self) -> Via {
        match self {
            Acks::Grpc(_) => Via::Grpc,
            Acks::Framed(_) => Via::Framed,
        }
    }
}

/// Acknowledgements read straight off the connection.
pub struct FramedAcks {
    reader: FrameReader<ReadHalf<Conn>>,
    silence: Duration,
    /// Checks for silence a few times per `silence` (one timer for the stream, not one per ack).
    tick: tokio::time::Interval,
    /// When the peer last sent a frame.
    heard: tokio::time::Instant,
}

impl FramedAcks {
    fn new(reader: FrameReader<ReadHalf<Conn>>, silence: Duration) -> Self {
        let period = silence / 6;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            reader,
            silence,
            tick,
            heard: tokio::time::Instant::now(),
        }
    }

    async fn message(&mut self) -> Result<Option<pb::ReplicationAck>, Status> {
        loop {
            // The server sends a frame at least every half of the peer timeout (pings when it
            // has nothing to acknowledge): five sixths of it in silence is a dead, stopped or
            // cut-off peer, which TCP may never report, noticed within the peer timeout
            // (liveness::stopped_peer_is_detected_and_resumes and the others, framed).
            let f = tokio::select! {
                biased;
                f = self.reader.next() => f,
                _ = self.tick.tick() => {
                    if self.heard.elapsed() >= self.silence * 5 / 6 {
                        return Err(Status::unavailable(format!(
                            "peer silent for {:?}",
                            self.heard.elapsed()
                        )));
                    }
                    continue;
                }
            };
            self.heard = tokio::time::Instant::now();
            return match f {
                Ok(Some((Kind::Ack, p))) => framed::decode_pb("ack", p)
                    .map(Some)
                    .map_err(|e| e.status()),
                Ok(Some((Kind::Ping, _))) => continue,
                Ok(Some((Kind::Error, p))) => {
                    Err(framed::status_of(p).unwrap_or_else(|e| e.status()))
                }
                Ok(Some((k, _))) => Err(Status::invalid_argument(format!(
                    "the peer sent a {k:?} frame on the acknowledgement stream"
                ))),
                Ok(None) => Ok(None),
                Err(e) => Err(e.status()),
            };
        }
    }
}

/// Why [`open`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Unsupported(tandem_api::framed::OpenError),
    #[error(transparent)]
    Session(#[from] super::sender::SessionError),
}

/// The keepalive of `client::channel`'s sockets: idle, interval, probes.
fn keepalive() -> (Duration, Duration, u32) {
    let third = crate::client::peer_timeout() / 3;
    (
        third.max(Duration::from_secs(1)),
        (third / 2).max(Duration::from_secs(1)),
        2,
    )
}

/// Opens the framed stream to `target` (with the process's client TLS, as `client::channel`) and
/// reads the peer's hello ack. `size`: the volume's, for the frame cap.
pub(crate) async fn open(
    target: &str,
    token: Option<&str>,
    size: u64,
) -> Result<Opened, OpenError> {
    use super::sender::SessionError;
    let tls = tandem_api::tls::default_client();
    let conn = framed::open(
        target,
        tls.as_ref(),
        token,
        Duration::from_secs(2),
        keepalive(),
    )
    .await
    .map_err(|e| match e {
        framed::OpenError::Unsupported { .. } => OpenError::Unsupported(e),
        framed::OpenError::Failed { .. } => OpenError::Session(SessionError::Framed(e.to_string())),
    })?;
    let silence = crate::client::peer_timeout();
    let (r, w) = tokio::io::split(conn);
    let cap = framed::frame_cap(crate::takeover::handoff::message_cap(size));
    let mut acks = FramedAcks::new(FrameReader::new(r, cap), silence);
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(write_messages(rx, w, silence));
    let hello = acks
        .message()
        .await
        .map_err(SessionError::Rpc)?
        .ok_or(SessionError::Closed)?;
    Ok((tx, Acks::Framed(acks), hello))
}

/// A write that makes no progress for this long has a dead reader (the receiver's silence).
async fn write_within<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &[u8],
    limit: Duration,
) -> std::io::Result<()> {
    tokio::time::timeout(limit, async {
        w.write_all(buf).await?;
        w.flush().await
    })
    .await
    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// A batch of messages this large goes out without waiting for more.
const WRITE_BATCH: usize = 1 << 20;

/// Writes every message queued since the last write in one write. Ends when the session drops its
/// sender (then closes the connection's write side: the receiver makes the tail durable and
/// acknowledges it) or the connection breaks (the session's next send fails).
async fn write_messages(
    mut rx: mpsc::Receiver<pb::ReplicationMessage>,
    mut w: WriteHalf<Conn>,
    limit: Duration,
) {
    let mut buf = BytesMut::with_capacity(256 * 1024);
    while let Some(m) = rx.recv().await {
        framed::put_message(&mut buf, Kind::Message, &m);
        while buf.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(m) => framed::put_message(&mut buf, Kind::Message, &m),
                Err(_) => break,
            }
        }
        if let Err(e) = write_within(&mut w, &buf, limit).await {
            debug!(error = %e, "framed replication stream: write failed");
            return;
        }
        buf.clear();
    }
    let _ = w.shutdown().await;
}

/// What the framed server needs: the receiver, the checks the gRPC call passes, the limits.
pub struct Server {
    pub svc: Arc<PeerService>,
    pub auth: AuthInterceptor,
    pub authz: Authz,
    /// `takeover::handoff::message_cap` of the volume, as the gRPC service's.
    pub message_cap: usize,
    /// The hello must arrive within this (the acceptor's handshake timeout).
    pub hello_timeout: Duration,
    pub peer_timeout: Duration,
}

/// Serves the framed connections the acceptor routes here until `stop`; then waits for the
/// streams to end (each makes its tail durable and acknowledges it first).
pub async fn serve_all(
    mut conns: mpsc::Receiver<ServerIo>,
    server: Arc<Server>,
    mut stop: watch::Receiver<bool>,
) {
    let mut running = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            c = conns.recv() => match c {
                Some(c) => {
                    running.spawn(serve(c, Arc::clone(&server), stop.clone()));
                }
                None => break,
            },
            Some(_) = running.join_next() => {}
            _ = stop.changed() => break,
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(15), async {
        while running.join_next().await.is_some() {}
    })
    .await;
}

/// Writes `s` as an error frame and closes: a refusal the client reads as the gRPC call's status.
async fn refuse<W: AsyncWrite + Unpin>(w: &mut W, s: &Status, limit: Duration) {
    debug!(code = ?s.code(), error = %s.message(), "framed replication stream refused");
    let mut buf = BytesMut::new();
    framed::put_frame(&mut buf, Kind::Error, &framed::error_payload(s));
    let _ = write_within(w, &buf, limit).await;
    let _ = w.shutdown().await;
}

/// One framed connection: magic, hello, the token and the rights, then the stream.
pub async fn serve(mut io: ServerIo, server: Arc<Server>, stop: watch::Receiver<bool>) {
    let info = io.info().clone();
    let limit = server.peer_timeout;
    let mut magic = [0u8; framed::MAGIC.len()];
    match tokio::time::timeout(server.hello_timeout, io.read_exact(&mut magic)).await {
        Ok(Ok(_)) if magic == framed::MAGIC => {}
        _ => {
            debug!(remote = ?info.remote, "framed connection without the magic: closed");
            return;
        }
    }
    if write_within(&mut io, &framed::MAGIC, limit).await.is_err() {
        return;
    }
    let (r, mut w) = tokio::io::split(io);
    let mut reader = FrameReader::new(r, framed::frame_cap(server.message_cap));
    let hello = match tokio::time::timeout(server.hello_timeout, reader.next()).await {
        Ok(Ok(Some((Kind::Hello, token)))) => token,
        Ok(Ok(Some((k, _)))) => {
            let s = Status::invalid_argument(format!("the first frame must be a hello, not {k:?}"));
            return refuse(&mut w, &s, limit).await;
        }
        Ok(Ok(None)) => return,
        Ok(Err(e)) => return refuse(&mut w, &e.status(), limit).await,
        Err(_) => {
            debug!(remote = ?info.remote, "no hello on a framed connection in time: closed");
            return;
        }
    };
    // The same checks, in the same order, as the gRPC call: the token (the interceptor), then
    // the rights of the connection's identity (authz::PeerAuthz). Nothing reaches the receiver
    // before both pass (tests::the_token_is_checked_as_the_grpc_calls, tests::the_identity_is_*).
    let token = String::from_utf8_lossy(&hello);
    let checked = server.auth.check(Some(&*token)).and_then(|()| {
        server
            .authz
            .check_info(Some(&info), Call::Peer("Peer.Replicate"))
    });
    if let Err(s) = checked {
        return refuse(&mut w, &s, limit).await;
    }
    let broke = Arc::new(std::sync::Mutex::new(None));
    let acks = server
        .svc
        .accept(inbound(reader, stop, Arc::clone(&broke)), Via::Framed)
        .into_inner();
    write_acks(acks, w, limit, &broke).await;
}

/// Why the client's side of a stream broke (a bad frame), for the last frame back.
type Broke = Arc<std::sync::Mutex<Option<Status>>>;

/// The frames after the hello as the receiver's stream of messages; it ends at the connection's
/// end, at the first bad frame (with an error the receiver logs) or when the engine stops.
fn inbound(
    reader: FrameReader<ReadHalf<ServerIo>>,
    stop: watch::Receiver<bool>,
    broke: Broke,
) -> impl super::receiver::Inbound {
    Box::pin(futures::stream::unfold(
        Some((reader, stop)),
        move |state| {
            let broke = Arc::clone(&broke);
            async move {
                let (mut reader, mut stop) = state?;
                let f = tokio::select! {
                    f = reader.next() => f,
                    _ = stop.wait_for(|s| *s) => return None,
                };
                let m: Result<pb::ReplicationMessage, _> = match f {
                    Ok(Some((Kind::Message, p))) => framed::decode_pb("message", p),
                    Ok(Some((k, _))) => Err(framed::FrameError::Undecodable {
                        what: "message",
                        why: format!("a {k:?} frame in the message stream"),
                    }),
                    Ok(None) => return None,
                    Err(e) => Err(e),
                };
                match m {
                    Ok(m) => Some((Ok(m), Some((reader, stop)))),
                    Err(e) => {
                        if !matches!(e, framed::FrameError::Io(_)) {
                            warn!(error = %e, "framed replication stream: bad frame, stream ended");
                            *broke.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.status());
                        }
                        Some((Err(e.status()), None))
                    }
                }
            }
        },
    ))
}

/// Writes acknowledgements as they come, everything ready in one write, and a ping after a third
/// of the peer timeout without one. An error ends the stream with an error frame.
async fn write_acks(
    mut acks: mpsc::Receiver<Result<pb::ReplicationAck, Status>>,
    mut w: WriteHalf<ServerIo>,
    limit: Duration,
    broke: &Broke,
) {
    // A frame at least every half of the peer timeout: a ping at a tick with nothing written
    // since the tick before (one timer for the stream, not one per acknowledgement).
    let ping = limit / 4;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + ping, ping);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut quiet = true;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let first = tokio::select! {
            biased;
            a = acks.recv() => a,
            _ = tick.tick() => {
                if quiet {
                    framed::put_frame(&mut buf, Kind::Ping, &[]);
                    if write_within(&mut w, &buf, limit).await.is_err() {
                        return;
                    }
                    buf.clear();
                }
                quiet = true;
                continue;
            }
        };
        let Some(mut next) = first else {
            // The tail is acknowledged: now say why the stream ended, if a bad frame ended it.
            let why = broke.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(s) = why {
                framed::put_frame(&mut buf, Kind::Error, &framed::error_payload(&s));
                let _ = write_within(&mut w, &buf, limit).await;
            }
            break;
        };
        let mut ended = false;
        loop {
            match next {
                Ok(a) => framed::put_message(&mut buf, Kind::Ack, &a),
                Err(s) => {
                    framed::put_frame(&mut buf, Kind::Error, &framed::error_payload(&s));
                    ended = true;
                    break;
                }
            }
            match acks.try_recv() {
                Ok(a) => next = a,
                Err(_) => break,
            }
        }
        if let Err(e) = write_within(&mut w, &buf, limit).await {
            debug!(error = %e, "framed replication stream: acknowledgement write failed");
            return;
        }
        quiet = false;
        buf.clear();
        if ended {
            break;
        }
    }
    let _ = w.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{authz::Me, pb::replication_message::Body, volume::Volume};
    use bytes::BufMut;
    use tandem_api::{
        tls::{
            server::{incoming, AcceptOptions},
            Ca, ClientTls, Identity, TlsSource, VolumeRef,
        },
        Reason,
    };
    use tokio_stream::StreamExt;

    const BS: usize = crate::geometry::BLOCK_SIZE as usize;
    const TOKEN: &str = "tok";
    const KA: (Duration, Duration, u32) = (Duration::from_secs(5), Duration::from_secs(1), 2);

    /// A secondary's receiver behind the framed server on a real listener.
    struct Rig {
        vol: Arc<Volume>,
        svc: Arc<PeerService>,
        addr: String,
        rt: tokio::runtime::Runtime,
        _stop: watch::Sender<bool>,
    }

    fn rig(dir: &std::path::Path, tls: Option<TlsSource>, me: Option<Me>) -> Rig {
        let vol = Volume::open(&crate::takeover::tests::config(dir)).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let svc = Arc::new(PeerService::new(
            Arc::clone(&vol),
            Duration::from_millis(20),
            Duration::from_secs(30),
        ));
        let server = Arc::new(Server {
            svc: Arc::clone(&svc),
            auth: AuthInterceptor::new(Some(TOKEN.into())),
            authz: Authz::new(me),
            message_cap: 1 << 20,
            hello_timeout: Duration::from_secs(5),
            peer_timeout: Duration::from_secs(30),
        });
        let (stop_tx, stop) = watch::channel(false);
        let addr = rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap().to_string();
            let (tx, rx) = mpsc::channel(4);
            let opts = AcceptOptions {
                framed: Some(tx),
                ..AcceptOptions::new(tls)
            };
            let mut grpc = Box::pin(incoming(l, opts, |_| {}));
            tokio::spawn(async move { while grpc.next().await.is_some() {} });
            tokio::spawn(serve_all(rx, server, stop));
            addr
        });
        Rig {
            vol,
            svc,
            addr,
            rt,
            _stop: stop_tx,
        }
    }

    fn image(b: u64) -> pb::ReplicationMessage {
        let data = bytes::Bytes::from(vec![0xab; BS]);
        pb::ReplicationMessage {
            volume: "v".into(),
            epoch: 1,
            body: Some(Body::Block(pb::BlockImage {
                block: b,
                generation: 5,
                crc32c: crc32c::crc32c(&data),
                data,
                lazy: false,
            })),
        }
    }

    /// Opens a framed stream as `tls` with `token`, sends block 3's image at once, and returns
    /// every frame the server answered until it closed (or the durable ack naming block 3).
    fn exchange(
        r: &Rig,
        tls: Option<&ClientTls>,
        token: Option<&str>,
    ) -> Vec<(Kind, bytes::Bytes)> {
        r.rt.block_on(async {
            let io = framed::open(&r.addr, tls, token, Duration::from_secs(5), KA)
                .await
                .unwrap();
            let (rd, mut wr) = tokio::io::split(io);
            let mut buf = BytesMut::new();
            framed::put_message(&mut buf, Kind::Message, &image(3));
            wr.write_all(&buf).await.unwrap();
            let mut rd = FrameReader::new(rd, 1 << 21);
            let mut got = Vec::new();
            loop {
                let f = tokio::time::timeout(Duration::from_secs(10), rd.next())
                    .await
                    .expect("the server said nothing for 10 s");
                let Some(f) = f.unwrap() else { return got };
                if f.0 == Kind::Ack {
                    let a: pb::ReplicationAck = framed::decode_pb("ack", f.1.clone()).unwrap();
                    if a.blocks == [3] {
                        got.push(f);
                        return got;
                    }
                }
                got.push(f);
            }
        })
    }

    /// The one error frame of a refused stream, and proof that nothing reached the receiver.
    fn refused(r: &Rig, frames: Vec<(Kind, bytes::Bytes)>) -> Status {
        assert_eq!(frames.len(), 1, "more than the refusal: {frames:?}");
        let (k, p) = frames.into_iter().next().unwrap();
        assert_eq!(k, Kind::Error);
        assert_eq!(r.svc.streams(), 0, "a refused stream reached the receiver");
        let mut buf = vec![0u8; BS];
        r.vol.read_local(&mut buf, 3 * BS as u64).unwrap();
        assert!(
            buf.iter().all(|&b| b == 0),
            "a refused stream wrote block 3"
        );
        framed::status_of(p).unwrap()
    }

    /// The right token streams (the hello ack, then block 3 durable); none or a wrong one gets
    /// the gRPC call's UNAUTHENTICATED in an error frame and nothing is applied.
    #[test]
    fn the_token_is_checked_as_the_grpc_calls() {
        let d = tempfile::tempdir().unwrap();
        let r = rig(d.path(), None, None);
        for token in [None, Some("wrong"), Some("")] {
            let s = refused(&r, exchange(&r, None, token));
            assert_eq!(s.code(), tonic::Code::Unauthenticated, "{token:?}: {s:?}");
            assert_eq!(Reason::of(&s), Some(Reason::Unauthenticated));
            assert_eq!(s.message(), "missing or wrong volume token");
        }
        let frames = exchange(&r, None, Some(TOKEN));
        assert_eq!(frames.first().map(|f| f.0), Some(Kind::Ack), "{frames:?}");
        let hello: pb::ReplicationAck = framed::decode_pb("ack", frames[0].1.clone()).unwrap();
        assert_eq!(hello.role, pb::Role::Secondary as i32);
        assert_eq!(r.svc.streams(), 1);
        let mut buf = vec![0u8; BS];
        r.vol.read_local(&mut buf, 3 * BS as u64).unwrap();
        assert!(
            buf.iter().all(|&b| b == 0xab),
            "block 3 was acknowledged and not written"
        );
    }

    /// With TLS, the connection's identity meets the rights table: the volume's other engine
    /// streams, a CSI plugin is PERMISSION_DENIED and plaintext UNAUTHENTICATED, as for the call.
    #[test]
    fn the_identity_is_checked_as_the_grpc_calls() {
        let d = tempfile::tempdir().unwrap();
        let ca = Ca::generate("test CA", Duration::from_secs(3600)).unwrap();
        let vol = VolumeRef::new("ns", "vol");
        let engine = Identity::Engine {
            volume: vol.clone(),
        };
        let issue = |id: &Identity| ca.issue(id, &[], Duration::from_secs(3600)).unwrap();
        let s = issue(&engine);
        let server = TlsSource::from_pem(ca.cert_pem(), &s.cert_pem, &s.key_pem).unwrap();
        let client = |id: &Identity| {
            let c = issue(id);
            ClientTls::from_pem(ca.cert_pem(), &c.cert_pem, &c.key_pem).unwrap()
        };
        let me = Me {
            volume: vol.clone(),
            node: None,
        };
        let r = rig(d.path(), Some(server), Some(me));
        let csi = Identity::Csi {
            volume: vol,
            node: "n".into(),
        };
        let s = refused(&r, exchange(&r, Some(&client(&csi)), Some(TOKEN)));
        assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
        assert_eq!(Reason::of(&s), Some(Reason::PermissionDenied));
        assert!(s.message().contains("Peer.Replicate"), "{s:?}");
        let s = refused(&r, exchange(&r, None, Some(TOKEN)));
        assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}");
        assert!(s.message().contains("plaintext"), "{s:?}");
        // The token is checked first, as the interceptor runs before the rights.
        let s = refused(&r, exchange(&r, Some(&client(&csi)), Some("wrong")));
        assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}");
        let frames = exchange(&r, Some(&client(&engine)), Some(TOKEN));
        assert_eq!(frames.first().map(|f| f.0), Some(Kind::Ack), "{frames:?}");
        assert_eq!(r.svc.streams(), 1);
    }

    /// A frame over the cap ends the stream with OUT_OF_RANGE in an error frame; what came
    /// before it is applied, nothing of it.
    #[test]
    fn an_oversized_frame_ends_the_stream_with_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let r = rig(d.path(), None, None);
        let frames = r.rt.block_on(async {
            let io = framed::open(&r.addr, None, Some(TOKEN), Duration::from_secs(5), KA)
                .await
                .unwrap();
            let (rd, mut wr) = tokio::io::split(io);
            let mut buf = BytesMut::new();
            // Only a header: a length over the cap is refused before anything else arrives.
            buf.put_u32_le(u32::try_from(framed::frame_cap(1 << 20) + 1).unwrap());
            buf.put_u8(Kind::Message as u8);
            wr.write_all(&buf).await.unwrap();
            let mut rd = FrameReader::new(rd, 1 << 21);
            let mut got = Vec::new();
            while let Some(f) = tokio::time::timeout(Duration::from_secs(10), rd.next())
                .await
                .expect("the server neither refused nor closed")
                .unwrap()
            {
                got.push(f);
            }
            got
        });
        let kinds: Vec<Kind> = frames.iter().map(|f| f.0).collect();
        assert_eq!(kinds.first(), Some(&Kind::Ack), "no hello: {kinds:?}");
        assert_eq!(
            kinds.last(),
            Some(&Kind::Error),
            "no error frame: {kinds:?}"
        );
        let s = framed::status_of(frames.last().unwrap().1.clone()).unwrap();
        assert_eq!(s.code(), tonic::Code::OutOfRange, "{s:?}");
        assert!(s.message().contains("over the cap"), "{s:?}");
    }
}
