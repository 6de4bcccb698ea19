//! What `kubectl tandem` prints, as pure functions of the objects it read and the time: the table,
//! the description, their JSON forms, and the progress a `--watch` draws. Tests feed fixed objects
//! and a fixed clock and compare exact text.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};

use crate::crd::{
    human_bytes, EngineStatusRef, MirroredVolume, MirroredVolumeStatus, SwitchoverPhase,
};

/// A volume as read from the API: the typed object, and `status.move` kept as it came (written by
/// the live-move rule; read loosely so a plugin older than the operator still shows the rest).
#[derive(Clone, Debug, PartialEq)]
pub struct Volume {
    pub mv: MirroredVolume,
    pub moving: Option<Value>,
}

impl Volume {
    pub fn namespace(&self) -> &str {
        self.mv.metadata.namespace.as_deref().unwrap_or_default()
    }
    pub fn name(&self) -> &str {
        self.mv.metadata.name.as_deref().unwrap_or_default()
    }
    fn status(&self) -> Option<&MirroredVolumeStatus> {
        self.mv.status.as_ref()
    }
}

/// One Event of a volume, as `describe` lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct EventLine {
    /// The last time it happened (None: the API server gave no time).
    pub time: Option<Timestamp>,
    /// `Normal` or `Warning`.
    pub type_: String,
    pub reason: String,
    pub message: String,
    /// How many times it happened (1 for a single event).
    pub count: i32,
}

/// `3s ago`, `5m ago`, `2h ago`, `4d ago` (whole units, rounded down, like kubectl's ages); a time in
/// the future (a clock ahead of ours) is `just now`.
pub fn ago(then: Timestamp, now: Timestamp) -> String {
    let secs = now.as_second() - then.as_second();
    match secs {
        ..=0 => "just now".into(),
        1..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

/// An RFC 3339 time from the status: itself and how long ago (`2026-12-07T02:00:00Z (3m ago)`); a
/// value that does not parse is shown as it is.
fn when(rfc: &str, now: Timestamp) -> String {
    match rfc.parse::<Timestamp>() {
        Ok(t) => format!("{t} ({})", ago(t, now)),
        Err(_) => rfc.to_string(),
    }
}

fn relative(rfc: Option<&str>, now: Timestamp) -> Option<String> {
    rfc.and_then(|r| r.parse::<Timestamp>().ok())
        .map(|t| ago(t, now))
}

/// Aligned columns: every column but the last padded to its widest cell plus three spaces.
fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i] - cell.chars().count() + 3;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn node_of(e: Option<&EngineStatusRef>) -> String {
    e.map_or_else(|| "-".to_string(), |e| e.node.clone())
}

/// `1.2s`; `-` without a replication report.
fn lag(s: Option<&MirroredVolumeStatus>) -> String {
    s.and_then(|s| s.replication.as_ref())
        .map_or_else(|| "-".into(), |r| format!("{:.1}s", r.lag_seconds))
}

fn pending(s: Option<&MirroredVolumeStatus>) -> String {
    s.and_then(|s| s.replication.as_ref())
        .map_or_else(|| "-".into(), |r| human_bytes(r.pending_bytes))
}

/// LAST TAKEOVER: when the last one completed (`3m ago`), `running` while one is asked and not done,
/// `-` when there was none.
fn last_takeover(s: Option<&MirroredVolumeStatus>, now: Timestamp) -> String {
    match s.and_then(|s| s.takeover.as_ref()) {
        None => "-".into(),
        Some(t) => match &t.completed_at {
            Some(done) => relative(Some(done), now).unwrap_or_else(|| done.clone()),
            None => "running".into(),
        },
    }
}

/// `kubectl tandem status`: one row per volume; NAMESPACE first with `-A`.
pub fn table(vols: &[Volume], all_namespaces: bool, now: Timestamp) -> String {
    if vols.is_empty() {
        return "No MirroredVolumes found.\n".into();
    }
    let mut head = vec![];
    if all_namespaces {
        head.push("NAMESPACE");
    }
    head.extend([
        "NAME",
        "PHASE",
        "PRIMARY",
        "SECONDARY",
        "LAG",
        "PENDING",
        "LAST TAKEOVER",
    ]);
    let mut rows = vec![head.into_iter().map(String::from).collect::<Vec<_>>()];
    for v in vols {
        let s = v.status();
        let mut row = vec![];
        if all_namespaces {
            row.push(v.namespace().to_string());
        }
        row.extend([
            v.name().to_string(),
            s.map_or("-", |s| s.phase.as_str()).to_string(),
            node_of(s.and_then(|s| s.primary.as_ref())),
            node_of(s.and_then(|s| s.secondary.as_ref())),
            lag(s),
            pending(s),
            last_takeover(s, now),
        ]);
        rows.push(row);
    }
    columns(&rows)
}

/// `kubectl tandem status -o json`: a JSON array, one object per volume. The field names are stable
/// (scripts read them); times are RFC 3339, never relative.
pub fn table_json(vols: &[Volume]) -> Value {
    Value::Array(
        vols.iter()
            .map(|v| {
                let s = v.status();
                let r = s.and_then(|s| s.replication.as_ref());
                json!({
                    "namespace": v.namespace(),
                    "name": v.name(),
                    "phase": s.map(|s| s.phase.as_str()),
                    "epoch": s.map(|s| s.epoch),
                    "primary": s.and_then(|s| s.primary.as_ref()).map(|e| &e.node),
                    "secondary": s.and_then(|s| s.secondary.as_ref()).map(|e| &e.node),
                    "lagSeconds": r.map(|r| r.lag_seconds),
                    "pendingBytes": r.map(|r| r.pending_bytes),
                    "pendingBlocks": r.map(|r| r.pending_blocks),
                    "lastTakeover": s.and_then(|s| s.takeover.as_ref()).map(|t| json!({
                        "reason": t.reason,
                        "from": t.from_node,
                        "to": t.to_node,
                        "startedAt": t.started_at,
                        "completedAt": t.completed_at,
                    })),
                    "switchover": s.and_then(|s| s.switchover.as_ref()).map(|w| json!({
                        "phase": w.phase.as_str(),
                        "from": w.from,
                        "to": w.to,
                    })),
                })
            })
            .collect(),
    )
}

/// The state column of an engine: its pair state (and takeover phase), or why there is none.
fn engine_state(e: &EngineStatusRef) -> String {
    match &e.reported {
        Some(r) if !r.takeover_phase.is_empty() => {
            format!("{} ({})", r.pair_state, r.takeover_phase)
        }
        Some(r) => r.pair_state.clone(),
        None if e.reachable => "-".into(),
        None => "unreachable".into(),
    }
}

/// The engines, slot a first.
fn engines(s: &MirroredVolumeStatus) -> Vec<&EngineStatusRef> {
    let mut e: Vec<&EngineStatusRef> = [s.primary.as_ref(), s.secondary.as_ref()]
        .into_iter()
        .flatten()
        .collect();
    e.sort_by_key(|e| e.slot);
    e
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// `kubectl tandem describe VOLUME`.
pub fn describe(v: &Volume, events: &[EventLine], now: Timestamp) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| {
        out.push_str(&format!("{:<14}{v}\n", format!("{k}:")));
    };
    let spec = &v.mv.spec;
    line("Name", format!("{}/{}", v.namespace(), v.name()));
    let Some(s) = v.status() else {
        line(
            "Phase",
            "- (the operator has not written a status yet)".into(),
        );
        return out;
    };
    line("Phase", format!("{} (epoch {})", s.phase.as_str(), s.epoch));
    line(
        "Size",
        format!(
            "{} (serving {})",
            spec.size,
            if s.capacity_bytes == 0 {
                "-".into()
            } else {
                human_bytes(s.capacity_bytes)
            }
        ),
    );
    line(
        "Policy",
        format!(
            "{:?} replication, failover {:?}, switchover {:?}",
            spec.replication.mode, spec.failover.policy, spec.switchover_policy
        ),
    );
    line("Nodes", s.nodes.join(", "));
    if let Some(home) = s.nodes.first() {
        line("Home", format!("{home} (failback target)"));
    }
    if let Some(r) = &s.replication {
        line(
            "Replication",
            format!(
                "lag {:.1}s, pending {} ({} blocks), peer {}, resync {:.0}%",
                r.lag_seconds,
                human_bytes(r.pending_bytes),
                r.pending_blocks,
                if r.peer_connected {
                    "connected"
                } else {
                    "disconnected"
                },
                r.resync_progress * 100.0
            ),
        );
    }
    if let Some(l) = &s.lease {
        let mut text = format!(
            "granted to {} at {}, {} ms{}",
            l.node,
            when(&l.at, now),
            l.lease_ms,
            if l.allow_async { ", async allowed" } else { "" }
        );
        if let Some(e) = &l.error {
            text.push_str(&format!("; error: {e}"));
        }
        line("Lease", text);
    }
    if let Some(f) = &s.sync_fallback {
        line(
            "Sync fallback",
            format!(
                "{} acknowledges alone since {}: {}",
                f.node,
                when(&f.since, now),
                f.reason
            ),
        );
    }
    if let Some(w) = &s.switchover {
        let mut text = format!("{} {} -> {}", w.phase.as_str(), w.from, w.to);
        if w.epoch > 0 {
            text.push_str(&format!(" at epoch {}", w.epoch));
        }
        if let Some(t) = &w.started_at {
            text.push_str(&format!(", started {}", when(t, now)));
        }
        if let Some(t) = &w.completed_at {
            text.push_str(&format!(", completed {}", when(t, now)));
        }
        if !w.message.is_empty() {
            text.push_str(&format!(": {}", w.message));
        }
        line("Switchover", text);
    }
    if let Some(t) = &s.takeover {
        let mut text = format!("{} {} -> {}", t.reason, t.from_node, t.to_node);
        match &t.completed_at {
            Some(done) => text.push_str(&format!(
                ", completed {}, ready in {} ms, {} of {} blocks still owed, {} proxied reads",
                when(done, now),
                t.ready_ms,
                t.pending_blocks,
                t.drain_total_blocks.max(t.pending_blocks),
                t.proxied_reads
            )),
            None => text.push_str(&format!(", running, attempt {}", t.attempts)),
        }
        if t.lost_blocks > 0 {
            text.push_str(&format!(
                ", LOST {} blocks (seq {}..{})",
                t.lost_blocks, t.lost_seq_from, t.lost_seq_to
            ));
        }
        if let Some(e) = &t.last_error {
            text.push_str(&format!("; last error: {e}"));
        }
        line("Takeover", text);
    }
    if let Some(m) = &v.moving {
        line("Move", move_text(m));
    }
    if let Some(w) = &s.promotion_wait {
        line("Waiting", format!("{}: {}", w.reason, w.message));
    }
    out.push_str("Engines:\n");
    let mut rows = vec![[
        "SLOT",
        "NODE",
        "ROLE",
        "STATE",
        "EPOCH",
        "REACHABLE",
        "PENDING",
        "OWED",
        "OVERLAY",
        "POD",
    ]
    .map(String::from)
    .to_vec()];
    for e in engines(s) {
        let r = e.reported.as_ref();
        let num = |f: fn(&crate::crd::EngineReport) -> u64| {
            r.map_or_else(|| "-".to_string(), |r| f(r).to_string())
        };
        rows.push(vec![
            e.slot.as_str().into(),
            e.node.clone(),
            format!("{:?}", e.role),
            engine_state(e),
            num(|r| r.epoch),
            yes(e.reachable).into(),
            num(|r| r.pending_blocks),
            num(|r| r.peer_pending_blocks),
            num(|r| r.overlay_blocks),
            e.pod.clone(),
        ]);
    }
    indent(&mut out, &columns(&rows));
    out.push_str("Conditions:\n");
    let mut rows = vec![["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"]
        .map(String::from)
        .to_vec()];
    for c in &s.conditions {
        rows.push(vec![
            c.type_.clone(),
            c.status.clone(),
            c.reason.clone(),
            relative(Some(&c.last_transition_time), now).unwrap_or_else(|| "-".into()),
            c.message.clone(),
        ]);
    }
    indent(&mut out, &columns(&rows));
    if events.is_empty() {
        out.push_str("Events:       <none>\n");
    } else {
        out.push_str("Events:\n");
        let mut rows = vec![["TIME", "AGE", "TYPE", "REASON", "MESSAGE"]
            .map(String::from)
            .to_vec()];
        for e in events {
            rows.push(vec![
                e.time.map_or_else(|| "-".into(), |t| t.to_string()),
                e.time.map_or_else(|| "-".into(), |t| ago(t, now)),
                e.type_.clone(),
                if e.count > 1 {
                    format!("{} (x{})", e.reason, e.count)
                } else {
                    e.reason.clone()
                },
                e.message.clone(),
            ]);
        }
        indent(&mut out, &columns(&rows));
    }
    out
}

fn indent(out: &mut String, block: &str) {
    for l in block.lines() {
        out.push_str("  ");
        out.push_str(l);
        out.push('\n');
    }
}

fn move_text(m: &Value) -> String {
    let num = |k: &str| m.get(k).and_then(Value::as_u64).unwrap_or(0);
    let text = |k: &str| {
        m.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let mut out = text("phase");
    let (source, target) = (text("from"), text("to"));
    if !source.is_empty() || !target.is_empty() {
        out.push_str(&format!(" {source} -> {target}"));
    }
    if num("totalBytes") > 0 {
        out.push_str(&format!(
            ", copied {} of {}",
            human_bytes(num("copiedBytes")),
            human_bytes(num("totalBytes"))
        ));
    }
    let msg = text("message");
    if !msg.is_empty() {
        out.push_str(&format!(": {msg}"));
    }
    out.trim().to_string()
}

/// `kubectl tandem describe VOLUME -o json`: the status as the operator wrote it (its CRD field
/// names), plus `move` as stored and the events with RFC 3339 times.
pub fn describe_json(v: &Volume, events: &[EventLine]) -> Value {
    json!({
        "namespace": v.namespace(),
        "name": v.name(),
        "spec": v.mv.spec,
        "status": v.mv.status,
        "move": v.moving,
        "home": v.status().and_then(|s| s.nodes.first()),
        "events": events.iter().map(|e| json!({
            "time": e.time.map(|t| t.to_string()),
            "type": e.type_,
            "reason": e.reason,
            "message": e.message,
            "count": e.count,
        })).collect::<Vec<_>>(),
    })
}

/// What a progress bar counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Blocks,
    Bytes,
    /// Per mille of a fraction the engine reports.
    Permille,
}

/// One progress bar of a `--watch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bar {
    /// Stable across redraws: `<ns>/<name> resync`.
    pub key: String,
    pub label: String,
    pub pos: u64,
    pub len: u64,
    pub unit: Unit,
}

impl Bar {
    /// The bar as a line of text (no terminal: `--watch` into a pipe or a file).
    pub fn text(&self) -> String {
        let pct = if self.len == 0 {
            100.0
        } else {
            self.pos as f64 * 100.0 / self.len as f64
        };
        let amount = match self.unit {
            Unit::Blocks => format!("{}/{} blocks", self.pos, self.len),
            Unit::Bytes => format!("{}/{}", human_bytes(self.pos), human_bytes(self.len)),
            Unit::Permille => String::new(),
        };
        format!("{} {pct:.1}% {amount}", self.label)
            .trim_end()
            .to_string()
    }
}

/// The progress a volume's status carries: the resync of the secondary, the new primary's drain of
/// the old one's backlog, the merge of its overlay, a live move. A merge's length is not in the
/// status: `merges` remembers the largest overlay each volume showed while merging.
pub fn bars(v: &Volume, merges: &mut BTreeMap<String, u64>) -> Vec<Bar> {
    let id = format!("{}/{}", v.namespace(), v.name());
    let mut out = vec![];
    let Some(s) = v.status() else { return out };
    let primary = s.primary.as_ref().and_then(|p| p.reported.as_ref());
    if let Some(p) = primary {
        if p.pair_state == "Resyncing" {
            out.push(Bar {
                key: format!("{id} resync"),
                label: format!("{id} resync to {}", node_of(s.secondary.as_ref())),
                pos: (p.resync_progress.clamp(0.0, 1.0) * 1000.0) as u64,
                len: 1000,
                unit: Unit::Permille,
            });
        }
        if p.takeover_phase == "draining" || p.peer_pending_blocks > 0 {
            let total = s
                .takeover
                .as_ref()
                .map_or(0, |t| t.drain_total_blocks)
                .max(p.peer_pending_blocks);
            out.push(Bar {
                key: format!("{id} drain"),
                label: format!("{id} drain"),
                pos: total - p.peer_pending_blocks,
                len: total,
                unit: Unit::Blocks,
            });
        }
        if p.takeover_phase == "merging" {
            let total = merges.entry(id.clone()).or_insert(0);
            *total = (*total).max(p.overlay_blocks);
            out.push(Bar {
                key: format!("{id} merge"),
                label: format!("{id} merge"),
                pos: *total - p.overlay_blocks,
                len: *total,
                unit: Unit::Blocks,
            });
        } else {
            merges.remove(&id);
        }
    }
    if let Some(m) = &v.moving {
        let num = |k: &str| m.get(k).and_then(Value::as_u64).unwrap_or(0);
        let phase = m.get("phase").and_then(Value::as_str).unwrap_or_default();
        let over = matches!(phase, "" | "Done" | "Failed" | "Refused");
        if !over && num("totalBytes") > 0 {
            out.push(Bar {
                key: format!("{id} move"),
                label: format!("{id} move ({phase})"),
                pos: num("copiedBytes").min(num("totalBytes")),
                len: num("totalBytes"),
                unit: Unit::Bytes,
            });
        }
    }
    out
}

/// Whether a switchover record is still running (asked, not Done or Refused).
pub fn running(phase: SwitchoverPhase) -> bool {
    !matches!(phase, SwitchoverPhase::Done | SwitchoverPhase::Refused)
}
