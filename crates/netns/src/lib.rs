//! Network namespaces.
//!
//! setns(2) changes only the calling thread, so entering a namespace is tied to a guard that cannot leave the
//! thread (it is `!Send`) and that restores the namespace the thread had when it is dropped, on every path. Code
//! that must run inside a namespace and then return a value uses [`NetNs::run`], which does it on a scoped thread
//! of its own so the caller's thread is never touched. Sockets (netlink included) stay bound to the namespace they
//! were created in, so a common pattern is: enter, open a socket, leave.

use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

/// An open network namespace (holding it open keeps it alive even after its bind mount is gone).
#[derive(Debug)]
pub struct NetNs {
    file: File,
    path: PathBuf,
}

impl NetNs {
    /// Opens a namespace file such as `/run/netns/NAME` or `/proc/PID/ns/net`, checking that it is one.
    pub fn open(path: impl AsRef<Path>) -> io::Result<NetNs> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path)?;
        // NSFS_MAGIC: a bind-mounted or /proc namespace file; anything else is not a namespace.
        let st = nix::sys::statfs::fstatfs(&file).map_err(io::Error::from)?;
        if st.filesystem_type().0 as i64 != 0x6e73_6673 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a network namespace", path.display()),
            ));
        }
        Ok(NetNs { file, path })
    }

    /// The namespace `ip netns add NAME` created.
    pub fn named(name: &str) -> io::Result<NetNs> {
        NetNs::open(Path::new("/run/netns").join(name))
    }

    /// The calling thread's namespace.
    pub fn current() -> io::Result<NetNs> {
        NetNs::open("/proc/thread-self/ns/net")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// (device, inode): equal for two handles on one namespace.
    pub fn id(&self) -> io::Result<(u64, u64)> {
        let m = self.file.metadata()?;
        Ok((m.dev(), m.ino()))
    }

    /// Moves the calling thread into this namespace until the guard drops.
    pub fn enter(&self) -> io::Result<NetNsGuard> {
        let prev = NetNs::current()?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        Ok(NetNsGuard { prev: prev.file, _not_send: PhantomData })
    }

    /// Runs `f` inside this namespace on a thread of its own and returns its value.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        std::thread::scope(|s| {
            s.spawn(|| {
                let _guard = self.enter()?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// While alive, the current thread is in another namespace. Dropping it goes back.
pub struct NetNsGuard {
    prev: File,
    _not_send: PhantomData<*const ()>,
}

impl Drop for NetNsGuard {
    fn drop(&mut self) {
        if let Err(e) = setns(self.prev.as_fd(), CloneFlags::CLONE_NEWNET) {
            // A thread left in the wrong namespace would silently act on the wrong network: never carry on.
            eprintln!("fatal: cannot return to the original network namespace: {e}");
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_files_that_are_not_namespaces() {
        let err = NetNs::open("/proc/self/status").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(NetNs::open("/nonexistent/ns").is_err());
    }

    #[test]
    fn current_is_itself() {
        let a = NetNs::current().unwrap();
        let b = NetNs::open("/proc/self/ns/net").unwrap();
        assert_eq!(a.id().unwrap(), b.id().unwrap());
        // Entering the namespace we are in is harmless and the guard restores it.
        let v = a.run(|| NetNs::current().unwrap().id().unwrap()).unwrap();
        assert_eq!(v, a.id().unwrap());
    }
}
