//! `tandem-engine demo`: the whole story on one machine, no root, no cluster.
//! Two engine processes form a pair on loopback; a backlog builds behind a throttled link; the
//! secondary takes over and serves at once; every byte is read back through it (the unsent ones by
//! proxied reads); the old primary drains, the overlay is merged, replication reverses; then the
//! old primary fails back. A timeline is printed at the end.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use crate::{
    cli::DemoArgs,
    client::EngineClient,
    nbd::client::NbdClient,
    pb::{self, PairState, StatusReply, TakeoverPhase},
};

const VOLUME: &str = "demo";
const TOKEN: &str = "demo-token";
const CHUNK: usize = 1 << 20;

struct Engine {
    name: &'static str,
    child: Child,
    nbd: String,
    grpc: String,
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Timeline {
    start: Instant,
    rows: Vec<(u128, String)>,
}

impl Timeline {
    fn say(&mut self, what: impl Into<String>) {
        let what = what.into();
        let t = self.start.elapsed().as_millis();
        println!("[{:>7} ms] {what}", t);
        self.rows.push((t, what));
    }
}

/// Deterministic content: block `b` of round `r`.
fn fill(buf: &mut [u8], offset: u64, round: u64) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let pos = offset / 8 + i as u64;
        let mut x = pos ^ (round.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

#[allow(clippy::too_many_arguments)]
fn spawn_engine(
    exe: &Path,
    dir: &Path,
    name: &'static str,
    role: &str,
    size: u64,
    nbd_port: u16,
    grpc_port: u16,
    peer_port: u16,
    rate: u64,
) -> anyhow::Result<Engine> {
    let d = dir.join(name);
    std::fs::create_dir_all(&d)?;
    let log = std::fs::File::create(d.join("engine.log"))?;
    let ready = d.join("ready.json");
    let _ = std::fs::remove_file(&ready);
    let child = Command::new(exe)
        .args(["serve", "--volume", VOLUME])
        .arg("--data")
        .arg(d.join("data.img"))
        .arg("--state-dir")
        .arg(d.join("state"))
        .args(["--size", &size.to_string(), "--role", role])
        .args(["--nbd-listen", &format!("127.0.0.1:{nbd_port}")])
        .args(["--grpc-listen", &format!("127.0.0.1:{grpc_port}")])
        .args(["--peer", &format!("127.0.0.1:{peer_port}")])
        .arg("--token-file")
        .arg(dir.join("token"))
        .args(["--replication-rate", &rate.to_string(), "--fault-injection"])
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let mut e = Engine {
        name,
        child,
        nbd: format!("127.0.0.1:{nbd_port}"),
        grpc: format!("127.0.0.1:{grpc_port}"),
    };
    let t = Instant::now();
    while !ready.exists() {
        if let Some(st) = e.child.try_wait()? {
            bail!(
                "engine {name} exited ({st}); see {}",
                d.join("engine.log").display()
            );
        }
        if t.elapsed() > Duration::from_secs(20) {
            bail!("engine {name} did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    e.nbd = format!("127.0.0.1:{nbd_port}");
    Ok(e)
}

async fn status(e: &Engine) -> anyhow::Result<StatusReply> {
    let mut c = EngineClient::connect(&e.grpc, Some(TOKEN)).await?;
    Ok(c.status(VOLUME).await?)
}

async fn wait_for(
    e: &Engine,
    what: &str,
    limit: Duration,
    mut ok: impl FnMut(&StatusReply) -> bool,
) -> anyhow::Result<StatusReply> {
    let t = Instant::now();
    loop {
        let s = status(e).await?;
        if ok(&s) {
            return Ok(s);
        }
        if t.elapsed() > limit {
            bail!("{} did not reach '{what}' in {limit:?}: {s:?}", e.name);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn rate(e: &Engine, bytes_per_sec: u64) -> anyhow::Result<()> {
    let mut c = EngineClient::connect(&e.grpc, Some(TOKEN)).await?;
    c.inject_fault(pb::FaultRequest {
        volume: VOLUME.into(),
        rate_bytes_per_sec: Some(bytes_per_sec),
        ..Default::default()
    })
    .await?;
    Ok(())
}

/// Reads the whole volume through `nbd` and compares it with `expected`; returns mismatching bytes.
async fn verify(nbd: &str, expected: &[u8]) -> anyhow::Result<u64> {
    let mut c = NbdClient::connect(nbd, VOLUME).await?;
    let mut bad = 0u64;
    for (i, want) in expected.chunks(CHUNK).enumerate() {
        let got = c.read((i * CHUNK) as u64, want.len() as u32).await?;
        bad += got.iter().zip(want).filter(|(a, b)| a != b).count() as u64;
    }
    c.disconnect().await?;
    Ok(bad)
}

async fn write_range(
    nbd: &str,
    expected: &mut [u8],
    from: u64,
    len: u64,
    round: u64,
) -> anyhow::Result<()> {
    let mut c = NbdClient::connect(nbd, VOLUME).await?;
    let mut off = from;
    while off < from + len {
        let n = CHUNK.min((from + len - off) as usize);
        let slot = &mut expected[off as usize..off as usize + n];
        fill(slot, off, round);
        c.write(off, slot).await?;
        off += n as u64;
    }
    c.flush().await?;
    c.disconnect().await?;
    Ok(())
}

fn files_equal(a: &Path, b: &Path) -> anyhow::Result<bool> {
    use std::io::Read;
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    loop {
        let na = fa.read(&mut ba)?;
        let nb = fb.read(&mut bb)?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.size % CHUNK as u64 != 0 || args.backlog > args.size / 2 {
        bail!("--size must be a multiple of 1 MiB and --backlog at most half of it");
    }
    let tmp;
    let dir: PathBuf = match &args.dir {
        Some(d) => d.clone(),
        None => {
            tmp = TempDir::new()?;
            tmp.0.clone()
        }
    };
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("token"), TOKEN)?;
    let exe = std::env::current_exe()?;
    let (pn, pg, sn, sg) = (free_port()?, free_port()?, free_port()?, free_port()?);
    let mut tl = Timeline {
        start: Instant::now(),
        rows: Vec::new(),
    };
    let mb = |b: u64| b as f64 / (1 << 20) as f64;
    println!("Tandem demo in {} (logs: */engine.log)\n", dir.display());

    let a = spawn_engine(&exe, &dir, "node-a", "primary", args.size, pn, pg, sg, 0)?;
    let b = spawn_engine(&exe, &dir, "node-b", "secondary", args.size, sn, sg, pg, 0)?;
    tl.say(format!(
        "engines up: node-a primary (nbd {}), node-b secondary (nbd {})",
        a.nbd, b.nbd
    ));
    let mut expected = vec![0u8; args.size as usize];
    let half = args.size / 2;
    write_range(&a.nbd, &mut expected, half, half, 1).await?;
    wait_for(&a, "Synced", Duration::from_secs(60), |s| {
        s.pair() == PairState::Synced && s.pending_blocks == 0
    })
    .await?;
    tl.say(format!(
        "wrote {:.0} MiB through node-a; the pair is Synced",
        mb(half)
    ));

    rate(&a, args.rate).await?;
    write_range(&a.nbd, &mut expected, 0, args.backlog, 2).await?;
    let s = status(&a).await?;
    tl.say(format!(
        "link throttled to {:.1} MiB/s; wrote a {:.0} MiB backlog: {} blocks ({:.0} MiB) not on node-b yet",
        mb(args.rate),
        mb(args.backlog),
        s.pending_blocks,
        mb(s.pending_bytes)
    ));
    let baseline_s = s.pending_bytes as f64 / args.rate as f64;

    // node-a's host is gone; node-b's host starts the workload: takeover first.
    let mut c = EngineClient::connect(&b.grpc, Some(TOKEN)).await?;
    let r = c
        .takeover(VOLUME, pb::TakeoverPolicy::Wait, Duration::from_secs(10))
        .await?;
    tl.say(format!(
        "TAKEOVER: node-b serves at epoch {} after {} ms, {} blocks still on node-a \
         (waiting for the backlog at this rate would take {:.0} s)",
        r.epoch, r.ready_ms, r.peer_pending_blocks, baseline_s
    ));
    match NbdClient::connect(&a.nbd, VOLUME).await {
        Err(e) => tl.say(format!("node-a refuses its old host now: {e}")),
        Ok(_) => bail!("node-a still serves after the takeover"),
    }
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let s = status(&b).await?;
        tl.say(format!(
            "  draining: {} blocks still on node-a, phase {}",
            s.peer_pending_blocks,
            s.takeover()
        ));
    }
    write_range(&b.nbd, &mut expected, args.backlog, 8 << 20, 3).await?;
    let s = status(&b).await?;
    tl.say(format!(
        "node-b's host wrote 8 MiB: they went to the overlay ({} blocks)",
        s.overlay_blocks
    ));
    let bad = verify(&b.nbd, &expected).await?;
    let s = status(&b).await?;
    if bad != 0 {
        bail!("{bad} bytes read through node-b differ from what was written");
    }
    tl.say(format!(
        "read all {:.0} MiB through node-b: every byte matches ({} blocks by proxied reads)",
        mb(args.size),
        s.proxied_reads
    ));
    rate(&a, 0).await?;
    tl.say("link recovers (throttle lifted)");
    wait_for(&b, "drained and merged", Duration::from_secs(120), |s| {
        s.takeover() == TakeoverPhase::None
    })
    .await?;
    tl.say("DrainComplete received, overlay merged into node-b's data file");
    wait_for(
        &b,
        "reverse replication in sync",
        Duration::from_secs(120),
        |s| s.pair() == PairState::Synced && s.pending_blocks == 0,
    )
    .await?;
    let same = files_equal(&dir.join("node-a/data.img"), &dir.join("node-b/data.img"))?;
    tl.say(format!(
        "reverse replication done: node-a is node-b's secondary; data files identical: {same}"
    ));
    if !same {
        bail!("the two data files differ after reverse replication");
    }

    rate(&b, args.rate).await?;
    write_range(&b.nbd, &mut expected, 0, 8 << 20, 4).await?;
    let mut c = EngineClient::connect(&a.grpc, Some(TOKEN)).await?;
    let r = c
        .failback(VOLUME, pb::TakeoverPolicy::Wait, Duration::from_secs(10))
        .await?;
    tl.say(format!(
        "FAILBACK: node-a serves again at epoch {} after {} ms, {} blocks still on node-b",
        r.epoch, r.ready_ms, r.peer_pending_blocks
    ));
    let bad = verify(&a.nbd, &expected).await?;
    if bad != 0 {
        bail!("{bad} bytes read through node-a differ after the failback");
    }
    tl.say("read everything through node-a: every byte matches");
    rate(&b, 0).await?;
    wait_for(&a, "in sync", Duration::from_secs(120), |s| {
        s.takeover() == TakeoverPhase::None
            && s.pair() == PairState::Synced
            && s.pending_blocks == 0
    })
    .await?;
    let same = files_equal(&dir.join("node-a/data.img"), &dir.join("node-b/data.img"))?;
    tl.say(format!(
        "back to normal: node-a primary, node-b secondary, data files identical: {same}"
    ));
    if !same {
        bail!("the two data files differ after failback");
    }
    println!("\nEvents on node-b:");
    for e in status(&b).await?.events {
        println!("  {}", crate::report::event_line(&e));
    }
    drop(a);
    drop(b);
    println!("\nDemo passed.");
    Ok(())
}

/// A temporary directory removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> std::io::Result<Self> {
        let base = std::env::temp_dir().join(format!(
            "tandem-demo-{}-{}",
            std::process::id(),
            crate::clock::now_us()
        ));
        std::fs::create_dir_all(&base)?;
        Ok(Self(base))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
