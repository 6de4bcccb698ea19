//! The local end-to-end suite: a real `tandem-engine`, a real `tandem-csi` plugin, and this test
//! playing kubelet over the CSI socket. Runs as root wherever /dev/fuse and loop devices exist (CI
//! included); elsewhere every test prints why it skips and passes.
//!
//! Scenarios: identity/node info and liveness; an ext4 volume staged, published, written with
//! checksums, the plugin SIGKILLed and restarted mid-way, everything still there, unpublished and
//! unstaged leaving no mount, loop device or FUSE daemon, then staged again to prove the bytes reached
//! the engine; the same for raw block with O_DIRECT patterns, cross-checked through the engine's NBD
//! export with nbdcopy; I/O that waits out an engine crash and restart (the attach daemon reconnects
//! and resends); bad requests get the CSI codes and change nothing. Engines serve NBD as in a pod
//! (issue 13): on a unix socket in their own directory only, pinned exports only; a node without an
//! engine of the volume is refused (FAILED_PRECONDITION), and host I/O ignores a link flap.
//!
//! Two nodes (two plugins, an engine pair, node A's engine in its own network namespace): a pod on the
//! primary's node writes while replication is paused, node A's plugin dies, and NodeStageVolume on node
//! B is the failover trigger, returning only once engine B serves at the next epoch with A fenced;
//! every file or byte is read back there (the unreplicated ones through proxied reads), node A's writes
//! are refused, the drain finishes and the pair converges with identical replicas, for ext4 and for raw
//! block. With the primary's engine dead, a stage is a retryable UNAVAILABLE that attaches nothing
//! under either policy (the plugin never forces); once the operator (played by the test) promoted by
//! force and granted a lease, it stages. A node that keeps its staging (plugin up, mount in place) through
//! a takeover and a failback to its own engine: its attachment is pinned to epoch 1, so its device
//! fails with EIO at epoch 3; restaging there is ABORTED while the old pod is published, then
//! replaces the staging and sees every file of epoch 2.
//!
//! Issue 12 (engines with write leases on, the default 10 s; a continuous O_DIRECT workload whose
//! acknowledged-write history is checked, `HistoryWriter`): a primary engine SIGKILLed for 12 s
//! and restarted under the workload is a stall, not an error, at the same epoch; a read-only stage
//! on the secondary's node never takes over (current reads from the secondary with
//! `secondary-access: ReadWrite` and `secondary-read-mode: Current`, FAILED_PRECONDITION without); a pod moved to the secondary's node with no operator
//! (handoff on stage, first I/O at once, writes past a lease); a plugin restart under the workload.
//!
//! Issue 18: a backup stage (read-only) on the secondary's node, while the writer on the primary's
//! node keeps creating fsync'd files, mounts a point-in-time view: every file fsync'd before the
//! stage with its bytes, a clean filesystem, an image that stays the same while the writer goes
//! on, and no view left on the engine after the unstage.
//!
//! Issue 13: every engine runs with mutual TLS (`--tls-dir`, an engine identity of its volume from
//! a CA minted per test, and `--node-name`), every stage carries the volume's CSI Secret (the token,
//! `ca.crt` and a CSI pair per node, as kubelet hands it over), and the tests' own calls speak as
//! the operator. A stage whose Secret carries another volume's pair, another node's pair or no pair
//! attaches nothing and moves nothing; the engine itself refuses such identities
//! (PERMISSION_DENIED); the right Secret takes over through TLS.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
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
    let scratch = Scratch::new("identity").unwrap();
    let plugin = Plugin::start(&scratch.path("node-a"), "node-a").unwrap();
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
    // The node plugin serves no Controller service: its calls are UNIMPLEMENTED, as the spec asks.
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
            "/csi.v1.Controller/CreateVolume".parse().unwrap(),
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
    let scratch = Scratch::new("ext4").unwrap();
    let engine = scratch
        .engine("engine-a", "node-a", "vol-fs")
        .unwrap()
        .nbd_local_only()
        .size("512M")
        .token(TOKEN)
        .start()
        .unwrap();
    let mut plugin = Plugin::start(&scratch.path("node-a"), "node-a").unwrap();
    let ctx = volume_context("vol-fs", &[("node-a", &engine)]);
    let secrets = scratch.secrets("vol-fs", TOKEN).unwrap();
    let staging = scratch.path("kubelet/staging/pv-fs");
    let target = scratch.path("kubelet/pods/p1/volumes/pv-fs/mount");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let id = "default/pv-fs";
    let stage = stage_request(id, &staging, Some("ext4"), &ctx, &secrets);
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

        // The plugin dies (SIGKILL) with the volume staged and published; the pod keeps working:
        // a workload writing a history into a file goes on through the kill and the restart.
        let history_file = target.join("history.bin");
        let writer = HistoryWriter::start(&history_file, 8 << 20, 64 << 10, 1)?;
        writer.wait_acked(50, Duration::from_secs(60)).await?;
        plugin.kill();
        let more = write_files(&target, "during-restart", 10)?;
        writer
            .wait_acked(writer.acked() + 50, Duration::from_secs(60))
            .await?;
        plugin.restart()?;
        let mut c = plugin.client().await?;
        // kubelet repeats its calls after a plugin restart: all OK, nothing attached twice.
        c.node.node_stage_volume(stage.clone()).await?;
        c.node.node_publish_volume(publish.clone()).await?;
        anyhow::ensure!(loops_under(&scratch.root).len() == 1);
        writer
            .wait_acked(writer.acked() + 50, Duration::from_secs(60))
            .await?;
        let history = writer.finish()?;
        history.check("the history file", &read_direct(&history_file, 8 << 20)?)?;
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
        history.check(
            "the history file, staged again",
            &read_direct(&history_file, 8 << 20)?,
        )?;
        c.unpublish_and_unstage(id, (&staging, &target)).await?;
        scratch.assert_clean();
        Ok(())
    });
    drop(engine);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_block_volume_with_direct_io_patterns() {
    if skip("raw_block_volume_with_direct_io_patterns") {
        return;
    }
    let _serial = serial().await;
    let scratch = Scratch::new("block").unwrap();
    let engine = scratch
        .engine("engine-a", "node-a", "vol-blk")
        .unwrap()
        .nbd_local_only()
        .size("64M")
        .token(TOKEN)
        .start()
        .unwrap();
    let mut plugin = Plugin::start(&scratch.path("node-a"), "node-a").unwrap();
    let ctx = volume_context("vol-blk", &[("node-a", &engine)]);
    let secrets = scratch.secrets("vol-blk", TOKEN).unwrap();
    let staging = scratch.path("kubelet/volumeDevices/staging/pv-blk");
    let target = scratch.path("kubelet/pods/p2/volumeDevices/pv-blk");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let id = "default/pv-blk";
    let stage = stage_request(id, &staging, None, &ctx, &secrets);
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
        let epoch = engine.status().await?.epoch;
        sh(Command::new("nbdcopy")
            .arg(engine.unix_uri_for(&format!("vol-blk@{epoch}")))
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
    let scratch = Scratch::new("bad").unwrap();
    let engine = scratch
        .engine("engine-a", "node-a", "vol-bad")
        .unwrap()
        .nbd_local_only()
        .size("64M")
        .token(TOKEN)
        .start()
        .unwrap();
    let plugin = Plugin::start(&scratch.path("node-a"), "node-a").unwrap();
    let mut c = plugin.client().await.unwrap();
    let ctx = volume_context("vol-bad", &[("node-a", &engine)]);
    let secrets = scratch.secrets("vol-bad", TOKEN).unwrap();
    let staging = scratch.path("staging");
    let target = scratch.path("target");
    std::fs::create_dir_all(&staging).unwrap();
    let id = "default/pv-bad";
    let good = stage_request(id, &staging, Some("ext4"), &ctx, &secrets);

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
    r.volume_context.remove(ATTR_ENGINES);
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
        .insert(ATTR_VOLUME.into(), "no-such-volume".into());
    cases.push(("unknown volume", r, Code::NotFound));
    let mut r = good.clone();
    r.volume_context
        .insert(ATTR_ENGINES.into(), "node-a=127.0.0.1:1".into());
    cases.push(("engine unreachable", r, Code::Unavailable));

    // The NBD address leads to an engine that refuses the export (a secondary): the attach fails
    // with a retryable code and leaves nothing behind.
    let secondary = scratch
        .engine("engine-s", "node-a", "vol-bad")
        .unwrap()
        .nbd_local_only()
        .size("64M")
        .token(TOKEN)
        .role("secondary")
        .peer("127.0.0.1:1")
        .start()
        .unwrap();
    let mut r = good.clone();
    r.volume_context
        .insert(ATTR_NBD.into(), format!("node-a={}", secondary.nbd_addr()));
    cases.push(("NBD export refused", r, Code::Unavailable));
    // This node's engine is the secondary: staging calls Takeover, which cannot finish (the peer is
    // unreachable and the policy is to wait for it): retryable, nothing attached.
    let mut r = good.clone();
    r.volume_context = volume_context("vol-bad", &[("node-a", &secondary)]);
    r.volume_context
        .insert(ATTR_PEER_TIMEOUT.into(), "1".into());
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
    let scratch = Scratch::new("restart").unwrap();
    let mut engine = scratch
        .engine("engine-a", "node-a", "vol-rs")
        .unwrap()
        .nbd_local_only()
        .size("64M")
        .token(TOKEN)
        .start()
        .unwrap();
    let plugin = Plugin::start(&scratch.path("node-a"), "node-a").unwrap();
    let ctx = volume_context("vol-rs", &[("node-a", &engine)]);
    let secrets = scratch.secrets("vol-rs", TOKEN).unwrap();
    let staging = scratch.path("staging");
    let target = scratch.path("pods/p/dev");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let id = "default/pv-rs";
    let tmp = scratch.path("tmp");
    std::fs::create_dir_all(&tmp).unwrap();

    with_logs!(plugin, async {
        let mut c = plugin.client().await?;
        c.stage_and_publish(id, (&staging, &target), None, &ctx, &secrets)
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

        c.unpublish_and_unstage(id, (&staging, &target)).await?;
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
    let scratch = Scratch::new("xfs").unwrap();
    // mkfs.xfs wants at least 300 MiB.
    let engine = scratch
        .engine("engine-a", "node-a", "vol-xfs")
        .unwrap()
        .nbd_local_only()
        .size("512M")
        .token(TOKEN)
        .start()
        .unwrap();
    let plugin = Plugin::start(&scratch.path("node-a"), "node-a").unwrap();
    let ctx = volume_context("vol-xfs", &[("node-a", &engine)]);
    let secrets = scratch.secrets("vol-xfs", TOKEN).unwrap();
    let staging = scratch.path("staging");
    let target = scratch.path("pods/p/mount");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let id = "default/pv-xfs";
    let stage = stage_request(id, &staging, Some("xfs"), &ctx, &secrets);
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
        let wrong = stage_request(id, &staging, Some("ext4"), &ctx, &secrets);
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
async fn nbd_never_crosses_nodes_and_ignores_a_link_flap() {
    if skip("nbd_never_crosses_nodes_and_ignores_a_link_flap") {
        return;
    }
    if let Some(why) = netns_skip_reason() {
        println!("SKIP nbd_never_crosses_nodes_and_ignores_a_link_flap: {why}");
        return;
    }
    let _serial = serial().await;
    let scratch = Scratch::new("netns").unwrap();
    // node-b: an engine in its own network namespace, serving NBD on its unix socket only.
    // node-a: a plugin with no engine of the volume; node-b's plugin shares the engine's socket.
    let ns_b = Netns::create(7).unwrap();
    let engine = scratch
        .engine("engine-b", "node-b", "vol-net")
        .unwrap()
        .nbd_local_only()
        .size("64M")
        .token(TOKEN)
        .netns(&ns_b.name)
        .grpc_listen(&format!("{}:0", ns_b.ns_ip))
        .start()
        .unwrap();
    let plugin_a = Plugin::start(&scratch.path("node-a"), "node-a").unwrap();
    let plugin_b = Plugin::start(&scratch.path("node-b"), "node-b").unwrap();
    let ctx = volume_context("vol-net", &[("node-b", &engine)]);
    let secrets = scratch.secrets("vol-net", TOKEN).unwrap();
    let staging = scratch.path("staging");
    let target = scratch.path("pods/p/dev");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let tmp = scratch.path("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let id = "default/pv-net";

    with_logs!(plugin_a, async {
        // A node without an engine of the volume never attaches across the network.
        let mut a = plugin_a.client().await?;
        let refused = match a
            .node
            .node_stage_volume(stage_request(id, &staging, None, &ctx, &secrets))
            .await
        {
            Ok(_) => anyhow::bail!("a stage on a node without an engine of the volume attached"),
            Err(s) => s,
        };
        anyhow::ensure!(refused.code() == Code::FailedPrecondition, "{refused:?}");
        anyhow::ensure!(engine.status().await?.nbd_connections == 0);
        scratch.assert_clean();
        Ok(())
    });
    with_logs!(plugin_b, async {
        let mut c = plugin_b.client().await?;
        c.stage_and_publish(id, (&staging, &target), None, &ctx, &secrets)
            .await?;
        dd_write(&target, 0, 21, 256 << 10, &tmp)?;
        // The link down: replication and control would stall, host I/O does not (it never used it).
        ns_b.set_link(false)?;
        dd_write(&target, 1 << 20, 22, 512 << 10, &tmp)?;
        anyhow::ensure!(dd_read(&target, 0, 256 << 10)? == pattern(21, 256 << 10));
        ns_b.set_link(true)?;
        anyhow::ensure!(dd_read(&target, 1 << 20, 512 << 10)? == pattern(22, 512 << 10));
        c.unpublish_and_unstage(id, (&staging, &target)).await?;
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
    let scratch = Scratch::new("daemon").unwrap();
    let engine = scratch
        .engine("engine-a", "node-a", "vol-dd")
        .unwrap()
        .nbd_local_only()
        .size("256M")
        .token(TOKEN)
        .start()
        .unwrap();
    let plugin = Plugin::start(&scratch.path("node-a"), "node-a").unwrap();
    let ctx = volume_context("vol-dd", &[("node-a", &engine)]);
    let secrets = scratch.secrets("vol-dd", TOKEN).unwrap();
    let staging = scratch.path("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let id = "default/pv-dd";
    let stage = stage_request(id, &staging, Some("ext4"), &ctx, &secrets);
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
    let scratch = Scratch::new("concurrent").unwrap();
    let engine = scratch
        .engine("engine-a", "node-a", "vol-cc")
        .unwrap()
        .nbd_local_only()
        .size("256M")
        .token(TOKEN)
        .start()
        .unwrap();
    let plugin = Plugin::start(&scratch.path("node-a"), "node-a").unwrap();
    let ctx = volume_context("vol-cc", &[("node-a", &engine)]);
    let secrets = scratch.secrets("vol-cc", TOKEN).unwrap();
    let staging = scratch.path("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let id = "default/pv-cc";
    let stage = stage_request(id, &staging, Some("ext4"), &ctx, &secrets);

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

// ---------- two nodes: takeover on stage ----------

/// Runs a two-node scenario body, printing both plugins' and both engines' log tails on failure.
macro_rules! with_pair_logs {
    ($node_a:expr, $node_b:expr, $pair:expr, $body:expr) => {{
        let r: anyhow::Result<()> = $body.await;
        if let Err(e) = &r {
            eprintln!("--- node-a plugin log ---\n{}", $node_a.log());
            eprintln!("--- node-b plugin log ---\n{}", $node_b.log());
            eprintln!("--- engine-a log ---\n{}", $pair.a.log_tail(30));
            eprintln!("--- engine-b log ---\n{}", $pair.b.log_tail(30));
            panic!("{e:#}");
        }
    }};
}

/// One node's kubelet paths for a volume: everything of that node lives under `root`.
struct NodePaths {
    root: PathBuf,
    staging: PathBuf,
    target: PathBuf,
}

impl NodePaths {
    /// `block`: the target is the file kubelet names for a raw block device, else a mount dir.
    fn new(
        scratch: &Scratch,
        node: &str,
        pod: &str,
        pv: &str,
        block: bool,
    ) -> anyhow::Result<NodePaths> {
        let root = scratch.path(node);
        let target = if block {
            format!("kubelet/pods/{pod}/volumeDevices/{pv}")
        } else {
            format!("kubelet/pods/{pod}/volumes/{pv}/mount")
        };
        let p = NodePaths {
            staging: root.join(format!("kubelet/staging/{pv}")),
            target: root.join(target),
            root,
        };
        std::fs::create_dir_all(&p.staging)?;
        if let Some(parent) = p.target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        Ok(p)
    }

    fn plugin_dir(&self) -> PathBuf {
        self.root.join("plugin")
    }

    fn unpublish(&self, id: &str) -> pb::NodeUnpublishVolumeRequest {
        pb::NodeUnpublishVolumeRequest {
            volume_id: id.into(),
            target_path: self.target.display().to_string(),
        }
    }

    fn unstage(&self, id: &str) -> pb::NodeUnstageVolumeRequest {
        pb::NodeUnstageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: self.staging.display().to_string(),
        }
    }
}

/// The same files seen under another directory (the volume mounted on another node).
fn rebase(files: &[(PathBuf, u32)], dir: &Path) -> Vec<(PathBuf, u32)> {
    files
        .iter()
        .map(|(p, crc)| (dir.join(p.file_name().unwrap_or_default()), *crc))
        .collect()
}

fn pause(on: bool) -> FaultRequest {
    FaultRequest {
        pause: Some(on),
        ..Default::default()
    }
}

/// Waits until the primary has nothing left to replicate.
async fn wait_replicated(primary: &Engine) -> anyhow::Result<()> {
    primary
        .wait_status("replication to catch up", Duration::from_secs(60), |s| {
            s.pending_blocks == 0 && s.pair() == PairState::Synced
        })
        .await
        .map(|_| ())
}

/// NodeStageVolume on the secondary's node: returns once the takeover is done, so at that moment
/// the local engine already serves at the next epoch and the old primary is fenced.
async fn stage_takes_over(
    c: &mut Csi,
    stage: pb::NodeStageVolumeRequest,
    pair: &EnginePair,
) -> anyhow::Result<StatusReply> {
    let before = pair.b.status().await?;
    anyhow::ensure!(
        role(&before) == EngineRole::Secondary && before.epoch == 1,
        "engine-b before the stage: {before:?}"
    );
    let t0 = std::time::Instant::now();
    c.node.node_stage_volume(stage).await?;
    let took = t0.elapsed();
    let b = pair.b.status().await?;
    anyhow::ensure!(
        role(&b) == EngineRole::Primary && b.epoch == 2,
        "engine-b when NodeStageVolume returned: {b:?}"
    );
    let a = pair.a.status().await?;
    anyhow::ensure!(
        role(&a) == EngineRole::Fenced,
        "engine-a when NodeStageVolume returned: {a:?}"
    );
    anyhow::ensure!(b.nbd_connections >= 1, "node-b is not attached to engine-b");
    println!(
        "takeover by NodeStageVolume: {took:?} (stage with attach); {} blocks owed by the old primary",
        b.peer_pending_blocks
    );
    Ok(b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_takeover_by_staging_on_the_secondary_node() {
    if skip("ext4_takeover_by_staging_on_the_secondary_node") {
        return;
    }
    let _serial = serial().await;
    let scratch = Scratch::new("takeover-fs").unwrap();
    let pair = EnginePair::start(&scratch, "vol-tk", "512M", TOKEN).unwrap();
    let secrets = scratch.secrets("vol-tk", TOKEN).unwrap();
    let na = NodePaths::new(&scratch, "node-a", "p1", "pv-tk", false).unwrap();
    let nb = NodePaths::new(&scratch, "node-b", "p2", "pv-tk", false).unwrap();
    let mut node_a = Plugin::start(&na.plugin_dir(), "node-a").unwrap();
    let node_b = Plugin::start(&nb.plugin_dir(), "node-b").unwrap();
    let ctx = pair.volume_context();
    let id = "default/pv-tk";
    let fs = Some("ext4");

    with_pair_logs!(node_a, node_b, pair, async {
        // Node A: the pod runs on the primary's node.
        let mut a = node_a.client().await?;
        a.node
            .node_stage_volume(stage_request(id, &na.staging, fs, &ctx, &secrets))
            .await?;
        a.node
            .node_publish_volume(publish_request(id, &na.staging, &na.target, fs))
            .await?;
        let synced = write_files(&na.target, "synced", 20)?;
        wait_replicated(&pair.a).await?;
        // Replication stops; the pod keeps writing, so the secondary falls behind.
        pair.a.fault(pause(true)).await?;
        let behind = write_files(&na.target, "unreplicated", 20)?;
        sh(Command::new("sync").arg("-f").arg(&na.target))?;
        let owed = pair.a.status().await?.pending_blocks;
        anyhow::ensure!(owed > 0, "replication is not behind");
        // Node A's plugin dies; nothing can be unpublished or unstaged there.
        node_a.kill();

        // Node B: the replacement pod's volume is staged on the secondary's node.
        let mut b = node_b.client().await?;
        let st = stage_takes_over(
            &mut b,
            stage_request(id, &nb.staging, fs, &ctx, &secrets),
            &pair,
        )
        .await?;
        anyhow::ensure!(
            st.takeover() == TakeoverPhase::Draining && st.peer_pending_blocks > 0,
            "engine-b should still be owed the backlog: {st:?}"
        );
        b.node
            .node_publish_volume(publish_request(id, &nb.staging, &nb.target, fs))
            .await?;
        verify_files(&rebase(&synced, &nb.target))?;
        // These blocks are only on node A's engine: they come through proxied reads.
        verify_files(&rebase(&behind, &nb.target))?;
        let st = pair.b.status().await?;
        anyhow::ensure!(st.proxied_reads > 0, "no proxied reads: {st:?}");
        let after = write_files(&nb.target, "after-takeover", 10)?;
        verify_files(&after)?;
        b.node.node_unpublish_volume(nb.unpublish(id)).await?;
        b.node.node_unstage_volume(nb.unstage(id)).await?;
        assert_clean_under(&nb.root);

        // The old primary drains what it owes; the pair converges with the roles swapped.
        pair.a.fault(pause(false)).await?;
        EnginePair::wait_converged(&pair.b, &pair.a, Duration::from_secs(120)).await?;

        // Node A comes back: kubelet cleans up the old pod's volume. The engine there refuses
        // I/O, so whatever the stale filesystem tries to write on unmount reaches no replica.
        node_a.restart()?;
        let mut a = node_a.client().await?;
        let t0 = std::time::Instant::now();
        a.node.node_unpublish_volume(na.unpublish(id)).await?;
        a.node.node_unstage_volume(na.unstage(id)).await?;
        println!("node-a cleanup after the takeover: {:?}", t0.elapsed());
        assert_clean_under(&na.root);
        anyhow::ensure!(
            first_difference(&pair.a.data(), &pair.b.data())?.is_none(),
            "the replicas differ at byte {:?}",
            first_difference(&pair.a.data(), &pair.b.data())?
        );

        // Staged again on node B (now the primary's node): every file, merged and replicated.
        b.node
            .node_stage_volume(stage_request(id, &nb.staging, fs, &ctx, &secrets))
            .await?;
        b.node
            .node_publish_volume(publish_request(id, &nb.staging, &nb.target, fs))
            .await?;
        for files in [&synced, &behind, &after] {
            verify_files(&rebase(files, &nb.target))?;
        }
        b.node.node_unpublish_volume(nb.unpublish(id)).await?;
        b.node.node_unstage_volume(nb.unstage(id)).await?;
        scratch.assert_clean();
        Ok(())
    });
}

/// What a raw block volume must hold: every write, applied in order to a zeroed image.
struct Model(Vec<u8>);

impl Model {
    fn new(size: usize) -> Model {
        Model(vec![0; size])
    }

    /// Writes pattern `seed` through `dev` with O_DIRECT (dd) and records it.
    fn write(
        &mut self,
        dev: &Path,
        offset: u64,
        seed: u64,
        len: usize,
        tmp: &Path,
    ) -> anyhow::Result<()> {
        dd_write(dev, offset, seed, len, tmp)?;
        let at = offset as usize;
        self.0[at..at + len].copy_from_slice(&pattern(seed, len));
        Ok(())
    }

    /// `bytes` (a whole device or replica) hold exactly what was written.
    fn check(&self, what: &str, bytes: &[u8]) -> anyhow::Result<()> {
        anyhow::ensure!(
            bytes.len() == self.0.len(),
            "{what}: {} bytes, expected {}",
            bytes.len(),
            self.0.len()
        );
        if bytes != self.0.as_slice() {
            let at = bytes
                .iter()
                .zip(&self.0)
                .take_while(|(x, y)| x == y)
                .count();
            anyhow::bail!("{what} differs from what was written, first at byte {at}");
        }
        Ok(())
    }

    /// Reads the whole device with O_DIRECT and checks it.
    fn check_device(&self, what: &str, dev: &Path) -> anyhow::Result<()> {
        self.check(what, &dd_read(dev, 0, self.0.len())?)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_block_takeover_by_staging_on_the_secondary_node() {
    if skip("raw_block_takeover_by_staging_on_the_secondary_node") {
        return;
    }
    let _serial = serial().await;
    let scratch = Scratch::new("takeover-blk").unwrap();
    let pair = EnginePair::start(&scratch, "vol-tb", "64M", TOKEN).unwrap();
    let secrets = scratch.secrets("vol-tb", TOKEN).unwrap();
    let na = NodePaths::new(&scratch, "node-a", "p1", "pv-tb", true).unwrap();
    let nb = NodePaths::new(&scratch, "node-b", "p2", "pv-tb", true).unwrap();
    let mut node_a = Plugin::start(&na.plugin_dir(), "node-a").unwrap();
    let node_b = Plugin::start(&nb.plugin_dir(), "node-b").unwrap();
    let ctx = pair.volume_context();
    let id = "default/pv-tb";
    let tmp = scratch.path("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut model = Model::new(64 << 20);

    with_pair_logs!(node_a, node_b, pair, async {
        let mut a = node_a.client().await?;
        a.node
            .node_stage_volume(stage_request(id, &na.staging, None, &ctx, &secrets))
            .await?;
        a.node
            .node_publish_volume(publish_request(id, &na.staging, &na.target, None))
            .await?;
        model.write(&na.target, 0, 41, 1 << 20, &tmp)?;
        model.write(&na.target, 8 << 20, 42, 3 << 20, &tmp)?;
        wait_replicated(&pair.a).await?;
        pair.a.fault(pause(true)).await?;
        // Not replicated: half of pattern 41 overwritten, and the volume's last blocks.
        model.write(&na.target, 512 << 10, 43, 1 << 20, &tmp)?;
        model.write(&na.target, (64 << 20) - 8192, 44, 8192, &tmp)?;
        let owed = pair.a.status().await?.pending_blocks;
        anyhow::ensure!(owed > 0, "replication is not behind");
        node_a.kill();

        let mut b = node_b.client().await?;
        let st = stage_takes_over(
            &mut b,
            stage_request(id, &nb.staging, None, &ctx, &secrets),
            &pair,
        )
        .await?;
        anyhow::ensure!(
            st.takeover() == TakeoverPhase::Draining && st.peer_pending_blocks > 0,
            "engine-b should still be owed the backlog ({owed} blocks): {st:?}"
        );
        // The old pod on node A still has its device: its writes now fail (the fence).
        anyhow::ensure!(
            dd_write(&na.target, 16 << 20, 49, 64 << 10, &tmp).is_err(),
            "a write on the old primary's node succeeded after the takeover"
        );

        b.node
            .node_publish_volume(publish_request(id, &nb.staging, &nb.target, None))
            .await?;
        // Every byte, the unreplicated ones through proxied reads.
        model.check_device("node-b's device after the takeover", &nb.target)?;
        let st = pair.b.status().await?;
        anyhow::ensure!(st.proxied_reads > 0, "no proxied reads: {st:?}");
        // New writes, one over blocks the old primary still owes: the newer write must win.
        model.write(&nb.target, 768 << 10, 45, 512 << 10, &tmp)?;
        model.write(&nb.target, 32 << 20, 46, 2 << 20, &tmp)?;
        model.check_device("node-b's device after new writes", &nb.target)?;
        b.node.node_unpublish_volume(nb.unpublish(id)).await?;
        anyhow::ensure!(!nb.target.exists(), "block target file not removed");
        b.node.node_unstage_volume(nb.unstage(id)).await?;
        assert_clean_under(&nb.root);

        pair.a.fault(pause(false)).await?;
        EnginePair::wait_converged(&pair.b, &pair.a, Duration::from_secs(120)).await?;
        node_a.restart()?;
        let mut a = node_a.client().await?;
        a.node.node_unpublish_volume(na.unpublish(id)).await?;
        a.node.node_unstage_volume(na.unstage(id)).await?;
        assert_clean_under(&na.root);
        // Both replicas hold exactly what was written, and nothing of the fenced write.
        model.check("engine-b's replica", &std::fs::read(pair.b.data())?)?;
        model.check("engine-a's replica", &std::fs::read(pair.a.data())?)?;
        scratch.assert_clean();
        Ok(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_while_the_primary_is_dead_is_unavailable_whatever_the_policy() {
    if skip("staging_while_the_primary_is_dead_is_unavailable_whatever_the_policy") {
        return;
    }
    let _serial = serial().await;
    let scratch = Scratch::new("takeover-dead").unwrap();
    let mut pair = EnginePair::start(&scratch, "vol-td", "64M", TOKEN).unwrap();
    let secrets = scratch.secrets("vol-td", TOKEN).unwrap();
    let na = NodePaths::new(&scratch, "node-a", "p1", "pv-td", true).unwrap();
    let nb = NodePaths::new(&scratch, "node-b", "p2", "pv-td", true).unwrap();
    let mut node_a = Plugin::start(&na.plugin_dir(), "node-a").unwrap();
    let node_b = Plugin::start(&nb.plugin_dir(), "node-b").unwrap();
    let mut ctx = pair.volume_context();
    ctx.insert(ATTR_PEER_TIMEOUT.into(), "2".into());
    let id = "default/pv-td";
    let tmp = scratch.path("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut model = Model::new(64 << 20);

    with_pair_logs!(node_a, node_b, pair, async {
        let mut a = node_a.client().await?;
        a.node
            .node_stage_volume(stage_request(id, &na.staging, None, &ctx, &secrets))
            .await?;
        a.node
            .node_publish_volume(publish_request(id, &na.staging, &na.target, None))
            .await?;
        model.write(&na.target, 0, 51, 2 << 20, &tmp)?;
        model.write(&na.target, 10 << 20, 52, 1 << 20, &tmp)?;
        wait_replicated(&pair.a).await?;
        // Node A is lost: its plugin and its engine die.
        node_a.kill();
        pair.a.kill();

        // The default policy waits for the old primary: a retryable error, nothing attached, and
        // the secondary stays what it was.
        let mut b = node_b.client().await?;
        let e = b
            .node
            .node_stage_volume(stage_request(id, &nb.staging, None, &ctx, &secrets))
            .await;
        match &e {
            Err(s) if s.code() == Code::Unavailable && s.message().contains("HandoffBlocked") => {}
            other => anyhow::bail!("stage with the primary dead (WaitForPrimary): {other:?}"),
        }
        assert_clean_under(&nb.root);
        let records = std::fs::read_dir(node_b.state_dir().join("volumes"))?.count();
        anyhow::ensure!(records == 0, "{records} state records after a failed stage");
        let st = pair.b.status().await?;
        anyhow::ensure!(
            role(&st) == EngineRole::Secondary && st.epoch == 1,
            "engine-b after the refused takeover: {st:?}"
        );

        // The PV says ForcePromote: the plugin still only asks for a handoff (a forced promotion
        // is the witness's decision, after the old primary's lease): UNAVAILABLE, nothing
        // attached, and the message says who promotes.
        let mut force = ctx.clone();
        force.insert(ATTR_FAILOVER_POLICY.into(), "ForcePromote".into());
        let e = b
            .node
            .node_stage_volume(stage_request(id, &nb.staging, None, &force, &secrets))
            .await;
        match &e {
            Err(s) if s.code() == Code::Unavailable && s.message().contains("operator") => {}
            other => anyhow::bail!("stage with the primary dead (ForcePromote): {other:?}"),
        }
        assert_clean_under(&nb.root);
        let st = pair.b.status().await?;
        anyhow::ensure!(
            role(&st) == EngineRole::Secondary && st.epoch == 1,
            "engine-b after the stage under ForcePromote: {st:?}"
        );

        // The operator (the witness) promotes by force, waiting out engine-b's promise to the
        // old primary, and grants the new primary its first lease; the next stage attaches.
        pair.b
            .control("takeover", &["--policy", "force", "--timeout", "30"])
            .map_err(anyhow::Error::msg)?;
        pair.b.control("lease", &[]).map_err(anyhow::Error::msg)?;
        b.node
            .node_stage_volume(stage_request(id, &nb.staging, None, &force, &secrets))
            .await?;
        let st = pair.b.status().await?;
        anyhow::ensure!(
            role(&st) == EngineRole::Primary && st.epoch == 2,
            "engine-b after the forced promotion: {st:?}"
        );
        println!(
            "forced promotion: the old primary's last heartbeat named {} block(s) as possibly lost",
            st.lost_blocks
        );
        b.node
            .node_publish_volume(publish_request(id, &nb.staging, &nb.target, None))
            .await?;
        // Everything the old primary had replicated is there.
        model.check_device("node-b's device after the forced promotion", &nb.target)?;
        // Its peer is gone, so only the witness renews the lease (the operator does so every
        // lease/4); without it these writes would wait and fail with EIO after lease-wait.
        pair.b.control("lease", &[]).map_err(anyhow::Error::msg)?;
        model.write(&nb.target, 1 << 20, 53, 3 << 20, &tmp)?;
        model.check_device("node-b's device after new writes", &nb.target)?;
        b.node.node_unpublish_volume(nb.unpublish(id)).await?;
        b.node.node_unstage_volume(nb.unstage(id)).await?;
        assert_clean_under(&nb.root);
        model.check("engine-b's replica", &std::fs::read(pair.b.data())?)?;

        // Node A's plugin comes back (its engine stays down); kubelet cleans up there.
        node_a.restart()?;
        let mut a = node_a.client().await?;
        a.node.node_unpublish_volume(na.unpublish(id)).await?;
        a.node.node_unstage_volume(na.unstage(id)).await?;
        scratch.assert_clean();
        Ok(())
    });
}

/// The attachment node A's plugin recorded for `id`: (device, NBD export name).
fn recorded_attachment(plugin: &Plugin, id: &str) -> anyhow::Result<(PathBuf, String)> {
    let file = plugin
        .state_dir()
        .join("volumes")
        .join(format!("{}.json", id.replace('/', "%2F")));
    let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(&file)?)?;
    let att = &rec["attachment"];
    match (att["device"].as_str(), att["export"].as_str()) {
        (Some(d), Some(e)) => Ok((PathBuf::from(d), e.to_string())),
        _ => anyhow::bail!("no attachment in {}: {rec}", file.display()),
    }
}

/// A partitioned node keeps its staging across a takeover: the attachment is pinned to the epoch
/// it was made at, so after a failback to that node's engine (epoch 3) the stale device still
/// fails I/O instead of reaching the new epoch's data; NodeStageVolume there refuses the stale
/// staging while the old pod's publication is mounted, and replaces it once it is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_staging_stays_fenced_through_a_failback_and_is_replaced_by_the_next_stage() {
    if skip("a_stale_staging_stays_fenced_through_a_failback_and_is_replaced_by_the_next_stage") {
        return;
    }
    let _serial = serial().await;
    let scratch = Scratch::new("stale").unwrap();
    let pair = EnginePair::start(&scratch, "vol-st", "256M", TOKEN).unwrap();
    let secrets = scratch.secrets("vol-st", TOKEN).unwrap();
    let na = NodePaths::new(&scratch, "node-a", "p1", "pv-st", false).unwrap();
    let nb = NodePaths::new(&scratch, "node-b", "p2", "pv-st", false).unwrap();
    // The pod that replaces p1 on node A after the failback (same staging path).
    let na2 = NodePaths::new(&scratch, "node-a", "p3", "pv-st", false).unwrap();
    let node_a = Plugin::start(&na.plugin_dir(), "node-a").unwrap();
    let node_b = Plugin::start(&nb.plugin_dir(), "node-b").unwrap();
    let ctx = pair.volume_context();
    let id = "default/pv-st";
    let fs = Some("ext4");
    let tmp = scratch.path("tmp");
    std::fs::create_dir_all(&tmp).unwrap();

    with_pair_logs!(node_a, node_b, pair, async {
        // Node A: the pod runs on the primary's node, pinned to epoch 1.
        let mut a = node_a.client().await?;
        a.node
            .node_stage_volume(stage_request(id, &na.staging, fs, &ctx, &secrets))
            .await?;
        a.node
            .node_publish_volume(publish_request(id, &na.staging, &na.target, fs))
            .await?;
        let (stale_dev, export) = recorded_attachment(&node_a, id)?;
        anyhow::ensure!(export == "vol-st@1", "node A attached {export:?}");
        let first = write_files(&na.target, "epoch1", 10)?;
        wait_replicated(&pair.a).await?;

        // Node A is cut off from kubelet's point of view: its plugin stays up and its mount stays
        // in place (nothing unpublishes or unstages there). The pod moves to node B: takeover.
        let mut b = node_b.client().await?;
        b.node
            .node_stage_volume(stage_request(id, &nb.staging, fs, &ctx, &secrets))
            .await?;
        let st = pair.b.status().await?;
        anyhow::ensure!(
            role(&st) == EngineRole::Primary && st.epoch == 2,
            "engine-b after the stage on node B: {st:?}"
        );
        let (_, export) = recorded_attachment(&node_b, id)?;
        anyhow::ensure!(export == "vol-st@2", "node B attached {export:?}");
        b.node
            .node_publish_volume(publish_request(id, &nb.staging, &nb.target, fs))
            .await?;
        verify_files(&rebase(&first, &nb.target))?;
        let second = write_files(&nb.target, "epoch2", 10)?;
        // The pod on node B finishes; kubelet there cleans up.
        b.node.node_unpublish_volume(nb.unpublish(id)).await?;
        b.node.node_unstage_volume(nb.unstage(id)).await?;
        assert_clean_under(&nb.root);
        EnginePair::wait_converged(&pair.b, &pair.a, Duration::from_secs(120)).await?;

        // The operator fails back to node A's engine (e.g. node B is drained): epoch 3, and node
        // A's engine serves I/O again, with node A's epoch-1 staging still in place.
        let t0 = std::time::Instant::now();
        sh(&mut pair.a.cli("failback"))?;
        let st = pair.a.status().await?;
        anyhow::ensure!(
            role(&st) == EngineRole::Primary && st.epoch == 3,
            "engine-a after the failback: {st:?}"
        );
        println!("failback to engine A: {:?}", t0.elapsed());

        // The stale staging's daemon keeps reconnecting, and engine A keeps refusing it: the
        // volume condition says why, and the device fails reads and writes with EIO.
        let stats_req = pb::NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: na.target.display().to_string(),
            staging_target_path: String::new(),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let cond = loop {
            let cond = a
                .node
                .node_get_volume_stats(stats_req.clone())
                .await?
                .into_inner()
                .volume_condition
                .unwrap_or_default();
            // The refusal seen after the failback names the new epoch.
            if cond.abnormal
                && cond.message.contains("pinned to epoch 1")
                && cond.message.contains("at epoch 3 now")
            {
                break cond;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "node A's stale staging never reported the refusal: {cond:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        println!(
            "node A's stale staging after the failback: {}",
            cond.message
        );
        let read = dd_read(&stale_dev, 0, 1 << 20);
        match &read {
            Err(e) if e.to_string().contains("Input/output error") => {}
            other => anyhow::bail!("O_DIRECT read of the stale device: {other:?}"),
        }
        let write = dd_write(&stale_dev, 64 << 20, 61, 64 << 10, &tmp);
        match &write {
            Err(e) if e.to_string().contains("Input/output error") => {}
            other => anyhow::bail!("O_DIRECT write to the stale device: {other:?}"),
        }
        // The old pod writes through its stale filesystem: never durable.
        let stale_file = na.target.join("stale-write.bin");
        let durable = std::fs::File::create(&stale_file).and_then(|mut f| {
            use std::io::Write;
            f.write_all(&pattern(62, 256 << 10))?;
            f.sync_all()
        });
        anyhow::ensure!(
            durable.is_err(),
            "an fsync on the stale filesystem succeeded after the failback"
        );

        // Kubelet stages again on node A while the old pod's publication is still mounted:
        // refused as stale, retryable, and nothing changes (no takeover either).
        let e = a
            .node
            .node_stage_volume(stage_request(id, &na.staging, fs, &ctx, &secrets))
            .await;
        match &e {
            Err(s) if s.code() == Code::Aborted && s.message().contains("stale") => {
                println!(
                    "stage over a stale staging still published: {}",
                    s.message()
                )
            }
            other => anyhow::bail!("stage over the stale, published staging: {other:?}"),
        }
        let st = pair.a.status().await?;
        anyhow::ensure!(
            role(&st) == EngineRole::Primary && st.epoch == 3,
            "engine-a after the refused stage: {st:?}"
        );
        anyhow::ensure!(
            recorded_attachment(&node_a, id)?.1 == "vol-st@1",
            "the refused stage changed the staging"
        );

        // Kubelet removes the old pod's volume; the next stage replaces the stale staging.
        a.node.node_unpublish_volume(na.unpublish(id)).await?;
        let t0 = std::time::Instant::now();
        a.node
            .node_stage_volume(stage_request(id, &na.staging, fs, &ctx, &secrets))
            .await?;
        println!("stage replacing the stale staging: {:?}", t0.elapsed());
        let (dev, export) = recorded_attachment(&node_a, id)?;
        anyhow::ensure!(export == "vol-st@3", "node A attached {export:?}");
        let loops = loops_under(&na.root);
        anyhow::ensure!(loops.len() == 1, "loop devices on node A: {loops:?}");
        a.node
            .node_publish_volume(publish_request(id, &na.staging, &na2.target, fs))
            .await?;
        // Everything of both epochs, nothing of the stale one.
        verify_files(&rebase(&first, &na2.target))?;
        verify_files(&rebase(&second, &na2.target))?;
        anyhow::ensure!(
            !na2.target.join("stale-write.bin").exists(),
            "the stale filesystem's write reached the volume"
        );
        let third = write_files(&na2.target, "epoch3", 5)?;
        verify_files(&third)?;
        anyhow::ensure!(dd_read(&dev, 0, 4096)?.len() == 4096);
        a.node.node_unpublish_volume(na2.unpublish(id)).await?;
        a.node.node_unstage_volume(na2.unstage(id)).await?;
        assert_clean_under(&na.root);
        EnginePair::wait_converged(&pair.a, &pair.b, Duration::from_secs(120)).await?;
        anyhow::ensure!(
            first_difference(&pair.a.data(), &pair.b.data())?.is_none(),
            "the replicas differ at byte {:?}",
            first_difference(&pair.a.data(), &pair.b.data())?
        );
        scratch.assert_clean();
        Ok(())
    });
}

/// The daemon's reconnect count for the plugin's attachments (its `/metrics`).
fn reconnects(plugin: &Plugin) -> anyhow::Result<u64> {
    let page = plugin.metrics()?;
    page.lines()
        .filter(|l| l.starts_with("tandem_csi_nbd_reconnects_total{"))
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or_else(|| anyhow::anyhow!("bad sample {l:?}"))
        })
        .sum::<anyhow::Result<u64>>()
}

/// Issue 12 item 4: an engine restart is not a failover. A workload writes continuously through
/// node A's staged raw block device (engine A, the primary, in its own network namespace, with
/// write leases on); engine A is SIGKILLed and started again from the same state dir 12 seconds
/// later. The workload sees a stall and no error, the attachment reconnects at the same epoch,
/// nothing fails over, and every acknowledged write reads back, on the device and on both replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_engine_crash_under_a_live_workload_is_a_stall_not_an_error() {
    if skip("a_primary_engine_crash_under_a_live_workload_is_a_stall_not_an_error") {
        return;
    }
    let _serial = serial().await;
    let scratch = Scratch::new("engine-crash").unwrap();
    let mut pair = EnginePair::start(&scratch, "vol-ec", "64M", TOKEN).unwrap();
    let secrets = scratch.secrets("vol-ec", TOKEN).unwrap();
    let na = NodePaths::new(&scratch, "node-a", "p1", "pv-ec", true).unwrap();
    let node_a = Plugin::start(&na.plugin_dir(), "node-a").unwrap();
    let ctx = pair.volume_context();
    let id = "default/pv-ec";
    const REGION: u64 = 16 << 20;

    with_logs!(node_a, async {
        let mut a = node_a.client().await?;
        a.node
            .node_stage_volume(stage_request(id, &na.staging, None, &ctx, &secrets))
            .await?;
        a.node
            .node_publish_volume(publish_request(id, &na.staging, &na.target, None))
            .await?;
        let (_, export) = recorded_attachment(&node_a, id)?;
        anyhow::ensure!(export == "vol-ec@1", "attached to {export}");
        let writer = HistoryWriter::start(&na.target, REGION, 64 << 10, 1)?;
        writer.wait_acked(100, Duration::from_secs(60)).await?;

        // The engine crashes and stays away 12 s: longer than the plugin's I/O timeout (10 s in
        // this suite), which is no bound while the engine is unreachable (the reconnect limit,
        // 120 s, is), and longer than the lease. The writer's current request waits.
        pair.a.kill();
        let at_kill = writer.acked();
        tokio::time::sleep(Duration::from_secs(12)).await;
        anyhow::ensure!(writer.running(), "a write failed while the engine was down");
        anyhow::ensure!(
            writer.acked() <= at_kill + 1,
            "{} writes returned with the engine down",
            writer.acked() - at_kill
        );
        pair.a.restart()?;
        writer
            .wait_acked(at_kill + 200, Duration::from_secs(60))
            .await?;
        let history = writer.finish()?;
        println!(
            "engine crash under load: {} writes acknowledged, the longest took {:?}",
            history.writes.len(),
            history.longest
        );

        // Not a failover: same roles, same epoch, and the attachment is the same one.
        let (sa, sb) = (pair.a.status().await?, pair.b.status().await?);
        anyhow::ensure!(
            role(&sa) == EngineRole::Primary && sa.epoch == 1,
            "engine-a: {sa:?}"
        );
        anyhow::ensure!(
            role(&sb) == EngineRole::Secondary && sb.epoch == 1,
            "engine-b: {sb:?}"
        );
        anyhow::ensure!(reconnects(&node_a)? >= 1, "{}", node_a.metrics()?);
        history.check(
            "node-a's device",
            &read_direct(&na.target, REGION as usize)?,
        )?;
        EnginePair::wait_converged(&pair.a, &pair.b, Duration::from_secs(120)).await?;
        a.node.node_unpublish_volume(na.unpublish(id)).await?;
        a.node.node_unstage_volume(na.unstage(id)).await?;
        history.check("engine-a's replica", &std::fs::read(pair.a.data())?)?;
        history.check("engine-b's replica", &std::fs::read(pair.b.data())?)?;
        scratch.assert_clean();
        Ok(())
    });
}

/// Engine A is still the primary and engine B its secondary, both at epoch 1: nothing failed over.
async fn roles_unchanged(pair: &EnginePair) -> anyhow::Result<()> {
    let (a, b) = (pair.a.status().await?, pair.b.status().await?);
    anyhow::ensure!(
        role(&a) == EngineRole::Primary && a.epoch == 1,
        "engine-a: {a:?}"
    );
    anyhow::ensure!(
        role(&b) == EngineRole::Secondary && b.epoch == 1,
        "engine-b: {b:?}"
    );
    Ok(())
}

/// Issue 12 item 6: a read-only stage on the secondary's node never takes over. With
/// `secondaryAccess: ReadWrite` (engines started with `--secondary-access read-write`) and read
/// mode `Current` (issue 18: the default is a point-in-time view, see
/// `a_backup_stage_on_the_secondarys_node_reads_a_frozen_consistent_view`) it attaches
/// read-only to the secondary and reads what the primary's pod wrote, while that pod keeps writing
/// on node A; without it the stage is FAILED_PRECONDITION and attaches nothing. The engines keep
/// their roles and epoch throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_stage_on_the_secondarys_node_does_not_take_over() {
    if skip("a_read_only_stage_on_the_secondarys_node_does_not_take_over") {
        return;
    }
    use pb::volume_capability::access_mode::Mode;
    let _serial = serial().await;
    let scratch = Scratch::new("ro-stage").unwrap();
    let pair = EnginePair::start_with(
        &scratch,
        "vol-ro",
        "64M",
        TOKEN,
        &["--secondary-access", "read-write"],
    )
    .unwrap();
    let secrets = scratch.secrets("vol-ro", TOKEN).unwrap();
    let na = NodePaths::new(&scratch, "node-a", "p1", "pv-ro", true).unwrap();
    let nb = NodePaths::new(&scratch, "node-b", "p2", "pv-ro", true).unwrap();
    let node_a = Plugin::start(&na.plugin_dir(), "node-a").unwrap();
    let node_b = Plugin::start(&nb.plugin_dir(), "node-b").unwrap();
    let ctx = pair.volume_context();
    let mut ro_ctx = ctx.clone();
    ro_ctx.insert(ATTR_SECONDARY_ACCESS.into(), "ReadWrite".into());
    ro_ctx.insert(ATTR_SECONDARY_READ_MODE.into(), "Current".into());
    let id = "default/pv-ro";
    let tmp = scratch.path("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut model = Model::new(64 << 20);

    with_pair_logs!(node_a, node_b, pair, async {
        let mut a = node_a.client().await?;
        a.node
            .node_stage_volume(stage_request(id, &na.staging, None, &ctx, &secrets))
            .await?;
        a.node
            .node_publish_volume(publish_request(id, &na.staging, &na.target, None))
            .await?;
        model.write(&na.target, 0, 61, 2 << 20, &tmp)?;
        model.write(&na.target, 20 << 20, 62, 1 << 20, &tmp)?;
        wait_replicated(&pair.a).await?;

        // secondaryAccess None: a reader on node B is refused, nothing taken over or attached.
        let mut b = node_b.client().await?;
        for mode in [Mode::SingleNodeReaderOnly, Mode::MultiNodeReaderOnly] {
            let mut req = stage_request(id, &nb.staging, None, &ctx, &secrets);
            req.volume_capability = Some(reader_capability(None, mode));
            match b.node.node_stage_volume(req).await {
                Err(s)
                    if s.code() == Code::FailedPrecondition
                        && s.message().contains("never takes over") => {}
                other => anyhow::bail!("read-only stage without secondary reads: {other:?}"),
            }
        }
        assert_clean_under(&nb.root);
        roles_unchanged(&pair).await?;

        // secondaryAccess ReadWrite: attached to engine-b (current reads), read-only, at its epoch.
        let mut req = stage_request(id, &nb.staging, None, &ro_ctx, &secrets);
        req.volume_capability = Some(reader_capability(None, Mode::MultiNodeReaderOnly));
        b.node.node_stage_volume(req.clone()).await?;
        roles_unchanged(&pair).await?;
        let (_, export) = recorded_attachment(&node_b, id)?;
        anyhow::ensure!(export == "vol-ro@1", "node-b attached to {export}");
        anyhow::ensure!(
            pair.b.status().await?.nbd_connections >= 1,
            "node-b is not attached to engine-b"
        );
        let mut publish = publish_request(id, &nb.staging, &nb.target, None);
        publish.volume_capability = Some(reader_capability(None, Mode::MultiNodeReaderOnly));
        publish.readonly = true;
        b.node.node_publish_volume(publish).await?;
        model.check_device("node-b's read-only device", &nb.target)?;
        anyhow::ensure!(
            dd_write(&nb.target, 0, 69, 4096, &tmp).is_err(),
            "a write through the read-only stage succeeded"
        );
        // The writer on node A goes on; node B sees its replicated writes.
        model.write(&na.target, 4 << 20, 63, 1 << 20, &tmp)?;
        wait_replicated(&pair.a).await?;
        model.check_device("node-b's read-only device after more writes", &nb.target)?;
        // kubelet repeats the stage: still current, nothing taken over.
        b.node.node_stage_volume(req).await?;
        roles_unchanged(&pair).await?;

        b.node.node_unpublish_volume(nb.unpublish(id)).await?;
        b.node.node_unstage_volume(nb.unstage(id)).await?;
        assert_clean_under(&nb.root);
        model.check_device("node-a's device", &na.target)?;
        a.node.node_unpublish_volume(na.unpublish(id)).await?;
        a.node.node_unstage_volume(na.unstage(id)).await?;
        roles_unchanged(&pair).await?;
        scratch.assert_clean();
        Ok(())
    });
}

/// Issue 18 (seed 004): ReadWriteMany on a raw block volume with `secondaryAccess: ReadWrite`.
/// Writers on both nodes at once: node A's device is the primary, node B's the secondary, whose
/// writes are forwarded to the primary. Each device reads back every write of both (O_DIRECT),
/// overlapping ranges hold the later write, and nothing was taken over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_block_writers_on_both_nodes_see_each_others_writes_without_a_takeover() {
    if skip("shared_block_writers_on_both_nodes_see_each_others_writes_without_a_takeover") {
        return;
    }
    use pb::volume_capability::access_mode::Mode;
    let _serial = serial().await;
    let scratch = Scratch::new("rwx").unwrap();
    let pair = EnginePair::start_with(
        &scratch,
        "vol-rwx",
        "64M",
        TOKEN,
        &["--secondary-access", "read-write"],
    )
    .unwrap();
    let secrets = scratch.secrets("vol-rwx", TOKEN).unwrap();
    let na = NodePaths::new(&scratch, "node-a", "p1", "pv-rwx", true).unwrap();
    let nb = NodePaths::new(&scratch, "node-b", "p2", "pv-rwx", true).unwrap();
    let node_a = Plugin::start(&na.plugin_dir(), "node-a").unwrap();
    let node_b = Plugin::start(&nb.plugin_dir(), "node-b").unwrap();
    let mut ctx = pair.volume_context();
    ctx.insert(ATTR_SECONDARY_ACCESS.into(), "ReadWrite".into());
    let id = "default/pv-rwx";
    let tmp = scratch.path("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut model = Model::new(64 << 20);
    let shared = || reader_capability(None, Mode::MultiNodeMultiWriter);

    with_pair_logs!(node_a, node_b, pair, async {
        let mut a = node_a.client().await?;
        let mut b = node_b.client().await?;
        for (c, n) in [(&mut a, &na), (&mut b, &nb)] {
            let mut stage = stage_request(id, &n.staging, None, &ctx, &secrets);
            stage.volume_capability = Some(shared());
            c.node.node_stage_volume(stage).await?;
            let mut publish = publish_request(id, &n.staging, &n.target, None);
            publish.volume_capability = Some(shared());
            c.node.node_publish_volume(publish).await?;
        }
        roles_unchanged(&pair).await?;
        let (_, export) = recorded_attachment(&node_b, id)?;
        anyhow::ensure!(export == "vol-rwx@1", "node-b attached to {export}");

        // Interleaved writers, overlapping at the edges: the later write wins on both devices.
        model.write(&na.target, 0, 81, 1 << 20, &tmp)?;
        model.write(&nb.target, 512 << 10, 82, 1 << 20, &tmp)?;
        model.write(&na.target, 1 << 20, 83, 256 << 10, &tmp)?;
        model.write(&nb.target, 16 << 20, 84, 2 << 20, &tmp)?;
        model.write(&na.target, (17 << 20) + 4096, 85, 8192, &tmp)?;
        model.check_device("node-a's device", &na.target)?;
        model.check_device("node-b's device", &nb.target)?;
        roles_unchanged(&pair).await?;

        // kubelet repeats node B's stage: still the secondary, nothing taken over.
        let mut stage = stage_request(id, &nb.staging, None, &ctx, &secrets);
        stage.volume_capability = Some(shared());
        b.node.node_stage_volume(stage).await?;
        roles_unchanged(&pair).await?;

        b.unpublish_and_unstage(id, (&nb.staging, &nb.target))
            .await?;
        assert_clean_under(&nb.root);
        model.check_device("node-a's device after node B left", &na.target)?;
        a.unpublish_and_unstage(id, (&na.staging, &na.target))
            .await?;
        roles_unchanged(&pair).await?;
        scratch.assert_clean();
        Ok(())
    });
}

/// The writer of the backup test: files `w-NNNN.bin` of known contents written one after the
/// other into `dir` (4 to 32 KiB each), each fsync'd with its directory; a file is recorded
/// (name, crc32c) only once both fsyncs returned. Stops when told, at `max` files, or at the
/// first error (returned).
struct FileWriter {
    done: std::sync::Arc<std::sync::Mutex<Vec<(String, u32)>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl FileWriter {
    fn start(dir: &Path, max: u64) -> FileWriter {
        use std::io::Write;
        use std::sync::atomic::Ordering;
        let done = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (d, st, dir) = (done.clone(), stop.clone(), dir.to_path_buf());
        let thread = std::thread::spawn(move || -> anyhow::Result<()> {
            for i in 0..max {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let name = format!("w-{i:04}.bin");
                let data = pattern(
                    7000 + i,
                    4096 * (1 + (i as usize * 7) % 8) + (i as usize % 13),
                );
                let mut f = std::fs::File::create(dir.join(&name))?;
                f.write_all(&data)?;
                f.sync_all()?;
                std::fs::File::open(&dir)?.sync_all()?;
                d.lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .push((name, crc32c::crc32c(&data)));
            }
            Ok(())
        });
        FileWriter {
            done,
            stop,
            thread: Some(thread),
        }
    }

    /// The files whose fsyncs have returned, in order.
    fn done(&self) -> Vec<(String, u32)> {
        self.done.lock().map(|d| d.clone()).unwrap_or_default()
    }

    async fn wait_done(&self, n: usize) -> anyhow::Result<()> {
        let t = std::time::Instant::now();
        while self.done().len() < n {
            anyhow::ensure!(
                self.thread.as_ref().is_some_and(|t| !t.is_finished()),
                "the writer stopped at {} files",
                self.done().len()
            );
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(20),
                "the writer wrote {} of {n} files in 20 s",
                self.done().len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    fn finish(mut self) -> anyhow::Result<Vec<(String, u32)>> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| anyhow::anyhow!("the writer panicked"))??;
        }
        Ok(self.done())
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Every file of a mounted image: name → crc32c of its bytes.
fn image_files(dir: &Path) -> anyhow::Result<std::collections::BTreeMap<String, u32>> {
    let mut out = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("w-") {
            out.insert(name, crc32c::crc32c(&std::fs::read(e.path())?));
        }
    }
    Ok(out)
}

/// The `view-*` snapshots engine `e` holds (asked as the operator).
async fn views_on(e: &Engine) -> anyhow::Result<Vec<String>> {
    let list = e.client().await?.list_snapshots(e.volume()).await?;
    Ok(list
        .snapshots
        .into_iter()
        .map(|s| s.id)
        .filter(|id| id.starts_with(VIEW_SNAPSHOT_PREFIX))
        .collect())
}

/// Issue 18, seed 004: a backup pod stages the volume read-only on the secondary's node while the
/// writer on the primary's node keeps creating files, each fsync'd. The stage takes a
/// point-in-time view on the secondary's engine (no takeover) and mounts it: every file whose
/// fsyncs returned before the stage began is there with its exact bytes (so the journal's
/// committed transactions were replayed), the filesystem checks clean (`e2fsck -fn` on a copy),
/// and while the writer goes on, replicated to the secondary, the image stays the same: the
/// same files and bytes on a second read, and the device read twice with O_DIRECT is identical
/// (the live secondary's copy would differ). The unstage deletes the view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_stage_on_the_secondarys_node_reads_a_frozen_consistent_view() {
    if skip("a_backup_stage_on_the_secondarys_node_reads_a_frozen_consistent_view") {
        return;
    }
    use pb::volume_capability::access_mode::Mode;
    let _serial = serial().await;
    let scratch = Scratch::new("view").unwrap();
    let pair = EnginePair::start_with(
        &scratch,
        "vol-view",
        "64M",
        TOKEN,
        &["--secondary-access", "read-only"],
    )
    .unwrap();
    let secrets = scratch.secrets("vol-view", TOKEN).unwrap();
    let na = NodePaths::new(&scratch, "node-a", "writer", "pv-view", false).unwrap();
    let nb = NodePaths::new(&scratch, "node-b", "backup", "pv-view", false).unwrap();
    let node_a = Plugin::start(&na.plugin_dir(), "node-a").unwrap();
    let node_b = Plugin::start(&nb.plugin_dir(), "node-b").unwrap();
    let mut ctx = pair.volume_context();
    ctx.insert(ATTR_SECONDARY_ACCESS.into(), "ReadOnly".into());
    let id = "default/pv-view";

    with_pair_logs!(node_a, node_b, pair, async {
        let mut a = node_a.client().await?;
        a.stage_and_publish(id, (&na.staging, &na.target), Some("ext4"), &ctx, &secrets)
            .await?;
        wait_replicated(&pair.a).await?;
        // At most ~12 MiB of files: the 64 MiB filesystem never fills.
        let writer = FileWriter::start(&na.target, 600);
        writer.wait_done(40).await?;

        // The backup pod: a read-only stage and publication on node B, while the writer writes.
        let before = writer.done();
        let mut b = node_b.client().await?;
        let mut stage = stage_request(id, &nb.staging, Some("ext4"), &ctx, &secrets);
        stage.volume_capability = Some(reader_capability(Some("ext4"), Mode::MultiNodeReaderOnly));
        b.node.node_stage_volume(stage.clone()).await?;
        let after_stage = writer.done().len();
        roles_unchanged(&pair).await?;
        let (device, export) = recorded_attachment(&node_b, id)?;
        let views = views_on(&pair.b).await?;
        anyhow::ensure!(
            views.len() == 1 && export == format!("vol-view@snapshot/{}", views[0]),
            "node-b reads {export}; engine-b holds views {views:?}"
        );
        let mut publish = publish_request(id, &nb.staging, &nb.target, Some("ext4"));
        publish.volume_capability =
            Some(reader_capability(Some("ext4"), Mode::MultiNodeReaderOnly));
        publish.readonly = true;
        b.node.node_publish_volume(publish).await?;

        // First read: every file fsync'd before the stage, byte for byte.
        let first = image_files(&nb.target)?;
        for (name, crc) in &before {
            match first.get(name) {
                Some(got) if got == crc => {}
                Some(got) => anyhow::bail!("{name} reads crc {got:#x} in the view, wrote {crc:#x}"),
                None => anyhow::bail!(
                    "{name} was fsync'd before the view was taken, but the view lacks it ({} of \
                     {} files there)",
                    first.len(),
                    before.len()
                ),
            }
        }
        let dev_first = read_direct(&device, 64 << 20)?;
        // A clean filesystem: e2fsck on a copy of the view's device (the mount replayed it).
        let copy = scratch.path("view-copy.img");
        std::fs::write(&copy, &dev_first)?;
        let fsck = Command::new("e2fsck").args(["-fn"]).arg(&copy).output()?;
        anyhow::ensure!(
            fsck.status.success(),
            "e2fsck -fn on the view: {}\n{}",
            fsck.status,
            String::from_utf8_lossy(&fsck.stdout)
        );
        std::fs::remove_file(&copy)?;

        // The writer goes on, and the secondary's live copy gets its new files too.
        writer.wait_done(after_stage + 40).await?;
        let written = writer.finish()?;
        wait_replicated(&pair.a).await?;
        anyhow::ensure!(
            read_direct(&device, 64 << 20)? == dev_first,
            "the view's device changed while the writer wrote"
        );
        let second = image_files(&nb.target)?;
        anyhow::ensure!(
            first == second,
            "the mounted view changed between two reads"
        );
        let later: Vec<&String> = written[after_stage..]
            .iter()
            .map(|(n, _)| n)
            .filter(|n| second.contains_key(*n))
            .collect();
        anyhow::ensure!(
            later.is_empty(),
            "files written after the stage show: {later:?}"
        );

        // kubelet repeats the stage: the same view, nothing taken over.
        b.node.node_stage_volume(stage).await?;
        anyhow::ensure!(
            views_on(&pair.b).await? == views,
            "a repeated stage took a new view"
        );
        b.unpublish_and_unstage(id, (&nb.staging, &nb.target))
            .await?;
        assert_clean_under(&nb.root);
        let left = views_on(&pair.b).await?;
        anyhow::ensure!(left.is_empty(), "views left after the unstage: {left:?}");

        println!(
            "view: {} files fsync'd before the stage, {} in the view, {} written in all",
            before.len(),
            first.len(),
            written.len()
        );
        a.unpublish_and_unstage(id, (&na.staging, &na.target))
            .await?;
        roles_unchanged(&pair).await?;
        scratch.assert_clean();
        Ok(())
    });
}

/// Issue 12 items 7 and the "pod moved" disruption: no operator runs, only the two engines. The
/// pod on node A writes a history and goes away (unpublish, unstage); its replacement's stage on
/// node B, the secondary's node, takes over by handoff and returns with engine B primary; the
/// replacement's first I/O works at once, every acknowledged byte reads back, and it keeps writing
/// past a whole lease (10 s) with no witness: the old primary, now B's secondary, renews it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_moved_to_the_secondarys_node_without_an_operator() {
    if skip("a_pod_moved_to_the_secondarys_node_without_an_operator") {
        return;
    }
    let _serial = serial().await;
    let scratch = Scratch::new("pod-moved").unwrap();
    let pair = EnginePair::start(&scratch, "vol-pm", "64M", TOKEN).unwrap();
    let secrets = scratch.secrets("vol-pm", TOKEN).unwrap();
    let na = NodePaths::new(&scratch, "node-a", "p1", "pv-pm", true).unwrap();
    let nb = NodePaths::new(&scratch, "node-b", "p2", "pv-pm", true).unwrap();
    let node_a = Plugin::start(&na.plugin_dir(), "node-a").unwrap();
    let node_b = Plugin::start(&nb.plugin_dir(), "node-b").unwrap();
    let ctx = pair.volume_context();
    let id = "default/pv-pm";
    const REGION: u64 = 16 << 20;

    with_pair_logs!(node_a, node_b, pair, async {
        let mut a = node_a.client().await?;
        a.node
            .node_stage_volume(stage_request(id, &na.staging, None, &ctx, &secrets))
            .await?;
        a.node
            .node_publish_volume(publish_request(id, &na.staging, &na.target, None))
            .await?;
        let writer = HistoryWriter::start(&na.target, REGION, 64 << 10, 1)?;
        writer.wait_acked(200, Duration::from_secs(60)).await?;
        let before = writer.finish()?;
        a.node.node_unpublish_volume(na.unpublish(id)).await?;
        a.node.node_unstage_volume(na.unstage(id)).await?;
        assert_clean_under(&na.root);

        // The replacement pod is scheduled on node B.
        let mut b = node_b.client().await?;
        let t0 = std::time::Instant::now();
        b.node
            .node_stage_volume(stage_request(id, &nb.staging, None, &ctx, &secrets))
            .await?;
        let staged = t0.elapsed();
        let (sa, sb) = (pair.a.status().await?, pair.b.status().await?);
        anyhow::ensure!(
            role(&sb) == EngineRole::Primary && sb.epoch == 2,
            "engine-b when NodeStageVolume returned: {sb:?}"
        );
        // Nothing was owed, so the old primary may have drained and turned secondary already.
        anyhow::ensure!(
            matches!(role(&sa), EngineRole::Fenced | EngineRole::Secondary) && sa.epoch == 2,
            "engine-a when NodeStageVolume returned: {sa:?}"
        );
        b.node
            .node_publish_volume(publish_request(id, &nb.staging, &nb.target, None))
            .await?;
        let first = read_direct(&nb.target, 64 << 10)?;
        let first_io = t0.elapsed();
        println!(
            "pod moved: stage (takeover + attach) {staged:?}, + publish + first read {first_io:?}"
        );
        anyhow::ensure!(
            first_io < Duration::from_secs(5),
            "the replacement's first I/O took {first_io:?}"
        );
        anyhow::ensure!(first == before.expected()[..64 << 10], "first read differs");
        before.check(
            "node-b's device after the move",
            &read_direct(&nb.target, REGION as usize)?,
        )?;

        // It writes on, for longer than a lease, with no witness granting one.
        let writer = HistoryWriter::start(&nb.target, REGION, 64 << 10, 1_000_000)?;
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_secs(12) {
            anyhow::ensure!(writer.running(), "a write on node B failed");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let history = before.followed_by(writer.finish()?);
        println!(
            "after the move: {} writes in all, the longest {:?}",
            history.writes.len(),
            history.longest
        );
        history.check(
            "node-b's device",
            &read_direct(&nb.target, REGION as usize)?,
        )?;
        EnginePair::wait_converged(&pair.b, &pair.a, Duration::from_secs(120)).await?;
        b.node.node_unpublish_volume(nb.unpublish(id)).await?;
        b.node.node_unstage_volume(nb.unstage(id)).await?;
        history.check("engine-b's replica", &std::fs::read(pair.b.data())?)?;
        history.check("engine-a's replica", &std::fs::read(pair.a.data())?)?;
        scratch.assert_clean();
        Ok(())
    });
}

/// Issue 13: a CSI Secret that does not speak for this volume on this node moves nothing. On the
/// secondary's node (where a good stage takes over), a stage whose Secret carries another
/// volume's pair (same CA), another node's pair, or no pair at all fails and attaches nothing, and
/// the engines keep their roles; asked directly, the engine refuses those identities a takeover
/// (PERMISSION_DENIED). With the volume's own Secret the same stage takes over through TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_with_another_volumes_or_nodes_certificate_attaches_nothing() {
    if skip("a_stage_with_another_volumes_or_nodes_certificate_attaches_nothing") {
        return;
    }
    use tandem_api::client::{EngineClient, TakeoverPolicy};
    use tandem_api::tls::ClientTls;
    let _serial = serial().await;
    let scratch = Scratch::new("tls-stage").unwrap();
    let pair = EnginePair::start(&scratch, "vol-mt", "64M", TOKEN).unwrap();
    let secrets = scratch.secrets("vol-mt", TOKEN).unwrap();
    let na = NodePaths::new(&scratch, "node-a", "p1", "pv-mt", true).unwrap();
    let nb = NodePaths::new(&scratch, "node-b", "p2", "pv-mt", true).unwrap();
    let node_a = Plugin::start(&na.plugin_dir(), "node-a").unwrap();
    let node_b = Plugin::start(&nb.plugin_dir(), "node-b").unwrap();
    let ctx = pair.volume_context();
    let id = "default/pv-mt";
    let tmp = scratch.path("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let tls = &scratch.tls;
    let (cert_key, key_key) = (secret_csi_cert_key("node-b"), secret_csi_key_key("node-b"));
    // Node B's entries replaced by a pair for `id`.
    let with_pair = |id: &Identity| -> anyhow::Result<Secrets> {
        let (cert, key) = tls.pair(id)?;
        let mut s = secrets.clone();
        s.insert(cert_key.clone(), cert);
        s.insert(key_key.clone(), key);
        Ok(s)
    };
    let other_volume = Tls::csi("vol-other", "node-b");
    let other_node = Tls::csi("vol-mt", "node-a");

    with_pair_logs!(node_a, node_b, pair, async {
        let mut b = node_b.client().await?;
        let mut no_pair = secrets.clone();
        no_pair.remove(&cert_key);
        no_pair.remove(&key_key);
        let mut token_only = Secrets::new();
        token_only.insert(SECRET_TOKEN_KEY.into(), TOKEN.into());
        let cases = [
            // The plugin accepts only an engine of its certificate's volume as the server, so
            // it never reaches this volume's engines: nothing answers, retryable.
            (
                "another volume's pair",
                with_pair(&other_volume)?,
                Code::Unavailable,
                "expected an engine of e2e/vol-other",
            ),
            // A Secret must not let one node speak as another: refused before any call.
            (
                "node A's pair under node B's keys",
                with_pair(&other_node)?,
                Code::InvalidArgument,
                "not this node's CSI plugin",
            ),
            (
                "a CA but no pair for node B",
                no_pair,
                Code::InvalidArgument,
                "csi.node-b.crt",
            ),
            // Engines with TLS refuse the token alone.
            (
                "the token alone",
                token_only,
                Code::Unauthenticated,
                "requires mutual TLS",
            ),
        ];
        for (what, bad, want, says) in cases {
            match b
                .node
                .node_stage_volume(stage_request(id, &nb.staging, None, &ctx, &bad))
                .await
            {
                Err(s) if s.code() == want && s.message().contains(says) => {}
                other => anyhow::bail!("a stage with {what}: {other:?}"),
            }
            assert_clean_under(&nb.root);
            roles_unchanged(&pair).await?;
            anyhow::ensure!(
                pair.b.status().await?.nbd_connections == 0,
                "a stage with {what} attached to engine-b"
            );
        }

        // Whatever a plugin checks, the engine refuses these identities a takeover itself.
        for (what, id) in [("another volume", &other_volume), ("node A", &other_node)] {
            let (cert, key) = tls.pair(id)?;
            let creds = ClientTls::from_pem(tls.ca().cert_pem(), &cert, &key)?;
            let mut c = EngineClient::connect_with(&pair.b.grpc, Some(TOKEN), Some(&creds)).await?;
            match c
                .takeover("vol-mt", TakeoverPolicy::Wait, Duration::from_secs(10))
                .await
            {
                Err(e) if e.code() == Some(Code::PermissionDenied) => {}
                other => anyhow::bail!("a takeover as the CSI plugin of {what}: {other:?}"),
            }
        }
        roles_unchanged(&pair).await?;

        // The volume's own Secret: the stage takes over, through TLS, and the device works.
        // (Nothing is owed, so engine-a may already be a secondary again when it returns.)
        b.node
            .node_stage_volume(stage_request(id, &nb.staging, None, &ctx, &secrets))
            .await?;
        let (sa, sb) = (pair.a.status().await?, pair.b.status().await?);
        anyhow::ensure!(
            role(&sb) == EngineRole::Primary && sb.epoch == 2 && sb.nbd_connections >= 1,
            "engine-b: {sb:?}"
        );
        anyhow::ensure!(
            role(&sa) != EngineRole::Primary && sa.epoch == 2,
            "engine-a: {sa:?}"
        );
        b.node
            .node_publish_volume(publish_request(id, &nb.staging, &nb.target, None))
            .await?;
        dd_write(&nb.target, 0, 131, 1 << 20, &tmp)?;
        anyhow::ensure!(dd_read(&nb.target, 0, 1 << 20)? == pattern(131, 1 << 20));
        b.node.node_unpublish_volume(nb.unpublish(id)).await?;
        b.node.node_unstage_volume(nb.unstage(id)).await?;
        EnginePair::wait_converged(&pair.b, &pair.a, Duration::from_secs(120)).await?;
        scratch.assert_clean();
        Ok(())
    });
}

/// Issue 14: a snapshot taken on the primary (as the operator, over mutual TLS) while a pod's
/// O_DIRECT workload writes through the staged raw block device, then restored into a new
/// mirrored volume: `tandem-engine seed` reads the snapshot's export from the source engine's
/// unix socket into the new primary's fresh state dir, the new pair starts and converges, and both
/// of its replicas hold exactly the data at the snapshot's FLUSH point: every write acknowledged
/// before the call, none sent after it returned, the one in flight old or new per 4 KiB block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_under_load_restores_into_a_new_mirrored_volume() {
    if skip("snapshot_under_load_restores_into_a_new_mirrored_volume") {
        return;
    }
    let _serial = serial().await;
    const REGION: u64 = 32 << 20;
    const WRITE: usize = 64 << 10;
    let scratch = Scratch::new("snap-src").unwrap();
    let restored = Scratch::new("snap-dst").unwrap();
    let mut pair = Some(EnginePair::start(&scratch, "vol-src", "64M", TOKEN).unwrap());
    let plugin = Plugin::start(&scratch.path("node-a"), "node-a").unwrap();
    with_logs!(plugin, async {
        let src = pair.as_ref().context("pair")?;
        EnginePair::wait_converged(&src.a, &src.b, Duration::from_secs(60)).await?;
        let ctx = src.volume_context();
        let secrets = scratch.secrets("vol-src", TOKEN)?;
        let staging = scratch.path("kubelet/volumeDevices/staging/pv-src");
        let target = scratch.path("kubelet/pods/p1/volumeDevices/pv-src");
        std::fs::create_dir_all(&staging)?;
        std::fs::create_dir_all(target.parent().context("parent")?)?;
        let id = "default/pv-src";
        let mut c = plugin.client().await?;
        c.stage_and_publish(id, (&staging, &target), None, &ctx, &secrets)
            .await?;
        let writer = HistoryWriter::start(&target, REGION, WRITE, 1)?;
        writer.wait_acked(40, Duration::from_secs(60)).await?;
        // The operator's call, as the CSI controller makes it.
        let token = scratch.root.join("token");
        let before = writer.acked();
        let out = Command::new(tandem_testkit::Bin::Engine.path()?)
            .args([
                "snapshot",
                "create",
                "--grpc",
                &src.a.grpc,
                "--volume",
                "vol-src",
            ])
            .args(["--id", "snap-1", "--token-file"])
            .arg(&token)
            .arg("--tls-dir")
            .arg(scratch.tls.operator_dir())
            .output()?;
        let after = writer.acked();
        anyhow::ensure!(
            out.status.success(),
            "snapshot create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let info: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        anyhow::ensure!(info["ready"] == true, "{info}");
        let export = tandem_api::contract::snapshot_export("vol-src", "snap-1");
        anyhow::ensure!(info["export"] == export.as_str(), "{info}");
        writer
            .wait_acked(after + 40, Duration::from_secs(60))
            .await?;
        let history = writer.finish()?;
        anyhow::ensure!(
            (history.writes.len() as u64) * (WRITE as u64) < REGION,
            "the workload wrapped around its region: each offset must be written once"
        );
        c.unpublish_and_unstage(id, (&staging, &target)).await?;
        scratch.assert_clean();

        // The restore: seed the new primary's state dir from the source's export (its unix
        // socket, as the operator's init container would on the same node).
        let state = restored.path("a/state");
        let seed = Command::new(tandem_testkit::Bin::Engine.path()?)
            .args(["seed", "--from"])
            .arg(format!("unix:{}", src.a.socket().display()))
            .args(["--export", &export, "--state-dir"])
            .arg(&state)
            .args(["--volume", "vol-dst", "--size", "64M"])
            .output()?;
        anyhow::ensure!(
            seed.status.success(),
            "seed: {}",
            String::from_utf8_lossy(&seed.stderr)
        );
        // The source goes away (its network namespace too) before the new pair starts.
        pair.take();
        let dst = EnginePair::start(&restored, "vol-dst", "64M", TOKEN)?;
        EnginePair::wait_converged(&dst.a, &dst.b, Duration::from_secs(120)).await?;
        for e in [&dst.a, &dst.b] {
            let image = std::fs::read(e.data())?;
            anyhow::ensure!(image.len() == 64 << 20, "{} bytes", image.len());
            for (i, (offset, seed)) in history.writes.iter().enumerate() {
                let new = pattern(*seed, WRITE);
                for k in 0..WRITE / 4096 {
                    let at = *offset as usize + k * 4096;
                    let got = &image[at..at + 4096];
                    let is_new = got == &new[k * 4096..(k + 1) * 4096];
                    let is_old = got.iter().all(|&x| x == 0);
                    // Write i returned as the i+1-th acknowledgement.
                    let ok = if i < before {
                        is_new
                    } else if i > after {
                        is_old
                    } else {
                        is_new || is_old
                    };
                    anyhow::ensure!(
                        ok,
                        "{}: write #{i} (acked before the call: {}) block {k} at {at}: new {is_new}, old {is_old}",
                        e.data().display(),
                        i < before
                    );
                }
            }
            let written: std::collections::HashSet<u64> =
                history.writes.iter().map(|w| w.0 / WRITE as u64).collect();
            for chunk in 0..(64u64 << 20) / WRITE as u64 {
                if !written.contains(&chunk) {
                    let at = (chunk * WRITE as u64) as usize;
                    anyhow::ensure!(
                        image[at..at + WRITE].iter().all(|&x| x == 0),
                        "{}: never-written chunk {chunk} is not zeros",
                        e.data().display()
                    );
                }
            }
        }
        Ok(())
    });
}
