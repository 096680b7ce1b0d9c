//! The lab's own promises: everything it makes lives in its namespaces, and it all goes away, on drop, on panic,
//! and through `sweep` when the run that made it died.

use std::process::Command;

use netns_lab::Lab;

fn namespaces() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

#[test]
fn a_panicking_test_still_removes_its_namespaces_processes_and_files() {
    let mut made = (String::new(), String::new(), 0u32);
    let mut cgroup = std::path::PathBuf::new();
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut lab = Lab::new("panic").unwrap();
        let node = lab.add_node("n1").unwrap();
        let pid = lab.spawn(&node.ns, &["sleep", "60"]).unwrap();
        made = (node.ns.clone(), lab.dir().display().to_string(), pid);
        cgroup = lab.node_cgroup("n1");
        let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap();
        assert!(procs.lines().any(|p| p == pid.to_string()), "the node's process runs in the node's cgroup");
        assert!(namespaces().contains(&node.ns));
        panic!("a failing assertion");
    }));
    assert!(res.is_err());
    let (ns, dir, pid) = made;
    assert!(!namespaces().contains(&ns), "namespace {ns} removed");
    assert!(!std::path::Path::new(&dir).exists(), "{dir} removed");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "process {pid} stopped");
    assert!(!cgroup.exists(), "{} removed", cgroup.display());
    // Made right under the v2 mount: a shared parent directory would outlive every lab.
    assert_eq!(cgroup.parent().unwrap(), std::path::Path::new("/sys/fs/cgroup/unified"));
    let ours: Vec<String> = std::fs::read_dir(netns_lab::CGROUP_ROOT)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("-panic-"))
        .collect();
    assert!(ours.is_empty(), "no cgroup of this lab, nor a parent of them, is left: {ours:?}");
}

#[test]
fn sweep_removes_what_a_dead_run_left_and_spares_live_ones() {
    let mut live = Lab::new("live").unwrap();
    let live_ns = live.add_ns("n1").unwrap();
    // A run that died: its namespace carries the PID of a process that no longer exists.
    let mut child = Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    let orphan = format!("tl{dead_pid}-0000-orphan-n1");
    assert!(Command::new("ip").args(["netns", "add", &orphan]).status().unwrap().success());
    // And its node's cgroup.
    let orphan_cg = std::path::Path::new(netns_lab::CGROUP_ROOT).join(format!("tl{dead_pid}-0000-orphan-n1"));
    std::fs::create_dir(&orphan_cg).unwrap();

    // A lab another thread is creating right now: its directory exists, its owner file is not written yet.
    // CI once swept such a directory from under a starting test.
    let starting = std::path::Path::new(netns_lab::LAB_ROOT).join(format!("tl{}-ffff-starting", std::process::id()));
    std::fs::create_dir_all(&starting).unwrap();

    let removed = netns_lab::sweep(false).unwrap();
    assert!(starting.exists(), "a directory with no owner yet is not swept: {removed:?}");
    std::fs::remove_dir_all(&starting).unwrap();
    assert!(removed.contains(&orphan), "{removed:?}");
    assert!(!namespaces().contains(&orphan));
    assert!(!orphan_cg.exists(), "the dead run's cgroup is removed: {removed:?}");
    assert!(namespaces().contains(&live_ns), "a live run's lab is not touched");
}

#[test]
fn the_root_namespace_is_untouched_by_a_lab() {
    let links_before = Command::new("ip").args(["-o", "link", "show"]).output().unwrap().stdout;
    let routes_before = Command::new("ip").args(["route", "show"]).output().unwrap().stdout;
    {
        let mut lab = Lab::new("root").unwrap();
        lab.build_static(1).unwrap();
        lab.add_pod("n1", "a", "default").unwrap();
        assert!(lab.ping(&lab.pod("a").unwrap().ns.clone(), netns_lab::OUTSIDE_IP).unwrap());
        assert_eq!(Command::new("ip").args(["-o", "link", "show"]).output().unwrap().stdout, links_before);
    }
    assert_eq!(Command::new("ip").args(["-o", "link", "show"]).output().unwrap().stdout, links_before);
    assert_eq!(Command::new("ip").args(["route", "show"]).output().unwrap().stdout, routes_before);
}
