//! vCPU threads and the pause/stop protocol.
//!
//! Each vCPU runs `KVM_RUN` on its own thread and dispatches port I/O and
//! MMIO exits to the buses. The control loop steers them through
//! [`VcpuControl`]: it sets the wanted [`RunState`], then kicks every thread
//! with a signal whose handler sets `kvm_run.immediate_exit`, so a kick that
//! lands just before `KVM_RUN` is not lost. [`VcpuControl::pause`] returns
//! only once every vCPU has stopped running guest code — migration relies on
//! that.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::bus::Bus;
use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::events::VmEvents;

/// The signal used to kick vCPUs out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN_PTR.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's kvm_run mapping, set by the
            // vCPU thread itself and cleared before the mapping goes away; a
            // volatile byte store is async-signal-safe.
            unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
        }
    });
}

/// Install the kick handler once per process.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), handle_kick)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    Stopping,
}

/// How long a pause waits for every vCPU to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct VcpuControl {
    state: Mutex<(RunState, usize)>,
    pause_timeout: Duration,
    cv: Condvar,
    /// Where each vCPU stood when it last parked (for `vm.info` and reports).
    parked_at: Mutex<Vec<(u8, String)>>,
}

#[derive(Debug, thiserror::Error)]
pub enum VcpuControlError {
    #[error("the VM is already paused")]
    AlreadyPaused,
    #[error("the VM is not paused")]
    NotPaused,
    #[error("the VM is stopping")]
    Stopping,
    #[error("{0} of {1} vCPUs did not stop within {2:?}")]
    Timeout(usize, usize, Duration),
}

impl VcpuControl {
    pub fn new() -> Self {
        Self {
            state: Mutex::new((RunState::Running, 0)),
            pause_timeout: PAUSE_TIMEOUT,
            cv: Condvar::new(),
            parked_at: Mutex::new(Vec::new()),
        }
    }

    pub fn state(&self) -> RunState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// Stop all `threads`; returns once every one of them is parked. If they do not all
    /// park within the pause timeout, the pause is undone (the parked ones run again)
    /// and the VM is left running, as before the call.
    pub fn pause<T>(&self, threads: &[JoinHandle<T>]) -> Result<(), VcpuControlError> {
        {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            match st.0 {
                RunState::Paused => return Err(VcpuControlError::AlreadyPaused),
                RunState::Stopping => return Err(VcpuControlError::Stopping),
                RunState::Running => st.0 = RunState::Paused,
            }
        }
        kick_all(threads);
        let timeout = self.pause_timeout;
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while st.1 < threads.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let missing = threads.len() - st.1;
                // Undo: a VM reported paused must not have vCPUs running.
                if st.0 == RunState::Paused {
                    st.0 = RunState::Running;
                    self.cv.notify_all();
                }
                return Err(VcpuControlError::Timeout(missing, threads.len(), timeout));
            }
            st = self
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    pub fn resume(&self) -> Result<(), VcpuControlError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.0 != RunState::Paused {
            return Err(VcpuControlError::NotPaused);
        }
        st.0 = RunState::Running;
        self.cv.notify_all();
        Ok(())
    }

    /// Ask every thread to return; the caller joins them.
    pub fn stop<T>(&self, threads: &[JoinHandle<T>]) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0 = RunState::Stopping;
        self.cv.notify_all();
        kick_all(threads);
    }

    /// The registers each paused vCPU parked with, by vCPU id.
    pub fn parked_at(&self) -> Vec<(u8, String)> {
        let mut v = self
            .parked_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        v.sort();
        v
    }

    /// Called by a vCPU thread between runs: parks while paused; false = exit.
    /// `where_am_i` describes the vCPU's registers, recorded when it parks.
    fn checkpoint(&self, id: u8, where_am_i: impl FnOnce() -> String) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut where_am_i = Some(where_am_i);
        loop {
            match st.0 {
                RunState::Running => return true,
                RunState::Stopping => return false,
                RunState::Paused => {
                    if let Some(f) = where_am_i.take() {
                        let mut p = self.parked_at.lock().unwrap_or_else(|e| e.into_inner());
                        p.retain(|(i, _)| *i != id);
                        p.push((id, f()));
                    }
                    st.1 += 1;
                    self.cv.notify_all();
                    while st.0 == RunState::Paused {
                        st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                    }
                    st.1 -= 1;
                }
            }
        }
    }
}

impl Default for VcpuControl {
    fn default() -> Self {
        Self::new()
    }
}

fn kick_all<T>(threads: &[JoinHandle<T>]) {
    for t in threads {
        if let Err(e) = t.kill(kick_signal()) {
            tracing::warn!("cannot kick a vCPU thread: {e}");
        }
    }
}

/// What a vCPU thread needs.
pub struct VcpuContext {
    pub id: u8,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub control: Arc<VcpuControl>,
    pub events: Arc<VmEvents>,
}

/// The width of the port I/O access the current exit reports (1, 2 or 4).
fn io_access_size() -> usize {
    KVM_RUN_PTR.with(|p| {
        let run = p.get();
        if run.is_null() {
            return 1;
        }
        // SAFETY: the pointer is this thread's kvm_run mapping (set in
        // `run_vcpu`); after a KVM_EXIT_IO the kernel has filled `io`. Only this
        // field is read, not the data area the exit's slice borrows.
        let size =
            unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*run).__bindgen_anon_1.io.size)) };
        match size {
            1 | 2 | 4 => usize::from(size),
            _ => 1,
        }
    })
}

/// The vCPU thread body. Returns the vCPU once told to stop, with any I/O it was
/// in the middle of completed, so that its state can be saved (migration) or it can
/// run again on a new thread.
pub fn run_vcpu(mut vcpu: VcpuFd, ctx: VcpuContext) -> VcpuFd {
    devices::sandbox::enter(devices::sandbox::ThreadKind::Vcpu);
    KVM_RUN_PTR.with(|p| p.set(vcpu.get_kvm_run() as *mut kvm_run));
    loop {
        if !ctx.control.checkpoint(ctx.id, || parked_state(&vcpu)) {
            break;
        }
        match vcpu.run() {
            Ok(exit) => {
                if let Err(msg) = handle_exit(exit, &ctx) {
                    let detail = dump_state(&mut vcpu);
                    ctx.events
                        .fatal(format!("vCPU {}: {msg}\n{detail}", ctx.id));
                    break;
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
            }
            Err(e) => {
                ctx.events
                    .fatal(format!("vCPU {}: KVM_RUN failed: {e}", ctx.id));
                break;
            }
        }
    }
    // An exit the VMM just handled (a port or MMIO read) is finished by KVM on the
    // next entry: enter once with immediate_exit set so the registers are complete.
    vcpu.set_kvm_immediate_exit(1);
    match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR => {}
        other => tracing::debug!("vCPU {}: completing the last exit: {other:?}", ctx.id),
    }
    vcpu.set_kvm_immediate_exit(0);
    KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
    vcpu
}

fn handle_exit(exit: VcpuExit, ctx: &VcpuContext) -> Result<(), String> {
    match exit {
        // A string instruction (`rep outsb`, `rep insw`...) comes as one exit with
        // `count` accesses of `size` bytes each, back to back: each goes to the
        // port on its own.
        VcpuExit::IoIn(port, data) => {
            for chunk in data.chunks_mut(io_access_size()) {
                if !ctx.pio.read(u64::from(port), chunk) {
                    chunk.fill(0xff);
                }
            }
        }
        VcpuExit::IoOut(port, data) => {
            for chunk in data.chunks(io_access_size()) {
                ctx.pio.write(u64::from(port), chunk);
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            if !ctx.mmio.read(addr, data) {
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            ctx.mmio.write(addr, data);
        }
        // A triple fault: what a PC does is reset.
        VcpuExit::Shutdown => ctx.events.reset(),
        VcpuExit::SystemEvent(ty, _) => match ty {
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => ctx.events.reset(),
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ctx.events.shutdown(),
            other => return Err(format!("unhandled KVM system event {other}")),
        },
        VcpuExit::IrqWindowOpen | VcpuExit::Intr => {}
        VcpuExit::InternalError => return Err("KVM internal error".into()),
        VcpuExit::FailEntry(reason, cpu) => {
            return Err(format!(
                "KVM entry failed: hardware reason {reason:#x} on host cpu {cpu}"
            ))
        }
        other => return Err(format!("unhandled exit {other:?}")),
    }
    Ok(())
}

/// What a parked vCPU looks like: registers, run state, the interrupt
/// controller (priorities, in-service and requested vectors, the timer) and
/// the timer and paravirtual MSRs. Read while paused for `vm.info`; this is
/// what tells a guest waiting for an interrupt from one that cannot take it.
fn parked_state(vcpu: &VcpuFd) -> String {
    let mut out = match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "rip {:#x} rsp {:#x} rflags {:#x} cs {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} efer {:#x}",
            r.rip, r.rsp, r.rflags, s.cs.selector, s.cr0, s.cr2, s.cr3, s.efer
        ),
        (Err(e), _) | (_, Err(e)) => format!("registers unavailable: {e}"),
    };
    if let Ok(mp) = vcpu.get_mp_state() {
        out.push_str(&format!(" mp_state {}", mp.mp_state));
    }
    if let Ok(ev) = vcpu.get_vcpu_events() {
        out.push_str(&format!(
            " irq_injected {}:{:#x} nmi_pending {} shadow {}",
            ev.interrupt.injected, ev.interrupt.nr, ev.nmi.pending, ev.interrupt.shadow
        ));
    }
    if let Ok(l) = vcpu.get_lapic() {
        let reg = |off: usize| -> u32 {
            let b = |i: usize| l.regs.get(off + i).map_or(0, |v| *v as u8);
            u32::from_le_bytes([b(0), b(1), b(2), b(3)])
        };
        // 256-bit vector sets are eight registers 16 bytes apart.
        let vecs = |base: usize| -> String {
            let mut v = Vec::new();
            for i in 0..8 {
                let word = reg(base + i * 0x10);
                for bit in 0..32 {
                    if word & (1 << bit) != 0 {
                        v.push(format!("{:#x}", i * 32 + bit));
                    }
                }
            }
            format!("[{}]", v.join(","))
        };
        out.push_str(&format!(
            "\n    lapic id {:#x} svr {:#x} tpr {:#x} ppr {:#x} isr {} irr {} lvtt {:#x} tmict {:#x} tmcct {:#x} tdcr {:#x} lint0 {:#x} esr {:#x}",
            reg(0x20) >> 24,
            reg(0xf0),
            reg(0x80),
            reg(0xa0),
            vecs(0x100),
            vecs(0x200),
            reg(0x320),
            reg(0x380),
            reg(0x390),
            reg(0x3e0),
            reg(0x350),
            reg(0x280),
        ));
    }
    const MSRS: [(u32, &str); 8] = [
        (0x10, "tsc"),
        (0x6e0, "tsc_deadline"),
        (0x1b, "apic_base"),
        (0x4b56_4d01, "kvm_system_time"),
        (0x4b56_4d02, "kvm_async_pf_en"),
        (0x4b56_4d04, "kvm_pv_eoi_en"),
        (0x4b56_4d05, "kvm_poll_control"),
        (0x4b56_4d06, "kvm_async_pf_int"),
    ];
    let entries = MSRS.map(|(index, _)| kvm_bindings::kvm_msr_entry {
        index,
        ..Default::default()
    });
    if let Ok(mut msrs) = kvm_bindings::Msrs::from_entries(&entries) {
        if let Ok(n) = vcpu.get_msrs(&mut msrs) {
            out.push_str("\n    msrs");
            for (e, (_, name)) in msrs.as_slice().iter().take(n).zip(MSRS) {
                out.push_str(&format!(" {name} {:#x}", e.data));
            }
        }
    }
    out
}

/// Registers for the error report of a vCPU that stopped on an error.
fn dump_state(vcpu: &mut VcpuFd) -> String {
    let run = vcpu.get_kvm_run();
    let mut out = String::new();
    if run.exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
        // SAFETY: for KVM_EXIT_INTERNAL_ERROR the kernel filled the
        // `internal` member of the exit union.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        out.push_str(&format!("  suberror {} ", internal.suberror));
        let n = (internal.ndata as usize).min(internal.data.len());
        out.push_str(&format!("data {:x?}\n", &internal.data[..n]));
    }
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => out.push_str(&format!(
            "  rip {:#018x} rsp {:#018x} rflags {:#x}\n  rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} rsi {:#x} rdi {:#x}\n  cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} cs {:#x}",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector
        )),
        (Err(e), _) | (_, Err(e)) => out.push_str(&format!("  (registers unavailable: {e})")),
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod pause_tests {
    use super::*;

    /// vCPU-like threads: `parks` of them reach checkpoints, the rest never do.
    fn threads(c: &Arc<VcpuControl>, parks: usize, stuck: usize) -> Vec<JoinHandle<()>> {
        install_kick_handler().unwrap();
        let mut v = Vec::new();
        for i in 0..parks {
            let c = c.clone();
            v.push(std::thread::spawn(move || {
                while c.checkpoint(i as u8, String::new) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }));
        }
        for _ in 0..stuck {
            let c = c.clone();
            v.push(std::thread::spawn(move || {
                while c.state() != RunState::Stopping {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }));
        }
        v
    }

    #[test]
    fn a_pause_that_times_out_leaves_the_vm_running() {
        let c = Arc::new(VcpuControl {
            pause_timeout: Duration::from_millis(300),
            ..VcpuControl::new()
        });
        let t = threads(&c, 1, 1);
        let e = c.pause(&t).unwrap_err();
        assert!(matches!(e, VcpuControlError::Timeout(1, 2, _)), "{e}");
        assert_eq!(c.state(), RunState::Running, "not reported paused");
        // The vCPU that did park runs again.
        let deadline = Instant::now() + Duration::from_secs(5);
        while c.state.lock().unwrap().1 != 0 {
            assert!(Instant::now() < deadline, "a parked vCPU stayed parked");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(matches!(c.resume(), Err(VcpuControlError::NotPaused)));
        c.stop(&t);
        for t in t {
            t.join().unwrap();
        }
    }

    #[test]
    fn pause_and_resume_when_every_vcpu_parks() {
        let c = Arc::new(VcpuControl::new());
        let t = threads(&c, 2, 0);
        c.pause(&t).unwrap();
        assert_eq!(c.state(), RunState::Paused);
        assert!(matches!(c.pause(&t), Err(VcpuControlError::AlreadyPaused)));
        c.resume().unwrap();
        c.stop(&t);
        for t in t {
            t.join().unwrap();
        }
    }
}
