//! The account of conntrack entries created and deleted (`ct_stats`), shared with the
//! datapath: the agent and `proxyctl` add their own creations and deletions to it
//! atomically, through a shared mapping of the array. Entries created, less deleted, less
//! those in the map, are the entries the datapath dropped to make room in a full map (flows
//! never answered: `early_drop`, which leaves them out of the account).
use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::Context as _;
use aya::maps::MapData;
use proxy_common::{CtStats, maps};

/// `CtStats` as both sides update it.
#[repr(C)]
struct Shared {
    created: AtomicU64,
    deleted: AtomicU64,
}

pub struct CtAccount {
    shared: NonNull<Shared>,
    len: usize,
}

// SAFETY: the mapping is only reached through atomics.
unsafe impl Send for CtAccount {}
unsafe impl Sync for CtAccount {}

impl CtAccount {
    /// Maps the account pinned under `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(maps::CT_STATS);
        let map = MapData::from_pin(&path).with_context(|| {
            format!(
                "opening pinned map {} (the conntrack account, pinned by agents since it \
                     exists: restart the agent on this node to create it)",
                path.display()
            )
        })?;
        // SAFETY: sysconf has no preconditions.
        let len = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .context("reading the page size")?;
        // SAFETY: a shared mapping of a BPF_F_MMAPABLE array's first page, which holds its
        // one value; the mapping keeps the map alive after the fd closes.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mapping pinned map {} into memory", path.display()));
        }
        let shared = NonNull::new(ptr.cast()).context("mmap returned null")?;
        Ok(Self { shared, len })
    }

    fn shared(&self) -> &Shared {
        // SAFETY: mapped for as long as self lives; page-aligned, so aligned for u64.
        unsafe { self.shared.as_ref() }
    }

    pub fn read(&self) -> CtStats {
        let s = self.shared();
        CtStats {
            created: s.created.load(Ordering::Relaxed),
            deleted: s.deleted.load(Ordering::Relaxed),
        }
    }

    pub fn add_created(&self, n: u64) {
        self.shared().created.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_deleted(&self, n: u64) {
        self.shared().deleted.fetch_add(n, Ordering::Relaxed);
    }

    /// An account created beside entries it never saw (a map pinned by an agent that kept
    /// none) starts from them, so that they are not taken for entries dropped.
    pub fn start_from(&self, entries: u64) {
        let s = self.shared();
        if s.created.load(Ordering::Relaxed) == 0 && s.deleted.load(Ordering::Relaxed) == 0 {
            s.created.fetch_add(entries, Ordering::Relaxed);
        }
    }
}

impl Drop for CtAccount {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, unmapped once.
        unsafe { libc::munmap(self.shared.as_ptr().cast(), self.len) };
    }
}

/// Entries the datapath dropped to make room since the map was created, at least, given
/// the account read `before` and `after` counting `counted` entries in the map. Entries
/// made during the count may be missing from it and entries removed during it may be in
/// it, so this takes the creations from before and the deletions from after: never more
/// than the truth, and exactly it when the map was quiet.
pub fn evicted(before: CtStats, after: CtStats, counted: u64) -> u64 {
    before
        .created
        .saturating_sub(after.deleted)
        .saturating_sub(counted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(created: u64, deleted: u64) -> CtStats {
        CtStats { created, deleted }
    }

    #[test]
    fn evictions_are_what_the_account_misses_and_never_overstated_by_churn() {
        // Quiet: 100 created, 30 deleted, 60 there: 10 evicted.
        assert_eq!(evicted(stats(100, 30), stats(100, 30), 60), 10);
        // 20 flows made and 5 deleted while counting, all seen by the count: still 10 at
        // most, not more.
        assert!(evicted(stats(100, 30), stats(120, 35), 75) <= 10);
        // Nothing evicted, churn during the count: 0, not a phantom.
        assert_eq!(evicted(stats(100, 30), stats(150, 40), 110), 0);
    }
}
