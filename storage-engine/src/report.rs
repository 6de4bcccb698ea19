//! What `tandem-engine status|takeover|failback` print for people (the default). `--json` prints
//! the machine form instead (`engine::status_json`, `engine::takeover_json`), and a refusal as one
//! JSON line on stderr naming the engine's [`Reason`], which programs match on.

use tandem_api::{client::ClientError, Reason};

use crate::pb;

/// `48KiB`, `1.5MiB`, `0B`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let (mut unit, mut div) = (0, 1u64);
    while unit < UNITS.len() - 1 && n / div >= 1024 {
        div *= 1024;
        unit += 1;
    }
    if n % div == 0 {
        format!("{}{}", n / div, UNITS[unit])
    } else {
        format!("{:.1}{}", n as f64 / div as f64, UNITS[unit])
    }
}

/// Unix milliseconds as RFC 3339 in UTC (`2026-12-07T04:34:36.19Z`), the form people read beside
/// the numbers programs keep; `None` past what a date can hold.
pub fn rfc3339_ms(ms: u64) -> Option<String> {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
}

/// An engine event (`<unix ms> <what>`, as `Areas::event` keeps it) with its time in RFC 3339 (UTC)
/// for people; a line without a leading time is shown as it is.
pub fn event_line(raw: &str) -> String {
    let Some((ms, what)) = raw.split_once(' ') else {
        return raw.to_string();
    };
    match ms.parse::<u64>().ok().and_then(rfc3339_ms) {
        Some(at) => format!("{at} {what}"),
        None => raw.to_string(),
    }
}

/// How many of the engine's events `status` shows (`--json` has all it keeps).
pub const STATUS_EVENTS: usize = 5;

fn role(s: &pb::StatusReply) -> &'static str {
    match pb::Role::try_from(s.role).unwrap_or(pb::Role::Unspecified) {
        pb::Role::Primary => "primary",
        pb::Role::Secondary => "secondary",
        pb::Role::Fenced => "fenced",
        pb::Role::Unspecified => "unknown",
    }
}

/// `tandem-engine status`: role, epoch, pair state, lag, pending, the takeover areas, the lease,
/// and what is wrong when something is.
pub fn status_text(s: &pb::StatusReply) -> String {
    let mut out = format!(
        "{}: {} at epoch {}, {}, ",
        s.volume,
        role(s),
        s.epoch,
        s.pair().label()
    );
    if s.peer.is_empty() {
        out.push_str("no peer\n");
    } else {
        out.push_str(&format!(
            "peer {} {}\n",
            s.peer,
            if s.peer_connected {
                "connected"
            } else {
                "not connected"
            }
        ));
    }
    out.push_str(&format!(
        "  lag {:.1}s, pending {} ({} blocks)",
        s.lag_seconds,
        bytes(s.pending_bytes),
        s.pending_blocks
    ));
    if s.pair() == pb::PairState::Resyncing {
        out.push_str(&format!(", resync {:.0}%", s.resync_progress * 100.0));
    }
    out.push_str(&format!(
        "\n  size {}, {} NBD connection(s)\n",
        bytes(s.size),
        s.nbd_connections
    ));
    let phase = s.takeover().label();
    out.push_str(&format!(
        "  takeover areas: {} blocks owed by the old primary, {} in the overlay{}\n",
        s.peer_pending_blocks,
        s.overlay_blocks,
        if phase.is_empty() {
            String::new()
        } else {
            format!(" ({phase})")
        }
    ));
    let secs = |ms: u64| format!("{:.1}s", ms as f64 / 1000.0);
    if s.lease_ms == 0 {
        out.push_str("  lease: off\n");
    } else if role(s) == "primary" {
        out.push_str(&format!(
            "  lease: {} of {} left{}\n",
            secs(s.lease_remaining_ms),
            secs(u64::from(s.lease_ms)),
            if s.sync_fallback {
                ", acknowledging alone (sync fallback)"
            } else {
                ""
            }
        ));
    } else if s.promise_remaining_ms > 0 {
        out.push_str(&format!(
            "  lease: no forced promotion for {} (the primary's lease)\n",
            secs(s.promise_remaining_ms)
        ));
    }
    if !s.condition.is_empty() {
        out.push_str(&format!("  condition: {}\n", s.condition));
    }
    if s.lost_blocks > 0 {
        out.push_str(&format!(
            "  lost at promotion: {} blocks (seq {}..{})\n",
            s.lost_blocks, s.lost_seq_from, s.lost_seq_to
        ));
    }
    if s.exported_lost_blocks > 0 {
        out.push_str(&format!(
            "  kept {} blocks the new primary lacked in {}\n",
            s.exported_lost_blocks, s.lost_export
        ));
    }
    // The newest few, oldest first, as `kubectl describe` ends with its events.
    let shown = &s.events[s.events.len().saturating_sub(STATUS_EVENTS)..];
    if shown.is_empty() {
        out.push_str("  events: none\n");
    } else {
        let earlier = s.events.len() - shown.len();
        out.push_str(&if earlier > 0 {
            format!(
                "  events (last {}, {earlier} earlier in --json):\n",
                shown.len()
            )
        } else {
            "  events:\n".to_string()
        });
        for e in shown {
            out.push_str(&format!("    {}\n", event_line(e)));
        }
    }
    out
}

/// `tandem-engine takeover|failback`: the outcome and the ready time.
pub fn takeover_text(volume: &str, r: &pb::TakeoverReply) -> String {
    if r.already_primary {
        return format!(
            "{volume}: already primary at epoch {}: nothing changed\n",
            r.epoch
        );
    }
    let mut out = format!(
        "{volume}: serves as primary at epoch {}, ready in {} ms\n",
        r.epoch, r.ready_ms
    );
    if r.peer_pending_blocks > 0 {
        out.push_str(&format!(
            "  the old primary owes {} blocks: drained in the background, read through it meanwhile\n",
            r.peer_pending_blocks
        ));
    }
    if r.lost_blocks > 0 {
        out.push_str(&format!(
            "  LOST {} blocks (seq {}..{}): forced past an unreachable primary\n",
            r.lost_blocks, r.lost_seq_from, r.lost_seq_to
        ));
    }
    out
}

/// The refusal of a `--json` takeover or failback: `{"error": <the whole message>, "reason":
/// <Reason name, or null when the engine gave none (it was not reached)>}`.
pub fn refusal_json(e: &anyhow::Error) -> serde_json::Value {
    let reason: Option<Reason> = e
        .chain()
        .find_map(|c| c.downcast_ref::<ClientError>())
        .and_then(ClientError::reason);
    serde_json::json!({
        "error": format!("{e:#}"),
        "reason": reason.map(Reason::as_str),
    })
}

/// An error already printed in its machine form: `main` exits 1 without printing it again.
#[derive(Debug)]
pub struct Reported;

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reported on stderr")
    }
}

impl std::error::Error for Reported {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_times_read_as_rfc3339() {
        assert_eq!(
            event_line("1796618076190 ServingReady epoch=2 ready_ms=3"),
            "2026-12-07T04:34:36.19Z ServingReady epoch=2 ready_ms=3"
        );
        assert_eq!(event_line("no time here"), "no time here");
        assert_eq!(event_line("Fenced"), "Fenced");
    }

    /// The last few events end the human status, oldest first, each at its RFC 3339 time, and say
    /// how many older ones only `--json` shows.
    #[test]
    fn status_ends_with_the_latest_events() {
        let events = [
            "1796618070000 TakeoverRequested epoch=2 force=false",
            "1796618070100 Fenced epoch=2 (host sessions closed)",
            "1796618070250 DrainStart blocks=30",
            "1796618071000 MergeStart overlay_blocks=5",
            "1796618071500 OverlayFolded blocks=5",
            "1796618072000 MergeComplete blocks=5",
            "1796618076190 DrainComplete acknowledged final_seq=812",
        ];
        let s = pb::StatusReply {
            events: events.iter().map(|e| e.to_string()).collect(),
            ..primary()
        };
        let text = status_text(&s);
        let tail = &text[text.find("  events").unwrap()..];
        assert_eq!(
            tail,
            "  events (last 5, 2 earlier in --json):
    2026-12-07T04:34:30.25Z DrainStart blocks=30
    2026-12-07T04:34:31Z MergeStart overlay_blocks=5
    2026-12-07T04:34:31.5Z OverlayFolded blocks=5
    2026-12-07T04:34:32Z MergeComplete blocks=5
    2026-12-07T04:34:36.19Z DrainComplete acknowledged final_seq=812
"
        );
        let few = pb::StatusReply {
            events: vec![events[0].to_string(), "Fenced".to_string()],
            ..primary()
        };
        let text = status_text(&few);
        assert!(
            text.ends_with(
                "  events:\n    2026-12-07T04:34:30Z TakeoverRequested epoch=2 force=false\n    Fenced\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn times_read_as_rfc3339_beside_the_numbers() {
        assert_eq!(rfc3339_ms(0).as_deref(), Some("1970-01-01T00:00:00Z"));
        assert_eq!(
            rfc3339_ms(1_700_000_000_123).as_deref(),
            Some("2023-11-14T22:13:20.123Z")
        );
        assert_eq!(rfc3339_ms(u64::MAX), None);
    }

    fn primary() -> pb::StatusReply {
        pb::StatusReply {
            volume: "data".into(),
            role: pb::Role::Primary as i32,
            epoch: 2,
            size: 64 << 20,
            nbd_connections: 1,
            pair: pb::PairState::Replicating as i32,
            peer: "10.0.0.2:9500".into(),
            peer_connected: true,
            pending_blocks: 12,
            pending_bytes: 48 << 10,
            lag_seconds: 0.4,
            takeover: pb::TakeoverPhase::Draining as i32,
            peer_pending_blocks: 30,
            overlay_blocks: 5,
            lease_ms: 10000,
            lease_remaining_ms: 8200,
            ..Default::default()
        }
    }

    #[test]
    fn status_reads_as_a_few_lines() {
        assert_eq!(
            status_text(&primary()),
            "\
data: primary at epoch 2, Replicating, peer 10.0.0.2:9500 connected
  lag 0.4s, pending 48KiB (12 blocks)
  size 64MiB, 1 NBD connection(s)
  takeover areas: 30 blocks owed by the old primary, 5 in the overlay (draining)
  lease: 8.2s of 10.0s left
  events: none
"
        );
        let torn = pb::StatusReply {
            role: pb::Role::Secondary as i32,
            pair: pb::PairState::Resyncing as i32,
            resync_progress: 0.25,
            takeover: pb::TakeoverPhase::None as i32,
            peer_pending_blocks: 0,
            overlay_blocks: 0,
            peer_connected: false,
            promise_remaining_ms: 1500,
            condition: "HandoffBlocked: PeerUnreachable: peer a".into(),
            ..primary()
        };
        assert_eq!(
            status_text(&torn),
            "\
data: secondary at epoch 2, Resyncing, peer 10.0.0.2:9500 not connected
  lag 0.4s, pending 48KiB (12 blocks), resync 25%
  size 64MiB, 1 NBD connection(s)
  takeover areas: 0 blocks owed by the old primary, 0 in the overlay
  lease: no forced promotion for 1.5s (the primary's lease)
  condition: HandoffBlocked: PeerUnreachable: peer a
  events: none
"
        );
    }

    #[test]
    fn takeover_says_what_happened_and_what_it_cost() {
        let r = pb::TakeoverReply {
            epoch: 3,
            ready_ms: 7,
            peer_pending_blocks: 40,
            lost_blocks: 2,
            lost_seq_from: 10,
            lost_seq_to: 11,
            already_primary: false,
        };
        assert_eq!(
            takeover_text("data", &r),
            "\
data: serves as primary at epoch 3, ready in 7 ms
  the old primary owes 40 blocks: drained in the background, read through it meanwhile
  LOST 2 blocks (seq 10..11): forced past an unreachable primary
"
        );
        let again = pb::TakeoverReply {
            already_primary: true,
            ..r
        };
        assert_eq!(
            takeover_text("data", &again),
            "data: already primary at epoch 3: nothing changed\n"
        );
    }

    #[test]
    fn a_refusal_names_the_engines_reason() {
        let refused: anyhow::Error = ClientError::Rpc {
            op: "Takeover",
            status: Reason::HandoffBlocked
                .status(tonic::Code::FailedPrecondition, "HandoffBlocked: peer gone"),
        }
        .into();
        let got = refusal_json(&refused);
        assert_eq!(got["reason"], "HandoffBlocked");
        assert!(
            got["error"]
                .as_str()
                .unwrap_or_default()
                .contains("peer gone"),
            "{got}"
        );
        let unreached = refusal_json(&anyhow::anyhow!("cannot connect"));
        assert_eq!(unreached["reason"], serde_json::Value::Null);
    }
}
