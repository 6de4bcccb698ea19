//! `tandem-engine wipe`: removes a deleted volume's engine files from a node (the operator runs it in a
//! short pod pinned to each engine node once the engine pods are gone).
//!
//! Safety: it removes only what looks like an engine's (a state dir holding the engine's `lock` or
//! `meta`, a socket dir holding only sockets), and only while no engine holds the state dir's lock, so a
//! wrong path or a still-running engine is an error that loses nothing (tests below).
//!
//! Durability: the parent directories are fsynced after the removals. Should a power loss still bring a
//! removed file back, it comes back under the deleted volume's own directory (the operator names data
//! dirs after the volume's uid), which no later volume opens; the next wipe run removes it.

use std::{
    fs,
    io::ErrorKind,
    os::unix::fs::FileTypeExt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

use crate::cli::WipeArgs;

/// Runs the subcommand and prints what it removed.
pub fn run(args: &WipeArgs) -> Result<()> {
    let removed = wipe(
        args.state_dir.as_deref(),
        args.data.as_deref(),
        args.run_dir.as_deref(),
    )?;
    if removed.is_empty() {
        println!("nothing to remove");
    }
    for p in removed {
        println!("removed {}", p.display());
    }
    Ok(())
}

/// Checks everything first, then removes; returns what it removed.
pub fn wipe(
    state_dir: Option<&Path>,
    data: Option<&Path>,
    run_dir: Option<&Path>,
) -> Result<Vec<PathBuf>> {
    // Checks before any removal: a refusal leaves everything as it was.
    let state = match state_dir {
        Some(dir) => check_state_dir(dir)?,
        None => None,
    };
    if let Some(d) = data {
        if let Some(meta) = symlink_meta(d)? {
            if !meta.is_file() {
                bail!(
                    "{} is not a regular file; refusing to remove it",
                    d.display()
                );
            }
        }
    }
    if let Some(dir) = run_dir {
        check_run_dir(dir)?;
    }

    let mut removed = Vec::new();
    if let (Some(dir), Some(lock)) = (state_dir, state) {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        // The lock is held until the directory is gone: no engine can start on it halfway.
        drop(lock);
        sync_parent(dir)?;
        removed.push(dir.to_path_buf());
    }
    if let Some(d) = data {
        if remove_file(d)? {
            sync_parent(d)?;
            removed.push(d.to_path_buf());
        }
    }
    // The directory that held them goes too once nothing else is in it.
    let holder = state_dir
        .and_then(Path::parent)
        .filter(|p| data.is_none_or(|d| d.parent() == Some(*p)));
    if let Some(holder) = holder {
        if is_empty_dir(holder)? {
            remove_dir(holder)?;
            sync_parent(holder)?;
            removed.push(holder.to_path_buf());
        }
    }
    if let Some(dir) = run_dir {
        if symlink_meta(dir)?.is_some() {
            for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
                let entry = entry?;
                remove_file(&entry.path())?;
            }
            remove_dir(dir)?;
            removed.push(dir.to_path_buf());
        }
    }
    Ok(removed)
}

/// `None` when the directory does not exist (already wiped); the held lock when it is an engine's.
fn check_state_dir(dir: &Path) -> Result<Option<fs::File>> {
    let Some(meta) = symlink_meta(dir)? else {
        return Ok(None);
    };
    if !meta.is_dir() {
        bail!("{} is not a directory; refusing to wipe it", dir.display());
    }
    let names: Vec<String> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    if !names.iter().any(|n| n == "lock" || n == "meta") {
        bail!(
            "{} does not look like an engine state dir (no lock or meta file; it holds {:?}); refusing to wipe it",
            dir.display(),
            names
        );
    }
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))
        .with_context(|| format!("opening {}/lock", dir.display()))?;
    if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        bail!(
            "an engine still holds {}; stop it before wiping",
            dir.display()
        );
    }
    Ok(Some(lock))
}

fn check_run_dir(dir: &Path) -> Result<()> {
    let Some(meta) = symlink_meta(dir)? else {
        return Ok(());
    };
    if !meta.is_dir() {
        bail!("{} is not a directory; refusing to wipe it", dir.display());
    }
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if !entry.file_type()?.is_socket() {
            bail!(
                "{} holds {}, which is not a socket; refusing to wipe it",
                dir.display(),
                entry.file_name().to_string_lossy()
            );
        }
    }
    Ok(())
}

fn symlink_meta(p: &Path) -> Result<Option<fs::Metadata>> {
    match fs::symlink_metadata(p) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("inspecting {}", p.display())),
    }
}

fn remove_file(p: &Path) -> Result<bool> {
    match fs::remove_file(p) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing {}", p.display())),
    }
}

fn remove_dir(p: &Path) -> Result<()> {
    match fs::remove_dir(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", p.display())),
    }
}

fn is_empty_dir(p: &Path) -> Result<bool> {
    match fs::read_dir(p) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

fn sync_parent(p: &Path) -> Result<()> {
    if let Some(parent) = p.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(dir) = fs::File::open(parent) {
            dir.sync_all()
                .with_context(|| format!("syncing {}", parent.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `<root>/vol/{data.img,state/{lock,meta,pending_to_peer}}` and a socket dir with `nbd.sock`.
    fn engine_files(root: &Path) -> (PathBuf, PathBuf, PathBuf, std::os::unix::net::UnixListener) {
        let vol = root.join("vol");
        let state = vol.join("state");
        fs::create_dir_all(&state).unwrap();
        for f in ["lock", "meta", "pending_to_peer"] {
            fs::write(state.join(f), b"x").unwrap();
        }
        fs::write(vol.join("data.img"), vec![7u8; 8192]).unwrap();
        let run = root.join("run-key");
        fs::create_dir_all(&run).unwrap();
        let sock = std::os::unix::net::UnixListener::bind(run.join("nbd.sock")).unwrap();
        (state, vol.join("data.img"), run, sock)
    }

    #[test]
    fn removes_everything_and_is_idempotent() {
        let root = tempfile::tempdir().unwrap();
        let (state, data, run, _sock) = engine_files(root.path());
        let removed = wipe(Some(&state), Some(&data), Some(&run)).unwrap();
        assert_eq!(removed.len(), 4, "{removed:?}");
        assert!(!root.path().join("vol").exists());
        assert!(!run.exists());
        // Again: nothing left, still fine.
        assert!(wipe(Some(&state), Some(&data), Some(&run))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_dir_that_is_not_an_engine_state_dir_is_refused_and_kept() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("home");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("thesis.tex"), b"precious").unwrap();
        let data = root.path().join("data.img");
        fs::write(&data, b"also precious").unwrap();
        let err = wipe(Some(&dir), Some(&data), None).unwrap_err();
        assert!(
            err.to_string()
                .contains("does not look like an engine state dir"),
            "{err}"
        );
        assert_eq!(fs::read(dir.join("thesis.tex")).unwrap(), b"precious");
        assert_eq!(fs::read(&data).unwrap(), b"also precious");
    }

    #[test]
    fn a_state_dir_an_engine_holds_is_refused_and_kept() {
        let root = tempfile::tempdir().unwrap();
        let (state, data, run, _sock) = engine_files(root.path());
        let held = fs::File::open(state.join("lock")).unwrap();
        rustix::fs::flock(&held, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
        let err = wipe(Some(&state), Some(&data), Some(&run)).unwrap_err();
        assert!(err.to_string().contains("still holds"), "{err}");
        assert!(state.join("meta").exists() && data.exists() && run.join("nbd.sock").exists());
    }

    #[test]
    fn a_socket_dir_with_other_files_is_refused_before_anything_goes() {
        let root = tempfile::tempdir().unwrap();
        let (state, data, run, _sock) = engine_files(root.path());
        fs::write(run.join("notes"), b"x").unwrap();
        assert!(wipe(Some(&state), Some(&data), Some(&run)).is_err());
        assert!(state.join("meta").exists() && data.exists());
    }

    #[test]
    fn the_holding_dir_stays_when_something_else_lives_there() {
        let root = tempfile::tempdir().unwrap();
        let (state, data, _run, _sock) = engine_files(root.path());
        fs::write(root.path().join("vol/other"), b"x").unwrap();
        wipe(Some(&state), Some(&data), None).unwrap();
        assert!(!state.exists() && !data.exists());
        assert!(root.path().join("vol/other").exists());
    }
}
