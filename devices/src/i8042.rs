//! Just enough of the i8042 keyboard controller for the guest to reset the
//! machine (command 0xFE on port 0x64), which is Linux's last-resort reboot.

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Data port 0x60 and command port 0x64: one device over 0x60..=0x64.
pub const I8042_BASE: u64 = 0x60;
pub const I8042_LEN: u64 = 5;
const CMD_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

pub struct I8042 {
    reset: EventFd,
}

impl I8042 {
    pub fn new(reset: EventFd) -> Self {
        Self { reset }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        // Status 0: no data, input buffer empty, so the guest never waits.
        data.fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        tracing::debug!("i8042: write {data:x?} at offset {offset}");
        if offset == CMD_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            if let Err(e) = self.reset.write(1) {
                tracing::error!("i8042: cannot signal reset: {e}");
            }
        }
    }
}

/// Nothing the guest can change is kept: a write of the reset command acts at once.
impl crate::snapshot::Snapshot for I8042 {
    type State = ();
    const VERSION: u32 = 1;
    fn snapshot_name(&self) -> String {
        "i8042".into()
    }
    fn save(&self) -> Result<(), crate::snapshot::SnapshotError> {
        Ok(())
    }
    fn restore(&mut self, _: ()) -> Result<(), crate::snapshot::SnapshotError> {
        Ok(())
    }
}
