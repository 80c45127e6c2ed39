//! KVM interrupt plumbing for devices: GSI allocation, the GSI routing table
//! (legacy IOAPIC/PIC routes plus one MSI route per device vector), irqfds
//! and ioeventfds. Devices reach it through `devices::pci::msix::InterruptRoutes`.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use devices::pci::msix::{InterruptRoutes, MsiMessage};
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

/// IOAPIC pins; MSI GSIs are allocated above them.
pub const IOAPIC_PINS: u32 = 24;
/// KVM's routing table holds at most this many entries.
const MAX_GSI: u32 = 4096;

struct Table {
    msi: BTreeMap<u32, MsiMessage>,
    free: Vec<u32>,
    next: u32,
}

pub struct KvmRoutes {
    vm: Arc<VmFd>,
    table: Mutex<Table>,
}

fn kvm_err(e: kvm_ioctls::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

impl KvmRoutes {
    pub fn new(vm: Arc<VmFd>) -> io::Result<Self> {
        let r = Self {
            vm,
            table: Mutex::new(Table {
                msi: BTreeMap::new(),
                free: vec![],
                next: IOAPIC_PINS,
            }),
        };
        r.commit(&r.table.lock().unwrap_or_else(|e| e.into_inner()))?;
        Ok(r)
    }

    fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = chip;
        e.u.irqchip.pin = pin;
        e
    }

    /// The whole table: KVM_SET_GSI_ROUTING replaces it at once.
    fn entries(t: &Table) -> Vec<kvm_irq_routing_entry> {
        let mut v = Vec::new();
        for gsi in 0..IOAPIC_PINS {
            v.push(Self::irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
            if gsi < 16 && gsi != 2 {
                let (chip, pin) = if gsi < 8 {
                    (KVM_IRQCHIP_PIC_MASTER, gsi)
                } else {
                    (KVM_IRQCHIP_PIC_SLAVE, gsi - 8)
                };
                v.push(Self::irqchip(gsi, chip, pin));
            }
        }
        for (gsi, m) in &t.msi {
            let mut e = kvm_irq_routing_entry {
                gsi: *gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = m.addr as u32;
            e.u.msi.address_hi = (m.addr >> 32) as u32;
            e.u.msi.data = m.data;
            v.push(e);
        }
        v
    }

    /// Gives GSIs back: their irqfds unregistered, their routes gone.
    fn release(&self, t: &mut Table, vectors: &[(u32, EventFd)]) {
        for (gsi, evt) in vectors {
            let _ = self.vm.unregister_irqfd(evt, *gsi);
            t.msi.remove(gsi);
            t.free.push(*gsi);
        }
    }

    /// An allocation failed part way: give back what it took (`taken`, and `gsi` if it
    /// had one without an irqfd yet), then fail with `e`.
    fn undo_allocation<T>(
        &self,
        t: &mut Table,
        taken: &[(u32, EventFd)],
        gsi: Option<u32>,
        e: io::Error,
    ) -> io::Result<T> {
        self.release(t, taken);
        t.free.extend(gsi);
        Err(e)
    }

    fn commit(&self, t: &Table) -> io::Result<()> {
        let entries = Self::entries(t);
        let mut routing =
            KvmIrqRouting::new(entries.len()).map_err(|e| io::Error::other(format!("{e:?}")))?;
        routing.as_mut_slice().copy_from_slice(&entries);
        self.vm.set_gsi_routing(&routing).map_err(kvm_err)
    }
}

impl InterruptRoutes for KvmRoutes {
    fn allocate_msi(&self, count: usize) -> io::Result<Vec<(u32, EventFd)>> {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(u32, EventFd)> = Vec::with_capacity(count);
        for _ in 0..count {
            let gsi = match t.free.pop() {
                Some(g) => g,
                None if t.next < MAX_GSI => {
                    t.next += 1;
                    t.next - 1
                }
                None => {
                    let e = io::Error::other("out of interrupt routes");
                    return self.undo_allocation(&mut t, &out, None, e);
                }
            };
            let evt = match EventFd::new(libc::EFD_NONBLOCK) {
                Ok(e) => e,
                Err(e) => self.undo_allocation(&mut t, &out, Some(gsi), e)?,
            };
            if let Err(e) = self.vm.register_irqfd(&evt, gsi) {
                self.undo_allocation(&mut t, &out, Some(gsi), kvm_err(e))?;
            }
            out.push((gsi, evt));
        }
        Ok(out)
    }

    fn set_msi_routes(&self, routes: &[(u32, Option<MsiMessage>)]) -> io::Result<()> {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed = false;
        for (gsi, msg) in routes {
            changed |= match msg {
                Some(m) => t.msi.insert(*gsi, *m) != Some(*m),
                None => t.msi.remove(gsi).is_some(),
            };
        }
        if changed {
            self.commit(&t)?;
        }
        Ok(())
    }

    fn free_msi(&self, vectors: &[(u32, EventFd)]) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        self.release(&mut t, vectors);
        let _ = self.commit(&t);
    }

    fn register_ioevent(&self, evt: &EventFd, addr: u64) -> io::Result<()> {
        self.vm
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(kvm_err)
    }

    fn unregister_ioevent(&self, evt: &EventFd, addr: u64) -> io::Result<()> {
        self.vm
            .unregister_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(kvm_err)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_allocation_gives_its_gsis_back() {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let r = KvmRoutes::new(vm).unwrap();
        let first = r.allocate_msi(2).unwrap();
        // Two GSIs left: an allocation of three takes both, then runs out.
        {
            let mut t = r.table.lock().unwrap();
            t.free = vec![100, 101];
            t.next = MAX_GSI;
        }
        let e = r.allocate_msi(3).unwrap_err();
        assert!(e.to_string().contains("out of interrupt routes"), "{e}");
        let mut free = r.table.lock().unwrap().free.clone();
        free.sort();
        assert_eq!(
            free,
            [100, 101],
            "the GSIs taken before the failure are free again"
        );
        // And usable: their irqfds were unregistered.
        let again = r.allocate_msi(2).unwrap();
        r.free_msi(&again);
        r.free_msi(&first);
        assert_eq!(r.table.lock().unwrap().free.len(), 4);
    }
}
