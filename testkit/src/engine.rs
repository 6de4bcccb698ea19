//! One `tandem-engine serve` process: a builder for its flags and files, then the process with its
//! lifecycle (SIGKILL, SIGTERM, SIGSTOP/SIGCONT, restart on the same addresses and state), the
//! engine's CLI and its gRPC client.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use rustix::process::{kill_process, Pid, Signal};
use serde_json::Value;
use tandem_api::{
    client::{EngineClient, StatusReply},
    pb::FaultRequest,
};

use crate::{tools::tail, Bin};

#[derive(Clone, Debug)]
enum Token {
    /// Written to `<dir>/token` at each start.
    Contents(String),
    /// An existing file (a pair shares one).
    File(PathBuf),
}

/// How to start one engine. Its files live in one directory: `data.img`, `state/`, `engine.log`
/// (stdout and stderr, appended across restarts), `ready.json`, and `nbd.sock` and `token` when asked for.
#[derive(Clone, Debug)]
pub struct EngineBuilder {
    bin: Option<PathBuf>,
    dir: PathBuf,
    volume: String,
    size: String,
    role: Option<String>,
    peer: Option<String>,
    token: Option<Token>,
    nbd_listen: String,
    grpc_listen: String,
    nbd_socket: bool,
    netns: Option<String>,
    fault_injection: bool,
    args: Vec<String>,
    ready_timeout: Duration,
    tls_dir: Option<PathBuf>,
    node_name: Option<String>,
    client_tls_dir: Option<PathBuf>,
    env: Vec<(String, String)>,
}

impl EngineBuilder {
    /// Volume `vol` of 16 MiB, the engine's default role, NBD and gRPC on loopback with any port,
    /// no token, ready within 20 s.
    pub fn new(dir: impl AsRef<Path>) -> EngineBuilder {
        EngineBuilder {
            bin: None,
            dir: dir.as_ref().to_path_buf(),
            volume: "vol".into(),
            size: "16M".into(),
            role: None,
            peer: None,
            token: None,
            nbd_listen: "127.0.0.1:0".into(),
            grpc_listen: "127.0.0.1:0".into(),
            nbd_socket: false,
            netns: None,
            fault_injection: false,
            args: Vec::new(),
            ready_timeout: Duration::from_secs(20),
            tls_dir: None,
            node_name: None,
            client_tls_dir: None,
            env: Vec::new(),
        }
    }

    /// A prebuilt `tandem-engine` instead of the workspace's ([`Bin::Engine`]).
    pub fn bin(mut self, bin: impl AsRef<Path>) -> Self {
        self.bin = Some(bin.as_ref().to_path_buf());
        self
    }

    /// The volume, also the NBD export name.
    pub fn volume(mut self, volume: &str) -> Self {
        self.volume = volume.into();
        self
    }

    /// `--size` (bytes, or with a K/M/G suffix).
    pub fn size(mut self, size: &str) -> Self {
        self.size = size.into();
        self
    }

    /// `--role` (`primary` or `secondary`; a secondary needs a peer).
    pub fn role(mut self, role: &str) -> Self {
        self.role = Some(role.into());
        self
    }

    /// `--peer`: the other engine's gRPC address.
    pub fn peer(mut self, peer: &str) -> Self {
        self.peer = Some(peer.into());
        self
    }

    pub(crate) fn has_peer(&self) -> bool {
        self.peer.is_some()
    }

    /// `--token-file <dir>/token`, holding `token`.
    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(Token::Contents(token.into()));
        self
    }

    /// `--token-file path`, an existing file.
    pub fn token_file(mut self, path: impl AsRef<Path>) -> Self {
        self.token = Some(Token::File(path.as_ref().to_path_buf()));
        self
    }

    /// `--nbd-listen` for the first start (`HOST:0` for any port); restarts keep the bound address.
    pub fn nbd_listen(mut self, addr: &str) -> Self {
        self.nbd_listen = addr.into();
        self
    }

    /// `--grpc-listen` for the first start (`HOST:0` for any port); restarts keep the bound address.
    pub fn grpc_listen(mut self, addr: &str) -> Self {
        self.grpc_listen = addr.into();
        self
    }

    /// Also serve NBD on `<dir>/nbd.sock`.
    pub fn nbd_socket(mut self) -> Self {
        self.nbd_socket = true;
        self
    }

    /// NBD as the operator's pods serve it: on `<dir>/nbd.sock` only (`--nbd-listen off`), and only
    /// the pinned export `<volume>@<epoch>` (`--nbd-pinned-exports-only`).
    pub fn nbd_local_only(mut self) -> Self {
        self.nbd_listen = NBD_OFF.into();
        self.nbd_socket = true;
        self.args.push("--nbd-pinned-exports-only".into());
        self
    }

    /// Runs the engine (and its CLI) inside network namespace `ns`, through `ip netns exec`, which
    /// execs it: the child's pid is the engine's.
    pub fn netns(mut self, ns: &str) -> Self {
        self.netns = Some(ns.into());
        self
    }

    /// `--fault-injection`: allows the InjectFault RPC.
    pub fn fault_injection(mut self) -> Self {
        self.fault_injection = true;
        self
    }

    /// More `serve` flags.
    pub fn args<S: AsRef<str>>(mut self, extra: impl IntoIterator<Item = S>) -> Self {
        self.args
            .extend(extra.into_iter().map(|s| s.as_ref().to_string()));
        self
    }

    /// `--tls-dir`: the engine's own certificates (`tandem-engine certs issue --identity engine`).
    pub fn tls_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.tls_dir = Some(dir.as_ref().to_path_buf());
        self
    }

    /// `--node-name`.
    pub fn node_name(mut self, node: &str) -> Self {
        self.node_name = Some(node.into());
        self
    }

    /// The `--tls-dir` the engine's CLI ([`Engine::cli`]) and gRPC client ([`Engine::status`],
    /// ...) use, e.g. an operator identity.
    pub fn client_tls_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.client_tls_dir = Some(dir.as_ref().to_path_buf());
        self
    }

    /// An environment variable for `serve` (e.g. `RUST_LOG`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// How long the engine may take to write its ready file.
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    fn token_path(&self) -> Option<PathBuf> {
        match &self.token {
            Some(Token::Contents(_)) => Some(self.dir.join("token")),
            Some(Token::File(p)) => Some(p.clone()),
            None => None,
        }
    }

    /// Starts the engine and waits until it listens (its ready file names the bound addresses).
    pub fn start(self) -> Result<Engine> {
        let mut e = Engine {
            nbd: self.nbd_listen.clone(),
            grpc: self.grpc_listen.clone(),
            bin: match &self.bin {
                Some(b) => b.clone(),
                None => Bin::Engine.path()?,
            },
            cfg: self,
            child: None,
            stopped: false,
        };
        e.launch()?;
        Ok(e)
    }
}

/// `--nbd-listen off`; also [`Engine::nbd`] of an engine without an NBD TCP listener.
pub const NBD_OFF: &str = "off";

/// A running (or killed) `tandem-engine serve`; SIGKILLed on drop.
#[derive(Debug)]
pub struct Engine {
    /// The NBD address (`HOST:PORT`), bound at the first start and kept by restarts; [`NBD_OFF`]
    /// when it has no TCP listener.
    pub nbd: String,
    /// The gRPC address (`HOST:PORT`), bound at the first start and kept by restarts.
    pub grpc: String,
    cfg: EngineBuilder,
    bin: PathBuf,
    child: Option<Child>,
    stopped: bool,
}

impl Engine {
    fn launch(&mut self) -> Result<()> {
        let dir = self.cfg.dir.clone();
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        if let Some(Token::Contents(t)) = &self.cfg.token {
            std::fs::write(dir.join("token"), t).context("write the token file")?;
        }
        let ready = dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("engine.log"))
            .context("open engine.log")?;
        let mut cmd = self.command();
        cmd.arg("serve")
            .args(["--volume", &self.cfg.volume, "--size", &self.cfg.size])
            .arg("--data")
            .arg(self.data())
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(["--nbd-listen", &self.nbd, "--grpc-listen", &self.grpc])
            .arg("--ready-file")
            .arg(&ready);
        if self.cfg.nbd_socket {
            cmd.arg("--nbd-socket").arg(self.socket());
        }
        if let Some(role) = &self.cfg.role {
            cmd.args(["--role", role]);
        }
        if let Some(peer) = &self.cfg.peer {
            cmd.args(["--peer", peer]);
        }
        if let Some(t) = self.token_file() {
            cmd.arg("--token-file").arg(t);
        }
        if self.cfg.fault_injection {
            cmd.arg("--fault-injection");
        }
        if let Some(d) = &self.cfg.tls_dir {
            cmd.arg("--tls-dir").arg(d);
        }
        if let Some(n) = &self.cfg.node_name {
            cmd.args(["--node-name", n]);
        }
        let child = cmd
            .args(&self.cfg.args)
            .envs(self.cfg.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("clone the log handle")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", self.bin.display()))?;
        self.child = Some(child);
        self.stopped = false;
        let deadline = Instant::now() + self.cfg.ready_timeout;
        loop {
            // Parsed in full or not at all: the engine may be halfway through writing it.
            if let Some(v) = std::fs::read(&ready)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            {
                let field = |k: &str| {
                    v[k].as_str()
                        .map(str::to_string)
                        .with_context(|| format!("ready file without {k}: {v}"))
                };
                // The ready file's "nbd" is null with --nbd-listen off.
                self.nbd = match &v["nbd"] {
                    Value::Null => NBD_OFF.to_string(),
                    _ => field("nbd")?,
                };
                self.grpc = field("grpc")?;
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!(
                    "engine in {} exited early with {status}:\n{}",
                    dir.display(),
                    self.log_tail(25)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "engine in {} did not start within {:?}:\n{}",
                    dir.display(),
                    self.cfg.ready_timeout,
                    self.log_tail(25)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn volume(&self) -> &str {
        &self.cfg.volume
    }

    /// The data file (raw image).
    pub fn data(&self) -> PathBuf {
        self.cfg.dir.join("data.img")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.cfg.dir.join("state")
    }

    /// The unix socket it serves NBD on, if started with [`EngineBuilder::nbd_socket`].
    pub fn socket(&self) -> PathBuf {
        self.cfg.dir.join("nbd.sock")
    }

    fn token_file(&self) -> Option<PathBuf> {
        self.cfg.token_path()
    }

    /// `nbd://HOST:PORT/<volume>`.
    pub fn uri(&self) -> String {
        format!("nbd://{}/{}", self.nbd, self.cfg.volume)
    }

    /// `nbd+unix:///<volume>?socket=...`.
    pub fn unix_uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.cfg.volume,
            self.socket().display()
        )
    }

    /// Where a host reaches its NBD export: TCP, or `unix:PATH` for an engine in a namespace or
    /// without a TCP listener.
    pub fn nbd_addr(&self) -> String {
        if self.cfg.netns.is_some() || self.nbd == NBD_OFF {
            format!("unix:{}", self.socket().display())
        } else {
            self.nbd.clone()
        }
    }

    /// `nbd+unix:///<export>?socket=...`: any export name, e.g. the pinned `<volume>@<epoch>`.
    pub fn unix_uri_for(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket().display())
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it was started and not killed since.
    pub fn alive(&self) -> bool {
        self.child.is_some()
    }

    /// The whole engine log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.cfg.dir.join("engine.log")).unwrap_or_default()
    }

    /// The last `n` lines of the engine log.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log(), n)
    }

    /// SIGKILL: no shutdown code runs (a crash, a dead node).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.stopped = false;
    }

    /// SIGTERM, then waits up to 20 s; whether the engine exited successfully.
    pub fn terminate(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        self.stopped = false;
        let deadline = Instant::now() + Duration::from_secs(20);
        let sent = signal(&c, Signal::TERM).is_ok();
        loop {
            match c.try_wait() {
                Ok(Some(s)) => return s.success(),
                Ok(None) if sent && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = c.kill();
                    let _ = c.wait();
                    return false;
                }
            }
        }
    }

    /// SIGSTOP: the process freezes with its sockets open (a hung node, as the peer sees it).
    pub fn stop(&mut self) -> Result<()> {
        self.signal(Signal::STOP)?;
        self.stopped = true;
        Ok(())
    }

    /// SIGCONT after [`Engine::stop`]; nothing otherwise.
    pub fn cont(&mut self) -> Result<()> {
        if self.stopped {
            self.signal(Signal::CONT)?;
            self.stopped = false;
        }
        Ok(())
    }

    fn signal(&self, sig: Signal) -> Result<()> {
        let child = self
            .child
            .as_ref()
            .with_context(|| format!("engine in {} is not running", self.cfg.dir.display()))?;
        signal(child, sig)
    }

    /// Starts it again (SIGKILL first if it runs) on the same addresses, data and state.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.launch()
    }

    /// [`Engine::restart`] with changed flags (a new role, peer, token or more args).
    pub fn restart_with(
        &mut self,
        change: impl FnOnce(EngineBuilder) -> EngineBuilder,
    ) -> Result<()> {
        self.kill();
        self.cfg = change(self.cfg.clone());
        self.launch()
    }

    /// The engine binary, inside the engine's network namespace if it has one.
    pub fn command(&self) -> Command {
        match &self.cfg.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        }
    }

    /// `tandem-engine <op> --grpc <this engine> --volume <volume> [--token-file <its token>]`.
    pub fn cli(&self, op: &str) -> Command {
        let mut c = self.command();
        c.args([op, "--grpc", &self.grpc, "--volume", &self.cfg.volume]);
        if let Some(t) = self.token_file() {
            c.arg("--token-file").arg(t);
        }
        if let Some(d) = &self.cfg.client_tls_dir {
            c.arg("--tls-dir").arg(d);
        }
        c
    }

    /// Runs [`Engine::cli`] with `extra`: its stdout as JSON (or as a string if it is not JSON) on
    /// success, its stderr otherwise. `status`, `takeover` and `failback` get `--json` (their
    /// default is the human form); a refusal's stderr is then JSON: [`refusal_reason`] reads it.
    pub fn control(&self, op: &str, extra: &[&str]) -> Result<Value, String> {
        let mut cmd = self.cli(op);
        cmd.args(extra);
        if matches!(op, "status" | "takeover" | "failback") && !extra.contains(&"--json") {
            cmd.arg("--json");
        }
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.bin.display()))?;
        if out.status.success() {
            Ok(serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&out.stdout).into())))
        } else {
            // The CLI's error without the backtrace anyhow appends under RUST_BACKTRACE.
            let err = String::from_utf8_lossy(&out.stderr);
            let err = err.split("\nStack backtrace:").next().unwrap_or_default();
            Err(err.trim().to_string())
        }
    }

    /// `tandem-engine status --json`.
    pub fn status_json(&self) -> Result<Value, String> {
        self.control("status", &[])
    }

    /// A gRPC client with the engine's token (and the operator's TLS identity when set).
    pub async fn client(&self) -> Result<EngineClient> {
        let token = match self.token_file() {
            Some(p) => Some(
                std::fs::read_to_string(&p)
                    .with_context(|| format!("read {}", p.display()))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        let tls = match &self.cfg.client_tls_dir {
            Some(d) => Some(
                tandem_api::tls::ClientTls::from_dir(d)
                    .with_context(|| format!("TLS material in {}", d.display()))?,
            ),
            None => None,
        };
        EngineClient::connect_with(&self.grpc, token.as_deref(), tls.as_ref())
            .await
            .with_context(|| format!("connect to the engine at {}", self.grpc))
    }

    /// The engine's Status answer, over gRPC.
    pub async fn status(&self) -> Result<StatusReply> {
        self.client()
            .await?
            .status(&self.cfg.volume)
            .await
            .with_context(|| format!("status of the engine at {}", self.grpc))
    }

    /// InjectFault over gRPC, for this engine's volume (needs `--fault-injection`).
    pub async fn fault(&self, req: FaultRequest) -> Result<()> {
        self.client()
            .await?
            .inject_fault(FaultRequest {
                volume: self.cfg.volume.clone(),
                ..req
            })
            .await
            .with_context(|| format!("fault on the engine at {}", self.grpc))?;
        Ok(())
    }

    /// Polls Status until `done` holds for it; on timeout the error shows the last answer and the
    /// log's tail.
    pub async fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&StatusReply) -> bool,
    ) -> Result<StatusReply> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status().await?;
            if done(&s) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {what}; last status {s:?}\nengine log:\n{}",
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn signal(child: &Child, sig: Signal) -> Result<()> {
    let pid = i32::try_from(child.id())
        .ok()
        .and_then(Pid::from_raw)
        .with_context(|| format!("no pid for {}", child.id()))?;
    kill_process(pid, sig).with_context(|| format!("{sig:?} to {}", child.id()))?;
    Ok(())
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The engine's [`tandem_api::Reason`] in the stderr of a refused `takeover|failback --json` (what
/// [`Engine::control`] returns as its error); `None` when it names none (the engine was not reached,
/// or the text is not such a refusal).
pub fn refusal_reason(stderr: &str) -> Option<tandem_api::Reason> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .find_map(|v| v["reason"].as_str().and_then(tandem_api::Reason::from_name))
}
