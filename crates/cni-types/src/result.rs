use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{CniError, ErrorCode, Version};

/// A success result in its 1.x form. [`CniResult::to_json`] shapes it for the version the config asked for;
/// [`CniResult::from_value`] reads any supported version's shape (a prevResult).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    pub dns: Dns,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// The address with its prefix length, e.g. `10.244.1.2/24`.
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, rename = "advmss", skip_serializing_if = "Option::is_none")]
    pub adv_mss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u8>,
}

impl Route {
    pub fn new(dst: IpNet, gw: Option<IpAddr>) -> Route {
        Route { dst, gw, mtu: None, adv_mss: None, priority: None, table: None, scope: None }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty() && self.domain.is_none() && self.search.is_empty() && self.options.is_empty()
    }
}

impl CniResult {
    /// Reads a result of any supported version (older ones carry `ips[].version`, which is implied by the address).
    pub fn from_value(v: &serde_json::Value) -> Result<CniResult, CniError> {
        CniResult::deserialize(v)
            .map_err(|e| CniError::new(ErrorCode::DecodeFailure, "prevResult is not a CNI result", e.to_string()))
    }

    /// The document to print for a config of `version`.
    pub fn to_value(&self, version: Version) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("results always serialize");
        let obj = v.as_object_mut().expect("a result is an object");
        if version.ips_carry_version() {
            if let Some(ips) = obj.get_mut("ips").and_then(|i| i.as_array_mut()) {
                for ip in ips {
                    let family = match ip["address"].as_str().and_then(|a| a.parse::<IpNet>().ok()) {
                        Some(IpNet::V6(_)) => "6",
                        _ => "4",
                    };
                    ip.as_object_mut().expect("ip entries are objects").insert("version".into(), family.into());
                }
            }
        }
        if !version.is_1_1() {
            // Route attributes beyond dst/gw arrived with 1.1.0; older readers may reject them.
            if let Some(routes) = obj.get_mut("routes").and_then(|r| r.as_array_mut()) {
                for r in routes {
                    r.as_object_mut().expect("routes are objects").retain(|k, _| k == "dst" || k == "gw");
                }
            }
        }
        obj.insert("cniVersion".into(), version.as_str().into());
        v
    }

    pub fn to_json(&self, version: Version) -> String {
        self.to_value(version).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface { name: "cni0".into(), mac: Some("aa:bb:cc:dd:ee:ff".into()), ..Default::default() },
                Interface {
                    name: "eth0".into(),
                    mac: Some("aa:bb:cc:dd:ee:00".into()),
                    mtu: Some(1450),
                    sandbox: Some("/var/run/netns/x".into()),
                },
            ],
            ips: vec![
                IpConfig {
                    address: "10.244.1.5/24".parse().unwrap(),
                    gateway: Some("10.244.1.1".parse().unwrap()),
                    interface: Some(1),
                },
                IpConfig { address: "fd00:1::5/64".parse().unwrap(), gateway: None, interface: Some(1) },
            ],
            routes: vec![Route { priority: Some(10), ..Route::new("0.0.0.0/0".parse().unwrap(), None) }],
            dns: Dns::default(),
        }
    }

    #[test]
    fn shapes_per_version() {
        let r = sample();
        let old = r.to_value(Version::V0_3_1);
        assert_eq!(old["cniVersion"], "0.3.1");
        assert_eq!(old["ips"][0]["version"], "4");
        assert_eq!(old["ips"][1]["version"], "6");
        assert_eq!(old["ips"][0]["address"], "10.244.1.5/24");
        assert!(old["routes"][0].get("priority").is_none());
        let new = r.to_value(Version::V1_1_0);
        assert!(new["ips"][0].get("version").is_none());
        assert_eq!(new["routes"][0]["priority"], 10);
        assert!(new.get("dns").is_none());
    }

    #[test]
    fn reads_back_every_shape() {
        let r = sample();
        for v in crate::SUPPORTED_VERSIONS {
            let back = CniResult::from_value(&r.to_value(v)).unwrap();
            assert_eq!(back.ips, r.ips);
            assert_eq!(back.interfaces, r.interfaces);
        }
    }

    #[test]
    fn garbage_prev_result_is_a_decode_failure() {
        let e = CniResult::from_value(&serde_json::json!({"ips": [{"address": "nope"}]})).unwrap_err();
        assert_eq!(e.code, ErrorCode::DecodeFailure);
    }
}
