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
    Serve(Box<ServeArgs>),
    /// Print an engine's status.
    Status(StatusArgs),
    /// Test seam: pause, throttle, drop or hold acks on the replication link (needs --fault-injection).
    Fault(FaultArgs),
    /// Make this engine (the secondary) serve: fence the primary, take its differential table.
    /// Exits 0 once the engine serves host I/O and prints the epoch and ready time (--json: epoch,
    /// ready_ms, peer_pending_blocks, ...; a refusal as {"error", "reason"} on stderr).
    Takeover(TakeoverArgs),
    /// The mirror image, called on the old primary: make it serve again.
    Failback(TakeoverArgs),
    /// Act as the witness: renew the primary's write lease while its peer cannot (the peer is
    /// gone). Promise not to promote the peer by force for the lease plus its guard afterwards.
    Lease(LeaseArgs),
    /// Snapshots of the volume (on its primary): create, delete, list.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Fill a fresh state dir and data file from an NBD export (a snapshot's,
    /// `<volume>@snapshot/<id>`) before `serve` runs it: the restore's init step. Idempotent.
    Seed(SeedCliArgs),
    /// Grow the volume online, called on the primary: its secondary grows first, then it does.
    /// Prints JSON {size, peer_size}. Shrinking is refused; the same size changes nothing.
    Resize(ResizeArgs),
    /// Move the secondary live to another engine (called on the primary; the new engine runs
    /// `serve --role secondary` on an empty state dir with its --peer = the primary). Prints a
    /// progress line until the move is done (or at once with --no-wait); --abort rolls it back.
    Move(MoveArgs),
    /// Run a pair locally, take over with a backlog, prove every byte, fail back, print a timeline.
    Demo(DemoArgs),
    /// Mint a CA and certificates for `--tls-dir` (tools and tests; in a cluster the operator
    /// mints them).
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Remove a deleted volume's engine files on this node: the state dir, the data file, the
    /// directory that held them once empty, and the NBD socket dir. Idempotent; refuses a dir that
    /// does not look like an engine state dir, or one an engine still holds.
    Wipe(WipeArgs),
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").required(true).multiple(true).args(["state_dir", "run_dir"])))]
pub struct WipeArgs {
    /// The engine's --state-dir.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// The engine's --data file (removed only together with a state dir that passed the checks).
    #[arg(long, requires = "state_dir")]
    pub data: Option<PathBuf>,
    /// The volume's NBD socket directory (holds only sockets).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take snapshot --id (or return it if it exists); prints its JSON.
    Create(SnapshotArgs),
    /// Delete snapshot --id (no error if there is none); prints {"deleted": bool}.
    Delete(SnapshotArgs),
    /// Print the engine's snapshots as JSON.
    List(SnapshotListArgs),
}

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub target: EngineTarget,
    /// The snapshot id ([a-zA-Z0-9._-], at most 128 bytes).
    #[arg(long)]
    pub id: String,
}

#[derive(Debug, Args)]
pub struct SnapshotListArgs {
    #[command(flatten)]
    pub target: EngineTarget,
}

#[derive(Debug, Args)]
pub struct SeedCliArgs {
    /// The NBD server: `unix:/path` or HOST:PORT.
    #[arg(long)]
    pub from: String,
    /// The export to read, e.g. `<volume>@snapshot/<id>`.
    #[arg(long)]
    pub export: String,
    /// The new volume's state dir (must be fresh, or seeded before from the same export).
    #[arg(long)]
    pub state_dir: PathBuf,
    /// The new volume's data file (default: `data.img` beside the state dir, the operator's layout).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// The new volume's name.
    #[arg(long)]
    pub volume: String,
    /// The new volume's size (at least the export's; the rest reads as zeros).
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// Block size: zero blocks of this size are skipped (left sparse).
    #[arg(long, default_value_t = 4096)]
    pub block_size: u64,
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// A new CA: writes ca.crt and ca.key (0600) into --out.
    Ca(CertsCaArgs),
    /// A certificate for one identity, signed by the CA in --ca: writes ca.crt, tls.crt and
    /// tls.key (0600) into --out, the --tls-dir layout.
    Issue(CertsIssueArgs),
}

#[derive(Debug, Args)]
pub struct CertsCaArgs {
    #[arg(long)]
    pub out: PathBuf,
    /// How long the CA is valid (e.g. 365d, 12h, 30m, 90s).
    #[arg(long, value_parser = parse_validity, default_value = "3650d")]
    pub valid_for: std::time::Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IdentityArg {
    Engine,
    Csi,
    Operator,
}

#[derive(Debug, Args)]
pub struct CertsIssueArgs {
    /// The CA directory (`certs ca --out`).
    #[arg(long)]
    pub ca: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum)]
    pub identity: IdentityArg,
    /// The volume's namespace (engine, csi); outside a cluster any name, e.g. `local`.
    #[arg(long, default_value = "local")]
    pub namespace: String,
    /// The volume (engine, csi).
    #[arg(long)]
    pub volume: Option<String>,
    /// The node (csi).
    #[arg(long)]
    pub node: Option<String>,
    /// Extra DNS names (SANs).
    #[arg(long, num_args = 1..)]
    pub dns: Vec<String>,
    /// How long the certificate is valid (e.g. 90d, 12h, 30m, 90s).
    #[arg(long, value_parser = parse_validity, default_value = "90d")]
    pub valid_for: std::time::Duration,
}

/// `90d`, `12h`, `30m`, `45s` (or bare seconds).
pub fn parse_validity(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with d, h, m or s"))?;
    let secs = match unit {
        'd' => n.checked_mul(86400),
        'h' => n.checked_mul(3600),
        'm' => n.checked_mul(60),
        's' => Some(n),
        _ => None,
    }
    .filter(|&v| v > 0)
    .ok_or_else(|| format!("{s:?}: expected a positive duration with d, h, m or s"))?;
    Ok(std::time::Duration::from_secs(secs))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PolicyArg {
    /// Retry the peer until the timeout; never promote without its table (default).
    Wait,
    /// Promote even if the peer cannot be reached; report what was lost.
    Force,
}

#[derive(Debug, Args)]
pub struct TakeoverArgs {
    /// The gRPC address of the engine that is to serve, HOST:PORT.
    #[command(flatten)]
    pub target: EngineTarget,
    #[arg(long, value_enum, default_value_t = PolicyArg::Wait)]
    pub policy: PolicyArg,
    /// Seconds to keep trying the peer (wait) or before giving up on it (force).
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
    /// With --policy force: promote even a replica whose resync was cut short (it may hold a torn
    /// mix of old and new blocks). Without it such a promotion is refused.
    #[arg(long)]
    pub allow_inconsistent: bool,
    /// Print the reply as JSON; a refusal as one JSON line on stderr with the engine's `reason`.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct LeaseArgs {
    /// The primary's gRPC address, HOST:PORT.
    #[command(flatten)]
    pub target: EngineTarget,
    /// Sync mode: also consent that writes be acknowledged without the peer (recorded).
    #[arg(long)]
    pub allow_async: bool,
    /// The lease to grant in milliseconds (the engine holds at most its own --lease-ms).
    #[arg(long, default_value_t = 10000)]
    pub lease_ms: u32,
}

#[derive(Debug, Args)]
pub struct ResizeArgs {
    /// The primary's gRPC address, HOST:PORT.
    #[command(flatten)]
    pub target: EngineTarget,
    /// The new size (bytes, or 512M, 1G, 2Gi, ...): a multiple of 4096, at least the current size.
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
}

#[derive(Debug, Args)]
pub struct MoveArgs {
    /// The primary's gRPC address, HOST:PORT.
    #[command(flatten)]
    pub target: EngineTarget,
    /// The new engine's gRPC address, HOST:PORT (needed to start; ignored with --abort).
    #[arg(long, required_unless_present = "abort")]
    pub to: Option<String>,
    /// Roll the move back (before its cutover): the old secondary stays.
    #[arg(long)]
    pub abort: bool,
    /// Print the status once and return instead of waiting for the end.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Working directory (default: a new temporary directory, removed at the end).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Volume size.
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    pub size: u64,
    /// How much to write while the link is throttled (the backlog at takeover).
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    pub backlog: u64,
    /// The throttled link's rate while the backlog builds.
    #[arg(long, value_parser = parse_size, default_value = "1M")]
    pub rate: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SecondaryAccess {
    None,
    /// Point-in-time views: snapshots taken on the secondary, opened as `<volume>@snapshot/<id>`.
    ReadOnly,
    /// Read-write sessions: writes forwarded to the primary, current reads.
    ReadWrite,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReplicationArg {
    Async,
    Sync,
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
    /// NBD listen address, HOST:PORT (loopback by default: for tools, tests and benchmarks), or
    /// `off` for no TCP listener (pods serve NBD on --nbd-socket only).
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub nbd_listen: String,
    /// Also serve NBD on this unix socket (created mode 0600; a stale socket is replaced, any other
    /// file there is an error).
    #[arg(long)]
    pub nbd_socket: Option<PathBuf>,
    /// Only `<volume>@<epoch>` opens; the bare names (`""`, `<volume>`), which open at any epoch,
    /// are refused. The operator's pods run with it.
    #[arg(long)]
    pub nbd_pinned_exports_only: bool,
    /// NBD connections at once (in handshake or transmission, TCP and unix together). At the cap a
    /// newcomer replaces the oldest connection still in handshake, or is closed if there is none.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub nbd_max_connections: u64,
    /// A client that has not finished the NBD handshake within this many milliseconds is closed
    /// (at most 10000).
    #[arg(long, default_value_t = 10000, value_parser = clap::value_parser!(u64).range(1..=10000))]
    pub nbd_handshake_timeout_ms: u64,
    /// gRPC listen address, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:9500")]
    pub grpc_listen: String,
    /// Role when the state dir is new (an existing state dir keeps its role).
    #[arg(long, value_enum, default_value_t = RoleArg::Primary)]
    pub role: RoleArg,
    /// File holding the volume token; every gRPC request must carry it.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Once listening, write {"nbd": .., "nbd_socket": .., "grpc": ..} to this file: the bound
    /// NBD TCP address (null with --nbd-listen off), the NBD socket path (null without one) and the
    /// bound gRPC address.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// The other engine's gRPC address, HOST:PORT (makes this engine one of a pair; a secondary needs it).
    #[arg(long, required_if_eq("role", "secondary"))]
    pub peer: Option<String>,
    /// async: acknowledge after the local write; sync: after the secondary has it durably.
    #[arg(long, value_enum, default_value_t = ReplicationArg::Async)]
    pub replication: ReplicationArg,
    /// Replication bandwidth cap in bytes per second (suffixes as for --size; 0 = unlimited).
    #[arg(long, value_parser = parse_size, default_value = "0")]
    pub replication_rate: u64,
    /// Journal capacity (it lives in memory); when it overflows, replication falls back to the
    /// differential table. 32 MiB keeps a full journal, the ~11 MiB baseline and the tables within
    /// 64 MiB + 1 bit per 4 KiB block (issue 17; docs/benchmarks.md "Engine memory: the journal").
    #[arg(long, value_parser = parse_size, default_value = "32M")]
    pub journal_size: u64,
    /// Sync mode: how long a write waits for the peer before it may stand on the local copy alone
    /// (with leases on, only with the witness's consent: GrantLease allow_async).
    #[arg(long, default_value_t = 5000)]
    pub sync_timeout_ms: u64,
    /// Paired primary: acknowledge host writes only while holding a write lease of this length,
    /// renewed by the peer or a witness (the operator). 0 turns leases off.
    #[arg(long, default_value_t = 10000)]
    pub lease_ms: u32,
    /// How long a host write waits for a lease (or, sync mode, for the peer or the witness's
    /// consent) before it fails with EIO.
    #[arg(long, default_value_t = 10000)]
    pub lease_wait_ms: u64,
    /// Both sides: how long the peer may stay silent before the link counts as dead (status
    /// `peer_connected: false`, sync-mode writes stop waiting, the stream is replaced on reconnect).
    /// HTTP/2 and TCP keepalive run at a third of it; use the same value on both engines.
    #[arg(long, default_value_t = crate::client::DEFAULT_PEER_TIMEOUT_MS)]
    pub peer_timeout_ms: u64,
    /// Both sides: the first wait after a failed attempt to reach the peer (the primary's
    /// replication stream; the secondary's announcement, `Peer.Announce`). Doubles per failure.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    pub reconnect_min_ms: u64,
    /// Both sides: the longest wait between attempts to reach the peer. A secondary that starts or
    /// loses its stream announces itself, which ends its primary's wait at once; this bounds how
    /// long a primary takes to find a peer that never announces (an older engine).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    pub reconnect_max_ms: u64,
    /// Secondary: how long applied writes may wait before they are made durable (fdatasync) and
    /// acknowledged as such. The source's FLUSH (sync mode) or a filling journal syncs at once.
    #[arg(long, default_value_t = 100)]
    pub durable_interval_ms: u64,
    /// Serve Prometheus metrics on this address, HOST:PORT.
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// What a secondary serves hosts: none; read-only (point-in-time views: snapshots taken on it,
    /// the live copy is never served); read-write (writes forwarded to the primary, current
    /// reads; refused while not connected to the primary or not consistent).
    #[arg(long, value_enum, default_value_t = SecondaryAccess::None)]
    pub secondary_access: SecondaryAccess,
    /// Allow the InjectFault RPC (tests and benchmarks only).
    #[arg(long)]
    pub fault_injection: bool,
    /// Deadline of a proxied read after a takeover; keep it below the host's I/O timeout.
    #[arg(long, default_value_t = 5000)]
    pub proxy_timeout_ms: u64,
    /// A host connecting to this secondary triggers the takeover (no explicit call needed).
    #[arg(long)]
    pub implicit_takeover: bool,
    /// Mutual TLS on gRPC, server and client: a directory with ca.crt, tls.crt and tls.key (a
    /// kubernetes.io/tls Secret plus its CA). tls.crt must name an engine of a volume. Reloaded
    /// when its files change; without it gRPC is plaintext (token only).
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// The node this engine runs on (the downward API's spec.nodeName): with --tls-dir, only
    /// the CSI plugin of this node may ask this engine to take over.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// How often --tls-dir is checked for new certificates, in milliseconds.
    #[arg(long, default_value_t = 10000, hide = true)]
    pub tls_reload_ms: u64,
    /// Most concurrent gRPC connections; at the cap a newcomer replaces the oldest connection
    /// still in its handshake, or is closed at once if there is none.
    #[arg(long, default_value_t = tandem_api::tls::server::DEFAULT_MAX_CONNECTIONS)]
    pub max_grpc_connections: usize,
    /// A gRPC client that has not finished its TLS handshake (or sent its first byte) within
    /// this many milliseconds is closed. At most the default, 10000; lower for tests.
    #[arg(long, default_value_t = 10000, hide = true,
          value_parser = clap::value_parser!(u64).range(1..=10000))]
    pub grpc_handshake_timeout_ms: u64,
}

/// Which engine and volume a client command talks to.
#[derive(Debug, Args)]
pub struct EngineTarget {
    /// The engine's gRPC address, HOST:PORT.
    #[arg(long)]
    pub grpc: String,
    #[arg(long)]
    pub volume: String,
    /// File holding the volume token.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Mutual TLS: a directory with ca.crt, tls.crt and tls.key (e.g. an operator identity).
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::parse_validity;
    use std::time::Duration;

    #[test]
    fn validity_units() {
        assert_eq!(parse_validity("90d"), Ok(Duration::from_secs(90 * 86400)));
        assert_eq!(parse_validity("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_validity("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_validity("45"), Ok(Duration::from_secs(45)));
        for bad in ["", "d", "0d", "5w", "-1h", "1.5d"] {
            assert!(parse_validity(bad).is_err(), "{bad}");
        }
    }
}

#[derive(Debug, Args)]
pub struct FaultArgs {
    #[command(flatten)]
    pub target: EngineTarget,
    /// Stop (true) or resume (false) sending replication messages.
    #[arg(long)]
    pub pause: Option<bool>,
    /// Hold (true) or release (false) received acknowledgements.
    #[arg(long)]
    pub hold_acks: Option<bool>,
    /// Close the replication stream now (the sender reconnects).
    #[arg(long)]
    pub drop_link: bool,
    /// Bandwidth cap in bytes per second (0 = unlimited).
    #[arg(long, value_parser = parse_size)]
    pub rate: Option<u64>,
    /// Apply --rate to journal records only (true), or to everything sent (false).
    #[arg(long)]
    pub rate_records_only: Option<bool>,
    /// Hold (true) or release (false) the overlay merge between chunks.
    #[arg(long)]
    pub pause_merge: Option<bool>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The engine's gRPC address, HOST:PORT.
    #[command(flatten)]
    pub target: EngineTarget,
    /// Print JSON (stable field names) instead of the short human form.
    #[arg(long)]
    pub json: bool,
    /// Instead of the status, time N status calls one after another on one connection and print
    /// the gRPC round trip to the engine as JSON {calls, mean_us, p50_us, p99_us}.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub rtt: Option<u32>,
}
