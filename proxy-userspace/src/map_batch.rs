//! Reading a whole map thousands of entries per system call (`BPF_MAP_LOOKUP_BATCH`, which
//! aya 0.14 does not wrap) instead of two calls per entry (next key, lookup): a `/metrics`
//! scrape at 100,000 services made about two million calls. Every kernel the socket hooks
//! run on (getpeername hooks: 5.8) has batch lookups for hash, LRU hash and array maps.
use std::{
    io,
    mem::{MaybeUninit, size_of},
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{
    Pod,
    maps::{IterableMap, MapData},
};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Entries asked for per call.
const CHUNK: usize = 4096;

/// The `batch` member of the kernel's `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Where the next call starts: an opaque position the kernel hands back (a bucket for hash
/// maps, an index for arrays), at most a key's size.
#[repr(C, align(8))]
struct Position([u8; 64]);

/// One `BPF_MAP_LOOKUP_BATCH` call: fills the buffers from `from` on, returns how many
/// entries it filled and whether the map has more.
fn lookup_batch<K: Pod, V: Pod>(
    map: &MapData,
    from: Option<&Position>,
    next: &mut Position,
    keys: &mut [MaybeUninit<K>],
    values: &mut [MaybeUninit<V>],
) -> io::Result<(usize, bool)> {
    let mut attr = BatchAttr {
        in_batch: from.map_or(0, |p| p.0.as_ptr() as u64),
        out_batch: next.0.as_mut_ptr() as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: keys.len().min(values.len()) as u32,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: `attr` describes buffers of `count` keys and values and a position buffer
    // larger than any key, all alive for the call; the kernel writes only within them.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_BATCH,
            &mut attr as *mut BatchAttr,
            size_of::<BatchAttr>(),
        )
    };
    let filled = attr.count as usize;
    match ret {
        0 => Ok((filled, true)),
        // The end of the map, with the last entries.
        _ if io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT) => Ok((filled, false)),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Calls `each` with the entries of `map`, a chunk at a time.
pub fn for_each_chunk<K: Pod, V: Pod, M: IterableMap<K, V>>(
    map: &M,
    mut each: impl FnMut(&[K], &[V]),
) -> anyhow::Result<()> {
    anyhow::ensure!(
        size_of::<K>() <= size_of::<Position>(),
        "keys of {} bytes are larger than a batch position",
        size_of::<K>()
    );
    let mut chunk = CHUNK;
    let mut keys: Vec<MaybeUninit<K>> = Vec::new();
    let mut values: Vec<MaybeUninit<V>> = Vec::new();
    let (mut position, mut next) = (None, Position([0; 64]));
    loop {
        keys.resize_with(chunk, MaybeUninit::uninit);
        values.resize_with(chunk, MaybeUninit::uninit);
        match lookup_batch(
            map.map(),
            position.as_ref(),
            &mut next,
            &mut keys,
            &mut values,
        ) {
            Ok((filled, more)) => {
                // SAFETY: the kernel initialised the first `filled` keys and values, and
                // `K`, `V` are plain data (`Pod`).
                let (k, v) = unsafe {
                    (
                        std::slice::from_raw_parts(keys.as_ptr().cast::<K>(), filled),
                        std::slice::from_raw_parts(values.as_ptr().cast::<V>(), filled),
                    )
                };
                each(k, v);
                if !more {
                    return Ok(());
                }
                position = Some(Position(next.0));
            }
            // A hash bucket holds more entries than the buffers.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && chunk < (1 << 20) => chunk *= 2,
            Err(e) => return Err(anyhow::Error::new(e).context("BPF_MAP_LOOKUP_BATCH")),
        }
    }
}

/// Every entry of `map`.
pub fn read_all<K: Pod, V: Pod, M: IterableMap<K, V>>(map: &M) -> anyhow::Result<Vec<(K, V)>> {
    let mut all = Vec::new();
    for_each_chunk(map, |k, v| {
        all.extend(k.iter().copied().zip(v.iter().copied()))
    })?;
    Ok(all)
}

/// How many entries `map` holds.
pub fn count<K: Pod, V: Pod, M: IterableMap<K, V>>(map: &M) -> anyhow::Result<u64> {
    let mut n = 0;
    for_each_chunk(map, |k, _| n += k.len() as u64)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use aya::maps::{Array, HashMap};
    use proxy_common::{ServiceKey, ServiceValue};

    use super::*;

    /// Real kernel maps (the tests run as root): more entries than one call returns.
    #[test]
    fn every_entry_is_read_once_across_calls() {
        let n = 3 * CHUNK as u32 + 17;
        let mut services = HashMap::<MapData, ServiceKey, ServiceValue>::create(n + 8, 0).unwrap();
        let key = |i: u32| ServiceKey {
            addr: i.to_be_bytes(),
            port: 80,
            proto: 6,
            scope: 0,
        };
        for i in 0..n {
            let value = ServiceValue {
                id: i + 1,
                ..ServiceValue::default()
            };
            services.insert(key(i), value, 0).unwrap();
        }
        let mut read = read_all(&services).unwrap();
        read.sort_by_key(|(_, v)| v.id);
        assert_eq!(read.len(), n as usize);
        assert!(
            read.iter()
                .enumerate()
                .all(|(i, (k, v))| *k == key(i as u32) && v.id == i as u32 + 1)
        );
        assert_eq!(count(&services).unwrap(), u64::from(n));

        let empty = HashMap::<MapData, u32, u32>::create(16, 0).unwrap();
        assert_eq!(count(&empty).unwrap(), 0);

        let mut array = Array::<MapData, u64>::create(CHUNK as u32 + 5, 0).unwrap();
        array.set(CHUNK as u32 + 4, 42, 0).unwrap();
        let all = read_all(&array).unwrap();
        assert_eq!(all.len(), CHUNK + 5, "an array holds all its indexes");
        assert_eq!(all.last(), Some(&(CHUNK as u32 + 4, 42)));
    }
}
