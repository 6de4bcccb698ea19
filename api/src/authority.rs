//! CSI sockets that accept any `:authority`.
//!
//! A CSI client on a unix socket may send anything as HTTP/2 `:authority`: kubelet sends `localhost`, but
//! Python gRPC sends the percent-encoded socket path and grpc-java the path itself. h2 resets such a stream
//! with PROTOCOL_ERROR before tonic sees it, and has no switch to allow it. So each accepted connection
//! goes through a relay below h2: frames pass byte for byte, except each header block, which is decoded
//! (h2's own HPACK, one decoder per connection, so the client's dynamic table stays in step) and encoded
//! again for the server with an authority h2 accepts: `localhost` in place of one that is not a valid
//! URI authority. Replies pass untouched. Checked by csi-node's `the_plugin_answers_any_authority` and
//! the operator's `the_controller_answers_any_authority` (a raw client, `tandem_testkit::h2raw`), and by
//! every test that calls the sockets with tonic (Huffman strings, the dynamic table, many requests).

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use std::sync::atomic::AtomicU64;

use bytes::{Bytes, BytesMut};
use futures::{FutureExt as _, SinkExt as _, StreamExt as _};
use h2::frame::{BytesStr, Frame};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::{
        unix::{OwnedReadHalf, OwnedWriteHalf},
        UnixListener, UnixStream,
    },
};
use tokio_stream::Stream;

use crate::accept::Backoff;

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
/// What a client's authority becomes when it is not a valid URI authority (kubelet's choice).
const LOCALHOST: &str = "localhost";

/// Accepts on `listener` for tonic's `serve_with_incoming*`: every connection is relayed so that
/// its requests reach tonic with an authority h2 accepts. Failed accepts back off
/// ([`crate::accept::Backoff`]) instead of spinning.
pub fn incoming(listener: UnixListener) -> impl Stream<Item = io::Result<UnixStream>> {
    static ERRORS: AtomicU64 = AtomicU64::new(0);
    let backoff = Backoff::new("csi");
    futures::stream::unfold((listener, backoff), |(listener, mut backoff)| async move {
        loop {
            let relayed = match listener.accept().await {
                Ok((client, _)) => relay(client),
                Err(e) => Err(e),
            };
            match relayed {
                Ok(server_end) => {
                    backoff.succeeded();
                    return Some((Ok(server_end), (listener, backoff)));
                }
                Err(e) => backoff.failed(&e, &ERRORS).await,
            }
        }
    })
}

/// Starts relaying `client`; returns the end tonic serves.
fn relay(client: UnixStream) -> io::Result<UnixStream> {
    let (ours, theirs) = UnixStream::pair()?;
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = ours.into_split();
    tokio::spawn(async move {
        let mut replies = tokio::spawn(copy_replies(server_read, client_write));
        let requests = requests(client_read, server_write);
        tokio::select! {
            result = requests => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "CSI connection: request relay ended");
                }
                // The client is gone or spoke no HTTP/2: let tonic finish its replies, then close.
                let _ = replies.await;
            }
            _ = &mut replies => {}
        }
    });
    Ok(theirs)
}

async fn copy_replies(mut from: OwnedReadHalf, mut to: OwnedWriteHalf) -> io::Result<u64> {
    let copied = tokio::io::copy(&mut from, &mut to).await;
    let _ = to.shutdown().await;
    copied
}

/// Client to server: the preface and every frame, each header block re-encoded.
async fn requests(mut client: OwnedReadHalf, server: OwnedWriteHalf) -> io::Result<()> {
    let mut preface = [0u8; 24];
    client.read_exact(&mut preface).await?;
    let mut out = h2::Codec::<_, Bytes>::new(WriteOnly(server));
    out.get_mut().0.write_all(&preface).await?;
    if &preface != PREFACE {
        // Not HTTP/2 with prior knowledge: h2 answers that itself.
        tokio::io::copy(&mut client, &mut out.get_mut().0).await?;
        return Ok(());
    }
    // h2's frame decoder, fed only this connection's header frames, in order.
    let mut decoder = h2::Codec::<_, Bytes>::new(Fed::default());
    let mut header = [0u8; 9];
    loop {
        match client.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut frame = BytesMut::with_capacity(9 + len);
        frame.extend_from_slice(&header);
        frame.resize(9 + len, 0);
        client.read_exact(&mut frame[9..]).await?;
        let kind = header[3];
        if kind != HEADERS && kind != CONTINUATION {
            out.get_mut().0.write_all(&frame).await?;
            continue;
        }
        decoder.get_mut().0.extend_from_slice(&frame);
        if header[4] & END_HEADERS == 0 {
            continue;
        }
        // The whole block is buffered: h2 decodes it without waiting.
        let decoded = match decoder.next().now_or_never() {
            Some(Some(Ok(frame))) => frame,
            Some(Some(Err(e))) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a header block h2 rejects: {e:?}"),
                ))
            }
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a header block h2 could not decode",
                ))
            }
        };
        let Frame::Headers(mut headers) = decoded else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a client sent a header block that is no HEADERS frame",
            ));
        };
        let pseudo = headers.pseudo_mut();
        if let Some(authority) = &pseudo.authority {
            if http::uri::Authority::try_from(authority.as_ref()).is_err() {
                tracing::trace!(authority = ?authority, "CSI request: authority replaced by localhost");
                pseudo.authority =
                    BytesStr::try_from(Bytes::from_static(LOCALHOST.as_bytes())).ok();
            }
        }
        out.send(Frame::Headers(headers))
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
    }
}

/// Bytes handed to h2's decoder; `Pending` when empty (it is polled only with a whole block).
#[derive(Default)]
struct Fed(BytesMut);

impl AsyncRead for Fed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.0.is_empty() {
            return Poll::Pending;
        }
        let n = self.0.len().min(buf.remaining());
        buf.put_slice(&self.0.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Fed {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The server's write half, for h2's frame encoder (which never reads).
struct WriteOnly(OwnedWriteHalf);

impl AsyncRead for WriteOnly {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for WriteOnly {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
