//! Two real engine processes: ordered replication, the differential table, resync, tokens,
//! and kills at chosen points. Acceptance tests are named after failover.md's AT numbers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use proptest::prelude::*;

const B: u64 = 4096;

#[test]
fn pair_syncs_to_identical_files_and_secondary_refuses_host_io() {
    let d = tempfile::tempdir().unwrap();
    let pair = start_pair(d.path(), "64M", &[], &[]);
    let src = d.path().join("src.bin");
    std::fs::write(&src, pattern(3, 24 << 20)).unwrap();
    run_ok(
        "nbdcopy",
        &["--flush", src.to_str().unwrap(), &pair.a.uri()],
    );
    qemu_io_ok(
        &pair.a.uri(),
        &["write -z 1M 64k", "discard 3M 8k", "write -P 9 63M 512"],
    );
    pair.wait_synced(30);
    assert!(pair.files_identical(), "data files differ after sync");
    let st = status(&pair.a);
    assert_eq!(st["peer_connected"], true);
    assert!(st["bytes_replicated"].as_u64().unwrap() >= 24 << 20);
    assert_eq!(status(&pair.b)["role"], "secondary");
    // The secondary serves no host I/O; the refusal names its role.
    let out = run("nbdinfo", &[&pair.b.uri()]);
    assert!(!out.status.success());
    let q = qemu_io(&pair.b.uri(), &["write -P 1 0 4k"]);
    assert!(!q.status.success() || String::from_utf8_lossy(&q.stderr).contains("failed"));
}

#[test]
fn wrong_or_missing_token_is_refused_and_changes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let pair = start_pair(d.path(), "16M", &[], &[]);
    let bad = d.path().join("bad");
    std::fs::write(&bad, "wrong").unwrap();
    for extra in [vec!["--token-file", bad.to_str().unwrap()], vec![]] {
        let out = pair
            .a
            .command()
            .args([
                "status",
                "--grpc",
                &pair.a.grpc,
                "--volume",
                "vol",
                "--json",
            ])
            .args(&extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("token"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = pair
            .a
            .command()
            .args(["fault", "--grpc", &pair.a.grpc, "--volume", "vol"])
            .args(["--pause", "true"])
            .args(&extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
    }
    assert_eq!(status(&pair.a)["pair_state"], "Synced");
    // Fault injection needs the flag: the secondary was started without it.
    let err = pair.b.control("fault", &["--pause", "true"]).unwrap_err();
    assert!(err.contains("fault injection is off"), "{err}");
}

/// AT-01 (async ack without the peer) and AT-03 (drain clears bits, then the loop goes idle).
#[test]
fn at01_at03_async_ack_then_drain() {
    let d = tempfile::tempdir().unwrap();
    let pair = start_pair(d.path(), "16M", &[], &[]);
    pair.wait_synced(20);
    fault(&pair.a, &["--pause", "true"]);
    qemu_io_ok(&pair.a.uri(), &["write -P 0x58 40960 4096"]);
    let st = status(&pair.a);
    assert!(st["pending_blocks"].as_u64().unwrap() >= 1);
    assert_eq!(st["pair_state"], "Replicating");
    assert!(
        file_block_is(&pair.b.data(), 10, 0),
        "the paused link must not deliver"
    );
    fault(&pair.a, &["--pause", "false"]);
    pair.wait_synced(20);
    assert!(file_block_is(&pair.b.data(), 10, 0x58));
    let seq = status(&pair.b)["applied_seq"].clone();
    std::thread::sleep(std::time::Duration::from_millis(800));
    assert_eq!(
        status(&pair.b)["applied_seq"],
        seq,
        "copy loop must be idle"
    );
    assert_eq!(status(&pair.a)["pending_blocks"], 0);
}

/// AT-04: an acknowledgement of an older version never clears a block written again meanwhile.
#[test]
fn at04_no_lost_update_on_redirty_during_flight() {
    let d = tempfile::tempdir().unwrap();
    let pair = start_pair(d.path(), "16M", &[], &[]);
    pair.wait_synced(20);
    fault(&pair.a, &["--hold-acks", "true"]);
    qemu_io_ok(&pair.a.uri(), &["write -P 0x58 40960 4096"]);
    wait_until(20, "X applied on the secondary", || {
        file_block_is(&pair.b.data(), 10, 0x58)
    });
    fault(&pair.a, &["--pause", "true"]);
    qemu_io_ok(&pair.a.uri(), &["write -P 0x59 40960 4096"]);
    fault(&pair.a, &["--hold-acks", "false"]);
    wait_until(20, "ack of X processed", || {
        status(&pair.a)["applied_seq"].as_u64().unwrap() >= 1
    });
    assert_eq!(
        status(&pair.a)["pending_blocks"],
        1,
        "block 10 must stay pending for Y"
    );
    fault(&pair.a, &["--pause", "false"]);
    pair.wait_synced(20);
    assert!(file_block_is(&pair.b.data(), 10, 0x59));
}

/// AT-05: while the journal holds, the replica is always a prefix of the write history.
#[test]
fn at05_replica_is_always_a_prefix() {
    let d = tempfile::tempdir().unwrap();
    let pair = start_pair(d.path(), "16M", &[], &[]);
    pair.wait_synced(20);
    fault(&pair.a, &["--pause", "true"]);
    // 12 writes over 3 blocks, each a distinct byte; each waits for the previous ack.
    let writes: Vec<(u64, u8)> = (0..12u8)
        .map(|i| (5 + u64::from(i % 3) * 7 % 4, 0x20 + i))
        .collect();
    for (blk, v) in &writes {
        qemu_io_ok(&pair.a.uri(), &[&format!("write -P {v} {} 4096", blk * B)]);
    }
    let blocks: Vec<u64> = {
        let mut b: Vec<u64> = writes.iter().map(|w| w.0).collect();
        b.sort_unstable();
        b.dedup();
        b
    };
    let prefixes: Vec<Vec<u8>> = (0..=writes.len())
        .map(|k| {
            blocks
                .iter()
                .map(|blk| {
                    writes[..k]
                        .iter()
                        .rev()
                        .find(|w| w.0 == *blk)
                        .map_or(0, |w| w.1)
                })
                .collect()
        })
        .collect();
    // About two records a second, so many intermediate states are observed.
    fault(&pair.a, &["--rate", "9000", "--pause", "false"]);
    let mut last_k = 0;
    let mut seen = std::collections::BTreeSet::new();
    wait_until(30, "all writes replicated", || {
        let state: Vec<u8> = blocks
            .iter()
            .map(|b| file_bytes(&pair.b.data(), b * B, 1)[0])
            .collect();
        let k = prefixes
            .iter()
            .position(|p| *p == state)
            .unwrap_or_else(|| panic!("replica state {state:?} is not a prefix of the history"));
        assert!(
            k >= last_k || prefixes[k] == prefixes[last_k],
            "replica went backwards"
        );
        last_k = last_k.max(k);
        seen.insert(k);
        k == writes.len()
    });
    assert!(
        seen.len() >= 3,
        "observed too few intermediate states: {seen:?}"
    );
}

/// A killed secondary misses writes; on restart only the dirty bytes move.
#[test]
fn secondary_sigkill_then_resync_moves_only_dirty_bytes() {
    let d = tempfile::tempdir().unwrap();
    let mut pair = start_pair(d.path(), "64M", &[], &[]);
    let src = d.path().join("src.bin");
    std::fs::write(&src, pattern(5, 32 << 20)).unwrap();
    run_ok("nbdcopy", &[src.to_str().unwrap(), &pair.a.uri()]);
    pair.wait_synced(30);
    pair.b.kill();
    write_scattered(&pair.a, 256, 61);
    assert!(status(&pair.a)["pending_blocks"].as_u64().unwrap() >= 256);
    let before = status(&pair.a);
    let moved_before =
        before["bytes_replicated"].as_u64().unwrap() + before["bytes_resynced"].as_u64().unwrap();
    pair.b.restart().unwrap();
    pair.wait_synced(30);
    assert!(pair.files_identical());
    let after = status(&pair.a);
    let moved = after["bytes_replicated"].as_u64().unwrap()
        + after["bytes_resynced"].as_u64().unwrap()
        - moved_before;
    assert!(
        moved <= 2 * 256 * B,
        "resync moved {moved} bytes for 1 MiB dirty"
    );
    assert!(moved >= 256 * B);
}

/// `n` 4 KiB writes through `e`, one every `stride` blocks, each with its own fill byte.
fn write_scattered(e: &Engine, n: u64, stride: u64) {
    let cmds: Vec<String> = (0..n)
        .map(|i| format!("write -P {} {} 4096", i % 200 + 1, i * stride * B))
        .collect();
    let refs: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    qemu_io_ok(&e.uri(), &refs);
}

/// `fault --rate R --rate-records-only true` holds back journal records only: a table resync's
/// images go at full speed (tandem-campaign's throttle event relies on it to overflow the journal
/// mid-stream while resyncs stay quick). At 4 KiB/s for everything, the 1 MiB resync here would
/// take over four minutes.
#[test]
fn a_records_only_rate_leaves_a_resync_at_full_speed() {
    let d = tempfile::tempdir().unwrap();
    // A 512 KiB journal: the 1 MiB written while the secondary is down comes back from the table,
    // the 192 KiB written later streams as records.
    let mut pair = start_pair(d.path(), "64M", &["--journal-size", "512K"], &[]);
    pair.wait_synced(30);
    pair.b.kill();
    write_scattered(&pair.a, 256, 61);
    fault(&pair.a, &["--rate", "4K", "--rate-records-only", "true"]);
    pair.b.restart().unwrap();
    pair.wait_synced(30);
    assert!(pair.files_identical());
    // Records are still held to the rate: the first message goes at once and books the link
    // for its 16 s, so the writes behind it are still pending a second later.
    for (i, at) in ["0", "1M", "2M"].iter().enumerate() {
        qemu_io_ok(&pair.a.uri(), &[&format!("write -P {} {at} 64K", i + 7)]);
    }
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert!(status(&pair.a)["pending_blocks"].as_u64().unwrap() > 0);
    fault(&pair.a, &["--rate", "0", "--rate-records-only", "false"]);
    pair.wait_synced(30);
    assert!(pair.files_identical());
}

/// A secondary that comes back announces itself (Peer.Announce) and its primary reconnects at
/// once. The primary's backoff here is a minute, so without the announcement the pair could not
/// be in sync within the 20 s the test waits.
#[test]
fn a_restarted_secondary_is_reconnected_at_once_not_after_the_backoff() {
    let d = tempfile::tempdir().unwrap();
    let slow = ["--reconnect-min-ms", "60000", "--reconnect-max-ms", "60000"];
    let mut pair = start_linked(d.path(), "64M", &slow, &[]);
    pair.wait_synced(30);
    let downs = |e: &Engine| e.log().matches("replication link down").count();
    let before = downs(&pair.a);
    pair.b.kill();
    write_scattered(&pair.a, 64, 37);
    // The primary has seen its link fail and waits out its backoff.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while downs(&pair.a) == before {
        assert!(
            std::time::Instant::now() < deadline,
            "the primary never noticed the secondary's death:\n{}",
            pair.a.log_tail(20)
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    pair.b.restart().unwrap();
    pair.wait_synced(20);
    assert!(pair.files_identical());
    assert!(
        pair.b.log().contains("announced to the primary"),
        "{}",
        pair.b.log_tail(20)
    );
}

/// A primary killed mid-stream converges after restart, and loses no acknowledged write.
#[test]
fn primary_sigkill_mid_stream_converges() {
    let d = tempfile::tempdir().unwrap();
    let mut pair = start_pair(d.path(), "32M", &[], &[]);
    pair.wait_synced(20);
    fault(&pair.a, &["--rate", "2M"]);
    let src = d.path().join("src.bin");
    std::fs::write(&src, pattern(11, 16 << 20)).unwrap();
    run_ok("nbdcopy", &[src.to_str().unwrap(), &pair.a.uri()]);
    assert!(
        status(&pair.a)["pending_blocks"].as_u64().unwrap() > 0,
        "link should be behind"
    );
    pair.a.kill();
    pair.a.restart().unwrap();
    pair.wait_synced(60);
    assert!(pair.files_identical());
    let back = d.path().join("back.bin");
    run_ok("nbdcopy", &[&pair.a.uri(), back.to_str().unwrap()]);
    assert!(std::fs::read(&back).unwrap()[..16 << 20] == std::fs::read(&src).unwrap()[..]);
}

/// Journal overflow: replication falls back to the table, reports Resyncing, then converges.
#[test]
fn journal_overflow_falls_back_to_table_resync() {
    let d = tempfile::tempdir().unwrap();
    let pair = start_pair(d.path(), "32M", &["--journal-size", "1M"], &[]);
    pair.wait_synced(20);
    fault(&pair.a, &["--pause", "true"]);
    let src = d.path().join("src.bin");
    std::fs::write(&src, pattern(13, 8 << 20)).unwrap();
    run_ok("nbdcopy", &[src.to_str().unwrap(), &pair.a.uri()]);
    assert!(status(&pair.a)["journal_bytes"].as_u64().unwrap() <= 1 << 20);
    fault(&pair.a, &["--pause", "false"]);
    pair.wait_synced(30);
    assert!(pair.files_identical());
    assert!(status(&pair.a)["bytes_resynced"].as_u64().unwrap() >= 1 << 20);
}

/// Sync mode: the host's ack means the secondary has the bytes durably.
#[test]
fn sync_mode_acknowledges_after_the_secondary() {
    let d = tempfile::tempdir().unwrap();
    let pair = start_pair(d.path(), "16M", &["--replication", "sync"], &[]);
    pair.wait_synced(20);
    for i in 0..20u64 {
        qemu_io_ok(
            &pair.a.uri(),
            &[&format!("write -P {} {} 4096", i + 1, i * 3 * B)],
        );
        assert!(
            file_block_is(&pair.b.data(), i * 3, (i + 1) as u8),
            "write {i} acked before the secondary had it"
        );
    }
}

/// A secondary syncs lazily: applied writes stay in the primary's table until they are durable
/// there. In sync mode a host FLUSH asks for that at once (here the lazy sync is 10 minutes away).
#[test]
fn applied_writes_stay_pending_until_durable_and_a_sync_flush_makes_them_so() {
    let d = tempfile::tempdir().unwrap();
    let lazy = ["--durable-interval-ms", "600000"];
    let pair = start_pair(d.path().join("a").as_path(), "16M", &[], &lazy);
    pair.wait_synced(20);
    qemu_io_ok(&pair.a.uri(), &["write -P 5 0 64k"]);
    wait_until(10, "the secondary applies the write", || {
        file_block_is(&pair.b.data(), 15, 5)
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        status(&pair.a)["pending_blocks"],
        16,
        "applied but not durable on the secondary: still pending"
    );

    let pair = start_pair(
        d.path().join("b").as_path(),
        "16M",
        &["--replication", "sync"],
        &lazy,
    );
    pair.wait_synced(20);
    qemu_io_ok(&pair.a.uri(), &["write -P 6 0 64k", "flush"]);
    assert!(file_block_is(&pair.b.data(), 15, 6));
    let st = status(&pair.a);
    assert_eq!(
        st["pending_blocks"], 0,
        "the FLUSH made the writes durable: {st}"
    );
    assert_eq!(st["pair_state"], "Synced");
}

/// A new, blank secondary gets a full copy of the primary's allocated data.
#[test]
fn blank_secondary_gets_a_full_copy() {
    let d = tempfile::tempdir().unwrap();
    // A standalone primary with data, then restarted paired with a new secondary.
    let mut p = start_engine(&d.path().join("p"), "vol", "32M", &[]);
    let src = d.path().join("src.bin");
    std::fs::write(&src, pattern(17, 4 << 20)).unwrap();
    run_ok("nbdcopy", &[src.to_str().unwrap(), &p.uri()]);
    assert!(p.terminate());
    let tok = d.path().join("tok");
    std::fs::write(&tok, "t").unwrap();
    let s = EngineBuilder::new(d.path().join("s"))
        .size("32M")
        .nbd_socket()
        .role("secondary")
        .token_file(&tok)
        .peer("127.0.0.1:9")
        .start()
        .unwrap();
    p.restart_with(|c| c.peer(&s.grpc).token_file(&tok))
        .unwrap();
    let pair = Pair { a: p, b: s };
    pair.wait_synced(30);
    assert!(pair.files_identical());
    let st = status(&pair.a);
    assert!(st["bytes_resynced"].as_u64().unwrap() >= 4 << 20);
    assert!(
        st["bytes_resynced"].as_u64().unwrap() < 32 << 20,
        "holes are not copied"
    );
}

#[derive(Debug, Clone)]
enum Op {
    Write { block: u64, blocks: u64, byte: u8 },
    Flush,
    KillSecondary,
    DropLink,
    KillPrimary,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u64..1000, 1u64..40, 1u8..255).prop_map(|(block, blocks, byte)| Op::Write { block, blocks, byte }),
        1 => Just(Op::Flush),
        1 => Just(Op::KillSecondary),
        1 => Just(Op::DropLink),
        1 => Just(Op::KillPrimary),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::model_cases(12), failure_persistence: None, ..ProptestConfig::default() })]
    /// Model test: random writes, flushes, kills and link drops; both sides end equal to the model.
    #[test]
    fn model_random_writes_kills_and_reconnects(ops in proptest::collection::vec(op(), 4..14)) {
        let d = tempfile::tempdir().unwrap();
        let mut pair = start_pair(d.path(), "4M", &["--journal-size", "256K"], &[]);
        let mut model = vec![0u8; 4 << 20];
        for o in ops {
            match o {
                Op::Write { block, blocks, byte } => {
                    let blocks = blocks.min(1024 - block);
                    qemu_io_ok(&pair.a.uri(), &[&format!("write -P {byte} {} {}", block * B, blocks * B)]);
                    model[(block * B) as usize..((block + blocks) * B) as usize].fill(byte);
                }
                Op::Flush => { qemu_io_ok(&pair.a.uri(), &["flush"]); }
                Op::KillSecondary => pair.b.restart().unwrap(),
                Op::DropLink => fault(&pair.a, &["--drop-link"]),
                Op::KillPrimary => pair.a.restart().unwrap(),
            }
        }
        pair.wait_synced(20);
        prop_assert!(std::fs::read(pair.a.data()).unwrap() == model, "primary lost acknowledged data");
        prop_assert!(std::fs::read(pair.b.data()).unwrap() == model, "secondary differs from the model");
    }
}

/// `--secondary-access read-only`: the secondary never serves its live copy (it changes under the
/// reader and may be stale); a view taken on it (a snapshot) serves reads and refuses writes.
/// Frozen under writes: `tests/secondary_access.rs`.
#[test]
fn secondary_read_only_access_serves_views_only() {
    let d = tempfile::tempdir().unwrap();
    let pair = start_pair(d.path(), "16M", &[], &["--secondary-access", "read-only"]);
    qemu_io_ok(&pair.a.uri(), &["write -P 0x3d 1M 64k"]);
    pair.wait_synced(20);
    let out = qemu_io(&pair.b.uri(), &["read 0 4k"]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() || text.contains("point-in-time"),
        "the live copy was served: {text}"
    );
    let token = d.path().join("t");
    std::fs::write(&token, TOKEN).unwrap();
    let mut c = pair.b.command();
    c.args([
        "snapshot",
        "create",
        "--grpc",
        &pair.b.grpc,
        "--volume",
        "vol",
    ]);
    c.args(["--id", "view-1"]).arg("--token-file").arg(&token);
    assert!(c.output().unwrap().status.success());
    let view = format!("nbd://{}/vol@snapshot/view-1", pair.b.nbd);
    let out = run_ok(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x3d 1M 64k", &view],
    );
    assert!(
        out.contains("read 65536/65536") && !out.contains("failed"),
        "{out}"
    );
    let out = qemu_io(&view, &["write -P 1 0 4k"]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() || text.contains("failed") || text.contains("read-only"),
        "{text}"
    );
    assert!(file_block_is(&pair.b.data(), 0, 0));
}

#[test]
fn metrics_show_pending_blocks_while_the_link_is_paused_and_io_counters() {
    let d = tempfile::tempdir().unwrap();
    let addr = free_port();
    let pair = start_pair(d.path(), "16M", &["--metrics-listen", &addr], &[]);
    pair.wait_synced(30);
    fault(&pair.a, &["--pause", "true"]);
    qemu_io_ok(&pair.a.uri(), &["write -P 7 0 1M"]);
    let page = scrape(&addr);
    // No Accept header: the classic text format (OpenMetrics only for a scraper that asks).
    assert!(page.contains("text/plain; version=0.0.4"), "{page}");
    assert!(!page.contains("# EOF"), "{page}");
    tandem_testkit::promtool_check_metrics(&page);
    assert_eq!(
        sample(&page, "tandem_pending_blocks{volume=\"vol\"}"),
        Some(256.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, "tandem_replication_lag_bytes{volume=\"vol\"}"),
        Some(1048576.0),
        "{page}"
    );
    assert_eq!(
        sample(
            &page,
            "tandem_host_io_bytes_total{volume=\"vol\",op=\"write\"}"
        ),
        Some(1048576.0),
        "{page}"
    );
    assert!(
        sample(
            &page,
            "tandem_host_io_duration_seconds_count{volume=\"vol\",op=\"write\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, "tandem_peer_connected{volume=\"vol\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&page, "tandem_role{volume=\"vol\",role=\"primary\"}"),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, "tandem_role{volume=\"vol\",role=\"secondary\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &page,
            "tandem_pair_state{volume=\"vol\",state=\"replicating\"}"
        ),
        Some(1.0),
        "{page}"
    );
    fault(&pair.a, &["--pause", "false"]);
    pair.wait_synced(30);
    let page = scrape(&addr);
    assert_eq!(
        sample(&page, "tandem_pending_blocks{volume=\"vol\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(&page, "tandem_pair_state{volume=\"vol\",state=\"synced\"}"),
        Some(1.0),
        "{page}"
    );
    assert!(sample(&page, "tandem_replicated_bytes_total{volume=\"vol\"}").unwrap() >= 1048576.0);
}

/// JSON logs carry volume, epoch and role on every line, and follow a takeover; the takeover is
/// counted with its ready time on the metrics page, which promtool still finds clean.
#[test]
fn json_logs_name_volume_epoch_and_role_and_takeovers_are_counted() {
    let d = tempfile::tempdir().unwrap();
    let addr = free_port();
    let pair = start_linked(
        d.path(),
        "16M",
        &["--log-format", "json"],
        &["--log-format", "json", "--metrics-listen", &addr],
    );
    pair.wait_synced(30);
    qemu_io_ok(&pair.a.uri(), &["write -P 5 0 64k"]);
    pair.wait_synced(30);
    takeover(&pair.b);
    let page = scrape(&addr);
    assert_eq!(
        sample(
            &page,
            "tandem_takeovers_total{volume=\"vol\",kind=\"takeover\",result=\"ok\"}"
        ),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, "tandem_takeover_ready_seconds_count{volume=\"vol\"}"),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, "tandem_role{volume=\"vol\",role=\"primary\"}"),
        Some(1.0),
        "{page}"
    );
    tandem_testkit::promtool_check_metrics(&page);
    let log = pair.b.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!lines.is_empty(), "{log}");
    for l in &lines {
        assert_eq!(l["volume"], "vol", "{l}");
        assert!(l["epoch"].is_u64() && l["role"].is_string(), "{l}");
    }
    let seen = |role: &str, epoch: u64| {
        lines
            .iter()
            .any(|l| l["role"] == role && l["epoch"] == epoch)
    };
    assert!(seen("secondary", 1), "{log}");
    assert!(seen("primary", 2), "{log}");
}
