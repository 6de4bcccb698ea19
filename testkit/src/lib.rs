//! Test support for the Tandem workspace, used by tests only (a dev-dependency, or by the test-only
//! crates e2e and campaign): one locator for the workspace's binaries ([`Bin`]), one launcher for
//! `tandem-engine serve` processes and pairs ([`EngineBuilder`], [`PairBuilder`]), the data patterns
//! tests write and compare ([`pattern`]), and the external tools they drive (qemu-io, ...).
//!
//! Set-up failures are errors ([`anyhow::Result`]) where a caller might handle them (the campaign
//! restarting an engine) and panics with the reason where only a test calls.

mod bin;
mod data;
mod engine;
pub mod h2raw;
mod pair;
mod tools;

pub use bin::Bin;
pub use data::{file_block_is, file_bytes, pattern};
pub use engine::{refusal_reason, Engine, EngineBuilder, NBD_OFF};
pub use pair::{Pair, PairBuilder};
pub use tools::{
    block_reads, free_port, promtool_check_metrics, put_block, qemu_io, qemu_io_ok, qemu_io_passed,
    run, run_ok, tail, wait_until,
};
