//! Liveness endpoint: `GET /healthz` (or `/livez`) answers 200 while the state directory takes writes and
//! the CSI socket accepts connections, 503 otherwise; `GET /metrics` shows each attachment's engine
//! link (from its daemon's `status.json`): reconnects, timeouts, connected, refused, gave up. Every
//! per-volume sample carries `namespace` and `volume` (as the operator's and the engines' metrics do,
//! so queries join on them), `node` (this plugin's node id) and `attachment` (the escaped volume id).
//! Any other path is 404. One request per connection.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use axum::{extract::State, http::StatusCode, routing::any, Router};
use tandem_api::http;
use tokio::net::{TcpListener, UnixStream};

use crate::service::state_dir_writable;

#[derive(Clone, Debug)]
pub struct HealthChecks {
    pub state_dir: PathBuf,
    pub csi_socket: PathBuf,
    /// This plugin's node id: the `node` label of its metrics.
    pub node: String,
}

impl HealthChecks {
    /// `Ok` when healthy, else the reason.
    pub async fn check(&self) -> Result<(), String> {
        let dir = self.state_dir.clone();
        tokio::task::spawn_blocking(move || state_dir_writable(&dir))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("state dir {}: {e}", self.state_dir.display()))?;
        tokio::time::timeout(
            Duration::from_secs(2),
            UnixStream::connect(&self.csi_socket),
        )
        .await
        .map_err(|_| "CSI socket: connect timed out".to_string())?
        .map_err(|e| format!("CSI socket {}: {e}", self.csi_socket.display()))?;
        Ok(())
    }
}

fn router(checks: HealthChecks) -> Router {
    let router = Router::new()
        .route("/healthz", any(healthz))
        .route("/livez", any(healthz))
        .route("/metrics", any(metrics))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(checks);
    http::one_request_per_connection(router)
}

async fn healthz(State(checks): State<HealthChecks>) -> (StatusCode, String) {
    match checks.check().await {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(why) => {
            tracing::warn!("liveness check failed: {why}");
            (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"))
        }
    }
}

async fn metrics(
    State(checks): State<HealthChecks>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    let dir = checks.state_dir.clone();
    let node = checks.node.clone();
    let page =
        tokio::task::spawn_blocking(move || metrics_page(&dir.join("attach"), &views(&dir), &node))
            .await
            .unwrap_or(Err(std::fmt::Error));
    http::metrics(&headers, page)
}

/// The point-in-time views this plugin holds (issue 18), from its state records: (escaped
/// volume id, view id, when taken). A view whose unstage never came, or could not delete it,
/// stays listed here until it is deleted.
fn views(state_dir: &std::path::Path) -> Vec<(String, String, u64)> {
    let records = crate::state::StateStore::open(state_dir).and_then(|s| s.list());
    records
        .map(|recs| {
            recs.into_iter()
                .filter_map(|r| {
                    let v = r.view?;
                    Some((crate::state::escape_id(&r.volume_id), v.id, v.created_unix))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Reverses [`crate::state::escape_id`]; `None` for a name it cannot have made.
fn unescape_id(key: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(key.len());
    let mut rest = key.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

/// A label value as the exposition format quotes it.
fn quoted(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The labels of an attachment's samples: `namespace` and `volume` from its volume id
/// (`namespace/name`, the name being the MirroredVolume's and the engine's volume), the node,
/// and the attachment key itself (kept: it was the only label before).
fn volume_labels(key: &str, node: &str) -> String {
    let id = unescape_id(key).unwrap_or_else(|| key.to_string());
    let (namespace, volume) = id.split_once('/').unwrap_or(("", id.as_str()));
    format!(
        "namespace=\"{}\",volume=\"{}\",node=\"{}\",attachment=\"{}\"",
        quoted(namespace),
        quoted(volume),
        quoted(node),
        quoted(key)
    )
}

/// The attachments' link counters, one labelled sample per attachment (its directory name, the
/// escaped volume id), read from the daemons' status files; and each view's creation time.
fn metrics_page(
    attach_root: &std::path::Path,
    views: &[(String, String, u64)],
    node: &str,
) -> Result<String, std::fmt::Error> {
    use std::fmt::Write as _;
    let mut links: Vec<(String, crate::nbd::LinkState)> = std::fs::read_dir(attach_root)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let bytes = std::fs::read(crate::fusefs::status_path(&e.path())).ok()?;
                    let st: crate::fusefs::DaemonStatus = serde_json::from_slice(&bytes).ok()?;
                    Some((e.file_name().to_string_lossy().into_owned(), st.link))
                })
                .collect()
        })
        .unwrap_or_default();
    links.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = String::new();
    type Field = fn(&crate::nbd::LinkState) -> u64;
    let families: [(&str, &str, &str, Field); 5] = [
        (
            "tandem_csi_nbd_reconnects",
            "counter",
            "engine connections re-established (engine restarts, link flaps)",
            |l| l.reconnects,
        ),
        (
            "tandem_csi_nbd_timeouts",
            "counter",
            "requests failed with ETIMEDOUT on a live connection",
            |l| l.timeouts,
        ),
        (
            "tandem_csi_nbd_connected",
            "gauge",
            "1 while the engine connection is up",
            |l| u64::from(l.connected),
        ),
        (
            "tandem_csi_nbd_refused",
            "gauge",
            "1 while the engine refuses the pinned export (fenced: I/O fails)",
            |l| u64::from(l.refused),
        ),
        (
            "tandem_csi_nbd_gave_up",
            "gauge",
            "1 once the engine was unreachable past the reconnect limit (I/O fails)",
            |l| u64::from(l.gave_up),
        ),
    ];
    for (name, kind, help, field) in families {
        writeln!(out, "# TYPE {name} {kind}")?;
        writeln!(out, "# HELP {name} {help}")?;
        let suffix = if kind == "counter" { "_total" } else { "" };
        for (key, link) in &links {
            writeln!(
                out,
                "{name}{suffix}{{{}}} {}",
                volume_labels(key, node),
                field(link)
            )?;
        }
    }
    let name = "tandem_csi_view_created_seconds";
    writeln!(out, "# TYPE {name} gauge")?;
    writeln!(
        out,
        "# HELP {name} Unix time a point-in-time view held for a read-only stage was taken"
    )?;
    for (key, id, created) in views {
        writeln!(
            out,
            "{name}{{{},view=\"{}\"}} {created}",
            volume_labels(key, node),
            quoted(id)
        )?;
    }
    out.push_str("# EOF\n");
    Ok(out)
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, checks: HealthChecks) {
    if let Err(e) = http::serve(listener, router(checks), std::future::pending()).await {
        tracing::warn!("health endpoint: {e}");
    }
}

pub async fn bind(addr: &str) -> std::io::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr).await?;
    let a = l.local_addr()?;
    Ok((l, a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn healthz_follows_the_socket_and_the_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("csi.sock");
        let checks = HealthChecks {
            state_dir: dir.path().to_path_buf(),
            csi_socket: sock.clone(),
            node: "n1".into(),
        };
        let (l, addr) = bind("127.0.0.1:0").await.unwrap();
        let task = tokio::spawn(serve(l, checks));
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 503"));
        let _listener = tokio::net::UnixListener::bind(&sock).unwrap();
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/other").await.starts_with("HTTP/1.1 404"));
        task.abort();
    }

    #[tokio::test]
    async fn metrics_count_each_attachments_reconnects() {
        let dir = tempfile::tempdir().unwrap();
        let att = dir.path().join("attach").join("default%2Fpv-1");
        std::fs::create_dir_all(&att).unwrap();
        let status = crate::fusefs::DaemonStatus {
            pid: 1,
            size: 4096,
            link: crate::nbd::LinkState {
                connected: true,
                reconnects: 3,
                ..Default::default()
            },
            ..Default::default()
        };
        std::fs::write(
            crate::fusefs::status_path(&att),
            serde_json::to_vec(&status).unwrap(),
        )
        .unwrap();
        let checks = HealthChecks {
            state_dir: dir.path().to_path_buf(),
            csi_socket: dir.path().join("csi.sock"),
            node: "node-a".into(),
        };
        let (l, addr) = bind("127.0.0.1:0").await.unwrap();
        let task = tokio::spawn(serve(l, checks));
        let page = get(addr, "/metrics").await;
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        assert!(
            page.contains(
                "tandem_csi_nbd_reconnects_total{namespace=\"default\",volume=\"pv-1\",\
                 node=\"node-a\",attachment=\"default%2Fpv-1\"} 3\n"
            ),
            "{page}"
        );
        assert!(
            page.contains(
                "tandem_csi_nbd_connected{namespace=\"default\",volume=\"pv-1\",\
                 node=\"node-a\",attachment=\"default%2Fpv-1\"} 1\n"
            ),
            "{page}"
        );
        tandem_testkit::promtool_check_metrics(&page);
        task.abort();
    }

    /// The labels come back from the attachment key whatever the id held; a key escape_id could
    /// not have made still gets a sample (under its own name), quoted for the exposition format.
    #[test]
    fn volume_labels_come_from_the_escaped_id() {
        let key = crate::state::escape_id("team-a/.data \"x\"");
        assert_eq!(
            volume_labels(&key, "n1"),
            format!(
                "namespace=\"team-a\",volume=\".data \\\"x\\\"\",node=\"n1\",attachment=\"{key}\""
            )
        );
        assert_eq!(
            volume_labels("bad%G1", "n1"),
            "namespace=\"\",volume=\"bad%G1\",node=\"n1\",attachment=\"bad%G1\""
        );
    }

    /// A view held for a staging shows with the time it was taken, until its record goes.
    #[tokio::test]
    async fn metrics_list_each_view_with_when_it_was_taken() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::state::StateStore::open(dir.path()).unwrap();
        let rec = crate::state::VolumeRecord {
            volume_id: "default/pv-1".into(),
            engine_volume: "vol".into(),
            staging_path: "/s".into(),
            access: crate::state::Access::Block,
            read_only: true,
            engine_node: "a".into(),
            epoch: 1,
            attachment: None,
            staged: false,
            publications: Default::default(),
            view: Some(crate::state::ViewRecord {
                id: "view-00000000000000aa".into(),
                grpc: "a:1".into(),
                token: "t".into(),
                tls: Default::default(),
                created_unix: 1_700_000_000,
            }),
        };
        store.save(&rec).unwrap();
        let page = metrics_page(&dir.path().join("attach"), &views(dir.path()), "node-b").unwrap();
        assert!(
            page.contains(
                "tandem_csi_view_created_seconds{namespace=\"default\",volume=\"pv-1\",\
                 node=\"node-b\",attachment=\"default%2Fpv-1\",\
                 view=\"view-00000000000000aa\"} 1700000000\n"
            ),
            "{page}"
        );
        tandem_testkit::promtool_check_metrics(&page);
        store.remove("default/pv-1").unwrap();
        let page = metrics_page(&dir.path().join("attach"), &views(dir.path()), "node-b").unwrap();
        assert!(!page.contains("view-00000000000000aa"), "{page}");
    }
}
