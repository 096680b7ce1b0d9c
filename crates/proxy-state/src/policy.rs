//! NetworkPolicy as a dataplane needs it, computed from the store alone: for each pod on this node, whether it is
//! isolated for ingress and egress and which (peer set, port) pairs its policies allow; and the peer sets those
//! rules refer to, typed (addresses, CIDRs with their exceptions, address+protocol+port members). A set is
//! identified by its definition (the selector, the ipBlock, the named port), not its members, so a label change
//! changes a set's members and leaves the rules that use it alone. How a set is held in the kernel (an ipset, a
//! BPF map) is the dataplane's business.
//!
//! Both families: a dual-stack pod gets one [`PodPolicy`] per address, and each family its own sets.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use kube_objects::{
    matches, IntOrString, LabelSelector, Labels, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, Object, Pod,
};

use crate::service::Proto;

/// A peer set's identity: its kind, family and the hash of its definition. Stable across syncs and restarts, so a
/// dataplane can name what it writes after it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SetRef {
    pub kind: SetKind,
    pub v6: bool,
    /// 16 hex digits ([`node_contract::name_hash`] of the definition).
    pub hash: String,
}

/// What a set is defined by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetKind {
    /// A podSelector / namespaceSelector peer: pod addresses.
    Selector,
    /// An ipBlock: a CIDR less its exceptions.
    Block,
    /// A named port, for egress: every pod's (address, protocol, port) of that name.
    NamedPort,
}

impl SetKind {
    /// Two letters for names (`PS`, `NB`, `NP`).
    pub fn tag(self) -> &'static str {
        match self {
            SetKind::Selector => "PS",
            SetKind::Block => "NB",
            SetKind::NamedPort => "NP",
        }
    }
}

impl std::fmt::Display for SetRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}-{}", if self.v6 { "6" } else { "" }, self.kind.tag(), self.hash)
    }
}

/// The members of a peer set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerSet {
    /// Pod addresses.
    Addresses(BTreeSet<IpAddr>),
    /// A CIDR with the ranges carved out of it (`except`; an exception may be allowed again by another peer).
    Block { cidr: IpNet, except: BTreeSet<IpNet> },
    /// (address, protocol, port) triples.
    AddrPorts(BTreeSet<(IpAddr, Proto, u16)>),
}

impl PeerSet {
    /// Whether `ip` is a member (for `AddrPorts`: with any port).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match self {
            PeerSet::Addresses(a) => a.contains(&ip),
            PeerSet::Block { cidr, except } => cidr.contains(&ip) && !except.iter().any(|x| x.contains(&ip)),
            PeerSet::AddrPorts(m) => m.iter().any(|(a, _, _)| *a == ip),
        }
    }

    /// How many members the set lists (a block: itself and its exceptions).
    pub fn len(&self) -> usize {
        match self {
            PeerSet::Addresses(a) => a.len(),
            PeerSet::Block { except, .. } => 1 + except.len(),
            PeerSet::AddrPorts(m) => m.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the dataplane enforces on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyModel {
    /// This node's pods, one entry per address family they have an address in, sorted by id then family.
    pub pods: Vec<PodPolicy>,
    /// The sets the rules refer to.
    pub sets: BTreeMap<SetRef, PeerSet>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPolicy {
    /// `namespace/name`.
    pub id: String,
    pub ip: IpAddr,
    /// The host side of the pod's veth, when the CNI plugin's record of it is on this node: its traffic is
    /// matched by the port it enters on, and a source address other than the pod's is dropped there.
    pub veth: Option<String>,
    /// None: not isolated for ingress. Some: only what one of these rules allows gets in.
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

/// One allow rule: any of `peers` (None: anyone) on any of `ports` (None: every port and protocol).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rule {
    /// The sets holding the peer addresses.
    pub peers: Option<Vec<SetRef>>,
    pub ports: Option<Vec<PortMatch>>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum PortMatch {
    /// Every port of a protocol.
    Proto(Proto),
    /// A port range (a single port is `n..=n`).
    Range(Proto, u16, u16),
    /// A named port of the destination pod, for egress (where destinations are many): a set of address,port pairs.
    Named(Proto, SetRef),
}

struct Cluster<'a> {
    /// Pods with an address of the family being built, and that address.
    pods: Vec<(&'a Pod, String, IpAddr)>,
    namespaces: BTreeMap<String, &'a Labels>,
}

/// The pod's address in the family of `v6`.
fn pod_ip(p: &Pod, v6: bool) -> Option<IpAddr> {
    let st = p.status.as_ref()?;
    let listed = st.pod_ips.iter().map(|i| i.ip.as_str()).chain(st.pod_ip.as_deref());
    listed.filter_map(|s| s.parse::<IpAddr>().ok()).find(|ip| ip.is_ipv6() == v6)
}

fn ns_of(p: &Pod) -> String {
    p.metadata.namespace.clone().unwrap_or_else(|| "default".into())
}

/// The protocol of a policy port (TCP when absent).
fn proto_of(p: &NetworkPolicyPort) -> Option<Proto> {
    Proto::parse(p.protocol.as_deref().unwrap_or("TCP"))
}

/// The container ports of `pod` named `name` with protocol `proto`.
fn named_ports(pod: &Pod, name: &str, proto: Proto) -> Vec<u16> {
    let mut v: Vec<u16> = pod
        .spec
        .containers
        .iter()
        .flat_map(|c| &c.ports)
        .filter(|cp| cp.name.as_deref() == Some(name))
        .filter(|cp| Proto::parse(cp.protocol.as_deref().unwrap_or("TCP")) == Some(proto))
        .filter_map(|cp| u16::try_from(cp.container_port).ok())
        .collect();
    v.sort();
    v.dedup();
    v
}

struct Builder<'a> {
    cluster: Cluster<'a>,
    v6: bool,
    sets: BTreeMap<SetRef, PeerSet>,
}

impl Builder<'_> {
    /// A set's identity: the kind, this family, and a hash of the definition.
    fn name(&self, kind: SetKind, def: &str) -> SetRef {
        SetRef { kind, v6: self.v6, hash: node_contract::name_hash(def) }
    }

    /// The set for a selector peer: pods matching `pod_sel` in the policy's namespace (no namespace selector) or in
    /// the namespaces matching `ns_sel`.
    fn selector_set(
        &mut self,
        policy_ns: &str,
        pod_sel: Option<&LabelSelector>,
        ns_sel: Option<&LabelSelector>,
    ) -> SetRef {
        let def = serde_json::json!({
            "namespace": if ns_sel.is_none() { Some(policy_ns) } else { None },
            "podSelector": pod_sel,
            "namespaceSelector": ns_sel,
        });
        let name = self.name(SetKind::Selector, &def.to_string());
        if !self.sets.contains_key(&name) {
            let empty = Labels::new();
            let members = self
                .cluster
                .pods
                .iter()
                .filter(|(_, ns, _)| match ns_sel {
                    None => ns == policy_ns,
                    Some(sel) => matches(sel, self.cluster.namespaces.get(ns).copied().unwrap_or(&empty)),
                })
                .filter(|(p, _, _)| pod_sel.is_none_or(|sel| matches(sel, &p.metadata.labels)))
                .map(|(_, _, ip)| *ip)
                .collect();
            self.sets.insert(name.clone(), PeerSet::Addresses(members));
        }
        name
    }

    /// The set for an ipBlock. None for a block of the other family.
    fn block_set(&mut self, cidr: &str, except: &[String]) -> Option<SetRef> {
        let net = cidr.parse::<IpNet>().ok()?.trunc();
        if net.addr().is_ipv6() != self.v6 {
            return None;
        }
        let except = except
            .iter()
            .filter_map(|e| e.parse::<IpNet>().ok())
            .map(|x| x.trunc())
            .filter(|x| x.addr().is_ipv6() == self.v6)
            .collect();
        let name = self.name(SetKind::Block, &format!("{cidr} except {except:?}"));
        self.sets.insert(name.clone(), PeerSet::Block { cidr: net, except });
        Some(name)
    }

    /// The set of (address, port) pairs of every pod with a container port `name`/`proto`.
    fn named_port_set(&mut self, name: &str, proto: Proto) -> SetRef {
        let set = self.name(SetKind::NamedPort, &format!("{name}/{}", proto.as_str()));
        if !self.sets.contains_key(&set) {
            let mut members = BTreeSet::new();
            for (p, _, ip) in &self.cluster.pods {
                for port in named_ports(p, name, proto) {
                    members.insert((*ip, proto, port));
                }
            }
            self.sets.insert(set.clone(), PeerSet::AddrPorts(members));
        }
        set
    }

    /// A rule's peers: None for "anyone" (no peers listed); blocks of the other family drop out.
    fn peers(&mut self, policy_ns: &str, peers: &[NetworkPolicyPeer]) -> Option<Vec<SetRef>> {
        if peers.is_empty() {
            return None;
        }
        let mut out = Vec::new();
        for peer in peers {
            if let Some(b) = &peer.ip_block {
                out.extend(self.block_set(&b.cidr, &b.except));
            } else if peer.pod_selector.is_some() || peer.namespace_selector.is_some() {
                out.push(self.selector_set(policy_ns, peer.pod_selector.as_ref(), peer.namespace_selector.as_ref()));
            }
        }
        out.sort();
        out.dedup();
        Some(out)
    }

    /// A rule's ports. Named ports resolve against `dest` (ingress: the pod itself) or, for egress (`dest` None),
    /// through a set of every pod's ports of that name.
    fn ports(&mut self, ports: &[NetworkPolicyPort], dest: Option<&Pod>) -> Option<Vec<PortMatch>> {
        if ports.is_empty() {
            return None;
        }
        let mut out = Vec::new();
        for p in ports {
            let Some(proto) = proto_of(p) else { continue };
            match &p.port {
                None => out.push(PortMatch::Proto(proto)),
                Some(IntOrString::Int(n)) => {
                    let Ok(start) = u16::try_from(*n) else { continue };
                    let end = p.end_port.and_then(|e| u16::try_from(e).ok()).unwrap_or(start);
                    if end >= start {
                        out.push(PortMatch::Range(proto, start, end));
                    }
                }
                Some(IntOrString::Str(name)) => match dest {
                    Some(pod) => {
                        out.extend(named_ports(pod, name, proto).into_iter().map(|n| PortMatch::Range(proto, n, n)))
                    }
                    None => out.push(PortMatch::Named(proto, self.named_port_set(name, proto))),
                },
            }
        }
        out.sort();
        out.dedup();
        Some(out)
    }
}

/// A rule allowing nothing (every peer or port dropped out) is left out rather than kept as "anything".
fn keep(r: &Rule) -> bool {
    r.peers.as_ref().is_none_or(|p| !p.is_empty()) && r.ports.as_ref().is_none_or(|p| !p.is_empty())
}

/// The policy model for the pods of `node`. `veths` maps `(namespace, name)` to the pod's host-side veth.
pub fn policy_model(objects: &[Object], node: &str, veths: &BTreeMap<(String, String), String>) -> PolicyModel {
    let mut all: Vec<&Pod> = Vec::new();
    let mut namespaces = BTreeMap::new();
    let mut policies: Vec<&NetworkPolicy> = Vec::new();
    for o in objects {
        match o {
            Object::Pod(p) => all.push(p),
            Object::Namespace(n) => {
                namespaces.insert(n.metadata.name.clone(), &n.metadata.labels);
            }
            Object::NetworkPolicy(np) => policies.push(np),
            _ => {}
        }
    }
    policy_model_of(&all, &namespaces, &policies, node, veths)
}

/// [`policy_model`] over objects the caller keeps indexed (the change tracker).
pub fn policy_model_of(
    all: &[&Pod],
    namespaces: &BTreeMap<String, &Labels>,
    policies: &[&NetworkPolicy],
    node: &str,
    veths: &BTreeMap<(String, String), String>,
) -> PolicyModel {
    let mut out = Vec::new();
    let mut sets = BTreeMap::new();
    for v6 in [false, true] {
        let pods = all.iter().filter_map(|p| Some((*p, ns_of(p), pod_ip(p, v6)?))).collect();
        let mut b = Builder { cluster: Cluster { pods, namespaces: namespaces.clone() }, v6, sets: BTreeMap::new() };
        let family = family_model(&mut b, policies, node, veths);
        sets.extend(used_sets(&family, &b.sets));
        out.extend(family);
    }
    out.sort_by(|a, b| (&a.id, a.ip.is_ipv6()).cmp(&(&b.id, b.ip.is_ipv6())));
    PolicyModel { pods: out, sets }
}

fn family_model(
    b: &mut Builder,
    policies: &[&NetworkPolicy],
    node: &str,
    veths: &BTreeMap<(String, String), String>,
) -> Vec<PodPolicy> {
    let local: Vec<(&Pod, String, IpAddr)> =
        b.cluster.pods.iter().filter(|(p, _, _)| p.spec.node_name.as_deref() == Some(node)).cloned().collect();
    let mut out = Vec::new();
    for (pod, ns, ip) in local {
        let mut ingress: Option<Vec<Rule>> = None;
        let mut egress: Option<Vec<Rule>> = None;
        for np in policies.iter().filter(|np| np.metadata.namespace.as_deref().unwrap_or("default") == ns) {
            if !matches(&np.spec.pod_selector, &pod.metadata.labels) {
                continue;
            }
            let types = np.spec.effective_policy_types();
            if types.iter().any(|t| t == "Ingress") {
                let rules = ingress.get_or_insert_with(Vec::new);
                for r in &np.spec.ingress {
                    let rule = Rule { peers: b.peers(&ns, &r.from), ports: b.ports(&r.ports, Some(pod)) };
                    if keep(&rule) {
                        rules.push(rule);
                    }
                }
            }
            if types.iter().any(|t| t == "Egress") {
                let rules = egress.get_or_insert_with(Vec::new);
                for r in &np.spec.egress {
                    let rule = Rule { peers: b.peers(&ns, &r.to), ports: b.ports(&r.ports, None) };
                    if keep(&rule) {
                        rules.push(rule);
                    }
                }
            }
        }
        let veth = veths.get(&(ns.clone(), pod.metadata.name.clone())).cloned();
        out.push(PodPolicy { id: format!("{ns}/{}", pod.metadata.name), ip, veth, ingress, egress });
    }
    out
}

/// Only the sets some rule refers to (a selector evaluated for a policy that then selected no local pod is not).
fn used_sets(pods: &[PodPolicy], sets: &BTreeMap<SetRef, PeerSet>) -> BTreeMap<SetRef, PeerSet> {
    let used: BTreeSet<&SetRef> = pods
        .iter()
        .flat_map(|p| p.ingress.iter().chain(p.egress.iter()).flatten())
        .flat_map(|r| {
            let peers = r.peers.iter().flatten();
            let named = r.ports.iter().flatten().filter_map(|m| match m {
                PortMatch::Named(_, s) => Some(s),
                _ => None,
            });
            peers.chain(named)
        })
        .collect();
    sets.iter().filter(|(n, _)| used.contains(n)).map(|(n, s)| (n.clone(), s.clone())).collect()
}

/// (namespace, name) -> host-side veth of this node's pods, from the CNI plugin's records under `run_dir`. The
/// plugin writes a record before the agent publishes the pod's address, so a pod the store shows here has one.
pub fn local_veths(run_dir: &std::path::Path) -> BTreeMap<(String, String), String> {
    node_contract::pods::load_all(run_dir)
        .into_iter()
        .map(|r| ((r.namespace, r.name), node_contract::host_veth_name(&r.container_id, &r.ifname)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::objects;

    fn set_contains(set: &PeerSet, ip: &str) -> bool {
        set.contains(ip.parse().unwrap())
    }

    /// Namespaces x and y; pods x/a (n1, 10.244.1.2, named port http 8080), x/b (n2, 10.244.2.2), y/a (n2).
    const CLUSTER: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {ns: x}}
---
apiVersion: v1
kind: Namespace
metadata: {name: y, labels: {ns: y}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 53, protocol: UDP}]}]}
status: {podIP: 10.244.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {pod: b}}
spec: {nodeName: n2, containers: [{name: c, ports: [{name: http, containerPort: 9090}]}]}
status: {podIP: 10.244.2.2}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: y, labels: {pod: a}}
spec: {nodeName: n2}
status: {podIP: 10.244.2.3}
";

    fn model(policies: &str, node: &str) -> PolicyModel {
        let veths = [(("x".to_string(), "a".to_string()), "vethxa".to_string())].into();
        policy_model(&objects(&format!("{CLUSTER}---\n{policies}")), node, &veths)
    }

    fn pod<'m>(m: &'m PolicyModel, id: &str) -> &'m PodPolicy {
        m.pods.iter().find(|p| p.id == id).unwrap()
    }

    #[test]
    fn without_policies_nothing_is_isolated() {
        let m = policy_model(&objects(CLUSTER), "n2", &BTreeMap::new());
        assert_eq!(m.pods.len(), 2, "the node's pods only");
        assert!(m.pods.iter().all(|p| p.ingress.is_none() && p.egress.is_none() && p.veth.is_none()));
        assert!(m.sets.is_empty());
    }

    #[test]
    fn deny_all_isolates_with_no_rules_and_policy_types_default() {
        let m = model("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: d, namespace: x}\nspec: {podSelector: {}}\n", "n1");
        let a = pod(&m, "x/a");
        assert_eq!(a.ingress, Some(vec![]));
        assert_eq!(a.egress, None, "Egress only when listed or when there are egress rules");
        assert_eq!(a.veth.as_deref(), Some("vethxa"));
        let m = model("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: d, namespace: x}\nspec: {podSelector: {}, egress: [{}]}\n", "n1");
        assert_eq!(pod(&m, "x/a").egress, Some(vec![Rule { peers: None, ports: None }]), "egress: [{{}}] allows all");
    }

    #[test]
    fn peers_become_sets_and_and_or_follow_the_peer_structure() {
        let m = model(
            "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - podSelector: {matchLabels: {pod: a}}
      namespaceSelector: {matchLabels: {ns: y}}
    - podSelector: {matchLabels: {pod: b}}
    - ipBlock: {cidr: 10.244.0.0/16, except: [10.244.2.2/32]}
",
            "n1",
        );
        let rules = pod(&m, "x/a").ingress.clone().unwrap();
        assert_eq!(rules.len(), 1);
        let peers = rules[0].peers.clone().unwrap();
        assert_eq!(peers.len(), 3);
        let addrs = |a: &[&str]| PeerSet::Addresses(a.iter().map(|s| s.parse().unwrap()).collect());
        let ps: Vec<&PeerSet> = peers.iter().filter(|p| p.kind == SetKind::Selector).map(|p| &m.sets[p]).collect();
        assert!(ps.contains(&&addrs(&["10.244.2.3"])), "y/a only (AND): {ps:?}");
        assert!(ps.contains(&&addrs(&["10.244.2.2"])), "x/b, in the policy's namespace: {ps:?}");
        let nb = peers.iter().find(|p| p.kind == SetKind::Block).unwrap();
        assert_eq!(
            m.sets[nb],
            PeerSet::Block {
                cidr: "10.244.0.0/16".parse().unwrap(),
                except: ["10.244.2.2/32".parse().unwrap()].into()
            }
        );
        assert!(set_contains(&m.sets[nb], "10.244.1.2") && !set_contains(&m.sets[nb], "10.244.2.2"));
    }

    #[test]
    fn ports_by_number_range_name_and_protocol() {
        let m = model(
            "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
  ingress:
  - ports: [{port: http}, {port: dns, protocol: UDP}, {port: 80, endPort: 81}, {protocol: SCTP}, {port: nope}]
  egress:
  - ports: [{port: http}]
  - to: [{ipBlock: {cidr: 'fd00::/8'}}]
",
            "n1",
        );
        let a = pod(&m, "x/a");
        let ports = a.ingress.as_ref().unwrap()[0].ports.clone().unwrap();
        assert_eq!(
            ports,
            vec![
                PortMatch::Proto(Proto::Sctp),
                PortMatch::Range(Proto::Tcp, 80, 81),
                PortMatch::Range(Proto::Tcp, 8080, 8080),
                PortMatch::Range(Proto::Udp, 53, 53),
            ],
            "named ports resolved on the pod itself; an unknown name adds nothing"
        );
        let egress = a.egress.as_ref().unwrap();
        assert_eq!(egress.len(), 1, "a rule whose only peer is an IPv6 block allows nothing over IPv4: dropped");
        let Some(PortMatch::Named(Proto::Tcp, set)) = egress[0].ports.as_ref().unwrap().first().cloned() else {
            panic!("{egress:?}")
        };
        let want = [("10.244.1.2", 8080), ("10.244.2.2", 9090)].map(|(ip, p)| (ip.parse().unwrap(), Proto::Tcp, p));
        assert_eq!(m.sets[&set], PeerSet::AddrPorts(want.into()), "every pod's port of that name");
    }

    #[test]
    fn a_label_change_changes_members_not_names() {
        let pol = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec: {podSelector: {}, ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]}\n";
        let before = model(pol, "n1");
        let mut objs = objects(&format!("{CLUSTER}---\n{pol}"));
        for o in &mut objs {
            if let Object::Pod(p) = o {
                if p.metadata.name == "b" {
                    p.metadata.labels.insert("pod".into(), "c".into());
                }
            }
        }
        let after = policy_model(&objs, "n1", &BTreeMap::new());
        assert_eq!(before.sets.keys().collect::<Vec<_>>(), after.sets.keys().collect::<Vec<_>>());
        assert_ne!(before.sets, after.sets);
        assert!(after.sets.values().all(|s| s.is_empty()));
    }

    #[test]
    fn a_dual_stack_pod_gets_a_policy_per_family_with_sets_of_its_family() {
        let yaml = "apiVersion: v1
kind: Pod
metadata: {name: d, namespace: x, labels: {pod: d}}
spec: {nodeName: n1}
status: {podIP: 10.244.1.9, podIPs: [{ip: 10.244.1.9}, {ip: 'fd00:10:244:1::9'}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec:
  podSelector: {matchLabels: {pod: d}}
  ingress:
  - from: [{podSelector: {}}, {ipBlock: {cidr: 'fd00::/8', except: ['fd00:10:244:2::/64']}}, {ipBlock: {cidr: 0.0.0.0/0}}]
";
        let m = model(yaml, "n1");
        let d: Vec<&PodPolicy> = m.pods.iter().filter(|p| p.id == "x/d").collect();
        assert_eq!(d.len(), 2);
        assert!(d[0].ip.is_ipv4() && d[1].ip.is_ipv6());
        let peers = |p: &PodPolicy| p.ingress.as_ref().unwrap()[0].peers.clone().unwrap();
        for p in &peers(d[0]) {
            assert!(!p.v6, "{p}");
        }
        let v6 = peers(d[1]);
        assert_eq!(v6.len(), 2, "the pod selector and the IPv6 block: {v6:?}");
        for p in &v6 {
            assert!(p.v6 && p.to_string().starts_with('6'), "{p}");
        }
        let nb = v6.iter().find(|p| p.kind == SetKind::Block).unwrap();
        assert!(set_contains(&m.sets[nb], "fd00:10:244:1::9") && !set_contains(&m.sets[nb], "fd00:10:244:2::5"));
        let all = peers(d[0]).into_iter().find(|p| p.kind == SetKind::Block).unwrap();
        assert!(set_contains(&m.sets[&all], "1.2.3.4") && set_contains(&m.sets[&all], "200.2.3.4"), "/0: all");
        let ps = v6.iter().find(|p| p.kind == SetKind::Selector).unwrap();
        assert_eq!(m.sets[ps], PeerSet::Addresses(["fd00:10:244:1::9".parse().unwrap()].into()), "only pods with IPv6");
    }
}
