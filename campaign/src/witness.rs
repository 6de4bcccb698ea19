//! The witness beside the partition nemesis, as the operator would run it: every quarter lease it
//! reads each engine's status and, when a primary's lease is not being renewed by its peer
//! (`peer_connected: false`, or less than half the lease left), grants it one with
//! `tandem-engine lease` run in the engine's namespace (with `--allow-async` in sync mode, so a
//! primary cut off from its secondary may acknowledge alone, and says so).
//!
//! It keeps the promise a granter makes: once told to `deny` an engine it grants that engine
//! nothing more, and it reports when it last *sent* a grant there, so the nemesis promotes the
//! other engine by force only after that time + `guard` (the engine's own formula). It also
//! reports when the last grant that may have landed *ended*: the stamp a grant carries is read
//! inside that call, so the granted lease ends before that time + the lease.
//!
//! It never grants a primary at an epoch below the highest it has seen: after a forced promotion
//! only the new primary is leased, even if the old one still calls itself primary.

use std::{
    ffi::OsString,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::Value;
use tandem_testkit::Engine;

use crate::{client::Shared, history::Time};

/// `storage_engine::lease::guard`: how long after its last renewal a granter must wait before the
/// other engine may be promoted by force (the lease, 10 % for clock rates, 500 ms for scheduling
/// and the reply in flight). The same formula, since the campaign links no engine code.
pub fn guard(lease_ms: u64) -> Duration {
    let lease = Duration::from_millis(lease_ms);
    lease + lease / 10 + Duration::from_millis(500)
}

/// One engine's control CLI (`ip netns exec NS tandem-engine OP --grpc .. --volume .. --token-file
/// ..`), kept as program and arguments so another thread can run it while the nemesis restarts
/// the engine (its addresses stay the same).
#[derive(Debug, Clone)]
struct Ctl {
    program: OsString,
    status: Vec<OsString>,
    lease: Vec<OsString>,
}

impl Ctl {
    fn of(e: &Engine) -> Ctl {
        let args = |op: &str| {
            let c = e.cli(op);
            (
                c.get_program().to_os_string(),
                c.get_args().map(|a| a.to_os_string()).collect::<Vec<_>>(),
            )
        };
        let (program, status) = args("status");
        let (_, lease) = args("lease");
        Ctl {
            program,
            status,
            lease,
        }
    }
}

/// Runs `cmd`, killed after `limit`: its stdout on success, else why not. `Err(None)`: it did not
/// finish in time (what it asked may or may not have happened).
fn run_bounded(mut cmd: Command, limit: Duration) -> Result<String, Option<String>> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Some(format!("cannot run the engine CLI: {e}")))?;
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(None);
            }
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Some(format!("engine CLI output: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Some(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// Per engine: what the witness promised and granted, under one lock so that `deny` sees every
/// grant that got past its check.
#[derive(Debug, Default, Clone, Copy)]
struct Book {
    deny: bool,
    /// When the last grant was sent (before its CLI started), campaign clock; 0: never.
    sent: Time,
    /// When the last grant that may have landed ended (answered, or killed unanswered).
    done: Time,
    /// Grants under way.
    busy: u32,
}

#[derive(Debug, Default)]
pub struct Tally {
    pub grants: AtomicU64,
    /// Refused by the engine (LeaseRefused: it stepped down, restarted, or moved epoch).
    pub refused: AtomicU64,
    /// Unanswered within the bound or failed otherwise (counted as possibly granted).
    pub unknown: AtomicU64,
}

pub struct Witness {
    ctl: [Ctl; 2],
    lease_ms: u64,
    allow_async: bool,
    sh: Arc<Shared>,
    book: [Mutex<Book>; 2],
    max_epoch: AtomicU64,
    stop: AtomicBool,
    pub tally: Tally,
}

fn lock(m: &Mutex<Book>) -> std::sync::MutexGuard<'_, Book> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Witness {
    pub fn new(engines: [&Engine; 2], lease_ms: u64, sync: bool, sh: Arc<Shared>) -> Witness {
        Witness {
            ctl: [Ctl::of(engines[0]), Ctl::of(engines[1])],
            lease_ms,
            allow_async: sync,
            sh,
            book: Default::default(),
            max_epoch: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            tally: Tally::default(),
        }
    }

    /// A quarter lease: how often it looks, and how long one CLI call may take.
    fn period(&self) -> Duration {
        Duration::from_millis(self.lease_ms / 4).max(Duration::from_millis(50))
    }

    /// One thread per engine (a SIGSTOPped engine stalls only its own), until `stop`.
    pub fn spawn(self: &Arc<Self>) -> [JoinHandle<()>; 2] {
        [0, 1].map(|i| {
            let w = self.clone();
            std::thread::spawn(move || {
                while !w.stop.load(Ordering::Acquire) {
                    let next = Instant::now() + w.period();
                    w.tend(i);
                    let left = next.saturating_duration_since(Instant::now());
                    std::thread::sleep(left);
                }
            })
        })
    }

    pub fn stop(&self, threads: [JoinHandle<()>; 2]) {
        self.stop.store(true, Ordering::Release);
        for t in threads {
            let _ = t.join();
        }
    }

    fn status(&self, i: usize) -> Option<Value> {
        let c = &self.ctl[i];
        let mut cmd = Command::new(&c.program);
        cmd.args(&c.status).arg("--json");
        let out = run_bounded(cmd, self.period()).ok()?;
        let st: Value = serde_json::from_str(&out).ok()?;
        if let Some(e) = st["epoch"].as_u64() {
            self.max_epoch.fetch_max(e, Ordering::AcqRel);
        }
        Some(st)
    }

    /// One look at engine `i`: a primary at the newest epoch whose peer is not renewing its lease
    /// gets a grant.
    fn tend(&self, i: usize) {
        let Some(st) = self.status(i) else { return };
        let lease_ms = st["lease_ms"].as_u64().unwrap_or(0);
        let newest = st["epoch"].as_u64().unwrap_or(0) >= self.max_epoch.load(Ordering::Acquire);
        if st["role"] != "primary" || lease_ms == 0 || !newest {
            return;
        }
        let unrenewed = st["peer_connected"] == false
            || st["lease_remaining_ms"].as_u64().unwrap_or(0) < lease_ms / 2;
        if unrenewed {
            self.grant(i);
        }
    }

    /// Grants engine `i` a lease now, unless it is denied; whether the engine took it.
    pub fn grant(&self, i: usize) -> bool {
        if self.lease_ms == 0 {
            return false;
        }
        {
            let mut b = lock(&self.book[i]);
            if b.deny {
                return false;
            }
            // Recorded before the call starts, under the lock `deny` takes: the nemesis's wait
            // after a `deny` covers every grant that got this far.
            b.sent = self.sh.now();
            b.busy += 1;
        }
        let c = &self.ctl[i];
        let mut cmd = Command::new(&c.program);
        let ms = self.lease_ms.to_string();
        cmd.args(&c.lease).args(["--lease-ms", &ms]);
        if self.allow_async {
            cmd.arg("--allow-async");
        }
        let r = run_bounded(cmd, self.period());
        let landed = match &r {
            Ok(_) => {
                self.tally.grants.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(Some(e)) if e.contains("LeaseRefused") => {
                self.tally.refused.fetch_add(1, Ordering::Relaxed);
                false
            }
            Err(_) => {
                self.tally.unknown.fetch_add(1, Ordering::Relaxed);
                true
            }
        };
        let mut b = lock(&self.book[i]);
        if landed {
            b.done = b.done.max(self.sh.now());
        }
        b.busy -= 1;
        r.is_ok()
    }

    /// Stops granting engine `i`; returns when the last grant to it was sent (0: never).
    pub fn deny(&self, i: usize) -> Time {
        let mut b = lock(&self.book[i]);
        b.deny = true;
        b.sent
    }

    /// Every engine may be granted again (the old primary stepped down).
    pub fn allow_all(&self) {
        for b in &self.book {
            lock(b).deny = false;
        }
    }

    /// When the last grant to `i` that may have landed ended, once none is under way (0: never).
    /// A grant runs at most a quarter lease, so this waits no longer than that.
    pub fn last_grant_end(&self, i: usize) -> Time {
        loop {
            let b = *lock(&self.book[i]);
            if b.busy == 0 {
                return b.done;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
