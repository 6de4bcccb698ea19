//! The recorded history: one entry per NBD request a client issued, with its invoke and completion
//! times on one monotonic clock (nanoseconds since the campaign started, always >= 1).

use crate::stamp::Run;

pub type Time = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
    Trim,
    Zero,
    Flush,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Read => "READ",
            Kind::Write => "WRITE",
            Kind::Trim => "TRIM",
            Kind::Zero => "WRITE_ZEROES",
            Kind::Flush => "FLUSH",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The server replied with this errno: the request may or may not have taken effect.
    Err(u32),
    /// The connection was cut (fence, kill, stop) before the reply: indeterminate.
    Lost,
}

#[derive(Debug, Clone)]
pub struct Op {
    /// Unique over the run; the stamp a WRITE leaves in its sectors.
    pub id: u64,
    pub client: u32,
    pub kind: Kind,
    pub fua: bool,
    /// First 512-byte sector and the number of sectors covered.
    pub sector: u64,
    pub sectors: u64,
    pub inv: Time,
    /// Meaningful unless the outcome is `Lost`.
    pub comp: Time,
    pub outcome: Outcome,
    /// READ only: what each sector read back as.
    pub seen: Vec<Run>,
    /// The final full read after the nemesis stopped and the pair converged.
    pub final_read: bool,
    /// The engine (0: A, 1: B) whose connection carried the op; `NO_ENGINE` if unknown.
    pub engine: usize,
}

pub const NO_ENGINE: usize = usize::MAX;

impl Op {
    pub fn new(id: u64, client: u32, kind: Kind, sector: u64, sectors: u64, inv: Time) -> Op {
        Op {
            id,
            client,
            kind,
            fua: false,
            sector,
            sectors,
            inv,
            comp: 0,
            outcome: Outcome::Lost,
            seen: Vec::new(),
            final_read: false,
            engine: NO_ENGINE,
        }
    }

    /// Whether the op changes data (a WRITE, TRIM or WRITE_ZEROES).
    pub fn mutates(&self) -> bool {
        matches!(self.kind, Kind::Write | Kind::Trim | Kind::Zero)
    }

    /// Whether the op leaves zeros.
    pub fn zeroes(&self) -> bool {
        matches!(self.kind, Kind::Trim | Kind::Zero)
    }

    /// When the op was acknowledged; `None`: it may take effect at any time (error or cut).
    pub fn acked(&self) -> Option<Time> {
        (self.outcome == Outcome::Ok).then_some(self.comp)
    }

    pub fn covers(&self, sector: u64) -> bool {
        sector >= self.sector && sector < self.sector + self.sectors
    }
}

/// Nanoseconds as milliseconds for reports.
pub fn ms(t: Time) -> String {
    format!("{:.3}ms", t as f64 / 1e6)
}
