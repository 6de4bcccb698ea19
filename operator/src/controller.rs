//! The reconciler: a thin instrumented shell around `finalizer`, and `MirroredVolume::reconcile` in four
//! steps, one module each:
//!
//! - `observe`: every read of one pass (nodes, engine pods, Secret, PV, claims, workloads stuck on lost
//!   nodes) and the engines' own Status, into one plain [`Observed`](crate::observed::Observed);
//! - `decide`: a pure function from the volume and the observation to a `Plan` (built on the `failover`
//!   and `plan` decisions), testable without an API server;
//! - `act`: carries the plan out (the takeover call, deletions, server-side applies) and publishes events;
//! - `status`: phase and conditions from the plan, written to the status subresource.
//!
//! `cleanup` is the delete path. Every side effect goes through [`Context`]: the Kubernetes client, the event
//! recorder, the metrics and the engine API. Children are written with server-side apply under the
//! `tandem-operator` field manager.

mod act;
mod cleanup;
mod decide;
mod drain;
mod grow;
mod observe;
mod restore;
mod status;

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    api::ListParams,
    runtime::{
        controller::{Action, Controller},
        events::{Recorder, Reporter},
        finalizer::{finalizer, Event as Finalizer},
        reflector::ObjectRef,
        watcher,
    },
    Api, Client, ResourceExt,
};
use tandem_api::tls::Ca;
use tracing::{field, instrument, warn, Span};

use crate::{
    crd::{parse_duration, MirroredVolume, VOLUME_FINALIZER},
    engine::EngineApi,
    metrics::Metrics,
    observed::{NAMESPACE_LABEL, NAME_LABEL},
    plan::EngineConfig,
    witness::Witness,
    Error, Result,
};
use decide::Decision;
use observe::Placed;

/// Field manager for every server-side apply.
pub const FIELD_MANAGER: &str = "tandem-operator";

/// Everything the reconciler may touch.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub engines: Arc<dyn EngineApi>,
    pub config: EngineConfig,
    /// The operator's memory as the pair's witness (lease grants, on its monotonic clock).
    pub witness: Witness,
    /// The operator's CA: it signs every volume's engine and CSI certificates.
    pub ca: Ca,
}

impl Context {
    pub fn new(
        client: Client,
        metrics: Metrics,
        engines: Arc<dyn EngineApi>,
        config: EngineConfig,
        ca: Ca,
        instance: Option<String>,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance,
            },
        );
        Context {
            client,
            recorder,
            metrics,
            engines,
            config,
            witness: Witness::default(),
            ca,
        }
    }
}

/// Entry point for the controller: instruments, then lets `finalizer` pick apply or cleanup.
#[instrument(skip(mv, ctx), fields(namespace, volume, trace_id))]
pub async fn reconcile(mv: Arc<MirroredVolume>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.count_and_measure();
    let namespace = mv.namespace().ok_or(Error::MissingObjectKey("namespace"))?;
    Span::current().record("namespace", field::display(&namespace));
    Span::current().record("volume", field::display(mv.name_any()));
    let api: Api<MirroredVolume> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, VOLUME_FINALIZER, mv, |event| async {
        match event {
            Finalizer::Apply(mv) => mv.reconcile(ctx.clone()).await,
            Finalizer::Cleanup(mv) => mv.cleanup(ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Counts the failure under its label and retries soon.
pub fn error_policy(mv: Arc<MirroredVolume>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(volume = %mv.name_any(), %error, "reconcile failed");
    ctx.metrics.set_failure(
        &mv.namespace().unwrap_or_default(),
        &mv.name_any(),
        &error.metric_label(),
    );
    Action::requeue(Duration::from_secs(5))
}

impl MirroredVolume {
    fn key(&self) -> Result<(String, String)> {
        let ns = self
            .namespace()
            .ok_or(Error::MissingObjectKey("namespace"))?;
        let name = self
            .metadata
            .name
            .clone()
            .ok_or(Error::MissingObjectKey("name"))?;
        Ok((ns, name))
    }

    fn peer_timeout(&self) -> Duration {
        parse_duration(&self.spec.failover.peer_timeout).unwrap_or(Duration::from_secs(30))
    }

    /// Apply path: observe, decide, act, write status. Idempotent; never branches on why it was called.
    pub async fn reconcile(&self, ctx: Arc<Context>) -> Result<Action> {
        // A volume that cannot be placed or sized has nothing to observe.
        let status = self.status.clone().unwrap_or_default();
        let (nodes, placement, restore) = match self.place(&ctx).await? {
            Placed::Nodes(nodes, placement, restore) => (nodes, placement, restore),
            Placed::Invalid(invalid) => return self.write_invalid(&ctx, status, &invalid).await,
            Placed::Refused(why, restore) => {
                // A clone's snapshot, once taken, is remembered even before a pair fits.
                let mut status = status;
                status.restore = restore.or(status.restore);
                return self.write_unplaced(&ctx, status, why).await;
            }
        };
        let observed = self.observe(&ctx, &nodes).await?;
        // The pass decides with the placement it just made (the "Placed" event carries its message).
        let mut me = self.clone();
        let known = me.status.get_or_insert_with(Default::default);
        known.placement = placement;
        known.restore = restore;
        let mut plan = match decide::decide(&me, &observed, &ctx.config) {
            Decision::Act(plan) => *plan,
            // A takeover moves the primary, and with it what the rest of the plan does: ask first.
            Decision::TakeOver(pending) => {
                let attempt = self.take_over(&ctx, &pending).await;
                pending.after(&me, &ctx.config, attempt)
            }
        };
        self.act(&ctx, &mut plan).await?;
        self.write_status(&ctx, plan).await
    }
}

/// Runs the controller until a shutdown signal. Fails fast if the CRD is not installed.
pub async fn run(ctx: Arc<Context>) -> anyhow::Result<()> {
    let client = ctx.client.clone();
    let volumes: Api<MirroredVolume> = Api::all(client.clone());
    if let Err(e) = volumes.list(&ListParams::default().limit(1)).await {
        anyhow::bail!(
            "cannot list MirroredVolumes ({e}); is the CRD installed? `tandem-operator crd | kubectl apply -f -`"
        );
    }
    let controller = Controller::new(volumes, watcher::Config::default().any_semantic());
    let store = controller.store();
    // Engine pods live in the operator's namespace, without owner references (they cannot point across
    // namespaces): their owner labels map them back to their volume.
    controller
        .watches(
            Api::<Pod>::namespaced(client.clone(), &ctx.config.namespace),
            watcher::Config::default().labels("app.kubernetes.io/managed-by=tandem-operator"),
            |pod: Pod| {
                let labels = pod.metadata.labels.unwrap_or_default();
                match (labels.get(NAMESPACE_LABEL), labels.get(NAME_LABEL)) {
                    (Some(ns), Some(name)) => {
                        Some(ObjectRef::<MirroredVolume>::new(name).within(ns))
                    }
                    _ => None,
                }
            },
        )
        .watches(
            Api::<Node>::all(client.clone()),
            watcher::Config::default(),
            move |node: Node| {
                let node_name = node.name_any();
                store
                    .state()
                    .into_iter()
                    .filter(|mv| {
                        // Its engines' nodes; and a volume still waiting for a pair that fits.
                        let nodes = mv
                            .status
                            .as_ref()
                            .map(|s| s.nodes.as_slice())
                            .unwrap_or(&[]);
                        nodes.contains(&node_name)
                            || (nodes.len() != 2 && mv.spec.placement.node_selector.is_some())
                    })
                    .map(|mv| ObjectRef::from_obj(mv.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::debug!(volume = %obj.name, "reconciled"),
                Err(error) => tracing::debug!(%error, "reconcile error"),
            }
        })
        .await;
    Ok(())
}

#[cfg(test)]
#[path = "controller_tests.rs"]
mod tests;
