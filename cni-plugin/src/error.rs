//! The one place where failures become what the runtime sees: a spec error code and a message a person can act on.

use std::path::PathBuf;

use cni_types::{CniError, ErrorCode};
use ipam::IpamError;
use iptables::IptablesError;
use rtnl::RtnlError;

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// Already in the runtime's terms (environment, config and version errors, a delegate's error).
    #[error("{0}")]
    Cni(#[from] CniError),
    #[error("ipam: {0}")]
    Ipam(#[from] IpamError),
    #[error("{0}")]
    Netlink(#[from] RtnlError),
    #[error("masquerade rules: {0}")]
    Firewall(#[from] IptablesError),
    #[error("cannot open network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("interface {ifname} already exists in {netns}")]
    InterfaceExists { ifname: String, netns: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("CHECK: {0}")]
    Mismatch(String),
}

impl PluginError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PluginError {
        let what = what.into();
        move |source| PluginError::Io { what, source }
    }

    pub fn to_cni(&self) -> CniError {
        let (code, msg) = match self {
            PluginError::Cni(e) => return e.clone(),
            PluginError::Ipam(IpamError::Exhausted { .. }) => (ErrorCode::RangeExhausted, "no IP addresses available"),
            PluginError::Ipam(IpamError::InvalidRange(_)) => (ErrorCode::InvalidConfig, "invalid IPAM range"),
            PluginError::Ipam(IpamError::Taken(_)) => (ErrorCode::AddressTaken, "requested address is taken"),
            PluginError::Ipam(IpamError::Io { .. }) => (ErrorCode::IoFailure, "IPAM store failure"),
            PluginError::Netlink(_) => (ErrorCode::Kernel, "the kernel refused a network change"),
            PluginError::Firewall(_) => (ErrorCode::Firewall, "could not program masquerade rules"),
            PluginError::Netns { .. } => (ErrorCode::InvalidEnvironment, "CNI_NETNS is not a usable network namespace"),
            PluginError::InterfaceExists { .. } => (ErrorCode::InterfaceExists, "interface already exists"),
            PluginError::Io { .. } => (ErrorCode::IoFailure, "I/O failure"),
            PluginError::Invalid(_) => (ErrorCode::InvalidConfig, "invalid network configuration"),
            PluginError::Mismatch(_) => (ErrorCode::StateMismatch, "container network state differs from prevResult"),
        };
        CniError::new(code, msg, self.to_string())
    }
}

pub type Result<T> = std::result::Result<T, PluginError>;
