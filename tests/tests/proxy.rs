//! tartan-proxy (iptables) in lab clusters: real etcd, agents, pods wired by `tartan`, Services applied with
//! tartanctl, servers (socat) in pods that answer with their name and the client address they saw.

use std::collections::BTreeSet;
use std::time::Duration;

use netns_lab::cluster::Backend;
use netns_lab::{wait_for, Lab};

struct Cluster {
    lab: Lab,
    /// The proxies' PIDs, n1's first.
    proxies: Vec<u32>,
    /// The dataplane under test (`--mode`).
    mode: &'static str,
}

fn probe_failures(child: std::process::Child) -> Vec<String> {
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect()
}

impl Cluster {
    fn new(tag: &str) -> Cluster {
        Cluster::with(tag, "iptables", Backend::Vxlan, &[])
    }

    fn in_mode(tag: &str, mode: &'static str) -> Cluster {
        Cluster::with(tag, mode, Backend::Vxlan, &[])
    }

    fn with(tag: &str, mode: &'static str, backend: Backend, proxy_flags: &[&str]) -> Cluster {
        let mut lab = Lab::new(tag).expect("lab");
        lab.build_cluster(2, backend, 1).expect("cluster");
        let flags: Vec<&str> = ["--mode", mode].into_iter().chain(proxy_flags.iter().copied()).collect();
        let proxies = ["n1", "n2"].iter().map(|n| lab.start_proxy(n, &flags).unwrap()).collect();
        Cluster { lab, proxies, mode }
    }

    /// (Re)starts `node`'s proxy in this cluster's mode, with `extra` flags.
    fn start_proxy(&mut self, node: &str, extra: &[&str]) -> u32 {
        let flags: Vec<&str> = ["--mode", self.mode].into_iter().chain(extra.iter().copied()).collect();
        self.lab.start_proxy(node, &flags).unwrap()
    }

    /// Service `dns` at `vip` (UDP 53) over two pods answering their name, dns-a on n1 and dns-b on n2.
    fn dns_service(&mut self, vip: &str) {
        for (node, name) in [("n1", "dns-a"), ("n2", "dns-b")] {
            self.apply(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: dns}}}}\nspec: {{containers: [{{name: c, ports: [{{name: dns, containerPort: 5353, protocol: UDP}}]}}]}}\n"
            ));
            self.lab.add_pod(node, name, "default").unwrap();
            let ns = self.lab.pod(name).unwrap().ns.clone();
            self.lab.spawn(&ns, &["socat", "UDP-RECVFROM:5353,fork", &format!("SYSTEM:echo {name}")]).unwrap();
        }
        self.apply(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: dns}}\nspec: {{clusterIP: {vip}, selector: {{app: dns}}, ports: [{{port: 53, protocol: UDP, targetPort: dns}}]}}\n"
        ));
    }

    /// `n` new TCP connections to vip:port from `ns`, one every 50 ms, by a shell loop running in the node's
    /// cgroup (as a pod's processes do); [`probe_failures`] collects the ones that failed.
    fn probe_loop(&self, ns: &str, vip: &str, port: u16, n: usize) -> std::process::Child {
        let script = format!(
            "for i in $(seq {n}); do socat -T 2 -u TCP:{vip}:{port},connect-timeout=2 STDOUT >/dev/null 2>&1 || echo \"failed $i\"; sleep 0.05; done"
        );
        let mut cmd = self.lab.cmd(ns, "sh").unwrap();
        cmd.args(["-c", &script]).stdout(std::process::Stdio::piped());
        cmd.spawn().unwrap()
    }

    /// Whether `node`'s dataplane holds a frontend for `vip`: a rule naming it (iptables), an entry of the service
    /// map (ebpf).
    fn programmed(&self, node: &str, vip: &str) -> bool {
        let ip: std::net::IpAddr = vip.parse().unwrap();
        match self.mode {
            "ebpf" => {
                let map = self.lab.node_bpf_root(node).join("TARTAN_SVC");
                let out =
                    std::process::Command::new("bpftool").args(["-j", "map", "dump", "pinned"]).arg(&map).output();
                let Ok(out) = out else { return false };
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else { return false };
                let want: Vec<u8> = match ip {
                    std::net::IpAddr::V4(a) => a.octets().to_vec(),
                    std::net::IpAddr::V6(a) => a.octets().to_vec(),
                };
                v.as_array().into_iter().flatten().any(|e| {
                    let key: Vec<u8> = e["key"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
                        .collect();
                    key.len() >= want.len() && key[..want.len()] == want[..]
                })
            }
            _ => {
                let ns = self.lab.node(node).unwrap().ns.clone();
                let tool = if ip.is_ipv4() { "iptables-save" } else { "ip6tables-save" };
                let out = self.lab.exec(&ns, &[tool]).unwrap();
                String::from_utf8_lossy(&out.stdout).contains(&format!("{vip}/"))
            }
        }
    }

    /// In ebpf mode not one iptables rule of ours serves a Service (IPv4 or IPv6): the only ones left are
    /// NetworkPolicy's (TARTAN-POLICY and the per-pod TARTAN-PI/PE chains it jumps to).
    fn assert_no_service_rules(&self, node: &str) {
        let ns = self.lab.node(node).unwrap().ns.clone();
        for tool in ["iptables-save", "ip6tables-save"] {
            let save = String::from_utf8_lossy(&self.lab.exec(&ns, &[tool]).unwrap().stdout).into_owned();
            let service: Vec<&str> = save
                .lines()
                .filter(|l| l.starts_with("-A ") && l.contains("TARTAN-"))
                .filter(|l| {
                    !["TARTAN-POLICY", "TARTAN-PI-", "TARTAN-PE-", "TARTAN-MASQ-"].iter().any(|p| l.contains(p))
                })
                .collect();
            assert!(service.is_empty(), "{tool}: Service rules in ebpf mode: {service:?}");
        }
    }

    /// The interfaces `node`'s tc programs are attached to (ebpf mode), from their pinned links.
    fn tc_interfaces(&self, node: &str) -> Vec<String> {
        let links = self.lab.node_bpf_root(node).join("links");
        let mut out: Vec<String> = std::fs::read_dir(links)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("tartan_from_outside@").map(|n| n.replace("%2E", ".")))
            .collect();
        out.sort();
        out
    }

    fn iptables_save(&self, node: &str) -> String {
        let ns = self.lab.node(node).unwrap().ns.clone();
        String::from_utf8_lossy(&self.lab.exec(&ns, &["iptables-save"]).unwrap().stdout).into_owned()
    }

    fn apply(&self, yaml: &str) {
        let out = self.lab.tartanctl(&["apply", "-f", "-"], Some(yaml)).unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    /// A pod labelled app=`app` on `node`, serving TCP 8080 (named http) with its name and the peer address.
    fn server(&mut self, node: &str, name: &str, app: &str) -> String {
        self.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: {app}}}}}\nspec: {{containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]}}\n"
        ));
        let r = self.lab.add_pod(node, name, "default").unwrap();
        let ns = self.lab.pod(name).unwrap().ns.clone();
        let reply = format!("SYSTEM:echo {name} $SOCAT_PEERADDR");
        self.lab.spawn(&ns, &["socat", "TCP-LISTEN:8080,fork,reuseaddr", &reply]).unwrap();
        r["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().to_string()
    }

    fn client(&mut self, node: &str, name: &str) -> String {
        self.lab.add_pod(node, name, "default").unwrap();
        self.lab.pod(name).unwrap().ns.clone()
    }

    /// One TCP connection from `ns` to ip:port: what the server said, or the error.
    fn connect(&self, ns: &str, ip: &str, port: u16) -> Result<String, String> {
        let out = self
            .lab
            .exec_status(ns, &["socat", "-T", "2", "-u", &format!("TCP:{ip}:{port},connect-timeout=2"), "STDOUT"])
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }
}

fn cluster_ip_balances_over_pods_on_both_nodes_and_keeps_the_client_address(mode: &'static str) {
    let mut c = Cluster::in_mode("px-cip", mode);
    c.server("n1", "web-a", "web");
    c.server("n2", "web-b", "web");
    c.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.50, selector: {app: web}, ports: [{port: 80, targetPort: http}]}\n");
    let client = c.client("n1", "client");
    let client_ip = c.lab.pod("client").unwrap().ip.clone();
    assert!(wait_for(Duration::from_secs(5), || c.connect(&client, "10.96.0.50", 80).is_ok()), "service reachable");
    let mut seen = BTreeSet::new();
    for _ in 0..30 {
        let answer = c.connect(&client, "10.96.0.50", 80).expect("connect");
        let (server, peer) = answer.split_once(' ').unwrap();
        assert_eq!(peer, client_ip, "pod to pod through a service keeps the client's address");
        seen.insert(server.to_string());
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["web-a", "web-b"], "both endpoints, on both nodes");
    // From the other node's pods too.
    let far = c.client("n2", "client2");
    assert!(c.connect(&far, "10.96.0.50", 80).is_ok());
}

fn a_service_without_endpoints_refuses_at_once(mode: &'static str) {
    let mut c = Cluster::in_mode("px-rej", mode);
    c.apply("apiVersion: v1\nkind: Service\nmetadata: {name: empty}\nspec: {clusterIP: 10.96.0.60, selector: {app: nothing}, ports: [{port: 80}]}\n");
    let client = c.client("n1", "client");
    assert!(wait_for(Duration::from_secs(5), || c.programmed("n1", "10.96.0.60")));
    let t = std::time::Instant::now();
    let err = c.connect(&client, "10.96.0.60", 80).unwrap_err();
    assert!(err.contains("refused") || err.contains("unreachable"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(1), "rejected, not timed out: {:?}", t.elapsed());
}

fn node_ports_reach_pods_from_outside_with_both_traffic_policies(mode: &'static str) {
    let mut c = Cluster::in_mode("px-np", mode);
    c.server("n2", "web-b", "web");
    c.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {type: NodePort, selector: {app: web}, ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web-local}\nspec: {type: NodePort, externalTrafficPolicy: Local, selector: {app: web}, ports: [{port: 80, targetPort: 8080, nodePort: 30081}]}\n");
    let outside = c.lab.ns_name("outside");
    // Cluster: any node's address works, and the server sees the node (SNAT).
    assert!(wait_for(Duration::from_secs(5), || c.connect(&outside, "198.18.0.1", 30080).is_ok()));
    let via_n1 = c.connect(&outside, "198.18.0.1", 30080).unwrap();
    assert!(via_n1.starts_with("web-b ") && !via_n1.ends_with("198.18.0.254"), "SNAT to the node: {via_n1}");
    // Local: only the node with the endpoint answers, and the client's address is preserved.
    assert!(wait_for(Duration::from_secs(5), || c.connect(&outside, "198.18.0.2", 30081).is_ok()));
    assert_eq!(c.connect(&outside, "198.18.0.2", 30081).unwrap(), "web-b 198.18.0.254");
    assert!(c.connect(&outside, "198.18.0.1", 30081).is_err(), "no local endpoint on n1: dropped");
}

/// A load balancer's health checks (kube-proxy's healthCheckNodePort): every node answers on the port, 200 where the
/// Service has a local endpoint and 503 where it has none, so that the load balancer sends traffic only where
/// externalTrafficPolicy Local can deliver it.
fn health_check_node_ports_answer_with_the_local_endpoint_count(mode: &'static str) {
    let mut c = Cluster::in_mode("px-hc", mode);
    c.server("n2", "web-b", "web");
    c.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web-lb}\nspec: {type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 30086, selector: {app: web}, ports: [{port: 80, targetPort: 8080, nodePort: 30085}]}\nstatus: {loadBalancer: {ingress: [{ip: 198.18.6.7}]}}\n");
    let outside = c.lab.ns_name("outside");
    let probe = |c: &Cluster, node: &str| tartan_e2e::http_get(&c.lab, &outside, &format!("http://{node}:30086/"));
    let body = |n: usize| {
        format!(
            r#"{{"service":{{"namespace":"default","name":"web-lb"}},"localEndpoints":{n},"serviceProxyHealthy":true}}"#
        )
    };
    // n2 holds web-b; n1 has nothing of the Service's.
    assert!(
        wait_for(Duration::from_secs(5), || probe(&c, "198.18.0.2") == (200, body(1))),
        "n2: {:?}",
        probe(&c, "198.18.0.2")
    );
    assert!(
        wait_for(Duration::from_secs(5), || probe(&c, "198.18.0.1") == (503, body(0))),
        "n1: {:?}",
        probe(&c, "198.18.0.1")
    );
    // The node port itself answers only where the endpoint is, which is what the health checks tell.
    assert!(wait_for(Duration::from_secs(5), || c.connect(&outside, "198.18.0.2", 30085).is_ok()));
    // The load-balancer IP, routed to n2 (as a load balancer that follows the health checks would): the server
    // sees the client's own address (externalTrafficPolicy Local).
    c.lab.exec(&outside, &["ip", "route", "add", "198.18.6.7", "via", "198.18.0.2"]).unwrap();
    assert!(wait_for(Duration::from_secs(5), || c.connect(&outside, "198.18.6.7", 80).is_ok()));
    assert_eq!(c.connect(&outside, "198.18.6.7", 80).unwrap(), "web-b 198.18.0.254");
    // Its endpoint gone, n2 turns unhealthy too, on the port it keeps serving.
    c.lab.del_pod("web-b").unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || probe(&c, "198.18.0.2") == (503, body(0))),
        "n2 after the pod went: {:?}",
        probe(&c, "198.18.0.2")
    );
}

/// Traffic from the lab's outside host beyond TCP to a pod: UDP through a node port (to a pod on another node and
/// to one on the node itself), a UDP flow moving when its endpoint goes, ICMP errors of translated flows reaching
/// the client (a backend's "port unreachable", the node's "fragmentation needed" towards the vxlan MTU), a bulk
/// TCP transfer through the tunnel, and a node port without endpoints refused.
fn traffic_from_outside_udp_icmp_mtu_and_refusals(mode: &'static str) {
    let mut c = Cluster::in_mode("px-out", mode);
    c.dns_service("10.96.3.53");
    // dns-b (n2) is also labelled side=far, and counts bytes on TCP 9000; nothing listens on UDP 5354 anywhere.
    c.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: dns-b, labels: {app: dns, side: far}}\nspec: {containers: [{name: c, ports: [{name: dns, containerPort: 5353, protocol: UDP}]}]}\n");
    let b = c.lab.pod("dns-b").unwrap().ns.clone();
    c.lab.spawn(&b, &["socat", "TCP-LISTEN:9000,fork,reuseaddr", "SYSTEM:wc -c"]).unwrap();
    c.apply("apiVersion: v1\nkind: Service\nmetadata: {name: dns-np}\nspec: {type: NodePort, selector: {app: dns}, ports: [{name: dns, port: 53, protocol: UDP, targetPort: 5353, nodePort: 30053}, {name: closed, port: 54, protocol: UDP, targetPort: 5354, nodePort: 30054}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: far}\nspec: {type: NodePort, selector: {side: far}, ports: [{name: dns, port: 53, protocol: UDP, targetPort: 5353, nodePort: 30055}, {name: bulk, port: 9000, targetPort: 9000, nodePort: 30900}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: none}\nspec: {type: NodePort, selector: {app: nothing}, ports: [{port: 80, nodePort: 30099}]}\n");
    let outside = c.lab.ns_name("outside");
    // From one source port: one flow, as a long-lived UDP client has.
    let ask_from = |c: &Cluster, node_port: u16, source: u16| -> Option<String> {
        let cmd = format!("echo q | socat -T1 - UDP:198.18.0.1:{node_port},sourceport={source},reuseaddr");
        let out = c.lab.exec_status(&outside, &["sh", "-c", &cmd]).unwrap();
        let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (!s.is_empty()).then_some(s)
    };
    assert!(wait_for(Duration::from_secs(5), || ask_from(&c, 30053, 40053).is_some()), "UDP through the node port");
    // Both endpoints answer across flows (n1's own and n2's).
    let seen: BTreeSet<String> = (41000..41040).filter_map(|p| ask_from(&c, 30053, p)).collect();
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["dns-a", "dns-b"], "a local and a remote endpoint");
    // A backend's ICMP port unreachable reaches the client's connected socket as ECONNREFUSED, and a datagram too
    // big for the vxlan MTU (1450), fragmentation forbidden, has the client learn the path MTU from the node's
    // "fragmentation needed": both ICMP errors translated back to the node port's flow.
    let script = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO
s.connect(("198.18.0.1", int(sys.argv[1])))
s.settimeout(0.3)
for i in range(30):
    try:
        s.send(b"x" * int(sys.argv[2]))
        s.recv(2000)
    except socket.timeout:
        pass
    except OSError as e:
        # EMSGSIZE: the path MTU learned is below this datagram.
        if e.errno == 90:
            print("mtu", s.getsockopt(socket.IPPROTO_IP, 14))
        else:
            print("errno", e.errno)
        break
    mtu = s.getsockopt(socket.IPPROTO_IP, 14)  # IP_MTU
    if mtu < 1500:
        print("mtu", mtu)
        break
"#;
    let run = |port: &str, size: &str| {
        let out = c.lab.exec_status(&outside, &["python3", "-c", script, port, size]).unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(run("30054", "10"), "errno 111", "port unreachable from the pod, translated back");
    assert!(wait_for(Duration::from_secs(5), || ask_from(&c, 30055, 40055).is_some()));
    assert_eq!(run("30055", "1472"), "mtu 1450", "fragmentation needed, translated back");
    // A megabyte through the tunnel, both directions of the connection translated.
    let bulk = "head -c 1000000 /dev/zero | socat -t 5 -T 5 - TCP:198.18.0.1:30900,connect-timeout=2";
    let out = c.lab.exec_status(&outside, &["sh", "-c", bulk]).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1000000", "{}", String::from_utf8_lossy(&out.stderr));
    // The flow keeps its endpoint, then moves when it goes.
    let ask = |c: &Cluster| (0..3).find_map(|_| ask_from(c, 30053, 40053));
    let first = ask(&c).unwrap();
    assert_eq!(ask(&c).as_deref(), Some(first.as_str()), "one flow, one endpoint");
    c.lab.del_pod(&first).unwrap();
    let other = if first == "dns-a" { "dns-b" } else { "dns-a" };
    assert!(
        wait_for(Duration::from_secs(5), || ask_from(&c, 30053, 40053).as_deref() == Some(other)),
        "the flow moved to {other}"
    );
    // A node port without endpoints is refused at once.
    let t = std::time::Instant::now();
    let err = c.connect(&outside, "198.18.0.1", 30099).unwrap_err();
    assert!(err.contains("refused"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(1), "refused, not timed out: {:?}", t.elapsed());
    if mode == "ebpf" {
        c.assert_no_service_rules("n1");
        c.assert_no_service_rules("n2");
    }
}

fn cleanup_removes_every_rule_of_ours_and_nothing_else(mode: &'static str) {
    let mut c = Cluster::in_mode("px-clean", mode);
    c.server("n1", "web-a", "web");
    c.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.70, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n");
    let n1 = c.lab.node("n1").unwrap().ns.clone();
    let save = |lab: &Lab| String::from_utf8_lossy(&lab.exec(&n1, &["iptables-save"]).unwrap().stdout).into_owned();
    assert!(wait_for(Duration::from_secs(5), || c.programmed("n1", "10.96.0.70")));
    // Stopping n1's proxy leaves its rules (a restart keeps connections); --cleanup removes them.
    c.lab.stop(c.proxies[0]);
    std::thread::sleep(Duration::from_millis(200));
    assert!(c.programmed("n1", "10.96.0.70"), "a stop removes nothing");
    let bpf_root = c.lab.node_bpf_root("n1");
    let cgroup = c.lab.node_cgroup("n1");
    let proxy = netns_lab::cni::tartan_bin_dir().join("tartan-proxy");
    let mut cleanup = c.lab.cmd(&n1, &proxy).unwrap();
    cleanup.args(["--cleanup", "--mode", mode, "--bpf-root"]).arg(&bpf_root).arg("--cgroup-root").arg(&cgroup);
    let out = cleanup.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // No program, map, link or pin of ours is left on n1 (n2's proxy keeps its own).
    assert!(!bpf_root.exists(), "the pins are gone");
    let listed = |what: &str| {
        let out = std::process::Command::new("bpftool").args(["-j", what, "show"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let attached = std::process::Command::new("bpftool").args(["-j", "cgroup", "show"]).arg(&cgroup).output().unwrap();
    let attached = String::from_utf8_lossy(&attached.stdout).into_owned();
    assert!(!attached.contains("tartan_"), "nothing attached to n1's cgroup: {attached}");
    if mode == "ebpf" {
        // n2's proxy still runs its own: exactly one node's worth of programs and maps remains in this lab... and
        // other runs may hold theirs, so count what n2's pins account for.
        let n2_maps = c.lab.node_bpf_root("n2");
        assert!(n2_maps.join("TARTAN_SVC").exists());
        assert!(!listed("link").is_empty());
    }
    let after = save(&c.lab);
    let ours: Vec<&str> = after.lines().filter(|l| l.contains("TARTAN-") && !l.contains("TARTAN-MASQ-")).collect();
    assert!(ours.is_empty(), "{ours:?}");
    assert!(
        after.contains("-A FLANNEL-POSTRTG") && after.contains("-A FLANNEL-FWD"),
        "the agent's rules stay: {after}"
    );
}

fn affinity_hairpin_and_metrics(mode: &'static str) {
    let mut c = Cluster::in_mode("px-aff", mode);
    c.server("n1", "web-a", "web");
    c.server("n2", "web-b", "web");
    c.apply("apiVersion: v1\nkind: Service\nmetadata: {name: sticky}\nspec: {type: NodePort, clusterIP: 10.96.0.80, sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}, selector: {app: web}, ports: [{port: 80, targetPort: http, nodePort: 30083}]}\n");
    let client = c.client("n1", "client");
    assert!(wait_for(Duration::from_secs(5), || c.connect(&client, "10.96.0.80", 80).is_ok()));
    let first = c.connect(&client, "10.96.0.80", 80).unwrap();
    for _ in 0..10 {
        assert_eq!(c.connect(&client, "10.96.0.80", 80).unwrap(), first, "ClientIP affinity keeps the endpoint");
    }
    // The same for a client outside the cluster, through a node port.
    let outside = c.lab.ns_name("outside");
    assert!(wait_for(Duration::from_secs(5), || c.connect(&outside, "198.18.0.1", 30083).is_ok()));
    let first = c.connect(&outside, "198.18.0.1", 30083).unwrap();
    for _ in 0..10 {
        assert_eq!(c.connect(&outside, "198.18.0.1", 30083).unwrap(), first, "affinity from outside");
    }
    // Hairpin: a pod reaching itself through a service. Not through `sticky`: its affinity would pin web-a to
    // whichever endpoint it drew first. Through a service without affinity, try until it lands on itself.
    c.apply("apiVersion: v1\nkind: Service\nmetadata: {name: plain}\nspec: {type: NodePort, clusterIP: 10.96.0.81, selector: {app: web}, ports: [{port: 80, targetPort: http, nodePort: 30082}]}\n");
    let web_a = c.lab.pod("web-a").unwrap().ns.clone();
    assert!(wait_for(Duration::from_secs(5), || c.connect(&web_a, "10.96.0.81", 80).is_ok()));
    let own = (0..40).filter_map(|_| c.connect(&web_a, "10.96.0.81", 80).ok()).any(|a| a.starts_with("web-a "));
    assert!(own, "web-a reached itself through 10.96.0.81");
    // And through the node port on its own node's address.
    assert!(wait_for(Duration::from_secs(5), || c.connect(&web_a, "198.18.0.1", 30082).is_ok()));
    let own = (0..40).filter_map(|_| c.connect(&web_a, "198.18.0.1", 30082).ok()).any(|a| a.starts_with("web-a "));
    assert!(own, "web-a reached itself through its node's port 30082");
    // Pod status updates may still be on their way to a sync: wait until nothing is pending.
    let settled = || {
        let m = tartan_e2e::proxy_metrics(&c.lab, "n1");
        tartan_e2e::metric(&m, "kubeproxy_sync_proxy_rules_service_changes_pending") == Some(0.0)
            && tartan_e2e::metric(&m, "tartan_proxy_service_ports") == Some(2.0)
    };
    assert!(wait_for(Duration::from_secs(5), settled), "{}", tartan_e2e::proxy_metrics(&c.lab, "n1"));
    let m = tartan_e2e::proxy_metrics(&c.lab, "n1");
    let syncs = tartan_e2e::metric(&m, &format!("tartan_proxy_sync_total{{mode=\"{mode}\"}}")).unwrap();
    let timed =
        tartan_e2e::metric(&m, &format!("kubeproxy_sync_proxy_rules_duration_seconds_count{{mode=\"{mode}\"}}"))
            .unwrap();
    assert!(syncs >= 1.0 && timed == syncs, "{m}");
    // At least a frontend and two backends per cluster IP (iptables: chains and rules, many more).
    assert!(tartan_e2e::metric(&m, "tartan_proxy_dataplane_entries").unwrap() >= 6.0, "{m}");
    assert_eq!(tartan_e2e::metric(&m, "tartan_proxy_service_ports"), Some(2.0), "{m}");
    if mode == "ebpf" {
        // 8 socket programs, ingress and egress on each interface with a node address (eth0, cni0, flannel.1), and
        // the policy programs on each pod's veth.
        let pods = std::fs::read_dir(c.lab.node_bpf_root("n1").join("links"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("tartan_from_pod@"))
            .count();
        assert!(pods >= 2, "the client and the server pods' veths");
        assert_eq!(tartan_e2e::metric(&m, "tartan_proxy_bpf_programs"), Some((14 + 2 * pods) as f64), "{m}");
        assert_eq!(tartan_e2e::metric(&m, "tartan_proxy_conntrack_max"), Some(262144.0), "{m}");
    }
}

fn a_udp_client_moves_to_a_live_endpoint_when_its_endpoint_goes(mode: &'static str) {
    let mut c = Cluster::in_mode("px-udp", mode);
    c.dns_service("10.96.0.53");
    let client = c.client("n1", "client");
    // Always the same source port: one conntrack entry, as a long-lived UDP client has.
    let ask = |c: &Cluster| -> Option<String> {
        let out = c
            .lab
            .exec_status(&client, &["sh", "-c", "echo q | socat -T1 - UDP:10.96.0.53:53,sourceport=40053,reuseaddr"])
            .unwrap();
        let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (!s.is_empty()).then_some(s)
    };
    assert!(wait_for(Duration::from_secs(5), || ask(&c).is_some()));
    // A reply can take over socat's 1 s under load (the server forks a shell per datagram): ask again then.
    let ask_again = |c: &Cluster| (0..3).find_map(|_| ask(c));
    let first = ask_again(&c).unwrap();
    if mode == "iptables" {
        // A datagram flow is a conntrack entry: the same source port keeps its endpoint. (With socket load
        // balancing every new socket is balanced again.)
        assert_eq!(ask_again(&c).as_deref(), Some(first.as_str()), "one conntrack entry, one endpoint");
    }
    c.lab.del_pod(&first).unwrap();
    let other = if first == "dns-a" { "dns-b" } else { "dns-a" };
    let t = std::time::Instant::now();
    assert!(wait_for(Duration::from_secs(3), || ask(&c).as_deref() == Some(other)), "moved to {other}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[test]
fn rules_removed_by_hand_are_rewritten() {
    let mut c = Cluster::new("px-fix");
    c.server("n2", "web-b", "web");
    c.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.90, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n");
    let client = c.client("n1", "client");
    assert!(wait_for(Duration::from_secs(5), || c.connect(&client, "10.96.0.90", 80).is_ok()));
    let n1 = c.lab.node("n1").unwrap().ns.clone();
    let full_syncs = || n1_metric(&c, "tartan_proxy_full_sync_total");
    let before = full_syncs();
    // What a firewall reload does: every chain of the table gone. (Not checked by connecting in between: the
    // repair can land before such a check would.)
    c.lab.exec(&n1, &["iptables", "-t", "nat", "-F"]).unwrap();
    c.lab.exec(&n1, &["iptables", "-t", "nat", "-X"]).unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || full_syncs() > before && c.connect(&client, "10.96.0.90", 80).is_ok()),
        "repaired by a full sync"
    );
}

fn the_node_itself_external_ips_load_balancer_ips_and_internal_local_policy(mode: &'static str) {
    let mut c = Cluster::in_mode("px-ext", mode);
    c.server("n1", "web-a", "web");
    c.server("n2", "web-b", "web");
    c.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.1.10, externalIPs: [198.18.5.5], selector: {app: web}, ports: [{port: 80, targetPort: http}]}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: lb}\nspec: {type: LoadBalancer, selector: {app: web}, ports: [{port: 80, targetPort: http}]}\nstatus: {loadBalancer: {ingress: [{ip: 198.18.6.6}]}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: near}\nspec: {clusterIP: 10.96.1.11, internalTrafficPolicy: Local, selector: {app: web}, ports: [{port: 80, targetPort: http}]}\n",
    );
    let (n1, outside) = (c.lab.node("n1").unwrap().ns.clone(), c.lab.ns_name("outside"));
    // A real node has a default route; the lab's get one here so that a cluster IP is routable from the node.
    c.lab.exec(&n1, &["ip", "route", "add", "default", "via", "198.18.0.254"]).unwrap();
    assert!(wait_for(Duration::from_secs(5), || c.connect(&n1, "10.96.1.10", 80).is_ok()), "from the node itself");
    // The network routes the external and load-balancer addresses to a node (as a router or MetalLB would).
    for ip in ["198.18.5.5", "198.18.6.6"] {
        c.lab.exec(&outside, &["ip", "route", "add", ip, "via", "198.18.0.1"]).unwrap();
        assert!(wait_for(Duration::from_secs(5), || c.connect(&outside, ip, 80).is_ok()), "{ip} from outside");
    }
    let client = c.client("n1", "client");
    for _ in 0..10 {
        let a = c.connect(&client, "10.96.1.11", 80).unwrap();
        assert!(a.starts_with("web-a "), "internalTrafficPolicy Local: only n1's endpoint: {a}");
    }
}

fn a_proxy_restart_does_not_interrupt_service_traffic(mode: &'static str) {
    let mut c = Cluster::in_mode("px-restart", mode);
    c.server("n2", "web-b", "web");
    c.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {type: NodePort, clusterIP: 10.96.0.95, selector: {app: web}, ports: [{port: 80, targetPort: 8080, nodePort: 30095}]}\n");
    let client = c.client("n1", "client");
    let outside = c.lab.ns_name("outside");
    assert!(wait_for(Duration::from_secs(5), || c.connect(&client, "10.96.0.95", 80).is_ok()));
    assert!(wait_for(Duration::from_secs(5), || c.connect(&outside, "198.18.0.1", 30095).is_ok()));
    // A new connection every 50 ms across the restart, from a pod to the cluster IP and from outside to n1's node
    // port (its endpoint on n2: translated both ways by n1).
    let prober = c.probe_loop(&client, "10.96.0.95", 80, 40);
    let from_outside = c.probe_loop(&outside, "198.18.0.1", 30095, 40);
    std::thread::sleep(Duration::from_millis(500));
    c.lab.stop(c.proxies[0]);
    c.proxies[0] = c.start_proxy("n1", &[]);
    let failures = probe_failures(prober);
    assert!(failures.is_empty(), "{failures:?}");
    let failures = probe_failures(from_outside);
    assert!(failures.is_empty(), "from outside: {failures:?}");
    let log = std::fs::read_to_string(c.lab.node("n1").unwrap().root.join("proxy.log")).unwrap();
    assert!(!log.contains("sync failed"), "no failed sync: {log}");
}

fn several_ports_per_service_and_a_not_ready_pod_gets_no_new_connections(mode: &'static str) {
    let mut c = Cluster::in_mode("px-ports", mode);
    c.server("n1", "web-a", "web");
    c.server("n2", "web-b", "web");
    // A second port in each pod, answering differently.
    for name in ["web-a", "web-b"] {
        let ns = c.lab.pod(name).unwrap().ns.clone();
        c.lab.spawn(&ns, &["socat", "TCP-LISTEN:8081,fork,reuseaddr", &format!("SYSTEM:echo admin-{name}")]).unwrap();
    }
    c.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.2.10, selector: {app: web}, ports: [{name: http, port: 80, targetPort: http}, {name: admin, port: 81, targetPort: 8081}]}\n");
    let client = c.client("n1", "client");
    assert!(wait_for(Duration::from_secs(5), || c.connect(&client, "10.96.2.10", 81).is_ok()));
    assert!(c.connect(&client, "10.96.2.10", 80).unwrap().starts_with("web-"));
    assert!(c.connect(&client, "10.96.2.10", 81).unwrap().starts_with("admin-web-"));
    // web-b stops being ready: new connections go to web-a only.
    c.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: web-b, labels: {app: web}}\nspec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}\nstatus: {phase: Running, conditions: [{type: Ready, status: \"False\"}]}\n");
    let only_a = || (0..12).all(|_| c.connect(&client, "10.96.2.10", 80).is_ok_and(|a| a.starts_with("web-a ")));
    assert!(wait_for(Duration::from_secs(5), only_a), "not-ready web-b gets no new connections");
}

/// The agent's masquerade rules (FLANNEL-POSTRTG) and the proxy's (mark 0x4000) together, on the backends the other
/// tests do not use: pod to pod through a service keeps the client's address, a NodePort from outside reaches a pod
/// on the other node (SNAT to the node), and the agent still masquerades pod traffic leaving the cluster.
fn services_work_with_the_agents_masquerade_on_every_backend(mode: &'static str) {
    for (i, backend) in [Backend::HostGw, Backend::Udp, Backend::VxlanDirect].into_iter().enumerate() {
        let mut c = Cluster::with(&format!("px-be{i}"), mode, backend, &[]);
        c.server("n2", "web-b", "web");
        c.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {type: NodePort, clusterIP: 10.96.0.40, selector: {app: web}, ports: [{port: 80, targetPort: http, nodePort: 30040}]}\n");
        let client = c.client("n1", "client");
        let client_ip = c.lab.pod("client").unwrap().ip.clone();
        assert!(
            wait_for(Duration::from_secs(5), || c.connect(&client, "10.96.0.40", 80).is_ok()),
            "{backend:?}: cluster IP"
        );
        assert_eq!(c.connect(&client, "10.96.0.40", 80).unwrap(), format!("web-b {client_ip}"), "{backend:?}");
        let outside = c.lab.ns_name("outside");
        assert!(wait_for(Duration::from_secs(5), || c.connect(&outside, "198.18.0.1", 30040).is_ok()), "{backend:?}");
        let via_n1 = c.connect(&outside, "198.18.0.1", 30040).unwrap();
        assert!(via_n1.starts_with("web-b ") && !via_n1.ends_with("198.18.0.254"), "{backend:?}: SNAT: {via_n1}");
        // Pod traffic leaving the cluster is still the agent's to masquerade: the outside sees node n1's address.
        c.lab
            .spawn(&outside, &["socat", "TCP-LISTEN:9000,fork,reuseaddr", "SYSTEM:echo outside $SOCAT_PEERADDR"])
            .unwrap();
        assert!(wait_for(Duration::from_secs(3), || c.connect(&client, "198.18.0.254", 9000).is_ok()));
        assert_eq!(c.connect(&client, "198.18.0.254", 9000).unwrap(), "outside 198.18.0.1", "{backend:?}");
        let save = c.iptables_save("n1");
        assert!(save.contains("-A FLANNEL-POSTRTG"), "{backend:?}");
        if mode == "iptables" {
            assert!(save.contains("-A TARTAN-POSTROUTING"), "{backend:?}");
        } else {
            c.assert_no_service_rules("n1");
        }
    }
}

fn headless_and_external_name_services_get_no_rules_and_node_ports_honour_nodeport_addresses(mode: &'static str) {
    let mut c = Cluster::with("px-misc", mode, Backend::Vxlan, &["--nodeport-addresses", "198.18.0.0/24"]);
    c.server("n1", "web-a", "web");
    c.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {type: NodePort, clusterIP: 10.96.0.30, selector: {app: web}, ports: [{port: 80, targetPort: http, nodePort: 30030}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: hl}\nspec: {clusterIP: None, selector: {app: web}, ports: [{port: 80, targetPort: http}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec: {type: ExternalName, externalName: db.example.com}\n");
    let outside = c.lab.ns_name("outside");
    assert!(wait_for(Duration::from_secs(5), || c.connect(&outside, "198.18.0.1", 30030).is_ok()));
    let save = c.iptables_save("n1");
    assert!(c.programmed("n1", "10.96.0.30"), "the ordinary service is programmed");
    for name in ["default/hl", "default/ext", "db.example.com"] {
        assert!(!save.contains(name), "{name} has rules:\n{save}");
    }
    // Node ports answer on the underlay addresses only: not on the node's pod-network gateway (cni0, 10.244.x.1).
    let client = c.client("n2", "client");
    let gw = c.lab.pod("web-a").unwrap().ip.rsplit_once('.').unwrap().0.to_string() + ".1";
    assert!(c.connect(&client, "198.18.0.1", 30030).is_ok(), "a pod reaches the node port on the node's address");
    assert!(c.connect(&client, &gw, 30030).is_err(), "but not on {gw}, outside --nodeport-addresses");
    if c.mode == "iptables" {
        assert!(
            save.lines().any(|l| l.contains("-d 198.18.0.0/24") && l.contains("--dst-type LOCAL -j TARTAN-NODEPORTS")),
            "{save}"
        );
    } else {
        // The tc programs sit on the underlay interface only (the one holding 198.18.0.1), not on cni0 or the
        // vxlan device.
        let on = c.tc_interfaces("n1");
        assert_eq!(on.len(), 1, "{on:?}");
        let n1 = c.lab.node("n1").unwrap().ns.clone();
        let addr = c.lab.exec(&n1, &["ip", "-o", "-4", "addr", "show", "dev", &on[0]]).unwrap();
        assert!(String::from_utf8_lossy(&addr.stdout).contains("198.18.0.1/"), "{on:?}");
        c.assert_no_service_rules("n1");
    }
}

/// n1's proxy metrics and one series of them.
fn n1_metric(c: &Cluster, series: &str) -> f64 {
    tartan_e2e::metric(&tartan_e2e::proxy_metrics(&c.lab, "n1"), series).unwrap_or(0.0)
}

/// The sets of `kind` (`PS`, `NB`, `NP`) in n1.
fn n1_sets(c: &Cluster, kind: &str) -> Vec<String> {
    let n1 = c.lab.node("n1").unwrap().ns.clone();
    let out = c.lab.exec(&n1, &["ipset", "list", "-n"]).unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(&format!("TARTAN-{kind}-")))
        .map(String::from)
        .collect()
}

const FRIENDS_ONLY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: friends-only}\nspec: {podSelector: {matchLabels: {app: web}}, ingress: [{from: [{podSelector: {matchLabels: {role: friend}}}]}]}\n";

#[test]
fn a_sync_that_fails_half_way_is_followed_by_a_full_one_that_repairs_everything() {
    // The failure: an unused set cannot be destroyed because something else still refers to it (here a chain
    // of someone else's), after the sync's rules were already written. Before the fix the proxy kept believing
    // the kernel held the previous sync's rules, so re-applying the policy computed a partial payload against a
    // base the kernel no longer had (its ingress chain had been deleted) and failed until the 30 s full sync.
    let mut c = Cluster::new("px-half");
    let web = c.server("n1", "web-a", "web");
    let client = c.client("n1", "client");
    assert!(wait_for(Duration::from_secs(5), || c.connect(&client, &web, 8080).is_ok()));
    c.apply(FRIENDS_ONLY);
    assert!(wait_for(Duration::from_secs(5), || c.connect(&client, &web, 8080).is_err()), "the policy holds");
    let set = n1_sets(&c, "PS").pop().expect("the selector's set");
    let n1 = c.lab.node("n1").unwrap().ns.clone();
    for argv in [
        vec!["iptables", "-w", "-N", "SOMEONE-ELSES"],
        vec!["iptables", "-w", "-A", "SOMEONE-ELSES", "-m", "set", "--match-set", &set, "src", "-j", "RETURN"],
    ] {
        assert!(c.lab.exec_status(&n1, &argv).unwrap().status.success(), "{argv:?}");
    }
    let errors = r#"tartan_proxy_sync_errors_total{mode="iptables",kind="sets"}"#;
    let full_before = n1_metric(&c, "tartan_proxy_full_sync_total");
    let out = c.lab.tartanctl(&["delete", "netpol", "friends-only", "-n", "default"], None).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(wait_for(Duration::from_secs(5), || n1_metric(&c, errors) >= 1.0), "the destroy failed the sync");
    // The policy comes back while the set is still held: the next sync must be full and rebuild the chains.
    c.apply(FRIENDS_ONLY);
    assert!(
        wait_for(Duration::from_secs(5), || {
            let filter = c.iptables_save("n1");
            filter.contains(":TARTAN-PI-") && c.connect(&client, &web, 8080).is_err()
        }),
        "policy back in the kernel within 5 s"
    );
    assert!(n1_metric(&c, "tartan_proxy_full_sync_total") > full_before, "repaired by a full sync");
    // Once nothing else holds the set, deleting the policy removes it.
    c.lab.exec(&n1, &["iptables", "-w", "-F", "SOMEONE-ELSES"]).unwrap();
    c.lab.exec(&n1, &["iptables", "-w", "-X", "SOMEONE-ELSES"]).unwrap();
    let out = c.lab.tartanctl(&["delete", "netpol", "friends-only", "-n", "default"], None).unwrap();
    assert!(out.status.success());
    assert!(wait_for(Duration::from_secs(5), || n1_sets(&c, "PS").is_empty()), "the set is gone");
    assert!(c.connect(&client, &web, 8080).is_ok());
}

fn values_that_are_not_valid_objects_are_reported_and_skipped(mode: &'static str) {
    let mut c = Cluster::in_mode("px-bad", mode);
    c.server("n2", "web-b", "web");
    let client = c.client("n1", "client");
    // Written straight into etcd by a buggy or newer client: not JSON, an object at another object's key, and
    // a Service the API server would refuse.
    c.lab.etcdctl(&["put", "/tartan/services/default/garbage", "{\"kind\": \"Service\", "]).unwrap();
    c.lab.etcdctl(&["put", "/tartan/services/default/misplaced", r#"{"kind":"Service","apiVersion":"v1","metadata":{"name":"other","namespace":"default"},"spec":{"clusterIP":"10.96.0.97","ports":[{"port":80}]}}"#]).unwrap();
    c.lab.etcdctl(&["put", "/tartan/services/default/invalid", r#"{"kind":"Service","apiVersion":"v1","metadata":{"name":"invalid","namespace":"default"},"spec":{"clusterIP":"10.96.0.98","ports":[{"port":70000}]}}"#]).unwrap();
    c.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.95, selector: {app: web}, ports: [{port: 80, targetPort: http}]}\n");
    assert!(
        wait_for(Duration::from_secs(5), || c.connect(&client, "10.96.0.95", 80).is_ok()),
        "programmed all the same"
    );
    assert!(wait_for(Duration::from_secs(5), || n1_metric(&c, "tartan_proxy_invalid_objects_total") >= 3.0));
    let log = std::fs::read_to_string(c.lab.node("n1").unwrap().root.join("proxy.log")).unwrap();
    assert!(log.contains("/tartan/services/default/garbage"), "the key is named: {log}");
    assert!(!c.iptables_save("n1").contains("10.96.0.97") && !c.iptables_save("n1").contains("10.96.0.98"));
    // A proxy starting with those values in its first listing starts all the same.
    let old = c.proxies[0];
    c.lab.stop(old);
    c.proxies[0] = c.start_proxy("n1", &[]);
    c.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web2}\nspec: {clusterIP: 10.96.0.96, selector: {app: web}, ports: [{port: 80, targetPort: http}]}\n");
    assert!(wait_for(Duration::from_secs(5), || c.connect(&client, "10.96.0.96", 80).is_ok()));
    let n1 = c.lab.node("n1").unwrap().ns.clone();
    assert_eq!(tartan_e2e::http_get(&c.lab, &n1, "http://127.0.0.1:10249/readyz").0, 200);
}

fn service_traffic_survives_an_etcd_pause_and_changes_after_it_land_within_5s(mode: &'static str) {
    let mut c = Cluster::in_mode("px-pause", mode);
    c.server("n2", "web-b", "web");
    c.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.70, selector: {app: web}, ports: [{port: 80, targetPort: http}]}\n");
    let client = c.client("n1", "client");
    assert!(wait_for(Duration::from_secs(5), || c.connect(&client, "10.96.0.70", 80).is_ok()));
    let n1 = c.lab.node("n1").unwrap().ns.clone();
    c.lab.signal_etcd(libc::SIGSTOP).unwrap();
    let paused = std::time::Instant::now();
    let mut tries = 0;
    while paused.elapsed() < Duration::from_secs(15) {
        assert!(c.connect(&client, "10.96.0.70", 80).is_ok(), "service traffic while etcd is paused");
        assert_eq!(tartan_e2e::http_get(&c.lab, &n1, "http://127.0.0.1:10249/healthz").0, 200, "nothing pending");
        tries += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    c.lab.signal_etcd(libc::SIGCONT).unwrap();
    assert!(tries > 10);
    assert!(wait_for(Duration::from_secs(10), || c.lab.etcdctl(&["endpoint", "health"]).is_ok()));
    c.apply("apiVersion: v1\nkind: Service\nmetadata: {name: after}\nspec: {clusterIP: 10.96.0.71, selector: {app: web}, ports: [{port: 80, targetPort: http}]}\n");
    let t = std::time::Instant::now();
    assert!(wait_for(Duration::from_secs(5), || c.connect(&client, "10.96.0.71", 80).is_ok()), "after the pause");
    eprintln!("a change after the pause reached the kernel in {:?}", t.elapsed());
    assert!(n1_metric(&c, "tartan_proxy_store_errors_total") >= 1.0, "the outage was seen and counted");
}

#[test]
fn policy_does_not_fail_open_when_bridge_netfilter_is_turned_off() {
    let mut c = Cluster::new("px-brnf");
    let web = c.server("n1", "web-a", "web");
    let client = c.client("n1", "client");
    c.apply(FRIENDS_ONLY);
    assert!(wait_for(Duration::from_secs(5), || c.connect(&client, &web, 8080).is_err()), "denied on one bridge");
    let n1 = c.lab.node("n1").unwrap().ns.clone();
    let read = || {
        let out = c.lab.exec(&n1, &["cat", "/proc/sys/net/bridge/bridge-nf-call-iptables"]).unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    c.lab.exec(&n1, &["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0"]).unwrap();
    assert!(
        wait_for(Duration::from_secs(3), || read() == "1"
            && n1_metric(&c, r#"tartan_proxy_repairs_total{mode="iptables",kind="bridge-nf"}"#) >= 1.0),
        "turned back on and counted"
    );
    assert!(c.connect(&client, &web, 8080).is_err(), "still denied");
}

fn dual_stack_services_get_a_cluster_ip_per_family_and_work_over_both(mode: &'static str) {
    let mut lab = Lab::new("px-ds").expect("lab");
    lab.build_cluster_with(2, &Backend::Vxlan.dual_stack_config(), 1).expect("cluster");
    lab.etcdctl(&["put", "/tartan/config", r#"{"serviceCIDR": "10.96.0.0/12,fd00:10:96::/112"}"#]).unwrap();
    let proxies: Vec<u32> = ["n1", "n2"]
        .iter()
        .map(|n| lab.start_proxy(n, &["--mode", mode, "--cluster-cidr", netns_lab::cluster::POD_NET_V6]).unwrap())
        .collect();
    let mut c = Cluster { lab, proxies, mode };
    let mut v6_of = std::collections::BTreeMap::new();
    for (node, name) in [("n1", "web-a"), ("n2", "web-b"), ("n1", "client")] {
        if name != "client" {
            c.apply(&format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: web}}}}\nspec: {{containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]}}\n"));
        }
        let r = c.lab.add_pod(node, name, "default").unwrap();
        v6_of.insert(name, tartan_e2e::result_ip(&r, 6));
        if name != "client" {
            let ns = c.lab.pod(name).unwrap().ns.clone();
            let reply = format!("SYSTEM:echo {name} $SOCAT_PEERADDR");
            c.lab.spawn(&ns, &["socat", "TCP6-LISTEN:8080,ipv6only=0,fork,reuseaddr", &reply]).unwrap();
        }
    }
    c.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {type: NodePort, ipFamilyPolicy: RequireDualStack, selector: {app: web}, ports: [{port: 80, targetPort: http, nodePort: 30090}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: none6}\nspec: {ipFamilies: [IPv6], selector: {app: nothing}, ports: [{port: 80}]}\n");
    let out = c.lab.tartanctl(&["get", "svc", "web", "-o", "json"], None).unwrap();
    let svc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ips: Vec<String> =
        svc["spec"]["clusterIPs"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    assert_eq!(ips.len(), 2, "{svc}");
    assert!(ips[0].starts_with("10.") && ips[1].starts_with("fd00:10:96::"), "{ips:?}");
    assert_eq!(svc["spec"]["ipFamilies"], serde_json::json!(["IPv4", "IPv6"]));
    let client = c.lab.pod("client").unwrap().ns.clone();
    let ask6 = |c: &Cluster, addr: &str, port: u16| -> Result<String, String> {
        let out = c
            .lab
            .exec_status(
                &client,
                &["socat", "-T", "2", "-u", &format!("TCP6:[{addr}]:{port},connect-timeout=2"), "STDOUT"],
            )
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !text.is_empty() {
            Ok(text)
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    };
    let n1 = c.lab.node("n1").unwrap().ns.clone();
    let ip6_nat = |c: &Cluster| {
        String::from_utf8_lossy(&c.lab.exec(&n1, &["ip6tables-save", "-t", "nat"]).unwrap().stdout).into_owned()
    };
    assert!(
        wait_for(Duration::from_secs(5), || ask6(&c, &ips[1], 80).is_ok()),
        "the IPv6 cluster IP answers: {:?}\n{}\n{}",
        ask6(&c, &ips[1], 80),
        ip6_nat(&c),
        std::fs::read_to_string(c.lab.node("n1").unwrap().root.join("proxy.log")).unwrap_or_default()
    );
    let mut seen = BTreeSet::new();
    for _ in 0..30 {
        let answer = ask6(&c, &ips[1], 80).unwrap();
        let (server, peer) = answer.split_once(' ').unwrap();
        // socat prints the peer in full, in brackets.
        let peer: std::net::IpAddr = peer.trim_matches(|c| c == '[' || c == ']').parse().unwrap();
        assert_eq!(peer, v6_of["client"].parse::<std::net::IpAddr>().unwrap(), "the client's address is kept");
        seen.insert(server.to_string());
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["web-a", "web-b"], "both endpoints, over IPv6");
    assert!(c.connect(&client, &ips[0], 80).is_ok(), "and over IPv4");
    // A node port on a node's IPv6 underlay address, from outside the cluster.
    let outside = c.lab.ns_name("outside");
    let n1_v6 = netns_lab::underlay_v6("198.18.0.1");
    let np = || {
        c.lab
            .exec_status(
                &outside,
                &["socat", "-T", "2", "-u", &format!("TCP6:[{n1_v6}]:30090,connect-timeout=2"), "STDOUT"],
            )
            .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).starts_with("web-"))
            .unwrap_or(false)
    };
    assert!(wait_for(Duration::from_secs(5), np), "node port over IPv6");
    // An IPv6-only Service without endpoints is refused at once. (A node routes service addresses somewhere, as
    // real nodes have a default route; without one the node answers "no route" before its filter rules run.)
    let outside_v6 = netns_lab::underlay_v6(netns_lab::OUTSIDE_IP);
    netns_lab::ip(&["-n", &n1, "-6", "route", "add", "default", "via", &outside_v6]).unwrap();
    let out = c.lab.tartanctl(&["get", "svc", "none6", "-o", "json"], None).unwrap();
    let none6: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let vip6 = none6["spec"]["clusterIP"].as_str().unwrap().to_string();
    assert!(vip6.starts_with("fd00:10:96::"), "{none6}");
    let t = std::time::Instant::now();
    let err = ask6(&c, &vip6, 80).unwrap_err();
    assert!(err.contains("refused"), "REJECTed by the service rule: {err}");
    let filter =
        String::from_utf8_lossy(&c.lab.exec(&n1, &["ip6tables-save", "-t", "filter"]).unwrap().stdout).into_owned();
    // Refused, not timed out. Over IPv6 the first SYN's ICMPv6 error is lost here and its retransmission (1 s
    // later) is refused; the same happens whatever the ICMPv6 rate limit (open: see the notes).
    assert!(t.elapsed() < Duration::from_secs(3), "rejected, not timed out: {:?} {err}\n{filter}", t.elapsed());
    assert!(c.programmed("n1", &ips[1]), "{}", ip6_nat(&c));
}

#[test]
fn metrics_move_with_the_cluster_and_health_fails_while_syncs_fail_then_recovers() {
    // A sync period of 2 s: /healthz fails once changes have waited twice that (kube-proxy's bound).
    let mut c = Cluster::with("px-obs", "iptables", Backend::Vxlan, &["--sync-period", "2"]);
    let web = c.server("n1", "web-a", "web");
    let client = c.client("n1", "client");
    let n1 = c.lab.node("n1").unwrap().ns.clone();
    let get = |c: &Cluster, path: &str| tartan_e2e::http_get(&c.lab, &n1, &format!("http://127.0.0.1:10249{path}"));
    assert!(wait_for(Duration::from_secs(5), || get(&c, "/readyz").0 == 200));
    let before = tartan_e2e::proxy_metrics(&c.lab, "n1");
    let m = |text: &str, series: &str| tartan_e2e::metric(text, series).unwrap_or(-1.0);
    // Every series of the proxy carries its dataplane.
    let scrape = tartan_e2e::scrape(&before);
    assert!(scrape.samples.len() > 20);
    for s in &scrape.samples {
        assert_eq!(s.labels.get("mode"), Some("iptables"), "{} has no mode label", s.metric);
    }
    c.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.60, selector: {app: web}, ports: [{port: 80, targetPort: http}]}\n");
    assert!(wait_for(Duration::from_secs(5), || c.connect(&client, "10.96.0.60", 80).is_ok()));
    let moved = |series: &str| {
        let now = tartan_e2e::proxy_metrics(&c.lab, "n1");
        m(&now, series) > m(&before, series)
    };
    for series in [
        "tartan_proxy_service_ports",
        "tartan_proxy_store_changes_total",
        "tartan_proxy_dataplane_entries",
        "kubeproxy_network_programming_duration_seconds_count",
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
    ] {
        assert!(wait_for(Duration::from_secs(3), || moved(series)), "{series} did not move");
    }

    // Syncs made to fail (a set the next sync must destroy is held by someone else's rule): changes wait,
    // /healthz turns to 503 after the bound, and back to 200 once a sync succeeds again.
    c.apply(FRIENDS_ONLY);
    assert!(wait_for(Duration::from_secs(5), || c.connect(&client, &web, 8080).is_err()), "the policy holds");
    let set = n1_sets(&c, "PS").pop().expect("the selector's set");
    for argv in [
        vec!["iptables", "-w", "-N", "SOMEONE-ELSES"],
        vec!["iptables", "-w", "-A", "SOMEONE-ELSES", "-m", "set", "--match-set", &set, "src", "-j", "RETURN"],
    ] {
        assert!(c.lab.exec_status(&n1, &argv).unwrap().status.success(), "{argv:?}");
    }
    assert_eq!(get(&c, "/healthz").0, 200);
    let out = c.lab.tartanctl(&["delete", "netpol", "friends-only", "-n", "default"], None).unwrap();
    assert!(out.status.success());
    assert!(wait_for(Duration::from_secs(12), || get(&c, "/healthz").0 == 503), "{:?}", get(&c, "/healthz"));
    assert!(get(&c, "/healthz").1.contains("for a successful sync"), "{:?}", get(&c, "/healthz"));
    let failing = tartan_e2e::proxy_metrics(&c.lab, "n1");
    assert!(m(&failing, r#"tartan_proxy_sync_errors_total{kind="sets"}"#) >= 1.0, "{failing}");
    assert!(m(&failing, "kubeproxy_sync_proxy_rules_service_changes_pending") >= 1.0, "{failing}");
    assert!(m(&failing, "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds") > 0.0, "{failing}");
    c.lab.exec(&n1, &["iptables", "-w", "-F", "SOMEONE-ELSES"]).unwrap();
    c.lab.exec(&n1, &["iptables", "-w", "-X", "SOMEONE-ELSES"]).unwrap();
    assert!(wait_for(Duration::from_secs(15), || get(&c, "/healthz").0 == 200), "{:?}", get(&c, "/healthz"));
    assert!(n1_sets(&c, "PS").is_empty(), "the policy's set is gone");
    assert!(c.connect(&client, &web, 8080).is_ok());
    assert_eq!(m(&tartan_e2e::proxy_metrics(&c.lab, "n1"), "kubeproxy_sync_proxy_rules_service_changes_pending"), 0.0);
}

fn a_kill_9_of_the_proxy_under_new_connections_loses_none_and_the_next_start_adopts_its_state(mode: &'static str) {
    let mut c = Cluster::in_mode("px-kill", mode);
    c.server("n2", "web-b", "web");
    c.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.94, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n");
    let client = c.client("n1", "client");
    assert!(wait_for(Duration::from_secs(5), || c.connect(&client, "10.96.0.94", 80).is_ok()));
    let prober = c.probe_loop(&client, "10.96.0.94", 80, 60);
    std::thread::sleep(Duration::from_millis(500));
    // A crash: nothing of the proxy's runs, the kernel keeps what it was given (rules; or maps and pinned links).
    c.lab.kill(c.proxies[0]);
    std::thread::sleep(Duration::from_millis(1000));
    c.proxies[0] = c.start_proxy("n1", &[]);
    let failures = probe_failures(prober);
    assert!(failures.is_empty(), "{failures:?}");
    // The next start adopted the state: a change after it lands, and (ebpf) one set of programs stays attached.
    c.apply("apiVersion: v1\nkind: Service\nmetadata: {name: after}\nspec: {clusterIP: 10.96.0.93, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n");
    assert!(wait_for(Duration::from_secs(5), || c.connect(&client, "10.96.0.93", 80).is_ok()));
    if mode == "ebpf" {
        let out = std::process::Command::new("bpftool")
            .args(["-j", "cgroup", "show"])
            .arg(c.lab.node_cgroup("n1"))
            .output()
            .unwrap();
        let attached: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let names: Vec<&str> = attached.as_array().unwrap().iter().filter_map(|p| p["name"].as_str()).collect();
        assert_eq!(names.len(), 8, "one program per hook, the old links replaced: {names:?}");
    }
}

/// A client that keeps one connected UDP socket (as resolvers and metrics agents do) and, on an error, connects it
/// again: after its backend goes, it gets answers from a live one.
fn a_connected_udp_client_gets_answers_from_a_live_backend_after_its_backend_goes(mode: &'static str) {
    let mut c = Cluster::in_mode("px-cudp", mode);
    c.dns_service("10.96.0.54");
    let client = c.client("n1", "client");
    assert!(wait_for(Duration::from_secs(5), || c.programmed("n1", "10.96.0.54")));
    let script = r#"
import socket, sys, time
def connect():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("10.96.0.54", 53))
    s.settimeout(0.2)
    return s
s = connect()
end = time.time() + float(sys.argv[1])
while time.time() < end:
    try:
        s.send(b"q")
        print("%.3f %s" % (time.time(), s.recv(100).decode().strip()), flush=True)
    except socket.timeout:
        pass
    except OSError as e:
        print("%.3f error %d" % (time.time(), e.errno), flush=True)
        s.close()
        s = connect()
    time.sleep(0.05)
"#;
    let log = c.lab.dir().join("udp-client.log");
    let mut cmd = c.lab.cmd(&client, "python3").unwrap();
    cmd.args(["-c", script, "20"]).stdout(std::fs::File::create(&log).unwrap());
    let mut child = cmd.spawn().unwrap();
    let lines = || std::fs::read_to_string(&log).unwrap_or_default();
    let answered = |who: &str, after: f64| {
        lines().lines().any(|l| {
            let mut f = l.split_whitespace();
            let t: f64 = f.next().and_then(|t| t.parse().ok()).unwrap_or(0.0);
            t > after && f.next() == Some(who)
        })
    };
    assert!(wait_for(Duration::from_secs(5), || answered("dns-a", 0.0) || answered("dns-b", 0.0)), "{}", lines());
    let first = if answered("dns-a", 0.0) { "dns-a" } else { "dns-b" };
    let other = if first == "dns-a" { "dns-b" } else { "dns-a" };
    let gone_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    c.lab.del_pod(first).unwrap();
    let t = std::time::Instant::now();
    let moved = wait_for(Duration::from_secs(8), || answered(other, gone_at));
    eprintln!("{mode}: the connected UDP client got answers from {other} {:?} after {first} went", t.elapsed());
    let _ = child.kill();
    let _ = child.wait();
    assert!(moved, "{}", lines());
}

#[test]
fn ebpf_a_node_process_reaches_a_cluster_ip_without_any_route_to_it() {
    let mut c = Cluster::in_mode("px-noroute", "ebpf");
    c.server("n2", "web-b", "web");
    c.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.92, selector: {app: web}, ports: [{port: 80, targetPort: http}]}\n");
    let n1 = c.lab.node("n1").unwrap().ns.clone();
    let routes = c.lab.exec(&n1, &["ip", "route", "get", "10.96.0.92"]).map(|o| o.status.success()).unwrap_or(false);
    assert!(!routes, "the lab's nodes have no route to the service range");
    // The socket is sent to the backend at connect(): routing only ever sees the pod's address.
    assert!(
        wait_for(Duration::from_secs(5), || c.connect(&n1, "10.96.0.92", 80).is_ok()),
        "{:?}\n{}",
        c.connect(&n1, "10.96.0.92", 80),
        std::fs::read_to_string(c.lab.node("n1").unwrap().root.join("proxy.log")).unwrap_or_default()
    );
    assert!(c.connect(&n1, "10.96.0.92", 80).unwrap().starts_with("web-b "));
    // A dual-stack (AF_INET6) socket reaching the IPv4 service through its IPv4-mapped address, as Java's do.
    let out = c
        .lab
        .exec_status(&n1, &["socat", "-T", "2", "-u", "TCP6:[::ffff:10.96.0.92]:80,connect-timeout=2", "STDOUT"])
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("web-b "), "{}", String::from_utf8_lossy(&out.stderr));
}

tartan_e2e::every_dataplane!(
    a_kill_9_of_the_proxy_under_new_connections_loses_none_and_the_next_start_adopts_its_state,
    a_connected_udp_client_gets_answers_from_a_live_backend_after_its_backend_goes,
    cluster_ip_balances_over_pods_on_both_nodes_and_keeps_the_client_address,
    a_service_without_endpoints_refuses_at_once,
    node_ports_reach_pods_from_outside_with_both_traffic_policies,
    traffic_from_outside_udp_icmp_mtu_and_refusals,
    health_check_node_ports_answer_with_the_local_endpoint_count,
    cleanup_removes_every_rule_of_ours_and_nothing_else,
    affinity_hairpin_and_metrics,
    a_udp_client_moves_to_a_live_endpoint_when_its_endpoint_goes,
    the_node_itself_external_ips_load_balancer_ips_and_internal_local_policy,
    a_proxy_restart_does_not_interrupt_service_traffic,
    several_ports_per_service_and_a_not_ready_pod_gets_no_new_connections,
    services_work_with_the_agents_masquerade_on_every_backend,
    headless_and_external_name_services_get_no_rules_and_node_ports_honour_nodeport_addresses,
    values_that_are_not_valid_objects_are_reported_and_skipped,
    service_traffic_survives_an_etcd_pause_and_changes_after_it_land_within_5s,
    dual_stack_services_get_a_cluster_ip_per_family_and_work_over_both,
);
