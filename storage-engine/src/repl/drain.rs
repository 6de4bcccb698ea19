//! The fenced old primary's side of a takeover: it drains its differential table to the engine
//! that now serves (the rest of the first processing), blocks a host is waiting for first, then
//! sends DrainComplete (the last data mark) and, once that is acknowledged, becomes secondary.

use std::{
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tracing::info;

use super::{
    sender::{Link, SessionError},
    Repl,
};
use crate::{
    bitmap::Bitmap,
    pb::{self, replication_message::Body},
    state::Sending,
    volume::Volume,
};

/// Resend what is still unacknowledged after this long without progress.
const STALL: Duration = Duration::from_secs(2);
/// An idle drain still says it is alive this often: the receiving end ends a stream silent for the
/// peer timeout (receiver::apply_loop).
const HEARTBEAT: Duration = Duration::from_millis(250);

/// Sends an empty heartbeat if nothing went out for `HEARTBEAT`.
async fn heartbeat(link: &mut Link<'_>, last_sent: &mut Instant) -> Result<(), SessionError> {
    if last_sent.elapsed() >= HEARTBEAT {
        let last_seq = link.repl.tracker.last_seq();
        link.send(
            Body::Heartbeat(pb::Heartbeat {
                last_seq,
                timestamp_us: crate::clock::now_us(),
                ..Default::default()
            }),
            64,
        )
        .await?;
        *last_sent = Instant::now();
    }
    Ok(())
}

pub async fn session(
    vol: &Arc<Volume>,
    repl: &Arc<Repl>,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), SessionError> {
    let drop_epoch = repl.faults.drop_epoch.load(Ordering::Relaxed);
    // The fence this drain belongs to (see `sender::session`).
    let at = (vol.role(), vol.epoch());
    let (tx, mut acks, hello) = super::sender::open_stream(repl).await?;
    if hello.role != pb::Role::Primary as i32 || hello.epoch != at.1 {
        return Err(SessionError::NotServingYet(hello.epoch));
    }
    repl.stats.set_connected(true);
    let total = repl.tracker.counts().pending_blocks;
    info!(
        blocks = total,
        "draining the differential table to the new primary"
    );
    vol.areas.event(format!("DrainStart blocks={total}"));
    let (done_tx, mut done_rx) = watch::channel(false);
    let ack_repl = Arc::clone(repl);
    let mut ack_task = tokio::spawn(async move {
        loop {
            let a = match super::sender::next_ack(&mut acks, &ack_repl.faults).await {
                Ok(a) => a,
                Err(e) => return e,
            };
            if a.durable {
                ack_repl.tracker.ack_images(&a.blocks, &a.generations);
                ack_repl
                    .stats
                    .resync_done
                    .fetch_add(a.blocks.len() as u64, Ordering::Relaxed);
                ack_repl.wake.notify_one();
            }
            if a.drain_complete {
                let _ = done_tx.send(true);
            }
        }
    });
    let fenced_epoch = at.1;
    if (vol.role(), vol.epoch()) != at || vol.sending() != Sending::Drain {
        ack_task.abort();
        return Err(SessionError::RoleChanged);
    }
    let mut link = Link::new(vol, repl, tx, stop, drop_epoch, at);
    let result = drain(&mut link, &mut ack_task, &mut done_rx).await;
    ack_task.abort();
    result?;
    vol.become_secondary(fenced_epoch).await?;
    Ok(())
}

async fn drain(
    link: &mut Link<'_>,
    ack_task: &mut tokio::task::JoinHandle<SessionError>,
    done_rx: &mut watch::Receiver<bool>,
) -> Result<(), SessionError> {
    let (vol, repl) = (link.vol, link.repl);
    let t = &repl.tracker;
    let mut sent = Bitmap::new(t.blocks());
    let mut last_progress = (Instant::now(), t.counts().pending_blocks);
    let mut last_sent = Instant::now();
    let stats = &repl.stats;
    stats.resync_total.store(last_progress.1, Ordering::Relaxed);
    stats.resync_done.store(0, Ordering::Relaxed);
    loop {
        if vol.sending() != Sending::Drain {
            return Err(SessionError::RoleChanged);
        }
        if let Some(r) = futures::FutureExt::now_or_never(&mut *ack_task) {
            return Err(r.unwrap_or(SessionError::Closed));
        }
        let pending = t.pending();
        if pending.is_empty() {
            break;
        }
        if pending.count() < last_progress.1 {
            last_progress = (Instant::now(), pending.count());
        } else if last_progress.0.elapsed() > STALL {
            // Acknowledgements were lost (a reconnect of the peer): send the rest again.
            sent = Bitmap::new(t.blocks());
            last_progress = (Instant::now(), pending.count());
        }
        let mut progressed = false;
        let mut cursor = 0;
        loop {
            // Blocks a host is waiting for jump the queue.
            let b = match repl.pop_priority() {
                Some(b) => b,
                None => match pending.next_one(cursor) {
                    Some(b) => {
                        cursor = b + 1;
                        if sent.get(b) {
                            continue;
                        }
                        b
                    }
                    None => break,
                },
            };
            let newer_there = {
                let st = vol.areas.state();
                st.newer_on_peer(b)
            };
            if newer_there {
                // The peer holds a newer version than ours: nothing of ours to send.
                t.forget(&[b]);
                continue;
            }
            // A fenced engine takes no writes: no block is written after the drain began.
            if link.send_image(b, false, u64::MAX).await? {
                sent.set(b);
                progressed = true;
            }
        }
        if progressed {
            last_sent = Instant::now();
        } else {
            tokio::select! {
                _ = repl.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                r = &mut *ack_task => return Err(r.unwrap_or(SessionError::Closed)),
            }
            heartbeat(link, &mut last_sent).await?;
        }
    }
    let final_seq = t.last_seq();
    link.send(Body::DrainComplete(pb::DrainComplete { final_seq }), 64)
        .await?;
    last_sent = Instant::now();
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        tokio::select! {
            r = done_rx.wait_for(|d| *d) => { r.map_err(|_| SessionError::Closed)?; break; }
            r = &mut *ack_task => return Err(r.unwrap_or(SessionError::Closed)),
            _ = tokio::time::sleep(HEARTBEAT) => {}
        }
        if Instant::now() > give_up {
            return Err(SessionError::Closed);
        }
        heartbeat(link, &mut last_sent).await?;
    }
    vol.areas
        .event(format!("DrainComplete acknowledged final_seq={final_seq}"));
    Ok(())
}
