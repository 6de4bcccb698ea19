//! A secondary without a stream tells its primary it is there (`Peer.Announce`), so a primary
//! waiting out its reconnect backoff (up to `--reconnect-max-ms`) tries at once. Only the primary
//! opens streams; this changes nothing but when it tries. DRBD gets the same effect by letting
//! both sides connect.
//!
//! The secondary announces when it starts and whenever its stream ends, with its own backoff,
//! until a stream arrives. A dead primary costs one failed connect per backoff step.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use tokio::sync::watch;
use tracing::{debug, info};

use crate::{
    client::{channel, TokenInterceptor},
    meta::Role,
    pb,
    volume::Volume,
};

use super::Repl;

/// Peer.Announce, on the primary: ends a reconnect backoff now.
pub fn answer(vol: &Volume, repl: &Repl) -> pb::AnnounceReply {
    let waiting = vol.role() == Role::Primary && repl.backing_off.load(Ordering::Acquire);
    if waiting {
        repl.peer_back.notify_waiters();
    }
    pb::AnnounceReply {
        epoch: vol.epoch(),
        role: pb::Role::from(vol.role()) as i32,
        woken: waiting,
    }
}

/// The secondary's side: runs until `stop` fires.
pub async fn task(vol: Arc<Volume>, mut stop: watch::Receiver<bool>, bounds: super::task::Backoff) {
    let Some(repl) = vol.repl.clone() else { return };
    let interceptor = match TokenInterceptor::new(repl.token.as_deref()) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(error = %e, "announcements disabled: bad token");
            return;
        }
    };
    let mut backoff = bounds.min;
    loop {
        if *stop.borrow() {
            return;
        }
        let streamless =
            vol.role() == Role::Secondary && !repl.stats.connected.load(Ordering::Acquire);
        if !streamless {
            backoff = bounds.min;
            // The link going down wakes this at once; the tick catches role changes.
            tokio::select! {
                _ = repl.stats.link_down.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        let peer = repl.peer();
        let attempt = async {
            let ch = channel(&peer, Duration::from_secs(1))
                .await
                .map_err(|e| e.to_string())?;
            pb::peer_client::PeerClient::with_interceptor(ch, interceptor.clone())
                .announce(pb::AnnounceRequest {
                    volume: vol.name().to_string(),
                    epoch: vol.epoch(),
                })
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| s.message().to_string())
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(r)) if r.woken => {
                info!(peer = %peer, "announced to the primary; it reconnects now");
            }
            Ok(Ok(r)) => debug!(peer = %peer, role = r.role, "announced; the peer was not waiting"),
            Ok(Err(e)) => debug!(peer = %peer, error = %e, "announcement failed"),
            Err(_) => debug!(peer = %peer, "announcement timed out"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => {}
        }
        backoff = (backoff * 2).min(bounds.max);
    }
}
