//! The one HTTP stack of Tandem's binaries (axum over HTTP/1): the engine's metrics, the CSI plugin's
//! liveness probe and the operator's probes and metrics. Each binary keeps its own router; what they
//! share lives here, in the API crate all three depend on: the response helpers and [`serve`], which
//! bounds every endpoint (connections, a deadline per connection, accept back-off).

use std::{
    fmt,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    http::{header, HeaderValue, StatusCode},
    middleware,
    response::{IntoResponse, Response},
    Router,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Sleep,
};

use crate::accept;

/// Content type of the metrics pages (the OpenMetrics text that prometheus-client encodes).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A metrics page as a response; 500 when it could not be encoded.
pub fn openmetrics(page: Result<String, fmt::Error>) -> Response {
    match page {
        Ok(body) => ([(header::CONTENT_TYPE, OPENMETRICS)], body).into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            "encoding failed",
        )
            .into_response(),
    }
}

/// Content type of the classic Prometheus text format (what `promtool check metrics` reads).
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metrics page as the scraper asked for it: OpenMetrics when its `Accept` names it (Prometheus
/// does), else the classic text format, which every scraper and `promtool` read; 500 when the page
/// could not be encoded.
pub fn metrics(headers: &axum::http::HeaderMap, page: Result<String, fmt::Error>) -> Response {
    let wants_openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    match page {
        Ok(body) if !wants_openmetrics => (
            [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
            to_prometheus_text(&body),
        )
            .into_response(),
        page => openmetrics(page),
    }
}

/// OpenMetrics text to the classic format: a counter family is named with its `_total` suffix,
/// `# UNIT` and `# EOF` lines go (the classic format has neither), and `_created` samples too.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        match meta {
            Some((kind, rest)) => {
                let name = rest.split(' ').next().unwrap_or(rest);
                out.push_str(kind);
                out.push_str(name);
                if counters.contains(name) && !name.ends_with("_total") {
                    out.push_str("_total");
                }
                out.push_str(&rest[name.len()..]);
            }
            None => {
                let name = line.split(['{', ' ']).next().unwrap_or(line);
                if name
                    .strip_suffix("_created")
                    .is_some_and(|n| counters.contains(n))
                {
                    continue;
                }
                out.push_str(line);
            }
        }
        out.push('\n');
    }
    out
}

/// Closes the connection after each response. The engine's and the CSI plugin's clients (kubelet probes,
/// scrapers, tests) send one request per connection and read until the server closes it.
pub fn one_request_per_connection(router: Router) -> Router {
    router.layer(middleware::map_response(close))
}

async fn close(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Bounds on one HTTP listener. Every Tandem endpoint answers small pages to probes and scrapers, so
/// a few connections and a few seconds each are plenty; anything beyond is a stuck or hostile client.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open connections at most; one more is closed at once (and counted).
    pub max_connections: usize,
    /// How long a connection may live, from accept: reading the request head, answering, sending.
    pub timeout: Duration,
}

/// The bounds [`serve`] uses.
pub const LIMITS: Limits = Limits {
    max_connections: 32,
    timeout: Duration::from_secs(10),
};

/// What a bounded listener refused; a binary renders these on its metrics page.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections closed at once because `max_connections` were open.
    pub refused: AtomicU64,
    /// Connections closed because they outlived `timeout` (a client that sends nothing, or reads slowly).
    pub timed_out: AtomicU64,
    /// accept(2) failures that paused the listener (descriptors or memory exhausted).
    pub accept_errors: AtomicU64,
}

/// Serves `router` on `listener` until `stop` completes, within [`LIMITS`]; requests in flight are
/// answered first.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    stop: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    serve_bounded(listener, router, stop, LIMITS, Arc::default()).await
}

/// [`serve`] with explicit bounds, counting what it refuses in `stats`.
pub async fn serve_bounded(
    listener: TcpListener,
    router: Router,
    stop: impl Future<Output = ()> + Send + 'static,
    limits: Limits,
    stats: Arc<Stats>,
) -> io::Result<()> {
    let listener = Bounded {
        inner: listener,
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        timeout: limits.timeout,
        stats,
        backoff: accept::Backoff::new("http"),
    };
    axum::serve(listener, router)
        .with_graceful_shutdown(stop)
        .await
}

/// A TCP listener that admits at most `slots` connections and gives each a deadline.
struct Bounded {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    timeout: Duration,
    stats: Arc<Stats>,
    backoff: accept::Backoff,
}

impl axum::serve::Listener for Bounded {
    type Io = Deadlined;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Deadlined, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    self.backoff.succeeded();
                    // Limit: a full endpoint closes the newcomer at once rather than queueing it, so
                    // stuck clients cost one slot each and never the process's descriptors
                    // (api::http tests `over_the_cap_*`, storage-engine tests/nbd_limits.rs `http_*`).
                    let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() else {
                        self.stats.refused.fetch_add(1, Ordering::Relaxed);
                        drop(stream);
                        continue;
                    };
                    let io = Deadlined {
                        inner: stream,
                        deadline: Box::pin(tokio::time::sleep(self.timeout)),
                        expired: false,
                        stats: Arc::clone(&self.stats),
                        _slot: slot,
                    };
                    return (io, addr);
                }
                Err(e) => self.backoff.failed(&e, &self.stats.accept_errors).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// An accepted connection that fails its reads and writes once its deadline passes (hyper then
/// drops it, which closes the socket and frees the slot). The deadline covers the request head too:
/// a client that connects and sends nothing is closed after `timeout`.
struct Deadlined {
    inner: TcpStream,
    deadline: Pin<Box<Sleep>>,
    expired: bool,
    stats: Arc<Stats>,
    _slot: OwnedSemaphorePermit,
}

impl Deadlined {
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.expired && self.deadline.as_mut().poll(cx).is_ready() {
            self.expired = true;
            self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
        }
        if self.expired {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection outlived the endpoint's timeout",
            ));
        }
        Ok(())
    }
}

impl AsyncRead for Deadlined {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Deadlined {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn answers_then_closes_and_stops_on_signal() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route("/m", get(|| async { openmetrics(Ok("# EOF\n".into())) }));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            one_request_per_connection(router),
            async move {
                let _ = stop_rx.await;
            },
        ));
        // No `Connection: close` from the client: the server closes anyway, so reading to the end returns.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /m HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut page = String::new();
        s.read_to_string(&mut page).await.unwrap();
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        assert!(page.contains(OPENMETRICS), "{page}");
        assert!(page.ends_with("# EOF\n"), "{page}");
        stop_tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[test]
    fn classic_text_names_counters_with_their_suffix_and_drops_the_eof() {
        let om = "# HELP x_bytes Bytes.\n# TYPE x_bytes counter\nx_bytes_total{v=\"a\"} 3\nx_bytes_created 1.0\n\
                  # HELP x_lag_seconds Lag.\n# TYPE x_lag_seconds gauge\n# UNIT x_lag_seconds seconds\nx_lag_seconds 0.5\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP x_bytes_total Bytes.\n# TYPE x_bytes_total counter\nx_bytes_total{v=\"a\"} 3\n\
             # HELP x_lag_seconds Lag.\n# TYPE x_lag_seconds gauge\nx_lag_seconds 0.5\n"
        );
    }

    #[test]
    fn openmetrics_only_when_asked() {
        let mut h = axum::http::HeaderMap::new();
        let page = || Ok("# TYPE c counter\nc_total 1\n# EOF\n".to_string());
        let plain = metrics(&h, page());
        assert_eq!(plain.headers()[header::CONTENT_TYPE], PROMETHEUS_TEXT);
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
        );
        assert_eq!(
            metrics(&h, page()).headers()[header::CONTENT_TYPE],
            OPENMETRICS
        );
    }

    async fn bounded(limits: Limits) -> (SocketAddr, Arc<Stats>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let router = Router::new().route("/m", get(|| async { "page" }));
        tokio::spawn(serve_bounded(
            listener,
            one_request_per_connection(router),
            std::future::pending(),
            limits,
            Arc::clone(&stats),
        ));
        (addr, stats)
    }

    async fn get_page(addr: SocketAddr) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /m HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut page = String::new();
        let _ = s.read_to_string(&mut page).await;
        page
    }

    /// Reads until the server closes; how long that took.
    async fn closed_after(s: &mut tokio::net::TcpStream) -> Duration {
        let t = std::time::Instant::now();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf)).await;
        assert!(buf.is_empty(), "{buf:?}");
        t.elapsed()
    }

    #[tokio::test]
    async fn a_silent_client_is_closed_at_the_deadline() {
        let limits = Limits {
            max_connections: 4,
            timeout: Duration::from_millis(300),
        };
        let (addr, stats) = bounded(limits).await;
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        // Half a request head is no better than none.
        silent.write_all(b"GET /m HT").await.unwrap();
        let took = closed_after(&mut silent).await;
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(5),
            "{took:?}"
        );
        assert_eq!(stats.timed_out.load(Ordering::Relaxed), 1);
        assert!(get_page(addr).await.ends_with("page"));
    }

    #[tokio::test]
    async fn over_the_cap_a_connection_is_closed_at_once_and_counted() {
        let limits = Limits {
            max_connections: 3,
            timeout: Duration::from_secs(30),
        };
        let (addr, stats) = bounded(limits).await;
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
        let took = closed_after(&mut extra).await;
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert_eq!(stats.refused.load(Ordering::Relaxed), 1);
        // A slot freed is a slot usable: the endpoint answers again.
        held.pop();
        let page = loop {
            let p = get_page(addr).await;
            if !p.is_empty() {
                break p;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(page.ends_with("page"), "{page}");
    }
}
