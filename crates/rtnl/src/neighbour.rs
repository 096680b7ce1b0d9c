use std::net::IpAddr;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_REPLACE};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::RouteType;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::{Result, Rtnl};

/// A neighbour (ARP/NDP) or forwarding-database entry as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    pub dst: Option<IpAddr>,
    pub lladdr: Option<Vec<u8>>,
    pub permanent: bool,
}

fn family_of(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn msg(family: AddressFamily, ifindex: u32, flags: NeighbourFlags) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = family;
    m.header.ifindex = ifindex;
    m.header.state = NeighbourState::Permanent;
    m.header.flags = flags;
    m.header.kind = RouteType::Unspec;
    m
}

fn parse(m: &NeighbourMessage) -> Neighbour {
    let mut n = Neighbour {
        ifindex: m.header.ifindex,
        dst: None,
        lladdr: None,
        permanent: m.header.state == NeighbourState::Permanent,
    };
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => n.dst = Some(IpAddr::V4(*v4)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => n.dst = Some(IpAddr::V6(*v6)),
            NeighbourAttribute::LinkLayerAddress(l) => n.lladdr = Some(l.clone()),
            _ => {}
        }
    }
    n
}

impl Rtnl {
    /// A permanent ARP/NDP entry `ip lladdr mac` on `ifindex` (created or replaced).
    pub fn neigh_replace(&mut self, ifindex: u32, ip: IpAddr, mac: &[u8]) -> Result<()> {
        let mut m = msg(family_of(ip), ifindex, NeighbourFlags::empty());
        m.attributes.push(NeighbourAttribute::Destination(ip.into()));
        m.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        self.ack(RouteNetlinkMessage::NewNeighbour(m), NLM_F_CREATE | NLM_F_REPLACE, || format!("neighbour {ip}"))
    }

    pub fn neigh_del(&mut self, ifindex: u32, ip: IpAddr) -> Result<()> {
        let mut m = msg(family_of(ip), ifindex, NeighbourFlags::empty());
        m.attributes.push(NeighbourAttribute::Destination(ip.into()));
        self.ack(RouteNetlinkMessage::DelNeighbour(m), 0, || format!("delete neighbour {ip}"))
    }

    /// ARP/NDP entries on `ifindex`.
    pub fn neighbours(&mut self, ifindex: u32) -> Result<Vec<Neighbour>> {
        let mut out = Vec::new();
        for fam in [AddressFamily::Inet, AddressFamily::Inet6] {
            let q = msg(fam, 0, NeighbourFlags::empty());
            for r in self.dump(RouteNetlinkMessage::GetNeighbour(q), || "list neighbours".into())? {
                if let RouteNetlinkMessage::NewNeighbour(m) = r {
                    if m.header.ifindex == ifindex {
                        out.push(parse(&m));
                    }
                }
            }
        }
        Ok(out)
    }

    /// A permanent forwarding-database entry of the device itself (`bridge fdb replace MAC dev X dst IP self`):
    /// frames for `mac` go to the tunnel endpoint `dst`.
    pub fn fdb_replace(&mut self, ifindex: u32, mac: &[u8], dst: IpAddr) -> Result<()> {
        let mut m = msg(AddressFamily::Bridge, ifindex, NeighbourFlags::Own);
        m.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        m.attributes.push(NeighbourAttribute::Destination(dst.into()));
        self.ack(RouteNetlinkMessage::NewNeighbour(m), NLM_F_CREATE | NLM_F_REPLACE, || format!("fdb entry for {dst}"))
    }

    pub fn fdb_del(&mut self, ifindex: u32, mac: &[u8], dst: IpAddr) -> Result<()> {
        let mut m = msg(AddressFamily::Bridge, ifindex, NeighbourFlags::Own);
        m.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        m.attributes.push(NeighbourAttribute::Destination(dst.into()));
        self.ack(RouteNetlinkMessage::DelNeighbour(m), 0, || format!("delete fdb entry for {dst}"))
    }

    /// Forwarding-database entries of `ifindex`.
    pub fn fdb_entries(&mut self, ifindex: u32) -> Result<Vec<Neighbour>> {
        let q = msg(AddressFamily::Bridge, 0, NeighbourFlags::empty());
        let mut out = Vec::new();
        for r in self.dump(RouteNetlinkMessage::GetNeighbour(q), || "list fdb".into())? {
            if let RouteNetlinkMessage::NewNeighbour(m) = r {
                if m.header.ifindex == ifindex {
                    out.push(parse(&m));
                }
            }
        }
        Ok(out)
    }
}
