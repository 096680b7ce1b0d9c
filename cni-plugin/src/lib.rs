//! The `tartan` CNI plugin.
//!
//! A drop-in for the reference `bridge` + `host-local` pair (same option names and meanings, same on-disk IPAM
//! store), and for the flannel meta-plugin when no subnet is configured (the node subnet comes from subnet.env).
//! `main.rs` only moves bytes; [`run`] is the whole plugin, so tests drive it in-process too.

pub mod calllog;
mod cmd;
pub mod config;
mod delegate;
pub mod error;
pub mod install;

pub mod masq;
mod net;

pub use cmd::run;

/// What the binary prints and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub exit_code: i32,
}
