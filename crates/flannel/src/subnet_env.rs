//! /run/flannel/subnet.env: what the node agent publishes once the node has its subnet and its routes and rules
//! are in place; the CNI plugin reads it.

use std::fmt;
use std::path::Path;

use ipnet::IpNet;

/// What the agent published about this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    pub network: Option<IpNet>,
    /// The node subnet with the first usable address, e.g. `10.244.72.1/24`.
    pub subnet: Option<IpNet>,
    pub ipv6_network: Option<IpNet>,
    pub ipv6_subnet: Option<IpNet>,
    pub mtu: Option<u32>,
    pub ipmasq: Option<bool>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubnetEnvError {
    #[error("{0}")]
    Missing(String),
    #[error("{file}: {msg}")]
    Invalid { file: String, msg: String },
}

impl SubnetEnv {
    /// Docker's daemon options for a host running Docker on this network, in the format of flannel's
    /// `mk-docker-opts.sh` (its default: each option as its own variable, then all of them in `DOCKER_OPTS`):
    /// the bridge address and MTU from the subnet, Docker's own masquerade off when flannel's is on (and on when
    /// it is off), and IPv6 with the node's IPv6 subnet on a dual-stack network.
    pub fn docker_opts(&self) -> String {
        let mut opts: Vec<(&str, String)> = Vec::new();
        if let Some(s) = self.subnet {
            opts.push(("DOCKER_OPT_BIP", format!("--bip={s}")));
        }
        if let Some(m) = self.ipmasq {
            opts.push(("DOCKER_OPT_IPMASQ", format!("--ip-masq={}", !m)));
        }
        if let Some(m) = self.mtu {
            opts.push(("DOCKER_OPT_MTU", format!("--mtu={m}")));
        }
        if let Some(s6) = self.ipv6_subnet {
            opts.push(("DOCKER_OPT_IPV6", format!("--ipv6 --fixed-cidr-v6={s6}")));
        }
        let mut out = String::new();
        for (k, v) in &opts {
            out += &format!("{k}=\"{v}\"\n");
        }
        let combined: String = opts.iter().map(|(_, v)| format!(" {v}")).collect();
        out += &format!("DOCKER_OPTS=\"{combined}\"\n");
        out
    }

    pub fn load(path: &Path) -> Result<SubnetEnv, SubnetEnvError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            SubnetEnvError::Missing(format!(
                "{}: {e}; the node agent (tartan-agent or flanneld) writes it once the node has its subnet",
                path.display()
            ))
        })?;
        SubnetEnv::parse(&text).map_err(|msg| SubnetEnvError::Invalid { file: path.display().to_string(), msg })
    }

    pub fn parse(text: &str) -> Result<SubnetEnv, String> {
        let mut env =
            SubnetEnv { network: None, subnet: None, ipv6_network: None, ipv6_subnet: None, mtu: None, ipmasq: None };
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line.split_once('=').ok_or_else(|| format!("line {}: expected KEY=VALUE", n + 1))?;
            let v = v.trim().trim_matches('"');
            let net = |v: &str| v.parse::<IpNet>().map_err(|e| format!("{k}={v:?}: {e}"));
            match k.trim() {
                "FLANNEL_NETWORK" => env.network = Some(net(v)?),
                "FLANNEL_SUBNET" => env.subnet = Some(net(v)?),
                "FLANNEL_IPV6_NETWORK" => env.ipv6_network = Some(net(v)?),
                "FLANNEL_IPV6_SUBNET" => env.ipv6_subnet = Some(net(v)?),
                "FLANNEL_MTU" => env.mtu = Some(v.parse().map_err(|e| format!("FLANNEL_MTU={v:?}: {e}"))?),
                "FLANNEL_IPMASQ" => env.ipmasq = Some(v.parse().map_err(|e| format!("FLANNEL_IPMASQ={v:?}: {e}"))?),
                _ => {}
            }
        }
        // The flannel meta-plugin's rule: these four must be present (IPv6-only nodes carry the IPv6 pair instead).
        if env.subnet.is_none() && env.ipv6_subnet.is_none() {
            return Err("FLANNEL_SUBNET (or FLANNEL_IPV6_SUBNET) is missing".into());
        }
        if env.subnet.is_some() && env.network.is_none() {
            return Err("FLANNEL_NETWORK is missing".into());
        }
        if env.ipv6_subnet.is_some() && env.ipv6_network.is_none() {
            return Err("FLANNEL_IPV6_NETWORK is missing".into());
        }
        if env.mtu.is_none() {
            return Err("FLANNEL_MTU is missing".into());
        }
        if env.ipmasq.is_none() {
            return Err("FLANNEL_IPMASQ is missing".into());
        }
        Ok(env)
    }
}

/// flanneld's layout, line for line.
impl fmt::Display for SubnetEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(n) = self.network {
            writeln!(f, "FLANNEL_NETWORK={n}")?;
        }
        if let Some(s) = self.subnet {
            writeln!(f, "FLANNEL_SUBNET={s}")?;
        }
        if let Some(n) = self.ipv6_network {
            writeln!(f, "FLANNEL_IPV6_NETWORK={n}")?;
        }
        if let Some(s) = self.ipv6_subnet {
            writeln!(f, "FLANNEL_IPV6_SUBNET={s}")?;
        }
        if let Some(m) = self.mtu {
            writeln!(f, "FLANNEL_MTU={m}")?;
        }
        if let Some(m) = self.ipmasq {
            writeln!(f, "FLANNEL_IPMASQ={m}")?;
        }
        Ok(())
    }
}

impl SubnetEnv {
    /// Writes the file atomically (a temporary file in the same directory, then rename), so a reader never sees
    /// half of it.
    pub fn write_atomic(&self, path: &Path) -> std::io::Result<()> {
        atomic_file::write(path, self.to_string().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flanneld_output() {
        let e = SubnetEnv::parse(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.72.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        assert_eq!(e.subnet.unwrap().to_string(), "10.244.72.1/24");
        assert_eq!(e.mtu, Some(1450));
        assert_eq!(e.ipmasq, Some(true));
        assert_eq!(
            e.to_string(),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.72.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
    }

    #[test]
    fn names_what_is_wrong() {
        assert!(SubnetEnv::parse("FLANNEL_NETWORK=10.244.0.0/16\n").unwrap_err().contains("FLANNEL_SUBNET"));
        assert!(SubnetEnv::parse("FLANNEL_SUBNET=10.244.72.1/24\nFLANNEL_NETWORK=x\n")
            .unwrap_err()
            .contains("FLANNEL_NETWORK"));
        let no_mtu = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.72.1/24\nFLANNEL_IPMASQ=true\n";
        assert!(SubnetEnv::parse(no_mtu).unwrap_err().contains("FLANNEL_MTU"));
        assert!(SubnetEnv::parse("garbage").is_err());
    }

    #[test]
    fn docker_opts_as_mk_docker_opts_writes_them() {
        let env = SubnetEnv::parse(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.72.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        assert_eq!(
            env.docker_opts(),
            "DOCKER_OPT_BIP=\"--bip=10.244.72.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=false\"\nDOCKER_OPT_MTU=\"--mtu=1450\"\nDOCKER_OPTS=\" --bip=10.244.72.1/24 --ip-masq=false --mtu=1450\"\n"
        );
    }
}
