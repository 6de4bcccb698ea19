//! Accepting connections without spinning. When accept(2) fails for want of a resource
//! (EMFILE, ENFILE, ENOMEM, ENOBUFS) the pending connection stays in the kernel's queue and the
//! listener stays readable, so a plain retry loop burns a core until a descriptor frees up. The
//! NBD listeners and every HTTP listener back off instead: 50 ms, doubling to 1 s, logged once per
//! burst and counted.

use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

/// The first pause after a failed accept.
pub const FIRST_PAUSE: Duration = Duration::from_millis(50);
/// The longest pause: a freed descriptor is used within a second.
pub const MAX_PAUSE: Duration = Duration::from_secs(1);

/// The back-off state of one accept loop.
#[derive(Debug)]
pub struct Backoff {
    what: &'static str,
    pause: Option<Duration>,
    burst: u64,
}

impl Backoff {
    /// `what` names the listener in the log ("nbd", "http").
    pub fn new(what: &'static str) -> Backoff {
        Backoff {
            what,
            pause: None,
            burst: 0,
        }
    }

    /// Whether the loop is pausing between failed accepts right now.
    pub fn backing_off(&self) -> bool {
        self.pause.is_some()
    }

    /// An accept failed: counts it in `errors` and waits before the next try. Errors that concern
    /// only the one connection (reset before it was accepted) are retried at once, uncounted: a
    /// client cannot slow the listener down by resetting its own connections.
    pub async fn failed(&mut self, e: &io::Error, errors: &AtomicU64) {
        if matches!(
            e.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::Interrupted
                | io::ErrorKind::WouldBlock
        ) {
            return;
        }
        errors.fetch_add(1, Ordering::Relaxed);
        self.burst += 1;
        let pause = match self.pause {
            None => {
                tracing::warn!(listener = self.what, error = %e,
                    "accept failed; pausing accepts until it succeeds again (logged once per burst)");
                FIRST_PAUSE
            }
            Some(p) => (p * 2).min(MAX_PAUSE),
        };
        self.pause = Some(pause);
        tokio::time::sleep(pause).await;
    }

    /// An accept succeeded: the burst, if any, is over.
    pub fn succeeded(&mut self) {
        if self.pause.take().is_some() {
            tracing::info!(
                listener = self.what,
                failed = self.burst,
                "accepting again after failed accepts"
            );
            self.burst = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pauses_double_to_a_second_and_reset_on_success() {
        let errors = AtomicU64::new(0);
        let mut b = Backoff::new("test");
        let emfile = io::Error::from_raw_os_error(24);
        let mut pauses = Vec::new();
        for _ in 0..8 {
            let t = tokio::time::Instant::now();
            b.failed(&emfile, &errors).await;
            pauses.push(t.elapsed().as_millis());
        }
        assert_eq!(pauses, [50, 100, 200, 400, 800, 1000, 1000, 1000]);
        assert_eq!(errors.load(Ordering::Relaxed), 8);
        b.succeeded();
        assert!(!b.backing_off());
        let t = tokio::time::Instant::now();
        b.failed(&emfile, &errors).await;
        assert_eq!(t.elapsed(), FIRST_PAUSE);
        // A connection reset before accept is that client's problem: no pause, not counted.
        let t = tokio::time::Instant::now();
        b.failed(&io::ErrorKind::ConnectionAborted.into(), &errors)
            .await;
        assert_eq!(t.elapsed(), Duration::ZERO);
        assert_eq!(errors.load(Ordering::Relaxed), 9);
    }
}
