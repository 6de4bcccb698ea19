//! Shared harness for integration tests: real `tandem-engine` processes (launched by the testkit)
//! and real NBD clients, with this suite's conventions: volume `vol`, a unix socket beside TCP, the
//! token `s3cret-token`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

pub use tandem_testkit::*;

/// The pairs' token.
pub const TOKEN: &str = "s3cret-token";

/// One engine in `dir` (also serving NBD on its unix socket) with extra `serve` args.
pub fn start_engine(dir: &Path, volume: &str, size: &str, extra: &[&str]) -> Engine {
    EngineBuilder::new(dir)
        .volume(volume)
        .size(size)
        .nbd_socket()
        .args(extra)
        .start()
        .unwrap()
}

/// The pairs of these tests: a token file, NBD also on unix sockets, fault injection on a.
pub fn pair_builder(dir: &Path, size: &str, extra_a: &[&str], extra_b: &[&str]) -> PairBuilder {
    Pair::builder(dir)
        .size(size)
        .token(&format!("{TOKEN}\n"))
        .a(|e| e.nbd_socket().fault_injection().args(extra_a))
        .b(|e| e.nbd_socket().args(extra_b))
}

/// A primary (a, with fault injection) and a secondary (b, whose peer is a dead address).
pub fn start_pair(dir: &Path, size: &str, extra_a: &[&str], extra_b: &[&str]) -> Pair {
    pair_builder(dir, size, extra_a, extra_b).start().unwrap()
}

/// A pair where each engine knows the other's address (needed for takeover and failback); both
/// allow fault injection.
pub fn start_linked(dir: &Path, size: &str, extra_a: &[&str], extra_b: &[&str]) -> Pair {
    pair_builder(dir, size, extra_a, extra_b)
        .b(EngineBuilder::fault_injection)
        .linked()
        .start()
        .unwrap()
}

/// `tandem-engine status --json`.
pub fn status(e: &Engine) -> serde_json::Value {
    e.status_json()
        .unwrap_or_else(|err| panic!("status failed: {err}"))
}

/// `tandem-engine fault` with `args`.
pub fn fault(e: &Engine, args: &[&str]) {
    e.control("fault", args)
        .unwrap_or_else(|err| panic!("fault {args:?} failed: {err}"));
}

/// Takeover on `e` (policy wait).
pub fn takeover(e: &Engine) -> serde_json::Value {
    e.control("takeover", &[])
        .unwrap_or_else(|err| panic!("takeover failed: {err}\nlog:\n{}", e.log_tail(20)))
}

/// `GET /metrics` over plain HTTP: the whole response.
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The value of `series` (a full name with labels) on a metrics page.
/// A counter of the engine's metrics page at `metrics` (label `volume="vol"`).
pub fn counter(metrics: &str, name: &str) -> f64 {
    let page = scrape(metrics);
    sample(&page, &format!("tandem_{name}_total{{volume=\"vol\"}}"))
        .unwrap_or_else(|| panic!("{name} missing from\n{page}"))
}

pub fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The names of an engine's events, in order (the timestamp dropped).
pub fn event_names(status: &serde_json::Value) -> Vec<String> {
    status["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let s = e.as_str().unwrap();
            let rest = s.split_once(' ').map_or(s, |(_, r)| r);
            rest.split(' ').next().unwrap_or("").to_string()
        })
        .collect()
}

/// Index of the first event named `name`; panics if absent.
pub fn event_at(names: &[String], name: &str) -> usize {
    names
        .iter()
        .position(|n| n == name)
        .unwrap_or_else(|| panic!("event {name} missing from {names:?}"))
}

/// Reads `len` bytes at `offset` through NBD as one request (TCP address "host:port").
pub fn nbd_read(addr: &str, offset: u64, len: u32) -> Result<Vec<u8>, String> {
    use storage_engine::nbd::client::NbdClient;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = NbdClient::connect(addr, "vol")
            .await
            .map_err(|e| e.to_string())?;
        let d = c.read(offset, len).await.map_err(|e| e.to_string())?;
        let _ = c.disconnect().await;
        Ok(d)
    })
}

/// Cases for a model-based property test: `default` in CI, more with `TANDEM_MODEL_CASES=N`.
pub fn model_cases(default: u32) -> u32 {
    std::env::var("TANDEM_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `--lease-ms 0`, for tests of forced promotion that are not about the lease (its wait is
/// `tests/lease.rs` `a_forced_promotion_waits_for_the_old_primarys_lease`).
pub const NO_LEASE: &[&str] = &["--lease-ms", "0"];

/// A number from a status or reply JSON.
pub fn n(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

/// Writes `data` at 4 KiB block `b` through NBD and flushes: acknowledged when this returns.
pub fn write_block(e: &Engine, b: u64, data: &[u8]) {
    use storage_engine::nbd::client::NbdClient;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = NbdClient::connect(&e.nbd, "vol").await.unwrap();
        c.write(b * 4096, data).await.unwrap();
        c.flush().await.unwrap();
        let _ = c.disconnect().await;
    });
}

/// 4 KiB block `b` through NBD.
pub fn read_block(e: &Engine, b: u64) -> Vec<u8> {
    nbd_read(&e.nbd, b * 4096, 4096).unwrap()
}

/// A 4 KiB block's worth of `pattern(seed)`.
pub fn content(seed: u64) -> Vec<u8> {
    pattern(seed, 4096)
}

// ---------- endpoint limits (nbd_limits.rs, tls.rs) ----------

/// A runtime for tests that hold many client connections at once.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Open descriptors of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// CPU time of process `pid` (utime + stime) in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name may hold spaces; the fields after it do not. utime and stime are fields
    // 14 and 15, the 12th and 13th after the name.
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// An idle client: reads until the server closes; returns what it got and when the close came.
pub fn hold<S: tokio::io::AsyncRead + Unpin + Send + 'static>(
    mut s: S,
) -> tokio::task::JoinHandle<(usize, std::time::Instant)> {
    use tokio::io::AsyncReadExt as _;
    tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        (buf.len(), std::time::Instant::now())
    })
}

/// Waits for each held connection (`hold`) to be closed by the server, at most `secs` each:
/// what it received and when it closed.
pub async fn closed_within(
    held: Vec<tokio::task::JoinHandle<(usize, std::time::Instant)>>,
    secs: u64,
    what: &str,
) -> Vec<(usize, std::time::Instant)> {
    let mut closes = Vec::with_capacity(held.len());
    for h in held {
        let closed = tokio::time::timeout(std::time::Duration::from_secs(secs), h)
            .await
            .unwrap_or_else(|_| panic!("{what} still open {secs} s later"));
        closes.push(closed.unwrap());
    }
    closes
}

/// Runs `listener`'s engine out of descriptors: leaves it a dozen (prlimit on the running engine;
/// the workspace forbids pre_exec), opens 100 connections to `addr` (the kernel completes them
/// itself), waits until the engine logged a failed accept for `listener`, and asserts it then
/// pauses instead of spinning: a spinning accept loop burns the whole 2 s (about 200 ticks), a
/// paused one next to nothing, and the failure is logged once per burst. Returns the open
/// connections: dropping them gives the descriptors back.
pub fn exhaust_fds(
    rt: &tokio::runtime::Runtime,
    e: &tandem_testkit::Engine,
    addr: &str,
    listener: &str,
) -> Vec<tokio::net::TcpStream> {
    let pid = e.pid().unwrap();
    let limit = fd_count(pid) + 12;
    tandem_testkit::run_ok(
        "prlimit",
        &[
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ],
    );
    let idle = rt.block_on(async {
        let mut idle = Vec::new();
        for _ in 0..100 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        idle
    });
    let failed = |log: &str| {
        log.lines()
            .filter(|l| l.contains("accept failed") && l.contains(listener))
            .count()
    };
    tandem_testkit::wait_until(20, "the engine to run out of descriptors", || {
        failed(&e.log()) > 0
    });
    let before = cpu_ticks(pid);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let spent = cpu_ticks(pid) - before;
    assert!(
        spent < 30,
        "the engine used {spent} ticks of CPU in 2 s of exhaustion"
    );
    assert_eq!(
        failed(&e.log()),
        1,
        "logged once per burst:\n{}",
        e.log_tail(20)
    );
    idle
}
