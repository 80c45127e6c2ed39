//! What QEMU's monitor does not show of L1's CPU when L1 stalls: the TCG CPU's hidden
//! flags (the global interrupt flag, NMI blocking, SVM guest mode, the interrupt shadow)
//! and what the outer QEMU's threads are doing.
//!
//! A halted L1 CPU with an interrupt it could take pending in its LAPIC (the test host's
//! freeze, tests/README.md) is either a wake-up QEMU lost or a CPU that cannot take
//! interrupts for a reason `info registers` does not print: `GIF` clear, or the SVM
//! virtual-interrupt masking left on. Those live in `hflags`/`hflags2` of QEMU's
//! `CPUX86State`, which starts with the sixteen general registers and RIP, followed by
//! `eflags`, three condition-code words, `cc_op`, `df`, `hflags` and `hflags2`
//! (QEMU 10.0's `target/i386/cpu.h`). The monitor prints the registers, so the
//! structure is found by looking for those seventeen values in the outer QEMU's memory
//! (`/proc/PID/mem`; the harness runs as root). Debian's QEMU has no symbols to ask a
//! debugger for them.

use std::fs;
use std::os::unix::fs::FileExt;
use std::time::Duration;

/// The general registers in `CPUX86State.regs` order, then RIP.
const ORDER: [&str; 17] = [
    "RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI", "R8", "R9", "R10", "R11", "R12", "R13",
    "R14", "R15", "RIP",
];
/// Offsets in `CPUX86State` of `hflags` and `hflags2`: 16 registers, eip, eflags,
/// cc_dst, cc_src, cc_src2 (8 bytes each), cc_op and df (4 each).
const HFLAGS: usize = 176;
const HFLAGS2: usize = 180;
/// `CPUState` (QEMU 10.0): `cc` pointer, `int nr_threads`, `thread` pointer,
/// `int thread_id`, `running`, `has_waiter`, `halt_cond` pointer, eight bools,
/// `exclusive_context_count`, `cflags_next_tb`, `interrupt_request`: offsets from
/// `thread_id`, which is the vCPU thread's id and so can be found.
const NR_THREADS_BEFORE: u64 = 16;
const HALT_COND: u64 = 8;
const CREATED: u64 = 17;
const INTERRUPT_REQUEST: u64 = 32;
/// How far before `CPUX86State` its `CPUState` may start (its TLB sits in between).
const CPUSTATE_SPAN: u64 = 256 << 10;
/// Mappings this large are guest RAM or TCG's code buffer, not the CPU object.
const MAX_REGION: u64 = 1 << 30;

/// The value of register `name` in the monitor's `info registers` text (`RAX=...`,
/// `R8 =...`).
fn register(text: &str, name: &str) -> Option<u64> {
    let mut from = 0;
    while let Some(i) = text[from..].find(name) {
        let at = from + i;
        from = at + name.len();
        let before_ok = at == 0 || text.as_bytes()[at - 1].is_ascii_whitespace();
        let rest = text[from..].trim_start_matches(' ');
        if before_ok {
            if let Some(hex) = rest.strip_prefix('=') {
                let hex: String = hex.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
                if hex.len() == 16 {
                    return u64::from_str_radix(&hex, 16).ok();
                }
            }
        }
    }
    None
}

/// The seventeen register values as `CPUX86State` holds them in memory.
fn pattern(registers: &str) -> Option<Vec<u8>> {
    let mut p = Vec::with_capacity(ORDER.len() * 8);
    for name in ORDER {
        p.extend_from_slice(&register(registers, name)?.to_le_bytes());
    }
    Some(p)
}

/// The mappings of process `pid`: (start, end, writable).
fn mappings(pid: u32) -> Result<Vec<(u64, u64, bool)>, String> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| format!("/proc/{pid}/maps: {e}"))?;
    Ok(maps
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (a, b) = f.next()?.split_once('-')?;
            let rw = f.next()?.starts_with("rw");
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
                rw,
            ))
        })
        .collect())
}

/// Addresses in process `pid` where `pat` starts at an 8-byte boundary (at most 8).
fn find(pid: u32, pat: &[u8]) -> Result<Vec<u64>, String> {
    let mem =
        fs::File::open(format!("/proc/{pid}/mem")).map_err(|e| format!("/proc/{pid}/mem: {e}"))?;
    let mut found = Vec::new();
    const CHUNK: u64 = 8 << 20;
    for (start, end, rw) in mappings(pid)? {
        if !rw || end - start > MAX_REGION {
            continue;
        }
        let mut at = start;
        let mut buf = Vec::new();
        while at < end {
            // Overlap the chunks by the pattern's length so no match is cut in two.
            let len = (end - at).min(CHUNK + pat.len() as u64);
            buf.resize(len as usize, 0);
            if mem.read_exact_at(&mut buf, at).is_err() {
                break;
            }
            let mut off = 0;
            while off + pat.len() <= buf.len() {
                if buf[off..off + 8] == pat[..8] && buf[off..off + pat.len()] == *pat {
                    found.push(at + off as u64);
                    if found.len() == 8 {
                        return Ok(found);
                    }
                }
                off += 8;
            }
            at += CHUNK;
        }
    }
    Ok(found)
}

/// Finds `CPUState.interrupt_request` before the `CPUX86State` at `env`: the vCPU
/// thread's id `tid` as `thread_id`, with the fields around it as a live CPU has them.
fn interrupt_request(pid: u32, mem: &fs::File, env: u64, tid: u32) -> Option<u32> {
    // Not below the start of the mapping that holds `env`.
    let start = mappings(pid)
        .ok()?
        .into_iter()
        .find(|&(a, b, _)| a <= env && env < b)?
        .0;
    let from = (env.saturating_sub(CPUSTATE_SPAN) & !7).max(start);
    let mut buf = vec![0u8; (env - from) as usize];
    mem.read_exact_at(&mut buf, from).ok()?;
    let u32_at = |o: u64| -> Option<u32> {
        let o = usize::try_from(o).ok()?;
        Some(u32::from_le_bytes(buf.get(o..o + 4)?.try_into().ok()?))
    };
    let u64_at = |o: u64| -> Option<u64> {
        let o = usize::try_from(o).ok()?;
        Some(u64::from_le_bytes(buf.get(o..o + 8)?.try_into().ok()?))
    };
    let mut t = buf.len() as u64;
    while t >= 8 + NR_THREADS_BEFORE {
        t -= 8;
        if u32_at(t)? == tid
            && u32_at(t - NR_THREADS_BEFORE)? == 1
            && u64_at(t - 8)? != 0
            && u64_at(t + HALT_COND)? != 0
            && buf.get((t + CREATED) as usize) == Some(&1)
        {
            return u32_at(t + INTERRUPT_REQUEST);
        }
    }
    None
}

/// `CPUState.interrupt_request` in words.
fn describe_requests(r: u32) -> String {
    const BITS: [(u32, &str); 11] = [
        (0x2, "HARD"),
        (0x4, "EXITTB"),
        (0x10, "POLL"),
        (0x20, "HALT"),
        (0x40, "SMI"),
        (0x80, "DEBUG"),
        (0x100, "VIRQ"),
        (0x200, "NMI"),
        (0x400, "INIT"),
        (0x800, "SIPI"),
        (0x1000, "MCE"),
    ];
    let names: Vec<&str> = BITS
        .iter()
        .filter(|(b, _)| r & b != 0)
        .map(|(_, n)| *n)
        .collect();
    format!(
        "interrupt_request={r:#06x} [{}]",
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(" ")
        }
    )
}

/// `hflags` and `hflags2` in words.
fn describe(hflags: u32, hflags2: u32) -> String {
    let on = |v: u32, bit: u32| v & (1 << bit) != 0;
    let mut s = format!("hflags={hflags:#010x} hflags2={hflags2:#06x}:");
    s += &format!(
        " GIF={} NMI-blocked={} V_INTR_MASKING={} host-IF-in-guest={} SVM-guest-mode={} interrupt-shadow={} SMM={} CPL={}",
        u8::from(on(hflags2, 0)),
        u8::from(on(hflags2, 2)),
        u8::from(on(hflags2, 3)),
        u8::from(on(hflags2, 1)),
        u8::from(on(hflags, 21)),
        u8::from(on(hflags, 3)),
        u8::from(on(hflags, 19)),
        hflags & 3,
    );
    if !on(hflags2, 0) {
        s += "\n  GIF is clear: neither an interrupt nor an NMI can wake this CPU";
    } else if on(hflags2, 3) && !on(hflags2, 1) {
        s += "\n  virtual-interrupt masking is on with the host's IF clear: no interrupt can wake this CPU";
    }
    s
}

/// The id of process `pid`'s first TCG vCPU thread (`CPU 0/TCG`, named with
/// `-name debug-threads=on`).
fn vcpu_thread(pid: u32) -> Option<u32> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
        .find(|t| fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "CPU 0/TCG"))?
        .file_name()
        .to_str()?
        .parse()
        .ok()
}

/// Each thread of `pid`: name, state, CPU used over one second.
fn threads(pid: u32) -> String {
    fn sample(pid: u32) -> Vec<(String, String, u64)> {
        let mut v = Vec::new();
        let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
            return v;
        };
        for t in dir.flatten() {
            let Ok(stat) = fs::read_to_string(t.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ... utime(14) stime(15)
            let (Some(l), Some(r)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let comm = stat[l + 1..r].to_string();
            let f: Vec<&str> = stat[r + 1..].split_whitespace().collect();
            let ticks = f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
            let state = f.first().unwrap_or(&"?").to_string();
            v.push((
                format!("{} {comm}", t.file_name().to_string_lossy()),
                state,
                ticks,
            ));
        }
        v.sort();
        v
    }
    let a = sample(pid);
    std::thread::sleep(Duration::from_secs(1));
    let b = sample(pid);
    let mut s = String::from("outer QEMU's threads (CPU over 1 s, state):");
    for (name, state, ticks) in &b {
        let before = a.iter().find(|(n, _, _)| n == name).map_or(*ticks, |x| x.2);
        // Clock ticks are 10 ms: ticks over one second are a percentage.
        s += &format!("\n  {name}: {}% {state}", ticks.saturating_sub(before));
    }
    s
}

/// The system calls of thread `tid` over one second, counted by `strace -c` where it
/// is installed: what a busy outer QEMU thread does (a timer firing over and over, a
/// device's I/O, ...).
fn syscalls(tid: u32) -> String {
    let out = std::process::Command::new("timeout")
        .args(["-s", "INT", "1", "strace", "-c", "-p", &tid.to_string()])
        .stdout(std::process::Stdio::null())
        .output();
    let o = match out {
        Ok(o) => o,
        Err(e) => return format!("  system calls of thread {tid}: not counted ({e})"),
    };
    let text = String::from_utf8_lossy(&o.stderr);
    if text.contains("usecs/call") {
        let rows: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.contains("strace: Process"))
            .take(12)
            .collect();
        format!(
            "  system calls of thread {tid} over 1 s:\n    {}",
            rows.join("\n    ")
        )
    } else if text.contains("attached") {
        // strace prints no table for a thread that made no system call.
        format!("  system calls of thread {tid} over 1 s: none")
    } else {
        format!(
            "  system calls of thread {tid}: not counted ({})",
            text.lines().next().unwrap_or("strace printed nothing")
        )
    }
}

/// What the monitor does not show of L1's CPU, as text for the register dump: its TCG
/// flags (found from the registers the monitor printed) and the outer QEMU's threads.
pub fn report(pid: u32, registers: &str) -> String {
    let mut s = String::from("What QEMU's monitor does not show (tests/src/l1cpu.rs):\n");
    match pattern(registers) {
        None => s += "  no general registers in the monitor's answer: TCG flags not read\n",
        Some(pat) => match find(pid, &pat) {
            Err(e) => s += &format!("  TCG flags not read: {e}\n"),
            Ok(v) if v.is_empty() => {
                s += "  L1's registers not found in the outer QEMU's memory: TCG flags not read\n"
            }
            Ok(v) => {
                if let Ok(mem) = fs::File::open(format!("/proc/{pid}/mem")) {
                    for at in v {
                        let mut b = [0u8; 8];
                        if mem.read_exact_at(&mut b, at + HFLAGS as u64).is_ok() {
                            let word = |o: usize| {
                                let o = o - HFLAGS;
                                u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
                            };
                            let (h, h2) = (word(HFLAGS), word(HFLAGS2));
                            s += &format!("  CPU state at {at:#x}: {}\n", describe(h, h2));
                            match vcpu_thread(pid)
                                .and_then(|tid| interrupt_request(pid, &mem, at, tid))
                            {
                                Some(r) => s += &format!("  {}\n", describe_requests(r)),
                                None => s += "  interrupt_request not found\n",
                            }
                        }
                    }
                }
            }
        },
    }
    s += &threads(pid);
    s.push('\n');
    // The main loop's thread has the process's id.
    s += &syscalls(pid);
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_are_read_from_the_monitors_text() {
        let text =
            "RAX=ffffffff81a59180 RBX=0000000000000000 RCX=0000000000000001 RDX=4000000000000000\n\
                    R8 =0000000000000004 R9 =00000000313b13b1\n\
                    RIP=ffffffff81a592eb RFL=00000216";
        assert_eq!(register(text, "RAX"), Some(0xffff_ffff_81a5_9180));
        assert_eq!(register(text, "RCX"), Some(1));
        assert_eq!(register(text, "R8"), Some(4));
        assert_eq!(register(text, "R9"), Some(0x313b_13b1));
        assert_eq!(register(text, "RIP"), Some(0xffff_ffff_81a5_92eb));
        // "R1" is not the start of "R15", nor is "AX" read out of "RAX".
        assert_eq!(register(text, "R1"), None);
        assert_eq!(register(text, "AX"), None);
        assert!(pattern(text).is_none(), "not all seventeen are there");
    }

    #[test]
    fn interrupt_request_is_found_by_the_vcpu_threads_id() {
        // A fake CPUState and CPUX86State in this process's memory: thread_id 4242 at
        // word 100, the fields around it as QEMU 10 lays them out.
        let mut words = vec![0u64; 4096].into_boxed_slice();
        let t = 100;
        words[t - 2] = 1; // nr_threads
        words[t - 1] = 0x5555_0000_1000; // thread
        words[t] = 4242; // thread_id, running, has_waiter
        words[t + 1] = 0x5555_0000_2000; // halt_cond
        words[t + 2] = 1 << 8; // thread_kicked, created, ...
        words[t + 4] = 0x12; // interrupt_request (HARD | POLL)
        let env = words.as_ptr() as u64 + 1000 * 8;
        let mem = fs::File::open("/proc/self/mem").expect("own memory");
        assert_eq!(
            interrupt_request(std::process::id(), &mem, env, 4242),
            Some(0x12)
        );
        assert_eq!(interrupt_request(std::process::id(), &mem, env, 4243), None);
        drop(words);
    }

    #[test]
    fn interrupt_requests_are_named() {
        assert_eq!(describe_requests(0), "interrupt_request=0x0000 [none]");
        assert_eq!(
            describe_requests(0x212),
            "interrupt_request=0x0212 [HARD POLL NMI]"
        );
    }

    #[test]
    fn the_flags_say_what_keeps_a_cpu_asleep() {
        assert!(describe(0, 0).contains("GIF is clear"));
        assert!(describe(0, 1 | 8).contains("host's IF clear"));
        let fine = describe(0, 1);
        assert!(
            fine.contains("GIF=1") && !fine.contains("no interrupt"),
            "{fine}"
        );
    }

    #[test]
    fn the_registers_are_found_in_a_process() {
        // This process's own memory holds a fake CPUX86State with known flags.
        let text =
            "RAX=1111111111111111 RBX=2222222222222222 RCX=3333333333333333 RDX=4444444444444444\n\
            RSI=5555555555555555 RDI=6666666666666666 RBP=7777777777777777 RSP=8888888888888888\n\
            R8 =9999999999999999 R9 =aaaaaaaaaaaaaaaa R10=bbbbbbbbbbbbbbbb R11=cccccccccccccccc\n\
            R12=dddddddddddddddd R13=eeeeeeeeeeeeeeee R14=0101010101010101 R15=0202020202020202\n\
            RIP=0303030303030303 RFL=00000216";
        let pat = pattern(text).expect("all registers");
        let mut env = vec![0u64; 32].into_boxed_slice();
        for (i, c) in pat.chunks(8).enumerate() {
            env[i] = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        }
        env[HFLAGS / 8] = 0x0020_0000 | (0x9u64 << 32);
        let pid = std::process::id();
        let r = report(pid, text);
        let addr = env.as_ptr() as u64;
        assert!(
            r.contains(&format!("{addr:#x}"))
                && r.contains("SVM-guest-mode=1")
                && r.contains("V_INTR_MASKING=1"),
            "{r}"
        );
        drop(env);
    }
}
