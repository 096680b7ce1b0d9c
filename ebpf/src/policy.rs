//! NetworkPolicy at the pod's door: tc programs on every pod's host-side veth. What enters the host from the veth
//! (`tartan_from_pod`, tcx ingress) is the pod's egress; what leaves the host into it (`tartan_to_pod`, tcx egress)
//! is its ingress, after the bridge and after any translation (socket load balancing chose the backend at
//! connect(), the node-port program at the node's interface): the decision is on the real destination.
//!
//! Stateful, with a map of our own (TARTAN_POL_CT; the kernel's conntrack is out of reach without kfuncs): the
//! first packet of a flow is decided by the pod's rules ([`crate::ebpf_maps::policy`]); an allowed flow is recorded
//! for its direction, and its later packets and its replies pass on that record alone, so a policy change never
//! cuts a flow that was allowed when it began (as the iptables mode's ESTABLISHED rule). A TCP SYN is always
//! decided anew (a reused tuple is a new connection).
//!
//! Not subject to policy, as in the iptables mode: the node's own traffic to and from its pods (its addresses are
//! in TARTAN_HOST) and IPv6 neighbour discovery (the link itself). ICMP errors pass when they quote a tracked flow
//! of the pod (what iptables calls RELATED). A packet a pod sends with another source address is dropped whatever
//! the policy (link-local sources only for neighbour discovery). A packet for another address than the pod's
//! (broadcast, multicast) is never recorded, and passes only where the pod is not isolated. IPv4 fragments carry
//! no ports: they are dropped in a direction the pod is isolated in.
//!
//! Fast path: a packet from a pod to another pod of this node, once both policies let it through, is handed
//! straight to the destination pod's interface (bpf_redirect_peer), skipping the bridge, the host's netfilter and
//! the destination veth's own program (its ingress policy was decided here). Only when the frame already carries
//! the destination pod's MAC address (learned from the frames each pod sends), that is between pods of one subnet
//! talking directly: the frame is delivered unchanged. What a capture on cni0 shows: ARP and the first packets
//! of a flow until both pods' addresses are learned, not the rest (capture on the sending pod's veth instead).

use aya_ebpf::bindings::{__sk_buff, bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS};
use aya_ebpf::helpers::{bpf_redirect_neigh, bpf_redirect_peer};
use aya_ebpf::macros::{classifier, map};
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::PerCpuArray;
use aya_ebpf::programs::TcContext;
use ebpf_maps::policy::{self as pol, EGRESS, INGRESS};
use ebpf_maps::proto::{translated, TCP};
use ebpf_maps::{stats, NamedKey, NetKey, PeerKey, PodValue, PolicyFlowKey, PolicyFlowValue, PortKey};

use crate::nodeport::{
    ending, fib_lookup, load_addr, now, parse, quoted, Pkt, ETH_P_IP, ETH_P_IPV6, ICMP, ICMPV6, NEXT, SHOT, V4_SADDR,
    V6_SADDR,
};
use crate::{
    count, same, HOST_ADDRS, POD_ADDRS, POD_MACS, POD_NETWORK, POLICY_CT, POLICY_NAMED, POLICY_PEERS, POLICY_PODS,
    POLICY_PORTS,
};

/// Working memory (see the node-port programs' Scratch): slot 0 for the pod's egress, 1 for its ingress, 2 for
/// traffic from another node handed to a pod by the node-port program.
#[repr(C)]
struct Scratch {
    pkt: Pkt,
    key: PolicyFlowKey,
    peer: Key<PeerKey>,
    port: Key<PortKey>,
    named: NamedKey,
    pod: PodValue,
    net: Key<NetKey>,
    fib: FibParams,
    /// Set by `judge` when the packet was let through as part of a flow (not exempt traffic): a candidate for
    /// the fast path.
    flow: u8,
}

#[map]
static POLICY_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(3, 0);

#[inline(always)]
fn scratch(slot: u32) -> Option<&'static mut Scratch> {
    // SAFETY: this CPU's slot, used by one program run at a time.
    POLICY_SCRATCH.get_ptr_mut(slot).map(|p| unsafe { &mut *p })
}

/// The pod behind the veth the packet crosses, copied into `s.pod` (false: not a pod of ours).
#[inline(always)]
fn pod_of(skb: *mut __sk_buff, s: &mut Scratch) -> bool {
    // SAFETY: the context is an __sk_buff for tc programs.
    let ifindex = unsafe { (*skb).ifindex };
    // SAFETY: copied at once.
    match unsafe { POLICY_PODS.get(&ifindex) } {
        Some(p) => {
            s.pod = *p;
            true
        }
        None => false,
    }
}

/// IPv6 neighbour discovery and multicast listener messages: the link itself, which pods on one bridge need to
/// reach each other at all; not policy's.
#[inline(always)]
fn neighbour_discovery(ctx: &TcContext, p: &Pkt) -> bool {
    p.v6 != 0 && p.proto == ICMPV6 && matches!(ctx.load::<u8>(p.l4 as usize), Ok(130..=137) | Ok(143))
}

/// An IPv6 link-local or the unspecified address (what neighbour discovery may come from).
#[inline(always)]
fn link_scope(a: &[u8; 16]) -> bool {
    (a[0] == 0xfe && (a[1] & 0xc0) == 0x80) || same(a, &[0; 16])
}

/// Whether `addr` is the pod's own address of its family.
#[inline(always)]
fn own(pod: &PodValue, addr: &[u8; 16], v6: bool) -> bool {
    if v6 {
        pod.flags & pol::HAS_V6 != 0 && same(addr, &pod.addr6)
    } else {
        pod.flags & pol::HAS_V4 != 0 && same(addr, &pod.addr4)
    }
}

/// What `icmp_related` says of an ICMP message that is no error.
const NOT_ERROR: i32 = -3000;

/// An ICMP error passes when the packet it quotes belongs to a tracked flow of this pod (iptables' RELATED):
/// going out (`dir` EGRESS), the quoted packet came in, as a new flow the pod accepted or a reply to one it sent;
/// coming in, the other way round. Other errors are dropped as denied.
#[inline(never)]
fn icmp_related(skb: *mut __sk_buff, s: &mut Scratch, dir: u8) -> i32 {
    let ctx = &TcContext::new(skb);
    let v6 = s.pkt.v6 != 0;
    let l4 = s.pkt.l4 as usize;
    let icmp = if v6 { ICMPV6 } else { ICMP };
    if s.pkt.proto != icmp {
        return NOT_ERROR;
    }
    let Some((iproto, il4, isrc, idst)) = quoted(ctx, l4, v6) else { return NOT_ERROR };
    let denied = if dir == EGRESS { stats::POLICY_DENIED_EGRESS } else { stats::POLICY_DENIED_INGRESS };
    if load_addr(ctx, isrc, v6, &mut s.key.saddr).is_none() || load_addr(ctx, idst, v6, &mut s.key.daddr).is_none() {
        count(denied);
        return SHOT;
    }
    let (sport, dport) = if translated(iproto) {
        let (Ok(a), Ok(b)) = (ctx.load::<u16>(il4), ctx.load::<u16>(il4 + 2)) else { return SHOT };
        (a, b)
    } else {
        (0, 0)
    };
    s.key.sport = sport;
    s.key.dport = dport;
    s.key.proto = iproto;
    s.key._pad = [0; 2];
    s.key.dir = if dir == EGRESS { INGRESS } else { EGRESS };
    // SAFETY: only whether the key is there.
    if unsafe { POLICY_CT.get(&s.key) }.is_some() {
        return NEXT;
    }
    let k = s.key;
    s.key = PolicyFlowKey {
        saddr: k.daddr,
        daddr: k.saddr,
        sport: k.dport,
        dport: k.sport,
        proto: k.proto,
        dir,
        _pad: [0; 2],
    };
    // SAFETY: as above.
    if unsafe { POLICY_CT.get(&s.key) }.is_some() {
        return NEXT;
    }
    count(denied);
    SHOT
}

#[inline(always)]
fn host(addr: &[u8; 16]) -> bool {
    // SAFETY: only whether the key is there.
    unsafe { HOST_ADDRS.get(addr) }.is_some()
}

/// Whether the flow `s.key` (with its `dir`) is tracked and alive; refreshes it.
#[inline(always)]
fn tracked(s: &mut Scratch, now: u64) -> bool {
    let Some(v) = POLICY_CT.get_ptr_mut(&s.key) else { return false };
    // SAFETY: a value of our own map; a racing writer can only write the same kind of data.
    let v = unsafe { &mut *v };
    let secs = if s.key.proto == TCP && v.flags & pol::CLOSING == 0 {
        ebpf_maps::POLICY_CT_TCP_SECS
    } else {
        ebpf_maps::POLICY_CT_OTHER_SECS
    };
    if now.wrapping_sub(v.last_ns) >= secs * 1_000_000_000 {
        return false;
    }
    // Written at most once a second: a write per packet would bounce the entry's cache line between CPUs.
    if now.wrapping_sub(v.last_ns) > 1_000_000_000 {
        v.last_ns = now;
    }
    if ending(&s.pkt) {
        v.flags |= pol::CLOSING;
    }
    true
}

/// The flow key of the packet (`reply`: of the flow it answers) for direction `dir`.
#[inline(always)]
fn flow_key(s: &mut Scratch, dir: u8, reply: bool) {
    let p = &s.pkt;
    s.key = if reply {
        PolicyFlowKey {
            saddr: p.daddr,
            daddr: p.saddr,
            sport: p.dport,
            dport: p.sport,
            proto: p.proto,
            dir,
            _pad: [0; 2],
        }
    } else {
        PolicyFlowKey {
            saddr: p.saddr,
            daddr: p.daddr,
            sport: p.sport,
            dport: p.dport,
            proto: p.proto,
            dir,
            _pad: [0; 2],
        }
    };
}

/// Whether a rule class of the pod's `group` for `dir` holds `peer` together with the packet's protocol
/// and destination port.
#[inline(never)]
fn allowed(s: &mut Scratch, group: u32, dir: u8, peer_is_src: u8) -> bool {
    let v6 = s.pkt.v6 != 0;
    let family = if v6 { pol::V6 } else { pol::V4 };
    let peer = if peer_is_src != 0 { s.pkt.saddr } else { s.pkt.daddr };
    let bits = if v6 { 128 } else { 32 };
    s.peer = Key::new(pol::PEER_PREFIX + bits, PeerKey { group, dir, family, _pad: [0; 2], addr: peer });
    let peers = POLICY_PEERS.get(&s.peer).copied().unwrap_or(0);
    if peers == 0 {
        return false;
    }
    let (proto, port) = (s.pkt.proto, s.pkt.dport);
    s.port = Key::new(pol::PORT_PROTO_PREFIX + 16, PortKey { group, dir, family, proto, _pad: 0, port, _pad2: [0; 2] });
    let ports = POLICY_PORTS.get(&s.port).copied().unwrap_or(0);
    if peers & ports != 0 {
        return true;
    }
    s.named = NamedKey { port: s.port.data, addr: peer };
    // SAFETY: copied at once.
    let named = unsafe { POLICY_NAMED.get(&s.named) }.copied().unwrap_or(0);
    peers & named != 0
}

/// A packet `parse` could not read: not IP (ARP: not policy's), or an IPv4 fragment (its ports are in the first
/// one only) or a malformed IP packet. Its source must still be the pod's own; beyond that it passes only where
/// the pod is not isolated.
#[inline(never)]
fn unparsed(skb: *mut __sk_buff, s: &mut Scratch, dir: u8) -> i32 {
    let ctx = &TcContext::new(skb);
    let Ok(eth) = ctx.load::<u16>(12) else { return NEXT };
    let v6 = match u16::from_be(eth) {
        ETH_P_IP => false,
        ETH_P_IPV6 => true,
        _ => return NEXT,
    };
    if dir == EGRESS {
        let off = if v6 { V6_SADDR } else { V4_SADDR };
        if load_addr(ctx, off, v6, &mut s.pkt.saddr).is_none() || !own(&s.pod, &s.pkt.saddr, v6) {
            count(stats::POLICY_SPOOFED);
            return SHOT;
        }
    }
    if s.pod.flags & pol::isolated(dir, v6) == 0 {
        return NEXT;
    }
    count(if dir == EGRESS { stats::POLICY_DENIED_EGRESS } else { stats::POLICY_DENIED_INGRESS });
    SHOT
}

/// The decision for a packet the pod sends (`dir` EGRESS, on the veth's ingress) or receives (INGRESS).
#[inline(always)]
fn decide(ctx: &TcContext, s: &mut Scratch, dir: u8) -> i32 {
    if parse(ctx, &mut s.pkt).is_none() {
        return unparsed(ctx.skb.skb, s, dir);
    }
    let v6 = s.pkt.v6 != 0;
    if neighbour_discovery(ctx, &s.pkt) {
        // From the pod: with its own address, a link-local or the unspecified one (duplicate address detection).
        if dir == EGRESS && !own(&s.pod, &s.pkt.saddr, v6) && !link_scope(&s.pkt.saddr) {
            count(stats::POLICY_SPOOFED);
            return SHOT;
        }
        return NEXT;
    }
    if dir == EGRESS {
        if !own(&s.pod, &s.pkt.saddr, v6) {
            count(stats::POLICY_SPOOFED);
            return SHOT;
        }
        if host(&s.pkt.daddr) {
            return NEXT;
        }
    } else {
        if host(&s.pkt.saddr) {
            return NEXT;
        }
        // Not addressed to the pod (broadcast, multicast, or a frame sent to its MAC address with another pod's
        // address): never recorded, which would let that flow past its real destination's rules; and only where
        // the pod is not isolated.
        if !own(&s.pod, &s.pkt.daddr, v6) {
            if s.pod.flags & pol::isolated(dir, v6) == 0 {
                return NEXT;
            }
            count(stats::POLICY_DENIED_INGRESS);
            return SHOT;
        }
    }
    judge(ctx.skb.skb, s, dir)
}

/// The flow decision for a parsed packet of a flow of `s.pod` in `dir`: tracked, a reply, or allowed by its rules.
#[inline(never)]
fn judge(skb: *mut __sk_buff, s: &mut Scratch, dir: u8) -> i32 {
    s.flow = 0;
    let v6 = s.pkt.v6 != 0;
    if s.pkt.proto == ICMP || s.pkt.proto == ICMPV6 {
        let r = icmp_related(skb, s, dir);
        if r != NOT_ERROR {
            return r;
        }
    }
    let now = now();
    // A SYN opens a connection: decided anew even on a tuple seen before.
    let syn = s.pkt.proto == TCP && s.pkt.tcp_flags & 0x12 == 0x02;
    if !syn {
        flow_key(s, dir, false);
        // A reply: the flow was tracked the other way (the pod accepted it, or sent it).
        let known = tracked(s, now) || {
            flow_key(s, if dir == EGRESS { INGRESS } else { EGRESS }, true);
            tracked(s, now)
        };
        if known {
            s.flow = 1;
            return NEXT;
        }
    }
    let group = if v6 { s.pod.group6 } else { s.pod.group4 };
    if s.pod.flags & pol::isolated(dir, v6) != 0 && !allowed(s, group, dir, (dir == INGRESS) as u8) {
        count(if dir == EGRESS { stats::POLICY_DENIED_EGRESS } else { stats::POLICY_DENIED_INGRESS });
        return SHOT;
    }
    flow_key(s, dir, false);
    let flags = if ending(&s.pkt) { pol::CLOSING } else { 0 };
    let _ = POLICY_CT.insert(&s.key, &PolicyFlowValue { last_ns: now, flags, _pad: 0 }, 0);
    count(stats::POLICY_ALLOWED);
    s.flow = 1;
    NEXT
}

/// A MAC address, as the maps hold it (padded to 8 bytes).
#[inline(always)]
fn mac_at(ctx: &TcContext, off: usize) -> Option<[u8; 8]> {
    let m = ctx.load::<[u8; 6]>(off).ok()?;
    Some([m[0], m[1], m[2], m[3], m[4], m[5], 0, 0])
}

/// After the sender's egress let a flow's packet through: learn the sender's MAC address, and if the packet is
/// for another pod of this node, addressed to its MAC, decide its ingress and hand it over directly.
#[inline(never)]
fn fast_path(skb: *mut __sk_buff, s: &mut Scratch) -> i32 {
    let ctx = &TcContext::new(skb);
    // SAFETY: the context is an __sk_buff for tc programs.
    let from = unsafe { (*skb).ifindex };
    let Some(src) = mac_at(ctx, 6) else { return NEXT };
    // SAFETY: compared at once.
    if unsafe { POD_MACS.get(&from) } != Some(&src) {
        let _ = POD_MACS.insert(&from, &src, 0);
    }
    if s.flow == 0 {
        return NEXT;
    }
    // SAFETY: copied at once.
    let Some(to) = (unsafe { POD_ADDRS.get(&s.pkt.daddr) }).copied() else { return towards_node(skb, s) };
    let Some(dst) = mac_at(ctx, 0) else { return NEXT };
    // SAFETY: compared at once.
    if to == from || unsafe { POD_MACS.get(&to) } != Some(&dst) {
        return NEXT;
    }
    // SAFETY: copied at once.
    let Some(pod) = (unsafe { POLICY_PODS.get(&to) }).copied() else { return NEXT };
    s.pod = pod;
    let r = judge(skb, s, INGRESS);
    if r != NEXT {
        return r;
    }
    count(stats::FAST_PATH);
    // SAFETY: a plain helper call on a veth index of ours.
    unsafe { bpf_redirect_peer(to, 0) as i32 }
}

/// Where `addr` is in the pod network: 1 another node's pods, 0 this node's own subnet, None outside it.
#[inline(always)]
fn pod_network(s: &mut Scratch, addr: [u8; 16]) -> Option<u8> {
    let (family, bits) = if s.pkt.v6 != 0 { (6, 128) } else { (4, 32) };
    s.net = Key::new(32 + bits, NetKey { family, addr });
    POD_NETWORK.get(&s.net).copied()
}

/// A flow's packet for a pod of another node (the pod network, less this node's own subnets): sent out of the
/// device the route takes (the vxlan device, or the underlay for host-gw), the kernel filling in the link-layer
/// header, without the bridge, the host's netfilter and routing.
#[inline(always)]
fn towards_node(skb: *mut __sk_buff, s: &mut Scratch) -> i32 {
    let v6 = s.pkt.v6 != 0;
    if pod_network(s, s.pkt.daddr) != Some(1) {
        return NEXT;
    }
    let rc = fib_lookup(skb, &mut s.fib, v6, s.pkt.proto, &s.pkt.saddr, &s.pkt.daddr);
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        // Too big, unreachable, or anything else: the kernel's path answers as it would.
        return NEXT;
    }
    count(stats::FAST_PATH_OUT);
    // SAFETY: a plain helper call; with no parameters it resolves the route's next hop itself.
    unsafe { bpf_redirect_neigh(s.fib.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

/// Called by the node-port program for a packet from another node to a pod of this one (its address is a local
/// pod's, so no service translation applies): the pod's ingress decided here, and the frame handed straight to
/// the pod with its MAC address, skipping the host's routing, netfilter and bridge.
#[inline(never)]
pub fn to_local_pod(skb: *mut __sk_buff) -> i32 {
    let ctx = &TcContext::new(skb);
    let Some(s) = scratch(2) else { return NEXT };
    if parse(ctx, &mut s.pkt).is_none() || neighbour_discovery(ctx, &s.pkt) || host(&s.pkt.saddr) {
        return NEXT;
    }
    // Only from the pod network, whose replies take the fast path back: traffic from elsewhere (node addresses
    // after a node port's translation, clients outside) needs the node's conntrack to see both directions, or its
    // replies would be masqueraded as new connections leaving the cluster.
    // And only from another node's pods: this node's own subnet arrives by the bridge, never from outside.
    if pod_network(s, s.pkt.saddr) != Some(1) {
        return NEXT;
    }
    // SAFETY: copied at once.
    let Some(to) = (unsafe { POD_ADDRS.get(&s.pkt.daddr) }).copied() else { return NEXT };
    // SAFETY: copied at once.
    let Some(mac) = (unsafe { POD_MACS.get(&to) }).copied() else { return NEXT };
    // SAFETY: copied at once.
    let Some(pod) = (unsafe { POLICY_PODS.get(&to) }).copied() else { return NEXT };
    s.pod = pod;
    let r = judge(skb, s, INGRESS);
    if r != NEXT || s.flow == 0 {
        // Denied; or exempt traffic, left to the kernel's path (the veth's program passes it again).
        return r;
    }
    let dst = [mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]];
    if ctx.store(0, &dst, 0).is_err() {
        return NEXT;
    }
    count(stats::FAST_PATH_IN);
    // SAFETY: a plain helper call on a veth index of ours.
    unsafe { bpf_redirect_peer(to, 0) as i32 }
}

#[classifier]
pub fn tartan_from_pod(ctx: TcContext) -> i32 {
    let Some(s) = scratch(0) else { return NEXT };
    if !pod_of(ctx.skb.skb, s) {
        return NEXT;
    }
    s.flow = 0;
    let r = decide(&ctx, s, EGRESS);
    if r != NEXT {
        return r;
    }
    fast_path(ctx.skb.skb, s)
}

#[classifier]
pub fn tartan_to_pod(ctx: TcContext) -> i32 {
    let Some(s) = scratch(1) else { return NEXT };
    if !pod_of(ctx.skb.skb, s) {
        return NEXT;
    }
    decide(&ctx, s, INGRESS)
}
