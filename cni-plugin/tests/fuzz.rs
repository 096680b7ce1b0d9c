//! Mutation fuzzing of everything the plugin parses from outside (config on stdin, subnet.env, CNI_* variables,
//! prevResult): seeded, deterministic, and run with the unit tests. Nothing may panic; every failure must be a
//! well-formed error document with a spec code.

use cni_types::{CniResult, Request};
use flannel::SubnetEnv;
use tartan_cni::config::{Need, Plan};

/// xorshift64*: small, deterministic, good enough to drive mutations.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "\"",
    "null",
    "true",
    "-1",
    "4294967296",
    "1e400",
    "\"10.0.0.0/8\"",
    "\"::/0\"",
    "\"ipam\"",
    "\"ranges\"",
    "\"subnet\"",
    "\"cniVersion\"",
    "\"1.1.0\"",
    "\"0.2.0\"",
    "\"delegate\"",
    "\\u0000",
    "\"mtu\"",
    "\"vlan\"",
    "=",
    "\n",
    "FLANNEL_SUBNET",
    "FLANNEL_MTU",
    "/",
    "255.255.255.255/32",
    "\u{1F600}",
];

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..=rng.below(8) {
        let at = rng.below(v.len() + 1);
        match rng.below(4) {
            0 if !v.is_empty() => {
                let end = (at + rng.below(16)).min(v.len());
                v.drain(at.min(end)..end);
            }
            1 => v.insert(at.min(v.len()), rng.next() as u8),
            2 => {
                let t = TOKENS[rng.below(TOKENS.len())].as_bytes();
                v.splice(at..at, t.iter().copied());
            }
            _ if !v.is_empty() => {
                let i = at.min(v.len() - 1);
                v[i] = rng.next() as u8;
            }
            _ => {}
        }
    }
    v
}

const CONF_SEEDS: &[&str] = &[
    r#"{"cniVersion":"1.1.0","name":"n","type":"tartan","isDefaultGateway":true,"ipMasq":true,"mtu":1450,"vlan":3,
       "ipam":{"type":"host-local","ranges":[[{"subnet":"10.1.0.0/24","rangeStart":"10.1.0.10","gateway":"10.1.0.1"}],
       [{"subnet":"fd00::/64"}]],"routes":[{"dst":"0.0.0.0/0"}],"dataDir":"/nonexistent/x"}}"#,
    r#"{"cniVersion":"0.3.1","name":"cbr0","type":"flannel","subnetFile":"/nonexistent/subnet.env","delegate":{"hairpinMode":true}}"#,
    r#"{"cniVersion":"1.0.0","name":"n","ipam":{"type":"static","addresses":[{"address":"10.0.0.1/24"}]},
       "prevResult":{"ips":[{"address":"10.0.0.1/24","interface":0}],"interfaces":[{"name":"eth0"}]}}"#,
];

#[test]
fn config_parser_never_panics_and_always_returns_a_spec_code() {
    let mut rng = Rng(0x7a27_a17a);
    for i in 0..30_000 {
        let seed = CONF_SEEDS[i % CONF_SEEDS.len()].as_bytes();
        let input = mutate(&mut rng, seed);
        for need in [Need::Ranges, Need::OwnersOnly] {
            if let Err(e) = Plan::from_stdin(&input, need) {
                let code = e.code.code();
                assert!(matches!(code, 1 | 6 | 7 | 11), "code {code} for {:?}", String::from_utf8_lossy(&input));
                assert!(!e.msg.is_empty());
            }
        }
        // The whole plugin on the same input, for the commands without side effects (a mutated dataDir could name
        // any directory, so nothing that writes runs here): never a panic, always JSON.
        for cmd in ["VERSION", "STATUS"] {
            let out = tartan_cni::run(|k| (k == "CNI_COMMAND").then(|| cmd.to_string()), &input);
            if !out.stdout.is_empty() {
                serde_json::from_str::<serde_json::Value>(&out.stdout).expect("output is JSON");
            }
        }
    }
}

#[test]
fn subnet_env_results_and_environment_parsers_never_panic() {
    let mut rng = Rng(0x5eed);
    let env_seed =
        b"FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
    let result_seed = br#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","mac":"aa:bb:cc:dd:ee:ff","sandbox":"/x"}],
        "ips":[{"address":"10.1.0.2/24","gateway":"10.1.0.1","interface":0,"version":"4"}],"routes":[{"dst":"0.0.0.0/0"}],
        "dns":{"nameservers":["10.96.0.10"]}}"#;
    for _ in 0..30_000 {
        let text = mutate(&mut rng, env_seed);
        let _ = SubnetEnv::parse(&String::from_utf8_lossy(&text));
        let res = mutate(&mut rng, result_seed);
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&res) {
            let _ = CniResult::from_value(&v);
        }
        let args = String::from_utf8_lossy(&mutate(&mut rng, b"IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=a"))
            .into_owned();
        let ifname = String::from_utf8_lossy(&mutate(&mut rng, b"eth0")).into_owned();
        let id = String::from_utf8_lossy(&mutate(&mut rng, b"abc-123.x_y")).into_owned();
        let _ = Request::from_env(|k| match k {
            "CNI_COMMAND" => Some("ADD".into()),
            "CNI_CONTAINERID" => Some(id.clone()),
            "CNI_NETNS" => Some("/run/netns/x".into()),
            "CNI_IFNAME" => Some(ifname.clone()),
            "CNI_ARGS" => Some(args.clone()),
            _ => None,
        });
    }
}
