//! Online expansion with real engine processes (issue 14): a live pair grows under writes and
//! ends byte-identical, new blocks replicate, old sessions keep their size, shrinking and an
//! unreachable secondary change nothing, restarts with another `--size`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{
    atomic::{AtomicBool, AtomicU64, Ordering},
    Arc,
};

use common::*;
use storage_engine::nbd::client::NbdClient;

const M: u64 = 1 << 20;

fn resize(e: &Engine, size: &str) -> Result<serde_json::Value, String> {
    e.control("resize", &["--size", size])
}

fn size_of(e: &Engine) -> u64 {
    status(e)["size"].as_u64().unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_live_pair_grows_under_writes_and_its_replicas_end_identical() {
    let d = tempfile::tempdir().unwrap();
    let mut pair = start_pair(d.path(), "16M", &[], &[]);
    // A session opened before the grow: it keeps the size it was told.
    let rt = rt();
    let mut old = rt
        .block_on(NbdClient::connect(&pair.a.nbd_addr(), "vol"))
        .unwrap();
    assert_eq!(old.size(), 16 * M);

    // Writers in the old area all through the grow.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let writer = {
        let (uri, stop, rounds) = (pair.a.uri(), Arc::clone(&stop), Arc::clone(&rounds));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let n = rounds.fetch_add(1, Ordering::Relaxed);
                let off = (n % 15) * M;
                qemu_io_ok(&uri, &[&format!("write -P {} {off} 1M", 1 + n % 200)]);
            }
        })
    };
    wait_until(30, "writers started", || {
        rounds.load(Ordering::Relaxed) >= 2
    });
    let r = resize(&pair.a, "64M").unwrap_or_else(|e| panic!("resize: {e}"));
    assert_eq!(r["size"], 64 * M);
    assert_eq!(r["peer_size"], 64 * M);
    let before = rounds.load(Ordering::Relaxed);
    wait_until(30, "writes after the grow", || {
        rounds.load(Ordering::Relaxed) >= before + 2
    });
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();

    // A new session sees the new size and writes the new area, up to its last byte.
    qemu_io_ok(
        &pair.a.uri(),
        &["write -P 77 20M 2M", "write -P 78 65024k 512k", "flush"],
    );
    let (ok, _) = qemu_io_passed(&qemu_io(&pair.a.uri(), &["write -P 1 64M 4k"]));
    assert!(!ok, "a write past the new end landed");
    // The old session is refused past its own end, cleanly, and goes on working inside it.
    let past = rt.block_on(old.write(16 * M, &[5u8; 4096]));
    assert!(past.is_err(), "a write past the session's size landed");
    rt.block_on(old.write(0, &[6u8; 4096])).unwrap();
    assert!(rt.block_on(old.read(0, 4096)).unwrap() == vec![6u8; 4096]);
    drop(old);

    pair.wait_synced(60);
    assert_eq!(size_of(&pair.a), 64 * M);
    assert_eq!(size_of(&pair.b), 64 * M);
    assert_eq!(std::fs::metadata(pair.b.data()).unwrap().len(), 64 * M);
    assert!(pair.files_identical(), "replicas differ after the grow");
    assert!(file_bytes(&pair.b.data(), 20 * M, 4096) == vec![77u8; 4096]);
    assert!(file_bytes(&pair.b.data(), 64 * M - 4096, 4096) == vec![78u8; 4096]);

    // The secondary persisted its new size: restarted with its old --size it keeps it.
    pair.b.restart().unwrap();
    assert_eq!(size_of(&pair.b), 64 * M);
    assert!(
        pair.b.log().contains("never shrink"),
        "no warning in the log"
    );
    pair.wait_synced(60);
    assert!(pair.files_identical());
    let metrics = status(&pair.a);
    assert_eq!(metrics["size"], 64 * M);
}

#[test]
fn shrinking_and_an_unreachable_secondary_change_nothing() {
    let d = tempfile::tempdir().unwrap();
    let mut pair = start_pair(d.path(), "16M", &[], &[]);
    qemu_io_ok(&pair.a.uri(), &["write -P 9 15M 1M", "flush"]);
    let e = resize(&pair.a, "8M").unwrap_err();
    assert!(e.contains("shrinking"), "{e}");
    let e = resize(&pair.a, "16M1").unwrap_err();
    assert!(e.contains("invalid size"), "{e}");
    let e = resize(&pair.a, "17000000").unwrap_err();
    assert!(e.contains("multiple of the block size"), "{e}");
    assert_eq!(resize(&pair.a, "16M").unwrap()["size"], 16 * M);
    // Engine.Resize is the primary's.
    let e = resize(&pair.b, "32M").unwrap_err();
    assert!(
        e.contains("WrongRole") || e.contains("resize the primary"),
        "{e}"
    );

    pair.b.kill();
    let e = resize(&pair.a, "32M").unwrap_err();
    assert!(e.contains("PeerUnreachable"), "{e}");
    assert_eq!(size_of(&pair.a), 16 * M);
    assert_eq!(std::fs::metadata(pair.a.data()).unwrap().len(), 16 * M);
    assert!(block_reads(&pair.a.uri(), 15 * 256, 9));

    // Back, the same call goes through.
    pair.b.restart().unwrap();
    assert_eq!(resize(&pair.a, "32M").unwrap()["peer_size"], 32 * M);
    pair.wait_synced(60);
    assert!(pair.files_identical());
}

#[test]
fn a_restart_with_a_larger_size_grows_and_a_smaller_one_keeps_the_stored_size() {
    let d = tempfile::tempdir().unwrap();
    let mut e = start_engine(d.path(), "vol", "16M", &[]);
    qemu_io_ok(&e.uri(), &["write -P 4 16380k 4k", "flush"]);
    e.restart_with(|b| b.size("48M")).unwrap();
    assert_eq!(size_of(&e), 48 * M);
    assert!(block_reads(&e.uri(), 16380 / 4, 4));
    qemu_io_ok(&e.uri(), &["write -P 5 49148k 4k"]);
    e.restart_with(|b| b.size("16M")).unwrap();
    assert_eq!(size_of(&e), 48 * M, "a smaller --size never shrinks");
    assert!(e.log().contains("never shrink"), "{}", e.log_tail(10));
    assert!(block_reads(&e.uri(), 48 * 256 - 1, 5));
}
