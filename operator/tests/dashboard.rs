//! The chart's Grafana dashboard and alert rules query only metrics that exist: every `tandem_*` name
//! in charts/tandem/files/dashboard.json and alerts.yaml is checked against a real engine's metrics
//! page and the operator's. (Neither queries the CSI plugin's `tandem_csi_*`; a query that did would
//! fail here until the plugin's page is scraped too.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeSet,
    io::{Read, Write},
};

use operator::{crd::MirroredVolumeStatus, metrics::Metrics};
use tandem_testkit::{free_port, qemu_io_ok, EngineBuilder};

fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The series names a page can answer: its samples, and each family's `_bucket`/`_sum`/`_count`
/// (a histogram with no observations yet has its HELP and TYPE lines only).
fn names(page: &str, into: &mut BTreeSet<String>) {
    let body = page.split_once("\r\n\r\n").map_or(page, |(_, b)| b);
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let (Some(name), Some(kind)) = (it.next(), it.next()) else {
                continue;
            };
            into.insert(name.to_string());
            if kind == "histogram" {
                for s in ["_bucket", "_sum", "_count"] {
                    into.insert(format!("{name}{s}"));
                }
            }
        } else if !line.starts_with('#') {
            if let Some(name) = line.split(['{', ' ']).next().filter(|n| !n.is_empty()) {
                into.insert(name.to_string());
            }
        }
    }
}

/// Every `tandem_*` identifier in a query.
fn metric_names(query: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = query;
    while let Some(i) = rest.find("tandem_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn every_dashboard_query_names_a_metric_that_exists() {
    let d = tempfile::tempdir().unwrap();
    let addr = free_port();
    let engine = EngineBuilder::new(d.path())
        .args(["--metrics-listen", addr.as_str()])
        .start()
        .unwrap();
    qemu_io_ok(&engine.uri(), &["write -P 1 0 64k", "read -P 1 0 64k"]);
    let mut known = BTreeSet::new();
    names(&scrape(&addr), &mut known);
    let m = Metrics::default();
    drop(m.count_and_measure());
    m.set_failure("ns", "v", "kube");
    m.observe_volume("ns", "v", &MirroredVolumeStatus::default());
    names(
        &tandem_api::http::to_prometheus_text(&m.encode().unwrap()),
        &mut known,
    );

    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/tandem/files/dashboard.json"
    );
    let board: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queries: Vec<String> = board["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    for v in board["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["definition"].as_str() {
            queries.push(q.to_string());
        }
    }
    assert!(queries.len() > 10, "{queries:?}");
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/tandem/files/alerts.yaml"
    );
    let alerts: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let before = queries.len();
    for group in alerts["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            queries.push(rule["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(queries.len() - before >= 6, "the alert rules: {alerts}");
    let mut missing = Vec::new();
    for q in &queries {
        let used = metric_names(q);
        assert!(!used.is_empty(), "a query without a tandem metric: {q}");
        missing.extend(used.into_iter().filter(|n| !known.contains(n)));
    }
    assert!(
        missing.is_empty(),
        "the dashboard or the alerts query metrics no endpoint serves: {missing:?}\nknown: {known:?}"
    );
}
