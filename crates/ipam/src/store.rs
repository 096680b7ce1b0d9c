use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::{IpamError, Range, RangeSet};

const LINE_BREAK: &str = "\r\n";
const LAST_RESERVED: &str = "last_reserved_ip.";

/// Who holds an address, as written in its file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Owner {
    pub container_id: String,
    /// Empty in files written by host-local before it recorded interface names.
    pub ifname: String,
}

impl Owner {
    fn parse(content: &str) -> Owner {
        let mut lines = content.split(LINE_BREAK).flat_map(|l| l.split('\n'));
        let container_id = lines.next().unwrap_or("").trim().to_string();
        let ifname = lines.next().unwrap_or("").trim().to_string();
        Owner { container_id, ifname }
    }

    /// Old files name only the container; they match any interface of it.
    pub fn is(&self, container_id: &str, ifname: &str) -> bool {
        self.container_id == container_id && (self.ifname.is_empty() || self.ifname == ifname)
    }
}

/// One address handed out, with the range it came from (for its gateway and prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub ip: IpAddr,
    pub range: Range,
}

/// A network's directory in the store.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// The exclusive flock on `<dir>/lock`; every read-modify-write of the store happens while one is held.
pub struct StoreLock<'a> {
    store: &'a Store,
    _file: File,
}

impl Store {
    /// `<data_dir>/<network>`, created when absent.
    pub fn open(data_dir: &Path, network: &str) -> Result<Store, IpamError> {
        if network.is_empty() || network.contains('/') || network == "." || network == ".." {
            return Err(IpamError::InvalidRange(format!("network name {network:?} cannot name a directory")));
        }
        let dir = data_dir.join(network);
        fs::DirBuilder::new().recursive(true).mode(0o755).create(&dir).map_err(IpamError::io("create", &dir))?;
        Ok(Store { dir })
    }

    /// `<data_dir>/<network>` if it exists: DEL and GC release from a store, they never create one.
    pub fn existing(data_dir: &Path, network: &str) -> Option<Store> {
        let dir = data_dir.join(network);
        (!network.contains('/') && dir.is_dir()).then_some(Store { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn lock(&self) -> Result<StoreLock<'_>, IpamError> {
        let path = self.dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o644)
            .open(&path)
            .map_err(IpamError::io("open", &path))?;
        // SAFETY: flock on a descriptor we own; it is released when the file closes.
        loop {
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != ErrorKind::Interrupted {
                return Err(IpamError::Io { op: "lock", path, source: err });
            }
        }
        Ok(StoreLock { store: self, _file: file })
    }
}

fn is_ip_file(name: &str) -> Option<IpAddr> {
    name.parse().ok()
}

impl StoreLock<'_> {
    fn dir(&self) -> &Path {
        &self.store.dir
    }

    /// Every address in the store and its owner.
    pub fn list(&self) -> Result<BTreeMap<IpAddr, Owner>, IpamError> {
        let mut out = BTreeMap::new();
        let entries = fs::read_dir(self.dir()).map_err(IpamError::io("read", self.dir()))?;
        for entry in entries {
            let entry = entry.map_err(IpamError::io("read", self.dir()))?;
            let name = entry.file_name();
            let Some(ip) = name.to_str().and_then(is_ip_file) else {
                continue;
            };
            match fs::read_to_string(entry.path()) {
                Ok(content) => {
                    out.insert(ip, Owner::parse(&content));
                }
                // Released between read_dir and read: not ours to report.
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(IpamError::Io { op: "read", path: entry.path(), source: e }),
            }
        }
        Ok(out)
    }

    /// The addresses held by (container, ifname).
    pub fn owned_by(&self, container_id: &str, ifname: &str) -> Result<Vec<IpAddr>, IpamError> {
        Ok(self.list()?.into_iter().filter(|(_, o)| o.is(container_id, ifname)).map(|(ip, _)| ip).collect())
    }

    /// The addresses in the store, by file name only (no file is opened).
    pub fn taken(&self) -> Result<HashSet<IpAddr>, IpamError> {
        let entries = fs::read_dir(self.dir()).map_err(IpamError::io("read", self.dir()))?;
        let mut out = HashSet::new();
        for entry in entries {
            let entry = entry.map_err(IpamError::io("read", self.dir()))?;
            if let Some(ip) = entry.file_name().to_str().and_then(is_ip_file) {
                out.insert(ip);
            }
        }
        Ok(out)
    }

    /// One address from each range set, in round-robin order. If any set is exhausted, the addresses taken by
    /// this call are released again before the error returns.
    ///
    /// Only file names are read, so an ADD costs the same with 5 pods on the node as with 250. The runtime
    /// guarantees one ADD per attachment, and the plugin refuses an ADD whose interface exists; an address left by
    /// an ADD that crashed half-way is released by the DEL the runtime sends for it, or by GC.
    pub fn allocate(&self, sets: &[RangeSet], container_id: &str, ifname: &str) -> Result<Vec<Allocation>, IpamError> {
        let mut out: Vec<Allocation> = Vec::new();
        for (index, set) in sets.iter().enumerate() {
            match self.allocate_at(index, set, container_id, ifname) {
                Ok(a) => out.push(a),
                Err(e) => {
                    self.release_ips(&out.iter().map(|a| a.ip).collect::<Vec<_>>());
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// One address from range set number `index` (the index names its `last_reserved_ip` file).
    pub fn allocate_at(
        &self,
        index: usize,
        set: &RangeSet,
        container_id: &str,
        ifname: &str,
    ) -> Result<Allocation, IpamError> {
        let mut taken = self.taken()?;
        let last = self.last_reserved(index);
        for (ip, range) in set.candidates(last) {
            if taken.contains(&ip) {
                continue;
            }
            // false: a file appeared since the listing (someone not honouring the lock): try the next one.
            if self.reserve(ip, container_id, ifname)? {
                // Round-robin position only: losing it must not fail the allocation.
                let _ = self.set_last_reserved(index, ip);
                return Ok(Allocation { ip, range: range.clone() });
            }
            taken.insert(ip);
        }
        Err(IpamError::Exhausted { index, ranges: set.to_string() })
    }

    /// Reserves exactly `ip` (a runtime asked for it: CNI_ARGS `IP=`, runtimeConfig `ips`). Errors if no range of
    /// `set` holds it, or if it is taken.
    pub fn allocate_requested(
        &self,
        set: &RangeSet,
        ip: IpAddr,
        container_id: &str,
        ifname: &str,
    ) -> Result<Allocation, IpamError> {
        let range = set
            .range_of(ip)
            .filter(|r| r.gateway != ip)
            .ok_or_else(|| IpamError::InvalidRange(format!("requested address {ip} is not in range set {set}")))?
            .clone();
        if !self.reserve(ip, container_id, ifname)? {
            return Err(IpamError::Taken(ip));
        }
        Ok(Allocation { ip, range })
    }

    fn reserve(&self, ip: IpAddr, container_id: &str, ifname: &str) -> Result<bool, IpamError> {
        let path = self.dir().join(ip.to_string());
        let mut f = match OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(IpamError::Io { op: "create", path, source: e }),
        };
        if let Err(e) = f.write_all(format!("{container_id}{LINE_BREAK}{ifname}").as_bytes()) {
            let _ = fs::remove_file(&path);
            return Err(IpamError::Io { op: "write", path, source: e });
        }
        Ok(true)
    }

    fn last_reserved(&self, index: usize) -> Option<IpAddr> {
        fs::read_to_string(self.dir().join(format!("{LAST_RESERVED}{index}"))).ok()?.trim().parse().ok()
    }

    fn set_last_reserved(&self, index: usize, ip: IpAddr) -> Result<(), IpamError> {
        let path = self.dir().join(format!("{LAST_RESERVED}{index}"));
        fs::write(&path, ip.to_string()).map_err(IpamError::io("write", path))
    }

    fn release_ips(&self, ips: &[IpAddr]) {
        for ip in ips {
            let _ = fs::remove_file(self.dir().join(ip.to_string()));
        }
    }

    /// Frees what (container, ifname) holds; freeing nothing is fine (DEL is idempotent). Returns what was freed.
    pub fn release(&self, container_id: &str, ifname: &str) -> Result<Vec<IpAddr>, IpamError> {
        let ips = self.owned_by(container_id, ifname)?;
        for ip in &ips {
            let path = self.dir().join(ip.to_string());
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(IpamError::Io { op: "remove", path, source: e }),
            }
        }
        Ok(ips)
    }

    /// Frees every address whose owner `keep` rejects (GC). Returns what was freed.
    pub fn retain(&self, keep: impl Fn(&Owner) -> bool) -> Result<Vec<IpAddr>, IpamError> {
        let mut freed = Vec::new();
        for (ip, owner) in self.list()? {
            if !keep(&owner) {
                let path = self.dir().join(ip.to_string());
                match fs::remove_file(&path) {
                    Ok(()) => freed.push(ip),
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(IpamError::Io { op: "remove", path, source: e }),
                }
            }
        }
        Ok(freed)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::RangeSpec;

    fn set(subnet: &str) -> RangeSet {
        RangeSet::new(&[RangeSpec {
            subnet: subnet.parse().unwrap(),
            range_start: None,
            range_end: None,
            gateway: None,
        }])
        .unwrap()
    }

    #[test]
    fn file_format_matches_host_local() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), "net1").unwrap();
        let lock = store.lock().unwrap();
        let got = lock.allocate(&[set("10.1.0.0/24"), set("fd00:1::/120")], "ctr1", "eth0").unwrap();
        assert_eq!(got[0].ip.to_string(), "10.1.0.2");
        assert_eq!(got[1].ip.to_string(), "fd00:1::2");
        let dir = tmp.path().join("net1");
        assert_eq!(fs::read_to_string(dir.join("10.1.0.2")).unwrap(), "ctr1\r\neth0");
        assert_eq!(fs::metadata(dir.join("10.1.0.2")).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read_to_string(dir.join("last_reserved_ip.0")).unwrap(), "10.1.0.2");
        assert_eq!(fs::read_to_string(dir.join("last_reserved_ip.1")).unwrap(), "fd00:1::2");
        assert!(dir.join("lock").exists());
    }

    #[test]
    fn round_robin_reuse_and_release() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), "n").unwrap();
        let lock = store.lock().unwrap();
        let sets = [set("10.1.0.0/29")];
        let a = lock.allocate(&sets, "a", "eth0").unwrap()[0].ip;
        let b = lock.allocate(&sets, "b", "eth0").unwrap()[0].ip;
        assert_eq!((a.to_string().as_str(), b.to_string().as_str()), ("10.1.0.2", "10.1.0.3"));
        assert_eq!(lock.release("a", "eth0").unwrap(), vec![a]);
        assert!(lock.release("a", "eth0").unwrap().is_empty());
        // Round robin: the next allocation does not reuse the address just freed.
        assert_eq!(lock.allocate(&sets, "c", "eth0").unwrap()[0].ip.to_string(), "10.1.0.4");
    }

    #[test]
    fn exhaustion_is_an_error_and_rolls_back_the_other_sets() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), "n").unwrap();
        let lock = store.lock().unwrap();
        let small = set("10.1.0.0/30"); // .1 is the gateway, .2 the only address
        lock.allocate(std::slice::from_ref(&small), "a", "eth0").unwrap();
        let err = lock.allocate(&[set("10.2.0.0/24"), small], "b", "eth0").unwrap_err();
        assert!(matches!(err, IpamError::Exhausted { index: 1, .. }), "{err}");
        assert_eq!(lock.list().unwrap().len(), 1, "the address from set 0 was given back");
    }

    #[test]
    fn reads_old_files_and_gc_keeps_only_valid_owners() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), "n").unwrap();
        fs::write(store.dir().join("10.1.0.9"), "oldctr").unwrap();
        let lock = store.lock().unwrap();
        lock.allocate(&[set("10.1.0.0/24")], "live", "eth0").unwrap();
        lock.allocate(&[set("10.1.0.0/24")], "dead", "eth0").unwrap();
        let owners = lock.list().unwrap();
        assert_eq!(owners[&"10.1.0.9".parse::<IpAddr>().unwrap()].container_id, "oldctr");
        let freed = lock.retain(|o| o.container_id == "live").unwrap();
        assert_eq!(freed.len(), 2);
        assert_eq!(lock.list().unwrap().len(), 1);
    }

    #[test]
    fn refuses_path_like_network_names() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(Store::open(tmp.path(), "../x").is_err());
        assert!(Store::open(tmp.path(), "").is_err());
    }
}
