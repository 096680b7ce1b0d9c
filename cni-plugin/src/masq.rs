//! Masquerade for a network's pods: one chain per network, shared by every pod in it, rather than the reference
//! plugin's chain per container (which costs an iptables round trip on every ADD and DEL and leaks when DEL runs
//! after the netns is gone).
//!
//! nat POSTROUTING: `-s <subnet> -m comment --comment "tartan masquerade: <network>" -j TARTAN-MASQ-<hash>`
//! TARTAN-MASQ-<hash>: RETURN for multicast and the network's own subnets, then MASQUERADE --random-fully.
//!
//! ADD checks the jump with one `iptables -C` and writes only when it is missing; the rules are removed when the
//! network's last address is released (DEL or GC), under the IPAM store lock so an ADD cannot slip in between.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;

use ipnet::IpNet;
use iptables::{render, Family, Iptables};

use crate::error::{PluginError, Result};

/// The network's chain name (fits iptables' 28-character limit whatever the network is called).
pub fn chain(network: &str) -> String {
    // FNV-1a: stable across versions and platforms, unlike std's hasher.
    let mut h: u32 = 0x811c_9dc5;
    for b in network.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{}{h:08X}", node_contract::PLUGIN_MASQ_CHAIN_PREFIX)
}

fn comment(network: &str) -> String {
    let mut c = format!("tartan masquerade: {network}");
    c.truncate(250);
    c
}

fn family(net: &IpNet) -> Family {
    match net {
        IpNet::V4(_) => Family::V4,
        IpNet::V6(_) => Family::V6,
    }
}

fn jump(network: &str, subnet: &IpNet) -> Vec<String> {
    vec![
        "-s".into(),
        subnet.trunc().to_string(),
        "-m".into(),
        "comment".into(),
        "--comment".into(),
        comment(network),
        "-j".into(),
        chain(network),
    ]
}

/// The payload that (re)writes the network's chain for one family and adds the jumps in `missing`.
pub fn ensure_payload(network: &str, fam: Family, subnets: &[IpNet], missing: &[IpNet]) -> String {
    let chain = chain(network);
    let multicast = match fam {
        Family::V4 => "224.0.0.0/4",
        Family::V6 => "ff00::/8",
    };
    let mut p = format!("*nat\n:{chain} - [0:0]\n-A {chain} -d {multicast} -j RETURN\n");
    for s in subnets {
        p += &format!("-A {chain} -d {} -j RETURN\n", s.trunc());
    }
    p += &format!("-A {chain} -j MASQUERADE --random-fully\n");
    for s in missing {
        p += &format!("-A POSTROUTING {}\n", render(&jump(network, s)));
    }
    p += "COMMIT\n";
    p
}

fn by_family(subnets: &[IpNet]) -> BTreeMap<u8, (Family, Vec<IpNet>)> {
    let mut m: BTreeMap<u8, (Family, Vec<IpNet>)> = BTreeMap::new();
    for s in subnets {
        let f = family(s);
        m.entry(if f == Family::V4 { 4 } else { 6 }).or_insert((f, Vec::new())).1.push(s.trunc());
    }
    m
}

/// An exclusive flock on `<run_dir>/masq.lock`, serialising the slow paths of concurrent ADDs and DELs.
struct RunLock(#[allow(dead_code)] std::fs::File);

fn lock(run_dir: &Path) -> Result<RunLock> {
    std::fs::create_dir_all(run_dir).map_err(PluginError::io(format!("create {}", run_dir.display())))?;
    let path = run_dir.join("masq.lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(PluginError::io(format!("open {}", path.display())))?;
    // SAFETY: flock on a descriptor we own, released when it closes.
    while unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(PluginError::Io { what: format!("lock {}", path.display()), source: e });
        }
    }
    Ok(RunLock(f))
}

/// Makes sure the pod subnets in `mine` are masqueraded. When the rules must be (re)written, the chain's
/// exceptions cover `all` the network's subnets, not only this pod's, so one pod never undoes another's.
pub fn ensure(network: &str, mine: &[IpNet], all: &[IpNet], run_dir: &Path) -> Result<()> {
    for (_, (fam, nets)) in by_family(mine) {
        let ipt = Iptables::new(fam);
        let missing = |ipt: &Iptables| -> Result<Vec<IpNet>> {
            let mut m = Vec::new();
            for s in &nets {
                if !ipt.exists("nat", "POSTROUTING", &jump(network, s))? {
                    m.push(*s);
                }
            }
            Ok(m)
        };
        if missing(&ipt)?.is_empty() {
            continue; // the common case: one exec, no write
        }
        let _l = lock(run_dir)?;
        let missing = missing(&ipt)?;
        if !missing.is_empty() {
            let mut exceptions: Vec<IpNet> =
                all.iter().chain(&nets).filter(|s| family(s) == fam).map(IpNet::trunc).collect();
            exceptions.sort();
            exceptions.dedup();
            ipt.restore(&ensure_payload(network, fam, &exceptions, &missing))?;
        }
    }
    Ok(())
}

/// The payload that deletes every jump to the network's chain and the chain itself, given `iptables-save -t nat`.
pub fn remove_payload(network: &str, saved: &str) -> Option<String> {
    let chain = chain(network);
    let declared = saved.lines().any(|l| l.starts_with(&format!(":{chain} ")));
    let jumps: Vec<&str> = saved
        .lines()
        .filter(|l| l.starts_with("-A ") && !l.starts_with(&format!("-A {chain} ")))
        .filter(|l| l.ends_with(&format!("-j {chain}")))
        .collect();
    if !declared && jumps.is_empty() {
        return None;
    }
    let mut p = String::from("*nat\n");
    for j in jumps {
        p += &format!("-D {}\n", &j[3..]);
    }
    if declared {
        p += &format!(":{chain} - [0:0]\n-X {chain}\n");
    }
    p += "COMMIT\n";
    Some(p)
}

/// Removes the network's masquerade rules (both families); nothing to remove is fine.
pub fn remove(network: &str, run_dir: &Path) -> Result<()> {
    let _l = lock(run_dir)?;
    for fam in [Family::V4, Family::V6] {
        let ipt = Iptables::new(fam);
        let saved = match ipt.save("nat") {
            Ok(s) => s,
            // A node without ip6tables (or without IPv6) has nothing of ours there.
            Err(_) if fam == Family::V6 => continue,
            Err(e) => return Err(e.into()),
        };
        if let Some(p) = remove_payload(network, &saved) {
            ipt.restore(&p)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_are_stable_and_short() {
        assert_eq!(chain("cbr0"), chain("cbr0"));
        assert_ne!(chain("cbr0"), chain("cbr1"));
        assert!(chain("a-very-long-network-name-indeed-and-more").len() <= 28);
    }

    #[test]
    fn payloads() {
        let s: IpNet = "10.244.1.0/24".parse().unwrap();
        let p = ensure_payload("cbr0", Family::V4, &[s], &[s]);
        let c = chain("cbr0");
        assert_eq!(
            p,
            format!(
                "*nat\n:{c} - [0:0]\n-A {c} -d 224.0.0.0/4 -j RETURN\n-A {c} -d 10.244.1.0/24 -j RETURN\n\
                 -A {c} -j MASQUERADE --random-fully\n\
                 -A POSTROUTING -s 10.244.1.0/24 -m comment --comment \"tartan masquerade: cbr0\" -j {c}\nCOMMIT\n"
            )
        );
        let saved = format!(
            "*nat\n:POSTROUTING ACCEPT [0:0]\n:{c} - [0:0]\n\
             -A POSTROUTING -s 10.244.1.0/24 -m comment --comment \"tartan masquerade: cbr0\" -j {c}\n\
             -A POSTROUTING -j OTHER\n-A {c} -j MASQUERADE --random-fully\nCOMMIT\n"
        );
        let r = remove_payload("cbr0", &saved).unwrap();
        assert_eq!(
            r,
            format!(
                "*nat\n-D POSTROUTING -s 10.244.1.0/24 -m comment --comment \"tartan masquerade: cbr0\" -j {c}\n\
                 :{c} - [0:0]\n-X {c}\nCOMMIT\n"
            )
        );
        assert_eq!(remove_payload("other", &saved), None);
    }
}
