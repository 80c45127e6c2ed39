//! Where a thread the devices start confines itself.
//!
//! The VMM decides what a thread of each kind may do (its seccomp filter) and
//! registers that here once, with [`set_hook`]; a thread calls [`enter`] before it
//! touches guest data or input from outside. Without a hook (unit tests, tools)
//! [`enter`] does nothing.

use std::sync::OnceLock;

/// The kinds of thread in the VMM, each with its own seccomp filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The control loop: the main thread.
    Control,
    /// One per vCPU: runs the guest and the device models it exits into.
    Vcpu,
    /// A virtio-net queue pair's data path.
    NetWorker,
    /// The API server and its helpers.
    Api,
    /// The serial console's input and output pumps.
    Serial,
    /// A live migration's sender.
    Migration,
}

static HOOK: OnceLock<fn(ThreadKind)> = OnceLock::new();

/// Register what [`enter`] does. Only the first call counts.
pub fn set_hook(hook: fn(ThreadKind)) {
    let _ = HOOK.set(hook);
}

/// Confine the calling thread as a thread of `kind`.
pub fn enter(kind: ThreadKind) {
    if let Some(hook) = HOOK.get() {
        hook(kind);
    }
}
