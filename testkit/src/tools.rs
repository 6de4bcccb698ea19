//! External tools the tests drive (qemu-io, nbdcopy, ...), and waiting.

use std::{
    process::{Command, Output},
    time::{Duration, Instant},
};

use crate::data::BLOCK;

/// Runs a command; panics if it cannot be started (a missing tool).
pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (run scripts/install-deps.sh): {e}"))
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// qemu-io against an NBD URI with the given commands.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> Output {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    run("qemu-io", &args)
}

/// Whether qemu-io succeeded with no failed command (it exits 0 even when a command fails).
pub fn qemu_io_passed(out: &Output) -> (bool, String) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ok =
        out.status.success() && !text.contains("failed") && !text.contains("Pattern verification");
    (ok, text)
}

/// qemu-io that must succeed without any failed command; returns its output.
pub fn qemu_io_ok(uri: &str, cmds: &[&str]) -> String {
    let (ok, text) = qemu_io_passed(&qemu_io(uri, cmds));
    assert!(ok, "qemu-io {cmds:?} on {uri}: {text}");
    text
}

/// Writes `byte` over one 4 KiB block through NBD.
pub fn put_block(uri: &str, block: u64, byte: u8) {
    qemu_io_ok(uri, &[&format!("write -P {byte} {} 4k", block * BLOCK)]);
}

/// Whether one 4 KiB block reads back as `byte` through NBD.
pub fn block_reads(uri: &str, block: u64, byte: u8) -> bool {
    qemu_io_passed(&qemu_io(
        uri,
        &[&format!("read -P {byte} {} 4k", block * BLOCK)],
    ))
    .0
}

/// Polls `f` until it returns true; panics after `secs`.
pub fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A loopback address with a port that was free a moment ago (`127.0.0.1:PORT`), for a listener
/// whose address must be known before its process starts.
pub fn free_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.to_string())
        .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Lints a metrics page (an HTTP response or its body) with `promtool check metrics` and panics with
/// what it found. Without promtool the check is skipped with a message, unless
/// `TANDEM_REQUIRE_PROMTOOL` is set (CI sets it; scripts/install-deps.sh installs Debian's
/// `prometheus` package, which has it).
pub fn promtool_check_metrics(page: &str) {
    use std::io::Write as _;
    let body = match page.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/") => body,
        _ => page,
    };
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var_os("TANDEM_REQUIRE_PROMTOOL").is_none(),
                "promtool is missing and TANDEM_REQUIRE_PROMTOOL is set: run scripts/install-deps.sh"
            );
            eprintln!("SKIPPED promtool check metrics: promtool is not installed (scripts/install-deps.sh)");
            return;
        }
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(body.as_bytes())
            .unwrap_or_else(|e| panic!("writing to promtool: {e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("promtool: {e}"));
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics found problems:\n{said}\non the page:\n{body}"
    );
}
