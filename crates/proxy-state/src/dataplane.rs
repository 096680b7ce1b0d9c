//! The contract between the proxy's daemon and a dataplane. It is kept to what every dataplane can honour: bring
//! the kernel to a [`State`], say what it holds, remove everything it owns. How a dataplane finds and repairs drift
//! (canaries, read-backs, counts) is its own business, done when it is handed a state it already applied.

use std::sync::Arc;

use crate::policy::PolicyModel;
use crate::service::ServicePort;

/// The desired state, as one consistent snapshot of the store.
#[derive(Debug, Clone, Default)]
pub struct State {
    /// Increases with every change of the store that changed the state; equal generations are equal states.
    pub generation: u64,
    /// Every Service port to program, sorted by id.
    pub services: Arc<Vec<ServicePort>>,
    pub policy: Arc<PolicyModel>,
}

/// What a dataplane holds in the kernel, as of its last successful sync or check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    /// Rules (iptables) or map entries (eBPF) programmed.
    pub entries: usize,
    /// Address sets (ipsets, or set maps) and their members.
    pub sets: usize,
    pub set_entries: usize,
    /// eBPF programs attached (0 for iptables).
    pub programs: usize,
    /// Flows from outside the dataplane tracks itself, and the most it can (eBPF; 0 for iptables, whose flows are
    /// the kernel's conntrack).
    pub flows: usize,
    pub flows_max: usize,
    /// The eBPF programs' packet counters since their maps were made (by the dataplane's own index; zeros for
    /// iptables, whose counters are the rules').
    pub counters: [u64; COUNTERS],
}

/// How many packet counters [`Held::counters`] has room for.
pub const COUNTERS: usize = 16;

/// What one call of [`Dataplane::sync`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Whether anything was written to the kernel.
    pub wrote: bool,
    /// Whether everything was rewritten, not only what changed.
    pub full: bool,
    /// Drift found and repaired, by kind (a bounded set of names, fit for a metric label).
    pub repaired: Option<&'static str>,
    pub held: Held,
}

/// Why a sync failed, as a bounded set fit for a metric label (the text goes to the log, never into a label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorKind {
    /// A child process (iptables-restore, ipset, conntrack) could not be started.
    Spawn,
    /// A child process did not finish in time and was killed.
    Timeout,
    /// The kernel refused a rules transaction.
    Rules,
    /// The kernel refused a set (ipset or map) update.
    Sets,
    /// Reading the kernel's state back failed or did not match what was written.
    Readback,
    /// A kernel setting the dataplane depends on is off and cannot be turned on.
    Prerequisite,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Spawn => "spawn",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Rules => "rules",
            ErrorKind::Sets => "sets",
            ErrorKind::Readback => "readback",
            ErrorKind::Prerequisite => "prerequisite",
        }
    }

    pub const ALL: [ErrorKind; 6] = [
        ErrorKind::Spawn,
        ErrorKind::Timeout,
        ErrorKind::Rules,
        ErrorKind::Sets,
        ErrorKind::Readback,
        ErrorKind::Prerequisite,
    ];
}

/// A failed sync: what was being done, and why.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct DataplaneError {
    pub kind: ErrorKind,
    pub what: String,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl DataplaneError {
    pub fn new(
        kind: ErrorKind,
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> DataplaneError {
        DataplaneError { kind, what: what.into(), source: source.into() }
    }
}

/// A dataplane programs Service ports and NetworkPolicy into the kernel.
///
/// Contract: after `sync` returns Ok the kernel holds `state`; after it returns Err the dataplane trusts nothing it
/// wrote before and its next sync is full. A restart adopts what a previous run left (the first sync is full and
/// rewrites it in place, so traffic flows throughout).
pub trait Dataplane: Send {
    /// The `--mode` name (`iptables`, `ebpf`), for logs and metric labels.
    fn mode(&self) -> &'static str;
    /// Brings the kernel to `state`. `full`: trust nothing about what the kernel holds (start, periodic resync).
    /// Handed the generation it last applied, a dataplane only looks for drift and repairs what it finds.
    fn sync(&mut self, state: &State, full: bool) -> Result<SyncReport, DataplaneError>;
    /// What the kernel held after the last successful sync.
    fn held(&self) -> Held;
    /// Removes everything this dataplane owns, and nothing else.
    fn cleanup(&mut self) -> Result<(), DataplaneError>;
}
