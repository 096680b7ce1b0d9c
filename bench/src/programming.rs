//! Network programming latency of the whole tartan-proxy (store follower, change tracker, dataplane thread): with N
//! services (each with one endpoint) already in etcd and in the kernel, the time from one new Service's write to
//! etcd until a pod's connection to its cluster IP is answered, i.e. until its rules are in the kernel and carry
//! packets. Measured end to end in the lab with the real daemon, a real etcd and real pods; the first full sync
//! after start is reported too, and the two parts: the etcd write, and the proxy's own figure (its
//! network-programming histogram, from receiving the event to the kernel holding it).

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use netns_lab::cluster::Backend;
use netns_lab::Lab;
use serde_json::json;

use crate::proxy::accept_forever;
use crate::stats::{ms, percentile};

/// Puts `values` into etcd from inside the lab's etcd namespace, 64 keys per transaction.
pub(crate) fn etcd_put_all(lab: &Lab, values: Vec<(String, String)>) -> Result<()> {
    let ns = netns::NetNs::named(&lab.ns_name("etcd"))?;
    ns.run(move || -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let mut client = etcd_client::Client::connect(["http://127.0.0.1:2379"], None).await?;
            for chunk in values.chunks(64) {
                let ops: Vec<etcd_client::TxnOp> =
                    chunk.iter().map(|(k, v)| etcd_client::TxnOp::put(k.as_str(), v.as_str(), None)).collect();
                client.txn(etcd_client::Txn::new().and_then(ops)).await?;
            }
            Ok(())
        })
    })?
}

/// A selector-less Service `name` at `vip` and its hand-written Endpoints pointing at `backend`.
pub(crate) fn service(name: &str, vip: &str, backend: &str) -> Vec<(String, String)> {
    let svc = json!({"kind": "Service", "apiVersion": "v1", "metadata": {"name": name, "namespace": "bench"},
        "spec": {"type": "ClusterIP", "clusterIP": vip, "ports": [{"port": 80, "protocol": "TCP", "targetPort": 8080}],
                 "sessionAffinity": "None"}});
    let ep = json!({"kind": "Endpoints", "apiVersion": "v1", "metadata": {"name": name, "namespace": "bench"},
        "subsets": [{"addresses": [{"ip": backend}], "ports": [{"port": 8080, "protocol": "TCP"}]}]});
    vec![
        (format!("/tartan/services/bench/{name}"), svc.to_string()),
        (format!("/tartan/endpoints/bench/{name}"), ep.to_string()),
    ]
}

pub(crate) fn vip(i: usize) -> String {
    format!("10.{}.{}.{}", 97 + i / 65536, (i / 256) % 256, i % 256)
}

/// Whether one connection from `ns` to `dst` is answered within 20 ms.
fn answers(ns: &netns::NetNs, dst: SocketAddr) -> bool {
    ns.run(|| TcpStream::connect_timeout(&dst, Duration::from_millis(20)).is_ok()).unwrap_or(false)
}

/// The proxy's own network-programming histogram: (sum in seconds, count), from its /metrics in `node_ns`.
fn programming(lab: &Lab, node_ns: &str) -> Result<(f64, f64)> {
    let out = lab.exec(node_ns, &["curl", "-s", "http://127.0.0.1:10249/metrics"])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // One series per name (labelled with the mode): the value after the last space.
    let value = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .find_map(|l| l.rsplit_once(' ')?.1.parse().ok())
            .unwrap_or(0.0)
    };
    Ok((
        value("kubeproxy_network_programming_duration_seconds_sum"),
        value("kubeproxy_network_programming_duration_seconds_count"),
    ))
}

pub fn run(mode: &str, sizes: &[usize], probes: usize) -> Result<()> {
    println!("network programming latency, {mode} dataplane: a new Service's etcd write until a pod's connection to");
    println!(
        "its cluster IP is answered ({probes} new services per size; each size with N services already programmed)\n"
    );
    println!(
        "| services | first full sync after start | store write to kernel p50 | max | of which the etcd write p50 \
         | proxy's own (event to kernel) mean | p50 / p50 at the smallest size |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut base = None;
    for &n in sizes {
        let mut lab = Lab::new("bench-prog")?;
        lab.build_cluster(1, Backend::Vxlan, 1)?;
        let server = lab.add_pod("n1", "server", "default")?;
        lab.add_pod("n1", "client", "default")?;
        let server_ip =
            server["ips"][0]["address"].as_str().unwrap_or_default().split('/').next().unwrap_or_default().to_string();
        accept_forever(&lab.pod("server")?.ns.clone());
        let client = netns::NetNs::named(&lab.pod("client")?.ns.clone())?;
        // Probed from inside the node, as its pods connect: in its cgroup (where the eBPF programs attach).
        let in_node = lab.enter_node_cgroup("n1")?;
        let mut values = Vec::new();
        for i in 0..n {
            values.extend(service(&format!("s{i}"), &vip(i), &server_ip));
        }
        etcd_put_all(&lab, values)?;
        let started = Instant::now();
        lab.start_proxy("n1", &["--mode", mode])?;
        // Programmed: the last of the N services answers.
        let last: SocketAddr = format!("{}:80", vip(n - 1)).parse()?;
        while !answers(&client, last) {
            if started.elapsed() > Duration::from_secs(1800) {
                bail!("{n} services were not programmed within 30 minutes");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let first = started.elapsed();
        let node_ns = lab.node("n1")?.ns.clone();
        let before = programming(&lab, &node_ns)?;
        let (mut lat, mut writes) = (Vec::new(), Vec::new());
        for k in 0..probes {
            let addr = format!("10.96.254.{}", 10 + k);
            let dst: SocketAddr = format!("{addr}:80").parse()?;
            let values = service(&format!("probe{k}"), &addr, &server_ip);
            // An isolated change: past --min-sync-period (100 ms) since the last sync, so that coalescing does not
            // hold it back (back-to-back changes wait for it by design).
            std::thread::sleep(Duration::from_millis(500));
            let t = Instant::now();
            etcd_put_all(&lab, values)?;
            writes.push(ms(t.elapsed()));
            while !answers(&client, dst) {
                if t.elapsed() > Duration::from_secs(600) {
                    bail!("probe {k} was not programmed within 10 minutes");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            lat.push(ms(t.elapsed()));
        }
        let after = programming(&lab, &node_ns)?;
        let own = if after.1 > before.1 { (after.0 - before.0) / (after.1 - before.1) * 1000.0 } else { f64::NAN };
        let p50 = percentile(&mut lat, 0.5);
        let w50 = percentile(&mut writes, 0.5);
        let max = lat.iter().cloned().fold(0.0, f64::max);
        let b = *base.get_or_insert(p50);
        println!(
            "| {n} | {:.1} s | {p50:.0} ms | {max:.0} ms | {w50:.0} ms | {own:.0} ms | {:.2}x |",
            first.as_secs_f64(),
            p50 / b
        );
        drop(in_node);
        lab.teardown();
    }
    Ok(())
}
