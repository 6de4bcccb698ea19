//! Test seams: named points in the engine where a unit test holds a thread until it lets go, to
//! force one interleaving of two racing steps (never a sleep). Each volume has its own points, so
//! tests running side by side never hold each other's threads. Outside `cfg(test)` a point is an
//! empty inline function.

#[cfg(test)]
#[allow(clippy::items_after_test_module)]
mod armed {
    use std::{
        collections::HashMap,
        sync::{Arc, Condvar, Mutex},
        time::{Duration, Instant},
    };

    #[derive(Default)]
    struct Point {
        /// (a thread is held or was, released)
        state: Mutex<(u32, bool)>,
        cv: Condvar,
    }

    /// The points of one volume.
    #[derive(Default)]
    pub struct Seams {
        points: Mutex<HashMap<&'static str, Arc<Point>>>,
    }

    impl Seams {
        /// The first thread to pass `name` while it is armed waits here until the test releases
        /// it; later ones pass (so a racing step that reaches the same point is not held too).
        pub fn hit(&self, name: &'static str) {
            let p = self.points.lock().ok().and_then(|m| m.get(name).cloned());
            let Some(p) = p else { return };
            let Ok(mut s) = p.state.lock() else { return };
            if s.0 > 0 {
                return;
            }
            s.0 = 1;
            p.cv.notify_all();
            while !s.1 {
                s = match p.cv.wait(s) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            }
        }

        /// Arms `name` until the returned handle releases it (or drops).
        pub fn arm(&self, name: &'static str) -> Armed<'_> {
            let p = Arc::new(Point::default());
            if let Ok(mut m) = self.points.lock() {
                m.insert(name, Arc::clone(&p));
            }
            Armed {
                seams: self,
                name,
                point: p,
            }
        }
    }

    pub struct Armed<'a> {
        seams: &'a Seams,
        name: &'static str,
        point: Arc<Point>,
    }

    impl Armed<'_> {
        /// Waits until a thread is held at the point; false after 10 s (the test then fails).
        pub fn wait_arrived(&self) -> bool {
            self.wait_arrived_for(Duration::from_secs(10))
        }

        /// Waits at most `d` for a thread to be held at the point.
        pub fn wait_arrived_for(&self, d: Duration) -> bool {
            let deadline = Instant::now() + d;
            let Ok(mut s) = self.point.state.lock() else {
                return false;
            };
            while s.0 == 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return false;
                }
                s = match self.point.cv.wait_timeout(s, left) {
                    Ok((s, _)) => s,
                    Err(_) => return false,
                };
            }
            true
        }

        /// Lets every held thread go on, and disarms the point.
        pub fn release(&self) {
            if let Ok(mut m) = self.seams.points.lock() {
                m.remove(self.name);
            }
            if let Ok(mut s) = self.point.state.lock() {
                s.1 = true;
            }
            self.point.cv.notify_all();
        }
    }

    impl Drop for Armed<'_> {
        fn drop(&mut self) {
            self.release();
        }
    }
}

#[cfg(test)]
pub use armed::{Armed, Seams};

/// Production build: no points, no cost.
#[cfg(not(test))]
#[derive(Default)]
pub struct Seams;

#[cfg(not(test))]
impl Seams {
    #[inline(always)]
    pub fn hit(&self, _name: &'static str) {}
}

/// Unit tests' power cut: after a budget of file operations under a directory, every further
/// write, sync or store there fails without touching the disk, as if the machine had lost power at
/// that instant. With `BlockStore`'s undo log of unsynced writes, what is left on disk afterwards is
/// what a real power loss at that point would leave (whole-file stores are written to a temporary
/// file, fsync'd, renamed and the directory fsync'd, so they count as one operation: all or nothing).
#[cfg(test)]
pub mod power {
    use std::{
        io,
        path::{Path, PathBuf},
        sync::{
            atomic::{AtomicI64, Ordering},
            Arc, Mutex,
        },
    };

    /// What happens at the chosen file operation.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Kind {
        /// The power goes out: this operation and every later one fail, touching nothing.
        Cut,
        /// This one operation fails with EIO; later ones succeed.
        Eio,
        /// This one fails with ENOSPC.
        Enospc,
        /// A write lands in part, then fails (EIO); other operations fail like `Eio`.
        Short,
    }

    type Cuts = Mutex<Vec<(PathBuf, Arc<AtomicI64>, Kind)>>;
    static CUTS: Cuts = Mutex::new(Vec::new());

    /// The error a short write returns after landing its first half.
    pub fn is_short(e: &io::Error) -> bool {
        e.kind() == io::ErrorKind::WriteZero
    }

    /// One file operation under `path`: an error if it is the chosen one (or after a cut).
    pub fn io(path: &Path) -> io::Result<()> {
        let found = CUTS.lock().ok().and_then(|c| {
            c.iter()
                .find(|(root, _, _)| path.starts_with(root))
                .map(|(_, b, k)| (Arc::clone(b), *k))
        });
        let Some((b, kind)) = found else {
            return Ok(());
        };
        let left = b.fetch_sub(1, Ordering::SeqCst);
        match kind {
            Kind::Cut if left <= 0 => Err(io::Error::other("simulated power cut")),
            Kind::Eio if left == 0 => Err(io::Error::from_raw_os_error(5)),
            Kind::Enospc if left == 0 => Err(io::Error::from_raw_os_error(28)),
            Kind::Short if left == 0 => Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "simulated short write",
            )),
            _ => Ok(()),
        }
    }

    /// The power under `root` goes out after `ops` more file operations, until this is dropped.
    pub struct Cut {
        root: PathBuf,
        budget: Arc<AtomicI64>,
        ops: i64,
    }

    impl Cut {
        pub fn after(root: &Path, ops: i64) -> Cut {
            Self::fault(root, ops, Kind::Cut)
        }

        /// The file operation after `ops` more under `root` fails as `kind` says.
        pub fn fault(root: &Path, ops: i64, kind: Kind) -> Cut {
            let budget = Arc::new(AtomicI64::new(ops));
            if let Ok(mut c) = CUTS.lock() {
                c.push((root.to_path_buf(), Arc::clone(&budget), kind));
            }
            Cut {
                root: root.to_path_buf(),
                budget,
                ops,
            }
        }

        /// File operations done (or refused) so far.
        pub fn used(&self) -> i64 {
            self.ops - self.budget.load(Ordering::SeqCst)
        }

        pub fn tripped(&self) -> bool {
            self.budget.load(Ordering::SeqCst) < 0
        }
    }

    impl Drop for Cut {
        fn drop(&mut self) {
            if let Ok(mut c) = CUTS.lock() {
                c.retain(|(r, _, _)| r != &self.root);
            }
        }
    }

    /// Runs `run(dir, k)` in a fresh directory for k = 0, 1, 2, ... (the power cut after k file
    /// operations) until a run completes without the cut tripping; panics on the first run that
    /// reports a problem, and if fewer than `at_least` cut points were reached (a test whose
    /// sequence stopped doing file operations would otherwise pass without testing anything).
    pub fn at_every_cut(at_least: u64, run: impl Fn(&Path, i64) -> (bool, Vec<String>)) {
        let mut k = 0;
        loop {
            let d = tempfile::tempdir().expect("a temporary directory");
            let (tripped, bad) = run(d.path(), k);
            assert!(
                bad.is_empty(),
                "power cut after {k} file operations: {bad:?}"
            );
            if !tripped {
                break;
            }
            k += 1;
        }
        assert!(k as u64 >= at_least, "only {k} cut points");
    }
}

/// Production build: the power never goes out on purpose.
#[cfg(not(test))]
pub mod power {
    #[inline(always)]
    pub fn io(_path: &std::path::Path) -> std::io::Result<()> {
        Ok(())
    }

    pub fn is_short(_e: &std::io::Error) -> bool {
        false
    }
}
