//! The client's side of the NBD wire format: the fixed-newstyle handshake with `NBD_OPT_GO`
//! ([`Negotiation`], no I/O, with a blocking driver [`handshake`] and an async one
//! [`handshake_async`]), request headers ([`super::Request::encode`]) and reply headers
//! ([`super::SimpleReply::parse`]). The CSI plugin's pipelined client, the campaign's clients and
//! [`NbdClient`] (a plain async client for tools and tests) all speak through it.

use std::io::{self, Read, Write};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use super::{
    be_u16, be_u32, be_u64, Request, SimpleReply, CMD_DISC, CMD_FLUSH, CMD_READ, CMD_TRIM,
    CMD_WRITE, CMD_WRITE_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_BLOCK_SIZE,
    INFO_EXPORT, MAX_OPTION_LEN, MAX_PAYLOAD, NBDMAGIC, OPT_ABORT, OPT_GO, OPT_REPLY_MAGIC,
    REP_ACK, REP_ERR_POLICY, REP_FLAG_ERROR, REP_INFO, TFLAG_HAS_FLAGS, TFLAG_READ_ONLY,
};

/// Option replies one OPT_GO may take (a real server sends a handful); a server that keeps
/// sending them is broken, not slow, and the handshake fails instead of looping.
const MAX_OPTION_REPLIES: usize = 64;

/// What `NBD_OPT_GO` told the client about the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_payload: u32,
}

impl ExportInfo {
    pub fn read_only(&self) -> bool {
        self.flags & TFLAG_READ_ONLY != 0
    }
    pub fn can(&self, flag: u16) -> bool {
        self.flags & TFLAG_HAS_FLAGS != 0 && self.flags & flag != 0
    }
}

/// Why a client's handshake or request failed.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("NBD connection: {0}")]
    Io(#[from] io::Error),
    #[error("NBD protocol violation: {0}")]
    Protocol(String),
    #[error("NBD server refused export {export:?}: {reason}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Refused {
        export: String,
        reason: &'static str,
        message: String,
        /// The reply type (`NBD_REP_ERR_*`).
        code: u32,
    },
    #[error("NBD request failed with errno {0}")]
    Errno(u32),
}

impl NbdError {
    /// True when retrying cannot help until the server changes its mind (it named a reason, e.g.
    /// "this engine is the secondary").
    pub fn is_refusal(&self) -> bool {
        matches!(self, NbdError::Refused { .. })
    }

    /// True when the server refused the export by policy (`NBD_REP_ERR_POLICY`): the engine is
    /// fenced or a secondary, a role and not a passing state such as a shutdown.
    pub fn is_policy_refusal(&self) -> bool {
        matches!(self, NbdError::Refused { code, .. } if *code == REP_ERR_POLICY)
    }
}

/// The spec's name of an `NBD_REP_ERR_*` reply type.
pub fn rep_error_name(code: u32) -> &'static str {
    match code & !REP_FLAG_ERROR {
        1 => "unsupported option",
        2 => "forbidden by policy",
        3 => "invalid request",
        4 => "unsupported on this platform",
        5 => "TLS required",
        6 => "unknown export",
        7 => "server shutting down",
        8 => "block size negotiation required",
        9 => "request too big",
        _ => "error",
    }
}

/// `NBD_OPT_ABORT`: what a client sends when it leaves during the handshake.
pub fn abort_option() -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[8..12].copy_from_slice(&OPT_ABORT.to_be_bytes());
    b
}

/// The client's side of the handshake, as a state machine without I/O. A driver reads
/// [`GREETING_LEN`] bytes and sends what [`Negotiation::greeting`] returns, then
/// for each option reply reads [`REPLY_HEADER_LEN`] bytes, the payload length
/// [`Negotiation::reply_header`] returns, and hands it to [`Negotiation::reply_body`], until that
/// gives the export. On a refusal it should send [`abort_option`].
#[derive(Debug)]
pub struct Negotiation<'a> {
    export: &'a str,
    infos: &'a [u16],
    replies: usize,
    reply_type: u32,
    size_flags: Option<(u64, u16)>,
    min_block: u32,
    preferred_block: u32,
    max_payload: u32,
}

/// The server's greeting: NBDMAGIC, IHAVEOPT and its handshake flags.
pub const GREETING_LEN: usize = 18;
/// An option reply header: magic, option, reply type and payload length.
pub const REPLY_HEADER_LEN: usize = 20;

impl<'a> Negotiation<'a> {
    /// Opens `export`, asking for the info types `infos` besides `NBD_INFO_EXPORT` (the CSI
    /// plugin asks for `NBD_INFO_BLOCK_SIZE`).
    pub fn new(export: &'a str, infos: &'a [u16]) -> Self {
        Negotiation {
            export,
            infos,
            replies: 0,
            reply_type: 0,
            size_flags: None,
            min_block: 1,
            preferred_block: 4096,
            max_payload: 0,
        }
    }

    /// Checks the server's greeting; returns the client flags and the `NBD_OPT_GO` to send.
    pub fn greeting(&mut self, g: &[u8; GREETING_LEN]) -> Result<Vec<u8>, NbdError> {
        if be_u64(&g[0..8]) != NBDMAGIC {
            return Err(NbdError::Protocol("missing NBDMAGIC".into()));
        }
        if be_u64(&g[8..16]) != IHAVEOPT {
            return Err(NbdError::Protocol(
                "server speaks the old-style protocol; fixed newstyle is required".into(),
            ));
        }
        let server_flags = be_u16(&g[16..18]);
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(NbdError::Protocol(
                "server does not support fixed newstyle".into(),
            ));
        }
        let name = self.export.as_bytes();
        let too_long = || NbdError::Protocol("export name too long".into());
        let name_len = u32::try_from(name.len()).map_err(|_| too_long())?;
        let infos = u16::try_from(self.infos.len()).map_err(|_| too_long())?;
        let payload_len = name.len() + 6 + 2 * self.infos.len();
        let payload_len32 = u32::try_from(payload_len).map_err(|_| too_long())?;
        let mut out = Vec::with_capacity(20 + payload_len);
        let client_flags = u32::from(server_flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        out.extend_from_slice(&client_flags.to_be_bytes());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&OPT_GO.to_be_bytes());
        out.extend_from_slice(&payload_len32.to_be_bytes());
        out.extend_from_slice(&name_len.to_be_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(&infos.to_be_bytes());
        for i in self.infos {
            out.extend_from_slice(&i.to_be_bytes());
        }
        Ok(out)
    }

    /// Checks an option reply header; returns the length of the payload that follows.
    pub fn reply_header(&mut self, h: &[u8; REPLY_HEADER_LEN]) -> Result<usize, NbdError> {
        if self.replies == MAX_OPTION_REPLIES {
            return Err(NbdError::Protocol(format!(
                "more than {MAX_OPTION_REPLIES} replies to NBD_OPT_GO"
            )));
        }
        self.replies += 1;
        if be_u64(&h[0..8]) != OPT_REPLY_MAGIC {
            return Err(NbdError::Protocol("bad option reply magic".into()));
        }
        let option = be_u32(&h[8..12]);
        self.reply_type = be_u32(&h[12..16]);
        let len = be_u32(&h[16..20]);
        if option != OPT_GO {
            return Err(NbdError::Protocol(format!(
                "reply for option {option}, expected {OPT_GO}"
            )));
        }
        if len > MAX_OPTION_LEN {
            return Err(NbdError::Protocol(format!("option reply of {len} bytes")));
        }
        Ok(len as usize)
    }

    /// Takes the payload of the reply whose header came last: `Some(export)` once the server
    /// acknowledged, `None` when more replies follow.
    pub fn reply_body(&mut self, body: &[u8]) -> Result<Option<ExportInfo>, NbdError> {
        let rep = self.reply_type;
        if rep & REP_FLAG_ERROR != 0 {
            return Err(NbdError::Refused {
                export: self.export.to_string(),
                reason: rep_error_name(rep),
                message: String::from_utf8_lossy(body).trim().to_string(),
                code: rep,
            });
        }
        match rep {
            REP_INFO => {
                if body.len() < 2 {
                    return Err(NbdError::Protocol("short NBD_REP_INFO".into()));
                }
                let kind = be_u16(&body[0..2]);
                let rest = &body[2..];
                match kind {
                    INFO_EXPORT if rest.len() >= 10 => {
                        self.size_flags = Some((be_u64(&rest[0..8]), be_u16(&rest[8..10])));
                    }
                    INFO_BLOCK_SIZE if rest.len() >= 12 => {
                        self.min_block = be_u32(&rest[0..4]);
                        self.preferred_block = be_u32(&rest[4..8]);
                        self.max_payload = be_u32(&rest[8..12]);
                    }
                    INFO_EXPORT | INFO_BLOCK_SIZE => {
                        return Err(NbdError::Protocol(format!("short info block {kind}")))
                    }
                    _ => {} // information we did not ask for: ignore, as the spec allows
                }
                Ok(None)
            }
            REP_ACK => {
                let (size, flags) = self.size_flags.ok_or_else(|| {
                    NbdError::Protocol("NBD_OPT_GO without NBD_INFO_EXPORT".into())
                })?;
                Ok(Some(ExportInfo {
                    size,
                    flags,
                    min_block: self.min_block.max(1),
                    preferred_block: self.preferred_block.max(1),
                    // The spec's default when the server does not say.
                    max_payload: if self.max_payload == 0 {
                        MAX_PAYLOAD
                    } else {
                        self.max_payload
                    },
                }))
            }
            other => Err(NbdError::Protocol(format!(
                "unexpected option reply type {other}"
            ))),
        }
    }
}

/// Runs the handshake for `export` on a fresh blocking stream (see [`Negotiation::new`]).
pub fn handshake<S: Read + Write>(
    s: &mut S,
    export: &str,
    infos: &[u16],
) -> Result<ExportInfo, NbdError> {
    let mut n = Negotiation::new(export, infos);
    let mut greeting = [0u8; GREETING_LEN];
    s.read_exact(&mut greeting)?;
    s.write_all(&n.greeting(&greeting)?)?;
    s.flush()?;
    loop {
        let mut h = [0u8; REPLY_HEADER_LEN];
        s.read_exact(&mut h)?;
        let mut body = vec![0u8; n.reply_header(&h)?];
        s.read_exact(&mut body)?;
        match n.reply_body(&body) {
            Ok(Some(info)) => return Ok(info),
            Ok(None) => {}
            Err(e) => {
                if e.is_refusal() {
                    // Tell the server we are leaving; it may already have closed.
                    let _ = s.write_all(&abort_option());
                }
                return Err(e);
            }
        }
    }
}

/// [`handshake`] on an async stream.
pub async fn handshake_async<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
    infos: &[u16],
) -> Result<ExportInfo, NbdError> {
    let mut n = Negotiation::new(export, infos);
    let mut greeting = [0u8; GREETING_LEN];
    s.read_exact(&mut greeting).await?;
    s.write_all(&n.greeting(&greeting)?).await?;
    s.flush().await?;
    loop {
        let mut h = [0u8; REPLY_HEADER_LEN];
        s.read_exact(&mut h).await?;
        let mut body = vec![0u8; n.reply_header(&h)?];
        s.read_exact(&mut body).await?;
        match n.reply_body(&body) {
            Ok(Some(info)) => return Ok(info),
            Ok(None) => {}
            Err(e) => {
                if e.is_refusal() {
                    let _ = s.write_all(&abort_option()).await;
                }
                return Err(e);
            }
        }
    }
}

/// Reads one simple reply header.
pub async fn read_reply<S: AsyncRead + Unpin>(s: &mut S) -> Result<SimpleReply, NbdError> {
    let mut h = [0u8; SimpleReply::LEN];
    s.read_exact(&mut h).await?;
    SimpleReply::parse(&h).map_err(|e| NbdError::Protocol(e.to_string()))
}

/// A plain async NBD client over TCP (one request at a time, or pipelined with
/// [`NbdClient::send`] / [`NbdClient::recv`]), for the demo, tools and tests. The CSI plugin has
/// its own reconnecting client.
pub struct NbdClient {
    sock: TcpStream,
    size: u64,
    handle: u64,
}

impl NbdClient {
    /// Connects to `addr` and opens `export` with OPT_GO.
    pub async fn connect(addr: &str, export: &str) -> Result<Self, NbdError> {
        let mut sock = TcpStream::connect(addr).await?;
        sock.set_nodelay(true)?;
        let info = handshake_async(&mut sock, export, &[]).await?;
        Ok(Self {
            sock,
            size: info.size,
            handle: 0,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    async fn request(
        &mut self,
        kind: u16,
        offset: u64,
        length: u32,
        payload: Option<&[u8]>,
    ) -> Result<Vec<u8>, NbdError> {
        let handle = self.send(kind, 0, offset, length, payload).await?;
        let reply = read_reply(&mut self.sock).await?;
        if reply.handle != handle {
            return Err(NbdError::Protocol(format!(
                "reply for handle {}, expected {handle}",
                reply.handle
            )));
        }
        if reply.error != 0 {
            return Err(NbdError::Errno(reply.error));
        }
        let mut data = Vec::new();
        if kind == CMD_READ {
            data = vec![0u8; length as usize];
            self.sock.read_exact(&mut data).await?;
        }
        Ok(data)
    }

    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, NbdError> {
        self.request(CMD_READ, offset, len, None).await
    }

    pub async fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        let len = u32::try_from(data.len())
            .map_err(|_| NbdError::Protocol(format!("a write of {} bytes", data.len())))?;
        self.request(CMD_WRITE, offset, len, Some(data))
            .await
            .map(|_| ())
    }

    pub async fn flush(&mut self) -> Result<(), NbdError> {
        self.request(CMD_FLUSH, 0, 0, None).await.map(|_| ())
    }

    pub async fn trim(&mut self, offset: u64, len: u32) -> Result<(), NbdError> {
        self.request(CMD_TRIM, offset, len, None).await.map(|_| ())
    }

    pub async fn write_zeroes(&mut self, offset: u64, len: u32) -> Result<(), NbdError> {
        self.request(CMD_WRITE_ZEROES, offset, len, None)
            .await
            .map(|_| ())
    }

    /// Pipelining: sends one request without waiting; returns its handle. Replies come back
    /// through [`NbdClient::recv`] in any order.
    pub async fn send(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<&[u8]>,
    ) -> Result<u64, NbdError> {
        self.handle += 1;
        let req = Request {
            flags,
            kind,
            handle: self.handle,
            offset,
            length,
        };
        self.sock.write_all(&req.encode()).await?;
        if let Some(d) = payload {
            self.sock.write_all(d).await?;
        }
        Ok(self.handle)
    }

    /// Reads one simple reply: (handle, errno, data). `read_len` says how many data bytes
    /// follow a successful reply to that handle (its READ length, else 0).
    pub async fn recv(
        &mut self,
        read_len: impl FnOnce(u64) -> u32,
    ) -> Result<(u64, u32, Vec<u8>), NbdError> {
        let reply = read_reply(&mut self.sock).await?;
        let mut data = Vec::new();
        if reply.error == 0 {
            data = vec![0u8; read_len(reply.handle) as usize];
            self.sock.read_exact(&mut data).await?;
        }
        Ok((reply.handle, reply.error, data))
    }

    pub async fn disconnect(mut self) -> Result<(), NbdError> {
        let req = Request {
            flags: 0,
            kind: CMD_DISC,
            handle: 0,
            offset: 0,
            length: 0,
        };
        self.sock.write_all(&req.encode()).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The client codec against the server codec of this module, over in-memory streams.
    use super::*;
    use crate::nbd::{
        info_block_size, info_export, option_reply, parse_go, parse_option_header, simple_reply,
        CMD_FLAG_FUA, EINVAL, TFLAG_SEND_FLUSH,
    };

    const EXPORT_FLAGS: u16 = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH;

    /// A server built from the server-side codec: fixed newstyle, OPT_GO (or a refusal by
    /// policy), then simple replies over `data`. Returns the flushes it saw.
    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        mut s: S,
        mut data: Vec<u8>,
        refuse: Option<&str>,
    ) -> io::Result<u32> {
        s.write_all(&NBDMAGIC.to_be_bytes()).await?;
        s.write_all(&IHAVEOPT.to_be_bytes()).await?;
        s.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())
            .await?;
        let cflags = s.read_u32().await?;
        assert_eq!(cflags, u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        loop {
            let mut h = [0u8; 16];
            s.read_exact(&mut h).await?;
            let (opt, len) = parse_option_header(&h).map_err(io::Error::other)?;
            let mut payload = vec![0u8; len as usize];
            s.read_exact(&mut payload).await?;
            if opt == OPT_ABORT {
                return Ok(0);
            }
            assert_eq!(opt, OPT_GO);
            let go = parse_go(&payload).map_err(io::Error::other)?;
            assert_eq!(go.name, "vol");
            if let Some(msg) = refuse {
                s.write_all(&option_reply(opt, REP_ERR_POLICY, msg.as_bytes()))
                    .await?;
                continue;
            }
            let info = info_export(data.len() as u64, EXPORT_FLAGS);
            s.write_all(&option_reply(opt, REP_INFO, &info)).await?;
            for i in go.infos {
                if i == INFO_BLOCK_SIZE {
                    let bs = info_block_size(512, 4096, 1 << 20);
                    s.write_all(&option_reply(opt, REP_INFO, &bs)).await?;
                }
            }
            s.write_all(&option_reply(opt, REP_ACK, &[])).await?;
            break;
        }
        let mut flushes = 0;
        loop {
            let mut h = [0u8; Request::LEN];
            s.read_exact(&mut h).await?;
            let req = Request::parse(&h).map_err(io::Error::other)?;
            let (off, len) = (req.offset as usize, req.length as usize);
            if req.kind == CMD_DISC {
                return Ok(flushes);
            }
            if req.validate(data.len() as u64, false).is_err() {
                if req.has_payload() {
                    let mut skip = vec![0u8; len];
                    s.read_exact(&mut skip).await?;
                }
                s.write_all(&simple_reply(EINVAL, req.handle)).await?;
                continue;
            }
            match req.kind {
                CMD_READ => {}
                CMD_WRITE => s.read_exact(&mut data[off..off + len]).await.map(|_| ())?,
                CMD_FLUSH => flushes += 1,
                _ => data[off..off + len].fill(0),
            }
            s.write_all(&simple_reply(0, req.handle)).await?;
            if req.kind == CMD_READ {
                s.write_all(&data[off..off + len]).await?;
            }
        }
    }

    #[tokio::test]
    async fn handshake_and_requests_against_the_server_codec() {
        let (mut c, s) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(serve(s, vec![0u8; 1 << 16], None));
        let info = handshake_async(&mut c, "vol", &[INFO_BLOCK_SIZE])
            .await
            .unwrap();
        assert_eq!(
            info,
            ExportInfo {
                size: 1 << 16,
                flags: EXPORT_FLAGS,
                min_block: 512,
                preferred_block: 4096,
                max_payload: 1 << 20,
            }
        );
        assert!(info.can(TFLAG_SEND_FLUSH) && !info.read_only());
        let req = |kind, flags, handle, offset, length| Request {
            flags,
            kind,
            handle,
            offset,
            length,
        };
        // WRITE, READ it back, FLUSH, a READ out of range.
        let payload: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        c.write_all(&req(CMD_WRITE, CMD_FLAG_FUA, 1, 4096, 4096).encode())
            .await
            .unwrap();
        c.write_all(&payload).await.unwrap();
        assert_eq!(
            read_reply(&mut c).await.unwrap(),
            SimpleReply {
                error: 0,
                handle: 1
            }
        );
        c.write_all(&req(CMD_READ, 0, 2, 4096, 4096).encode())
            .await
            .unwrap();
        assert_eq!(read_reply(&mut c).await.unwrap().handle, 2);
        let mut back = vec![0u8; 4096];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(back, payload);
        c.write_all(&req(CMD_FLUSH, 0, 3, 0, 0).encode())
            .await
            .unwrap();
        assert_eq!(read_reply(&mut c).await.unwrap().error, 0);
        c.write_all(&req(CMD_READ, 0, 4, 1 << 16, 1).encode())
            .await
            .unwrap();
        assert_eq!(read_reply(&mut c).await.unwrap().error, EINVAL);
        c.write_all(&req(CMD_DISC, 0, 0, 0, 0).encode())
            .await
            .unwrap();
        assert_eq!(server.await.unwrap().unwrap(), 1);
    }

    #[tokio::test]
    async fn the_async_client_reads_what_it_wrote() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            serve(s, vec![0u8; 1 << 16], None).await
        });
        let mut c = NbdClient::connect(&addr, "vol").await.unwrap();
        assert_eq!(c.size(), 1 << 16);
        c.write(512, &[7u8; 1024]).await.unwrap();
        assert_eq!(c.read(0, 2048).await.unwrap()[512..1536], [7u8; 1024]);
        c.write_zeroes(512, 512).await.unwrap();
        assert_eq!(c.read(512, 512).await.unwrap(), vec![0u8; 512]);
        c.flush().await.unwrap();
        assert!(matches!(
            c.read(1 << 16, 1).await,
            Err(NbdError::Errno(EINVAL))
        ));
        c.disconnect().await.unwrap();
        assert_eq!(server.await.unwrap().unwrap(), 1);
    }

    #[test]
    fn a_refusal_by_policy_names_the_reason_and_aborts() {
        let (mut c, s) = std::os::unix::net::UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                s.set_nonblocking(true).unwrap();
                let s = tokio::net::UnixStream::from_std(s).unwrap();
                serve(s, vec![0u8; 4096], Some("volume vol is secondary")).await
            })
        });
        let err = handshake(&mut c, "vol", &[]).unwrap_err();
        assert!(err.is_refusal() && err.is_policy_refusal(), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("forbidden by policy") && msg.contains("secondary"),
            "{msg}"
        );
        // The server saw NBD_OPT_ABORT and ended the handshake cleanly.
        assert_eq!(server.join().unwrap().unwrap(), 0);
    }

    #[test]
    fn the_greeting_is_checked_and_the_go_request_is_the_servers_format() {
        let mut g = [0u8; GREETING_LEN];
        g[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
        g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        g[16..18].copy_from_slice(&FLAG_FIXED_NEWSTYLE.to_be_bytes());
        let mut n = Negotiation::new("vol@3", &[INFO_BLOCK_SIZE]);
        let out = n.greeting(&g).unwrap();
        // Client flags: only what the server offered.
        assert_eq!(out[0..4], u32::from(FLAG_FIXED_NEWSTYLE).to_be_bytes());
        let mut h = [0u8; 16];
        h.copy_from_slice(&out[4..20]);
        let (opt, len) = parse_option_header(&h).unwrap();
        assert_eq!((opt, len as usize), (OPT_GO, out.len() - 20));
        let go = parse_go(&out[20..]).unwrap();
        assert_eq!(
            (go.name.as_str(), go.infos),
            ("vol@3", vec![INFO_BLOCK_SIZE])
        );
        g[0] ^= 1;
        let e = Negotiation::new("v", &[]).greeting(&g).unwrap_err();
        assert!(e.to_string().contains("NBDMAGIC"), "{e}");
    }
}
