//! Tandem storage engine: serves one mirrored volume over NBD and talks to its peer over gRPC.
//! See ARCHITECTURE.md at the repository root and storage-engine/ARCHITECTURE.md for the on-disk format.

/// Generated protobuf types and gRPC stubs for `tandem.engine.v1`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("tandem.engine.v1");
}

pub mod bitmap;
pub mod cli;
pub mod client;
pub mod clock;
pub mod demo;
pub mod engine;
pub mod error;
pub mod format;
pub mod geometry;
pub mod grpc;
pub mod http;
pub mod journal;
pub mod meta;
pub mod metrics;
pub mod nbd;
pub mod repl;
pub mod seam;
pub mod size;
pub mod state;
pub mod store;
pub mod takeover;
pub mod volume;
