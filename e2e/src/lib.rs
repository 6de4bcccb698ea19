//! Harness of Tandem's local end-to-end suite (`e2e/tests/local.rs`): real `tandem-engine` processes,
//! real `tandem-csi` plugins, and a test that plays kubelet over the CSI unix socket. Needs root,
//! /dev/fuse and loop devices; [`skip_reason`] says why a machine cannot run it.
//!
//! Mutual TLS is on by default (issue 13): each test's [`Scratch`] holds a CA of its own ([`Tls`]),
//! engines get an engine identity and `--node-name` ([`Scratch::engine`], [`EnginePair`]), stages
//! carry the volume's CSI Secret ([`Tls::secrets`]), and the tests' own calls speak as the operator.
//!
//! The binaries are the testkit's ([`Bin`]): built (or found up to date) with the same cargo and
//! profile that built the test, so the suite always exercises the code of this checkout.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use csi_node::pb;
use csi_node::pb::identity_client::IdentityClient;
use csi_node::pb::node_client::NodeClient;
use tonic::transport::Channel;

pub use tandem_api::contract::{
    secret_csi_cert_key, secret_csi_key_key, ATTR_ENGINES, ATTR_FAILOVER_POLICY, ATTR_NBD,
    ATTR_PEER_TIMEOUT, ATTR_SECONDARY_ACCESS, ATTR_SECONDARY_READ_MODE, ATTR_VOLUME, SECRET_CA_KEY,
    SECRET_TOKEN_KEY, VIEW_SNAPSHOT_PREFIX,
};
pub use tandem_api::pb::{FaultRequest, PairState, Role as EngineRole, StatusReply, TakeoverPhase};
pub use tandem_api::tls::{Ca, Identity, VolumeRef};
use tandem_testkit::{free_port, tail, Bin, Pair};
pub use tandem_testkit::{pattern, Engine, EngineBuilder};

/// A CSI Secret as kubelet hands it to NodeStageVolume (`secrets`).
pub type Secrets = HashMap<String, String>;

/// Why this machine cannot run the local suite, if it cannot.
pub fn skip_reason() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not root (attaching needs FUSE mounts, loop devices and mount(2))".into());
    }
    for dev in ["/dev/fuse", "/dev/loop-control"] {
        if !Path::new(dev).exists() {
            return Some(format!("{dev} is missing"));
        }
    }
    for tool in ["losetup", "mount", "umount", "blkid", "mkfs.ext4", "dd"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            return Some(format!("{tool} is not installed (scripts/install-deps.sh)"));
        }
    }
    None
}

/// Prints the skip reason and returns true if the test should not run.
pub fn skip(test: &str) -> bool {
    match skip_reason() {
        Some(why) => {
            println!("SKIP {test}: {why}");
            true
        }
        None => false,
    }
}

/// The suite's scenarios share loop devices and CPU; one at a time keeps them deterministic.
/// (An async mutex: each test runs in its own runtime, and the guard lives across awaits.)
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kill_child(child: &mut Child, sig: rustix::process::Signal) {
    if let Some(pid) = i32::try_from(child.id())
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, sig);
    }
    let _ = child.wait();
}

fn log_tail(path: &Path) -> String {
    tail(&std::fs::read_to_string(path).unwrap_or_default(), 30)
}

/// The role in a Status answer.
pub fn role(s: &StatusReply) -> EngineRole {
    EngineRole::try_from(s.role).unwrap_or(EngineRole::Unspecified)
}

/// Two engines of one volume on two "nodes": `a` (node-a) starts as the primary, `b` (node-b) as
/// its secondary, each with the other's gRPC address as `--peer` and with `--fault-injection`.
/// Where network namespaces work, node A's engine runs in its own namespace and node B's listens
/// on the host end of A's link, so plugins reach both over a real link and each engine reaches the
/// other without IP forwarding; elsewhere both listen on loopback. Both speak mutual TLS as engines
/// of the volume (`--tls-dir` from the scratch's CA, `--node-name`); their clients and CLIs as the
/// operator.
pub struct EnginePair {
    pub a: Engine,
    pub b: Engine,
    /// Dropped after the engines.
    pub netns: Option<Netns>,
}

impl EnginePair {
    pub fn start(
        scratch: &Scratch,
        volume: &str,
        size: &str,
        token: &str,
    ) -> anyhow::Result<EnginePair> {
        Self::start_with(scratch, volume, size, token, &[])
    }

    /// [`EnginePair::start`] with extra `serve` flags for both engines.
    pub fn start_with(
        scratch: &Scratch,
        volume: &str,
        size: &str,
        token: &str,
        args: &[&str],
    ) -> anyhow::Result<EnginePair> {
        let netns = match netns_skip_reason() {
            None => Some(Netns::create(11)?),
            Some(why) => {
                println!("engine pair on loopback: {why}");
                None
            }
        };
        // The secondary must know the primary's real address from its start, so A's gRPC port is
        // chosen up front: any port inside A's own namespace, else a free one on loopback. Each
        // engine serves NBD only on the unix socket in its own directory, pinned exports only, as
        // the operator's pods do: NBD never crosses the link.
        let (b_host, a_grpc) = match &netns {
            Some(n) => (n.host_ip.clone(), format!("{}:9500", n.ns_ip)),
            None => ("127.0.0.1".into(), free_port()),
        };
        // Each engine speaks mutual TLS as an engine of the volume, on its node; the tests'
        // own calls (status, faults, the CLI) speak as the operator.
        let tls = &scratch.tls;
        let (tls_a, tls_b) = (
            tls.engine_dir(volume, "node-a")?,
            tls.engine_dir(volume, "node-b")?,
        );
        let op = tls.operator_dir();
        let mut pair = Pair::builder(&scratch.root)
            .volume(volume)
            .size(size)
            .token(token)
            .fault_injection()
            .args(args)
            .a(|e| {
                e.nbd_local_only()
                    .grpc_listen(&a_grpc)
                    .tls_dir(&tls_a)
                    .node_name("node-a")
                    .client_tls_dir(&op)
            })
            .b(|e| {
                e.nbd_local_only()
                    .grpc_listen(&format!("{b_host}:0"))
                    .peer(&a_grpc)
                    .tls_dir(&tls_b)
                    .node_name("node-b")
                    .client_tls_dir(&op)
            });
        if let Some(n) = &netns {
            pair = pair.a(|e| e.netns(&n.name));
        }
        let Pair { a, b } = pair.start()?;
        Ok(EnginePair { a, b, netns })
    }

    /// The volume context the operator emits for this pair (node-a, node-b).
    pub fn volume_context(&self) -> HashMap<String, String> {
        volume_context(self.a.volume(), &[("node-a", &self.a), ("node-b", &self.b)])
    }

    /// Waits until `primary` has finished any takeover and replicates in sync to `secondary`
    /// (nothing pending), and `secondary` holds a consistent replica.
    pub async fn wait_converged(
        primary: &Engine,
        secondary: &Engine,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let (p, s) = (primary.status().await?, secondary.status().await?);
            if role(&p) == EngineRole::Primary
                && p.takeover() == TakeoverPhase::None
                && p.pair() == PairState::Synced
                && p.pending_blocks == 0
                && role(&s) == EngineRole::Secondary
                && s.pair() == PairState::Consistent
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "not converged after {timeout:?}:\nprimary {p:?}\nsecondary {s:?}\nprimary log:\n{}\nsecondary log:\n{}",
                    primary.log_tail(30),
                    secondary.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A network namespace joined to the host by a veth pair: a "node" with its own address.
pub struct Netns {
    pub name: String,
    pub host_ip: String,
    pub ns_ip: String,
    host_if: String,
}

impl Netns {
    /// `subnet` (0..100) and this process's id pick 10.<100+subnet>.<pid % 250>.0/24, so suites
    /// running at the same time do not collide: the host side is .1, the namespace .2.
    pub fn create(subnet: u8) -> anyhow::Result<Netns> {
        let tag = std::process::id() % 100_000;
        let (a, b) = (100 + u32::from(subnet % 100), std::process::id() % 250);
        let n = Netns {
            name: format!("tandem-e2e-{subnet}-{tag}"),
            host_ip: format!("10.{a}.{b}.1"),
            ns_ip: format!("10.{a}.{b}.2"),
            host_if: format!("te{subnet}h{tag}"),
        };
        let ns_if = format!("te{subnet}n{tag}");
        sh(Command::new("ip").args(["netns", "add", &n.name]))?;
        sh(Command::new("ip").args([
            "link", "add", &n.host_if, "type", "veth", "peer", "name", &ns_if,
        ]))?;
        sh(Command::new("ip").args(["link", "set", &ns_if, "netns", &n.name]))?;
        sh(Command::new("ip").args([
            "addr",
            "add",
            &format!("{}/24", n.host_ip),
            "dev",
            &n.host_if,
        ]))?;
        sh(Command::new("ip").args(["link", "set", &n.host_if, "up"]))?;
        let exec = |args: &[&str]| {
            sh(Command::new("ip")
                .args(["netns", "exec", &n.name, "ip"])
                .args(args))
        };
        exec(&["addr", "add", &format!("{}/24", n.ns_ip), "dev", &ns_if])?;
        exec(&["link", "set", &ns_if, "up"])?;
        exec(&["link", "set", "lo", "up"])?;
        Ok(n)
    }

    /// Cuts or restores the link (packets are dropped, connections are not reset).
    pub fn set_link(&self, up: bool) -> anyhow::Result<()> {
        sh(Command::new("ip").args(["link", "set", &self.host_if, if up { "up" } else { "down" }]))
            .map(|_| ())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}

/// Why network namespaces cannot be used here, if they cannot.
pub fn netns_skip_reason() -> Option<String> {
    let probe = format!("tandem-e2e-probe-{}", std::process::id());
    match Command::new("ip").args(["netns", "add", &probe]).output() {
        Ok(o) if o.status.success() => {
            let _ = Command::new("ip").args(["netns", "del", &probe]).output();
            None
        }
        Ok(o) => Some(format!(
            "ip netns add failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("ip (iproute2) not usable: {e}")),
    }
}

/// One `tandem-csi` plugin process: a node.
pub struct Plugin {
    pub node_id: String,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub health: String,
    bin: PathBuf,
    child: Option<Child>,
}

impl Plugin {
    pub fn start(dir: &Path, node_id: &str) -> anyhow::Result<Plugin> {
        std::fs::create_dir_all(dir)?;
        let health = free_port();
        let mut p = Plugin {
            node_id: node_id.into(),
            dir: dir.to_path_buf(),
            socket: dir.join("csi.sock"),
            health,
            bin: Bin::Csi.path()?,
            child: None,
        };
        p.restart()?;
        Ok(p)
    }

    /// Starts (again) on the same state dir.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("plugin.log"))?;
        let child = Command::new(&self.bin)
            .arg("--endpoint")
            .arg(format!("unix://{}", self.socket.display()))
            .args(["--node-id", &self.node_id])
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .args(["--health-listen", &self.health])
            .args(["--io-timeout-secs", "10", "--attach-timeout-secs", "20"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start tandem-csi")?;
        self.child = Some(child);
        let sock = self.socket.clone();
        wait_for("the CSI socket", Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(&sock).ok()
        })
        .with_context(|| log_tail(&self.dir.join("plugin.log")))?;
        Ok(())
    }

    /// SIGKILL: the plugin dies without any cleanup, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_child(&mut c, rustix::process::Signal::KILL);
        }
    }

    pub fn log(&self) -> String {
        log_tail(&self.dir.join("plugin.log"))
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub async fn client(&self) -> anyhow::Result<Csi> {
        let ch = tonic::transport::Endpoint::try_from(format!("unix://{}", self.socket.display()))?
            .connect()
            .await
            .with_context(|| format!("connect to {}", self.socket.display()))?;
        Ok(Csi {
            node: NodeClient::new(ch.clone()),
            identity: IdentityClient::new(ch),
        })
    }

    /// `GET /metrics` body.
    pub fn metrics(&self) -> anyhow::Result<String> {
        use std::io::Write;
        let mut c = std::net::TcpStream::connect(&self.health)?;
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let mut s = String::new();
        c.read_to_string(&mut s)?;
        Ok(s)
    }

    /// `GET /healthz` status line.
    pub fn healthz(&self) -> anyhow::Result<String> {
        use std::io::Write;
        let mut c = std::net::TcpStream::connect(&self.health)?;
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let mut s = String::new();
        c.read_to_string(&mut s)?;
        Ok(s.lines().next().unwrap_or_default().to_string())
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A CSI client: what kubelet holds.
pub struct Csi {
    pub node: NodeClient<Channel>,
    pub identity: IdentityClient<Channel>,
}

impl Csi {
    /// NodeStageVolume then NodePublishVolume of `volume_id` as kubelet does for a pod (`fs`:
    /// `None` for raw block).
    pub async fn stage_and_publish(
        &mut self,
        volume_id: &str,
        paths: (&Path, &Path),
        fs: Option<&str>,
        context: &HashMap<String, String>,
        secrets: &Secrets,
    ) -> Result<(), tonic::Status> {
        let (staging, target) = paths;
        self.node
            .node_stage_volume(stage_request(volume_id, staging, fs, context, secrets))
            .await?;
        self.node
            .node_publish_volume(publish_request(volume_id, staging, target, fs))
            .await?;
        Ok(())
    }

    /// NodeUnpublishVolume then NodeUnstageVolume, the reverse of `stage_and_publish`.
    pub async fn unpublish_and_unstage(
        &mut self,
        volume_id: &str,
        paths: (&Path, &Path),
    ) -> Result<(), tonic::Status> {
        let (staging, target) = paths;
        self.node
            .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: volume_id.into(),
                target_path: target.display().to_string(),
            })
            .await?;
        self.node
            .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                volume_id: volume_id.into(),
                staging_target_path: staging.display().to_string(),
            })
            .await?;
        Ok(())
    }
}

/// Filesystem (`Some("ext4")`) or raw block (`None`) capability, single-node writer.
pub fn capability(fs: Option<&str>) -> pb::VolumeCapability {
    use pb::volume_capability::{
        access_mode::Mode, AccessMode, AccessType, BlockVolume, MountVolume,
    };
    pb::VolumeCapability {
        access_type: Some(match fs {
            Some(fs) => AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                mount_flags: vec![],
                volume_mount_group: String::new(),
            }),
            None => AccessType::Block(BlockVolume {}),
        }),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

/// The same capability, read-only with `mode` (SINGLE_NODE_READER_ONLY or MULTI_NODE_READER_ONLY).
pub fn reader_capability(
    fs: Option<&str>,
    mode: pb::volume_capability::access_mode::Mode,
) -> pb::VolumeCapability {
    let mut cap = capability(fs);
    cap.access_mode = Some(pb::volume_capability::AccessMode { mode: mode as i32 });
    cap
}

/// The volume context the operator emits for `engines` (node name → engine).
pub fn volume_context(volume: &str, engines: &[(&str, &Engine)]) -> HashMap<String, String> {
    let list = |f: fn(&Engine) -> String| {
        engines
            .iter()
            .map(|(n, e)| format!("{n}={}", f(e)))
            .collect::<Vec<_>>()
            .join(",")
    };
    HashMap::from([
        (ATTR_VOLUME.to_string(), volume.to_string()),
        (ATTR_ENGINES.to_string(), list(|e| e.grpc.clone())),
        (ATTR_NBD.to_string(), list(|e| e.nbd_addr())),
    ])
}

/// NodeStageVolume as kubelet sends it, with the volume's CSI Secret (`secrets`, e.g.
/// [`Tls::secrets`]).
pub fn stage_request(
    volume_id: &str,
    staging: &Path,
    fs: Option<&str>,
    context: &HashMap<String, String>,
    secrets: &Secrets,
) -> pb::NodeStageVolumeRequest {
    pb::NodeStageVolumeRequest {
        volume_id: volume_id.into(),
        publish_context: HashMap::new(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(capability(fs)),
        secrets: secrets.clone(),
        volume_context: context.clone(),
    }
}

pub fn publish_request(
    volume_id: &str,
    staging: &Path,
    target: &Path,
    fs: Option<&str>,
) -> pb::NodePublishVolumeRequest {
    pb::NodePublishVolumeRequest {
        volume_id: volume_id.into(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(capability(fs)),
        readonly: false,
        ..Default::default()
    }
}

// ---------- what the host looks like ----------

/// Mount points at or under `root`.
pub fn mounts_under(root: &Path) -> Vec<(PathBuf, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    csi_node::mount::parse_mountinfo(&text)
        .into_iter()
        .filter(|m| m.mount_point.starts_with(root))
        .map(|m| (m.mount_point, m.fs_type))
        .collect()
}

/// Loop devices whose backing file lies under `root`.
pub fn loops_under(root: &Path) -> Vec<(String, String)> {
    let out = Command::new("losetup")
        .args(["-n", "-l", "-O", "NAME,BACK-FILE"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let root = root.display().to_string();
    out.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.collect::<Vec<_>>().join(" ")))
        })
        .filter(|(_, f)| f.starts_with(&root))
        .collect()
}

/// Live attach daemons whose directory lies under `root`.
pub fn daemons_under(root: &Path) -> Vec<u32> {
    let root = root.display().to_string();
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline"))
                        .map(|c| {
                            let s = String::from_utf8_lossy(&c);
                            s.contains("attach-fuse") && s.contains(&root)
                        })
                        .unwrap_or(false)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Nothing left under `root` (one node's directories): no mount (FUSE included), loop device or
/// attach daemon.
pub fn assert_clean_under(root: &Path) {
    assert_eq!(mounts_under(root), Vec::new(), "mounts left behind");
    assert_eq!(loops_under(root), Vec::new(), "loop devices left behind");
    assert_eq!(
        daemons_under(root),
        Vec::<u32>::new(),
        "attach daemons left behind"
    );
}

/// Is the loop device in direct-I/O mode?
pub fn loop_dio(dev: &str) -> bool {
    let name = dev.trim_start_matches("/dev/");
    std::fs::read_to_string(format!("/sys/block/{name}/loop/dio"))
        .map(|s| s.trim() == "1")
        .unwrap_or(false)
}

// ---------- mutual TLS, as the operator sets it up ----------

/// The namespace of every volume identity in the suite.
pub const NAMESPACE: &str = "e2e";
/// The nodes the suite's plugins play; a volume's CSI Secret carries a pair for each.
pub const NODES: [&str; 2] = ["node-a", "node-b"];
const CERT_LIFETIME: Duration = Duration::from_secs(86400);

/// What the operator mints for a test's volumes (issue 13): a CA, each engine's `--tls-dir` (an
/// engine of its volume), the operator's own identity (the tests' status, fault and CLI calls),
/// and each volume's CSI Secret (the token, `ca.crt` and a CSI pair per node).
pub struct Tls {
    dir: PathBuf,
    ca: Ca,
}

impl Tls {
    /// A new CA, and the operator's identity in `<dir>/operator`.
    pub fn new(dir: &Path) -> anyhow::Result<Tls> {
        let tls = Tls {
            dir: dir.to_path_buf(),
            ca: Ca::generate("tandem e2e CA", CERT_LIFETIME)?,
        };
        tls.issue_dir(&tls.operator_dir(), &Identity::Operator)?;
        Ok(tls)
    }

    /// The CA (e.g. to issue a certificate the operator would never hand out).
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// `volume` as the suite's identities name it.
    pub fn volume(volume: &str) -> VolumeRef {
        VolumeRef::new(NAMESPACE, volume)
    }

    /// The `--tls-dir` of the operator.
    pub fn operator_dir(&self) -> PathBuf {
        self.dir.join("operator")
    }

    fn issue_dir(&self, dir: &Path, id: &Identity) -> anyhow::Result<()> {
        let issued = self.ca.issue(id, &[], CERT_LIFETIME)?;
        tandem_api::tls::mint::write_dir(dir, self.ca.cert_pem(), &issued)?;
        Ok(())
    }

    /// A fresh `--tls-dir` for the engine of `volume` on `node`: an engine identity of the volume
    /// (both engines of a pair hold one, each with its own key).
    pub fn engine_dir(&self, volume: &str, node: &str) -> anyhow::Result<PathBuf> {
        let dir = self.dir.join(format!("engine-{volume}-{node}"));
        self.issue_dir(
            &dir,
            &Identity::Engine {
                volume: Self::volume(volume),
            },
        )?;
        Ok(dir)
    }

    /// `b` with `--tls-dir` ([`Tls::engine_dir`]) and `--node-name node`; its CLI and gRPC client
    /// speak as the operator.
    pub fn engine(
        &self,
        b: EngineBuilder,
        volume: &str,
        node: &str,
    ) -> anyhow::Result<EngineBuilder> {
        Ok(b.tls_dir(self.engine_dir(volume, node)?)
            .node_name(node)
            .client_tls_dir(self.operator_dir()))
    }

    /// A certificate and key (PEM) for `id`.
    pub fn pair(&self, id: &Identity) -> anyhow::Result<(String, String)> {
        let issued = self.ca.issue(id, &[], CERT_LIFETIME)?;
        Ok((issued.cert_pem, issued.key_pem))
    }

    /// The CSI plugin's identity for `volume` on `node`.
    pub fn csi(volume: &str, node: &str) -> Identity {
        Identity::Csi {
            volume: Self::volume(volume),
            node: node.into(),
        }
    }

    /// The CSI Secret of `volume`, as the operator writes it and kubelet hands it to every node's
    /// NodeStageVolume: the token, `ca.crt`, and `csi.<node>.crt`/`.key` for each of [`NODES`].
    pub fn secrets(&self, volume: &str, token: &str) -> anyhow::Result<Secrets> {
        let mut s = Secrets::from([
            (SECRET_TOKEN_KEY.to_string(), token.to_string()),
            (SECRET_CA_KEY.to_string(), self.ca.cert_pem().to_string()),
        ]);
        for node in NODES {
            let (cert, key) = self.pair(&Self::csi(volume, node))?;
            s.insert(secret_csi_cert_key(node), cert);
            s.insert(secret_csi_key_key(node), key);
        }
        Ok(s)
    }
}

/// The test's scratch directory and its TLS material (a CA of its own, in `<root>/tls`); on drop
/// it tears down whatever a failed test left behind (mounts, loop devices, attach daemons under
/// it), so one failure does not poison the next test.
pub struct Scratch {
    pub root: PathBuf,
    pub tls: Tls,
    _dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new(name: &str) -> anyhow::Result<Scratch> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("tandem-e2e-{name}-"))
            .tempdir()?;
        let root = dir.path().canonicalize()?;
        Ok(Scratch {
            tls: Tls::new(&root.join("tls"))?,
            root,
            _dir: dir,
        })
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.root.join(p)
    }

    /// An engine of `volume` on `node`, in `<root>/<name>`, with mutual TLS as the operator
    /// deploys it ([`Tls::engine`]).
    pub fn engine(&self, name: &str, node: &str, volume: &str) -> anyhow::Result<EngineBuilder> {
        self.tls.engine(
            EngineBuilder::new(self.path(name)).volume(volume),
            volume,
            node,
        )
    }

    /// The CSI Secret of `volume` ([`Tls::secrets`]).
    pub fn secrets(&self, volume: &str, token: &str) -> anyhow::Result<Secrets> {
        self.tls.secrets(volume, token)
    }

    /// Nothing of ours left on the host: no mount, loop device or attach daemon under the root.
    pub fn assert_clean(&self) {
        assert_clean_under(&self.root);
    }

    fn teardown(&self) {
        // Loop devices first, while their backing files still have paths under the root (a lazy
        // unmount would hide them); a busy one is only marked for auto-clear and goes with its mount.
        for (dev, _) in loops_under(&self.root) {
            let _ = Command::new("losetup").args(["-d", &dev]).output();
        }
        let mut mounts = mounts_under(&self.root);
        mounts.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (m, _) in &mounts {
            let _ = Command::new("umount").arg("-l").arg(m).output();
        }
        for pid in daemons_under(&self.root) {
            if let Some(p) = i32::try_from(pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
            {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.teardown();
    }
}

// ---------- data with checksums ----------

/// Writes `n` files of varied sizes under `dir`, fsyncs them, returns name → crc32c.
pub fn write_files(dir: &Path, prefix: &str, n: u64) -> anyhow::Result<Vec<(PathBuf, u32)>> {
    use std::io::Write;
    let mut out = Vec::new();
    for i in 0..n {
        let len = 4096 * (1 + (i as usize * 37) % 300) + (i as usize * 131) % 4096;
        let data = pattern(i + prefix.len() as u64 * 1000, len);
        let p = dir.join(format!("{prefix}-{i:03}.bin"));
        let mut f = std::fs::File::create(&p)?;
        f.write_all(&data)?;
        f.sync_all()?;
        out.push((p, crc32c::crc32c(&data)));
    }
    std::fs::File::open(dir)?.sync_all()?;
    Ok(out)
}

/// Every file still has its checksum.
pub fn verify_files(files: &[(PathBuf, u32)]) -> anyhow::Result<()> {
    for (p, crc) in files {
        let data = std::fs::read(p).with_context(|| format!("read {}", p.display()))?;
        let got = crc32c::crc32c(&data);
        if got != *crc {
            bail!("{}: crc32c {got:#x}, expected {crc:#x}", p.display());
        }
    }
    Ok(())
}

/// The first offset where two files differ (a length difference counts), or `None` if equal.
pub fn first_difference(a: &Path, b: &Path) -> anyhow::Result<Option<u64>> {
    let open = |p: &Path| std::fs::File::open(p).with_context(|| format!("open {}", p.display()));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    let mut at = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        let n = na.min(nb);
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .take_while(|(x, y)| x == y)
                .count();
            return Ok(Some(at + i as u64));
        }
        if na != nb {
            return Ok(Some(at + na.min(nb) as u64));
        }
        if na == 0 {
            return Ok(None);
        }
        at += na as u64;
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Runs a command, failing with its stderr.
pub fn sh(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| shown.clone())?;
    if !out.status.success() {
        bail!("{shown}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ---------- a workload with a write history ----------

/// A buffer of `len` bytes aligned for O_DIRECT (4 KiB), holding `data` if given.
struct Aligned {
    buf: Vec<u8>,
    at: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let buf = vec![0u8; len + 4096];
        let at = buf.as_ptr().align_offset(4096);
        Aligned { buf, at, len }
    }
    fn bytes(&self) -> &[u8] {
        &self.buf[self.at..self.at + self.len]
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.at..self.at + self.len]
    }
}

fn open_direct(path: &Path) -> anyhow::Result<std::fs::File> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::open(
        path,
        OFlags::RDWR | OFlags::DIRECT | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("open {} with O_DIRECT", path.display()))?;
    Ok(std::fs::File::from(fd))
}

/// Reads `len` bytes from the start of `path` with O_DIRECT (no page cache on this node).
pub fn read_direct(path: &Path, len: usize) -> anyhow::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = open_direct(path)?;
    let mut out = Vec::with_capacity(len);
    let mut buf = Aligned::new(1 << 20);
    while out.len() < len {
        let n = (len - out.len()).min(1 << 20);
        let b = &mut buf.bytes_mut()[..n];
        f.read_exact_at(b, out.len() as u64)
            .with_context(|| format!("read {} at {}", path.display(), out.len()))?;
        out.extend_from_slice(b);
    }
    Ok(out)
}

/// The workload of issue 12's disruption tests: one thread writes `block`-sized patterns with
/// O_DIRECT over the first `len` bytes of a device or file, each to a new offset and seed,
/// fdatasyncs (an NBD FLUSH) every 8 writes, and records each write once it returned, in order:
/// the acknowledged-write history. Any failed write or flush stops it with that error.
pub struct HistoryWriter {
    acked: std::sync::Arc<std::sync::Mutex<Vec<(u64, u64)>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<Duration>>>,
    block: usize,
    len: u64,
}

/// What a [`HistoryWriter`] had acknowledged when it stopped.
pub struct History {
    /// (offset, pattern seed), in the order the writes returned.
    pub writes: Vec<(u64, u64)>,
    pub block: usize,
    pub len: u64,
    /// The longest single write or flush: the stall the workload saw.
    pub longest: Duration,
}

impl HistoryWriter {
    /// Starts writing to `path` (a block device, or a regular file that is first filled with
    /// zeros and synced). Seeds start at `first_seed`, so two runs never write the same bytes.
    pub fn start(
        path: &Path,
        len: u64,
        block: usize,
        first_seed: u64,
    ) -> anyhow::Result<HistoryWriter> {
        use std::os::unix::fs::FileExt;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        if !path.exists() || std::fs::metadata(path)?.is_file() {
            let f = std::fs::File::create(path)?;
            f.write_all_at(&vec![0u8; len as usize], 0)?;
            f.sync_all()?;
        }
        let file = open_direct(path)?;
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (acked.clone(), stop.clone());
        let blocks = len / block as u64;
        let path = path.to_path_buf();
        let thread = std::thread::spawn(move || -> anyhow::Result<Duration> {
            let mut buf = Aligned::new(block);
            let mut longest = Duration::ZERO;
            let mut i = 0u64;
            while !s.load(Ordering::SeqCst) {
                // A stride prime to the block count visits every block before repeating.
                let offset = (i * 7919 % blocks) * block as u64;
                let seed = first_seed + i;
                buf.bytes_mut().copy_from_slice(&pattern(seed, block));
                let t = Instant::now();
                file.write_all_at(buf.bytes(), offset).with_context(|| {
                    format!(
                        "write #{i} at {offset} of {} failed after {:?}",
                        path.display(),
                        t.elapsed()
                    )
                })?;
                if i % 8 == 7 {
                    file.sync_data().with_context(|| {
                        format!("fdatasync after write #{i} of {}", path.display())
                    })?;
                }
                longest = longest.max(t.elapsed());
                a.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((offset, seed));
                i += 1;
            }
            file.sync_data().context("the last fdatasync")?;
            Ok(longest)
        });
        Ok(HistoryWriter {
            acked,
            stop,
            thread: Some(thread),
            block,
            len,
        })
    }

    /// How many writes have returned so far.
    pub fn acked(&self) -> usize {
        self.acked.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Is the writer still writing (no write has failed)?
    pub fn running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Waits until `n` writes in all have returned; fails if the writer stopped on an error.
    pub async fn wait_acked(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.acked() < n {
            if !self.running() {
                bail!("the writer stopped after {} writes", self.acked());
            }
            if Instant::now() > deadline {
                bail!("only {} of {n} writes within {timeout:?}", self.acked());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Stops the writer; its error if a write or flush failed, else the history.
    pub fn finish(mut self) -> anyhow::Result<History> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let longest = match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r?,
            Some(Err(_)) => bail!("the writer panicked"),
            None => Duration::ZERO,
        };
        let writes = std::mem::take(&mut *self.acked.lock().unwrap_or_else(|p| p.into_inner()));
        Ok(History {
            writes,
            block: self.block,
            len: self.len,
            longest,
        })
    }
}

impl Drop for HistoryWriter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl History {
    /// This history, then `later`'s (a second workload on the same region, e.g. the pod that
    /// replaced this one).
    pub fn followed_by(mut self, later: History) -> History {
        self.writes.extend(later.writes);
        self.longest = self.longest.max(later.longest);
        self
    }

    /// The region's bytes after every acknowledged write, applied in order to zeros.
    pub fn expected(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.len as usize];
        for (offset, seed) in &self.writes {
            let at = *offset as usize;
            out[at..at + self.block].copy_from_slice(&pattern(*seed, self.block));
        }
        out
    }

    /// `bytes` (the region read back) hold every acknowledged write.
    pub fn check(&self, what: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let want = self.expected();
        anyhow::ensure!(
            bytes.len() >= want.len(),
            "{what}: {} bytes, expected {}",
            bytes.len(),
            want.len()
        );
        if let Some(at) = (0..want.len())
            .step_by(self.block)
            .find(|&at| bytes[at..at + self.block] != want[at..at + self.block])
        {
            let last = self.writes.iter().rev().find(|(o, _)| *o as usize == at);
            bail!(
                "{what}: the block at {at} does not hold its last acknowledged write {last:?} \
                 ({} writes acknowledged)",
                self.writes.len()
            );
        }
        Ok(())
    }
}

/// Writes `len` bytes of pattern `seed` at `offset` with O_DIRECT through dd.
pub fn dd_write(dev: &Path, offset: u64, seed: u64, len: usize, dir: &Path) -> anyhow::Result<()> {
    let src = dir.join(format!("pattern-{seed}"));
    std::fs::write(&src, pattern(seed, len))?;
    sh(Command::new("dd")
        .arg(format!("if={}", src.display()))
        .arg(format!("of={}", dev.display()))
        .args([
            "bs=4096",
            "oflag=direct,seek_bytes",
            "conv=notrunc,fsync",
            "status=none",
        ])
        .arg(format!("seek={offset}")))?;
    Ok(())
}

/// Reads `len` bytes at `offset` with O_DIRECT through dd.
pub fn dd_read(dev: &Path, offset: u64, len: usize) -> anyhow::Result<Vec<u8>> {
    let out = Command::new("dd")
        .arg(format!("if={}", dev.display()))
        .args([
            "bs=4096",
            "iflag=direct,skip_bytes,count_bytes",
            "status=none",
        ])
        .arg(format!("skip={offset}"))
        .arg(format!("count={len}"))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "dd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}
