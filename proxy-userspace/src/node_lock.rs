//! One owner per pin directory: an agent holds an exclusive `flock` on the directory for as
//! long as it runs, so that a second agent (a DaemonSet surge, a manual run) cannot detach
//! the first one's programs and rewrite its maps. The kernel drops the lock when the
//! process exits, however it exits, so there is nothing stale to clean up.
use std::{
    fs::File,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

/// Why the lock was not taken.
#[derive(Debug)]
pub enum LockError {
    /// Another process holds it: its pid, when `/proc/locks` shows it.
    Held {
        dir: PathBuf,
        pid: Option<u32>,
    },
    Io {
        dir: PathBuf,
        error: std::io::Error,
    },
}

impl std::fmt::Display for LockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockError::Held { dir, pid } => {
                let who = pid.map_or("another agent".to_owned(), |p| format!("agent pid {p}"));
                write!(
                    f,
                    "{who} already owns the datapath pinned under {}: stop it first, or give \
                     this one another --bpffs (two agents on one pin directory detach each \
                     other's programs)",
                    dir.display()
                )
            }
            LockError::Io { dir, error } => write!(f, "locking {}: {error}", dir.display()),
        }
    }
}

impl std::error::Error for LockError {}

/// The held lock; dropping it (or exiting) releases it.
#[derive(Debug)]
pub struct NodeLock {
    _dir: File,
}

impl NodeLock {
    /// Takes the lock on `dir`, which must exist, without waiting.
    pub fn acquire(dir: &Path) -> Result<NodeLock, LockError> {
        let io = |error| LockError::Io {
            dir: dir.to_path_buf(),
            error,
        };
        let file = File::open(dir).map_err(io)?;
        // SAFETY: a valid open descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io(error));
            }
            let pid = file.metadata().ok().and_then(|m| {
                let locks = std::fs::read_to_string("/proc/locks").ok()?;
                holder(&locks, m.dev(), m.ino())
            });
            return Err(LockError::Held {
                dir: dir.to_path_buf(),
                pid,
            });
        }
        Ok(NodeLock { _dir: file })
    }

    /// Whether some process holds the lock on `dir` now, and its pid if known.
    pub fn holder_of(dir: &Path) -> Result<Option<Option<u32>>, LockError> {
        match NodeLock::acquire(dir) {
            Ok(_lock) => Ok(None),
            Err(LockError::Held { pid, .. }) => Ok(Some(pid)),
            Err(e) => Err(e),
        }
    }
}

/// The pid of the process holding a `flock` on the file `dev`:`ino`, from the text of
/// `/proc/locks` (`1: FLOCK  ADVISORY  WRITE 4242 00:28:6396477 0 EOF`; the device as hex
/// major:minor).
fn holder(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let wanted = format!(
        "{:02x}:{:02x}:{ino}",
        libc::major(dev as libc::dev_t),
        libc::minor(dev as libc::dev_t)
    );
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // A waiting lock is listed as "1: -> FLOCK ...": only the holder counts.
        (fields.get(1) == Some(&"FLOCK") && fields.get(5) == Some(&wanted.as_str()))
            .then(|| fields[4].parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_holder_of_a_file_in_proc_locks() {
        let locks = "1: POSIX  ADVISORY  WRITE 77 00:19:12 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 4242 00:28:6396477 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 4343 00:28:6396477 0 EOF\n";
        let dev = libc::makedev(0, 0x28) as u64;
        assert_eq!(holder(locks, dev, 6396477), Some(4242));
        assert_eq!(holder(locks, dev, 12), None);
    }

    #[test]
    fn a_second_lock_on_a_directory_is_refused_with_the_holders_pid() {
        let dir = std::env::temp_dir().join(format!("node-lock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = NodeLock::acquire(&dir).unwrap();
        match NodeLock::acquire(&dir) {
            Err(LockError::Held { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("second lock: {other:?}"),
        }
        drop(first);
        assert!(NodeLock::holder_of(&dir).unwrap().is_none());
        std::fs::remove_dir(&dir).unwrap();
    }
}
