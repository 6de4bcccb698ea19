use anyhow::Context;
use clap::Parser;
use storage_engine::cli::{Cli, Command, LogFormat};
use storage_engine::logctx::WithVolume;

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Volume, epoch and role on every line once `serve` has opened the volume (logctx).
    match format {
        LogFormat::Json => builder
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(WithVolume {
                inner: tracing_subscriber::fmt::format().json(),
                json: true,
            })
            .init(),
        LogFormat::Text => builder
            .event_format(WithVolume {
                inner: tracing_subscriber::fmt::format(),
                json: false,
            })
            .init(),
    }
}

fn main() -> anyhow::Result<()> {
    let result = run();
    // A `--json` refusal is printed already, in its machine form.
    if let Err(e) = &result {
        if e.is::<storage_engine::report::Reported>() {
            std::process::exit(1);
        }
    }
    result
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        match cli.command {
            Command::Serve(args) => storage_engine::engine::serve(*args).await,
            Command::Status(args) => storage_engine::engine::print_status(args).await,
            Command::Fault(args) => storage_engine::engine::fault(args).await,
            Command::Takeover(args) => storage_engine::engine::takeover(args, false).await,
            Command::Failback(args) => storage_engine::engine::takeover(args, true).await,
            Command::Lease(args) => storage_engine::engine::grant_lease(args).await,
            Command::Snapshot(cmd) => storage_engine::engine::snapshot(cmd).await,
            Command::Seed(args) => storage_engine::engine::seed(args).await,
            Command::Resize(args) => storage_engine::engine::resize(args).await,
            Command::Move(args) => storage_engine::engine::move_secondary(args).await,
            Command::Demo(args) => storage_engine::demo::run(args).await,
            Command::Certs(cmd) => storage_engine::engine::certs(cmd),
            Command::Wipe(args) => storage_engine::wipe::run(&args),
        }
    })
}
