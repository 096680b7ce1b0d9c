//! What a lab is made of, saved as JSON in its directory so the CLI can come back to it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LabState {
    pub prefix: String,
    /// Every namespace created, in creation order (removed in reverse).
    pub namespaces: Vec<String>,
    pub nodes: Vec<NodeState>,
    pub pods: Vec<PodState>,
    /// Processes the lab started (etcd, agents), stopped by PID on teardown.
    #[serde(default)]
    pub processes: Vec<u32>,
    /// The lab's etcd, once started (tests pause and kill it).
    #[serde(default)]
    pub etcd_pid: Option<u32>,
    /// With a multi-member etcd: each member's PID (None while stopped), in member order.
    #[serde(default)]
    pub etcd_members: Vec<Option<u32>>,
    /// Tartan run from its image: the lab's podman storage is in use.
    #[serde(default)]
    pub podman: bool,
    /// The DaemonSet pod's containers running, as (node, container).
    #[serde(default)]
    pub containers: Vec<(String, String)>,
    /// The lab's containerd, when started, and the containers it runs (by name).
    #[serde(default)]
    pub containerd_pid: Option<u32>,
    #[serde(default)]
    pub ctr_containers: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub ns: String,
    pub underlay_ip: String,
    /// Stands in for the node's `/`: etc/cni/net.d, var/lib/cni, run/flannel, run/tartan, var/lib/tartan.
    pub root: PathBuf,
    /// Where the node's CNI plugins are, when installed there (by the DaemonSet's init container); else the build's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni_bin: Option<PathBuf>,
}

impl NodeState {
    /// CNI_PATH for this node's pods: its installed plugins (else the build's), then Debian's reference plugins.
    pub fn plugin_path(&self) -> String {
        match &self.cni_bin {
            Some(d) => format!("{}:/usr/lib/cni", d.display()),
            None => crate::cni::plugin_path(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodState {
    pub name: String,
    pub node: String,
    pub ns: String,
    pub container_id: String,
    pub ip: String,
    pub k8s_namespace: String,
    /// The pod's Kubernetes name when it is not the lab name (x/a and y/a cannot both be "a" in one lab).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_name: Option<String>,
}

impl PodState {
    pub fn k8s_name(&self) -> &str {
        self.k8s_name.as_deref().unwrap_or(&self.name)
    }
}
