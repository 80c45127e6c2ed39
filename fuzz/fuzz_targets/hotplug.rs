//! The ACPI PCI hotplug controller between a guest and the VMM: the guest reads and
//! writes its three registers with any width at any offset, the VMM announces slots,
//! asks for ejects and takes the answers, and the state is saved and restored (a
//! migration) or restored from bytes the fuzzer makes up (a corrupt stream). Nothing may
//! panic, and what the guest reads and the VMM takes must follow the protocol:
//! - a read of UP or DOWN returns exactly the slots announced or asked since the last
//!   read (an announce voids an unread eject request for the slot), then nothing;
//! - the VMM is told of an eject only for slots the guest wrote, never slot 0;
//! - an unread slot raises the interrupt again until it is read.
#![no_main]

use devices::bus::BusDevice;
use devices::pci::hotplug::{PciHotplug, DOWN_OFFSET, EJECT_OFFSET, HOTPLUG_BASE, UP_OFFSET};
use devices::snapshot::{Saved, Snapshot};
use vmm_sys_util::eventfd::EventFd;

mod ops;
use ops::Ops;

fn controller() -> (PciHotplug, EventFd) {
    // The setup never fails: a target that quietly did nothing would find nothing.
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let ej = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let h = PciHotplug::new(irq.try_clone().expect("eventfd"), ej);
    (h, irq)
}

/// Slot 0 is the host bridge: never announced or ejected.
fn bit(slot: usize) -> u32 {
    1u32.checked_shl(slot as u32).unwrap_or(0) & !1
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (mut h, mut irq) = controller();
    // What the guest should read next, and the slots it wrote to EJECT since the VMM
    // last took them.
    let (mut up, mut down, mut written) = (0u32, 0u32, 0u32);
    let mut ops = Ops(data);
    while let Some([op, a, b]) = ops.take::<3>() {
        let slot = usize::from(a % 40);
        match op % 8 {
            0 => {
                // A guest read of any width at any offset in (and just past) the block.
                let len = [1usize, 2, 4, 8][usize::from(b & 3)];
                let off = u64::from(a % 16);
                let mut buf = [0u8; 8];
                h.read(HOTPLUG_BASE, off, &mut buf[..len]);
                let got = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
                let want = match (off, len) {
                    (UP_OFFSET, 4) => std::mem::take(&mut up),
                    (DOWN_OFFSET, 4) => std::mem::take(&mut down),
                    _ => 0,
                };
                assert_eq!(got, want, "guest read of {len} bytes at {off}");
            }
            1 => {
                // A guest write: value from the input, any width, any offset.
                let Some(v) = ops.take::<4>() else { return };
                let len = [1usize, 2, 4, 8][usize::from(b & 3)];
                let off = u64::from(a % 16);
                let mut buf = [0u8; 8];
                buf.iter_mut()
                    .zip(v.iter().cycle())
                    .for_each(|(d, s)| *d = *s);
                h.write(HOTPLUG_BASE, off, &buf[..len]);
                if off == EJECT_OFFSET && len == 4 {
                    written |= u32::from_le_bytes(v);
                }
            }
            2 => {
                h.notify_changed(slot);
                up |= bit(slot);
                down &= !bit(slot);
            }
            3 => {
                h.request_eject(slot);
                down |= bit(slot);
            }
            4 => {
                let ejected = h.take_ejected();
                assert_eq!(ejected & 1, 0, "slot 0 (the host bridge) reported ejected");
                assert_eq!(ejected & !written, 0, "an eject the guest never wrote");
                written = 0;
            }
            5 => {
                while irq.read().is_ok() {}
                let pending = h.reraise_if_pending();
                assert_eq!(
                    pending,
                    up | down != 0,
                    "pending: up {up:#x} down {down:#x}"
                );
                assert_eq!(irq.read().is_ok(), pending, "raised only when pending");
            }
            6 => {
                // A migration: the state goes into a freshly built controller.
                let saved = devices::snapshot::save(&h).expect("a state saves");
                let (mut fresh, fresh_irq) = controller();
                if let Err(e) = devices::snapshot::restore(&mut fresh, saved) {
                    panic!("a state just saved does not restore: {e}");
                }
                assert_eq!(fresh.pending(), h.pending(), "pending bits moved");
                // Ejects the VMM had not taken yet stay on the source's side.
                written = 0;
                (h, irq) = (fresh, fresh_irq);
            }
            _ => {
                // A corrupt stream: made-up JSON for a fresh controller's state.
                let json = ops.bytes(usize::from(b));
                if let Ok(saved) = serde_json::from_slice::<Saved>(json) {
                    let (mut fresh, fresh_irq) = controller();
                    if devices::snapshot::restore(&mut fresh, saved).is_ok() {
                        let (u, d) = fresh.pending();
                        assert_eq!((u | d) & 1, 0, "slot 0 pending after a restore");
                        (up, down, written) = (u, d, 0);
                        (h, irq) = (fresh, fresh_irq);
                    }
                }
            }
        }
    }
    let _ = h.snapshot_name();
});
