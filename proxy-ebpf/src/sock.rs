//! Socket-level load balancing: cgroup sock_addr hooks rewrite the destination of a
//! connect()/sendmsg() to a ClusterIP before any packet exists, and restore the ClusterIP in
//! what recvmsg()/getpeername() report, so applications never see the rewrite.
//!
//! IPv6 sockets run the `*6` hooks: with an IPv6 service address they use the IPv6 maps;
//! with an IPv4-mapped one (`::ffff:10.96.0.10`: dual-stack applications, Java's default for
//! one, use them for every IPv4 destination) the IPv4 maps. An IPv6 socket's unconnected
//! sends to a mapped address are handed by the kernel to the IPv4 path, which runs `sendmsg4`.
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
    AFFINITY_CLIENT_NETNS, Counters, DropFlow, DropReason, HOOK_CONNECT, HOOK_SENDMSG, IPPROTO_TCP,
    IPPROTO_UDP, SVC_FLAG_DROP_IF_EMPTY, ServiceKeyOf, ServiceValue, SockRevValueOf,
};

use crate::{
    family::Family,
    lb::{self, Chosen, Dropped, Sticky},
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn proxy_connect4(ctx: SockAddrContext) -> i32 {
    connect::<Plain4>(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn proxy_sendmsg4(ctx: SockAddrContext) -> i32 {
    sendmsg::<Plain4>(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn proxy_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_service_addr::<Plain4>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn proxy_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_service_addr::<Plain4>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn proxy_connect6(ctx: SockAddrContext) -> i32 {
    match v4_mapped(&ctx) {
        true => connect::<Mapped4>(&ctx),
        false => connect::<Plain6>(&ctx),
    }
}

/// Only IPv6 destinations get here: the kernel hands an IPv6 socket's datagram to an
/// IPv4-mapped address to the IPv4 path, which runs `sendmsg4`.
#[cgroup_sock_addr(sendmsg6)]
pub fn proxy_sendmsg6(ctx: SockAddrContext) -> i32 {
    match v4_mapped(&ctx) {
        true => ALLOW,
        false => sendmsg::<Plain6>(&ctx),
    }
}

#[cgroup_sock_addr(recvmsg6)]
pub fn proxy_recvmsg6(ctx: SockAddrContext) -> i32 {
    match v4_mapped(&ctx) {
        true => restore_service_addr::<Mapped4>(&ctx),
        false => restore_service_addr::<Plain6>(&ctx),
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn proxy_getpeername6(ctx: SockAddrContext) -> i32 {
    match v4_mapped(&ctx) {
        true => restore_service_addr::<Mapped4>(&ctx),
        false => restore_service_addr::<Plain6>(&ctx),
    }
    ALLOW
}

#[inline(always)]
fn sock_addr(ctx: &SockAddrContext) -> *mut bpf_sock_addr {
    ctx.sock_addr
}

/// `::ffff:0:0/96`'s first three words, as `user_ip6` holds them (network byte order).
const V4_MAPPED_PREFIX: [u32; 3] = [0, 0, u32::from_be(0xffff)];

/// Whether a `*6` hook's address is IPv4-mapped.
#[inline(always)]
fn v4_mapped(ctx: &SockAddrContext) -> bool {
    // SAFETY: the kernel passes a valid context for the program's run. Word by word: the
    // verifier allows only 4-byte reads of `user_ip6`.
    let ip6 = unsafe { &(*sock_addr(ctx)).user_ip6 };
    [ip6[0], ip6[1], ip6[2]] == V4_MAPPED_PREFIX
}

/// How a hook's socket holds the address it targets (connect, sendmsg) or reports
/// (recvmsg, getpeername), of family `A`.
trait View {
    type A: Family;
    fn addr(sa: &bpf_sock_addr) -> Self::A;
    fn set_addr(sa: &mut bpf_sock_addr, addr: Self::A);
}

/// An IPv4 socket.
struct Plain4;
/// An IPv6 socket addressing an IPv4 service (`::ffff:a.b.c.d`): the prefix stays.
struct Mapped4;
/// An IPv6 socket addressing an IPv6 service.
struct Plain6;

impl View for Plain4 {
    type A = [u8; 4];
    fn addr(sa: &bpf_sock_addr) -> [u8; 4] {
        sa.user_ip4.to_ne_bytes()
    }
    fn set_addr(sa: &mut bpf_sock_addr, addr: [u8; 4]) {
        sa.user_ip4 = u32::from_ne_bytes(addr);
    }
}

impl View for Mapped4 {
    type A = [u8; 4];
    fn addr(sa: &bpf_sock_addr) -> [u8; 4] {
        sa.user_ip6[3].to_ne_bytes()
    }
    fn set_addr(sa: &mut bpf_sock_addr, addr: [u8; 4]) {
        sa.user_ip6[3] = u32::from_ne_bytes(addr);
    }
}

impl View for Plain6 {
    type A = [u8; 16];
    fn addr(sa: &bpf_sock_addr) -> [u8; 16] {
        let mut out = [0; 16];
        // Word by word, as the verifier wants.
        for i in 0..4 {
            let word = sa.user_ip6[i].to_ne_bytes();
            out[i * 4..i * 4 + 4].copy_from_slice(&word);
        }
        out
    }
    fn set_addr(sa: &mut bpf_sock_addr, addr: [u8; 16]) {
        for i in 0..4 {
            sa.user_ip6[i] = u32::from_ne_bytes([
                addr[i * 4],
                addr[i * 4 + 1],
                addr[i * 4 + 2],
                addr[i * 4 + 3],
            ]);
        }
    }
}

/// The address and port the call targets or reports.
#[inline(always)]
fn user_addr<V: View>(ctx: &SockAddrContext) -> (V::A, u16) {
    // SAFETY: valid context.
    let sa = unsafe { &*sock_addr(ctx) };
    (V::addr(sa), u16::from_be(sa.user_port as u16))
}

#[inline(always)]
fn set_user_addr<V: View>(ctx: &SockAddrContext, addr: V::A, port: u16) {
    // SAFETY: valid context; these fields are writable for the sock_addr hooks we attach.
    let sa = unsafe { &mut *sock_addr(ctx) };
    V::set_addr(sa, addr);
    sa.user_port = port.to_be() as u32;
}

/// The service port the socket addresses, if it is TCP or UDP.
#[inline(always)]
fn service_key<V: View>(ctx: &SockAddrContext) -> Option<ServiceKeyOf<V::A>> {
    // SAFETY: valid context.
    let proto = unsafe { (*sock_addr(ctx)).protocol } as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let (addr, port) = user_addr::<V>(ctx);
    Some(ServiceKeyOf::new(addr, port, proto))
}

/// Points the socket at the backend and remembers the service address for the reverse way.
#[inline(always)]
fn redirect<V: View>(
    ctx: &SockAddrContext,
    key: &ServiceKeyOf<V::A>,
    service_id: u32,
    chosen: &Chosen<V::A>,
) {
    set_user_addr::<V>(ctx, chosen.backend.addr, chosen.backend.port);
    // SAFETY: valid context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let rev_key = V::A::sock_rev_key(cookie, chosen.backend.addr, chosen.backend.port);
    let rev = SockRevValueOf {
        addr: key.addr,
        port: key.port,
        pad: 0,
        service_id,
    };
    // An LRU insert only fails on memory pressure; the app would then see the backend address.
    let _ = V::A::sock_rev_nat().insert(rev_key, rev, 0);
}

/// kube-proxy REJECTs connections to a service without endpoints: fail at once with
/// ECONNREFUSED instead of letting the client time out.
#[inline(always)]
fn refuse<A: Family>(key: &ServiceKeyOf<A>, service_id: u32, hook: u8) -> i32 {
    lb::count_drop(Dropped {
        reason: DropReason::NoEndpoints,
        service_id,
        flow: DropFlow {
            dst: key.addr.to_drop_flow(),
            dport: key.port,
            proto: key.proto,
            ..DropFlow::default()
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
fn refuse_or_leave<A: Family>(key: &ServiceKeyOf<A>, svc: &ServiceValue, hook: u8) -> i32 {
    if svc.flags & SVC_FLAG_DROP_IF_EMPTY != 0 {
        ALLOW
    } else {
        refuse(key, svc.id, hook)
    }
}

#[inline(always)]
fn netns_affinity(ctx: &SockAddrContext, svc: &ServiceValue) -> Option<Sticky> {
    // SAFETY: valid context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    Sticky::client_affinity(svc, netns, AFFINITY_CLIENT_NETNS)
}

#[inline(always)]
fn connect<V: View>(ctx: &SockAddrContext) -> i32 {
    let Some(key) = service_key::<V>(ctx) else {
        return ALLOW;
    };
    let Some(svc) = lb::service_in_cluster(&key) else {
        return ALLOW;
    };
    let now = lb::now_ns();
    let affinity = netns_affinity(ctx, &svc);
    let Some(chosen) = lb::select_backend::<V::A>(&svc, affinity.as_ref(), now) else {
        return refuse_or_leave(&key, &svc, HOOK_CONNECT);
    };
    redirect::<V>(ctx, &key, svc.id, &chosen);
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
fn sendmsg<V: View>(ctx: &SockAddrContext) -> i32 {
    let Some(key) = service_key::<V>(ctx) else {
        return ALLOW;
    };
    let Some(svc) = lb::service_in_cluster(&key) else {
        return ALLOW;
    };
    let now = lb::now_ns();
    // SAFETY: valid context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let socket = Sticky::socket(&svc, cookie);
    let (chosen, new_flow) = match socket.backend::<V::A>(now) {
        Some(chosen) => (chosen, 0),
        None => {
            let affinity = netns_affinity(ctx, &svc);
            let Some(chosen) = lb::select_backend::<V::A>(&svc, affinity.as_ref(), now) else {
                return refuse_or_leave(&key, &svc, HOOK_SENDMSG);
            };
            socket.remember(&chosen, now);
            (chosen, 1)
        }
    };
    redirect::<V>(ctx, &key, svc.id, &chosen);
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
fn restore_service_addr<V: View>(ctx: &SockAddrContext) {
    let (addr, port) = user_addr::<V>(ctx);
    // SAFETY: valid context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = V::A::sock_rev_key(cookie, addr, port);
    // SAFETY: copied out at once.
    if let Some(rev) = unsafe { V::A::sock_rev_nat().get(key).copied() } {
        set_user_addr::<V>(ctx, rev.addr, rev.port);
    }
}
