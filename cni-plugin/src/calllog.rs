//! One line per call in the file a network config names with `"logFile"` (as several plugins take it), because
//! runtimes swallow a plugin's stderr: the command, the container, its netns and interface, the result or the
//! error code and message, and how long the call took, as `key=value` fields an operator can grep. Silent without
//! `logFile`; never on stdout (that is the result's); a log that cannot be written never changes the result.

use std::io::Write;
use std::time::{Duration, SystemTime};

use crate::Outcome;

/// The `logFile` a config names, read leniently: a config that is otherwise invalid still gets its refusal logged.
fn log_file(stdin: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(stdin).ok()?;
    v.get("logFile")?.as_str().filter(|s| !s.is_empty()).map(String::from)
}

/// A value as a logfmt field: quoted when it has spaces, quotes or is empty.
fn field(v: &str) -> String {
    if !v.is_empty() && !v.chars().any(|c| c.is_whitespace() || c == '"' || c == '=') {
        v.to_string()
    } else {
        format!("{:?}", v)
    }
}

/// The line for one call.
pub fn line(env: &dyn Fn(&str) -> Option<String>, outcome: &Outcome, took: Duration, at: SystemTime) -> String {
    let get = |k: &str| env(k).unwrap_or_default();
    let mut l = format!(
        "time={} command={} container={} netns={} ifname={}",
        humantime::format_rfc3339_millis(at),
        field(&get("CNI_COMMAND")),
        field(&get("CNI_CONTAINERID")),
        field(&get("CNI_NETNS")),
        field(&get("CNI_IFNAME")),
    );
    if outcome.exit_code == 0 {
        l += " result=ok";
    } else {
        let err: serde_json::Value = serde_json::from_str(&outcome.stdout).unwrap_or_default();
        let code = err.get("code").and_then(|c| c.as_u64()).unwrap_or(0);
        let msg = err.get("msg").and_then(|m| m.as_str()).unwrap_or_default();
        l += &format!(" result=error code={code} msg={}", field(msg));
    }
    l += &format!(" duration_ms={:.3}\n", took.as_secs_f64() * 1000.0);
    l
}

/// Appends the call's line to the config's `logFile`, if it names one.
pub fn append(stdin: &[u8], env: &dyn Fn(&str) -> Option<String>, outcome: &Outcome, took: Duration) {
    let Some(path) = log_file(stdin) else { return };
    let text = line(env, outcome, took, SystemTime::now());
    // One write of a short line to an O_APPEND file: concurrent calls do not interleave within a line.
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&path) {
        let _ = f.write_all(text.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_per_call_with_the_error_code() {
        let env = |k: &str| match k {
            "CNI_COMMAND" => Some("ADD".to_string()),
            "CNI_CONTAINERID" => Some("abc".to_string()),
            "CNI_NETNS" => Some("/run/netns/p1".to_string()),
            "CNI_IFNAME" => Some("eth0".to_string()),
            _ => None,
        };
        let ok = Outcome { stdout: "{}".into(), exit_code: 0 };
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            line(&env, &ok, Duration::from_micros(4200), at),
            "time=2023-11-14T22:13:20.000Z command=ADD container=abc netns=/run/netns/p1 ifname=eth0 result=ok duration_ms=4.200\n"
        );
        let bad =
            Outcome { stdout: r#"{"cniVersion":"1.1.0","code":7,"msg":"invalid config: ipam"}"#.into(), exit_code: 1 };
        let l = line(&env, &bad, Duration::from_millis(1), at);
        assert!(l.contains(" result=error code=7 msg=\"invalid config: ipam\" "), "{l}");
        assert_eq!(
            log_file(br#"{"logFile": "/var/log/tartan.log", "ipam": 3}"#).as_deref(),
            Some("/var/log/tartan.log")
        );
        assert_eq!(log_file(b"{not json"), None);
    }
}
