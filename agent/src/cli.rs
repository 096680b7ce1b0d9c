//! `tartan-agent`'s command line: flanneld's flags in, a node wired into the cluster network out (or `--cleanup`).
//! In the library so that the image's multi-call binary runs the same command.

use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Status;
use crate::options::{normalize_args, refused, Options};
use crate::run::run;
use clap::Parser;

/// The whole `tartan-agent` command: `args` as the process got them (program name first); the exit code.
pub fn main(args: impl Iterator<Item = String>) -> i32 {
    let args = normalize_args(args);
    // Usage errors are said before logging exists, the way clap says its own.
    if let Some(msg) = refused(&args, |k| std::env::var(k).ok()) {
        eprintln!("tartan-agent: {msg}");
        return 2;
    }
    let opts = Options::parse_from(args);
    if let Err(e) = telemetry::init_logging(&opts.log) {
        eprintln!("tartan-agent: {e}");
        return 2;
    }
    if opts.cleanup {
        match crate::cleanup::cleanup(&opts) {
            Ok(done) => {
                tracing::info!(removed = done.len(), "cleanup done");
                for d in done {
                    println!("removed {d}");
                }
                return 0;
            }
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "cleanup");
                eprintln!("tartan-agent: cleanup: {e:#}");
                return 1;
            }
        }
    }
    // The kernel may lag the leases this long before /healthz fails: a few resyncs, and never under 5 s.
    let bound = Duration::from_secs(3 * opts.route_resync.max(1)).max(Duration::from_secs(5));
    let status = Arc::new(Status::new(bound));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let code = rt.block_on(async {
        if opts.healthz_port != 0 {
            let addr = format!("{}:{}", opts.healthz_ip, opts.healthz_port);
            let listener = match addr.parse::<std::net::SocketAddr>() {
                Ok(a) => tokio::net::TcpListener::bind(a).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match listener {
                Ok(l) => {
                    let endpoints = status.clone();
                    tokio::spawn(async move {
                        if let Err(e) = telemetry::http::serve_on(l, endpoints).await {
                            tracing::error!(error = %e, "the health and metrics server stopped");
                        }
                    });
                }
                Err(e) => {
                    tracing::error!(%addr, error = %e, "--healthz-ip/--healthz-port: cannot serve there");
                    return 2;
                }
            }
        }
        tokio::select! {
            r = run(opts, status) => match r {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "exiting");
                    1
                }
            },
            // A normal stop leaves routes, rules and the lease in place: the next start takes over without loss.
            _ = tokio::signal::ctrl_c() => 0,
            _ = sigterm() => 0,
        }
    });
    code
}

async fn sigterm() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
