//! `tartan-proxy`: flags, then the daemon or `--cleanup` ([`tartan_proxy::cli`]).

fn main() {
    std::process::exit(tartan_proxy::cli::main(std::env::args()));
}
