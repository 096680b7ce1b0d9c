//! The one list+watch loop of every follower of etcd (the proxy's store informer, the agent's lease follower): a
//! paged listing of a prefix, then a watch from its revision; a compacted or cancelled watch re-lists; a lost
//! connection reconnects (to whichever member answers) with bounded, jittered backoff. Callers decode what they
//! get and never handle a connection themselves.

use std::time::Duration;

use etcd_client::{EventType, WatchOptions, WatchStream};

use crate::{backoff, Etcd, Tls};

/// The longest wait between two attempts to reach etcd: short, because a follower that waits longer than etcd's
/// outage delays every change made after it.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// One key and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawEvent {
    Put(Kv),
    Delete(String),
}

/// What a follower is told.
#[derive(Debug)]
pub enum Raw {
    /// Everything under the prefix (first, and after a compacted watch or a reconnection): replace what you had.
    Reset(Vec<Kv>),
    /// Changes since the last update, in order.
    Events(Vec<RawEvent>),
    /// etcd could not be reached or answered with an error; the next call waits `retry_in` and tries again.
    Unavailable { error: String, retry_in: Duration },
}

pub struct Follower {
    endpoints: String,
    tls: Option<Tls>,
    prefix: String,
    etcd: Option<Etcd>,
    watch: Option<WatchStream>,
    failures: u32,
    /// How long to wait before the next attempt, after a failure.
    wait: Option<Duration>,
}

impl Follower {
    /// Follows every key under `prefix` (ending in '/').
    pub fn new(endpoints: &str, prefix: &str, tls: Option<Tls>) -> Follower {
        Follower {
            endpoints: endpoints.to_string(),
            tls,
            prefix: prefix.to_string(),
            etcd: None,
            watch: None,
            failures: 0,
            wait: None,
        }
    }

    fn fail(&mut self, error: String) -> Raw {
        self.watch = None;
        self.etcd = None;
        self.failures += 1;
        let retry_in = backoff(self.failures, MAX_BACKOFF);
        self.wait = Some(retry_in);
        Raw::Unavailable { error, retry_in }
    }

    /// The next update. Never fails: trouble is reported as [`Raw::Unavailable`], after which it waits out the
    /// backoff itself.
    pub async fn next(&mut self) -> Raw {
        if let Some(wait) = self.wait.take() {
            tokio::time::sleep(wait).await;
        }
        loop {
            if self.etcd.is_none() {
                match Etcd::connect(&self.endpoints, self.tls.as_ref()).await {
                    Ok(e) => self.etcd = Some(e),
                    Err(e) => return self.fail(e.to_string()),
                }
            }
            let etcd = self.etcd.as_mut().expect("connected above");
            if self.watch.is_none() {
                // Every (re)connection starts from a fresh listing: whatever was missed is in it.
                let (kvs, rev) = match etcd.get_all(&self.prefix).await {
                    Ok(l) => l,
                    Err(e) => return self.fail(format!("listing {}: {e}", self.prefix)),
                };
                let opts = WatchOptions::new().with_prefix().with_start_revision(rev + 1);
                match etcd.watch(self.prefix.as_str(), Some(opts)).await {
                    Ok(w) => self.watch = Some(w),
                    Err(e) => return self.fail(format!("watching {}: {e}", self.prefix)),
                }
                self.failures = 0;
                let kvs = kvs
                    .iter()
                    .map(|kv| Kv {
                        key: String::from_utf8_lossy(kv.key()).into_owned(),
                        value: kv.value().to_vec(),
                        mod_revision: kv.mod_revision(),
                    })
                    .collect();
                return Raw::Reset(kvs);
            }
            let watch = self.watch.as_mut().expect("watching above");
            let resp = match watch.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return self.fail("the watch stream ended".into()),
                Err(e) => return self.fail(format!("watch: {e}")),
            };
            if resp.compact_revision() > 0 || resp.canceled() {
                // The revision we resume from is gone: list again (same connection).
                self.watch = None;
                continue;
            }
            let events: Vec<RawEvent> = resp
                .events()
                .iter()
                .filter_map(|ev| {
                    let kv = ev.kv()?;
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    Some(match ev.event_type() {
                        EventType::Put => {
                            RawEvent::Put(Kv { key, value: kv.value().to_vec(), mod_revision: kv.mod_revision() })
                        }
                        EventType::Delete => RawEvent::Delete(key),
                    })
                })
                .collect();
            // The creation acknowledgement and progress notifications carry no events.
            if !events.is_empty() {
                return Raw::Events(events);
            }
        }
    }
}
