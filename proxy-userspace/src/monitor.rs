//! `proxyctl monitor`: what the datapath drops and refuses, as it happens, from the `events`
//! ring buffer (one event per dropped packet or refused connection, with its flow, service
//! and reason).
//!
//! A BPF ring buffer has one consumer position: two monitors on one node would each see
//! part of the events, so a monitor holds an exclusive lock while it reads.
use std::{
    collections::HashMap,
    fs::File,
    net::{Ipv6Addr, SocketAddr},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::{HashMap as BpfHashMap, MapData, RingBuf};
use proxy_common::{
    DropEvent, DropReason, HOOK_CONNECT, HOOK_SENDMSG, HOOK_TC, HOOK_XDP, ServiceInfo, maps,
};
use serde::Serialize;

use crate::{
    clock::{monotonic_ns, unix_now},
    inspect::protocol,
    maps::{decode_info, open},
};

/// One drop or refusal.
#[derive(Debug, Serialize)]
pub struct Event {
    /// Unix time, in seconds.
    pub time: f64,
    /// "reject" (the client is told at once: ECONNREFUSED, ICMP port unreachable) or
    /// "drop" (the client times out).
    pub action: &'static str,
    pub reason: &'static str,
    /// The service port (`namespace/name:port`) and which of its frontends, if known.
    pub service: Option<String>,
    pub frontend: Option<&'static str>,
    /// `ADDRESS:PORT`; the source of a refused connect()/sendmsg() is not known yet.
    pub source: Option<String>,
    pub destination: String,
    pub protocol: &'static str,
    /// Where the datapath saw it: tc, xdp, connect, sendmsg.
    pub hook: &'static str,
    /// The process refused by a socket hook.
    pub pid: Option<u32>,
}

fn hook_name(hook: u8) -> &'static str {
    match hook {
        HOOK_TC => "tc",
        HOOK_XDP => "xdp",
        HOOK_CONNECT => "connect",
        HOOK_SENDMSG => "sendmsg",
        _ => "?",
    }
}

/// An event's address (IPv4 ones IPv4-mapped) and port, as the family writes them.
fn endpoint(addr: [u8; 16], port: u16) -> String {
    let addr = Ipv6Addr::from(addr).to_canonical();
    match port {
        // A packet reported after translation, whose ports were not kept.
        0 => addr.to_string(),
        port => SocketAddr::new(addr, port).to_string(),
    }
}

pub struct Monitor {
    ring: RingBuf<MapData>,
    names: BpfHashMap<MapData, u32, ServiceInfo>,
    /// Events older than this were waiting in the ring from before (nobody was reading).
    started_ns: u64,
    /// CLOCK_MONOTONIC → Unix time.
    offset_secs: f64,
    _lock: Lock,
}

/// The monitor's lock file, removed when it ends.
struct Lock {
    _file: File,
    path: PathBuf,
}

impl Drop for Lock {
    fn drop(&mut self) {
        // A monitor started meanwhile was refused, not queued: nobody waits on this file.
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Monitor {
    /// Opens the pinned ring buffer under `dir`; fails if another monitor reads it.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let ring: RingBuf<MapData> = open(dir, maps::EVENTS)?;
        let lock = exclusive(&dir.join(maps::EVENTS))?;
        let started_ns = monotonic_ns();
        Ok(Self {
            ring,
            names: open(dir, maps::SERVICE_NAMES)?,
            started_ns,
            offset_secs: unix_now() - started_ns as f64 / 1e9,
            _lock: lock,
        })
    }

    /// The events that arrive within `timeout` (returns as soon as there are some).
    pub fn wait(&mut self, timeout: Duration) -> anyhow::Result<Vec<Event>> {
        let mut poll = libc::pollfd {
            fd: self.ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut poll, 1, timeout.as_millis() as i32) };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e).context("waiting for drop events");
            }
        }
        let mut raw = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() >= size_of::<DropEvent>() {
                // SAFETY: the datapath writes whole `DropEvent`s; read unaligned.
                raw.push(unsafe { item.as_ptr().cast::<DropEvent>().read_unaligned() });
            }
        }
        let mut names = HashMap::new();
        Ok(raw
            .into_iter()
            .filter(|e| e.time_ns >= self.started_ns)
            .map(|e| self.event(&e, &mut names))
            .collect())
    }

    fn event(&self, e: &DropEvent, names: &mut HashMap<u32, Option<ServiceInfo>>) -> Event {
        let reason = DropReason::ALL.into_iter().find(|r| *r as u32 == e.reason);
        let info = *names
            .entry(e.service_id)
            .or_insert_with(|| self.names.get(&e.service_id, 0).ok());
        let meta = info.as_ref().map(decode_info);
        let socket = matches!(e.hook, HOOK_CONNECT | HOOK_SENDMSG);
        Event {
            time: self.offset_secs + e.time_ns as f64 / 1e9,
            action: if reason == Some(DropReason::NoEndpoints) {
                "reject"
            } else {
                "drop"
            },
            reason: reason.map_or("?", DropReason::name),
            service: meta.as_ref().map(|m| m.name.clone()),
            frontend: meta.as_ref().map(|m| m.frontend.name()),
            source: (!socket).then(|| endpoint(e.flow.src, e.flow.sport)),
            destination: endpoint(e.flow.dst, e.flow.dport),
            protocol: protocol(e.flow.proto),
            hook: hook_name(e.hook),
            pid: socket.then_some(e.pid),
        }
    }
}

/// An exclusive `flock` standing for the ring buffer at `path`: on a lock file named after
/// its pin's inode (bpffs refuses open(2) on a ring buffer's pin), in the temporary directory
/// (so a monitor on the host and one in the agent's container do not see each other).
fn exclusive(path: &Path) -> anyhow::Result<Lock> {
    let pin = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let lock_path =
        std::env::temp_dir().join(format!("proxyctl-monitor-{}-{}.lock", pin.dev(), pin.ino()));
    let file = File::create(&lock_path)
        .with_context(|| format!("creating the lock file {}", lock_path.display()))?;
    // SAFETY: a valid fd.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        anyhow::bail!(
            "another proxyctl monitor is reading {} (a ring buffer has one reader: each would \
             see part of the events)",
            path.display()
        );
    }
    Ok(Lock {
        _file: file,
        path: lock_path,
    })
}
