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
    let child = tandem(&[
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--serial",
        &format!("file={}", logs[0].display()),
        "--api-socket",
        api_sock.to_str().unwrap(),
    ])
    .stdout(Stdio::null())
    .spawn()
    .unwrap();
    let mut source = Running(child);
    wait_for(&api_sock);
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
        let name = format!("d{round}");
        let (dest, url, log, dest_api) = destination(&dir, &name, &[]);
        let out = send_migration(&api_sock, &url);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "round {round}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
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
