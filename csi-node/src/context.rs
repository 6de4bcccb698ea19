//! The contract with the operator: what a Tandem PersistentVolume's `volumeAttributes`
//! (CSI `volume_context`) and node-stage secrets carry.
//!
//! | key | value | required |
//! | --- | --- | --- |
//! | `tandem.dev/volume` | the engine's volume name (= NBD export name) | yes |
//! | `tandem.dev/engines` | `node=host:port,node=host:port`: each engine's gRPC address, by node name | yes |
//! | `tandem.dev/nbd` | `node=unix:/run/tandem/volumes/<key>/nbd.sock,...` in a cluster: each engine's NBD socket on its own node (the plugin uses only its own node's entry: NBD never crosses nodes); `node=host:port` still parses (tools, tests) | yes |
//! | `tandem.dev/failover-policy` | `WaitForPrimary` (default) or `ForcePromote`: parsed, reported, never acted on here (see [`FailoverPolicy`]) | no |
//! | `tandem.dev/peer-timeout-seconds` | how long a takeover may wait for the old primary (default 30) | no |
//! | `tandem.dev/secondary-access` | `None` (default), `ReadOnly` or `ReadWrite`: a read-only stage on the secondary's node opens a point-in-time view there (`ReadOnly`, `ReadWrite`) | no |
//! | `tandem.dev/secondary-read-mode` | `Snapshot` (default) or `Current`: with `ReadWrite`, a read-only stage on the secondary's node attaches the live secondary instead of a view | no |
//!
//! Stage secrets: `token`, the volume's engine token; `tandem-engines` and `tandem-nbd`, when present, replace the
//! two maps above ([`overlay_stage_secrets`]): the PV's attributes are immutable, the Secret follows a
//! live move of an engine to another node (issue 18).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tandem_api::contract::{
    ATTR_ENGINES, ATTR_FAILOVER_POLICY, ATTR_NBD, ATTR_PEER_TIMEOUT, ATTR_SECONDARY_ACCESS,
    ATTR_SECONDARY_READ_MODE, ATTR_VOLUME, SECRET_ENGINES_KEY, SECRET_NBD_KEY,
};

use crate::error::{Error, Result};

const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// The volume's failover policy: what the *operator* does when the old primary cannot be reached
/// (DESIGN.md §4 step 7). The plugin parses it (an unknown value is still INVALID_ARGUMENT, and it
/// is logged) but never acts on `ForcePromote`: with write leases, only the witness (the operator)
/// can wait out the old primary's lease and grant the new one, so a stage always asks for a handoff.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FailoverPolicy {
    #[default]
    WaitForPrimary,
    ForcePromote,
}

impl FailoverPolicy {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "waitforprimary" | "wait" => Some(FailoverPolicy::WaitForPrimary),
            "forcepromote" | "force" => Some(FailoverPolicy::ForcePromote),
            _ => None,
        }
    }
}

/// What the secondary engine serves hosts (`spec.secondaryAccess`, issue 18): `ReadOnly` is
/// point-in-time views only (snapshot exports, which a read-only stage opens), `ReadWrite` also
/// live sessions (writes forwarded to the primary, current reads).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SecondaryAccess {
    #[default]
    None,
    ReadOnly,
    ReadWrite,
}

impl SecondaryAccess {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" | "" => Some(SecondaryAccess::None),
            "readonly" | "read-only" => Some(SecondaryAccess::ReadOnly),
            "readwrite" | "read-write" => Some(SecondaryAccess::ReadWrite),
            _ => None,
        }
    }
}

/// What a read-only stage on the secondary's node reads (`tandem.dev/secondary-read-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SecondaryReadMode {
    /// A point-in-time view: consistent, frozen for as long as the stage lasts.
    #[default]
    Snapshot,
    /// The live secondary (needs `ReadWrite`): current, but a mounted filesystem sees a device
    /// that changes under it.
    Current,
}

impl SecondaryReadMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "snapshot" | "" => Some(SecondaryReadMode::Snapshot),
            "current" => Some(SecondaryReadMode::Current),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineRef {
    pub node: String,
    pub grpc: String,
    pub nbd: String,
}

/// The volume context, parsed and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeParams {
    pub volume: String,
    pub engines: Vec<EngineRef>,
    pub policy: FailoverPolicy,
    pub peer_timeout: Duration,
    pub secondary_access: SecondaryAccess,
    pub secondary_read_mode: SecondaryReadMode,
}

/// Parses `node=addr,node=addr` (whitespace around items allowed).
pub fn parse_node_map(key: &str, value: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (node, addr) = item
            .split_once('=')
            .map(|(n, a)| (n.trim(), a.trim()))
            .filter(|(n, a)| !n.is_empty() && !a.is_empty())
            .ok_or_else(|| Error::invalid(key, format!("{item:?} is not node=address")))?;
        if out.insert(node.to_string(), addr.to_string()).is_some() {
            return Err(Error::invalid(key, format!("node {node:?} listed twice")));
        }
    }
    if out.is_empty() {
        return Err(Error::invalid(key, "no engines listed"));
    }
    Ok(out)
}

/// The engine maps of the stage Secret, where it has them, win over the PV's attributes: the operator
/// keeps the Secret current when an engine moves to another node, the PV's attributes cannot change.
/// An empty entry is ignored (the PV's stands); a malformed one is refused by [`VolumeParams::parse`]
/// under the attribute's name, like a malformed attribute.
pub fn overlay_stage_secrets(ctx: &mut HashMap<String, String>, secrets: &HashMap<String, String>) {
    for (secret, attr) in [
        (SECRET_ENGINES_KEY, ATTR_ENGINES),
        (SECRET_NBD_KEY, ATTR_NBD),
    ] {
        if let Some(v) = secrets.get(secret).filter(|v| !v.trim().is_empty()) {
            ctx.insert(attr.to_string(), v.clone());
        }
    }
}

impl VolumeParams {
    pub fn parse(ctx: &HashMap<String, String>) -> Result<Self> {
        let required = |key: &'static str| -> Result<&String> {
            ctx.get(key)
                .filter(|v| !v.trim().is_empty())
                .ok_or(Error::FieldMissing(key))
        };
        let volume = required(ATTR_VOLUME)?.trim().to_string();
        let grpc = parse_node_map(ATTR_ENGINES, required(ATTR_ENGINES)?)?;
        let mut nbd = parse_node_map(ATTR_NBD, required(ATTR_NBD)?)?;
        let mut engines = Vec::new();
        for (node, grpc) in grpc {
            let nbd = nbd.remove(&node).ok_or_else(|| {
                Error::invalid(ATTR_NBD, format!("no NBD address for node {node:?}"))
            })?;
            crate::nbd::NbdAddr::parse(&nbd)
                .map_err(|e| Error::invalid(ATTR_NBD, e.to_string()))?;
            engines.push(EngineRef { node, grpc, nbd });
        }
        if let Some(extra) = nbd.keys().next() {
            return Err(Error::invalid(
                ATTR_NBD,
                format!("node {extra:?} has an NBD address but no engine"),
            ));
        }
        let policy = match ctx.get(ATTR_FAILOVER_POLICY) {
            None => FailoverPolicy::default(),
            Some(v) => FailoverPolicy::parse(v).ok_or_else(|| {
                Error::invalid(
                    ATTR_FAILOVER_POLICY,
                    format!("{v:?}: expected WaitForPrimary or ForcePromote"),
                )
            })?,
        };
        let peer_timeout = match ctx.get(ATTR_PEER_TIMEOUT) {
            None => DEFAULT_PEER_TIMEOUT,
            Some(v) => v
                .trim()
                .trim_end_matches('s')
                .parse::<u64>()
                .ok()
                .filter(|s| (1..=3600).contains(s))
                .map(Duration::from_secs)
                .ok_or_else(|| {
                    Error::invalid(
                        ATTR_PEER_TIMEOUT,
                        format!("{v:?}: expected 1..3600 seconds"),
                    )
                })?,
        };
        let secondary_access = match ctx.get(ATTR_SECONDARY_ACCESS) {
            None => SecondaryAccess::default(),
            Some(v) => SecondaryAccess::parse(v).ok_or_else(|| {
                Error::invalid(
                    ATTR_SECONDARY_ACCESS,
                    format!("{v:?}: expected None, ReadOnly or ReadWrite"),
                )
            })?,
        };
        let secondary_read_mode = match ctx.get(ATTR_SECONDARY_READ_MODE) {
            None => SecondaryReadMode::default(),
            Some(v) => SecondaryReadMode::parse(v).ok_or_else(|| {
                Error::invalid(
                    ATTR_SECONDARY_READ_MODE,
                    format!("{v:?}: expected Snapshot or Current"),
                )
            })?,
        };
        if secondary_read_mode == SecondaryReadMode::Current
            && secondary_access != SecondaryAccess::ReadWrite
        {
            return Err(Error::invalid(
                ATTR_SECONDARY_READ_MODE,
                format!(
                    "Current reads from the live secondary, which only secondaryAccess ReadWrite \
                     serves (it is {secondary_access:?})"
                ),
            ));
        }
        Ok(VolumeParams {
            volume,
            engines,
            policy,
            peer_timeout,
            secondary_access,
            secondary_read_mode,
        })
    }
}

#[cfg(test)]
pub(crate) fn test_context(volume: &str, nodes: &[&str]) -> HashMap<String, String> {
    let engines = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{n}=10.0.0.{}:7000", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let nbd = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{n}=10.0.0.{}:10809", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    HashMap::from([
        (ATTR_VOLUME.to_string(), volume.to_string()),
        (ATTR_ENGINES.to_string(), engines),
        (ATTR_NBD.to_string(), nbd),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stage_secret_maps_win_over_the_pv_attributes() {
        let mut ctx = test_context("v", &["n1", "n2"]);
        let secrets = HashMap::from([
            ("token".to_string(), "t".to_string()),
            (
                SECRET_ENGINES_KEY.to_string(),
                "n1=e-a:9500,n3=e-b-m1:9500".to_string(),
            ),
            (
                SECRET_NBD_KEY.to_string(),
                "n1=unix:/run/tandem/volumes/k/nbd.sock,n3=unix:/run/tandem/volumes/k/nbd.sock"
                    .to_string(),
            ),
        ]);
        overlay_stage_secrets(&mut ctx, &secrets);
        let p = VolumeParams::parse(&ctx).unwrap();
        let nodes: Vec<(&str, &str)> = p
            .engines
            .iter()
            .map(|e| (e.node.as_str(), e.grpc.as_str()))
            .collect();
        assert_eq!(nodes, [("n1", "e-a:9500"), ("n3", "e-b-m1:9500")]);
        assert_eq!(p.engines[1].nbd, "unix:/run/tandem/volumes/k/nbd.sock");
    }

    #[test]
    fn without_secret_maps_the_pv_attributes_stand() {
        let mut ctx = test_context("v", &["n1", "n2"]);
        let before = ctx.clone();
        let secrets = HashMap::from([
            ("token".to_string(), "t".to_string()),
            (SECRET_ENGINES_KEY.to_string(), "  ".to_string()),
        ]);
        overlay_stage_secrets(&mut ctx, &secrets);
        assert_eq!(ctx, before);
    }

    #[test]
    fn a_malformed_secret_map_is_refused_by_its_attribute_name() {
        let mut ctx = test_context("v", &["n1", "n2"]);
        let secrets = HashMap::from([(SECRET_ENGINES_KEY.to_string(), "n1".to_string())]);
        overlay_stage_secrets(&mut ctx, &secrets);
        let err = VolumeParams::parse(&ctx).unwrap_err();
        assert!(err.to_string().contains(ATTR_ENGINES), "{err}");
    }

    #[test]
    fn parses_the_operator_contract() {
        let mut ctx = test_context("vol-a", &["node-a", "node-b"]);
        ctx.insert(ATTR_FAILOVER_POLICY.into(), "ForcePromote".into());
        ctx.insert(ATTR_PEER_TIMEOUT.into(), "12".into());
        ctx.insert(ATTR_SECONDARY_ACCESS.into(), "ReadOnly".into());
        let p = VolumeParams::parse(&ctx).unwrap();
        assert_eq!(p.volume, "vol-a");
        assert_eq!(p.engines.len(), 2);
        assert_eq!(p.engines[0].node, "node-a");
        assert_eq!(p.engines[0].grpc, "10.0.0.1:7000");
        assert_eq!(p.engines[1].nbd, "10.0.0.2:10809");
        assert_eq!(p.policy, FailoverPolicy::ForcePromote);
        assert_eq!(p.peer_timeout, Duration::from_secs(12));
        assert_eq!(p.secondary_access, SecondaryAccess::ReadOnly);
        assert_eq!(p.secondary_read_mode, SecondaryReadMode::Snapshot);
        ctx.insert(ATTR_SECONDARY_ACCESS.into(), "ReadWrite".into());
        ctx.insert(ATTR_SECONDARY_READ_MODE.into(), "Current".into());
        let p = VolumeParams::parse(&ctx).unwrap();
        assert_eq!(p.secondary_read_mode, SecondaryReadMode::Current);
    }

    #[test]
    fn parses_per_node_unix_sockets() {
        let mut ctx = test_context("vol-a", &["node-a", "node-b"]);
        ctx.insert(
            ATTR_NBD.into(),
            "node-a=unix:/run/tandem/volumes/k/nbd.sock, node-b=unix:/run/tandem/volumes/k/nbd.sock"
                .into(),
        );
        let p = VolumeParams::parse(&ctx).unwrap();
        for e in &p.engines {
            assert_eq!(e.nbd, "unix:/run/tandem/volumes/k/nbd.sock");
            assert_eq!(
                crate::nbd::NbdAddr::parse(&e.nbd).unwrap(),
                crate::nbd::NbdAddr::Unix("/run/tandem/volumes/k/nbd.sock".into())
            );
        }
        ctx.insert(
            ATTR_NBD.into(),
            "node-a=unix:run/nbd.sock,node-b=unix:/x".into(),
        );
        assert!(VolumeParams::parse(&ctx).is_err(), "a relative socket path");
    }

    #[test]
    fn defaults_to_waiting_for_the_primary() {
        let p = VolumeParams::parse(&test_context("v", &["a"])).unwrap();
        assert_eq!(p.policy, FailoverPolicy::WaitForPrimary);
        assert_eq!(p.peer_timeout, DEFAULT_PEER_TIMEOUT);
        assert_eq!(p.secondary_access, SecondaryAccess::None);
    }

    #[test]
    fn rejects_bad_contexts() {
        for (key, value) in [
            (ATTR_VOLUME, ""),
            (ATTR_ENGINES, "a"),
            (ATTR_ENGINES, "a=1.2.3.4:5,a=1.2.3.4:6"),
            (ATTR_NBD, "b=10.0.0.1:10809"),
            (ATTR_NBD, "a=nonsense"),
            (ATTR_FAILOVER_POLICY, "sometimes"),
            (ATTR_PEER_TIMEOUT, "0"),
            (ATTR_SECONDARY_ACCESS, "sometimes"),
            (ATTR_SECONDARY_READ_MODE, "sometimes"),
            // Current reads need a ReadWrite secondary (here: None).
            (ATTR_SECONDARY_READ_MODE, "Current"),
        ] {
            let mut ctx = test_context("v", &["a"]);
            ctx.insert(key.into(), value.into());
            let err = VolumeParams::parse(&ctx).unwrap_err();
            assert_eq!(
                err.code(),
                tonic::Code::InvalidArgument,
                "{key}={value}: {err}"
            );
        }
        let mut ctx = test_context("v", &["a"]);
        ctx.remove(ATTR_NBD);
        assert!(matches!(
            VolumeParams::parse(&ctx),
            Err(Error::FieldMissing(ATTR_NBD))
        ));
    }
}
