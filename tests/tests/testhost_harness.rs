//! The test host's own failure handling, on a real L1: jobs run one after another in one
//! L1 and report their status and output; a stalled L1 is woken; a job that kills L1, an
//! L1 that freezes and a job that overruns each fail that job by name with the logs kept;
//! the shared test host boots a fresh L1 for the job after a broken one, or after one
//! that passed but lost L1's uplink.

use std::time::Duration;

use harness::testhost::{self, monitor_command, Session, TestHost};

fn sh(cmd: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), cmd.into()]
}

#[test]
fn testhost_survives_broken_jobs() {
    // Jobs in one L1: status, output, each in its own network namespace.
    let host = TestHost::new("harness-jobs");
    let mut s = Session::boot(&host).expect("boot L1");
    let o = s
        .run_job("first", &sh("echo hello-$((6*7)); ip -br link show br0"))
        .expect("first job");
    assert_eq!(o.status, 0, "{}", o.output);
    assert!(o.output.contains("hello-42"), "{}", o.output);
    assert!(
        o.output.contains("br0"),
        "the job's namespace has br0: {}",
        o.output
    );
    // The watchdog's second wake-up, a key press through QEMU's monitor, reaches L1 as a
    // device interrupt (its i8042 keyboard's IRQ 1).
    let keyboard_irqs = |s: &mut Session| -> u64 {
        let o = s
            .run_job(
                "keyboard-irqs",
                &sh("awk '$1 == \"1:\" { print $2 }' /proc/interrupts"),
            )
            .expect("keyboard interrupts");
        o.output.trim().parse().unwrap_or_else(|_| {
            panic!(
                "no keyboard interrupt line in L1's /proc/interrupts: {:?}",
                o.output
            )
        })
    };
    let before = keyboard_irqs(&mut s);
    monitor_command(s.monitor_path(), "sendkey ctrl");
    std::thread::sleep(Duration::from_millis(500));
    let after = keyboard_irqs(&mut s);
    assert!(
        after > before,
        "a key press is an interrupt in L1: {before} -> {after}"
    );
    // A tap left behind by a job goes with the job's namespace.
    let o = s
        .run_job(
            "leaves-a-tap",
            &sh("ip tuntap add dev tdleft mode tap && exit 3"),
        )
        .expect("second job");
    assert_eq!(o.status, 3, "a job's exit status comes back: {}", o.output);
    assert!(s.is_alive(), "a failing job leaves L1 alive");
    let o = s
        .run_job(
            "after",
            &sh("ip link show tdleft && echo LEAKED; ls /sys/class/net"),
        )
        .expect("third job");
    assert!(
        !o.output.contains("LEAKED"),
        "the last job's tap leaked: {}",
        o.output
    );
    // A job that kills L1 (kernel crash; L1 boots panic=-1 and QEMU -no-reboot).
    let e = s
        .run_job("crasher", &sh("echo c > /proc/sysrq-trigger; sleep 30"))
        .expect_err("a job that crashes L1 is an error")
        .to_string();
    assert!(e.contains("crasher") && e.contains("test host"), "{e}");
    assert!(!s.is_alive());
    let workdir = s.workdir().to_path_buf();
    drop(s);
    assert!(
        workdir.join("l1-console.log").exists(),
        "logs kept after L1 died: {e}"
    );
    let _ = std::fs::remove_dir_all(&workdir);

    // L1 stalls (its CPU stopped through QEMU's monitor): the watchdog saves its
    // registers and wakes it, and the job goes on. A key press, the first kick, does not
    // start a stopped CPU; stop/cont, the second, does.
    let mut host = TestHost::new("harness-stall");
    host.stall_kick = Some(Duration::from_secs(10));
    let mut s = Session::boot(&host).expect("boot L1");
    let monitor = s.monitor_path().to_path_buf();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        monitor_command(&monitor, "stop")
    });
    let o = s
        .run_job("stalled", &sh("sleep 16; echo still-here"))
        .expect("a stalled L1 that wakes is no error");
    let _ = stopper.join();
    assert!(o.output.contains("still-here"), "{}", o.output);
    assert_eq!(s.stalls().len(), 1, "{:?}", s.stalls());
    assert!(
        s.stalls()[0].contains("a key press, then stop/cont"),
        "{:?}",
        s.stalls()
    );
    let regs =
        std::fs::read_to_string(s.workdir().join("l1-registers-stall-1.txt")).unwrap_or_default();
    assert!(
        regs.contains("RIP="),
        "L1's registers at the stall are saved: {regs:?}"
    );
    let workdir = s.workdir().to_path_buf();
    drop(s);
    let _ = std::fs::remove_dir_all(&workdir);

    // Without the wake-up, a stopped L1 is a freeze: no heartbeat, registers saved.
    let mut host = TestHost::new("harness-freeze");
    host.freeze_timeout = Duration::from_secs(12);
    host.stall_kick = None;
    let mut s = Session::boot(&host).expect("boot L1");
    let monitor = s.monitor_path().to_path_buf();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        monitor_command(&monitor, "stop")
    });
    let e = s
        .run_job("frozen", &sh("sleep 300"))
        .expect_err("a frozen L1 is an error");
    // Guest tests run once more on a fresh L1 after exactly this kind of error.
    assert!(testhost::is_l1_fault(&e), "{e}");
    let e = e.to_string();
    let _ = stopper.join();
    assert!(e.contains("froze") && e.contains("frozen"), "{e}");
    let regs = std::fs::read_to_string(s.workdir().join("l1-registers.txt")).unwrap_or_default();
    assert!(regs.contains("RIP="), "L1's registers are saved: {regs:?}");
    // And what the monitor does not show: the TCG CPU's flags, found in the outer
    // QEMU's memory from those registers, and its threads by name.
    assert!(
        regs.contains("CPU state at")
            && regs.contains("hflags2=")
            && regs.contains("interrupt_request=0x"),
        "L1's TCG flags are read: {regs}"
    );
    assert!(
        regs.contains("CPU 0/TCG"),
        "the outer QEMU's threads: {regs}"
    );
    // (strace comes with scripts/setup; a stopped QEMU's main loop may make none.)
    assert!(
        regs.contains("system calls of thread") && !regs.contains("not counted"),
        "what the outer QEMU's main loop does: {regs}"
    );
    let workdir = s.workdir().to_path_buf();
    drop(s);
    let _ = std::fs::remove_dir_all(&workdir);

    // A job that overruns while L1 is fine: a hang, not a freeze.
    let mut host = TestHost::new("harness-overrun");
    host.job_timeout = Duration::from_secs(12);
    let mut s = Session::boot(&host).expect("boot L1");
    let e = s
        .run_job("sleeper", &sh("sleep 300"))
        .expect_err("an overrun is an error")
        .to_string();
    assert!(
        e.contains("hung") && e.contains("heartbeat goes on") && e.contains("sleeper"),
        "{e}"
    );
    let workdir = s.workdir().to_path_buf();
    drop(s);
    let _ = std::fs::remove_dir_all(&workdir);

    // The shared test host: a job that breaks it, then a fresh L1 for the next one.
    let e = testhost::run_shared("breaks-l1", &sh("echo c > /proc/sysrq-trigger; sleep 30"))
        .expect_err("the job that crashed the shared L1 fails")
        .to_string();
    assert!(e.contains("breaks-l1"), "{e}");
    let o =
        testhost::run_shared("next", &sh("cat /proc/uptime")).expect("a fresh L1 for the next job");
    assert_eq!(o.status, 0, "{}", o.output);
    let uptime: f64 = o
        .output
        .split_whitespace()
        .next()
        .and_then(|u| u.parse().ok())
        .unwrap_or(f64::MAX);
    assert!(
        uptime < 120.0,
        "the next job ran in a fresh L1 (uptime {uptime} s)"
    );
    // A job that passes but strands L1's uplink in a namespace that a process outside
    // the job's namespace keeps alive: its result stands, and the
    // next job, which needs the uplink for its bridge, gets a fresh L1.
    // The job waits until that process is in `stray`: until then it is still in the
    // job's namespace, where the harness kills every process when the job ends, and
    // nothing else keeps `stray` alive (its /run/netns mount is made in the job's own
    // mount namespace, which `ip netns exec` keeps from propagating back). Without the
    // wait the uplink sometimes came back and the NO-UPLINK line never came (a CI
    // rehearsal on 2026-12-06).
    let o = testhost::run_shared(
        "strands-uplink",
        &sh(
            "u=$(ip -o link show master br0 | awk -F': ' '$2 != \"br0\" {print $2; exit}'); \
             ip netns add stray && ip link set \"${u%@*}\" netns stray && echo stranded-$u; \
             ip netns exec stray sleep 600 </dev/null >/dev/null 2>&1 & \
             i=0; while [ -z \"$(ip netns pids stray)\" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; \
             [ -n \"$(ip netns pids stray)\" ] && echo kept-alive",
        ),
    )
    .expect("a job that strands the uplink still reports");
    assert_eq!(o.status, 0, "{}", o.output);
    assert!(
        o.output.contains("stranded-")
            && o.output.contains("kept-alive")
            && o.output.contains("TANDEM-L1-NO-UPLINK"),
        "{}",
        o.output
    );
    let o = testhost::run_shared("after-strand", &sh("cat /proc/uptime"))
        .expect("a fresh L1 after the uplink was lost");
    assert_eq!(o.status, 0, "{}", o.output);
    let uptime: f64 = o
        .output
        .split_whitespace()
        .next()
        .and_then(|u| u.parse().ok())
        .unwrap_or(f64::MAX);
    assert!(
        uptime < 120.0,
        "the job after a lost uplink ran in a fresh L1 (uptime {uptime} s)"
    );
    testhost::stop_shared();
}
