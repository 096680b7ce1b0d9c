//! The eBPF dataplane's maps (socket load balancing, and the tc programs for traffic from outside), shared by the
//! eBPF programs (`ebpf/`) and tartan-proxy. Every type is `#[repr(C)]`, made of fixed-width integers with explicit padding (no bool, enum or Option), so that both sides
//! agree on every byte and the verifier sees initialised keys. Addresses are 16 bytes in network order: an IPv4
//! address sits in the first 4 bytes, the rest zero. Ports are in network order, as the kernel hands them over.
#![no_std]

/// Pin names under the proxy's `--bpf-root` (maps) and its `links/` directory (program links).
pub mod names {
    pub const SERVICES: &str = "TARTAN_SVC";
    pub const REVERSE: &str = "TARTAN_REV";
    pub const AFFINITY: &str = "TARTAN_AFF";
    pub const STATS: &str = "TARTAN_STATS";
    pub const CONNTRACK: &str = "TARTAN_CT";
    pub const NAT: &str = "TARTAN_NAT";
    pub const AFFINITY_EXT: &str = "TARTAN_AFF_EXT";
    pub const IFADDR: &str = "TARTAN_IFADDR";
    /// The programs, in the order they are attached; each is also the name of its pinned link.
    pub const PROGRAMS: [&str; 8] = [
        "tartan_connect4",
        "tartan_connect6",
        "tartan_sendmsg4",
        "tartan_sendmsg6",
        "tartan_recvmsg4",
        "tartan_recvmsg6",
        "tartan_getpeername4",
        "tartan_getpeername6",
    ];
    /// The tc programs, attached to every interface that carries a node address: `<name>@<interface>` names their
    /// pinned links.
    pub const TC_INGRESS: &str = "tartan_from_outside";
    pub const TC_EGRESS: &str = "tartan_to_outside";
    /// NetworkPolicy: the pods on this node (by host-side veth), their allowed peers, ports and named ports, and
    /// the flows they allowed.
    pub const POLICY_PODS: &str = "TARTAN_POL_POD";
    pub const POLICY_PEERS: &str = "TARTAN_POL_PEER";
    pub const POLICY_PORTS: &str = "TARTAN_POL_PORT";
    pub const POLICY_NAMED: &str = "TARTAN_POL_NAMED";
    pub const POLICY_CT: &str = "TARTAN_POL_CT";
    /// The node's own addresses: its traffic to its pods is not subject to policy.
    pub const HOST_ADDRS: &str = "TARTAN_HOST";
    /// The fast path between pods of this node: pod address -> veth index (the proxy's), and veth index -> the
    /// pod's MAC address (learned by the programs).
    pub const POD_ADDRS: &str = "TARTAN_POD_ADDR";
    pub const POD_MACS: &str = "TARTAN_POD_MAC";
    /// The pod network: its ranges (1) and this node's own subnets within them (0). Traffic to a pod of another
    /// node takes the fast path out.
    pub const POD_NETWORK: &str = "TARTAN_PODNET";
    /// The tc programs on every pod's host-side veth: its ingress is the pod's egress and the other way round.
    pub const TC_FROM_POD: &str = "tartan_from_pod";
    pub const TC_TO_POD: &str = "tartan_to_pod";
}

/// Map sizes. SERVICES holds a frontend slot plus one slot per backend for every (address, port, protocol): a
/// million covers 100 000 services of 5 endpoints with room. It is allocated as entries come (no prealloc).
pub const SERVICES_MAX: u32 = 1 << 20;
/// Connections (and unconnected UDP peers) whose reply addresses are translated back, least recently used first out.
pub const REVERSE_MAX: u32 = 1 << 17;
pub const AFFINITY_MAX: u32 = 1 << 16;
/// Default sizes of the connection-tracking and NAT maps (tartan-proxy's --conntrack-max sets both at load time):
/// one entry per flow from outside in each. At 88 bytes of key and value each (and the kernel's per-entry
/// overhead), 2^18 flows take about 60 MiB.
pub const CONNTRACK_MAX: u32 = 1 << 18;
/// Interfaces with a node address, per family (the address flows to remote endpoints are translated to).
pub const IFADDR_MAX: u32 = 256;
/// Pods on this node, and the node's addresses.
pub const POLICY_PODS_MAX: u32 = 4096;
pub const HOST_ADDRS_MAX: u32 = 1024;
/// Prefixes of allowed peers and port ranges (per pod, direction and family), and named-port members.
pub const POLICY_RULES_MAX: u32 = 1 << 18;
/// Flows pods sent or accepted (one entry per direction of each, least recently used out first).
pub const POLICY_CT_MAX: u32 = 1 << 18;
/// A policy flow without a packet for this long is forgotten (its next packet is decided again): TCP as the
/// kernel's established timeout, other protocols as its UDP stream timeout.
pub const POLICY_CT_TCP_SECS: u64 = 432_000;
pub const POLICY_CT_OTHER_SECS: u64 = 120;

/// How long a flow from outside keeps its backend without a packet (Cilium's defaults: TCP 6 h, the rest 60 s).
pub const CT_TCP_SECS: u64 = 21_600;
pub const CT_OTHER_SECS: u64 = 60;
/// ... and a TCP flow once a FIN or RST was seen: as long as the server's TIME_WAIT (60 s), so that its NAT port is
/// not given to a new connection the server would take for an old duplicate.
pub const CT_CLOSING_SECS: u64 = 60;
/// NAT ports for flows sent to remote endpoints: below the kernel's default ephemeral range (32768-60999), which
/// the node's own connections take their ports from, and above the ports services commonly listen on. A port is
/// unique per (backend address and port, node address): 16 384 flows to one backend at once, and new ones at up to
/// 270 a second when each closes (their ports wait CT_CLOSING_SECS).
pub const NAT_PORT_MIN: u16 = 16_384;
pub const NAT_PORT_COUNT: u16 = 16_384;

/// IP protocol numbers the programs translate (a frontend key's `proto`).
pub mod proto {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const SCTP: u8 = 132;

    /// Whether the programs serve this protocol.
    pub const fn translated(p: u8) -> bool {
        p == TCP || p == UDP || p == SCTP
    }
}

/// Frontend flags (slot 0's `flags`).
pub mod flags {
    /// sessionAffinity ClientIP: `affinity_secs` holds the timeout.
    pub const AFFINITY: u16 = 1;
    /// externalTrafficPolicy Local: traffic from outside goes to slots 1..=`local_count` only (local ones first).
    pub const EXTERNAL_LOCAL: u16 = 2;
    /// Without a usable endpoint, traffic from outside is dropped, not refused (eTP Local with remote endpoints).
    pub const DROP_EMPTY: u16 = 4;
    /// The frontend is a node address (a node port): the node's own stack refuses what has no endpoint.
    pub const NODE_ADDR: u16 = 8;
    /// On a backend slot: the endpoint is on this node (reached without source translation).
    pub const LOCAL: u16 = 16;
}

/// Conntrack and NAT entry flags.
pub mod ct {
    /// The source was translated to a node address (remote endpoint): replies come back to the node and are
    /// redirected to the client by the program; without it the kernel forwards both ways and the reply is only
    /// given its frontend address on its way out.
    pub const SNAT: u16 = 1;
    /// A TCP FIN or RST was seen: the flow ends within CT_CLOSING_SECS.
    pub const CLOSING: u16 = 2;
}

/// NetworkPolicy in the maps. A pod is known by the index of its host-side veth, and points at its rule group
/// (per family); a group's allow rules are grouped in up to [`policy::CLASSES`] classes (rules with the same ports are one class: their peers are unioned), each a bit
/// of a u64. A packet is allowed when a class holds both its peer (TARTAN_POL_PEER, longest prefix) and its
/// protocol and port (TARTAN_POL_PORT, longest prefix), or its peer, protocol and port as a named-port member of
/// the class (TARTAN_POL_NAMED, for egress named ports).
pub mod policy {
    /// Directions, as the pod sees them.
    pub const INGRESS: u8 = 0;
    pub const EGRESS: u8 = 1;
    /// Address families in keys.
    pub const V4: u8 = 4;
    pub const V6: u8 = 6;
    /// Classes per pod, direction and family: the bits of a u64.
    pub const CLASSES: usize = 64;
    /// The bits of a peer key before its address, and of a port key before its protocol and port.
    pub const PEER_PREFIX: u32 = 64;
    pub const PORT_ANY_PREFIX: u32 = 48;
    pub const PORT_PROTO_PREFIX: u32 = 64;
    /// A pod's flags: which addresses it has, and in which direction and family it is isolated.
    pub const HAS_V4: u32 = 1;
    pub const HAS_V6: u32 = 2;
    pub const ISOLATED_IN4: u32 = 4;
    pub const ISOLATED_OUT4: u32 = 8;
    pub const ISOLATED_IN6: u32 = 16;
    pub const ISOLATED_OUT6: u32 = 32;

    /// The isolation flag of a direction and family.
    pub const fn isolated(dir: u8, v6: bool) -> u32 {
        match (dir, v6) {
            (INGRESS, false) => ISOLATED_IN4,
            (INGRESS, true) => ISOLATED_IN6,
            (_, false) => ISOLATED_OUT4,
            (_, true) => ISOLATED_OUT6,
        }
    }

    /// A tracked flow's flags: a TCP FIN or RST was seen.
    pub const CLOSING: u32 = 1;
}

/// STATS (per CPU) indexes.
pub mod stats {
    /// Connections and datagrams translated to a backend.
    pub const TRANSLATED: u32 = 0;
    /// Refused: the service had no usable endpoint.
    pub const REFUSED: u32 = 1;
    /// Replies translated back to the service address.
    pub const REVERSED: u32 = 2;
    /// tc: packets from outside sent to a backend, replies translated back, ICMP errors translated.
    pub const TC_FORWARD: u32 = 3;
    pub const TC_REPLY: u32 = 4;
    pub const TC_ICMP: u32 = 5;
    /// tc: dropped (eTP Local without local endpoint, no route, no NAT port, too big for the path).
    pub const TC_DROP: u32 = 6;
    /// tc: refused (no endpoint at all).
    pub const TC_REFUSED: u32 = 7;
    /// NetworkPolicy: packets a pod sent with another source address, and new flows its policy does not allow.
    pub const POLICY_SPOOFED: u32 = 8;
    pub const POLICY_DENIED_EGRESS: u32 = 9;
    pub const POLICY_DENIED_INGRESS: u32 = 10;
    /// ... and new flows it allows (tracked from then on).
    pub const POLICY_ALLOWED: u32 = 11;
    /// Packets handed from one pod of this node to another directly, from a pod straight to the device towards
    /// another node, and from another node straight to a pod.
    pub const FAST_PATH: u32 = 12;
    pub const FAST_PATH_OUT: u32 = 13;
    pub const FAST_PATH_IN: u32 = 14;
    pub const COUNT: u32 = 15;

    /// Each counter's name, by index (a metric label).
    pub const NAMES: [&str; COUNT as usize] = [
        "socket_translated",
        "socket_refused",
        "socket_reversed",
        "outside_forwarded",
        "outside_reply",
        "outside_icmp",
        "outside_dropped",
        "outside_refused",
        "policy_spoofed",
        "policy_denied_egress",
        "policy_denied_ingress",
        "policy_allowed",
        "fast_path_local",
        "fast_path_out",
        "fast_path_in",
    ];
}

/// A service frontend (address, port, protocol) and a slot: 0 is the frontend itself, 1..=count its backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub slot: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Slot 0: `count` backends (`local_count` of them on this node, in the first slots), `flags`, `affinity_secs`.
/// Slots 1..=count: a backend's `addr`, `port` and flags ([`flags::LOCAL`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceValue {
    pub addr: [u8; 16],
    pub port: u16,
    pub count: u16,
    pub flags: u16,
    pub local_count: u16,
    pub affinity_secs: u32,
}

/// A socket (its cookie) and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReverseKey {
    pub cookie: u64,
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 6],
}

/// The service address and port that socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReverseValue {
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 6],
}

/// A client (its network namespace: a pod, or the node) and a frontend, for sessionAffinity ClientIP. Within a
/// node every client address belongs to one namespace, so the namespace stands for the client address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub netns: u64,
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
    pub _pad: [u8; 5],
}

/// The backend chosen (its slot, checked against the service map on use) and when it was last used.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    pub addr: [u8; 16],
    pub port: u16,
    pub slot: u16,
    pub _pad: u32,
    pub last_ns: u64,
}

/// A flow as its packets carry it (addresses and ports in network order): the key of the conntrack map (a flow
/// from outside as it arrives) and of the NAT map (its replies as they arrive).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Where a flow from outside goes: its backend, and (with [`ct::SNAT`]) the node address and port it comes from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtValue {
    pub backend: [u8; 16],
    pub nat_addr: [u8; 16],
    pub backend_port: u16,
    pub nat_port: u16,
    pub flags: u16,
    pub _pad: u16,
    /// When a packet of the flow was last seen (bpf_ktime_get_ns).
    pub last_ns: u64,
}

/// What a reply must carry: the frontend as source, the client as destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NatValue {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub flags: u16,
    pub _pad: u16,
    /// When a packet of the flow was last seen: an idle entry's NAT port may be claimed again.
    pub last_ns: u64,
}

/// A client outside the node and a frontend, for sessionAffinity ClientIP of traffic from outside.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExtAffinityKey {
    pub client: [u8; 16],
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
    pub _pad: [u8; 5],
}

/// An interface (its index) and a family (4 or 6): the node address flows to remote endpoints leave with.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IfAddrKey {
    pub ifindex: u32,
    pub family: u32,
}

/// A pod on this node (the key: its host-side veth's index): its addresses (of the families in `flags`), its
/// isolation ([`policy`] flags), and the rule group of each family. Pods with the same rules share a group, so
/// that 200 pods of one Deployment hold their rules once.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PodValue {
    pub addr4: [u8; 16],
    pub addr6: [u8; 16],
    pub flags: u32,
    pub group4: u32,
    pub group6: u32,
    pub _pad: u32,
}

/// A peer prefix of a rule group's direction and family (an LPM key's data: the prefix length counts from
/// `group`, so every entry covers the first [`policy::PEER_PREFIX`] bits exactly).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey {
    pub group: u32,
    pub dir: u8,
    pub family: u8,
    pub _pad: [u8; 2],
    pub addr: [u8; 16],
}

/// A port prefix of a rule group's direction and family: [`policy::PORT_ANY_PREFIX`] bits cover every protocol,
/// [`policy::PORT_PROTO_PREFIX`] every port of `proto`, and up to 16 more a range of `port` (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    pub group: u32,
    pub dir: u8,
    pub family: u8,
    pub proto: u8,
    pub _pad: u8,
    pub port: u16,
    pub _pad2: [u8; 2],
}

/// A named-port member (address, protocol, port) of a rule group's direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamedKey {
    /// The group, direction, family, protocol and port (all of them: no prefix here).
    pub port: PortKey,
    pub addr: [u8; 16],
}

/// An address prefix of one family (an LPM key's data: the prefix length counts from `family`, 32 bits of it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetKey {
    pub family: u32,
    pub addr: [u8; 16],
}

/// A flow a pod sent ([`policy::EGRESS`]) or accepted ([`policy::INGRESS`]), as its first packet carried it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyFlowKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
    pub _pad: [u8; 2],
}

/// When a tracked flow was last seen, and its [`policy::CLOSING`] flag.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyFlowValue {
    pub last_ns: u64,
    pub flags: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain old data: repr(C), integers and byte arrays only, every padding byte an explicit field.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for ReverseKey {}
    unsafe impl aya::Pod for ReverseValue {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for NatValue {}
    unsafe impl aya::Pod for ExtAffinityKey {}
    unsafe impl aya::Pod for IfAddrKey {}
    unsafe impl aya::Pod for PodValue {}
    unsafe impl aya::Pod for NetKey {}
    unsafe impl aya::Pod for PeerKey {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for NamedKey {}
    unsafe impl aya::Pod for PolicyFlowKey {}
    unsafe impl aya::Pod for PolicyFlowValue {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn sizes_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 24);
        assert_eq!(size_of::<ServiceValue>(), 28);
        assert_eq!(size_of::<ReverseKey>(), 32);
        assert_eq!(size_of::<ReverseValue>(), 24);
        assert_eq!(size_of::<AffinityKey>(), 32);
        assert_eq!(size_of::<AffinityValue>(), 32);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<CtValue>(), 48);
        assert_eq!(size_of::<NatValue>(), 48);
        assert_eq!(size_of::<ExtAffinityKey>(), 40);
        assert_eq!(size_of::<IfAddrKey>(), 8);
        assert_eq!(size_of::<PodValue>(), 48);
        assert_eq!(size_of::<NetKey>(), 20);
        assert_eq!(size_of::<PeerKey>(), 24);
        assert_eq!(size_of::<PortKey>(), 12);
        assert_eq!(size_of::<NamedKey>(), 28);
        assert_eq!(size_of::<PolicyFlowKey>(), 40);
        assert_eq!(size_of::<PolicyFlowValue>(), 16);
    }
}
