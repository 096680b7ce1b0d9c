//! Prometheus text metrics on an HTTP port: syncs, their duration, rules programmed, the last error.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use status_http::Reply;

const BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

#[derive(Debug, Default)]
pub struct Metrics {
    pub syncs: u64,
    pub full_syncs: u64,
    pub errors: u64,
    pub rules: usize,
    pub services: usize,
    pub sets: usize,
    pub set_entries: usize,
    pub last_error: Option<String>,
    buckets: [u64; BUCKETS.len()],
    sum: f64,
}

pub type Shared = Arc<Mutex<Metrics>>;

impl Metrics {
    pub fn observe(&mut self, took: Duration) {
        let s = took.as_secs_f64();
        self.sum += s;
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.buckets[i] += 1;
            }
        }
    }

    pub fn render(&self) -> String {
        let mut o = String::new();
        o += "# TYPE tartan_proxy_sync_total counter\n";
        o += &format!("tartan_proxy_sync_total {}\n", self.syncs);
        o += &format!("tartan_proxy_full_sync_total {}\n", self.full_syncs);
        o += &format!("tartan_proxy_sync_errors_total {}\n", self.errors);
        o += "# TYPE tartan_proxy_sync_duration_seconds histogram\n";
        for (i, b) in BUCKETS.iter().enumerate() {
            o += &format!("tartan_proxy_sync_duration_seconds_bucket{{le=\"{b}\"}} {}\n", self.buckets[i]);
        }
        o += &format!("tartan_proxy_sync_duration_seconds_bucket{{le=\"+Inf\"}} {}\n", self.syncs);
        o += &format!("tartan_proxy_sync_duration_seconds_sum {}\n", self.sum);
        o += &format!("tartan_proxy_sync_duration_seconds_count {}\n", self.syncs);
        o += &format!("tartan_proxy_rules {}\n", self.rules);
        o += &format!("tartan_proxy_service_ports {}\n", self.services);
        o += &format!("tartan_proxy_ipsets {}\n", self.sets);
        o += &format!("tartan_proxy_ipset_entries {}\n", self.set_entries);
        let err = self.last_error.as_deref().unwrap_or("").replace(['"', '\\', '\n'], " ");
        o += &format!("tartan_proxy_last_error{{error=\"{err}\"}} {}\n", u8::from(self.last_error.is_some()));
        o
    }
}

/// Serves /metrics and /healthz until the process ends.
pub async fn serve(addr: std::net::SocketAddr, m: Shared) -> std::io::Result<()> {
    status_http::serve(addr, move |path| match path {
        "/metrics" => Reply::text(200, m.lock().unwrap().render()),
        "/healthz" => Reply::text(200, "ok\n"),
        _ => Reply::text(404, "not found\n"),
    })
    .await
}
