//! The store informer: the cluster's objects for a follower (the proxy), on the one list+watch loop
//! ([`Follower`]). A value that is not a valid object is reported (naming its key) and skipped, never fatal;
//! callers see a stream of [`Update`]s and never handle a store error themselves.

use std::collections::VecDeque;
use std::time::Duration;

use kube_objects::Object;

use crate::follow::{Follower, Raw, RawEvent};
use crate::watch::parse_key;
use crate::{Event, Store, Tls};

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

pub struct Informer {
    prefix: String,
    follower: Follower,
    queued: VecDeque<Update>,
}

impl Informer {
    pub fn new(endpoints: &str, prefix: &str, tls: Option<Tls>) -> Informer {
        let prefix = prefix.trim_end_matches('/').to_string();
        let follower = Follower::new(endpoints, &format!("{prefix}/"), tls);
        Informer { prefix, follower, queued: VecDeque::new() }
    }

    /// The object at `key`, or why it cannot be used; None for keys that are not objects (allocations, config).
    fn decode(&mut self, key: &str, value: &[u8], rev: i64) -> Option<Object> {
        parse_key(&self.prefix, key)?;
        match Store::decode_checked(key, value, rev) {
            Ok(o) => Some(o),
            Err(reason) => {
                self.queued.push_back(Update::Invalid { key: key.to_string(), reason });
                None
            }
        }
    }

    /// The next update. Never fails: trouble is reported as [`Update::Unavailable`] (after which it waits out the
    /// backoff itself) or [`Update::Invalid`].
    pub async fn next(&mut self) -> Update {
        loop {
            if let Some(u) = self.queued.pop_front() {
                return u;
            }
            match self.follower.next().await {
                Raw::Reset(kvs) => {
                    let objects =
                        kvs.iter().filter_map(|kv| self.decode(&kv.key, &kv.value, kv.mod_revision)).collect();
                    return Update::Reset(objects);
                }
                Raw::Events(events) => {
                    let mut changes = Vec::new();
                    for ev in events {
                        match ev {
                            RawEvent::Put(kv) => {
                                changes.extend(self.decode(&kv.key, &kv.value, kv.mod_revision).map(Event::Put))
                            }
                            RawEvent::Delete(key) => {
                                if let Some((kind, namespace, name)) = parse_key(&self.prefix, &key) {
                                    changes.push(Event::Delete { kind, namespace, name });
                                }
                            }
                        }
                    }
                    if !changes.is_empty() {
                        // Invalid values in the same batch are reported right after it.
                        return Update::Changes(changes);
                    }
                }
                Raw::Unavailable { error, retry_in } => return Update::Unavailable { error, retry_in },
            }
        }
    }
}
