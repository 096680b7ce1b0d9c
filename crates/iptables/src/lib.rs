//! iptables and ip6tables, driven through their own binaries (whichever backend, legacy or nft, the node's
//! alternatives select, so our rules live beside everyone else's).
//!
//! Changes go through `iptables-restore --noflush -w`: one payload is one transaction, so a change lands whole or
//! not at all. Checks use `iptables -C`, which is cheap enough for a per-pod fast path.

use std::process::Command;
use std::time::Duration;

pub mod ipset;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn bin(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn restore_bin(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    /// The tool could not be started, or overran its deadline and was killed.
    #[error(transparent)]
    Child(#[from] child_process::ChildError),
    #[error("{cmd} failed ({status}): {stderr}")]
    Failed { cmd: String, status: String, stderr: String },
}

impl IptablesError {
    /// Whether the tool overran its deadline (it was killed; what it did is unknown).
    pub fn is_timeout(&self) -> bool {
        matches!(self, IptablesError::Child(child_process::ChildError::Timeout { .. }))
    }

    /// Whether the tool could not be started at all.
    pub fn is_spawn(&self) -> bool {
        matches!(self, IptablesError::Child(child_process::ChildError::Spawn { .. }))
    }
}

/// How long a query (`-C`, `-S`, `ipset list`) may take: it holds the xtables lock at most briefly.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a whole-table dump may take: iptables-nft needed more than 30 s to save 170 000 rules here.
const SAVE_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a restore may take: a base, plus time per payload line (iptables-nft needs about 1.5 ms a rule for
/// the largest rule sets measured here; this leaves room for a loaded node).
fn restore_timeout(payload: &str) -> Duration {
    QUERY_TIMEOUT + Duration::from_millis(10) * payload.lines().count() as u32
}

pub type Result<T> = std::result::Result<T, IptablesError>;

#[derive(Debug, Clone, Copy)]
pub struct Iptables {
    pub family: Family,
}

impl Iptables {
    pub fn new(family: Family) -> Iptables {
        Iptables { family }
    }

    /// Whether `rule` is in `chain` of `table` (`-C`). A missing chain also answers false.
    pub fn exists(&self, table: &str, chain: &str, rule: &[String]) -> Result<bool> {
        let mut args: Vec<String> = vec!["-w".into(), "-t".into(), table.into(), "-C".into(), chain.into()];
        args.extend(rule.iter().cloned());
        let out = self.output(self.family.bin(), &args, None)?;
        // Exit 1: no such rule; exit 2 (or other): a real failure such as a bad rule or a missing chain.
        match out.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ if String::from_utf8_lossy(&out.stderr).contains("does not exist") => Ok(false),
            _ => Err(failed(self.family.bin(), &args, &out)),
        }
    }

    /// Applies a payload as one `iptables-restore --noflush` transaction.
    pub fn restore(&self, payload: &str) -> Result<()> {
        let args = vec!["-w".to_string(), "--noflush".to_string()];
        let out = self.output(self.family.restore_bin(), &args, Some(payload))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(failed(self.family.restore_bin(), &args, &out))
        }
    }

    /// `chain` of `table` as the kernel renders it (`-S`: the `-N` line, then one `-A` line per rule); empty for a
    /// missing chain.
    pub fn list_chain(&self, table: &str, chain: &str) -> Result<String> {
        let args: Vec<String> = ["-w", "-t", table, "-S", chain].map(String::from).to_vec();
        let out = self.output(self.family.bin(), &args, None)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `iptables-save -t table` output.
    pub fn save(&self, table: &str) -> Result<String> {
        let bin = match self.family {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        };
        let args = vec!["-t".to_string(), table.to_string()];
        let out = child_process::run(Command::new(bin).args(&args), None, SAVE_TIMEOUT)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(failed(bin, &args, &out))
        }
    }

    fn output(&self, bin: &str, args: &[String], stdin: Option<&str>) -> Result<child_process::Output> {
        output(bin, args, stdin)
    }
}

/// Runs `bin` with a deadline (see [`restore_timeout`]); the exit status is the caller's to judge.
fn output(bin: &str, args: &[String], stdin: Option<&str>) -> Result<child_process::Output> {
    let timeout = stdin.map_or(QUERY_TIMEOUT, restore_timeout);
    Ok(child_process::run(Command::new(bin).args(args), stdin.map(str::as_bytes), timeout)?)
}

fn failed(bin: &str, args: &[String], out: &child_process::Output) -> IptablesError {
    IptablesError::Failed {
        cmd: format!("{bin} {}", args.join(" ")),
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    }
}

/// Quotes one argument for an iptables-restore payload line.
pub fn quote(arg: &str) -> String {
    if !arg.is_empty() && arg.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:!=,+".contains(c)) {
        arg.to_string()
    } else {
        format!("\"{}\"", arg.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// Renders a rule's arguments as a payload line fragment.
pub fn render(rule: &[String]) -> String {
    rule.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote("10.0.0.0/24"), "10.0.0.0/24");
        assert_eq!(quote("tartan masq: net one"), "\"tartan masq: net one\"");
        assert_eq!(quote(""), "\"\"");
        assert_eq!(render(&["-s".into(), "a b".into()]), "-s \"a b\"");
    }
}
