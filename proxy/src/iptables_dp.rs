//! The iptables dataplane: [`crate::rules`] and [`crate::policy_rules`] rendered into one
//! `iptables-restore --noflush -w` payload per sync (and, for the IPv6 half of NetworkPolicy, one
//! `ip6tables-restore`), the policy sets brought up to date with one `ipset restore` before them, the jumps from
//! the built-in chains checked on full syncs, and UDP conntrack entries of removed endpoints deleted (otherwise a
//! UDP client keeps talking to a dead pod).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::process::Command;

use anyhow::{Context, Result};
use ipnet::IpNet;
use iptables::ipset::{self, Set};
use iptables::{Family, Iptables};

use crate::model::{Proto, ServicePort};
use crate::policy::{PolicyModel, SET_PREFIX};
use crate::policy_rules::{render_policy, POLICY};
use crate::rules::{self, Rules, CANARY};
use crate::{Dataplane, SyncReport};

pub struct IptablesDataplane {
    ipt: Iptables,
    ipt6: Iptables,
    opts: rules::Options,
    last: Option<Rules>,
    /// What the last sync wrote with ip6tables (policy only); None until a node has IPv6 pods.
    last6: Option<Rules>,
    /// The sets as the last sync left them (None: read them from the kernel).
    last_sets: Option<BTreeMap<String, Set>>,
    last_udp: BTreeSet<(IpAddr, IpAddr)>,
}

/// The jump into TARTAN-POLICY, which must stay FORWARD's first rule.
fn policy_jump() -> Vec<String> {
    rules::jumps().into_iter().find(|(_, _, r)| r.last().is_some_and(|t| t == POLICY)).expect("listed").2
}

impl IptablesDataplane {
    pub fn new(cluster_cidr: Option<IpNet>, nodeport_addresses: Vec<IpNet>) -> IptablesDataplane {
        let opts = rules::Options { cluster_cidr, nodeport_addresses };
        IptablesDataplane {
            ipt: Iptables::new(Family::V4),
            ipt6: Iptables::new(Family::V6),
            opts,
            last: None,
            last6: None,
            last_sets: None,
            last_udp: BTreeSet::new(),
        }
    }

    /// Adds the missing `jumps` to `ipt` and keeps the policy jump first in FORWARD.
    fn ensure_jumps(ipt: &Iptables, jumps: &[(&str, &str, Vec<String>)]) -> Result<()> {
        let mut missing = String::new();
        for table in ["nat", "filter"] {
            let mut add = String::new();
            for (t, chain, rule) in jumps.iter().filter(|(t, _, _)| *t == table) {
                if !ipt.exists(t, chain, rule)? {
                    // First in the chain, as kube-proxy puts its jumps.
                    add += &format!("-I {chain} 1 {}\n", iptables::render(rule));
                }
            }
            if !add.is_empty() {
                missing += &format!("*{table}\n{add}COMMIT\n");
            }
        }
        if !missing.is_empty() {
            ipt.restore(&missing).context("adding the jumps into tartan-proxy's chains")?;
        }
        // Policy is decided before anything in FORWARD accepts a packet (TARTAN-FORWARD, flannel's FLANNEL-FWD):
        // its jump must stay the first rule, even if the other jumps were re-added in front of it.
        let forward = ipt.save("filter")?;
        let first = forward.lines().find(|l| l.starts_with("-A FORWARD "));
        if !first.is_some_and(|l| l.contains(&format!("-j {POLICY}"))) {
            let rule = iptables::render(&policy_jump());
            ipt.restore(&format!("*filter\n-D FORWARD {rule}\n-I FORWARD 1 {rule}\nCOMMIT\n"))
                .context("moving the policy jump first in FORWARD")?;
        }
        Ok(())
    }

    /// (cluster IP or external IP, endpoint IP) pairs of UDP services.
    fn udp_pairs(ports: &[ServicePort]) -> BTreeSet<(IpAddr, IpAddr)> {
        let mut out = BTreeSet::new();
        for p in ports.iter().filter(|p| p.proto == Proto::Udp) {
            for e in &p.endpoints {
                for vip in p.cluster_ip.iter().chain(&p.external_ips) {
                    out.insert((*vip, e.ip));
                }
            }
        }
        out
    }

    /// Writes `desired` with `ipt`: everything when `previous` is None (also deleting `stale` chains of ours),
    /// otherwise only what changed; then checks that the policy chain holds what was written.
    fn write(ipt: &Iptables, desired: &Rules, previous: Option<&Rules>, full: bool) -> Result<()> {
        let stale =
            if full { vec![("nat", our_chains(ipt, "nat")?), ("filter", our_chains(ipt, "filter")?)] } else { vec![] };
        let payload = rules::payload(desired, previous, &stale);
        ipt.restore(&payload).context("iptables-restore of the service and policy rules")?;
        // The policy chain decides every forwarded packet: read it back, and rewrite everything if the kernel does
        // not hold what was just written.
        let want = desired.filter.get(POLICY).map_or(0, Vec::len);
        let have = ipt.list_rules("filter", POLICY)?;
        if have != want {
            eprintln!("tartan-proxy: {POLICY} holds {have} rules after a sync that wrote {want}; rewriting all");
            ipt.restore(&rules::payload(desired, None, &[])).context("iptables-restore (rewrite)")?;
        }
        Ok(())
    }
}

impl Dataplane for IptablesDataplane {
    fn sync(&mut self, ports: &[ServicePort], policy: &PolicyModel, full: bool) -> Result<SyncReport> {
        let mut desired = rules::render(ports, &self.opts);
        render_policy(policy, false, &mut desired);
        // The first sync of a run rewrites everything too: what a previous run left is not known.
        let full = full || self.last.is_none();
        // Sets first (the rules refer to them), rules next, unused sets last (once no rule refers to them).
        let have = match (&self.last_sets, full) {
            (Some(s), false) => s.clone(),
            _ => ipset::save(SET_PREFIX)?,
        };
        let update = ipset::update_payload(&policy.sets, &have);
        if !update.is_empty() {
            self.last_sets = None;
            ipset::restore(&update).context("ipset restore of the policy sets")?;
        }
        Self::write(&self.ipt, &desired, if full { None } else { self.last.as_ref() }, full)?;
        if full {
            Self::ensure_jumps(&self.ipt, &rules::jumps())?;
        }
        // IPv6: policy only, and only once the node has IPv6 pods (a node without IPv6 need not have ip6tables).
        let v6_pods = policy.pods.iter().any(|p| p.ip.is_ipv6());
        if v6_pods || self.last6.is_some() {
            let mut desired6 = Rules::default();
            render_policy(policy, true, &mut desired6);
            let full6 = full || self.last6.is_none();
            Self::write(&self.ipt6, &desired6, if full6 { None } else { self.last6.as_ref() }, full6)?;
            if full6 {
                Self::ensure_jumps(&self.ipt6, &[("filter", "FORWARD", policy_jump())])?;
            }
            self.last6 = Some(desired6);
        }
        let destroy = ipset::destroy_payload(&policy.sets, &have);
        if !destroy.is_empty() {
            ipset::restore(&destroy).context("destroying unused policy sets")?;
        }
        self.last_sets = Some(policy.sets.clone());
        let udp = Self::udp_pairs(ports);
        for (vip, ep) in self.last_udp.difference(&udp) {
            // Best effort: no entries is not an error worth failing a sync for.
            let _ = Command::new("conntrack")
                .args(["-D", "-p", "udp", "--orig-dst", &vip.to_string(), "--dst-nat", &ep.to_string()])
                .output();
        }
        self.last_udp = udp;
        let rules = desired.rule_count() + self.last6.as_ref().map_or(0, Rules::rule_count);
        let report = SyncReport { rules, full, sets: policy.sets.len(), set_entries: policy.set_entries() };
        self.last = Some(desired);
        Ok(report)
    }

    fn tampered(&mut self) -> bool {
        // The policy chain is rewritten on every sync; in the lab it was once found reverted to an earlier sync's
        // content some time after a sync that had read it back correctly (iptables-nft, with the agent and the CNI
        // plugin writing the same tables). Its length is checked too, so such a revert is repaired at the next
        // idle check rather than at the next periodic full sync.
        for (ipt, last) in [(&self.ipt, &self.last), (&self.ipt6, &self.last6)] {
            if let Some(want) = last.as_ref().and_then(|r| r.filter.get(POLICY)).map(Vec::len) {
                if ipt.list_rules("filter", POLICY).is_ok_and(|n| n != want) {
                    return true;
                }
            }
        }
        // A set flushed or destroyed by hand opens or closes policy holes without touching a rule; compare entry
        // counts, read from the set headers (cheap every second, whatever the sets hold).
        if let Some(last) = self.last_sets.as_ref().filter(|l| !l.is_empty()) {
            if let Ok(have) = ipset::entry_counts(SET_PREFIX) {
                if last.iter().any(|(name, set)| have.get(name) != Some(&set.members.len())) {
                    return true;
                }
            }
        }
        ["nat", "filter"].iter().any(|t| {
            Command::new("iptables")
                .args(["-w", "-t", t, "-S", CANARY])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .map(|s| !s.success())
                .unwrap_or(true)
        })
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
                    if ipt.exists(t, chain, &rule)? {
                        jumps += &format!("-D {chain} {}\n", iptables::render(&rule));
                    }
                }
                jumps += "COMMIT\n";
            }
            ipt.restore(&jumps).context("removing the jumps")?;
            let (nat, filter) = (our_chains(ipt, "nat")?, our_chains(ipt, "filter")?);
            ipt.restore(&rules::cleanup_payload(&nat, &filter)).context("removing tartan-proxy's chains")?;
        }
        let sets = ipset::save(SET_PREFIX)?;
        let destroy = ipset::destroy_payload(&BTreeMap::new(), &sets);
        if !destroy.is_empty() {
            ipset::restore(&destroy).context("removing tartan-proxy's sets")?;
        }
        self.last = None;
        self.last6 = None;
        self.last_sets = None;
        Ok(())
    }
}

/// The TARTAN-* chains of a table that are tartan-proxy's (not the CNI plugin's TARTAN-MASQ-*).
fn our_chains(ipt: &Iptables, table: &str) -> Result<Vec<String>> {
    let text = ipt.save(table)?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| c.starts_with("TARTAN-") && !c.starts_with("TARTAN-MASQ-"))
        .map(String::from)
        .collect())
}
