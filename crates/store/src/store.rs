use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::SystemTime;

use etcd_client::{Compare, CompareOp, GetOptions, KeyValue, Txn, TxnOp};
use ipnet::IpNet;
use kube_objects::{FieldError, Kind, Object, Service};
use rand::Rng;

use crate::{connect, Etcd, StoreError, Tls};

pub const DEFAULT_PREFIX: &str = "/tartan";
const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/12";
const DEFAULT_NODE_PORTS: (u16, u16) = (30000, 32767);
/// Attempts of a write against racing writers before giving up.
const ATTEMPTS: usize = 16;

/// Cluster-wide settings kept at `<prefix>/config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// The ranges ClusterIPs come from: one, or one per family for dual stack (kube-apiserver's
    /// `--service-cluster-ip-range=10.96.0.0/12,fd00:10:96::/112`); the first is the primary family.
    pub service_cidrs: Vec<IpNet>,
    pub node_ports: (u16, u16),
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            service_cidrs: vec![DEFAULT_SERVICE_CIDR.parse().expect("valid")],
            node_ports: DEFAULT_NODE_PORTS,
        }
    }
}

impl StoreConfig {
    /// The service range of a family, if the cluster has one.
    pub fn service_range(&self, v6: bool) -> Option<IpNet> {
        self.service_cidrs.iter().copied().find(|n| n.addr().is_ipv6() == v6)
    }

    fn parse(text: &str) -> Result<StoreConfig, StoreError> {
        let bad = |f: &str, why: String| StoreError::Config(format!("config {f}: {why}"));
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad("(document)", e.to_string()))?;
        let mut c = StoreConfig::default();
        if let Some(s) = v.get("serviceCIDR").and_then(|s| s.as_str()) {
            let nets = s
                .split(',')
                .map(|n| n.trim().parse::<IpNet>().map(|n| n.trunc()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| bad("serviceCIDR", format!("{s:?} is not a CIDR or two comma-separated CIDRs")))?;
            let dual_ok = nets.len() == 1 || (nets.len() == 2 && nets[0].addr().is_ipv4() != nets[1].addr().is_ipv4());
            if !dual_ok {
                return Err(bad("serviceCIDR", format!("{s:?}: at most one range per IP family")));
            }
            c.service_cidrs = nets;
        }
        if let Some(s) = v.get("nodePortRange").and_then(|s| s.as_str()) {
            let range = s.split_once('-').and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)));
            match range {
                Some((a, b)) if a > 0 && a <= b => c.node_ports = (a, b),
                _ => return Err(bad("nodePortRange", format!("{s:?} is not a range like 30000-32767"))),
            }
        }
        Ok(c)
    }
}

/// What a put did, in kubectl's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Configured,
    Unchanged,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Configured => "configured",
            Outcome::Unchanged => "unchanged",
        }
    }
}

pub struct Store {
    pub(crate) client: Etcd,
    pub(crate) prefix: String,
}

/// What a Service holds in the allocation keys.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Allocations {
    /// One per family, the primary first.
    cluster_ips: Vec<IpAddr>,
    node_ports: BTreeSet<u16>,
    /// (port, protocol) -> nodePort: what an apply that omits nodePort keeps.
    by_port: BTreeMap<(i64, String), u16>,
}

fn allocations_of(svc: &Service) -> Allocations {
    let mut cluster_ips: Vec<IpAddr> = svc.spec.cluster_ips.iter().filter_map(|s| s.parse().ok()).collect();
    if cluster_ips.is_empty() {
        cluster_ips.extend(svc.spec.cluster_ip.as_deref().and_then(|s| s.parse::<IpAddr>().ok()));
    }
    let by_port: BTreeMap<(i64, String), u16> = svc
        .spec
        .ports
        .iter()
        .filter_map(|p| Some(((p.port, p.protocol().to_string()), u16::try_from(p.node_port?).ok()?)))
        .collect();
    Allocations { cluster_ips, node_ports: by_port.values().copied().collect(), by_port }
}

/// The families (false: IPv4, true: IPv6) a Service gets cluster IPs in, primary first, as the API server decides
/// them: the ones it lists in ipFamilies, else those of its clusterIPs, else those it already has, else the cluster's
/// primary family; a dual-stack policy adds the cluster's other family (required or preferred).
fn service_families(svc: &Service, old: &Allocations, cfg: &StoreConfig) -> Result<Vec<bool>, StoreError> {
    let invalid = |field: &str, reason: String| StoreError::Invalid(vec![FieldError { field: field.into(), reason }]);
    let spec = &svc.spec;
    let mut fams: Vec<bool> = if !spec.ip_families.is_empty() {
        spec.ip_families.iter().map(|f| f == "IPv6").collect()
    } else if !spec.cluster_ips.is_empty() || spec.cluster_ip.as_deref().is_some_and(|s| !s.is_empty()) {
        let ips = spec.cluster_ips.iter().map(String::as_str).chain(spec.cluster_ip.as_deref());
        let mut v: Vec<bool> = Vec::new();
        for ip in ips.filter_map(|s| s.parse::<IpAddr>().ok()) {
            if !v.contains(&ip.is_ipv6()) {
                v.push(ip.is_ipv6());
            }
        }
        v
    } else if !old.cluster_ips.is_empty() {
        old.cluster_ips.iter().map(IpAddr::is_ipv6).collect()
    } else {
        vec![cfg.service_cidrs[0].addr().is_ipv6()]
    };
    let cluster_dual = cfg.service_cidrs.len() == 2;
    match spec.ip_family_policy.as_deref() {
        Some("RequireDualStack") if !cluster_dual => {
            return Err(invalid(
                "spec.ipFamilyPolicy",
                "RequireDualStack: the cluster is not configured for dual stack (one serviceCIDR)".into(),
            ))
        }
        Some("RequireDualStack" | "PreferDualStack") if cluster_dual && fams.len() == 1 => fams.push(!fams[0]),
        _ => {}
    }
    Ok(fams)
}

impl Store {
    pub async fn connect(endpoints: &str, prefix: &str, tls: Option<&Tls>) -> Result<Store, StoreError> {
        Ok(Store::with_client(connect(endpoints, tls).await?, prefix))
    }

    pub fn with_client(client: Etcd, prefix: &str) -> Store {
        Store { client, prefix: prefix.trim_end_matches('/').to_string() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(crate) fn key(&self, kind: Kind, ns: Option<&str>, name: &str) -> String {
        match (kind.namespaced(), ns) {
            (true, Some(ns)) => format!("{}/{}/{ns}/{name}", self.prefix, kind.plural()),
            _ => format!("{}/{}/{name}", self.prefix, kind.plural()),
        }
    }

    fn kind_prefix(&self, kind: Kind, ns: Option<&str>) -> String {
        match (kind.namespaced(), ns) {
            (true, Some(ns)) => format!("{}/{}/{ns}/", self.prefix, kind.plural()),
            _ => format!("{}/{}/", self.prefix, kind.plural()),
        }
    }

    fn alloc_key(&self, what: &str, v: impl std::fmt::Display) -> String {
        format!("{}/allocations/{what}/{v}", self.prefix)
    }

    /// The cluster settings (defaults when none are stored).
    pub async fn config(&mut self) -> Result<StoreConfig, StoreError> {
        let r = self.client.get(format!("{}/config", self.prefix), None).await?;
        match r.kvs().first() {
            Some(kv) => StoreConfig::parse(&String::from_utf8_lossy(kv.value())),
            None => Ok(StoreConfig::default()),
        }
    }

    pub async fn set_config(&mut self, service_cidr: &str, node_ports: &str) -> Result<(), StoreError> {
        let v = serde_json::json!({"serviceCIDR": service_cidr, "nodePortRange": node_ports}).to_string();
        StoreConfig::parse(&v)?;
        self.client.put(format!("{}/config", self.prefix), v, None).await?;
        Ok(())
    }

    pub(crate) fn decode(key: &str, value: &[u8], mod_revision: i64) -> Result<Object, StoreError> {
        let mut o: Object = serde_json::from_slice(value)
            .map_err(|e| StoreError::Decode { key: key.to_string(), reason: e.to_string() })?;
        o.meta_mut().resource_version = Some(mod_revision.to_string());
        Ok(o)
    }

    /// Every key under `prefix` at one revision, and that revision (see [`Etcd::get_all`]).
    pub(crate) async fn range_all(&mut self, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError> {
        self.client.get_all(prefix).await
    }

    /// Decodes a value read by a follower (a watch, a snapshot) and checks it as the API server would have: its
    /// shape, that it is the object its key names, and validation. Err: why it cannot be used.
    pub(crate) fn decode_checked(key: &str, value: &[u8], mod_revision: i64) -> Result<Object, String> {
        let mut o: Object = serde_json::from_slice(value).map_err(|e| format!("not a valid object: {e}"))?;
        o.meta_mut().resource_version = Some(mod_revision.to_string());
        let m = o.meta();
        let ns_ok = !o.kind().namespaced() || m.namespace.is_some();
        let expected_key_end = match (&m.namespace, o.kind().namespaced()) {
            (Some(ns), true) => format!("/{}/{ns}/{}", o.kind().plural(), m.name),
            _ => format!("/{}/{}", o.kind().plural(), m.name),
        };
        if !ns_ok || !key.ends_with(&expected_key_end) {
            return Err(format!(
                "holds {} {:?}, which belongs at a key ending {expected_key_end}",
                o.kind().name(),
                m.name
            ));
        }
        o.apply_defaults();
        // The kinds whose specs become rules are validated as the API server would: one such value out of range
        // (a port of 70000) would otherwise fail a whole sync. Pods, Namespaces and Nodes are taken as written:
        // the agent itself writes Pods it knows only the address of (no containers), which the API server's
        // validation would refuse, and nothing in them can break a sync.
        if matches!(o.kind(), Kind::Service | Kind::Endpoints | Kind::NetworkPolicy) {
            kube_objects::validate(&o, &[], (1, u16::MAX)).map_err(|errs| {
                format!("invalid: {}", errs.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
            })?;
        }
        Ok(o)
    }

    pub async fn get(&mut self, kind: Kind, ns: Option<&str>, name: &str) -> Result<Option<Object>, StoreError> {
        let key = self.key(kind, ns, name);
        let r = self.client.get(key.as_str(), None).await?;
        r.kvs().first().map(|kv| Store::decode(&key, kv.value(), kv.mod_revision())).transpose()
    }

    /// Every object of `kind` (in `ns`, or everywhere with None), sorted by namespace and name, and the revision
    /// the listing is consistent at (a watch resumes after it).
    pub async fn list(&mut self, kind: Kind, ns: Option<&str>) -> Result<(Vec<Object>, i64), StoreError> {
        let p = self.kind_prefix(kind, ns);
        let (kvs, rev) = self.range_all(&p).await?;
        let mut out = Vec::new();
        for kv in &kvs {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            out.push(Store::decode(&key, kv.value(), kv.mod_revision())?);
        }
        Ok((out, rev))
    }

    /// Every object of every kind at one revision.
    pub async fn snapshot(&mut self) -> Result<(Vec<Object>, i64), StoreError> {
        let (kvs, rev) = self.range_all(&format!("{}/", self.prefix)).await?;
        let mut out = Vec::new();
        for kv in &kvs {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            if crate::watch::parse_key(&self.prefix, &key).is_some() {
                out.push(Store::decode(&key, kv.value(), kv.mod_revision())?);
            }
        }
        Ok((out, rev))
    }

    /// Creates or updates `obj` (defaults applied, already validated by the caller). Given a resourceVersion, the
    /// write happens only if the stored object still has it. A Service gets its clusterIP and nodePorts here.
    /// Status written by the agent survives an apply that carries none.
    pub async fn put(&mut self, obj: Object) -> Result<(Object, Outcome), StoreError> {
        let kind = obj.kind();
        let (ns, name) = (obj.meta().namespace.clone(), obj.meta().name.clone());
        let key = self.key(kind, ns.as_deref(), &name);
        let cfg = if kind == Kind::Service { Some(self.config().await?) } else { None };
        for _ in 0..ATTEMPTS {
            let r = self.client.get(key.as_str(), None).await?;
            let existing = match r.kvs().first() {
                Some(kv) => Some((Store::decode(&key, kv.value(), kv.mod_revision())?, kv.mod_revision())),
                None => None,
            };
            let want_rv = obj.meta().resource_version.clone();
            if let Some(rv) = &want_rv {
                if existing.as_ref().map(|(_, r)| r.to_string()).as_ref() != Some(rv) {
                    return Err(StoreError::Conflict(kind.name(), name));
                }
            }
            let mut new = obj.clone();
            merge_kept_fields(&mut new, existing.as_ref().map(|(o, _)| o));
            let guard = match &existing {
                Some((_, rev)) => Compare::mod_revision(key.as_str(), CompareOp::Equal, *rev),
                None => Compare::version(key.as_str(), CompareOp::Equal, 0),
            };
            let mut compares = vec![guard];
            let mut ops = Vec::new();
            if let (Object::Service(svc), Some(cfg)) = (&mut new, &cfg) {
                let old = match existing.as_ref().map(|(o, _)| o) {
                    Some(Object::Service(s)) => allocations_of(s),
                    _ => Allocations::default(),
                };
                let owner = format!("{}/{name}", ns.as_deref().unwrap_or("default"));
                self.allocate(svc, &old, cfg, &owner, &mut compares, &mut ops).await?;
            }
            if let Some((old, _)) = &existing {
                if same_content(old, &new) {
                    return Ok((old.clone(), Outcome::Unchanged));
                }
            }
            new.meta_mut().resource_version = None;
            let value = serde_json::to_vec(&new).expect("objects serialize");
            ops.push(TxnOp::put(key.as_str(), value, None));
            let resp = self.client.txn(Txn::new().when(compares).and_then(ops)).await?;
            if resp.succeeded() {
                let rev = resp.header().map(|h| h.revision()).unwrap_or_default();
                new.meta_mut().resource_version = Some(rev.to_string());
                let outcome = if existing.is_some() { Outcome::Configured } else { Outcome::Created };
                return Ok((new, outcome));
            }
            // Someone else wrote the object or took an address we picked: read again and retry.
        }
        Err(StoreError::Conflict(kind.name(), name))
    }

    /// Picks the Service's clusterIP and nodePorts and adds the allocation keys to the transaction: new ones
    /// guarded on being free, kept ones on still being ours, released ones deleted.
    async fn allocate(
        &mut self,
        svc: &mut Service,
        old: &Allocations,
        cfg: &StoreConfig,
        owner: &str,
        compares: &mut Vec<Compare>,
        ops: &mut Vec<TxnOp>,
    ) -> Result<(), StoreError> {
        let kind = svc.spec.kind.clone().unwrap_or_else(|| "ClusterIP".into());
        let invalid =
            |field: &str, reason: String| StoreError::Invalid(vec![FieldError { field: field.into(), reason }]);
        // clusterIPs: ExternalName has none, "None" is headless, empty means pick them (or keep the ones we have:
        // Kubernetes makes them immutable, and an apply that omits them keeps them). One per family the
        // service asks for, as the API server decides them (ipFamilies, ipFamilyPolicy, the cluster's ranges).
        let mut want = Allocations::default();
        if kind != "ExternalName" && svc.spec.cluster_ip.as_deref() != Some("None") {
            let families = service_families(svc, old, cfg)?;
            let mut requested: Vec<IpAddr> = Vec::new();
            for (i, s) in svc.spec.cluster_ips.iter().enumerate() {
                requested.push(
                    s.parse().map_err(|_| invalid(&format!("spec.clusterIPs[{i}]"), format!("{s:?} is not an IP")))?,
                );
            }
            if let Some(s) = svc.spec.cluster_ip.as_deref().filter(|s| !s.is_empty()) {
                let ip: IpAddr = s.parse().map_err(|_| invalid("spec.clusterIP", format!("{s:?} is not an IP")))?;
                if !requested.contains(&ip) {
                    requested.insert(0, ip);
                }
            }
            for (i, v6) in families.iter().copied().enumerate() {
                let field = if i == 0 { "spec.clusterIP".to_string() } else { format!("spec.clusterIPs[{i}]") };
                let net = cfg.service_range(v6).ok_or_else(|| {
                    invalid(&field, format!("the cluster has no {} service range", if v6 { "IPv6" } else { "IPv4" }))
                })?;
                let asked = requested.iter().copied().find(|ip| ip.is_ipv6() == v6);
                let kept = old.cluster_ips.iter().copied().find(|ip| ip.is_ipv6() == v6);
                let ip = match (asked, kept) {
                    (Some(ip), _) | (None, Some(ip)) => ip,
                    (None, None) => self.free_cluster_ip(net).await?,
                };
                if !net.contains(&ip) {
                    return Err(invalid(
                        &field,
                        format!("Invalid value: {ip:?}: provided IP is not in the valid range {net}"),
                    ));
                }
                // A picked address that is taken meanwhile loses in the transaction and is picked again; a
                // requested one is the caller's to change.
                if asked.is_some()
                    && !old.cluster_ips.contains(&ip)
                    && self.holder(&self.alloc_key("clusterips", ip)).await?.is_some()
                {
                    return Err(invalid(&field, format!("Invalid value: \"{ip}\": provided IP is already allocated")));
                }
                want.cluster_ips.push(ip);
            }
            svc.spec.cluster_ip = want.cluster_ips.first().map(ToString::to_string);
            svc.spec.cluster_ips = want.cluster_ips.iter().map(ToString::to_string).collect();
            svc.spec.ip_families = families.iter().map(|v6| if *v6 { "IPv6" } else { "IPv4" }.to_string()).collect();
            svc.spec.ip_family_policy.get_or_insert_with(|| "SingleStack".into());
        }
        if matches!(kind.as_str(), "NodePort" | "LoadBalancer") {
            let mut taken_now: BTreeSet<u16> = BTreeSet::new();
            for i in 0..svc.spec.ports.len() {
                let p = &svc.spec.ports[i];
                let port = match p.node_port {
                    Some(np) => {
                        let np = u16::try_from(np).unwrap_or(0);
                        if !old.node_ports.contains(&np)
                            && !taken_now.contains(&np)
                            && self.holder(&self.alloc_key("nodeports", np)).await?.is_some()
                        {
                            return Err(invalid(
                                &format!("spec.ports[{i}].nodePort"),
                                format!("Invalid value: {np}: provided port is already allocated"),
                            ));
                        }
                        np
                    }
                    None => {
                        // Keep what this port had, else a free one.
                        let kept = old
                            .by_port
                            .get(&(p.port, p.protocol().to_string()))
                            .copied()
                            .filter(|np| !taken_now.contains(np));
                        match kept {
                            Some(np) => np,
                            None => self.free_node_port(cfg, &taken_now).await?,
                        }
                    }
                };
                taken_now.insert(port);
                svc.spec.ports[i].node_port = Some(i64::from(port));
            }
            want.node_ports = taken_now;
        } else {
            for p in &mut svc.spec.ports {
                p.node_port = None;
            }
        }
        let ip_keys = |a: &Allocations| -> BTreeSet<String> {
            a.cluster_ips.iter().map(|ip| self.alloc_key("clusterips", ip)).collect()
        };
        let port_keys = |a: &Allocations| -> BTreeSet<String> {
            a.node_ports.iter().map(|p| self.alloc_key("nodeports", p)).collect()
        };
        let (want_keys, old_keys): (BTreeSet<String>, BTreeSet<String>) = (
            ip_keys(&want).union(&port_keys(&want)).cloned().collect(),
            ip_keys(old).union(&port_keys(old)).cloned().collect(),
        );
        for k in &want_keys {
            if old_keys.contains(k) {
                compares.push(Compare::value(k.as_str(), CompareOp::Equal, owner));
            } else {
                compares.push(Compare::version(k.as_str(), CompareOp::Equal, 0));
                ops.push(TxnOp::put(k.as_str(), owner, None));
            }
        }
        for k in old_keys.difference(&want_keys) {
            ops.push(TxnOp::delete(k.as_str(), None));
        }
        Ok(())
    }

    async fn holder(&mut self, key: &str) -> Result<Option<String>, StoreError> {
        let r = self.client.get(key, None).await?;
        Ok(r.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    async fn allocated(&mut self, what: &str) -> Result<BTreeSet<String>, StoreError> {
        let p = format!("{}/allocations/{what}/", self.prefix);
        let r = self.client.get(p.as_str(), Some(GetOptions::new().with_prefix().with_keys_only())).await?;
        Ok(r.kvs().iter().map(|kv| String::from_utf8_lossy(kv.key())[p.len()..].to_string()).collect())
    }

    /// A random free address of the service range (not its network or broadcast address). Random rather than
    /// lowest-first, so concurrent writers rarely pick the same one; the transaction settles it when they do.
    async fn free_cluster_ip(&mut self, net: IpNet) -> Result<IpAddr, StoreError> {
        let taken = self.allocated("clusterips").await?;
        let size: u128 = match net {
            IpNet::V4(n) => 1u128 << (32 - n.prefix_len()),
            IpNet::V6(n) => 1u128 << (128 - n.prefix_len()).min(64),
        };
        let base: u128 = match net.network() {
            IpAddr::V4(a) => u32::from(a).into(),
            IpAddr::V6(a) => a.into(),
        };
        let at = |off: u128| -> IpAddr {
            match net {
                IpNet::V4(_) => IpAddr::V4(((base + off) as u32).into()),
                IpNet::V6(_) => IpAddr::V6((base + off).into()),
            }
        };
        if size > 2 {
            let mut rng = rand::rng();
            for _ in 0..64 {
                let ip = at(rng.random_range(1..size - 1));
                if !taken.contains(&ip.to_string()) {
                    return Ok(ip);
                }
            }
            // Nearly full: walk it.
            if let Some(ip) = (1..(size - 1).min(1 << 20)).map(at).find(|ip| !taken.contains(&ip.to_string())) {
                return Ok(ip);
            }
        }
        Err(StoreError::Invalid(vec![FieldError {
            field: "spec.clusterIP".into(),
            reason: format!("failed to allocate an IP: the service range {net} is full"),
        }]))
    }

    async fn free_node_port(&mut self, cfg: &StoreConfig, also_taken: &BTreeSet<u16>) -> Result<u16, StoreError> {
        let taken: BTreeSet<u16> = self.allocated("nodeports").await?.iter().filter_map(|p| p.parse().ok()).collect();
        let (lo, hi) = cfg.node_ports;
        let free = |p: &u16| !taken.contains(p) && !also_taken.contains(p);
        let mut rng = rand::rng();
        for _ in 0..64 {
            let p = rng.random_range(lo..=hi);
            if free(&p) {
                return Ok(p);
            }
        }
        (lo..=hi).find(free).ok_or_else(|| {
            StoreError::Invalid(vec![FieldError {
                field: "spec.ports.nodePort".into(),
                reason: format!("failed to allocate a node port: {lo}-{hi} is full"),
            }])
        })
    }

    /// Compacts etcd's history up to `revision` (watches from before it must re-list).
    pub async fn compact(&mut self, revision: i64) -> Result<(), StoreError> {
        self.client.compact(revision, None).await?;
        Ok(())
    }

    /// Deletes an object (a Service's allocations with it; a Namespace's objects with it). False if absent.
    pub async fn delete(&mut self, kind: Kind, ns: Option<&str>, name: &str) -> Result<bool, StoreError> {
        if kind == Kind::Namespace {
            for k in Kind::ALL.into_iter().filter(|k| k.namespaced()) {
                let (objs, _) = self.list(k, Some(name)).await?;
                for o in objs {
                    Box::pin(self.delete(k, Some(name), &o.meta().name)).await?;
                }
            }
        }
        let key = self.key(kind, ns, name);
        for _ in 0..ATTEMPTS {
            let r = self.client.get(key.as_str(), None).await?;
            let Some(kv) = r.kvs().first() else { return Ok(false) };
            let rev = kv.mod_revision();
            let obj = Store::decode(&key, kv.value(), rev)?;
            let mut ops = vec![TxnOp::delete(key.as_str(), None)];
            let mut compares = vec![Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)];
            if let Object::Service(s) = &obj {
                let owner = format!("{}/{name}", ns.unwrap_or("default"));
                let a = allocations_of(s);
                let keys: Vec<String> = a
                    .cluster_ips
                    .iter()
                    .map(|ip| self.alloc_key("clusterips", ip))
                    .chain(a.node_ports.iter().map(|p| self.alloc_key("nodeports", p)))
                    .collect();
                for k in keys {
                    if self.holder(&k).await?.as_deref() == Some(owner.as_str()) {
                        compares.push(Compare::value(k.as_str(), CompareOp::Equal, owner.as_str()));
                        ops.push(TxnOp::delete(k.as_str(), None));
                    }
                }
            }
            if self.client.txn(Txn::new().when(compares).and_then(ops)).await?.succeeded() {
                return Ok(true);
            }
        }
        Err(StoreError::Conflict(kind.name(), name.to_string()))
    }
}

/// Fields a manifest does not own: identity and timestamps, status and the node a pod runs on (the agent's).
fn merge_kept_fields(new: &mut Object, old: Option<&Object>) {
    let Some(old) = old else {
        let m = new.meta_mut();
        m.uid = Some(uid());
        m.creation_timestamp = Some(humantime::format_rfc3339_seconds(SystemTime::now()).to_string());
        return;
    };
    {
        let (om, nm) = (old.meta().clone(), new.meta_mut());
        nm.uid = om.uid;
        nm.creation_timestamp = om.creation_timestamp;
    }
    match (new, old) {
        (Object::Pod(n), Object::Pod(o)) => {
            if n.status.is_none() {
                n.status = o.status.clone();
            }
            if n.spec.node_name.is_none() {
                n.spec.node_name = o.spec.node_name.clone();
            }
        }
        (Object::Node(n), Object::Node(o)) if n.status.is_none() => n.status = o.status.clone(),
        (Object::Service(n), Object::Service(o)) => {
            if n.status.is_none() {
                n.status = o.status.clone();
            }
            // The families and policy the store settled on stay unless the apply says otherwise (as the API
            // server keeps defaulted fields an apply omits).
            if n.spec.ip_family_policy.is_none() {
                n.spec.ip_family_policy = o.spec.ip_family_policy.clone();
            }
            if n.spec.ip_families.is_empty() && n.spec.cluster_ips.is_empty() {
                n.spec.ip_families = o.spec.ip_families.clone();
            }
        }
        _ => {}
    }
}

fn same_content(a: &Object, b: &Object) -> bool {
    let strip = |o: &Object| {
        let mut o = o.clone();
        o.meta_mut().resource_version = None;
        o
    };
    strip(a) == strip(b)
}

fn uid() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}
