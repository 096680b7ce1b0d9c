//! tartan-proxy's iptables dataplane at scale: with N services x E endpoints programmed in a node, the full sync
//! time, the one-service-change (partial) sync time, the rule count, and the TCP connect latency from a pod to
//! one real service (a new connection each time), against connecting to the pod directly with no proxy rules at
//! all (the floor). The measured service sorts last, so every new connection walks the whole services chain, as
//! kube-proxy's iptables mode makes it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use std::sync::Arc;

use anyhow::{Context, Result};
use netns_lab::Lab;
use proxy_state::{Endpoint, ServicePort, State};
use tartan_proxy::NodeOptions;

use crate::stats::{ms, percentile};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 255, 254);

fn synthetic(n: usize, endpoints: usize) -> Vec<ServicePort> {
    (0..n)
        .map(|i| {
            let vip = IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 97, 0, 0)) + i as u32));
            let eps = (0..endpoints)
                .map(|e| {
                    let ip = IpAddr::V4(Ipv4Addr::new(10, 200, (i / 250) as u8, (i % 250) as u8 + e as u8 % 5));
                    Endpoint::ready(ip, 8080, false)
                })
                .collect();
            ServicePort::cluster_ip(&format!("bench/svc-{i:05}:/tcp"), vip, 80, eps)
        })
        .collect()
}

/// A server that accepts and closes on TCP 8080 inside `pod_ns`, for the rest of the run.
pub fn accept_forever(pod_ns: &str) {
    let sns = pod_ns.to_string();
    std::thread::spawn(move || {
        let ns = netns::NetNs::named(&sns).unwrap();
        let _g = ns.enter().unwrap();
        let l = TcpListener::bind("0.0.0.0:8080").unwrap();
        for c in l.incoming() {
            drop(c);
        }
    });
    std::thread::sleep(Duration::from_millis(200));
}

/// Connect latencies (ms) to `dst` from inside `ns`, `count` new connections.
pub fn connects(ns: &str, dst: SocketAddr, count: usize) -> Result<Vec<f64>> {
    let ns = netns::NetNs::named(ns)?;
    ns.run(|| -> Result<Vec<f64>> {
        let mut v = Vec::with_capacity(count);
        for _ in 0..count {
            let t = Instant::now();
            let s = TcpStream::connect_timeout(&dst, Duration::from_secs(2)).context("connect")?;
            v.push(ms(t.elapsed()));
            drop(s);
        }
        Ok(v)
    })?
}

/// The state holding `services` (and no policy), as generation `generation`.
pub fn services_state(generation: u64, services: Vec<ServicePort>) -> State {
    State { generation, services: Arc::new(services), policy: Default::default() }
}

/// The proxy's options for the lab's node n1 (the eBPF dataplane's cgroup and pins included).
pub fn node_options(lab: &Lab) -> NodeOptions {
    NodeOptions {
        cluster_cidrs: vec!["10.244.0.0/16".parse().expect("a CIDR")],
        ebpf: tartan_proxy::ebpf::EbpfOptions {
            cgroup_root: lab.node_cgroup("n1"),
            bpf_root: lab.node_bpf_root("n1"),
            run_dir: lab.node("n1").map(|n| n.root.join("run/tartan")).unwrap_or_default(),
            conntrack_max: 0,
            pod_fast_path: true,
            ..Default::default()
        },
        ..Default::default()
    }
}

pub fn run(mode: &str, sizes: &[usize], endpoints: usize, count: usize) -> Result<()> {
    let mut lab = Lab::new("bench-proxy")?;
    lab.build_static(1)?;
    let server = lab.add_pod("n1", "server", "default")?;
    lab.add_pod("n1", "client", "default")?;
    let server_ip: Ipv4Addr = server["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().parse()?;
    let (server_ns, client_ns, node_ns) =
        (lab.pod("server")?.ns.clone(), lab.pod("client")?.ns.clone(), lab.node("n1")?.ns.clone());
    accept_forever(&server_ns);
    // Measured from inside the node, as its pods connect: in its cgroup, where the eBPF programs are attached.
    let in_node = lab.enter_node_cgroup("n1")?;
    let mut floor = connects(&client_ns, SocketAddr::new(server_ip.into(), 8080), count)?;
    println!("services x {endpoints} endpoints, {mode} dataplane; connect latency over {count} new connections\n");
    let (f50, f99) = (percentile(&mut floor, 0.5), percentile(&mut floor, 0.99));
    println!(
        "| services | rules / map entries | map memory | full sync | one-service sync | connect p50 | ratio | connect p99 | ratio | to the pod's address, dataplane in place: p50 |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!("| no proxy (floor) | 0 | - | - | - | {f50:.3} ms | 1.00x | {f99:.3} ms | 1.00x | - |");
    let nns = netns::NetNs::named(&node_ns)?;
    for &n in sizes {
        let mut ports = synthetic(n.saturating_sub(1), endpoints);
        let to_server = vec![Endpoint::ready(server_ip.into(), 8080, true)];
        ports.push(ServicePort::cluster_ip("zzz/measured:/tcp", VIP.into(), 80, to_server));
        let opts = node_options(&lab);
        let (full, partial, rules) = nns.run(|| -> Result<(Duration, Duration, usize)> {
            let mut dp = tartan_proxy::dataplane(mode, &opts).map_err(anyhow::Error::msg)?;
            let t = Instant::now();
            let r = dp.sync(&services_state(1, ports.clone()), true)?;
            let full = t.elapsed();
            let mut changed = ports.clone();
            if let Some(first) = changed.first_mut() {
                let mut eps = first.endpoints.clone();
                eps.pop();
                *first = ServicePort::cluster_ip(&first.id, first.cluster_ip, first.port, eps);
            }
            let t = Instant::now();
            dp.sync(&services_state(2, changed), false)?;
            let partial = t.elapsed();
            dp.sync(&services_state(3, ports.clone()), false)?;
            Ok((full, partial, r.held.entries))
        })??;
        let mut lat = connects(&client_ns, SocketAddr::new(VIP.into(), 80), count)?;
        let (p50, p99) = (percentile(&mut lat, 0.5), percentile(&mut lat, 0.99));
        // The same connections straight to the pod with the dataplane in place: what the proxy's rules (and, in
        // ebpf mode, a program that finds no frontend) cost a connection that is not to a service.
        let mut direct = connects(&client_ns, SocketAddr::new(server_ip.into(), 8080), count)?;
        let d50 = percentile(&mut direct, 0.5);
        let memory = map_memory(&lab.node_bpf_root("n1").join("TARTAN_SVC"));
        println!(
            "| {n} | {rules} | {memory} | {:.0} ms | {:.1} ms | {p50:.3} ms | {:.2}x | {p99:.3} ms | {:.2}x | {d50:.3} ms ({:.2}x) |",
            ms(full),
            ms(partial),
            p50 / f50,
            p99 / f99,
            d50 / f50
        );
        nns.run(|| -> Result<()> {
            Ok(tartan_proxy::dataplane(mode, &opts).map_err(anyhow::Error::msg)?.cleanup()?)
        })??;
    }
    drop(in_node);
    lab.teardown();
    Ok(())
}

/// The service map's memory as the kernel accounts it (bpftool's bytes_memlock), or "-" without one.
fn map_memory(pin: &std::path::Path) -> String {
    let out = std::process::Command::new("bpftool").args(["-j", "map", "show", "pinned"]).arg(pin).output();
    let bytes = out
        .ok()
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .and_then(|v| v["bytes_memlock"].as_u64());
    match bytes {
        Some(b) => format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0)),
        None => "-".into(),
    }
}
