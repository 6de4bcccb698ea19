//! NBD: the host-facing block protocol (fixed newstyle). `proto` is the wire format and `client` a
//! plain async client (both in the shared API crate), `server` the handshake and the pipelined
//! transmission phase.

pub use tandem_api::nbd::{self as proto, client};
pub mod server;

pub use server::{serve_tcp, serve_unix, Admission, Policy};
