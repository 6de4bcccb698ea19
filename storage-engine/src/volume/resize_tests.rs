//! Grows of one engine: data and tables across a grow and a restart, the refusals, and the power
//! cut at every file operation of a grow (`seam::power`: the disk keeps only what an fsync covered).

use std::{path::Path, sync::Arc};

use crate::{
    error::EngineError,
    meta::Role,
    pb,
    seam::power::Cut,
    takeover::tests::{base_config, block_on},
    volume::{Volume, VolumeConfig},
};

const BS: u64 = 4096;
const OLD: u64 = 2048 * BS;
const NEW: u64 = 3072 * BS;

/// A paired primary whose peer never answers (127.0.0.1:9), `size` bytes on first open.
fn primary(dir: &Path, size: u64) -> VolumeConfig {
    let mut cfg = base_config(dir);
    cfg.initial_role = Role::Primary;
    cfg.size = size;
    cfg
}

fn block(b: u64, tag: u8) -> Vec<u8> {
    let mut v = vec![tag; BS as usize];
    v[..8].copy_from_slice(&b.to_le_bytes());
    v
}

fn write(v: &Volume, b: u64, tag: u8) {
    block_on(v.write(b * BS, block(b, tag), false)).unwrap();
}

fn read(v: &Volume, b: u64) -> Vec<u8> {
    block_on(v.read(b * BS, BS as u32)).unwrap()
}

fn resize(v: &Volume, size: u64) -> Result<pb::ResizeReply, EngineError> {
    block_on(v.resize(&pb::ResizeRequest {
        volume: "v".into(),
        epoch: 0,
        size,
    }))
}

/// Blocks written before the grow (the old last block among them).
const WRITTEN: [u64; 4] = [0, 17, 1000, OLD / BS - 1];

#[test]
fn a_grown_volume_keeps_its_data_and_tables_and_never_shrinks_on_restart() {
    let d = tempfile::tempdir().unwrap();
    let cfg = primary(d.path(), OLD);
    let v = Volume::open(&cfg).unwrap();
    for b in WRITTEN {
        write(&v, b, 1);
    }
    block_on(v.grow_to(NEW)).unwrap();
    assert_eq!(v.size(), NEW);
    let new_block = NEW / BS - 1;
    assert_eq!(
        read(&v, new_block),
        vec![0; BS as usize],
        "new blocks read zeros"
    );
    write(&v, new_block, 2);
    let t = v.repl.as_ref().unwrap().tracker.pending();
    assert_eq!(t.len(), NEW / BS);
    for b in WRITTEN.into_iter().chain([new_block]) {
        assert!(t.get(b), "block {b} is owed to the peer");
    }
    v.checkpoint().unwrap();
    drop(v);

    // The operator still passes the old --size: the stored size wins, nothing is refused.
    let v = Volume::open(&cfg).unwrap();
    assert_eq!(v.size(), NEW);
    for b in WRITTEN {
        assert_eq!(read(&v, b), block(b, 1));
    }
    assert_eq!(read(&v, new_block), block(new_block, 2));
    assert!(v.repl.as_ref().unwrap().tracker.is_pending(new_block));
    drop(v);

    // A larger --size grows at open, the same way.
    let bigger = primary(d.path(), NEW + 256 * BS);
    let v = Volume::open(&bigger).unwrap();
    assert_eq!(v.size(), NEW + 256 * BS);
    assert_eq!(read(&v, new_block), block(new_block, 2));
    assert_eq!(
        std::fs::metadata(d.path().join("data")).unwrap().len(),
        NEW + 256 * BS
    );
}

#[test]
fn shrinking_an_unaligned_size_and_an_unreachable_secondary_change_nothing() {
    let d = tempfile::tempdir().unwrap();
    let cfg = primary(d.path(), OLD);
    let v = Volume::open(&cfg).unwrap();
    write(&v, 5, 7);
    let e = resize(&v, OLD - BS).unwrap_err();
    assert!(matches!(e, EngineError::InvalidArgument(_)), "{e}");
    assert!(e.to_string().contains("shrinking"), "{e}");
    let e = resize(&v, OLD + 100).unwrap_err();
    assert!(matches!(e, EngineError::InvalidArgument(_)), "{e}");
    // The same size is a no-op, whatever the peer.
    assert_eq!(resize(&v, OLD).unwrap().size, OLD);
    // Growing asks the secondary first; it does not answer, so this engine keeps its size.
    let e = resize(&v, NEW).unwrap_err();
    assert!(matches!(e, EngineError::PeerUnreachable(_)), "{e}");
    assert_eq!(
        tonic::Status::from(e).code(),
        tonic::Code::Unavailable,
        "retryable"
    );
    assert_eq!(v.size(), OLD);
    assert_eq!(read(&v, 5), block(5, 7));
    drop(v);
    let v = Volume::open(&cfg).unwrap();
    assert_eq!(v.size(), OLD);
    assert_eq!(read(&v, 5), block(5, 7));
}

#[test]
fn an_unpaired_primary_grows_and_a_secondary_refuses_engine_resize() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = primary(d.path(), OLD);
    cfg.pair = None;
    let v = Volume::open(&cfg).unwrap();
    let r = resize(&v, NEW).unwrap();
    assert_eq!((r.size, r.peer_size), (NEW, 0));
    drop(v);

    let d = tempfile::tempdir().unwrap();
    let mut cfg = base_config(d.path());
    cfg.size = OLD;
    let v = Volume::open(&cfg).unwrap();
    assert_eq!(v.role(), Role::Secondary);
    let e = resize(&v, NEW).unwrap_err();
    assert!(matches!(e, EngineError::WrongRole(_)), "{e}");
    // Peer.Resize grows it and persists the size.
    let r = block_on(v.answer_resize(&pb::ResizeRequest {
        volume: "v".into(),
        epoch: 1,
        size: NEW,
    }))
    .unwrap();
    assert_eq!(r.size, NEW);
    drop(v);
    assert_eq!(Volume::open(&cfg).unwrap().size(), NEW);
}

/// One run: blocks written and FLUSHed at the old size, then a grow with the power cut after
/// `k` file operations. Returns whether the cut happened, and what is wrong after the restart.
fn cut_run(dir: &Path, k: i64) -> (bool, Vec<String>) {
    let cfg = primary(dir, OLD);
    let v = Volume::open(&cfg).unwrap();
    for b in WRITTEN {
        write(&v, b, 3);
    }
    block_on(v.flush()).unwrap();
    // The table and intent files on disk are at the old size when the power goes.
    v.checkpoint().unwrap();
    let cut = Cut::after(dir, k);
    let grown = block_on(v.grow_to(NEW));
    let tripped = cut.tripped();
    drop(cut);
    let mut bad = Vec::new();
    if !tripped && grown.is_err() {
        bad.push(format!("the grow failed without a cut: {grown:?}"));
    }
    // The power loss: what no fsync covered is gone.
    v.store.lose_unsynced();
    v.areas.overlay.lose_unsynced();
    drop(v);
    // Restart with the old --size, so the disk alone says which size won.
    let v = match Volume::open(&cfg) {
        Ok(v) => v,
        Err(e) => return (tripped, vec![format!("restart failed: {e}")]),
    };
    let size = v.size();
    if size != OLD && size != NEW {
        bad.push(format!("size {size} is neither the old nor the new one"));
    }
    if !tripped && size != NEW {
        bad.push(format!("the grow finished but the size is {size}"));
    }
    let file = std::fs::metadata(dir.join("data"))
        .map(|m| m.len())
        .unwrap_or(0);
    if file != size {
        bad.push(format!("data file is {file} bytes, the volume {size}"));
    }
    for b in WRITTEN {
        if read(&v, b) != block(b, 3) {
            bad.push(format!("block {b} lost its flushed content"));
        }
        if !v.repl.as_ref().unwrap().tracker.is_pending(b) {
            bad.push(format!("block {b} is no longer owed to the peer"));
        }
    }
    if size == NEW && read(&v, NEW / BS - 1) != vec![0; BS as usize] {
        bad.push("a new block does not read zeros".into());
    }
    drop(v);
    // Whatever survived, the grow can be done again and the new area takes writes.
    let v = match Volume::open(&primary(dir, NEW)) {
        Ok(v) => v,
        Err(e) => return (tripped, vec![format!("growing at restart failed: {e}")]),
    };
    write(&v, NEW / BS - 1, 4);
    if v.size() != NEW || read(&v, NEW / BS - 1) != block(NEW / BS - 1, 4) {
        bad.push("after growing again the new area does not hold a write".into());
    }
    (tripped, bad)
}

#[test]
fn power_loss_at_every_step_of_a_grow() {
    // extend data (2), extend overlay (2), meta (1): every step is cut once.
    crate::seam::power::at_every_cut(5, cut_run);
}

/// Host I/O goes on during a grow; the grow waits for the gate only for its commit.
#[test]
fn host_writes_during_a_grow_land_and_stay_owed() {
    let d = tempfile::tempdir().unwrap();
    let v: Arc<Volume> = Volume::open(&primary(d.path(), OLD)).unwrap();
    let held = v.areas.seams.arm("grow-before-commit");
    let grower = {
        let v = Arc::clone(&v);
        std::thread::spawn(move || block_on(v.grow_to(NEW)))
    };
    assert!(held.wait_arrived());
    // The grow holds the gate exclusively here: a write waits, then lands once it commits.
    let writer = {
        let v = Arc::clone(&v);
        std::thread::spawn(move || write(&v, 9, 5))
    };
    held.release();
    grower.join().unwrap().unwrap();
    writer.join().unwrap();
    assert_eq!(read(&v, 9), block(9, 5));
    assert!(v.repl.as_ref().unwrap().tracker.is_pending(9));
    assert_eq!(v.size(), NEW);
}
