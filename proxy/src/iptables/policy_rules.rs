//! NetworkPolicy as filter-table chains (see [`proxy_state::policy`] for the model):
//!
//! FORWARD (first rule) -> TARTAN-POLICY: for each local pod, a packet entering from its veth with another source
//! address is dropped; replies of allowed connections return; then the pod's egress chain (matched by the veth the
//! packet entered on) and the ingress chain of the destination pod (matched by its address, after Service DNAT,
//! so policy sees the real pod and port) run in turn. TARTAN-PE-<h> / TARTAN-PI-<h>: one RETURN per allowed (peer
//! set, port) pair, then DROP.
//!
//! Only forwarded traffic passes FORWARD: what the node itself sends to its pods (kubelet probes) is not subject to
//! policy, as in most implementations.

use ipnet::IpNet;

use proxy_state::policy::{PodPolicy, PortMatch, Rule};
use proxy_state::{PolicyModel, SetRef};

use super::rules::{chain, comment, Rules};
use super::sets::set_name;

/// The chain FORWARD jumps to first.
pub const POLICY: &str = "TARTAN-POLICY";

fn peer_match(set: &SetRef, dir: &str) -> String {
    format!("-m set --match-set {} {dir}", set_name(set))
}

fn port_match(m: &PortMatch) -> String {
    match m {
        PortMatch::Proto(p) => format!("-p {}", p.as_str()),
        PortMatch::Range(p, a, b) if a == b => format!("-p {0} -m {0} --dport {a}", p.as_str()),
        PortMatch::Range(p, a, b) => format!("-p {0} -m {0} --dport {a}:{b}", p.as_str()),
        PortMatch::Named(p, set) => format!("-p {} -m set --match-set {} dst,dst", p.as_str(), set_name(set)),
    }
}

/// The allow rules of one direction, then the drop. `dir`: where the peer is (`src` for ingress, `dst` for egress).
fn direction_chain(pod: &PodPolicy, rules: &[Rule], dir: &str, what: &str) -> Vec<String> {
    let mut v = Vec::new();
    let c = comment(&format!("{} {what}", pod.id));
    for r in rules {
        let peers: Vec<String> = match &r.peers {
            None => vec![String::new()],
            Some(sets) => sets.iter().map(|s| peer_match(s, dir)).collect(),
        };
        let ports: Vec<String> = match &r.ports {
            None => vec![String::new()],
            Some(ms) => ms.iter().map(port_match).collect(),
        };
        for peer in &peers {
            for port in &ports {
                let m = [peer.as_str(), port.as_str()].iter().filter(|s| !s.is_empty()).copied().collect::<Vec<_>>();
                let m = if m.is_empty() { String::new() } else { format!("{} ", m.join(" ")) };
                v.push(format!("{m}{c} -j RETURN"));
            }
        }
    }
    v.push(format!("{} -j DROP", comment(&format!("{}: no policy allows this {what}", pod.id))));
    v
}

/// Adds the policy chains of `model`'s pods of one family (`v6`) to `r`.
pub fn render_policy(model: &PolicyModel, v6: bool, r: &mut Rules) {
    let pods: Vec<&PodPolicy> = model.pods.iter().filter(|p| p.ip.is_ipv6() == v6).collect();
    let mut top = Vec::new();
    for p in pods.iter().copied() {
        if let Some(veth) = &p.veth {
            top.push(format!(
                "-m physdev --physdev-in {veth} ! -s {} {} -j DROP",
                IpNet::from(p.ip),
                comment(&format!("{}: not its address", p.id))
            ));
        }
    }
    top.push("-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN".to_string());
    for p in pods.iter().copied() {
        if let Some(rules) = &p.egress {
            let name = chain("PE", &p.id);
            let from = match &p.veth {
                Some(veth) => format!("-m physdev --physdev-in {veth}"),
                None => format!("-s {}", IpNet::from(p.ip)),
            };
            top.push(format!("{from} {} -j {name}", comment(&format!("{} egress", p.id))));
            r.filter.insert(name, direction_chain(p, rules, "dst", "egress"));
        }
    }
    for p in pods.iter().copied() {
        if let Some(rules) = &p.ingress {
            let name = chain("PI", &p.id);
            top.push(format!("-d {} {} -j {name}", IpNet::from(p.ip), comment(&format!("{} ingress", p.id))));
            r.filter.insert(name, direction_chain(p, rules, "src", "ingress"));
        }
    }
    r.filter.insert(POLICY.to_string(), top);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_state::{Proto, SetKind};

    fn set(kind: SetKind, hash: &str) -> SetRef {
        SetRef { kind, v6: false, hash: hash.into() }
    }

    fn pod(ingress: Option<Vec<Rule>>, egress: Option<Vec<Rule>>) -> PodPolicy {
        PodPolicy {
            id: "x/a".into(),
            ip: "10.244.1.5".parse().unwrap(),
            veth: Some("veth0123456789a".into()),
            ingress,
            egress,
        }
    }

    #[test]
    fn chains_per_isolated_direction_with_peers_times_ports() {
        let rule = Rule {
            peers: Some(vec![set(SetKind::Selector, "1"), set(SetKind::Block, "2")]),
            ports: Some(vec![PortMatch::Range(Proto::Tcp, 80, 80), PortMatch::Range(Proto::Udp, 80, 81)]),
        };
        let model = PolicyModel { pods: vec![pod(Some(vec![rule]), Some(vec![]))], sets: Default::default() };
        let mut r = Rules::default();
        render_policy(&model, false, &mut r);
        let top = &r.filter[POLICY];
        assert!(top[0].starts_with("-m physdev --physdev-in veth0123456789a ! -s 10.244.1.5/32"), "{top:?}");
        assert!(top[1].contains("RELATED,ESTABLISHED -j RETURN"));
        assert!(top[2].contains("--physdev-in veth0123456789a") && top[2].contains("-j TARTAN-PE-"));
        assert!(top[3].starts_with("-d 10.244.1.5/32") && top[3].contains("-j TARTAN-PI-"));
        let pi = &r.filter[&chain("PI", "x/a")];
        assert_eq!(pi.len(), 5, "2 peers x 2 ports, then the drop: {pi:?}");
        assert!(pi[0].starts_with("-m set --match-set TARTAN-PS-1 src -p tcp -m tcp --dport 80 "));
        assert!(pi[1].contains("-p udp -m udp --dport 80:81"));
        assert!(pi[4].ends_with("-j DROP"));
        assert_eq!(r.filter[&chain("PE", "x/a")].len(), 1, "egress isolated, nothing allowed: only the drop");
    }

    #[test]
    fn an_open_rule_allows_everything_and_an_unisolated_pod_has_no_chain() {
        let open = Rule { peers: None, ports: None };
        let model = PolicyModel { pods: vec![pod(Some(vec![open]), None)], sets: Default::default() };
        let mut r = Rules::default();
        render_policy(&model, false, &mut r);
        let pi = &r.filter[&chain("PI", "x/a")];
        assert!(pi[0].starts_with("-m comment") && pi[0].ends_with("-j RETURN"), "{pi:?}");
        assert!(!r.filter.contains_key(&chain("PE", "x/a")));
        let named =
            Rule { peers: None, ports: Some(vec![PortMatch::Named(Proto::Sctp, set(SetKind::NamedPort, "9"))]) };
        let model = PolicyModel { pods: vec![pod(None, Some(vec![named]))], sets: Default::default() };
        let mut r = Rules::default();
        render_policy(&model, false, &mut r);
        assert!(r.filter[&chain("PE", "x/a")][0].starts_with("-p sctp -m set --match-set TARTAN-NP-9 dst,dst"));
    }
}
