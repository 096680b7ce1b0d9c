//! The proxy's two halves. The follower (async, on the runtime) feeds store updates from the [`Informer`] into the
//! change [`Tracker`]; the dataplane runs on a thread of its own, so that /metrics, /healthz and etcd I/O never
//! wait on a slow iptables-restore. The dataplane thread coalesces changes (at most one sync per
//! --min-sync-period), runs a full sync every --sync-period, checks for drift while idle (every second), and after
//! a failed sync backs off (bounded, jittered) and makes the next sync full. Stopping leaves the kernel state in
//! place, so a restart keeps connections. After each successful sync the dataplane thread also hands the load
//! balancers' health check ports to the [`HealthCheckServer`], whose listeners run on the runtime.

use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proxy_state::policy::local_veths;
use proxy_state::{Dataplane, Tracker};
use store::{Event, Informer, Tls, Update};
use tracing::{debug, error, info, warn};

use crate::health_check::{self, HealthCheckServer};
use crate::metrics::Shared;

pub struct Settings {
    pub endpoints: String,
    pub prefix: String,
    pub tls: Option<Tls>,
    pub node: String,
    /// Where the CNI plugin records the node's pods (their host-side veths, for policy).
    pub run_dir: PathBuf,
    pub min_sync: Duration,
    pub full_sync: Duration,
}

/// What the follower and the dataplane thread share.
struct Follower {
    tracker: Tracker,
    /// When the oldest change not yet in the kernel arrived.
    since: Option<Instant>,
}

/// How long the dataplane waits when nothing happens: the idle drift check's period.
const IDLE: Duration = Duration::from_secs(1);
/// The longest backoff after failed syncs.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

pub async fn run(s: Settings, dp: Box<dyn Dataplane>, metrics: Shared) -> anyhow::Result<()> {
    let shared = Arc::new(Mutex::new(Follower { tracker: Tracker::new(&s.node), since: None }));
    let (poke, wake) = mpsc::channel::<()>();
    // kube-proxy's serviceProxyHealthy: a node whose changes do not reach the kernel fails its health checks too.
    let mut health_checks = {
        let metrics = metrics.clone();
        HealthCheckServer::new(tokio::runtime::Handle::current(), move || metrics.healthy().is_ok())
    };
    {
        let (shared, metrics) = (shared.clone(), metrics.clone());
        let (run_dir, min_sync, full_sync) = (s.run_dir.clone(), s.min_sync, s.full_sync);
        std::thread::Builder::new().name("dataplane".into()).spawn(move || {
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                dataplane_loop(dp, &shared, &metrics, &mut health_checks, wake, &run_dir, min_sync, full_sync)
            }));
            // Only a panic ends the loop: this process must not carry on as if its rules were kept up to date.
            // Exit non-zero so that the node's supervisor (a DaemonSet) restarts it; the kernel keeps its state.
            metrics.dataplane_gone();
            error!(cause = if ran.is_err() { "panic" } else { "closed" }, "the dataplane thread stopped; exiting");
            std::process::exit(1);
        })?;
    }
    let mut informer = Informer::new(&s.endpoints, &s.prefix, s.tls.clone());
    loop {
        let update = informer.next().await;
        let mut f = shared.lock().unwrap();
        match update {
            Update::Reset(objects) => {
                info!(objects = objects.len(), "listed the cluster store");
                metrics.store_changes.inc_by(objects.len() as u64);
                f.tracker.reset(objects)
            }
            Update::Changes(events) => {
                metrics.store_changes.inc_by(events.len() as u64);
                for ev in events {
                    trace_event(&ev);
                    match ev {
                        Event::Put(o) => f.tracker.upsert(o),
                        Event::Delete { kind, namespace, name } => f.tracker.remove(kind, namespace.as_deref(), &name),
                        Event::Resync | Event::Invalid { .. } => {}
                    }
                }
            }
            Update::Invalid { key, reason } => {
                warn!(%key, %reason, "skipping an invalid object");
                metrics.invalid_objects.inc();
                continue;
            }
            Update::Unavailable { error, retry_in } => {
                warn!(%error, ?retry_in, "cluster store unavailable; the kernel keeps what it holds");
                metrics.store_errors.inc();
                continue;
            }
        }
        if f.tracker.pending() && f.since.is_none() {
            f.since = Some(Instant::now());
        }
        metrics.pending(f.since, f.tracker.pending_services());
        drop(f);
        let _ = poke.send(());
    }
}

#[allow(clippy::too_many_arguments)]
fn dataplane_loop(
    mut dp: Box<dyn Dataplane>,
    shared: &Mutex<Follower>,
    metrics: &Shared,
    health_checks: &mut HealthCheckServer,
    wake: mpsc::Receiver<()>,
    run_dir: &std::path::Path,
    min_sync: Duration,
    full_sync: Duration,
) {
    let mut next_full = Instant::now();
    let mut last_sync: Option<Instant> = None;
    let mut failures = 0u32;
    let mut retry_at: Option<Instant> = None;
    // The generation the health check ports were last computed from.
    let mut health_checked: Option<u64> = None;
    loop {
        match wake.recv_timeout(IDLE) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        // Coalesce: whatever else arrives within --min-sync-period goes into the same sync.
        if let Some(wait) = last_sync.map(|t| min_sync.saturating_sub(t.elapsed())).filter(|w| !w.is_zero()) {
            std::thread::sleep(wait);
        }
        while wake.try_recv().is_ok() {}
        if retry_at.is_some_and(|t| Instant::now() < t) {
            continue;
        }
        let veths = local_veths(run_dir);
        let (state, since) = {
            let mut f = shared.lock().unwrap();
            f.tracker.set_veths(veths);
            let since = if f.tracker.pending() { f.since.or(Some(Instant::now())) } else { f.since };
            (f.tracker.state(), since)
        };
        let full = Instant::now() >= next_full || failures > 0;
        let started = Instant::now();
        let res = dp.sync(&state, full);
        let took = started.elapsed();
        metrics.service_ports.set(state.services.len() as i64);
        match res {
            Ok(r) => {
                metrics.sync_ok(r.wrote, r.full, took);
                if r.wrote {
                    last_sync = Some(Instant::now());
                    debug!(
                        generation = state.generation,
                        full = r.full,
                        service_ports = state.services.len(),
                        entries = r.held.entries,
                        took_ms = took.as_millis() as u64,
                        "synced"
                    );
                }
                if let Some(kind) = r.repaired {
                    warn!(kind, "the kernel no longer held what was written; rewrote everything");
                    metrics.repaired(kind);
                }
                if r.full {
                    next_full = Instant::now() + full_sync;
                }
                metrics.held(r.held);
                failures = 0;
                retry_at = None;
                // As kube-proxy: the ports follow what the kernel now holds. A port that could not be bound is
                // retried at the next idle check even when nothing changed.
                if health_checked != Some(state.generation) || health_checks.failing() {
                    health_checks.update(health_check::desired(&state.services));
                    health_checked = Some(state.generation);
                }
                let mut f = shared.lock().unwrap();
                if let Some(t) = since.filter(|_| r.wrote) {
                    metrics.programming.observe(t.elapsed().as_secs_f64());
                }
                // Changes that arrived during the sync wait for the next one; their clock starts about now.
                f.since = f.tracker.pending().then(Instant::now);
                metrics.pending(f.since, f.tracker.pending_services());
            }
            Err(e) => {
                failures += 1;
                let wait = store::backoff(failures, MAX_BACKOFF);
                retry_at = Some(Instant::now() + wait);
                metrics.error(e.kind);
                // Changes wait; so does what this sync was to bring.
                let mut f = shared.lock().unwrap();
                let waiting = metrics.pending_since().or(since).or(Some(started));
                f.since = waiting;
                metrics.pending(waiting, f.tracker.pending_services().max(1));
                error!(kind = e.kind.as_str(), error = %e, retry_in = ?wait, "sync failed; the next sync is full");
            }
        }
    }
}

/// Each change at trace level, with the object's identity as fields.
fn trace_event(ev: &Event) {
    match ev {
        Event::Put(o) => {
            let m = o.meta();
            tracing::trace!(kind = ?o.kind(), namespace = m.namespace.as_deref().unwrap_or(""), name = %m.name, "put");
        }
        Event::Delete { kind, namespace, name } => {
            tracing::trace!(?kind, namespace = namespace.as_deref().unwrap_or(""), %name, "delete")
        }
        Event::Resync | Event::Invalid { .. } => {}
    }
}
