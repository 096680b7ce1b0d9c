//! `tartan-proxy`'s command line: flags, then the daemon (or `--cleanup`). In the library so that the image's
//! multi-call binary runs the same command.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::{daemon, metrics, NodeOptions};
use anyhow::{bail, Context, Result};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "tartan-proxy", version, about = "Services from Tartan's cluster store, programmed into the kernel")]
struct Options {
    #[arg(long, env = "TARTAN_ETCD_ENDPOINTS", default_value = "http://127.0.0.1:2379")]
    etcd_endpoints: String,
    #[arg(long, env = "TARTAN_ETCD_CAFILE")]
    etcd_cafile: Option<std::path::PathBuf>,
    #[arg(long, env = "TARTAN_ETCD_CERTFILE")]
    etcd_certfile: Option<std::path::PathBuf>,
    #[arg(long, env = "TARTAN_ETCD_KEYFILE")]
    etcd_keyfile: Option<std::path::PathBuf>,
    #[arg(long, env = "TARTAN_STORE_PREFIX", default_value = store::DEFAULT_PREFIX)]
    store_prefix: String,
    /// This node's name in the store (endpoints on it are "local").
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// The dataplane: iptables, or ebpf (socket load balancing; see the README).
    #[arg(long, default_value = "iptables")]
    mode: String,
    /// ebpf: the cgroup v2 directory holding every process of the node (its daemons, host processes and pods).
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroup_root: std::path::PathBuf,
    /// ebpf: where maps and program links are pinned (on a bpffs), so that they outlive a restart.
    #[arg(long, default_value = "/sys/fs/bpf/tartan")]
    bpf_root: std::path::PathBuf,
    /// ebpf: flows from outside the node tracked at once (each of the conntrack and NAT maps holds this many; the
    /// least recently used flow goes first when full).
    #[arg(long, default_value_t = ebpf_maps::CONNTRACK_MAX, value_parser = clap::value_parser!(u32).range(1024..=1 << 24))]
    conntrack_max: u32,
    /// ebpf: hand pod traffic that policy let through straight to the destination pod or the device towards
    /// another node (bpf_redirect_peer / bpf_redirect_neigh), skipping the bridge and the host's netfilter
    /// (`--pod-fast-path=false`: through the bridge, as with iptables; policy is enforced either way).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pod_fast_path: bool,
    /// The pod network, a range per family (comma-separated): traffic to a cluster IP from outside it is
    /// masqueraded.
    #[arg(long, value_delimiter = ',')]
    cluster_cidr: Vec<ipnet::IpNet>,
    /// Node ports answer only on this node's addresses within these CIDRs (comma-separated; default: all).
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Vec<ipnet::IpNet>,
    /// Where metrics are served (0 port disables).
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_bind_address: SocketAddr,
    /// Seconds between full syncs.
    #[arg(long, default_value_t = 30)]
    sync_period: u64,
    /// Milliseconds between two syncs at most: changes in between are coalesced.
    #[arg(long, default_value_t = 100)]
    min_sync_period: u64,
    /// Where the CNI plugin records this node's pods (`runDir` in its config).
    #[arg(long, default_value = "/run/tartan")]
    run_dir: std::path::PathBuf,
    /// Remove every rule this proxy owns, and exit.
    #[arg(long)]
    cleanup: bool,
    #[command(flatten)]
    log: telemetry::LogArgs,
}

/// The whole `tartan-proxy` command: `args` as the process got them (program name first); the exit code (an error
/// is printed as a `main` returning it would).
pub fn main(args: impl Iterator<Item = String>) -> i32 {
    match run(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("Error: {e:?}");
            1
        }
    }
}

fn run(args: impl Iterator<Item = String>) -> Result<()> {
    let o = Options::parse_from(args);
    telemetry::init_logging(&o.log)?;
    let opts = NodeOptions {
        cluster_cidrs: o.cluster_cidr.clone(),
        nodeport_addresses: o.nodeport_addresses.clone(),
        ebpf: crate::ebpf::EbpfOptions {
            cgroup_root: o.cgroup_root.clone(),
            bpf_root: o.bpf_root.clone(),
            run_dir: o.run_dir.clone(),
            conntrack_max: o.conntrack_max,
            pod_fast_path: o.pod_fast_path,
            ..Default::default()
        },
    };
    let mut dp = match crate::dataplane(&o.mode, &opts) {
        Ok(dp) => dp,
        Err(e) => bail!(e),
    };
    if o.cleanup {
        dp.cleanup()?;
        tracing::info!(mode = dp.mode(), "removed all rules");
        return Ok(());
    }
    // NodePorts and external IPs forward to pods on other nodes: this node must route (kube-proxy expects the
    // node to be set up so; a node without pods yet may not be).
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enabling net.ipv4.ip_forward")?;
    let tls = store::Tls::from_files(o.etcd_cafile.as_deref(), o.etcd_certfile.as_deref(), o.etcd_keyfile.as_deref())?;
    let node = match o.node_name {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname").context("hostname")?.trim().to_string(),
    };
    let settings = daemon::Settings {
        endpoints: o.etcd_endpoints,
        prefix: o.store_prefix,
        tls,
        node,
        run_dir: o.run_dir.clone(),
        min_sync: Duration::from_millis(o.min_sync_period),
        full_sync: Duration::from_secs(o.sync_period.max(1)),
    };
    // /healthz fails when changes wait longer than this for a successful sync (kube-proxy: twice the sync period).
    let health_bound = Duration::from_secs(2 * o.sync_period.max(1));
    let m: metrics::Shared = Arc::new(metrics::Metrics::new(dp.mode(), health_bound));
    tracing::info!(mode = dp.mode(), node = %settings.node, metrics = %o.metrics_bind_address, "starting");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        if o.metrics_bind_address.port() != 0 {
            let addr = o.metrics_bind_address;
            // Bound before anything else, so that a taken port stops the start with a clear error.
            let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("metrics on {addr}"))?;
            let endpoints = m.clone();
            tokio::spawn(async move {
                if let Err(e) = telemetry::http::serve_on(listener, endpoints).await {
                    tracing::error!(%addr, error = %e, "metrics server stopped");
                }
            });
        }
        tokio::select! {
            r = daemon::run(settings, dp, m) => r,
            _ = tokio::signal::ctrl_c() => Ok(()),
            _ = sigterm() => Ok(()),
        }
    })
}

async fn sigterm() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
