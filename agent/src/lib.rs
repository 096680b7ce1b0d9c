//! tartan-agent: a drop-in for flanneld on an etcd datastore.

pub mod acquire;
pub mod cleanup;
pub mod cli;
pub mod dataplane;
pub mod external;
pub mod metrics;
pub mod options;
pub mod publish;
pub mod registry;
pub mod rules;
pub mod run;
pub mod udp;
