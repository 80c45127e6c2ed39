//! Which tap queue a frame for the guest takes, when the NIC has several queue pairs.
//!
//! Left to itself, a multi-queue tap sends each flow to the queue the guest last
//! *sent* that flow on. A Linux guest picks its tx queue per CPU for a socket with
//! nothing in flight (pure ACKs mostly), so a TCP stream's ACKs hop between queues and
//! the stream's data follows them: frames already waiting on one queue are overtaken
//! by frames on the other, each queue pair has its own worker here and its own rx
//! queue and interrupt in the guest, and the guest sees the stream out of order (the
//! sender's retransmits that `bench-net` counted with two queue pairs).
//!
//! So Tandem gives the tap a steering program (`TUNSETSTEERINGEBPF`): a small
//! socket-filter eBPF program, built here, that hashes the flow (IPv4 or IPv6
//! addresses, and TCP or UDP ports unless the packet is a fragment) the same way
//! in both directions; the tap takes the hash modulo its attached queues. A flow
//! stays on one queue for its life. Anything else (ARP, VLAN-tagged frames) goes to
//! the first queue.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// _IOR('T', 224, int)
const TUNSETSTEERINGEBPF: libc::c_ulong = 0x8004_54e0;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;

/// One eBPF instruction, as the kernel reads it.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    /// dst in the low nibble, src in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

// The opcodes used (see the kernel's Documentation/bpf/standardization).
const MOV_X: u8 = 0xbf; // dst = src (64-bit)
const MOV_K: u8 = 0xb7; // dst = imm
const XOR_X: u8 = 0xaf; // dst ^= src
const AND_K: u8 = 0x57; // dst &= imm
const LSH_K: u8 = 0x67; // dst <<= imm
const RSH_K: u8 = 0x77; // dst >>= imm
const LD_ABS_W: u8 = 0x20; // r0 = ntohl(packet[imm..imm+4])
const LD_ABS_H: u8 = 0x28; // r0 = ntohs(packet[imm..imm+2])
const LD_ABS_B: u8 = 0x30; // r0 = packet[imm]
const LD_IND_W: u8 = 0x40; // r0 = ntohl(packet[src+imm..])
const JEQ_K: u8 = 0x15; // if dst == imm: pc += off
const JNE_K: u8 = 0x55; // if dst != imm: pc += off
const JA: u8 = 0x05; // pc += off
const EXIT: u8 = 0x95;

/// The program. Registers: r6 the packet (LD_ABS/LD_IND read through it), r7 the
/// hash, r8 the L4 protocol, r9 where the L4 header starts (from the Ethernet
/// header). A packet too short for a load ends the program with 0 (the first queue).
fn program() -> Vec<Insn> {
    // Jump offsets count from the next instruction; the indices are in the comments.
    vec![
        /* 0 */ insn(MOV_X, 6, 1, 0, 0),
        /* 1 */ insn(MOV_K, 7, 0, 0, 0),
        /* 2 */ insn(LD_ABS_H, 0, 0, 0, 12), // ethertype
        /* 3 */ insn(JEQ_K, 0, 0, 3, 0x0800), // -> 7, IPv4
        /* 4 */ insn(JEQ_K, 0, 0, 20, 0x86dd), // -> 25, IPv6
        /* 5 */ insn(MOV_K, 0, 0, 0, 0),
        /* 6 */ insn(EXIT, 0, 0, 0, 0),
        // IPv4: addresses, then ports if TCP or UDP and not a fragment.
        /* 7 */
        insn(LD_ABS_W, 0, 0, 0, 26),
        /* 8 */ insn(XOR_X, 7, 0, 0, 0),
        /* 9 */ insn(LD_ABS_W, 0, 0, 0, 30),
        /* 10 */ insn(XOR_X, 7, 0, 0, 0),
        /* 11 */ insn(LD_ABS_H, 0, 0, 0, 20), // flags and fragment offset
        /* 12 */ insn(AND_K, 0, 0, 0, 0x3fff), // MF or an offset: no ports here
        /* 13 */ insn(JNE_K, 0, 0, 38, 0), // -> 52, done
        /* 14 */ insn(LD_ABS_B, 0, 0, 0, 23), // protocol
        /* 15 */ insn(MOV_X, 8, 0, 0, 0),
        /* 16 */ insn(LD_ABS_B, 0, 0, 0, 14), // version and IHL
        /* 17 */ insn(AND_K, 0, 0, 0, 0x0f),
        /* 18 */ insn(LSH_K, 0, 0, 0, 2),
        /* 19 */ insn(MOV_X, 9, 0, 0, 0),
        /* 20 */ insn(JEQ_K, 8, 0, 2, 6), // -> 23, TCP
        /* 21 */ insn(JEQ_K, 8, 0, 1, 17), // -> 23, UDP
        /* 22 */ insn(JA, 0, 0, 29, 0), // -> 52, done
        /* 23 */ insn(LD_IND_W, 0, 9, 0, 14), // both ports
        /* 24 */ insn(JA, 0, 0, 22, 0), // -> 47, fold the ports in
        // IPv6: both addresses, then ports if the next header is TCP or UDP.
        /* 25 */
        insn(LD_ABS_W, 0, 0, 0, 22),
        /* 26 */ insn(XOR_X, 7, 0, 0, 0),
        /* 27 */ insn(LD_ABS_W, 0, 0, 0, 26),
        /* 28 */ insn(XOR_X, 7, 0, 0, 0),
        /* 29 */ insn(LD_ABS_W, 0, 0, 0, 30),
        /* 30 */ insn(XOR_X, 7, 0, 0, 0),
        /* 31 */ insn(LD_ABS_W, 0, 0, 0, 34),
        /* 32 */ insn(XOR_X, 7, 0, 0, 0),
        /* 33 */ insn(LD_ABS_W, 0, 0, 0, 38),
        /* 34 */ insn(XOR_X, 7, 0, 0, 0),
        /* 35 */ insn(LD_ABS_W, 0, 0, 0, 42),
        /* 36 */ insn(XOR_X, 7, 0, 0, 0),
        /* 37 */ insn(LD_ABS_W, 0, 0, 0, 46),
        /* 38 */ insn(XOR_X, 7, 0, 0, 0),
        /* 39 */ insn(LD_ABS_W, 0, 0, 0, 50),
        /* 40 */ insn(XOR_X, 7, 0, 0, 0),
        /* 41 */ insn(LD_ABS_B, 0, 0, 0, 20), // next header
        /* 42 */ insn(MOV_X, 8, 0, 0, 0),
        /* 43 */ insn(JEQ_K, 8, 0, 2, 6), // -> 46, TCP
        /* 44 */ insn(JEQ_K, 8, 0, 1, 17), // -> 46, UDP
        /* 45 */ insn(JA, 0, 0, 6, 0), // -> 52, done
        /* 46 */ insn(LD_ABS_W, 0, 0, 0, 54), // both ports
        // Ports: source ^ destination, the same both ways.
        /* 47 */
        insn(MOV_X, 1, 0, 0, 0),
        /* 48 */ insn(RSH_K, 1, 0, 0, 16),
        /* 49 */ insn(AND_K, 0, 0, 0, 0xffff),
        /* 50 */ insn(XOR_X, 0, 1, 0, 0),
        /* 51 */ insn(XOR_X, 7, 0, 0, 0),
        // Done: fold the high bits down, so the low ones (the tap takes the hash
        // modulo the queue count) depend on all of it.
        /* 52 */
        insn(MOV_X, 0, 7, 0, 0),
        /* 53 */ insn(MOV_X, 1, 0, 0, 0),
        /* 54 */ insn(RSH_K, 1, 0, 0, 16),
        /* 55 */ insn(XOR_X, 0, 1, 0, 0),
        /* 56 */ insn(MOV_X, 1, 0, 0, 0),
        /* 57 */ insn(RSH_K, 1, 0, 0, 8),
        /* 58 */ insn(XOR_X, 0, 1, 0, 0),
        /* 59 */ insn(AND_K, 0, 0, 0, 0xffff),
        /* 60 */ insn(EXIT, 0, 0, 0, 0),
    ]
}

/// The leading fields of `union bpf_attr` for BPF_PROG_LOAD; the rest stays zero.
#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    _rest: [u8; 64],
}

/// Load the steering program; the kernel's verifier log comes back on failure.
fn load() -> io::Result<OwnedFd> {
    let prog = program();
    let mut log = vec![0u8; 16 * 1024];
    let mut name = [0u8; 16];
    name[..14].copy_from_slice(b"tandem_steerq\0");
    let attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_SOCKET_FILTER,
        insn_cnt: prog.len() as u32,
        insns: prog.as_ptr() as u64,
        license: c"Apache-2.0".as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
        _rest: [0; 64],
    };
    // SAFETY: bpf(BPF_PROG_LOAD) reads `attr` (its size given) and the instructions
    // and license it points to, which outlive the call, and writes at most
    // `log_size` bytes into `log`.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoad,
            std::mem::size_of::<ProgLoad>() as u32,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        let text = String::from_utf8_lossy(&log[..end]);
        let last = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(io::Error::new(
            e.kind(),
            if last.is_empty() {
                format!("loading the steering program: {e}")
            } else {
                format!("loading the steering program: {e} (verifier: {last})")
            },
        ));
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Give the multi-queue tap behind `tap` (any of its queues) the steering program:
/// each flow to one queue, whatever queue the guest sends it on.
pub fn steer_by_flow(tap: &File) -> io::Result<()> {
    let prog = load()?;
    let fd: libc::c_int = prog.as_raw_fd();
    // SAFETY: TUNSETSTEERINGEBPF reads an int (the program's fd) from the pointer;
    // the tap keeps its own reference to the program, so ours may close after.
    if unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETSTEERINGEBPF, &fd) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_jump_lands_inside_the_program() {
        let p = program();
        for (i, x) in p.iter().enumerate() {
            if matches!(x.code, JEQ_K | JNE_K | JA) {
                let to = i as i64 + 1 + i64::from(x.off);
                assert!((0..p.len() as i64).contains(&to), "insn {i} jumps to {to}");
            }
        }
        assert_eq!(p.last().map(|x| x.code), Some(EXIT));
    }

    #[test]
    fn the_kernel_accepts_the_program() {
        // Loading needs CAP_BPF (root here); without it there is nothing to check.
        // SAFETY: geteuid has no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: loading an eBPF program needs root");
            return;
        }
        load().expect("the verifier accepts the steering program");
    }
}
