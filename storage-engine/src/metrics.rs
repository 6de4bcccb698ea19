//! Prometheus metrics: I/O counters, replication lag and pending blocks, served on
//! `--metrics-listen` in the OpenMetrics text format (prometheus-client). Values are read from the
//! volume at scrape time, so the hot path pays nothing.

use std::{borrow::Cow, fmt, sync::Arc};

use axum::{extract::State, response::Response, routing::get, Router};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::{net::TcpListener, sync::watch};

use crate::{grpc::status_of, http, volume::Volume};

/// Renders the current values (counters get their `_total` suffix from the encoder), with what the
/// metrics endpoint itself refused.
pub fn render(v: &Volume, endpoint: &http::Stats) -> Result<String, fmt::Error> {
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
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    counter(
        &mut r,
        "secondary_forwarded_writes",
        "Host writes, zeroes and trims on this read-write secondary forwarded to the primary and acknowledged",
        load(&v.forward.forwarded),
    );
    counter(
        &mut r,
        "secondary_io_refused",
        "Host requests refused on this secondary: not connected to its primary, not consistent, or the primary refused",
        load(&v.forward.refused),
    );
    counter(
        &mut r,
        "nbd_connections_refused",
        "NBD connections closed at accept: --nbd-max-connections reached, none in handshake",
        load(&v.counters.nbd_refused),
    );
    counter(
        &mut r,
        "nbd_handshakes_evicted",
        "NBD connections still in handshake closed to make room for a new one at the cap",
        load(&v.counters.nbd_evicted),
    );
    counter(
        &mut r,
        "nbd_handshake_timeouts",
        "NBD connections closed for not finishing the handshake within --nbd-handshake-timeout-ms",
        load(&v.counters.nbd_handshake_timeouts),
    );
    counter(
        &mut r,
        "nbd_accept_errors",
        "Failed NBD accepts (descriptors or memory exhausted); each paused the listener",
        load(&v.counters.nbd_accept_errors),
    );
    counter(
        &mut r,
        "resizes",
        "Online or restart-time grows of the volume this engine carried out",
        load(&v.counters.resizes),
    );
    let grpc = &v.counters.grpc;
    counter(
        &mut r,
        "grpc_connections_refused",
        "gRPC connections closed at accept: --max-grpc-connections reached, none in handshake",
        load(&grpc.refused),
    );
    counter(
        &mut r,
        "grpc_handshakes_evicted",
        "gRPC connections still in their TLS handshake closed to make room for a new one at the cap",
        load(&grpc.evicted),
    );
    counter(
        &mut r,
        "grpc_handshake_timeouts",
        "gRPC connections closed for not finishing the handshake within --grpc-handshake-timeout-ms",
        load(&grpc.handshake_timeouts),
    );
    counter(
        &mut r,
        "grpc_accept_errors",
        "Failed gRPC accepts (descriptors or memory exhausted); each paused the listener",
        load(&grpc.accept_errors),
    );
    counter(
        &mut r,
        "http_connections_refused",
        "Metrics connections closed at accept: the endpoint's connection cap was reached",
        load(&endpoint.refused),
    );
    counter(
        &mut r,
        "http_connections_timed_out",
        "Metrics connections closed at the endpoint's deadline",
        load(&endpoint.timed_out),
    );
    counter(
        &mut r,
        "http_accept_errors",
        "Failed metrics accepts (descriptors or memory exhausted); each paused the listener",
        load(&endpoint.accept_errors),
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
    let (snaps, snap_bytes) = v.snapshot_usage();
    gauge(&mut r, "snapshots", "Snapshots this engine holds", snaps);
    gauge(
        &mut r,
        "snapshot_bytes",
        "Bytes the snapshots hold on disk (copy-on-write areas, blocks allocated to clones)",
        snap_bytes,
    );
    gauge(&mut r, "epoch", "Current epoch", s.epoch);
    counter(
        &mut r,
        "move_copied_bytes",
        "Bytes the live move's copier sent to the new engine (since this engine started)",
        load(&v.mover.copied_bytes),
    );
    let phases = prometheus_client::metrics::family::Family::<
        Vec<(String, String)>,
        prometheus_client::metrics::gauge::Gauge,
    >::default();
    let now = v.mover.phase();
    for p in crate::repl::mover::Phase::ALL {
        phases
            .get_or_create(&vec![("phase".to_string(), p.name().to_string())])
            .set(i64::from(p == now));
    }
    r.register(
        "move_phase",
        "1 for the phase of the last live move of the secondary (none, copying, cutover, done, aborted)",
        phases,
    );
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
        "lease_remaining_seconds",
        "Primary: how long host writes are still acknowledged without a lease renewal (0: none held)",
        ConstGauge::new(s.lease_remaining_ms as f64 / 1000.0),
    );
    r.register(
        "promise_remaining_seconds",
        "Not primary: how long before a forced promotion of this engine is allowed",
        ConstGauge::new(s.promise_remaining_ms as f64 / 1000.0),
    );
    gauge(
        &mut r,
        "sync_fallback",
        "1 while the witness allows sync-mode writes to be acknowledged without the peer",
        u64::from(s.sync_fallback),
    );
    gauge(
        &mut r,
        "exported_lost_blocks",
        "Blocks this engine acknowledged as primary that its successor lacked, kept in lost_export",
        s.exported_lost_blocks,
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
    encode(&mut out, &r)?;
    Ok(out)
}

/// The endpoint: `/healthz` answers `ok`; any other path answers the metrics (scrapers ask `/metrics`).
fn router(volume: Arc<Volume>, endpoint: Arc<http::Stats>) -> Router {
    let router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(metrics)
        .with_state((volume, endpoint));
    http::one_request_per_connection(router)
}

async fn metrics(State((volume, endpoint)): State<(Arc<Volume>, Arc<http::Stats>)>) -> Response {
    http::openmetrics(render(&volume, &endpoint))
}

/// Serves the endpoint until `stop` changes.
pub async fn serve(listener: TcpListener, volume: Arc<Volume>, mut stop: watch::Receiver<bool>) {
    let stopped = async move {
        let _ = stop.changed().await;
    };
    let endpoint = Arc::new(http::Stats::default());
    let router = router(volume, Arc::clone(&endpoint));
    if let Err(e) = http::serve_bounded(listener, router, stopped, http::LIMITS, endpoint).await {
        tracing::warn!(error = %e, "metrics endpoint failed");
    }
}
