//! `tartan-node`: the image's one binary for the node's two daemons. tartan-agent and tartan-proxy share most of
//! their code (tokio, the etcd client, TLS, HTTP, metrics); linked once, the image is about 10 MB smaller. Started
//! as `tartan-agent` or `tartan-proxy` (the image's symlinks), or as `tartan-node agent|proxy ...`, it runs exactly
//! that command, from the same library code as the separate binaries.

use std::path::Path;

fn main() {
    let mut args: Vec<String> = std::env::args().collect();
    let called = args.first().map(|a| Path::new(a).file_name().unwrap_or_default().to_string_lossy().into_owned());
    let which = match called.as_deref() {
        Some(c @ ("tartan-agent" | "tartan-proxy")) => c.to_string(),
        _ => match args.get(1).map(String::as_str) {
            Some("agent" | "proxy") => {
                // `tartan-node agent --flag` runs as `tartan-agent --flag`.
                let which = format!("tartan-{}", args.remove(1));
                args[0] = which.clone();
                which
            }
            _ => {
                eprintln!("usage: tartan-node agent|proxy [FLAGS...] (or run it as tartan-agent or tartan-proxy)");
                std::process::exit(2);
            }
        },
    };
    let code = match which.as_str() {
        "tartan-agent" => tartan_agent::cli::main(args.into_iter()),
        _ => tartan_proxy::cli::main(args.into_iter()),
    };
    std::process::exit(code);
}
