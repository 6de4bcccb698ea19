//! The client side: a tonic connector that dials TCP (with the keepalive and nodelay settings of
//! `client::channel`), runs the TLS handshake with ALPN h2 and our certificate, and accepts the
//! server only if its certificate chains to our CA and names an engine (of the expected volume
//! when the caller knows it).

use std::{
    future::Future,
    path::Path,
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use http::Uri;
use hyper_util::{client::legacy::connect::HttpConnector, rt::TokioIo};
use rustls::{pki_types::ServerName, ClientConfig};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::{
    identity::{Identity, VolumeRef},
    material::{anonymous_client_config, TlsSource},
    mint::{identity_of_der, TlsError},
};

#[derive(Clone)]
enum Creds {
    Source(TlsSource),
    /// Trusts the CA, presents no certificate.
    Anonymous(Arc<ClientConfig>),
}

/// A client's TLS credentials and what it expects of the server.
#[derive(Clone)]
pub struct ClientTls {
    creds: Creds,
    expect: Option<VolumeRef>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("ClientTls");
        match &self.creds {
            Creds::Source(s) => d.field("source", s),
            Creds::Anonymous(_) => d.field("source", &"anonymous"),
        };
        d.field("expect", &self.expect).finish()
    }
}

impl ClientTls {
    /// Credentials that follow `source` (reloaded when it is).
    pub fn new(source: TlsSource) -> Self {
        Self {
            creds: Creds::Source(source),
            expect: None,
        }
    }

    /// No certificate, only trust in `ca_pem`: for probing which certificate an engine serves
    /// ([`server_certificate`]) and for tests. An engine with TLS refuses every call from it.
    pub fn anonymous(ca_pem: &str) -> Result<Self, TlsError> {
        Ok(Self {
            creds: Creds::Anonymous(anonymous_client_config(ca_pem.as_bytes())?),
            expect: None,
        })
    }

    fn config(&self) -> Arc<ClientConfig> {
        match &self.creds {
            Creds::Source(s) => s.current().client_config(),
            Creds::Anonymous(c) => Arc::clone(c),
        }
    }

    /// Loads `ca.crt`, `tls.crt`, `tls.key` from `dir` once (call [`TlsSource::watch`] on
    /// [`ClientTls::source`] to follow rotations).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, TlsError> {
        Ok(Self::new(TlsSource::from_dir(dir)?))
    }

    /// Credentials given as PEM (e.g. from a Secret).
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        Ok(Self::new(TlsSource::from_pem(ca_pem, cert_pem, key_pem)?))
    }

    /// Accepts only an engine of `volume` as the server.
    pub fn expect_volume(mut self, volume: VolumeRef) -> Self {
        self.expect = Some(volume);
        self
    }

    /// The material behind these credentials (None for [`ClientTls::anonymous`]).
    pub fn source(&self) -> Option<&TlsSource> {
        match &self.creds {
            Creds::Source(s) => Some(s),
            Creds::Anonymous(_) => None,
        }
    }

    /// Whether `server` may answer this client.
    fn accepts(&self, server: &Identity) -> Result<(), String> {
        match (server, &self.expect) {
            (Identity::Engine { volume }, Some(want)) if volume != want => Err(format!(
                "the server is the {server}, expected an engine of {want}"
            )),
            (Identity::Engine { .. }, _) => Ok(()),
            (other, _) => Err(format!("the server is the {other}, not an engine")),
        }
    }
}

static DEFAULT: RwLock<Option<ClientTls>> = RwLock::new(None);

/// Sets the credentials every `client::channel` (and `EngineClient::connect`) of this process
/// uses; None goes back to plaintext. The engine sets its own identity at start, so every
/// engine-to-engine channel is mutual TLS.
pub fn set_default_client(tls: Option<ClientTls>) {
    match DEFAULT.write() {
        Ok(mut g) => *g = tls,
        Err(p) => *p.into_inner() = tls,
    }
}

/// The process-wide client credentials, if set.
pub fn default_client() -> Option<ClientTls> {
    match DEFAULT.read() {
        Ok(g) => g.clone(),
        Err(p) => p.into_inner().clone(),
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A tower connector for `Endpoint::connect_with_connector`.
#[derive(Clone)]
pub(crate) struct TlsConnector {
    tcp: HttpConnector,
    tls: ClientTls,
}

impl TlsConnector {
    /// `keepalive`: TCP keepalive idle time, interval and probes (as `client::channel`'s).
    pub(crate) fn new(
        tls: ClientTls,
        connect_timeout: Duration,
        keepalive: (Duration, Duration, u32),
    ) -> Self {
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(connect_timeout));
        tcp.set_keepalive(Some(keepalive.0));
        tcp.set_keepalive_interval(Some(keepalive.1));
        tcp.set_keepalive_retries(Some(keepalive.2));
        Self { tcp, tls }
    }
}

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.tcp.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let host = uri
            .host()
            .unwrap_or("engine")
            .trim_matches(['[', ']'])
            .to_string();
        let dial = self.tcp.call(uri);
        let tls = self.tls.clone();
        Box::pin(async move {
            let tcp = dial.await?.into_inner();
            // SNI only; the name is not checked (the identity is, below).
            let name = ServerName::try_from(host)
                .unwrap_or(ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
            Ok(TokioIo::new(handshake(&tls, name, tcp).await?.0))
        })
    }
}

/// The TLS handshake as `tls`, then the identity check; returns the stream and the server's
/// leaf certificate (DER).
async fn handshake(
    tls: &ClientTls,
    name: ServerName<'static>,
    tcp: TcpStream,
) -> Result<(TlsStream<TcpStream>, Vec<u8>), BoxError> {
    let stream = tokio_rustls::TlsConnector::from(tls.config())
        .connect(name, tcp)
        .await?;
    let server = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("the server sent no certificate")?
        .to_vec();
    let id = identity_of_der(&server)?;
    tls.accepts(&id)?;
    Ok((stream, server))
}

/// The certificate (DER) the engine at `addr` (`host:port`) serves to a new connection now,
/// after the same checks as a channel's (chain to our CA, an engine identity). Shows that a
/// rotation took effect.
pub async fn server_certificate(
    addr: &str,
    tls: &ClientTls,
    timeout: Duration,
) -> Result<Vec<u8>, BoxError> {
    tokio::time::timeout(timeout, async {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        Ok(handshake(tls, name, tcp).await?.1)
    })
    .await
    .map_err(|_| format!("no TLS handshake with {addr} within {timeout:?}"))?
}
