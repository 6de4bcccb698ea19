//! The primary's write lease and the peer's promise (issue 12): a partitioned primary stops
//! acknowledging host writes before anyone may promote its peer over it.
//!
//! - A paired primary acknowledges a host write or flush only while it holds a lease
//!   (`Lease::held`). The lease runs from a stamp of its own monotonic clock taken *before* the
//!   request that renewed it left: `Peer.RenewLease` to its peer (the peer's answer is the
//!   renewal), the old primary's `FenceAndHandoff` answer at a takeover, or a witness's
//!   `Engine.GrantLease`, which echoes a `clock_us` this engine reported earlier.
//! - Whoever renews promises not to promote the other engine (by force) before *its own* answer
//!   time + `guard(lease)`. The peer keeps that promise in `promise_until`; a restarted engine
//!   assumes it promised just before it went down (`Lease::new`). The witness keeps its own.
//!
//! Since the stamp precedes the granter's answer, the lease ends (on the holder's clock) before
//! the promise does (on the granter's clock); `guard` adds a margin for the two clocks' rates and
//! for the holder's own delay between its lease check and the reply leaving.
//! Tests: `lease::tests`, `tests/lease.rs`.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        OnceLock,
    },
    time::{Duration, Instant},
};

use tokio::sync::Notify;

/// Microseconds of this process's monotonic clock (never 0, so 0 can mean "none"). It starts an
/// hour in, so "a lease ago" is a valid stamp from the first moment.
pub fn mono_us() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(|| {
        let now = Instant::now();
        now.checked_sub(Duration::from_secs(3600)).unwrap_or(now)
    });
    base.elapsed().as_micros() as u64 + 1
}

/// A random number (std's hasher keys are drawn from the OS per `RandomState`).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(mono_us());
    h.finish()
}

/// How long a granter waits after its last renewal before the other engine may be promoted by
/// force; one formula for the engine and the operator (the witness).
pub use tandem_api::lease::guard;

/// The lease a paired engine holds as primary, and the promise it keeps as the peer.
#[derive(Debug)]
pub struct Lease {
    /// 0: leases are off (`--lease-ms 0`): writes never wait for one, sync mode falls back alone.
    lease_ms: u32,
    /// How long a host write waits for a lease (or, in sync mode, for the peer or the witness's
    /// consent) before it fails with EIO.
    wait: Duration,
    /// Monotonic µs until which host writes are acknowledged; 0 = none held.
    until: AtomicU64,
    /// Monotonic µs before which this engine must not be promoted by force.
    promise_until: AtomicU64,
    /// Sync mode: the witness allowed acknowledging without the peer.
    async_consent: AtomicBool,
    /// Random per process: a witness's echo from another incarnation is refused.
    instance: u64,
    /// Woken on every renewal and on a consent.
    pub renewed: Notify,
}

impl Lease {
    pub fn new(lease_ms: u32, wait: Duration) -> Self {
        let now = mono_us();
        let promise = if lease_ms == 0 {
            0
        } else {
            // After a restart: this engine may have promised just before it went down.
            now + guard(lease_ms).as_micros() as u64
        };
        Self {
            lease_ms,
            wait,
            until: AtomicU64::new(0),
            promise_until: AtomicU64::new(promise),
            async_consent: AtomicBool::new(false),
            instance: random_u64() | 1,
            renewed: Notify::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.lease_ms != 0
    }

    pub fn lease_ms(&self) -> u32 {
        self.lease_ms
    }

    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// Extends the lease to `stamp_us + min(ms, own lease)`; a stamp is never in the future.
    pub fn renew(&self, stamp_us: u64, ms: u32) {
        let ms = ms.min(self.lease_ms);
        let until = stamp_us.min(mono_us()) + u64::from(ms) * 1000;
        self.until.fetch_max(until, Ordering::AcqRel);
        self.renewed.notify_waiters();
    }

    /// Gives the lease up (this engine stopped being primary, or learned of a newer epoch).
    pub fn drop_lease(&self) {
        self.until.store(0, Ordering::Release);
    }

    /// Whether host writes may be acknowledged now.
    pub fn held(&self) -> bool {
        !self.enabled() || mono_us() < self.until.load(Ordering::Acquire)
    }

    pub fn remaining(&self) -> Duration {
        let until = self.until.load(Ordering::Acquire);
        Duration::from_micros(until.saturating_sub(mono_us()))
    }

    /// Waits until the lease is held, at most `wait`; false when it is not.
    pub async fn wait_held(&self) -> bool {
        let deadline = tokio::time::Instant::now() + self.wait;
        loop {
            let renewed = self.renewed.notified();
            tokio::pin!(renewed);
            renewed.as_mut().enable();
            if self.held() {
                return true;
            }
            // Woken by a renewal, or re-checked every 50 ms (a renewal needs no wake to count).
            let step = (tokio::time::Instant::now() + Duration::from_millis(50)).min(deadline);
            tokio::select! {
                _ = &mut renewed => {}
                _ = tokio::time::sleep_until(step) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return self.held();
            }
        }
    }

    /// The bound of a host write's wait for a lease, the peer or the witness.
    pub fn wait_bound(&self) -> Duration {
        self.wait
    }

    /// As the peer: this engine answered a renewal of the other one's lease of `ms`.
    pub fn promise(&self, ms: u32) {
        if self.lease_ms == 0 && ms == 0 {
            return;
        }
        let ms = ms.max(self.lease_ms);
        let until = mono_us() + guard(ms).as_micros() as u64;
        self.promise_until.fetch_max(until, Ordering::AcqRel);
    }

    /// How long before this engine may be promoted by force.
    pub fn promise_remaining(&self) -> Duration {
        let until = self.promise_until.load(Ordering::Acquire);
        Duration::from_micros(until.saturating_sub(mono_us()))
    }

    /// Sync mode: the witness's consent to acknowledge without the peer (`allow_async`).
    pub fn consent(&self, yes: bool) -> bool {
        let before = self.async_consent.swap(yes, Ordering::AcqRel);
        if yes {
            self.renewed.notify_waiters();
        }
        before != yes
    }

    pub fn async_consent(&self) -> bool {
        self.async_consent.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_runs_from_its_stamp_not_from_its_arrival() {
        let l = Lease::new(1000, Duration::from_millis(10));
        assert!(!l.held(), "a new primary holds no lease until renewed");
        let long_ago = mono_us().saturating_sub(2_000_000);
        l.renew(long_ago, 1000);
        assert!(
            !l.held(),
            "a renewal stamped more than a lease ago grants nothing"
        );
        l.renew(mono_us(), 1000);
        assert!(l.held());
        assert!(l.remaining() <= Duration::from_millis(1000));
        l.drop_lease();
        assert!(!l.held());
    }

    #[test]
    fn a_grant_never_exceeds_the_engines_own_lease_nor_starts_in_the_future() {
        let l = Lease::new(100, Duration::from_millis(10));
        l.renew(mono_us() + 60_000_000, 60_000);
        assert!(l.remaining() <= Duration::from_millis(100));
    }

    #[test]
    fn a_restarted_engine_assumes_it_promised_a_moment_ago() {
        let l = Lease::new(1000, Duration::from_millis(10));
        assert!(l.promise_remaining() > Duration::from_millis(1000));
        let off = Lease::new(0, Duration::from_millis(10));
        assert_eq!(off.promise_remaining(), Duration::ZERO);
        assert!(off.held(), "with leases off every write is acknowledged");
    }

    #[test]
    fn the_promise_outlasts_the_lease_it_vouches_for() {
        let holder = Lease::new(1000, Duration::from_millis(10));
        let peer = Lease::new(0, Duration::from_millis(10));
        let stamp = mono_us();
        peer.promise(1000);
        holder.renew(stamp, 1000);
        assert!(peer.promise_remaining() > holder.remaining() + Duration::from_millis(500));
    }

    #[tokio::test]
    async fn a_writer_without_a_lease_waits_for_a_renewal_or_gives_up() {
        let l = std::sync::Arc::new(Lease::new(1000, Duration::from_millis(300)));
        let t0 = Instant::now();
        assert!(!l.wait_held().await);
        assert!(t0.elapsed() >= Duration::from_millis(300));
        let l2 = std::sync::Arc::clone(&l);
        let waiter = tokio::spawn(async move { l2.wait_held().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        l.renew(mono_us(), 1000);
        assert!(waiter.await.unwrap_or(false));
    }
}
