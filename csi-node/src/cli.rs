//! Command line: `tandem-csi --endpoint unix:///PATH --node-id NAME --state-dir DIR` serves CSI;
//! the hidden `tandem-csi attach-fuse ...` is the per-volume attach daemon the plugin spawns.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::attach::FuseLoopAttacher;
use crate::engine::GrpcEngines;
use crate::fusefs::{run_daemon, DaemonArgs};
use crate::health::{self, HealthChecks};
use crate::mount::SystemMounter;
use crate::node::NodeService;
use crate::pb::identity_server::IdentityServer;
use crate::pb::node_server::NodeServer;
use crate::service::{IdentityGrpc, NodeGrpc};
use crate::state::StateStore;

#[derive(Parser, Debug)]
#[command(
    name = "tandem-csi",
    version,
    about = "Tandem's CSI node plugin (driver csi.tandem.dev)",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// CSI endpoint: unix:///path/to/csi.sock
    #[arg(long, env = "CSI_ENDPOINT")]
    pub endpoint: Option<String>,
    /// This node's name (the Kubernetes node name; engines are listed by it).
    #[arg(long, env = "NODE_ID")]
    pub node_id: Option<String>,
    /// Where the plugin keeps its records and attachments; must survive plugin restarts.
    #[arg(
        long,
        env = "TANDEM_CSI_STATE_DIR",
        default_value = "/var/lib/tandem-csi"
    )]
    pub state_dir: PathBuf,
    /// Liveness endpoint (`GET /healthz`), e.g. 0.0.0.0:9808. Off when not given.
    #[arg(long)]
    pub health_listen: Option<String>,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// An NBD request unanswered this long on a live engine connection fails with an I/O error.
    #[arg(long, default_value_t = 30)]
    pub io_timeout_secs: u64,
    /// How long I/O waits for an unreachable engine (e.g. while it restarts) before it fails
    /// with EIO: the longest stall an engine restart may cause the workload.
    #[arg(long, default_value_t = 120)]
    pub reconnect_timeout_secs: u64,
    /// How long attaching (starting the FUSE daemon, connecting to the engine) may take.
    #[arg(long, default_value_t = 30)]
    pub attach_timeout_secs: u64,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Internal: serve one NBD export as `<dir>/fuse/disk` (spawned by the plugin, one per volume).
    #[command(hide = true)]
    AttachFuse(AttachFuseArgs),
}

#[derive(Args, Debug)]
pub struct AttachFuseArgs {
    #[arg(long)]
    pub nbd: String,
    #[arg(long)]
    pub export: String,
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long)]
    pub read_only: bool,
    /// A read-only export (a view) served writable through a throw-away local overlay.
    #[arg(long)]
    pub overlay: bool,
    #[arg(long, default_value_t = 30)]
    pub io_timeout_secs: u64,
    #[arg(long, default_value_t = 120)]
    pub reconnect_timeout_secs: u64,
    #[arg(long, default_value_t = 2)]
    pub fuse_threads: usize,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // fuser logs a harmless warning when it finds the filesystem already unmounted by us.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fuser=error"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => b.json().try_init(),
        LogFormat::Text => b.with_ansi(false).try_init(),
    };
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Some(Cmd::AttachFuse(a)) => {
            init_logging(LogFormat::Text);
            run_daemon(DaemonArgs {
                nbd: a.nbd,
                export: a.export,
                dir: a.dir,
                read_only: a.read_only,
                overlay: a.overlay,
                io_timeout: Duration::from_secs(a.io_timeout_secs.max(1)),
                reconnect_timeout: Duration::from_secs(a.reconnect_timeout_secs.max(1)),
                fuse_threads: a.fuse_threads,
            })
        }
        None => {
            init_logging(cli.serve.log_format);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("start the async runtime")
                .and_then(|rt| rt.block_on(serve(cli.serve)))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("tandem-csi: {e:#}");
            if e.is::<crate::fusefs::EngineRefused>() {
                ExitCode::from(crate::fusefs::EXIT_REFUSED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// `unix:///path`, `unix:/path` or a bare absolute path.
pub fn socket_path(endpoint: &str) -> anyhow::Result<PathBuf> {
    let p = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    if !p.starts_with('/') {
        bail!("endpoint {endpoint:?}: expected unix:///absolute/path");
    }
    Ok(PathBuf::from(p))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
    tracing::info!("shutting down (attachments stay up; a restarted plugin takes them over)");
}

fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("remove stale socket {}", path.display())),
    }
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let endpoint = args
        .endpoint
        .context("--endpoint (or CSI_ENDPOINT) is required")?;
    let node_id = args
        .node_id
        .filter(|n| !n.trim().is_empty())
        .context("--node-id (or NODE_ID) is required")?;
    let socket = socket_path(&endpoint)?;
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("create {}", args.state_dir.display()))?;
    let state_dir = args.state_dir.canonicalize()?;
    let state = StateStore::open(&state_dir)?;
    let attacher = FuseLoopAttacher {
        root: state_dir.join("attach"),
        exe: std::env::current_exe().context("locate this executable")?,
        io_timeout: Duration::from_secs(args.io_timeout_secs.max(1)),
        reconnect_timeout: Duration::from_secs(args.reconnect_timeout_secs.max(1)),
        start_timeout: Duration::from_secs(args.attach_timeout_secs.max(1)),
    };
    if Path::new("/sys/module/nbd").exists() {
        tracing::warn!(
            "nbd.ko is loaded, but the kernel NBD attach path (the production path) is not \
             implemented yet; attaching through FUSE + loop"
        );
    }
    let svc = Arc::new(NodeService::new(
        node_id.clone(),
        state,
        GrpcEngines::default(),
        attacher,
        SystemMounter,
    ));
    svc.recover().await?;

    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    remove_stale_socket(&socket)?;
    let listener = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("bind {}", socket.display()))?;

    let health_task = match &args.health_listen {
        Some(addr) => {
            let (l, bound) = health::bind(addr)
                .await
                .with_context(|| format!("bind health endpoint {addr}"))?;
            tracing::info!(%bound, "liveness endpoint: GET /healthz");
            Some(tokio::spawn(health::serve(
                l,
                HealthChecks {
                    state_dir: state_dir.clone(),
                    csi_socket: socket.clone(),
                    node: node_id.clone(),
                },
            )))
        }
        None => None,
    };

    tracing::info!(node_id, socket = %socket.display(), state_dir = %state_dir.display(), "serving CSI");
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(IdentityGrpc {
            state_dir: state_dir.clone(),
        }))
        .add_service(NodeServer::new(NodeGrpc { svc }))
        // Any client's :authority (Python gRPC sends the socket path): tandem_api::authority.
        .serve_with_incoming_shutdown(tandem_api::authority::incoming(listener), shutdown_signal())
        .await
        .context("CSI server")?;
    if let Some(t) = health_task {
        t.abort();
    }
    remove_stale_socket(&socket)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The node plugin's socket answers a client whatever it sends as `:authority`: kubelet's
    /// `localhost`, Python gRPC's percent-encoded path, grpc-java's bare path, a `unix://` URI (h2 alone
    /// resets the last three with PROTOCOL_ERROR).
    #[tokio::test]
    async fn the_plugin_answers_any_authority() {
        use tandem_testkit::h2raw::assert_answers_any_authority;
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("csi/csi.sock");
        let endpoint = format!("unix://{}", socket.display());
        let args = Cli::parse_from([
            "tandem-csi",
            "--endpoint",
            &endpoint,
            "--node-id",
            "node-1",
            "--state-dir",
            &dir.path().join("state").display().to_string(),
        ]);
        let server = tokio::spawn(serve(args.serve));
        assert_answers_any_authority(&socket, &endpoint).await;
        server.abort();
    }

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            socket_path("unix:///csi/csi.sock").unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        assert_eq!(
            socket_path("unix:/csi/csi.sock").unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        assert!(socket_path("tcp://1.2.3.4:5").is_err());
    }

    #[test]
    fn cli_parses_both_forms() {
        let c = Cli::try_parse_from([
            "tandem-csi",
            "--endpoint",
            "unix:///tmp/x.sock",
            "--node-id",
            "n1",
            "--state-dir",
            "/tmp/s",
        ])
        .unwrap();
        assert!(c.cmd.is_none());
        assert_eq!(c.serve.node_id.as_deref(), Some("n1"));
        let c = Cli::try_parse_from([
            "tandem-csi",
            "attach-fuse",
            "--nbd",
            "h:1",
            "--export",
            "v",
            "--dir",
            "/d",
        ])
        .unwrap();
        assert!(matches!(c.cmd, Some(Cmd::AttachFuse(_))));
    }
}
