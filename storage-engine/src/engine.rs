//! Wiring of one engine process: open the volume, bind NBD and gRPC, run until SIGTERM, shut down cleanly.

use std::{path::Path, sync::Arc};

use anyhow::{bail, Context};
use tandem_api::tls::{self, server::AcceptOptions, ClientTls, Identity, TlsSource};
use tokio::{
    net::{TcpListener, UnixListener},
    sync::watch,
};
use tracing::info;

use crate::{
    authz::{Authz, Me, PeerAuthz},
    cli::{
        CertsCommand, FaultArgs, IdentityArg, PolicyArg, ReplicationArg, RoleArg, SecondaryAccess,
        ServeArgs, StatusArgs, TakeoverArgs,
    },
    client::EngineClient,
    grpc::{AuthInterceptor, EngineService},
    meta::Role,
    metrics, nbd,
    pb::{self, engine_server::EngineServer, peer_server::PeerServer},
    repl::{self, receiver::PeerService, Mode},
    volume::{PairConfig, Volume, VolumeConfig},
};

/// Reads a token file; surrounding whitespace is ignored. An empty token is refused.
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    let t = std::fs::read_to_string(path)
        .with_context(|| format!("reading token file {}", path.display()))?;
    let t = t.trim().to_string();
    if t.is_empty() {
        bail!("token file {} is empty", path.display());
    }
    Ok(t)
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Before any channel opens: every channel to the peer pings with it (client::channel).
    crate::client::set_peer_timeout(std::time::Duration::from_millis(args.peer_timeout_ms));
    let peer_timeout = crate::client::peer_timeout();
    let token = args.token_file.as_deref().map(read_token).transpose()?;
    let tls_source = match &args.tls_dir {
        Some(dir) => Some(
            TlsSource::from_dir(dir)
                .with_context(|| format!("loading TLS material from {}", dir.display()))?,
        ),
        None => None,
    };
    // An engine is an engine of one volume; any other certificate would hand its rights to
    // whoever holds this pod's Secret, so refuse to start (tls::engine_needs_an_engine_identity).
    let me = match &tls_source {
        Some(src) => match src.identity() {
            Identity::Engine { volume } => Some(Me {
                volume,
                node: args.node_name.clone(),
            }),
            other => bail!("--tls-dir: tls.crt names the {other}, not an engine of a volume"),
        },
        None => None,
    };
    if let (Some(src), Some(me)) = (&tls_source, &me) {
        // Every engine-to-engine channel (replication, lease renewal, handoff, proxied reads)
        // goes through client::channel and so speaks mutual TLS as this engine, and accepts only
        // an engine of the same volume as its server.
        tls::set_default_client(Some(
            ClientTls::new(src.clone()).expect_volume(me.volume.clone()),
        ));
        src.watch(std::time::Duration::from_millis(
            args.tls_reload_ms.max(100),
        ));
        info!(identity = %src.identity(), node = ?me.node, "mutual TLS on gRPC");
    }
    let authz = Authz::new(me);
    let cfg = VolumeConfig {
        name: args.volume.clone(),
        data: args.data.clone(),
        size: args.size,
        state_dir: args.state_dir.clone(),
        initial_role: match args.role {
            RoleArg::Primary => Role::Primary,
            RoleArg::Secondary => Role::Secondary,
        },
        secondary_access: match args.secondary_access {
            SecondaryAccess::None => crate::volume::SecondaryAccess::None,
            SecondaryAccess::ReadOnly => crate::volume::SecondaryAccess::ReadOnly,
            SecondaryAccess::ReadWrite => crate::volume::SecondaryAccess::ReadWrite,
        },
        proxy_timeout: std::time::Duration::from_millis(args.proxy_timeout_ms),
        implicit_takeover: args.implicit_takeover,
        pair: args.peer.clone().map(|peer| PairConfig {
            peer,
            token: token.clone(),
            mode: match args.replication {
                ReplicationArg::Async => Mode::Async,
                ReplicationArg::Sync => Mode::Sync,
            },
            journal_bytes: args.journal_size,
            rate: args.replication_rate,
            sync_timeout: std::time::Duration::from_millis(args.sync_timeout_ms),
            lease_ms: args.lease_ms,
            lease_wait: std::time::Duration::from_millis(args.lease_wait_ms),
        }),
    };
    let volume = Volume::open(&cfg).context("opening the volume")?;
    crate::logctx::set(&volume);

    let nbd_listener = match args.nbd_listen.as_str() {
        NBD_OFF => None,
        addr => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding NBD on {addr}"))?,
        ),
    };
    if nbd_listener.is_none() && args.nbd_socket.is_none() {
        bail!("--nbd-listen off without --nbd-socket: no host could reach the volume");
    }
    let grpc_listener = TcpListener::bind(&args.grpc_listen)
        .await
        .with_context(|| format!("binding gRPC on {}", args.grpc_listen))?;
    let nbd_addr = nbd_listener
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()?;
    let grpc_addr = grpc_listener.local_addr()?;
    let unix_listener = args.nbd_socket.as_deref().map(bind_socket).transpose()?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let admission = nbd::Admission::new(nbd::Policy {
        max_connections: usize::try_from(args.nbd_max_connections).unwrap_or(usize::MAX),
        handshake_timeout: std::time::Duration::from_millis(args.nbd_handshake_timeout_ms),
        pinned_only: args.nbd_pinned_exports_only,
    });
    if let Some(l) = nbd_listener {
        tasks.push(tokio::spawn(nbd::serve_tcp(
            l,
            Arc::clone(&volume),
            Arc::clone(&admission),
            stop_rx.clone(),
        )));
    }
    if let Some(l) = unix_listener {
        tasks.push(tokio::spawn(nbd::serve_unix(
            l,
            Arc::clone(&volume),
            Arc::clone(&admission),
            stop_rx.clone(),
        )));
    }
    let auth = AuthInterceptor::new(token.clone());
    let svc = EngineServer::with_interceptor(
        EngineService::new(Arc::clone(&volume), args.fault_injection, authz.clone()),
        auth.clone(),
    );
    let peer_svc = tonic::service::interceptor::InterceptedService::new(
        PeerAuthz::new(
            PeerServer::new(PeerService::new(
                Arc::clone(&volume),
                std::time::Duration::from_millis(args.durable_interval_ms),
                peer_timeout,
            ))
            .max_decoding_message_size(crate::takeover::handoff::message_cap(volume.size()))
            .max_encoding_message_size(crate::takeover::handoff::message_cap(volume.size())),
            authz,
        ),
        auth,
    );
    if let Some(r) = &volume.repl {
        let backoff = repl::task::Backoff {
            min: std::time::Duration::from_millis(args.reconnect_min_ms.min(args.reconnect_max_ms)),
            max: std::time::Duration::from_millis(args.reconnect_max_ms),
        };
        tasks.push(tokio::spawn(repl::task::run(
            Arc::clone(&volume),
            Arc::clone(r),
            stop_rx.clone(),
            backoff,
        )));
        tasks.push(tokio::spawn(repl::announce::task(
            Arc::clone(&volume),
            stop_rx.clone(),
            backoff,
        )));
        tasks.push(tokio::spawn(crate::volume::renew_task(
            Arc::clone(&volume),
            stop_rx.clone(),
        )));
        crate::repl::mover::spawn_if_active(&volume);
        tasks.push(tokio::spawn(checkpoint_loop(
            Arc::clone(&volume),
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(crate::takeover::handoff::merge_task(
            Arc::clone(&volume),
            stop_rx.clone(),
        )));
    }
    if let Some(addr) = &args.metrics_listen {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding metrics on {addr}"))?;
        tasks.push(tokio::spawn(metrics::serve(
            l,
            Arc::clone(&volume),
            stop_rx.clone(),
        )));
    }
    let mut grpc_stop = stop_rx.clone();
    let grpc = tokio::spawn(
        tonic::transport::Server::builder()
            // A replication batch (up to 1 MiB) travels in one HTTP/2 frame instead of 64 of 16 KiB:
            // about 3% more async IOPS when the primary's core is the limit (docs/benchmarks.md).
            .max_frame_size(Some(1 << 20))
            // The server pings its clients as they ping it: a peer that vanished without FIN or
            // RST loses its connection, and the streams on it, within the peer timeout.
            .http2_keepalive_interval(Some(peer_timeout / 3))
            .http2_keepalive_timeout(Some(peer_timeout / 3))
            .add_service(svc)
            .add_service(peer_svc)
            .serve_with_incoming_shutdown(
                accepted(
                    grpc_listener,
                    peer_timeout,
                    AcceptOptions {
                        max_connections: args.max_grpc_connections,
                        handshake_timeout: std::time::Duration::from_millis(
                            args.grpc_handshake_timeout_ms,
                        ),
                        stats: Arc::clone(&volume.counters.grpc),
                        ..AcceptOptions::new(tls_source)
                    },
                ),
                async move {
                    let _ = grpc_stop.changed().await;
                },
            ),
    );

    info!(
        volume = %volume.name(),
        role = %volume.role(),
        epoch = volume.epoch(),
        size = volume.size(),
        nbd = %nbd_addr.map_or_else(|| NBD_OFF.to_string(), |a| a.to_string()),
        nbd_socket = ?args.nbd_socket,
        grpc = %grpc_addr,
        "engine serving"
    );
    if let Some(p) = &args.ready_file {
        let ready = serde_json::json!({
            "nbd": nbd_addr.map(|a| a.to_string()),
            "nbd_socket": args.nbd_socket,
            "grpc": grpc_addr.to_string(),
        });
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, ready.to_string())?;
        std::fs::rename(&tmp, p)?;
    }

    wait_for_signal().await?;
    info!("shutting down");
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let _ = grpc.await;
    volume.shutdown().context("flushing the volume")?;
    if let Some(p) = &args.nbd_socket {
        let _ = std::fs::remove_file(p);
    }
    info!("stopped cleanly");
    Ok(())
}

/// `--nbd-listen off`: no NBD TCP listener.
pub const NBD_OFF: &str = "off";

/// Binds the NBD unix socket at `path`, mode 0600 from the moment it is reachable there: it is
/// bound under a temporary name, restricted, then renamed into place. A socket left by a killed
/// engine is replaced; any other file at `path` is an error (never delete what is not ours).
// Safety: only root (the CSI plugin) can connect to the socket, never another user in a shared
// directory (tests/nbd_limits.rs `socket_*`).
fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let stale = |p: &Path| -> anyhow::Result<()> {
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(p)
                .with_context(|| format!("removing the stale socket {}", p.display())),
            Ok(_) => bail!(
                "--nbd-socket {} exists and is not a socket; refusing to replace it",
                p.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("checking {}", p.display())),
        }
    };
    stale(path)?;
    let name = path
        .file_name()
        .with_context(|| format!("--nbd-socket {} names no file", path.display()))?;
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    stale(&tmp)?;
    let listener = UnixListener::bind(&tmp)
        .with_context(|| format!("binding NBD socket {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("moving the NBD socket into place at {}", path.display()))?;
    Ok(listener)
}

/// Persists the differential table twice a second, so a crash resyncs little.
async fn checkpoint_loop(volume: Arc<Volume>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            _ = stop.changed() => return,
        }
        let v = Arc::clone(&volume);
        match tokio::task::spawn_blocking(move || v.checkpoint()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "table checkpoint failed"),
            Err(e) => tracing::warn!(error = %e, "table checkpoint task failed"),
        }
    }
}

/// Connects to the engine a client command names, with its token and TLS identity.
async fn connect(t: &crate::cli::EngineTarget) -> anyhow::Result<EngineClient> {
    let token = t.token_file.as_deref().map(read_token).transpose()?;
    let tls = match &t.tls_dir {
        Some(dir) => Some(
            ClientTls::from_dir(dir)
                .with_context(|| format!("loading TLS material from {}", dir.display()))?,
        ),
        None => None,
    };
    Ok(EngineClient::connect_with(&t.grpc, token.as_deref(), tls.as_ref()).await?)
}

/// `tandem-engine certs ca|issue`.
pub fn certs(cmd: CertsCommand) -> anyhow::Result<()> {
    match cmd {
        CertsCommand::Ca(a) => {
            let ca = tls::Ca::generate("Tandem CA", a.valid_for)?;
            tls::mint::write_ca_dir(&a.out, &ca)?;
            println!("{}", serde_json::json!({"ca": a.out.join(tls::CA_FILE)}));
        }
        CertsCommand::Issue(a) => {
            let ca = tls::mint::read_ca_dir(&a.ca)
                .with_context(|| format!("reading the CA in {}", a.ca.display()))?;
            let volume = || -> anyhow::Result<tls::VolumeRef> {
                match &a.volume {
                    Some(v) => Ok(tls::VolumeRef::new(&a.namespace, v)),
                    None => bail!("--identity engine|csi needs --volume"),
                }
            };
            let identity = match a.identity {
                IdentityArg::Operator => Identity::Operator,
                IdentityArg::Engine => Identity::Engine { volume: volume()? },
                IdentityArg::Csi => Identity::Csi {
                    volume: volume()?,
                    node: a.node.clone().context("--identity csi needs --node")?,
                },
            };
            // The URI is parsed back so a bad name fails here, not at the first handshake.
            Identity::parse(&identity.uri())?;
            let issued = ca.issue(&identity, &a.dns, a.valid_for)?;
            tls::mint::write_dir(&a.out, ca.cert_pem(), &issued)?;
            println!(
                "{}",
                serde_json::json!({"identity": identity.uri(), "dir": a.out})
            );
        }
    }
    Ok(())
}

/// `tandem-engine fault`.
pub async fn fault(args: FaultArgs) -> anyhow::Result<()> {
    let mut c = connect(&args.target).await?;
    let r = c
        .inject_fault(pb::FaultRequest {
            volume: args.target.volume,
            pause: args.pause,
            hold_acks: args.hold_acks,
            drop_link: args.drop_link,
            rate_bytes_per_sec: args.rate,
            rate_records_only: args.rate_records_only,
            pause_merge: args.pause_merge,
        })
        .await?;
    println!(
        "{}",
        serde_json::json!({"paused": r.paused, "holding_acks": r.holding_acks, "rate_bytes_per_sec": r.rate_bytes_per_sec})
    );
    Ok(())
}

/// `tandem-engine snapshot create|delete|list`: prints JSON.
pub async fn snapshot(cmd: crate::cli::SnapshotCommand) -> anyhow::Result<()> {
    use crate::cli::SnapshotCommand as S;
    let target = match &cmd {
        S::Create(a) | S::Delete(a) => &a.target,
        S::List(a) => &a.target,
    };
    let mut c = connect(target).await?;
    let volume = target.volume.clone();
    let out = match &cmd {
        S::Create(a) => snapshot_json(&c.create_snapshot(&volume, &a.id).await?),
        S::Delete(a) => {
            serde_json::json!({"deleted": c.delete_snapshot(&volume, &a.id).await?.deleted})
        }
        S::List(_) => serde_json::Value::Array(
            c.list_snapshots(&volume)
                .await?
                .snapshots
                .iter()
                .map(snapshot_json)
                .collect(),
        ),
    };
    println!("{out}");
    Ok(())
}

pub fn snapshot_json(s: &pb::SnapshotInfo) -> serde_json::Value {
    serde_json::json!({
        "volume": s.volume,
        "id": s.id,
        "size": s.size,
        "created_unix_ms": s.created_unix_ms,
        "created": crate::report::rfc3339_ms(s.created_unix_ms),
        "seq": s.seq,
        "method": s.method,
        "export": s.export,
        "ready": s.ready,
    })
}

/// `tandem-engine seed`: prints {"seeded": bool, "blocks": N}.
pub async fn seed(a: crate::cli::SeedCliArgs) -> anyhow::Result<()> {
    let data = match a.data {
        Some(d) => d,
        None => a
            .state_dir
            .parent()
            .map(|p| p.join("data.img"))
            .ok_or_else(|| anyhow::anyhow!("--state-dir has no parent: pass --data"))?,
    };
    let args = crate::snapshot::seed::SeedArgs {
        from: a.from,
        export: a.export,
        state_dir: a.state_dir,
        data,
        volume: a.volume,
        size: a.size,
        block_size: a.block_size,
    };
    let out = match crate::snapshot::seed::seed(&args).await? {
        crate::snapshot::seed::Outcome::Seeded {
            blocks,
            source_size,
        } => serde_json::json!({"seeded": true, "blocks": blocks, "source_size": source_size}),
        crate::snapshot::seed::Outcome::AlreadySeeded { blocks } => {
            serde_json::json!({"seeded": false, "already_seeded": true, "blocks": blocks})
        }
    };
    println!("{out}");
    Ok(())
}

/// `tandem-engine lease`: one witness grant (status, then GrantLease from its clock stamp).
pub async fn grant_lease(args: crate::cli::LeaseArgs) -> anyhow::Result<()> {
    let mut c = connect(&args.target).await?;
    let r = c
        .witness_grant(&args.target.volume, args.lease_ms, args.allow_async)
        .await?;
    println!(
        "{}",
        serde_json::json!({"lease_remaining_ms": r.lease_remaining_ms, "sync_fallback": r.sync_fallback})
    );
    Ok(())
}

/// `tandem-engine resize`: prints the sizes now served, as JSON.
pub async fn resize(args: crate::cli::ResizeArgs) -> anyhow::Result<()> {
    let mut c = connect(&args.target).await?;
    let r = c.resize(&args.target.volume, args.size).await?;
    println!(
        "{}",
        serde_json::json!({"size": r.size, "peer_size": r.peer_size})
    );
    Ok(())
}

/// `tandem-engine move`: starts (or aborts) a live move and prints one progress line per second
/// until it ends; exits non-zero when it ends aborted.
pub async fn move_secondary(args: crate::cli::MoveArgs) -> anyhow::Result<()> {
    let mut c = connect(&args.target).await?;
    let volume = &args.target.volume;
    let mut s = match (&args.to, args.abort) {
        (_, true) => c.abort_move(volume).await?,
        (Some(to), false) => c.start_move(volume, to).await?,
        (None, false) => bail!("--to is needed to start a move"),
    };
    loop {
        let phase = pb::MovePhase::try_from(s.phase).unwrap_or(pb::MovePhase::None);
        let pct = if s.total_bytes > 0 {
            s.copied_bytes as f64 * 100.0 / s.total_bytes as f64
        } else {
            0.0
        };
        println!(
            "move {volume}: {} {} -> {} copied {}/{} bytes ({pct:.1}%){}",
            phase.as_str_name().trim_start_matches("MOVE_PHASE_"),
            s.source,
            s.target,
            s.copied_bytes,
            s.total_bytes,
            if s.message.is_empty() {
                String::new()
            } else {
                format!(" ({})", s.message)
            }
        );
        match phase {
            pb::MovePhase::Aborted if !args.abort => {
                bail!("the move was rolled back: {}", s.message)
            }
            pb::MovePhase::Done | pb::MovePhase::Aborted | pb::MovePhase::None => return Ok(()),
            _ if args.no_wait || args.abort => return Ok(()),
            _ => {}
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        s = c.get_move(volume).await?;
    }
}

/// `tandem-engine takeover` / `failback`: exits 0 once the engine serves, printing the outcome
/// (`--json`: the reply as JSON; a refusal as `report::refusal_json` on stderr, exit 1).
pub async fn takeover(args: TakeoverArgs, failback: bool) -> anyhow::Result<()> {
    let json = args.json;
    let volume = args.target.volume.clone();
    match role_change(args, failback).await {
        Ok(r) if json => println!("{}", takeover_json(&r)),
        Ok(r) => print!("{}", crate::report::takeover_text(&volume, &r)),
        Err(e) if json => {
            eprintln!("{}", crate::report::refusal_json(&e));
            return Err(crate::report::Reported.into());
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

async fn role_change(args: TakeoverArgs, failback: bool) -> anyhow::Result<pb::TakeoverReply> {
    let mut c = connect(&args.target).await?;
    let policy = match args.policy {
        PolicyArg::Wait => pb::TakeoverPolicy::Wait,
        PolicyArg::Force => pb::TakeoverPolicy::Force,
    };
    let timeout = std::time::Duration::from_secs(args.timeout);
    let req = pb::TakeoverRequest {
        allow_inconsistent: args.allow_inconsistent,
        ..crate::client::takeover_request(&args.target.volume, policy, timeout)
    };
    Ok(c.role_change(req, failback).await?)
}

pub fn takeover_json(r: &pb::TakeoverReply) -> serde_json::Value {
    serde_json::json!({
        "epoch": r.epoch,
        "ready_ms": r.ready_ms,
        "peer_pending_blocks": r.peer_pending_blocks,
        "lost_blocks": r.lost_blocks,
        "lost_seq_from": r.lost_seq_from,
        "lost_seq_to": r.lost_seq_to,
        "already_primary": r.already_primary,
    })
}

/// Accepted gRPC connections (plaintext, or TLS with the peer's verdict: `tls::server`) with
/// Nagle off (acknowledgements are small and latency-bound) and TCP keepalive on (a vanished
/// host is noticed even if HTTP/2 pings were off); tonic's own `tcp_nodelay`/`tcp_keepalive`
/// apply only to listeners it binds itself.
fn accepted(
    l: TcpListener,
    peer_timeout: std::time::Duration,
    opts: AcceptOptions,
) -> impl futures::Stream<Item = std::io::Result<tls::server::ServerIo>> {
    use rustix::net::sockopt;
    let idle = (peer_timeout / 3).max(std::time::Duration::from_secs(1));
    let intvl = (peer_timeout / 6).max(std::time::Duration::from_secs(1));
    tls::server::incoming(l, opts, move |s| {
        let _ = s.set_nodelay(true);
        // Best effort: a socket without keepalive still has the HTTP/2 pings.
        let _ = sockopt::set_socket_keepalive(s, true)
            .and_then(|()| sockopt::set_tcp_keepidle(s, idle))
            .and_then(|()| sockopt::set_tcp_keepintvl(s, intvl))
            .and_then(|()| sockopt::set_tcp_keepcnt(s, 2));
    })
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// `tandem-engine status`.
pub async fn print_status(args: StatusArgs) -> anyhow::Result<()> {
    let mut c = connect(&args.target).await?;
    let s = c.status(&args.target.volume).await?;
    if let Some(n) = args.rtt {
        // The first call above opened the connection; every timed one reuses it.
        let mut us = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let t = std::time::Instant::now();
            c.status(&args.target.volume).await?;
            us.push(t.elapsed().as_secs_f64() * 1e6);
        }
        println!("{}", rtt_json(&mut us));
        return Ok(());
    }
    if args.json {
        println!("{}", status_json(&s));
    } else {
        print!("{}", crate::report::status_text(&s));
    }
    Ok(())
}

/// `status --rtt`'s summary of round trips in µs (`us` is not empty: clap refuses N = 0).
fn rtt_json(us: &mut [f64]) -> serde_json::Value {
    us.sort_by(f64::total_cmp);
    let at = |q: f64| us[((us.len() - 1) as f64 * q).round() as usize];
    serde_json::json!({
        "calls": us.len(),
        "mean_us": (us.iter().sum::<f64>() / us.len() as f64).round(),
        "p50_us": at(0.5).round(),
        "p99_us": at(0.99).round(),
    })
}

/// The JSON shape of `status --json` (stable field names; tests and the CSI plugin read them).
pub fn status_json(s: &pb::StatusReply) -> serde_json::Value {
    let role = match pb::Role::try_from(s.role).unwrap_or(pb::Role::Unspecified) {
        pb::Role::Primary => "primary",
        pb::Role::Secondary => "secondary",
        pb::Role::Fenced => "fenced",
        pb::Role::Unspecified => "unknown",
    };
    serde_json::json!({
        "volume": s.volume,
        "role": role,
        "epoch": s.epoch,
        "size": s.size,
        "block_size": s.block_size,
        "nbd_connections": s.nbd_connections,
        "bytes_read": s.bytes_read,
        "bytes_written": s.bytes_written,
        "flushes": s.flushes,
        "pair_state": s.pair().label(),
        "peer": s.peer,
        "peer_connected": s.peer_connected,
        "pending_blocks": s.pending_blocks,
        "pending_bytes": s.pending_bytes,
        "lag_seconds": s.lag_seconds,
        "applied_seq": s.applied_seq,
        "last_seq": s.last_seq,
        "journal_bytes": s.journal_bytes,
        "bytes_replicated": s.bytes_replicated,
        "bytes_resynced": s.bytes_resynced,
        "resync_progress": s.resync_progress,
        "takeover_phase": s.takeover().label(),
        "peer_pending_blocks": s.peer_pending_blocks,
        "overlay_blocks": s.overlay_blocks,
        "proxied_reads": s.proxied_reads,
        "proxied_read_errors": s.proxied_read_errors,
        "lost_blocks": s.lost_blocks,
        "lost_seq_from": s.lost_seq_from,
        "lost_seq_to": s.lost_seq_to,
        "condition": s.condition,
        "condition_reason": s.condition_reason,
        "sync_degraded": s.sync_degraded,
        "sync_timeouts": s.sync_timeouts,
        "lease_ms": s.lease_ms,
        "lease_remaining_ms": s.lease_remaining_ms,
        "promise_remaining_ms": s.promise_remaining_ms,
        "sync_fallback": s.sync_fallback,
        "peer_backlog_blocks": s.peer_backlog_blocks,
        "exported_lost_blocks": s.exported_lost_blocks,
        "lost_export": s.lost_export,
        "events": s.events,
    })
}
