//! Calling CNI plugins the way a runtime does (libcni's behaviour, for the lab and the benchmarks): the config
//! list read from a node's net.d, each plugin run from CNI_PATH inside the node's namespace with CNI_* variables
//! and its config (name, cniVersion and prevResult injected) on stdin, DEL in reverse order.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

/// Where the `tartan` binary is: $TARTAN_BIN_DIR, else the directory of this executable or the cargo target
/// directory it lives under.
pub fn tartan_bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("TARTAN_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    for dir in exe.ancestors().skip(1) {
        if dir.join("tartan").is_file() {
            return dir.to_path_buf();
        }
        for profile in ["release", "debug"] {
            if dir.join(profile).join("tartan").is_file() {
                return dir.join(profile);
            }
        }
    }
    PathBuf::from("/opt/cni/bin")
}

/// CNI_PATH for lab runs: our binaries first, then Debian's reference plugins.
pub fn plugin_path() -> String {
    format!("{}:/usr/lib/cni", tartan_bin_dir().display())
}

/// Per-attachment arguments of an invocation.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The node namespace the plugin runs in.
    pub node_ns: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
    pub path: String,
}

/// What a plugin printed and how it exited.
#[derive(Debug, Clone)]
pub struct PluginRun {
    pub stdout: String,
    pub stderr: String,
    pub success: bool,
    pub elapsed: Duration,
}

impl PluginRun {
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout).with_context(|| format!("plugin printed {:?}", self.stdout))
    }

    /// The error code of an error document, if that is what was printed.
    pub fn error_code(&self) -> Option<u64> {
        serde_json::from_str::<Value>(&self.stdout).ok()?.get("code")?.as_u64()
    }
}

/// Runs one plugin binary inside `node_ns`, with exactly the variables given (plus PATH), and `stdin`.
pub fn exec_raw(node_ns: &str, plugin: &Path, env: &[(&str, &str)], stdin: &[u8]) -> Result<PluginRun> {
    let mut cmd = crate::command_in(node_ns, plugin)?;
    cmd.env_clear().env("PATH", std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into()));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", plugin.display()))?;
    child.stdin.take().expect("piped").write_all(stdin)?;
    let out = child.wait_with_output()?;
    Ok(PluginRun {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        success: out.status.success(),
        elapsed: start.elapsed(),
    })
}

fn find_plugin(path: &str, ty: &str) -> Result<PathBuf> {
    path.split(':')
        .map(|d| Path::new(d).join(ty))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("plugin {ty} not found in {path}"))
}

/// Runs `command` for one plugin config of a list.
pub fn exec(command: &str, inv: &Invocation, plugin_conf: &Value) -> Result<PluginRun> {
    let ty = plugin_conf["type"].as_str().ok_or_else(|| anyhow!("plugin config without type"))?;
    let plugin = find_plugin(&inv.path, ty)?;
    let env = [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", inv.container_id.as_str()),
        ("CNI_NETNS", inv.netns.as_str()),
        ("CNI_IFNAME", inv.ifname.as_str()),
        ("CNI_ARGS", inv.args.as_str()),
        ("CNI_PATH", inv.path.as_str()),
    ];
    exec_raw(&inv.node_ns, &plugin, &env, plugin_conf.to_string().as_bytes())
}

/// A network configuration list (a `.conflist`, or a single `.conf` wrapped as one).
#[derive(Debug, Clone)]
pub struct ConfList {
    pub name: String,
    pub cni_version: String,
    pub plugins: Vec<Value>,
}

impl ConfList {
    pub fn from_value(v: &Value) -> Result<ConfList> {
        let name = v["name"].as_str().ok_or_else(|| anyhow!("config without name"))?.to_string();
        let cni_version = v["cniVersion"].as_str().unwrap_or("1.0.0").to_string();
        let plugins = match v.get("plugins") {
            Some(Value::Array(p)) => p.clone(),
            _ => vec![v.clone()],
        };
        Ok(ConfList { name, cni_version, plugins })
    }

    /// The first config file by name in `dir`, as libcni picks it.
    pub fn load_dir(dir: &Path) -> Result<ConfList> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("conflist" | "conf" | "json")))
            .collect();
        files.sort();
        let first = files.first().ok_or_else(|| anyhow!("no CNI config in {}", dir.display()))?;
        let v: Value = serde_json::from_str(&std::fs::read_to_string(first)?)?;
        ConfList::from_value(&v)
    }

    /// A plugin's config as the runtime sends it: name and cniVersion from the list, prevResult, and runtimeConfig
    /// holding what the runtime supplies of the capabilities the plugin declares.
    fn plugin_conf(&self, p: &Value, prev: Option<&Value>, runtime: &Value) -> Value {
        let mut c = p.clone();
        c["name"] = json!(self.name);
        c["cniVersion"] = json!(self.cni_version);
        if let Some(prev) = prev {
            c["prevResult"] = prev.clone();
        }
        if let (Some(caps), Some(supplied)) = (p.get("capabilities").and_then(Value::as_object), runtime.as_object()) {
            let rc: serde_json::Map<String, Value> = supplied
                .iter()
                .filter(|(k, _)| caps.get(*k).and_then(Value::as_bool) == Some(true))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if !rc.is_empty() {
                c["runtimeConfig"] = Value::Object(rc);
            }
        }
        c
    }

    /// ADD through every plugin; on failure, DEL what was added and return the error.
    pub fn add(&self, inv: &Invocation) -> Result<Value> {
        self.add_with(inv, &Value::Null)
    }

    /// ADD with runtime-supplied capability values (e.g. `{"portMappings": [...]}`).
    pub fn add_with(&self, inv: &Invocation, runtime: &Value) -> Result<Value> {
        let mut prev: Option<Value> = None;
        for (i, p) in self.plugins.iter().enumerate() {
            let run = exec("ADD", inv, &self.plugin_conf(p, prev.as_ref(), runtime))?;
            if !run.success {
                for q in self.plugins[..=i].iter().rev() {
                    let _ = exec("DEL", inv, &self.plugin_conf(q, None, runtime));
                }
                bail!("ADD failed in plugin {}: {}{}", p["type"], run.stdout.trim(), run.stderr.trim());
            }
            prev = Some(run.json()?);
        }
        prev.ok_or_else(|| anyhow!("empty plugin list"))
    }

    /// DEL through every plugin in reverse; every plugin runs even if one fails.
    pub fn del(&self, inv: &Invocation) -> Result<()> {
        self.del_with(inv, &Value::Null)
    }

    pub fn del_with(&self, inv: &Invocation, runtime: &Value) -> Result<()> {
        let mut errors = Vec::new();
        for p in self.plugins.iter().rev() {
            let run = exec("DEL", inv, &self.plugin_conf(p, None, runtime))?;
            if !run.success {
                errors.push(format!("{}: {}", p["type"], run.stdout.trim()));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("DEL failed: {}", errors.join("; "))
        }
    }
}
