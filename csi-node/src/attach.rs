//! Turning an engine's NBD export into a block device on this node, behind [`Attacher`].
//!
//! - Production path (where `nbd.ko` exists): the kernel NBD client configured over netlink, one
//!   `/dev/nbdN` per volume; the kernel holds the connection, so nothing in user space must stay up.
//!   Not implemented yet: it needs a machine with nbd.ko to be tested honestly. It would be another
//!   [`AttachKind`] variant and another `Attacher`, chosen at start-up by probing for the module.
//! - Fallback, implemented here ([`FuseLoopAttacher`]): a detached `tandem-csi attach-fuse` daemon per
//!   volume serves the export as the file `<state>/attach/<key>/fuse/disk`, and a loop device with
//!   direct I/O turns the file into `/dev/loopN`. The daemon is its own process group and outlives the
//!   plugin, so a restarted plugin finds the attachment (pid and paths are in the state record).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::fusefs::{self, DaemonStatus, READY_PREFIX};

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("attach daemon for {export:?} failed to start: {message}")]
    DaemonStart { export: String, message: String },
    #[error("the engine refused export {export:?}: {message}")]
    EngineRefused { export: String, message: String },
    #[error("{cmd} failed: {message}")]
    CommandFailed { cmd: String, message: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("detach incomplete: {0}")]
    DetachIncomplete(String),
    /// Growing the attached device failed; nothing was lost, the device keeps its size.
    #[error("growing the device: {0}")]
    Expand(String),
}

/// A block device attached to an engine export; persisted in the volume's state record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub device: PathBuf,
    pub nbd: String,
    /// The NBD export name the daemon opens, on every reconnect: `<volume>@<epoch>` when pinned.
    pub export: String,
    pub kind: AttachKind,
    /// The epoch the export is pinned to. `None`: an attachment made before pinning (a record
    /// written by an older plugin, whose export is the bare volume name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned_epoch: Option<u64>,
}

/// The export name pinned to `epoch`: the engine opens it only while it is at exactly that epoch, so
/// an attachment never reconnects into a later epoch (after a takeover and a failback the old
/// attachment stays refused, and its stale filesystem cannot write).
pub fn pinned_export(volume: &str, epoch: u64) -> String {
    format!("{volume}@{epoch}")
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum AttachKind {
    /// `dir` holds `fuse/disk` (the FUSE file) and `status.json`; `pid` is the daemon.
    FuseLoop { dir: PathBuf, pid: u32 },
    /// For the fakes in unit tests.
    #[cfg(test)]
    Fake,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachSpec {
    /// File-system-safe, unique per volume (the escaped volume id).
    pub key: String,
    pub nbd: String,
    /// The export name to open (see [`pinned_export`]).
    pub export: String,
    /// The epoch `export` is pinned to, recorded in the [`Attachment`].
    pub pinned_epoch: Option<u64>,
    pub read_only: bool,
    /// A point-in-time view of a filesystem: the export is read-only, the device takes writes
    /// into a throw-away overlay (so a read-only mount can replay the journal; `fusefs::Overlay`).
    pub overlay: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// Attached, but I/O will fail or hang until the engine is back (message says why).
    Degraded(String),
    /// The device is gone (daemon dead, loop device detached): the volume must be staged again.
    Broken(String),
}

pub trait Attacher: Send + Sync + 'static {
    fn attach(&self, spec: &AttachSpec) -> Result<Attachment, AttachError>;
    /// Idempotent: detaching something already gone succeeds.
    fn detach(&self, att: &Attachment) -> Result<(), AttachError>;
    fn health(&self, att: &Attachment) -> Health;
    /// Removes whatever a crashed earlier attempt left under this key (no state record points to it).
    fn cleanup_key(&self, key: &str) -> Result<(), AttachError>;
    /// The keys that have something attached or left behind.
    fn list_keys(&self) -> Vec<String>;
    /// Online expansion: the device takes the size the engine's export has now (the attachment
    /// learns it with a new handshake). Returns the device's size. Idempotent: a device already at
    /// the export's size only reports it.
    fn expand(&self, att: &Attachment) -> Result<u64, AttachError>;
}

fn run(cmd: &mut Command) -> Result<String, AttachError> {
    crate::command::run(cmd).map_err(|f| AttachError::CommandFailed {
        cmd: f.cmd,
        message: f.message,
    })
}

/// Is `pid` a live `attach-fuse` daemon for `dir`? (Guards against pid reuse.)
pub fn daemon_alive(pid: u32, dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let dir = dir.as_os_str().as_encoded_bytes();
    args.contains(&&b"attach-fuse"[..]) && args.contains(&dir)
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(p) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// The backing file of a bound loop device, as the kernel reports it (`/sys/block/loopN/loop/`).
/// Reading sysfs never touches the backing file, so a dead FUSE mount cannot hang or fail it.
pub fn loop_backing_file(device: &Path) -> Option<String> {
    let name = device.file_name()?.to_str()?;
    std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
        .ok()
        .map(|s| s.trim_end_matches('\n').to_string())
}

/// Loop devices whose backing file is `file`.
pub fn loops_backing(file: &Path) -> Result<Vec<PathBuf>, AttachError> {
    let want = file.display().to_string();
    let entries = std::fs::read_dir("/sys/block").map_err(|source| AttachError::Io {
        what: "list",
        path: "/sys/block".into(),
        source,
    })?;
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.starts_with("loop"))
        .map(|n| PathBuf::from("/dev").join(n))
        .filter(|d| loop_backing_file(d).as_deref() == Some(want.as_str()))
        .collect();
    out.sort();
    Ok(out)
}

fn is_mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| {
            crate::mount::parse_mountinfo(&t)
                .iter()
                .any(|m| m.mount_point == path)
        })
        .unwrap_or(false)
}

/// FUSE + loop attacher (see the module docs).
#[derive(Clone, Debug)]
pub struct FuseLoopAttacher {
    /// `<state-dir>/attach`
    pub root: PathBuf,
    /// The `tandem-csi` binary (this executable).
    pub exe: PathBuf,
    pub io_timeout: Duration,
    /// How long the daemon's I/O waits for an unreachable engine before failing with EIO.
    pub reconnect_timeout: Duration,
    pub start_timeout: Duration,
}

impl FuseLoopAttacher {
    fn dir(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Starts the daemon and waits for its READY line; returns its pid.
    fn start_daemon(&self, spec: &AttachSpec, dir: &Path) -> Result<u32, AttachError> {
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| AttachError::Io { what, path, source }
        };
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let log_path = dir.join("daemon.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io("open", &log_path))?;
        let log_err = log.try_clone().map_err(io("open", &log_path))?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("attach-fuse")
            .arg("--nbd")
            .arg(&spec.nbd)
            .arg("--export")
            .arg(&spec.export)
            .arg("--dir")
            .arg(dir)
            .arg("--io-timeout-secs")
            .arg(self.io_timeout.as_secs().max(1).to_string())
            .arg("--reconnect-timeout-secs")
            .arg(self.reconnect_timeout.as_secs().max(1).to_string());
        if spec.read_only {
            cmd.arg("--read-only");
        }
        if spec.overlay {
            cmd.arg("--overlay");
        }
        use std::os::unix::process::CommandExt;
        // Own process group: a signal to the plugin's group (Ctrl-C, a supervisor) spares it.
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_err);
        drop(log);
        let mut child = cmd.spawn().map_err(|e| AttachError::DaemonStart {
            export: spec.export.clone(),
            message: format!("spawn {}: {e}", self.exe.display()),
        })?;
        let pid = child.id();
        let Some(stdout) = child.stdout.take() else {
            return Err(AttachError::DaemonStart {
                export: spec.export.clone(),
                message: "no stdout pipe".into(),
            });
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let mut r = BufReader::new(stdout);
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            // Drain anything else so the daemon never blocks on a full pipe; ends at EOF.
            let _ = std::io::copy(&mut r, &mut std::io::sink());
        });
        let line = rx.recv_timeout(self.start_timeout).unwrap_or_default();
        if line.starts_with(READY_PREFIX) {
            // Reap the daemon if it exits while we are still running; after a plugin restart
            // init reaps it.
            std::thread::spawn(move || {
                let _ = child.wait();
            });
            return Ok(pid);
        }
        // Still running without READY after the timeout: stop it. Otherwise collect its status.
        let refused = match child.try_wait() {
            Ok(Some(status)) => status.code() == Some(i32::from(fusefs::EXIT_REFUSED)),
            _ => {
                signal(pid, rustix::process::Signal::KILL);
                child
                    .wait()
                    .map(|s| s.code() == Some(i32::from(fusefs::EXIT_REFUSED)))
                    .unwrap_or(false)
            }
        };
        let mut tail = String::new();
        if let Ok(mut f) = std::fs::File::open(&log_path) {
            let _ = f.read_to_string(&mut tail);
        }
        let tail: String = tail
            .lines()
            .rev()
            .take(3)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join(" | ");
        let message = if line.is_empty() && tail.is_empty() {
            format!("no READY within {:?}", self.start_timeout)
        } else {
            tail
        };
        let _ = std::fs::remove_dir_all(dir);
        Err(if refused {
            AttachError::EngineRefused {
                export: spec.export.clone(),
                message,
            }
        } else {
            AttachError::DaemonStart {
                export: spec.export.clone(),
                message,
            }
        })
    }

    /// Stops the daemon of `dir` (SIGTERM; it unmounts itself), escalating if it does not go.
    fn stop_daemon(&self, pid: Option<u32>, dir: &Path) -> Result<(), AttachError> {
        let mnt = fusefs::mountpoint(dir);
        let pid = pid.filter(|p| daemon_alive(*p, dir));
        if let Some(p) = pid {
            signal(p, rustix::process::Signal::TERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while daemon_alive(p, dir) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if daemon_alive(p, dir) {
                tracing::warn!(pid = p, "attach daemon ignored SIGTERM; killing it");
                signal(p, rustix::process::Signal::KILL);
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        if is_mounted(&mnt) {
            // The daemon died without unmounting (SIGKILL, crash): remove the dead FUSE mount.
            run(Command::new("umount").arg("-l").arg(&mnt))?;
        }
        Ok(())
    }

    /// Detaches every loop device on `file`, plus `recorded` if it still points at our file as the
    /// kernel shows it once the FUSE mount was lazily detached (`/disk`).
    fn detach_loops(&self, file: &Path, recorded: Option<&Path>) -> Result<(), AttachError> {
        let mut devs = loops_backing(file)?;
        if let Some(d) = recorded {
            let orphaned = loop_backing_file(d).as_deref() == Some("/disk");
            if orphaned && !devs.iter().any(|x| x == d) {
                devs.push(d.to_path_buf());
            }
        }
        for dev in &devs {
            run(Command::new("losetup").arg("-d").arg(dev))?;
        }
        // Detaching a busy loop device only marks it for auto-clear; wait until it let go of the file.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left: Vec<&PathBuf> = devs
                .iter()
                .filter(|d| loop_backing_file(d).is_some())
                .collect();
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(AttachError::DetachIncomplete(format!(
                    "{} still bound to {}",
                    left.iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    file.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn read_status(dir: &Path) -> Option<DaemonStatus> {
        let text = std::fs::read(fusefs::status_path(dir)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn pid_file(dir: &Path) -> PathBuf {
        dir.join("daemon.pid")
    }
}

impl Attacher for FuseLoopAttacher {
    fn attach(&self, spec: &AttachSpec) -> Result<Attachment, AttachError> {
        let dir = self.dir(&spec.key);
        self.cleanup_key(&spec.key)?;
        let pid = self.start_daemon(spec, &dir)?;
        let _ = std::fs::write(Self::pid_file(&dir), pid.to_string());
        let file = fusefs::disk_path(&dir);
        let mut cmd = Command::new("losetup");
        cmd.arg("--direct-io=on").arg("--show").arg("-f");
        if spec.read_only {
            cmd.arg("--read-only");
        }
        let device = match run(cmd.arg(&file)) {
            Ok(out) => PathBuf::from(out.trim()),
            Err(e) => {
                let _ = self.stop_daemon(Some(pid), &dir);
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        tracing::info!(export = %spec.export, nbd = %spec.nbd, device = %device.display(), pid, "attached through FUSE + loop");
        Ok(Attachment {
            device,
            nbd: spec.nbd.clone(),
            export: spec.export.clone(),
            kind: AttachKind::FuseLoop { dir, pid },
            pinned_epoch: spec.pinned_epoch,
        })
    }

    fn detach(&self, att: &Attachment) -> Result<(), AttachError> {
        let (dir, pid) = match &att.kind {
            AttachKind::FuseLoop { dir, pid } => (dir, *pid),
            #[cfg(test)]
            AttachKind::Fake => return Ok(()),
        };
        self.detach_loops(&fusefs::disk_path(dir), Some(&att.device))?;
        self.stop_daemon(Some(pid), dir)?;
        let _ = std::fs::remove_dir_all(dir);
        tracing::info!(export = %att.export, device = %att.device.display(), "detached");
        Ok(())
    }

    fn health(&self, att: &Attachment) -> Health {
        let (dir, pid) = match &att.kind {
            AttachKind::FuseLoop { dir, pid } => (dir, *pid),
            #[cfg(test)]
            AttachKind::Fake => return Health::Healthy,
        };
        if !daemon_alive(pid, dir) {
            return Health::Broken(format!("attach daemon (pid {pid}) is not running"));
        }
        let file = fusefs::disk_path(dir);
        match loops_backing(&file) {
            Ok(l) if l.contains(&att.device) => {}
            Ok(_) => {
                return Health::Broken(format!(
                    "{} no longer backs {}",
                    file.display(),
                    att.device.display()
                ))
            }
            Err(e) => return Health::Degraded(format!("cannot list loop devices: {e}")),
        }
        match Self::read_status(dir) {
            Some(s) if s.link.refused => Health::Degraded(format!(
                "the engine refuses the export ({}); I/O fails until it serves it again",
                s.link.last_error.unwrap_or_default()
            )),
            Some(s) if s.link.gave_up => Health::Degraded(format!(
                "engine unreachable for more than {:?} ({}); I/O fails until it is back",
                self.reconnect_timeout,
                s.link.last_error.unwrap_or_default()
            )),
            Some(s) if !s.link.connected => Health::Degraded(format!(
                "engine connection down ({}); I/O waits up to {:?} for it ({} reconnects so far)",
                s.link.last_error.unwrap_or_default(),
                self.reconnect_timeout,
                s.link.reconnects
            )),
            _ => Health::Healthy,
        }
    }

    fn cleanup_key(&self, key: &str) -> Result<(), AttachError> {
        let dir = self.dir(key);
        if !dir.exists() {
            return Ok(());
        }
        tracing::warn!(dir = %dir.display(), "removing a previous attachment's leftovers");
        self.detach_loops(&fusefs::disk_path(&dir), None)?;
        let pid = std::fs::read_to_string(Self::pid_file(&dir))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        self.stop_daemon(pid, &dir)?;
        std::fs::remove_dir_all(&dir).map_err(|source| AttachError::Io {
            what: "remove",
            path: dir,
            source,
        })
    }

    /// The daemon learns the export's size again (SIGUSR1, answered in `status.json`), the kernel
    /// sees the FUSE file's new size (the daemon invalidated its attributes; `stat` reads them
    /// again), then the loop device takes it (`losetup -c`, LOOP_SET_CAPACITY).
    fn expand(&self, att: &Attachment) -> Result<u64, AttachError> {
        let (dir, pid) = match &att.kind {
            AttachKind::FuseLoop { dir, pid } => (dir, *pid),
            #[cfg(test)]
            AttachKind::Fake => return Err(AttachError::Expand("fake kind".into())),
        };
        let fail = |m: String| AttachError::Expand(m);
        if !daemon_alive(pid, dir) {
            return Err(fail(format!(
                "the attach daemon (pid {pid}) is not running; stage the volume again"
            )));
        }
        let before = Self::read_status(dir).map(|s| s.refreshes).unwrap_or(0);
        signal(pid, fusefs::REFRESH_SIGNAL);
        let deadline = Instant::now() + self.start_timeout;
        let status = loop {
            match Self::read_status(dir) {
                Some(s) if s.refreshes > before => break s,
                _ if Instant::now() >= deadline => {
                    return Err(fail(format!(
                        "the attach daemon did not answer a size refresh within {:?}",
                        self.start_timeout
                    )))
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        if let Some(e) = status.refresh_error {
            return Err(fail(format!("the attach daemon could not refresh: {e}")));
        }
        let file = fusefs::disk_path(dir);
        let seen = std::fs::metadata(&file)
            .map_err(|source| AttachError::Io {
                what: "stat",
                path: file.clone(),
                source,
            })?
            .len();
        if seen != status.size {
            return Err(fail(format!(
                "{} shows {seen} bytes, the export {} bytes",
                file.display(),
                status.size
            )));
        }
        run(Command::new("losetup").arg("-c").arg(&att.device))?;
        let out = run(Command::new("blockdev").arg("--getsize64").arg(&att.device))?;
        let size: u64 = out
            .trim()
            .parse()
            .map_err(|_| fail(format!("blockdev printed {out:?}")))?;
        if size != status.size {
            return Err(fail(format!(
                "{} is {size} bytes after losetup -c, the export {} bytes",
                att.device.display(),
                status.size
            )));
        }
        tracing::info!(device = %att.device.display(), size, "device grown");
        Ok(size)
    }

    fn list_keys(&self) -> Vec<String> {
        std::fs::read_dir(&self.root)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use std::collections::{HashMap, HashSet};
    use std::sync::Mutex;

    #[derive(Debug, Default)]
    pub struct FakeState {
        pub attached: HashMap<PathBuf, AttachSpec>,
        pub next: u32,
        pub fail: HashSet<&'static str>,
        pub broken: HashSet<PathBuf>,
        pub attach_calls: usize,
        pub cleaned: Vec<String>,
        pub leftovers: Vec<String>,
        /// Device sizes; `expand` sets a device to `export_size`.
        pub sizes: HashMap<PathBuf, u64>,
        pub export_size: u64,
        pub expand_calls: usize,
    }

    /// Hands out `/dev/fakeN` devices and remembers what is attached.
    #[derive(Debug, Default)]
    pub struct FakeAttacher {
        pub st: Mutex<FakeState>,
    }

    impl FakeAttacher {
        pub fn attached_count(&self) -> usize {
            self.st.lock().unwrap().attached.len()
        }
        pub fn fail(&self, op: &'static str) {
            self.st.lock().unwrap().fail.insert(op);
        }
        pub fn break_device(&self, dev: &Path) {
            self.st.lock().unwrap().broken.insert(dev.to_path_buf());
        }
    }

    impl Attacher for FakeAttacher {
        fn attach(&self, spec: &AttachSpec) -> Result<Attachment, AttachError> {
            let mut st = self.st.lock().unwrap();
            st.attach_calls += 1;
            if st.fail.contains("attach") {
                return Err(AttachError::DaemonStart {
                    export: spec.export.clone(),
                    message: "injected failure".into(),
                });
            }
            st.next += 1;
            let device = PathBuf::from(format!("/dev/fake{}", st.next));
            st.attached.insert(device.clone(), spec.clone());
            Ok(Attachment {
                device,
                nbd: spec.nbd.clone(),
                export: spec.export.clone(),
                kind: AttachKind::Fake,
                pinned_epoch: spec.pinned_epoch,
            })
        }
        fn detach(&self, att: &Attachment) -> Result<(), AttachError> {
            let mut st = self.st.lock().unwrap();
            if st.fail.contains("detach") {
                return Err(AttachError::DetachIncomplete("injected failure".into()));
            }
            st.attached.remove(&att.device);
            st.broken.remove(&att.device);
            Ok(())
        }
        fn health(&self, att: &Attachment) -> Health {
            let st = self.st.lock().unwrap();
            if st.broken.contains(&att.device) || !st.attached.contains_key(&att.device) {
                Health::Broken("fake: gone".into())
            } else {
                Health::Healthy
            }
        }
        fn cleanup_key(&self, key: &str) -> Result<(), AttachError> {
            self.st.lock().unwrap().cleaned.push(key.to_string());
            Ok(())
        }
        fn list_keys(&self) -> Vec<String> {
            let st = self.st.lock().unwrap();
            let mut keys: Vec<String> = st.attached.values().map(|s| s.key.clone()).collect();
            keys.extend(st.leftovers.iter().cloned());
            keys
        }
        fn expand(&self, att: &Attachment) -> Result<u64, AttachError> {
            let mut st = self.st.lock().unwrap();
            st.expand_calls += 1;
            if st.fail.contains("expand") {
                return Err(AttachError::Expand("injected failure".into()));
            }
            if !st.attached.contains_key(&att.device) {
                return Err(AttachError::Expand("fake: not attached".into()));
            }
            let size = st.export_size;
            st.sizes.insert(att.device.clone(), size);
            Ok(size)
        }
    }
}
