//! The eBPF dataplane (`--mode ebpf`), part 1: socket load balancing. The node's clients (its processes and its
//! pods, all in the cgroup given by `--cgroup-root`) have their TCP connects and UDP datagrams to a frontend sent
//! straight to a backend by cgroup/sock_addr programs ([`attach`]); the service map they read is brought to the
//! desired [`frontends::entries`] by difference, one map update per changed entry. What socket load balancing
//! cannot serve (traffic arriving from other hosts for node ports and external IPs, SCTP) and NetworkPolicy stay on
//! the iptables dataplane, told to leave TCP and UDP cluster IPs alone.
//!
//! Transactional as the iptables dataplane is: `held` (what the map holds) changes entry by entry as the kernel
//! accepts each update; a failed update forgets it, and the next sync reads the map back and diffs against that.

pub mod attach;
pub mod frontends;
pub mod sockets;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use proxy_state::{Dataplane, DataplaneError, ErrorKind, Held, ServicePort, State, SyncReport};

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
        }
    }

    /// The node's addresses node ports answer on (all but IPv6 link-local, within --nodeport-addresses if given).
    fn node_addresses(&self) -> Result<Vec<IpAddr>> {
        let mut rt = rtnl::Rtnl::new().map_err(|e| DataplaneError::new(ErrorKind::Readback, "netlink", e))?;
        let all = rt.addresses(None).map_err(|e| DataplaneError::new(ErrorKind::Readback, "listing addresses", e))?;
        let mut out: Vec<IpAddr> = all
            .into_iter()
            .map(|(_, n)| n.addr())
            // Not loopback: the programs run in every pod's namespace too, where localhost is the pod itself.
            .filter(|a| !a.is_loopback())
            .filter(|a| !matches!(a, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80))
            .filter(|a| self.nodeport_addresses.is_empty() || self.nodeport_addresses.iter().any(|n| n.contains(a)))
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
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
        if self.attached.is_some() && !attach::links_pinned(&self.opts.bpf_root) {
            // Someone removed our pins: attach again. The running programs stay attached (our descriptors hold
            // their links) until the new ones are in; replacing `attached` then drops the old links.
            repaired = Some("links");
            self.attached = Some(attach::attach(&self.opts.cgroup_root, &self.opts.bpf_root)?);
            self.held = None;
        }
        if self.attached.is_none() {
            self.attached = Some(attach::attach(&self.opts.cgroup_root, &self.opts.bpf_root)?);
            self.held = None;
        }
        let addrs = self.node_addresses()?;
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
        // Forgotten until the map holds the new state: a failure below leaves it unknown.
        let mut next = std::mem::take(&mut self.programmed);
        let applied = self.apply_map(&from, &to);
        if !gone.is_empty() {
            let failed = sockets::close_udp(&self.opts.run_dir, &gone);
            tracing::debug!(backends = gone.len(), failed, "closed connected UDP sockets of removed backends");
        }
        let changed_entries = applied?;
        for id in &removed {
            next.remove(id);
        }
        for (sp, e) in changed {
            next.insert(sp.id.clone(), (sp.clone(), e));
        }
        self.programmed = next;
        self.programmed_addrs = addrs;
        let ipt = self.ipt.sync(state, full)?;
        self.rules = ipt.held;
        Ok(SyncReport {
            wrote: changed_entries > 0 || ipt.wrote,
            full: full || ipt.full,
            repaired: repaired.or(ipt.repaired),
            held: self.held(),
        })
    }
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
        let map = self.held.as_ref().map_or(0, |h| h.len());
        let programs = self.attached.as_ref().map_or(0, |a| a.links.len());
        Held { entries: self.rules.entries + map, programs, ..self.rules }
    }

    fn cleanup(&mut self) -> Result<()> {
        self.attached = None;
        self.held = None;
        attach::remove_all(&self.opts.bpf_root).map_err(|e| {
            DataplaneError::new(ErrorKind::Rules, format!("removing {}", self.opts.bpf_root.display()), e)
        })?;
        self.ipt.cleanup()
    }
}
