//! The KVM side of a VM's state: each vCPU's (registers, FPU/XSAVE, MSRs, LAPIC,
//! pending events...), the in-kernel interrupt controllers, the PIT and the KVM
//! clock. Saved on the migration source while the vCPUs are stopped, restored on
//! the destination before they start.
//!
//! Restore order follows what KVM needs: CPUID before anything that depends on
//! it (MSRs, XSAVE), special registers before the LAPIC (the APIC base MSR lives in
//! sregs), the LAPIC before pending events, and the clock last.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("vCPU {id}: {what}: {source}")]
    Vcpu {
        id: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("VM {what}: {source}")]
    Vm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("{0}")]
    Bad(String),
}

#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    #[serde(with = "blob::list")]
    pub cpuid: Vec<kvm_cpuid_entry2>,
    #[serde(with = "blob")]
    mp_state: kvm_mp_state,
    #[serde(with = "blob")]
    regs: kvm_regs,
    #[serde(with = "blob")]
    sregs: kvm_sregs,
    #[serde(with = "blob")]
    xsave: kvm_xsave,
    #[serde(with = "blob")]
    xcrs: kvm_xcrs,
    #[serde(with = "blob")]
    lapic: kvm_lapic_state,
    #[serde(with = "blob::list")]
    msrs: Vec<kvm_msr_entry>,
    #[serde(with = "blob")]
    events: kvm_vcpu_events,
    #[serde(with = "blob")]
    debug: kvm_debugregs,
    tsc_khz: Option<u32>,
}

#[derive(Serialize, Deserialize)]
pub struct KvmVmState {
    #[serde(with = "blob")]
    pic_master: kvm_irqchip,
    #[serde(with = "blob")]
    pic_slave: kvm_irqchip,
    #[serde(with = "blob")]
    ioapic: kvm_irqchip,
    #[serde(with = "blob")]
    pit: kvm_pit_state2,
    #[serde(with = "blob")]
    clock: kvm_clock_data,
}

/// KVM's structures in the JSON state as one hex string each, their bytes as KVM
/// reads and takes them. kvm-bindings' own serde form is those bytes too, which
/// serde_json writes as an array of numbers and reads back a number at a time: for
/// two vCPUs (XSAVE areas, LAPIC pages, CPUID and MSR lists) 7–30 ms of the
/// destination's build in the nested test host, all of it in the downtime. A
/// string of the wrong length is refused, never padded.
mod blob {
    use serde::de::Error as _;
    use serde::{Deserializer, Serializer};
    use zerocopy::{FromBytes, Immutable, IntoBytes};

    const DIGITS: &[u8; 16] = b"0123456789abcdef";

    fn hex(bytes: &[u8]) -> String {
        let mut s = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            s.push(char::from(DIGITS[usize::from(b >> 4)]));
            s.push(char::from(DIGITS[usize::from(b & 15)]));
        }
        s
    }

    fn unhex(text: &str) -> Result<Vec<u8>, String> {
        let digit = |c: u8| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            _ => Err(format!("{:?} is not a hex digit", char::from(c))),
        };
        if text.len() % 2 == 1 {
            return Err(format!("{} hex digits, not whole bytes", text.len()));
        }
        let mut out = Vec::with_capacity(text.len() / 2);
        for p in text.as_bytes().chunks_exact(2) {
            out.push((digit(p[0])? << 4) | digit(p[1])?);
        }
        Ok(out)
    }

    /// The bytes of a hex string, decoded where the deserializer has it (no copy of
    /// the text first).
    fn bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Hex;
        impl serde::de::Visitor<'_> for Hex {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string of hex digits")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
                unhex(v).map_err(E::custom)
            }
        }
        d.deserialize_str(Hex)
    }

    fn read<T: FromBytes>(bytes: &[u8]) -> Result<T, String> {
        T::read_from_bytes(bytes).map_err(|_| {
            format!(
                "{} bytes for a {} of {}",
                bytes.len(),
                std::any::type_name::<T>(),
                std::mem::size_of::<T>()
            )
        })
    }

    pub fn serialize<T: IntoBytes + Immutable, S: Serializer>(
        v: &T,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex(v.as_bytes()))
    }

    pub fn deserialize<'de, T: FromBytes, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        read(&bytes(d)?).map_err(D::Error::custom)
    }

    /// A list of one structure: the bytes of each, one after another.
    pub mod list {
        use super::*;

        pub fn serialize<T: IntoBytes + Immutable, S: Serializer>(
            v: &[T],
            s: S,
        ) -> Result<S::Ok, S::Error> {
            s.serialize_str(&hex(v.as_bytes()))
        }

        pub fn deserialize<'de, T: FromBytes, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Vec<T>, D::Error> {
            let raw = bytes(d)?;
            let size = std::mem::size_of::<T>();
            if size == 0 || raw.len() % size != 0 {
                return Err(D::Error::custom(format!(
                    "{} bytes are no whole number of {} ({size} bytes each)",
                    raw.len(),
                    std::any::type_name::<T>()
                )));
            }
            raw.chunks_exact(size)
                .map(|c| read(c).map_err(D::Error::custom))
                .collect()
        }
    }
}

/// Every MSR KVM lists that this vCPU lets us read. KVM stops a batch at the first
/// MSR it refuses, so refused ones are dropped one by one.
fn readable_msrs(kvm: &Kvm, vcpu: &VcpuFd, id: u8) -> Result<Vec<kvm_msr_entry>, StateError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(|source| StateError::Vcpu {
            id,
            what: "list MSRs",
            source,
        })?;
    let mut entries: Vec<kvm_msr_entry> = list
        .as_slice()
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut out = Vec::with_capacity(entries.len());
    while !entries.is_empty() {
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| StateError::Bad(format!("vCPU {id}: MSR list: {e:?}")))?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(|source| StateError::Vcpu {
                id,
                what: "read MSRs",
                source,
            })?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // Entry n was refused: skip it and read on.
        entries.drain(..(n + 1).min(entries.len()));
    }
    Ok(out)
}

/// `cpuid` is what the vCPU was given (KVM does not always read back what was set).
pub fn save_vcpu(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    id: u8,
    cpuid: Vec<kvm_cpuid_entry2>,
) -> Result<VcpuState, StateError> {
    let e = |what: &'static str| move |source| StateError::Vcpu { id, what, source };
    Ok(VcpuState {
        id,
        cpuid,
        mp_state: vcpu.get_mp_state().map_err(e("read MP state"))?,
        regs: vcpu.get_regs().map_err(e("read registers"))?,
        sregs: vcpu.get_sregs().map_err(e("read special registers"))?,
        xsave: vcpu.get_xsave().map_err(e("read XSAVE"))?,
        xcrs: vcpu.get_xcrs().map_err(e("read XCRs"))?,
        lapic: vcpu.get_lapic().map_err(e("read LAPIC"))?,
        msrs: readable_msrs(kvm, vcpu, id)?,
        events: vcpu.get_vcpu_events().map_err(e("read pending events"))?,
        debug: vcpu.get_debug_regs().map_err(e("read debug registers"))?,
        tsc_khz: vcpu.get_tsc_khz().ok(),
    })
}

/// CPU features the guest was given that this host's KVM cannot give: the
/// feature words of leaves 1, 7 and 0x80000001.
pub fn missing_features(kvm: &Kvm, guest: &[kvm_cpuid_entry2]) -> Result<Vec<String>, String> {
    // With a VM in existence, as when the guest got its CPUID: some KVM modules
    // (kvm_pvm) answer differently without one.
    let _vm = kvm
        .create_vm()
        .map_err(|e| format!("cannot create a VM: {e}"))?;
    let host = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("cannot read this host's CPUID: {e}"))?;
    let find = |f: u32, i: u32| {
        host.as_slice()
            .iter()
            .find(|h| h.function == f && h.index == i)
            .copied()
    };
    let mut missing = Vec::new();
    for g in guest {
        let words: &[(&str, u32, u32)] = match (g.function, g.index) {
            // Leaf 1 ecx: OSXSAVE (27) follows the guest, the hypervisor bit (31) is
            // the VMM's, TSC-deadline (24) is a KVM capability, checked below.
            // Leaf 1 edx HTT (28) and leaf 0x80000001 ecx CmpLegacy (1) describe the
            // topology the VMM gave the guest, not a host feature.
            (1, _) => &[
                ("ecx", g.ecx & !((1 << 27) | (1 << 31) | (1 << 24)), 0),
                ("edx", g.edx & !(1 << 28), 0),
            ],
            (7, 0) => &[
                ("ebx", g.ebx, 0),
                ("ecx", g.ecx & !(1 << 4), 0),
                ("edx", g.edx, 0),
            ],
            (0x8000_0001, _) => &[("ecx", g.ecx & !(1 << 1), 0), ("edx", g.edx, 0)],
            _ => continue,
        };
        let Some(h) = find(g.function, g.index) else {
            missing.push(format!("leaf {:#x}", g.function));
            continue;
        };
        for &(reg, want, _) in words {
            let have = match reg {
                "ebx" => h.ebx,
                "ecx" => h.ecx,
                _ => h.edx,
            };
            let lacking = want & !have;
            if lacking != 0 {
                missing.push(format!(
                    "leaf {:#x}.{} {reg} bits {lacking:#x}",
                    g.function, g.index
                ));
            }
        }
    }
    let deadline = guest
        .iter()
        .any(|g| g.function == 1 && g.ecx & (1 << 24) != 0);
    if deadline && !kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
        missing.push("the TSC-deadline timer".into());
    }
    Ok(missing)
}

pub fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuState) -> Result<(), StateError> {
    let id = s.id;
    let e = |what: &'static str| move |source| StateError::Vcpu { id, what, source };
    let cpuid = CpuId::from_entries(&s.cpuid)
        .map_err(|err| StateError::Bad(format!("vCPU {id}: CPUID: {err:?}")))?;
    vcpu.set_cpuid2(&cpuid).map_err(e("set CPUID"))?;
    if let Some(khz) = s.tsc_khz {
        if let Err(err) = vcpu.set_tsc_khz(khz) {
            tracing::debug!("vCPU {id}: TSC frequency {khz} kHz not settable: {err}");
        }
    }
    vcpu.set_mp_state(s.mp_state).map_err(e("set MP state"))?;
    vcpu.set_regs(&s.regs).map_err(e("set registers"))?;
    vcpu.set_sregs(&s.sregs)
        .map_err(e("set special registers"))?;
    // SAFETY: the XSAVE area is a plain byte image KVM validates itself.
    unsafe { vcpu.set_xsave(&s.xsave) }.map_err(e("set XSAVE"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(e("set XCRs"))?;
    vcpu.set_lapic(&s.lapic).map_err(e("set LAPIC"))?;
    let mut rest: &[kvm_msr_entry] = &s.msrs;
    let mut refused = Vec::new();
    while !rest.is_empty() {
        let msrs = Msrs::from_entries(rest)
            .map_err(|err| StateError::Bad(format!("vCPU {id}: MSRs: {err:?}")))?;
        let n = vcpu.set_msrs(&msrs).map_err(e("set MSRs"))?;
        if let Some(bad) = rest.get(n) {
            refused.push(format!("{:#x}", bad.index));
        }
        rest = rest.get(n + 1..).unwrap_or(&[]);
    }
    if !refused.is_empty() {
        tracing::warn!("vCPU {id}: this host refused MSRs {}", refused.join(" "));
    }
    vcpu.set_vcpu_events(&s.events)
        .map_err(e("set pending events"))?;
    vcpu.set_debug_regs(&s.debug)
        .map_err(e("set debug registers"))?;
    Ok(())
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c).map_err(|source| StateError::Vm {
        what: "read the interrupt controllers",
        source,
    })?;
    Ok(c)
}

pub fn save_vm(vm: &VmFd) -> Result<KvmVmState, StateError> {
    let e = |what: &'static str| move |source| StateError::Vm { what, source };
    Ok(KvmVmState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(e("read the PIT"))?,
        clock: vm.get_clock().map_err(e("read the KVM clock"))?,
    })
}

pub fn restore_vm(vm: &VmFd, s: &KvmVmState) -> Result<(), StateError> {
    let e = |what: &'static str| move |source| StateError::Vm { what, source };
    for (chip, id) in [
        (&s.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&s.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&s.ioapic, KVM_IRQCHIP_IOAPIC),
    ] {
        if chip.chip_id != id {
            return Err(StateError::Bad(format!(
                "interrupt controller {} saved as {id}",
                chip.chip_id
            )));
        }
        vm.set_irqchip(chip)
            .map_err(e("set the interrupt controllers"))?;
    }
    vm.set_pit2(&s.pit).map_err(e("set the PIT"))?;
    // Where the source read the host's real time with the clock, KVM advances the
    // guest's clock by the real time since (the downtime): the guest's time stays the
    // world's. Otherwise it goes on from where it stopped.
    let clock = if s.clock.flags & KVM_CLOCK_REALTIME != 0 {
        kvm_clock_data {
            clock: s.clock.clock,
            flags: KVM_CLOCK_REALTIME,
            realtime: s.clock.realtime,
            ..Default::default()
        }
    } else {
        kvm_clock_data {
            clock: s.clock.clock,
            ..Default::default()
        }
    };
    vm.set_clock(&clock).map_err(e("set the KVM clock"))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    #[test]
    fn kvm_state_travels_as_hex_and_a_wrong_length_is_refused() {
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        vm.create_pit2(kvm_bindings::kvm_pit_config::default())
            .unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        vcpu.set_cpuid2(&cpuid).unwrap();
        let saved = save_vcpu(&kvm, &vcpu, 0, cpuid.as_slice().to_vec()).unwrap();
        let text = serde_json::to_string(&saved).unwrap();
        let back: VcpuState = serde_json::from_str(&text).unwrap();
        assert_eq!(back.xsave.as_bytes(), saved.xsave.as_bytes());
        assert_eq!(back.lapic.as_bytes(), saved.lapic.as_bytes());
        assert_eq!(back.msrs.as_bytes(), saved.msrs.as_bytes());
        assert_eq!(back.cpuid.len(), saved.cpuid.len());
        assert_eq!(serde_json::to_string(&back).unwrap(), text);

        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let regs = v["regs"].as_str().unwrap().to_string();
        let msrs = v["msrs"].as_str().unwrap().to_string();
        let refused = |field: &str, value: String| {
            let mut w = v.clone();
            w[field] = value.into();
            serde_json::from_value::<VcpuState>(w)
                .err()
                .unwrap()
                .to_string()
        };
        let e = refused("regs", regs[2..].to_string());
        assert!(e.contains("bytes for a"), "{e}");
        let e = refused("regs", format!("{}00", regs));
        assert!(e.contains("bytes for a"), "{e}");
        let e = refused("regs", regs[1..].to_string());
        assert!(e.contains("not whole bytes"), "{e}");
        let e = refused("regs", format!("zz{}", &regs[2..]));
        assert!(e.contains("not a hex digit"), "{e}");
        let e = refused("msrs", msrs[2..].to_string());
        assert!(e.contains("no whole number"), "{e}");
        let vm_state = save_vm(&vm).unwrap();
        let back: KvmVmState =
            serde_json::from_str(&serde_json::to_string(&vm_state).unwrap()).unwrap();
        assert_eq!(back.ioapic.as_bytes(), vm_state.ioapic.as_bytes());
        assert_eq!(back.clock.as_bytes(), vm_state.clock.as_bytes());
    }
}
