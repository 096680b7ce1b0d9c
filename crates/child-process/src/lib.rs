//! One way to run the tools the daemons drive (iptables-restore, ipset, conntrack): with a deadline, so that a
//! wedged child (a held xtables lock, a kernel stuck on a huge transaction) fails one sync instead of freezing a
//! daemon forever. The child is killed when the deadline passes; its output is collected either way.

use std::io::{Read, Write};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    #[error("cannot run {cmd}: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{cmd} did not finish within {after:?} and was killed")]
    Timeout { cmd: String, after: Duration },
}

/// What a finished child printed, and how it ended.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// The program and arguments of `cmd`, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` with `stdin` (if any) as its input, waiting at most `timeout`. The exit status is not judged here:
/// callers decide what a non-zero exit means (`iptables -C` answers 1 for "no such rule").
pub fn run(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Result<Output, ChildError> {
    let name = describe(cmd);
    let mut child = cmd
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ChildError::Spawn { cmd: name.clone(), source })?;
    let pid = child.id() as libc::pid_t;
    // Each pipe has its own thread, so a child that fills stdout before reading all of stdin cannot deadlock us.
    let writer = stdin.map(|input| {
        let mut pipe = child.stdin.take().expect("stdin was piped");
        let input = input.to_vec();
        std::thread::spawn(move || {
            // A child that exits early closes the pipe (EPIPE): its exit status tells what went wrong.
            let _ = pipe.write_all(&input);
        })
    });
    let reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = reader(Box::new(child.stdout.take().expect("stdout was piped")));
    let err = reader(Box::new(child.stderr.take().expect("stderr was piped")));
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(timeout) {
        Ok(r) => Some(r),
        Err(_) => {
            // The waiter has not reaped the child yet (it would have sent), so the pid is still this child's.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = rx.recv();
            None
        }
    };
    let _ = waiter.join();
    if let Some(w) = writer {
        let _ = w.join();
    }
    let (stdout, stderr) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
    match status {
        Some(Ok(status)) => Ok(Output { status, stdout, stderr }),
        Some(Err(source)) => Err(ChildError::Spawn { cmd: name, source }),
        None => Err(ChildError::Timeout { cmd: name, after: timeout }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_status_and_input_are_passed_through() {
        let o =
            run(Command::new("sh").args(["-c", "cat; echo err >&2; exit 3"]), Some(b"in\n"), Duration::from_secs(5))
                .unwrap();
        assert_eq!(o.stdout, b"in\n");
        assert_eq!(o.stderr, b"err\n");
        assert_eq!(o.status.code(), Some(3));
    }

    #[test]
    fn an_overrunning_child_is_killed() {
        let t = std::time::Instant::now();
        let e = run(Command::new("sleep").arg("30"), None, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, ChildError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10));
        assert!(matches!(
            run(&mut Command::new("/nonexistent"), None, Duration::from_secs(1)),
            Err(ChildError::Spawn { .. })
        ));
    }
}
