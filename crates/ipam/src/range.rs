use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::IpamError;

/// A range as written in host-local's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RangeSpec {
    pub subnet: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range_start: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range_end: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
}

/// A validated range with host-local's defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub subnet: IpNet,
    pub start: IpAddr,
    pub end: IpAddr,
    pub gateway: IpAddr,
}

/// Addresses as integers, so that both families share one walk.
pub(crate) fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4) as u128,
        IpAddr::V6(v6) => u128::from(v6),
    }
}

pub(crate) fn from_u128(v4: bool, n: u128) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(n as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(n))
    }
}

impl Range {
    /// Validates a range the way host-local does: the subnet must leave something to allocate (a /31 or /127 is
    /// refused), carry no host bits, and contain the gateway, start and end; the gateway defaults to the first
    /// address, the start to the first address, the end to the last one (for IPv4, the one before broadcast).
    pub fn new(spec: &RangeSpec) -> Result<Range, IpamError> {
        let subnet = spec.subnet;
        let bits = if subnet.addr().is_ipv4() { 32 } else { 128 };
        if subnet.prefix_len() > bits - 2 {
            return Err(IpamError::InvalidRange(format!("network {subnet} is too small to allocate from")));
        }
        if subnet.addr() != subnet.network() {
            return Err(IpamError::InvalidRange(format!(
                "{subnet} has host bits set: for a /{} the network address is {}",
                subnet.prefix_len(),
                subnet.network()
            )));
        }
        let v4 = subnet.addr().is_ipv4();
        let first = from_u128(v4, to_u128(subnet.network()) + 1);
        let last = if v4 { from_u128(v4, to_u128(subnet.broadcast()) - 1) } else { subnet.broadcast() };
        let check = |what: &str, ip: IpAddr| {
            if subnet.contains(&ip) && ip.is_ipv4() == v4 {
                Ok(ip)
            } else {
                Err(IpamError::InvalidRange(format!("{what} {ip} is not inside {subnet}")))
            }
        };
        let gateway = check("gateway", spec.gateway.unwrap_or(first))?;
        let start = check("rangeStart", spec.range_start.unwrap_or(first))?;
        let end = check("rangeEnd", spec.range_end.unwrap_or(last))?;
        if to_u128(start) > to_u128(end) {
            return Err(IpamError::InvalidRange(format!("rangeStart {start} is after rangeEnd {end}")));
        }
        Ok(Range { subnet, start, end, gateway })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.start.is_ipv4() && (to_u128(self.start)..=to_u128(self.end)).contains(&to_u128(ip))
    }

    fn overlaps(&self, other: &Range) -> bool {
        self.contains(other.start) || self.contains(other.end) || other.contains(self.start)
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

/// The ranges one address is drawn from (one entry of `ranges`); all of one family, none overlapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeSet(pub Vec<Range>);

impl RangeSet {
    pub fn new(specs: &[RangeSpec]) -> Result<RangeSet, IpamError> {
        if specs.is_empty() {
            return Err(IpamError::InvalidRange("a range set needs at least one range".into()));
        }
        let ranges = specs.iter().map(Range::new).collect::<Result<Vec<_>, _>>()?;
        for (i, a) in ranges.iter().enumerate() {
            if a.start.is_ipv4() != ranges[0].start.is_ipv4() {
                return Err(IpamError::InvalidRange("a range set mixes IPv4 and IPv6".into()));
            }
            for b in &ranges[i + 1..] {
                if a.overlaps(b) {
                    return Err(IpamError::InvalidRange(format!("ranges {a} and {b} overlap")));
                }
            }
        }
        Ok(RangeSet(ranges))
    }

    pub fn is_ipv4(&self) -> bool {
        self.0[0].start.is_ipv4()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|r| r.contains(ip))
    }

    pub fn range_of(&self, ip: IpAddr) -> Option<&Range> {
        self.0.iter().find(|r| r.contains(ip))
    }

    /// Every candidate in allocation order: after `last` (round robin) when it lies in the set, else from the
    /// start; gateways are never candidates.
    pub(crate) fn candidates(&self, last: Option<IpAddr>) -> impl Iterator<Item = (IpAddr, &Range)> + '_ {
        let v4 = self.is_ipv4();
        let (first_range, first_ip) = match last.and_then(|l| self.0.iter().position(|r| r.contains(l)).map(|i| (i, l)))
        {
            Some((i, l)) if to_u128(l) < to_u128(self.0[i].end) => (i, to_u128(l) + 1),
            Some((i, _)) => ((i + 1) % self.0.len(), to_u128(self.0[(i + 1) % self.0.len()].start)),
            None => (0, to_u128(self.0[0].start)),
        };
        let n = self.0.len();
        // Walk the range we resume in from the resume point, the others whole, then the head of the first range.
        (0..=n).flat_map(move |step| {
            let idx = (first_range + step) % n;
            let r = &self.0[idx];
            let (lo, hi) = match step {
                0 => (first_ip, to_u128(r.end)),
                s if s == n => (to_u128(r.start), first_ip.saturating_sub(1)),
                _ => (to_u128(r.start), to_u128(r.end)),
            };
            // The wrap-around step is empty when the walk began at its range's first address.
            let empty = step == n && first_ip == to_u128(r.start);
            (lo..=hi)
                .filter(move |_| !empty)
                .map(move |x| from_u128(v4, x))
                .filter(move |ip| *ip != r.gateway)
                .map(move |ip| (ip, r))
        })
    }
}

impl fmt::Display for RangeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|r| r.to_string()).collect();
        f.write_str(&parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> RangeSpec {
        RangeSpec { subnet: s.parse().unwrap(), range_start: None, range_end: None, gateway: None }
    }

    #[test]
    fn host_local_defaults() {
        let r = Range::new(&spec("10.1.2.0/24")).unwrap();
        assert_eq!(r.gateway.to_string(), "10.1.2.1");
        assert_eq!(r.start.to_string(), "10.1.2.1");
        assert_eq!(r.end.to_string(), "10.1.2.254");
        let r6 = Range::new(&spec("fd00::/120")).unwrap();
        assert_eq!(r6.end.to_string(), "fd00::ff");
    }

    #[test]
    fn refuses_bad_ranges() {
        for bad in ["10.1.2.0/31", "10.1.2.0/32", "fd00::/127", "10.1.2.5/24"] {
            assert!(Range::new(&spec(bad)).is_err(), "{bad}");
        }
        let mut s = spec("10.1.2.0/24");
        s.gateway = Some("10.9.9.9".parse().unwrap());
        assert!(Range::new(&s).is_err());
        let mut s = spec("10.1.2.0/24");
        s.range_start = Some("10.1.2.100".parse().unwrap());
        s.range_end = Some("10.1.2.50".parse().unwrap());
        assert!(Range::new(&s).is_err());
        assert!(RangeSet::new(&[spec("10.1.2.0/24"), spec("10.1.2.0/25")]).is_err());
        assert!(RangeSet::new(&[spec("10.1.2.0/24"), spec("fd00::/64")]).is_err());
        assert!(RangeSet::new(&[]).is_err());
    }

    #[test]
    fn candidates_skip_gateway_and_resume_round_robin() {
        let set = RangeSet::new(&[spec("10.0.0.0/29"), spec("10.0.1.0/29")]).unwrap();
        let all: Vec<String> = set.candidates(None).map(|(ip, _)| ip.to_string()).collect();
        assert_eq!(
            all,
            [
                "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6", "10.0.1.2", "10.0.1.3", "10.0.1.4",
                "10.0.1.5", "10.0.1.6"
            ]
        );
        let resumed: Vec<String> =
            set.candidates(Some("10.0.0.6".parse().unwrap())).map(|(ip, _)| ip.to_string()).collect();
        assert_eq!(resumed.first().unwrap(), "10.0.1.2");
        assert_eq!(resumed.last().unwrap(), "10.0.0.6");
        assert_eq!(resumed.len(), 10);
        let mid: Vec<String> =
            set.candidates(Some("10.0.1.3".parse().unwrap())).map(|(ip, _)| ip.to_string()).collect();
        assert_eq!(mid.first().unwrap(), "10.0.1.4");
        assert_eq!(mid.last().unwrap(), "10.0.1.3");
        assert_eq!(mid.len(), 10);
    }
}
