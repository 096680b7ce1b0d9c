//! Helpers shared by the end-to-end tests: a one-node lab, direct plugin invocations, and readers of kernel
//! state (`ip -j`, `iptables-save`) inside lab namespaces.

use std::path::PathBuf;

use netns_lab::cni::{exec_raw, PluginRun};
use netns_lab::{Lab, NodeState};
use serde_json::{json, Value};

/// Runs each named test once per dataplane: `iptables::name` and `ebpf::name`, one suite for both.
#[macro_export]
macro_rules! every_dataplane {
    ($($name:ident),* $(,)?) => {
        mod iptables {
            $( #[test] fn $name() { super::$name("iptables") } )*
        }
        mod ebpf {
            $( #[test] fn $name() { super::$name("ebpf") } )*
        }
    };
}

/// A lab with one node `n1` (on the underlay, with an outside host) and nothing else.
pub struct OneNode {
    pub lab: Lab,
    pub node: NodeState,
}

impl OneNode {
    pub fn new(tag: &str) -> OneNode {
        assert!(nix_is_root(), "the end-to-end tests need root (network namespaces)");
        let mut lab = Lab::new(tag).expect("lab");
        let node = lab.add_node("n1").expect("node");
        lab.add_outside().expect("outside host");
        OneNode { lab, node }
    }

    /// A plugin config for this node: `tartan` with host-local `subnet`, node-local dirs, plus `extra` fields.
    pub fn conf(&self, subnet: &str, extra: Value) -> Value {
        let mut c = json!({
            "cniVersion": "1.1.0",
            "name": "testnet",
            "type": "tartan",
            "bridge": "cni0",
            "isDefaultGateway": true,
            "runDir": self.node.root.join("run/tartan"),
            "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]], "dataDir": self.data_dir()},
        });
        merge(&mut c, extra);
        c
    }

    pub fn data_dir(&self) -> PathBuf {
        self.node.root.join("var/lib/cni/networks")
    }

    /// Address files of a network's store.
    pub fn ip_files(&self, network: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.data_dir().join(network))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// A pod namespace (no networking yet).
    pub fn pod_ns(&mut self, name: &str) -> String {
        self.lab.add_ns(&format!("p-{name}")).expect("pod ns")
    }

    /// Runs `tartan` in the node namespace like a runtime would.
    pub fn plugin(&self, command: &str, container: &str, netns: Option<&str>, ifname: &str, conf: &Value) -> PluginRun {
        let netns_path = netns.map(|n| format!("/run/netns/{n}"));
        let mut env = vec![("CNI_COMMAND", command), ("CNI_CONTAINERID", container), ("CNI_IFNAME", ifname)];
        if let Some(p) = &netns_path {
            env.push(("CNI_NETNS", p));
        }
        let path = netns_lab::cni::plugin_path();
        env.push(("CNI_PATH", &path));
        exec_raw(&self.node.ns, &tartan(), &env, conf.to_string().as_bytes()).expect("run tartan")
    }

    /// ADD that must succeed; returns the result.
    pub fn add(&self, container: &str, netns: &str, conf: &Value) -> Value {
        let r = self.plugin("ADD", container, Some(netns), "eth0", conf);
        assert!(r.success, "ADD {container} failed: {} {}", r.stdout, r.stderr);
        r.json().expect("result JSON")
    }

    pub fn del(&self, container: &str, netns: Option<&str>, conf: &Value) {
        let r = self.plugin("DEL", container, netns, "eth0", conf);
        assert!(r.success, "DEL {container} failed: {} {}", r.stdout, r.stderr);
    }

    /// `ip -j ARGS` inside `ns`.
    pub fn ip_json(&self, ns: &str, args: &[&str]) -> Value {
        let mut argv = vec!["ip", "-j"];
        argv.extend_from_slice(args);
        let out = self.lab.exec(ns, &argv).expect("ip -j");
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Array(vec![]))
    }

    /// Names of the links in `ns`.
    pub fn links(&self, ns: &str) -> Vec<String> {
        self.ip_json(ns, &["link", "show"])
            .as_array()
            .map(|a| a.iter().filter_map(|l| l["ifname"].as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    }

    /// `iptables-save` and `ip6tables-save` lines in the node that mention tartan.
    pub fn tartan_rules(&self) -> Vec<String> {
        let mut v = Vec::new();
        for bin in ["iptables-save", "ip6tables-save"] {
            let out = self.lab.exec(&self.node.ns, &[bin]).expect("iptables-save");
            v.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| l.to_ascii_lowercase().contains("tartan"))
                    .map(str::to_string),
            );
        }
        v
    }
}

/// The address (without prefix) of the result's first IP of `family` (4 or 6).
pub fn result_ip(r: &Value, family: u8) -> String {
    r["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["address"].as_str())
        .find(|a| a.contains(':') == (family == 6))
        .and_then(|a| a.split('/').next())
        .unwrap_or_default()
        .to_string()
}

/// JSON merge: objects recursively, everything else replaced.
pub fn merge(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Object(b), Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, e) => *b = e,
    }
}

pub fn tartan() -> PathBuf {
    netns_lab::cni::tartan_bin_dir().join("tartan")
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// An HTTP GET of `path` from a daemon's status port inside `ns`: (status code, body).
pub fn http_get(lab: &netns_lab::Lab, ns: &str, url: &str) -> (u16, String) {
    let out = lab.exec_status(ns, &["curl", "-s", "-m", "2", "-w", "\n%{http_code}", url]).expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// An exposition parsed with a Prometheus text parser.
pub fn scrape(text: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("a Prometheus exposition")
}

/// The value of `series` (`name`, or `name{label="value",...}` naming some of its labels) in an exposition: the sum
/// over the samples of that name whose labels include those given. None when no sample matches.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    let (name, want) = match series.split_once('{') {
        Some((n, rest)) => {
            let labels: Vec<(String, String)> = rest
                .trim_end_matches('}')
                .split(',')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').expect("label=\"value\"");
                    (k.trim().to_string(), v.trim().trim_matches('"').to_string())
                })
                .collect();
            (n, labels)
        }
        None => (series, Vec::new()),
    };
    let mut found = None;
    for s in scrape(text).samples.iter().filter(|s| s.metric == name) {
        if !want.iter().all(|(k, v)| s.labels.get(k) == Some(v.as_str())) {
            continue;
        }
        let v = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        *found.get_or_insert(0.0) += v;
    }
    found
}

/// tartan-agent's metrics on `node`, served on its --healthz-port.
pub fn agent_metrics(lab: &netns_lab::Lab, node: &str, port: u16) -> String {
    let ns = lab.node(node).expect("node").ns.clone();
    http_get(lab, &ns, &format!("http://127.0.0.1:{port}/metrics")).1
}

/// tartan-proxy's metrics on `node` (the lab's default port).
pub fn proxy_metrics(lab: &netns_lab::Lab, node: &str) -> String {
    let ns = lab.node(node).expect("node").ns.clone();
    http_get(lab, &ns, "http://127.0.0.1:10249/metrics").1
}
