//! `tartan install`: what a DaemonSet's init container does to put the plugin on a node (flannel's install-cni,
//! Cilium's cni-install.sh), without a shell or `cp` (the image has neither).
//!
//! Every file is written whole to a temporary name in its own directory and renamed into place, so a runtime
//! calling the plugin or reading net.d at that moment sees the old file or the new one, never half of one (and a
//! running plugin is never overwritten in place: ETXTBSY). A file already holding the same bytes is left alone, so
//! a restarted init container changes nothing. A conflist that is not Tartan's is never replaced unless asked.

use std::path::{Path, PathBuf};

use thiserror::Error;

/// What the command line asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallOptions {
    /// Binaries to copy into `bin_dir` (by file name). The plugin itself when none is named.
    pub binaries: Vec<PathBuf>,
    pub bin_dir: PathBuf,
    /// The conflist to install (a ConfigMap's file); none installs binaries only.
    pub conflist: Option<PathBuf>,
    pub conf_dir: PathBuf,
    /// The file name in `conf_dir`.
    pub conf_name: String,
    /// Replace a conflist at that name even when it is not Tartan's.
    pub force: bool,
}

#[derive(Debug, Error)]
pub enum InstallError {
    #[error("usage: {0}\n{USAGE}")]
    Usage(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a CNI conflist: {why}")]
    BadConflist { path: PathBuf, why: String },
    #[error("{path} is not Tartan's (no plugin of type \"tartan\"): left as it is (--force replaces it)")]
    Foreign { path: PathBuf },
}

impl InstallError {
    /// 2 for a bad command line (as clap does), 1 for the rest.
    pub fn exit_code(&self) -> i32 {
        match self {
            InstallError::Usage(_) => 2,
            _ => 1,
        }
    }
}

pub const USAGE: &str = "tartan install [--bin-dir DIR] [--binary PATH]... [--conflist FILE] [--conf-dir DIR] \
[--conf-name NAME] [--force]
  --bin-dir DIR     where CNI plugins go (default /opt/cni/bin)
  --binary PATH     a binary to copy there (repeatable; default: this plugin)
  --conflist FILE   the network config list to install (default: none)
  --conf-dir DIR    the runtime's CNI config directory (default /etc/cni/net.d)
  --conf-name NAME  its file name there (default 10-tartan.conflist)
  --force           replace a conflist of that name that is not Tartan's";

/// What happened to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Written(PathBuf),
    Unchanged(PathBuf),
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Written(p) => write!(f, "installed {}", p.display()),
            Action::Unchanged(p) => write!(f, "unchanged {}", p.display()),
        }
    }
}

/// Parses the arguments after `install`. `self_exe` is the default binary.
pub fn parse_args(args: &[String], self_exe: PathBuf) -> Result<InstallOptions, InstallError> {
    let mut o = InstallOptions {
        binaries: Vec::new(),
        bin_dir: PathBuf::from("/opt/cni/bin"),
        conflist: None,
        conf_dir: PathBuf::from("/etc/cni/net.d"),
        conf_name: "10-tartan.conflist".into(),
        force: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        // Both `--flag value` and `--flag=value`.
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let mut value = || -> Result<String, InstallError> {
            match inline.clone().or_else(|| it.next().cloned()) {
                Some(v) if !v.is_empty() => Ok(v),
                _ => Err(InstallError::Usage(format!("{flag} needs a value"))),
            }
        };
        match flag {
            "--bin-dir" => o.bin_dir = value()?.into(),
            "--binary" => o.binaries.push(value()?.into()),
            "--conflist" => o.conflist = Some(value()?.into()),
            "--conf-dir" => o.conf_dir = value()?.into(),
            "--conf-name" => {
                let n = value()?;
                if n.contains('/') || n.starts_with('.') {
                    return Err(InstallError::Usage(format!("--conf-name {n:?}: a plain file name")));
                }
                o.conf_name = n;
            }
            "--force" if inline.is_none() => o.force = true,
            "-h" | "--help" => return Err(InstallError::Usage("help".into())),
            other => return Err(InstallError::Usage(format!("unknown argument {other:?}"))),
        }
    }
    if o.binaries.is_empty() {
        o.binaries.push(self_exe);
    }
    Ok(o)
}

/// Installs the binaries, then the conflist (a runtime that finds the config finds the plugin it names). Stops
/// at the first failure: what was installed before it is complete and correct on its own.
pub fn install(o: &InstallOptions) -> Result<Vec<Action>, InstallError> {
    // Everything is read and checked before anything is written: a bad or foreign conflist leaves the node as it was
    // (not a new plugin under the old config).
    let mut bins = Vec::new();
    for bin in &o.binaries {
        let bytes = std::fs::read(bin).map_err(|source| InstallError::Io { path: bin.clone(), source })?;
        let name = bin.file_name().ok_or_else(|| InstallError::Usage(format!("{}: no file name", bin.display())))?;
        bins.push((o.bin_dir.join(name), bytes));
    }
    let mut conf = None;
    if let Some(src) = &o.conflist {
        let bytes = std::fs::read(src).map_err(|source| InstallError::Io { path: src.clone(), source })?;
        check_conflist(&bytes).map_err(|why| InstallError::BadConflist { path: src.clone(), why })?;
        let dst = o.conf_dir.join(&o.conf_name);
        match std::fs::read(&dst) {
            Ok(old) if old == bytes => {}
            Ok(old) if !o.force && !is_tartans(&old) => return Err(InstallError::Foreign { path: dst }),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(InstallError::Io { path: dst, source }),
        }
        conf = Some((dst, bytes));
    }
    let mut done = Vec::new();
    for (dst, bytes) in &bins {
        done.push(put(dst, bytes, 0o755)?);
    }
    if let Some((dst, bytes)) = &conf {
        done.push(put(dst, bytes, 0o644)?);
        for earlier in configs_before(&o.conf_dir, &o.conf_name) {
            // Runtimes take the first config by name: this one would not be used.
            eprintln!(
                "tartan install: warning: {} sorts before {} and runtimes use the first",
                earlier.display(),
                o.conf_name
            );
        }
    }
    Ok(done)
}

/// A conflist as libcni reads one: an object with a name and a non-empty list of plugins, each with a type.
fn check_conflist(bytes: &[u8]) -> Result<(), String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if v.get("name").and_then(|n| n.as_str()).is_none_or(str::is_empty) {
        return Err("no \"name\"".into());
    }
    let plugins = v.get("plugins").and_then(|p| p.as_array()).ok_or("no \"plugins\" list")?;
    if plugins.is_empty() {
        return Err("\"plugins\" is empty".into());
    }
    if let Some(i) = plugins.iter().position(|p| !p.get("type").is_some_and(|t| t.is_string())) {
        return Err(format!("plugins[{i}] has no \"type\""));
    }
    Ok(())
}

/// A conflist this command may replace: one that runs the tartan plugin.
fn is_tartans(bytes: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) else { return false };
    let plugin_is_ours = |p: &serde_json::Value| p.get("type").and_then(|t| t.as_str()) == Some("tartan");
    v.get("plugins").and_then(|p| p.as_array()).is_some_and(|ps| ps.iter().any(plugin_is_ours)) || plugin_is_ours(&v)
}

/// Config files libcni would pick before `name` (it reads *.conf, *.conflist and *.json in name order).
fn configs_before(dir: &Path, name: &str) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            !n.starts_with('.')
                && n.as_str() < name
                && [".conf", ".conflist", ".json"].iter().any(|ext| n.ends_with(ext))
        })
        .collect();
    v.sort();
    v
}

/// Writes `bytes` at `dst` with `mode` through a temporary file and a rename, unless it already holds them.
fn put(dst: &Path, bytes: &[u8], mode: u32) -> Result<Action, InstallError> {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(old) = std::fs::read(dst) {
        let mode_ok = std::fs::metadata(dst).map(|m| m.permissions().mode() & 0o777 == mode).unwrap_or(false);
        if old == bytes && mode_ok {
            return Ok(Action::Unchanged(dst.to_path_buf()));
        }
    }
    atomic_file::write_mode(dst, bytes, mode).map_err(|source| InstallError::Io { path: dst.to_path_buf(), source })?;
    // The rename itself reaches the disk with the directory.
    let dir = dst.parent().unwrap_or(Path::new("."));
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(Action::Written(dst.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: &str = r#"{"cniVersion":"1.1.0","name":"cbr0","plugins":[{"type":"tartan"}]}"#;

    fn opts(dir: &Path) -> InstallOptions {
        let bin = dir.join("src/tartan");
        std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
        std::fs::write(&bin, b"\x7fELF plugin").unwrap();
        std::fs::write(dir.join("src/conflist"), OURS).unwrap();
        let p = |rel: &str| dir.join(rel).to_string_lossy().into_owned();
        let args =
            ["--bin-dir".into(), p("bin"), "--conf-dir".into(), p("netd"), "--conflist".into(), p("src/conflist")];
        parse_args(&args, bin).unwrap()
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn installs_then_changes_nothing_the_second_time() {
        let d = tempfile::tempdir().unwrap();
        let o = opts(d.path());
        let first = install(&o).unwrap();
        assert!(first.iter().all(|a| matches!(a, Action::Written(_))), "{first:?}");
        assert_eq!(std::fs::read(d.path().join("bin/tartan")).unwrap(), b"\x7fELF plugin");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(d.path().join("bin/tartan")).unwrap().permissions().mode() & 0o777, 0o755);
        assert_eq!(std::fs::read_to_string(d.path().join("netd/10-tartan.conflist")).unwrap(), OURS);
        let second = install(&o).unwrap();
        assert!(second.iter().all(|a| matches!(a, Action::Unchanged(_))), "{second:?}");
        // No temporary file is left behind.
        assert_eq!(files(&d.path().join("bin")), ["tartan"]);
        assert_eq!(files(&d.path().join("netd")), ["10-tartan.conflist"]);
    }

    #[test]
    fn replaces_its_own_conflist_but_not_a_foreign_one_unless_forced() {
        let d = tempfile::tempdir().unwrap();
        let mut o = opts(d.path());
        std::fs::create_dir_all(&o.conf_dir).unwrap();
        let dst = o.conf_dir.join("10-tartan.conflist");
        std::fs::write(&dst, r#"{"name":"cbr0","plugins":[{"type":"tartan","mtu":1400}]}"#).unwrap();
        install(&o).unwrap();
        assert_eq!(std::fs::read_to_string(&dst).unwrap(), OURS);

        let foreign = r#"{"name":"cbr0","plugins":[{"type":"flannel"}]}"#;
        std::fs::write(&dst, foreign).unwrap();
        let e = install(&o).unwrap_err();
        assert!(matches!(e, InstallError::Foreign { .. }), "{e}");
        assert_eq!(std::fs::read_to_string(&dst).unwrap(), foreign);
        o.force = true;
        install(&o).unwrap();
        assert_eq!(std::fs::read_to_string(&dst).unwrap(), OURS);
    }

    #[test]
    fn a_bad_conflist_installs_no_config() {
        let d = tempfile::tempdir().unwrap();
        let o = opts(d.path());
        for (text, why) in [
            ("{", "EOF"),
            (r#"{"plugins":[{"type":"tartan"}]}"#, "no \"name\""),
            (r#"{"name":"x","plugins":[]}"#, "empty"),
            (r#"{"name":"x","plugins":[{"mtu":1}]}"#, "plugins[0]"),
        ] {
            std::fs::write(o.conflist.as_ref().unwrap(), text).unwrap();
            let e = install(&o).unwrap_err().to_string();
            assert!(e.contains("not a CNI conflist") && e.contains(why), "{text}: {e}");
            assert!(!o.conf_dir.join("10-tartan.conflist").exists());
            // Nor the plugin: nothing is written until everything checked out.
            assert!(!o.bin_dir.join("tartan").exists());
        }
    }

    #[test]
    fn arguments() {
        let me = PathBuf::from("/tartan");
        let a = |v: &[&str]| parse_args(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>(), me.clone());
        let o = a(&[]).unwrap();
        assert_eq!(o.binaries, [PathBuf::from("/tartan")]);
        assert_eq!(o.bin_dir, PathBuf::from("/opt/cni/bin"));
        assert_eq!(o.conf_dir, PathBuf::from("/etc/cni/net.d"));
        assert_eq!((o.conflist, o.force), (None, false));
        let o = a(&["--bin-dir=/host/bin", "--binary", "/a", "--binary=/b", "--force", "--conf-name", "05-t.conflist"])
            .unwrap();
        assert_eq!(o.bin_dir, PathBuf::from("/host/bin"));
        assert_eq!(o.binaries, [PathBuf::from("/a"), PathBuf::from("/b")]);
        assert!(o.force);
        assert_eq!(o.conf_name, "05-t.conflist");
        for bad in [&["--bin-dir"][..], &["--what"], &["--conf-name", "../x"], &["--force=yes"]] {
            let e = a(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn warns_of_configs_that_sort_first() {
        let d = tempfile::tempdir().unwrap();
        for n in ["05-other.conflist", "99-late.conf", ".hidden.conf", "07-notes.txt"] {
            std::fs::write(d.path().join(n), "{}").unwrap();
        }
        assert_eq!(configs_before(d.path(), "10-tartan.conflist"), [d.path().join("05-other.conflist")]);
    }
}
