//! ACPI tables: RSDP -> XSDT -> FADT (-> DSDT), MADT, MCFG.
//!
//! The platform is hardware-reduced ACPI: no SCI, PM timer or GPE blocks;
//! power-off goes through the FADT sleep control register and reboot through
//! its reset register (both in [`devices::acpi_pm`]). The DSDT describes the
//! PCI host bridge (`_CRS` windows, `_PRT` legacy routing, one ejectable
//! ACPI device per slot for hotplug), the GED that signals hotplug events,
//! COM1 and the ECAM reservation.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use devices::acpi_pm::{
    PM_BASE, RESET_OFFSET, RESET_VALUE, S5_SLP_TYP, SLEEP_CONTROL_OFFSET, SLEEP_STATUS_OFFSET,
};
use devices::pci::PCI_SLOTS;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::*;
use crate::memory::GuestMemoryMmap;

const OEM_ID: [u8; 6] = *b"TANDEM";
const OEM_TABLE_ID: [u8; 8] = *b"TANDEMVM";
const OEM_REVISION: u32 = 1;
/// First IOAPIC pin used for PCI INTx (pins 16..24 are free of ISA IRQs).
pub const PCI_INTX_GSI_BASE: u32 = 16;
pub const PCI_INTX_GSI_COUNT: u32 = 8;

/// The GSI a slot's INTx pin (0 = INTA) is routed to; the `_PRT` says the same.
pub fn pci_intx_gsi(slot: usize, pin: u32) -> u32 {
    PCI_INTX_GSI_BASE + ((slot as u32 + pin) % PCI_INTX_GSI_COUNT)
}

fn bytes(a: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    v
}

/// Everything the DSDT needs to know about the machine.
pub struct AcpiLayout {
    pub vcpus: u8,
    pub mmio64_start: u64,
    pub mmio64_size: u64,
}

fn pci_host_bridge(layout: &AcpiLayout) -> Vec<u8> {
    let mmio32_end = (PCI_MMIO32_START + PCI_MMIO32_SIZE - 1) as u32;
    let bus = aml::AddressSpace::<u16>::new_bus_number(0, 0);
    let cfg_io = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = aml::AddressSpace::<u16>::new_io(0, 0xcf7, None);
    let io_high = aml::AddressSpace::<u16>::new_io(0xd00, 0xffff, None);
    let mem32 = aml::AddressSpace::<u32>::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO32_START as u32,
        mmio32_end,
        None,
    );
    let mem64 = aml::AddressSpace::<u64>::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        layout.mmio64_start,
        layout.mmio64_start + layout.mmio64_size - 1,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus, &cfg_io, &io_low, &io_high, &mem32, &mem64]);

    // _PRT: slot s, pin p -> GSI; one entry per (slot, pin).
    let mut prt_entries: Vec<Vec<u8>> = Vec::new();
    for slot in 1..PCI_SLOTS {
        for pin in 0..4u32 {
            let addr = ((slot as u32) << 16) | 0xffff;
            let gsi = pci_intx_gsi(slot, pin);
            let pkg = aml::Package::new(vec![&addr, &pin, &aml::ZERO, &gsi]);
            prt_entries.push(bytes(&pkg));
        }
    }
    let prt_raw: Vec<RawAml> = prt_entries.into_iter().map(RawAml).collect();
    let prt_refs: Vec<&dyn Aml> = prt_raw.iter().map(|r| r as &dyn Aml).collect();
    let prt = aml::Package::new(prt_refs);

    let hid = aml::EISAName::new("PNP0A08");
    let cid = aml::EISAName::new("PNP0A03");
    let names: Vec<(&str, &dyn Aml)> = vec![
        ("_HID", &hid),
        ("_CID", &cid),
        ("_ADR", &aml::ZERO),
        ("_SEG", &aml::ZERO),
        ("_UID", &aml::ZERO),
        ("_BBN", &aml::ZERO),
        ("_CRS", &crs),
        ("_PRT", &prt),
    ];
    let named: Vec<aml::Name> = names
        .iter()
        .map(|(n, v)| aml::Name::new((*n).into(), *v))
        .collect();
    let hotplug = RawAml(pci_hotplug_aml());
    let mut children: Vec<&dyn Aml> = named.iter().map(|o| o as &dyn Aml).collect();
    children.push(&hotplug);
    bytes(&aml::Device::new("_SB_.PCI0".into(), children))
}

/// The ACPI name of slot `slot`'s device under PCI0.
fn slot_name(slot: usize) -> String {
    format!("SL{slot:02X}")
}

/// Inside PCI0: the hotplug registers (see [`devices::pci::hotplug`]), one
/// ejectable device per slot (`_ADR`, `_SUN` = slot number, `_EJ0`), and
/// `PCNT`, which the GED's `_EVT` calls to notify the slots the VMM flagged.
fn pci_hotplug_aml() -> Vec<u8> {
    use devices::pci::hotplug::{HOTPLUG_BASE, HOTPLUG_LEN};
    let mut out = Vec::new();
    let base = HOTPLUG_BASE as u32;
    let len = HOTPLUG_LEN as u32;
    aml::OpRegion::new("PCHP".into(), aml::OpRegionSpace::SystemIO, &base, &len)
        .to_aml_bytes(&mut out);
    aml::Field::new(
        "PCHP".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![
            aml::FieldEntry::Named(*b"PCIU", 32),
            aml::FieldEntry::Named(*b"PCID", 32),
            aml::FieldEntry::Named(*b"PCEJ", 32),
        ],
    )
    .to_aml_bytes(&mut out);
    for slot in 1..PCI_SLOTS {
        let adr = (slot as u32) << 16;
        let sun = slot as u32;
        let bit = 1u32 << slot;
        let pcej: aml::Path = "\\_SB_.PCI0.PCEJ".into();
        let store = aml::Store::new(&pcej, &bit);
        let ej0 = aml::Method::new("_EJ0".into(), 1, false, vec![&store]);
        let adr_n = aml::Name::new("_ADR".into(), &adr);
        let sun_n = aml::Name::new("_SUN".into(), &sun);
        aml::Device::new(slot_name(slot).as_str().into(), vec![&adr_n, &sun_n, &ej0])
            .to_aml_bytes(&mut out);
    }
    // PCNT: Local0 = PCIU, Local1 = PCID (each read clears). Any changed
    // slot: a bus check of the whole root bus (Notify(PCI0, 0)), which makes
    // acpiphp add what appeared and drop what vanished; a device check of
    // the slot alone would only ever add. Then for each slot in Local1:
    // Notify(SLxx, 3), the eject request.
    let pciu: aml::Path = "PCIU".into();
    let pcid: aml::Path = "PCID".into();
    let read_up = aml::Store::new(&aml::Local(0), &pciu);
    let read_down = aml::Store::new(&aml::Local(1), &pcid);
    let root: aml::Path = "\\_SB_.PCI0".into();
    let bus_check = aml::Notify::new(&root, &aml::ZERO);
    let changed = aml::NotEqual::new(&aml::Local(0), &aml::ZERO);
    let mut body: Vec<Vec<u8>> = vec![
        bytes(&read_up),
        bytes(&read_down),
        bytes(&aml::If::new(&changed, vec![&bus_check])),
    ];
    for slot in 1..PCI_SLOTS {
        let bit = 1u32 << slot;
        let dev: aml::Path = slot_name(slot).as_str().into();
        let l = aml::Local(1);
        let masked = aml::And::new(&aml::ZERO, &l, &bit);
        let set = aml::NotEqual::new(&masked, &aml::ZERO);
        let eject_request = 3u8;
        let notify = aml::Notify::new(&dev, &eject_request);
        body.push(bytes(&aml::If::new(&set, vec![&notify])));
    }
    let raw: Vec<RawAml> = body.into_iter().map(RawAml).collect();
    let refs: Vec<&dyn Aml> = raw.iter().map(|r| r as &dyn Aml).collect();
    aml::Method::new("PCNT".into(), 0, true, refs).to_aml_bytes(&mut out);
    out
}

/// The Generic Event Device (hardware-reduced ACPI has no GPEs): its
/// interrupt makes the guest run `_EVT`, which lets PCI0 notify the slots.
fn ged() -> Vec<u8> {
    let hid = aml::AmlString::from("ACPI0013");
    let irq = aml::Interrupt::new(true, true, false, false, devices::pci::hotplug::HOTPLUG_GSI);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let hid_n = aml::Name::new("_HID".into(), &hid);
    let uid_n = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs_n = aml::Name::new("_CRS".into(), &crs);
    let call = aml::MethodCall::new("\\_SB_.PCI0.PCNT".into(), vec![]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&call]);
    bytes(&aml::Device::new(
        "_SB_.GED_".into(),
        vec![&hid_n, &uid_n, &crs_n, &evt],
    ))
}

/// A device whose children are all named objects.
fn device(path: &str, names: &[(&str, &dyn Aml)]) -> Vec<u8> {
    let objs: Vec<aml::Name> = names
        .iter()
        .map(|(n, v)| aml::Name::new((*n).into(), *v))
        .collect();
    let refs: Vec<&dyn Aml> = objs.iter().map(|o| o as &dyn Aml).collect();
    bytes(&aml::Device::new(path.into(), refs))
}

/// Pre-serialised AML, to build lists of generated objects.
struct RawAml(Vec<u8>);
impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn com1() -> Vec<u8> {
    let hid = aml::EISAName::new("PNP0501");
    let io = aml::IO::new(0x3f8, 0x3f8, 0, 8);
    let irq = aml::Interrupt::new(true, true, false, false, devices::serial::COM1_IRQ);
    let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
    device(
        "_SB_.COM1",
        &[("_HID", &hid), ("_UID", &aml::ZERO), ("_CRS", &crs)],
    )
}

/// The CMOS clock, so that Linux finds it through PNP instead of probing.
fn rtc() -> Vec<u8> {
    let hid = aml::EISAName::new("PNP0B00");
    let io = aml::IO::new(
        devices::rtc::RTC_PORT as u16,
        devices::rtc::RTC_PORT as u16,
        1,
        devices::rtc::RTC_LEN as u8,
    );
    let irq = aml::Interrupt::new(true, true, false, false, devices::rtc::RTC_IRQ);
    let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
    device("_SB_.RTC_", &[("_HID", &hid), ("_CRS", &crs)])
}

/// Motherboard resources: the ECAM window, so that Linux trusts MCFG.
fn motherboard() -> Vec<u8> {
    let hid = aml::EISAName::new("PNP0C02");
    let ecam = aml::Memory32Fixed::new(false, PCI_ECAM_START as u32, PCI_ECAM_RESERVED as u32);
    let pm = aml::IO::new(
        PM_BASE as u16,
        PM_BASE as u16,
        1,
        devices::acpi_pm::PM_LEN as u8,
    );
    let hotplug = aml::IO::new(
        devices::pci::hotplug::HOTPLUG_BASE as u16,
        devices::pci::hotplug::HOTPLUG_BASE as u16,
        1,
        devices::pci::hotplug::HOTPLUG_LEN as u8,
    );
    let crs = aml::ResourceTemplate::new(vec![&ecam, &pm, &hotplug]);
    device(
        "_SB_.MBRD",
        &[("_HID", &hid), ("_UID", &aml::ZERO), ("_CRS", &crs)],
    )
}

pub fn dsdt(layout: &AcpiLayout) -> Sdt {
    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let s5 = aml::Package::new(vec![&S5_SLP_TYP, &S5_SLP_TYP, &aml::ZERO, &aml::ZERO]);
    t.append_slice(&bytes(&aml::Name::new("_S5_".into(), &s5)));
    t.append_slice(&pci_host_bridge(layout));
    t.append_slice(&com1());
    t.append_slice(&rtc());
    t.append_slice(&motherboard());
    t.append_slice(&ged());
    t.update_checksum();
    t
}

fn io_gas(port: u64) -> GAS {
    GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port)
}

pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    f.reset_reg = io_gas(PM_BASE + RESET_OFFSET);
    f.reset_value = RESET_VALUE;
    f.sleep_control_reg = io_gas(PM_BASE + SLEEP_CONTROL_OFFSET);
    f.sleep_status_reg = io_gas(PM_BASE + SLEEP_STATUS_OFFSET);
    // IA-PC boot flags: legacy devices present; no 8042 flag, so Linux does
    // not spend a second probing a keyboard controller that has no keyboard
    // (the i8042 stays for the reset command only).
    f.iapc_boot_arch = 0x1u16.into();
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"TANDEM\0\0").into();
    bytes(&f.finalize())
}

const MADT_LAPIC: u8 = 0;
const MADT_IOAPIC: u8 = 1;
const MADT_LAPIC_NMI: u8 = 4;
const MADT_PCAT_COMPAT: u32 = 1;

pub fn madt(vcpus: u8) -> Sdt {
    let mut t = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.write_u32(36, APIC_START as u32);
    t.write_u32(40, MADT_PCAT_COMPAT);
    for id in 0..vcpus {
        // uid, APIC id, flags = enabled
        t.append_slice(&[MADT_LAPIC, 8, id, id, 1, 0, 0, 0]);
    }
    let mut ioapic = vec![MADT_IOAPIC, 12, 0, 0];
    ioapic.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    t.append_slice(&ioapic);
    // NMI on LINT1 of every processor (uid 0xff).
    t.append_slice(&[MADT_LAPIC_NMI, 6, 0xff, 0, 0, 1]);
    // append_slice keeps the length field up to date.
    t.update_checksum();
    t
}

pub fn mcfg() -> Vec<u8> {
    let mut m = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    m.add_ecam(PCI_ECAM_START, 0, 0, 0);
    bytes(&m)
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("the ACPI tables need {0} bytes, more than the {1} reserved for them")]
    TooLarge(u64, u64),
    #[error("cannot write ACPI tables to guest memory: {0}")]
    Memory(String),
}

/// Build every table and write them at their fixed guest addresses.
pub fn write_tables(mem: &GuestMemoryMmap, layout: &AcpiLayout) -> Result<(), AcpiError> {
    let mut next = ACPI_TABLES_START;
    let mut place = |data: &[u8]| -> Result<u64, AcpiError> {
        let addr = next;
        let end = addr + data.len() as u64;
        if end > ACPI_TABLES_END {
            return Err(AcpiError::TooLarge(
                end - ACPI_TABLES_START,
                ACPI_TABLES_END - ACPI_TABLES_START,
            ));
        }
        mem.write_slice(data, GuestAddress(addr))
            .map_err(|e| AcpiError::Memory(e.to_string()))?;
        next = end.next_multiple_of(8);
        Ok(addr)
    };
    let dsdt_addr = place(dsdt(layout).as_slice())?;
    let fadt_addr = place(&fadt(dsdt_addr))?;
    let madt_addr = place(madt(layout.vcpus).as_slice())?;
    let mcfg_addr = place(&mcfg())?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for a in [fadt_addr, madt_addr, mcfg_addr] {
        xsdt.add_entry(a);
    }
    let xsdt_addr = place(&bytes(&xsdt))?;
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    mem.write_slice(&bytes(&rsdp), GuestAddress(RSDP_START))
        .map_err(|e| AcpiError::Memory(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_to_zero(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn layout() -> AcpiLayout {
        AcpiLayout {
            vcpus: 4,
            mmio64_start: 1 << 32,
            mmio64_size: 1 << 34,
        }
    }

    #[test]
    fn checksums_and_lengths() {
        let d = dsdt(&layout());
        let tables: Vec<Vec<u8>> = vec![
            d.as_slice().to_vec(),
            fadt(0x1000),
            madt(4).as_slice().to_vec(),
            mcfg(),
        ];
        for t in &tables {
            let len = u32::from_le_bytes([t[4], t[5], t[6], t[7]]) as usize;
            assert_eq!(len, t.len(), "{}", String::from_utf8_lossy(&t[..4]));
            assert!(
                sums_to_zero(t),
                "{} checksum",
                String::from_utf8_lossy(&t[..4])
            );
        }
        // MADT: header 44 + 4 LAPICs + IOAPIC + NMI.
        assert_eq!(madt(4).len(), 44 + 4 * 8 + 12 + 6);
    }

    #[test]
    fn dsdt_names_the_devices() {
        let d = dsdt(&layout());
        let s = d.as_slice();
        let has = |n: &[u8]| s.windows(n.len()).any(|w| w == n);
        for name in [
            &b"PCI0"[..],
            b"_PRT",
            b"_CRS",
            b"_S5_",
            b"COM1",
            b"MBRD",
            b"GED_",
            b"ACPI0013",
            b"PCNT",
            b"PCEJ",
            b"SL01",
            b"SL1F",
            b"_EJ0",
            b"_SUN",
        ] {
            assert!(has(name), "{}", String::from_utf8_lossy(name));
        }
        if let Ok(dir) = std::env::var("TANDEM_DUMP_DSDT") {
            std::fs::write(format!("{dir}/dsdt.aml"), s).unwrap();
        }
    }

    #[test]
    fn tables_land_in_memory_with_a_valid_rsdp() {
        let mem = crate::memory::create(64 << 20).unwrap();
        write_tables(&mem, &layout()).unwrap();
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(RSDP_START)).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(sums_to_zero(&rsdp[..20]), "v1 checksum");
        assert!(sums_to_zero(&rsdp), "extended checksum");
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let mut hdr = [0u8; 36];
        mem.read_slice(&mut hdr, GuestAddress(xsdt_addr)).unwrap();
        assert_eq!(&hdr[..4], b"XSDT");
        let len = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
        assert_eq!(len, 36 + 3 * 8);
        let mut xsdt = vec![0u8; len];
        mem.read_slice(&mut xsdt, GuestAddress(xsdt_addr)).unwrap();
        let sigs: Vec<String> = xsdt[36..]
            .chunks(8)
            .map(|c| {
                let a = u64::from_le_bytes(c.try_into().unwrap());
                let mut s = [0u8; 4];
                mem.read_slice(&mut s, GuestAddress(a)).unwrap();
                String::from_utf8_lossy(&s).into_owned()
            })
            .collect();
        assert_eq!(sigs, ["FACP", "APIC", "MCFG"]);
    }

    #[test]
    fn intx_routing_stays_in_range() {
        for slot in 1..PCI_SLOTS {
            for pin in 0..4 {
                let g = pci_intx_gsi(slot, pin);
                assert!((PCI_INTX_GSI_BASE..PCI_INTX_GSI_BASE + PCI_INTX_GSI_COUNT).contains(&g));
            }
        }
    }
}
