//! The policy model's typed peer sets as ipsets: names (`TARTAN-[6]PS-<hash>`) and members written as `ipset save`
//! prints them, so that desired and kernel sets compare as strings.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use iptables::ipset::{Set, SetKind as IpsetKind};
use proxy_state::{PeerSet, SetRef};

/// Every set of ours starts so (and `--cleanup` removes exactly those).
pub const SET_PREFIX: &str = "TARTAN-";

/// The ipset name of a set: ipset names are per node, not per family, so IPv6 ones carry a `6`.
pub fn set_name(r: &SetRef) -> String {
    format!("{SET_PREFIX}{r}")
}

/// A member as `ipset save` prints it: a host network without its /32 (/128).
fn member(n: IpNet) -> String {
    if n.prefix_len() == n.max_prefix_len() {
        n.addr().to_string()
    } else {
        n.to_string()
    }
}

/// One peer set as an ipset.
pub fn to_ipset(r: &SetRef, set: &PeerSet) -> Set {
    let (kind, members): (IpsetKind, BTreeSet<String>) = match set {
        PeerSet::Addresses(a) => (IpsetKind::Ip, a.iter().map(ToString::to_string).collect()),
        PeerSet::AddrPorts(m) => {
            (IpsetKind::IpPort, m.iter().map(|(ip, proto, port)| format!("{ip},{}:{port}", proto.as_str())).collect())
        }
        PeerSet::Block { cidr, except } => {
            let mut members = BTreeSet::new();
            if !except.iter().any(|x| x.prefix_len() == 0) {
                // hash:net cannot hold a /0: two halves instead.
                let parts: Vec<IpNet> = if cidr.prefix_len() == 0 {
                    cidr.subnets(1).map(|s| s.collect()).unwrap_or_default()
                } else {
                    vec![*cidr]
                };
                members.extend(parts.into_iter().map(member));
                // Exceptions are `nomatch` members: the longest match decides.
                members.extend(except.iter().map(|x| format!("{} nomatch", member(*x))));
            }
            (IpsetKind::Net, members)
        }
    };
    Set { kind, inet6: r.v6, members }
}

/// Every set of the model, by ipset name.
pub fn ipsets(sets: &BTreeMap<SetRef, PeerSet>) -> BTreeMap<String, Set> {
    sets.iter().map(|(r, s)| (set_name(r), to_ipset(r, s))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_state::{Proto, SetKind};

    fn r(kind: SetKind, v6: bool) -> SetRef {
        SetRef { kind, v6, hash: "0123456789ABCDEF".into() }
    }

    #[test]
    fn members_as_ipset_prints_them() {
        let block = PeerSet::Block {
            cidr: "10.244.0.0/16".parse().unwrap(),
            except: ["10.244.2.2/32".parse().unwrap()].into(),
        };
        let s = to_ipset(&r(SetKind::Block, false), &block);
        assert_eq!(s.members.iter().collect::<Vec<_>>(), ["10.244.0.0/16", "10.244.2.2 nomatch"]);
        assert_eq!(set_name(&r(SetKind::Block, false)), "TARTAN-NB-0123456789ABCDEF");
        let all = PeerSet::Block { cidr: "0.0.0.0/0".parse().unwrap(), except: BTreeSet::new() };
        assert_eq!(
            to_ipset(&r(SetKind::Block, false), &all).members.iter().collect::<Vec<_>>(),
            ["0.0.0.0/1", "128.0.0.0/1"]
        );
        let none =
            PeerSet::Block { cidr: "10.0.0.0/8".parse().unwrap(), except: ["0.0.0.0/0".parse().unwrap()].into() };
        assert!(to_ipset(&r(SetKind::Block, false), &none).members.is_empty());
        let ports = PeerSet::AddrPorts([("fd00::1".parse().unwrap(), Proto::Udp, 53)].into());
        let s = to_ipset(&r(SetKind::NamedPort, true), &ports);
        assert!(s.inet6);
        assert_eq!(s.members.iter().collect::<Vec<_>>(), ["fd00::1,udp:53"]);
        assert!(set_name(&r(SetKind::NamedPort, true)).starts_with("TARTAN-6NP-"));
    }
}
