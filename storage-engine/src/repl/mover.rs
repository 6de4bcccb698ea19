//! Live move of the secondary (issue 18, seed 002), on the primary. `StartMove{to}` names a fresh
//! secondary (empty state dir, same volume, its `--peer` = this engine); a background copy fills it
//! front to back over its own `Peer.Replicate` stream while the old secondary keeps replicating as
//! before. The position correlation is the copier's watermark in the tracker (`MoveTable`): a host
//! write below it is owed to the new engine too (sent as a block image), one above it only to the
//! old one (the copy carries it later). When the copy is done and nothing is owed, the cutover
//! (under the gate: no host I/O) ends the new engine's resync at the primary's last seq, stores the
//! move as done (the commit point), and points replication at the new engine; the old one is
//! released, told nothing.
//!
//! Durable state: `move` (the record below, meta framing, atomic replace) and `move_pending` (the
//! owed blocks, stored at every checkpoint before an extent cools). A restart resumes the copy at
//! the stored watermark, owing the stored table plus every hot intent extent.

use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Notify};
use tracing::{info, warn};

use crate::{
    bitmap::Bitmap,
    clock::now_us,
    error::EngineError,
    geometry::BLOCK_SIZE,
    meta::Role,
    pb::{self, replication_message::Body},
    volume::Volume,
};

/// The move's record in the state dir.
pub const MOVE_FILE: &str = "move";
/// Blocks the copier reads at once (1 MiB), under their block locks.
const CHUNK_BLOCKS: u64 = 256;
/// How far ahead of the watermark `reserved` is stored (64 MiB): one store per that much copy.
const RESERVE_BLOCKS: u64 = 16384;
/// How much durable copy progress is stored at once (4 MiB): what a restarted primary copies again.
const WATERMARK_STEP: u64 = 1024;
/// Generations of the copier's images (never a seq): the low bits carry the chunk's end on the
/// chunk's last image, so its durable acknowledgement moves the durable watermark.
const COPY_TAG: u64 = 1 << 63;
/// The generation of the cutover's last image: its durable acknowledgement covers the resync's end.
const FINAL_TAG: u64 = u64::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    #[default]
    None,
    Copying,
    Cutover,
    Done,
    Aborted,
}

impl Phase {
    pub fn active(self) -> bool {
        matches!(self, Phase::Copying | Phase::Cutover)
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::None => "none",
            Phase::Copying => "copying",
            Phase::Cutover => "cutover",
            Phase::Done => "done",
            Phase::Aborted => "aborted",
        }
    }

    pub const ALL: [Phase; 5] = [
        Phase::None,
        Phase::Copying,
        Phase::Cutover,
        Phase::Done,
        Phase::Aborted,
    ];
}

/// The durable record of the last move (`move`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MoveRecord {
    pub phase: Phase,
    pub target: String,
    pub source: String,
    /// Blocks below it are on the new engine's stable storage, or owed in `move_pending`.
    /// Invariant: stored only after the new engine's durable acknowledgement of every copied
    /// image below it (`Copy::durable`). Test: `tests/move.rs` kill loop.
    pub watermark: u64,
    /// The new engine's file was never written at or above it (the fresh engine punched it): the
    /// copier stores a higher one before its watermark passes it, so a restarted primary knows
    /// where a hole must be sent as zeros (a block copied before the crash, trimmed since).
    pub reserved: u64,
    pub total: u64,
    pub message: String,
}

/// The copy's acknowledged progress in one session.
#[derive(Default)]
struct Copy {
    sent: u64,
    acked: u64,
    /// End of the last chunk handed to the stream.
    upto: u64,
    /// Every copied image below it is durable on the new engine.
    durable: u64,
    final_acked: bool,
}

/// The move state of one volume (`Volume::mover`).
pub struct Mover {
    path: PathBuf,
    rec: Mutex<MoveRecord>,
    /// StartMove, AbortMove and the cutover's commit, one at a time.
    control: tokio::sync::Mutex<()>,
    /// Bumped by AbortMove and by a new StartMove: a running task of an older move ends.
    generation: watch::Sender<u64>,
    /// The generation + 1 of the move whose task runs (0: none): an older move's task that is
    /// still ending never keeps a newer move from getting its own.
    running: AtomicU64,
    /// Bytes the copier sent (metric `tandem_move_copied_bytes_total`).
    pub copied_bytes: AtomicU64,
    /// Below it, the copier sends holes as zero images (a restart's re-copy, `reserved`).
    zero_below: AtomicU64,
    progress: Notify,
}

impl Mover {
    /// Loads the record (a damaged one is an error, never reset).
    pub fn open(state_dir: &Path) -> io::Result<Self> {
        let path = state_dir.join(MOVE_FILE);
        let rec = match std::fs::read(&path) {
            Ok(b) => crate::format::meta::decode::<MoveRecord>(&b).map_err(|e| {
                io::Error::other(format!("{}: damaged move record: {e:?}", path.display()))
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => MoveRecord::default(),
            Err(e) => return Err(e),
        };
        Ok(Self {
            zero_below: AtomicU64::new(if rec.phase.active() { rec.reserved } else { 0 }),
            path,
            rec: Mutex::new(rec),
            control: tokio::sync::Mutex::new(()),
            generation: watch::channel(0).0,
            running: AtomicU64::new(0),
            copied_bytes: AtomicU64::new(0),
            progress: Notify::new(),
        })
    }

    pub fn record(&self) -> MutexGuard<'_, MoveRecord> {
        self.rec.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn phase(&self) -> Phase {
        self.record().phase
    }

    pub fn active(&self) -> bool {
        self.phase().active()
    }

    /// Replaces the record durably (temp file, fsync, rename, fsync dir), then in memory.
    fn store(&self, f: impl FnOnce(&mut MoveRecord)) -> io::Result<()> {
        let mut next = self.record().clone();
        f(&mut next);
        crate::seam::power::io(&self.path)?;
        let tmp = self.path.with_extension("tmp");
        {
            let mut file = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut file, &crate::format::meta::encode(&next))?;
            file.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        crate::format::sync_dir(&self.path)?;
        *self.record() = next;
        Ok(())
    }

    /// Wakes the copier: a sync-mode write waits for an owed block.
    pub fn poke(&self) {
        self.progress.notify_waiters();
    }

    fn note(&self, message: impl Into<String>) {
        self.record().message = message.into();
    }
}

/// At open: a done move's target is the peer whatever `--peer` says; an unfinished one resumes.
pub fn recover(vol: &Volume) {
    let Some(repl) = &vol.repl else { return };
    let rec = vol.mover.record().clone();
    match rec.phase {
        Phase::Done if repl.peer() != rec.target => {
            warn!(
                peer = %repl.peer(),
                target = %rec.target,
                "the persisted move wins over --peer: replicating to the engine the volume moved to"
            );
            repl.set_peer(&rec.target);
            vol.areas.proxy.set_peer(&rec.target);
        }
        Phase::Copying | Phase::Cutover => {
            let t = &repl.tracker;
            let mut owed = match t.load_move_table() {
                Ok(o) => o,
                Err(e) => {
                    // Nothing below the watermark can be vouched for: copy it all again, holes
                    // as zeros (the new engine may hold anything there).
                    warn!(error = %e, "move table unreadable: the copy starts over");
                    let mut r = vol.mover.record();
                    r.watermark = 0;
                    vol.mover.zero_below.store(r.total, Ordering::Release);
                    Bitmap::new(t.blocks())
                }
            };
            let rec = vol.mover.record().clone();
            // The stored table misses what was written since its last store; every such block
            // is in a hot extent (`Tracker::checkpoint`).
            owed.union_with(&t.intent_blocks());
            let mut below = Bitmap::new(t.blocks());
            for b in owed.iter_ones().take_while(|&b| b < rec.watermark) {
                below.set(b);
            }
            t.start_move(rec.watermark, below);
            info!(target = %rec.target, watermark = rec.watermark, "resuming the live move");
        }
        _ => {}
    }
}

/// Starts the move's task if a move is unfinished (at engine start).
pub fn spawn_if_active(vol: &Arc<Volume>) {
    if vol.mover.active() {
        spawn(vol);
    }
}

fn spawn(vol: &Arc<Volume>) {
    let mine = *vol.mover.generation.borrow();
    if vol.mover.running.swap(mine + 1, Ordering::AcqRel) == mine + 1 {
        return;
    }
    let v = Arc::clone(vol);
    tokio::spawn(async move {
        run(&v, mine).await;
        let _ = v
            .mover
            .running
            .compare_exchange(mine + 1, 0, Ordering::AcqRel, Ordering::Acquire);
    });
}

/// The wire status.
pub fn status(vol: &Volume) -> pb::MoveStatus {
    let rec = vol.mover.record().clone();
    let bs = u64::from(BLOCK_SIZE);
    let copied = match (&vol.repl, rec.phase) {
        (Some(r), Phase::Copying | Phase::Cutover) => {
            r.tracker.move_watermark().unwrap_or(rec.watermark)
        }
        _ => rec.watermark,
    };
    pb::MoveStatus {
        volume: vol.name().to_string(),
        phase: match rec.phase {
            Phase::None => pb::MovePhase::None,
            Phase::Copying => pb::MovePhase::Copying,
            Phase::Cutover => pb::MovePhase::Cutover,
            Phase::Done => pb::MovePhase::Done,
            Phase::Aborted => pb::MovePhase::Aborted,
        } as i32,
        target: rec.target,
        source: rec.source,
        copied_bytes: copied * bs,
        total_bytes: rec.total * bs,
        message: rec.message,
    }
}

/// StartMove: starts a move to `to`, or answers the running (or done) one to the same target.
pub async fn start(vol: &Arc<Volume>, to: &str) -> Result<pb::MoveStatus, EngineError> {
    let Some(repl) = &vol.repl else {
        return Err(EngineError::NotPaired(
            "volume is not paired: nothing to move",
        ));
    };
    let to = to.trim();
    if to.is_empty() {
        return Err(EngineError::InvalidArgument(
            "StartMove: `to` (the new engine's gRPC address) is empty".into(),
        ));
    }
    let m = &vol.mover;
    // Not while a resize or a takeover started here runs.
    let _one = vol.takeover_lock.lock().await;
    let _c = m.control.lock().await;
    let rec = m.record().clone();
    if rec.phase.active() || rec.phase == Phase::Done {
        if rec.target == to {
            if rec.phase.active() {
                spawn(vol);
            }
            return Ok(status(vol));
        }
        if rec.phase.active() {
            return Err(EngineError::MoveInProgress(format!(
                "a move to {} is under way; abort it first",
                rec.target
            )));
        }
    }
    if vol.role() != Role::Primary {
        return Err(EngineError::WrongRole(format!(
            "volume {} is {} here; a move starts on the primary",
            vol.name(),
            vol.role()
        )));
    }
    if vol.state().takeover_phase().is_some() {
        return Err(EngineError::TakeoverInProgress(
            "a takeover is draining or merging; move after it".into(),
        ));
    }
    if to == repl.peer() {
        return Err(EngineError::InvalidArgument(format!(
            "{to} is the secondary already"
        )));
    }
    let t = &repl.tracker;
    // The empty table is stored before the record names the move, so a restart never loads an
    // older move's table for this one.
    t.start_move(0, Bitmap::new(t.blocks()));
    t.store_move_table()?;
    m.store(|r| {
        *r = MoveRecord {
            phase: Phase::Copying,
            target: to.to_string(),
            source: repl.peer(),
            watermark: 0,
            reserved: 0,
            total: t.blocks(),
            message: String::new(),
        }
    })
    .inspect_err(|_| t.end_move())?;
    // A target an earlier (aborted) move wrote to is not blank: its holes are sent as zeros.
    let reused = rec.phase == Phase::Aborted && rec.target == to;
    m.zero_below
        .store(if reused { t.blocks() } else { 0 }, Ordering::Release);
    m.generation.send_modify(|g| *g += 1);
    vol.areas
        .event(format!("MoveStarted target={to} source={}", repl.peer()));
    spawn(vol);
    Ok(status(vol))
}

/// AbortMove: before the cutover, the new engine is forgotten and the old secondary stays.
pub async fn abort(vol: &Volume, why: &str) -> Result<pb::MoveStatus, EngineError> {
    let m = &vol.mover;
    let _c = m.control.lock().await;
    match m.phase() {
        Phase::Done => {
            return Err(EngineError::MoveCompleted(format!(
                "the move to {} is done: it is the secondary now",
                m.record().target
            )))
        }
        Phase::Copying | Phase::Cutover => {
            m.generation.send_modify(|g| *g += 1);
            if let Some(r) = &vol.repl {
                r.tracker.end_move();
            }
            m.store(|r| {
                r.phase = Phase::Aborted;
                r.message = why.to_string();
            })?;
            vol.areas
                .event(format!("MoveAborted target={} ({why})", m.record().target));
        }
        Phase::None | Phase::Aborted => {}
    }
    Ok(status(vol))
}

#[derive(Debug, thiserror::Error)]
enum MoveError {
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
    #[error("new engine: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("the new engine closed the stream")]
    Closed,
    #[error("the new engine was silent for {0:?}")]
    Silent(Duration),
    #[error("opening the stream to the new engine: {0}")]
    Open(#[from] super::sender::SessionError),
    #[error("the move was aborted or replaced")]
    Stopped,
    /// Final: the move cannot go on (aborted with this message).
    #[error("{0}")]
    Refused(String),
}

async fn run(vol: &Arc<Volume>, mine: u64) {
    let m = &vol.mover;
    let mut gen = m.generation.subscribe();
    let mut backoff = Duration::from_millis(50);
    while m.active() && *gen.borrow() == mine {
        let started = Instant::now();
        match session(vol, mine).await {
            Ok(()) => return,
            Err(MoveError::Stopped) => return,
            Err(MoveError::Refused(why)) => {
                warn!(%why, "the live move cannot go on; rolled back");
                if let Err(e) = abort(vol, &why).await {
                    warn!(error = %e, "rolling the move back failed");
                }
                return;
            }
            Err(e) => {
                if started.elapsed() > Duration::from_secs(2) {
                    backoff = Duration::from_millis(50);
                }
                m.note(format!("waiting for the new engine: {e}"));
                warn!(error = %e, "live move: link to the new engine down; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = gen.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

async fn open(vol: &Volume, target: &str) -> Result<super::sender::Opened, MoveError> {
    let Some(repl) = &vol.repl else {
        return Err(MoveError::Refused("volume is not paired".into()));
    };
    Ok(super::sender::open_stream_to(target, repl.token.as_deref(), vol.size()).await?)
}

struct Session<'a> {
    vol: &'a Volume,
    tx: mpsc::Sender<pb::ReplicationMessage>,
    epoch: u64,
    mine: u64,
}

impl Session<'_> {
    async fn send(&self, body: Body) -> Result<(), MoveError> {
        if *self.vol.mover.generation.borrow() != self.mine {
            return Err(MoveError::Stopped);
        }
        if self.vol.role() != Role::Primary || self.vol.epoch() != self.epoch {
            return Err(MoveError::Refused(
                "this engine is no longer the primary at the move's epoch".into(),
            ));
        }
        self.tx
            .send(pb::ReplicationMessage {
                volume: self.vol.name().to_string(),
                epoch: self.epoch,
                body: Some(body),
            })
            .await
            .map_err(|_| MoveError::Closed)
    }

    async fn image(&self, block: u64, generation: u64, data: Vec<u8>) -> Result<(), MoveError> {
        let crc = crc32c::crc32c(&data);
        self.send(Body::Block(pb::BlockImage {
            block,
            generation,
            data: data.into(),
            crc32c: crc,
            // Durable at once: a block the writer keeps rewriting is owed until a durable
            // acknowledgement names its current generation, so a lazy one (100 ms later) would
            // never catch up and the cutover would never come (commit 52355e6).
            lazy: false,
        }))
        .await
    }
}

fn lock(c: &Mutex<Copy>) -> MutexGuard<'_, Copy> {
    c.lock().unwrap_or_else(|p| p.into_inner())
}

/// One stream to the new engine: copy, owed images, heartbeats, and the cutover at the end.
async fn session(vol: &Arc<Volume>, mine: u64) -> Result<(), MoveError> {
    let Some(repl) = vol.repl.clone() else {
        return Err(MoveError::Refused("volume is not paired".into()));
    };
    let m = &vol.mover;
    let epoch = vol.epoch();
    if vol.role() != Role::Primary {
        return Err(MoveError::Refused("this engine is not the primary".into()));
    }
    let rec = m.record().clone();
    let (tx, mut acks, hello) = open(vol, &rec.target).await?;
    if hello.role != pb::Role::Secondary as i32 {
        return Err(MoveError::Refused(format!(
            "the engine at {} is not a secondary of this volume",
            rec.target
        )));
    }
    if hello.epoch > epoch {
        return Err(MoveError::Refused(format!(
            "the engine at {} is at epoch {}, newer than this primary's {epoch}",
            rec.target, hello.epoch
        )));
    }
    if !hello.need_full_resync {
        // Not a fresh engine (a target reused after an abort, or one that served before): its
        // file may hold old data where the primary has holes, so every hole is sent as zeros.
        m.zero_below.store(rec.total, Ordering::Release);
    }
    m.note("copying");
    info!(target = %rec.target, watermark = rec.watermark, "live move: copying");
    let t = &repl.tracker;
    let copy = Arc::new(Mutex::new(Copy {
        durable: rec.watermark,
        upto: rec.watermark,
        ..Default::default()
    }));
    let ack_copy = Arc::clone(&copy);
    let ack_repl = Arc::clone(&repl);
    let ack_vol = Arc::clone(vol);
    let mut ack_task = tokio::spawn(async move {
        loop {
            let a = match acks.message().await {
                Ok(Some(a)) => a,
                Ok(None) => return MoveError::Closed,
                Err(s) => return MoveError::Rpc(s),
            };
            if !a.durable {
                continue;
            }
            let (mut blocks, mut gens) = (Vec::new(), Vec::new());
            {
                let mut c = lock(&ack_copy);
                for (&b, &g) in a.blocks.iter().zip(&a.generations) {
                    if g == FINAL_TAG {
                        c.final_acked = true;
                    } else if g & COPY_TAG != 0 {
                        c.acked += 1;
                        c.durable = c.durable.max(g & !COPY_TAG);
                    } else {
                        blocks.push(b);
                        gens.push(g);
                    }
                }
                if c.acked == c.sent {
                    c.durable = c.durable.max(c.upto);
                }
            }
            ack_repl.tracker.ack_move_images(&blocks, &gens);
            ack_vol.mover.progress.notify_waiters();
        }
    });
    let s = Session {
        vol,
        tx,
        epoch,
        mine,
    };
    let r = stream(vol, &s, &copy, &mut ack_task, t, &rec).await;
    ack_task.abort();
    r
}

async fn stream(
    vol: &Arc<Volume>,
    s: &Session<'_>,
    copy: &Arc<Mutex<Copy>>,
    ack_task: &mut tokio::task::JoinHandle<MoveError>,
    t: &crate::repl::Tracker,
    rec: &MoveRecord,
) -> Result<(), MoveError> {
    use futures::FutureExt;
    let m = &vol.mover;
    let total = rec.total;
    let bs = u64::from(BLOCK_SIZE) as usize;
    let mut cursor = rec.watermark;
    let mut stored_wm = rec.watermark;
    let mut last_hb: Option<Instant> = None;
    let mut sent_gen: HashMap<u64, u64> = HashMap::new();
    let silence = crate::client::peer_timeout();
    let mut waiting_since: Option<(Instant, u64)> = None;
    loop {
        if let Some(r) = (&mut *ack_task).now_or_never() {
            return Err(r.unwrap_or(MoveError::Closed));
        }
        if last_hb.is_none_or(|h| h.elapsed() >= Duration::from_millis(250)) {
            s.send(Body::Heartbeat(pb::Heartbeat {
                timestamp_us: now_us(),
                ..Default::default()
            }))
            .await?;
            last_hb = Some(Instant::now());
        }
        // Owed blocks (written below the watermark): their current content and generation.
        for b in t.move_owed(256) {
            let image = t.read_move_image(b, |buf| vol.read_own_block(b, buf))?;
            if let Some((g, data)) = image {
                if sent_gen.get(&b) != Some(&g) {
                    s.image(b, g, data).await?;
                    sent_gen.insert(b, g);
                }
            }
        }
        if cursor < total {
            let hi = (cursor + CHUNK_BLOCKS).min(total);
            let reserved = m.record().reserved;
            if hi > reserved {
                // Before the watermark passes it (`MoveRecord::reserved`).
                let next = (hi + RESERVE_BLOCKS).min(total);
                m.store(|r| r.reserved = next)?;
            }
            let lo = cursor;
            let mut buf = vec![0u8; (hi - lo) as usize * bs];
            t.copy_chunk(lo, hi, || vol.read_local(&mut buf, lo * bs as u64))?;
            let zero_below = m.zero_below.load(Ordering::Acquire);
            let send: Vec<u64> = (lo..hi)
                .filter(|&b| {
                    let at = (b - lo) as usize * bs;
                    b < zero_below || buf[at..at + bs].iter().any(|&x| x != 0)
                })
                .collect();
            lock(copy).sent += send.len() as u64;
            for (i, &b) in send.iter().enumerate() {
                let at = (b - lo) as usize * bs;
                let gen = if i + 1 == send.len() {
                    COPY_TAG | hi
                } else {
                    COPY_TAG
                };
                s.image(b, gen, buf[at..at + bs].to_vec()).await?;
            }
            {
                let mut c = lock(copy);
                c.upto = hi;
                if c.acked == c.sent {
                    c.durable = c.durable.max(hi);
                }
            }
            m.copied_bytes
                .fetch_add((hi - lo) * bs as u64, Ordering::Relaxed);
            cursor = hi;
        }
        let durable = lock(copy).durable;
        if durable >= stored_wm + WATERMARK_STEP || (durable == total && stored_wm < total) {
            // Only what the new engine acknowledged as durable (`MoveRecord::watermark`).
            m.store(|r| r.watermark = durable)?;
            stored_wm = durable;
        }
        if cursor < total {
            continue;
        }
        if durable >= total && t.move_owed_count() == 0 {
            if cutover(vol, s, copy, ack_task, t, rec).await? {
                return Ok(());
            }
            continue;
        }
        // Waiting for acknowledgements: a new engine that stops acknowledging is dead.
        let owed = t.move_owed_count();
        m.note(format!(
            "copy read to the end; waiting for the new engine to store the last images ({owed} blocks owed)"
        ));
        match waiting_since {
            Some((since, d)) if d == durable + owed => {
                if since.elapsed() > silence {
                    return Err(MoveError::Silent(silence));
                }
            }
            _ => waiting_since = Some((Instant::now(), durable + owed)),
        }
        tokio::select! {
            _ = m.progress.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

/// The cutover: under the gate, the new engine gets the resync's end at the last seq; once that
/// is durable there, the move is stored done and replication points at the new engine.
/// `Ok(false)`: a write slipped in before the gate; copy it first.
async fn cutover(
    vol: &Arc<Volume>,
    s: &Session<'_>,
    copy: &Arc<Mutex<Copy>>,
    ack_task: &mut tokio::task::JoinHandle<MoveError>,
    t: &crate::repl::Tracker,
    rec: &MoveRecord,
) -> Result<bool, MoveError> {
    let m = &vol.mover;
    let Some(repl) = &vol.repl else {
        return Err(MoveError::Refused("volume is not paired".into()));
    };
    m.record().phase = Phase::Cutover;
    m.note("cutover: waiting for the new engine to store the last writes");
    let gate = vol.gate.write().await;
    if t.move_owed_count() > 0 {
        m.record().phase = Phase::Copying;
        return Ok(false);
    }
    let last = t.last_seq();
    s.send(Body::ResyncDone(pb::ResyncDone {
        consistent_seq: last,
        full: true,
        next_seq: last + 1,
    }))
    .await?;
    let mut b0 = vec![0u8; BLOCK_SIZE as usize];
    vol.read_own_block(0, &mut b0)?;
    s.image(0, FINAL_TAG, b0).await?;
    let deadline = Instant::now() + crate::client::peer_timeout();
    while !lock(copy).final_acked {
        if Instant::now() > deadline {
            m.record().phase = Phase::Copying;
            return Err(MoveError::Silent(crate::client::peer_timeout()));
        }
        tokio::select! {
            _ = m.progress.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            r = &mut *ack_task => return Err(r.unwrap_or(MoveError::Closed)),
        }
    }
    vol.areas.seams.hit("move.cutover.before_commit");
    let _c = m.control.lock().await;
    if *m.generation.borrow() != s.mine || !m.active() {
        return Err(MoveError::Stopped);
    }
    // The commit point: from here a restart replicates to the new engine, which holds every
    // acknowledged write durably (its durable acknowledgement of the resync's end above).
    m.store(|r| {
        r.phase = Phase::Done;
        r.watermark = rec.total;
        r.message = String::new();
    })?;
    t.end_move();
    for w in [&repl.acked, &repl.durable] {
        w.send_if_modified(|v| {
            let grew = last > *v;
            *v = (*v).max(last);
            grew
        });
    }
    repl.set_peer(&rec.target);
    vol.areas.proxy.set_peer(&rec.target);
    drop(gate);
    vol.areas.event(format!(
        "MoveDone target={} source={} (the old secondary is released)",
        rec.target, rec.source
    ));
    info!(target = %rec.target, "live move done: the new engine is the secondary");
    Ok(true)
}

/// Refuses what a move forbids (a takeover's fence, a resize) while one is under way.
pub fn refuse_while_moving(vol: &Volume, what: &str) -> Result<(), EngineError> {
    let rec = vol.mover.record();
    if rec.phase.active() {
        return Err(EngineError::MoveInProgress(format!(
            "{what} refused: a live move to {} is under way (abort it or let it finish)",
            rec.target
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        seam::power::Cut,
        takeover::tests::{base_config, block_on},
        volume::VolumeConfig,
    };

    const BS: u64 = 4096;

    fn primary(dir: &Path) -> VolumeConfig {
        let mut cfg = base_config(dir);
        cfg.initial_role = Role::Primary;
        cfg
    }

    /// Blocks written after the copier passed them (owed), and one above the watermark.
    const WRITES: [u64; 5] = [3, 300, 700, 1000, 1500];
    const LATER: [u64; 2] = [5, 800];
    const WATERMARK: u64 = 1024;

    /// One run: a move copying (its record and empty table stored as StartMove stores them, the
    /// copier past WATERMARK), then writes below it, enough checkpoints for their extents to cool,
    /// more writes, with the power cut after `k` file operations. After the restart every
    /// acknowledged write below the watermark must still be owed to the new engine.
    fn cut_run(dir: &Path, k: i64) -> (bool, Vec<String>) {
        let cfg = primary(dir);
        let v = Volume::open(&cfg).unwrap();
        let t = &v.repl.as_ref().unwrap().tracker;
        t.start_move(0, Bitmap::new(t.blocks()));
        t.store_move_table().unwrap();
        v.mover
            .store(|r| {
                *r = MoveRecord {
                    phase: Phase::Copying,
                    target: "127.0.0.1:10".into(),
                    source: "127.0.0.1:9".into(),
                    total: t.blocks(),
                    ..Default::default()
                }
            })
            .unwrap();
        t.copy_chunk(0, WATERMARK, || Ok(())).unwrap();
        // The new engine acknowledged the copy up to here durably.
        v.mover.store(|r| r.watermark = WATERMARK).unwrap();
        let cut = Cut::after(dir, k);
        let mut acked = Vec::new();
        let mut put = |b: u64| {
            if block_on(v.write(b * BS, vec![9; BS as usize], false)).is_ok() {
                acked.push(b);
            }
        };
        for b in WRITES {
            put(b);
        }
        let _ = block_on(v.flush());
        // The old secondary has them durably: nothing pending keeps their extents hot, so they
        // cool after 20 quiet checkpoints, and the move's table must be on disk before.
        t.ack_journal(t.last_seq());
        for _ in 0..(crate::repl::tracker::COOL_AFTER_TICKS + 2) {
            let _ = v.checkpoint();
        }
        for b in LATER {
            put(b);
        }
        let _ = v.checkpoint();
        let tripped = cut.tripped();
        drop(cut);
        v.store.lose_unsynced();
        v.areas.overlay.lose_unsynced();
        drop(v);
        let v = match Volume::open(&cfg) {
            Ok(v) => v,
            Err(e) => return (tripped, vec![format!("restart failed: {e}")]),
        };
        let t = &v.repl.as_ref().unwrap().tracker;
        let mut bad = Vec::new();
        let rec = v.mover.record().clone();
        if rec.phase != Phase::Copying {
            bad.push(format!("the move is {:?} after the restart", rec.phase));
        }
        let owed = t.move_owed(usize::MAX);
        for b in acked.iter().filter(|&&b| b < rec.watermark) {
            if !owed.contains(b) {
                bad.push(format!(
                    "block {b}, written after the copier read it, is not owed to the new engine"
                ));
            }
        }
        if t.move_watermark() != Some(rec.watermark) {
            bad.push("the copier does not resume at the stored watermark".into());
        }
        (tripped, bad)
    }

    #[test]
    fn power_loss_during_a_move_keeps_every_owed_block() {
        crate::seam::power::at_every_cut(8, cut_run);
    }
}
