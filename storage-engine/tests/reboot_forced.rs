//! A primary's node reboots (SIGKILL) while a forced promotion takes the volume over, then the old
//! primary returns, steps down and resyncs: the two data files must end identical, and every
//! write the new history acknowledged must read back. Over two real engine processes.
//!
//! The killed primary had itself been force-promoted before, and had marked blocks pending when
//! its own old primary returned (`Tracker::mark_pending`). That used to set their intent extents
//! in memory without storing the intent file, so its later writes in those extents skipped the
//! intent fsync; killed before the next table checkpoint, they were in neither file, it did not
//! offer them back, and the replicas silently differed (the partition campaign's "reboot
//! (primary) + forced takeover" round: 7 to 1913 blocks).
//!
//! Both engines run with `--lease-ms 0`: a forced takeover with leases first waits out the old
//! primary's promise, which `tests/lease.rs` covers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::*;

const BLOCK: u64 = 4096;
/// Blocks per write-intent extent (1 MiB).
const EXTENT: u64 = 256;
fn force_takeover(e: &Engine) -> serde_json::Value {
    e.control("takeover", &["--policy", "force", "--timeout", "1"])
        .unwrap_or_else(|err| panic!("forced takeover failed: {err}\n{}", e.log_tail(20)))
}

/// The seam: from here on no checkpoint can store the engine's table (`pending_to_peer` becomes
/// a directory, so the rename of each new snapshot fails), as if the process died before its next
/// checkpoint. Returns the table as last stored, for `thaw_table` after the kill.
fn freeze_table(state: &Path) -> Vec<u8> {
    let p = state.join("pending_to_peer");
    let last = std::fs::read(&p).unwrap();
    std::fs::remove_file(&p).unwrap();
    std::fs::create_dir(&p).unwrap();
    last
}

/// Puts the last stored table back (the engine is dead): what a crash before the next checkpoint
/// leaves on disk.
fn thaw_table(state: &Path, last: &[u8]) {
    let p = state.join("pending_to_peer");
    std::fs::remove_dir(&p).unwrap();
    std::fs::write(&p, last).unwrap();
}

/// Differing blocks of the two data files (at most 8 listed).
fn differing(pair: &Pair) -> Vec<u64> {
    let (a, b) = (
        std::fs::read(pair.a.data()).unwrap(),
        std::fs::read(pair.b.data()).unwrap(),
    );
    a.chunks(BLOCK as usize)
        .zip(b.chunks(BLOCK as usize))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i as u64)
        .take(8)
        .collect()
}

#[test]
fn a_killed_primary_that_was_promoted_by_force_before_returns_with_every_unsent_write() {
    let d = tempfile::tempdir().unwrap();
    let mut pair = start_linked(d.path(), "64M", NO_LEASE, NO_LEASE);
    pair.wait_synced(30);

    // Round 1: a (primary, epoch 1) acknowledges writes in extent 10 that b never gets, and dies.
    let first = 10 * EXTENT;
    fault(&pair.a, &["--pause", "true"]);
    for b in first..first + 4 {
        write_block(&pair.a, b, &content(100 + b));
    }
    pair.a.kill();
    assert_eq!(n(&force_takeover(&pair.b), "epoch"), 2);
    // a returns, steps down and offers its table (extent 10 whole, hot at the kill): b marks it
    // pending and overwrites it on a. That is the `mark_pending` the bug needed on b.
    pair.a.restart().unwrap();
    pair.wait_converged(1, 60);
    let diff = differing(&pair);
    assert!(
        diff.is_empty(),
        "replicas differ after the first return, first blocks {diff:?}\n{}",
        pair.describe()
    );

    // Round 2: b (primary, epoch 2) acknowledges writes in extent 10 outside the blocks it
    // marked, a never gets them, and b dies before any checkpoint stores them in its table.
    let frozen = freeze_table(&pair.b.state_dir());
    fault(&pair.b, &["--pause", "true"]);
    let second = first + 40;
    for b in second..second + 4 {
        write_block(&pair.b, b, &content(200 + b));
    }
    pair.b.kill();
    thaw_table(&pair.b.state_dir(), &frozen);

    // a is promoted by force and writes: the new history.
    assert_eq!(n(&force_takeover(&pair.a), "epoch"), 3);
    let new_history: Vec<(u64, Vec<u8>)> = [second + 1, second + 8, 3 * EXTENT]
        .into_iter()
        .map(|b| (b, content(300 + b)))
        .collect();
    for (b, data) in &new_history {
        write_block(&pair.a, *b, data);
    }

    // b returns, steps down, offers what it had unsent, and the pair converges.
    pair.b.restart().unwrap();
    pair.wait_converged(0, 60);
    let diff = differing(&pair);
    assert!(
        diff.is_empty(),
        "replicas differ after converging, first blocks {diff:?}: b's writes {second}..{} were \
         not offered back\n{}",
        second + 4,
        pair.describe()
    );
    // Every write the new history acknowledged reads back, from the primary and from b's file.
    for (b, data) in &new_history {
        assert_eq!(&read_block(&pair.a, *b), data, "block {b} on the primary");
        assert_eq!(
            &file_bytes(&pair.b.data(), b * BLOCK, BLOCK as usize),
            data,
            "block {b} on the secondary"
        );
    }
    // b's writes the new primary never had are the promotion's reported losses, kept in b's
    // export; the volume holds the new history there (a's copy: zeros, or what a wrote).
    for b in [second, second + 2, second + 3] {
        assert_eq!(
            read_block(&pair.a, b),
            vec![0u8; BLOCK as usize],
            "block {b}"
        );
    }
    let s = status(&pair.b);
    let dir = std::path::PathBuf::from(s["lost_export"].as_str().unwrap());
    let img = dir.join("blocks.img");
    for b in second..second + 4 {
        assert_eq!(
            file_bytes(&img, b * BLOCK, BLOCK as usize),
            content(200 + b),
            "block {b} of b's loss export"
        );
    }
    assert!(n(&status(&pair.a), "lost_blocks") >= 4);
}
