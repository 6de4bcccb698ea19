//! The one locator of the workspace's binaries: tests always run the code of this checkout.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use anyhow::{bail, Context as _, Result};

/// A binary the workspace builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bin {
    /// `tandem-engine` (package storage-engine).
    Engine,
    /// `tandem-csi` (package csi-node).
    Csi,
}

impl Bin {
    fn name(self) -> &'static str {
        match self {
            Bin::Engine => "tandem-engine",
            Bin::Csi => "tandem-csi",
        }
    }

    fn package(self) -> &'static str {
        match self {
            Bin::Engine => "storage-engine",
            Bin::Csi => "csi-node",
        }
    }

    /// Names a prebuilt binary to use instead.
    fn override_var(self) -> &'static str {
        match self {
            Bin::Engine => "TANDEM_ENGINE_BIN",
            Bin::Csi => "TANDEM_CSI_BIN",
        }
    }

    /// The binary's path, looked up once per process: `$TANDEM_ENGINE_BIN` / `$TANDEM_CSI_BIN` if set;
    /// else `$CARGO_BIN_EXE_<name>`, which cargo (1.94 on) sets for the integration tests of the
    /// binary's own package; else in the target dir of the running executable, after
    /// `cargo build -p <package> --bin <name>` when running under cargo (cargo decides whether it is
    /// stale; a no-op when it is not) or when it is missing.
    pub fn path(self) -> Result<PathBuf> {
        static ENGINE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        static CSI: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        let cell = match self {
            Bin::Engine => &ENGINE,
            Bin::Csi => &CSI,
        };
        cell.get_or_init(|| self.find().map_err(|e| format!("{e:#}")))
            .clone()
            .map_err(anyhow::Error::msg)
    }

    fn find(self) -> Result<PathBuf> {
        for var in [
            self.override_var().to_string(),
            format!("CARGO_BIN_EXE_{}", self.name()),
        ] {
            if let Some(p) = std::env::var_os(&var) {
                let p = PathBuf::from(p);
                if !p.is_file() {
                    bail!("{var}={} is not a file", p.display());
                }
                return Ok(p);
            }
        }
        let profile_dir = profile_dir()?;
        let bin = profile_dir.join(self.name());
        let cargo = std::env::var_os("CARGO");
        if cargo.is_none() && bin.is_file() {
            return Ok(bin);
        }
        self.build(cargo, &profile_dir)?;
        if !bin.is_file() {
            bail!("{} was not built", bin.display());
        }
        Ok(bin)
    }

    /// `cargo build` into the running executable's target dir and profile.
    fn build(self, cargo: Option<OsString>, profile_dir: &Path) -> Result<()> {
        let target_dir = profile_dir
            .parent()
            .context("the executable is not inside a cargo target dir")?;
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev",
            Some(p) => p,
            None => bail!("no profile dir in {}", profile_dir.display()),
        };
        // This crate lives at the workspace root.
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("no workspace root")?;
        let cmd = format!(
            "cargo build --profile {profile} -p {} --bin {}",
            self.package(),
            self.name()
        );
        let out = Command::new(cargo.unwrap_or_else(|| "cargo".into()))
            .current_dir(workspace)
            .args(["build", "--profile", profile, "-p", self.package()])
            .args(["--bin", self.name()])
            .env("CARGO_TARGET_DIR", target_dir)
            .output()
            .with_context(|| format!("cannot run {cmd}"))?;
        if !out.status.success() {
            bail!(
                "`{cmd}` failed (or name a prebuilt binary with {}):\n{}",
                self.override_var(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

/// `target/<profile>/` of the running executable: a test runs from its `deps/`, a binary (the
/// campaign) from the profile dir itself.
fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("no path for the running executable")?;
    let dir = exe
        .parent()
        .with_context(|| format!("no directory for {}", exe.display()))?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent()
            .map(Path::to_path_buf)
            .with_context(|| format!("no profile dir above {}", dir.display()))
    } else {
        Ok(dir.to_path_buf())
    }
}
