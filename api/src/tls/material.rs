//! Loaded TLS material (the CA, this process's certificate and key) and the rustls configurations
//! built from it, reloadable from a `--tls-dir`.

use std::{
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime},
};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
    ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;

use super::{
    identity::Identity,
    mint::{identity_of_der, TlsError, CA_FILE, CERT_FILE, KEY_FILE},
};

/// Why a peer's certificate chain was refused, in words a log or a gRPC status may carry (never
/// key material).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal(pub String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// Verifies `chain` (end entity first) against `anchors` for `usage` at `now` (webpki: signatures,
/// validity, EKU) and returns the identity its URI SAN names.
pub(crate) fn check_chain(
    anchors: &[TrustAnchor<'static>],
    chain: &[CertificateDer<'_>],
    usage: webpki::KeyUsage,
    now: UnixTime,
) -> Result<Identity, Refusal> {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err(Refusal("no client certificate".into()));
    };
    let cert = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| Refusal(format!("malformed certificate ({e})")))?;
    cert.verify_for_usage(
        algorithms().all,
        anchors,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(|e| {
        Refusal(match e {
            webpki::Error::UnknownIssuer => {
                "certificate not signed by the trusted CA (unknown CA)".into()
            }
            webpki::Error::CertExpired { .. } => "certificate expired".into(),
            webpki::Error::CertNotValidYet { .. } => "certificate not valid yet".into(),
            webpki::Error::RequiredEkuNotFoundContext(_) => {
                "certificate not issued for this use (extended key usage)".into()
            }
            other => format!("certificate refused ({other})"),
        })
    })?;
    identity_of_der(leaf).map_err(|e| Refusal(format!("no Tandem identity: {e}")))
}

/// Server side: asks every client for a certificate but lets the handshake finish without one or
/// with one from another CA, so the refusal can be a gRPC UNAUTHENTICATED instead of a dropped
/// socket. The handshake signature is still checked here (the client holds the certificate's
/// key); the chain is checked once per connection by `server::establish`.
#[derive(Debug)]
struct DeferredClientVerifier {
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for DeferredClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Deferred, never skipped: server::establish runs check_chain before any call is served
        // (tls::refused_clients_get_unauthenticated).
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Client side: the server's chain must lead to our CA (EKU serverAuth, validity). No hostname
/// check: what counts is the identity in the URI SAN, checked by the connector after the
/// handshake (tests dial 127.0.0.1 and namespace IPs; pods dial Service names).
#[derive(Debug)]
struct ChainOnlyVerifier {
    anchors: Arc<[TrustAnchor<'static>]>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ChainOnlyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        check_chain(&self.anchors, &chain, webpki::KeyUsage::server_auth(), now)
            .map(|_| ServerCertVerified::assertion())
            .map_err(|r| rustls::Error::General(format!("engine certificate: {r}")))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// One generation of TLS material and the configurations built from it.
pub struct Material {
    identity: Identity,
    not_after: SystemTime,
    anchors: Arc<[TrustAnchor<'static>]>,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    stamp: u64,
}

impl std::fmt::Debug for Material {
    // Neither the key nor the configs (which hold it) reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("identity", &self.identity)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn bad(what: &str, why: &str) -> TlsError {
    TlsError::NoIdentity {
        what: what.to_string(),
        why: why.to_string(),
    }
}

fn stamp(parts: [&[u8]; 3]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

fn anchors_of(ca_pem: &[u8]) -> Result<Arc<[TrustAnchor<'static>]>, TlsError> {
    let bad_ca = || TlsError::BadCertificate {
        what: CA_FILE.into(),
    };
    let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(ca_pem)
        .collect::<Result<_, _>>()
        .map_err(|_| bad_ca())?;
    if cas.is_empty() {
        return Err(bad_ca());
    }
    Ok(cas
        .iter()
        .map(|c| webpki::anchor_from_trusted_cert(c).map(|a| a.to_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| bad_ca())?
        .into())
}

/// A client configuration that trusts `ca_pem` and presents no certificate (probes, tests: an
/// engine with TLS answers such a client UNAUTHENTICATED).
pub(crate) fn anonymous_client_config(ca_pem: &[u8]) -> Result<Arc<ClientConfig>, TlsError> {
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| bad("TLS configuration", &e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ChainOnlyVerifier {
            anchors: anchors_of(ca_pem)?,
            algs: algorithms(),
        }))
        .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(client))
}

impl Material {
    /// Builds the material from PEM text: the CA certificate(s), this process's certificate
    /// (chain, leaf first) and its PKCS#8 (or SEC1/PKCS#1) key.
    pub fn from_pem(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        let anchors = anchors_of(ca_pem)?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|_| TlsError::BadCertificate {
                what: CERT_FILE.into(),
            })?;
        let Some(leaf) = chain.first() else {
            return Err(TlsError::BadCertificate {
                what: CERT_FILE.into(),
            });
        };
        let identity = identity_of_der(leaf)?;
        // Our own certificate must chain to the CA we trust: a mismatched pair would be refused
        // by every peer, better to say so here.
        check_chain(
            &anchors,
            &chain,
            webpki::KeyUsage::client_auth(),
            UnixTime::now(),
        )
        .map_err(|r| bad(CERT_FILE, &r.0))?;
        let not_after = super::mint::not_after(&String::from_utf8_lossy(cert_pem))?;
        // The parse error is not shown: it could quote the file.
        let key = || {
            PrivateKeyDer::from_pem_slice(key_pem)
                .map_err(|_| bad(KEY_FILE, "no private key in PEM form"))
        };
        let provider = provider();
        let server = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| bad("TLS configuration", &e.to_string()))?
            .with_client_cert_verifier(Arc::new(DeferredClientVerifier { algs: algorithms() }))
            .with_single_cert(chain.clone(), key()?)
            .map_err(|e| bad(KEY_FILE, &format!("does not fit {CERT_FILE} ({e})")))?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| bad("TLS configuration", &e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnlyVerifier {
                anchors: Arc::clone(&anchors),
                algs: algorithms(),
            }))
            .with_client_auth_cert(chain, key()?)
            .map_err(|e| bad(KEY_FILE, &format!("does not fit {CERT_FILE} ({e})")))?;
        let mut server = server;
        server.alpn_protocols = vec![b"h2".to_vec()];
        let mut client = client;
        client.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            identity,
            not_after,
            anchors,
            server: Arc::new(server),
            client: Arc::new(client),
            stamp: stamp([ca_pem, cert_pem, key_pem]),
        })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// When this process's certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    pub(crate) fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    pub(crate) fn server_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.server)
    }

    pub(crate) fn client_config(&self) -> Arc<ClientConfig> {
        Arc::clone(&self.client)
    }
}

fn read(dir: &Path, name: &str) -> Result<Vec<u8>, TlsError> {
    let path = dir.join(name);
    std::fs::read(&path).map_err(|source| TlsError::Io {
        path: path.display().to_string(),
        source,
    })
}

struct Inner {
    dir: Option<PathBuf>,
    current: RwLock<Arc<Material>>,
    // Serializes reloads (a watcher and a test hook).
    reload: Mutex<()>,
}

/// Where a process's TLS material comes from: a `--tls-dir` (reloaded when its files change) or
/// PEM given once. Cheap to clone; clones share the current material.
#[derive(Clone)]
pub struct TlsSource {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TlsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSource")
            .field("dir", &self.inner.dir)
            .field("material", &*self.current())
            .finish()
    }
}

impl TlsSource {
    fn new(dir: Option<PathBuf>, m: Material) -> Self {
        Self {
            inner: Arc::new(Inner {
                dir,
                current: RwLock::new(Arc::new(m)),
                reload: Mutex::new(()),
            }),
        }
    }

    /// Loads `ca.crt`, `tls.crt` and `tls.key` from `dir`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, TlsError> {
        let dir = dir.as_ref();
        let m = Material::from_pem(
            &read(dir, CA_FILE)?,
            &read(dir, CERT_FILE)?,
            &read(dir, KEY_FILE)?,
        )?;
        Ok(Self::new(Some(dir.to_path_buf()), m))
    }

    /// Material given as PEM (e.g. from a Secret); never reloaded.
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let m = Material::from_pem(ca_pem.as_bytes(), cert_pem.as_bytes(), key_pem.as_bytes())?;
        Ok(Self::new(None, m))
    }

    /// The material new connections use now.
    pub fn current(&self) -> Arc<Material> {
        match self.inner.current.read() {
            Ok(g) => Arc::clone(&g),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    /// Who this process is.
    pub fn identity(&self) -> Identity {
        self.current().identity().clone()
    }

    /// Re-reads the directory: `Ok(true)` when new material is in use, `Ok(false)` when the files
    /// did not change (or there is no directory). On an error the old material stays in use.
    /// The identity may not change: a process is one identity for its life.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let Some(dir) = &self.inner.dir else {
            return Ok(false);
        };
        let _one = self.inner.reload.lock().unwrap_or_else(|p| p.into_inner());
        let (ca, cert, key) = (
            read(dir, CA_FILE)?,
            read(dir, CERT_FILE)?,
            read(dir, KEY_FILE)?,
        );
        let old = self.current();
        if stamp([&ca, &cert, &key]) == old.stamp {
            return Ok(false);
        }
        let m = Material::from_pem(&ca, &cert, &key)?;
        if m.identity != old.identity {
            return Err(bad(
                CERT_FILE,
                &format!(
                    "names {} but this process is {}; keeping the old certificate",
                    m.identity, old.identity
                ),
            ));
        }
        let m = Arc::new(m);
        match self.inner.current.write() {
            Ok(mut g) => *g = m,
            Err(p) => *p.into_inner() = m,
        }
        Ok(true)
    }

    /// Polls the directory every `every` until the runtime stops; logs each reload and each
    /// failed one (the old material stays in use). Live connections keep their session.
    pub fn watch(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let src = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let s = src.clone();
                match tokio::task::spawn_blocking(move || s.reload()).await {
                    Ok(Ok(true)) => {
                        let m = src.current();
                        let left = m
                            .not_after()
                            .duration_since(SystemTime::now())
                            .unwrap_or_default();
                        tracing::info!(
                            identity = %m.identity(),
                            expires_in_s = left.as_secs(),
                            "TLS certificates reloaded"
                        );
                    }
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "TLS directory not reloaded; the old certificates stay in use")
                    }
                    Err(e) => tracing::warn!(error = %e, "TLS reload task failed"),
                }
            }
        })
    }
}
