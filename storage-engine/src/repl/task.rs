//! The replication task of a paired engine: asks the state what to send (`state::Sending`) and
//! runs the matching session, reconnecting with backoff. Sessions end on a role change; the
//! task then asks again. A peer that announces itself (`repl::announce`) ends a backoff at once.

use std::{
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tracing::warn;

use super::{sender::SessionError, Repl};
use crate::{state::Sending, volume::Volume};

/// How long the task waits between failed sessions: from `min`, doubling up to `max`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

/// Runs until `stop` fires.
pub async fn run(
    vol: Arc<Volume>,
    repl: Arc<Repl>,
    mut stop: watch::Receiver<bool>,
    bounds: Backoff,
) {
    let mut backoff = bounds.min;
    loop {
        if *stop.borrow() {
            return;
        }
        let sending = vol.sending();
        if sending == Sending::Idle {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = repl.wake.notified() => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        let started = Instant::now();
        let r = if sending == Sending::Drain {
            super::drain::session(&vol, &repl, &mut stop).await
        } else {
            super::sender::session(&vol, &repl, &mut stop).await
        };
        repl.stats.set_connected(false);
        repl.stats.resyncing.store(false, Ordering::Relaxed);
        match r {
            Err(SessionError::Stopping) => return,
            Ok(()) | Err(SessionError::RoleChanged) => continue,
            Err(SessionError::PeerPrimaryNewer(epoch)) => {
                if let Err(e) = vol.step_down(epoch).await {
                    warn!(error = %e, "stepping down failed");
                }
                continue;
            }
            Err(e) => {
                if started.elapsed() > Duration::from_secs(2) {
                    backoff = bounds.min;
                }
                warn!(peer = %repl.peer(), error = %e, "replication link down; writes are tracked in the table");
                // Registered before the flag is raised: an announcement that sees the flag
                // always finds this waiter (Notify::notify_waiters stores no permit).
                let announced = repl.peer_back.notified();
                tokio::pin!(announced);
                announced.as_mut().enable();
                repl.backing_off.store(true, Ordering::Release);
                let woken = tokio::select! {
                    _ = tokio::time::sleep(backoff) => false,
                    _ = &mut announced => true,
                    _ = stop.changed() => false,
                };
                repl.backing_off.store(false, Ordering::Release);
                backoff = if woken {
                    bounds.min
                } else {
                    (backoff * 2).min(bounds.max)
                };
            }
        }
    }
}
