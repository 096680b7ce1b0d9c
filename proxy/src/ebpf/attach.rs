//! Loading the programs, attaching them to the node's cgroup, and pinning everything under `--bpf-root`: the maps
//! (`TARTAN_*`, reused by the next start, which adopts what they hold) and one link per program (`links/<name>`),
//! which keeps the program attached while no proxy runs. A new start attaches its programs next to the pinned
//! ones, then unpins and drops the old links, so that there is no moment without translation (two programs in a
//! row are harmless: the second sees a backend address, which is no frontend).

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use aya::{Ebpf, EbpfLoader};
use ebpf_maps::{names, ServiceKey, ServiceValue};
use proxy_state::{DataplaneError, ErrorKind};

/// The programs, built by build.rs.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tartan-sock"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

pub struct Attached {
    /// Keeps the loaded programs (and the maps' descriptors) for the life of the dataplane.
    _ebpf: Ebpf,
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub links: Vec<PinnedLink>,
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
pub fn attach(cgroup: &Path, bpf_root: &Path) -> Result<Attached, DataplaneError> {
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
    drop_incompatible_pins(bpf_root);
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(bpf_root)
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
        let link: FdLink = prog
            .take_link(id)
            .map_err(|e| prerequisite(what("taking the link of"), e))?
            .try_into()
            .map_err(|e| prerequisite(what("the link of"), e))?;
        let pin = links_dir(bpf_root).join(name);
        release(&pin).map_err(|e| prerequisite(what("replacing the pinned link of"), e))?;
        links.push(link.pin(&pin).map_err(|e| prerequisite(what("pinning the link of"), e))?);
    }
    let services =
        ebpf.take_map(names::SERVICES).ok_or_else(|| prerequisite("the service map", "not in the object"))?;
    let services = HashMap::try_from(services).map_err(|e| prerequisite("the service map", e))?;
    Ok(Attached { _ebpf: ebpf, services, links })
}

/// aya reuses a pinned map as it is. A pin left by another layout (an older Tartan: other key or value sizes,
/// sizes or flags) would be used with the wrong shape, or fail every load: such pins are removed, and the map is
/// made anew (the service map is refilled by the full sync that follows; reverse and affinity entries are lost).
fn drop_incompatible_pins(bpf_root: &Path) {
    use std::mem::size_of;
    let want: [(&str, usize, usize, u32, u32); 4] = [
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

/// Whether every program's link is still pinned (someone may remove pins by hand).
pub fn links_pinned(bpf_root: &Path) -> bool {
    names::PROGRAMS.iter().all(|n| links_dir(bpf_root).join(n).exists())
}

/// Detaches every program (unpinning their links) and removes the pinned maps and the directory: what
/// `--cleanup` does. Missing pieces are fine; the first real failure is returned after trying the rest.
pub fn remove_all(bpf_root: &Path) -> std::io::Result<()> {
    let mut first = None;
    for name in names::PROGRAMS {
        if let Err(e) = release(&links_dir(bpf_root).join(name)) {
            first.get_or_insert(e);
        }
    }
    for map in [names::SERVICES, names::REVERSE, names::AFFINITY, names::STATS] {
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
