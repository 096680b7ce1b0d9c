use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendType {
    Vxlan,
    HostGw,
    Udp,
}

impl BackendType {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendType::Vxlan => "vxlan",
            BackendType::HostGw => "host-gw",
            BackendType::Udp => "udp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub kind: BackendType,
    /// vxlan: the VNI (default 1).
    pub vni: u32,
    /// vxlan: 8472 by default (the Linux default); udp: 8285.
    pub port: u16,
    /// vxlan: route directly to remotes on the same L2 segment.
    pub direct_routing: bool,
    pub gbp: bool,
    /// Overrides the derived MTU.
    pub mtu: Option<u32>,
}

/// `<prefix>/config`, validated, with flannel's defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    pub enable_ipv4: bool,
    pub network: Option<Ipv4Net>,
    pub subnet_len: u8,
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    pub enable_ipv6: bool,
    pub ipv6_network: Option<Ipv6Net>,
    pub ipv6_subnet_len: u8,
    pub ipv6_subnet_min: Option<Ipv6Addr>,
    pub ipv6_subnet_max: Option<Ipv6Addr>,
    pub backend: BackendConfig,
}

/// Which field is wrong and why, as an operator needs it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("network config: {field}: {reason}")]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

fn err(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError { field: field.into(), reason: reason.into() }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Raw {
    #[serde(rename = "EnableIPv4")]
    enable_ipv4: Option<bool>,
    network: Option<String>,
    subnet_len: Option<u8>,
    subnet_min: Option<String>,
    subnet_max: Option<String>,
    #[serde(rename = "EnableIPv6")]
    enable_ipv6: Option<bool>,
    #[serde(rename = "IPv6Network")]
    ipv6_network: Option<String>,
    #[serde(rename = "IPv6SubnetLen")]
    ipv6_subnet_len: Option<u8>,
    #[serde(rename = "IPv6SubnetMin")]
    ipv6_subnet_min: Option<String>,
    #[serde(rename = "IPv6SubnetMax")]
    ipv6_subnet_max: Option<String>,
    backend: Option<serde_json::Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawBackend {
    #[serde(rename = "Type")]
    kind: Option<String>,
    #[serde(rename = "VNI")]
    vni: Option<u32>,
    port: Option<u16>,
    direct_routing: Option<bool>,
    #[serde(rename = "GBP")]
    gbp: Option<bool>,
    #[serde(rename = "MTU")]
    mtu: Option<u32>,
}

/// The keys flanneld's config has (subnet/config.go), top level and in Backend (every backend's).
const TOP_KEYS: &[&str] = &[
    "EnableIPv4",
    "EnableIPv6",
    "EnableNFTables",
    "Network",
    "IPv6Network",
    "Networks",
    "IPv6Networks",
    "SubnetMin",
    "SubnetMax",
    "IPv6SubnetMin",
    "IPv6SubnetMax",
    "SubnetLen",
    "IPv6SubnetLen",
    "Backend",
];
const BACKEND_KEYS: &[&str] = &["Type", "VNI", "Port", "GBP", "Learning", "DirectRouting", "MTU", "MacPrefix"];
/// flanneld keys Tartan reads but does not act on: said once, like unknown ones.
const NOT_SUPPORTED: &[&str] = &["EnableNFTables", "Networks", "IPv6Networks"];

impl NetworkConfig {
    /// Parses and validates the JSON stored at `<prefix>/config`.
    pub fn parse(json: &str) -> Result<NetworkConfig, ConfigError> {
        Self::parse_with_warnings(json).map(|(c, _)| c)
    }

    /// [`NetworkConfig::parse`], with flanneld's key matching (see [`crate::gojson`]), and what was ignored: keys
    /// no flanneld version knows (likely misspelt) and keys Tartan does not act on, each named.
    pub fn parse_with_warnings(json: &str) -> Result<(NetworkConfig, Vec<String>), ConfigError> {
        let doc: serde_json::Value =
            serde_json::from_str(json).map_err(|e| err("(document)", format!("not valid JSON: {e}")))?;
        if !doc.is_object() {
            return Err(err("(document)", "is not a JSON object"));
        }
        let (mut doc, unknown) = crate::gojson::fold_keys(&doc, TOP_KEYS);
        let mut warnings: Vec<String> =
            unknown.iter().map(|k| format!("{k}: unknown key, ignored (misspelt? flanneld ignores it too)")).collect();
        if let Some(b) = doc.get("Backend").filter(|b| b.is_object()).cloned() {
            let (mut b, unknown) = crate::gojson::fold_keys(&b, BACKEND_KEYS);
            warnings.extend(unknown.iter().map(|k| format!("Backend.{k}: unknown key, ignored (misspelt?)")));
            // flanneld lower-cases the backend type.
            if let Some(t) = b.get("Type").and_then(|t| t.as_str()).map(str::to_ascii_lowercase) {
                b["Type"] = serde_json::Value::String(t);
            }
            for k in ["Learning", "MacPrefix"] {
                if b.get(k).is_some() {
                    warnings.push(format!("Backend.{k}: not supported by tartan-agent, ignored"));
                }
            }
            doc["Backend"] = b;
        }
        for k in NOT_SUPPORTED {
            if doc.get(*k).is_some() {
                warnings.push(format!("{k}: not supported by tartan-agent, ignored"));
            }
        }
        let raw: Raw = serde_json::from_value(doc).map_err(|e| err("(document)", e.to_string()))?;
        Self::from_raw(raw).map(|c| (c, warnings))
    }

    fn from_raw(raw: Raw) -> Result<NetworkConfig, ConfigError> {
        let enable_ipv4 = raw.enable_ipv4.unwrap_or(true);
        let enable_ipv6 = raw.enable_ipv6.unwrap_or(false);
        if !enable_ipv4 && !enable_ipv6 {
            return Err(err("EnableIPv4", "neither IPv4 nor IPv6 is enabled"));
        }

        let backend = parse_backend(raw.backend.as_ref())?;

        let mut cfg = NetworkConfig {
            enable_ipv4,
            network: None,
            subnet_len: 0,
            subnet_min: Ipv4Addr::UNSPECIFIED,
            subnet_max: Ipv4Addr::UNSPECIFIED,
            enable_ipv6,
            ipv6_network: None,
            ipv6_subnet_len: 0,
            ipv6_subnet_min: None,
            ipv6_subnet_max: None,
            backend,
        };

        if enable_ipv4 {
            let s = raw.network.as_deref().ok_or_else(|| err("Network", "is required (e.g. \"10.244.0.0/16\")"))?;
            let net: Ipv4Net = s.parse().map_err(|_| err("Network", format!("{s:?} is not an IPv4 CIDR")))?;
            if net.addr() != net.network() {
                return Err(err("Network", format!("{net} has host bits set; the network is {}", net.trunc())));
            }
            let len = match raw.subnet_len {
                Some(l) if l > 30 => return Err(err("SubnetLen", format!("{l} is longer than /30"))),
                Some(l) if l < net.prefix_len() + 2 => {
                    return Err(err("SubnetLen", format!("/{l} leaves fewer than four subnets in {net}")))
                }
                Some(l) => l,
                None if net.prefix_len() > 28 => {
                    return Err(err("Network", format!("{net} is too small; the smallest useful network is a /28")))
                }
                None if net.prefix_len() <= 22 => 24,
                None => net.prefix_len() + 2,
            };
            let size = 1u32 << (32 - len);
            let first = u32::from(net.network());
            let last_subnet = u32::from(net.broadcast()) - size + 1;
            let bound = |field: &str, v: &Option<String>, default: u32| -> Result<Ipv4Addr, ConfigError> {
                let ip = match v {
                    None => return Ok(Ipv4Addr::from(default)),
                    Some(s) => {
                        s.parse::<Ipv4Addr>().map_err(|_| err(field, format!("{s:?} is not an IPv4 address")))?
                    }
                };
                if !net.contains(&ip) {
                    return Err(err(field, format!("{ip} is outside {net}")));
                }
                if u32::from(ip) % size != 0 {
                    return Err(err(field, format!("{ip} is not on a /{len} boundary")));
                }
                Ok(ip)
            };
            // The first subnet is skipped: its .0 would be the network's own address.
            cfg.subnet_min = bound("SubnetMin", &raw.subnet_min, first + size)?;
            cfg.subnet_max = bound("SubnetMax", &raw.subnet_max, last_subnet)?;
            if u32::from(cfg.subnet_min) > u32::from(cfg.subnet_max) {
                return Err(err("SubnetMin", format!("{} is after SubnetMax {}", cfg.subnet_min, cfg.subnet_max)));
            }
            cfg.network = Some(net);
            cfg.subnet_len = len;
        }

        if enable_ipv6 {
            let s =
                raw.ipv6_network.as_deref().ok_or_else(|| err("IPv6Network", "is required when EnableIPv6 is true"))?;
            let net: Ipv6Net = s.parse().map_err(|_| err("IPv6Network", format!("{s:?} is not an IPv6 CIDR")))?;
            let len = match raw.ipv6_subnet_len {
                Some(l) if l > 126 => return Err(err("IPv6SubnetLen", format!("{l} is longer than /126"))),
                Some(l) if l < net.prefix_len() + 2 => {
                    return Err(err("IPv6SubnetLen", format!("/{l} leaves fewer than four subnets in {net}")))
                }
                Some(l) => l,
                None if net.prefix_len() > 124 => return Err(err("IPv6Network", format!("{net} is too small"))),
                None if net.prefix_len() <= 62 => 64,
                None => net.prefix_len() + 2,
            };
            let size = 1u128 << (128 - len);
            let first = u128::from(net.network());
            let last_subnet = u128::from(net.broadcast()) - size + 1;
            let bound = |field: &str, v: &Option<String>, default: u128| -> Result<Ipv6Addr, ConfigError> {
                let ip = match v {
                    None => return Ok(Ipv6Addr::from(default)),
                    Some(s) => {
                        s.parse::<Ipv6Addr>().map_err(|_| err(field, format!("{s:?} is not an IPv6 address")))?
                    }
                };
                if !net.contains(&ip) {
                    return Err(err(field, format!("{ip} is outside {net}")));
                }
                if u128::from(ip) % size != 0 {
                    return Err(err(field, format!("{ip} is not on a /{len} boundary")));
                }
                Ok(ip)
            };
            cfg.ipv6_subnet_min = Some(bound("IPv6SubnetMin", &raw.ipv6_subnet_min, first + size)?);
            cfg.ipv6_subnet_max = Some(bound("IPv6SubnetMax", &raw.ipv6_subnet_max, last_subnet)?);
            cfg.ipv6_network = Some(net);
            cfg.ipv6_subnet_len = len;
        }
        Ok(cfg)
    }

    /// Every IPv4 subnet leases may take, in order.
    pub fn subnets(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        let size = 1u32 << (32 - self.subnet_len);
        let (lo, hi) = (u32::from(self.subnet_min), u32::from(self.subnet_max));
        (lo..=hi)
            .step_by(size as usize)
            .map(move |a| Ipv4Net::new(Ipv4Addr::from(a), self.subnet_len).expect("valid prefix"))
    }

    /// Whether `subnet` is one this config could have handed out.
    pub fn fits(&self, subnet: &Ipv4Net) -> bool {
        subnet.prefix_len() == self.subnet_len
            && u32::from(subnet.addr()) >= u32::from(self.subnet_min)
            && u32::from(subnet.addr()) <= u32::from(self.subnet_max)
            && subnet.addr() == subnet.network()
    }
}

impl NetworkConfig {
    /// Every IPv6 subnet leases may take, in order (empty without IPv6).
    pub fn ipv6_subnets(&self) -> impl Iterator<Item = Ipv6Net> + '_ {
        let (lo, hi) = match (self.ipv6_subnet_min, self.ipv6_subnet_max) {
            (Some(lo), Some(hi)) => (u128::from(lo), u128::from(hi)),
            _ => (1, 0),
        };
        let size = if self.enable_ipv6 { 1u128 << (128 - self.ipv6_subnet_len) } else { 1 };
        // u128 ranges cannot step_by a u128; walk by hand.
        std::iter::successors(Some(lo), move |a| a.checked_add(size))
            .take_while(move |a| *a <= hi)
            .map(move |a| Ipv6Net::new(Ipv6Addr::from(a), self.ipv6_subnet_len).expect("valid prefix"))
    }

    /// Whether `subnet` is an IPv6 subnet this config could have handed out.
    pub fn fits_v6(&self, subnet: &Ipv6Net) -> bool {
        let (Some(lo), Some(hi)) = (self.ipv6_subnet_min, self.ipv6_subnet_max) else { return false };
        subnet.prefix_len() == self.ipv6_subnet_len
            && subnet.addr() >= lo
            && subnet.addr() <= hi
            && subnet.addr() == subnet.network()
    }
}

fn parse_backend(v: Option<&serde_json::Value>) -> Result<BackendConfig, ConfigError> {
    // flanneld's own rule: no Backend at all means udp.
    let raw: RawBackend = match v {
        None => RawBackend { kind: Some("udp".into()), ..Default::default() },
        Some(v) => {
            let (v, _) = crate::gojson::fold_keys(v, BACKEND_KEYS);
            serde_json::from_value(v).map_err(|e| err("Backend", e.to_string()))?
        }
    };
    let kind = match raw.kind.as_deref() {
        Some("vxlan") => BackendType::Vxlan,
        Some("host-gw") => BackendType::HostGw,
        Some("udp") | None => BackendType::Udp,
        Some(other) => {
            return Err(err("Backend.Type", format!("{other:?} is not one of vxlan, host-gw, udp")));
        }
    };
    let port = raw.port.unwrap_or(match kind {
        BackendType::Vxlan => 8472,
        BackendType::Udp => 8285,
        BackendType::HostGw => 0,
    });
    let vni = raw.vni.unwrap_or(1);
    if vni >= 1 << 24 {
        return Err(err("Backend.VNI", format!("{vni} does not fit in 24 bits")));
    }
    if let Some(m) = raw.mtu {
        if !(576..=65535).contains(&m) {
            return Err(err("Backend.MTU", format!("{m} is out of range 576-65535")));
        }
    }
    Ok(BackendConfig {
        kind,
        vni,
        port,
        direct_routing: raw.direct_routing.unwrap_or(false),
        gbp: raw.gbp.unwrap_or(false),
        mtu: raw.mtu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flannel_defaults() {
        let c = NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min.to_string(), "10.244.1.0");
        assert_eq!(c.subnet_max.to_string(), "10.244.255.0");
        assert_eq!(c.backend.vni, 1);
        assert_eq!(c.backend.port, 8472);
        assert_eq!(c.subnets().count(), 255);
        let small = NetworkConfig::parse(r#"{"Network":"10.1.0.0/26"}"#).unwrap();
        assert_eq!(small.subnet_len, 28);
        assert_eq!(small.backend.kind, BackendType::Udp, "flanneld picks udp when Backend is absent");
        assert_eq!(small.backend.port, 8285);
    }

    #[test]
    fn the_reference_example() {
        let c = NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","SubnetLen":24,"SubnetMin":"10.244.10.0","SubnetMax":"10.244.100.0",
               "Backend":{"Type":"vxlan","VNI":1,"Port":8472,"DirectRouting":true}}"#,
        )
        .unwrap();
        assert!(c.backend.direct_routing);
        assert_eq!(c.subnets().count(), 91);
        assert!(c.fits(&"10.244.10.0/24".parse().unwrap()));
        assert!(!c.fits(&"10.244.9.0/24".parse().unwrap()));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (r#"{}"#, "Network"),
            (r#"{"Network":"10.244.0.0/29"}"#, "Network"),
            (r#"{"Network":"10.244.0.1/16"}"#, "Network"),
            (r#"{"Network":"10.244.0.0/16","SubnetLen":31}"#, "SubnetLen"),
            (r#"{"Network":"10.244.0.0/16","SubnetLen":17}"#, "SubnetLen"),
            (r#"{"Network":"10.244.0.0/16","SubnetMin":"10.245.0.0"}"#, "SubnetMin"),
            (r#"{"Network":"10.244.0.0/16","SubnetMax":"10.244.0.128"}"#, "SubnetMax"),
            (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}"#, "Backend.Type"),
            (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":16777216}}"#, "Backend.VNI"),
            (r#"{"Network":"10.244.0.0/16","EnableIPv6":true}"#, "IPv6Network"),
            (r#"{"Network":"#, "(document)"),
        ];
        for (json, field) in cases {
            let e = NetworkConfig::parse(json).unwrap_err();
            assert_eq!(e.field, field, "{json}: {e}");
        }
    }

    #[test]
    fn keys_match_as_flanneld_matches_them() {
        let (c, w) = NetworkConfig::parse_with_warnings(
            r#"{"network":"10.244.0.0/16","subnetlen":25,"backend":{"type":"VXLAN","vni":7,"Directrouting":true,"Prot":1}}"#,
        )
        .unwrap();
        assert_eq!(c.network.unwrap().to_string(), "10.244.0.0/16");
        assert_eq!(c.subnet_len, 25);
        assert_eq!((c.backend.kind, c.backend.vni, c.backend.direct_routing), (BackendType::Vxlan, 7, true));
        assert_eq!(w, ["Backend.Prot: unknown key, ignored (misspelt?)"]);
        let (_, w) =
            NetworkConfig::parse_with_warnings(r#"{"Network":"10.244.0.0/16","Netwrok":"x","Networks":[]}"#).unwrap();
        assert!(w.iter().any(|m| m.starts_with("Netwrok: unknown key")), "{w:?}");
        assert!(w.iter().any(|m| m.starts_with("Networks: not supported")), "{w:?}");
        let e = NetworkConfig::parse("{\n  \"Network\": \"10.244.0.0/16\",\n  \"Backend\": {\"Type\": vxlan}\n}")
            .unwrap_err();
        assert!(e.reason.contains("line 3 column"), "{e}");
    }

    #[test]
    fn dual_stack() {
        let c = NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10::/56","Backend":{"Type":"host-gw"}}"#,
        )
        .unwrap();
        assert_eq!(c.ipv6_subnet_len, 64);
        assert_eq!(c.ipv6_subnet_min.unwrap().to_string(), "fd00:10:0:1::");
    }
}
