//! kubectl's tables: columns padded to the widest cell and three spaces apart, `<none>` for an empty cell.

use std::time::SystemTime;

use kube_objects::{Kind, Object};

/// kubectl's short ages: 45s, 3m12s, 20m, 5h3m, 2d4h, 30d.
pub fn age(created: Option<&str>) -> String {
    let Some(t) = created.and_then(|c| humantime::parse_rfc3339(c).ok()) else { return "<unknown>".into() };
    let s = SystemTime::now().duration_since(t).map(|d| d.as_secs()).unwrap_or(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86400);
    match s {
        _ if s < 120 => format!("{s}s"),
        _ if m < 10 => format!("{m}m{}s", s % 60),
        _ if h < 3 => format!("{m}m"),
        _ if h < 8 => format!("{h}h{}m", m % 60),
        _ if d < 2 => format!("{h}h"),
        _ if d < 8 => format!("{d}d{}h", h % 24),
        _ => format!("{d}d"),
    }
}

fn none(s: String) -> String {
    if s.is_empty() {
        "<none>".into()
    } else {
        s
    }
}

fn labels(m: &std::collections::BTreeMap<String, String>) -> String {
    m.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

fn header(kind: Kind, wide: bool) -> Vec<&'static str> {
    let mut h = match kind {
        Kind::Pod => vec!["NAME", "READY", "STATUS", "RESTARTS", "AGE"],
        Kind::Service => vec!["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"],
        Kind::Endpoints => vec!["NAME", "ENDPOINTS", "AGE"],
        Kind::Node => vec!["NAME", "STATUS", "ROLES", "AGE", "VERSION"],
        Kind::Namespace => vec!["NAME", "STATUS", "AGE"],
        Kind::NetworkPolicy => vec!["NAME", "POD-SELECTOR", "AGE"],
    };
    if wide {
        h.extend(match kind {
            Kind::Pod => vec!["IP", "NODE"],
            Kind::Service => vec!["SELECTOR"],
            Kind::Node => vec!["INTERNAL-IP", "POD-CIDR"],
            _ => vec![],
        });
    }
    h
}

fn row(o: &Object, wide: bool) -> Vec<String> {
    let m = o.meta();
    let age = age(m.creation_timestamp.as_deref());
    let mut r = vec![m.name.clone()];
    match o {
        Object::Pod(p) => {
            let n = p.spec.containers.len().max(1);
            let ready = kube_objects::pod_ready(p);
            let st = p.status.as_ref();
            r.push(format!("{}/{n}", if ready { n } else { 0 }));
            r.push(st.and_then(|s| s.phase.clone()).unwrap_or_else(|| "Pending".into()));
            r.push("0".into());
            r.push(age);
            if wide {
                r.push(none(st.and_then(|s| s.pod_ip.clone()).unwrap_or_default()));
                r.push(none(p.spec.node_name.clone().unwrap_or_default()));
            }
        }
        Object::Service(s) => {
            let kind = s.spec.kind.clone().unwrap_or_else(|| "ClusterIP".into());
            let cluster_ip = match kind.as_str() {
                "ExternalName" => "<none>".into(),
                _ => none(s.spec.cluster_ip.clone().unwrap_or_default()),
            };
            let lb: Vec<String> = s
                .status
                .iter()
                .flat_map(|st| st.load_balancer.iter().flat_map(|l| l.ingress.iter()))
                .filter_map(|i| i.ip.clone().or_else(|| i.hostname.clone()))
                .collect();
            let external = match kind.as_str() {
                "ExternalName" => s.spec.external_name.clone().unwrap_or_default(),
                "LoadBalancer" if lb.is_empty() && s.spec.external_ips.is_empty() => "<pending>".into(),
                _ => lb.iter().chain(&s.spec.external_ips).cloned().collect::<Vec<_>>().join(","),
            };
            let ports: Vec<String> = s
                .spec
                .ports
                .iter()
                .map(|p| match p.node_port {
                    Some(np) => format!("{}:{np}/{}", p.port, p.protocol()),
                    None => format!("{}/{}", p.port, p.protocol()),
                })
                .collect();
            r.extend([kind, cluster_ip, none(external), none(ports.join(",")), age]);
            if wide {
                r.push(none(s.spec.selector.as_ref().map(labels).unwrap_or_default()));
            }
        }
        Object::Endpoints(e) => {
            let eps: Vec<String> = e
                .subsets
                .iter()
                .flat_map(|s| {
                    s.addresses.iter().flat_map(move |a| s.ports.iter().map(move |p| format!("{}:{}", a.ip, p.port)))
                })
                .collect();
            let shown = if eps.len() > 3 && !wide {
                format!("{} + {} more...", eps[..3].join(","), eps.len() - 3)
            } else {
                eps.join(",")
            };
            r.extend([none(shown), age]);
        }
        Object::Node(n) => {
            let st = n.status.as_ref();
            let ready = st.is_some_and(|s| s.conditions.iter().any(|c| c.kind == "Ready" && c.status == "True"));
            r.extend([if ready { "Ready" } else { "NotReady" }.to_string(), "<none>".into(), age, "tartan".into()]);
            if wide {
                let ip =
                    st.and_then(|s| s.addresses.iter().find(|a| a.kind == "InternalIP")).map(|a| a.address.clone());
                r.push(none(ip.unwrap_or_default()));
                r.push(none(n.spec.pod_cidr.clone().unwrap_or_default()));
            }
        }
        Object::Namespace(_) => r.extend(["Active".to_string(), age]),
        Object::NetworkPolicy(np) => {
            let sel = &np.spec.pod_selector;
            let mut parts = vec![labels(&sel.match_labels)];
            parts.extend(
                sel.match_expressions.iter().map(|e| format!("{} {} ({})", e.key, e.operator, e.values.join(","))),
            );
            parts.retain(|p| !p.is_empty());
            r.extend([none(parts.join(",")), age]);
        }
    }
    r
}

pub fn table(kind: Kind, objs: &[Object], with_namespace: bool, wide: bool) {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut h: Vec<String> = header(kind, wide).into_iter().map(String::from).collect();
    if with_namespace {
        h.insert(0, "NAMESPACE".into());
    }
    rows.push(h);
    for o in objs {
        let mut r = row(o, wide);
        if with_namespace {
            r.insert(0, o.meta().namespace.clone().unwrap_or_default());
        }
        rows.push(r);
    }
    let cols = rows[0].len();
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().map(|r| r.get(c).map_or(0, |s| s.len())).max().unwrap_or(0)).collect();
    for r in rows {
        let line: Vec<String> = r.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        println!("{}", line.join("   ").trim_end());
    }
}
