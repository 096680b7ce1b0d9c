//! Losing an etcd member fails nothing: on a 3-member lab etcd, the member every client talks to is killed, then
//! (after it rejoined) the leader. After each, tartanctl works on its first try, the proxies program a new Service,
//! and the agents carry on (no exit, a new pod published).

use std::time::Duration;

use netns_lab::cluster::Backend;
use netns_lab::{wait_for, Lab};

fn apply(lab: &Lab, yaml: &str) {
    let out = lab.tartanctl(&["apply", "-f", "-"], Some(yaml)).unwrap();
    assert!(out.status.success(), "tartanctl without a retry: {}", String::from_utf8_lossy(&out.stderr));
}

fn connects(lab: &Lab, ns: &str, ip: &str) -> bool {
    lab.exec_status(ns, &["socat", "-T", "1", "-u", &format!("TCP:{ip}:80,connect-timeout=1"), "STDOUT"])
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn alive(pid: u32) -> bool {
    // Not a zombie: the lab reaps its children only when stopping them.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

#[test]
fn every_client_carries_on_when_the_member_it_uses_and_then_the_leader_die() {
    let mut lab = Lab::new("etcd3").expect("lab");
    lab.ensure_underlay().unwrap();
    lab.start_etcd_cluster().unwrap();
    lab.build_cluster(2, Backend::Vxlan, 1).unwrap();
    let agents: Vec<u32> =
        lab.state.processes.iter().copied().filter(|p| !lab.state.etcd_members.contains(&Some(*p))).collect();
    let proxies: Vec<u32> = ["n1", "n2"].iter().map(|n| lab.start_proxy(n, &[]).unwrap()).collect();
    apply(
        &lab,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web, labels: {app: web}}\nspec: {containers: [{name: c}]}\n",
    );
    lab.add_pod("n2", "web", "default").unwrap();
    let web = lab.pod("web").unwrap().ns.clone();
    lab.spawn(&web, &["socat", "TCP-LISTEN:80,fork,reuseaddr", "SYSTEM:echo web"]).unwrap();
    lab.add_pod("n1", "client", "default").unwrap();
    let client = lab.pod("client").unwrap().ns.clone();
    apply(&lab, "apiVersion: v1\nkind: Service\nmetadata: {name: s0}\nspec: {clusterIP: 10.96.3.10, selector: {app: web}, ports: [{port: 80}]}\n");
    assert!(wait_for(Duration::from_secs(10), || connects(&lab, &client, "10.96.3.10")));

    // Every client probes the members in order: member 0 is the one they use. Then the leader (member 0 back).
    let leader = |lab: &Lab| lab.etcd_leader().unwrap();
    for (round, victim) in [(1, None), (2, Some(()))] {
        let m = match victim {
            None => 0,
            Some(()) => {
                lab.start_etcd_member(0).unwrap();
                assert!(wait_for(Duration::from_secs(20), || lab
                    .etcdctl(&["endpoint", "health", "--cluster"])
                    .is_ok()));
                leader(&lab)
            }
        };
        eprintln!("round {round}: killing member {m}");
        lab.kill_etcd_member(m).unwrap();
        let vip = format!("10.96.3.{}", 10 + round);
        apply(&lab, &format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s{round}}}\nspec: {{clusterIP: {vip}, selector: {{app: web}}, ports: [{{port: 80}}]}}\n"));
        assert!(wait_for(Duration::from_secs(15), || connects(&lab, &client, &vip)), "round {round}: programmed");
        assert!(connects(&lab, &client, "10.96.3.10"), "round {round}: old service");
        // The agents publish a new pod (the store write goes to a live member).
        let pod = format!("late{round}");
        lab.add_pod("n1", &pod, "default").unwrap();
        assert!(
            wait_for(Duration::from_secs(15), || {
                lab.tartanctl(&["get", "pod", &pod, "-o", "json"], None)
                    .map(|o| String::from_utf8_lossy(&o.stdout).contains("\"podIP\""))
                    .unwrap_or(false)
            }),
            "round {round}: the agent published {pod}"
        );
        for pid in agents.iter().chain(&proxies) {
            assert!(alive(*pid), "round {round}: process {pid} exited");
        }
    }
    lab.teardown();
}
