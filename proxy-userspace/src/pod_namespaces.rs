//! The network namespaces where sockets the socket hooks balanced may live: the agent's own
//! (host-network pods), those of the processes in `--cgroup` that this process can see (all
//! of them on the host; a container sees them with the host's PID namespace), and those
//! pinned under `/run/netns`, where CNI plugins, container runtimes and `ip netns` keep
//! pods' namespaces (visible to a containerized agent through a mount of it). Each once.
use std::{
    collections::HashSet,
    fs::File,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

/// Where pinned network namespaces are.
pub const PINNED: &str = "/run/netns";
/// Cgroups deeper than this under `--cgroup` are not searched (kubelet's are 4 deep).
const MAX_DEPTH: usize = 8;

/// Opens each distinct network namespace of the agent, of the processes in `cgroup` and its
/// descendants, and pinned under `pinned`. One that cannot be opened (a process that
/// just ended) is skipped.
pub fn open(cgroup: &Path, pinned: &Path) -> Vec<File> {
    let mut candidates = vec![PathBuf::from("/proc/self/ns/net")];
    candidates.extend(
        processes(cgroup)
            .into_iter()
            .map(|pid| PathBuf::from(format!("/proc/{pid}/ns/net"))),
    );
    if let Ok(entries) = std::fs::read_dir(pinned) {
        candidates.extend(entries.filter_map(Result::ok).map(|e| e.path()));
    }
    let mut seen = HashSet::new();
    candidates
        .into_iter()
        .filter_map(|path| File::open(path).ok())
        .filter(|file| {
            file.metadata()
                .is_ok_and(|m| seen.insert((m.dev(), m.ino())))
        })
        .collect()
}

/// Runs `work` in each of `namespaces`, on a thread that enters them in turn (a thread's
/// network namespace is its own; this one ends with the walk). The agent's own namespace
/// needs nothing; entering another needs CAP_SYS_ADMIN. Returns what failed, namespace
/// by namespace (the others are walked all the same).
pub fn in_each(
    namespaces: &[File],
    work: impl Fn() -> std::io::Result<()> + Sync,
) -> Vec<std::io::Error> {
    let identity = |file: &File| file.metadata().map(|m| (m.dev(), m.ino())).ok();
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let mut errors = Vec::new();
                let mut current = File::open("/proc/thread-self/ns/net")
                    .ok()
                    .and_then(|f| identity(&f));
                for netns in namespaces {
                    let wanted = identity(netns);
                    // SAFETY: a namespace file descriptor; setns affects this thread only.
                    if wanted != current
                        && unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0
                    {
                        errors.push(std::io::Error::last_os_error());
                        continue;
                    }
                    current = wanted;
                    if let Err(e) = work() {
                        errors.push(e);
                    }
                }
                errors
            })
            .join()
            .unwrap_or_else(|_| vec![std::io::Error::other("the namespace walk panicked")])
    })
}

/// The process ids in `cgroup` and its descendants.
fn processes(cgroup: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    let mut dirs = vec![(cgroup.to_path_buf(), 0)];
    while let Some((dir, depth)) = dirs.pop() {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if depth == MAX_DEPTH {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        dirs.extend(
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| (e.path(), depth + 1)),
        );
    }
    pids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_own_namespace_once_whatever_else_shares_it() {
        let dir = std::env::temp_dir().join(format!("pod-namespaces-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("child")).unwrap();
        // A fake cgroup holding this process twice, and a pin directory with our namespace.
        let me = std::process::id().to_string();
        std::fs::write(dir.join("cgroup.procs"), format!("{me}\n")).unwrap();
        std::fs::write(dir.join("child/cgroup.procs"), format!("{me}\nnot-a-pid\n")).unwrap();
        let pins = dir.join("pins");
        std::fs::create_dir(&pins).unwrap();
        std::os::unix::fs::symlink("/proc/self/ns/net", pins.join("mine")).unwrap();
        let found = open(&dir, &pins);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(processes(Path::new("/nonexistent")), Vec::<u32>::new());
    }

    #[test]
    fn a_namespace_that_cannot_be_entered_is_reported_and_the_others_are_walked() {
        let own = || File::open("/proc/self/ns/net").unwrap();
        let not_a_namespace = File::open("/proc/self/status").unwrap();
        let walked = std::sync::atomic::AtomicUsize::new(0);
        let errors = in_each(&[own(), not_a_namespace, own()], || {
            walked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        });
        assert_eq!(walked.into_inner(), 2);
        assert_eq!(errors.len(), 1);
        assert_eq!(
            errors[0].raw_os_error(),
            Some(libc::EINVAL),
            "{:?}",
            errors[0]
        );
    }
}
