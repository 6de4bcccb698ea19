//! Waits on the disk from async code without holding a runtime worker.

/// Runs `f`, which may block for a while (an fsync behind other writeback, or the wait for another
/// thread's), so that it never holds up a runtime worker: on one, the worker's other tasks move to
/// another thread first (`block_in_place`). An HTTP/2 keep-alive unanswered for a third of the peer
/// timeout ends the link, so a worker stuck in a sync behind a slow disk can fail a takeover
/// between two live engines (Liveness in ARCHITECTURE.md). Elsewhere (a blocking thread, the
/// connection threads' `block_on`, a current-thread runtime in tests) it just runs.
pub fn off_the_runtime<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}
