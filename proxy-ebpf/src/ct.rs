//! Conntrack entries created and removed with an account of both (`CT_STATS`): the
//! agent compares the account with the entries in the map, and the difference is what the
//! LRU map evicted to make room.
use aya_ebpf::bindings::{BPF_EXIST, BPF_NOEXIST};
use proxy_common::{CtEntry, CtKey};

use crate::{
    lb::atomic_add,
    maps::{CONNTRACK, CT_STATS},
};

#[inline(always)]
fn account(created: u64, deleted: u64) {
    if let Some(stats) = CT_STATS.get_ptr_mut(0) {
        // SAFETY: an array value lives as long as the map; the fields are 8-byte aligned.
        unsafe {
            atomic_add(&raw mut (*stats).created, created);
            atomic_add(&raw mut (*stats).deleted, deleted);
        }
    }
}

/// Records `entry` under `key` if no entry is there.
#[inline(always)]
pub fn create(key: CtKey, entry: CtEntry) -> bool {
    let created = CONNTRACK.insert(key, entry, BPF_NOEXIST as u64).is_ok();
    if created {
        account(1, 0);
    }
    created
}

/// Records `entry` under `key`, replacing what is there. Creating is tried first: it is
/// the common case where this is used (a new flow's entry).
#[inline(always)]
pub fn put(key: CtKey, entry: CtEntry) -> bool {
    // Created, replaced, or created after all (the entry went while this ran).
    create(key, entry)
        || CONNTRACK.insert(key, entry, BPF_EXIST as u64).is_ok()
        || create(key, entry)
}

/// Removes the entry under `key`, if there is one.
#[inline(always)]
pub fn remove(key: CtKey) -> bool {
    let removed = CONNTRACK.remove(key).is_ok();
    if removed {
        account(0, 1);
    }
    removed
}
