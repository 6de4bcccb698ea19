//! The write lease of a paired volume (`crate::lease` has the rules): the renewal task of a
//! primary, the peer's answer, the witness's grant, and the wait a forced promotion owes.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use crate::{
    client::{channel, TokenInterceptor},
    error::EngineError,
    lease::mono_us,
    meta::Role,
    pb,
};

use super::Volume;

impl Volume {
    /// Peer.RenewLease, on the peer of a primary: answering is the renewal, and promises that this
    /// engine is not promoted by force before the answer + the lease's guard. Refused when this
    /// engine serves at the caller's epoch or knows a newer one: the caller is no longer primary.
    pub fn answer_lease(
        &self,
        req: &pb::RenewLeaseRequest,
    ) -> Result<pb::RenewLeaseReply, EngineError> {
        let Some(repl) = &self.repl else {
            return Err(EngineError::NotPaired("volume is not paired"));
        };
        let state = self.state();
        if state.epoch > req.epoch {
            return Err(EngineError::StaleEpoch(format!(
                "this engine is at epoch {}, the lease asked for epoch {}",
                state.epoch, req.epoch
            )));
        }
        if state.role == Role::Primary && state.epoch == req.epoch {
            return Err(EngineError::WrongRole(format!(
                "this engine is itself primary at epoch {}",
                state.epoch
            )));
        }
        // Promised before the answer leaves: the holder's lease is counted from a stamp taken
        // before its request left, so it ends before this promise does.
        repl.lease.promise(req.lease_ms);
        Ok(pb::RenewLeaseReply { epoch: state.epoch })
    }

    /// Engine.GrantLease, on a primary: the witness renews the lease from a stamp of this
    /// engine's own clock it read earlier (`StatusReply.clock_us`), never from the grant's arrival.
    pub fn grant_lease(
        &self,
        req: &pb::GrantLeaseRequest,
    ) -> Result<pb::GrantLeaseReply, EngineError> {
        let Some(repl) = &self.repl else {
            return Err(EngineError::NotPaired(
                "volume is not paired: an unpaired primary needs no lease",
            ));
        };
        let lease = &repl.lease;
        let state = self.state();
        let refuse = |why: String| Err(EngineError::LeaseRefused(why));
        if !lease.enabled() {
            return refuse("leases are off on this engine (--lease-ms 0)".into());
        }
        if state.role != Role::Primary {
            return refuse(format!("this engine is {} (not primary)", state.role));
        }
        if req.instance != lease.instance() {
            return refuse("the stamp comes from another run of this engine (it restarted)".into());
        }
        if req.epoch != state.epoch {
            return refuse(format!(
                "the stamp was read at epoch {}, this engine is at {}",
                req.epoch, state.epoch
            ));
        }
        if req.stamp_us == 0 || req.stamp_us > mono_us() {
            return refuse("the stamp is not a time this engine reported".into());
        }
        lease.renew(req.stamp_us, req.lease_ms);
        if lease.consent(req.allow_async) && repl.mode == crate::repl::Mode::Sync {
            self.areas.event(if req.allow_async {
                "SyncFallbackAllowed (the witness consents: writes are acknowledged without the peer)"
            } else {
                "SyncFallbackWithdrawn (writes wait for the peer again)"
            });
        }
        Ok(pb::GrantLeaseReply {
            lease_remaining_ms: lease.remaining().as_millis() as u64,
            sync_fallback: lease.async_consent(),
        })
    }

    /// A forced promotion of this engine: waits until the old primary's lease has provably run
    /// out (this engine's promise to it), at most `budget`. Invariant: a forced promotion never
    /// starts while the old primary may still acknowledge a write. Test: `tests/lease.rs`
    /// `a_forced_promotion_waits_for_the_old_primarys_lease`.
    pub(crate) async fn wait_out_peer_lease(&self, budget: Duration) -> Result<(), EngineError> {
        let Some(repl) = &self.repl else {
            return Ok(());
        };
        let left = repl.lease.promise_remaining();
        if left.is_zero() {
            return Ok(());
        }
        if left > budget {
            return Err(EngineError::LeaseHeld(format!(
                "the old primary may hold its write lease for {} ms more; nothing was promoted, \
                 retry then",
                left.as_millis()
            )));
        }
        self.areas.event(format!(
            "LeaseWait ms={} (the old primary's lease runs out first)",
            left.as_millis()
        ));
        tokio::time::sleep(left).await;
        // A renewal answered meanwhile (the old primary is back): wait again, within the budget.
        let more = repl.lease.promise_remaining();
        if !more.is_zero() {
            return Err(EngineError::LeaseHeld(format!(
                "the old primary renewed its lease while this engine waited ({} ms left)",
                more.as_millis()
            )));
        }
        Ok(())
    }
}

/// The primary's lease renewal: asks the peer every quarter lease, and at once when woken (a
/// promotion). The stamp is taken before the request leaves (`crate::lease`).
pub async fn renew_task(vol: Arc<Volume>, mut stop: watch::Receiver<bool>) {
    let Some(repl) = vol.repl.clone() else { return };
    let lease = &repl.lease;
    if !lease.enabled() {
        return;
    }
    let every =
        Duration::from_millis(u64::from(lease.lease_ms()) / 4).max(Duration::from_millis(20));
    let interceptor = match TokenInterceptor::new(repl.token.as_deref()) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(error = %e, "lease renewal disabled: bad token");
            return;
        }
    };
    let mut client = None;
    loop {
        if *stop.borrow() {
            return;
        }
        let state = vol.state();
        if state.role == Role::Primary {
            let stamp = mono_us();
            let attempt = async {
                if client.is_none() {
                    let ch = channel(&repl.peer(), every)
                        .await
                        .map_err(|e| e.to_string())?;
                    client = Some(pb::peer_client::PeerClient::with_interceptor(
                        ch,
                        interceptor.clone(),
                    ));
                }
                let Some(c) = client.as_mut() else {
                    return Err("no channel".to_string());
                };
                c.renew_lease(pb::RenewLeaseRequest {
                    volume: vol.name().to_string(),
                    epoch: state.epoch,
                    lease_ms: lease.lease_ms(),
                })
                .await
                .map(|r| r.into_inner())
                .map_err(|s| s.message().to_string())
            };
            match tokio::time::timeout(every, attempt).await {
                Ok(Ok(_)) if vol.state().epoch == state.epoch => {
                    lease.renew(stamp, lease.lease_ms())
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "lease renewal refused or failed");
                    client = None;
                }
                Err(_) => client = None,
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = vol.areas.lease_wake.notified() => {}
            _ = stop.changed() => {}
        }
    }
}
