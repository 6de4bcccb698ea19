//! Tandem's CSI node plugin (`tandem-csi`): the CSI Identity and Node services over a unix socket.
//! NodeStageVolume finds the volume's primary engine (taking over when this node holds the
//! secondary), attaches its NBD export as a block device, and formats/mounts it; NodePublishVolume
//! bind-mounts it for the pod. See csi-node/README.md and the ARCHITECTURE section.
//!
//! Layout: `service` (gRPC adapters) → `node` (logic) → `engine` / `attach` / `mount` (side effects,
//! each behind a trait) and `state` (the durable record). `nbd` + `fusefs` are the attach daemon.

/// The CSI v1 types and stubs, generated in `tandem_api::csi` (shared with the operator's CSI
/// controller); re-exported here so test clients (the e2e suite playing kubelet) keep one path.
pub use tandem_api::csi as pb;

pub mod attach;
pub mod cli;
pub mod command;
pub mod context;
pub mod engine;
pub mod error;
pub mod fusefs;
pub mod health;
pub mod mount;
pub mod nbd;
pub mod node;
pub mod service;
pub mod state;
