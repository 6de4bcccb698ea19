//! Liveness of the peer link (issue 11): a peer that vanishes without FIN or RST (a dead node, a
//! blackholed network, a stopped process) is noticed within `--peer-timeout-ms`, replication
//! resumes by itself once the peer is back, and sync mode reports when writes stand on one copy.
//!
//! "Silent" failures without root come from a TCP relay between the engines that can swallow
//! everything (sockets kept open, nothing forwarded, no FIN, no RST) and from SIGSTOP; with root
//! and `ip netns`, one test also drops one direction of a veth link between two namespaces.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use common::*;
use storage_engine::nbd::client::NbdClient;

/// Slack for polling a status over the CLI on a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(1500);

const DEGRADED: &str = "tandem_sync_degraded{volume=\"vol\"}";

/// A TCP relay: forwards while healthy; blackholed, it swallows every byte in both directions
/// and keeps every socket open. Connections from before a `heal` stay swallowed forever, as those
/// of a node that died: only new connections are forwarded again.
struct Relay {
    addr: String,
    black: Arc<AtomicBool>,
    era: Arc<AtomicU64>,
    listener: Option<TcpListener>,
}

impl Relay {
    /// Listens at once; connections wait in the backlog until `forward_to` names the target.
    fn bind() -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        Relay {
            addr: l.local_addr().unwrap().to_string(),
            black: Arc::new(AtomicBool::new(false)),
            era: Arc::new(AtomicU64::new(0)),
            listener: Some(l),
        }
    }

    fn forward_to(&mut self, target: &str) {
        let l = self.listener.take().unwrap();
        // Sockets of dead connections, held open so their peers never see a FIN or a RST.
        let graveyard = Arc::new(Mutex::new(Vec::new()));
        let (b, e, g, target) = (
            Arc::clone(&self.black),
            Arc::clone(&self.era),
            Arc::clone(&graveyard),
            target.to_string(),
        );
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { continue };
                let my_era = e.load(Ordering::SeqCst);
                if b.load(Ordering::SeqCst) {
                    // Accepted, never answered: like a host that stopped mid-handshake.
                    g.lock().unwrap().push(c);
                    continue;
                }
                let Ok(t) = TcpStream::connect(&target) else {
                    continue;
                };
                let _ = c.set_nodelay(true);
                let _ = t.set_nodelay(true);
                for (from, to) in [(c.try_clone().unwrap(), t.try_clone().unwrap()), (t, c)] {
                    let (b, e, g) = (Arc::clone(&b), Arc::clone(&e), Arc::clone(&g));
                    std::thread::spawn(move || pump(from, to, my_era, &b, &e, &g));
                }
            }
        });
    }

    fn blackhole(&self) {
        self.black.store(true, Ordering::SeqCst);
    }

    /// The network is back; the connections cut before stay dead.
    fn heal(&self) {
        self.era.fetch_add(1, Ordering::SeqCst);
        self.black.store(false, Ordering::SeqCst);
    }
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    era: u64,
    black: &AtomicBool,
    now: &AtomicU64,
    graveyard: &Mutex<Vec<TcpStream>>,
) {
    let alive = || !black.load(Ordering::SeqCst) && now.load(Ordering::SeqCst) == era;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Swallowed: the sender's TCP sees its bytes delivered, the receiver sees nothing.
        if alive() && to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    if alive() {
        let _ = to.shutdown(Shutdown::Write);
    } else {
        // A dead node sends no FIN: keep the other side's socket open for good.
        graveyard.lock().unwrap().push(to);
    }
}

/// A pair whose primary reaches its secondary through `relay`.
fn relayed_pair(dir: &Path, extra_p: &[&str], extra_s: &[&str]) -> (Pair, Relay) {
    let mut relay = Relay::bind();
    let pair = pair_builder(dir, "16M", extra_p, extra_s)
        .a(|e| e.peer(&relay.addr))
        .start()
        .unwrap();
    relay.forward_to(&pair.b.grpc);
    (pair, relay)
}

/// Writes through NBD, one request per (offset, data); returns how long each took.
fn nbd_writes(addr: &str, writes: &[(u64, Vec<u8>)], flush: bool) -> Vec<Duration> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = NbdClient::connect(addr, "vol").await.unwrap();
        let mut took = Vec::new();
        for (off, data) in writes {
            let t = Instant::now();
            c.write(*off, data).await.unwrap();
            took.push(t.elapsed());
        }
        if flush {
            let t = Instant::now();
            c.flush().await.unwrap();
            took.push(t.elapsed());
        }
        let _ = c.disconnect().await;
        took
    })
}

/// Polls `status` until `peer_connected` is false; returns how long that took.
fn until_disconnected(
    what: &str,
    limit: Duration,
    status: impl Fn() -> serde_json::Value,
) -> Duration {
    let t = Instant::now();
    loop {
        let st = status();
        if st["peer_connected"] == false {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < limit,
            "{what} still reports peer_connected after {:?}: {st}",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The reviewer's case: the primary's node dies without FIN or RST and comes back. Replication
/// resumes without restarting the secondary: the returning primary's stream supersedes the dead
/// one at once (before: it waited behind it forever, and nothing was replicated again).
#[test]
fn silent_primary_death_then_return_resumes_replication() {
    let d = tempfile::tempdir().unwrap();
    // The secondary's own deadline is far away: only superseding the dead stream gets the
    // returning primary through within the wait below.
    let (mut pair, relay) = relayed_pair(
        d.path(),
        &["--peer-timeout-ms", "2000"],
        &["--peer-timeout-ms", "60000"],
    );
    pair.wait_synced(20);
    let a = pattern(1, 64 << 10);
    nbd_writes(&pair.a.nbd, &[(0, a.clone())], false);
    pair.wait_synced(20);

    // The node dies: its sockets go silent, the secondary's end stays open.
    relay.blackhole();
    pair.a.kill();
    relay.heal();
    let secondary_pid = pair.b.pid().unwrap();
    pair.a.restart().unwrap();

    let b = pattern(2, 128 << 10);
    nbd_writes(&pair.a.nbd, &[(32 << 10, b.clone())], false);
    pair.wait_synced(15);
    let mut want = a;
    want.truncate(32 << 10);
    want.extend_from_slice(&b);
    assert_eq!(
        file_bytes(&pair.b.data(), 0, want.len()),
        want,
        "the secondary holds what was written"
    );
    assert!(pair.files_identical());
    assert_eq!(pair.b.pid().unwrap(), secondary_pid);
}

/// A blackholed link (default --peer-timeout-ms, 6 s) reads down on both sides within the bound,
/// and replication resumes when the network is back, without restarting either engine.
#[test]
fn blackholed_link_is_detected_and_heals() {
    let d = tempfile::tempdir().unwrap();
    let (pair, relay) = relayed_pair(d.path(), &[], &[]);
    pair.wait_synced(20);
    nbd_writes(&pair.a.nbd, &[(0, pattern(3, 16 << 10))], false);
    pair.wait_synced(20);
    assert_eq!(status(&pair.b)["peer_connected"], true);

    let bound = Duration::from_millis(6000);
    relay.blackhole();
    let t0 = Instant::now();
    let tp = until_disconnected("primary", bound + SLACK, || status(&pair.a));
    let ts = until_disconnected("secondary", bound + SLACK - tp, || status(&pair.b));
    eprintln!(
        "blackhole detected: primary after {tp:?}, secondary after {:?} (bound {bound:?})",
        t0.elapsed()
    );
    assert_eq!(status(&pair.a)["pair_state"], "Connecting");
    let _ = ts;

    // Written while cut off: kept in the table, sent once the link is back.
    let c = pattern(4, 256 << 10);
    nbd_writes(&pair.a.nbd, &[(1 << 20, c.clone())], false);
    assert!(status(&pair.a)["pending_blocks"].as_u64().unwrap() > 0);
    relay.heal();
    pair.wait_synced(20);
    assert_eq!(file_bytes(&pair.b.data(), 1 << 20, c.len()), c);
    assert!(pair.files_identical());
}

/// Sync mode with a blackholed secondary: the first write waits at most the peer timeout (not the
/// 5 s sync timeout), later writes do not wait at all, and status and metrics say the pair is
/// degraded until the secondary has caught up.
#[test]
fn sync_mode_blackholed_peer_reports_degraded() {
    let d = tempfile::tempdir().unwrap();
    let metrics = free_port();
    let t = ["--peer-timeout-ms", "2000"];
    // Leases off: the automatic fallback to one copy is the behaviour without a witness; with
    // leases it needs the witness's consent (`tests/lease.rs`
    // `sync_mode_falls_back_only_with_the_witness_consent`).
    let (pair, relay) = relayed_pair(
        d.path(),
        &[
            "--replication",
            "sync",
            "--peer-timeout-ms",
            "2000",
            "--metrics-listen",
            &metrics,
            "--lease-ms",
            "0",
        ],
        &t,
    );
    pair.wait_synced(20);
    let took = nbd_writes(&pair.a.nbd, &[(0, pattern(5, 4096))], true);
    assert!(took.iter().all(|t| *t < Duration::from_secs(2)), "{took:?}");
    let st = status(&pair.a);
    assert_eq!(st["sync_degraded"], false, "{st}");
    assert_eq!(sample(&scrape(&metrics), DEGRADED), Some(0.0));

    relay.blackhole();
    let writes: Vec<(u64, Vec<u8>)> = (0..6u64)
        .map(|i| ((i + 1) * 8192, pattern(10 + i, 4096)))
        .collect();
    let took = nbd_writes(&pair.a.nbd, &writes, true);
    eprintln!("sync writes while blackholed: {took:?}");
    // The first waits until the link is known dead (the peer timeout), the rest not at all.
    assert!(took[0] < Duration::from_millis(2000) + SLACK, "{took:?}");
    let total: Duration = took[1..].iter().sum();
    assert!(
        total < Duration::from_secs(2),
        "later writes waited: {took:?}"
    );

    let st = status(&pair.a);
    assert_eq!(st["peer_connected"], false, "{st}");
    assert_eq!(st["sync_degraded"], true, "{st}");
    assert!(st["sync_timeouts"].as_u64().unwrap() >= 7, "{st}");
    assert!(
        st["condition"].as_str().unwrap().starts_with("Degraded"),
        "{st}"
    );
    let m = scrape(&metrics);
    assert_eq!(sample(&m, DEGRADED), Some(1.0), "{m}");
    assert!(
        sample(&m, "tandem_sync_timeouts_total{volume=\"vol\"}").unwrap() >= 7.0,
        "{m}"
    );

    relay.heal();
    pair.wait_synced(20);
    wait_until(10, "degraded state cleared", || {
        status(&pair.a)["sync_degraded"] == false
    });
    let st = status(&pair.a);
    assert_eq!(st["condition"], "", "{st}");
    assert_eq!(sample(&scrape(&metrics), DEGRADED), Some(0.0));
    for (off, data) in &writes {
        assert_eq!(&file_bytes(&pair.b.data(), *off, data.len()), data);
    }
    // Mirrored again: a write waits for the peer and is acknowledged by it.
    let took = nbd_writes(&pair.a.nbd, &[(1 << 20, pattern(20, 4096))], true);
    assert!(took.iter().all(|t| *t < Duration::from_secs(2)), "{took:?}");
    assert_eq!(status(&pair.a)["sync_degraded"], false);
    assert_eq!(file_bytes(&pair.b.data(), 1 << 20, 4096), pattern(20, 4096));
}

/// A stopped process (SIGSTOP: its kernel still acknowledges TCP) on either side: the other side
/// reports the link down within the bound, and replication resumes after SIGCONT.
#[test]
fn stopped_peer_is_detected_and_resumes() {
    let d = tempfile::tempdir().unwrap();
    let t = ["--peer-timeout-ms", "2000"];
    let mut pair = start_pair(d.path(), "16M", &t, &t);
    pair.wait_synced(20);
    let bound = Duration::from_millis(2000);

    pair.b.stop().unwrap();
    let tp = until_disconnected("primary", bound + SLACK, || status(&pair.a));
    eprintln!("stopped secondary detected after {tp:?}");
    let a = pattern(30, 64 << 10);
    nbd_writes(&pair.a.nbd, &[(0, a.clone())], false);
    pair.b.cont().unwrap();
    pair.wait_synced(20);
    assert_eq!(file_bytes(&pair.b.data(), 0, a.len()), a);

    pair.a.stop().unwrap();
    let ts = until_disconnected("secondary", bound + SLACK, || status(&pair.b));
    eprintln!("stopped primary detected after {ts:?}");
    pair.a.cont().unwrap();
    let b = pattern(31, 64 << 10);
    nbd_writes(&pair.a.nbd, &[(1 << 20, b.clone())], false);
    pair.wait_synced(20);
    assert_eq!(file_bytes(&pair.b.data(), 1 << 20, b.len()), b);
    assert!(pair.files_identical());
}

/// Two network namespaces joined by a veth; one direction at a time is dropped (a pfifo qdisc of
/// length 0 on one end's egress, or iptables when present). Needs root and `ip netns`; skipped
/// with a printed reason otherwise.
#[test]
fn netns_one_way_blackhole_is_detected_and_heals() {
    let Some(net) = Netns::create() else { return };
    let d = tempfile::tempdir().unwrap();
    let p_grpc = format!("{}:9600", net.ip_a);
    let s_grpc = format!("{}:9600", net.ip_b);
    let pair = Pair::builder(d.path())
        .token(&format!("{TOKEN}\n"))
        .args(&["--peer-timeout-ms", "2000"])
        .a(|e| {
            e.netns(&net.a)
                .nbd_socket()
                .grpc_listen(&p_grpc)
                .peer(&s_grpc)
        })
        .b(|e| {
            e.netns(&net.b)
                .nbd_socket()
                .grpc_listen(&s_grpc)
                .peer(&p_grpc)
        })
        .start()
        .unwrap();
    pair.wait_synced(20);
    let bound = Duration::from_millis(2000);
    for (round, (dev_ns, dev, label)) in [
        (&net.b, &net.veth_b, "secondary to primary"),
        (&net.a, &net.veth_a, "primary to secondary"),
    ]
    .into_iter()
    .enumerate()
    {
        net.drop_egress(dev_ns, dev, true);
        let tp = until_disconnected("primary", bound + SLACK, || status(&pair.a));
        let ts = until_disconnected("secondary", bound + SLACK, || status(&pair.b));
        eprintln!("netns: {label} dropped; primary down after {tp:?}, secondary then after {ts:?}");
        // Written while cut off: replicated once the link is back.
        let (byte, off) = (0x5a + round as u64, (2 + round as u64) << 20);
        qemu_io_ok(
            &pair.a.unix_uri(),
            &[&format!("write -P {byte} {off} 128k")],
        );
        net.drop_egress(dev_ns, dev, false);
        pair.wait_synced(30);
        assert!(file_block_is(&pair.b.data(), off / 4096, byte as u8));
        assert!(pair.files_identical());
    }
}

/// Two namespaces joined by a veth pair, removed on drop.
struct Netns {
    a: String,
    b: String,
    veth_a: String,
    veth_b: String,
    ip_a: String,
    ip_b: String,
    iptables: bool,
}

impl Netns {
    fn create() -> Option<Netns> {
        let id = std::process::id();
        let (a, b) = (format!("tlk{id}a"), format!("tlk{id}b"));
        let ok = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        };
        if !ok(&["netns", "add", &a]) {
            eprintln!("SKIP netns test: `ip netns add` failed (needs root and iproute2)");
            return None;
        }
        let net = Netns {
            a: a.clone(),
            b: b.clone(),
            veth_a: format!("tv{}a", id % 100_000),
            veth_b: format!("tv{}b", id % 100_000),
            ip_a: format!("10.231.{}.1", id % 250),
            ip_b: format!("10.231.{}.2", id % 250),
            iptables: false,
        };
        let sub = |ip: &str| format!("{ip}/24");
        let steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), b.clone()],
            vec![
                "link".into(),
                "add".into(),
                net.veth_a.clone(),
                "netns".into(),
                a.clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                net.veth_b.clone(),
                "netns".into(),
                b.clone(),
            ],
            vec![
                "-n".into(),
                a.clone(),
                "addr".into(),
                "add".into(),
                sub(&net.ip_a),
                "dev".into(),
                net.veth_a.clone(),
            ],
            vec![
                "-n".into(),
                b.clone(),
                "addr".into(),
                "add".into(),
                sub(&net.ip_b),
                "dev".into(),
                net.veth_b.clone(),
            ],
            vec![
                "-n".into(),
                a.clone(),
                "link".into(),
                "set".into(),
                net.veth_a.clone(),
                "up".into(),
            ],
            vec![
                "-n".into(),
                b.clone(),
                "link".into(),
                "set".into(),
                net.veth_b.clone(),
                "up".into(),
            ],
            vec![
                "-n".into(),
                a.clone(),
                "link".into(),
                "set".into(),
                "lo".into(),
                "up".into(),
            ],
            vec![
                "-n".into(),
                b.clone(),
                "link".into(),
                "set".into(),
                "lo".into(),
                "up".into(),
            ],
        ];
        for s in &steps {
            let args: Vec<&str> = s.iter().map(String::as_str).collect();
            if !ok(&args) {
                eprintln!("SKIP netns test: `ip {}` failed", args.join(" "));
                return None;
            }
        }
        let mut net = net;
        // iptables where it exists; otherwise a zero-length pfifo drops everything leaving a device.
        net.iptables = Command::new("ip")
            .args(["netns", "exec", &a, "iptables", "-L", "-n"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !net.iptables && !net.try_pfifo() {
            eprintln!(
                "SKIP netns test: neither iptables nor `tc qdisc ... pfifo limit 0` works here"
            );
            return None;
        }
        Some(net)
    }

    fn try_pfifo(&self) -> bool {
        let ok = self.tc(
            &self.a,
            &[
                "qdisc",
                "replace",
                "dev",
                &self.veth_a,
                "root",
                "pfifo",
                "limit",
                "0",
            ],
        );
        ok && self.tc(&self.a, &["qdisc", "del", "dev", &self.veth_a, "root"])
    }

    fn tc(&self, ns: &str, args: &[&str]) -> bool {
        let mut a = vec!["netns", "exec", ns, "tc"];
        a.extend_from_slice(args);
        run("ip", &a).status.success()
    }

    /// Drops (or lets through again) everything `dev` in `ns` sends: one direction only.
    fn drop_egress(&self, ns: &str, dev: &str, on: bool) {
        if self.iptables {
            let op = if on { "-A" } else { "-D" };
            run_ok(
                "ip",
                &[
                    "netns", "exec", ns, "iptables", op, "OUTPUT", "-o", dev, "-j", "DROP",
                ],
            );
        } else if on {
            assert!(self.tc(
                ns,
                &["qdisc", "replace", "dev", dev, "root", "pfifo", "limit", "0"]
            ));
        } else {
            assert!(self.tc(ns, &["qdisc", "del", "dev", dev, "root"]));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.a]);
        let _ = run("ip", &["netns", "del", &self.b]);
    }
}
