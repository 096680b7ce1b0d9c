//! Node-local state (subnet.env, the CNI plugin's pod records, the VtepMAC, a lab's state) is read by other
//! processes at any moment, so it is never written in place: the new contents go to a temporary file in the same
//! directory (same filesystem, so the rename is atomic), are flushed, and replace the old file in one rename.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Replaces `path` with `contents`, creating its directory if needed.
pub fn write(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = temp_path(dir, path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents)?;
        // Flushed before the rename: after a crash the file holds the old contents or the new, not an empty one.
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A hidden name per process: two writers of the same file (two CNI calls, a daemon and its restart) never share
/// a temporary file, and a reader listing the directory for `*.json` never picks one up.
fn temp_path(dir: &Path, path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dir.join(format!(".{name}.{}.tmp", std::process::id()))
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
