//! The power-loss campaign (issue 11). One engine goes through a takeover: promotion, host writes,
//! zeroing writes and FLUSHes into the overlay, drained images with their durable acknowledgement,
//! read-repair, checkpoints, DrainComplete, the merge, writes after it, and the fence that starts a
//! failback. The same run is repeated with the power cut at each of its file operations in turn
//! (`seam::power`): the disk keeps only what an fdatasync or fsync covered. The engine then starts
//! from that disk, and every block must read as the last write a FLUSH covered or a later one
//! (the old primary's copy for a block still handed off), and every block a host wrote must still be
//! in the differential table the engine owes its peer. The takeover is then carried to its end
//! and checked again.
//!
//! `TANDEM_POWERLOSS_SEEDS=N` (default 3) scenarios; each prints its crash points. Full size:
//! `TANDEM_POWERLOSS_SEEDS=40 cargo test -p storage-engine --lib powerloss -- --nocapture`.

use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
    sync::Arc,
};

use bytes::Bytes;

use super::tests::{block_on, config, BLOCKS, BS};
use crate::{
    bitmap::Bitmap,
    meta::{Phase, Role},
    pb::{self, replication_message::Body},
    seam::power::{Cut, Kind},
    volume::Volume,
};

/// The blocks the scenario touches: across two merge chunks (1024) and several lock stripes.
const FIRST: u64 = 1010;
const TOUCHED: u64 = 28;
/// Content ids: 0 is zeros, 1 this engine's copy before the takeover, 2 the old primary's copy.
const BASE: u32 = 1;
const OLD_PRIMARY: u32 = 2;

fn content(id: u32, b: u64) -> Vec<u8> {
    if id == 0 {
        return vec![0; BS as usize];
    }
    let word = (u64::from(id) << 32) | b;
    word.to_le_bytes().repeat(BS as usize / 8)
}

/// The id each 512-byte sector of a block holds (None: bytes no write produced). A block is one
/// id unless a write that failed landed in part (its host got an error, so either is allowed).
fn decode(buf: &[u8], b: u64) -> Vec<Option<u32>> {
    buf.chunks(512)
        .map(|sector| {
            if sector.iter().all(|x| *x == 0) {
                return Some(0);
            }
            let first = u64::from_le_bytes(sector[..8].try_into().ok()?);
            let whole = sector.chunks_exact(8).all(|c| c == first.to_le_bytes());
            (whole && first & 0xffff_ffff == b).then_some((first >> 32) as u32)
        })
        .collect()
}

#[derive(Debug, Clone)]
enum Op {
    Promote,
    Write(u64, u64),
    Zero(u64),
    Flush,
    /// A drained image lands and is made durable; then the old primary forgets the block.
    Drain(u64),
    /// A proxied read installs the old primary's copy.
    Repair(u64),
    /// A drained image lands, not yet acknowledged (the old primary still holds the block).
    Landed(u64),
    Checkpoint,
    DrainComplete,
    Merge,
    Fence,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The blocks still on the old primary when the takeover starts.
fn handed_off(seed: u64) -> BTreeSet<u64> {
    let mut r = Rng(seed | 1);
    (0..TOUCHED)
        .filter(|_| r.below(2) == 0)
        .map(|i| FIRST + i)
        .collect()
}

fn scenario(seed: u64) -> Vec<Op> {
    let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut to_drain: Vec<u64> = handed_off(seed).into_iter().collect();
    let mut ops = vec![Op::Promote];
    let block = |r: &mut Rng| FIRST + r.below(TOUCHED);
    for _ in 0..24 {
        let held = (!to_drain.is_empty()).then(|| r.below(to_drain.len() as u64) as usize);
        let op = match (r.below(11), held) {
            (0..=2, _) => Op::Write(block(&mut r), 1 + r.below(2)),
            (3, _) => Op::Zero(block(&mut r)),
            (4, _) => Op::Flush,
            (5 | 6, Some(i)) => Op::Drain(to_drain.swap_remove(i)),
            // The bit cleared in memory, the data not yet synced: a checkpoint next is the case
            // where the table could reach the disk before the block.
            (7, Some(i)) => Op::Repair(to_drain[i]),
            (8, Some(i)) => Op::Landed(to_drain[i]),
            _ => Op::Checkpoint,
        };
        let then_checkpoint = matches!(op, Op::Repair(_) | Op::Landed(_));
        ops.push(op);
        if then_checkpoint && r.below(2) == 0 {
            ops.push(Op::Checkpoint);
        }
    }
    ops.extend(to_drain.into_iter().map(Op::Drain));
    ops.extend([Op::Flush, Op::DrainComplete, Op::Write(FIRST + 3, 2)]);
    ops.extend([Op::Merge, Op::Write(FIRST + 20, 1), Op::Checkpoint]);
    ops.extend([Op::Flush, Op::Write(FIRST + 5, 1), Op::Fence]);
    ops
}

/// What the host and the old primary were told, for the check after a power cut.
#[derive(Default)]
struct Model {
    /// Per block, every version it held, oldest first; the first is its content at the takeover.
    versions: HashMap<u64, Vec<u32>>,
    /// Per block, the index of the oldest version a power loss may still leave.
    floor: HashMap<u64, usize>,
    /// Versions a failed write may or may not have left.
    maybe: HashMap<u64, Vec<u32>>,
    /// Blocks the old primary still holds as its own (not yet durably drained).
    old_primary_holds: BTreeSet<u64>,
    promoted: bool,
    next_id: u32,
}

impl Model {
    fn new(seed: u64) -> Self {
        let pending = handed_off(seed);
        let mut m = Model {
            old_primary_holds: pending.clone(),
            next_id: 10,
            ..Default::default()
        };
        for b in FIRST..FIRST + TOUCHED {
            let v0 = if pending.contains(&b) {
                OLD_PRIMARY
            } else {
                BASE
            };
            m.versions.insert(b, vec![v0]);
            m.floor.insert(b, 0);
        }
        m
    }

    /// An acknowledged host write reached `b`.
    fn host_wrote(&self, b: u64) -> bool {
        self.versions.get(&b).is_some_and(|v| v.len() > 1)
    }
}

fn image(b: u64) -> pb::ReplicationMessage {
    super::tests::drained_image_of(b, content(OLD_PRIMARY, b))
}

fn table(blocks: &BTreeSet<u64>) -> Bitmap {
    let mut t = Bitmap::new(BLOCKS);
    for &b in blocks {
        t.set(b);
    }
    t
}

/// Runs `op`; Err once the power is out (the scenario stops there).
fn apply(v: &Arc<Volume>, m: &mut Model, op: &Op) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    match *op {
        Op::Promote => {
            v.promote(2, table(&m.old_primary_holds), None)
                .map_err(|x| e(&x))?;
            m.promoted = true;
        }
        Op::Write(b, n) => {
            let ids: Vec<u32> = (0..n).map(|i| m.next_id + i as u32).collect();
            m.next_id += n as u32;
            let mut data = Vec::new();
            for (i, id) in ids.iter().enumerate() {
                data.extend(content(*id, b + i as u64));
            }
            let r = block_on(v.write(b * BS, data, false));
            for (i, id) in ids.iter().enumerate() {
                let blk = b + i as u64;
                if !m.versions.contains_key(&blk) {
                    continue;
                }
                match &r {
                    Ok(()) => m.versions.entry(blk).or_default().push(*id),
                    Err(_) => m.maybe.entry(blk).or_default().push(*id),
                }
            }
            r.map_err(|x| e(&x))?;
        }
        Op::Zero(b) => {
            let r = block_on(v.write_zeroes(b * BS, BS, false, false));
            match &r {
                Ok(()) => m.versions.entry(b).or_default().push(0),
                Err(_) => m.maybe.entry(b).or_default().push(0),
            }
            r.map_err(|x| e(&x))?;
        }
        Op::Flush => {
            block_on(v.flush()).map_err(|x| e(&x))?;
            for (b, vs) in &m.versions {
                m.floor.insert(*b, vs.len() - 1);
            }
        }
        Op::Drain(b) => {
            v.apply_drain(vec![image(b)]).map_err(|x| e(&x))?;
            // As the receiver's flush loop does before its durable acknowledgement.
            v.make_durable().map_err(|x| e(&x))?;
            v.persist_areas().map_err(|x| e(&x))?;
            m.old_primary_holds.remove(&b);
        }
        Op::Repair(b) => {
            if m.old_primary_holds.contains(&b) {
                v.install_proxied(&[b], &[Bytes::from(content(OLD_PRIMARY, b))]);
            }
        }
        Op::Landed(b) => {
            v.apply_drain(vec![image(b)]).map_err(|x| e(&x))?;
        }
        Op::Checkpoint => v.checkpoint().map_err(|x| e(&x))?,
        Op::DrainComplete => {
            // The old primary ends its drain only once it holds nothing unacknowledged: what a
            // failed acknowledgement left, it sends again first.
            let left: Vec<u64> = m.old_primary_holds.iter().copied().collect();
            for b in left {
                apply(v, m, &Op::Drain(b))?;
            }
            v.finish_drain(0).map_err(|x| e(&x))?
        }
        Op::Merge => {
            let (_tx, mut stop) = tokio::sync::watch::channel(false);
            block_on(super::merge::run(v, &mut stop)).map_err(|x| e(&x))?;
            if v.areas.phase() != Phase::Normal {
                return Err("the merge did not finish".into());
            }
        }
        Op::Fence => {
            block_on(v.fence_and_handoff(3, true)).map_err(|x| e(&x))?;
        }
    }
    Ok(())
}

/// The content a host read of `b` returns, without the network: a block still handed off is the
/// old primary's copy (which it keeps until the drain ends).
fn logical(v: &Volume, b: u64) -> Vec<Option<u32>> {
    let mut buf = vec![0u8; BS as usize];
    let src = if v.areas.active() || v.role() == Role::Fenced {
        let st = v.areas.state();
        if st.present(b) {
            1
        } else if st.pending(b) {
            2
        } else {
            0
        }
    } else {
        0
    };
    let read = match src {
        1 => v.areas.overlay.read_at(&mut buf, b * BS),
        2 => return vec![Some(OLD_PRIMARY); 8],
        _ => v.read_local(&mut buf, b * BS),
    };
    if read.is_err() {
        return vec![None];
    }
    decode(&buf, b)
}

/// Every block reads as an allowed version; every host-written block is still owed to the peer.
fn check(v: &Volume, m: &Model, when: &str) -> Vec<String> {
    let mut bad = Vec::new();
    let promoted = v.epoch() >= 2;
    for b in FIRST..FIRST + TOUCHED {
        let got = logical(v, b);
        let vs = &m.versions[&b];
        let allowed: Vec<u32> = if promoted {
            let mut a = vs[m.floor[&b]..].to_vec();
            a.extend(m.maybe.get(&b).into_iter().flatten());
            a
        } else {
            // Never promoted durably: nothing was acknowledged; the engine holds its own copy.
            vec![BASE]
        };
        if !got.iter().all(|g| g.is_some_and(|g| allowed.contains(&g))) {
            bad.push(format!(
                "{when}: block {b} reads {got:?}, allowed {allowed:?} (versions {vs:?})"
            ));
        }
        let maybe_seen = got
            .iter()
            .any(|g| g.is_some_and(|g| m.maybe.get(&b).is_some_and(|x| x.contains(&g))));
        if promoted && (m.host_wrote(b) || maybe_seen) {
            if let Some(r) = &v.repl {
                if !r.tracker.is_pending(b) {
                    bad.push(format!(
                        "{when}: block {b} was written by the host but is not owed to the peer"
                    ));
                }
            }
        }
    }
    bad
}

/// After the restart: the takeover carried to its end (the old primary drains what it still
/// holds), then checked again.
fn finish(v: &Arc<Volume>, m: &mut Model) -> Result<(), String> {
    if v.role() == Role::Fenced {
        return Ok(());
    }
    if v.epoch() < 2 {
        apply(v, m, &Op::Promote)?;
    }
    if v.areas.phase() == Phase::Draining {
        let left: Vec<u64> = m.old_primary_holds.iter().copied().collect();
        for b in left {
            apply(v, m, &Op::Drain(b))?;
        }
        apply(v, m, &Op::DrainComplete)?;
    }
    if v.areas.phase() == Phase::Merging {
        apply(v, m, &Op::Merge)?;
    }
    Ok(())
}

/// One run of `ops` with the power cut after `budget` file operations (None: never); returns the
/// file operations used and the violations found.
/// A volume whose touched blocks hold this engine's pre-takeover copy, durably, and its model.
fn setup(dir: &Path, seed: u64) -> (Arc<Volume>, Model) {
    {
        let v = Volume::open(&config(dir)).unwrap_or_else(|e| panic!("setup: {e}"));
        for b in FIRST..FIRST + TOUCHED {
            let w = v.store.write_at(&content(BASE, b), b * BS);
            assert!(w.is_ok(), "setup write");
        }
        assert!(v.store.sync().is_ok() && v.shutdown().is_ok(), "setup sync");
    }
    let v = Volume::open(&config(dir)).unwrap_or_else(|e| panic!("open: {e}"));
    (v, Model::new(seed))
}

/// The power goes out: what no fdatasync covered is gone, and the engine restarts in a new boot.
fn power_loss(dir: &Path, v: Arc<Volume>, label: &str) -> Result<Arc<Volume>, String> {
    power_loss_as(&config(dir), v, label)
}

fn power_loss_as(
    cfg: &crate::volume::VolumeConfig,
    v: Arc<Volume>,
    label: &str,
) -> Result<Arc<Volume>, String> {
    v.store.lose_unsynced();
    v.areas.overlay.lose_unsynced();
    if let Some(r) = &v.repl {
        r.tracker.lose_unsynced();
    }
    drop(v);
    let new_boot = std::fs::write(cfg.state_dir.join("test-boot-id"), label);
    assert!(new_boot.is_ok(), "naming the new boot");
    Volume::open(cfg).map_err(|e| format!("restart after {label} failed: {e}"))
}

/// The checks after a restart, then the takeover carried to its end and checked again.
fn recovered(v: &Arc<Volume>, m: &mut Model, label: &str) -> Vec<String> {
    eprintln!(
        "DEBUG {label}: {:?} pp={:?}",
        v.state(),
        v.areas.state().pending_table()
    );
    let mut bad = check(v, m, &format!("after {label}"));
    if bad.is_empty() {
        if let Err(e) = finish(v, m) {
            bad.push(format!(
                "carrying the takeover on after {label} failed: {e}"
            ));
        }
        bad.extend(check(v, m, "after the takeover was carried to its end"));
    }
    bad
}

/// One run of `ops` with the power cut after `budget` file operations (None: never); returns the
/// file operations used and the violations found.
fn run(dir: &Path, seed: u64, ops: &[Op], budget: Option<i64>) -> (i64, Vec<String>) {
    let (v, mut m) = setup(dir, seed);
    let cut = Cut::after(dir, budget.unwrap_or(i64::MAX / 2));
    for op in ops {
        if apply(&v, &mut m, op).is_err() {
            break;
        }
    }
    let (used, tripped) = (cut.used(), cut.tripped());
    drop(cut);
    if budget.is_some() && !tripped {
        return (used, Vec::new());
    }
    let label = format!("the power cut at op {used}");
    match power_loss(dir, v, &label) {
        Ok(v) => (used, recovered(&v, &mut m, &label)),
        Err(e) => (used, vec![e]),
    }
}

/// One run with file operation `k` failing as `kind` (EIO, ENOSPC, a short write). The run goes on
/// after it, as the host and the old primary would; the engine must not panic, must report a
/// failed fdatasync in its status, and after a power loss and a restart every FLUSHed write must
/// still be there: nothing is acknowledged that is not durable.
fn run_fault(dir: &Path, seed: u64, ops: &[Op], k: i64, kind: Kind) -> Vec<String> {
    let (v, mut m) = setup(dir, seed);
    let fault = Cut::fault(dir, k, kind);
    let trace = std::env::var("TANDEM_FAILPOINT_TRACE").is_ok_and(|t| t == format!("{k}"));
    for op in ops {
        let r = apply(&v, &mut m, op);
        if trace {
            eprintln!("{op:?} -> {r:?} (pp {:?})", v.areas.state().pending_table());
        }
        if r.is_err() && matches!(op, Op::Promote) {
            // A takeover that failed serves nothing.
            break;
        }
    }
    drop(fault);
    let mut bad = Vec::new();
    if v.store.failed() || v.areas.overlay.failed() {
        let c = crate::grpc::status_of(&v).condition;
        if !c.contains("Failed") {
            bad.push(format!("a failed fdatasync is not in the status: {c:?}"));
        }
    }
    match power_loss(dir, v, &format!("the fault at op {k} and a power loss")) {
        Ok(v) => bad.extend(recovered(&v, &mut m, "the fault and a power loss")),
        Err(e) => bad.push(e),
    }
    bad
}

/// Runs `per_seed` for seeds 1..=`$var` (default `default`); each returns its points (crash
/// points or injected faults) and violations. Prints the counts; fails on any violation.
fn campaign(
    label: &str,
    var: &str,
    default: u64,
    what: &str,
    mut per_seed: impl FnMut(u64, &Path) -> (u64, Vec<String>),
) {
    let seeds: u64 = std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    let started = std::time::Instant::now();
    let (mut points, mut violations) = (0u64, Vec::new());
    for seed in 1..=seeds {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let (n, bad) = per_seed(seed, d.path());
        points += n;
        violations.extend(bad.into_iter().map(|b| format!("seed {seed} {b}")));
    }
    eprintln!(
        "{label}: {seeds} scenarios, {points} {what}, {} violations, {:.1} s",
        violations.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn failpoint_campaign() {
    let what = "injected faults (EIO, ENOSPC, short write at every file operation)";
    campaign(
        "failpoints",
        "TANDEM_FAILPOINT_SEEDS",
        1,
        what,
        |seed, d| {
            let ops = scenario(seed);
            let (total, bad) = run(&d.join("full"), seed, &ops, None);
            assert!(bad.is_empty(), "seed {seed} without a fault: {bad:?}");
            let mut out = (0, Vec::new());
            for k in 0..total {
                for kind in [Kind::Eio, Kind::Enospc, Kind::Short] {
                    let bad = run_fault(&d.join(format!("f{k}{kind:?}")), seed, &ops, k, kind);
                    out.0 += 1;
                    out.1
                        .extend(bad.into_iter().map(|b| format!("{kind:?} at op {k}: {b}")));
                }
            }
            out
        },
    );
}

/// Power cuts at every file operation of `run` (takeover side) or `rx_run` (receiving side).
fn cuts(
    d: &Path,
    seed: u64,
    mut run: impl FnMut(&Path, Option<i64>) -> (i64, Vec<String>),
) -> (u64, Vec<String>) {
    let (total, bad) = run(&d.join("full"), None);
    assert!(bad.is_empty(), "seed {seed} without a cut: {bad:?}");
    let mut out = (0, Vec::new());
    for k in 0..total {
        let (_, bad) = run(&d.join(format!("cut{k}")), Some(k));
        out.0 += 1;
        out.1
            .extend(bad.into_iter().map(|b| format!("cut at op {k}: {b}")));
    }
    out
}

#[test]
fn powerloss_campaign() {
    campaign(
        "powerloss",
        "TANDEM_POWERLOSS_SEEDS",
        3,
        "crash points",
        |seed, d| {
            let ops = scenario(seed);
            cuts(d, seed, |dir, k| run(dir, seed, &ops, k))
        },
    );
}

// ---- The receiving side: a secondary applying a stream and a resync (reverse replication). ----

#[derive(Debug, Clone)]
enum Rx {
    /// Records seq..seq+n, each one block.
    Records(u64, u64),
    /// A resync: images of these blocks (the source's current content), then ResyncDone.
    Resync(Vec<u64>),
    /// The flush loop: data fdatasync, progress file, then the durable acknowledgement.
    Durable,
    Heartbeat,
    Checkpoint,
}

fn rx_scenario(seed: u64) -> Vec<Rx> {
    let mut r = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
    let mut ops = vec![Rx::Resync((FIRST..FIRST + TOUCHED).collect()), Rx::Durable];
    let mut seq = 1;
    for _ in 0..20 {
        let op = match r.below(6) {
            0 | 1 => {
                let n = 1 + r.below(4);
                seq += n;
                Rx::Records(seq - n, n)
            }
            2 => Rx::Durable,
            3 => Rx::Resync(
                (0..1 + r.below(4))
                    .map(|_| FIRST + r.below(TOUCHED))
                    .collect(),
            ),
            4 => Rx::Heartbeat,
            _ => Rx::Checkpoint,
        };
        ops.push(op);
    }
    ops.push(Rx::Durable);
    ops
}

/// The source's side of the stream: each block's versions in the order they were applied, and how
/// far the durable acknowledgements reached.
#[derive(Default)]
struct RxModel {
    versions: HashMap<u64, Vec<u32>>,
    /// Per block, the version the last durable acknowledgement covered.
    acked: HashMap<u64, usize>,
    /// Seq of the source's journal (records and resyncs share it).
    next_seq: u64,
    /// The highest seq a durable acknowledgement covered.
    acked_seq: u64,
    /// An image was applied and no durable acknowledgement has covered its ResyncDone since.
    torn: bool,
}

fn rx_msg(body: Body) -> pb::ReplicationMessage {
    pb::ReplicationMessage {
        volume: "v".into(),
        epoch: 2,
        body: Some(body),
    }
}

fn rx_apply(v: &Volume, m: &mut RxModel, op: &Rx) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    match op {
        Rx::Records(seq, n) => {
            let mut batch = Vec::new();
            for s in *seq..seq + n {
                let b = FIRST + (s * 7) % TOUCHED;
                let data = Bytes::from(content(100 + s as u32, b));
                batch.push(rx_msg(Body::Write(pb::WriteRecord {
                    seq: s,
                    timestamp_us: 0,
                    offset: b * BS,
                    crc32c: crc32c::crc32c(&data),
                    data,
                    zero_length: 0,
                })));
            }
            v.apply_batch(batch).map_err(|x| e(&x))?;
            for s in *seq..seq + n {
                let b = FIRST + (s * 7) % TOUCHED;
                m.versions.entry(b).or_default().push(100 + s as u32);
            }
            m.next_seq = seq + n;
        }
        Rx::Resync(blocks) => {
            // The source's current content of each block (its newest version), then the marker.
            let mut batch = Vec::new();
            for &b in blocks {
                let id = m
                    .versions
                    .get(&b)
                    .and_then(|v| v.last().copied())
                    .unwrap_or(BASE);
                let data = Bytes::from(content(id, b));
                batch.push(rx_msg(Body::Block(pb::BlockImage {
                    block: b,
                    generation: 1,
                    crc32c: crc32c::crc32c(&data),
                    data,
                    lazy: true,
                })));
            }
            let start = m.next_seq.max(1);
            batch.push(rx_msg(Body::ResyncDone(pb::ResyncDone {
                consistent_seq: start - 1,
                full: true,
                next_seq: start,
            })));
            // (A batch cut short may have stopped before its first image: only a whole one
            // surely left the replica torn until its ResyncDone is durable.)
            v.apply_batch(batch).map_err(|x| e(&x))?;
            m.torn = true;
            for &b in blocks {
                let id = m
                    .versions
                    .get(&b)
                    .and_then(|v| v.last().copied())
                    .unwrap_or(BASE);
                m.versions.entry(b).or_default().push(id);
            }
        }
        Rx::Durable => {
            let seq = v.make_durable().map_err(|x| e(&x))?;
            m.acked_seq = m.acked_seq.max(seq);
            for (b, vs) in &m.versions {
                m.acked.insert(*b, vs.len() - 1);
            }
            if !v.replica().inconsistent() {
                m.torn = false;
            }
        }
        Rx::Heartbeat => {
            let mut set = Bitmap::new(BLOCKS);
            set.set(FIRST);
            let hb = rx_msg(Body::Heartbeat(pb::Heartbeat {
                pending_words: Some(set.to_sparse().into()),
                last_seq: m.next_seq,
                ..Default::default()
            }));
            v.apply_batch(vec![hb]).map_err(|x| e(&x))?;
        }
        Rx::Checkpoint => v.checkpoint().map_err(|x| e(&x))?,
    }
    Ok(())
}

/// After a power cut on the secondary: nothing a durable acknowledgement covered is gone, the
/// applied seq never falls below it, and a resync cut short is still reported as such.
fn rx_check(v: &Volume, m: &RxModel) -> Vec<String> {
    let mut bad = Vec::new();
    let rs = v.replica();
    if rs.applied_seq < m.acked_seq {
        bad.push(format!(
            "applied seq {} fell below the acknowledged {}",
            rs.applied_seq, m.acked_seq
        ));
    }
    if m.torn && !rs.inconsistent() {
        bad.push("a resync cut short reopened as consistent".into());
    }
    drop(rs);
    for (b, vs) in &m.versions {
        let Some(&floor) = m.acked.get(b) else {
            continue;
        };
        let mut buf = vec![0u8; BS as usize];
        let got = match v.read_local(&mut buf, b * BS) {
            Ok(()) => decode(&buf, *b),
            Err(_) => vec![None],
        };
        let allowed = &vs[floor..];
        if !got.iter().all(|g| g.is_some_and(|g| allowed.contains(&g))) {
            bad.push(format!("block {b} reads {got:?}, allowed {allowed:?}"));
        }
    }
    bad
}

fn rx_run(dir: &Path, ops: &[Rx], budget: Option<i64>) -> (i64, Vec<String>) {
    let cfg = super::tests::base_config(dir);
    let v = Volume::open(&cfg).unwrap_or_else(|e| panic!("open: {e}"));
    let mut m = RxModel::default();
    let cut = Cut::after(dir, budget.unwrap_or(i64::MAX / 2));
    for op in ops {
        if rx_apply(&v, &mut m, op).is_err() {
            break;
        }
    }
    let (used, tripped) = (cut.used(), cut.tripped());
    drop(cut);
    if budget.is_some() && !tripped {
        return (used, Vec::new());
    }
    match power_loss_as(&cfg, v, &format!("the power cut at op {used}")) {
        Ok(v) => (used, rx_check(&v, &m)),
        Err(e) => (used, vec![e]),
    }
}

#[test]
fn powerloss_campaign_on_the_receiving_side() {
    campaign(
        "powerloss-rx",
        "TANDEM_POWERLOSS_SEEDS",
        3,
        "crash points",
        |seed, d| {
            let ops = rx_scenario(seed);
            cuts(d, seed, |dir, k| rx_run(dir, &ops, k))
        },
    );
}
