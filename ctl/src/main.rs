//! `tartanctl`: kubectl's apply, get and delete against Tartan's cluster store in etcd.

mod apply;
mod cli;
mod get;
mod print;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    if let Err(e) = telemetry::init_cli(&cli.log) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    if let Err(e) = rt.block_on(cli::run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
