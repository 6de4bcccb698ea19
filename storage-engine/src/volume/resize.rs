//! Online expansion (issue 14): `Engine.Resize` on the primary grows the secondary first
//! (`Peer.Resize`), then itself; a restart with a larger `--size` grows the same way.
//!
//! A grow, in order (`grow_to`). Invariant: a power loss at any step leaves the old size or the
//! new one, each with every file consistent with it:
//! 1. the data file and the overlay get their new length (a hole, reading zeros), fsync'd. Cut
//!    here, `meta` still says the old size and the longer file is cut back at open
//!    (`BlockStore::open_committed`, `Areas::open`): nothing was written past the old size;
//! 2. `meta.size` = new (atomic replace, directory fsync'd): the commit point;
//! 3. the per-block tables (differential table, intent extents, heartbeat set, takeover bitmaps,
//!    an unfinished loss export's set) grow in memory, the new blocks owing nothing. Their files
//!    grow at their next store; one stored at a size the volume had (`meta.grown_from`, written
//!    with the new size) loads grown (`Bitmap::load_grown`), so a cut after 2 is the new size with
//!    tables that say what they said;
//! 4. the new size is published: only now may any request (a new NBD session, a replicated
//!    record) reach a new block, so no bit of a new block is ever set in a table not yet grown.
//!
//! Tests: `resize_tests::power_loss_at_every_step_of_a_grow`, `tests/resize.rs`.

use std::sync::atomic::Ordering;

use tandem_api::client::{channel, peer_timeout, TokenInterceptor};

use crate::{
    error::EngineError,
    geometry::{blocks_in, BS},
    meta::Role,
    pb,
    repl::Repl,
    store::StoreError,
};

use super::{OpenError, Volume};

/// A size a grow may go to: a positive multiple of the block size.
fn check_size(size: u64) -> Result<u64, EngineError> {
    if size == 0 || size % BS != 0 {
        return Err(EngineError::InvalidArgument(format!(
            "size {size} is not a positive multiple of the block size ({BS} bytes)"
        )));
    }
    Ok(size)
}

fn shrink_refused(now: u64, asked: u64) -> EngineError {
    EngineError::InvalidArgument(format!(
        "the volume is {now} bytes; shrinking it to {asked} bytes is not supported (nothing changed)"
    ))
}

impl Volume {
    /// Engine.Resize, on the primary: the secondary grows first, so writes past the old size
    /// never stream to a copy that cannot hold them; an unreachable secondary fails the call
    /// (PeerUnreachable, retryable) and this engine keeps its size.
    pub async fn resize(&self, req: &pb::ResizeRequest) -> Result<pb::ResizeReply, EngineError> {
        let new = check_size(req.size)?;
        // One takeover or resize at a time: a takeover cannot start between the peer's grow and
        // ours, and none is draining or merging while we grow.
        let _one = self.takeover_lock.lock().await;
        let state = self.state();
        if state.role != Role::Primary {
            return Err(EngineError::WrongRole(format!(
                "this engine is {} at epoch {}; resize the primary",
                state.role, state.epoch
            )));
        }
        if req.epoch != 0 && req.epoch != state.epoch {
            return Err(EngineError::StaleEpoch(format!(
                "this engine is primary at epoch {}, the request is for epoch {}",
                state.epoch, req.epoch
            )));
        }
        // The copier's table and watermark cover the size the move started with.
        crate::repl::mover::refuse_while_moving(self, "a resize")?;
        if self.areas.active() {
            return Err(EngineError::TakeoverInProgress(format!(
                "a takeover is {:?} at epoch {}; retry once it is done",
                self.areas.phase(),
                state.epoch
            )));
        }
        let now = self.size();
        if new < now {
            return Err(shrink_refused(now, new));
        }
        if new == now {
            return Ok(pb::ResizeReply {
                size: now,
                peer_size: 0,
            });
        }
        let peer_size = match &self.repl {
            Some(r) => self.resize_peer(r, state.epoch, new).await?,
            None => 0,
        };
        self.grow_to(new).await?;
        Ok(pb::ResizeReply {
            size: self.size(),
            peer_size,
        })
    }

    /// Peer.Resize, on the secondary: grows and persists the size, so a restart with the old
    /// `--size` keeps the new one.
    pub async fn answer_resize(
        &self,
        req: &pb::ResizeRequest,
    ) -> Result<pb::ResizeReply, EngineError> {
        let new = check_size(req.size)?;
        let _one = self.takeover_lock.lock().await;
        let state = self.state();
        if state.epoch > req.epoch {
            return Err(EngineError::StaleEpoch(format!(
                "this engine is at epoch {}, the resize came from epoch {}",
                state.epoch, req.epoch
            )));
        }
        if state.role != Role::Secondary {
            return Err(EngineError::WrongRole(format!(
                "this engine is {} at epoch {}, not the secondary",
                state.role, state.epoch
            )));
        }
        let now = self.size();
        if new < now {
            return Err(shrink_refused(now, new));
        }
        if new > now {
            self.grow_to(new).await?;
        }
        Ok(pb::ResizeReply {
            size: self.size(),
            peer_size: 0,
        })
    }

    /// Asks the secondary to grow, over the peer path (the engine's TLS and the volume token).
    async fn resize_peer(&self, r: &Repl, epoch: u64, size: u64) -> Result<u64, EngineError> {
        let bound = peer_timeout();
        let interceptor = TokenInterceptor::new(r.token.as_deref())
            .map_err(|e| EngineError::InvalidArgument(format!("peer token: {e}")))?;
        let unreachable = |why: String| {
            EngineError::PeerUnreachable(format!(
                "the secondary at {} did not answer ({why}); this engine keeps {} bytes",
                r.peer(),
                self.size()
            ))
        };
        let call = async {
            let ch = channel(&r.peer(), bound)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            pb::peer_client::PeerClient::with_interceptor(ch, interceptor)
                .resize(pb::ResizeRequest {
                    volume: self.name().to_string(),
                    epoch,
                    size,
                })
                .await
                .map(|r| r.into_inner())
                .map_err(|s| {
                    if crate::takeover::handoff::unreachable(&s) {
                        return unreachable(s.message().to_string());
                    }
                    let why = format!("the secondary refused: {}", s.message());
                    match tandem_api::Reason::of(&s) {
                        Some(tandem_api::Reason::StaleEpoch) => EngineError::StaleEpoch(why),
                        Some(tandem_api::Reason::InvalidArgument) => {
                            EngineError::InvalidArgument(why)
                        }
                        _ => EngineError::WrongRole(why),
                    }
                })
        };
        let reply = tokio::time::timeout(bound, call)
            .await
            .map_err(|_| unreachable(format!("no answer within {} ms", bound.as_millis())))??;
        if reply.size < size {
            return Err(EngineError::Io(format!(
                "the secondary answered the resize with {} bytes, not {size}",
                reply.size
            )));
        }
        Ok(reply.size)
    }

    /// Grows this engine to `new` bytes (steps in the module comment). Host I/O waits only for
    /// steps 2-4 (the gate, as a role change takes it); the data file's fsync runs before.
    pub(crate) async fn grow_to(&self, new: u64) -> Result<(), EngineError> {
        self.store.extend_file(new)?;
        self.areas.overlay.extend_file(new)?;
        let _gate = self.gate.write().await;
        self.grow_committed(new)
    }

    /// Steps 2-4 of a grow; the files already have their new length.
    fn grow_committed(&self, new: u64) -> Result<(), EngineError> {
        let old = self.size();
        self.areas.seams.hit("grow-before-commit");
        self.update_meta(|m| {
            if m.size < new {
                m.grown_from.push(m.size);
            }
            m.size = new;
        })
        .map_err(|e| EngineError::Io(e.to_string()))?;
        let blocks = blocks_in(new);
        if let Some(r) = &self.repl {
            r.tracker.grow(blocks);
        }
        if let Some(p) = self.replica().peer_pending.as_mut() {
            p.grow(blocks);
        }
        self.areas.grow(new);
        self.losses.grow(new);
        self.store.publish_size(new);
        self.counters.resizes.fetch_add(1, Ordering::Relaxed);
        self.areas
            .event(format!("Resized from={old} to={new} bytes"));
        Ok(())
    }

    /// At open: a larger `--size` grows the volume; a smaller one never shrinks it (the operator
    /// may lag behind a resize) and never stops the engine.
    pub(super) fn grow_at_open(&self, wanted: u64) -> Result<(), OpenError> {
        let now = self.size();
        if wanted < now {
            tracing::warn!(
                volume = %self.name(),
                size = now,
                asked = wanted,
                "--size is smaller than the volume's size: keeping {now} bytes (volumes never shrink)"
            );
            return Ok(());
        }
        if wanted == now {
            return Ok(());
        }
        if wanted % BS != 0 {
            return Err(StoreError::UnalignedSize(wanted).into());
        }
        if self.areas.active() {
            tracing::warn!(
                volume = %self.name(),
                size = now,
                asked = wanted,
                "a takeover is in progress: the volume keeps {now} bytes until it ends (restart or call resize then)"
            );
            return Ok(());
        }
        let io = |source| OpenError::StateDir {
            path: self.data_path().to_path_buf(),
            source,
        };
        self.store.extend_file(wanted).map_err(io)?;
        self.areas.overlay.extend_file(wanted).map_err(io)?;
        // Nobody else holds this volume yet: no gate to take.
        self.grow_committed(wanted)
            .map_err(|e| io(std::io::Error::other(e.to_string())))?;
        tracing::info!(volume = %self.name(), from = now, to = wanted, "grew to --size");
        Ok(())
    }
}
