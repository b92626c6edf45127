//! Destroys connected sockets from inside the kernel: a socket iterator program (`iter/udp`,
//! `iter/tcp`) calls `bpf_sock_destroy` (Linux ≥ 6.5) on every established socket whose
//! (cookie, destination) is in its target map, and deletes the target it acted on, so the
//! targets left afterwards are the sockets it did not find. The application then gets
//! ECONNABORTED and connects again, through the socket hooks, to a backend still there.
//!
//! aya 0.14 can neither relocate a kfunc call nor load a program it did not build from an
//! ELF object, so the few instructions are assembled here and loaded with raw `bpf()`
//! calls. An iterator walks the sockets of the network namespace it is opened in: `run`
//! opens one in each namespace (`pod_namespaces::in_each`).
use std::{
    ffi::CString,
    fs::File,
    net::IpAddr,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
};

use anyhow::{Context as _, bail};
use aya::maps::{HashMap, Map, MapData};
use aya_obj::generated::{
    BPF_ADD, BPF_ALU64, BPF_B, BPF_CALL, BPF_DW, BPF_EXIT, BPF_F_NO_PREALLOC, BPF_H, BPF_IMM,
    BPF_JA, BPF_JEQ, BPF_JMP, BPF_JNE, BPF_K, BPF_LD, BPF_LDX, BPF_MEM, BPF_MOV,
    BPF_PSEUDO_KFUNC_CALL, BPF_PSEUDO_MAP_FD, BPF_ST, BPF_STX, BPF_W, BPF_X, bpf_attach_type,
    bpf_map_type, bpf_prog_type,
};

use crate::{
    bpf_syscall::{attr, bpf_cmd, bpf_fd},
    kernel_btf,
};

/// A socket to destroy: its cookie and the destination it must still be connected to (a
/// socket the hooks once pointed at the backend may have been connected elsewhere since).
/// The destination is an IPv6 address, IPv4 ones IPv4-mapped: an IPv6 socket connected to
/// an IPv4 service holds it so, and an IPv4 socket is made to look the same.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Target {
    pub cookie: u64,
    pub addr: [u8; 16],
    /// Network byte order, as the kernel keeps it in the socket.
    pub port_be: u16,
    pub pad: u16,
    pub pad2: u32,
}

// SAFETY: plain integers, no padding (32 bytes).
unsafe impl aya::Pod for Target {}

impl Target {
    pub fn new(cookie: u64, addr: IpAddr, port: u16) -> Self {
        let addr = match addr {
            IpAddr::V4(a) => a.to_ipv6_mapped(),
            IpAddr::V6(a) => a,
        };
        Self {
            cookie,
            addr: addr.octets(),
            port_be: port.to_be(),
            pad: 0,
            pad2: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Udp,
    Tcp,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Udp => "udp",
            Protocol::Tcp => "tcp",
        }
    }

    /// The kernel function the iterator attaches to (`DEFINE_BPF_ITER_FUNC`).
    fn iterator(self) -> &'static str {
        match self {
            Protocol::Udp => "bpf_iter_udp",
            Protocol::Tcp => "bpf_iter_tcp",
        }
    }
}

const VERIFIER_LOG: usize = 64 * 1024;

// Offsets the program reads. `bpf_iter__udp` and `bpf_iter__tcp` both hold the socket right
// after the `bpf_iter_meta` pointer; `struct sock_common` starts with skc_daddr, skc_dport
// is at 12, skc_family at 16 and skc_state at 18 (its layout has not moved since Linux
// 2.6). Where skc_v6_daddr lies depends on the kernel's configuration: read from its BTF.
const CTX_SOCKET: i16 = 8;
const SKC_DADDR: i16 = 0;
const SKC_DPORT: i16 = 12;
const SKC_FAMILY: i16 = 16;
const SKC_STATE: i16 = 18;
/// `TCP_ESTABLISHED`, also the state of a connected UDP socket.
const ESTABLISHED: i32 = 1;
const FN_MAP_LOOKUP_ELEM: i32 = 1;
const FN_MAP_DELETE_ELEM: i32 = 3;
const FN_GET_SOCKET_COOKIE: i32 = 46;
/// A jump's offset until the program's end is known: jumps go only there.
const TO_END: i16 = i16::MAX;
/// Where the program builds its `Target` key on the stack.
const KEY: i16 = -32;
/// `::ffff:0:0/96`'s third word as the key holds it.
const V4_MAPPED_WORD: i32 = i32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// One instruction (`struct bpf_insn`, little-endian: the register nibbles are dst, src).
fn insn(code: u32, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code as u8)
        | u64::from(dst | src << 4) << 8
        | u64::from(off as u16) << 16
        | u64::from(imm as u32) << 32
}

/// The program: for the socket in the context, if it is established and its (cookie,
/// destination) is a target in map `targets` (a file descriptor of this process), destroy
/// it (kfunc `destroy`, a BTF id of vmlinux) and delete the target. `v6_daddr` is the
/// offset of skc_v6_daddr in `struct sock_common`.
fn program(targets: i32, destroy: u32, v6_daddr: i16) -> Vec<u64> {
    const R0: u8 = 0;
    const R1: u8 = 1;
    const R2: u8 = 2;
    const R6: u8 = 6;
    const FP: u8 = 10;
    let call = |imm| insn(BPF_JMP | BPF_CALL, 0, 0, 0, imm);
    let load_map = [
        insn(
            BPF_LD | BPF_DW | BPF_IMM,
            R1,
            BPF_PSEUDO_MAP_FD as u8,
            0,
            targets,
        ),
        0,
    ];
    let key_in_r2 = [
        insn(BPF_ALU64 | BPF_MOV | BPF_X, R2, FP, 0, 0),
        insn(BPF_ALU64 | BPF_ADD | BPF_K, R2, 0, 0, KEY.into()),
    ];
    let mut prog = vec![
        insn(BPF_LDX | BPF_MEM | BPF_DW, R6, R1, CTX_SOCKET, 0),
        insn(BPF_JMP | BPF_JEQ | BPF_K, R6, 0, TO_END, 0),
        insn(BPF_LDX | BPF_MEM | BPF_B, R1, R6, SKC_STATE, 0),
        insn(BPF_JMP | BPF_JNE | BPF_K, R1, 0, TO_END, ESTABLISHED),
        insn(BPF_ALU64 | BPF_MOV | BPF_X, R1, R6, 0, 0),
        call(FN_GET_SOCKET_COOKIE),
        insn(BPF_STX | BPF_MEM | BPF_DW, FP, R0, KEY, 0),
    ];
    let word = |from: i16, to: i16| {
        [
            insn(BPF_LDX | BPF_MEM | BPF_W, R1, R6, from, 0),
            insn(BPF_STX | BPF_MEM | BPF_W, FP, R1, to, 0),
        ]
    };
    // An IPv6 socket's destination as it is; an IPv4 one's IPv4-mapped.
    let v6: Vec<u64> = (0..4)
        .flat_map(|i| word(v6_daddr + 4 * i, KEY + 8 + 4 * i))
        .collect();
    let mut v4 = vec![
        insn(BPF_ST | BPF_MEM | BPF_W, FP, 0, KEY + 8, 0),
        insn(BPF_ST | BPF_MEM | BPF_W, FP, 0, KEY + 12, 0),
        insn(BPF_ST | BPF_MEM | BPF_W, FP, 0, KEY + 16, V4_MAPPED_WORD),
    ];
    v4.extend(word(SKC_DADDR, KEY + 20));
    // Past the IPv6 block.
    v4.push(insn(BPF_JMP | BPF_JA, 0, 0, v6.len() as i16, 0));
    prog.extend([
        insn(BPF_LDX | BPF_MEM | BPF_H, R1, R6, SKC_FAMILY, 0),
        insn(
            BPF_JMP | BPF_JEQ | BPF_K,
            R1,
            0,
            v4.len() as i16,
            libc::AF_INET6,
        ),
    ]);
    prog.extend(v4);
    prog.extend(v6);
    prog.extend([
        insn(BPF_LDX | BPF_MEM | BPF_H, R1, R6, SKC_DPORT, 0),
        insn(BPF_STX | BPF_MEM | BPF_H, FP, R1, KEY + 24, 0),
        insn(BPF_ST | BPF_MEM | BPF_H, FP, 0, KEY + 26, 0),
        insn(BPF_ST | BPF_MEM | BPF_W, FP, 0, KEY + 28, 0),
    ]);
    prog.extend(load_map);
    prog.extend(key_in_r2);
    prog.extend([
        call(FN_MAP_LOOKUP_ELEM),
        insn(BPF_JMP | BPF_JEQ | BPF_K, R0, 0, TO_END, 0),
        insn(BPF_ALU64 | BPF_MOV | BPF_X, R1, R6, 0, 0),
        insn(
            BPF_JMP | BPF_CALL,
            0,
            BPF_PSEUDO_KFUNC_CALL as u8,
            0,
            destroy as i32,
        ),
        insn(BPF_JMP | BPF_JNE | BPF_K, R0, 0, TO_END, 0),
    ]);
    prog.extend(load_map);
    prog.extend(key_in_r2);
    prog.push(call(FN_MAP_DELETE_ELEM));
    // Every jump above goes to the end: patch their offsets now that it is known.
    let end = prog.len();
    for (pc, ins) in prog.iter_mut().enumerate() {
        if (*ins >> 16) as u16 == TO_END as u16 && *ins as u8 & 0x07 == BPF_JMP as u8 {
            let off = (end - pc - 1) as u16;
            *ins = *ins & !(0xffff << 16) | u64::from(off) << 16;
        }
    }
    prog.push(insn(BPF_ALU64 | BPF_MOV | BPF_K, R0, 0, 0, 0));
    prog.push(insn(BPF_JMP | BPF_EXIT, 0, 0, 0, 0));
    prog
}

/// An iterator program attached for one protocol.
struct Iterator {
    protocol: Protocol,
    link: OwnedFd,
}

/// A way of destroying the sockets targets name, in the network namespaces given.
pub trait Destroyer: Send {
    /// For the `proxy_stale_socket_destroyer{mode}` metric.
    fn mode(&self) -> &'static str;
    /// Destroys the sockets of `protocol` that `targets` name, looking for them in each of
    /// `namespaces` (network namespace files): how many, and the namespaces it could not
    /// search. None for a protocol it was not set up for.
    fn destroy(
        &mut self,
        protocol: Protocol,
        targets: &[Target],
        namespaces: &[File],
    ) -> anyhow::Result<(u64, Vec<std::io::Error>)>;
}

/// Destroys the sockets `targets` name with `destroyer`, protocol by protocol.
pub fn run(
    destroyer: &mut dyn Destroyer,
    targets: &[(Protocol, Target)],
    namespaces: &[File],
) -> anyhow::Result<Destroyed> {
    let mut destroyed = Destroyed::default();
    for protocol in [Protocol::Udp, Protocol::Tcp] {
        let mine: Vec<Target> = targets
            .iter()
            .filter(|(p, _)| *p == protocol)
            .map(|(_, t)| *t)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let (count, errors) = destroyer.destroy(protocol, &mine, namespaces)?;
        match protocol {
            Protocol::Udp => destroyed.udp += count,
            Protocol::Tcp => destroyed.tcp += count,
        }
        destroyed.errors.extend(errors);
    }
    Ok(destroyed)
}

/// The socket iterators (`bpf_sock_destroy`).
pub struct SockDestroy {
    targets: HashMap<MapData, Target, u8>,
    iterators: Vec<Iterator>,
}

/// What one run destroyed, by protocol, and the namespaces it could not search.
#[derive(Debug, Default)]
pub struct Destroyed {
    pub udp: u64,
    pub tcp: u64,
    pub errors: Vec<std::io::Error>,
}

impl SockDestroy {
    /// Loads the iterators for `protocols`, with room for `capacity` targets (one per
    /// entry `sock_rev_nat` can hold, where they come from). Fails on a kernel without
    /// `bpf_sock_destroy` (or without BTF), saying which.
    pub fn load(protocols: &[Protocol], capacity: u32) -> anyhow::Result<Self> {
        let btf = kernel_btf::vmlinux()?;
        let destroy = kernel_btf::func_id(&btf, "bpf_sock_destroy")
            .context("this kernel has no bpf_sock_destroy (Linux 6.5 or later has it)")?;
        let v6_daddr = sock_common_offset(&btf, "skc_v6_daddr")?;
        let map = MapData::create(
            aya_obj::Map::new_from_params(
                bpf_map_type::BPF_MAP_TYPE_HASH as u32,
                size_of::<Target>() as u32,
                1,
                capacity,
                BPF_F_NO_PREALLOC,
            ),
            "stale_sockets",
            None,
        )
        .context("creating the map of sockets to destroy")?;
        let map_fd = map.fd().as_fd().as_raw_fd();
        let mut iterators = Vec::new();
        for &protocol in protocols {
            let attach = kernel_btf::func_id(&btf, protocol.iterator())
                .with_context(|| format!("this kernel has no {} iterator", protocol.name()))?;
            let prog = load_program(protocol, &program(map_fd, destroy, v6_daddr), attach)?;
            let mut link_attr = attr();
            link_attr.link_create.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
            link_attr.link_create.attach_type = bpf_attach_type::BPF_TRACE_ITER as u32;
            let link = bpf_fd(bpf_cmd::BPF_LINK_CREATE, &mut link_attr)
                .with_context(|| format!("attaching the {} socket iterator", protocol.name()))?;
            iterators.push(Iterator { protocol, link });
        }
        Ok(Self {
            targets: HashMap::try_from(Map::HashMap(map))?,
            iterators,
        })
    }
}

impl Destroyer for SockDestroy {
    fn mode(&self) -> &'static str {
        "bpf_iterator"
    }

    fn destroy(
        &mut self,
        protocol: Protocol,
        targets: &[Target],
        namespaces: &[File],
    ) -> anyhow::Result<(u64, Vec<std::io::Error>)> {
        let Some(iterator) = self.iterators.iter().find(|i| i.protocol == protocol) else {
            return Ok((0, Vec::new()));
        };
        for target in targets {
            self.targets
                .insert(target, 1, 0)
                .context("writing a socket to destroy")?;
        }
        let errors = crate::pod_namespaces::in_each(namespaces, || walk(&iterator.link));
        // The program deletes each target it destroyed: the rest were not found.
        let left: Vec<Target> = self.targets.keys().filter_map(Result::ok).collect();
        for target in &left {
            let _ = self.targets.remove(target);
        }
        Ok(((targets.len() - left.len()) as u64, errors))
    }
}

fn load_program(protocol: Protocol, insns: &[u64], attach_btf_id: u32) -> anyhow::Result<OwnedFd> {
    let license = CString::from(c"GPL");
    let mut log = vec![0u8; VERIFIER_LOG];
    let mut load = attr();
    // SAFETY: writing plain fields of the union's program-load member.
    let prog = unsafe { &mut load.__bindgen_anon_3 };
    prog.prog_type = bpf_prog_type::BPF_PROG_TYPE_TRACING as u32;
    prog.expected_attach_type = bpf_attach_type::BPF_TRACE_ITER as u32;
    prog.attach_btf_id = attach_btf_id;
    prog.insns = insns.as_ptr() as u64;
    prog.insn_cnt = insns.len() as u32;
    prog.license = license.as_ptr() as u64;
    prog.log_level = 1;
    prog.log_buf = log.as_mut_ptr() as u64;
    prog.log_size = log.len() as u32;
    let name = format!("proxy_destroy_{}", protocol.name());
    for (dst, src) in prog.prog_name.iter_mut().zip(name.bytes().take(15)) {
        *dst = src as libc::c_char;
    }
    match bpf_fd(bpf_cmd::BPF_PROG_LOAD, &mut load) {
        Ok(fd) => Ok(fd),
        Err(e) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            bail!(
                "loading the {} socket-destroying iterator: {e}\n{}",
                protocol.name(),
                String::from_utf8_lossy(&log[..end]).trim()
            )
        }
    }
}

/// The byte offset of `member` in the kernel's `struct sock_common`, from its BTF.
fn sock_common_offset(btf: &btf_rs::Btf, member: &str) -> anyhow::Result<i16> {
    let place = kernel_btf::member_place(btf, "sock_common", member)?;
    i16::try_from(place.bit_offset / 8)
        .with_context(|| format!("sock_common.{member} at an unexpected offset"))
}

/// Runs the iterator `link` once in the current network namespace.
fn walk(link: &OwnedFd) -> std::io::Result<()> {
    let mut create = attr();
    create.iter_create.link_fd = link.as_raw_fd() as u32;
    let iter = std::fs::File::from(bpf_fd(bpf_cmd::BPF_ITER_CREATE, &mut create)?);
    // The program prints nothing: reading to the end runs it on every socket.
    std::io::copy(&mut &iter, &mut std::io::sink())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_jump_lands_where_it_should_and_the_key_is_a_target() {
        let prog = program(7, 99, 56);
        let exit = prog.len() - 2;
        let lands = |pc: usize| pc + 1 + (prog[pc] >> 16) as i16 as usize;
        let jumps: Vec<usize> = (0..prog.len())
            .filter(|&pc| {
                let code = prog[pc] as u8 as u32;
                code & 0x07 == BPF_JMP && code & 0xf0 != BPF_CALL && code & 0xf0 != BPF_EXIT
            })
            .collect();
        // Four to the exit; the family test to the IPv6 block (its first load from offset
        // 56), the IPv4 block's end past it (to the port's load, from offset 12).
        let (to_exit, within): (Vec<usize>, Vec<usize>) =
            jumps.into_iter().partition(|pc| lands(*pc) == exit);
        assert_eq!(to_exit.len(), 4);
        assert_eq!(within.len(), 2);
        let offset = |pc: usize| (prog[pc] >> 16) as i16;
        assert_eq!(offset(lands(within[0])), 56);
        assert_eq!(offset(lands(within[1])), SKC_DPORT);
        // The key the program builds: cookie, address, port, zeroed padding.
        assert_eq!(std::mem::offset_of!(Target, addr) as i16, 8);
        assert_eq!(std::mem::offset_of!(Target, port_be) as i16, 24);
        assert_eq!(size_of::<Target>() as i16, -KEY);
        let mapped = Target::new(1, [10, 0, 0, 1].into(), 53);
        assert_eq!(mapped.port_be.to_ne_bytes(), [0, 53]);
        assert_eq!(mapped.addr[8..12], V4_MAPPED_WORD.to_ne_bytes());
        assert_eq!(mapped.addr[12..], [10, 0, 0, 1]);
    }

    fn cookie(socket: &impl std::os::fd::AsRawFd) -> u64 {
        let mut cookie = 0u64;
        let mut len = size_of::<u64>() as libc::socklen_t;
        // SAFETY: an output buffer of the size passed.
        let ret = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&raw mut cookie).cast(),
                &mut len,
            )
        };
        assert_eq!(ret, 0);
        cookie
    }

    fn this_namespace() -> Vec<File> {
        vec![File::open("/proc/self/ns/net").unwrap()]
    }

    fn iterators(protocols: &[Protocol]) -> Box<dyn Destroyer> {
        Box::new(SockDestroy::load(protocols, 16).unwrap())
    }

    fn sock_diag(protocols: &[Protocol]) -> Box<dyn Destroyer> {
        Box::new(crate::sock_diag::SockDiag::new(protocols))
    }

    fn a_connected_udp_socket_named_by_a_target_is_destroyed_and_no_other(
        destroyer: fn(&[Protocol]) -> Box<dyn Destroyer>,
    ) {
        use std::net::UdpSocket;
        let doomed = UdpSocket::bind("127.0.0.1:0").unwrap();
        doomed.connect("127.0.0.1:9").unwrap();
        // A dual-stack application's: an IPv6 socket connected to an IPv4-mapped address.
        let mapped = UdpSocket::bind("[::]:0").unwrap();
        mapped.connect("[::ffff:127.0.0.1]:9").unwrap();
        let native = UdpSocket::bind("[::1]:0").unwrap();
        native.connect("[::1]:9").unwrap();
        let moved = UdpSocket::bind("127.0.0.1:0").unwrap();
        moved.connect("127.0.0.1:10").unwrap();
        let loopback = IpAddr::from([127, 0, 0, 1]);
        let targets = [
            (Protocol::Udp, Target::new(cookie(&doomed), loopback, 9)),
            (Protocol::Udp, Target::new(cookie(&mapped), loopback, 9)),
            (
                Protocol::Udp,
                Target::new(cookie(&native), "::1".parse().unwrap(), 9),
            ),
            // Named with a destination it is no longer connected to.
            (Protocol::Udp, Target::new(cookie(&moved), loopback, 9)),
        ];
        let destroyed = run(
            &mut *destroyer(&[Protocol::Udp]),
            &targets,
            &this_namespace(),
        )
        .unwrap();
        assert_eq!((destroyed.udp, destroyed.tcp), (3, 0));
        assert!(destroyed.errors.is_empty(), "{:?}", destroyed.errors);
        for socket in [&doomed, &mapped, &native] {
            assert_eq!(
                socket.take_error().unwrap().and_then(|e| e.raw_os_error()),
                Some(libc::ECONNABORTED)
            );
            assert!(socket.peer_addr().is_err(), "disconnected");
        }
        assert!(moved.take_error().unwrap().is_none());
    }

    fn tcp_connections_only_where_asked(destroyer: fn(&[Protocol]) -> Box<dyn Destroyer>) {
        use std::{
            io::Read as _,
            net::{TcpListener, TcpStream},
        };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _server = listener.accept().unwrap();
        let target = [(
            Protocol::Tcp,
            Target::new(cookie(&client), [127, 0, 0, 1].into(), port),
        )];
        let none = run(
            &mut *destroyer(&[Protocol::Udp]),
            &target,
            &this_namespace(),
        )
        .unwrap();
        assert_eq!((none.udp, none.tcp), (0, 0));
        let both = &mut *destroyer(&[Protocol::Udp, Protocol::Tcp]);
        let destroyed = run(both, &target, &this_namespace()).unwrap();
        assert_eq!((destroyed.udp, destroyed.tcp), (0, 1));
        assert!(destroyed.errors.is_empty(), "{:?}", destroyed.errors);
        let error = client.read(&mut [0; 1]).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::ECONNABORTED), "{error}");
    }

    // These need root and, for the iterators, Linux ≥ 6.5, as the agent does.
    #[test]
    fn the_iterators_destroy_a_connected_udp_socket_named_by_a_target_and_no_other() {
        a_connected_udp_socket_named_by_a_target_is_destroyed_and_no_other(iterators);
    }

    #[test]
    fn sock_diag_destroys_a_connected_udp_socket_named_by_a_target_and_no_other() {
        a_connected_udp_socket_named_by_a_target_is_destroyed_and_no_other(sock_diag);
    }

    #[test]
    fn the_iterators_destroy_tcp_connections_only_where_asked() {
        tcp_connections_only_where_asked(iterators);
    }

    #[test]
    fn sock_diag_destroys_tcp_connections_only_where_asked() {
        tcp_connections_only_where_asked(sock_diag);
    }

    #[test]
    fn the_iterators_leave_no_target_behind() {
        let mut destroy = SockDestroy::load(&[Protocol::Udp], 16).unwrap();
        let nowhere = [(Protocol::Udp, Target::new(1, [127, 0, 0, 1].into(), 9))];
        let destroyed = run(&mut destroy, &nowhere, &this_namespace()).unwrap();
        assert_eq!(destroyed.udp, 0);
        assert_eq!(destroy.targets.keys().count(), 0);
    }
}
