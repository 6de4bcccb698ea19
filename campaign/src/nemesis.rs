//! The nemesis and the run of one campaign: start a pair, start the clients, break things for a
//! while, heal everything, stop the clients, wait for the pair to converge, read the whole volume
//! through the engine that serves, compare both data files, check the history, report.

use std::{
    collections::BTreeMap,
    process::Stdio,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use tandem_testkit::Pair;

use crate::{
    checker,
    client::{self, Shared, Stats},
    cluster::{self, Compared, VOLUME},
    history::{ms, Kind, Op, Outcome, Time},
    prng::Rng,
    stamp::SECTOR,
    Common, Mode,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Event {
    /// Move service to B (the first secondary) with `tandem-engine takeover --policy wait`.
    Takeover,
    /// Move service back to A with `tandem-engine failback --policy wait`.
    Failback,
    /// SIGKILL either engine (sometimes in the middle of a takeover), then restart it.
    Kill,
    /// SIGSTOP either engine for 0.1-1.5 s, then SIGCONT.
    Pause,
    /// A replication-link fault on either engine: paused, dropped, or acks held.
    Partition,
    /// Throttle the serving engine's journal records (not its resync images) to 1-8 MiB/s for
    /// 0.5-3 s: the stream falls behind the writes, the journal overflows mid-stream, and the
    /// table is resynced quickly while writes go on, again and again with a growing backlog (the
    /// interleaving of the journal-overflow defect in docs/reliability.md).
    Throttle,
    /// Hold the clients until nothing is in flight and the pair has converged, then compare both
    /// data files. The final compare alone misses a divergence that later writes overwrite (how
    /// the journal-overflow defect of docs/reliability.md hid from this campaign).
    Settle,
}

pub enum Plan {
    History {
        seconds: u64,
        events: Vec<Event>,
        gap: (u64, u64),
    },
    Kill {
        kills: u64,
        gap: (u64, u64),
    },
}

#[derive(Debug, Default)]
struct Counts {
    takeovers: u64,
    failbacks: u64,
    kills: u64,
    kills_mid_switch: u64,
    pauses: u64,
    partitions: u64,
    throttles: u64,
    /// Settles after which both replicas were compared identical.
    compared: u64,
}

struct Nemesis<'a> {
    pair: &'a mut Pair,
    rng: Rng,
    sh: &'a Shared,
    counts: Counts,
    /// (time, what happened), for the account of a violation.
    log: Vec<(Time, String)>,
    /// Liveness findings: a takeover refused between two live engines, no convergence, a hang.
    problems: Vec<String>,
    /// Safety findings outside the history: the replicas differing at a settle or at the end
    /// with the pair converged (a takeover would then lose what the other side lacks).
    divergences: Vec<String>,
    /// The replicas differed at a settle and have not been seen identical since (only the first
    /// settle that finds them differing is a finding: later writes may not have rewritten them).
    diverged: bool,
}

fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

impl Nemesis<'_> {
    fn note(&mut self, what: String) {
        self.log.push((self.sh.now(), what));
    }

    fn switch_args(&self, target: usize) -> (&'static str, Vec<&'static str>) {
        let op = if target == 1 { "takeover" } else { "failback" };
        (op, vec!["--policy", "wait", "--timeout", "10", "--json"])
    }

    fn count_switch(&mut self, target: usize) {
        if target == 1 {
            self.counts.takeovers += 1
        } else {
            self.counts.failbacks += 1
        }
    }

    fn switch(&mut self, target: usize) {
        let (op, args) = self.switch_args(target);
        self.note(format!("{op} to {} begins", Pair::label(target)));
        let t = Instant::now();
        match self.pair[target].control(op, &args) {
            Ok(r) => {
                self.note(format!("{op} done in {:?}: {r}", t.elapsed()));
                self.count_switch(target);
            }
            Err(e) => {
                let msg = format!(
                    "{op} to {} failed between two live engines: {e}",
                    Pair::label(target)
                );
                self.note(msg.clone());
                self.problems.push(msg);
            }
        }
    }

    /// A takeover with a SIGKILL of either engine a few milliseconds into it; the takeover is
    /// then repeated until it succeeds (it resumes: the handoff is idempotent at one epoch).
    fn switch_with_kill(&mut self, target: usize) -> Result<()> {
        let (op, args) = self.switch_args(target);
        let victim = self.rng.below(2) as usize;
        let delay = self.rng.below(30);
        self.note(format!(
            "{op} to {} with a SIGKILL of {} after {delay} ms",
            Pair::label(target),
            Pair::label(victim)
        ));
        let child = self.pair[target]
            .cli(op)
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        sleep_ms(delay);
        self.pair[victim].kill();
        self.counts.kills += 1;
        self.counts.kills_mid_switch += 1;
        let out = child.wait_with_output()?;
        self.note(format!(
            "interrupted {op}: exit {}, {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
        self.pair[victim].restart()?;
        self.note(format!("{} restarted", Pair::label(victim)));
        // Finish what was started, whoever ends up serving.
        for attempt in 0..3 {
            match self.pair[target].control(op, &args) {
                Ok(r) => {
                    self.note(format!("{op} repeated: {r}"));
                    self.count_switch(target);
                    return Ok(());
                }
                Err(e) if attempt == 2 => {
                    let msg = format!(
                        "{op} to {} after a kill failed 3 times: {e}",
                        Pair::label(target)
                    );
                    self.note(msg.clone());
                    self.problems.push(msg);
                }
                Err(e) => self.note(format!("{op} repeat failed: {e}")),
            }
        }
        Ok(())
    }

    fn event(&mut self, ev: Event, allowed: &[Event]) -> Result<()> {
        match ev {
            Event::Takeover | Event::Failback => {
                let target = match self.pair.serving() {
                    Some(s) => 1 - s,
                    None => usize::from(ev == Event::Takeover),
                };
                let need = if target == 1 {
                    Event::Takeover
                } else {
                    Event::Failback
                };
                if allowed.contains(&need) {
                    self.switch(target);
                }
            }
            Event::Kill => {
                let target = self.pair.serving().map(|s| 1 - s);
                let mid_switch = target.filter(|&t| {
                    let need = if t == 1 {
                        Event::Takeover
                    } else {
                        Event::Failback
                    };
                    allowed.contains(&need)
                });
                match mid_switch {
                    Some(t) if self.rng.pct(30) => self.switch_with_kill(t)?,
                    _ => {
                        let v = self.rng.below(2) as usize;
                        let down = self.rng.below(500);
                        self.note(format!("SIGKILL {} (down {down} ms)", Pair::label(v)));
                        self.pair[v].kill();
                        self.counts.kills += 1;
                        sleep_ms(down);
                        self.pair[v].restart()?;
                        self.note(format!("{} restarted", Pair::label(v)));
                    }
                }
            }
            Event::Pause => {
                let v = self.rng.below(2) as usize;
                let hold = self.rng.range(100, 1500);
                self.note(format!("SIGSTOP {} for {hold} ms", Pair::label(v)));
                self.pair[v].stop()?;
                self.counts.pauses += 1;
                sleep_ms(hold);
                self.pair[v].cont()?;
                self.note(format!("SIGCONT {}", Pair::label(v)));
            }
            Event::Partition => {
                let v = self.rng.below(2) as usize;
                let hold = self.rng.range(200, 2000);
                let label = Pair::label(v);
                let (what, on, off): (&str, &[&str], &[&str]) = match self.rng.below(3) {
                    0 => ("link paused", &["--pause", "true"], &["--pause", "false"]),
                    1 => ("link dropped", &["--drop-link"], &[]),
                    _ => (
                        "acks held",
                        &["--hold-acks", "true"],
                        &["--hold-acks", "false"],
                    ),
                };
                self.note(format!("{what} on {label} for {hold} ms"));
                match self.pair[v].control("fault", on).map(drop) {
                    Ok(()) => self.counts.partitions += 1,
                    Err(e) => self.note(format!("fault on {label} failed: {e}")),
                }
                if !off.is_empty() {
                    sleep_ms(hold);
                    if let Err(e) = self.pair[v].control("fault", off).map(drop) {
                        self.note(format!("fault release on {label} failed: {e}"));
                    }
                }
                self.note(format!("{what} on {label} healed"));
            }
            Event::Throttle => {
                let v = self.pair.serving().unwrap_or(0);
                let label = Pair::label(v);
                let mib = self.rng.range(1, 9);
                let hold = self.rng.range(500, 3000);
                let rate = (mib << 20).to_string();
                self.note(format!(
                    "link of {label} throttled to {mib} MiB/s for {hold} ms"
                ));
                match self.pair[v]
                    .control("fault", &["--rate", &rate, "--rate-records-only", "true"])
                    .map(drop)
                {
                    Ok(()) => self.counts.throttles += 1,
                    Err(e) => self.note(format!("throttling {label} failed: {e}")),
                }
                sleep_ms(hold);
                let off = ["--rate", "0", "--rate-records-only", "false"];
                if let Err(e) = self.pair[v].control("fault", &off).map(drop) {
                    self.note(format!("unthrottling {label} failed: {e}"));
                }
                self.note(format!("link of {label} unthrottled"));
            }
            Event::Settle => self.settle(),
        }
        Ok(())
    }

    /// [`Event::Settle`]: the clients hold, and once nothing is in flight and the pair has
    /// converged both replicas must hold the same bytes.
    fn settle(&mut self) {
        let t = Instant::now();
        let settled = cluster::hold_until_quiet(self.sh, self.pair, 30, |_| true).is_some();
        if settled {
            let ms = t.elapsed().as_millis();
            match cluster::compare_replicas(self.pair, &mut self.diverged) {
                Ok(Compared::Identical) => {
                    self.counts.compared += 1;
                    self.note(format!("settled in {ms} ms: replicas identical"));
                }
                Ok(Compared::Differ { what, new }) => {
                    let what = format!("settled in {ms} ms: {what}");
                    if new {
                        self.divergences.push(what.clone());
                        self.note(what);
                    } else {
                        self.note(format!("still: {what}"));
                    }
                }
                Err(e) => self.note(format!("cannot compare the replicas: {e}")),
            }
        } else {
            let msg = format!(
                "the pair did not converge within 30 s of the clients holding ({} requests in \
                 flight):\n{}",
                self.sh.route.inflight(),
                self.pair.describe()
            );
            self.note(msg.clone());
            self.problems.push(msg);
        }
        cluster::release(self.sh);
    }

    /// Undo everything: processes running and continued, links unpaused, someone serving.
    fn heal(&mut self) -> Result<Option<usize>> {
        for i in 0..2 {
            self.pair[i].cont()?;
            if !self.pair[i].alive() {
                self.pair[i].restart()?;
            }
        }
        for i in 0..2 {
            if let Err(e) = self.pair[i]
                .control(
                    "fault",
                    &[
                        "--pause",
                        "false",
                        "--hold-acks",
                        "false",
                        "--rate",
                        "0",
                        "--rate-records-only",
                        "false",
                    ],
                )
                .map(drop)
            {
                self.note(format!("unpausing {} failed: {e}", Pair::label(i)));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.pair.serving() {
                return Ok(Some(s));
            }
            if Instant::now() > deadline {
                break;
            }
            sleep_ms(50);
        }
        let msg = "nobody serves 30 s after the nemesis stopped; taking over on B".to_string();
        self.problems.push(msg.clone());
        self.note(msg);
        let (op, args) = self.switch_args(1);
        if let Err(e) = self.pair[1].control(op, &args) {
            self.problems
                .push(format!("the repair takeover failed too: {e}"));
        }
        Ok(self.pair.serving())
    }
}

fn seed_from_clock() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

/// Runs one campaign; Ok(true) when nothing was found.
pub fn run(name: &str, c: &Common, plan: Plan) -> Result<bool> {
    let seed = c.seed.unwrap_or_else(seed_from_clock);
    let mode = match c.mode {
        Mode::Async => "async",
        Mode::Sync => "sync",
    };
    println!(
        "tandem-campaign {name}: seed {seed} mode {mode} size {} clients {} qd {} (rerun with --seed {seed})",
        c.size, c.clients, c.qd
    );
    let bin = cluster::locate_engine(c.engine.clone())?;
    let mut tmp = None;
    let dir = match &c.dir {
        Some(d) => d.clone(),
        None => {
            let t = tempfile::Builder::new()
                .prefix("tandem-campaign-")
                .tempdir()?;
            let p = t.path().to_path_buf();
            tmp = Some(t);
            p
        }
    };
    let started = Instant::now();
    let size = c.size.to_string();
    let extra: Vec<String> = [
        "--replication",
        mode,
        "--journal-size",
        &c.journal_size,
        "--sync-timeout-ms",
        "1000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut pair = cluster::start(&bin, &dir, &size, &extra).context("starting the pair")?;
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
        addrs: vec![pair[0].nbd.clone(), pair[1].nbd.clone()],
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

    let mut nem = Nemesis {
        pair: &mut pair,
        rng: Rng::new(seed),
        sh: &sh,
        counts: Counts::default(),
        log: Vec::new(),
        problems: Vec::new(),
        divergences: Vec::new(),
        diverged: false,
    };
    let broke: Result<()> = (|| {
        match &plan {
            Plan::History {
                seconds,
                events,
                gap,
            } => {
                let end = Instant::now() + Duration::from_secs(*seconds);
                while Instant::now() < end && !events.is_empty() {
                    sleep_ms(nem.rng.range(gap.0, gap.1.max(gap.0 + 1)));
                    let ev = events[nem.rng.below(events.len() as u64) as usize];
                    nem.event(ev, events)?;
                }
                if events.is_empty() {
                    std::thread::sleep(end.saturating_duration_since(Instant::now()));
                }
            }
            Plan::Kill { kills, gap } => {
                for _ in 0..*kills {
                    sleep_ms(nem.rng.range(gap.0, gap.1.max(gap.0 + 1)));
                    let v = nem.rng.below(2) as usize;
                    nem.note(format!("SIGKILL {}", Pair::label(v)));
                    nem.pair[v].kill();
                    nem.counts.kills += 1;
                    nem.pair[v].restart()?;
                    nem.note(format!("{} restarted", Pair::label(v)));
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = &broke {
        nem.problems.push(format!("nemesis stopped early: {e:#}"));
    }
    let nemesis_secs = sh.now() as f64 / 1e9;
    let serving = nem.heal()?;
    // Stop the clients; their in-flight ops complete (or are cut) first.
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
        nem.problems.push(format!(
            "{stuck} requests unanswered 60 s after the nemesis stopped"
        ));
    }
    // Converged: the serving engine has nothing pending and no takeover running.
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
            nem.problems.push(format!(
                "the pair did not converge within 120 s of the clients stopping:\n{}",
                nem.pair.describe()
            ));
        }
    }
    let mut final_ok = false;
    if let Some(s) = serving {
        match rt.block_on(client::final_read(&sh, &nem.pair[s].nbd, 4 << 20)) {
            Ok(f) => {
                final_ok = true;
                ops.extend(f);
            }
            Err(e) => nem.problems.push(format!("the final read failed: {e}")),
        }
    }
    let mut identical = None;
    if converged {
        let diff = cluster::compare_files(&nem.pair[0].data(), &nem.pair[1].data())?;
        if let Some((first, count)) = diff {
            nem.divergences.push(format!(
                "replicas differ at the end: {count} blocks, the first at block {first}"
            ));
        }
        identical = Some(diff.is_none());
    }
    let checked = checker::check(&ops, c.size / SECTOR);
    let (counts, log, problems, divergences) = (
        std::mem::take(&mut nem.counts),
        std::mem::take(&mut nem.log),
        std::mem::take(&mut nem.problems),
        std::mem::take(&mut nem.divergences),
    );
    drop(nem);
    report(
        name, seed, mode, c, &ops, &stats, &checked, &counts, &log, &problems,
    );
    for d in &divergences {
        println!("DIVERGENCE ({name}, --mode {mode} --seed {seed}): {d}");
    }
    let ok = checked.violation_count == 0
        && problems.is_empty()
        && divergences.is_empty()
        && final_ok
        && identical == Some(true);
    println!(
        "SUMMARY campaign={name} mode={mode} seed={seed} ops={} reads_checked={} sectors_checked={} \
         final_sectors={} takeovers={} failbacks={} kills={} kills_mid_switch={} pauses={} \
         partitions={} throttles={} compared={} diverged={} indeterminate={} errors={} violations={} liveness={} \
         replicas_identical={} nemesis_seconds={nemesis_secs:.1} seconds={:.1} result={}",
        ops.len(),
        checked.reads_checked,
        checked.sectors_checked,
        checked.final_sectors,
        counts.takeovers,
        counts.failbacks,
        counts.kills,
        counts.kills_mid_switch,
        counts.pauses,
        counts.partitions,
        counts.throttles,
        counts.compared,
        divergences.len(),
        checked.indeterminate,
        checked.errors,
        checked.violation_count,
        problems.len(),
        identical.map_or("unknown".to_string(), |b| b.to_string()),
        started.elapsed().as_secs_f64(),
        if ok { "pass" } else { "FAIL" }
    );
    drop(pair);
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

#[allow(clippy::too_many_arguments)]
fn report(
    name: &str,
    seed: u64,
    mode: &str,
    c: &Common,
    ops: &[Op],
    stats: &[Stats],
    checked: &checker::Checked,
    counts: &Counts,
    log: &[(Time, String)],
    problems: &[String],
) {
    let mut by_kind: BTreeMap<&str, (u64, u64, u64, u64)> = BTreeMap::new();
    for o in ops.iter().filter(|o| !o.final_read) {
        let e = by_kind.entry(o.kind.name()).or_default();
        e.0 += 1;
        match o.outcome {
            Outcome::Ok => e.1 += 1,
            Outcome::Err(_) => e.2 += 1,
            Outcome::Lost => e.3 += 1,
        }
    }
    println!("ops by kind (total / ok / errno / cut):");
    for (k, (n, ok, err, lost)) in &by_kind {
        println!("  {k:<13} {n:>9} {ok:>9} {err:>7} {lost:>7}");
    }
    let fua = ops.iter().filter(|o| o.fua).count();
    let unaligned = ops
        .iter()
        .filter(|o| o.kind != Kind::Flush && (o.sector % 8 != 0 || o.sectors % 8 != 0))
        .count();
    let written: u64 = stats.iter().map(|s| s.bytes_written).sum();
    let read: u64 = stats.iter().map(|s| s.bytes_read).sum();
    let connects: u64 = stats.iter().map(|s| s.connects).sum();
    let mut errnos: BTreeMap<u32, u64> = BTreeMap::new();
    for s in stats {
        for (e, n) in &s.errnos {
            *errnos.entry(*e).or_default() += n;
        }
    }
    println!(
        "  FUA {fua}, unaligned {unaligned}, {} MiB written, {} MiB read, {connects} connections, errnos {errnos:?}",
        written >> 20,
        read >> 20
    );
    println!(
        "nemesis: {} takeovers, {} failbacks, {} SIGKILLs ({} in a takeover), {} SIGSTOPs, {} link faults, {} throttles, {} settles with the replicas compared identical",
        counts.takeovers,
        counts.failbacks,
        counts.kills,
        counts.kills_mid_switch,
        counts.pauses,
        counts.partitions,
        counts.throttles,
        counts.compared
    );
    println!(
        "checked: {} reads, {} sectors ({} in the final read of {} blocks), {} indeterminate writes, {} violations",
        checked.reads_checked,
        checked.sectors_checked,
        checked.final_sectors,
        c.size / 4096,
        checked.indeterminate,
        checked.violation_count
    );
    if checked.violation_count > 0 {
        println!(
            "violations by kind (lost writes counted unflushed): {:?}",
            checked.by_kind
        );
    }
    for p in problems {
        println!("LIVENESS: {p}");
    }
    for v in checked.violations.iter().take(c.show) {
        println!(
            "VIOLATION ({name}, --mode {mode} --seed {seed}) {}",
            checker::explain(ops, v)
        );
        let r = &ops[v.read];
        let from = r.inv.saturating_sub(3_000_000_000);
        println!("  nemesis around the read:");
        for (t, what) in log.iter().filter(|(t, _)| *t >= from && *t <= r.comp) {
            println!("    {} {what}", ms(*t));
        }
        if let Some((t, what)) = log.iter().rev().find(|(t, _)| *t < from) {
            println!("    (before: {} {what})", ms(*t));
        }
    }
}
