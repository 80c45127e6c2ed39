//! The PCI root and a virtio-pci device as a guest sees them: any sequence of port I/O
//! (0xcf8/0xcfc), ECAM and BAR accesses, with BARs moved wherever the guest writes
//! them, the driver status driven anywhere, and the device's state saved and restored
//! (a migration) or restored from bytes the fuzzer makes up (a corrupt stream). Nothing
//! of it may panic.
#![no_main]

use std::io;
use std::sync::{Arc, Mutex};

use devices::bus::Bus;
use devices::pci::msix::{InterruptRoutes, MsiMessage};
use devices::pci::{
    BarKind, PciConfigIo, PciConfigMmio, PciRoot, CONFIG_IO_LEN, CONFIG_IO_PORT, ECAM_BUS0_SIZE,
};
use devices::snapshot::{Saved, SnapshotError};
use devices::virtio::pci::{VirtioPciDevice, BAR0_SIZE};
use devices::virtio::{ActivateArgs, ActivateError, GuestMemoryMmap, VirtioDevice};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

mod ops;
use ops::Ops;

const ECAM: u64 = 0xe000_0000;
/// Where BAR 0 starts, and the window the BAR accesses go to (BAR 0 may move in it).
const WINDOW: u64 = 0xc000_0000;
const WINDOW_LEN: u64 = 0x10_0000;

/// Interrupts and notifications that go nowhere, but hand out real eventfds.
struct Routes;
impl InterruptRoutes for Routes {
    fn allocate_msi(&self, count: usize) -> io::Result<Vec<(u32, EventFd)>> {
        (0..count)
            .map(|i| Ok((32 + i as u32, EventFd::new(libc::EFD_NONBLOCK)?)))
            .collect()
    }
    fn set_msi_routes(&self, _: &[(u32, Option<MsiMessage>)]) -> io::Result<()> {
        Ok(())
    }
    fn free_msi(&self, _: &[(u32, EventFd)]) {}
    fn register_ioevent(&self, _: &EventFd, _: u64) -> io::Result<()> {
        Ok(())
    }
    fn unregister_ioevent(&self, _: &EventFd, _: u64) -> io::Result<()> {
        Ok(())
    }
}

/// A virtio device with a net's queues and a small config space; activation checks
/// what a device must (every enabled queue valid) and keeps nothing.
struct Dev {
    acked: u64,
    config: [u8; 12],
}
impl VirtioDevice for Dev {
    fn device_type(&self) -> u16 {
        1
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![256, 256, 64]
    }
    fn features(&self) -> u64 {
        (1 << 32) | (1 << 29) | (1 << 28) | (1 << 5)
    }
    fn ack_features(&mut self, features: u64) -> bool {
        self.acked = features;
        features & !self.features() == 0
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        devices::virtio::read_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(c) = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.config.get_mut(o))
            {
                *c = *b;
            }
        }
    }
    fn activate(&mut self, args: ActivateArgs) -> Result<(), ActivateError> {
        if args.queues.is_empty() {
            return Err(ActivateError::BadQueues("none".into()));
        }
        Ok(())
    }
    fn reset(&mut self) {
        self.acked = 0;
    }
    fn pause(&mut self) -> Vec<(usize, u16, u16)> {
        Vec::new()
    }
    fn save_device(&self) -> Result<Saved, SnapshotError> {
        Ok(Saved {
            version: 1,
            state: serde_json::json!({ "acked": self.acked }),
        })
    }
    fn restore_device(&mut self, saved: Saved) -> Result<(), SnapshotError> {
        self.acked = saved.state["acked"]
            .as_u64()
            .ok_or_else(|| SnapshotError::bad("dev", "no acked"))?;
        Ok(())
    }
    fn announce_moved(&mut self) -> bool {
        false
    }
}

fn device(mem: &GuestMemoryMmap) -> Option<VirtioPciDevice> {
    let dev = Dev {
        acked: 0,
        config: [0; 12],
    };
    VirtioPciDevice::new(Box::new(dev), mem.clone(), Arc::new(Routes), WINDOW).ok()
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // The setup never fails: a target that quietly did nothing would find nothing.
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("guest memory");
    let (mmio, pio) = (Arc::new(Bus::new()), Arc::new(Bus::new()));
    let root = Arc::new(Mutex::new(PciRoot::new(mmio.clone(), pio.clone())));
    pio.insert(
        Arc::new(Mutex::new(PciConfigIo::new(&root))),
        CONFIG_IO_PORT,
        CONFIG_IO_LEN,
    )
    .expect("0xcf8");
    mmio.insert(
        Arc::new(Mutex::new(PciConfigMmio::new(&root))),
        ECAM,
        ECAM_BUS0_SIZE,
    )
    .expect("ECAM");
    let dev = device(&mem).expect("the virtio-pci device");
    let dev = Arc::new(Mutex::new(dev));
    {
        // The host bridge is in slot 0 already.
        let mut r = root.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = r.add(3, dev.clone(), &[(0, BarKind::Mem32, WINDOW, BAR0_SIZE)]) {
            panic!("cannot add the device: {e}");
        }
    }
    let mut ops = Ops(data);
    while let Some([op, a0, a1, a2, sz]) = ops.take::<5>() {
        let len = [1usize, 2, 4, 8][usize::from(sz & 3)];
        let off = u64::from(u32::from_le_bytes([a0, a1, a2, 0]));
        let mut buf = [0u8; 8];
        let buf = &mut buf[..len];
        // Ops 0-5: a read (even) or a write (odd) to port I/O, ECAM or the BAR window.
        let access = match op % 8 {
            0 | 1 => Some((&pio, CONFIG_IO_PORT + off % CONFIG_IO_LEN)),
            2 | 3 => Some((&mmio, ECAM + off % ECAM_BUS0_SIZE)),
            4 | 5 => Some((&mmio, WINDOW + off % WINDOW_LEN)),
            _ => None,
        };
        if let Some((bus, at)) = access {
            if op % 2 == 0 {
                bus.read(at, buf);
            } else {
                let Some(v) = ops.take::<4>() else { return };
                buf.iter_mut()
                    .zip(v.iter().cycle())
                    .for_each(|(b, v)| *b = *v);
                bus.write(at, buf);
            }
            continue;
        }
        match op % 8 {
            6 => {
                // A migration: the state goes into a freshly built device.
                let saved = {
                    let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
                    d.pause();
                    let s = devices::snapshot::save(&*d);
                    d.resume();
                    s
                };
                if let (Ok(s), Some(mut fresh)) = (saved, device(&mem)) {
                    if let Err(e) = devices::snapshot::restore(&mut fresh, s) {
                        panic!("a state just saved does not restore: {e}");
                    }
                }
            }
            _ => {
                // A corrupt stream: made-up JSON for a fresh device's state.
                let json = ops.bytes(usize::from(a0));
                if let (Ok(saved), Some(mut fresh)) =
                    (serde_json::from_slice::<Saved>(json), device(&mem))
                {
                    let _ = devices::snapshot::restore(&mut fresh, saved);
                }
            }
        }
    }
});
