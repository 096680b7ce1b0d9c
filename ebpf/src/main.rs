//! Tartan's eBPF programs, in one object so that they share their maps: socket load balancing for the node's own
//! clients ([`sock_lb`], cgroup/sock_addr), the translation of traffic from outside the node ([`nodeport`], tc)
//! and NetworkPolicy at each pod's veth ([`policy`], tc).
#![no_std]
#![no_main]

mod nodeport;
mod policy;
mod sock_lb;

use aya_ebpf::bindings::BPF_F_NO_PREALLOC;
use aya_ebpf::macros::map;
use aya_ebpf::maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray};
use ebpf_maps::{
    stats, AffinityKey, AffinityValue, CtValue, ExtAffinityKey, FlowKey, IfAddrKey, NamedKey, NatValue, NetKey,
    PeerKey, PodValue, PolicyFlowKey, PolicyFlowValue, PortKey, ReverseKey, ReverseValue, ServiceKey, ServiceValue,
    AFFINITY_MAX, CONNTRACK_MAX, HOST_ADDRS_MAX, IFADDR_MAX, POLICY_CT_MAX, POLICY_PODS_MAX, POLICY_RULES_MAX,
    REVERSE_MAX, SERVICES_MAX,
};

#[map(name = "TARTAN_SVC")]
static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(SERVICES_MAX, BPF_F_NO_PREALLOC);

// One LRU list for all CPUs: per-CPU lists would give each CPU only its share of the entries, and evict a
// long-lived connection's entry while others sit unused.
#[map(name = "TARTAN_REV")]
static REVERSE: LruHashMap<ReverseKey, ReverseValue> = LruHashMap::pinned(REVERSE_MAX, 0);

#[map(name = "TARTAN_AFF")]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(AFFINITY_MAX, 0);

#[map(name = "TARTAN_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stats::COUNT, 0);

// Flows from outside (sized by tartan-proxy's --conntrack-max at load time): where each goes, and how its replies
// are translated back.
#[map(name = "TARTAN_CT")]
static CONNTRACK: LruHashMap<FlowKey, CtValue> = LruHashMap::pinned(CONNTRACK_MAX, 0);

#[map(name = "TARTAN_NAT")]
static NAT: LruHashMap<FlowKey, NatValue> = LruHashMap::pinned(CONNTRACK_MAX, 0);

#[map(name = "TARTAN_AFF_EXT")]
static AFFINITY_EXT: LruHashMap<ExtAffinityKey, AffinityValue> = LruHashMap::pinned(AFFINITY_MAX, 0);

#[map(name = "TARTAN_IFADDR")]
static IFADDR: HashMap<IfAddrKey, [u8; 16]> = HashMap::pinned(IFADDR_MAX, 0);

#[map(name = "TARTAN_POL_POD")]
static POLICY_PODS: HashMap<u32, PodValue> = HashMap::pinned(POLICY_PODS_MAX, 0);

#[map(name = "TARTAN_POL_PEER")]
static POLICY_PEERS: LpmTrie<PeerKey, u64> = LpmTrie::pinned(POLICY_RULES_MAX, 0);

#[map(name = "TARTAN_POL_PORT")]
static POLICY_PORTS: LpmTrie<PortKey, u64> = LpmTrie::pinned(POLICY_RULES_MAX, 0);

#[map(name = "TARTAN_POL_NAMED")]
static POLICY_NAMED: HashMap<NamedKey, u64> = HashMap::pinned(POLICY_RULES_MAX, BPF_F_NO_PREALLOC);

#[map(name = "TARTAN_POL_CT")]
static POLICY_CT: LruHashMap<PolicyFlowKey, PolicyFlowValue> = LruHashMap::pinned(POLICY_CT_MAX, 0);

// Pod address -> its veth (written by the proxy), and veth -> the pod's MAC address (learned by the programs):
// the fast path between pods of this node.
#[map(name = "TARTAN_POD_ADDR")]
static POD_ADDRS: HashMap<[u8; 16], u32> = HashMap::pinned(POLICY_PODS_MAX * 2, 0);

#[map(name = "TARTAN_POD_MAC")]
static POD_MACS: LruHashMap<u32, [u8; 8]> = LruHashMap::pinned(POLICY_PODS_MAX, 0);

#[map(name = "TARTAN_PODNET")]
static POD_NETWORK: LpmTrie<NetKey, u8> = LpmTrie::pinned(256, 0);

#[map(name = "TARTAN_HOST")]
static HOST_ADDRS: HashMap<[u8; 16], u8> = HashMap::pinned(HOST_ADDRS_MAX, 0);

#[inline(always)]
fn count(index: u32) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot of our own map; no other CPU writes it.
        unsafe { *p += 1 };
    }
}

/// Byte by byte: wider comparisons become 128-bit operations BPF has no instructions for.
#[inline(always)]
fn same(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < 16 {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
