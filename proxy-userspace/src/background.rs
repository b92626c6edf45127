//! Threads for the work that scans whole maps (conntrack GC, drift-repair snapshots,
//! affinity clean-up): off the loop that programs changes, and at the lowest CPU priority,
//! so that on a busy node a change to program always wins the CPU over them.
use tokio::sync::oneshot;

/// Lowers the calling thread's CPU priority to nice 19 (on Linux the nice value is per
/// thread). Failing to is harmless: the work still runs, off the loop.
pub fn lower_priority() {
    // SAFETY: plain syscalls on the calling thread.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19);
    }
}

/// Runs `work` on a thread of its own at the lowest priority; the receiver gets its
/// result, or an error if it panicked.
pub fn spawn<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<oneshot::Receiver<T>> {
    let (done, result) = oneshot::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            lower_priority();
            let _ = done.send(work());
        })?;
    Ok(result)
}
