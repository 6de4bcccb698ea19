//! NBD: the host-facing block protocol (fixed newstyle). `proto` is the wire format, `server` the
//! handshake and the pipelined transmission phase.

pub mod client;
pub mod proto;
pub mod server;

pub use server::{serve_tcp, serve_unix};
