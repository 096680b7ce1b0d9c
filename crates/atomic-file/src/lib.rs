//! Node-local state (subnet.env, the CNI plugin's pod records, the VtepMAC, a lab's state) is read by other
//! processes at any moment, so it is never written in place: the new contents go to a temporary file in the same
//! directory (same filesystem, so the rename is atomic), are flushed, and replace the old file in one rename.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Replaces `path` with `contents`, creating its directory if needed.
pub fn write(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    replace(path, contents, None)
}

/// [`write`], the file getting exactly `mode` (whatever the umask): a binary put in place (`tartan install`).
pub fn write_mode(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    replace(path, contents, Some(mode))
}

fn replace(path: &Path, contents: &[u8], mode: Option<u32>) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = temp_path(dir, path);
    let result = (|| {
        let mut open = std::fs::OpenOptions::new();
        open.write(true).create_new(true);
        if let Some(m) = mode {
            open.mode(m);
        }
        let mut f = open.open(&tmp)?;
        f.write_all(contents)?;
        if let Some(m) = mode {
            // The umask may have narrowed the mode given at creation.
            f.set_permissions(std::fs::Permissions::from_mode(m))?;
        }
        // Flushed before the rename: after a crash the file holds the old contents or the new, not an empty one.
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A hidden name no other writer uses, created exclusively: two writers of the same file (two CNI calls, a daemon
/// and its restart, two init containers that are both PID 1 in their own namespace) never share a temporary file,
/// and a reader listing the directory for `*.json` never picks one up.
fn temp_path(dir: &Path, path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".{name}.{}.{nanos:x}{seq:x}.tmp", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/subnet.env");
        write(&path, b"FLANNEL_MTU=1450\n").unwrap();
        write(&path, b"FLANNEL_MTU=1500\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"FLANNEL_MTU=1500\n");
        let names: Vec<_> =
            std::fs::read_dir(dir.path().join("sub")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("subnet.env")]);
    }

    #[test]
    fn a_mode_is_exact() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bin/tartan");
        write_mode(&path, b"\x7fELF", 0o755).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o755);
    }

    #[test]
    fn a_failed_write_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write(&path, b"old").unwrap();
        // A directory where the file should go makes the rename fail.
        let blocked = dir.path().join("d");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("x"), b"").unwrap();
        assert!(write(&blocked, b"new").is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".tmp")));
    }
}
