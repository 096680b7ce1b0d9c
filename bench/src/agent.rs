//! tartan-agent: pod-to-pod TCP throughput against the physical limit (a raw veth pair) in the same run, and
//! convergence (start-up with many leases; a new lease to its route).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netns_lab::cluster::Backend;
use netns_lab::Lab;
use rtnl::Rtnl;

use crate::stats::{ms, percentile};

/// iperf3 from `client` to `server_ip` (served in `server`), `streams` parallel streams, `secs` seconds: Gbit/s.
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

/// Two pods on one bare node wired by `plugin` (bridge cni0, host-local): (server ns, client ns, server address).
fn bridged_pair(lab: &mut Lab, plugin: &std::path::Path) -> Result<(String, String, String)> {
    let node = lab.add_node("n1")?;
    let ty = plugin.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    let conf = serde_json::json!({
        // The reference plugins (1.1.1) speak up to 1.0.0.
        "cniVersion": "1.0.0",
        "name": "benchnet",
        "type": ty,
        "bridge": "cni0",
        "isGateway": true,
        "runDir": node.root.join("run/tartan"),
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.200.0.0/24"}]],
                 "dataDir": node.root.join("var/lib/cni/networks")},
    })
    .to_string();
    let mut pods = Vec::new();
    for name in ["s", "c"] {
        let ns = lab.add_ns(&format!("p{name}"))?;
        let netns = format!("/run/netns/{ns}");
        let env = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", name),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
        ];
        let r = netns_lab::cni::exec_raw(&node.ns, plugin, &env, conf.as_bytes())?;
        if !r.success {
            bail!("{} ADD failed: {} {}", plugin.display(), r.stdout, r.stderr);
        }
        pods.push((ns, pod_ip(&r.json()?)));
    }
    let (c, s) = (pods.pop().unwrap(), pods.pop().unwrap());
    Ok((s.0, c.0, s.1))
}

/// One measured path: the lab that holds it (kept up for the whole run) and who serves and who sends.
struct Path {
    name: String,
    lab: usize,
    server: String,
    client: String,
    server_ip: String,
}

pub fn throughput(secs: u32, rounds: usize) -> Result<()> {
    // Every path is built first and then measured in interleaved rounds (raw pair, then each path, once per round):
    // this machine's cores are shared with other guests (steal time reaches 15 % when idle), so its speed drifts
    // over minutes. A ratio taken within one round compares paths under the same conditions; the median over
    // rounds is what is reported.
    let mut labs: Vec<Lab> = Vec::new();
    let mut paths: Vec<Path> = Vec::new();

    // The physical limit: two namespaces joined by one veth pair, nothing else.
    let mut raw = Lab::new("rawveth")?;
    let (a, b) = (raw.add_ns("a")?, raw.add_ns("b")?);
    raw.veth(&a, "eth0", &b, "eth0")?;
    raw.exec(&a, &["ip", "addr", "add", "10.255.0.1/30", "dev", "eth0"])?;
    raw.exec(&b, &["ip", "addr", "add", "10.255.0.2/30", "dev", "eth0"])?;
    labs.push(raw);
    let path = |name: &str, lab: usize, server: &str, client: &str, ip: &str| Path {
        name: name.into(),
        lab,
        server: server.into(),
        client: client.into(),
        server_ip: ip.into(),
    };
    paths.push(path("raw veth pair (physical limit)", 0, &a, &b, "10.255.0.1"));

    // Same node, each plugin alone on a bare node (no agent, no proxy): the reference bridge plugin is what a
    // bridge-based design costs on this machine, the fair bar for Tartan's same-node path.
    for (name, plugin) in [
        ("tartan", netns_lab::cni::tartan_bin_dir().join("tartan")),
        ("reference bridge", "/usr/lib/cni/bridge".into()),
    ] {
        let mut lab = Lab::new("tput-plugin")?;
        let (sns, cns, s) = bridged_pair(&mut lab, &plugin)?;
        labs.push(lab);
        paths.push(path(&format!("same node, {name} plugin alone, through cni0"), labs.len() - 1, &sns, &cns, &s));
    }

    for (name, backend) in [("vxlan", Backend::Vxlan), ("host-gw", Backend::HostGw), ("udp", Backend::Udp)] {
        let mut lab = Lab::new("tput")?;
        lab.build_cluster(2, backend, 1)?;
        let s = pod_ip(&lab.add_pod("n1", "s", "default")?);
        lab.add_pod("n1", "local", "default")?;
        lab.add_pod("n2", "remote", "default")?;
        let (sns, lns, rns) = (lab.pod("s")?.ns.clone(), lab.pod("local")?.ns.clone(), lab.pod("remote")?.ns.clone());
        let i = labs.len();
        if backend == Backend::Vxlan {
            // The lab's own cross-node floor: node to node over the underlay (veth, bridge, veth), no pods.
            let (n1, n2) = (lab.node("n1")?.ns.clone(), lab.node("n2")?.ns.clone());
            paths.push(path("underlay, node to node (no pods, no tunnel)", i, &n1, &n2, "198.18.0.1"));
        }
        if backend != Backend::Udp {
            // The pods' MTU follows the backend (vxlan: 1450; host-gw: 1500, the raw pair's).
            paths.push(path(
                &format!("same node, pod to pod through cni0 ({name} cluster, agent running)"),
                i,
                &sns,
                &lns,
                &s,
            ));
        }
        paths.push(path(&format!("cross node, {name}"), i, &sns, &rns, &s));
        labs.push(lab);
    }

    // The same clusters with tartan-proxy --mode ebpf on both nodes: pod traffic through the policy programs on
    // each veth and the fast path (between pods of one node, and to and from another node's pods).
    // And once without the fast path (--pod-fast-path=false: policy programs only, traffic through the bridge).
    for (name, backend, fast) in
        [("vxlan", Backend::Vxlan, true), ("host-gw", Backend::HostGw, true), ("vxlan", Backend::Vxlan, false)]
    {
        let mut lab = Lab::new("tput-ebpf")?;
        lab.build_cluster(2, backend, 1)?;
        let flag = format!("--pod-fast-path={fast}");
        for n in ["n1", "n2"] {
            lab.start_proxy(n, &["--mode", "ebpf", &flag])?;
        }
        let s = pod_ip(&lab.add_pod("n1", "s", "default")?);
        lab.add_pod("n1", "local", "default")?;
        lab.add_pod("n2", "remote", "default")?;
        // Measured once the programs are on the pods' veths (two per pod).
        let pinned = |lab: &Lab, node: &str| {
            std::fs::read_dir(lab.node_bpf_root(node).join("links"))
                .map(|d| {
                    d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("tartan_from_pod@")).count()
                })
                .unwrap_or(0)
        };
        let attached = || pinned(&lab, "n1") == 2 && pinned(&lab, "n2") == 1;
        if !netns_lab::wait_for(Duration::from_secs(10), attached) {
            anyhow::bail!("tartan-proxy --mode ebpf did not attach to the pods' veths");
        }
        let (sns, lns, rns) = (lab.pod("s")?.ns.clone(), lab.pod("local")?.ns.clone(), lab.pod("remote")?.ns.clone());
        let i = labs.len();
        let how = if fast { "fast path" } else { "no fast path" };
        paths.push(path(&format!("same node, {name} cluster, tartan-proxy --mode ebpf ({how})"), i, &sns, &lns, &s));
        paths.push(path(&format!("cross node, {name}, tartan-proxy --mode ebpf ({how})"), i, &sns, &rns, &s));
        labs.push(lab);
    }

    // gbps[path][streams index] over rounds; ratio[path][streams index] to the raw pair of the same round.
    let mut gbps = vec![[Vec::new(), Vec::new()]; paths.len()];
    let mut ratio = vec![[Vec::new(), Vec::new()]; paths.len()];
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        for (k, streams) in [1u32, 4].into_iter().enumerate() {
            let mut this = Vec::new();
            for p in &paths {
                this.push(iperf_once(&mut labs[p.lab], &p.server, &p.client, &p.server_ip, streams, secs)?);
            }
            for (i, v) in this.iter().enumerate() {
                gbps[i][k].push(*v);
                ratio[i][k].push(v / this[0]);
            }
        }
    }

    println!(
        "TCP throughput, iperf3 {secs} s per run, {rounds} interleaved rounds: median Gbit/s, and the median of \
         each round's ratio to the raw veth pair of that round\n"
    );
    println!("| path | 1 stream | ratio (range over rounds) | 4 streams | ratio (range over rounds) |");
    println!("|---|---:|---:|---:|---:|");
    let cell = |r: &mut Vec<f64>| {
        let med = percentile(r, 0.5);
        format!("{med:.2}x ({:.2}-{:.2})", r[0], r[r.len() - 1])
    };
    for (i, p) in paths.iter().enumerate() {
        let [g1, g4] = &mut gbps[i];
        let [r1, r4] = &mut ratio[i];
        println!(
            "| {} | {:.2} | {} | {:.2} | {} |",
            p.name,
            percentile(g1, 0.5),
            cell(r1),
            percentile(g4, 0.5),
            cell(r4)
        );
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
