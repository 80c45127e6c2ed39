//! `tandem` end to end with hand-assembled guests: no guest image needed, so
//! these run on any KVM, even a software one that cannot boot Linux. They
//! cover the vCPU setup (64-bit entry), port I/O dispatch, COM1 output and
//! input, the ACPI power-off and reset paths, the control API and the
//! command line's error handling.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");
const LOAD: u64 = 0x100000;

/// A minimal ELF64 executable whose single segment is `code`, loaded and
/// entered at 1 MiB.
fn elf(code: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    let phoff = 64u64;
    let off = 64 + 56u64;
    v.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    v.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    v.extend_from_slice(&1u32.to_le_bytes());
    v.extend_from_slice(&LOAD.to_le_bytes()); // entry
    v.extend_from_slice(&phoff.to_le_bytes());
    v.extend_from_slice(&0u64.to_le_bytes()); // shoff
    v.extend_from_slice(&0u32.to_le_bytes()); // flags
    for h in [64u16, 56, 1, 0, 0, 0] {
        v.extend_from_slice(&h.to_le_bytes());
    }
    v.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    v.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for q in [
        off,
        LOAD,
        LOAD,
        code.len() as u64,
        code.len() as u64,
        0x1000,
    ] {
        v.extend_from_slice(&q.to_le_bytes());
    }
    v.extend_from_slice(code);
    v
}

/// A tiny assembler for the few instructions these guests use.
#[derive(Default)]
struct Asm(Vec<u8>);
impl Asm {
    fn mov_dx(mut self, port: u16) -> Self {
        self.0.extend_from_slice(&[0x66, 0xba]);
        self.0.extend_from_slice(&port.to_le_bytes());
        self
    }
    fn mov_al(mut self, v: u8) -> Self {
        self.0.extend_from_slice(&[0xb0, v]);
        self
    }
    fn out(mut self) -> Self {
        self.0.push(0xee);
        self
    }
    fn in_al(mut self) -> Self {
        self.0.push(0xec);
        self
    }
    fn print(mut self, s: &str) -> Self {
        self = self.mov_dx(0x3f8);
        for b in s.bytes() {
            self = self.mov_al(b).out();
        }
        self
    }
    fn poweroff(self) -> Self {
        // SLP_TYP = 5, SLP_EN into the sleep control register.
        self.mov_dx(0x600).mov_al((5 << 2) | (1 << 5)).out()
    }
    fn hlt(mut self) -> Self {
        self.0.push(0xf4);
        self
    }
    fn jmp_to(mut self, target: usize) -> Self {
        let rel = target as i64 - (self.0.len() as i64 + 2);
        self.0.extend_from_slice(&[0xeb, rel as i8 as u8]);
        self
    }
    fn here(&self) -> usize {
        self.0.len()
    }
    fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
}

struct Scratch(PathBuf);
impl Scratch {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("tandem-tiny-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    fn kernel(&self, code: &[u8]) -> PathBuf {
        let p = self.0.join("kernel.elf");
        std::fs::write(&p, elf(code)).unwrap();
        p
    }
    /// A guest that spins forever doing nothing.
    fn idle_kernel(&self) -> PathBuf {
        let a = Asm::default();
        let top = a.here();
        self.kernel(&a.jmp_to(top).0)
    }
    fn path(&self, n: &str) -> PathBuf {
        self.0.join(n)
    }
}
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tandem(args: &[&str]) -> Command {
    let mut c = Command::new(TANDEM);
    c.args(args).stdin(Stdio::null());
    c
}

/// Run to completion with a deadline (a hung VMM is a failure, not a hang).
fn run_bounded(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "tandem did not exit within {limit:?}; stdout {:?} stderr {:?}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn api(sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s =
        UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    // A VMM that stops answering fails the test instead of hanging it.
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out)
        .unwrap_or_else(|e| panic!("{method} {path}: no answer: {e}"));
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `tandem run` of `kernel` with its console on the socket `serial` and the API on
/// `api`, once both exist.
fn run_with_sockets(kernel: &Path, serial: &Path, api: &Path) -> Running {
    let child = tandem(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--serial",
        &format!("socket={}", serial.display()),
        "--api-socket",
        api.to_str().unwrap(),
    ])
    .stdout(Stdio::null())
    .spawn()
    .unwrap();
    let child = Running(child);
    wait_for(serial);
    wait_for(api);
    child
}

struct Running(Child);
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

mod boot_and_console;
mod hotplug;
mod lifecycle;
mod migration;
