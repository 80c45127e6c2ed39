//! The control loop: the one place that changes the VM.
//!
//! It owns what outlives a single boot (the serial device and its backend,
//! the API channel, the event fds), builds a [`Vm`], and waits on epoll for:
//! the guest powering off or resetting, a fatal vCPU error, an API request,
//! the guest ejecting a hotplug slot, the deadline of an orderly removal, or
//! SIGTERM/SIGINT.
//!
//! Hotplug changes `cfg.nets` along with the machine, so a reboot comes back
//! with the devices the VM has now, each in the slot it has now.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::vcpu::VcpuControlError;
use api::events::{EventHub, EventKind};
use api::{ApiError, ApiMessage, ApiResponse, DeviceAdded, DeviceInfo, Endpoint, VmInfo, VmState};
use devices::serial::{self, Serial, SerialSink, SocketConsole};
use devices::virtio::net::acks_standby;
use devices::virtio::DriverStatus;
use kvm_ioctls::Kvm;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{self, DeviceSpec, SerialConfig, VmConfig};
use crate::events::VmEvents;
use crate::failover::Failover;
use crate::migration;
use crate::vm::{Vm, VmError};

/// A refused `--net` or `--device` as the API's answer (see
/// [`config::ConfigError::http_status`]).
fn refused(e: config::ConfigError) -> ApiError {
    ApiError {
        status: e.http_status(),
        message: e.to_string(),
    }
}

/// A device the VM could not add, as the API's answer: a tap or PCI function that does
/// not exist is 404; one in use, in the wrong mode, or no room left is 409; KVM or the
/// host failing is 500; anything else is the request's own fault (400).
fn add_failed(e: VmError) -> ApiError {
    use crate::device_manager::DeviceError;
    use devices::pci::PciRootError;
    use devices::virtio::net::{NetError, TapError};
    let status = match &e {
        VmError::Device(d) => match d {
            DeviceError::Net { source, .. } => match source {
                NetError::Tap(TapError::Missing(_)) => 404,
                NetError::Tap(
                    TapError::Busy(_) | TapError::NotTap(_) | TapError::NotMultiQueue { .. },
                ) => 409,
                NetError::Tap(TapError::Io { .. }) => 500,
                _ => 400,
            },
            DeviceError::Slot { source, .. } => match source {
                PciRootError::SlotBusy(_) | PciRootError::Full => 409,
                PciRootError::BadSlot(_) | PciRootError::SlotEmpty(_) => 400,
                PciRootError::MapBar { .. } => 500,
            },
            DeviceError::NoSuchDevice(_) => 404,
            DeviceError::DuplicateId(_)
            | DeviceError::NoBarSpace { .. }
            | DeviceError::Vfio { .. } => 409,
            DeviceError::Io { .. } | DeviceError::Restore { .. } => 500,
        },
        VmError::Kvm { .. } | VmError::EventFd(_) | VmError::Thread(_) | VmError::Memory { .. } => {
            500
        }
        _ => 400,
    };
    ApiError {
        status,
        message: e.to_string(),
    }
}

mod migrate;
mod removal;

use removal::{removed, PendingRemoval};

#[derive(Debug, Error)]
pub enum VmmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    Kvm(kvm_ioctls::Error),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Guest(String),
}

/// How the VMM ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// The guest powered off, or the API asked to shut down.
    Shutdown,
    /// SIGTERM or SIGINT.
    Signal(i32),
    /// The guest migrated: the destination runs it.
    Migrated,
}

/// A migration this VMM is sending.
struct Outgoing {
    cancel: Arc<AtomicBool>,
    rx: Receiver<migration::ToLoop>,
    /// The guest was frozen for the last copy; `Some(was paused before)`.
    frozen: Option<bool>,
    /// The failover primaries this migration holds off the bus (they come back if it
    /// fails), and how long the guest gets to release each.
    held: Vec<String>,
    unplug_timeout: Duration,
    /// The migration thread waits for the primaries to be off the bus.
    hold: Option<HoldWait>,
}

/// The say-so a migration thread waits for before it copies: every primary held.
struct HoldWait {
    go: Sender<Result<(), String>>,
    waiting: Vec<(String, api::Answered)>,
}

#[derive(Clone, Copy)]
enum Token {
    Shutdown = 1,
    Reset,
    Error,
    Api,
    Signal,
    Eject,
    DriverStatus,
    Migration,
}

impl Token {
    fn from_u64(v: u64) -> Option<Self> {
        [
            Token::Shutdown,
            Token::Reset,
            Token::Error,
            Token::Api,
            Token::Signal,
            Token::Eject,
            Token::DriverStatus,
            Token::Migration,
        ]
        .into_iter()
        .find(|t| *t as u64 == v)
    }
}

/// How often the hotplug interrupt is raised again while the guest leaves news unread.
const HOTPLUG_RERAISE: Duration = Duration::from_millis(500);

/// What an API request asks of the control loop beyond its reply.
enum ApiAction {
    Exit(Exit),
    Reboot,
}

/// Restores the terminal when the VMM exits.
struct TtyGuard(Option<libc::termios>);

impl TtyGuard {
    fn raw_stdin() -> Self {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(0) } != 1 {
            return Self(None);
        }
        // SAFETY: a zeroed termios is a valid out-parameter for tcgetattr.
        let mut orig: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is a terminal and `orig` is a valid termios.
        if unsafe { libc::tcgetattr(0, &mut orig) } != 0 {
            return Self(None);
        }
        let mut raw = orig;
        // SAFETY: cfmakeraw only modifies the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output processing so that the host terminal stays readable.
        raw.c_oflag = orig.c_oflag;
        // SAFETY: as above, with a valid termios.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) };
        Self(Some(orig))
    }
}

impl Drop for TtyGuard {
    fn drop(&mut self) {
        if let Some(t) = self.0 {
            // SAFETY: restores the settings read from the same terminal.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        }
    }
}

/// Remove a socket path left by a previous run, refusing one still in use.
fn claim_socket_path(path: &Path, what: &str) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    // Not followed: a link is not ours to replace, whatever it points to.
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("{what} {}: {e}", path.display()),
            ))
        }
    };
    // Tandem runs as root: only ever remove a stale *socket*, never a file someone
    // named by mistake (`--serial socket=disk.img`).
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{what} {}: exists and is not a socket; refusing to replace it (choose another path)",
                path.display()
            ),
        ));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{what} {}: another process is listening on it",
                path.display()
            ),
        ));
    }
    std::fs::remove_file(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "{what} {}: cannot remove the stale socket: {e}",
                path.display()
            ),
        )
    })
}

/// Whether network device `name` exists in this process's network namespace.
fn netdev_exists(name: &str) -> bool {
    devices::netlink::ifindex(name) != 0
}

/// Block SIGINT/SIGTERM in every thread and receive them on a signalfd.
/// Must run before any thread is spawned.
pub fn block_exit_signals() -> io::Result<OwnedFd> {
    // SAFETY: sigset operations on a local, zero-initialised set.
    let fd = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: signalfd returned a fresh descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn read_signal(fd: RawFd) -> Option<i32> {
    // SAFETY: a zeroed siginfo is a valid buffer for read().
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reads at most `size` bytes into `info`.
    let n = unsafe { libc::read(fd, &mut info as *mut _ as *mut libc::c_void, size) };
    (n as usize == size).then_some(info.ssi_signo as i32)
}

/// A `vm.add-device` waiting for its function to be opened off the control loop.
struct PendingAdd {
    spec: DeviceSpec,
    reply: api::Answer,
    since: Instant,
}

/// How often the control loop looks whether a function being opened for a
/// `vm.add-device` is open.
const ADDING_POLL: Duration = Duration::from_millis(20);

pub struct Vmm {
    cfg: VmConfig,
    kvm: Kvm,
    events: Arc<VmEvents>,
    serial: Arc<Mutex<Serial>>,
    serial_drain: Option<serial::OutputDrain>,
    api: Option<(Receiver<ApiMessage>, EventFd)>,
    /// The event stream (`GET /api/v1/events`); published to whether or not anyone listens.
    hub: Arc<EventHub>,
    signals: OwnedFd,
    boots: u32,
    sockets: Vec<PathBuf>,
    pending: Vec<PendingRemoval>,
    /// `vm.add-device` requests whose function is being opened off this loop: each is
    /// carried out and answered once it is open.
    adding: Vec<PendingAdd>,
    /// The failover pairs: `net_failover` decides, this loop carries it out.
    failover: Failover,
    /// Bridges being steered to primaries that just came up.
    steering: crate::steer::Steering,
    migration: Option<Outgoing>,
    /// Wakes this loop when the migration thread has news.
    migration_evt: EventFd,
    _tty: Option<TtyGuard>,
}

impl Vmm {
    pub fn new(mut cfg: VmConfig, signals: OwnedFd) -> Result<Self, VmmError> {
        let kvm = Kvm::new().map_err(VmmError::Kvm)?;
        let failover = Failover::new(&mut cfg).map_err(|e| VmmError::Guest(e.to_string()))?;
        crate::vcpu::install_kick_handler()
            .map_err(|e| io::Error::other(format!("cannot install the vCPU kick handler: {e}")))?;
        let events = Arc::new(VmEvents::new()?);
        crate::events::install_panic_policy(events.clone());
        let mut sockets = Vec::new();
        let mut tty = None;
        let mut socket_console = None;
        let sink: SerialSink = match &cfg.serial {
            SerialConfig::Tty => Box::new(io::stdout()),
            SerialConfig::Off => Box::new(io::sink()),
            SerialConfig::File(p) => serial::file_sink(p).map_err(|e| {
                io::Error::new(e.kind(), format!("--serial file={}: {e}", p.display()))
            })?,
            SerialConfig::Socket(p) => {
                claim_socket_path(p, "--serial socket")?;
                let c = SocketConsole::bind(p)?;
                sockets.push(p.clone());
                let sink = c.sink();
                socket_console = Some(c);
                sink
            }
        };
        // A slow sink never blocks the vCPU writing the UART.
        let (sink, serial_drain) = match cfg.serial {
            SerialConfig::Off => (sink, None),
            _ => {
                let (sink, drain) = serial::detached_sink(sink)?;
                (sink, Some(drain))
            }
        };
        // The interrupt is replaced by each boot's irqfd.
        let placeholder = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let serial = Arc::new(Mutex::new(Serial::new(placeholder, sink)));
        if let Some(c) = socket_console {
            c.attach_input(serial.clone());
        }
        if cfg.serial == SerialConfig::Tty {
            tty = Some(TtyGuard::raw_stdin());
            let s = serial.clone();
            std::thread::Builder::new()
                .name("serial-stdin".into())
                .spawn(move || {
                    devices::sandbox::enter(devices::sandbox::ThreadKind::Serial);
                    serial::pump_input(s, io::stdin())
                })?;
        }
        let hub = EventHub::new();
        let api = match &cfg.api_socket {
            Some(path) => {
                claim_socket_path(path, "--api-socket")?;
                let (tx, rx) = channel();
                let evt = EventFd::new(libc::EFD_NONBLOCK)?;
                let wake = evt.try_clone()?;
                api::server::start(
                    path,
                    tx,
                    std::sync::Arc::new(move || {
                        let _ = wake.write(1);
                    }),
                    hub.clone(),
                    || devices::sandbox::enter(devices::sandbox::ThreadKind::Api),
                )?;
                sockets.push(path.clone());
                Some((rx, evt))
            }
            None => None,
        };
        Ok(Self {
            cfg,
            kvm,
            events,
            serial,
            serial_drain,
            api,
            hub,
            signals,
            boots: 0,
            sockets,
            pending: Vec::new(),
            adding: Vec::new(),
            failover,
            steering: Default::default(),
            migration: None,
            migration_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            _tty: tty,
        })
    }

    fn boot(&mut self) -> Result<Vm, VmmError> {
        // Removals still waiting for the old guest are done: the new one
        // boots without those devices.
        // A NIC whose tap was deleted on the host cannot come back: the new boot goes
        // on without it rather than not at all (at start-up a missing tap is an error).
        if self.boots > 0 {
            // Every primary left with the old VM; they come back with the new STANDBY acks.
            let actions = self.failover.machine.handle(net_failover::Input::VmReset);
            self.carry_out(None, actions);
            let (kept, lost): (Vec<_>, Vec<_>) = std::mem::take(&mut self.cfg.nets)
                .into_iter()
                .partition(|n| netdev_exists(&n.net.tap));
            self.cfg.nets = kept;
            for n in lost {
                tracing::error!(
                    "device {}: tap {} is gone from the host; the VM boots again without it",
                    n.net.id,
                    n.net.tap
                );
                self.hub.publish(
                    Some(&n.net.id),
                    EventKind::SurpriseRemoved {
                        slot: n.slot.unwrap_or(0),
                        cause: "tap-gone".into(),
                    },
                );
            }
        }
        for p in std::mem::take(&mut self.pending) {
            self.cfg.nets.retain(|n| n.net.id != p.id);
            self.hub.publish(
                Some(&p.id),
                EventKind::SurpriseRemoved {
                    slot: p.slot,
                    cause: "reboot".into(),
                },
            );
            p.answer("reboot");
        }
        let mut vm = Vm::create(&self.kvm, &self.cfg, &self.serial, &self.events)?;
        // Pin every device to the slot it got, so that later boots keep
        // them there whatever hotplug does in between.
        for n in &mut self.cfg.nets {
            n.slot = vm.devices().slot_of(&n.net.id);
        }
        vm.start()?;
        self.boots += 1;
        tracing::info!("boot {} started with {} vCPUs", self.boots, vm.vcpus());
        self.hub
            .publish(None, EventKind::VmBooted { boot: self.boots });
        Ok(vm)
    }

    /// Run until the guest powers off, the API shuts the VM down, a signal
    /// arrives, or a fatal error.
    pub fn run(mut self) -> Result<Exit, VmmError> {
        devices::sandbox::enter(devices::sandbox::ThreadKind::Control);
        let epoll = epoll::create(true)?;
        // SAFETY: epoll::create returned a fresh descriptor that we own.
        let _epoll_guard = unsafe { OwnedFd::from_raw_fd(epoll) };
        let watch = |fd: RawFd, t: Token| {
            epoll::ctl(
                epoll,
                epoll::ControlOptions::EPOLL_CTL_ADD,
                fd,
                epoll::Event::new(epoll::Events::EPOLLIN, t as u64),
            )
        };
        watch(self.events.shutdown_evt.as_raw_fd(), Token::Shutdown)?;
        watch(self.events.reset_evt.as_raw_fd(), Token::Reset)?;
        watch(self.events.error_evt.as_raw_fd(), Token::Error)?;
        watch(self.signals.as_raw_fd(), Token::Signal)?;
        watch(self.events.eject_evt.as_raw_fd(), Token::Eject)?;
        watch(self.events.status_evt.as_raw_fd(), Token::DriverStatus)?;
        if let Some((_, evt)) = &self.api {
            watch(evt.as_raw_fd(), Token::Api)?;
        }
        watch(self.migration_evt.as_raw_fd(), Token::Migration)?;

        let mut vm = match self.cfg.incoming.clone() {
            Some(inc) => self.receive_migration(&inc)?,
            None => self.boot()?,
        };
        let mut ready = vec![epoll::Event::new(epoll::Events::empty(), 0); 8];
        let mut next_reraise = Instant::now();
        loop {
            self.expire_removals(&mut vm);
            self.finish_adding(&mut vm);
            self.advance_hold();
            self.steering.run();
            for input in self.failover.expired_timers() {
                let actions = self.failover.machine.handle(input);
                self.carry_out(Some(&mut vm), actions);
            }
            // Hotplug news the guest has not read: its interrupt may have been lost.
            let mut wake = self
                .pending
                .iter()
                .map(|p| p.deadline)
                .chain(self.failover.next_deadline())
                .chain(self.steering.next_deadline())
                .chain((!self.adding.is_empty()).then(|| Instant::now() + ADDING_POLL))
                .min();
            if vm.hotplug_pending() == (0, 0) {
                next_reraise = Instant::now() + HOTPLUG_RERAISE;
            } else {
                if Instant::now() >= next_reraise {
                    vm.reraise_hotplug();
                    next_reraise = Instant::now() + HOTPLUG_RERAISE;
                }
                wake = Some(wake.map_or(next_reraise, |w| w.min(next_reraise)));
            }
            let timeout_ms = wake
                .map(|w| w.saturating_duration_since(Instant::now()))
                .map_or(-1, |d| d.as_millis().min(60_000) as i32 + 1);
            let n = match epoll::wait(epoll, timeout_ms, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            for ev in &ready[..n] {
                let Some(token) = Token::from_u64(ev.data) else {
                    continue;
                };
                match token {
                    Token::Shutdown => {
                        let _ = self.events.shutdown_evt.read();
                        tracing::info!("the guest powered off");
                        self.shutdown_event("the guest powered off");
                        vm.stop();
                        return Ok(Exit::Shutdown);
                    }
                    Token::Migration => {
                        let _ = self.migration_evt.read();
                        if self.handle_migration(&mut vm) {
                            self.shutdown_event("migrated");
                            vm.stop();
                            return Ok(Exit::Migrated);
                        }
                    }
                    Token::Reset => {
                        let _ = self.events.reset_evt.read();
                        tracing::info!("the guest reset; booting again");
                        self.cancel_migration("the guest reset");
                        self.abandon_adding("the guest reset before it was plugged");
                        vm.stop();
                        self.forget_old_resets();
                        self.steering.clear();
                        vm = self.boot()?;
                    }
                    Token::Error => {
                        let _ = self.events.error_evt.read();
                        let msg = self
                            .events
                            .take_error()
                            .unwrap_or_else(|| "unknown vCPU error".into());
                        self.shutdown_event(&format!("error: {msg}"));
                        vm.stop();
                        return Err(VmmError::Guest(msg));
                    }
                    Token::Signal => {
                        let sig = read_signal(self.signals.as_raw_fd()).unwrap_or(libc::SIGTERM);
                        tracing::info!("signal {sig}: stopping");
                        self.shutdown_event(&format!("signal {sig}"));
                        vm.stop();
                        return Ok(Exit::Signal(sig));
                    }
                    Token::Eject => {
                        let _ = self.events.eject_evt.read();
                        self.handle_ejects(&mut vm);
                    }
                    Token::DriverStatus => {
                        let _ = self.events.status_evt.read();
                        self.handle_driver_status(&mut vm);
                    }
                    Token::Api => match self.handle_api(&mut vm) {
                        None => {}
                        Some(ApiAction::Exit(exit)) => {
                            self.shutdown_event("vm.shutdown");
                            vm.stop();
                            return Ok(exit);
                        }
                        Some(ApiAction::Reboot) => {
                            tracing::info!("reboot requested through the API");
                            self.cancel_migration("the VM rebooted");
                            self.abandon_adding("the VM rebooted before it was plugged");
                            // Stop first: the new boot reopens the same taps.
                            vm.stop();
                            self.forget_old_resets();
                            self.steering.clear();
                            vm = self.boot()?;
                        }
                    },
                }
            }
            // Whoever waited has been answered: passthrough functions that left the
            // bus are quiesced, and those that nothing names any more are closed (a
            // hidden failover primary stays open for its return, and so does a function
            // opened for a `vm.add-device` still to be carried out).
            let configured: Vec<_> = self
                .cfg
                .devices
                .iter()
                .map(|d| d.path.clone())
                .chain(self.adding.iter().map(|a| a.spec.path.clone()))
                .collect();
            vm.settle_removed(|p| configured.iter().any(|c| c == p));
        }
    }

    /// The last event: subscribers get it and the end of their stream before the VMM
    /// exits.
    fn shutdown_event(&self, reason: &str) {
        self.hub.publish(
            None,
            EventKind::VmShutdown {
                reason: reason.into(),
            },
        );
        self.hub.close(Duration::from_secs(1));
    }

    /// Drops reset requests the stopped VM made after the one being acted on: Linux
    /// writes the ACPI reset register and then tries the i8042 too, and that second
    /// request, made while the vCPUs were being stopped, must not reset the new boot.
    /// Only called once every vCPU of the old VM has stopped.
    fn forget_old_resets(&self) {
        if let Ok(n) = self.events.reset_evt.read() {
            tracing::debug!("dropped {n} further reset request(s) of the old boot");
        }
    }

    /// Answer every queued API request; `Some` when one ends the VMM.
    fn handle_api(&mut self, vm: &mut Vm) -> Option<ApiAction> {
        let Some((rx, evt)) = &self.api else {
            return None;
        };
        let _ = evt.read();
        let msgs: Vec<ApiMessage> = rx.try_iter().collect();
        let mut exit = None;
        let mut reboot = false;
        for msg in msgs {
            let endpoint = msg.request.endpoint;
            if !msg.claim.take() {
                // The API thread stopped waiting and told the client so.
                tracing::warn!(
                    "API request {endpoint:?} dropped: its client was told it would not be carried out"
                );
                continue;
            }
            let changes_devices = matches!(
                endpoint,
                Endpoint::VmAddNet
                    | Endpoint::VmAddDevice
                    | Endpoint::VmRemoveDevice
                    | Endpoint::VmReboot
                    | Endpoint::VmPause
                    | Endpoint::VmResume
            );
            if changes_devices && self.migration.is_some() {
                let _ = msg.reply.send(Err(ApiError::conflict(
                    "a migration is under way: cancel it first (vm.cancel-migration)",
                )));
                continue;
            }
            let reply: ApiResponse = match endpoint {
                Endpoint::VmSendMigration => self.send_migration(vm, &msg.request.body),
                Endpoint::VmCancelMigration => match &self.migration {
                    Some(m) if m.frozen.is_none() => {
                        m.cancel.store(true, Ordering::SeqCst);
                        Ok(serde_json::json!({ "cancelling": true }))
                    }
                    Some(_) => Err(ApiError::conflict(
                        "the migration is in its last step (the guest is stopped): too late to cancel",
                    )),
                    None => Err(ApiError::conflict("no migration is under way")),
                },
                Endpoint::VmAddNet => self.add_net(vm, &msg.request.body),
                Endpoint::VmAddDevice => {
                    // Answered now, or once its function is open.
                    self.add_device(vm, &msg.request.body, msg.reply);
                    continue;
                }
                Endpoint::VmRemoveDevice => {
                    // Answered now, or once the guest releases the device.
                    self.remove_device(vm, &msg.request.body, msg.reply);
                    continue;
                }
                Endpoint::Ping => Ok(serde_json::json!({
                    "version": env!("CARGO_PKG_VERSION"),
                    "pid": std::process::id(),
                })),
                Endpoint::VmInfo => self.info(vm),
                Endpoint::VmPause => vm
                    .pause()
                    .map(|_| {
                        self.hub.publish(None, EventKind::VmPaused);
                        serde_json::Value::Null
                    })
                    .map_err(|e| match e {
                        VmError::Control(c @ VcpuControlError::Timeout(..)) => {
                            ApiError::timeout(format!("{c}; the VM keeps running"))
                        }
                        VmError::Control(c) => ApiError::conflict(c.to_string()),
                        other => ApiError::internal(other.to_string()),
                    }),
                Endpoint::VmResume => vm
                    .resume()
                    .map(|_| {
                        self.hub.publish(None, EventKind::VmResumed);
                        serde_json::Value::Null
                    })
                    .map_err(|e| ApiError::conflict(e.to_string())),
                // Served by the API thread itself; never sent here.
                Endpoint::Events => Err(ApiError::internal(
                    "the event stream is served by the API thread",
                )),
                Endpoint::VmShutdown => {
                    exit = Some(Exit::Shutdown);
                    Ok(serde_json::Value::Null)
                }
                Endpoint::VmReboot => {
                    reboot = true;
                    Ok(serde_json::Value::Null)
                }
            };
            let _ = msg.reply.send(reply);
        }
        exit.map(ApiAction::Exit)
            .or(reboot.then_some(ApiAction::Reboot))
    }

    /// `vm.add-net`: the body is `--net` as a JSON object.
    fn add_net(&mut self, vm: &mut Vm, body: &serde_json::Value) -> ApiResponse {
        let kv = api::json_to_kv(api::SpecBody::Net, body).map_err(ApiError::bad_request)?;
        // Default ids count up past every id in use.
        let mut n = self.cfg.nets.len();
        while self.cfg.nets.iter().any(|s| s.net.id == format!("net{n}")) {
            n += 1;
        }
        let spec = config::parse_net(&kv, n).map_err(refused)?;
        let mut all = self.cfg.nets.clone();
        all.push(spec.clone());
        config::check_nets(&all).map_err(refused)?;
        let slot = vm.hot_add_net(&spec).map_err(add_failed)?;
        tracing::info!("device {} hot-added in slot {slot}", spec.net.id);
        self.hub.publish(
            Some(&spec.net.id),
            EventKind::DeviceAdded {
                slot,
                kind: "virtio-net".into(),
            },
        );
        let id = spec.net.id.clone();
        if spec.net.standby {
            if let Err(e) = self.failover.machine.add_standby(&id) {
                tracing::warn!("device {id}: {e}");
            }
        }
        self.cfg.nets.push(config::NetSpec {
            slot: Some(slot),
            ..spec
        });
        serde_json::to_value(DeviceAdded {
            id,
            slot,
            bdf: format!("0000:00:{slot:02x}.0"),
        })
        .map_err(|e| ApiError::internal(e.to_string()))
    }

    /// Take device `id` (not a failover primary) off the machine and out of the
    /// configuration.
    fn drop_device(&mut self, vm: &mut Vm, id: &str, surprise: bool) -> Result<usize, VmError> {
        let slot = vm.remove_device(id, surprise)?;
        self.cfg.nets.retain(|n| n.net.id != id);
        self.cfg.devices.retain(|d| d.id != id);
        // A standby without a primary (one with a primary is never dropped alone).
        let _ = self.failover.machine.remove_standby(id);
        Ok(slot)
    }

    /// The slot a failover primary has or will have.
    fn primary_slot(&self, id: &str) -> usize {
        self.cfg
            .devices
            .iter()
            .find(|d| d.id == id)
            .and_then(|d| d.slot)
            .unwrap_or(0)
    }

    /// `vm.add-device`: the body is `--device` as a JSON object. A function that is not
    /// open yet is opened off this loop (it maps all of guest RAM for the device's DMA:
    /// seconds for a big guest), and the request is carried out and answered once it
    /// is; meanwhile the API answers everything else.
    fn add_device(&mut self, vm: &mut Vm, body: &serde_json::Value, reply: api::Answer) {
        let spec = match self.device_spec(body) {
            Ok(spec) => spec,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        // What the plug would refuse, refused before anything is opened (a failover
        // primary's slot is checked when it is added below).
        let slot = spec.slot.filter(|_| spec.failover.is_none());
        if let Err(e) = vm.devices().check_vfio_add(&spec.id, &spec.path, slot) {
            let _ = reply.send(Err(add_failed(e.into())));
            return;
        }
        if vm.open_for_plug(&spec.path) {
            tracing::info!(
                "vm.add-device {}: opening {} off the control loop; answered once it is plugged",
                spec.id,
                spec.path.display()
            );
            self.adding.push(PendingAdd {
                spec,
                reply,
                since: Instant::now(),
            });
            return;
        }
        let _ = reply.send(self.add_device_spec(vm, spec));
    }

    /// A `vm.add-device` body as a device, checked against the VM's configuration and
    /// the requests still being carried out.
    fn device_spec(&self, body: &serde_json::Value) -> Result<DeviceSpec, ApiError> {
        let kv = api::json_to_kv(api::SpecBody::Device, body).map_err(ApiError::bad_request)?;
        let mut n = self.cfg.devices.len() + self.adding.len();
        let taken = |id: &str| {
            self.cfg.devices.iter().any(|d| d.id == id)
                || self.adding.iter().any(|a| a.spec.id == id)
        };
        while taken(&format!("dev{n}")) {
            n += 1;
        }
        let spec = config::parse_device(&kv, n).map_err(refused)?;
        if let Some(a) = self
            .adding
            .iter()
            .find(|a| a.spec.id == spec.id || a.spec.path == spec.path)
        {
            return Err(ApiError::conflict(format!(
                "--device {}: {} is being added as {} already",
                spec.id,
                a.spec.path.display(),
                a.spec.id
            )));
        }
        let mut all = self.cfg.devices.clone();
        all.extend(self.adding.iter().map(|a| a.spec.clone()));
        all.push(spec.clone());
        config::check_devices(&self.cfg.nets, &all).map_err(refused)?;
        config::check_vfio_host(&spec).map_err(refused)?;
        config::check_primary_mac(&spec, &self.cfg.nets).map_err(refused)?;
        Ok(spec)
    }

    /// Carry out and answer the `vm.add-device` requests whose functions are open (or
    /// could not be: the plug opens them again and says why).
    fn finish_adding(&mut self, vm: &mut Vm) {
        if self.adding.is_empty() || vm.is_opening() {
            return;
        }
        for a in std::mem::take(&mut self.adding) {
            let id = a.spec.id.clone();
            let answer = self.add_device_spec(vm, a.spec);
            tracing::info!(
                "vm.add-device {id}: answered {} ms after the request",
                a.since.elapsed().as_millis()
            );
            let _ = a.reply.send(answer);
        }
    }

    /// The `vm.add-device` requests still waiting for their functions get `why`.
    fn abandon_adding(&mut self, why: &str) {
        for a in std::mem::take(&mut self.adding) {
            let _ = a.reply.send(Err(ApiError::conflict(format!(
                "--device {}: not added: {why}; add it again",
                a.spec.id
            ))));
        }
    }

    /// Adds the passthrough device `spec` (checked here against what the VM has): a
    /// failover primary waits for its standby, anything else is hot-added at once.
    pub(crate) fn add_device_spec(
        &mut self,
        vm: &mut Vm,
        mut spec: config::DeviceSpec,
    ) -> ApiResponse {
        let mut all = self.cfg.devices.clone();
        all.push(spec.clone());
        config::check_devices(&self.cfg.nets, &all).map_err(refused)?;
        config::check_vfio_host(&spec).map_err(refused)?;
        let mac_note = config::check_primary_mac(&spec, &self.cfg.nets).map_err(refused)?;
        let slot = match &spec.failover {
            Some(standby) => {
                let slot = match spec.slot {
                    Some(s) if vm.devices().id_in(s).is_some() => {
                        return Err(ApiError::conflict(format!(
                            "--device {}: slot {s} is already used by {}",
                            spec.id,
                            vm.devices().id_in(s).unwrap_or("?")
                        )))
                    }
                    Some(s) => s,
                    None => vm
                        .devices()
                        .last_free_slot()
                        .ok_or_else(|| ApiError::conflict("no free PCI slot"))?,
                };
                spec.slot = Some(slot);
                let actions = self
                    .failover
                    .machine
                    .add_primary(standby, &spec.id, slot as u8)
                    .map_err(|e| ApiError::conflict(format!("--device {}: {e}", spec.id)))?;
                vm.reserve_slot(slot);
                if let Some(note) = mac_note {
                    tracing::info!("{note}");
                }
                self.cfg.devices.push(spec.clone());
                tracing::info!(
                    "device {}: failover primary of {standby}, slot {slot}",
                    spec.id
                );
                self.carry_out(Some(vm), actions);
                slot
            }
            None => {
                let slot = vm.hot_add_vfio(&spec).map_err(add_failed)?;
                self.hub.publish(
                    Some(&spec.id),
                    EventKind::DeviceAdded {
                        slot,
                        kind: "vfio-pci".into(),
                    },
                );
                spec.slot = Some(slot);
                self.cfg.devices.push(spec.clone());
                slot
            }
        };
        serde_json::to_value(DeviceAdded {
            id: spec.id,
            slot,
            bdf: format!("0000:00:{slot:02x}.0"),
        })
        .map_err(|e| ApiError::internal(e.to_string()))
    }

    /// Carry out what the failover machine decided, in order. `vm` is None while
    /// rebooting: the old VM is gone, and its devices with it.
    fn carry_out(&mut self, mut vm: Option<&mut Vm>, actions: Vec<net_failover::Action>) {
        use net_failover::{Action, EventKind as Fo, SurpriseCause};
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Plug { primary, slot } => {
                    let Some(vm) = vm.as_deref_mut() else {
                        continue;
                    };
                    let spec = self.cfg.devices.iter().find(|d| d.id == primary).cloned();
                    let result = match spec {
                        Some(spec) => vm
                            .hot_add_vfio(&DeviceSpec {
                                slot: Some(usize::from(slot)),
                                ..spec
                            })
                            .map_err(|e| e.to_string()),
                        None => Err("not configured".into()),
                    };
                    match result {
                        Ok(slot) => {
                            self.hub.publish(
                                Some(&primary),
                                EventKind::DeviceAdded {
                                    slot,
                                    kind: "vfio-pci".into(),
                                },
                            );
                        }
                        Err(e) => {
                            tracing::error!(
                                "failover primary {primary}: cannot plug it in slot {slot}: {e}; it stays hidden until the guest negotiates STANDBY again"
                            );
                            // Its PrimaryPlugged event, next in the queue, did not happen.
                            queue.retain(|a| !matches!(a, Action::Event(ev) if ev.device == primary && matches!(ev.kind, Fo::PrimaryPlugged { .. })));
                            let more = self
                                .failover
                                .machine
                                .handle(net_failover::Input::PlugFailed { primary });
                            for a in more.into_iter().rev() {
                                queue.push_front(a);
                            }
                        }
                    }
                }
                Action::RequestEject { primary, slot } => {
                    let Some(vm) = vm.as_deref_mut() else {
                        continue;
                    };
                    if let Err(e) = vm.request_eject(&primary) {
                        tracing::warn!("failover primary {primary} (slot {slot}): {e}");
                    }
                }
                Action::Unplug {
                    primary,
                    slot,
                    notify_guest,
                } => {
                    let Some(vm) = vm.as_deref_mut() else {
                        continue;
                    };
                    // The network must find the guest behind the standby's tap now, first
                    // thing, before the function's reset. (The configuration still names
                    // the standby: an API removal forgets the primary only when it is
                    // answered, after this.)
                    self.steering.stop(&primary);
                    let standby = self.cfg.devices.iter().find(|d| d.id == primary);
                    if let Some(standby) = standby.and_then(|d| d.failover.as_deref()) {
                        vm.devices().announce(standby);
                    }
                    let t = Instant::now();
                    match vm.remove_device(&primary, notify_guest) {
                        // The function stays open until it comes back or the
                        // configuration forgets it (an API removal, once answered);
                        // it is quiesced once the removal is answered.
                        Ok(_) => tracing::info!(
                            "failover primary {primary}: off the bus in {:.1} ms",
                            t.elapsed().as_secs_f64() * 1000.0
                        ),
                        Err(e) => tracing::warn!("failover primary {primary} (slot {slot}): {e}"),
                    }
                }
                Action::StartTimer { token, after } => self.failover.start_timer(token, after),
                Action::Event(ev) => {
                    let slot = match ev.kind {
                        Fo::FailoverNegotiated => vm
                            .as_deref()
                            .and_then(|vm| vm.devices().slot_of(&ev.device))
                            .unwrap_or(0),
                        _ => self.primary_slot(&ev.device),
                    };
                    let kind = match ev.kind {
                        Fo::FailoverNegotiated => {
                            tracing::info!("device {}: the guest acked STANDBY", ev.device);
                            EventKind::FailoverNegotiated { slot }
                        }
                        Fo::PrimaryPlugged { slot } => EventKind::PrimaryPlugged {
                            slot: usize::from(slot),
                        },
                        Fo::EjectRequested { slot, reason } => {
                            tracing::info!(
                                "failover primary {}: eject requested (slot {slot}, {reason:?})",
                                ev.device
                            );
                            EventKind::EjectRequested {
                                slot: usize::from(slot),
                            }
                        }
                        Fo::DeviceReleased { asked } => EventKind::DeviceReleased { slot, asked },
                        Fo::SurpriseRemoved { cause } => EventKind::SurpriseRemoved {
                            slot,
                            cause: match cause {
                                SurpriseCause::Api => "api",
                                SurpriseCause::Timeout => "timeout",
                                SurpriseCause::VmReset => "reboot",
                            }
                            .into(),
                        },
                        Fo::RemovalTimedOut => EventKind::RemovalTimedOut { slot },
                        Fo::PrimaryHidden => {
                            tracing::info!("failover primary {} hidden", ev.device);
                            EventKind::PrimaryHidden { slot }
                        }
                    };
                    self.hub.publish(Some(&ev.device), kind);
                }
                Action::Reply { request, result } => {
                    let Some(w) = self.failover.answer(request) else {
                        continue;
                    };
                    let answer = match result {
                        // A migration's hold: the primary stays configured, off the bus.
                        Ok(how) if w.hold => Ok(serde_json::json!({
                            "id": w.id,
                            "how": format!("{how:?}"),
                        })),
                        Ok(how) => {
                            // An API removal ends the primary's configuration.
                            self.cfg.devices.retain(|d| d.id != w.id);
                            if let Some(vm) = vm.as_deref_mut() {
                                vm.release_slot(w.slot);
                            }
                            let steps = match how {
                                net_failover::Removed::Released => {
                                    vm.as_deref().and_then(|vm| vm.release_steps(w.slot))
                                }
                                _ => None,
                            };
                            let how = match how {
                                net_failover::Removed::Released => "released",
                                net_failover::Removed::Surprise => "surprise",
                                net_failover::Removed::VmReset => "reboot",
                                net_failover::Removed::WasHidden => "hidden",
                            };
                            removed(&w.id, w.slot, how, w.started, steps)
                        }
                        Err(e @ net_failover::RemoveError::NotFound(_)) => {
                            Err(ApiError::not_found(e.to_string()))
                        }
                        Err(e @ net_failover::RemoveError::AlreadyRemoving(_)) => {
                            Err(ApiError::conflict(e.to_string()))
                        }
                        Err(e @ net_failover::RemoveError::TimedOut(_)) => {
                            Err(ApiError::timeout(e.to_string()))
                        }
                    };
                    let _ = w.reply.send(answer);
                }
            }
        }
    }

    /// Drivers started, negotiated STANDBY, or reset their devices: tell the event
    /// stream, and the failover pairs (a standby's ack plugs its primary, its reset
    /// hides it).
    fn handle_driver_status(&mut self, vm: &mut Vm) {
        for (id, st) in self.events.take_driver_status() {
            // A device already gone (its status raced its removal) has no slot.
            let Some(slot) = vm.devices().slot_of(&id) else {
                continue;
            };
            let standby = self
                .cfg
                .nets
                .iter()
                .any(|n| n.net.id == id && n.net.standby);
            let input = match st {
                DriverStatus::FeaturesOk(f) if standby && acks_standby(f) => {
                    Some(net_failover::Input::StandbyAcked {
                        standby: id.clone(),
                    })
                }
                DriverStatus::FeaturesOk(_) => continue,
                DriverStatus::DriverOk => {
                    self.hub.publish(Some(&id), EventKind::DriverReady { slot });
                    self.steer_to_primary(&id);
                    None
                }
                DriverStatus::Reset => {
                    self.hub.publish(Some(&id), EventKind::DriverReset { slot });
                    standby.then(|| net_failover::Input::StandbyReset {
                        standby: id.clone(),
                    })
                }
            };
            if let Some(input) = input {
                let actions = self.failover.machine.handle(input);
                self.carry_out(Some(vm), actions);
            }
        }
    }

    /// A failover primary's driver came up in the guest: the host's bridge must find the
    /// guest behind the primary now, not behind the standby's tap (see [`crate::steer`]).
    fn steer_to_primary(&mut self, id: &str) {
        let Some(standby) = self
            .cfg
            .devices
            .iter()
            .find(|d| d.id == id)
            .and_then(|d| d.failover.as_deref())
        else {
            return;
        };
        if let Some(n) = self
            .cfg
            .nets
            .iter()
            .find(|n| n.net.id == standby && n.net.announce)
        {
            self.steering.start(id, &n.net.tap, n.net.mac);
        }
    }

    fn info(&self, vm: &Vm) -> ApiResponse {
        let mut devices = vec![
            DeviceInfo {
                id: "com1".into(),
                kind: "serial-16550a".into(),
                location: {
                    let s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                    let (ier, iir, lsr) = s.registers().unwrap_or_default();
                    format!(
                        "pio 0x3f8 irq 4 (input unread {} B, ier {ier:#x} iir {iir:#x} lsr {lsr:#x})",
                        s.pending_input(),
                    )
                },
                counters: None,
            },
            DeviceInfo {
                id: "i8042".into(),
                kind: "i8042".into(),
                location: "pio 0x60".into(),
                counters: None,
            },
            DeviceInfo {
                id: "acpi-pm".into(),
                kind: "acpi-pm".into(),
                location: "pio 0x600".into(),
                counters: None,
            },
        ];
        let (up, down) = vm.hotplug_pending();
        devices.push(DeviceInfo {
            id: "pci-hotplug".into(),
            kind: "acpi-pci-hotplug".into(),
            location: format!(
                "pio {:#x}, GED gsi {} (unread: rescan {up:#x}, eject {down:#x}; interrupts raised: {}; removals waiting: {})",
                devices::pci::hotplug::HOTPLUG_BASE,
                devices::pci::hotplug::HOTPLUG_GSI,
                vm.hotplug_raised(),
                self.pending.len()
            ),
            counters: None,
        });
        devices.push(DeviceInfo {
            id: "host-bridge".into(),
            kind: "pci-host-bridge".into(),
            location: "pci 00:00.0".into(),
            counters: None,
        });
        devices.extend(vm.devices().info());
        let info = VmInfo {
            state: if vm.paused() {
                VmState::Paused
            } else {
                VmState::Running
            },
            config: serde_json::to_value(&self.cfg)
                .map_err(|e| ApiError::internal(e.to_string()))?,
            devices,
            boots: self.boots,
            pairs: self
                .failover
                .machine
                .pairs()
                .into_iter()
                .map(|p| {
                    let kept_open = p.primary.as_ref().is_some_and(|(id, ..)| {
                        self.cfg
                            .devices
                            .iter()
                            .any(|d| &d.id == id && vm.devices().is_kept_open(&d.path))
                    });
                    let (primary, slot, state) = match p.primary {
                        Some((id, slot, st)) => (
                            Some(id),
                            Some(usize::from(slot)),
                            match st {
                                net_failover::PrimaryState::Hidden => "hidden",
                                net_failover::PrimaryState::Plugged => "plugged",
                                net_failover::PrimaryState::Ejecting => "ejecting",
                            },
                        ),
                        None => (None, None, "none"),
                    };
                    api::PairInfo {
                        standby: p.standby,
                        negotiated: p.negotiated,
                        primary,
                        slot,
                        state: state.into(),
                        parked: p.parked,
                        held: p.held,
                        kept_open,
                    }
                })
                .collect(),
            vcpus: if vm.paused() {
                vm.parked_at()
                    .into_iter()
                    .map(|(id, regs)| format!("vcpu{id}: {regs}"))
                    .collect()
            } else {
                vec![]
            },
        };
        serde_json::to_value(info).map_err(|e| ApiError::internal(e.to_string()))
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        // The guest's last words reach the terminal, file or socket before we go.
        if let Some(d) = &self.serial_drain {
            d.wait(Duration::from_secs(2));
        }
        for p in &self.sockets {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_socket_path_removes_only_stale_sockets() {
        let dir = std::env::temp_dir().join(format!("tandem-claim-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();

        // Nothing there: fine.
        claim_socket_path(&dir.join("none"), "--api-socket").unwrap();

        // A regular file (a disk image named by mistake) is refused and kept.
        let file = dir.join("disk.img");
        std::fs::write(&file, b"precious").unwrap();
        let e = claim_socket_path(&file, "--serial socket").unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");

        // So is a directory, and a symlink (even one to a stale socket).
        let sub = dir.join("sub");
        std::fs::create_dir(&sub).unwrap();
        assert!(claim_socket_path(&sub, "--api-socket").is_err());
        assert!(sub.is_dir());
        let stale = dir.join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let link = dir.join("link.sock");
        std::os::unix::fs::symlink(&stale, &link).unwrap();
        assert!(claim_socket_path(&link, "--api-socket").is_err());
        assert!(std::fs::symlink_metadata(&link).is_ok());

        // A live socket is refused; a stale one is removed.
        let live = dir.join("live.sock");
        let listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
        let e = claim_socket_path(&live, "--api-socket").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        drop(listener);
        claim_socket_path(&stale, "--api-socket").unwrap();
        assert!(!stale.exists());

        std::fs::remove_dir_all(&dir).unwrap();
    }
}
