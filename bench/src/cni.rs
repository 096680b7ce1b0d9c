//! CNI ADD/DEL latency. Both plugins run the same way (the same process spawn and setns into the same kind of
//! node namespace, the same config options, a fresh node per case), alternating case by case in one run.

use std::time::Instant;

use anyhow::{bail, Result};
use netns_lab::cni::{exec_raw, PluginRun};
use netns_lab::Lab;
use serde_json::{json, Value};

use crate::stats::{ms, percentile};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Impl {
    Tartan,
    Reference,
}

impl Impl {
    fn name(self) -> &'static str {
        match self {
            Impl::Tartan => "tartan",
            Impl::Reference => "reference bridge+host-local",
        }
    }
}

struct Node {
    lab: Lab,
    ns: String,
    conf: Value,
    plugin: std::path::PathBuf,
}

impl Node {
    fn new(imp: Impl, masq: bool) -> Result<Node> {
        let mut lab = Lab::new("bench")?;
        let node = lab.add_node("n1")?;
        let data_dir = node.root.join("var/lib/cni/networks");
        let (ty, plugin) = match imp {
            Impl::Tartan => ("tartan", netns_lab::cni::tartan_bin_dir().join("tartan")),
            Impl::Reference => ("bridge", "/usr/lib/cni/bridge".into()),
        };
        let conf = json!({
            // The reference plugins (1.1.1) speak up to 1.0.0.
            "cniVersion": "1.0.0",
            "name": "benchnet",
            "type": ty,
            "bridge": "cni0",
            "isGateway": true,
            "ipMasq": masq,
            "runDir": node.root.join("run/tartan"),
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.200.0.0/16"}]], "dataDir": data_dir},
        });
        Ok(Node { ns: node.ns.clone(), lab, conf, plugin })
    }

    fn pods(&mut self, n: usize, tag: &str) -> Result<Vec<String>> {
        (0..n).map(|i| self.lab.add_ns(&format!("p{tag}{i}"))).collect()
    }

    fn call(&self, cmd: &str, id: &str, netns: &str) -> Result<PluginRun> {
        let netns = format!("/run/netns/{netns}");
        let env = [
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", id),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
        ];
        let r = exec_raw(&self.ns, &self.plugin, &env, self.conf.to_string().as_bytes())?;
        if !r.success {
            bail!("{cmd} {id} failed: {} {}", r.stdout, r.stderr);
        }
        Ok(r)
    }
}

#[derive(Default, Clone)]
struct Figures {
    add_med: f64,
    add_p99: f64,
    del_med: f64,
    del_p99: f64,
    par10_add: f64,
    par10_del: f64,
    par50_add: f64,
    par50_del: f64,
    version_med: f64,
}

/// Median over `batches` of the wall time of `n` simultaneous calls.
fn parallel(node: &mut Node, n: usize, batches: usize, tag: &str) -> Result<(f64, f64)> {
    let mut adds = Vec::new();
    let mut dels = Vec::new();
    for b in 0..batches {
        let pods = node.pods(n, &format!("{tag}b{b}x"))?;
        let ids: Vec<String> = (0..n).map(|i| format!("{tag}-{b}-{i}")).collect();
        for (cmd, out) in [("ADD", &mut adds), ("DEL", &mut dels)] {
            let node = &*node;
            let start = Instant::now();
            std::thread::scope(|s| -> Result<()> {
                let hs: Vec<_> = pods.iter().zip(&ids).map(|(p, id)| s.spawn(move || node.call(cmd, id, p))).collect();
                for h in hs {
                    h.join().expect("thread")?;
                }
                Ok(())
            })?;
            out.push(ms(start.elapsed()));
        }
        for p in pods {
            node.lab.del_ns(&p)?;
        }
    }
    Ok((percentile(&mut adds, 0.5), percentile(&mut dels, 0.5)))
}

fn measure(imp: Impl, masq: bool, runs: usize, batches: usize) -> Result<Figures> {
    let mut node = Node::new(imp, masq)?;
    let mut f = Figures::default();
    // Warm up: the bridge exists and the masquerade rules are in place, as on a node already running pods.
    let warm = node.pods(1, "w")?;
    node.call("ADD", "warm", &warm[0])?;

    let pods = node.pods(runs, "s")?;
    let mut adds = Vec::with_capacity(runs);
    for (i, p) in pods.iter().enumerate() {
        adds.push(ms(node.call("ADD", &format!("seq{i}"), p)?.elapsed));
    }
    let mut dels = Vec::with_capacity(runs);
    for (i, p) in pods.iter().enumerate() {
        dels.push(ms(node.call("DEL", &format!("seq{i}"), p)?.elapsed));
    }
    f.add_med = percentile(&mut adds, 0.5);
    f.add_p99 = percentile(&mut adds, 0.99);
    f.del_med = percentile(&mut dels, 0.5);
    f.del_p99 = percentile(&mut dels, 0.99);
    for p in pods {
        node.lab.del_ns(&p)?;
    }
    (f.par10_add, f.par10_del) = parallel(&mut node, 10, batches, "q")?;
    (f.par50_add, f.par50_del) = parallel(&mut node, 50, batches, "r")?;

    let mut versions = Vec::new();
    for _ in 0..runs {
        let env = [("CNI_COMMAND", "VERSION")];
        versions.push(ms(exec_raw(&node.ns, &node.plugin, &env, b"{\"cniVersion\":\"1.0.0\"}")?.elapsed));
    }
    f.version_med = percentile(&mut versions, 0.5);
    node.call("DEL", "warm", &warm[0])?;
    Ok(f)
}

/// The kernel's share: a veth pair created into a pod namespace and deleted again by `ip`, with no plugin (the
/// same process start, the same kind of namespaces). Median ms of (create, delete).
fn kernel_floor(runs: usize) -> Result<(f64, f64)> {
    let mut lab = Lab::new("floor")?;
    let node = lab.add_ns("n")?;
    let mut adds = Vec::new();
    let mut dels = Vec::new();
    for i in 0..runs {
        let pod = lab.add_ns(&format!("p{i}"))?;
        let start = Instant::now();
        lab.exec(&node, &["ip", "link", "add", "vethfloor", "type", "veth", "peer", "name", "eth0", "netns", &pod])?;
        adds.push(ms(start.elapsed()));
        let start = Instant::now();
        lab.exec(&pod, &["ip", "link", "del", "eth0"])?;
        dels.push(ms(start.elapsed()));
        lab.del_ns(&pod)?;
    }
    Ok((percentile(&mut adds, 0.5), percentile(&mut dels, 0.5)))
}

pub fn run(runs: usize, batches: usize) -> Result<()> {
    println!(
        "CNI ADD/DEL latency, {runs} sequential runs, parallel batches x{batches}, times in ms (wall clock per call,"
    );
    println!("including process start), tartan vs {} in the same run.\n", Impl::Reference.name());
    for masq in [true, false] {
        let reference = measure(Impl::Reference, masq, runs, batches)?;
        let tartan = measure(Impl::Tartan, masq, runs, batches)?;
        println!("### ipMasq {}\n", if masq { "on" } else { "off" });
        println!("| measure | reference | tartan | ratio |");
        println!("|---|---:|---:|---:|");
        let rows: [(&str, f64, f64); 9] = [
            ("ADD median", reference.add_med, tartan.add_med),
            ("ADD p99", reference.add_p99, tartan.add_p99),
            ("DEL median", reference.del_med, tartan.del_med),
            ("DEL p99", reference.del_p99, tartan.del_p99),
            ("10 parallel ADD, wall", reference.par10_add, tartan.par10_add),
            ("10 parallel DEL, wall", reference.par10_del, tartan.par10_del),
            ("50 parallel ADD, wall", reference.par50_add, tartan.par50_add),
            ("50 parallel DEL, wall", reference.par50_del, tartan.par50_del),
            ("VERSION (process start) median", reference.version_med, tartan.version_med),
        ];
        for (name, r, t) in rows {
            println!("| {name} | {r:.2} | {t:.2} | {:.2}x |", t / r);
        }
        println!();
    }
    let (add, del) = kernel_floor(runs)?;
    println!("### Kernel floor (no plugin): `ip` creating a veth pair into a pod namespace, and deleting it\n");
    println!("| measure | median |\n|---|---:|");
    println!("| veth pair create (`ip link add ... netns pod`) | {add:.2} |");
    println!("| veth pair delete (`ip link del eth0` in the pod) | {del:.2} |\n");
    Ok(())
}
