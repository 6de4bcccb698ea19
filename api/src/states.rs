//! Readable names of the status enums: what the CLI prints and what `status --json` has always
//! held (`"Synced"`, `"draining"`, `""` for no takeover).

use crate::pb::{PairState, TakeoverPhase};

impl PairState {
    /// Every state the engine reports (not `Unspecified`).
    pub const REPORTED: [PairState; 9] = [
        PairState::Standalone,
        PairState::Connecting,
        PairState::Resyncing,
        PairState::Replicating,
        PairState::Synced,
        PairState::Reversing,
        PairState::Consistent,
        PairState::Inconsistent,
        PairState::Fenced,
    ];

    /// The readable name: `Synced`, `Consistent`, ...; `unknown` when not reported.
    pub fn label(self) -> &'static str {
        match self {
            PairState::Unspecified => "unknown",
            PairState::Standalone => "Standalone",
            PairState::Connecting => "Connecting",
            PairState::Resyncing => "Resyncing",
            PairState::Replicating => "Replicating",
            PairState::Synced => "Synced",
            PairState::Reversing => "Reversing",
            PairState::Consistent => "Consistent",
            PairState::Inconsistent => "Inconsistent",
            PairState::Fenced => "Fenced",
        }
    }

    /// The state a label names (as [`PairState::label`] writes it).
    pub fn from_label(s: &str) -> Option<Self> {
        PairState::REPORTED.into_iter().find(|p| p.label() == s)
    }

    /// The state in a reply's raw field; a value this build does not know is `Unspecified`.
    pub fn from_wire(v: i32) -> Self {
        PairState::try_from(v).unwrap_or(PairState::Unspecified)
    }
}

impl TakeoverPhase {
    /// Every phase the engine reports (not `Unspecified`).
    pub const REPORTED: [TakeoverPhase; 4] = [
        TakeoverPhase::None,
        TakeoverPhase::Draining,
        TakeoverPhase::Merging,
        TakeoverPhase::Fenced,
    ];

    /// The readable name: `draining`, `merging`, `fenced`; empty for none, `unknown` when not reported.
    pub fn label(self) -> &'static str {
        match self {
            TakeoverPhase::Unspecified => "unknown",
            TakeoverPhase::None => "",
            TakeoverPhase::Draining => "draining",
            TakeoverPhase::Merging => "merging",
            TakeoverPhase::Fenced => "fenced",
        }
    }

    /// The phase a label names (as [`TakeoverPhase::label`] writes it).
    pub fn from_label(s: &str) -> Option<Self> {
        TakeoverPhase::REPORTED.into_iter().find(|p| p.label() == s)
    }

    /// The phase in a reply's raw field; a value this build does not know is `Unspecified`.
    pub fn from_wire(v: i32) -> Self {
        TakeoverPhase::try_from(v).unwrap_or(TakeoverPhase::Unspecified)
    }

    /// A takeover may still be running: anything but a reported `None` (an unknown or unreported
    /// phase never reads as done).
    pub fn in_progress(self) -> bool {
        self != TakeoverPhase::None
    }
}

impl std::fmt::Display for PairState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

impl std::fmt::Display for TakeoverPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_states_round_trip_through_labels_and_the_wire() {
        for p in PairState::REPORTED {
            assert_eq!(PairState::from_label(p.label()), Some(p));
            assert_eq!(PairState::from_wire(p as i32), p);
        }
        assert_eq!(PairState::Synced.to_string(), "Synced");
        assert_eq!(PairState::from_label("synced"), None);
        assert_eq!(PairState::from_label("unknown"), None);
        assert_eq!(PairState::from_wire(999), PairState::Unspecified);
    }

    #[test]
    fn takeover_phases_round_trip_and_only_none_is_done() {
        for p in TakeoverPhase::REPORTED {
            assert_eq!(TakeoverPhase::from_label(p.label()), Some(p));
            assert_eq!(TakeoverPhase::from_wire(p as i32), p);
            assert_eq!(p.in_progress(), p != TakeoverPhase::None);
        }
        assert_eq!(TakeoverPhase::None.label(), "");
        assert_eq!(TakeoverPhase::from_label(""), Some(TakeoverPhase::None));
        assert_eq!(TakeoverPhase::from_wire(999), TakeoverPhase::Unspecified);
        assert!(TakeoverPhase::Unspecified.in_progress());
        assert!(TakeoverPhase::default().in_progress());
    }
}
