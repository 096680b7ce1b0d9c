//! Running another plugin (a non host-local IPAM) the way the spec says: found in CNI_PATH, the same environment
//! with our CNI_COMMAND, the network config on stdin, its result or error document on stdout.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use cni_types::{CniError, CniResult, ErrorCode, Request};

use crate::error::{PluginError, Result};

fn find(plugin: &str, req: &Request) -> Result<PathBuf> {
    req.path.iter().map(|d| d.join(plugin)).find(|p| p.is_file()).ok_or_else(|| {
        PluginError::Cni(CniError::new(
            ErrorCode::InvalidConfig,
            format!("ipam plugin {plugin:?} not found"),
            format!("searched CNI_PATH {:?}", req.path),
        ))
    })
}

/// Runs `plugin` with `command`; returns its parsed result when it printed one.
pub fn exec(plugin: &str, req: &Request, command: &str, stdin: &[u8]) -> Result<Option<CniResult>> {
    let path = find(plugin, req)?;
    let mut child = Command::new(&path)
        .env("CNI_COMMAND", command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(PluginError::io(format!("run {}", path.display())))?;
    child.stdin.take().expect("piped").write_all(stdin).map_err(PluginError::io(format!("write to {plugin}")))?;
    let out = child.wait_with_output().map_err(PluginError::io(format!("wait for {plugin}")))?;
    if !out.status.success() {
        let e = CniError::from_json(&out.stdout).unwrap_or_else(|| {
            CniError::new(
                ErrorCode::Other(999),
                format!("ipam plugin {plugin} failed ({})", out.status),
                String::from_utf8_lossy(&out.stdout).trim().to_string(),
            )
        });
        return Err(PluginError::Cni(e));
    }
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        PluginError::Cni(CniError::new(
            ErrorCode::DecodeFailure,
            format!("ipam plugin {plugin} printed no JSON"),
            e.to_string(),
        ))
    })?;
    Ok(Some(CniResult::from_value(&v)?))
}
