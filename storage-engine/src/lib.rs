//! Tandem storage engine: serves one mirrored volume over NBD and talks to its peer over gRPC.
//! See ARCHITECTURE.md at the repository root and storage-engine/ARCHITECTURE.md for the on-disk format.

// The API lives in its own crate (api/); these keep the engine's `crate::pb` and friends.
pub use tandem_api::{client, http, pb, size};

pub mod authz;
pub mod bitmap;
pub mod blocking;
pub mod cli;
pub mod clock;
pub mod demo;
pub mod engine;
pub mod error;
pub mod format;
pub mod geometry;
pub mod grpc;
pub mod journal;
pub mod lease;
pub mod logctx;
pub mod loss;
pub mod meta;
pub mod metrics;
pub mod nbd;
pub mod repl;
pub mod report;
pub mod seam;
pub mod snapshot;
pub mod state;
pub mod store;
pub mod takeover;
pub mod volume;
pub mod wipe;
