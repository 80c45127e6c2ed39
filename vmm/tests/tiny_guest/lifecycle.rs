//! Resets, power-off, a stalled console, pause and resume through the API, signals,
//! a faulting guest, and the command line's errors.

use super::*;

/// A guest that resets through the i8042 boots again; through the ACPI
/// reset register too; the API counts the boots.
#[test]
fn reset_boots_again() {
    for (name, reset) in [
        ("i8042", Asm::default().mov_dx(0x64).mov_al(0xfe).out()),
        ("acpi", Asm::default().mov_dx(0x604).mov_al(1).out()),
    ] {
        let dir = Scratch::new(&format!("reset-{name}"));
        let k = dir.kernel(&Asm::default().print("boot\n").raw(&reset.0).hlt().0);
        let sock = dir.path("api.sock");
        let log = dir.path("console.log");
        let child = tandem(&[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--serial",
            &format!("file={}", log.display()),
            "--api-socket",
            sock.to_str().unwrap(),
        ])
        .spawn()
        .unwrap();
        let mut child = Running(child);
        wait_for(&sock);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, body) = api(&sock, "GET", "/api/v1/vm.info", "");
            let info: serde_json::Value = serde_json::from_str(&body).unwrap();
            let printed = std::fs::read_to_string(&log)
                .unwrap_or_default()
                .matches("boot\n")
                .count();
            if info["boots"].as_u64().unwrap() >= 3 && printed >= 3 {
                break;
            }
            assert!(Instant::now() < deadline, "{name}: no third boot: {info}");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(api(&sock, "PUT", "/api/v1/vm.shutdown", "").0, 204);
        assert!(child.0.wait().unwrap().success());
        let out = std::fs::read_to_string(&log).unwrap();
        assert!(out.matches("boot\n").count() >= 3, "{name}: {out:?}");
    }
}

/// Linux resets through the ACPI reset register and then tries the i8042 as well: the
/// requests the old boot made while it was being stopped must not reset the new one.
/// The guest prints `boot`, waits for a byte on COM1 and, given `r`, writes the ACPI
/// reset register and then the i8042 reset command over and over; given nothing, it
/// halts. One `r` must make exactly one more boot.
#[test]
fn a_double_reset_request_resets_once() {
    let dir = Scratch::new("double-reset");
    let a = Asm::default().print("boot\n");
    let wait = a.here();
    let a = a.mov_dx(0x3fd).in_al().raw(&[0xa8, 0x01]); // test al, 1
    let a = a.raw(&[0x74, 0x00]); // jz wait (patched below)
    let jz_at = a.here() - 1;
    let a = a.mov_dx(0x3f8).in_al().raw(&[0x3c, b'r']); // cmp al, 'r'
    let a = a.raw(&[0x74, 0x01]).hlt(); // je +1 over the hlt
    let a = a.mov_dx(0x604).mov_al(1).out(); // the ACPI reset register
    let a = a.raw(&[0xb9]).raw(&1_000_000u32.to_le_bytes()); // mov ecx, 1000000
    let again = a.here();
    let a = a.mov_dx(0x64).mov_al(0xfe).out().raw(&[0xff, 0xc9]); // i8042 reset; dec ecx
    let rel = again as i64 - (a.here() as i64 + 2);
    let mut a = a.raw(&[0x75, rel as i8 as u8]).hlt(); // jnz again
    a.0[jz_at] = (wait as i64 - (jz_at as i64 + 1)) as i8 as u8;
    let k = dir.kernel(&a.0);
    let serial = dir.path("serial.sock");
    let sock = dir.path("api.sock");
    let mut child = run_with_sockets(&k, &serial, &sock);
    let mut s = UnixStream::connect(&serial).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut out = Vec::new();
    let mut read_until = |s: &mut UnixStream, boots: usize, limit: Duration| {
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 256];
        while Instant::now() < deadline {
            if String::from_utf8_lossy(&out).matches("boot\n").count() >= boots {
                return;
            }
            if let Ok(n) = s.read(&mut buf) {
                out.extend_from_slice(&buf[..n]);
            }
        }
    };
    read_until(&mut s, 1, Duration::from_secs(20));
    s.write_all(b"r").unwrap();
    read_until(&mut s, 2, Duration::from_secs(20));
    // Long enough for a leftover request to reset the new boot.
    read_until(&mut s, 3, Duration::from_secs(2));
    let (_, body) = api(&sock, "GET", "/api/v1/vm.info", "");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["boots"], 2, "one reset sequence, one reboot: {info}");
    assert_eq!(String::from_utf8_lossy(&out).matches("boot\n").count(), 2);
    assert_eq!(api(&sock, "PUT", "/api/v1/vm.shutdown", "").0, 204);
    assert!(child.0.wait().unwrap().success());
}

/// A guest printing forever to a stdout nobody reads: the pipe fills, yet the VM
/// still answers the API and shuts down (its output waits, then is dropped and
/// counted, instead of blocking the vCPU inside the UART).
#[test]
fn a_stalled_serial_sink_blocks_nothing() {
    let dir = Scratch::new("stalled-sink");
    let a = Asm::default();
    let top = a.here();
    let k = dir.kernel(&a.print("0123456789abcdef").jmp_to(top).0);
    let sock = dir.path("api.sock");
    let child = tandem(&[
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--api-socket",
        sock.to_str().unwrap(),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let mut child = Running(child);
    wait_for(&sock);
    // Well past the pipe's 64 KiB and the 1 MiB that may wait.
    std::thread::sleep(Duration::from_secs(2));
    let t0 = Instant::now();
    assert_eq!(api(&sock, "GET", "/api/v1/vm.info", "").0, 200);
    assert_eq!(api(&sock, "PUT", "/api/v1/vm.pause", "").0, 204);
    assert_eq!(api(&sock, "PUT", "/api/v1/vm.resume", "").0, 204);
    assert_eq!(api(&sock, "PUT", "/api/v1/vm.shutdown", "").0, 204);
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "tandem did not exit with its stdout full"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(t0.elapsed() < Duration::from_secs(10));
}

/// A guest printing forever: paused, its output stops; resumed, it goes on.
#[test]
fn api_pause_resume_info_and_errors() {
    let dir = Scratch::new("pause");
    let a = Asm::default().mov_dx(0x3f8);
    let top = a.here();
    // loop: out '.'; spin ~64k; jmp loop
    let a = a.mov_al(b'.').out().raw(&[0xb9, 0x00, 0x00, 0x01, 0x00]); // mov ecx, 0x10000
    let spin = a.here();
    let a = a.raw(&[0xe2, (spin as i64 - (spin as i64 + 2)) as i8 as u8]); // loop spin
    let k = dir.kernel(&a.jmp_to(top).0);
    let sock = dir.path("api.sock");
    let log = dir.path("console.log");
    let child = tandem(&[
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--cpus",
        "boot=2",
        "--serial",
        &format!("file={}", log.display()),
        "--api-socket",
        &format!("path={}", sock.display()),
    ])
    .spawn()
    .unwrap();
    let mut child = Running(child);
    wait_for(&sock);
    let size = || std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let grows = |d: Duration| {
        let a = size();
        std::thread::sleep(d);
        size() > a
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while size() == 0 {
        assert!(Instant::now() < deadline, "the guest never printed");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (st, body) = api(&sock, "GET", "/api/v1/vmm.ping", "");
    assert_eq!(st, 200);
    assert!(body.contains("version"));
    assert_eq!(api(&sock, "PUT", "/api/v1/vm.pause", "").0, 204);
    let (_, info) = api(&sock, "GET", "/api/v1/vm.info", "");
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["state"], "paused");
    assert_eq!(info["config"]["vcpus"], 2);
    assert!(info["devices"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["location"] == "pci 00:00.0"));
    // Each paused vCPU reports its registers, interrupt controller and timer MSRs.
    let vcpus = info["vcpus"].as_array().unwrap();
    assert_eq!(vcpus.len(), 2, "{info}");
    for v in vcpus {
        let v = v.as_str().unwrap();
        for field in [
            "rip ",
            "mp_state ",
            "lapic id ",
            "isr [",
            "lvtt ",
            "tsc_deadline ",
        ] {
            assert!(v.contains(field), "no {field:?} in {v}");
        }
    }
    assert!(
        !grows(Duration::from_millis(300)),
        "output grew while paused"
    );
    let (st, body) = api(&sock, "PUT", "/api/v1/vm.pause", "");
    assert_eq!(st, 409, "{body}");
    assert!(body.contains("already paused"));
    // The CLI client.
    let out = Command::new(TANDEM)
        .args(["remote", "--api-socket", sock.to_str().unwrap(), "resume"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(grows(Duration::from_millis(500)), "output did not resume");
    assert_eq!(api(&sock, "PUT", "/api/v1/vm.resume", "").0, 409);
    // Bad requests.
    let (st, body) = api(&sock, "PUT", "/api/v1/vm.pause", "{oops");
    assert_eq!(st, 400);
    assert!(body.contains("\"error\""));
    assert_eq!(api(&sock, "GET", "/api/v1/vm.nothing", "").0, 404);
    assert_eq!(api(&sock, "DELETE", "/api/v1/vm.info", "").0, 405);
    let out = Command::new(TANDEM)
        .args([
            "remote",
            "--api-socket",
            sock.to_str().unwrap(),
            "frobnicate",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown command"));
    let out = Command::new(TANDEM)
        .args(["remote", "--api-socket", sock.to_str().unwrap(), "info"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"running\""));
    assert_eq!(api(&sock, "PUT", "/api/v1/vm.shutdown", "").0, 204);
    assert!(child.0.wait().unwrap().success());
}

#[test]
fn sigterm_exits_cleanly() {
    let dir = Scratch::new("sigterm");
    let a = Asm::default();
    let top = a.here();
    let k = dir.kernel(&a.jmp_to(top).0);
    let sock = dir.path("api.sock");
    let child = tandem(&[
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--api-socket",
        sock.to_str().unwrap(),
    ])
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    wait_for(&sock);
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("signal 15"));
    assert!(!sock.exists());
}

/// A guest executing garbage ends the VMM with a non-zero status and a
/// report with the exit reason and registers, never a hang or a panic.
#[test]
fn guest_fault_is_reported() {
    let dir = Scratch::new("fault");
    // Jump to an unmapped address above 4 GiB with no IDT: a page fault
    // that escalates to a triple fault.
    let k = dir.kernel(
        &Asm::default()
            .raw(&[0x48, 0xb8])
            .raw(&(1u64 << 40).to_le_bytes())
            .raw(&[0xff, 0xe0])
            .0,
    );
    let sock = dir.path("api.sock");
    let child = tandem(&[
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--serial",
        "off",
        "--api-socket",
        sock.to_str().unwrap(),
    ])
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut child = Running(child);
    wait_for(&sock);
    // Either KVM reports an error (non-zero exit with registers), or the
    // guest faults into a reset loop; in both cases the VMM stays in charge.
    std::thread::sleep(Duration::from_millis(500));
    match child.0.try_wait().unwrap() {
        Some(status) => {
            assert!(!status.success());
            let mut err = String::new();
            child
                .0
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            assert!(err.contains("rip"), "{err}");
        }
        None => {
            let (st, _) = api(&sock, "GET", "/api/v1/vmm.ping", "");
            assert_eq!(st, 200);
            assert_eq!(api(&sock, "PUT", "/api/v1/vm.shutdown", "").0, 204);
            assert!(child.0.wait().unwrap().success());
        }
    }
}

fn expect_error(args: &[&str], needle: &str) {
    let out = run_bounded(tandem(args), Duration::from_secs(10));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(err.contains(needle), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    let errors = err
        .lines()
        .filter(|l| l.starts_with("error") || l.starts_with("tandem"))
        .count();
    assert_eq!(errors, 1, "one clear error, not a cascade: {err}");
}

#[test]
fn bad_command_lines_get_one_clear_error() {
    let dir = Scratch::new("badargs");
    let k = dir.kernel(&Asm::default().poweroff().hlt().0);
    let k = k.to_str().unwrap();
    let junk = dir.path("junk");
    std::fs::write(&junk, b"this is not a kernel").unwrap();
    expect_error(&["run", "--kernel", "/nonexistent/bzImage"], "No such file");
    expect_error(
        &["run", "--kernel", junk.to_str().unwrap()],
        "not a Linux kernel",
    );
    expect_error(
        &["run", "--kernel", k, "--memory", "size=1M"],
        "at least 64M",
    );
    expect_error(
        &["run", "--kernel", k, "--memory", "size=64T"],
        "more than this host",
    );
    expect_error(
        &["run", "--kernel", k, "--memory", "size=lots"],
        "not a size",
    );
    expect_error(&["run", "--kernel", k, "--cpus", "boot=0"], "1 to 254");
    expect_error(
        &["run", "--kernel", k, "--cpus", "cores=2"],
        "unknown key 'cores'",
    );
    expect_error(&["run", "--kernel", k, "--serial", "pty"], "not tty, off");
    expect_error(
        &["run", "--kernel", k, "--frobnicate"],
        "unexpected argument",
    );
    expect_error(
        &["run", "--kernel", k, "--initramfs", "/nonexistent.cpio"],
        "--initramfs",
    );
    expect_error(&["run"], "--kernel");
}
