//! Tartan run on lab nodes from its container image, the way the DaemonSet in `deploy/` runs it on a cluster: no
//! kubelet or API server here, so the lab plays kubelet's part for one pod per node. It renders the manifests with
//! kustomize (the operator's one place to set etcd, the network and the proxy mode), takes the DaemonSet's pod
//! template and runs it with podman inside the node's network namespace (`hostNetwork`): init containers first and
//! to completion, then the containers; environment from the downward API, ConfigMap and literal values, `$(VAR)`
//! in arguments expanded, volumes from the ConfigMap and Secret written to files, and every hostPath mapped to that
//! node's own directory (its root, its cgroup, its bpffs directory). Probes are the lab's own waits on the same
//! endpoints. containerd (`ctr`, with a daemon the lab starts) can run a container of the same pod instead.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{wait_for, Lab};

/// The DaemonSet and what it refers to, as rendered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifests {
    pub daemonset: Value,
    pub configmap: BTreeMap<String, String>,
    /// Secret data, decoded.
    pub secret: BTreeMap<String, Vec<u8>>,
}

/// Which container engine runs a container of the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Engine {
    Podman,
    Containerd,
}

/// What the lab settles per rendering: the kustomization's literals.
#[derive(Debug, Clone)]
pub struct Settings {
    pub image: String,
    pub proxy_mode: String,
    pub net_conf: Value,
}

/// Where the repository's `deploy/` is (next to the cargo workspace this binary was built in, or $TARTAN_DEPLOY_DIR).
pub fn deploy_dir() -> PathBuf {
    if let Ok(d) = std::env::var("TARTAN_DEPLOY_DIR") {
        return PathBuf::from(d);
    }
    let bin = crate::cni::tartan_bin_dir();
    for dir in bin.ancestors() {
        if dir.join("deploy/kustomization.yaml").is_file() {
            return dir.join("deploy");
        }
    }
    PathBuf::from("deploy")
}

/// A child process with a bound on its time and a checked exit status.
fn run(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let what = format!("{cmd:?}");
    let out = child_process::run(cmd, None, timeout).with_context(|| what.clone())?;
    if !out.status.success() {
        bail!("{what}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Renders `deploy/` for this lab: a copy of it with the etcd endpoints, proxy mode, image and network set in the
/// kustomization (what an operator edits) and the lab CA's client certificate as the etcd Secret's files.
pub fn render(lab: &Lab, s: &Settings, certs: &Path, endpoints: &str) -> Result<Manifests> {
    let dir = lab.dir().join("deploy");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("etcd"))?;
    let src = deploy_dir();
    for f in ["kube-tartan.yml", "kustomization.yaml"] {
        std::fs::copy(src.join(f), dir.join(f)).with_context(|| format!("copying {}", src.join(f).display()))?;
    }
    for (from, to) in [("ca.crt", "ca.crt"), ("client.crt", "tls.crt"), ("client.key", "tls.key")] {
        std::fs::copy(certs.join(from), dir.join("etcd").join(to))?;
    }
    std::fs::write(dir.join("net-conf.json"), serde_json::to_string_pretty(&s.net_conf)?)?;
    let (name, tag) = s.image.rsplit_once(':').ok_or_else(|| anyhow!("image {} has no tag", s.image))?;
    let mut k = std::fs::read_to_string(dir.join("kustomization.yaml"))?;
    for (key, value) in [("etcd-endpoints", endpoints), ("proxy-mode", &s.proxy_mode)] {
        k = set_line(&k, &format!("- {key}="), &format!("- {key}={value}"))?;
    }
    k = set_line(&k, "newName:", &format!("newName: {name}"))?;
    k = set_line(&k, "newTag:", &format!("newTag: {tag}"))?;
    std::fs::write(dir.join("kustomization.yaml"), k)?;
    let yaml = run(Command::new("kubectl").arg("kustomize").arg(&dir), Duration::from_secs(60))?;
    std::fs::write(dir.join("rendered.yaml"), &yaml)?;
    parse_rendered(&yaml)
}

/// Replaces the line whose trimmed text starts with `start` (keeping its indentation).
fn set_line(text: &str, start: &str, new: &str) -> Result<String> {
    let mut found = false;
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            let t = l.trim_start();
            if !found && t.starts_with(start) {
                found = true;
                format!("{}{new}", &l[..l.len() - t.len()])
            } else {
                l.to_string()
            }
        })
        .collect();
    if !found {
        bail!("kustomization.yaml has no line starting {start:?}");
    }
    Ok(out.join("\n") + "\n")
}

/// The DaemonSet, its ConfigMap and its Secret out of rendered YAML.
pub fn parse_rendered(yaml: &str) -> Result<Manifests> {
    let mut daemonset = None;
    let mut configmap = BTreeMap::new();
    let mut secret = BTreeMap::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let v = Value::deserialize(doc)?;
        match v["kind"].as_str() {
            Some("DaemonSet") => daemonset = Some(v),
            Some("ConfigMap") => {
                for (k, val) in v["data"].as_object().into_iter().flatten() {
                    configmap.insert(k.clone(), val.as_str().unwrap_or_default().to_string());
                }
            }
            Some("Secret") => {
                for (k, val) in v["data"].as_object().into_iter().flatten() {
                    let b = base64_decode(val.as_str().unwrap_or_default())
                        .with_context(|| format!("Secret key {k} is not base64"))?;
                    secret.insert(k.clone(), b);
                }
            }
            _ => {}
        }
    }
    Ok(Manifests { daemonset: daemonset.ok_or_else(|| anyhow!("no DaemonSet in the manifests"))?, configmap, secret })
}

fn base64_decode(s: &str) -> Result<Vec<u8>> {
    use base64::Engine as _;
    let compact: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    Ok(base64::engine::general_purpose::STANDARD.decode(compact)?)
}

/// One container of the pod template, resolved for a node.
#[derive(Debug, Clone)]
pub struct ContainerRun {
    pub name: String,
    pub image: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// (host path, container path, read-only)
    pub mounts: Vec<(PathBuf, String, bool)>,
    pub privileged: bool,
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
}

impl Lab {
    fn podman_dir(&self) -> PathBuf {
        self.dir().join("podman")
    }

    /// podman with the lab's own storage (removed with the lab) and what works on this host: runc (crun fails on
    /// the hybrid cgroup layout), cgroupfs, events to a file.
    pub fn podman(&self) -> Command {
        let d = self.podman_dir();
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("run"))
            .args(["--storage-driver", "vfs", "--runtime", "runc", "--cgroup-manager", "cgroupfs"])
            .args(["--events-backend", "file", "--log-level", "error", "--tmpdir"])
            .arg(d.join("tmp"))
            .env("TMPDIR", d.join("tmp"))
            .stdin(Stdio::null());
        c
    }

    /// Loads an OCI archive into the lab's podman storage; returns the image's name.
    pub fn load_image(&mut self, archive: &Path) -> Result<String> {
        std::fs::create_dir_all(self.podman_dir().join("tmp"))?;
        self.state.podman = true;
        self.save()?;
        let out = run(self.podman().arg("load").arg("-i").arg(archive), Duration::from_secs(300))?;
        out.lines()
            .find_map(|l| l.strip_prefix("Loaded image: ").or_else(|| l.strip_prefix("Loaded image(s): ")))
            .map(|s| s.trim().to_string())
            .ok_or_else(|| anyhow!("podman load printed no image name: {out}"))
    }

    /// The containers of the pod template (init containers when `init`), resolved for `node`: the node's own
    /// directories for hostPaths, the ConfigMap and Secret written under the node's root.
    pub fn pod_containers(&self, node: &str, m: &Manifests, image: &str, init: bool) -> Result<Vec<ContainerRun>> {
        let n = self.node(node)?.clone();
        let spec = &m.daemonset["spec"]["template"]["spec"];
        if spec["hostNetwork"] != Value::Bool(true) {
            bail!("the pod template is not hostNetwork: the lab runs it in the node's namespace only");
        }
        let vol_root = n.root.join("pod-volumes");
        let mut volumes: BTreeMap<String, PathBuf> = BTreeMap::new();
        for v in spec["volumes"].as_array().into_iter().flatten() {
            let name = v["name"].as_str().unwrap_or_default().to_string();
            let path = if let Some(host) = v["hostPath"]["path"].as_str() {
                let p = self.host_path(node, host)?;
                match v["hostPath"]["type"].as_str() {
                    Some("DirectoryOrCreate") => std::fs::create_dir_all(&p)?,
                    Some("FileOrCreate") if !p.exists() => drop(std::fs::File::create(&p)?),
                    _ => {}
                }
                p
            } else if v.get("configMap").is_some() {
                let d = vol_root.join(&name);
                std::fs::create_dir_all(&d)?;
                for (k, val) in &m.configmap {
                    let text = if k == "cni-conf.json" { node_conflist(&n, val)? } else { val.clone() };
                    std::fs::write(d.join(k), text)?;
                }
                d
            } else if v.get("secret").is_some() {
                let d = vol_root.join(&name);
                std::fs::create_dir_all(&d)?;
                for (k, val) in &m.secret {
                    std::fs::write(d.join(k), val)?;
                }
                d
            } else {
                bail!("volume {name}: only hostPath, configMap and secret volumes are run by the lab");
            };
            volumes.insert(name, path);
        }
        let key = if init { "initContainers" } else { "containers" };
        let mut out = Vec::new();
        for c in spec[key].as_array().into_iter().flatten() {
            let name = c["name"].as_str().unwrap_or_default().to_string();
            let mut env = Vec::new();
            for e in c["env"].as_array().into_iter().flatten() {
                let k = e["name"].as_str().unwrap_or_default().to_string();
                let v = if let Some(v) = e["value"].as_str() {
                    v.to_string()
                } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName" {
                    node.to_string()
                } else if let Some(key) = e["valueFrom"]["configMapKeyRef"]["key"].as_str() {
                    m.configmap.get(key).cloned().ok_or_else(|| anyhow!("{name}: env {k}: no ConfigMap key {key}"))?
                } else {
                    bail!("{name}: env {k}: only values, spec.nodeName and ConfigMap keys are run by the lab");
                };
                env.push((k, v));
            }
            let expand = |s: &str| -> String {
                // Kubernetes' $(VAR) in command and args, from the container's environment.
                let mut s = s.to_string();
                for (k, v) in &env {
                    s = s.replace(&format!("$({k})"), v);
                }
                s
            };
            let argv: Vec<String> = c["command"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(c["args"].as_array().into_iter().flatten())
                .map(|a| expand(a.as_str().unwrap_or_default()))
                .collect();
            let mut mounts = Vec::new();
            for vm in c["volumeMounts"].as_array().into_iter().flatten() {
                let v = vm["name"].as_str().unwrap_or_default();
                let host = volumes.get(v).ok_or_else(|| anyhow!("{name}: no volume {v}"))?;
                let at = vm["mountPath"].as_str().unwrap_or_default().to_string();
                mounts.push((host.clone(), at, vm["readOnly"] == Value::Bool(true)));
            }
            let sc = &c["securityContext"];
            let caps = |k: &str| -> Vec<String> {
                sc["capabilities"][k]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c.as_str())
                    .map(String::from)
                    .collect()
            };
            out.push(ContainerRun {
                name,
                image: image.to_string(),
                argv,
                env,
                mounts,
                privileged: sc["privileged"] == Value::Bool(true),
                cap_add: caps("add"),
                cap_drop: caps("drop"),
            });
        }
        Ok(out)
    }

    /// A hostPath of the pod template, on this node: its root for node-local state, its cgroup for the cgroup v2
    /// hierarchy, its directory on the lab's bpffs for /sys/fs/bpf, the machine's xtables lock (shared by every
    /// namespace, as iptables expects).
    fn host_path(&self, node: &str, host: &str) -> Result<PathBuf> {
        let n = self.node(node)?;
        Ok(match host {
            "/sys/fs/cgroup" => self.node_cgroup(node),
            "/sys/fs/bpf" => {
                let d = self.node_bpf_root(node);
                std::fs::create_dir_all(&d)?;
                d
            }
            "/run/xtables.lock" => PathBuf::from(host),
            "/opt/cni/bin" | "/etc/cni/net.d" | "/run/flannel" | "/run/tartan" | "/var/lib/tartan" | "/var/lib/cni" => {
                n.root.join(host.trim_start_matches('/'))
            }
            other => bail!("hostPath {other}: the lab has no per-node place for it"),
        })
    }

    fn container_name(&self, node: &str, container: &str) -> String {
        format!("{}-{node}-{container}", self.prefix())
    }

    /// Runs the pod on `node` with podman: init containers to completion (a failure stops here, as kubelet retries
    /// the pod), then the containers, detached. `engines` picks containerd for some containers.
    pub fn run_pod(
        &mut self,
        node: &str,
        m: &Manifests,
        image: &str,
        engines: &BTreeMap<String, Engine>,
    ) -> Result<()> {
        let ns = self.node(node)?.ns.clone();
        let root = self.node(node)?.root.clone();
        let cg = self.node_cgroup_name(node);
        for c in self.pod_containers(node, m, image, true)? {
            let name = self.container_name(node, &c.name);
            // One left by an init container that timed out would hold the name.
            let _ = child_process::run(self.podman().args(["rm", "-f", &name]), None, Duration::from_secs(60));
            let mut cmd = self.podman();
            cmd.args(["run", "--rm", "--name", &name]);
            podman_args(&mut cmd, &ns, &cg, &c, None);
            run(&mut cmd, Duration::from_secs(120)).with_context(|| format!("init container {} on {node}", c.name))?;
        }
        for c in self.pod_containers(node, m, image, false)? {
            match engines.get(&c.name).copied().unwrap_or(Engine::Podman) {
                Engine::Podman => {
                    let name = self.container_name(node, &c.name);
                    let log = root.join(format!("{}.log", c.name));
                    let mut cmd = self.podman();
                    cmd.args(["run", "-d", "--name", &name]);
                    podman_args(&mut cmd, &ns, &cg, &c, Some(&log));
                    run(&mut cmd, Duration::from_secs(120))
                        .with_context(|| format!("container {} on {node}", c.name))?;
                }
                Engine::Containerd => self.ctr_run(node, &c)?,
            }
            self.state.containers.push((node.to_string(), c.name.clone()));
        }
        self.save()?;
        Ok(())
    }

    /// Stops and removes the pod's containers on `node` (SIGTERM, then SIGKILL after `grace`), as kubelet does when a
    /// DaemonSet pod is deleted.
    pub fn delete_pod(&mut self, node: &str, grace: Duration) -> Result<()> {
        let mine: Vec<String> =
            self.state.containers.iter().filter(|(n, _)| n == node).map(|(_, c)| c.clone()).collect();
        for c in &mine {
            let name = self.container_name(node, c);
            if self.ctr_has(&name) {
                self.ctr_remove(&name, grace)?;
                continue;
            }
            let t = grace.as_secs().to_string();
            run(self.podman().args(["rm", "-f", "-t", &t, &name]), grace + Duration::from_secs(60))?;
        }
        self.state.containers.retain(|(n, _)| n != node);
        self.save()?;
        Ok(())
    }

    /// Runs the pod's container `like` once on `node` with `extra` arguments after its own (a one-off such as
    /// `tartan-proxy ... --cleanup`), with its mounts and privileges; returns what it printed.
    pub fn run_once(&mut self, node: &str, m: &Manifests, image: &str, like: &str, extra: &[&str]) -> Result<String> {
        let ns = self.node(node)?.ns.clone();
        let cg = self.node_cgroup_name(node);
        let mut c = self
            .pod_containers(node, m, image, false)?
            .into_iter()
            .find(|c| c.name == like)
            .ok_or_else(|| anyhow!("no container {like} in the pod template"))?;
        c.argv.extend(extra.iter().map(|s| s.to_string()));
        let mut cmd = self.podman();
        cmd.args(["run", "--rm"]);
        podman_args(&mut cmd, &ns, &cg, &c, None);
        let out = child_process::run(&mut cmd, None, Duration::from_secs(120))?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            bail!("{like} {extra:?} on {node}: {}\n{text}", out.status);
        }
        Ok(text)
    }

    /// Waits until `url` (inside the node) answers 200, as the readiness probe would see it.
    pub fn wait_http_ok(&self, node: &str, url: &str, timeout: Duration) -> Result<()> {
        let ns = self.node(node)?.ns.clone();
        let ok = wait_for(timeout, || {
            self.exec_status(&ns, &["curl", "-sf", "-m", "2", "-o", "/dev/null", url]).is_ok_and(|o| o.status.success())
        });
        if !ok {
            bail!("{url} on {node} did not answer 200 within {timeout:?}");
        }
        Ok(())
    }

    /// Removes every container and the storage of the lab's podman (part of the teardown).
    pub(crate) fn remove_containers(&mut self) {
        if self.state.podman {
            let _ = child_process::run(
                self.podman().args(["rm", "-a", "-f", "-t", "2"]).stdout(Stdio::null()),
                None,
                Duration::from_secs(120),
            );
        }
        self.stop_containerd();
    }
}

/// What a DaemonSet pod's container gets from kubelet, as podman flags: the node's network namespace (hostNetwork),
/// the mounts, environment, privileges; the ulimits this host needs lowered.
fn podman_args(cmd: &mut Command, ns: &str, cgroup: &str, c: &ContainerRun, log: Option<&Path>) {
    // In the node's cgroup, as every process of a node is (podman's cgroupfs manager takes a path from each root).
    cmd.arg(format!("--cgroup-parent=/{cgroup}")).arg(format!("--network=ns:/run/netns/{ns}")).args([
        "--ulimit",
        "nofile=20000:20000",
        "--ulimit",
        "nproc=4096:4096",
        "--pull",
        "never",
    ]);
    if let Some(log) = log {
        cmd.args(["--log-driver", "k8s-file", "--log-opt"]).arg(format!("path={}", log.display()));
    }
    if c.privileged {
        cmd.arg("--privileged");
    }
    for cap in &c.cap_drop {
        cmd.arg(format!("--cap-drop={cap}"));
    }
    for cap in &c.cap_add {
        cmd.arg(format!("--cap-add={cap}"));
    }
    for (k, v) in &c.env {
        cmd.arg("--env").arg(format!("{k}={v}"));
    }
    for (host, at, ro) in &c.mounts {
        let opt = if *ro { "ro" } else { "rw" };
        cmd.arg("--volume").arg(format!("{}:{at}:{opt}", host.display()));
    }
    let (entry, args) = c.argv.split_first().map(|(e, a)| (e.clone(), a.to_vec())).unwrap_or_default();
    if !entry.is_empty() {
        cmd.arg("--entrypoint").arg(entry);
    }
    cmd.arg(&c.image).args(args);
}

/// The ConfigMap's conflist for a lab node: the plugin runs on the machine itself (the lab is the runtime), so its
/// node-local paths (subnet.env, run dir, IPAM store) are pointed at the node's root, where the containers' hostPath
/// mounts put the same files.
fn node_conflist(n: &crate::state::NodeState, text: &str) -> Result<String> {
    let mut v: Value = serde_json::from_str(text).context("the ConfigMap's cni-conf.json")?;
    for p in v["plugins"].as_array_mut().into_iter().flatten() {
        if p["type"] != "tartan" {
            continue;
        }
        let o = p.as_object_mut().ok_or_else(|| anyhow!("a plugin is not an object"))?;
        o.entry("subnetFile").or_insert(n.root.join("run/flannel/subnet.env").display().to_string().into());
        o.entry("runDir").or_insert(n.root.join("run/tartan").display().to_string().into());
        let ipam = o.entry("ipam").or_insert(serde_json::json!({"type": "host-local"}));
        if let Some(i) = ipam.as_object_mut() {
            i.entry("dataDir").or_insert(n.root.join("var/lib/cni/networks").display().to_string().into());
        }
    }
    Ok(serde_json::to_string_pretty(&v)?)
}

/// containerd's namespace for the lab's containers.
const CTR_NS: &str = "tartan-lab";

impl Lab {
    fn containerd_dir(&self) -> PathBuf {
        self.dir().join("containerd")
    }

    fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(self.containerd_dir().join("containerd.sock")).args(["--namespace", CTR_NS]);
        c.stdin(Stdio::null());
        c
    }

    /// Starts a containerd of the lab's own (its own root, state and socket; no CRI) and imports the archive into it.
    pub fn start_containerd(&mut self, archive: &Path) -> Result<()> {
        let d = self.containerd_dir();
        std::fs::create_dir_all(&d)?;
        let config = format!(
            "version = 2\nroot = \"{r}\"\nstate = \"{s}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{o}\"\n",
            r = d.join("root").display(),
            s = d.join("state").display(),
            sock = d.join("containerd.sock").display(),
            o = d.join("opt").display(),
        );
        std::fs::write(d.join("config.toml"), config)?;
        let log = std::fs::File::create(d.join("containerd.log"))?;
        // In the lab's control namespace (it needs no network): a sweep of a killed run kills it and its shims
        // with the namespace's processes.
        let ns = self.ns_name("etcd");
        let mut cmd = crate::command_in(&ns, "containerd")?;
        cmd.arg("--config").arg(d.join("config.toml")).stdout(log.try_clone()?).stderr(log).stdin(Stdio::null());
        let pid = self.spawn_cmd(cmd)?;
        self.state.containerd_pid = Some(pid);
        self.save()?;
        if !wait_for(Duration::from_secs(20), || self.ctr().arg("version").output().is_ok_and(|o| o.status.success())) {
            bail!("containerd did not answer; see {}", d.join("containerd.log").display());
        }
        run(self.ctr().args(["images", "import", "--snapshotter", "native"]).arg(archive), Duration::from_secs(300))?;
        Ok(())
    }

    /// A container of the pod run by containerd (`ctr run`), detached, its output to the node's `<name>.log`.
    fn ctr_run(&mut self, node: &str, c: &ContainerRun) -> Result<()> {
        let ns = self.node(node)?.ns.clone();
        let log = self.node(node)?.root.join(format!("{}.log", c.name));
        let name = self.container_name(node, &c.name);
        let mut cmd = self.ctr();
        cmd.args(["run", "-d", "--snapshotter", "native", "--cgroup", ""])
            .arg(format!("--with-ns=network:/run/netns/{ns}"))
            .arg(format!("--log-uri=file://{}", log.display()));
        if c.privileged {
            cmd.arg("--privileged");
        }
        // ctr drops only the capabilities it is given by name: ALL becomes the runtime's default set.
        const DEFAULT_CAPS: [&str; 14] = [
            "CHOWN",
            "DAC_OVERRIDE",
            "FSETID",
            "FOWNER",
            "MKNOD",
            "NET_RAW",
            "SETGID",
            "SETUID",
            "SETFCAP",
            "SETPCAP",
            "NET_BIND_SERVICE",
            "SYS_CHROOT",
            "KILL",
            "AUDIT_WRITE",
        ];
        for cap in &c.cap_drop {
            let caps: Vec<&str> = if cap == "ALL" { DEFAULT_CAPS.to_vec() } else { vec![cap.as_str()] };
            for cap in caps.into_iter().filter(|d| !c.cap_add.iter().any(|a| a == d)) {
                cmd.arg(format!("--cap-drop=CAP_{cap}"));
            }
        }
        for cap in &c.cap_add {
            cmd.arg(format!("--cap-add=CAP_{cap}"));
        }
        for (k, v) in &c.env {
            cmd.arg("--env").arg(format!("{k}={v}"));
        }
        for (host, at, ro) in &c.mounts {
            let opt = if *ro { "rbind:ro" } else { "rbind:rw" };
            cmd.arg("--mount").arg(format!("type=bind,src={},dst={at},options={opt}", host.display()));
        }
        cmd.arg(&c.image).arg(&name).args(&c.argv);
        run(&mut cmd, Duration::from_secs(120)).with_context(|| format!("ctr run {} on {node}", c.name))?;
        self.state.ctr_containers.push(name);
        self.save()?;
        Ok(())
    }

    fn ctr_has(&self, name: &str) -> bool {
        self.state.ctr_containers.iter().any(|c| c == name)
    }

    /// Stops a containerd container (SIGTERM, SIGKILL after `grace`) and removes it with its snapshot.
    fn ctr_remove(&mut self, name: &str, grace: Duration) -> Result<()> {
        let running = |lab: &Lab| {
            lab.ctr()
                .args(["tasks", "ls", "-q"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l == name))
                && !lab.ctr().args(["tasks", "ls"]).output().is_ok_and(|o| {
                    String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with(name) && l.contains("STOPPED"))
                })
        };
        let _ = self.ctr().args(["tasks", "kill", "-s", "SIGTERM", name]).output();
        if !wait_for(grace, || !running(self)) {
            let _ = self.ctr().args(["tasks", "kill", "-s", "SIGKILL", name]).output();
            wait_for(Duration::from_secs(10), || !running(self));
        }
        let _ = self.ctr().args(["tasks", "delete", name]).output();
        run(self.ctr().args(["containers", "delete", name]), Duration::from_secs(60))?;
        self.state.ctr_containers.retain(|c| c != name);
        self.save()?;
        Ok(())
    }

    /// Removes the lab's containerd containers, then stops the daemon (its shims go with their tasks).
    fn stop_containerd(&mut self) {
        let Some(pid) = self.state.containerd_pid else { return };
        for name in self.state.ctr_containers.clone() {
            let _ = self.ctr_remove(&name, Duration::from_secs(2));
        }
        self.stop(pid);
        self.state.containerd_pid = None;
        let _ = self.save();
    }
}

/// A cluster whose nodes run Tartan from the image.
pub struct ImageCluster {
    pub manifests: Manifests,
    pub image: String,
}

impl Lab {
    /// etcd with TLS (the Secret's client certificate is how the pods reach it), `nodes` nodes each running the
    /// DaemonSet's pod from `archive` (the first agent puts `net_conf` in the store from the ConfigMap), the
    /// outside host. Returns once every node has its subnet.env and both daemons answer /readyz.
    pub fn build_image_cluster(
        &mut self,
        nodes: usize,
        archive: &Path,
        net_conf: &Value,
        proxy_mode: &str,
    ) -> Result<ImageCluster> {
        self.ensure_underlay()?;
        let certs = self.dir().join("certs");
        self.make_certs(&certs)?;
        self.start_etcd_with(Some(&certs))?;
        let image = self.load_image(archive)?;
        let endpoints = format!("https://{}:2379", crate::cluster::ETCD_IP);
        let settings = Settings { image: image.clone(), proxy_mode: proxy_mode.into(), net_conf: net_conf.clone() };
        let manifests = render(self, &settings, &certs, &endpoints)?;
        for i in 1..=nodes {
            let name = format!("n{i}");
            let node = self.add_node(&name)?;
            let idx = self.state.nodes.iter().position(|n| n.name == name).unwrap_or_default();
            self.state.nodes[idx].cni_bin = Some(node.root.join("opt/cni/bin"));
            self.save()?;
            self.run_pod(&name, &manifests, &image, &BTreeMap::new())?;
        }
        for i in 1..=nodes {
            self.wait_pod_ready(&format!("n{i}"))?;
        }
        self.add_outside()?;
        Ok(ImageCluster { manifests, image })
    }

    /// What the DaemonSet's readiness probes check, and the node's subnet.env.
    pub fn wait_pod_ready(&self, node: &str) -> Result<()> {
        self.wait_subnet_env(node, Duration::from_secs(60)).or_else(|e| {
            let log = std::fs::read_to_string(self.node(node)?.root.join("tartan-agent.log")).unwrap_or_default();
            Err(e.context(format!("tartan-agent's log on {node}:\n{log}")))
        })?;
        self.wait_http_ok(node, "http://127.0.0.1:10265/readyz", Duration::from_secs(60))?;
        self.wait_http_ok(node, "http://127.0.0.1:10249/readyz", Duration::from_secs(60)).map_err(|e| {
            let log = self
                .node(node)
                .map(|n| n.root.join("tartan-proxy.log"))
                .ok()
                .and_then(|p| std::fs::read_to_string(p).ok());
            e.context(format!("tartan-proxy's log on {node}:\n{}", log.unwrap_or_default()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_lines() {
        assert_eq!(base64_decode("aGVsbG8gd29ybGQ=").unwrap(), b"hello world");
        assert_eq!(base64_decode("eAo=").unwrap(), b"x\n");
        assert!(base64_decode("a*").is_err());
        let k = "x:\n  - a=1\n    newTag: 0.1.0\n";
        assert_eq!(set_line(k, "newTag:", "newTag: 2").unwrap(), "x:\n  - a=1\n    newTag: 2\n");
        assert!(set_line(k, "nope", "x").is_err());
    }
}
