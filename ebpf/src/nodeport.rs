//! Traffic from outside the node to node ports, external IPs and load-balancer IPs, translated by tc programs on
//! every interface that carries a node address (tcx links). The node's own clients never reach these: socket load
//! balancing sent their sockets to a backend already.
//!
//! Ingress (`tartan_from_outside`): the first packet of a flow to a frontend chooses a backend (at random, or the
//! client's within its session-affinity timeout) and records the flow in TARTAN_CT, its replies in TARTAN_NAT.
//! - A backend on this node is reached with the client's address kept (Cilium's choice; kube-proxy masquerades
//!   under externalTrafficPolicy Cluster): the packet is given the backend's address and passed to the kernel,
//!   which forwards it; the reply is given the frontend's address back by the egress program on its way out.
//! - A backend on another node gets the packet from a node address and a port of our own (above the kernel's
//!   ephemeral range), redirected to the route's device without entering the node's stack (which would drop a
//!   packet from one of its own addresses): the reply comes back to that address and port, and is translated
//!   and redirected to the client here.
//! ICMP errors about a translated flow are translated too (outer and inner headers), so that "port unreachable"
//! or "fragmentation needed" reach the client's socket. A packet too big for the route to a remote backend
//! (fragmentation not allowed) is handed to the kernel with its destination translated only: the kernel
//! answers with the ICMP error, which the egress program translates.
//!
//! Not translated: IP fragments (the first one too: the rest, without ports, could not follow it), IPv6 extension
//! headers, and SCTP flows whose ports would change (its CRC32c covers them and cannot be recomputed here).

use aya_ebpf::bindings::{
    __sk_buff, bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
    BPF_FIB_LKUP_RET_SUCCESS, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT,
};
use aya_ebpf::helpers::{bpf_csum_diff, bpf_fib_lookup, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect_neigh};
use aya_ebpf::macros::{classifier, map};
use aya_ebpf::maps::PerCpuArray;
use aya_ebpf::programs::TcContext;
use ebpf_maps::{
    ct, flags, stats, AffinityValue, CtValue, ExtAffinityKey, FlowKey, IfAddrKey, NatValue, ServiceKey, ServiceValue,
    CT_CLOSING_SECS, CT_OTHER_SECS, CT_TCP_SECS, NAT_PORT_COUNT, NAT_PORT_MIN,
};

use crate::{count, same, AFFINITY_EXT, CONNTRACK, IFADDR, NAT, POD_ADDRS, SERVICES};

/// tcx: not ours, on to the next program (then the kernel).
pub(crate) const NEXT: i32 = -1;
const OK: i32 = TC_ACT_OK as i32;
pub(crate) const SHOT: i32 = TC_ACT_SHOT as i32;

pub(crate) const ETH_HLEN: usize = 14;
pub(crate) const ETH_P_IP: u16 = 0x0800;
pub(crate) const ETH_P_IPV6: u16 = 0x86dd;
use ebpf_maps::proto::{translated, SCTP, TCP, UDP};
pub(crate) const ICMP: u8 = 1;
pub(crate) const ICMPV6: u8 = 58;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Offsets in the IPv4 header (after the Ethernet header).
pub(crate) const V4_FRAG: usize = ETH_HLEN + 6;
const V4_PROTO: usize = ETH_HLEN + 9;
const V4_CSUM: usize = ETH_HLEN + 10;
pub(crate) const V4_SADDR: usize = ETH_HLEN + 12;
pub(crate) const V4_DADDR: usize = ETH_HLEN + 16;
/// ... and in the IPv6 header.
const V6_NEXT: usize = ETH_HLEN + 6;
pub(crate) const V6_SADDR: usize = ETH_HLEN + 8;
pub(crate) const V6_DADDR: usize = ETH_HLEN + 24;
pub(crate) const V6_HLEN: usize = 40;

/// A parsed packet: addresses in the maps' 16-byte form, ports as they sit in the packet.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Pkt {
    pub(crate) saddr: [u8; 16],
    pub(crate) daddr: [u8; 16],
    /// Where the transport (or ICMP) header starts.
    pub(crate) l4: u32,
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    pub(crate) v6: u8,
    pub(crate) proto: u8,
    /// IPv4 "don't fragment" (always set for IPv6: routers never fragment it).
    pub(crate) df: u8,
    /// TCP's flags byte (FIN 0x01, RST 0x04), 0 for other protocols.
    pub(crate) tcp_flags: u8,
}

/// The addresses and ports a packet is given.
#[repr(C)]
#[derive(Clone, Copy)]
struct Tuple {
    saddr: [u8; 16],
    daddr: [u8; 16],
    sport: u16,
    dport: u16,
}

/// Per-CPU working memory. BPF gives a program 512 bytes of stack for its whole call chain, too little for a
/// packet, a flow key, its conntrack and NAT values and a route lookup at once: they live here instead, one slot
/// for the ingress program and one for the egress one (a redirect runs the egress program only after the ingress
/// one returned, and neither is preempted on its CPU).
#[repr(C)]
struct Scratch {
    pkt: Pkt,
    key: FlowKey,
    rkey: FlowKey,
    ct: CtValue,
    nat: NatValue,
    t: Tuple,
    fib: FibParams,
}

#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(2, 0);

#[inline(always)]
fn scratch(slot: u32) -> Option<&'static mut Scratch> {
    // SAFETY: this CPU's slot, used by one program run at a time (see Scratch).
    SCRATCH.get_ptr_mut(slot).map(|p| unsafe { &mut *p })
}

#[inline(always)]
pub(crate) fn load_addr(ctx: &TcContext, off: usize, v6: bool, to: &mut [u8; 16]) -> Option<()> {
    if v6 {
        *to = ctx.load::<[u8; 16]>(off).ok()?;
    } else {
        let v4 = ctx.load::<[u8; 4]>(off).ok()?;
        *to = [0; 16];
        to[0] = v4[0];
        to[1] = v4[1];
        to[2] = v4[2];
        to[3] = v4[3];
    }
    Some(())
}

#[inline(always)]
pub(crate) fn parse(ctx: &TcContext, p: &mut Pkt) -> Option<()> {
    let eth_proto = u16::from_be(ctx.load::<u16>(12).ok()?);
    if eth_proto == ETH_P_IP {
        let vihl = ctx.load::<u8>(ETH_HLEN).ok()?;
        let ihl = ((vihl & 0x0f) as u32) * 4;
        if ihl < 20 {
            return None;
        }
        let frag = u16::from_be(ctx.load::<u16>(V4_FRAG).ok()?);
        // A fragment (more to come, or an offset): later ones carry no ports, so none is translated.
        if frag & 0x3fff != 0 {
            return None;
        }
        p.v6 = 0;
        p.proto = ctx.load::<u8>(V4_PROTO).ok()?;
        p.l4 = ETH_HLEN as u32 + ihl;
        p.df = (frag & 0x4000 != 0) as u8;
        load_addr(ctx, V4_SADDR, false, &mut p.saddr)?;
        load_addr(ctx, V4_DADDR, false, &mut p.daddr)?;
    } else if eth_proto == ETH_P_IPV6 {
        p.v6 = 1;
        p.proto = ctx.load::<u8>(V6_NEXT).ok()?;
        p.l4 = (ETH_HLEN + V6_HLEN) as u32;
        p.df = 1;
        load_addr(ctx, V6_SADDR, true, &mut p.saddr)?;
        load_addr(ctx, V6_DADDR, true, &mut p.daddr)?;
    } else {
        return None;
    }
    p.tcp_flags = 0;
    if translated(p.proto) {
        p.sport = ctx.load::<u16>(p.l4 as usize).ok()?;
        p.dport = ctx.load::<u16>(p.l4 as usize + 2).ok()?;
        if p.proto == TCP {
            p.tcp_flags = ctx.load::<u8>(p.l4 as usize + 13).ok()?;
        }
    } else {
        p.sport = 0;
        p.dport = 0;
    }
    Some(())
}

/// The transport checksum's offset (0: none) and the flags its updates need. None for SCTP: its CRC covers no
/// addresses, and a changed port is left to the receiver's check (see the notes).
#[inline(always)]
fn l4_csum(p: &Pkt) -> (usize, u64) {
    match p.proto {
        TCP => (p.l4 as usize + 16, 0),
        // A zero UDP checksum (IPv4) means none: kept zero.
        UDP => (p.l4 as usize + 6, BPF_F_MARK_MANGLED_0 as u64),
        _ => (0, 0),
    }
}

/// Writes address `new` over `old` at `off`, fixing the IPv4 header checksum at `l3` and the checksum at `l4`
/// (0: none of either) with `l4_flags` (BPF_F_PSEUDO_HDR when the address is part of its pseudo-header).
#[inline(always)]
fn set_addr(
    ctx: &TcContext,
    v6: bool,
    off: usize,
    old: &[u8; 16],
    new: &[u8; 16],
    l3: usize,
    l4: usize,
    l4_flags: u64,
) -> Option<()> {
    if v6 {
        ctx.store(off, new, 0).ok()?;
        // SAFETY: two initialised 16-byte buffers, in the helper's 4-byte multiples; it only reads them.
        let diff = unsafe { bpf_csum_diff(old.as_ptr() as *mut u32, 16, new.as_ptr() as *mut u32, 16, 0) };
        if l4 != 0 {
            // Size 0: `diff` is a checksum difference, not a value.
            let ipv6 = if l4_flags & BPF_F_PSEUDO_HDR as u64 != 0 { BPF_F_IPV6 } else { 0 };
            ctx.l4_csum_replace(l4, 0, diff as u64, l4_flags | ipv6).ok()?;
        }
    } else {
        let o = u32::from_ne_bytes([old[0], old[1], old[2], old[3]]);
        let n = u32::from_ne_bytes([new[0], new[1], new[2], new[3]]);
        ctx.store(off, &n, 0).ok()?;
        if l3 != 0 {
            ctx.l3_csum_replace(l3, o as u64, n as u64, 4).ok()?;
        }
        if l4 != 0 {
            ctx.l4_csum_replace(l4, o as u64, n as u64, l4_flags | 4).ok()?;
        }
    }
    Some(())
}

/// Writes port `new` over `old` at `off`, fixing the checksum at `l4` (0: none).
#[inline(always)]
fn set_port(ctx: &TcContext, off: usize, old: u16, new: u16, l4: usize, l4_flags: u64) -> Option<()> {
    ctx.store(off, &new, 0).ok()?;
    if l4 != 0 {
        ctx.l4_csum_replace(l4, old as u64, new as u64, l4_flags | 2).ok()?;
    }
    Some(())
}

/// Rewrites a transport packet `p` to carry `t` (only what changes).
#[inline(always)]
fn rewrite(ctx: &TcContext, p: &Pkt, t: &Tuple) -> Option<()> {
    let v6 = p.v6 != 0;
    let l3 = if v6 { 0 } else { V4_CSUM };
    let (l4, f) = l4_csum(p);
    let (s, d) = if v6 { (V6_SADDR, V6_DADDR) } else { (V4_SADDR, V4_DADDR) };
    if !same(&t.saddr, &p.saddr) {
        set_addr(ctx, v6, s, &p.saddr, &t.saddr, l3, l4, f | BPF_F_PSEUDO_HDR as u64)?;
    }
    if !same(&t.daddr, &p.daddr) {
        set_addr(ctx, v6, d, &p.daddr, &t.daddr, l3, l4, f | BPF_F_PSEUDO_HDR as u64)?;
    }
    if t.sport != p.sport {
        set_port(ctx, p.l4 as usize, p.sport, t.sport, l4, f)?;
    }
    if t.dport != p.dport {
        set_port(ctx, p.l4 as usize + 2, p.dport, t.dport, l4, f)?;
    }
    Some(())
}

/// bpf_l4_csum_replace: the pseudo-header is IPv6's, whose address changes leave skb->csum alone (kernel 6.16; not
/// in aya's bindings yet). Without it a CHECKSUM_COMPLETE packet's csum is corrupted (cilium's kernel fix).
const BPF_F_IPV6: u64 = 1 << 7;

/// What `redirect` returns for a packet too big for its route (not a TC verdict).
const TOO_BIG: i32 = -1000;

/// The route from `saddr` to `daddr` as the kernel would take it for this packet (a BPF_FIB_LKUP_RET_* code;
/// `fib` holds the result: the device, and the MAC addresses when resolved).
#[inline(always)]
pub(crate) fn fib_lookup(
    skb: *mut __sk_buff,
    fib: &mut FibParams,
    v6: bool,
    proto: u8,
    saddr: &[u8; 16],
    daddr: &[u8; 16],
) -> u32 {
    // SAFETY: an all-zero bpf_fib_lookup is a valid request before the fields below are set.
    *fib = unsafe { core::mem::zeroed() };
    fib.family = if v6 { AF_INET6 } else { AF_INET };
    fib.l4_protocol = proto;
    // SAFETY: the context is an __sk_buff for tc programs.
    fib.ifindex = unsafe { (*skb).ifindex };
    let word = |a: &[u8; 16], i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    if v6 {
        fib.__bindgen_anon_3.ipv6_src = [word(saddr, 0), word(saddr, 4), word(saddr, 8), word(saddr, 12)];
        fib.__bindgen_anon_4.ipv6_dst = [word(daddr, 0), word(daddr, 4), word(daddr, 8), word(daddr, 12)];
    } else {
        fib.__bindgen_anon_3.ipv4_src = word(saddr, 0);
        fib.__bindgen_anon_4.ipv4_dst = word(daddr, 0);
    }
    // SAFETY: the helper reads and writes the request we own, of its full size.
    unsafe { bpf_fib_lookup(skb as *mut _, fib, core::mem::size_of::<FibParams>() as i32, 0) as u32 }
}

/// Sends the translated packet (now carrying `s.t`) out of the interface the route to its destination takes,
/// the kernel filling in the link-layer header.
#[inline(always)]
fn redirect(ctx: &TcContext, s: &mut Scratch, may_fragment: bool) -> i32 {
    let rc = fib_lookup(ctx.skb.skb, &mut s.fib, s.pkt.v6 != 0, s.pkt.proto, &s.t.saddr, &s.t.daddr);
    let fib = &s.fib;
    let ok = rc == BPF_FIB_LKUP_RET_SUCCESS
        || rc == BPF_FIB_LKUP_RET_NO_NEIGH
        // Too big for the route, but fragmentation is allowed: a tunnel device fragments its outer packet (a
        // physical device would drop it, as a router without fragmentation would).
        || (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED && may_fragment);
    if !ok {
        return if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED { TOO_BIG } else { drop() };
    }
    // SAFETY: a plain helper call; with no parameters it looks the neighbour up itself.
    unsafe { bpf_redirect_neigh(fib.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

#[inline(always)]
fn drop() -> i32 {
    count(stats::TC_DROP);
    SHOT
}

#[inline(always)]
pub(crate) fn now() -> u64 {
    // SAFETY: a helper without side effects on memory.
    unsafe { bpf_ktime_get_ns() }
}

/// Whether a flow last seen at `last_ns` (with conntrack `flags`) still lives.
#[inline(always)]
fn alive(last_ns: u64, flags: u16, proto: u8, now: u64) -> bool {
    let secs = if flags & ct::CLOSING != 0 {
        CT_CLOSING_SECS
    } else if proto == TCP {
        CT_TCP_SECS
    } else {
        CT_OTHER_SECS
    };
    now.wrapping_sub(last_ns) < secs * 1_000_000_000
}

/// A TCP FIN or RST: the flow is ending.
#[inline(always)]
pub(crate) fn ending(p: &Pkt) -> bool {
    p.tcp_flags & 0x05 != 0
}

#[inline(always)]
fn flow_key(p: &Pkt, k: &mut FlowKey) {
    *k = FlowKey { saddr: p.saddr, daddr: p.daddr, sport: p.sport, dport: p.dport, proto: p.proto, _pad: [0; 3] };
}

#[classifier]
pub fn tartan_from_outside(ctx: TcContext) -> i32 {
    let Some(s) = scratch(0) else { return NEXT };
    if parse(&ctx, &mut s.pkt).is_none() {
        return NEXT;
    }
    let skb = ctx.skb.skb;
    // For a pod of this node: never a frontend (services are translated to pods, not addressed to them).
    // SAFETY: only whether the key is there.
    if unsafe { POD_ADDRS.get(&s.pkt.daddr) }.is_some() {
        return crate::policy::to_local_pod(skb);
    }
    let proto = s.pkt.proto;
    if proto == ICMP || proto == ICMPV6 {
        return icmp_error(skb, s, true);
    }
    if !translated(proto) {
        return NEXT;
    }
    flow_key(&s.pkt, &mut s.key);
    let now = now();
    // A reply from a remote backend, to the node address and port its flow was given.
    if let Some(n) = NAT.get_ptr_mut(&s.key) {
        // SAFETY: a pointer into the map's value: read once; its timestamp and flags written (a race only loses
        // a refresh).
        s.nat = unsafe { *n };
        if s.nat.flags & ct::SNAT != 0 {
            touch(&mut unsafe { &mut *n }.last_ns, now);
            if ending(&s.pkt) {
                unsafe { (*n).flags |= ct::CLOSING };
            }
            return reply(skb, s, now);
        }
    }
    // A flow seen before keeps its backend while it lives.
    if let Some(c) = CONNTRACK.get_ptr_mut(&s.key) {
        // SAFETY: as above.
        s.ct = unsafe { *c };
        if alive(s.ct.last_ns, s.ct.flags, proto, now) && nat_holds(s, now) {
            touch(&mut unsafe { &mut *c }.last_ns, now);
            if ending(&s.pkt) {
                unsafe { (*c).flags |= ct::CLOSING };
            }
            return forward(skb, s);
        }
    }
    match new_flow(skb, s, now) {
        CONTINUE => forward(skb, s),
        verdict => verdict,
    }
}

/// Refreshes a timestamp, at most once a second (a write per packet would bounce the cache line between CPUs).
#[inline(always)]
fn touch(last_ns: &mut u64, now: u64) {
    if now.wrapping_sub(*last_ns) > 1_000_000_000 {
        *last_ns = now;
    }
}

/// For a flow sent to a remote backend (`s.ct`): whether its NAT entry still maps its port back to this client
/// (the LRU may have evicted it, and its port been claimed by another flow since). Refreshes the entry, and marks
/// it closing with the flow.
#[inline(always)]
fn nat_holds(s: &mut Scratch, now: u64) -> bool {
    if s.ct.flags & ct::SNAT == 0 {
        return true;
    }
    s.rkey = FlowKey {
        saddr: s.ct.backend,
        daddr: s.ct.nat_addr,
        sport: s.ct.backend_port,
        dport: s.ct.nat_port,
        proto: s.pkt.proto,
        _pad: [0; 3],
    };
    let Some(n) = NAT.get_ptr_mut(&s.rkey) else { return false };
    // SAFETY: a pointer into the map's value, as in the program.
    let n = unsafe { &mut *n };
    if !(same(&n.daddr, &s.pkt.saddr) && n.dport == s.pkt.sport) {
        return false;
    }
    touch(&mut n.last_ns, now);
    if ending(&s.pkt) {
        n.flags |= ct::CLOSING;
    }
    true
}

/// `new_flow`'s "recorded, now forward it" (not a TC verdict).
const CONTINUE: i32 = -2000;

/// A remote backend's reply (its NAT entry in `s.nat`): from the frontend to the client, redirected towards the
/// client.
#[inline(never)]
fn reply(skb: *mut __sk_buff, s: &mut Scratch, now: u64) -> i32 {
    let ctx = &TcContext::new(skb);
    s.t = Tuple { saddr: s.nat.saddr, daddr: s.nat.daddr, sport: s.nat.sport, dport: s.nat.dport };
    if ending(&s.pkt) {
        // The flow's conntrack entry ends with it too.
        s.rkey = FlowKey {
            saddr: s.nat.daddr,
            daddr: s.nat.saddr,
            sport: s.nat.dport,
            dport: s.nat.sport,
            proto: s.pkt.proto,
            _pad: [0; 3],
        };
        if let Some(c) = CONNTRACK.get_ptr_mut(&s.rkey) {
            // SAFETY: a pointer into the map's value.
            unsafe {
                (*c).flags |= ct::CLOSING;
                (*c).last_ns = now;
            }
        }
    }
    if rewrite(ctx, &s.pkt, &s.t).is_none() {
        return drop();
    }
    count(stats::TC_REPLY);
    let r = redirect(ctx, s, true);
    if r == TOO_BIG {
        drop()
    } else {
        r
    }
}

/// The first packet of a flow to a frontend: a backend chosen, the flow recorded in `s.ct` and the maps.
#[inline(never)]
fn new_flow(skb: *mut __sk_buff, s: &mut Scratch, now: u64) -> i32 {
    let p = &s.pkt;
    let front_key = ServiceKey { addr: p.daddr, port: p.dport, slot: 0, proto: p.proto, _pad: [0; 3] };
    // SAFETY: read at once; userspace replaces values whole.
    let Some(front) = (unsafe { SERVICES.get(&front_key) }) else { return NEXT };
    let (front_flags, affinity_secs) = (front.flags, front.affinity_secs);
    let n = if front_flags & flags::EXTERNAL_LOCAL != 0 { front.local_count } else { front.count };
    if n == 0 {
        return no_endpoint(front_flags);
    }
    let Some((slot, backend)) = choose(p, &front_key, front_flags, affinity_secs, n, now) else {
        return drop();
    };
    if front_flags & flags::AFFINITY != 0 {
        let k = ExtAffinityKey { client: p.saddr, addr: p.daddr, port: p.dport, proto: p.proto, _pad: [0; 5] };
        let v = AffinityValue { addr: backend.addr, port: backend.port, slot, _pad: 0, last_ns: now };
        let _ = AFFINITY_EXT.insert(&k, &v, 0);
    }
    s.ct = CtValue {
        backend: backend.addr,
        nat_addr: [0; 16],
        backend_port: backend.port,
        nat_port: 0,
        flags: 0,
        _pad: 0,
        last_ns: now,
    };
    s.nat =
        NatValue { saddr: p.daddr, daddr: p.saddr, sport: p.dport, dport: p.sport, flags: 0, _pad: 0, last_ns: now };
    // SCTP's checksum (a CRC32c over the packet, ports included) cannot be recomputed here: only flows whose ports
    // stay as they are are translated (addresses are not under the CRC).
    let sctp = p.proto == SCTP;
    if sctp && backend.port != p.dport {
        return drop();
    }
    if backend.flags & flags::LOCAL != 0 {
        // The reply as it will leave: from the backend to the client.
        s.rkey = FlowKey {
            saddr: backend.addr,
            daddr: p.saddr,
            sport: backend.port,
            dport: p.sport,
            proto: p.proto,
            _pad: [0; 3],
        };
        if NAT.insert(&s.rkey, &s.nat, 0).is_err() {
            return drop();
        }
    } else {
        // SAFETY: the context is an __sk_buff for tc programs.
        let ak = IfAddrKey { ifindex: unsafe { (*skb).ifindex }, family: if p.v6 != 0 { 6 } else { 4 } };
        let Some(addr) = (unsafe { IFADDR.get(&ak) }) else { return drop() };
        s.ct.nat_addr = *addr;
        s.ct.flags = ct::SNAT;
        s.nat.flags = ct::SNAT;
        // A port of our own for this (backend, node address) pair: a few random tries (SCTP: the client's own),
        // each claimed atomically (BPF_NOEXIST) so that two CPUs never share one, or taken over from a flow idle
        // past its lifetime.
        let mut i = 0;
        while i < 8 {
            // SAFETY: a helper without side effects on memory.
            let random = NAT_PORT_MIN + (unsafe { bpf_get_prandom_u32() } % NAT_PORT_COUNT as u32) as u16;
            let port = if sctp { s.pkt.sport } else { random.to_be() };
            s.rkey = FlowKey {
                saddr: backend.addr,
                daddr: s.ct.nat_addr,
                sport: backend.port,
                dport: port,
                proto: s.pkt.proto,
                _pad: [0; 3],
            };
            let claimed = NAT.insert(&s.rkey, &s.nat, BPF_NOEXIST as u64).is_ok()
                || match unsafe { NAT.get(&s.rkey) } {
                    // SAFETY: read at once.
                    Some(old) if !alive(old.last_ns, old.flags, s.pkt.proto, now) => {
                        NAT.insert(&s.rkey, &s.nat, 0).is_ok()
                    }
                    _ => false,
                };
            if claimed {
                s.ct.nat_port = port;
                break;
            }
            if sctp {
                break;
            }
            i += 1;
        }
        if s.ct.nat_port == 0 {
            return drop();
        }
    }
    if CONNTRACK.insert(&s.key, &s.ct, 0).is_err() {
        return drop();
    }
    CONTINUE
}

/// The backend for a new flow: the client's own within its affinity timeout, else one of the first `n` slots at
/// random.
#[inline(always)]
fn choose(
    p: &Pkt,
    front_key: &ServiceKey,
    front_flags: u16,
    affinity_secs: u32,
    n: u16,
    now: u64,
) -> Option<(u16, ServiceValue)> {
    if front_flags & flags::AFFINITY != 0 {
        let k = ExtAffinityKey { client: p.saddr, addr: p.daddr, port: p.dport, proto: p.proto, _pad: [0; 5] };
        // SAFETY: read at once.
        if let Some(a) = unsafe { AFFINITY_EXT.get(&k) } {
            let live = now.wrapping_sub(a.last_ns) < u64::from(affinity_secs) * 1_000_000_000;
            if live && a.slot >= 1 && a.slot <= n {
                // The backend must still be the one remembered: slots move when endpoints change.
                if let Some(b) = unsafe { SERVICES.get(&ServiceKey { slot: a.slot, ..*front_key }) } {
                    if b.port == a.port && same(&b.addr, &a.addr) {
                        return Some((a.slot, *b));
                    }
                }
            }
        }
    }
    // SAFETY: a helper without side effects on memory.
    let slot = (unsafe { bpf_get_prandom_u32() } % u32::from(n)) as u16 + 1;
    // A missing slot: the count read was one userspace is shrinking; the client retransmits.
    let b = unsafe { SERVICES.get(&ServiceKey { slot, ..*front_key }) }?;
    Some((slot, *b))
}

/// Sends a packet of a known flow (`s.ct`) on: to a backend on this node through the kernel, to a remote one
/// from a node address, redirected.
#[inline(never)]
fn forward(skb: *mut __sk_buff, s: &mut Scratch) -> i32 {
    let ctx = &TcContext::new(skb);
    let snat = s.ct.flags & ct::SNAT != 0;
    s.t = if snat {
        Tuple { saddr: s.ct.nat_addr, daddr: s.ct.backend, sport: s.ct.nat_port, dport: s.ct.backend_port }
    } else {
        Tuple { saddr: s.pkt.saddr, daddr: s.ct.backend, sport: s.pkt.sport, dport: s.ct.backend_port }
    };
    if rewrite(ctx, &s.pkt, &s.t).is_none() {
        return drop();
    }
    count(stats::TC_FORWARD);
    if !snat {
        return OK;
    }
    let r = redirect(ctx, s, s.pkt.df == 0);
    if r != TOO_BIG {
        return r;
    }
    // Too big for the route to the backend, and not to be fragmented: the kernel must say so to the client. Back
    // to the client's source (the destination stays the backend), with a reply entry for the ICMP error the egress
    // program translates.
    let now = Pkt { saddr: s.t.saddr, sport: s.t.sport, daddr: s.t.daddr, dport: s.t.dport, ..s.pkt };
    s.t = Tuple { saddr: s.pkt.saddr, daddr: s.ct.backend, sport: s.pkt.sport, dport: s.ct.backend_port };
    if rewrite(ctx, &now, &s.t).is_none() {
        return drop();
    }
    s.rkey = FlowKey {
        saddr: s.ct.backend,
        daddr: s.pkt.saddr,
        sport: s.ct.backend_port,
        dport: s.pkt.sport,
        proto: s.pkt.proto,
        _pad: [0; 3],
    };
    s.nat = NatValue {
        saddr: s.pkt.daddr,
        daddr: s.pkt.saddr,
        sport: s.pkt.dport,
        dport: s.pkt.sport,
        flags: 0,
        _pad: 0,
        last_ns: s.ct.last_ns,
    };
    let _ = NAT.insert(&s.rkey, &s.nat, 0);
    OK
}

/// A frontend without a usable endpoint for this traffic.
#[inline(always)]
fn no_endpoint(front_flags: u16) -> i32 {
    if front_flags & flags::DROP_EMPTY != 0 {
        // externalTrafficPolicy Local with endpoints elsewhere only: dropped, as kube-proxy does (a load
        // balancer's health check takes this node out).
        return drop();
    }
    count(stats::TC_REFUSED);
    if front_flags & flags::NODE_ADDR != 0 {
        // Nothing listens on a node port: the node's own stack refuses (TCP reset, ICMP port unreachable).
        return OK;
    }
    SHOT
}

#[classifier]
pub fn tartan_to_outside(ctx: TcContext) -> i32 {
    let Some(s) = scratch(1) else { return NEXT };
    if parse(&ctx, &mut s.pkt).is_none() {
        return NEXT;
    }
    let proto = s.pkt.proto;
    if proto == ICMP || proto == ICMPV6 {
        return icmp_error(ctx.skb.skb, s, false);
    }
    if !translated(proto) {
        return NEXT;
    }
    flow_key(&s.pkt, &mut s.key);
    // SAFETY: read at once.
    let Some(n) = (unsafe { NAT.get(&s.key) }) else { return NEXT };
    if n.flags & ct::SNAT != 0 {
        return NEXT;
    }
    // A local backend's reply leaving for the client: from the frontend it asked for.
    s.t = Tuple { saddr: n.saddr, daddr: s.pkt.daddr, sport: n.sport, dport: s.pkt.dport };
    if rewrite(&ctx, &s.pkt, &s.t).is_none() {
        return drop();
    }
    count(stats::TC_REPLY);
    OK
}

/// The packet an ICMP error (of the message at `l4`) quotes: its protocol and the offsets of its transport header,
/// source and destination addresses. None: not an error, or too short.
#[inline(always)]
pub(crate) fn quoted(ctx: &TcContext, l4: usize, v6: bool) -> Option<(u8, usize, usize, usize)> {
    let kind = ctx.load::<u8>(l4).ok()?;
    let error = if v6 { (1..=4).contains(&kind) } else { kind == 3 || kind == 11 || kind == 12 };
    if !error {
        return None;
    }
    // The quoted packet: its IP header 8 bytes in, then at least 8 bytes of its transport header.
    let inner = l4 + 8;
    if v6 {
        let proto = ctx.load::<u8>(inner + 6).ok()?;
        Some((proto, inner + V6_HLEN, inner + 8, inner + 24))
    } else {
        let vihl = ctx.load::<u8>(inner).ok()?;
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if ihl < 20 {
            return None;
        }
        let proto = ctx.load::<u8>(inner + 9).ok()?;
        Some((proto, inner + ihl, inner + 12, inner + 16))
    }
}

/// An ICMP error about a translated flow: its outer destination becomes the client (ingress, remote backend),
/// its outer source the frontend if the backend sent it, and the packet it quotes becomes the client's original
/// one (client to frontend). On ingress, redirected to the client; on egress, on its way already.
#[inline(never)]
fn icmp_error(skb: *mut __sk_buff, s: &mut Scratch, ingress: bool) -> i32 {
    let ctx = &TcContext::new(skb);
    let v6 = s.pkt.v6 != 0;
    let l4 = s.pkt.l4 as usize;
    let Some((iproto, il4, isaddr_off, idaddr_off)) = quoted(ctx, l4, v6) else { return NEXT };
    if !translated(iproto) {
        return NEXT;
    }
    // The quoted packet went to the backend; its reply would carry the swapped tuple, which is what the NAT map
    // is keyed by: saddr/daddr of `rkey` are the quoted destination and source.
    if load_addr(ctx, idaddr_off, v6, &mut s.rkey.saddr).is_none()
        || load_addr(ctx, isaddr_off, v6, &mut s.rkey.daddr).is_none()
    {
        return NEXT;
    }
    let (Ok(isport), Ok(idport)) = (ctx.load::<u16>(il4), ctx.load::<u16>(il4 + 2)) else { return NEXT };
    s.rkey.sport = idport;
    s.rkey.dport = isport;
    s.rkey.proto = iproto;
    s.rkey._pad = [0; 3];
    // SAFETY: read at once.
    let Some(n) = (unsafe { NAT.get(&s.rkey) }) else { return NEXT };
    s.nat = *n;
    let snat = s.nat.flags & ct::SNAT != 0;
    if snat != ingress {
        return NEXT;
    }
    let icmp_csum = l4 + 2;
    // ICMPv6's checksum covers a pseudo-header with the outer addresses; ICMPv4's does not.
    let (outer_l3, outer_l4) = if v6 { (0, icmp_csum) } else { (V4_CSUM, 0) };
    let pseudo = BPF_F_PSEUDO_HDR as u64;
    let (so, d) = if v6 { (V6_SADDR, V6_DADDR) } else { (V4_SADDR, V4_DADDR) };
    s.t = Tuple { saddr: s.pkt.saddr, daddr: s.pkt.daddr, sport: 0, dport: 0 };
    if snat {
        if set_addr(ctx, v6, d, &s.pkt.daddr, &s.nat.daddr, outer_l3, outer_l4, pseudo).is_none() {
            return drop();
        }
        s.t.daddr = s.nat.daddr;
    }
    if same(&s.pkt.saddr, &s.rkey.saddr) {
        if set_addr(ctx, v6, so, &s.pkt.saddr, &s.nat.saddr, outer_l3, outer_l4, pseudo).is_none() {
            return drop();
        }
        s.t.saddr = s.nat.saddr;
    }
    // The quoted header: IPv4's own checksum absorbs its address changes (leaving the ICMP checksum's sum
    // unchanged); IPv6 has none, so the ICMPv6 checksum takes them.
    // (The quoted IPv4 header starts 8 bytes into the ICMP message; its checksum 10 bytes further.)
    let (inner_l3, inner_l4) = if v6 { (0, icmp_csum) } else { (l4 + 8 + 10, 0) };
    // The quoted source (the client, or the node address for a remote backend) becomes the client...
    if !same(&s.rkey.daddr, &s.nat.daddr)
        && set_addr(ctx, v6, isaddr_off, &s.rkey.daddr, &s.nat.daddr, inner_l3, inner_l4, 0).is_none()
    {
        return drop();
    }
    // ... and the quoted destination (the backend) the frontend.
    if !same(&s.rkey.saddr, &s.nat.saddr)
        && set_addr(ctx, v6, idaddr_off, &s.rkey.saddr, &s.nat.saddr, inner_l3, inner_l4, 0).is_none()
    {
        return drop();
    }
    // Quoted ports: covered by the ICMP checksum only (the quoted transport checksum is left as it was).
    if isport != s.nat.dport && set_port(ctx, il4, isport, s.nat.dport, icmp_csum, 0).is_none() {
        return drop();
    }
    if idport != s.nat.sport && set_port(ctx, il4 + 2, idport, s.nat.sport, icmp_csum, 0).is_none() {
        return drop();
    }
    count(stats::TC_ICMP);
    if !ingress {
        return OK;
    }
    let r = redirect(ctx, s, true);
    if r == TOO_BIG {
        drop()
    } else {
        r
    }
}
