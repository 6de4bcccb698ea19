//! Live move of the secondary with real engine processes (issue 18, seed 002): a move under
//! writes ends byte-identical and cuts over (new writes reach the new engine, not the old one);
//! SIGKILLs of the primary or the new engine at seeded points of a move; AbortMove rolls back, and
//! a takeover is refused while a move runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::*;
use storage_engine::nbd::client::NbdClient;

const M: u64 = 1 << 20;
const SIZE: &str = "32M";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A fresh engine for the move: secondary, empty state dir, its peer the primary.
fn new_engine(dir: &Path, primary: &Engine) -> Engine {
    let token = dir.join("token");
    EngineBuilder::new(dir.join("c"))
        .volume("vol")
        .size(SIZE)
        .role("secondary")
        .nbd_socket()
        .token_file(&token)
        .peer(&primary.grpc)
        .start()
        .unwrap()
}

fn start_move(a: &Engine, to: &Engine) -> String {
    let out = a.control("move", &["--to", &to.grpc, "--no-wait"]);
    out.map(|v| v.to_string())
        .unwrap_or_else(|e| panic!("move --no-wait: {e}\n{}", a.log_tail(20)))
}

/// `tandem-engine move --no-wait` with the running move's target prints its status line.
fn move_line(a: &Engine, to: &str) -> Result<String, String> {
    a.control("move", &["--to", to, "--no-wait"])
        .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
}

fn wait_move_done(a: &Engine, to: &Engine, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match move_line(a, &to.grpc) {
            Ok(l) if l.contains(" DONE ") => return,
            Ok(_) | Err(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "move not done after {secs} s\nprimary:\n{}\nnew engine:\n{}",
            a.log_tail(30),
            to.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the primary has nothing pending to its (new) peer and that peer is consistent.
fn wait_synced_with(a: &Engine, c: &Engine, secs: u64) {
    wait_until(secs, "the primary in sync with the new engine", || {
        let (sa, sc) = (a.status_json(), c.status_json());
        matches!((sa, sc), (Ok(sa), Ok(sc))
            if sa["pending_blocks"] == 0 && sa["pair_state"] == "Synced"
                && sc["pair_state"] == "Consistent" && sa["peer"] == c.grpc.as_str())
    });
}

/// Random writes (and some trims) to the primary until `stop`; reconnects across restarts.
fn writer(uri_addr: String, seed: u64, stop: Arc<AtomicBool>, n: Arc<AtomicU64>) {
    let rt = rt();
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut c) = rt.block_on(NbdClient::connect(&uri_addr, "vol")) else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            let r = next();
            let block = r % (32 * M / 4096 - 16);
            let len = 4096 * (1 + (r >> 20) % 16);
            let res = if r % 13 == 0 {
                rt.block_on(c.trim(block * 4096, len as u32))
            } else {
                let data = pattern(r, len as usize);
                rt.block_on(c.write(block * 4096, &data))
            };
            if res.is_err() {
                break;
            }
            n.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct Writers {
    stop: Arc<AtomicBool>,
    n: Arc<AtomicU64>,
    t: Option<std::thread::JoinHandle<()>>,
}

impl Writers {
    fn start(a: &Engine, seed: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let n = Arc::new(AtomicU64::new(0));
        let t = {
            let (addr, stop, n) = (a.nbd_addr(), Arc::clone(&stop), Arc::clone(&n));
            std::thread::spawn(move || writer(addr, seed, stop, n))
        };
        let w = Self {
            stop,
            n,
            t: Some(t),
        };
        let n0 = w.n.load(Ordering::Relaxed);
        wait_until(30, "writes flowing", || {
            w.n.load(Ordering::Relaxed) > n0 + 20
        });
        w
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.t.take() {
            t.join().unwrap();
        }
        self.n.load(Ordering::Relaxed)
    }
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn identical(a: &Engine, c: &Engine) -> bool {
    std::fs::read(a.data()).unwrap() == std::fs::read(c.data()).unwrap()
}

#[test]
fn a_move_under_writes_ends_identical_and_cuts_over() {
    let d = tempfile::tempdir().unwrap();
    let pair = start_pair(d.path(), SIZE, &[], &[]);
    qemu_io_ok(
        &pair.a.uri(),
        &["write -P 0x11 0 8M", "write -P 0x22 20M 4M"],
    );
    pair.wait_synced(30);
    let c = new_engine(d.path(), &pair.a);
    let w = Writers::start(&pair.a, 7);
    // The CLI waits for the end, printing progress lines.
    let out = pair
        .a
        .control("move", &["--to", &c.grpc])
        .unwrap_or_else(|e| panic!("move: {e}\n{}", pair.a.log_tail(30)));
    let text = out.as_str().map_or_else(|| out.to_string(), str::to_string);
    assert!(text.contains("DONE"), "no DONE line: {text}");
    let writes = w.stop();
    assert!(writes > 20, "too few writes during the move: {writes}");
    wait_synced_with(&pair.a, &c, 30);
    assert!(
        identical(&pair.a, &c),
        "the new secondary's data differs from the primary's"
    );

    // After the cutover: a new write reaches the new engine, not the old one.
    let before_b = std::fs::read(pair.b.data()).unwrap();
    qemu_io_ok(&pair.a.uri(), &["write -P 0x5a 30M 64k"]);
    wait_synced_with(&pair.a, &c, 30);
    assert!(file_block_is(&c.data(), 30 * M / 4096, 0x5a));
    assert!(!file_block_is(&pair.b.data(), 30 * M / 4096, 0x5a));
    assert_eq!(
        &std::fs::read(pair.b.data()).unwrap()[..],
        &before_b[..],
        "the released old secondary still got writes"
    );
    // Done is final: an abort is refused, and the phase metric says so.
    let err = pair.a.control("move", &["--abort"]).unwrap_err();
    assert!(err.contains("MoveCompleted"), "{err}");
}

/// Sync mode: writes below the watermark wait for the new engine too; the move ends identical.
#[test]
fn a_sync_mode_move_under_writes_ends_identical() {
    let d = tempfile::tempdir().unwrap();
    let sync = ["--replication", "sync"];
    let pair = start_pair(d.path(), SIZE, &sync, &sync);
    qemu_io_ok(&pair.a.uri(), &["write -P 0x11 0 8M"]);
    let c = new_engine(d.path(), &pair.a);
    let w = Writers::start(&pair.a, 11);
    pair.a
        .control("move", &["--to", &c.grpc])
        .unwrap_or_else(|e| panic!("move: {e}\n{}", pair.a.log_tail(30)));
    w.stop();
    wait_synced_with(&pair.a, &c, 30);
    assert!(identical(&pair.a, &c));
    assert_eq!(
        status(&pair.a)["sync_timeouts"],
        0,
        "{}",
        pair.a.log_tail(20)
    );
}

/// A restart of the primary after the cutover keeps replicating to the new engine, even with the
/// old `--peer`: the persisted move wins.
#[test]
fn a_restarted_primary_keeps_the_moved_secondary() {
    let d = tempfile::tempdir().unwrap();
    let mut pair = start_pair(d.path(), SIZE, &[], &[]);
    qemu_io_ok(&pair.a.uri(), &["write -P 0x33 0 4M"]);
    let c = new_engine(d.path(), &pair.a);
    pair.a.control("move", &["--to", &c.grpc]).unwrap();
    pair.a.restart().unwrap();
    qemu_io_ok(&pair.a.uri(), &["write -P 0x44 12M 1M"]);
    wait_synced_with(&pair.a, &c, 30);
    assert!(identical(&pair.a, &c));
    assert!(pair.a.log().contains("persisted move wins"));
}

#[test]
fn abort_rolls_back_and_a_takeover_is_refused_while_moving() {
    let d = tempfile::tempdir().unwrap();
    let pair = start_linked(d.path(), SIZE, &[], &[]);
    qemu_io_ok(&pair.a.uri(), &["write -P 0x11 0 8M"]);
    pair.wait_synced(30);
    let mut c = new_engine(d.path(), &pair.a);
    // The new engine stopped: the move cannot finish.
    c.stop().unwrap();
    start_move(&pair.a, &c);
    let err = pair.b.control("takeover", &[]).unwrap_err();
    assert!(err.contains("MoveInProgress"), "{err}");
    let out = pair.a.control("move", &["--abort"]).unwrap();
    assert!(out.to_string().contains("ABORTED"), "{out}");
    c.cont().unwrap();
    // The old secondary is still the one replicated to.
    qemu_io_ok(&pair.a.uri(), &["write -P 0x66 16M 1M"]);
    pair.wait_synced(30);
    assert!(pair.files_identical());
    assert!(!file_block_is(&c.data(), 16 * M / 4096, 0x66));
    assert_eq!(status(&pair.a)["peer"], pair.b.grpc.as_str());
}

/// SIGKILL of the primary or of the new engine at a seeded point of a move under writes; the
/// killed one restarts, the move finishes, and the primary and the new engine end identical.
/// `TANDEM_MOVE_KILLS` sets the number of rounds (2 by default).
#[test]
fn kills_during_a_move_end_identical() {
    let rounds: u64 = std::env::var("TANDEM_MOVE_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let seed: u64 = std::env::var("TANDEM_MOVE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    for round in 0..rounds {
        let r = splitmix(seed.wrapping_add(round));
        let kill_primary = (r >> 7) % 2 == 0;
        let delay = Duration::from_millis(20 + (r >> 11) % 200);
        eprintln!(
            "round {round}: kill {}, after {delay:?}",
            if kill_primary {
                "primary"
            } else {
                "new engine"
            }
        );
        let d = tempfile::tempdir().unwrap();
        let mut pair = start_pair(d.path(), SIZE, &[], &[]);
        qemu_io_ok(
            &pair.a.uri(),
            &["write -P 0x11 0 12M", "write -P 0x12 24M 4M"],
        );
        let mut c = new_engine(d.path(), &pair.a);
        let w = Writers::start(&pair.a, r);
        start_move(&pair.a, &c);
        // The kill point is a time into the move, seeded: it lands anywhere from the copy's
        // start to after the cutover.
        std::thread::sleep(delay);
        eprintln!("  at the kill: {:?}", move_line(&pair.a, &c.grpc));
        if kill_primary {
            pair.a.restart().unwrap();
        } else {
            c.restart().unwrap();
        }
        // A few more writes after the restart, then the move must finish.
        std::thread::sleep(Duration::from_millis(100));
        w.stop();
        wait_move_done(&pair.a, &c, 60);
        wait_synced_with(&pair.a, &c, 60);
        assert!(
            identical(&pair.a, &c),
            "round {round}: the new secondary differs from the primary\nprimary:\n{}\nnew:\n{}",
            pair.a.log_tail(30),
            c.log_tail(30)
        );
    }
}
