//! Socket-level load balancing: cgroup sock_addr hooks rewrite the destination of a
//! connect()/sendmsg() to a ClusterIP before any packet exists, and restore the ClusterIP in
//! what recvmsg()/getpeername() report, so applications never see the rewrite.
//!
//! IPv6 sockets reach IPv4 services through IPv4-mapped addresses (`::ffff:10.96.0.10`):
//! dual-stack applications (Java's default, for one) use them for every IPv4 destination.
//! Their connect(), recvmsg() and getpeername() run the `*6` hooks with the mapped address;
//! their unconnected sends are handed by the kernel to the IPv4 path, which runs `sendmsg4`.
use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use proxy_common::{
    AFFINITY_CLIENT_NETNS, Counters, CtKey, DropReason, HOOK_CONNECT, HOOK_SENDMSG, IPPROTO_TCP,
    IPPROTO_UDP, SVC_FLAG_DROP_IF_EMPTY, ServiceKey, ServiceValue, SockRevKey, SockRevValue,
};

use crate::{
    lb::{self, Chosen, Dropped, Sticky},
    maps::SOCK_REV_NAT,
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn proxy_connect4(ctx: SockAddrContext) -> i32 {
    connect(&ctx, Family::V4)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn proxy_sendmsg4(ctx: SockAddrContext) -> i32 {
    sendmsg(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn proxy_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_service_addr(&ctx, Family::V4);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn proxy_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_service_addr(&ctx, Family::V4);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn proxy_connect6(ctx: SockAddrContext) -> i32 {
    connect(&ctx, Family::V4Mapped)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn proxy_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_service_addr(&ctx, Family::V4Mapped);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn proxy_getpeername6(ctx: SockAddrContext) -> i32 {
    restore_service_addr(&ctx, Family::V4Mapped);
    ALLOW
}

/// How a hook's socket holds an IPv4 address: as such (`*4` hooks), or IPv4-mapped in an
/// IPv6 address (`*6` hooks), where any other IPv6 address is not ours.
#[derive(Clone, Copy)]
enum Family {
    V4,
    V4Mapped,
}

/// `::ffff:0:0/96`'s first three words, as `user_ip6` holds them (network byte order).
const V4_MAPPED_PREFIX: [u32; 3] = [0, 0, u32::from_be(0xffff)];

/// The IPv4 address and port the call targets (connect, sendmsg) or reports (recvmsg,
/// getpeername); `None` for an IPv6 address that maps no IPv4 one.
#[inline(always)]
fn user_addr(ctx: &SockAddrContext, family: Family) -> Option<([u8; 4], u16)> {
    // SAFETY: the kernel passes a valid context for the program's run.
    let sa: &bpf_sock_addr = unsafe { &*ctx.sock_addr };
    let addr = match family {
        Family::V4 => sa.user_ip4,
        Family::V4Mapped => {
            // Word by word: the verifier allows only 4-byte reads of `user_ip6`.
            let prefix = [sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2]];
            if prefix != V4_MAPPED_PREFIX {
                return None;
            }
            sa.user_ip6[3]
        }
    };
    Some((addr.to_ne_bytes(), u16::from_be(sa.user_port as u16)))
}

#[inline(always)]
fn set_user_addr(ctx: &SockAddrContext, family: Family, addr: [u8; 4], port: u16) {
    // SAFETY: as above; these fields are writable for the sock_addr hooks we attach. The
    // mapped prefix is already there.
    unsafe {
        match family {
            Family::V4 => (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes(addr),
            Family::V4Mapped => (*ctx.sock_addr).user_ip6[3] = u32::from_ne_bytes(addr),
        }
        (*ctx.sock_addr).user_port = port.to_be() as u32;
    }
}

/// The service port the socket addresses, if it is TCP or UDP.
#[inline(always)]
fn service_key(ctx: &SockAddrContext, family: Family) -> Option<ServiceKey> {
    // SAFETY: as above.
    let proto = unsafe { (*ctx.sock_addr).protocol } as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let (addr, port) = user_addr(ctx, family)?;
    Some(ServiceKey::new(addr, port, proto))
}

/// Points the socket at the backend and remembers the service address for the reverse way.
#[inline(always)]
fn redirect(
    ctx: &SockAddrContext,
    family: Family,
    key: &ServiceKey,
    service_id: u32,
    chosen: &Chosen,
) {
    set_user_addr(ctx, family, chosen.backend.addr, chosen.backend.port);
    // SAFETY: valid context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let rev_key = SockRevKey {
        cookie,
        addr: chosen.backend.addr,
        port: chosen.backend.port,
        pad: 0,
    };
    let rev = SockRevValue {
        addr: key.addr,
        port: key.port,
        pad: 0,
        service_id,
    };
    // An LRU insert only fails on memory pressure; the app would then see the backend address.
    let _ = SOCK_REV_NAT.insert(rev_key, rev, 0);
}

/// kube-proxy REJECTs connections to a service without endpoints: fail at once with
/// ECONNREFUSED instead of letting the client time out.
#[inline(always)]
fn refuse(key: &ServiceKey, service_id: u32, hook: u8) -> i32 {
    lb::count_drop(Dropped {
        reason: DropReason::NoEndpoints,
        service_id,
        flow: CtKey {
            dst: key.addr,
            dport: key.port,
            proto: key.proto,
            ..CtKey::default()
        },
        hook,
        // The thread group id (the process) is the upper half.
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
    });
    // SAFETY: no preconditions; sets the errno the syscall returns.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    DENY
}

/// No backend for a new connection: refused at once (kube-proxy's REJECT), unless the
/// service drops instead (a `Local` traffic policy with endpoints on other nodes only,
/// kube-proxy's DROP: the client times out). Then the socket is left addressed to the
/// service, and its packets are dropped by the tc programs where they leave the pod or the
/// node, as on the tc path.
#[inline(always)]
fn refuse_or_leave(key: &ServiceKey, svc: &ServiceValue, hook: u8) -> i32 {
    if svc.flags & SVC_FLAG_DROP_IF_EMPTY != 0 {
        ALLOW
    } else {
        refuse(key, svc.id, hook)
    }
}

#[inline(always)]
fn netns_affinity(ctx: &SockAddrContext, svc: &proxy_common::ServiceValue) -> Option<Sticky> {
    // SAFETY: valid context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    Sticky::client_affinity(svc, netns, AFFINITY_CLIENT_NETNS)
}

#[inline(always)]
fn connect(ctx: &SockAddrContext, family: Family) -> i32 {
    let Some(key) = service_key(ctx, family) else {
        return ALLOW;
    };
    let Some(svc) = lb::service_in_cluster(&key) else {
        return ALLOW;
    };
    let now = lb::now_ns();
    let affinity = netns_affinity(ctx, &svc);
    let Some(chosen) = lb::select_backend(&svc, affinity.as_ref(), now) else {
        return refuse_or_leave(&key, &svc, HOOK_CONNECT);
    };
    redirect(ctx, family, &key, svc.id, &chosen);
    lb::count(
        svc.id,
        chosen.backend_id,
        Counters {
            conns: 1,
            packets: 0,
            bytes: 0,
        },
    );
    ALLOW
}

/// Unconnected UDP: each datagram carries its destination, so each is translated; the
/// socket's first datagram picks the backend, later ones stick to it.
#[inline(always)]
fn sendmsg(ctx: &SockAddrContext) -> i32 {
    let Some(key) = service_key(ctx, Family::V4) else {
        return ALLOW;
    };
    let Some(svc) = lb::service_in_cluster(&key) else {
        return ALLOW;
    };
    let now = lb::now_ns();
    // SAFETY: valid context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let socket = Sticky::socket(&svc, cookie);
    let (chosen, new_flow) = match socket.backend(now) {
        Some(chosen) => (chosen, 0),
        None => {
            let affinity = netns_affinity(ctx, &svc);
            let Some(chosen) = lb::select_backend(&svc, affinity.as_ref(), now) else {
                return refuse_or_leave(&key, &svc, HOOK_SENDMSG);
            };
            socket.remember(&chosen, now);
            (chosen, 1)
        }
    };
    redirect(ctx, Family::V4, &key, svc.id, &chosen);
    lb::count(
        svc.id,
        chosen.backend_id,
        Counters {
            conns: new_flow,
            packets: 1,
            bytes: 0,
        },
    );
    ALLOW
}

#[inline(always)]
fn restore_service_addr(ctx: &SockAddrContext, family: Family) {
    let Some((addr, port)) = user_addr(ctx, family) else {
        return;
    };
    // SAFETY: valid context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevKey {
        cookie,
        addr,
        port,
        pad: 0,
    };
    // SAFETY: copied out at once.
    if let Some(rev) = unsafe { SOCK_REV_NAT.get(key).copied() } {
        set_user_addr(ctx, family, rev.addr, rev.port);
    }
}
