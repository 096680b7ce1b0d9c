//! Socket-level load balancing (what Cilium calls socket-LB), as cgroup/sock_addr programs on the node's cgroup:
//! a connect() or an unconnected UDP sendmsg() to a service frontend (cluster IP, external IP, load-balancer IP or
//! a node address with a node port) is sent to one of its backends instead, chosen at random (or the one the
//! client's namespace had within the session-affinity timeout). recvmsg() and getpeername() translate the backend
//! back to the frontend, so that applications see the address they asked for. A frontend without a usable backend
//! fails connect() with ECONNREFUSED at once. Packets never need rewriting: the socket talks to the backend.

use aya_ebpf::bindings::bpf_sock_addr;
use aya_ebpf::helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns};
use aya_ebpf::macros::cgroup_sock_addr;
use aya_ebpf::programs::SockAddrContext;
use aya_ebpf::EbpfContext;
use ebpf_maps::{flags, stats, AffinityKey, AffinityValue, ReverseKey, ReverseValue, ServiceKey, ServiceValue};

use crate::{count, same, AFFINITY, REVERSE, SERVICES};

/// The cgroup verdicts.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// The destination the socket asks for: (address, port), both in network order. Every context field is read
/// and written as one 4-byte access: the verifier refuses other widths on some of them.
#[inline(always)]
fn dest(sa: *const bpf_sock_addr, v6: bool) -> ([u8; 16], u16) {
    let mut addr = [0u8; 16];
    // SAFETY: the context pointer the kernel gave the program; plain 4-byte loads of its fields.
    unsafe {
        if v6 {
            for i in 0..4 {
                let w = core::ptr::read_volatile(&(*sa).user_ip6[i]);
                addr[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
        } else {
            addr[0..4].copy_from_slice(&core::ptr::read_volatile(&(*sa).user_ip4).to_ne_bytes());
        }
        // The port sits in the low 16 bits in network order: taken as is, compared as stored by userspace.
        (addr, core::ptr::read_volatile(&(*sa).user_port) as u16)
    }
}

#[inline(always)]
fn set_dest(sa: *mut bpf_sock_addr, v6: bool, addr: &[u8; 16], port: u16) {
    let word = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    // SAFETY: as in dest, 4-byte stores.
    unsafe {
        if v6 {
            for i in 0..4 {
                core::ptr::write_volatile(&mut (*sa).user_ip6[i], word(i * 4));
            }
        } else {
            core::ptr::write_volatile(&mut (*sa).user_ip4, word(0));
        }
        core::ptr::write_volatile(&mut (*sa).user_port, port as u32);
    }
}

/// Whether `addr` is IPv4-mapped (`::ffff:a.b.c.d`, what a dual-stack AF_INET6 socket uses for IPv4 peers).
/// Byte by byte: wider comparisons become 128-bit operations BPF has no instructions for.
#[inline(always)]
fn is_mapped(addr: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < 10 {
        if addr[i] != 0 {
            return false;
        }
        i += 1;
    }
    addr[10] == 0xff && addr[11] == 0xff
}

/// A mapped address in the maps' IPv4 form (the IPv4 address first, zeros after), and back.
#[inline(always)]
fn v4_form(addr: &[u8; 16]) -> [u8; 16] {
    let mut v4 = [0u8; 16];
    v4[0] = addr[12];
    v4[1] = addr[13];
    v4[2] = addr[14];
    v4[3] = addr[15];
    v4
}

#[inline(always)]
fn mapped(v4: &[u8; 16]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[10] = 0xff;
    a[11] = 0xff;
    a[12] = v4[0];
    a[13] = v4[1];
    a[14] = v4[2];
    a[15] = v4[3];
    a
}

/// connect() and unconnected sendmsg(): a frontend becomes one of its backends.
#[inline(always)]
fn forward(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands the program a valid bpf_sock_addr for the duration of the call.
    let proto = unsafe { core::ptr::read_volatile(&(*sa).protocol) };
    if proto > u8::MAX as u32 || !ebpf_maps::proto::translated(proto as u8) {
        return ALLOW;
    }
    let (asked, port) = dest(sa, v6);
    // A dual-stack socket reaching an IPv4 service: looked up (and remembered) in IPv4 form, written back mapped.
    let v4_mapped = v6 && is_mapped(&asked);
    let addr = if v4_mapped { v4_form(&asked) } else { asked };
    let front_key = ServiceKey { addr, port, slot: 0, proto: proto as u8, _pad: [0; 3] };
    // SAFETY: the value is copied out at once; userspace replaces values whole.
    let Some(mut front) = (unsafe { SERVICES.get(&front_key) }).copied() else { return ALLOW };
    if front.count == 0 {
        return refuse();
    }
    let affinity = front.flags & flags::AFFINITY != 0;
    // SAFETY: helpers without side effects on memory.
    let now = unsafe { bpf_ktime_get_ns() };
    let aff_key = AffinityKey {
        netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        addr,
        port,
        proto: proto as u8,
        _pad: [0; 5],
    };
    let mut chosen: Option<(u16, ServiceValue)> = None;
    if affinity {
        // SAFETY: copied out at once.
        if let Some(a) = unsafe { AFFINITY.get(&aff_key) }.copied() {
            let fresh = now.wrapping_sub(a.last_ns) < u64::from(front.affinity_secs) * 1_000_000_000;
            if fresh && a.slot >= 1 && a.slot <= front.count {
                let k = ServiceKey { slot: a.slot, ..front_key };
                // The backend must still be the one remembered: slots move when endpoints change.
                if let Some(b) = unsafe { SERVICES.get(&k) }.copied() {
                    if b.port == a.port && same(&b.addr, &a.addr) {
                        chosen = Some((a.slot, b));
                    }
                }
            }
        }
    }
    let (slot, backend) = match chosen {
        Some(c) => c,
        None => {
            // SAFETY: a helper without side effects on memory.
            let slot = (unsafe { bpf_get_prandom_u32() } % u32::from(front.count)) as u16 + 1;
            let k = ServiceKey { slot, ..front_key };
            match unsafe { SERVICES.get(&k) }.copied() {
                Some(b) => (slot, b),
                None => {
                    // Userspace shrinks a count before it deletes the slots beyond it: a missing slot means the
                    // count read above was the old one. Read it again and choose once more among the new one.
                    front = match unsafe { SERVICES.get(&front_key) }.copied() {
                        Some(f) if f.count > 0 => f,
                        _ => return refuse(),
                    };
                    let slot = (unsafe { bpf_get_prandom_u32() } % u32::from(front.count)) as u16 + 1;
                    match unsafe { SERVICES.get(&ServiceKey { slot, ..front_key }) }.copied() {
                        Some(b) => (slot, b),
                        None => return refuse(),
                    }
                }
            }
        }
    };
    if affinity {
        let v = AffinityValue { addr: backend.addr, port: backend.port, slot, _pad: 0, last_ns: now };
        let _ = AFFINITY.insert(&aff_key, &v, 0);
    }
    // SAFETY: a helper reading the socket behind the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let rk = ReverseKey { cookie, addr: backend.addr, port: backend.port, _pad: [0; 6] };
    let rv = ReverseValue { addr, port, _pad: [0; 6] };
    // Written only when new: an unconnected UDP socket sends many datagrams to the same backend.
    let known = match unsafe { REVERSE.get(&rk) } {
        Some(r) => r.port == rv.port && same(&r.addr, &rv.addr),
        None => false,
    };
    if !known {
        let _ = REVERSE.insert(&rk, &rv, 0);
    }
    let to = if v4_mapped { mapped(&backend.addr) } else { backend.addr };
    set_dest(sa, v6, &to, backend.port);
    count(stats::TRANSLATED);
    ALLOW
}

/// recvmsg() and getpeername(): a backend this socket was sent to shows as the frontend it asked for.
#[inline(always)]
fn reverse(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa = ctx.sock_addr;
    let (seen, port) = dest(sa, v6);
    let v4_mapped = v6 && is_mapped(&seen);
    let addr = if v4_mapped { v4_form(&seen) } else { seen };
    // SAFETY: a helper reading the socket behind the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let rk = ReverseKey { cookie, addr, port, _pad: [0; 6] };
    if let Some(r) = unsafe { REVERSE.get(&rk) }.copied() {
        let to = if v4_mapped { mapped(&r.addr) } else { r.addr };
        set_dest(sa, v6, &to, r.port);
        count(stats::REVERSED);
    }
    ALLOW
}

/// Fails the connect() (or sendmsg()) at once with ECONNREFUSED: the frontend has no usable backend.
fn refuse() -> i32 {
    count(stats::REFUSED);
    // SAFETY: a plain helper call; it sets the errno the syscall returns when the program rejects.
    unsafe { aya_ebpf::helpers::bpf_set_retval(-ECONNREFUSED) };
    REJECT
}

#[cgroup_sock_addr(connect4)]
pub fn tartan_connect4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn tartan_connect6(ctx: SockAddrContext) -> i32 {
    forward(&ctx, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn tartan_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn tartan_sendmsg6(ctx: SockAddrContext) -> i32 {
    forward(&ctx, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn tartan_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, false)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn tartan_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, true)
}

#[cgroup_sock_addr(getpeername4)]
pub fn tartan_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn tartan_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, true)
}
