//! Validation as the Kubernetes API server does it, so that a manifest Kubernetes would reject is rejected here with
//! the same field path and much the same reason, and one Kubernetes accepts is accepted.
//!
//! Runs after `Object::apply_defaults`; every error is collected, not only the first, as kubectl shows them all.
//! Reasons are worded as the API server words them (`Invalid value: "Foo": a lowercase RFC 1123 label ...`).

use std::collections::{BTreeMap, HashSet};
use std::fmt::Debug;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::objects::{
    Container, ContainerPort, EndpointAddress, EndpointPort, EndpointSubset, IntOrString, IpBlock, Kind, LabelSelector,
    Labels, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec, Node, Object, ObjectMeta, Pod, PodStatus, Service,
    ServicePort, ServiceSpec,
};
use crate::selector::Requirement;

/// One thing wrong with an object: where (`spec.ports[0].port`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

/// Checks `obj` (defaults already applied). `service_cidrs` are the ranges ClusterIPs are allocated from, at most
/// one per family (empty: not checked); `node_port_range` the inclusive range of nodePorts.
pub fn validate(obj: &Object, service_cidrs: &[IpNet], node_port_range: (u16, u16)) -> Result<(), Vec<FieldError>> {
    let mut e = Errors::default();
    object_meta(&mut e, obj.kind(), obj.meta());
    match obj {
        Object::Namespace(_) => {}
        Object::Pod(pod) => validate_pod(&mut e, pod),
        Object::Node(node) => validate_node(&mut e, node),
        Object::Service(svc) => {
            let cidrs: Vec<IpNet> = service_cidrs.iter().map(|n| n.trunc()).collect();
            validate_service(&mut e, svc, &cidrs, node_port_range)
        }
        Object::Endpoints(ep) => {
            for (i, subset) in ep.subsets.iter().enumerate() {
                endpoint_subset(&mut e, &format!("subsets[{i}]"), subset);
            }
        }
        Object::NetworkPolicy(np) => network_policy(&mut e, &np.spec),
    }
    if e.0.is_empty() {
        Ok(())
    } else {
        Err(e.0)
    }
}

const PROTOCOLS: &[&str] = &["TCP", "UDP", "SCTP"];
const SERVICE_TYPES: &[&str] = &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];
const SESSION_AFFINITIES: &[&str] = &["None", "ClientIP"];
const TRAFFIC_POLICIES: &[&str] = &["Cluster", "Local"];
const NODE_ADDRESS_TYPES: &[&str] = &["InternalIP", "ExternalIP", "Hostname", "InternalDNS", "ExternalDNS"];
const SELECTOR_OPERATORS: &[&str] = &["In", "NotIn", "Exists", "DoesNotExist"];
const POLICY_TYPES: &[&str] = &["Ingress", "Egress"];
const MAX_CLIENT_IP_TIMEOUT: i64 = 86_400;
const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;

const INVALID_IP: &str = "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)";
const INVALID_CIDR: &str = "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)";
const PORT_RANGE: &str = "must be between 1 and 65535, inclusive";

/// The errors found so far, worded by the API server's error types (field.Required, field.Invalid, ...).
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, field: &str, reason: String) {
        self.0.push(FieldError { field: field.to_string(), reason });
    }

    fn required(&mut self, field: &str) {
        self.push(field, "Required value".into());
    }

    fn required_because(&mut self, field: &str, detail: &str) {
        self.push(field, format!("Required value: {detail}"));
    }

    /// Strings show quoted, numbers bare, as the API server prints them.
    fn invalid(&mut self, field: &str, value: impl Debug, detail: &str) {
        self.push(field, format!("Invalid value: {value:?}: {detail}"));
    }

    /// One error per message of a syntax check (a value can be both too long and malformed).
    fn invalid_each(&mut self, field: &str, value: &str, msgs: Vec<String>) {
        for m in msgs {
            self.invalid(field, value, &m);
        }
    }

    fn unsupported(&mut self, field: &str, value: &str, supported: &[&str]) {
        let list = supported.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
        self.push(field, format!("Unsupported value: {value:?}: supported values: {list}"));
    }

    fn duplicate(&mut self, field: &str, value: impl Debug) {
        self.push(field, format!("Duplicate value: {value:?}"));
    }

    fn forbidden(&mut self, field: &str, detail: &str) {
        self.push(field, format!("Forbidden: {detail}"));
    }

    /// A field with a fixed set of values: empty is missing, anything else must be one of them.
    fn one_of(&mut self, field: &str, value: &str, supported: &[&str]) {
        if value.is_empty() {
            self.required(field);
        } else if !supported.contains(&value) {
            self.unsupported(field, value, supported);
        }
    }

    fn port_number(&mut self, field: &str, port: i64) {
        if !(1..=65535).contains(&port) {
            self.invalid(field, port, PORT_RANGE);
        }
    }

    /// `None` is fine: the protocol defaults to TCP.
    fn protocol(&mut self, field: &str, protocol: Option<&str>) {
        if let Some(p) = protocol {
            self.one_of(field, p, PROTOCOLS);
        }
    }

    fn ip(&mut self, field: &str, value: &str) -> Option<IpAddr> {
        let ip = value.parse().ok();
        if ip.is_none() {
            self.invalid(field, value, INVALID_IP);
        }
        ip
    }

    /// An address traffic is actually sent to: not "any" and not this host.
    fn routable_ip(&mut self, field: &str, value: &str) {
        match self.ip(field, value) {
            Some(ip) if ip.is_unspecified() => self.invalid(field, value, "may not be unspecified (0.0.0.0, ::)"),
            Some(ip) if ip.is_loopback() => {
                self.invalid(field, value, "may not be in the loopback range (127.0.0.0/8, ::1/128)")
            }
            _ => {}
        }
    }

    fn cidr(&mut self, field: &str, value: &str) -> Option<IpNet> {
        let net = value.parse().ok();
        if net.is_none() {
            self.invalid(field, value, INVALID_CIDR);
        }
        net
    }

    fn port_num_or_name(&mut self, field: &str, port: &IntOrString) {
        match port {
            IntOrString::Int(n) => self.port_number(field, *n),
            IntOrString::Str(s) => self.invalid_each(field, s, iana_svc_name(s)),
        }
    }
}

// ---- Names and labels (apimachinery's validation package) ----

fn max_len(n: usize) -> String {
    format!("must be no more than {n} characters")
}

/// `first` and `last` characters satisfy `end`; every character satisfies `end` or `mid`. The shape of all the
/// name regexes (`[a-z0-9]([-a-z0-9]*[a-z0-9])?` and kin).
fn shaped(s: &str, end: fn(u8) -> bool, mid: fn(u8) -> bool) -> bool {
    let b = s.as_bytes();
    match (b.first(), b.last()) {
        (Some(&first), Some(&last)) => end(first) && end(last) && b.iter().all(|&c| end(c) || mid(c)),
        _ => false,
    }
}

fn lower_alnum(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

fn hyphen(c: u8) -> bool {
    c == b'-'
}

fn name_mid(c: u8) -> bool {
    matches!(c, b'-' | b'_' | b'.')
}

fn dns1123_label(s: &str) -> Vec<String> {
    let mut msgs = Vec::new();
    if s.len() > 63 {
        msgs.push(max_len(63));
    }
    if !shaped(s, lower_alnum, hyphen) {
        msgs.push(
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start \
             and end with an alphanumeric character"
                .into(),
        );
    }
    msgs
}

/// Service names become DNS labels that must not look like numbers, hence a leading letter.
fn dns1035_label(s: &str) -> Vec<String> {
    let mut msgs = Vec::new();
    if s.len() > 63 {
        msgs.push(max_len(63));
    }
    if !shaped(s, lower_alnum, hyphen) || !s.starts_with(|c: char| c.is_ascii_lowercase()) {
        msgs.push(
            "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic \
             character, and end with an alphanumeric character"
                .into(),
        );
    }
    msgs
}

fn dns1123_subdomain(s: &str) -> Vec<String> {
    let mut msgs = Vec::new();
    if s.len() > 253 {
        msgs.push(max_len(253));
    }
    if !s.split('.').all(|label| shaped(label, lower_alnum, hyphen)) {
        msgs.push(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must \
             start and end with an alphanumeric character"
                .into(),
        );
    }
    msgs
}

const NAME_CHARS: &str =
    "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character";

/// A label or annotation key: `[prefix/]name`, the prefix a DNS subdomain.
fn qualified_name(s: &str) -> Vec<String> {
    let mut msgs = Vec::new();
    let name = match s.split_once('/') {
        None => s,
        Some((_, name)) if name.contains('/') => {
            let example = "(e.g. 'example.com/MyName')";
            return vec![format!(
                "a qualified name {NAME_CHARS} with an optional DNS subdomain prefix and '/' {example}"
            )];
        }
        Some(("", name)) => {
            msgs.push("prefix part must be non-empty".into());
            name
        }
        Some((prefix, name)) => {
            msgs.extend(dns1123_subdomain(prefix).into_iter().map(|m| format!("prefix part {m}")));
            name
        }
    };
    if name.is_empty() {
        msgs.push("name part must be non-empty".into());
        return msgs;
    }
    if name.len() > 63 {
        msgs.push(format!("name part {}", max_len(63)));
    }
    if !shaped(name, |c| c.is_ascii_alphanumeric(), name_mid) {
        msgs.push(format!("name part {NAME_CHARS}"));
    }
    msgs
}

fn label_value(s: &str) -> Vec<String> {
    let mut msgs = Vec::new();
    if s.len() > 63 {
        msgs.push(max_len(63));
    }
    if !s.is_empty() && !shaped(s, |c| c.is_ascii_alphanumeric(), name_mid) {
        msgs.push(format!("a valid label must be an empty string or {}", NAME_CHARS.replacen("must ", "", 1)));
    }
    msgs
}

/// IANA_SVC_NAME (RFC 6335): what a container port's name, and so a named targetPort, must be.
fn iana_svc_name(s: &str) -> Vec<String> {
    let mut msgs = Vec::new();
    if s.len() > 15 {
        msgs.push(max_len(15));
    }
    if s.is_empty() || !s.bytes().all(|c| lower_alnum(c) || c == b'-') {
        msgs.push("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)".into());
    }
    if !s.bytes().any(|c| c.is_ascii_lowercase()) {
        msgs.push("must contain at least one letter (a-z)".into());
    }
    if s.contains("--") {
        msgs.push("must not contain consecutive hyphens".into());
    }
    if s.starts_with('-') || s.ends_with('-') {
        msgs.push("must not begin or end with a hyphen".into());
    }
    msgs
}

fn labels(e: &mut Errors, path: &str, labels: &Labels) {
    for (k, v) in labels {
        let field = format!("{path}[{k:?}]");
        e.invalid_each(&field, k, qualified_name(k));
        e.invalid_each(&field, v, label_value(v));
    }
}

fn annotations(e: &mut Errors, annotations: &BTreeMap<String, String>) {
    let mut total = 0;
    for (k, v) in annotations {
        // Keys are compared without case, so the prefix may be written in any case.
        e.invalid_each(&format!("metadata.annotations[{k:?}]"), k, qualified_name(&k.to_ascii_lowercase()));
        total += k.len() + v.len();
    }
    if total > MAX_ANNOTATIONS_BYTES {
        e.push("metadata.annotations", format!("Too long: must have at most {MAX_ANNOTATIONS_BYTES} bytes"));
    }
}

fn label_selector(e: &mut Errors, path: &str, sel: &LabelSelector) {
    labels(e, &format!("{path}.matchLabels"), &sel.match_labels);
    for (i, r) in sel.match_expressions.iter().enumerate() {
        requirement(e, &format!("{path}.matchExpressions[{i}]"), r);
    }
}

fn requirement(e: &mut Errors, path: &str, r: &Requirement) {
    let key = format!("{path}.key");
    if r.key.is_empty() {
        e.required(&key);
    } else {
        e.invalid_each(&key, &r.key, qualified_name(&r.key));
    }
    let values = format!("{path}.values");
    match r.operator.as_str() {
        "In" | "NotIn" if r.values.is_empty() => {
            e.required_because(&values, "must be specified when `operator` is 'In' or 'NotIn'")
        }
        "Exists" | "DoesNotExist" if !r.values.is_empty() => {
            e.forbidden(&values, "may not be specified when `operator` is 'Exists' or 'DoesNotExist'")
        }
        op => e.one_of(&format!("{path}.operator"), op, SELECTOR_OPERATORS),
    }
    for (i, v) in r.values.iter().enumerate() {
        e.invalid_each(&format!("{values}[{i}]"), v, label_value(v));
    }
}

fn object_meta(e: &mut Errors, kind: Kind, meta: &ObjectMeta) {
    let name_syntax = match kind {
        Kind::Namespace => dns1123_label,
        Kind::Service => dns1035_label,
        _ => dns1123_subdomain,
    };
    if meta.name.is_empty() {
        e.required("metadata.name");
    } else {
        e.invalid_each("metadata.name", &meta.name, name_syntax(&meta.name));
    }
    match &meta.namespace {
        Some(ns) if !kind.namespaced() && !ns.is_empty() => {
            e.forbidden("metadata.namespace", "not allowed on this type")
        }
        Some(ns) if ns.is_empty() => e.required("metadata.namespace"),
        Some(ns) => e.invalid_each("metadata.namespace", ns, dns1123_label(ns)),
        None => {}
    }
    labels(e, "metadata.labels", &meta.labels);
    annotations(e, &meta.annotations);
}

// ---- Pod and Node ----

fn validate_pod(e: &mut Errors, pod: &Pod) {
    if let Some(node) = pod.spec.node_name.as_deref().filter(|n| !n.is_empty()) {
        e.invalid_each("spec.nodeName", node, dns1123_subdomain(node));
    }
    containers(e, &pod.spec.containers);
    if let Some(status) = &pod.status {
        pod_status(e, status);
    }
}

fn containers(e: &mut Errors, containers: &[Container]) {
    if containers.is_empty() {
        e.required("spec.containers");
        return;
    }
    let mut names = HashSet::new();
    // A named targetPort resolves to one port of the pod, so port names are unique across its containers.
    let mut port_names = HashSet::new();
    for (i, c) in containers.iter().enumerate() {
        let path = format!("spec.containers[{i}]");
        let name = format!("{path}.name");
        if c.name.is_empty() {
            e.required(&name);
        } else {
            e.invalid_each(&name, &c.name, dns1123_label(&c.name));
            if !names.insert(c.name.as_str()) {
                e.duplicate(&name, &c.name);
            }
        }
        for (j, p) in c.ports.iter().enumerate() {
            container_port(e, &format!("{path}.ports[{j}]"), p, &mut port_names);
        }
    }
}

fn container_port<'a>(e: &mut Errors, path: &str, p: &'a ContainerPort, names: &mut HashSet<&'a str>) {
    if let Some(name) = p.name.as_deref().filter(|n| !n.is_empty()) {
        let field = format!("{path}.name");
        e.invalid_each(&field, name, iana_svc_name(name));
        if !names.insert(name) {
            e.duplicate(&field, name);
        }
    }
    let field = format!("{path}.containerPort");
    if p.container_port == 0 {
        e.required(&field);
    } else {
        e.port_number(&field, p.container_port);
    }
    e.protocol(&format!("{path}.protocol"), p.protocol.as_deref());
}

fn pod_status(e: &mut Errors, status: &PodStatus) {
    if let Some(ip) = status.pod_ip.as_deref().filter(|ip| !ip.is_empty()) {
        e.ip("status.podIP", ip);
    }
    for (i, ip) in status.pod_ips.iter().enumerate() {
        e.ip(&format!("status.podIPs[{i}].ip"), &ip.ip);
    }
    if let Some(ip) = status.host_ip.as_deref().filter(|ip| !ip.is_empty()) {
        e.ip("status.hostIP", ip);
    }
}

fn validate_node(e: &mut Errors, node: &Node) {
    let pod_cidr = node.spec.pod_cidr.as_deref().filter(|c| !c.is_empty());
    if let Some(cidr) = pod_cidr {
        e.cidr("spec.podCIDR", cidr);
    }
    for (i, cidr) in node.spec.pod_cidrs.iter().enumerate() {
        e.cidr(&format!("spec.podCIDRs[{i}]"), cidr);
    }
    if let (Some(cidr), Some(first)) = (pod_cidr, node.spec.pod_cidrs.first()) {
        if cidr != first {
            e.invalid("spec.podCIDRs", &node.spec.pod_cidrs, "first value must match `podCIDR`");
        }
    }
    let addresses = node.status.as_ref().map(|s| s.addresses.as_slice()).unwrap_or_default();
    for (i, a) in addresses.iter().enumerate() {
        let path = format!("status.addresses[{i}]");
        e.one_of(&format!("{path}.type"), &a.kind, NODE_ADDRESS_TYPES);
        let field = format!("{path}.address");
        if a.address.is_empty() {
            e.required(&field);
        } else if matches!(a.kind.as_str(), "InternalIP" | "ExternalIP") {
            e.ip(&field, &a.address);
        }
    }
}

// ---- Service ----

fn validate_service(e: &mut Errors, svc: &Service, service_cidr: &[IpNet], node_ports: (u16, u16)) {
    let spec = &svc.spec;
    let kind = spec.kind.as_deref().unwrap_or("ClusterIP");
    e.one_of("spec.type", kind, SERVICE_TYPES);
    if kind == "ExternalName" {
        external_name(e, spec);
    } else {
        cluster_ip(e, spec, kind, service_cidr);
        cluster_ips(e, spec, service_cidr);
        ip_families(e, spec);
        let headless = spec.cluster_ip.as_deref() == Some("None");
        if spec.ports.is_empty() && !headless {
            e.required("spec.ports");
        }
    }
    service_ports(e, spec, kind, node_ports);
    if let Some(selector) = &spec.selector {
        labels(e, "spec.selector", selector);
    }
    session_affinity(e, spec);
    traffic_policies(e, spec, kind);
    health_check_node_port(e, spec, kind, node_ports);
    for (i, ip) in spec.external_ips.iter().enumerate() {
        e.routable_ip(&format!("spec.externalIPs[{i}]"), ip);
    }
    if let Some(ip) = spec.load_balancer_ip.as_deref().filter(|ip| !ip.is_empty()) {
        e.ip("spec.loadBalancerIP", ip);
    }
    service_status(e, svc);
}

fn external_name(e: &mut Errors, spec: &ServiceSpec) {
    if spec.cluster_ip.as_deref().is_some_and(|ip| !ip.is_empty()) {
        e.forbidden("spec.clusterIP", "may not be set for ExternalName services");
    }
    if !spec.cluster_ips.is_empty() {
        e.forbidden("spec.clusterIPs", "may not be set for ExternalName services");
    }
    // A CNAME target: a trailing dot marks it fully qualified, and DNS names do not care about case.
    let name = spec.external_name.as_deref().unwrap_or_default();
    let clean = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if clean.is_empty() {
        e.required("spec.externalName");
    } else {
        e.invalid_each("spec.externalName", name, dns1123_subdomain(&clean));
    }
}

fn cluster_ip(e: &mut Errors, spec: &ServiceSpec, kind: &str, service_cidr: &[IpNet]) {
    match spec.cluster_ip.as_deref() {
        None | Some("") => {}
        Some("None") if kind != "ClusterIP" && SERVICE_TYPES.contains(&kind) => {
            e.invalid("spec.clusterIP", "None", &format!("may not be set to 'None' for {kind} services"))
        }
        Some("None") => {}
        Some(ip) => service_ip(e, "spec.clusterIP", ip, service_cidr),
    }
}

const IP_FAMILIES: &[&str] = &["IPv4", "IPv6"];
const IP_FAMILY_POLICIES: &[&str] = &["SingleStack", "PreferDualStack", "RequireDualStack"];

/// ipFamilies and ipFamilyPolicy, and their agreement with clusterIPs.
fn ip_families(e: &mut Errors, spec: &ServiceSpec) {
    let fams = &spec.ip_families;
    for (i, f) in fams.iter().enumerate() {
        e.one_of(&format!("spec.ipFamilies[{i}]"), f, IP_FAMILIES);
    }
    if fams.len() > 2 {
        e.invalid("spec.ipFamilies", fams, "may only hold up to 2 values");
    }
    if fams.len() == 2 && fams[0] == fams[1] {
        e.invalid("spec.ipFamilies[1]", &fams[1], "may not be duplicated");
    }
    if let Some(p) = spec.ip_family_policy.as_deref() {
        e.one_of("spec.ipFamilyPolicy", p, IP_FAMILY_POLICIES);
        if p == "SingleStack" && (fams.len() > 1 || spec.cluster_ips.len() > 1) {
            e.invalid(
                "spec.ipFamilyPolicy",
                p,
                "must be RequireDualStack or PreferDualStack when multiple IP families are specified",
            );
        }
    }
    for (i, ip) in spec.cluster_ips.iter().enumerate() {
        let Ok(ip) = ip.parse::<IpAddr>() else { continue };
        let fam = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
        if fams.get(i).is_some_and(|f| f != fam) {
            e.invalid(
                &format!("spec.clusterIPs[{i}]"),
                ip,
                &format!("expected an {} address, to match spec.ipFamilies[{i}]", fams[i]),
            );
        }
    }
}

fn cluster_ips(e: &mut Errors, spec: &ServiceSpec, service_cidr: &[IpNet]) {
    let ips = &spec.cluster_ips;
    let cluster_ip = spec.cluster_ip.as_deref().unwrap_or_default();
    if ips.len() > 2 {
        e.invalid("spec.clusterIPs", ips, "may only hold up to 2 values");
    }
    if !cluster_ip.is_empty() && ips.first().is_some_and(|first| first != cluster_ip) {
        e.invalid("spec.clusterIPs", ips, "first value must match `clusterIP`");
    }
    if ips.iter().position(|ip| ip == "None").is_some_and(|at| at != 0 || ips.len() != 1) {
        e.invalid("spec.clusterIPs", ips, "'None' must be the first and only value");
    }
    for (i, ip) in ips.iter().enumerate() {
        // clusterIPs[0] repeats clusterIP, which is already checked.
        if ip != "None" && !(i == 0 && ip == cluster_ip) {
            service_ip(e, &format!("spec.clusterIPs[{i}]"), ip, service_cidr);
        }
    }
    let parsed: Vec<IpAddr> = ips.iter().filter_map(|ip| ip.parse().ok()).collect();
    let v4 = parsed.iter().filter(|ip| ip.is_ipv4()).count();
    if v4 > 1 || parsed.len() - v4 > 1 {
        e.invalid("spec.clusterIPs", ips, "may specify no more than one IP for each IP family");
    }
}

/// An IP the service allocator would hand out: inside the range of its family, neither its network nor its
/// broadcast address.
fn service_ip(e: &mut Errors, field: &str, value: &str, service_cidr: &[IpNet]) {
    let Some(ip) = e.ip(field, value) else { return };
    if service_cidr.is_empty() {
        return;
    }
    let Some(net) = service_cidr.iter().copied().find(|n| n.addr().is_ipv4() == ip.is_ipv4()) else {
        let fam = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
        e.invalid(field, value, &format!("no {fam} service IP range is configured (serviceCIDR)"));
        return;
    };
    if !net.contains(&ip) {
        let reason = format!("provided IP is not in the valid range. The range of valid IPs is {net}");
        e.invalid(field, value, &reason);
    } else if ip == net.network() {
        e.invalid(field, value, &format!("may not be the network address of {net}"));
    } else if ip == net.broadcast() {
        e.invalid(field, value, &format!("may not be the broadcast address of {net}"));
    }
}

/// What the ports of one service have seen so far, to find repeats.
#[derive(Default)]
struct SeenPorts<'a> {
    names: HashSet<&'a str>,
    ports: HashSet<(i64, &'a str)>,
    node_ports: HashSet<(i64, &'a str)>,
}

fn service_ports(e: &mut Errors, spec: &ServiceSpec, kind: &str, node_ports: (u16, u16)) {
    // Endpoints and DNS SRV records tell the ports apart by name once there are several.
    let require_name = spec.ports.len() > 1;
    let mut seen = SeenPorts::default();
    for (i, p) in spec.ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        port_name(e, &path, p.name.as_deref(), require_name, &mut seen.names);
        e.port_number(&format!("{path}.port"), p.port);
        e.protocol(&format!("{path}.protocol"), p.protocol.as_deref());
        if let Some(target) = &p.target_port {
            e.port_num_or_name(&format!("{path}.targetPort"), target);
        }
        if !seen.ports.insert((p.port, p.protocol())) {
            e.duplicate(&path, format!("{}/{}", p.port, p.protocol()));
        }
        node_port(e, &path, p, kind, node_ports, &mut seen.node_ports);
    }
}

/// The name of a Service or Endpoints port (a DNS label, as it names SRV records).
fn port_name<'a>(e: &mut Errors, path: &str, name: Option<&'a str>, required: bool, seen: &mut HashSet<&'a str>) {
    let field = format!("{path}.name");
    match name.filter(|n| !n.is_empty()) {
        None if required => e.required(&field),
        None => {}
        Some(name) => {
            e.invalid_each(&field, name, dns1123_label(name));
            if !seen.insert(name) {
                e.duplicate(&field, name);
            }
        }
    }
}

fn node_port<'a>(
    e: &mut Errors,
    path: &str,
    p: &'a ServicePort,
    kind: &str,
    (low, high): (u16, u16),
    seen: &mut HashSet<(i64, &'a str)>,
) {
    // 0 is how a client asks for one to be allocated.
    let Some(port) = p.node_port.filter(|&n| n != 0) else { return };
    let field = format!("{path}.nodePort");
    if !matches!(kind, "NodePort" | "LoadBalancer") {
        e.forbidden(&field, &format!("may not be used when `type` is '{kind}'"));
        return;
    }
    if !(i64::from(low)..=i64::from(high)).contains(&port) {
        let reason = format!("provided port is not in the valid range. The range of valid ports is {low}-{high}");
        e.invalid(&field, port, &reason);
    }
    if !seen.insert((port, p.protocol())) {
        e.duplicate(&field, port);
    }
}

fn session_affinity(e: &mut Errors, spec: &ServiceSpec) {
    let Some(affinity) = spec.session_affinity.as_deref() else { return };
    e.one_of("spec.sessionAffinity", affinity, SESSION_AFFINITIES);
    let config = spec.session_affinity_config.as_ref();
    match affinity {
        "ClientIP" => {
            let path = "spec.sessionAffinityConfig";
            let Some(config) = config else {
                return e.required_because(path, "when session affinity type is ClientIP");
            };
            let path = format!("{path}.clientIP");
            let Some(client_ip) = &config.client_ip else { return e.required(&path) };
            let path = format!("{path}.timeoutSeconds");
            match client_ip.timeout_seconds {
                None => e.required(&path),
                Some(t) if !(1..=MAX_CLIENT_IP_TIMEOUT).contains(&t) => {
                    e.invalid(&path, t, &format!("must be between 1 and {MAX_CLIENT_IP_TIMEOUT}, inclusive"))
                }
                Some(_) => {}
            }
        }
        "None" if config.is_some() => {
            e.forbidden("spec.sessionAffinityConfig", "must not be set when session affinity is None")
        }
        _ => {}
    }
}

fn traffic_policies(e: &mut Errors, spec: &ServiceSpec, kind: &str) {
    // As Kubernetes: a ClusterIP service with externalIPs is reachable from outside too.
    let external =
        matches!(kind, "NodePort" | "LoadBalancer") || (kind == "ClusterIP" && !spec.external_ips.is_empty());
    if let Some(policy) = spec.external_traffic_policy.as_deref() {
        let field = "spec.externalTrafficPolicy";
        if external {
            e.one_of(field, policy, TRAFFIC_POLICIES);
        } else if !policy.is_empty() {
            let reason = "may only be set when `type` is 'NodePort' or 'LoadBalancer' (or `externalIPs` is set)";
            e.invalid(field, policy, reason);
        }
    }
    if let Some(policy) = spec.internal_traffic_policy.as_deref() {
        e.one_of("spec.internalTrafficPolicy", policy, TRAFFIC_POLICIES);
    }
}

/// The node port a load balancer probes to learn which nodes have local endpoints. Only a load balancer that keeps
/// traffic on the node it reaches (externalTrafficPolicy Local) needs one. The API server would allocate it when
/// omitted; here one that is given is checked as the allocator checks a requested port.
fn health_check_node_port(e: &mut Errors, spec: &ServiceSpec, kind: &str, (low, high): (u16, u16)) {
    // 0 is how a client asks for one to be allocated.
    let Some(port) = spec.health_check_node_port.filter(|&p| p != 0) else { return };
    let field = "spec.healthCheckNodePort";
    if kind != "LoadBalancer" || spec.external_traffic_policy.as_deref() != Some("Local") {
        let reason = "may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'";
        return e.invalid(field, port, reason);
    }
    let failed = format!("failed to allocate requested HealthCheck NodePort {port}");
    if !(i64::from(low)..=i64::from(high)).contains(&port) {
        let reason =
            format!("{failed}: provided port is not in the valid range. The range of valid ports is {low}-{high}");
        e.invalid(field, port, &reason);
    } else if spec.ports.iter().any(|p| p.node_port == Some(port)) {
        // One allocator hands out node ports and health check ports alike, whatever the protocol.
        e.invalid(field, port, &format!("{failed}: provided port is already allocated"));
    }
}

fn service_status(e: &mut Errors, svc: &Service) {
    let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).map(|lb| lb.ingress.as_slice());
    for (i, ing) in ingress.unwrap_or_default().iter().enumerate() {
        let path = format!("status.loadBalancer.ingress[{i}]");
        if let Some(ip) = ing.ip.as_deref().filter(|ip| !ip.is_empty()) {
            e.ip(&format!("{path}.ip"), ip);
        }
        if let Some(host) = ing.hostname.as_deref().filter(|h| !h.is_empty()) {
            let field = format!("{path}.hostname");
            e.invalid_each(&field, host, dns1123_subdomain(host));
            if host.parse::<IpAddr>().is_ok() {
                e.invalid(&field, host, "must be a DNS name, not an IP address");
            }
        }
    }
}

// ---- Endpoints ----

fn endpoint_subset(e: &mut Errors, path: &str, subset: &EndpointSubset) {
    if subset.addresses.is_empty() && subset.not_ready_addresses.is_empty() {
        e.required_because(path, "must specify `addresses` or `notReadyAddresses`");
    }
    for (j, a) in subset.addresses.iter().enumerate() {
        endpoint_address(e, &format!("{path}.addresses[{j}]"), a);
    }
    for (j, a) in subset.not_ready_addresses.iter().enumerate() {
        endpoint_address(e, &format!("{path}.notReadyAddresses[{j}]"), a);
    }
    let require_name = subset.ports.len() > 1;
    let mut names = HashSet::new();
    for (k, p) in subset.ports.iter().enumerate() {
        endpoint_port(e, &format!("{path}.ports[{k}]"), p, require_name, &mut names);
    }
}

fn endpoint_address(e: &mut Errors, path: &str, a: &EndpointAddress) {
    e.routable_ip(&format!("{path}.ip"), &a.ip);
    if let Some(node) = a.node_name.as_deref().filter(|n| !n.is_empty()) {
        e.invalid_each(&format!("{path}.nodeName"), node, dns1123_subdomain(node));
    }
}

fn endpoint_port<'a>(
    e: &mut Errors,
    path: &str,
    p: &'a EndpointPort,
    require_name: bool,
    names: &mut HashSet<&'a str>,
) {
    port_name(e, path, p.name.as_deref(), require_name, names);
    e.port_number(&format!("{path}.port"), p.port);
    e.protocol(&format!("{path}.protocol"), p.protocol.as_deref());
}

// ---- NetworkPolicy ----

fn network_policy(e: &mut Errors, spec: &NetworkPolicySpec) {
    label_selector(e, "spec.podSelector", &spec.pod_selector);
    policy_types(e, &spec.policy_types);
    for (i, rule) in spec.ingress.iter().enumerate() {
        policy_rule(e, &format!("spec.ingress[{i}]"), "from", &rule.from, &rule.ports);
    }
    for (i, rule) in spec.egress.iter().enumerate() {
        policy_rule(e, &format!("spec.egress[{i}]"), "to", &rule.to, &rule.ports);
    }
}

fn policy_types(e: &mut Errors, types: &[String]) {
    let mut seen = HashSet::new();
    for (i, t) in types.iter().enumerate() {
        let field = format!("spec.policyTypes[{i}]");
        e.one_of(&field, t, POLICY_TYPES);
        if !seen.insert(t) {
            e.duplicate(&field, t);
        }
    }
}

fn policy_rule(
    e: &mut Errors,
    path: &str,
    peers_field: &str,
    peers: &[NetworkPolicyPeer],
    ports: &[NetworkPolicyPort],
) {
    for (j, port) in ports.iter().enumerate() {
        policy_port(e, &format!("{path}.ports[{j}]"), port);
    }
    for (j, peer) in peers.iter().enumerate() {
        policy_peer(e, &format!("{path}.{peers_field}[{j}]"), peer);
    }
}

fn policy_port(e: &mut Errors, path: &str, p: &NetworkPolicyPort) {
    e.protocol(&format!("{path}.protocol"), p.protocol.as_deref());
    let port_field = format!("{path}.port");
    let end_field = format!("{path}.endPort");
    match (&p.port, p.end_port) {
        (Some(IntOrString::Int(port)), end) => {
            e.port_number(&port_field, *port);
            if let Some(end) = end {
                if end < *port {
                    e.invalid(&end_field, end, "must be greater than or equal to `port`");
                }
                e.port_number(&end_field, end);
            }
        }
        (Some(IntOrString::Str(name)), end) => {
            e.invalid_each(&port_field, name, iana_svc_name(name));
            if let Some(end) = end {
                e.invalid(&end_field, end, "may not be specified when `port` is not a number");
            }
        }
        (None, Some(end)) => e.invalid(&end_field, end, "may not be specified unless `port` is specified"),
        (None, None) => {}
    }
}

fn policy_peer(e: &mut Errors, path: &str, peer: &NetworkPolicyPeer) {
    if let Some(sel) = &peer.pod_selector {
        label_selector(e, &format!("{path}.podSelector"), sel);
    }
    if let Some(sel) = &peer.namespace_selector {
        label_selector(e, &format!("{path}.namespaceSelector"), sel);
    }
    if let Some(block) = &peer.ip_block {
        ip_block(e, &format!("{path}.ipBlock"), block);
    }
    let selectors = peer.pod_selector.is_some() || peer.namespace_selector.is_some();
    match (selectors, peer.ip_block.is_some()) {
        (false, false) => e.required_because(path, "must specify a peer"),
        // podSelector with namespaceSelector is one peer (an AND); an ipBlock cannot be ANDed with pods.
        (true, true) => e.forbidden(
            path,
            "may not specify more than 1 peer type: ipBlock cannot be combined with podSelector or namespaceSelector",
        ),
        _ => {}
    }
}

fn ip_block(e: &mut Errors, path: &str, block: &IpBlock) {
    let field = format!("{path}.cidr");
    if block.cidr.is_empty() {
        return e.required(&field);
    }
    let Some(cidr) = e.cidr(&field, &block.cidr) else { return };
    let cidr = cidr.trunc();
    for (i, except) in block.except.iter().enumerate() {
        let field = format!("{path}.except[{i}]");
        let Some(net) = e.cidr(&field, except) else { continue };
        let net = net.trunc();
        if !cidr.contains(&net) || net.prefix_len() <= cidr.prefix_len() {
            e.invalid(&field, except, "must be a strict subset of `cidr`");
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    const NODE_PORTS: (u16, u16) = (30000, 32767);

    fn errors(v: Value) -> Vec<FieldError> {
        errors_with(v, &["10.96.0.0/12".parse().unwrap()])
    }

    fn errors_with(v: Value, ranges: &[IpNet]) -> Vec<FieldError> {
        let mut obj: Object = serde_json::from_value(v).expect("test object parses");
        obj.apply_defaults();
        validate(&obj, ranges, NODE_PORTS).err().unwrap_or_default()
    }

    fn assert_valid(v: Value) {
        let errs = errors(v);
        assert!(errs.is_empty(), "unexpected errors: {errs:#?}");
    }

    /// The reason given at `field`; fails when there is none.
    fn reason_at(v: Value, field: &str) -> String {
        let errs = errors(v);
        match errs.iter().find(|e| e.field == field) {
            Some(e) => e.reason.clone(),
            None => panic!("no error at {field}: {errs:#?}"),
        }
    }

    fn pod(spec: Value) -> Value {
        json!({"kind": "Pod", "metadata": {"name": "web-0", "labels": {"app": "web"}}, "spec": spec})
    }

    fn web_pod_spec() -> Value {
        json!({"containers": [{"name": "web", "image": "nginx", "ports": [{"name": "http", "containerPort": 80}]}]})
    }

    fn service(spec: Value) -> Value {
        json!({"kind": "Service", "metadata": {"name": "web"}, "spec": spec})
    }

    fn policy(spec: Value) -> Value {
        json!({"kind": "NetworkPolicy", "metadata": {"name": "p", "namespace": "dev"}, "spec": spec})
    }

    #[test]
    fn display_is_field_then_reason() {
        let e = FieldError { field: "spec.ports[0].port".into(), reason: "Required value".into() };
        assert_eq!(e.to_string(), "spec.ports[0].port: Required value");
    }

    #[test]
    fn name_is_required() {
        assert_eq!(reason_at(json!({"kind": "Namespace", "metadata": {}}), "metadata.name"), "Required value");
    }

    #[test]
    fn namespace_names_are_rfc1123_labels() {
        assert_valid(json!({"kind": "Namespace", "metadata": {"name": "kube-system"}}));
        let r = reason_at(json!({"kind": "Namespace", "metadata": {"name": "Dev"}}), "metadata.name");
        assert!(r.starts_with("Invalid value: \"Dev\": a lowercase RFC 1123 label must consist of"), "{r}");
        let long = "a".repeat(64);
        let r = reason_at(json!({"kind": "Namespace", "metadata": {"name": long}}), "metadata.name");
        assert!(r.ends_with("must be no more than 63 characters"), "{r}");
        // A label may not contain dots even though a subdomain may.
        reason_at(json!({"kind": "Namespace", "metadata": {"name": "a.b"}}), "metadata.name");
    }

    #[test]
    fn service_names_start_with_a_letter() {
        let spec = json!({"ports": [{"port": 80}]});
        let mut svc = service(spec.clone());
        svc["metadata"]["name"] = json!("1web");
        let r = reason_at(svc, "metadata.name");
        assert!(r.contains("a DNS-1035 label"), "{r}");
        assert_valid(service(spec));
    }

    #[test]
    fn pod_names_are_subdomains() {
        let mut p = pod(web_pod_spec());
        p["metadata"]["name"] = json!("web.v1-0");
        assert_valid(p.clone());
        p["metadata"]["name"] = json!("web..0");
        let r = reason_at(p.clone(), "metadata.name");
        assert!(r.contains("RFC 1123 subdomain"), "{r}");
        p["metadata"]["name"] = json!("w".repeat(254));
        assert!(reason_at(p, "metadata.name").ends_with("must be no more than 253 characters"));
    }

    #[test]
    fn namespace_field_is_a_label() {
        let mut p = pod(web_pod_spec());
        p["metadata"]["namespace"] = json!("my_ns");
        reason_at(p, "metadata.namespace");
    }

    #[test]
    fn labels_and_annotations() {
        let mut p = pod(web_pod_spec());
        p["metadata"]["labels"] = json!({"app.kubernetes.io/name": "web", "tier": "", "Role_x": "a.b-c_d"});
        p["metadata"]["annotations"] = json!({"Example.COM/Note": "anything at all: ok"});
        assert_valid(p.clone());

        p["metadata"]["labels"] = json!({"app": "-web", "bad key": "x", "/x": "y", "a/b/c": "z"});
        let errs = errors(p);
        let at = |f: &str| errs.iter().filter(|e| e.field == f).map(|e| e.reason.as_str()).collect::<Vec<_>>();
        assert!(at("metadata.labels[\"app\"]")[0].contains("a valid label must be an empty string"), "{errs:#?}");
        assert!(at("metadata.labels[\"bad key\"]")[0].contains("name part must consist of"), "{errs:#?}");
        assert!(at("metadata.labels[\"/x\"]")[0].contains("prefix part must be non-empty"), "{errs:#?}");
        assert!(at("metadata.labels[\"a/b/c\"]")[0].contains("a qualified name"), "{errs:#?}");
    }

    #[test]
    fn annotation_keys_are_checked() {
        let mut p = pod(web_pod_spec());
        p["metadata"]["annotations"] = json!({"bad/key/x": "v"});
        reason_at(p, "metadata.annotations[\"bad/key/x\"]");
    }

    #[test]
    fn pod_needs_containers() {
        assert_eq!(reason_at(pod(json!({})), "spec.containers"), "Required value");
    }

    #[test]
    fn container_names_are_required_labels_and_unique() {
        let spec = json!({"containers": [{"name": "a"}, {"name": "a"}, {"name": ""}, {"name": "B"}]});
        assert_eq!(reason_at(pod(spec.clone()), "spec.containers[1].name"), "Duplicate value: \"a\"");
        assert_eq!(reason_at(pod(spec.clone()), "spec.containers[2].name"), "Required value");
        reason_at(pod(spec), "spec.containers[3].name");
    }

    #[test]
    fn container_ports() {
        assert_valid(pod(web_pod_spec()));
        let spec = json!({"containers": [
            {"name": "a", "ports": [{"containerPort": 70000},
                                    {"name": "http", "containerPort": 80, "protocol": "SCTPX"}]},
            {"name": "b", "ports": [{"name": "http", "containerPort": 81}, {"name": "8080", "containerPort": 82},
                                    {"name": "web--1", "containerPort": 83}, {"name": "-web", "containerPort": 84},
                                    {"name": "a-very-long-port-name", "containerPort": 85}]},
        ]});
        let p = pod(spec);
        assert_eq!(
            reason_at(p.clone(), "spec.containers[0].ports[0].containerPort"),
            "Invalid value: 70000: must be between 1 and 65535, inclusive"
        );
        assert_eq!(
            reason_at(p.clone(), "spec.containers[0].ports[1].protocol"),
            "Unsupported value: \"SCTPX\": supported values: \"TCP\", \"UDP\", \"SCTP\""
        );
        assert_eq!(reason_at(p.clone(), "spec.containers[1].ports[0].name"), "Duplicate value: \"http\"");
        assert!(reason_at(p.clone(), "spec.containers[1].ports[1].name").contains("at least one letter"));
        assert!(reason_at(p.clone(), "spec.containers[1].ports[2].name").contains("consecutive hyphens"));
        assert!(reason_at(p.clone(), "spec.containers[1].ports[3].name").contains("begin or end with a hyphen"));
        assert!(reason_at(p, "spec.containers[1].ports[4].name").contains("no more than 15 characters"));
    }

    #[test]
    fn pod_status_ips() {
        let mut p = pod(web_pod_spec());
        p["status"] = json!({"podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.5"}], "hostIP": "192.168.1.10"});
        assert_valid(p.clone());
        p["status"] = json!({"podIP": "10.244.1.500", "podIPs": [{"ip": "x"}]});
        assert!(reason_at(p.clone(), "status.podIP").contains("must be a valid IP address"));
        reason_at(p, "status.podIPs[0].ip");
    }

    #[test]
    fn nodes() {
        let node = |spec: Value, addresses: Value| {
            json!({"kind": "Node", "metadata": {"name": "node-1.example"}, "spec": spec,
                   "status": {"addresses": addresses}})
        };
        assert_valid(node(
            json!({"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]}),
            json!([{"type": "InternalIP", "address": "192.168.1.10"}, {"type": "Hostname", "address": "node-1"}]),
        ));
        let bad = node(
            json!({"podCIDR": "10.244.1.0", "podCIDRs": ["10.244.2.0/24"]}),
            json!([{"type": "PublicIP", "address": "1.2.3.4"}, {"type": "ExternalIP", "address": "node-1"}]),
        );
        assert!(reason_at(bad.clone(), "spec.podCIDR").contains("must be a valid CIDR"));
        assert!(reason_at(bad.clone(), "spec.podCIDRs").contains("first value must match"));
        assert!(reason_at(bad.clone(), "status.addresses[0].type").starts_with("Unsupported value: \"PublicIP\""));
        assert!(reason_at(bad, "status.addresses[1].address").contains("must be a valid IP address"));
    }

    #[test]
    fn cluster_scoped_objects_have_no_namespace() {
        let obj: Object =
            serde_json::from_value(json!({"kind": "Node", "metadata": {"name": "n", "namespace": "x"}})).unwrap();
        let errs = validate(&obj, &[], NODE_PORTS).unwrap_err();
        assert_eq!(errs[0].field, "metadata.namespace");
    }

    #[test]
    fn service_type_and_ports() {
        assert_valid(service(json!({"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]})));
        assert_eq!(reason_at(service(json!({})), "spec.ports"), "Required value");
        let r = reason_at(service(json!({"type": "Magic", "ports": [{"port": 80}]})), "spec.type");
        assert!(r.starts_with("Unsupported value: \"Magic\": supported values: \"ClusterIP\""), "{r}");

        let svc = service(json!({"ports": [
            {"port": 0, "protocol": "SCTPX", "targetPort": 0},
            {"name": "http", "port": 80, "targetPort": "Http"},
            {"name": "http", "port": 80, "targetPort": 70000},
        ]}));
        assert_eq!(reason_at(svc.clone(), "spec.ports[0].name"), "Required value");
        assert_eq!(
            reason_at(svc.clone(), "spec.ports[0].port"),
            "Invalid value: 0: must be between 1 and 65535, inclusive"
        );
        assert!(reason_at(svc.clone(), "spec.ports[0].protocol").starts_with("Unsupported value: \"SCTPX\""));
        reason_at(svc.clone(), "spec.ports[0].targetPort");
        assert!(reason_at(svc.clone(), "spec.ports[1].targetPort").contains("alpha-numeric characters (a-z, 0-9)"));
        assert_eq!(reason_at(svc.clone(), "spec.ports[2].name"), "Duplicate value: \"http\"");
        assert_eq!(reason_at(svc.clone(), "spec.ports[2]"), "Duplicate value: \"80/TCP\"");
        reason_at(svc, "spec.ports[2].targetPort");
    }

    #[test]
    fn same_port_different_protocols_is_fine() {
        assert_valid(service(json!({"ports": [
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
        ]})));
    }

    #[test]
    fn node_ports() {
        assert_valid(service(json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]})));
        assert_valid(service(json!({"type": "LoadBalancer", "ports": [{"port": 80}]})));
        let r = reason_at(service(json!({"ports": [{"port": 80, "nodePort": 30080}]})), "spec.ports[0].nodePort");
        assert_eq!(r, "Forbidden: may not be used when `type` is 'ClusterIP'");
        let svc = service(json!({"type": "NodePort", "ports": [
            {"name": "a", "port": 80, "nodePort": 8080},
            {"name": "b", "port": 81, "nodePort": 30081},
            {"name": "c", "port": 82, "nodePort": 30081},
            {"name": "d", "port": 82, "protocol": "UDP", "nodePort": 30081},
        ]}));
        let r = reason_at(svc.clone(), "spec.ports[0].nodePort");
        assert_eq!(
            r,
            "Invalid value: 8080: provided port is not in the valid range. The range of valid ports is 30000-32767"
        );
        assert_eq!(reason_at(svc.clone(), "spec.ports[2].nodePort"), "Duplicate value: 30081");
        assert!(!errors(svc).iter().any(|e| e.field == "spec.ports[3].nodePort"), "another protocol may reuse it");
    }

    #[test]
    fn ip_families_and_ranges_per_family() {
        let ranges: [IpNet; 2] = ["10.96.0.0/12".parse().unwrap(), "fd00:10:96::/112".parse().unwrap()];
        let v = |spec: Value| errors_with(service(spec), &ranges);
        assert!(v(json!({"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1", "fd00:10:96::5"], "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack", "ports": [{"port": 80}]})).is_empty());
        let errs = v(
            json!({"clusterIPs": ["10.96.0.1", "fd00:10:96::5"], "clusterIP": "10.96.0.1", "ipFamilyPolicy": "SingleStack", "ports": [{"port": 80}]}),
        );
        assert!(errs.iter().any(|e| e.field == "spec.ipFamilyPolicy"), "{errs:?}");
        let errs = v(json!({"ipFamilies": ["IPv6", "IPv6"], "ports": [{"port": 80}]}));
        assert!(errs.iter().any(|e| e.field == "spec.ipFamilies[1]"), "{errs:?}");
        let errs = v(json!({"clusterIP": "fd00:10:97::1", "ports": [{"port": 80}]}));
        assert!(errs.iter().any(|e| e.field == "spec.clusterIP"), "outside the IPv6 range: {errs:?}");
        let only4: [IpNet; 1] = ["10.96.0.0/12".parse().unwrap()];
        let errs = errors_with(service(json!({"clusterIP": "fd00:10:96::1", "ports": [{"port": 80}]})), &only4);
        assert!(errs[0].reason.contains("no IPv6 service IP range"), "{errs:?}");
        let errs = v(
            json!({"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"], "ipFamilies": ["IPv6"], "ports": [{"port": 80}]}),
        );
        assert!(errs.iter().any(|e| e.field == "spec.clusterIPs[0]"), "{errs:?}");
    }

    #[test]
    fn cluster_ips() {
        let with_ip = |ip: &str| service(json!({"clusterIP": ip, "ports": [{"port": 80}]}));
        assert_valid(with_ip("10.96.0.100"));
        assert_valid(with_ip(""));
        assert_eq!(
            reason_at(with_ip("10.0.0.1"), "spec.clusterIP"),
            "Invalid value: \"10.0.0.1\": provided IP is not in the valid range. The range of valid IPs is 10.96.0.0/12"
        );
        assert!(reason_at(with_ip("10.96.0.0"), "spec.clusterIP").contains("network address"));
        assert!(reason_at(with_ip("10.111.255.255"), "spec.clusterIP").contains("broadcast address"));
        assert!(reason_at(with_ip("10.96.0.300"), "spec.clusterIP").contains("must be a valid IP address"));
        let r = reason_at(
            service(json!({"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.2"], "ports": [{"port": 80}]})),
            "spec.clusterIPs",
        );
        assert!(r.contains("first value must match `clusterIP`"), "{r}");
        assert_valid(service(json!({"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"], "ports": [{"port": 80}]})));
    }

    #[test]
    fn headless_services() {
        assert_valid(service(json!({"clusterIP": "None", "selector": {"app": "redis"}})));
        assert_valid(service(json!({"clusterIP": "None", "ports": [{"port": 6379}]})));
        let r = reason_at(
            service(json!({"type": "NodePort", "clusterIP": "None", "ports": [{"port": 80}]})),
            "spec.clusterIP",
        );
        assert!(r.contains("may not be set to 'None' for NodePort services"), "{r}");
    }

    #[test]
    fn external_name_services() {
        assert_valid(service(json!({"type": "ExternalName", "externalName": "db.example.com"})));
        assert_valid(service(
            json!({"type": "ExternalName", "externalName": "DB.Example.com.", "ports": [{"port": 5432}]}),
        ));
        assert_eq!(reason_at(service(json!({"type": "ExternalName"})), "spec.externalName"), "Required value");
        reason_at(service(json!({"type": "ExternalName", "externalName": "db_1.example.com"})), "spec.externalName");
        let r = reason_at(
            service(json!({"type": "ExternalName", "externalName": "db.example.com", "clusterIP": "10.96.0.5"})),
            "spec.clusterIP",
        );
        assert_eq!(r, "Forbidden: may not be set for ExternalName services");
    }

    #[test]
    fn service_selector_labels() {
        let r = reason_at(
            service(json!({"selector": {"app": "web app"}, "ports": [{"port": 80}]})),
            "spec.selector[\"app\"]",
        );
        assert!(r.contains("a valid label"), "{r}");
    }

    #[test]
    fn session_affinity() {
        assert_valid(service(json!({"sessionAffinity": "ClientIP", "ports": [{"port": 80}]})));
        let ok = json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86400}},
                        "ports": [{"port": 80}]});
        assert_valid(service(ok));
        let bad = json!({"sessionAffinity": "ClientIP",
                         "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86401}},
                         "ports": [{"port": 80}]});
        assert!(reason_at(service(bad), "spec.sessionAffinityConfig.clientIP.timeoutSeconds").contains("86400"));
        let r =
            reason_at(service(json!({"sessionAffinity": "Sticky", "ports": [{"port": 80}]})), "spec.sessionAffinity");
        assert_eq!(r, "Unsupported value: \"Sticky\": supported values: \"None\", \"ClientIP\"");
    }

    #[test]
    fn external_ips_and_traffic_policies() {
        let ok = json!({"type": "LoadBalancer", "externalIPs": ["192.0.2.10"], "loadBalancerIP": "192.0.2.11",
                        "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local", "ports": [{"port": 80}]});
        assert_valid(service(ok));
        assert_valid(service(
            json!({"externalIPs": ["192.0.2.10"], "externalTrafficPolicy": "Local", "ports": [{"port": 80}]}),
        ));
        let bad = service(json!({"externalIPs": ["not-an-ip", "127.0.0.1"], "loadBalancerIP": "x",
                                 "internalTrafficPolicy": "Nearest", "ports": [{"port": 80}]}));
        reason_at(bad.clone(), "spec.externalIPs[0]");
        assert!(reason_at(bad.clone(), "spec.externalIPs[1]").contains("loopback"));
        reason_at(bad.clone(), "spec.loadBalancerIP");
        reason_at(bad, "spec.internalTrafficPolicy");
        let r = reason_at(
            service(json!({"externalTrafficPolicy": "Local", "ports": [{"port": 80}]})),
            "spec.externalTrafficPolicy",
        );
        assert!(r.contains("may only be set when `type` is 'NodePort' or 'LoadBalancer'"), "{r}");
        let r = reason_at(
            service(json!({"type": "NodePort", "externalTrafficPolicy": "Nearest", "ports": [{"port": 80}]})),
            "spec.externalTrafficPolicy",
        );
        assert!(r.starts_with("Unsupported value"), "{r}");
    }

    #[test]
    fn health_check_node_ports() {
        let lb = |extra: Value| {
            let mut spec = json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                                  "ports": [{"port": 80, "nodePort": 30085}]});
            spec.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            service(spec)
        };
        assert_valid(lb(json!({"healthCheckNodePort": 30086})));
        assert_valid(lb(json!({})));
        assert_valid(lb(json!({"healthCheckNodePort": 0})));
        let field = "spec.healthCheckNodePort";
        assert_eq!(
            reason_at(lb(json!({"healthCheckNodePort": 8080})), field),
            "Invalid value: 8080: failed to allocate requested HealthCheck NodePort 8080: provided port is not in the \
             valid range. The range of valid ports is 30000-32767"
        );
        assert_eq!(
            reason_at(lb(json!({"healthCheckNodePort": 30085})), field),
            "Invalid value: 30085: failed to allocate requested HealthCheck NodePort 30085: provided port is already \
             allocated"
        );
        let only = "Invalid value: 30086: may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` \
                    is 'Local'";
        let cluster_policy = lb(json!({"healthCheckNodePort": 30086, "externalTrafficPolicy": "Cluster"}));
        assert_eq!(reason_at(cluster_policy, field), only);
        let node_port = service(json!({"type": "NodePort", "externalTrafficPolicy": "Local",
                                       "healthCheckNodePort": 30086, "ports": [{"port": 80}]}));
        assert_eq!(reason_at(node_port, field), only);
        let cluster_ip = service(json!({"healthCheckNodePort": 30086, "ports": [{"port": 80}]}));
        assert_eq!(reason_at(cluster_ip, field), only);
    }

    #[test]
    fn load_balancer_status() {
        let mut svc = service(json!({"type": "LoadBalancer", "ports": [{"port": 80}]}));
        svc["status"] = json!({"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}, {"hostname": "lb.example.com"}]}});
        assert_valid(svc.clone());
        svc["status"] = json!({"loadBalancer": {"ingress": [{"ip": "192.0.2"}]}});
        reason_at(svc, "status.loadBalancer.ingress[0].ip");
    }

    #[test]
    fn endpoints() {
        let ep = |subsets: Value| json!({"kind": "Endpoints", "metadata": {"name": "web"}, "subsets": subsets});
        assert_valid(ep(json!([{"addresses": [{"ip": "10.244.1.5", "nodeName": "node-1"}],
                                "notReadyAddresses": [{"ip": "10.244.2.6"}],
                                "ports": [{"name": "http", "port": 80},
                                          {"name": "dns", "port": 53, "protocol": "UDP"}]}])));
        let bad = ep(json!([
            {"addresses": [{"ip": "0.0.0.0"}, {"ip": "127.0.0.1"}, {"ip": "10.244.1"}],
             "notReadyAddresses": [{"ip": "::1"}],
             "ports": [{"port": 80}, {"name": "b", "port": 0, "protocol": "ICMP"}]},
            {"ports": [{"port": 80}]},
        ]));
        assert!(reason_at(bad.clone(), "subsets[0].addresses[0].ip").contains("unspecified"));
        assert!(reason_at(bad.clone(), "subsets[0].addresses[1].ip").contains("loopback"));
        assert!(reason_at(bad.clone(), "subsets[0].addresses[2].ip").contains("valid IP"));
        assert!(reason_at(bad.clone(), "subsets[0].notReadyAddresses[0].ip").contains("loopback"));
        assert_eq!(reason_at(bad.clone(), "subsets[0].ports[0].name"), "Required value");
        reason_at(bad.clone(), "subsets[0].ports[1].port");
        reason_at(bad.clone(), "subsets[0].ports[1].protocol");
        assert!(reason_at(bad, "subsets[1]").contains("must specify `addresses` or `notReadyAddresses`"));
    }

    #[test]
    fn label_selectors() {
        let sel = json!({"matchLabels": {"app": "web"}, "matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["front", "back"]},
            {"key": "canary", "operator": "DoesNotExist"},
        ]});
        assert_valid(policy(json!({"podSelector": sel})));
        let bad = policy(json!({"podSelector": {"matchLabels": {"app": "-"}, "matchExpressions": [
            {"key": "tier", "operator": "In"},
            {"key": "canary", "operator": "Exists", "values": ["x"]},
            {"key": "x", "operator": "Matches", "values": ["a"]},
            {"key": "bad key", "operator": "NotIn", "values": ["-bad"]},
        ]}}));
        reason_at(bad.clone(), "spec.podSelector.matchLabels[\"app\"]");
        let r = reason_at(bad.clone(), "spec.podSelector.matchExpressions[0].values");
        assert_eq!(r, "Required value: must be specified when `operator` is 'In' or 'NotIn'");
        assert!(reason_at(bad.clone(), "spec.podSelector.matchExpressions[1].values").starts_with("Forbidden"));
        let r = reason_at(bad.clone(), "spec.podSelector.matchExpressions[2].operator");
        assert_eq!(
            r,
            "Unsupported value: \"Matches\": supported values: \"In\", \"NotIn\", \"Exists\", \"DoesNotExist\""
        );
        reason_at(bad.clone(), "spec.podSelector.matchExpressions[3].key");
        reason_at(bad, "spec.podSelector.matchExpressions[3].values[0]");
    }

    #[test]
    fn policy_types() {
        assert_valid(policy(json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})));
        let bad = policy(json!({"podSelector": {}, "policyTypes": ["Ingress", "Ingress", "Sideways"]}));
        assert_eq!(reason_at(bad.clone(), "spec.policyTypes[1]"), "Duplicate value: \"Ingress\"");
        reason_at(bad, "spec.policyTypes[2]");
    }

    #[test]
    fn policy_peers() {
        let ok = policy(json!({"podSelector": {}, "ingress": [{"from": [
            {"podSelector": {"matchLabels": {"role": "client"}}, "namespaceSelector": {}},
            {"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.1.0/24", "10.244.1.2/32"]}},
        ]}]}));
        assert_valid(ok);
        let bad = policy(json!({"podSelector": {}, "ingress": [{"from": [
            {},
            {"ipBlock": {"cidr": "10.244.0.0/16"}, "podSelector": {}},
            {"ipBlock": {"cidr": "10.244.0.0/33"}},
            {"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.245.0.0/24", "10.244.0.0/16", "fd00::/64", "x"]}},
            {"ipBlock": {}},
        ]}], "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"bad key": "x"}}}]}]}));
        assert_eq!(reason_at(bad.clone(), "spec.ingress[0].from[0]"), "Required value: must specify a peer");
        assert!(reason_at(bad.clone(), "spec.ingress[0].from[1]").contains("may not specify more than 1 peer type"));
        assert!(reason_at(bad.clone(), "spec.ingress[0].from[2].ipBlock.cidr").contains("valid CIDR"));
        for i in 0..3 {
            let r = reason_at(bad.clone(), &format!("spec.ingress[0].from[3].ipBlock.except[{i}]"));
            assert!(r.ends_with("must be a strict subset of `cidr`"), "{r}");
        }
        assert!(reason_at(bad.clone(), "spec.ingress[0].from[3].ipBlock.except[3]").contains("valid CIDR"));
        assert_eq!(reason_at(bad.clone(), "spec.ingress[0].from[4].ipBlock.cidr"), "Required value");
        reason_at(bad, "spec.egress[0].to[0].namespaceSelector.matchLabels[\"bad key\"]");
    }

    #[test]
    fn policy_ports() {
        let ok = policy(json!({"podSelector": {}, "egress": [{"ports": [
            {"port": 80}, {"protocol": "UDP", "port": "dns"}, {"port": 32000, "endPort": 32768}, {"protocol": "SCTP"},
        ]}]}));
        assert_valid(ok);
        let bad = policy(json!({"podSelector": {}, "ingress": [{"ports": [
            {"protocol": "ICMP", "port": 0},
            {"port": "http", "endPort": 90},
            {"endPort": 90},
            {"port": 100, "endPort": 90},
            {"port": 100, "endPort": 65536},
            {"port": "HTTP"},
        ]}]}));
        reason_at(bad.clone(), "spec.ingress[0].ports[0].protocol");
        reason_at(bad.clone(), "spec.ingress[0].ports[0].port");
        assert!(reason_at(bad.clone(), "spec.ingress[0].ports[1].endPort").contains("when `port` is not a number"));
        assert!(reason_at(bad.clone(), "spec.ingress[0].ports[2].endPort").contains("unless `port` is specified"));
        assert!(reason_at(bad.clone(), "spec.ingress[0].ports[3].endPort").contains("greater than or equal to `port`"));
        assert!(reason_at(bad.clone(), "spec.ingress[0].ports[4].endPort").contains("between 1 and 65535"));
        reason_at(bad, "spec.ingress[0].ports[5].port");
    }

    #[test]
    fn all_errors_are_collected() {
        let svc = service(json!({"type": "Magic", "ports": [{"port": 0}], "sessionAffinity": "Sticky"}));
        let fields: Vec<_> = errors(svc).into_iter().map(|e| e.field).collect();
        for f in ["spec.type", "spec.ports[0].port", "spec.sessionAffinity"] {
            assert!(fields.iter().any(|x| x == f), "{f} missing from {fields:?}");
        }
    }

    /// The manifests under `examples/` are what a newcomer applies first: they must go in cleanly, read the way
    /// `tartanctl apply` reads them.
    #[test]
    fn examples_validate() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).expect("examples directory") {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let docs = crate::parse_manifests(&text, &path.display().to_string()).expect("example parses");
            for doc in docs {
                let cidr: [IpNet; 1] = ["10.96.0.0/12".parse().unwrap()];
                let errs = validate(&doc.object, &cidr, NODE_PORTS).err().unwrap_or_default();
                assert!(errs.is_empty(), "{}: {errs:#?}", doc.place());
                checked += 1;
            }
        }
        assert!(checked >= 13, "only {checked} example objects in {}", dir.display());
    }
}
