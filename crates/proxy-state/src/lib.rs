//! What tartan-proxy programs, with nothing of any one dataplane in it:
//!
//! - [`service`]: Service ports with their addresses and endpoints categorised per traffic policy;
//! - [`policy`]: NetworkPolicy for this node's pods, with typed peer sets;
//! - [`tracker`]: the change tracker that keeps both up to date from store events, at a cost proportional to what
//!   changed;
//! - [`dataplane`]: the [`Dataplane`] trait (iptables today, eBPF next) and the [`State`] it is handed.

pub mod dataplane;
pub mod policy;
pub mod service;
pub mod tracker;

pub use dataplane::{Dataplane, DataplaneError, ErrorKind, Held, State, SyncReport};
pub use policy::{PeerSet, PolicyModel, SetKind, SetRef};
pub use service::{Endpoint, Proto, ServicePort};
pub use tracker::Tracker;

#[cfg(test)]
pub(crate) mod test_support {
    use kube_objects::Object;

    /// Objects from a YAML manifest, defaulted as the store would hold them.
    pub fn objects(yaml: &str) -> Vec<Object> {
        kube_objects::parse_manifests(yaml, "test")
            .unwrap()
            .into_iter()
            .map(|d| {
                let mut o = d.object;
                o.apply_defaults();
                o
            })
            .collect()
    }
}
