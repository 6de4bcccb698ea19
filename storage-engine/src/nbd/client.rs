//! A small NBD client (fixed newstyle, OPT_GO, one request at a time) for the demo and the tests.
//! The CSI plugin has its own pipelined client; this one favours plainness.

use std::io;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::proto as p;

/// An NBD error reply: the errno the server sent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("NBD: {0}")]
    Io(#[from] io::Error),
    #[error("NBD server refused the export: {0}")]
    Refused(String),
    #[error("NBD request failed with errno {0}")]
    Errno(u32),
    #[error("NBD protocol error: {0}")]
    Protocol(String),
}

pub struct NbdClient {
    sock: TcpStream,
    size: u64,
    handle: u64,
}

impl NbdClient {
    /// Connects to `addr` and opens `export` with OPT_GO.
    pub async fn connect(addr: &str, export: &str) -> Result<Self, ClientError> {
        let mut sock = TcpStream::connect(addr).await?;
        sock.set_nodelay(true)?;
        let magic = sock.read_u64().await?;
        let opt = sock.read_u64().await?;
        if magic != p::NBDMAGIC || opt != p::IHAVEOPT {
            return Err(ClientError::Protocol("not an NBD newstyle server".into()));
        }
        let _flags = sock.read_u16().await?;
        sock.write_u32(p::CLIENT_FIXED_NEWSTYLE | p::CLIENT_NO_ZEROES)
            .await?;
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        sock.write_u64(p::IHAVEOPT).await?;
        sock.write_u32(p::OPT_GO).await?;
        sock.write_u32(data.len() as u32).await?;
        sock.write_all(&data).await?;
        let mut size = None;
        loop {
            let magic = sock.read_u64().await?;
            let _opt = sock.read_u32().await?;
            let kind = sock.read_u32().await?;
            let len = sock.read_u32().await?;
            if magic != p::OPT_REPLY_MAGIC || len > p::MAX_OPTION_LEN {
                return Err(ClientError::Protocol("bad option reply".into()));
            }
            let mut body = vec![0u8; len as usize];
            sock.read_exact(&mut body).await?;
            match kind {
                p::REP_ACK => break,
                p::REP_INFO if body.len() >= 12 && body[0..2] == p::INFO_EXPORT.to_be_bytes() => {
                    let mut s = [0u8; 8];
                    s.copy_from_slice(&body[2..10]);
                    size = Some(u64::from_be_bytes(s));
                }
                p::REP_INFO => {}
                _ => return Err(ClientError::Refused(String::from_utf8_lossy(&body).into())),
            }
        }
        let size = size.ok_or_else(|| ClientError::Protocol("no export size".into()))?;
        Ok(Self {
            sock,
            size,
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
    ) -> Result<Vec<u8>, ClientError> {
        self.handle += 1;
        let req = p::Request {
            flags: 0,
            kind,
            handle: self.handle,
            offset,
            length,
        };
        let mut msg = req.encode().to_vec();
        if let Some(d) = payload {
            msg.extend_from_slice(d);
        }
        self.sock.write_all(&msg).await?;
        let magic = self.sock.read_u32().await?;
        let err = self.sock.read_u32().await?;
        let handle = self.sock.read_u64().await?;
        if magic != p::SIMPLE_REPLY_MAGIC || handle != self.handle {
            return Err(ClientError::Protocol("bad reply header".into()));
        }
        if err != 0 {
            return Err(ClientError::Errno(err));
        }
        let mut data = Vec::new();
        if kind == p::CMD_READ {
            data = vec![0u8; length as usize];
            self.sock.read_exact(&mut data).await?;
        }
        Ok(data)
    }

    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        self.request(p::CMD_READ, offset, len, None).await
    }

    pub async fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        self.request(p::CMD_WRITE, offset, data.len() as u32, Some(data))
            .await
            .map(|_| ())
    }

    pub async fn flush(&mut self) -> Result<(), ClientError> {
        self.request(p::CMD_FLUSH, 0, 0, None).await.map(|_| ())
    }

    pub async fn trim(&mut self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.request(p::CMD_TRIM, offset, len, None)
            .await
            .map(|_| ())
    }

    pub async fn write_zeroes(&mut self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.request(p::CMD_WRITE_ZEROES, offset, len, None)
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
    ) -> Result<u64, ClientError> {
        self.handle += 1;
        let req = p::Request {
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
    ) -> Result<(u64, u32, Vec<u8>), ClientError> {
        let magic = self.sock.read_u32().await?;
        let err = self.sock.read_u32().await?;
        let handle = self.sock.read_u64().await?;
        if magic != p::SIMPLE_REPLY_MAGIC {
            return Err(ClientError::Protocol("bad reply header".into()));
        }
        let mut data = Vec::new();
        if err == 0 {
            data = vec![0u8; read_len(handle) as usize];
            self.sock.read_exact(&mut data).await?;
        }
        Ok((handle, err, data))
    }

    pub async fn disconnect(mut self) -> Result<(), ClientError> {
        let req = p::Request {
            flags: 0,
            kind: p::CMD_DISC,
            handle: 0,
            offset: 0,
            length: 0,
        };
        self.sock.write_all(&req.encode()).await?;
        Ok(())
    }
}
