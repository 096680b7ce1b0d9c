//! `tartan`, the CNI plugin binary: the runtime's environment and stdin in, a result or an error document out.

use std::io::{Read, Write};

fn main() {
    // `tartan install ...` (a DaemonSet's init container); a runtime always sets CNI_COMMAND.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("install") && std::env::var_os("CNI_COMMAND").is_none() {
        std::process::exit(install(&args[1..]));
    }
    let mut stdin = Vec::new();
    // A runtime always sends a config (VERSION may send an empty one); a read error is treated as empty input and
    // reported by the parser.
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let started = std::time::Instant::now();
    // Stderr, only when TARTAN_LOG or RUST_LOG asks (runtimes mostly drop a plugin's stderr; the per-call record an
    // operator reads is the config's "logFile"). An invalid filter must not fail the call: it is said and ignored.
    if let Err(e) = telemetry::init_from_env(None) {
        eprintln!("tartan: {e}");
    }
    let env = |k: &str| std::env::var(k).ok();
    let outcome = tartan_cni::run(env, &stdin);
    tracing::debug!(
        command = env("CNI_COMMAND").unwrap_or_default(),
        container = env("CNI_CONTAINERID").unwrap_or_default(),
        netns = env("CNI_NETNS").unwrap_or_default(),
        ifname = env("CNI_IFNAME").unwrap_or_default(),
        exit_code = outcome.exit_code,
        took_us = started.elapsed().as_micros() as u64,
        "call done"
    );
    tartan_cni::calllog::append(&stdin, &env, &outcome, started.elapsed());
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(outcome.stdout.as_bytes());
    let _ = out.flush();
    std::process::exit(outcome.exit_code);
}

fn install(args: &[String]) -> i32 {
    if let Err(e) = telemetry::init_from_env(None) {
        eprintln!("tartan install: {e}");
        return 2;
    }
    let me = std::env::current_exe().unwrap_or_else(|_| "/tartan".into());
    let result = tartan_cni::install::parse_args(args, me).and_then(|o| tartan_cni::install::install(&o));
    match result {
        Ok(actions) => {
            for a in actions {
                println!("tartan install: {a}");
            }
            0
        }
        Err(e) => {
            eprintln!("tartan install: {e}");
            e.exit_code()
        }
    }
}
