//! The traffic rules flanneld installs with --ip-masq, under flanneld's chain names so that swapping flanneld for
//! tartan-agent (or back) takes over the same chains instead of stacking a second set:
//!
//! nat POSTROUTING -> FLANNEL-POSTRTG: RETURN for kube-proxy's masquerade mark (it masquerades those itself);
//! RETURN pod to pod inside the network; MASQUERADE the network going outside (not multicast); RETURN outside to
//! this node's own pods; MASQUERADE outside to other nodes' pods.
//! filter FORWARD -> FLANNEL-FWD: ACCEPT from and to the network (a FORWARD policy of DROP, as Docker sets, would
//! otherwise cut pod traffic).
//!
//! Each resync rewrites both chains in one iptables-restore transaction and adds a missing jump.

use ipnet::IpNet;
use iptables::{Family, Iptables, IptablesError};

pub const POSTRTG: &str = "FLANNEL-POSTRTG";
pub const FWD: &str = "FLANNEL-FWD";

fn c(comment: &str) -> String {
    format!("-m comment --comment \"{comment}\"")
}

/// The nat chain's rules for `network` with this node's `subnet`.
pub fn masq_rules(network: &IpNet, subnet: &IpNet) -> Vec<String> {
    let (n, sn) = (network.trunc(), subnet.trunc());
    let multicast = if network.addr().is_ipv4() { "224.0.0.0/4" } else { "ff00::/8" };
    let m = c("flanneld masq");
    // What the proxy marked for SNAT is masqueraded by the proxy's own rule, not twice.
    let proxy_mark = node_contract::masq_mark_match();
    vec![
        format!("-A {POSTRTG} -m mark --mark {proxy_mark} {m} -j RETURN"),
        format!("-A {POSTRTG} -s {n} -d {n} {m} -j RETURN"),
        format!("-A {POSTRTG} -s {n} ! -d {multicast} {m} -j MASQUERADE --random-fully"),
        format!("-A {POSTRTG} ! -s {n} -d {sn} {m} -j RETURN"),
        format!("-A {POSTRTG} ! -s {n} -d {n} {m} -j MASQUERADE --random-fully"),
    ]
}

pub fn forward_rules(network: &IpNet) -> Vec<String> {
    let n = network.trunc();
    let m = c("flanneld forward");
    vec![format!("-A {FWD} -s {n} {m} -j ACCEPT"), format!("-A {FWD} -d {n} {m} -j ACCEPT")]
}

/// One family's payload: both chains rewritten, plus the jumps listed in `missing_jumps` ("nat"/"filter").
pub fn payload(network: &IpNet, subnet: &IpNet, masq: bool, missing_jumps: &[&str]) -> String {
    let mut p = String::new();
    if masq {
        p += &format!("*nat\n:{POSTRTG} - [0:0]\n");
        for r in masq_rules(network, subnet) {
            p += &r;
            p.push('\n');
        }
        if missing_jumps.contains(&"nat") {
            p += &format!("-I POSTROUTING 1 {} -j {POSTRTG}\n", c("flanneld masq"));
        }
        p += "COMMIT\n";
    }
    p += &format!("*filter\n:{FWD} - [0:0]\n");
    for r in forward_rules(network) {
        p += &r;
        p.push('\n');
    }
    if missing_jumps.contains(&"filter") {
        p += &format!("-A FORWARD {} -j {FWD}\n", c("flanneld forward"));
    }
    p += "COMMIT\n";
    p
}

fn jump_args(chain: &str, comment: &str) -> Vec<String> {
    vec!["-m".into(), "comment".into(), "--comment".into(), comment.into(), "-j".into(), chain.into()]
}

/// Brings one family's rules (iptables or ip6tables, by the network's family) to the desired state (idempotent;
/// one transaction).
/// Installs or refreshes the rules; the number of jumps it found missing (and put back) comes back.
pub fn sync(network: IpNet, subnet: IpNet, masq: bool) -> Result<usize, IptablesError> {
    let ipt = Iptables::new(if network.addr().is_ipv4() { Family::V4 } else { Family::V6 });
    let mut missing = Vec::new();
    if masq && !ipt.exists("nat", "POSTROUTING", &jump_args(POSTRTG, "flanneld masq"))? {
        missing.push("nat");
    }
    if !ipt.exists("filter", "FORWARD", &jump_args(FWD, "flanneld forward"))? {
        missing.push("filter");
    }
    ipt.restore(&payload(&network, &subnet, masq, &missing))?;
    Ok(missing.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flannels_rules() {
        let p = payload(&"10.244.0.0/16".parse().unwrap(), &"10.244.7.0/24".parse().unwrap(), true, &["nat", "filter"]);
        let expected = "*nat\n:FLANNEL-POSTRTG - [0:0]\n\
            -A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment \"flanneld masq\" -j RETURN\n\
            -A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN\n\
            -A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully\n\
            -A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.7.0/24 -m comment --comment \"flanneld masq\" -j RETURN\n\
            -A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully\n\
            -I POSTROUTING 1 -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\nCOMMIT\n\
            *filter\n:FLANNEL-FWD - [0:0]\n\
            -A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
            -A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
            -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\nCOMMIT\n";
        assert_eq!(p, expected);
        let no_masq = payload(&"10.244.0.0/16".parse().unwrap(), &"10.244.7.0/24".parse().unwrap(), false, &[]);
        assert!(!no_masq.contains("*nat"));
        assert!(!no_masq.contains("-A FORWARD"));
    }
}
