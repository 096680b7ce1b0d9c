//! host-local compatible IPAM.
//!
//! The store is the one the reference host-local plugin keeps, so operators and tools that read it keep working:
//! `<dataDir>/<network>/` holds one file per allocated address, named by the address, created O_EXCL with mode 0600
//! and holding `<containerID>\r\n<ifname>`; `last_reserved_ip.<range set index>` remembers where round-robin
//! allocation left off; every change happens under an exclusive flock on `<dir>/lock`.

mod range;
mod store;

pub use range::{Range, RangeSet, RangeSpec};
pub use store::{Allocation, Owner, Store, StoreLock};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("invalid range: {0}")]
    InvalidRange(String),
    #[error("no free address left in range set {index} ({ranges})")]
    Exhausted { index: usize, ranges: String },
    #[error("requested address {0} is already allocated")]
    Taken(std::net::IpAddr),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl IpamError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> IpamError {
        let path = path.into();
        move |source| IpamError::Io { op, path, source }
    }
}
