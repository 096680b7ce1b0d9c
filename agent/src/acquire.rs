//! Which subnet this node takes, in flanneld's order: (1) a lease already held under our public IP that still
//! fits the config; (2) the subnet of the old subnet.env, if nobody holds it; (3) a random pick among the first 100
//! free subnets from SubnetMin up. With IPv6 enabled every step yields a pair, an IPv4 and an IPv6 subnet, the
//! random pick taking the same position in both free lists. Pure: the registry applies the choice with a
//! transaction and retries on a race.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use flannel::{LeaseAttrs, LeaseKey, NetworkConfig};
use ipnet::{Ipv4Net, Ipv6Net};
use rand::Rng;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Our own lease is there: renew it (same key).
    Reuse(LeaseKey),
    /// A free subnet (and with IPv6, a free IPv6 subnet) to create a lease for.
    Take(LeaseKey),
    /// Every subnet between SubnetMin and SubnetMax is leased.
    Exhausted,
}

/// How many free subnets the random pick chooses among (flanneld's figure).
const RANDOM_AMONG: usize = 100;

pub fn choose(
    config: &NetworkConfig,
    leases: &BTreeMap<LeaseKey, LeaseAttrs>,
    public_ip: Ipv4Addr,
    previous: Option<LeaseKey>,
    rng: &mut impl Rng,
) -> Choice {
    let v6 = config.enable_ipv6;
    let fits = |k: &LeaseKey| {
        config.fits(&k.subnet.trunc())
            && match (v6, k.ipv6_subnet) {
                (false, None) => true,
                (true, Some(s)) => config.fits_v6(&s.trunc()),
                _ => false,
            }
    };
    if let Some((k, _)) = leases.iter().find(|(k, a)| a.public_ip == public_ip && fits(k)) {
        return Choice::Reuse(*k);
    }
    let taken = |s: &Ipv4Net| leases.keys().any(|k| k.subnet == *s);
    let taken_v6 = |s: &Ipv6Net| leases.keys().any(|k| k.ipv6_subnet == Some(*s));
    if let Some(prev) =
        previous.map(|p| LeaseKey { subnet: p.subnet.trunc(), ipv6_subnet: p.ipv6_subnet.map(|s| s.trunc()) })
    {
        if fits(&prev) && !taken(&prev.subnet) && !prev.ipv6_subnet.is_some_and(|s| taken_v6(&s)) {
            return Choice::Take(prev);
        }
    }
    let free: Vec<Ipv4Net> = config.subnets().filter(|s| !taken(s)).take(RANDOM_AMONG).collect();
    let free_v6: Vec<Ipv6Net> =
        if v6 { config.ipv6_subnets().filter(|s| !taken_v6(s)).take(RANDOM_AMONG).collect() } else { Vec::new() };
    let n = if v6 { free.len().min(free_v6.len()) } else { free.len() };
    if n == 0 {
        return Choice::Exhausted;
    }
    let i = rng.random_range(0..n);
    Choice::Take(LeaseKey { subnet: free[i], ipv6_subnet: free_v6.get(i).copied() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> NetworkConfig {
        NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","SubnetMax":"10.244.3.0","Backend":{"Type":"host-gw"}}"#)
            .unwrap()
    }

    fn attrs(ip: &str) -> LeaseAttrs {
        serde_json::from_str(&format!(r#"{{"PublicIP":"{ip}","BackendType":"host-gw"}}"#)).unwrap()
    }

    fn key(s: &str) -> LeaseKey {
        s.parse().unwrap()
    }

    #[test]
    fn own_lease_first_then_previous_then_random() {
        let mut rng = rand::rng();
        let me: Ipv4Addr = "198.18.0.1".parse().unwrap();
        let mut leases = BTreeMap::new();
        leases.insert(key("10.244.2.0-24"), attrs("198.18.0.1"));
        leases.insert(key("10.244.1.0-24"), attrs("198.18.0.9"));
        assert_eq!(choose(&cfg(), &leases, me, None, &mut rng), Choice::Reuse(key("10.244.2.0-24")));

        leases.remove(&key("10.244.2.0-24"));
        let prev = Some(key("10.244.3.0-24"));
        assert_eq!(choose(&cfg(), &leases, me, prev, &mut rng), Choice::Take(key("10.244.3.0-24")));
        // The previous subnet is someone else's now: a free one instead.
        let taken_prev = Some(key("10.244.1.0-24"));
        match choose(&cfg(), &leases, me, taken_prev, &mut rng) {
            Choice::Take(k) => {
                assert!(k.subnet.to_string() == "10.244.2.0/24" || k.subnet.to_string() == "10.244.3.0/24")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_lease_that_no_longer_fits_is_not_reused_and_a_full_pool_says_so() {
        let mut rng = rand::rng();
        let me: Ipv4Addr = "198.18.0.1".parse().unwrap();
        let mut leases = BTreeMap::new();
        leases.insert(key("10.244.9.0-24"), attrs("198.18.0.1")); // beyond SubnetMax now
        for s in ["10.244.1.0-24", "10.244.2.0-24", "10.244.3.0-24"] {
            leases.insert(key(s), attrs("198.18.0.7"));
        }
        assert_eq!(choose(&cfg(), &leases, me, None, &mut rng), Choice::Exhausted);
    }

    #[test]
    fn dual_stack_takes_a_pair_and_reuses_only_a_pair() {
        let mut rng = rand::rng();
        let cfg = NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","SubnetMax":"10.244.2.0","EnableIPv6":true,"IPv6Network":"fd00:10::/56",
                "Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        let me: Ipv4Addr = "198.18.0.1".parse().unwrap();
        let mut leases = BTreeMap::new();
        // An IPv4-only lease of ours from before IPv6 was enabled is not reused.
        leases.insert(key("10.244.1.0-24"), attrs("198.18.0.1"));
        leases.insert(key("10.244.2.0-24&fd00:10:0:1::-64"), attrs("198.18.0.9"));
        assert_eq!(choose(&cfg, &leases, me, None, &mut rng), Choice::Exhausted);
        leases.remove(&key("10.244.1.0-24"));
        match choose(&cfg, &leases, me, None, &mut rng) {
            Choice::Take(k) => {
                assert_eq!(k.subnet.to_string(), "10.244.1.0/24");
                let v6 = k.ipv6_subnet.expect("an IPv6 subnet too").to_string();
                assert!(v6.ends_with("::/64") && v6 != "fd00:10:0:1::/64" && v6 != "fd00:10::/64", "{v6}");
            }
            other => panic!("{other:?}"),
        }
        leases.insert(key("10.244.1.0-24&fd00:10:0:5::-64"), attrs("198.18.0.1"));
        assert_eq!(choose(&cfg, &leases, me, None, &mut rng), Choice::Reuse(key("10.244.1.0-24&fd00:10:0:5::-64")));
    }
}
