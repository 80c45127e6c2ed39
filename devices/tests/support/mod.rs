//! What the data-path benchmark and the tap tests share: a network namespace of the
//! process's own with taps in it, test frames, a packet socket that sends frames out
//! of a tap (as the host's network would), and the guest's side of a split ring
//! (EVENT_IDX, interrupts as eventfds).

#![allow(dead_code)]

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::Command;
use std::sync::atomic::Ordering;

use devices::virtio::net::tap;
use devices::virtio::{GuestMemoryMmap, Queue, VirtioInterrupt};
use virtio_bindings::virtio_net::*;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

pub type Res<T> = Result<T, String>;

pub const QSIZE: u16 = 256;
pub const VNET_HDR: usize = tap::VNET_HDR_LEN;
pub const VRING_DESC_F_WRITE: u16 = 2;
pub const VIRTIO_F_VERSION_1: u32 = 32;
pub const VIRTIO_F_RING_EVENT_IDX: u32 = 29;

/// The process moves into a network namespace of its own (and a mount namespace
/// with its own /sys), with the taps `taps` in it, up. Call it before any thread starts.
pub fn netns(taps: &[&str]) -> Res<()> {
    // SAFETY: unshare with flags only; called while this is the process's only
    // thread, so every thread started later is in the new namespaces too.
    if unsafe { libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWNS) } != 0 {
        return Err(format!(
            "cannot make a network namespace ({}); run as root",
            io::Error::last_os_error()
        ));
    }
    // /sys shows the namespace it was mounted in: a private one of our own, as
    // `ip netns exec` does, so the tap is seen there.
    let none = std::ptr::null();
    // SAFETY: mount(2) with NUL-terminated literals and null data; it changes only
    // this process's new mount namespace.
    let ok = unsafe {
        libc::mount(
            none,
            c"/".as_ptr(),
            none,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) == 0
            && libc::umount2(c"/sys".as_ptr(), libc::MNT_DETACH) == 0
            && libc::mount(
                c"sysfs".as_ptr(),
                c"/sys".as_ptr(),
                c"sysfs".as_ptr(),
                0,
                std::ptr::null(),
            ) == 0
    };
    if !ok {
        return Err(format!(
            "cannot mount /sys for the namespace: {}",
            io::Error::last_os_error()
        ));
    }
    // No IPv6 on the taps: the kernel's own solicitations would join the frames.
    for knob in ["all", "default"] {
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{knob}/disable_ipv6"), "1");
    }
    ip(&["link", "set", "lo", "up"])?;
    for t in taps {
        ip(&["tuntap", "add", "dev", t, "mode", "tap"])?;
        ip(&["link", "set", t, "up"])?;
    }
    Ok(())
}

/// Run `ip` with `args`; its failure is an error.
pub fn ip(args: &[&str]) -> Res<()> {
    let st = Command::new("ip")
        .args(args)
        .status()
        .map_err(|e| format!("ip: {e}"))?;
    if !st.success() {
        return Err(format!("ip {args:?} failed"));
    }
    Ok(())
}

/// A `len`-byte Ethernet frame behind its vnet header: UDP, or with `gso` a TCP
/// segment to be split into 1,448-byte segments. Addressed to a MAC nobody here has.
pub fn frame(len: usize, gso: bool) -> Vec<u8> {
    let size = (len, gso);
    let mut f = vec![0u8; VNET_HDR + len];
    let (hdr, eth) = f.split_at_mut(VNET_HDR);
    let l4 = if size.1 { 20 } else { 8 };
    if size.1 {
        hdr[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
        hdr[1] = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
        hdr[2..4].copy_from_slice(&(14u16 + 20 + 20).to_le_bytes()); // hdr_len
        hdr[4..6].copy_from_slice(&1448u16.to_le_bytes()); // gso_size
        hdr[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
        hdr[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
    }
    eth[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    eth[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 0x01]);
    eth[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut eth[14..];
    let total = (size.0 - 14) as u16;
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = if size.1 { 6 } else { 17 };
    ip[12..16].copy_from_slice(&[10, 9, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 9, 0, 2]);
    let mut sum = 0u32;
    for w in ip[..20].chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let l = &mut ip[20..];
    l[0..2].copy_from_slice(&5001u16.to_be_bytes());
    l[2..4].copy_from_slice(&5201u16.to_be_bytes());
    if size.1 {
        l[12] = 5 << 4;
        l[13] = 0x10; // ACK
        l[14..16].copy_from_slice(&512u16.to_be_bytes());
    } else {
        l[4..6].copy_from_slice(&((size.0 - 34) as u16).to_be_bytes());
    }
    for (i, b) in l[l4..].iter_mut().enumerate() {
        *b = i as u8;
    }
    f
}

/// Interrupts as eventfds, one per queue, like KVM's irqfds.
pub struct Irqs(pub [EventFd; 3]);
impl VirtioInterrupt for Irqs {
    fn notify_queue(&self, q: usize) {
        if let Some(e) = self.0.get(q) {
            let _ = e.write(1);
        }
    }
    fn notify_config(&self) {}
}

/// The driver's view of one split ring with EVENT_IDX.
pub struct Ring {
    pub mem: GuestMemoryMmap,
    base: u64,
    pub avail_idx: u16,
    last_used: u16,
    pub free: Vec<u16>,
}

impl Ring {
    pub fn desc(&self) -> u64 {
        self.base
    }
    pub fn avail(&self) -> u64 {
        self.base + 16 * u64::from(QSIZE)
    }
    pub fn used(&self) -> u64 {
        self.base + 0x4000
    }

    pub fn new(mem: &GuestMemoryMmap, base: u64) -> Self {
        Ring {
            mem: mem.clone(),
            base,
            avail_idx: 0,
            last_used: 0,
            free: (0..QSIZE).rev().collect(),
        }
    }

    pub fn queue(&self) -> Res<Queue> {
        let mut q = Queue::new(QSIZE).map_err(|e| format!("{e:?}"))?;
        q.set_size(QSIZE);
        let a = |v: u64| (Some(v as u32), Some((v >> 32) as u32));
        let (l, h) = a(self.desc());
        q.set_desc_table_address(l, h);
        let (l, h) = a(self.avail());
        q.set_avail_ring_address(l, h);
        let (l, h) = a(self.used());
        q.set_used_ring_address(l, h);
        q.set_ready(true);
        Ok(q)
    }

    /// Post one single-descriptor chain; no kick yet.
    pub fn post(&mut self, addr: u64, len: u32, write: bool) -> Res<u16> {
        let id = self.free.pop().ok_or("ring full")?;
        let d = self.desc() + 16 * u64::from(id);
        let m = &self.mem;
        let e = |e: vm_memory::GuestMemoryError| e.to_string();
        m.write_obj(addr, GuestAddress(d)).map_err(e)?;
        m.write_obj(len, GuestAddress(d + 8)).map_err(e)?;
        let flags: u16 = if write { VRING_DESC_F_WRITE } else { 0 };
        m.write_obj(flags, GuestAddress(d + 12)).map_err(e)?;
        let slot = self.avail() + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        m.write_obj(id, GuestAddress(slot)).map_err(e)?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(id)
    }

    /// Publish what was posted since `old`; true if the device asked for a kick.
    pub fn publish(&self, old: u16) -> Res<bool> {
        std::sync::atomic::fence(Ordering::SeqCst);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail() + 2))
            .map_err(|e| e.to_string())?;
        std::sync::atomic::fence(Ordering::SeqCst);
        let event: u16 = self
            .mem
            .read_obj(GuestAddress(self.used() + 4 + 8 * u64::from(QSIZE)))
            .map_err(|e| e.to_string())?;
        // vring_need_event
        Ok(self.avail_idx.wrapping_sub(event).wrapping_sub(1) < self.avail_idx.wrapping_sub(old))
    }

    /// The used entries since last time: (id, len).
    pub fn harvest(&mut self, out: &mut VecDeque<(u16, u32)>) -> Res<()> {
        let used: u16 = self
            .mem
            .read_obj(GuestAddress(self.used() + 2))
            .map_err(|e| e.to_string())?;
        std::sync::atomic::fence(Ordering::Acquire);
        while self.last_used != used {
            let e = self.used() + 4 + 8 * u64::from(self.last_used % QSIZE);
            let id: u32 = self
                .mem
                .read_obj(GuestAddress(e))
                .map_err(|e| e.to_string())?;
            let len: u32 = self
                .mem
                .read_obj(GuestAddress(e + 4))
                .map_err(|e| e.to_string())?;
            out.push_back((id as u16, len));
            self.last_used = self.last_used.wrapping_add(1);
        }
        Ok(())
    }

    /// Ask for an interrupt at the next used entry; true if one came meanwhile.
    pub fn arm(&self) -> Res<bool> {
        self.mem
            .write_obj(
                self.last_used,
                GuestAddress(self.avail() + 4 + 2 * u64::from(QSIZE)),
            )
            .map_err(|e| e.to_string())?;
        std::sync::atomic::fence(Ordering::SeqCst);
        let used: u16 = self
            .mem
            .read_obj(GuestAddress(self.used() + 2))
            .map_err(|e| e.to_string())?;
        Ok(used != self.last_used)
    }
}

/// Waits for `irq` (at most 100 ms, so a stop is seen).
pub fn wait_irq(irq: &EventFd) {
    let mut pfd = libc::pollfd {
        fd: irq.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, 100 ms at most.
    unsafe { libc::poll(&mut pfd, 1, 100) };
    let _ = irq.read();
}

/// A packet socket on `tap`: what is written to it leaves the host through the tap,
/// towards whoever reads the tap. With `vnet_hdr`, each write starts with a
/// 10-byte virtio_net_hdr (GSO frames go whole to a tap that takes them).
pub fn packet_socket(tap: &str, vnet_hdr: bool) -> Res<File> {
    // SAFETY: plain socket(2); the fd is owned by `sock` below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(format!("packet socket: {}", io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh socket that nothing else owns.
    let sock = unsafe { File::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    if vnet_hdr
        // SAFETY: PACKET_VNET_HDR takes an int; pointer and length describe `one`.
        && unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_PACKET,
                libc::PACKET_VNET_HDR,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        } != 0
    {
        return Err(format!("PACKET_VNET_HDR: {}", io::Error::last_os_error()));
    }
    let ifindex = std::fs::read_to_string(format!("/sys/class/net/{tap}/ifindex"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .ok_or_else(|| format!("no ifindex for {tap}"))?;
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex;
    // SAFETY: binds to the tap with protocol 0 (send only); the address is `sll`.
    if unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    } != 0
    {
        return Err(format!("bind to {tap}: {}", io::Error::last_os_error()));
    }
    Ok(sock)
}
