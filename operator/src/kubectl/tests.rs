//! The plugin's output for fixed objects at a fixed time, and its switchover decisions.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use serde_json::json;

use super::{
    plan,
    render::{self, Bar, EventLine, Unit, Volume},
    Ask, Target,
};
use crate::crd::{
    Condition, EngineReport, LeaseGrant, MirroredVolume, Phase, ReplicationStatus, Slot,
    SwitchoverPhase, SwitchoverStatus, TakeoverStatus,
};

fn now() -> Timestamp {
    "2026-12-07T12:00:00Z".parse().unwrap()
}

fn report(pair_state: &str) -> EngineReport {
    EngineReport {
        epoch: 2,
        pair_state: pair_state.into(),
        ..Default::default()
    }
}

/// `default/data` after a switchover to n2 three minutes ago: Synced at epoch 2, 48 KiB pending.
fn switched() -> Volume {
    let mut mv = MirroredVolume::test().established(Slot::B, 2);
    mv.spec.primary_node = Some("n2".into());
    let s = mv.status.as_mut().unwrap();
    s.phase = Phase::Synced;
    s.capacity_bytes = 1 << 30;
    for e in [s.primary.as_mut(), s.secondary.as_mut()]
        .into_iter()
        .flatten()
    {
        e.pod = format!("data-engine-{}", e.slot.as_str());
        e.reported = Some(report("Synced"));
    }
    if let Some(p) = s.primary.as_mut().and_then(|p| p.reported.as_mut()) {
        p.pending_blocks = 12;
    }
    s.replication = Some(ReplicationStatus {
        pending_blocks: 12,
        pending_bytes: 48 << 10,
        lag_seconds: 1.3,
        lag: "48KiB/1.3s".into(),
        resync_progress: 1.0,
        peer_connected: true,
    });
    s.takeover = Some(TakeoverStatus {
        reason: "Switchover".into(),
        from_node: "n1".into(),
        to_node: "n2".into(),
        started_at: Some("2026-12-07T11:56:50Z".into()),
        completed_at: Some("2026-12-07T11:57:00Z".into()),
        ready_ms: 12,
        drain_total_blocks: 40,
        proxied_reads: 3,
        fence: Some("Handoff".into()),
        attempts: 1,
        ..Default::default()
    });
    s.lease = Some(LeaseGrant {
        node: "n2".into(),
        at: "2026-12-07T11:59:58Z".into(),
        lease_ms: 10000,
        allow_async: false,
        error: None,
    });
    s.switchover = Some(SwitchoverStatus {
        phase: SwitchoverPhase::Done,
        from: "n1".into(),
        to: "n2".into(),
        message: "the primary is on n2".into(),
        started_at: Some("2026-12-07T11:56:50Z".into()),
        completed_at: Some("2026-12-07T11:57:01Z".into()),
        epoch: 2,
    });
    s.conditions = vec![Condition {
        type_: "Ready".into(),
        status: "True".into(),
        observed_generation: Some(1),
        last_transition_time: "2026-12-07T10:00:00Z".into(),
        reason: "Synced".into(),
        message: "both engines serve".into(),
    }];
    Volume { mv, moving: None }
}

/// `other/fresh`: created, no status yet.
fn fresh() -> Volume {
    let mut mv = MirroredVolume::test();
    mv.metadata.name = Some("fresh".into());
    mv.metadata.namespace = Some("other".into());
    Volume { mv, moving: None }
}

#[test]
fn ages_read_like_kubectl() {
    let t = |s: i64| Timestamp::from_second(now().as_second() - s).unwrap();
    let got: Vec<String> = [-5, 0, 1, 59, 60, 3599, 3600, 86399, 86400, 900000]
        .map(|s| render::ago(t(s), now()))
        .to_vec();
    assert_eq!(
        got,
        [
            "just now", "just now", "1s ago", "59s ago", "1m ago", "59m ago", "1h ago", "23h ago",
            "1d ago", "10d ago"
        ]
    );
}

#[test]
fn the_status_table_has_aligned_columns_and_dashes_for_what_is_unknown() {
    let vols = [switched(), fresh()];
    assert_eq!(
        render::table(&vols, false, now()),
        "\
NAME    PHASE    PRIMARY   SECONDARY   LAG    PENDING   LAST TAKEOVER
data    Synced   n2        n1          1.3s   48KiB     3m ago
fresh   -        -         -           -      -         -
"
    );
    assert_eq!(
        render::table(&vols, true, now()),
        "\
NAMESPACE   NAME    PHASE    PRIMARY   SECONDARY   LAG    PENDING   LAST TAKEOVER
default     data    Synced   n2        n1          1.3s   48KiB     3m ago
other       fresh   -        -         -           -      -         -
"
    );
    assert_eq!(
        render::table(&[], false, now()),
        "No MirroredVolumes found.\n"
    );
    // A takeover asked and not done yet.
    let mut running = switched();
    let t = running
        .mv
        .status
        .as_mut()
        .unwrap()
        .takeover
        .as_mut()
        .unwrap();
    t.completed_at = None;
    assert!(render::table(&[running], false, now()).contains("   running\n"));
}

#[test]
fn the_status_json_is_one_object_per_volume_with_stable_names() {
    let got = render::table_json(&[switched(), fresh()]);
    assert_eq!(
        got,
        json!([
            {
                "namespace": "default", "name": "data", "phase": "Synced", "epoch": 2,
                "primary": "n2", "secondary": "n1",
                "lagSeconds": 1.3, "pendingBytes": 49152, "pendingBlocks": 12,
                "lastTakeover": {
                    "reason": "Switchover", "from": "n1", "to": "n2",
                    "startedAt": "2026-12-07T11:56:50Z", "completedAt": "2026-12-07T11:57:00Z",
                },
                "switchover": {"phase": "Done", "from": "n1", "to": "n2"},
            },
            {
                "namespace": "other", "name": "fresh", "phase": null, "epoch": null,
                "primary": null, "secondary": null, "lagSeconds": null, "pendingBytes": null,
                "pendingBlocks": null, "lastTakeover": null, "switchover": null,
            },
        ])
    );
}

fn events() -> Vec<EventLine> {
    vec![
        EventLine {
            time: Some("2026-12-07T11:57:01Z".parse().unwrap()),
            type_: "Normal".into(),
            reason: "SwitchoverCompleted".into(),
            message: "the primary is on n2 at epoch 2".into(),
            count: 1,
        },
        EventLine {
            time: Some("2026-12-07T11:59:30Z".parse().unwrap()),
            type_: "Warning".into(),
            reason: "SyncFallback".into(),
            message: "n2 acknowledges alone".into(),
            count: 3,
        },
    ]
}

#[test]
fn describe_shows_both_engines_progress_conditions_and_events_with_readable_times() {
    assert_eq!(
        render::describe(&switched(), &events(), now()),
        "\
Name:         default/data
Phase:        Synced (epoch 2)
Size:         1Gi (serving 1GiB)
Policy:       Async replication, failover WaitForPrimary, switchover WhenInSync
Nodes:        n1, n2
Home:         n1 (failback target)
Replication:  lag 1.3s, pending 48KiB (12 blocks), peer connected, resync 100%
Lease:        granted to n2 at 2026-12-07T11:59:58Z (2s ago), 10000 ms
Switchover:   Done n1 -> n2 at epoch 2, started 2026-12-07T11:56:50Z (3m ago), completed 2026-12-07T11:57:01Z (2m ago): the primary is on n2
Takeover:     Switchover n1 -> n2, completed 2026-12-07T11:57:00Z (3m ago), ready in 12 ms, 0 of 40 blocks still owed, 3 proxied reads
Engines:
  SLOT   NODE   ROLE        STATE    EPOCH   REACHABLE   PENDING   OWED   OVERLAY   POD
  a      n1     Secondary   Synced   2       yes         0         0      0         data-engine-a
  b      n2     Primary     Synced   2       yes         12        0      0         data-engine-b
Conditions:
  TYPE    STATUS   REASON   SINCE    MESSAGE
  Ready   True     Synced   2h ago   both engines serve
Events:
  TIME                   AGE       TYPE      REASON                MESSAGE
  2026-12-07T11:57:01Z   2m ago    Normal    SwitchoverCompleted   the primary is on n2 at epoch 2
  2026-12-07T11:59:30Z   30s ago   Warning   SyncFallback (x3)     n2 acknowledges alone
"
    );
    // An engine that does not answer, and a volume without events.
    let mut v = switched();
    let s = v.mv.status.as_mut().unwrap();
    let a = s.secondary.as_mut().unwrap();
    a.reachable = false;
    a.reported = None;
    let text = render::describe(&v, &[], now());
    assert!(
        text.contains("  a      n1     Secondary   unreachable   -       no          -"),
        "{text}"
    );
    assert!(text.ends_with("Events:       <none>\n"), "{text}");
    assert_eq!(
        render::describe(&fresh(), &[], now()),
        "Name:         other/fresh\nPhase:        - (the operator has not written a status yet)\n"
    );
}

#[test]
fn describe_json_carries_the_status_as_written_and_rfc3339_event_times() {
    let mut v = switched();
    v.moving = Some(json!({"phase": "Copying", "copiedBytes": 1, "totalBytes": 4}));
    let got = render::describe_json(&v, &events());
    assert_eq!(got["namespace"], "default");
    assert_eq!(got["name"], "data");
    assert_eq!(got["home"], "n1");
    assert_eq!(got["status"]["phase"], "Synced");
    assert_eq!(got["status"]["primary"]["node"], "n2");
    assert_eq!(got["status"]["primary"]["reported"]["pairState"], "Synced");
    assert_eq!(got["status"]["takeover"]["drainTotalBlocks"], 40);
    assert_eq!(got["move"]["phase"], "Copying");
    assert_eq!(
        got["events"][1],
        json!({"time": "2026-12-07T11:59:30Z", "type": "Warning", "reason": "SyncFallback",
               "message": "n2 acknowledges alone", "count": 3})
    );
}

#[test]
fn bars_follow_resync_drain_merge_and_move() {
    let mut merges = BTreeMap::new();
    assert_eq!(render::bars(&switched(), &mut merges), vec![]);

    let mut v = switched();
    let s = v.mv.status.as_mut().unwrap();
    let p = s.primary.as_mut().unwrap().reported.as_mut().unwrap();
    p.pair_state = "Resyncing".into();
    p.resync_progress = 0.25;
    p.takeover_phase = "draining".into();
    p.peer_pending_blocks = 10;
    v.moving = Some(json!({"phase": "Copying", "copiedBytes": 1 << 20, "totalBytes": 4 << 20}));
    let bars = render::bars(&v, &mut merges);
    assert_eq!(
        bars,
        vec![
            Bar {
                key: "default/data resync".into(),
                label: "default/data resync to n1".into(),
                pos: 250,
                len: 1000,
                unit: Unit::Permille,
            },
            Bar {
                key: "default/data drain".into(),
                label: "default/data drain".into(),
                pos: 30,
                len: 40,
                unit: Unit::Blocks,
            },
            Bar {
                key: "default/data move".into(),
                label: "default/data move (Copying)".into(),
                pos: 1 << 20,
                len: 4 << 20,
                unit: Unit::Bytes,
            },
        ]
    );
    assert_eq!(
        bars.iter().map(Bar::text).collect::<Vec<_>>(),
        [
            "default/data resync to n1 25.0%",
            "default/data drain 75.0% 30/40 blocks",
            "default/data move (Copying) 25.0% 1MiB/4MiB",
        ]
    );

    // The merge's length is the largest overlay seen while merging.
    let merging = |overlay: u64| {
        let mut v = switched();
        let p = v.mv.status.as_mut().unwrap().primary.as_mut().unwrap();
        let r = p.reported.as_mut().unwrap();
        r.takeover_phase = "merging".into();
        r.overlay_blocks = overlay;
        v
    };
    let seen: Vec<(u64, u64)> = [100, 60, 0]
        .map(|o| {
            let b = render::bars(&merging(o), &mut merges);
            (b[0].pos, b[0].len)
        })
        .to_vec();
    assert_eq!(seen, [(0, 100), (40, 100), (100, 100)]);
    render::bars(&switched(), &mut merges);
    assert!(merges.is_empty(), "forgotten once the merge is over");
}

#[test]
fn a_switchover_goes_to_the_secondary_and_a_failback_home() {
    let v = switched();
    assert_eq!(plan(&v, &Target::Home), {
        Ok(Ask::Move {
            from: "n2".into(),
            node: "n1".into(),
            clear_first: false,
        })
    });
    assert_eq!(
        plan(&v, &Target::Secondary),
        plan(&v, &Target::Node("n1".into()))
    );
    assert_eq!(
        plan(&v, &Target::Node("n2".into())),
        Ok(Ask::Already("n2".into()))
    );
    // Asked for n1 before and carried out: the same value again changes nothing for the operator.
    let mut again = switched();
    again.mv.spec.primary_node = Some("n1".into());
    assert!(matches!(
        plan(&again, &Target::Home),
        Ok(Ask::Move {
            clear_first: true,
            ..
        })
    ));
}

#[test]
fn a_switchover_is_refused_with_a_reason_a_user_can_act_on() {
    let mut v = switched();
    v.mv.status.as_mut().unwrap().secondary = None;
    assert_eq!(
        plan(&v, &Target::Secondary),
        Err(
            "default/data: the secondary is unknown (status.secondary is empty): nothing to switch over to"
                .into()
        )
    );
    assert_eq!(
        plan(&switched(), &Target::Node("n9".into())),
        Err(
            "default/data: node n9 holds no engine of this volume (primary on n2, secondary on n1)"
                .into()
        )
    );
    let mut busy = switched();
    let w = busy
        .mv
        .status
        .as_mut()
        .unwrap()
        .switchover
        .as_mut()
        .unwrap();
    w.phase = SwitchoverPhase::WaitingForSync;
    w.message = "48KiB pending".into();
    assert_eq!(
        plan(&busy, &Target::Secondary),
        Err(
            "default/data: a switchover to n2 is already running (phase WaitingForSync: 48KiB \
             pending); follow it with `kubectl tandem describe data --watch`"
                .into()
        )
    );
    assert_eq!(
        plan(&fresh(), &Target::Secondary),
        Err("other/fresh has no status yet: the operator has not placed it".into())
    );
}
