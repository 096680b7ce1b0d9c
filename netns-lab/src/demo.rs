//! The README's demo: a three-node cluster (a real etcd, a tartan-agent per node with the vxlan backend), two pods
//! per node wired by `tartan` from the agent's subnet.env, a connectivity matrix across all of them and out of the
//! cluster, one packet captured on the underlay showing the VXLAN encapsulation, and the nodes and pods as the
//! cluster store (`tartanctl`) shows them; then Services with tartan-proxy's eBPF dataplane (socket load balancing
//! and tc): a ClusterIP balanced across pods on two nodes, a NodePort reached from the outside host through a node
//! without an endpoint, and not one iptables rule for Services.

use anyhow::{bail, Result};
use netns_lab::cluster::Backend;
use netns_lab::{Lab, OUTSIDE_IP};

pub fn run() -> Result<()> {
    let mut lab = Lab::new("demo")?;
    println!("== lab {} (removed on exit)", lab.prefix());
    lab.build_cluster(3, Backend::Vxlan, 1)?;
    for n in ["n1", "n2", "n3"] {
        let node = lab.node(n)?.clone();
        let env = std::fs::read_to_string(node.root.join("run/flannel/subnet.env"))?;
        let subnet = env.lines().find_map(|l| l.strip_prefix("FLANNEL_SUBNET=")).unwrap_or("?");
        println!("node {n}: underlay {} , lease {subnet} (tartan-agent, vxlan)", node.underlay_ip);
    }
    println!("\nleases in etcd:");
    for line in lab.etcdctl(&["get", "--prefix", "/coreos.com/network/subnets/"])?.lines() {
        println!("  {line}");
    }

    let pods = ["a1", "a2", "b1", "b2", "c1", "c2"];
    println!();
    for (i, p) in pods.iter().enumerate() {
        let node = ["n1", "n2", "n3"][i / 2];
        let r = lab.add_pod(node, p, "default")?;
        println!("pod {p} on {node}: {}", r["ips"][0]["address"].as_str().unwrap_or("?"));
    }

    println!("\n== connectivity (row pings column)");
    print!("{:>5}", "");
    for p in pods {
        print!("{p:>5}");
    }
    println!("{:>9}", "outside");
    let mut failures = 0;
    for src in pods {
        print!("{src:>5}");
        let ns = lab.pod(src)?.ns.clone();
        for dst in pods {
            let ok = lab.ping(&ns, &lab.pod(dst)?.ip.clone())?;
            failures += usize::from(!ok);
            print!("{:>5}", if ok { "ok" } else { "FAIL" });
        }
        let ok = lab.ping(&ns, OUTSIDE_IP)?;
        failures += usize::from(!ok);
        println!("{:>9}", if ok { "ok" } else { "FAIL" });
    }

    let (a1, b1) = (lab.pod("a1")?.clone(), lab.pod("b1")?.clone());
    println!("\n== one packet a1 -> b1 on n1's underlay interface: VXLAN (UDP 8472, VNI 1) around the pod packet");
    let n1 = lab.node("n1")?.ns.clone();
    let cap = netns_lab::Capture::start_with(&n1, "eth0", &["-v", "-c", "1"], "udp port 8472")?;
    lab.exec(&a1.ns, &["ping", "-c", "1", "-W", "2", "-q", &b1.ip])?;
    for line in cap.stop()? {
        println!("  {line}");
    }

    // The cluster store: the agents registered their nodes and published the pods the plugin wired.
    std::thread::sleep(std::time::Duration::from_millis(500));
    for args in [&["get", "nodes", "-o", "wide"][..], &["get", "pods", "-o", "wide"][..]] {
        println!("\n== tartanctl {}", args.join(" "));
        let out = lab.tartanctl(args, None)?;
        print!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }

    failures += services(&mut lab)?;

    println!("\n== teardown");
    lab.teardown();
    if failures > 0 {
        bail!("{failures} pings failed");
    }
    println!("all pings answered; lab removed");
    Ok(())
}

/// tartan-proxy `--mode ebpf` on every node; a1 (n1) and b1 (n2) serve TCP 8080; one Service, ClusterIP and
/// NodePort. Returns the number of failed checks.
fn services(lab: &mut Lab) -> Result<usize> {
    println!(
        "\n== Services: tartan-proxy --mode ebpf on every node (socket load balancing for the nodes and their pods, tc \
         programs for traffic from outside; not one iptables rule for Services)"
    );
    for n in ["n1", "n2", "n3"] {
        lab.start_proxy(n, &["--mode", "ebpf"])?;
    }
    let mut manifest = String::new();
    for p in ["a1", "b1"] {
        manifest += &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {p}, labels: {{app: web}}}}\nspec: {{containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]}}\n---\n"
        );
        let ns = lab.pod(p)?.ns.clone();
        lab.spawn(&ns, &["socat", "TCP-LISTEN:8080,fork,reuseaddr", &format!("SYSTEM:echo {p}")])?;
    }
    manifest += "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {type: NodePort, clusterIP: 10.96.0.80, selector: {app: web}, ports: [{port: 80, targetPort: http, nodePort: 30080}]}\n";
    let out = lab.tartanctl(&["apply", "-f", "-"], Some(&manifest))?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    let ask = |lab: &Lab, ns: &str, addr: &str| -> Option<String> {
        let out = lab
            .exec_status(ns, &["socat", "-T", "2", "-u", &format!("TCP:{addr},connect-timeout=2"), "STDOUT"])
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !text.is_empty()).then_some(text)
    };
    let c2 = lab.pod("c2")?.ns.clone();
    let ready = netns_lab::wait_for(std::time::Duration::from_secs(10), || ask(lab, &c2, "10.96.0.80:80").is_some());
    let mut failures = usize::from(!ready);
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..20 {
        match ask(lab, &c2, "10.96.0.80:80") {
            Some(who) => *seen.entry(who).or_default() += 1,
            None => failures += 1,
        }
    }
    println!("20 connections from c2 (n3) to ClusterIP 10.96.0.80:80, answered by: {seen:?}");
    if seen.len() < 2 {
        failures += 1;
    }
    let outside = lab.ns_name("outside");
    let np = ask(lab, &outside, "198.18.0.3:30080");
    println!(
        "the outside host to NodePort 198.18.0.3:30080 (n3 has no endpoint: its tc program sends it on from n3's \
         address): {}",
        np.as_deref().unwrap_or("FAIL")
    );
    failures += usize::from(np.is_none());
    let n3 = lab.node("n3")?.ns.clone();
    let save = lab.exec(&n3, &["iptables-save"])?;
    let ours = String::from_utf8_lossy(&save.stdout)
        .lines()
        .filter(|l| l.starts_with("-A ") && l.contains("TARTAN-") && !l.contains("TARTAN-POLICY"))
        .count();
    println!("n3's iptables rules of tartan-proxy for Services: {ours}");
    failures += usize::from(ours != 0);
    Ok(failures)
}
