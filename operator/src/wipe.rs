//! The deletion's wipe: one short pod per engine node that runs `tandem-engine wipe` on the volume's
//! host directories once its engines are gone (`controller::cleanup` drives it). Pure builders only.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, HostPathVolumeSource, Pod, PodSpec, SecurityContext, Toleration,
    Volume, VolumeMount,
};
use kube::api::ObjectMeta;

use crate::{
    crd::{MirroredVolume, Slot},
    plan::{self, names, EngineConfig, HOST_VOLUMES_DIR},
};

/// Label on wipe pods: the slot whose node they clean (engine pods carry `tandem.dev/slot` instead).
pub const WIPE_LABEL: &str = "tandem.dev/wipe";
/// Where the wipe pod sees the parent of the volume's data directory.
const HOST_MOUNT: &str = "/host";

/// `<key>-wipe-<slot>`.
pub fn pod_name(key: &str, slot: Slot) -> String {
    format!("{key}-wipe-{}", slot.as_str())
}

/// The wipe pod for the node of `slot`. `data_dir` is the engines' host directory (hostPath storage;
/// `None` with engine PVCs, whose deletion is their wipe): its `state` and `data.img` go, then the
/// directory. The volume's socket directory `/run/tandem/volumes/<key>` goes in any case.
///
/// Pinned with `nodeName` and tolerating every taint: it must run on that node even when it is
/// cordoned or tainted, which is when volumes are deleted to empty it.
pub fn pod(
    mv: &MirroredVolume,
    slot: Slot,
    node: &str,
    data_dir: Option<&str>,
    cfg: &EngineConfig,
) -> Pod {
    named(
        mv,
        pod_name(&plan::key(mv), slot),
        slot,
        node,
        data_dir,
        cfg,
    )
}

/// A wipe pod named `name` (a live move's: `plan::names::move_wipe`), otherwise as [`pod`].
pub fn named(
    mv: &MirroredVolume,
    name: String,
    slot: Slot,
    node: &str,
    data_dir: Option<&str>,
    cfg: &EngineConfig,
) -> Pod {
    let key = plan::key(mv);
    let run_dir = names::host_dir(&key);
    let mut args = vec!["wipe".to_string()];
    let mut mounts = vec![VolumeMount {
        name: "run".into(),
        mount_path: HOST_VOLUMES_DIR.into(),
        ..Default::default()
    }];
    let mut volumes = vec![host_volume("run", HOST_VOLUMES_DIR)];
    if let Some(dir) = data_dir {
        let dir = dir.trim_end_matches('/');
        // The parent is mounted, not the directory itself, so the directory can be removed too.
        let (parent, leaf) = dir.rsplit_once('/').unwrap_or(("", dir));
        let parent = if parent.is_empty() { "/" } else { parent };
        args.extend([
            "--state-dir".into(),
            format!("{HOST_MOUNT}/{leaf}/state"),
            "--data".into(),
            format!("{HOST_MOUNT}/{leaf}/data.img"),
        ]);
        mounts.push(VolumeMount {
            name: "host".into(),
            mount_path: HOST_MOUNT.into(),
            ..Default::default()
        });
        volumes.push(host_volume("host", parent));
    }
    args.extend(["--run-dir".into(), run_dir]);
    let mut labels: BTreeMap<String, String> = plan::labels(mv);
    labels.insert(WIPE_LABEL.to_string(), slot.as_str().to_string());
    let mut pod = Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(cfg.namespace.clone()),
            labels: Some(labels),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.to_string()),
            tolerations: Some(vec![Toleration {
                operator: Some("Exists".into()),
                ..Default::default()
            }]),
            restart_policy: Some("OnFailure".into()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            priority_class_name: cfg.priority_class.clone(),
            containers: vec![Container {
                name: "wipe".into(),
                image: Some(cfg.image.clone()),
                image_pull_policy: cfg.image_pull_policy.clone(),
                args: Some(args),
                volume_mounts: Some(mounts),
                security_context: Some(SecurityContext {
                    allow_privilege_escalation: Some(false),
                    read_only_root_filesystem: Some(true),
                    capabilities: Some(Capabilities {
                        drop: Some(vec!["ALL".into()]),
                        add: None,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            volumes: Some(volumes),
            ..Default::default()
        }),
        status: None,
    };
    // Pull secrets and tolerations reach the wipe pod too: it must run where the engine ran.
    cfg.pod.apply(&mut pod);
    pod
}

fn host_volume(name: &str, path: &str) -> Volume {
    Volume {
        name: name.into(),
        host_path: Some(HostPathVolumeSource {
            path: path.into(),
            type_: Some("DirectoryOrCreate".into()),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wipe_pod_targets_the_volume_dirs_on_its_node() {
        let mv = MirroredVolume::test();
        let cfg = EngineConfig::default();
        let dir = "/var/lib/tandem/default/data-0c6a0d1e-0000-4000-8000-000000000001";
        let pod = pod(&mv, Slot::B, "n2", Some(dir), &cfg);
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("n2"));
        assert_eq!(spec.restart_policy.as_deref(), Some("OnFailure"));
        let args = spec.containers[0].args.clone().unwrap();
        let key = plan::key(&mv);
        assert_eq!(
            args,
            vec![
                "wipe".to_string(),
                "--state-dir".into(),
                "/host/data-0c6a0d1e-0000-4000-8000-000000000001/state".into(),
                "--data".into(),
                "/host/data-0c6a0d1e-0000-4000-8000-000000000001/data.img".into(),
                "--run-dir".into(),
                format!("/run/tandem/volumes/{key}"),
            ]
        );
        let host = spec.volumes.as_ref().unwrap()[1].host_path.clone().unwrap();
        assert_eq!(host.path, "/var/lib/tandem/default");
        let labels = pod.metadata.labels.unwrap();
        assert_eq!(labels[WIPE_LABEL], "b");
        assert!(
            !labels.contains_key(crate::observed::SLOT_LABEL),
            "not counted as an engine"
        );

        // Engine PVCs: only the socket dir.
        let pvc = super::pod(&mv, Slot::A, "n1", None, &cfg);
        let args = pvc.spec.unwrap().containers[0].args.clone().unwrap();
        assert_eq!(
            args,
            vec![
                "wipe".to_string(),
                "--run-dir".into(),
                format!("/run/tandem/volumes/{key}")
            ]
        );
    }
}
