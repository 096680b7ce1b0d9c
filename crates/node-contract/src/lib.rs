//! The contracts between Tartan's binaries on one node, defined once so that no binary links another:
//!
//! - [`pods`]: the CNI plugin records each pod it wires; the agent publishes them, the proxy polices their veths.
//! - [`host_veth_name`]: the plugin names a pod's host-side veth after its attachment; the proxy matches policy on it.
//! - [`name_hash`]: the stable hash behind every chain and set name Tartan writes.
//! - [`MASQ_MARK`]: the packet mark that asks for SNAT (kube-proxy's 0x4000, which flannel's rules leave alone).

pub mod pods;

/// The mark the proxy sets on packets that must be masqueraded; the agent's FLANNEL-POSTRTG returns on it so
/// they are not masqueraded twice.
pub const MASQ_MARK: u32 = 0x4000;

/// The CNI plugin's per-network masquerade chains start so; the proxy's chains are every other `TARTAN-` chain.
pub const PLUGIN_MASQ_CHAIN_PREFIX: &str = "TARTAN-MASQ-";

/// [`MASQ_MARK`] as iptables writes it (`--mark 0x4000/0x4000`).
pub fn masq_mark_match() -> String {
    format!("{MASQ_MARK:#x}/{MASQ_MARK:#x}")
}

/// 64-bit FNV-1a: stable across versions and platforms, unlike std's hasher, so names survive restarts and
/// upgrades.
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A stable 16-hex-digit name part: chain names stay under iptables' 28 characters, set names under ipset's 31.
pub fn name_hash(s: &str) -> String {
    format!("{:016X}", fnv1a(s.bytes()))
}

/// The host end's name, derived from the attachment so DEL can find it without the container namespace.
/// `veth` + 11 hex digits of the hash of the container ID and interface: 15 bytes, the kernel's limit.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let h = fnv1a(container_id.bytes().chain([0u8]).chain(ifname.bytes()));
    format!("veth{:011x}", h & 0xfff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_and_fit_the_kernel() {
        // Changing these renames every veth and chain on upgrade: they are part of the contract.
        assert_eq!(name_hash("default/web:http/tcp"), name_hash("default/web:http/tcp"));
        assert_eq!(name_hash("").len(), 16);
        let v = host_veth_name("0123456789abcdef", "eth0");
        assert_eq!(v.len(), 15);
        assert!(v.starts_with("veth"));
        assert_ne!(v, host_veth_name("0123456789abcdef", "eth1"));
        assert_eq!(masq_mark_match(), "0x4000/0x4000");
    }
}
