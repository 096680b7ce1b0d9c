use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_REPLACE};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope, RouteType};
use netlink_packet_route::RouteNetlinkMessage;

use crate::link::family;
use crate::{Result, Rtnl};

/// A unicast route in the main table (or `table`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub dst: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub table: Option<u32>,
    pub priority: Option<u32>,
    pub onlink: bool,
    /// Link scope (a directly connected destination, no gateway).
    pub link_scope: bool,
}

impl RouteSpec {
    pub fn new(dst: IpNet) -> RouteSpec {
        RouteSpec {
            dst: dst.trunc(),
            gateway: None,
            oif: None,
            table: None,
            priority: None,
            onlink: false,
            link_scope: false,
        }
    }

    pub fn via(mut self, gw: IpAddr) -> Self {
        self.gateway = Some(gw);
        self
    }

    pub fn dev(mut self, oif: u32) -> Self {
        self.oif = Some(oif);
        self
    }

    fn to_msg(&self) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = family(&self.dst);
        m.header.destination_prefix_length = self.dst.prefix_len();
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = netlink_packet_route::route::RouteProtocol::Boot;
        m.header.scope = if self.link_scope { RouteScope::Link } else { RouteScope::Universe };
        m.header.kind = RouteType::Unicast;
        if self.dst.prefix_len() > 0 {
            m.attributes.push(RouteAttribute::Destination(RouteAddress::from(self.dst.network())));
        }
        if let Some(gw) = self.gateway {
            m.attributes.push(RouteAttribute::Gateway(RouteAddress::from(gw)));
        }
        if let Some(oif) = self.oif {
            m.attributes.push(RouteAttribute::Oif(oif));
        }
        if let Some(p) = self.priority {
            m.attributes.push(RouteAttribute::Priority(p));
        }
        if let Some(t) = self.table {
            if t < 256 {
                m.header.table = t as u8;
            } else {
                m.header.table = 252; // RT_TABLE_COMPAT: the real id travels in RTA_TABLE
            }
            m.attributes.push(RouteAttribute::Table(t));
        }
        if self.onlink {
            m.header.flags |= netlink_packet_route::route::RouteFlags::Onlink;
        }
        m
    }

    fn from_msg(m: &RouteMessage) -> Option<RouteSpec> {
        let mut dst_addr: Option<IpAddr> = None;
        let mut r = RouteSpec {
            dst: IpNet::default(),
            gateway: None,
            oif: None,
            table: Some(m.header.table as u32),
            priority: None,
            onlink: m.header.flags.contains(netlink_packet_route::route::RouteFlags::Onlink),
            link_scope: m.header.scope == RouteScope::Link,
        };
        for a in &m.attributes {
            match a {
                RouteAttribute::Destination(d) => dst_addr = route_addr(d),
                RouteAttribute::Gateway(g) => r.gateway = route_addr(g),
                RouteAttribute::Oif(o) => r.oif = Some(*o),
                RouteAttribute::Priority(p) => r.priority = Some(*p),
                RouteAttribute::Table(t) => r.table = Some(*t),
                _ => {}
            }
        }
        let unspecified: IpAddr = match m.header.address_family {
            netlink_packet_route::AddressFamily::Inet => std::net::Ipv4Addr::UNSPECIFIED.into(),
            netlink_packet_route::AddressFamily::Inet6 => std::net::Ipv6Addr::UNSPECIFIED.into(),
            _ => return None,
        };
        r.dst = IpNet::new(dst_addr.unwrap_or(unspecified), m.header.destination_prefix_length).ok()?;
        Some(r)
    }
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

impl Rtnl {
    /// Adds or replaces the route to `dst` (idempotent).
    pub fn route_replace(&mut self, r: &RouteSpec) -> Result<()> {
        self.ack(RouteNetlinkMessage::NewRoute(r.to_msg()), NLM_F_CREATE | NLM_F_REPLACE, || {
            format!("replace route {} via {:?}", r.dst, r.gateway)
        })
    }

    /// Adds a route; EEXIST if one to `dst` is there already.
    pub fn route_add(&mut self, r: &RouteSpec) -> Result<()> {
        self.ack(RouteNetlinkMessage::NewRoute(r.to_msg()), NLM_F_CREATE | netlink_packet_core::NLM_F_EXCL, || {
            format!("add route {} via {:?}", r.dst, r.gateway)
        })
    }

    pub fn route_del(&mut self, r: &RouteSpec) -> Result<()> {
        self.ack(RouteNetlinkMessage::DelRoute(r.to_msg()), 0, || format!("delete route {}", r.dst))
    }

    /// The route the kernel would use to reach `dst` (`ip route get`).
    pub fn route_get(&mut self, dst: IpAddr) -> Result<Option<RouteSpec>> {
        let mut q = RouteMessage::default();
        let host = IpNet::from(dst);
        q.header.address_family = family(&host);
        q.header.destination_prefix_length = host.prefix_len();
        q.attributes.push(RouteAttribute::Destination(RouteAddress::from(dst)));
        match self.request(RouteNetlinkMessage::GetRoute(q), 0, || format!("route get {dst}")) {
            Ok(r) => Ok(r.iter().find_map(|m| match m {
                RouteNetlinkMessage::NewRoute(rm) => RouteSpec::from_msg(rm),
                _ => None,
            })),
            // ENETUNREACH: no route at all.
            Err(e) if e.is(libc::ENETUNREACH) || e.is(libc::EHOSTUNREACH) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Unicast routes of the main table (or all tables with `all_tables`) of both families.
    pub fn routes(&mut self, all_tables: bool) -> Result<Vec<RouteSpec>> {
        let mut out = Vec::new();
        for fam in [netlink_packet_route::AddressFamily::Inet, netlink_packet_route::AddressFamily::Inet6] {
            let mut q = RouteMessage::default();
            q.header.address_family = fam;
            for m in self.dump(RouteNetlinkMessage::GetRoute(q), || "list routes".into())? {
                let RouteNetlinkMessage::NewRoute(rm) = m else {
                    continue;
                };
                if rm.header.kind != RouteType::Unicast {
                    continue;
                }
                if !all_tables && rm.header.table != RouteHeader::RT_TABLE_MAIN {
                    continue;
                }
                if let Some(r) = RouteSpec::from_msg(&rm) {
                    out.push(r);
                }
            }
        }
        Ok(out)
    }
}
