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

pub mod identity;
pub mod mint;

pub use identity::{Identity, VolumeRef};
pub use mint::{Ca, Issued, TlsError, CA_FILE, CERT_FILE, KEY_FILE};
