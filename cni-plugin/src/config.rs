//! The network configuration: the reference bridge plugin's options under the same names, host-local's IPAM
//! options, and flannel mode. Parsed and validated once here into a [`Plan`] the commands act on.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use cni_types::{CniError, Dns, ErrorCode, Version};
use ipam::{RangeSet, RangeSpec};
use ipnet::IpNet;
use serde::Deserialize;
use serde_json::{Map, Value};

use flannel::{SubnetEnv, SubnetEnvError};

pub const DEFAULT_BRIDGE: &str = "cni0";
pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";
pub const DEFAULT_RUN_DIR: &str = "/run/tartan";

/// The config as written (after flannel's `delegate` object, if any, is merged in).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub name: String,
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    pub bridge: Option<String>,
    pub is_gateway: Option<bool>,
    pub is_default_gateway: Option<bool>,
    pub force_address: Option<bool>,
    pub ip_masq: Option<bool>,
    pub mtu: Option<u32>,
    pub hairpin_mode: Option<bool>,
    pub promisc_mode: Option<bool>,
    pub vlan: Option<u16>,
    pub ipam: Option<Value>,
    pub dns: Option<Dns>,
    /// flannel mode: where the node agent publishes the node subnet.
    pub subnet_file: Option<PathBuf>,
    /// Volatile node-local state of ours (locks).
    pub run_dir: Option<PathBuf>,
    pub prev_result: Option<Value>,
    /// Capabilities the runtime filled in (`ips`, `mac`).
    pub runtime_config: Option<Value>,
    /// Conventional `args.cni` (`ips`, `mac`).
    pub args: Option<Value>,
}

/// host-local's options.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostLocalConf {
    #[serde(rename = "type", default)]
    pub ipam_type: String,
    pub ranges: Option<Vec<Vec<RangeSpec>>>,
    pub subnet: Option<IpNet>,
    pub range_start: Option<IpAddr>,
    pub range_end: Option<IpAddr>,
    pub gateway: Option<IpAddr>,
    #[serde(default)]
    pub routes: Vec<RouteConf>,
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RouteConf {
    pub dst: IpNet,
    pub gw: Option<IpAddr>,
}

/// Where addresses come from.
#[derive(Debug, Clone)]
pub enum Ipam {
    /// In-process host-local. `sets` is empty when the ranges could not be known (flannel mode on DEL/GC without a
    /// subnet file), which is enough to release by owner.
    HostLocal { sets: Vec<RangeSet>, routes: Vec<RouteConf>, data_dir: PathBuf },
    /// Another IPAM plugin, run from CNI_PATH.
    Delegate { plugin: String },
}

/// Everything a command needs, validated.
#[derive(Debug, Clone)]
pub struct Plan {
    pub version: Version,
    pub network: String,
    pub bridge: String,
    pub is_gateway: bool,
    pub is_default_gateway: bool,
    pub force_address: bool,
    pub ip_masq: bool,
    pub mtu: Option<u32>,
    pub hairpin: bool,
    pub promisc: bool,
    pub vlan: Option<u16>,
    pub ipam: Ipam,
    pub dns: Dns,
    pub run_dir: PathBuf,
    /// Validated at parse time (a bad one fails before anything changes), passed on as JSON.
    pub prev_result: Option<Value>,
    /// Addresses the runtime asked for (runtimeConfig `ips`, `args.cni.ips`; CNI_ARGS `IP=` is added by ADD).
    pub requested_ips: Vec<IpAddr>,
    /// The container interface's MAC, if the runtime asked for one.
    pub mac: Option<[u8; 6]>,
    /// Whether the ranges came from a subnet file.
    pub flannel: Option<PathBuf>,
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::InvalidConfig, msg, "")
}

/// Deserializes, naming the offending field (`ipam.ranges[0][0].subnet: invalid IP address syntax`).
fn from_value<T: serde::de::DeserializeOwned>(v: Value, prefix: &str) -> Result<T, CniError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { prefix.trim_end_matches('.').to_string() } else { format!("{prefix}{path}") };
        invalid(format!("{}: {}", if field.is_empty() { "network configuration" } else { &field }, e.into_inner()))
    })
}

/// The first step for every command: JSON, then the version (code 1 before anything else can complain).
pub fn parse_raw(stdin: &[u8]) -> Result<(Version, Map<String, Value>), CniError> {
    let v: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(ErrorCode::DecodeFailure, "network configuration is not valid JSON", e.to_string())
    })?;
    let Value::Object(map) = v else {
        return Err(CniError::new(ErrorCode::DecodeFailure, "network configuration must be a JSON object", ""));
    };
    let version = match map.get("cniVersion") {
        Some(Value::String(s)) => s.parse::<Version>()?,
        Some(other) => return Err(invalid(format!("cniVersion must be a string, got {other}"))),
        None => {
            return Err(CniError::new(
                ErrorCode::IncompatibleVersion,
                "cniVersion is missing, which means 0.1.0; this plugin supports 0.3.0 and later",
                "add \"cniVersion\": \"0.3.1\" (or later) to the network configuration",
            ))
        }
    };
    Ok((version, map))
}

/// How much of the plan a command needs: ADD/CHECK/STATUS need the ranges; DEL and GC can do with less.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Ranges,
    OwnersOnly,
}

impl Plan {
    pub fn from_stdin(stdin: &[u8], need: Need) -> Result<Plan, CniError> {
        let (version, mut map) = parse_raw(stdin)?;
        // flannel's meta-plugin config keeps bridge options in `delegate`; honour it so its conflist works as is.
        if let Some(Value::Object(delegate)) = map.remove("delegate") {
            for (k, v) in delegate {
                if k != "type" && k != "cniVersion" && k != "name" {
                    map.entry(k).or_insert(v);
                }
            }
        }
        let conf: NetConf = from_value(Value::Object(map), "")?;
        Plan::from_conf(version, conf, need)
    }

    fn from_conf(version: Version, c: NetConf, need: Need) -> Result<Plan, CniError> {
        if c.name.is_empty() || c.name.contains('/') || c.name == "." || c.name == ".." {
            return Err(invalid(format!("name {:?} is not a valid network name", c.name)));
        }
        let bridge = c.bridge.clone().unwrap_or_else(|| DEFAULT_BRIDGE.to_string());
        if bridge.is_empty() || bridge.len() > 15 || bridge.contains(['/', ':', ' ']) {
            return Err(invalid(format!("bridge {bridge:?} is not a valid interface name")));
        }
        if c.hairpin_mode == Some(true) && c.promisc_mode == Some(true) {
            return Err(invalid("hairpinMode and promiscMode cannot both be set"));
        }
        if let Some(v) = c.vlan {
            if v > 4094 {
                return Err(invalid(format!("vlan {v} is out of range 0-4094")));
            }
        }
        if let Some(m) = c.mtu {
            if !(68..=65535).contains(&m) {
                return Err(invalid(format!("mtu {m} is out of range 68-65535")));
            }
        }

        let host_local: Option<HostLocalConf> = match &c.ipam {
            None => Some(HostLocalConf::default()),
            Some(v) => {
                let t = v.get("type").and_then(Value::as_str).unwrap_or("host-local");
                if t == "host-local" || t.is_empty() {
                    Some(from_value(v.clone(), "ipam.")?)
                } else {
                    if t.contains('/') {
                        return Err(invalid(format!("ipam type {t:?} is not a plugin name")));
                    }
                    None
                }
            }
        };

        let mut mtu = c.mtu;
        let mut ip_masq = c.ip_masq;
        let mut is_gateway = c.is_gateway;
        let mut flannel = None;
        let ipam = match host_local {
            None => Ipam::Delegate {
                plugin: c.ipam.as_ref().and_then(|v| v.get("type")).and_then(Value::as_str).unwrap_or_default().into(),
            },
            Some(hl) => {
                let data_dir = hl.data_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
                let mut specs: Vec<Vec<RangeSpec>> = match (&hl.ranges, hl.subnet) {
                    (Some(r), _) => r.clone(),
                    (None, Some(subnet)) => vec![vec![RangeSpec {
                        subnet,
                        range_start: hl.range_start,
                        range_end: hl.range_end,
                        gateway: hl.gateway,
                    }]],
                    (None, None) => Vec::new(),
                };
                let mut routes = hl.routes.clone();
                if specs.is_empty() {
                    // flannel mode: the node's subnet comes from the agent.
                    let path = c.subnet_file.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_SUBNET_FILE));
                    flannel = Some(path.clone());
                    match SubnetEnv::load(&path) {
                        Ok(env) => {
                            let (s, r) = flannel_ranges(&env);
                            specs = s;
                            routes.extend(r);
                            mtu = mtu.or(env.mtu);
                            ip_masq = ip_masq.or(env.ipmasq.map(|m| !m));
                            is_gateway = is_gateway.or(Some(true));
                        }
                        Err(SubnetEnvError::Missing(msg)) if need == Need::Ranges => {
                            return Err(CniError::new(ErrorCode::TryAgainLater, "node subnet is not known yet", msg));
                        }
                        Err(SubnetEnvError::Invalid { file, msg }) if need == Need::Ranges => {
                            return Err(invalid(format!("{file}: {msg}")));
                        }
                        Err(_) => {}
                    }
                }
                if specs.is_empty() && need == Need::Ranges {
                    return Err(invalid("ipam has no ranges or subnet, and there is no subnet file"));
                }
                let sets = specs
                    .iter()
                    .map(|s| RangeSet::new(s))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| invalid(format!("ipam: {e}")))?;
                let v4 = sets.iter().filter(|s| s.is_ipv4()).count();
                if v4 > 1 || sets.len() - v4 > 1 {
                    return Err(invalid("ipam: at most one IPv4 and one IPv6 range set"));
                }
                Ipam::HostLocal { sets, routes, data_dir }
            }
        };
        if let Some(prev) = &c.prev_result {
            cni_types::CniResult::from_value(prev)?;
        }
        let mut requested_ips = Vec::new();
        let mut mac = None;
        for src in [c.runtime_config.as_ref(), c.args.as_ref().and_then(|a| a.get("cni"))].into_iter().flatten() {
            if let Some(list) = src.get("ips").and_then(Value::as_array) {
                for v in list {
                    let s = v.as_str().ok_or_else(|| invalid(format!("ips: {v} is not a string")))?;
                    let ip = s.split('/').next().unwrap_or_default();
                    requested_ips.push(ip.parse().map_err(|_| invalid(format!("ips: {s:?} is not an address")))?);
                }
            }
            if let Some(m) = src.get("mac").and_then(Value::as_str) {
                mac = Some(parse_mac(m)?);
            }
        }

        let is_default_gateway = c.is_default_gateway.unwrap_or(false);
        Ok(Plan {
            version,
            network: c.name,
            bridge,
            is_gateway: is_gateway.unwrap_or(false) || is_default_gateway,
            is_default_gateway,
            force_address: c.force_address.unwrap_or(false),
            ip_masq: ip_masq.unwrap_or(false),
            mtu,
            hairpin: c.hairpin_mode.unwrap_or(false),
            promisc: c.promisc_mode.unwrap_or(false),
            vlan: c.vlan.filter(|v| *v != 0),
            ipam,
            dns: c.dns.unwrap_or_default(),
            run_dir: c.run_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR)),
            prev_result: c.prev_result,
            requested_ips,
            mac,
            flannel,
        })
    }

    /// Every subnet of the configured ranges (all the network's pods live in these).
    pub fn subnets(&self) -> Vec<IpNet> {
        match &self.ipam {
            Ipam::HostLocal { sets, .. } => sets.iter().flat_map(|s| s.0.iter().map(|r| r.subnet)).collect(),
            Ipam::Delegate { .. } => Vec::new(),
        }
    }

    pub fn data_dir(&self) -> Option<&Path> {
        match &self.ipam {
            Ipam::HostLocal { data_dir, .. } => Some(data_dir),
            Ipam::Delegate { .. } => None,
        }
    }
}

/// `aa:bb:cc:dd:ee:ff`, a unicast address.
pub fn parse_mac(s: &str) -> Result<[u8; 6], CniError> {
    let parts: Vec<&str> = s.split(':').collect();
    let bad = || invalid(format!("mac {s:?} is not a MAC address"));
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut out = [0u8; 6];
    for (o, p) in out.iter_mut().zip(parts) {
        *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if out[0] & 1 == 1 {
        return Err(invalid(format!("mac {s} is a multicast address")));
    }
    Ok(out)
}

/// The ranges and routes the flannel meta-plugin derives from subnet.env.
fn flannel_ranges(env: &SubnetEnv) -> (Vec<Vec<RangeSpec>>, Vec<RouteConf>) {
    let mut specs = Vec::new();
    let mut routes = Vec::new();
    for (subnet, network) in [(env.subnet, env.network), (env.ipv6_subnet, env.ipv6_network)] {
        if let (Some(s), Some(n)) = (subnet, network) {
            specs.push(vec![RangeSpec { subnet: s.trunc(), range_start: None, range_end: None, gateway: None }]);
            routes.push(RouteConf { dst: n.trunc(), gw: None });
        }
    }
    (specs, routes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(json: &str) -> Result<Plan, CniError> {
        Plan::from_stdin(json.as_bytes(), Need::Ranges)
    }

    #[test]
    fn reference_bridge_config_reads_the_same() {
        let p = plan(
            r#"{"cniVersion":"1.0.0","name":"mynet","type":"tartan","bridge":"br9","isDefaultGateway":true,
            "ipMasq":true,"hairpinMode":true,"mtu":1400,
            "ipam":{"type":"host-local","subnet":"10.10.0.0/24","routes":[{"dst":"0.0.0.0/0"}],"dataDir":"/tmp/x"}}"#,
        )
        .unwrap();
        assert_eq!(p.bridge, "br9");
        assert!(p.is_gateway && p.is_default_gateway && p.ip_masq && p.hairpin);
        assert_eq!(p.mtu, Some(1400));
        let Ipam::HostLocal { sets, data_dir, .. } = &p.ipam else { panic!() };
        assert_eq!(sets[0].0[0].gateway.to_string(), "10.10.0.1");
        assert_eq!(data_dir, Path::new("/tmp/x"));
    }

    #[test]
    fn error_codes_for_bad_configs() {
        assert_eq!(plan("{not json").unwrap_err().code, ErrorCode::DecodeFailure);
        assert_eq!(plan("[]").unwrap_err().code, ErrorCode::DecodeFailure);
        assert_eq!(plan(r#"{"cniVersion":"0.2.0","name":"n"}"#).unwrap_err().code, ErrorCode::IncompatibleVersion);
        assert_eq!(plan(r#"{"name":"n"}"#).unwrap_err().code, ErrorCode::IncompatibleVersion, "missing means 0.1.0");
        let bad_cidr = r#"{"cniVersion":"1.0.0","name":"n","ipam":{"type":"host-local","subnet":"10.0.0.300/24"}}"#;
        let e = plan(bad_cidr).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidConfig);
        assert!(e.msg.contains("subnet"), "{}", e.msg);
        let host_bits = r#"{"cniVersion":"1.0.0","name":"n","ipam":{"subnet":"10.0.0.5/24"}}"#;
        assert!(plan(host_bits).unwrap_err().msg.contains("host bits"));
        let both = r#"{"cniVersion":"1.0.0","name":"n","hairpinMode":true,"promiscMode":true,"ipam":{"subnet":"10.0.0.0/24"}}"#;
        assert_eq!(plan(both).unwrap_err().code, ErrorCode::InvalidConfig);
        let vlan = r#"{"cniVersion":"1.0.0","name":"n","vlan":5000,"ipam":{"subnet":"10.0.0.0/24"}}"#;
        assert_eq!(plan(vlan).unwrap_err().code, ErrorCode::InvalidConfig);
        let mtu = r#"{"cniVersion":"1.0.0","name":"n","mtu":"big","ipam":{"subnet":"10.0.0.0/24"}}"#;
        assert_eq!(plan(mtu).unwrap_err().code, ErrorCode::InvalidConfig);
        let slash = r#"{"cniVersion":"1.0.0","name":"../etc","ipam":{"subnet":"10.0.0.0/24"}}"#;
        assert_eq!(plan(slash).unwrap_err().code, ErrorCode::InvalidConfig);
    }

    #[test]
    fn flannel_mode_from_subnet_env() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("subnet.env");
        let conf = format!(
            r#"{{"cniVersion":"0.3.1","name":"cbr0","type":"flannel","subnetFile":"{}",
            "delegate":{{"hairpinMode":true,"isDefaultGateway":true}}}}"#,
            f.display()
        );
        let e = plan(&conf).unwrap_err();
        assert_eq!(e.code, ErrorCode::TryAgainLater);
        // DEL and GC still work without it.
        assert!(Plan::from_stdin(conf.as_bytes(), Need::OwnersOnly).is_ok());

        std::fs::write(
            &f,
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.72.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        let p = plan(&conf).unwrap();
        assert!(p.hairpin && p.is_default_gateway && p.is_gateway);
        assert!(!p.ip_masq, "FLANNEL_IPMASQ=true means the agent masquerades, not the plugin");
        assert_eq!(p.mtu, Some(1450));
        let Ipam::HostLocal { sets, routes, .. } = &p.ipam else { panic!() };
        assert_eq!(sets[0].0[0].subnet.to_string(), "10.244.72.0/24");
        assert_eq!(routes[0].dst.to_string(), "10.244.0.0/16");

        std::fs::write(&f, "FLANNEL_NETWORK=10.244.0.0/16\n").unwrap();
        assert_eq!(plan(&conf).unwrap_err().code, ErrorCode::InvalidConfig);
    }

    #[test]
    fn other_ipam_types_are_delegated() {
        let p = plan(r#"{"cniVersion":"1.0.0","name":"n","ipam":{"type":"static"}}"#).unwrap();
        assert!(matches!(p.ipam, Ipam::Delegate { ref plugin } if plugin == "static"));
    }
}
