//! The external interface: the one inter-node traffic uses, and the public IP other nodes reach us at.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{bail, Result};
use ipnet::IpNet;
use rtnl::{Link, Rtnl};

use crate::options::Options;

#[derive(Debug, Clone)]
pub struct External {
    pub index: u32,
    pub name: String,
    pub ip: Ipv4Addr,
    pub public_ip: Ipv4Addr,
    /// The interface's global IPv6 address (or --public-ipv6), for dual-stack networks.
    pub public_ipv6: Option<Ipv6Addr>,
    pub mtu: u32,
}

/// flanneld's choice: each --iface (a name or an address) in order, then each --iface-regex, and without either,
/// the interface of the default route; the first with an IPv4 address wins.
pub fn find(rt: &mut Rtnl, opts: &Options) -> Result<External> {
    let links = rt.links()?;
    let addrs = rt.addresses(None)?;
    let v4_of = |l: &Link| -> Option<Ipv4Addr> {
        addrs.iter().find_map(|(i, a)| match a {
            IpNet::V4(n) if *i == l.index && !n.addr().is_link_local() && !n.addr().is_loopback() => Some(n.addr()),
            _ => None,
        })
    };
    let mut candidates: Vec<&Link> = Vec::new();
    for want in &opts.iface {
        if let Ok(ip) = want.parse::<IpAddr>() {
            if let Some((idx, _)) = addrs.iter().find(|(_, a)| a.addr() == ip) {
                candidates.extend(links.iter().find(|l| l.index == *idx));
            }
        } else {
            candidates.extend(links.iter().find(|l| &l.name == want));
        }
    }
    for re in &opts.iface_regex {
        let re = regex::Regex::new(re).map_err(|e| anyhow::anyhow!("--iface-regex {re:?}: {e}"))?;
        candidates.extend(links.iter().filter(|l| re.is_match(&l.name)));
    }
    if opts.iface.is_empty() && opts.iface_regex.is_empty() {
        let routes = rt.routes(false)?;
        let default = routes.iter().find(|r| r.dst.prefix_len() == 0 && r.dst.addr().is_ipv4() && r.oif.is_some());
        match default.and_then(|r| links.iter().find(|l| Some(l.index) == r.oif)) {
            Some(l) => candidates.push(l),
            None => {
                // No default route (a lab node, an isolated host): the first interface with an address.
                candidates.extend(links.iter().filter(|l| l.name != "lo" && v4_of(l).is_some()))
            }
        }
    }
    // Link-local (fe80::/10) addresses cannot carry tunnels between nodes.
    let v6_of = |l: &Link| -> Option<Ipv6Addr> {
        addrs.iter().find_map(|(i, a)| match a {
            IpNet::V6(n) if *i == l.index && (n.addr().segments()[0] & 0xffc0) != 0xfe80 && !n.addr().is_loopback() => {
                Some(n.addr())
            }
            _ => None,
        })
    };
    for l in candidates {
        if let Some(ip) = v4_of(l) {
            return Ok(External {
                index: l.index,
                name: l.name.clone(),
                ip,
                public_ip: opts.public_ip.unwrap_or(ip),
                public_ipv6: opts.public_ipv6.or_else(|| v6_of(l)),
                mtu: l.mtu.unwrap_or(1500),
            });
        }
    }
    bail!(
        "no usable external interface: --iface {:?}, --iface-regex {:?} matched nothing with an IPv4 address",
        opts.iface,
        opts.iface_regex
    )
}
