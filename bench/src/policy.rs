//! tartan-proxy's NetworkPolicy at scale: with 0, 100 and 1 000 policies in a cluster of 2 000 pods (200 of them on
//! the measured node), the sync time after one policy changes and after one pod's labels change, the rules and
//! ipset entries programmed, and the TCP connect latency between two real pods that a policy allows (a new
//! connection each time) against the same pods with no policy at all.
//!
//! The cluster is synthetic (objects, not running pods) except the server and client, which are real pods wired by
//! `tartan` with their veths, so the packets walk the real chains (or programs); the measured node's synthetic pods
//! get a veth pair each (its other end left in the node), so that both dataplanes program all 200 of them. Each policy selects
//! one app label (about 1 in 50 pods) of one of 10 namespaces and allows ingress from another app in namespaces
//! labelled `team`, on one port.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use kube_objects::Object;
use netns_lab::Lab;
use proxy_state::policy::{local_veths, policy_model};
use proxy_state::{PolicyModel, State};
use serde_json::json;

use crate::proxy::{accept_forever, connects};
use crate::stats::{ms, percentile};

const PODS: usize = 2000;
const LOCAL_EVERY: usize = 10;

fn object(v: serde_json::Value) -> Object {
    let mut o: Object = serde_json::from_value(v).expect("a valid object");
    o.apply_defaults();
    o
}

fn cluster(policies: usize, server: Ipv4Addr, client: Ipv4Addr, client_app: &str) -> Vec<Object> {
    let mut v = Vec::new();
    for n in 0..10 {
        v.push(object(json!({"kind": "Namespace", "metadata": {"name": format!("ns{n}"), "labels": {"team": format!("t{}", n % 3)}}})));
    }
    for i in 0..PODS {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + i as u32);
        let node = if i % LOCAL_EVERY == 0 { "n1" } else { "n2" };
        v.push(object(json!({
            "kind": "Pod",
            "metadata": {"name": format!("p{i}"), "namespace": format!("ns{}", i % 10), "labels": {"app": format!("app{}", i % 50)}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"podIP": ip.to_string(), "phase": "Running"},
        })));
    }
    for (name, ip, app) in [("server", server, "server"), ("client", client, client_app)] {
        v.push(object(json!({
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
            "spec": {"nodeName": "n1"},
            "status": {"podIP": ip.to_string(), "phase": "Running"},
        })));
    }
    for i in 0..policies {
        v.push(object(json!({
            "kind": "NetworkPolicy",
            "metadata": {"name": format!("np{i}"), "namespace": format!("ns{}", i % 10)},
            "spec": {
                "podSelector": {"matchLabels": {"app": format!("app{}", i % 50)}},
                "ingress": [{
                    "from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{}", i % 3)}}, "podSelector": {"matchLabels": {"app": format!("app{}", (i + 1) % 50)}}}],
                    "ports": [{"port": 80 + (i % 3) as i64}],
                }],
            },
        })));
    }
    if policies > 0 {
        // The measured pair: the server takes TCP 8080 from the client only.
        v.push(object(json!({
            "kind": "NetworkPolicy",
            "metadata": {"name": "server", "namespace": "default"},
            "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"port": 8080}]}]},
        })));
    }
    v
}

/// The state holding `policy` (and no services), as generation `generation`.
fn policy_state(generation: u64, policy: &PolicyModel) -> State {
    State { generation, services: Default::default(), policy: Arc::new(policy.clone()) }
}

pub fn run(modes: &[String], sizes: &[usize], count: usize) -> Result<()> {
    let mut lab = Lab::new("bench-policy")?;
    lab.build_static(1)?;
    let server = lab.add_pod("n1", "server", "default")?;
    lab.add_pod("n1", "client", "default")?;
    let ip = |r: &serde_json::Value| -> Result<Ipv4Addr> {
        Ok(r["ips"][0]["address"].as_str().unwrap_or_default().split('/').next().unwrap_or_default().parse()?)
    };
    let server_ip = ip(&server)?;
    let client_ip: Ipv4Addr = lab.pod("client")?.ip.parse()?;
    let (server_ns, client_ns, node_ns) =
        (lab.pod("server")?.ns.clone(), lab.pod("client")?.ns.clone(), lab.node("n1")?.ns.clone());
    let run_dir = lab.node("n1")?.root.join("run/tartan");
    let mut veths = local_veths(&run_dir);
    // The synthetic pods of this node get an interface each (the host side of a veth pair), as real pods
    // have: both dataplanes then program every local pod (iptables its anti-spoofing and egress rules by the
    // port, eBPF its programs and entries).
    let mut batch = String::new();
    for i in (0..PODS).step_by(LOCAL_EVERY) {
        let name = format!("vsyn{i}");
        batch += &format!("link add {name} type veth peer name {name}p\nlink set {name} up\n");
        veths.insert((format!("ns{}", i % 10), format!("p{i}")), name);
    }
    let batch_file = lab.node("n1")?.root.join("synthetic-pods.batch");
    std::fs::write(&batch_file, batch)?;
    lab.exec(&node_ns, &["ip", "-batch", &batch_file.to_string_lossy()])?;
    accept_forever(&server_ns);
    let to = SocketAddr::new(server_ip.into(), 8080);
    let mut floor = connects(&client_ns, to, count)?;
    let (f50, f99) = (percentile(&mut floor, 0.5), percentile(&mut floor, 0.99));
    println!(
        "NetworkPolicy: {PODS} pods ({} on this node), one policy per app label of a namespace",
        PODS / LOCAL_EVERY
    );
    println!("connect latency client -> server (allowed by a policy) over {count} new connections\n");
    println!("| dataplane | policies | rules or map entries | sets | set entries | full sync | policy change sync | label change sync | connect p50 | ratio | connect p99 | ratio |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!("| no proxy (floor) | - | 0 | 0 | 0 | - | - | - | {f50:.3} ms | 1.00x | {f99:.3} ms | 1.00x |");
    let nns = netns::NetNs::named(&node_ns)?;
    let opts = crate::proxy::node_options(&lab);
    for mode in modes {
        for &n in sizes {
            let objects = cluster(n, server_ip, client_ip, "client");
            let model = policy_model(&objects, "n1", &veths);
            // One policy changes its port; one remote pod moves to another app (set members change).
            let mut changed_policy = objects.clone();
            if let Some(Object::NetworkPolicy(np)) =
                changed_policy.iter_mut().find(|o| matches!(o, Object::NetworkPolicy(_)))
            {
                np.spec.ingress[0].ports[0].port = Some(kube_objects::IntOrString::Int(443));
            }
            let mut relabelled = objects.clone();
            if let Some(Object::Pod(p)) =
                relabelled.iter_mut().find(|o| matches!(o, Object::Pod(p) if p.metadata.name == "p1"))
            {
                p.metadata.labels.insert("app".into(), "app2".into());
            }
            let (m1, m2) = (policy_model(&changed_policy, "n1", &veths), policy_model(&relabelled, "n1", &veths));
            let (full, pol, lab_t, report) = nns.run(|| -> Result<_> {
                let mut dp = tartan_proxy::dataplane(mode, &opts).map_err(anyhow::Error::msg)?;
                let t = Instant::now();
                let report = dp.sync(&policy_state(1, &model), true)?;
                let full = t.elapsed();
                let t = Instant::now();
                dp.sync(&policy_state(2, &m1), false)?;
                let pol = t.elapsed();
                dp.sync(&policy_state(3, &model), false)?;
                let t = Instant::now();
                dp.sync(&policy_state(4, &m2), false)?;
                let lab_t = t.elapsed();
                dp.sync(&policy_state(5, &model), false)?;
                Ok((full, pol, lab_t, report.held))
            })??;
            let mut lat = connects(&client_ns, to, count)?;
            let (p50, p99) = (percentile(&mut lat, 0.5), percentile(&mut lat, 0.99));
            println!(
            "| {mode} | {n} | {} | {} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {p50:.3} ms | {:.2}x | {p99:.3} ms | {:.2}x |",
            report.entries,
            report.sets,
            report.set_entries,
            ms(full),
            ms(pol),
            ms(lab_t),
            p50 / f50,
            p99 / f99
        );
            nns.run(|| -> Result<()> {
                Ok(tartan_proxy::dataplane(mode, &opts).map_err(anyhow::Error::msg)?.cleanup()?)
            })??;
        }
    }
    lab.teardown();
    Ok(())
}
