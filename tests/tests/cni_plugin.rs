//! The `tartan` CNI plugin in real namespaces, with real packets: every test builds its own lab (unique names) and
//! the lab removes itself, also when an assertion fails.

use std::collections::BTreeSet;
use std::time::Duration;

use netns_lab::cni::{ConfList, Invocation};
use netns_lab::OUTSIDE_IP;
use serde_json::{json, Value};
use tartan_e2e::{result_ip, OneNode};

#[test]
fn pods_on_one_node_reach_each_other_and_the_gateway() {
    let mut t = OneNode::new("ping");
    let conf = t.conf("10.91.0.0/24", json!({}));
    let (a, b) = (t.pod_ns("a"), t.pod_ns("b"));
    let ra = t.add("ctr-a", &a, &conf);
    let rb = t.add("ctr-b", &b, &conf);
    let (ip_a, ip_b) = (result_ip(&ra, 4), result_ip(&rb, 4));
    assert_ne!(ip_a, ip_b);
    assert!(t.lab.ping(&a, &ip_b).unwrap(), "a -> b");
    assert!(t.lab.ping(&b, &ip_a).unwrap(), "b -> a");
    assert!(t.lab.ping(&a, "10.91.0.1").unwrap(), "a -> gateway");
    // The result names the bridge, the host end and the container end, and the container end holds the address.
    assert_eq!(ra["interfaces"][0]["name"], "cni0");
    assert_eq!(ra["interfaces"][2]["name"], "eth0");
    assert_eq!(ra["interfaces"][2]["sandbox"], format!("/run/netns/{a}"));
    let addrs = t.ip_json(&a, &["addr", "show", "eth0"]);
    assert_eq!(addrs[0]["addr_info"][0]["local"], ip_a.as_str());
    assert_eq!(addrs[0]["address"], ra["interfaces"][2]["mac"]);
    // ip_forward was turned on in the node (it is the pods' gateway), and only there.
    let fwd = t.lab.exec(&t.node.ns, &["cat", "/proc/sys/net/ipv4/ip_forward"]).unwrap();
    assert_eq!(String::from_utf8_lossy(&fwd.stdout).trim(), "1");
}

#[test]
fn traffic_leaving_the_node_is_masqueraded_to_the_node_address() {
    let mut t = OneNode::new("masq");
    let conf = t.conf("10.92.0.0/24", json!({"ipMasq": true}));
    let (a, b) = (t.pod_ns("a"), t.pod_ns("b"));
    let ip_a = result_ip(&t.add("ctr-a", &a, &conf), 4);
    let ip_b = result_ip(&t.add("ctr-b", &b, &conf), 4);
    let outside = t.lab.ns_name("outside");

    let cap = t.lab.capture(&outside, "eth0", "icmp").unwrap();
    assert!(t.lab.ping(&a, OUTSIDE_IP).unwrap(), "pod reaches the outside host");
    let lines = cap.stop().unwrap();
    assert!(
        lines.iter().any(|l| l.contains(&format!("IP {} > {OUTSIDE_IP}: ICMP echo request", t.node.underlay_ip))),
        "outside sees the node address: {lines:#?}"
    );
    assert!(!lines.iter().any(|l| l.contains(&ip_a)), "the pod address never leaves the node: {lines:#?}");

    // Pod-to-pod traffic inside the network keeps its source.
    let cap = t.lab.capture(&b, "eth0", "icmp").unwrap();
    assert!(t.lab.ping(&a, &ip_b).unwrap());
    let lines = cap.stop().unwrap();
    assert!(lines.iter().any(|l| l.contains(&format!("IP {ip_a} > {ip_b}"))), "{lines:#?}");

    // One shared rule set for the network, not one chain per container.
    let rules = t.tartan_rules();
    assert_eq!(rules.iter().filter(|l| l.starts_with("-A POSTROUTING")).count(), 1, "{rules:#?}");
    assert_eq!(rules.iter().filter(|l| l.starts_with(':')).count(), 1, "{rules:#?}");
}

/// kube-proxy's hairpin case: a pod connects to a service address that is DNATed back to the pod itself. With
/// br_netfilter the DNATed frame is bridged out of the port it came in on, which only hairpin mode allows.
#[test]
fn hairpin_lets_a_pod_reach_itself_through_a_dnat() {
    let mut t = OneNode::new("hairpin");
    for (hairpin, subnet) in [(true, "10.93.0.0/24"), (false, "10.93.1.0/24")] {
        let bridge = if hairpin { "cbr-hp" } else { "cbr-nohp" };
        let conf = t.conf(subnet, json!({"name": format!("hp{hairpin}"), "bridge": bridge, "hairpinMode": hairpin}));
        let pod = t.pod_ns(&format!("hp{hairpin}"));
        let ip = result_ip(&t.add(&format!("ctr-{hairpin}"), &pod, &conf), 4);
        let vip = if hairpin { "10.96.0.10" } else { "10.96.0.11" };
        let node = t.node.ns.clone();
        t.lab
            .exec(
                &node,
                &[
                    "iptables",
                    "-w",
                    "-t",
                    "nat",
                    "-A",
                    "PREROUTING",
                    "-d",
                    vip,
                    "-p",
                    "tcp",
                    "-j",
                    "DNAT",
                    "--to-destination",
                    &format!("{ip}:8080"),
                ],
            )
            .unwrap();
        t.lab
            .exec(
                &node,
                &["iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-s", &ip, "-d", &ip, "-j", "MASQUERADE"],
            )
            .unwrap();
        t.lab.spawn(&pod, &["socat", "TCP-LISTEN:8080,fork,reuseaddr", "SYSTEM:echo hairpin-ok"]).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let out =
            t.lab.exec_status(&pod, &["socat", "-T", "2", "-", &format!("TCP:{vip}:80,connect-timeout=2")]).unwrap();
        let got = String::from_utf8_lossy(&out.stdout).contains("hairpin-ok");
        assert_eq!(got, hairpin, "hairpinMode={hairpin}: reached itself = {got}");
    }
}

#[test]
fn mtu_is_applied_to_both_ends_and_to_packets() {
    let mut t = OneNode::new("mtu");
    let conf = t.conf("10.94.0.0/24", json!({"mtu": 1400}));
    let a = t.pod_ns("a");
    let r = t.add("ctr-a", &a, &conf);
    let host_end = r["interfaces"][1]["name"].as_str().unwrap().to_string();
    assert_eq!(t.ip_json(&a, &["link", "show", "eth0"])[0]["mtu"], 1400);
    assert_eq!(t.ip_json(&t.node.ns.clone(), &["link", "show", &host_end])[0]["mtu"], 1400);
    // 1372 bytes of ICMP payload + 28 of headers fill 1400 exactly; one more byte needs fragmenting, which DF forbids.
    let fits = t.lab.exec_status(&a, &["ping", "-c1", "-W1", "-M", "do", "-s", "1372", "10.94.0.1"]).unwrap();
    assert!(fits.status.success(), "{}", String::from_utf8_lossy(&fits.stdout));
    let too_big = t.lab.exec_status(&a, &["ping", "-c1", "-W1", "-M", "do", "-s", "1373", "10.94.0.1"]).unwrap();
    assert!(!too_big.status.success());
}

#[test]
fn del_is_idempotent_and_leaves_nothing_even_without_the_netns() {
    let mut t = OneNode::new("del");
    let conf = t.conf("10.95.0.0/24", json!({"ipMasq": true}));
    let (a, b) = (t.pod_ns("a"), t.pod_ns("b"));
    let ra = t.add("ctr-a", &a, &conf);
    let rb = t.add("ctr-b", &b, &conf);
    let (veth_a, veth_b) =
        (ra["interfaces"][1]["name"].as_str().unwrap(), rb["interfaces"][1]["name"].as_str().unwrap());
    let node = t.node.ns.clone();
    assert!(t.links(&node).iter().any(|l| l == veth_a));
    assert_eq!(t.ip_files("testnet").len(), 2);

    t.del("ctr-a", Some(&a), &conf);
    t.del("ctr-a", Some(&a), &conf); // twice in a row
    assert!(!t.links(&node).iter().any(|l| l == veth_a));
    assert!(!t.links(&a).iter().any(|l| l == "eth0"));
    assert_eq!(t.ip_files("testnet"), vec![result_ip(&rb, 4)]);
    assert!(!t.tartan_rules().is_empty(), "b still needs the masquerade rules");

    // The runtime deleted the netns before DEL (containerd's `ctr run --rm`).
    t.lab.del_ns(&b).unwrap();
    t.del("ctr-b", Some(&b), &conf);
    t.del("ctr-b", None, &conf);
    assert!(!t.links(&node).iter().any(|l| l == veth_b));
    assert!(t.ip_files("testnet").is_empty());
    assert!(t.tartan_rules().is_empty(), "rules went with the network's last address: {:#?}", t.tartan_rules());
}

#[test]
fn fifty_parallel_adds_get_fifty_addresses_and_fifty_dels_free_them() {
    let mut t = OneNode::new("par");
    let conf = t.conf("10.96.128.0/24", json!({"ipMasq": true}));
    let pods: Vec<String> = (0..50).map(|i| t.pod_ns(&format!("x{i}"))).collect();
    let t = &t;
    let conf = &conf;
    let results: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> =
            pods.iter().enumerate().map(|(i, ns)| s.spawn(move || t.add(&format!("ctr{i}"), ns, conf))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ips: BTreeSet<String> = results.iter().map(|r| result_ip(r, 4)).collect();
    assert_eq!(ips.len(), 50, "distinct addresses");
    assert_eq!(t.ip_files("testnet").len(), 50);
    let rules = t.tartan_rules();
    assert_eq!(rules.iter().filter(|l| l.starts_with("-A POSTROUTING")).count(), 1, "no duplicate jumps: {rules:#?}");
    std::thread::scope(|s| {
        for (i, ns) in pods.iter().enumerate() {
            s.spawn(move || t.del(&format!("ctr{i}"), Some(ns), conf));
        }
    });
    assert!(t.ip_files("testnet").is_empty());
    let node = t.node.ns.clone();
    assert_eq!(t.links(&node).iter().filter(|l| l.starts_with("veth")).count(), 0);
    assert!(t.tartan_rules().is_empty());
}

#[test]
fn an_exhausted_range_is_an_error_and_leaves_nothing() {
    let mut t = OneNode::new("full");
    // A /30: .1 is the gateway, .2 the only address to give.
    let conf = t.conf("10.97.0.0/30", json!({"ipMasq": true}));
    let (a, b) = (t.pod_ns("a"), t.pod_ns("b"));
    t.add("ctr-a", &a, &conf);
    let r = t.plugin("ADD", "ctr-b", Some(&b), "eth0", &conf);
    assert!(!r.success);
    assert_eq!(r.error_code(), Some(100), "{}", r.stdout);
    assert!(r.stdout.contains("no IP addresses available"), "{}", r.stdout);
    assert_eq!(t.links(&b), vec!["lo"], "nothing was created in the pod");
    assert_eq!(t.ip_files("testnet").len(), 1);
    let node = t.node.ns.clone();
    assert_eq!(t.links(&node).iter().filter(|l| l.starts_with("veth")).count(), 1);
}

#[test]
fn a_failure_mid_add_is_rolled_back() {
    let mut t = OneNode::new("rollback");
    let node = t.node.ns.clone();
    // A non-bridge device squats the bridge name: ADD fails after IPAM has handed out an address.
    t.lab.exec(&node, &["ip", "link", "add", "cni0", "type", "veth", "peer", "name", "cni0p"]).unwrap();
    let conf = t.conf("10.98.0.0/24", json!({"ipMasq": true}));
    let a = t.pod_ns("a");
    let r = t.plugin("ADD", "ctr-a", Some(&a), "eth0", &conf);
    assert!(!r.success);
    assert_eq!(r.error_code(), Some(7), "{}", r.stdout);
    assert!(r.stdout.contains("not a bridge"), "{}", r.stdout);
    assert!(t.ip_files("testnet").is_empty(), "the address was given back");
    assert_eq!(t.links(&a), vec!["lo"]);
    assert!(t.tartan_rules().is_empty());

    // ADD for an interface that already exists fails and leaves the live attachment alone.
    t.lab.exec(&node, &["ip", "link", "del", "cni0"]).unwrap();
    let ip = result_ip(&t.add("ctr-a", &a, &conf), 4);
    let again = t.plugin("ADD", "ctr-a", Some(&a), "eth0", &conf);
    assert_eq!(again.error_code(), Some(101), "{}", again.stdout);
    assert_eq!(t.ip_files("testnet"), vec![ip.clone()]);
    assert!(t.lab.ping(&a, "10.98.0.1").unwrap());
}

#[test]
fn bad_input_gets_the_spec_error_codes_and_changes_nothing() {
    let mut t = OneNode::new("badinput");
    let a = t.pod_ns("a");
    let good = t.conf("10.99.0.0/24", json!({}));
    let run_raw = |env: &[(&str, &str)], stdin: &[u8]| {
        netns_lab::cni::exec_raw(&t.node.ns, &tartan_e2e::tartan(), env, stdin).unwrap()
    };
    let netns = format!("/run/netns/{a}");
    let full_env =
        [("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c1"), ("CNI_NETNS", netns.as_str()), ("CNI_IFNAME", "eth0")];

    let malformed = run_raw(&full_env, b"{\"cniVersion\": \"1.0.0\", ");
    assert_eq!(malformed.error_code(), Some(6), "{}", malformed.stdout);

    let mut bad_cidr = good.clone();
    bad_cidr["ipam"]["ranges"][0][0]["subnet"] = json!("10.99.0.0/33");
    let r = run_raw(&full_env, bad_cidr.to_string().as_bytes());
    assert_eq!(r.error_code(), Some(7), "{}", r.stdout);
    assert!(r.stdout.contains("ipam.ranges[0][0].subnet"), "the message names the field: {}", r.stdout);

    let r = run_raw(&full_env[..3], good.to_string().as_bytes());
    assert_eq!(r.error_code(), Some(4), "{}", r.stdout);
    assert!(r.stdout.contains("CNI_IFNAME"), "{}", r.stdout);

    let mut old = good.clone();
    old["cniVersion"] = json!("0.2.0");
    let r = run_raw(&full_env, old.to_string().as_bytes());
    assert_eq!(r.error_code(), Some(1), "{}", r.stdout);

    let r = run_raw(
        &[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c1"), ("CNI_NETNS", "/run/netns/nope"), ("CNI_IFNAME", "eth0")],
        good.to_string().as_bytes(),
    );
    assert_eq!(r.error_code(), Some(4), "{}", r.stdout);

    // DEL of something never added succeeds, and creates no store either.
    let r = t.plugin("DEL", "never-added", Some(&a), "eth0", &good);
    assert!(r.success, "{}", r.stdout);

    // Nothing was created anywhere.
    let node = t.node.ns.clone();
    assert_eq!(t.links(&node), vec!["lo", "eth0"]);
    assert_eq!(t.links(&a), vec!["lo"]);
    assert!(!t.data_dir().join("testnet").exists());
}

#[test]
fn version_and_result_shapes_follow_the_requested_version() {
    let mut t = OneNode::new("version");
    let r = t.plugin("VERSION", "", None, "", &json!({"cniVersion": "0.4.0"}));
    let v = r.json().unwrap();
    assert_eq!(v["cniVersion"], "0.4.0");
    assert_eq!(v["supportedVersions"], json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]));
    let a = t.pod_ns("a");
    let conf = t.conf("10.100.0.0/24", json!({"cniVersion": "0.3.1"}));
    let r = t.add("ctr-a", &a, &conf);
    assert_eq!(r["cniVersion"], "0.3.1");
    assert_eq!(r["ips"][0]["version"], "4");
}

#[test]
fn check_notices_a_deleted_route() {
    let mut t = OneNode::new("check");
    let a = t.pod_ns("a");
    let mut conf = t.conf("10.101.0.0/24", json!({}));
    let prev = t.add("ctr-a", &a, &conf);
    conf["prevResult"] = prev;
    let ok = t.plugin("CHECK", "ctr-a", Some(&a), "eth0", &conf);
    assert!(ok.success, "{}", ok.stdout);
    t.lab.exec(&a, &["ip", "route", "del", "default"]).unwrap();
    let bad = t.plugin("CHECK", "ctr-a", Some(&a), "eth0", &conf);
    assert!(!bad.success);
    assert!(bad.stdout.contains("route to 0.0.0.0/0 is missing"), "{}", bad.stdout);
}

#[test]
fn gc_frees_what_no_attachment_holds() {
    let mut t = OneNode::new("gc");
    let conf = t.conf("10.102.0.0/24", json!({"ipMasq": true}));
    let (a, b) = (t.pod_ns("a"), t.pod_ns("b"));
    let ip_a = result_ip(&t.add("ctr-a", &a, &conf), 4);
    t.add("ctr-b", &b, &conf);
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "ctr-a", "ifname": "eth0"}]);
    gc["cni.dev/attachments"] = gc["cni.dev/valid-attachments"].clone();
    let r = t.plugin("GC", "", None, "", &gc);
    assert!(r.success, "{}", r.stdout);
    assert_eq!(t.ip_files("testnet"), vec![ip_a]);
    assert!(!t.tartan_rules().is_empty());
    gc["cni.dev/valid-attachments"] = json!([]);
    gc["cni.dev/attachments"] = json!([]);
    assert!(t.plugin("GC", "", None, "", &gc).success);
    assert!(t.ip_files("testnet").is_empty());
    assert!(t.tartan_rules().is_empty(), "no address left, no rules left");
}

#[test]
fn flannel_mode_takes_the_node_subnet_from_subnet_env() {
    let mut t = OneNode::new("flannel");
    let subnet_file = t.node.root.join("run/flannel/subnet.env");
    let conf = json!({
        "cniVersion": "1.0.0", "name": "cbr0", "type": "tartan",
        "subnetFile": subnet_file,
        "runDir": t.node.root.join("run/tartan"),
        "ipam": {"type": "host-local", "dataDir": t.data_dir()},
        "delegate": {"hairpinMode": true, "isDefaultGateway": true},
    });
    let a = t.pod_ns("a");
    let early = t.plugin("ADD", "ctr-a", Some(&a), "eth0", &conf);
    assert_eq!(early.error_code(), Some(11), "retryable until the agent wrote subnet.env: {}", early.stdout);
    assert!(early.stdout.contains("subnet.env"), "{}", early.stdout);
    let status = t.plugin("STATUS", "", None, "", &conf);
    assert_eq!(status.error_code(), Some(50), "{}", status.stdout);
    assert_eq!(t.links(&a), vec!["lo"]);

    std::fs::write(
        &subnet_file,
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    )
    .unwrap();
    assert!(t.plugin("STATUS", "", None, "", &conf).success);
    let r = t.add("ctr-a", &a, &conf);
    assert_eq!(r["ips"][0]["address"], "10.244.7.2/24");
    assert_eq!(r["ips"][0]["gateway"], "10.244.7.1");
    assert_eq!(t.ip_json(&a, &["link", "show", "eth0"])[0]["mtu"], 1450);
    let routes = t.ip_json(&a, &["route", "show"]);
    let has = |dst: &str| routes.as_array().unwrap().iter().any(|r| r["dst"] == dst && r["gateway"] == "10.244.7.1");
    assert!(has("10.244.0.0/16") && has("default"), "{routes}");
    // FLANNEL_IPMASQ=true: the agent masquerades, so the plugin installs nothing.
    assert!(t.tartan_rules().is_empty());
    assert!(t.lab.ping(&a, "10.244.7.1").unwrap());
}

#[test]
fn dual_stack_pods_reach_each_other_over_both_families() {
    let mut t = OneNode::new("dual");
    let conf = t.conf("10.103.0.0/24", json!({"ipMasq": true}));
    let mut conf = conf;
    conf["ipam"]["ranges"] = json!([[{"subnet": "10.103.0.0/24"}], [{"subnet": "fd00:103::/64"}]]);
    let (a, b) = (t.pod_ns("a"), t.pod_ns("b"));
    let ra = t.add("ctr-a", &a, &conf);
    let rb = t.add("ctr-b", &b, &conf);
    assert!(result_ip(&ra, 6).starts_with("fd00:103::"));
    assert!(t.lab.ping(&a, &result_ip(&rb, 4)).unwrap());
    assert!(t.lab.ping(&a, &result_ip(&rb, 6)).unwrap(), "IPv6 pod to pod");
    assert!(t.lab.ping(&a, "fd00:103::1").unwrap(), "IPv6 gateway on the bridge");
    let rules = t.tartan_rules();
    assert!(rules.iter().any(|l| l.contains("fd00:103::/64")), "IPv6 masquerade too: {rules:#?}");
}

#[test]
fn delegates_other_ipam_types_to_their_plugin() {
    let mut t = OneNode::new("delegate");
    // Debian's reference plugins (1.1.1) speak CNI up to 1.0.0.
    let mut conf = t.conf("10.104.0.0/24", json!({"cniVersion": "1.0.0"}));
    conf["ipam"] = json!({"type": "static", "addresses": [{"address": "10.104.9.9/24", "gateway": "10.104.9.1"}]});
    let a = t.pod_ns("a");
    let r = t.add("ctr-a", &a, &conf);
    assert_eq!(r["ips"][0]["address"], "10.104.9.9/24");
    assert!(t.lab.ping(&a, "10.104.9.1").unwrap());
    t.del("ctr-a", Some(&a), &conf);
}

/// In a real runtime's conflist: after `loopback` (tartan in the middle, passing its prevResult on) and before
/// the reference `portmap`, which DNATs a node port to the pod from the result tartan produced.
#[test]
fn chains_in_the_middle_of_a_conflist_with_portmap() {
    let mut t = OneNode::new("chain");
    let node = t.node.clone();
    let list = json!({
        "cniVersion": "1.0.0",
        "name": "chained",
        "plugins": [
            {"type": "loopback"},
            {"type": "tartan", "bridge": "cni0", "isDefaultGateway": true, "ipMasq": true, "hairpinMode": true,
             "runDir": node.root.join("run/tartan"),
             "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.105.0.0/24"}]], "dataDir": t.data_dir()}},
            {"type": "portmap", "capabilities": {"portMappings": true}},
        ]
    });
    let conf = ConfList::from_value(&list).unwrap();
    let a = t.pod_ns("a");
    let inv = Invocation {
        node_ns: node.ns.clone(),
        container_id: "ctr-a".into(),
        netns: format!("/run/netns/{a}"),
        ifname: "eth0".into(),
        args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=a".into(),
        path: netns_lab::cni::plugin_path(),
    };
    let runtime = json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]});
    let r = conf.add_with(&inv, &runtime).unwrap();
    assert_eq!(r["interfaces"][0]["name"], "lo", "loopback's interface is passed on: {r}");
    assert_eq!(r["interfaces"][3]["name"], "eth0");
    let pod_ip = r["ips"].as_array().unwrap().iter().find(|i| i["interface"] == 3).unwrap()["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    assert!(pod_ip.starts_with("10.105.0."));
    t.lab.spawn(&a, &["socat", "TCP-LISTEN:80,fork,reuseaddr", "SYSTEM:echo served-by-pod"]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let outside = t.lab.ns_name("outside");
    let out = t
        .lab
        .exec_status(&outside, &["socat", "-T", "2", "-", &format!("TCP:{}:8080,connect-timeout=2", node.underlay_ip)])
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("served-by-pod"), "outside -> node:8080 -> pod:80");
    conf.del_with(&inv, &runtime).unwrap();
    assert!(t.ip_files("chained").is_empty());
}

/// `vlan`: each pod port is an untagged member of its VLAN on a VLAN-filtering bridge, so pods of one VLAN reach
/// each other (and the gateway, whose bridge port joins the VLAN) and not the pods of another VLAN.
#[test]
fn vlan_separates_pods_on_one_bridge() {
    let mut t = OneNode::new("vlan");
    let v10 = t.conf("10.106.0.0/24", json!({"name": "v10", "bridge": "cbr-vlan", "vlan": 10}));
    let v20 = t.conf(
        "10.106.1.0/24",
        json!({"name": "v20", "bridge": "cbr-vlan", "vlan": 20, "isGateway": false, "isDefaultGateway": false}),
    );
    let (a, b, c) = (t.pod_ns("a"), t.pod_ns("b"), t.pod_ns("c"));
    let node = t.node.ns.clone();
    let probe = t.lab.exec_status(&node, &["ip", "link", "add", "vlanprobe", "type", "bridge", "vlan_filtering", "1"]);
    if !probe.unwrap().status.success() {
        // A kernel without bridge VLAN filtering (this machine's): a clear error, and nothing left behind.
        let r = t.plugin("ADD", "ctr-a", Some(&a), "eth0", &v10);
        assert_eq!(r.error_code(), Some(7), "{}", r.stdout);
        assert!(r.stdout.contains("CONFIG_BRIDGE_VLAN_FILTERING"), "{}", r.stdout);
        assert!(t.ip_files("v10").is_empty());
        assert_eq!(t.links(&a), vec!["lo"]);
        eprintln!("kernel lacks bridge VLAN filtering: checked the error path only");
        return;
    }
    t.lab.exec(&node, &["ip", "link", "del", "vlanprobe"]).unwrap();
    let ra = t.add("ctr-a", &a, &v10);
    let rb = t.add("ctr-b", &b, &v10);
    let rc = t.add("ctr-c", &c, &v20);
    let vlans = t.lab.exec(&node, &["bridge", "-j", "vlan", "show"]).unwrap();
    let vlans: Value = serde_json::from_slice(&vlans.stdout).unwrap();
    let port_a = ra["interfaces"][1]["name"].as_str().unwrap();
    let entry = vlans.as_array().unwrap().iter().find(|p| p["ifname"] == port_a).expect("port a has VLANs");
    assert!(
        entry["vlans"].as_array().unwrap().iter().any(|v| v["vlan"] == 10
            && v["flags"]
                .as_array()
                .is_some_and(|f| f.contains(&json!("PVID")) && f.contains(&json!("Egress Untagged")))),
        "{entry}"
    );
    assert!(t.lab.ping(&a, &result_ip(&rb, 4)).unwrap(), "same VLAN");
    assert!(t.lab.ping(&a, "10.106.0.1").unwrap(), "gateway in the VLAN");
    // c sits in another VLAN and subnet; give it a direct route to a's subnet so only the VLAN can stop it.
    t.lab.exec(&c, &["ip", "route", "add", "10.106.0.0/24", "dev", "eth0"]).unwrap();
    assert!(!t.lab.ping(&c, &result_ip(&ra, 4)).unwrap(), "VLAN 20 must not reach VLAN 10: {rc}");
}

/// A stale gateway address on the bridge (the node subnet changed): an error naming it without forceAddress,
/// replaced with it.
#[test]
fn force_address_replaces_a_stale_bridge_address() {
    let mut t = OneNode::new("force");
    let node = t.node.ns.clone();
    t.lab.exec(&node, &["ip", "link", "add", "cni0", "type", "bridge"]).unwrap();
    t.lab.exec(&node, &["ip", "addr", "add", "10.107.9.1/24", "dev", "cni0"]).unwrap();
    let a = t.pod_ns("a");
    let conf = t.conf("10.107.0.0/24", json!({}));
    let r = t.plugin("ADD", "ctr-a", Some(&a), "eth0", &conf);
    assert_eq!(r.error_code(), Some(7), "{}", r.stdout);
    assert!(r.stdout.contains("10.107.9.1/24") && r.stdout.contains("forceAddress"), "{}", r.stdout);
    assert!(t.ip_files("testnet").is_empty());
    let forced = t.conf("10.107.0.0/24", json!({"forceAddress": true}));
    t.add("ctr-a", &a, &forced);
    let addrs = t.ip_json(&node, &["-4", "addr", "show", "cni0"]);
    let have: Vec<&str> =
        addrs[0]["addr_info"].as_array().unwrap().iter().filter_map(|a| a["local"].as_str()).collect();
    assert_eq!(have, vec!["10.107.0.1"]);
    assert!(t.lab.ping(&a, "10.107.0.1").unwrap());
}

#[test]
fn promisc_mode_sets_the_bridge_promiscuous() {
    let mut t = OneNode::new("promisc");
    let a = t.pod_ns("a");
    let conf = t.conf("10.108.0.0/24", json!({"promiscMode": true}));
    t.add("ctr-a", &a, &conf);
    let node = t.node.ns.clone();
    let link = t.ip_json(&node, &["-d", "link", "show", "cni0"]);
    assert!(link[0]["promiscuity"].as_u64().unwrap() >= 1, "{link}");
}

/// Addresses and MACs the runtime asks for (podman --ip / --mac-address through runtimeConfig, CNI_ARGS IP=).
#[test]
fn requested_addresses_and_mac_are_honoured() {
    let mut t = OneNode::new("request");
    let (a, b, c) = (t.pod_ns("a"), t.pod_ns("b"), t.pod_ns("c"));
    let conf =
        t.conf("10.109.0.0/24", json!({"runtimeConfig": {"ips": ["10.109.0.50/24"], "mac": "02:00:00:00:00:42"}}));
    let r = t.add("ctr-a", &a, &conf);
    assert_eq!(r["ips"][0]["address"], "10.109.0.50/24");
    assert_eq!(t.ip_json(&a, &["link", "show", "eth0"])[0]["address"], "02:00:00:00:00:42");
    let plain = t.conf("10.109.0.0/24", json!({}));
    let node = t.node.ns.clone();
    let netns = format!("/run/netns/{b}");
    let path = netns_lab::cni::plugin_path();
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "ctr-b"),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "IgnoreUnknown=1;IP=10.109.0.60"),
        ("CNI_PATH", path.as_str()),
    ];
    let rb = netns_lab::cni::exec_raw(&node, &tartan_e2e::tartan(), &env, plain.to_string().as_bytes()).unwrap();
    assert_eq!(rb.json().unwrap()["ips"][0]["address"], "10.109.0.60/24", "{}", rb.stdout);
    // Asking for a taken address: code 105, nothing left behind.
    let taken = t.plugin("ADD", "ctr-c", Some(&c), "eth0", &conf);
    assert_eq!(taken.error_code(), Some(105), "{}", taken.stdout);
    assert_eq!(t.ip_files("testnet"), vec!["10.109.0.50", "10.109.0.60"]);
    assert_eq!(t.links(&c), vec!["lo"]);
}

/// Chained after another plugin, everything it reported is passed on untouched, fields we do not model included;
/// a prevResult that is not a result is refused before anything changes.
#[test]
fn prev_result_is_passed_on_whole_and_checked_first() {
    let mut t = OneNode::new("prev");
    let a = t.pod_ns("a");
    let prev = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "lo", "sandbox": "/x", "socketPath": "/run/x.sock"}],
                      "ips": [{"address": "127.0.0.1/8", "interface": 0}], "custom": {"kept": true}});
    let conf = t.conf("10.110.0.0/24", json!({"cniVersion": "1.0.0", "prevResult": prev}));
    let r = t.add("ctr-a", &a, &conf);
    assert_eq!(r["interfaces"][0]["socketPath"], "/run/x.sock");
    assert_eq!(r["custom"]["kept"], true);
    assert_eq!(r["interfaces"][3]["name"], "eth0");
    assert_eq!(r["ips"][1]["interface"], 3);
    let b = t.pod_ns("b");
    let bad = t.conf("10.110.0.0/24", json!({"prevResult": {"ips": [{"address": "not-an-address"}]}}));
    let r = t.plugin("ADD", "ctr-b", Some(&b), "eth0", &bad);
    assert_eq!(r.error_code(), Some(6), "{}", r.stdout);
    assert_eq!(t.links(&b), vec!["lo"]);
    assert_eq!(t.ip_files("testnet").len(), 1);
}

#[test]
fn named_pods_are_recorded_for_the_agent_and_forgotten_on_del_and_gc() {
    let mut t = OneNode::new("records");
    let conf = t.conf("10.103.0.0/24", json!({}));
    let pods = t.node.root.join("run/tartan/pods");
    let add = |t: &OneNode, id: &str, ns: &str, name: &str| {
        let netns = format!("/run/netns/{ns}");
        let path = netns_lab::cni::plugin_path();
        let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}");
        let env = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", id),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_PATH", path.as_str()),
            ("CNI_ARGS", args.as_str()),
        ];
        let r = netns_lab::cni::exec_raw(&t.node.ns, &tartan_e2e::tartan(), &env, conf.to_string().as_bytes()).unwrap();
        assert!(r.success, "{}", r.stdout);
        r.json().unwrap()
    };
    let (a, b, c) = (t.pod_ns("a"), t.pod_ns("b"), t.pod_ns("c"));
    let ip_a = result_ip(&add(&t, "ctr-a", &a, "web-a"), 4);
    add(&t, "ctr-b", &b, "web-b");
    t.add("ctr-c", &c, &conf); // no pod name: nothing to record
    let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(pods.join("ctr-a_eth0.json")).unwrap()).unwrap();
    assert_eq!(rec["name"], "web-a");
    assert_eq!(rec["namespace"], "default");
    assert_eq!(rec["ips"][0], ip_a.as_str());
    assert_eq!(std::fs::read_dir(&pods).unwrap().count(), 2);
    t.del("ctr-a", Some(&a), &conf);
    assert!(!pods.join("ctr-a_eth0.json").exists());
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "ctr-c", "ifname": "eth0"}]);
    assert!(t.plugin("GC", "", None, "", &gc).success);
    assert_eq!(std::fs::read_dir(&pods).unwrap().count(), 0, "GC forgets ctr-b");
}

#[test]
fn a_log_file_gets_one_line_per_call_and_nothing_else_does() {
    let mut t = OneNode::new("calllog");
    let a = t.pod_ns("a");
    let log = t.node.root.join("tartan-cni.log");
    let conf = t.conf("10.98.0.0/24", json!({"logFile": log}));
    let r = t.add("c1", &a, &conf);
    assert!(r["ips"].is_array(), "stdout is the result alone: {r}");
    t.del("c1", Some(&a), &conf);
    let mut bad = conf.clone();
    bad["ipam"]["ranges"][0][0]["subnet"] = json!("10.98.0.0/33");
    let refused = t.plugin("ADD", "c2", Some(&a), "eth0", &bad);
    assert_eq!(refused.error_code(), Some(7));
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    let netns = format!("netns=/run/netns/{a}");
    assert!(lines[0].contains("command=ADD container=c1") && lines[0].contains(&netns), "{}", lines[0]);
    assert!(lines[0].contains("ifname=eth0 result=ok duration_ms="), "{}", lines[0]);
    assert!(lines[1].contains("command=DEL container=c1") && lines[1].contains("result=ok"), "{}", lines[1]);
    assert!(
        lines[2].contains("command=ADD container=c2 ") && lines[2].contains("result=error code=7 msg="),
        "{}",
        lines[2]
    );
    // Without logFile the plugin writes no file of its own.
    let quiet = t.conf("10.98.0.0/24", json!({}));
    let b = t.pod_ns("b");
    t.add("c3", &b, &quiet);
    assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 3);
}
