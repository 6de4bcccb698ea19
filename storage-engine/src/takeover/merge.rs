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
    meta::{Phase, Role},
    volume::{Volume, BLOCK_SIZE},
};

const BS: u64 = BLOCK_SIZE as u64;
/// Blocks per merge chunk (4 MiB): one fsync and one bitmap write each.
const CHUNK: u64 = 1024;

pub async fn run(
    vol: &std::sync::Arc<Volume>,
    stop: &mut watch::Receiver<bool>,
) -> std::io::Result<()> {
    let blocks = vol.size() / BS;
    let total = vol.areas.state().overlay_present.count();
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
        if *stop.borrow() || vol.role() != Role::Primary {
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
    let _gate = vol.gate.write().await;
    if vol.role() != Role::Primary || vol.areas.phase() != Phase::Merging {
        return Ok(());
    }
    let io = |e: crate::meta::MetaError| std::io::Error::other(e.to_string());
    vol.update_meta(|m| m.takeover.phase = Phase::Normal)
        .map_err(io)?;
    vol.areas.set_phase(Phase::Normal);
    vol.areas.overlay.punch_hole(0, vol.size())?;
    vol.areas.event(format!("MergeComplete blocks={total}"));
    if let Some(r) = &vol.repl {
        r.wake.notify_one();
    }
    Ok(())
}

fn merge_chunk(vol: &Volume, from: u64, to: u64) -> std::io::Result<()> {
    let Some(r) = &vol.repl else { return Ok(()) };
    let todo: Vec<u64> = {
        let st = vol.areas.state();
        (from..to).filter(|&b| st.overlay_present.get(b)).collect()
    };
    if todo.is_empty() {
        return Ok(());
    }
    let _locks = r.tracker.locks.lock(from..to);
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    for &b in &todo {
        vol.areas.overlay.read_at(&mut buf, b * BS)?;
        vol.store.write_at(&buf, b * BS)?;
    }
    vol.store.sync()?;
    vol.areas.clear_overlay_durably(&todo)
}
