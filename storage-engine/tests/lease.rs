//! The write lease (issue 12) over two real engine processes: a primary cut off from its peer
//! stops acknowledging within its lease, a forced promotion waits until that lease has provably
//! run out, a witness can renew it, and sync mode stands on one copy only with the witness's
//! consent. A stopped process (SIGSTOP) is the partition: it answers nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use storage_engine::nbd::client::NbdClient;

const LEASE_MS: u64 = 2000;

/// Writes block `b` (4 KiB of `byte`) on an open NBD session; Ok when acknowledged.
async fn write_block(c: &mut NbdClient, b: u64, byte: u8) -> Result<(), String> {
    c.write(b * 4096, &vec![byte; 4096])
        .await
        .map_err(|e| e.to_string())
}

fn lease_args(lease_ms: u64, wait_ms: u64) -> Vec<String> {
    vec![
        "--lease-ms".into(),
        lease_ms.to_string(),
        "--lease-wait-ms".into(),
        wait_ms.to_string(),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The partition: the secondary stops answering. Every write the primary acknowledges completes
/// before the moment of the cut + the lease (the lease runs from a renewal sent before the cut);
/// later writes are refused with EIO, and a witness's grant makes them work again.
#[test]
fn a_partitioned_primary_stops_acknowledging_when_its_lease_runs_out() {
    let d = tempfile::tempdir().unwrap();
    let args = lease_args(LEASE_MS, 300);
    let mut pair = start_linked(d.path(), "64M", &strs(&args), &strs(&args));
    pair.wait_synced(30);
    let s = status(&pair.a);
    assert_eq!(n(&s, "lease_ms"), LEASE_MS, "{s}");
    assert!(
        n(&s, "lease_remaining_ms") > 0,
        "a paired primary renews at once: {s}"
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr = pair.a.nbd_addr();
    let (acked_after_cut, refused) = rt.block_on(async {
        let mut c = NbdClient::connect(&addr, "vol").await.unwrap();
        write_block(&mut c, 1, 1).await.unwrap();
        pair.b.stop().unwrap();
        let cut = Instant::now();
        let mut last_ack = Duration::ZERO;
        let mut refused = 0;
        let mut b = 2;
        while cut.elapsed() < Duration::from_millis(LEASE_MS + 1500) {
            match write_block(&mut c, b, 2).await {
                Ok(()) => last_ack = cut.elapsed(),
                Err(_) => refused += 1,
            }
            b = 2 + (b + 1) % 100;
        }
        (last_ack, refused)
    });
    assert!(
        acked_after_cut < Duration::from_millis(LEASE_MS + 200),
        "a write was acknowledged {acked_after_cut:?} after the cut, past the {LEASE_MS} ms lease"
    );
    assert!(refused > 0, "writes past the lease must be refused");
    eprintln!(
        "MEASURED partition: last write acknowledged {} ms after the cut (lease {LEASE_MS} ms), {refused} refused",
        acked_after_cut.as_millis()
    );
    let s = status(&pair.a);
    assert_eq!(n(&s, "lease_remaining_ms"), 0, "{s}");
    // Reads go on without a lease.
    assert!(block_reads(&pair.a.uri(), 1, 1));

    // The witness renews it (as the operator does while the peer is gone).
    let g = pair
        .a
        .control("lease", &["--lease-ms", &LEASE_MS.to_string()])
        .unwrap();
    assert!(n(&g, "lease_remaining_ms") > 0, "{g}");
    put_block(&pair.a.uri(), 3, 3);
    pair.b.cont().unwrap();
    pair.wait_synced(30);
    assert!(pair.files_identical());
}

/// The peer's side: a forced promotion starts only once the old primary's lease has provably run
/// out. A takeover whose timeout is shorter is refused (LeaseHeld) and promotes nothing; the new
/// primary holds no lease until the witness grants one; the old primary, back, gets no renewal
/// from a peer at a newer epoch, so it acknowledges nothing more.
#[test]
fn a_forced_promotion_waits_for_the_old_primarys_lease() {
    let d = tempfile::tempdir().unwrap();
    let args = lease_args(LEASE_MS, 300);
    let mut pair = start_linked(d.path(), "64M", &strs(&args), &strs(&args));
    pair.wait_synced(30);
    put_block(&pair.a.uri(), 5, 5);
    pair.wait_synced(30);
    // Let the secondary answer at least one renewal after its start-up promise, then cut.
    std::thread::sleep(Duration::from_millis(LEASE_MS * 2));
    pair.a.stop().unwrap();
    let cut = Instant::now();

    let early = pair
        .b
        .control("takeover", &["--policy", "force", "--timeout", "1"]);
    let err = early.expect_err("a forced promotion inside the lease must be refused");
    assert!(err.contains("LeaseHeld"), "{err}");
    assert_eq!(status(&pair.b)["role"], "secondary");

    let r = pair
        .b
        .control("takeover", &["--policy", "force", "--timeout", "10"])
        .unwrap();
    let promoted = cut.elapsed();
    // The last renewal the secondary answered came at most a quarter lease before the cut, and
    // its promise is the lease * 1.1 + 500 ms from that answer.
    let floor = Duration::from_millis(LEASE_MS * 85 / 100 + 500);
    assert!(
        promoted >= floor,
        "promoted {promoted:?} after the cut, before the old primary's lease could have run out ({floor:?})"
    );
    assert!(n(&r, "epoch") >= 2, "{r}");
    eprintln!(
        "MEASURED forced promotion: serving {} ms after the old primary stopped (lease {LEASE_MS} ms, guard {} ms)",
        promoted.as_millis(),
        storage_engine::lease::guard(LEASE_MS as u32).as_millis()
    );
    let s = status(&pair.b);
    assert_eq!(s["role"], "primary");
    assert_eq!(
        n(&s, "lease_remaining_ms"),
        0,
        "no lease before the witness: {s}"
    );

    // The new primary's writes wait for a lease; the witness grants it.
    pair.b
        .control("lease", &["--lease-ms", &LEASE_MS.to_string()])
        .unwrap();
    put_block(&pair.b.uri(), 6, 6);

    // The old primary returns: its peer is at a newer epoch, so no renewal; it acknowledges nothing.
    pair.a.cont().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr = pair.a.nbd_addr();
    let acked = rt.block_on(async {
        let Ok(mut c) = NbdClient::connect(&addr, "vol").await else {
            return false; // it stepped down already: no session at all
        };
        write_block(&mut c, 7, 7).await.is_ok()
    });
    assert!(
        !acked,
        "the old primary acknowledged a write after its lease ran out"
    );
    assert!(block_reads(&pair.b.uri(), 5, 5));
}

/// Sync mode: a write the peer does not acknowledge is refused, not acknowledged on one copy,
/// until the witness consents (GrantLease allow_async); the consent ends once the peer has
/// everything durably again.
#[test]
fn sync_mode_falls_back_only_with_the_witness_consent() {
    let d = tempfile::tempdir().unwrap();
    let mut args = lease_args(10_000, 800);
    args.extend(["--replication".into(), "sync".into()]);
    args.extend(["--sync-timeout-ms".into(), "200".into()]);
    let pair = start_linked(d.path(), "64M", &strs(&args), &strs(&args));
    pair.wait_synced(30);
    put_block(&pair.a.uri(), 1, 1);
    // Records stop flowing; lease renewals (their own RPC) go on.
    fault(&pair.a, &["--pause", "true"]);
    let out = qemu_io(&pair.a.uri(), &["write -P 2 8192 4k"]);
    assert!(
        !qemu_io_passed(&out).0,
        "a sync write without the peer's ack nor the witness's consent was acknowledged"
    );
    let s = status(&pair.a);
    assert!(!s["sync_fallback"].as_bool().unwrap_or(true), "{s}");

    let g = pair.a.control("lease", &["--allow-async"]).unwrap();
    assert_eq!(g["sync_fallback"], true, "{g}");
    put_block(&pair.a.uri(), 3, 3);
    let s = status(&pair.a);
    assert_eq!(s["sync_degraded"], true, "{s}");
    assert!(
        event_names(&s).contains(&"SyncFallbackAllowed".to_string()),
        "{s}"
    );

    fault(&pair.a, &["--pause", "false"]);
    pair.wait_synced(30);
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&pair.a)["sync_fallback"] == true && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = status(&pair.a);
    assert_eq!(
        s["sync_fallback"], false,
        "the consent outlived the outage: {s}"
    );
    assert!(block_reads(&pair.b.uri(), 3, 3) || pair.files_identical());
}

/// A witness's grant is checked against the engine it names: another run's stamp, a secondary,
/// an engine with leases off.
#[test]
fn a_grant_that_does_not_match_the_engine_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let args = lease_args(LEASE_MS, 300);
    let pair = start_linked(d.path(), "64M", &strs(&args), &strs(&args));
    pair.wait_synced(30);
    let err = pair
        .b
        .control("lease", &[])
        .expect_err("a secondary holds no lease");
    assert!(err.contains("LeaseRefused"), "{err}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let grpc = pair.a.grpc.clone();
    let (stale, future) = rt.block_on(async {
        let mut c = tandem_api::client::EngineClient::connect(&grpc, Some(TOKEN))
            .await
            .unwrap();
        let s = c.status("vol").await.unwrap();
        let grant = |req: tandem_api::pb::GrantLeaseRequest| {
            let mut c = c.clone();
            async move { c.grant_lease(req).await }
        };
        let base = tandem_api::pb::GrantLeaseRequest {
            volume: "vol".into(),
            epoch: s.epoch,
            instance: s.instance,
            stamp_us: s.clock_us,
            lease_ms: LEASE_MS as u32,
            allow_async: false,
        };
        let stale = grant(tandem_api::pb::GrantLeaseRequest {
            instance: s.instance ^ 2,
            ..base.clone()
        })
        .await;
        let future = grant(tandem_api::pb::GrantLeaseRequest {
            stamp_us: s.clock_us + 3_600_000_000,
            ..base
        })
        .await;
        (stale, future)
    });
    for r in [stale, future] {
        let e = r.expect_err("a mismatched grant must be refused");
        assert_eq!(e.reason(), Some(tandem_api::Reason::LeaseRefused), "{e}");
    }

    let d2 = tempfile::tempdir().unwrap();
    let off = start_linked(d2.path(), "64M", &["--lease-ms", "0"], &["--lease-ms", "0"]);
    off.wait_synced(30);
    assert_eq!(n(&status(&off.a), "lease_ms"), 0);
    let err = off.a.control("lease", &[]).expect_err("leases are off");
    assert!(err.contains("LeaseRefused"), "{err}");
}
