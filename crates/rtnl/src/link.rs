use ipnet::IpNet;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{AddressMessageBuilder, LinkMessageBuilder, LinkUnspec};

use crate::{Result, Rtnl, RtnlError};

/// What callers need to know of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<Vec<u8>>,
    pub mtu: Option<u32>,
    /// The bridge (or other controller) it is enslaved to.
    pub master: Option<u32>,
    pub kind: Option<String>,
    pub up: bool,
    /// For a veth, the peer's index (in the peer's namespace).
    pub peer: Option<u32>,
    /// For a vxlan device, its parameters.
    pub vxlan: Option<VxlanInfo>,
}

/// What identifies a vxlan device's tunnel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VxlanInfo {
    pub vni: u32,
    pub port: u16,
    pub local: Option<std::net::IpAddr>,
    pub learning: bool,
    pub dev: Option<u32>,
}

impl Link {
    fn from_msg(m: &LinkMessage) -> Link {
        let mut l = Link {
            index: m.header.index,
            name: String::new(),
            mac: None,
            mtu: None,
            master: None,
            kind: None,
            up: m.header.flags.contains(LinkFlags::Up),
            peer: None,
            vxlan: None,
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => l.name = n.clone(),
                LinkAttribute::Address(mac) => l.mac = Some(mac.clone()),
                LinkAttribute::Mtu(mtu) => l.mtu = Some(*mtu),
                LinkAttribute::Controller(c) => l.master = Some(*c),
                LinkAttribute::Link(p) => l.peer = Some(*p),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        match i {
                            LinkInfo::Kind(k) => {
                                l.kind = Some(match k {
                                    InfoKind::Other(s) => s.clone(),
                                    other => other.to_string(),
                                })
                            }
                            LinkInfo::Data(InfoData::Vxlan(v)) => {
                                let mut x = VxlanInfo::default();
                                for a in v {
                                    match a {
                                        InfoVxlan::Id(id) => x.vni = *id,
                                        InfoVxlan::Port(p) => x.port = *p,
                                        InfoVxlan::Local(ip) => x.local = Some((*ip).into()),
                                        InfoVxlan::Local6(ip) => x.local = Some((*ip).into()),
                                        InfoVxlan::Learning(b) => x.learning = *b,
                                        InfoVxlan::Link(d) => x.dev = Some(*d),
                                        _ => {}
                                    }
                                }
                                l.vxlan = Some(x);
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        l
    }

    /// `aa:bb:cc:dd:ee:ff`.
    pub fn mac_string(&self) -> Option<String> {
        self.mac.as_ref().map(|m| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"))
    }
}

impl Rtnl {
    pub fn link_get(&mut self, name: &str) -> Result<Option<Link>> {
        let msg = LinkMessageBuilder::<LinkUnspec>::new().name(name.to_string()).build();
        self.link_get_msg(msg, || format!("get link {name}"))
    }

    pub fn link_get_index(&mut self, index: u32) -> Result<Option<Link>> {
        let msg = LinkMessageBuilder::<LinkUnspec>::new().index(index).build();
        self.link_get_msg(msg, || format!("get link #{index}"))
    }

    fn link_get_msg(&mut self, msg: LinkMessage, op: impl Fn() -> String) -> Result<Option<Link>> {
        match self.request(RouteNetlinkMessage::GetLink(msg), 0, op) {
            Ok(r) => Ok(r.iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(Link::from_msg(l)),
                _ => None,
            })),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn links(&mut self) -> Result<Vec<Link>> {
        let r = self.dump(RouteNetlinkMessage::GetLink(LinkMessage::default()), || "list links".into())?;
        Ok(r.iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(Link::from_msg(l)),
                _ => None,
            })
            .collect())
    }

    /// Creates a link; EEXIST if the name is taken.
    pub fn link_add(&mut self, msg: LinkMessage, what: &str) -> Result<()> {
        self.ack(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL, || format!("create {what}"))
    }

    /// Creates a link and returns it as the kernel reports it (NLM_F_ECHO: no second round trip to look it up).
    pub fn link_create(&mut self, msg: LinkMessage, what: &str) -> Result<Link> {
        let name = msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        });
        let replies = self.request(
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL | netlink_packet_core::NLM_F_ACK | netlink_packet_core::NLM_F_ECHO,
            || format!("create {what}"),
        )?;
        let echoed = replies.iter().find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(Link::from_msg(l)),
            _ => None,
        });
        match (echoed, name) {
            (Some(l), _) => Ok(l),
            // Kernels before 6.3 do not echo RTM_NEWLINK.
            (None, Some(n)) => {
                self.link_get(&n)?.ok_or_else(|| RtnlError::Invalid(format!("{n} vanished after creation")))
            }
            (None, None) => Err(RtnlError::Invalid(format!("{what}: created but unnamed"))),
        }
    }

    /// Changes attributes of an existing link (up, MTU, master, bridge-port options ...).
    pub fn link_set(&mut self, msg: LinkMessage, what: &str) -> Result<()> {
        self.ack(RouteNetlinkMessage::NewLink(msg), 0, || format!("set {what}"))
    }

    pub fn link_up(&mut self, index: u32) -> Result<()> {
        let msg = LinkMessageBuilder::<LinkUnspec>::new().index(index).up().build();
        self.ack(RouteNetlinkMessage::SetLink(msg), 0, || format!("set link #{index} up"))
    }

    pub fn link_del(&mut self, index: u32) -> Result<()> {
        let msg = LinkMessageBuilder::<LinkUnspec>::new().index(index).build();
        self.ack(RouteNetlinkMessage::DelLink(msg), 0, || format!("delete link #{index}"))
    }

    /// Deletes a link by name; Ok(false) when there was none.
    pub fn link_del_name(&mut self, name: &str) -> Result<bool> {
        let msg = LinkMessageBuilder::<LinkUnspec>::new().name(name.to_string()).build();
        match self.ack(RouteNetlinkMessage::DelLink(msg), 0, || format!("delete link {name}")) {
            Ok(()) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Addresses (with prefix) on one link, or on all links with `None`.
    pub fn addresses(&mut self, index: Option<u32>) -> Result<Vec<(u32, IpNet)>> {
        let r = self.dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()), || "list addresses".into())?;
        let mut out = Vec::new();
        for m in r {
            let RouteNetlinkMessage::NewAddress(a) = m else {
                continue;
            };
            if index.is_some_and(|i| i != a.header.index) {
                continue;
            }
            // IFA_LOCAL is the interface's own address on point-to-point links; IFA_ADDRESS otherwise.
            let mut addr = None;
            for attr in &a.attributes {
                match attr {
                    AddressAttribute::Local(ip) => addr = Some(*ip),
                    AddressAttribute::Address(ip) if addr.is_none() => addr = Some(*ip),
                    _ => {}
                }
            }
            if let Some(ip) = addr {
                let net = IpNet::new(ip, a.header.prefix_len).map_err(|e| RtnlError::Decode(e.to_string()))?;
                out.push((a.header.index, net));
            }
        }
        Ok(out)
    }

    fn address_msg(index: u32, addr: IpNet) -> AddressMessage {
        match addr {
            IpNet::V4(v4) => AddressMessageBuilder::<std::net::Ipv4Addr>::new()
                .index(index)
                .address(v4.addr(), v4.prefix_len())
                .build(),
            IpNet::V6(v6) => AddressMessageBuilder::<std::net::Ipv6Addr>::new()
                .index(index)
                .address(v6.addr(), v6.prefix_len())
                .build(),
        }
    }

    /// Adds an address; with `nodad`, an IPv6 address is usable at once instead of after duplicate detection.
    pub fn address_add(&mut self, index: u32, addr: IpNet, nodad: bool) -> Result<()> {
        let mut msg = Rtnl::address_msg(index, addr);
        if nodad && addr.addr().is_ipv6() {
            msg.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        self.ack(RouteNetlinkMessage::NewAddress(msg), NLM_F_CREATE | NLM_F_REPLACE, || {
            format!("add address {addr} to link #{index}")
        })
    }

    pub fn address_del(&mut self, index: u32, addr: IpNet) -> Result<()> {
        let msg = Rtnl::address_msg(index, addr);
        self.ack(RouteNetlinkMessage::DelAddress(msg), 0, || format!("delete address {addr} from link #{index}"))
    }
}

/// The address family of an IP network, as netlink wants it.
pub(crate) fn family(net: &IpNet) -> AddressFamily {
    match net {
        IpNet::V4(_) => AddressFamily::Inet,
        IpNet::V6(_) => AddressFamily::Inet6,
    }
}
