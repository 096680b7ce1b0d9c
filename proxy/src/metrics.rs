//! The proxy's metrics (prometheus-client) and probes. Names are kube-proxy's where kube-proxy has the metric
//! (`kubeproxy_sync_proxy_rules_duration_seconds`, `kubeproxy_network_programming_duration_seconds`, the last
//! sync and last queued timestamps, the pending changes), Tartan's own otherwise (`tartan_proxy_*`). Every series
//! carries the dataplane's `mode`; other labels come from bounded sets (error and repair kinds), never from error
//! text. Health follows kube-proxy: `/healthz` fails when changes have waited on a sync for longer than a bound
//! (or the dataplane thread is gone), `/readyz` answers once the first complete sync is in the kernel.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use proxy_state::{ErrorKind, Held};
use telemetry::Probe;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// What the probes are computed from.
#[derive(Debug)]
struct Health {
    first_sync_done: bool,
    /// Since when changes have waited for a sync that has not succeeded yet.
    pending_since: Option<Instant>,
    dataplane_alive: bool,
}

pub struct Metrics {
    registry: Registry,
    pub syncs: Counter,
    pub full_syncs: Counter,
    pub sync_duration: Histogram,
    pub full_sync_duration: Histogram,
    pub partial_sync_duration: Histogram,
    /// From a store change to the kernel holding it.
    pub programming: Histogram,
    pub last_sync: Gauge<f64, AtomicU64>,
    pub last_queued: Gauge<f64, AtomicU64>,
    pub changes_pending: Gauge,
    pub errors: Family<KindLabel, Counter>,
    pub repairs: Family<KindLabel, Counter>,
    pub entries: Gauge,
    pub sets: Gauge,
    pub set_entries: Gauge,
    pub flows: Gauge,
    pub flows_max: Gauge,
    pub service_ports: Gauge,
    pub programs: Gauge,
    pub bpf_packets: Family<KindLabel, Gauge>,
    pub store_changes: Counter,
    pub invalid_objects: Counter,
    pub store_errors: Counter,
    health: Mutex<Health>,
    /// How long changes may wait before /healthz fails.
    health_bound: Duration,
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

impl Metrics {
    pub fn new(mode: &'static str, health_bound: Duration) -> Metrics {
        let mut root = Registry::default();
        let reg = root.sub_registry_with_label(("mode".into(), mode.into()));
        let hist = || Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let m = Metrics {
            registry: Registry::default(),
            syncs: Counter::default(),
            full_syncs: Counter::default(),
            sync_duration: hist(),
            full_sync_duration: hist(),
            partial_sync_duration: hist(),
            programming: hist(),
            last_sync: Gauge::default(),
            last_queued: Gauge::default(),
            changes_pending: Gauge::default(),
            errors: Family::default(),
            repairs: Family::default(),
            entries: Gauge::default(),
            sets: Gauge::default(),
            set_entries: Gauge::default(),
            flows: Gauge::default(),
            flows_max: Gauge::default(),
            service_ports: Gauge::default(),
            programs: Gauge::default(),
            bpf_packets: Family::default(),
            store_changes: Counter::default(),
            invalid_objects: Counter::default(),
            store_errors: Counter::default(),
            health: Mutex::new(Health { first_sync_done: false, pending_since: None, dataplane_alive: true }),
            health_bound,
        };
        reg.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "How long a sync that wrote to the kernel took",
            m.sync_duration.clone(),
        );
        reg.register(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "How long a full sync took",
            m.full_sync_duration.clone(),
        );
        reg.register(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "How long a partial sync took",
            m.partial_sync_duration.clone(),
        );
        reg.register(
            "kubeproxy_network_programming_duration_seconds",
            "From a change arriving from the cluster store to the kernel holding it",
            m.programming.clone(),
        );
        reg.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "When the last successful sync ended (Unix seconds)",
            m.last_sync.clone(),
        );
        reg.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "When the oldest change not yet synced arrived (Unix seconds)",
            m.last_queued.clone(),
        );
        reg.register(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Services whose changes wait for the next sync",
            m.changes_pending.clone(),
        );
        reg.register("tartan_proxy_sync", "Syncs that wrote to the kernel", m.syncs.clone());
        reg.register("tartan_proxy_full_sync", "Syncs that rewrote everything", m.full_syncs.clone());
        reg.register("tartan_proxy_sync_errors", "Failed syncs, by kind", m.errors.clone());
        reg.register("tartan_proxy_repairs", "Drift found in the kernel and repaired, by kind", m.repairs.clone());
        reg.register(
            "tartan_proxy_dataplane_entries",
            "Rules (iptables) or map entries (eBPF) the dataplane holds",
            m.entries.clone(),
        );
        reg.register("tartan_proxy_sets", "Address sets (ipsets or set maps) held", m.sets.clone());
        reg.register("tartan_proxy_set_entries", "Members of those sets", m.set_entries.clone());
        reg.register(
            "tartan_proxy_conntrack_entries",
            "Flows from outside the node tracked by the eBPF dataplane (counted at full syncs)",
            m.flows.clone(),
        );
        reg.register(
            "tartan_proxy_conntrack_max",
            "The eBPF dataplane's conntrack capacity (--conntrack-max); beyond it the least recently used flow goes",
            m.flows_max.clone(),
        );
        reg.register(
            "tartan_proxy_service_ports",
            "Service ports programmed (one per cluster IP)",
            m.service_ports.clone(),
        );
        reg.register("tartan_proxy_bpf_programs", "eBPF programs attached (ebpf mode)", m.programs.clone());
        reg.register(
            "tartan_proxy_bpf_packets",
            "Packets and connections the eBPF programs counted since their maps were made, by kind (ebpf mode; \
             policy drops, spoofed sources, fast-path deliveries among them)",
            m.bpf_packets.clone(),
        );
        reg.register("tartan_proxy_store_changes", "Changes received from the cluster store", m.store_changes.clone());
        reg.register(
            "tartan_proxy_invalid_objects",
            "Store values skipped as undecodable or invalid",
            m.invalid_objects.clone(),
        );
        reg.register(
            "tartan_proxy_store_errors",
            "Times the cluster store could not be reached",
            m.store_errors.clone(),
        );
        for k in ErrorKind::ALL {
            // Every kind shows from the start (at 0), so that a rate() over it needs no absent-series handling.
            let _ = m.errors.get_or_create(&KindLabel { kind: k.as_str() });
        }
        Metrics { registry: root, ..m }
    }

    pub fn held(&self, h: Held) {
        self.entries.set(h.entries as i64);
        self.sets.set(h.sets as i64);
        self.set_entries.set(h.set_entries as i64);
        self.flows.set(h.flows as i64);
        self.flows_max.set(h.flows_max as i64);
        self.programs.set(h.programs as i64);
        if h.programs > 0 {
            for (kind, n) in ebpf_maps::stats::NAMES.iter().zip(h.counters) {
                self.bpf_packets.get_or_create(&KindLabel { kind }).set(n as i64);
            }
        }
    }

    pub fn sync_ok(&self, wrote: bool, full: bool, took: Duration) {
        if wrote {
            self.syncs.inc();
            self.sync_duration.observe(took.as_secs_f64());
            if full {
                self.full_syncs.inc();
                self.full_sync_duration.observe(took.as_secs_f64());
            } else {
                self.partial_sync_duration.observe(took.as_secs_f64());
            }
        }
        self.last_sync.set(unix_now());
        self.health.lock().unwrap().first_sync_done = true;
    }

    pub fn error(&self, kind: ErrorKind) {
        self.errors.get_or_create(&KindLabel { kind: kind.as_str() }).inc();
    }

    pub fn repaired(&self, kind: &'static str) {
        self.repairs.get_or_create(&KindLabel { kind }).inc();
    }

    /// Since when changes have waited (None: nothing waits), and how many services they touch.
    pub fn pending(&self, since: Option<Instant>, services: usize) {
        let mut h = self.health.lock().unwrap();
        if since.is_some() && h.pending_since.is_none() {
            self.last_queued.set(unix_now());
        }
        h.pending_since = since;
        self.changes_pending.set(services as i64);
    }

    pub fn pending_since(&self) -> Option<Instant> {
        self.health.lock().unwrap().pending_since
    }

    pub fn dataplane_gone(&self) {
        self.health.lock().unwrap().dataplane_alive = false;
    }

    pub fn errors_total(&self) -> u64 {
        ErrorKind::ALL.iter().map(|k| self.errors.get_or_create(&KindLabel { kind: k.as_str() }).get()).sum()
    }

    /// /healthz: Err(why) when unhealthy.
    pub fn healthy(&self) -> Result<(), String> {
        let h = self.health.lock().unwrap();
        if !h.dataplane_alive {
            return Err("the dataplane thread is gone".into());
        }
        match h.pending_since {
            Some(t) if t.elapsed() > self.health_bound => {
                Err(format!("changes have waited {:?} for a successful sync", t.elapsed()))
            }
            _ => Ok(()),
        }
    }
}

impl telemetry::Endpoints for Metrics {
    fn registry(&self) -> &Registry {
        &self.registry
    }

    fn healthz(&self) -> Probe {
        match self.healthy() {
            Ok(()) if self.programs.get() > 0 => {
                Probe::text(true, format!("ok\neBPF programs attached: {}\n", self.programs.get()))
            }
            Ok(()) => Probe::text(true, "ok\n"),
            Err(why) => Probe::text(false, format!("{why}\n")),
        }
    }

    fn readyz(&self) -> Probe {
        if self.health.lock().unwrap().first_sync_done {
            Probe::text(true, "ok\n")
        } else {
            Probe::text(false, "the first sync has not completed\n")
        }
    }
}

pub type Shared = std::sync::Arc<Metrics>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_carries_the_mode_and_kube_proxy_names() {
        let m = Metrics::new("iptables", Duration::from_secs(10));
        m.sync_ok(true, true, Duration::from_millis(3));
        m.error(ErrorKind::Rules);
        m.repaired("canary");
        let text = telemetry::http::exposition(telemetry::Endpoints::registry(&m));
        for want in [
            "tartan_proxy_sync_total{mode=\"iptables\"} 1",
            "tartan_proxy_sync_errors_total{mode=\"iptables\",kind=\"rules\"} 1",
            "tartan_proxy_sync_errors_total{mode=\"iptables\",kind=\"spawn\"} 0",
            "tartan_proxy_repairs_total{mode=\"iptables\",kind=\"canary\"} 1",
            "kubeproxy_sync_proxy_rules_duration_seconds_count{mode=\"iptables\"} 1",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count{mode=\"iptables\"} 1",
        ] {
            assert!(text.lines().any(|l| l == want), "{want} in\n{text}");
        }
        assert_eq!(m.errors_total(), 1);
    }

    #[test]
    fn health_fails_only_when_changes_wait_past_the_bound() {
        let m = Metrics::new("iptables", Duration::from_millis(50));
        assert!(m.healthy().is_ok());
        m.pending(Some(Instant::now() - Duration::from_millis(100)), 1);
        assert!(m.healthy().is_err());
        m.pending(None, 0);
        assert!(m.healthy().is_ok());
        m.dataplane_gone();
        assert_eq!(m.healthy().unwrap_err(), "the dataplane thread is gone");
    }
}
