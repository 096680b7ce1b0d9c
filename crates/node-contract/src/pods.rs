//! The node-local record of the pods this node wired: one file per attachment under `<runDir>/pods/`, written on
//! ADD when the runtime names the pod (CNI_ARGS K8S_POD_NAMESPACE / K8S_POD_NAME, as kubelet passes them) and
//! removed on DEL and by GC. The agent publishes them to the cluster store; the plugin never waits on etcd.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One wired pod, as the agent reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRecord {
    pub namespace: String,
    pub name: String,
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
    /// The pod's addresses, without prefix length, IPv4 first.
    pub ips: Vec<String>,
    /// The pod's network namespace (CNI_NETNS): where the proxy closes sockets left on a removed UDP backend.
    /// Absent in records written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

pub fn dir(run_dir: &Path) -> PathBuf {
    run_dir.join("pods")
}

fn path(run_dir: &Path, container_id: &str, ifname: &str) -> PathBuf {
    dir(run_dir).join(format!("{container_id}_{ifname}.json"))
}

/// Writes the record atomically (a reader never sees half a file).
pub fn record(run_dir: &Path, rec: &PodRecord) -> io::Result<()> {
    let p = path(run_dir, &rec.container_id, &rec.ifname);
    atomic_file::write(&p, &serde_json::to_vec(rec).expect("records serialize"))
}

/// Removes the record of an attachment (absent is fine: DEL is idempotent).
pub fn forget(run_dir: &Path, container_id: &str, ifname: &str) -> io::Result<()> {
    match std::fs::remove_file(path(run_dir, container_id, ifname)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Every record in `run_dir` (unreadable or half-written files are skipped).
pub fn load_all(run_dir: &Path) -> Vec<PodRecord> {
    let Ok(entries) = std::fs::read_dir(dir(run_dir)) else { return Vec::new() };
    let mut out: Vec<PodRecord> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name, &a.container_id).cmp(&(&b.namespace, &b.name, &b.container_id)));
    out
}

/// Drops the records of attachments `keep` says are gone (GC).
pub fn retain(run_dir: &Path, keep: impl Fn(&str, &str) -> bool) -> io::Result<()> {
    for r in load_all(run_dir) {
        if !keep(&r.container_id, &r.ifname) {
            forget(run_dir, &r.container_id, &r.ifname)?;
        }
    }
    Ok(())
}
