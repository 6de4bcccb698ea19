//! Prometheus metrics: I/O counters, replication lag and pending blocks, served as text on
//! `--metrics-listen`. Values are read from the volume at scrape time, so the hot path pays nothing.

use std::{fmt::Write as _, sync::Arc};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::watch,
};

use crate::{grpc::status_of, volume::Volume};

/// Renders the current values in the Prometheus text format.
pub fn render(v: &Volume) -> String {
    let s = status_of(v);
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(out, "# HELP tandem_{name} {help}");
        let _ = writeln!(out, "# TYPE tandem_{name} {kind}");
        let _ = writeln!(out, "tandem_{name}{{volume=\"{}\"}} {value}", s.volume);
    };
    metric(
        "bytes_read_total",
        "counter",
        "Bytes read by hosts.",
        s.bytes_read as f64,
    );
    metric(
        "bytes_written_total",
        "counter",
        "Bytes written by hosts.",
        s.bytes_written as f64,
    );
    metric(
        "flushes_total",
        "counter",
        "Host flushes.",
        s.flushes as f64,
    );
    metric(
        "nbd_connections",
        "gauge",
        "Open NBD connections.",
        s.nbd_connections as f64,
    );
    metric("epoch", "gauge", "Current epoch.", s.epoch as f64);
    metric(
        "role",
        "gauge",
        "1 primary, 2 secondary, 3 fenced.",
        f64::from(s.role),
    );
    metric(
        "peer_connected",
        "gauge",
        "1 when the replication link is up.",
        f64::from(u8::from(s.peer_connected)),
    );
    metric(
        "pending_blocks",
        "gauge",
        "Blocks not yet acknowledged by the peer.",
        s.pending_blocks as f64,
    );
    metric(
        "replication_lag_seconds",
        "gauge",
        "Age of the oldest unacknowledged write.",
        s.lag_seconds,
    );
    metric(
        "journal_bytes",
        "gauge",
        "Bytes held in the replication journal.",
        s.journal_bytes as f64,
    );
    metric(
        "replicated_bytes_total",
        "counter",
        "Bytes sent as journal records.",
        s.bytes_replicated as f64,
    );
    metric(
        "resynced_bytes_total",
        "counter",
        "Bytes sent as resync images.",
        s.bytes_resynced as f64,
    );
    metric(
        "applied_seq",
        "gauge",
        "Highest acknowledged (primary) or applied (secondary) seq.",
        s.applied_seq as f64,
    );
    metric(
        "peer_pending_blocks",
        "gauge",
        "After a takeover: blocks whose newest content is still on the old primary.",
        s.peer_pending_blocks as f64,
    );
    metric(
        "overlay_blocks",
        "gauge",
        "Blocks held in the takeover overlay.",
        s.overlay_blocks as f64,
    );
    metric(
        "proxied_reads_total",
        "counter",
        "Blocks read from the old primary by proxied reads.",
        s.proxied_reads as f64,
    );
    metric(
        "proxied_read_errors_total",
        "counter",
        "Blocks whose proxied read failed (deadline or peer error).",
        s.proxied_read_errors as f64,
    );
    metric(
        "lost_blocks",
        "gauge",
        "Blocks lost by a forced promotion.",
        s.lost_blocks as f64,
    );
    out
}

/// A minimal HTTP/1 endpoint: any GET answers with the metrics (`/metrics`) or `ok` (`/healthz`).
pub async fn serve(listener: TcpListener, volume: Arc<Volume>, mut stop: watch::Receiver<bool>) {
    loop {
        let (mut sock, _) = tokio::select! {
            r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
            _ = stop.changed() => return,
        };
        let v = Arc::clone(&volume);
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = match sock.read(&mut buf).await {
                Ok(n) => n,
                Err(_) => return,
            };
            let req = String::from_utf8_lossy(&buf[..n]);
            let body = if req.starts_with("GET /healthz") {
                "ok\n".to_string()
            } else {
                render(&v)
            };
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}
