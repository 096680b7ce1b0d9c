//! The proxy's loop: a snapshot of the store, then a watch; every change marks the state dirty and syncs are
//! coalesced (at most one per --min-sync-period), a full sync runs every --sync-period and whenever the canary
//! chain is gone. A compacted watch re-lists. Stopping leaves the rules in place, so a restart keeps connections.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kube_objects::{Kind, Object};
use store::{Event, Store, Tls};

use crate::metrics::Shared;
use crate::model::service_ports;
use crate::policy::{local_veths, policy_model};
use crate::Dataplane;

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

type Key = (Kind, Option<String>, String);

fn log(msg: impl AsRef<str>) {
    eprintln!("tartan-proxy: {}", msg.as_ref());
}

fn key_of(o: &Object) -> Key {
    (o.kind(), o.meta().namespace.clone(), o.meta().name.clone())
}

pub async fn run(s: Settings, mut dp: Box<dyn Dataplane + Send>, metrics: Shared) -> anyhow::Result<()> {
    let mut last_full = Instant::now() - s.full_sync;
    let mut last_sync = Instant::now() - s.min_sync;
    loop {
        let mut store = match Store::connect(&s.endpoints, &s.prefix, s.tls.as_ref()).await {
            Ok(st) => st,
            Err(e) => {
                log(format!("{e}; retrying"));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // Every (re)connection starts from a fresh listing: whatever was missed is in it.
        let (mut objects, rev): (BTreeMap<Key, Object>, i64) = match store.snapshot().await {
            Ok((objs, rev)) => (objs.into_iter().map(|o| (key_of(&o), o)).collect(), rev),
            Err(e) => {
                log(format!("listing the store: {e}; retrying"));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut dirty = true;
        let mut watch = match store.watch(rev).await {
            Ok(w) => w,
            Err(e) => {
                log(format!("watching the store: {e}; retrying"));
                continue;
            }
        };
        loop {
            // Sync when due; otherwise wait for changes, but not past the next periodic check.
            let now = Instant::now();
            let full_due = now.duration_since(last_full) >= s.full_sync;
            if (dirty && now.duration_since(last_sync) >= s.min_sync) || full_due {
                // Tampering is looked for while idle (below), not on every sync.
                let full = full_due;
                let all: Vec<Object> = objects.values().cloned().collect();
                let ports = service_ports(&all, &s.node);
                let policy = policy_model(&all, &s.node, &local_veths(&s.run_dir));
                let t = Instant::now();
                let res = dp.sync(&ports, &policy, full);
                let took = t.elapsed();
                let mut m = metrics.lock().unwrap();
                m.syncs += 1;
                m.observe(took);
                m.services = ports.len();
                match res {
                    Ok(r) => {
                        m.rules = r.rules;
                        m.sets = r.sets;
                        m.set_entries = r.set_entries;
                        m.full_syncs += u64::from(r.full);
                        m.last_error = None;
                        dirty = false;
                    }
                    Err(e) => {
                        m.errors += 1;
                        m.last_error = Some(format!("{e:#}"));
                        log(format!("sync: {e:#}"));
                    }
                }
                if full {
                    last_full = Instant::now();
                }
                last_sync = Instant::now();
            }
            let wait = if dirty { s.min_sync.saturating_sub(last_sync.elapsed()) } else { Duration::from_secs(1) };
            let next = tokio::time::timeout(wait.max(Duration::from_millis(5)), watch.next()).await;
            let events = match next {
                Err(_) => {
                    // Idle: look for tampering between full syncs.
                    if !dirty && dp.tampered() {
                        log("our rules were removed by someone else; rewriting them");
                        last_full = Instant::now() - s.full_sync;
                    }
                    continue;
                }
                Ok(Err(e)) => {
                    log(format!("watch: {e}; re-listing"));
                    break;
                }
                Ok(Ok(ev)) => ev,
            };
            for ev in events {
                match ev {
                    Event::Put(o) => {
                        objects.insert(key_of(&o), o);
                    }
                    Event::Delete { kind, namespace, name } => {
                        objects.remove(&(kind, namespace, name));
                    }
                    Event::Resync => {}
                }
                dirty = true;
            }
        }
    }
}
