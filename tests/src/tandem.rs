//! Launching `tandem run` from a test: the guest image, a serial socket the
//! guest agent talks over, an API socket, and a log kept in the work dir.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{err, Agent, GuestEnv};

/// How long a guest may take to reach its agent.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// A running `tandem run`, killed when dropped.
pub struct Tandem {
    pub child: Child,
    pub bin: PathBuf,
    pub api: PathBuf,
    pub serial: PathBuf,
    pub stderr: PathBuf,
}

impl Tandem {
    /// `tandem run` with the test guest, its serial and API on sockets in
    /// the run dir, the guest image's command line unless `extra` has a
    /// `--cmdline`, and the `extra` arguments.
    pub fn spawn(env: &GuestEnv, name: &str, extra: &[&str]) -> crate::Result<Self> {
        Self::spawn_in(env, name, None, None, extra)
    }

    /// [`Tandem::spawn`] inside network namespace `netns` (a "host" of its own), and
    /// with `incoming` a migration destination (`--incoming URL`, no kernel).
    pub fn spawn_in(
        env: &GuestEnv,
        name: &str,
        netns: Option<&str>,
        incoming: Option<&str>,
        extra: &[&str],
    ) -> crate::Result<Self> {
        let bin = env.tandem_bin()?;
        let api = env.socket_path(&format!("{name}.api"));
        let serial = env.socket_path(&format!("{name}.serial"));
        let stderr = env.workdir.join(format!("{name}.tandem.log"));
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.arg("run");
        match incoming {
            Some(url) => {
                cmd.arg("--incoming").arg(url);
            }
            None => {
                cmd.arg("--kernel")
                    .arg(&env.guest.kernel)
                    .arg("--initramfs")
                    .arg(&env.guest.initramfs);
                if !extra.contains(&"--cmdline") {
                    cmd.arg("--cmdline").arg(env.guest.cmdline());
                }
            }
        }
        cmd.arg("--serial")
            .arg(format!("socket={}", serial.display()))
            .arg("--api-socket")
            .arg(&api);
        cmd.args(extra)
            .env(
                "TANDEM_LOG",
                std::env::var("TANDEM_TEST_LOG").unwrap_or_else(|_| "info,devices=debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).map_err(|e| err!("{e}"))?);
        let child = cmd
            .spawn()
            .map_err(|e| err!("cannot start {}: {e}", bin.display()))?;
        Ok(Self {
            child,
            bin,
            api,
            serial,
            stderr,
        })
    }

    /// Connect to the guest agent and wait until it is ready.
    pub fn agent(&mut self, env: &GuestEnv, name: &str) -> crate::Result<Agent> {
        let t0 = Instant::now();
        let mut agent = Agent::connect_unix(
            &self.serial,
            env.workdir.join(format!("{name}.console.log")),
        )?;
        // A guest that stops answering: where are its vCPUs?
        let (bin, api, pid) = (self.bin.clone(), self.api.clone(), self.child.id());
        agent.on_timeout = Some(Box::new(move || vcpu_dump(&bin, &api, pid)));
        if let Err(e) = agent.wait_ready(BOOT_TIMEOUT) {
            return Err(err!("{e}; tandem: {}", self.log()));
        }
        eprintln!(
            "{name}: guest agent ready {:.2} s after connecting",
            t0.elapsed().as_secs_f64()
        );
        Ok(agent)
    }

    /// The agent of a guest that migrated here: it is running already, so no
    /// `@@AGENT-READY@@` comes.
    pub fn migrated_agent(&mut self, env: &GuestEnv, name: &str) -> crate::Result<Agent> {
        let mut agent = Agent::connect_unix(
            &self.serial,
            env.workdir.join(format!("{name}.console.log")),
        )?;
        agent.assume_ready();
        let (bin, api, pid) = (self.bin.clone(), self.api.clone(), self.child.id());
        agent.on_timeout = Some(Box::new(move || vcpu_dump(&bin, &api, pid)));
        Ok(agent)
    }

    /// Wait until this tandem's log has a line containing `what`.
    pub fn wait_log(&self, what: &str, limit: Duration) -> crate::Result<()> {
        let deadline = Instant::now() + limit;
        while !self.log().contains(what) {
            if Instant::now() > deadline {
                return Err(err!(
                    "no {what:?} in the tandem log within {limit:?}: {}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// What tandem printed on stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// `tandem remote <cmd>`; its stdout.
    pub fn remote(&self, cmd: &str) -> crate::Result<String> {
        self.remote_args(&[cmd])
    }

    /// `tandem remote <args...>`; its stdout, or an error with its stderr.
    pub fn remote_args(&self, args: &[&str]) -> crate::Result<String> {
        let out = Command::new(&self.bin)
            .args(["remote", "--api-socket"])
            .arg(&self.api)
            .args(args)
            .output()
            .map_err(|e| err!("tandem remote: {e}"))?;
        if !out.status.success() {
            return Err(err!(
                "tandem remote {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `PUT /api/v1/<endpoint>` with `body` straight over the API socket (no `tandem
    /// remote` process: for timing a call); the answer's JSON.
    pub fn put(
        &self,
        endpoint: &str,
        body: &serde_json::Value,
    ) -> crate::Result<serde_json::Value> {
        api_put(&self.api, endpoint, body)
    }

    /// Subscribes to the event stream (`tandem remote events`) and collects its lines.
    pub fn events(&self) -> crate::Result<EventLog> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.api.exists() {
            if Instant::now() > deadline {
                return Err(err!("no API socket {}", self.api.display()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut child = Command::new(&self.bin)
            .args(["remote", "--api-socket"])
            .arg(&self.api)
            .arg("events")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| err!("tandem remote events: {e}"))?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| err!("tandem remote events: no stdout"))?;
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if let Ok(mut l) = sink.lock() {
                        l.push(v);
                    }
                }
            }
        });
        let log = EventLog { child, lines };
        // Subscribed once a pause/resume shows on the stream.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.remote("pause")?;
            self.remote("resume")?;
            if log
                .wait_for(|e| e["type"] == "vm-resumed", Duration::from_secs(1))
                .is_ok()
            {
                return Ok(log);
            }
            if Instant::now() > deadline {
                return Err(err!("the event stream shows nothing"));
            }
        }
    }

    /// Wait for tandem to exit on its own; its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> crate::Result<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().map_err(|e| err!("{e}"))? {
                return Ok(st.code().unwrap_or(-1));
            }
            if Instant::now() > deadline {
                return Err(err!(
                    "tandem still running {limit:?} later; log: {}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tandem {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where a VMM that stopped answering is: each thread's kernel state
/// (name, state, wchan, kernel stack), then every vCPU's registers, read
/// through the API while paused.
fn vcpu_dump(bin: &Path, api: &Path, pid: u32) -> String {
    let mut out = String::from("\nVMM threads at the timeout:\n");
    let read = |p: String| std::fs::read_to_string(p).unwrap_or_default();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let dir = t.path().display().to_string();
            let stat = read(format!("{dir}/stat"));
            // comm is in parentheses, the state follows it.
            let state = stat.rsplit_once(") ").map_or("?", |(_, r)| &r[..1]);
            let stack: Vec<String> = read(format!("{dir}/stack"))
                .lines()
                .take(6)
                .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string())
                .collect();
            out.push_str(&format!(
                "  {} {} {state} wchan={} stack={}\n",
                t.file_name().to_string_lossy(),
                read(format!("{dir}/comm")).trim(),
                read(format!("{dir}/wchan")).trim(),
                stack.join("<")
            ));
        }
    }
    // Shown at once: the API calls below can hang if the VMM is stuck.
    eprintln!("{out}");
    // Each API call gets 20 s: a VMM whose control loop is stuck must not
    // hold the report up for the client's full timeout.
    let remote = |cmd: &str| {
        let child = Command::new(bin)
            .args(["remote", "--api-socket"])
            .arg(api)
            .arg(cmd)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => return format!("tandem remote {cmd}: {e}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return format!(
                    "tandem remote {cmd}: no answer within 20 s (control loop stuck?)\n"
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        match child.wait_with_output() {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("tandem remote {cmd}: {e}"),
        }
    };
    let paused = remote("pause");
    let info = remote("info");
    remote("resume");
    out.push_str(&format!("pause: {paused}\ninfo while paused:\n{info}"));
    out
}

/// The events a `tandem remote events` subscriber has received so far.
pub struct EventLog {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl EventLog {
    /// Every event so far.
    pub fn all(&self) -> Vec<serde_json::Value> {
        self.lines.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The first event (so far, or within `limit`) that `pred` accepts.
    pub fn wait_for(
        &self,
        pred: impl Fn(&serde_json::Value) -> bool,
        limit: Duration,
    ) -> crate::Result<serde_json::Value> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(e) = self.all().into_iter().find(|e| pred(e)) {
                return Ok(e);
            }
            if Instant::now() > deadline {
                return Err(err!(
                    "no such event within {limit:?}; events: {}",
                    self.all()
                        .iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join(" ")
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `(type, device)` of every event from the first one `pred` accepts on, skipping
    /// the subscription's own pause/resume probes.
    pub fn sequence_from(
        &self,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<(String, String)> {
        self.all()
            .into_iter()
            .skip_while(|e| !pred(e))
            .filter(|e| e["type"] != "vm-paused" && e["type"] != "vm-resumed")
            .map(|e| {
                (
                    e["type"].as_str().unwrap_or("").to_string(),
                    e["device"].as_str().unwrap_or("-").to_string(),
                )
            })
            .collect()
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `PUT /api/v1/<endpoint>` with a JSON `body` over the API socket at `api` (the API
/// crate's own client): the answer's JSON, or an error with its status and body.
pub fn api_put(
    api: &Path,
    endpoint: &str,
    body: &serde_json::Value,
) -> crate::Result<serde_json::Value> {
    let what = || format!("PUT {endpoint} on {}", api.display());
    let r = api::client::request(
        api,
        "PUT",
        &format!("{}{endpoint}", api::API_PREFIX),
        Some(&body.to_string()),
    )
    .map_err(|e| err!("{}: {e}", what()))?;
    if r.status != 200 {
        return Err(err!("{}: {}: {}", what(), r.status, r.body.trim()));
    }
    serde_json::from_str(&r.body)
        .map_err(|e| err!("{}: the answer is not JSON ({e}): {:?}", what(), r.body))
}
