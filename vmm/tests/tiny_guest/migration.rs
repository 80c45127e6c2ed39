//! Live migration of a tiny guest, there and back, and a waiting destination.

use super::*;

/// A guest printing the alphabet over and over (`al` carries the letter), slowly.
fn alphabet_guest() -> Vec<u8> {
    let a = Asm::default().mov_dx(0x3f8).mov_al(b'a');
    let top = a.here();
    a.out()
        .raw(&[0xfe, 0xc0]) // inc al
        .raw(&[0x3c, b'z' + 1]) // cmp al, 'z' + 1
        .raw(&[0x75, 0x02]) // jne +2
        .mov_al(b'a')
        .raw(&[0xb9, 0x00, 0x00, 0x08, 0x00]) // mov ecx, 0x80000
        .raw(&[0xe2, 0xfe]) // loop $
        .jmp_to(top)
        .0
}

/// The letters a migrated alphabet guest printed must follow each other with no
/// restart and no gap, across every log in order.
fn assert_one_alphabet(logs: &[&[u8]]) {
    let all: Vec<u8> = logs.iter().flat_map(|l| l.iter().copied()).collect();
    assert!(
        all.len() > 10,
        "too little output: {:?}",
        String::from_utf8_lossy(&all)
    );
    for w in all.windows(2) {
        let next = if w[0] == b'z' { b'a' } else { w[0] + 1 };
        assert_eq!(
            w[1],
            next,
            "the sequence broke: {}",
            String::from_utf8_lossy(&all)
        );
    }
}

fn log_len(p: &Path) -> usize {
    std::fs::metadata(p).map(|m| m.len() as usize).unwrap_or(0)
}

fn wait_growth(p: &Path, what: &str) {
    let n = log_len(p);
    let deadline = Instant::now() + Duration::from_secs(20);
    while log_len(p) <= n + 3 {
        assert!(
            Instant::now() < deadline,
            "{what}: the guest's output stopped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `tandem run` of `kernel` with its console in the file `log` and the API on `api`,
/// once that exists.
fn source(kernel: &Path, log: &Path, api: &Path) -> Running {
    let child = tandem(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--serial",
        &format!("file={}", log.display()),
        "--api-socket",
        api.to_str().unwrap(),
    ])
    .stdout(Stdio::null())
    .spawn()
    .unwrap();
    let r = Running(child);
    wait_for(api);
    r
}

/// `tandem run --incoming unix:PATH` with its console in a file and its API socket.
fn destination(dir: &Scratch, name: &str, extra: &[&str]) -> (Running, PathBuf, PathBuf, PathBuf) {
    let url = dir.path(&format!("{name}.mig"));
    let log = dir.path(&format!("{name}.log"));
    let api_sock = dir.path(&format!("{name}.api"));
    let mut args = vec![
        "run".to_string(),
        "--incoming".into(),
        format!("unix:{}", url.display()),
        "--serial".into(),
        format!("file={}", log.display()),
        "--api-socket".into(),
        api_sock.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let child = tandem(&args).stdout(Stdio::null()).spawn().unwrap();
    let r = Running(child);
    wait_for(&url);
    (r, url, log, api_sock)
}

/// Round `round` of a series: a fresh destination `d<round>`, and the guest sent to it
/// from the VMM at `api_sock`, which must succeed. Returns the destination, its console
/// log and API socket, and what `send-migration` printed.
fn migrate_round(
    dir: &Scratch,
    api_sock: &Path,
    round: usize,
) -> (Running, PathBuf, PathBuf, String) {
    let (dest, url, log, dest_api) = destination(dir, &format!("d{round}"), &[]);
    let out = send_migration(api_sock, &url);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "round {round}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (dest, log, dest_api, stdout)
}

fn send_migration(api_sock: &Path, url: &Path) -> Output {
    run_bounded(
        tandem(&[
            "remote",
            "--api-socket",
            api_sock.to_str().unwrap(),
            "send-migration",
            &format!("unix:{}", url.display()),
        ]),
        Duration::from_secs(60),
    )
}

/// A running guest moves to another Tandem and back, three times: its registers,
/// memory and console carry on where they were (the alphabet goes on without a
/// restart or a gap), each source exits 0, and the CLI prints the progress and the
/// result. Failures first: a destination that is not there, and one that refuses (a
/// NIC the source does not have): each leaves the guest running on the source. Last,
/// the guest reboots where it landed, from the kernel the first source booted: the
/// file is deleted from disk once that source has started, so only the bytes that
/// travelled with the guest can boot it.
#[test]
fn live_migration_there_and_back() {
    let dir = Scratch::new("migrate");
    let k = dir.kernel(&alphabet_guest());
    let mut logs = vec![dir.path("a.log")];
    let mut api_sock = dir.path("a.api");
    let mut source = source(&k, &logs[0], &api_sock);
    wait_growth(&logs[0], "boot");
    std::fs::remove_file(&k).unwrap();

    // Nobody listening: the source keeps the guest.
    let out = send_migration(&api_sock, &dir.path("nobody.mig"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach") && err.contains("runs on here"),
        "{err}"
    );
    wait_growth(&logs[0], "after a migration to nowhere");

    // A destination that refuses before any memory moves.
    let (mut refusing, url, _, _) =
        destination(&dir, "refuses", &["--net", "id=net7,tap=nosuchtap"]);
    let out = send_migration(&api_sock, &url);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no NIC with this id"), "{err}");
    let st = refusing.0.wait().unwrap();
    assert!(!st.success(), "the refusing destination exits non-zero");
    wait_growth(&logs[0], "after a refused migration");

    for round in 0..3 {
        let (dest, log, dest_api, stdout) = migrate_round(&dir, &api_sock, round);
        assert!(
            stdout.contains("migration to unix:") && stdout.contains("completed in"),
            "{stdout}"
        );
        let st = source.0.wait().unwrap();
        assert!(st.success(), "round {round}: the source exits 0 ({st})");
        logs.push(log);
        wait_growth(logs.last().unwrap(), "on the destination");
        source = dest;
        api_sock = dest_api;
    }
    let (st, info) = api(&api_sock, "GET", "/api/v1/vm.info", "");
    assert_eq!(st, 200, "{info}");
    assert!(
        info.contains(&format!("\"kernel\":\"{}\"", k.display())),
        "the destination names the kernel the guest booted from: {info}"
    );
    let (st, body) = api(&api_sock, "PUT", "/api/v1/vm.reboot", "");
    assert!(st < 300, "reboot on the destination: {st} {body}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, info) = api(&api_sock, "GET", "/api/v1/vm.info", "");
        if info.contains("\"state\":\"running\"") && info.contains("\"boots\":2") {
            break;
        }
        assert!(Instant::now() < deadline, "no second boot: {info}");
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..3 {
        wait_growth(logs.last().unwrap(), "after a reboot on the destination");
    }
    let (st, _) = api(&api_sock, "PUT", "/api/v1/vm.shutdown", "");
    assert!(st < 300);
    let _ = source.0.wait();
    let mut contents: Vec<Vec<u8>> = logs.iter().map(|l| std::fs::read(l).unwrap()).collect();
    // The reboot starts the alphabet afresh: the migrated run ends where it breaks.
    if let Some(last) = contents.last_mut() {
        let (before, after) = split_at_restart(last);
        assert!(after.len() > 3, "too little output after the reboot");
        assert_one_alphabet(&[&after]);
        *last = before;
    }
    let refs: Vec<&[u8]> = contents.iter().map(Vec::as_slice).collect();
    assert_one_alphabet(&refs);
}

/// An alphabet log cut where the sequence restarts (or, should the restart happen to
/// follow a 'z', before its last 26 letters, which are of the new run either way).
fn split_at_restart(log: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let at = log
        .windows(2)
        .position(|w| w[1] != if w[0] == b'z' { b'a' } else { w[0] + 1 })
        .map_or(log.len().saturating_sub(26), |i| i + 1);
    (log[..at].to_vec(), log[at..].to_vec())
}

/// A destination still waiting for its source ends on SIGTERM, with the reason.
#[test]
fn a_waiting_destination_ends_on_sigterm() {
    let dir = Scratch::new("incoming-term");
    let url = dir.path("wait.mig");
    let child = tandem(&[
        "run",
        "--incoming",
        &format!("unix:{}", url.display()),
        "--serial",
        "off",
    ])
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut r = Running(child);
    wait_for(&url);
    let st = Command::new("kill")
        .args(["-TERM", &r.0.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = r.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "still waiting 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(r.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("stopped by a signal"), "{err}");
    assert!(!url.exists(), "the socket is removed");
}

/// A guest that reads its KVM clock (kvmclock: the clock a Linux guest keeps time with
/// here) in a tight loop and prints each step between two readings of 2 ms or more as
/// `g` and the step in nanoseconds (16 hex digits); then it reads the clock afresh, so
/// its own printing is not counted. Assembled with `as --64` from:
///
/// ```text
///     .code64
///     .set PV, 0x4000
///     .set THRESH, 2000000
///     .macro NOW
///     1:  mov PV, %esi
///         test $1, %esi
///         jnz 1b
///         lfence
///         rdtsc
///         shl $32, %rdx
///         or %rdx, %rax
///         sub PV+8, %rax
///         movsbl PV+28, %ecx
///         test %ecx, %ecx
///         js 2f
///         shl %cl, %rax
///         jmp 3f
///     2:  neg %ecx
///         shr %cl, %rax
///     3:  mov PV+24, %edi
///         mul %rdi
///         shrd $32, %rdx, %rax
///         add PV+16, %rax
///         cmp PV, %esi
///         jne 1b
///     .endm
///     start:
///         mov $0x4b564d01, %ecx
///         mov $(PV | 1), %eax
///         xor %edx, %edx
///         wrmsr
///         NOW
///         mov %rax, %r14
///     top:
///         NOW
///         mov %rax, %rbx
///         sub %r14, %rbx
///         mov %rax, %r14
///         cmp $THRESH, %rbx
///         jb top
///         mov $0x3f8, %dx
///         mov $'g', %al
///         out %al, %dx
///         mov $16, %r8d
///     4:  rol $4, %rbx
///         mov %ebx, %eax
///         and $0xf, %eax
///         cmp $10, %eax
///         jb 5f
///         add $('a'-'0'-10), %eax
///     5:  add $'0', %eax
///         out %al, %dx
///         dec %r8d
///         jnz 4b
///         mov $'\n', %al
///         out %al, %dx
///         NOW
///         mov %rax, %r14
///         jmp top
/// ```
const CLOCK_STEPS_GUEST: &[u8] = &[
    0xb9, 0x01, 0x4d, 0x56, 0x4b, 0xb8, 0x01, 0x40, 0x00, 0x00, 0x31, 0xd2, 0x0f, 0x30, 0x8b, 0x34,
    0x25, 0x00, 0x40, 0x00, 0x00, 0xf7, 0xc6, 0x01, 0x00, 0x00, 0x00, 0x75, 0xf1, 0x0f, 0xae, 0xe8,
    0x0f, 0x31, 0x48, 0xc1, 0xe2, 0x20, 0x48, 0x09, 0xd0, 0x48, 0x2b, 0x04, 0x25, 0x08, 0x40, 0x00,
    0x00, 0x0f, 0xbe, 0x0c, 0x25, 0x1c, 0x40, 0x00, 0x00, 0x85, 0xc9, 0x78, 0x05, 0x48, 0xd3, 0xe0,
    0xeb, 0x05, 0xf7, 0xd9, 0x48, 0xd3, 0xe8, 0x8b, 0x3c, 0x25, 0x18, 0x40, 0x00, 0x00, 0x48, 0xf7,
    0xe7, 0x48, 0x0f, 0xac, 0xd0, 0x20, 0x48, 0x03, 0x04, 0x25, 0x10, 0x40, 0x00, 0x00, 0x3b, 0x34,
    0x25, 0x00, 0x40, 0x00, 0x00, 0x75, 0xa7, 0x49, 0x89, 0xc6, 0x8b, 0x34, 0x25, 0x00, 0x40, 0x00,
    0x00, 0xf7, 0xc6, 0x01, 0x00, 0x00, 0x00, 0x75, 0xf1, 0x0f, 0xae, 0xe8, 0x0f, 0x31, 0x48, 0xc1,
    0xe2, 0x20, 0x48, 0x09, 0xd0, 0x48, 0x2b, 0x04, 0x25, 0x08, 0x40, 0x00, 0x00, 0x0f, 0xbe, 0x0c,
    0x25, 0x1c, 0x40, 0x00, 0x00, 0x85, 0xc9, 0x78, 0x05, 0x48, 0xd3, 0xe0, 0xeb, 0x05, 0xf7, 0xd9,
    0x48, 0xd3, 0xe8, 0x8b, 0x3c, 0x25, 0x18, 0x40, 0x00, 0x00, 0x48, 0xf7, 0xe7, 0x48, 0x0f, 0xac,
    0xd0, 0x20, 0x48, 0x03, 0x04, 0x25, 0x10, 0x40, 0x00, 0x00, 0x3b, 0x34, 0x25, 0x00, 0x40, 0x00,
    0x00, 0x75, 0xa7, 0x48, 0x89, 0xc3, 0x4c, 0x29, 0xf3, 0x49, 0x89, 0xc6, 0x48, 0x81, 0xfb, 0x80,
    0x84, 0x1e, 0x00, 0x72, 0x95, 0x66, 0xba, 0xf8, 0x03, 0xb0, 0x67, 0xee, 0x41, 0xb8, 0x10, 0x00,
    0x00, 0x00, 0x48, 0xc1, 0xc3, 0x04, 0x89, 0xd8, 0x83, 0xe0, 0x0f, 0x83, 0xf8, 0x0a, 0x72, 0x03,
    0x83, 0xc0, 0x27, 0x83, 0xc0, 0x30, 0xee, 0x41, 0xff, 0xc8, 0x75, 0xe6, 0xb0, 0x0a, 0xee, 0x8b,
    0x34, 0x25, 0x00, 0x40, 0x00, 0x00, 0xf7, 0xc6, 0x01, 0x00, 0x00, 0x00, 0x75, 0xf1, 0x0f, 0xae,
    0xe8, 0x0f, 0x31, 0x48, 0xc1, 0xe2, 0x20, 0x48, 0x09, 0xd0, 0x48, 0x2b, 0x04, 0x25, 0x08, 0x40,
    0x00, 0x00, 0x0f, 0xbe, 0x0c, 0x25, 0x1c, 0x40, 0x00, 0x00, 0x85, 0xc9, 0x78, 0x05, 0x48, 0xd3,
    0xe0, 0xeb, 0x05, 0xf7, 0xd9, 0x48, 0xd3, 0xe8, 0x8b, 0x3c, 0x25, 0x18, 0x40, 0x00, 0x00, 0x48,
    0xf7, 0xe7, 0x48, 0x0f, 0xac, 0xd0, 0x20, 0x48, 0x03, 0x04, 0x25, 0x10, 0x40, 0x00, 0x00, 0x3b,
    0x34, 0x25, 0x00, 0x40, 0x00, 0x00, 0x75, 0xa7, 0x49, 0x89, 0xc6, 0xe9, 0x0a, 0xff, 0xff, 0xff,
];

/// The steps a clock-steps guest printed, in ms: whole lines only (the guest may be
/// in the middle of one).
fn clock_steps(log: &[u8]) -> Vec<f64> {
    String::from_utf8_lossy(log)
        .split_inclusive('\n')
        .filter_map(|l| l.strip_suffix('\n')?.strip_prefix('g'))
        .filter(|h| h.len() == 16)
        .filter_map(|h| u64::from_str_radix(h, 16).ok())
        .map(|ns| ns as f64 / 1e6)
        .collect()
}

fn median_range(v: &[f64]) -> String {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    format!("{:.1} ({:.1}-{:.1})", s[s.len() / 2], s[0], s[s.len() - 1])
}

/// The pause a migrated guest sees on its own clock is the downtime Tandem reports:
/// the guest's KVM clock counts the whole downtime (the source reads it with the host's
/// real time, the destination sets it with `KVM_CLOCK_REALTIME`), so a guest's timers
/// and timeouts see the world's time. On this host's KVM, without the nested test host's
/// outer emulator, the two figures can be set side by side: each migration prints
/// Tandem's downtime, the step the guest's clock made, and their difference (a figure,
/// not a pass mark: what the test fails on is a clock that did not count the pause).
/// `TANDEM_DOWNTIME_RUNS` sets how many migrations (default 3).
#[test]
fn the_guest_clock_counts_the_downtime() {
    let runs: usize = std::env::var("TANDEM_DOWNTIME_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dir = Scratch::new("clock");
    let k = dir.kernel(CLOCK_STEPS_GUEST);
    let log = dir.path("a.log");
    let mut api_sock = dir.path("a.api");
    let mut source = source(&k, &log, &api_sock);
    std::thread::sleep(Duration::from_millis(300));
    let (mut reported, mut seen) = (Vec::new(), Vec::new());
    for round in 0..runs {
        let (dest, log, dest_api, stdout) = migrate_round(&dir, &api_sock, round);
        // The result's line is the last to name a downtime (progress lines estimate it).
        let downtime: f64 = stdout
            .rsplit("downtime ")
            .next()
            .and_then(|r| r.split(" ms").next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no downtime in {stdout}"));
        assert!(source.0.wait().unwrap().success());
        // The first step the guest prints on the destination spans the migration.
        let deadline = Instant::now() + Duration::from_secs(5);
        let step = loop {
            if let Some(&s) = clock_steps(&std::fs::read(&log).unwrap_or_default()).first() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: the guest's clock made no step of 2 ms or more across a {downtime} ms downtime"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        eprintln!(
            "round {round}: downtime {downtime:.0} ms as Tandem reports it; the guest's clock stepped {step:.1} ms ({:+.1} ms)",
            step - downtime
        );
        // Tandem's figure brackets the guest's pause: it runs from the source's request
        // to stop the vCPUs to the destination's word that they run, each a few ms
        // after the guest's last and first readings on a loaded host. A clock that did
        // not count the downtime would step only by what passed before the source read
        // it, a small part of it.
        assert!(
            step * 4.0 >= downtime,
            "round {round}: the guest's clock stepped {step:.1} ms across a {downtime} ms downtime: it lost time"
        );
        reported.push(downtime);
        seen.push(step);
        source = dest;
        api_sock = dest_api;
    }
    let diff: Vec<f64> = seen.iter().zip(&reported).map(|(s, r)| s - r).collect();
    eprintln!(
        "{runs} migrations, median (min-max): downtime as Tandem reports it {} ms; the step the guest's clock made {} ms; difference {} ms",
        median_range(&reported),
        median_range(&seen),
        median_range(&diff)
    );
    let (st, _) = api(&api_sock, "PUT", "/api/v1/vm.shutdown", "");
    assert!(st < 300);
    let _ = source.0.wait();
}
