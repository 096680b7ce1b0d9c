//! The socket load balancer's service map, computed from the Service ports: for every frontend a node client can
//! address (the cluster IP, each external or load-balancer IP, each node address with the node port), slot 0 with
//! the backend count and the affinity setting, then one slot per backend. Slots follow the endpoints' sorted order,
//! so an unrelated change leaves them (and the affinities pointing at them) where they were.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ebpf_maps::{flags, ServiceKey, ServiceValue};
use proxy_state::{Endpoint, Proto, ServicePort};

pub type Entries = BTreeMap<ServiceKey, ServiceValue>;

pub fn addr_bytes(ip: IpAddr) -> [u8; 16] {
    let mut a = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => a[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => a = v6.octets(),
    }
    a
}

pub fn key(ip: IpAddr, port: u16, proto: Proto, slot: u16) -> ServiceKey {
    // Ports in network order, as the programs read them from the socket address.
    ServiceKey { addr: addr_bytes(ip), port: port.to_be(), slot, proto: proto.number(), _pad: [0; 3] }
}

/// Whether the eBPF programs serve this port: every protocol they translate (TCP, UDP, SCTP).
pub fn by_socket(sp: &ServicePort) -> bool {
    matches!(sp.proto, Proto::Tcp | Proto::Udp | Proto::Sctp)
}

/// What a frontend reachable from outside the node is (the tc programs read it; socket load balancing does not).
#[derive(Clone, Copy)]
enum Reach {
    /// The cluster IP: in-cluster clients only.
    Cluster,
    /// An external or load-balancer IP.
    External,
    /// A node address with the node port.
    NodePort,
}

fn frontend(out: &mut Entries, ip: IpAddr, port: u16, sp: &ServicePort, backends: &[Endpoint], reach: Reach) {
    let n = backends.len().min(u16::MAX as usize - 1);
    let mut order: Vec<&Endpoint> = backends.iter().take(n).collect();
    let mut flags = 0;
    if !matches!(reach, Reach::Cluster) {
        // This node's endpoints first (a stable sort: sorted order otherwise), so that externalTrafficPolicy Local
        // chooses among the first `local_count` slots.
        order.sort_by_key(|e| !e.local);
        if sp.external_local {
            flags |= flags::EXTERNAL_LOCAL;
            if sp.has_any_endpoint() {
                flags |= flags::DROP_EMPTY;
            }
        }
        if matches!(reach, Reach::NodePort) {
            flags |= flags::NODE_ADDR;
        }
    }
    let affinity_secs = match sp.affinity {
        Some(secs) => {
            flags |= flags::AFFINITY;
            secs
        }
        None => 0,
    };
    let local_count = order.iter().filter(|e| e.local).count() as u16;
    let front = ServiceValue { addr: [0; 16], port: 0, count: n as u16, flags, local_count, affinity_secs };
    out.insert(key(ip, port, sp.proto, 0), front);
    for (i, e) in order.into_iter().enumerate() {
        let v = ServiceValue {
            addr: addr_bytes(e.ip),
            port: e.port.to_be(),
            count: 0,
            flags: if e.local { flags::LOCAL } else { 0 },
            local_count: 0,
            affinity_secs: 0,
        };
        out.insert(key(ip, port, sp.proto, i as u16 + 1), v);
    }
}

/// Every entry the service map must hold. `node_addrs` are the node's addresses node ports answer on.
pub fn entries(services: &[ServicePort], node_addrs: &[IpAddr]) -> Entries {
    let mut out = Entries::new();
    for sp in services {
        entries_of(sp, node_addrs, &mut out);
    }
    out
}

/// One Service port's entries (none for a port the programs do not serve).
pub fn entries_of(sp: &ServicePort, node_addrs: &[IpAddr], out: &mut Entries) {
    if by_socket(sp) {
        // The node and its pods are in-cluster clients: the internal policy for the cluster IP; for external
        // addresses every endpoint (kube-proxy sends local traffic for them to the cluster-wide chain), unless
        // the external policy leaves none, in which case they are refused as from anywhere else. Traffic from
        // outside (the tc programs) honours the external policy through `local_count`.
        frontend(out, sp.cluster_ip, sp.port, sp, sp.internal(), Reach::Cluster);
        let external: Vec<Endpoint> = if sp.external().is_empty() {
            Vec::new()
        } else if sp.external_local {
            // The Local policy's own choice among this node's endpoints (serving terminating ones when none is
            // ready), then the other nodes' for the node's own clients.
            sp.local.iter().chain(sp.cluster.iter().filter(|e| !e.local)).cloned().collect()
        } else {
            sp.cluster.clone()
        };
        for ip in &sp.external_ips {
            frontend(out, *ip, sp.port, sp, &external, Reach::External);
        }
        if let Some(np) = sp.node_port {
            for ip in node_addrs.iter().filter(|a| a.is_ipv4() == sp.cluster_ip.is_ipv4()) {
                frontend(out, *ip, np, sp, &external, Reach::NodePort);
            }
        }
    }
}

/// The changes that bring `held` to `want`, ordered so that the programs never follow a count to a missing slot:
/// backends written before the frontends that count them, frontends removed or shrunk before their slots go.
pub struct Diff {
    pub upsert_backends: Vec<(ServiceKey, ServiceValue)>,
    pub upsert_frontends: Vec<(ServiceKey, ServiceValue)>,
    pub delete_frontends: Vec<ServiceKey>,
    pub delete_backends: Vec<ServiceKey>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.upsert_backends.is_empty()
            && self.upsert_frontends.is_empty()
            && self.delete_frontends.is_empty()
            && self.delete_backends.is_empty()
    }

    pub fn len(&self) -> usize {
        self.upsert_backends.len()
            + self.upsert_frontends.len()
            + self.delete_frontends.len()
            + self.delete_backends.len()
    }
}

pub fn diff(held: &Entries, want: &Entries) -> Diff {
    let mut d =
        Diff { upsert_backends: vec![], upsert_frontends: vec![], delete_frontends: vec![], delete_backends: vec![] };
    for (k, v) in want {
        if held.get(k) != Some(v) {
            if k.slot == 0 {
                d.upsert_frontends.push((*k, *v));
            } else {
                d.upsert_backends.push((*k, *v));
            }
        }
    }
    for k in held.keys().filter(|k| !want.contains_key(k)) {
        if k.slot == 0 {
            d.delete_frontends.push(*k);
        } else {
            d.delete_backends.push(*k);
        }
    }
    d
}

/// Whether the frontend `front` (a slot-0 key) has the backend `addr`:`port` among its slots in `entries`.
pub fn has_backend(entries: &Entries, front: &ServiceKey, addr: &[u8; 16], port: u16) -> bool {
    let n = entries.get(front).map_or(0, |f| f.count);
    (1..=n).any(|slot| entries.get(&ServiceKey { slot, ..*front }).is_some_and(|b| b.addr == *addr && b.port == port))
}

/// The backend slots of `held` whose frontend no longer has that backend in `want`.
fn removed<'a>(held: &'a Entries, want: &'a Entries) -> impl Iterator<Item = (&'a ServiceKey, &'a ServiceValue)> {
    held.iter().filter(|(k, v)| k.slot > 0 && !has_backend(want, &ServiceKey { slot: 0, ..**k }, &v.addr, v.port))
}

/// UDP backends a frontend no longer has: connected sockets still talking to them must be closed.
pub fn removed_udp_backends(held: &Entries, want: &Entries) -> Vec<(IpAddr, u16)> {
    let mut out: Vec<(IpAddr, u16)> = removed(held, want)
        .filter(|(k, _)| k.proto == Proto::Udp.number())
        .map(|(k, v)| (ip_of(&v.addr, k.addr), u16::from_be(v.port)))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Backends (protocol, address, port as the maps hold them) some frontend no longer has: flows from outside
/// pinned to them may have to end.
pub fn removed_backends(held: &Entries, want: &Entries) -> std::collections::HashSet<(u8, [u8; 16], u16)> {
    removed(held, want).map(|(k, v)| (k.proto, v.addr, v.port)).collect()
}

/// A backend address, in the family of the frontend it belongs to.
fn ip_of(addr: &[u8; 16], frontend: [u8; 16]) -> IpAddr {
    let v4 = frontend[4..].iter().all(|b| *b == 0) && !frontend[..4].iter().all(|b| *b == 0);
    if v4 && addr[4..].iter().all(|b| *b == 0) {
        IpAddr::from([addr[0], addr[1], addr[2], addr[3]])
    } else {
        IpAddr::from(*addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(ip: &str, local: bool) -> Endpoint {
        Endpoint::ready(ip.parse().unwrap(), 8080, local)
    }

    fn sp(eps: Vec<Endpoint>) -> ServicePort {
        let mut s = ServicePort::cluster_ip("d/web:/tcp", "10.96.0.10".parse().unwrap(), 80, eps);
        s.node_port = Some(30080);
        s.external_ips = vec!["192.0.2.7".parse().unwrap()];
        s
    }

    #[test]
    fn every_frontend_gets_its_slots_in_network_order() {
        let s = sp(vec![ep("10.244.1.2", true), ep("10.244.2.2", false)]);
        let node: Vec<IpAddr> = vec!["198.18.0.1".parse().unwrap(), "fd00::1".parse().unwrap()];
        let e = entries(&[s], &node);
        // cluster IP, external IP, one IPv4 node address: 3 frontends x (1 + 2).
        assert_eq!(e.len(), 9);
        let f = e[&key("10.96.0.10".parse().unwrap(), 80, Proto::Tcp, 0)];
        assert_eq!(f.count, 2);
        assert_eq!(key("10.96.0.10".parse().unwrap(), 80, Proto::Tcp, 0).port.to_ne_bytes(), [0, 80]);
        let b = e[&key("198.18.0.1".parse().unwrap(), 30080, Proto::Tcp, 2)];
        assert_eq!(&b.addr[..4], &[10, 244, 2, 2]);
        assert_eq!(b.port.to_ne_bytes(), [0x1f, 0x90]);
    }

    #[test]
    fn frontends_from_outside_put_local_endpoints_first_and_carry_the_external_policy() {
        let mut s = sp(vec![ep("10.244.1.2", false), ep("10.244.2.2", true)]);
        s.external_local = true;
        let node: Vec<IpAddr> = vec!["198.18.0.1".parse().unwrap()];
        let e = entries(std::slice::from_ref(&s), &node);
        let np = key("198.18.0.1".parse().unwrap(), 30080, Proto::Tcp, 0);
        let f = e[&np];
        assert_eq!((f.count, f.local_count), (2, 1));
        assert_eq!(f.flags, flags::EXTERNAL_LOCAL | flags::DROP_EMPTY | flags::NODE_ADDR);
        let first = e[&ServiceKey { slot: 1, ..np }];
        assert_eq!((&first.addr[..4], first.flags), (&[10u8, 244, 2, 2][..], flags::LOCAL));
        // The cluster IP keeps the sorted order and no outside flags.
        let c = e[&key(s.cluster_ip, 80, Proto::Tcp, 0)];
        assert_eq!(c.flags, 0);
        assert_eq!(&e[&key(s.cluster_ip, 80, Proto::Tcp, 1)].addr[..4], &[10, 244, 1, 2]);
        let ext = e[&key("192.0.2.7".parse().unwrap(), 80, Proto::Tcp, 0)];
        assert_eq!(ext.flags, flags::EXTERNAL_LOCAL | flags::DROP_EMPTY);
    }

    #[test]
    fn internal_policy_local_counts_only_local_endpoints_and_no_endpoint_means_count_zero() {
        let mut s = sp(vec![ep("10.244.1.2", true), ep("10.244.2.2", false)]);
        s = ServicePort::new(s.id, s.proto, s.cluster_ip, 80, None, vec![], None, (false, true), s.endpoints);
        let e = entries(std::slice::from_ref(&s), &[]);
        assert_eq!(e[&key(s.cluster_ip, 80, Proto::Tcp, 0)].count, 1);
        let empty = ServicePort::cluster_ip("d/none:/tcp", "10.96.0.11".parse().unwrap(), 80, vec![]);
        let e = entries(&[empty], &[]);
        assert_eq!(e.len(), 1);
        assert_eq!(e.values().next().unwrap().count, 0);
    }

    #[test]
    fn the_diff_orders_writes_and_finds_removed_udp_backends() {
        let mut a = sp(vec![ep("10.244.1.2", true), ep("10.244.2.2", false)]);
        a.proto = Proto::Udp;
        let mut b = sp(vec![ep("10.244.1.2", true)]);
        b.proto = Proto::Udp;
        let (old, new) = (entries(&[a], &[]), entries(&[b], &[]));
        let d = diff(&old, &new);
        assert_eq!(d.upsert_frontends.len(), 2, "cluster and external IP counts shrink");
        assert_eq!(d.delete_backends.len(), 2, "their second slots go");
        assert!(d.upsert_backends.is_empty() && d.delete_frontends.is_empty());
        assert_eq!(removed_udp_backends(&old, &new), vec![("10.244.2.2".parse().unwrap(), 8080)]);
        assert!(diff(&new, &new).is_empty());
    }
}
