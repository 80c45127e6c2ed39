//! Places devices on the machine: BAR space (32-bit, 64-bit and I/O windows),
//! PCI slots, and one table of pluggable PCI devices — virtio-net NICs and VFIO
//! passthrough functions — that boot, hotplug, removal and reboot all go
//! through. Boot is just the first batch of adds.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use api::DeviceInfo;
use devices::pci::msix::InterruptRoutes;
use devices::pci::{BarKind, PciRoot, PciRootError, SharedPciDevice};
use devices::vfio::VfioPciDevice;
use devices::virtio::net::{format_mac, Net, NetConfig, NetError};
use devices::virtio::pci::{VirtioPciDevice, BAR0_SIZE};
use devices::virtio::DriverStatus;
use devices::virtio::GuestMemoryMmap;
use thiserror::Error;

use crate::events::VmEvents;
use crate::layout::{PCI_IO_SIZE, PCI_IO_START, PCI_MMIO32_SIZE, PCI_MMIO32_START};
use crate::vfio::VfioHost;

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("--net {id}: {source}")]
    Net { id: String, source: NetError },
    #[error("--net {id}: {source}")]
    Slot { id: String, source: PciRootError },
    #[error("--net {id}: {source}")]
    Io { id: String, source: std::io::Error },
    #[error("{id}: no room left in the {kind:?} PCI window for a {size:#x}-byte BAR")]
    NoBarSpace {
        id: String,
        kind: BarKind,
        size: u64,
    },
    #[error("no device with id {0:?}")]
    NoSuchDevice(String),
    #[error("{0}: a device with this id exists")]
    DuplicateId(String),
    #[error("--device {id}: {what}")]
    Vfio { id: String, what: String },
    #[error("device {id}: cannot restore: {what}")]
    Restore { id: String, what: String },
}

/// Hands out naturally aligned BAR ranges from one window.
pub struct BarAllocator {
    next: u64,
    end: u64,
    freed: Vec<(u64, u64)>,
}

impl BarAllocator {
    /// The 32-bit memory window.
    pub fn new() -> Self {
        Self::with_range(PCI_MMIO32_START, PCI_MMIO32_SIZE)
    }

    pub fn with_range(start: u64, size: u64) -> Self {
        Self {
            next: start,
            end: start + size,
            freed: vec![],
        }
    }

    pub fn allocate(&mut self, size: u64) -> Option<u64> {
        if let Some(i) = self.freed.iter().position(|(_, s)| *s == size) {
            return Some(self.freed.swap_remove(i).0);
        }
        let base = self.next.next_multiple_of(size);
        let end = base.checked_add(size)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(base)
    }

    pub fn free(&mut self, base: u64, size: u64) {
        self.freed.push((base, size));
    }

    /// Take `base..base+size` as allocated (a restored device keeps its BARs where the
    /// source put them). The space below it that was never handed out is given up.
    pub fn claim(&mut self, base: u64, size: u64) -> bool {
        let Some(end) = base.checked_add(size) else {
            return false;
        };
        if let Some(i) = self.freed.iter().position(|f| *f == (base, size)) {
            self.freed.swap_remove(i);
            return true;
        }
        if base < self.next || end > self.end || !base.is_multiple_of(size.max(1)) {
            return false;
        }
        self.next = end;
        true
    }
}

impl Default for BarAllocator {
    fn default() -> Self {
        Self::new()
    }
}

/// What sits in a slot, by kind.
enum Kind {
    Net {
        cfg: NetConfig,
        device: Arc<Mutex<VirtioPciDevice>>,
        stats: devices::virtio::net::NetStatsSource,
    },
    Vfio {
        path: PathBuf,
        device: Arc<Mutex<VfioPciDevice>>,
    },
}

/// One pluggable PCI device: whatever its kind, added, removed (orderly or by
/// surprise) and carried across reboots the same way.
struct Entry {
    id: String,
    slot: usize,
    /// What the allocators handed out, given back on removal wherever the guest
    /// moved the BARs since.
    bars: Vec<(BarKind, u64, u64)>,
    kind: Kind,
}

/// A pluggable device as a migration carries it.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct DeviceState {
    pub id: String,
    pub slot: usize,
    /// What the allocators handed out on the source (kind, base, size).
    pub bars: Vec<(BarKind, u64, u64)>,
    /// The NIC's configuration on the source (its tap is the source's).
    pub net: NetConfig,
    pub transport: devices::snapshot::Saved,
}

/// Hold `m` without ever waiting: a vCPU or worker stuck while holding a device is
/// exactly what vm.info must be able to show.
fn peek<T: ?Sized>(m: &Mutex<T>) -> Option<std::sync::MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(d) => Some(d),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

pub struct DeviceManager {
    pci: Arc<Mutex<PciRoot>>,
    routes: Arc<dyn InterruptRoutes>,
    mem: GuestMemoryMmap,
    mem32: BarAllocator,
    mem64: BarAllocator,
    io: BarAllocator,
    entries: Vec<Entry>,
    /// Slots kept for failover primaries while they are hidden.
    reserved: Vec<usize>,
    events: Arc<VmEvents>,
    vfio: VfioHost,
    /// Passthrough functions taken off the bus but kept open: see
    /// [`DeviceManager::remove`]. A function is here while the configuration still
    /// names it (a hidden failover primary), and closed once it does not
    /// ([`DeviceManager::settle`]).
    kept_open: Vec<KeptOpen>,
    /// Functions being opened ahead ([`DeviceManager::open_ahead`]), with how long each
    /// took.
    opening: Option<(std::thread::JoinHandle<Vec<Opened>>, OpenAhead)>,
}

type Opened = (
    PathBuf,
    Result<VfioPciDevice, devices::vfio::VfioPciError>,
    std::time::Duration,
);

/// The thread opening passthrough functions ahead of their plug
/// ([`DeviceManager::open_ahead`]).
#[derive(Clone)]
pub struct OpenAhead {
    /// Set once every function is open (or failed to open).
    pub done: Arc<AtomicBool>,
    /// The thread's id, once it runs.
    tid: Arc<AtomicI32>,
}

impl OpenAhead {
    /// Run it at the guest's priority from now on.
    pub fn hurry(&self) -> Result<(), String> {
        let tid = self.tid.load(Ordering::SeqCst);
        if tid == 0 {
            return Err("the thread has not started yet".into());
        }
        // SAFETY: a plain syscall on a thread of this process, no memory involved.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 0) } != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        Ok(())
    }
}

/// A passthrough function off the bus, still open.
struct KeptOpen {
    path: PathBuf,
    device: Arc<Mutex<VfioPciDevice>>,
    /// Quiesced ([`VfioPciDevice::park`]); until then its BARs may still be in
    /// guest memory, where nothing else is placed before it is.
    parked: bool,
}

impl DeviceManager {
    pub fn new(
        pci: Arc<Mutex<PciRoot>>,
        routes: Arc<dyn InterruptRoutes>,
        mem: GuestMemoryMmap,
        events: Arc<VmEvents>,
        vfio: VfioHost,
        mmio64: (u64, u64),
    ) -> Self {
        Self {
            pci,
            routes,
            mem,
            mem32: BarAllocator::new(),
            mem64: BarAllocator::with_range(mmio64.0, mmio64.1),
            io: BarAllocator::with_range(PCI_IO_START, PCI_IO_SIZE),
            entries: vec![],
            reserved: vec![],
            events,
            vfio,
            kept_open: vec![],
            opening: None,
        }
    }

    fn allocator(&mut self, kind: BarKind) -> &mut BarAllocator {
        match kind {
            BarKind::Io => &mut self.io,
            BarKind::Mem32 => &mut self.mem32,
            BarKind::Mem64 => &mut self.mem64,
        }
    }

    fn free_bars(&mut self, bars: &[(BarKind, u64, u64)]) {
        for &(kind, base, size) in bars {
            self.allocator(kind).free(base, size);
        }
    }

    /// Allocate a base for each BAR; on failure nothing stays allocated.
    fn allocate_bars(
        &mut self,
        id: &str,
        want: &[(BarKind, u64)],
    ) -> Result<Vec<(BarKind, u64, u64)>, DeviceError> {
        let mut got = Vec::new();
        for &(kind, size) in want {
            // Below a page, a BAR still gets a page of its own: nothing else shares it.
            let size = size.max(if kind == BarKind::Io { size } else { 4096 });
            match self.allocator(kind).allocate(size) {
                Some(base) => got.push((kind, base, size)),
                None => {
                    self.free_bars(&got);
                    return Err(DeviceError::NoBarSpace {
                        id: id.to_string(),
                        kind,
                        size,
                    });
                }
            }
        }
        Ok(got)
    }

    /// Keep `slot` free for a device that is not on the bus yet (a hidden primary).
    pub fn reserve(&mut self, slot: usize) {
        if !self.reserved.contains(&slot) {
            self.reserved.push(slot);
        }
    }

    pub fn release(&mut self, slot: usize) {
        self.reserved.retain(|s| *s != slot);
    }

    /// The highest slot neither occupied nor reserved.
    pub fn last_free_slot(&self) -> Option<usize> {
        let pci = self.pci.lock().unwrap_or_else(|e| e.into_inner());
        (1..devices::pci::PCI_SLOTS)
            .rev()
            .find(|s| !pci.occupied(*s) && !self.reserved.contains(s))
    }

    /// The slot given, or the first one neither occupied nor reserved.
    fn pick_slot(
        pci: &PciRoot,
        reserved: &[usize],
        id: &str,
        slot: Option<usize>,
    ) -> Result<usize, DeviceError> {
        match slot {
            Some(s) => Ok(s),
            None => (1..devices::pci::PCI_SLOTS)
                .find(|s| !pci.occupied(*s) && !reserved.contains(s))
                .ok_or(DeviceError::Slot {
                    id: id.to_string(),
                    source: PciRootError::Full,
                }),
        }
    }

    /// Put `device` in `slot` with its BARs mapped; on failure its BARs are freed.
    fn place(
        &mut self,
        id: &str,
        slot: Option<usize>,
        device: SharedPciDevice,
        bars: Vec<(usize, BarKind, u64, u64)>,
        kind: Kind,
    ) -> Result<usize, DeviceError> {
        let alloc: Vec<_> = bars.iter().map(|&(_, k, b, s)| (k, b, s)).collect();
        let mut pci = self.pci.lock().unwrap_or_else(|e| e.into_inner());
        let placed = Self::pick_slot(&pci, &self.reserved, id, slot).and_then(|slot| {
            pci.add(slot, device, &bars)
                .map(|()| slot)
                .map_err(|source| DeviceError::Slot {
                    id: id.to_string(),
                    source,
                })
        });
        drop(pci);
        match placed {
            Ok(slot) => {
                self.entries.push(Entry {
                    id: id.to_string(),
                    slot,
                    bars: alloc,
                    kind,
                });
                Ok(slot)
            }
            Err(e) => {
                self.free_bars(&alloc);
                Err(e)
            }
        }
    }

    fn check_free(&self, id: &str, slot: Option<usize>) -> Result<(), DeviceError> {
        if self.entries.iter().any(|e| e.id == id) {
            return Err(DeviceError::DuplicateId(id.to_string()));
        }
        let pci = self.pci.lock().unwrap_or_else(|e| e.into_inner());
        match slot {
            Some(s) if pci.occupied(s) => Err(DeviceError::Slot {
                id: id.to_string(),
                source: PciRootError::SlotBusy(s),
            }),
            _ => Ok(()),
        }
    }

    /// Create a virtio-net device and put it in its slot (given or the first free).
    pub fn add_net(&mut self, cfg: &NetConfig, slot: Option<usize>) -> Result<usize, DeviceError> {
        self.build_net(cfg, slot, None)
    }

    /// Build the NIC a migration source saved, with this host's `cfg` (its tap), in
    /// the same slot with the same BARs, and take its state over. It stays paused.
    pub fn restore_net(&mut self, cfg: &NetConfig, s: DeviceState) -> Result<usize, DeviceError> {
        if s.slot == 0 || s.slot >= devices::pci::PCI_SLOTS {
            return Err(DeviceError::Restore {
                id: cfg.id.clone(),
                what: format!("slot {}", s.slot),
            });
        }
        self.build_net(cfg, Some(s.slot), Some(s))
    }

    /// One path for a new NIC and a restored one: a restored NIC takes its saved
    /// BAR 0 address (a new one gets the next free) and its transport's state.
    fn build_net(
        &mut self,
        cfg: &NetConfig,
        slot: Option<usize>,
        saved: Option<DeviceState>,
    ) -> Result<usize, DeviceError> {
        // Its BARs may get the space a function that left the bus still maps.
        self.park_leaving();
        let id = cfg.id.clone();
        let bad = |what: String| DeviceError::Restore {
            id: id.clone(),
            what,
        };
        self.check_free(&id, slot)?;
        let net = Net::new(cfg.clone()).map_err(|source| DeviceError::Net {
            id: id.clone(),
            source,
        })?;
        let stats = net.stats_source();
        let bar0 = match &saved {
            None => self.allocate_bars(&id, &[(BarKind::Mem32, BAR0_SIZE)])?[0].1,
            Some(s) => {
                let [(BarKind::Mem32, bar0, BAR0_SIZE)] = s.bars[..] else {
                    return Err(bad(format!("BARs {:?}", s.bars)));
                };
                if !self.mem32.claim(bar0, BAR0_SIZE) {
                    return Err(bad(format!(
                        "BAR 0 at {bar0:#x} is taken or outside the window"
                    )));
                }
                bar0
            }
        };
        let mut dev = match VirtioPciDevice::new(
            Box::new(net),
            self.mem.clone(),
            self.routes.clone(),
            bar0,
        ) {
            Ok(d) => d,
            Err(source) => {
                self.mem32.free(bar0, BAR0_SIZE);
                return Err(DeviceError::Io { id, source });
            }
        };
        let (events, who) = (self.events.clone(), id.clone());
        dev.set_status_observer(Arc::new(move |st| events.driver_status(&who, st)));
        if let Some(s) = saved {
            if let Err(e) = devices::snapshot::restore(&mut dev, s.transport) {
                self.mem32.free(bar0, BAR0_SIZE);
                return Err(bad(e.to_string()));
            }
        }
        // Mapped where the guest has BAR 0 now, which may not be where it was allocated.
        let at = dev.bar0();
        let dev = Arc::new(Mutex::new(dev));
        self.place(
            &id,
            slot,
            dev.clone(),
            vec![(0, BarKind::Mem32, at, BAR0_SIZE)],
            Kind::Net {
                cfg: cfg.clone(),
                device: dev,
                stats,
            },
        )
    }

    /// Stop every device's data path (the vCPUs are paused).
    pub fn pause_all(&self) {
        for e in &self.entries {
            if let Kind::Net { device, .. } = &e.kind {
                device.lock().unwrap_or_else(|e| e.into_inner()).pause();
            }
        }
    }

    pub fn resume_all(&self) {
        for e in &self.entries {
            if let Kind::Net { device, .. } = &e.kind {
                device.lock().unwrap_or_else(|e| e.into_inner()).resume();
            }
        }
    }

    pub fn announce_moved(&self) {
        for e in &self.entries {
            if let Kind::Net { device, .. } = &e.kind {
                device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .announce_moved();
            }
        }
    }

    /// Every device's state; a passthrough device cannot be saved (an error).
    pub fn save(&self) -> Result<Vec<DeviceState>, devices::snapshot::SnapshotError> {
        let mut out = Vec::new();
        for e in &self.entries {
            match &e.kind {
                Kind::Net { cfg, device, .. } => {
                    let d = device.lock().unwrap_or_else(|e| e.into_inner());
                    out.push(DeviceState {
                        id: e.id.clone(),
                        slot: e.slot,
                        bars: e.bars.clone(),
                        net: cfg.clone(),
                        transport: devices::snapshot::save(&*d)?,
                    });
                }
                Kind::Vfio { device, .. } => {
                    let d = device.lock().unwrap_or_else(|e| e.into_inner());
                    devices::snapshot::save(&*d)?;
                }
            }
        }
        Ok(out)
    }

    /// Ids of the passthrough devices (a migration cannot carry them).
    pub fn passthrough_ids(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter(|e| matches!(e.kind, Kind::Vfio { .. }))
            .map(|e| e.id.clone())
            .collect()
    }

    /// Whether the function at `path` may be passed through as `id` (in `slot`, if
    /// given): the id and slot free, the function not passed through already.
    pub fn check_vfio_add(
        &self,
        id: &str,
        path: &Path,
        slot: Option<usize>,
    ) -> Result<(), DeviceError> {
        self.check_free(id, slot)?;
        if let Some(e) = self
            .entries
            .iter()
            .find(|e| matches!(&e.kind, Kind::Vfio { path: p, .. } if p == path))
        {
            return Err(DeviceError::Vfio {
                id: id.to_string(),
                what: format!("{} is already passed through as {}", path.display(), e.id),
            });
        }
        Ok(())
    }

    /// Open a host PCI function through VFIO and put it in its slot.
    pub fn add_vfio(
        &mut self,
        id: &str,
        path: &Path,
        slot: Option<usize>,
    ) -> Result<usize, DeviceError> {
        let started = std::time::Instant::now();
        self.check_vfio_add(id, path, slot)?;
        self.park_leaving();
        self.take_opened(true);
        let parked = self
            .kept_open
            .iter()
            .position(|k| k.path == path)
            .map(|i| self.kept_open.swap_remove(i).device);
        let (dev, reopened) = match parked {
            Some(dev) => {
                dev.lock().unwrap_or_else(|e| e.into_inner()).rearm();
                (dev, false)
            }
            None => {
                let dev = self.vfio.open(path).map_err(|e| DeviceError::Vfio {
                    id: id.to_string(),
                    what: format!("{}: {e}", path.display()),
                })?;
                (Arc::new(Mutex::new(dev)), true)
            }
        };
        let placed = self.place_vfio(id, path, slot, &dev);
        let (slot, (vendor, device)) = match placed {
            Ok(placed) => placed,
            Err(e) => {
                // Still open and unplaced: kept for the next try, or closed once
                // nothing names it.
                self.leave(path, dev);
                return Err(e);
            }
        };
        tracing::info!(
            "device {id}: {} ({vendor:04x}:{device:04x}) passed through in slot {slot} in {:.1} ms{}",
            path.display(),
            started.elapsed().as_secs_f64() * 1000.0,
            if reopened {
                ""
            } else {
                " (its function was open already)"
            }
        );
        Ok(slot)
    }

    /// Give the open function `dev` its BARs and slot; returns the slot and its ids.
    fn place_vfio(
        &mut self,
        id: &str,
        path: &Path,
        slot: Option<usize>,
        dev: &Arc<Mutex<VfioPciDevice>>,
    ) -> Result<(usize, (u16, u16)), DeviceError> {
        let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
        let want: Vec<_> = d.bars().iter().map(|b| (b.kind, b.size)).collect();
        let alloc = self.allocate_bars(id, &want)?;
        let infos = d.bars().to_vec();
        let mut bars = Vec::new();
        for (b, &(kind, base, _)) in infos.iter().zip(&alloc) {
            d.set_bar(b.index, base);
            bars.push((b.index, kind, base, b.size));
        }
        let (events, who) = (self.events.clone(), id.to_string());
        d.set_ready_observer(Box::new(move || {
            events.driver_status(&who, DriverStatus::DriverOk)
        }));
        let ids = d.ids();
        drop(d);
        let kind = Kind::Vfio {
            path: path.to_path_buf(),
            device: dev.clone(),
        };
        let slot = self.place(id, slot, dev.clone(), bars, kind)?;
        Ok((slot, ids))
    }

    /// The slot of device `id`.
    pub fn slot_of(&self, id: &str) -> Option<usize> {
        self.entries.iter().find(|n| n.id == id).map(|n| n.slot)
    }

    /// The id of the device in `slot`.
    pub fn id_in(&self, slot: usize) -> Option<&str> {
        self.entries
            .iter()
            .find(|n| n.slot == slot)
            .map(|n| n.id.as_str())
    }

    /// Announce the guest's MAC through NIC `id` (its failover primary left).
    pub fn announce(&self, id: &str) {
        for e in self.entries.iter().filter(|e| e.id == id) {
            if let Kind::Net { device, .. } = &e.kind {
                device.lock().unwrap_or_else(|e| e.into_inner()).announce();
            }
        }
    }

    /// Take device `id` off the machine: out of its slot and its BARs off the
    /// bus; dropping it stops its workers (virtio) or resets it and closes it
    /// (VFIO), and frees its interrupt routes. Returns the slot it was in.
    /// `surprise`: the guest did not give the device up, so its BARs stay
    /// claimed by a tombstone (see [`PciRoot::surprise_remove`]).
    pub fn remove(&mut self, id: &str, surprise: bool) -> Result<usize, DeviceError> {
        let i = self
            .entries
            .iter()
            .position(|n| n.id == id)
            .ok_or_else(|| DeviceError::NoSuchDevice(id.to_string()))?;
        let entry = self.entries.remove(i);
        let mut pci = self.pci.lock().unwrap_or_else(|e| e.into_inner());
        let removed = if surprise {
            pci.surprise_remove(entry.slot)
        } else {
            pci.remove(entry.slot)
        };
        drop(pci);
        if let Err(e) = removed {
            tracing::warn!("device {id}: slot {}: {e}", entry.slot);
        }
        self.free_bars(&entry.bars);
        if let Kind::Vfio { path, device } = entry.kind {
            self.leave(&path, device);
        }
        Ok(entry.slot)
    }

    /// Open the functions at `paths` on a thread of their own, before any device has
    /// them (see [`Vm::prepare`] and [`Vm::create`]): each is kept open off the bus
    /// until a device with its path is added. A function that cannot be opened is
    /// left for its plug, which says why. `background`: the thread runs at the lowest
    /// priority until [`OpenAhead::hurry`] (a migration's destination, which must not
    /// slow the copy); else at the guest's. Returns a handle on the thread, if it
    /// started.
    ///
    /// [`Vm::prepare`]: crate::vm::Vm::prepare
    /// [`Vm::create`]: crate::vm::Vm::create
    pub fn open_ahead(&mut self, paths: Vec<PathBuf>, background: bool) -> Option<OpenAhead> {
        if paths.is_empty() {
            return None;
        }
        let opener = match self.vfio.opener() {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!("cannot open passthrough functions ahead: {e}");
                return None;
            }
        };
        let ahead = OpenAhead {
            done: Arc::new(AtomicBool::new(false)),
            tid: Arc::new(AtomicI32::new(0)),
        };
        let (done, tid) = (ahead.done.clone(), ahead.tid.clone());
        let opening = std::thread::Builder::new()
            .name("vfio-open".into())
            .spawn(move || {
                // In the background, not in the way of a migration's bulk copy: where
                // the host has a CPU to spare it runs at full speed; where it has none
                // (the nested test host's one CPU) it waits until the source has sent
                // the guest's memory once, or a plug needs it ([`OpenAhead::hurry`]).
                // Its seccomp filter is the control loop's.
                // SAFETY: plain syscalls on the calling thread, no memory involved.
                tid.store(unsafe { libc::gettid() }, Ordering::SeqCst);
                // SAFETY: as above (who 0: the calling thread).
                if background && unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) } != 0 {
                    tracing::debug!(
                        "vfio-open: cannot lower its priority: {}",
                        std::io::Error::last_os_error()
                    );
                }
                let opened = paths
                    .into_iter()
                    .map(|p| {
                        let t = std::time::Instant::now();
                        let dev = opener.open(&p);
                        (p, dev, t.elapsed())
                    })
                    .collect();
                done.store(true, Ordering::Release);
                opened
            });
        match opening {
            Ok(t) => {
                self.opening = Some((t, ahead.clone()));
                Some(ahead)
            }
            Err(e) => {
                tracing::warn!("cannot open passthrough functions ahead: {e}");
                None
            }
        }
    }

    /// Start opening the function at `path` on the open-ahead thread, for a plug that
    /// follows once it is open ([`DeviceManager::is_opening`] false): true if started.
    /// False when it is open already (kept off the bus), or another opening is under
    /// way (the plug then opens it, or waits for that one).
    pub fn open_for_plug(&mut self, path: &Path) -> bool {
        if self.is_kept_open(path) || self.opening.is_some() {
            return false;
        }
        self.open_ahead(vec![path.to_path_buf()], false).is_some()
    }

    /// Whether functions are being opened ahead; takes over the opened ones once done.
    pub fn is_opening(&mut self) -> bool {
        self.take_opened(false);
        self.opening.is_some()
    }

    /// Take over what [`DeviceManager::open_ahead`] opened: waits for it if `wait`,
    /// else only if it is done.
    fn take_opened(&mut self, wait: bool) {
        let Some((t, ahead)) = self.opening.take() else {
            return;
        };
        if !t.is_finished() {
            if !wait {
                self.opening = Some((t, ahead));
                return;
            }
            tracing::info!(
                "a plug waits for the passthrough functions being opened ahead{}",
                ahead
                    .hurry()
                    .err()
                    .map(|why| format!(" (their thread's priority stays low: {why})"))
                    .unwrap_or_default()
            );
        }
        let Ok(opened) = t.join() else {
            tracing::warn!(
                "opening passthrough functions ahead failed; each is opened when plugged"
            );
            return;
        };
        for (path, dev, took) in opened {
            match dev {
                Ok(dev) => {
                    tracing::info!(
                        "{}: opened and guest RAM mapped for its DMA in {:.0} ms, ahead of its plug",
                        path.display(),
                        took.as_secs_f64() * 1000.0
                    );
                    self.kept_open.push(KeptOpen {
                        path,
                        device: Arc::new(Mutex::new(dev)),
                        parked: true,
                    });
                }
                Err(e) => tracing::warn!(
                    "{}: cannot open it ahead ({e}); it is opened when plugged",
                    path.display()
                ),
            }
        }
    }

    /// A passthrough function off the bus stays open, to be parked by
    /// [`DeviceManager::settle`] once whoever waits for the removal is answered.
    fn leave(&mut self, path: &Path, device: Arc<Mutex<VfioPciDevice>>) {
        self.kept_open.push(KeptOpen {
            path: path.to_path_buf(),
            device,
            parked: false,
        });
    }

    /// Quiesce the functions that left the bus (see [`VfioPciDevice::park`]): their
    /// BARs leave guest memory before anything else is placed there.
    fn park_leaving(&mut self) {
        for k in self.kept_open.iter_mut().filter(|k| !k.parked) {
            let t = std::time::Instant::now();
            k.device.lock().unwrap_or_else(|e| e.into_inner()).park();
            k.parked = true;
            tracing::debug!(
                "{}: parked in {:.1} ms",
                k.path.display(),
                t.elapsed().as_secs_f64() * 1000.0
            );
        }
    }

    /// After a removal has been answered: park the functions that left the bus, and
    /// close those whose host path `keep` refuses. A close takes a while (in the
    /// nested test host 150-300 ms): the kernel resets the function as its
    /// descriptor closes, and the container's last one takes the IOMMU's mappings
    /// of guest RAM with it.
    pub fn settle(&mut self, keep: impl Fn(&Path) -> bool) {
        self.park_leaving();
        self.take_opened(false);
        let (kept, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut self.kept_open)
            .into_iter()
            .partition(|k| keep(&k.path));
        self.kept_open = kept;
        for k in gone {
            let t = std::time::Instant::now();
            drop(k.device);
            tracing::info!(
                "{}: function closed in {:.1} ms",
                k.path.display(),
                t.elapsed().as_secs_f64() * 1000.0
            );
        }
    }

    /// Whether the function at `path` is kept open off the bus.
    pub fn is_kept_open(&self, path: &Path) -> bool {
        self.kept_open.iter().any(|k| k.path == path)
    }

    pub fn info(&self) -> Vec<DeviceInfo> {
        self.entries
            .iter()
            .map(|n| match &n.kind {
                Kind::Net { cfg, device, stats } => {
                    let standby = if cfg.standby { ", standby" } else { "" };
                    let driver =
                        peek(device).map_or("device busy: held by another thread".into(), |d| {
                            format!(
                                "driver status {:#x}, features {:#x}",
                                d.status(),
                                d.driver_features()
                            )
                        });
                    DeviceInfo {
                        id: n.id.clone(),
                        kind: "virtio-net".into(),
                        location: format!(
                            "pci 00:{:02x}.0 (tap {}, mac {}{standby}, {driver})",
                            n.slot,
                            cfg.tap,
                            format_mac(&cfg.mac),
                        ),
                        counters: Some(net_counters(stats)),
                    }
                }
                Kind::Vfio { path, device } => {
                    let state =
                        peek(device).map_or("device busy: held by another thread".into(), |d| {
                            let (v, dv) = d.ids();
                            let on = |b: bool| if b { "on" } else { "off" };
                            format!(
                                "{v:04x}:{dv:04x}, memory decoding {}, MSI-X {}, MSI {}",
                                on(d.memory_enabled()),
                                on(d.msix_enabled()),
                                on(d.msi_enabled())
                            )
                        });
                    DeviceInfo {
                        id: n.id.clone(),
                        kind: "vfio-pci".into(),
                        location: format!(
                            "pci 00:{:02x}.0 (host {}, {state})",
                            n.slot,
                            path.file_name().map_or(path.display().to_string(), |f| f
                                .to_string_lossy()
                                .into_owned()),
                        ),
                        counters: None,
                    }
                }
            })
            .collect()
    }
}

/// A NIC's counters as the API shows them.
fn net_counters(s: &devices::virtio::net::NetStatsSource) -> api::NetCounters {
    api::NetCounters {
        queues: s
            .pairs()
            .into_iter()
            .enumerate()
            .map(|(pair, q)| api::QueueCounters {
                pair,
                rx_frames: q.rx_frames,
                rx_bytes: q.rx_bytes,
                tx_frames: q.tx_frames,
                tx_bytes: q.tx_bytes,
                rx_dropped: q.rx_dropped,
                tx_dropped: q.tx_dropped,
                bad_chains: q.bad_chains,
                rx_no_buffers: q.rx_no_buffers,
            })
            .collect(),
        tap_dropped: s.tap_dropped(),
    }
}
