//! One list+watch client for every follower of the store (the proxy, the agent): a snapshot, then a watch from its
//! revision; a compacted watch re-lists; a lost connection reconnects with bounded, jittered backoff; a value that
//! is not a valid object is reported (naming its key) and skipped, never fatal. Callers see a stream of
//! [`Update`]s and never handle a store error themselves.

use std::collections::VecDeque;
use std::time::Duration;

use kube_objects::Object;
use rand::Rng;

use crate::{Event, Store, Tls, Watcher};

/// What a follower is told.
#[derive(Debug)]
pub enum Update {
    /// A fresh listing (first, or after a compacted watch or a reconnection): replace everything with it.
    Reset(Vec<Object>),
    /// Changes since the last update.
    Changes(Vec<Event>),
    /// A value under the prefix that is not a valid object: skipped (a follower keeps what it had for that key).
    Invalid { key: String, reason: String },
    /// The store could not be reached or answered with an error; the informer tries again after `retry_in`.
    Unavailable { error: String, retry_in: Duration },
}

/// The longest wait between two attempts to reach the store: short, because a follower that waits longer than
/// etcd's outage delays every change made after it.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

pub struct Informer {
    endpoints: String,
    prefix: String,
    tls: Option<Tls>,
    store: Option<Store>,
    watch: Option<Watcher>,
    queued: VecDeque<Update>,
    failures: u32,
    /// How long to wait before the next attempt, after a failure.
    wait: Option<Duration>,
}

/// Bounded exponential backoff with jitter: 200 ms doubling up to `max`, each between half and all of that, so
/// that every node of a cluster does not retry in step after an etcd outage.
pub fn backoff(failures: u32, max: Duration) -> Duration {
    let base = Duration::from_millis(200).saturating_mul(1 << failures.min(10)).min(max);
    base.mul_f64(rand::rng().random_range(0.5..=1.0))
}

impl Informer {
    pub fn new(endpoints: &str, prefix: &str, tls: Option<Tls>) -> Informer {
        Informer {
            endpoints: endpoints.to_string(),
            prefix: prefix.to_string(),
            tls,
            store: None,
            watch: None,
            queued: VecDeque::new(),
            failures: 0,
            wait: None,
        }
    }

    fn fail(&mut self, error: String) -> Update {
        self.watch = None;
        self.store = None;
        self.failures += 1;
        let retry_in = backoff(self.failures, MAX_BACKOFF);
        self.wait = Some(retry_in);
        Update::Unavailable { error, retry_in }
    }

    /// The next update. Never fails: trouble is reported as [`Update::Unavailable`] (after which it waits out the
    /// backoff itself) or [`Update::Invalid`].
    pub async fn next(&mut self) -> Update {
        if let Some(u) = self.queued.pop_front() {
            return u;
        }
        if let Some(wait) = self.wait.take() {
            tokio::time::sleep(wait).await;
        }
        if self.store.is_none() {
            match Store::connect(&self.endpoints, &self.prefix, self.tls.as_ref()).await {
                Ok(s) => self.store = Some(s),
                Err(e) => return self.fail(e.to_string()),
            }
        }
        let Some(store) = self.store.as_mut() else { unreachable!("connected above") };
        if self.watch.is_none() {
            // Every (re)connection starts from a fresh listing: whatever was missed is in it.
            let (objects, bad, rev) = match store.snapshot_checked().await {
                Ok(s) => s,
                Err(e) => return self.fail(format!("listing the store: {e}")),
            };
            match store.watch(rev).await {
                Ok(w) => self.watch = Some(w),
                Err(e) => return self.fail(format!("watching the store: {e}")),
            }
            self.failures = 0;
            self.queued.extend(bad.into_iter().map(|(key, reason)| Update::Invalid { key, reason }));
            return Update::Reset(objects);
        }
        let Some(watch) = self.watch.as_mut() else { unreachable!("watching above") };
        match watch.next().await {
            Ok(events) => {
                if events.contains(&Event::Resync) {
                    // Compacted: the next call re-lists.
                    self.watch = None;
                }
                let mut changes = Vec::new();
                for ev in events {
                    match ev {
                        Event::Invalid { key, reason } => self.queued.push_back(Update::Invalid { key, reason }),
                        Event::Resync => {}
                        ev => changes.push(ev),
                    }
                }
                if changes.is_empty() {
                    return match self.queued.pop_front() {
                        Some(u) => u,
                        None => Update::Changes(Vec::new()),
                    };
                }
                Update::Changes(changes)
            }
            Err(e) => self.fail(format!("watch: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_bounded_and_jittered() {
        let max = Duration::from_secs(5);
        for f in 0..40 {
            let b = backoff(f, max);
            assert!(b <= max, "{f}: {b:?}");
            assert!(b >= Duration::from_millis(100), "{f}: {b:?}");
        }
        assert!(backoff(12, max) >= Duration::from_millis(2500));
        let samples: std::collections::BTreeSet<Duration> = (0..20).map(|_| backoff(5, max)).collect();
        assert!(samples.len() > 1, "jittered");
    }
}
