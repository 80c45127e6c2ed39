//! The hardware-reduced ACPI power-management registers: the sleep control
//! register (S5 = power off) and the reset register, both on port I/O.
//!
//! The DSDT's `_S5_` package gives the guest `SLP_TYP` = [`S5_SLP_TYP`]; the
//! FADT points `SLEEP_CONTROL_REG` at [`PM_BASE`] and `RESET_REG` at
//! [`PM_BASE`] + [`RESET_OFFSET`] with value [`RESET_VALUE`].

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

pub const PM_BASE: u64 = 0x600;
pub const PM_LEN: u64 = 8;
pub const SLEEP_CONTROL_OFFSET: u64 = 0;
pub const SLEEP_STATUS_OFFSET: u64 = 1;
pub const RESET_OFFSET: u64 = 4;
pub const RESET_VALUE: u8 = 1;
pub const S5_SLP_TYP: u8 = 5;
const SLP_EN: u8 = 1 << 5;
const WAK_STS: u8 = 1 << 7;

pub struct AcpiPm {
    shutdown: EventFd,
    reset: EventFd,
}

impl AcpiPm {
    pub fn new(shutdown: EventFd, reset: EventFd) -> Self {
        Self { shutdown, reset }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let v = if offset == SLEEP_STATUS_OFFSET {
            WAK_STS
        } else {
            0
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        tracing::debug!("acpi pm: write {v:#x} at offset {offset}");
        let evt = match offset {
            SLEEP_CONTROL_OFFSET if v & SLP_EN != 0 && (v >> 2) & 7 == S5_SLP_TYP => &self.shutdown,
            RESET_OFFSET if v == RESET_VALUE => &self.reset,
            _ => return,
        };
        if let Err(e) = evt.write(1) {
            tracing::error!("acpi pm: cannot signal: {e}");
        }
    }
}

/// Nothing the guest can change is kept: writes act at once (a reset, a power-off).
impl crate::snapshot::Snapshot for AcpiPm {
    type State = ();
    const VERSION: u32 = 1;
    fn snapshot_name(&self) -> String {
        "acpi-pm".into()
    }
    fn save(&self) -> Result<(), crate::snapshot::SnapshotError> {
        Ok(())
    }
    fn restore(&mut self, _: ()) -> Result<(), crate::snapshot::SnapshotError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_and_reset() {
        let off = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let rst = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut pm = AcpiPm::new(off.try_clone().unwrap(), rst.try_clone().unwrap());
        // S3 (SLP_TYP 3) is not shutdown.
        pm.write(PM_BASE, 0, &[(3 << 2) | SLP_EN]);
        assert!(off.read().is_err());
        pm.write(PM_BASE, 0, &[(S5_SLP_TYP << 2) | SLP_EN]);
        assert_eq!(off.read().unwrap(), 1);
        pm.write(PM_BASE, RESET_OFFSET, &[RESET_VALUE]);
        assert_eq!(rst.read().unwrap(), 1);
        pm.write(PM_BASE, 0, &[]);
    }
}
