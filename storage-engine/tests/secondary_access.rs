//! Host access on the secondary while paired (issue 18, seed 004), over real engine processes:
//! forwarded writes interleaved with the primary's own keep one order on both copies, reads on a
//! read-write secondary are current, a point-in-time view on a read-only secondary stays frozen
//! while the primary writes, a disconnected secondary refuses, and a forwarded write acknowledged
//! just before the primary dies is on the promoted copy (also in sync mode, where each
//! acknowledged write is on both copies at once).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    sync::{atomic::Ordering, Arc, Mutex},
    time::{Duration, Instant},
};

use common::*;
use storage_engine::nbd::client::{NbdClient, NbdError};

const BS: u64 = 4096;
const RW: &[&str] = &["--secondary-access", "read-write"];

/// A block stamped with (writer, counter): distinct for every write of a test.
fn stamp(writer: u8, n: u32) -> Vec<u8> {
    let mut b = vec![writer; BS as usize];
    b[..4].copy_from_slice(&n.to_be_bytes());
    b
}

/// One acknowledged write: (block, content, started, acknowledged).
type Acked = (u64, Vec<u8>, Instant, Instant);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Forwarded writes and the primary's own, on the same blocks: each read right after an
/// acknowledgement, on either engine, returns it (current reads on the secondary); then two writers
/// at once, and at the end both data files are byte-identical and every block holds a write that no
/// later-started write to it followed (one order, the acknowledged one).
#[test]
fn forwarded_writes_interleave_with_primary_writes_in_one_order() {
    let d = tempfile::tempdir().unwrap();
    let pair = start_linked(d.path(), "16M", &[], RW);
    pair.wait_synced(20);
    let (a, b) = (pair.a.nbd.clone(), pair.b.nbd.clone());
    rt().block_on(async {
        let mut ca = NbdClient::connect(&a, "vol").await.unwrap();
        let mut cb = NbdClient::connect(&b, "vol").await.unwrap();
        // Sequential: every write read back at once on both engines.
        for i in 0..120u32 {
            let block = u64::from(i * 7 % 16);
            let data = stamp(if i % 2 == 0 { 0xa } else { 0xb }, i);
            let w = if i % 2 == 0 { &mut ca } else { &mut cb };
            w.write(block * BS, &data).await.unwrap();
            assert_eq!(
                ca.read(block * BS, BS as u32).await.unwrap(),
                data,
                "a, write {i}"
            );
            assert_eq!(
                cb.read(block * BS, BS as u32).await.unwrap(),
                data,
                "b (current read), write {i}"
            );
        }
        // Concurrent: two writers over the same 8 blocks; (block, stamp, start, ack) of each.
        let log: Arc<Mutex<Vec<Acked>>> = Arc::default();
        let mut tasks = Vec::new();
        for (w, mut c) in [(0xc, ca), (0xd, cb)] {
            let log = Arc::clone(&log);
            tasks.push(tokio::spawn(async move {
                for i in 0..150u32 {
                    let block = u64::from((i * 5 + u32::from(w)) % 8) + 32;
                    let data = stamp(w, i);
                    let start = Instant::now();
                    c.write(block * BS, &data).await.unwrap();
                    log.lock()
                        .unwrap()
                        .push((block, data, start, Instant::now()));
                }
                c.flush().await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let log = log.lock().unwrap().clone();
        let mut cb = NbdClient::connect(&b, "vol").await.unwrap();
        for block in 32..40u64 {
            let got = cb.read(block * BS, BS as u32).await.unwrap();
            let Some(&(_, _, _, acked)) = log.iter().find(|(b, d, _, _)| *b == block && *d == got)
            else {
                panic!("block {block} holds no acknowledged write");
            };
            assert!(
                !log.iter()
                    .any(|(b, _, start, _)| *b == block && *start > acked),
                "block {block}: a write started after the one it holds was acknowledged"
            );
        }
    });
    pair.wait_synced(20);
    assert!(pair.files_identical(), "{}", pair.describe());
    // What b's host wrote through it: 60 sequential writes and 150 concurrent ones.
    assert_eq!(n(&status(&pair.b), "bytes_written"), 210 * BS);
}

/// `--secondary-access read-only`: the live copy is never served; a view (a snapshot taken on the
/// secondary) is a consistent prefix of the writer's stamps and stays frozen while the primary
/// keeps writing; released with DeleteSnapshot.
#[test]
fn a_view_on_the_secondary_stays_frozen_while_the_primary_writes() {
    let d = tempfile::tempdir().unwrap();
    let pair = start_pair(d.path(), "16M", &[], &["--secondary-access", "read-only"]);
    pair.wait_synced(20);
    let token = d.path().join("view-token");
    std::fs::write(&token, TOKEN).unwrap();
    // The live copy: refused at the handshake, with the reason.
    let rt = self::rt();
    let err = rt
        .block_on(NbdClient::connect(&pair.b.nbd, "vol"))
        .err()
        .expect("a read-only secondary opened its live copy");
    assert!(err.to_string().contains("point-in-time"), "{err}");

    // The writer stamps blocks 0, 1, 2, ... in order, each acknowledged before the next, until
    // told to stop (some time after the view was taken) or the volume's 4096 blocks are full.
    let written = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let a = pair.a.nbd.clone();
    let writer = {
        let (written, stop) = (Arc::clone(&written), Arc::clone(&stop));
        std::thread::spawn(move || {
            self::rt().block_on(async {
                let mut c = NbdClient::connect(&a, "vol").await.unwrap();
                for i in 0..4096u32 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    c.write(u64::from(i) * BS, &stamp(0x5, i + 1))
                        .await
                        .unwrap();
                    written.store(i + 1, Ordering::SeqCst);
                }
            })
        })
    };
    let t = Instant::now();
    while written.load(Ordering::SeqCst) < 100 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the writer does not write"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let snap = |op: &str| {
        let mut c = pair.b.command();
        c.args(["snapshot", op, "--grpc", &pair.b.grpc, "--volume", "vol"]);
        c.args(["--id", "view-backup"])
            .arg("--token-file")
            .arg(&token);
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    snap("create");
    let at_view = written.load(Ordering::SeqCst);
    let read_view = || -> Vec<u8> {
        rt.block_on(async {
            let mut c = NbdClient::connect(&pair.b.nbd, "vol@snapshot/view-backup")
                .await
                .unwrap();
            c.read(0, 4096 * BS as u32).await.unwrap()
        })
    };
    let first = read_view();
    while written.load(Ordering::SeqCst) < (at_view + 200).min(4096) {
        assert!(t.elapsed() < Duration::from_secs(30), "the writer stalled");
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let total = written.load(Ordering::SeqCst);
    pair.wait_synced(20);
    // A prefix: stamps 1..=k in blocks 0..k, zeros after, nothing newer missing below anything present.
    let k = first
        .chunks(BS as usize)
        .position(|c| c.iter().all(|&x| x == 0))
        .unwrap_or(4096);
    for (i, c) in first.chunks(BS as usize).enumerate() {
        if i < k {
            assert_eq!(
                c,
                stamp(0x5, i as u32 + 1),
                "view block {i} (prefix of {k})"
            );
        } else {
            assert!(
                c.iter().all(|&x| x == 0),
                "view block {i} written after a hole at {k}"
            );
        }
    }
    // Taken while the writer ran: it holds at least what was acknowledged before it was asked
    // for, and not what came later.
    assert!(
        k >= 100 && k < total as usize,
        "view of {k} stamps, {total} written"
    );
    // Frozen: the primary wrote every stamp since, the view still reads the same.
    assert_eq!(read_view(), first, "the view changed under the writer");
    snap("delete");
    assert!(rt
        .block_on(NbdClient::connect(&pair.b.nbd, "vol@snapshot/view-backup"))
        .is_err());
}

/// A read-write secondary whose primary is gone refuses host I/O: EIO on an open session, the
/// handshake refused with the reason, and the refusal counted.
#[test]
fn a_disconnected_secondary_refuses_host_io() {
    let d = tempfile::tempdir().unwrap();
    let metrics = free_port();
    let mut pair = start_linked(
        d.path(),
        "16M",
        NO_LEASE,
        &[RW, &["--metrics-listen", &metrics], NO_LEASE].concat(),
    );
    pair.wait_synced(20);
    let rt = self::rt();
    let b = pair.b.nbd.clone();
    let mut c = rt.block_on(NbdClient::connect(&b, "vol")).unwrap();
    rt.block_on(c.write(0, &stamp(1, 1))).unwrap();
    pair.a.kill();
    let t = Instant::now();
    while status(&pair.b)["peer_connected"] == true {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "b still says connected"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let err = rt.block_on(c.write(BS, &stamp(1, 2))).unwrap_err();
    assert!(matches!(err, NbdError::Errno(5)), "{err}");
    assert!(
        rt.block_on(c.read(0, BS as u32)).is_err(),
        "a stale read was served"
    );
    let err = rt
        .block_on(NbdClient::connect(&b, "vol"))
        .err()
        .expect("a disconnected secondary opened a session");
    assert!(
        err.to_string().contains("not connected to its primary"),
        "{err}"
    );
    assert!(counter(&metrics, "secondary_io_refused") >= 2.0);
}

/// A forwarded write acknowledged just before the primary is killed is on the copy a forced
/// takeover promotes: it was applied there before the host heard of it.
#[test]
fn a_forwarded_write_survives_the_primarys_death() {
    let d = tempfile::tempdir().unwrap();
    let mut pair = start_linked(
        d.path(),
        "16M",
        NO_LEASE,
        &[RW, NO_LEASE, &["--proxy-timeout-ms", "1000"]].concat(),
    );
    pair.wait_synced(20);
    let rt = self::rt();
    let b = pair.b.nbd.clone();
    let written: Vec<Vec<u8>> = rt.block_on(async {
        let mut c = NbdClient::connect(&b, "vol").await.unwrap();
        let mut out = Vec::new();
        for i in 0..64u32 {
            let data = stamp(0xe, i);
            c.write(u64::from(i) * BS, &data).await.unwrap();
            out.push(data);
        }
        out
    });
    // One more while the stream to b is held: b must not acknowledge it before its own copy has
    // it (it times out instead); had it been acknowledged, it would have to survive too.
    fault(&pair.a, &["--pause", "true"]);
    let last = stamp(0xf, 64);
    let held = rt.block_on(async {
        let mut c = NbdClient::connect(&b, "vol").await.unwrap();
        c.write(64 * BS, &last).await
    });
    // Right after the last acknowledgement: no flush, no wait for the stream to settle.
    pair.a.kill();
    let r = pair
        .b
        .control("takeover", &["--policy", "force", "--timeout", "1"])
        .unwrap();
    assert_eq!(status(&pair.b)["role"], "primary", "{r}");
    for (i, want) in written.iter().enumerate() {
        assert_eq!(
            &read_block(&pair.b, i as u64),
            want,
            "block {i} after the takeover"
        );
    }
    match held {
        Ok(()) => assert_eq!(
            read_block(&pair.b, 64),
            last,
            "an acknowledged write was lost"
        ),
        Err(e) => assert!(matches!(e, NbdError::Errno(5)), "{e}"),
    }
}

/// Block `b` of an engine's data file, read straight from the file (no engine involved).
fn file_block(e: &Engine, b: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; BS as usize];
    std::fs::File::open(e.data())
        .unwrap()
        .read_exact_at(&mut buf, b * BS)
        .unwrap();
    buf
}

/// Sync mode (`--replication sync`): a write forwarded through the secondary is acknowledged to
/// its host only once both copies hold it: the primary answers the forward only after the
/// secondary acknowledged the seq, and the secondary waits until its own copy applied it. Checked
/// at each acknowledgement in both data files (no waiting), with the primary's own writes
/// interleaved; then the primary is killed right after the last acknowledgement, and the promoted
/// secondary serves every acknowledged write.
#[test]
fn a_forwarded_write_on_a_sync_pair_is_on_both_copies_when_acknowledged() {
    let d = tempfile::tempdir().unwrap();
    let sync = ["--replication", "sync"];
    let mut pair = start_linked(
        d.path(),
        "16M",
        &[&sync[..], NO_LEASE].concat(),
        &[&sync[..], RW, NO_LEASE, &["--proxy-timeout-ms", "1000"]].concat(),
    );
    pair.wait_synced(20);
    let rt = self::rt();
    let (a, b) = (pair.a.nbd.clone(), pair.b.nbd.clone());
    let acked: Vec<(u64, Vec<u8>)> = rt.block_on(async {
        let mut ca = NbdClient::connect(&a, "vol").await.unwrap();
        let mut cb = NbdClient::connect(&b, "vol").await.unwrap();
        let mut out = Vec::new();
        for i in 0..48u32 {
            // Forwarded through b, then the primary's own write to the next block.
            let (block, data) = (u64::from(i) * 2, stamp(0x5b, i));
            cb.write(block * BS, &data).await.unwrap();
            for (who, e) in [("primary", &pair.a), ("secondary", &pair.b)] {
                assert!(
                    file_block(e, block) == data,
                    "forwarded write {i} acknowledged before the {who}'s copy had it"
                );
            }
            out.push((block, data));
            let (block, data) = (block + 1, stamp(0x5a, i));
            ca.write(block * BS, &data).await.unwrap();
            assert!(
                file_block(&pair.b, block) == data,
                "primary write {i} acknowledged before the secondary had it (sync mode)"
            );
            out.push((block, data));
        }
        // The last one, and nothing after it: no flush, no wait for the stream to settle.
        let (block, data) = (200, stamp(0x5b, 999));
        cb.write(block * BS, &data).await.unwrap();
        out.push((block, data));
        out
    });
    pair.a.kill();
    for (block, data) in &acked {
        assert!(
            &file_block(&pair.a, *block) == data,
            "primary's file, block {block}"
        );
    }
    let r = pair
        .b
        .control("takeover", &["--policy", "force", "--timeout", "1"])
        .unwrap();
    assert_eq!(status(&pair.b)["role"], "primary", "{r}");
    for (block, data) in &acked {
        assert!(
            &read_block(&pair.b, *block) == data,
            "block {block} after the takeover"
        );
    }
}
