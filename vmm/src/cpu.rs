//! Architectural vCPU state at boot: CPUID (with topology), MSRs, registers
//! for the 64-bit Linux entry, FPU and LAPIC.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use thiserror::Error;

use crate::boot::GDT;
use crate::layout::*;

#[derive(Debug, Error)]
pub enum CpuError {
    #[error("KVM {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted {0} of {1} boot MSRs")]
    Msrs(usize, usize),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Kvm { what, source }
}

const EBX_CLFLUSH_CACHELINE: u32 = 8 << 8;
const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const AMD_LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const AMD_LEAF_SIZE: u32 = 0x8000_0008;
const AMD_LEAF_TOPOLOGY: u32 = 0x8000_001e;
const AMD_ECX_CMP_LEGACY: u32 = 1 << 1;

/// Bits of an APIC id that number the vCPU within its package.
pub fn apic_id_bits(vcpus: u8) -> u32 {
    u32::from(vcpus).next_power_of_two().trailing_zeros()
}

/// Adapt KVM's supported CPUID to vCPU `id` of `vcpus`: one package with
/// `vcpus` single-threaded cores, APIC id = vCPU index.
pub fn patch_cpuid(cpuid: &mut CpuId, id: u8, vcpus: u8, tsc_deadline: bool) {
    let n = u32::from(vcpus);
    let apic = u32::from(id);
    let shift = apic_id_bits(vcpus);
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            1 => {
                e.ebx = (apic << 24) | (n << 16) | EBX_CLFLUSH_CACHELINE | (e.ebx & 0xff);
                e.ecx |= ECX_HYPERVISOR;
                if tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                }
                if vcpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            4
                // Cores per package - 1 in 31:26 (six bits: 64 cores at most, so
                // more vCPUs say 64 rather than wrap); one thread per cache user.
                if e.eax & 0x1f != 0 => {
                    e.eax = (e.eax & 0x3ff) | ((n - 1).min(63) << 26);
                }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = apic;
                match e.index {
                    0 => {
                        // SMT level: one thread per core.
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        // Core level: all vCPUs in one package.
                        e.eax = shift;
                        e.ebx = n;
                        e.ecx = (2 << 8) | 1;
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i & 0xff;
                    }
                }
            }
            AMD_LEAF_EXT_FEATURES => {
                if vcpus > 1 {
                    e.ecx |= AMD_ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !AMD_ECX_CMP_LEGACY;
                }
            }
            AMD_LEAF_SIZE => {
                e.ecx = (e.ecx & !0xf0ff) | (shift << 12) | (n - 1);
            }
            AMD_LEAF_TOPOLOGY => {
                e.eax = apic;
                e.ebx = apic & 0xff; // one thread per core; core id = apic id
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

pub fn setup_cpuid(
    vcpu: &VcpuFd,
    base: &CpuId,
    id: u8,
    vcpus: u8,
    tsc_deadline: bool,
) -> Result<CpuId, CpuError> {
    let mut cpuid = base.clone();
    patch_cpuid(&mut cpuid, id, vcpus, tsc_deadline);
    vcpu.set_cpuid2(&cpuid).map_err(kvm("set CPUID"))?;
    Ok(cpuid)
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WB: u64 = 6;

pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let entries = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WB),
    ]
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    });
    let msrs = Msrs::from_entries(&entries).map_err(|_| CpuError::Msrs(0, entries.len()))?;
    let n = vcpu.set_msrs(&msrs).map_err(kvm("set MSRs"))?;
    if n != entries.len() {
        return Err(CpuError::Msrs(n, entries.len()));
    }
    Ok(())
}

pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("set FPU"))
}

/// General registers for the 64-bit entry: RIP at the kernel, RSI at boot_params.
pub fn setup_regs(vcpu: &VcpuFd, entry: u64) -> Result<(), CpuError> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("set registers"))
}

fn segment(entry: u64, index: u16) -> kvm_segment {
    let flags = (entry >> 40) & 0xf0ff;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: (((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32)
            .checked_shl(if flags & 0x8000 != 0 { 12 } else { 0 })
            .map(|l| if flags & 0x8000 != 0 { l | 0xfff } else { l })
            .unwrap_or(u32::MAX),
        selector: index * 8,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: ((flags >> 15) & 1) as u8,
        avl: ((flags >> 12) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Long mode with paging on, flat segments from [`GDT`].
pub fn setup_sregs(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let mut s = vcpu.get_sregs().map_err(kvm("get special registers"))?;
    let code = segment(GDT[1], 1);
    let data = segment(GDT[2], 2);
    let tss = segment(GDT[3], 3);
    s.gdt.base = GDT_START;
    s.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    s.idt.base = IDT_START;
    s.idt.limit = 7;
    s.cs = code;
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = tss;
    s.cr3 = PML4_START;
    s.cr4 |= X86_CR4_PAE;
    s.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    s.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&s).map_err(kvm("set special registers"))
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// LINT0 delivers the PIC's ExtINT, LINT1 NMI (as a BIOS leaves them).
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm("get LAPIC"))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: Vec<u8> = lapic.regs[reg..reg + 4].iter().map(|b| *b as u8).collect();
        let v = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let v = (v & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("set LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn base() -> CpuId {
        let mk = |function, index, eax| kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ..Default::default()
        };
        CpuId::from_entries(&[
            mk(1, 0, 0),
            mk(4, 0, 0x121),
            mk(LEAF_TOPOLOGY, 0, 0),
            mk(LEAF_TOPOLOGY, 1, 0),
            mk(AMD_LEAF_SIZE, 0, 0),
            mk(AMD_LEAF_TOPOLOGY, 0, 0),
        ])
        .unwrap()
    }

    fn leaf(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn topology_for_three_vcpus() {
        let mut c = base();
        patch_cpuid(&mut c, 2, 3, true);
        let l1 = leaf(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 2, "initial APIC id");
        assert_eq!((l1.ebx >> 16) & 0xff, 3, "logical processors");
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(leaf(&c, 4, 0).eax >> 26, 2);
        let smt = leaf(&c, LEAF_TOPOLOGY, 0);
        let core = leaf(&c, LEAF_TOPOLOGY, 1);
        assert_eq!((smt.ebx, smt.edx), (1, 2));
        assert_eq!((core.eax, core.ebx, (core.ecx >> 8) & 0xff), (2, 3, 2));
        let amd = leaf(&c, AMD_LEAF_SIZE, 0);
        assert_eq!((amd.ecx & 0xff, (amd.ecx >> 12) & 0xf), (2, 2));
        assert_eq!(leaf(&c, AMD_LEAF_TOPOLOGY, 0).eax, 2);
    }

    #[test]
    fn leaf_4_core_count_saturates_above_64_vcpus() {
        for (vcpus, want) in [(64, 63), (65, 63), (100, 63), (254, 63), (63, 62)] {
            let mut c = base();
            patch_cpuid(&mut c, 0, vcpus, false);
            let l4 = leaf(&c, 4, 0);
            assert_eq!(
                (l4.eax >> 26, l4.eax & 0x3ff),
                (want, 0x121),
                "{vcpus} vCPUs"
            );
        }
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut c = base();
        patch_cpuid(&mut c, 0, 1, false);
        assert_eq!(leaf(&c, 1, 0).edx & EDX_HTT, 0);
        assert_eq!(leaf(&c, LEAF_TOPOLOGY, 1).eax, 0);
        assert_eq!(apic_id_bits(1), 0);
        assert_eq!(apic_id_bits(4), 2);
        assert_eq!(apic_id_bits(5), 3);
    }

    #[test]
    fn gdt_segments_decode() {
        let cs = segment(GDT[1], 1);
        assert_eq!(
            (cs.l, cs.db, cs.present, cs.s, cs.type_, cs.selector),
            (1, 0, 1, 1, 0xb, 8)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment(GDT[2], 2);
        assert_eq!((ds.db, ds.type_, ds.l), (1, 3, 0));
    }
}
