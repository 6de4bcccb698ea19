//! Races and power loss in the takeover path, each forced through a seam (crate::seam) so the
//! interleaving is the one named, every run.

use std::{path::Path, sync::Arc, time::Duration};

use bytes::Bytes;

use crate::{
    bitmap::Bitmap,
    meta::{Phase, Role},
    pb::{self, replication_message::Body},
    repl::Mode,
    volume::{PairConfig, Volume, VolumeConfig},
};

pub(super) const BS: u64 = 4096;
pub(super) const BLOCKS: u64 = 2048;

/// An engine about to take over: a consistent secondary at epoch 1 (its progress file says so
/// before it first opens).
pub(crate) fn config(dir: &Path) -> VolumeConfig {
    let cfg = base_config(dir);
    let progress = cfg.state_dir.join("progress");
    if !progress.exists() {
        std::fs::create_dir_all(&cfg.state_dir).unwrap();
        let p = crate::format::progress::Progress {
            applied_seq: 0,
            standing: crate::state::Standing::Consistent,
        };
        std::fs::write(&progress, crate::format::progress::encode(p)).unwrap();
    }
    cfg
}

/// The same engine's config without touching its state dir.
pub(crate) fn base_config(dir: &Path) -> VolumeConfig {
    VolumeConfig {
        name: "v".into(),
        data: dir.join("data"),
        size: BLOCKS * BS,
        state_dir: dir.join("state"),
        initial_role: Role::Secondary,
        pair: Some(PairConfig {
            // Nothing listens there: proxied reads fail fast, nothing is replicated.
            peer: "127.0.0.1:9".into(),
            token: None,
            mode: Mode::Async,
            journal_bytes: 1 << 20,
            rate: 0,
            sync_timeout: Duration::from_secs(1),
            lease_ms: 0,
            lease_wait: Duration::from_secs(1),
        }),
        secondary_access: Default::default(),
        proxy_timeout: Duration::from_millis(200),
        implicit_takeover: false,
    }
}

/// A volume that has just taken over at epoch 2, with `pending` still on the old primary.
fn draining(dir: &Path, pending: &[u64]) -> Arc<Volume> {
    let v = Volume::open(&config(dir)).unwrap();
    let mut table = Bitmap::new(BLOCKS);
    for &b in pending {
        table.set(b);
    }
    v.promote(2, table, None).unwrap();
    assert_eq!(v.areas.phase(), Phase::Draining);
    v
}

fn block(byte: u8) -> Vec<u8> {
    vec![byte; BS as usize]
}

/// Runs a future to completion on a runtime of its own (these tests drive threads by hand).
pub(crate) fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn read(v: &Volume, b: u64) -> Vec<u8> {
    block_on(v.read(b * BS, BS as u32)).unwrap()
}

fn write(v: &Volume, b: u64, byte: u8) {
    block_on(v.write(b * BS, block(byte), false)).unwrap();
}

fn run_merge(v: &Arc<Volume>) -> std::thread::JoinHandle<std::io::Result<()>> {
    let v = Arc::clone(v);
    std::thread::spawn(move || {
        let (_tx, mut stop) = tokio::sync::watch::channel(false);
        block_on(super::merge::run(&v, &mut stop))
    })
}

fn drained_image(b: u64, byte: u8) -> pb::ReplicationMessage {
    drained_image_of(b, block(byte))
}

/// A drained block image at epoch 2, as the fenced old primary sends it.
pub(crate) fn drained_image_of(b: u64, content: Vec<u8>) -> pb::ReplicationMessage {
    let data = Bytes::from(content);
    pb::ReplicationMessage {
        volume: "v".into(),
        epoch: 2,
        body: Some(Body::Block(pb::BlockImage {
            block: b,
            generation: 1,
            crc32c: crc32c::crc32c(&data),
            data,
            lazy: false,
        })),
    }
}

/// A host write that chose the overlay while draining, and lands only after DrainComplete and
/// after the merge looked at its chunk, is merged, not punched away with the overlay. With a
/// neighbour in the same chunk the merge chunk itself must see it; without one, the final fold.
fn write_racing_the_merge(neighbour: bool) {
    let d = tempfile::tempdir().unwrap();
    let v = draining(d.path(), &[1000]);
    if neighbour {
        write(&v, 6, 0x66);
    }
    let held_write = v.areas.seams.arm("route.write.decided");
    let writer = {
        let v = Arc::clone(&v);
        std::thread::spawn(move || write(&v, 5, 0x55))
    };
    assert!(held_write.wait_arrived(), "the write never chose its area");
    v.finish_drain(0).unwrap();
    assert_eq!(v.areas.phase(), Phase::Merging);
    let held_chunk = v.areas.seams.arm("merge.chunk.listed");
    let held_end = v.areas.seams.arm("merge.before_final_gate");
    let merge = run_merge(&v);
    if neighbour {
        // Unprotected, the merge lists the chunk's overlay blocks now, before the write's bit is
        // set; protected, it lists them only under the write's block locks, so not yet.
        let listed_early = held_chunk.wait_arrived_for(Duration::from_millis(300));
        held_write.release();
        writer.join().unwrap();
        held_chunk.release();
        eprintln!("merge listed the chunk before the write landed: {listed_early}");
    } else {
        assert!(
            held_end.wait_arrived(),
            "the merge never finished its chunks"
        );
        held_write.release();
        writer.join().unwrap();
    }
    held_end.release();
    merge.join().unwrap().unwrap();
    drop((held_write, held_chunk, held_end));
    assert_eq!(v.areas.phase(), Phase::Normal);
    assert!(
        read(&v, 5) == block(0x55),
        "the acknowledged write was lost by the merge"
    );
    if neighbour {
        assert!(read(&v, 6) == block(0x66));
    }
}

#[test]
fn a_write_racing_drain_complete_and_the_merge_is_kept() {
    write_racing_the_merge(true);
}

#[test]
fn a_write_racing_drain_complete_and_the_merge_is_kept_alone_in_its_chunk() {
    write_racing_the_merge(false);
}

/// A read that looked at the data file while the block still lived in the overlay must not return
/// that old content once a merge chunk moved the block (the read's choice and its bytes belong
/// together).
#[test]
fn a_read_racing_a_merge_chunk_never_returns_the_old_block() {
    let d = tempfile::tempdir().unwrap();
    let v = draining(d.path(), &[1000]);
    write(&v, 5, 0x55);
    v.finish_drain(0).unwrap();
    let held_read = v.areas.seams.arm("route.read.local_read");
    let reader = {
        let v = Arc::clone(&v);
        std::thread::spawn(move || read(&v, 5))
    };
    assert!(
        held_read.wait_arrived(),
        "the read never reached the data file"
    );
    let held_end = v.areas.seams.arm("merge.before_final_gate");
    let merge = run_merge(&v);
    // Unprotected, the merge copies and clears block 5 now, under the held read; protected, it
    // waits for the read's block locks and cannot reach its end.
    let merged_under_the_read = held_end.wait_arrived_for(Duration::from_millis(300));
    held_read.release();
    let got = reader.join().unwrap();
    held_end.release();
    merge.join().unwrap().unwrap();
    assert!(
        got == block(0x55),
        "stale read (merge finished its chunks under the read: {merged_under_the_read})"
    );
    assert!(read(&v, 5) == block(0x55));
}

/// A drained image clears its `peer_pending` bit; a checkpoint then stores the table. After a power
/// loss the block must read as the image, not as this engine's pre-takeover content.
#[test]
fn a_drained_block_survives_power_loss_after_a_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let v = draining(d.path(), &[5, 1000]);
    v.apply_drain(vec![drained_image(5, 0x77)]).unwrap();
    v.checkpoint().unwrap();
    v.store.lose_unsynced();
    v.areas.overlay.lose_unsynced();
    drop(v);
    let v = Volume::open(&config(d.path())).unwrap();
    assert_eq!(v.areas.phase(), Phase::Draining);
    // Block 5 is either still pending (a proxied read, which fails here: EIO is no stale read) or
    // in the data file; it must never read as the old zeros.
    match block_on(v.read(5 * BS, BS as u32)) {
        Ok(got) => assert!(got == block(0x77), "stale block after power loss"),
        Err(e) => assert!(v.areas.state().pending(5), "{e}"),
    }
}

/// A host FLUSH stores the overlay bitmap with its write's bit; a checkpoint that took its snapshot
/// before that write must not rename its older snapshot over it afterwards.
#[test]
fn a_flushed_overlay_write_survives_a_racing_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let v = draining(d.path(), &[1000]);
    write(&v, 4, 0x44);
    let held = v.areas.seams.arm("areas.persist.before_store");
    let ck = {
        let v = Arc::clone(&v);
        std::thread::spawn(move || v.checkpoint())
    };
    assert!(
        held.wait_arrived(),
        "the checkpoint never took its snapshot"
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let flusher = {
        let v = Arc::clone(&v);
        std::thread::spawn(move || {
            write(&v, 5, 0x55);
            let r = block_on(v.flush());
            let _ = tx.send(());
            r
        })
    };
    // Protected, the FLUSH waits for the checkpoint's store; unprotected it finishes first and the
    // checkpoint's older snapshot lands over it.
    let _ = rx.recv_timeout(Duration::from_millis(300));
    held.release();
    ck.join().unwrap().unwrap();
    flusher.join().unwrap().unwrap();
    drop(held);
    v.store.lose_unsynced();
    v.areas.overlay.lose_unsynced();
    drop(v);
    let v = Volume::open(&config(d.path())).unwrap();
    assert!(read(&v, 4) == block(0x44));
    assert!(
        read(&v, 5) == block(0x55),
        "the FLUSHed overlay write was lost"
    );
}

/// The worst pending set of a volume (every 64-block word nonzero) fits in one message, for the
/// sizes where a fixed 64 MiB cap did not (2 TiB and up).
#[test]
fn the_message_cap_fits_the_worst_table_of_a_volume() {
    use prost::Message;
    for tib in [2u64] {
        let bytes = tib << 40;
        let blocks = bytes / BS;
        let mut worst = Bitmap::new(blocks);
        for w in 0..blocks.div_ceil(64) {
            worst.set(w * 64);
        }
        let reply = pb::HandoffReply {
            epoch: 9,
            pending_words: Some(worst.to_sparse().into()),
            pending_blocks: worst.count(),
            last_seq: u64::MAX,
            block_size: BS,
            ..Default::default()
        };
        let len = reply.encoded_len();
        assert!(len > 64 << 20, "{tib} TiB: the case a fixed cap refused");
        assert!(
            len <= super::handoff::message_cap(bytes),
            "{tib} TiB: a {len}-byte table does not fit"
        );
    }
}

/// The old primary answers an older caller (no `accepts_runs`) with the sparse words it always
/// sent, a newer one with runs; the new primary reads either (and the dense bitmap of older peers
/// still), gets the same table, and stores the runs as received: the file loads back as the table.
#[test]
fn a_handoff_table_is_read_in_every_form_a_peer_may_send() {
    let d = tempfile::tempdir().unwrap();
    let cfg = VolumeConfig {
        initial_role: Role::Primary,
        ..base_config(&d.path().join("old"))
    };
    let old = Volume::open(&cfg).unwrap();
    let written = [3u64, 4, 5, 700, 2047];
    for &b in &written {
        write(&old, b, 0x11);
    }
    let words = block_on(old.fence_and_handoff(2, false)).unwrap();
    assert!(words.pending_runs.is_none() && words.pending_words.is_some());
    let runs = block_on(old.fence_and_handoff(2, true)).unwrap();
    assert!(runs.pending_words.is_none() && runs.pending_runs.is_some());
    let mut dense = words.clone();
    dense.pending_words = None;
    let mut expect = Bitmap::new(BLOCKS);
    for &b in &written {
        expect.set(b);
    }
    dense.pending_bitmap = expect.to_bytes().into();
    for (h, form) in [(&words, "words"), (&runs, "runs"), (&dense, "bitmap")] {
        let got = super::handoff::handed_table(BLOCKS, h).unwrap();
        assert_eq!((got.form, &got.table), (form, &expect));
        assert_eq!(got.file.is_some(), form == "runs");
    }
    // The new primary stores the runs as they came.
    let new = Volume::open(&config(&d.path().join("new"))).unwrap();
    let got = super::handoff::handed_table(BLOCKS, &runs).unwrap();
    let file_len = got.file.as_ref().map(|f| f.len());
    new.promote_stored(2, got.table, got.file, None).unwrap();
    let path = d.path().join("new/state/peer_pending");
    assert_eq!(
        std::fs::metadata(&path).unwrap().len() as usize,
        file_len.unwrap()
    );
    assert_eq!(Bitmap::load(&path, BLOCKS).unwrap(), Some(expect));
    assert_eq!(new.areas.state().pending_count(), written.len() as u64);
}

/// A handoff reply whose table is malformed is refused with the reason, whatever its form (the
/// takeover parses it before anything is stored or promoted).
#[test]
fn a_malformed_handoff_table_is_refused_with_its_reason() {
    let reply = |runs: Option<Vec<u8>>, words: Option<Vec<u8>>, dense: Vec<u8>| pb::HandoffReply {
        epoch: 2,
        pending_runs: runs.map(Into::into),
        pending_words: words.map(Into::into),
        pending_bitmap: dense.into(),
        ..Default::default()
    };
    let cases = [
        (reply(Some(vec![0x80]), None, vec![]), "truncated"),
        (
            reply(Some(vec![0, 0x80, 0x10]), None, vec![]),
            "past the table",
        ),
        (reply(Some(vec![0xff; 11]), None, vec![]), "varint"),
        (
            reply(None, Some(vec![0; 15]), vec![]),
            "words form of 15 bytes",
        ),
        (reply(None, None, vec![0; 3]), "bitmap form of 3 bytes"),
    ];
    for (h, why) in cases {
        let Err(e) = super::handoff::handed_table(BLOCKS, &h) else {
            panic!("{h:?} was accepted");
        };
        assert!(e.contains("malformed") && e.contains(why), "{e}");
    }
}

/// A write (and a zeroing write) acknowledged into the overlay just before the process is killed,
/// before any FLUSH or checkpoint stored its bit, still reads back after the restart: the page
/// cache kept the overlay block, and the restart finds it allocated.
#[test]
fn an_overlay_write_survives_a_kill_before_any_flush() {
    let d = tempfile::tempdir().unwrap();
    {
        // The replica's copy of block 7 before the takeover.
        let v = Volume::open(&config(d.path())).unwrap();
        v.store.write_at(&block(0x70), 7 * BS).unwrap();
        v.store.sync().unwrap();
    }
    let v = draining(d.path(), &[1000]);
    write(&v, 5, 0x55);
    block_on(v.write_zeroes(7 * BS, BS, false, false)).unwrap();
    drop(v); // SIGKILL: nothing stored, the page cache survives
    let v = Volume::open(&config(d.path())).unwrap();
    assert_eq!(v.areas.phase(), Phase::Draining);
    assert!(
        read(&v, 5) == block(0x55),
        "an acknowledged overlay write was lost"
    );
    assert!(read(&v, 7) == block(0), "an acknowledged zeroing was lost");
}

/// A merged block leaves the overlay before host writes to it go to the data file: after a kill
/// the restart must not route its reads back to the overlay's older copy.
#[test]
fn a_write_after_the_merge_of_its_block_survives_a_kill() {
    let d = tempfile::tempdir().unwrap();
    let v = draining(d.path(), &[1000]);
    write(&v, 5, 0x55);
    v.finish_drain(0).unwrap();
    // Block 5's chunk is merged; the merge as a whole is not over (still Merging).
    super::merge::merge_chunk(&v, 0, 1024).unwrap();
    assert_eq!(v.areas.phase(), Phase::Merging);
    write(&v, 5, 0x56);
    drop(v);
    let v = Volume::open(&config(d.path())).unwrap();
    assert_eq!(v.areas.phase(), Phase::Merging);
    assert!(
        read(&v, 5) == block(0x56),
        "a read went back to the merged copy"
    );
}

/// A fence whose durable steps wait on the disk (here held at their seam) does not hold the
/// runtime worker it was called on: with one worker, another task still runs. A held worker is what
/// failed takeovers between two live engines in the 8 GiB history campaign (HTTP/2
/// `KeepAliveTimedOut`: the fence's meta fsync waited behind gigabytes of scattered writeback).
#[test]
fn a_fence_waiting_on_the_disk_leaves_the_runtime_free() {
    let d = tempfile::tempdir().unwrap();
    let cfg = crate::volume::VolumeConfig {
        initial_role: Role::Primary,
        ..base_config(d.path())
    };
    let v = Volume::open(&cfg).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    let held = v.areas.seams.arm("transition.effects");
    let fence = {
        let v = Arc::clone(&v);
        rt.spawn(async move { v.fence_and_handoff(2, true).await.map(|r| r.epoch) })
    };
    assert!(held.wait_arrived(), "the fence never reached its effects");
    // Timed on this thread, not on the runtime: a held worker would stop its timers too.
    let (tx, rx) = std::sync::mpsc::channel();
    drop(rt.spawn(async move { tx.send(7) }));
    let ran = rx.recv_timeout(Duration::from_secs(10));
    held.release();
    assert_eq!(
        ran,
        Ok(7),
        "the runtime's only worker was held by a fence waiting on the disk"
    );
    assert_eq!(rt.block_on(fence).unwrap().unwrap(), 2);
    assert_eq!(v.role(), Role::Fenced);
}
