//! Tartan as operators deploy it: the image built by scripts/build-image.sh, the manifests in deploy/ (validated
//! against Kubernetes' schemas, rendered by kustomize), and the DaemonSet's pod run on lab nodes with podman and
//! containerd. No kubelet or API server is exercised: the lab plays kubelet's part for one pod per node.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use netns_lab::cluster::Backend;
use netns_lab::daemonset::Engine;
use netns_lab::reachability::{Matrix, Proto, Topology};
use netns_lab::{wait_for, Lab};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

struct Images {
    /// The first tag's archive, its name once loaded, and the build's report.
    a: PathBuf,
    a_report: Value,
    a_again: Value,
    /// The upgrade: a second tag.
    b: PathBuf,
}

fn build(tag: &str, out: &Path) -> Value {
    let o = Command::new("bash")
        .arg(repo().join("scripts/build-image.sh"))
        // scripts/test.sh built the binaries: the image takes those.
        .args(["--no-build", "--tag", tag, "--out"])
        .arg(out)
        .current_dir(repo())
        .stderr(Stdio::inherit())
        .output()
        .expect("build-image.sh");
    assert!(o.status.success(), "build-image.sh --tag {tag} failed");
    let text = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(text.lines().last().unwrap_or_default()).expect("the build's JSON report")
}

/// The images, built once for every test of this binary (they run in parallel).
fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let dir = repo().join("target/image/test");
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a.oci.tar");
        let b = dir.join("b.oci.tar");
        let a_report = build("e2e-a", &a);
        let a_again = build("e2e-a", &dir.join("a-again.oci.tar"));
        build("e2e-b", &b);
        Images { a, a_report, a_again, b }
    })
}

/// A file out of an OCI archive.
fn archive_file(archive: &Path, name: &str) -> Vec<u8> {
    let mut child = Command::new("tar").arg("-xOf").arg(archive).arg(name).stdout(Stdio::piped()).spawn().unwrap();
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    assert!(child.wait().unwrap().success(), "{name} in {}", archive.display());
    out
}

fn blob(archive: &Path, digest: &str) -> Value {
    serde_json::from_slice(&archive_file(archive, &format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))))
        .unwrap()
}

#[test]
fn the_image_is_reproducible_small_and_labelled() {
    let im = images();
    // Same inputs, same digest.
    assert_eq!(im.a_report["manifest"], im.a_again["manifest"], "two builds of one commit differ");
    let compressed = im.a_report["layer_bytes_compressed"].as_u64().unwrap();
    let rootfs = im.a_report["rootfs_bytes"].as_u64().unwrap();
    eprintln!("image: {compressed} bytes compressed, {rootfs} bytes unpacked");
    assert!(compressed < 30 << 20, "the image is {compressed} bytes compressed");
    assert!(rootfs < 30 << 20, "the image is {rootfs} bytes unpacked");
    let index: Value = serde_json::from_slice(&archive_file(&im.a, "index.json")).unwrap();
    let manifest = blob(&im.a, index["manifests"][0]["digest"].as_str().unwrap());
    assert_eq!(index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"], "localhost/tartan:e2e-a");
    let config = blob(&im.a, manifest["config"]["digest"].as_str().unwrap());
    let labels = &config["config"]["Labels"];
    assert_eq!(labels["org.opencontainers.image.version"], env!("CARGO_PKG_VERSION"));
    for l in
        ["org.opencontainers.image.source", "org.opencontainers.image.revision", "org.opencontainers.image.created"]
    {
        assert!(labels[l].as_str().is_some_and(|v| !v.is_empty()), "label {l}: {labels}");
    }
    // What is inside: the daemons, the plugin, the netfilter tools with both iptables backends behind the wrapper.
    let listing = Command::new("tar").arg("-tzf").arg("-").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn();
    let mut listing = listing.unwrap();
    let layer = archive_file(
        &im.a,
        &format!("blobs/sha256/{}", manifest["layers"][0]["digest"].as_str().unwrap().trim_start_matches("sha256:")),
    );
    {
        use std::io::Write;
        listing.stdin.take().unwrap().write_all(&layer).unwrap();
    }
    let out = listing.wait_with_output().unwrap();
    let files = String::from_utf8_lossy(&out.stdout);
    for f in [
        "usr/local/bin/tartan",
        "usr/local/bin/tartan-agent",
        "usr/local/bin/tartan-proxy",
        "usr/local/bin/tartan-node",
        "usr/sbin/xtables-nft-multi",
        "usr/sbin/xtables-legacy-multi",
        "usr/sbin/iptables-wrapper",
        "usr/sbin/ipset",
        "usr/sbin/conntrack",
    ] {
        assert!(files.lines().any(|l| l == f), "{f} is not in the image");
    }
    assert!(!files.contains("usr/share/doc/"), "documentation left in the image");
}

/// kubectl kustomize of a copy of deploy/ with stand-in certificate files (what an operator adds).
fn render_deploy() -> (tempfile_dir::Dir, String) {
    let d = tempfile_dir::Dir::new("deploy");
    for f in ["kube-tartan.yml", "kustomization.yaml", "net-conf.json"] {
        std::fs::copy(repo().join("deploy").join(f), d.path.join(f)).unwrap();
    }
    std::fs::create_dir_all(d.path.join("etcd")).unwrap();
    for f in ["ca.crt", "tls.crt", "tls.key"] {
        std::fs::write(d.path.join("etcd").join(f), "-----BEGIN CERTIFICATE-----\n").unwrap();
    }
    let o = Command::new("kubectl").arg("kustomize").arg(&d.path).output().expect("kubectl");
    assert!(o.status.success(), "kubectl kustomize: {}", String::from_utf8_lossy(&o.stderr));
    (d, String::from_utf8_lossy(&o.stdout).into_owned())
}

mod tempfile_dir {
    /// A directory under target/ removed on drop (the tests crate has no tempfile).
    pub struct Dir {
        pub path: std::path::PathBuf,
    }
    impl Dir {
        pub fn new(tag: &str) -> Dir {
            let path = super::repo().join(format!("target/tmp-{tag}-{}-{}", std::process::id(), rand::random::<u32>()));
            std::fs::create_dir_all(&path).unwrap();
            Dir { path }
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn validate(files: &[&Path], version: &str) -> (bool, String) {
    let o = Command::new(repo().join("target/venv/bin/kubernetes-validate"))
        .args(["--strict", "--quiet", "-k", version])
        .args(files)
        .output()
        .expect("kubernetes-validate (scripts/setup.sh installs it in target/venv)");
    (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

#[test]
fn the_manifests_are_valid_for_three_kubernetes_versions_in_strict_mode() {
    let (dir, rendered) = render_deploy();
    let out = dir.path.join("rendered.yaml");
    std::fs::write(&out, &rendered).unwrap();
    let base = repo().join("deploy/kube-tartan.yml");
    for v in ["1.30.0", "1.33.0", "1.37.0"] {
        let (ok, text) = validate(&[&base, &out], v);
        assert!(ok, "Kubernetes {v}: {text}");
    }
    // Strict mode catches what an API server would reject or silently drop.
    let bad = dir.path.join("bad.yml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&base)
            .unwrap()
            .replace("      hostNetwork: true", "      hostNetwork: true\n      hostNetwrok: true"),
    )
    .unwrap();
    let (ok, text) = validate(&[&bad], "1.33.0");
    assert!(!ok && text.contains("hostNetwrok"), "a misspelt field passed: {text}");

    // The kustomization is the one place: what it sets is what the DaemonSet runs with.
    let m = netns_lab::daemonset::parse_rendered(&rendered).unwrap();
    assert_eq!(m.configmap["proxy-mode"], "iptables");
    assert_eq!(m.configmap["etcd-endpoints"], "https://127.0.0.1:2379");
    let net: Value = serde_json::from_str(&m.configmap["net-conf.json"]).unwrap();
    assert_eq!(net["Backend"]["Type"], "vxlan");
    assert!(m.secret["ca.crt"].starts_with(b"-----BEGIN"));
    let spec = &m.daemonset["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    assert_eq!(spec["initContainers"][0]["command"][1], "install");
    let containers: BTreeMap<&str, &Value> =
        spec["containers"].as_array().unwrap().iter().map(|c| (c["name"].as_str().unwrap(), c)).collect();
    for (name, port) in [("tartan-agent", 10265), ("tartan-proxy", 10249)] {
        let c = containers[name];
        assert_eq!(c["image"], "localhost/tartan:0.1.0");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{name}");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{name}");
        assert_eq!(c["readinessProbe"]["httpGet"]["port"], port, "{name}");
    }
    // Only the proxy is privileged (BPF, sysctls); the agent has flannel's two capabilities.
    assert_eq!(containers["tartan-agent"]["securityContext"]["privileged"], false);
    assert_eq!(
        containers["tartan-agent"]["securityContext"]["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN", "NET_RAW"])
    );
    assert_eq!(containers["tartan-proxy"]["securityContext"]["privileged"], true);
    let host_paths: Vec<&str> =
        spec["volumes"].as_array().unwrap().iter().filter_map(|v| v["hostPath"]["path"].as_str()).collect();
    for p in ["/run/flannel", "/etc/cni/net.d", "/opt/cni/bin", "/run/xtables.lock", "/sys/fs/bpf", "/sys/fs/cgroup"] {
        assert!(host_paths.contains(&p), "no hostPath {p}: {host_paths:?}");
    }
}

/// `ping -i 0.1` from a pod until stopped; (sent, received) from its summary.
struct PingLoop(std::process::Child);

impl PingLoop {
    fn start(lab: &Lab, ns: &str, dst: &str) -> PingLoop {
        let child = lab
            .cmd(ns, "ping")
            .unwrap()
            .args(["-i", "0.1", "-W", "1", "-q", dst])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        PingLoop(child)
    }

    fn stop(self) -> (u64, u64) {
        // SAFETY: SIGINT to our own child: ping prints its summary and exits.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let out = self.0.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().find(|l| l.contains("packets transmitted")).unwrap_or_else(|| panic!("ping: {text}"));
        let n: Vec<u64> = line.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect();
        (n[0], n[1])
    }
}

fn tcp_connects(lab: &Lab, ns: &str, addr: &str) -> bool {
    lab.exec_status(ns, &["socat", "-u", "OPEN:/dev/null", &format!("TCP:{addr},connect-timeout=2")])
        .is_ok_and(|o| o.status.success())
}

fn daemonset_pods_wire_serve_and_police_a_cluster_and_survive_an_image_upgrade(mode: &'static str) {
    let im = images();
    let mut lab = Lab::new(&format!("img{}", &mode[..1])).unwrap();
    let c = lab.build_image_cluster(3, &im.a, &Backend::Vxlan.network_config(), mode).expect("cluster from the image");
    let nodes = ["n1", "n2", "n3"];
    for n in nodes {
        let root = lab.node(n).unwrap().root.clone();
        // The init container installed the plugin and the conflist; the agent put the ConfigMap's network in etcd.
        assert!(root.join("opt/cni/bin/tartan").is_file(), "{n}: no plugin installed");
        let conf: Value =
            serde_json::from_str(&std::fs::read_to_string(root.join("etc/cni/net.d/10-tartan.conflist")).unwrap())
                .unwrap();
        assert_eq!(conf["plugins"][0]["type"], "tartan");
    }
    let stored = lab.etcdctl(&["get", "/coreos.com/network/config", "--print-value-only"]).unwrap();
    assert!(stored.contains("10.244.0.0/16"), "{stored}");

    // The connectivity matrix: nine pods over three nodes, wired by the installed plugin, each reaching all.
    let topo = Topology::build(&mut lab, &nodes).expect("every pod reaches every other");

    // A Service: y/b behind a cluster IP, from a pod on each node.
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: y}\nspec: {clusterIP: 10.96.0.50, selector: {pod: b}, ports: [{port: 8080, targetPort: 80}]}\n";
    let out = lab.tartanctl(&["apply", "-f", "-"], Some(svc)).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for src in ["x/a", "x/b", "x/c"] {
        let ns = topo.pod(src).netns.clone();
        assert!(
            wait_for(Duration::from_secs(10), || tcp_connects(&lab, &ns, "10.96.0.50:8080")),
            "{src} (on {}) cannot reach the Service",
            topo.pod(src).node
        );
    }

    // The NetworkPolicy matrix: x takes nothing but TCP 80 into x/a from namespace y.
    let policies = std::fs::read_to_string(repo().join("netns-lab/examples/netpol-xyz.yaml")).unwrap();
    let out = lab.tartanctl(&["apply", "-f", "-"], Some(&policies)).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want = Matrix::from_fn(&topo, |s, d, p| {
        s.id == d.id
            || d.namespace != "x"
            || (d.name == "a" && s.namespace == "y" && p.proto == Proto::Tcp && p.port == 80)
    });
    let got = topo.probe_until(&want, Duration::from_secs(10));
    assert!(got == want, "{mode}: policy matrix through the image:\n{}", got.diff_table(&want));

    // The upgrade: a second tag, one node at a time, while pods on n1 ping pods on n2 and n3: nothing is lost
    // (the kernel keeps routes, rules and pinned programs; the new pod's daemons adopt them).
    // Outside namespace x, which the policies isolate.
    let open = |node: &str| topo.pods.iter().find(|p| p.node == node && p.namespace != "x").unwrap();
    let from = open("n1").netns.clone();
    let targets: Vec<String> = ["n2", "n3"].iter().map(|n| open(n).ip.to_string()).collect();
    let loops: Vec<PingLoop> = targets.iter().map(|t| PingLoop::start(&lab, &from, t)).collect();
    let image_b = "localhost/tartan:e2e-b".to_string();
    let loaded = lab.load_image(&im.b).unwrap();
    assert_eq!(loaded, image_b);
    let before: Vec<String> = nodes.iter().map(|n| lab.wait_subnet_env(n, Duration::from_secs(1)).unwrap()).collect();
    for n in nodes {
        lab.delete_pod(n, Duration::from_secs(10)).unwrap();
        lab.run_pod(n, &c.manifests, &image_b, &BTreeMap::new()).unwrap();
        lab.wait_pod_ready(n).unwrap();
    }
    for (l, t) in loops.into_iter().zip(&targets) {
        let (sent, received) = l.stop();
        eprintln!("{mode}: ping to {t} during the upgrade: {received}/{sent}");
        // The last echo may be in flight when ping is interrupted.
        assert!(sent > 20 && received + 1 >= sent, "{mode}: ping to {t} during the upgrade: {received}/{sent}");
    }
    for (n, old) in nodes.iter().zip(before) {
        assert_eq!(lab.wait_subnet_env(n, Duration::from_secs(1)).unwrap(), old, "{n}: the upgrade changed the lease");
        let ps = lab.podman().args(["ps", "--format", "{{.Names}} {{.Image}}"]).output().unwrap();
        let ps = String::from_utf8_lossy(&ps.stdout).into_owned();
        assert!(
            ps.lines().filter(|l| l.contains(&format!("-{n}-tartan-")) && l.ends_with(&image_b)).count() == 2,
            "{n} does not run {image_b}: {ps}"
        );
    }
    let got = topo.probe_until(&want, Duration::from_secs(10));
    assert!(got == want, "{mode}: policy matrix after the upgrade:\n{}", got.diff_table(&want));

    // Deleting the pods removes nothing: the nodes keep forwarding pod traffic and serving the Service.
    for n in nodes {
        lab.delete_pod(n, Duration::from_secs(10)).unwrap();
    }
    for t in &targets {
        assert!(lab.ping(&from, t).unwrap(), "{mode}: pod traffic stopped with the pods");
    }
    let xb = topo.pod("x/b").netns.clone();
    assert!(tcp_connects(&lab, &xb, "10.96.0.50:8080"), "{mode}: the Service stopped with the pods");

    // --cleanup, run from the image with the proxy container's own flags and mounts, removes what the proxy owns.
    for n in nodes {
        // What the cleanup is to remove is there first (so that the checks below cannot pass on nothing).
        let ns = lab.node(n).unwrap().ns.clone();
        let pins = lab.node_bpf_root(n).join("tartan");
        if mode == "iptables" {
            let rules = lab.exec(&ns, &["iptables-save"]).unwrap();
            assert!(String::from_utf8_lossy(&rules.stdout).contains("TARTAN-SERVICES"), "{n}: no service rules");
        } else {
            assert!(std::fs::read_dir(&pins).unwrap().count() > 0, "{n}: nothing pinned");
        }
        let rules = lab.exec(&ns, &["iptables-save"]).unwrap();
        assert!(String::from_utf8_lossy(&rules.stdout).contains("FLANNEL-FWD"), "{n}: no FLANNEL chains");
        lab.run_once(n, &c.manifests, &image_b, "tartan-proxy", &["--cleanup"]).unwrap();
        let ns = lab.node(n).unwrap().ns.clone();
        let rules = lab.exec(&ns, &["iptables-save"]).unwrap();
        let rules = String::from_utf8_lossy(&rules.stdout);
        assert!(
            !rules.contains("TARTAN-SVC") && !rules.contains("TARTAN-SERVICES"),
            "{n}: left after --cleanup:\n{rules}"
        );
        let pins = lab.node_bpf_root(n).join("tartan");
        let left: Vec<_> =
            std::fs::read_dir(&pins).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
        assert!(left.is_empty(), "{n}: pins left after --cleanup: {left:?}");
    }
    assert!(!tcp_connects(&lab, &xb, "10.96.0.50:8080"), "{mode}: the Service still answers after --cleanup");

    // And the agent's: the vxlan device (with its routes), the FLANNEL chains, subnet.env. Pods lose the other nodes.
    for n in nodes {
        lab.run_once(n, &c.manifests, &image_b, "tartan-agent", &["--cleanup"]).unwrap();
        let ns = lab.node(n).unwrap().ns.clone();
        let links = lab.exec(&ns, &["ip", "-o", "link"]).unwrap();
        assert!(!String::from_utf8_lossy(&links.stdout).contains("flannel."), "{n}: the vxlan device is left");
        let rules = lab.exec(&ns, &["iptables-save"]).unwrap();
        assert!(!String::from_utf8_lossy(&rules.stdout).contains("FLANNEL"), "{n}: FLANNEL chains left");
        assert!(!lab.node(n).unwrap().root.join("run/flannel/subnet.env").exists(), "{n}: subnet.env left");
    }
    assert!(!lab.ping(&from, &targets[0]).unwrap(), "{mode}: pods still reach other nodes after --cleanup");
}

tartan_e2e::every_dataplane!(daemonset_pods_wire_serve_and_police_a_cluster_and_survive_an_image_upgrade);

/// The same image under containerd: the pod's agent run with `ctr` (a containerd the lab starts), the rest with
/// podman, on one node of two.
#[test]
fn the_agent_runs_from_the_same_image_under_containerd() {
    let im = images();
    let mut lab = Lab::new("ctrd").unwrap();
    let c = lab.build_image_cluster(1, &im.a, &Backend::Vxlan.network_config(), "iptables").unwrap();
    lab.start_containerd(&im.a).unwrap();
    let n2 = lab.add_node("n2").unwrap();
    let idx = lab.state.nodes.iter().position(|n| n.name == "n2").unwrap();
    lab.state.nodes[idx].cni_bin = Some(n2.root.join("opt/cni/bin"));
    let engines = BTreeMap::from([("tartan-agent".to_string(), Engine::Containerd)]);
    lab.run_pod("n2", &c.manifests, &c.image, &engines).unwrap();
    lab.wait_pod_ready("n2").unwrap();
    let tasks = lab_ctr_tasks(&lab);
    assert!(tasks.contains("-n2-tartan-agent") && tasks.contains("RUNNING"), "ctr tasks: {tasks}");
    // Its lease is in etcd and pods on both nodes reach each other through it.
    let leases = lab.etcdctl(&["get", "/coreos.com/network/subnets/", "--prefix", "--keys-only"]).unwrap();
    assert_eq!(leases.lines().filter(|l| !l.is_empty()).count(), 2, "{leases}");
    lab.add_pod("n1", "a", "default").unwrap();
    lab.add_pod("n2", "b", "default").unwrap();
    let b = lab.pod("b").unwrap().ip.clone();
    let a_ns = lab.pod("a").unwrap().ns.clone();
    assert!(
        wait_for(Duration::from_secs(10), || lab.ping(&a_ns, &b).unwrap_or(false)),
        "a cannot reach b across nodes"
    );
    lab.delete_pod("n2", Duration::from_secs(10)).unwrap();
    assert!(!lab_ctr_tasks(&lab).contains("-n2-tartan-agent"), "the containerd task is still there");
}

fn lab_ctr_tasks(lab: &Lab) -> String {
    let o = Command::new("ctr")
        .arg("--address")
        .arg(lab.dir().join("containerd/containerd.sock"))
        .args(["--namespace", "tartan-lab", "tasks", "ls"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The image's iptables follows the host's backend: kubelet's hint chain in the legacy tables makes it legacy, in
/// nf_tables nft; with neither, the backend holding rules wins.
#[test]
fn the_images_iptables_writes_where_the_host_keeps_its_rules() {
    let im = images();
    let mut lab = Lab::new("ipwrap").unwrap();
    let image = lab.load_image(&im.a).unwrap();
    let iptables_in = |lab: &Lab, node: &str, ns: &str, args: &[&str]| {
        let out = lab
            .podman()
            .args(["run", "--rm", &format!("--network=ns:/run/netns/{ns}"), "--cap-add=NET_ADMIN", "--cap-add=NET_RAW"])
            // In the node's cgroup (removed with the lab), not podman's default one.
            .arg(format!("--cgroup-parent=/{}", lab.node_cgroup_name(node)))
            .args(["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096", "--pull", "never"])
            .args(["--entrypoint", "/usr/sbin/iptables", &image])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    for (node, host_tool, want) in
        [("n1", "iptables-legacy", "iptables-legacy"), ("n2", "iptables-nft", "iptables-nft")]
    {
        let ns = lab.add_node(node).unwrap().ns;
        lab.exec(&ns, &[host_tool, "-w", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"]).unwrap();
        let said = iptables_in(&lab, node, &ns, &["-w", "-t", "filter", "-N", "TARTAN-WRAPPER-TEST"]);
        assert!(said.contains(&format!("using {want}")), "{node}: {said}");
        // The chain went where the host's rules are.
        let saved = lab.exec(&ns, &[&format!("{want}-save"), "-t", "filter"]).unwrap();
        assert!(String::from_utf8_lossy(&saved.stdout).contains(":TARTAN-WRAPPER-TEST"), "{node}: not in {want}");
    }
    // No hint: the backend with more rules (here legacy, holding a host's rules).
    let ns = lab.add_node("n3").unwrap().ns;
    for i in 0..3 {
        lab.exec(&ns, &["iptables-legacy", "-w", "-A", "INPUT", "-s", &format!("192.0.2.{i}"), "-j", "ACCEPT"])
            .unwrap();
    }
    let said = iptables_in(&lab, "n3", &ns, &["-w", "-S"]);
    assert!(said.contains("using iptables-legacy"), "n3: {said}");
}
