//! The operator's HTTP endpoint: `/healthz` (liveness), `/readyz` (readiness: the controller runs, or this
//! replica is a healthy standby) and `/metrics` (Prometheus text format).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
    Router,
};

use crate::metrics::Metrics;

/// What the probes report.
#[derive(Clone, Default)]
pub struct Health {
    /// Set once the process finished starting (the CRD is installed, clients are built).
    pub started: Arc<AtomicBool>,
    /// Set while this replica leads (informational; standbys are ready too).
    pub leading: Arc<AtomicBool>,
}

#[derive(Clone)]
struct AppState {
    health: Health,
    metrics: Metrics,
}

/// The router, separate from the listener so it can be tested.
pub fn router(health: Health, metrics: Metrics) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .with_state(AppState { health, metrics })
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.health.started.load(Ordering::Relaxed) {
        let role = if state.health.leading.load(Ordering::Relaxed) {
            "leader"
        } else {
            "standby"
        };
        (StatusCode::OK, role)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

async fn metrics_handler(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
) -> Response {
    tandem_api::http::metrics(&headers, state.metrics.encode())
}

/// Serves until the process ends.
pub async fn serve(addr: SocketAddr, health: Health, metrics: Metrics) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    let router = router(health, metrics);
    tandem_api::http::serve(listener, router, std::future::pending()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn probes_and_metrics() {
        let health = Health::default();
        let metrics = Metrics::default();
        // Every family with a series, so that the lint below sees each of them.
        drop(metrics.count_and_measure());
        metrics.set_failure("ns", "v", "kube");
        metrics.failover("ns", "v", "PrimaryPodLost", true);
        metrics
            .released_pods
            .get_or_create(&crate::metrics::VolumeLabels {
                namespace: "ns".into(),
                volume: "v".into(),
            })
            .inc();
        let status = crate::crd::MirroredVolumeStatus {
            replication: Some(Default::default()),
            conditions: vec![crate::crd::Condition {
                type_: "Ready".into(),
                status: "True".into(),
                observed_generation: None,
                last_transition_time: String::new(),
                reason: "Synced".into(),
                message: String::new(),
            }],
            ..Default::default()
        };
        metrics.observe_volume("ns", "v", &status);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let h = health.clone();
        let server = tokio::spawn(async move { axum::serve(listener, router(h, metrics)).await });
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        health.started.store(true, Ordering::Relaxed);
        let ready = get(addr, "/readyz").await;
        assert!(
            ready.starts_with("HTTP/1.1 200") && ready.ends_with("standby"),
            "{ready}"
        );
        let m = get(addr, "/metrics").await;
        assert!(m.contains("tandem_operator_reconciles_total"), "{m}");
        assert!(m.contains("tandem_operator_volume_phase{"), "{m}");
        tandem_testkit::promtool_check_metrics(&m);
        server.abort();
    }
}
