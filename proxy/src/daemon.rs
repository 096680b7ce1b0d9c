//! The proxy's two halves. The follower (async, on the runtime) feeds store updates from the [`Informer`] into the
//! change [`Tracker`]; the dataplane runs on a thread of its own, so that /metrics, /healthz and etcd I/O never
//! wait on a slow iptables-restore. The dataplane thread coalesces changes (at most one sync per
//! --min-sync-period), runs a full sync every --sync-period, checks for drift while idle (every second), and after
//! a failed sync backs off (bounded, jittered) and makes the next sync full. Stopping leaves the kernel state in
//! place, so a restart keeps connections.

use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use proxy_state::policy::local_veths;
use proxy_state::{Dataplane, Tracker};
use store::{Event, Informer, Tls, Update};

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

fn log(msg: impl AsRef<str>) {
    eprintln!("tartan-proxy: {}", msg.as_ref());
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
    {
        let (shared, metrics) = (shared.clone(), metrics.clone());
        let (run_dir, min_sync, full_sync) = (s.run_dir.clone(), s.min_sync, s.full_sync);
        std::thread::Builder::new().name("dataplane".into()).spawn(move || {
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                dataplane_loop(dp, &shared, &metrics, wake, &run_dir, min_sync, full_sync)
            }));
            // Only a panic ends the loop: this process must not carry on as if its rules were kept up to date.
            // Exit non-zero so that the node's supervisor (a DaemonSet) restarts it; the kernel keeps its state.
            if let Ok(mut m) = metrics.lock() {
                m.dataplane_alive = false;
            }
            log(format!("the dataplane thread stopped ({}); exiting", if ran.is_err() { "panic" } else { "closed" }));
            std::process::exit(1);
        })?;
    }
    let mut informer = Informer::new(&s.endpoints, &s.prefix, s.tls.clone());
    loop {
        let update = informer.next().await;
        let mut f = shared.lock().unwrap();
        match update {
            Update::Reset(objects) => f.tracker.reset(objects),
            Update::Changes(events) => {
                for ev in events {
                    match ev {
                        Event::Put(o) => f.tracker.upsert(o),
                        Event::Delete { kind, namespace, name } => f.tracker.remove(kind, namespace.as_deref(), &name),
                        Event::Resync | Event::Invalid { .. } => {}
                    }
                }
            }
            Update::Invalid { key, reason } => {
                log(format!("skipping {key}: {reason}"));
                metrics.lock().unwrap().invalid_objects += 1;
                continue;
            }
            Update::Unavailable { error, retry_in } => {
                log(format!("cluster store: {error}; retrying in {retry_in:?} (the kernel keeps what it holds)"));
                metrics.lock().unwrap().store_errors += 1;
                continue;
            }
        }
        if f.tracker.pending() && f.since.is_none() {
            f.since = Some(Instant::now());
            metrics.lock().unwrap().pending_since = f.since;
        }
        drop(f);
        let _ = poke.send(());
    }
}

fn dataplane_loop(
    mut dp: Box<dyn Dataplane>,
    shared: &Mutex<Follower>,
    metrics: &Shared,
    wake: mpsc::Receiver<()>,
    run_dir: &std::path::Path,
    min_sync: Duration,
    full_sync: Duration,
) {
    let mut next_full = Instant::now();
    let mut last_sync: Option<Instant> = None;
    let mut failures = 0u32;
    let mut retry_at: Option<Instant> = None;
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
        let mut m = metrics.lock().unwrap();
        m.services = state.services.len();
        match res {
            Ok(r) => {
                if r.wrote {
                    m.syncs += 1;
                    m.sync_duration.observe(took);
                    m.full_syncs += u64::from(r.full);
                    last_sync = Some(Instant::now());
                }
                if let Some(kind) = r.repaired {
                    log(format!("{kind}: the kernel no longer held what was written; rewrote everything"));
                    *m.repairs.entry(kind).or_default() += 1;
                }
                if r.full {
                    next_full = Instant::now() + full_sync;
                }
                m.held = r.held;
                m.last_success = Some(SystemTime::now());
                m.first_sync_done = true;
                failures = 0;
                retry_at = None;
                let mut f = shared.lock().unwrap();
                // Changes that arrived during the sync are still pending; their clock keeps running.
                if let Some(t) = since.filter(|_| r.wrote) {
                    m.programming.observe(t.elapsed());
                }
                // Changes that arrived during the sync wait for the next one; their clock starts about now.
                f.since = f.tracker.pending().then(Instant::now);
                m.pending_since = f.since;
            }
            Err(e) => {
                failures += 1;
                let wait = store::backoff(failures, MAX_BACKOFF);
                retry_at = Some(Instant::now() + wait);
                *m.errors.entry(e.kind).or_default() += 1;
                // Changes wait; so does what this sync was to bring.
                m.pending_since = m.pending_since.or(since).or(Some(started));
                shared.lock().unwrap().since = m.pending_since;
                log(format!("sync failed ({}): {e}; the next sync, in {wait:?}, is full", e.kind.as_str()));
            }
        }
    }
}
