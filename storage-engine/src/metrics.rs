//! Prometheus metrics, served on `--metrics-listen` (OpenMetrics, or the classic text format for a
//! scraper that does not ask for it: `tandem_api::http::metrics`). Names follow the Prometheus
//! conventions: base units (`_seconds`, `_bytes`), `_total` counters, histograms for latencies and
//! labels instead of coded numbers (`tandem_role{role="primary"} 1`). Most values are read from the
//! volume at scrape time; only the histograms and error counters ([`Instruments`]) are fed by the
//! request paths. Each HELP text says what a family means; the chart's alerts and dashboard use them.

use std::{borrow::Cow, fmt, sync::Arc, time::Duration};

use axum::{extract::State, http::HeaderMap, response::Response, routing::get, Router};
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{
        counter::{ConstCounter, Counter},
        family::{Family, MetricConstructor},
        gauge::ConstGauge,
        histogram::Histogram,
    },
    registry::Registry,
};
use tandem_api::pb;
use tokio::{net::TcpListener, sync::watch};

use crate::{grpc::status_of, http, volume::Volume};

/// Latency buckets of host and proxied I/O: 50 µs (a cached read) to 10 s (a sync write waiting
/// out a dead peer).
const IO_BUCKETS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];
/// Takeover ready-time buckets: a clean handoff takes milliseconds, a forced one waits out a lease.
const TAKEOVER_BUCKETS: [f64; 12] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// A host request kind, as the `op` label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TakeoverLabels {
    /// `takeover` or `failback`.
    pub kind: &'static str,
    /// `ok` or `failed`.
    pub result: &'static str,
}

#[derive(Clone, Copy)]
struct Buckets(&'static [f64]);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

/// What the request paths record as they go (the rest is read from the volume at scrape time).
#[derive(Clone)]
pub struct Instruments {
    host_latency: Family<OpLabel, Histogram, Buckets>,
    host_errors: Family<OpLabel, Counter>,
    proxied_read_latency: Histogram,
    takeovers: Family<TakeoverLabels, Counter>,
    takeover_ready: Histogram,
}

impl Default for Instruments {
    fn default() -> Self {
        let i = Instruments {
            host_latency: Family::new_with_constructor(Buckets(&IO_BUCKETS)),
            host_errors: Family::default(),
            proxied_read_latency: Histogram::new(IO_BUCKETS.iter().copied()),
            takeovers: Family::default(),
            takeover_ready: Histogram::new(TAKEOVER_BUCKETS.iter().copied()),
        };
        // Counters start at 0 rather than appear with their first event, so that rate() and
        // increase() see that first event.
        for op in HOST_OPS {
            let _ = i.host_errors.get_or_create(&OpLabel { op });
        }
        for kind in ["takeover", "failback"] {
            for result in ["ok", "failed"] {
                let _ = i.takeovers.get_or_create(&TakeoverLabels { kind, result });
            }
        }
        i
    }
}

/// The `op` label values of host requests.
const HOST_OPS: [&str; 5] = ["read", "write", "flush", "trim", "write_zeroes"];

impl fmt::Debug for Instruments {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Instruments")
    }
}

impl Instruments {
    /// One host request (NBD) of kind `op` took `took`; `failed` when it answered an error.
    pub fn host_request(&self, op: &'static str, took: Duration, failed: bool) {
        let l = OpLabel { op };
        self.host_latency
            .get_or_create(&l)
            .observe(took.as_secs_f64());
        if failed {
            self.host_errors.get_or_create(&l).inc();
        }
    }

    /// One proxied read (any number of blocks) from the old primary took `took`.
    pub fn proxied_read(&self, took: Duration) {
        self.proxied_read_latency.observe(took.as_secs_f64());
    }

    /// A takeover or failback request ended; `ready` is its ready time when it promoted this engine.
    pub fn takeover(&self, kind: &'static str, ready: Option<Duration>, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.takeovers
            .get_or_create(&TakeoverLabels { kind, result })
            .inc();
        if let Some(d) = ready {
            self.takeover_ready.observe(d.as_secs_f64());
        }
    }
}

/// The lower-case word of a protobuf enum value (`PAIR_STATE_SYNCED` -> `synced`).
fn word(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

/// Conditions always published (0 or 1), so that an alert sees them go to 0.
const CONDITIONS: [&str; 3] = ["Degraded", "HandoffBlocked", "PermissionDenied"];

/// A gauge family with one series per label value, exactly one of them 1.
fn one_hot(
    r: &mut Registry,
    name: &str,
    help: &str,
    label: &'static str,
    values: &[String],
    on: &str,
) {
    let f =
        Family::<Vec<(&'static str, String)>, prometheus_client::metrics::gauge::Gauge>::default();
    for v in values {
        f.get_or_create(&vec![(label, v.clone())])
            .set(i64::from(v == on));
    }
    r.register(name, help, f);
}

/// Renders the current values (counters get their `_total` suffix from the encoder), with what the
/// metrics endpoint itself refused.
pub fn render(v: &Volume, endpoint: &http::Stats) -> Result<String, fmt::Error> {
    let s = status_of(v);
    let label = (Cow::Borrowed("volume"), Cow::Owned(s.volume.clone()));
    let mut r = Registry::with_prefix_and_labels("tandem", std::iter::once(label));
    let counter = |r: &mut Registry, name: &str, help: &str, value: u64| {
        r.register(name, help, ConstCounter::new(value));
    };
    let gauge = |r: &mut Registry, name: &str, help: &str, value: u64| {
        r.register(
            name,
            help,
            ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)),
        );
    };
    let seconds = |r: &mut Registry, name: &str, help: &str, value: f64| {
        r.register(name, help, ConstGauge::new(value));
    };
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let inst = &v.counters.instruments;

    // Host I/O.
    let bytes = Family::<OpLabel, Counter>::default();
    bytes
        .get_or_create(&OpLabel { op: "read" })
        .inc_by(s.bytes_read);
    bytes
        .get_or_create(&OpLabel { op: "write" })
        .inc_by(s.bytes_written);
    r.register(
        "host_io_bytes",
        "Bytes read and written by hosts, by op",
        bytes,
    );
    r.register(
        "host_io_duration_seconds",
        "Host (NBD) request latency from parsed request to reply, by op (read, write, flush, trim, write_zeroes); its _count is the request count",
        inst.host_latency.clone(),
    );
    r.register(
        "host_io_errors",
        "Host requests answered with an error, by op",
        inst.host_errors.clone(),
    );
    gauge(
        &mut r,
        "nbd_connections",
        "Open NBD connections",
        s.nbd_connections,
    );

    // State, as labelled gauges.
    let role = pb::Role::try_from(s.role).unwrap_or(pb::Role::Unspecified);
    let roles = ["primary", "secondary", "fenced"].map(String::from);
    one_hot(
        &mut r,
        "role",
        "This engine's role: 1 on the current one",
        "role",
        &roles,
        &word(role.as_str_name(), "ROLE_"),
    );
    let pair = pb::PairState::try_from(s.pair).unwrap_or(pb::PairState::Unspecified);
    let pairs: Vec<String> = [
        pb::PairState::Standalone,
        pb::PairState::Connecting,
        pb::PairState::Resyncing,
        pb::PairState::Replicating,
        pb::PairState::Synced,
        pb::PairState::Reversing,
        pb::PairState::Consistent,
        pb::PairState::Inconsistent,
        pb::PairState::Fenced,
    ]
    .iter()
    .map(|p| word(p.as_str_name(), "PAIR_STATE_"))
    .collect();
    one_hot(
        &mut r,
        "pair_state",
        "The pair as this engine sees it: 1 on the current state",
        "state",
        &pairs,
        &word(pair.as_str_name(), "PAIR_STATE_"),
    );
    let phase = pb::TakeoverPhase::try_from(s.takeover).unwrap_or(pb::TakeoverPhase::Unspecified);
    let phases = ["none", "draining", "merging", "fenced"].map(String::from);
    one_hot(
        &mut r,
        "takeover_phase",
        "Where a takeover stands on this engine: 1 on the current phase",
        "phase",
        &phases,
        &word(phase.as_str_name(), "TAKEOVER_PHASE_"),
    );
    let mut reasons: Vec<String> = CONDITIONS.iter().map(|c| c.to_string()).collect();
    if !s.condition_reason.is_empty() && !reasons.contains(&s.condition_reason) {
        reasons.push(s.condition_reason.clone());
    }
    one_hot(
        &mut r,
        "condition",
        "Why the volume is unhealthy: 1 on the current reason, all 0 when healthy",
        "reason",
        &reasons,
        &s.condition_reason,
    );
    gauge(&mut r, "epoch", "Current epoch", s.epoch);

    // Replication.
    gauge(
        &mut r,
        "peer_connected",
        "1 when the replication link is up",
        u64::from(s.peer_connected),
    );
    seconds(
        &mut r,
        "replication_lag_seconds",
        "Age of the oldest write the peer has not acknowledged",
        s.lag_seconds,
    );
    gauge(
        &mut r,
        "replication_lag_bytes",
        "Bytes of writes the peer has not acknowledged",
        s.pending_bytes,
    );
    gauge(
        &mut r,
        "pending_blocks",
        "Blocks not yet acknowledged by the peer (during a resync: what is left to copy)",
        s.pending_blocks,
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
    seconds(
        &mut r,
        "resync_progress_ratio",
        "Secondary: 1 once its copy is consistent, 0 while a resync is under way",
        s.resync_progress,
    );
    counter(&mut r, "sync_timeouts", "Sync-mode writes and flushes that did not get the peer's ack in time (or found the link down)", s.sync_timeouts);
    gauge(
        &mut r,
        "sync_degraded",
        "1 while some sync-mode write stands on the local copy alone",
        u64::from(s.sync_degraded),
    );
    gauge(
        &mut r,
        "sync_fallback",
        "1 while the witness allows sync-mode writes to be acknowledged without the peer",
        u64::from(s.sync_fallback),
    );

    // Lease.
    let lease = if s.lease_ms == 0 {
        "off"
    } else if role != pb::Role::Primary {
        "not_primary"
    } else if s.lease_remaining_ms > 0 {
        "held"
    } else {
        "expired"
    };
    let leases = ["held", "expired", "not_primary", "off"].map(String::from);
    one_hot(
        &mut r,
        "lease_state",
        "Write lease: held, expired (a primary whose writes wait), not_primary, off (--lease-ms 0)",
        "state",
        &leases,
        lease,
    );
    seconds(&mut r, "lease_remaining_seconds", "Primary: how long host writes are still acknowledged without a lease renewal (0: none held)", s.lease_remaining_ms as f64 / 1000.0);
    seconds(
        &mut r,
        "promise_remaining_seconds",
        "Not primary: how long before a forced promotion of this engine is allowed",
        s.promise_remaining_ms as f64 / 1000.0,
    );

    // Takeover: drain and merge progress, proxied reads, losses.
    gauge(
        &mut r,
        "peer_pending_blocks",
        "Drain progress: blocks whose newest content is still on the old primary",
        s.peer_pending_blocks,
    );
    gauge(
        &mut r,
        "overlay_blocks",
        "Merge progress: blocks held in the takeover overlay, not yet merged into the data file",
        s.overlay_blocks,
    );
    counter(
        &mut r,
        "proxied_read_blocks",
        "Blocks read from the old primary by proxied reads",
        s.proxied_reads,
    );
    counter(
        &mut r,
        "proxied_read_error_blocks",
        "Blocks whose proxied read failed (deadline or peer error)",
        s.proxied_read_errors,
    );
    r.register(
        "proxied_read_duration_seconds",
        "Latency of one proxied read from the old primary",
        inst.proxied_read_latency.clone(),
    );
    r.register(
        "takeovers",
        "Takeover and failback requests this engine answered, by kind and result",
        inst.takeovers.clone(),
    );
    r.register(
        "takeover_ready_seconds",
        "Time from a takeover request to this engine serving as primary",
        inst.takeover_ready.clone(),
    );
    gauge(
        &mut r,
        "lost_blocks",
        "Blocks lost by the forced promotion that made this engine primary",
        s.lost_blocks,
    );
    gauge(
        &mut r,
        "exported_lost_blocks",
        "Blocks this engine acknowledged as primary that its successor lacked, kept in lost_export",
        s.exported_lost_blocks,
    );

    // Snapshots and size.
    let (snaps, snap_bytes) = v.snapshot_usage();
    gauge(&mut r, "snapshots", "Snapshots this engine holds", snaps);
    gauge(
        &mut r,
        "snapshot_bytes",
        "Bytes the snapshots hold on disk (copy-on-write areas, blocks allocated to clones)",
        snap_bytes,
    );
    gauge(&mut r, "size_bytes", "Volume size", s.size);
    counter(
        &mut r,
        "resizes",
        "Online or restart-time grows of the volume this engine carried out",
        load(&v.counters.resizes),
    );

    // The live move of the secondary (issue 18).
    counter(
        &mut r,
        "move_copied_bytes",
        "Bytes the live move's copier sent to the new engine (since this engine started)",
        load(&v.mover.copied_bytes),
    );
    let phases: Vec<String> = crate::repl::mover::Phase::ALL
        .iter()
        .map(|p| p.name().to_string())
        .collect();
    one_hot(
        &mut r,
        "move_phase",
        "1 for the phase of the last live move of the secondary (none, copying, cutover, done, aborted)",
        "phase",
        &phases,
        v.mover.phase().name(),
    );

    // What the listeners turned away.
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
    let grpc = &v.counters.grpc;
    counter(
        &mut r,
        "grpc_connections_refused",
        "gRPC connections closed at accept: --max-grpc-connections reached, none in handshake",
        load(&grpc.refused),
    );
    counter(&mut r, "grpc_handshakes_evicted", "gRPC connections still in their TLS handshake closed to make room for a new one at the cap", load(&grpc.evicted));
    counter(&mut r, "grpc_handshake_timeouts", "gRPC connections closed for not finishing the handshake within --grpc-handshake-timeout-ms", load(&grpc.handshake_timeouts));
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

async fn metrics(
    State((volume, endpoint)): State<(Arc<Volume>, Arc<http::Stats>)>,
    headers: HeaderMap,
) -> Response {
    http::metrics(&headers, render(&volume, &endpoint))
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
