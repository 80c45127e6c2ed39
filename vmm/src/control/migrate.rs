//! Live migration as the control loop sees it: starting a send and following the
//! migration thread's news (freeze, save, thaw on failure), and taking a VM in with
//! `--incoming`. The copying itself is in [`crate::migration`].

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::channel;
use std::sync::Arc;

use api::events::EventKind;
use api::{ApiError, ApiResponse};

use super::{netdev_exists, Outgoing, Vmm, VmmError};
use crate::config;
use crate::failover::Failover;
use crate::migration;
use crate::vm::Vm;

impl Vmm {
    /// `vm.send-migration`: check the VM can go, then hand the copying to a thread.
    pub(super) fn send_migration(&mut self, vm: &mut Vm, body: &serde_json::Value) -> ApiResponse {
        if self.migration.is_some() {
            return Err(ApiError::conflict("a migration is under way already"));
        }
        let params: migration::SendParams = api::from_body(body).map_err(ApiError::bad_request)?;
        let url = migration::Url::parse(&params.url).map_err(ApiError::bad_request)?;
        params.check().map_err(ApiError::bad_request)?;
        // Failover primaries leave the bus before the copying and come back if the
        // migration fails; any other passthrough device pins the VM here.
        let primaries = Failover::primaries(&self.cfg);
        let mut pinned: Vec<String> = vm
            .devices()
            .passthrough_ids()
            .into_iter()
            .chain(self.cfg.devices.iter().map(|d| d.id.clone()))
            .filter(|id| !primaries.contains(id))
            .collect();
        pinned.sort();
        pinned.dedup();
        if !pinned.is_empty() {
            return Err(ApiError::conflict(format!(
                "the VM has passthrough devices that are no failover primary ({}): such a device cannot migrate; remove it first",
                pinned.join(", ")
            )));
        }
        if !self.pending.is_empty() {
            return Err(ApiError::conflict(
                "a device removal is waiting for the guest: migrate once it is done",
            ));
        }
        if !self.adding.is_empty() {
            return Err(ApiError::conflict(
                "a device is being added (its function is being opened): migrate once it is done",
            ));
        }
        for p in self.failover.machine.pairs() {
            let Some((id, _, st)) = p.primary else {
                continue;
            };
            if st == net_failover::PrimaryState::Ejecting {
                return Err(ApiError::conflict(format!(
                    "failover primary {id} is being removed: migrate once it is done"
                )));
            }
            if st == net_failover::PrimaryState::Plugged && vm.paused() {
                return Err(ApiError::conflict(format!(
                    "the VM is paused and its failover primary {id} is on the bus, which a paused guest cannot release: resume it, or remove the primary first"
                )));
            }
        }
        let boot = self.cfg.boot.clone().ok_or_else(|| {
            ApiError::internal("the VM has no boot files to send (a bug: it runs)")
        })?;
        let info = |path: &std::path::Path, f: &std::fs::File| {
            migration::BootFileInfo::of(path, f)
                .map_err(|e| ApiError::internal(format!("{}: {e}", path.display())))
        };
        let kernel = info(&self.cfg.kernel, &boot.kernel)?;
        let initramfs = match (&self.cfg.initramfs, &boot.initramfs) {
            (Some(p), Some(f)) => Some(info(p, f)?),
            _ => None,
        };
        // A host name that does not resolve names nothing: 404.
        let url = url.resolved().map_err(ApiError::not_found)?;
        vm.log_dirty_pages(true)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let (tx, rx) = channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let wake = self
            .migration_evt
            .try_clone()
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let source = migration::Source {
            url,
            mem: vm.memory().clone(),
            vm_fd: vm.vm_fd().clone(),
            hello: migration::Hello {
                version: migration::PROTOCOL_VERSION,
                memory_bytes: self.cfg.memory_bytes,
                vcpus: self.cfg.vcpus,
                // The slot each NIC is in (one given none took the lowest free at
                // boot): the destination keeps it, and places its devices around it.
                nets: self
                    .cfg
                    .nets
                    .iter()
                    .map(|n| (n.net.clone(), vm.devices().slot_of(&n.net.id).or(n.slot)))
                    .collect(),
                cpuid: vm.cpuid().to_vec(),
                kernel,
                initramfs,
                cmdline: self.cfg.cmdline.clone(),
            },
            boot,
            cancel: cancel.clone(),
            to_loop: tx,
            wake,
            params: params.clone(),
        };
        if let Err(e) = std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || source.run())
        {
            let _ = vm.log_dirty_pages(false);
            return Err(ApiError::internal(format!(
                "cannot start the migration thread: {e}"
            )));
        }
        tracing::info!("migration to {} started", params.url);
        self.hub.publish(
            None,
            EventKind::MigrationStarted {
                url: params.url.clone(),
            },
        );
        self.migration = Some(Outgoing {
            cancel,
            rx,
            frozen: None,
            held: Vec::new(),
            unplug_timeout: std::time::Duration::from_millis(params.unplug_timeout_ms),
            hold: None,
        });
        Ok(serde_json::json!({ "url": params.url }))
    }

    pub(super) fn cancel_migration(&mut self, why: &str) {
        if let Some(m) = self.migration.as_mut() {
            tracing::warn!("migration cancelled: {why}");
            m.cancel.store(true, Ordering::SeqCst);
            if let Some(h) = m.hold.take() {
                let _ = h.go.send(Err(format!("cancelled: {why}")));
            }
        }
    }

    /// The destination accepted the VM: hold every failover primary off the bus, and
    /// let the copying start once they all are (see [`Vmm::advance_hold`]).
    fn hold_primaries(&mut self, vm: &mut Vm, go: std::sync::mpsc::Sender<Result<(), String>>) {
        let primaries = Failover::primaries(&self.cfg);
        let Some(timeout) = self.migration.as_ref().map(|m| m.unplug_timeout) else {
            return;
        };
        let mut waiting = Vec::new();
        for id in &primaries {
            let (tx, rx) = api::answer_channel();
            let slot = self.primary_slot(id);
            let request = self.failover.remember_hold(id, slot, tx);
            tracing::info!("migration: failover primary {id} leaves the bus first");
            let actions = self
                .failover
                .machine
                .handle(net_failover::Input::HoldPrimary {
                    request,
                    primary: id.clone(),
                    timeout,
                });
            self.carry_out(Some(vm), actions);
            waiting.push((id.clone(), rx));
        }
        if let Some(m) = self.migration.as_mut() {
            m.held = primaries;
            m.hold = Some(super::HoldWait { go, waiting });
        }
        self.advance_hold();
    }

    /// A migration waiting for its primaries to leave the bus: go once all are off,
    /// fail at the first that cannot.
    pub(super) fn advance_hold(&mut self) {
        let Some(m) = self.migration.as_mut() else {
            return;
        };
        let Some(h) = m.hold.as_mut() else {
            return;
        };
        let mut failed = None;
        h.waiting.retain_mut(|(id, rx)| match rx.try_recv() {
            Ok(Ok(_)) => false,
            Ok(Err(e)) => {
                failed.get_or_insert(format!("failover primary {id}: {}", e.message));
                false
            }
            Err(api::TryRecvError::Empty) => true,
            Err(api::TryRecvError::Closed) => {
                failed.get_or_insert(format!("failover primary {id}: no answer"));
                false
            }
        });
        let answer = match failed {
            Some(why) => Err(why),
            None if h.waiting.is_empty() => {
                tracing::info!("migration: the failover primaries are off the bus; copying");
                Ok(())
            }
            None => return,
        };
        if let Some(h) = m.hold.take() {
            let _ = h.go.send(answer);
        }
    }

    /// The migration ended with the guest here: its primaries come back.
    fn unhold_primaries(&mut self, vm: &mut Vm, held: Vec<String>) {
        for id in held {
            let actions = self
                .failover
                .machine
                .handle(net_failover::Input::Unhold { primary: id });
            self.carry_out(Some(vm), actions);
        }
    }

    /// News from the migration thread; true once the destination runs the guest.
    pub(super) fn handle_migration(&mut self, vm: &mut Vm) -> bool {
        let Some(m) = self.migration.as_mut() else {
            return false;
        };
        let msgs: Vec<_> = m.rx.try_iter().collect();
        for msg in msgs {
            match msg {
                migration::ToLoop::Accepted(go) => self.hold_primaries(vm, go),
                migration::ToLoop::Progress(p) => {
                    tracing::info!(
                        "migration round {}: {} pages left, {} Mbit/s{}",
                        p.round,
                        p.pages_left,
                        p.rate_mbps,
                        if p.phase == "wait-destination" {
                            "; waiting for the destination's passthrough functions"
                        } else {
                            ""
                        }
                    );
                    self.hub.publish(None, EventKind::MigrationProgress(p));
                }
                migration::ToLoop::Paused { round, pages_left } => {
                    self.hub
                        .publish(None, EventKind::MigrationPaused { round, pages_left });
                }
                migration::ToLoop::Freeze(reply) => {
                    let answer = match vm.freeze() {
                        Ok(was_paused) => {
                            let stopped_at = std::time::Instant::now();
                            if let Some(m) = self.migration.as_mut() {
                                m.frozen = Some(was_paused);
                            }
                            vm.save(&self.kvm, was_paused)
                                .map_err(|e| e.to_string())
                                .and_then(|st| serde_json::to_vec(&st).map_err(|e| e.to_string()))
                                .map(|st| (stopped_at, st))
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    let _ = reply.send(answer);
                }
                migration::ToLoop::Completed(p) => {
                    tracing::info!(
                        "migration completed in {} ms, downtime {} ms",
                        p.elapsed_ms,
                        p.downtime_ms.unwrap_or(0)
                    );
                    self.hub.publish(None, EventKind::MigrationCompleted(p));
                    self.migration = None;
                    return true;
                }
                migration::ToLoop::Failed(reason) => {
                    let (frozen, held) = self
                        .migration
                        .take()
                        .map(|m| (m.frozen, m.held))
                        .unwrap_or_default();
                    let mut guest = "runs on here".to_string();
                    if let Some(was_paused) = frozen {
                        if let Err(e) = vm.thaw(was_paused) {
                            guest = format!("could not be restarted here: {e}");
                            self.events.fatal(format!("after a failed migration: {e}"));
                        } else if was_paused {
                            guest = "stays paused here, as it was".into();
                        }
                    }
                    if let Err(e) = vm.log_dirty_pages(false) {
                        tracing::warn!("cannot turn dirty logging off: {e}");
                    }
                    if !held.is_empty() {
                        guest.push_str(&format!(
                            ", its failover primaries ({}) plugged again",
                            held.join(", ")
                        ));
                    }
                    tracing::error!("migration failed: {reason}; the guest {guest}");
                    self.hub
                        .publish(None, EventKind::MigrationFailed { reason, guest });
                    self.unhold_primaries(vm, held);
                    return false;
                }
            }
        }
        false
    }

    /// `--incoming`: take the VM a source sends, run it once the source says so.
    pub(super) fn receive_migration(&mut self, inc: &config::IncomingSpec) -> Result<Vm, VmmError> {
        let url = migration::Url::parse(&inc.url).map_err(VmmError::Guest)?;
        let kvm = &self.kvm;
        let (serial, events) = (&self.serial, &self.events);
        let mut nets = Vec::new();
        let mut shape = (0u64, 0u8);
        let mut booted_from = None;
        // The machine is made as soon as the memory is: this host's passthrough
        // functions are opened, and guest RAM mapped for their DMA, on a thread of their
        // own while the memory arrives (see `Vm::prepare`).
        let open_ahead: Vec<_> = inc.devices.iter().map(|d| d.path.clone()).collect();
        let mut machine = None;
        let incoming = migration::receive(
            &url,
            self.signals.as_raw_fd(),
            |hello| {
                for given in &inc.nets {
                    if !hello.nets.iter().any(|(n, _)| n.id == given.id) {
                        return Err(format!(
                            "--net {}: the source has no NIC with this id (it has: {})",
                            given.id,
                            hello
                                .nets
                                .iter()
                                .map(|(n, _)| n.id.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ));
                    }
                }
                for (net, slot) in &hello.nets {
                    let given = inc.nets.iter().find(|g| g.id == net.id).ok_or_else(|| {
                        format!(
                            "the source has NIC {} and the destination names no tap for it (--net id={},tap=NAME)",
                            net.id, net.id
                        )
                    })?;
                    let spec = config::NetSpec {
                        net: net.clone(),
                        slot: *slot,
                    };
                    let here = config::merge_incoming_net(&spec, given)?;
                    if !netdev_exists(&here.net.tap) {
                        return Err(format!(
                            "--net {}: tap {} does not exist on the destination",
                            here.net.id, here.net.tap
                        ));
                    }
                    nets.push(here);
                }
                // This host's passthrough devices against the guest's NICs: a primary
                // pairs with a migrated standby, no slot is taken twice, and a VF's MAC
                // is its standby's.
                config::check_devices(&nets, &inc.devices).map_err(|e| e.to_string())?;
                for d in &inc.devices {
                    if let Some(note) =
                        config::check_primary_mac(d, &nets).map_err(|e| e.to_string())?
                    {
                        tracing::info!("{note}");
                    }
                }
                let missing = crate::vmstate::missing_features(kvm, &hello.cpuid)?;
                if !missing.is_empty() {
                    return Err(format!(
                        "this host cannot give the guest the CPU features it has: {}",
                        missing.join(", ")
                    ));
                }
                if hello.vcpus == 0 {
                    return Err("a VM without vCPUs".into());
                }
                shape = (hello.memory_bytes, hello.vcpus);
                booted_from = Some((
                    hello.kernel.path.clone(),
                    hello.initramfs.as_ref().map(|i| i.path.clone()),
                    hello.cmdline.clone(),
                ));
                Ok(())
            },
            |bytes| {
                if bytes < 64 << 20 || bytes > config::host_memory_bytes() {
                    return Err(format!(
                        "{} MiB of guest memory (this host has {} MiB)",
                        bytes >> 20,
                        config::host_memory_bytes() >> 20
                    ));
                }
                let mem = crate::memory::create(bytes)
                    .map_err(|e| format!("cannot allocate {} MiB: {e}", bytes >> 20))?;
                let count = open_ahead.len() as u32;
                let (prepared, opening) =
                    Vm::prepare(kvm, bytes, &mem, serial, events, open_ahead)
                        .map_err(|e| e.to_string())?;
                machine = Some(prepared);
                Ok((
                    mem,
                    opening.map(|ahead| migration::Opening {
                        count,
                        done: ahead.done.clone(),
                        hurry: Box::new(move || ahead.hurry()),
                    }),
                ))
            },
        )
        .map_err(|e| VmmError::Guest(format!("incoming migration: {e}")))?;
        let migration::Incoming {
            mut conn,
            mem,
            state,
            boot,
        } = incoming;
        // A reboot here boots what the source booted: the source's paths are only
        // shown by vm.info, the bytes came with the migration.
        if let Some((kernel, initramfs, cmdline)) = booted_from {
            self.cfg.kernel = kernel.into();
            self.cfg.initramfs = initramfs.map(Into::into);
            self.cfg.cmdline = cmdline;
        }
        self.cfg.boot = Some(Arc::new(boot));
        self.cfg.memory_bytes = shape.0;
        self.cfg.vcpus = shape.1;
        self.cfg.nets = nets;
        // This host's primaries pair with the standbys that came with the VM: each is
        // plugged when the restored standby reports the guest's STANDBY ack. Devices
        // that pair with nothing are added once the guest runs.
        let (primaries, plain): (Vec<_>, Vec<_>) = inc
            .devices
            .iter()
            .cloned()
            .partition(|d| d.failover.is_some());
        self.cfg.devices = primaries;
        self.failover = Failover::new(&mut self.cfg).map_err(|e| VmmError::Guest(e.to_string()))?;
        let fail = |conn: &mut Box<dyn migration::Stream>, e: String| {
            migration::refuse(conn.as_mut(), &e);
            VmmError::Guest(format!("incoming migration: {e}"))
        };
        let arrived = std::time::Instant::now();
        let state_len = state.len();
        let state: crate::vm::VmState = match serde_json::from_slice(&state) {
            Ok(s) => s,
            Err(e) => return Err(fail(&mut conn, format!("bad VM state: {e}"))),
        };
        let paused = state.paused;
        let parsed = arrived.elapsed();
        let Some(machine) = machine else {
            return Err(fail(&mut conn, "no machine was prepared".into()));
        };
        let mut vm = match Vm::restore(machine, &self.cfg, mem, state, &self.events) {
            Ok(vm) => vm,
            Err(e) => return Err(fail(&mut conn, e.to_string())),
        };
        for d in &self.cfg.devices {
            if let Some(slot) = d.slot {
                vm.reserve_slot(slot);
            }
        }
        tracing::info!(
            "migration: the VM was built {:.1} ms after its state arrived ({} KiB, read in {:.1} ms)",
            arrived.elapsed().as_secs_f64() * 1000.0,
            state_len >> 10,
            parsed.as_secs_f64() * 1000.0
        );
        migration::ready_and_wait_go(conn.as_mut()).map_err(|e| {
            VmmError::Guest(format!(
                "incoming migration: {e}; the source keeps the guest"
            ))
        })?;
        vm.thaw(paused)?;
        migration::confirm_running(conn.as_mut());
        vm.announce_moved();
        self.boots += 1;
        tracing::info!("the migrated guest runs here");
        for d in plain {
            let id = d.id.clone();
            if let Err(e) = self.add_device_spec(&mut vm, d) {
                tracing::warn!("--device {id}: not added: {}", e.message);
            }
        }
        self.hub.publish(
            None,
            if paused {
                EventKind::VmPaused
            } else {
                EventKind::VmResumed
            },
        );
        Ok(vm)
    }
}
