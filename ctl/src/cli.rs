use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use kube_objects::Kind;
use store::{Store, Tls};

#[derive(Parser)]
#[command(name = "tartanctl", version, about = "Apply, get and delete Kubernetes-style objects in Tartan's store")]
pub struct Cli {
    #[command(flatten)]
    pub conn: Conn,
    /// `-v N` as kubectl takes it, `--logging-format`.
    #[command(flatten)]
    pub log: telemetry::LogArgs,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Args)]
pub struct Conn {
    /// etcd endpoints, comma-separated.
    #[arg(long, global = true, env = "TARTAN_ETCD_ENDPOINTS", default_value = "http://127.0.0.1:2379")]
    pub etcd_endpoints: String,
    #[arg(long, global = true, env = "TARTAN_ETCD_CAFILE")]
    pub etcd_cafile: Option<PathBuf>,
    #[arg(long, global = true, env = "TARTAN_ETCD_CERTFILE")]
    pub etcd_certfile: Option<PathBuf>,
    #[arg(long, global = true, env = "TARTAN_ETCD_KEYFILE")]
    pub etcd_keyfile: Option<PathBuf>,
    /// The store's key prefix.
    #[arg(long, global = true, env = "TARTAN_STORE_PREFIX", default_value = store::DEFAULT_PREFIX)]
    pub prefix: String,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Create or update the objects of files, directories or stdin (`-`); nothing is written if any is invalid.
    Apply {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
    },
    /// Show objects: pods, services, endpoints (computed for selectors), nodes, namespaces, networkpolicies.
    Get {
        kind: String,
        names: Vec<String>,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// wide, yaml or json.
        #[arg(short = 'o', long)]
        output: Option<String>,
    },
    /// Delete the objects of files (`-f`), or KIND NAME...
    Delete {
        #[arg(short = 'f', long = "filename")]
        files: Vec<String>,
        kind: Option<String>,
        names: Vec<String>,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
}

pub fn parse_kind(s: &str) -> Result<Kind> {
    Kind::parse(s).with_context(|| {
        format!("the server doesn't have a resource type {s:?} (known: namespaces, nodes, pods, services, endpoints, networkpolicies)")
    })
}

pub async fn run(cli: Cli) -> Result<()> {
    let c = &cli.conn;
    let tls = Tls::from_files(c.etcd_cafile.as_deref(), c.etcd_certfile.as_deref(), c.etcd_keyfile.as_deref())?;
    let connect = || async {
        tracing::debug!(endpoints = %c.etcd_endpoints, prefix = %c.prefix, tls = tls.is_some(), "connecting to the store");
        Store::connect(&c.etcd_endpoints, &c.prefix, tls.as_ref()).await
    };
    match cli.cmd {
        Cmd::Apply { files } => {
            let docs = crate::apply::read_all(&files)?;
            crate::apply::apply(&mut connect().await?, docs).await
        }
        Cmd::Get { kind, names, namespace, all_namespaces, output } => {
            let kind = parse_kind(&kind)?;
            let ns = if all_namespaces { None } else { Some(namespace.unwrap_or_else(|| "default".into())) };
            crate::get::get(&mut connect().await?, kind, &names, ns.as_deref(), output.as_deref()).await
        }
        Cmd::Delete { files, kind, names, namespace } => {
            let mut store = connect().await?;
            if !files.is_empty() {
                if kind.is_some() {
                    bail!("give either -f or KIND NAME, not both");
                }
                let docs = crate::apply::read_all(&files)?;
                return crate::apply::delete_docs(&mut store, docs).await;
            }
            let Some(kind) = kind else { bail!("delete needs -f FILE or KIND NAME") };
            if names.is_empty() {
                bail!("delete {kind} needs at least one NAME");
            }
            let kind = parse_kind(&kind)?;
            let ns = namespace.unwrap_or_else(|| "default".into());
            let mut missing = Vec::new();
            for name in &names {
                if store.delete(kind, Some(ns.as_str()).filter(|_| kind.namespaced()), name).await? {
                    println!("{} \"{name}\" deleted", kind.name().to_ascii_lowercase());
                } else {
                    missing.push(format!("{} \"{name}\" not found", kind.plural()));
                }
            }
            if !missing.is_empty() {
                bail!("(NotFound): {}", missing.join(", "));
            }
            Ok(())
        }
    }
}
