//! Destroying sockets where `bpf_sock_destroy` is missing (Linux < 6.5): the kernel's
//! sock_diag netlink interface lists a namespace's established sockets with their cookies,
//! and destroys one named by its identity (`SOCK_DESTROY`, which needs
//! CONFIG_INET_DIAG_DESTROY, and `udp_diag` for UDP). A dump per namespace and protocol
//! instead of an iterator, the same sockets destroyed.
use std::{
    collections::HashSet,
    fs::File,
    io::{Error, ErrorKind},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::atomic::{AtomicU64, Ordering},
};

use crate::sock_destroy::{Destroyer, Protocol, Target};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const TCP_ESTABLISHED: u32 = 1;
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_sockid`: ports, source and destination (16 bytes each), interface,
/// cookie.
const SOCKID: usize = 48;
/// `inet_diag_req_v2`: family, protocol, extensions, padding, states, then the socket id.
const REQ_V2: usize = 8 + SOCKID;
/// Where the socket id starts in `inet_diag_msg` (after family, state, timer, retransmits).
const MSG_ID_AT: usize = 4;

/// The families dumped: IPv6 sockets reach IPv6 services, and IPv4 ones through
/// IPv4-mapped addresses.
const FAMILIES: [u8; 2] = [libc::AF_INET as u8, libc::AF_INET6 as u8];
/// Where the destination address starts in a socket id.
const DST_AT: usize = 20;
/// `::ffff:0:0/96`.
const V4_MAPPED: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// A socket's identity as sock_diag reports it (`struct inet_diag_sockid`, as is).
#[derive(Clone, Copy)]
struct SockId([u8; SOCKID]);

impl SockId {
    /// Its cookie and destination, as targets name sockets (IPv4 ones IPv4-mapped, as an
    /// IPv6 socket connected to an IPv4 address holds it).
    fn target(&self, family: u8) -> Option<Target> {
        let b = &self.0;
        let mut addr = [0u8; 16];
        if family == libc::AF_INET6 as u8 {
            addr.copy_from_slice(&b[DST_AT..DST_AT + 16]);
        } else {
            addr[..12].copy_from_slice(&V4_MAPPED);
            addr[12..].copy_from_slice(&b[DST_AT..DST_AT + 4]);
        }
        let cookie_lo = u32::from_ne_bytes(b[40..44].try_into().ok()?);
        let cookie_hi = u32::from_ne_bytes(b[44..48].try_into().ok()?);
        Some(Target {
            cookie: u64::from(cookie_hi) << 32 | u64::from(cookie_lo),
            addr,
            port_be: u16::from_ne_bytes([b[2], b[3]]),
            pad: 0,
            pad2: 0,
        })
    }
}

fn ipproto(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Udp => libc::IPPROTO_UDP as u8,
        Protocol::Tcp => libc::IPPROTO_TCP as u8,
    }
}

/// A netlink message: header, then `inet_diag_req_v2` for `family` and `protocol` naming
/// `id`.
fn request(kind: u16, flags: u16, family: u8, protocol: Protocol, id: &SockId) -> Vec<u8> {
    let len = NLMSG_HDR + REQ_V2;
    let mut msg = Vec::with_capacity(len);
    msg.extend((len as u32).to_ne_bytes());
    msg.extend(kind.to_ne_bytes());
    msg.extend((flags | NLM_F_REQUEST).to_ne_bytes());
    msg.extend([0; 8]); // sequence, port id: one request at a time, the kernel's
    msg.extend([family, ipproto(protocol), 0, 0]);
    msg.extend((1u32 << TCP_ESTABLISHED).to_ne_bytes());
    msg.extend(id.0);
    msg
}

/// A sock_diag socket in the calling thread's network namespace.
struct Diag(OwnedFd);

impl Diag {
    fn open() -> std::io::Result<Self> {
        // SAFETY: a plain socket call; the descriptor is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(Error::last_os_error());
        }
        // SAFETY: just created, owned by nobody else.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn send(&self, msg: &[u8]) -> std::io::Result<()> {
        // SAFETY: a valid buffer of that length.
        let sent = unsafe { libc::send(self.0.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(Error::last_os_error());
        }
        Ok(())
    }

    /// Reads messages until `on_message` says it has seen the last, giving it each
    /// message's type and payload.
    fn receive(
        &self,
        mut on_message: impl FnMut(u16, &[u8]) -> std::io::Result<bool>,
    ) -> std::io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: a valid buffer of that length.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(Error::last_os_error());
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= NLMSG_HDR {
                let len = u32::from_ne_bytes(rest[..4].try_into().unwrap_or_default()) as usize;
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                if len < NLMSG_HDR || len > rest.len() {
                    return Err(Error::new(
                        ErrorKind::InvalidData,
                        "a truncated netlink message",
                    ));
                }
                if on_message(kind, &rest[NLMSG_HDR..len])? {
                    return Ok(());
                }
                rest = &rest[(len + 3) & !3..];
            }
        }
    }

    /// The established sockets of `family` and `protocol` in this namespace.
    fn established(&self, family: u8, protocol: Protocol) -> std::io::Result<Vec<SockId>> {
        self.send(&request(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_DUMP,
            family,
            protocol,
            &SockId([0; SOCKID]),
        ))?;
        let mut ids = Vec::new();
        self.receive(|kind, payload| match kind {
            NLMSG_DONE => Ok(true),
            NLMSG_ERROR => {
                Err(ack_error(payload).unwrap_or_else(|| Error::other("sock_diag dump failed")))
            }
            SOCK_DIAG_BY_FAMILY if payload.len() >= MSG_ID_AT + SOCKID => {
                let mut id = [0; SOCKID];
                id.copy_from_slice(&payload[MSG_ID_AT..MSG_ID_AT + SOCKID]);
                ids.push(SockId(id));
                Ok(false)
            }
            _ => Ok(false),
        })?;
        Ok(ids)
    }

    fn destroy(&self, family: u8, protocol: Protocol, id: &SockId) -> std::io::Result<()> {
        self.send(&request(SOCK_DESTROY, NLM_F_ACK, family, protocol, id))?;
        let mut result = Ok(());
        self.receive(|kind, payload| {
            if kind == NLMSG_ERROR {
                result = ack_error(payload).map_or(Ok(()), Err);
                return Ok(true);
            }
            Ok(false)
        })?;
        result
    }
}

/// The error an `NLMSG_ERROR` message carries; `None` for an acknowledgement.
fn ack_error(payload: &[u8]) -> Option<Error> {
    let code = i32::from_ne_bytes(payload.get(..4)?.try_into().ok()?);
    (code != 0).then(|| Error::from_raw_os_error(-code))
}

pub struct SockDiag {
    protocols: Vec<Protocol>,
}

impl SockDiag {
    pub fn new(protocols: &[Protocol]) -> Self {
        Self {
            protocols: protocols.to_vec(),
        }
    }
}

impl Destroyer for SockDiag {
    fn mode(&self) -> &'static str {
        "sock_diag"
    }

    fn destroy(
        &mut self,
        protocol: Protocol,
        targets: &[Target],
        namespaces: &[File],
    ) -> anyhow::Result<(u64, Vec<Error>)> {
        if !self.protocols.contains(&protocol) {
            return Ok((0, Vec::new()));
        }
        let wanted: HashSet<&Target> = targets.iter().collect();
        let count = AtomicU64::new(0);
        let errors = crate::pod_namespaces::in_each(namespaces, || {
            let diag = Diag::open()?;
            for family in FAMILIES {
                for id in diag.established(family, protocol)? {
                    if id.target(family).is_some_and(|t| wanted.contains(&t)) {
                        diag.destroy(family, protocol, &id)?;
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok(())
        });
        Ok((count.into_inner(), errors))
    }
}
