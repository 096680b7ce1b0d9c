//! Service ports as every dataplane needs them, computed from the store alone: one entry per Service port, with its
//! addresses and its endpoints already categorised per traffic policy (kube-proxy's CategorizeEndpoints), so that
//! every dataplane (and every node) reaches the same answer and none re-derives it.

use std::net::IpAddr;

use kube_objects::{derive_endpoints_from, Endpoints, Pod, Service};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    /// A Kubernetes protocol name (`TCP`, `UDP`, `SCTP`).
    pub fn parse(s: &str) -> Option<Proto> {
        match s {
            "TCP" => Some(Proto::Tcp),
            "UDP" => Some(Proto::Udp),
            "SCTP" => Some(Proto::Sctp),
            _ => None,
        }
    }

    /// The lower-case name tools use (`tcp`).
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }

    /// The IP protocol number (what a BPF map key holds).
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Sctp => 132,
        }
    }
}

/// One endpoint of a Service port, with the conditions EndpointSlices carry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    /// On this node (externalTrafficPolicy / internalTrafficPolicy Local).
    pub local: bool,
    /// Ready: takes new connections.
    pub ready: bool,
    /// Serving: able to answer (ready, or terminating but still serving).
    pub serving: bool,
    pub terminating: bool,
}

impl Endpoint {
    /// A ready endpoint (what the store's derivation yields today).
    pub fn ready(ip: IpAddr, port: u16, local: bool) -> Endpoint {
        Endpoint { ip, port, local, ready: true, serving: true, terminating: false }
    }
}

/// One Service port, as a dataplane needs it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServicePort {
    /// `namespace/name:port-name/protocol` (kube-proxy's ServicePortName with the protocol): unique and stable.
    pub id: String,
    pub proto: Proto,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub node_port: Option<u16>,
    /// spec.externalIPs, spec.loadBalancerIP and status.loadBalancer.ingress IPs of the cluster IP's family:
    /// reachable like a node port.
    pub external_ips: Vec<IpAddr>,
    /// sessionAffinity ClientIP: the timeout in seconds.
    pub affinity: Option<u32>,
    pub external_local: bool,
    pub internal_local: bool,
    /// Every endpoint known, whatever its conditions (stale UDP conntrack entries are found through these).
    pub endpoints: Vec<Endpoint>,
    /// The endpoints for traffic under the Cluster policy: the ready ones, or if none is ready the serving
    /// terminating ones (so a rolling update that leaves only terminating pods does not black-hole traffic).
    pub cluster: Vec<Endpoint>,
    /// The same choice among this node's endpoints, for traffic under the Local policy.
    pub local: Vec<Endpoint>,
    /// The Service's healthCheckNodePort (type LoadBalancer with externalTrafficPolicy Local only, as kube-proxy
    /// reads it): where this node answers whether it has local endpoints. The same on every port of the Service.
    pub health_check_node_port: Option<u16>,
}

/// kube-proxy's choice: ready endpoints, else serving terminating ones.
fn usable<'a>(eps: impl Iterator<Item = &'a Endpoint> + Clone) -> Vec<Endpoint> {
    let ready: Vec<Endpoint> = eps.clone().filter(|e| e.ready).cloned().collect();
    if !ready.is_empty() {
        return ready;
    }
    eps.filter(|e| e.serving && e.terminating).cloned().collect()
}

impl ServicePort {
    /// A Service port with its endpoints categorised.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: String,
        proto: Proto,
        cluster_ip: IpAddr,
        port: u16,
        node_port: Option<u16>,
        external_ips: Vec<IpAddr>,
        affinity: Option<u32>,
        (external_local, internal_local): (bool, bool),
        mut endpoints: Vec<Endpoint>,
    ) -> ServicePort {
        endpoints.retain(|e| e.ip.is_ipv4() == cluster_ip.is_ipv4());
        endpoints.sort();
        endpoints.dedup();
        let cluster = usable(endpoints.iter());
        let local = usable(endpoints.iter().filter(|e| e.local));
        ServicePort {
            id,
            proto,
            cluster_ip,
            port,
            node_port,
            external_ips,
            affinity,
            external_local,
            internal_local,
            endpoints,
            cluster,
            local,
            health_check_node_port: None,
        }
    }

    /// The Service's namespace and name, read from the id (`namespace/name:port-name/protocol`: neither a namespace
    /// nor a Service name can hold '/' or ':'). None for an id not of that shape (hand-built in tests).
    pub fn service(&self) -> Option<(&str, &str)> {
        let (namespace, rest) = self.id.split_once('/')?;
        let (name, _) = rest.split_once(':')?;
        Some((namespace, name))
    }

    /// A plain ClusterIP TCP port (no node port, affinity or policies): what tests and benchmarks build on.
    pub fn cluster_ip(id: &str, vip: IpAddr, port: u16, endpoints: Vec<Endpoint>) -> ServicePort {
        ServicePort::new(id.to_string(), Proto::Tcp, vip, port, None, vec![], None, (false, false), endpoints)
    }

    /// The endpoints in-cluster clients (pods, the node) reach: every node's, or only this node's with
    /// internalTrafficPolicy Local.
    pub fn internal(&self) -> &[Endpoint] {
        if self.internal_local {
            &self.local
        } else {
            &self.cluster
        }
    }

    /// The endpoints traffic from outside (node ports, external IPs) reaches.
    pub fn external(&self) -> &[Endpoint] {
        if self.external_local {
            &self.local
        } else {
            &self.cluster
        }
    }

    /// Whether node ports or external IPs lead here.
    pub fn has_external(&self) -> bool {
        self.node_port.is_some() || !self.external_ips.is_empty()
    }

    /// External traffic is masqueraded unless externalTrafficPolicy Local keeps the client's address.
    pub fn masquerade_external(&self) -> bool {
        !self.external_local
    }

    /// Whether some endpoint exists at all: none means REJECT (ICMP unreachable), some but none usable for a
    /// traffic policy means DROP.
    pub fn has_any_endpoint(&self) -> bool {
        !self.endpoints.is_empty()
    }
}

/// The ports of one Service, computed from the pods of its namespace (or its Endpoints object). Headless and
/// ExternalName services, and services without an allocated cluster IP, have none.
pub fn ports_of<'a, I>(svc: &Service, pods: I, eps: Option<&Endpoints>, node: &str) -> Vec<ServicePort>
where
    I: Iterator<Item = &'a Pod> + Clone,
{
    let spec = &svc.spec;
    let kind = spec.kind.as_deref().unwrap_or("ClusterIP");
    if kind == "ExternalName" {
        return Vec::new();
    }
    // One set of ports per cluster IP: dual-stack services have one per family.
    let mut cluster_ips: Vec<IpAddr> = spec.cluster_ips.iter().filter_map(|s| s.parse().ok()).collect();
    if cluster_ips.is_empty() {
        cluster_ips.extend(spec.cluster_ip.as_deref().and_then(|s| s.parse::<IpAddr>().ok()));
    }
    if cluster_ips.is_empty() {
        // Headless ("None"), or not allocated: DNS only.
        return Vec::new();
    }
    let ns = svc.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let derived = derive_endpoints_from(svc, pods, eps);
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
    let policies = (
        spec.external_traffic_policy.as_deref() == Some("Local"),
        spec.internal_traffic_policy.as_deref() == Some("Local"),
    );
    // kube-proxy ignores the field unless the Service needs a health check (a load balancer that must learn which
    // nodes have local endpoints), whatever an older writer left in it.
    let health_check_node_port = spec
        .health_check_node_port
        .filter(|_| kind == "LoadBalancer" && policies.0)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0);
    let mut out = Vec::new();
    for cluster_ip in cluster_ips {
        let family_ips: Vec<IpAddr> =
            external_ips.iter().copied().filter(|ip| ip.is_ipv4() == cluster_ip.is_ipv4()).collect();
        // IPv4 ports keep the plain id (chain names stay what they were before dual stack); IPv6 ones are told
        // apart.
        let suffix = if cluster_ip.is_ipv6() { "/ipv6" } else { "" };
        for p in &derived {
            let Some(proto) = Proto::parse(&p.protocol) else { continue };
            let endpoints = p
                .backends
                .iter()
                .filter_map(|b| Some(Endpoint::ready(b.ip.parse().ok()?, b.port, b.node_name.as_deref() == Some(node))))
                .collect();
            let mut sp = ServicePort::new(
                format!("{ns}/{}:{}/{}{suffix}", svc.metadata.name, p.name.clone().unwrap_or_default(), proto.as_str()),
                proto,
                cluster_ip,
                p.port,
                if matches!(kind, "NodePort" | "LoadBalancer") { p.node_port } else { None },
                family_ips.clone(),
                affinity,
                policies,
                endpoints,
            );
            sp.health_check_node_port = health_check_node_port;
            out.push(sp);
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(ip: &str, local: bool, ready: bool, terminating: bool) -> Endpoint {
        Endpoint { ip: ip.parse().unwrap(), port: 80, local, ready, serving: ready || terminating, terminating }
    }

    fn sp(eps: Vec<Endpoint>, policies: (bool, bool)) -> ServicePort {
        let vip = "10.96.0.1".parse().unwrap();
        ServicePort::new("d/s:/tcp".into(), Proto::Tcp, vip, 80, Some(30080), vec![], None, policies, eps)
    }

    #[test]
    fn ready_endpoints_serve_and_terminating_ones_only_when_nothing_is_ready() {
        let s = sp(vec![ep("10.0.0.1", true, true, false), ep("10.0.0.2", false, false, true)], (false, false));
        assert_eq!(s.cluster.len(), 1);
        assert_eq!(s.internal(), &s.cluster[..]);
        let s = sp(vec![ep("10.0.0.2", false, false, true), ep("10.0.0.3", false, false, false)], (false, false));
        assert_eq!(s.cluster.iter().map(|e| e.ip.to_string()).collect::<Vec<_>>(), ["10.0.0.2"], "fallback");
        assert!(s.has_any_endpoint());
    }

    #[test]
    fn local_policies_pick_this_nodes_endpoints_and_keep_the_source() {
        let s = sp(vec![ep("10.0.0.1", true, true, false), ep("10.0.0.2", false, true, false)], (true, false));
        assert_eq!(s.external().len(), 1);
        assert!(s.external()[0].local);
        assert_eq!(s.internal().len(), 2, "internal traffic follows the Cluster policy");
        assert!(!s.masquerade_external());
        let s = sp(vec![ep("10.0.0.2", false, true, false)], (false, true));
        assert!(s.internal().is_empty() && s.has_any_endpoint(), "no local endpoint: drop, not reject");
    }

    #[test]
    fn a_dual_stack_service_gets_ports_per_family_with_endpoints_of_that_family() {
        let objs: Vec<kube_objects::Object> = kube_objects::parse_manifests(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: d}\nspec: {clusterIP: 10.96.0.5, clusterIPs: [10.96.0.5, 'fd00:96::5'], externalIPs: [198.18.5.5, '2001:db8::5'], selector: {app: web}, ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: d, labels: {app: web}}\nspec: {nodeName: n1}\nstatus: {podIP: 10.244.1.2, podIPs: [{ip: 10.244.1.2}, {ip: 'fd00:244:1::2'}], conditions: [{type: Ready, status: 'True'}]}\n",
            "t",
        )
        .unwrap()
        .into_iter()
        .map(|d| d.object)
        .collect();
        let (kube_objects::Object::Service(svc), kube_objects::Object::Pod(pod)) = (&objs[0], &objs[1]) else {
            panic!()
        };
        let ports = ports_of(svc, [pod].into_iter(), None, "n1");
        assert_eq!(ports.len(), 2);
        assert_eq!(ports[0].id, "d/web:/tcp");
        assert_eq!(ports[1].id, "d/web:/tcp/ipv6");
        assert!(ports[1].cluster_ip.is_ipv6() && ports[1].cluster[0].ip.is_ipv6());
        assert_eq!(ports[1].external_ips, ["2001:db8::5".parse::<IpAddr>().unwrap()]);
        assert_eq!(ports[0].external_ips, ["198.18.5.5".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn the_health_check_node_port_is_kept_for_local_load_balancers_only() {
        let objs: Vec<kube_objects::Object> = crate::test_support::objects(
            "apiVersion: v1\nkind: Service\nmetadata: {name: lb, namespace: d}\nspec: {type: LoadBalancer, clusterIP: 10.96.0.6, externalTrafficPolicy: Local, healthCheckNodePort: 30086, selector: {app: web}, ports: [{name: a, port: 80, nodePort: 30085}, {name: b, port: 81, nodePort: 30087}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: np, namespace: d}\nspec: {type: NodePort, clusterIP: 10.96.0.7, externalTrafficPolicy: Local, healthCheckNodePort: 30088, selector: {app: web}, ports: [{port: 80}]}\n",
        );
        let (kube_objects::Object::Service(lb), kube_objects::Object::Service(np)) = (&objs[0], &objs[1]) else {
            panic!()
        };
        let ports = ports_of(lb, std::iter::empty::<&Pod>(), None, "n1");
        assert_eq!(ports.len(), 2);
        assert!(ports.iter().all(|p| p.health_check_node_port == Some(30086)), "{ports:?}");
        assert_eq!(ports[1].service(), Some(("d", "lb")));
        let ports = ports_of(np, std::iter::empty::<&Pod>(), None, "n1");
        assert_eq!(ports[0].health_check_node_port, None, "not a load balancer: no health check");
    }

    #[test]
    fn endpoints_of_the_other_family_are_left_out() {
        let s = sp(vec![ep("fd00::1", false, true, false), ep("10.0.0.1", false, true, false)], (false, false));
        assert_eq!(s.endpoints.len(), 1);
    }
}
