//! Mutual TLS on gRPC (issue 13): engines with `--tls-dir` replicate and take over; clients
//! without an acceptable certificate are UNAUTHENTICATED; identities get only their rights;
//! rotation keeps the replication stream; no token or key reaches a log. The gRPC acceptor's
//! limits: idle handshakers closed at the handshake timeout or evicted at the cap, refusal over
//! the cap, descriptor exhaustion without spinning.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use common::*;
use storage_engine::{
    client::{channel_with, EngineClient, TakeoverPolicy, TokenInterceptor},
    pb,
};
use tandem_api::{
    tls::{self, Ca, ClientTls, Identity, VolumeRef},
    Reason,
};
use tonic::Code;

const DAY: Duration = Duration::from_secs(86400);

fn vol() -> VolumeRef {
    VolumeRef::new("local", "vol")
}

/// A CA in `<dir>/ca` (through `tandem-engine certs`, as a user would) and the --tls-dir of one
/// identity per name.
struct Certs {
    dir: std::path::PathBuf,
    ca: Ca,
}

impl Certs {
    fn new(dir: &Path) -> Certs {
        let ca_dir = dir.join("ca");
        let out = std::process::Command::new(Bin::Engine.path().unwrap())
            .args(["certs", "ca", "--out"])
            .arg(&ca_dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let ca = tls::mint::read_ca_dir(&ca_dir).unwrap();
        Certs {
            dir: dir.to_path_buf(),
            ca,
        }
    }

    /// `tandem-engine certs issue` for an identity, into `<dir>/<name>`.
    fn issue_cli(&self, name: &str, args: &[&str]) -> std::path::PathBuf {
        let out_dir = self.dir.join(name);
        let out = std::process::Command::new(Bin::Engine.path().unwrap())
            .args(["certs", "issue", "--ca"])
            .arg(self.dir.join("ca"))
            .arg("--out")
            .arg(&out_dir)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        out_dir
    }

    fn issue(&self, name: &str, id: &Identity) -> std::path::PathBuf {
        let out_dir = self.dir.join(name);
        let issued = self.ca.issue(id, &[], DAY).unwrap();
        tls::mint::write_dir(&out_dir, self.ca.cert_pem(), &issued).unwrap();
        out_dir
    }

    fn client(&self, id: &Identity) -> ClientTls {
        let issued = self.ca.issue(id, &[], DAY).unwrap();
        ClientTls::from_pem(self.ca.cert_pem(), &issued.cert_pem, &issued.key_pem).unwrap()
    }
}

fn csi(node: &str) -> Identity {
    Identity::Csi {
        volume: vol(),
        node: node.into(),
    }
}

/// A linked pair of engines of `local/vol` with TLS, a on node-a and b on node-b; their CLIs
/// and clients speak as the operator.
fn tls_pair(dir: &Path, certs: &Certs, extra: &[&str]) -> Pair {
    tls_pair_with(dir, certs, extra, |e| e)
}

fn tls_pair_with(
    dir: &Path,
    certs: &Certs,
    extra: &[&str],
    more: impl Fn(EngineBuilder) -> EngineBuilder,
) -> Pair {
    let a = certs.issue_cli(
        "engine-a",
        &[
            "--identity",
            "engine",
            "--namespace",
            "local",
            "--volume",
            "vol",
        ],
    );
    let b = certs.issue("engine-b", &Identity::Engine { volume: vol() });
    let op = certs.issue_cli("operator", &["--identity", "operator", "--valid-for", "1d"]);
    pair_builder(dir, "16M", extra, extra)
        .a(|e| more(e.tls_dir(&a).node_name("node-a").client_tls_dir(&op)))
        .b(|e| {
            more(e)
                .tls_dir(&b)
                .node_name("node-b")
                .client_tls_dir(&op)
                .fault_injection()
        })
        .linked()
        .start()
        .unwrap()
}

async fn status_with(
    addr: &str,
    tls: Option<&ClientTls>,
) -> Result<pb::StatusReply, (Code, String)> {
    let mut c = EngineClient::connect_with(addr, Some(TOKEN), tls)
        .await
        .map_err(|e| (Code::Unknown, e.to_string()))?;
    c.status("vol")
        .await
        .map_err(|e| (e.code().unwrap_or(Code::Unknown), e.to_string()))
}

async fn peer_call(addr: &str, tls: &ClientTls) -> tonic::Status {
    let ch = channel_with(addr, Duration::from_secs(5), Some(tls))
        .await
        .unwrap();
    let mut c = pb::peer_client::PeerClient::with_interceptor(
        ch,
        TokenInterceptor::new(Some(TOKEN)).unwrap(),
    );
    c.read_blocks(pb::ReadBlocksRequest::default())
        .await
        .expect_err("a Peer call was allowed")
}

#[test]
fn a_tls_pair_replicates_and_takes_over() {
    let d = tempfile::tempdir().unwrap();
    let certs = Certs::new(d.path());
    let pair = tls_pair(&d.path().join("pair"), &certs, &[]);
    pair.wait_synced(30);
    for b in 0..8 {
        put_block(&pair.a.uri(), b, 0xa0 + b as u8);
    }
    pair.wait_synced(30);
    // The operator's takeover on b: a handoff over the engines' mutual TLS.
    let r = takeover(&pair.b);
    assert_eq!(r["epoch"], 2);
    assert_eq!(status(&pair.b)["role"], "primary");
    for b in 0..8 {
        assert!(block_reads(&pair.b.uri(), b, 0xa0 + b as u8), "block {b}");
    }
    // Reverse replication runs over TLS too.
    put_block(&pair.b.uri(), 20, 0x5e);
    wait_until(30, "reverse replication synced", || {
        status(&pair.b)["pair_state"] == "Synced"
    });
    assert!(file_block_is(&pair.a.data(), 20, 0x5e));
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_clients_get_unauthenticated() {
    let d = tempfile::tempdir().unwrap();
    let certs = Certs::new(d.path());
    let pair = tls_pair(&d.path().join("pair"), &certs, &[]);
    let addr = pair.a.grpc.clone();

    // The operator gets an answer: the engine serves TLS at all.
    let op = certs.client(&Identity::Operator);
    assert_eq!(status_with(&addr, Some(&op)).await.unwrap().volume, "vol");

    let refused = |r: Result<pb::StatusReply, (Code, String)>, what: &str| {
        let (code, msg) = r.expect_err(what);
        assert_eq!(code, Code::Unauthenticated, "{what}: {msg}");
        assert!(msg.contains("requires mutual TLS"), "{what}: {msg}");
        msg
    };
    // Plaintext HTTP/2 with the right token.
    let msg = refused(status_with(&addr, None).await, "plaintext");
    assert!(msg.contains("plaintext"), "{msg}");
    // TLS without a certificate.
    let anon = ClientTls::anonymous(certs.ca.cert_pem()).unwrap();
    let msg = refused(status_with(&addr, Some(&anon)).await, "no certificate");
    assert!(msg.contains("no client certificate"), "{msg}");
    // A certificate of another CA (the client trusts both, so the handshake completes).
    let other = Ca::generate("another CA", DAY).unwrap();
    let issued = other.issue(&Identity::Operator, &[], DAY).unwrap();
    let both = format!("{}{}", certs.ca.cert_pem(), other.cert_pem());
    let foreign = ClientTls::from_pem(&both, &issued.cert_pem, &issued.key_pem).unwrap();
    let msg = refused(status_with(&addr, Some(&foreign)).await, "another CA");
    assert!(msg.contains("unknown CA"), "{msg}");
    // The Peer service refuses them alike.
    assert_eq!(peer_call(&addr, &anon).await.code(), Code::Unauthenticated);

    // A client that does not trust the engine's CA does not talk to it at all.
    let stranger =
        ClientTls::from_pem(other.cert_pem(), &issued.cert_pem, &issued.key_pem).unwrap();
    assert!(
        EngineClient::connect_with(&addr, Some(TOKEN), Some(&stranger))
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn identities_get_only_their_rights() {
    let d = tempfile::tempdir().unwrap();
    let certs = Certs::new(d.path());
    let pair = tls_pair(&d.path().join("pair"), &certs, &[]);
    pair.wait_synced(30);
    let denied = |e: tandem_api::client::ClientError, what: &str| {
        assert_eq!(e.code(), Some(Code::PermissionDenied), "{what}: {e}");
        assert_eq!(e.reason(), Some(Reason::PermissionDenied), "{what}: {e}");
        e.to_string()
    };
    let connect = |tls: ClientTls, addr: String| async move {
        EngineClient::connect_with(&addr, Some(TOKEN), Some(&tls))
            .await
            .unwrap()
    };

    // A CSI plugin: Status on both engines, from any node.
    let mut here = connect(certs.client(&csi("node-b")), pair.b.grpc.clone()).await;
    assert_eq!(here.status("vol").await.unwrap().volume, "vol");
    let mut far = connect(certs.client(&csi("node-b")), pair.a.grpc.clone()).await;
    assert_eq!(far.status("vol").await.unwrap().volume, "vol");

    // ... but never the Peer service.
    let s = peer_call(&pair.a.grpc, &certs.client(&csi("node-a"))).await;
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("Peer.ReadBlocks"), "{s:?}");
    // An engine of another volume, same CA: no Peer calls either.
    let foreign = Identity::Engine {
        volume: VolumeRef::new("local", "other"),
    };
    let s = peer_call(&pair.a.grpc, &certs.client(&foreign)).await;
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("engine of local/other"), "{s:?}");
    // CSI asking for a witness grant.
    let e = far.witness_grant("vol", 1000, false).await.unwrap_err();
    denied(e, "GrantLease");
    // Nor grow the volume: the operator does, and the primary grows its peer over the engines'
    // mutual TLS (Peer.Resize, the engine identity).
    let size = far.status("vol").await.unwrap().size;
    let e = far.resize("vol", 2 * size).await.unwrap_err();
    denied(e, "Resize");
    let mut op = connect(certs.client(&Identity::Operator), pair.a.grpc.clone()).await;
    let r = op.resize("vol", 2 * size).await.unwrap();
    assert_eq!((r.size, r.peer_size), (2 * size, 2 * size));
    assert_eq!(here.status("vol").await.unwrap().size, 2 * size);
    // A plugin of node-b may not take over the engine on node-a (a is primary: nothing to do,
    // but the refusal comes first).
    let e = far
        .takeover("vol", TakeoverPolicy::Wait, Duration::from_secs(5))
        .await
        .unwrap_err();
    let msg = denied(e, "Takeover from another node");
    assert!(
        msg.contains("CSI plugin on node-b") && msg.contains("Engine.Takeover"),
        "{msg}"
    );
    // Nor force, even on its own node.
    let e = here
        .takeover("vol", TakeoverPolicy::Force, Duration::from_secs(5))
        .await
        .unwrap_err();
    denied(e, "forced takeover");
    // Its own node's engine, by handoff: allowed, and it happens.
    let r = here
        .takeover("vol", TakeoverPolicy::Wait, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(r.epoch, 2);
}

#[test]
fn an_engine_needs_an_engine_identity() {
    let d = tempfile::tempdir().unwrap();
    let certs = Certs::new(d.path());
    let op = certs.issue("operator", &Identity::Operator);
    let r = EngineBuilder::new(d.path().join("e"))
        .tls_dir(&op)
        .ready_timeout(Duration::from_secs(5))
        .start();
    assert!(r.is_err(), "an engine started as the operator");
    let log = std::fs::read_to_string(d.path().join("e").join("engine.log")).unwrap();
    assert!(log.contains("names the operator, not an engine"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_keeps_the_stream_and_serves_the_new_certificate() {
    let d = tempfile::tempdir().unwrap();
    let certs = Certs::new(d.path());
    let pair = tls_pair(&d.path().join("pair"), &certs, &["--tls-reload-ms", "200"]);
    pair.wait_synced(30);
    let links = |e: &Engine| e.log().matches("replication link up").count();
    // Linking the pair restarted b once; count from here.
    let linked = links(&pair.a);
    let probe = ClientTls::anonymous(certs.ca.cert_pem()).unwrap();
    let served = || tls::client::server_certificate(&pair.a.grpc, &probe, Duration::from_secs(5));
    let before = served().await.unwrap();

    // New certificates, same CA, for both engines.
    let a_dir = d.path().join("engine-a");
    let new_a = certs
        .ca
        .issue(&Identity::Engine { volume: vol() }, &[], 2 * DAY)
        .unwrap();
    tls::mint::write_dir(&a_dir, certs.ca.cert_pem(), &new_a).unwrap();
    certs.issue("engine-b", &Identity::Engine { volume: vol() });
    let new_der = tls::mint::der_of_pem(&new_a.cert_pem).unwrap();
    assert_ne!(before, new_der);
    // A new connection sees the new certificate once the engine reloaded.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if served().await.unwrap() == new_der {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never served the new certificate"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_until(20, "b reloaded", || {
        pair.b.log().contains("TLS certificates reloaded")
    });
    // The stream stayed up: writes keep replicating without a new link.
    for b in 0..4 {
        put_block(&pair.a.uri(), b, 0x70 + b as u8);
    }
    pair.wait_synced(30);
    assert!(file_block_is(&pair.b.data(), 3, 0x73));
    assert_eq!(links(&pair.a), linked, "{}", pair.a.log_tail(30));
    // A directory that does not load keeps the old material (and says so).
    std::fs::write(a_dir.join(tls::KEY_FILE), "not a key").unwrap();
    wait_until(20, "a refused the broken directory", || {
        pair.a.log().contains("TLS directory not reloaded")
    });
    assert_eq!(served().await.unwrap(), new_der);
}

#[test]
fn no_token_or_key_in_debug_logs() {
    let d = tempfile::tempdir().unwrap();
    let certs = Certs::new(d.path());
    let pair = tls_pair_with(&d.path().join("pair"), &certs, &[], |e| {
        e.env("RUST_LOG", "debug")
    });
    pair.wait_synced(30);
    put_block(&pair.a.uri(), 1, 0x11);
    takeover(&pair.b);
    put_block(&pair.b.uri(), 2, 0x22);
    let logs = format!("{}{}", pair.a.log(), pair.b.log());
    assert!(logs.contains("DEBUG"), "not at debug level");
    assert!(!logs.contains(TOKEN), "the token is in a log");
    assert!(!logs.contains("PRIVATE KEY"));
    for dir in ["engine-a", "engine-b", "operator"] {
        let key = std::fs::read_to_string(d.path().join(dir).join(tls::KEY_FILE)).unwrap();
        for line in key.lines().filter(|l| !l.starts_with("-----")) {
            // Any 16 characters of the key's base64 would do to find it.
            for chunk in line.as_bytes().chunks(16).filter(|c| c.len() == 16) {
                let chunk = std::str::from_utf8(chunk).unwrap();
                assert!(!logs.contains(chunk), "key bytes of {dir} in a log");
            }
        }
    }
}

// ---------- the gRPC acceptor's limits ----------

/// One engine of `local/vol` with TLS and no peer; returns it and an operator client.
fn tls_engine(dir: &Path, certs: &Certs, extra: &[&str]) -> (Engine, ClientTls) {
    let me = certs.issue("engine", &Identity::Engine { volume: vol() });
    let e = EngineBuilder::new(dir.join("engine"))
        .tls_dir(&me)
        .token(TOKEN)
        .args(extra)
        .start()
        .unwrap();
    (e, certs.client(&Identity::Operator))
}

/// Opens `n` TCP connections to `addr` that never send a byte (no ClientHello).
async fn idle_clients(addr: &str, n: usize) -> Vec<tokio::task::JoinHandle<(usize, Instant)>> {
    let mut idle = Vec::with_capacity(n);
    for _ in 0..n {
        idle.push(hold(tokio::net::TcpStream::connect(addr).await.unwrap()));
    }
    idle
}

/// Status as `tls`, retried until it answers or `secs` pass.
async fn status_within(addr: &str, tls: &ClientTls, secs: u64) -> pb::StatusReply {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match status_with(addr, Some(tls)).await {
            Ok(r) => return r,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no Status within {secs} s: {e:?}"),
        }
    }
}

#[test]
fn grpc_idle_handshakers_are_closed_at_the_timeout_while_a_tls_client_gets_status() {
    let d = tempfile::tempdir().unwrap();
    let certs = Certs::new(d.path());
    let metrics = tandem_testkit::free_port();
    let (e, op) = tls_engine(
        d.path(),
        &certs,
        &[
            "--max-grpc-connections",
            "2000",
            "--grpc-handshake-timeout-ms",
            "5000",
            "--metrics-listen",
            &metrics,
        ],
    );
    let pid = e.pid().unwrap();
    let baseline = fd_count(pid);
    let rt = runtime();
    let opened = Instant::now();
    let idle = rt.block_on(idle_clients(&e.grpc, 1000));
    wait_until(20, "the engine to hold 1000 idle connections", || {
        fd_count(pid) >= baseline + 1000
    });
    // A real client during the flood: a TLS handshake, then an answer.
    let reply = rt.block_on(status_with(&e.grpc, Some(&op))).unwrap();
    assert_eq!(reply.volume, "vol");
    let served = Instant::now();
    let closes = rt.block_on(closed_within(idle, 20, "an idle connection"));
    for (got, at) in closes {
        assert_eq!(got, 0, "the server sends nothing before a ClientHello");
        assert!(
            at > served,
            "an idle client was closed before Status was served"
        );
        // Each one's clock starts at its accept, after `opened`: closed by the timeout, not
        // sooner, and not much later.
        let after = at.duration_since(opened);
        assert!(
            after >= Duration::from_secs(5) && after < Duration::from_secs(5 + 8),
            "closed {after:?} after the flood began"
        );
    }
    wait_until(10, "the engine's descriptors back at the baseline", || {
        fd_count(pid) <= baseline + 2
    });
    assert_eq!(counter(&metrics, "grpc_handshake_timeouts"), 1000.0);
    assert_eq!(counter(&metrics, "grpc_handshakes_evicted"), 0.0);
    assert_eq!(counter(&metrics, "grpc_connections_refused"), 0.0);
    // A timeout above the default is refused: the flag only shortens it.
    let log = d.path().join("over");
    assert!(EngineBuilder::new(&log)
        .args(["--grpc-handshake-timeout-ms", "10001"])
        .start()
        .is_err());
    let log = std::fs::read_to_string(log.join("engine.log")).unwrap();
    assert!(log.contains("10001"), "{log}");
}

#[test]
fn grpc_idle_handshakers_at_the_cap_make_room_for_a_tls_client() {
    let d = tempfile::tempdir().unwrap();
    let certs = Certs::new(d.path());
    // The default cap (256) and handshake timeout (10 s): the flood cannot wait the timeout out.
    let metrics = tandem_testkit::free_port();
    let (e, op) = tls_engine(d.path(), &certs, &["--metrics-listen", &metrics]);
    let pid = e.pid().unwrap();
    let baseline = fd_count(pid);
    let rt = runtime();
    let idle = rt.block_on(idle_clients(&e.grpc, 1000));
    wait_until(20, "all but the 256 newest idle clients evicted", || {
        idle.iter().filter(|h| h.is_finished()).count() == 1000 - 256
    });
    // The oldest went first: the newest 256 are the ones still open.
    assert!(idle[..1000 - 256].iter().all(|h| h.is_finished()));
    assert!(idle[1000 - 256..].iter().all(|h| !h.is_finished()));
    assert!(fd_count(pid) <= baseline + 256 + 2, "{}", fd_count(pid));
    let started = Instant::now();
    let reply = rt.block_on(status_with(&e.grpc, Some(&op))).unwrap();
    assert_eq!(reply.volume, "vol");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the real client waited {:?}: it must not wait for the idle ones' timeout",
        started.elapsed()
    );
    // It took the place of the oldest idle one left.
    wait_until(5, "one more idle client evicted", || {
        idle.iter().filter(|h| h.is_finished()).count() == 1000 - 256 + 1
    });
    assert!(idle[1000 - 256].is_finished());
    assert_eq!(
        counter(&metrics, "grpc_handshakes_evicted"),
        1000.0 - 256.0 + 1.0
    );
    drop(idle);
    drop(rt);
    wait_until(10, "the engine's descriptors back at the baseline", || {
        fd_count(pid) <= baseline + 2
    });
}

#[test]
fn grpc_over_the_cap_with_every_connection_established_a_newcomer_is_closed_at_once() {
    let d = tempfile::tempdir().unwrap();
    let certs = Certs::new(d.path());
    let (e, op) = tls_engine(d.path(), &certs, &["--max-grpc-connections", "3"]);
    let rt = runtime();
    rt.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..3 {
            let mut c = EngineClient::connect_with(&e.grpc, Some(TOKEN), Some(&op))
                .await
                .unwrap();
            c.status("vol").await.unwrap();
            clients.push(c);
        }
        let t = Instant::now();
        let (got, _) = hold(tokio::net::TcpStream::connect(&e.grpc).await.unwrap())
            .await
            .unwrap();
        assert_eq!(got, 0);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(
            status_with(&e.grpc, Some(&op)).await.is_err(),
            "a fourth client was served"
        );
        assert!(
            e.log().contains("too many connections"),
            "{}",
            e.log_tail(10)
        );
        // The established ones still work, and a freed place is usable again.
        for c in &mut clients {
            assert_eq!(c.status("vol").await.unwrap().volume, "vol");
        }
        drop(clients.pop());
        assert_eq!(status_within(&e.grpc, &op, 10).await.volume, "vol");
    });
}

#[test]
fn grpc_fd_exhaustion_pauses_accepts_instead_of_spinning_and_recovers() {
    let d = tempfile::tempdir().unwrap();
    let certs = Certs::new(d.path());
    let (e, op) = tls_engine(d.path(), &certs, &["--max-grpc-connections", "1000"]);
    let rt = runtime();
    let idle = exhaust_fds(&rt, &e, &e.grpc, "grpc");
    // The descriptors come back: the engine accepts (and drops) the queued dead connections,
    // then serves a real TLS client.
    drop(idle);
    let reply = rt.block_on(status_within(&e.grpc, &op, 20));
    assert_eq!(reply.volume, "vol");
    assert!(e.log().contains("accepting again"), "{}", e.log_tail(20));
}
