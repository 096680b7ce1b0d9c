//! ipsets (IPv4 and IPv6), driven through the `ipset` binary the way the rules are through iptables-restore: the state is read
//! with `ipset save` and changed with one `ipset restore` payload.

use std::collections::{BTreeMap, BTreeSet};

use crate::{failed, output, Result};

/// The set types Tartan uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetKind {
    /// Addresses (pods selected by a label selector).
    Ip,
    /// Networks; `nomatch` members carve exceptions out of larger ones (ipBlock.except).
    Net,
    /// address,proto:port pairs (named ports of pods).
    IpPort,
}

impl SetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SetKind::Ip => "hash:ip",
            SetKind::Net => "hash:net",
            SetKind::IpPort => "hash:ip,port",
        }
    }

    fn parse(s: &str) -> Option<SetKind> {
        [SetKind::Ip, SetKind::Net, SetKind::IpPort].into_iter().find(|k| k.as_str() == s)
    }
}

/// A set's type and members, each member written as `ipset save` prints it (`10.0.0.0/8`, `10.1.2.3 nomatch`,
/// `10.1.2.3,tcp:80`), so that desired and current sets compare as strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub kind: SetKind,
    /// An IPv6 set (`family inet6`), for ip6tables rules.
    pub inet6: bool,
    pub members: BTreeSet<String>,
}

/// The sets whose names start with `prefix`, as the kernel holds them. Sets of types we do not use are skipped.
pub fn save(prefix: &str) -> Result<BTreeMap<String, Set>> {
    Ok(parse_save(&ipset(&["save"], None)?, prefix))
}

/// Runs `ipset` with `args` (and `stdin`): its output, or the failure with its stderr.
fn ipset(args: &[&str], stdin: Option<&str>) -> Result<String> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = output("ipset", &args, stdin)?;
    if !out.status.success() {
        return Err(failed("ipset", &args, &out));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn parse_save(text: &str, prefix: &str) -> BTreeMap<String, Set> {
    let mut sets = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.splitn(3, ' ');
        match (words.next(), words.next(), words.next()) {
            (Some("create"), Some(name), Some(rest)) if name.starts_with(prefix) => {
                if let Some(kind) = rest.split(' ').next().and_then(SetKind::parse) {
                    let inet6 = rest.contains(" family inet6");
                    sets.insert(name.to_string(), Set { kind, inet6, members: BTreeSet::new() });
                }
            }
            (Some("add"), Some(name), Some(member)) => {
                if let Some(s) = sets.get_mut(name) {
                    s.members.insert(member.to_string());
                }
            }
            _ => {}
        }
    }
    sets
}

/// How many entries each set whose name starts with `prefix` holds, from the terse listing (`ipset list -t`):
/// headers only, so checking the sets for drift costs the same however many members they have.
pub fn entry_counts(prefix: &str) -> Result<BTreeMap<String, usize>> {
    Ok(parse_counts(&ipset(&["list", "-t"], None)?, prefix))
}

fn parse_counts(text: &str, prefix: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    let mut name: Option<&str> = None;
    for line in text.lines() {
        if let Some(n) = line.strip_prefix("Name: ") {
            name = Some(n.trim()).filter(|n| n.starts_with(prefix));
        } else if let (Some(n), Some(c)) = (name, line.strip_prefix("Number of entries: ")) {
            if let Ok(c) = c.trim().parse() {
                counts.insert(n.to_string(), c);
            }
        }
    }
    counts
}

/// Applies an `ipset restore` payload.
pub fn restore(payload: &str) -> Result<()> {
    ipset(&["restore"], Some(payload)).map(drop)
}

/// The payload that creates the sets of `want` missing from `have` and brings every member list to `want`'s.
/// Sets only in `have` are left (they may still be referenced by rules): [`destroy_payload`] removes them after
/// the rules that used them are gone.
pub fn update_payload(want: &BTreeMap<String, Set>, have: &BTreeMap<String, Set>) -> String {
    let mut out = String::new();
    for (name, set) in want {
        let old = match have.get(name) {
            Some(h) if h.kind == set.kind && h.inet6 == set.inet6 => Some(&h.members),
            Some(_) => {
                // Same name, another type: cannot happen with names derived from the definition, but recreate.
                out += &format!("destroy {name}\n");
                None
            }
            None => None,
        };
        if old.is_none() {
            let family = if set.inet6 { "inet6" } else { "inet" };
            out += &format!("create {name} {} family {family} maxelem 1048576 -exist\n", set.kind.as_str());
        }
        let empty = BTreeSet::new();
        let old = old.unwrap_or(&empty);
        for m in set.members.difference(old) {
            out += &format!("add {name} {m} -exist\n");
        }
        for m in old.difference(&set.members) {
            // `nomatch` is a flag of the entry, not part of its key.
            let key = m.strip_suffix(" nomatch").unwrap_or(m);
            out += &format!("del {name} {key} -exist\n");
        }
    }
    out
}

/// The payload destroying the sets of `have` that `want` does not list.
pub fn destroy_payload(want: &BTreeMap<String, Set>, have: &BTreeMap<String, Set>) -> String {
    have.keys().filter(|n| !want.contains_key(*n)).map(|n| format!("destroy {n}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(kind: SetKind, members: &[&str]) -> Set {
        Set { kind, inet6: false, members: members.iter().map(|m| m.to_string()).collect() }
    }

    #[test]
    fn terse_listing_gives_entry_counts_for_our_prefix_only() {
        let text = "Name: TARTAN-NB-1\nType: hash:net\nRevision: 7\nHeader: family inet hashsize 1024\nSize in memory: 552\nReferences: 1\nNumber of entries: 2\n\nName: other\nType: hash:ip\nNumber of entries: 9\n\nName: TARTAN-PS-2\nType: hash:ip\nNumber of entries: 0\n";
        let counts = parse_counts(text, "TARTAN-");
        assert_eq!(counts, BTreeMap::from([("TARTAN-NB-1".to_string(), 2), ("TARTAN-PS-2".to_string(), 0)]));
    }

    #[test]
    fn save_output_is_parsed_for_our_prefix_only() {
        let text = "create TARTAN-6PS-1 hash:ip family inet6 hashsize 1024\nadd TARTAN-6PS-1 fd00::1\ncreate TARTAN-NB-1 hash:net family inet hashsize 1024 maxelem 65536\nadd TARTAN-NB-1 10.244.0.0/16\nadd TARTAN-NB-1 10.244.1.2 nomatch\ncreate other hash:ip family inet\nadd other 1.2.3.4\ncreate TARTAN-NP-1 hash:ip,port family inet\nadd TARTAN-NP-1 10.244.1.2,tcp:80\n";
        let sets = parse_save(text, "TARTAN-");
        assert_eq!(sets.len(), 3);
        assert!(sets["TARTAN-6PS-1"].inet6 && sets["TARTAN-6PS-1"].members.contains("fd00::1"));
        assert_eq!(sets["TARTAN-NB-1"], set(SetKind::Net, &["10.244.0.0/16", "10.244.1.2 nomatch"]));
        assert_eq!(sets["TARTAN-NP-1"], set(SetKind::IpPort, &["10.244.1.2,tcp:80"]));
    }

    #[test]
    fn updates_are_differences() {
        let have: BTreeMap<String, Set> =
            [("A".to_string(), set(SetKind::Net, &["10.0.0.0/8", "10.1.1.1 nomatch"]))].into();
        let want: BTreeMap<String, Set> = [
            ("A".to_string(), set(SetKind::Net, &["10.0.0.0/8", "10.2.2.2 nomatch"])),
            ("B".to_string(), set(SetKind::Ip, &["10.3.3.3"])),
        ]
        .into();
        let p = update_payload(&want, &have);
        assert_eq!(
            p,
            "add A 10.2.2.2 nomatch -exist\ndel A 10.1.1.1 -exist\ncreate B hash:ip family inet maxelem 1048576 -exist\nadd B 10.3.3.3 -exist\n"
        );
        assert_eq!(update_payload(&want, &want), "");
        assert_eq!(destroy_payload(&have, &want), "destroy B\n");
    }
}
