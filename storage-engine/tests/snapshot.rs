//! Snapshots over real engine processes (issue 14): taken under load (copy-on-write on this
//! machine's filesystem, reflink on an xfs loop mount), read back through their NBD export,
//! surviving a restart, a takeover and a failback, and restored with `seed` into a new pair.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use common::*;
use storage_engine::nbd::client::NbdClient;

const BS: u64 = 4096;

/// `tandem-engine snapshot <op> --grpc .. --volume vol [--id ID] [--token-file ..]` as JSON.
fn snap_cli(
    e: &Engine,
    op: &str,
    id: Option<&str>,
    token: Option<&Path>,
) -> Result<serde_json::Value, String> {
    let mut c = e.command();
    c.args(["snapshot", op, "--grpc", &e.grpc, "--volume", e.volume()]);
    if let Some(id) = id {
        c.args(["--id", id]);
    }
    if let Some(t) = token {
        c.arg("--token-file").arg(t);
    }
    let out = c.output().unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The whole of an NBD export (TCP), read in 1 MiB requests.
fn read_export(addr: &str, export: &str) -> Vec<u8> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = NbdClient::connect(addr, export).await.unwrap();
        let size = c.size();
        let mut out = Vec::with_capacity(size as usize);
        let mut off = 0;
        while off < size {
            let n = (size - off).min(1 << 20) as u32;
            out.extend(c.read(off, n).await.unwrap());
            off += u64::from(n);
        }
        out
    })
}

/// Equal images, or a failure naming the first block that differs (never the whole image).
fn same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: sizes differ");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        let b = i / BS as usize;
        panic!(
            "{what}: block {b} differs (byte {i}: {:#x}, want {:#x})",
            got[i], want[i]
        );
    }
}

fn tagged(tag: u64) -> Vec<u8> {
    tag.to_le_bytes().repeat((BS / 8) as usize)
}

/// One acknowledged write: block, tag, when it was sent and when its reply came.
#[derive(Clone, Copy)]
struct Done {
    block: u64,
    tag: u64,
    sent: Instant,
    acked: Instant,
}

/// Writers hammer `blocks` blocks through NBD (each write a whole block, tagged writer|counter)
/// while the snapshot is taken; the snapshot's export must hold, per block, the last write
/// acknowledged before the call or one in flight during it (never one sent after it returned,
/// never a torn block). Returns the snapshot's method.
fn snapshot_under_load(dir: &Path) -> String {
    let e = start_engine(dir, "vol", "16M", &[]);
    let blocks = 256u64;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let log: Arc<Mutex<Vec<Done>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (t0, t1, info) = rt.block_on(async {
        let mut writers = Vec::new();
        for w in 0..4u64 {
            let (log, stop, addr) = (Arc::clone(&log), Arc::clone(&stop), e.nbd.clone());
            writers.push(tokio::spawn(async move {
                let mut c = NbdClient::connect(&addr, "vol").await.unwrap();
                let mut n = 0u64;
                let mut x = w * 7919 + 1;
                while !stop.load(Ordering::Relaxed) {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let block = (x >> 33) % blocks;
                    n += 1;
                    let tag = (w + 1) << 56 | n;
                    let sent = Instant::now();
                    c.write(block * BS, &tagged(tag)).await.unwrap();
                    let acked = Instant::now();
                    log.lock().unwrap().push(Done {
                        block,
                        tag,
                        sent,
                        acked,
                    });
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut client = storage_engine::client::EngineClient::connect(&e.grpc, None)
            .await
            .unwrap();
        let t0 = Instant::now();
        let info = client.create_snapshot("vol", "s1").await.unwrap();
        let t1 = Instant::now();
        // Writes after the snapshot must not show in it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.await.unwrap();
        }
        (t0, t1, info)
    });
    assert!(info.ready);
    assert_eq!(info.export, "vol@snapshot/s1");
    assert_eq!(info.size, 16 << 20);
    let log = log.lock().unwrap().clone();
    let after = log.iter().filter(|d| d.sent > t1).count();
    assert!(
        after > 50,
        "only {after} writes after the snapshot: the test proves nothing"
    );
    let snap = read_export(&e.nbd, "vol@snapshot/s1");
    let mut by_block: HashMap<u64, Vec<Done>> = HashMap::new();
    for d in &log {
        by_block.entry(d.block).or_default().push(*d);
    }
    for b in 0..blocks {
        let got = &snap[(b * BS) as usize..((b + 1) * BS) as usize];
        let writes = by_block.remove(&b).unwrap_or_default();
        // Acknowledged before the call: a write that no other write acknowledged before the call
        // began after (overlapping writes land in either order), zeros if there was none; or
        // any write whose request was sent before the call returned and acknowledged after it began.
        let before: Vec<&Done> = writes.iter().filter(|d| d.acked < t0).collect();
        let mut allowed: Vec<Option<u64>> = before
            .iter()
            .filter(|x| !before.iter().any(|y| y.sent > x.acked))
            .map(|d| Some(d.tag))
            .collect();
        if before.is_empty() {
            allowed.push(None);
        }
        allowed.extend(
            writes
                .iter()
                .filter(|d| d.acked >= t0 && d.sent <= t1)
                .map(|d| Some(d.tag)),
        );
        let ok = allowed.iter().any(|t| match t {
            None => got.iter().all(|&x| x == 0),
            Some(t) => got == tagged(*t).as_slice(),
        });
        if !ok {
            let at = |t: Instant| {
                t.saturating_duration_since(t0).as_secs_f64()
                    - t0.saturating_duration_since(t).as_secs_f64()
            };
            let seen: Vec<String> = writes
                .iter()
                .map(|d| {
                    format!(
                        "{:x} sent {:.6} acked {:.6}",
                        d.tag,
                        at(d.sent),
                        at(d.acked)
                    )
                })
                .collect();
            panic!(
                "block {b}: snapshot holds {:x?}, allowed {allowed:x?}; the call ran 0..{:.6}; writes: {seen:#?}",
                &got[..8],
                at(t1)
            );
        }
    }
    // The rest of the volume was never written: zeros.
    assert!(snap[(blocks * BS) as usize..].iter().all(|&x| x == 0));
    // Read-only: a write through the export is refused (EPERM), the snapshot unchanged.
    rt.block_on(async {
        let mut c = NbdClient::connect(&e.nbd, "vol@snapshot/s1").await.unwrap();
        let err = c.write(0, &tagged(1)).await.unwrap_err();
        assert!(
            err.to_string().contains('1') || format!("{err:?}").contains("Errno(1)"),
            "{err:?}"
        );
        assert!(c.trim(0, 4096).await.is_err());
        same(
            &c.read(0, 4096).await.unwrap(),
            &snap[..4096],
            "a read after the refused write",
        );
    });
    // Idempotent by id; listed; deleted once.
    let again = snap_cli(&e, "create", Some("s1"), None).unwrap();
    assert_eq!(again["seq"], info.seq);
    assert_eq!(again["created_unix_ms"], info.created_unix_ms);
    // The same time for people, beside the number (issue 16).
    assert_eq!(
        again["created"].as_str(),
        storage_engine::report::rfc3339_ms(info.created_unix_ms).as_deref()
    );
    assert!(
        again["created"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{again}"
    );
    let list = snap_cli(&e, "list", None, None).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let method = info.method.clone();
    assert_eq!(
        snap_cli(&e, "delete", Some("s1"), None).unwrap()["deleted"],
        true
    );
    assert_eq!(
        snap_cli(&e, "delete", Some("s1"), None).unwrap()["deleted"],
        false
    );
    assert!(std::fs::read_dir(e.state_dir().join("snapshots"))
        .unwrap()
        .next()
        .is_none());
    method
}

#[test]
fn a_snapshot_under_load_holds_what_was_acknowledged_before_it_cow() {
    let d = tempfile::tempdir().unwrap();
    assert_eq!(snapshot_under_load(d.path()), "cow");
}

/// An xfs filesystem with reflink on a loop device, unmounted and detached on drop.
struct XfsMount {
    dev: String,
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl XfsMount {
    fn new() -> Result<XfsMount, String> {
        let uid = Command::new("id")
            .arg("-u")
            .output()
            .map_err(|e| e.to_string())?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return Err("not root".into());
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let img = dir.path().join("xfs.img");
        let f = std::fs::File::create(&img).map_err(|e| e.to_string())?;
        f.set_len(1 << 30).map_err(|e| e.to_string())?;
        let run = |c: &mut Command| -> Result<String, String> {
            let out = c.output().map_err(|e| format!("{c:?}: {e}"))?;
            if out.status.success() {
                Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
            } else {
                Err(format!("{c:?}: {}", String::from_utf8_lossy(&out.stderr)))
            }
        };
        let dev = run(Command::new("losetup").args(["-f", "--show"]).arg(&img))
            .map_err(|e| format!("no loop device: {e}"))?;
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).map_err(|e| e.to_string())?;
        let m = XfsMount {
            dev,
            mnt,
            _dir: dir,
        };
        run(Command::new("mkfs.xfs").args(["-q", "-m", "reflink=1", &m.dev]))?;
        run(Command::new("mount").arg(&m.dev).arg(&m.mnt))?;
        Ok(m)
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

#[test]
fn a_snapshot_under_load_holds_what_was_acknowledged_before_it_reflink() {
    let m = match XfsMount::new() {
        Ok(m) => m,
        Err(why) => {
            println!("skipped: cannot make an xfs filesystem with reflink ({why})");
            return;
        }
    };
    let dir = m.mnt.join("engine");
    assert_eq!(snapshot_under_load(&dir), "reflink");
}

fn fill(byte: u8) -> Vec<u8> {
    vec![byte; BS as usize]
}

/// A snapshot taken on the primary of a pair stays listed and readable, unchanged, across a
/// SIGKILL and restart, a takeover by the peer (the copy-on-write area keeps protecting it while
/// replication rewrites the data file) and a failback.
#[test]
fn a_snapshot_survives_restart_takeover_and_failback() {
    let d = tempfile::tempdir().unwrap();
    let token = d.path().join("token");
    let mut pair = start_linked(d.path(), "16M", NO_LEASE, NO_LEASE);
    pair.wait_synced(30);
    for b in 0..32 {
        write_block(&pair.a, b, &fill(0xa0 + (b % 8) as u8));
    }
    // Not on a secondary.
    let err = snap_cli(&pair.b, "create", Some("s"), Some(&token)).unwrap_err();
    assert!(err.contains("primary"), "{err}");
    let info = snap_cli(&pair.a, "create", Some("s"), Some(&token)).unwrap();
    assert_eq!(info["method"], "cow");
    let want = read_export(&pair.a.nbd, "vol@snapshot/s");
    for b in 0..16 {
        write_block(&pair.a, b, &fill(0xb0));
    }
    same(
        &read_export(&pair.a.nbd, "vol@snapshot/s"),
        &want,
        "after overwrites",
    );
    pair.a.restart().unwrap();
    pair.wait_synced(30);
    same(
        &read_export(&pair.a.nbd, "vol@snapshot/s"),
        &want,
        "after a restart",
    );
    takeover(&pair.b);
    for b in 8..24 {
        write_block(&pair.b, b, &fill(0xc0));
    }
    pair.wait_converged(1, 30);
    // Replication rewrote a's data file, not the snapshot.
    assert!(file_block_is(&pair.a.data(), 10, 0xc0));
    same(
        &read_export(&pair.a.nbd, "vol@snapshot/s"),
        &want,
        "on the secondary",
    );
    let list = snap_cli(&pair.a, "list", None, Some(&token)).unwrap();
    assert_eq!(list[0]["id"], "s", "{list}");
    pair.a.control("failback", &[]).unwrap();
    pair.wait_converged(0, 30);
    same(
        &read_export(&pair.a.nbd, "vol@snapshot/s"),
        &want,
        "after failback",
    );
    // The volume itself moved on.
    assert!(file_block_is(&pair.a.data(), 10, 0xc0));
}

fn seed_cmd(
    bin: &Engine,
    from: &str,
    export: &str,
    state: &Path,
    volume: &str,
    size: &str,
) -> Result<serde_json::Value, String> {
    let out = bin
        .command()
        .args(["seed", "--from", from, "--export", export, "--state-dir"])
        .arg(state)
        .args(["--volume", volume, "--size", size])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A restore: `seed` fills a new pair's primary from a snapshot export (on the source engine's
/// unix socket), sparse, and the new pair's two replicas end byte-identical to the snapshot (with
/// zeros past its size). Seeding again is a no-op; another source or volume is refused; `serve`
/// refuses a half-seeded dir and a second seed finishes it.
#[test]
fn seed_restores_a_snapshot_into_a_new_pair_and_is_idempotent() {
    let d = tempfile::tempdir().unwrap();
    let src = start_engine(&d.path().join("src"), "vol", "16M", &[]);
    for b in (0..4096).step_by(97) {
        write_block(&src, b, &content(b));
    }
    snap_cli(&src, "create", Some("s"), None).unwrap();
    write_block(&src, 0, &fill(0xee));
    let want = read_export(&src.nbd, "vol@snapshot/s");
    assert_ne!(&want[..4096], fill(0xee).as_slice());
    let from = format!("unix:{}", src.socket().display());
    let new = d.path().join("new");
    let state = new.join("a").join("state");
    // Smaller than the snapshot: refused, nothing written.
    let err = seed_cmd(&src, &from, "vol@snapshot/s", &state, "vol", "8M").unwrap_err();
    assert!(err.contains("never shrink"), "{err}");
    assert!(!state.join("seed").exists());
    // An interrupted seed leaves a half-seeded dir: serve refuses it.
    std::fs::create_dir_all(&state).unwrap();
    storage_engine::snapshot::seed::store_marker(
        &state,
        &storage_engine::snapshot::seed::SeedMarker {
            volume: "vol".into(),
            size: 32 << 20,
            block_size: 4096,
            export: "vol@snapshot/s".into(),
            done: false,
            blocks: 0,
        },
    )
    .unwrap();
    std::fs::write(
        new.join("a").join("data.img"),
        b"junk from the interrupted run",
    )
    .unwrap();
    let refused = EngineBuilder::new(new.join("a"))
        .size("32M")
        .ready_timeout(Duration::from_secs(3))
        .start();
    assert!(refused.is_err(), "serve started on a half-seeded dir");
    // The whole log (its tail may be a backtrace when RUST_BACKTRACE is set).
    let log = std::fs::read_to_string(new.join("a").join("engine.log")).unwrap();
    assert!(log.contains("half-seeded"), "{log}");
    let r = seed_cmd(&src, &from, "vol@snapshot/s", &state, "vol", "32M").unwrap();
    assert_eq!(r["seeded"], true, "{r}");
    let copied = r["blocks"].as_u64().unwrap();
    assert_eq!(copied, 4096u64.div_ceil(97));
    // Same source again: a no-op. Another export or volume: refused.
    let r = seed_cmd(&src, &from, "vol@snapshot/s", &state, "vol", "32M").unwrap();
    assert_eq!(r["seeded"], false, "{r}");
    let err = seed_cmd(&src, &from, "vol@snapshot/t", &state, "vol", "32M").unwrap_err();
    assert!(err.contains("refusing"), "{err}");
    // Sparse: only the copied blocks are allocated.
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(new.join("a").join("data.img"))
        .unwrap()
        .blocks()
        * 512;
    assert!(
        allocated <= (copied + 64) * BS,
        "{allocated} bytes allocated"
    );
    let pair = pair_builder(&new, "32M", &[], &[]).start().unwrap();
    pair.wait_synced(60);
    let mut full = want.clone();
    full.resize(32 << 20, 0);
    for e in [&pair.a, &pair.b] {
        same(
            &std::fs::read(e.data()).unwrap(),
            &full,
            &e.data().display().to_string(),
        );
    }
    // After serving, the dir is a volume's: seeding it for another volume is refused, for the
    // same export it stays a no-op (the operator's init container runs at every pod start).
    let err = seed_cmd(&src, &from, "vol@snapshot/s", &state, "other", "32M").unwrap_err();
    assert!(err.contains("refusing"), "{err}");
    let r = seed_cmd(&src, &from, "vol@snapshot/s", &state, "vol", "32M").unwrap();
    assert_eq!(r["seeded"], false, "{r}");
}

/// The snapshot export opens on the unix socket of an engine that serves pinned exports only
/// (the operator's pods), read-only, with the snapshot's size; writes are refused; an unknown
/// snapshot is refused with a message naming it.
#[test]
fn the_snapshot_export_opens_on_the_socket_with_pinned_exports_only() {
    let d = tempfile::tempdir().unwrap();
    let e = EngineBuilder::new(d.path())
        .volume("vol")
        .nbd_local_only()
        .start()
        .unwrap();
    let epoch = n(&status(&e), "epoch");
    let pinned = e.unix_uri_for(&format!("vol@{epoch}"));
    qemu_io_ok(&pinned, &["write -P 0x5a 0 8k", "flush"]);
    snap_cli(&e, "create", Some("p1"), None).unwrap();
    qemu_io_ok(&pinned, &["write -P 0x11 0 4k", "flush"]);
    let export = tandem_api::contract::snapshot_export("vol", "p1");
    let uri = e.unix_uri_for(&export);
    let out = Command::new("qemu-io")
        .args([
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0x5a 0 8k",
            "-c",
            "read -P 0 8k 4k",
            &uri,
        ])
        .output()
        .unwrap();
    let (ok, text) = qemu_io_passed(&out);
    assert!(ok, "reading the snapshot export: {text}");
    // The export says it is read-only: a client opening it for writing is refused.
    let (ok, text) = qemu_io_passed(&qemu_io(&uri, &["write -P 1 0 4k"]));
    assert!(!ok, "a write through the snapshot export succeeded: {text}");
    let err = runtime().block_on(async {
        let mut s = tokio::net::UnixStream::connect(e.socket()).await.unwrap();
        storage_engine::nbd::client::handshake_async(&mut s, "vol@snapshot/nope", &[])
            .await
            .unwrap_err()
    });
    assert!(err.to_string().contains("no snapshot \"nope\""), "{err}");
}
