//! Where a volume's two engines go: a pure function from the candidate nodes and the volume's wishes to a
//! `[primary, secondary]` pair, or a refusal that says what is missing. No I/O; the reconciler gathers the
//! candidates (`controller::observe`) and records the answer in `status.placement`.
//!
//! Rules, in order: a node must exist, be Ready, not cordoned, carry no NoSchedule/NoExecute taint the
//! engine pods do not tolerate (they tolerate none), and be in `allowedNodes` when that is set. A required
//! primary (the node holding a restore's snapshot) or else a preferred one (WaitForFirstConsumer) takes
//! slot a when it fits; otherwise the node with the fewest engines. The secondary is the fewest-engines
//! node left, in another zone than the primary whenever the fitting nodes span two zones. Ties break by
//! a hash of the volume key and the node name, so equal nodes share the load instead of the first by
//! name taking everything.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Node;

/// The well-known zone label.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

pub const PLACED: &str = "Placed";
pub const NO_PAIR_FITS: &str = "NoPairFits";
pub const PREFERRED_PRIMARY_UNAVAILABLE: &str = "PreferredPrimaryUnavailable";
pub const SNAPSHOT_NODE_UNAVAILABLE: &str = "SnapshotNodeUnavailable";

/// A node the selector matched, reduced to what placement looks at.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Candidate {
    pub name: String,
    pub zone: Option<String>,
    pub ready: bool,
    /// `spec.unschedulable` (cordoned).
    pub unschedulable: bool,
    /// NoSchedule/NoExecute taints the engine pods do not tolerate, as `key=value:Effect`.
    pub blocking_taints: Vec<String>,
    /// Tandem engine pods already on the node (any volume).
    pub engines: u32,
}

impl Candidate {
    /// From a Node object and the number of engines it runs.
    pub fn from_node(node: &Node, engines: u32) -> Self {
        let spec = node.spec.as_ref();
        let ready = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == "True");
        let mut unschedulable = spec.and_then(|s| s.unschedulable).unwrap_or(false);
        let mut blocking_taints = Vec::new();
        for t in spec.and_then(|s| s.taints.as_ref()).into_iter().flatten() {
            if t.key == crate::observed::UNSCHEDULABLE_TAINT {
                unschedulable = true;
            } else if t.effect == "NoSchedule" || t.effect == "NoExecute" {
                let value = t
                    .value
                    .as_deref()
                    .map(|v| format!("={v}"))
                    .unwrap_or_default();
                blocking_taints.push(format!("{}{value}:{}", t.key, t.effect));
            }
        }
        Candidate {
            name: node.metadata.name.clone().unwrap_or_default(),
            zone: node
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(ZONE_LABEL))
                .cloned(),
            ready,
            unschedulable,
            blocking_taints,
            engines,
        }
    }

    /// Why the engines cannot run here, if they cannot.
    fn unfit(&self, allowed: Option<&[String]>) -> Option<String> {
        if !self.ready {
            return Some("not Ready".into());
        }
        if self.unschedulable {
            return Some("cordoned".into());
        }
        if let Some(t) = self.blocking_taints.first() {
            return Some(format!("tainted {t}"));
        }
        if allowed.is_some_and(|a| !a.contains(&self.name)) {
            return Some("not in allowedNodes".into());
        }
        None
    }
}

/// What the volume asks of its placement.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Wishes<'a> {
    /// The volume's key: the tie-breaker's seed.
    pub key: &'a str,
    /// `spec.placement.allowedNodes` (CSI accessibility requirements).
    pub allowed_nodes: Option<&'a [String]>,
    /// `spec.placement.preferredPrimary` (the node the scheduler chose for the first consumer).
    pub preferred_primary: Option<&'a str>,
    /// The primary must be here (a restore reads the snapshot from this node's engine socket).
    pub required_primary: Option<&'a str>,
}

/// A placement or a refusal: `reason` is `Placed` or why not; `message` is for humans.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub reason: &'static str,
    pub message: String,
    /// `[primary, secondary]` when placed.
    pub nodes: Option<[String; 2]>,
}

impl Decision {
    fn refuse(reason: &'static str, message: String) -> Self {
        Decision {
            reason,
            message,
            nodes: None,
        }
    }
}

/// FNV-1a of `key/node`: stable across builds, so a volume's tie-break never changes between passes.
fn tie(key: &str, node: &str) -> u64 {
    format!("{key}/{node}")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

/// Chooses `[primary, secondary]` for a volume.
pub fn place(wishes: &Wishes, candidates: &[Candidate]) -> Decision {
    let mut fit: Vec<&Candidate> = Vec::new();
    let mut excluded: Vec<String> = Vec::new();
    for c in candidates {
        match c.unfit(wishes.allowed_nodes) {
            None => fit.push(c),
            Some(why) => excluded.push(format!("{} ({why})", c.name)),
        }
    }
    // Fewest engines first, then the volume's own hash order.
    fit.sort_by_key(|c| (c.engines, tie(wishes.key, &c.name)));
    let why_not = |name: &str| -> String {
        match candidates.iter().find(|c| c.name == name) {
            None => format!(
                "node {name} is not among the {} node(s) the selector matches",
                candidates.len()
            ),
            Some(c) => format!(
                "node {name} cannot run an engine: {}",
                c.unfit(wishes.allowed_nodes).unwrap_or_default()
            ),
        }
    };
    let summary = || {
        let mut s = format!(
            "{} node(s) match the selector, {} fit",
            candidates.len(),
            fit.len()
        );
        if !excluded.is_empty() {
            s.push_str(&format!("; excluded: {}", excluded.join(", ")));
        }
        s
    };
    let find = |name: &str| fit.iter().copied().find(|c| c.name == name);
    let primary = if let Some(required) = wishes.required_primary {
        match find(required) {
            Some(c) => c,
            None => {
                return Decision::refuse(
                    SNAPSHOT_NODE_UNAVAILABLE,
                    format!(
                        "the restore source is on node {required}, so the primary must be there: {} ({})",
                        why_not(required),
                        summary()
                    ),
                )
            }
        }
    } else if let Some(preferred) = wishes.preferred_primary {
        match find(preferred) {
            Some(c) => c,
            None => {
                return Decision::refuse(
                    PREFERRED_PRIMARY_UNAVAILABLE,
                    format!(
                        "the consumer was scheduled to node {preferred}: {} ({})",
                        why_not(preferred),
                        summary()
                    ),
                )
            }
        }
    } else {
        match fit.first() {
            Some(c) => c,
            None => {
                return Decision::refuse(
                    NO_PAIR_FITS,
                    format!("two nodes are needed: {}", summary()),
                )
            }
        }
    };
    let zones: BTreeSet<&str> = fit.iter().filter_map(|c| c.zone.as_deref()).collect();
    let spread = zones.len() >= 2;
    let secondary = fit.iter().copied().find(|c| {
        c.name != primary.name && (!spread || c.zone.is_some() && c.zone != primary.zone)
    });
    let Some(secondary) = secondary else {
        return Decision::refuse(
            NO_PAIR_FITS,
            format!(
                "no second node for the secondary next to {}: {}",
                primary.name,
                summary()
            ),
        );
    };
    let describe = |c: &Candidate| {
        format!(
            "{} ({}{} engine(s))",
            c.name,
            c.zone
                .as_deref()
                .map(|z| format!("zone {z}, "))
                .unwrap_or_default(),
            c.engines
        )
    };
    let why = if wishes.required_primary.is_some() {
        "the restore source's node"
    } else if wishes.preferred_primary.is_some() {
        "the consumer's node"
    } else {
        "fewest engines"
    };
    Decision {
        reason: PLACED,
        message: format!(
            "primary on {} ({why}), secondary on {}{}",
            describe(primary),
            describe(secondary),
            if spread { " in another zone" } else { "" }
        ),
        nodes: Some([primary.name.clone(), secondary.name.clone()]),
    }
}

/// Counts engines per node from pods: `spec.nodeName`, or before scheduling the node the pod is pinned to.
pub fn engines_per_node<'a>(
    pods: impl IntoIterator<Item = &'a k8s_openapi::api::core::v1::Pod>,
) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    for pod in pods {
        let Some(spec) = pod.spec.as_ref() else {
            continue;
        };
        let pinned = spec
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|n| {
                n.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .and_then(|s| s.node_selector_terms.first())
            .and_then(|t| t.match_fields.as_ref())
            .and_then(|f| f.first())
            .and_then(|f| f.values.as_ref())
            .and_then(|v| v.first());
        if let Some(node) = spec.node_name.as_ref().or(pinned) {
            *out.entry(node.clone()).or_insert(0) += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, zone: Option<&str>, engines: u32) -> Candidate {
        Candidate {
            name: name.into(),
            zone: zone.map(str::to_string),
            ready: true,
            engines,
            ..Default::default()
        }
    }

    fn wishes(key: &str) -> Wishes<'_> {
        Wishes {
            key,
            ..Default::default()
        }
    }

    fn pair(d: &Decision) -> [&str; 2] {
        let n = d.nodes.as_ref().unwrap_or_else(|| panic!("refused: {d:?}"));
        [n[0].as_str(), n[1].as_str()]
    }

    #[test]
    fn table() {
        let cordoned = Candidate {
            unschedulable: true,
            ..node("c", None, 0)
        };
        let tainted = Candidate {
            blocking_taints: vec!["gpu=true:NoSchedule".into()],
            ..node("t", None, 0)
        };
        let down = Candidate {
            ready: false,
            ..node("d", None, 0)
        };
        let allowed = vec!["a".to_string(), "b".to_string()];
        struct Case<'a> {
            name: &'a str,
            wishes: Wishes<'a>,
            nodes: Vec<Candidate>,
            want: Result<[&'a str; 2], &'a str>,
        }
        let cases = vec![
            Case {
                name: "fewest engines first",
                wishes: wishes("k"),
                nodes: vec![node("a", None, 5), node("b", None, 1), node("c", None, 0)],
                want: Ok(["c", "b"]),
            },
            Case {
                name: "unfit nodes are skipped even when empty",
                wishes: wishes("k"),
                nodes: vec![
                    cordoned.clone(),
                    tainted.clone(),
                    down.clone(),
                    node("a", None, 3),
                    node("b", None, 4),
                ],
                want: Ok(["a", "b"]),
            },
            Case {
                name: "zones: the secondary goes to another zone even when fuller",
                wishes: wishes("k"),
                nodes: vec![
                    node("a1", Some("z1"), 0),
                    node("a2", Some("z1"), 0),
                    node("b1", Some("z2"), 7),
                ],
                want: Err("a?"),
            },
            Case {
                name: "one node only",
                wishes: wishes("k"),
                nodes: vec![node("a", None, 0), down.clone()],
                want: Err(NO_PAIR_FITS),
            },
            Case {
                name: "no node",
                wishes: wishes("k"),
                nodes: vec![],
                want: Err(NO_PAIR_FITS),
            },
            Case {
                name: "allowedNodes",
                wishes: Wishes {
                    allowed_nodes: Some(&allowed),
                    ..wishes("k")
                },
                nodes: vec![node("a", None, 8), node("b", None, 9), node("c", None, 0)],
                want: Ok(["a", "b"]),
            },
            Case {
                name: "WaitForFirstConsumer: the consumer's node is primary though fuller",
                wishes: Wishes {
                    preferred_primary: Some("b"),
                    ..wishes("k")
                },
                nodes: vec![node("a", None, 0), node("b", None, 9), node("c", None, 1)],
                want: Ok(["b", "a"]),
            },
            Case {
                name: "WaitForFirstConsumer on a cordoned node is refused",
                wishes: Wishes {
                    preferred_primary: Some("c"),
                    ..wishes("k")
                },
                nodes: vec![node("a", None, 0), node("b", None, 0), cordoned.clone()],
                want: Err(PREFERRED_PRIMARY_UNAVAILABLE),
            },
            Case {
                name: "restore: primary on the snapshot's node",
                wishes: Wishes {
                    required_primary: Some("b"),
                    preferred_primary: Some("a"),
                    ..wishes("k")
                },
                nodes: vec![node("a", None, 0), node("b", None, 3), node("c", None, 1)],
                want: Ok(["b", "a"]),
            },
            Case {
                name: "restore: snapshot node tainted",
                wishes: Wishes {
                    required_primary: Some("t"),
                    ..wishes("k")
                },
                nodes: vec![node("a", None, 0), node("b", None, 0), tainted.clone()],
                want: Err(SNAPSHOT_NODE_UNAVAILABLE),
            },
            Case {
                name: "restore: snapshot node not matched at all",
                wishes: Wishes {
                    required_primary: Some("zz"),
                    ..wishes("k")
                },
                nodes: vec![node("a", None, 0), node("b", None, 0)],
                want: Err(SNAPSHOT_NODE_UNAVAILABLE),
            },
        ];
        for case in cases {
            let d = place(&case.wishes, &case.nodes);
            match case.want {
                Ok(want) => assert_eq!(pair(&d), want, "{}: {d:?}", case.name),
                // The zone case: primary in z1 (either), secondary the only z2 node.
                Err("a?") => {
                    let [p, s] = pair(&d);
                    assert!(p.starts_with('a') && s == "b1", "{}: {d:?}", case.name);
                }
                Err(reason) => {
                    assert_eq!(d.reason, reason, "{}: {d:?}", case.name);
                    assert!(d.nodes.is_none());
                }
            }
        }
    }

    #[test]
    fn a_refusal_says_what_is_missing() {
        let nodes = vec![
            node("a", None, 0),
            Candidate {
                unschedulable: true,
                ..node("c", None, 0)
            },
            Candidate {
                blocking_taints: vec!["gpu=true:NoSchedule".into()],
                ..node("t", None, 0)
            },
        ];
        let d = place(&wishes("k"), &nodes);
        assert_eq!(d.reason, NO_PAIR_FITS);
        assert!(
            d.message.contains("3 node(s) match the selector, 1 fit"),
            "{}",
            d.message
        );
        assert!(d.message.contains("c (cordoned)"), "{}", d.message);
        assert!(
            d.message.contains("t (tainted gpu=true:NoSchedule)"),
            "{}",
            d.message
        );
    }

    /// Equal nodes share the load: placing many volumes one after the other, each seeing the engines the
    /// earlier ones added, leaves every node within one engine of the others, and spread over zones.
    #[test]
    fn many_volumes_balance_across_nodes_and_zones() {
        let mut nodes: Vec<Candidate> = (0..6)
            .map(|i| {
                node(
                    &format!("n{i}"),
                    Some(if i % 2 == 0 { "z1" } else { "z2" }),
                    0,
                )
            })
            .collect();
        for v in 0..60 {
            let key = format!("vol-{v}");
            let d = place(&wishes(&key), &nodes);
            let [p, s] = pair(&d);
            let zone = |n: &str| nodes.iter().find(|c| c.name == n).unwrap().zone.clone();
            assert_ne!(zone(p), zone(s), "{key}: {d:?}");
            for c in nodes.iter_mut().filter(|c| c.name == p || c.name == s) {
                c.engines += 1;
            }
        }
        let counts: Vec<u32> = nodes.iter().map(|c| c.engines).collect();
        assert_eq!(counts.iter().sum::<u32>(), 120);
        assert!(
            counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1,
            "{counts:?}"
        );
    }

    /// With equal load, volumes do not all pick the same first pair by name.
    #[test]
    fn ties_are_not_broken_by_name() {
        let nodes: Vec<Candidate> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| node(n, None, 0))
            .collect();
        let firsts: BTreeSet<String> = (0..20)
            .map(|v| {
                let key = format!("vol-{v}");
                place(&wishes(&key), &nodes).nodes.unwrap()[0].clone()
            })
            .collect();
        assert!(firsts.len() >= 3, "{firsts:?}");
        // And the same volume always gets the same answer.
        assert_eq!(place(&wishes("x"), &nodes), place(&wishes("x"), &nodes));
    }

    #[test]
    fn candidate_from_a_node() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n", "labels": {ZONE_LABEL: "z9"}},
            "spec": {"taints": [
                {"key": "soft", "effect": "PreferNoSchedule"},
                {"key": "dedicated", "value": "db", "effect": "NoExecute"},
            ]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        let c = Candidate::from_node(&node, 2);
        assert_eq!(c.zone.as_deref(), Some("z9"));
        assert!(c.ready && !c.unschedulable);
        assert_eq!(
            c.blocking_taints,
            vec!["dedicated=db:NoExecute".to_string()]
        );
        assert_eq!(c.engines, 2);
    }
}
