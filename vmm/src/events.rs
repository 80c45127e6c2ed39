//! Events that devices and vCPUs raise for the control loop: the guest asked
//! to power off or reset, ejected a hotplug slot, changed a virtio device's
//! driver status, or something failed fatally.

use std::sync::{Arc, Mutex};

use devices::virtio::DriverStatus;

use vmm_sys_util::eventfd::EventFd;

pub struct VmEvents {
    pub shutdown_evt: EventFd,
    pub reset_evt: EventFd,
    pub error_evt: EventFd,
    /// The guest ejected a hotplug slot (the PCI hotplug controller says which).
    pub eject_evt: EventFd,
    /// A virtio driver's status changed ([`VmEvents::take_driver_status`] says how).
    pub status_evt: EventFd,
    error: Mutex<Option<String>>,
    driver_status: Mutex<Vec<(String, DriverStatus)>>,
}

impl VmEvents {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            shutdown_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            reset_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            error_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            eject_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            status_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            error: Mutex::new(None),
            driver_status: Mutex::new(Vec::new()),
        })
    }

    /// Device `id`'s driver status changed (called on a vCPU thread: queue and wake).
    pub fn driver_status(&self, id: &str, status: DriverStatus) {
        self.driver_status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id.to_string(), status));
        Self::signal(&self.status_evt, "driver status");
    }

    /// The driver status changes since the last call, in order.
    pub fn take_driver_status(&self) -> Vec<(String, DriverStatus)> {
        std::mem::take(&mut *self.driver_status.lock().unwrap_or_else(|e| e.into_inner()))
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

/// A panic on any thread (a vCPU, a device worker, the API) is fatal: after the usual
/// message, it is reported to the control loop like a vCPU error, which stops the VM
/// and exits non-zero with the message. Without this a panicking thread would just
/// end, leaving a half-alive VMM.
pub fn install_panic_policy(events: Arc<VmEvents>) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        events.fatal(format!("internal error: thread {name} panicked: {info}"));
    }));
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_on_any_thread_is_a_fatal_error_for_the_control_loop() {
        let events = Arc::new(VmEvents::new().unwrap());
        install_panic_policy(events.clone());
        let r = std::thread::Builder::new()
            .name("net0-rx".into())
            .spawn(|| panic!("a worker broke"))
            .unwrap()
            .join();
        assert!(r.is_err());
        assert_eq!(events.error_evt.read().unwrap(), 1);
        let msg = events.take_error().unwrap();
        assert!(
            msg.contains("net0-rx") && msg.contains("a worker broke"),
            "{msg}"
        );
        let _ = std::panic::take_hook();
    }
}
