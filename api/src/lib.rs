//! Tandem's shared API: what the engine, the CSI node plugin, the operator and the test harnesses
//! agree on, in one crate that links none of the engine's internals.
//!
//! - [`pb`]: the engine's gRPC types and stubs (`tandem.engine.v1`), [`client`]: the typed client.
//! - [`csi`]: the CSI v1 subset (Identity, Node, Controller) Tandem serves.
//! - [`Reason`]: why the engine refused a call, carried as `google.rpc.ErrorInfo` in the status.
//! - [`nbd`]: the NBD wire codec, server and client side.
//! - [`contract`]: the names the operator writes and the CSI plugin reads.
//! - [`size`]: human sizes (`64M`).
//! - [`lease`]: the write lease's guard, the engine's promise and the witness's wait.
//! - [`http`]: the one HTTP stack (axum) the three binaries serve probes and metrics with, bounded.
//! - [`accept`]: accept loops that back off when descriptors run out instead of spinning.
//! - [`authority`]: CSI unix sockets that accept any HTTP/2 `:authority` (Python gRPC sends the path).
//! - [`tls`]: who is who on a gRPC channel ([`tls::Identity`]) and minting the certificates that say so.

/// Generated protobuf types and gRPC stubs for `tandem.engine.v1`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("tandem.engine.v1");
}

/// Generated CSI v1 types and stubs (`csi.v1`): Tandem's own subset of the specification's csi.proto
/// (spec names and field numbers), shared by the node plugin, the operator's CSI controller and the
/// test clients that play kubelet or the sidecars.
#[allow(clippy::all, missing_docs)]
pub mod csi {
    tonic::include_proto!("csi.v1");

    /// GetPluginInfo's answer, the same for the node plugin and the controller (one driver).
    pub fn plugin_info() -> GetPluginInfoResponse {
        GetPluginInfoResponse {
            name: crate::contract::CSI_DRIVER.to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }
    }
}

pub mod accept;
pub mod authority;
pub mod client;
pub mod contract;
pub mod http;
pub mod lease;
pub mod nbd;
mod reason;
pub mod size;
mod states;
pub mod tls;

pub use reason::{Reason, REASON_DOMAIN};
