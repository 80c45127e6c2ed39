//! The destination's side of a live migration, fed any bytes as the stream from the
//! source: the Hello and its checks, the boot files, the memory rounds (page runs
//! anywhere, of any length), the state. A corrupt, truncated or out-of-order stream must
//! be refused with an error, never a panic, a hang, or a write outside guest memory.
//!
//! Half the inputs are raw bytes; the other half start with a Hello and boot files the
//! source's own frame writer makes (so the fuzzer gets past them) and go on with frames
//! built from the input: page runs at made-up addresses and lengths, RoundEnd, Waiting,
//! MemoryDone, State, Abort, any kind with any body, and raw bytes. Half go to a
//! destination that opens a function ahead, and so answers Prepared mid-stream. A
//! stream that is taken must hand back the memory and boot files its Hello announced.
//!
//! `migration.rs` lives in the `tandem` binary (no library target): it is compiled in
//! here from its source file, with `config.rs` for the boot files.
#![no_main]
#![allow(dead_code)]

use std::io::{self, Cursor, Read, Write};

#[path = "../../vmm/src/config.rs"]
mod config;
mod memory {
    pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
}
#[path = "../../vmm/src/migration.rs"]
mod migration;
mod ops;

use ops::Ops;

use migration::{BootFileInfo, Hello, Kind, Stream, PROTOCOL_VERSION};
use vm_memory::{GuestAddress, GuestMemoryBackend};

/// A connection in memory: reads come from `input`, writes go to `output`. The
/// destination reads the fuzzer's stream from one; the source's own frame writer fills
/// another's output.
struct Pipe {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}
impl Pipe {
    fn new(input: Vec<u8>) -> Self {
        Self {
            input: Cursor::new(input),
            output: Vec::new(),
        }
    }
}
impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}
impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
impl Stream for Pipe {
    fn set_timeout(&self, _: Option<std::time::Duration>) -> io::Result<()> {
        Ok(())
    }
    fn shutdown(&self) {}
    fn has_input(&self, _: std::time::Duration) -> io::Result<bool> {
        Ok(false)
    }
}

const KINDS: [Kind; 14] = [
    Kind::Hello,
    Kind::Accept,
    Kind::Refuse,
    Kind::Pages,
    Kind::State,
    Kind::Ready,
    Kind::Go,
    Kind::Running,
    Kind::Abort,
    Kind::MemoryDone,
    Kind::Boot,
    Kind::RoundEnd,
    Kind::Prepared,
    Kind::Waiting,
];

/// A stream that starts as a source would; returns it with what its Hello announced.
fn structured(ops: &mut Ops) -> Option<(Vec<u8>, u64, u64)> {
    let [mem_pages, kernel_len, cut] = ops.take::<3>()?;
    // Up to 1 MiB of guest memory, pages or not; a kernel of 1 to 256 bytes.
    let memory_bytes = u64::from(mem_pages) * 4096 + u64::from(cut & 1) * 100;
    let kernel_bytes = u64::from(kernel_len) + 1;
    let hello = Hello {
        version: PROTOCOL_VERSION,
        memory_bytes,
        vcpus: 1,
        nets: Vec::new(),
        cpuid: Vec::new(),
        kernel: BootFileInfo {
            path: "/boot/vmlinuz".into(),
            bytes: kernel_bytes,
        },
        initramfs: None,
        cmdline: "console=ttyS0".into(),
    };
    let mut out = Pipe::new(Vec::new());
    migration::write_json(&mut out, Kind::Hello, &hello).ok()?;
    // The kernel in one or two frames.
    let first = if cut & 2 != 0 {
        kernel_bytes / 2
    } else {
        kernel_bytes
    };
    for n in [first, kernel_bytes - first].into_iter().filter(|n| *n > 0) {
        let mut body = vec![0u8];
        body.resize(1 + n as usize, 0xcc);
        migration::write_frame(&mut out, Kind::Boot, &body).ok()?;
    }
    while let Some([op, a, b, c]) = ops.take::<4>() {
        match op % 6 {
            0 => {
                // Page runs: page-aligned or not, inside RAM or not, data or short.
                let mut body = Vec::new();
                for _ in 0..=(a % 4) {
                    let gpa = u64::from(b) * 4096 + u64::from(c & 0x80) * 8;
                    let len = u64::from(c % 4) * 4096 + u64::from(a & 0x80) / 8;
                    body.extend_from_slice(&gpa.to_le_bytes());
                    body.extend_from_slice(&len.to_le_bytes());
                    body.resize(body.len() + len as usize - usize::from(a & 0x40 != 0), 0x5a);
                }
                migration::write_frame(&mut out, Kind::Pages, &body).ok()?;
            }
            // The end of a round (its number, or any few bytes), a waiting source's
            // tick, or the end of the rounds.
            1 if a & 1 == 1 => {
                let body = ops.bytes(usize::from(b % 8)).to_vec();
                migration::write_frame(&mut out, Kind::RoundEnd, &body).ok()?
            }
            1 if a & 2 == 2 => migration::write_frame(&mut out, Kind::Waiting, &[]).ok()?,
            1 => migration::write_frame(&mut out, Kind::MemoryDone, &[]).ok()?,
            2 => {
                let body = ops.bytes(usize::from(a)).to_vec();
                migration::write_frame(&mut out, Kind::State, &body).ok()?
            }
            3 => {
                let body = ops.bytes(usize::from(a)).to_vec();
                let kind = KINDS[usize::from(b) % KINDS.len()];
                migration::write_frame(&mut out, kind, &body).ok()?
            }
            4 => migration::write_json(
                &mut out,
                Kind::Abort,
                &serde_json::json!({ "reason": "the fuzzer" }),
            )
            .ok()?,
            _ => {
                let raw = ops.bytes(usize::from(a)).to_vec();
                out.output.extend_from_slice(&raw);
            }
        }
    }
    Some((out.output, memory_bytes, kernel_bytes))
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut ops = Ops(rest);
    let (stream, announced) = if mode % 2 == 0 {
        (rest.to_vec(), None)
    } else {
        match structured(&mut ops) {
            Some((s, m, k)) => (s, Some((m, k))),
            None => return,
        }
    };
    let made = std::cell::Cell::new(0u64);
    let result = migration::receive_on(
        Box::new(Pipe::new(stream)),
        |_| Ok(()),
        |bytes| {
            // No more than the structured streams ask for: a made-up Hello must not
            // make the fuzzer allocate gigabytes.
            if bytes == 0 || bytes > 1 << 20 {
                return Err(format!("{bytes} bytes of memory"));
            }
            made.set(bytes);
            let mem = memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), bytes as usize)])
                .map_err(|e| e.to_string())?;
            // Half the streams go to a destination opening a function, which says
            // Prepared after the first frame of the rounds.
            let opening = (mode & 2 == 2).then(|| migration::Opening {
                count: 1,
                done: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
                hurry: Box::new(|| Err("the fuzzer".into())),
            });
            Ok((mem, opening))
        },
    );
    if let Ok(incoming) = result {
        let size: u64 = incoming
            .mem
            .iter()
            .map(vm_memory::GuestMemoryRegion::len)
            .sum();
        assert_eq!(size, made.get(), "memory as the Hello announced");
        let kernel = incoming
            .boot
            .kernel
            .metadata()
            .map(|m| m.len())
            .unwrap_or(0);
        if let Some((m, k)) = announced {
            assert_eq!(
                (made.get(), kernel),
                (m, k),
                "a taken stream's memory and kernel"
            );
        }
        assert!(kernel > 0, "a taken stream has a kernel");
    }
});
