//! Takeover and failback over two real engine processes: the handoff, proxied reads, the overlay,
//! the drain, the merge, reverse replication, failback, forced promotion, and kills at each phase.
//! Each test is named after the failover.md acceptance tests it shows (AT-06 onwards).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;

/// A raw `Peer` client to an engine, with the pair's token (for calls the CLI does not make).
async fn peer_client(
    grpc: &str,
) -> storage_engine::pb::peer_client::PeerClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        storage_engine::client::TokenInterceptor,
    >,
> {
    let ch = storage_engine::client::channel(grpc, Duration::from_secs(2))
        .await
        .unwrap();
    storage_engine::pb::peer_client::PeerClient::with_interceptor(
        ch,
        storage_engine::client::TokenInterceptor::new(Some(TOKEN)).unwrap(),
    )
}

/// A linked pair, synced, with the primary's link paused and `blocks` written on the primary
/// (pending, not on the secondary).
fn pair_with_backlog(dir: &std::path::Path, blocks: &[(u64, u8)], extra_s: &[&str]) -> Pair {
    let pair = start_linked(dir, "64M", &[], extra_s);
    pair.wait_synced(30);
    fault(&pair.a, &["--pause", "true"]);
    for &(b, v) in blocks {
        put_block(&pair.a.uri(), b, v);
    }
    assert!(status(&pair.a)["pending_blocks"].as_u64().unwrap() >= blocks.len() as u64);
    pair
}

fn overlay_file(e: &Engine) -> std::path::PathBuf {
    e.state_dir().join("overlay")
}

#[test]
fn at06_handoff_before_ready_at21_no_service_before_ready() {
    let d = tempfile::tempdir().unwrap();
    let backlog: Vec<(u64, u8)> = (100..110).map(|b| (b, 0xbb)).chain([(10, 0xaa)]).collect();
    let pair = pair_with_backlog(d.path(), &backlog, &[]);
    let pending = n(&status(&pair.a), "pending_blocks");
    // AT-21: before the handoff, the secondary serves nothing (it never returns stale data).
    assert!(!block_reads(&pair.b.uri(), 10, 0xaa));
    assert!(
        !qemu_io(&pair.b.uri(), &["read 0 4k"]).status.success()
            || String::from_utf8_lossy(&qemu_io(&pair.b.uri(), &["read 0 4k"]).stderr)
                .contains("failed")
    );

    let r = takeover(&pair.b);
    assert_eq!(n(&r, "epoch"), 2);
    assert_eq!(
        n(&r, "peer_pending_blocks"),
        pending,
        "the whole table was handed over"
    );
    let s = status(&pair.b);
    assert_eq!(s["role"], "primary");
    assert_eq!(s["takeover_phase"], "draining");
    assert_eq!(n(&s, "peer_pending_blocks"), pending);
    let p = status(&pair.a);
    assert_eq!(p["role"], "fenced");
    assert_eq!(n(&p, "epoch"), 2);
    // Stored, then ready: the event log orders them, and the table is on disk.
    let names = event_names(&s);
    assert!(event_at(&names, "HandoffStored") < event_at(&names, "ServingReady"));
    assert!(pair.b.state_dir().join("peer_pending").exists());
    assert!(block_reads(&pair.b.uri(), 10, 0xaa));
    assert!(block_reads(&pair.b.uri(), 105, 0xbb));
}

#[test]
fn at07_ready_does_not_wait_for_the_drain() {
    let d = tempfile::tempdir().unwrap();
    let pair = start_linked(d.path(), "64M", &[], &[]);
    pair.wait_synced(30);
    // One block per second: the 10,240-block backlog would take almost three hours to drain.
    fault(&pair.a, &["--rate", "4096"]);
    let src = d.path().join("backlog.bin");
    std::fs::write(&src, pattern(7, 40 << 20)).unwrap();
    run_ok("nbdcopy", &[src.to_str().unwrap(), &pair.a.uri()]);
    let t = Instant::now();
    let r = takeover(&pair.b);
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "takeover took {took:?}, over the 10 s budget"
    );
    assert!(n(&r, "peer_pending_blocks") > 9_900, "{r}");
    assert!(n(&status(&pair.b), "peer_pending_blocks") > 9_900);
    // The workload sees its data at once.
    let out = d.path().join("out.bin");
    run_ok("nbdcopy", &[&pair.b.uri(), out.to_str().unwrap()]);
    assert_eq!(
        std::fs::read(&out).unwrap()[..40 << 20],
        std::fs::read(&src).unwrap()[..]
    );
}

#[test]
fn at08_proxied_read_at09_local_read_at10_overlay_write_at12_mixed_extent() {
    let d = tempfile::tempdir().unwrap();
    let pair = start_linked(d.path(), "64M", &[], &[]);
    put_block(&pair.a.uri(), 20, 0x20);
    put_block(&pair.a.uri(), 31, 0x31);
    pair.wait_synced(30);
    fault(&pair.a, &["--pause", "true"]);
    put_block(&pair.a.uri(), 10, 0xaa);
    put_block(&pair.a.uri(), 32, 0xcc);
    takeover(&pair.b);

    // AT-09: a replicated block is local; no proxied read.
    assert!(block_reads(&pair.b.uri(), 20, 0x20));
    assert_eq!(n(&status(&pair.b), "proxied_reads"), 0);
    // AT-08: a pending block comes from the old primary.
    assert!(block_reads(&pair.b.uri(), 10, 0xaa));
    assert_eq!(n(&status(&pair.b), "proxied_reads"), 1);
    assert_eq!(
        n(&status(&pair.a), "bytes_read"),
        0,
        "served from base_p, not via NBD"
    );

    // AT-10: a write goes to the overlay and is in this side's table before the ack.
    put_block(&pair.b.uri(), 30, 0x5a);
    assert!(file_block_is(&overlay_file(&pair.b), 30, 0x5a));
    assert!(!file_block_is(&pair.b.data(), 30, 0x5a));
    let s = status(&pair.b);
    assert_eq!(n(&s, "overlay_blocks"), 1);
    assert!(n(&s, "pending_blocks") >= 1);
    assert!(block_reads(&pair.b.uri(), 30, 0x5a));
    assert_eq!(n(&status(&pair.b), "proxied_reads"), 1);

    // AT-12: one read over overlay, local and remote blocks: exactly one more proxied block.
    qemu_io_ok(
        &pair.b.uri(),
        &[
            &format!("read -P 0x5a {} 4k", 30 * 4096),
            &format!("read -P 0x31 {} 4k", 31 * 4096),
            &format!("read -P 0xcc {} 4k", 32 * 4096),
        ],
    );
    let before = n(&status(&pair.b), "proxied_reads");
    // The three-block extent as one request, compared byte for byte.
    let got = nbd_read(&pair.b.nbd, 30 * 4096, 3 * 4096).unwrap();
    assert!(got[..4096].iter().all(|b| *b == 0x5a));
    assert!(got[4096..8192].iter().all(|b| *b == 0x31));
    assert!(got[8192..].iter().all(|b| *b == 0xcc));
    // Block 32 was repaired locally by its first proxied read: no new proxied read was needed.
    assert_eq!(n(&status(&pair.b), "proxied_reads"), before);
}

/// Concurrent reads of one pending block share one proxied read (failover.md A19).
#[test]
fn concurrent_reads_of_a_pending_block_are_coalesced() {
    let d = tempfile::tempdir().unwrap();
    let pair = pair_with_backlog(d.path(), &[(10, 0xaa)], &[]);
    takeover(&pair.b);
    let addr = pair.b.nbd.clone();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let (addr, barrier) = (addr.clone(), barrier.clone());
            std::thread::spawn(move || {
                use storage_engine::nbd::client::NbdClient;
                let rt = tokio::runtime::Runtime::new().unwrap();
                rt.block_on(async {
                    let mut c = NbdClient::connect(&addr, "vol").await.unwrap();
                    barrier.wait();
                    c.read(10 * 4096, 4096).await.unwrap()
                })
            })
        })
        .collect();
    for r in readers {
        assert!(r.join().unwrap().iter().all(|b| *b == 0xaa));
    }
    // One fetch from the old primary, whatever the interleaving: joined in flight, or local after
    // the first one's read-repair.
    assert_eq!(n(&status(&pair.b), "proxied_reads"), 1);
}

#[test]
fn at11_overlay_beats_late_replica_at13_drain_complete_at14_merge_before_reverse_at15_at16() {
    let d = tempfile::tempdir().unwrap();
    let pair = pair_with_backlog(d.path(), &[(10, 0xaa), (40, 0xa4), (41, 0xa5)], &[]);
    takeover(&pair.b);
    // Hold the reverse direction so the merge can be observed before any S→P message.
    fault(&pair.b, &["--pause", "true"]);
    put_block(&pair.b.uri(), 10, 0x5a);
    put_block(&pair.b.uri(), 40, 0x54);
    // AT-11: the late replica of block 10 (0xaa) arrives now; the overlay still wins.
    fault(&pair.a, &["--pause", "false"]);
    wait_until(30, "drain and merge", || {
        status(&pair.b)["takeover_phase"] == ""
    });
    assert!(block_reads(&pair.b.uri(), 10, 0x5a));
    assert!(block_reads(&pair.b.uri(), 41, 0xa5), "drained block");
    // AT-13: DrainComplete ended the first processing; the handed-off table is all zero.
    let s = status(&pair.b);
    let names = event_names(&s);
    assert!(event_at(&names, "FirstProcessingComplete") < event_at(&names, "MergeComplete"));
    assert_eq!(n(&s, "peer_pending_blocks"), 0);
    // AT-14: both overlay blocks are in base_s, the table still has them, nothing reached base_p.
    assert!(file_block_is(&pair.b.data(), 10, 0x5a));
    assert!(file_block_is(&pair.b.data(), 40, 0x54));
    assert!(n(&s, "pending_blocks") >= 2);
    assert!(file_block_is(&pair.a.data(), 10, 0xaa));
    assert_eq!(status(&pair.a)["role"], "secondary");
    // AT-15: after the merge, writes go straight to base_s.
    put_block(&pair.b.uri(), 30, 0x77);
    assert!(file_block_is(&pair.b.data(), 30, 0x77));
    assert!(!file_block_is(&overlay_file(&pair.b), 30, 0x77));
    assert_eq!(n(&status(&pair.b), "overlay_blocks"), 0);
    // AT-16: reverse replication converges: base_p = base_s = what the host sees.
    fault(&pair.b, &["--pause", "false"]);
    pair.wait_converged(1, 30);
    assert!(pair.files_identical());
    let view = d.path().join("view.bin");
    run_ok("nbdcopy", &[&pair.b.uri(), view.to_str().unwrap()]);
    assert_eq!(
        std::fs::read(&view).unwrap(),
        std::fs::read(pair.a.data()).unwrap()
    );
    assert!(file_block_is(&pair.a.data(), 30, 0x77));
    let names = event_names(&status(&pair.b));
    assert!(event_at(&names, "MergeComplete") < event_at(&names, "InSync"));
}

#[test]
fn at17_write_racing_the_merge() {
    let d = tempfile::tempdir().unwrap();
    let pair = pair_with_backlog(d.path(), &[(40, 0xa4)], &[]);
    takeover(&pair.b);
    fault(&pair.b, &["--pause-merge", "true"]);
    put_block(&pair.b.uri(), 40, 0x11);
    fault(&pair.a, &["--pause", "false"]);
    wait_until(30, "merging", || {
        status(&pair.b)["takeover_phase"] == "merging"
    });
    // The merge is held with block 40 still in the overlay; the host writes it again.
    put_block(&pair.b.uri(), 40, 0x22);
    fault(&pair.b, &["--pause-merge", "false"]);
    wait_until(30, "merge done", || status(&pair.b)["takeover_phase"] == "");
    assert!(file_block_is(&pair.b.data(), 40, 0x22));
    assert!(block_reads(&pair.b.uri(), 40, 0x22));
    pair.wait_converged(1, 30);
    assert!(file_block_is(&pair.a.data(), 40, 0x22));
}

#[test]
fn at18_primary_unreachable_wait_blocks_force_promotes_and_reports_losses() {
    let d = tempfile::tempdir().unwrap();
    // Leases off: this test is about what a forced promotion reports; its wait for the old
    // primary's lease is `tests/lease.rs` `a_forced_promotion_waits_for_the_old_primarys_lease`.
    let mut pair = start_linked(d.path(), "64M", NO_LEASE, NO_LEASE);
    put_block(&pair.a.uri(), 3, 0x03);
    pair.wait_synced(30);
    // A slow link whose acknowledgements are held: the six writes stay pending on P, and the
    // heartbeats still carry that pending set to S.
    fault(&pair.a, &["--rate", "4096", "--hold-acks", "true"]);
    let writes: Vec<String> = (10..16)
        .map(|b| format!("write -P 238 {} 4k", b * 4096))
        .collect();
    let cmds: Vec<&str> = writes.iter().map(|s| s.as_str()).collect();
    qemu_io_ok(&pair.a.uri(), &cmds);
    wait_until(30, "heartbeat with the pending set", || {
        n(&status(&pair.b), "peer_pending_blocks") == 6
    });
    let shipped = n(&status(&pair.b), "peer_pending_blocks");
    pair.a.kill();

    // WaitForPrimary: no promotion, a clear condition, no host I/O.
    let err = pair.b.control("takeover", &["--timeout", "1"]).unwrap_err();
    assert!(
        err.contains("HandoffBlocked") && err.contains("PeerUnreachable"),
        "{err}"
    );
    let s = status(&pair.b);
    assert_eq!(s["role"], "secondary");
    assert!(s["condition"]
        .as_str()
        .unwrap()
        .starts_with("HandoffBlocked"));
    assert!(!block_reads(&pair.b.uri(), 3, 0x03));

    // ForcePromote: serves, and names what it lost.
    let before: Vec<Vec<u8>> = (10..16)
        .map(|b| file_bytes(&pair.b.data(), b * 4096, 4096))
        .collect();
    let r = pair
        .b
        .control("takeover", &["--policy", "force", "--timeout", "1"])
        .unwrap();
    assert_eq!(n(&r, "lost_blocks"), shipped);
    assert!(n(&r, "lost_seq_to") >= n(&r, "lost_seq_from"));
    let s = status(&pair.b);
    assert_eq!(s["role"], "primary");
    assert_eq!(n(&s, "lost_blocks"), shipped);
    assert!(block_reads(&pair.b.uri(), 3, 0x03));
    // Lost blocks read as base_s had them.
    for (i, b) in (10..16u64).enumerate() {
        let got = nbd_read(&pair.b.nbd, b * 4096, 4096).unwrap();
        assert_eq!(got, before[i]);
    }
    put_block(&pair.b.uri(), 20, 0x20);

    // The old primary returns: it steps down and its unsent writes are overwritten.
    pair.a.restart().unwrap();
    pair.wait_converged(1, 30);
    assert_eq!(status(&pair.a)["role"], "secondary");
    assert!(
        pair.files_identical(),
        "the two sides must not silently differ"
    );
    assert!(event_names(&status(&pair.a)).contains(&"SteppedDown".to_string()));
}

#[test]
fn at19_primary_lost_mid_drain_fails_fast_and_degrades() {
    let d = tempfile::tempdir().unwrap();
    let mut pair = pair_with_backlog(
        d.path(),
        &[(10, 0xaa), (11, 0xab)],
        &["--proxy-timeout-ms", "500"],
    );
    put_block(&pair.a.uri(), 12, 0xac);
    takeover(&pair.b);
    pair.a.kill();
    let t = Instant::now();
    assert!(!block_reads(&pair.b.uri(), 10, 0xaa));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "a proxied read must fail within its deadline, took {:?}",
        t.elapsed()
    );
    // Everything else keeps working.
    put_block(&pair.b.uri(), 50, 0x50);
    assert!(block_reads(&pair.b.uri(), 50, 0x50));
    assert!(block_reads(&pair.b.uri(), 60, 0x00));
    let s = status(&pair.b);
    assert!(n(&s, "proxied_read_errors") >= 1);
    assert!(
        s["condition"].as_str().unwrap().starts_with("Degraded"),
        "{s}"
    );
    // The old primary comes back: the drain resumes and the data is all there.
    pair.a.restart().unwrap();
    let role = status(&pair.a)["role"].clone();
    assert!(role == "fenced" || role == "secondary", "{role}");
    assert!(block_reads(&pair.b.uri(), 11, 0xab));
    pair.wait_converged(1, 30);
    assert!(block_reads(&pair.b.uri(), 10, 0xaa));
    assert!(pair.files_identical());
}

#[test]
fn at20_fencing_cuts_the_old_host_and_refuses_its_writes() {
    use storage_engine::nbd::client::NbdClient;
    let d = tempfile::tempdir().unwrap();
    let pair = pair_with_backlog(d.path(), &[(5, 0x55)], &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut old_host = rt.block_on(NbdClient::connect(&pair.a.nbd, "vol")).unwrap();
    rt.block_on(old_host.write(6 * 4096, &[0x66; 4096]))
        .unwrap();
    let pending = n(&status(&pair.a), "pending_blocks");
    takeover(&pair.b);
    // The old host's session is closed; its next write fails and lands nowhere.
    assert!(rt
        .block_on(old_host.write(7 * 4096, &[0x77; 4096]))
        .is_err());
    assert!(rt.block_on(NbdClient::connect(&pair.a.nbd, "vol")).is_err());
    assert_eq!(n(&status(&pair.a), "pending_blocks"), pending);
    assert!(!file_block_is(&pair.a.data(), 7, 0x77));
    assert!(
        block_reads(&pair.b.uri(), 6, 0x66),
        "acknowledged before the fence"
    );
    assert!(
        block_reads(&pair.b.uri(), 7, 0x00),
        "refused after the fence"
    );
}

#[test]
fn at22_implicit_takeover_by_the_first_io() {
    let d = tempfile::tempdir().unwrap();
    let pair = pair_with_backlog(d.path(), &[(9, 0x99)], &["--implicit-takeover"]);
    // No takeover call: the new host simply connects to the secondary.
    assert!(block_reads(&pair.b.uri(), 9, 0x99));
    let s = status(&pair.b);
    assert_eq!(s["role"], "primary");
    assert_eq!(n(&s, "epoch"), 2);
    assert_eq!(status(&pair.a)["role"], "fenced");
}

#[test]
fn at23_takeover_with_nothing_pending_at13_drain_complete_without_data() {
    let d = tempfile::tempdir().unwrap();
    let pair = start_linked(d.path(), "64M", &[], &[]);
    put_block(&pair.a.uri(), 1, 0x01);
    pair.wait_synced(30);
    let r = takeover(&pair.b);
    assert_eq!(n(&r, "peer_pending_blocks"), 0);
    put_block(&pair.b.uri(), 2, 0x02);
    assert!(file_block_is(&pair.b.data(), 2, 0x02), "straight to base_s");
    assert_eq!(n(&status(&pair.b), "overlay_blocks"), 0);
    assert!(block_reads(&pair.b.uri(), 1, 0x01));
    pair.wait_converged(1, 30);
    let s = status(&pair.b);
    assert_eq!(n(&s, "proxied_reads"), 0);
    assert!(event_names(&s).contains(&"FirstProcessingComplete".to_string()));
    assert!(pair.files_identical());
}

#[test]
fn at24_to_at28_failback_during_the_first_processing() {
    let d = tempfile::tempdir().unwrap();
    let pair = pair_with_backlog(
        d.path(),
        &[(10, 0xa1), (40, 0xa4), (50, 0xa5), (60, 0xa6)],
        &[],
    );
    takeover(&pair.b);
    put_block(&pair.b.uri(), 10, 0xb1);
    put_block(&pair.b.uri(), 40, 0xb4);
    // The workload moves back while P has drained nothing (its link is still paused), and S's
    // drain to P is held too.
    fault(&pair.b, &["--pause", "true"]);
    let r = pair.a.control("failback", &[]).unwrap();
    // AT-24: P fetched S's table (DAT2) before it reported ready.
    assert_eq!(n(&r, "epoch"), 3);
    assert!(n(&r, "peer_pending_blocks") >= 2, "{r}");
    let p = status(&pair.a);
    assert_eq!(p["role"], "primary");
    let names = event_names(&p);
    assert!(event_at(&names, "HandoffStored") < event_at(&names, "ServingReady"));
    assert_eq!(status(&pair.b)["role"], "fenced");
    // AT-25: read order at P: overlay_p, then S for S's blocks, then base_p.
    put_block(&pair.a.uri(), 50, 0xc5);
    assert!(file_block_is(&overlay_file(&pair.a), 50, 0xc5));
    assert!(block_reads(&pair.a.uri(), 50, 0xc5));
    assert!(block_reads(&pair.a.uri(), 10, 0xb1));
    assert!(block_reads(&pair.a.uri(), 60, 0xa6));
    assert!(n(&status(&pair.a), "proxied_reads") >= 1);
    // AT-26: a failback write beats S's late version of the same block.
    put_block(&pair.a.uri(), 40, 0xc4);
    fault(&pair.b, &["--pause", "false"]);
    wait_until(30, "failback drain and merge", || {
        status(&pair.a)["takeover_phase"] == ""
    });
    assert!(block_reads(&pair.a.uri(), 40, 0xc4));
    // AT-28: the merged failback writes are pending towards S (the third processing).
    assert!(n(&status(&pair.a), "pending_blocks") >= 2);
    fault(&pair.a, &["--pause", "false"]);
    pair.wait_converged(0, 30);
    for (b, v) in [(10, 0xb1), (40, 0xc4), (50, 0xc5), (60, 0xa6)] {
        assert!(file_block_is(&pair.a.data(), b, v), "base_p block {b}");
        assert!(file_block_is(&pair.b.data(), b, v), "base_s block {b}");
    }
    assert!(pair.files_identical());
    // AT-27: the order of the processings, as the engines logged them.
    let p = event_names(&status(&pair.a));
    let s = event_names(&status(&pair.b));
    let fenced = s.iter().rposition(|e| e == "Fenced").unwrap();
    assert!(fenced < s.iter().rposition(|e| e == "DrainComplete").unwrap());
    assert!(
        s.iter().rposition(|e| e == "DrainComplete").unwrap()
            < s.iter().rposition(|e| e == "SecondaryAgain").unwrap()
    );
    let ready = p.iter().rposition(|e| e == "ServingReady").unwrap();
    let first = p
        .iter()
        .rposition(|e| e == "FirstProcessingComplete")
        .unwrap();
    let merged = p.iter().rposition(|e| e == "MergeComplete").unwrap();
    let in_sync = p.iter().rposition(|e| e == "InSync").unwrap();
    assert!(ready < first && first < merged && merged < in_sync, "{p:?}");
}

#[test]
fn at29_kills_during_the_drain_keep_table_overlay_and_phase() {
    let d = tempfile::tempdir().unwrap();
    let mut pair = start_linked(d.path(), "64M", &[], &[]);
    pair.wait_synced(30);
    fault(&pair.a, &["--pause", "true"]);
    let src = d.path().join("b.bin");
    std::fs::write(&src, pattern(29, 4 << 20)).unwrap();
    run_ok("nbdcopy", &[src.to_str().unwrap(), &pair.a.uri()]);
    takeover(&pair.b);
    for b in 2000..2010 {
        put_block(&pair.b.uri(), b, 0x29);
    }
    let before = status(&pair.b);
    assert!(n(&before, "peer_pending_blocks") >= 1000);
    // SIGKILL the new primary mid-drain.
    pair.b.restart().unwrap();
    let after = status(&pair.b);
    assert_eq!(after["role"], "primary");
    assert_eq!(after["takeover_phase"], "draining");
    assert_eq!(
        n(&after, "peer_pending_blocks"),
        n(&before, "peer_pending_blocks")
    );
    assert_eq!(n(&after, "overlay_blocks"), 10);
    assert!(block_reads(&pair.b.uri(), 2005, 0x29));
    // SIGKILL the fenced old primary mid-drain; its link comes back unpaused.
    pair.a.restart().unwrap();
    let role = status(&pair.a)["role"].clone();
    assert!(role == "fenced" || role == "secondary", "{role}");
    pair.wait_converged(1, 60);
    let view = d.path().join("view.bin");
    run_ok("nbdcopy", &[&pair.b.uri(), view.to_str().unwrap()]);
    let v = std::fs::read(&view).unwrap();
    let want = std::fs::read(&src).unwrap();
    assert_eq!(v[..want.len()], want[..]);
    assert!(v[2000 * 4096..2010 * 4096].iter().all(|b| *b == 0x29));
    assert!(pair.files_identical());
}

#[test]
fn at29_kills_during_merge_and_reverse_replication_resume() {
    let d = tempfile::tempdir().unwrap();
    let mut pair = pair_with_backlog(d.path(), &[(10, 0xaa), (11, 0xab)], &[]);
    takeover(&pair.b);
    fault(&pair.b, &["--pause-merge", "true"]);
    put_block(&pair.b.uri(), 10, 0x10);
    put_block(&pair.b.uri(), 12, 0x12);
    fault(&pair.a, &["--pause", "false"]);
    wait_until(30, "merging", || {
        status(&pair.b)["takeover_phase"] == "merging"
    });
    // SIGKILL in the merge: it resumes from the persisted overlay bitmap.
    std::thread::sleep(Duration::from_millis(700));
    pair.b.restart().unwrap();
    wait_until(30, "merge done", || status(&pair.b)["takeover_phase"] == "");
    assert!(block_reads(&pair.b.uri(), 10, 0x10));
    assert!(block_reads(&pair.b.uri(), 11, 0xab));
    assert!(block_reads(&pair.b.uri(), 12, 0x12));
    // SIGKILL the new secondary during reverse replication.
    fault(&pair.b, &["--rate", "4096"]);
    put_block(&pair.b.uri(), 13, 0x13);
    pair.a.restart().unwrap();
    fault(&pair.b, &["--rate", "0"]);
    pair.wait_converged(1, 30);
    assert!(pair.files_identical());
    assert!(file_block_is(&pair.a.data(), 10, 0x10));
    assert!(file_block_is(&pair.a.data(), 13, 0x13));
}

#[test]
fn at30_stale_proxied_read_and_at34_idempotent_handoff() {
    use storage_engine::pb;
    let d = tempfile::tempdir().unwrap();
    let pair = pair_with_backlog(d.path(), &[(10, 0xaa)], &[]);
    let r1 = takeover(&pair.b);
    // AT-34: a repeated takeover reuses the epoch and starts nothing twice.
    let r2 = takeover(&pair.b);
    assert_eq!(n(&r2, "epoch"), n(&r1, "epoch"));
    assert_eq!(r2["already_primary"], true);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // A takeover at another epoch, asked of the primary, is refused: not a repeat.
        let ch = storage_engine::client::channel(&pair.b.grpc, Duration::from_secs(2))
            .await
            .unwrap();
        let mut e = storage_engine::pb::engine_client::EngineClient::with_interceptor(
            ch,
            storage_engine::client::TokenInterceptor::new(Some(TOKEN)).unwrap(),
        );
        let refused = e
            .takeover(pb::TakeoverRequest {
                volume: "vol".into(),
                new_epoch: n(&r1, "epoch") + 3,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(refused.message().contains("already primary"), "{refused:?}");
        let mut c = peer_client(&pair.a.grpc).await;
        // A repeated handoff at the same epoch returns the stored table again.
        let h = c
            .fence_and_handoff(pb::FenceRequest {
                volume: "vol".into(),
                new_epoch: 2,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(h.epoch, 2);
        assert!(h.pending_blocks >= 1);
        // An older epoch is refused.
        let e = c
            .fence_and_handoff(pb::FenceRequest {
                volume: "vol".into(),
                new_epoch: 1,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        // AT-30: a proxied read at a stale epoch is refused.
        let e = c
            .read_blocks(pb::ReadBlocksRequest {
                volume: "vol".into(),
                epoch: 1,
                blocks: vec![10],
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        let ok = c
            .read_blocks(pb::ReadBlocksRequest {
                volume: "vol".into(),
                epoch: 2,
                blocks: vec![10],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ok.epoch, 2);
        assert!(ok.data[0].iter().all(|b| *b == 0xaa));
    });
    assert_eq!(status(&pair.a)["role"], "fenced");
}

mod model {
    //! Model test: random writes, flushes, reads, takeovers in either direction at any phase
    //! (including before the previous one converged), paused links and SIGKILLs of either engine;
    //! every read through the serving engine and both data files at the end equal the model.
    use super::*;
    use proptest::prelude::*;

    const B: u64 = 4096;
    const BLOCKS: u64 = 1024;

    #[derive(Debug, Clone)]
    enum Op {
        Write { block: u64, blocks: u64, byte: u8 },
        Read { block: u64, blocks: u64 },
        Flush,
        Switch,
        PauseLink(bool),
        KillServing,
        KillOther,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u64..BLOCKS, 1u64..32, 1u8..255)
                .prop_map(|(block, blocks, byte)| Op::Write { block, blocks, byte }),
            3 => (0u64..BLOCKS, 1u64..64).prop_map(|(block, blocks)| Op::Read { block, blocks }),
            1 => Just(Op::Flush),
            3 => Just(Op::Switch),
            2 => any::<bool>().prop_map(Op::PauseLink),
            1 => Just(Op::KillServing),
            1 => Just(Op::KillOther),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: common::model_cases(8), failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn model_takeovers_failbacks_kills_and_paused_links(ops in proptest::collection::vec(op(), 6..16)) {
            run(ops)?;
        }
    }

    /// Found by the model test: a takeover by an engine whose own drain finished at the same
    /// moment (it turned secondary under the promotion and nobody served).
    #[test]
    fn model_regression_back_to_back_switches() {
        let w = |block, blocks, byte| Op::Write {
            block,
            blocks,
            byte,
        };
        let r = |block, blocks| Op::Read { block, blocks };
        let ops = vec![
            r(83, 56),
            Op::Switch,
            r(992, 52),
            r(704, 44),
            w(693, 28, 197),
            w(868, 26, 179),
            Op::Switch,
            w(46, 23, 42),
            Op::Switch,
            Op::Switch,
        ];
        for _ in 0..3 {
            run(ops.clone()).unwrap();
        }
        let ops = vec![
            Op::KillOther,
            w(304, 28, 250),
            r(330, 45),
            Op::Switch,
            w(128, 27, 124),
            w(586, 20, 231),
            w(761, 5, 36),
        ];
        for _ in 0..5 {
            run(ops.clone()).unwrap();
        }
    }

    fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
        {
            let d = tempfile::tempdir().unwrap();
            let mut pair = start_linked(d.path(), "4M", &["--journal-size", "256K"], &[]);
            pair.wait_synced(30);
            let mut model = vec![0u8; (BLOCKS * B) as usize];
            let mut serving = 0usize;
            for o in ops {
                let uri = pair[serving].uri();
                match o {
                    Op::Write {
                        block,
                        blocks,
                        byte,
                    } => {
                        let blocks = blocks.min(BLOCKS - block);
                        let out = qemu_io(
                            &uri,
                            &[&format!("write -P {byte} {} {}", block * B, blocks * B)],
                        );
                        let text = String::from_utf8_lossy(&out.stdout).into_owned()
                            + &String::from_utf8_lossy(&out.stderr);
                        prop_assert!(
                            out.status.success() && !text.contains("failed"),
                            "write failed: {}\nfirst engine:\n{}\nsecond engine:\n{}",
                            text,
                            pair.a.log(),
                            pair.b.log()
                        );
                        model[(block * B) as usize..((block + blocks) * B) as usize].fill(byte);
                    }
                    Op::Read { block, blocks } => {
                        let blocks = blocks.min(BLOCKS - block);
                        let got =
                            nbd_read(&pair[serving].nbd, block * B, (blocks * B) as u32).unwrap();
                        prop_assert!(
                            got[..] == model[(block * B) as usize..((block + blocks) * B) as usize],
                            "read of blocks {}..{} differs from the model",
                            block,
                            block + blocks
                        );
                    }
                    Op::Flush => {
                        qemu_io_ok(&uri, &["flush"]);
                    }
                    Op::Switch => {
                        let other = 1 - serving;
                        let r = pair[other].control("takeover", &[]);
                        prop_assert!(r.is_ok(), "takeover failed: {:?}", r);
                        serving = other;
                    }
                    Op::PauseLink(p) => {
                        // The link out of the engine that is not serving: the drain of a fenced one.
                        fault(
                            &pair[1 - serving],
                            &["--pause", if p { "true" } else { "false" }],
                        );
                    }
                    Op::KillServing => pair[serving].restart().unwrap(),
                    Op::KillOther => pair[1 - serving].restart().unwrap(),
                }
            }
            fault(&pair[0], &["--pause", "false"]);
            fault(&pair[1], &["--pause", "false"]);
            pair.wait_converged(serving, 20);
            let view = nbd_read(&pair[serving].nbd, 0, (BLOCKS * B) as u32).unwrap();
            prop_assert!(
                view == model,
                "the serving engine's view differs from the model"
            );
            prop_assert!(
                std::fs::read(pair.a.data()).unwrap() == model,
                "first engine's data file differs"
            );
            prop_assert!(
                std::fs::read(pair.b.data()).unwrap() == model,
                "second engine's data file differs"
            );
        }
        Ok(())
    }
}

/// An attachment pinned to an epoch (`vol@<epoch>`) never reaches a later epoch, even on the same
/// engine after a failback: a stale mount stays fenced.
#[test]
fn export_pinned_to_an_epoch_is_refused_after_a_takeover_and_failback() {
    use storage_engine::nbd::client::NbdClient;
    let d = tempfile::tempdir().unwrap();
    let pair = pair_with_backlog(d.path(), &[(1, 0x11)], &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let open = |addr: &str, name: &str| rt.block_on(NbdClient::connect(addr, name)).is_ok();
    assert!(open(&pair.a.nbd, "vol@1"));
    assert!(!open(&pair.a.nbd, "vol@2"));
    takeover(&pair.b);
    assert!(open(&pair.b.nbd, "vol@2"));
    fault(&pair.a, &["--pause", "false"]);
    pair.wait_converged(1, 30);
    pair.a.control("failback", &[]).unwrap();
    // The old primary serves again, at epoch 3: its epoch-1 attachment must not come back.
    assert!(!open(&pair.a.nbd, "vol@1"));
    assert!(open(&pair.a.nbd, "vol@3"));
    assert!(open(&pair.a.nbd, "vol"));
    assert!(!open(&pair.a.nbd, "other@3"));
}

/// AT-34 / kill during the handoff: the new primary dies after the old one was fenced but before
/// it stored the table; the repeated takeover reuses the epoch and gets the stored table again.
#[test]
fn at34_takeover_resumes_after_the_new_primary_died_mid_handoff() {
    use storage_engine::pb;
    let d = tempfile::tempdir().unwrap();
    let mut pair = pair_with_backlog(d.path(), &[(10, 0xaa), (11, 0xab)], &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // What the secondary's first attempt did before it was killed: the fence and handoff.
    let first = rt.block_on(async {
        let mut c = peer_client(&pair.a.grpc).await;
        c.fence_and_handoff(pb::FenceRequest {
            volume: "vol".into(),
            new_epoch: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
    });
    pair.b.restart().unwrap();
    assert_eq!(status(&pair.b)["role"], "secondary");
    assert_eq!(status(&pair.a)["role"], "fenced");
    let r = takeover(&pair.b);
    assert_eq!(n(&r, "epoch"), 2, "the same epoch is reused");
    assert_eq!(n(&r, "peer_pending_blocks"), first.pending_blocks);
    assert!(block_reads(&pair.b.uri(), 10, 0xaa));
    assert!(block_reads(&pair.b.uri(), 11, 0xab));
    fault(&pair.a, &["--pause", "false"]);
    pair.wait_converged(1, 30);
    assert!(pair.files_identical());
}

/// "Force" means the peer cannot be reached, never that it said no: a live old primary that
/// refuses the handoff (here it was already fenced at a newer epoch by another takeover) must not
/// be answered with a forced promotion.
#[test]
fn force_never_promotes_over_a_peer_that_refuses() {
    let d = tempfile::tempdir().unwrap();
    let pair = start_linked(d.path(), "64M", &[], &[]);
    put_block(&pair.a.uri(), 3, 0x03);
    pair.wait_synced(30);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = peer_client(&pair.a.grpc).await;
        c.fence_and_handoff(storage_engine::pb::FenceRequest {
            volume: "vol".into(),
            new_epoch: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    });
    let err = pair
        .b
        .control("takeover", &["--policy", "force", "--timeout", "2"])
        .unwrap_err();
    assert!(err.contains("HandoffRefused"), "{err}");
    let s = status(&pair.b);
    assert_eq!(s["role"], "secondary", "{s}");
    assert_eq!(n(&s, "lost_blocks"), 0);
    assert!(event_names(&s).contains(&"HandoffRefused".to_string()));
}

/// A replica whose resync was cut short holds a mix of old and new blocks: a forced promotion of
/// it is refused unless the caller passes --allow-inconsistent, and then it reports its losses.
#[test]
fn force_refuses_an_inconsistent_replica_unless_allowed() {
    let d = tempfile::tempdir().unwrap();
    // Leases off: this test is about what a forced promotion reports; its wait for the old
    // primary's lease is `tests/lease.rs` `a_forced_promotion_waits_for_the_old_primarys_lease`.
    let mut pair = start_linked(d.path(), "64M", NO_LEASE, NO_LEASE);
    pair.wait_synced(30);
    fault(&pair.a, &["--pause", "true"]);
    for b in 0..64 {
        put_block(&pair.a.uri(), b, 0x5a);
    }
    // A restarted primary has no journal: it resyncs from its table, slowly, so the kill below
    // lands in the middle of it.
    pair.a
        .restart_with(|c| c.args(["--replication-rate", "8k"]))
        .unwrap();
    wait_until(30, "the secondary marked inconsistent", || {
        status(&pair.b)["pair_state"] == "Inconsistent"
    });
    pair.a.kill();
    let err = pair
        .b
        .control("takeover", &["--policy", "force", "--timeout", "1"])
        .unwrap_err();
    assert!(err.contains("Inconsistent"), "{err}");
    assert_eq!(status(&pair.b)["role"], "secondary");
    let r = pair
        .b
        .control(
            "takeover",
            &[
                "--policy",
                "force",
                "--timeout",
                "1",
                "--allow-inconsistent",
            ],
        )
        .unwrap();
    assert_eq!(r["epoch"], 2, "{r}");
    let s = status(&pair.b);
    assert_eq!(s["role"], "primary");
    assert!(event_names(&s).contains(&"ForcePromoted".to_string()));
}

/// The old primary dies for good in the middle of its drain: reads of its blocks fail until the
/// operator gives them up with a forced takeover on the serving engine, which names them as lost,
/// lets the merge finish, and later overwrites the returning old primary with its own copy.
#[test]
fn a_drain_whose_old_primary_is_gone_can_be_abandoned() {
    let d = tempfile::tempdir().unwrap();
    let mut pair = pair_with_backlog(
        d.path(),
        &[(10, 0xaa), (11, 0xab)],
        &["--proxy-timeout-ms", "300"],
    );
    takeover(&pair.b);
    put_block(&pair.b.uri(), 20, 0x20);
    pair.a.kill();
    assert!(!block_reads(&pair.b.uri(), 10, 0xaa));
    let r = pair
        .b
        .control("takeover", &["--policy", "force", "--timeout", "1"]);
    let r = r.unwrap();
    assert_eq!(n(&r, "lost_blocks"), 2, "{r}");
    let s = status(&pair.b);
    assert_eq!(n(&s, "lost_blocks"), 2);
    assert!(event_names(&s).contains(&"DrainAbandoned".to_string()));
    wait_until(30, "the merge after the abandoned drain", || {
        status(&pair.b)["takeover_phase"] == ""
    });
    // The lost blocks read as this engine had them; the rest is intact.
    assert!(block_reads(&pair.b.uri(), 10, 0x00));
    assert!(block_reads(&pair.b.uri(), 20, 0x20));
    // The old primary returns: it ends its drain, turns secondary and is overwritten.
    pair.a.restart().unwrap();
    pair.wait_converged(1, 30);
    assert!(
        pair.files_identical(),
        "the two sides must not silently differ"
    );
}

/// A forced takeover on a draining engine whose old primary still answers changes nothing.
#[test]
fn a_drain_is_not_abandoned_while_the_old_primary_answers() {
    let d = tempfile::tempdir().unwrap();
    // The old primary's link is paused: it answers, but its drain does not move.
    let pair = pair_with_backlog(d.path(), &[(10, 0xaa)], &[]);
    takeover(&pair.b);
    let err = pair
        .b
        .control("takeover", &["--policy", "force", "--timeout", "1"])
        .unwrap_err();
    assert!(err.contains("DrainNotAbandoned"), "{err}");
    assert_eq!(status(&pair.b)["takeover_phase"], "draining");
    fault(&pair.a, &["--pause", "false"]);
    pair.wait_converged(1, 30);
    assert!(block_reads(&pair.b.uri(), 10, 0xaa));
}

/// Writes the old primary acknowledged after its last heartbeat are unknown to a forced promotion;
/// when that primary returns and steps down, its unsent table is overwritten and counted, so the
/// loss is never silent.
#[test]
fn a_forced_promotion_counts_what_the_returning_primary_had_unsent() {
    let d = tempfile::tempdir().unwrap();
    // Leases off: this test is about what a forced promotion reports; its wait for the old
    // primary's lease is `tests/lease.rs` `a_forced_promotion_waits_for_the_old_primarys_lease`.
    let mut pair = start_linked(d.path(), "64M", NO_LEASE, NO_LEASE);
    pair.wait_synced(30);
    // The link goes quiet (no records, no heartbeats) and the primary keeps acknowledging.
    fault(&pair.a, &["--pause", "true"]);
    for b in 30..35 {
        put_block(&pair.a.uri(), b, 0x66);
    }
    pair.a.kill();
    let r = pair
        .b
        .control("takeover", &["--policy", "force", "--timeout", "1"])
        .unwrap();
    let reported = n(&r, "lost_blocks");
    pair.a.restart().unwrap();
    pair.wait_converged(1, 30);
    let s = status(&pair.b);
    assert!(
        n(&s, "lost_blocks") >= 5,
        "five acknowledged writes were lost, {reported} reported at the promotion, {} now: {s}",
        n(&s, "lost_blocks")
    );
    // Counted from the returned table (LossCounted) or, if the old primary's exact count came
    // first, from that (LossExact).
    let names = event_names(&s);
    assert!(
        names.contains(&"LossCounted".to_string())
            || names.contains(&"LossExact".to_string())
            || reported >= 5,
        "{s}"
    );
    assert!(pair.files_identical());
    // Once the old primary has compared them, the count is exact.
    wait_until(30, "the exact count", || {
        event_names(&status(&pair.b)).contains(&"LossExact".to_string())
    });
    assert_eq!(n(&status(&pair.b), "lost_blocks"), 5);
}

/// The CLI a person reads and the one a program reads: `status`, `takeover` and `failback` print a
/// few lines by default and JSON with `--json`; a refused `--json` takeover names the engine's
/// reason on stderr, which the campaign and the tests match on.
#[test]
fn the_cli_speaks_human_by_default_and_json_when_asked() {
    let d = tempfile::tempdir().unwrap();
    let mut pair = start_linked(d.path(), "16M", NO_LEASE, NO_LEASE);
    pair.wait_synced(30);
    put_block(&pair.a.uri(), 1, 0x5a);
    let text = |out: std::process::Output| {
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };

    let human = text(pair.a.cli("status").output().unwrap());
    assert!(human.starts_with("vol: primary at epoch 1, "), "{human}");
    assert!(
        human.contains("\n  takeover areas: 0 blocks owed by the old primary, 0 in the overlay\n"),
        "{human}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&text(pair.a.cli("status").arg("--json").output().unwrap())).unwrap();
    assert_eq!(
        (json["role"].as_str(), json["epoch"].as_u64()),
        (Some("primary"), Some(1))
    );
    // `status --rtt N`: the round trip to the engine over N calls (bench/takeover.sh compares
    // proxied reads with it).
    let rtt: serde_json::Value = serde_json::from_str(&text(
        pair.a.cli("status").args(["--rtt", "20"]).output().unwrap(),
    ))
    .unwrap();
    let (p50, p99) = (
        rtt["p50_us"].as_f64().unwrap(),
        rtt["p99_us"].as_f64().unwrap(),
    );
    assert!(rtt["calls"] == 20 && p50 > 0.0 && p50 <= p99, "{rtt}");
    assert!(!pair
        .a
        .cli("status")
        .args(["--rtt", "0"])
        .output()
        .unwrap()
        .status
        .success());

    let human = text(pair.b.cli("takeover").output().unwrap());
    assert!(
        human.starts_with("vol: serves as primary at epoch 2, ready in "),
        "{human}"
    );
    assert!(
        block_reads(&pair.b.uri(), 1, 0x5a),
        "the acknowledged write is served"
    );
    // Its status ends with its latest events (at most report::STATUS_EVENTS), each at a readable time.
    let human = text(pair.b.cli("status").output().unwrap());
    let events: Vec<&str> = human
        .lines()
        .skip_while(|l| !l.starts_with("  events"))
        .skip(1)
        .collect();
    assert!((1..=5).contains(&events.len()), "{human}");
    for line in events {
        // `2026-12-07T04:34:36.19Z TakeoverRequested ...`: RFC 3339 in UTC, not raw milliseconds.
        let at = line.trim_start().split(' ').next().unwrap_or_default();
        let b = at.as_bytes();
        assert!(
            b.len() >= 20 && b[4] == b'-' && b[10] == b'T' && at.ends_with('Z'),
            "{line:?} in {human}"
        );
    }
    let json = pair.a.control("failback", &[]).unwrap();
    assert_eq!(
        (n(&json, "epoch"), json["already_primary"].as_bool()),
        (3, Some(false))
    );

    // The primary is gone: a wait takeover is refused, and says why in a form programs match on.
    pair.a.kill();
    let out = pair
        .b
        .cli("takeover")
        .args(["--timeout", "1", "--json"])
        .output()
        .unwrap();
    assert!(!out.status.success() && out.stdout.is_empty(), "{out:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    let refusal: serde_json::Value = serde_json::from_str(err.trim()).unwrap();
    assert_eq!(refusal["reason"], "HandoffBlocked", "{err}");
    assert_eq!(
        tandem_testkit::refusal_reason(&err),
        Some(tandem_api::Reason::HandoffBlocked)
    );
    // Fenced by the failback (or secondary once it caught up): never primary.
    assert_ne!(status(&pair.b)["role"], "primary", "nothing promoted");
}
