use etcd_client::{EventType, WatchOptions, WatchStream};
use kube_objects::{Kind, Object};

use crate::{Store, StoreError};

/// What a watch reports.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // short-lived, one per change: boxing would buy nothing
pub enum Event {
    Put(Object),
    Delete {
        kind: Kind,
        namespace: Option<String>,
        name: String,
    },
    /// The revision the watch resumed from was compacted away: re-list (a snapshot) and carry on from there.
    Resync,
    /// A value under the prefix that is not a valid object (written by a buggy or newer client straight into
    /// etcd): reported and skipped, so that one bad value never hides the changes around it.
    Invalid {
        key: String,
        reason: String,
    },
}

pub struct Watcher {
    prefix: String,
    stream: WatchStream,
}

/// `<prefix>/<plural>/[<ns>/]<name>` -> (kind, namespace, name); None for keys that are not objects.
pub(crate) fn parse_key(prefix: &str, key: &str) -> Option<(Kind, Option<String>, String)> {
    let rest = key.strip_prefix(prefix)?.strip_prefix('/')?;
    let mut parts = rest.split('/');
    let kind = Kind::from_plural(parts.next()?)?;
    let (a, b, extra) = (parts.next(), parts.next(), parts.next());
    match (kind.namespaced(), a, b, extra) {
        (true, Some(ns), Some(name), None) => Some((kind, Some(ns.to_string()), name.to_string())),
        (false, Some(name), None, None) => Some((kind, None, name.to_string())),
        _ => None,
    }
}

impl Store {
    /// Watches every object from `after_revision` + 1 (the revision a listing returned).
    pub async fn watch(&mut self, after_revision: i64) -> Result<Watcher, StoreError> {
        let p = format!("{}/", self.prefix);
        let stream = self
            .client
            .watch(p, Some(WatchOptions::new().with_prefix().with_start_revision(after_revision + 1)))
            .await?;
        Ok(Watcher { prefix: self.prefix.clone(), stream })
    }
}

impl Watcher {
    /// The next batch of events; an error means the stream ended (reconnect, re-list, watch again).
    pub async fn next(&mut self) -> Result<Vec<Event>, StoreError> {
        loop {
            let Some(resp) = self.stream.message().await? else {
                return Err(StoreError::Config("the watch stream ended".into()));
            };
            if resp.compact_revision() > 0 {
                return Ok(vec![Event::Resync]);
            }
            if resp.canceled() {
                return Err(StoreError::Config(format!("watch canceled: {}", resp.cancel_reason())));
            }
            let mut out = Vec::new();
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let Some((kind, namespace, name)) = parse_key(&self.prefix, &key) else { continue };
                match ev.event_type() {
                    EventType::Put => out.push(match Store::decode_checked(&key, kv.value(), kv.mod_revision()) {
                        Ok(o) => Event::Put(o),
                        Err(reason) => Event::Invalid { key, reason },
                    }),
                    EventType::Delete => out.push(Event::Delete { kind, namespace, name }),
                }
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert_eq!(
            parse_key("/tartan", "/tartan/services/default/redis"),
            Some((Kind::Service, Some("default".into()), "redis".into()))
        );
        assert_eq!(parse_key("/tartan", "/tartan/nodes/n1"), Some((Kind::Node, None, "n1".into())));
        assert_eq!(parse_key("/tartan", "/tartan/allocations/clusterips/10.96.0.1"), None);
        assert_eq!(parse_key("/tartan", "/tartan/config"), None);
        assert_eq!(parse_key("/tartan", "/tartan/pods/default"), None);
    }
}
