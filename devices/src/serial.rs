//! The COM1 UART (a 16550A from vm-superio) and its host-side backends.
//!
//! Output goes to a [`SerialSink`]; input arrives from a backend thread that
//! pushes bytes into the UART's receive FIFO, waiting while the FIFO is full
//! so that nothing the host sends is dropped (the guest agent depends on it).
//!
//! The device outlives a guest reboot: [`Serial::reset`] rebuilds the UART
//! registers with the new VM's interrupt while the backend stays connected.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use vm_superio::serial::NoEvents;
use vm_superio::Trigger;

use crate::bus::BusDevice;
use crate::Interrupt;

/// COM1's port base and IRQ.
pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
const LSR_DATA_READY: u8 = 1;
const IER_RDA: u8 = 1;
const FIFO_SIZE: usize = 64;
/// How long input may sit unread before the interrupt is raised again.
const STALL: Duration = Duration::from_millis(20);
/// After this long without the guest reading anything, re-raise less often
/// (every [`SLOW_KICK`]), or stop if the guest has the interrupt disabled.
const GIVE_UP: Duration = Duration::from_secs(5);
const SLOW_KICK: Duration = Duration::from_millis(500);
/// What a socket backend keeps of the output while no client is connected.
const UNCONNECTED_BACKLOG: usize = 256 * 1024;

/// vm-superio's interrupt trigger over our [`Interrupt`].
#[derive(Clone)]
pub struct IrqTrigger(pub Arc<dyn Interrupt>);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// Where the guest's serial output goes.
pub type SerialSink = Box<dyn Write + Send>;

pub struct Serial {
    uart: Option<vm_superio::Serial<IrqTrigger, NoEvents, SerialSink>>,
}

impl Serial {
    pub fn new(irq: Arc<dyn Interrupt>, out: SerialSink) -> Self {
        Self {
            uart: Some(vm_superio::Serial::new(IrqTrigger(irq), out)),
        }
    }

    /// Power-on state with a new interrupt (after a VM reset); the output
    /// sink, and so the host connection, is kept — and so is host input the
    /// guest has not read yet (it was sent to the machine, not to one boot).
    pub fn reset(&mut self, irq: Arc<dyn Interrupt>) {
        if let Some(old) = self.uart.take() {
            let pending = old.state().in_buffer;
            let out = old.into_writer();
            let mut state = vm_superio::serial::SerialState::default();
            if !pending.is_empty() {
                state.line_status |= LSR_DATA_READY;
                state.in_buffer = pending;
            }
            let trigger = IrqTrigger(irq);
            self.uart = Some(
                match vm_superio::Serial::from_state(&state, trigger.clone(), NoEvents, out) {
                    Ok(u) => u,
                    // Only possible with an over-full FIFO, which `state()` never returns.
                    Err(_) => vm_superio::Serial::new(trigger, Box::new(io::sink())),
                },
            );
        }
    }

    /// Bytes queued for the guest that it has not read yet.
    pub fn pending_input(&self) -> usize {
        self.uart
            .as_ref()
            .map_or(0, |u| FIFO_SIZE - u.fifo_capacity())
    }

    /// IER, IIR and LSR as the guest last left them (for diagnostics; reading
    /// them here changes nothing).
    pub fn registers(&self) -> Option<(u8, u8, u8)> {
        self.uart.as_ref().map(|u| {
            let st = u.state();
            (
                st.interrupt_enable,
                st.interrupt_identification,
                st.line_status,
            )
        })
    }

    /// Whether the guest enabled the received-data interrupt.
    pub fn rx_interrupt_enabled(&self) -> bool {
        self.uart
            .as_ref()
            .is_some_and(|u| u.state().interrupt_enable & IER_RDA != 0)
    }

    /// Raise the receive interrupt again if input is waiting and the guest
    /// enabled it. The line is an edge: one that arrives while the guest has
    /// the IOAPIC pin masked (as Linux does while setting the port up) is
    /// lost, and the guest would never read the FIFO.
    pub fn kick_if_pending(&mut self) {
        let Some(uart) = self.uart.as_ref() else {
            return;
        };
        if self.pending_input() > 0 && self.rx_interrupt_enabled() {
            if let Err(e) = uart.interrupt_evt().trigger() {
                tracing::debug!("serial: re-raising the interrupt: {e}");
            }
        }
    }

    /// Queue host input for the guest; returns how many bytes fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.uart.as_mut() {
            Some(uart) => uart.enqueue_raw_bytes(bytes).unwrap_or(0),
            None => 0,
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let v = match (self.uart.as_mut(), data.len(), u8::try_from(offset)) {
            (Some(uart), 1, Ok(off)) => uart.read(off),
            _ => 0xff,
        };
        data.fill(v);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let (Some(uart), [value], Ok(off)) = (self.uart.as_mut(), data, u8::try_from(offset)) {
            if let Err(e) = uart.write(off, *value) {
                tracing::debug!("serial write failed: {e:?}");
            }
        }
    }
}

/// The UART's registers and the input the guest has not read yet.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct SerialState {
    divisor: [u8; 2],
    ier: u8,
    iir: u8,
    lcr: u8,
    lsr: u8,
    mcr: u8,
    msr: u8,
    scratch: u8,
    input: Vec<u8>,
}

impl crate::snapshot::Snapshot for Serial {
    type State = SerialState;
    const VERSION: u32 = 1;
    fn snapshot_name(&self) -> String {
        "serial".into()
    }
    fn save(&self) -> Result<SerialState, crate::snapshot::SnapshotError> {
        let st = self.uart.as_ref().map(|u| u.state()).unwrap_or_default();
        Ok(SerialState {
            divisor: [st.baud_divisor_low, st.baud_divisor_high],
            ier: st.interrupt_enable,
            iir: st.interrupt_identification,
            lcr: st.line_control,
            lsr: st.line_status,
            mcr: st.modem_control,
            msr: st.modem_status,
            scratch: st.scratch,
            input: st.in_buffer,
        })
    }
    /// The interrupt and the host backend stay this side's.
    fn restore(&mut self, s: SerialState) -> Result<(), crate::snapshot::SnapshotError> {
        if s.input.len() > FIFO_SIZE {
            return Err(crate::snapshot::SnapshotError::bad(
                "serial",
                format!(
                    "{} bytes of input in a {FIFO_SIZE}-byte FIFO",
                    s.input.len()
                ),
            ));
        }
        let Some(old) = self.uart.take() else {
            return Ok(());
        };
        let trigger = old.interrupt_evt().clone();
        let out = old.into_writer();
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: s.divisor[0],
            baud_divisor_high: s.divisor[1],
            interrupt_enable: s.ier,
            interrupt_identification: s.iir,
            line_control: s.lcr,
            line_status: s.lsr,
            modem_control: s.mcr,
            modem_status: s.msr,
            scratch: s.scratch,
            in_buffer: s.input,
        };
        match vm_superio::Serial::from_state(&state, trigger, NoEvents, out) {
            Ok(u) => {
                self.uart = Some(u);
                Ok(())
            }
            Err(e) => Err(crate::snapshot::SnapshotError::bad(
                "serial",
                format!("{e:?}"),
            )),
        }
    }
}

/// Feed `input` into the UART until EOF, waiting while its FIFO is full.
pub fn pump_input(serial: Arc<Mutex<Serial>>, mut input: impl Read) {
    let mut buf = [0u8; 256];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut rest = &buf[..n];
        // (bytes still to deliver or unread, when that last changed, last kick)
        let now = std::time::Instant::now();
        let mut last = (usize::MAX, now, now);
        // Deliver everything, then wait until the guest has read it all.
        loop {
            let mut s = serial.lock().unwrap_or_else(|e| e.into_inner());
            let taken = s.enqueue_input(rest);
            rest = &rest[taken..];
            let pending = s.pending_input();
            if rest.is_empty() && pending == 0 {
                break;
            }
            let progress = rest.len() + pending;
            if progress != last.0 {
                let now = std::time::Instant::now();
                last = (progress, now, now);
            }
            let stalled = last.1.elapsed() > GIVE_UP;
            if stalled && rest.is_empty() && !s.rx_interrupt_enabled() {
                // No driver listens: wait for more input instead.
                break;
            }
            // A driver that enabled the interrupt and has not read for a
            // while lost an edge: raise it again, for as long as it takes.
            if last.2.elapsed() > if stalled { SLOW_KICK } else { STALL } {
                s.kick_if_pending();
                last.2 = std::time::Instant::now();
            }
            drop(s);
            thread::sleep(Duration::from_millis(if stalled { 20 } else { 1 }));
        }
    }
}

/// Open a file for the guest's output (created or truncated).
/// Output waiting for a slow sink before the guest's further output is dropped.
pub const DETACHED_CAPACITY: usize = 1 << 20;

struct Pending {
    buf: VecDeque<u8>,
    /// Bytes dropped since the sink last kept up.
    dropped: u64,
    /// The writer thread is writing a chunk it took out of `buf`.
    writing: bool,
}

struct Detached {
    pending: Mutex<Pending>,
    cv: std::sync::Condvar,
    capacity: usize,
}

/// Waits for output handed to a [`detached_sink`] to reach its sink.
#[derive(Clone)]
pub struct OutputDrain(Arc<Detached>);

impl OutputDrain {
    /// Returns once everything written so far reached the sink, or after `limit`.
    pub fn wait(&self, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        let mut p = self.0.pending.lock().unwrap_or_else(|e| e.into_inner());
        while !p.buf.is_empty() || p.writing {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            p = self
                .0
                .cv
                .wait_timeout(p, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

struct DetachedWriter(Arc<Detached>);

impl Write for DetachedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut p = self.0.pending.lock().unwrap_or_else(|e| e.into_inner());
        let room = self.0.capacity.saturating_sub(p.buf.len());
        let take = buf.len().min(room);
        p.buf.extend(&buf[..take]);
        p.dropped += (buf.len() - take) as u64;
        self.0.cv.notify_all();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Hands the guest's output to `sink` on a thread of its own, so that a slow or stalled
/// sink (a full pipe, a terminal on hold, a socket client that does not read) never
/// blocks the vCPU writing the UART, nor anything waiting for the serial device. At most
/// [`DETACHED_CAPACITY`] bytes wait; past that, output is dropped and counted, and the
/// sink gets a note with the count before the next bytes.
pub fn detached_sink(sink: SerialSink) -> io::Result<(SerialSink, OutputDrain)> {
    detached_sink_with(sink, DETACHED_CAPACITY)
}

fn detached_sink_with(
    mut sink: SerialSink,
    capacity: usize,
) -> io::Result<(SerialSink, OutputDrain)> {
    let shared = Arc::new(Detached {
        pending: Mutex::new(Pending {
            buf: VecDeque::new(),
            dropped: 0,
            writing: false,
        }),
        cv: std::sync::Condvar::new(),
        capacity,
    });
    let s = shared.clone();
    thread::Builder::new().name("serial-out".into()).spawn(move || {
        crate::sandbox::enter(crate::sandbox::ThreadKind::Serial);
        loop {
        let (chunk, dropped) = {
            let mut p = s.pending.lock().unwrap_or_else(|e| e.into_inner());
            while p.buf.is_empty() {
                p = s.cv.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            let n = p.buf.len().min(64 * 1024);
            let chunk: Vec<u8> = p.buf.drain(..n).collect();
            p.writing = true;
            (chunk, std::mem::take(&mut p.dropped))
        };
        if dropped > 0 {
            let note = format!("\r\n[tandem: {dropped} bytes of serial output dropped: the output sink was too slow]\r\n");
            let _ = sink.write_all(note.as_bytes());
        }
        let _ = sink.write_all(&chunk);
        let _ = sink.flush();
        s.pending.lock().unwrap_or_else(|e| e.into_inner()).writing = false;
        s.cv.notify_all();
        }
    })?;
    Ok((
        Box::new(DetachedWriter(shared.clone())),
        OutputDrain(shared),
    ))
}

/// How big `--serial file=` grows before it is rotated.
pub const SERIAL_FILE_CAP: u64 = 64 << 20;

/// `--serial file=PATH`. A guest can print forever: when the file would pass
/// [`SERIAL_FILE_CAP`] it becomes `PATH.old` (replacing the one before) and a
/// fresh file starts, so the console never takes more than twice the cap.
pub fn file_sink(path: &Path) -> io::Result<SerialSink> {
    Ok(Box::new(RotatingFile::create(path, SERIAL_FILE_CAP)?))
}

struct RotatingFile {
    path: PathBuf,
    file: File,
    written: u64,
    cap: u64,
}

impl RotatingFile {
    fn create(path: &Path, cap: u64) -> io::Result<Self> {
        Ok(Self {
            path: path.to_path_buf(),
            file: File::create(path)?,
            written: 0,
            cap,
        })
    }

    fn rotate(&mut self) -> io::Result<()> {
        let mut old = self.path.clone().into_os_string();
        old.push(".old");
        std::fs::rename(&self.path, &old)?;
        self.file = File::create(&self.path)?;
        self.written = 0;
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written > 0 && self.written.saturating_add(buf.len() as u64) > self.cap {
            self.rotate()?;
        }
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// A unix-socket console: Tandem listens on a path; one client at a time
/// reads the guest's output and writes its input. Output produced while no
/// client is connected is kept (up to a bound) and delivered on connect.
#[derive(Clone)]
pub struct SocketConsole {
    shared: Arc<Mutex<SocketState>>,
    path: PathBuf,
}

#[derive(Default)]
struct SocketState {
    client: Option<UnixStream>,
    backlog: VecDeque<u8>,
    target: Option<Arc<Mutex<Serial>>>,
}

impl SocketConsole {
    /// Bind `path` (it must not exist) and start accepting clients. The socket is
    /// made 0600, and a client whose user is neither root nor Tandem's own is
    /// turned away (a guest console is a root shell, often).
    pub fn bind(path: &Path) -> io::Result<Self> {
        let listener = UnixListener::bind(path).map_err(|e| {
            io::Error::new(e.kind(), format!("serial socket {}: {e}", path.display()))
        })?;
        restrict_socket(path)?;
        let console = Self {
            shared: Arc::default(),
            path: path.to_path_buf(),
        };
        let c = console.clone();
        thread::Builder::new()
            .name("serial-accept".into())
            .spawn(move || {
                crate::sandbox::enter(crate::sandbox::ThreadKind::Serial);
                c.accept_loop(listener)
            })?;
        Ok(console)
    }

    /// Where input from clients goes: set once the UART exists.
    pub fn attach_input(&self, serial: Arc<Mutex<Serial>>) {
        self.shared.lock().unwrap_or_else(|e| e.into_inner()).target = Some(serial);
    }

    fn accept_loop(self, listener: UnixListener) {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            match peer_uid(&stream) {
                Ok(uid) if uid_may_connect(uid) => {}
                Ok(uid) => {
                    tracing::warn!("serial socket: turned away a client of user {uid}");
                    continue;
                }
                Err(e) => {
                    tracing::warn!("serial socket: cannot tell a client's user ({e}); turned away");
                    continue;
                }
            }
            let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
            let Ok(reader) = stream.try_clone() else {
                continue;
            };
            {
                let mut st = self.shared.lock().unwrap_or_else(|e| e.into_inner());
                // One client at a time: the newest replaces the last, whose input
                // thread sees its socket shut and ends, so it never feeds the guest
                // again.
                if let Some(old) = st.client.take() {
                    let _ = old.shutdown(std::net::Shutdown::Both);
                }
                let mut s = &stream;
                let backlog: Vec<u8> = st.backlog.drain(..).collect();
                if s.write_all(&backlog).is_err() {
                    continue;
                }
                st.client = Some(stream);
            }
            let shared = self.shared.clone();
            thread::Builder::new()
                .name("serial-input".into())
                .spawn(move || {
                    crate::sandbox::enter(crate::sandbox::ThreadKind::Serial);
                    // A client may connect before the UART exists: wait for it.
                    let serial = loop {
                        if let Some(s) = shared
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .target
                            .clone()
                        {
                            break s;
                        }
                        thread::sleep(Duration::from_millis(5));
                    };
                    pump_input(serial, reader)
                })
                .ok();
        }
    }

    pub fn sink(&self) -> SerialSink {
        Box::new(self.clone())
    }
}

impl Write for SocketConsole {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut st = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = st.client.as_mut() {
            if client.write_all(buf).is_ok() {
                return Ok(buf.len());
            }
            // The client went away: keep what follows for the next one.
            st.client = None;
        }
        st.backlog.extend(buf);
        let excess = st.backlog.len().saturating_sub(UNCONNECTED_BACKLOG);
        st.backlog.drain(..excess);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl SocketConsole {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Make the socket at `path` reachable by its owner only.
pub fn restrict_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("socket {}: cannot make it 0600: {e}", path.display()),
        )
    })
}

/// The user at the other end of `stream`.
pub fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes, a `ucred`, into `cred`,
    // which lives across the call; the fd is the stream's own.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Who may use Tandem's sockets: root and the user Tandem runs as.
pub fn uid_may_connect(uid: u32) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    uid == 0 || uid == unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_serial_file_is_rotated_at_its_cap() {
        let dir = std::env::temp_dir().join(format!("tandem-serial-rot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let mut f = RotatingFile::create(&path, 100).unwrap();
        for i in 0..10u8 {
            f.write_all(&[b'a' + i; 60]).unwrap();
        }
        // Each 60-byte write after the first of a file passes the cap: only the
        // last two stay, one per file.
        assert_eq!(std::fs::read(&path).unwrap(), vec![b'j'; 60]);
        assert_eq!(
            std::fs::read(dir.join("console.log.old")).unwrap(),
            vec![b'i'; 60]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    use super::*;

    /// Registers and unread input move with the guest; the output stays this side's.
    #[test]
    fn registers_and_unread_input_round_trip() {
        let out = Arc::new(Mutex::new(Vec::new()));
        struct Shared(Arc<Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let irq = Arc::new(vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut a = Serial::new(irq.clone(), Box::new(io::sink()));
        a.write(COM1_PORT, 3, &[0x03]); // LCR: 8N1
        a.write(COM1_PORT, 7, &[0x5a]); // scratch
        a.write(COM1_PORT, 1, &[IER_RDA]);
        assert_eq!(a.enqueue_input(b"hi"), 2);
        let mut b = Serial::new(irq, Box::new(Shared(out.clone())));
        crate::snapshot::testing::round_trip(&a, &mut b);
        let mut v = [0u8];
        b.read(COM1_PORT, 7, &mut v);
        assert_eq!(v[0], 0x5a);
        b.read(COM1_PORT, 0, &mut v);
        assert_eq!(v[0], b'h', "unread input moved");
        b.write(COM1_PORT, 0, b"x");
        assert_eq!(
            *out.lock().unwrap(),
            b"x",
            "output goes to this side's sink"
        );
        let too_much = crate::snapshot::Saved {
            version: 1,
            state: serde_json::json!({"divisor": [0, 0], "ier": 0, "iir": 1, "lcr": 0, "lsr": 0x60,
                "mcr": 0, "msr": 0, "scratch": 0, "input": vec![0u8; 65]}),
        };
        assert!(crate::snapshot::restore(&mut b, too_much).is_err());
    }
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Count(AtomicUsize);
    impl Interrupt for Count {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A sink that takes nothing until the test lets it.
    struct Gate(Arc<(Mutex<bool>, std::sync::Condvar)>, Capture);
    impl Write for Gate {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let mut open = self.0 .0.lock().unwrap();
            while !*open {
                open = self.0 .1.wait(open).unwrap();
            }
            self.1.write(b)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_sink_never_blocks_the_writer_and_drops_what_does_not_fit() {
        let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let out = Capture::default();
        let (mut w, drain) =
            detached_sink_with(Box::new(Gate(gate.clone(), out.clone())), 1000).unwrap();
        let t0 = std::time::Instant::now();
        // The writer thread takes the first chunk and blocks in the sink with it; the
        // next 1000 bytes wait; the rest is dropped.
        w.write_all(b"first").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        for _ in 0..30 {
            w.write_all(&[b'x'; 100]).unwrap();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "writes never wait for the sink"
        );
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        drain.wait(Duration::from_secs(5));
        let got = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(got.starts_with("first"), "{got:?}");
        assert!(
            got.contains("[tandem: 2000 bytes of serial output dropped"),
            "{got:?}"
        );
        assert_eq!(got.matches('x').count(), 1000);
    }

    #[test]
    fn output_and_input_through_ports() {
        let irq = Arc::new(Count::default());
        let out = Capture::default();
        let mut s = Serial::new(irq.clone(), Box::new(out.clone()));
        s.write(COM1_PORT, 0, b"A");
        assert_eq!(&*out.0.lock().unwrap(), b"A");
        // Enable the received-data interrupt, then queue input.
        s.write(COM1_PORT, 1, &[1]);
        assert_eq!(s.enqueue_input(b"hi"), 2);
        assert!(irq.0.load(Ordering::SeqCst) > 0);
        let mut b = [0u8];
        s.read(COM1_PORT, 0, &mut b);
        assert_eq!(b, *b"h");
        // Odd-sized or out-of-range accesses never panic.
        s.read(COM1_PORT, 300, &mut [0u8; 4]);
        s.write(COM1_PORT, 0, &[1, 2]);
    }

    #[test]
    fn reset_keeps_unread_input() {
        let mut s = Serial::new(Arc::new(Count::default()), Box::new(io::sink()));
        assert_eq!(s.enqueue_input(b"xy"), 2);
        s.reset(Arc::new(Count::default()));
        let mut lsr = [0u8];
        s.read(COM1_PORT, 5, &mut lsr);
        assert_eq!(lsr[0] & LSR_DATA_READY, LSR_DATA_READY);
        let mut b = [0u8];
        s.read(COM1_PORT, 0, &mut b);
        assert_eq!(b, *b"x");
    }

    #[test]
    fn input_fifo_backpressure() {
        let mut s = Serial::new(Arc::new(Count::default()), Box::new(io::sink()));
        let big = [b'x'; 200];
        let taken = s.enqueue_input(&big);
        assert!(taken < big.len());
        assert_eq!(s.enqueue_input(&big), 0);
    }
}
