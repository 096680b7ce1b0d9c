//! Traffic from outside the cluster through a node port, per dataplane, in one run: a lab cluster (vxlan, two
//! nodes, real agents and proxies) per `--mode`, a server pod on n2, and the lab's outside host as the client.
//! Measured: TCP throughput (iperf3) and new-connection latency through n1 (the endpoint is remote: translated,
//! source-translated and tunnelled) and through n2 (the endpoint is local), against the pod reached directly
//! (the outside host routes the pod's address to n2: no translation at all, the floor). Rounds interleave the
//! labs and paths: this machine's speed drifts over minutes, and a ratio within one round compares like with like.
//! `--services N` programs N other services first (cluster IPs with an endpoint each), as a real cluster has:
//! kube-proxy's iptables rules walk every service's rule before the node ports, the eBPF maps do not.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use netns_lab::cluster::Backend;
use netns_lab::{wait_for, Lab};

use crate::programming::{etcd_put_all, service, vip};
use crate::proxy::{accept_forever, connects};
use crate::stats::percentile;

/// One mode's cluster: the lab, the server pod's namespace and address.
struct Cluster {
    mode: String,
    lab: Lab,
    server_ns: String,
    server_ip: String,
}

fn cluster(mode: &str, services: usize) -> Result<Cluster> {
    let mut lab = Lab::new(&format!("bench-np-{mode}"))?;
    lab.build_cluster(2, Backend::Vxlan, 1)?;
    let others: Vec<(String, String)> =
        (0..services).flat_map(|i| service(&format!("other-{i:05}"), &vip(i), "10.244.250.250")).collect();
    etcd_put_all(&lab, others)?;
    for node in ["n1", "n2"] {
        lab.start_proxy(node, &["--mode", mode])?;
    }
    let apply = |lab: &Lab, yaml: &str| -> Result<()> {
        let out = lab.tartanctl(&["apply", "-f", "-"], Some(yaml))?;
        if !out.status.success() {
            bail!("tartanctl apply: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    apply(
        &lab,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: srv, labels: {app: srv}}\nspec: {containers: [{name: c}]}\n",
    )?;
    let r = lab.add_pod("n2", "srv", "default")?;
    let server_ip = r["ips"][0]["address"].as_str().context("pod address")?.split('/').next().unwrap().to_string();
    let server_ns = lab.pod("srv")?.ns.clone();
    accept_forever(&server_ns);
    apply(
        &lab,
        "apiVersion: v1\nkind: Service\nmetadata: {name: srv}\nspec: {type: NodePort, selector: {app: srv}, ports: [{name: accept, port: 80, targetPort: 8080, nodePort: 30080}, {name: iperf, port: 5201, targetPort: 5201, nodePort: 30201}]}\n",
    )?;
    let outside = lab.ns_name("outside");
    // The floor: the outside host reaches the pod through n2 with plain routing.
    lab.exec(&outside, &["ip", "route", "add", &format!("{server_ip}/32"), "via", "198.18.0.2"])?;
    for node in ["198.18.0.1", "198.18.0.2"] {
        let to: SocketAddr = format!("{node}:30080").parse()?;
        // Long enough for iptables-restore of many services.
        if !wait_for(Duration::from_secs(600), || connects(&outside, to, 1).is_ok()) {
            bail!("{mode}: the node port on {node} does not answer");
        }
    }
    Ok(Cluster { mode: mode.to_string(), lab, server_ns, server_ip })
}

pub fn run(modes: &[String], services: usize, secs: u32, rounds: usize, count: usize) -> Result<()> {
    let mut clusters = modes.iter().map(|m| cluster(m, services)).collect::<Result<Vec<_>>>()?;
    // (label, address, iperf port, accept port), the same in every mode's cluster.
    let paths = |c: &Cluster| {
        vec![
            ("pod directly (no proxy in the path)".to_string(), c.server_ip.clone(), 5201u16, 8080u16),
            ("node port via n1 (remote endpoint)".to_string(), "198.18.0.1".to_string(), 30201, 30080),
            ("node port via n2 (local endpoint)".to_string(), "198.18.0.2".to_string(), 30201, 30080),
        ]
    };
    let n_paths = 3;
    // [cluster][path] -> samples.
    let mut gbps = vec![vec![Vec::new(); n_paths]; clusters.len()];
    let mut lat = vec![vec![Vec::new(); n_paths]; clusters.len()];
    let mut failures = vec![vec![0usize; n_paths]; clusters.len()];
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        for (ci, c) in clusters.iter_mut().enumerate() {
            let outside = c.lab.ns_name("outside");
            for (pi, (_, addr, iperf, accept)) in paths(c).into_iter().enumerate() {
                let server_ns = c.server_ns.clone();
                let g = iperf_to(&mut c.lab, &server_ns, &outside, &addr, iperf, secs)
                    .with_context(|| format!("{}: iperf3 to {addr}:{iperf}, round {}", c.mode, round + 1))?;
                gbps[ci][pi].push(g);
                let to: SocketAddr = format!("{addr}:{accept}").parse()?;
                let (took, failed) = connects_counting(&outside, to, count / rounds.max(1))
                    .with_context(|| format!("{}: connections to {to}, round {}", c.mode, round + 1))?;
                lat[ci][pi].extend(took);
                failures[ci][pi] += failed;
            }
        }
    }
    println!(
        "From the lab's outside host through a node port (vxlan cluster, server pod on n2, {services} other \
         services programmed): TCP throughput (iperf3, 1 stream, {secs} s, median of {rounds} interleaved rounds) \
         and new-connection latency ({count} connections per path)\n"
    );
    println!(
        "| mode | path | Gbit/s | vs the pod directly | connect p50 | vs directly | connect p99 | vs directly | failed (2 s) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut summary = Vec::new();
    for (ci, c) in clusters.iter().enumerate() {
        let (mut g0, mut l0) = (gbps[ci][0].clone(), lat[ci][0].clone());
        let (d_g, d_50, d_99) = (percentile(&mut g0, 0.5), percentile(&mut l0, 0.5), percentile(&mut l0, 0.99));
        for (pi, (name, ..)) in paths(c).into_iter().enumerate() {
            let g = percentile(&mut gbps[ci][pi], 0.5);
            let (p50, p99) = (percentile(&mut lat[ci][pi], 0.5), percentile(&mut lat[ci][pi], 0.99));
            println!(
                "| {} | {name} | {g:.2} | {:.2}x | {p50:.3} ms | {:.2}x | {p99:.3} ms | {:.2}x | {} |",
                c.mode,
                g / d_g,
                p50 / d_50,
                p99 / d_99,
                failures[ci][pi]
            );
            summary.push((c.mode.clone(), name, g, p50, p99));
        }
    }
    if modes.len() == 2 {
        println!("\n| path | {b} / {a} throughput | {b} / {a} connect p50 | connect p99 |", a = modes[0], b = modes[1]);
        println!("|---|---:|---:|---:|");
        for pi in 1..n_paths {
            let (a, b) = (&summary[pi], &summary[n_paths + pi]);
            println!("| {} | {:.2}x | {:.2}x | {:.2}x |", a.1, b.2 / a.2, b.3 / a.3, b.4 / a.4);
        }
    }
    println!();
    for c in &mut clusters {
        c.lab.teardown();
    }
    Ok(())
}

/// Connect latencies (ms) of `count` new connections from `ns` to `dst`, and how many failed (a 2 s timeout: counted,
/// not measured, so that one lost SYN does not end the run).
fn connects_counting(ns: &str, dst: SocketAddr, count: usize) -> Result<(Vec<f64>, usize)> {
    let ns = netns::NetNs::named(ns)?;
    ns.run(|| {
        let mut v = Vec::with_capacity(count);
        let mut failed = 0;
        for _ in 0..count {
            let t = std::time::Instant::now();
            match std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(2)) {
                Ok(s) => {
                    v.push(crate::stats::ms(t.elapsed()));
                    drop(s);
                }
                Err(_) => failed += 1,
            }
        }
        (v, failed)
    })
    .map_err(Into::into)
}

/// iperf3 from the outside host to `addr:port`, the server in the pod listening on 5201.
fn iperf_to(lab: &mut Lab, server_ns: &str, client_ns: &str, addr: &str, port: u16, secs: u32) -> Result<f64> {
    // Through a node port the client names another port than the one the server listens on.
    let mut cmd = lab.cmd(server_ns, "iperf3")?;
    cmd.args(["-s", "-1", "-p", "5201"]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let pid = lab.spawn_cmd(cmd)?;
    std::thread::sleep(Duration::from_millis(300));
    let out = lab.exec(client_ns, &["iperf3", "-c", addr, "-p", &port.to_string(), "-t", &secs.to_string(), "-J"])?;
    lab.stop(pid);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    let bps = v["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 result")?;
    Ok(bps / 1e9)
}
