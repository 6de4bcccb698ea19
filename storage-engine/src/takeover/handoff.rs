//! Role changes: the handoff on both sides (FIG. 8), the drain's receiving end, and the
//! transitions back to secondary.
//!
//! Takeover and failback are the same operation: it is always called on the engine that is to
//! serve, and always fences and drains the other one. A failback is a takeover in the other
//! direction; the engine that was primary before keeps its own unsent table (DAT1), which is sent
//! once it serves again (the third processing).

use std::{
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use tonic::Status;

use crate::error::EngineError;

use crate::{
    bitmap::{Bitmap, EncodedBitmap, WireTable},
    client::{channel, TokenInterceptor},
    geometry::{BLOCK_SIZE, BS},
    meta::{Phase, Role},
    pb::{self, replication_message::Body},
    state::{self, Event},
    volume::{Applied, Volume},
    volume::{Carry, TransitionError},
};
/// The table a HandoffReply carries, parsed: the runs form if present, else the sparse words
/// (from a peer that predates the runs), else the dense bitmap (older still).
pub(crate) struct Handed {
    pub table: Bitmap,
    /// The file form to store, when the wire bytes are one (runs): stored as received.
    pub file: Option<EncodedBitmap>,
    pub form: &'static str,
    pub bytes: usize,
}

/// Parses the table of a handoff reply for a volume of `blocks` blocks. A malformed table or one
/// of another size is refused, with the reason, before anything is stored. Tests:
/// `takeover::tests::a_handoff_table_is_read_in_every_form_a_peer_may_send`,
/// `takeover::tests::a_malformed_handoff_table_is_refused_with_its_reason`.
pub(crate) fn handed_table(blocks: u64, h: &pb::HandoffReply) -> Result<Handed, String> {
    let bad = |why: String| format!("the peer's differential table is malformed: {why}");
    if let Some(r) = &h.pending_runs {
        let table = Bitmap::from_runs(blocks, r).map_err(bad)?;
        return Ok(Handed {
            table,
            file: Some(EncodedBitmap::from_runs(blocks, r)),
            form: "runs",
            bytes: r.len(),
        });
    }
    let (table, form, bytes) = match &h.pending_words {
        Some(w) => (Bitmap::from_sparse(blocks, w), "words", w.len()),
        None => (
            Bitmap::from_bytes(blocks, &h.pending_bitmap),
            "bitmap",
            h.pending_bitmap.len(),
        ),
    };
    let table = table.ok_or_else(|| {
        bad(format!(
            "{form} form of {bytes} bytes does not fit a table of {blocks} blocks"
        ))
    })?;
    Ok(Handed {
        table,
        file: None,
        form,
        bytes,
    })
}

/// How long one FenceAndHandoff attempt may take.
const ATTEMPT: Duration = Duration::from_secs(2);
/// Default for a takeover request without a timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest gRPC message a volume's tables can need: a pending set sent sparse is at most twice
/// its dense form (16 bytes per nonzero 64-bit word), plus room for the rest of the message. A
/// fixed cap would make a scattered backlog on a large volume impossible to hand over or announce.
/// Test: `takeover::tests::the_message_cap_fits_the_worst_table_of_a_volume`.
pub fn message_cap(volume_bytes: u64) -> usize {
    let words = (volume_bytes / BS).div_ceil(64);
    let worst = words.saturating_mul(16).saturating_add(1 << 20);
    usize::try_from(worst.max(64 << 20)).unwrap_or(usize::MAX)
}

type PeerClient = pb::peer_client::PeerClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, TokenInterceptor>,
>;

/// Why the old primary did not hand its table over.
#[derive(Debug)]
pub(crate) enum HandoffFailure {
    /// No answer: connect failed, the call timed out, the transport broke. The only case a
    /// forced promotion acts on.
    Unreachable(String),
    /// The peer answered, and said no (a bad token, a newer epoch, not a primary, a bad reply).
    /// Never a reason to promote: a live peer may still be serving.
    Refused(String),
}

/// Whether a gRPC failure means the peer could not be reached (as opposed to an answer). The
/// engine itself never answers with these codes; tonic reports transport failures with them.
pub(crate) fn unreachable_code(c: tonic::Code) -> bool {
    matches!(
        c,
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
    )
}

/// `unreachable_code`, and also an INTERNAL that tonic made locally from a broken HTTP/2 stream
/// (a peer killed mid-call resets it: "h2 protocol error"). Such a status carries its transport
/// error as its source; an engine's own INTERNAL answer comes from the trailers and has none.
/// Invariant: a forced promotion acts only on silence, never on an answer, and a dying peer's
/// reset is silence. Test: `tests::a_reset_stream_is_silence_an_internal_answer_is_not`.
pub(crate) fn unreachable(s: &tonic::Status) -> bool {
    unreachable_code(s.code())
        || (s.code() == tonic::Code::Internal && std::error::Error::source(s).is_some())
}

impl Volume {
    /// Peer.FenceAndHandoff, on the engine being replaced: finish in-flight host writes, refuse
    /// everything older than `new_epoch`, close host sessions, and hand over the differential
    /// table, all in one step. A repeat at the same epoch returns the table again (AT-34).
    /// `accepts_runs`: the caller reads `pending_runs` (an older caller gets `pending_words`).
    pub async fn fence_and_handoff(
        &self,
        new_epoch: u64,
        accepts_runs: bool,
    ) -> Result<pb::HandoffReply, EngineError> {
        let Some(repl) = &self.repl else {
            return Err(EngineError::NotPaired("volume is not paired"));
        };
        // A takeover during a live move is refused until the move is done or aborted: the move
        // would otherwise copy from an engine that no longer serves.
        crate::repl::mover::refuse_while_moving(self, "a takeover (FenceAndHandoff)")?;
        let t0 = Instant::now();
        let _gate = self.gate.write().await;
        let t_gate = t0.elapsed();
        let step = self.transition(Event::Fence { new_epoch }, Carry::default())?;
        let t_fence = t0.elapsed();
        if step.changes() {
            self.areas
                .event(format!("Fenced epoch={new_epoch} (host sessions closed)"));
        }
        // Blocks this engine still waits for from the peer (and did not overwrite since) are newer
        // there than here: our pending bit for them is stale, never hand it back (a failback or a
        // takeover before the previous drain finished).
        let stale: Vec<u64> = {
            let st = self.areas.state();
            if st.pending_count() == 0 {
                Vec::new()
            } else {
                repl.tracker.pending_where(|b| st.newer_on_peer(b))
            }
        };
        if !stale.is_empty() {
            repl.tracker.forget(&stale);
        }
        let t_scan = t0.elapsed();
        let (table, count, last_seq) = repl.tracker.handoff_snapshot(accepts_runs);
        let t_table = t0.elapsed();
        // The answer renews the new primary's lease (it stamped before asking): this engine
        // promises, as a peer answering RenewLease does.
        repl.lease.promise(repl.lease.lease_ms());
        // Where the old primary's part of the ready time goes (docs/benchmarks.md).
        self.areas.event(format!(
            "HandoffAnswered epoch={new_epoch} blocks={count} bytes={} form={} gate_us={} \
             fence_us={} scan_us={} table_us={}",
            table.len(),
            table.name(),
            t_gate.as_micros(),
            (t_fence - t_gate).as_micros(),
            (t_scan - t_fence).as_micros(),
            (t_table - t_scan).as_micros(),
        ));
        let (pending_runs, pending_words) = match table {
            WireTable::Runs(r) => (Some(r.into()), None),
            WireTable::Words(w) => (None, Some(w.into())),
        };
        Ok(pb::HandoffReply {
            epoch: new_epoch,
            pending_words,
            pending_runs,
            pending_blocks: count,
            last_seq,
            block_size: BS,
            ..Default::default()
        })
    }

    /// A takeover asked of the primary: the same epoch (or none) is a repeat and answers what the
    /// takeover that made it primary did; forced while draining, it abandons the drain (the old
    /// primary stays unreachable); any other epoch is refused.
    async fn repeat_on_primary(
        &self,
        req: &pb::TakeoverRequest,
        epoch: u64,
        force: bool,
        timeout: Duration,
    ) -> Result<pb::TakeoverReply, EngineError> {
        if req.new_epoch != 0 && req.new_epoch != epoch {
            return Err(EngineError::WrongRole(format!(
                "this engine is already primary at epoch {epoch}, not {}",
                req.new_epoch
            )));
        }
        if force && self.areas.phase() == Phase::Draining {
            return self.abandon_drain(timeout).await;
        }
        let m = self.meta().takeover.clone();
        Ok(pb::TakeoverReply {
            epoch,
            ready_ms: self.areas.ready_ms.load(Ordering::Relaxed),
            peer_pending_blocks: self.areas.state().pending_count(),
            lost_blocks: m.lost_blocks,
            lost_seq_from: m.lost_seq_from,
            lost_seq_to: m.lost_seq_to,
            already_primary: true,
        })
    }

    /// Engine.Takeover / Engine.Failback, on the engine that is to serve.
    pub async fn takeover(
        &self,
        req: pb::TakeoverRequest,
    ) -> Result<pb::TakeoverReply, EngineError> {
        let started = Instant::now();
        let Some(repl) = &self.repl else {
            return Err(EngineError::NotPaired(
                "volume is not paired: nothing to take over from",
            ));
        };
        let _one = self.takeover_lock.lock().await;
        let (role, epoch) = (self.role(), self.epoch());
        let force = req.policy == pb::TakeoverPolicy::Force as i32;
        let timeout = if req.timeout_ms == 0 {
            DEFAULT_TIMEOUT
        } else {
            Duration::from_millis(u64::from(req.timeout_ms))
        };
        let new_epoch = if req.new_epoch == 0 {
            epoch + 1
        } else {
            req.new_epoch
        };
        // Asked before the peer is: a takeover the state refuses never fences anyone. A primary
        // answers a repeat of the takeover that made it primary (the caller's retry) as done.
        match state::next(&self.state(), Event::Promote { new_epoch }) {
            Err(state::Refusal::AlreadyPrimary { epoch }) => {
                return self.repeat_on_primary(&req, epoch, force, timeout).await;
            }
            refused => {
                refused?;
            }
        }
        self.areas
            .event(format!("TakeoverRequested epoch={new_epoch} force={force}"));
        // Taken before the peer is asked: the handoff answer renews the lease from here.
        let stamp = crate::lease::mono_us();
        let asked = Instant::now();
        let handoff = self.ask_for_table(&repl.peer(), new_epoch, timeout).await;
        let ask = asked.elapsed();
        let blocks = self.size() / BS;
        let reply = match handoff {
            Ok(h) => {
                let t0 = Instant::now();
                let handed = handed_table(blocks, &h).map_err(EngineError::Corrupt)?;
                let parse = t0.elapsed();
                let pending = handed.table.count();
                let effects = self
                    .promote_checked(role, new_epoch, handed.table, handed.file, None)
                    .await?;
                let promote = t0.elapsed() - parse;
                repl.lease.renew(stamp, repl.lease.lease_ms());
                self.areas.lease_wake.notify_one();
                // The reply's table bytes and where the ready time went (bench/large-volume.sh
                // reads them).
                self.areas.event(format!(
                    "HandoffStored blocks={pending} bytes={} form={} peer_last_seq={} ask_us={} \
                     parse_us={} promote_us={} ({effects})",
                    handed.bytes,
                    handed.form,
                    h.last_seq,
                    ask.as_micros(),
                    parse.as_micros(),
                    promote.as_micros(),
                ));
                pb::TakeoverReply {
                    epoch: new_epoch,
                    peer_pending_blocks: pending,
                    ..Default::default()
                }
            }
            Err(HandoffFailure::Refused(why)) => {
                // Invariant: "force" means the peer is unreachable, never that it said no.
                // Test: `tests/takeover.rs` `force_never_promotes_over_a_peer_that_refuses`.
                self.areas.event("HandoffRefused");
                return Err(EngineError::HandoffRefused(why));
            }
            Err(HandoffFailure::Unreachable(why))
                if force && self.replica().inconsistent() && !req.allow_inconsistent =>
            {
                let msg = format!(
                    "HandoffBlocked: PeerUnreachable: {why}; not promoted: this replica is \
                     Inconsistent (a resync was cut short) and would serve a torn volume; pass \
                     allow_inconsistent (--allow-inconsistent) to promote it anyway"
                );
                self.areas
                    .set_condition(tandem_api::Reason::HandoffBlocked, msg.clone());
                return Err(EngineError::HandoffBlocked(msg));
            }
            Err(HandoffFailure::Unreachable(why)) if force => {
                // Invariant: a forced promotion starts only after the old primary's write lease
                // has provably run out (this engine's promise to it); it then holds no lease
                // itself until its peer or the witness grants one.
                self.wait_out_peer_lease(timeout).await?;
                let (lost, from, to) = {
                    let rs = self.replica();
                    if rs.applied_seq >= rs.peer_last_seq && !rs.inconsistent() {
                        // Every record the peer announced reached us: nothing known is lost.
                        (Bitmap::new(blocks), 0, 0)
                    } else {
                        // The pending set of the last heartbeat: a superset of what we lack.
                        let lost = rs
                            .peer_pending
                            .clone()
                            .unwrap_or_else(|| Bitmap::new(blocks));
                        let from = rs.applied_seq + 1;
                        (lost, from, rs.peer_last_seq.max(from))
                    }
                };
                let n = lost.count();
                self.promote_checked(
                    role,
                    new_epoch,
                    Bitmap::new(blocks),
                    None,
                    Some((lost, from, to)),
                )
                .await?;
                self.areas.lease_wake.notify_one();
                self.areas.event(format!(
                    "ForcePromoted lost_blocks={n} lost_seq={from}..{to} (known from the last heartbeat; \
                     what the old primary acknowledged after it is counted when it returns) ({why})"
                ));
                pb::TakeoverReply {
                    epoch: new_epoch,
                    lost_blocks: n,
                    lost_seq_from: if n > 0 { from } else { 0 },
                    lost_seq_to: if n > 0 { to } else { 0 },
                    ..Default::default()
                }
            }
            Err(HandoffFailure::Unreachable(why)) => {
                let msg = format!(
                    "HandoffBlocked: PeerUnreachable: {why}; not promoted (policy wait; \
                     use policy force to promote and lose the peer's unsent writes)"
                );
                self.areas
                    .set_condition(tandem_api::Reason::HandoffBlocked, msg.clone());
                self.areas.event("HandoffBlocked");
                return Err(EngineError::HandoffBlocked(msg));
            }
        };
        // Kept in memory for repeats and status; not worth an fsync on the reply's path.
        let ready_ms = started.elapsed().as_millis() as u64;
        self.areas.ready_ms.store(ready_ms, Ordering::Relaxed);
        self.areas.event(format!(
            "ServingReady epoch={new_epoch} ready_ms={ready_ms}"
        ));
        Ok(pb::TakeoverReply { ready_ms, ..reply })
    }

    /// Calls the peer until it answers or `timeout` passes. Each attempt (connect and call) is
    /// bounded by `ATTEMPT`; silence (see `unreachable_code`) is retried every 100 ms; an answer is
    /// returned at once: `Ok(Ok(reply))`, or `Ok(Err(status))` when it says no. `Err(last)` when
    /// the peer never answered.
    async fn ask_peer<T, F, Fut>(
        &self,
        peer: &str,
        timeout: Duration,
        mut call: F,
    ) -> Result<Result<T, Status>, String>
    where
        F: FnMut(PeerClient) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = Instant::now() + timeout;
        let token = self.repl.as_ref().and_then(|r| r.token.clone());
        let interceptor = match TokenInterceptor::new(token.as_deref()) {
            Ok(i) => i,
            Err(e) => return Ok(Err(Status::invalid_argument(e.to_string()))),
        };
        let cap = message_cap(self.size());
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = async {
                let ch = channel(peer, left.min(ATTEMPT))
                    .await
                    .map_err(|e| e.to_string())?;
                let c = pb::peer_client::PeerClient::with_interceptor(ch, interceptor.clone())
                    .max_decoding_message_size(cap);
                match call(c).await {
                    Ok(r) => Ok(Ok(r.into_inner())),
                    Err(s) if unreachable(&s) => Err(s.message().to_string()),
                    Err(s) => Ok(Err(s)),
                }
            };
            let last = match tokio::time::timeout(left.min(ATTEMPT), attempt).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(silence)) => silence,
                Err(_) => format!("peer {peer} did not answer in time"),
            };
            if Instant::now() + Duration::from_millis(100) >= deadline {
                return Err(last);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// FenceAndHandoff on the peer. A refusal is final at once; only silence is retried.
    async fn ask_for_table(
        &self,
        peer: &str,
        new_epoch: u64,
        timeout: Duration,
    ) -> Result<pb::HandoffReply, HandoffFailure> {
        let volume = self.name().to_string();
        let answer = self
            .ask_peer(peer, timeout, |mut c| {
                let req = pb::FenceRequest {
                    volume: volume.clone(),
                    new_epoch,
                    accepts_runs: true,
                };
                async move { c.fence_and_handoff(req).await }
            })
            .await;
        match answer {
            Ok(Ok(h)) if h.epoch == new_epoch => Ok(h),
            Ok(Ok(h)) => Err(HandoffFailure::Refused(format!(
                "peer {peer} answered at epoch {}, not {new_epoch}",
                h.epoch
            ))),
            Ok(Err(s)) => Err(HandoffFailure::Refused(format!(
                "peer {peer}: {:?}: {}",
                s.code(),
                s.message()
            ))),
            Err(last) => Err(HandoffFailure::Unreachable(format!("peer {peer}: {last}"))),
        }
    }

    /// A forced takeover on an engine that already serves but still waits for the old primary's
    /// drain. Only when that peer stays unreachable for `timeout` (never when it answers, whatever
    /// it says) are the blocks still pending from it given up: they read as this engine's own
    /// older copy from then on, are reported as lost like a forced promotion's, and are marked for
    /// sending back, so a returning old primary is overwritten instead of silently differing. The
    /// merge then starts. Test: `tests/takeover.rs` `a_drain_whose_old_primary_is_gone_can_be_abandoned`.
    async fn abandon_drain(&self, timeout: Duration) -> Result<pb::TakeoverReply, EngineError> {
        let Some(repl) = &self.repl else {
            return Err(EngineError::NotPaired("volume is not paired"));
        };
        if let Some(answer) = self.probe_peer(&repl.peer(), timeout).await {
            return Err(EngineError::DrainNotAbandoned(answer));
        }
        let _gate = self.gate.write().await;
        let n = self.areas.state().pending_count();
        // The table is stored empty before the phase moves on: a restart in between is still
        // draining, with nothing left to wait for.
        self.transition(Event::AbandonDrain, Carry::default())
            .map_err(|e| match e {
                TransitionError::Refused(_) => EngineError::Superseded(
                    "superseded: the drain ended or this engine stopped serving meanwhile".into(),
                ),
                TransitionError::Io(e) => EngineError::io(e),
            })?;
        self.areas.event(format!(
            "DrainAbandoned lost_blocks={n} (old primary unreachable)"
        ));
        let m = self.meta().takeover.clone();
        Ok(pb::TakeoverReply {
            epoch: self.epoch(),
            ready_ms: self.areas.ready_ms.load(Ordering::Relaxed),
            lost_blocks: m.lost_blocks,
            lost_seq_from: m.lost_seq_from,
            lost_seq_to: m.lost_seq_to,
            already_primary: true,
            ..Default::default()
        })
    }

    /// Asks the peer anything until `timeout`: `Some(what it said)` if it answered at all, `None`
    /// if it never could be reached.
    async fn probe_peer(&self, peer: &str, timeout: Duration) -> Option<String> {
        let (volume, epoch) = (self.name().to_string(), self.epoch());
        let answer = self
            .ask_peer(peer, timeout, |mut c| {
                let req = pb::ReadBlocksRequest {
                    volume: volume.clone(),
                    epoch,
                    blocks: Vec::new(),
                };
                async move { c.read_blocks(req).await }
            })
            .await;
        match answer {
            Ok(Ok(_)) => Some("it serves reads".to_string()),
            Ok(Err(s)) => Some(format!("{:?}: {}", s.code(), s.message())),
            Err(_) => None,
        }
    }

    /// Promotes under the gate, unless a concurrent role change (a fence by the peer, a drain that
    /// finished) got there first: then the takeover is refused and nothing changes. Answers the
    /// time of each effect (`promote`).
    async fn promote_checked(
        &self,
        role_at_start: Role,
        new_epoch: u64,
        table: Bitmap,
        file: Option<EncodedBitmap>,
        lost: Option<(Bitmap, u64, u64)>,
    ) -> Result<String, EngineError> {
        let _gate = self.gate.write().await;
        // A fenced engine whose own drain finished meanwhile is a secondary at the same epoch: still
        // fine to promote. Only a newer epoch (someone else's takeover) supersedes this one.
        let benign = role_at_start == Role::Fenced && self.role() == Role::Secondary;
        if (self.role() != role_at_start && !benign) || self.epoch() >= new_epoch {
            return Err(EngineError::Superseded(format!(
                "superseded: this engine became {} at epoch {} while taking over",
                self.role(),
                self.epoch()
            )));
        }
        Ok(self.promote_stored(new_epoch, table, file, lost)?)
    }

    /// Becomes primary at `new_epoch`: the handed-off table is stored durably first, then the role
    /// (`state::next`, Promote / ForcePromote). `lost` (forced promotion): blocks whose newest
    /// content stayed on the peer, and their seqs.
    #[cfg(test)]
    pub(crate) fn promote(
        &self,
        new_epoch: u64,
        table: Bitmap,
        lost: Option<(Bitmap, u64, u64)>,
    ) -> Result<(), TransitionError> {
        self.promote_stored(new_epoch, table, None, lost).map(drop)
    }

    /// `promote`, storing `file` (the table's file form as received, when given) as
    /// `peer_pending`. Answers each effect's time, "Effect=µs ...".
    pub(crate) fn promote_stored(
        &self,
        new_epoch: u64,
        table: Bitmap,
        file: Option<EncodedBitmap>,
        lost: Option<(Bitmap, u64, u64)>,
    ) -> Result<String, TransitionError> {
        if self.repl.is_none() {
            return Ok(String::new());
        }
        let event = if lost.is_some() {
            Event::ForcePromote { new_epoch }
        } else {
            Event::Promote { new_epoch }
        };
        let (_, times) = self.transition_timed(
            event,
            Carry {
                table: Some(table),
                table_file: file,
                lost,
            },
        )?;
        Ok(times
            .iter()
            .map(|(e, d)| format!("{e:?}={}", d.as_micros()))
            .collect::<Vec<_>>()
            .join(" "))
    }

    /// Copies every overlay block into the data file and empties the overlay (no host I/O runs:
    /// the caller holds the gate or no host may write).
    pub(crate) fn fold_overlay(&self) -> std::io::Result<()> {
        let blocks: Vec<u64> = self.areas.state().present_blocks().collect();
        if blocks.is_empty() {
            return Ok(());
        }
        super::merge::copy_to_data(self, &blocks)?;
        self.areas
            .event(format!("OverlayFolded blocks={}", blocks.len()));
        Ok(())
    }

    /// The drain is done and acknowledged: this (fenced) engine becomes the new primary's secondary.
    /// Nothing happens if a takeover by this engine (or a newer fence) came first.
    pub async fn become_secondary(&self, fenced_epoch: u64) -> std::io::Result<()> {
        let _gate = self.gate.write().await;
        let step = self
            .transition(Event::DrainAcknowledged { fenced_epoch }, Carry::default())
            .map_err(std::io::Error::other)?;
        if step.changes() {
            self.areas
                .event("SecondaryAgain (reverse replication can start)");
        }
        Ok(())
    }

    /// A primary learned that its peer serves at a newer epoch (a forced promotion while this
    /// engine was unreachable): stop serving and become its secondary. Writes the peer never got
    /// stay in the table and are asked back from the peer (`resend_bitmap`).
    pub async fn step_down(&self, peer_epoch: u64) -> std::io::Result<()> {
        let _gate = self.gate.write().await;
        let step = self
            .transition(Event::StepDown { peer_epoch }, Carry::default())
            .map_err(std::io::Error::other)?;
        if step.changes() {
            self.areas.event(format!(
                "SteppedDown epoch={peer_epoch} (the peer was promoted while this engine was away)"
            ));
        }
        Ok(())
    }

    /// The receiving end of the old primary's drain: block images land in the data file unless the
    /// overlay holds something newer; DrainComplete ends the first processing.
    pub fn apply_drain(&self, batch: Vec<pb::ReplicationMessage>) -> Result<Applied, EngineError> {
        let my_epoch = self.epoch();
        let blocks = self.size() / BS;
        for m in &batch {
            if m.volume != self.name() {
                return Err(EngineError::UnknownVolume(m.volume.clone()));
            }
            if m.epoch != my_epoch {
                if let Some(r) = &self.repl {
                    r.stats.stale_rejected.fetch_add(1, Ordering::Relaxed);
                }
                return Err(EngineError::StaleEpoch(format!(
                    "this engine is primary at epoch {my_epoch}; a stream at epoch {} is refused, nothing written",
                    m.epoch
                )));
            }
            match &m.body {
                Some(Body::Block(b)) => {
                    if b.block >= blocks
                        || b.data.len() != BLOCK_SIZE as usize
                        || crc32c::crc32c(&b.data) != b.crc32c
                    {
                        return Err(EngineError::Corrupt(format!(
                            "bad image of block {}",
                            b.block
                        )));
                    }
                }
                Some(Body::DrainComplete(_)) | Some(Body::Heartbeat(_)) | None => {}
                Some(_) => {
                    return Err(EngineError::WrongRole(
                        "this engine is primary: it takes only a fenced peer's drain".into(),
                    ))
                }
            }
        }
        let Some(repl) = &self.repl else {
            return Err(EngineError::NotPaired("volume is not paired"));
        };
        let mut out = Applied {
            epoch: my_epoch,
            ..Default::default()
        };
        for m in batch {
            match m.body {
                Some(Body::Block(b)) => {
                    let _g = repl.tracker.locks.lock(b.block..b.block + 1);
                    let (wanted, shadowed) = {
                        let st = self.areas.state();
                        (st.pending(b.block), st.present(b.block))
                    };
                    if wanted {
                        if !shadowed {
                            self.store
                                .write_at(&b.data, b.block * BS)
                                .map_err(EngineError::io)?;
                        }
                        let mut st = self.areas.state();
                        st.clear_pending(b.block);
                    }
                    out.images.push((b.block, b.generation));
                    out.wrote = true;
                }
                Some(Body::DrainComplete(d)) => {
                    self.finish_drain(d.final_seq)?;
                    out.drain_complete = true;
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// DrainComplete (the last data mark): everything received is made durable, the handed-off
    /// table is cleared durably, and the merge may start. Idempotent.
    pub(crate) fn finish_drain(&self, final_seq: u64) -> std::io::Result<()> {
        let step = self
            .transition(Event::DrainComplete, Carry::default())
            .map_err(std::io::Error::other)?;
        if step.changes() {
            self.areas
                .event(format!("FirstProcessingComplete final_seq={final_seq}"));
        }
        Ok(())
    }

    /// A forced promotion knows only the pending set of the last heartbeat it heard: writes the old
    /// primary acknowledged after it are unknown here until that primary returns, steps down and
    /// offers its unsent table (`resend_bitmap`, overwritten with this engine's copies). Then the
    /// loss is counted: `lost_blocks` becomes at least that table's size (every block this engine
    /// may lack is in it), so nothing acknowledged is dropped without being counted. Test:
    /// `tests/takeover.rs` `a_forced_promotion_counts_what_the_returning_primary_had_unsent`.
    pub(crate) fn count_returned_losses(&self, returned: u64) {
        let m = self.meta().takeover.clone();
        if !m.forced || m.lost_exact || returned <= m.lost_blocks {
            return;
        }
        if self
            .update_meta(|m| m.takeover.lost_blocks = returned)
            .is_ok()
        {
            self.areas.event(format!(
                "LossCounted lost_blocks={returned} (the returning old primary's unsent writes, \
                 overwritten by this engine's copies)"
            ));
        }
    }

    /// The returning old primary compared the table it asked back with this engine's copies
    /// (`crate::loss`): of those, `exported` blocks differed, and it kept their old content. That
    /// is the exact loss of the promotion to `epoch`, replacing the estimates (the last heartbeat's
    /// set, then the returned table's size). Test: `tests/losses.rs`.
    pub(crate) fn count_exact_losses(&self, epoch: u64, exported: u64) {
        if epoch == 0 || epoch != self.epoch() || self.role() != Role::Primary {
            return;
        }
        let m = self.meta().takeover.clone();
        if m.lost_exact && m.lost_blocks == exported {
            return;
        }
        if self
            .update_meta(|m| {
                m.takeover.lost_blocks = exported;
                m.takeover.lost_exact = true;
            })
            .is_ok()
        {
            self.areas.event(format!(
                "LossExact lost_blocks={exported} (the returning old primary compared its unsent                  table with this engine's copies and kept the old content of these)"
            ));
        }
    }

    /// Reverse replication reached Synced for the first time since the takeover.
    pub fn reverse_in_sync(&self) {
        if self.update_meta(|m| m.takeover.reversing = false).is_ok() {
            self.areas.event("InSync (reverse replication complete)");
        }
    }

    /// Peer.ReadBlocks on a fenced engine: its own newest content of whole blocks.
    pub fn serve_read_blocks(
        &self,
        req: &pb::ReadBlocksRequest,
    ) -> Result<pb::ReadBlocksReply, EngineError> {
        let state = self.state();
        let (role, epoch) = (state.role, state.epoch);
        if !state.serves_proxied_reads(req.epoch) {
            return Err(EngineError::WrongRole(format!(
                "proxied reads are served only by a fenced engine at the reader's epoch; this engine is {role} at epoch {epoch}, the reader at {}",
                req.epoch
            )));
        }
        let blocks = self.size() / BS;
        if req.blocks.len() > 8192 {
            return Err(EngineError::InvalidArgument(
                "at most 8192 blocks per request".into(),
            ));
        }
        let mut data = Vec::with_capacity(req.blocks.len());
        for &b in &req.blocks {
            if b >= blocks {
                return Err(EngineError::InvalidArgument(format!(
                    "block {b} is out of range"
                )));
            }
            let mut buf = vec![0u8; BLOCK_SIZE as usize];
            self.read_own_block(b, &mut buf)?;
            data.push(buf.into());
        }
        if let Some(r) = &self.repl {
            // Blocks a host is waiting for go to the front of the drain.
            r.prioritize(&req.blocks);
        }
        Ok(pb::ReadBlocksReply { data, epoch })
    }
}

/// Runs the merge whenever the volume enters the Merging phase (also after a restart).
pub async fn merge_task(vol: Arc<Volume>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        if vol.state().merging() {
            if let Err(e) = super::merge::run(&vol, &mut stop).await {
                tracing::warn!(error = %e, "merge failed; retrying");
            }
        }
        tokio::select! {
            _ = vol.areas.merge_wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::unreachable;

    #[test]
    fn a_reset_stream_is_silence_an_internal_answer_is_not() {
        let answer = tonic::Status::internal("reading the data file: EIO");
        assert!(
            !unreachable(&answer),
            "an engine's INTERNAL answer is an answer"
        );
        let mut reset = tonic::Status::internal("h2 protocol error: stream reset");
        reset.set_source(std::sync::Arc::new(std::io::Error::other(
            "connection reset",
        )));
        assert!(unreachable(&reset), "a broken stream is silence");
        assert!(unreachable(&tonic::Status::unavailable("connect refused")));
        assert!(!unreachable(&tonic::Status::failed_precondition(
            "stale epoch"
        )));
    }
}
