//! The etcd side: flanneld's keys under `--etcd-prefix`, one etcd lease (TTL) per subnet lease, creation guarded by
//! `Version(key) == 0` so two nodes can never hold one subnet. Other nodes' leases are followed with the store's
//! list+watch loop ([`store::Follower`]) over [`Registry::subnets_prefix`], decoded with [`Registry::parse`].

use std::collections::BTreeMap;

use anyhow::Result;
use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use flannel::{LeaseAttrs, LeaseKey};

pub type Leases = BTreeMap<LeaseKey, LeaseAttrs>;

pub struct Registry {
    client: store::Etcd,
    prefix: String,
}

pub use store::Tls;

impl Registry {
    pub async fn connect(endpoints: &str, prefix: &str, tls: Option<&Tls>) -> Result<Registry> {
        let client = store::connect(endpoints, tls).await?;
        Ok(Registry { client, prefix: prefix.trim_end_matches('/').to_string() })
    }

    /// Where the leases are: `<prefix>/subnets/`.
    pub fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    fn key(&self, k: &LeaseKey) -> String {
        format!("{}{k}", self.subnets_prefix())
    }

    /// `<prefix>/config`, if set.
    pub async fn config(&mut self) -> Result<Option<String>> {
        let r = self.client.get(format!("{}/config", self.prefix), None).await?;
        Ok(r.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    /// Puts `text` at `<prefix>/config` unless a config is there. Ok(None): it was put; Ok(Some(old)): the store's.
    pub async fn seed_config(&mut self, text: &str) -> Result<Option<String>> {
        let key = format!("{}/config", self.prefix);
        let txn = Txn::new()
            .when(vec![Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then(vec![TxnOp::put(key.clone(), text, None)])
            .or_else(vec![TxnOp::get(key, None)]);
        let r = self.client.txn(txn).await?;
        if r.succeeded() {
            return Ok(None);
        }
        let old = r.op_responses().into_iter().find_map(|op| match op {
            etcd_client::TxnOpResponse::Get(g) => {
                g.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
            }
            _ => None,
        });
        Ok(Some(old.unwrap_or_default()))
    }

    /// Every lease, and the revision the listing is as of. Entries that are not leases are skipped.
    pub async fn leases(&mut self) -> Result<(Leases, i64)> {
        let r = self.client.get(self.subnets_prefix(), Some(GetOptions::new().with_prefix())).await?;
        let rev = r.header().map(|h| h.revision()).unwrap_or(0);
        let mut out = Leases::new();
        for kv in r.kvs() {
            if let Some((k, a)) = self.parse(kv.key(), kv.value()) {
                out.insert(k, a);
            }
        }
        Ok((out, rev))
    }

    /// A lease from its key and value; None for anything else under the prefix.
    pub fn parse(&self, key: &[u8], value: &[u8]) -> Option<(LeaseKey, LeaseAttrs)> {
        let key = std::str::from_utf8(key).ok()?.strip_prefix(&self.subnets_prefix())?;
        Some((key.parse().ok()?, LeaseAttrs::from_json(value).ok()?))
    }

    /// Creates the lease if nobody holds that subnet. Ok(false): lost the race.
    pub async fn create(&mut self, k: &LeaseKey, attrs: &LeaseAttrs, ttl: u64) -> Result<bool> {
        let lease = self.client.lease_grant(ttl as i64, None).await?.id();
        let key = self.key(k);
        let value = serde_json::to_string(attrs)?;
        let txn = Txn::new().when(vec![Compare::version(key.clone(), CompareOp::Equal, 0)]).and_then(vec![TxnOp::put(
            key,
            value,
            Some(PutOptions::new().with_lease(lease)),
        )]);
        let ok = self.client.txn(txn).await?.succeeded();
        if !ok {
            let _ = self.client.lease_revoke(lease).await;
        }
        Ok(ok)
    }

    /// Gives a lease up (its subnet is free for another node at once).
    pub async fn release(&mut self, k: &LeaseKey) -> Result<()> {
        self.client.delete(self.key(k), None).await?;
        Ok(())
    }

    /// Renews our lease: a fresh TTL and our current attributes (flanneld re-puts the key with a new etcd lease).
    pub async fn renew(&mut self, k: &LeaseKey, attrs: &LeaseAttrs, ttl: u64) -> Result<()> {
        let lease = self.client.lease_grant(ttl as i64, None).await?.id();
        self.client.put(self.key(k), serde_json::to_string(attrs)?, Some(PutOptions::new().with_lease(lease))).await?;
        Ok(())
    }
}
