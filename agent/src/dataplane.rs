//! Kernel state for the backends, computed from the leases and applied idempotently: what is there and right is
//! left alone, what is missing or different is replaced, what no lease asks for is removed. Runs on a thread of
//! its own (sync netlink; nothing async), driven by lease changes and a periodic resync that repairs drift.
//!
//! vxlan, per remote lease, in this order (so the kernel never has to ARP for the gateway): a permanent neighbour
//! `<subnet>.0 lladdr <VtepMAC>` on flannel.<VNI>, an FDB entry `<VtepMAC> dst <PublicIP>`, then the route
//! `<subnet> via <subnet>.0 dev flannel.<VNI> onlink`. With DirectRouting, a remote whose PublicIP is reachable
//! without a gateway (same L2 segment) gets `<subnet> via <PublicIP>` on the external interface instead; host-gw
//! does only that, and reports remotes it cannot reach directly rather than routing them. A dual-stack network
//! does the same again for IPv6 with the lease's IPv6 subnet, PublicIPv6 and BackendV6Data, on flannel-v6.<VNI>.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use flannel::{BackendConfig, BackendType, LeaseAttrs, LeaseKey, VxlanData};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rtnl::build::{LinkMessageBuilder, LinkUnspec, LinkVxlan};
use rtnl::{Link, RouteSpec, Rtnl};

use crate::external::External;
use crate::registry::Leases;

pub struct Dataplane {
    rt: Rtnl,
    pub ext: External,
    pub backend: BackendConfig,
    families: Vec<Family>,
}

/// One address family's share: IPv4 always, IPv6 too on a dual-stack network. Each has its own vxlan device
/// (`flannel.<VNI>`, `flannel-v6.<VNI>`), VtepMAC and public address, as flanneld does it.
struct Family {
    v6: bool,
    network: IpNet,
    local: IpAddr,
    vtep_mac: Option<[u8; 6]>,
}

impl Family {
    /// This family's subnet, public address and VtepMAC of a lease (None: the lease has no such side).
    fn of(&self, k: &LeaseKey, a: &LeaseAttrs) -> Option<(IpNet, IpAddr, Option<[u8; 6]>)> {
        let vtep = |d: Option<VxlanData>| d.and_then(|v| parse_mac(&v.vtep_mac));
        if self.v6 {
            Some((IpNet::V6(k.ipv6_subnet?), IpAddr::V6(a.public_ipv6?), vtep(a.vxlan_v6())))
        } else {
            Some((IpNet::V4(k.subnet), IpAddr::V4(a.public_ip), vtep(a.vxlan())))
        }
    }

    fn host_len(&self) -> u8 {
        if self.v6 {
            128
        } else {
            32
        }
    }
}

/// What a reconcile found that an operator should know.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// host-gw remotes that are not on our L2 segment.
    pub unreachable: Vec<(LeaseKey, IpAddr)>,
    /// Kernel objects written or removed.
    pub changes: usize,
    /// The same, by kind (device, neighbour, fdb, route).
    pub by_kind: BTreeMap<&'static str, usize>,
    /// What the leases ask for, held once the reconcile succeeded.
    pub routes: usize,
    pub neighbours: usize,
    pub fdb: usize,
}

impl Report {
    pub fn count(&mut self, kind: &'static str, n: usize) {
        if n > 0 {
            self.changes += n;
            *self.by_kind.entry(kind).or_default() += n;
        }
    }
}

pub fn mac_string(m: &[u8]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s.split(':').filter_map(|p| u8::from_str_radix(p, 16).ok()).collect();
    v.try_into().ok()
}

fn is_link_local(a: &IpNet) -> bool {
    matches!(a, IpNet::V6(n) if (n.addr().segments()[0] & 0xffc0) == 0xfe80)
}

/// The VtepMAC, stable across restarts: kept in the state directory (peers' ARP and FDB entries stay valid).
fn vtep_mac(state_dir: &Path, vni: u32, v6: bool) -> Result<[u8; 6]> {
    let path = state_dir.join(if v6 { format!("vtep-mac-v6.{vni}") } else { format!("vtep-mac.{vni}") });
    if let Some(m) = std::fs::read_to_string(&path).ok().and_then(|s| parse_mac(s.trim())) {
        return Ok(m);
    }
    let mut m: [u8; 6] = rand::random();
    m[0] = (m[0] & 0xfe) | 0x02; // unicast, locally administered
    atomic_file::write(&path, mac_string(&m).as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(m)
}

impl Dataplane {
    /// `ipv6_network` makes it dual stack; the external interface must then have a public IPv6 address.
    pub fn new(
        ext: External,
        backend: BackendConfig,
        network: Ipv4Net,
        ipv6_network: Option<Ipv6Net>,
        state_dir: &Path,
    ) -> Result<Dataplane> {
        let vxlan = backend.kind == BackendType::Vxlan;
        let mut families = vec![Family {
            v6: false,
            network: IpNet::V4(network),
            local: IpAddr::V4(ext.public_ip),
            vtep_mac: if vxlan { Some(vtep_mac(state_dir, backend.vni, false)?) } else { None },
        }];
        if let Some(n6) = ipv6_network {
            if backend.kind == BackendType::Udp {
                bail!("EnableIPv6: the udp backend carries IPv4 only (as flanneld's); use vxlan or host-gw");
            }
            let Some(ip6) = ext.public_ipv6 else {
                bail!("EnableIPv6 is set but {} has no global IPv6 address (and no --public-ipv6 was given)", ext.name)
            };
            families.push(Family {
                v6: true,
                network: IpNet::V6(n6),
                local: IpAddr::V6(ip6),
                vtep_mac: if vxlan { Some(vtep_mac(state_dir, backend.vni, true)?) } else { None },
            });
        }
        Ok(Dataplane { rt: Rtnl::new()?, ext, backend, families })
    }

    /// The devices this dataplane owns (vxlan: flannel.<VNI>, and flannel-v6.<VNI> with dual stack).
    pub fn devices(&self) -> Vec<String> {
        self.families.iter().filter(|f| f.vtep_mac.is_some()).map(|f| self.device_name(f.v6)).collect()
    }

    /// Deletes a device (another dataplane's, after a backend change); false if it was not there.
    pub fn delete_device(&mut self, name: &str) -> Result<bool> {
        Ok(self.rt.link_del_name(name)?)
    }

    fn device_name(&self, v6: bool) -> String {
        if v6 {
            format!("flannel-v6.{}", self.backend.vni)
        } else {
            format!("flannel.{}", self.backend.vni)
        }
    }

    /// A vxlan device's MTU: the external MTU less the outer headers (an IPv6 outer header is 20 bytes longer).
    fn device_mtu(&self, v6: bool) -> u32 {
        self.backend.mtu.unwrap_or(self.ext.mtu - if v6 { 70 } else { 50 })
    }

    /// The pod MTU: the external MTU less the encapsulation (the smaller tunnel's, with dual stack).
    pub fn mtu(&self) -> u32 {
        self.backend.mtu.unwrap_or(match self.backend.kind {
            BackendType::Vxlan => self.families.iter().map(|f| self.device_mtu(f.v6)).min().unwrap_or(self.ext.mtu),
            BackendType::HostGw => self.ext.mtu,
            BackendType::Udp => self.ext.mtu - 28,
        })
    }

    fn data(&self, v6: bool) -> Option<serde_json::Value> {
        let f = self.families.iter().find(|f| f.v6 == v6)?;
        f.vtep_mac.map(|m| serde_json::to_value(VxlanData { vni: self.backend.vni, vtep_mac: mac_string(&m) }).unwrap())
    }

    /// What our lease carries in BackendData.
    pub fn backend_data(&self) -> Option<serde_json::Value> {
        self.data(false)
    }

    /// What our lease carries in BackendV6Data (dual-stack vxlan).
    pub fn backend_v6_data(&self) -> Option<serde_json::Value> {
        self.data(true)
    }

    /// The vxlan devices, as configured, each with its subnet's network address on it (`<subnet>.0/32`,
    /// `<subnet6>::/128`); recreated when the VNI, port or local address are not ours.
    pub fn ensure_device(&mut self, own: &LeaseKey) -> Result<usize> {
        let mut changes = 0;
        let fams: Vec<(bool, IpAddr, Option<[u8; 6]>, u8)> =
            self.families.iter().map(|f| (f.v6, f.local, f.vtep_mac, f.host_len())).collect();
        for (v6, local, mac, host_len) in fams {
            let Some(mac) = mac else { continue };
            let own_net = if v6 {
                IpAddr::V6(own.ipv6_subnet.context("dual stack, but our lease has no IPv6 subnet")?.network())
            } else {
                IpAddr::V4(own.subnet.network())
            };
            changes += self.ensure_one_device(v6, local, mac, IpNet::new(own_net, host_len).expect("host prefix"))?;
        }
        Ok(changes)
    }

    fn ensure_one_device(&mut self, v6: bool, local: IpAddr, mac: [u8; 6], want: IpNet) -> Result<usize> {
        let name = self.device_name(v6);
        let mtu = self.device_mtu(v6);
        let mut changes = 0;
        let mut dev = self.rt.link_get(&name)?;
        if let Some(d) = &dev {
            let ok = d.vxlan.as_ref().is_some_and(|x| {
                x.vni == self.backend.vni && x.port == self.backend.port && x.local == Some(local) && !x.learning
            });
            if !ok {
                tracing::warn!(device = %name, "does not match the config (VNI, port or local address); recreating it");
                self.rt.link_del(d.index)?;
                dev = None;
            }
        }
        let dev = match dev {
            Some(d) => d,
            None => {
                let mut b = LinkVxlan::new(&name, self.backend.vni).dev(self.ext.index);
                b = match local {
                    IpAddr::V4(l) => b.local(l),
                    IpAddr::V6(l) => b.local6(l),
                };
                b = b.port(self.backend.port).learning(false).mtu(mtu).address(mac.to_vec()).up();
                if self.backend.gbp {
                    b = b.gbp();
                }
                changes += 1;
                self.rt.link_create(b.build(), &name)?
            }
        };
        if dev.mac.as_deref() != Some(&mac[..]) || !dev.up || dev.mtu != Some(mtu) {
            let msg =
                LinkMessageBuilder::<LinkUnspec>::new().index(dev.index).address(mac.to_vec()).mtu(mtu).up().build();
            self.rt.link_set(msg, &name)?;
            changes += 1;
        }
        let have: Vec<IpNet> = self.rt.addresses(Some(dev.index))?.into_iter().map(|(_, a)| a).collect();
        // An IPv6 device also carries the kernel's link-local address: that one stays.
        for a in have.iter().filter(|a| a.addr().is_ipv6() == v6 && **a != want && !is_link_local(a)) {
            self.rt.address_del(dev.index, *a)?;
            changes += 1;
        }
        if !have.contains(&want) {
            self.rt.address_add(dev.index, want, true)?;
            changes += 1;
        }
        Ok(changes)
    }

    /// Whether `ip` is reachable without a gateway from here (same L2 segment).
    fn direct(&mut self, ip: IpAddr) -> Result<bool> {
        Ok(self.rt.route_get(ip)?.is_some_and(|r| r.gateway.is_none() && r.oif == Some(self.ext.index)))
    }

    /// Brings routes, neighbours and FDB entries of every family to what `leases` ask for.
    pub fn reconcile(&mut self, own: &LeaseKey, leases: &Leases) -> Result<Report> {
        let mut report = Report::default();
        if self.backend.kind == BackendType::Udp {
            // flannel0's prefix route covers the network; the userspace loop picks the node per packet.
            return Ok(report);
        }
        for i in 0..self.families.len() {
            self.reconcile_family(i, own, leases, &mut report)?;
        }
        Ok(report)
    }

    fn reconcile_family(&mut self, fi: usize, own: &LeaseKey, leases: &Leases, report: &mut Report) -> Result<()> {
        let fam = &self.families[fi];
        let (v6, network) = (fam.v6, fam.network);
        let own_subnet = if v6 { own.ipv6_subnet.map(IpNet::V6) } else { Some(IpNet::V4(own.subnet)) };
        let dev: Option<Link> = match fam.vtep_mac {
            Some(_) => {
                let name = self.device_name(v6);
                Some(self.rt.link_get(&name)?.ok_or_else(|| anyhow!("{name} is missing"))?)
            }
            None => None,
        };
        let mut want_routes: BTreeMap<IpNet, RouteSpec> = BTreeMap::new();
        let mut want_neigh: BTreeMap<IpAddr, [u8; 6]> = BTreeMap::new();
        let mut want_fdb: BTreeMap<[u8; 6], IpAddr> = BTreeMap::new();
        for (k, a) in leases.iter().filter(|(k, _)| k.subnet != own.subnet) {
            // An IPv4-only lease on a dual-stack network has no IPv6 side to route.
            let Some((subnet, public, vtep)) = self.families[fi].of(k, a) else { continue };
            // A lease outside the network is one a config change left behind (its node is moving): not routed.
            if !network.contains(&subnet) {
                continue;
            }
            let direct = match self.backend.kind {
                BackendType::HostGw => true,
                _ => self.backend.direct_routing,
            } && self.direct(public)?;
            if direct {
                want_routes.insert(subnet, RouteSpec::new(subnet).via(public).dev(self.ext.index));
                continue;
            }
            match (&dev, vtep) {
                (Some(dev), Some(mac)) => {
                    let gw = subnet.network();
                    want_neigh.insert(gw, mac);
                    want_fdb.insert(mac, public);
                    let mut r = RouteSpec::new(subnet).via(gw).dev(dev.index);
                    r.onlink = true;
                    want_routes.insert(subnet, r);
                }
                (Some(_), None) => tracing::warn!(
                    lease = %k,
                    %subnet,
                    backend = %a.backend_type,
                    "the lease has no vxlan VtepMAC; skipped"
                ),
                (None, _) => report.unreachable.push((*k, public)),
            }
        }

        if let Some(dev) = &dev {
            // Neighbours first, then the FDB, routes last.
            let have: BTreeMap<IpAddr, Vec<u8>> = self
                .rt
                .neighbours(dev.index)?
                .into_iter()
                .filter(|n| n.permanent)
                .filter_map(|n| n.dst.filter(|d| d.is_ipv6() == v6).map(|d| (d, n.lladdr.unwrap_or_default())))
                .collect();
            for (ip, mac) in &want_neigh {
                if have.get(ip).map(Vec::as_slice) != Some(&mac[..]) {
                    self.rt.neigh_replace(dev.index, *ip, mac)?;
                    report.count("neighbour", 1);
                }
            }
            let fdb: Vec<(Vec<u8>, IpAddr)> =
                self.rt.fdb_entries(dev.index)?.into_iter().filter_map(|n| Some((n.lladdr?, n.dst?))).collect();
            for (mac, ip) in &want_fdb {
                if !fdb.iter().any(|(m, d)| m == mac && d == ip) {
                    self.rt.fdb_replace(dev.index, mac, *ip)?;
                    report.count("fdb", 1);
                }
            }
            for (mac, dst) in &fdb {
                let wanted = mac.as_slice().try_into().ok().and_then(|m: [u8; 6]| want_fdb.get(&m)).copied();
                if wanted != Some(*dst) {
                    let _ = self.rt.fdb_del(dev.index, mac, *dst);
                    report.count("fdb", 1);
                }
            }
            for ip in have.keys().filter(|ip| !want_neigh.contains_key(ip)) {
                let _ = self.rt.neigh_del(dev.index, *ip);
                report.count("neighbour", 1);
            }
        }

        report.routes += want_routes.len();
        report.neighbours += want_neigh.len();
        report.fdb += want_fdb.len();
        let ours: BTreeSet<u32> = dev.iter().map(|d| d.index).chain([self.ext.index]).collect();
        let routes = self.rt.routes(false)?;
        for (subnet, want) in &want_routes {
            let found = routes
                .iter()
                .any(|r| r.dst == *subnet && r.gateway == want.gateway && r.oif == want.oif && r.onlink == want.onlink);
            if !found {
                self.rt.route_replace(want)?;
                report.count("route", 1);
            }
        }
        // Routes into the cluster network through our devices that no lease asks for any more.
        for r in routes.iter().filter(|r| r.gateway.is_some() && r.oif.is_some_and(|o| ours.contains(&o))) {
            if network.contains(&r.dst) && Some(r.dst) != own_subnet && !want_routes.contains_key(&r.dst) {
                let mut del = RouteSpec::new(r.dst);
                del.oif = r.oif;
                let _ = self.rt.route_del(&del);
                report.count("route", 1);
            }
        }
        Ok(())
    }
}
