//! `tartan-proxy`: the kube-proxy replacement. It follows the cluster store through the [`store::Informer`], keeps
//! the dataplane-neutral [`proxy_state::State`] up to date with the change tracker, and hands it to a
//! [`proxy_state::Dataplane`]: iptables now, eBPF next, behind the same trait and the same tests.

pub mod cli;
pub mod daemon;
pub mod ebpf;
pub mod health_check;
pub mod iptables;
pub mod metrics;

use ipnet::IpNet;
use proxy_state::Dataplane;

/// What any dataplane needs to know about the node beyond the store.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// The pod network, a range per family: traffic to a cluster IP from outside it is masqueraded.
    pub cluster_cidrs: Vec<IpNet>,
    /// Node ports answer only on this node's addresses within these (empty: all).
    pub nodeport_addresses: Vec<IpNet>,
    /// eBPF: the node's cgroup, the pin directory, the CNI plugin's run directory.
    pub ebpf: ebpf::EbpfOptions,
}

/// The dataplanes `--mode` can name.
pub const MODES: [&str; 2] = ["iptables", "ebpf"];

/// The dataplane named `mode`.
pub fn dataplane(mode: &str, opts: &NodeOptions) -> Result<Box<dyn Dataplane>, String> {
    match mode {
        "iptables" => {
            Ok(Box::new(iptables::IptablesDataplane::new(opts.cluster_cidrs.clone(), opts.nodeport_addresses.clone())))
        }
        "ebpf" => {
            let ipt = iptables::IptablesDataplane::new(opts.cluster_cidrs.clone(), opts.nodeport_addresses.clone());
            let ebpf = ebpf::EbpfOptions { cluster_cidrs: opts.cluster_cidrs.clone(), ..opts.ebpf.clone() };
            Ok(Box::new(ebpf::EbpfDataplane::new(ipt, ebpf, opts.nodeport_addresses.clone())))
        }
        m => Err(format!("--mode {m:?}: unknown dataplane (one of: {})", MODES.join(", "))),
    }
}
