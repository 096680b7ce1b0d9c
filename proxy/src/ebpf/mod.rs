//! The eBPF dataplane (`--mode ebpf`). The node's clients (its processes and its pods, all in the cgroup given by
//! `--cgroup-root`) have their connects and datagrams to a frontend sent straight to a backend by cgroup/sock_addr
//! programs; traffic from other hosts to node ports, external and load-balancer IPs is translated by tc programs
//! on every interface holding a node address, which keep their own conntrack and NAT maps ([`attach`], and
//! `ebpf/src/nodeport.rs`). The service map both read is brought to the desired [`frontends::entries`] by
//! difference, one map update per changed entry; flows pinned to an endpoint that left are removed from the
//! conntrack map after it. NetworkPolicy is enforced by tc programs on every pod's host-side veth ([`policy`]
//! compiles the model into their maps, also by difference). Not one iptables rule serves a Service or a policy.
//!
//! Transactional as the iptables dataplane is: `held` (what the map holds) changes entry by entry as the kernel
//! accepts each update; a failed update forgets it, and the next sync reads the map back and diffs against that.

pub mod attach;
pub mod frontends;
pub mod policy;
pub mod sockets;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use ebpf_maps::{FlowKey, IfAddrKey, ServiceKey};
use ipnet::IpNet;
use proxy_state::{Dataplane, DataplaneError, ErrorKind, Held, PolicyModel, ServicePort, State, SyncReport};

use crate::iptables::IptablesDataplane;
use frontends::Entries;

/// Where the eBPF dataplane attaches and pins.
#[derive(Debug, Clone, Default)]
pub struct EbpfOptions {
    /// The cgroup v2 directory holding every process of the node.
    pub cgroup_root: PathBuf,
    /// The bpffs directory for pinned maps and links.
    pub bpf_root: PathBuf,
    /// The CNI plugin's run directory (pods' namespaces, for closing stale UDP sockets).
    pub run_dir: PathBuf,
    /// The size of the conntrack and NAT maps (flows from outside).
    pub conntrack_max: u32,
    /// Whether pod traffic takes the fast path (the programs find a pod's veth by its address, and the pod network,
    /// only then).
    pub pod_fast_path: bool,
    /// The pod network, a range per family: traffic from a pod to a pod of another node takes the fast path
    /// (set by [`crate::dataplane`] from the node's options).
    pub cluster_cidrs: Vec<IpNet>,
}

/// The node's addresses node ports answer on, and the interfaces holding them (by name: index and addresses).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct NodeAddrs {
    addrs: Vec<IpAddr>,
    interfaces: BTreeMap<String, (u32, Vec<IpAddr>)>,
    /// Every address of the node (but loopback): its traffic to its pods is not subject to policy.
    host: BTreeSet<IpAddr>,
    /// ... with their prefixes (this node's own pod subnets among them).
    nets: BTreeSet<IpNet>,
    /// Every link's index by name (the pods' veths among them).
    links: HashMap<String, u32>,
}

pub struct EbpfDataplane {
    ipt: IptablesDataplane,
    opts: EbpfOptions,
    nodeport_addresses: Vec<IpNet>,
    attached: Option<attach::Attached>,
    /// What the service map holds (None: unknown, read it back first).
    held: Option<Entries>,
    /// Per Service port id, the port and the entries it was programmed with, and the node addresses node ports
    /// were programmed on: a partial sync recomputes only the ports that changed.
    programmed: HashMap<String, (ServicePort, Entries)>,
    programmed_addrs: Vec<IpAddr>,
    rules: Held,
    /// Flows from outside tracked, as last counted.
    flows: usize,
    /// What the policy maps hold (None: unknown, read them back first), and the model and veth indexes they were
    /// computed from (a sync with the same skips the policy).
    policy: Option<policy::Entries>,
    policy_from: Option<(Arc<PolicyModel>, HashMap<String, u32>)>,
    host: Option<(BTreeSet<IpAddr>, BTreeSet<IpNet>)>,
    policy_sets: (usize, usize),
}

type Result<T> = std::result::Result<T, DataplaneError>;

impl EbpfDataplane {
    pub fn new(ipt: IptablesDataplane, opts: EbpfOptions, nodeport_addresses: Vec<IpNet>) -> EbpfDataplane {
        EbpfDataplane {
            ipt: ipt.with_socket_lb(),
            opts,
            nodeport_addresses,
            attached: None,
            held: None,
            programmed: HashMap::new(),
            programmed_addrs: Vec::new(),
            rules: Held::default(),
            flows: 0,
            policy: None,
            policy_from: None,
            host: None,
            policy_sets: (0, 0),
        }
    }

    /// The node's addresses node ports answer on (all but loopback and IPv6 link-local, within
    /// --nodeport-addresses if given), and the interfaces that hold them: where the tc programs attach.
    fn node_addresses(&self) -> Result<NodeAddrs> {
        let mut rt = rtnl::Rtnl::new().map_err(|e| DataplaneError::new(ErrorKind::Readback, "netlink", e))?;
        let all = rt.addresses(None).map_err(|e| DataplaneError::new(ErrorKind::Readback, "listing addresses", e))?;
        let links = rt.links().map_err(|e| DataplaneError::new(ErrorKind::Readback, "listing links", e))?;
        // Only interfaces with a link-layer address: the programs parse Ethernet frames (an L3 device such as
        // flannel's udp-backend TUN carries bare IP packets).
        let mut out = NodeAddrs::default();
        out.links = links.iter().map(|l| (l.name.clone(), l.index)).collect();
        let names: HashMap<u32, String> =
            links.into_iter().filter(|l| l.mac.is_some()).map(|l| (l.index, l.name)).collect();
        for (index, net) in all {
            let a = net.addr();
            if !a.is_loopback() {
                out.host.insert(a);
                out.nets.insert(net.trunc());
            }
            // Not loopback: the programs run in every pod's namespace too, where localhost is the pod itself.
            let usable = !a.is_loopback()
                && !matches!(a, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
                && (self.nodeport_addresses.is_empty() || self.nodeport_addresses.iter().any(|n| n.contains(&a)));
            if !usable {
                continue;
            }
            out.addrs.push(a);
            if let Some(name) = names.get(&index) {
                out.interfaces.entry(name.clone()).or_insert((index, Vec::new())).1.push(a);
            }
        }
        out.addrs.sort();
        out.addrs.dedup();
        for (_, addrs) in out.interfaces.values_mut() {
            addrs.sort();
        }
        Ok(out)
    }

    /// The tc programs on exactly the interfaces holding node addresses, and the address per interface and family
    /// that flows to remote endpoints leave with (written first: the programs read it from their first packet).
    fn sync_interfaces(&mut self, node: &NodeAddrs) -> Result<()> {
        let root = self.opts.bpf_root.clone();
        let a = self.attached.as_mut().expect("attached");
        let mut want: BTreeMap<(u32, u32), [u8; 16]> = BTreeMap::new();
        for (index, addrs) in node.interfaces.values() {
            for ip in addrs {
                let family = if ip.is_ipv4() { 4 } else { 6 };
                want.entry((*index, family)).or_insert_with(|| frontends::addr_bytes(*ip));
            }
        }
        let failed = |e| DataplaneError::new(ErrorKind::Sets, "updating the interface address map", e);
        let mut have: BTreeMap<(u32, u32), [u8; 16]> = BTreeMap::new();
        for kv in a.ifaddr.iter() {
            let (k, v) =
                kv.map_err(|e| DataplaneError::new(ErrorKind::Readback, "reading the interface addresses", e))?;
            have.insert((k.ifindex, k.family), v);
        }
        for (&(ifindex, family), v) in &want {
            if have.get(&(ifindex, family)) != Some(v) {
                a.ifaddr.insert(IfAddrKey { ifindex, family }, v, 0).map_err(failed)?;
            }
        }
        for &(ifindex, family) in have.keys().filter(|k| !want.contains_key(k)) {
            let _ = a.ifaddr.remove(&IfAddrKey { ifindex, family });
        }
        for (name, (index, _)) in &node.interfaces {
            // Attached under another index: the interface was deleted (which detached the programs) and made
            // again under the same name.
            if a.tc.get(name).map(|(i, _)| i) != Some(index) {
                a.attach_tc(&root, name, *index)?;
            }
        }
        let mut stale: BTreeSet<String> = a.tc.keys().filter(|n| !node.interfaces.contains_key(*n)).cloned().collect();
        stale.extend(
            attach::pinned_tc_interfaces(&root, &attach::NODE_TC)
                .into_iter()
                .filter(|n| !node.interfaces.contains_key(n)),
        );
        for name in stale {
            tracing::info!(interface = %name, "no node address any more: tc programs detached");
            a.detach_tc(&root, &name);
        }
        Ok(())
    }

    /// The node's addresses in the host map, the policy maps brought to the model by difference, then the
    /// policy programs on exactly the veths of its pods. Order keeps every packet decided by a whole state: the
    /// rules of a group are written before a pod points at it, and removed only once no pod does.
    fn sync_policy(&mut self, model: &Arc<PolicyModel>, node: &NodeAddrs, full: bool) -> Result<()> {
        let a = self.attached.as_mut().expect("attached");
        // The node's addresses first: a pod must never see its node's traffic decided by its policy.
        let host = (node.host.clone(), node.nets.clone());
        if full || self.host.as_ref() != Some(&host) {
            let want: BTreeMap<[u8; 16], u8> = node.host.iter().map(|ip| (frontends::addr_bytes(*ip), 1)).collect();
            let have: BTreeMap<[u8; 16], u8> = a.host.iter().flatten().collect();
            let mut now = BTreeMap::new();
            put(&want, &have, &mut now, "the host address map", |k, v| a.host.insert(k, v, 0))?;
            drop_gone(&want, &have, &mut now, "the host address map", |k| a.host.remove(k))?;
            // The pod network (1), less this node's own subnets in it (0: its pods are reached by address).
            let mut net: BTreeMap<(u32, ebpf_maps::NetKey), u8> = BTreeMap::new();
            let key = |n: &IpNet| {
                let family = if n.addr().is_ipv6() { 6 } else { 4 };
                (32 + u32::from(n.prefix_len()), ebpf_maps::NetKey { family, addr: frontends::addr_bytes(n.addr()) })
            };
            for c in self.opts.cluster_cidrs.iter().filter(|_| self.opts.pod_fast_path) {
                net.insert(key(&c.trunc()), 1);
                for n in node.nets.iter().filter(|n| c.contains(*n)) {
                    net.insert(key(n), 0);
                }
            }
            let have_net: BTreeMap<(u32, ebpf_maps::NetKey), u8> =
                a.pod_network.iter().flatten().map(|(k, v)| ((k.prefix_len(), k.data()), v)).collect();
            let mut now_net = BTreeMap::new();
            put(&net, &have_net, &mut now_net, "the pod network map", |k, v| {
                a.pod_network.insert(&aya::maps::lpm_trie::Key::new(k.0, k.1), v, 0)
            })?;
            drop_gone(&net, &have_net, &mut now_net, "the pod network map", |k| {
                a.pod_network.remove(&aya::maps::lpm_trie::Key::new(k.0, k.1))
            })?;
            self.host = Some(host);
        }
        // Every wired pod's veth, by index.
        let veths: HashMap<String, u32> = model
            .pods
            .iter()
            .filter_map(|p| p.veth.as_ref())
            .filter_map(|v| node.links.get(v).map(|i| (v.clone(), *i)))
            .collect();
        let same_input =
            self.policy_from.as_ref().is_some_and(|(m, v)| (Arc::ptr_eq(m, model) || **m == **model) && *v == veths);
        if !full && self.policy.is_some() && same_input {
            return self.sync_pod_programs(&veths);
        }
        // Pod addresses to veths (the fast path between pods of this node).
        let addrs: BTreeMap<[u8; 16], u32> = model
            .pods
            .iter()
            .filter(|_| self.opts.pod_fast_path)
            .filter_map(|p| Some((frontends::addr_bytes(p.ip), *veths.get(p.veth.as_ref()?)?)))
            .collect();
        let have_addrs: BTreeMap<[u8; 16], u32> = a.pod_addrs.iter().flatten().collect();
        let mut now_addrs = BTreeMap::new();
        put(&addrs, &have_addrs, &mut now_addrs, "the pod address map", |k, v| a.pod_addrs.insert(k, v, 0))?;
        drop_gone(&addrs, &have_addrs, &mut now_addrs, "the pod address map", |k| a.pod_addrs.remove(k))?;
        let want = policy::entries(model, &veths);
        if !want.too_many_classes.is_empty() {
            tracing::warn!(
                pods = ?want.too_many_classes,
                max = ebpf_maps::policy::CLASSES,
                "more distinct port lists in one direction's rules than the maps hold: that direction allows nothing"
            );
        }
        let have = match self.policy.take() {
            Some(h) if !full => h,
            _ => Self::read_policy(a)?,
        };
        self.policy_from = None;
        let mut now = have.clone();
        let result = Self::apply_policy(a, &have, &want, &mut now);
        self.policy = Some(now);
        result?;
        self.policy_sets = (model.sets.len(), want.peers.len() + want.named.len());
        self.sync_pod_programs(&veths)?;
        self.policy_from = Some((model.clone(), veths));
        Ok(())
    }

    /// The policy programs on exactly the veths in `veths`, once the maps hold their pods (a program that finds
    /// no pod for its veth lets everything through).
    fn sync_pod_programs(&mut self, veths: &HashMap<String, u32>) -> Result<()> {
        let root = self.opts.bpf_root.clone();
        let a = self.attached.as_mut().expect("attached");
        for (name, index) in veths {
            if a.pod_tc.get(name).map(|(i, _)| i) != Some(index) {
                a.attach_pod(&root, name, *index)?;
            }
        }
        let mut stale: BTreeSet<String> = a.pod_tc.keys().filter(|n| !veths.contains_key(*n)).cloned().collect();
        stale.extend(
            attach::pinned_tc_interfaces(&root, &attach::POD_TC).into_iter().filter(|n| !veths.contains_key(n)),
        );
        for name in stale {
            tracing::debug!(veth = %name, "pod gone: policy programs detached");
            a.detach_pod(&root, &name);
        }
        Ok(())
    }

    fn read_policy(a: &attach::Attached) -> Result<policy::Entries> {
        let rb = |what: &'static str| move |e| DataplaneError::new(ErrorKind::Readback, what, e);
        let mut out = policy::Entries::default();
        for kv in a.pol_pods.iter() {
            let (k, v) = kv.map_err(rb("reading the policy pod map"))?;
            out.pods.insert(k, v);
        }
        for kv in a.pol_peers.iter() {
            let (k, v) = kv.map_err(rb("reading the policy peer map"))?;
            out.peers.insert((k.prefix_len(), k.data()), v);
        }
        for kv in a.pol_ports.iter() {
            let (k, v) = kv.map_err(rb("reading the policy port map"))?;
            out.ports.insert((k.prefix_len(), k.data()), v);
        }
        for kv in a.pol_named.iter() {
            let (k, v) = kv.map_err(rb("reading the policy named-port map"))?;
            out.named.insert(k, v);
        }
        Ok(out)
    }

    /// Brings the policy maps from `have` to `want`; `now` follows every update the kernel accepted. Rules and
    /// pods are written first, pods then rules removed.
    fn apply_policy(
        a: &mut attach::Attached,
        have: &policy::Entries,
        want: &policy::Entries,
        now: &mut policy::Entries,
    ) -> Result<()> {
        use aya::maps::lpm_trie::Key;
        put(&want.peers, &have.peers, &mut now.peers, "the policy peer map", |k, v| {
            a.pol_peers.insert(&Key::new(k.0, k.1), v, 0)
        })?;
        put(&want.ports, &have.ports, &mut now.ports, "the policy port map", |k, v| {
            a.pol_ports.insert(&Key::new(k.0, k.1), v, 0)
        })?;
        put(&want.named, &have.named, &mut now.named, "the policy named-port map", |k, v| a.pol_named.insert(k, v, 0))?;
        put(&want.pods, &have.pods, &mut now.pods, "the policy pod map", |k, v| a.pol_pods.insert(k, v, 0))?;
        drop_gone(&want.pods, &have.pods, &mut now.pods, "the policy pod map", |k| a.pol_pods.remove(k))?;
        drop_gone(&want.peers, &have.peers, &mut now.peers, "the policy peer map", |k| {
            a.pol_peers.remove(&Key::new(k.0, k.1))
        })?;
        drop_gone(&want.ports, &have.ports, &mut now.ports, "the policy port map", |k| {
            a.pol_ports.remove(&Key::new(k.0, k.1))
        })?;
        drop_gone(&want.named, &have.named, &mut now.named, "the policy named-port map", |k| a.pol_named.remove(k))
    }

    /// Ends the flows from outside pinned to a backend their frontend no longer has (`held` is the whole service
    /// map now): their conntrack and NAT entries go, and their next packet chooses again. What kube-proxy's
    /// conntrack cleanup does for UDP, for every protocol.
    fn end_stale_flows(&mut self, gone: &HashSet<(u8, [u8; 16], u16)>) -> usize {
        let (Some(a), Some(held)) = (self.attached.as_mut(), self.held.as_ref()) else { return 0 };
        let mut stale = Vec::new();
        for (k, v) in a.conntrack.iter().flatten() {
            if !gone.contains(&(k.proto, v.backend, v.backend_port)) {
                continue;
            }
            let front = ServiceKey { addr: k.daddr, port: k.dport, slot: 0, proto: k.proto, _pad: [0; 3] };
            if !frontends::has_backend(held, &front, &v.backend, v.backend_port) {
                stale.push((k, v));
            }
        }
        for (k, v) in &stale {
            let _ = a.conntrack.remove(k);
            let reply = if v.flags & ebpf_maps::ct::SNAT != 0 {
                FlowKey { saddr: v.backend, daddr: v.nat_addr, sport: v.backend_port, dport: v.nat_port, ..*k }
            } else {
                FlowKey { saddr: v.backend, daddr: k.saddr, sport: v.backend_port, dport: k.sport, ..*k }
            };
            let _ = a.nat.remove(&reply);
        }
        stale.len()
    }

    fn conntrack_max(&self) -> u32 {
        if self.opts.conntrack_max == 0 {
            ebpf_maps::CONNTRACK_MAX
        } else {
            self.opts.conntrack_max
        }
    }

    fn read_back(a: &attach::Attached) -> Result<Entries> {
        let mut out = Entries::new();
        for kv in a.services.iter() {
            let (k, v) = kv.map_err(|e| DataplaneError::new(ErrorKind::Readback, "reading the service map", e))?;
            out.insert(k, v);
        }
        Ok(out)
    }

    /// Applies the changes from `from` to `to` (the whole map, or the entries of the ports that changed); `held`
    /// follows each accepted update.
    fn apply_map(&mut self, from: &Entries, to: &Entries) -> Result<usize> {
        let a = self.attached.as_mut().expect("attached before apply");
        let held = self.held.as_mut().expect("read back before apply");
        let d = frontends::diff(from, to);
        let n = d.len();
        let failed = |e| DataplaneError::new(ErrorKind::Sets, "updating the service map", e);
        for (k, v) in d.upsert_backends.iter().chain(&d.upsert_frontends) {
            a.services.insert(k, v, 0).map_err(failed)?;
            held.insert(*k, *v);
        }
        for k in d.delete_frontends.iter().chain(&d.delete_backends) {
            match a.services.remove(k) {
                Ok(()) => {}
                // Already gone (someone else removed it): what we wanted.
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(failed(e)),
            }
            held.remove(k);
        }
        Ok(n)
    }

    fn try_sync(&mut self, state: &State, full: bool) -> Result<SyncReport> {
        let mut repaired = None;
        let tc_ifaces: Vec<String> = self.attached.as_ref().map(|a| a.tc.keys().cloned().collect()).unwrap_or_default();
        let pod_ifaces: Vec<String> =
            self.attached.as_ref().map(|a| a.pod_tc.keys().cloned().collect()).unwrap_or_default();
        if self.attached.is_some() && !attach::links_pinned(&self.opts.bpf_root, &tc_ifaces, &pod_ifaces) {
            // Someone removed our pins: attach again. The running programs stay attached (our descriptors hold
            // their links) until the new ones are in; replacing `attached` then drops the old links.
            repaired = Some("links");
            self.attached = Some(attach::attach(&self.opts.cgroup_root, &self.opts.bpf_root, self.conntrack_max())?);
            self.held = None;
        }
        if self.attached.is_none() {
            self.attached = Some(attach::attach(&self.opts.cgroup_root, &self.opts.bpf_root, self.conntrack_max())?);
            self.held = None;
        }
        let node = self.node_addresses()?;
        self.sync_interfaces(&node)?;
        self.sync_policy(&state.policy, &node, full)?;
        let addrs = node.addrs;
        let whole = full || self.held.is_none() || addrs != self.programmed_addrs;
        // The ports to (re)program, each with its entries (computed once: they go to the map and to the cache), and
        // the ids to drop.
        let one = |sp: &ServicePort| {
            let mut e = Entries::new();
            frontends::entries_of(sp, &addrs, &mut e);
            e
        };
        let mut from = Entries::new();
        let mut changed: Vec<(&ServicePort, Entries)> = Vec::new();
        let mut removed = Vec::new();
        if whole {
            // Everything, against what the map holds now (read back: someone may have changed it).
            self.held = Some(Self::read_back(self.attached.as_ref().expect("attached"))?);
            self.programmed.clear();
            from = self.held.clone().unwrap_or_default();
            changed = state.services.iter().map(|sp| (sp, one(sp))).collect();
        } else {
            // Only the ports that changed since the last sync, removed ones included.
            let mut found = 0;
            for sp in state.services.iter() {
                match self.programmed.get(&sp.id) {
                    Some((was, _)) if was == sp => found += 1,
                    other => {
                        if let Some((_, e)) = other {
                            found += 1;
                            from.extend(e.iter().map(|(k, v)| (*k, *v)));
                        }
                        changed.push((sp, one(sp)));
                    }
                }
            }
            // Every id is unique: when each programmed port was found again, none was removed.
            if found < self.programmed.len() {
                let ids: HashSet<&str> = state.services.iter().map(|sp| sp.id.as_str()).collect();
                for (id, (_, e)) in &self.programmed {
                    if !ids.contains(id.as_str()) {
                        from.extend(e.iter().map(|(k, v)| (*k, *v)));
                        removed.push(id.clone());
                    }
                }
            }
        }
        let to: Entries = changed.iter().flat_map(|(_, e)| e.iter().map(|(k, v)| (*k, *v))).collect();
        // Worked out before the map changes: a failure half-way must not lose the sockets to close (the read-back
        // of the next sync would no longer show those backends).
        let gone = frontends::removed_udp_backends(&from, &to);
        let gone_any = frontends::removed_backends(&from, &to);
        // Forgotten until the map holds the new state: a failure below leaves it unknown.
        let mut next = std::mem::take(&mut self.programmed);
        let applied = self.apply_map(&from, &to);
        if !gone.is_empty() {
            let failed = sockets::close_udp(&self.opts.run_dir, &gone);
            tracing::debug!(backends = gone.len(), failed, "closed connected UDP sockets of removed backends");
        }
        if !gone_any.is_empty() {
            // Even after a failed update: `held` has exactly what the map accepted, and the next sync's read-back
            // would no longer show the backends that went.
            let ended = self.end_stale_flows(&gone_any);
            tracing::debug!(backends = gone_any.len(), flows = ended, "ended flows from outside to removed backends");
        }
        let changed_entries = applied?;
        if whole {
            // Counted at full syncs only: a walk of the whole map.
            self.flows = self.attached.as_ref().map_or(0, |a| a.conntrack.keys().flatten().count());
        }
        for id in &removed {
            next.remove(id);
        }
        for (sp, e) in changed {
            next.insert(sp.id.clone(), (sp.clone(), e));
        }
        self.programmed = next;
        self.programmed_addrs = addrs;
        // The iptables side keeps its canaries only: no policy chains or sets (a previous iptables-mode run's go).
        let no_policy = State { policy: Arc::new(PolicyModel::default()), ..state.clone() };
        let ipt = self.ipt.sync(&no_policy, full)?;
        self.rules = ipt.held;
        Ok(SyncReport {
            wrote: changed_entries > 0 || ipt.wrote,
            full: full || ipt.full,
            repaired: repaired.or(ipt.repaired),
            held: self.held(),
        })
    }
}

/// Writes the entries of `want` that `have` lacks or holds otherwise; `now` follows each accepted write.
fn put<K: Ord + Copy, V: PartialEq + Copy>(
    want: &BTreeMap<K, V>,
    have: &BTreeMap<K, V>,
    now: &mut BTreeMap<K, V>,
    what: &str,
    mut insert: impl FnMut(&K, &V) -> std::result::Result<(), aya::maps::MapError>,
) -> Result<()> {
    for (k, v) in want.iter().filter(|(k, v)| have.get(*k) != Some(*v)) {
        insert(k, v).map_err(|e| DataplaneError::new(ErrorKind::Sets, format!("updating {what}"), e))?;
        now.insert(*k, *v);
    }
    Ok(())
}

/// Removes the entries of `have` that `want` lacks (one already gone is what was wanted).
fn drop_gone<K: Ord + Copy, V>(
    want: &BTreeMap<K, V>,
    have: &BTreeMap<K, V>,
    now: &mut BTreeMap<K, V>,
    what: &str,
    mut remove: impl FnMut(&K) -> std::result::Result<(), aya::maps::MapError>,
) -> Result<()> {
    for k in have.keys().filter(|k| !want.contains_key(*k)) {
        match remove(k) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(DataplaneError::new(ErrorKind::Sets, format!("removing from {what}"), e)),
        }
        now.remove(k);
    }
    Ok(())
}

impl Dataplane for EbpfDataplane {
    fn mode(&self) -> &'static str {
        "ebpf"
    }

    fn sync(&mut self, state: &State, full: bool) -> Result<SyncReport> {
        self.try_sync(state, full).inspect_err(|_| {
            self.held = None;
            self.programmed.clear();
        })
    }

    fn held(&self) -> Held {
        let map = self.held.as_ref().map_or(0, |h| h.len()) + self.policy.as_ref().map_or(0, |p| p.len());
        let programs = self
            .attached
            .as_ref()
            .map_or(0, |a| a.links.len() + a.tc.values().chain(a.pod_tc.values()).map(|(_, l)| l.len()).sum::<usize>());
        let mut counters = [0; proxy_state::dataplane::COUNTERS];
        if let Some(a) = &self.attached {
            for (i, c) in counters.iter_mut().enumerate().take(ebpf_maps::stats::COUNT as usize) {
                *c = a.stats.get(&(i as u32), 0).map_or(0, |v| v.iter().sum());
            }
        }
        Held {
            counters,
            entries: self.rules.entries + map,
            programs,
            sets: self.policy_sets.0,
            set_entries: self.policy_sets.1,
            flows: self.flows,
            flows_max: self.conntrack_max() as usize,
            ..self.rules
        }
    }

    fn cleanup(&mut self) -> Result<()> {
        self.attached = None;
        self.held = None;
        self.policy = None;
        attach::remove_all(&self.opts.bpf_root).map_err(|e| {
            DataplaneError::new(ErrorKind::Rules, format!("removing {}", self.opts.bpf_root.display()), e)
        })?;
        self.ipt.cleanup()
    }
}
