//! Logging for every binary. What is logged is chosen by, in order: `TARTAN_LOG`, `RUST_LOG` (tracing's env-filter
//! syntax, e.g. `info,tartan_proxy=debug`), else the klog-style verbosity `-v N` that flanneld and kube-proxy take:
//! 0 and 1 give info, 2 and 3 debug, 4 and more trace (the HTTP/gRPC libraries stay at warn or info, or they would
//! drown ours). Lines go to stderr with a timestamp, as text or, with `--logging-format json` (kube-proxy's flag),
//! one JSON object per line; stdout stays free for what a command prints.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The logging flags, flattened into each binary's options.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LogArgs {
    /// Log verbosity, klog style: 0-1 info, 2-3 debug, 4+ trace (TARTAN_LOG or RUST_LOG override it).
    #[arg(short = 'v', long = "v", env = "TARTAN_V", default_value_t = 0, global = true)]
    pub verbosity: u8,
    /// Log line format: text or json.
    #[arg(long, env = "TARTAN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub logging_format: LogFormat,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{var}={value:?}: not a log filter: {reason}")]
    Filter { var: &'static str, value: String, reason: String },
    #[error("a logger is already installed")]
    AlreadySet,
}

/// Libraries whose debug output is about their own machinery, not about what Tartan does.
const QUIET: &[&str] = &["h2", "hyper", "hyper_util", "tower", "tonic", "rustls", "axum", "netlink_proto", "mio"];

/// The filter `-v N` means when no variable sets one.
pub fn verbosity_filter(v: u8) -> String {
    let (ours, theirs) = match v {
        0 | 1 => return "info".into(),
        2 | 3 => ("debug", "warn"),
        _ => ("trace", "info"),
    };
    let mut f = ours.to_string();
    for lib in QUIET {
        f += &format!(",{lib}={theirs}");
    }
    f
}

/// The filter in force: the first of `TARTAN_LOG` and `RUST_LOG` that is set (an invalid one is an error, not
/// silently ignored), else the verbosity's.
pub fn filter(args: &LogArgs, env: impl Fn(&str) -> Option<String>) -> Result<EnvFilter, LogError> {
    for var in ["TARTAN_LOG", "RUST_LOG"] {
        if let Some(value) = env(var).filter(|v| !v.trim().is_empty()) {
            return EnvFilter::builder().parse(&value).map_err(|e| LogError::Filter {
                var,
                value: value.clone(),
                reason: e.to_string(),
            });
        }
    }
    Ok(EnvFilter::new(verbosity_filter(args.verbosity)))
}

/// Installs the process's logger. Call once, first thing in main.
pub fn init(args: &LogArgs) -> Result<(), LogError> {
    install(args, filter(args, |k| std::env::var(k).ok())?)
}

/// For a command-line client (kubectl's habit): quiet but for warnings unless `-v` or a variable asks for more.
pub fn init_cli(args: &LogArgs) -> Result<(), LogError> {
    let f = filter(args, |k| std::env::var(k).ok())?;
    let quiet = args.verbosity == 0 && f.to_string() == "info";
    install(args, if quiet { EnvFilter::new("warn") } else { f })
}

fn install(args: &LogArgs, filter: EnvFilter) -> Result<(), LogError> {
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(true);
    let res = match args.logging_format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    res.map_err(|_| LogError::AlreadySet)
}

/// For the tools and the CNI plugin, which take no logging flags: a logger only when `TARTAN_LOG` or `RUST_LOG`
/// asks for one, else at `default` (None: no logger at all, which costs a short-lived plugin nothing).
pub fn init_from_env(default: Option<&str>) -> Result<bool, LogError> {
    let set = ["TARTAN_LOG", "RUST_LOG"].iter().any(|k| std::env::var(k).is_ok_and(|v| !v.trim().is_empty()));
    let filter = match (set, default) {
        (true, _) => filter(&LogArgs::default(), |k| std::env::var(k).ok())?,
        (false, Some(d)) => EnvFilter::new(d),
        (false, None) => return Ok(false),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init()
        .map_err(|_| LogError::AlreadySet)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbosity_maps_to_levels_and_keeps_libraries_quiet() {
        assert_eq!(verbosity_filter(0), "info");
        assert_eq!(verbosity_filter(1), "info");
        assert!(verbosity_filter(2).starts_with("debug,") && verbosity_filter(2).contains("h2=warn"));
        assert!(verbosity_filter(9).starts_with("trace,") && verbosity_filter(9).contains("tonic=info"));
    }

    #[test]
    fn the_first_variable_set_wins_and_a_bad_one_is_an_error() {
        let args = LogArgs { verbosity: 4, logging_format: LogFormat::Text };
        let env = |k: &str| match k {
            "TARTAN_LOG" => Some("warn".to_string()),
            "RUST_LOG" => Some("trace".to_string()),
            _ => None,
        };
        assert_eq!(filter(&args, env).unwrap().to_string(), "warn");
        let rust_only = |k: &str| (k == "RUST_LOG").then(|| "tartan_proxy=debug".to_string());
        assert_eq!(filter(&args, rust_only).unwrap().to_string(), "tartan_proxy=debug");
        let f = filter(&args, |_| None).unwrap().to_string();
        assert!(f.split(",").any(|d| d == "trace") && f.contains("tonic=info"), "{f}");
        let bad = |k: &str| (k == "TARTAN_LOG").then(|| "info,=[".to_string());
        let e = filter(&args, bad).unwrap_err().to_string();
        assert!(e.starts_with("TARTAN_LOG=\"info,=[\": not a log filter"), "{e}");
    }

    #[test]
    fn flags_parse_klog_style() {
        #[derive(clap::Parser)]
        struct O {
            #[command(flatten)]
            log: LogArgs,
        }
        use clap::Parser;
        assert_eq!(O::try_parse_from(["x", "-v", "2"]).unwrap().log.verbosity, 2);
        assert_eq!(O::try_parse_from(["x", "--v=4"]).unwrap().log.verbosity, 4);
        let o = O::try_parse_from(["x", "--logging-format", "json"]).unwrap();
        assert_eq!(o.log.logging_format, LogFormat::Json);
        assert!(O::try_parse_from(["x", "--logging-format", "xml"]).is_err());
    }
}
