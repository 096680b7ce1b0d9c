//! `tartan-agent`: flanneld's flags in, a node wired into the cluster network out ([`tartan_agent::cli`]).

fn main() {
    std::process::exit(tartan_agent::cli::main(std::env::args()));
}
