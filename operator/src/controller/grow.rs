//! Online expansion: when `spec.size` exceeds what the engines serve, the primary is asked to grow
//! (`Engine.Resize`; it grows its secondary first). `status.capacityBytes` is what both engines serve;
//! the PersistentVolume's capacity follows it (`plan::desired`), never `spec.size` alone, so Kubernetes
//! never shows a size the device does not have yet.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use tracing::{info, warn};

use super::{
    decide::{note, warning, Plan},
    observe::stamp,
    Context,
};
use crate::{
    crd::{EngineRole, MirroredVolume, MirroredVolumeStatus},
    engine::{EngineError, EngineTarget},
    failover::{self, primary_slot},
    observed::Observed,
    plan,
};

/// The condition that tells an expansion's progress.
pub const EXPANDING: &str = "Expanding";

/// What both engines serve: the smaller of their sizes when both answer; otherwise what was known.
pub fn capacity(old: u64, observed: &Observed) -> u64 {
    match observed
        .engines
        .each_ref()
        .map(|e| e.as_ref().map(|s| s.size))
    {
        [Some(a), Some(b)] if a > 0 && b > 0 => a.min(b),
        [Some(one), None] | [None, Some(one)] if old == 0 => one,
        _ => old,
    }
}

/// The primary's size when it serves less than `want` (and answers as primary): it is to grow.
pub fn needs_resize(want: u64, status: &MirroredVolumeStatus, observed: &Observed) -> bool {
    let slot = primary_slot(status);
    observed
        .engine(slot)
        .is_some_and(|e| e.role == Some(EngineRole::Primary) && e.size > 0 && e.size < want)
}

impl MirroredVolume {
    /// Asks the primary to grow when the spec asks for more than it serves; records the outcome in
    /// `status.capacityBytes` and the `Expanding` condition (an event when its reason changes).
    pub(super) async fn grow(&self, ctx: &Context, plan: &mut Plan) {
        let Ok(want) = plan::volume_bytes(self) else {
            return;
        };
        let old_reason = plan
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == EXPANDING)
            .map(|c| c.reason.clone());
        let now = stamp(Timestamp::now()).to_string();
        let generation = self.metadata.generation;
        let set = |status: &mut MirroredVolumeStatus, on: bool, reason: &str, message: &str| {
            failover::set_condition(
                &mut status.conditions,
                EXPANDING,
                on,
                reason,
                message,
                generation,
                &now,
            );
        };
        if plan.status.capacity_bytes >= want {
            if old_reason.as_deref().is_some_and(|r| r != "Expanded") {
                let text = format!("both engines serve {} bytes", plan.status.capacity_bytes);
                set(&mut plan.status, false, "Expanded", &text);
                plan.notes.push(note("Expanded", text));
            }
            return;
        }
        if !needs_resize(want, &plan.status, &plan.observed) {
            // The primary already serves it (the secondary catches up when it answers again), or no
            // primary answers: looked at again next pass.
            return;
        }
        let slot = primary_slot(&plan.status);
        let target = EngineTarget {
            address: plan::engine_address(self, slot, &ctx.config),
            volume: self.name_any_str(),
            token: plan.observed.token.clone(),
        };
        let (reason, text, warn_it) = match ctx.engines.resize(&target, want).await {
            Ok(size) => {
                info!(volume = %target.volume, size, "engines resized");
                if let Some(e) = plan.observed.engines[slot.index()].as_mut() {
                    e.size = size;
                }
                if let Some(e) = plan.observed.engines[slot.other().index()].as_mut() {
                    // The primary grows its secondary first: answered means both did.
                    e.size = e.size.max(size);
                }
                plan.status.capacity_bytes = capacity(plan.status.capacity_bytes, &plan.observed);
                ("Resized", format!("the engines grew to {size} bytes"), false)
            }
            Err(EngineError::Unimplemented { .. }) => (
                "ResizeNotSupported",
                format!(
                    "spec.size is {want} bytes but the engines serve {} and do not implement online expansion yet; the new size waits for engines that do",
                    plan.status.capacity_bytes
                ),
                true,
            ),
            Err(e) => {
                warn!(volume = %target.volume, error = %e, "resize failed; will retry");
                plan.requeue = Some(plan.requeue.map_or(RETRY, |r| r.min(RETRY)));
                ("ResizeFailed", format!("growing to {want} bytes: {e}"), true)
            }
        };
        let done = plan.status.capacity_bytes >= want;
        set(&mut plan.status, !done, reason, &text);
        if old_reason.as_deref() != Some(reason) {
            plan.notes.push(if warn_it {
                warning(reason, text)
            } else {
                note(reason, text)
            });
        }
    }

    fn name_any_str(&self) -> String {
        kube::ResourceExt::name_any(self)
    }
}

/// How soon a failed resize is tried again.
const RETRY: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{crd::Slot, engine::EngineState};

    fn observed(a: Option<u64>, b: Option<u64>) -> Observed {
        let mut o = crate::fixtures::observed_pair();
        o.engines = [a, b].map(|s| {
            s.map(|size| EngineState {
                size,
                role: Some(EngineRole::Primary),
                ..Default::default()
            })
        });
        o
    }

    #[test]
    fn capacity_is_what_both_serve() {
        assert_eq!(
            capacity(0, &observed(Some(2 << 30), Some(1 << 30))),
            1 << 30
        );
        assert_eq!(
            capacity(5, &observed(Some(9), None)),
            5,
            "one engine: keep what was known"
        );
        assert_eq!(capacity(0, &observed(Some(9), None)), 9, "first answer");
        assert_eq!(capacity(7, &observed(None, None)), 7);
        let status = MirroredVolumeStatus::default();
        assert!(needs_resize(
            2 << 30,
            &status,
            &observed(Some(1 << 30), None)
        ));
        assert!(!needs_resize(
            1 << 30,
            &status,
            &observed(Some(1 << 30), None)
        ));
        let mut o = observed(Some(1 << 30), None);
        o.engines[Slot::A.index()].as_mut().unwrap().role = Some(EngineRole::Secondary);
        assert!(!needs_resize(2 << 30, &status, &o), "only a primary grows");
    }
}
