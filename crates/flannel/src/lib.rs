//! flannel's contract, defined once: what `<prefix>/config` holds, how leases are keyed and what their values say,
//! and the subnet.env file the CNI plugin reads. Byte-compatible with flanneld's etcd datastore, so agents and
//! tools of either kind can share a cluster.

mod config;
pub mod gojson;
mod lease;
mod subnet_env;

pub use config::{BackendConfig, BackendType, ConfigError, NetworkConfig};
pub use lease::{LeaseAttrs, LeaseKey, VxlanData};
pub use subnet_env::{SubnetEnv, SubnetEnvError};

pub const DEFAULT_PREFIX: &str = "/coreos.com/network";
pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
