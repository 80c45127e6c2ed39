//! NIC backend errors, the hotplug API against a guest that never cooperates, and the
//! hotplug-and-reboot soak that checks nothing leaks.

use super::*;

/// A network namespace for tap tests, removed on drop.
struct Netns(String);
impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("tandem-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(st.success(), "ip netns add (the tests run as root)");
        Self(name)
    }
    fn add_tap(&self, name: &str) {
        let st = self
            .exec(&["ip", "tuntap", "add", "dev", name, "mode", "tap"])
            .status()
            .unwrap();
        assert!(st.success(), "ip tuntap add {name}");
    }
    fn exec(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0])
            .args(args)
            .stdin(Stdio::null());
        c
    }
}
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// NIC problems the guest never sees: each a one-line error, no panic.
#[test]
fn net_backend_errors() {
    let dir = Scratch::new("neterr");
    let k = dir.idle_kernel();
    let k = k.to_str().unwrap();
    let ns = Netns::new("neterr");
    ns.add_tap("tt0");
    let run = |args: &[&str]| {
        let mut full = vec![TANDEM, "run", "--kernel", k, "--serial", "off"];
        full.extend_from_slice(args);
        run_bounded(ns.exec(&full), Duration::from_secs(20))
    };
    let check = |out: Output, needle: &str| {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains(needle), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    };
    check(
        run(&["--net", "tap=nosuch0"]),
        "tap 'nosuch0' does not exist",
    );
    check(run(&["--net", "tap=lo"]), "'lo' is not a tap");
    check(
        run(&["--net", "tap=tt0,num_queues=4"]),
        "not created multi-queue",
    );
    // tt0 in use by a running tandem: a second one is refused.
    let sock = dir.path("api.sock");
    let mut first = vec![
        TANDEM,
        "run",
        "--kernel",
        k,
        "--serial",
        "off",
        "--api-socket",
    ];
    let sock_s = sock.to_str().unwrap().to_string();
    first.push(&sock_s);
    first.extend_from_slice(&["--net", "id=n0,tap=tt0,mac=52:54:00:00:00:11"]);
    let child = ns.exec(&first).spawn().unwrap();
    let mut child = Running(child);
    wait_for(&sock);
    let (_, info) = api(&sock, "GET", "/api/v1/vm.info", "");
    assert!(
        info.contains("virtio-net") && info.contains("52:54:00:00:00:11"),
        "{info}"
    );
    check(run(&["--net", "tap=tt0"]), "already in use");
    // The tap deleted on the host under a running VM: a reboot goes on without the
    // NIC (it used to end the VMM, unable to open the tap again).
    assert!(ns
        .exec(&["ip", "link", "del", "tt0"])
        .status()
        .unwrap()
        .success());
    assert_eq!(api(&sock, "PUT", "/api/v1/vm.reboot", "").0, 204);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (st, info) = api(&sock, "GET", "/api/v1/vm.info", "");
        assert_eq!(st, 200, "{info}");
        if info.contains(r#""boots":2"#) {
            assert!(
                !info.contains("virtio-net"),
                "the NIC whose tap is gone: {info}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no second boot: {info}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(api(&sock, "PUT", "/api/v1/vm.shutdown", "").0, 204);
    assert!(child.0.wait().unwrap().success());
}

/// The hotplug API against a guest that never looks at its slots: adds and
/// surprise removals work, an orderly removal times out (and by policy turns
/// into a surprise one), and every bad request gets one clear error while
/// the VM keeps running.
#[test]
fn hotplug_api_without_guest_cooperation() {
    let dir = Scratch::new("hotplug");
    let k = dir.idle_kernel();
    let k = k.to_str().unwrap();
    let ns = Netns::new("hotplug");
    ns.add_tap("ht0");
    ns.add_tap("ht1");
    let sock = dir.path("api.sock");
    let sock_s = sock.to_str().unwrap().to_string();
    let child = ns
        .exec(&[
            TANDEM,
            "run",
            "--kernel",
            k,
            "--serial",
            "off",
            "--api-socket",
            &sock_s,
            "--net",
            "id=boot0,tap=ht0,mac=52:54:00:00:01:01",
        ])
        .spawn()
        .unwrap();
    let mut child = Running(child);
    wait_for(&sock);
    let put = |path: &str, body: &str| api(&sock, "PUT", &format!("/api/v1/{path}"), body);
    // The event stream, through the CLI, for the whole test.
    let mut events = Running(
        tandem(&["remote", "--api-socket", &sock_s, "events"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let events_out = events.0.stdout.take().unwrap();
    let (line_tx, line_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(events_out).lines() {
            let Ok(line) = line else { break };
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    // Subscribed once a pause/resume shows up on the stream.
    let deadline = Instant::now() + Duration::from_secs(10);
    'subscribed: loop {
        assert_eq!(put("vm.pause", "").0, 204);
        assert_eq!(put("vm.resume", "").0, 204);
        while let Ok(l) = line_rx.recv_timeout(Duration::from_millis(200)) {
            if l.contains(r#""type":"vm-resumed""#) {
                break 'subscribed;
            }
        }
        assert!(Instant::now() < deadline, "the event stream shows nothing");
    }

    // Bad requests: each a 4xx with a reason, nothing changes.
    for (body, status, needle) in [
        ("", 400, "JSON object"),
        ("[1]", 400, "JSON object"),
        (
            r#"{"mac": "52:54:00:00:01:09"}"#,
            400,
            "tap=NAME is required",
        ),
        (r#"{"tap": "ht1", "mac": "zz"}"#, 400, "MAC"),
        // Something named that does not exist: 404; a clash with what is there: 409.
        (
            r#"{"tap": "nosuch0", "mac": "52:54:00:00:01:09"}"#,
            404,
            "nosuch0",
        ),
        (r#"{"tap": "ht0", "mac": "52:54:00:00:01:09"}"#, 409, "ht0"),
        (r#"{"tap": "ht1", "mac": "52:54:00:00:01:01"}"#, 409, "MAC"),
        (
            r#"{"id": "boot0", "tap": "ht1", "mac": "52:54:00:00:01:09"}"#,
            409,
            "duplicate id",
        ),
        (
            r#"{"tap": "ht1", "mac": "52:54:00:00:01:09", "slot": 0}"#,
            400,
            "slot",
        ),
        (
            r#"{"tap": "ht1", "mac": "52:54:00:00:01:09", "slot": 99}"#,
            400,
            "slot",
        ),
        (
            r#"{"tap": "ht1,mac=52:54:00:00:01:09"}"#,
            400,
            "not allowed",
        ),
        (
            r#"{"tap": "ht1", "mac": "52:54:00:00:01:09", "color": "red"}"#,
            400,
            "color",
        ),
    ] {
        let (st, b) = put("vm.add-net", body);
        assert_eq!(st, status, "add-net {body}: {b}");
        assert!(b.contains(needle), "add-net {body}: want {needle:?} in {b}");
    }
    for (body, status, needle) in [
        (r#"{"id": "nosuch"}"#, 404, "no device"),
        (r#"{"id": "boot0", "timeout_ms": 0}"#, 400, "timeout_ms"),
        (r#"{"id": "boot0", "timeout_ms": 60001}"#, 400, "timeout_ms"),
        (r#"{"id": "boot0", "force": true}"#, 400, "force"),
        (r#"{"surprise": true}"#, 400, "id"),
    ] {
        let (st, b) = put("vm.remove-device", body);
        assert_eq!(st, status, "remove-device {body}: {b}");
        assert!(
            b.contains(needle),
            "remove-device {body}: want {needle:?} in {b}"
        );
    }

    // A hot-add takes the first free slot after boot0's.
    let (st, b) = put(
        "vm.add-net",
        r#"{"id": "hp1", "tap": "ht1", "mac": "52:54:00:00:01:02"}"#,
    );
    assert_eq!(st, 200, "{b}");
    assert!(b.contains(r#""bdf":"0000:00:02.0""#), "{b}");
    let (_, info) = api(&sock, "GET", "/api/v1/vm.info", "");
    assert!(
        info.contains("hp1") && info.contains("pci 00:02.0"),
        "{info}"
    );
    assert!(
        info.contains(r#""mac":"52:54:00:00:01:02""#),
        "MACs as written: {info}"
    );
    // This guest never reads the hotplug registers: the interrupt is raised again
    // (every 500 ms) for as long as the news stays unread.
    std::thread::sleep(Duration::from_millis(1600));
    let (_, info) = api(&sock, "GET", "/api/v1/vm.info", "");
    let raised: u64 = info
        .split("interrupts raised: ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(raised >= 3, "raised {raised} times: {info}");

    // This guest never ejects: an orderly removal times out and keeps the device...
    let t0 = Instant::now();
    let (st, b) = put("vm.remove-device", r#"{"id": "hp1", "timeout_ms": 300}"#);
    assert_eq!(st, 504, "{b}");
    assert!(b.contains("did not release"), "{b}");
    assert!(t0.elapsed() >= Duration::from_millis(300));
    // The status line has its reason phrase.
    let mut raw = UnixStream::connect(&sock).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = r#"{"id": "hp1", "timeout_ms": 100}"#;
    write!(
        raw,
        "PUT /api/v1/vm.remove-device HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    raw.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 504 Gateway Timeout\r\n"), "{out}");
    let (_, info) = api(&sock, "GET", "/api/v1/vm.info", "");
    assert!(info.contains("hp1"), "{info}");
    // ...unless the policy says surprise.
    let (st, b) = put(
        "vm.remove-device",
        r#"{"id": "hp1", "timeout_ms": 200, "on_timeout": "surprise"}"#,
    );
    assert_eq!(st, 200, "{b}");
    assert!(b.contains("timeout-surprise"), "{b}");
    // The tap is free again: the same NIC goes back into the same slot.
    let (st, b) = put(
        "vm.add-net",
        r#"{"id": "hp1", "tap": "ht1", "mac": "52:54:00:00:01:02", "slot": 2}"#,
    );
    assert_eq!(st, 200, "{b}");
    // A reboot keeps the hot-added NIC in its slot.
    assert_eq!(put("vm.reboot", "").0, 204);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, info) = api(&sock, "GET", "/api/v1/vm.info", "");
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        if v["boots"] == 2 {
            assert!(
                info.contains("hp1") && info.contains("pci 00:02.0"),
                "{info}"
            );
            assert!(
                info.contains("boot0") && info.contains("pci 00:01.0"),
                "{info}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no second boot: {info}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The CLI: remove-device by surprise.
    let out = run_bounded(
        tandem(&[
            "remote",
            "--api-socket",
            &sock_s,
            "remove-device",
            "hp1",
            "--surprise",
        ]),
        Duration::from_secs(20),
    );
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("surprise"));
    let out = run_bounded(
        tandem(&[
            "remote",
            "--api-socket",
            &sock_s,
            "remove-device",
            "--surprise",
        ]),
        Duration::from_secs(20),
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let (_, info) = api(&sock, "GET", "/api/v1/vm.info", "");
    assert!(!info.contains("hp1") && info.contains("boot0"), "{info}");
    // Still alive.
    assert_eq!(api(&sock, "GET", "/api/v1/vmm.ping", "").0, 200);
    assert_eq!(put("vm.shutdown", "").0, 204);
    assert!(child.0.wait().unwrap().success());

    // The events, in order: the stream ends when the VMM goes, and so does the CLI.
    assert!(events.0.wait().unwrap().success());
    let text: Vec<String> = line_rx.iter().collect();
    let lines: Vec<serde_json::Value> = text
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let seqs: Vec<u64> = lines.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] + 1 == w[1]), "{text:?}");
    assert!(lines
        .iter()
        .all(|e| e["time"].as_str().unwrap().ends_with('Z')));
    let got: Vec<String> = lines
        .iter()
        .map(|e| {
            let mut s = format!(
                "{} {}",
                e["type"].as_str().unwrap(),
                e["device"].as_str().unwrap_or("-")
            );
            for k in ["slot", "cause", "boot", "asked"] {
                if !e[k].is_null() {
                    s.push_str(&format!(" {k}={}", e[k]));
                }
            }
            s
        })
        .collect();
    assert_eq!(
        got,
        [
            "device-added hp1 slot=2",
            "eject-requested hp1 slot=2",
            "removal-timed-out hp1 slot=2",
            // The same request again, to read its status line.
            "eject-requested hp1 slot=2",
            "removal-timed-out hp1 slot=2",
            "eject-requested hp1 slot=2",
            "surprise-removed hp1 slot=2 cause=\"timeout\"",
            "device-added hp1 slot=2",
            "vm-booted - boot=2",
            "surprise-removed hp1 slot=2 cause=\"api\"",
            "vm-shutdown -",
        ],
        "{text:?}"
    );
}

/// A process's thread names.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .collect()
}

/// A process's (open fds, threads, resident KiB). KVM's per-VM kernel threads
/// (`kvm-nx-lpage-re`...) are not counted: they come with a VM's first run, so a
/// sample taken just after a reboot may or may not have one, and a leaked VM shows
/// in the fds anyway. (The API server has no helper threads since it awaits the
/// control loop's answers; its blocking pool once made (29, 3) -> (28, 4).)
fn footprint(pid: u32) -> (usize, usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let threads = thread_names(pid)
        .iter()
        .filter(|n| !n.starts_with("kvm-"))
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    (fds, threads, rss)
}

/// `cycles` hot-add/remove cycles in one VM, orderly-then-surprise (a 20 ms
/// timeout: this guest never ejects) and surprise alternating, then `reboots`
/// reboots with the NIC in place; the VMM's fds, threads and RSS, measured after
/// a warm-up and at the end, must not grow. Returns the two measurements.
fn hotplug_soak(
    tag: &str,
    cycles: usize,
    reboots: u32,
) -> ((usize, usize, u64), (usize, usize, u64)) {
    let dir = Scratch::new(tag);
    let k = dir.idle_kernel();
    let ns = Netns::new(tag);
    ns.add_tap("sk0");
    let sock = dir.path("api.sock");
    let child = ns
        .exec(&[
            TANDEM,
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--serial",
            "off",
            "--api-socket",
            sock.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Running(child);
    let pid = child.0.id();
    wait_for(&sock);
    let put = |path: &str, body: &str| api(&sock, "PUT", &format!("/api/v1/{path}"), body);
    let add = r#"{"id": "sk", "tap": "sk0", "mac": "52:54:00:00:05:01", "slot": 4}"#;
    let cycle = |i: usize| {
        let (st, b) = put("vm.add-net", add);
        assert_eq!(st, 200, "cycle {i}: {b}");
        let body = if i.is_multiple_of(2) {
            r#"{"id": "sk", "timeout_ms": 20, "on_timeout": "surprise"}"#
        } else {
            r#"{"id": "sk", "surprise": true}"#
        };
        let (st, b) = put("vm.remove-device", body);
        assert_eq!(st, 200, "cycle {i}: {b}");
    };
    let mut boots = 1;
    let mut reboot = || {
        boots += 1;
        assert_eq!(put("vm.reboot", "").0, 204);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, info) = api(&sock, "GET", "/api/v1/vm.info", "");
            let v: serde_json::Value = serde_json::from_str(&info).unwrap();
            if v["boots"] == boots && v["state"] == "running" {
                break;
            }
            assert!(Instant::now() < deadline, "boot {boots}: {info}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // Warm-up: what is created once and kept (KVM's per-VM kernel thread comes
    // with the first run).
    for i in 0..10 {
        cycle(i);
    }
    reboot();
    let before = footprint(pid);
    for i in 0..cycles {
        cycle(i);
    }
    let (st, b) = put("vm.add-net", add);
    assert_eq!(st, 200, "{b}");
    for _ in 0..reboots {
        reboot();
    }
    let (st, b) = put("vm.remove-device", r#"{"id": "sk", "surprise": true}"#);
    assert_eq!(st, 200, "{b}");
    // Threads of the last removal may still be finishing.
    std::thread::sleep(Duration::from_millis(500));
    let after = footprint(pid);
    eprintln!("{tag}: threads at the end: {:?}", thread_names(pid));
    assert_eq!(put("vm.shutdown", "").0, 204);
    assert!(child.0.wait().unwrap().success());
    eprintln!("{tag}: {cycles} hotplug cycles, {reboots} reboots: (fds, threads, RSS KiB) {before:?} -> {after:?}");
    (before, after)
}

/// Flat: no more fds or threads, RSS within 4 MiB (allocator slack).
fn assert_flat(cycles: usize, reboots: u32) {
    let (before, after) = hotplug_soak(&format!("soak-{cycles}"), cycles, reboots);
    assert!(after.0 <= before.0, "fds grew: {before:?} -> {after:?}");
    assert!(after.1 <= before.1, "threads grew: {before:?} -> {after:?}");
    assert!(
        after.2 <= before.2 + 4096,
        "RSS grew by more than 4 MiB: {before:?} -> {after:?}"
    );
}

#[test]
fn hotplug_and_reboot_soak_short() {
    assert_flat(40, 10);
}

/// The long soak (issue 12): `cargo test -p vmm --test tiny_guest hotplug_and_reboot_soak
/// -- --ignored --nocapture`.
#[test]
#[ignore]
fn hotplug_and_reboot_soak() {
    assert_flat(1000, 100);
}
