//! Tandem's CSI node plugin (`tandem-csi`): the CSI Identity and Node services over a unix socket.
//! NodeStageVolume finds the volume's primary engine (taking over when this node holds the
//! secondary), attaches its NBD export as a block device, and formats/mounts it; NodePublishVolume
//! bind-mounts it for the pod. See csi-node/README.md and the ARCHITECTURE section.
//!
//! Layout: `service` (gRPC adapters) → `node` (logic) → `engine` / `attach` / `mount` (side effects,
//! each behind a trait) and `state` (the durable record). `nbd` + `fusefs` are the attach daemon.

/// Generated CSI v1 types and stubs (our own subset of csi.proto, spec names and field numbers).
/// Public so that test clients (the e2e suite playing kubelet) can speak CSI.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("csi.v1");
}

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
