//! `tandem-campaign`: safety campaigns against a real pair of `tandem-engine` processes.
//! - `history`: pipelined NBD clients under a nemesis (takeover, failback, SIGKILL, SIGSTOP,
//!   link faults), then a check of the recorded history, a final full read and a comparison of
//!   both replicas' data files.
//! - `kill`: the same clients and checks, under SIGKILLs of either engine at random times.
//! - `partition`: the same clients and checks, each engine in its own network namespace, under
//!   blackholes, one-way drops, SIGSTOPs, node reboots and forced takeovers (needs root).
//!
//! Every random choice comes from `--seed` (printed at the start), so a failing run can be run
//! again with the same choices.

mod checker;
mod client;
mod cluster;
mod history;
mod nemesis;
mod partition;
mod prng;
mod stamp;
mod witness;

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "tandem-campaign",
    about = "Safety campaigns against a real tandem-engine pair"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Concurrent clients under takeovers, failbacks, kills, pauses and link faults; checks the
    /// history, a final full read, and that both replicas end byte-identical.
    History(HistoryArgs),
    /// Random-time SIGKILL of either engine under the same clients and checks.
    Kill(KillArgs),
    /// The engines in two network namespaces under silent partitions (blackhole, one-way drop,
    /// SIGSTOP, node reboot, forced takeovers) with write leases and a witness: dead-peer
    /// detection within the bound, replication resuming by itself, no acknowledgement by a fenced
    /// old primary after its lease, the same history checks. Needs root; prints
    /// result=SKIPPED otherwise.
    Partition(PartitionArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Async,
    Sync,
}

#[derive(Debug, Args)]
pub struct Common {
    /// NBD clients (each its own connection).
    #[arg(long, default_value_t = 4)]
    pub clients: u32,
    /// Requests in flight per client.
    #[arg(long, default_value_t = 32)]
    pub qd: usize,
    /// Seed of every random choice (default: from the clock; printed either way).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Volume size.
    #[arg(long, value_parser = tandem_api::size::parse_size, default_value = "128M")]
    pub size: u64,
    /// Half of the ops fall in the first this-many bytes, so they race on the same blocks.
    #[arg(long, value_parser = tandem_api::size::parse_size, default_value = "4M")]
    pub hot: u64,
    /// Largest op: the sizes drawn (mostly up to 64 KiB, some up to 1 MiB, a few up to 32 MiB)
    /// are capped here. Small ops reach far higher rates, which is what overflows a journal
    /// while the stream lags (the `--journal-size` runs of scripts/campaign.sh).
    #[arg(long, value_parser = tandem_api::size::parse_size, default_value = "32M")]
    pub max_op: u64,
    /// Replication mode of the pair.
    #[arg(long, value_enum, default_value_t = Mode::Async)]
    pub mode: Mode,
    /// The tandem-engine binary (default: the workspace's, next to this binary, built if missing).
    #[arg(long)]
    pub engine: Option<PathBuf>,
    /// Working directory (default: a temporary one, kept only when the run fails).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Journal size of both engines (small: the journal overflows into the table).
    #[arg(long, default_value = "8M")]
    pub journal_size: String,
    /// How many violations to print in full.
    #[arg(long, default_value_t = 5)]
    pub show: usize,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    #[command(flatten)]
    pub common: Common,
    /// How long the clients and the nemesis run.
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
    /// Nemesis events to draw from.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "takeover,failback,kill,pause,partition,throttle,settle"
    )]
    pub nemesis: Vec<nemesis::Event>,
    /// Quiet time between nemesis events, drawn in min..max milliseconds.
    #[arg(long, default_value_t = 200)]
    pub min_gap_ms: u64,
    #[arg(long, default_value_t = 1500)]
    pub max_gap_ms: u64,
}

#[derive(Debug, Args)]
pub struct KillArgs {
    #[command(flatten)]
    pub common: Common,
    /// SIGKILLs to deliver.
    #[arg(long, default_value_t = 50)]
    pub kills: u64,
    /// I/O time between a restart and the next kill, drawn in min..max milliseconds.
    #[arg(long, default_value_t = 20)]
    pub min_gap_ms: u64,
    #[arg(long, default_value_t = 300)]
    pub max_gap_ms: u64,
}

#[derive(Debug, Args)]
pub struct PartitionArgs {
    #[command(flatten)]
    pub common: Common,
    /// Partitions to inflict (the nemesis cycles through blackhole, one-way drop, blackhole with a
    /// forced takeover, SIGSTOP, a node reboot of the primary with a forced takeover, node reboot).
    #[arg(long, default_value_t = 10)]
    pub rounds: u64,
    /// `--peer-timeout-ms` of both engines; detection must take at most this + 1 s. Their
    /// `--lease-ms` is twice this.
    #[arg(long, default_value_t = 2000)]
    pub peer_timeout_ms: u64,
    /// I/O time before each partition, drawn in min..max milliseconds.
    #[arg(long, default_value_t = 200)]
    pub min_gap_ms: u64,
    #[arg(long, default_value_t = 1000)]
    pub max_gap_ms: u64,
    /// `--lease-ms` of both engines (default: twice the peer timeout; 0 turns leases off, and the
    /// witness with them).
    #[arg(long)]
    pub lease_ms: Option<u64>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::History(a) => nemesis::run(
            "history",
            &a.common,
            nemesis::Plan::History {
                seconds: a.seconds,
                events: a.nemesis,
                gap: (a.min_gap_ms, a.max_gap_ms),
            },
        ),
        Cmd::Kill(a) => nemesis::run(
            "kill",
            &a.common,
            nemesis::Plan::Kill {
                kills: a.kills,
                gap: (a.min_gap_ms, a.max_gap_ms),
            },
        ),
        Cmd::Partition(a) => partition::run(
            &a.common,
            a.rounds,
            a.peer_timeout_ms,
            a.lease_ms.unwrap_or(2 * a.peer_timeout_ms),
            (a.min_gap_ms, a.max_gap_ms),
        ),
    };
    match res {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("campaign error: {e:#}");
            ExitCode::from(2)
        }
    }
}
