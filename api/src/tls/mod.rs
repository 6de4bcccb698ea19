//! Mutual TLS between Tandem's processes.
//!
//! Every gRPC peer proves who it is with a certificate whose URI SAN names an [`Identity`]:
//! an engine of one volume, the CSI node plugin of one volume on one node, or the operator. The
//! engine decides what each identity may call (see the engine's authorization table); a
//! certificate only says who, never what.
//!
//! - [`identity`]: the identities and their URI form.
//! - [`mint`]: a CA, certificates issued by it, and the `--tls-dir` layout (`ca.crt`, `tls.crt`,
//!   `tls.key`: a `kubernetes.io/tls` Secret plus its CA).
//! - [`material`]: that material loaded, checked and reloadable ([`TlsSource`]).
//! - [`server`]: the acceptor (plaintext or TLS per connection, the verdict on the peer as
//!   connection info, connection cap, handshake timeout).
//! - [`client`]: [`ClientTls`], the process-wide default ([`set_default_client`]) and the
//!   connector behind `client::channel_with`.

pub mod client;
pub mod identity;
pub mod material;
pub mod mint;
pub mod server;

pub use client::{default_client, set_default_client, ClientTls};
pub use identity::{Identity, VolumeRef};
pub use material::{Material, TlsSource};
pub use mint::{Ca, Issued, TlsError, CA_FILE, CA_KEY_FILE, CERT_FILE, KEY_FILE};
pub use server::{PeerAuth, PeerInfo};
