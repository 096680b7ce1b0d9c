//! Packet capture with tcpdump inside a lab namespace: start, make traffic, stop, read what crossed the wire.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

pub struct Capture {
    child: Option<Child>,
    out: tempfile_path::TempPath,
}

mod tempfile_path {
    /// A file removed on drop.
    pub struct TempPath(pub std::path::PathBuf);
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

impl Capture {
    /// `tcpdump -n -l -i <iface> <filter>` with numeric, line-buffered text output; returns once it listens.
    pub fn start(ns: &str, iface: &str, filter: &str) -> Result<Capture> {
        Capture::start_with(ns, iface, &[], filter)
    }

    /// As [`Capture::start`], with extra tcpdump options (e.g. `-e` for link-level headers, `-v`).
    pub fn start_with(ns: &str, iface: &str, opts: &[&str], filter: &str) -> Result<Capture> {
        let path =
            std::env::temp_dir().join(format!("tartan-cap-{}-{:08x}.txt", std::process::id(), rand::random::<u32>()));
        let file = std::fs::File::create(&path)?;
        let out = tempfile_path::TempPath(path);
        let mut cmd = crate::command_in(ns, "tcpdump")?;
        cmd.args(["-n", "-l", "-U", "-i", iface]).args(opts);
        if !filter.is_empty() {
            cmd.args(filter.split_whitespace());
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tcpdump")?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    if let Some(t) = tx.take() {
                        let _ = t.send(Ok(()));
                    }
                } else if let Some(t) = &tx {
                    if line.contains("tcpdump:") && !line.contains("verbose output suppressed") {
                        let _ = t.send(Err(line));
                    }
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(Capture { child: Some(child), out }),
            Ok(Err(msg)) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("tcpdump on {iface} in {ns}: {msg}")
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("tcpdump on {iface} in {ns} did not start listening")
            }
        }
    }

    /// Stops the capture and returns the packet lines.
    pub fn stop(mut self) -> Result<Vec<String>> {
        self.halt();
        let text = std::fs::read_to_string(&self.out.0)?;
        Ok(text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect())
    }

    fn halt(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Give tcpdump a moment to write what is in flight, then SIGINT (it flushes and exits).
            std::thread::sleep(Duration::from_millis(150));
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            for _ in 0..100 {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.halt();
    }
}
