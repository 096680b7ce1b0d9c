//! Kernel state for the backends, computed from the leases and applied idempotently: what is there and right is
//! left alone, what is missing or different is replaced, what no lease asks for is removed. Runs on a thread of
//! its own (sync netlink; nothing async), driven by lease changes and a periodic resync that repairs drift.
//!
//! vxlan, per remote lease, in this order (so the kernel never has to ARP for the gateway): a permanent neighbour
//! `<subnet>.0 lladdr <VtepMAC>` on flannel.<VNI>, an FDB entry `<VtepMAC> dst <PublicIP>`, then the route
//! `<subnet> via <subnet>.0 dev flannel.<VNI> onlink`. With DirectRouting, a remote whose PublicIP is reachable
//! without a gateway (same L2 segment) gets `<subnet> via <PublicIP>` on the external interface instead; host-gw
//! does only that, and reports remotes it cannot reach directly rather than routing them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use flannel::{BackendConfig, BackendType, LeaseAttrs, LeaseKey, VxlanData};
use ipnet::{IpNet, Ipv4Net};
use rtnl::build::{LinkMessageBuilder, LinkUnspec, LinkVxlan};
use rtnl::{Link, RouteSpec, Rtnl};

use crate::external::External;
use crate::registry::Leases;

pub struct Dataplane {
    rt: Rtnl,
    pub ext: External,
    pub backend: BackendConfig,
    pub network: Ipv4Net,
    pub vtep_mac: Option<[u8; 6]>,
}

/// What a reconcile found that an operator should know.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// host-gw remotes that are not on our L2 segment.
    pub unreachable: Vec<(LeaseKey, Ipv4Addr)>,
    /// Kernel objects written or removed.
    pub changes: usize,
}

pub fn mac_string(m: &[u8]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s.split(':').filter_map(|p| u8::from_str_radix(p, 16).ok()).collect();
    v.try_into().ok()
}

/// The VtepMAC, stable across restarts: kept in the state directory (peers' ARP and FDB entries stay valid).
fn vtep_mac(state_dir: &Path, vni: u32) -> Result<[u8; 6]> {
    let path = state_dir.join(format!("vtep-mac.{vni}"));
    if let Some(m) = std::fs::read_to_string(&path).ok().and_then(|s| parse_mac(s.trim())) {
        return Ok(m);
    }
    let mut m: [u8; 6] = rand::random();
    m[0] = (m[0] & 0xfe) | 0x02; // unicast, locally administered
    std::fs::create_dir_all(state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, mac_string(&m))?;
    std::fs::rename(&tmp, &path)?;
    Ok(m)
}

impl Dataplane {
    pub fn new(ext: External, backend: BackendConfig, network: Ipv4Net, state_dir: &Path) -> Result<Dataplane> {
        let vtep_mac = match backend.kind {
            BackendType::Vxlan => Some(vtep_mac(state_dir, backend.vni)?),
            _ => None,
        };
        Ok(Dataplane { rt: Rtnl::new()?, ext, backend, network, vtep_mac })
    }

    pub fn device_name(&self) -> String {
        format!("flannel.{}", self.backend.vni)
    }

    /// The pod MTU: the external MTU less the encapsulation.
    pub fn mtu(&self) -> u32 {
        self.backend.mtu.unwrap_or(match self.backend.kind {
            BackendType::Vxlan => self.ext.mtu - 50,
            BackendType::HostGw => self.ext.mtu,
            BackendType::Udp => self.ext.mtu - 28,
        })
    }

    /// What our lease carries in BackendData.
    pub fn backend_data(&self) -> Option<serde_json::Value> {
        self.vtep_mac
            .map(|m| serde_json::to_value(VxlanData { vni: self.backend.vni, vtep_mac: mac_string(&m) }).unwrap())
    }

    /// The vxlan device, as configured, with `<subnet>.0/32` on it; recreated when its VNI, port or local address
    /// are not ours.
    pub fn ensure_device(&mut self, own: &Ipv4Net) -> Result<usize> {
        let Some(mac) = self.vtep_mac else { return Ok(0) };
        let name = self.device_name();
        let mut changes = 0;
        let want_local = self.ext.public_ip;
        let mut dev = self.rt.link_get(&name)?;
        if let Some(d) = &dev {
            let ok = d.vxlan.as_ref().is_some_and(|x| {
                x.vni == self.backend.vni && x.port == self.backend.port && x.local == Some(want_local) && !x.learning
            });
            if !ok {
                eprintln!("tartan-agent: {name} does not match the config (VNI, port or local address); recreating it");
                self.rt.link_del(d.index)?;
                dev = None;
            }
        }
        let dev = match dev {
            Some(d) => d,
            None => {
                let mut b = LinkVxlan::new(&name, self.backend.vni)
                    .dev(self.ext.index)
                    .local(want_local)
                    .port(self.backend.port)
                    .learning(false)
                    .mtu(self.mtu())
                    .address(mac.to_vec())
                    .up();
                if self.backend.gbp {
                    b = b.gbp();
                }
                changes += 1;
                self.rt.link_create(b.build(), &name)?
            }
        };
        if dev.mac.as_deref() != Some(&mac[..]) || !dev.up || dev.mtu != Some(self.mtu()) {
            let msg = LinkMessageBuilder::<LinkUnspec>::new()
                .index(dev.index)
                .address(mac.to_vec())
                .mtu(self.mtu())
                .up()
                .build();
            self.rt.link_set(msg, &name)?;
            changes += 1;
        }
        let want = IpNet::new(IpAddr::V4(own.network()), 32).expect("/32");
        let have: Vec<IpNet> = self.rt.addresses(Some(dev.index))?.into_iter().map(|(_, a)| a).collect();
        for a in have.iter().filter(|a| a.addr().is_ipv4() && **a != want) {
            self.rt.address_del(dev.index, *a)?;
            changes += 1;
        }
        if !have.contains(&want) {
            self.rt.address_add(dev.index, want, false)?;
            changes += 1;
        }
        Ok(changes)
    }

    /// Whether `ip` is reachable without a gateway from here (same L2 segment).
    fn direct(&mut self, ip: Ipv4Addr) -> Result<bool> {
        Ok(self.rt.route_get(IpAddr::V4(ip))?.is_some_and(|r| r.gateway.is_none() && r.oif == Some(self.ext.index)))
    }

    /// Brings routes, neighbours and FDB entries to what `leases` ask for.
    pub fn reconcile(&mut self, own: &LeaseKey, leases: &Leases) -> Result<Report> {
        let mut report = Report::default();
        if self.backend.kind == BackendType::Udp {
            // flannel0's prefix route covers the network; the userspace loop picks the node per packet.
            return Ok(report);
        }
        let dev: Option<Link> = match self.vtep_mac {
            Some(_) => Some(
                self.rt.link_get(&self.device_name())?.ok_or_else(|| anyhow!("{} is missing", self.device_name()))?,
            ),
            None => None,
        };
        let mut want_routes: BTreeMap<Ipv4Net, RouteSpec> = BTreeMap::new();
        let mut want_neigh: BTreeMap<Ipv4Addr, [u8; 6]> = BTreeMap::new();
        let mut want_fdb: BTreeMap<[u8; 6], Ipv4Addr> = BTreeMap::new();
        for (k, a) in leases.iter().filter(|(k, _)| k.subnet != own.subnet) {
            let subnet = k.subnet;
            let direct = match self.backend.kind {
                BackendType::HostGw => true,
                _ => self.backend.direct_routing,
            } && self.direct(a.public_ip)?;
            if direct {
                let r = RouteSpec::new(IpNet::V4(subnet)).via(IpAddr::V4(a.public_ip)).dev(self.ext.index);
                want_routes.insert(subnet, r);
                continue;
            }
            match (&dev, remote_vtep(a)) {
                (Some(dev), Some(mac)) => {
                    let gw = subnet.network();
                    want_neigh.insert(gw, mac);
                    want_fdb.insert(mac, a.public_ip);
                    let mut r = RouteSpec::new(IpNet::V4(subnet)).via(IpAddr::V4(gw)).dev(dev.index);
                    r.onlink = true;
                    want_routes.insert(subnet, r);
                }
                (Some(_), None) => {
                    eprintln!("tartan-agent: lease {k} has no vxlan VtepMAC ({}); skipped", a.backend_type)
                }
                (None, _) => report.unreachable.push((*k, a.public_ip)),
            }
        }

        if let Some(dev) = &dev {
            // Neighbours first, then the FDB, routes last.
            let have: BTreeMap<Ipv4Addr, Vec<u8>> = self
                .rt
                .neighbours(dev.index)?
                .into_iter()
                .filter(|n| n.permanent)
                .filter_map(|n| match n.dst {
                    Some(IpAddr::V4(ip)) => Some((ip, n.lladdr.unwrap_or_default())),
                    _ => None,
                })
                .collect();
            for (ip, mac) in &want_neigh {
                if have.get(ip).map(Vec::as_slice) != Some(&mac[..]) {
                    self.rt.neigh_replace(dev.index, IpAddr::V4(*ip), mac)?;
                    report.changes += 1;
                }
            }
            let fdb: Vec<(Vec<u8>, IpAddr)> =
                self.rt.fdb_entries(dev.index)?.into_iter().filter_map(|n| Some((n.lladdr?, n.dst?))).collect();
            for (mac, ip) in &want_fdb {
                if !fdb.iter().any(|(m, d)| m == mac && *d == IpAddr::V4(*ip)) {
                    self.rt.fdb_replace(dev.index, mac, IpAddr::V4(*ip))?;
                    report.changes += 1;
                }
            }
            for (mac, dst) in &fdb {
                let wanted =
                    mac.as_slice().try_into().ok().and_then(|m: [u8; 6]| want_fdb.get(&m)).map(|ip| IpAddr::V4(*ip));
                if wanted != Some(*dst) {
                    let _ = self.rt.fdb_del(dev.index, mac, *dst);
                    report.changes += 1;
                }
            }
            for ip in have.keys().filter(|ip| !want_neigh.contains_key(ip)) {
                let _ = self.rt.neigh_del(dev.index, IpAddr::V4(*ip));
                report.changes += 1;
            }
        }

        let ours: BTreeSet<u32> = dev.iter().map(|d| d.index).chain([self.ext.index]).collect();
        let routes = self.rt.routes(false)?;
        for (subnet, want) in &want_routes {
            let found = routes.iter().any(|r| {
                r.dst == IpNet::V4(*subnet) && r.gateway == want.gateway && r.oif == want.oif && r.onlink == want.onlink
            });
            if !found {
                self.rt.route_replace(want)?;
                report.changes += 1;
            }
        }
        // Routes into the cluster network through our devices that no lease asks for any more.
        for r in routes.iter().filter(|r| r.gateway.is_some() && r.oif.is_some_and(|o| ours.contains(&o))) {
            let IpNet::V4(dst) = r.dst else { continue };
            if self.network.contains(&dst) && dst != own.subnet && !want_routes.contains_key(&dst) {
                let mut del = RouteSpec::new(r.dst);
                del.oif = r.oif;
                let _ = self.rt.route_del(&del);
                report.changes += 1;
            }
        }
        Ok(report)
    }
}

fn remote_vtep(a: &LeaseAttrs) -> Option<[u8; 6]> {
    a.vxlan().and_then(|v| parse_mac(&v.vtep_mac))
}
