//! The partition campaign: each engine of the pair in its own network namespace, joined by a veth
//! link; the history clients write and read through the serving engine's unix socket while a
//! nemesis cycles through network failures that give no FIN and no RST:
//! - a full blackhole of the link (both ends drop everything they send), during which a
//!   `takeover --policy wait` must be refused with HandoffBlocked and promote nobody;
//! - an asymmetric drop (one end drops what it sends);
//! - a SIGSTOP of either engine;
//! - a node "reboot": the namespace's link goes down, the engine is SIGKILLed and its orphaned
//!   sockets destroyed (`ss -K`) so nothing it had open ever sends a FIN, then the link comes back
//!   and the engine restarts;
//! - the primary's node rebooting (two thirds of the time after building a backlog over a
//!   throttled or a silent link) while the secondary is promoted with `--policy force`: the
//!   returning old primary must step down, and only the blocks the promotion reported lost may
//!   lose acknowledged writes (the checker accounts for them as reported losses);
//! - a blackhole with both engines up and the secondary promoted by force: the old primary keeps
//!   serving the clients pinned to it (hosts on its node) while the others follow the volume; it
//!   must stop acknowledging when its lease runs out (`checker::check_leases`: no acknowledgement
//!   after the latest renewal it could have had + the lease), and step down and resync at the heal.
//!
//! The engines run with a write lease (`--lease-ms`), and a witness (`crate::witness`) grants it
//! to a primary its peer no longer renews, as the operator does. A forced round first stops the
//! witness granting the old primary and promotes no earlier than its last grant + the guard;
//! the engine itself waits out its own promise (a `LeaseHeld` answer is retried and counted).
//!
//! Per partition it measures how long each side takes to report `peer_connected: false` (bound:
//! `--peer-timeout-ms` + 1 s), checks that sync mode reports its degradation while cut off, and
//! after healing that the pair converges again without restarting the engine that stayed up.
//! Drops come from a zero-length pfifo qdisc on a device's egress (no netem or iptables needed).

use std::{
    collections::BTreeMap,
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context, Result};
use tandem_api::Reason;
use tandem_testkit::{refusal_reason, Pair};

use crate::{
    checker::{self, Fence, Loss},
    client::{self, Shared, Stats},
    cluster::{self, Compared, VOLUME},
    history::{ms, Op, Time},
    prng::Rng,
    stamp::SECTOR,
    witness::{self, Witness},
    Common, Mode,
};

/// Two namespaces joined by a veth pair; deleted on drop.
struct Net {
    ns: [String; 2],
    dev: [String; 2],
    ip: [String; 2],
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Net {
    /// Sets up the namespaces, or says why it cannot (not root, no iproute2, no pfifo qdisc).
    fn create() -> Result<Net, String> {
        let id = std::process::id();
        let net = Net {
            ns: [format!("tcp{id}a"), format!("tcp{id}b")],
            dev: [
                format!("tcv{}a", id % 100_000),
                format!("tcv{}b", id % 100_000),
            ],
            ip: [
                format!("10.232.{}.1", id % 250),
                format!("10.232.{}.2", id % 250),
            ],
        };
        ip(&["netns", "add", &net.ns[0]])
            .map_err(|e| format!("{e} (network namespaces need root and iproute2)"))?;
        // From here on, Drop removes whatever was made.
        ip(&["netns", "add", &net.ns[1]])?;
        ip(&[
            "link",
            "add",
            &net.dev[0],
            "netns",
            &net.ns[0],
            "type",
            "veth",
            "peer",
            "name",
            &net.dev[1],
            "netns",
            &net.ns[1],
        ])?;
        for i in 0..2 {
            let addr = format!("{}/24", net.ip[i]);
            ip(&["-n", &net.ns[i], "addr", "add", &addr, "dev", &net.dev[i]])?;
            ip(&["-n", &net.ns[i], "link", "set", &net.dev[i], "up"])?;
            ip(&["-n", &net.ns[i], "link", "set", "lo", "up"])?;
        }
        net.drop_egress(0, true)
            .and_then(|()| net.drop_egress(0, false))
            .map_err(|e| format!("no zero-length pfifo qdisc to drop packets with: {e}"))?;
        Ok(net)
    }

    fn exec(&self, i: usize, args: &[&str]) -> Result<(), String> {
        let mut a = vec!["netns", "exec", &self.ns[i]];
        a.extend_from_slice(args);
        ip(&a)
    }

    /// Drops everything engine `i`'s end of the link sends (a pfifo queue of length 0), or lets
    /// it through again: one direction of the link, silently.
    fn drop_egress(&self, i: usize, on: bool) -> Result<(), String> {
        let dev = self.dev[i].as_str();
        if on {
            self.exec(
                i,
                &[
                    "tc", "qdisc", "replace", "dev", dev, "root", "pfifo", "limit", "0",
                ],
            )
        } else {
            self.exec(i, &["tc", "qdisc", "del", "dev", dev, "root"])
        }
    }

    fn link(&self, i: usize, up: bool) -> Result<(), String> {
        ip(&[
            "-n",
            &self.ns[i],
            "link",
            "set",
            &self.dev[i],
            if up { "up" } else { "down" },
        ])
    }

    /// Destroys every TCP socket left in namespace `i` (a dead engine's orphans, which would
    /// otherwise send their FIN once the link is back).
    fn kill_sockets(&self, i: usize) -> Result<(), String> {
        self.exec(i, &["ss", "-t", "-a", "-K"])
    }

    /// Everything passes again (errors ignored: most of it is already so).
    fn heal(&self) {
        for i in 0..2 {
            let _ = self.link(i, true);
            let _ = self.drop_egress(i, false);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Blackhole,
    OneWay,
    Stop,
    Reboot,
    Forced,
    BlackholeForced,
}

/// The nemesis cycles through these in order (victims and timings drawn from the seed); both
/// forced kinds come within the first five, the rounds of a CI run.
const CYCLE: [Fault; 6] = [
    Fault::Blackhole,
    Fault::OneWay,
    Fault::BlackholeForced,
    Fault::Stop,
    Fault::Forced,
    Fault::Reboot,
];

#[derive(Debug, Default)]
struct Counts {
    rounds: u64,
    /// Partitions by kind ("blackhole", "oneway A->B", "stop B", "reboot A", "forced A", ...).
    kinds: BTreeMap<String, u64>,
    /// Max detection time per (kind, side that detected), milliseconds.
    detect_ms: BTreeMap<String, u64>,
    detections: u64,
    detect_max_ms: u64,
    resumes: u64,
    resume_max_ms: u64,
    degraded_seen: u64,
    wait_blocked: u64,
    forced: u64,
    /// Forced takeovers refused because the secondary was mid-resync (Inconsistent).
    force_refused_torn: u64,
    lost_blocks_reported: u64,
    kills: u64,
    stops: u64,
    /// Forced takeovers answered LeaseHeld (the engine's own promise outlasted the timeout), retried.
    lease_held: u64,
    /// Rounds after which both replicas were compared (identical) with nothing in flight.
    compared: u64,
}

struct Nemesis<'a> {
    pair: &'a mut Pair,
    net: &'a Net,
    rng: Rng,
    sh: &'a Shared,
    sync: bool,
    /// Detection bound: `--peer-timeout-ms` + 1 s.
    bound: Duration,
    witness: &'a Witness,
    /// The engines' `--lease-ms`.
    lease: Duration,
    /// Clients (bit mask) pinned to the old primary in a blackhole + forced round.
    pinned: u64,
    /// Old primaries fenced by a blackhole + forced round (checked by `checker::check_leases`).
    fences: Vec<Fence>,
    /// The kind of the current round.
    kinds_last: String,
    /// The replicas differed at the last comparison.
    diverged: bool,
    counts: Counts,
    losses: Vec<Loss>,
    /// The engine a forced promotion made primary this round: once the old primary has returned
    /// and stepped down, its `lost_blocks` also counts what that one had acknowledged unsent.
    recount: Option<usize>,
    log: Vec<(Time, String)>,
    problems: Vec<String>,
    /// Safety findings outside the history: the replicas differing once the pair converged.
    divergences: Vec<String>,
}

fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

impl Nemesis<'_> {
    fn note(&mut self, what: String) {
        self.log.push((self.sh.now(), what));
    }

    fn problem(&mut self, what: String) {
        self.note(format!("PROBLEM: {what}"));
        self.problems.push(what);
    }

    fn divergence(&mut self, what: String) {
        self.note(format!("DIVERGENCE: {what}"));
        self.divergences.push(what);
    }

    fn net_step(&mut self, what: &str, r: Result<(), String>) -> Result<()> {
        r.map_err(|e| anyhow::anyhow!("{what}: {e}"))
    }

    /// Polls `sides` until each reports `peer_connected: false`; a side that takes longer than
    /// the bound is a problem. Returns when all did, or a few seconds past the bound.
    fn detect(&mut self, kind: &str, t0: Instant, sides: &[usize]) {
        let mut left: Vec<usize> = sides.to_vec();
        let give_up = self.bound + Duration::from_secs(4);
        while !left.is_empty() && t0.elapsed() < give_up {
            let mut i = 0;
            while i < left.len() {
                let side = left[i];
                let down = self.pair[side]
                    .status_json()
                    .is_ok_and(|s| s["peer_connected"] == false);
                if down {
                    let took = t0.elapsed();
                    let t = took.as_millis() as u64;
                    let key = format!("{kind}: {} sees it", Pair::label(side));
                    let e = self.counts.detect_ms.entry(key).or_default();
                    *e = (*e).max(t);
                    self.counts.detect_max_ms = self.counts.detect_max_ms.max(t);
                    self.counts.detections += 1;
                    self.note(format!(
                        "{} reports peer_connected false after {t} ms",
                        Pair::label(side)
                    ));
                    if took > self.bound {
                        self.problem(format!(
                            "{kind}: {} took {t} ms to report the peer down (bound {} ms)",
                            Pair::label(side),
                            self.bound.as_millis()
                        ));
                    }
                    left.remove(i);
                } else {
                    i += 1;
                }
            }
            sleep_ms(20);
        }
        for side in left {
            self.problem(format!(
                "{kind}: {} still reports the peer connected after {} ms (bound {} ms)",
                Pair::label(side),
                t0.elapsed().as_millis(),
                self.bound.as_millis()
            ));
        }
    }

    /// Sync mode, while the secondary is cut off: the primary must say its writes stand alone.
    fn expect_degraded(&mut self, kind: &str, p: usize) {
        if !self.sync {
            return;
        }
        let t = Instant::now();
        loop {
            let st = self.pair[p].status_json();
            if let Ok(s) = &st {
                let cond = s["condition"].as_str().unwrap_or("");
                if s["sync_degraded"] == true && s["condition_reason"] == "Degraded" {
                    self.counts.degraded_seen += 1;
                    self.note(format!("{} reports: {cond}", Pair::label(p)));
                    return;
                }
            }
            if t.elapsed() > self.bound {
                let msg = format!(
                    "{kind}: sync-mode primary {} does not report its degradation: {}",
                    Pair::label(p),
                    st.map_or_else(|e| e, |v| v.to_string())
                );
                self.problem(msg);
                return;
            }
            sleep_ms(50);
        }
    }

    /// `takeover --policy wait` on the cut-off secondary: refused as HandoffBlocked, nobody
    /// promoted, the primary still primary.
    fn wait_takeover_blocked(&mut self, p: usize, s: usize) {
        self.note(format!(
            "takeover --policy wait on {} while partitioned",
            Pair::label(s)
        ));
        match self.pair[s].control("takeover", &["--policy", "wait", "--timeout", "2"]) {
            Ok(r) => self.problem(format!(
                "takeover --policy wait promoted {} across a partition: {r}",
                Pair::label(s)
            )),
            Err(e) if refusal_reason(&e) == Some(Reason::HandoffBlocked) => {
                self.counts.wait_blocked += 1;
                self.note(format!("refused as expected: {e}"));
            }
            Err(e) => self.problem(format!(
                "takeover --policy wait across a partition: expected HandoffBlocked, got: {e}"
            )),
        }
        for (i, role) in [(p, "primary"), (s, "secondary")] {
            match self.pair[i].status_json() {
                Ok(st) if st["role"] == role => {}
                other => {
                    let msg = format!(
                        "after the blocked takeover {} should be {role}: {}",
                        Pair::label(i),
                        other.map_or_else(|e| e, |v| v.to_string())
                    );
                    self.problem(msg);
                }
            }
        }
    }

    /// The node of engine `v` goes down: link down, process SIGKILLed, its sockets destroyed
    /// without a packet leaving. Returns when the engine stopped serving.
    fn node_down(&mut self, v: usize) -> Result<Time> {
        let r = self.net.link(v, false);
        self.net_step("link down", r)?;
        self.pair[v].kill();
        let cut = self.sh.now();
        self.counts.kills += 1;
        let r = self.net.kill_sockets(v);
        self.net_step("destroying the dead node's sockets", r)?;
        self.note(format!(
            "node of {} down (link down, SIGKILL)",
            Pair::label(v)
        ));
        Ok(cut)
    }

    fn node_up(&mut self, v: usize) -> Result<()> {
        // A drop left from before the reboot goes with it (there may be none).
        let _ = self.net.drop_egress(v, false);
        let r = self.net.link(v, true);
        self.net_step("link up", r)?;
        self.pair[v].restart()?;
        self.note(format!("node of {} back, engine restarted", Pair::label(v)));
        Ok(())
    }

    fn count(&mut self, kind: String) {
        self.note(format!("partition: {kind}"));
        self.kinds_last = kind.clone();
        *self.counts.kinds.entry(kind).or_default() += 1;
    }

    fn round(&mut self, fault: Fault) -> Result<()> {
        let Some(p) = self.pair.serving() else {
            self.problem("nobody serves at the start of a round".into());
            return Ok(());
        };
        let s = 1 - p;
        let pids = [self.pair[0].pid(), self.pair[1].pid()];
        let mut restarted = None;
        let t0;
        match fault {
            Fault::Blackhole => {
                let kind = "blackhole".to_string();
                self.count(kind.clone());
                for i in 0..2 {
                    let r = self.net.drop_egress(i, true);
                    self.net_step("blackhole", r)?;
                }
                t0 = Instant::now();
                self.detect(&kind, t0, &[p, s]);
                self.expect_degraded(&kind, p);
                self.wait_takeover_blocked(p, s);
                sleep_ms(self.rng.below(500));
                for i in 0..2 {
                    let r = self.net.drop_egress(i, false);
                    self.net_step("healing the blackhole", r)?;
                }
            }
            Fault::OneWay => {
                let v = self.rng.below(2) as usize;
                let kind = format!("oneway {}->{} dropped", Pair::label(v), Pair::label(1 - v));
                self.count(kind.clone());
                let r = self.net.drop_egress(v, true);
                self.net_step("one-way drop", r)?;
                t0 = Instant::now();
                self.detect(&kind, t0, &[p, s]);
                self.expect_degraded(&kind, p);
                sleep_ms(self.rng.below(500));
                let r = self.net.drop_egress(v, false);
                self.net_step("healing the one-way drop", r)?;
            }
            Fault::Stop => {
                let v = self.rng.below(2) as usize;
                let kind = format!(
                    "SIGSTOP {} ({})",
                    Pair::label(v),
                    if v == p { "primary" } else { "secondary" }
                );
                self.count(kind.clone());
                self.pair[v].stop()?;
                self.counts.stops += 1;
                t0 = Instant::now();
                self.detect(&kind, t0, &[1 - v]);
                if v == s {
                    self.expect_degraded(&kind, p);
                }
                sleep_ms(self.rng.below(500));
                self.pair[v].cont()?;
            }
            Fault::Reboot => {
                let v = self.rng.below(2) as usize;
                let kind = format!(
                    "reboot {} ({})",
                    Pair::label(v),
                    if v == p { "primary" } else { "secondary" }
                );
                self.count(kind.clone());
                self.node_down(v)?;
                t0 = Instant::now();
                self.detect(&kind, t0, &[1 - v]);
                if v == s {
                    self.expect_degraded(&kind, p);
                }
                sleep_ms(self.rng.below(1000));
                self.node_up(v)?;
                restarted = Some(v);
            }
            Fault::Forced => {
                // Two thirds of the time the primary first builds a backlog under load:
                // acknowledged writes the secondary never got, which the forced promotion must
                // report as lost. Over a slow link (replication throttled, heartbeats still
                // flowing) or a silent one (everything the primary sends dropped).
                let backlog = match self.rng.below(3) {
                    0 => "",
                    1 => ", slow link backlog",
                    _ => ", silent link backlog",
                };
                let kind = format!(
                    "reboot {} (primary) + forced takeover{backlog}",
                    Pair::label(p),
                );
                self.count(kind.clone());
                if !backlog.is_empty() {
                    let r = if backlog.contains("slow") {
                        self.pair[p].control("fault", &["--rate", "256K"]).map(drop)
                    } else {
                        self.net.drop_egress(p, true)
                    };
                    match r {
                        Ok(()) => {
                            sleep_ms(self.rng.range(300, 1000));
                            let pending = self.pair[p]
                                .status_json()
                                .map_or_else(|e| e, |s| s["pending_blocks"].to_string());
                            self.note(format!("backlog on {}: {pending} blocks", Pair::label(p)));
                        }
                        Err(e) => self.problem(format!("building a backlog failed: {e}")),
                    }
                }
                let sent = self.witness.deny(p);
                let cut = self.node_down(p)?;
                t0 = Instant::now();
                self.detect(&kind, t0, &[s]);
                self.force(s, p, sent, cut);
                sleep_ms(self.rng.below(1000));
                self.node_up(p)?;
                restarted = Some(p);
            }
            Fault::BlackholeForced => {
                let kind = "blackhole + forced takeover".to_string();
                self.count(kind.clone());
                // Hosts on the old primary's node keep talking to it; the others follow the
                // volume (they wait for the new primary).
                self.sh.route.pin(self.pinned, p);
                self.sh.route.avoid(Some(p));
                let sent = self.witness.deny(p);
                let r = self.net.drop_egress(p, true);
                self.net_step("blackhole", r)?;
                // Nothing the old primary sends passes from here: its peer's last renewal was
                // stamped (before its request left) earlier than this.
                let cut = self.sh.now();
                let r = self.net.drop_egress(s, true);
                self.net_step("blackhole", r)?;
                t0 = Instant::now();
                self.detect(&kind, t0, &[p, s]);
                self.wait_takeover_blocked(p, s);
                // The pinned clients stay until the old primary's lease has surely run out (they
                // see its acknowledgements stop), then send it nothing more: after the promotion
                // a read there could miss what the new primary acknowledges (reads need no
                // lease), which the checker would rightly call stale. What they have in flight
                // may finish later (a write without a lease waits its lease wait): every op was
                // invoked about when `unpinned` was taken, and the promotion comes only after
                // the takeover tried the peer for its whole timeout (>= 1 s). Checked after the
                // run: no op sent there after `Fence::promotable`.
                // Its lease runs at most until the latest renewal it could have had + the lease
                // (a witness grant under way at the `deny` may have ended after the cut).
                let renewed = cut.max(self.witness.last_grant_end(p));
                self.wait_until(renewed + self.lease.as_nanos() as u64 + 300_000_000);
                self.sh.route.pin(0, p);
                let unpinned = self.sh.now();
                self.note(format!(
                    "pinned clients leave {} ({} sessions open); promoting {}",
                    Pair::label(p),
                    self.sh.route.open_on(p),
                    Pair::label(s)
                ));
                let promotable = self.force(s, p, sent, cut);
                sleep_ms(self.rng.below(500));
                let until = self.sh.now();
                for i in 0..2 {
                    let r = self.net.drop_egress(i, false);
                    self.net_step("healing the blackhole", r)?;
                }
                self.fences.push(Fence {
                    engine: p,
                    cut,
                    granted: self.witness.last_grant_end(p),
                    lease: self.lease.as_nanos() as u64,
                    until,
                    unpinned,
                    promotable,
                });
            }
        }
        let r = self.resume(restarted, pids, t0);
        // The old primary stepped down (or the round failed and said so): everyone may go
        // anywhere, and the witness may grant either engine at the newest epoch again.
        self.sh.route.clear();
        self.witness.allow_all();
        r
    }

    fn wait_until(&self, t: Time) {
        let now = self.sh.now();
        if t > now {
            std::thread::sleep(Duration::from_nanos(t - now));
        }
    }

    /// `takeover --policy force` on `s`, the old primary `p` unreachable and denied by the witness
    /// (its last grant sent at `sent`, cut off at `cut`). Invariant: nobody is promoted by force
    /// before the witness's promise to the old primary has run out, the last grant it sent +
    /// `guard`: the grant's lease ends before that. Checked in the blackhole + forced round by
    /// `checker::check_leases` (no ack from the fenced primary after its lease; its unit test
    /// `a_fenced_primary_may_not_acknowledge_after_its_lease`) and the history checker (only
    /// reported losses).
    /// The engine keeps its own promise (the renewals it answered `p`): the takeover's timeout
    /// covers its `promise_remaining_ms`, and a LeaseHeld answer is retried and counted. Then the
    /// witness grants the new primary at once: it holds no lease after a forced promotion.
    /// If it promoted: the earliest time the engine may have (the call's start + the time it
    /// spends trying the peer, less 200 ms for that loop's granularity).
    fn force(&mut self, s: usize, p: usize, sent: Time, cut: Time) -> Option<Time> {
        if sent > 0 {
            let g = witness::guard(self.lease.as_millis() as u64).as_nanos() as u64;
            self.wait_until(sent + g);
        }
        for _ in 0..4 {
            let promise = self.pair[s]
                .status_json()
                .ok()
                .and_then(|st| st["promise_remaining_ms"].as_u64())
                .unwrap_or(0);
            // The engine first tries its peer for the whole timeout, then waits what is left of
            // its promise within the same budget: a timeout of half the promise covers it (the
            // peer is unreachable by construction, a second of trying is enough to see it).
            let t = (promise / 2).div_ceil(1000).max(1);
            let secs = t.to_string();
            self.note(format!(
                "takeover --policy force --timeout {secs} on {} (its promise: {promise} ms)",
                Pair::label(s)
            ));
            let start = self.sh.now();
            match self.pair[s].control("takeover", &["--policy", "force", "--timeout", &secs]) {
                Ok(r) => {
                    let promoted = self.sh.now();
                    let granted = self.witness.grant(s);
                    let lost = r["lost_blocks"].as_u64().unwrap_or(0);
                    self.losses.push(Loss {
                        cut,
                        promoted,
                        lost_blocks: lost,
                    });
                    self.counts.forced += 1;
                    self.counts.lost_blocks_reported += lost;
                    self.recount = Some(s);
                    self.note(format!(
                        "forced promotion: {r}; witness grant to {}: {}",
                        Pair::label(s),
                        if granted { "taken" } else { "NOT taken" }
                    ));
                    return Some((start + t * 1_000_000_000).saturating_sub(200_000_000));
                }
                Err(e) if refusal_reason(&e) == Some(Reason::LeaseHeld) => {
                    self.counts.lease_held += 1;
                    self.note(format!(
                        "forced promotion waits for the lease, retrying: {e}"
                    ));
                }
                // A replica whose resync the backlog cut short is torn: refusing to serve
                // it (without --allow-inconsistent) is the right answer. Under force that is
                // the one HandoffBlocked: an unreachable peer alone never blocks a forced call.
                Err(e) if refusal_reason(&e) == Some(Reason::HandoffBlocked) => {
                    self.counts.force_refused_torn += 1;
                    self.note(format!("forced promotion refused, replica torn: {e}"));
                    return None;
                }
                Err(e) => {
                    self.problem(format!(
                        "takeover --policy force with the old primary {} unreachable failed: {e}",
                        Pair::label(p)
                    ));
                    return None;
                }
            }
        }
        self.problem(format!(
            "takeover --policy force on {} answered LeaseHeld 4 times",
            Pair::label(s)
        ));
        None
    }

    /// After healing: hold the clients, and the pair must converge (the returning old primary
    /// stepped down, nothing pending, Synced; in sync mode no longer degraded) without the engine
    /// that stayed up having been restarted.
    fn resume(
        &mut self,
        restarted: Option<usize>,
        pids: [Option<u32>; 2],
        t0: Instant,
    ) -> Result<()> {
        let t = Instant::now();
        let sync = self.sync;
        let pair = &*self.pair;
        let done = cluster::hold_until_quiet(self.sh, pair, 30, |sv| {
            !sync
                || pair[sv]
                    .status_json()
                    .is_ok_and(|st| st["sync_degraded"] == false)
        });
        if done.is_some() {
            // Nothing in flight and converged: both replicas must hold the same bytes now (tells
            // which round kind made them differ, if one does).
            self.compare_replicas();
        }
        cluster::release(self.sh);
        match done {
            Some(sv) => {
                if let Some(i) = self.recount.take() {
                    let now = self.pair[i]
                        .status_json()
                        .ok()
                        .and_then(|st| st["lost_blocks"].as_u64())
                        .unwrap_or(0);
                    if let Some(l) = self.losses.last_mut() {
                        if now > l.lost_blocks {
                            self.counts.lost_blocks_reported += now - l.lost_blocks;
                            l.lost_blocks = now;
                        }
                    }
                    self.note(format!(
                        "lost_blocks on {} after the old primary returned: {now}",
                        Pair::label(i)
                    ));
                }
                let took = t.elapsed().as_millis() as u64;
                self.counts.resumes += 1;
                self.counts.resume_max_ms = self.counts.resume_max_ms.max(took);
                self.note(format!(
                    "converged on {} {took} ms after healing ({} ms after the fault)",
                    Pair::label(sv),
                    t0.elapsed().as_millis()
                ));
            }
            None => self.problem(format!(
                "replication did not resume within 30 s of healing:\n{}",
                self.pair.describe()
            )),
        }
        for (i, pid) in pids.iter().enumerate() {
            if Some(i) != restarted && self.pair[i].pid() != *pid {
                self.problem(format!("engine {} was restarted", Pair::label(i)));
            }
        }
        Ok(())
    }

    fn compare_replicas(&mut self) {
        match cluster::compare_replicas(self.pair, &mut self.diverged) {
            Ok(Compared::Identical) => self.counts.compared += 1,
            Ok(Compared::Differ { what, new }) => {
                let what = format!("{what} after the round {:?} converged", self.kinds_last);
                if new {
                    self.divergence(what);
                } else {
                    self.note(format!("still: {what}"));
                }
            }
            Err(e) => self.note(format!("cannot compare the replicas: {e}")),
        }
    }

    /// Undo everything: links up, nothing dropped, processes continued and running.
    fn heal(&mut self) -> Result<Option<usize>> {
        self.net.heal();
        for i in 0..2 {
            self.pair[i].cont()?;
            if !self.pair[i].alive() {
                self.pair[i].restart()?;
            }
        }
        cluster::release(self.sh);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(s) = self.pair.serving() {
                return Ok(Some(s));
            }
            sleep_ms(50);
        }
        self.problem("nobody serves 30 s after the nemesis stopped".into());
        Ok(None)
    }
}

fn seed_from_clock() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

/// Runs the partition campaign; Ok(true) when nothing was found (or it had to be skipped).
pub fn run(
    c: &Common,
    rounds: u64,
    peer_timeout_ms: u64,
    lease_ms: u64,
    gap: (u64, u64),
) -> Result<bool> {
    let seed = c.seed.unwrap_or_else(seed_from_clock);
    let sync = c.mode == Mode::Sync;
    let mode = if sync { "sync" } else { "async" };
    println!(
        "tandem-campaign partition: seed {seed} mode {mode} rounds {rounds} size {} clients {} qd {} \
         peer timeout {peer_timeout_ms} ms (rerun with --seed {seed})",
        c.size, c.clients, c.qd
    );
    let net = match Net::create() {
        Ok(n) => n,
        Err(why) => {
            println!("SKIP: cannot set up network namespaces: {why}");
            println!(
                "SUMMARY campaign=partition mode={mode} seed={seed} rounds=0 partitions=0 \
                 violations=0 liveness=0 seconds=0 result=SKIPPED"
            );
            return Ok(true);
        }
    };
    let bin = cluster::locate_engine(c.engine.clone())?;
    let mut tmp = None;
    let dir = match &c.dir {
        Some(d) => d.clone(),
        None => {
            let t = tempfile::Builder::new()
                .prefix("tandem-partition-")
                .tempdir()?;
            let p = t.path().to_path_buf();
            tmp = Some(t);
            p
        }
    };
    let started = Instant::now();
    // With the common 8 MiB default a single 32 MiB client write overflows the journal, and the
    // secondary spends most of its time mid-resync (Inconsistent), where a forced takeover is
    // rightly refused: this campaign wants forced promotions too, so it takes 64 MiB by default.
    let journal = if c.journal_size == "8M" {
        "64M"
    } else {
        c.journal_size.as_str()
    };
    // The write lease (`--lease-ms`, by default twice the peer timeout). The peer renews every quarter lease and a dead
    // peer is detected within the peer timeout + 1 s; the witness looks every quarter lease and
    // grants once the peer is seen gone or half the lease is left, so a lease it keeps never
    // lapses even with one of its looks late. Shorter would race the witness's CLI calls on a
    // loaded machine; longer makes every forced round wait longer (the guard is 1.1 x lease +
    // 0.5 s). The lease wait: 1 s, as long as the sync timeout and one look of the witness. A
    // fenced old primary's host then gets EIO about a second after the lease ends, well before
    // the promotion, instead of a hang; a sync-mode write waiting for the witness's consent after
    // a cut waits at most that long too.
    let lease_wait_ms = 1000;
    let extra: Vec<String> = [
        "--replication",
        mode,
        "--journal-size",
        journal,
        "--sync-timeout-ms",
        "1000",
        "--peer-timeout-ms",
        &peer_timeout_ms.to_string(),
        "--lease-ms",
        &lease_ms.to_string(),
        "--lease-wait-ms",
        &lease_wait_ms.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let grpc = [format!("{}:9700", net.ip[0]), format!("{}:9700", net.ip[1])];
    let mut pair = cluster::start_netns(
        &bin,
        &dir,
        &c.size.to_string(),
        &extra,
        [&net.ns[0], &net.ns[1]],
        [&grpc[0], &grpc[1]],
    )
    .context("starting the pair in its namespaces")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pair.converged(0).unwrap_or(false) {
        if Instant::now() > deadline {
            bail!("the new pair did not sync:\n{}", pair.describe());
        }
        sleep_ms(25);
    }
    let sh = Arc::new(Shared {
        t0: Instant::now(),
        stop: AtomicBool::new(false),
        hold: AtomicBool::new(false),
        next_id: AtomicU64::new(1),
        addrs: vec![pair[0].nbd_addr(), pair[1].nbd_addr()],
        export: VOLUME.to_string(),
        size: c.size,
        hot: c.hot,
        max_op: (c.max_op / 4096).max(1) * 4096,
        route: Default::default(),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let clients: Vec<_> = (0..c.clients)
        .map(|i| rt.spawn(client::run_client(sh.clone(), i, c.qd, seed)))
        .collect();
    let witness = Arc::new(Witness::new(
        [&pair[0], &pair[1]],
        lease_ms,
        sync,
        sh.clone(),
    ));
    let witnesses = witness.spawn();
    let peer_timeout = Duration::from_millis(peer_timeout_ms);
    let mut nem = Nemesis {
        pair: &mut pair,
        net: &net,
        rng: Rng::new(seed),
        sh: &sh,
        sync,
        bound: peer_timeout + Duration::from_secs(1),
        witness: &witness,
        lease: Duration::from_millis(lease_ms),
        // Half of the clients (at least one) stay with the old primary through its fencing.
        pinned: (1u64 << (c.clients / 2).clamp(1, 63)) - 1,
        fences: Vec::new(),
        kinds_last: String::new(),
        diverged: false,
        counts: Counts::default(),
        losses: Vec::new(),
        recount: None,
        log: Vec::new(),
        problems: Vec::new(),
        divergences: Vec::new(),
    };
    let broke: Result<()> = (|| {
        for r in 0..rounds {
            sleep_ms(nem.rng.range(gap.0, gap.1.max(gap.0 + 1)));
            nem.counts.rounds += 1;
            nem.round(CYCLE[(r % CYCLE.len() as u64) as usize])?;
        }
        Ok(())
    })();
    if let Err(e) = &broke {
        nem.problem(format!("nemesis stopped early: {e:#}"));
    }
    let serving = nem.heal()?;
    sh.stop.store(true, Ordering::Relaxed);
    let mut ops: Vec<Op> = Vec::new();
    let mut stats: Vec<Stats> = Vec::new();
    for h in clients {
        let (o, s) = rt.block_on(h)?;
        ops.extend(o);
        stats.push(s);
    }
    let stuck: u64 = stats.iter().map(|s| s.stuck).sum();
    if stuck > 0 {
        nem.problem(format!(
            "{stuck} requests unanswered 60 s after the nemesis stopped"
        ));
    }
    let mut converged = false;
    if let Some(s) = serving {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if nem.pair.converged(s).unwrap_or(false) {
                converged = true;
                break;
            }
            sleep_ms(50);
        }
        if !converged {
            let msg = format!(
                "the pair did not converge within 120 s of the clients stopping:\n{}",
                nem.pair.describe()
            );
            nem.problem(msg);
        }
    }
    let mut final_ok = false;
    if let Some(s) = serving {
        match rt.block_on(client::final_read(&sh, &nem.pair[s].nbd_addr(), 4 << 20)) {
            Ok(f) => {
                final_ok = true;
                ops.extend(f);
            }
            Err(e) => nem.problem(format!("the final read failed: {e}")),
        }
    }
    let mut identical = None;
    if converged {
        let diff = cluster::compare_files(&nem.pair[0].data(), &nem.pair[1].data())?;
        if let Some((first, count)) = diff {
            nem.divergence(format!(
                "replicas differ at the end: {count} blocks, the first at block {first}"
            ));
        }
        identical = Some(diff.is_none());
    }
    let checked = checker::check_with_losses(&ops, c.size / SECTOR, &nem.losses);
    let leases = checker::check_leases(&ops, &nem.fences, ACK_SLACK.as_nanos() as u64);
    for f in nem.fences.clone() {
        let Some(t) = f.promotable else { continue };
        let late = ops
            .iter()
            .filter(|o| o.engine == f.engine && o.inv > t && o.inv <= f.until)
            .count();
        if late > 0 || t <= f.unpinned {
            nem.problem(format!(
                "the campaign sent {late} ops to the fenced old primary {} after the other one \
                 may have been promoted ({}; its clients left at {}): its reads would not be \
                 comparable",
                Pair::label(f.engine),
                ms(t),
                ms(f.unpinned)
            ));
        }
    }
    let (counts, losses, fences, log, mut problems, divergences) = (
        std::mem::take(&mut nem.counts),
        std::mem::take(&mut nem.losses),
        std::mem::take(&mut nem.fences),
        std::mem::take(&mut nem.log),
        std::mem::take(&mut nem.problems),
        std::mem::take(&mut nem.divergences),
    );
    drop(nem);
    witness.stop(witnesses);
    let tally = &witness.tally;
    let grants = tally.grants.load(Ordering::Relaxed);
    if grants == 0 && rounds >= 2 && lease_ms > 0 {
        // A blackhole (the first round) leaves the primary to the witness: it must have granted.
        problems.push("the witness never granted a lease".into());
    }
    report(
        c, seed, mode, &ops, &checked, &counts, &losses, &log, &problems,
    );
    report_leases(c, &ops, &fences, &leases);
    for d in &divergences {
        println!("DIVERGENCE (partition, --mode {mode} --seed {seed}): {d}");
    }
    // The whole nemesis log, kept with the engines' logs when the run fails.
    let text: String = log
        .iter()
        .map(|(t, w)| format!("{} {w}\n", ms(*t)))
        .collect();
    if let Err(e) = std::fs::write(dir.join("nemesis.log"), text) {
        println!("cannot write nemesis.log: {e}");
    }
    let violations = checked.violation_count + leases.late.len() as u64;
    let ok = violations == 0
        && problems.is_empty()
        && divergences.is_empty()
        && final_ok
        && identical == Some(true);
    let partitions: u64 = counts.kinds.values().sum();
    let reboot_forced: u64 = counts
        .kinds
        .iter()
        .filter(|(k, _)| k.starts_with("reboot") && k.contains("forced"))
        .map(|(_, n)| n)
        .sum();
    let blackhole_forced = kind_count(&counts, "blackhole +");
    let ms_of = |ns: i64| ns / 1_000_000;
    println!(
        "SUMMARY campaign=partition mode={mode} seed={seed} rounds={} partitions={partitions} \
         blackholes={} oneway={} pauses={} reboots={} forced={} blackhole_forced={} kills={} takeovers={} failbacks=0 \
         detections={} detect_max_ms={} bound_ms={} resumes={} resume_max_ms={} degraded_seen={} \
         wait_blocked={} force_refused_torn={} lost_blocks_reported={} reported_losses={} reported_loss_blocks={} \
         lease_ms={lease_ms} witness_grants={grants} witness_refused={} witness_unknown={} lease_held_retries={} \
         fenced_acks={} ack_after_cut_max_ms={} lease_margin_max_ms={} late_acks={} \
         ops={} reads_checked={} sectors_checked={} final_sectors={} indeterminate={} errors={} \
         violations={} liveness={} diverged={} replicas_identical={} seconds={:.1} result={}",
        counts.rounds,
        kind_count(&counts, "blackhole") - blackhole_forced,
        kind_count(&counts, "oneway"),
        counts.stops,
        kind_count(&counts, "reboot") - reboot_forced,
        reboot_forced,
        blackhole_forced,
        counts.kills,
        counts.forced,
        counts.detections,
        counts.detect_max_ms,
        peer_timeout_ms + 1000,
        counts.resumes,
        counts.resume_max_ms,
        counts.degraded_seen,
        counts.wait_blocked,
        counts.force_refused_torn,
        counts.lost_blocks_reported,
        checked.reported_losses,
        checked.reported_loss_blocks,
        tally.refused.load(Ordering::Relaxed),
        tally.unknown.load(Ordering::Relaxed),
        counts.lease_held,
        leases.acks_after_cut,
        ms_of(leases.after_cut_max as i64),
        leases
            .margin_max
            .map_or("none".to_string(), |m| ms_of(m).to_string()),
        leases.late.len(),
        ops.len(),
        checked.reads_checked,
        checked.sectors_checked,
        checked.final_sectors,
        checked.indeterminate,
        checked.errors,
        violations,
        problems.len(),
        divergences.len(),
        identical.map_or("unknown".to_string(), |b| b.to_string()),
        started.elapsed().as_secs_f64(),
        if ok { "pass" } else { "FAIL" }
    );
    drop(pair);
    drop(net);
    if !ok {
        if let Some(t) = tmp.take() {
            println!(
                "kept the working directory (engine logs, data files): {}",
                t.keep().display()
            );
        }
    }
    Ok(ok)
}

/// How late after the lease's latest end a fenced old primary's acknowledgement may reach the
/// client: the reply's way from the engine's lease check through the socket and the client's
/// runtime on a loaded machine.
const ACK_SLACK: Duration = Duration::from_millis(250);

fn report_leases(c: &Common, ops: &[Op], fences: &[Fence], l: &checker::LeaseChecked) {
    for f in fences {
        println!(
            "fenced old primary {}: cut at {}, last witness grant ended {}, lease could run until {}",
            Pair::label(f.engine),
            ms(f.cut),
            if f.granted == 0 {
                "never".to_string()
            } else {
                ms(f.granted)
            },
            ms(f.lease_end())
        );
    }
    println!(
        "fenced old primaries acknowledged {} changes or flushes after their cut, the last {:.1} ms \
         after it; the latest came {} the lease could have run out (slack {} ms); {} too late",
        l.acks_after_cut,
        l.after_cut_max as f64 / 1e6,
        l.margin_max.map_or("-".to_string(), |m| if m <= 0 {
            format!("{:.1} ms before", -m as f64 / 1e6)
        } else {
            format!("{:.1} ms after", m as f64 / 1e6)
        }),
        ACK_SLACK.as_millis(),
        l.late.len()
    );
    for late in l.late.iter().take(c.show) {
        println!(
            "VIOLATION (partition) {}",
            checker::explain_late(ops, fences, late)
        );
    }
}

fn kind_count(c: &Counts, prefix: &str) -> u64 {
    c.kinds
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, n)| n)
        .sum()
}

#[allow(clippy::too_many_arguments)]
fn report(
    c: &Common,
    seed: u64,
    mode: &str,
    ops: &[Op],
    checked: &checker::Checked,
    counts: &Counts,
    losses: &[Loss],
    log: &[(Time, String)],
    problems: &[String],
) {
    println!("partitions by kind:");
    for (k, n) in &counts.kinds {
        println!("  {k:<45} {n:>4}");
    }
    println!("detection (max ms until status says peer_connected: false):");
    for (k, t) in &counts.detect_ms {
        println!("  {k:<55} {t:>6}");
    }
    println!(
        "forced takeovers answered LeaseHeld and retried {} times; replicas compared identical \
         after {} rounds",
        counts.lease_held, counts.compared
    );
    println!(
        "resumed {} times (max {} ms from healing to converged); sync degradation reported {} \
         times; takeover --policy wait refused as HandoffBlocked {} times; {} forced promotions \
         reported {} lost blocks; {} forced takeovers refused (replica Inconsistent)",
        counts.resumes,
        counts.resume_max_ms,
        counts.degraded_seen,
        counts.wait_blocked,
        counts.forced,
        counts.lost_blocks_reported,
        counts.force_refused_torn
    );
    println!(
        "checked: {} ops, {} reads, {} sectors ({} in the final read), {} indeterminate writes, \
         {} reported losses in {} blocks (per promotion: {:?}), {} violations",
        ops.len(),
        checked.reads_checked,
        checked.sectors_checked,
        checked.final_sectors,
        checked.indeterminate,
        checked.reported_losses,
        checked.reported_loss_blocks,
        checked.loss_blocks,
        checked.violation_count
    );
    if checked.violation_count > 0 {
        println!("violations by kind: {:?}", checked.by_kind);
    }
    for (l, lost) in losses.iter().zip(&checked.loss_blocks) {
        println!(
            "forced promotion at {}: reported {} lost blocks; acknowledged writes gone from {lost} blocks{}",
            ms(l.promoted),
            l.lost_blocks,
            if *lost > l.lost_blocks { " (UNREPORTED LOSS)" } else { "" }
        );
    }
    for p in problems {
        println!("LIVENESS: {p}");
    }
    for v in checked.violations.iter().take(c.show) {
        println!(
            "VIOLATION (partition, --mode {mode} --seed {seed}) {}",
            checker::explain(ops, v)
        );
        let r = &ops[v.read];
        let from = r.inv.saturating_sub(5_000_000_000);
        println!("  nemesis around the read:");
        for (t, what) in log.iter().filter(|(t, _)| *t >= from && *t <= r.comp) {
            println!("    {} {what}", ms(*t));
        }
    }
}
