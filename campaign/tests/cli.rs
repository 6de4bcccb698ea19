//! The campaign binary's command line: what `scripts/campaign.sh` runs must parse, and a mistyped
//! run is refused with a message naming the bad argument, before any engine starts.

use std::process::Command;

fn campaign(args: &[&str]) -> std::process::Output {
    match Command::new(env!("CARGO_BIN_EXE_tandem-campaign"))
        .args(args)
        .output()
    {
        Ok(out) => out,
        Err(e) => panic!("cannot run tandem-campaign: {e}"),
    }
}

#[test]
fn every_campaign_the_script_runs_parses() {
    for run in ["history", "kill", "partition"] {
        let out = campaign(&[run, "--help"]);
        assert!(
            out.status.success(),
            "{run} --help: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            help.contains("--mode"),
            "{run} --help lacks --mode:\n{help}"
        );
    }
}

#[test]
fn a_mistyped_run_is_refused_by_name() {
    let out = campaign(&["history", "--mode", "eventually"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("eventually"),
        "the refusal names the bad value:\n{err}"
    );
}
