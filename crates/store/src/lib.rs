//! The cluster store: Kubernetes-shaped objects in the etcd the agents already use (as Calico does in etcd mode),
//! one JSON value per object under one prefix (default `/tartan`), with resourceVersion = the key's etcd mod
//! revision.
//!
//! ```text
//! <prefix>/config                               {"serviceCIDR": "10.96.0.0/12", "nodePortRange": "30000-32767"}
//! <prefix>/namespaces/<name>                    cluster-scoped kinds: namespaces, nodes
//! <prefix>/<plural>/<namespace>/<name>          pods, services, endpoints, networkpolicies
//! <prefix>/allocations/clusterips/<ip>          "<namespace>/<service>": who holds the address
//! <prefix>/allocations/nodeports/<port>         "<namespace>/<service>"
//! ```
//!
//! Every write that allocates is one transaction that also checks the allocation keys it creates are still free,
//! so concurrent writers never hand out one address twice.

mod connect;
mod error;
mod follow;
mod informer;
mod store;
mod watch;

pub use connect::{backoff, connect, transient, Etcd, Tls};
pub use error::StoreError;
pub use follow::{Follower, Kv, Raw, RawEvent};
pub use informer::{Informer, Update};
pub use store::{Outcome, Store, StoreConfig, DEFAULT_PREFIX};
pub use watch::{Event, Watcher};
