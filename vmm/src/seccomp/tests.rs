use super::*;
use std::process::{Command, Stdio};

const CHILD: &str = "TANDEM_SECCOMP_CHILD";

fn kind_named(name: &str) -> ThreadKind {
    match name {
        "control" => ThreadKind::Control,
        "vcpu" => ThreadKind::Vcpu,
        "net" => ThreadKind::NetWorker,
        "api" => ThreadKind::Api,
        "serial" => ThreadKind::Serial,
        "migration" => ThreadKind::Migration,
        _ => panic!("no thread kind {name}"),
    }
}

/// Make one system call by name; returns what it returned.
fn call(name: &str) -> i64 {
    // SAFETY: plain system calls on descriptors that do not exist (-1) or on a
    // fresh one, with valid NUL-terminated strings and pointers; a clone child
    // exits at once; the results are only printed.
    unsafe {
        match name {
            "none" => 0,
            "socket" => libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0).into(),
            "openat" => libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY).into(),
            "execve" => {
                let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
                let envp = [std::ptr::null()];
                libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), envp.as_ptr()).into()
            }
            "mmap-exec" => libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            ) as i64,
            "fork" => {
                let pid = libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0);
                if pid == 0 {
                    libc::_exit(0);
                }
                pid
            }
            // Enough small blocks that, freed last to first, this thread's malloc heap
            // (an arena of its own, not the main one) shrinks.
            "heap-trim" => {
                let blocks: Vec<Box<[u8; 4096]>> = (0..2048).map(|_| Box::new([1; 4096])).collect();
                let sum: i64 = blocks.iter().map(|b| i64::from(b[100])).sum();
                for b in blocks.into_iter().rev() {
                    drop(b);
                }
                sum
            }
            "getfd" => libc::fcntl(2, libc::F_GETFD).into(),
            "dupfd" => libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 0).into(),
            "tiocsti" => {
                let c = b'x';
                libc::ioctl(-1, libc::TIOCSTI, &c).into()
            }
            // KVM_RUN
            "kvm-ioctl" => libc::ioctl(-1, 0xae80, 0).into(),
            "ptrace" => libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0),
            _ => panic!("no call {name}"),
        }
    }
}

/// Not a test of its own: the body of the process the tests below start. With
/// `TANDEM_SECCOMP_CHILD=MODE:KIND:CALL`, a thread named like one of KIND
/// installs KIND's filter, makes a few calls every thread makes, then CALL.
#[test]
#[ignore = "run by the other tests in a process of its own"]
fn child() {
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    let parts: Vec<&str> = spec.split(':').collect();
    let mode = match parts[0] {
        "on" => Mode::On,
        "log" => Mode::Log,
        m => panic!("no mode {m}"),
    };
    let (kind, name) = (kind_named(parts[1]), parts[2].to_string());
    init(mode).expect("seccomp init");
    std::thread::Builder::new()
        .name(format!("{}0", parts[1]))
        .spawn(move || {
            sandbox::enter(kind);
            // What any thread does: allocate, map memory, log, sleep, time.
            let v: Vec<u8> = vec![7; 1 << 22];
            assert_eq!(v[12345], 7);
            std::thread::sleep(std::time::Duration::from_millis(1));
            let _ = std::time::Instant::now();
            let _ = std::collections::HashMap::<u8, u8>::new();
            eprintln!("everyday calls went through");
            let r = call(&name);
            eprintln!("{name} returned {r}");
        })
        .expect("spawn")
        .join()
        .expect("join");
}

/// Run [`child`] in a process of its own; its exit code and stderr.
fn run_child(mode: &str, kind: &str, call: &str) -> (Option<i32>, String) {
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--ignored",
            "--exact",
            "seccomp::tests::child",
            "--nocapture",
        ])
        .env(CHILD, format!("{mode}:{kind}:{call}"))
        .stdin(Stdio::null())
        .output()
        .expect("run the test binary");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[track_caller]
fn assert_forbidden(kind: &str, call: &str, shown_as: &str) {
    let (code, err) = run_child("on", kind, call);
    assert!(
        err.contains("everyday calls went through"),
        "{kind}: the everyday calls were stopped: {err}"
    );
    assert_eq!(code, Some(EXIT_STATUS), "{kind} {call}: {err}");
    let want = format!("tandem: seccomp: thread '{kind}0' made system call");
    assert!(err.contains(&want), "{kind} {call}: {err}");
    assert!(
        err.contains(&format!("({shown_as})")) && err.contains("which its filter forbids"),
        "{err}"
    );
    // What a thread tried to open tells which code did it.
    if call == "openat" {
        assert!(err.contains("(openat) on \"/dev/null\", which"), "{err}");
    }
    assert!(!err.contains(" returned "), "{kind} {call}: {err}");
}

/// glibc opens /proc/sys/vm/overcommit_memory the first time a thread's own heap
/// shrinks, in whichever thread that is: it once killed the API server's helper in
/// the middle of a migration. `init` sets malloc so that no heap ever shrinks.
#[test]
fn a_heap_that_shrinks_needs_no_file() {
    for kind in ["api", "vcpu", "net"] {
        let (code, err) = run_child("on", kind, "heap-trim");
        assert_eq!(code, Some(0), "{kind}: {err}");
        assert!(err.contains("heap-trim returned 2048"), "{kind}: {err}");
    }
}

#[test]
fn a_forbidden_call_ends_the_vmm_naming_thread_and_call() {
    for (kind, call, shown) in [
        ("control", "execve", "execve"),
        ("control", "ptrace", "ptrace"),
        ("control", "tiocsti", "ioctl"),
        ("vcpu", "socket", "socket"),
        ("vcpu", "openat", "openat"),
        ("vcpu", "execve", "execve"),
        ("vcpu", "mmap-exec", "mmap"),
        ("vcpu", "fork", "clone"),
        ("vcpu", "tiocsti", "ioctl"),
        ("net", "kvm-ioctl", "ioctl"),
        ("net", "socket", "socket"),
        ("net", "openat", "openat"),
        ("net", "dupfd", "fcntl"),
        ("api", "openat", "openat"),
        // No threads either (glibc makes them with every signal blocked, so a
        // forbidden clone3 kills the process without the handler's message).
        ("api", "fork", "clone"),
        ("api", "kvm-ioctl", "ioctl"),
        ("serial", "socket", "socket"),
        ("serial", "kvm-ioctl", "ioctl"),
        ("migration", "openat", "openat"),
        ("migration", "execve", "execve"),
    ] {
        assert_forbidden(kind, call, shown);
    }
}

#[test]
fn allowed_calls_go_through() {
    for (kind, call) in [
        ("control", "openat"),
        ("control", "socket"),
        ("control", "kvm-ioctl"),
        ("vcpu", "kvm-ioctl"),
        ("migration", "socket"),
        ("migration", "kvm-ioctl"),
        ("net", "getfd"),
        ("api", "none"),
        ("serial", "openat"),
    ] {
        let (code, err) = run_child("on", kind, call);
        assert_eq!(code, Some(0), "{kind} {call}: {err}");
        assert!(
            err.contains(&format!("{call} returned")),
            "{kind} {call}: {err}"
        );
    }
}

#[test]
fn log_mode_lets_a_forbidden_call_through() {
    let (code, err) = run_child("log", "vcpu", "socket");
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("socket returned"), "{err}");
    assert!(!err.contains("tandem: seccomp"), "{err}");
}

/// A thread's filters bind the threads it starts: what a child kind may do, its
/// parent kind must allow too.
#[test]
fn a_parent_kind_allows_what_its_children_do() {
    let superset = |parent: ThreadKind, child: ThreadKind| {
        let (p, c) = (rules(parent).expect("rules"), rules(child).expect("rules"));
        for (nr, rule) in &c {
            let name = call_name(*nr).unwrap_or("?");
            match (p.get(nr), rule) {
                (None, _) => panic!("{parent:?} forbids {name}, which {child:?} makes"),
                (Some(Some(_)), None) => {
                    panic!("{parent:?} allows only some {name} calls; {child:?} any")
                }
                (Some(Some(pr)), Some(cr)) => {
                    for r in cr {
                        assert!(
                            pr.contains(r),
                            "{parent:?} lacks a {name} rule of {child:?}"
                        );
                    }
                }
                (Some(None), _) => {}
            }
        }
    };
    for k in KINDS {
        superset(ThreadKind::Control, k);
    }
    superset(ThreadKind::Vcpu, ThreadKind::NetWorker);
}

/// Merged kinds share rules; each must be in a list once, and a vCPU's and the
/// control loop's ioctl rules must start with KVM's class (KVM_RUN runs through
/// both on every vCPU exit).
#[test]
fn rules_are_not_repeated_and_kvm_ioctls_come_first() {
    let kvm = cond(1, IOCTL_KVM.0, IOCTL_KVM.1).expect("rule");
    for k in KINDS {
        for (nr, list) in rules(k).expect("rules") {
            let list = list.unwrap_or_default();
            for (i, r) in list.iter().enumerate() {
                assert!(
                    !list[..i].contains(r),
                    "{k:?}: a {} rule twice",
                    call_name(nr).unwrap_or("?")
                );
            }
            if nr == libc::SYS_ioctl && matches!(k, ThreadKind::Vcpu | ThreadKind::Control) {
                assert_eq!(list.first(), Some(&kvm), "{k:?}");
            }
        }
    }
}

#[test]
fn every_call_in_a_list_has_its_name() {
    for k in KINDS {
        for nr in rules(k).expect("rules").keys() {
            assert!(call_name(*nr).is_some(), "{k:?}: call {nr} has no name");
        }
        program(k, Mode::On).expect("compiles");
        program(k, Mode::Log).expect("compiles");
    }
}
