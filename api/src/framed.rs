//! The framed replication stream: `Peer.Replicate`'s conversation (ReplicationMessage in,
//! ReplicationAck out, the peer's hello ack first) as length-prefixed frames on a raw connection of
//! the engine's gRPC port, outside HTTP/2. TLS connections ask for it by ALPN ([`ALPN`]);
//! plaintext ones open with [`MAGIC`]. The engine routes either away from tonic
//! (`tls::server`), checks the token and the rights table as for the gRPC call, and answers an
//! error frame carrying the same status when it refuses.
//!
//! Wire format, both ways: the client's [`MAGIC`], then the server's [`MAGIC`] (so a client can
//! tell an engine that serves the stream from one that does not), then frames:
//! `len: u32 LE | kind: u8 | payload (len - 1 bytes)`. The client's first frame is a hello
//! carrying the volume token; then messages. The server answers acks, pings while it has nothing
//! to say, and at most one error frame before it closes.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use crate::tls::ClientTls;

/// The TLS ALPN id of the framed replication stream.
pub const ALPN: &[u8] = b"tandem-repl/1";
/// The first bytes each side sends. Its first byte is neither a TLS record's (0x16) nor the
/// HTTP/2 preface's ('P'), so a server routes a plaintext connection on one peeked byte.
pub const MAGIC: [u8; 8] = *b"TNDMRPL1";
/// Length and kind.
pub const HEADER: usize = 5;
/// What a frame may carry beyond a message: a hello's token, an error's message and details.
const SLACK: usize = 64 * 1024;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Client, first frame: the volume token (UTF-8, may be empty).
    Hello = 1,
    /// Client: one `ReplicationMessage`.
    Message = 2,
    /// Server: one `ReplicationAck`.
    Ack = 3,
    /// Server, last frame: the status that ended the stream ([`error_payload`]).
    Error = 4,
    /// Server: nothing to acknowledge, still alive (no payload).
    Ping = 5,
}

impl Kind {
    fn of(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Message,
            3 => Kind::Ack,
            4 => Kind::Error,
            5 => Kind::Ping,
            _ => return None,
        })
    }
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("a frame of zero length")]
    Empty,
    #[error("a frame of {len} bytes, over the cap of {cap}")]
    Oversized { len: usize, cap: usize },
    #[error("a frame of unknown kind {0}")]
    UnknownKind(u8),
    #[error("the connection ended inside a frame ({have} of {want} bytes)")]
    Truncated { have: usize, want: usize },
    #[error("an undecodable {what} frame: {why}")]
    Undecodable { what: &'static str, why: String },
    #[error("reading a frame: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// The status a stream ends with when this frame breaks it.
    pub fn status(&self) -> tonic::Status {
        match self {
            FrameError::Oversized { .. } => tonic::Status::out_of_range(self.to_string()),
            FrameError::Truncated { .. } | FrameError::Io(_) => {
                tonic::Status::unavailable(self.to_string())
            }
            _ => tonic::Status::invalid_argument(self.to_string()),
        }
    }
}

/// The largest frame (length field) a reader with this message cap accepts.
pub fn frame_cap(message_cap: usize) -> usize {
    message_cap.saturating_add(1 + SLACK)
}

/// Takes one whole frame off the front of `buf`, if it holds one. `cap` bounds the length field:
/// a bigger frame is refused before anything is buffered for it.
pub fn decode(buf: &mut BytesMut, cap: usize) -> Result<Option<(Kind, Bytes)>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > cap {
        return Err(FrameError::Oversized { len, cap });
    }
    if buf.len() < HEADER {
        return Ok(None);
    }
    // Garbage is refused at its first byte, not after a length's worth of it.
    let kind = Kind::of(buf[4]).ok_or(FrameError::UnknownKind(buf[4]))?;
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    buf.advance(HEADER);
    Ok(Some((kind, buf.split_to(len - 1).freeze())))
}

/// Appends a frame holding `m`.
pub fn put_message(buf: &mut BytesMut, kind: Kind, m: &impl prost::Message) {
    let n = m.encoded_len();
    buf.reserve(HEADER + n);
    buf.put_u32_le(u32::try_from(n + 1).unwrap_or(u32::MAX));
    buf.put_u8(kind as u8);
    // A BytesMut grows as needed: encoding into it cannot run out of room.
    let _ = m.encode(buf);
}

/// Appends a frame of `kind` holding `payload`.
pub fn put_frame(buf: &mut BytesMut, kind: Kind, payload: &[u8]) {
    buf.reserve(HEADER + payload.len());
    buf.put_u32_le(u32::try_from(payload.len() + 1).unwrap_or(u32::MAX));
    buf.put_u8(kind as u8);
    buf.put_slice(payload);
}

/// An error frame's payload: `code: i32 LE | message len: u32 LE | message | details` (the
/// status's details carry the engine's [`crate::Reason`]).
pub fn error_payload(s: &tonic::Status) -> Vec<u8> {
    let msg = s.message().as_bytes();
    let mut p = Vec::with_capacity(8 + msg.len() + s.details().len());
    p.extend_from_slice(&(s.code() as i32).to_le_bytes());
    p.extend_from_slice(&u32::try_from(msg.len()).unwrap_or(u32::MAX).to_le_bytes());
    p.extend_from_slice(msg);
    p.extend_from_slice(s.details());
    p
}

/// The status an error frame carries.
pub fn status_of(mut p: Bytes) -> Result<tonic::Status, FrameError> {
    let bad = |why: &str| FrameError::Undecodable {
        what: "error",
        why: why.into(),
    };
    if p.len() < 8 {
        return Err(bad("shorter than its header"));
    }
    let code = tonic::Code::from_i32(p.get_i32_le());
    let n = p.get_u32_le() as usize;
    if p.len() < n {
        return Err(bad("message longer than the frame"));
    }
    let msg = String::from_utf8_lossy(&p.split_to(n)).into_owned();
    Ok(tonic::Status::with_details(code, msg, p))
}

/// Decodes a frame's protobuf payload.
pub fn decode_pb<M: prost::Message + Default>(
    what: &'static str,
    p: Bytes,
) -> Result<M, FrameError> {
    M::decode(p).map_err(|e| FrameError::Undecodable {
        what,
        why: e.to_string(),
    })
}

/// Reads frames off a connection, many per read when they are there.
pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    cap: usize,
}

/// Room for the next read: a whole batch of small frames in one syscall.
const READ_CHUNK: usize = 256 * 1024;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// `cap`: the largest length field accepted ([`frame_cap`]).
    pub fn new(io: R, cap: usize) -> Self {
        Self {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
            cap,
        }
    }

    /// The next frame; None at a clean end (between frames).
    pub async fn next(&mut self) -> Result<Option<(Kind, Bytes)>, FrameError> {
        loop {
            if let Some(f) = decode(&mut self.buf, self.cap)? {
                return Ok(Some(f));
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                self.buf.reserve(READ_CHUNK);
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                let want = if self.buf.len() >= 4 {
                    4 + u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                        as usize
                } else {
                    4
                };
                return Err(FrameError::Truncated {
                    have: self.buf.len(),
                    want,
                });
            }
        }
    }
}

/// A connection of the framed stream, plaintext or TLS.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Why [`open`] could not open the framed stream.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The engine does not serve the framed stream (an older engine, or `--repl-transport grpc`):
    /// the gRPC call is the way.
    #[error("the engine at {addr} does not serve the framed replication stream ({why})")]
    Unsupported { addr: String, why: String },
    #[error("cannot open the framed replication stream to {addr}: {why}")]
    Failed { addr: String, why: String },
}

/// TCP (no Nagle, keepalive `(idle, interval, probes)`), TLS as `tls` asking for [`ALPN`], the
/// magic both ways and the hello frame with `token`: a connection ready for messages, whose
/// first frame from the server is its hello ack (or an error frame: a refusal).
pub async fn open(
    addr: &str,
    tls: Option<&ClientTls>,
    token: Option<&str>,
    connect_timeout: Duration,
    keepalive: (Duration, Duration, u32),
) -> Result<Box<dyn Io>, OpenError> {
    let failed = |why: String| OpenError::Failed {
        addr: addr.to_string(),
        why,
    };
    let unsupported = |why: String| OpenError::Unsupported {
        addr: addr.to_string(),
        why,
    };
    let uri: http::Uri = if addr.contains("://") {
        addr.parse()
    } else {
        format!("http://{addr}").parse()
    }
    .map_err(|_| failed("not a host:port".into()))?;
    // The gRPC channels' dialer and socket options (client::channel).
    let mut dial = hyper_util::client::legacy::connect::HttpConnector::new();
    dial.enforce_http(false);
    dial.set_nodelay(true);
    dial.set_connect_timeout(Some(connect_timeout));
    dial.set_keepalive(Some(keepalive.0));
    dial.set_keepalive_interval(Some(keepalive.1));
    dial.set_keepalive_retries(Some(keepalive.2));
    std::future::poll_fn(|cx| tower_service::Service::poll_ready(&mut dial, cx))
        .await
        .map_err(|e| failed(e.to_string()))?;
    let tcp: TcpStream = tower_service::Service::call(&mut dial, uri)
        .await
        .map_err(|e| failed(e.to_string()))?
        .into_inner();
    let mut io: Box<dyn Io> = match tls {
        None => Box::new(tcp),
        Some(tls) => {
            let name =
                rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
            let stream = match crate::tls::client::handshake(tls, true, name, tcp).await {
                Ok((s, _)) => s,
                Err(e) if no_common_protocol(&*e) => return Err(unsupported(e.to_string())),
                Err(e) => return Err(failed(e.to_string())),
            };
            if stream.get_ref().1.alpn_protocol() != Some(ALPN) {
                return Err(unsupported("TLS negotiated another protocol".into()));
            }
            Box::new(stream)
        }
    };
    let mut hello = BytesMut::with_capacity(MAGIC.len() + HEADER + 64);
    hello.put_slice(&MAGIC);
    put_frame(
        &mut hello,
        Kind::Hello,
        token.unwrap_or("").trim().as_bytes(),
    );
    // An older engine closes on what is not HTTP/2 (perhaps before we are done writing), or
    // answers its SETTINGS: either way, not the magic.
    let closed = |e: std::io::Error| unsupported(format!("it closed the connection: {e}"));
    io.write_all(&hello).await.map_err(closed)?;
    io.flush().await.map_err(closed)?;
    let mut magic = [0u8; MAGIC.len()];
    match io.read_exact(&mut magic).await {
        Ok(_) if magic == MAGIC => Ok(io),
        Ok(_) => Err(unsupported("it answered another protocol".into())),
        Err(e) => Err(closed(e)),
    }
}

/// Whether a TLS handshake failed because the server offers none of our ALPN ids.
fn no_common_protocol(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        let r = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|i| i.downcast_ref::<rustls::Error>())
        });
        if matches!(
            r,
            Some(rustls::Error::AlertReceived(
                rustls::AlertDescription::NoApplicationProtocol
            ))
        ) {
            return true;
        }
        next = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{pb, Reason};

    fn msg(n: usize) -> pb::ReplicationMessage {
        pb::ReplicationMessage {
            volume: "v".into(),
            epoch: 3,
            body: Some(pb::replication_message::Body::Block(pb::BlockImage {
                block: 9,
                generation: 4,
                data: vec![7u8; n].into(),
                crc32c: 1,
                lazy: false,
            })),
        }
    }

    #[test]
    fn frames_round_trip_one_at_a_time_and_many_in_one_buffer() {
        let mut buf = BytesMut::new();
        put_message(&mut buf, Kind::Message, &msg(4096));
        put_frame(&mut buf, Kind::Hello, b"token");
        put_frame(&mut buf, Kind::Ping, b"");
        let ack = pb::ReplicationAck {
            epoch: 2,
            applied_seq: 77,
            durable: true,
            ..Default::default()
        };
        put_message(&mut buf, Kind::Ack, &ack);
        // Fed a byte at a time: nothing comes out before a frame is whole.
        let wire = buf.freeze();
        let mut rx = BytesMut::new();
        let mut got = Vec::new();
        for b in wire.iter() {
            rx.put_u8(*b);
            while let Some(f) = decode(&mut rx, frame_cap(1 << 20)).unwrap() {
                got.push(f);
            }
        }
        assert!(rx.is_empty());
        let kinds: Vec<Kind> = got.iter().map(|f| f.0).collect();
        assert_eq!(kinds, [Kind::Message, Kind::Hello, Kind::Ping, Kind::Ack]);
        let m: pb::ReplicationMessage = decode_pb("message", got[0].1.clone()).unwrap();
        assert_eq!(m, msg(4096));
        assert_eq!(&got[1].1[..], b"token");
        assert!(got[2].1.is_empty());
        let a: pb::ReplicationAck = decode_pb("ack", got[3].1.clone()).unwrap();
        assert_eq!(a, ack);
    }

    #[test]
    fn a_zero_length_frame_is_refused() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 0, 2][..]);
        assert!(matches!(decode(&mut buf, 100), Err(FrameError::Empty)));
    }

    #[test]
    fn an_oversized_frame_is_refused_from_its_length_alone() {
        let mut buf = BytesMut::new();
        put_message(&mut buf, Kind::Message, &msg(200_000));
        // Only the length field has arrived: that is enough to refuse it, nothing is buffered.
        let mut head = BytesMut::from(&buf[..4]);
        match decode(&mut head, frame_cap(1024)) {
            Err(FrameError::Oversized { len, cap }) => {
                assert!(len > 200_000);
                assert_eq!(cap, frame_cap(1024));
            }
            other => panic!("an oversized frame was not refused: {other:?}"),
        }
        assert!(head.capacity() < 4096);
        assert_eq!(
            FrameError::Oversized { len: 2, cap: 1 }.status().code(),
            tonic::Code::OutOfRange
        );
    }

    #[test]
    fn garbage_is_refused_at_its_kind_byte_or_its_payload() {
        // An HTTP/2 preface read as a frame: a huge length.
        let mut h2 = BytesMut::from(&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..]);
        assert!(decode(&mut h2, frame_cap(1 << 20)).is_err());
        let mut unknown = BytesMut::from(&[3u8, 0, 0, 0, 99, 1, 2][..]);
        assert!(matches!(
            decode(&mut unknown, 100),
            Err(FrameError::UnknownKind(99))
        ));
        let mut junk = BytesMut::new();
        put_frame(&mut junk, Kind::Message, &[0xff; 16]);
        let (k, p) = decode(&mut junk, 100).unwrap().unwrap();
        assert_eq!(k, Kind::Message);
        let r: Result<pb::ReplicationMessage, _> = decode_pb("message", p);
        assert!(matches!(r, Err(FrameError::Undecodable { .. })));
        assert!(status_of(Bytes::from_static(&[1, 2, 3])).is_err());
    }

    #[test]
    fn a_connection_ending_inside_a_frame_is_truncated_and_between_frames_is_clean() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut buf = BytesMut::new();
        put_message(&mut buf, Kind::Message, &msg(100));
        let whole = buf.len();
        put_message(&mut buf, Kind::Message, &msg(100));
        rt.block_on(async {
            let cut = &buf[..whole + 10];
            let mut r = FrameReader::new(cut, frame_cap(1 << 20));
            assert!(r.next().await.unwrap().is_some());
            match r.next().await {
                Err(FrameError::Truncated { have, want }) => {
                    assert_eq!((have, want), (10, whole))
                }
                other => panic!("a cut frame was not refused: {other:?}"),
            }
            let mut r = FrameReader::new(&buf[..], frame_cap(1 << 20));
            assert!(r.next().await.unwrap().is_some());
            assert!(r.next().await.unwrap().is_some());
            assert!(r.next().await.unwrap().is_none());
        });
    }

    #[test]
    fn an_error_frame_carries_the_code_message_and_reason() {
        let s = Reason::Unauthenticated.status(tonic::Code::Unauthenticated, "missing token");
        let back = status_of(Bytes::from(error_payload(&s))).unwrap();
        assert_eq!(back.code(), tonic::Code::Unauthenticated);
        assert_eq!(back.message(), "missing token");
        assert_eq!(Reason::of(&back), Some(Reason::Unauthenticated));
    }
}
