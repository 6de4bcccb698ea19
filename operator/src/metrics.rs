//! Prometheus metrics (`tandem_operator_*`), by the Prometheus conventions: reconciles, failures by
//! error, reconcile duration, failovers by reason and result, and per volume its lag (seconds, bytes,
//! blocks), epoch, phase and conditions as labelled gauges (1 on the current value).

use std::{sync::Arc, time::Instant};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::crd::{MirroredVolumeStatus, Phase};

/// Every phase, each published per volume (0 or 1) so that a query sees a phase end.
const PHASES: [Phase; 7] = [
    Phase::Creating,
    Phase::Syncing,
    Phase::Synced,
    Phase::Degraded,
    Phase::TakingOver,
    Phase::Reversing,
    Phase::Failed,
];

/// The condition types published per volume, to drop them with the volume.
type SeenConditions = Arc<std::sync::Mutex<std::collections::HashMap<VolumeLabels, Vec<String>>>>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VolumeLabels {
    pub namespace: String,
    pub volume: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub namespace: String,
    pub volume: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabels {
    pub namespace: String,
    pub volume: String,
    /// The condition's `type`.
    pub condition: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
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
    pub lag_seconds: Family<VolumeLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub epoch: Family<VolumeLabels, Gauge>,
    pub phase: Family<PhaseLabels, Gauge>,
    pub conditions: Family<ConditionLabels, Gauge>,
    seen_conditions: SeenConditions,
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
        let lag_seconds =
            Family::<VolumeLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let epoch = Family::<VolumeLabels, Gauge>::default();
        let phase = Family::<PhaseLabels, Gauge>::default();
        let conditions = Family::<ConditionLabels, Gauge>::default();
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
            "volume_pending_blocks",
            "Blocks the secondary is behind",
            lag_blocks.clone(),
        );
        registry.register(
            "volume_lag_seconds",
            "Age of the oldest unreplicated write",
            lag_seconds.clone(),
        );
        registry.register("volume_epoch", "Current epoch of the pair", epoch.clone());
        registry.register(
            "volume_phase",
            "The volume's status.phase: 1 on the current phase, 0 on the others",
            phase.clone(),
        );
        registry.register(
            "volume_condition",
            "The volume's status.conditions: 1 on each condition's current status, 0 on the others",
            conditions.clone(),
        );
        Metrics {
            reconciles,
            failures,
            duration,
            failovers,
            released_pods,
            lag_bytes,
            lag_blocks,
            lag_seconds,
            epoch,
            phase,
            conditions,
            seen_conditions: SeenConditions::default(),
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
            self.lag_seconds.get_or_create(&labels).set(r.lag_seconds);
        }
        self.epoch.get_or_create(&labels).set(clamp(status.epoch));
        for p in PHASES {
            self.phase
                .get_or_create(&PhaseLabels {
                    namespace: namespace.into(),
                    volume: volume.into(),
                    phase: p.as_str().into(),
                })
                .set(i64::from(p == status.phase));
        }
        let mut seen = self
            .seen_conditions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let types = seen.entry(labels.clone()).or_default();
        for c in &status.conditions {
            if !types.contains(&c.type_) {
                types.push(c.type_.clone());
            }
            for st in ["True", "False", "Unknown"] {
                self.conditions
                    .get_or_create(&ConditionLabels {
                        namespace: namespace.into(),
                        volume: volume.into(),
                        condition: c.type_.clone(),
                        status: st.into(),
                    })
                    .set(i64::from(c.status == st));
            }
        }
    }

    /// Drops the per-volume series of a deleted volume.
    pub fn forget_volume(&self, namespace: &str, volume: &str) {
        let labels = VolumeLabels {
            namespace: namespace.into(),
            volume: volume.into(),
        };
        self.lag_bytes.remove(&labels);
        self.lag_blocks.remove(&labels);
        self.lag_seconds.remove(&labels);
        self.epoch.remove(&labels);
        for p in PHASES {
            self.phase.remove(&PhaseLabels {
                namespace: namespace.into(),
                volume: volume.into(),
                phase: p.as_str().into(),
            });
        }
        let types = self
            .seen_conditions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&labels)
            .unwrap_or_default();
        for condition in types {
            for st in ["True", "False", "Unknown"] {
                self.conditions.remove(&ConditionLabels {
                    namespace: namespace.into(),
                    volume: volume.into(),
                    condition: condition.clone(),
                    status: st.into(),
                });
            }
        }
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
            phase: Phase::Synced,
            conditions: vec![crate::crd::Condition {
                type_: "Ready".into(),
                status: "True".into(),
                observed_generation: None,
                last_transition_time: String::new(),
                reason: "Synced".into(),
                message: String::new(),
            }],
            replication: Some(crate::crd::ReplicationStatus {
                lag_seconds: 0.25,
                ..Default::default()
            }),
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
        assert!(
            text.contains(r#"tandem_operator_volume_lag_seconds{namespace="ns",volume="v"} 0.25"#)
        );
        assert!(text.contains(
            r#"tandem_operator_volume_phase{namespace="ns",volume="v",phase="Synced"} 1"#
        ));
        assert!(text.contains(
            r#"tandem_operator_volume_phase{namespace="ns",volume="v",phase="Degraded"} 0"#
        ));
        assert!(text.contains(r#"tandem_operator_volume_condition{namespace="ns",volume="v",condition="Ready",status="True"} 1"#));
        assert!(text.contains(r#"tandem_operator_volume_condition{namespace="ns",volume="v",condition="Ready",status="False"} 0"#));
        assert_eq!(m.failure_count("ns", "v", "kube"), 1);
        m.forget_volume("ns", "v");
        let after = m.encode().unwrap();
        assert!(!after.contains("volume_epoch{"), "{after}");
        assert!(!after.contains("volume_phase{"), "{after}");
        assert!(!after.contains("volume_condition{"), "{after}");
    }
}
