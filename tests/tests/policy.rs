//! NetworkPolicy through tartan-proxy, each test once per dataplane (`iptables::`, `ebpf::`), on the conformance
//! topology (netns_lab::reachability): namespaces
//! x, y, z with pods a, b, c over two nodes, each serving TCP and UDP on 80 and 81. A case is a set of policies
//! (and label changes) and the matrix it should give; the expected matrix comes from [`reference`], a deliberately
//! plain evaluator written from the Kubernetes documentation, not from the proxy's code.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use netns_lab::cluster::Backend;
use netns_lab::reachability::{namespace_manifest, pod_manifest, Matrix, Probe, Proto, TopoPod, Topology};
use netns_lab::{wait_for, Lab};

/// The reference evaluator: one loop per rule of the documentation, over plain data.
mod reference {
    use std::collections::BTreeMap;
    use std::net::{IpAddr, Ipv4Addr};

    use kube_objects::{IntOrString, LabelSelector, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};

    pub type Labels = BTreeMap<String, String>;

    pub struct Pod {
        pub namespace: String,
        pub labels: Labels,
        pub ip: IpAddr,
        /// (name, protocol, port) of its container ports.
        pub ports: Vec<(String, String, u16)>,
    }

    fn selects(sel: &LabelSelector, labels: &Labels) -> bool {
        for (k, v) in &sel.match_labels {
            if labels.get(k) != Some(v) {
                return false;
            }
        }
        for e in &sel.match_expressions {
            let have = labels.get(&e.key);
            let ok = match e.operator.as_str() {
                "In" => have.is_some() && e.values.contains(have.unwrap()),
                "NotIn" => have.is_none() || !e.values.contains(have.unwrap()),
                "Exists" => have.is_some(),
                "DoesNotExist" => have.is_none(),
                _ => false,
            };
            if !ok {
                return false;
            }
        }
        true
    }

    fn in_cidr(ip: IpAddr, cidr: &str) -> bool {
        let (net, len) = cidr.split_once('/').unwrap();
        let (IpAddr::V4(ip), Ok(net)) = (ip, net.parse::<Ipv4Addr>()) else { return false };
        let len: u32 = len.parse().unwrap();
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        u32::from(ip) & mask == u32::from(net) & mask
    }

    fn peer_matches(
        peer: &NetworkPolicyPeer,
        policy_ns: &str,
        pod: &Pod,
        ns_labels: &BTreeMap<String, Labels>,
    ) -> bool {
        if let Some(block) = &peer.ip_block {
            return in_cidr(pod.ip, &block.cidr) && !block.except.iter().any(|e| in_cidr(pod.ip, e));
        }
        let ns_ok = match &peer.namespace_selector {
            None => pod.namespace == policy_ns,
            Some(sel) => selects(sel, &ns_labels[&pod.namespace]),
        };
        let pod_ok = match &peer.pod_selector {
            None => true,
            Some(sel) => selects(sel, &pod.labels),
        };
        ns_ok && pod_ok
    }

    fn port_matches(ports: &[NetworkPolicyPort], dst: &Pod, proto: &str, port: u16) -> bool {
        if ports.is_empty() {
            return true;
        }
        for p in ports {
            if p.protocol.as_deref().unwrap_or("TCP") != proto {
                continue;
            }
            let ok = match &p.port {
                None => true,
                Some(IntOrString::Int(n)) => match p.end_port {
                    Some(end) => *n <= port as i64 && port as i64 <= end,
                    None => *n == port as i64,
                },
                Some(IntOrString::Str(name)) => {
                    dst.ports.iter().any(|(n, pr, num)| n == name && pr == proto && *num == port)
                }
            };
            if ok {
                return true;
            }
        }
        false
    }

    fn types(np: &NetworkPolicy) -> Vec<String> {
        if !np.spec.policy_types.is_empty() {
            return np.spec.policy_types.clone();
        }
        let mut t = vec!["Ingress".to_string()];
        if !np.spec.egress.is_empty() {
            t.push("Egress".to_string());
        }
        t
    }

    /// Whether `src` may open a connection to `dst` on proto/port: the source's egress and the destination's
    /// ingress must both allow it.
    pub fn allowed(
        policies: &[NetworkPolicy],
        ns_labels: &BTreeMap<String, Labels>,
        src: &Pod,
        dst: &Pod,
        proto: &str,
        port: u16,
    ) -> bool {
        let side = Side { policies, ns_labels, dst, proto, port };
        side.allows(src, "Egress", dst, egress_rules) && side.allows(dst, "Ingress", src, ingress_rules)
    }

    struct Side<'a> {
        policies: &'a [NetworkPolicy],
        ns_labels: &'a BTreeMap<String, Labels>,
        dst: &'a Pod,
        proto: &'a str,
        port: u16,
    }

    type RuleList<'r> = Vec<(&'r [NetworkPolicyPeer], &'r [NetworkPolicyPort])>;

    fn egress_rules(np: &NetworkPolicy) -> RuleList<'_> {
        np.spec.egress.iter().map(|r| (&r.to[..], &r.ports[..])).collect()
    }

    fn ingress_rules(np: &NetworkPolicy) -> RuleList<'_> {
        np.spec.ingress.iter().map(|r| (&r.from[..], &r.ports[..])).collect()
    }

    impl Side<'_> {
        /// `pod` is not isolated for `kind`, or a rule of a policy selecting it matches `peer` and the port.
        fn allows(&self, pod: &Pod, kind: &str, peer: &Pod, rules: fn(&NetworkPolicy) -> RuleList<'_>) -> bool {
            let ns_of = |np: &NetworkPolicy| np.metadata.namespace.clone().unwrap_or_else(|| "default".into());
            let mut isolated = false;
            let mut ok = false;
            for np in self.policies {
                if ns_of(np) != pod.namespace
                    || !selects(&np.spec.pod_selector, &pod.labels)
                    || !types(np).iter().any(|t| t == kind)
                {
                    continue;
                }
                isolated = true;
                for (peers, ports) in rules(np) {
                    let peer_ok =
                        peers.is_empty() || peers.iter().any(|p| peer_matches(p, &ns_of(np), peer, self.ns_labels));
                    if peer_ok && port_matches(ports, self.dst, self.proto, self.port) {
                        ok = true;
                    }
                }
            }
            !isolated || ok
        }
    }
}

struct Env {
    lab: Lab,
    topo: Topology,
    /// Labels as the store has them now.
    pod_labels: BTreeMap<String, reference::Labels>,
    ns_labels: BTreeMap<String, reference::Labels>,
    /// The proxies' PIDs by node.
    proxies: BTreeMap<String, u32>,
    mode: &'static str,
}

fn labels(pairs: &[(&str, &str)]) -> reference::Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

impl Env {
    fn new(tag: &str, mode: &'static str) -> Env {
        let mut lab = Lab::new(tag).expect("lab");
        lab.build_cluster(2, Backend::Vxlan, 1).expect("cluster");
        let proxies = ["n1", "n2"].map(|n| (n.to_string(), lab.start_proxy(n, &["--mode", mode]).unwrap())).into();
        let topo = Topology::build(&mut lab, &["n1", "n2"]).expect("topology");
        let pod_labels = topo.pods.iter().map(|p| (p.id.clone(), labels(&[("pod", &p.name)]))).collect();
        let ns_labels = ["x", "y", "z"]
            .iter()
            .map(|ns| (ns.to_string(), labels(&[("ns", ns), ("kubernetes.io/metadata.name", ns)])))
            .collect();
        Env { lab, topo, pod_labels, ns_labels, proxies, mode }
    }

    fn apply(&self, yaml: &str) {
        let out = self.lab.tartanctl(&["apply", "-f", "-"], Some(yaml)).unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    fn delete(&self, yaml: &str) {
        let out = self.lab.tartanctl(&["delete", "-f", "-"], Some(yaml)).unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    fn set_pod_labels(&mut self, id: &str, l: &[(&str, &str)]) {
        let (ns, name) = id.split_once('/').unwrap();
        self.apply(&pod_manifest(ns, name, l));
        self.pod_labels.insert(id.to_string(), labels(l));
    }

    fn set_ns_labels(&mut self, ns: &str, l: &[(&str, &str)]) {
        self.apply(&namespace_manifest(ns, l));
        let mut all = labels(l);
        all.insert("kubernetes.io/metadata.name".into(), ns.into());
        self.ns_labels.insert(ns.to_string(), all);
    }

    fn reference_pod(&self, p: &TopoPod) -> reference::Pod {
        let ports = [80u16, 81]
            .iter()
            .flat_map(|port| {
                [("TCP", "tcp"), ("UDP", "udp")].map(|(pr, l)| (format!("serve-{port}-{l}"), pr.to_string(), *port))
            })
            .collect();
        reference::Pod { namespace: p.namespace.clone(), labels: self.pod_labels[&p.id].clone(), ip: p.ip, ports }
    }

    /// The matrix `policies` should give, with the labels as they are now.
    fn expected(&self, policies: &str) -> Matrix {
        let parsed = parse_policies(policies);
        Matrix::from_fn(&self.topo, |s, d, probe| {
            s.id == d.id
                || reference::allowed(
                    &parsed,
                    &self.ns_labels,
                    &self.reference_pod(s),
                    &self.reference_pod(d),
                    probe.proto.name(),
                    probe.port,
                )
        })
    }

    /// Applies `policies`, compares the matrix with the reference's and removes them again; the difference, if any.
    fn case(&mut self, name: &str, policies: &str) -> Option<String> {
        self.apply(policies);
        let want = self.expected(policies);
        let got = self.topo.probe_until(&want, Duration::from_secs(5));
        self.delete(policies);
        let open = Matrix::filled(&self.topo, true);
        let reopened = self.topo.probe_until(&open, Duration::from_secs(5));
        let mut fail = None;
        if got != want {
            fail = Some(format!("case {name}:\n{}", got.diff_table(&want)));
        } else if reopened != open {
            fail = Some(format!("case {name}: after deleting the policies:\n{}", reopened.diff_table(&open)));
        }
        eprintln!("case {name}: {}", if fail.is_some() { "FAILED" } else { "ok" });
        fail
    }
}

/// The NetworkPolicies of a manifest text (none for an empty one).
fn parse_policies(yaml: &str) -> Vec<kube_objects::NetworkPolicy> {
    if yaml.trim().is_empty() {
        return Vec::new();
    }
    kube_objects::parse_manifests(yaml, "case")
        .unwrap()
        .into_iter()
        .filter_map(|d| match d.object {
            kube_objects::Object::NetworkPolicy(np) => Some(np),
            _ => None,
        })
        .collect()
}

fn policy(ns: &str, name: &str, spec: &str) -> String {
    format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n")
}

/// Two hand-checked matrices, so that the reference evaluator itself is checked against the documentation.
#[test]
fn reference_evaluator_agrees_with_hand_checked_cases() {
    let pods: Vec<(&str, &str, &str)> =
        vec![("x", "a", "10.244.1.2"), ("x", "b", "10.244.2.2"), ("y", "a", "10.244.1.3")];
    let ns_labels: BTreeMap<String, reference::Labels> =
        ["x", "y"].iter().map(|n| (n.to_string(), labels(&[("ns", n), ("kubernetes.io/metadata.name", n)]))).collect();
    let pod = |i: usize| reference::Pod {
        namespace: pods[i].0.into(),
        labels: labels(&[("pod", pods[i].1)]),
        ip: pods[i].2.parse().unwrap(),
        ports: vec![("serve-81-udp".into(), "UDP".into(), 81)],
    };
    let parse = parse_policies;
    // deny-all-ingress in x: nothing gets into x/a or x/b; y/a is open; egress is not restricted.
    let deny = parse(&policy("x", "deny", "  podSelector: {}\n  policyTypes: [Ingress]"));
    let ok = |p: &[kube_objects::NetworkPolicy], s: usize, d: usize, proto: &str, port: u16| {
        reference::allowed(p, &ns_labels, &pod(s), &pod(d), proto, port)
    };
    assert!(!ok(&deny, 2, 0, "TCP", 80) && !ok(&deny, 1, 0, "UDP", 81) && !ok(&deny, 0, 1, "TCP", 80));
    assert!(ok(&deny, 0, 2, "TCP", 80));
    // x/a takes UDP on its named port serve-81-udp from namespace y only, and an ipBlock peer excepting x/b.
    let named = parse(&policy(
        "x",
        "named",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]\n    ports: [{port: serve-81-udp, protocol: UDP}]\n  - from: [{ipBlock: {cidr: 10.244.0.0/16, except: [10.244.2.2/32]}}]\n    ports: [{port: 80}]",
    ));
    assert!(ok(&named, 2, 0, "UDP", 81) && !ok(&named, 2, 0, "UDP", 80) && !ok(&named, 1, 0, "UDP", 81));
    assert!(ok(&named, 2, 0, "TCP", 80) && !ok(&named, 1, 0, "TCP", 80), "the except carves x/b out");
    // deny-all-egress from y: y/a reaches nobody, but others still reach y/a.
    let egress = parse(&policy("y", "deny-egress", "  podSelector: {}\n  policyTypes: [Egress]"));
    assert!(!ok(&egress, 2, 0, "TCP", 80) && ok(&egress, 0, 2, "TCP", 80));
}

/// Every rule family of networking.k8s.io/v1, one case each, on one topology.
fn conformance_cases_match_the_reference_evaluator(mode: &'static str) {
    let mut env = Env::new("np-cases", mode);
    let ip = |id: &str| env.topo.pod(id).ip;
    let (yb, zc) = (ip("y/b"), ip("z/c"));
    let seeds = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/netpol.yaml")).unwrap();
    let seed = |name: &str| -> String {
        let doc = seeds.split("---").find(|d| d.contains(&format!("name: {name}\n"))).unwrap();
        doc.replace("namespace: default", "namespace: x").replace("app: myapp", "pod: a")
    };
    let mut cases: Vec<(&str, String)> = vec![
        ("seed deny-all-ingress (namespace x)", seed("deny-all-ingress")),
        ("seed deny-all-egress (namespace x)", seed("deny-all-egress")),
        (
            "seed allow-80-ingress (x/a; ipBlock 10.244.0.0/16 except y/b)",
            seed("allow-80-ingress").replace("10.244.1.2/32", &format!("{yb}/32")),
        ),
        ("podSelector peer: x/a from pod=b in x", policy("x", "p", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]")),
        ("namespaceSelector peer: x/a from namespace y", policy("x", "p", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]")),
        ("both in one peer (AND): y/b only", policy("x", "p", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]}]")),
        ("separate peers (OR): namespace y, or pod=b in x", policy("x", "p", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}, {podSelector: {matchLabels: {pod: b}}}]}]")),
        ("port by number: UDP 81 only", policy("x", "p", "  podSelector: {}\n  ingress: [{ports: [{protocol: UDP, port: 81}]}]")),
        ("named port: serve-81-tcp", policy("x", "p", "  podSelector: {}\n  ingress: [{ports: [{port: serve-81-tcp}]}]")),
        ("port range: TCP 80-81 (endPort)", policy("y", "p", "  podSelector: {}\n  ingress: [{ports: [{port: 80, endPort: 81}]}]")),
        ("protocol only: every UDP port", policy("y", "p", "  podSelector: {}\n  ingress: [{ports: [{protocol: UDP}]}]")),
        (
            "union of two policies selecting x/a",
            policy("x", "p1", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 80}]}]")
                + "---\n"
                + &policy("x", "p2", "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: z}}}], ports: [{port: 81, protocol: UDP}]}]"),
        ),
        (
            "ingress: [{}] beside a deny-all allows everything",
            policy("x", "deny", "  podSelector: {}\n  policyTypes: [Ingress]")
                + "---\n"
                + &policy("x", "all", "  podSelector: {matchLabels: {pod: c}}\n  ingress: [{}]"),
        ),
        ("empty podSelector peer: every pod of the policy's namespace", policy("z", "p", "  podSelector: {}\n  ingress: [{from: [{podSelector: {}}]}]")),
        ("empty namespaceSelector peer: every pod", policy("z", "p", "  podSelector: {matchLabels: {pod: b}}\n  ingress: [{from: [{namespaceSelector: {}}]}]")),
        (
            "matchExpressions: pod NotIn [a] from namespaces In [y, z]",
            policy("x", "p", "  podSelector: {}\n  ingress:\n  - from:\n    - namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: In, values: [y, z]}]}\n      podSelector: {matchExpressions: [{key: pod, operator: NotIn, values: [a]}]}"),
        ),
        ("egress to namespace y on the named port serve-80-udp", policy("x", "p", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: serve-80-udp, protocol: UDP}]}]")),
        (
            "egress ipBlock with except (all pods but z/c)",
            policy("x", "p", &format!("  podSelector: {{}}\n  policyTypes: [Egress]\n  egress: [{{to: [{{ipBlock: {{cidr: 10.244.0.0/16, except: [{zc}/32]}}}}]}}]")),
        ),
        (
            "source egress AND destination ingress: x/a may send only to z, z/b takes only from y",
            policy("x", "out", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {matchLabels: {ns: z}}}]}]")
                + "---\n"
                + &policy("z", "in", "  podSelector: {matchLabels: {pod: b}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]"),
        ),
        ("SCTP only: TCP and UDP denied (SCTP itself: see sctp test)", policy("y", "p", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{protocol: SCTP, port: 80}]}]")),
    ];
    let mut failures = Vec::new();
    for (name, yaml) in cases.drain(..) {
        failures.extend(env.case(name, &yaml));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Pod and namespace label changes, and policy updates, take effect for new connections within 1 s.
fn label_changes_and_policy_updates_take_effect_within_a_second(mode: &'static str) {
    let mut env = Env::new("np-change", mode);
    let tcp80 = Probe { proto: Proto::Tcp, port: 80 };
    let reach = |env: &Env, s: &str, d: &str| {
        let m = env.topo.probe(Duration::from_millis(500));
        m.get(s, d, tcp80)
    };
    // Time from the store write until the probe flips, probing every 20 ms (a denied probe waits 100 ms more).
    let flip = |env: &Env, s: &str, d: &str, want: bool| -> Duration {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            let (src, dst) = (env.topo.pod(s), env.topo.pod(d));
            let ns = netns::NetNs::named(&src.netns).unwrap();
            let to = std::net::SocketAddr::new(dst.ip, 80);
            let ok = ns.run(|| std::net::TcpStream::connect_timeout(&to, Duration::from_millis(300)).is_ok()).unwrap();
            if ok == want {
                return t.elapsed();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{s} -> {d} did not become {want} within 5 s");
    };
    let from_b = policy(
        "x",
        "from-b",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]",
    );
    env.apply(&from_b);
    assert!(wait_for(Duration::from_secs(5), || !reach(&env, "x/c", "x/a")));
    assert!(reach(&env, "x/b", "x/a"));
    let mut took = Vec::new();
    // x/c becomes pod=b: it is let in.
    env.set_pod_labels("x/c", &[("pod", "b")]);
    took.push(("pod label added to the selected set", flip(&env, "x/c", "x/a", true)));
    env.set_pod_labels("x/c", &[("pod", "c")]);
    took.push(("pod label removed from the selected set", flip(&env, "x/c", "x/a", false)));
    // The policy is updated to take namespace team=blue; then z is labelled so.
    env.apply(&policy("x", "from-b", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: blue}}}]}]"));
    took.push(("policy update", flip(&env, "x/b", "x/a", false)));
    env.set_ns_labels("z", &[("ns", "z"), ("team", "blue")]);
    took.push(("namespace label change", flip(&env, "z/b", "x/a", true)));
    // The selected pod itself changes: x/a is no longer selected, so it is open again.
    env.set_pod_labels("x/a", &[("pod", "a2")]);
    took.push(("selected pod relabelled", flip(&env, "y/a", "x/a", true)));
    env.set_pod_labels("x/a", &[("pod", "a")]);
    took.push(("selected again", flip(&env, "y/a", "x/a", false)));
    env.delete(&from_b);
    took.push(("policy delete", flip(&env, "y/a", "x/a", true)));
    for (what, t) in &took {
        eprintln!("{what}: {:.0} ms", t.as_secs_f64() * 1e3);
    }
    for (what, t) in took {
        assert!(t < Duration::from_secs(1), "{what}: {t:?}");
    }
    // And the whole matrix agrees with the reference for the final labels (z still team=blue).
    let want = env.expected("");
    let got = env.topo.probe_until(&want, Duration::from_secs(5));
    assert!(got == want, "{}", got.diff_table(&want));
}

/// CRC32c (Castagnoli, reflected), SCTP's checksum.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

/// Sends one SCTP INIT to ip:port from inside `netns` through a raw socket (this kernel has no SCTP sockets).
fn send_sctp_init(netns: &str, ip: std::net::IpAddr, port: u16) {
    let mut pkt = Vec::new();
    pkt.extend(40000u16.to_be_bytes()); // source port
    pkt.extend(port.to_be_bytes());
    pkt.extend(0u32.to_be_bytes()); // verification tag: 0 in an INIT
    pkt.extend(0u32.to_be_bytes()); // checksum, filled below
    pkt.extend([1u8, 0]); // INIT, no flags
    pkt.extend(20u16.to_be_bytes());
    pkt.extend(0x1234_5678u32.to_be_bytes()); // initiate tag
    pkt.extend(65535u32.to_be_bytes()); // a_rwnd
    pkt.extend(1u16.to_be_bytes()); // outbound streams
    pkt.extend(1u16.to_be_bytes()); // inbound streams
    pkt.extend(1u32.to_be_bytes()); // initial TSN
    let crc = crc32c(&pkt);
    pkt[8..12].copy_from_slice(&crc.to_le_bytes());
    let ns = netns::NetNs::named(netns).unwrap();
    ns.run(|| {
        // SAFETY: a raw socket used for one sendto and closed; the buffers outlive the calls.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, 132);
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let std::net::IpAddr::V4(v4) = ip else { panic!("IPv4 only") };
            let mut sa: libc::sockaddr_in = std::mem::zeroed();
            sa.sin_family = libc::AF_INET as u16;
            sa.sin_addr.s_addr = u32::from(v4).to_be();
            let n = libc::sendto(
                fd,
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            );
            assert_eq!(n, pkt.len() as isize, "sendto: {}", std::io::Error::last_os_error());
            libc::close(fd);
        }
    })
    .unwrap();
}

/// The packets a node's dataplane counted as sent with another pod's address: the anti-spoofing rules' counters
/// (iptables), or the programs' counter (eBPF, read from the pinned stats map).
fn forged_drops(env: &Env, node: &str, pod: &str) -> u64 {
    if env.mode == "ebpf" {
        return ebpf_stat(env, node, ebpf_maps::stats::POLICY_SPOOFED);
    }
    let ns = env.lab.node(node).unwrap().ns.clone();
    let out = env.lab.exec(&ns, &["iptables", "-w", "-t", "filter", "-L", "TARTAN-POLICY", "-v", "-n", "-x"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .filter(|l| l.contains(&format!("{pod}: not its address")))
        .map(|l| l.split_whitespace().next().unwrap().parse::<u64>().unwrap())
        .sum::<u64>()
}

/// A counter of the eBPF programs on `node`, summed over CPUs (read from the pinned stats map).
fn ebpf_stat(env: &Env, node: &str, index: u32) -> u64 {
    let map = env.lab.node_bpf_root(node).join(ebpf_maps::names::STATS);
    let out = std::process::Command::new("bpftool").args(["-j", "map", "dump", "pinned"]).arg(&map).output().unwrap();
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    // Without BTF, bpftool prints keys and values as arrays of hex bytes (little endian here).
    let le = |v: &serde_json::Value| -> u64 {
        v.as_array().into_iter().flatten().rev().fold(0u64, |n, b| {
            (n << 8) | u64::from_str_radix(b.as_str().unwrap_or("0").trim_start_matches("0x"), 16).unwrap_or(0)
        })
    };
    let entry = dump.as_array().into_iter().flatten().find(|e| le(&e["key"]) == u64::from(index));
    entry.map_or(0, |e| e["values"].as_array().into_iter().flatten().map(|v| le(&v["value"])).sum::<u64>())
}

/// One TCP connection from a client process in `from`, in the node's cgroup (the eBPF dataplane translates
/// Service addresses at connect()).
fn socat_connect(lab: &Lab, from: &str, ip: &str, port: u16) -> bool {
    let to = format!("TCP:{ip}:{port},connect-timeout=0.5");
    lab.exec_status(from, &["socat", "-u", "/dev/null", &to]).unwrap().status.success()
}

/// Policy meets the rest of the node: Service translation (policy sees the real pod and port), the node's own
/// traffic (exempt), a pod forging another pod's address (dropped at its veth), and SCTP (checked with crafted
/// INIT chunks captured at the destination).
fn policy_composes_with_services_host_traffic_forged_sources_and_sctp(mode: &'static str) {
    let mut env = Env::new("np-misc", mode);
    let xa = env.topo.pod("x/a").clone();
    // x/a takes TCP 80 from namespace y only; a Service in x maps 8080 to x/a's serve-80-tcp.
    env.apply(&policy("x", "only-y", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 80}]}]"));
    env.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: x}\nspec: {clusterIP: 10.96.0.20, selector: {pod: a}, ports: [{port: 8080, targetPort: serve-80-tcp}]}\n");
    let connect = |from: &str, ip: &str, port: u16| socat_connect(&env.lab, from, ip, port);
    let (yb, zb) = (env.topo.pod("y/b").netns.clone(), env.topo.pod("z/b").netns.clone());
    assert!(wait_for(Duration::from_secs(5), || !connect(&zb, &xa.ip.to_string(), 80)), "the policy is in place");
    assert!(wait_for(Duration::from_secs(5), || connect(&yb, "10.96.0.20", 8080)), "y/b through the service");
    if connect(&zb, "10.96.0.20", 8080) {
        for n in ["n1", "n2"] {
            let ns = env.lab.node(n).unwrap().ns.clone();
            let out = env.lab.exec(&ns, &["iptables-save"]).unwrap();
            let ct = env.lab.exec(&ns, &["conntrack", "-L"]).unwrap();
            eprintln!("{n}:\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&ct.stdout));
            let root = env.lab.node(n).unwrap().root.clone();
            eprintln!("proxy log {n}: {}", std::fs::read_to_string(root.join("proxy.log")).unwrap_or_default());
            eprintln!("records {n}: {:?}", std::fs::read_dir(root.join("run/tartan/pods")).map(|d| d.count()));
            let m = env.lab.exec(&ns, &["curl", "-s", "http://127.0.0.1:10249/metrics"]).unwrap();
            eprintln!("metrics {n}: {}", String::from_utf8_lossy(&m.stdout));
        }
        eprintln!("x/a {} on {}, z/b {} on {}", xa.ip, xa.node, env.topo.pod("z/b").ip, env.topo.pod("z/b").node);
        let pods = env.lab.tartanctl(&["get", "pods", "-A", "-o", "wide"], None).unwrap();
        eprintln!("{}", String::from_utf8_lossy(&pods.stdout));
        panic!("z/b through the service: denied by x/a's policy");
    }
    assert!(!connect(&zb, &xa.ip.to_string(), 80), "z/b directly: denied");
    // The node x/a runs on reaches it (kubelet probes); the other node's host does not count as the node.
    let own = env.lab.node(&xa.node).unwrap().ns.clone();
    assert!(connect(&own, &xa.ip.to_string(), 80), "the pod's own node is not subject to policy");
    assert!(connect(&own, &xa.ip.to_string(), 81), "not even on a port the policy does not list");

    // Forged source: z/b takes y/b's address as its own; packets it sends with it die at its veth.
    let yb_ip = env.topo.pod("y/b").ip.to_string();
    env.lab.exec(&zb, &["ip", "addr", "add", &format!("{yb_ip}/32"), "dev", "eth0"]).unwrap();
    let cap = netns_lab::Capture::start(&xa.netns, "eth0", "udp dst port 80").unwrap();
    let send = |from: &str, src: Option<&str>| {
        let ns = netns::NetNs::named(from).unwrap();
        let to = std::net::SocketAddr::new(xa.ip, 80);
        ns.run(|| {
            let bind = format!("{}:0", src.unwrap_or("0.0.0.0"));
            let s = std::net::UdpSocket::bind(bind).unwrap();
            s.send_to(b"hello", to).unwrap();
        })
        .unwrap();
    };
    env.apply(&policy("x", "udp-from-y", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 80, protocol: UDP}]}]"));
    std::thread::sleep(Duration::from_millis(500));
    send(&yb, None);
    send(&zb, Some(&yb_ip));
    std::thread::sleep(Duration::from_millis(300));
    let lines = cap.stop().unwrap();
    let zb_ip = env.topo.pod("z/b").ip.to_string();
    let from_yb = lines.iter().filter(|l| l.contains(&format!("{yb_ip}."))).count();
    assert_eq!(from_yb, 1, "the genuine y/b datagram arrives, the forged one does not: {lines:?}");
    assert!(!lines.iter().any(|l| l.contains(&zb_ip)), "{lines:?}");
    assert!(forged_drops(&env, &env.topo.pod("z/b").node, "z/b") >= 1, "dropped by z/b's anti-spoofing check");

    // SCTP: y/a takes SCTP on port 80 only. Crafted INITs from x/b: port 80 arrives, port 81 does not.
    env.apply(&policy(
        "y",
        "sctp",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{protocol: SCTP, port: 80}]}]",
    ));
    let ya = env.topo.pod("y/a").clone();
    // In place once TCP to y/a is refused (the policy lets SCTP only in).
    let xb = env.topo.pod("x/b").netns.clone();
    assert!(wait_for(Duration::from_secs(5), || !connect(&xb, &ya.ip.to_string(), 80)), "the SCTP-only policy");
    let cap = netns_lab::Capture::start(&ya.netns, "eth0", "ip proto 132").unwrap();
    send_sctp_init(&xb, ya.ip, 80);
    send_sctp_init(&xb, ya.ip, 81);
    std::thread::sleep(Duration::from_millis(300));
    let lines = cap.stop().unwrap();
    assert_eq!(lines.len(), 1, "only the INIT to port 80 arrives: {lines:?}");
    assert!(lines[0].contains(".80:") || lines[0].contains(".http:"), "{lines:?}");

    if mode == "ebpf" {
        // Each pod's veth carries the policy programs (pinned links), and nothing of policy is left in iptables.
        for n in ["n1", "n2"] {
            let links: Vec<String> = std::fs::read_dir(env.lab.node_bpf_root(n).join("links"))
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            let pods = env.topo.pods.iter().filter(|p| p.node == n).count();
            let from_pod = links.iter().filter(|l| l.starts_with("tartan_from_pod@")).count();
            let to_pod = links.iter().filter(|l| l.starts_with("tartan_to_pod@")).count();
            assert_eq!((from_pod, to_pod), (pods, pods), "{n}: {links:?}");
            let ns = env.lab.node(n).unwrap().ns.clone();
            let save = env.lab.exec(&ns, &["iptables-save", "-t", "filter"]).unwrap();
            let save = String::from_utf8_lossy(&save.stdout);
            assert!(!save.contains("TARTAN-PI-") && !save.contains("TARTAN-PE-"), "{save}");
            // The probes between pods of one node took the fast path (straight to the other pod's interface).
            assert!(ebpf_stat(&env, n, ebpf_maps::stats::FAST_PATH) > 0, "{n}: no packet took the fast path");
            // ... and so did those to and from the other node's pods (out through the vxlan device, in to the pod).
            assert!(ebpf_stat(&env, n, ebpf_maps::stats::FAST_PATH_OUT) > 0, "{n}: none out");
            assert!(ebpf_stat(&env, n, ebpf_maps::stats::FAST_PATH_IN) > 0, "{n}: none in");
            // The counters are metrics too.
            let m = tartan_e2e::proxy_metrics(&env.lab, n);
            let line = m.lines().find(|l| l.starts_with("tartan_proxy_bpf_packets") && l.contains("fast_path_local"));
            let value = line.and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            assert!(value > 0.0, "{n}: {m}");
        }
    }

    // The proxy of x/a's node killed (-9): what it programmed stays in force without it, and the next start adopts
    // it (z/b never gets in, y/b is never refused).
    let (zb_ns, yb_ns, xa_ip) = (zb.clone(), yb.clone(), xa.ip.to_string());
    let pid = env.proxies[&xa.node];
    // SAFETY: kill(2) of a proxy this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    env.lab.stop(pid);
    assert!(!socat_connect(&env.lab, &zb_ns, &xa_ip, 80), "denied while no proxy runs");
    assert!(socat_connect(&env.lab, &yb_ns, &xa_ip, 80), "allowed while no proxy runs");
    let pid = env.lab.start_proxy(&xa.node, &["--mode", mode]).unwrap();
    env.proxies.insert(xa.node.clone(), pid);
    let synced = || {
        let m = tartan_e2e::proxy_metrics(&env.lab, &xa.node);
        tartan_e2e::metric(&m, &format!("tartan_proxy_sync_total{{mode=\"{mode}\"}}")).unwrap_or(0.0) >= 1.0
    };
    assert!(wait_for(Duration::from_secs(10), synced), "the restarted proxy synced");
    assert!(!socat_connect(&env.lab, &zb_ns, &xa_ip, 80), "denied after the restart");
    assert!(socat_connect(&env.lab, &yb_ns, &xa_ip, 80), "allowed after the restart");
    if mode == "ebpf" {
        let links = std::fs::read_dir(env.lab.node_bpf_root(&xa.node).join("links")).unwrap().flatten().count();
        let pods = env.topo.pods.iter().filter(|p| p.node == xa.node).count();
        assert_eq!(links, 8 + 2 * 3 + 2 * pods, "one link per program and place: the old ones were replaced");
    }
}

/// A pod cannot get a flow past another pod's ingress rules by first sending it to a third pod's MAC address (that
/// pod, open, would otherwise let the flow through and have it remembered as allowed). eBPF: a deleted pod's
/// programs go with its veth.
fn a_flow_sent_to_another_pods_mac_first_is_still_decided_by_its_destination(mode: &'static str) {
    let env = Env::new("np-mac", mode);
    // Three pods of one node: the target (isolated, nothing gets in), the sender, and an open third one.
    let node = env.topo.pod("x/a").node.clone();
    let here: Vec<&TopoPod> = env.topo.pods.iter().filter(|p| p.node == node).collect();
    assert!(here.len() >= 3, "three pods on {node}");
    let (target, sender, third) = (here[0].clone(), here[1].clone(), here[2].clone());
    let (tns, tname) = target.id.split_once('/').unwrap();
    env.apply(&policy(
        tns,
        "closed",
        &format!("  podSelector: {{matchLabels: {{pod: {tname}}}}}\n  policyTypes: [Ingress]"),
    ));
    let mac = |netns: &str| -> String {
        let out = env.lab.exec(netns, &["ip", "-j", "link", "show", "eth0"]).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v[0]["address"].as_str().unwrap().to_string()
    };
    let (target_mac, third_mac) = (mac(&target.netns), mac(&third.netns));
    let to = std::net::SocketAddr::new(target.ip, 80);
    let tcp_in = || {
        let ns = netns::NetNs::named(&sender.netns).unwrap();
        ns.run(|| std::net::TcpStream::connect_timeout(&to, Duration::from_millis(300)).is_ok()).unwrap()
    };
    assert!(wait_for(Duration::from_secs(5), || !tcp_in()), "the target is closed");
    let cap = netns_lab::Capture::start(&target.netns, "eth0", "udp dst port 80").unwrap();
    let send = || {
        let ns = netns::NetNs::named(&sender.netns).unwrap();
        ns.run(|| {
            let s = std::net::UdpSocket::bind("0.0.0.0:40999").unwrap();
            s.send_to(b"hello", to).unwrap();
        })
        .unwrap();
    };
    let ip = target.ip.to_string();
    let neigh = |mac: &str| {
        let args = ["ip", "neigh", "replace", &ip, "lladdr", mac, "dev", "eth0", "nud", "permanent"];
        env.lab.exec(&sender.netns, &args).unwrap();
    };
    // First to the third pod's MAC (the bridge delivers it there), then, the same flow, to the target's.
    neigh(&third_mac);
    send();
    neigh(&target_mac);
    send();
    send();
    std::thread::sleep(Duration::from_millis(300));
    let lines = cap.stop().unwrap();
    let from = format!("{}.", sender.ip);
    assert!(!lines.iter().any(|l| l.contains(&from)), "the flow got past the target's policy: {lines:?}");
    if mode == "ebpf" {
        // A pod's programs go with its veth: deleted (CNI DEL), its pinned links are gone after the next sync.
        let pinned = |env: &Env| {
            let links = std::fs::read_dir(env.lab.node_bpf_root(&node).join("links")).unwrap();
            links.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("tartan_from_pod@")).count()
        };
        let before = pinned(&env);
        let mut env = env;
        env.lab.del_pod(&third.id.replace('/', "-")).unwrap();
        assert!(wait_for(Duration::from_secs(5), || pinned(&env) == before - 1), "{} of {before} left", pinned(&env));
    }
}

/// iptables only: the policy chains and sets are repaired when changed by hand, the idle check finds no drift
/// where there is none, and --cleanup removes them.
#[test]
fn iptables_policy_chains_and_sets_are_repaired_and_cleaned_up() {
    let mut env = Env::new("np-repair", "iptables");
    let ya = env.topo.pod("y/a").clone();
    let node = env.lab.node(&ya.node).unwrap().ns.clone();
    env.apply(&policy(
        "y",
        "sctp",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{protocol: SCTP, port: 80}]}]",
    ));
    let save = || {
        String::from_utf8_lossy(&env.lab.exec(&node, &["iptables-save", "-t", "filter"]).unwrap().stdout).into_owned()
    };
    assert!(wait_for(Duration::from_secs(5), || save().contains("-p sctp -m sctp --dport 80")), "{}", save());

    // A rule taken out of TARTAN-POLICY by hand (a revert, as seen once in the lab) is put back by the idle check.
    let policy_rules = || {
        let out = env.lab.exec(&node, &["iptables", "-w", "-S", "TARTAN-POLICY"]).unwrap();
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("-A ")).count()
    };
    let before = policy_rules();
    env.lab.exec(&node, &["iptables", "-w", "-D", "TARTAN-POLICY", "1"]).unwrap();
    assert_eq!(policy_rules(), before - 1);
    assert!(wait_for(Duration::from_secs(3), || policy_rules() == before), "repaired");

    // So is a policy set flushed by hand: no rule changes, but the set's members are gone.
    let set_sizes = || -> BTreeMap<String, usize> {
        let out = env.lab.exec(&node, &["ipset", "save"]).unwrap();
        let mut sizes = BTreeMap::new();
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w[..] {
                ["create", name, ..] if name.starts_with("TARTAN-") => {
                    sizes.insert(name.to_string(), 0);
                }
                ["add", name, ..] if name.starts_with("TARTAN-") => *sizes.get_mut(name).unwrap() += 1,
                _ => {}
            }
        }
        sizes
    };
    // Sets of all three kinds: a selector, an ipBlock with an exception, a named port.
    env.apply(&policy(
        "y",
        "from-b",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress, Egress]\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}, {ipBlock: {cidr: 10.0.0.0/8, except: [10.244.0.0/16]}}]}]\n  egress: [{ports: [{port: serve-80-tcp}]}]",
    ));
    let kinds = |s: &BTreeMap<String, usize>| ["PS-", "NB-", "NP-"].iter().all(|k| s.keys().any(|n| n.contains(k)));
    assert!(wait_for(Duration::from_secs(5), || kinds(&set_sizes())), "{:?}", set_sizes());
    // The idle check compares the kernel's entry counts with what was written: with every kind present it must
    // not see drift where there is none (it would force a full sync every second).
    let full_syncs = || {
        let m = tartan_e2e::http_get(&env.lab, &node, "http://127.0.0.1:10249/metrics").1;
        tartan_e2e::metric(&m, "tartan_proxy_full_sync_total").expect("the full sync counter") as u64
    };
    std::thread::sleep(Duration::from_millis(1500));
    let idle = full_syncs();
    std::thread::sleep(Duration::from_secs(3));
    // At most the periodic one (every 30 s) can fall in the window; a misfiring check would add one per second.
    assert!(full_syncs() - idle <= 1, "full syncs while nothing changed: {}", full_syncs() - idle);
    let sizes = set_sizes();
    let (flushed, _) = sizes.iter().find(|(_, n)| **n > 0).expect("a policy set with members");
    env.lab.exec(&node, &["ipset", "flush", flushed]).unwrap();
    assert_eq!(set_sizes()[flushed], 0);
    assert!(wait_for(Duration::from_secs(3), || set_sizes() == sizes), "set {flushed} refilled: {:?}", set_sizes());

    // --cleanup removes the policy chains and the ipsets too.
    let pid = env.proxies[&ya.node];
    env.lab.stop(pid);
    let proxy = netns_lab::cni::tartan_bin_dir().join("tartan-proxy");
    assert!(env.lab.exec(&node, &[proxy.to_str().unwrap(), "--cleanup"]).unwrap().status.success());
    let after = env.lab.exec(&node, &["iptables-save", "-t", "filter"]).unwrap();
    let after = String::from_utf8_lossy(&after.stdout);
    assert!(!after.contains("TARTAN-P"), "{after}");
    let sets = env.lab.exec(&node, &["ipset", "list", "-n"]).unwrap();
    assert!(!String::from_utf8_lossy(&sets.stdout).contains("TARTAN-"), "sets left behind");
}

tartan_e2e::every_dataplane!(
    conformance_cases_match_the_reference_evaluator,
    label_changes_and_policy_updates_take_effect_within_a_second,
    policy_composes_with_services_host_traffic_forged_sources_and_sctp,
    ipv6_traffic_of_dual_stack_pods_is_policed_too,
    a_flow_sent_to_another_pods_mac_first_is_still_decided_by_its_destination,
);

/// Dual stack: a pod's IPv6 address is policed like its IPv4 one (iptables: ip6tables chains and inet6 sets).
fn ipv6_traffic_of_dual_stack_pods_is_policed_too(mode: &'static str) {
    let mut lab = Lab::new("np-v6").expect("lab");
    lab.build_cluster_with(2, &Backend::Vxlan.dual_stack_config(), 1).expect("cluster");
    for n in ["n1", "n2"] {
        lab.start_proxy(n, &["--mode", mode]).unwrap();
    }
    let docs = [namespace_manifest("x", &[("ns", "x")]), namespace_manifest("y", &[("ns", "y")])]
        .into_iter()
        .chain([("x", "a"), ("x", "b"), ("y", "b")].map(|(ns, p)| pod_manifest(ns, p, &[("pod", p)])))
        .collect::<Vec<_>>()
        .join("---\n");
    let out = lab.tartanctl(&["apply", "-f", "-"], Some(&docs)).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let serve = netns_lab::cni::tartan_bin_dir().join("netns-lab");
    let mut v6 = BTreeMap::new();
    for (node, ns, name) in [("n1", "x", "a"), ("n2", "x", "b"), ("n2", "y", "b")] {
        let r = lab.add_pod_as(node, &format!("{ns}-{name}"), ns, name).unwrap();
        let addr = r["ips"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| i["address"].as_str()?.split('/').next()?.parse::<std::net::IpAddr>().ok())
            .find(|ip| ip.is_ipv6())
            .expect("an IPv6 address");
        let netns = lab.pod(&format!("{ns}-{name}")).unwrap().ns.clone();
        lab.spawn(&netns, &[serve.to_str().unwrap(), "serve", "--tcp", "80", "--udp", "80"]).unwrap();
        v6.insert(format!("{ns}/{name}"), (netns, addr));
    }
    let connect = |from: &str, to: &str| {
        let ns = netns::NetNs::named(&v6[from].0).unwrap();
        let addr = std::net::SocketAddr::new(v6[to].1, 80);
        ns.run(|| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()).unwrap()
    };
    assert!(wait_for(Duration::from_secs(5), || connect("x/b", "x/a") && connect("y/b", "x/a")), "open before");
    let out = lab
        .tartanctl(
            &["apply", "-f", "-"],
            Some(&policy("x", "from-y", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]")),
        )
        .unwrap();
    assert!(out.status.success());
    assert!(wait_for(Duration::from_secs(5), || !connect("x/b", "x/a")), "x/b is refused over IPv6");
    assert!(connect("y/b", "x/a"), "y/b is let in over IPv6");
    if mode != "iptables" {
        return;
    }
    let n1 = lab.node("n1").unwrap().ns.clone();
    let save =
        String::from_utf8_lossy(&lab.exec(&n1, &["ip6tables-save", "-t", "filter"]).unwrap().stdout).into_owned();
    assert!(
        save.lines()
            .any(|l| l.starts_with("-A TARTAN-POLICY -d ") && l.contains("/128") && l.contains("-j TARTAN-PI-")),
        "{save}"
    );
    assert!(save.contains("--match-set TARTAN-6PS-"), "{save}");
}
