//! The agent's metrics (prometheus-client) and probes. flanneld exposes none beyond /healthz; these are what an
//! operator watching a node's network wants: leases held and seen, routes, neighbours and FDB entries programmed,
//! reconciles (count, duration, errors), drift repaired by kind, etcd errors by operation, lease renewals and
//! subnet.env writes. Health follows kube-proxy's rule for the reconcile loop: `/healthz` fails when the kernel
//! has differed from the leases (a change not yet applied, or reconciles failing) for longer than a bound, or when
//! the dataplane thread is gone; `/readyz` answers once the first reconcile is in the kernel and subnet.env is
//! written.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use telemetry::Probe;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

/// Kernel objects the dataplane writes, for the per-kind series.
pub const OBJECT_KINDS: [&str; 5] = ["device", "neighbour", "fdb", "route", "rules"];
/// The etcd operations whose failures are counted.
pub const ETCD_OPS: [&str; 6] = ["connect", "config", "acquire", "list", "renew", "follow"];

/// What /healthz and /readyz report.
#[derive(Debug, Default, Clone)]
pub struct Health {
    pub ready: bool,
    pub lease: Option<String>,
    pub unreachable: Vec<String>,
    pub last_error: Option<String>,
    /// The dataplane thread is gone (the process is about to exit).
    pub dataplane_dead: bool,
    /// Since when the kernel has not held what the leases ask for.
    pub pending_since: Option<Instant>,
}

pub struct Status {
    registry: Registry,
    pub leases_held: Gauge,
    pub leases_seen: Gauge,
    pub routes: Gauge,
    pub neighbours: Gauge,
    pub fdb_entries: Gauge,
    pub reconciles: Counter,
    pub reconcile_errors: Counter,
    pub reconcile_duration: Histogram,
    pub last_reconcile: Gauge<f64, AtomicU64>,
    pub kernel_writes: Family<KindLabel, Counter>,
    pub repairs: Family<KindLabel, Counter>,
    pub etcd_errors: Family<OpLabel, Counter>,
    pub lease_renewals: Counter,
    pub subnet_env_writes: Counter,
    pub health: Mutex<Health>,
    /// How long the kernel may lag the leases before /healthz fails.
    pub bound: Duration,
}

impl Status {
    pub fn new(bound: Duration) -> Status {
        let mut registry = Registry::default();
        let s = Status {
            registry: Registry::default(),
            leases_held: Gauge::default(),
            leases_seen: Gauge::default(),
            routes: Gauge::default(),
            neighbours: Gauge::default(),
            fdb_entries: Gauge::default(),
            reconciles: Counter::default(),
            reconcile_errors: Counter::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            last_reconcile: Gauge::default(),
            kernel_writes: Family::default(),
            repairs: Family::default(),
            etcd_errors: Family::default(),
            lease_renewals: Counter::default(),
            subnet_env_writes: Counter::default(),
            health: Mutex::new(Health::default()),
            bound,
        };
        let r = &mut registry;
        r.register("tartan_agent_leases_held", "Subnet leases this node holds", s.leases_held.clone());
        r.register(
            "tartan_agent_leases_seen",
            "Subnet leases in the network, this node's included",
            s.leases_seen.clone(),
        );
        r.register("tartan_agent_routes", "Routes to other nodes' subnets programmed", s.routes.clone());
        r.register("tartan_agent_neighbours", "Permanent neighbours (VTEP gateways) programmed", s.neighbours.clone());
        r.register("tartan_agent_fdb_entries", "VXLAN FDB entries programmed", s.fdb_entries.clone());
        r.register("tartan_agent_reconciles", "Reconciles of the kernel with the leases", s.reconciles.clone());
        r.register("tartan_agent_reconcile_errors", "Reconciles that failed", s.reconcile_errors.clone());
        r.register(
            "tartan_agent_reconcile_duration_seconds",
            "How long a reconcile took",
            s.reconcile_duration.clone(),
        );
        r.register(
            "tartan_agent_last_reconcile_timestamp_seconds",
            "When the last successful reconcile ended (Unix seconds)",
            s.last_reconcile.clone(),
        );
        r.register("tartan_agent_kernel_writes", "Kernel objects written or removed, by kind", s.kernel_writes.clone());
        r.register(
            "tartan_agent_repairs",
            "Kernel objects found missing or wrong by a resync and rewritten, by kind",
            s.repairs.clone(),
        );
        r.register("tartan_agent_etcd_errors", "Failed etcd operations, by operation", s.etcd_errors.clone());
        r.register("tartan_agent_lease_renewals", "Successful lease renewals", s.lease_renewals.clone());
        r.register("tartan_agent_subnet_env_writes", "Times subnet.env was written", s.subnet_env_writes.clone());
        // Every label value shows from the start, at 0.
        for kind in OBJECT_KINDS {
            let _ = s.kernel_writes.get_or_create(&KindLabel { kind });
            let _ = s.repairs.get_or_create(&KindLabel { kind });
        }
        for op in ETCD_OPS {
            let _ = s.etcd_errors.get_or_create(&OpLabel { op });
        }
        Status { registry, ..s }
    }

    pub fn etcd_error(&self, op: &'static str) {
        self.etcd_errors.get_or_create(&OpLabel { op }).inc();
    }

    pub fn repaired(&self, kind: &'static str, n: usize) {
        self.repairs.get_or_create(&KindLabel { kind }).inc_by(n as u64);
    }

    pub fn wrote(&self, kind: &'static str, n: usize) {
        self.kernel_writes.get_or_create(&KindLabel { kind }).inc_by(n as u64);
    }

    /// A change for the kernel is queued (or a reconcile failed): the lag clock starts unless it runs already.
    pub fn lagging(&self) {
        let mut h = self.health.lock().unwrap();
        h.pending_since.get_or_insert_with(Instant::now);
    }

    /// A reconcile succeeded in `took`.
    pub fn reconciled(&self, took: Duration) {
        self.reconciles.inc();
        self.reconcile_duration.observe(took.as_secs_f64());
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        self.last_reconcile.set(now);
        self.health.lock().unwrap().pending_since = None;
    }

    /// /healthz: Err(why) when unhealthy.
    pub fn healthy(&self) -> Result<(), String> {
        let h = self.health.lock().unwrap();
        if h.dataplane_dead {
            return Err("the dataplane thread is gone".into());
        }
        match h.pending_since {
            Some(t) if t.elapsed() > self.bound => Err(format!(
                "the kernel has not held what the leases ask for in {:?}{}",
                t.elapsed(),
                h.last_error.as_deref().map(|e| format!(" (last error: {e})")).unwrap_or_default()
            )),
            _ => Ok(()),
        }
    }
}

impl telemetry::Endpoints for Status {
    fn registry(&self) -> &Registry {
        &self.registry
    }

    fn healthz(&self) -> Probe {
        let verdict = self.healthy();
        let h = self.health.lock().unwrap().clone();
        Probe::json(
            verdict.is_ok(),
            serde_json::json!({
                "healthy": verdict.is_ok(),
                "reason": verdict.err(),
                "ready": h.ready,
                "lease": h.lease,
                "unreachable": h.unreachable,
                "lastError": h.last_error,
                "dataplaneAlive": !h.dataplane_dead,
            }),
        )
    }

    fn readyz(&self) -> Probe {
        let h = self.health.lock().unwrap();
        if h.ready {
            Probe::json(true, serde_json::json!({"ready": true}))
        } else {
            Probe::json(false, serde_json::json!({"ready": false, "lastError": h.last_error}))
        }
    }
}

pub type Shared = std::sync::Arc<Status>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_the_lag_of_the_kernel_behind_the_leases() {
        let s = Status::new(Duration::from_millis(30));
        assert!(s.healthy().is_ok());
        s.lagging();
        assert!(s.healthy().is_ok(), "within the bound");
        s.health.lock().unwrap().pending_since = Some(Instant::now() - Duration::from_millis(60));
        s.health.lock().unwrap().last_error = Some("flannel.1 is missing".into());
        let why = s.healthy().unwrap_err();
        assert!(why.contains("(last error: flannel.1 is missing)"), "{why}");
        s.reconciled(Duration::from_millis(1));
        assert!(s.healthy().is_ok());
        let text = telemetry::http::exposition(telemetry::Endpoints::registry(&s));
        assert!(text.lines().any(|l| l == "tartan_agent_reconciles_total 1"), "{text}");
        assert!(text.lines().any(|l| l == "tartan_agent_repairs_total{kind=\"route\"} 0"), "{text}");
    }
}
