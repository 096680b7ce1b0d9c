//! flanneld's flags, with the same names, defaults and FLANNELD_* variables, plus the few a test needs.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use clap::{ArgAction, Parser};

#[derive(Parser, Debug, Clone)]
#[command(name = "tartan-agent", version, about = "A drop-in for flanneld on etcd")]
pub struct Options {
    #[arg(long, env = "FLANNELD_ETCD_ENDPOINTS", default_value = "http://127.0.0.1:4001,http://127.0.0.1:2379")]
    pub etcd_endpoints: String,
    #[arg(long, env = "FLANNELD_ETCD_PREFIX", default_value = flannel::DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    #[arg(long, env = "FLANNELD_ETCD_CAFILE")]
    pub etcd_cafile: Option<PathBuf>,
    #[arg(long, env = "FLANNELD_ETCD_CERTFILE")]
    pub etcd_certfile: Option<PathBuf>,
    #[arg(long, env = "FLANNELD_ETCD_KEYFILE")]
    pub etcd_keyfile: Option<PathBuf>,
    /// Interface (name or address) to use for inter-node traffic; repeatable, the first usable wins.
    #[arg(long, env = "FLANNELD_IFACE", value_delimiter = ',')]
    pub iface: Vec<String>,
    /// Interface name regex; repeatable, after --iface.
    #[arg(long, env = "FLANNELD_IFACE_REGEX", value_delimiter = ',')]
    pub iface_regex: Vec<String>,
    /// The address other nodes reach this one at (default: the interface's).
    #[arg(long, env = "FLANNELD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,
    /// The IPv6 address other nodes reach this one at, with EnableIPv6 (default: the interface's global one).
    #[arg(long, env = "FLANNELD_PUBLIC_IPV6")]
    pub public_ipv6: Option<Ipv6Addr>,
    #[arg(long, env = "FLANNELD_SUBNET_FILE", default_value = flannel::DEFAULT_SUBNET_FILE)]
    pub subnet_file: PathBuf,
    /// A network config file (flannel's net-conf.json, as a DaemonSet mounts it from a ConfigMap): put at
    /// `<etcd-prefix>/config` when the store holds none. The store's copy stays in force once there (every node
    /// follows it; change it with etcdctl), and a file that differs from it is reported.
    #[arg(long, env = "FLANNELD_NET_CONFIG_PATH")]
    pub net_config_path: Option<PathBuf>,
    /// Remove what the agent put on this node (backend devices, host-gw routes, FLANNEL-* chains, subnet.env, the
    /// state directory's files) and exit; the lease stays in etcd until it expires.
    #[arg(long)]
    pub cleanup: bool,
    /// Install masquerade rules for traffic leaving the pod network.
    #[arg(long, env = "FLANNELD_IP_MASQ", action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          default_value = "false")]
    pub ip_masq: bool,
    /// Minutes before the lease expires to renew it (1-1439).
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=1439))]
    pub subnet_lease_renew_margin: u64,
    /// Seconds between resyncs of the iptables rules.
    #[arg(long, env = "FLANNELD_IPTABLES_RESYNC", default_value_t = 5)]
    pub iptables_resync: u64,
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0")]
    pub healthz_ip: String,
    /// 0 disables /healthz and /readyz.
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value_t = 0)]
    pub healthz_port: u16,

    // --- not in flanneld: the cluster store, where node-local state lives, and what tests shorten ---
    /// This node's name in the cluster store (flannel's NODE_NAME; default: the hostname).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// The cluster store's prefix in the same etcd (Nodes, Pods, Services...).
    #[arg(long, env = "TARTAN_STORE_PREFIX", default_value = store::DEFAULT_PREFIX)]
    pub store_prefix: String,
    /// Volatile node state: where the `tartan` plugin records the pods it wires (its runDir).
    #[arg(long, env = "TARTAN_RUN_DIR", default_value = "/run/tartan")]
    pub run_dir: PathBuf,
    /// Persistent state (the VtepMAC).
    #[arg(long, env = "TARTAN_STATE_DIR", default_value = "/var/lib/tartan")]
    pub state_dir: PathBuf,
    /// Lease TTL in seconds (flanneld: 24 h).
    #[arg(long, env = "TARTAN_LEASE_TTL", default_value_t = 86_400)]
    pub lease_ttl: u64,
    /// Seconds between full resyncs of routes, neighbours and FDB entries.
    #[arg(long, env = "TARTAN_ROUTE_RESYNC", default_value_t = 10)]
    pub route_resync: u64,
    /// Also write Docker's daemon options for this subnet here, each time subnet.env is written (what flannel's
    /// `mk-docker-opts.sh` writes to /run/docker_opts.env), for hosts running Docker on this network.
    #[arg(long, env = "TARTAN_DOCKER_OPTS_FILE")]
    pub docker_opts_file: Option<PathBuf>,
    /// Logging: flanneld's klog verbosity `-v N`, and `--logging-format text|json`.
    #[command(flatten)]
    pub log: telemetry::LogArgs,
}

/// flanneld's flags that tartan-agent does not take, and what to do instead.
const REFUSED: &[(&str, &str)] = &[
    ("kube-subnet-mgr", "tartan-agent keeps leases in etcd (--etcd-endpoints, --etcd-prefix), as flanneld does without it; nodes and pods are published to the cluster store in the same etcd"),
    ("kube-api-url", "tartan-agent does not talk to a Kubernetes API server: give it --etcd-endpoints"),
    ("kubeconfig-file", "tartan-agent does not talk to a Kubernetes API server: give it --etcd-endpoints (and --etcd-cafile/--etcd-certfile/--etcd-keyfile)"),
    ("kube-annotation-prefix", "tartan-agent keeps leases in etcd, not in Node annotations"),
    ("etcd-username", "etcd password authentication is not supported: use client certificates (--etcd-certfile, --etcd-keyfile)"),
    ("etcd-password", "etcd password authentication is not supported: use client certificates (--etcd-certfile, --etcd-keyfile)"),
    ("iface-can-reach", "choose the interface with --iface (a name or an address) or --iface-regex"),
    ("iptables-forward-rules", "the FLANNEL-FWD accept rules are always installed"),
    ("charon-executable-path", "the ipsec backend is not supported (vxlan, host-gw, udp are)"),
    ("charon-viciuri", "the ipsec backend is not supported (vxlan, host-gw, udp are)"),
    ("set-node-network-unavailable", "tartan-agent does not write Node conditions to a Kubernetes API server"),
];

/// The message for the first flanneld flag (or FLANNELD_* variable) in `args`/`env` that tartan-agent does not take.
/// Said plainly, rather than as a bare "unknown flag" or, worse, silently accepted.
pub fn refused(args: &[String], env: impl Fn(&str) -> Option<String>) -> Option<String> {
    for a in args.iter().skip(1) {
        let Some(name) = a.strip_prefix("--") else { continue };
        let name = name.split('=').next().unwrap_or(name);
        if let Some((flag, why)) = REFUSED.iter().find(|(f, _)| *f == name) {
            return Some(format!("--{flag} (a flanneld flag) is not supported: {why}"));
        }
    }
    for (flag, why) in REFUSED {
        let var = format!("FLANNELD_{}", flag.to_ascii_uppercase().replace('-', "_"));
        if env(&var).is_some_and(|v| !v.is_empty() && v != "false") {
            return Some(format!("{var} (a flanneld setting) is not supported: {why}"));
        }
    }
    None
}

/// flanneld is a Go program: its users write `-etcd-endpoints=...` as often as `--etcd-endpoints=...`.
pub fn normalize_args(args: impl Iterator<Item = String>) -> Vec<String> {
    args.enumerate()
        .map(
            |(i, a)| {
                if i > 0 && a.starts_with('-') && !a.starts_with("--") && a.len() > 2 {
                    format!("-{a}")
                } else {
                    a
                }
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flanneld_only_flags_are_refused_with_what_to_do_instead() {
        let argv = |a: &[&str]| normalize_args(a.iter().map(|s| s.to_string()));
        let none = |_: &str| None;
        let msg = refused(&argv(&["tartan-agent", "-kube-subnet-mgr", "--ip-masq"]), none).unwrap();
        assert!(
            msg.starts_with("--kube-subnet-mgr (a flanneld flag) is not supported: ") && msg.contains("etcd"),
            "{msg}"
        );
        assert!(refused(&argv(&["x", "--kube-api-url=https://k"]), none).unwrap().contains("--etcd-endpoints"));
        assert!(refused(&argv(&["x", "--iface", "eth0", "--ip-masq"]), none).is_none());
        let env = |k: &str| (k == "FLANNELD_KUBE_SUBNET_MGR").then(|| "true".to_string());
        assert!(refused(&argv(&["x"]), env).unwrap().starts_with("FLANNELD_KUBE_SUBNET_MGR"));
    }

    #[test]
    fn flanneld_command_lines_parse() {
        let argv = normalize_args(
            ["tartan-agent", "-etcd-endpoints=http://198.18.0.100:2379", "--ip-masq", "-iface=eth0", "--iface", "eth1"]
                .into_iter()
                .map(String::from),
        );
        let o = Options::try_parse_from(argv).unwrap();
        assert_eq!(o.etcd_endpoints, "http://198.18.0.100:2379");
        assert!(o.ip_masq);
        assert_eq!(o.iface, vec!["eth0", "eth1"]);
        assert_eq!(o.subnet_lease_renew_margin, 60);
        assert!(Options::try_parse_from(["x", "--subnet-lease-renew-margin", "1440"]).is_err());
        let o = Options::try_parse_from(["x", "--ip-masq=false"]).unwrap();
        assert!(!o.ip_masq);
    }
}
