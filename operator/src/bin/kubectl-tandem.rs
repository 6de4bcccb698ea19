//! `kubectl-tandem`: the kubectl plugin (copy it onto PATH; kubectl runs it as `kubectl tandem`).
//! Everything is in `operator::kubectl`; this only finds the cluster.

use anyhow::Context;
use clap::Parser;
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    Client, Config,
};
use operator::kubectl::{run, Cli};

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    // One line for a person (the cause chain), never a backtrace dump.
    if let Err(e) = plugin(&cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn plugin(cli: &Cli) -> anyhow::Result<()> {
    // kube's usual inference (KUBECONFIG, ~/.kube/config, in-cluster); --context picks one.
    let config = match &cli.context {
        Some(context) => {
            let options = KubeConfigOptions {
                context: Some(context.clone()),
                ..Default::default()
            };
            let kubeconfig = Kubeconfig::read().context("reading the kubeconfig")?;
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .with_context(|| format!("kubeconfig context {context}"))?
        }
        None => Config::infer()
            .await
            .context("no cluster found (kubeconfig or in-cluster)")?,
    };
    let namespace = config.default_namespace.clone();
    let client = Client::try_from(config).context("building the Kubernetes client")?;
    let mut out = std::io::stdout().lock();
    run(client, &namespace, cli, &mut out).await
}
