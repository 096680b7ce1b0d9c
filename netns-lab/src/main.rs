//! `netns-lab`: build the lab by hand (up / pod add / pod del / exec / down / sweep), or run the demo.

mod demo;

use std::os::unix::process::CommandExt;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use netns_lab::Lab;

#[derive(Parser)]
#[command(name = "netns-lab", about = "Clusters made of network namespaces, for Tartan's tests and demos")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build a lab that stays until `down`: nodes on an underlay, each wired for pods by `tartan`.
    Up {
        #[arg(long, default_value = "lab")]
        name: String,
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        /// Run etcd and a tartan-agent per node with this backend (vxlan, host-gw, vxlan-direct, udp); without it,
        /// each node gets a fixed pod subnet and no agent.
        #[arg(long)]
        backend: Option<String>,
        /// With --backend: put the nodes on two L2 segments joined by a router.
        #[arg(long, default_value_t = 1)]
        segments: usize,
        /// With --backend vxlan, vxlan-direct or host-gw: dual stack (pods get an IPv6 address too).
        #[arg(long)]
        ipv6: bool,
        /// Run each node's Tartan from this image archive (scripts/build-image.sh), as the DaemonSet in deploy/
        /// would: its pod template run with podman in the node's namespace (vxlan unless --backend says).
        #[arg(long)]
        image: Option<std::path::PathBuf>,
        /// With --image: tartan-proxy's dataplane (the ConfigMap's proxy-mode).
        #[arg(long, default_value = "iptables")]
        mode: String,
    },
    /// Pods: created and deleted through the CNI plugin, as kubelet does.
    Pod {
        #[command(subcommand)]
        cmd: PodCmd,
    },
    /// Run a command inside a node, pod or other namespace of the lab.
    Exec {
        #[arg(long, default_value = "lab")]
        name: String,
        target: String,
        #[arg(trailing_var_arg = true, required = true)]
        argv: Vec<String>,
    },
    /// Show the lab: nodes, pods, namespaces.
    Show {
        #[arg(long, default_value = "lab")]
        name: String,
    },
    /// Remove a lab made with `up`.
    Down {
        #[arg(long, default_value = "lab")]
        name: String,
    },
    /// Remove what dead runs left behind (with --all, persistent labs too).
    Sweep {
        #[arg(long)]
        all: bool,
    },
    /// A one-node lab with three pods: addresses, a ping matrix, traffic out of the node and a capture of it.
    Demo,
    /// The NetworkPolicy conformance topology (namespaces x, y, z; pods a, b, c; TCP and UDP on 80 and 81) in a
    /// throwaway cluster with tartan-proxy: applies the given policies and prints the reachability matrix.
    Reachability {
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        #[arg(long, default_value = "vxlan")]
        backend: String,
        /// The proxies' dataplane (tartan-proxy --mode).
        #[arg(long, default_value = "ebpf")]
        mode: String,
        /// Manifests (NetworkPolicies, label changes) applied after the open matrix is shown.
        #[arg(short = 'f', long = "filename")]
        files: Vec<std::path::PathBuf>,
    },
    /// Inside a pod: accept TCP connections and echo UDP datagrams on the given ports (the topology's servers).
    #[command(hide = true)]
    Serve {
        #[arg(long, value_delimiter = ',')]
        tcp: Vec<u16>,
        #[arg(long, value_delimiter = ',')]
        udp: Vec<u16>,
    },
}

#[derive(Subcommand)]
enum PodCmd {
    Add {
        #[arg(long, default_value = "lab")]
        name: String,
        node: String,
        pod: String,
        #[arg(long, default_value = "default")]
        namespace: String,
    },
    Del {
        #[arg(long, default_value = "lab")]
        name: String,
        pod: String,
    },
}

fn main() -> Result<()> {
    // Tools: their output is what they print; a log only when TARTAN_LOG or RUST_LOG asks, warnings otherwise.
    telemetry::init_from_env(Some("warn"))?;
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Up { name, nodes, backend, segments, ipv6, image, mode } => {
            if nodes == 0 {
                bail!("--nodes must be at least 1");
            }
            if !(1..=2).contains(&segments) {
                bail!("--segments must be 1 or 2");
            }
            let backend = backend.as_deref().map(netns_lab::cluster::Backend::parse).transpose()?;
            let mut lab = Lab::persistent(&name)?;
            let built = match (image, backend) {
                (Some(archive), b) => {
                    let b = b.unwrap_or(netns_lab::cluster::Backend::Vxlan);
                    let config = if ipv6 { b.dual_stack_config() } else { b.network_config() };
                    let archive = std::path::absolute(&archive)?;
                    lab.build_image_cluster(nodes, &archive, &config, &mode).map(|c| {
                        println!("image {} running on every node (podman; logs in each node's directory)", c.image)
                    })
                }
                (None, backend) => match backend {
                    Some(b) if ipv6 => lab.build_cluster_with(nodes, &b.dual_stack_config(), segments),
                    Some(b) => lab.build_cluster(nodes, b, segments),
                    None => lab.build_static(nodes),
                },
            };
            if let Err(e) = built {
                lab.teardown();
                return Err(e);
            }
            for n in &lab.state.nodes {
                println!("node {} ns={} underlay={}", n.name, n.ns, n.underlay_ip);
            }
            println!("lab {name} is up; `netns-lab pod add --name {name} n1 a` adds a pod");
        }
        Cmd::Pod { cmd: PodCmd::Add { name, node, pod, namespace } } => {
            let mut lab = Lab::open(&name)?;
            let r = lab.add_pod(&node, &pod, &namespace)?;
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
        Cmd::Pod { cmd: PodCmd::Del { name, pod } } => {
            let mut lab = Lab::open(&name)?;
            lab.del_pod(&pod)?;
            println!("pod {pod} deleted");
        }
        Cmd::Exec { name, target, argv } => {
            let lab = Lab::open(&name)?;
            let ns = lab.target_ns(&target)?;
            let err = lab.cmd(&ns, &argv[0])?.args(&argv[1..]).exec();
            bail!("exec {}: {err}", argv[0]);
        }
        Cmd::Show { name } => {
            let lab = Lab::open(&name)?;
            println!("{}", serde_json::to_string_pretty(&lab.state)?);
        }
        Cmd::Down { name } => {
            let mut lab = Lab::open(&name)?;
            lab.teardown();
            println!("lab {name} removed");
        }
        Cmd::Sweep { all } => {
            for r in netns_lab::sweep(all)? {
                println!("removed {r}");
            }
        }
        Cmd::Demo => demo::run()?,
        Cmd::Reachability { nodes, backend, mode, files } => reachability(nodes, &backend, &mode, &files)?,
        Cmd::Serve { tcp, udp } => netns_lab::reachability::serve(&tcp, &udp)?,
    }
    Ok(())
}

fn reachability(nodes: usize, backend: &str, mode: &str, files: &[std::path::PathBuf]) -> Result<()> {
    use netns_lab::reachability::{Matrix, Topology};
    let backend = netns_lab::cluster::Backend::parse(backend)?;
    let mut lab = Lab::new("reach")?;
    lab.build_cluster(nodes.max(1), backend, 1)?;
    let names: Vec<String> = (1..=nodes.max(1)).map(|i| format!("n{i}")).collect();
    for n in &names {
        lab.start_proxy(n, &["--mode", mode])?;
    }
    println!("tartan-proxy --mode {mode} on every node");
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let topo = Topology::build(&mut lab, &names)?;
    for p in &topo.pods {
        println!("{:<4} {:<15} on {}", p.id, p.ip, p.node);
    }
    println!("\nno policies:\n{}", topo.probe(std::time::Duration::from_secs(1)).table());
    if files.is_empty() {
        return Ok(());
    }
    for f in files {
        let path = f.to_str().unwrap_or_default();
        let out = lab.tartanctl(&["apply", "-f", "-"], Some(&std::fs::read_to_string(f)?))?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            bail!("{path}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    std::thread::sleep(std::time::Duration::from_secs(1));
    let m: Matrix = topo.probe(std::time::Duration::from_secs(1));
    println!("\nwith the policies:\n{}", m.table());
    Ok(())
}
