use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

/// A lease's key below `<prefix>/subnets/`: `10.244.1.0-24`, or `10.244.1.0-24&fd00:1::-64` with IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeaseKey {
    pub subnet: Ipv4Net,
    pub ipv6_subnet: Option<Ipv6Net>,
}

impl fmt::Display for LeaseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.subnet.addr(), self.subnet.prefix_len())?;
        if let Some(v6) = self.ipv6_subnet {
            write!(f, "&{}-{}", v6.addr(), v6.prefix_len())?;
        }
        Ok(())
    }
}

impl FromStr for LeaseKey {
    type Err = String;

    fn from_str(s: &str) -> Result<LeaseKey, String> {
        let (v4, v6) = match s.split_once('&') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let net = |part: &str| -> Result<(String, u8), String> {
            let (a, l) = part.rsplit_once('-').ok_or_else(|| format!("{s:?} is not a lease key"))?;
            Ok((a.to_string(), l.parse().map_err(|_| format!("{s:?}: bad prefix length"))?))
        };
        let (a, l) = net(v4)?;
        let ip: Ipv4Addr = a.parse().map_err(|_| format!("{s:?}: bad IPv4 address"))?;
        let subnet = Ipv4Net::new(ip, l).map_err(|_| format!("{s:?}: bad prefix length"))?;
        if subnet.addr() != subnet.network() {
            return Err(format!("{s:?}: not a network address"));
        }
        let ipv6_subnet = match v6 {
            None => None,
            Some(p) => {
                let (a, l) = net(p)?;
                let ip: Ipv6Addr = a.parse().map_err(|_| format!("{s:?}: bad IPv6 address"))?;
                Some(Ipv6Net::new(ip, l).map_err(|_| format!("{s:?}: bad prefix length"))?)
            }
        };
        Ok(LeaseKey { subnet, ipv6_subnet })
    }
}

/// A lease's value, with flanneld's field names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    /// flanneld writes `null` when the node has no IPv6 address.
    #[serde(rename = "PublicIPv6", default)]
    pub public_ipv6: Option<Ipv6Addr>,
    #[serde(rename = "BackendType", default, skip_serializing_if = "String::is_empty")]
    pub backend_type: String,
    #[serde(rename = "BackendData", default, skip_serializing_if = "Option::is_none")]
    pub backend_data: Option<serde_json::Value>,
    #[serde(rename = "BackendV6Data", default, skip_serializing_if = "Option::is_none")]
    pub backend_v6_data: Option<serde_json::Value>,
}

/// vxlan's BackendData.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanData {
    #[serde(rename = "VNI")]
    pub vni: u32,
    #[serde(rename = "VtepMAC")]
    pub vtep_mac: String,
}

const LEASE_KEYS: &[&str] = &["PublicIP", "PublicIPv6", "BackendType", "BackendData", "BackendV6Data"];
const VXLAN_KEYS: &[&str] = &["VNI", "VtepMAC"];

impl LeaseAttrs {
    /// A lease value as another agent (flanneld or Tartan) wrote it, keys matched as flanneld's Go decoder
    /// matches them; fields Tartan does not use are ignored and left as they are in etcd.
    pub fn from_json(bytes: &[u8]) -> Result<LeaseAttrs, serde_json::Error> {
        let v: serde_json::Value = serde_json::from_slice(bytes)?;
        serde_json::from_value(crate::gojson::fold_keys(&v, LEASE_KEYS).0)
    }

    fn vxlan_of(d: Option<&serde_json::Value>) -> Option<VxlanData> {
        serde_json::from_value(crate::gojson::fold_keys(d?, VXLAN_KEYS).0).ok()
    }

    pub fn vxlan(&self) -> Option<VxlanData> {
        Self::vxlan_of(self.backend_data.as_ref())
    }

    /// The IPv6 tunnel's BackendV6Data (dual stack).
    pub fn vxlan_v6(&self) -> Option<VxlanData> {
        Self::vxlan_of(self.backend_v6_data.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        for k in ["10.244.1.0-24", "10.244.1.0-24&fd00:1::-64"] {
            assert_eq!(k.parse::<LeaseKey>().unwrap().to_string(), k);
        }
        for bad in ["10.244.1.0", "10.244.1.5-24", "x-24", "10.244.1.0-33", "10.244.1.0-24&zz-64"] {
            assert!(bad.parse::<LeaseKey>().is_err(), "{bad}");
        }
    }

    #[test]
    fn leases_written_by_flanneld_or_in_other_case_are_read() {
        // flanneld's own value, with a field Tartan does not use.
        let v = br#"{"PublicIP":"198.18.0.9","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:42:ac:11:00:09"},"BackendV6Data":null,"Extra":true}"#;
        let a = LeaseAttrs::from_json(v).unwrap();
        assert_eq!(a.vxlan().unwrap().vtep_mac, "02:42:ac:11:00:09");
        let odd =
            br#"{"publicip":"198.18.0.9","backendtype":"vxlan","backenddata":{"vni":1,"vtepmac":"02:42:ac:11:00:09"}}"#;
        let b = LeaseAttrs::from_json(odd).unwrap();
        assert_eq!((b.public_ip, b.vxlan().unwrap().vni), (a.public_ip, 1));
    }

    #[test]
    fn values_use_flannels_field_names() {
        let v = r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;
        let a: LeaseAttrs = serde_json::from_str(v).unwrap();
        assert_eq!(a.vxlan().unwrap().vtep_mac, "c6:d2:32:6f:8f:44");
        assert_eq!(serde_json::to_string(&a).unwrap(), v);
        let hostgw = r#"{"PublicIP":"198.18.0.2","PublicIPv6":null,"BackendType":"host-gw"}"#;
        let h: LeaseAttrs = serde_json::from_str(hostgw).unwrap();
        assert_eq!(serde_json::to_string(&h).unwrap(), hostgw);
    }
}
