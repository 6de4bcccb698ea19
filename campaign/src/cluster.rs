//! Real `tandem-engine` processes: a linked pair on loopback, SIGKILL/restart, SIGSTOP/SIGCONT,
//! and the engine's own CLI for takeover, failback, fault injection and status.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

pub const VOLUME: &str = "vol";

pub struct Engine {
    pub label: &'static str,
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub size: String,
    pub args: Vec<String>,
    pub child: Option<Child>,
    pub nbd: String,
    pub grpc: String,
    pub stopped: bool,
    /// The network namespace it runs in (`ip netns exec`); hosts then reach it through its unix
    /// socket, the CLI from inside the namespace.
    pub netns: Option<String>,
}

impl Engine {
    fn new(label: &'static str, bin: &Path, dir: &Path, size: &str, args: Vec<String>) -> Engine {
        Engine {
            label,
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            size: size.to_string(),
            args,
            child: None,
            nbd: "127.0.0.1:0".into(),
            grpc: "127.0.0.1:0".into(),
            stopped: false,
            netns: None,
        }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data.img")
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }

    /// Where a host reaches its NBD export: TCP, or `unix:PATH` for an engine in a namespace.
    pub fn nbd_addr(&self) -> String {
        match &self.netns {
            Some(_) => format!("unix:{}", self.socket().display()),
            None => self.nbd.clone(),
        }
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `bin`, run inside this engine's namespace if it has one.
    fn command(&self, bin: &Path) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin);
                c
            }
            None => Command::new(bin),
        }
    }

    /// Starts the process on its addresses (port 0 the first time) and waits for its ready file.
    pub fn spawn(&mut self) -> Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let ready = self.dir.join("ready");
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("engine.log"))?;
        let mut cmd = self.command(&self.bin);
        cmd.arg("serve");
        if self.netns.is_some() {
            cmd.arg("--nbd-socket").arg(self.socket());
        }
        let child = cmd
            .args(["--volume", VOLUME, "--size", &self.size])
            .arg("--data")
            .arg(self.data())
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .args(["--nbd-listen", &self.nbd, "--grpc-listen", &self.grpc])
            .arg("--ready-file")
            .arg(&ready)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        self.stopped = false;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(s) = std::fs::read_to_string(&ready) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&s) {
                    let field = |k: &str| {
                        v[k].as_str()
                            .map(str::to_string)
                            .ok_or_else(|| anyhow!("ready file without {k}: {s}"))
                    };
                    self.nbd = field("nbd")?;
                    self.grpc = field("grpc")?;
                    return Ok(());
                }
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(st) = c.try_wait()? {
                    bail!(
                        "engine {} exited early with {st}:\n{}",
                        self.label,
                        self.log_tail(20)
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "engine {} did not start:\n{}",
                    self.label,
                    self.log_tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log_tail(&self, n: usize) -> String {
        let s = std::fs::read_to_string(self.dir.join("engine.log")).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn alive(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.stopped = false;
    }

    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    fn signal(&mut self, sig: &str) -> Result<()> {
        let Some(c) = &self.child else {
            bail!("engine {} is not running", self.label)
        };
        let st = Command::new("kill")
            .args([sig, &c.id().to_string()])
            .status()?;
        if !st.success() {
            bail!("kill {sig} {} failed", c.id());
        }
        Ok(())
    }

    /// SIGSTOP: the process freezes with its sockets open (a hung node, as the peer sees it).
    pub fn stop(&mut self) -> Result<()> {
        self.signal("-STOP")?;
        self.stopped = true;
        Ok(())
    }

    pub fn cont(&mut self) -> Result<()> {
        if self.stopped {
            self.signal("-CONT")?;
            self.stopped = false;
        }
        Ok(())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.cont();
        self.kill();
    }
}

pub struct Pair {
    /// 0: A, the first primary; 1: B, the first secondary.
    pub e: [Engine; 2],
    pub token: PathBuf,
    pub bin: PathBuf,
}

impl Pair {
    /// A linked pair: each engine knows the other's gRPC address; both allow fault injection.
    pub fn start(bin: &Path, dir: &Path, size: &str, extra: &[String]) -> Result<Pair> {
        std::fs::create_dir_all(dir)?;
        let token = dir.join("token");
        std::fs::write(&token, "campaign-token\n")?;
        let tok = token.to_string_lossy().into_owned();
        let common = |peer: &str| {
            let mut a: Vec<String> = ["--token-file", &tok, "--peer", peer, "--fault-injection"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            a.extend_from_slice(extra);
            a
        };
        let mut b_args = vec!["--role".to_string(), "secondary".to_string()];
        b_args.extend(common("127.0.0.1:9"));
        let mut b = Engine::new("B", bin, &dir.join("b"), size, b_args);
        b.spawn()?;
        let mut a = Engine::new("A", bin, &dir.join("a"), size, common(&b.grpc));
        a.spawn()?;
        if let Some(pos) = b.args.iter().position(|x| x == "--peer") {
            b.args[pos + 1] = a.grpc.clone();
        }
        b.restart()?;
        Ok(Pair {
            e: [a, b],
            token,
            bin: bin.to_path_buf(),
        })
    }

    /// A pair whose engines run in the network namespaces `ns` and listen for gRPC on the fixed
    /// addresses `grpc` (one each, reachable from the other namespace).
    pub fn start_netns(
        bin: &Path,
        dir: &Path,
        size: &str,
        extra: &[String],
        ns: [&str; 2],
        grpc: [&str; 2],
    ) -> Result<Pair> {
        std::fs::create_dir_all(dir)?;
        let token = dir.join("token");
        std::fs::write(&token, "campaign-token\n")?;
        let tok = token.to_string_lossy().into_owned();
        let args = |i: usize| {
            let mut a: Vec<String> = vec![];
            if i == 1 {
                a.extend(["--role".to_string(), "secondary".to_string()]);
            }
            a.extend(
                [
                    "--token-file",
                    &tok,
                    "--peer",
                    grpc[1 - i],
                    "--fault-injection",
                ]
                .iter()
                .map(|s| s.to_string()),
            );
            a.extend_from_slice(extra);
            a
        };
        let mk = |i: usize, label| {
            let mut e = Engine::new(label, bin, &dir.join(label.to_lowercase()), size, args(i));
            e.netns = Some(ns[i].to_string());
            e.grpc = grpc[i].to_string();
            e
        };
        let mut b = mk(1, "B");
        b.spawn()?;
        let mut a = mk(0, "A");
        a.spawn()?;
        Ok(Pair {
            e: [a, b],
            token,
            bin: bin.to_path_buf(),
        })
    }

    /// `tandem-engine <op> --grpc <engine i> --volume vol --token-file .. <extra>`: stdout as
    /// JSON on success, stderr otherwise.
    pub fn control(&self, op: &str, i: usize, extra: &[&str]) -> Result<serde_json::Value, String> {
        let out = self.e[i]
            .command(&self.bin)
            .args([
                op,
                "--grpc",
                &self.e[i].grpc,
                "--volume",
                VOLUME,
                "--token-file",
            ])
            .arg(&self.token)
            .args(extra)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.bin.display()))?;
        if out.status.success() {
            serde_json::from_slice(&out.stdout).or_else(|_| {
                Ok(serde_json::Value::String(
                    String::from_utf8_lossy(&out.stdout).into(),
                ))
            })
        } else {
            // The CLI's error without the backtrace anyhow appends under RUST_BACKTRACE.
            let err = String::from_utf8_lossy(&out.stderr);
            let err = err.split("\nStack backtrace:").next().unwrap_or_default();
            Err(err.trim().to_string())
        }
    }

    pub fn status(&self, i: usize) -> Result<serde_json::Value, String> {
        self.control("status", i, &["--json"])
    }

    pub fn fault(&self, i: usize, args: &[&str]) -> Result<(), String> {
        self.control("fault", i, args).map(|_| ())
    }

    /// Which engine serves host I/O now, if one does.
    pub fn serving(&self) -> Option<usize> {
        (0..2).find(|&i| self.status(i).is_ok_and(|s| s["role"] == "primary"))
    }

    /// Whether `i` serves with no takeover in progress, nothing pending, and the other is a
    /// consistent secondary.
    pub fn converged(&self, i: usize) -> Result<bool, String> {
        let a = self.status(i)?;
        let b = self.status(1 - i)?;
        Ok(a["role"] == "primary"
            && a["takeover_phase"] == ""
            && a["pair_state"] == "Synced"
            && a["pending_blocks"] == 0
            && b["role"] == "secondary"
            && b["pair_state"] == "Consistent")
    }

    pub fn describe(&self) -> String {
        let mut s = String::new();
        for i in 0..2 {
            s += &format!(
                "engine {}: {}\n  log tail:\n{}\n",
                self.e[i].label,
                self.status(i).map_or_else(|e| e, |v| v.to_string()),
                self.e[i].log_tail(12)
            );
        }
        s
    }
}

/// The first 4 KiB block at which two files differ, and how many blocks differ.
pub fn compare_files(a: &Path, b: &Path) -> Result<Option<(u64, u64)>> {
    use std::io::Read;
    let mut fa = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(a)?);
    let mut fb = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 4096], vec![0u8; 4096]);
    let mut first = None;
    let mut count = 0u64;
    let mut block = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if na == 0 && nb == 0 {
            break;
        }
        if na != nb || ba[..na] != bb[..nb] {
            first.get_or_insert(block);
            count += 1;
        }
        block += 1;
        fn read_full(r: &mut impl Read, b: &mut [u8]) -> std::io::Result<usize> {
            let mut n = 0;
            while n < b.len() {
                let k = r.read(&mut b[n..])?;
                if k == 0 {
                    break;
                }
                n += k;
            }
            Ok(n)
        }
    }
    Ok(first.map(|f| (f, count)))
}

/// The engine binary: `--engine`, else `tandem-engine` next to this binary.
pub fn locate_engine(arg: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = arg {
        return Ok(p);
    }
    let me = std::env::current_exe()?;
    let dir = me
        .parent()
        .ok_or_else(|| anyhow!("no directory for {}", me.display()))?;
    let p = dir.join("tandem-engine");
    if p.exists() {
        Ok(p)
    } else {
        bail!(
            "no tandem-engine next to {} (build it with `cargo build -p storage-engine` or pass --engine)",
            me.display()
        )
    }
}
