//! The campaign's engine pair: the testkit's (SIGKILL/restart, SIGSTOP/SIGCONT, the engine's own
//! CLI for takeover, failback, fault injection and status), on loopback or with each engine in its
//! own network namespace.

use std::{
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::Result;
use tandem_testkit::{Bin, EngineBuilder, Pair, PairBuilder};

use crate::client::Shared;

pub const VOLUME: &str = "vol";

/// Both engines: the binary `bin`, a shared token, fault injection, `extra` flags.
fn builder(bin: &Path, dir: &Path, size: &str, extra: &[String]) -> PairBuilder {
    // A loaded machine starts an engine in a namespace slowly.
    let engine = |e: EngineBuilder| e.bin(bin).ready_timeout(Duration::from_secs(30));
    Pair::builder(dir)
        .volume(VOLUME)
        .size(size)
        .token("campaign-token\n")
        .fault_injection()
        .args(extra)
        .a(engine)
        .b(engine)
}

/// A linked pair on loopback: each engine knows the other's gRPC address.
pub fn start(bin: &Path, dir: &Path, size: &str, extra: &[String]) -> Result<Pair> {
    builder(bin, dir, size, extra).linked().start()
}

/// A pair whose engines run in the network namespaces `ns` and listen for gRPC on the fixed
/// addresses `grpc` (one each, reachable from the other namespace); hosts reach their NBD exports
/// through unix sockets.
pub fn start_netns(
    bin: &Path,
    dir: &Path,
    size: &str,
    extra: &[String],
    ns: [&str; 2],
    grpc: [&str; 2],
) -> Result<Pair> {
    builder(bin, dir, size, extra)
        .a(|e| {
            e.netns(ns[0])
                .nbd_socket()
                .grpc_listen(grpc[0])
                .peer(grpc[1])
        })
        .b(|e| {
            e.netns(ns[1])
                .nbd_socket()
                .grpc_listen(grpc[1])
                .peer(grpc[0])
        })
        .start()
}

/// Holds the clients (they send nothing new) and waits up to `secs` until nothing is in flight and
/// the pair has converged on the engine that serves, with `also` true for it: that engine, or None.
/// The clients stay held (the caller compares the replicas, then calls [`release`]). A client
/// counts a request in flight before it looks at the hold (`client::session`), so nothing is sent
/// once this has seen none in flight.
pub fn hold_until_quiet(
    sh: &Shared,
    pair: &Pair,
    secs: u64,
    also: impl Fn(usize) -> bool,
) -> Option<usize> {
    sh.hold.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if let Some(s) = pair.serving() {
            if sh.route.inflight() == 0 && pair.converged(s).unwrap_or(false) && also(s) {
                return Some(s);
            }
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    None
}

/// Lets the clients held by [`hold_until_quiet`] send again.
pub fn release(sh: &Shared) {
    sh.hold.store(false, Ordering::SeqCst);
}

/// What a mid-run comparison of both replicas found.
pub enum Compared {
    Identical,
    /// They differ; `new` unless the last comparison had found them differing too (only the
    /// first is a finding: later writes may simply not have rewritten those blocks yet).
    Differ {
        what: String,
        new: bool,
    },
}

/// Compares both engines' data files (the caller has let the pair converge with nothing in
/// flight); `diverged` carries whether the previous comparison found a difference.
pub fn compare_replicas(pair: &Pair, diverged: &mut bool) -> Result<Compared> {
    Ok(match compare_files(&pair[0].data(), &pair[1].data())? {
        None => {
            *diverged = false;
            Compared::Identical
        }
        Some((first, count)) => {
            let new = !std::mem::replace(diverged, true);
            Compared::Differ {
                what: format!("replicas differ: {count} blocks, the first at block {first}"),
                new,
            }
        }
    })
}

/// The first 4 KiB block at which two files differ, and how many blocks differ.
pub fn compare_files(a: &Path, b: &Path) -> Result<Option<(u64, u64)>> {
    use std::io::Read;
    let mut fa = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(a)?);
    let mut fb = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 4096], vec![0u8; 4096]);
    let mut first = None;
    let mut count = 0u64;
    let mut block = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if na == 0 && nb == 0 {
            break;
        }
        if na != nb || ba[..na] != bb[..nb] {
            first.get_or_insert(block);
            count += 1;
        }
        block += 1;
        fn read_full(r: &mut impl Read, b: &mut [u8]) -> std::io::Result<usize> {
            let mut n = 0;
            while n < b.len() {
                let k = r.read(&mut b[n..])?;
                if k == 0 {
                    break;
                }
                n += k;
            }
            Ok(n)
        }
    }
    Ok(first.map(|f| (f, count)))
}

/// The engine binary: `--engine`, else the workspace's.
pub fn locate_engine(arg: Option<PathBuf>) -> Result<PathBuf> {
    match arg {
        Some(p) => Ok(p),
        None => Bin::Engine.path(),
    }
}
