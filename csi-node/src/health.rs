//! Liveness endpoint: `GET /healthz` answers 200 while the state directory takes writes and the CSI
//! socket accepts connections, 503 otherwise. Plain HTTP/1.1, one request per connection.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};

use crate::service::state_dir_writable;

#[derive(Clone, Debug)]
pub struct HealthChecks {
    pub state_dir: PathBuf,
    pub csi_socket: PathBuf,
}

impl HealthChecks {
    /// `Ok` when healthy, else the reason.
    pub async fn check(&self) -> Result<(), String> {
        let dir = self.state_dir.clone();
        tokio::task::spawn_blocking(move || state_dir_writable(&dir))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("state dir {}: {e}", self.state_dir.display()))?;
        tokio::time::timeout(
            Duration::from_secs(2),
            UnixStream::connect(&self.csi_socket),
        )
        .await
        .map_err(|_| "CSI socket: connect timed out".to_string())?
        .map_err(|e| format!("CSI socket {}: {e}", self.csi_socket.display()))?;
        Ok(())
    }
}

async fn answer(mut conn: TcpStream, checks: HealthChecks) -> std::io::Result<()> {
    let mut buf = vec![0u8; 2048];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let head = String::from_utf8_lossy(&buf[..n]);
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = if path == "/healthz" || path == "/livez" {
        match checks.check().await {
            Ok(()) => ("200 OK", "ok\n".to_string()),
            Err(why) => {
                tracing::warn!("liveness check failed: {why}");
                ("503 Service Unavailable", format!("{why}\n"))
            }
        }
    } else {
        ("404 Not Found", "not found\n".to_string())
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(resp.as_bytes()).await?;
    conn.shutdown().await
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, checks: HealthChecks) {
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                let c = checks.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(conn, c).await {
                        tracing::debug!("health connection: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("health listener: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

pub async fn bind(addr: &str) -> std::io::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr).await?;
    let a = l.local_addr()?;
    Ok((l, a))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn healthz_follows_the_socket_and_the_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("csi.sock");
        let checks = HealthChecks {
            state_dir: dir.path().to_path_buf(),
            csi_socket: sock.clone(),
        };
        let (l, addr) = bind("127.0.0.1:0").await.unwrap();
        let task = tokio::spawn(serve(l, checks));
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 503"));
        let _listener = tokio::net::UnixListener::bind(&sock).unwrap();
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/other").await.starts_with("HTTP/1.1 404"));
        task.abort();
    }
}
