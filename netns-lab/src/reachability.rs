//! The NetworkPolicy conformance topology and its reachability matrix, as the Kubernetes network-policy suites lay
//! them out: namespaces x, y and z (labelled `ns: <name>`), each with pods a, b and c (labelled `pod: <name>`)
//! spread over the nodes, every pod serving TCP and UDP on ports 80 and 81 under the named ports
//! `serve-<port>-<tcp|udp>`. A probe fills the whole matrix (source pod x destination pod x protocol x port) in
//! parallel and prints it as truth tables, one per protocol and port.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{wait_for, Lab};

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const PODS: [&str; 3] = ["a", "b", "c"];
pub const PORTS: [u16; 2] = [80, 81];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }
}

/// One column group of the matrix: a protocol and a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Probe {
    pub proto: Proto,
    pub port: u16,
}

/// The four probes of the conformance topology.
pub fn probes() -> Vec<Probe> {
    [Proto::Tcp, Proto::Udp].into_iter().flat_map(|proto| PORTS.map(|port| Probe { proto, port })).collect()
}

#[derive(Debug, Clone)]
pub struct TopoPod {
    /// `ns/name`, as the matrix shows it.
    pub id: String,
    pub namespace: String,
    pub name: String,
    pub node: String,
    /// The lab's network namespace of the pod.
    pub netns: String,
    pub ip: IpAddr,
}

pub struct Topology {
    pub pods: Vec<TopoPod>,
}

fn labels_yaml(labels: &[(&str, &str)]) -> String {
    let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!("{{{}}}", l.join(", "))
}

/// A topology namespace with the given labels (the suites' own is `ns: <name>`).
pub fn namespace_manifest(ns: &str, labels: &[(&str, &str)]) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {}}}\n", labels_yaml(labels))
}

/// A topology pod with the given labels (the suites' own is `pod: <name>`) and the four named ports.
pub fn pod_manifest(ns: &str, pod: &str, labels: &[(&str, &str)]) -> String {
    let ports: Vec<String> = probes()
        .iter()
        .map(|p| {
            let proto = p.proto.name();
            format!("{{name: serve-{}-{}, containerPort: {}, protocol: {proto}}}", p.port, proto.to_lowercase(), p.port)
        })
        .collect();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}, labels: {}}}\nspec: {{containers: [{{name: c, ports: [{}]}}]}}\n",
        labels_yaml(labels),
        ports.join(", ")
    )
}

/// The manifests of the topology's namespaces and pods.
pub fn manifests() -> String {
    let mut docs: Vec<String> = NAMESPACES.iter().map(|ns| namespace_manifest(ns, &[("ns", ns)])).collect();
    for ns in NAMESPACES {
        for pod in PODS {
            docs.push(pod_manifest(ns, pod, &[("pod", pod)]));
        }
    }
    docs.join("---\n")
}

impl Topology {
    /// Applies the namespaces and pods, wires the pods through the CNI plugin on `nodes` in turn, starts their
    /// servers and waits until the store has every pod's address and every pod reaches every other.
    pub fn build(lab: &mut Lab, nodes: &[&str]) -> Result<Topology> {
        let out = lab.tartanctl(&["apply", "-f", "-"], Some(&manifests()))?;
        if !out.status.success() {
            bail!("applying the topology: {}", String::from_utf8_lossy(&out.stderr));
        }
        let serve = crate::cni::tartan_bin_dir().join("netns-lab");
        let serve = serve.to_str().context("netns-lab path")?.to_string();
        let mut pods = Vec::new();
        let mut i = 0;
        for ns in NAMESPACES {
            for name in PODS {
                let node = nodes[i % nodes.len()];
                i += 1;
                let lab_name = format!("{ns}-{name}");
                let r = lab.add_pod_as(node, &lab_name, ns, name)?;
                let ip: IpAddr = r["ips"][0]["address"]
                    .as_str()
                    .and_then(|a| a.split('/').next())
                    .and_then(|a| a.parse().ok())
                    .context("pod address")?;
                let netns = lab.pod(&lab_name)?.ns.clone();
                lab.spawn(&netns, &[&serve, "serve", "--tcp", "80,81", "--udp", "80,81"])?;
                pods.push(TopoPod {
                    id: format!("{ns}/{name}"),
                    namespace: ns.into(),
                    name: name.into(),
                    node: node.into(),
                    netns,
                    ip,
                });
            }
        }
        let topo = Topology { pods };
        // The store must know every address (policies select pods by it) before a case starts.
        let all_published = || {
            let Ok(out) = lab.tartanctl(&["get", "pods", "-A", "-o", "json"], None) else { return false };
            let text = String::from_utf8_lossy(&out.stdout);
            topo.pods.iter().all(|p| text.contains(&format!("\"{}\"", p.ip)))
        };
        if !wait_for(Duration::from_secs(10), all_published) {
            bail!("the agents did not publish every pod's address within 10 s");
        }
        let open = Matrix::filled(&topo, true);
        let m = topo.probe_until(&open, Duration::from_secs(10));
        if m != open {
            bail!("the topology is not fully connected before any policy:\n{}", m.diff_table(&open));
        }
        Ok(topo)
    }

    pub fn pod(&self, id: &str) -> &TopoPod {
        self.pods.iter().find(|p| p.id == id).unwrap_or_else(|| panic!("no pod {id} in the topology"))
    }

    /// Probes every cell once, all in parallel. A cell is reachable when a TCP connection is accepted, or a UDP
    /// datagram is answered, within `timeout`.
    pub fn probe(&self, timeout: Duration) -> Matrix {
        let handles: Vec<netns::NetNs> =
            self.pods.iter().map(|p| netns::NetNs::named(&p.netns).expect("pod namespace")).collect();
        let mut cells = BTreeMap::new();
        std::thread::scope(|s| {
            let mut running = Vec::new();
            for (si, src) in self.pods.iter().enumerate() {
                for dst in &self.pods {
                    for probe in probes() {
                        let h = &handles[si];
                        let to = SocketAddr::new(dst.ip, probe.port);
                        let t = std::thread::Builder::new()
                            .stack_size(256 * 1024)
                            .spawn_scoped(s, move || {
                                let _in = h.enter().expect("entering the pod namespace");
                                reach(probe.proto, to, timeout)
                            })
                            .expect("probe thread");
                        running.push(((src.id.clone(), dst.id.clone(), probe), t));
                    }
                }
            }
            for (key, t) in running {
                cells.insert(key, t.join().unwrap_or(false));
            }
        });
        Matrix { pods: self.pods.iter().map(|p| p.id.clone()).collect(), cells }
    }

    /// Probes until the matrix equals `want` or `within` has passed; the last matrix seen.
    pub fn probe_until(&self, want: &Matrix, within: Duration) -> Matrix {
        let t = Instant::now();
        loop {
            let m = self.probe(Duration::from_secs(1));
            if &m == want || t.elapsed() >= within {
                return m;
            }
        }
    }
}

fn reach(proto: Proto, to: SocketAddr, timeout: Duration) -> bool {
    match proto {
        Proto::Tcp => TcpStream::connect_timeout(&to, timeout).is_ok(),
        Proto::Udp => {
            let Ok(s) = UdpSocket::bind("0.0.0.0:0") else { return false };
            let mut buf = [0u8; 64];
            s.set_read_timeout(Some(timeout)).is_ok()
                && s.send_to(b"probe", to).is_ok()
                && s.recv_from(&mut buf).is_ok_and(|(n, from)| n > 0 && from == to)
        }
    }
}

/// Reachability of every (source pod, destination pod, probe).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matrix {
    pub pods: Vec<String>,
    pub cells: BTreeMap<(String, String, Probe), bool>,
}

impl Matrix {
    /// Every cell `value`; a pod always reaches itself (its own address is local to it).
    pub fn filled(topo: &Topology, value: bool) -> Matrix {
        Matrix::from_fn(topo, |s, d, _| value || s.id == d.id)
    }

    pub fn from_fn(topo: &Topology, mut f: impl FnMut(&TopoPod, &TopoPod, Probe) -> bool) -> Matrix {
        let mut cells = BTreeMap::new();
        for s in &topo.pods {
            for d in &topo.pods {
                for p in probes() {
                    cells.insert((s.id.clone(), d.id.clone(), p), f(s, d, p));
                }
            }
        }
        Matrix { pods: topo.pods.iter().map(|p| p.id.clone()).collect(), cells }
    }

    pub fn get(&self, src: &str, dst: &str, probe: Probe) -> bool {
        self.cells[&(src.to_string(), dst.to_string(), probe)]
    }

    /// Truth tables, one per probe: rows are sources, columns destinations, `.` reachable and `X` not.
    pub fn table(&self) -> String {
        self.render(None)
    }

    /// The tables of `self` (observed) with the cells that differ from `want` marked `!`, and a count.
    pub fn diff_table(&self, want: &Matrix) -> String {
        let wrong = self.cells.iter().filter(|(k, v)| want.cells.get(*k) != Some(v)).count();
        format!(
            "{wrong} of {} cells differ from the expected matrix ('!': observed differs):\n{}",
            self.cells.len(),
            self.render(Some(want))
        )
    }

    fn render(&self, want: Option<&Matrix>) -> String {
        let mut o = String::new();
        for probe in probes() {
            let _ = write!(o, "{}/{:<4}", probe.proto.name(), probe.port);
            for d in &self.pods {
                let _ = write!(o, " {d:>4}");
            }
            o.push('\n');
            for s in &self.pods {
                let _ = write!(o, "{s:<8}");
                for d in &self.pods {
                    let key = (s.clone(), d.clone(), probe);
                    let v = self.cells[&key];
                    let mark = if want.is_some_and(|w| w.cells.get(&key) != Some(&v)) { "!" } else { " " };
                    let _ = write!(o, " {mark:>3}{}", if v { '.' } else { 'X' });
                }
                o.push('\n');
            }
            o.push('\n');
        }
        o
    }
}

/// The pods' server: accepts TCP connections and answers UDP datagrams on the given ports, until killed.
pub fn serve(tcp: &[u16], udp: &[u16]) -> Result<()> {
    let mut threads = Vec::new();
    for &port in tcp {
        // "::" takes IPv4 too (mapped): one socket serves single- and dual-stack pods.
        let l = TcpListener::bind(("::", port)).with_context(|| format!("TCP port {port}"))?;
        threads.push(std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                // A word for a client that reads; the probe only needs the handshake.
                let _ = c.write_all(b"ok\n");
            }
        }));
    }
    for &port in udp {
        let s = UdpSocket::bind(("::", port)).with_context(|| format!("UDP port {port}"))?;
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], from);
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}
