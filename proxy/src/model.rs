//! What the proxy programs, computed from the store alone: one entry per Service port, with its addresses and the
//! endpoints the shared derivation gives (every node reaches the same answer). Dataplanes render this; they never
//! read Kubernetes objects themselves.

use std::collections::BTreeMap;
use std::net::IpAddr;

use kube_objects::{derive_endpoints, Endpoints, Object, Pod, Service};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    pub fn parse(s: &str) -> Option<Proto> {
        match s {
            "TCP" => Some(Proto::Tcp),
            "UDP" => Some(Proto::Udp),
            "SCTP" => Some(Proto::Sctp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    /// On this node (externalTrafficPolicy / internalTrafficPolicy Local).
    pub local: bool,
}

/// One Service port, as a dataplane needs it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServicePort {
    /// `namespace/name:port-name` (kube-proxy's ServicePortName), with the protocol: unique and stable.
    pub id: String,
    pub proto: Proto,
    pub cluster_ip: Option<IpAddr>,
    pub port: u16,
    pub node_port: Option<u16>,
    /// spec.externalIPs, spec.loadBalancerIP and status.loadBalancer.ingress IPs: reachable like a NodePort.
    pub external_ips: Vec<IpAddr>,
    /// sessionAffinity ClientIP: the timeout in seconds.
    pub affinity: Option<u32>,
    pub external_local: bool,
    pub internal_local: bool,
    pub endpoints: Vec<Endpoint>,
}

impl ServicePort {
    /// A plain ClusterIP TCP port (no node port, affinity or policies): what tests and benchmarks build on.
    pub fn cluster_ip(id: &str, vip: IpAddr, port: u16, endpoints: Vec<Endpoint>) -> ServicePort {
        ServicePort {
            id: id.to_string(),
            proto: Proto::Tcp,
            cluster_ip: Some(vip),
            port,
            node_port: None,
            external_ips: vec![],
            affinity: None,
            external_local: false,
            internal_local: false,
            endpoints,
        }
    }
}

/// Every Service port to program, sorted by id. Headless and ExternalName services have none.
pub fn service_ports(objects: &[Object], node: &str) -> Vec<ServicePort> {
    let mut pods: Vec<Pod> = Vec::new();
    let mut eps: BTreeMap<(String, String), Endpoints> = BTreeMap::new();
    let mut services: Vec<&Service> = Vec::new();
    for o in objects {
        match o {
            Object::Pod(p) => pods.push(p.clone()),
            Object::Endpoints(e) => {
                eps.insert((e.metadata.namespace.clone().unwrap_or_default(), e.metadata.name.clone()), e.clone());
            }
            Object::Service(s) => services.push(s),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for svc in services {
        let spec = &svc.spec;
        let kind = spec.kind.as_deref().unwrap_or("ClusterIP");
        if kind == "ExternalName" {
            continue;
        }
        let cluster_ip: Option<IpAddr> = spec.cluster_ip.as_deref().and_then(|s| s.parse().ok());
        if cluster_ip.is_none() {
            // Headless ("None"), or not allocated: DNS only.
            continue;
        }
        let ns = svc.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let key = (ns.clone(), svc.metadata.name.clone());
        let derived = derive_endpoints(svc, &pods, eps.get(&key));
        let mut external_ips: Vec<IpAddr> = spec.external_ips.iter().filter_map(|s| s.parse().ok()).collect();
        if kind == "LoadBalancer" {
            external_ips.extend(spec.load_balancer_ip.as_deref().and_then(|s| s.parse::<IpAddr>().ok()));
            let ingress = svc.status.iter().flat_map(|s| s.load_balancer.iter()).flat_map(|l| l.ingress.iter());
            external_ips.extend(ingress.filter_map(|i| i.ip.as_deref()?.parse::<IpAddr>().ok()));
        }
        external_ips.sort();
        external_ips.dedup();
        let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            let t = spec.session_affinity_config.as_ref().and_then(|c| c.client_ip.as_ref()?.timeout_seconds);
            t.unwrap_or(10_800).clamp(1, 86_400) as u32
        });
        for p in derived {
            let Some(proto) = Proto::parse(&p.protocol) else { continue };
            let endpoints = p
                .backends
                .iter()
                .filter_map(|b| {
                    Some(Endpoint { ip: b.ip.parse().ok()?, port: b.port, local: b.node_name.as_deref() == Some(node) })
                })
                .filter(|e| e.ip.is_ipv4() == cluster_ip.is_some_and(|c| c.is_ipv4()))
                .collect();
            out.push(ServicePort {
                id: format!("{ns}/{}:{}/{}", svc.metadata.name, p.name.clone().unwrap_or_default(), proto.as_str()),
                proto,
                cluster_ip,
                port: p.port,
                node_port: if matches!(kind, "NodePort" | "LoadBalancer") { p.node_port } else { None },
                external_ips: external_ips.clone(),
                affinity,
                external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
                internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
                endpoints,
            });
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}
