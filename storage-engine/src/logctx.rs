//! The volume, epoch and role on every log line of `serve` (JSON fields, or a text prefix): a
//! formatter wrapped around tracing-subscriber's, reading the volume once it is open. Spawned tasks
//! need no span for it, so no line can miss them.

use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock, Weak,
    },
};

use tracing::{Event, Subscriber};
use tracing_subscriber::{
    fmt::{format::Writer, FmtContext, FormatEvent, FormatFields},
    registry::LookupSpan,
};

use crate::{state::Role, volume::Volume};

static VOLUME: OnceLock<Weak<Volume>> = OnceLock::new();
/// The last epoch read, for a line logged while the metadata lock is held.
static LAST_EPOCH: AtomicU64 = AtomicU64::new(0);

/// From now on every line carries this volume's name, epoch and role.
pub fn set(volume: &Arc<Volume>) {
    let _ = VOLUME.set(Arc::downgrade(volume));
}

/// (volume, epoch, role) now, or None before the volume is open (and outside `serve`).
fn context() -> Option<(String, u64, &'static str)> {
    let v = VOLUME.get()?.upgrade()?;
    let epoch = match v.try_epoch() {
        Some(e) => {
            LAST_EPOCH.store(e, Ordering::Relaxed);
            e
        }
        None => LAST_EPOCH.load(Ordering::Relaxed),
    };
    let role = match v.role() {
        Role::Primary => "primary",
        Role::Secondary => "secondary",
        Role::Fenced => "fenced",
    };
    Some((v.name().to_string(), epoch, role))
}

/// Wraps a formatter: JSON lines get `volume`, `epoch` and `role` fields at the top level; text
/// lines a `volume=.. epoch=.. role=..` prefix.
pub struct WithVolume<F> {
    pub inner: F,
    pub json: bool,
}

impl<S, N, F> FormatEvent<S, N> for WithVolume<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let Some((volume, epoch, role)) = context() else {
            return self.inner.format_event(ctx, writer, event);
        };
        if !self.json {
            write!(writer, "volume={volume} epoch={epoch} role={role} ")?;
            return self.inner.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(line.trim_end()) {
            Ok(mut obj) => {
                obj.insert("volume".into(), volume.into());
                obj.insert("epoch".into(), epoch.into());
                obj.insert("role".into(), role.into());
                let out = serde_json::to_string(&obj).map_err(|_| fmt::Error)?;
                writeln!(writer, "{out}")
            }
            // Not an object (never, from the JSON formatter): pass the line on unchanged.
            Err(_) => writer.write_str(&line),
        }
    }
}
