//! tartan-agent: pod-to-pod TCP throughput against the physical limit (a raw veth pair) in the same run, and
//! convergence (start-up with many leases; a new lease to its route).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netns_lab::cluster::Backend;
use netns_lab::Lab;
use rtnl::Rtnl;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// iperf3 from `client` to `server_ip` (served in `server`), `streams` parallel streams, `secs` seconds: Gbit/s.
fn iperf(lab: &mut Lab, server: &str, client: &str, server_ip: &str, streams: u32, secs: u32) -> Result<f64> {
    // The median of three runs: single runs on 2 shared cores wander.
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(iperf_once(lab, server, client, server_ip, streams, secs)?);
    }
    Ok(percentile(&mut runs, 0.5))
}

fn iperf_once(lab: &mut Lab, server: &str, client: &str, server_ip: &str, streams: u32, secs: u32) -> Result<f64> {
    let mut cmd = lab.cmd(server, "iperf3")?;
    cmd.args(["-s", "-1", "-p", "5201"]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let pid = lab.spawn_cmd(cmd)?;
    std::thread::sleep(Duration::from_millis(300));
    let out = lab.exec(
        client,
        &["iperf3", "-c", server_ip, "-p", "5201", "-t", &secs.to_string(), "-P", &streams.to_string(), "-J"],
    )?;
    lab.stop(pid);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    let bps = v["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 result")?;
    Ok(bps / 1e9)
}

fn pod_ip(r: &serde_json::Value) -> String {
    r["ips"][0]["address"].as_str().unwrap_or_default().split('/').next().unwrap_or_default().to_string()
}

pub fn throughput(secs: u32) -> Result<()> {
    println!("TCP throughput, iperf3 {secs} s per run, Gbit/s (ratio to the raw veth pair of the same run)\n");
    let mut rows: Vec<(String, f64, f64)> = Vec::new();

    // The physical limit: two namespaces joined by one veth pair, nothing else.
    let mut raw = Lab::new("rawveth")?;
    let (a, b) = (raw.add_ns("a")?, raw.add_ns("b")?);
    raw.veth(&a, "eth0", &b, "eth0")?;
    raw.exec(&a, &["ip", "addr", "add", "10.255.0.1/30", "dev", "eth0"])?;
    raw.exec(&b, &["ip", "addr", "add", "10.255.0.2/30", "dev", "eth0"])?;
    let raw1 = iperf(&mut raw, &a, &b, "10.255.0.1", 1, secs)?;
    let raw4 = iperf(&mut raw, &a, &b, "10.255.0.1", 4, secs)?;
    drop(raw);
    rows.push(("raw veth pair (physical limit)".into(), raw1, raw4));

    for (name, backend) in [("vxlan", Backend::Vxlan), ("host-gw", Backend::HostGw), ("udp", Backend::Udp)] {
        let mut lab = Lab::new("tput")?;
        lab.build_cluster(2, backend, 1)?;
        let s = pod_ip(&lab.add_pod("n1", "s", "default")?);
        lab.add_pod("n1", "local", "default")?;
        lab.add_pod("n2", "remote", "default")?;
        let (sns, lns, rns) = (lab.pod("s")?.ns.clone(), lab.pod("local")?.ns.clone(), lab.pod("remote")?.ns.clone());
        if backend == Backend::Vxlan {
            // The lab's own cross-node floor: node to node over the underlay (veth, bridge, veth), no pods.
            let (n1, n2) = (lab.node("n1")?.ns.clone(), lab.node("n2")?.ns.clone());
            let one = iperf(&mut lab, &n1, &n2, "198.18.0.1", 1, secs)?;
            let four = iperf(&mut lab, &n1, &n2, "198.18.0.1", 4, secs)?;
            rows.push(("underlay, node to node (no pods, no tunnel)".into(), one, four));
            let one = iperf(&mut lab, &sns, &lns, &s, 1, secs)?;
            let four = iperf(&mut lab, &sns, &lns, &s, 4, secs)?;
            rows.push(("same node, pod to pod through cni0".into(), one, four));
        }
        let one = iperf(&mut lab, &sns, &rns, &s, 1, secs)?;
        let four = iperf(&mut lab, &sns, &rns, &s, 4, secs)?;
        rows.push((format!("cross node, {name}"), one, four));
    }
    println!("| path | 1 stream | ratio | 4 streams | ratio |");
    println!("|---|---:|---:|---:|---:|");
    for (name, one, four) in &rows {
        println!("| {name} | {one:.2} | {:.2}x | {four:.2} | {:.2}x |", one / raw1, four / raw4);
    }
    println!();
    Ok(())
}

/// Writes `n` fake vxlan leases (remote nodes that exist only in etcd) straight into etcd.
async fn put_leases(client: &mut etcd_client::Client, from: u32, n: u32) -> Result<Vec<String>> {
    let mut subnets = Vec::new();
    for i in from..from + n {
        let subnet = format!("10.{}.{}.0", 100 + i / 256, i % 256);
        let key = format!("/coreos.com/network/subnets/{subnet}-24");
        let value = serde_json::json!({
            "PublicIP": format!("198.19.{}.{}", i / 250, 1 + i % 250),
            "PublicIPv6": null,
            "BackendType": "vxlan",
            "BackendData": {"VNI": 1, "VtepMAC": format!("02:00:00:00:{:02x}:{:02x}", i / 256, i % 256)},
        });
        client.put(key, value.to_string(), None).await?;
        subnets.push(format!("{subnet}/24"));
    }
    Ok(subnets)
}

/// Puts leases from a thread inside the etcd namespace (the lab is not reachable from the root namespace).
fn etcd_put(lab: &Lab, from: u32, n: u32) -> Result<Vec<String>> {
    let ns = netns::NetNs::named(&lab.ns_name("etcd"))?;
    ns.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let mut client = etcd_client::Client::connect(["http://127.0.0.1:2379"], None).await?;
            put_leases(&mut client, from, n).await
        })
    })?
}

/// Whether `dst` is routed via flannel.1 in `ns` (read through netlink, no process start).
fn routed(rt: &mut Rtnl, dst: &str) -> Result<bool> {
    let dst: ipnet::IpNet = dst.parse()?;
    Ok(rt.routes(false)?.iter().any(|r| r.dst == dst))
}

pub fn convergence(leases: u32, new: u32) -> Result<()> {
    let mut lab = Lab::new("conv")?;
    lab.ensure_underlay()?;
    lab.start_etcd()?;
    lab.put_network_config(&serde_json::json!({"Network": "10.0.0.0/8", "Backend": {"Type": "vxlan"}}))?;
    let node = lab.add_node("n1")?;
    let existing = etcd_put(&lab, 0, leases)?;

    let ns = netns::NetNs::named(&node.ns)?;
    let mut rt = Rtnl::in_netns(&ns)?;
    let start = Instant::now();
    lab.start_agent("n1", &["--route-resync", "10"])?;
    let last = existing.last().cloned().unwrap_or_default();
    loop {
        if rt.routes(false)?.iter().filter(|r| r.onlink).count() as u32 >= leases && routed(&mut rt, &last)? {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let log = std::fs::read_to_string(node.root.join("agent.log")).unwrap_or_default();
            bail!("{leases} routes not in place after 60 s; agent log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let startup = start.elapsed();

    let mut lat = Vec::new();
    for i in 0..new {
        let subnet = etcd_put(&lab, leases + i, 1)?.remove(0);
        let t = Instant::now();
        while !routed(&mut rt, &subnet)? {
            if t.elapsed() > Duration::from_secs(10) {
                bail!("route to {subnet} not in place after 10 s");
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        lat.push(ms(t.elapsed()));
    }
    println!("Convergence (vxlan; every remote lease needs a neighbour, an FDB entry and a route)\n");
    println!("| measure | value |\n|---|---:|");
    println!("| agent start to all {leases} remote leases routed | {:.0} ms |", ms(startup));
    println!("| new lease in etcd to its route, p50 (over {new}) | {:.1} ms |", percentile(&mut lat, 0.5));
    println!("| new lease in etcd to its route, p99 | {:.1} ms |", percentile(&mut lat, 0.99));
    println!();
    Ok(())
}
