//! KVM smoke test: a few real-mode instructions through kvm-ioctls.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};

harness::guest_test!(fn kvm_runs_real_mode_code(_env) {
    // mov dx, 0x3f8; add al, bl; out dx, al; hlt
    let code: [u8; 7] = [0xba, 0xf8, 0x03, 0x00, 0xd8, 0xee, 0xf4];
    let mem_size = 0x1000usize;
    let guest_addr = 0x1000u64;

    let kvm = Kvm::new()?;
    let vm = kvm.create_vm()?;
    // SAFETY: an anonymous private mapping with no address hint; the result is checked.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            mem_size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Err("mmap of guest memory failed".into());
    }
    // SAFETY: `mem` is a fresh writable mapping of mem_size >= code.len() bytes.
    unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), mem.cast::<u8>(), code.len()) };
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: guest_addr,
        memory_size: mem_size as u64,
        userspace_addr: mem as u64,
        flags: 0,
    };
    // SAFETY: the region points at our mapping, which outlives the VM (unmapped below
    // after the VM and vCPU are dropped).
    unsafe { vm.set_user_memory_region(region)? };

    let mut vcpu = vm.create_vcpu(0)?;
    let mut sregs = vcpu.get_sregs()?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)?;
    let mut regs = vcpu.get_regs()?;
    regs.rip = guest_addr;
    regs.rax = 2;
    regs.rbx = 3;
    regs.rflags = 2;
    vcpu.set_regs(&regs)?;

    let mut out = None;
    for _ in 0..10 {
        match vcpu.run()? {
            VcpuExit::IoOut(port, data) => out = Some((port, data.to_vec())),
            VcpuExit::Hlt => break,
            other => return Err(format!("unexpected exit {other:?}").into()),
        }
    }
    drop(vcpu);
    drop(vm);
    // SAFETY: the VM that referenced the mapping is gone.
    unsafe { libc::munmap(mem, mem_size) };
    assert_eq!(out, Some((0x3f8, vec![5])), "the guest should write 2+3 to port 0x3f8");
    Ok(())
});
