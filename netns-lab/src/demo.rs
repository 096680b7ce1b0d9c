//! The README's demo: one node, three pods wired by `tartan`, a ping matrix among them, the pods reaching a host
//! outside the node, and a capture on that host showing their traffic masqueraded to the node's address.

use anyhow::{bail, Result};
use netns_lab::{Lab, OUTSIDE_IP};

pub fn run() -> Result<()> {
    let mut lab = Lab::new("demo")?;
    println!("== lab {} (removed on exit)", lab.prefix());
    lab.build_static(1)?;
    let node = lab.node("n1")?.clone();
    println!("node n1: underlay {} , pod subnet {}", node.underlay_ip, netns_lab::node_subnet(1));

    let pods = ["a", "b", "c"];
    for p in pods {
        let r = lab.add_pod("n1", p, "default")?;
        let ip = r["ips"][0]["address"].as_str().unwrap_or("?");
        let mac = r["interfaces"][2]["mac"].as_str().unwrap_or("?");
        println!("pod {p}: eth0 {ip} mac {mac} (host side {})", r["interfaces"][1]["name"].as_str().unwrap_or("?"));
    }

    println!("\n== ping matrix (row pings column)");
    print!("{:>6}", "");
    for p in pods {
        print!("{p:>6}");
    }
    println!("{:>9}", "outside");
    let mut failures = 0;
    for src in pods {
        print!("{src:>6}");
        let src_ns = lab.pod(src)?.ns.clone();
        for dst in pods {
            let ok = lab.ping(&src_ns, &lab.pod(dst)?.ip.clone())?;
            failures += usize::from(!ok);
            print!("{:>6}", if ok { "ok" } else { "FAIL" });
        }
        let ok = lab.ping(&src_ns, OUTSIDE_IP)?;
        failures += usize::from(!ok);
        println!("{:>9}", if ok { "ok" } else { "FAIL" });
    }

    println!("\n== capture on the outside host while pod a pings it (source is masqueraded to the node)");
    let outside = lab.ns_name("outside");
    let cap = lab.capture(&outside, "eth0", "icmp")?;
    let a = lab.pod("a")?.ns.clone();
    lab.exec(&a, &["ping", "-c", "2", "-i", "0.2", "-q", OUTSIDE_IP])?;
    for line in cap.stop()? {
        println!("  {line}");
    }

    println!("\n== teardown");
    for p in pods {
        lab.del_pod(p)?;
    }
    lab.teardown();
    if failures > 0 {
        bail!("{failures} pings failed");
    }
    println!("all pings answered; lab removed");
    Ok(())
}
