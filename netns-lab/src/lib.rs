//! netns-lab: clusters made of network namespaces on one machine, for tests, benchmarks and the demo.
//!
//! A [`Lab`] owns everything it creates: namespaces named `<prefix>-<name>` (the prefix is unique per run), a
//! state directory standing in for each node's /etc/cni/net.d, /var/lib/cni, /run/flannel, /run/tartan and
//! /var/lib/tartan, and the processes it started. Dropping it (also while a test panics) kills those processes by
//! PID and deletes those namespaces and the directory. [`sweep`] removes what a run that died left behind. Nothing
//! here touches the root network namespace: links are created inside lab namespaces and moved between them.

pub mod capture;
pub mod cluster;
pub mod cni;
pub mod daemonset;
pub mod reachability;
mod state;

use std::collections::BTreeMap;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

pub use capture::Capture;
pub use state::{LabState, NodeState, PodState};

/// Where labs keep their state: volatile, like the namespaces themselves.
pub const LAB_ROOT: &str = "/run/tartan-lab";
/// Each lab node's cgroup (v2) is `<CGROUP_ROOT>/<prefix>-<node>` (the lab's namespace prefix, so `tl...`): every
/// process the lab runs for the node (its daemons, host commands, pods) is placed in it, and the eBPF dataplane
/// attaches there, never to a root. Directly under the v2 mount: no shared parent is left behind by anyone.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified";
/// Every lab namespace starts with this.
pub const NS_PREFIX: &str = "tl";
/// The underlay's first segment; nodes get .1, .2, ...; the outside host is .254.
pub const UNDERLAY_NET: &str = "198.18.0";
pub const OUTSIDE_IP: &str = "198.18.0.254";

/// The IPv6 twin of an underlay address, in the IPv6 benchmarking range (RFC 5180) as 198.18.0.0/15 is IPv4's:
/// 198.18.X.Y -> 2001:2:0:X::Y (a /64 per segment).
pub fn underlay_v6(v4: &str) -> String {
    let o: Vec<&str> = v4.split('.').collect();
    format!("2001:2:0:{}::{}", o.get(2).unwrap_or(&"0"), o.get(3).unwrap_or(&"0"))
}

/// `addr`/24 and its IPv6 twin/64 on `dev` in `ns` (no duplicate address detection: the lab hands them out).
pub fn add_underlay_addrs(ns: &str, dev: &str, addr: &str) -> Result<()> {
    ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
    ip(&["-n", ns, "addr", "add", &format!("{}/64", underlay_v6(addr)), "dev", dev, "nodad"])?;
    Ok(())
}

/// A lab and everything it owns.
pub struct Lab {
    pub state: LabState,
    dir: PathBuf,
    children: Vec<Child>,
    /// Persistent labs (the CLI's `up`) outlive the process that built them.
    keep: bool,
}

fn run_checked(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

/// `ip` with arguments, checked.
pub fn ip(args: &[&str]) -> Result<Output> {
    run_checked(Command::new("ip").args(args))
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

impl Lab {
    /// A fresh lab for this process. Leftovers of dead runs are swept first.
    pub fn new(tag: &str) -> Result<Lab> {
        sweep(false)?;
        let rand: u16 = rand::random();
        let prefix = format!("{NS_PREFIX}{}-{rand:04x}-{tag}", std::process::id());
        Lab::create(prefix, false)
    }

    /// A lab meant to outlive this process (`netns-lab up`), found again by name.
    pub fn persistent(name: &str) -> Result<Lab> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            bail!("lab name {name:?}: use letters, digits and '-'");
        }
        let prefix = format!("{NS_PREFIX}c-{name}");
        if Path::new(LAB_ROOT).join(&prefix).exists() {
            bail!("lab {name} already exists (netns-lab down --name {name} removes it)");
        }
        let lab = Lab::create(prefix, true)?;
        fs::write(lab.dir.join("keep"), "")?;
        Ok(lab)
    }

    fn create(prefix: String, keep: bool) -> Result<Lab> {
        let dir = Path::new(LAB_ROOT).join(&prefix);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::write(dir.join("owner"), std::process::id().to_string())?;
        let lab = Lab { state: LabState { prefix, ..Default::default() }, dir, children: Vec::new(), keep };
        lab.save()?;
        Ok(lab)
    }

    /// Reopens a persistent lab.
    pub fn open(name: &str) -> Result<Lab> {
        let prefix = format!("{NS_PREFIX}c-{name}");
        let dir = Path::new(LAB_ROOT).join(&prefix);
        let text = fs::read_to_string(dir.join("state.json"))
            .with_context(|| format!("no lab named {name} (netns-lab up --name {name} creates it)"))?;
        let state: LabState = serde_json::from_str(&text)?;
        Ok(Lab { state, dir, children: Vec::new(), keep: true })
    }

    pub fn save(&self) -> Result<()> {
        atomic_file::write(&self.dir.join("state.json"), serde_json::to_string_pretty(&self.state)?.as_bytes())
            .with_context(|| format!("saving {}", self.dir.display()))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn prefix(&self) -> &str {
        &self.state.prefix
    }

    /// The full namespace name for a lab-local one.
    pub fn ns_name(&self, short: &str) -> String {
        format!("{}-{short}", self.state.prefix)
    }

    /// Creates `<prefix>-<short>` with loopback up, and records it for teardown.
    pub fn add_ns(&mut self, short: &str) -> Result<String> {
        let name = self.ns_name(short);
        ip(&["netns", "add", &name])?;
        self.state.namespaces.push(name.clone());
        self.save()?;
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        // A real node's interfaces finished IPv6 duplicate address detection long ago; a new namespace's would
        // spend their first seconds tentative, unable to source neighbour solicitations, so a test's first
        // forwarded IPv6 packets would wait. The lab hands out every address itself: no DAD in its namespaces.
        self.exec(&name, &["sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"])?;
        Ok(name)
    }

    /// Deletes one of the lab's namespaces (killing what runs in it).
    pub fn del_ns(&mut self, name: &str) -> Result<()> {
        kill_ns_processes(name);
        let _ = ip(&["netns", "del", name]);
        self.state.namespaces.retain(|n| n != name);
        self.save()
    }

    /// A veth pair between two lab namespaces (created in `a`, its peer moved to `b`).
    pub fn veth(&self, a: &str, a_if: &str, b: &str, b_if: &str) -> Result<()> {
        ip(&["-n", a, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b])?;
        ip(&["-n", a, "link", "set", a_if, "up"])?;
        ip(&["-n", b, "link", "set", b_if, "up"])?;
        Ok(())
    }

    /// A command that will run inside `ns` (only its network namespace changes: /sys and bpffs stay visible).
    pub fn cmd(&self, ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let mut cmd = command_in(ns, program)?;
        // The node a namespace belongs to (a node's own, or a pod's): its processes join the node's cgroup.
        let node = self
            .state
            .nodes
            .iter()
            .find(|n| n.ns == ns)
            .map(|n| n.name.clone())
            .or_else(|| self.state.pods.iter().find(|p| p.ns == ns).map(|p| p.node.clone()));
        if let Some(node) = node {
            let procs = self.node_cgroup(&node).join("cgroup.procs");
            if let Ok(f) = fs::OpenOptions::new().write(true).open(&procs) {
                let fd: OwnedFd = f.into();
                // SAFETY: write(2) is async-signal-safe; "0" moves the writing process (the child, before exec).
                unsafe {
                    cmd.pre_exec(move || {
                        if libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
        }
        Ok(cmd)
    }

    /// Moves this whole process into `node`'s cgroup (a benchmark measuring from inside the node, as the node's own
    /// processes are) until the guard drops, which moves it back.
    pub fn enter_node_cgroup(&self, node: &str) -> Result<CgroupGuard> {
        let own = fs::read_to_string("/proc/self/cgroup")?;
        let back = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(|p| Path::new("/sys/fs/cgroup/unified").join(p.trim_start_matches('/')))
            .ok_or_else(|| anyhow!("this process is in no cgroup v2"))?;
        fs::write(self.node_cgroup(node).join("cgroup.procs"), "0")?;
        Ok(CgroupGuard { back })
    }

    /// The node's cgroup (v2): every process of the node runs in it.
    pub fn node_cgroup(&self, node: &str) -> PathBuf {
        Path::new(CGROUP_ROOT).join(self.node_cgroup_name(node))
    }

    /// The node's cgroup's name (the same in every hierarchy).
    pub fn node_cgroup_name(&self, node: &str) -> String {
        format!("{}-{node}", self.state.prefix)
    }

    /// Where the node's daemons pin BPF objects: a directory on the lab's own bpffs instance.
    pub fn node_bpf_root(&self, node: &str) -> PathBuf {
        self.dir.join("bpf").join(node)
    }

    /// Mounts the lab's bpffs instance (once): pins live there and vanish with it at teardown.
    fn ensure_bpffs(&self) -> Result<()> {
        let dir = self.dir.join("bpf");
        if is_bpffs(&dir) {
            return Ok(());
        }
        fs::create_dir_all(&dir)?;
        run_checked(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&dir))?;
        Ok(())
    }

    /// Runs a command inside `ns` and returns its output, failing on a non-zero exit.
    pub fn exec(&self, ns: &str, argv: &[&str]) -> Result<Output> {
        let (prog, args) = argv.split_first().ok_or_else(|| anyhow!("empty command"))?;
        run_checked(self.cmd(ns, prog)?.args(args))
    }

    /// Runs a command inside `ns`, returning the output whatever the exit status.
    pub fn exec_status(&self, ns: &str, argv: &[&str]) -> Result<Output> {
        let (prog, args) = argv.split_first().ok_or_else(|| anyhow!("empty command"))?;
        Ok(self.cmd(ns, prog)?.args(args).output()?)
    }

    /// Starts a long-running process inside `ns`, killed (by PID) when the lab goes.
    pub fn spawn(&mut self, ns: &str, argv: &[&str]) -> Result<u32> {
        let (prog, args) = argv.split_first().ok_or_else(|| anyhow!("empty command"))?;
        let mut cmd = self.cmd(ns, prog)?;
        cmd.args(args).stdin(Stdio::null());
        self.spawn_cmd(cmd)
    }

    /// Starts a prepared command (from [`Lab::cmd`]) and owns it: its PID is recorded so that the lab (or
    /// `netns-lab down` for a persistent lab) stops it.
    pub fn spawn_cmd(&mut self, mut cmd: Command) -> Result<u32> {
        let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        let pid = child.id();
        self.children.push(child);
        self.state.processes.push(pid);
        self.save()?;
        Ok(pid)
    }

    /// Stops a process the lab started (SIGTERM, then SIGKILL after 3 s) and waits for it.
    pub fn stop(&mut self, pid: u32) {
        if let Some(pos) = self.children.iter().position(|c| c.id() == pid) {
            let mut c = self.children.remove(pos);
            stop_child(&mut c);
        } else if self.state.processes.contains(&pid) {
            // SAFETY: plain kill(2) of a PID this lab recorded as its own.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        self.state.processes.retain(|p| *p != pid);
        let _ = self.save();
    }

    /// Kills a process the lab started, without letting it clean up (a crash).
    pub fn kill(&mut self, pid: u32) {
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        self.stop(pid);
    }

    /// The underlay: a switch namespace with a bridge that node and outside interfaces plug into.
    pub fn ensure_underlay(&mut self) -> Result<String> {
        let sw = self.ns_name("sw");
        if !self.state.namespaces.contains(&sw) {
            self.add_ns("sw")?;
            ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
            ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        }
        Ok(sw)
    }

    /// Plugs `ns` into the underlay switch as `eth0` with `addr` (a /24 of 198.18.0.0/15) and its IPv6 twin
    /// ([`underlay_v6`]).
    pub fn plug_underlay(&mut self, ns: &str, port: &str, addr: &str) -> Result<()> {
        let sw = self.ensure_underlay()?;
        self.veth(&sw, port, ns, "eth0")?;
        ip(&["-n", &sw, "link", "set", port, "master", "br0"])?;
        add_underlay_addrs(ns, "eth0", addr)
    }

    /// A host outside the cluster, on the underlay at [`OUTSIDE_IP`].
    pub fn add_outside(&mut self) -> Result<String> {
        let ns = self.add_ns("outside")?;
        self.plug_underlay(&ns, "p-outside", OUTSIDE_IP)?;
        Ok(ns)
    }

    /// A node: a namespace on the underlay at 198.18.0.<index> and its node-local directories.
    pub fn add_node(&mut self, name: &str) -> Result<NodeState> {
        let index = self.state.nodes.len() + 1;
        let ns = self.add_ns(&format!("n-{name}"))?;
        let addr = format!("{UNDERLAY_NET}.{index}");
        self.plug_underlay(&ns, &format!("p-{name}"), &addr)?;
        let root = self.dir.join("nodes").join(name);
        for d in ["etc/cni/net.d", "var/lib/cni/networks", "run/flannel", "run/tartan", "var/lib/tartan"] {
            fs::create_dir_all(root.join(d))?;
        }
        let cg = self.node_cgroup(name);
        fs::create_dir_all(&cg).with_context(|| format!("creating the node's cgroup {}", cg.display()))?;
        self.ensure_bpffs()?;
        let node = NodeState { name: name.into(), ns, underlay_ip: addr, root, cni_bin: None };
        self.state.nodes.push(node.clone());
        self.save()?;
        Ok(node)
    }

    pub fn node(&self, name: &str) -> Result<&NodeState> {
        self.state.nodes.iter().find(|n| n.name == name).ok_or_else(|| anyhow!("no node {name} in this lab"))
    }

    pub fn pod(&self, name: &str) -> Result<&PodState> {
        self.state.pods.iter().find(|p| p.name == name).ok_or_else(|| anyhow!("no pod {name} in this lab"))
    }

    /// Writes the node's CNI config (`10-tartan.conflist` in its net.d).
    pub fn write_cni_config(&self, node: &str, conflist: &serde_json::Value) -> Result<PathBuf> {
        let n = self.node(node)?;
        let path = n.root.join("etc/cni/net.d/10-tartan.conflist");
        fs::write(&path, serde_json::to_string_pretty(conflist)?)?;
        Ok(path)
    }

    /// Creates a pod the way kubelet does: a namespace, then CNI ADD of the node's config with the K8S_* args.
    /// Returns the CNI result.
    pub fn add_pod(&mut self, node: &str, name: &str, k8s_namespace: &str) -> Result<serde_json::Value> {
        self.add_pod_as(node, name, k8s_namespace, name)
    }

    /// A pod known to the lab as `name` and to the cluster as `k8s_namespace/k8s_name`.
    pub fn add_pod_as(
        &mut self,
        node: &str,
        name: &str,
        k8s_namespace: &str,
        k8s_name: &str,
    ) -> Result<serde_json::Value> {
        let n = self.node(node)?.clone();
        let ns = self.add_ns(&format!("p-{name}"))?;
        let container_id = format!("{}{name}", "c0ffee");
        let conf = cni::ConfList::load_dir(&n.root.join("etc/cni/net.d"))?;
        let inv = cni::Invocation {
            node_ns: n.ns.clone(),
            container_id: container_id.clone(),
            netns: format!("/run/netns/{ns}"),
            ifname: "eth0".into(),
            args: format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={k8s_namespace};K8S_POD_NAME={k8s_name};K8S_POD_INFRA_CONTAINER_ID={container_id}"),
            path: n.plugin_path(),
        };
        let result = match conf.add(&inv) {
            Ok(r) => r,
            Err(e) => {
                let _ = self.del_ns(&ns);
                return Err(e);
            }
        };
        let ip =
            result["ips"][0]["address"].as_str().unwrap_or_default().split('/').next().unwrap_or_default().to_string();
        self.state.pods.push(PodState {
            name: name.into(),
            node: node.into(),
            ns,
            container_id,
            ip,
            k8s_namespace: k8s_namespace.into(),
            k8s_name: (k8s_name != name).then(|| k8s_name.to_string()),
        });
        self.save()?;
        Ok(result)
    }

    /// CNI DEL of a pod, then its namespace goes.
    pub fn del_pod(&mut self, name: &str) -> Result<()> {
        let p = self.pod(name)?.clone();
        let n = self.node(&p.node)?.clone();
        let conf = cni::ConfList::load_dir(&n.root.join("etc/cni/net.d"))?;
        let inv = cni::Invocation {
            node_ns: n.ns.clone(),
            container_id: p.container_id.clone(),
            netns: format!("/run/netns/{}", p.ns),
            ifname: "eth0".into(),
            args: format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}", p.k8s_namespace, p.k8s_name()),
            path: n.plugin_path(),
        };
        let res = conf.del(&inv);
        self.del_ns(&p.ns)?;
        self.state.pods.retain(|x| x.name != name);
        self.save()?;
        res
    }

    /// Pings `dst` from `ns`; true when a reply came back.
    pub fn ping(&self, ns: &str, dst: &str) -> Result<bool> {
        let out = self.exec_status(ns, &["ping", "-c", "1", "-W", "2", "-q", dst])?;
        Ok(out.status.success())
    }

    /// Starts a capture on `iface` inside `ns`, returned once tcpdump is listening.
    pub fn capture(&mut self, ns: &str, iface: &str, filter: &str) -> Result<Capture> {
        Capture::start(ns, iface, filter)
    }

    /// Removes everything the lab made. Safe to call twice; also what Drop does for non-persistent labs.
    pub fn teardown(&mut self) {
        // Containers first: their daemons stop while the namespaces and mounts they use are still there.
        self.remove_containers();
        for c in &mut self.children {
            stop_child(c);
        }
        self.children.clear();
        // A persistent lab's processes outlived the process that started them: stop them by recorded PID.
        for pid in std::mem::take(&mut self.state.processes) {
            // SAFETY: plain kill(2) of PIDs this lab recorded as its own.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        for ns in self.state.namespaces.iter().rev() {
            kill_ns_processes(ns);
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
        self.state.namespaces.clear();
        remove_lab_kernel_state(&self.dir, &self.state.prefix);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Returns the process to the cgroup it came from.
pub struct CgroupGuard {
    back: PathBuf,
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        let _ = fs::write(self.back.join("cgroup.procs"), "0");
    }
}

fn is_bpffs(dir: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else { return false };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs(2) on a NUL-terminated path into a zeroed struct we own.
    (unsafe { libc::statfs(c.as_ptr(), &mut st) }) == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// Unmounts a lab's bpffs (dropping every pin: links detach, maps go) and removes its nodes' cgroups once their
/// processes are gone.
fn remove_lab_kernel_state(dir: &Path, prefix: &str) {
    // Every mount under the lab's directory (its bpffs; a killed run's container shm and rootfs mounts), deepest
    // first, so that the directory can go.
    let mut mounts: Vec<PathBuf> = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for m in mounts {
        let _ = Command::new("umount").arg("-l").arg(&m).stderr(Stdio::null()).status();
    }
    for cg in lab_cgroups().into_iter().filter(|n| n.starts_with(&format!("{prefix}-"))) {
        remove_cgroup(&cg);
    }
}

/// The node cgroups labs made (named after their namespace prefix).
fn lab_cgroups() -> Vec<String> {
    let Ok(entries) = fs::read_dir(CGROUP_ROOT) else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(NS_PREFIX))
        .collect()
}

fn remove_cgroup(name: &str) {
    // A node's containers (podman's cgroupfs manager) have cgroups below the node's, in the v2 hierarchy and in
    // each v1 one: those go too, deepest first.
    let mut paths = vec![Path::new(CGROUP_ROOT).join(name)];
    if let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") {
        paths.extend(hierarchies.flatten().map(|h| h.path().join(name)).filter(|p| p.is_dir()));
    }
    paths.dedup();
    // Killed processes leave the cgroup as they are reaped: try for a moment.
    let _ = wait_for(Duration::from_secs(3), || {
        for p in &paths {
            remove_tree(p);
        }
        paths.iter().all(|p| !p.exists())
    });
}

/// rmdir of a cgroup and every cgroup below it (a cgroup directory holds only kernel files, removed with it).
fn remove_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

impl Drop for Lab {
    fn drop(&mut self) {
        // A persistent lab outlives this process; `netns-lab down` removes it.
        if !self.keep {
            self.teardown();
        }
    }
}

fn stop_child(c: &mut Child) {
    // SAFETY: signalling a child we spawned and have not reaped yet.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// Kills every process whose network namespace is `ns` (only ever called for lab namespaces, whose processes the
/// lab or a dead run of it started).
fn kill_ns_processes(ns: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).stderr(Stdio::null()).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
        // SAFETY: plain kill(2).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// A `Command` that enters `ns`'s network namespace between fork and exec.
pub fn command_in(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
    let path = Path::new("/run/netns").join(ns);
    let fd: OwnedFd = fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?.into();
    let mut cmd = Command::new(program);
    // SAFETY: setns(2) is async-signal-safe; the descriptor is owned by the closure and stays open until exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Removes what dead runs left: namespaces and state directories whose owner process is gone. Persistent labs
/// (`netns-lab up`) are kept unless `all`.
pub fn sweep(all: bool) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let mut owners: BTreeMap<String, bool> = BTreeMap::new(); // prefix -> still wanted
    if let Ok(entries) = fs::read_dir(LAB_ROOT) {
        for e in entries.flatten() {
            let prefix = e.file_name().to_string_lossy().to_string();
            let dir = e.path();
            let keep = dir.join("keep").exists();
            let owner_alive = match fs::read_to_string(dir.join("owner")) {
                Ok(s) => s.trim().parse::<u32>().ok().is_some_and(pid_alive),
                // No owner yet: another thread or process is between creating the directory and writing its
                // owner file. Sweeping it then pulled the directory from under a starting lab; give it a minute.
                Err(_) => fs::metadata(&dir)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_none_or(|age| age < std::time::Duration::from_secs(60)),
            };
            let wanted = if all { false } else { keep || owner_alive };
            owners.insert(prefix.clone(), wanted);
            if !wanted {
                remove_lab_kernel_state(&dir, &prefix);
                let _ = fs::remove_dir_all(&dir);
                removed.push(dir.display().to_string());
            }
        }
    }
    // Which lab owns a namespace or a node cgroup: the longest known prefix; one with no state dir at all is a dead
    // run's unless its tl<pid>- owner is alive (still building its state dir).
    let wanted = |name: &str| {
        let owner = owners.iter().filter(|(p, _)| name.starts_with(&format!("{p}-"))).max_by_key(|(p, _)| p.len());
        match owner {
            Some((_, wanted)) => *wanted,
            None => {
                let pid = name[NS_PREFIX.len()..].split('-').next().and_then(|p| p.parse::<u32>().ok());
                !all && pid.is_some_and(pid_alive)
            }
        }
    };
    let listed = Command::new("ip").args(["netns", "list"]).output()?;
    for line in String::from_utf8_lossy(&listed.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if !name.starts_with(NS_PREFIX) {
            continue;
        }
        if !wanted(name) {
            kill_ns_processes(name);
            let _ = Command::new("ip").args(["netns", "del", name]).stderr(Stdio::null()).status();
            removed.push(name.to_string());
        }
    }
    // Node cgroups whose lab is gone (after the namespaces: their processes have been killed).
    for cg in lab_cgroups().into_iter().filter(|n| !wanted(n)) {
        remove_cgroup(&cg);
        removed.push(Path::new(CGROUP_ROOT).join(&cg).display().to_string());
    }
    Ok(removed)
}

/// Polls `f` every 20 ms until it is true or `timeout` passes.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The node's pod subnet in a lab without an agent: 10.244.<index>.0/24.
pub fn node_subnet(index: usize) -> String {
    format!("10.244.{index}.0/24")
}

/// The CNI config a lab node uses when no agent runs: `tartan` in bridge mode with a fixed subnet, masquerading
/// what leaves the pod network, with all node-local state under the node's directory.
pub fn static_conflist(node: &NodeState, subnet: &str) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "1.1.0",
        "name": "tartan",
        "plugins": [{
            "type": "tartan",
            "bridge": "cni0",
            "isDefaultGateway": true,
            "ipMasq": true,
            "hairpinMode": true,
            "runDir": node.root.join("run/tartan"),
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": subnet}]],
                "dataDir": node.root.join("var/lib/cni/networks"),
            }
        }]
    })
}

impl Lab {
    /// `n` nodes named n1..nN on the underlay, each with the static CNI config, and an outside host.
    pub fn build_static(&mut self, nodes: usize) -> Result<()> {
        for i in 1..=nodes {
            let node = self.add_node(&format!("n{i}"))?;
            self.write_cni_config(&node.name, &static_conflist(&node, &node_subnet(i)))?;
        }
        self.add_outside()?;
        Ok(())
    }

    /// Resolves a CLI target (a node name, a pod name, `outside`, or a full namespace name) to a namespace.
    pub fn target_ns(&self, target: &str) -> Result<String> {
        if let Ok(n) = self.node(target) {
            return Ok(n.ns.clone());
        }
        if let Ok(p) = self.pod(target) {
            return Ok(p.ns.clone());
        }
        let full = self.ns_name(target);
        if self.state.namespaces.contains(&full) {
            return Ok(full);
        }
        if self.state.namespaces.iter().any(|n| n == target) {
            return Ok(target.to_string());
        }
        bail!("{target} is neither a node, a pod nor a namespace of this lab")
    }
}
