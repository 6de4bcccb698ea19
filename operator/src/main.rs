//! `tandem-operator`: `run` starts the controller (with leader election, probes and metrics);
//! `crd` prints the MirroredVolume CRD as YAML (what crds/ and the chart's crds/ hold);
//! `csi-controller` serves the CSI Controller service for the provisioning sidecars.

use std::{io::Write, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kube::{Api, Client};
use operator::{
    controller::{self, Context},
    crd::MirroredVolume,
    engine::GrpcEngines,
    http::{self, Health},
    leader::{self, LeaderConfig},
    metrics::Metrics,
    plan::EngineConfig,
    telemetry::{self, LogFormat},
};

#[derive(Parser)]
#[command(
    name = "tandem-operator",
    version,
    about = "Tandem's MirroredVolume operator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller.
    Run(Box<RunArgs>),
    /// Print the MirroredVolume CustomResourceDefinition as YAML.
    Crd,
    /// Print, without a cluster, the objects the operator would create for the MirroredVolumes in a file.
    Render(RenderArgs),
    /// Serve the CSI Controller service (CreateVolume, expansion, snapshots) on a unix socket for
    /// the kubernetes-csi sidecars.
    CsiController(CsiControllerArgs),
}

#[derive(clap::Args)]
struct CsiControllerArgs {
    /// The CSI socket the sidecars dial.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    csi_endpoint: String,
    /// The operator's namespace: the CA Secret `tandem-ca` (for the operator identity the engines
    /// require for snapshots) and the volume tokens. Must match the operator's `--namespace`.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
    /// Cluster DNS domain used in engine addresses (as the operator's).
    #[arg(long, env = "TANDEM_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// How long CreateVolume and ControllerExpandVolume wait for the operator before answering
    /// ABORTED (the sidecars retry). Keep it below the sidecars' --timeout.
    #[arg(long, env = "TANDEM_CSI_WAIT_SECONDS", default_value_t = 20)]
    wait_seconds: u64,
    /// Lifetime of the operator client certificate this process mints, in days.
    #[arg(long, env = "TANDEM_CERT_VALIDITY_DAYS", default_value_t = 90, value_parser = clap::value_parser!(u64).range(1..=3650))]
    cert_validity_days: u64,
    /// Log format.
    #[arg(long, env = "TANDEM_LOG_FORMAT", value_enum, default_value = "json")]
    log_format: LogFormat,
}

#[derive(clap::Args)]
struct RenderArgs {
    /// YAML file with MirroredVolumes (other documents are skipped).
    #[arg(short, long)]
    file: std::path::PathBuf,
    /// Engine image to put in the pods.
    #[arg(long, default_value = "tandem-engine:dev")]
    engine_image: String,
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// The operator's namespace, where the engine objects go.
    #[arg(long, default_value = "tandem-system")]
    namespace: String,
    /// Root under which `engineStorage.hostPath` must lie.
    #[arg(long, default_value = "/var/lib/tandem")]
    allowed_host_path_root: String,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Image of the engine pods (`tandem-engine`).
    #[arg(long, env = "TANDEM_ENGINE_IMAGE")]
    engine_image: String,
    /// Pull policy for engine pods (Always, IfNotPresent, Never).
    #[arg(long, env = "TANDEM_ENGINE_IMAGE_PULL_POLICY")]
    engine_image_pull_policy: Option<String>,
    /// Priority class for engine pods.
    #[arg(long, env = "TANDEM_ENGINE_PRIORITY_CLASS")]
    engine_priority_class: Option<String>,
    /// Engine pod settings as JSON (the chart's engine.* values): imagePullSecrets, tolerations,
    /// nodeSelector, resources, annotations, logFormat.
    #[arg(long, env = "TANDEM_ENGINE_POD", value_parser = operator::engine_pod::EnginePodSettings::parse)]
    engine_pod: Option<operator::engine_pod::EnginePodSettings>,
    /// Cluster DNS domain used in engine addresses.
    #[arg(long, env = "TANDEM_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "TANDEM_HTTP_LISTEN", default_value = "0.0.0.0:8080")]
    http_listen: SocketAddr,
    /// Log format.
    #[arg(long, env = "TANDEM_LOG_FORMAT", value_enum, default_value = "json")]
    log_format: LogFormat,
    /// Take part in leader election (disable only for a single local replica).
    #[arg(long, env = "TANDEM_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// The operator's namespace: the leader Lease, the CA Secret `tandem-ca`, and every volume's engine
    /// pods, Services, Secrets, engine PVCs and PodDisruptionBudget (the chart sets the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
    /// `engineStorage.hostPath` must lie under this directory; other volumes are refused
    /// (condition reason HostPathNotAllowed).
    #[arg(
        long,
        env = "TANDEM_ALLOWED_HOST_PATH_ROOT",
        default_value = "/var/lib/tandem"
    )]
    allowed_host_path_root: String,
    /// Lifetime of the engine and CSI certificates, in days; each is issued again when a third is left.
    #[arg(long, env = "TANDEM_CERT_VALIDITY_DAYS", default_value_t = 90, value_parser = clap::value_parser!(u64).range(1..=3650))]
    cert_validity_days: u64,
    /// This replica's identity in the Lease and in events.
    #[arg(long, env = "POD_NAME", default_value = "tandem-operator")]
    identity: String,
    /// Lease duration in seconds.
    #[arg(long, env = "TANDEM_LEASE_SECONDS", default_value_t = 15)]
    lease_seconds: u64,
    /// Once leading, server-side apply this release's MirroredVolume CRD (Helm never upgrades a
    /// chart's crds/); refuses a CRD with versions this binary does not know, keeps one a newer
    /// release applied. `--manage-crd` alone means true.
    #[arg(long, env = "TANDEM_MANAGE_CRD", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    manage_crd: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            let yaml = operator::crd::crd_yaml().context("serializing the CRD")?;
            std::io::stdout()
                .lock()
                .write_all(yaml.as_bytes())
                .context("writing to stdout")?;
            Ok(())
        }
        Command::Run(args) => run(*args).await,
        Command::Render(args) => render(args),
        Command::CsiController(args) => csi_controller(args).await,
    }
}

fn render(args: RenderArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let cfg = EngineConfig {
        image: args.engine_image,
        cluster_domain: args.cluster_domain,
        namespace: args.namespace,
        allowed_host_path_root: args.allowed_host_path_root,
        ..EngineConfig::default()
    };
    let mut rendered = 0;
    // YAML 1.2 booleans (as serde_yaml read them): a plain `off` stays a string.
    let options = serde_saphyr::options! { strict_booleans: true };
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple_with_options(&text, options)
        .with_context(|| format!("parsing {} as YAML", args.file.display()))?;
    for value in docs {
        let is_volume = value.get("kind").and_then(|k| k.as_str()) == Some("MirroredVolume");
        if !is_volume {
            continue;
        }
        let mut mv: MirroredVolume =
            serde_json::from_value(value).context("not a valid MirroredVolume")?;
        if mv.metadata.namespace.is_none() {
            mv.metadata.namespace = Some("default".into());
        }
        // Owner references need a uid; the real one comes from the API server.
        mv.metadata
            .uid
            .get_or_insert_with(|| "00000000-0000-0000-0000-000000000000".into());
        let objects = operator::plan::render_initial(&mv, &cfg).map_err(|e| {
            anyhow::anyhow!("{}: {e}", mv.metadata.name.clone().unwrap_or_default())
        })?;
        let mut stdout = std::io::stdout().lock();
        for object in objects {
            // Each object as a JSON document (JSON is YAML): no YAML writer's quoting choices matter, and
            // a YAML 1.1 reader such as kubectl's never takes the engine's `off` for the boolean false.
            let json = serde_json::to_string_pretty(&object).context("serializing")?;
            write!(stdout, "---\n{json}\n").context("writing to stdout")?;
        }
        rendered += 1;
    }
    anyhow::ensure!(rendered > 0, "no MirroredVolume in {}", args.file.display());
    Ok(())
}

async fn csi_controller(args: CsiControllerArgs) -> anyhow::Result<()> {
    use operator::csi::{engines::GrpcSnapshots, grpc, kube::KubeVolumes, service::Controller};
    telemetry::init(args.log_format, "info,kube=warn,tower=warn,hyper=warn");
    let client = Client::try_default()
        .await
        .context("no Kubernetes configuration (in-cluster or kubeconfig)")?;
    // The operator creates the CA; this process only reads it (never creates one: two CAs would
    // split the cluster's trust).
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), &args.namespace);
    let ca = loop {
        match secrets.get_opt(operator::certs::CA_SECRET).await {
            Ok(Some(secret)) => break operator::certs::ca_of(&secret)?,
            Ok(None) => tracing::info!(
                namespace = %args.namespace,
                "waiting for the operator to create Secret {}",
                operator::certs::CA_SECRET
            ),
            Err(e) => tracing::warn!(error = %e, "reading the operator's CA"),
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    let validity = Duration::from_secs(args.cert_validity_days.saturating_mul(24 * 3600));
    let _identity = operator::certs::serve_operator_identity(ca, validity)
        .context("issuing the operator's client certificate")?;
    let controller = Arc::new(Controller {
        volumes: Arc::new(KubeVolumes {
            client,
            operator_namespace: args.namespace.clone(),
        }),
        snapshots: Arc::new(GrpcSnapshots::default()),
        cfg: EngineConfig {
            cluster_domain: args.cluster_domain,
            namespace: args.namespace,
            ..EngineConfig::default()
        },
        wait: Duration::from_secs(args.wait_seconds),
        poll: Duration::from_secs(1),
    });
    // SIGTERM (the kubelet) or SIGINT: stop accepting, finish calls in flight, remove the socket.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    grpc::serve(&args.csi_endpoint, controller, shutdown).await
}

/// Applies this release's CRD (`crd_manage`); only the leader does, so two releases' replicas never
/// take turns during a rolling update.
async fn manage_crd(client: Client) -> anyhow::Result<()> {
    use operator::crd_manage::{self, Outcome};
    let api = Api::all(client);
    let release = crd_manage::this_release();
    match crd_manage::apply(
        &api,
        &release,
        Duration::from_secs(60),
        Duration::from_secs(1),
    )
    .await?
    {
        Outcome::Applied => tracing::info!(
            crd = crd_manage::CRD_NAME,
            release = %release,
            "applied the MirroredVolume CRD"
        ),
        Outcome::KeptNewer(newer) => tracing::warn!(
            crd = crd_manage::CRD_NAME,
            release = %release,
            applied_by = %newer,
            "kept the MirroredVolume CRD a newer release applied; run that release's operator"
        ),
    }
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    telemetry::init(args.log_format, "info,kube=warn,tower=warn,hyper=warn");
    let client = Client::try_default()
        .await
        .context("no Kubernetes configuration (in-cluster or kubeconfig)")?;
    let metrics = Metrics::default();
    let health = Health::default();
    let server = tokio::spawn(http::serve(
        args.http_listen,
        health.clone(),
        metrics.clone(),
    ));

    let config = EngineConfig {
        image: args.engine_image,
        image_pull_policy: args.engine_image_pull_policy,
        cluster_domain: args.cluster_domain,
        priority_class: args.engine_priority_class,
        namespace: args.namespace.clone(),
        allowed_host_path_root: args.allowed_host_path_root,
        cert_validity: Duration::from_secs(args.cert_validity_days.saturating_mul(24 * 3600)),
        pod: args.engine_pod.unwrap_or_default(),
    };
    let ca = operator::certs::ensure_ca(client.clone(), &args.namespace)
        .await
        .context("loading or creating the operator's CA (secret tandem-ca)")?;
    let _identity = operator::certs::serve_operator_identity(ca.clone(), config.cert_validity)
        .context("issuing the operator's client certificate")?;
    let ctx = Arc::new(Context::new(
        client.clone(),
        metrics,
        Arc::new(GrpcEngines::default()),
        config,
        ca,
        Some(args.identity.clone()),
    ));
    health
        .started
        .store(true, std::sync::atomic::Ordering::Relaxed);

    let (tx, mut rx) = tokio::sync::watch::channel(!args.leader_election);
    if args.leader_election {
        let cfg = LeaderConfig {
            lease_name: "tandem-operator-leader".into(),
            identity: args.identity.clone(),
            lease_duration: Duration::from_secs(args.lease_seconds),
            renew_interval: Duration::from_secs((args.lease_seconds / 3).max(1)),
        };
        tokio::spawn(leader::run(
            Api::namespaced(client.clone(), &args.namespace),
            cfg,
            tx,
        ));
        tracing::info!(identity = %args.identity, "waiting for the leader lease");
        rx.wait_for(|leading| *leading)
            .await
            .context("leader election stopped")?;
    }
    if args.manage_crd {
        manage_crd(client.clone()).await?;
    }
    tracing::info!(identity = %args.identity, "leading; starting the controller");
    health
        .leading
        .store(true, std::sync::atomic::Ordering::Relaxed);

    tokio::select! {
        result = controller::run(ctx) => result?,
        _ = rx.wait_for(|leading| !*leading) => {
            anyhow::bail!("lost the leader lease; exiting so a fresh replica takes over");
        }
        result = server => {
            match result {
                Ok(Ok(())) => anyhow::bail!("HTTP server stopped"),
                Ok(Err(e)) => return Err(e).context("HTTP server failed"),
                Err(e) => anyhow::bail!("HTTP server task failed: {e}"),
            }
        }
    }
    tracing::info!("shut down");
    Ok(())
}
