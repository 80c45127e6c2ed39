//! MSI-X: the vector table and pending-bit array a device exposes in a BAR,
//! the capability in config space, and delivery through the VMM's
//! interrupt routes (one GSI + irqfd per vector).
//!
//! The guest programs table entries with MMIO writes (vCPU thread); device
//! workers trigger vectors from their own threads. Both go through
//! [`MsixState`] behind a mutex: a masked vector's trigger sets its pending
//! bit and is delivered when the guest unmasks it.

use std::io;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

pub const MSIX_CAP_ID: u8 = 0x11;
pub const MSIX_ENTRY_SIZE: u64 = 16;
const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;

/// An MSI message as the guest programmed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiMessage {
    pub addr: u64,
    pub data: u32,
}

/// What the VMM provides devices for interrupts and notifications: KVM
/// routes, irqfds and ioeventfds, behind a trait so devices stay KVM-agnostic.
pub trait InterruptRoutes: Send + Sync {
    /// Allocate `count` GSIs with an irqfd registered on each.
    fn allocate_msi(&self, count: usize) -> io::Result<Vec<(u32, EventFd)>>;
    /// Route each GSI to its message, or remove its route (None), in one update of
    /// the routing table: a table update waits for the kernel's readers of the old
    /// one (about a millisecond even on bare metal), so a whole table goes at once.
    fn set_msi_routes(&self, routes: &[(u32, Option<MsiMessage>)]) -> io::Result<()>;
    /// Release GSIs from [`InterruptRoutes::allocate_msi`] (unregistering their irqfds).
    fn free_msi(&self, vectors: &[(u32, EventFd)]);
    /// Signal `evt` when the guest writes at MMIO `addr` (any size).
    fn register_ioevent(&self, evt: &EventFd, addr: u64) -> io::Result<()>;
    fn unregister_ioevent(&self, evt: &EventFd, addr: u64) -> io::Result<()>;
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

/// Guest-visible MSI-X state (table, PBA, capability control bits).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MsixTableState {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    control: u16,
}

pub struct MsixState {
    table: MsixTableState,
    vectors: Vec<(u32, EventFd)>,
    routes: Arc<dyn InterruptRoutes>,
    /// The vectors' irqfds are signalled by someone else (VFIO, in the kernel), not
    /// through [`MsixState::trigger`]: a masked vector then has no route at all, so
    /// what the device raises while it is masked is dropped rather than delivered.
    passthrough: bool,
}

pub type SharedMsix = Arc<Mutex<MsixState>>;

impl MsixState {
    pub fn new(count: u16, routes: Arc<dyn InterruptRoutes>) -> io::Result<Self> {
        let vectors = routes.allocate_msi(count as usize)?;
        let n = count as usize;
        Ok(Self {
            table: MsixTableState {
                entries: vec![
                    Entry {
                        control: VECTOR_MASKED,
                        ..Default::default()
                    };
                    n
                ],
                pending: vec![false; n],
                control: 0,
            },
            vectors,
            routes,
            passthrough: false,
        })
    }

    /// For a passthrough device whose interrupts reach the irqfds directly
    /// (see [`MsixState::irqfds`]).
    pub fn new_passthrough(count: u16, routes: Arc<dyn InterruptRoutes>) -> io::Result<Self> {
        let mut s = Self::new(count, routes)?;
        s.passthrough = true;
        Ok(s)
    }

    /// Back to power-on state: disabled, every vector masked and cleared, nothing
    /// pending. The vectors keep their routes' GSIs and irqfds (only emptied), so
    /// a function plugged again costs no new interrupt routes.
    pub fn reset(&mut self) {
        for e in &mut self.table.entries {
            *e = Entry {
                control: VECTOR_MASKED,
                ..Default::default()
            };
        }
        self.table.pending.fill(false);
        self.table.control = 0;
        self.update_routes(0..self.count());
    }

    /// The irqfd of each vector, in vector order.
    pub fn irqfds(&self) -> Vec<&EventFd> {
        self.vectors.iter().map(|(_, e)| e).collect()
    }

    pub fn count(&self) -> usize {
        self.table.entries.len()
    }

    pub fn enabled(&self) -> bool {
        self.table.control & CTRL_ENABLE != 0
    }

    fn masked(&self, v: usize) -> bool {
        self.table.control & CTRL_FUNCTION_MASK != 0
            || self
                .table
                .entries
                .get(v)
                .is_none_or(|e| e.control & VECTOR_MASKED != 0)
    }

    /// The capability's message-control word (as read by the guest).
    pub fn control(&self) -> u16 {
        self.table.control | (self.count() as u16 - 1)
    }

    /// The guest wrote the message-control word.
    pub fn set_control(&mut self, v: u16) {
        let old = self.table.control;
        self.table.control = v & (CTRL_ENABLE | CTRL_FUNCTION_MASK);
        let changed = if self.passthrough {
            old != self.table.control
        } else {
            (old ^ self.table.control) & CTRL_ENABLE != 0
        };
        if changed {
            self.update_routes(0..self.count());
        }
        self.deliver_pending();
    }

    fn message(&self, v: usize) -> MsiMessage {
        let e = self.table.entries[v];
        MsiMessage {
            addr: u64::from(e.addr_lo) | (u64::from(e.addr_hi) << 32),
            data: e.data,
        }
    }

    /// Vector `v`'s route as the table has it: a live vector (MSI-X on and, for
    /// passthrough, unmasked) routes to its message, any other has none.
    fn route(&self, v: usize) -> Option<(u32, Option<MsiMessage>)> {
        let (gsi, _) = self.vectors.get(v)?;
        let live = self.enabled() && !(self.passthrough && self.masked(v));
        Some((*gsi, live.then(|| self.message(v))))
    }

    /// One vector's route follows the table (a guest's write to its entry).
    fn update_route(&self, v: usize) {
        if let Some(r) = self.route(v) {
            self.set_routes(std::slice::from_ref(&r));
        }
    }

    /// The routes of vectors `vs` follow the table, in one update.
    fn update_routes(&self, vs: std::ops::Range<usize>) {
        let routes: Vec<_> = vs.filter_map(|v| self.route(v)).collect();
        self.set_routes(&routes);
    }

    fn set_routes(&self, routes: &[(u32, Option<MsiMessage>)]) {
        if let Err(e) = self.routes.set_msi_routes(routes) {
            crate::guest_warn!("MSI-X: cannot update {} routes: {e}", routes.len());
        }
    }

    fn deliver_pending(&mut self) {
        for v in 0..self.count() {
            if self.table.pending[v] && self.enabled() && !self.masked(v) {
                self.table.pending[v] = false;
                self.fire(v);
            }
        }
    }

    fn fire(&self, v: usize) {
        if let Some((_, evt)) = self.vectors.get(v) {
            if let Err(e) = evt.write(1) {
                tracing::warn!("MSI-X vector {v}: {e}");
            }
        }
    }

    /// Raise vector `v` (from a device worker). Out-of-range vectors (the
    /// guest programmed a bad index) are ignored.
    pub fn trigger(&mut self, v: u16) {
        let v = v as usize;
        if v >= self.count() || !self.enabled() {
            return;
        }
        if self.masked(v) {
            self.table.pending[v] = true;
        } else {
            self.fire(v);
        }
    }

    /// The guest read the table (offset within the table region).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let v = (offset / MSIX_ENTRY_SIZE) as usize;
        let field = (offset % MSIX_ENTRY_SIZE) as usize;
        let Some(e) = self.table.entries.get(v) else {
            data.fill(0);
            return;
        };
        let raw: Vec<u8> = [e.addr_lo, e.addr_hi, e.data, e.control]
            .iter()
            .flat_map(|d| d.to_le_bytes())
            .collect();
        copy_out(&raw, field, data);
    }

    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let v = (offset / MSIX_ENTRY_SIZE) as usize;
        let field = (offset % MSIX_ENTRY_SIZE) as usize;
        let Some(e) = self.table.entries.get_mut(v) else {
            return;
        };
        let mut raw: Vec<u8> = [e.addr_lo, e.addr_hi, e.data, e.control]
            .iter()
            .flat_map(|d| d.to_le_bytes())
            .collect();
        if field + data.len() > raw.len() {
            return;
        }
        raw[field..field + data.len()].copy_from_slice(data);
        let word = |i: usize| u32::from_le_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]]);
        let was_masked = self.masked(v);
        let e = &mut self.table.entries[v];
        e.addr_lo = word(0);
        e.addr_hi = word(4);
        e.data = word(8);
        e.control = word(12) & VECTOR_MASKED;
        self.update_route(v);
        if was_masked && !self.masked(v) {
            self.deliver_pending();
        }
    }

    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let mut raw = vec![0u8; self.count().div_ceil(64) * 8];
        for (i, p) in self.table.pending.iter().enumerate() {
            if *p {
                raw[i / 8] |= 1 << (i % 8);
            }
        }
        copy_out(&raw, offset as usize, data);
    }

    pub fn save(&self) -> MsixTableState {
        self.table.clone()
    }

    /// Take over a saved table: same vector count, and the routes follow it.
    pub fn restore(&mut self, table: MsixTableState) -> Result<(), String> {
        let n = self.count();
        if table.entries.len() != n || table.pending.len() != n {
            return Err(format!(
                "an MSI-X table of {} vectors for a device with {n}",
                table.entries.len()
            ));
        }
        self.table = table;
        self.table.control &= CTRL_ENABLE | CTRL_FUNCTION_MASK;
        self.update_routes(0..n);
        Ok(())
    }
}

impl Drop for MsixState {
    fn drop(&mut self) {
        // Freed GSIs lose their routes too.
        self.routes.free_msi(&self.vectors);
    }
}

fn copy_out(raw: &[u8], offset: usize, data: &mut [u8]) {
    for (i, d) in data.iter_mut().enumerate() {
        *d = raw.get(offset + i).copied().unwrap_or(0);
    }
}

/// The 12-byte capability body: table in `bar` at `table_off`, PBA at `pba_off`.
pub fn capability(count: u16, bar: u8, table_off: u32, pba_off: u32) -> Vec<u8> {
    let mut c = vec![MSIX_CAP_ID, 0];
    c.extend_from_slice(&(count - 1).to_le_bytes());
    c.extend_from_slice(&(table_off | u32::from(bar)).to_le_bytes());
    c.extend_from_slice(&(pba_off | u32::from(bar)).to_le_bytes());
    c
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Records routes; irqfds are plain eventfds the test can read.
    #[derive(Default)]
    pub struct FakeRoutes {
        pub routes: Mutex<HashMap<u32, Option<MsiMessage>>>,
        pub ioevents: Mutex<Vec<u64>>,
        next: Mutex<u32>,
    }

    impl InterruptRoutes for FakeRoutes {
        fn allocate_msi(&self, count: usize) -> io::Result<Vec<(u32, EventFd)>> {
            let mut n = self.next.lock().unwrap();
            (0..count)
                .map(|_| {
                    *n += 1;
                    Ok((*n + 23, EventFd::new(libc::EFD_NONBLOCK)?))
                })
                .collect()
        }
        fn set_msi_routes(&self, routes: &[(u32, Option<MsiMessage>)]) -> io::Result<()> {
            self.routes.lock().unwrap().extend(routes.iter().copied());
            Ok(())
        }
        fn free_msi(&self, _: &[(u32, EventFd)]) {}
        fn register_ioevent(&self, _: &EventFd, addr: u64) -> io::Result<()> {
            self.ioevents.lock().unwrap().push(addr);
            Ok(())
        }
        fn unregister_ioevent(&self, _: &EventFd, addr: u64) -> io::Result<()> {
            self.ioevents.lock().unwrap().retain(|a| *a != addr);
            Ok(())
        }
    }

    #[test]
    fn masked_vectors_pend_until_unmasked() {
        let routes = Arc::new(FakeRoutes::default());
        let mut m = MsixState::new(2, routes.clone()).unwrap();
        m.set_control(CTRL_ENABLE);
        // Program vector 1: addr 0xfee00000, data 0x41, still masked.
        m.write_table(16, &0xfee0_0000u32.to_le_bytes());
        m.write_table(24, &0x41u32.to_le_bytes());
        m.trigger(1);
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10, "pending while masked");
        assert!(m.vectors[1].1.read().is_err(), "not delivered while masked");
        m.write_table(28, &0u32.to_le_bytes());
        assert_eq!(m.vectors[1].1.read().unwrap(), 1, "delivered on unmask");
        let gsi = m.vectors[1].0;
        assert_eq!(
            routes.routes.lock().unwrap()[&gsi],
            Some(MsiMessage {
                addr: 0xfee0_0000,
                data: 0x41
            })
        );
        m.trigger(1);
        assert_eq!(m.vectors[1].1.read().unwrap(), 1);
        // Function mask holds everything back.
        m.set_control(CTRL_ENABLE | CTRL_FUNCTION_MASK);
        m.trigger(1);
        assert!(m.vectors[1].1.read().is_err());
        m.set_control(CTRL_ENABLE);
        assert_eq!(m.vectors[1].1.read().unwrap(), 1);
        // Garbage indices and offsets are ignored.
        m.trigger(999);
        m.write_table(16 * 50, &[1, 2, 3, 4]);
        m.write_table(14, &[1, 2, 3, 4]);
        let mut d = [0xffu8; 4];
        m.read_table(16 * 50, &mut d);
        assert_eq!(d, [0; 4]);
        assert_eq!(m.control() & 0x7ff, 1);
    }

    #[test]
    fn a_reset_passthrough_table_is_power_on_with_the_same_vectors() {
        let routes = Arc::new(FakeRoutes::default());
        let mut m = MsixState::new_passthrough(2, routes.clone()).unwrap();
        m.set_control(CTRL_ENABLE);
        m.write_table(0, &0xfee0_0000u32.to_le_bytes());
        m.write_table(8, &0x41u32.to_le_bytes());
        m.write_table(12, &0u32.to_le_bytes());
        m.trigger(1);
        let gsis: Vec<u32> = m.vectors.iter().map(|(g, _)| *g).collect();
        assert!(routes.routes.lock().unwrap()[&gsis[0]].is_some());
        m.reset();
        assert!(!m.enabled());
        assert_eq!(m.control(), 1, "disabled, no function mask, 2 vectors");
        for v in 0..2u64 {
            let mut e = [0u8; 16];
            m.read_table(v * 16, &mut e);
            assert_eq!(
                e,
                [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
                "vector {v}"
            );
        }
        let mut pba = [0xffu8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba, [0; 8], "nothing pending");
        assert_eq!(
            routes.routes.lock().unwrap()[&gsis[0]],
            None,
            "no route left"
        );
        let after: Vec<u32> = m.vectors.iter().map(|(g, _)| *g).collect();
        assert_eq!(after, gsis, "the same GSIs");
    }
}
