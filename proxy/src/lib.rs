//! `tartan-proxy`: the kube-proxy replacement. It follows the cluster store, computes one [`model::ServicePort`]
//! list with the store's shared endpoint derivation and one [`policy::PolicyModel`] for the node's pods, and hands
//! them to a [`Dataplane`]: iptables now, eBPF later,
//! behind the same trait and the same tests.

pub mod daemon;
pub mod iptables_dp;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod policy_rules;
pub mod rules;

/// What a sync did.
#[derive(Debug, Clone, Default)]
pub struct SyncReport {
    /// Rules in the dataplane after the sync.
    pub rules: usize,
    /// Whether everything was rewritten (a full sync) or only what changed.
    pub full: bool,
    /// Address sets (ipsets) and their entries after the sync.
    pub sets: usize,
    pub set_entries: usize,
}

/// A dataplane programs Service ports and NetworkPolicy into the kernel.
pub trait Dataplane {
    /// Brings the kernel to `ports` and `policy`. `full`: do not trust what the last sync wrote (start, periodic
    /// repair).
    fn sync(
        &mut self,
        ports: &[model::ServicePort],
        policy: &policy::PolicyModel,
        full: bool,
    ) -> anyhow::Result<SyncReport>;
    /// Whether someone removed our state behind our back (the canary is gone): the next sync must be full.
    fn tampered(&mut self) -> bool;
    /// Removes everything this dataplane owns, and nothing else.
    fn cleanup(&mut self) -> anyhow::Result<()>;
}
