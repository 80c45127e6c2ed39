//! Events that devices and vCPUs raise for the control loop: the guest asked
//! to power off or reset, ejected a hotplug slot, or something failed fatally.

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

pub struct VmEvents {
    pub shutdown_evt: EventFd,
    pub reset_evt: EventFd,
    pub error_evt: EventFd,
    /// The guest ejected a hotplug slot (the PCI hotplug controller says which).
    pub eject_evt: EventFd,
    error: Mutex<Option<String>>,
}

impl VmEvents {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            shutdown_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            reset_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            error_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            eject_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            error: Mutex::new(None),
        })
    }

    fn signal(evt: &EventFd, what: &str) {
        if let Err(e) = evt.write(1) {
            tracing::error!("cannot signal {what}: {e}");
        }
    }

    pub fn shutdown(&self) {
        Self::signal(&self.shutdown_evt, "shutdown");
    }

    pub fn reset(&self) {
        Self::signal(&self.reset_evt, "reset");
    }

    /// Record the first fatal error and wake the control loop.
    pub fn fatal(&self, msg: String) {
        let mut e = self.error.lock().unwrap_or_else(|e| e.into_inner());
        if e.is_none() {
            *e = Some(msg);
        }
        Self::signal(&self.error_evt, "error");
    }

    pub fn take_error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}
