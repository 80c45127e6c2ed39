//! VFIO PCI passthrough: a host PCI function bound to `vfio-pci`, given to the
//! guest as a device on our root bus.
//!
//! What the guest reaches directly and what Tandem traps:
//!
//! ```text
//! config space   0x00..0x40  ids, class, command/status: the device's own (through VFIO);
//!                            BARs, expansion ROM, interrupt line/pin: a shadow of ours
//!                0x40..0x100 the device's capability list, except MSI-X and MSI
//!                            (emulated: the guest's enable/mask bits, addresses and
//!                            data drive VFIO and KVM routes)
//!                0x100..     reads 0: no extended capabilities on a conventional bus
//! BARs           mmap-able parts: KVM memory slots over the device's own mapping (no
//!                            exit per access), present only while the guest has memory
//!                            decoding enabled; MSI-X table and PBA pages, I/O BARs and
//!                            whatever VFIO does not let us mmap: trapped, forwarded
//! interrupts     MSI-X: VFIO signals one eventfd per vector, which *is* the vector's
//!                            KVM irqfd: nothing relays an interrupt through a thread;
//!                MSI:   the same, with one vector (Multiple Message Capable reads 0,
//!                            and no per-vector masking is offered)
//! DMA            the VMM maps all guest RAM in the VM's VFIO container (IOVA = GPA)
//! ```
//!
//! Left out on purpose: INTx (interrupt pin reads 0, so guest drivers use MSI-X or
//! MSI; a device with neither is refused), the expansion ROM.
//! A vector the guest masks loses its KVM route: what the device raises meanwhile
//! is dropped, not made pending (the host kernel owns the real table).
//!
//! The device is reset when it is opened and when it is dropped, so a guest never
//! sees the state another guest (or an earlier boot) left: vfio-pci resets a
//! function when its descriptor is first opened and when the last one closes.
//! Tandem adds no `VFIO_DEVICE_RESET` of its own; each would be one more function
//! reset (an FLR waits 100 ms) on every hot-add and every removal. A function whose
//! reset is known not to stop it (`RESET_QUIRKS`) is also reset through its own
//! register on open and on drop.
//!
//! A function that leaves the bus while its VM may want it back (a hidden failover
//! primary) is parked instead of dropped: quiesced (interrupts, decoding and bus
//! mastering off, BARs out of guest memory) but open, so its container keeps guest
//! RAM mapped. Plugged again, it gets VFIO's function reset and the quirk reset, as
//! a fresh open would, and nothing else: no close-time reset, no IOMMU unmapping
//! and re-pinning of all guest RAM.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use thiserror::Error;
use vfio_bindings::bindings::vfio::{
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioRegionInfoCap};

use crate::pci::config::{
    BAR0_REG, CAP_PTR_REG, COMMAND_STATUS_REG, FIRST_CAP_OFFSET as CAP_START, HEADER_REG,
    INTERRUPT_REG, STD_CONFIG_END,
};
use crate::pci::msix::{InterruptRoutes, MsixState, MSIX_CAP_ID, MSIX_ENTRY_SIZE};
use crate::pci::{BarKind, BarMove, PciClass, PciConfig, PciDevice};

const PAGE: u64 = 4096;
const COMMAND_REG: usize = COMMAND_STATUS_REG;
const ROM_REG: usize = 12;
const MSI_CAP_ID: u8 = 0x05;
const CMD_IO: u16 = 1;
const CMD_MEMORY: u16 = 1 << 1;
const CMD_BUS_MASTER: u16 = crate::pci::config::COMMAND_BUS_MASTER;
const MSIX_ENABLE: u16 = 1 << 15;

/// Functions whose function reset does not stop them, and the register that does.
///
/// vfio-pci resets a function when it is first opened and when it is last closed, with
/// the best method the function offers. QEMU's emulated e1000e (8086:10d3, the test
/// host's passthrough NIC) offers only a power-management reset, and its D3hot->D0
/// transition resets nothing: receive stays enabled with the last owner's ring
/// addresses (measured: RCTL and RDBAL unchanged after `echo 1 > .../reset`). The next
/// guest's driver enables bus mastering before it resets the NIC, and the NIC writes
/// frames over that guest's memory at the old rings' addresses: a guest oopsed in
/// `task_cputime` that way on 2026-12-06, booted after a VM that had lost the NIC by
/// surprise removal. The CTRL register's RST bit (bit 26 at BAR 0 offset 0 on Intel's
/// 8254x/8257x, self-clearing) resets everything but PCI config space.
struct ResetQuirk {
    vendor: u16,
    device: u16,
    what: &'static str,
}

const RESET_QUIRKS: &[ResetQuirk] = &[
    ResetQuirk {
        vendor: 0x8086,
        device: 0x10d3,
        what: "82574L (QEMU's e1000e)",
    },
    ResetQuirk {
        vendor: 0x8086,
        device: 0x100e,
        what: "82540EM (QEMU's e1000)",
    },
];
const E1000_CTRL: u64 = 0;
const E1000_CTRL_RST: u32 = 1 << 26;
/// What Linux's e1000e waits after setting CTRL.RST.
const E1000_RESET_SETTLE: std::time::Duration = std::time::Duration::from_millis(20);

/// Maps host memory (a BAR's mmap) into guest physical space: KVM memory slots,
/// behind a trait so that `devices` stays KVM-agnostic.
pub trait GuestMapper: Send + Sync {
    /// Map `len` bytes at `host` at guest physical `gpa`; returns a handle for
    /// [`GuestMapper::unmap`].
    ///
    /// # Safety
    /// `host..host+len` must stay mapped until the handle is unmapped.
    unsafe fn map(&self, gpa: u64, len: u64, host: *mut u8) -> io::Result<u32>;
    fn unmap(&self, handle: u32);
}

#[derive(Debug, Error)]
pub enum VfioPciError {
    #[error("{0}")]
    Vfio(String),
    #[error("not a PCI device with a type-0 header (header type {0:#x})")]
    NotType0(u8),
    #[error("BAR {bar}: {what}")]
    Bar { bar: usize, what: String },
    #[error("cannot map BAR {bar} of the device: {source}")]
    Mmap { bar: usize, source: io::Error },
    #[error("cannot set up MSI-X or MSI: {0}")]
    Msix(io::Error),
    #[error("the device has neither MSI-X nor MSI; Tandem does not pass through devices that only have INTx")]
    NoMsix,
}

/// Flatten a VFIO error and its causes into one line.
fn vfio_err(e: vfio_ioctls::VfioError) -> VfioPciError {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    VfioPciError::Vfio(s)
}

/// One BAR as the device declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarInfo {
    pub index: usize,
    pub kind: BarKind,
    pub size: u64,
    pub prefetch: bool,
}

/// A part of a BAR mapped from the device into our address space.
struct Mapping {
    bar: usize,
    /// Offset within the BAR (page-aligned) and length (whole pages).
    offset: u64,
    len: u64,
    host: usize,
    /// The guest mapping while it exists: (guest address, mapper handle).
    slot: Option<(u64, u32)>,
}

struct Msix {
    cap: usize,
    table_bar: usize,
    table: std::ops::Range<u64>,
    pba_bar: usize,
    pba: std::ops::Range<u64>,
    state: MsixState,
}

/// The MSI capability as the guest sees it: one vector, 32- or 64-bit addresses as
/// the device has them, no per-vector masking.
struct Msi {
    cap: usize,
    is64: bool,
    enabled: bool,
    addr_lo: u32,
    addr_hi: u32,
    data: u16,
    /// The GSI whose route follows the guest's address and data, and its irqfd,
    /// which VFIO signals when the device raises the interrupt.
    vector: Vec<(u32, vmm_sys_util::eventfd::EventFd)>,
    routes: Arc<dyn InterruptRoutes>,
}

const MSI_ENABLE: u16 = 1;
const MSI_64BIT: u16 = 1 << 7;

impl Msi {
    fn new(cap: usize, is64: bool, routes: Arc<dyn InterruptRoutes>) -> io::Result<Self> {
        Ok(Self {
            cap,
            is64,
            enabled: false,
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            vector: routes.allocate_msi(1)?,
            routes,
        })
    }

    /// The message-control word: enable and 64-bit as they are, one vector.
    fn control(&self) -> u16 {
        (if self.is64 { MSI_64BIT } else { 0 }) | u16::from(self.enabled)
    }

    /// Register `reg` of config space, within the capability.
    fn read(&self, reg: usize) -> u32 {
        match (reg - self.cap / 4, self.is64) {
            (1, _) => self.addr_lo,
            (2, true) => self.addr_hi,
            (2, false) | (3, true) => u32::from(self.data),
            _ => 0,
        }
    }

    /// The guest wrote `data` at byte `offset` of register `reg`; the address and
    /// data registers only (the control word is [`VfioPciDevice::write_msi_control`]'s).
    fn write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        let mut word = self.read(reg).to_le_bytes();
        word[offset..offset + data.len()].copy_from_slice(data);
        let v = u32::from_le_bytes(word);
        match (reg - self.cap / 4, self.is64) {
            // Dword-aligned addresses only.
            (1, _) => self.addr_lo = v & !3,
            (2, true) => self.addr_hi = v,
            (2, false) | (3, true) => self.data = v as u16,
            _ => return,
        }
        if self.enabled {
            self.route(true);
        }
    }

    /// Back to power-on state: disabled, no message, no route.
    fn reset(&mut self) {
        if self.enabled {
            self.route(false);
        }
        self.enabled = false;
        self.addr_lo = 0;
        self.addr_hi = 0;
        self.data = 0;
    }

    /// Point the vector's route at the guest's message, or take it away.
    fn route(&self, live: bool) {
        let msg = live.then(|| crate::pci::msix::MsiMessage {
            addr: u64::from(self.addr_lo) | (u64::from(self.addr_hi) << 32),
            data: u32::from(self.data),
        });
        let routes: Vec<_> = self.vector.iter().map(|(gsi, _)| (*gsi, msg)).collect();
        if let Err(e) = self.routes.set_msi_routes(&routes) {
            crate::guest_warn!("MSI: cannot update the route: {e}");
        }
    }
}

impl Drop for Msi {
    fn drop(&mut self) {
        self.routes.free_msi(&self.vector);
    }
}

pub struct VfioPciDevice {
    device: VfioDevice,
    /// BARs (with the guest's placement) and the interrupt line.
    shadow: PciConfig,
    bars: Vec<BarInfo>,
    /// Capability offsets the guest sees, in list order, and the hidden ones skipped.
    visible_caps: Vec<usize>,
    all_caps: Vec<usize>,
    msix: Option<Msix>,
    msi: Option<Msi>,
    maps: Vec<Mapping>,
    mapper: Arc<dyn GuestMapper>,
    /// Memory decoding as the guest last set it.
    memory_on: bool,
    bus_master: bool,
    ready: bool,
    on_ready: Option<Box<dyn Fn() + Send>>,
}

impl VfioPciDevice {
    /// Open the function at `sysfs` (`/sys/bus/pci/devices/BDF`) in `container`,
    /// reset it, and learn its BARs and capabilities. BARs are placed later
    /// ([`VfioPciDevice::set_bar`]); nothing reaches the guest before that.
    pub fn open(
        sysfs: &Path,
        container: Arc<VfioContainer>,
        routes: Arc<dyn InterruptRoutes>,
        mapper: Arc<dyn GuestMapper>,
    ) -> Result<Self, VfioPciError> {
        let device = VfioDevice::new(sysfs, container, false).map_err(|e| match e {
            vfio_ioctls::VfioError::OpenGroup(io, group)
                if io.raw_os_error() == Some(libc::EBUSY) =>
            {
                VfioPciError::Vfio(format!(
                    "VFIO group {group} is busy: another process (another VM?) has it open"
                ))
            }
            e => vfio_err(e),
        })?;
        let cfg = |reg: usize| -> u32 {
            let mut b = [0u8; 4];
            device.region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut b, (reg * 4) as u64);
            u32::from_le_bytes(b)
        };
        let header = (cfg(HEADER_REG) >> 16) as u8 & 0x7f;
        if header != 0 {
            return Err(VfioPciError::NotType0(header));
        }
        let id = cfg(0);
        // What the last owner left running stops before this guest can enable DMA.
        device_reset_quirk(&device, id);
        let shadow = blank_shadow(id, cfg(2));

        // BARs: kind from the device's registers, size from VFIO's regions.
        let mut bars = Vec::new();
        let mut i = 0;
        while i < 6 {
            let raw = cfg(BAR0_REG + i);
            let size = device.get_region_size(i as u32);
            let kind = if raw & 1 != 0 {
                BarKind::Io
            } else if (raw >> 1) & 3 == 2 {
                BarKind::Mem64
            } else {
                BarKind::Mem32
            };
            if size != 0 {
                if !size.is_power_of_two() {
                    return Err(VfioPciError::Bar {
                        bar: i,
                        what: format!("size {size:#x} is not a power of two"),
                    });
                }
                if kind == BarKind::Mem64 && i == 5 {
                    return Err(VfioPciError::Bar {
                        bar: i,
                        what: "a 64-bit BAR in the last register".into(),
                    });
                }
                bars.push(BarInfo {
                    index: i,
                    kind,
                    size,
                    prefetch: raw & 8 != 0,
                });
            }
            i += if kind == BarKind::Mem64 { 2 } else { 1 };
        }

        // The capability list: find MSI-X and MSI.
        let mut visible_caps = Vec::new();
        let mut all_caps = Vec::new();
        let (mut msix_at, mut msi_at) = (None, None);
        let mut off = (cfg(CAP_PTR_REG) & 0xfc) as usize;
        let mut seen = 0;
        while (CAP_START..STD_CONFIG_END).contains(&off) && seen < 48 {
            let head = cfg(off / 4);
            all_caps.push(off);
            match head as u8 {
                MSI_CAP_ID => {
                    msi_at = Some(off);
                    visible_caps.push(off);
                }
                MSIX_CAP_ID => {
                    msix_at = Some(off);
                    visible_caps.push(off);
                }
                _ => visible_caps.push(off),
            }
            off = ((head >> 8) & 0xfc) as usize;
            seen += 1;
        }
        if msix_at.is_none() && msi_at.is_none() {
            return Err(VfioPciError::NoMsix);
        }
        let (msix, msi) = Self::interrupts(msix_at, msi_at, &cfg, &bars, &routes)?;

        let mut dev = Self {
            device,
            shadow,
            bars,
            visible_caps,
            all_caps,
            msix,
            msi,
            maps: Vec::new(),
            mapper,
            memory_on: false,
            bus_master: false,
            ready: false,
            on_ready: None,
        };
        dev.map_bars()?;
        Ok(dev)
    }

    /// The emulated MSI-X and MSI capabilities (at `msix_at` and `msi_at`) as they
    /// are at power-on: disabled, every vector masked, each with routes of its own.
    fn interrupts(
        msix_at: Option<usize>,
        msi_at: Option<usize>,
        cfg: &dyn Fn(usize) -> u32,
        bars: &[BarInfo],
        routes: &Arc<dyn InterruptRoutes>,
    ) -> Result<(Option<Msix>, Option<Msi>), VfioPciError> {
        let msix = match msix_at {
            Some(cap) => Some(Self::msix(cap, cfg, bars, routes.clone())?),
            None => None,
        };
        let msi = match msi_at {
            Some(cap) => {
                let is64 = (cfg(cap / 4) >> 16) as u16 & MSI_64BIT != 0;
                Some(Msi::new(cap, is64, routes.clone()).map_err(VfioPciError::Msix)?)
            }
            None => None,
        };
        Ok((msix, msi))
    }

    /// Take the function off the guest but keep it open (a failover primary hidden
    /// while its pair may come back): interrupts off on the host, memory and I/O
    /// decoding and bus mastering off in the real command register (so it does no
    /// DMA), its BARs out of guest memory, and what the guest sees back to power-on
    /// state with the BARs unplaced (the interrupt vectors keep their GSIs and
    /// irqfds, without routes). The VFIO descriptor, and with it the container's
    /// DMA mappings of guest RAM, stay: plugging it again
    /// ([`VfioPciDevice::rearm`]) skips opening the function, its reset on close,
    /// and the IOMMU unmapping and re-pinning all guest RAM.
    pub fn park(&mut self) {
        // The BARs leave guest memory before decoding stops: vfio-pci refuses faults
        // on a BAR mapping while decoding is off, and a vCPU that touched one
        // through its KVM slot would fail with EFAULT.
        self.off_guest();
        let cmd = self.real_read(COMMAND_REG) as u16 & !(CMD_IO | CMD_MEMORY | CMD_BUS_MASTER);
        self.device.region_write(
            VFIO_PCI_CONFIG_REGION_INDEX,
            &cmd.to_le_bytes(),
            COMMAND_REG as u64 * 4,
        );
        self.bus_master = false;
        self.ready = false;
        self.shadow = blank_shadow(self.real_read(0), self.real_read(2));
        if let Some(m) = self.msix.as_mut() {
            m.state.reset();
        }
        if let Some(m) = self.msi.as_mut() {
            m.reset();
        }
    }

    /// Interrupts off on the host and the BARs out of guest memory (for [`park`] and
    /// drop).
    ///
    /// [`park`]: VfioPciDevice::park
    fn off_guest(&mut self) {
        if self.msix_enabled() {
            let _ = self.device.disable_msix();
        }
        if self.msi_enabled() {
            let _ = self.device.disable_msi();
        }
        self.memory_on = false;
        self.sync_slots();
    }

    /// Make a parked function fit for a guest's driver again, as a fresh open
    /// would: VFIO's function reset (if the device has one) and the quirk reset.
    pub fn rearm(&mut self) {
        self.device.reset();
        device_reset_quirk(&self.device, self.real_read(0));
    }

    /// The MSI-X capability at `cap`: where its table and PBA are, and its vectors.
    fn msix(
        cap: usize,
        cfg: &dyn Fn(usize) -> u32,
        bars: &[BarInfo],
        routes: Arc<dyn InterruptRoutes>,
    ) -> Result<Msix, VfioPciError> {
        let control = cfg(cap / 4) >> 16;
        let count = (control & 0x7ff) as u16 + 1;
        let table = cfg(cap / 4 + 1);
        let pba = cfg(cap / 4 + 2);
        let (table_bar, table_off) = ((table & 7) as usize, u64::from(table & !7));
        let (pba_bar, pba_off) = ((pba & 7) as usize, u64::from(pba & !7));
        for (what, bar) in [("table", table_bar), ("PBA", pba_bar)] {
            if !bars.iter().any(|b| b.index == bar && b.kind != BarKind::Io) {
                return Err(VfioPciError::Bar {
                    bar,
                    what: format!("the MSI-X {what} is in a BAR the device does not have"),
                });
            }
        }
        let state = MsixState::new_passthrough(count, routes).map_err(VfioPciError::Msix)?;
        Ok(Msix {
            cap,
            table_bar,
            table: table_off..table_off + u64::from(count) * MSIX_ENTRY_SIZE,
            pba_bar,
            pba: pba_off..pba_off + u64::from(count).div_ceil(64) * 8,
            state,
        })
    }

    /// The device's BARs, for the VMM to place.
    pub fn bars(&self) -> &[BarInfo] {
        &self.bars
    }

    /// Place BAR `index` at guest address `addr` (before the guest runs on it).
    pub fn set_bar(&mut self, index: usize, addr: u64) {
        if let Some(b) = self.bars.iter().find(|b| b.index == index).copied() {
            self.shadow.add_bar(index, b.kind, b.size, addr, b.prefetch);
            self.sync_slots();
        }
    }

    /// Called (once each time) when the guest's driver starts the device:
    /// enables MSI-X, MSI or bus mastering.
    pub fn set_ready_observer(&mut self, f: Box<dyn Fn() + Send>) {
        self.on_ready = Some(f);
    }

    /// `vendor:device` as the device reports it.
    pub fn ids(&self) -> (u16, u16) {
        let r = self.shadow.read(0);
        (r as u16, (r >> 16) as u16)
    }

    pub fn msix_enabled(&self) -> bool {
        self.msix.as_ref().is_some_and(|m| m.state.enabled())
    }

    pub fn msi_enabled(&self) -> bool {
        self.msi.as_ref().is_some_and(|m| m.enabled)
    }

    pub fn memory_enabled(&self) -> bool {
        self.memory_on
    }

    /// mmap every part of every memory BAR that VFIO allows, minus the pages
    /// that hold the MSI-X table and PBA (those must trap).
    fn map_bars(&mut self) -> Result<(), VfioPciError> {
        for b in self.bars.clone() {
            if b.kind == BarKind::Io || b.size < PAGE {
                continue;
            }
            let i = b.index as u32;
            let flags = self.device.get_region_flags(i);
            if flags & VFIO_REGION_INFO_FLAG_MMAP == 0 {
                continue;
            }
            let mut areas: Vec<(u64, u64)> = vec![(0, b.size)];
            for cap in self.device.get_region_caps(i) {
                if let VfioRegionInfoCap::SparseMmap(s) = cap {
                    areas = s.areas.iter().map(|a| (a.offset, a.size)).collect();
                }
            }
            let mut holes = Vec::new();
            if let Some(msix) = &self.msix {
                if b.index == msix.table_bar {
                    holes.push(page_span(&msix.table));
                }
                if b.index == msix.pba_bar {
                    holes.push(page_span(&msix.pba));
                }
            }
            let prot = (if flags & VFIO_REGION_INFO_FLAG_READ != 0 {
                libc::PROT_READ
            } else {
                0
            }) | (if flags & VFIO_REGION_INFO_FLAG_WRITE != 0 {
                libc::PROT_WRITE
            } else {
                0
            });
            for (start, len) in subtract(&areas, &holes) {
                let offset = self.device.get_region_offset(i) + start;
                // SAFETY: a fresh shared mapping of the device fd at the region's
                // offset; the kernel checks offset and length against the region.
                let host = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        len as usize,
                        prot,
                        libc::MAP_SHARED,
                        self.device.as_raw_fd(),
                        offset as libc::off_t,
                    )
                };
                if host == libc::MAP_FAILED {
                    return Err(VfioPciError::Mmap {
                        bar: b.index,
                        source: io::Error::last_os_error(),
                    });
                }
                self.maps.push(Mapping {
                    bar: b.index,
                    offset: start,
                    len,
                    host: host as usize,
                    slot: None,
                });
            }
        }
        Ok(())
    }

    /// Make the guest mappings match the guest's BAR placement and its memory
    /// decoding bit: mapped while decoding is on, at the BAR's current base.
    fn sync_slots(&mut self) {
        for m in &mut self.maps {
            let want = match self.shadow.bar_addr(m.bar) {
                Some(base) if self.memory_on && base != 0 => base.checked_add(m.offset),
                _ => None,
            };
            if m.slot.map(|(gpa, _)| gpa) == want {
                continue;
            }
            if let Some((_, h)) = m.slot.take() {
                self.mapper.unmap(h);
            }
            let Some(gpa) = want else { continue };
            // SAFETY: `host..host+len` is our mmap of the device, unmapped only in
            // Drop after every guest mapping of it is gone.
            match unsafe { self.mapper.map(gpa, m.len, m.host as *mut u8) } {
                Ok(h) => m.slot = Some((gpa, h)),
                // The accesses still work, trapped, one exit each.
                Err(e) => crate::guest_warn!(
                    "BAR {} +{:#x}: cannot map at {gpa:#x} ({e}); accesses will trap",
                    m.bar,
                    m.offset
                ),
            }
        }
    }

    fn real_read(&self, reg: usize) -> u32 {
        let mut b = [0u8; 4];
        self.device
            .region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut b, (reg * 4) as u64);
        u32::from_le_bytes(b)
    }

    /// The next-pointer the guest sees after the capability at `off`.
    fn next_visible(&self, off: Option<usize>) -> u8 {
        let pos = match off {
            None => 0,
            Some(o) => match self.visible_caps.iter().position(|c| *c == o) {
                Some(p) => p + 1,
                None => return 0,
            },
        };
        self.visible_caps.get(pos).map_or(0, |c| *c as u8)
    }

    /// The capability (visible or hidden) a config register belongs to, with
    /// whether it is that capability's first dword: the last capability that
    /// starts at or before it.
    fn cap_of(&self, reg: usize) -> Option<(usize, bool)> {
        let off = reg * 4;
        let cap = self.all_caps.iter().copied().filter(|c| *c <= off).max()?;
        Some((cap, cap == off))
    }

    fn hidden(&self, cap: usize) -> bool {
        !self.visible_caps.contains(&cap)
    }

    fn write_msix_control(&mut self, control: u16) {
        let Some(msix) = self.msix.as_mut() else {
            return;
        };
        let was = msix.state.enabled();
        msix.state.set_control(control);
        let now = msix.state.enabled();
        if now && !was {
            if let Err(e) = self.device.enable_msix(msix.state.irqfds()) {
                crate::guest_warn!("cannot enable MSI-X on the device: {}", vfio_err(e));
            }
            self.note_ready();
        } else if was && !now {
            if let Err(e) = self.device.disable_msix() {
                crate::guest_warn!("cannot disable MSI-X on the device: {}", vfio_err(e));
            }
        }
    }

    /// The guest wrote MSI's message-control word: only the enable bit counts (one
    /// vector, so Multiple Message Enable stays 0).
    fn write_msi_control(&mut self, control: u16) {
        let Some(msi) = self.msi.as_mut() else {
            return;
        };
        let now = control & MSI_ENABLE != 0;
        if now == msi.enabled {
            return;
        }
        msi.enabled = now;
        if now {
            msi.route(true);
            let fds = msi.vector.iter().map(|(_, e)| e).collect();
            if let Err(e) = self.device.enable_msi(fds) {
                crate::guest_warn!("cannot enable MSI on the device: {}", vfio_err(e));
            }
            self.note_ready();
        } else {
            if let Err(e) = self.device.disable_msi() {
                crate::guest_warn!("cannot disable MSI on the device: {}", vfio_err(e));
            }
            msi.route(false);
        }
    }

    /// The MSI-X table or PBA an access of `len` bytes at `offset` of BAR `bar` lies in.
    fn msix_part(&self, bar: usize, offset: u64, len: usize) -> Option<MsixPart> {
        let end = offset.checked_add(len as u64)?;
        let within = |b: usize, r: &std::ops::Range<u64>| {
            (bar == b && offset >= r.start && end <= r.end).then(|| offset - r.start)
        };
        let msix = self.msix.as_ref()?;
        within(msix.table_bar, &msix.table)
            .map(MsixPart::Table)
            .or_else(|| within(msix.pba_bar, &msix.pba).map(MsixPart::Pba))
    }

    fn note_ready(&mut self) {
        if !self.ready {
            self.ready = true;
            if let Some(f) = &self.on_ready {
                f();
            }
        }
    }
}

/// Where a trapped BAR access falls in the emulated MSI-X structures (offset within).
enum MsixPart {
    Table(u64),
    Pba(u64),
}

/// The whole pages covering `r`.
fn page_span(r: &std::ops::Range<u64>) -> (u64, u64) {
    let start = r.start & !(PAGE - 1);
    let end = r.end.next_multiple_of(PAGE);
    (start, end - start)
}

/// `areas` minus `holes`, as page-aligned (offset, len) pieces.
fn subtract(areas: &[(u64, u64)], holes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(start, len) in areas {
        let end = start.saturating_add(len) & !(PAGE - 1);
        let start = start.next_multiple_of(PAGE);
        let mut pieces = vec![(start, end)];
        for &(hs, hl) in holes {
            let he = hs + hl;
            pieces = pieces
                .into_iter()
                .flat_map(|(s, e)| {
                    let mut v = Vec::new();
                    if s < hs.min(e) {
                        v.push((s, hs.min(e)));
                    }
                    if he.max(s) < e {
                        v.push((he.max(s), e));
                    }
                    v
                })
                .collect();
        }
        out.extend(
            pieces
                .into_iter()
                .filter(|(s, e)| e > s)
                .map(|(s, e)| (s, e - s)),
        );
    }
    out
}

impl PciDevice for VfioPciDevice {
    fn config_read(&mut self, reg: usize) -> u32 {
        match reg {
            // Ids, class, cache line/latency/header type (never multi-function
            // here: we pass one function), subsystem, command/status.
            0 | 1 | 2 | 11 => self.real_read(reg),
            HEADER_REG => self.real_read(reg) & !(0x80 << 16),
            4..=9 => self.shadow.read(reg),
            CAP_PTR_REG => u32::from(self.next_visible(None)),
            INTERRUPT_REG => self.shadow.read(reg) & 0xff,
            16..=63 => {
                let Some((cap, head)) = self.cap_of(reg) else {
                    return self.real_read(reg);
                };
                if self.hidden(cap) {
                    return 0;
                }
                if let Some(m) = self.msi.as_ref().filter(|m| m.cap == cap && !head) {
                    return m.read(reg);
                }
                let real = self.real_read(reg);
                if !head {
                    return real;
                }
                let next = u32::from(self.next_visible(Some(cap))) << 8;
                match (&self.msix, &self.msi) {
                    (Some(m), _) if cap == m.cap => {
                        u32::from(MSIX_CAP_ID) | next | (u32::from(m.state.control()) << 16)
                    }
                    (_, Some(m)) if cap == m.cap => {
                        u32::from(MSI_CAP_ID) | next | (u32::from(m.control()) << 16)
                    }
                    _ => (real & 0xffff_00ff) | next,
                }
            }
            // Cardbus CIS, expansion ROM (hidden), reserved, extended space.
            _ => 0,
        }
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) -> Option<BarMove> {
        if offset + data.len() > 4 || data.is_empty() {
            return None;
        }
        match reg {
            COMMAND_REG | HEADER_REG => {
                // Decoding turned off: the BARs leave guest memory first (vfio-pci
                // refuses faults on a BAR mapping while decoding is off, and another
                // vCPU touching one through its KVM slot would fail with EFAULT).
                if reg == COMMAND_REG && offset == 0 && data[0] as u16 & CMD_MEMORY == 0 {
                    self.memory_on = false;
                    self.sync_slots();
                }
                self.device.region_write(
                    VFIO_PCI_CONFIG_REGION_INDEX,
                    data,
                    (reg * 4 + offset) as u64,
                );
                if reg == COMMAND_REG {
                    let cmd = self.real_read(COMMAND_REG) as u16;
                    let memory_on = cmd & CMD_MEMORY != 0;
                    if memory_on != self.memory_on {
                        self.memory_on = memory_on;
                        self.sync_slots();
                    }
                    let bm = cmd & CMD_BUS_MASTER != 0;
                    if bm && !self.bus_master {
                        self.note_ready();
                    }
                    self.bus_master = bm;
                    if !bm && !self.msix_enabled() && !self.msi_enabled() {
                        self.ready = false;
                    }
                }
                None
            }
            4..=9 => {
                let mv = self.shadow.write(reg, offset, data);
                if mv.is_some() {
                    self.sync_slots();
                }
                mv
            }
            INTERRUPT_REG => self.shadow.write(reg, offset, data),
            ROM_REG => None,
            16..=63 => {
                let (cap, _) = self.cap_of(reg)?;
                if self.hidden(cap) {
                    return None;
                }
                // In MSI-X and MSI, the message-control word (bytes 2..4 of the
                // first dword) is what the guest writes in the first dword.
                let control = |now: u16| {
                    let mut word = now.to_le_bytes();
                    for (i, b) in data.iter().enumerate() {
                        if let Some(p) = (offset + i).checked_sub(2) {
                            word[p] = *b;
                        }
                    }
                    (reg == cap / 4 && offset + data.len() > 2).then(|| u16::from_le_bytes(word))
                };
                if let Some(m) = self.msix.as_ref().filter(|m| m.cap == cap) {
                    if let Some(c) = control(m.state.control()) {
                        self.write_msix_control(c & (MSIX_ENABLE | 1 << 14));
                    }
                    return None;
                }
                if let Some(m) = self.msi.as_mut().filter(|m| m.cap == cap) {
                    if reg != cap / 4 {
                        m.write(reg, offset, data);
                    } else if let Some(c) = control(m.control()) {
                        self.write_msi_control(c);
                    }
                    return None;
                }
                self.device.region_write(
                    VFIO_PCI_CONFIG_REGION_INDEX,
                    data,
                    (reg * 4 + offset) as u64,
                );
                None
            }
            _ => None,
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match self.msix_part(bar, offset, data.len()) {
            Some(MsixPart::Table(off)) => {
                if let Some(m) = &self.msix {
                    m.state.read_table(off, data);
                }
            }
            Some(MsixPart::Pba(off)) => {
                if let Some(m) = &self.msix {
                    m.state.read_pba(off, data);
                }
            }
            None => {
                data.fill(0xff);
                self.device.region_read(bar as u32, data, offset);
            }
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match self.msix_part(bar, offset, data.len()) {
            Some(MsixPart::Table(off)) => {
                if let Some(m) = self.msix.as_mut() {
                    m.state.write_table(off, data);
                }
            }
            // The PBA is read-only.
            Some(MsixPart::Pba(_)) => {}
            None => self.device.region_write(bar as u32, data, offset),
        }
    }
}

/// A passthrough function's state lives in the hardware: it cannot be saved. A VM
/// migrates once its passthrough devices are gone (a failover primary is unplugged
/// first, and the destination plugs its own).
impl crate::snapshot::Snapshot for VfioPciDevice {
    type State = ();
    const VERSION: u32 = 1;
    fn snapshot_name(&self) -> String {
        let (v, d) = self.ids();
        format!("passthrough device {v:04x}:{d:04x}")
    }
    fn save(&self) -> Result<(), crate::snapshot::SnapshotError> {
        Err(crate::snapshot::SnapshotError::NotMigratable(
            self.snapshot_name(),
        ))
    }
    fn restore(&mut self, _: ()) -> Result<(), crate::snapshot::SnapshotError> {
        Err(crate::snapshot::SnapshotError::NotMigratable(
            self.snapshot_name(),
        ))
    }
}

impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        self.off_guest();
        for m in &self.maps {
            // SAFETY: our own mapping from `map_bars`; no guest mapping of it is left.
            unsafe { libc::munmap(m.host as *mut libc::c_void, m.len as usize) };
        }
        // Whatever the guest left running (DMA, interrupts) stops when `device`
        // drops next: closing its descriptor makes vfio-pci reset the function, and a
        // function whose reset does not stop it is reset here first.
        device_reset_quirk(&self.device, self.real_read(0));
    }
}

/// What the guest sees of a function's own config header before it places BARs:
/// ids from register 0, class and revision from register 2.
fn blank_shadow(id: u32, class: u32) -> PciConfig {
    PciConfig::new(
        id as u16,
        (id >> 16) as u16,
        PciClass {
            class: (class >> 24) as u8,
            subclass: (class >> 16) as u8,
            prog_if: (class >> 8) as u8,
        },
        class as u8,
    )
}

/// Resets a function listed in [`RESET_QUIRKS`] through its own register (memory
/// decoding on for the write, then as it was); nothing for any other function.
fn device_reset_quirk(device: &VfioDevice, id: u32) {
    let (vendor, dev) = (id as u16, (id >> 16) as u16);
    let Some(q) = RESET_QUIRKS
        .iter()
        .find(|q| q.vendor == vendor && q.device == dev)
    else {
        return;
    };
    if device.get_region_size(0) < E1000_CTRL + 4 {
        return;
    }
    let mut b = [0u8; 2];
    device.region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut b, COMMAND_REG as u64 * 4);
    let command = u16::from_le_bytes(b);
    if command & CMD_MEMORY == 0 {
        let on = (command | CMD_MEMORY).to_le_bytes();
        device.region_write(VFIO_PCI_CONFIG_REGION_INDEX, &on, COMMAND_REG as u64 * 4);
    }
    let mut ctrl = [0u8; 4];
    device.region_read(0, &mut ctrl, E1000_CTRL);
    let reset = (u32::from_le_bytes(ctrl) | E1000_CTRL_RST).to_le_bytes();
    device.region_write(0, &reset, E1000_CTRL);
    std::thread::sleep(E1000_RESET_SETTLE);
    if command & CMD_MEMORY == 0 {
        device.region_write(
            VFIO_PCI_CONFIG_REGION_INDEX,
            &command.to_le_bytes(),
            COMMAND_REG as u64 * 4,
        );
    }
    tracing::debug!(
        "{vendor:04x}:{dev:04x} {}: reset through CTRL.RST (its function reset leaves it running)",
        q.what
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::msix::tests::FakeRoutes;
    use crate::pci::msix::MsiMessage;

    #[test]
    fn msi_registers_follow_the_layout_and_drive_one_route_while_enabled() {
        let routes = Arc::new(FakeRoutes::default());
        // 64-bit: address low at +4, high at +8, data at +12.
        let mut m = Msi::new(0x50, true, routes.clone()).unwrap();
        let gsi = m.vector[0].0;
        assert_eq!(m.control(), MSI_64BIT, "one vector, no per-vector masking");
        m.write(0x54 / 4, 0, &0xfee0_100fu32.to_le_bytes());
        m.write(0x58 / 4, 0, &0u32.to_le_bytes());
        m.write(0x5c / 4, 0, &[0x41, 0x40]);
        assert_eq!(m.read(0x54 / 4), 0xfee0_100c, "dword-aligned");
        assert_eq!(m.read(0x5c / 4), 0x4041);
        assert_eq!(m.read(0x60 / 4), 0, "no mask register");
        assert!(
            routes.routes.lock().unwrap().get(&gsi).is_none(),
            "no route while disabled"
        );
        m.enabled = true;
        m.route(true);
        let want = MsiMessage {
            addr: 0xfee0_100c,
            data: 0x4041,
        };
        assert_eq!(routes.routes.lock().unwrap()[&gsi], Some(want));
        // Linux moves an interrupt to another CPU by rewriting the address while enabled.
        m.write(0x54 / 4, 1, &[0x20]);
        let want = MsiMessage {
            addr: 0xfee0_200c,
            data: 0x4041,
        };
        assert_eq!(routes.routes.lock().unwrap()[&gsi], Some(want));
        m.route(false);
        assert_eq!(routes.routes.lock().unwrap()[&gsi], None);

        // 32-bit: data at +8.
        let mut m = Msi::new(0x50, false, routes.clone()).unwrap();
        assert_eq!(m.control(), 0);
        m.write(0x58 / 4, 0, &0x23u32.to_le_bytes());
        assert_eq!(m.read(0x58 / 4), 0x23);
        assert_eq!(m.read(0x5c / 4), 0);
    }

    #[test]
    fn msix_pages_are_cut_out_of_the_mappable_areas() {
        // A 16 KiB BAR with the table at 0 and the PBA at 0x2000.
        let holes = [page_span(&(0..0x50)), page_span(&(0x2000..0x2008))];
        assert_eq!(
            subtract(&[(0, 0x4000)], &holes),
            vec![(0x1000, 0x1000), (0x3000, 0x1000)]
        );
        // Table in the middle of a big BAR.
        assert_eq!(
            subtract(&[(0, 0x20000)], &[page_span(&(0x10000..0x10050))]),
            vec![(0, 0x10000), (0x11000, 0xf000)]
        );
        // Nothing left; sparse areas are kept page-aligned.
        assert!(subtract(&[(0, 0x1000)], &[(0, 0x1000)]).is_empty());
        assert_eq!(subtract(&[(0x800, 0x2000)], &[]), vec![(0x1000, 0x1000)]);
    }
}
