//! The local end-to-end suite: a real `tandem-engine`, a real `tandem-csi` plugin, and this test
//! playing kubelet over the CSI socket. Runs as root wherever /dev/fuse and loop devices exist (CI
//! included); elsewhere every test prints why it skips and passes.
//!
//! Scenarios: identity/node info and liveness; an ext4 volume staged, published, written with
//! checksums, the plugin SIGKILLed and restarted mid-way, everything still there, unpublished and
//! unstaged leaving no mount, loop device or FUSE daemon, then staged again to prove the bytes reached
//! the engine; the same for raw block with O_DIRECT patterns, cross-checked through the engine's NBD
//! export with nbdcopy; I/O that waits out an engine crash and restart (the attach daemon reconnects
//! and resends); bad requests get the CSI codes and change nothing.
//!
//! The two-node takeover scenarios come with the engine's takeover (issue 4).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use csi_node::pb;
use e2e::*;
use tonic::Code;

const TOKEN: &str = "e2e-token-1";

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

/// Runs a scenario body, printing the plugin's log tail on failure.
macro_rules! with_logs {
    ($plugin:expr, $body:expr) => {{
        let r: anyhow::Result<()> = $body.await;
        if let Err(e) = &r {
            eprintln!("--- plugin log ---\n{}", $plugin.log());
            panic!("{e:#}");
        }
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_node_info_and_liveness() {
    if skip("identity_node_info_and_liveness") {
        return;
    }
    let _serial = serial().await;
    let bins = bins().unwrap();
    let scratch = Scratch::new("identity").unwrap();
    let plugin = Plugin::start(&bins, &scratch.path("node-a"), "node-a").unwrap();
    let mut c = plugin.client().await.unwrap();

    let info = c
        .identity
        .get_plugin_info(pb::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.tandem.dev");
    assert!(!info.vendor_version.is_empty());
    let probe = c
        .identity
        .probe(pb::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));
    c.identity
        .get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {})
        .await
        .unwrap();

    let ni = c
        .node
        .node_get_info(pb::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ni.node_id, "node-a");
    assert_eq!(
        ni.accessible_topology.unwrap().segments["topology.tandem.dev/node"],
        "node-a"
    );
    let caps: Vec<i32> = c
        .node
        .node_get_capabilities(pb::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| {
            c.r#type
                .map(|pb::node_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    use pb::node_service_capability::rpc::Type;
    assert!(caps.contains(&(Type::StageUnstageVolume as i32)));
    assert!(caps.contains(&(Type::GetVolumeStats as i32)));

    assert_eq!(plugin.healthz().unwrap(), "HTTP/1.1 200 OK");
    // An RPC the plugin does not implement is UNIMPLEMENTED, as the spec asks.
    let mut raw = tonic::client::Grpc::new(
        tonic::transport::Endpoint::try_from(format!("unix://{}", plugin.socket.display()))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    raw.ready().await.unwrap();
    let r: Result<tonic::Response<pb::NodeGetInfoResponse>, _> = raw
        .unary(
            tonic::Request::new(pb::NodeGetInfoRequest {}),
            "/csi.v1.Node/NodeExpandVolume".parse().unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await;
    assert_eq!(code(r), Code::Unimplemented);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_volume_survives_a_plugin_restart_and_unstages_cleanly() {
    if skip("ext4_volume_survives_a_plugin_restart_and_unstages_cleanly") {
        return;
    }
    let _serial = serial().await;
    let bins = bins().unwrap();
    let scratch = Scratch::new("ext4").unwrap();
    let engine = Engine::start(
        &bins,
        &scratch.path("engine-a"),
        "vol-fs",
        "512M",
        TOKEN,
        &[],
    )
    .unwrap();
    let mut plugin = Plugin::start(&bins, &scratch.path("node-a"), "node-a").unwrap();
    let ctx = volume_context("vol-fs", &[("node-a", &engine)]);
    let staging = scratch.path("kubelet/staging/pv-fs");
    let target = scratch.path("kubelet/pods/p1/volumes/pv-fs/mount");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let id = "default/pv-fs";
    let stage = stage_request(id, &staging, Some("ext4"), &ctx, TOKEN);
    let publish = publish_request(id, &staging, &target, Some("ext4"));

    with_logs!(plugin, async {
        let mut c = plugin.client().await?;
        c.node.node_stage_volume(stage.clone()).await?;
        // A loop device with direct I/O over the FUSE file, ext4 at the staging path.
        let loops = loops_under(&scratch.root);
        anyhow::ensure!(loops.len() == 1, "loop devices: {loops:?}");
        anyhow::ensure!(
            loop_dio(&loops[0].0),
            "{} is not in direct-I/O mode",
            loops[0].0
        );
        let mounts = mounts_under(&scratch.root);
        anyhow::ensure!(
            mounts.iter().any(|(p, t)| p == &staging && t == "ext4"),
            "mounts: {mounts:?}"
        );
        anyhow::ensure!(
            mounts
                .iter()
                .any(|(_, t)| t == "fuse" || t.starts_with("fuse.")),
            "no FUSE mount: {mounts:?}"
        );
        // Idempotent.
        c.node.node_stage_volume(stage.clone()).await?;
        c.node.node_publish_volume(publish.clone()).await?;
        c.node.node_publish_volume(publish.clone()).await?;
        let files = write_files(&target, "first", 40)?;
        verify_files(&files)?;

        let stats = c
            .node
            .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                volume_id: id.into(),
                volume_path: target.display().to_string(),
                staging_target_path: staging.display().to_string(),
            })
            .await?
            .into_inner();
        anyhow::ensure!(stats.usage.len() == 2, "usage: {:?}", stats.usage);
        anyhow::ensure!(stats.usage[0].used > 4 << 20, "used: {:?}", stats.usage[0]);
        anyhow::ensure!(
            !stats
                .volume_condition
                .as_ref()
                .map(|c| c.abnormal)
                .unwrap_or(true),
            "condition: {:?}",
            stats.volume_condition
        );

        // The plugin dies (SIGKILL) with the volume staged and published; the pod keeps working.
        plugin.kill();
        let more = write_files(&target, "during-restart", 10)?;
        plugin.restart()?;
        let mut c = plugin.client().await?;
        // kubelet repeats its calls after a plugin restart: all OK, nothing attached twice.
        c.node.node_stage_volume(stage.clone()).await?;
        c.node.node_publish_volume(publish.clone()).await?;
        anyhow::ensure!(loops_under(&scratch.root).len() == 1);
        verify_files(&files)?;
        verify_files(&more)?;
        let after = write_files(&target, "after-restart", 10)?;

        c.node
            .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.display().to_string(),
            })
            .await?;
        anyhow::ensure!(!target.exists(), "target not removed");
        c.node
            .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
            })
            .await?;
        // Twice: still OK.
        c.node
            .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
            })
            .await?;
        scratch.assert_clean();

        // Stage again: the filesystem is found (no mkfs) and every file is intact, so the
        // bytes reached the engine, not just a cache on this node.
        c.node.node_stage_volume(stage.clone()).await?;
        c.node.node_publish_volume(publish.clone()).await?;
        verify_files(&files)?;
        verify_files(&more)?;
        verify_files(&after)?;
        c.node
            .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.display().to_string(),
            })
            .await?;
        c.node
            .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
            })
            .await?;
        scratch.assert_clean();
        Ok(())
    });
    drop(engine);
}

/// Writes `len` bytes of pattern `seed` at `offset` with O_DIRECT through dd.
fn dd_write(dev: &Path, offset: u64, seed: u64, len: usize, dir: &Path) -> anyhow::Result<()> {
    let src = dir.join(format!("pattern-{seed}"));
    std::fs::write(&src, pattern(seed, len))?;
    sh(Command::new("dd")
        .arg(format!("if={}", src.display()))
        .arg(format!("of={}", dev.display()))
        .args([
            "bs=4096",
            "oflag=direct,seek_bytes",
            "conv=notrunc,fsync",
            "status=none",
        ])
        .arg(format!("seek={offset}")))?;
    Ok(())
}

/// Reads `len` bytes at `offset` with O_DIRECT through dd.
fn dd_read(dev: &Path, offset: u64, len: usize) -> anyhow::Result<Vec<u8>> {
    let out = Command::new("dd")
        .arg(format!("if={}", dev.display()))
        .args([
            "bs=4096",
            "iflag=direct,skip_bytes,count_bytes",
            "status=none",
        ])
        .arg(format!("skip={offset}"))
        .arg(format!("count={len}"))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "dd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_block_volume_with_direct_io_patterns() {
    if skip("raw_block_volume_with_direct_io_patterns") {
        return;
    }
    let _serial = serial().await;
    let bins = bins().unwrap();
    let scratch = Scratch::new("block").unwrap();
    let engine = Engine::start(
        &bins,
        &scratch.path("engine-a"),
        "vol-blk",
        "64M",
        TOKEN,
        &[],
    )
    .unwrap();
    let mut plugin = Plugin::start(&bins, &scratch.path("node-a"), "node-a").unwrap();
    let ctx = volume_context("vol-blk", &[("node-a", &engine)]);
    let staging = scratch.path("kubelet/volumeDevices/staging/pv-blk");
    let target = scratch.path("kubelet/pods/p2/volumeDevices/pv-blk");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let id = "default/pv-blk";
    let stage = stage_request(id, &staging, None, &ctx, TOKEN);
    let publish = publish_request(id, &staging, &target, None);
    // (offset, seed, length): aligned, straddling the 1 MiB FUSE request size, near the end.
    let patterns: Vec<(u64, u64, usize)> = vec![
        (0, 1, 4096),
        (8192, 2, 65536),
        ((1 << 20) - 4096, 3, 3 << 20),
        ((64 << 20) - 8192, 4, 8192),
    ];

    with_logs!(plugin, async {
        let mut c = plugin.client().await?;
        c.node.node_stage_volume(stage.clone()).await?;
        c.node.node_publish_volume(publish.clone()).await?;
        // The file kubelet named is now the device node, bind-mounted.
        use std::os::unix::fs::FileTypeExt;
        anyhow::ensure!(
            std::fs::metadata(&target)?.file_type().is_block_device(),
            "block target must show the device"
        );
        let size = std::fs::File::open(&target)
            .and_then(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)))?;
        anyhow::ensure!(size == 64 << 20, "device size {size}");
        let tmp = scratch.path("tmp");
        std::fs::create_dir_all(&tmp)?;
        for (off, seed, len) in &patterns[..2] {
            dd_write(&target, *off, *seed, *len, &tmp)?;
        }
        plugin.kill();
        // The device keeps working while the plugin is down.
        for (off, seed, len) in &patterns[2..] {
            dd_write(&target, *off, *seed, *len, &tmp)?;
        }
        plugin.restart()?;
        let mut c = plugin.client().await?;
        c.node.node_stage_volume(stage.clone()).await?;
        c.node.node_publish_volume(publish.clone()).await?;
        for (off, seed, len) in &patterns {
            anyhow::ensure!(
                dd_read(&target, *off, *len)? == pattern(*seed, *len),
                "pattern {seed} at {off} differs"
            );
        }
        let stats = c
            .node
            .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                volume_id: id.into(),
                volume_path: target.display().to_string(),
                staging_target_path: String::new(),
            })
            .await?
            .into_inner();
        anyhow::ensure!(stats.usage.first().map(|u| u.total) == Some(64 << 20));
        c.node
            .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.display().to_string(),
            })
            .await?;
        anyhow::ensure!(!target.exists(), "block target file not removed");
        c.node
            .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
            })
            .await?;
        scratch.assert_clean();

        // Cross-check through another NBD client, straight from the engine.
        let image = scratch.path("image.raw");
        sh(Command::new("nbdcopy")
            .arg(format!("nbd://{}/vol-blk", engine.nbd))
            .arg(&image))?;
        let bytes = std::fs::read(&image)?;
        for (off, seed, len) in &patterns {
            let at = *off as usize;
            anyhow::ensure!(
                bytes[at..at + len] == pattern(*seed, *len)[..],
                "engine holds other bytes for pattern {seed} at {off}"
            );
        }
        Ok(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_csi_codes_and_change_nothing() {
    if skip("bad_requests_get_csi_codes_and_change_nothing") {
        return;
    }
    let _serial = serial().await;
    let bins = bins().unwrap();
    let scratch = Scratch::new("bad").unwrap();
    let engine = Engine::start(
        &bins,
        &scratch.path("engine-a"),
        "vol-bad",
        "64M",
        TOKEN,
        &[],
    )
    .unwrap();
    let plugin = Plugin::start(&bins, &scratch.path("node-a"), "node-a").unwrap();
    let mut c = plugin.client().await.unwrap();
    let ctx = volume_context("vol-bad", &[("node-a", &engine)]);
    let staging = scratch.path("staging");
    let target = scratch.path("target");
    std::fs::create_dir_all(&staging).unwrap();
    let id = "default/pv-bad";
    let good = stage_request(id, &staging, Some("ext4"), &ctx, TOKEN);

    let mut cases: Vec<(&str, pb::NodeStageVolumeRequest, Code)> = Vec::new();
    let mut r = good.clone();
    r.volume_id.clear();
    cases.push(("missing volume_id", r, Code::InvalidArgument));
    let mut r = good.clone();
    r.staging_target_path.clear();
    cases.push(("missing staging path", r, Code::InvalidArgument));
    let mut r = good.clone();
    r.volume_capability = None;
    cases.push(("missing capability", r, Code::InvalidArgument));
    let mut r = good.clone();
    r.volume_context.remove(KEY_ENGINES);
    cases.push(("missing engines", r, Code::InvalidArgument));
    let mut r = good.clone();
    r.secrets.clear();
    cases.push(("missing token", r, Code::InvalidArgument));
    let mut r = good.clone();
    r.volume_capability = Some(capability(Some("btrfs")));
    cases.push(("unsupported filesystem", r, Code::InvalidArgument));
    let mut r = good.clone();
    r.volume_capability.as_mut().unwrap().access_mode = Some(pb::volume_capability::AccessMode {
        mode: pb::volume_capability::access_mode::Mode::MultiNodeMultiWriter as i32,
    });
    cases.push(("multi-node access", r, Code::InvalidArgument));
    let mut r = good.clone();
    r.secrets.insert("token".into(), "not-the-token".into());
    cases.push(("wrong token", r, Code::Unauthenticated));
    let mut r = good.clone();
    r.volume_context
        .insert(KEY_VOLUME.into(), "no-such-volume".into());
    cases.push(("unknown volume", r, Code::NotFound));
    let mut r = good.clone();
    r.volume_context
        .insert(KEY_ENGINES.into(), "node-a=127.0.0.1:1".into());
    cases.push(("engine unreachable", r, Code::Unavailable));

    // The NBD address leads to an engine that refuses the export (a secondary): the attach fails
    // with a retryable code and leaves nothing behind.
    let secondary = Engine::start(
        &bins,
        &scratch.path("engine-s"),
        "vol-bad",
        "64M",
        TOKEN,
        &["--role", "secondary", "--peer", "127.0.0.1:1"],
    )
    .unwrap();
    let mut r = good.clone();
    r.volume_context
        .insert(KEY_NBD.into(), format!("node-a={}", secondary.nbd));
    cases.push(("NBD export refused", r, Code::Unavailable));
    // This node's engine is the secondary: staging calls Takeover, which cannot finish (the peer is
    // unreachable and the policy is to wait for it): retryable, nothing attached.
    let mut r = good.clone();
    r.volume_context = volume_context("vol-bad", &[("node-a", &secondary)]);
    r.volume_context.insert(KEY_PEER_TIMEOUT.into(), "1".into());
    cases.push(("takeover cannot finish", r, Code::Unavailable));

    for (what, req, want) in cases {
        let got = code(c.node.node_stage_volume(req).await);
        assert_eq!(got, want, "{what}");
    }

    let publish = publish_request(id, &staging, &target, Some("ext4"));
    assert_eq!(
        code(c.node.node_publish_volume(publish.clone()).await),
        Code::FailedPrecondition,
        "publish before stage"
    );
    let mut p = publish.clone();
    p.target_path.clear();
    assert_eq!(
        code(c.node.node_publish_volume(p).await),
        Code::InvalidArgument
    );
    let mut p = publish.clone();
    p.staging_target_path.clear();
    assert_eq!(
        code(c.node.node_publish_volume(p).await),
        Code::FailedPrecondition,
        "staging path not set"
    );
    assert_eq!(
        code(
            c.node
                .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                    volume_id: id.into(),
                    volume_path: staging.display().to_string(),
                    staging_target_path: String::new(),
                })
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.node
                .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                    volume_id: String::new(),
                    staging_target_path: staging.display().to_string(),
                })
                .await
        ),
        Code::InvalidArgument
    );
    // Undoing what was never done is fine.
    c.node
        .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: id.into(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap();
    c.node
        .node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .unwrap();

    // Nothing changed: no record, no mount, no loop device, no daemon.
    let records: Vec<_> = std::fs::read_dir(plugin.state_dir().join("volumes"))
        .unwrap()
        .flatten()
        .collect();
    assert!(records.is_empty(), "records: {records:?}");
    scratch.assert_clean();

    // And the good request still works afterwards.
    tokio::time::timeout(Duration::from_secs(60), c.node.node_stage_volume(good))
        .await
        .unwrap()
        .unwrap();
    c.node
        .node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .unwrap();
    scratch.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_waits_out_an_engine_restart() {
    if skip("io_waits_out_an_engine_restart") {
        return;
    }
    let _serial = serial().await;
    let bins = bins().unwrap();
    let scratch = Scratch::new("restart").unwrap();
    let mut engine = Engine::start(
        &bins,
        &scratch.path("engine-a"),
        "vol-rs",
        "64M",
        TOKEN,
        &[],
    )
    .unwrap();
    let plugin = Plugin::start(&bins, &scratch.path("node-a"), "node-a").unwrap();
    let ctx = volume_context("vol-rs", &[("node-a", &engine)]);
    let staging = scratch.path("staging");
    let target = scratch.path("pods/p/dev");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let id = "default/pv-rs";
    let tmp = scratch.path("tmp");
    std::fs::create_dir_all(&tmp).unwrap();

    with_logs!(plugin, async {
        let mut c = plugin.client().await?;
        c.node
            .node_stage_volume(stage_request(id, &staging, None, &ctx, TOKEN))
            .await?;
        c.node
            .node_publish_volume(publish_request(id, &staging, &target, None))
            .await?;
        dd_write(&target, 0, 11, 1 << 20, &tmp)?;

        // The engine crashes. The attachment reports it, and I/O issued now waits for it.
        engine.kill();
        let stats = |c: &mut Csi| {
            let req = pb::NodeGetVolumeStatsRequest {
                volume_id: id.into(),
                volume_path: target.display().to_string(),
                staging_target_path: String::new(),
            };
            let mut node = c.node.clone();
            async move {
                node.node_get_volume_stats(req)
                    .await
                    .map(|r| r.into_inner().volume_condition.unwrap_or_default())
            }
        };
        let mut abnormal = false;
        for _ in 0..40 {
            if stats(&mut c).await?.abnormal {
                abnormal = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::ensure!(
            abnormal,
            "the volume condition never reported the lost engine"
        );
        let (t2, tmp2) = (target.clone(), tmp.clone());
        let writer =
            std::thread::spawn(move || dd_write(&t2, 4 << 20, 12, 2 << 20, &tmp2).map(|_| ()));
        tokio::time::sleep(Duration::from_millis(800)).await;
        anyhow::ensure!(
            !writer.is_finished(),
            "a write completed with the engine down"
        );
        engine.restart()?;
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("writer panicked"))??;
        anyhow::ensure!(dd_read(&target, 0, 1 << 20)? == pattern(11, 1 << 20));
        anyhow::ensure!(dd_read(&target, 4 << 20, 2 << 20)? == pattern(12, 2 << 20));
        let cond = stats(&mut c).await?;
        anyhow::ensure!(
            !cond.abnormal,
            "still abnormal after reconnecting: {cond:?}"
        );

        c.node
            .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.display().to_string(),
            })
            .await?;
        c.node
            .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
            })
            .await?;
        scratch.assert_clean();
        Ok(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfs_volume_round_trip() {
    if skip("xfs_volume_round_trip") {
        return;
    }
    if !Path::new("/usr/sbin/mkfs.xfs").exists() && !Path::new("/sbin/mkfs.xfs").exists() {
        println!("SKIP xfs_volume_round_trip: mkfs.xfs is not installed");
        return;
    }
    let _serial = serial().await;
    let bins = bins().unwrap();
    let scratch = Scratch::new("xfs").unwrap();
    // mkfs.xfs wants at least 300 MiB.
    let engine = Engine::start(
        &bins,
        &scratch.path("engine-a"),
        "vol-xfs",
        "512M",
        TOKEN,
        &[],
    )
    .unwrap();
    let plugin = Plugin::start(&bins, &scratch.path("node-a"), "node-a").unwrap();
    let ctx = volume_context("vol-xfs", &[("node-a", &engine)]);
    let staging = scratch.path("staging");
    let target = scratch.path("pods/p/mount");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let id = "default/pv-xfs";
    let stage = stage_request(id, &staging, Some("xfs"), &ctx, TOKEN);
    let publish = publish_request(id, &staging, &target, Some("xfs"));
    let unpublish = pb::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
    };
    let unstage = pb::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
    };

    with_logs!(plugin, async {
        let mut c = plugin.client().await?;
        c.node.node_stage_volume(stage.clone()).await?;
        anyhow::ensure!(
            mounts_under(&scratch.root)
                .iter()
                .any(|(p, t)| p == &staging && t == "xfs"),
            "no xfs at the staging path"
        );
        c.node.node_publish_volume(publish.clone()).await?;
        let files = write_files(&target, "xfs", 20)?;
        c.node.node_unpublish_volume(unpublish.clone()).await?;
        c.node.node_unstage_volume(unstage.clone()).await?;
        scratch.assert_clean();
        // Asking for ext4 now must not format over the xfs.
        let wrong = stage_request(id, &staging, Some("ext4"), &ctx, TOKEN);
        let e = c.node.node_stage_volume(wrong).await;
        anyhow::ensure!(
            matches!(&e, Err(s) if s.code() == Code::FailedPrecondition),
            "ext4 over xfs: {e:?}"
        );
        scratch.assert_clean();
        c.node.node_stage_volume(stage.clone()).await?;
        c.node.node_publish_volume(publish.clone()).await?;
        verify_files(&files)?;
        c.node.node_unpublish_volume(unpublish.clone()).await?;
        c.node.node_unstage_volume(unstage.clone()).await?;
        scratch.assert_clean();
        Ok(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_attach_across_a_network_namespace_rides_out_a_link_flap() {
    if skip("remote_attach_across_a_network_namespace_rides_out_a_link_flap") {
        return;
    }
    if let Some(why) = netns_skip_reason() {
        println!("SKIP remote_attach_across_a_network_namespace_rides_out_a_link_flap: {why}");
        return;
    }
    let _serial = serial().await;
    let bins = bins().unwrap();
    let scratch = Scratch::new("netns").unwrap();
    // node-b: an engine in its own network namespace. node-a: a plugin with no engine of its own,
    // so it attaches to node-b's primary over the veth link.
    let ns_b = Netns::create(7).unwrap();
    let engine = Engine::start_in(
        Some(&ns_b),
        &bins,
        &scratch.path("engine-b"),
        "vol-net",
        "64M",
        TOKEN,
        &[],
    )
    .unwrap();
    let plugin = Plugin::start(&bins, &scratch.path("node-a"), "node-a").unwrap();
    let ctx = volume_context("vol-net", &[("node-b", &engine)]);
    let staging = scratch.path("staging");
    let target = scratch.path("pods/p/dev");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let tmp = scratch.path("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let id = "default/pv-net";

    with_logs!(plugin, async {
        let mut c = plugin.client().await?;
        c.node
            .node_stage_volume(stage_request(id, &staging, None, &ctx, TOKEN))
            .await?;
        c.node
            .node_publish_volume(publish_request(id, &staging, &target, None))
            .await?;
        dd_write(&target, 0, 21, 256 << 10, &tmp)?;
        // A link flap shorter than the I/O timeout: the write stalls, then completes.
        ns_b.set_link(false)?;
        let (t2, tmp2) = (target.clone(), tmp.clone());
        let writer =
            std::thread::spawn(move || dd_write(&t2, 1 << 20, 22, 512 << 10, &tmp2).map(|_| ()));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        anyhow::ensure!(
            !writer.is_finished(),
            "a write completed across a dead link"
        );
        ns_b.set_link(true)?;
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("writer panicked"))??;
        anyhow::ensure!(dd_read(&target, 0, 256 << 10)? == pattern(21, 256 << 10));
        anyhow::ensure!(dd_read(&target, 1 << 20, 512 << 10)? == pattern(22, 512 << 10));
        c.node
            .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.display().to_string(),
            })
            .await?;
        c.node
            .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
            })
            .await?;
        scratch.assert_clean();
        Ok(())
    });
    drop(engine);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_attach_daemon_is_replaced_by_the_next_stage() {
    if skip("a_dead_attach_daemon_is_replaced_by_the_next_stage") {
        return;
    }
    let _serial = serial().await;
    let bins = bins().unwrap();
    let scratch = Scratch::new("daemon").unwrap();
    let engine = Engine::start(
        &bins,
        &scratch.path("engine-a"),
        "vol-dd",
        "256M",
        TOKEN,
        &[],
    )
    .unwrap();
    let plugin = Plugin::start(&bins, &scratch.path("node-a"), "node-a").unwrap();
    let ctx = volume_context("vol-dd", &[("node-a", &engine)]);
    let staging = scratch.path("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let id = "default/pv-dd";
    let stage = stage_request(id, &staging, Some("ext4"), &ctx, TOKEN);
    let stats_req = pb::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: staging.display().to_string(),
        staging_target_path: String::new(),
    };

    with_logs!(plugin, async {
        let mut c = plugin.client().await?;
        c.node.node_stage_volume(stage.clone()).await?;
        let files = write_files(&staging, "before", 10)?;
        sh(Command::new("sync").arg("-f").arg(&staging))?;
        // The daemon dies as in a crash (or an OOM kill): the device is gone for good.
        let daemons = daemons_under(&scratch.root);
        anyhow::ensure!(daemons.len() == 1, "daemons: {daemons:?}");
        sh(Command::new("kill").args(["-KILL", &daemons[0].to_string()]))?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let cond = c
            .node
            .node_get_volume_stats(stats_req.clone())
            .await?
            .into_inner()
            .volume_condition
            .unwrap_or_default();
        anyhow::ensure!(cond.abnormal, "a dead daemon must be abnormal: {cond:?}");
        // kubelet's next NodeStageVolume repairs it: a fresh attachment, the same data.
        c.node.node_stage_volume(stage.clone()).await?;
        anyhow::ensure!(daemons_under(&scratch.root).len() == 1);
        anyhow::ensure!(
            loops_under(&scratch.root).len() == 1,
            "{:?}",
            loops_under(&scratch.root)
        );
        verify_files(&files)?;
        c.node
            .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
            })
            .await?;
        scratch.assert_clean();
        Ok(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_and_read_only_publish() {
    if skip("concurrent_calls_and_read_only_publish") {
        return;
    }
    let _serial = serial().await;
    let bins = bins().unwrap();
    let scratch = Scratch::new("concurrent").unwrap();
    let engine = Engine::start(
        &bins,
        &scratch.path("engine-a"),
        "vol-cc",
        "256M",
        TOKEN,
        &[],
    )
    .unwrap();
    let plugin = Plugin::start(&bins, &scratch.path("node-a"), "node-a").unwrap();
    let ctx = volume_context("vol-cc", &[("node-a", &engine)]);
    let staging = scratch.path("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let id = "default/pv-cc";
    let stage = stage_request(id, &staging, Some("ext4"), &ctx, TOKEN);

    with_logs!(plugin, async {
        let c = plugin.client().await?;
        // Four NodeStageVolume calls at once: each is OK or ABORTED, and one attachment results.
        let calls = (0..4).map(|_| {
            let mut node = c.node.clone();
            let req = stage.clone();
            async move { node.node_stage_volume(req).await.map(|_| ()) }
        });
        let results = futures_join(calls).await?;
        anyhow::ensure!(
            results.iter().all(|r| r
                .as_ref()
                .map_or_else(|s| s.code() == Code::Aborted, |_| true)),
            "results: {results:?}"
        );
        anyhow::ensure!(results.iter().any(Result::is_ok), "results: {results:?}");
        let mut c = plugin.client().await?;
        c.node.node_stage_volume(stage.clone()).await?;
        anyhow::ensure!(loops_under(&scratch.root).len() == 1);
        anyhow::ensure!(daemons_under(&scratch.root).len() == 1);

        // A read-only publication refuses writes; a read-write one beside it takes them.
        let rw = scratch.path("pods/rw/mount");
        let ro = scratch.path("pods/ro/mount");
        for t in [&rw, &ro] {
            std::fs::create_dir_all(t.parent().unwrap())?;
        }
        c.node
            .node_publish_volume(publish_request(id, &staging, &rw, Some("ext4")))
            .await?;
        let mut ro_req = publish_request(id, &staging, &ro, Some("ext4"));
        ro_req.readonly = true;
        c.node.node_publish_volume(ro_req.clone()).await?;
        let files = write_files(&rw, "rw", 3)?;
        let err = std::fs::write(ro.join("nope"), b"x").unwrap_err();
        anyhow::ensure!(err.raw_os_error() == Some(30), "write to read-only: {err}");
        verify_files(
            &files
                .iter()
                .map(|(p, crc)| (ro.join(p.file_name().unwrap_or_default()), *crc))
                .collect::<Vec<_>>(),
        )?;
        // Publishing the same target read-write now is incompatible.
        let mut flip = ro_req.clone();
        flip.readonly = false;
        let e = c.node.node_publish_volume(flip).await;
        anyhow::ensure!(
            matches!(&e, Err(s) if s.code() == Code::AlreadyExists),
            "flip: {e:?}"
        );
        // Unstage while published is refused and changes nothing.
        let unstage = pb::NodeUnstageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
        };
        let e = c.node.node_unstage_volume(unstage.clone()).await;
        anyhow::ensure!(
            matches!(&e, Err(s) if s.code() == Code::FailedPrecondition),
            "unstage while published: {e:?}"
        );
        for t in [&rw, &ro] {
            c.node
                .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                    volume_id: id.into(),
                    target_path: t.display().to_string(),
                })
                .await?;
        }
        c.node.node_unstage_volume(unstage).await?;
        scratch.assert_clean();
        Ok(())
    });
}

/// Runs the futures concurrently on this runtime and collects their results in order.
async fn futures_join<F, T>(futs: impl Iterator<Item = F>) -> anyhow::Result<Vec<T>>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await?);
    }
    Ok(out)
}
