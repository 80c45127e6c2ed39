//! Taking devices off the bus: `vm.remove-device` (orderly, with a deadline, or by
//! surprise), the guest's own ejects, and the deadlines of orderly removals. A
//! failover primary goes the way its pair decides (`carry_out`).

use std::time::{Duration, Instant};

use api::events::EventKind;
use api::{ApiError, ApiResponse, DeviceRemoved, OnTimeout, RemoveDevice};

use super::Vmm;
use crate::vm::Vm;

/// An orderly removal waiting for the guest to eject the device.
pub(super) struct PendingRemoval {
    pub(super) id: String,
    pub(super) slot: usize,
    pub(super) started: Instant,
    pub(super) deadline: Instant,
    pub(super) on_timeout: OnTimeout,
    pub(super) reply: api::Answer,
}

/// The answer of a finished removal; `steps` for one the guest answered.
pub(super) fn removed(
    id: &str,
    slot: usize,
    how: &str,
    started: Instant,
    steps: Option<api::ReleaseSteps>,
) -> ApiResponse {
    let elapsed_ms = started.elapsed().as_millis() as u64;
    match &steps {
        Some(s) => tracing::info!(
            "device {id} removed from slot {slot} ({how}) after {elapsed_ms} ms: the guest read the request after {} ms and ejected {} ms later; Tandem answered {} ms after that",
            s.notify_ms,
            s.guest_ms,
            s.vmm_ms
        ),
        None => tracing::info!("device {id} removed from slot {slot} ({how}) after {elapsed_ms} ms"),
    }
    serde_json::to_value(DeviceRemoved {
        id: id.to_string(),
        slot,
        how: how.into(),
        elapsed_ms,
        steps,
    })
    .map_err(|e| ApiError::internal(e.to_string()))
}

impl PendingRemoval {
    pub(super) fn answer(self, how: &str) {
        self.answer_with(how, None);
    }

    fn answer_with(self, how: &str, steps: Option<api::ReleaseSteps>) {
        let _ = self
            .reply
            .send(removed(&self.id, self.slot, how, self.started, steps));
    }
}

impl Vmm {
    /// `vm.remove-device`: answers `reply` at once (surprise, or a bad
    /// request), or keeps it in a [`PendingRemoval`] until the guest ejects
    /// the device or the deadline passes.
    pub(super) fn remove_device(
        &mut self,
        vm: &mut Vm,
        body: &serde_json::Value,
        reply: api::Answer,
    ) {
        let req: RemoveDevice = match api::from_body(body) {
            Ok(r) => r,
            Err(e) => {
                let _ = reply.send(Err(ApiError::bad_request(format!("remove-device: {e}"))));
                return;
            }
        };
        let refuse = |reply: api::Answer, e: ApiError| {
            let _ = reply.send(Err(e));
        };
        if !(1..=RemoveDevice::MAX_TIMEOUT_MS).contains(&req.timeout_ms) {
            return refuse(
                reply,
                ApiError::bad_request(format!(
                    "timeout_ms must be 1..={}",
                    RemoveDevice::MAX_TIMEOUT_MS
                )),
            );
        }
        // A failover primary (plugged or hidden) goes the way its pair decides.
        if self.failover.machine.standby_of(&req.id).is_some() {
            let how = if req.surprise {
                net_failover::Removal::Surprise
            } else {
                net_failover::Removal::Orderly {
                    timeout: Duration::from_millis(req.timeout_ms),
                    on_timeout: match req.on_timeout {
                        OnTimeout::Error => net_failover::OnTimeout::Error,
                        OnTimeout::Surprise => net_failover::OnTimeout::Surprise,
                    },
                }
            };
            let slot = self.primary_slot(&req.id);
            let request = self.failover.remember(&req.id, slot, reply);
            let actions = self
                .failover
                .machine
                .handle(net_failover::Input::RemovePrimary {
                    request,
                    primary: req.id.clone(),
                    how,
                });
            self.carry_out(Some(vm), actions);
            return;
        }
        if let Some(primary) = self.failover.primary_of(&req.id) {
            return refuse(
                reply,
                ApiError::conflict(format!(
                    "{} is the standby of the failover primary {primary}: remove {primary} first",
                    req.id
                )),
            );
        }
        let Some(slot) = vm.devices().slot_of(&req.id) else {
            return refuse(
                reply,
                ApiError::not_found(format!("no device with id {:?}", req.id)),
            );
        };
        if self.pending.iter().any(|p| p.id == req.id) && !req.surprise {
            return refuse(
                reply,
                ApiError::conflict(format!("the removal of {} is already under way", req.id)),
            );
        }
        let started = Instant::now();
        if req.surprise {
            if let Err(e) = self.drop_device(vm, &req.id, true) {
                return refuse(reply, ApiError::internal(e.to_string()));
            }
            self.hub.publish(
                Some(&req.id),
                EventKind::SurpriseRemoved {
                    slot,
                    cause: "api".into(),
                },
            );
            // An orderly removal of the same device is over too.
            for p in self.take_pending(&req.id) {
                p.answer("surprise");
            }
            let _ = reply.send(removed(&req.id, slot, "surprise", started, None));
            return;
        }
        if let Err(e) = vm.request_eject(&req.id) {
            return refuse(reply, ApiError::internal(e.to_string()));
        }
        tracing::info!("device {}: eject requested (slot {slot})", req.id);
        self.hub
            .publish(Some(&req.id), EventKind::EjectRequested { slot });
        self.pending.push(PendingRemoval {
            id: req.id,
            slot,
            started,
            deadline: started + Duration::from_millis(req.timeout_ms),
            on_timeout: req.on_timeout,
            reply,
        });
    }

    pub(super) fn take_pending(&mut self, id: &str) -> Vec<PendingRemoval> {
        let (done, keep) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| p.id == id);
        self.pending = keep;
        done
    }

    /// The guest ejected slots: tear their devices down, answer whoever waits.
    pub(super) fn handle_ejects(&mut self, vm: &mut Vm) {
        for (slot, id) in vm.take_ejected() {
            let Some(id) = id else {
                tracing::debug!("the guest ejected slot {slot}, which is empty");
                continue;
            };
            if self.failover.machine.standby_of(&id).is_some() {
                let actions = self
                    .failover
                    .machine
                    .handle(net_failover::Input::GuestEjected { device: id });
                self.carry_out(Some(vm), actions);
                continue;
            }
            if self.failover.primary_of(&id).is_some() {
                // net_failover would lose its standby slave under the primary; Tandem
                // keeps a standby with a primary, as `vm.remove-device` does.
                devices::guest_warn!(
                    "the guest ejected {id}, the standby of a failover pair; it stays"
                );
                continue;
            }
            if let Err(e) = self.drop_device(vm, &id, false) {
                tracing::warn!("device {id}: {e}");
                continue;
            }
            let waiting = self.take_pending(&id);
            self.hub.publish(
                Some(&id),
                EventKind::DeviceReleased {
                    slot,
                    asked: !waiting.is_empty(),
                },
            );
            if waiting.is_empty() {
                tracing::info!("device {id} in slot {slot} released by the guest on its own");
            }
            for p in waiting {
                let steps = vm.release_steps(slot);
                p.answer_with("released", steps);
            }
        }
    }

    /// Orderly removals whose deadline passed: fail, or remove by surprise.
    pub(super) fn expire_removals(&mut self, vm: &mut Vm) {
        let now = Instant::now();
        let (expired, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| p.deadline <= now);
        self.pending = keep;
        for p in expired {
            match p.on_timeout {
                OnTimeout::Surprise => {
                    if let Err(e) = self.drop_device(vm, &p.id, true) {
                        let _ = p.reply.send(Err(ApiError::internal(e.to_string())));
                        continue;
                    }
                    self.hub.publish(
                        Some(&p.id),
                        EventKind::SurpriseRemoved {
                            slot: p.slot,
                            cause: "timeout".into(),
                        },
                    );
                    p.answer("timeout-surprise");
                }
                OnTimeout::Error => {
                    self.hub
                        .publish(Some(&p.id), EventKind::RemovalTimedOut { slot: p.slot });
                    tracing::warn!(
                        "device {}: the guest did not release it within {} ms",
                        p.id,
                        p.started.elapsed().as_millis()
                    );
                    let _ = p.reply.send(Err(ApiError::timeout(format!(
                        "the guest did not release {} within {} ms; the device stays (it is removed if the guest ejects it later)",
                        p.id,
                        (p.deadline - p.started).as_millis()
                    ))));
                }
            }
        }
    }
}
