//! Multi-node labs: a real etcd (Debian's etcd-server) in a control namespace on the underlay, the network config
//! in flannel's format, one `tartan-agent` per node, and pods wired by `tartan` in flannel mode.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

use crate::{add_underlay_addrs, ip, wait_for, Lab, NodeState};

/// Where the lab's etcd listens (inside its control namespace, on the underlay).
pub const ETCD_IP: &str = "198.18.0.100";
pub const ETCD_URL: &str = "http://198.18.0.100:2379";
/// Members of a multi-member lab etcd ([`Lab::start_etcd_cluster`]).
pub const ETCD_MEMBERS: usize = 3;
/// The router between underlay segments, on each of them.
pub const ROUTER_SUFFIX: u8 = 253;

/// The backends a lab can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Vxlan,
    HostGw,
    VxlanDirect,
    Udp,
}

impl Backend {
    pub fn parse(s: &str) -> Result<Backend> {
        Ok(match s {
            "vxlan" => Backend::Vxlan,
            "host-gw" => Backend::HostGw,
            "vxlan-direct" => Backend::VxlanDirect,
            "udp" => Backend::Udp,
            _ => bail!("backend {s:?}: one of vxlan, host-gw, vxlan-direct, udp"),
        })
    }

    /// The `<prefix>/config` document.
    pub fn network_config(self) -> Value {
        let backend = match self {
            Backend::Vxlan => json!({"Type": "vxlan"}),
            Backend::HostGw => json!({"Type": "host-gw"}),
            Backend::VxlanDirect => json!({"Type": "vxlan", "DirectRouting": true}),
            Backend::Udp => json!({"Type": "udp"}),
        };
        json!({"Network": "10.244.0.0/16", "Backend": backend})
    }

    /// The same, dual stack: pods also get an IPv6 /64 out of [`POD_NET_V6`].
    pub fn dual_stack_config(self) -> Value {
        let mut c = self.network_config();
        c["EnableIPv6"] = json!(true);
        c["IPv6Network"] = json!(POD_NET_V6);
        c
    }
}

/// The pods' IPv6 network in dual-stack labs (unique local addresses).
pub const POD_NET_V6: &str = "fd00:10:244::/56";

/// Where the `tartan-agent` binary is.
pub fn agent_bin() -> PathBuf {
    crate::cni::tartan_bin_dir().join("tartan-agent")
}

/// The conflist a node uses with an agent: flannel mode (the subnet comes from the node's subnet.env).
pub fn flannel_conflist(node: &NodeState) -> Value {
    json!({
        "cniVersion": "1.1.0",
        "name": "cbr0",
        "plugins": [{
            "type": "tartan",
            "subnetFile": node.root.join("run/flannel/subnet.env"),
            "runDir": node.root.join("run/tartan"),
            "hairpinMode": true,
            "isDefaultGateway": true,
            "ipam": {"type": "host-local", "dataDir": node.root.join("var/lib/cni/networks")}
        }]
    })
}

impl Lab {
    /// A fresh lab with the underlay, etcd, and `config` at `<prefix>/config`; nodes and agents come next.
    pub fn with_etcd(tag: &str, config: &Value) -> Result<Lab> {
        let mut lab = Lab::new(tag)?;
        lab.ensure_underlay()?;
        lab.start_etcd()?;
        lab.put_network_config(config)?;
        Ok(lab)
    }

    /// Starts etcd in the control namespace and waits until it answers.
    pub fn start_etcd(&mut self) -> Result<String> {
        self.start_etcd_with(None)
    }

    /// A CA, an etcd server certificate (for 198.18.0.100) and a client certificate, made with openssl in `dir`:
    /// ca.crt, server.{crt,key}, client.{crt,key}.
    pub fn make_certs(&self, dir: &std::path::Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let sh = format!(
            "set -e; cd {d}
             openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 1 -subj /CN=tartan-lab-ca 2>/dev/null
             for who in server client; do
               openssl req -newkey rsa:2048 -nodes -keyout $who.key -out $who.csr -subj /CN=$who 2>/dev/null
             done
             printf 'subjectAltName=IP:{ETCD_IP},IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' > server.ext
             printf 'extendedKeyUsage=clientAuth\n' > client.ext
             for who in server client; do
               openssl x509 -req -in $who.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out $who.crt -days 1 -extfile $who.ext 2>/dev/null
             done",
            d = dir.display()
        );
        let st = Command::new("sh").args(["-c", &sh]).status()?;
        if !st.success() {
            bail!("openssl failed making lab certificates");
        }
        Ok(())
    }

    /// Starts etcd; with `tls`, clients on the underlay must use https and a certificate signed by the lab CA
    /// (plain http stays on the namespace's own loopback, for the lab's etcdctl).
    pub fn start_etcd_with(&mut self, tls: Option<&std::path::Path>) -> Result<String> {
        let ns = self.add_ns("etcd")?;
        self.plug_underlay(&ns, "p-etcd", ETCD_IP)?;
        self.spawn_etcd(&ns, tls, "etcd.log")?;
        let ok = wait_for(Duration::from_secs(15), || {
            // etcdctl 3.4 prints the verdict on stderr; its exit status is what counts.
            self.etcdctl(&["endpoint", "health"]).is_ok()
        });
        if !ok {
            bail!("etcd did not become healthy; see {}", self.dir().join("etcd.log").display());
        }
        Ok(ns)
    }

    /// Starts etcd again on its existing data (after a test stopped it); returns its PID.
    pub fn restart_etcd(&mut self, tls: Option<&std::path::Path>) -> Result<u32> {
        let ns = self.ns_name("etcd");
        self.spawn_etcd(&ns, tls, "etcd-restarted.log")
    }

    fn spawn_etcd(&mut self, ns: &str, tls: Option<&std::path::Path>, log_name: &str) -> Result<u32> {
        let data_s = self.dir().join("etcd").display().to_string();
        let log = std::fs::File::create(self.dir().join(log_name))?;
        let mut cmd = self.cmd(ns, "etcd")?;
        let url = match tls {
            Some(_) => format!("https://{ETCD_IP}:2379"),
            None => ETCD_URL.to_string(),
        };
        if let Some(d) = tls {
            cmd.arg("--cert-file").arg(d.join("server.crt"));
            cmd.arg("--key-file").arg(d.join("server.key"));
            cmd.arg("--trusted-ca-file").arg(d.join("ca.crt"));
            cmd.arg("--client-cert-auth");
        }
        let listen = format!("{url},http://127.0.0.1:2379");
        cmd.args(["--name", "lab", "--data-dir", &data_s, "--listen-client-urls", &listen])
            .args(["--advertise-client-urls", &url, "--listen-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-cluster", "lab=http://127.0.0.1:2380"])
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(std::process::Stdio::null());
        let pid = self.spawn_cmd(cmd)?;
        self.state.etcd_pid = Some(pid);
        self.save()?;
        Ok(pid)
    }

    /// Starts a 3-member etcd cluster in the control namespace instead of one etcd: member i serves clients on
    /// 198.18.0.100 and 127.0.0.1 at port 2379 + 10000 i and its peers at 2380 + 10000 i. Every Tartan program the
    /// lab starts afterwards is given all three endpoints.
    pub fn start_etcd_cluster(&mut self) -> Result<String> {
        let ns = self.add_ns("etcd")?;
        self.plug_underlay(&ns, "p-etcd", ETCD_IP)?;
        self.state.etcd_members = vec![None; ETCD_MEMBERS];
        for i in 0..ETCD_MEMBERS {
            self.start_etcd_member(i)?;
        }
        let ok = wait_for(Duration::from_secs(20), || self.etcdctl(&["endpoint", "health", "--cluster"]).is_ok());
        if !ok {
            bail!("the etcd cluster did not become healthy; see {}", self.dir().join("etcd-m0.log").display());
        }
        Ok(ns)
    }

    /// Starts (or restarts, on its data) etcd member `i` of [`Lab::start_etcd_cluster`]; returns its PID.
    pub fn start_etcd_member(&mut self, i: usize) -> Result<u32> {
        let ns = self.ns_name("etcd");
        let port = |base: u32| base + 10_000 * i as u32;
        let data = self.dir().join(format!("etcd-m{i}")).display().to_string();
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir().join(format!("etcd-m{i}.log")))?;
        let peers: Vec<String> =
            (0..ETCD_MEMBERS).map(|m| format!("m{m}=http://127.0.0.1:{}", 2380 + 10_000 * m)).collect();
        let mut cmd = self.cmd(&ns, "etcd")?;
        let client = format!("http://{ETCD_IP}:{}", port(2379));
        cmd.args(["--name", &format!("m{i}"), "--data-dir", &data])
            .args(["--listen-client-urls", &format!("{client},http://127.0.0.1:{}", port(2379))])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{}", port(2380))])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{}", port(2380))])
            .args(["--initial-cluster", &peers.join(","), "--initial-cluster-state", "new"])
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(std::process::Stdio::null());
        let pid = self.spawn_cmd(cmd)?;
        self.state.etcd_members[i] = Some(pid);
        if i == 0 {
            self.state.etcd_pid = Some(pid);
        }
        self.save()?;
        Ok(pid)
    }

    /// Kills etcd member `i` (a crash: no clean shutdown).
    pub fn kill_etcd_member(&mut self, i: usize) -> Result<()> {
        let pid =
            self.state.etcd_members.get(i).copied().flatten().ok_or_else(|| anyhow!("member {i} is not running"))?;
        self.kill(pid);
        self.state.etcd_members[i] = None;
        self.save()
    }

    /// The index of the member that leads the etcd cluster now (asked of each running member).
    pub fn etcd_leader(&self) -> Result<usize> {
        for (i, pid) in self.state.etcd_members.iter().enumerate() {
            if pid.is_none() {
                continue;
            }
            let ep = format!("http://127.0.0.1:{}", 2379 + 10_000 * i);
            let Ok(out) = self.etcdctl_at(&ep, &["endpoint", "status", "-w", "json"]) else { continue };
            let v: Value = serde_json::from_str(&out)?;
            let st = &v[0]["Status"];
            if !st["leader"].is_null() && st["leader"] == st["header"]["member_id"] {
                return Ok(i);
            }
        }
        bail!("no running etcd member says it leads")
    }

    /// Every Tartan client's `--etcd-endpoints`: all members of a cluster, or the one etcd.
    pub fn etcd_endpoints(&self) -> String {
        if self.state.etcd_members.is_empty() {
            return ETCD_URL.to_string();
        }
        (0..self.state.etcd_members.len())
            .map(|i| format!("http://{ETCD_IP}:{}", 2379 + 10_000 * i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The same members on the etcd namespace's loopback (for tools run inside it).
    pub fn etcd_local_endpoints(&self) -> String {
        let n = self.state.etcd_members.len().max(1);
        (0..n).map(|i| format!("http://127.0.0.1:{}", 2379 + 10_000 * i)).collect::<Vec<_>>().join(",")
    }

    /// Sends `signal` (SIGSTOP to pause, SIGCONT to resume) to the lab's own etcd.
    pub fn signal_etcd(&self, signal: i32) -> Result<()> {
        let pid = self.state.etcd_pid.ok_or_else(|| anyhow!("this lab started no etcd"))?;
        // SAFETY: kill(2) of the etcd this lab started and recorded.
        if unsafe { libc::kill(pid as i32, signal) } != 0 {
            bail!("signalling etcd ({pid}): {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// `tartanctl` against the lab's etcd, run inside its namespace (stdin closed unless `input` is given).
    pub fn tartanctl(&self, args: &[&str], input: Option<&str>) -> Result<std::process::Output> {
        use std::io::Write;
        let ns = self.ns_name("etcd");
        let mut cmd = self.cmd(&ns, crate::cni::tartan_bin_dir().join("tartanctl"))?;
        cmd.args(["--etcd-endpoints", &self.etcd_local_endpoints()]).args(args);
        cmd.stdin(if input.is_some() { std::process::Stdio::piped() } else { std::process::Stdio::null() });
        cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn()?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(text.as_bytes())?;
        }
        Ok(child.wait_with_output()?)
    }

    /// `etcdctl` (v3 API) against the lab's etcd, run inside its namespace; returns stdout.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        self.etcdctl_at(&self.etcd_local_endpoints(), args)
    }

    /// `etcdctl` against `endpoints` only.
    pub fn etcdctl_at(&self, endpoints: &str, args: &[&str]) -> Result<String> {
        let ns = self.ns_name("etcd");
        let out =
            self.cmd(&ns, "etcdctl")?.env("ETCDCTL_API", "3").args(["--endpoints", endpoints]).args(args).output()?;
        if !out.status.success() {
            bail!("etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Writes `<prefix>/config`.
    pub fn put_network_config(&self, config: &Value) -> Result<()> {
        self.etcdctl(&["put", "/coreos.com/network/config", &config.to_string()])?;
        Ok(())
    }

    /// Starts `tartan-agent` on a node with the node's own directories (and `extra` flags); returns its PID.
    pub fn start_agent(&mut self, node: &str, extra: &[&str]) -> Result<u32> {
        let n = self.node(node)?.clone();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(n.root.join("agent.log"))?;
        let mut cmd = self.cmd(&n.ns, agent_bin())?;
        // Lab defaults (quick resyncs, so drift repair shows within a second); a flag in `extra` replaces its default.
        let endpoints = self.etcd_endpoints();
        for (flag, value) in
            [("--etcd-endpoints", endpoints.as_str()), ("--route-resync", "1"), ("--iptables-resync", "2")]
        {
            if !extra.contains(&flag) {
                cmd.args([flag, value]);
            }
        }
        // The underlay interface, unless the caller picks one itself.
        if !extra.iter().any(|a| a.starts_with("--iface")) {
            cmd.args(["--iface", "eth0"]);
        }
        cmd.arg("--ip-masq")
            .args(["--node-name", node])
            .arg("--run-dir")
            .arg(n.root.join("run/tartan"))
            .arg("--subnet-file")
            .arg(n.root.join("run/flannel/subnet.env"))
            .arg("--state-dir")
            .arg(n.root.join("var/lib/tartan"))
            .args(extra)
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(std::process::Stdio::null());
        self.spawn_cmd(cmd)
    }

    /// Starts `tartan-proxy` on a node (iptables mode, the lab's etcd, the node's name, the pod network as the
    /// cluster CIDR, metrics on 127.0.0.1:10249 inside the node); its log is the node's proxy.log.
    pub fn start_proxy(&mut self, node: &str, extra: &[&str]) -> Result<u32> {
        let n = self.node(node)?.clone();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(n.root.join("proxy.log"))?;
        let mut cmd = self.cmd(&n.ns, crate::cni::tartan_bin_dir().join("tartan-proxy"))?;
        cmd.args(["--etcd-endpoints", &self.etcd_endpoints(), "--node-name", node, "--cluster-cidr", "10.244.0.0/16"])
            .arg("--run-dir")
            .arg(n.root.join("run/tartan"))
            // Used by --mode ebpf: the node's own cgroup and pin directory.
            .arg("--cgroup-root")
            .arg(self.node_cgroup(node))
            .arg("--bpf-root")
            .arg(self.node_bpf_root(node))
            .args(extra)
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(std::process::Stdio::null());
        self.spawn_cmd(cmd)
    }

    /// Waits for the node's subnet.env.
    pub fn wait_subnet_env(&self, node: &str, timeout: Duration) -> Result<String> {
        let path = self.node(node)?.root.join("run/flannel/subnet.env");
        if !wait_for(timeout, || path.exists()) {
            let log = std::fs::read_to_string(self.node(node)?.root.join("agent.log")).unwrap_or_default();
            bail!("{} did not appear within {timeout:?}; agent log:\n{log}", path.display());
        }
        Ok(std::fs::read_to_string(path)?)
    }

    /// A second underlay segment (198.18.1.0/24) and a router namespace joining it to the first.
    pub fn add_segment(&mut self) -> Result<()> {
        let sw2 = self.add_ns("sw2")?;
        ip(&["-n", &sw2, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw2, "link", "set", "br0", "up"])?;
        let r = self.add_ns("router")?;
        let sw = self.ensure_underlay()?;
        self.veth(&sw, "p-router", &r, "eth0")?;
        ip(&["-n", &sw, "link", "set", "p-router", "master", "br0"])?;
        add_underlay_addrs(&r, "eth0", &format!("198.18.0.{ROUTER_SUFFIX}"))?;
        self.veth(&sw2, "p-router", &r, "eth1")?;
        ip(&["-n", &sw2, "link", "set", "p-router", "master", "br0"])?;
        add_underlay_addrs(&r, "eth1", &format!("198.18.1.{ROUTER_SUFFIX}"))?;
        self.exec(&r, &["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])?;
        // Hosts already on segment A (etcd) learn the way to segment B.
        let etcd = self.ns_name("etcd");
        if self.state.namespaces.contains(&etcd) {
            ip(&["-n", &etcd, "route", "add", "198.18.1.0/24", "via", &format!("198.18.0.{ROUTER_SUFFIX}")])?;
        }
        Ok(())
    }

    /// A node on the second segment (198.18.1.x), routed to the first through the router.
    pub fn add_node_on_segment2(&mut self, name: &str) -> Result<NodeState> {
        let index = self.state.nodes.len() + 1;
        let ns = self.add_ns(&format!("n-{name}"))?;
        let sw2 = self.ns_name("sw2");
        self.veth(&sw2, &format!("p-{name}"), &ns, "eth0")?;
        ip(&["-n", &sw2, "link", "set", &format!("p-{name}"), "master", "br0"])?;
        let addr = format!("198.18.1.{index}");
        add_underlay_addrs(&ns, "eth0", &addr)?;
        ip(&["-n", &ns, "route", "add", "198.18.0.0/24", "via", &format!("198.18.1.{ROUTER_SUFFIX}")])?;
        ip(&["-n", &ns, "route", "add", "2001:2:0:0::/64", "via", &format!("2001:2:0:1::{ROUTER_SUFFIX}")])?;
        let root = self.dir().join("nodes").join(name);
        for d in ["etc/cni/net.d", "var/lib/cni/networks", "run/flannel", "run/tartan", "var/lib/tartan"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        let node = NodeState { name: name.into(), ns, underlay_ip: addr, root, cni_bin: None };
        self.state.nodes.push(node.clone());
        self.save()?;
        Ok(node)
    }

    /// The cluster of issue 3: etcd, `nodes` nodes (split over two segments with `segments == 2`), the network
    /// config for `backend`, an agent per node, subnet.env on each, the flannel-mode CNI config, an outside host.
    pub fn build_cluster(&mut self, nodes: usize, backend: Backend, segments: usize) -> Result<()> {
        self.build_cluster_with(nodes, &backend.network_config(), segments)
    }

    /// [`Lab::build_cluster`] with any network config (dual stack, a VNI, a port...).
    pub fn build_cluster_with(&mut self, nodes: usize, config: &Value, segments: usize) -> Result<()> {
        self.ensure_underlay()?;
        // A test may have started a multi-member etcd already.
        if !self.state.namespaces.contains(&self.ns_name("etcd")) {
            self.start_etcd()?;
        }
        self.put_network_config(config)?;
        if segments > 1 {
            self.add_segment()?;
        }
        for i in 1..=nodes {
            let name = format!("n{i}");
            let second = segments > 1 && i > nodes.div_ceil(2);
            let node = if second { self.add_node_on_segment2(&name)? } else { self.add_node(&name)? };
            if segments > 1 && !second {
                ip(&["-n", &node.ns, "route", "add", "198.18.1.0/24", "via", &format!("198.18.0.{ROUTER_SUFFIX}")])?;
                ip(&[
                    "-n",
                    &node.ns,
                    "route",
                    "add",
                    "2001:2:0:1::/64",
                    "via",
                    &format!("2001:2:0:0::{ROUTER_SUFFIX}"),
                ])?;
            }
            self.write_cni_config(&name, &flannel_conflist(&node))?;
            self.start_agent(&name, &[])?;
        }
        for i in 1..=nodes {
            self.wait_subnet_env(&format!("n{i}"), Duration::from_secs(20))?;
        }
        if !self.state.namespaces.contains(&self.ns_name("outside")) {
            let outside = self.add_outside()?;
            if segments > 1 {
                ip(&["-n", &outside, "route", "add", "198.18.1.0/24", "via", &format!("198.18.0.{ROUTER_SUFFIX}")])?;
            }
        }
        Ok(())
    }

    /// The route table of a node, as `ip -j route` JSON.
    pub fn routes(&self, node: &str) -> Result<Value> {
        let ns = self.node(node)?.ns.clone();
        let out = self.exec(&ns, &["ip", "-j", "route", "show"])?;
        serde_json::from_slice(&out.stdout).map_err(|e| anyhow!("ip -j route: {e}"))
    }
}
