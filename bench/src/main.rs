//! `tartan-bench`: measurements of Tartan against the reference, in the same run, reported as ratios.

mod agent;
mod cni;
mod nodeport;
mod policy;
mod programming;
mod proxy;
mod stats;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tartan-bench")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// CNI ADD/DEL latency: `tartan` against the reference bridge + host-local from /usr/lib/cni.
    Cni {
        /// Sequential ADDs (then DELs) per case.
        #[arg(long, default_value_t = 100)]
        runs: usize,
        /// Repetitions of each parallel batch.
        #[arg(long, default_value_t = 5)]
        batches: usize,
    },
    /// Pod-to-pod TCP throughput (same node, vxlan, host-gw) against a raw veth pair.
    Throughput {
        #[arg(long, default_value_t = 5)]
        secs: u32,
        /// Interleaved rounds; each path is measured once per round.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// tartan-proxy at scale: sync times, rule count and connect latency for N services.
    Proxy {
        /// The dataplane (tartan-proxy's --mode).
        #[arg(long, default_value = "iptables")]
        mode: String,
        /// Service counts, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "10,1000,10000")]
        services: Vec<usize>,
        #[arg(long, default_value_t = 5)]
        endpoints: usize,
        /// New connections measured per size.
        #[arg(long, default_value_t = 1000)]
        connects: usize,
    },
    /// Node ports from outside the cluster: throughput and connect latency per dataplane, against the pod directly.
    Nodeport {
        /// The dataplanes, comma-separated (one lab cluster each, measured in interleaved rounds).
        #[arg(long, value_delimiter = ',', default_value = "iptables,ebpf")]
        mode: Vec<String>,
        /// Other services programmed first (cluster IPs with one endpoint each).
        #[arg(long, default_value_t = 1000)]
        services: usize,
        #[arg(long, default_value_t = 5)]
        secs: u32,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// New connections measured per path, over all rounds.
        #[arg(long, default_value_t = 1500)]
        connects: usize,
    },
    /// tartan-proxy NetworkPolicy at scale: sync times, rules, ipsets and connect latency for N policies.
    Policy {
        /// The dataplanes (tartan-proxy's --mode), comma-separated, measured in turn in the same run.
        #[arg(long, value_delimiter = ',', default_value = "iptables,ebpf")]
        mode: Vec<String>,
        /// Policy counts, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "0,100,1000")]
        policies: Vec<usize>,
        #[arg(long, default_value_t = 1000)]
        connects: usize,
    },
    /// tartan-proxy end to end: a new Service's store write until its cluster IP answers, with N services programmed.
    Programming {
        /// The dataplane (tartan-proxy's --mode).
        #[arg(long, default_value = "iptables")]
        mode: String,
        /// Service counts, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "10,1000,10000")]
        services: Vec<usize>,
        /// New services measured per size.
        #[arg(long, default_value_t = 10)]
        probes: usize,
    },
    /// Agent convergence: start-up with N leases in etcd, and new lease to route latency.
    Convergence {
        #[arg(long, default_value_t = 1000)]
        leases: u32,
        #[arg(long, default_value_t = 100)]
        new: u32,
    },
}

fn main() -> Result<()> {
    // Tools: their output is what they print; a log only when TARTAN_LOG or RUST_LOG asks, warnings otherwise.
    telemetry::init_from_env(Some("warn"))?;
    match Cli::parse().cmd {
        Cmd::Cni { runs, batches } => cni::run(runs, batches),
        Cmd::Throughput { secs, rounds } => agent::throughput(secs, rounds),
        Cmd::Convergence { leases, new } => agent::convergence(leases, new),
        Cmd::Proxy { mode, services, endpoints, connects } => {
            // One table per dataplane, each with its own no-proxy floor measured in the same run.
            for m in mode.split(',') {
                proxy::run(m, &services, endpoints, connects)?;
            }
            Ok(())
        }
        Cmd::Nodeport { mode, services, secs, rounds, connects } => {
            nodeport::run(&mode, services, secs, rounds, connects)
        }
        Cmd::Policy { mode, policies, connects } => policy::run(&mode, &policies, connects),
        Cmd::Programming { mode, services, probes } => programming::run(&mode, &services, probes),
    }
}
