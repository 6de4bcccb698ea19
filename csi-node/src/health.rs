//! Liveness endpoint: `GET /healthz` (or `/livez`) answers 200 while the state directory takes writes and
//! the CSI socket accepts connections, 503 otherwise; any other path is 404. One request per connection.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use axum::{extract::State, http::StatusCode, routing::any, Router};
use tandem_api::http;
use tokio::net::{TcpListener, UnixStream};

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

fn router(checks: HealthChecks) -> Router {
    let router = Router::new()
        .route("/healthz", any(healthz))
        .route("/livez", any(healthz))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(checks);
    http::one_request_per_connection(router)
}

async fn healthz(State(checks): State<HealthChecks>) -> (StatusCode, String) {
    match checks.check().await {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(why) => {
            tracing::warn!("liveness check failed: {why}");
            (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"))
        }
    }
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, checks: HealthChecks) {
    if let Err(e) = http::serve(listener, router(checks), std::future::pending()).await {
        tracing::warn!("health endpoint: {e}");
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

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
