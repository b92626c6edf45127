//! Why a map write failed, typed: a full map and a missing capability need different fixes,
//! and are counted apart (`proxy_rejected_objects_total{reason="map_full"}`, ...).
use std::fmt;

use crate::rejection::Reason;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapFailure {
    /// No room: the map, or the ids that index its companions, are used up.
    Full,
    /// The kernel refused the agent (no CAP_BPF, an LSM).
    Permission,
    Other,
}

#[derive(Debug)]
pub struct MapWriteError {
    pub map: &'static str,
    pub failure: MapFailure,
    pub detail: String,
}

impl MapWriteError {
    /// Classifies what aya reported for a write to `map`.
    pub fn from_aya(map: &'static str, error: aya::maps::MapError) -> Self {
        let errno = match &error {
            aya::maps::MapError::SyscallError(e) => e.io_error.raw_os_error(),
            _ => None,
        };
        let failure = match (&error, errno) {
            // A hash map at capacity answers E2BIG; an array index past its end is out of
            // bounds.
            (_, Some(libc::E2BIG)) | (aya::maps::MapError::OutOfBounds { .. }, _) => {
                MapFailure::Full
            }
            (_, Some(libc::EPERM | libc::EACCES)) => MapFailure::Permission,
            _ => MapFailure::Other,
        };
        Self {
            map,
            failure,
            detail: format!("{:#}", anyhow::Error::from(error)),
        }
    }

    /// The metric reason a failure of this kind is counted under.
    pub fn reason(&self) -> Reason {
        match self.failure {
            MapFailure::Full => Reason::MapFull,
            MapFailure::Permission => Reason::MapPermission,
            MapFailure::Other => Reason::MapUpdate,
        }
    }

    /// The reason of the first typed map error in `error`'s chain (`MapUpdate` if none).
    pub fn reason_of(error: &anyhow::Error) -> Reason {
        error
            .chain()
            .find_map(|e| e.downcast_ref::<MapWriteError>())
            .map_or(Reason::MapUpdate, MapWriteError::reason)
    }
}

impl fmt::Display for MapWriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let map = self.map;
        match self.failure {
            MapFailure::Full => write!(
                f,
                "map {map} is full (raise it with --map-size {map}=N): {}",
                self.detail
            ),
            MapFailure::Permission => write!(
                f,
                "writing map {map} was refused (the agent needs CAP_BPF and CAP_NET_ADMIN, or root): {}",
                self.detail
            ),
            MapFailure::Other => write!(f, "writing map {map}: {}", self.detail),
        }
    }
}

impl std::error::Error for MapWriteError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn syscall(errno: i32) -> aya::maps::MapError {
        aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_update_elem",
            io_error: std::io::Error::from_raw_os_error(errno),
        })
    }

    #[test]
    fn full_and_refused_writes_are_told_apart() {
        let full = MapWriteError::from_aya("services", syscall(libc::E2BIG));
        assert_eq!(full.reason(), Reason::MapFull);
        assert!(full.to_string().contains("--map-size services=N"), "{full}");
        let refused = MapWriteError::from_aya("services", syscall(libc::EPERM));
        assert_eq!(refused.reason(), Reason::MapPermission);
        assert!(refused.to_string().contains("CAP_BPF"), "{refused}");
        let other = MapWriteError::from_aya("services", syscall(libc::EINVAL));
        assert_eq!(other.reason(), Reason::MapUpdate);
        let wrapped = anyhow::Error::new(full).context("writing backend slot 3 of 3");
        assert_eq!(MapWriteError::reason_of(&wrapped), Reason::MapFull);
    }
}
