//! Shared harness for integration tests: real `tandem-engine` processes and real NBD clients.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

pub const ENGINE: &str = env!("CARGO_BIN_EXE_tandem-engine");

/// One engine process with its own state dir and data file.
pub struct Engine {
    pub dir: PathBuf,
    pub name: String,
    pub size: String,
    pub args: Vec<String>,
    pub child: Option<Child>,
    pub nbd: String,
    pub grpc: String,
}

impl Engine {
    /// Starts an engine in `dir` (created) with extra `serve` args.
    pub fn start(dir: &Path, name: &str, size: &str, extra: &[&str]) -> Engine {
        std::fs::create_dir_all(dir).unwrap();
        let mut e = Engine {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            size: size.to_string(),
            args: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
            nbd: String::new(),
            grpc: String::new(),
        };
        e.spawn("127.0.0.1:0", "127.0.0.1:0");
        e
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data.img")
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }
    pub fn uri(&self) -> String {
        format!("nbd://{}/{}", self.nbd, self.name)
    }
    pub fn unix_uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.name,
            self.socket().display()
        )
    }

    fn spawn(&mut self, nbd: &str, grpc: &str) {
        let ready = self.dir.join("ready");
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("engine.log"))
            .unwrap();
        let child = Command::new(ENGINE)
            .arg("serve")
            .args(["--volume", &self.name, "--size", &self.size])
            .arg("--data")
            .arg(self.data())
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .args(["--nbd-listen", nbd, "--grpc-listen", grpc])
            .arg("--nbd-socket")
            .arg(self.socket())
            .arg("--ready-file")
            .arg(&ready)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(s) = std::fs::read_to_string(&ready) {
                let v: serde_json::Value = serde_json::from_str(&s).unwrap();
                self.nbd = v["nbd"].as_str().unwrap().to_string();
                self.grpc = v["grpc"].as_str().unwrap().to_string();
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("engine exited early with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "engine did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("engine.log")).unwrap_or_default()
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns whether the engine exited successfully.
    pub fn terminate(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s.success();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts again on the same addresses and state.
    pub fn restart(&mut self) {
        self.kill();
        let (nbd, grpc) = (self.nbd.clone(), self.grpc.clone());
        self.spawn(&nbd, &grpc);
    }

    /// `tandem-engine status --json`.
    pub fn status(&self) -> serde_json::Value {
        self.status_with(&[])
    }

    pub fn status_with(&self, extra: &[&str]) -> serde_json::Value {
        let out = Command::new(ENGINE)
            .args([
                "status", "--grpc", &self.grpc, "--volume", &self.name, "--json",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a command; panics with its output if it cannot be started (missing tool).
pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (run scripts/install-deps.sh): {e}"))
}

pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// qemu-io against an NBD URI with the given commands; returns stdout.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> Output {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    run("qemu-io", &args)
}

/// qemu-io that must succeed without any failed command (qemu-io exits 0 even when a command fails).
pub fn qemu_io_ok(uri: &str, cmds: &[&str]) -> String {
    let out = qemu_io(uri, cmds);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("Pattern verification"),
        "qemu-io {cmds:?} on {uri}: {text}"
    );
    text
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Polls `f` until it returns true or `secs` pass.
pub fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A primary and a secondary on loopback, sharing a token.
pub struct Pair {
    pub p: Engine,
    pub s: Engine,
    pub token: PathBuf,
}

impl Pair {
    /// Starts the secondary, then the primary pointing at it. `extra` goes to both.
    pub fn start(dir: &Path, size: &str, extra_p: &[&str], extra_s: &[&str]) -> Pair {
        std::fs::create_dir_all(dir).unwrap();
        let token = dir.join("token");
        std::fs::write(&token, "s3cret-token\n").unwrap();
        let tok = token.to_str().unwrap().to_string();
        let mut s_args = vec![
            "--role",
            "secondary",
            "--token-file",
            &tok,
            "--peer",
            "127.0.0.1:9",
        ];
        s_args.extend_from_slice(extra_s);
        let s = Engine::start(&dir.join("s"), "vol", size, &s_args);
        let mut p_args = vec!["--token-file", &tok, "--peer", &s.grpc, "--fault-injection"];
        p_args.extend_from_slice(extra_p);
        let p = Engine::start(&dir.join("p"), "vol", size, &p_args);
        Pair { p, s, token }
    }

    pub fn tok(&self) -> String {
        self.token.to_str().unwrap().to_string()
    }

    pub fn status_p(&self) -> serde_json::Value {
        self.p.status_with(&["--token-file", &self.tok()])
    }

    pub fn status_s(&self) -> serde_json::Value {
        self.s.status_with(&["--token-file", &self.tok()])
    }

    /// `tandem-engine fault` on the primary.
    pub fn fault(&self, args: &[&str]) {
        let mut a = vec!["fault", "--grpc", &self.p.grpc, "--volume", "vol"];
        let tok = self.tok();
        a.extend_from_slice(&["--token-file", &tok]);
        a.extend_from_slice(args);
        run_ok(ENGINE, &a);
    }

    /// Waits until the primary has nothing pending and the secondary is consistent.
    pub fn wait_synced(&self, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let p = self.status_p();
            let s = self.status_s();
            if p["pending_blocks"] == 0
                && p["pair_state"] == "Synced"
                && s["pair_state"] == "Consistent"
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "pair not synced:\nprimary {p}\nsecondary {s}\nprimary log:\n{}\nsecondary log:\n{}",
                tail(&self.p.log(), 15),
                tail(&self.s.log(), 15)
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn files_identical(&self) -> bool {
        std::fs::read(self.p.data()).unwrap() == std::fs::read(self.s.data()).unwrap()
    }
}

/// Reads `len` bytes at `offset` of a file.
pub fn file_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, offset).unwrap();
    b
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Pair {
    /// A pair where each engine knows the other's address (needed for takeover and failback).
    /// The secondary is restarted once with the primary's real address; both allow fault injection.
    pub fn start_linked(dir: &Path, size: &str, extra_p: &[&str], extra_s: &[&str]) -> Pair {
        let mut s_extra = vec!["--fault-injection"];
        s_extra.extend_from_slice(extra_s);
        let mut pair = Pair::start(dir, size, extra_p, &s_extra);
        let pos = pair.s.args.iter().position(|a| a == "--peer").unwrap();
        pair.s.args[pos + 1] = pair.p.grpc.clone();
        pair.s.restart();
        pair
    }

    /// `tandem-engine <op> --grpc <engine> ...`; Ok(JSON) on exit 0, Err(stderr) otherwise.
    pub fn control(
        &self,
        op: &str,
        e: &Engine,
        extra: &[&str],
    ) -> Result<serde_json::Value, String> {
        let tok = self.tok();
        let mut a = vec![
            op,
            "--grpc",
            &e.grpc,
            "--volume",
            "vol",
            "--token-file",
            &tok,
        ];
        a.extend_from_slice(extra);
        let out = run(ENGINE, &a);
        if out.status.success() {
            Ok(serde_json::from_slice(&out.stdout).unwrap())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Takeover on the secondary (policy wait).
    pub fn takeover(&self) -> serde_json::Value {
        self.control("takeover", &self.s, &[])
            .unwrap_or_else(|e| panic!("takeover failed: {e}\nS log:\n{}", tail(&self.s.log(), 20)))
    }

    /// `tandem-engine fault` on either engine.
    pub fn fault_on(&self, e: &Engine, args: &[&str]) {
        let tok = self.tok();
        let mut a = vec![
            "fault",
            "--grpc",
            &e.grpc,
            "--volume",
            "vol",
            "--token-file",
            &tok,
        ];
        a.extend_from_slice(args);
        run_ok(ENGINE, &a);
    }

    pub fn status_of(&self, e: &Engine) -> serde_json::Value {
        e.status_with(&["--token-file", &self.tok()])
    }

    /// Waits until `serving` has finished its takeover and replicates, in sync, to the other.
    pub fn wait_converged(&self, serving: &Engine, other: &Engine, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let a = self.status_of(serving);
            let b = self.status_of(other);
            if a["role"] == "primary"
                && a["takeover_phase"] == ""
                && a["pair_state"] == "Synced"
                && a["pending_blocks"] == 0
                && b["role"] == "secondary"
                && b["pair_state"] == "Consistent"
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not converged:\nserving {a}\nother {b}\nserving log:\n{}\nother log:\n{}",
                tail(&serving.log(), 20),
                tail(&other.log(), 20)
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

/// Writes `byte` over one 4 KiB block through NBD.
pub fn put_block(uri: &str, block: u64, byte: u8) {
    qemu_io_ok(uri, &[&format!("write -P {byte} {} 4k", block * 4096)]);
}

/// Whether one 4 KiB block reads back as `byte` through NBD.
pub fn block_reads(uri: &str, block: u64, byte: u8) -> bool {
    let out = qemu_io(uri, &[&format!("read -P {byte} {} 4k", block * 4096)]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.status.success() && !text.contains("failed") && !text.contains("Pattern verification")
}

/// Whether block `block` of a file is all `byte`.
pub fn file_block_is(path: &Path, block: u64, byte: u8) -> bool {
    file_bytes(path, block * 4096, 4096)
        .iter()
        .all(|b| *b == byte)
}

/// The names of an engine's events, in order (the timestamp dropped).
pub fn event_names(status: &serde_json::Value) -> Vec<String> {
    status["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let s = e.as_str().unwrap();
            let rest = s.split_once(' ').map_or(s, |(_, r)| r);
            rest.split(' ').next().unwrap_or("").to_string()
        })
        .collect()
}

/// Index of the first event named `name`; panics if absent.
pub fn event_at(names: &[String], name: &str) -> usize {
    names
        .iter()
        .position(|n| n == name)
        .unwrap_or_else(|| panic!("event {name} missing from {names:?}"))
}

/// Reads `len` bytes at `offset` through NBD as one request (TCP address "host:port").
pub fn nbd_read(addr: &str, offset: u64, len: u32) -> Result<Vec<u8>, String> {
    use storage_engine::nbd::client::NbdClient;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = NbdClient::connect(addr, "vol")
            .await
            .map_err(|e| e.to_string())?;
        let d = c.read(offset, len).await.map_err(|e| e.to_string())?;
        let _ = c.disconnect().await;
        Ok(d)
    })
}

/// Cases for a model-based property test: `default` in CI, more with `TANDEM_MODEL_CASES=N`.
pub fn model_cases(default: u32) -> u32 {
    std::env::var("TANDEM_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
