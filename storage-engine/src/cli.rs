//! Command-line interface of `tandem-engine`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::size::parse_size;

#[derive(Debug, Parser)]
#[command(
    name = "tandem-engine",
    version,
    about = "Tandem storage engine: one mirrored volume over NBD"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve one volume over NBD (host I/O) and gRPC (control and peer).
    Serve(ServeArgs),
    /// Print an engine's status.
    Status(StatusArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    Primary,
    Secondary,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Volume name; also the NBD export name.
    #[arg(long)]
    pub volume: String,
    /// Data file (raw image); created sparse at --size if missing, never truncated.
    #[arg(long)]
    pub data: PathBuf,
    /// Volume size: bytes, or with a K/M/G/T (KiB/MiB/GiB/TiB) suffix. Must be a multiple of 4 KiB.
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// Directory for the engine's metadata (meta, journal, tables).
    #[arg(long)]
    pub state_dir: PathBuf,
    /// NBD listen address, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub nbd_listen: String,
    /// Also serve NBD on this unix socket.
    #[arg(long)]
    pub nbd_socket: Option<PathBuf>,
    /// gRPC listen address, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:9500")]
    pub grpc_listen: String,
    /// Role when the state dir is new (an existing state dir keeps its role).
    #[arg(long, value_enum, default_value_t = RoleArg::Primary)]
    pub role: RoleArg,
    /// File holding the volume token; every gRPC request must carry it.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Once listening, write {"nbd": .., "grpc": ..} with the bound addresses to this file.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The engine's gRPC address, HOST:PORT.
    #[arg(long)]
    pub grpc: String,
    #[arg(long)]
    pub volume: String,
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}
