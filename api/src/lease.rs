//! The write lease's one formula, shared by the engine (its promise as the peer) and the operator (its
//! wait as the witness), so the two can never disagree.

use std::time::Duration;

/// How long a granter waits after its last renewal before the other engine may be promoted by force:
/// the lease plus 10% for the two clocks' rates plus 500 ms for scheduling and the reply in flight.
pub fn guard(lease_ms: u32) -> Duration {
    let lease = Duration::from_millis(u64::from(lease_ms));
    lease + lease / 10 + Duration::from_millis(500)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_is_the_lease_plus_a_tenth_plus_half_a_second() {
        assert_eq!(guard(10_000), Duration::from_millis(11_500));
        assert_eq!(guard(1_000), Duration::from_millis(1_600));
        assert_eq!(guard(0), Duration::from_millis(500));
    }
}
