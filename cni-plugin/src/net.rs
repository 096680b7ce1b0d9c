//! Kernel state for one attachment: the bridge and its gateway addresses, the veth pair (its container end
//! created directly inside the container namespace), hairpin, VLAN, container addresses and routes.

use std::net::IpAddr;

use ipnet::IpNet;
use rtnl::build::{LinkBridge, LinkBridgePort, LinkBridgeVlan, LinkMessageBuilder, LinkUnspec};
use rtnl::packet::link::{BridgeVlanInfoFlags, InfoBridge, InfoData, InfoKind, InfoVeth};
use rtnl::{Link, RouteSpec, Rtnl, RtnlError};

use crate::config::Plan;
use crate::error::{PluginError, Result};

/// The modified EUI-64 link-local address of `mac` (what the kernel would derive), as fe80::/64.
fn link_local(mac: &[u8; 6]) -> IpNet {
    let b = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, mac[0] ^ 2, mac[1], mac[2], 0xff, 0xfe, mac[3], mac[4], mac[5]];
    IpNet::new(std::net::IpAddr::V6(std::net::Ipv6Addr::from(b)), 64).expect("/64")
}

/// The bridge, created (up, with the configured MTU and VLAN filtering) if absent.
pub fn ensure_bridge(host: &mut Rtnl, plan: &Plan) -> Result<Link> {
    if let Some(l) = host.link_get(&plan.bridge)? {
        if l.kind.as_deref() != Some("bridge") {
            return Err(PluginError::Invalid(format!(
                "{} exists and is a {} device, not a bridge",
                plan.bridge,
                l.kind.as_deref().unwrap_or("plain")
            )));
        }
        if !l.up {
            host.link_up(l.index)?;
        }
        return Ok(l);
    }
    let mut b = LinkBridge::new(&plan.bridge).up();
    if let Some(mtu) = plan.mtu {
        b = b.mtu(mtu);
    }
    if plan.vlan.is_some() {
        b = b.append_info_data(InfoBridge::VlanFiltering(true));
    }
    if plan.promisc {
        b = b.promiscuous(true);
    }
    // A MAC of its own: otherwise the bridge takes its first port's, and its IPv6 link-local address with it.
    let mut mac: [u8; 6] = rand::random();
    mac[0] = (mac[0] & 0xfe) | 0x02;
    b = b.address(mac.to_vec());
    match host.link_add(b.build(), &format!("bridge {}", plan.bridge)) {
        Ok(()) => {
            // The kernel sends no neighbour solicitation without a usable link-local source address, and the one
            // it makes itself stays tentative for a second or two after the first port joins (DAD): the first
            // IPv6 packets forwarded to a new node's first pod waited that long. So the same address goes on now,
            // without DAD (the MAC is ours and random). Best effort: a node may have IPv6 off.
            if let Some(l) = host.link_get(&plan.bridge)? {
                let _ = host.address_add(l.index, link_local(&mac), true);
            }
        }
        Err(e) if e.is_exists() => {} // a concurrent ADD created it first
        Err(e) if plan.vlan.is_some() && e.is(libc::EOPNOTSUPP) => {
            return Err(PluginError::Invalid(format!(
                "vlan {} needs bridge VLAN filtering, which this kernel lacks (CONFIG_BRIDGE_VLAN_FILTERING)",
                plan.vlan.unwrap_or_default()
            )))
        }
        Err(e) => return Err(e.into()),
    }
    host.link_get(&plan.bridge)?
        .ok_or_else(|| PluginError::Invalid(format!("bridge {} vanished right after creation", plan.bridge)))
}

/// Puts `gw` on the bridge. As the reference plugin does: an IPv4 address of another subnet (or an overlapping IPv6
/// one) is replaced only with forceAddress, otherwise it is an error (a stale cni0 address after the node subnet
/// changed is a common cause).
pub fn ensure_bridge_addr(host: &mut Rtnl, bridge: &Link, gw: IpNet, force: bool) -> Result<()> {
    for (_, have) in host.addresses(Some(bridge.index))? {
        if have.addr().is_ipv4() != gw.addr().is_ipv4() {
            continue;
        }
        if have == gw {
            return Ok(());
        }
        let conflicts = have.addr().is_ipv4() || have.contains(&gw.addr()) || gw.contains(&have.addr());
        if conflicts {
            if force {
                host.address_del(bridge.index, have)?;
            } else {
                return Err(PluginError::Invalid(format!(
                    "bridge {} already has address {have}, not {gw} (set forceAddress to replace it)",
                    bridge.name
                )));
            }
        }
    }
    match host.address_add(bridge.index, gw, true) {
        Err(e) if !e.is_exists() => Err(e.into()),
        _ => Ok(()),
    }
}

/// Creates the pair: `host_name` on the bridge in this namespace, `ifname` directly in the container's. Returns
/// the host end as the kernel reports it.
pub fn create_veth(
    host: &mut Rtnl,
    plan: &Plan,
    bridge: &Link,
    host_name: &str,
    ifname: &str,
    netns: &netns::NetNs,
) -> std::result::Result<Link, RtnlError> {
    use std::os::fd::{AsFd, AsRawFd};
    // The peer cannot be brought up in the same request when it lands in another namespace (the kernel answers
    // ENOTCONN); configure_container does it.
    let mut peer =
        LinkMessageBuilder::<LinkUnspec>::new().name(ifname.to_string()).setns_by_fd(netns.as_fd().as_raw_fd());
    let mut main = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
        .name(host_name.to_string())
        .controller(bridge.index)
        .up();
    if let Some(mtu) = plan.mtu {
        peer = peer.mtu(mtu);
        main = main.mtu(mtu);
    }
    let msg = main.set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build()))).build();
    host.link_create(msg, &format!("veth {host_name} / {ifname}"))
}

/// Bridge-port options of the host end: hairpin, and the VLAN as the port's untagged PVID.
pub fn configure_port(host: &mut Rtnl, plan: &Plan, bridge: &Link, port: &Link) -> Result<()> {
    if plan.hairpin {
        let msg = LinkBridgePort::new(port.index).hairpin(true).build();
        host.link_set(msg, &format!("hairpin on {}", port.name))?;
    }
    if let Some(vid) = plan.vlan {
        let flags = BridgeVlanInfoFlags::Pvid | BridgeVlanInfoFlags::Untagged;
        let msg = LinkBridgeVlan::new(port.index).vlan(vid, flags).build();
        host.ack(rtnl::packet::RouteNetlinkMessage::SetLink(msg), 0, || format!("vlan {vid} on {}", port.name))?;
        if plan.is_gateway {
            // The gateway lives on the bridge itself, so the bridge's own port joins the VLAN too.
            let msg = LinkBridgeVlan::new(bridge.index).vlan(vid, flags).bridge_self().build();
            host.ack(rtnl::packet::RouteNetlinkMessage::SetLink(msg), 0, || format!("vlan {vid} on {}", bridge.name))?;
        }
    }
    Ok(())
}

/// The route's gateway: its own, or the gateway of the container address of its family.
pub fn route_gateway(dst: &IpNet, gw: Option<IpAddr>, gateways: &[IpAddr]) -> Option<IpAddr> {
    gw.or_else(|| gateways.iter().copied().find(|g| g.is_ipv4() == dst.addr().is_ipv4()))
}

/// Container-side state: addresses, then routes.
pub fn configure_container(
    ctr: &mut Rtnl,
    ns: &netns::NetNs,
    link: &Link,
    mac: Option<[u8; 6]>,
    addrs: &[IpNet],
    routes: &[RouteSpec],
) -> Result<()> {
    if let Some(mac) = mac {
        // Set while the link is still down (a MAC change on an up veth is refused by some drivers).
        let msg = LinkMessageBuilder::<LinkUnspec>::new().index(link.index).address(mac.to_vec()).build();
        ctr.link_set(msg, &format!("MAC of {}", link.name))?;
    }
    if addrs.iter().any(|a| a.addr().is_ipv6()) {
        // A runtime may create namespaces with IPv6 disabled by default; an IPv6 address needs it on.
        let name = format!("net.ipv6.conf.{}.disable_ipv6", link.name);
        ns.run(|| rtnl::sysctl_ensure(&name, "0"))
            .and_then(|r| r)
            .map_err(PluginError::io(format!("sysctl {name} in the container")))?;
    }
    ctr.link_up(link.index)?;
    for a in addrs {
        ctr.address_add(link.index, *a, true)?;
    }
    for r in routes {
        ctr.route_replace(r)?;
    }
    Ok(())
}
