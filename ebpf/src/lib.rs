//! The programs live in the binaries (`src/sock.rs`); this empty library lets tartan-proxy take the crate as a
//! build dependency, so that cargo rebuilds the proxy when they change.
#![no_std]
