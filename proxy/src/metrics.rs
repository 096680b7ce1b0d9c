//! Prometheus text metrics and health on an HTTP port. Labels come from bounded sets (the dataplane's mode, an
//! error or repair kind), never from error text. Health follows kube-proxy: `/healthz` fails when changes have
//! waited on a sync for longer than a bound (or the dataplane thread is gone), `/readyz` answers once the first
//! complete sync is in the kernel.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use proxy_state::{ErrorKind, Held};
use status_http::Reply;

const BUCKETS: [f64; 12] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 30.0];

#[derive(Debug, Default, Clone)]
pub struct Histogram {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        self.sum += s;
        self.count += 1;
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.buckets[i] += 1;
            }
        }
    }

    fn render(&self, o: &mut String, name: &str, labels: &str) {
        *o += &format!("# TYPE {name} histogram\n");
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in BUCKETS.iter().enumerate() {
            *o += &format!("{name}_bucket{{{labels}{sep}le=\"{b}\"}} {}\n", self.buckets[i]);
        }
        *o += &format!("{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}\n", self.count);
        let l = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        *o += &format!("{name}_sum{l} {}\n{name}_count{l} {}\n", self.sum, self.count);
    }
}

#[derive(Debug)]
pub struct Metrics {
    pub mode: &'static str,
    pub syncs: u64,
    pub full_syncs: u64,
    pub errors: BTreeMap<ErrorKind, u64>,
    pub repairs: BTreeMap<&'static str, u64>,
    pub held: Held,
    pub services: usize,
    pub sync_duration: Histogram,
    /// From a store change to the kernel holding it (kube-proxy's network_programming_duration_seconds).
    pub programming: Histogram,
    pub last_success: Option<SystemTime>,
    pub first_sync_done: bool,
    /// Since when changes have waited for a sync that has not succeeded yet.
    pub pending_since: Option<Instant>,
    pub invalid_objects: u64,
    pub store_errors: u64,
    pub dataplane_alive: bool,
    /// How long changes may wait before /healthz fails.
    pub health_bound: Duration,
}

impl Metrics {
    pub fn new(mode: &'static str, health_bound: Duration) -> Metrics {
        Metrics {
            mode,
            syncs: 0,
            full_syncs: 0,
            errors: ErrorKind::ALL.iter().map(|k| (*k, 0)).collect(),
            repairs: BTreeMap::new(),
            held: Held::default(),
            services: 0,
            sync_duration: Histogram::default(),
            programming: Histogram::default(),
            last_success: None,
            first_sync_done: false,
            pending_since: None,
            invalid_objects: 0,
            store_errors: 0,
            dataplane_alive: true,
            health_bound,
        }
    }

    pub fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn render(&self) -> String {
        let mut o = String::new();
        let mode = format!("mode=\"{}\"", self.mode);
        let counter = |o: &mut String, name: &str, v: u64| {
            *o += &format!("# TYPE {name} counter\n{name} {v}\n");
        };
        let gauge = |o: &mut String, name: &str, v: f64| {
            *o += &format!("# TYPE {name} gauge\n{name} {v}\n");
        };
        counter(&mut o, "tartan_proxy_sync_total", self.syncs);
        counter(&mut o, "tartan_proxy_full_sync_total", self.full_syncs);
        counter(&mut o, "tartan_proxy_sync_errors_total", self.errors_total());
        o += "# TYPE tartan_proxy_sync_errors_by_kind_total counter\n";
        for (k, v) in &self.errors {
            o += &format!("tartan_proxy_sync_errors_by_kind_total{{{mode},kind=\"{}\"}} {v}\n", k.as_str());
        }
        o += "# TYPE tartan_proxy_repairs_total counter\n";
        for (k, v) in &self.repairs {
            o += &format!("tartan_proxy_repairs_total{{{mode},kind=\"{k}\"}} {v}\n");
        }
        self.sync_duration.render(&mut o, "tartan_proxy_sync_duration_seconds", "");
        self.programming.render(&mut o, "tartan_proxy_network_programming_duration_seconds", "");
        let last = self.last_success.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok());
        gauge(&mut o, "tartan_proxy_last_successful_sync_timestamp_seconds", last.map_or(0.0, |d| d.as_secs_f64()));
        gauge(&mut o, "tartan_proxy_rules", self.held.entries as f64);
        gauge(&mut o, "tartan_proxy_service_ports", self.services as f64);
        gauge(&mut o, "tartan_proxy_ipsets", self.held.sets as f64);
        gauge(&mut o, "tartan_proxy_ipset_entries", self.held.set_entries as f64);
        gauge(&mut o, "tartan_proxy_sync_pending", f64::from(u8::from(self.pending_since.is_some())));
        counter(&mut o, "tartan_proxy_invalid_objects_total", self.invalid_objects);
        counter(&mut o, "tartan_proxy_store_errors_total", self.store_errors);
        o
    }

    /// /healthz: Err(why) when unhealthy.
    pub fn healthy(&self) -> Result<(), String> {
        if !self.dataplane_alive {
            return Err("the dataplane thread is gone".into());
        }
        match self.pending_since {
            Some(t) if t.elapsed() > self.health_bound => {
                Err(format!("changes have waited {:?} for a successful sync", t.elapsed()))
            }
            _ => Ok(()),
        }
    }
}

pub type Shared = Arc<Mutex<Metrics>>;

/// Serves /metrics, /healthz and /readyz until the process ends.
pub async fn serve(addr: std::net::SocketAddr, m: Shared) -> std::io::Result<()> {
    status_http::serve(addr, move |path| {
        let m = m.lock().unwrap();
        match path {
            "/metrics" => Reply::text(200, m.render()),
            "/healthz" => match m.healthy() {
                Ok(()) => Reply::text(200, "ok\n"),
                Err(why) => Reply::text(503, format!("{why}\n")),
            },
            "/readyz" if m.first_sync_done => Reply::text(200, "ok\n"),
            "/readyz" => Reply::text(503, "the first sync has not completed\n"),
            _ => Reply::text(404, "not found\n"),
        }
    })
    .await
}
