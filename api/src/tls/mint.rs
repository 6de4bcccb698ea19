//! Minting: a CA and the certificates it issues, and the `--tls-dir` layout.
//!
//! The operator keeps one CA (a Secret in its own namespace) and issues each volume's engines and
//! CSI plugins their certificates; `tandem-engine certs` does the same for tools and tests. Keys
//! are ECDSA P-256. Every leaf may act as client and server (an engine is both), and says who it is
//! only through its URI SAN ([`Identity`]).

use std::{
    fs,
    io::Write,
    path::Path,
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use super::identity::{BadIdentity, Identity};

/// The CA certificate in a `--tls-dir` (and in a Secret beside `tls.crt`/`tls.key`).
pub const CA_FILE: &str = "ca.crt";
/// This process's certificate (PEM).
pub const CERT_FILE: &str = "tls.crt";
/// This process's private key (PEM, PKCS#8).
pub const KEY_FILE: &str = "tls.key";

/// The CA's private key, beside `ca.crt` in a CA directory (`tandem-engine certs ca`); never in
/// a `--tls-dir`.
pub const CA_KEY_FILE: &str = "ca.key";

/// Clock skew tolerated between the issuer and whoever checks the certificate.
const BACKDATE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot generate or sign: {0}")]
    Mint(#[from] rcgen::Error),
    #[error("{what} is not a valid PEM certificate")]
    BadCertificate { what: String },
    #[error("{what} holds no Tandem identity: {why}")]
    NoIdentity { what: String, why: String },
    #[error(transparent)]
    Identity(#[from] BadIdentity),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn validity(params: &mut CertificateParams, valid_for: Duration) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + valid_for;
}

/// A certificate authority: its certificate and key, as PEM.
#[derive(Clone)]
pub struct Ca {
    cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for Ca {
    // The key never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

/// A certificate issued by a [`Ca`], with its key.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// A new self-signed CA named `common_name`, valid for `valid_for`.
    pub fn generate(common_name: &str, valid_for: Duration) -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, valid_for);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A CA kept earlier (e.g. in a Secret).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        // Both must parse now, so a damaged Secret is reported here and not at the first issue.
        KeyPair::from_pem(key_pem)?;
        Issuer::from_ca_cert_pem(cert_pem, KeyPair::from_pem(key_pem)?)?;
        Ok(Self {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// When the CA itself expires.
    pub fn not_after(&self) -> Result<SystemTime, TlsError> {
        not_after(&self.cert_pem)
    }

    /// Issues a certificate for `identity`, with `dns_names` as extra DNS SANs (the names a client
    /// dials; Tandem's own clients check the identity, not the name), valid for `valid_for`.
    pub fn issue(
        &self,
        identity: &Identity,
        dns_names: &[String],
        valid_for: Duration,
    ) -> Result<Issued, TlsError> {
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, KeyPair::from_pem(&self.key_pem)?)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.to_string());
        params.distinguished_name = dn;
        params
            .subject_alt_names
            .push(SanType::URI(identity.uri().try_into()?));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, valid_for);
        let cert = params.signed_by(&key, &issuer)?;
        let cert_pem = cert.pem();
        Ok(Issued {
            not_after: not_after(&cert_pem)?,
            cert_pem,
            key_pem: key.serialize_pem(),
        })
    }
}

fn first_pem_der(pem_text: &str, what: &str) -> Result<Vec<u8>, TlsError> {
    let bad = || TlsError::BadCertificate {
        what: what.to_string(),
    };
    let block = x509_parser::pem::parse_x509_pem(pem_text.as_bytes())
        .map_err(|_| bad())?
        .1;
    if block.label != "CERTIFICATE" {
        return Err(bad());
    }
    Ok(block.contents)
}

/// The DER bytes of the first certificate in `cert_pem`.
pub fn der_of_pem(cert_pem: &str) -> Result<Vec<u8>, TlsError> {
    first_pem_der(cert_pem, "certificate")
}

/// When a PEM certificate expires.
pub fn not_after(cert_pem: &str) -> Result<SystemTime, TlsError> {
    let der = first_pem_der(cert_pem, "certificate")?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|_| TlsError::BadCertificate {
        what: "certificate".to_string(),
    })?;
    let secs = cert.validity().not_after.timestamp();
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
}

/// The Tandem identity a DER certificate speaks for (its one `spiffe://tandem.dev/...` URI SAN).
pub fn identity_of_der(der: &[u8]) -> Result<Identity, TlsError> {
    let what = || "the peer's certificate".to_string();
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|_| TlsError::BadCertificate { what: what() })?;
    let mut found = None;
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name {
                    if found.is_some() {
                        return Err(TlsError::NoIdentity {
                            what: what(),
                            why: "more than one URI SAN".to_string(),
                        });
                    }
                    found = Some(Identity::parse(uri)?);
                }
            }
        }
    }
    found.ok_or_else(|| TlsError::NoIdentity {
        what: what(),
        why: "no URI SAN".to_string(),
    })
}

/// The identity in a PEM certificate (e.g. this process's own `tls.crt`).
pub fn identity_of_pem(cert_pem: &str) -> Result<Identity, TlsError> {
    identity_of_der(&first_pem_der(cert_pem, "certificate")?)
}

/// Writes `ca.crt`, `tls.crt` and `tls.key` into `dir` (created 0700 if missing), each by a
/// rename so a process reloading the directory never reads half a file; the key is 0600.
pub fn write_dir(dir: &Path, ca_pem: &str, issued: &Issued) -> Result<(), TlsError> {
    write_files(
        dir,
        &[
            (CA_FILE, ca_pem, 0o644),
            (CERT_FILE, issued.cert_pem.as_str(), 0o644),
            (KEY_FILE, issued.key_pem.as_str(), 0o600),
        ],
    )
}

fn write_files(dir: &Path, files: &[(&str, &str, u32)]) -> Result<(), TlsError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    for &(name, body, mode) in files {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        f.write_all(body.as_bytes()).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
    }
    Ok(())
}

/// Writes a CA directory: `ca.crt` and `ca.key` (0600), each by a rename.
pub fn write_ca_dir(dir: &Path, ca: &Ca) -> Result<(), TlsError> {
    write_files(
        dir,
        &[
            (CA_FILE, ca.cert_pem(), 0o644),
            (CA_KEY_FILE, ca.key_pem(), 0o600),
        ],
    )
}

/// Reads a CA directory written by [`write_ca_dir`].
pub fn read_ca_dir(dir: &Path) -> Result<Ca, TlsError> {
    let read = |n: &str| {
        let p = dir.join(n);
        fs::read_to_string(&p).map_err(io_err(&p))
    };
    Ca::from_pem(&read(CA_FILE)?, &read(CA_KEY_FILE)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::VolumeRef;

    const DAY: Duration = Duration::from_secs(86400);

    #[test]
    fn an_issued_certificate_carries_its_identity_and_expiry() -> Result<(), TlsError> {
        let ca = Ca::generate("tandem test CA", 10 * DAY)?;
        let id = Identity::Csi {
            volume: VolumeRef::new("ns", "vol"),
            node: "node-a".into(),
        };
        let issued = ca.issue(&id, &["vol-engine-a.ns.svc".to_string()], DAY)?;
        assert_eq!(identity_of_pem(&issued.cert_pem)?, id);
        let left = issued
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        assert!(
            left > DAY - Duration::from_secs(60) && left <= DAY,
            "{left:?}"
        );
        // A CA kept as PEM issues again.
        let again = Ca::from_pem(ca.cert_pem(), ca.key_pem())?;
        let op = again.issue(&Identity::Operator, &[], DAY)?;
        assert_eq!(identity_of_pem(&op.cert_pem)?, Identity::Operator);
        Ok(())
    }

    #[test]
    fn a_certificate_without_an_identity_is_refused() -> Result<(), TlsError> {
        let ca = Ca::generate("tandem test CA", DAY)?;
        assert!(matches!(
            identity_of_pem(ca.cert_pem()),
            Err(TlsError::NoIdentity { .. })
        ));
        assert!(matches!(
            identity_of_pem("not a pem"),
            Err(TlsError::BadCertificate { .. })
        ));
        assert!(Ca::from_pem(ca.cert_pem(), "garbage").is_err());
        Ok(())
    }

    #[test]
    fn a_tls_dir_is_written_whole_with_a_private_key() -> Result<(), TlsError> {
        use std::os::unix::fs::PermissionsExt;
        let ca = Ca::generate("tandem test CA", DAY)?;
        let issued = ca.issue(&Identity::Operator, &[], DAY)?;
        let tmp = tempfile::tempdir().map_err(io_err(Path::new("tempdir")))?;
        let dir = tmp.path().join("tls");
        write_dir(&dir, ca.cert_pem(), &issued)?;
        let key = dir.join(KEY_FILE);
        let mode = fs::metadata(&key)
            .map_err(io_err(&key))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let read = |n: &str| fs::read_to_string(dir.join(n)).map_err(io_err(&dir));
        assert_eq!(read(CA_FILE)?, ca.cert_pem());
        assert_eq!(read(CERT_FILE)?, issued.cert_pem);
        assert_eq!(read(KEY_FILE)?, issued.key_pem);
        Ok(())
    }
}
