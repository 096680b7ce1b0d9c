//! The cluster store and `tartanctl` against a real etcd in a lab: round trips, validation that writes nothing,
//! concurrent allocation, watches across compaction, pods published by the agent, derived endpoints.

use std::time::Duration;

use kube_objects::{Kind, Object};
use netns_lab::cluster::Backend;
use netns_lab::{wait_for, Lab};
use store::{Event, Store};

fn lab(tag: &str) -> Lab {
    let mut lab = Lab::new(tag).expect("lab");
    lab.ensure_underlay().unwrap();
    lab.start_etcd().unwrap();
    lab
}

/// Runs `f` with a store client made inside the etcd namespace (where 127.0.0.1:2379 is etcd).
fn with_store<T: Send>(lab: &Lab, f: impl AsyncFnOnce(&mut Store) -> T + Send) -> T {
    let ns = netns::NetNs::named(&lab.ns_name("etcd")).unwrap();
    ns.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut s = Store::connect("http://127.0.0.1:2379", "/tartan", None).await.unwrap();
            f(&mut s).await
        })
    })
    .unwrap()
}

fn ctl(lab: &Lab, args: &[&str], input: Option<&str>) -> (bool, String, String) {
    let out = lab.tartanctl(args, input).unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn keys(lab: &Lab) -> Vec<String> {
    lab.etcdctl(&["get", "--prefix", "--keys-only", "/tartan/"])
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

fn examples() -> String {
    format!("{}/../examples", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_examples_apply_and_every_kind_round_trips() {
    let lab = lab("st-rt");
    let (ok, out, err) = ctl(&lab, &["apply", "-f", &examples()], None);
    assert!(ok, "{out}{err}");
    for r in [
        "namespace/dev created",
        "service/redis created",
        "service/myapp created",
        "networkpolicy/allow-80-ingress created",
    ] {
        assert!(out.contains(r), "{r}: {out}");
    }
    let (_, again, _) = ctl(&lab, &["apply", "-f", &examples()], None);
    assert!(!again.contains("created") && !again.contains("configured"), "a second apply changes nothing: {again}");
    let (_, svc, _) = ctl(&lab, &["get", "svc", "redis", "-o", "json"], None);
    let svc: serde_json::Value = serde_json::from_str(&svc).unwrap();
    assert_eq!(svc["spec"]["clusterIP"], "10.96.0.100");
    let (_, np, _) = ctl(&lab, &["get", "svc", "myapp", "-o", "json"], None);
    assert!(np.contains("\"nodePort\": 30080"), "{np}");
    let (_, ns, _) = ctl(&lab, &["get", "ns", "dev", "-o", "json"], None);
    assert!(ns.contains("\"kubernetes.io/metadata.name\": \"dev\""), "{ns}");
    let (_, pol, _) = ctl(&lab, &["get", "netpol", "allow-80-ingress", "-o", "yaml"], None);
    assert!(pol.contains("10.244.1.2/32") && pol.contains("443"), "{pol}");

    // Every kind through the library: what goes in comes back, with resourceVersion = the etcd revision.
    let manifests = r#"
apiVersion: v1
kind: Node
metadata: {name: n9, labels: {zone: a}}
spec: {podCIDR: 10.244.9.0/24}
status: {addresses: [{type: InternalIP, address: 198.18.0.9}]}
---
apiVersion: v1
kind: Endpoints
metadata: {name: ext}
subsets: [{addresses: [{ip: 198.18.0.254}], ports: [{port: 8080, name: web}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: p1, namespace: dev, labels: {app: x}}
spec: {nodeName: n9, containers: [{name: c, image: busybox, ports: [{name: http, containerPort: 80}]}]}
"#;
    let docs = kube_objects::parse_manifests(manifests, "inline").unwrap();
    let back = with_store(&lab, async |s| {
        let mut out = Vec::new();
        for d in docs {
            let (written, _) = s.put(d.object.clone()).await.unwrap();
            let m = written.meta();
            let read = s.get(written.kind(), m.namespace.as_deref(), &m.name).await.unwrap().unwrap();
            out.push((d.object, written, read));
        }
        out
    });
    for (sent, written, read) in back {
        assert_eq!(written, read, "{}", sent.reference());
        let strip = |o: &Object| {
            let mut o = o.clone();
            let m = o.meta_mut();
            (m.resource_version, m.uid, m.creation_timestamp) = (None, None, None);
            o
        };
        assert_eq!(strip(&sent), strip(&read), "{}", sent.reference());
        assert!(read.meta().resource_version.as_deref().unwrap().parse::<i64>().unwrap() > 0);
    }
}

#[test]
fn an_invalid_manifest_writes_nothing_and_says_where() {
    let lab = lab("st-bad");
    let good = "apiVersion: v1\nkind: Namespace\nmetadata: {name: fine}\n---\n";
    let cases = [
        ("metadata: {name: Bad_Name}\nspec: {ports: [{port: 80}]}", "metadata.name"),
        ("metadata: {name: s, labels: {\"bad key!\": x}}\nspec: {ports: [{port: 80}]}", "metadata.labels"),
        ("metadata: {name: s}\nspec: {ports: [{port: 70000}]}", "spec.ports[0].port"),
        ("metadata: {name: s}\nspec: {ports: [{port: 80, protocol: ICMP}]}", "spec.ports[0].protocol"),
        ("metadata: {name: s}\nspec: {type: NodePort, ports: [{port: 80, nodePort: 80}]}", "spec.ports[0].nodePort"),
        ("metadata: {name: s}\nspec: {clusterIP: 192.168.0.1, ports: [{port: 80}]}", "spec.clusterIP"),
        ("metadata: {name: s}\nspec: {type: ExternalName}", "spec.externalName"),
        ("metadata: {name: s}\nspec: {sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}, ports: [{port: 80}]}", "timeoutSeconds"),
        ("metadata: {name: s}\nspec: {ports: []}", "spec.ports"),
    ];
    for (svc, field) in cases {
        let text = format!("{good}apiVersion: v1\nkind: Service\n{svc}\n");
        let (ok, out, err) = ctl(&lab, &["apply", "-f", "-"], Some(&text));
        assert!(!ok, "{svc}: accepted: {out}");
        assert!(err.contains("-: document 2") && err.contains(field), "{svc}: {err}");
        assert!(keys(&lab).is_empty(), "{svc}: nothing written, not even the valid namespace: {:?}", keys(&lab));
    }
    let policy = format!(
        "{good}apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p}}\nspec:\n  podSelector: {{matchExpressions: [{{key: app, operator: Maybe}}]}}\n  ingress: [{{from: [{{ipBlock: {{cidr: 10.0.0.0/8, except: [192.168.0.0/16]}}}}], ports: [{{port: http, endPort: 90}}]}}]\n"
    );
    let (ok, _, err) = ctl(&lab, &["apply", "-f", "-"], Some(&policy));
    assert!(!ok);
    for f in [
        "spec.podSelector.matchExpressions[0].operator",
        "spec.ingress[0].from[0].ipBlock.except[0]",
        "spec.ingress[0].ports[0].endPort",
    ] {
        assert!(err.contains(f), "{f}: {err}");
    }
    let pod = format!("{good}apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec: {{containers: []}}\n");
    let (ok, _, err) = ctl(&lab, &["apply", "-f", "-"], Some(&pod));
    assert!(!ok && err.contains("spec.containers"), "{err}");
    let kind = format!("{good}apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\n");
    let (ok, _, err) = ctl(&lab, &["apply", "-f", "-"], Some(&kind));
    assert!(!ok && err.contains("document 2: kind: Unsupported value: \"Deployment\""), "{err}");
    assert!(keys(&lab).is_empty(), "{:?}", keys(&lab));
}

#[test]
fn twenty_concurrent_applies_get_twenty_distinct_cluster_ips_and_node_ports() {
    let lab = lab("st-conc");
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let text = format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec: {{type: NodePort, ports: [{{port: 80}}]}}\n");
            let mut cmd = lab.cmd(&lab.ns_name("etcd"), netns_lab::cni::tartan_bin_dir().join("tartanctl")).unwrap();
            cmd.args(["--etcd-endpoints", "http://127.0.0.1:2379", "apply", "-f", "-"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            let mut child = cmd.spawn().unwrap();
            use std::io::Write;
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
            child
        })
        .collect();
    for h in handles {
        let out = h.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let (_, json, _) = ctl(&lab, &["get", "svc", "-o", "json"], None);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 20);
    let ips: std::collections::BTreeSet<&str> =
        items.iter().map(|s| s["spec"]["clusterIP"].as_str().unwrap()).collect();
    let ports: std::collections::BTreeSet<i64> =
        items.iter().map(|s| s["spec"]["ports"][0]["nodePort"].as_i64().unwrap()).collect();
    assert_eq!((ips.len(), ports.len()), (20, 20), "{ips:?} {ports:?}");
    let range: ipnet::Ipv4Net = "10.96.0.0/12".parse().unwrap();
    assert!(ips.iter().all(|ip| range.contains(&ip.parse::<std::net::Ipv4Addr>().unwrap())));
    assert!(ports.iter().all(|p| (30000..=32767).contains(p)));
    let allocs = keys(&lab).iter().filter(|k| k.contains("/allocations/")).count();
    assert_eq!(allocs, 40, "one key per address and per port");
    // Deleting a service frees what it held.
    let (ok, out, _) = ctl(&lab, &["delete", "svc", "s0"], None);
    assert!(ok && out.contains("service \"s0\" deleted"), "{out}");
    assert_eq!(keys(&lab).iter().filter(|k| k.contains("/allocations/")).count(), 38);
}

#[test]
fn a_watch_survives_compaction_by_relisting() {
    let lab = lab("st-watch");
    let (ok, _, err) = ctl(&lab, &["apply", "-f", &format!("{}/namespaces.yaml", examples())], None);
    assert!(ok, "{err}");
    let result = with_store(&lab, async |s| {
        let (objs, rev) = s.snapshot().await.unwrap();
        assert!(objs.iter().any(|o| o.meta().name == "dev"));
        // Changes after the listing, then a compaction past them.
        for name in ["a", "b", "c"] {
            let o = kube_objects::parse_manifests(
                &format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n"),
                "x",
            )
            .unwrap();
            s.put(o[0].object.clone()).await.unwrap();
        }
        let (_, now) = s.snapshot().await.unwrap();
        s.compact(now).await.unwrap();
        let mut w = s.watch(rev).await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), w.next()).await.unwrap().unwrap();
        assert_eq!(first, vec![Event::Resync], "a compacted revision means: re-list");
        let (objs, rev) = s.snapshot().await.unwrap();
        let names: Vec<String> = objs.iter().map(|o| o.meta().name.clone()).collect();
        let mut w = s.watch(rev).await.unwrap();
        s.delete(Kind::Namespace, None, "a").await.unwrap();
        let next = tokio::time::timeout(Duration::from_secs(5), w.next()).await.unwrap().unwrap();
        (names, next)
    });
    let (names, next) = result;
    assert!(["a", "b", "c", "dev", "prod"].iter().all(|n| names.contains(&n.to_string())), "{names:?}");
    assert_eq!(next, vec![Event::Delete { kind: Kind::Namespace, namespace: None, name: "a".into() }]);
}

#[test]
fn pods_wired_by_the_plugin_show_up_with_their_ip_and_go_on_del() {
    let mut lab = Lab::new("st-pods").unwrap();
    lab.build_cluster(2, Backend::HostGw, 1).unwrap();
    let r = lab.add_pod("n2", "web-1", "default").unwrap();
    let ip = r["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().to_string();
    let row = |lab: &Lab| row_of(lab, "web-1");
    assert!(
        wait_for(Duration::from_secs(1), || row(&lab)
            .is_some_and(|l| l.contains(&ip) && l.contains(" n2") && l.contains("1/1"))),
        "{:?}",
        row(&lab)
    );
    let (_, nodes, _) = ctl(&lab, &["get", "nodes", "-o", "wide"], None);
    assert!(nodes.contains("198.18.0.1") && nodes.contains("198.18.0.2") && nodes.contains("10.244."), "{nodes}");
    lab.del_pod("web-1").unwrap();
    assert!(wait_for(Duration::from_secs(1), || row(&lab).is_none()), "gone after DEL: {:?}", row(&lab));

    // A pod that was applied keeps its object; DEL clears its address and readiness.
    let (ok, _, err) = ctl(
        &lab,
        &["apply", "-f", "-"],
        Some(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web-2, labels: {app: web}}\nspec: {containers: [{name: c}]}\n",
        ),
    );
    assert!(ok, "{err}");
    lab.add_pod("n1", "web-2", "default").unwrap();
    assert!(wait_for(Duration::from_secs(1), || row_of(&lab, "web-2")
        .is_some_and(|l| l.contains("Running") && l.contains(" n1"))));
    lab.del_pod("web-2").unwrap();
    assert!(
        wait_for(Duration::from_secs(1), || row_of(&lab, "web-2")
            .is_some_and(|l| l.contains("0/1") && l.contains("<none>"))),
        "{:?}",
        row_of(&lab, "web-2")
    );
}

fn row_of(lab: &Lab, name: &str) -> Option<String> {
    let (_, out, _) = ctl(lab, &["get", "pods", "-o", "wide"], None);
    out.lines().find(|l| l.starts_with(&format!("{name} "))).map(String::from)
}

#[test]
fn derived_endpoints_follow_labels_and_readiness() {
    let lab = lab("st-ep");
    let pod = |name: &str, app: &str, ip: &str, ready: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: {app}}}}}\nspec: {{containers: [{{name: c, ports: [{{name: redis, containerPort: 6379}}]}}]}}\nstatus: {{phase: Running, podIP: {ip}, conditions: [{{type: Ready, status: \"{ready}\"}}]}}\n---\n")
    };
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: redis}\nspec: {selector: {app: redis}, ports: [{port: 6379, targetPort: redis}]}\n";
    let apply = |text: String| {
        let (ok, out, err) = ctl(&lab, &["apply", "-f", "-"], Some(&text));
        assert!(ok, "{out}{err}");
    };
    let ep = || ctl(&lab, &["get", "ep", "redis"], None).1;
    apply(format!("{}{}{svc}", pod("a", "redis", "10.244.1.5", "True"), pod("b", "redis", "10.244.2.5", "True")));
    assert!(ep().contains("10.244.1.5:6379,10.244.2.5:6379"), "{}", ep());
    apply(pod("b", "web", "10.244.2.5", "True"));
    assert!(ep().contains("10.244.1.5:6379") && !ep().contains("10.244.2.5"), "label changed: {}", ep());
    apply(pod("a", "redis", "10.244.1.5", "False"));
    assert!(ep().contains("<none>"), "not ready: {}", ep());
    apply(pod("b", "redis", "10.244.2.5", "True"));
    assert!(ep().contains("10.244.2.5:6379") && !ep().contains("10.244.1.5"), "{}", ep());
}

#[test]
fn ip_families_are_allocated_as_the_api_server_does() {
    let lab = lab("st-ds");
    let svc = |name: &str, extra: &str| {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{{extra}selector: {{app: a}}, ports: [{{port: 80}}]}}\n")
    };
    let ips = |name: &str| -> serde_json::Value {
        let (ok, out, err) = ctl(&lab, &["get", "svc", name, "-o", "json"], None);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        serde_json::json!([v["spec"]["clusterIPs"], v["spec"]["ipFamilies"], v["spec"]["ipFamilyPolicy"]])
    };
    // A single-stack cluster (the default range only).
    let (ok, _, err) = ctl(&lab, &["apply", "-f", "-"], Some(&svc("req", "ipFamilyPolicy: RequireDualStack, ")));
    assert!(!ok && err.contains("spec.ipFamilyPolicy") && err.contains("dual stack"), "{err}");
    let (ok, _, err) = ctl(&lab, &["apply", "-f", "-"], Some(&svc("v6", "ipFamilies: [IPv6], ")));
    assert!(!ok && err.contains("no IPv6 service range"), "{err}");
    assert!(ctl(&lab, &["apply", "-f", "-"], Some(&svc("pref", "ipFamilyPolicy: PreferDualStack, "))).0);
    let v = ips("pref");
    assert_eq!(v[0].as_array().unwrap().len(), 1, "preferred, not required: {v}");
    assert_eq!(v[1], serde_json::json!(["IPv4"]));
    // Dual stack.
    lab.etcdctl(&["put", "/tartan/config", r#"{"serviceCIDR": "10.96.0.0/12,fd00:10:96::/112"}"#]).unwrap();
    assert!(
        ctl(
            &lab,
            &["apply", "-f", "-"],
            Some(&svc("both", "ipFamilyPolicy: RequireDualStack, ipFamilies: [IPv6, IPv4], "))
        )
        .0
    );
    let v = ips("both");
    let got: Vec<&str> = v[0].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert!(got.len() == 2 && got[0].starts_with("fd00:10:96::") && got[1].starts_with("10."), "IPv6 primary: {v}");
    assert_eq!(v[2], "RequireDualStack");
    assert!(ctl(&lab, &["apply", "-f", "-"], Some(&svc("single", ""))).0);
    assert_eq!(ips("single")[1], serde_json::json!(["IPv4"]), "the cluster's primary family");
    // Re-applying without the fields keeps what was allocated.
    assert!(ctl(&lab, &["apply", "-f", "-"], Some(&svc("both", ""))).0);
    assert_eq!(ips("both"), v, "kept");
    let keys = keys(&lab);
    assert!(keys.iter().any(|k| k.starts_with("/tartan/allocations/clusterips/fd00:10:96::")), "{keys:?}");
}

#[test]
fn tartanctl_logs_what_v_and_the_log_filter_ask_for() {
    let lab = lab("st-log");
    let (ok, _, quiet) = ctl(&lab, &["get", "pods"], None);
    assert!(ok && !quiet.contains("connecting to the store"), "{quiet}");
    let (ok, _, verbose) = ctl(&lab, &["-v", "2", "get", "pods"], None);
    assert!(ok && verbose.contains("DEBUG") && verbose.contains("connecting to the store"), "{verbose}");
    // The same through the filter variable, and JSON lines with the applied object as a field.
    let run = |env: &[(&str, &str)], args: &[&str], input: Option<&str>| {
        let mut cmd = lab.cmd(&lab.ns_name("etcd"), netns_lab::cni::tartan_bin_dir().join("tartanctl")).unwrap();
        cmd.args(["--etcd-endpoints", "http://127.0.0.1:2379"]).args(args).envs(env.iter().copied());
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        use std::io::Write;
        // A refused run exits before it reads its input.
        let _ = child.stdin.take().unwrap().write_all(input.unwrap_or("").as_bytes());
        let out = child.wait_with_output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: logged}\n";
    let (ok, err) = run(&[("TARTAN_LOG", "debug")], &["--logging-format", "json", "apply", "-f", "-"], Some(ns));
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = err.lines().map(|l| serde_json::from_str(l).expect(l)).collect();
    assert!(lines.iter().any(|v| v["level"] == "DEBUG" && v["object"] == "namespace/logged"), "{err}");
    // A filter that does not parse is refused, naming the variable, before anything is done.
    let other = "apiVersion: v1\nkind: Namespace\nmetadata: {name: never}\n";
    let (ok, err) = run(&[("TARTAN_LOG", "debug,tartanctl=loud")], &["apply", "-f", "-"], Some(other));
    assert!(!ok && err.contains("TARTAN_LOG=") && err.contains("not a log filter"), "{err}");
    assert!(!keys(&lab).iter().any(|k| k.contains("never")), "{:?}", keys(&lab));
}
