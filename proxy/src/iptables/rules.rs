//! The iptables dataplane's rules, as kube-proxy's iptables mode lays them out, under TARTAN-* chain names (so
//! `--cleanup` can remove exactly what is ours):
//!
//! nat:    PREROUTING, OUTPUT -> TARTAN-SERVICES -> TARTAN-SVC-<h> (all endpoints) | TARTAN-SVL-<h> (local ones)
//!         -> TARTAN-SEP-<h> (DNAT); external IPs and, last, `addrtype LOCAL` -> TARTAN-NODEPORTS -> TARTAN-EXT-<h>
//!         (externalTrafficPolicy). TARTAN-MARK-MASQ sets 0x4000 (the mark flannel's rules leave alone);
//!         POSTROUTING -> TARTAN-POSTROUTING masquerades marked packets.
//! filter: FORWARD/OUTPUT (new) -> TARTAN-SERVICES: REJECT for services without endpoints; INPUT/FORWARD (new, to a
//!         local address) -> TARTAN-EXTERNAL-SERVICES: REJECT or DROP for node ports and external IPs without
//!         (local) endpoints; FORWARD -> TARTAN-FORWARD: drop INVALID, accept marked and established. FORWARD's
//!         first rule jumps to NetworkPolicy's TARTAN-POLICY (see [`super::policy_rules`]).
//!
//! Pure: the chains as data; [`payload`] turns them into one iptables-restore transaction that rewrites only the
//! chains that changed since the last sync (kube-proxy's partial sync).

use std::collections::BTreeMap;

use ipnet::IpNet;

use proxy_state::{Endpoint, ServicePort};

use super::policy_rules::POLICY;

/// The masquerade mark, as iptables writes it.
fn mark() -> String {
    format!("{:#x}", node_contract::MASQ_MARK)
}
pub const CANARY: &str = "TARTAN-PROXY-CANARY";

/// Chains per table, each with its rules (the part after `-A CHAIN `).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    pub nat: BTreeMap<String, Vec<String>>,
    pub filter: BTreeMap<String, Vec<String>>,
}

impl Rules {
    pub fn rule_count(&self) -> usize {
        self.nat.values().chain(self.filter.values()).map(Vec::len).sum()
    }
}

/// Top-level chains: rewritten on every sync (they list every service).
const TOP_NAT: [&str; 5] = ["TARTAN-SERVICES", "TARTAN-NODEPORTS", "TARTAN-MARK-MASQ", "TARTAN-POSTROUTING", CANARY];
const TOP_FILTER: [&str; 5] = ["TARTAN-SERVICES", "TARTAN-EXTERNAL-SERVICES", "TARTAN-FORWARD", POLICY, CANARY];

/// The jumps a dataplane needs: all of them, or with the eBPF dataplane serving Services only NetworkPolicy's.
pub fn jumps_for(socket_lb: bool) -> Vec<(&'static str, &'static str, Vec<String>)> {
    let mut j = jumps();
    if socket_lb {
        j.retain(|(_, _, r)| r.last().is_some_and(|t| t == POLICY));
    }
    j
}

/// Where the built-in chains jump into ours: (table, built-in chain, rule).
pub fn jumps() -> Vec<(&'static str, &'static str, Vec<String>)> {
    let v = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
    let c = "-m comment --comment tartan-proxy";
    vec![
        ("nat", "PREROUTING", v(&format!("{c} -j TARTAN-SERVICES"))),
        ("nat", "OUTPUT", v(&format!("{c} -j TARTAN-SERVICES"))),
        ("nat", "POSTROUTING", v(&format!("{c} -j TARTAN-POSTROUTING"))),
        ("filter", "INPUT", v(&format!("-m conntrack --ctstate NEW {c} -j TARTAN-EXTERNAL-SERVICES"))),
        ("filter", "FORWARD", v(&format!("-m conntrack --ctstate NEW {c} -j TARTAN-SERVICES"))),
        ("filter", "FORWARD", v(&format!("-m conntrack --ctstate NEW {c} -j TARTAN-EXTERNAL-SERVICES"))),
        ("filter", "FORWARD", v(&format!("{c} -j TARTAN-FORWARD"))),
        ("filter", "OUTPUT", v(&format!("-m conntrack --ctstate NEW {c} -j TARTAN-SERVICES"))),
        // Last, so that inserting each at the top leaves it first (ensure_jumps keeps it there).
        ("filter", "FORWARD", v(&format!("{c} -j {}", POLICY))),
    ]
}

pub(crate) fn chain(kind: &str, id: &str) -> String {
    format!("TARTAN-{kind}-{}", node_contract::name_hash(id))
}

fn sep_chain(sp: &ServicePort, e: &Endpoint) -> String {
    chain("SEP", &format!("{}/{}:{}", sp.id, e.ip, e.port))
}

/// The whole-address mask of `ip`'s family (session affinity remembers whole client addresses).
fn host_mask(ip: std::net::IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "255.255.255.255"
    } else {
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    }
}

/// REJECT with the family's port-unreachable.
fn reject(ip: std::net::IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "REJECT --reject-with icmp-port-unreachable"
    } else {
        "REJECT --reject-with icmp6-port-unreachable"
    }
}

fn host(ip: std::net::IpAddr) -> String {
    IpNet::from(ip).to_string()
}

pub(crate) fn comment(s: &str) -> String {
    format!("-m comment --comment \"{s}\"")
}

/// What the ruleset depends on besides the services.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Traffic to a ClusterIP from outside the pod network is masqueraded.
    pub cluster_cidr: Option<IpNet>,
    /// Node ports answer only on local addresses within these (kube-proxy's --nodeport-addresses); empty: all.
    pub nodeport_addresses: Vec<IpNet>,
    /// Services are the eBPF dataplane's (socket load balancing for the node's clients, tc programs for traffic
    /// from outside): not one rule for them here, only NetworkPolicy's.
    pub socket_lb: bool,
}

/// The ruleset for `ports`.
pub fn render<'a>(ports: impl IntoIterator<Item = &'a ServicePort>, opts: &Options) -> Rules {
    let cluster_cidr = opts.cluster_cidr;
    let mut r = Rules::default();
    if opts.socket_lb {
        // The eBPF dataplane serves every Service: only the canaries (drift detection) and the policy chain.
        r.nat.insert(CANARY.into(), Vec::new());
        r.filter.insert(CANARY.into(), Vec::new());
        r.filter.insert(POLICY.into(), Vec::new());
        return r;
    }
    let mark = mark();
    for t in TOP_NAT {
        r.nat.insert(t.into(), Vec::new());
    }
    for t in TOP_FILTER {
        r.filter.insert(t.into(), Vec::new());
    }
    r.nat.get_mut("TARTAN-MARK-MASQ").unwrap().push(format!("-j MARK --or-mark {mark}"));
    r.nat.get_mut("TARTAN-POSTROUTING").unwrap().extend([
        format!("-m mark ! --mark {mark}/{mark} -j RETURN"),
        // Cleared so that a packet re-entering the stack (through a tunnel) is not masqueraded twice.
        format!("-j MARK --xor-mark {mark}"),
        format!("{} -j MASQUERADE --random-fully", comment("tartan-proxy service traffic requiring SNAT")),
    ]);
    r.filter.get_mut("TARTAN-FORWARD").unwrap().extend([
        "-m conntrack --ctstate INVALID -j DROP".to_string(),
        format!("{} -m mark --mark {mark}/{mark} -j ACCEPT", comment("tartan-proxy forwarding rules")),
        format!(
            "{} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            comment("tartan-proxy forwarding conntrack rule")
        ),
    ]);

    for sp in ports {
        let p = sp.proto.as_str();
        let dport = |port: u16| format!("-p {p} -m {p} --dport {port}");
        let (svc, svl, ext) = (chain("SVC", &sp.id), chain("SVL", &sp.id), chain("EXT", &sp.id));
        // Categorised by the state: `cluster` for the Cluster policy, `local` for the Local one.
        let internal = sp.internal();
        let internal_chain = if sp.internal_local { &svl } else { &svc };
        let external = sp.external();
        let vip = sp.cluster_ip;
        let cid = comment(&format!("{} cluster IP", sp.id));
        if internal.is_empty() {
            let why = if sp.has_any_endpoint() { "has no local endpoints" } else { "has no endpoints" };
            let target = if sp.has_any_endpoint() { "DROP" } else { reject(vip) };
            r.filter.get_mut("TARTAN-SERVICES").unwrap().push(format!(
                "{} -d {} {} -j {target}",
                comment(&format!("{} {why}", sp.id)),
                host(vip),
                dport(sp.port)
            ));
        } else {
            r.nat.get_mut("TARTAN-SERVICES").unwrap().push(format!(
                "{cid} -d {} {} -j {internal_chain}",
                host(vip),
                dport(sp.port)
            ));
        }
        let has_external = sp.has_external();
        if has_external && external.is_empty() {
            {
                let target = if sp.has_any_endpoint() { "DROP" } else { reject(vip) };
                let c = comment(&format!(
                    "{} has no {}endpoints",
                    sp.id,
                    if sp.has_any_endpoint() { "local " } else { "" }
                ));
                let f = r.filter.get_mut("TARTAN-EXTERNAL-SERVICES").unwrap();
                for ip in &sp.external_ips {
                    f.push(format!("{c} -d {} {} -j {target}", host(*ip), dport(sp.port)));
                }
                if let Some(np) = sp.node_port {
                    f.push(format!("{c} -m addrtype --dst-type LOCAL {} -j {target}", dport(np)));
                }
            }
        }
        // External traffic goes through TARTAN-EXT only when it has somewhere to go (else the filter rules above
        // reject or drop it).
        if has_external && !external.is_empty() {
            for ip in &sp.external_ips {
                r.nat.get_mut("TARTAN-SERVICES").unwrap().push(format!(
                    "{} -d {} {} -j {ext}",
                    comment(&format!("{} external IP", sp.id)),
                    host(*ip),
                    dport(sp.port)
                ));
            }
            if let Some(np) = sp.node_port {
                r.nat.get_mut("TARTAN-NODEPORTS").unwrap().push(format!("{} {} -j {ext}", comment(&sp.id), dport(np)));
            }
            let mut e = Vec::new();
            if sp.external_local {
                // Pods and the node itself are in-cluster clients; everyone else keeps their source address and
                // reaches only this node's endpoints.
                if let Some(cidr) = cluster_cidr {
                    e.push(format!("{} -s {cidr} -j {svc}", comment("pod traffic for external destinations")));
                }
                e.push(format!(
                    "{} -m addrtype --src-type LOCAL -j TARTAN-MARK-MASQ",
                    comment("masquerade LOCAL traffic")
                ));
                e.push(format!(
                    "{} -m addrtype --src-type LOCAL -j {svc}",
                    comment("route LOCAL traffic to the service")
                ));
                e.push(format!("-j {svl}"));
            } else {
                e.push(format!("{} -j TARTAN-MARK-MASQ", comment("masquerade traffic for external destinations")));
                e.push(format!("-j {svc}"));
            }
            r.nat.insert(ext, e);
        }
        // The balancing chains: the Cluster policy's endpoints (SVC) and, where a policy asks for it, the Local
        // one's (SVL). EXT sends pods and the node to SVC even under externalTrafficPolicy Local.
        let want_svc = !sp.cluster.is_empty() && (has_external || !sp.internal_local);
        if want_svc {
            let mut v = Vec::new();
            if let Some(cidr) = cluster_cidr {
                v.push(format!("{cid} ! -s {cidr} -d {} {} -j TARTAN-MARK-MASQ", host(vip), dport(sp.port)));
            }
            v.extend(balance(sp, &sp.cluster));
            r.nat.insert(svc.clone(), v);
        }
        let want_svl = !sp.local.is_empty() && (sp.internal_local || sp.external_local);
        if want_svl {
            r.nat.insert(svl.clone(), balance(sp, &sp.local));
        }
        let in_svc = sp.cluster.iter().filter(|_| want_svc);
        let mut all: Vec<&Endpoint> = in_svc.chain(sp.local.iter().filter(|_| want_svl)).collect();
        all.sort();
        all.dedup();
        for e in all {
            let sep = sep_chain(sp, e);
            let mut v = vec![format!("{} -s {} -j TARTAN-MARK-MASQ", comment(&sp.id), host(e.ip))];
            let recent = match sp.affinity {
                Some(_) => format!(" -m recent --set --name {sep} --mask {} --rsource", host_mask(vip)),
                None => String::new(),
            };
            v.push(format!(
                "{} -p {p}{recent} -m {p} -j DNAT --to-destination {}",
                comment(&sp.id),
                std::net::SocketAddr::new(e.ip, e.port)
            ));
            r.nat.insert(sep, v);
        }
    }
    // Node ports last, after every cluster and external IP.
    let last = comment("tartan-proxy service nodeports; NOTE: this must be the last rule in this chain");
    let services = r.nat.get_mut("TARTAN-SERVICES").unwrap();
    if opts.nodeport_addresses.is_empty() {
        services.push(format!("{last} -m addrtype --dst-type LOCAL -j TARTAN-NODEPORTS"));
    } else {
        for net in &opts.nodeport_addresses {
            services.push(format!("{last} -d {net} -m addrtype --dst-type LOCAL -j TARTAN-NODEPORTS"));
        }
    }
    r
}

/// Uniform random choice among `eps` (the i-th of n taken with probability 1/(n-i)); with session affinity,
/// a client seen within the timeout goes back to its endpoint first.
fn balance(sp: &ServicePort, eps: &[Endpoint]) -> Vec<String> {
    let mut v = Vec::new();
    if let Some(t) = sp.affinity {
        for e in eps {
            let sep = sep_chain(sp, e);
            v.push(format!(
                "{} -m recent --name {sep} --rcheck --seconds {t} --reap --mask {} --rsource -j {sep}",
                comment(&sp.id),
                host_mask(sp.cluster_ip)
            ));
        }
    }
    let n = eps.len();
    for (i, e) in eps.iter().enumerate() {
        let sep = sep_chain(sp, e);
        let c = comment(&format!("{} -> {}:{}", sp.id, e.ip, e.port));
        if i + 1 < n {
            v.push(format!("{c} -m statistic --mode random --probability {:.10} -j {sep}", 1.0 / (n - i) as f64));
        } else {
            v.push(format!("{c} -j {sep}"));
        }
    }
    v
}

/// One iptables-restore payload bringing the kernel from `previous` (what the last sync wrote; None: unknown,
/// write everything) to `desired`: top-level chains always, other chains only when new or changed, and chains
/// no longer wanted deleted (after the rewritten top-level chains stopped referring to them). `stale`: chains of
/// ours found in the kernel that `previous` does not know of (a previous run's), per table, deleted too.
pub fn payload(desired: &Rules, previous: Option<&Rules>, stale: &[(&str, Vec<String>)]) -> String {
    let mut out = String::new();
    for (table, want, had, top) in [
        ("nat", &desired.nat, previous.map(|p| &p.nat), &TOP_NAT[..]),
        ("filter", &desired.filter, previous.map(|p| &p.filter), &TOP_FILTER[..]),
    ] {
        out += &format!("*{table}\n");
        let changed: Vec<&String> = want
            .iter()
            .filter(|(name, rules)| top.contains(&name.as_str()) || had.and_then(|h| h.get(*name)) != Some(*rules))
            .map(|(name, _)| name)
            .collect();
        for name in &changed {
            out += &format!(":{name} - [0:0]\n");
        }
        for name in &changed {
            for rule in &want[*name] {
                out += &format!("-A {name} {rule}\n");
            }
        }
        let gone = had.into_iter().flat_map(|h| h.keys()).filter(|n| !want.contains_key(*n));
        let found = stale.iter().filter(|(t, _)| *t == table).flat_map(|(_, c)| c).filter(|n| !want.contains_key(*n));
        let mut deleted: Vec<&String> = gone.chain(found).collect();
        deleted.sort();
        deleted.dedup();
        // Every deleted chain is emptied before any is deleted: one may jump to another (an SVC chain to its SEP
        // chains), and a chain something still jumps to cannot be deleted. Whatever else jumped to them is
        // rewritten above.
        for name in &deleted {
            out += &format!(":{name} - [0:0]\n");
        }
        for name in &deleted {
            out += &format!("-X {name}\n");
        }
        out += "COMMIT\n";
    }
    out
}

/// Removes every chain of ours (given the current chain names of each table) and the jumps into them.
pub fn cleanup_payload(nat_chains: &[String], filter_chains: &[String]) -> String {
    let mut out = String::new();
    for (table, chains) in [("nat", nat_chains), ("filter", filter_chains)] {
        out += &format!("*{table}\n");
        for c in chains {
            out += &format!(":{c} - [0:0]\n");
        }
        for c in chains {
            out += &format!("-X {c}\n");
        }
        out += "COMMIT\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr() -> Options {
        Options { cluster_cidr: "10.244.0.0/16".parse().ok(), ..Default::default() }
    }

    #[test]
    fn node_ports_only_on_the_given_addresses() {
        let opts = Options { nodeport_addresses: vec!["198.18.0.0/24".parse().unwrap()], ..Default::default() };
        let r = render(&[], &opts);
        assert!(
            r.nat["TARTAN-SERVICES"][0].contains("-d 198.18.0.0/24 -m addrtype --dst-type LOCAL -j TARTAN-NODEPORTS")
        );
    }

    fn sp(eps: &[(&str, bool)]) -> ServicePort {
        let eps = eps.iter().map(|(ip, local)| Endpoint::ready(ip.parse().unwrap(), 8080, *local)).collect();
        ServicePort::cluster_ip("default/web:http/tcp", "10.96.0.10".parse().unwrap(), 80, eps)
    }

    #[test]
    fn cluster_ip_balances_uniformly_and_masquerades_off_cluster_clients() {
        let r = render(&[sp(&[("10.244.1.2", true), ("10.244.2.2", false), ("10.244.3.2", false)])], &cidr());
        let svc = &r.nat[&chain("SVC", "default/web:http/tcp")];
        assert!(svc[0].contains("! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j TARTAN-MARK-MASQ"));
        assert!(svc[1].contains("--probability 0.3333333333"));
        assert!(svc[2].contains("--probability 0.5000000000"));
        assert!(!svc[3].contains("statistic"));
        let seps: Vec<&String> = r.nat.keys().filter(|k| k.starts_with("TARTAN-SEP-")).collect();
        assert_eq!(seps.len(), 3);
        assert!(r.nat[seps[0]].iter().any(|l| l.contains("-j DNAT --to-destination 10.244.")));
        assert!(r.nat["TARTAN-SERVICES"].last().unwrap().contains("--dst-type LOCAL -j TARTAN-NODEPORTS"));
        assert!(r.filter["TARTAN-SERVICES"].is_empty());
    }

    #[test]
    fn no_endpoints_rejects_and_local_policy_without_local_endpoints_drops() {
        let mut s = sp(&[]);
        s.node_port = Some(30080);
        let r = render(&[s], &Options::default());
        assert!(r.filter["TARTAN-SERVICES"][0].contains("-d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j REJECT"));
        assert!(r.filter["TARTAN-EXTERNAL-SERVICES"][0].contains("--dport 30080 -j REJECT"));
        assert!(!r.nat.keys().any(|k| k.starts_with("TARTAN-SVC-")));

        let mut s = sp(&[("10.244.2.2", false)]);
        s.node_port = Some(30080);
        s.external_local = true;
        let r = render(&[s], &cidr());
        assert!(r.filter["TARTAN-EXTERNAL-SERVICES"][0].contains("--dport 30080 -j DROP"));
        assert!(r.nat["TARTAN-NODEPORTS"].is_empty(), "nowhere to go: no jump (the filter drops it)");
        // With a local endpoint, external traffic goes to the local ones only; pods and the node use them all.
        let mut s = sp(&[("10.244.1.2", true), ("10.244.2.2", false)]);
        s.node_port = Some(30080);
        s.external_local = true;
        let r = render(&[s], &cidr());
        assert!(r.nat["TARTAN-NODEPORTS"][0].contains("--dport 30080 -j TARTAN-EXT-"));
        let ext = &r.nat[&chain("EXT", "default/web:http/tcp")];
        assert!(ext[0].contains("-s 10.244.0.0/16 -j TARTAN-SVC-"), "{ext:?}");
        assert!(ext.last().unwrap().starts_with("-j TARTAN-SVL-"), "{ext:?}");
        assert_eq!(r.nat[&chain("SVL", "default/web:http/tcp")].len(), 1);
    }

    #[test]
    fn affinity_checks_recent_clients_first() {
        let mut s = sp(&[("10.244.1.2", true), ("10.244.2.2", false)]);
        s.affinity = Some(600);
        let r = render(&[s], &Options::default());
        let svc = &r.nat[&chain("SVC", "default/web:http/tcp")];
        assert!(svc[0].contains("--rcheck --seconds 600 --reap"));
        assert!(svc[1].contains("--rcheck --seconds 600 --reap"));
        assert!(r.nat.iter().any(|(k, v)| k.starts_with("TARTAN-SEP-") && v[1].contains("-m recent --set --name")));
    }

    #[test]
    fn a_partial_sync_rewrites_only_what_changed() {
        let a = render(&[sp(&[("10.244.1.2", true)])], &Options::default());
        let full = payload(&a, None, &[]);
        assert!(full.contains(&format!(":{} - [0:0]", chain("SVC", "default/web:http/tcp"))));
        let same = payload(&a, Some(&a), &[]);
        assert!(!same.contains("TARTAN-SVC-") || same.contains("-A TARTAN-SERVICES"), "{same}");
        assert!(
            !same.contains(&format!(":{}", chain("SVC", "default/web:http/tcp"))),
            "unchanged: not rewritten: {same}"
        );
        let b = render(&[sp(&[("10.244.9.9", true)])], &Options::default());
        let p = payload(&b, Some(&a), &[]);
        assert!(p.contains(&format!(":{} - [0:0]", chain("SVC", "default/web:http/tcp"))));
        let old_sep = sep_chain(&sp(&[("10.244.1.2", true)]), &sp(&[("10.244.1.2", true)]).endpoints[0]);
        assert!(p.contains(&format!("-X {old_sep}")), "{p}");
        // A service that goes entirely: its SVC chain (which jumps to the SEP chain) is emptied before the SEP
        // chain is deleted, whatever their names sort as.
        let gone = payload(&render(&[], &Options::default()), Some(&a), &[]);
        let svc = chain("SVC", "default/web:http/tcp");
        let (flush_svc, delete_sep) =
            (gone.find(&format!(":{svc} - [0:0]")).unwrap(), gone.find(&format!("-X {old_sep}")).unwrap());
        assert!(flush_svc < delete_sep, "{gone}");
    }
}
