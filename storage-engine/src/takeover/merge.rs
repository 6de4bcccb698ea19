//! The merge of the overlay into the data file (S:L308-309, OC9-OC12), after DrainComplete.
//!
//! Chunk by chunk, under the block locks host writes take too (failover.md A23): copy the chunk's
//! overlay blocks into the data file, make it durable, store the overlay bitmap without them, and
//! only then let host writes to those blocks go to the data file. A restart resumes from the
//! persisted bitmap; copying a block twice is harmless. The differential table (DAT2) is not
//! touched: merged blocks still go to the peer by reverse replication.

use std::{sync::atomic::Ordering, time::Duration};

use tokio::sync::watch;

use crate::{
    geometry::{BLOCK_SIZE, BS},
    state::Event,
    volume::{Carry, Volume},
};

/// Blocks per merge chunk (4 MiB): one fsync and one bitmap write each.
const CHUNK: u64 = 1024;

pub async fn run(
    vol: &std::sync::Arc<Volume>,
    stop: &mut watch::Receiver<bool>,
) -> std::io::Result<()> {
    let blocks = vol.size() / BS;
    let total = vol.areas.state().present_count();
    vol.areas
        .event(format!("MergeStart overlay_blocks={total}"));
    let mut chunk = 0;
    while chunk < blocks {
        while vol.areas.merge_paused.load(Ordering::Relaxed) {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = stop.changed() => return Ok(()),
            }
        }
        if *stop.borrow() || !vol.state().merging() {
            // Stopping, or fenced by a newer takeover: whoever is next folds the overlay.
            return Ok(());
        }
        let end = (chunk + CHUNK).min(blocks);
        let v = std::sync::Arc::clone(vol);
        tokio::task::spawn_blocking(move || merge_chunk(&v, chunk, end))
            .await
            .map_err(std::io::Error::other)??;
        chunk = end;
    }
    // Every block is in the data file; host I/O stops taking the routed path.
    vol.areas.seams.hit("merge.before_final_gate");
    let _gate = vol.gate.write().await;
    // No host I/O runs under the gate: whatever reached the overlay behind a chunk already merged
    // is folded (the transition's first effect) before the overlay is punched (the punch must
    // never drop a block). Outside Merging (fenced, or a restart got there) nothing happens.
    let v = std::sync::Arc::clone(vol);
    let step =
        tokio::task::spawn_blocking(move || v.transition(Event::MergeComplete, Carry::default()))
            .await
            .map_err(std::io::Error::other)?
            .map_err(std::io::Error::other)?;
    if step.changes() {
        vol.areas.event(format!("MergeComplete blocks={total}"));
    }
    Ok(())
}

pub(crate) fn merge_chunk(vol: &Volume, from: u64, to: u64) -> std::io::Result<()> {
    let Some(r) = &vol.repl else { return Ok(()) };
    let any = {
        let st = vol.areas.state();
        st.next_present(from).is_some_and(|b| b < to)
    };
    if !any {
        // A write that reaches this chunk's overlay after this look is folded under the gate at
        // the end of the merge.
        return Ok(());
    }
    // Invariant: the chunk's overlay blocks are listed under the block locks host writes take, so
    // a write that chose the overlay before the lock is in the list, and one after it sees the
    // bit cleared and goes to the data file. Test:
    // `takeover::tests::a_write_racing_drain_complete_and_the_merge_is_kept`.
    let _locks = r.tracker.locks.lock(from..to);
    let todo: Vec<u64> = {
        let st = vol.areas.state();
        (from..to).filter(|&b| st.present(b)).collect()
    };
    vol.areas.seams.hit("merge.chunk.listed");
    copy_to_data(vol, &todo)
}

/// Copies overlay blocks into the data file, makes it durable, then stores the overlay bitmap
/// without them. The caller holds the blocks' locks or the gate.
pub(crate) fn copy_to_data(vol: &Volume, blocks: &[u64]) -> std::io::Result<()> {
    if blocks.is_empty() {
        return Ok(());
    }
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    for &b in blocks {
        vol.areas.overlay.read_at(&mut buf, b * BS)?;
        vol.store.write_at(&buf, b * BS)?;
    }
    vol.store.sync()?;
    vol.areas.clear_overlay_durably(blocks)?;
    // The copied blocks leave the overlay durably before the caller lets host writes to them go
    // to the data file: a restart must not find them allocated there and route reads back to
    // this old copy (`Areas::open`).
    let mut i = 0;
    while i < blocks.len() {
        let mut j = i + 1;
        while j < blocks.len() && blocks[j] == blocks[j - 1] + 1 {
            j += 1;
        }
        let n = (j - i) as u64;
        vol.areas.overlay.punch_hole(blocks[i] * BS, n * BS)?;
        i = j;
    }
    vol.areas.overlay.sync()
}
