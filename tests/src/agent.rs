//! The client side of the guest agent on the test guest's COM1.
//!
//! Both QEMU (`-chardev socket,server=on`) and Tandem (`--serial socket=P`) serve the
//! guest's COM1 on a unix socket; this connects to it, logs every byte to a console log,
//! and speaks the agent's line protocol: the request is `<id> <base64 command>\n`, the
//! answer `@@BEGIN <id>@@`, the output, `@@END <id> <status>@@`.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::{err, Result};

/// What a command printed (stdout and stderr together, trailing newline removed) and
/// its exit status.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    pub stdout: String,
    pub status: i32,
}

#[derive(Default)]
struct State {
    lines: Vec<String>,
    partial: String,
    closed: bool,
    ready: bool,
}

pub struct Agent {
    stream: UnixStream,
    shared: Arc<(Mutex<State>, Condvar)>,
    console_log: PathBuf,
    next_id: u64,
    /// `run_ok` uses this timeout.
    pub default_timeout: Duration,
    /// Called when a wait times out; what it returns (say, the vCPUs'
    /// registers) goes into the error, so a hung guest can be diagnosed.
    pub on_timeout: Option<Box<dyn Fn() -> String + Send>>,
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The last `n` console lines (and an unfinished one), indented, for an error message.
fn console_tail(lines: &[String], partial: &str, n: usize) -> String {
    let start = lines.len().saturating_sub(n);
    let mut out: Vec<&str> = lines[start..].iter().map(String::as_str).collect();
    if !partial.is_empty() {
        out.push(partial);
    }
    out.iter().map(|l| format!("  | {l}\n")).collect()
}

impl Agent {
    /// Connects to the serial socket at `path`, retrying for up to 30 s while the VMM
    /// creates it. Everything the guest prints is appended to `console_log`.
    pub fn connect_unix(path: impl AsRef<Path>, console_log: PathBuf) -> Result<Agent> {
        let path = path.as_ref();
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(err!(
                        "cannot connect to the guest serial socket {}: {e}",
                        path.display()
                    ))
                }
            }
        };
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&console_log)
            .map_err(|e| err!("cannot open console log {}: {e}", console_log.display()))?;
        let shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let sh = Arc::clone(&shared);
        let mut reader = stream.try_clone().map_err(|e| err!("serial socket: {e}"))?;
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) | Err(_) => 0,
                    Ok(n) => n,
                };
                let (lock, cv) = &*sh;
                let Ok(mut st) = lock.lock() else { return };
                if n == 0 {
                    st.closed = true;
                    cv.notify_all();
                    return;
                }
                let _ = log.write_all(&buf[..n]);
                let text = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
                st.partial.push_str(&text);
                while let Some(pos) = st.partial.find('\n') {
                    let line: String = st.partial.drain(..=pos).collect();
                    let line = line.trim_end_matches('\n').to_string();
                    if line.contains("@@AGENT-READY@@") {
                        st.ready = true;
                    }
                    st.lines.push(line);
                }
                cv.notify_all();
            }
        });
        Ok(Agent {
            stream,
            shared,
            console_log,
            next_id: 1,
            default_timeout: Duration::from_secs(60),
            on_timeout: None,
        })
    }

    pub fn console_log(&self) -> &Path {
        &self.console_log
    }

    /// Waits until `f` finds something in the lines seen so far.
    fn wait<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut f: impl FnMut(&State) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.shared;
        let mut st = lock
            .lock()
            .map_err(|_| err!("agent reader thread panicked"))?;
        loop {
            if let Some(v) = f(&st) {
                return Ok(v);
            }
            if st.closed {
                return Err(err!(
                    "guest serial closed (VMM exited?) while waiting for {what}; console log: {}",
                    self.console_log.display()
                ));
            }
            let now = Instant::now();
            if now >= deadline {
                // The console's last lines (kernel warnings, a hung task's stack) go
                // into the error: CI keeps the output, not the work dir.
                let tail = console_tail(&st.lines, &st.partial, 90);
                drop(st);
                let diag = self.on_timeout.as_ref().map(|f| f()).unwrap_or_default();
                return Err(err!(
                    "timed out after {:.0} s waiting for {what}; console log: {}\nthe console's last lines:\n{tail}{diag}",
                    timeout.as_secs_f64(),
                    self.console_log.display()
                ));
            }
            st = cv
                .wait_timeout(st, deadline - now)
                .map_err(|_| err!("agent reader thread panicked"))?
                .0;
        }
    }

    /// The guest agent runs already (a migrated guest): do not wait for its banner.
    pub fn assume_ready(&mut self) {
        if let Ok(mut st) = self.shared.0.lock() {
            st.ready = true;
        }
    }

    /// Waits for the agent's `@@AGENT-READY@@`.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        self.wait(timeout, "the guest agent (@@AGENT-READY@@)", |st| {
            st.ready.then_some(())
        })
    }

    /// Waits for a console line containing `pattern`; returns the line.
    pub fn wait_for_line(&self, pattern: &str, timeout: Duration) -> Result<String> {
        self.wait(
            timeout,
            &format!("a console line containing {pattern:?}"),
            |st| st.lines.iter().find(|l| l.contains(pattern)).cloned(),
        )
    }

    /// Runs `cmd` with `sh` in the guest; output is stdout and stderr interleaved.
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> Result<CmdOutput> {
        self.wait_ready(timeout)?;
        let id = self.next_id;
        self.next_id += 1;
        let request = format!("{id} {}\n", base64(cmd.as_bytes()));
        self.stream
            .write_all(request.as_bytes())
            .map_err(|e| err!("writing to the guest serial: {e}"))?;
        let begin = format!("@@BEGIN {id}@@");
        let end_prefix = format!("@@END {id} ");
        self.wait(timeout, &format!("the answer to `{cmd}`"), |st| {
            let b = st.lines.iter().rposition(|l| l.ends_with(&begin))?;
            let e = b
                + 1
                + st.lines[b + 1..]
                    .iter()
                    .position(|l| l.starts_with(&end_prefix))?;
            let status = st.lines[e][end_prefix.len()..]
                .trim_end_matches("@@")
                .trim()
                .parse()
                .unwrap_or(-1);
            // The guest's watchdog (image.rs) may print while a command runs.
            let mut out: Vec<&str> = st.lines[b + 1..e]
                .iter()
                .map(String::as_str)
                .filter(|l| !l.starts_with("TANDEM-WATCHDOG "))
                .collect();
            if out.last() == Some(&"") {
                out.pop();
            }
            Some(CmdOutput {
                stdout: out.join("\n"),
                status,
            })
        })
    }

    /// Runs `cmd` (default timeout) and fails unless it exits 0; returns its output.
    pub fn run_ok(&mut self, cmd: &str) -> Result<String> {
        let out = self.run(cmd, self.default_timeout)?;
        if out.status != 0 {
            return Err(err!(
                "guest command `{cmd}` exited {}: {}",
                out.status,
                out.stdout.trim()
            ));
        }
        Ok(out.stdout)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(super::base64(b""), "");
        assert_eq!(super::base64(b"f"), "Zg==");
        assert_eq!(super::base64(b"fo"), "Zm8=");
        assert_eq!(super::base64(b"foo"), "Zm9v");
        assert_eq!(super::base64(b"foobar"), "Zm9vYmFy");
    }
}
