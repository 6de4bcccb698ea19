//! The plugin's command line as the chart's DaemonSet uses it: a missing or malformed endpoint is
//! refused with a message naming it, before anything is bound or mounted.

use std::process::{Command, Output};

fn csi(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tandem-csi"));
    cmd.args(args)
        .env_remove("CSI_ENDPOINT")
        .env_remove("NODE_ID");
    for (k, v) in env {
        cmd.env(k, v);
    }
    match cmd.output() {
        Ok(out) => out,
        Err(e) => panic!("cannot run tandem-csi: {e}"),
    }
}

#[test]
fn serving_without_an_endpoint_is_refused_by_name() {
    let out = csi(&["--node-id", "n1"], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--endpoint"),
        "the refusal names the flag:\n{err}"
    );
}

#[test]
fn a_tcp_endpoint_is_refused() {
    let out = csi(
        &[],
        &[("CSI_ENDPOINT", "tcp://127.0.0.1:1"), ("NODE_ID", "n1")],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unix:///"),
        "the refusal says what is expected:\n{err}"
    );
}
