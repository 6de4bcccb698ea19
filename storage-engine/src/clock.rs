//! Wall-clock time for what leaves the process (heartbeats, lag, events). A leaf module.
//! Deadlines and timeouts use `std::time::Instant`, never this.

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch (0 if the clock is before it).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
