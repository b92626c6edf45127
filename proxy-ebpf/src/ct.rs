//! Conntrack entries created and removed with an account of both (`CT_STATS`): the
//! agent compares the account with the entries in the map, and the difference is what the
//! datapath dropped to make room for new flows (`early_drop`).
use aya_ebpf::{
    bindings::{BPF_EXIST, BPF_NOEXIST},
    cty::c_void,
    helpers::bpf_loop,
};
use proxy_common::{
    CT_FLAG_SHARED, CT_FORWARD, CT_STATE_ESTABLISHED, CT_STATE_NEW, CtEntryOf, CtKeyOf, IPPROTO_TCP,
};

use crate::{family::Family, lb::atomic_add, maps::CT_STATS};

/// The error of an insert into a full hash map (`-E2BIG`).
const FULL: i32 = -7;

/// How many of the flows a CPU recorded lately `early_drop` may choose from.
pub const RECENT_FLOWS: usize = 8;

/// The keys of the last flows a CPU recorded (client keys, or forward 5-tuples), in turn (`Family::recent_flows`):
/// the candidates of `early_drop`. A flood of new flows never answered is what fills a map
/// with them, so the oldest of the last few are likely its own.
#[derive(Clone, Copy)]
pub struct RecentFlows<A> {
    pub keys: [CtKeyOf<A>; RECENT_FLOWS],
    /// The oldest, and the next to be replaced.
    pub next: u32,
    /// Where `try_drop` builds a reply key, and the key its entry leads back to: the IPv6
    /// path has no stack left for them.
    pub reply_key: CtKeyOf<A>,
    pub back_key: CtKeyOf<A>,
}

impl<A: Copy> RecentFlows<A> {
    #[inline(always)]
    pub fn note(&mut self, key: &CtKeyOf<A>) {
        if let Some(slot) = self.keys.get_mut(self.next as usize % RECENT_FLOWS) {
            *slot = *key;
        }
        self.next = self.next.wrapping_add(1);
    }

    /// The key of the flow recorded last.
    #[inline(always)]
    pub fn last(&self) -> Option<&CtKeyOf<A>> {
        self.keys
            .get(self.next.wrapping_sub(1) as usize % RECENT_FLOWS)
    }
}

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
    // SAFETY: map values stay valid during the program's run; the entry is copied at once.
    A::ct_get_ptr_mut(key).map(|entry| unsafe { *entry })
}

// Keys and entries by reference: the map helpers take pointers, and copies of IPv6's would
// take stack the IPv6 path does not have.

/// Why `create` made no entry.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// An entry is there already.
    Taken,
    /// The map is full, and no flow of those `early_drop` looks at could be dropped.
    Full,
}

/// Records `entry` under `key` if no entry is there. In a full map, a flow never answered
/// makes room (`early_drop`).
#[inline(always)]
pub fn create<A: Family>(key: &CtKeyOf<A>, entry: &CtEntryOf<A>) -> Result<(), Refused> {
    match create_in_room(key, entry) {
        Err(Refused::Full) if early_drop::<A>() => create_in_room(key, entry),
        created => created,
    }
}

/// `create` without making room: for the masquerade port search's callback, where
/// `early_drop`'s own callback would take the program past its stack (the search makes room
/// itself, between two rounds).
#[inline(always)]
pub fn create_in_room<A: Family>(key: &CtKeyOf<A>, entry: &CtEntryOf<A>) -> Result<(), Refused> {
    match A::ct_insert(key, entry, BPF_NOEXIST as u64) {
        Ok(()) => {
            account(1, 0);
            Ok(())
        }
        Err(FULL) => Err(Refused::Full),
        Err(_) => Err(Refused::Taken),
    }
}

/// Records `entry` under `key`, replacing what is there. Creating is tried first: it is
/// the common case where this is used (a new flow's entry).
#[inline(always)]
pub fn put<A: Family>(key: &CtKeyOf<A>, entry: &CtEntryOf<A>) -> bool {
    // Created, replaced, or created after all (the entry went while this ran).
    match create(key, entry) {
        Ok(()) => true,
        Err(Refused::Full) => false,
        Err(Refused::Taken) => {
            A::ct_insert(key, entry, BPF_EXIST as u64).is_ok() || create(key, entry).is_ok()
        }
    }
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

/// Makes room in a full map as Linux's conntrack does (its `early_drop`): removes a flow
/// never answered — a TCP handshake not completed, a UDP flow without a reply — the oldest
/// such of the last flows this CPU recorded. A flood of new flows then cannot keep others
/// out, and no answered flow is ever dropped for a new one: when none of these can go, the
/// new flow is refused. The flow's entries are left out of the account's deletions, so
/// that the agent counts them as dropped to make room. A client key that other flows need
/// (`CT_FLAG_SHARED`) is not a candidate. The candidates are tried in a `bpf_loop`,
/// whose callback the verifier checks once rather than at every insert.
#[inline(always)]
pub fn early_drop<A: Family>() -> bool {
    let mut dropped = false;
    // SAFETY: `try_drop::<A>` takes the `bool` it is given, which outlives the loop. A
    // function item cast to a pointer directly, never through an integer, so that it stays
    // the callback relocation the verifier needs.
    unsafe {
        bpf_loop(
            RECENT_FLOWS as u32,
            try_drop::<A> as *mut c_void,
            (&raw mut dropped).cast(),
            0,
        )
    };
    dropped
}

/// Try the `index`th oldest of the recent flows (`early_drop`'s callback); 1 ends the
/// search, with `dropped` set.
extern "C" fn try_drop<A: Family>(index: u64, dropped: *mut c_void) -> i64 {
    let Some(recent) = A::recent_flows() else {
        return 1;
    };
    let slot = recent.next.wrapping_add(index as u32) as usize % RECENT_FLOWS;
    let Some(key) = recent.keys.get(slot) else {
        return 1;
    };
    let Some(forward) = A::ct_get_ptr_mut(key) else {
        return 0;
    };
    // SAFETY: map values stay valid during the program's run; only read here.
    let forward = unsafe { &*forward };
    // A client key other flows need stays (it would only become an anchor).
    if forward.direction != CT_FORWARD || forward.flags & CT_FLAG_SHARED != 0 {
        return 0;
    }
    let established = key.proto == IPPROTO_TCP && forward.state == CT_STATE_ESTABLISHED;
    // A flow with one entry keeps both directions' states in it.
    if !key.write_peer(forward, &mut recent.reply_key) {
        if established || forward.reply_state != CT_STATE_NEW {
            return 0;
        }
        // SAFETY: `early_drop`'s `bool`.
        unsafe { *dropped.cast::<bool>() = A::ct_remove(key) };
        return 1;
    }
    let reply_key = &recent.reply_key;
    let Some(reply) = A::ct_get_ptr_mut(reply_key) else {
        return 0;
    };
    // SAFETY: as above.
    let reply = unsafe { &*reply };
    // A reply seen (UDP), or the handshake completed (TCP: a SYN-ACK leaves the reply entry
    // `NEW`, the client's ACK makes the forward entry established).
    let answered = reply.state != CT_STATE_NEW || established;
    // The reply tuple may hold a newer flow already, which is not this one's.
    if answered || !reply_key.write_peer(reply, &mut recent.back_key) || recent.back_key != *key {
        return 0;
    }
    A::ct_remove(reply_key);
    // SAFETY: `early_drop`'s `bool`.
    unsafe { *dropped.cast::<bool>() = A::ct_remove(key) };
    1
}
