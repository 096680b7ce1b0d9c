//! Loading the programs, attaching them to the node's cgroup, to the interfaces that carry node addresses and to
//! the pods' host-side veths (tcx ingress and egress), and pinning everything under `--bpf-root`: the maps (`TARTAN_*`, reused by the next start,
//! which adopts what they hold) and one link per program (`links/<name>`, `links/<name>@<interface>`), which keeps
//! the program attached while no proxy runs. A new start attaches its programs next to the pinned ones, then
//! unpins and drops the old links, so that there is no moment without translation (two programs in a row are
//! harmless: the second sees a backend address, which is no frontend, and a tc program passes on what it does
//! not translate).

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{HashMap, MapData, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use ebpf_maps::{
    names, CtValue, FlowKey, IfAddrKey, NamedKey, NatValue, PeerKey, PodValue, PortKey, ServiceKey, ServiceValue,
};
use proxy_state::{DataplaneError, ErrorKind};

/// The programs, built by build.rs.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tartan-bpf"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

pub struct Attached {
    /// Keeps the loaded programs (and the maps' descriptors) for the life of the dataplane.
    ebpf: Ebpf,
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub conntrack: HashMap<MapData, FlowKey, CtValue>,
    pub nat: HashMap<MapData, FlowKey, NatValue>,
    pub ifaddr: HashMap<MapData, IfAddrKey, [u8; 16]>,
    pub pol_pods: HashMap<MapData, u32, PodValue>,
    pub pol_peers: LpmTrie<MapData, PeerKey, u64>,
    pub pol_ports: LpmTrie<MapData, PortKey, u64>,
    pub pol_named: HashMap<MapData, NamedKey, u64>,
    pub host: HashMap<MapData, [u8; 16], u8>,
    pub pod_addrs: HashMap<MapData, [u8; 16], u32>,
    pub pod_network: LpmTrie<MapData, ebpf_maps::NetKey, u8>,
    pub stats: PerCpuArray<MapData, u64>,
    /// The cgroup programs' links.
    pub links: Vec<PinnedLink>,
    /// Per interface name, its index when attached and its tc links (ingress, egress).
    pub tc: BTreeMap<String, (u32, Vec<PinnedLink>)>,
    /// ... and per pod veth.
    pub pod_tc: BTreeMap<String, (u32, Vec<PinnedLink>)>,
    /// The size the conntrack and NAT maps were made with.
    pub conntrack_max: u32,
}

/// The tc programs of interfaces with node addresses, and where they attach.
pub const NODE_TC: [(&str, TcAttachType); 2] =
    [(names::TC_INGRESS, TcAttachType::Ingress), (names::TC_EGRESS, TcAttachType::Egress)];
/// ... and of pods' host-side veths: what enters from the pod is its egress.
pub const POD_TC: [(&str, TcAttachType); 2] =
    [(names::TC_FROM_POD, TcAttachType::Ingress), (names::TC_TO_POD, TcAttachType::Egress)];

type TcProgs = [(&'static str, TcAttachType); 2];

fn tc_pin(bpf_root: &Path, prog: &str, ifname: &str) -> PathBuf {
    links_dir(bpf_root).join(format!("{prog}@{}", pin_escape(ifname)))
}

/// bpffs refuses names with a dot (`flannel.1`): `%` and `.` are escaped as in URLs.
fn pin_escape(ifname: &str) -> String {
    ifname.replace('%', "%25").replace('.', "%2E")
}

fn pin_unescape(pinned: &str) -> String {
    pinned.replace("%2E", ".").replace("%25", "%")
}

impl Attached {
    /// Attaches the node tc programs to `ifname` (tcx: after whatever is there), replacing links a previous run
    /// pinned.
    pub fn attach_tc(&mut self, bpf_root: &Path, ifname: &str, index: u32) -> Result<(), DataplaneError> {
        let links = self.attach_progs(bpf_root, ifname, &NODE_TC)?;
        self.tc.insert(ifname.to_string(), (index, links));
        Ok(())
    }

    /// Attaches the policy programs to a pod's host-side veth.
    pub fn attach_pod(&mut self, bpf_root: &Path, ifname: &str, index: u32) -> Result<(), DataplaneError> {
        let links = self.attach_progs(bpf_root, ifname, &POD_TC)?;
        self.pod_tc.insert(ifname.to_string(), (index, links));
        Ok(())
    }

    fn attach_progs(
        &mut self,
        bpf_root: &Path,
        ifname: &str,
        progs: &TcProgs,
    ) -> Result<Vec<PinnedLink>, DataplaneError> {
        let mut links = Vec::new();
        for &(name, kind) in progs {
            let what = |step: &str| format!("{step} {name} on {ifname}");
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(name)
                .ok_or_else(|| prerequisite(what("finding"), "not in the object"))?
                .try_into()
                .map_err(|e| prerequisite(what("typing"), e))?;
            let id = prog.attach(ifname, kind).map_err(|e| prerequisite(what("attaching"), e))?;
            let link = prog.take_link(id).map_err(|e| prerequisite(what("taking the link of"), e))?;
            links.push(pin_link(link, &tc_pin(bpf_root, name, ifname), what)?);
        }
        Ok(links)
    }

    /// Detaches the node tc programs from `ifname` (gone from the node's addresses, or gone altogether).
    pub fn detach_tc(&mut self, bpf_root: &Path, ifname: &str) {
        self.tc.remove(ifname);
        for (name, _) in NODE_TC {
            let _ = release(&tc_pin(bpf_root, name, ifname));
        }
    }

    /// Detaches the policy programs from a pod's veth (or forgets their pins once the veth is gone).
    pub fn detach_pod(&mut self, bpf_root: &Path, ifname: &str) {
        self.pod_tc.remove(ifname);
        for (name, _) in POD_TC {
            let _ = release(&tc_pin(bpf_root, name, ifname));
        }
    }
}

/// Interfaces a previous run pinned links of `progs` for.
pub fn pinned_tc_interfaces(bpf_root: &Path, progs: &TcProgs) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(links_dir(bpf_root))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let (prog, i) = name.split_once('@')?;
            progs.iter().any(|(p, _)| *p == prog).then(|| pin_unescape(i))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The error with its whole chain of causes (aya's say "`bpf_link_create` failed" and keep the errno below).
fn prerequisite(what: impl Into<String>, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> DataplaneError {
    let e: Box<dyn std::error::Error + Send + Sync> = e.into();
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text += &format!(": {c}");
        cause = c.source();
    }
    DataplaneError::new(ErrorKind::Prerequisite, what, text)
}

fn fs_type(p: &Path) -> std::io::Result<i64> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs(2) on a NUL-terminated path into a zeroed struct we own.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

pub fn links_dir(bpf_root: &Path) -> PathBuf {
    bpf_root.join("links")
}

/// Loads the programs (adopting pinned maps), attaches them to `cgroup` and pins their links, replacing links a
/// previous run pinned.
pub fn attach(cgroup: &Path, bpf_root: &Path, conntrack_max: u32) -> Result<Attached, DataplaneError> {
    std::fs::create_dir_all(links_dir(bpf_root))
        .map_err(|e| prerequisite(format!("creating {}", links_dir(bpf_root).display()), e))?;
    if fs_type(bpf_root).map_err(|e| prerequisite(format!("statfs {}", bpf_root.display()), e))? != BPF_FS_MAGIC {
        return Err(prerequisite(
            format!("--bpf-root {}", bpf_root.display()),
            "not on a BPF filesystem (mount one: mount -t bpf bpf /sys/fs/bpf)",
        ));
    }
    if fs_type(cgroup).map_err(|e| prerequisite(format!("statfs {}", cgroup.display()), e))? != CGROUP2_SUPER_MAGIC {
        return Err(prerequisite(format!("--cgroup-root {}", cgroup.display()), "not a cgroup v2 directory"));
    }
    let cg = std::fs::File::open(cgroup).map_err(|e| prerequisite(format!("opening {}", cgroup.display()), e))?;
    drop_incompatible_pins(bpf_root, conntrack_max);
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(bpf_root)
        .map_max_entries(names::CONNTRACK, conntrack_max)
        .map_max_entries(names::NAT, conntrack_max)
        .load(PROGRAMS)
        .map_err(|e| prerequisite("loading the eBPF programs", e))?;
    let mut links = Vec::new();
    for name in names::PROGRAMS {
        let what = |step: &str| format!("{step} {name}");
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or_else(|| prerequisite(what("finding"), "not in the object"))?
            .try_into()
            .map_err(|e| prerequisite(what("typing"), e))?;
        prog.load().map_err(|e| prerequisite(what("loading"), e))?;
        // A link-based cgroup attachment is always one of many (the kernel takes no ALLOW_MULTI flag with it).
        let id = prog.attach(cg.as_fd(), CgroupAttachMode::Single).map_err(|e| prerequisite(what("attaching"), e))?;
        let link = prog.take_link(id).map_err(|e| prerequisite(what("taking the link of"), e))?;
        links.push(pin_link(link, &links_dir(bpf_root).join(name), what)?);
    }
    for (name, _) in NODE_TC.iter().chain(&POD_TC) {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or_else(|| prerequisite(format!("finding {name}"), "not in the object"))?
            .try_into()
            .map_err(|e| prerequisite(format!("typing {name}"), e))?;
        prog.load().map_err(|e| prerequisite(format!("loading {name}"), e))?;
    }
    /// A map of the object, typed (a hash map, an LPM trie, a per-CPU array).
    fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
        ebpf: &mut Ebpf,
        name: &str,
    ) -> Result<T, DataplaneError> {
        let m = ebpf.take_map(name).ok_or_else(|| prerequisite(format!("the map {name}"), "not in the object"))?;
        T::try_from(m).map_err(|e| prerequisite(format!("the map {name}"), e))
    }
    let services = take(&mut ebpf, names::SERVICES)?;
    let conntrack = take(&mut ebpf, names::CONNTRACK)?;
    let nat = take(&mut ebpf, names::NAT)?;
    let ifaddr = take(&mut ebpf, names::IFADDR)?;
    let pol_pods = take(&mut ebpf, names::POLICY_PODS)?;
    let pol_named = take(&mut ebpf, names::POLICY_NAMED)?;
    let host = take(&mut ebpf, names::HOST_ADDRS)?;
    let pod_addrs = take(&mut ebpf, names::POD_ADDRS)?;
    let pol_peers = take(&mut ebpf, names::POLICY_PEERS)?;
    let pol_ports = take(&mut ebpf, names::POLICY_PORTS)?;
    let pod_network = take(&mut ebpf, names::POD_NETWORK)?;
    let stats = take(&mut ebpf, names::STATS)?;
    Ok(Attached {
        ebpf,
        services,
        conntrack,
        nat,
        ifaddr,
        pol_pods,
        pol_peers,
        pol_ports,
        pol_named,
        host,
        pod_addrs,
        pod_network,
        stats,
        links,
        tc: BTreeMap::new(),
        pod_tc: BTreeMap::new(),
        conntrack_max,
    })
}

/// aya reuses a pinned map as it is. A pin left by another layout (an older Tartan: other key or value sizes,
/// sizes or flags) would be used with the wrong shape, or fail every load: such pins are removed, and the map is
/// made anew (the service map is refilled by the full sync that follows; reverse and affinity entries are lost).
fn drop_incompatible_pins(bpf_root: &Path, conntrack_max: u32) {
    use std::mem::size_of;
    let want: [(&str, usize, usize, u32, u32); 17] = [
        (names::SERVICES, size_of::<ServiceKey>(), size_of::<ServiceValue>(), ebpf_maps::SERVICES_MAX, 1),
        (
            names::REVERSE,
            size_of::<ebpf_maps::ReverseKey>(),
            size_of::<ebpf_maps::ReverseValue>(),
            ebpf_maps::REVERSE_MAX,
            0,
        ),
        (
            names::AFFINITY,
            size_of::<ebpf_maps::AffinityKey>(),
            size_of::<ebpf_maps::AffinityValue>(),
            ebpf_maps::AFFINITY_MAX,
            0,
        ),
        (names::STATS, 4, 8, ebpf_maps::stats::COUNT, 0),
        (names::CONNTRACK, size_of::<FlowKey>(), size_of::<CtValue>(), conntrack_max, 0),
        (names::NAT, size_of::<FlowKey>(), size_of::<NatValue>(), conntrack_max, 0),
        (
            names::AFFINITY_EXT,
            size_of::<ebpf_maps::ExtAffinityKey>(),
            size_of::<ebpf_maps::AffinityValue>(),
            ebpf_maps::AFFINITY_MAX,
            0,
        ),
        (names::IFADDR, size_of::<IfAddrKey>(), 16, ebpf_maps::IFADDR_MAX, 0),
        (names::POLICY_PODS, 4, size_of::<PodValue>(), ebpf_maps::POLICY_PODS_MAX, 0),
        // LPM keys carry their prefix length first.
        (names::POLICY_PEERS, 4 + size_of::<PeerKey>(), 8, ebpf_maps::POLICY_RULES_MAX, 1),
        (names::POLICY_PORTS, 4 + size_of::<PortKey>(), 8, ebpf_maps::POLICY_RULES_MAX, 1),
        (names::POLICY_NAMED, size_of::<NamedKey>(), 8, ebpf_maps::POLICY_RULES_MAX, 1),
        (
            names::POLICY_CT,
            size_of::<ebpf_maps::PolicyFlowKey>(),
            size_of::<ebpf_maps::PolicyFlowValue>(),
            ebpf_maps::POLICY_CT_MAX,
            0,
        ),
        (names::HOST_ADDRS, 16, 1, ebpf_maps::HOST_ADDRS_MAX, 0),
        (names::POD_ADDRS, 16, 4, ebpf_maps::POLICY_PODS_MAX * 2, 0),
        (names::POD_MACS, 4, 8, ebpf_maps::POLICY_PODS_MAX, 0),
        (names::POD_NETWORK, 4 + size_of::<ebpf_maps::NetKey>(), 1, 256, 1),
    ];
    for (name, key, value, max, flags) in want {
        let pin = bpf_root.join(name);
        let Ok(info) = aya::maps::MapInfo::from_pin(&pin) else { continue };
        let same = info.key_size() as usize == key
            && info.value_size() as usize == value
            && info.max_entries() == max
            && info.map_flags() == flags;
        if !same {
            tracing::warn!(pin = %pin.display(), "a pinned map of another layout; replacing it");
            let _ = std::fs::remove_file(&pin);
        }
    }
}

/// Pins a program's new link at `pin`, in place of the link a previous run pinned there (released only now, once
/// the new one is attached).
fn pin_link<L: TryInto<FdLink>>(
    link: L,
    pin: &Path,
    what: impl Fn(&str) -> String,
) -> Result<PinnedLink, DataplaneError>
where
    L::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let link: FdLink = link.try_into().map_err(|e| prerequisite(what("the link of"), e))?;
    release(pin).map_err(|e| prerequisite(what("replacing the pinned link of"), e))?;
    link.pin(pin).map_err(|e| prerequisite(what("pinning the link of"), e))
}

/// Unpins the link at `pin`, if any, and drops it, which detaches its program.
fn release(pin: &Path) -> std::io::Result<()> {
    if !pin.exists() {
        return Ok(());
    }
    match PinnedLink::from_pin(pin) {
        Ok(l) => drop(l.unpin()?),
        // Not a link (someone else's file): removed, so that ours can take the name.
        Err(_) => std::fs::remove_file(pin)?,
    }
    Ok(())
}

/// Whether every program's link is still pinned, the tc ones on `interfaces` included (someone may remove pins by
/// hand).
pub fn links_pinned<'a>(
    bpf_root: &Path,
    interfaces: impl IntoIterator<Item = &'a String>,
    pods: impl IntoIterator<Item = &'a String>,
) -> bool {
    let pinned = |i: &String, progs: &TcProgs| progs.iter().all(|(n, _)| tc_pin(bpf_root, n, i).exists());
    names::PROGRAMS.iter().all(|n| links_dir(bpf_root).join(n).exists())
        && interfaces.into_iter().all(|i| pinned(i, &NODE_TC))
        && pods.into_iter().all(|i| pinned(i, &POD_TC))
}

/// Detaches every program (unpinning their links) and removes the pinned maps and the directory: what
/// `--cleanup` does. Missing pieces are fine; the first real failure is returned after trying the rest.
pub fn remove_all(bpf_root: &Path) -> std::io::Result<()> {
    let mut first = None;
    let tc = [&NODE_TC, &POD_TC]
        .into_iter()
        .flat_map(|progs| {
            pinned_tc_interfaces(bpf_root, progs)
                .into_iter()
                .flat_map(move |i| progs.iter().map(move |(n, _)| format!("{n}@{}", pin_escape(&i))))
        })
        .collect::<Vec<_>>();
    for name in names::PROGRAMS.iter().map(|n| n.to_string()).chain(tc) {
        if let Err(e) = release(&links_dir(bpf_root).join(name)) {
            first.get_or_insert(e);
        }
    }
    for map in [
        names::SERVICES,
        names::REVERSE,
        names::AFFINITY,
        names::STATS,
        names::CONNTRACK,
        names::NAT,
        names::AFFINITY_EXT,
        names::IFADDR,
        names::POLICY_PODS,
        names::POLICY_PEERS,
        names::POLICY_PORTS,
        names::POLICY_NAMED,
        names::POLICY_CT,
        names::HOST_ADDRS,
        names::POD_ADDRS,
        names::POD_MACS,
        names::POD_NETWORK,
    ] {
        match std::fs::remove_file(bpf_root.join(map)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                first.get_or_insert(e);
            }
            _ => {}
        }
    }
    for dir in [links_dir(bpf_root), bpf_root.to_path_buf()] {
        match std::fs::remove_dir(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                first.get_or_insert(e);
            }
            _ => {}
        }
    }
    first.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_escaped_for_bpffs_and_back() {
        for name in ["eth0", "flannel.1", "a%2Eb", "vlan.10%x"] {
            let e = pin_escape(name);
            assert!(!e.contains('.'), "{e}");
            assert_eq!(pin_unescape(&e), name);
        }
    }
}
