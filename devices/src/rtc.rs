//! A CMOS real-time clock (MC146818) on ports 0x70/0x71: the time of day
//! from the host, in BCD and 24-hour mode, never "update in progress".
//! Without it Linux's rtc_cmos probe waits seconds before giving up.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

pub const RTC_PORT: u64 = 0x70;
pub const RTC_LEN: u64 = 2;
pub const RTC_IRQ: u32 = 8;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;
/// 24-hour mode; BCD (bit 2 clear).
const REG_B_24H: u8 = 0x02;
/// Valid RAM and time.
const REG_D_VRT: u8 = 0x80;
/// 32.768 kHz time base, 1024 Hz periodic rate.
const REG_A_DEFAULT: u8 = 0x26;

#[derive(Default)]
pub struct Rtc {
    index: u8,
    ram: Vec<u8>,
}

fn bcd(v: u64) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

/// (year, month, day, weekday 1..7 with Sunday = 1) of a day count since 1970-01-01.
fn civil(days: i64) -> (i64, u64, u64, u64) {
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let y = yoe + era * 400 + i64::from(m <= 2);
    let weekday = ((days + 4).rem_euclid(7) + 1) as u64;
    (y, m, d, weekday)
}

impl Rtc {
    pub fn new() -> Self {
        Self {
            index: 0,
            ram: vec![0; 128],
        }
    }

    fn read_reg(&self, reg: u8) -> u8 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let (secs, days) = (now % 86_400, (now / 86_400) as i64);
        let (year, month, day, weekday) = civil(days);
        match reg {
            0x00 => bcd(secs % 60),
            0x02 => bcd((secs / 60) % 60),
            0x04 => bcd(secs / 3600),
            0x06 => bcd(weekday),
            0x07 => bcd(day),
            0x08 => bcd(month),
            0x09 => bcd(year.rem_euclid(100) as u64),
            REG_CENTURY => bcd((year / 100) as u64),
            REG_A => REG_A_DEFAULT,
            REG_B => REG_B_24H,
            REG_C => 0,
            REG_D => REG_D_VRT,
            r => self.ram.get(usize::from(r)).copied().unwrap_or(0),
        }
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let v = if offset == 1 {
            self.read_reg(self.index)
        } else {
            self.index
        };
        data.fill(0);
        if let Some(d) = data.first_mut() {
            *d = v;
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            // Bit 7 of the index port is the NMI mask.
            0 => self.index = v & 0x7f,
            1
                // Time and status registers are the host's; the rest is RAM.
                if self.index > REG_D && self.index != REG_CENTURY => {
                    if let Some(r) = self.ram.get_mut(usize::from(self.index)) {
                        *r = v;
                    }
                }
            _ => {}
        }
    }
}

/// The CMOS RAM and the index register; the time comes from the host.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct RtcState {
    index: u8,
    ram: Vec<u8>,
}

impl crate::snapshot::Snapshot for Rtc {
    type State = RtcState;
    const VERSION: u32 = 1;
    fn snapshot_name(&self) -> String {
        "rtc".into()
    }
    fn save(&self) -> Result<RtcState, crate::snapshot::SnapshotError> {
        Ok(RtcState {
            index: self.index,
            ram: self.ram.clone(),
        })
    }
    fn restore(&mut self, s: RtcState) -> Result<(), crate::snapshot::SnapshotError> {
        if s.ram.len() != 128 || s.index > 0x7f {
            return Err(crate::snapshot::SnapshotError::bad(
                "rtc",
                "CMOS RAM must be 128 bytes and the index below 0x80",
            ));
        }
        self.index = s.index;
        self.ram = s.ram;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar() {
        assert_eq!(civil(0), (1970, 1, 1, 5)); // a Thursday
        assert_eq!(civil(20_417), (2025, 11, 25, 3)); // a Tuesday
        assert_eq!(civil(11_016), (2000, 2, 29, 3));
        assert_eq!(bcd(59), 0x59);
    }

    #[test]
    fn registers() {
        fn rd(r: &mut Rtc, reg: u8) -> u8 {
            r.write(RTC_PORT, 0, &[reg | 0x80]);
            let mut b = [0u8];
            r.read(RTC_PORT, 1, &mut b);
            b[0]
        }
        let mut r = Rtc::new();
        assert_eq!(rd(&mut r, REG_A) & 0x80, 0, "never update-in-progress");
        assert_eq!(rd(&mut r, REG_D), REG_D_VRT);
        assert!(rd(&mut r, 0) <= 0x59 && rd(&mut r, 4) <= 0x23);
        assert_eq!(rd(&mut r, REG_CENTURY) >> 4, 2, "21st century");
        r.write(RTC_PORT, 0, &[0x40]);
        r.write(RTC_PORT, 1, &[0xab]);
        assert_eq!(rd(&mut r, 0x40), 0xab);
        r.write(RTC_PORT, 0, &[0x00]);
        r.write(RTC_PORT, 1, &[0x99]);
        assert_ne!(rd(&mut r, 0x00), 0x99, "the clock is not writable");
        let mut fresh = Rtc::new();
        crate::snapshot::testing::round_trip(&r, &mut fresh);
        assert_eq!(rd(&mut fresh, 0x40), 0xab);
        let bad = crate::snapshot::Saved {
            version: 1,
            state: serde_json::json!({"index": 0, "ram": [1, 2]}),
        };
        assert!(crate::snapshot::restore(&mut fresh, bad).is_err());
    }
}
