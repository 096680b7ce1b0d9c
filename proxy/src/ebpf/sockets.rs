//! Connected UDP sockets and removed backends. Socket load balancing picks a backend once, at connect(): a client
//! that keeps one connected UDP socket (a resolver, a metrics agent) would go on sending to a backend that is gone,
//! the most reported failure of socket-LB designs. Without the kernel's bpf_sock_destroy (a kfunc this toolchain
//! cannot call), the proxy closes such sockets itself with the kernel's socket-diag SOCK_DESTROY (`ss -K`), in the
//! node's namespace and in every pod's: the client sees an error on its next call and, reconnecting, is balanced
//! again to a live backend.

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// `ss` filter for connected UDP sockets to `ip:port`.
fn filter(ip: IpAddr, port: u16) -> Vec<String> {
    let dst = match ip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    ["-K", "-n", "-u", "dst", &dst, "dport", "=", &format!(":{port}")].iter().map(|s| s.to_string()).collect()
}

/// Closes, in the node's namespace and in each pod's on this node, the UDP sockets connected to a removed backend.
/// Best effort: a namespace that went away meanwhile is skipped; the number of namespaces that failed comes back.
pub fn close_udp(run_dir: &Path, gone: &[(IpAddr, u16)]) -> usize {
    if gone.is_empty() {
        return 0;
    }
    let mut namespaces: Vec<Option<String>> = vec![None];
    namespaces.extend(node_contract::pods::load_all(run_dir).into_iter().filter_map(|r| r.netns).map(Some));
    namespaces.sort();
    namespaces.dedup();
    let mut failed = 0;
    for ns in &namespaces {
        for (ip, port) in gone {
            let mut cmd = match ns {
                None => Command::new("ss"),
                Some(path) => {
                    let mut c = Command::new("nsenter");
                    c.arg(format!("--net={path}")).arg("ss");
                    c
                }
            };
            cmd.args(filter(*ip, *port));
            match child_process::run(&mut cmd, None, Duration::from_secs(5)) {
                Ok(out) if out.status.success() => {}
                Ok(out) => {
                    failed += 1;
                    tracing::debug!(netns = ns.as_deref().unwrap_or("node"), status = %out.status, "ss -K failed");
                }
                Err(e) => {
                    failed += 1;
                    tracing::debug!(netns = ns.as_deref().unwrap_or("node"), error = %e, "ss -K failed");
                }
            }
        }
    }
    failed
}
