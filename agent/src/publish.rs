//! What the agent tells the cluster store about its node: the Node object (InternalIP = the public IP, podCIDR =
//! the lease), and the status of the pods the `tartan` plugin wired here (podIP, nodeName, Ready), read from the
//! plugin's records under the run directory. A pod nobody applied gets a label-less Pod object so that it shows
//! up; it goes again on DEL. Polled every 200 ms, so the store follows an ADD or DEL within a second, and the
//! plugin never waits on etcd.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use kube_objects::{
    Condition, Kind, Node, NodeAddress, NodeSpec, NodeStatus, Object, ObjectMeta, Pod, PodIp, PodStatus,
};
use node_contract::pods::{load_all, PodRecord};
use store::{Store, StoreError};

/// Marks Pods the agent made up (nobody applied them): removed again when the pod goes.
pub const CREATED_BY: &str = "tartan.dev/created-by";

pub struct Publisher {
    pub node: String,
    pub public_ip: IpAddr,
    pub public_ipv6: Option<IpAddr>,
    pub pod_cidrs: Vec<String>,
    pub run_dir: PathBuf,
}

impl Publisher {
    fn node_object(&self) -> Object {
        let mut addresses = vec![NodeAddress { kind: "InternalIP".into(), address: self.public_ip.to_string() }];
        if let Some(v6) = self.public_ipv6 {
            addresses.push(NodeAddress { kind: "InternalIP".into(), address: v6.to_string() });
        }
        addresses.push(NodeAddress { kind: "Hostname".into(), address: self.node.clone() });
        let mut labels = BTreeMap::new();
        labels.insert("kubernetes.io/hostname".to_string(), self.node.clone());
        let mut o = Object::Node(Node {
            metadata: ObjectMeta { name: self.node.clone(), labels, ..Default::default() },
            spec: NodeSpec {
                pod_cidr: self.pod_cidrs.first().cloned(),
                pod_cidrs: self.pod_cidrs.clone(),
                ..Default::default()
            },
            status: Some(NodeStatus {
                addresses,
                conditions: vec![Condition { kind: "Ready".into(), status: "True".into(), extra: Default::default() }],
                ..Default::default()
            }),
            ..Default::default()
        });
        o.apply_defaults();
        o
    }

    /// Sets the pod's status from its record (creating a label-less Pod if none was applied).
    async fn publish(&self, store: &mut Store, rec: &PodRecord) -> Result<(), StoreError> {
        let existing = store.get(Kind::Pod, Some(&rec.namespace), &rec.name).await?;
        let mut pod = match existing {
            Some(Object::Pod(p)) => p,
            _ => {
                let mut meta =
                    ObjectMeta { name: rec.name.clone(), namespace: Some(rec.namespace.clone()), ..Default::default() };
                meta.annotations.insert(CREATED_BY.into(), "tartan-agent".into());
                Pod { api_version: "v1".into(), metadata: meta, ..Default::default() }
            }
        };
        pod.spec.node_name = Some(self.node.clone());
        let mut st = pod.status.take().unwrap_or_default();
        st.phase = Some("Running".into());
        st.pod_ip = rec.ips.first().cloned();
        st.pod_ips = rec.ips.iter().map(|ip| PodIp { ip: ip.clone() }).collect();
        st.host_ip = Some(self.public_ip.to_string());
        set_ready(&mut st, true);
        pod.status = Some(st);
        store.put(Object::Pod(pod)).await.map(|_| ())
    }

    /// The pod's attachment is gone: its address is no longer its own.
    async fn clear(&self, store: &mut Store, rec: &PodRecord) -> Result<(), StoreError> {
        let Some(Object::Pod(mut pod)) = store.get(Kind::Pod, Some(&rec.namespace), &rec.name).await? else {
            return Ok(());
        };
        // A newer attachment (the pod re-created, maybe on another node) owns the status now.
        let ours = pod.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some_and(|ip| rec.ips.contains(ip));
        if !ours {
            return Ok(());
        }
        if pod.metadata.annotations.contains_key(CREATED_BY) {
            store.delete(Kind::Pod, Some(&rec.namespace), &rec.name).await?;
            return Ok(());
        }
        let mut st = pod.status.take().unwrap_or_default();
        st.pod_ip = None;
        st.pod_ips.clear();
        st.phase = Some("Pending".into());
        set_ready(&mut st, false);
        pod.status = Some(st);
        store.put(Object::Pod(pod)).await.map(|_| ())
    }

    /// Registers the node, then follows the plugin's records for good. Store errors are retried.
    pub async fn run(self, mut store: Store) {
        let mut registered = false;
        // container/ifname -> the record as last published.
        let mut published: BTreeMap<(String, String), PodRecord> = BTreeMap::new();
        let mut last_error = String::new();
        loop {
            let res = self.step(&mut store, &mut registered, &mut published).await;
            match res {
                Ok(()) => last_error.clear(),
                Err(e) => {
                    let msg = format!("cluster store: {e}; retrying");
                    if msg != last_error {
                        tracing::warn!(error = %e, "cluster store: retrying");
                        last_error = msg;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn step(
        &self,
        store: &mut Store,
        registered: &mut bool,
        published: &mut BTreeMap<(String, String), PodRecord>,
    ) -> Result<(), StoreError> {
        if !*registered {
            store.put(self.node_object()).await?;
            tracing::info!(node = %self.node, "registered the node in the cluster store");
            *registered = true;
        }
        let now: BTreeMap<(String, String), PodRecord> =
            load_all(&self.run_dir).into_iter().map(|r| ((r.container_id.clone(), r.ifname.clone()), r)).collect();
        for (k, rec) in &now {
            if published.get(k) != Some(rec) {
                self.publish(store, rec).await?;
                published.insert(k.clone(), rec.clone());
            }
        }
        let gone: Vec<(String, String)> = published.keys().filter(|k| !now.contains_key(*k)).cloned().collect();
        for k in gone {
            if let Some(rec) = published.get(&k).cloned() {
                self.clear(store, &rec).await?;
            }
            published.remove(&k);
        }
        Ok(())
    }
}

fn set_ready(st: &mut PodStatus, ready: bool) {
    let v = if ready { "True" } else { "False" }.to_string();
    match st.conditions.iter_mut().find(|c| c.kind == "Ready") {
        Some(c) => c.status = v,
        None => st.conditions.push(Condition { kind: "Ready".into(), status: v, extra: Default::default() }),
    }
}
