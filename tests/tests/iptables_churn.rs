//! The iptables dataplane under churn: hundreds of syncs of random Service, endpoint, pod and policy changes in a
//! lab node where the agent (flannel's chains, rewritten every second) and another writer touch the same tables,
//! with failures injected half-way through syncs. After every successful sync the kernel's content is compared
//! with the model: our chains, each rule's targets, ports, addresses and sets, and every set's members.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use netns_lab::cluster::Backend;
use netns_lab::Lab;
use proxy_state::policy::{PodPolicy, PortMatch, Rule};
use proxy_state::{Dataplane, Endpoint, PeerSet, PolicyModel, Proto, ServicePort, SetKind, SetRef, State};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tartan_proxy::iptables::{policy_rules, rules, sets, IptablesDataplane};

const CLUSTER_CIDR: &str = "10.244.0.0/16";

fn ip4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

/// A random Service port `i` (stable id and address, random everything else).
fn random_port(rng: &mut StdRng, i: u8) -> ServicePort {
    let proto = [Proto::Tcp, Proto::Udp, Proto::Sctp][rng.random_range(0..3)];
    let eps = (0..rng.random_range(0..4))
        .map(|e| {
            let mut ep = Endpoint::ready(ip4(10, 244, rng.random_range(1..3), 10 + e), 8080, rng.random_bool(0.5));
            if rng.random_bool(0.1) {
                (ep.ready, ep.serving, ep.terminating) = (false, true, true);
            }
            ep
        })
        .collect();
    let external = if rng.random_bool(0.3) { vec![ip4(198, 18, 9, i)] } else { vec![] };
    ServicePort::new(
        format!("churn/svc{i}:p/{}", proto.as_str()),
        proto,
        ip4(10, 96, 7, i),
        80,
        rng.random_bool(0.3).then_some(30000 + u16::from(i)),
        external,
        rng.random_bool(0.2).then_some(rng.random_range(1..1000)),
        (rng.random_bool(0.3), rng.random_bool(0.2)),
        eps,
    )
}

fn set_ref(kind: SetKind, n: u8) -> SetRef {
    SetRef { kind, v6: false, hash: format!("{n:016X}") }
}

fn random_members(rng: &mut StdRng, kind: SetKind) -> PeerSet {
    let n = rng.random_range(0..5);
    match kind {
        SetKind::Selector => PeerSet::Addresses((0..n).map(|_| ip4(10, 244, 2, rng.random_range(2..200))).collect()),
        SetKind::Block => PeerSet::Block {
            cidr: format!("10.{}.0.0/16", rng.random_range(0..255)).parse().unwrap(),
            except: (0..n % 3).map(|k| format!("10.0.{k}.0/24").parse().unwrap()).collect(),
        },
        SetKind::NamedPort => PeerSet::AddrPorts(
            (0..n).map(|_| (ip4(10, 244, 2, rng.random_range(2..200)), Proto::Tcp, rng.random_range(80..90))).collect(),
        ),
    }
}

fn random_rules(rng: &mut StdRng) -> Vec<Rule> {
    (0..rng.random_range(0..3))
        .map(|_| {
            let peers = rng.random_bool(0.7).then(|| {
                (0..rng.random_range(1..3))
                    .map(|_| {
                        set_ref([SetKind::Selector, SetKind::Block][rng.random_range(0..2)], rng.random_range(0..3))
                    })
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect()
            });
            let ports = rng.random_bool(0.6).then(|| match rng.random_range(0..3) {
                0 => vec![PortMatch::Proto(Proto::Udp)],
                1 => vec![PortMatch::Range(Proto::Tcp, 80, rng.random_range(80..90))],
                _ => vec![PortMatch::Named(Proto::Tcp, set_ref(SetKind::NamedPort, rng.random_range(0..2)))],
            });
            Rule { peers, ports }
        })
        .collect()
}

/// A random policy model for `pods` (id, ip, veth), with exactly the sets its rules refer to.
fn random_policy(rng: &mut StdRng, pods: &[(String, IpAddr, Option<String>)]) -> PolicyModel {
    let mut out = Vec::new();
    for (id, ip, veth) in pods {
        let ingress = rng.random_bool(0.5).then(|| random_rules(rng));
        let egress = rng.random_bool(0.3).then(|| random_rules(rng));
        out.push(PodPolicy { id: id.clone(), ip: *ip, veth: veth.clone(), ingress, egress });
    }
    let mut refs = BTreeSet::new();
    for p in &out {
        for r in p.ingress.iter().chain(p.egress.iter()).flatten() {
            refs.extend(r.peers.iter().flatten().cloned());
            for m in r.ports.iter().flatten() {
                if let PortMatch::Named(_, s) = m {
                    refs.insert(s.clone());
                }
            }
        }
    }
    let sets = refs.into_iter().map(|r| (r.clone(), random_members(rng, r.kind))).collect();
    PolicyModel { pods: out, sets }
}

/// Per chain of ours (not the plugin's), each rule as the values of the flags that decide where a packet goes.
fn our_chains(save: &str) -> BTreeMap<String, Vec<Vec<String>>> {
    let mut chains: BTreeMap<String, Vec<Vec<String>>> = BTreeMap::new();
    let ours = |c: &str| c.starts_with("TARTAN-") && !c.starts_with(node_contract::PLUGIN_MASQ_CHAIN_PREFIX);
    for line in save.lines() {
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default();
            if ours(name) {
                chains.entry(name.to_string()).or_default();
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let (chain, rest) = rule.split_once(' ').unwrap_or((rule, ""));
            if ours(chain) {
                chains.entry(chain.to_string()).or_default().push(key_values(rest));
            }
        }
    }
    chains
}

fn key_values(rule: &str) -> Vec<String> {
    let words: Vec<&str> = rule.split_whitespace().collect();
    let mut v = Vec::new();
    for (i, w) in words.iter().enumerate() {
        if ["-j", "--dport", "-d", "-s", "--match-set", "--to-destination", "--physdev-in"].contains(w) {
            v.push(format!("{w} {}", words.get(i + 1).copied().unwrap_or_default()));
        }
    }
    // iptables-save puts addresses before matches, whatever order they were written in.
    v.sort();
    v
}

/// What the kernel must hold for `state`, in the same form.
fn expected(state: &State) -> BTreeMap<String, Vec<Vec<String>>> {
    let opts = rules::Options { cluster_cidr: CLUSTER_CIDR.parse().ok(), ..Default::default() };
    let mut want = rules::render(state.services.iter(), &opts);
    policy_rules::render_policy(&state.policy, false, &mut want);
    let mut out = BTreeMap::new();
    for chains in [&want.nat, &want.filter] {
        for (name, rules) in chains {
            out.insert(name.clone(), rules.iter().map(|r| key_values(&r.replace('"', ""))).collect());
        }
    }
    out
}

fn check(node_ns: &str, state: &State, i: usize) {
    let save = |table: &str| {
        let out = netns_lab::command_in(node_ns, "iptables-save").unwrap().args(["-t", table]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (nat, filter) = (save("nat"), save("filter"));
    let mut have = our_chains(&nat);
    have.extend(our_chains(&filter));
    let want = expected(state);
    assert_eq!(have.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "sync {i}: chains");
    for (name, rules) in &want {
        assert_eq!(&have[name], rules, "sync {i}: chain {name}");
    }
    let first_forward = filter.lines().find(|l| l.starts_with("-A FORWARD ")).unwrap_or_default();
    assert!(first_forward.ends_with("-j TARTAN-POLICY"), "sync {i}: policy first in FORWARD: {first_forward}");
    assert!(nat.contains(":FLANNEL-POSTRTG"), "sync {i}: the agent's chain is untouched");
    let sets_out = netns_lab::command_in(node_ns, "ipset").unwrap().arg("save").output().unwrap();
    let mut have_sets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in String::from_utf8_lossy(&sets_out.stdout).lines() {
        let w: Vec<&str> = line.splitn(3, ' ').collect();
        match w.as_slice() {
            ["create", name, _] if name.starts_with(sets::SET_PREFIX) => {
                have_sets.entry(name.to_string()).or_default();
            }
            ["add", name, member] if name.starts_with(sets::SET_PREFIX) => {
                have_sets.entry(name.to_string()).or_default().insert(member.to_string());
            }
            _ => {}
        }
    }
    let want_sets: BTreeMap<String, BTreeSet<String>> =
        sets::ipsets(&state.policy.sets).into_iter().map(|(n, s)| (n, s.members)).collect();
    assert_eq!(have_sets, want_sets, "sync {i}: sets");
}

#[test]
fn hundreds_of_random_syncs_leave_the_kernel_holding_exactly_the_model() {
    let mut lab = Lab::new("churn").expect("lab");
    lab.build_cluster(1, Backend::Vxlan, 1).expect("cluster");
    let mut pods = Vec::new();
    for name in ["a", "b"] {
        lab.add_pod("n1", name, "churn").unwrap();
    }
    let run_dir = lab.node("n1").unwrap().root.join("run/tartan");
    let veths = proxy_state::policy::local_veths(&run_dir);
    for name in ["a", "b"] {
        let ip: IpAddr = lab.pod(name).unwrap().ip.parse().unwrap();
        pods.push((format!("churn/{name}"), ip, veths.get(&("churn".to_string(), name.to_string())).cloned()));
    }
    pods.push(("churn/remote-looking".into(), ip4(10, 244, 1, 250), None));
    let node_ns = lab.node("n1").unwrap().ns.clone();
    // Another writer of the same tables, all the time.
    lab.spawn(
        &node_ns,
        &["sh", "-c", "iptables -w -N CHURN-OTHER; while :; do iptables -w -A CHURN-OTHER -j RETURN; iptables -w -F CHURN-OTHER; done"],
    )
    .unwrap();
    let seed: u64 = std::env::var("CHURN_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("CHURN_SEED={seed}");
    let ns = netns::NetNs::named(&node_ns).unwrap();
    let (syncs, failures) = ns
        .run(|| {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut dp = IptablesDataplane::new(vec![CLUSTER_CIDR.parse().unwrap()], vec![]);
            let mut services: BTreeMap<u8, ServicePort> = BTreeMap::new();
            let mut policy = PolicyModel::default();
            let (mut syncs, mut failures) = (0, 0);
            let mut previous = State::default();
            for i in 0..300usize {
                for _ in 0..rng.random_range(1..4) {
                    let k = rng.random_range(0..40u8);
                    if rng.random_bool(0.2) {
                        services.remove(&k);
                    } else {
                        services.insert(k, random_port(&mut rng, k));
                    }
                }
                if rng.random_bool(0.3) {
                    policy = random_policy(&mut rng, &pods);
                }
                if i % 40 == 38 {
                    if policy.pods.is_empty() {
                        policy = random_policy(&mut rng, &pods);
                    }
                    // Sure to hold a set, for the failure injected next.
                    let rule = Rule { peers: Some(vec![set_ref(SetKind::Selector, 9)]), ports: None };
                    policy.pods[0].ingress = Some(vec![rule]);
                    policy.sets.insert(set_ref(SetKind::Selector, 9), random_members(&mut rng, SetKind::Selector));
                }
                if i % 40 == 39 {
                    policy = PolicyModel::default();
                }
                let mut all: Vec<ServicePort> = services.values().cloned().collect();
                all.sort_by(|a, b| a.id.cmp(&b.id));
                let state =
                    State { generation: i as u64 + 1, services: Arc::new(all), policy: Arc::new(policy.clone()) };
                // Every 40th: a set this sync drops is held by someone else's rule, so the sync fails after its
                // rules were written; the next syncs must repair everything once the hold is released.
                let held = (i % 40 == 39).then(|| dp_held_set(&node_ns, &state)).flatten();
                let res = dp.sync(&state, false);
                if let Some(set) = held {
                    assert!(res.is_err(), "sync {i}: destroying {set} while held must fail");
                    failures += 1;
                    run(&node_ns, &["iptables", "-w", "-F", "HOLDER"]);
                    run(&node_ns, &["iptables", "-w", "-X", "HOLDER"]);
                    // Back to the state before the failed sync, not forced full: a dataplane that still believed
                    // the kernel held that state would skip rewriting the chains the failed sync deleted.
                    let back = State { generation: state.generation + 1000, ..previous.clone() };
                    dp.sync(&back, false).unwrap_or_else(|e| panic!("sync {i} back after the failure: {e}"));
                    check(&node_ns, &back, i);
                    dp.sync(&state, false).unwrap_or_else(|e| panic!("sync {i} after the failure: {e}"));
                } else {
                    res.unwrap_or_else(|e| panic!("sync {i}: {e}"));
                }
                syncs += 1;
                check(&node_ns, &state, i);
                previous = state.clone();
                // Every 25th: the policy chain flushed by hand is found (by content) on an idle check.
                if i % 25 == 24 {
                    run(&node_ns, &["iptables", "-w", "-F", "TARTAN-POLICY"]);
                    let r = dp.sync(&state, false).unwrap_or_else(|e| panic!("check {i}: {e}"));
                    assert_eq!(r.repaired, Some("policy-chain"), "sync {i}");
                    check(&node_ns, &state, i);
                }
            }
            (syncs, failures)
        })
        .unwrap();
    assert!(syncs >= 300 && failures >= 3, "{syncs} syncs, {failures} injected failures");
    lab.teardown();
}

fn run(ns: &str, argv: &[&str]) {
    let out = netns_lab::command_in(ns, argv[0]).unwrap().args(&argv[1..]).output().unwrap();
    assert!(out.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Holds one of the kernel's sets that `state` does not use, with a chain of someone else's; its name, if any.
fn dp_held_set(ns: &str, state: &State) -> Option<String> {
    let want = sets::ipsets(&state.policy.sets);
    let out = netns_lab::command_in(ns, "ipset").unwrap().args(["list", "-n"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let set = text.lines().find(|n| n.starts_with(sets::SET_PREFIX) && !want.contains_key(*n))?.to_string();
    run(ns, &["iptables", "-w", "-N", "HOLDER"]);
    let flags = if set.contains("-NP-") { "dst,dst" } else { "src" };
    run(ns, &["iptables", "-w", "-A", "HOLDER", "-m", "set", "--match-set", &set, flags, "-j", "RETURN"]);
    Some(set)
}
