//! Filesystems and mounts, behind [`Mounter`] so every NodeStage/NodePublish branch is unit-tested with
//! a fake. [`SystemMounter`] shells out to util-linux (`mount`, `umount`, `blkid`) and `mkfs.*`, and
//! reads `/proc/self/mountinfo`, so idempotency is decided by observing the kernel's mount table.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{cmd} failed: {message}")]
    CommandFailed { cmd: String, message: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The kernel refused an online grow for lack of privilege (ext4's resize ioctl needs
    /// CAP_SYS_RESOURCE); an offline grow at the next stage still works.
    #[error("{cmd} was refused: {message}")]
    GrowNotPermitted { cmd: String, message: String },
}

/// What is mounted at a path, seen from the device we care about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MountState {
    NotMounted,
    /// Mounted, and the mount is (a bind of) the given device.
    Device,
    /// Mounted from something else (described).
    Other(String),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsStats {
    pub bytes_total: u64,
    pub bytes_available: u64,
    pub bytes_used: u64,
    pub inodes_total: u64,
    pub inodes_free: u64,
    pub inodes_used: u64,
}

/// Supported filesystems for mount volumes.
pub const FILESYSTEMS: &[&str] = &["ext4", "xfs"];

pub trait Mounter: Send + Sync + 'static {
    /// What is mounted at `target`, relative to `device`.
    fn state(&self, target: &Path, device: &Path) -> Result<MountState, MountError>;
    /// The signature found on the device (`ext4`, `xfs`, `partition table dos`, ...), None if blank.
    fn probe(&self, device: &Path) -> Result<Option<String>, MountError>;
    fn mkfs(&self, device: &Path, fs_type: &str) -> Result<(), MountError>;
    fn mount(
        &self,
        device: &Path,
        target: &Path,
        fs_type: &str,
        options: &[String],
    ) -> Result<(), MountError>;
    /// Bind-mounts `source` (a directory or a device node) onto `target`, read-only if asked.
    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<(), MountError>;
    /// Unmounts the top mount at `target`.
    fn unmount(&self, target: &Path) -> Result<(), MountError>;
    /// True if anything is mounted at `target`.
    fn is_mount_point(&self, target: &Path) -> Result<bool, MountError>;
    fn fs_stats(&self, path: &Path) -> Result<FsStats, MountError>;
    fn device_size(&self, device: &Path) -> Result<u64, MountError>;
    /// Grows the filesystem `fs_type` on `device`, mounted at `mount_point`, to the device's size,
    /// online. Idempotent: a filesystem already that large is left as it is.
    fn grow_fs(&self, device: &Path, mount_point: &Path, fs_type: &str) -> Result<(), MountError>;
    /// True if the filesystem `fs_type` on `device` (not mounted) is smaller than the device by
    /// more than its grow tools would add (a tail too small for a block group or AG is no growth).
    fn fs_smaller_than_device(&self, device: &Path, fs_type: &str) -> Result<bool, MountError>;
    /// Grows the ext2/3/4 filesystem on the unmounted `device` to the device's size (runs
    /// `e2fsck -f -p` first only if resize2fs asks for it; any problem fsck finds is an error).
    fn grow_fs_offline(&self, device: &Path, fs_type: &str) -> Result<(), MountError>;
}

fn run(cmd: &mut Command) -> Result<String, MountError> {
    crate::command::run(cmd).map_err(|f| MountError::CommandFailed {
        cmd: f.cmd,
        message: f.message,
    })
}

/// One line of /proc/self/mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    pub major_minor: (u32, u32),
    pub root: String,
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if l.len() < 5 || r.len() < 2 {
                return None;
            }
            let (maj, min) = l[2].split_once(':')?;
            Some(MountInfo {
                major_minor: (maj.parse().ok()?, min.parse().ok()?),
                root: unescape(l[3]),
                mount_point: PathBuf::from(unescape(l[4])),
                fs_type: r[0].to_string(),
                source: unescape(r[1]),
            })
        })
        .collect()
}

/// Splits a device number into (major, minor) the way glibc's `gnu_dev_major/minor` do.
pub fn dev_major_minor(rdev: u64) -> (u32, u32) {
    let major = ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0x0000_0fff);
    let minor = ((rdev >> 12) & 0xffff_ff00) | (rdev & 0x0000_00ff);
    (major as u32, minor as u32)
}

/// Decides what the top mount at `target` is, relative to the block device `(dev, name)`.
pub fn classify(
    mounts: &[MountInfo],
    target: &Path,
    dev: (u32, u32),
    dev_name: &str,
) -> MountState {
    // The last entry for a mount point is the one on top.
    match mounts.iter().rev().find(|m| m.mount_point == target) {
        None => MountState::NotMounted,
        Some(m) if m.major_minor == dev => MountState::Device,
        // A bind of the device node: devtmpfs, whose root is the node's path inside /dev.
        Some(m) if m.fs_type == "devtmpfs" && m.root.trim_start_matches('/') == dev_name => {
            MountState::Device
        }
        Some(m) => MountState::Other(format!("{} ({}) {}", m.source, m.fs_type, m.root)),
    }
}

/// The real mounter.
#[derive(Clone, Debug, Default)]
pub struct SystemMounter;

impl SystemMounter {
    fn mountinfo() -> Result<Vec<MountInfo>, MountError> {
        let text =
            std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| MountError::Io {
                what: "read",
                path: "/proc/self/mountinfo".into(),
                source,
            })?;
        Ok(parse_mountinfo(&text))
    }
}

impl Mounter for SystemMounter {
    fn state(&self, target: &Path, device: &Path) -> Result<MountState, MountError> {
        let meta = match std::fs::metadata(device) {
            Ok(m) => m,
            // The device node is gone (e.g. after a reboot): nothing can be mounted from it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(if self.is_mount_point(target)? {
                    MountState::Other(format!("not {} (no such device)", device.display()))
                } else {
                    MountState::NotMounted
                });
            }
            Err(source) => {
                return Err(MountError::Io {
                    what: "stat",
                    path: device.to_path_buf(),
                    source,
                })
            }
        };
        if !meta.file_type().is_block_device() {
            return Err(MountError::Io {
                what: "not a block device:",
                path: device.to_path_buf(),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            });
        }
        let dev = dev_major_minor(meta.rdev());
        let name = device
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let target = target
            .canonicalize()
            .unwrap_or_else(|_| target.to_path_buf());
        Ok(classify(&Self::mountinfo()?, &target, dev, &name))
    }

    fn probe(&self, device: &Path) -> Result<Option<String>, MountError> {
        // -p: low-level probe of the device itself, no cache. Exit 2: no signature at all.
        let out = Command::new("blkid")
            .args(["-p", "-o", "export"])
            .arg(device)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| MountError::CommandFailed {
                cmd: "blkid".into(),
                message: e.to_string(),
            })?;
        match out.status.code() {
            Some(0) => {
                let text = String::from_utf8_lossy(&out.stdout);
                let field = |k: &str| {
                    text.lines()
                        .find_map(|l| l.strip_prefix(k).map(str::to_string))
                };
                Ok(Some(
                    field("TYPE=")
                        .or_else(|| field("PTTYPE=").map(|p| format!("partition table {p}")))
                        .unwrap_or_else(|| "unknown signature".to_string()),
                ))
            }
            Some(2) => Ok(None),
            _ => Err(MountError::CommandFailed {
                cmd: format!("blkid -p {}", device.display()),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            }),
        }
    }

    fn mkfs(&self, device: &Path, fs_type: &str) -> Result<(), MountError> {
        // No discard pass: the device was probed blank, and a whole-device discard would make the
        // engine zero (and replicate) every block.
        let mut cmd = match fs_type {
            "ext4" => {
                let mut c = Command::new("mkfs.ext4");
                c.args(["-q", "-F", "-E", "nodiscard"]);
                c
            }
            "xfs" => {
                let mut c = Command::new("mkfs.xfs");
                c.args(["-q", "-K"]);
                c
            }
            other => {
                return Err(MountError::CommandFailed {
                    cmd: "mkfs".into(),
                    message: format!("unsupported filesystem {other}"),
                })
            }
        };
        run(cmd.arg(device)).map(|_| ())
    }

    fn mount(
        &self,
        device: &Path,
        target: &Path,
        fs_type: &str,
        options: &[String],
    ) -> Result<(), MountError> {
        let mut cmd = Command::new("mount");
        cmd.args(["-t", fs_type]);
        if !options.is_empty() {
            cmd.arg("-o").arg(options.join(","));
        }
        run(cmd.arg(device).arg(target)).map(|_| ())
    }

    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<(), MountError> {
        run(Command::new("mount").arg("--bind").arg(source).arg(target))?;
        if read_only {
            if let Err(e) = run(Command::new("mount")
                .args(["-o", "remount,bind,ro"])
                .arg(target))
            {
                let _ = run(Command::new("umount").arg(target));
                return Err(e);
            }
        }
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<(), MountError> {
        run(Command::new("umount").arg(target)).map(|_| ())
    }

    fn is_mount_point(&self, target: &Path) -> Result<bool, MountError> {
        let target = target
            .canonicalize()
            .unwrap_or_else(|_| target.to_path_buf());
        Ok(Self::mountinfo()?.iter().any(|m| m.mount_point == target))
    }

    fn fs_stats(&self, path: &Path) -> Result<FsStats, MountError> {
        let s = rustix::fs::statvfs(path).map_err(|e| MountError::Io {
            what: "statvfs",
            path: path.to_path_buf(),
            source: e.into(),
        })?;
        let f = s.f_frsize;
        Ok(FsStats {
            bytes_total: s.f_blocks * f,
            bytes_available: s.f_bavail * f,
            bytes_used: s.f_blocks.saturating_sub(s.f_bfree) * f,
            inodes_total: s.f_files,
            inodes_free: s.f_ffree,
            inodes_used: s.f_files.saturating_sub(s.f_ffree),
        })
    }

    fn grow_fs(&self, device: &Path, mount_point: &Path, fs_type: &str) -> Result<(), MountError> {
        // ext4 grows online through the device (resize2fs finds the mount); xfs only through its
        // mount point. Both do nothing when the filesystem already fills the device.
        let mut cmd = match fs_type {
            "ext2" | "ext3" | "ext4" => {
                let mut c = Command::new("resize2fs");
                c.arg(device);
                c
            }
            "xfs" => {
                let mut c = Command::new("xfs_growfs");
                c.arg(mount_point);
                c
            }
            other => {
                return Err(MountError::CommandFailed {
                    cmd: "grow filesystem".into(),
                    message: format!("cannot grow a {other} filesystem online"),
                })
            }
        };
        run(&mut cmd).map(|_| ()).map_err(|e| match e {
            // resize2fs says "Permission denied to resize filesystem" when the ioctl gets EPERM.
            MountError::CommandFailed { cmd, message }
                if message.contains("Permission denied")
                    || message.contains("Operation not permitted") =>
            {
                MountError::GrowNotPermitted { cmd, message }
            }
            other => other,
        })
    }

    fn fs_smaller_than_device(&self, device: &Path, fs_type: &str) -> Result<bool, MountError> {
        let device_bytes = self.device_size(device)?;
        let (fs_blocks, block_size, slack_blocks) = match fs_type {
            "ext2" | "ext3" | "ext4" => {
                let out = run(Command::new("dumpe2fs").arg("-h").arg(device))?;
                let field = |k: &str| superblock_field(&out, k, ':');
                let (count, size) = (field("Block count")?, field("Block size")?);
                // resize2fs drops a last group smaller than its metadata + 50 blocks; the slack
                // bounds that (bitmaps, inode table, a backup superblock and its GDT).
                let gdt = field("Reserved GDT blocks").unwrap_or(0);
                let inodes = field("Inode blocks per group").unwrap_or(0);
                let desc = (count / field("Blocks per group").unwrap_or(1).max(1) + 1) * 64;
                (
                    count,
                    size,
                    2 + inodes + 1 + gdt + desc.div_ceil(size.max(1)) + 50,
                )
            }
            "xfs" => {
                let out = run(Command::new("xfs_db")
                    .args(["-r", "-c", "sb 0", "-c", "print dblocks blocksize"])
                    .arg(device))?;
                let field = |k: &str| superblock_field(&out, k, '=');
                // xfs_growfs leaves out a last AG under 64 blocks.
                (field("dblocks")?, field("blocksize")?, 64)
            }
            _ => return Ok(false),
        };
        let fs_bytes = fs_blocks.saturating_mul(block_size);
        let slack = slack_blocks.saturating_mul(block_size);
        Ok(device_bytes > fs_bytes.saturating_add(slack))
    }

    fn grow_fs_offline(&self, device: &Path, fs_type: &str) -> Result<(), MountError> {
        if !matches!(fs_type, "ext2" | "ext3" | "ext4") {
            return Err(MountError::CommandFailed {
                cmd: "grow filesystem".into(),
                message: format!("cannot grow a {fs_type} filesystem offline"),
            });
        }
        match run(Command::new("resize2fs").arg(device)) {
            Ok(_) => return Ok(()),
            // resize2fs refuses a filesystem not checked since its last mount (or marked with
            // errors) until e2fsck -f has run; anything else is a real failure.
            Err(MountError::CommandFailed { message, .. }) if message.contains("e2fsck -f") => {}
            Err(e) => return Err(e),
        }
        // -p repairs only what is safe without a human; exit 0 is "no errors". Anything else
        // (even "errors corrected") stops the stage: the data needs a look before it is grown.
        let out = Command::new("e2fsck")
            .args(["-f", "-p"])
            .arg(device)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| MountError::CommandFailed {
                cmd: "e2fsck".into(),
                message: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(MountError::CommandFailed {
                cmd: format!("e2fsck -f -p {}", device.display()),
                message: format!(
                    "e2fsck found problems (exit {}): not growing the filesystem; check it by \
                     hand (e2fsck -f) before staging it again. {}",
                    out.status.code().map_or("signal".into(), |c| c.to_string()),
                    String::from_utf8_lossy(&out.stdout).trim()
                ),
            });
        }
        run(Command::new("resize2fs").arg(device)).map(|_| ())
    }

    fn device_size(&self, device: &Path) -> Result<u64, MountError> {
        let io = |source| MountError::Io {
            what: "size of",
            path: device.to_path_buf(),
            source,
        };
        let mut f = File::open(device).map_err(io)?;
        f.seek(SeekFrom::End(0)).map_err(io)
    }
}

/// The number after `key` and `sep` on one line of dumpe2fs or xfs_db output.
fn superblock_field(text: &str, key: &str, sep: char) -> Result<u64, MountError> {
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(sep)?;
            (k.trim() == key).then(|| v.trim().parse().ok())?
        })
        .ok_or_else(|| MountError::CommandFailed {
            cmd: "read the superblock".into(),
            message: format!("no {key} in: {}", text.trim()),
        })
}

#[cfg(test)]
pub(crate) mod fake {
    //! A mounter that keeps its mount table in memory; paths are real (a temp dir), so the node's
    //! directory and file handling is exercised too.
    use super::*;
    use std::collections::{HashMap, HashSet};
    use std::sync::Mutex;

    #[derive(Debug, Default)]
    pub struct FakeState {
        /// target → stack of sources (device or directory); top is last.
        pub mounts: HashMap<PathBuf, Vec<(PathBuf, bool)>>,
        /// device → filesystem on it.
        pub filesystems: HashMap<PathBuf, String>,
        pub mkfs_calls: Vec<(PathBuf, String)>,
        pub fail: HashSet<&'static str>,
        pub calls: Vec<String>,
        /// (device, mount point, filesystem) of every grow.
        pub grown: Vec<(PathBuf, PathBuf, String)>,
        /// Devices whose filesystem is smaller than the device.
        pub smaller: HashSet<PathBuf>,
        /// (device, filesystem) of every offline grow.
        pub grown_offline: Vec<(PathBuf, String)>,
        /// The options of the last filesystem mount at each target.
        pub options: HashMap<PathBuf, Vec<String>>,
    }

    #[derive(Debug, Default)]
    pub struct FakeMounter {
        pub st: Mutex<FakeState>,
    }

    impl FakeMounter {
        pub fn fail(&self, op: &'static str) {
            self.st.lock().unwrap().fail.insert(op);
        }
        pub fn heal(&self, op: &'static str) {
            self.st.lock().unwrap().fail.remove(op);
        }
        pub fn mounted(&self, target: &Path) -> Option<(PathBuf, bool)> {
            self.st
                .lock()
                .unwrap()
                .mounts
                .get(target)
                .and_then(|v| v.last().cloned())
        }
        pub fn mount_count(&self) -> usize {
            self.st.lock().unwrap().mounts.values().map(Vec::len).sum()
        }
        /// The device under a mount source (a staging dir resolves to its device).
        fn resolve(st: &FakeState, p: &Path) -> PathBuf {
            match st.mounts.get(p).and_then(|v| v.last()) {
                Some((src, _)) => Self::resolve(st, src),
                None => p.to_path_buf(),
            }
        }
        fn check(st: &mut FakeState, op: &'static str) -> Result<(), MountError> {
            st.calls.push(op.to_string());
            if st.fail.contains(op) {
                return Err(MountError::CommandFailed {
                    cmd: op.into(),
                    message: "injected failure".into(),
                });
            }
            Ok(())
        }
    }

    impl Mounter for FakeMounter {
        fn state(&self, target: &Path, device: &Path) -> Result<MountState, MountError> {
            let st = self.st.lock().unwrap();
            Ok(match st.mounts.get(target).and_then(|v| v.last()) {
                None => MountState::NotMounted,
                Some((src, _)) if Self::resolve(&st, src) == device => MountState::Device,
                Some((src, _)) => MountState::Other(src.display().to_string()),
            })
        }
        fn probe(&self, device: &Path) -> Result<Option<String>, MountError> {
            let mut st = self.st.lock().unwrap();
            Self::check(&mut st, "probe")?;
            Ok(st.filesystems.get(device).cloned())
        }
        fn mkfs(&self, device: &Path, fs_type: &str) -> Result<(), MountError> {
            let mut st = self.st.lock().unwrap();
            Self::check(&mut st, "mkfs")?;
            st.mkfs_calls.push((device.into(), fs_type.into()));
            st.filesystems.insert(device.into(), fs_type.into());
            Ok(())
        }
        fn mount(
            &self,
            device: &Path,
            target: &Path,
            _fs_type: &str,
            options: &[String],
        ) -> Result<(), MountError> {
            let mut st = self.st.lock().unwrap();
            Self::check(&mut st, "mount")?;
            st.options.insert(target.into(), options.to_vec());
            assert!(
                target.is_dir(),
                "mount target {} must exist",
                target.display()
            );
            st.mounts
                .entry(target.into())
                .or_default()
                .push((device.into(), false));
            Ok(())
        }
        fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<(), MountError> {
            let mut st = self.st.lock().unwrap();
            Self::check(&mut st, "bind")?;
            assert!(
                target.exists(),
                "bind target {} must exist",
                target.display()
            );
            st.mounts
                .entry(target.into())
                .or_default()
                .push((source.into(), read_only));
            Ok(())
        }
        fn unmount(&self, target: &Path) -> Result<(), MountError> {
            let mut st = self.st.lock().unwrap();
            Self::check(&mut st, "unmount")?;
            let stack = st.mounts.get_mut(target);
            match stack {
                Some(v) if !v.is_empty() => {
                    v.pop();
                    if v.is_empty() {
                        st.mounts.remove(target);
                    }
                    Ok(())
                }
                _ => Err(MountError::CommandFailed {
                    cmd: "umount".into(),
                    message: "not mounted".into(),
                }),
            }
        }
        fn is_mount_point(&self, target: &Path) -> Result<bool, MountError> {
            Ok(self.st.lock().unwrap().mounts.contains_key(target))
        }
        fn fs_stats(&self, _path: &Path) -> Result<FsStats, MountError> {
            Ok(FsStats {
                bytes_total: 1000,
                bytes_available: 600,
                bytes_used: 400,
                inodes_total: 100,
                inodes_free: 90,
                inodes_used: 10,
            })
        }
        fn device_size(&self, _device: &Path) -> Result<u64, MountError> {
            Ok(1 << 30)
        }
        fn grow_fs(
            &self,
            device: &Path,
            mount_point: &Path,
            fs_type: &str,
        ) -> Result<(), MountError> {
            let mut st = self.st.lock().unwrap();
            Self::check(&mut st, "grow_fs")?;
            if st.fail.contains("grow_fs_eperm") {
                return Err(MountError::GrowNotPermitted {
                    cmd: "resize2fs".into(),
                    message: "Permission denied to resize filesystem".into(),
                });
            }
            st.grown.push((
                device.to_path_buf(),
                mount_point.to_path_buf(),
                fs_type.to_string(),
            ));
            st.smaller.remove(device);
            Ok(())
        }
        fn fs_smaller_than_device(
            &self,
            device: &Path,
            _fs_type: &str,
        ) -> Result<bool, MountError> {
            let mut st = self.st.lock().unwrap();
            Self::check(&mut st, "fs_smaller_than_device")?;
            Ok(st.smaller.contains(device))
        }
        fn grow_fs_offline(&self, device: &Path, fs_type: &str) -> Result<(), MountError> {
            let mut st = self.st.lock().unwrap();
            Self::check(&mut st, "grow_fs_offline")?;
            st.grown_offline
                .push((device.to_path_buf(), fs_type.to_string()));
            st.smaller.remove(device);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 7:3 / /var/lib/kubelet/staging/pv\\0401 rw,relatime shared:30 - ext4 /dev/loop3 rw
41 22 7:3 / /var/lib/kubelet/pods/p/volumes/v/mount rw,relatime shared:30 - ext4 /dev/loop3 rw
42 22 0:5 /loop3 /var/lib/kubelet/pods/p/volumeDevices/v rw,nosuid shared:2 - devtmpfs udev rw,size=1k
43 22 0:5 /loop4 /var/lib/kubelet/pods/q/volumeDevices/v rw,nosuid shared:2 - devtmpfs udev rw,size=1k
44 41 0:40 / /var/lib/kubelet/pods/p/volumes/v/mount rw - tmpfs tmpfs rw
";

    #[test]
    fn parses_mountinfo_with_escapes() {
        let m = parse_mountinfo(SAMPLE);
        assert_eq!(m.len(), 6);
        assert_eq!(
            m[1].mount_point,
            PathBuf::from("/var/lib/kubelet/staging/pv 1")
        );
        assert_eq!(m[1].major_minor, (7, 3));
        assert_eq!(m[3].root, "/loop3");
        assert_eq!(m[3].fs_type, "devtmpfs");
    }

    #[test]
    fn classifies_filesystem_block_and_foreign_mounts() {
        let m = parse_mountinfo(SAMPLE);
        let dev = (7, 3);
        assert_eq!(
            classify(&m, Path::new("/var/lib/kubelet/staging/pv 1"), dev, "loop3"),
            MountState::Device
        );
        assert_eq!(
            classify(
                &m,
                Path::new("/var/lib/kubelet/pods/p/volumeDevices/v"),
                dev,
                "loop3"
            ),
            MountState::Device
        );
        assert!(matches!(
            classify(
                &m,
                Path::new("/var/lib/kubelet/pods/q/volumeDevices/v"),
                dev,
                "loop3"
            ),
            MountState::Other(_)
        ));
        // Something mounted on top of our bind: the top one counts.
        assert!(matches!(
            classify(
                &m,
                Path::new("/var/lib/kubelet/pods/p/volumes/v/mount"),
                dev,
                "loop3"
            ),
            MountState::Other(_)
        ));
        assert_eq!(
            classify(&m, Path::new("/nowhere"), dev, "loop3"),
            MountState::NotMounted
        );
    }

    #[test]
    fn splits_device_numbers_like_glibc() {
        // makedev(7, 3), and makedev(259, 65541) whose minor needs the high bits.
        assert_eq!(dev_major_minor((7 << 8) | 3), (7, 3));
        let (major, minor) = (259u64, 65541u64);
        let rdev =
            ((major & 0xfff) << 8) | ((major >> 12) << 44) | (minor & 0xff) | ((minor >> 8) << 20);
        assert_eq!(dev_major_minor(rdev), (259, 65541));
    }
}

#[cfg(test)]
mod system_tests {
    use super::*;

    #[test]
    fn a_missing_device_is_not_mounted_anywhere() {
        let dir = tempfile::tempdir().unwrap();
        let st = SystemMounter
            .state(dir.path(), Path::new("/dev/tandem-no-such-device"))
            .unwrap();
        assert_eq!(st, MountState::NotMounted);
    }

    fn have(tool: &str) -> bool {
        Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    }

    /// On image files (no loop device, no root): the superblock check and the offline grow.
    #[test]
    fn a_smaller_ext4_is_seen_and_grown_offline_and_xfs_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let set_len = |p: &Path, n: u64| {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(p)
                .unwrap()
                .set_len(n)
                .unwrap()
        };
        if have("mkfs.ext4") && have("resize2fs") && have("dumpe2fs") {
            let img = dir.path().join("ext4.img");
            set_len(&img, 64 << 20);
            SystemMounter.mkfs(&img, "ext4").unwrap();
            assert!(!SystemMounter.fs_smaller_than_device(&img, "ext4").unwrap());
            // A tail too small for a block group is no growth.
            set_len(&img, (64 << 20) + 8192);
            assert!(!SystemMounter.fs_smaller_than_device(&img, "ext4").unwrap());
            set_len(&img, 256 << 20);
            assert!(SystemMounter.fs_smaller_than_device(&img, "ext4").unwrap());
            SystemMounter.grow_fs_offline(&img, "ext4").unwrap();
            assert!(!SystemMounter.fs_smaller_than_device(&img, "ext4").unwrap());
        } else {
            println!("SKIP ext4: e2fsprogs missing");
        }
        if have("mkfs.xfs") && have("xfs_db") {
            let img = dir.path().join("xfs.img");
            set_len(&img, 320 << 20);
            SystemMounter.mkfs(&img, "xfs").unwrap();
            assert!(!SystemMounter.fs_smaller_than_device(&img, "xfs").unwrap());
            set_len(&img, 640 << 20);
            assert!(SystemMounter.fs_smaller_than_device(&img, "xfs").unwrap());
        } else {
            println!("SKIP xfs: xfsprogs missing");
        }
    }

    #[test]
    fn superblock_fields_parse_or_name_what_is_missing() {
        let text = "Block count:              262144\nBlock size:               1024\n";
        assert_eq!(superblock_field(text, "Block count", ':').unwrap(), 262144);
        assert_eq!(
            superblock_field("dblocks = 81920\n", "dblocks", '=').unwrap(),
            81920
        );
        let e = superblock_field(text, "Inode count", ':').unwrap_err();
        assert!(e.to_string().contains("Inode count"), "{e}");
    }
}
