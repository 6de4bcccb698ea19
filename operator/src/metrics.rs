//! Prometheus metrics (`tandem_operator_*`): reconciles, failures by error, reconcile duration,
//! failovers by reason and result, and per-volume lag and epoch.

use std::{sync::Arc, time::Instant};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::crd::MirroredVolumeStatus;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VolumeLabels {
    pub namespace: String,
    pub volume: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub namespace: String,
    pub volume: String,
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailoverLabels {
    pub namespace: String,
    pub volume: String,
    pub reason: String,
    /// `ok` or `failed`.
    pub result: String,
}

/// All operator metrics, registered in one registry.
#[derive(Clone)]
pub struct Metrics {
    pub reconciles: Counter,
    pub failures: Family<FailureLabels, Counter>,
    pub duration: Histogram,
    pub failovers: Family<FailoverLabels, Counter>,
    pub released_pods: Family<VolumeLabels, Counter>,
    pub lag_bytes: Family<VolumeLabels, Gauge>,
    pub lag_blocks: Family<VolumeLabels, Gauge>,
    pub lag_milliseconds: Family<VolumeLabels, Gauge>,
    pub epoch: Family<VolumeLabels, Gauge>,
    pub registry: Arc<Registry>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tandem_operator");
        let reconciles = Counter::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let duration = Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]);
        let failovers = Family::<FailoverLabels, Counter>::default();
        let released_pods = Family::<VolumeLabels, Counter>::default();
        let lag_bytes = Family::<VolumeLabels, Gauge>::default();
        let lag_blocks = Family::<VolumeLabels, Gauge>::default();
        let lag_milliseconds = Family::<VolumeLabels, Gauge>::default();
        let epoch = Family::<VolumeLabels, Gauge>::default();
        registry.register("reconciles", "Reconciliations run", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Reconciliations that failed, by error",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconciliation",
            duration.clone(),
        );
        registry.register(
            "failovers",
            "Takeovers the operator called, by reason and result",
            failovers.clone(),
        );
        registry.register(
            "released_workload_pods",
            "Workload pods force-deleted from lost nodes",
            released_pods.clone(),
        );
        registry.register(
            "volume_lag_bytes",
            "Bytes the secondary is behind",
            lag_bytes.clone(),
        );
        registry.register(
            "volume_lag_blocks",
            "Blocks the secondary is behind",
            lag_blocks.clone(),
        );
        registry.register(
            "volume_lag_milliseconds",
            "Age of the oldest unreplicated write",
            lag_milliseconds.clone(),
        );
        registry.register("volume_epoch", "Current epoch of the pair", epoch.clone());
        Metrics {
            reconciles,
            failures,
            duration,
            failovers,
            released_pods,
            lag_bytes,
            lag_blocks,
            lag_milliseconds,
            epoch,
            registry: Arc::new(registry),
        }
    }
}

impl Metrics {
    /// Starts timing a reconcile; the duration is observed when the guard drops.
    pub fn count_and_measure(&self) -> ReconcileMeasurer {
        self.reconciles.inc();
        ReconcileMeasurer {
            start: Instant::now(),
            metric: self.duration.clone(),
        }
    }

    pub fn set_failure(&self, namespace: &str, volume: &str, error: &str) {
        self.failures
            .get_or_create(&FailureLabels {
                namespace: namespace.into(),
                volume: volume.into(),
                error: error.into(),
            })
            .inc();
    }

    pub fn failure_count(&self, namespace: &str, volume: &str, error: &str) -> u64 {
        self.failures
            .get_or_create(&FailureLabels {
                namespace: namespace.into(),
                volume: volume.into(),
                error: error.into(),
            })
            .get()
    }

    pub fn failover(&self, namespace: &str, volume: &str, reason: &str, ok: bool) {
        self.failovers
            .get_or_create(&FailoverLabels {
                namespace: namespace.into(),
                volume: volume.into(),
                reason: reason.into(),
                result: if ok { "ok" } else { "failed" }.into(),
            })
            .inc();
    }

    /// Publishes the lag and epoch of a volume's status.
    pub fn observe_volume(&self, namespace: &str, volume: &str, status: &MirroredVolumeStatus) {
        let labels = VolumeLabels {
            namespace: namespace.into(),
            volume: volume.into(),
        };
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        if let Some(r) = &status.replication {
            self.lag_bytes
                .get_or_create(&labels)
                .set(clamp(r.pending_bytes));
            self.lag_blocks
                .get_or_create(&labels)
                .set(clamp(r.pending_blocks));
            self.lag_milliseconds
                .get_or_create(&labels)
                .set((r.lag_seconds * 1000.0) as i64);
        }
        self.epoch.get_or_create(&labels).set(clamp(status.epoch));
    }

    /// Drops the per-volume series of a deleted volume.
    pub fn forget_volume(&self, namespace: &str, volume: &str) {
        let labels = VolumeLabels {
            namespace: namespace.into(),
            volume: volume.into(),
        };
        self.lag_bytes.remove(&labels);
        self.lag_blocks.remove(&labels);
        self.lag_milliseconds.remove(&labels);
        self.epoch.remove(&labels);
    }

    /// Text exposition for `/metrics`.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Observes the reconcile duration on drop, whatever path the reconcile took.
pub struct ReconcileMeasurer {
    start: Instant,
    metric: Histogram,
}

impl Drop for ReconcileMeasurer {
    fn drop(&mut self) {
        self.metric.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_with_prefix() {
        let m = Metrics::default();
        {
            let _t = m.count_and_measure();
        }
        m.set_failure("ns", "v", "kube");
        m.failover("ns", "v", "PrimaryPodLost", true);
        let status = MirroredVolumeStatus {
            epoch: 7,
            ..Default::default()
        };
        m.observe_volume("ns", "v", &status);
        let text = m.encode().unwrap();
        assert!(
            text.contains("tandem_operator_reconciles_total 1"),
            "{text}"
        );
        assert!(text.contains(
            r#"tandem_operator_reconcile_failures_total{namespace="ns",volume="v",error="kube"} 1"#
        ));
        assert!(text.contains(r#"tandem_operator_failovers_total{namespace="ns",volume="v",reason="PrimaryPodLost",result="ok"} 1"#));
        assert!(text.contains(r#"tandem_operator_volume_epoch{namespace="ns",volume="v"} 7"#));
        assert_eq!(m.failure_count("ns", "v", "kube"), 1);
        m.forget_volume("ns", "v");
        assert!(!m.encode().unwrap().contains("volume_epoch{"));
    }
}
