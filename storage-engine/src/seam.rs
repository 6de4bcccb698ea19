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
