//! A gRPC call written frame by frame, for what a well-behaved client library will not send: an HTTP/2
//! `:authority` that is no URI authority (Python gRPC sends the socket path). The request is hand-encoded
//! (HPACK literals, no Huffman, no dynamic table); the answer is read with h2's own frame codec.

use std::{path::Path, time::Duration};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use futures::StreamExt as _;
use h2::frame::Frame;
use tokio::{io::AsyncWriteExt as _, net::UnixStream};

/// What came back for one unary call.
#[derive(Debug)]
pub enum RawAnswer {
    /// A normal HTTP/2 answer: `:status`, the gRPC messages' bytes (frames and all), `grpc-status`.
    Answered {
        status: u16,
        body: Vec<u8>,
        grpc_status: Option<String>,
    },
    /// The server reset the stream (h2 does so for an authority it cannot parse).
    Reset(String),
}

/// Waits for a CSI server on `socket` (served as `endpoint`, a `unix://` URI), then checks that it answers
/// GetPluginInfo, naming the driver, whatever the client sends as `:authority`: kubelet's `localhost`,
/// Python gRPC's percent-encoded path, grpc-java's bare path and the endpoint URI (h2 alone resets the
/// last three with PROTOCOL_ERROR). Panics with the authority that failed.
pub async fn assert_answers_any_authority(socket: &Path, endpoint: &str) {
    for _ in 0..500 {
        if UnixStream::connect(socket).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let path = socket.display().to_string();
    let encoded = path.replace('/', "%2F");
    for authority in ["localhost", encoded.as_str(), path.as_str(), endpoint] {
        let answer = unary(socket, authority, "/csi.v1.Identity/GetPluginInfo", &[]).await;
        let Ok(RawAnswer::Answered {
            status,
            body,
            grpc_status,
        }) = answer
        else {
            panic!("authority {authority:?}: {answer:?}");
        };
        assert_eq!(
            (status, grpc_status.as_deref()),
            (200, Some("0")),
            "{authority:?}"
        );
        let name = tandem_api::contract::CSI_DRIVER.as_bytes();
        assert!(
            body.windows(name.len()).any(|w| w == name),
            "authority {authority:?}: GetPluginInfo names the driver: {body:?}"
        );
    }
}

/// Calls `path` (`/csi.v1.Identity/GetPluginInfo`) on the gRPC server at `socket` with `:authority`
/// set to `authority` and `message` (an encoded protobuf) as the one request message.
pub async fn unary(
    socket: &Path,
    authority: &str,
    path: &str,
    message: &[u8],
) -> anyhow::Result<RawAnswer> {
    tokio::time::timeout(
        Duration::from_secs(10),
        call(socket, authority, path, message),
    )
    .await
    .context("no answer within 10 s")?
}

async fn call(
    socket: &Path,
    authority: &str,
    path: &str,
    message: &[u8],
) -> anyhow::Result<RawAnswer> {
    let stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("connect {}", socket.display()))?;
    let mut codec = h2::Codec::<_, Bytes>::new(stream);
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 0x4, 0, 0, &[]); // SETTINGS, all defaults
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        block.push(0x00); // literal header field without indexing, new name
        string(&mut block, name.as_bytes());
        string(&mut block, value.as_bytes());
    }
    frame(&mut out, 0x1, 0x4, 1, &block); // HEADERS, END_HEADERS
    let mut body = vec![0u8];
    body.extend_from_slice(&u32::try_from(message.len())?.to_be_bytes());
    body.extend_from_slice(message);
    frame(&mut out, 0x0, 0x1, 1, &body); // DATA, END_STREAM
    codec.get_mut().write_all(&out).await?;

    let mut status = None;
    let mut answer = Vec::new();
    while let Some(frame) = codec.next().await {
        match frame.map_err(|e| anyhow::anyhow!("reading the answer: {e:?}"))? {
            Frame::Settings(s) if !s.is_ack() => {
                let mut ack = Vec::new();
                self::frame(&mut ack, 0x4, 0x1, 0, &[]);
                codec.get_mut().write_all(&ack).await?;
            }
            Frame::Headers(h) => {
                let end = h.is_end_stream();
                let (pseudo, fields) = h.into_parts();
                if let Some(s) = pseudo.status {
                    status = Some(s.as_u16());
                }
                let grpc_status = fields
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                if end {
                    let Some(status) = status else {
                        bail!("the stream ended without a :status");
                    };
                    return Ok(RawAnswer::Answered {
                        status,
                        body: answer,
                        grpc_status,
                    });
                }
            }
            Frame::Data(d) => answer.extend_from_slice(d.payload()),
            Frame::Reset(r) => return Ok(RawAnswer::Reset(format!("{:?}", r.reason()))),
            Frame::GoAway(g) => bail!("the server went away: {:?}", g.reason()),
            _ => {}
        }
    }
    bail!("the connection closed before the answer ended")
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// An HPACK string literal, not Huffman-coded: a 7-bit-prefix length, then the bytes.
fn string(out: &mut Vec<u8>, s: &[u8]) {
    let mut len = s.len();
    if len < 127 {
        out.push(len as u8);
    } else {
        out.push(127);
        len -= 127;
        while len >= 128 {
            out.push((len % 128) as u8 | 0x80);
            len /= 128;
        }
        out.push(len as u8);
    }
    out.extend_from_slice(s);
}
