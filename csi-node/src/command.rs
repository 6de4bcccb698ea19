//! Running host tools (losetup, mount, mkfs, blkid): one place that turns a failure into a message.

use std::process::{Command, Stdio};

/// A host command that could not start or exited unsuccessfully.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandFailure {
    /// The command line as run.
    pub cmd: String,
    /// Its stderr, or its exit status when stderr was empty, or why it could not start.
    pub message: String,
}

/// Runs `cmd` with no stdin; returns its stdout on success.
pub fn run(cmd: &mut Command) -> Result<String, CommandFailure> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| CommandFailure {
            cmd: shown.clone(),
            message: e.to_string(),
        })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let mut message = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if message.is_empty() {
        message = out.status.to_string();
    }
    Err(CommandFailure {
        cmd: shown,
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_stdout_stderr_and_status() {
        assert_eq!(
            run(Command::new("sh").args(["-c", "echo hi"])).unwrap(),
            "hi\n"
        );
        let e = run(Command::new("sh").args(["-c", "echo bad >&2; exit 3"])).unwrap_err();
        assert_eq!(e.message, "bad");
        let e = run(Command::new("sh").args(["-c", "exit 4"])).unwrap_err();
        assert!(e.message.contains('4'), "{}", e.message);
        let e = run(&mut Command::new("/nonexistent/tool")).unwrap_err();
        assert!(e.cmd.contains("nonexistent"));
    }
}
