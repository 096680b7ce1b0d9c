//! The etcd client every Tartan program uses. An etcd cluster is a set of members, and losing one must fail
//! nothing: [`Etcd`] talks to one member that answers (probed with a status call; the etcd-client balancer gives up
//! when any endpoint of its list is down), retries transient errors (unavailable, leader changed, timeouts) with
//! bounded backoff on the next member that answers, and when it finally gives up says which endpoints it tried.
//!
//! Every request it retries is safe to repeat: reads, puts of a whole value, guarded transactions (a repeat of one
//! that was applied fails its guard and the caller re-reads), lease grants (an orphan lease expires by itself).

use std::path::Path;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, CompactionOptions, CompactionResponse, ConnectOptions, DeleteOptions, DeleteResponse,
    GetOptions, GetResponse, Identity, KeyValue, LeaseGrantOptions, LeaseGrantResponse, LeaseRevokeResponse,
    PutOptions, PutResponse, TlsOptions, Txn, TxnResponse, WatchOptions, WatchStream,
};

use rand::Rng;

use crate::StoreError;

/// etcd TLS material (CA, client certificate and key, PEM), read once at start.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    pub ca: Option<Vec<u8>>,
    /// (certificate, key).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl Tls {
    /// None when no file is given (plain http).
    pub fn from_files(ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>) -> Result<Option<Tls>, StoreError> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| StoreError::Config(format!("reading {}: {e}", p.display())));
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            (None, None) => None,
            _ => return Err(StoreError::Config("the etcd certificate and key files go together".into())),
        };
        let ca = ca.map(read).transpose()?;
        Ok((ca.is_some() || identity.is_some()).then_some(Tls { ca, identity }))
    }
}

/// Bounded exponential backoff with jitter: 200 ms doubling up to `max`, each between half and all of that, so
/// that every node of a cluster does not retry in step after an etcd outage.
pub fn backoff(failures: u32, max: Duration) -> Duration {
    let base = Duration::from_millis(200).saturating_mul(1 << failures.min(10)).min(max);
    base.mul_f64(rand::rng().random_range(0.5..=1.0))
}

/// Keys per page of a listing: one etcd response is capped at 4 MiB by gRPC, which 10 000 Services exceed.
const PAGE: i64 = 500;

/// How many times a request is tried before the error is returned (with backoff, about 15 s in all).
const ATTEMPTS: u32 = 8;

fn options(tls: Option<&Tls>) -> ConnectOptions {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
    if let Some(t) = tls {
        let mut o = TlsOptions::new();
        if let Some(ca) = &t.ca {
            o = o.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &t.identity {
            o = o.identity(Identity::from_pem(cert, key));
        }
        opts = opts.with_tls(o);
    }
    opts
}

/// Whether an error may pass by itself: the member is down or unreachable, has no leader or just lost it, or
/// did not answer in time. Anything else (a refused request, a bad key) is final.
pub fn transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => {
            // tonic's codes: 4 DeadlineExceeded, 14 Unavailable, 1 Cancelled (a dropped connection), 8
            // ResourceExhausted (too many requests), 13 Internal (a transport reset surfaces so).
            let code = s.code() as i32;
            let msg = s.message();
            matches!(code, 1 | 4 | 8 | 13 | 14)
                || ["leader changed", "no leader", "timed out", "timeout", "connection"].iter().any(|m| msg.contains(m))
        }
        _ => false,
    }
}

/// A client for one etcd cluster, talking to whichever member answers.
#[derive(Clone)]
pub struct Etcd {
    endpoints: Vec<String>,
    tls: Option<Tls>,
    client: Client,
    /// The member in use (an index into `endpoints`).
    member: usize,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Etcd({} of {})", self.endpoints[self.member], self.endpoints.join(","))
    }
}

/// The first member from `start` on (wrapping) that answers a status call.
async fn probe(endpoints: &[String], tls: Option<&Tls>, start: usize) -> Result<(Client, usize), StoreError> {
    let mut last = None;
    for i in 0..endpoints.len() {
        let member = (start + i) % endpoints.len();
        let ep = &endpoints[member];
        match Client::connect([ep.as_str()], Some(options(tls))).await {
            Ok(mut c) => match c.status().await {
                Ok(_) => return Ok((c, member)),
                Err(e) => last = Some(e),
            },
            Err(e) => last = Some(e),
        }
    }
    Err(StoreError::Connect(
        endpoints.join(","),
        last.unwrap_or_else(|| etcd_client::Error::InvalidArgs("no endpoints".into())),
    ))
}

impl Etcd {
    /// Connects to the first of the comma-separated `endpoints` that answers.
    pub async fn connect(endpoints: &str, tls: Option<&Tls>) -> Result<Etcd, StoreError> {
        let eps: Vec<String> =
            endpoints.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
        if eps.is_empty() {
            return Err(StoreError::Config("no etcd endpoints given".into()));
        }
        let (client, member) = probe(&eps, tls, 0).await?;
        Ok(Etcd { endpoints: eps, tls: tls.cloned(), client, member })
    }

    /// The member in use.
    pub fn member(&self) -> &str {
        &self.endpoints[self.member]
    }

    /// Moves to the next member that answers (the current one last).
    async fn reconnect(&mut self) -> Result<(), StoreError> {
        let (client, member) = probe(&self.endpoints, self.tls.as_ref(), self.member + 1).await?;
        self.client = client;
        self.member = member;
        Ok(())
    }

    /// Runs `op` until it succeeds, fails for good, or has failed transiently [`ATTEMPTS`] times.
    /// (`op` gets its own handle on the connection: a clone shares it.)
    async fn call<T, F, Fut>(&mut self, what: &'static str, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut attempt = 0;
        loop {
            match op(self.client.clone()).await {
                Ok(v) => return Ok(v),
                Err(e) if transient(&e) && attempt + 1 < ATTEMPTS => {
                    attempt += 1;
                    tokio::time::sleep(backoff(attempt, Duration::from_secs(2))).await;
                    // No member answering yet is no reason to stop: the next attempt probes again.
                    let _ = self.reconnect().await;
                }
                Err(e) => {
                    return Err(StoreError::Request {
                        what,
                        endpoints: self.endpoints.join(","),
                        attempts: attempt + 1,
                        source: e,
                    })
                }
            }
        }
    }

    pub async fn get(&mut self, key: impl Into<Vec<u8>>, o: Option<GetOptions>) -> Result<GetResponse, StoreError> {
        let key = key.into();
        self.call("get", |mut c| {
            let (key, o) = (key.clone(), o.clone());
            async move { c.get(key, o).await }
        })
        .await
    }

    /// Every key under `prefix` (which ends in '/'), read in pages at the revision of the first page (so the whole
    /// listing is one consistent snapshot), and that revision.
    pub async fn get_all(&mut self, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError> {
        let mut end = prefix.as_bytes().to_vec();
        match end.last_mut() {
            // The first key after every key starting with `prefix`.
            Some(b) if *b == b'/' => *b += 1,
            _ => return Err(StoreError::Config(format!("listing {prefix:?}: a prefix ends in '/'"))),
        }
        let (mut out, mut rev, mut from) = (Vec::new(), 0, prefix.as_bytes().to_vec());
        loop {
            let mut o = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if rev > 0 {
                o = o.with_revision(rev);
            }
            let mut r = self.get(from.clone(), Some(o)).await?;
            if rev == 0 {
                rev = r.header().map(|h| h.revision()).unwrap_or_default();
            }
            let more = r.more();
            let kvs = r.take_kvs();
            let Some(last) = kvs.last() else { break };
            from = last.key().to_vec();
            from.push(0);
            out.extend(kvs);
            if !more {
                break;
            }
        }
        Ok((out, rev))
    }

    pub async fn put(
        &mut self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        o: Option<PutOptions>,
    ) -> Result<PutResponse, StoreError> {
        let (key, value) = (key.into(), value.into());
        self.call("put", |mut c| {
            let (key, value, o) = (key.clone(), value.clone(), o.clone());
            async move { c.put(key, value, o).await }
        })
        .await
    }

    pub async fn delete(
        &mut self,
        key: impl Into<Vec<u8>>,
        o: Option<DeleteOptions>,
    ) -> Result<DeleteResponse, StoreError> {
        let key = key.into();
        self.call("delete", |mut c| {
            let (key, o) = (key.clone(), o.clone());
            async move { c.delete(key, o).await }
        })
        .await
    }

    pub async fn txn(&mut self, txn: Txn) -> Result<TxnResponse, StoreError> {
        self.call("txn", |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
    }

    pub async fn compact(
        &mut self,
        revision: i64,
        o: Option<CompactionOptions>,
    ) -> Result<CompactionResponse, StoreError> {
        self.call("compact", |mut c| {
            let o = o.clone();
            async move { c.compact(revision, o).await }
        })
        .await
    }

    pub async fn watch(&mut self, key: impl Into<Vec<u8>>, o: Option<WatchOptions>) -> Result<WatchStream, StoreError> {
        let key = key.into();
        self.call("watch", |mut c| {
            let (key, o) = (key.clone(), o.clone());
            async move { c.watch(key, o).await }
        })
        .await
    }

    pub async fn lease_grant(
        &mut self,
        ttl: i64,
        o: Option<LeaseGrantOptions>,
    ) -> Result<LeaseGrantResponse, StoreError> {
        self.call("lease grant", |mut c| {
            let o = o.clone();
            async move { c.lease_grant(ttl, o).await }
        })
        .await
    }

    pub async fn lease_revoke(&mut self, id: i64) -> Result<LeaseRevokeResponse, StoreError> {
        self.call("lease revoke", |mut c| async move { c.lease_revoke(id).await }).await
    }
}

/// A client for the comma-separated `endpoints` (see [`Etcd`]).
pub async fn connect(endpoints: &str, tls: Option<&Tls>) -> Result<Etcd, StoreError> {
    Etcd::connect(endpoints, tls).await
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
