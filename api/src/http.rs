//! The one HTTP stack of Tandem's binaries (axum over HTTP/1): the engine's metrics, the CSI plugin's
//! liveness probe and the operator's probes and metrics. Each binary keeps its own router; what they
//! share lives here, in the API crate all three depend on.

use std::{fmt, future::Future, io};

use axum::{
    http::{header, HeaderValue, StatusCode},
    middleware,
    response::{IntoResponse, Response},
    Router,
};
use tokio::net::TcpListener;

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

/// Serves `router` on `listener` until `stop` completes; requests in flight are answered first.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    stop: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(stop)
        .await
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
}
