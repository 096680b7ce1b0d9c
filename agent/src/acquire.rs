//! Which subnet this node takes, in flanneld's order: (1) a lease already held under our public IP that still
//! fits the config; (2) the subnet of the old subnet.env, if nobody holds it; (3) a random pick among the first 100
//! free subnets from SubnetMin up. Pure: the registry applies the choice with a transaction and retries on a race.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use flannel::{LeaseAttrs, LeaseKey, NetworkConfig};
use ipnet::Ipv4Net;
use rand::Rng;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Our own lease is there: renew it (same key).
    Reuse(LeaseKey),
    /// A free subnet to create a lease for.
    Take(Ipv4Net),
    /// Every subnet between SubnetMin and SubnetMax is leased.
    Exhausted,
}

/// How many free subnets the random pick chooses among (flanneld's figure).
const RANDOM_AMONG: usize = 100;

pub fn choose(
    config: &NetworkConfig,
    leases: &BTreeMap<LeaseKey, LeaseAttrs>,
    public_ip: Ipv4Addr,
    previous: Option<Ipv4Net>,
    rng: &mut impl Rng,
) -> Choice {
    if let Some((k, _)) = leases.iter().find(|(k, a)| a.public_ip == public_ip && config.fits(&k.subnet)) {
        return Choice::Reuse(*k);
    }
    let taken = |s: &Ipv4Net| leases.keys().any(|k| k.subnet == *s);
    if let Some(prev) = previous.map(|p| p.trunc()) {
        if config.fits(&prev) && !taken(&prev) {
            return Choice::Take(prev);
        }
    }
    let free: Vec<Ipv4Net> = config.subnets().filter(|s| !taken(s)).take(RANDOM_AMONG).collect();
    if free.is_empty() {
        return Choice::Exhausted;
    }
    Choice::Take(free[rng.random_range(0..free.len())])
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
        let prev = Some("10.244.3.1/24".parse().unwrap());
        assert_eq!(choose(&cfg(), &leases, me, prev, &mut rng), Choice::Take("10.244.3.0/24".parse().unwrap()));
        // The previous subnet is someone else's now: a free one instead.
        let taken_prev = Some("10.244.1.1/24".parse().unwrap());
        match choose(&cfg(), &leases, me, taken_prev, &mut rng) {
            Choice::Take(s) => assert!(s.to_string() == "10.244.2.0/24" || s.to_string() == "10.244.3.0/24"),
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
}
