//! The supervisor's side of `level = "ipsec"`: the task that keeps the SAs up (`crate::ipsec`)
//! gets the `ipsec` services after every change, and the worker hears each change of a
//! path's state, so that it forwards only over an SA that is up.

use tracing::warn;

use super::{Supervisor, Worker};
use crate::{
    handoff::ToWorker,
    ipsec::{Manager, PathSet, Wanted},
};

impl Supervisor {
    /// Tells the IPsec task which services have `outbound.level = "ipsec"` now; the task
    /// starts with the first configuration that has `[ipsec]`.
    pub(super) fn ipsec_sync(&mut self) {
        if self.ipsec.is_none()
            && let Some(settings) = &self.config.ipsec
        {
            self.ipsec = Some(Manager::new(settings.clone(), self.ipsec_tx.clone()));
        }
        if let Some(m) = &self.ipsec {
            m.set(Wanted::of(&self.config.services, &self.files));
        }
    }

    /// Hands the worker the paths' state.
    pub(super) fn send_paths(&self, paths: PathSet) {
        let Worker::Running(w) = &self.worker else {
            // A worker that starts gets the state then (`paths_to_new_worker`).
            return;
        };
        let asker = w.asker.clone();
        tokio::spawn(async move {
            if let Err(e) = asker.tell(ToWorker::Ipsec(paths)).await {
                warn!("could not tell the worker the IPsec paths' state: {e}");
            }
        });
    }

    pub(super) fn paths_to_new_worker(&self) {
        if let Some(m) = &self.ipsec {
            self.send_paths(m.paths());
        }
    }

    /// At a clean stop: the fail-closed routes go (nothing is forwarded any more).
    pub(super) fn ipsec_stop(&mut self) {
        let (Some(_), Some(settings)) = (self.ipsec.take(), &self.config.ipsec) else {
            return;
        };
        let wanted = Wanted::of(&self.config.services, &self.files);
        let (addrs, listens) = (wanted.guarded(), wanted.listeners());
        for removed in crate::ipsec::remove_guard(settings, &addrs, &listens) {
            tracing::info!("removed {removed}");
        }
    }
}
