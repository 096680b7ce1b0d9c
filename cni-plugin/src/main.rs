//! `tartan`, the CNI plugin binary: the runtime's environment and stdin in, a result or an error document out.

use std::io::{Read, Write};

fn main() {
    let mut stdin = Vec::new();
    // A runtime always sends a config (VERSION may send an empty one); a read error is treated as empty input and
    // reported by the parser.
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let started = std::time::Instant::now();
    let env = |k: &str| std::env::var(k).ok();
    let outcome = tartan_cni::run(env, &stdin);
    tartan_cni::calllog::append(&stdin, &env, &outcome, started.elapsed());
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(outcome.stdout.as_bytes());
    let _ = out.flush();
    std::process::exit(outcome.exit_code);
}
