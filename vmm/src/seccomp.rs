//! seccomp filters: each thread kind may make only the system calls its work needs.
//!
//! A thread installs its filter itself ([`devices::sandbox::enter`]) before it
//! reads guest memory or outside input: a vCPU before its first `KVM_RUN`, a net
//! worker before it looks at a queue, the API thread before it accepts a client,
//! the serial pumps before they move a byte, the migration sender before it
//! connects, and the control loop before it boots or takes in a migration.
//!
//! ```text
//!   main ── control ──┬── vcpuN ── net-ID-qN     (a vCPU starts a NIC's workers
//!                     ├── migration               when the driver sets DRIVER_OK)
//!                     └── net-ID-qN  (resume, hotplug)
//!   api ── tokio helpers          serial-accept ── serial-input
//! ```
//!
//! A thread's filters apply to the threads it starts, on top of their own. So
//! the control loop's list is a superset of every other list, and a vCPU's a
//! superset of a net worker's; both are built as such ([`rules`]), not kept in
//! step by hand.
//!
//! Cost on the hot paths: a call that every filter of a thread lets through
//! whatever its arguments (read, readv, write, writev, epoll_wait, futex: the whole
//! virtio data path) is answered from the kernel's per-filter cache of constant
//! actions (Linux 5.11 on) without running any filter. Conditional calls run each
//! stacked filter's rules for that call in order; for `ioctl`, the one a vCPU
//! makes on every exit (`KVM_RUN`), KVM's class is the first rule, and no rule is
//! listed twice.
//!
//! What no thread may do: `execve`, `ptrace`, `mount`, namespaces, module loading,
//! changing ids, new executable memory (except the control loop, whose host-name
//! lookup may load an NSS module), and any `ioctl` outside KVM's, VFIO's and
//! tun's (plus a few socket and terminal ones for the control loop). A call
//! outside its thread's list raises SIGSYS, and the handler prints the thread
//! and the call and ends the process with [`EXIT_STATUS`]: a VMM that a guest
//! steered somewhere unexpected stops; it does not limp on. `--seccomp log` lets
//! every call through and has the kernel log the ones a filter would have
//! stopped (`dmesg | grep type=1326`), which is how a new code path finds what
//! it needs.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use devices::sandbox::{self, ThreadKind};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The exit status after a forbidden system call: 128 + SIGSYS, what a shell
/// shows for a process the signal killed.
pub const EXIT_STATUS: i32 = 128 + libc::SIGSYS;

/// `--seccomp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// A forbidden call ends the VMM with a message naming the thread and the call.
    On,
    /// No filters.
    Off,
    /// Forbidden calls go through, and the kernel logs each (audit type 1326).
    Log,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build the seccomp filter for {0:?} threads: {1}")]
    Build(ThreadKind, seccompiler::BackendError),
    #[error("this kernel refuses seccomp filters ({0}); run with --seccomp off to go without")]
    Unsupported(seccompiler::Error),
}

/// A system call number with its name (for the SIGSYS message).
type Call = (i64, &'static str);

macro_rules! calls {
    ($($name:ident),* $(,)?) => { &[$((libc::$name, stringify!($name))),*] };
}

/// What every thread does: memory, locks, thread start and end, signals, time,
/// randomness for hash maps, and writing (its log lines go to stderr).
const BASE: &[Call] = calls![
    SYS_brk,
    SYS_munmap,
    SYS_madvise,
    SYS_mremap,
    SYS_futex,
    SYS_rseq,
    SYS_set_robust_list,
    SYS_sigaltstack,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_sched_getaffinity,
    SYS_sched_yield,
    SYS_gettid,
    SYS_getpid,
    SYS_tgkill,
    SYS_exit,
    SYS_exit_group,
    SYS_restart_syscall,
    SYS_write,
    SYS_writev,
    SYS_close,
    SYS_getrandom,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_nanosleep,
];

/// A virtio-net queue pair: the tap, eventfds (kicks, interrupts, kill), epoll.
const NET_WORKER: &[Call] = calls![
    SYS_read,
    SYS_readv,
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_epoll_ctl,
    SYS_sched_setscheduler,
];

/// A vCPU: KVM, device models (a VFIO function's config space and trapped BARs
/// are pread/pwrite on its fd), and starting a NIC's workers on DRIVER_OK.
const VCPU: &[Call] = calls![
    SYS_read,
    SYS_pread64,
    SYS_pwrite64,
    SYS_eventfd2,
    SYS_epoll_create1,
    SYS_fcntl,
    SYS_dup,
    SYS_clone3,
];

/// The API server: its socket, tokio's epoll and eventfd. No threads: it awaits the
/// control loop's answers on its own thread.
const API: &[Call] = calls![
    SYS_accept4,
    SYS_read,
    SYS_recvfrom,
    SYS_recvmsg,
    SYS_sendto,
    SYS_sendmsg,
    SYS_shutdown,
    SYS_getsockopt,
    SYS_geteuid,
    SYS_getuid,
    SYS_fcntl,
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_epoll_ctl,
];

/// The serial console: stdin, the socket and its clients, the output file and
/// its rotation.
const SERIAL: &[Call] = calls![
    SYS_accept4,
    SYS_read,
    SYS_recvfrom,
    SYS_sendto,
    SYS_shutdown,
    SYS_getsockopt,
    SYS_setsockopt,
    SYS_geteuid,
    SYS_getuid,
    SYS_fcntl,
    SYS_poll,
    SYS_ppoll,
    SYS_openat,
    SYS_rename,
    SYS_renameat,
    SYS_renameat2,
    SYS_clone3,
];

/// The migration sender: one connection (to an address the control loop looked
/// up), guest memory, KVM's dirty log.
const MIGRATION: &[Call] = calls![
    SYS_socket,
    SYS_connect,
    SYS_read,
    SYS_readv,
    SYS_pread64,
    SYS_recvfrom,
    SYS_sendto,
    SYS_sendmsg,
    SYS_sendfile,
    SYS_copy_file_range,
    SYS_setsockopt,
    SYS_getsockopt,
    SYS_getsockname,
    SYS_getpeername,
    SYS_shutdown,
    SYS_fcntl,
    SYS_poll,
];

/// The control loop, besides everything the threads it starts do: building and
/// rebuilding the VM, hotplug (taps, VFIO, sysfs), sockets, signals, an incoming
/// migration, file metadata.
const CONTROL: &[Call] = calls![
    SYS_openat,
    SYS_open,
    SYS_lseek,
    SYS_preadv,
    SYS_pwritev,
    SYS_newfstatat,
    SYS_fstat,
    SYS_stat,
    SYS_lstat,
    SYS_statx,
    SYS_access,
    SYS_faccessat,
    SYS_faccessat2,
    SYS_readlink,
    SYS_readlinkat,
    SYS_getdents64,
    SYS_unlink,
    SYS_unlinkat,
    SYS_chmod,
    SYS_fchmod,
    SYS_fchmodat,
    SYS_ftruncate,
    SYS_fsync,
    SYS_fdatasync,
    SYS_dup2,
    SYS_dup3,
    SYS_pipe2,
    SYS_memfd_create,
    SYS_signalfd4,
    SYS_timerfd_create,
    SYS_timerfd_settime,
    SYS_bind,
    SYS_listen,
    SYS_accept,
    SYS_socketpair,
    SYS_splice,
    SYS_tkill,
    SYS_getgid,
    SYS_getegid,
    SYS_rt_sigaction,
    SYS_arch_prctl,
    SYS_set_tid_address,
    SYS_prlimit64,
    SYS_sysinfo,
    SYS_uname,
    SYS_getcwd,
    SYS_clock_getres,
    // The flow-steering eBPF program a multi-queue tap gets when a NIC is added.
    SYS_bpf,
];

/// Calls no thread may make, named here only for the SIGSYS message.
const NAMED_ONLY: &[Call] = calls![
    SYS_execve,
    SYS_execveat,
    SYS_fork,
    SYS_vfork,
    SYS_ptrace,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_kill,
    SYS_mount,
    SYS_umount2,
    SYS_unshare,
    SYS_setns,
    SYS_chroot,
    SYS_pivot_root,
    SYS_setuid,
    SYS_setgid,
    SYS_init_module,
    SYS_finit_module,
    SYS_kexec_load,
    SYS_reboot,
    SYS_perf_event_open,
    SYS_userfaultfd,
    SYS_mkdir,
    SYS_symlink,
    SYS_link,
    SYS_chown,
    // Allowed with conditions only (the control loop's).
    SYS_setpriority,
];

/// ioctl request classes: `(mask, value)` over the request's low 32 bits.
const IOCTL_KVM: (u64, u64) = (0xff00, 0xae00);
const IOCTL_VFIO: (u64, u64) = (0xff00, 0x3b00);
/// tun's requests, `'T'` 200 to 223 (TUNSETIFF, TUNSETOFFLOAD, TUNSETQUEUE, ...);
/// the terminal's `'T'` requests are below 0x60 and stay out.
const IOCTL_TUN: (u64, u64) = (0xffc0, 0x54c0);
/// Socket requests (`SIOCGIFINDEX` and kin, for a tap's interface).
const IOCTL_SOCKET: (u64, u64) = (0xff00, 0x8900);
const FULL: u64 = 0xffff_ffff;
/// Blocking mode and close-on-exec, which the standard library sets by ioctl.
const IOCTL_FD: &[(u64, u64)] = &[(FULL, libc::FIONBIO), (FULL, libc::FIOCLEX)];
/// The terminal the serial console may own (raw mode and back).
const IOCTL_TERMINAL: &[(u64, u64)] = &[
    (FULL, libc::TCGETS),
    (FULL, libc::TCSETS),
    (FULL, libc::TCSETSW),
    (FULL, libc::TCSETSF),
    (FULL, libc::TIOCGWINSZ),
];

/// A syscall's rules: `None` lets every call through, `Some(rules)` those that
/// match one of them.
type Rules = BTreeMap<i64, Option<Vec<SeccompRule>>>;

fn allow_all(map: &mut Rules, calls: &[Call]) {
    for &(nr, _) in calls {
        map.insert(nr, None);
    }
}

/// Let `nr` through when one of `rules` matches (as well as what it let through).
/// A rule it has already is not added again: merged kinds share many, and the
/// kernel runs a conditional call's rules one by one on every such call (a vCPU's
/// `KVM_RUN` ioctl goes through its own filter and the control loop's).
fn allow_if(map: &mut Rules, nr: i64, rules: Vec<SeccompRule>) {
    if let Some(list) = map.entry(nr).or_insert_with(|| Some(Vec::new())) {
        for r in rules {
            if !list.contains(&r) {
                list.push(r);
            }
        }
    }
}

/// One condition on argument `arg`: `arg & mask == value`.
fn cond(arg: u8, mask: u64, value: u64) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask),
        value,
    )?])
}

fn ioctls(classes: &[(u64, u64)]) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    classes.iter().map(|&(m, v)| cond(1, m, v)).collect()
}

/// What every thread may do with conditions: name itself, map memory that is
/// not executable, add a filter of its own to the one it inherited (which can
/// only forbid more), and ask whether a descriptor is open (the standard
/// library does before it closes one, in debug builds).
fn base(map: &mut Rules) -> Result<(), seccompiler::BackendError> {
    allow_all(map, BASE);
    let ops = [
        libc::PR_SET_NAME as u64,
        libc::PR_GET_NAME as u64,
        libc::PR_SET_NO_NEW_PRIVS as u64,
    ];
    allow_if(
        map,
        libc::SYS_prctl,
        ops.iter()
            .map(|&op| cond(0, FULL, op))
            .collect::<Result<_, _>>()?,
    );
    let add_filter = libc::SECCOMP_SET_MODE_FILTER as u64;
    allow_if(map, libc::SYS_seccomp, vec![cond(0, FULL, add_filter)?]);
    allow_if(
        map,
        libc::SYS_fcntl,
        vec![cond(1, FULL, libc::F_GETFD as u64)?],
    );
    let exec = libc::PROT_EXEC as u64;
    allow_if(map, libc::SYS_mmap, vec![cond(2, exec, 0)?]);
    allow_if(map, libc::SYS_mprotect, vec![cond(2, exec, 0)?]);
    Ok(())
}

/// The rules of one thread kind, supersets included (see the module doc).
pub fn rules(kind: ThreadKind) -> Result<Rules, seccompiler::BackendError> {
    let mut map = Rules::new();
    base(&mut map)?;
    match kind {
        ThreadKind::NetWorker => {
            allow_all(&mut map, NET_WORKER);
            allow_if(&mut map, libc::SYS_ioctl, ioctls(&[IOCTL_TUN])?);
        }
        ThreadKind::Vcpu => {
            // KVM's class first: KVM_RUN is the ioctl a vCPU makes most.
            allow_if(
                &mut map,
                libc::SYS_ioctl,
                ioctls(&[IOCTL_KVM, IOCTL_VFIO, IOCTL_TUN])?,
            );
            merge(&mut map, rules(ThreadKind::NetWorker)?);
            allow_all(&mut map, VCPU);
        }
        ThreadKind::Api => {
            allow_all(&mut map, API);
            allow_if(&mut map, libc::SYS_ioctl, ioctls(IOCTL_FD)?);
        }
        ThreadKind::Serial => {
            allow_all(&mut map, SERIAL);
            allow_if(&mut map, libc::SYS_ioctl, ioctls(IOCTL_FD)?);
        }
        ThreadKind::Migration => {
            allow_all(&mut map, MIGRATION);
            allow_if(
                &mut map,
                libc::SYS_ioctl,
                ioctls(&[IOCTL_KVM, (FULL, libc::FIONBIO)])?,
            );
        }
        ThreadKind::Control => {
            for k in [
                ThreadKind::Vcpu,
                ThreadKind::Api,
                ThreadKind::Serial,
                ThreadKind::Migration,
            ] {
                merge(&mut map, rules(k)?);
            }
            allow_all(&mut map, CONTROL);
            let mut classes = vec![IOCTL_KVM, IOCTL_VFIO, IOCTL_SOCKET, IOCTL_TUN];
            classes.extend(IOCTL_FD);
            classes.extend(IOCTL_TERMINAL);
            allow_if(&mut map, libc::SYS_ioctl, ioctls(&classes)?);
            // The thread that opens passthrough functions ahead of their plug lowers
            // its own priority, and the control loop raises it again when a plug
            // waits for it (`DeviceManager::open_ahead`): threads' priorities only.
            allow_if(
                &mut map,
                libc::SYS_setpriority,
                vec![cond(0, FULL, libc::PRIO_PROCESS as u64)?],
            );
            // A host-name lookup may load an NSS module.
            map.insert(libc::SYS_mmap, None);
            map.insert(libc::SYS_mprotect, None);
        }
    }
    // Threads, not processes.
    if matches!(
        kind,
        ThreadKind::Vcpu | ThreadKind::Serial | ThreadKind::Control
    ) {
        let thread = libc::CLONE_THREAD as u64;
        allow_if(&mut map, libc::SYS_clone, vec![cond(0, thread, thread)?]);
    }
    Ok(map)
}

/// `into` lets through what it did and what `from` does.
fn merge(into: &mut Rules, from: Rules) {
    for (nr, rules) in from {
        match rules {
            None => {
                into.insert(nr, None);
            }
            Some(r) => allow_if(into, nr, r),
        }
    }
}

const KINDS: [ThreadKind; 6] = [
    ThreadKind::Control,
    ThreadKind::Vcpu,
    ThreadKind::NetWorker,
    ThreadKind::Api,
    ThreadKind::Serial,
    ThreadKind::Migration,
];

/// The compiled filter of one thread kind.
pub fn program(kind: ThreadKind, mode: Mode) -> Result<BpfProgram, Error> {
    let build = |e| Error::Build(kind, e);
    let rules = rules(kind)
        .map_err(build)?
        .into_iter()
        .map(|(nr, r)| (nr, r.unwrap_or_default()))
        .collect();
    let mismatch = match mode {
        Mode::Log => SeccompAction::Log,
        Mode::On | Mode::Off => SeccompAction::Trap,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(build)?;
    filter.try_into().map_err(build)
}

static PROGRAMS: OnceLock<Vec<(ThreadKind, BpfProgram)>> = OnceLock::new();

/// Build every kind's filter, install the SIGSYS handler, check the kernel takes
/// a filter, and have [`devices::sandbox::enter`] install them from now on.
pub fn init(mode: Mode) -> Result<(), Error> {
    if mode == Mode::Off {
        return Ok(());
    }
    no_heap_shrinking();
    let programs = KINDS
        .iter()
        .map(|&k| Ok((k, program(k, mode)?)))
        .collect::<Result<Vec<_>, Error>>()?;
    // A throwaway thread tries one, so that a kernel without seccomp is one clear
    // error at start, not a fatal one on the first vCPU.
    let probe = programs[0].1.clone();
    if let Ok(r) = std::thread::spawn(move || seccompiler::apply_filter(&probe)).join() {
        r.map_err(Error::Unsupported)?;
    }
    install_sigsys_handler();
    let _ = PROGRAMS.set(programs);
    sandbox::set_hook(enter);
    Ok(())
}

/// glibc's malloc gives a thread's own heap (an arena other than the main one) back to
/// the kernel when its free top grows past the trim threshold, and the first time it
/// does, in any thread, it reads /proc/sys/vm/overcommit_memory to choose how: an
/// `openat` in whatever thread that is, which no filter but the control loop's allows.
/// It once ended a VMM from the API server's helper thread in the middle of a
/// migration. With a threshold no heap reaches (a heap is at most 64 MiB) no heap
/// shrinks; freed memory stays with its thread's heap for its next allocations.
fn no_heap_shrinking() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt changes a malloc parameter; any int is a valid value for it.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
    }
}

/// Install the calling thread's filter (the hook behind `devices::sandbox::enter`).
fn enter(kind: ThreadKind) {
    let Some(program) = PROGRAMS
        .get()
        .and_then(|p| p.iter().find(|(k, _)| *k == kind))
    else {
        return;
    };
    if let Err(e) = seccompiler::apply_filter(&program.1) {
        // init() applied one already; this cannot fail short of memory.
        eprintln!("tandem: cannot install the seccomp filter of a {kind:?} thread: {e}");
        std::process::exit(1);
    }
}

fn install_sigsys_handler() {
    // SAFETY: a zeroed sigaction is valid; we fill the handler, flags and mask.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sigsys as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: sa_mask is ours to fill; sigaction installs a handler that only
    // makes async-signal-safe calls (prctl, write, _exit).
    unsafe {
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut());
    }
}

/// The name of system call `nr`, if any list here has it.
fn call_name(nr: i64) -> Option<&'static str> {
    [
        BASE, NET_WORKER, VCPU, API, SERIAL, MIGRATION, CONTROL, NAMED_ONLY,
    ]
    .iter()
    .flat_map(|l| l.iter())
    .chain(calls![
        SYS_ioctl,
        SYS_prctl,
        SYS_mmap,
        SYS_mprotect,
        SYS_clone,
        SYS_seccomp
    ])
    .find(|(n, _)| *n == nr)
    .map(|(_, name)| name.trim_start_matches("SYS_"))
}

/// The path a forbidden `open`/`openat` was given, from the caller's registers: what
/// it tried to open tells which code made the call. At most 120 bytes.
///
/// # Safety
/// `ctx` is the ucontext the kernel passed to a SIGSYS handler, or null.
unsafe fn opened_path(nr: i64, ctx: *mut libc::c_void, out: &mut [u8; 120]) -> usize {
    if ctx.is_null() {
        return 0;
    }
    // SAFETY: the caller's promise: the kernel's ucontext for this signal.
    let regs = unsafe { &(*(ctx as *const libc::ucontext_t)).uc_mcontext.gregs };
    let ptr = match nr {
        libc::SYS_openat => regs[libc::REG_RSI as usize],
        libc::SYS_open => regs[libc::REG_RDI as usize],
        _ => return 0,
    } as *const u8;
    if ptr.is_null() {
        return 0;
    }
    let mut n = 0;
    while n < out.len() {
        // SAFETY: the C library passed this NUL-terminated path to the kernel a moment
        // ago; it is read up to its NUL or 120 bytes.
        let b = unsafe { *ptr.add(n) };
        if b == 0 {
            break;
        }
        out[n] = b;
        n += 1;
    }
    n
}

/// SIGSYS: a thread made a call its filter forbids. Say which, and end the process.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    use std::io::Write;
    // For SIGSYS the kernel fills si_code, then (after the 16-byte header) the
    // calling address and, at offset 24, the system call number.
    // SAFETY: the kernel passes a valid siginfo_t of at least 128 bytes.
    let (code, nr) = unsafe { ((*info).si_code, *(info as *const u8).add(24).cast::<i32>()) };
    let mut name = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into the buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    let len = name.iter().position(|&b| b == 0).unwrap_or(16);
    let thread = std::str::from_utf8(&name[..len]).unwrap_or("?");
    let mut path = [0u8; 120];
    // SAFETY: `ctx` is what the kernel passed with this SIGSYS.
    let plen = unsafe { opened_path(nr.into(), ctx, &mut path) };
    let path = std::str::from_utf8(&path[..plen]).unwrap_or("?");
    let mut buf = [0u8; 512];
    let mut out = &mut buf[..];
    const SYS_SECCOMP: i32 = 1;
    let _ = if code == SYS_SECCOMP {
        writeln!(
            out,
            "tandem: seccomp: thread '{thread}' made system call {nr} ({}){}{}{}, which its \
             filter forbids; the VMM stops (exit status {EXIT_STATUS}; --seccomp log lets such \
             calls through and logs them)",
            call_name(nr.into()).unwrap_or("unnamed"),
            if plen > 0 { " on \"" } else { "" },
            path,
            if plen > 0 { "\"" } else { "" },
        )
    } else {
        writeln!(out, "tandem: thread '{thread}' got SIGSYS; the VMM stops")
    };
    let left = out.len();
    let n = buf.len() - left;
    // SAFETY: write and _exit are async-signal-safe; buf holds n initialised bytes.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), n);
        libc::_exit(EXIT_STATUS);
    }
}

#[cfg(test)]
mod tests;
