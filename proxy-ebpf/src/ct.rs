//! Conntrack entries created and removed with an account of both (`CT_STATS`): the
//! agent compares the account with the entries in the map, and the difference is what the
//! LRU map evicted to make room.
use aya_ebpf::bindings::{BPF_EXIST, BPF_NOEXIST};
use proxy_common::{CtEntryOf, CtKeyOf};

use crate::{family::Family, lb::atomic_add, maps::CT_STATS};

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

/// The entry under `key`, copied.
#[inline(always)]
pub fn get<A: Family>(key: &CtKeyOf<A>) -> Option<CtEntryOf<A>> {
    // SAFETY: LRU values stay valid during the program's run; the entry is copied at once.
    A::ct_get_ptr_mut(key).map(|entry| unsafe { *entry })
}

// Keys and entries by reference: the map helpers take pointers, and copies of IPv6's would
// take stack the IPv6 path does not have.

/// Records `entry` under `key` if no entry is there.
#[inline(always)]
pub fn create<A: Family>(key: &CtKeyOf<A>, entry: &CtEntryOf<A>) -> bool {
    let created = A::ct_insert(key, entry, BPF_NOEXIST as u64);
    if created {
        account(1, 0);
    }
    created
}

/// Records `entry` under `key`, replacing what is there. Creating is tried first: it is
/// the common case where this is used (a new flow's entry).
#[inline(always)]
pub fn put<A: Family>(key: &CtKeyOf<A>, entry: &CtEntryOf<A>) -> bool {
    // Created, replaced, or created after all (the entry went while this ran).
    create(key, entry) || A::ct_insert(key, entry, BPF_EXIST as u64) || create(key, entry)
}

/// Removes the entry under `key`, if there is one.
#[inline(always)]
pub fn remove<A: Family>(key: &CtKeyOf<A>) -> bool {
    let removed = A::ct_remove(key);
    if removed {
        account(0, 1);
    }
    removed
}
