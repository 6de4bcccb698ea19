//! Online expansion end to end (issue 14): real engines, the real plugin, this test playing the
//! operator (`tandem-engine resize`, as the operator's reconcile calls Engine.Resize) and kubelet
//! (NodeExpandVolume).
//!
//! - A live pair grows from 256 MiB to 1 GiB while fio writes to the staged raw block device; the
//!   device then reaches 1 GiB through NodeExpandVolume, the new area takes writes, and after
//!   unstaging the replicas are byte-identical.
//! - A mounted ext4 and a mounted xfs grow online through NodeExpandVolume while a file is open
//!   and being written: `df` shows the new size, every file written before reads back, and so does
//!   everything after a fresh stage (the bytes reached the engine). Where root lacks
//!   CAP_SYS_RESOURCE, a mounted ext4 cannot grow: NodeExpandVolume is FAILED_PRECONDITION naming
//!   the next stage, and unstage + stage grows it offline with the data intact.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use csi_node::pb;
use e2e::*;

const TOKEN: &str = "e2e-token-grow";
const M: u64 = 1 << 20;

macro_rules! with_logs {
    ($plugin:expr, $body:expr) => {{
        let r: anyhow::Result<()> = $body.await;
        if let Err(e) = &r {
            eprintln!("--- plugin log ---\n{}", $plugin.log());
            panic!("{e:#}");
        }
    }};
}

fn expand_request(id: &str, path: &Path, staging: &Path, size: u64) -> pb::NodeExpandVolumeRequest {
    pb::NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: path.display().to_string(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: size as i64,
            limit_bytes: 0,
        }),
        staging_target_path: staging.display().to_string(),
        ..Default::default()
    }
}

/// The device mounted at `staging` (from /proc/self/mountinfo's source column).
fn staging_device(staging: &Path) -> anyhow::Result<std::path::PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    let staging = staging.canonicalize()?;
    text.lines()
        .rev()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (Path::new(left.split(' ').nth(4)?) == staging)
                .then(|| right.split(' ').nth(1).map(std::path::PathBuf::from))?
        })
        .ok_or_else(|| anyhow::anyhow!("nothing mounted at {}", staging.display()))
}

fn device_size(dev: &Path) -> anyhow::Result<u64> {
    Ok(sh(Command::new("blockdev").arg("--getsize64").arg(dev))?
        .trim()
        .parse()?)
}

/// `df`'s size of the filesystem at `path`, in bytes.
fn df_size(path: &Path) -> anyhow::Result<u64> {
    let out = sh(Command::new("df").args(["-B1", "--output=size"]).arg(path))?;
    Ok(out.lines().nth(1).unwrap_or_default().trim().parse()?)
}

/// Whether this process may grow a mounted ext4 (the resize ioctl needs CAP_SYS_RESOURCE, which
/// some sandboxes drop even for root).
fn has_cap_sys_resource() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_pair_grows_from_256m_to_1g_under_fio_and_its_replicas_end_identical() {
    if skip("a_live_pair_grows_from_256m_to_1g_under_fio") {
        return;
    }
    let _serial = serial().await;
    let scratch = Scratch::new("grow-pair").unwrap();
    let pair = EnginePair::start(&scratch, "vol-grow", "256M", TOKEN).unwrap();
    let plugin = Plugin::start(&scratch.path("node-a"), "node-a").unwrap();
    let ctx = pair.volume_context();
    let secrets = scratch.secrets("vol-grow", TOKEN).unwrap();
    let staging = scratch.path("kubelet/volumeDevices/staging/pv-grow");
    let target = scratch.path("kubelet/pods/p/volumeDevices/pv-grow");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let id = "default/pv-grow";
    let tmp = scratch.path("tmp");
    std::fs::create_dir_all(&tmp).unwrap();

    with_logs!(plugin, async {
        let mut c = plugin.client().await?;
        c.stage_and_publish(id, (&staging, &target), None, &ctx, &secrets)
            .await?;
        anyhow::ensure!(device_size(&target)? == 256 * M);
        dd_write(&target, 256 * M - 8192, 1, 8192, &tmp)?;
        // fio writes the old area all through the grow (and through the attach daemon's switch
        // to a connection at the new size).
        let fio = Command::new("fio")
            .args([
                "--name=grow",
                "--ioengine=libaio",
                "--direct=1",
                "--rw=randwrite",
                "--bs=64k",
                "--iodepth=8",
                "--size=200M",
                "--time_based",
                "--runtime=8",
                "--output-format=terse",
            ])
            .arg(format!("--filename={}", target.display()))
            .output();
        let fio = tokio::task::spawn_blocking(move || fio);
        tokio::time::sleep(Duration::from_secs(2)).await;
        eprintln!("fio running; growing the pair");
        let r = pair
            .a
            .control("resize", &["--size", "1G"])
            .map_err(anyhow::Error::msg)?;
        anyhow::ensure!(r["size"] == 1 << 30 && r["peer_size"] == 1 << 30, "{r}");
        let got = c
            .node
            .node_expand_volume(expand_request(id, &target, &staging, 1 << 30))
            .await?
            .into_inner();
        anyhow::ensure!(got.capacity_bytes == 1 << 30, "{got:?}");
        anyhow::ensure!(device_size(&target)? == 1 << 30, "the device did not grow");
        // The new area takes writes while fio still runs, up to the last block.
        dd_write(&target, 600 * M, 2, 4 * M as usize, &tmp)?;
        dd_write(&target, (1 << 30) - 65536, 3, 65536, &tmp)?;
        eprintln!("device grown; waiting for fio");
        let out = fio.await??;
        eprintln!("fio done");
        anyhow::ensure!(
            out.status.success(),
            "fio: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for (off, seed, len) in [
            (256 * M - 8192, 1u64, 8192usize),
            (600 * M, 2, 4 * M as usize),
            ((1 << 30) - 65536, 3, 65536),
        ] {
            anyhow::ensure!(
                dd_read(&target, off, len)? == pattern(seed, len),
                "pattern {seed}"
            );
        }
        // NodeExpandVolume again (kubelet retries): the same answer.
        let again = c
            .node
            .node_expand_volume(expand_request(id, &target, &staging, 1 << 30))
            .await?
            .into_inner();
        anyhow::ensure!(again.capacity_bytes == 1 << 30);
        c.unpublish_and_unstage(id, (&staging, &target)).await?;
        scratch.assert_clean();
        eprintln!("unstaged; waiting for the pair to converge");
        EnginePair::wait_converged(&pair.a, &pair.b, Duration::from_secs(40)).await?;
        let (sa, sb) = (pair.a.status().await?, pair.b.status().await?);
        anyhow::ensure!(
            sa.size == 1 << 30 && sb.size == 1 << 30,
            "sizes {} {}",
            sa.size,
            sb.size
        );
        anyhow::ensure!(
            first_difference(&pair.a.data(), &pair.b.data())?.is_none(),
            "the replicas differ after the grow"
        );
        Ok(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounted_ext4_and_xfs_grow_online_while_a_file_is_written() {
    if skip("mounted_ext4_and_xfs_grow_online") {
        return;
    }
    let _serial = serial().await;
    let scratch = Scratch::new("grow-fs").unwrap();
    let plugin = Plugin::start(&scratch.path("node-a"), "node-a").unwrap();
    // mkfs.xfs wants at least 300 MiB.
    for (fs, from, to) in [("ext4", 64 * M, 256 * M), ("xfs", 320 * M, 640 * M)] {
        // Without CAP_SYS_RESOURCE a mounted ext4 cannot grow: NodeExpandVolume says so, and the
        // next stage grows it offline (what kubelet gets after the pod restarts).
        let online = fs != "ext4" || has_cap_sys_resource();
        if !online {
            println!("{fs}: no CAP_SYS_RESOURCE here: checking the grow at the next stage");
        }
        let volume = format!("vol-{fs}");
        let engine = scratch
            .engine(&format!("engine-{fs}"), "node-a", &volume)
            .unwrap()
            .nbd_local_only()
            .size(&from.to_string())
            .token(TOKEN)
            .start()
            .unwrap();
        let ctx = volume_context(&volume, &[("node-a", &engine)]);
        let secrets = scratch.secrets(&volume, TOKEN).unwrap();
        let staging = scratch.path(&format!("staging-{fs}"));
        let target = scratch.path(&format!("pods/{fs}/mount"));
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        let id = format!("default/pv-{fs}");
        let stage = stage_request(&id, &staging, Some(fs), &ctx, &secrets);
        let publish = publish_request(&id, &staging, &target, Some(fs));
        let unpublish = pb::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.display().to_string(),
        };
        let unstage = pb::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.display().to_string(),
        };

        with_logs!(plugin, async {
            let mut c = plugin.client().await?;
            c.node.node_stage_volume(stage.clone()).await?;
            c.node.node_publish_volume(publish.clone()).await?;
            let before = df_size(&target)?;
            anyhow::ensure!(before <= from, "{fs}: df says {before} before the grow");
            let files = write_files(&target, fs, 8)?;
            // A file open and written across the grow.
            let open_path = target.join("open.bin");
            let mut open = std::fs::File::create(&open_path)?;
            let first = pattern(77, 3 * M as usize);
            open.write_all(&first)?;
            open.sync_all()?;

            let r = engine
                .control("resize", &["--size", &to.to_string()])
                .map_err(anyhow::Error::msg)?;
            anyhow::ensure!(r["size"] == to, "{fs}: {r}");
            // Asked before the engine grew, a larger size is a retryable UNAVAILABLE.
            let early = c
                .node
                .node_expand_volume(expand_request(&id, &target, &staging, 2 * to))
                .await;
            anyhow::ensure!(
                matches!(&early, Err(s) if s.code() == tonic::Code::Unavailable),
                "{fs}: expand past the engine's size: {early:?}"
            );
            let got = c
                .node
                .node_expand_volume(expand_request(&id, &target, &staging, to))
                .await;
            if online {
                let got = got?.into_inner();
                anyhow::ensure!(got.capacity_bytes == to as i64, "{fs}: {got:?}");
            } else {
                anyhow::ensure!(
                    matches!(&got, Err(s) if s.code() == tonic::Code::FailedPrecondition
                        && s.message().contains("next stage")),
                    "{fs}: expand without CAP_SYS_RESOURCE: {got:?}"
                );
                anyhow::ensure!(device_size(&staging_device(&staging)?)? == to);
                anyhow::ensure!(df_size(&target)? == before, "{fs}: grew online after all");
                // The pod goes away, and comes back: the stage grows the filesystem offline.
                drop(open);
                c.node.node_unpublish_volume(unpublish.clone()).await?;
                c.node.node_unstage_volume(unstage.clone()).await?;
                scratch.assert_clean();
                c.node.node_stage_volume(stage.clone()).await?;
                c.node.node_publish_volume(publish.clone()).await?;
                verify_files(&files)?;
                anyhow::ensure!(
                    std::fs::read(&open_path)? == first,
                    "{fs}: open file after the grow at stage"
                );
                open = std::fs::OpenOptions::new().append(true).open(&open_path)?;
            }
            let after = df_size(&target)?;
            anyhow::ensure!(
                after > before && after > to * 3 / 4,
                "{fs}: df says {after} after growing to {to} (was {before})"
            );
            // The open file goes on after the grow: for ext4 past the space the filesystem had
            // before (xfs needs 300 MiB at least, so it writes less to stay quick).
            let more = if fs == "ext4" {
                from + (to - from) / 4
            } else {
                16 * M
            };
            let second = pattern(78, more as usize);
            open.write_all(&second)?;
            open.sync_all()?;
            drop(open);
            let mut whole = first.clone();
            whole.extend_from_slice(&second);
            anyhow::ensure!(
                std::fs::read(&open_path)? == whole,
                "{fs}: open file differs"
            );
            verify_files(&files)?;

            // Staged afresh: the bytes are the engine's.
            c.node.node_unpublish_volume(unpublish.clone()).await?;
            c.node.node_unstage_volume(unstage.clone()).await?;
            scratch.assert_clean();
            c.node.node_stage_volume(stage.clone()).await?;
            c.node.node_publish_volume(publish.clone()).await?;
            anyhow::ensure!(df_size(&target)? == after, "{fs}: size after restaging");
            verify_files(&files)?;
            anyhow::ensure!(
                std::fs::read(&open_path)? == whole,
                "{fs}: open file after restaging"
            );
            c.node.node_unpublish_volume(unpublish.clone()).await?;
            c.node.node_unstage_volume(unstage.clone()).await?;
            scratch.assert_clean();
            Ok(())
        });
    }
}
