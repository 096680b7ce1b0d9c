//! The socket load balancer's maps, shared by the eBPF programs (`ebpf/`) and tartan-proxy. Every type is
//! `#[repr(C)]`, made of fixed-width integers with explicit padding (no bool, enum or Option), so that both sides
//! agree on every byte and the verifier sees initialised keys. Addresses are 16 bytes in network order: an IPv4
//! address sits in the first 4 bytes, the rest zero. Ports are in network order, as the kernel hands them over.
#![no_std]

/// Pin names under the proxy's `--bpf-root` (maps) and its `links/` directory (program links).
pub mod names {
    pub const SERVICES: &str = "TARTAN_SVC";
    pub const REVERSE: &str = "TARTAN_REV";
    pub const AFFINITY: &str = "TARTAN_AFF";
    pub const STATS: &str = "TARTAN_STATS";
    /// The programs, in the order they are attached; each is also the name of its pinned link.
    pub const PROGRAMS: [&str; 8] = [
        "tartan_connect4",
        "tartan_connect6",
        "tartan_sendmsg4",
        "tartan_sendmsg6",
        "tartan_recvmsg4",
        "tartan_recvmsg6",
        "tartan_getpeername4",
        "tartan_getpeername6",
    ];
}

/// Map sizes. SERVICES holds a frontend slot plus one slot per backend for every (address, port, protocol): a
/// million covers 100 000 services of 5 endpoints with room. It is allocated as entries come (no prealloc).
pub const SERVICES_MAX: u32 = 1 << 20;
/// Connections (and unconnected UDP peers) whose reply addresses are translated back, least recently used first out.
pub const REVERSE_MAX: u32 = 1 << 17;
pub const AFFINITY_MAX: u32 = 1 << 16;

/// Frontend flags (slot 0's `flags`).
pub mod flags {
    /// sessionAffinity ClientIP: `affinity_secs` holds the timeout.
    pub const AFFINITY: u16 = 1;
}

/// STATS (per CPU) indexes.
pub mod stats {
    /// Connections and datagrams translated to a backend.
    pub const TRANSLATED: u32 = 0;
    /// Refused: the service had no usable endpoint.
    pub const REFUSED: u32 = 1;
    /// Replies translated back to the service address.
    pub const REVERSED: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// A service frontend (address, port, protocol) and a slot: 0 is the frontend itself, 1..=count its backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub slot: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Slot 0: `count` backends, `flags`, `affinity_secs`. Slots 1..=count: a backend's `addr` and `port`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceValue {
    pub addr: [u8; 16],
    pub port: u16,
    pub count: u16,
    pub flags: u16,
    pub _pad: u16,
    pub affinity_secs: u32,
}

/// A socket (its cookie) and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReverseKey {
    pub cookie: u64,
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 6],
}

/// The service address and port that socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReverseValue {
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 6],
}

/// A client (its network namespace: a pod, or the node) and a frontend, for sessionAffinity ClientIP. Within a
/// node every client address belongs to one namespace, so the namespace stands for the client address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub netns: u64,
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
    pub _pad: [u8; 5],
}

/// The backend chosen (its slot, checked against the service map on use) and when it was last used.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    pub addr: [u8; 16],
    pub port: u16,
    pub slot: u16,
    pub _pad: u32,
    pub last_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain old data: repr(C), integers and byte arrays only, every padding byte an explicit field.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for ReverseKey {}
    unsafe impl aya::Pod for ReverseValue {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn sizes_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 24);
        assert_eq!(size_of::<ServiceValue>(), 28);
        assert_eq!(size_of::<ReverseKey>(), 32);
        assert_eq!(size_of::<ReverseValue>(), 24);
        assert_eq!(size_of::<AffinityKey>(), 32);
        assert_eq!(size_of::<AffinityValue>(), 32);
    }
}
