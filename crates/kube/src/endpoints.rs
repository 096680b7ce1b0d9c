//! Derived endpoints: which ready pod addresses, on which resolved target ports, back each port of a Service.
//! One deterministic function, so every node's proxy computes the same answer from the same store without a
//! central endpoints controller. A selector-less Service takes its Endpoints object instead.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::objects::{Endpoints, IntOrString, Pod, Service};

/// One backend of a Service port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    pub ip: String,
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// `namespace/name` of the pod, for a selector's backends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

/// A Service port and its ready backends, in a stable order (by IP, then port).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortEndpoints {
    pub name: Option<String>,
    pub protocol: String,
    pub port: u16,
    pub node_port: Option<u16>,
    pub backends: Vec<Backend>,
}

/// Whether a pod may receive Service traffic: it has an IP, is not finished, and its Ready condition is True.
pub fn pod_ready(pod: &Pod) -> bool {
    let Some(st) = &pod.status else { return false };
    st.pod_ip.as_deref().is_some_and(|ip| !ip.is_empty())
        && !matches!(st.phase.as_deref(), Some("Succeeded" | "Failed"))
        && st.conditions.iter().any(|c| c.kind == "Ready" && c.status == "True")
}

/// The port a pod listens on for `target` (a number, or a container port's name and protocol).
fn resolve(pod: &Pod, target: &IntOrString, protocol: &str) -> Option<u16> {
    match target {
        IntOrString::Int(n) => u16::try_from(*n).ok().filter(|p| *p > 0),
        IntOrString::Str(name) => pod
            .spec
            .containers
            .iter()
            .flat_map(|c| &c.ports)
            .find(|p| p.name.as_deref() == Some(name) && p.protocol.as_deref().unwrap_or("TCP") == protocol)
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// The endpoints of `svc`: for a selector, the ready pods of its namespace whose labels match (a pod without the
/// named target port is left out of that port, as Kubernetes does); without one, the Endpoints object of the same
/// name. ExternalName services have none.
pub fn derive_endpoints(svc: &Service, pods: &[Pod], endpoints: Option<&Endpoints>) -> Vec<PortEndpoints> {
    derive_endpoints_from(svc, pods.iter(), endpoints)
}

/// [`derive_endpoints`] over any pods (a caller that indexes pods by namespace passes only that namespace's).
pub fn derive_endpoints_from<'a, I>(svc: &Service, pods: I, endpoints: Option<&Endpoints>) -> Vec<PortEndpoints>
where
    I: Iterator<Item = &'a Pod> + Clone,
{
    if svc.spec.kind.as_deref() == Some("ExternalName") {
        return Vec::new();
    }
    let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
    let mut out = Vec::new();
    for sp in &svc.spec.ports {
        let protocol = sp.protocol().to_string();
        let target = sp.target_port.clone().unwrap_or(IntOrString::Int(sp.port));
        let mut backends = Vec::new();
        match &svc.spec.selector {
            Some(sel) => {
                for pod in pods.clone().filter(|p| p.metadata.namespace.as_deref().unwrap_or("default") == ns) {
                    if sel.is_empty() || !sel.iter().all(|(k, v)| pod.metadata.labels.get(k) == Some(v)) {
                        continue;
                    }
                    if !pod_ready(pod) {
                        continue;
                    }
                    let Some(port) = resolve(pod, &target, &protocol) else { continue };
                    let ips = pod_ips(pod);
                    for ip in ips {
                        backends.push(Backend {
                            ip,
                            port,
                            node_name: pod.spec.node_name.clone(),
                            pod: Some(format!("{ns}/{}", pod.metadata.name)),
                        });
                    }
                }
            }
            None => {
                for subset in endpoints.map(|e| e.subsets.as_slice()).unwrap_or_default() {
                    // With one port the names need not match (kube-proxy pairs a single unnamed port likewise).
                    let port = subset.ports.iter().find(|p| {
                        (p.name == sp.name || (subset.ports.len() == 1 && svc.spec.ports.len() == 1))
                            && p.protocol.as_deref().unwrap_or("TCP") == protocol
                    });
                    let Some(port) = port.and_then(|p| u16::try_from(p.port).ok()) else { continue };
                    for a in &subset.addresses {
                        backends.push(Backend { ip: a.ip.clone(), port, node_name: a.node_name.clone(), pod: None });
                    }
                }
            }
        }
        backends.sort();
        backends.dedup();
        out.push(PortEndpoints {
            name: sp.name.clone(),
            protocol,
            port: u16::try_from(sp.port).unwrap_or(0),
            node_port: sp.node_port.and_then(|p| u16::try_from(p).ok()),
            backends,
        });
    }
    out
}

/// A pod's addresses: podIPs, or podIP alone (older writers), without duplicates.
fn pod_ips(pod: &Pod) -> Vec<String> {
    let Some(st) = &pod.status else { return Vec::new() };
    let mut ips: Vec<String> = st.pod_ips.iter().map(|p| p.ip.clone()).collect();
    if let Some(ip) = &st.pod_ip {
        if !ips.contains(ip) {
            ips.insert(0, ip.clone());
        }
    }
    let mut seen = BTreeMap::new();
    ips.retain(|ip| seen.insert(ip.clone(), ()).is_none());
    ips
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::Object;
    use serde_json::json;

    fn obj(v: serde_json::Value) -> Object {
        let mut o: Object = serde_json::from_value(v).unwrap();
        o.apply_defaults();
        o
    }

    fn pod(name: &str, labels: serde_json::Value, ip: &str, ready: bool) -> Pod {
        let Object::Pod(p) = obj(json!({
            "kind": "Pod", "metadata": {"name": name, "labels": labels},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"name": "redis", "containerPort": 6379}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                       "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
        })) else {
            unreachable!()
        };
        p
    }

    fn svc(v: serde_json::Value) -> Service {
        let Object::Service(s) = obj(v) else { unreachable!() };
        s
    }

    #[test]
    fn ready_matching_pods_with_named_target_ports_in_a_stable_order() {
        let s = svc(json!({"kind": "Service", "metadata": {"name": "redis"},
            "spec": {"selector": {"app": "redis"}, "ports": [{"port": 6379, "targetPort": "redis"}]}}));
        let pods = vec![
            pod("b", json!({"app": "redis"}), "10.244.2.5", true),
            pod("a", json!({"app": "redis"}), "10.244.1.5", true),
            pod("c", json!({"app": "redis"}), "10.244.1.6", false),
            pod("d", json!({"app": "web"}), "10.244.1.7", true),
        ];
        let e = derive_endpoints(&s, &pods, None);
        let ips: Vec<&str> = e[0].backends.iter().map(|b| b.ip.as_str()).collect();
        assert_eq!(ips, ["10.244.1.5", "10.244.2.5"]);
        assert!(e[0].backends.iter().all(|b| b.port == 6379));
        let mut reversed = pods.clone();
        reversed.reverse();
        assert_eq!(derive_endpoints(&s, &reversed, None), e, "order of input does not matter");
    }

    #[test]
    fn a_pod_in_another_namespace_or_without_the_named_port_is_not_a_backend() {
        let s = svc(json!({"kind": "Service", "metadata": {"name": "redis", "namespace": "dev"},
            "spec": {"selector": {"app": "redis"}, "ports": [{"port": 80, "targetPort": "http"}]}}));
        let mut p = pod("a", json!({"app": "redis"}), "10.244.1.5", true);
        p.metadata.namespace = Some("dev".into());
        assert!(derive_endpoints(&s, &[p.clone()], None)[0].backends.is_empty(), "no port named http");
        p.spec.containers[0].ports[0].name = Some("http".into());
        assert_eq!(derive_endpoints(&s, &[p.clone()], None)[0].backends.len(), 1);
        p.metadata.namespace = Some("prod".into());
        assert!(derive_endpoints(&s, &[p], None)[0].backends.is_empty());
    }

    #[test]
    fn selector_less_services_use_their_endpoints_object() {
        let s = svc(json!({"kind": "Service", "metadata": {"name": "ext"}, "spec": {"ports": [{"port": 80}]}}));
        let Object::Endpoints(ep) = obj(json!({"kind": "Endpoints", "metadata": {"name": "ext"},
            "subsets": [{"addresses": [{"ip": "198.18.0.254"}], "ports": [{"port": 8080}]}]}))
        else {
            unreachable!()
        };
        let e = derive_endpoints(&s, &[], Some(&ep));
        assert_eq!(e[0].backends, vec![Backend { ip: "198.18.0.254".into(), port: 8080, node_name: None, pod: None }]);
    }
}
