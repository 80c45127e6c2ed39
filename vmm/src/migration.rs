//! Live migration: the wire protocol, the source's sender and the destination's
//! receiver.
//!
//! ```text
//! source                                   destination (tandem run --incoming URL)
//!   Hello {version, memory, vCPUs, NICs, CPUID, boot files} ->
//!                                          <- Accept | Refuse {reason}   (checked before any memory)
//!   Boot (the kernel, then the initramfs) ->  (so the guest can reboot there)
//!   Pages (all RAM), then Pages (dirty) per round ... ->
//!   [guest paused] Pages (last dirty) ->
//!   State {vCPUs, irqchip, PIT, clock, devices} ->
//!                                          <- Ready (VM built, not running) | Refuse
//!   Go ->
//!                                          <- Running                    (the guest runs there)
//!   source exits 0
//! ```
//! Every message is a frame: one kind byte, a little-endian u64 length, the body.
//! Bodies are JSON, except Pages: (u64 guest address, u64 length, bytes)* runs, and
//! Boot: one byte naming the file (0 the kernel, 1 the initramfs), then its next bytes.
//! Anything malformed, too long or out of order ends the migration with an error.
//!
//! Until the source has sent Go, it owns the guest: any failure (the destination
//! refused or died, the connection broke, a cancel, the timeout) resumes the guest on
//! the source. The destination runs the guest only on Go.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::events::MigrationProgress;
use devices::virtio::net::NetConfig;
use kvm_bindings::kvm_cpuid_entry2;
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::config::BootFiles;
use crate::memory::GuestMemoryMmap;

pub const PROTOCOL_VERSION: u32 = 4;
/// Largest kernel or initramfs a destination takes.
const MAX_BOOT_FILE: u64 = 2 << 30;
const PAGE: u64 = 4096;
/// Largest frame: a JSON state (vCPU XSAVE areas included) or a run of pages.
const MAX_FRAME: u64 = 64 << 20;
/// Pages per Pages frame.
const CHUNK: u64 = 4 << 20;
static ZERO_PAGE: [u8; PAGE as usize] = [0; PAGE as usize];
/// Pre-copy rounds before the guest is stopped whatever is left.
pub const MAX_ROUNDS: u32 = 30;
/// Dirty pages a stop sends anyway: 1 MiB, a few ms on any link this runs on.
const FEW_PAGES: u64 = 256;
/// How long a converged source keeps the guest running for a destination still
/// opening its passthrough functions (see [`Kind::Prepared`]); after that it stops the
/// guest anyway, and the destination plugs them once they are open.
const PREPARE_WAIT: Duration = Duration::from_secs(30);
/// While the source waits for the destination, a [`Kind::Waiting`] tick this often.
const WAIT_TICK: Duration = Duration::from_millis(200);

/// What the source does after a pre-copy round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    /// Send what is dirty while the guest runs.
    Round,
    /// Stop the guest and send the rest.
    Stop,
    /// Stop it although the rest takes longer than the target: the rounds are used up.
    StopNotConverged,
}

/// After a round that sent `sent` pages, `left` are dirty again and would take
/// `estimate` to send. The guest stops once that fits the target, unless the
/// rounds still pay: the last one at least halved what is dirty and more than
/// [`FEW_PAGES`] are left. Every page a running round takes off is a page off the
/// pause: stopping at the first estimate under the target (what QEMU does) leaves
/// the pause anywhere below it, depending on what the first full copy left dirty.
fn next_step(round: u32, sent: u64, left: u64, estimate: Duration, target: Duration) -> Next {
    if estimate > target {
        return if round >= MAX_ROUNDS {
            Next::StopNotConverged
        } else {
            Next::Round
        };
    }
    let shrinking = left.saturating_mul(2) <= sent;
    if round < MAX_ROUNDS && left > FEW_PAGES && shrinking {
        Next::Round
    } else {
        Next::Stop
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    Hello = 1,
    Accept = 2,
    Refuse = 3,
    Pages = 4,
    State = 5,
    Ready = 6,
    Go = 7,
    Running = 8,
    Abort = 9,
    /// The source is done with memory rounds (the next frame is State).
    MemoryDone = 10,
    Boot = 11,
    /// The source finished a round of pages (its number in the body, 4 bytes LE).
    RoundEnd = 12,
    /// Destination → source, during the rounds: its passthrough functions are open and
    /// guest RAM is mapped for their DMA (JSON [`Prepared`]). A destination that said
    /// in its Accept that it opens some sends it once; the source does not stop the
    /// guest before it, so that the opening and the pinning of guest RAM (seconds for
    /// a big guest) are neither in the downtime nor in the way of the resumed guest.
    Prepared = 13,
    /// The source waits for Prepared, sending nothing else (an empty body): the
    /// destination looks at its functions after every frame.
    Waiting = 14,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Self> {
        use Kind::*;
        [
            Hello, Accept, Refuse, Pages, State, Ready, Go, Running, Abort, MemoryDone, Boot,
            RoundEnd, Prepared, Waiting,
        ]
        .into_iter()
        .find(|k| *k as u8 == v)
    }
}

/// Where to migrate to or from: `tcp:HOST:PORT` or `unix:PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Url {
    Tcp(String),
    Unix(std::path::PathBuf),
}

impl Url {
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(a) = s.strip_prefix("tcp:") {
            // The port in its plain form (no sign, no leading zeros), as openapi.json has it.
            let port_ok = |p: &str| p.parse::<u16>().is_ok_and(|n| n.to_string() == p);
            // A host without spaces or control characters.
            let host_ok = |h: &str| !h.is_empty() && h.chars().all(|c| c > ' ' && c != '\x7f');
            if a.rsplit_once(':')
                .is_none_or(|(h, p)| !host_ok(h) || !port_ok(p))
            {
                return Err(format!(
                    "{s:?}: expected tcp:HOST:PORT (HOST without spaces or control characters, PORT 0 to 65535 without leading zeros)"
                ));
            }
            return Ok(Url::Tcp(a.to_string()));
        }
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() || p.chars().any(|c| c < ' ') {
                return Err(format!(
                    "{s:?}: expected unix:PATH (a PATH without control characters)"
                ));
            }
            return Ok(Url::Unix(p.into()));
        }
        Err(format!(
            "{s:?}: a migration URL is tcp:HOST:PORT or unix:PATH"
        ))
    }

    /// The same URL with its host name looked up (`tcp:1.2.3.4:PORT`). Done on the
    /// control thread: the migration thread's seccomp filter has no room for what
    /// the C library's resolver may do (read its configuration, load NSS modules).
    pub fn resolved(self) -> Result<Self, String> {
        match self {
            Url::Tcp(a) => {
                use std::net::ToSocketAddrs;
                let addr = a
                    .to_socket_addrs()
                    .map_err(|e| format!("tcp:{a}: {e}"))?
                    .next()
                    .ok_or_else(|| format!("tcp:{a}: the host name has no address"))?;
                Ok(Url::Tcp(addr.to_string()))
            }
            unix => Ok(unix),
        }
    }
}

/// A connection either way.
pub trait Stream: Read + Write + Send {
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    fn shutdown(&self);
    /// Whether the other side has sent something (or closed) within `wait`.
    fn has_input(&self, wait: Duration) -> io::Result<bool>;
}

/// A pollfd waiting for input on `fd`.
fn poll_in(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// poll(2) on `fds` for up to `ms` (-1: no limit): how many are ready, None when a
/// signal interrupted the wait.
fn poll_fds(fds: &mut [libc::pollfd], ms: i32) -> io::Result<Option<usize>> {
    // SAFETY: `fds` is a valid slice of pollfd for the duration of the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::Interrupted => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(n as usize))
}

/// [`Stream::has_input`] of a socket.
fn fd_has_input(fd: RawFd, wait: Duration) -> io::Result<bool> {
    let ms = wait.as_millis().min(i32::MAX as u128) as i32;
    Ok(poll_fds(&mut [poll_in(fd)], ms)?.is_some_and(|n| n > 0))
}

impl Stream for std::net::TcpStream {
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
    fn shutdown(&self) {
        let _ = std::net::TcpStream::shutdown(self, std::net::Shutdown::Both);
    }
    fn has_input(&self, wait: Duration) -> io::Result<bool> {
        fd_has_input(self.as_raw_fd(), wait)
    }
}

impl Stream for UnixStream {
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
    fn shutdown(&self) {
        let _ = UnixStream::shutdown(self, std::net::Shutdown::Both);
    }
    fn has_input(&self, wait: Duration) -> io::Result<bool> {
        fd_has_input(self.as_raw_fd(), wait)
    }
}

pub fn connect(url: &Url) -> io::Result<Box<dyn Stream>> {
    Ok(match url {
        Url::Tcp(a) => {
            let s = std::net::TcpStream::connect(a)?;
            s.set_nodelay(true)?;
            Box::new(s)
        }
        Url::Unix(p) => Box::new(UnixStream::connect(p)?),
    })
}

/// Wait until `listener` has a connection, or `stop` (the VMM's signal fd) is
/// readable: SIGTERM or Ctrl-C ends a destination still waiting for its source.
fn wait_readable(listener: RawFd, stop: RawFd) -> io::Result<()> {
    let mut fds = [poll_in(listener), poll_in(stop)];
    loop {
        if poll_fds(&mut fds, -1)?.is_none() {
            continue;
        }
        if fds[1].revents != 0 {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "stopped by a signal while waiting for the source",
            ));
        }
        if fds[0].revents != 0 {
            return Ok(());
        }
    }
}

/// Wait for the one source of an incoming migration (or a signal on `stop`).
pub fn accept(url: &Url, stop: RawFd) -> io::Result<Box<dyn Stream>> {
    Ok(match url {
        Url::Tcp(a) => {
            let l = std::net::TcpListener::bind(a)
                .map_err(|e| io::Error::new(e.kind(), format!("--incoming tcp:{a}: {e}")))?;
            tracing::info!("waiting for a migration on tcp:{a}");
            wait_readable(l.as_raw_fd(), stop)?;
            let (s, peer) = l.accept()?;
            tracing::info!("incoming migration from {peer}");
            s.set_nodelay(true)?;
            Box::new(s)
        }
        Url::Unix(p) => {
            let l = UnixListener::bind(p).map_err(|e| {
                io::Error::new(e.kind(), format!("--incoming unix:{}: {e}", p.display()))
            })?;
            tracing::info!("waiting for a migration on unix:{}", p.display());
            let waited = wait_readable(l.as_raw_fd(), stop);
            let _ = std::fs::remove_file(p);
            waited?;
            let (s, _) = l.accept()?;
            Box::new(s)
        }
    })
}

fn proto(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

pub(crate) fn write_frame(w: &mut dyn Stream, kind: Kind, body: &[u8]) -> io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = kind as u8;
    head[1..].copy_from_slice(&(body.len() as u64).to_le_bytes());
    w.write_all(&head)?;
    w.write_all(body)
}

pub(crate) fn write_json<T: Serialize>(w: &mut dyn Stream, kind: Kind, v: &T) -> io::Result<()> {
    let body = serde_json::to_vec(v).map_err(|e| proto(e.to_string()))?;
    write_frame(w, kind, &body)
}

fn read_frame(r: &mut dyn Stream) -> io::Result<(Kind, Vec<u8>)> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(e.kind(), "the other side closed the connection")
        } else {
            e
        }
    })?;
    let kind =
        Kind::from_u8(head[0]).ok_or_else(|| proto(format!("unknown frame kind {}", head[0])))?;
    let mut len = [0u8; 8];
    len.copy_from_slice(&head[1..]);
    let len = u64::from_le_bytes(len);
    if len > MAX_FRAME {
        return Err(proto(format!("a {len}-byte frame (at most {MAX_FRAME})")));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)
        .map_err(|e| proto(format!("truncated {kind:?} frame: {e}")))?;
    Ok((kind, body))
}

/// Read a frame of kind `want`; a Refuse or Abort from the other side is its reason.
fn expect(r: &mut dyn Stream, want: Kind) -> io::Result<Vec<u8>> {
    let (kind, body) = read_frame(r)?;
    wanted(kind, body, want)
}

/// A frame read, if it is of kind `want` (see [`expect`]).
fn wanted(kind: Kind, body: Vec<u8>, want: Kind) -> io::Result<Vec<u8>> {
    match kind {
        k if k == want => Ok(body),
        Kind::Refuse | Kind::Abort => {
            let why: Reason = serde_json::from_slice(&body).unwrap_or(Reason {
                reason: String::from_utf8_lossy(&body).into_owned(),
            });
            Err(io::Error::other(format!(
                "the other side refused: {}",
                why.reason
            )))
        }
        other => Err(proto(format!("expected {want:?}, got {other:?}"))),
    }
}

fn parse<T: for<'de> Deserialize<'de>>(what: &str, body: &[u8]) -> io::Result<T> {
    serde_json::from_slice(body).map_err(|e| proto(format!("bad {what}: {e}")))
}

#[derive(Serialize, Deserialize)]
struct Reason {
    reason: String,
}

/// What the destination checks before any memory moves.
#[derive(Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub memory_bytes: u64,
    pub vcpus: u8,
    pub nets: Vec<(NetConfig, Option<usize>)>,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// What the guest reboots from: the source's paths (for `vm.info`), sizes and
    /// command line. The bytes follow the Accept.
    pub kernel: BootFileInfo,
    pub initramfs: Option<BootFileInfo>,
    pub cmdline: String,
}

/// The destination's Accept.
#[derive(Serialize, Deserialize)]
pub struct Accepted {
    /// Passthrough functions it opens while the memory arrives: if any, it sends
    /// [`Kind::Prepared`] once they are open, and the source waits for that before it
    /// stops the guest.
    #[serde(default)]
    pub opening: u32,
}

/// The destination's [`Kind::Prepared`].
#[derive(Serialize, Deserialize)]
pub struct Prepared {
    /// From its Accept to the functions being open and guest RAM mapped.
    pub after_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BootFileInfo {
    pub path: String,
    pub bytes: u64,
}

impl BootFileInfo {
    pub fn of(path: &std::path::Path, file: &File) -> io::Result<Self> {
        Ok(Self {
            path: path.display().to_string(),
            bytes: file.metadata()?.len(),
        })
    }
}

/// The source's settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendParams {
    pub url: String,
    #[serde(default = "default_downtime")]
    pub downtime_ms: u64,
    /// 0: no limit.
    #[serde(default)]
    pub bandwidth_mbps: u64,
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
    /// How long the guest gets to release each failover primary before the copying.
    #[serde(default = "default_unplug_timeout")]
    pub unplug_timeout_ms: u64,
}

impl SendParams {
    /// Longest wait for the guest to release a primary: the destination waits a minute
    /// for the memory after it accepted the VM.
    pub const MAX_UNPLUG_TIMEOUT_MS: u64 = 30_000;
    /// Longest pause asked for: a minute is already no live migration.
    pub const MAX_DOWNTIME_MS: u64 = 60_000;
    /// Longest a migration may run: a day.
    pub const MAX_TIMEOUT_S: u64 = 86_400;
    /// Highest cap on the send rate: 10 Tbit/s.
    pub const MAX_BANDWIDTH_MBPS: u64 = 10_000_000;

    /// The limits `openapi.json` states.
    pub fn check(&self) -> Result<(), String> {
        if !(1..=Self::MAX_DOWNTIME_MS).contains(&self.downtime_ms) {
            return Err(format!(
                "downtime_ms={}: from 1 to {}",
                self.downtime_ms,
                Self::MAX_DOWNTIME_MS
            ));
        }
        if !(1..=Self::MAX_TIMEOUT_S).contains(&self.timeout_s) {
            return Err(format!(
                "timeout_s={}: from 1 to {}",
                self.timeout_s,
                Self::MAX_TIMEOUT_S
            ));
        }
        if !(1..=Self::MAX_UNPLUG_TIMEOUT_MS).contains(&self.unplug_timeout_ms) {
            return Err(format!(
                "unplug_timeout_ms={}: from 1 to {}",
                self.unplug_timeout_ms,
                Self::MAX_UNPLUG_TIMEOUT_MS
            ));
        }
        if self.bandwidth_mbps > Self::MAX_BANDWIDTH_MBPS {
            return Err(format!(
                "bandwidth_mbps={}: at most {} (0: no cap)",
                self.bandwidth_mbps,
                Self::MAX_BANDWIDTH_MBPS
            ));
        }
        Ok(())
    }
}

fn default_downtime() -> u64 {
    300
}

fn default_timeout() -> u64 {
    600
}

fn default_unplug_timeout() -> u64 {
    10_000
}

/// What the migration thread asks of the control loop.
pub enum ToLoop {
    /// The destination accepted the VM: may the copying start? The control loop
    /// answers once every failover primary is off the bus (their DMA is not in the
    /// dirty log), or why not.
    Accepted(Sender<Result<(), String>>),
    /// Stop the guest and return when its vCPUs had stopped and its saved state
    /// (JSON), or why not.
    Freeze(Sender<Result<(Instant, Vec<u8>), String>>),
    Progress(MigrationProgress),
    Paused {
        round: u32,
        pages_left: u64,
    },
    /// The destination runs the guest.
    Completed(MigrationProgress),
    /// The migration ended without the destination running the guest: the source
    /// runs it on.
    Failed(String),
}

/// What the source's migration thread works with.
pub struct Source {
    pub params: SendParams,
    pub url: Url,
    pub mem: GuestMemoryMmap,
    pub vm_fd: Arc<VmFd>,
    pub hello: Hello,
    pub boot: Arc<BootFiles>,
    pub cancel: Arc<AtomicBool>,
    pub to_loop: Sender<ToLoop>,
    pub wake: vmm_sys_util::eventfd::EventFd,
}

/// One bitmap of dirty pages per RAM region.
fn take_dirty(mem: &GuestMemoryMmap, vm: &VmFd) -> io::Result<Vec<Vec<u64>>> {
    let mut out = Vec::new();
    for (slot, region) in mem.iter().enumerate() {
        let mut bits = vm
            .get_dirty_log(slot as u32, region.len() as usize)
            .map_err(|e| io::Error::other(format!("KVM dirty log of slot {slot}: {e}")))?;
        let ours = vm_memory::mmap::MmapRegion::bitmap(region).get_and_reset();
        for (i, w) in ours.iter().enumerate() {
            if let Some(b) = bits.get_mut(i) {
                *b |= w;
            }
        }
        out.push(bits);
    }
    Ok(out)
}

/// Pages dirty in either of two looks at the log.
fn merge(a: &[Vec<u64>], b: &[Vec<u64>]) -> Vec<Vec<u64>> {
    a.iter()
        .zip(b)
        .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x | y).collect())
        .collect()
}

fn count_pages(dirty: &[Vec<u64>]) -> u64 {
    dirty
        .iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

impl Source {
    fn tell(&self, m: ToLoop) {
        let _ = self.to_loop.send(m);
        let _ = self.wake.write(1);
    }

    /// Ask the control loop for its say-so for the copying (see [`ToLoop::Accepted`]).
    fn ask_go_ahead(&self) -> std::sync::mpsc::Receiver<Result<(), String>> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.tell(ToLoop::Accepted(tx));
        rx
    }

    /// The control loop's say-so, waited for no longer than the guest's time to
    /// release the primaries and a margin, and given up on a cancel.
    fn wait_go_ahead(
        &self,
        rx: std::sync::mpsc::Receiver<Result<(), String>>,
        started: Instant,
    ) -> io::Result<()> {
        let limit = Instant::now()
            + Duration::from_millis(self.params.unplug_timeout_ms)
            + Duration::from_secs(10);
        loop {
            self.check_cancel(started)?;
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(why)) => return Err(io::Error::other(why)),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if Instant::now() < limit => {}
                Err(_) => {
                    return Err(io::Error::other(
                        "the failover primaries did not leave the bus in time",
                    ))
                }
            }
        }
    }

    fn check_cancel(&self, started: Instant) -> io::Result<()> {
        if self.cancel.load(Ordering::SeqCst) {
            return Err(io::Error::other("cancelled"));
        }
        if started.elapsed() > Duration::from_secs(self.params.timeout_s) {
            return Err(io::Error::other(format!(
                "timed out after {} s",
                self.params.timeout_s
            )));
        }
        Ok(())
    }

    /// Keep the guest running until the destination says its passthrough functions
    /// are open (see [`Kind::Prepared`]), at most [`PREPARE_WAIT`]; nothing is sent
    /// meanwhile but a [`Kind::Waiting`] tick every [`WAIT_TICK`], after which the
    /// destination looks at its functions again. The guest's writes meanwhile stay in
    /// the dirty log for the rounds that follow. Whether Prepared came.
    fn wait_destination(
        &self,
        s: &mut dyn Stream,
        started: Instant,
        progress: &mut MigrationProgress,
    ) -> io::Result<bool> {
        tracing::info!(
            "migration: ready to stop the guest after round {}, but the destination is still opening its passthrough functions; the guest runs on until it has",
            progress.round
        );
        progress.phase = "wait-destination".into();
        self.tell(ToLoop::Progress(progress.clone()));
        let since = Instant::now();
        let prepared = loop {
            self.check_cancel(started)?;
            if s.has_input(WAIT_TICK)? {
                read_prepared(expect(s, Kind::Prepared)?)?;
                break true;
            }
            if since.elapsed() >= PREPARE_WAIT {
                tracing::warn!(
                    "migration: the destination has not opened its passthrough functions after {} s; stopping the guest anyway (they are plugged there once open)",
                    PREPARE_WAIT.as_secs()
                );
                break false;
            }
            write_frame(s, Kind::Waiting, &[])?;
        };
        tracing::info!(
            "migration: waited {:.0} ms for the destination's passthrough functions",
            since.elapsed().as_secs_f64() * 1000.0
        );
        progress.phase = "precopy".into();
        Ok(prepared)
    }

    /// Send the pages `dirty` marks, or every page that is not all zeros if None
    /// (the destination's memory starts zeroed, and an idle guest's RAM mostly is);
    /// returns (bytes, pages) sent.
    fn send_pages(
        &self,
        s: &mut dyn Stream,
        dirty: Option<&[Vec<u64>]>,
        started: Instant,
    ) -> io::Result<(u64, u64)> {
        let mut pages = 0u64;
        let mut frame: Vec<u8> = Vec::with_capacity(CHUNK as usize + 64);
        let mut page = [0u8; PAGE as usize];
        let mut sent = 0u64;
        let throttle_start = Instant::now();
        // The run being built: where its header is in `frame`, and its next address.
        let mut run: Option<(usize, u64)> = None;
        let close = |frame: &mut Vec<u8>, run: &mut Option<(usize, u64)>| {
            if let Some((at, _)) = run.take() {
                let len = (frame.len() - at - 16) as u64;
                frame[at + 8..at + 16].copy_from_slice(&len.to_le_bytes());
            }
        };
        for (ri, region) in self.mem.iter().enumerate() {
            close(&mut frame, &mut run);
            let bits = dirty.map(|d| d.get(ri).map_or(&[][..], Vec::as_slice));
            for p in 0..region.len() / PAGE {
                if let Some(b) = bits {
                    let word = b.get((p / 64) as usize).copied().unwrap_or(0);
                    if word == 0 {
                        // Skip to the next word quickly.
                        close(&mut frame, &mut run);
                        continue;
                    }
                    if word & (1 << (p % 64)) == 0 {
                        close(&mut frame, &mut run);
                        continue;
                    }
                }
                let gpa = region.start_addr().0 + p * PAGE;
                region
                    .read_slice(&mut page, MemoryRegionAddress(p * PAGE))
                    .map_err(|e| io::Error::other(format!("read guest memory at {gpa:#x}: {e}")))?;
                // A slice comparison is a memcmp, fast even in a debug build.
                if dirty.is_none() && page[..] == ZERO_PAGE[..] {
                    close(&mut frame, &mut run);
                    continue;
                }
                if run.is_none_or(|(_, next)| next != gpa) {
                    close(&mut frame, &mut run);
                    let at = frame.len();
                    frame.extend_from_slice(&gpa.to_le_bytes());
                    frame.extend_from_slice(&0u64.to_le_bytes());
                    run = Some((at, gpa));
                }
                frame.extend_from_slice(&page);
                pages += 1;
                if let Some(r) = run.as_mut() {
                    r.1 = gpa + PAGE;
                }
                if frame.len() as u64 >= CHUNK {
                    close(&mut frame, &mut run);
                    write_frame(s, Kind::Pages, &frame)?;
                    sent += frame.len() as u64;
                    frame.clear();
                    self.check_cancel(started)?;
                    self.throttle(sent, throttle_start);
                }
            }
        }
        close(&mut frame, &mut run);
        if !frame.is_empty() {
            write_frame(s, Kind::Pages, &frame)?;
            sent += frame.len() as u64;
        }
        Ok((sent, pages))
    }

    /// The kernel and initramfs, as the Hello announced them.
    fn send_boot_files(&self, s: &mut dyn Stream) -> io::Result<()> {
        let files = [
            (0u8, Some(&self.boot.kernel), Some(&self.hello.kernel)),
            (
                1,
                self.boot.initramfs.as_ref(),
                self.hello.initramfs.as_ref(),
            ),
        ];
        let mut buf = vec![0u8; CHUNK as usize + 1];
        for (which, file, info) in files {
            let (Some(file), Some(info)) = (file, info) else {
                continue;
            };
            let mut at = 0u64;
            while at < info.bytes {
                let want = (info.bytes - at).min(CHUNK) as usize;
                buf[0] = which;
                file.read_exact_at(&mut buf[1..=want], at)
                    .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", info.path)))?;
                write_frame(s, Kind::Boot, &buf[..=want])?;
                at += want as u64;
            }
        }
        Ok(())
    }

    fn throttle(&self, sent: u64, since: Instant) {
        if self.params.bandwidth_mbps == 0 {
            return;
        }
        let should_take =
            Duration::from_secs_f64(sent as f64 * 8.0 / (self.params.bandwidth_mbps as f64 * 1e6));
        if let Some(wait) = should_take.checked_sub(since.elapsed()) {
            std::thread::sleep(wait);
        }
    }

    /// Run the migration; tells the control loop how it ended.
    pub fn run(self) {
        devices::sandbox::enter(devices::sandbox::ThreadKind::Migration);
        let started = Instant::now();
        let mut conn: Option<Box<dyn Stream>> = None;
        let result = self.migrate(started, &mut conn);
        match result {
            Ok(p) => self.tell(ToLoop::Completed(p)),
            Err(e) => {
                if let Some(c) = conn.as_mut() {
                    let _ = write_json(
                        c.as_mut(),
                        Kind::Abort,
                        &Reason {
                            reason: e.to_string(),
                        },
                    );
                    c.shutdown();
                }
                self.tell(ToLoop::Failed(e.to_string()));
            }
        }
    }

    fn migrate(
        &self,
        started: Instant,
        conn: &mut Option<Box<dyn Stream>>,
    ) -> io::Result<MigrationProgress> {
        let url_text = &self.params.url;
        let c = conn.insert(
            connect(&self.url)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot reach {url_text}: {e}")))?,
        );
        let s = c.as_mut();
        s.set_timeout(Some(Duration::from_secs(30)))?;
        write_json(s, Kind::Hello, &self.hello)?;
        let accepted: Accepted = parse("accept", &expect(s, Kind::Accept)?)?;
        // The destination opens passthrough functions while the memory arrives: the
        // guest is not stopped before it says they are open (or PREPARE_WAIT). Until
        // it has said so, a Prepared may come at any point before Ready.
        let mut dest_opening = accepted.opening > 0;
        let mut waited = false;
        // The control loop starts taking the failover primaries off the bus now, while
        // the boot files go (tens of MiB: about 0.9 s in the nested test host).
        let go_ahead = self.ask_go_ahead();
        self.send_boot_files(s)?;
        self.wait_go_ahead(go_ahead, started)?;

        // Round 0: everything. The logs are cleared first, so what is dirtied while
        // it goes is what round 1 sends.
        take_dirty(&self.mem, &self.vm_fd)?;
        let mut progress = MigrationProgress {
            phase: "precopy".into(),
            ..Default::default()
        };
        let t = Instant::now();
        let (mut bytes, pages) = self.send_pages(s, None, started)?;
        write_frame(s, Kind::RoundEnd, &0u32.to_le_bytes())?;
        let mut round_time = t.elapsed();
        let mut last_pages = pages;
        progress.pages_sent = pages;
        progress.bytes_sent = bytes;
        let downtime = Duration::from_millis(self.params.downtime_ms);
        let mut dirty;
        // What was dirty before a wait for the destination, sent with what follows it.
        let mut carried: Option<Vec<Vec<u64>>> = None;
        loop {
            self.check_cancel(started)?;
            if dest_opening && s.has_input(Duration::ZERO)? {
                read_prepared(expect(s, Kind::Prepared)?)?;
                dest_opening = false;
            }
            dirty = take_dirty(&self.mem, &self.vm_fd)?;
            if let Some(before) = carried.take() {
                dirty = merge(&before, &dirty);
            }
            let left = count_pages(&dirty);
            // Bytes per second over the last round.
            let rate = bytes as f64 / round_time.as_secs_f64().max(1e-6);
            let estimate = Duration::from_secs_f64(left as f64 * PAGE as f64 / rate.max(1.0));
            progress.pages_left = left;
            progress.rate_mbps = (rate * 8.0 / 1e6) as u64;
            progress.estimated_downtime_ms = estimate.as_millis() as u64;
            progress.elapsed_ms = started.elapsed().as_millis() as u64;
            self.tell(ToLoop::Progress(progress.clone()));
            let next = next_step(progress.round, last_pages, left, estimate, downtime);
            if next != Next::Round && dest_opening && !waited {
                waited = true;
                dest_opening = !self.wait_destination(s, started, &mut progress)?;
                // What is dirty now goes with what the guest dirtied during the wait, in
                // rounds judged afresh (the next at least: its set is not the last
                // round's leftover).
                carried = Some(std::mem::take(&mut dirty));
                last_pages = u64::MAX;
                continue;
            }
            match next {
                Next::Round => {}
                Next::Stop => break,
                Next::StopNotConverged => {
                    tracing::warn!(
                        "migration: not converged after {MAX_ROUNDS} rounds ({left} pages dirty, about {} ms to send); stopping the guest anyway",
                        estimate.as_millis()
                    );
                    break;
                }
            }
            progress.round += 1;
            let t = Instant::now();
            let pages;
            (bytes, pages) = self.send_pages(s, Some(&dirty), started)?;
            write_frame(s, Kind::RoundEnd, &progress.round.to_le_bytes())?;
            last_pages = pages;
            round_time = t.elapsed();
            progress.bytes_sent += bytes;
            progress.pages_sent += pages;
        }

        // Stop and copy.
        self.tell(ToLoop::Paused {
            round: progress.round,
            pages_left: progress.pages_left,
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let asked_at = Instant::now();
        self.tell(ToLoop::Freeze(tx));
        // The downtime runs from the moment the guest's vCPUs had stopped (on a loaded
        // host the control loop may take a few ms to get to it, while the guest runs).
        let (paused_at, state) = wait_frozen(&rx)?;
        let frozen = paused_at.elapsed();
        let dirty_last = take_dirty(&self.mem, &self.vm_fd)?;
        // What was dirty at the last look and what was dirtied since.
        let merged = merge(&dirty, &dirty_last);
        progress.phase = "stop-and-copy".into();
        let (b, p) = self.send_pages(s, Some(&merged), started)?;
        progress.bytes_sent += b;
        progress.pages_sent += p;
        write_frame(s, Kind::MemoryDone, &[])?;
        write_frame(s, Kind::State, &state)?;
        progress.bytes_sent += state.len() as u64;
        let sent = paused_at.elapsed();
        // The destination builds the VM; it may take a while for a big one.
        s.set_timeout(Some(Duration::from_secs(60)))?;
        expect_ready(s, dest_opening)?;
        let ready = paused_at.elapsed();
        self.check_cancel(started)?;
        // From here the destination owns the guest.
        write_frame(s, Kind::Go, &[])?;
        match expect(s, Kind::Running) {
            Ok(_) => {}
            Err(e) => {
                // Go was sent: the destination may be running it. Resuming here could
                // run the guest twice; this side stops instead and says so.
                tracing::error!(
                    "migration: the destination did not confirm it runs the guest ({e}); it was told to, so this side does not resume it"
                );
            }
        }
        progress.phase = "done".into();
        progress.pages_left = 0;
        progress.downtime_ms = Some(paused_at.elapsed().as_millis() as u64);
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        tracing::info!(
            "migration: downtime {:.1} ms, from the guest's stop ({:.1} ms after the request): its state saved in {:.1}, the last {p} pages and the state sent in {:.1}, the destination built the VM in {:.1}, and ran it in {:.1}",
            ms(paused_at.elapsed()),
            ms(paused_at.saturating_duration_since(asked_at)),
            ms(frozen),
            ms(sent - frozen),
            ms(ready - sent),
            ms(paused_at.elapsed() - ready)
        );
        progress.elapsed_ms = started.elapsed().as_millis() as u64;
        Ok(progress)
    }
}

/// The destination's Ready. One that had not said Prepared by then (`prepared_due`:
/// the source gave up waiting) may say it first.
fn expect_ready(s: &mut dyn Stream, prepared_due: bool) -> io::Result<()> {
    match read_frame(s)? {
        (Kind::Prepared, body) if prepared_due => {
            read_prepared(body)?;
            expect(s, Kind::Ready).map(drop)
        }
        (kind, body) => wanted(kind, body, Kind::Ready).map(drop),
    }
}

/// The destination's [`Kind::Prepared`], logged.
fn read_prepared(body: Vec<u8>) -> io::Result<()> {
    let p: Prepared = parse("prepared", &body)?;
    tracing::info!(
        "migration: the destination's passthrough functions are open, {} ms after it accepted the VM",
        p.after_ms
    );
    Ok(())
}

fn wait_frozen(
    rx: &Receiver<Result<(Instant, Vec<u8>), String>>,
) -> io::Result<(Instant, Vec<u8>)> {
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(frozen)) => Ok(frozen),
        Ok(Err(e)) => Err(io::Error::other(format!("cannot stop the guest: {e}"))),
        Err(_) => Err(io::Error::other("the VMM did not stop the guest in 30 s")),
    }
}

/// The destination's side, up to the built VM: checks the Hello with `check`,
/// fills `mem` (made by `make_mem` from the Hello), returns the state and the
/// connection, on which the caller answers Ready or Refuse.
pub struct Incoming {
    pub conn: Box<dyn Stream>,
    pub mem: GuestMemoryMmap,
    pub state: Vec<u8>,
    pub boot: BootFiles,
}

/// Passthrough functions the destination opens while the memory arrives: how many,
/// a flag set once they are open, and what gives their opening the guest's priority
/// (called once the guest's memory has come once: the rest of the rounds are small,
/// and the source waits for them before it stops the guest).
pub struct Opening {
    pub count: u32,
    pub done: Arc<AtomicBool>,
    pub hurry: Box<dyn Fn() -> Result<(), String>>,
}

pub fn receive(
    url: &Url,
    stop: RawFd,
    check: impl FnOnce(&Hello) -> Result<(), String>,
    make_mem: impl FnOnce(u64) -> Result<(GuestMemoryMmap, Option<Opening>), String>,
) -> io::Result<Incoming> {
    receive_on(accept(url, stop)?, check, make_mem)
}

/// [`receive`] on a connection already made: everything the stream says is checked
/// here (the `fuzz` target `migration_stream` feeds it any bytes). `make_mem` makes
/// the memory, and says what it opens meanwhile: the source hears once that is done
/// ([`Kind::Prepared`]).
pub fn receive_on(
    mut conn: Box<dyn Stream>,
    check: impl FnOnce(&Hello) -> Result<(), String>,
    make_mem: impl FnOnce(u64) -> Result<(GuestMemoryMmap, Option<Opening>), String>,
) -> io::Result<Incoming> {
    let s = conn.as_mut();
    s.set_timeout(Some(Duration::from_secs(60)))?;
    let hello: Hello = parse("hello", &expect(s, Kind::Hello)?)?;
    let refuse = |s: &mut dyn Stream, reason: String| -> io::Error {
        let _ = write_json(
            s,
            Kind::Refuse,
            &Reason {
                reason: reason.clone(),
            },
        );
        io::Error::other(reason)
    };
    if hello.version != PROTOCOL_VERSION {
        return Err(refuse(
            s,
            format!(
                "protocol version {} (this Tandem speaks {PROTOCOL_VERSION})",
                hello.version
            ),
        ));
    }
    for f in std::iter::once(&hello.kernel).chain(&hello.initramfs) {
        if f.bytes == 0 || f.bytes > MAX_BOOT_FILE {
            return Err(refuse(
                s,
                format!(
                    "boot file {}: {} bytes (1 to {MAX_BOOT_FILE} taken)",
                    f.path, f.bytes
                ),
            ));
        }
    }
    if let Err(e) = check(&hello) {
        return Err(refuse(s, e));
    }
    let (mem, mut opening) = match make_mem(hello.memory_bytes) {
        Ok(m) => m,
        Err(e) => return Err(refuse(s, e)),
    };
    write_json(
        s,
        Kind::Accept,
        &Accepted {
            opening: opening.as_ref().map_or(0, |o| o.count),
        },
    )?;
    let accepted_at = Instant::now();
    let boot = BootFiles {
        kernel: receive_boot_file(s, 0, &hello.kernel)?,
        initramfs: match &hello.initramfs {
            Some(info) => Some(receive_boot_file(s, 1, info)?),
            None => None,
        },
    };
    let mut pages = 0u64;
    let mut rounds = 0u32;
    loop {
        let (kind, body) = read_frame(s)?;
        match kind {
            Kind::Pages => pages += write_pages(&mem, &body)?,
            Kind::RoundEnd => {
                rounds += 1;
                if rounds == 1 {
                    if let Some(Err(why)) = opening.as_ref().map(|o| (o.hurry)()) {
                        tracing::info!("migration: the passthrough functions' opening stays at a low priority: {why}");
                    }
                }
            }
            Kind::Waiting => {}
            Kind::MemoryDone => break,
            Kind::Abort => {
                let r: Reason = parse("abort", &body)?;
                return Err(io::Error::other(format!(
                    "the source gave up: {}",
                    r.reason
                )));
            }
            other => return Err(proto(format!("expected pages, got {other:?}"))),
        }
        if opening
            .as_ref()
            .is_some_and(|o| o.done.load(Ordering::Acquire))
        {
            opening = None;
            let after_ms = accepted_at.elapsed().as_millis() as u64;
            tracing::info!(
                "migration: passthrough functions open {after_ms} ms after the VM was accepted, during round {rounds}"
            );
            write_json(s, Kind::Prepared, &Prepared { after_ms })?;
        }
    }
    tracing::info!("migration: received {pages} pages in {rounds} rounds and the stop's");
    let state = expect(s, Kind::State)?;
    Ok(Incoming {
        conn,
        mem,
        state,
        boot,
    })
}

/// Boot file `which`, `info.bytes` long, into a memory file of its own.
fn receive_boot_file(s: &mut dyn Stream, which: u8, info: &BootFileInfo) -> io::Result<File> {
    let name = if which == 0 {
        c"tandem-kernel"
    } else {
        c"tandem-initramfs"
    };
    // SAFETY: memfd_create with a NUL-terminated name and flags only.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
    let mut file = unsafe { File::from_raw_fd(fd) };
    let mut got = 0u64;
    while got < info.bytes {
        let body = expect(s, Kind::Boot)?;
        let (Some(&w), Some(data)) = (body.first(), body.get(1..)) else {
            return Err(proto("an empty boot frame"));
        };
        if w != which || data.is_empty() || got + data.len() as u64 > info.bytes {
            return Err(proto(format!(
                "a boot frame for file {w} with {} bytes; expected file {which}, {} bytes to go",
                data.len(),
                info.bytes - got
            )));
        }
        file.write_all(data)
            .map_err(|e| io::Error::new(e.kind(), format!("keeping {}: {e}", info.path)))?;
        got += data.len() as u64;
    }
    Ok(file)
}

/// Copy one Pages frame into guest memory; every run must lie inside RAM.
fn write_pages(mem: &GuestMemoryMmap, mut body: &[u8]) -> io::Result<u64> {
    let mut pages = 0;
    while !body.is_empty() {
        if body.len() < 16 {
            return Err(proto("a truncated page run header"));
        }
        let gpa = u64::from_le_bytes(body[..8].try_into().unwrap_or([0; 8]));
        let len = u64::from_le_bytes(body[8..16].try_into().unwrap_or([0; 8]));
        body = &body[16..];
        if len as usize > body.len() || len % PAGE != 0 || gpa % PAGE != 0 {
            return Err(proto(format!("a bad page run: {len} bytes at {gpa:#x}")));
        }
        let (data, rest) = body.split_at(len as usize);
        if !mem.check_range(GuestAddress(gpa), len as usize) {
            return Err(proto(format!(
                "pages at {gpa:#x}..{:#x} are outside guest RAM",
                gpa.saturating_add(len)
            )));
        }
        mem.write_slice(data, GuestAddress(gpa))
            .map_err(|e| proto(format!("pages at {gpa:#x}: {e}")))?;
        pages += len / PAGE;
        body = rest;
    }
    Ok(pages)
}

/// The destination built the VM: Ready, then wait for Go. Err: do not run it.
pub fn ready_and_wait_go(conn: &mut dyn Stream) -> io::Result<()> {
    write_frame(conn, Kind::Ready, &[])?;
    expect(conn, Kind::Go)?;
    Ok(())
}

pub fn confirm_running(conn: &mut dyn Stream) {
    if let Err(e) = write_frame(conn, Kind::Running, &[]) {
        tracing::warn!("migration: cannot confirm to the source that the guest runs: {e}");
    }
}

pub fn refuse(conn: &mut dyn Stream, reason: &str) {
    let _ = write_json(
        conn,
        Kind::Refuse,
        &Reason {
            reason: reason.into(),
        },
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::Seek;

    use super::*;

    #[test]
    fn rounds_go_on_while_they_halve_what_is_dirty() {
        let ms = Duration::from_millis;
        let target = ms(300);
        // Over the target: another round, until the rounds are used up.
        assert_eq!(next_step(0, 100_000, 90_000, ms(900), target), Next::Round);
        assert_eq!(
            next_step(MAX_ROUNDS, 1000, 90_000, ms(900), target),
            Next::StopNotConverged
        );
        // Under it after the first full copy: one more round is cheap and takes most
        // of the pause off.
        assert_eq!(next_step(0, 25_000, 1760, ms(130), target), Next::Round);
        // A round that did not halve what is dirty: the guest dirties as fast as the
        // rounds go, more would not help.
        assert_eq!(next_step(1, 1760, 1200, ms(90), target), Next::Stop);
        // Little left: stop whatever the trend.
        assert_eq!(next_step(1, 1760, FEW_PAGES, ms(5), target), Next::Stop);
        assert_eq!(next_step(2, 0, 0, ms(0), target), Next::Stop);
        // The bound holds under the target too.
        assert_eq!(
            next_step(MAX_ROUNDS, 10_000, 1000, ms(10), target),
            Next::Stop
        );
    }

    #[test]
    fn urls() {
        assert_eq!(
            Url::parse("tcp:1.2.3.4:6000").unwrap(),
            Url::Tcp("1.2.3.4:6000".into())
        );
        assert_eq!(Url::parse("unix:/a/b").unwrap(), Url::Unix("/a/b".into()));
        for bad in [
            "tcp:1.2.3.4",
            "tcp::5",
            "tcp:h:99999",
            // Found by api_bodies: openapi.json has neither.
            "tcp:h:047222",
            "tcp:h:+80",
            "tcp:a b:80",
            "tcp:a\nb:80",
            "unix:/a\nb",
            "unix:",
            "http://x",
            "",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }

    /// The limits openapi.json states, and the defaults within them.
    #[test]
    fn send_params_limits() {
        let p = |v: serde_json::Value| serde_json::from_value::<SendParams>(v).unwrap().check();
        assert!(p(serde_json::json!({"url": "unix:/x"})).is_ok());
        assert!(p(serde_json::json!({"url": "unix:/x", "downtime_ms": 60000, "timeout_s": 86400, "bandwidth_mbps": 10000000, "unplug_timeout_ms": 30000})).is_ok());
        for bad in [
            serde_json::json!({"url": "unix:/x", "downtime_ms": 0}),
            serde_json::json!({"url": "unix:/x", "downtime_ms": 60001}),
            serde_json::json!({"url": "unix:/x", "timeout_s": 0}),
            serde_json::json!({"url": "unix:/x", "timeout_s": 86401}),
            serde_json::json!({"url": "unix:/x", "bandwidth_mbps": 10000001u64}),
            serde_json::json!({"url": "unix:/x", "unplug_timeout_ms": 0}),
            serde_json::json!({"url": "unix:/x", "unplug_timeout_ms": 30001}),
        ] {
            assert!(p(bad.clone()).is_err(), "{bad}");
        }
    }

    fn pair() -> (Box<dyn Stream>, Box<dyn Stream>) {
        let (a, b) = UnixStream::pair().unwrap();
        (Box::new(a), Box::new(b))
    }

    #[test]
    fn frames_and_bad_frames() {
        let (mut a, mut b) = pair();
        write_frame(a.as_mut(), Kind::Go, b"x").unwrap();
        assert_eq!(read_frame(b.as_mut()).unwrap(), (Kind::Go, b"x".to_vec()));
        // Unknown kind.
        a.write_all(&[99, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        assert!(read_frame(b.as_mut())
            .unwrap_err()
            .to_string()
            .contains("unknown frame kind"));
        // Too long.
        let mut h = vec![Kind::Pages as u8];
        h.extend_from_slice(&u64::MAX.to_le_bytes());
        a.write_all(&h).unwrap();
        assert!(read_frame(b.as_mut())
            .unwrap_err()
            .to_string()
            .contains("frame (at most"));
        // Out of order, and a refusal is its reason.
        write_frame(a.as_mut(), Kind::Ready, &[]).unwrap();
        assert!(expect(b.as_mut(), Kind::Accept)
            .unwrap_err()
            .to_string()
            .contains("expected Accept"));
        refuse(a.as_mut(), "no tap for net0");
        assert!(expect(b.as_mut(), Kind::Accept)
            .unwrap_err()
            .to_string()
            .contains("no tap for net0"));
        // Truncated.
        let mut h = vec![Kind::State as u8];
        h.extend_from_slice(&100u64.to_le_bytes());
        h.extend_from_slice(b"short");
        a.write_all(&h).unwrap();
        drop(a);
        assert!(read_frame(b.as_mut())
            .unwrap_err()
            .to_string()
            .contains("truncated"));
    }

    #[test]
    fn boot_files_arrive_whole_or_not_at_all() {
        let info = BootFileInfo {
            path: "/boot/vmlinuz".into(),
            bytes: 5,
        };
        let (mut a, mut b) = pair();
        write_frame(a.as_mut(), Kind::Boot, b"\x00abc").unwrap();
        write_frame(a.as_mut(), Kind::Boot, b"\x00de").unwrap();
        let mut f = receive_boot_file(b.as_mut(), 0, &info).unwrap();
        let mut got = String::new();
        f.seek(std::io::SeekFrom::Start(0)).unwrap();
        f.read_to_string(&mut got).unwrap();
        assert_eq!(got, "abcde");
        // The initramfs where the kernel was due, more than announced, nothing at all.
        for (body, want) in [
            (&b"\x01abc"[..], "expected file 0"),
            (&b"\x00abcdef"[..], "5 bytes to go"),
            (&b""[..], "empty boot frame"),
        ] {
            write_frame(a.as_mut(), Kind::Boot, body).unwrap();
            let e = receive_boot_file(b.as_mut(), 0, &info).unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
        }
        // A source that gives up midway is heard.
        write_frame(a.as_mut(), Kind::Boot, b"\x00ab").unwrap();
        refuse(a.as_mut(), "cancelled");
        let e = receive_boot_file(b.as_mut(), 0, &info).unwrap_err();
        assert!(e.to_string().contains("cancelled"), "{e}");
    }

    /// A destination that opens passthrough functions says so in its Accept, and says
    /// Prepared once, after the first frame that follows their opening, during the
    /// rounds; a round's end is taken as such.
    #[test]
    fn the_destination_says_when_its_functions_are_open() {
        let (mut src, dst) = pair();
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let dest = std::thread::spawn(move || {
            receive_on(
                dst,
                |_| Ok(()),
                |bytes| {
                    Ok((
                        crate::memory::create(bytes).map_err(|e| e.to_string())?,
                        Some(Opening {
                            count: 1,
                            done: flag,
                            hurry: Box::new(|| Ok(())),
                        }),
                    ))
                },
            )
        });
        let hello = Hello {
            version: PROTOCOL_VERSION,
            memory_bytes: 1 << 20,
            vcpus: 1,
            nets: Vec::new(),
            cpuid: Vec::new(),
            kernel: BootFileInfo {
                path: "/boot/vmlinuz".into(),
                bytes: 3,
            },
            initramfs: None,
            cmdline: String::new(),
        };
        let s = src.as_mut();
        write_json(s, Kind::Hello, &hello).unwrap();
        let accepted: Accepted = parse("accept", &expect(s, Kind::Accept).unwrap()).unwrap();
        assert_eq!(accepted.opening, 1);
        write_frame(s, Kind::Boot, b"\x00abc").unwrap();
        let mut run = Vec::new();
        run.extend_from_slice(&0x2000u64.to_le_bytes());
        run.extend_from_slice(&PAGE.to_le_bytes());
        run.extend_from_slice(&[9u8; PAGE as usize]);
        write_frame(s, Kind::Pages, &run).unwrap();
        write_frame(s, Kind::RoundEnd, &0u32.to_le_bytes()).unwrap();
        assert!(
            !s.has_input(Duration::from_millis(200)).unwrap(),
            "Prepared before the functions are open"
        );
        done.store(true, Ordering::Release);
        // The next frame, a waiting source's tick, brings it.
        write_frame(s, Kind::Waiting, &[]).unwrap();
        assert!(s.has_input(Duration::from_secs(10)).unwrap());
        let p: Prepared = parse("prepared", &expect(s, Kind::Prepared).unwrap()).unwrap();
        assert!(p.after_ms >= 200, "{}", p.after_ms);
        write_frame(s, Kind::Pages, &run).unwrap();
        write_frame(s, Kind::MemoryDone, &[]).unwrap();
        write_frame(s, Kind::State, b"{}").unwrap();
        let got = dest.join().unwrap().unwrap();
        assert_eq!(got.state, b"{}");
        assert_eq!(got.mem.read_obj::<u8>(GuestAddress(0x2fff)).unwrap(), 9);
        assert!(
            !s.has_input(Duration::ZERO).unwrap(),
            "Prepared is said once"
        );
    }

    /// After a wait that timed out, the destination's late Prepared may come before
    /// its Ready; once Prepared was heard (or never due), it is out of order.
    #[test]
    fn a_late_prepared_may_precede_ready_only_while_due() {
        let (mut a, mut b) = pair();
        let prepared = serde_json::to_vec(&Prepared { after_ms: 31_000 }).unwrap();
        write_frame(a.as_mut(), Kind::Prepared, &prepared).unwrap();
        write_frame(a.as_mut(), Kind::Ready, &[]).unwrap();
        expect_ready(b.as_mut(), true).unwrap();
        write_frame(a.as_mut(), Kind::Ready, &[]).unwrap();
        expect_ready(b.as_mut(), true).unwrap();
        write_frame(a.as_mut(), Kind::Prepared, &prepared).unwrap();
        let e = expect_ready(b.as_mut(), false).unwrap_err();
        assert!(
            e.to_string().contains("expected Ready, got Prepared"),
            "{e}"
        );
    }

    #[test]
    fn page_runs_must_lie_in_ram() {
        let mem = crate::memory::create(1 << 20).unwrap();
        let mut run = Vec::new();
        run.extend_from_slice(&0x1000u64.to_le_bytes());
        run.extend_from_slice(&PAGE.to_le_bytes());
        run.extend_from_slice(&[7u8; PAGE as usize]);
        assert_eq!(write_pages(&mem, &run).unwrap(), 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1fff)).unwrap(), 7);
        let mut out = Vec::new();
        out.extend_from_slice(&(1u64 << 20).to_le_bytes());
        out.extend_from_slice(&PAGE.to_le_bytes());
        out.extend_from_slice(&[7u8; PAGE as usize]);
        assert!(write_pages(&mem, &out)
            .unwrap_err()
            .to_string()
            .contains("outside guest RAM"));
        assert!(write_pages(&mem, &run[..20]).is_err());
        assert!(write_pages(&mem, &run[..10]).is_err());
    }
}
