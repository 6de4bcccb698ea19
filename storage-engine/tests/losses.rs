//! Exact losses after a forced promotion (issue 12, item 2), over two real engine processes: the
//! returning old primary compares the table it asks back with the new primary's copies, keeps the
//! old content of exactly the blocks that differ in `lost/epoch-<old>-to-<new>/`, reports them,
//! and the new primary's `lost_blocks` becomes that exact count.
//!
//! Both engines run with `--lease-ms 0`: with leases on, the forced takeover first waits out the
//! old primary's promise (10 s plus its guard), which is another test's subject, not this one's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{collections::BTreeSet, path::PathBuf};

use common::*;

/// The engine's block size.
const BLOCK: u64 = 4096;

fn zeros() -> Vec<u8> {
    vec![0u8; BLOCK as usize]
}

fn force_takeover(e: &Engine) -> serde_json::Value {
    e.control("takeover", &["--policy", "force", "--timeout", "1"])
        .unwrap_or_else(|err| panic!("forced takeover failed: {err}\n{}", e.log_tail(20)))
}

fn has_event(e: &Engine, name: &str) -> bool {
    event_names(&status(e)).iter().any(|x| x == name)
}

fn manifest(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

fn listed(m: &serde_json::Value) -> Vec<u64> {
    m["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap())
        .collect()
}

#[test]
fn a_returning_primary_exports_exactly_the_blocks_the_forced_promotion_lacked() {
    let d = tempfile::tempdir().unwrap();
    let mut pair = start_linked(d.path(), "64M", NO_LEASE, NO_LEASE);
    pair.wait_synced(30);
    write_block(&pair.a, 5, &content(5));
    pair.wait_synced(30);
    // Blocks 10 and 11 reach b, but a never hears the acknowledgements: they stay in a's table.
    fault(&pair.a, &["--hold-acks", "true"]);
    write_block(&pair.a, 10, &content(110));
    write_block(&pair.a, 11, &content(111));
    wait_until(30, "b applied blocks 10 and 11", || {
        file_bytes(&pair.b.data(), 10 * BLOCK, BLOCK as usize) == content(110)
            && file_bytes(&pair.b.data(), 11 * BLOCK, BLOCK as usize) == content(111)
    });
    // The link goes quiet; a keeps acknowledging 20..24.
    fault(&pair.a, &["--pause", "true"]);
    for b in 20..24 {
        write_block(&pair.a, b, &content(100 + b));
    }
    assert!(n(&status(&pair.a), "pending_blocks") >= 6);
    pair.a.stop().unwrap();

    let r = force_takeover(&pair.b);
    assert_eq!(n(&r, "epoch"), 2, "{r}");
    // The new primary writes 21 (other bytes), 23 (the very bytes a wrote) and 40.
    write_block(&pair.b, 21, &content(221));
    write_block(&pair.b, 23, &content(123));
    write_block(&pair.b, 40, &content(140));

    pair.a.cont().unwrap();
    fault(&pair.a, &["--pause", "false", "--hold-acks", "false"]);
    pair.wait_converged(1, 60);
    wait_until(30, "the export is complete", || {
        has_event(&pair.a, "LossesExported")
    });

    // The old primary: 20, 21 and 22 were lost (b lacked 20 and 22, wrote other bytes at 21);
    // 10, 11 and 23 were in its table but b had the same bytes.
    let s = status(&pair.a);
    assert_eq!(s["role"], "secondary");
    assert_eq!(n(&s, "exported_lost_blocks"), 3, "{s}");
    let dir = PathBuf::from(s["lost_export"].as_str().unwrap());
    assert_eq!(dir, pair.a.state_dir().join("lost").join("epoch-1-to-2"));
    let m = manifest(&dir);
    assert_eq!(listed(&m), vec![20, 21, 22], "{m}");
    assert_eq!(m["complete"], true);
    assert_eq!(m["volume"], "vol");
    assert_eq!((n(&m, "old_epoch"), n(&m, "new_epoch")), (1, 2));
    assert_eq!(n(&m, "block_size"), BLOCK);
    assert_eq!(n(&m, "bytes"), 3 * BLOCK);
    assert!(n(&m, "created_unix_ms") > 0);
    let img = dir.join("blocks.img");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 64 << 20);
    for b in 20..23 {
        assert_eq!(
            file_bytes(&img, b * BLOCK, BLOCK as usize),
            content(100 + b),
            "block {b} of the export"
        );
    }
    for b in [5, 10, 11, 23, 40] {
        assert_eq!(file_bytes(&img, b * BLOCK, BLOCK as usize), zeros(), "{b}");
    }
    let events = s["events"].as_array().unwrap();
    let line = format!("LossesExported blocks=3 dir={}", dir.display());
    assert!(
        events.iter().any(|e| e.as_str().unwrap().ends_with(&line)),
        "{events:?}"
    );

    // The new primary counts exactly those.
    let sb = status(&pair.b);
    assert_eq!(n(&sb, "lost_blocks"), 3, "{sb}");
    assert!(has_event(&pair.b, "LossExact"));

    // Its content is the volume's, everywhere.
    assert!(pair.files_identical());
    let expect = [
        (5, content(5)),
        (10, content(110)),
        (11, content(111)),
        (20, zeros()),
        (21, content(221)),
        (22, zeros()),
        (23, content(123)),
        (40, content(140)),
    ];
    for (b, want) in expect {
        assert_eq!(read_block(&pair.b, b), want, "block {b}");
    }
    // The export survives a restart of the engine that holds it.
    pair.a.restart().unwrap();
    pair.wait_converged(1, 60);
    let s = status(&pair.a);
    assert_eq!(n(&s, "exported_lost_blocks"), 3);
    assert_eq!(s["lost_export"].as_str().unwrap(), dir.to_str().unwrap());
}

#[test]
fn a_returning_primary_killed_in_the_middle_of_its_export_resumes_and_loses_nothing() {
    let d = tempfile::tempdir().unwrap();
    let mut pair = start_linked(d.path(), "64M", NO_LEASE, NO_LEASE);
    pair.wait_synced(30);
    fault(&pair.a, &["--pause", "true"]);
    let lost: Vec<u64> = (100..164).collect();
    for &b in &lost {
        write_block(&pair.a, b, &content(1000 + b));
    }
    pair.a.stop().unwrap();
    force_takeover(&pair.b);
    for b in 100..132 {
        write_block(&pair.b, b, &content(2000 + b));
    }
    // A slow resync (8 images a second), so the old primary can be killed halfway.
    fault(&pair.b, &["--rate", "32768"]);
    pair.a.cont().unwrap();
    fault(&pair.a, &["--pause", "false"]);
    wait_until(60, "part of the export", || {
        status(&pair.a)["exported_lost_blocks"]
            .as_u64()
            .is_some_and(|x| x >= 8)
    });
    pair.a.kill();
    let dir = pair.a.state_dir().join("lost").join("epoch-1-to-2");
    let img = dir.join("blocks.img");
    let m = manifest(&dir);
    let before = listed(&m);
    assert_eq!(m["complete"], false, "killed after the export ended: {m}");
    assert!(before.len() < lost.len(), "{m}");
    for &b in &before {
        assert_eq!(
            file_bytes(&img, b * BLOCK, BLOCK as usize),
            content(1000 + b)
        );
    }

    fault(&pair.b, &["--rate", "0"]);
    pair.a.restart().unwrap();
    pair.wait_converged(1, 60);
    wait_until(30, "the export is complete", || {
        has_event(&pair.a, "LossesExported")
    });
    let m = manifest(&dir);
    assert_eq!(m["complete"], true);
    assert_eq!(listed(&m), lost, "{m}");
    let kept: BTreeSet<u64> = before.into_iter().collect();
    assert!(kept.iter().all(|b| lost.contains(b)));
    for &b in &lost {
        assert_eq!(
            file_bytes(&img, b * BLOCK, BLOCK as usize),
            content(1000 + b),
            "block {b} of the export"
        );
    }
    assert_eq!(n(&status(&pair.a), "exported_lost_blocks"), 64);
    assert_eq!(n(&status(&pair.b), "lost_blocks"), 64);
    assert!(pair.files_identical());
    for b in [100, 131] {
        assert_eq!(read_block(&pair.b, b), content(2000 + b));
    }
    for b in [132, 163] {
        assert_eq!(read_block(&pair.b, b), zeros());
    }
}
