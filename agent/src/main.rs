//! `tartan-agent`: flanneld's flags in, a node wired into the cluster network out.

use std::sync::{Arc, Mutex};

use clap::Parser;
use tartan_agent::options::{normalize_args, refused, Options};
use tartan_agent::run::{run, serve_health, Health};

fn main() {
    let args = normalize_args(std::env::args());
    if let Some(msg) = refused(&args, |k| std::env::var(k).ok()) {
        eprintln!("tartan-agent: {msg}");
        std::process::exit(2);
    }
    let opts = Options::parse_from(args);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let code = rt.block_on(async {
        let health = Arc::new(Mutex::new(Health::default()));
        if opts.healthz_port != 0 {
            let addr = format!("{}:{}", opts.healthz_ip, opts.healthz_port);
            match addr.parse() {
                Ok(a) => {
                    let h = health.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_health(a, h).await {
                            eprintln!("tartan-agent: healthz: {e:#}");
                        }
                    });
                }
                Err(e) => {
                    eprintln!("tartan-agent: --healthz-ip/--healthz-port {addr:?}: {e}");
                    return 2;
                }
            }
        }
        tokio::select! {
            r = run(opts, health) => match r {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("tartan-agent: {e:#}");
                    1
                }
            },
            // A normal stop leaves routes, rules and the lease in place: the next start takes over without loss.
            _ = tokio::signal::ctrl_c() => 0,
            _ = sigterm() => 0,
        }
    });
    std::process::exit(code);
}

async fn sigterm() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
