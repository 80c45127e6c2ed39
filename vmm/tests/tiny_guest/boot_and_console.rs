//! Boot, port I/O, two vCPUs, and the serial console's backends and sockets.

use super::*;

#[test]
fn prints_and_powers_off_with_status_zero() {
    let dir = Scratch::new("poweroff");
    let k = dir.kernel(
        &Asm::default()
            .print("hello from the guest\n")
            .poweroff()
            .hlt()
            .0,
    );
    let out = run_bounded(
        tandem(&["run", "--kernel", k.to_str().unwrap()]),
        Duration::from_secs(20),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the guest\n"
    );
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// String port I/O: KVM hands a `rep insb` over in one exit, several bytes at
/// once, and each must be its own access to the port. The guest reads COM1's
/// line status register 8 times (0x60 each: transmitter empty), then writes the
/// 8 bytes to COM1 with `rep outsb`.
#[test]
fn rep_ins_and_outs_are_one_access_per_element() {
    let dir = Scratch::new("repio");
    let buf: u32 = 0x20_0000; // 2 MiB, in RAM
    let code = Asm::default()
        .raw(&[0xbf])
        .raw(&buf.to_le_bytes()) // mov edi, buf
        .raw(&[0xb9, 8, 0, 0, 0]) // mov ecx, 8
        .mov_dx(0x3fd)
        .raw(&[0xf3, 0x6c]) // rep insb
        .raw(&[0xbe])
        .raw(&buf.to_le_bytes()) // mov esi, buf
        .raw(&[0xb9, 8, 0, 0, 0]) // mov ecx, 8
        .mov_dx(0x3f8)
        .raw(&[0xf3, 0x6e]) // rep outsb
        .poweroff()
        .hlt()
        .0;
    let k = dir.kernel(&code);
    let out = run_bounded(
        tandem(&["run", "--kernel", k.to_str().unwrap()]),
        Duration::from_secs(20),
    );
    assert_eq!(
        out.stdout,
        vec![0x60u8; 8],
        "{:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn two_vcpus_boot_and_power_off() {
    let dir = Scratch::new("smp");
    let k = dir.kernel(&Asm::default().print("bsp\n").poweroff().hlt().0);
    let out = run_bounded(
        tandem(&[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--cpus",
            "boot=2",
            "--memory",
            "size=128M",
        ]),
        Duration::from_secs(20),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "bsp\n");
    assert!(out.status.success());
}

#[test]
fn serial_file_backend() {
    let dir = Scratch::new("file");
    let k = dir.kernel(&Asm::default().print("to a file").poweroff().hlt().0);
    let log = dir.path("console.log");
    let out = run_bounded(
        tandem(&[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--serial",
            &format!("file={}", log.display()),
        ]),
        Duration::from_secs(20),
    );
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "to a file");
}

/// A guest that echoes what it reads from COM1 until it sees 'q', then powers off.
fn echo_guest() -> Vec<u8> {
    // loop: wait for LSR.DR; read RBR; echo it; stop on 'q'.
    let a = Asm::default();
    let top = a.here();
    let a = a.mov_dx(0x3fd).in_al().raw(&[0xa8, 0x01]); // test al, 1
    let a = a.raw(&[0x74, 0x00]); // jz top (patched below)
    let jz_at = a.here() - 1;
    let a = a.mov_dx(0x3f8).in_al().out().raw(&[0x3c, b'q']); // cmp al, 'q'
    let a = a.raw(&[0x74, 0x02]); // je +2 (skip the jmp)
    let mut a = a.jmp_to(top).poweroff().hlt();
    a.0[jz_at] = (top as i64 - (jz_at as i64 + 1)) as i8 as u8;
    a.0
}

/// Connects to `sock` as user nobody and returns what the server sent until it
/// closed (`ERR ...` if it kept the connection open past 10 s); for the API,
/// after a `GET vm.info`.
fn connect_as_nobody(sock: &Path, api: bool) -> String {
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(10)
if sys.argv[2] == "api":
    s.sendall(b"GET /api/v1/vm.info HTTP/1.1\r\nHost: t\r\n\r\n")
d = b""
while True:
    try:
        c = s.recv(4096)
    except Exception as e:
        print("ERR", e)
        sys.exit(0)
    if not c:
        break
    d += c
print(d.decode(errors="replace"))
"#;
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            script,
        ])
        .arg(sock)
        .arg(if api { "api" } else { "serial" })
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The API and serial sockets are 0600, and a client of another user that
/// reaches them anyway is turned away (403; the console closes). A second
/// console client replaces the first: the first's socket is shut, and what it
/// writes afterwards never reaches the guest.
#[test]
fn sockets_are_for_their_owner_and_one_console_client() {
    use std::os::unix::fs::PermissionsExt;
    let dir = Scratch::new("owner");
    let k = dir.kernel(&echo_guest());
    let (sock, api_sock) = (dir.path("serial.sock"), dir.path("api.sock"));
    let mut child = run_with_sockets(&k, &sock, &api_sock);
    for p in [&sock, &api_sock] {
        let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", p.display());
        // Loosened by someone: the peer check still holds.
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o666)).unwrap();
    }
    let mut first = UnixStream::connect(&sock).unwrap();
    let answer = connect_as_nobody(&api_sock, true);
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(
        answer.contains("user 65534 may not use this socket"),
        "{answer}"
    );
    assert_eq!(
        connect_as_nobody(&sock, false),
        "",
        "the console closes on a stranger"
    );
    // The stranger replaced nobody: the first client is still served.
    first
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    first.write_all(b"1").unwrap();
    let mut b = [0u8; 1];
    first.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"1");
    // A second client: the first is shut.
    let mut second = UnixStream::connect(&sock).unwrap();
    second
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(
        first.read(&mut b).unwrap(),
        0,
        "the first client's socket is shut"
    );
    let _ = first.write_all(b"x");
    std::thread::sleep(Duration::from_millis(300));
    second.write_all(b"yq").unwrap();
    let mut got = Vec::new();
    second.read_to_end(&mut got).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got),
        "yq",
        "only the second client's input reached the guest"
    );
    assert!(child.0.wait().unwrap().success());
}

/// The guest echoes what it reads from COM1 until it sees 'q': input
/// reaches the guest through the socket backend, byte for byte.
#[test]
fn serial_socket_input_and_output() {
    let dir = Scratch::new("socket");
    let k = dir.kernel(&echo_guest());
    let sock = dir.path("serial.sock");
    let child = tandem(&[
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--serial",
        &format!("socket={}", sock.display()),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut child = Running(child);
    wait_for(&sock);
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // More than the UART's 64-byte FIFO: input must wait, not be dropped.
    let msg: String = (0..300)
        .map(|i| (b'a' + (i % 16) as u8) as char)
        .collect::<String>()
        + "q";
    s.write_all(msg.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while got.len() < msg.len() {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            let st = child.0.wait().unwrap();
            let mut err = String::new();
            child
                .0
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!(
                "socket closed after {} bytes: {:?}; tandem {st}: {err}",
                got.len(),
                String::from_utf8_lossy(&got)
            );
        }
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(String::from_utf8_lossy(&got), msg);
    let status = child.0.wait().unwrap();
    assert!(status.success());
    assert!(!sock.exists(), "the socket is removed on exit");
}
