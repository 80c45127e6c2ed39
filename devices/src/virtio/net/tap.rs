//! Tap backend: an existing tap interface opened through /dev/net/tun with a
//! virtio-net header on every frame (`IFF_VNET_HDR`), one file per queue
//! pair when the tap is multi-queue.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use thiserror::Error;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const IFF_ATTACH_QUEUE: libc::c_short = 0x0200;
const IFF_DETACH_QUEUE: libc::c_short = 0x0400;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_VNET_HDR: libc::c_short = 0x4000;
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
pub const TUN_F_UFO: u32 = 0x10;
/// virtio_net_hdr_mrg_rxbuf: what a virtio 1.x device always uses.
pub const VNET_HDR_LEN: usize = 12;

#[derive(Debug, Error)]
pub enum TapError {
    #[error("tap '{0}' does not exist (create it first, e.g. `ip tuntap add dev {0} mode tap`)")]
    Missing(String),
    #[error("'{0}' is not a tap interface")]
    NotTap(String),
    #[error("tap name '{0}' is empty or longer than 15 bytes")]
    BadName(String),
    #[error("tap '{0}' is already in use by another process")]
    Busy(String),
    #[error("tap '{name}' was not created multi-queue; {pairs} queue pairs need `ip tuntap add dev {name} mode tap multi_queue`")]
    NotMultiQueue { name: String, pairs: usize },
    #[error("tap '{name}': {op}: {source}")]
    Io {
        name: String,
        op: &'static str,
        source: io::Error,
    },
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// The tap's flags as sysfs reports them (IFF_* bits), if it is a tun/tap.
fn tun_flags(name: &str) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/sys/class/net/{name}/tun_flags")).ok()?;
    u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

/// Open `pairs` queues of the existing tap `name`.
pub fn open(name: &str, pairs: usize) -> Result<Vec<File>, TapError> {
    if name.is_empty() || name.len() > 15 || name.contains('/') {
        return Err(TapError::BadName(name.into()));
    }
    if !Path::new("/sys/class/net").join(name).exists() {
        return Err(TapError::Missing(name.into()));
    }
    let flags = tun_flags(name).ok_or_else(|| TapError::NotTap(name.into()))?;
    if flags & IFF_TAP as u32 == 0 {
        return Err(TapError::NotTap(name.into()));
    }
    let multi = flags & IFF_MULTI_QUEUE as u32 != 0;
    if pairs > 1 && !multi {
        return Err(TapError::NotMultiQueue {
            name: name.into(),
            pairs,
        });
    }
    let io = |op, source| TapError::Io {
        name: name.into(),
        op,
        source,
    };
    let mut files = Vec::new();
    for _ in 0..pairs {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| io("open /dev/net/tun", e))?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        if multi {
            req.flags |= IFF_MULTI_QUEUE;
        }
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads an ifreq, which `req` is laid out as; the
        // fd is a tun device we own.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EBUSY) {
                TapError::Busy(name.into())
            } else {
                io("TUNSETIFF", e)
            });
        }
        let hdr = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int from the pointer.
        if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) } < 0 {
            return Err(io("TUNSETVNETHDRSZ", io::Error::last_os_error()));
        }
        files.push(f);
    }
    Ok(files)
}

/// Tell the tap which offloads the guest can receive (TUN_F_* bits).
pub fn set_offload(tap: &File, flags: u32) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value.
    let r = unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Attach a multi-queue tap's queue to the interface, or detach it: a
/// detached queue gets no frames (the kernel spreads them over the attached
/// ones), and reading it fails with EBADFD.
pub fn set_queue_attached(tap: &File, attached: bool) -> io::Result<()> {
    let mut req = IfReq {
        name: [0; 16],
        flags: if attached {
            IFF_ATTACH_QUEUE
        } else {
            IFF_DETACH_QUEUE
        },
        _pad: [0; 22],
    };
    // SAFETY: TUNSETQUEUE reads the flags of an ifreq, which `req` is laid
    // out as; the fd is a tun queue we own.
    if unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETQUEUE, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The tap queues of one device, and how many of them the driver uses.
/// virtio-net's driver starts on the first queue pair and picks more with
/// VQ_PAIRS_SET; the tap must not hand frames to a pair the driver does not
/// use, so the queues of unused pairs are detached.
pub struct TapQueues {
    inner: std::sync::Mutex<TapQueuesInner>,
    active: std::sync::atomic::AtomicUsize,
    max: usize,
}

struct TapQueuesInner {
    /// One per pair (duplicates of the workers' files); empty in unit tests.
    taps: Vec<File>,
    attached: Vec<bool>,
    /// Each pair's worker wakes on this to look at `active` again.
    wakes: Vec<Option<vmm_sys_util::eventfd::EventFd>>,
}

impl TapQueues {
    /// `taps`: one per pair, all attached (as `open` leaves them); `max`:
    /// the number of pairs.
    pub fn new(taps: Vec<File>, max: usize) -> Self {
        let n = taps.len();
        Self {
            inner: std::sync::Mutex::new(TapQueuesInner {
                taps,
                attached: vec![true; n],
                wakes: (0..max).map(|_| None).collect(),
            }),
            active: std::sync::atomic::AtomicUsize::new(max),
            max,
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// How many pairs the driver uses.
    pub fn active(&self) -> usize {
        self.active.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Where pair `pair`'s worker wants to be woken when its state changes.
    pub fn set_wake(&self, pair: usize, wake: vmm_sys_util::eventfd::EventFd) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = g.wakes.get_mut(pair) {
            *w = Some(wake);
        }
    }

    /// Use the first `n` pairs (1..=max): attach their queues first, publish
    /// `n`, then detach the others, and wake every worker whose state changed.
    pub fn set_active(&self, n: usize) -> io::Result<()> {
        if !(1..=self.max).contains(&n) {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let g = &mut *g;
        let old = self.active();
        let multi = g.taps.len() > 1;
        for (i, tap) in g.taps.iter().enumerate().take(n) {
            if multi && !g.attached[i] {
                set_queue_attached(tap, true)?;
                g.attached[i] = true;
            }
        }
        self.active.store(n, std::sync::atomic::Ordering::Release);
        let mut result = Ok(());
        for (i, tap) in g.taps.iter().enumerate().skip(n) {
            if multi && g.attached[i] {
                match set_queue_attached(tap, false) {
                    Ok(()) => g.attached[i] = false,
                    Err(e) => result = Err(e),
                }
            }
        }
        let (lo, hi) = (old.min(n), old.max(n));
        for w in g.wakes.iter().take(hi).skip(lo).flatten() {
            let _ = w.write(1);
        }
        result
    }
}
