//! Issue 13's limits on the engine's endpoints, against the real binary: NBD handshake timeouts and
//! the connection cap (evicting idle handshakers), pinned exports only, no TCP listener in pods,
//! the unix socket's mode, file-descriptor exhaustion without spinning, and the metrics endpoint's
//! own cap and deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    time::{Duration, Instant},
};

use common::*;
use storage_engine::nbd::client::{handshake_async, NbdClient};
use tokio::net::{TcpStream, UnixStream};

/// The TCP ports process `pid` listens on (from /proc/net/tcp{,6}, matched by socket inode).
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEXIP:HEXPORT, st 0A is LISTEN, the inode is field 10.
            if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
                let port = f[1].rsplit(':').next().unwrap();
                ports.push(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports.sort_unstable();
    ports
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// Opens `n` NBD connections that never answer the greeting, a tenth of them on the unix socket
/// (both listeners share the connection table and the timeout).
async fn idle_nbd_clients(e: &Engine, n: usize) -> Vec<tokio::task::JoinHandle<(usize, Instant)>> {
    let mut idle = Vec::with_capacity(n);
    for i in 0..n {
        if i % 10 == 0 {
            idle.push(hold(UnixStream::connect(e.socket()).await.unwrap()));
        } else {
            idle.push(hold(TcpStream::connect(&e.nbd).await.unwrap()));
        }
    }
    idle
}

/// The NBD greeting the server sends before waiting for the client's flags.
const GREETING: usize = 18;

#[test]
fn idle_handshakers_are_closed_at_the_timeout_while_a_real_client_gets_in() {
    let d = tempfile::tempdir().unwrap();
    let metrics = free_port();
    let e = EngineBuilder::new(d.path())
        .nbd_socket()
        .args([
            "--nbd-max-connections",
            "2000",
            "--nbd-handshake-timeout-ms",
            "5000",
            "--metrics-listen",
            &metrics,
        ])
        .start()
        .unwrap();
    let pid = e.pid().unwrap();
    let baseline = fd_count(pid);
    let rt = runtime();
    let opened = Instant::now();
    let idle = rt.block_on(idle_nbd_clients(&e, 1000));
    wait_until(20, "the engine to hold 1000 idle connections", || {
        fd_count(pid) >= baseline + 1000
    });
    // The real client, during the flood: it writes and reads back over its own connection.
    qemu_io_ok(
        &e.uri(),
        &["write -P 0x5a 0 64k", "flush", "read -P 0x5a 0 64k"],
    );
    let served = Instant::now();
    let closes = rt.block_on(closed_within(idle, 20, "an idle handshaker"));
    for (got, at) in &closes {
        assert_eq!(
            *got, GREETING,
            "each idle client got the greeting, then EOF"
        );
        assert!(
            *at > served,
            "an idle client was closed before the real one was served"
        );
        assert!(
            at.duration_since(opened) < Duration::from_secs(5 + 8),
            "closed {:?} after the flood began",
            at.duration_since(opened)
        );
    }
    wait_until(10, "the engine's descriptors back at the baseline", || {
        fd_count(pid) <= baseline + 2
    });
    assert_eq!(counter(&metrics, "nbd_handshake_timeouts"), 1000.0);
    assert_eq!(counter(&metrics, "nbd_handshakes_evicted"), 0.0);
    // The volume still holds what the real client wrote.
    qemu_io_ok(&e.unix_uri(), &["read -P 0x5a 0 64k"]);
}

#[test]
fn idle_handshakers_at_the_cap_make_room_for_a_real_client() {
    let d = tempfile::tempdir().unwrap();
    let metrics = free_port();
    // The default cap (64) and handshake timeout (10 s): the flood cannot wait the timeout out.
    let e = EngineBuilder::new(d.path())
        .nbd_socket()
        .args(["--metrics-listen", &metrics])
        .start()
        .unwrap();
    let pid = e.pid().unwrap();
    let baseline = fd_count(pid);
    let rt = runtime();
    let idle = rt.block_on(idle_nbd_clients(&e, 1000));
    wait_until(20, "all but the 64 newest idle clients evicted", || {
        idle.iter().filter(|h| h.is_finished()).count() == 1000 - 64
    });
    assert!(fd_count(pid) <= baseline + 64 + 2, "{}", fd_count(pid));
    let started = Instant::now();
    qemu_io_ok(
        &e.unix_uri(),
        &["write -P 0xc3 4k 8k", "flush", "read -P 0xc3 4k 8k"],
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the real client waited {:?}: it must not wait for the idle ones' timeout",
        started.elapsed()
    );
    let evicted = counter(&metrics, "nbd_handshakes_evicted");
    assert!(evicted >= f64::from(1000 - 64 + 1), "{evicted}");
    assert_eq!(counter(&metrics, "nbd_connections_refused"), 0.0);
    drop(idle);
    drop(rt);
    wait_until(10, "the engine's descriptors back at the baseline", || {
        fd_count(pid) <= baseline + 2
    });
}

#[test]
fn over_the_cap_with_every_connection_established_a_newcomer_is_closed_at_once() {
    let d = tempfile::tempdir().unwrap();
    let metrics = free_port();
    let e = EngineBuilder::new(d.path())
        .args(["--nbd-max-connections", "4", "--metrics-listen", &metrics])
        .start()
        .unwrap();
    let rt = runtime();
    rt.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(NbdClient::connect(&e.nbd, "vol").await.unwrap());
        }
        let t = Instant::now();
        let (got, _) = hold(TcpStream::connect(&e.nbd).await.unwrap())
            .await
            .unwrap();
        assert_eq!(got, 0, "the fifth connection got no greeting");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert_eq!(counter(&metrics, "nbd_connections_refused"), 1.0);
        // The established ones still work, and a freed place is usable again.
        clients[0].write(0, &[7u8; 4096]).await.unwrap();
        assert_eq!(clients[1].read(0, 4096).await.unwrap(), vec![7u8; 4096]);
        clients.pop().unwrap().disconnect().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut again = loop {
            match NbdClient::connect(&e.nbd, "vol").await {
                Ok(c) => break c,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(err) => panic!("no place after a disconnect: {err}"),
            }
        };
        assert_eq!(again.read(0, 4096).await.unwrap(), vec![7u8; 4096]);
    });
}

#[test]
fn fd_exhaustion_pauses_accepts_instead_of_spinning_and_recovers() {
    let d = tempfile::tempdir().unwrap();
    let metrics = free_port();
    let e = EngineBuilder::new(d.path())
        .args([
            "--nbd-max-connections",
            "1000",
            "--metrics-listen",
            &metrics,
        ])
        .start()
        .unwrap();
    let rt = runtime();
    let idle = exhaust_fds(&rt, &e, &e.nbd, "nbd");
    // The descriptors come back: the engine accepts (and drops) the queued dead connections, then
    // serves a real client.
    drop(idle);
    drop(rt);
    qemu_io_ok(&e.uri(), &["write -P 0x42 0 4k", "read -P 0x42 0 4k"]);
    assert!(counter(&metrics, "nbd_accept_errors") >= 1.0);
    assert!(e.log().contains("accepting again"), "{}", e.log_tail(20));
}

#[test]
fn pinned_only_refuses_the_bare_names_and_nothing_listens_for_nbd_on_tcp() {
    let d = tempfile::tempdir().unwrap();
    let e = EngineBuilder::new(d.path())
        .volume("vol")
        .nbd_local_only()
        .start()
        .unwrap();
    // The ready file says there is no NBD TCP listener, and names the socket.
    let ready: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path().join("ready.json")).unwrap()).unwrap();
    assert!(ready["nbd"].is_null(), "{ready}");
    assert_eq!(ready["nbd_socket"], e.socket().to_string_lossy().as_ref());
    assert_eq!(e.nbd, NBD_OFF);
    assert_eq!(e.nbd_addr(), format!("unix:{}", e.socket().display()));
    // The only TCP listener is gRPC.
    assert_eq!(listening_ports(e.pid().unwrap()), [port_of(&e.grpc)]);

    let epoch = n(&status(&e), "epoch");
    for bare in ["vol", ""] {
        let out = run("nbdinfo", &["--size", &e.unix_uri_for(bare)]);
        assert!(!out.status.success(), "export {bare:?} opened");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("policy"), "export {bare:?}: {err}");
        // The refusal says why (nbdinfo prints only the code).
        let err = runtime().block_on(async {
            let mut s = UnixStream::connect(e.socket()).await.unwrap();
            handshake_async(&mut s, bare, &[]).await.unwrap_err()
        });
        assert!(err.is_policy_refusal(), "{err}");
        assert!(
            err.to_string().contains("--nbd-pinned-exports-only"),
            "{err}"
        );
    }
    let pinned = e.unix_uri_for(&format!("vol@{epoch}"));
    assert_eq!(run_ok("nbdinfo", &["--size", &pinned]).trim(), "16777216");
    qemu_io_ok(&pinned, &["write -P 0x99 0 4k", "read -P 0x99 0 4k"]);
    // Another epoch is still refused as before.
    let other = run(
        "nbdinfo",
        &["--size", &e.unix_uri_for(&format!("vol@{}", epoch + 1))],
    );
    assert!(!other.status.success());
}

#[test]
fn socket_is_0600_replaces_a_stale_socket_and_never_another_file() {
    let d = tempfile::tempdir().unwrap();
    let mut e = EngineBuilder::new(d.path().join("a"))
        .nbd_local_only()
        .start()
        .unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&e.socket()), 0o600);
    // SIGKILL leaves the socket file behind; the restart replaces it.
    e.kill();
    assert!(e.socket().exists());
    e.restart().unwrap();
    assert_eq!(mode(&e.socket()), 0o600);
    let epoch = n(&status(&e), "epoch");
    run_ok(
        "nbdinfo",
        &["--size", &e.unix_uri_for(&format!("vol@{epoch}"))],
    );
    // No temporary socket is left beside it.
    let names: Vec<String> = std::fs::read_dir(d.path().join("a"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("sock"))
        .collect();
    assert_eq!(names, ["nbd.sock"]);

    // A regular file where the socket should go is left alone, and the engine does not start.
    let b = d.path().join("b");
    std::fs::create_dir_all(&b).unwrap();
    std::fs::write(b.join("nbd.sock"), "precious").unwrap();
    // The error is read from the engine's log: the start error quotes only its tail, which is a
    // backtrace under RUST_BACKTRACE=1.
    let refused = |dir: &Path, b: EngineBuilder| {
        assert!(
            b.start().is_err(),
            "the engine in {} started",
            dir.display()
        );
        std::fs::read_to_string(dir.join("engine.log")).unwrap()
    };
    let log = refused(&b, EngineBuilder::new(&b).nbd_local_only());
    assert!(log.contains("is not a socket"), "{log}");
    assert_eq!(
        std::fs::read_to_string(b.join("nbd.sock")).unwrap(),
        "precious"
    );

    // No listener at all is refused; so is a handshake timeout above 10 s.
    let c = d.path().join("c");
    let log = refused(&c, EngineBuilder::new(&c).nbd_listen(NBD_OFF));
    assert!(
        log.contains("--nbd-listen off without --nbd-socket"),
        "{log}"
    );
    let e = d.path().join("e");
    let log = refused(
        &e,
        EngineBuilder::new(&e).args(["--nbd-handshake-timeout-ms", "10001"]),
    );
    assert!(log.contains("10001"), "{log}");
}

#[test]
fn http_silent_clients_time_out_and_over_the_cap_are_refused_and_metrics_answer_again() {
    let d = tempfile::tempdir().unwrap();
    let metrics = free_port();
    let e = EngineBuilder::new(d.path())
        .args(["--metrics-listen", &metrics])
        .start()
        .unwrap();
    let rt = runtime();
    let (opened, silent, extra) = rt.block_on(async {
        let opened = Instant::now();
        let mut silent = Vec::new();
        for _ in 0..32 {
            silent.push(hold(TcpStream::connect(&metrics).await.unwrap()));
        }
        let t = Instant::now();
        let extra = hold(TcpStream::connect(&metrics).await.unwrap())
            .await
            .unwrap();
        (opened, silent, (extra, t.elapsed()))
    });
    let ((got, _), took) = extra;
    assert_eq!(got, 0);
    assert!(took < Duration::from_secs(2), "the 33rd waited {took:?}");
    let closes = rt.block_on(closed_within(silent, 30, "a silent HTTP client"));
    for (got, at) in closes {
        let after = at.duration_since(opened);
        assert_eq!(got, 0);
        assert!(
            after >= Duration::from_secs(9) && after < Duration::from_secs(15),
            "closed after {after:?}"
        );
    }
    assert_eq!(counter(&metrics, "http_connections_refused"), 1.0);
    assert_eq!(counter(&metrics, "http_connections_timed_out"), 32.0);
    drop(e);
}

/// A client that sends and never reads its replies stalls only its own connection: its thread
/// blocks on the full socket, and its slow requests' replies wait on blocking-pool threads, never
/// on the runtime's workers, so other clients (whose FLUSH runs on those workers) go on.
#[test]
fn a_client_that_never_reads_its_replies_stalls_only_itself() {
    use storage_engine::nbd::proto::{Request, CMD_FLAG_FUA, CMD_READ, CMD_WRITE};
    use tokio::io::AsyncWriteExt;
    let d = tempfile::tempdir().unwrap();
    let e = EngineBuilder::new(d.path()).start().unwrap();
    let rt = runtime();
    rt.block_on(async {
        let mut s = TcpStream::connect(&e.nbd).await.unwrap();
        handshake_async(&mut s, "vol", &[]).await.unwrap();
        // 128 KiB reads (run on the connection's thread) and FUA writes (runtime tasks), until
        // both directions of the socket are full.
        let mut sent = 0u64;
        loop {
            let fua = sent % 2 == 1;
            let req = Request {
                flags: if fua { CMD_FLAG_FUA } else { 0 },
                kind: if fua { CMD_WRITE } else { CMD_READ },
                handle: sent,
                offset: (sent % 64) * 4096,
                length: if fua { 4096 } else { 128 * 1024 },
            };
            let mut bytes = req.encode().to_vec();
            if fua {
                bytes.extend_from_slice(&[0x5a; 4096]);
            }
            match tokio::time::timeout(Duration::from_millis(500), s.write_all(&bytes)).await {
                Ok(r) => r.unwrap(),
                Err(_) => break,
            }
            sent += 1;
        }
        assert!(
            sent > 64,
            "the server stopped reading after {sent} requests"
        );
        let other = async {
            let mut other = NbdClient::connect(&e.nbd, "vol").await.unwrap();
            other.write(1 << 20, &[9u8; 4096]).await.unwrap();
            other.flush().await.unwrap();
            other.read(1 << 20, 4096).await.unwrap()
        };
        let got = tokio::time::timeout(Duration::from_secs(5), other).await;
        assert_eq!(
            got.expect("another client was not served while one did not read"),
            vec![9u8; 4096]
        );
        drop(s);
    });
}
