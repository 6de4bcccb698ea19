//! The operator as the pair's witness (issue 12): it grants the primary a write lease when its peer does
//! not renew it, and it remembers, per volume and on its own monotonic clock, when it last sent one, so that
//! it never promotes the other engine by force while a lease it granted may still run.
//!
//! Safety invariant: no forced promotion before (last grant sent + guard(lease)) on the operator's
//! clock; a fresh operator assumes it sent one at its start (it may have granted just before a restart).
//! Tests: `failover::tests::forced_promotion_waits_out_the_witness_lease`,
//! `tests/failover_engines.rs` `operator_down_during_a_node_loss_waits_a_lease_from_its_start`.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use tandem_api::lease::guard;

/// The witness's clock for one volume, read when the volume is observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseClock {
    /// The lease of the last grant (for the grant assumed at start: the spec's).
    pub lease_ms: u32,
    /// Monotonic time since the operator last sent a grant for this volume, or since it started.
    pub since_grant: Duration,
}

impl LeaseClock {
    /// A clock whose last grant is long over (tests of decisions that do not depend on it).
    pub fn long_ago(lease_ms: u32) -> Self {
        LeaseClock {
            lease_ms,
            since_grant: Duration::from_secs(24 * 3600),
        }
    }

    /// How long before a lease the operator granted has provably run out: the engines' guard (the
    /// lease plus a margin) after the grant was sent. The engine's stamp precedes our send, and the
    /// sent time we keep is read after the call returned (later than the send), so the wait only errs
    /// long.
    pub fn wait_left(&self) -> Duration {
        if self.lease_ms == 0 {
            return Duration::ZERO;
        }
        let wait = guard(self.lease_ms);
        wait.saturating_sub(self.since_grant)
    }
}

/// What the operator remembers of its grants, per volume (`namespace/name`).
#[derive(Debug)]
pub struct Witness {
    started: Instant,
    sent: Mutex<HashMap<String, (Instant, u32)>>,
}

impl Default for Witness {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl Witness {
    /// A witness that started at `started`: every volume counts as granted then.
    pub fn new(started: Instant) -> Self {
        Witness {
            started,
            sent: Mutex::new(HashMap::new()),
        }
    }

    /// The clock of volume `key` at `now`; `spec_lease_ms` is the lease assumed for the grant at start.
    pub fn clock(&self, key: &str, spec_lease_ms: u32, now: Instant) -> LeaseClock {
        let sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        let (at, lease_ms) = sent
            .get(key)
            .copied()
            .unwrap_or((self.started, spec_lease_ms));
        LeaseClock {
            // A spec lowered after a grant must not shorten the wait for that grant.
            lease_ms: lease_ms.max(spec_lease_ms),
            since_grant: now.saturating_duration_since(at),
        }
    }

    /// Records a grant to volume `key`, read after the call returned (or failed: it may have arrived).
    pub fn sent(&self, key: &str, at: Instant, lease_ms: u32) {
        let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        sent.insert(key.to_string(), (at, lease_ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_witness_counts_its_start_as_a_grant() {
        let t0 = Instant::now();
        let w = Witness::new(t0);
        let c = w.clock("ns/v", 1000, t0 + Duration::from_millis(600));
        // guard (1000 + 100 + 500) = 1600 ms after the start.
        assert_eq!(c.wait_left(), Duration::from_millis(1000));
        assert_eq!(
            w.clock("ns/v", 1000, t0 + Duration::from_secs(3))
                .wait_left(),
            Duration::ZERO
        );
        // A grant moves the wait; a lower spec lease does not shorten it.
        w.sent("ns/v", t0 + Duration::from_secs(3), 1000);
        let c = w.clock("ns/v", 500, t0 + Duration::from_secs(4));
        assert_eq!(c.wait_left(), Duration::from_millis(600));
        // Other volumes keep the start.
        assert_eq!(
            w.clock("ns/x", 1000, t0 + Duration::from_secs(4))
                .wait_left(),
            Duration::ZERO
        );
        assert_eq!(LeaseClock::long_ago(10_000).wait_left(), Duration::ZERO);
        // Leases off: nothing to wait for.
        assert_eq!(
            Witness::new(t0).clock("v", 0, t0).wait_left(),
            Duration::ZERO
        );
    }
}
