//! Who a certificate speaks for, written as a SPIFFE-style URI SAN:
//!
//! | identity | URI |
//! |---|---|
//! | an engine of a volume | `spiffe://tandem.dev/ns/<namespace>/volume/<name>/engine` |
//! | the CSI node plugin, for one volume on one node | `spiffe://tandem.dev/ns/<namespace>/volume/<name>/csi/<node>` |
//! | the operator (the witness, all volumes) | `spiffe://tandem.dev/operator` |
//!
//! Namespaces, volume and node names are Kubernetes names: no `/`, so the path splits without
//! escaping. Outside a cluster (tools, tests) any namespace string works, e.g. `local`.

use std::fmt;

/// The trust domain every Tandem identity lives in.
pub const TRUST_DOMAIN: &str = "tandem.dev";

/// A volume as the cluster names it: namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeRef {
    pub namespace: String,
    pub name: String,
}

impl VolumeRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for VolumeRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Who is on the other end of a channel.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// One of the volume's two engines (replication, handoff, proxied reads, lease renewal).
    Engine { volume: VolumeRef },
    /// The CSI node plugin on `node`, for this volume only.
    Csi { volume: VolumeRef, node: String },
    /// The operator: control of every volume (witness grants, forced promotion, failback).
    Operator,
}

/// A URI SAN that is not a Tandem identity.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{uri:?} is not a Tandem identity ({why})")]
pub struct BadIdentity {
    pub uri: String,
    pub why: &'static str,
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

impl Identity {
    /// The volume this identity is scoped to (None for the operator).
    pub fn volume(&self) -> Option<&VolumeRef> {
        match self {
            Identity::Engine { volume } | Identity::Csi { volume, .. } => Some(volume),
            Identity::Operator => None,
        }
    }

    /// The URI SAN form.
    pub fn uri(&self) -> String {
        let base = format!("spiffe://{TRUST_DOMAIN}");
        match self {
            Identity::Operator => format!("{base}/operator"),
            Identity::Engine { volume } => format!(
                "{base}/ns/{}/volume/{}/engine",
                volume.namespace, volume.name
            ),
            Identity::Csi { volume, node } => format!(
                "{base}/ns/{}/volume/{}/csi/{node}",
                volume.namespace, volume.name
            ),
        }
    }

    /// Parses the URI SAN form; anything else (another trust domain, a stray segment, an empty or
    /// odd name) is refused.
    pub fn parse(uri: &str) -> Result<Self, BadIdentity> {
        let bad = |why| BadIdentity {
            uri: uri.to_string(),
            why,
        };
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("not a spiffe:// URI"))?;
        let (domain, path) = rest.split_once('/').ok_or_else(|| bad("no path"))?;
        if domain != TRUST_DOMAIN {
            return Err(bad("another trust domain"));
        }
        let parts: Vec<&str> = path.split('/').collect();
        if parts.iter().any(|p| !valid_segment(p)) {
            return Err(bad("empty or invalid path segment"));
        }
        match parts.as_slice() {
            ["operator"] => Ok(Identity::Operator),
            ["ns", ns, "volume", name, "engine"] => Ok(Identity::Engine {
                volume: VolumeRef::new(*ns, *name),
            }),
            ["ns", ns, "volume", name, "csi", node] => Ok(Identity::Csi {
                volume: VolumeRef::new(*ns, *name),
                node: (*node).to_string(),
            }),
            _ => Err(bad("unknown path")),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Operator => write!(f, "operator"),
            Identity::Engine { volume } => write!(f, "engine of {volume}"),
            Identity::Csi { volume, node } => write!(f, "CSI plugin on {node} for {volume}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_identity_round_trips_through_its_uri() {
        let v = VolumeRef::new("team-a", "db.data");
        for id in [
            Identity::Operator,
            Identity::Engine { volume: v.clone() },
            Identity::Csi {
                volume: v,
                node: "node-1".into(),
            },
        ] {
            assert_eq!(Identity::parse(&id.uri()), Ok(id.clone()), "{id}");
        }
    }

    #[test]
    fn foreign_or_malformed_uris_are_refused() {
        for uri in [
            "spiffe://example.org/operator",
            "https://tandem.dev/operator",
            "spiffe://tandem.dev/operator/extra",
            "spiffe://tandem.dev/ns//volume/v/engine",
            "spiffe://tandem.dev/ns/a/volume/v/peer",
            "spiffe://tandem.dev/ns/a/volume/v/csi",
            "spiffe://tandem.dev/ns/a b/volume/v/engine",
            "spiffe://tandem.dev",
        ] {
            assert!(Identity::parse(uri).is_err(), "{uri} parsed");
        }
    }
}
