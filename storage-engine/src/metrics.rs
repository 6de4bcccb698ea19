//! Prometheus metrics: I/O counters, replication lag and pending blocks, served on
//! `--metrics-listen` in the OpenMetrics text format (prometheus-client). Values are read from the
//! volume at scrape time, so the hot path pays nothing.

use std::{borrow::Cow, sync::Arc};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::watch,
};

use crate::{grpc::status_of, volume::Volume};

/// Renders the current values (counters get their `_total` suffix from the encoder).
pub fn render(v: &Volume) -> String {
    let s = status_of(v);
    let label = (Cow::Borrowed("volume"), Cow::Owned(s.volume.clone()));
    let mut r = Registry::with_prefix_and_labels("tandem", std::iter::once(label));
    let counter = |r: &mut Registry, name: &str, help: &str, value: u64| {
        r.register(name, help, ConstCounter::new(value));
    };
    counter(&mut r, "bytes_read", "Bytes read by hosts", s.bytes_read);
    counter(
        &mut r,
        "bytes_written",
        "Bytes written by hosts",
        s.bytes_written,
    );
    counter(&mut r, "flushes", "Host flushes", s.flushes);
    counter(
        &mut r,
        "replicated_bytes",
        "Bytes sent as journal records",
        s.bytes_replicated,
    );
    counter(
        &mut r,
        "resynced_bytes",
        "Bytes sent as resync images",
        s.bytes_resynced,
    );
    counter(
        &mut r,
        "sync_timeouts",
        "Sync-mode writes and flushes that did not get the peer's ack in time (or found the link down)",
        s.sync_timeouts,
    );
    counter(
        &mut r,
        "proxied_reads",
        "Blocks read from the old primary by proxied reads",
        s.proxied_reads,
    );
    counter(
        &mut r,
        "proxied_read_errors",
        "Blocks whose proxied read failed (deadline or peer error)",
        s.proxied_read_errors,
    );
    let gauge = |r: &mut Registry, name: &str, help: &str, value: u64| {
        r.register(name, help, ConstGauge::new(value));
    };
    gauge(
        &mut r,
        "nbd_connections",
        "Open NBD connections",
        s.nbd_connections,
    );
    gauge(&mut r, "epoch", "Current epoch", s.epoch);
    r.register(
        "role",
        "1 primary, 2 secondary, 3 fenced",
        ConstGauge::new(i64::from(s.role)),
    );
    gauge(
        &mut r,
        "peer_connected",
        "1 when the replication link is up",
        u64::from(s.peer_connected),
    );
    gauge(
        &mut r,
        "sync_degraded",
        "1 while some sync-mode write stands on the local copy alone",
        u64::from(s.sync_degraded),
    );
    gauge(
        &mut r,
        "pending_blocks",
        "Blocks not yet acknowledged by the peer",
        s.pending_blocks,
    );
    r.register(
        "replication_lag_seconds",
        "Age of the oldest unacknowledged write",
        ConstGauge::new(s.lag_seconds),
    );
    gauge(
        &mut r,
        "journal_bytes",
        "Bytes held in the replication journal",
        s.journal_bytes,
    );
    gauge(
        &mut r,
        "applied_seq",
        "Highest acknowledged (primary) or applied (secondary) seq",
        s.applied_seq,
    );
    gauge(
        &mut r,
        "peer_pending_blocks",
        "After a takeover: blocks whose newest content is still on the old primary",
        s.peer_pending_blocks,
    );
    gauge(
        &mut r,
        "overlay_blocks",
        "Blocks held in the takeover overlay",
        s.overlay_blocks,
    );
    gauge(
        &mut r,
        "lost_blocks",
        "Blocks lost by a forced promotion",
        s.lost_blocks,
    );
    let mut out = String::new();
    if let Err(e) = encode(&mut out, &r) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
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
                "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}
