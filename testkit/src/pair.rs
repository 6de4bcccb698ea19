//! Two engines of one volume: `a` starts as the primary, `b` as its secondary.

use std::{
    ops::{Index, IndexMut},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::{Engine, EngineBuilder};

/// How to start a pair: engine a in `<dir>/a`, engine b in `<dir>/b` (role secondary). b starts
/// first; a's peer is b's gRPC address unless set; b's peer, unless set, is a dead address, or a's
/// address with [`PairBuilder::linked`].
pub struct PairBuilder {
    dir: PathBuf,
    token: Option<String>,
    a: EngineBuilder,
    b: EngineBuilder,
    linked: bool,
}

impl PairBuilder {
    pub fn new(dir: impl AsRef<Path>) -> PairBuilder {
        let dir = dir.as_ref().to_path_buf();
        PairBuilder {
            a: EngineBuilder::new(dir.join("a")),
            b: EngineBuilder::new(dir.join("b")).role("secondary"),
            dir,
            token: None,
            linked: false,
        }
    }

    /// Both engines' volume.
    pub fn volume(self, volume: &str) -> Self {
        self.both(|e| e.volume(volume))
    }

    /// Both engines' size.
    pub fn size(self, size: &str) -> Self {
        self.both(|e| e.size(size))
    }

    /// One token file for both, `<dir>/token`, holding `token`.
    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.into());
        let path = self.dir.join("token");
        self.both(|e| e.token_file(&path))
    }

    /// `--fault-injection` on both.
    pub fn fault_injection(self) -> Self {
        self.both(EngineBuilder::fault_injection)
    }

    /// More `serve` flags for both.
    pub fn args<S: AsRef<str>>(self, extra: &[S]) -> Self {
        self.both(|e| e.args(extra))
    }

    /// Changes engine a's builder.
    pub fn a(mut self, change: impl FnOnce(EngineBuilder) -> EngineBuilder) -> Self {
        self.a = change(self.a);
        self
    }

    /// Changes engine b's builder.
    pub fn b(mut self, change: impl FnOnce(EngineBuilder) -> EngineBuilder) -> Self {
        self.b = change(self.b);
        self
    }

    /// Restarts b once a listens, with a's address as its peer: each engine knows the other's
    /// address, as takeover and failback need.
    pub fn linked(mut self) -> Self {
        self.linked = true;
        self
    }

    fn both(mut self, change: impl Fn(EngineBuilder) -> EngineBuilder) -> Self {
        self.a = change(self.a);
        self.b = change(self.b);
        self
    }

    pub fn start(self) -> Result<Pair> {
        if let Some(t) = &self.token {
            std::fs::create_dir_all(&self.dir)
                .with_context(|| format!("create {}", self.dir.display()))?;
            std::fs::write(self.dir.join("token"), t).context("write the token file")?;
        }
        // A secondary needs a peer before a's address is known.
        let b = match self.b.has_peer() {
            true => self.b,
            false => self.b.peer("127.0.0.1:9"),
        };
        let mut b = b.start().context("starting engine b")?;
        let a = match self.a.has_peer() {
            true => self.a,
            false => self.a.peer(&b.grpc),
        };
        let a = a.start().context("starting engine a")?;
        if self.linked {
            b.restart_with(|c| c.peer(&a.grpc))
                .context("restarting engine b with a's address")?;
        }
        Ok(Pair { a, b })
    }
}

/// A running pair; `pair[0]` is a, `pair[1]` is b.
pub struct Pair {
    /// The first primary.
    pub a: Engine,
    /// The first secondary.
    pub b: Engine,
}

impl Index<usize> for Pair {
    type Output = Engine;
    fn index(&self, i: usize) -> &Engine {
        match i {
            0 => &self.a,
            1 => &self.b,
            _ => panic!("a pair has engines 0 and 1, not {i}"),
        }
    }
}

impl IndexMut<usize> for Pair {
    fn index_mut(&mut self, i: usize) -> &mut Engine {
        match i {
            0 => &mut self.a,
            1 => &mut self.b,
            _ => panic!("a pair has engines 0 and 1, not {i}"),
        }
    }
}

impl Pair {
    pub fn builder(dir: impl AsRef<Path>) -> PairBuilder {
        PairBuilder::new(dir)
    }

    /// "A" or "B", for messages.
    pub fn label(i: usize) -> &'static str {
        ["A", "B"][i]
    }

    /// Which engine serves host I/O now, if one does.
    pub fn serving(&self) -> Option<usize> {
        (0..2).find(|&i| self[i].status_json().is_ok_and(|s| s["role"] == "primary"))
    }

    /// Whether engine `i` serves with no takeover in progress and nothing pending, and the other
    /// is a consistent secondary.
    pub fn converged(&self, i: usize) -> Result<bool, String> {
        let p = self[i].status_json()?;
        let s = self[1 - i].status_json()?;
        Ok(p["role"] == "primary"
            && p["takeover_phase"] == ""
            && p["pair_state"] == "Synced"
            && p["pending_blocks"] == 0
            && s["role"] == "secondary"
            && s["pair_state"] == "Consistent")
    }

    /// Waits until [`Pair::converged`] holds for engine `i`; panics after `secs` or if a status
    /// fails.
    pub fn wait_converged(&self, i: usize, secs: u64) {
        self.wait(secs, "converged", || self.converged(i));
    }

    /// Waits until a has nothing pending and replicates in sync, and b is consistent; panics after
    /// `secs` or if a status fails.
    pub fn wait_synced(&self, secs: u64) {
        self.wait(secs, "in sync", || {
            let (a, b) = (self.a.status_json()?, self.b.status_json()?);
            Ok(a["pending_blocks"] == 0
                && a["pair_state"] == "Synced"
                && b["pair_state"] == "Consistent")
        });
    }

    fn wait(&self, secs: u64, what: &str, done: impl Fn() -> Result<bool, String>) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            match done() {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => panic!("status failed: {e}\n{}", self.describe()),
            }
            assert!(
                Instant::now() < deadline,
                "pair not {what} after {secs} s:\n{}",
                self.describe()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Whether the two data files hold the same bytes.
    pub fn files_identical(&self) -> bool {
        let read = |e: &Engine| {
            std::fs::read(e.data())
                .unwrap_or_else(|err| panic!("cannot read {}: {err}", e.data().display()))
        };
        read(&self.a) == read(&self.b)
    }

    /// Both engines' status and log tails.
    pub fn describe(&self) -> String {
        (0..2)
            .map(|i| {
                format!(
                    "engine {}: {}\n  log tail:\n{}\n",
                    Pair::label(i),
                    self[i].status_json().map_or_else(|e| e, |v| v.to_string()),
                    self[i].log_tail(20)
                )
            })
            .collect()
    }
}
