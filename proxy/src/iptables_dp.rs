//! The iptables dataplane: [`crate::rules`] rendered into one `iptables-restore --noflush -w` payload per sync, the
//! jumps from the built-in chains checked on full syncs, and UDP conntrack entries of removed endpoints deleted
//! (otherwise a UDP client keeps talking to a dead pod).

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
    opts: rules::Options,
    last: Option<Rules>,
    /// The sets as the last sync left them (None: read them from the kernel).
    last_sets: Option<BTreeMap<String, Set>>,
    last_udp: BTreeSet<(IpAddr, IpAddr)>,
}

impl IptablesDataplane {
    pub fn new(cluster_cidr: Option<IpNet>, nodeport_addresses: Vec<IpNet>) -> IptablesDataplane {
        let opts = rules::Options { cluster_cidr, nodeport_addresses };
        IptablesDataplane {
            ipt: Iptables::new(Family::V4),
            opts,
            last: None,
            last_sets: None,
            last_udp: BTreeSet::new(),
        }
    }

    fn ensure_jumps(&self) -> Result<()> {
        let mut missing = String::new();
        for table in ["nat", "filter"] {
            let mut add = String::new();
            for (t, chain, rule) in rules::jumps().into_iter().filter(|(t, _, _)| *t == table) {
                if !self.ipt.exists(t, chain, &rule)? {
                    // First in the chain, as kube-proxy puts its jumps.
                    add += &format!("-I {chain} 1 {}\n", iptables::render(&rule));
                }
            }
            if !add.is_empty() {
                missing += &format!("*{table}\n{add}COMMIT\n");
            }
        }
        if !missing.is_empty() {
            self.ipt.restore(&missing).context("adding the jumps into tartan-proxy's chains")?;
        }
        // Policy is decided before anything in FORWARD accepts a packet (TARTAN-FORWARD, flannel's FLANNEL-FWD):
        // its jump must stay the first rule, even if the other jumps were re-added in front of it.
        let forward = self.ipt.save("filter")?;
        let first = forward.lines().find(|l| l.starts_with("-A FORWARD "));
        if !first.is_some_and(|l| l.contains(&format!("-j {POLICY}"))) {
            let (_, _, rule) =
                rules::jumps().into_iter().find(|(_, _, r)| r.last().is_some_and(|t| t == POLICY)).unwrap();
            let rule = iptables::render(&rule);
            self.ipt
                .restore(&format!("*filter\n-D FORWARD {rule}\n-I FORWARD 1 {rule}\nCOMMIT\n"))
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
}

impl Dataplane for IptablesDataplane {
    fn sync(&mut self, ports: &[ServicePort], policy: &PolicyModel, full: bool) -> Result<SyncReport> {
        let mut desired = rules::render(ports, &self.opts);
        render_policy(policy, &mut desired);
        // The first sync of a run rewrites everything too: what a previous run left is not known.
        let full = full || self.last.is_none();
        let previous = if full { None } else { self.last.as_ref() };
        // A full sync also deletes chains of ours that exist but are not wanted (left by a previous run).
        let stale = if full {
            vec![("nat", our_chains(&self.ipt, "nat")?), ("filter", our_chains(&self.ipt, "filter")?)]
        } else {
            Vec::new()
        };
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
        let payload = rules::payload(&desired, previous, &stale);
        self.ipt.restore(&payload).context("iptables-restore of the service and policy rules")?;
        // The policy chain decides every forwarded packet: read it back, and rewrite everything if the kernel does
        // not hold what was just written (seen once under concurrent iptables-nft writers in the node).
        let want = desired.filter.get(POLICY).map_or(0, Vec::len);
        let have_rules = self.ipt.list_rules("filter", POLICY)?;
        if have_rules != want {
            eprintln!("tartan-proxy: {POLICY} holds {have_rules} rules after a sync that wrote {want}; rewriting all");
            let payload = rules::payload(&desired, None, &[]);
            self.ipt.restore(&payload).context("iptables-restore of the service and policy rules (retry)")?;
        }
        let destroy = ipset::destroy_payload(&policy.sets, &have);
        if !destroy.is_empty() {
            ipset::restore(&destroy).context("destroying unused policy sets")?;
        }
        self.last_sets = Some(policy.sets.clone());
        if full {
            self.ensure_jumps()?;
        }
        let udp = Self::udp_pairs(ports);
        for (vip, ep) in self.last_udp.difference(&udp) {
            // Best effort: no entries is not an error worth failing a sync for.
            let _ = Command::new("conntrack")
                .args(["-D", "-p", "udp", "--orig-dst", &vip.to_string(), "--dst-nat", &ep.to_string()])
                .output();
        }
        self.last_udp = udp;
        let report = SyncReport {
            rules: desired.rule_count(),
            full,
            sets: policy.sets.len(),
            set_entries: policy.set_entries(),
        };
        self.last = Some(desired);
        Ok(report)
    }

    fn tampered(&mut self) -> bool {
        // The policy chain is rewritten on every sync; in the lab it was once found reverted to an earlier sync's
        // content some time after a sync that had read it back correctly (iptables-nft, with the agent and the CNI
        // plugin writing the same tables). Its length is checked too, so such a revert is repaired at the next
        // idle check rather than at the next periodic full sync.
        let want = self.last.as_ref().and_then(|r| r.filter.get(POLICY)).map(Vec::len);
        if let Some(want) = want {
            if self.ipt.list_rules("filter", POLICY).is_ok_and(|n| n != want) {
                return true;
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
        let mut jumps = String::new();
        for table in ["nat", "filter"] {
            jumps += &format!("*{table}\n");
            for (t, chain, rule) in rules::jumps().into_iter().filter(|(t, _, _)| *t == table) {
                if self.ipt.exists(t, chain, &rule)? {
                    jumps += &format!("-D {chain} {}\n", iptables::render(&rule));
                }
            }
            jumps += "COMMIT\n";
        }
        self.ipt.restore(&jumps).context("removing the jumps")?;
        let (nat, filter) = (our_chains(&self.ipt, "nat")?, our_chains(&self.ipt, "filter")?);
        self.ipt.restore(&rules::cleanup_payload(&nat, &filter)).context("removing tartan-proxy's chains")?;
        let sets = ipset::save(SET_PREFIX)?;
        let destroy = ipset::destroy_payload(&BTreeMap::new(), &sets);
        if !destroy.is_empty() {
            ipset::restore(&destroy).context("removing tartan-proxy's sets")?;
        }
        self.last = None;
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
