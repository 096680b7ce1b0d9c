//! `tartan-agent --cleanup`: removes what the agent put on this node, read from what the node holds (no etcd
//! needed, nothing to remember): the backend devices (flannel.<VNI>, flannel-v6.<VNI>, flannel0; their routes,
//! neighbours and FDB entries go with them), host-gw routes to other nodes' subnets (routes via a gateway to a
//! subnet of the network in subnet.env, other than this node's, of the node subnets' size: an operator's own route
//! inside the network is another size or has no gateway), the FLANNEL-* chains and the jumps to them, and
//! subnet.env and the VtepMAC files of the state directory. The lease stays in etcd (cluster state: it expires with its TTL, or
//! the node's next agent renews it). A normal stop removes none of this.

use std::path::Path;

use anyhow::{Context, Result};
use flannel::SubnetEnv;
use ipnet::IpNet;
use iptables::{Family, Iptables};
use rtnl::Rtnl;

use crate::options::Options;
use crate::rules::{FWD, POSTRTG};

/// Whether a link name is one a backend of the agent (or flanneld) creates.
pub fn is_backend_device(name: &str) -> bool {
    let numbered = |prefix: &str| {
        name.strip_prefix(prefix).is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    name == "flannel0" || numbered("flannel.") || numbered("flannel-v6.")
}

/// The payload that removes our chains and every jump to them from one table's `iptables-save` text; empty when
/// there is nothing of ours.
pub fn cleanup_payload(table: &str, saved: &str) -> String {
    let ours = [POSTRTG, FWD];
    let mut deletes = String::new();
    let mut chains = Vec::new();
    for line in saved.lines() {
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default();
            if ours.contains(&name) {
                chains.push(name.to_string());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or_default();
            let jumps_to_ours = ours.iter().any(|c| rule.ends_with(&format!("-j {c}")));
            if jumps_to_ours && !ours.contains(&chain) {
                deletes += &format!("-D {rule}\n");
            }
        }
    }
    if deletes.is_empty() && chains.is_empty() {
        return String::new();
    }
    let mut p = format!("*{table}\n{deletes}");
    for c in &chains {
        p += &format!("-F {c}\n-X {c}\n");
    }
    p + "COMMIT\n"
}

/// Removes it all; returns what was removed, for the log. Every step is tried; the first error is returned after.
pub fn cleanup(opts: &Options) -> Result<Vec<String>> {
    let mut done = Vec::new();
    let mut first_err: Option<anyhow::Error> = None;
    let mut keep = |r: Result<()>| {
        if let Err(e) = r {
            tracing::warn!(error = format!("{e:#}"), "cleanup");
            first_err.get_or_insert(e);
        }
    };
    let env = SubnetEnv::load(&opts.subnet_file).ok();
    for e in kernel(env.as_ref(), &mut done) {
        keep(Err(e));
    }
    for family in [Family::V4, Family::V6] {
        let ipt = Iptables::new(family);
        for table in ["nat", "filter"] {
            // ip6tables may be absent or its tables unused: nothing of ours there then.
            let Ok(saved) = ipt.save(table) else { continue };
            let payload = cleanup_payload(table, &saved);
            if !payload.is_empty() {
                keep(ipt.restore(&payload).with_context(|| format!("removing the FLANNEL chains from {table}")));
                done.push(format!("{family:?} {table} FLANNEL chains"));
            }
        }
    }
    keep(remove_file(&opts.subnet_file, &mut done));
    if let Some(f) = &opts.docker_opts_file {
        keep(remove_file(f, &mut done));
    }
    if let Ok(rd) = std::fs::read_dir(&opts.state_dir) {
        for e in rd.flatten() {
            // Only the agent's own files (the state directory may be shared).
            if e.file_type().is_ok_and(|t| t.is_file()) && e.file_name().to_string_lossy().starts_with("vtep-mac") {
                keep(remove_file(&e.path(), &mut done));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(done),
    }
}

fn remove_file(path: &Path, done: &mut Vec<String>) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            done.push(path.display().to_string());
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// Every step is tried; the errors are returned.
fn kernel(env: Option<&SubnetEnv>, done: &mut Vec<String>) -> Vec<anyhow::Error> {
    let mut errors = Vec::new();
    let mut rt = match Rtnl::new() {
        Ok(rt) => rt,
        Err(e) => return vec![e.into()],
    };
    // host-gw routes first: remote subnets of the network (the size of this node's), via a gateway (the remote node).
    let pairs: Vec<(IpNet, IpNet)> = env
        .map(|e| [(e.network, e.subnet), (e.ipv6_network, e.ipv6_subnet)])
        .into_iter()
        .flatten()
        .filter_map(|(n, s)| Some((n?, s?)))
        .collect();
    match rt.routes(false) {
        Ok(routes) => {
            for r in routes {
                let remote = pairs.iter().any(|(net, own)| is_remote_subnet(net, own, &r.dst));
                if remote && r.gateway.is_some() {
                    match rt.route_del(&r) {
                        Ok(()) => done.push(format!("route {}", r.dst)),
                        Err(e) => {
                            errors.push(anyhow::Error::from(e).context(format!("deleting the route to {}", r.dst)))
                        }
                    }
                }
            }
        }
        Err(e) => errors.push(anyhow::Error::from(e).context("listing routes")),
    }
    match rt.links() {
        Ok(links) => {
            for l in links.into_iter().filter(|l| is_backend_device(&l.name)) {
                match rt.link_del(l.index) {
                    Ok(()) => done.push(format!("device {}", l.name)),
                    Err(e) => errors.push(anyhow::Error::from(e).context(format!("deleting {}", l.name))),
                }
            }
        }
        Err(e) => errors.push(anyhow::Error::from(e).context("listing links")),
    }
    errors
}

/// A route destination that is another node's subnet: inside the network, the size of this node's, not this node's.
pub fn is_remote_subnet(network: &IpNet, own: &IpNet, dst: &IpNet) -> bool {
    network.contains(dst) && dst.prefix_len() == own.prefix_len() && dst.trunc() != own.trunc()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        for n in ["flannel.1", "flannel.4096", "flannel-v6.1", "flannel0"] {
            assert!(is_backend_device(n), "{n}");
        }
        for n in ["flannel.", "flannel.x", "flannel1", "cni0", "eth0", "flannel-v6."] {
            assert!(!is_backend_device(n), "{n}");
        }
    }

    #[test]
    fn remote_subnets() {
        let net: IpNet = "10.244.0.0/16".parse().unwrap();
        let own: IpNet = "10.244.7.1/24".parse().unwrap();
        let yes = |d: &str| is_remote_subnet(&net, &own, &d.parse().unwrap());
        assert!(yes("10.244.8.0/24"));
        assert!(!yes("10.244.7.0/24"), "this node's own");
        assert!(!yes("10.244.9.5/32"), "another size: not a node subnet");
        assert!(!yes("10.245.0.0/24"), "outside the network");
        assert!(!yes("0.0.0.0/0"));
    }

    #[test]
    fn the_payload_removes_only_ours() {
        let saved = "*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:FLANNEL-POSTRTG - [0:0]\n:KUBE-X - [0:0]\n\
            -A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n\
            -A POSTROUTING -j KUBE-X\n\
            -A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN\nCOMMIT\n";
        assert_eq!(
            cleanup_payload("nat", saved),
            "*nat\n-D POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n\
             -F FLANNEL-POSTRTG\n-X FLANNEL-POSTRTG\nCOMMIT\n"
        );
        assert_eq!(cleanup_payload("filter", "*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n"), "");
    }
}
