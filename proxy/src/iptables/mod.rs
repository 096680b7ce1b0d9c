//! The iptables dataplane: [`rules`] and [`policy_rules`] rendered into one `iptables-restore --noflush -w`
//! payload per sync (and, for IPv6 Services and the IPv6 half of NetworkPolicy, one `ip6tables-restore`), the policy sets brought up
//! to date with one `ipset restore` before them ([`sets`]), the jumps from the built-in chains checked on full
//! syncs, and UDP conntrack entries of removed endpoints deleted (otherwise a UDP client keeps talking to a dead
//! pod).
//!
//! Transactional: what it believes the kernel holds (`last*`) is updated only after every step of a sync
//! succeeded; any failure forgets it, so the next sync is full (kube-proxy's needFullSync) and never computes a
//! partial payload against a base the kernel never got.

pub mod policy_rules;
pub mod rules;
pub mod sets;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use ipnet::IpNet;
use iptables::ipset::{self, Set};
use iptables::{Family, Iptables, IptablesError};
use proxy_state::{Dataplane, DataplaneError, ErrorKind, Held, Proto, ServicePort, State, SyncReport};

use policy_rules::{render_policy, POLICY};
use rules::{Rules, CANARY};
use sets::SET_PREFIX;

/// A UDP frontend: a service address and port, or a node port (of a family).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum UdpFront {
    Address(IpAddr, u16),
    NodePort(u16, bool),
}

impl UdpFront {
    /// The frontends of a UDP Service port.
    fn of(p: &ServicePort) -> impl Iterator<Item = UdpFront> + '_ {
        let addrs = std::iter::once(&p.cluster_ip).chain(&p.external_ips).map(|ip| UdpFront::Address(*ip, p.port));
        addrs.chain(p.node_port.map(|np| UdpFront::NodePort(np, p.cluster_ip.is_ipv6())))
    }

    /// `conntrack` arguments selecting the UDP flows sent to this frontend.
    fn selector(&self) -> Vec<String> {
        let (v6, mut sel) = match self {
            UdpFront::Address(ip, port) => (
                ip.is_ipv6(),
                vec!["--orig-dst".to_string(), ip.to_string(), "--orig-port-dst".into(), port.to_string()],
            ),
            UdpFront::NodePort(port, v6) => (*v6, vec!["--orig-port-dst".to_string(), port.to_string()]),
        };
        let head = ["-D", "-f", if v6 { "ipv6" } else { "ipv4" }, "-p", "udp"];
        sel.splice(0..0, head.iter().map(|s| s.to_string()));
        sel
    }
}

/// Deletes conntrack entries. Best effort: conntrack exits 1 when there is nothing to delete, and a stale entry
/// that survives only delays one UDP client; it must not fail (and so fully repeat) a sync.
fn conntrack_delete(args: Vec<String>) {
    let _ = child_process::run(Command::new("conntrack").args(&args), None, Duration::from_secs(10));
}

/// The bridge netfilter switches NetworkPolicy and anti-spoofing depend on: without them, traffic between two pods
/// on one bridge never meets FORWARD and policy silently fails open.
const BRIDGE_NF: [&str; 2] =
    ["/proc/sys/net/bridge/bridge-nf-call-iptables", "/proc/sys/net/bridge/bridge-nf-call-ip6tables"];

pub struct IptablesDataplane {
    ipt: Iptables,
    ipt6: Iptables,
    /// Per family: IPv4, IPv6.
    opts: [rules::Options; 2],
    /// What the kernel holds, as of the last successful sync (None: unknown, the next sync is full).
    last: Option<Rules>,
    /// What the last sync wrote with ip6tables; None until the node has IPv6 pods or Services.
    last6: Option<Rules>,
    /// The sets as the last sync left them (None: read them from the kernel).
    last_sets: Option<BTreeMap<String, Set>>,
    /// The kernel's own rendering (`iptables -S`) of TARTAN-POLICY after the last sync, per family: what the idle
    /// check compares the chain's content with.
    policy_text: [Option<String>; 2],
    last_udp: BTreeSet<(UdpFront, IpAddr)>,
    /// UDP frontends with endpoints as of the last sync (None: the first sync of this run).
    last_udp_fronts: Option<BTreeSet<UdpFront>>,
    /// The state generation the kernel holds.
    applied: Option<u64>,
    held: Held,
}

fn err(kind: ErrorKind, what: &str) -> impl FnOnce(IptablesError) -> DataplaneError + '_ {
    move |e| {
        let kind = if e.is_timeout() {
            ErrorKind::Timeout
        } else if e.is_spawn() {
            ErrorKind::Spawn
        } else {
            kind
        };
        DataplaneError::new(kind, what, e)
    }
}

type Result<T> = std::result::Result<T, DataplaneError>;

/// The jump into TARTAN-POLICY, which must stay FORWARD's first rule.
fn policy_jump() -> Vec<String> {
    rules::jumps().into_iter().find(|(_, _, r)| r.last().is_some_and(|t| t == POLICY)).expect("listed").2
}

impl IptablesDataplane {
    /// `cluster_cidrs`: the pod network, a range per family; `nodeport_addresses`: where node ports answer (empty:
    /// every local address).
    pub fn new(cluster_cidrs: Vec<IpNet>, nodeport_addresses: Vec<IpNet>) -> IptablesDataplane {
        let family = |v6: bool| rules::Options {
            cluster_cidr: cluster_cidrs.iter().copied().find(|n| n.addr().is_ipv6() == v6),
            nodeport_addresses: nodeport_addresses.iter().copied().filter(|n| n.addr().is_ipv6() == v6).collect(),
            socket_lb: false,
        };
        let opts = [family(false), family(true)];
        IptablesDataplane {
            ipt: Iptables::new(Family::V4),
            ipt6: Iptables::new(Family::V6),
            opts,
            last: None,
            last6: None,
            last_sets: None,
            policy_text: [None, None],
            last_udp: BTreeSet::new(),
            last_udp_fronts: None,
            applied: None,
            held: Held::default(),
        }
    }

    /// For the eBPF dataplane: Services are left to its programs, only NetworkPolicy stays (see [`rules::Options`]).
    pub fn with_socket_lb(mut self) -> IptablesDataplane {
        for o in &mut self.opts {
            o.socket_lb = true;
        }
        self
    }

    /// Trust nothing: the next sync rewrites everything.
    fn forget(&mut self) {
        self.last = None;
        self.last6 = None;
        self.last_sets = None;
        self.policy_text = [None, None];
        self.applied = None;
    }

    /// Whether policy is ours to enforce with iptables on a bridge (not with the eBPF dataplane, whose programs on
    /// the pods' veths see every packet without br_netfilter).
    fn needs_bridge_nf(&self) -> bool {
        !self.opts[0].socket_lb
    }

    /// Turns the bridge netfilter switches on (loading br_netfilter if its switches are missing). Ok(true): one
    /// was off and is on now.
    fn ensure_bridge_nf() -> Result<bool> {
        let prereq = |what: String| DataplaneError::new(ErrorKind::Prerequisite, what.clone(), what);
        if !std::path::Path::new(BRIDGE_NF[0]).exists() {
            let _ = child_process::run(Command::new("modprobe").arg("br_netfilter"), None, Duration::from_secs(10));
            if !std::path::Path::new(BRIDGE_NF[0]).exists() {
                return Err(prereq(
                    "br_netfilter is not loaded and could not be loaded (modprobe br_netfilter): NetworkPolicy \
                     between pods on one bridge would not be enforced"
                        .into(),
                ));
            }
        }
        let mut changed = false;
        for path in BRIDGE_NF {
            let on = std::fs::read_to_string(path).map(|v| v.trim() == "1").unwrap_or(false);
            if !on {
                std::fs::write(path, "1").map_err(|e| prereq(format!("turning on {path}: {e}")))?;
                changed = true;
            }
        }
        Ok(changed)
    }

    /// Adds the missing `jumps` to `ipt` and keeps the policy jump first in FORWARD.
    fn ensure_jumps(ipt: &Iptables, jumps: &[(&str, &str, Vec<String>)]) -> Result<()> {
        let mut missing = String::new();
        for table in ["nat", "filter"] {
            let mut add = String::new();
            for (t, chain, rule) in jumps.iter().filter(|(t, _, _)| *t == table) {
                if !ipt.exists(t, chain, rule).map_err(err(ErrorKind::Readback, "checking the jumps"))? {
                    // First in the chain, as kube-proxy puts its jumps.
                    add += &format!("-I {chain} 1 {}\n", iptables::render(rule));
                }
            }
            if !add.is_empty() {
                missing += &format!("*{table}\n{add}COMMIT\n");
            }
        }
        if !missing.is_empty() {
            ipt.restore(&missing).map_err(err(ErrorKind::Rules, "adding the jumps into tartan-proxy's chains"))?;
        }
        // Policy is decided before anything in FORWARD accepts a packet (TARTAN-FORWARD, flannel's FLANNEL-FWD):
        // its jump must stay the first rule, even if the other jumps were re-added in front of it.
        let forward = ipt.save("filter").map_err(err(ErrorKind::Readback, "reading FORWARD"))?;
        let first = forward.lines().find(|l| l.starts_with("-A FORWARD "));
        if !first.is_some_and(|l| l.contains(&format!("-j {POLICY}"))) {
            let rule = iptables::render(&policy_jump());
            ipt.restore(&format!("*filter\n-D FORWARD {rule}\n-I FORWARD 1 {rule}\nCOMMIT\n"))
                .map_err(err(ErrorKind::Rules, "moving the policy jump first in FORWARD"))?;
        }
        Ok(())
    }

    /// (frontend, endpoint IP) pairs of UDP services: the flows these rules NAT. The eBPF dataplane NATs nothing
    /// through conntrack (its programs keep their own flow state): none then.
    fn udp_pairs(&self, ports: &[ServicePort]) -> BTreeSet<(UdpFront, IpAddr)> {
        let mut out = BTreeSet::new();
        if self.opts[0].socket_lb {
            return out;
        }
        for p in ports.iter().filter(|p| p.proto == Proto::Udp) {
            for f in UdpFront::of(p) {
                for e in &p.endpoints {
                    out.insert((f, e.ip));
                }
            }
        }
        out
    }

    /// UDP frontends that have endpoints: where a datagram that arrived while there were none left a conntrack
    /// entry without NAT (to the node itself, or dropped), which the flow's later datagrams would keep following.
    fn udp_fronts(&self, ports: &[ServicePort]) -> BTreeSet<UdpFront> {
        let mut out = BTreeSet::new();
        if self.opts[0].socket_lb {
            return out;
        }
        for p in ports.iter().filter(|p| p.proto == Proto::Udp && !p.cluster.is_empty()) {
            out.extend(UdpFront::of(p));
        }
        out
    }

    /// The kernel's rendering of TARTAN-POLICY's rules.
    fn policy_chain(ipt: &Iptables) -> Result<String> {
        let text =
            ipt.list_chain("filter", POLICY).map_err(err(ErrorKind::Readback, "reading the policy chain back"))?;
        Ok(text.lines().filter(|l| l.starts_with("-A ")).collect::<Vec<_>>().join("\n"))
    }

    /// Writes `desired` with `ipt`: everything when `previous` is None (also deleting `stale` chains of ours),
    /// otherwise only what changed; then checks that the policy chain holds what was written and returns the
    /// kernel's rendering of it.
    fn write(ipt: &Iptables, desired: &Rules, previous: Option<&Rules>) -> Result<String> {
        let stale = match previous {
            None => vec![("nat", our_chains(ipt, "nat")?), ("filter", our_chains(ipt, "filter")?)],
            Some(_) => vec![],
        };
        let payload = rules::payload(desired, previous, &stale);
        ipt.restore(&payload).map_err(err(ErrorKind::Rules, "iptables-restore of the service and policy rules"))?;
        // The policy chain decides every forwarded packet: read it back, and fail the sync (the next one is full)
        // if the kernel does not hold what was just written.
        let want = desired.filter.get(POLICY).map_or(0, Vec::len);
        let text = Self::policy_chain(ipt)?;
        let have = text.lines().count();
        if have != want {
            let why = format!("{POLICY} holds {have} rules after a sync that wrote {want}");
            return Err(DataplaneError::new(ErrorKind::Readback, "reading the policy chain back", why));
        }
        Ok(text)
    }

    /// Drift since the last sync, by kind: a setting turned off, our canary gone, the policy chain's content
    /// changed, or a set's entry count changed.
    fn drift(&mut self) -> Result<Option<&'static str>> {
        if self.needs_bridge_nf() && Self::ensure_bridge_nf()? {
            return Ok(Some("bridge-nf"));
        }
        for (ipt, text) in [(&self.ipt, &self.policy_text[0]), (&self.ipt6, &self.policy_text[1])] {
            if let Some(want) = text {
                if Self::policy_chain(ipt)? != *want {
                    return Ok(Some("policy-chain"));
                }
            }
        }
        // A set flushed or destroyed by hand opens or closes policy holes without touching a rule; compare entry
        // counts, read from the set headers (cheap every second, whatever the sets hold).
        if let Some(last) = self.last_sets.as_ref().filter(|l| !l.is_empty()) {
            let have = ipset::entry_counts(SET_PREFIX).map_err(err(ErrorKind::Readback, "reading set headers"))?;
            if last.iter().any(|(name, set)| have.get(name) != Some(&set.members.len())) {
                return Ok(Some("sets"));
            }
        }
        let bins: &[&str] = if self.last6.is_some() { &["iptables", "ip6tables"] } else { &["iptables"] };
        for bin in bins {
            for t in ["nat", "filter"] {
                let out = child_process::run(
                    Command::new(bin).args(["-w", "-t", t, "-S", CANARY]),
                    None,
                    Duration::from_secs(30),
                )
                .map_err(|e| DataplaneError::new(ErrorKind::Readback, "looking for the canary", e))?;
                if !out.status.success() {
                    return Ok(Some("canary"));
                }
            }
        }
        Ok(None)
    }

    /// Deletes the conntrack entries of UDP flows to endpoints that left (else a UDP client keeps talking to a dead
    /// pod), and remembers `udp` as what is programmed.
    fn clear_udp(&mut self, udp: &BTreeSet<(UdpFront, IpAddr)>, fronts: BTreeSet<UdpFront>) {
        // Frontends that gained endpoints in this run: their flows' entries without NAT go (kube-proxy does the
        // same), so that a client sending from one port all along reaches an endpoint now. Not at a run's first
        // sync: what changed before it is unknown, and the entries then are live flows.
        if let Some(last) = &self.last_udp_fronts {
            for f in fronts.difference(last) {
                conntrack_delete(f.selector());
            }
        }
        self.last_udp_fronts = Some(fronts);
        for (f, ep) in self.last_udp.difference(udp) {
            let mut sel = f.selector();
            sel.extend(["--dst-nat".to_string(), ep.to_string()]);
            conntrack_delete(sel);
        }
        self.last_udp = udp.clone();
    }

    fn apply(&mut self, state: &State, full: bool) -> Result<SyncReport> {
        let (ports, policy) = (&state.services[..], &*state.policy);
        // The first sync of a run rewrites everything too: what a previous run left is not known.
        let full = full || self.last.is_none();
        if full && self.needs_bridge_nf() {
            Self::ensure_bridge_nf()?;
        }
        // Per family, by reference: a sync must not copy every Service port of the cluster.
        let (ports4, ports6): (Vec<&ServicePort>, Vec<&ServicePort>) =
            ports.iter().partition(|p| p.cluster_ip.is_ipv4());
        let mut desired = rules::render(ports4, &self.opts[0]);
        render_policy(policy, false, &mut desired);
        let want_sets = sets::ipsets(&policy.sets);
        // Sets first (the rules refer to them), rules next, unused sets last (once no rule refers to them).
        let have = match (&self.last_sets, full) {
            (Some(s), false) => s.clone(),
            _ => ipset::save(SET_PREFIX).map_err(err(ErrorKind::Readback, "reading the policy sets"))?,
        };
        let update = ipset::update_payload(&want_sets, &have);
        let udp = self.udp_pairs(ports);
        let fronts = self.udp_fronts(ports);
        if !full
            && update.is_empty()
            && self.last.as_ref() == Some(&desired)
            && ipset::destroy_payload(&want_sets, &have).is_empty()
        {
            // The rules and sets already hold this state (with socket load balancing, a cluster-IP change touches
            // no rule): no iptables-restore, only the UDP flows of removed endpoints to clear.
            let v6_same = match &self.last6 {
                None => !policy.pods.iter().any(|p| p.ip.is_ipv6()) && ports6.is_empty(),
                Some(last6) => {
                    let mut desired6 = rules::render(ports6.iter().copied(), &self.opts[1]);
                    render_policy(policy, true, &mut desired6);
                    *last6 == desired6
                }
            };
            if v6_same {
                self.clear_udp(&udp, fronts);
                self.applied = Some(state.generation);
                return Ok(SyncReport { wrote: false, full, repaired: None, held: self.held });
            }
        }
        // From the first kernel write on, a failure leaves the kernel somewhere between `last` and `desired`:
        // forget both until every step succeeded.
        let (previous, previous6) = (self.last.take(), self.last6.take());
        self.forget();
        if !update.is_empty() {
            ipset::restore(&update).map_err(err(ErrorKind::Sets, "ipset restore of the policy sets"))?;
        }
        let text4 = Self::write(&self.ipt, &desired, if full { None } else { previous.as_ref() })?;
        if full {
            Self::ensure_jumps(&self.ipt, &rules::jumps_for(self.opts[0].socket_lb))?;
        }
        // IPv6 only once the node has IPv6 pods or Services (a node without IPv6 need not have ip6tables).
        let v6_pods = policy.pods.iter().any(|p| p.ip.is_ipv6());
        let mut last6 = None;
        let mut text6 = None;
        if v6_pods || !ports6.is_empty() || previous6.is_some() {
            let mut desired6 = rules::render(ports6.iter().copied(), &self.opts[1]);
            render_policy(policy, true, &mut desired6);
            let full6 = full || previous6.is_none();
            text6 = Some(Self::write(&self.ipt6, &desired6, if full6 { None } else { previous6.as_ref() })?);
            if full6 {
                Self::ensure_jumps(&self.ipt6, &rules::jumps_for(self.opts[0].socket_lb))?;
            }
            last6 = Some(desired6);
        }
        let destroy = ipset::destroy_payload(&want_sets, &have);
        if !destroy.is_empty() {
            ipset::restore(&destroy).map_err(err(ErrorKind::Sets, "destroying unused policy sets"))?;
        }
        self.clear_udp(&udp, fronts);
        // Every step succeeded: the kernel holds `desired`.
        let entries = desired.rule_count() + last6.as_ref().map_or(0, Rules::rule_count);
        self.held = Held {
            entries,
            sets: want_sets.len(),
            set_entries: want_sets.values().map(|s| s.members.len()).sum(),
            ..Held::default()
        };
        self.last = Some(desired);
        self.last6 = last6;
        self.last_sets = Some(want_sets);
        self.policy_text = [Some(text4), text6];
        self.applied = Some(state.generation);
        Ok(SyncReport { wrote: true, full, repaired: None, held: self.held })
    }
}

impl Dataplane for IptablesDataplane {
    fn mode(&self) -> &'static str {
        "iptables"
    }

    fn sync(&mut self, state: &State, full: bool) -> Result<SyncReport> {
        let mut repaired = None;
        if !full && self.applied == Some(state.generation) {
            match self.drift() {
                Ok(None) => return Ok(SyncReport { held: self.held, ..Default::default() }),
                Ok(Some(kind)) => repaired = Some(kind),
                Err(e) => {
                    self.forget();
                    return Err(e);
                }
            }
        }
        let full = full || repaired.is_some();
        let mut report = self.apply(state, full).inspect_err(|_| self.forget())?;
        report.repaired = repaired;
        Ok(report)
    }

    fn held(&self) -> Held {
        self.held
    }

    fn cleanup(&mut self) -> Result<()> {
        for ipt in [&self.ipt, &self.ipt6] {
            // ip6tables may be missing on an IPv4-only node; there is nothing of ours to remove then.
            if ipt.family == Family::V6 && ipt.save("filter").is_err() {
                continue;
            }
            let mut jumps = String::new();
            for table in ["nat", "filter"] {
                jumps += &format!("*{table}\n");
                for (t, chain, rule) in rules::jumps().into_iter().filter(|(t, _, _)| *t == table) {
                    if ipt.exists(t, chain, &rule).map_err(err(ErrorKind::Readback, "checking the jumps"))? {
                        jumps += &format!("-D {chain} {}\n", iptables::render(&rule));
                    }
                }
                jumps += "COMMIT\n";
            }
            ipt.restore(&jumps).map_err(err(ErrorKind::Rules, "removing the jumps"))?;
            let (nat, filter) = (our_chains(ipt, "nat")?, our_chains(ipt, "filter")?);
            ipt.restore(&rules::cleanup_payload(&nat, &filter))
                .map_err(err(ErrorKind::Rules, "removing tartan-proxy's chains"))?;
        }
        let sets = ipset::save(SET_PREFIX).map_err(err(ErrorKind::Readback, "reading the policy sets"))?;
        let destroy = ipset::destroy_payload(&BTreeMap::new(), &sets);
        if !destroy.is_empty() {
            ipset::restore(&destroy).map_err(err(ErrorKind::Sets, "removing tartan-proxy's sets"))?;
        }
        self.forget();
        Ok(())
    }
}

/// The TARTAN-* chains of a table that are tartan-proxy's (not the CNI plugin's masquerade chains).
fn our_chains(ipt: &Iptables, table: &str) -> Result<Vec<String>> {
    let text = ipt.save(table).map_err(err(ErrorKind::Readback, "listing our chains"))?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| c.starts_with("TARTAN-") && !c.starts_with(node_contract::PLUGIN_MASQ_CHAIN_PREFIX))
        .map(String::from)
        .collect())
}
