use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{CniError, ErrorCode};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

/// One attachment a runtime still considers live, as listed in GC's `cni.dev/valid-attachments`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// What the runtime said through the environment, checked as the spec asks for each command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    /// CNI_ARGS, `K=V;K2=V2`.
    pub args: BTreeMap<String, String>,
    pub path: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("CNI_COMMAND is not set")]
    NoCommand,
    #[error("CNI_COMMAND {0:?} is not one of ADD, DEL, CHECK, GC, STATUS, VERSION")]
    UnknownCommand(String),
    #[error("{0} is required for {1}")]
    Missing(&'static str, &'static str),
    #[error("{0}={1:?} is invalid: {2}")]
    Invalid(&'static str, String, &'static str),
}

impl From<RequestError> for CniError {
    fn from(e: RequestError) -> CniError {
        CniError::new(ErrorCode::InvalidEnvironment, e.to_string(), "")
    }
}

impl Request {
    /// Builds the request from a variable lookup (`std::env::var` in the plugin, a map in tests).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Request, RequestError> {
        let command = match get("CNI_COMMAND").as_deref() {
            None | Some("") => return Err(RequestError::NoCommand),
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("GC") => Command::Gc,
            Some("STATUS") => Command::Status,
            Some("VERSION") => Command::Version,
            Some(other) => return Err(RequestError::UnknownCommand(other.to_string())),
        };
        let name = match command {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            _ => "",
        };
        let per_container = matches!(command, Command::Add | Command::Del | Command::Check);
        let nonempty = |k: &str| get(k).filter(|v| !v.is_empty());

        let mut container_id = String::new();
        let mut ifname = String::new();
        let mut netns = None;
        if per_container {
            container_id = nonempty("CNI_CONTAINERID").ok_or(RequestError::Missing("CNI_CONTAINERID", name))?;
            validate_container_id(&container_id)?;
            ifname = nonempty("CNI_IFNAME").ok_or(RequestError::Missing("CNI_IFNAME", name))?;
            validate_ifname(&ifname)?;
            netns = nonempty("CNI_NETNS").map(PathBuf::from);
            if netns.is_none() && command != Command::Del {
                return Err(RequestError::Missing("CNI_NETNS", name));
            }
        }
        let args = match get("CNI_ARGS") {
            Some(a) => parse_args(&a)?,
            None => BTreeMap::new(),
        };
        let path = get("CNI_PATH")
            .map(|p| p.split(':').filter(|s| !s.is_empty()).map(PathBuf::from).collect())
            .unwrap_or_default();
        Ok(Request { command, container_id, netns, ifname, args, path })
    }
}

/// The spec: non-empty, alphanumerics plus `_ . -`, starting with an alphanumeric.
fn validate_container_id(id: &str) -> Result<(), RequestError> {
    let ok = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(RequestError::Invalid(
            "CNI_CONTAINERID",
            id.to_string(),
            "only letters, digits, '_', '.' and '-' are allowed",
        ))
    }
}

/// The kernel's rules for interface names.
fn validate_ifname(name: &str) -> Result<(), RequestError> {
    let why = if name.len() > 15 {
        Some("longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("'.' and '..' are not interface names")
    } else if name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        Some("contains '/', ':' or white space")
    } else {
        None
    };
    match why {
        Some(w) => Err(RequestError::Invalid("CNI_IFNAME", name.to_string(), w)),
        None => Ok(()),
    }
}

fn parse_args(s: &str) -> Result<BTreeMap<String, String>, RequestError> {
    let mut out = BTreeMap::new();
    for pair in s.split(';').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                out.insert(k.to_string(), v.to_string());
            }
            _ => return Err(RequestError::Invalid("CNI_ARGS", s.to_string(), "expected K=V pairs separated by ';'")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: BTreeMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn kubelet_style_add() {
        let r = Request::from_env(env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=a"),
            ("CNI_PATH", "/opt/cni/bin::/usr/lib/cni"),
        ]))
        .unwrap();
        assert_eq!(r.command, Command::Add);
        assert_eq!(r.args["K8S_POD_NAME"], "a");
        assert_eq!(r.path, vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")]);
    }

    #[test]
    fn missing_and_invalid_variables() {
        assert_eq!(Request::from_env(env(&[])), Err(RequestError::NoCommand));
        assert!(matches!(
            Request::from_env(env(&[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "eth0"), ("CNI_NETNS", "/x")])),
            Err(RequestError::Missing("CNI_CONTAINERID", "ADD"))
        ));
        assert!(matches!(
            Request::from_env(env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "a"), ("CNI_IFNAME", "eth0")])),
            Err(RequestError::Missing("CNI_NETNS", "ADD"))
        ));
        assert!(matches!(
            Request::from_env(env(&[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "a"),
                ("CNI_NETNS", "/x"),
                ("CNI_IFNAME", "averyveryverylongname")
            ])),
            Err(RequestError::Invalid("CNI_IFNAME", _, _))
        ));
        assert!(matches!(
            Request::from_env(env(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "../x"), ("CNI_IFNAME", "eth0")])),
            Err(RequestError::Invalid("CNI_CONTAINERID", _, _))
        ));
        assert!(matches!(Request::from_env(env(&[("CNI_COMMAND", "FOO")])), Err(RequestError::UnknownCommand(_))));
        let e: CniError = RequestError::NoCommand.into();
        assert_eq!(e.code.code(), 4);
    }

    #[test]
    fn del_without_netns_is_fine() {
        let r = Request::from_env(env(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "a"), ("CNI_IFNAME", "eth0")]))
            .unwrap();
        assert_eq!(r.netns, None);
    }

    #[test]
    fn gc_status_version_need_only_the_command() {
        for c in ["GC", "STATUS", "VERSION"] {
            Request::from_env(env(&[("CNI_COMMAND", c)])).unwrap();
        }
    }
}
