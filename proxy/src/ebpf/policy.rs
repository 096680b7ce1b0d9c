//! NetworkPolicy as map entries for the tc programs on the pods' veths (`ebpf/src/policy.rs`; the layout is
//! described in [`ebpf_maps::policy`]).
//!
//! Pods with the same rules (per family) share a rule group, numbered by a hash of the rules, so that a label
//! change that moves no pod between groups changes set members only, and one that does adds the new group's
//! entries before the pod points at it. Within a group and direction, rules with the same ports form one class
//! (their peers are unioned): a class is a bit. Peer prefixes (selector addresses, ipBlocks and their exceptions)
//! and port prefixes (protocols, ranges split into prefixes) are flattened for longest-prefix lookup: each prefix
//! written carries every class that holds all of it, so the longest match answers alone.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ebpf_maps::policy::{self as pol, CLASSES, EGRESS, INGRESS};
use ebpf_maps::{NamedKey, PeerKey, PodValue, PortKey};
use ipnet::IpNet;
use proxy_state::policy::{PodPolicy, PortMatch, Rule};
use proxy_state::{PeerSet, PolicyModel, SetRef};

/// A prefix of a key's bits, left-aligned in a u128.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Pfx {
    len: u32,
    bits: u128,
}

impl Pfx {
    fn new(bits: u128, len: u32) -> Pfx {
        let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
        Pfx { len, bits: bits & mask }
    }

    /// Whether `self` holds all of `other`.
    fn holds(&self, other: &Pfx) -> bool {
        self.len <= other.len && Pfx::new(other.bits, self.len).bits == self.bits
    }
}

fn addr_pfx(net: IpNet) -> Pfx {
    let bits = match net.addr() {
        IpAddr::V4(a) => u128::from(u32::from(a)) << 96,
        IpAddr::V6(a) => u128::from(a),
    };
    Pfx::new(bits, u32::from(net.prefix_len()))
}

fn host_pfx(ip: IpAddr) -> Pfx {
    addr_pfx(IpNet::from(ip))
}

/// Protocol and port as 24 bits (protocol, a zero byte, port), left-aligned: what follows the group, direction and
/// family in a port key.
fn port_pfx(proto: u8, port: u16, port_bits: u32) -> Pfx {
    Pfx::new((u128::from(proto) << 120) | (u128::from(port) << 96), 16 + port_bits)
}

/// The prefixes covering ports `a..=b`.
fn range_prefixes(a: u16, b: u16) -> Vec<(u16, u32)> {
    let (mut lo, hi) = (u32::from(a), u32::from(b));
    let mut out = Vec::new();
    while lo <= hi {
        // The largest aligned block starting at `lo` that does not pass `hi`.
        let mut size = if lo == 0 { 1 << 16 } else { 1u32 << lo.trailing_zeros().min(16) };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, 16 - size.trailing_zeros()));
        lo += size;
    }
    out
}

/// Flattens class prefixes for longest-prefix lookup. `member(class, p)`: whether the class holds all of the
/// region `p` leaves to itself (no longer prefix of the list inside it decides otherwise).
fn flatten(prefixes: BTreeSet<Pfx>, classes: usize, member: impl Fn(usize, &Pfx) -> bool) -> BTreeMap<Pfx, u64> {
    prefixes
        .into_iter()
        .map(|p| {
            let bits = (0..classes).filter(|c| member(*c, &p)).fold(0u64, |b, c| b | (1 << c));
            (p, bits)
        })
        .collect()
}

/// The map entries of the whole model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entries {
    pub pods: BTreeMap<u32, PodValue>,
    /// (prefix length, key) -> classes.
    pub peers: BTreeMap<(u32, PeerKey), u64>,
    pub ports: BTreeMap<(u32, PortKey), u64>,
    pub named: BTreeMap<NamedKey, u64>,
    /// Pods whose rules in one direction need more classes than a u64 has bits: that direction allows nothing
    /// for them (fail closed), and the proxy says so.
    pub too_many_classes: Vec<String>,
}

impl Entries {
    pub fn len(&self) -> usize {
        self.pods.len() + self.peers.len() + self.ports.len() + self.named.len()
    }
}

/// The classes of one direction: rules grouped by their ports; per class, its peers (None: anyone).
fn classes(rules: &[Rule]) -> Vec<(Option<Vec<PortMatch>>, Option<BTreeSet<SetRef>>)> {
    let mut by_ports: BTreeMap<Option<Vec<PortMatch>>, Option<BTreeSet<SetRef>>> = BTreeMap::new();
    for r in rules {
        let ports = r.ports.clone().map(|mut v| {
            v.sort();
            v.dedup();
            v
        });
        let peers = by_ports.entry(ports).or_insert_with(|| Some(BTreeSet::new()));
        match (&r.peers, peers.as_mut()) {
            (None, _) => *peers = None,
            (Some(sets), Some(all)) => all.extend(sets.iter().cloned()),
            (Some(_), None) => {}
        }
    }
    by_ports.into_iter().collect()
}

/// Whether `set` holds the region of prefix `p`.
fn set_holds(set: &PeerSet, p: &Pfx, v6: bool) -> bool {
    let max = if v6 { 128 } else { 32 };
    match set {
        PeerSet::Addresses(a) => p.len == max && a.iter().any(|ip| ip.is_ipv6() == v6 && host_pfx(*ip) == *p),
        PeerSet::Block { cidr, except } => {
            cidr.addr().is_ipv6() == v6
                && addr_pfx(*cidr).holds(p)
                && !except.iter().any(|x| x.addr().is_ipv6() == v6 && addr_pfx(*x).holds(p))
        }
        PeerSet::AddrPorts(_) => false,
    }
}

/// The prefixes a set's membership changes at.
fn set_prefixes(set: &PeerSet, v6: bool, out: &mut BTreeSet<Pfx>) {
    match set {
        PeerSet::Addresses(a) => out.extend(a.iter().filter(|ip| ip.is_ipv6() == v6).map(|ip| host_pfx(*ip))),
        PeerSet::Block { cidr, except } => {
            out.extend(std::iter::once(cidr).chain(except).filter(|n| n.addr().is_ipv6() == v6).map(|n| addr_pfx(*n)))
        }
        PeerSet::AddrPorts(_) => {}
    }
}

fn addr_bytes(bits: u128, v6: bool) -> [u8; 16] {
    let b = bits.to_be_bytes();
    if v6 {
        b
    } else {
        let mut a = [0; 16];
        a[..4].copy_from_slice(&b[..4]);
        a
    }
}

/// One direction of one group: its classes as peer, port and named-port entries. False: too many classes.
fn direction(
    sets: &BTreeMap<SetRef, PeerSet>,
    group: u32,
    dir: u8,
    v6: bool,
    rules: &[Rule],
    out: &mut Entries,
) -> bool {
    let classes = classes(rules);
    if classes.len() > CLASSES {
        return false;
    }
    let family = if v6 { pol::V6 } else { pol::V4 };
    let empty = PeerSet::Addresses(BTreeSet::new());
    let set = |r: &SetRef| sets.get(r).unwrap_or(&empty);
    // Peers.
    let mut prefixes = BTreeSet::new();
    for (_, peers) in &classes {
        match peers {
            None => {
                prefixes.insert(Pfx::new(0, 0));
            }
            Some(refs) => refs.iter().for_each(|r| set_prefixes(set(r), v6, &mut prefixes)),
        }
    }
    let peers = flatten(prefixes, classes.len(), |c, p| match &classes[c].1 {
        None => true,
        Some(refs) => refs.iter().any(|r| set_holds(set(r), p, v6)),
    });
    for (p, bits) in peers {
        let key = PeerKey { group, dir, family, _pad: [0; 2], addr: addr_bytes(p.bits, v6) };
        out.peers.insert((pol::PEER_PREFIX + p.len, key), bits);
    }
    // Ports: every entry only adds classes, so a prefix carries those of every entry holding it.
    let mut port_entries: Vec<(Pfx, usize)> = Vec::new();
    for (c, (ports, _)) in classes.iter().enumerate() {
        match ports {
            None => port_entries.push((Pfx::new(0, 0), c)),
            Some(ms) => {
                for m in ms {
                    match m {
                        PortMatch::Proto(p) => port_entries.push((port_pfx(p.number(), 0, 0), c)),
                        PortMatch::Range(p, a, b) => {
                            for (start, bits) in range_prefixes(*a, *b) {
                                port_entries.push((port_pfx(p.number(), start, bits), c));
                            }
                        }
                        PortMatch::Named(p, r) => {
                            if let PeerSet::AddrPorts(members) = set(r) {
                                for (ip, proto, port) in
                                    members.iter().filter(|(ip, pr, _)| ip.is_ipv6() == v6 && pr == p)
                                {
                                    let port = PortKey {
                                        group,
                                        dir,
                                        family,
                                        proto: proto.number(),
                                        _pad: 0,
                                        port: port.to_be(),
                                        _pad2: [0; 2],
                                    };
                                    let key = NamedKey { port, addr: crate::ebpf::frontends::addr_bytes(*ip) };
                                    *out.named.entry(key).or_insert(0) |= 1 << c;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    let all: BTreeSet<Pfx> = port_entries.iter().map(|(p, _)| *p).collect();
    let ports = flatten(all, classes.len(), |c, p| port_entries.iter().any(|(e, ec)| *ec == c && e.holds(p)));
    for (p, bits) in ports {
        let b = p.bits.to_be_bytes();
        let key = PortKey {
            group,
            dir,
            family,
            proto: b[0],
            _pad: 0,
            port: u16::from_be_bytes([b[2], b[3]]).to_be(),
            _pad2: [0; 2],
        };
        // The group, direction and family come first; 16 bits (protocol and the zero byte) of the 24 are
        // "every port of the protocol", 0 "every protocol".
        let len = if p.len == 0 { pol::PORT_ANY_PREFIX } else { pol::PORT_ANY_PREFIX + p.len };
        out.ports.insert((len, key), bits);
    }
    true
}

/// A rule group's number: a hash of the rules of both directions (the family is in every key already).
fn group_hash(p: &PodPolicy) -> u32 {
    let h = node_contract::name_hash(&format!("{:?}/{:?}", p.ingress, p.egress));
    u32::from_str_radix(&h[..8], 16).unwrap_or(0)
}

/// The entries for `model`'s pods whose veth is in `veths` (name -> index).
pub fn entries(model: &PolicyModel, veths: &HashMap<String, u32>) -> Entries {
    let mut out = Entries::default();
    // Groups by rule content; colliding hashes take the next free number.
    let mut groups: BTreeMap<(Option<&Vec<Rule>>, Option<&Vec<Rule>>), u32> = BTreeMap::new();
    let mut taken: BTreeMap<u32, (Option<&Vec<Rule>>, Option<&Vec<Rule>>)> = BTreeMap::new();
    let mut written: BTreeSet<(u32, bool)> = BTreeSet::new();
    for p in &model.pods {
        let Some(ifindex) = p.veth.as_ref().and_then(|v| veths.get(v)) else { continue };
        let v6 = p.ip.is_ipv6();
        let content = (p.ingress.as_ref(), p.egress.as_ref());
        let group = *groups.entry(content).or_insert_with(|| {
            let mut g = group_hash(p);
            while taken.get(&g).is_some_and(|c| *c != content) {
                g = g.wrapping_add(1);
            }
            taken.insert(g, content);
            g
        });
        let pod = out.pods.entry(*ifindex).or_insert(PodValue {
            addr4: [0; 16],
            addr6: [0; 16],
            flags: 0,
            group4: 0,
            group6: 0,
            _pad: 0,
        });
        let addr = crate::ebpf::frontends::addr_bytes(p.ip);
        if v6 {
            pod.addr6 = addr;
            pod.group6 = group;
            pod.flags |= pol::HAS_V6;
        } else {
            pod.addr4 = addr;
            pod.group4 = group;
            pod.flags |= pol::HAS_V4;
        }
        for (dir, rules) in [(INGRESS, &p.ingress), (EGRESS, &p.egress)] {
            if rules.is_some() {
                pod.flags |= pol::isolated(dir, v6);
            }
        }
        for (dir, rules) in [(INGRESS, &p.ingress), (EGRESS, &p.egress)] {
            let Some(rules) = rules else { continue };
            if written.contains(&(group, v6)) {
                continue;
            }
            if !direction(&model.sets, group, dir, v6, rules, &mut out) {
                out.too_many_classes.push(p.id.clone());
            }
        }
        written.insert((group, v6));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_state::{Proto, SetKind};

    #[test]
    fn ranges_split_into_aligned_prefixes() {
        assert_eq!(range_prefixes(80, 80), [(80, 16)]);
        assert_eq!(range_prefixes(80, 81), [(80, 15)]);
        assert_eq!(range_prefixes(81, 82), [(81, 16), (82, 16)]);
        assert_eq!(range_prefixes(0, 65535), [(0, 0)]);
        assert_eq!(range_prefixes(1024, 65535).len(), 6);
        // Every port of a range is held by exactly one prefix, and no other port is.
        for (a, b) in [(1, 1000), (30000, 32767), (65535, 65535), (0, 7)] {
            let ps = range_prefixes(a, b);
            for port in [0u16, 1, 7, 8, 999, 1000, 1001, 29999, 30000, 32767, 32768, 65534, 65535] {
                let n = ps.iter().filter(|(s, len)| port_pfx(6, *s, *len).holds(&port_pfx(6, port, 16))).count();
                assert_eq!(n, usize::from(a <= port && port <= b), "{a}-{b} port {port}");
            }
        }
    }

    fn lookup<K: Copy>(m: &BTreeMap<(u32, K), u64>, probe: impl Fn(&(u32, K)) -> bool) -> u64 {
        // The longest matching prefix, as the kernel's LPM trie answers.
        m.iter().filter(|(k, _)| probe(k)).max_by_key(|((len, _), _)| *len).map_or(0, |(_, v)| *v)
    }

    #[test]
    fn peers_flatten_blocks_exceptions_and_addresses_per_class() {
        let sref = |kind, h: &str| SetRef { kind, v6: false, hash: h.into() };
        let block = sref(SetKind::Block, "b");
        let sel = sref(SetKind::Selector, "s");
        let sets: BTreeMap<SetRef, PeerSet> = [
            (
                block.clone(),
                PeerSet::Block { cidr: "10.0.0.0/8".parse().unwrap(), except: ["10.1.0.0/16".parse().unwrap()].into() },
            ),
            (sel.clone(), PeerSet::Addresses(["10.1.2.3".parse().unwrap()].into())),
        ]
        .into();
        // Class 0 (TCP 80): the block. Class 1 (every port): the selector, which lies inside the exception.
        let rules = vec![
            Rule { peers: Some(vec![block]), ports: Some(vec![PortMatch::Range(Proto::Tcp, 80, 80)]) },
            Rule { peers: Some(vec![sel]), ports: None },
        ];
        let mut out = Entries::default();
        assert!(direction(&sets, 7, INGRESS, false, &rules, &mut out));
        let peer = |ip: &str| {
            let a: IpAddr = ip.parse().unwrap();
            let full = host_pfx(a);
            lookup(&out.peers, |(len, k)| {
                k.group == 7 && Pfx::new(u128::from_be_bytes(k.addr), len - pol::PEER_PREFIX).holds(&full)
            })
        };
        // Classes are ordered by ports: None first, then TCP 80.
        let (every, tcp80) = (1u64, 2u64);
        assert_eq!(peer("10.9.9.9"), tcp80);
        assert_eq!(peer("10.1.9.9"), 0, "carved out");
        assert_eq!(peer("10.1.2.3"), every, "the selector's member, inside the exception");
        assert_eq!(peer("192.168.0.1"), 0);
        let port = |proto: u8, p: u16| {
            let full = port_pfx(proto, p, 16);
            lookup(&out.ports, |(len, k)| {
                let b = (u128::from(k.proto) << 120) | (u128::from(u16::from_be(k.port)) << 96);
                let l = if *len == pol::PORT_ANY_PREFIX { 0 } else { len - pol::PORT_ANY_PREFIX };
                Pfx::new(b, l).holds(&full)
            })
        };
        assert_eq!(port(6, 80), every | tcp80);
        assert_eq!(port(6, 81), every);
        assert_eq!(port(17, 80), every);
    }

    #[test]
    fn pods_with_the_same_rules_share_a_group_and_isolation_is_per_direction() {
        let pod = |id: &str, ip: &str, veth: &str, ingress: Option<Vec<Rule>>| PodPolicy {
            id: id.into(),
            ip: ip.parse().unwrap(),
            veth: Some(veth.into()),
            ingress,
            egress: None,
        };
        let deny = Some(vec![]);
        let model = PolicyModel {
            pods: vec![
                pod("x/a", "10.244.1.2", "va", deny.clone()),
                pod("x/b", "10.244.1.3", "vb", deny),
                pod("x/c", "10.244.1.4", "vc", None),
                pod("x/d", "10.244.1.5", "unwired", None),
            ],
            sets: BTreeMap::new(),
        };
        let veths: HashMap<String, u32> = [("va".into(), 10), ("vb".into(), 11), ("vc".into(), 12)].into();
        let e = entries(&model, &veths);
        assert_eq!(e.pods.len(), 3, "a pod without a veth here gets nothing");
        assert_eq!(e.pods[&10].group4, e.pods[&11].group4);
        assert_ne!(e.pods[&10].group4, e.pods[&12].group4);
        assert_eq!(e.pods[&10].flags, pol::HAS_V4 | pol::ISOLATED_IN4);
        assert_eq!(e.pods[&12].flags, pol::HAS_V4);
        assert!(e.peers.is_empty() && e.ports.is_empty(), "deny-all: isolated, no class");
    }
}
