//! Changes to the running configuration: a reload (SIGHUP, `relay reload`), `relay service
//! add|remove`, a watched CRL replaced on disk.
//!
//! One at a time, in the order they came. Each is checked in full before anything moves (the
//! next configuration parsed, its files read once and compiled: `service::check`), its new
//! listeners bound, and then sent to the worker; the loop goes on meanwhile, and the worker's
//! answer comes back as an event. Only when the worker took it does the supervisor commit:
//! data path maps, listeners, the configuration and its files. An invalid change, or one the
//! worker refuses, is answered with its error and leaves everything as it was. With no worker
//! running, a valid change is committed at once: the next worker starts with it.

use std::{collections::HashMap, path::PathBuf};

use anyhow::{Context as _, bail};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::{APPLY_TIMEOUT, Event, Supervisor, Worker, bind, log_service};
use crate::{
    config::{Config, Service, Source},
    control::{ChangeSummary, Response},
    handoff::{Apply, FromWorker, Role, ToWorker},
    service,
    tls::Files,
};

/// A change asked for, and who is waiting for its answer.
pub struct Change {
    kind: Kind,
    reply: Option<oneshot::Sender<Response>>,
}

enum Kind {
    Reload,
    Add(Box<Service>),
    Remove(String),
    /// Watched files changed: the configuration in force, with its files read again.
    Files(Vec<PathBuf>),
}

impl Change {
    pub fn reload(reply: Option<oneshot::Sender<Response>>) -> Change {
        Change {
            kind: Kind::Reload,
            reply,
        }
    }

    pub fn add(service: Service, reply: oneshot::Sender<Response>) -> Change {
        Change {
            kind: Kind::Add(Box::new(service)),
            reply: Some(reply),
        }
    }

    pub fn remove(name: String, reply: oneshot::Sender<Response>) -> Change {
        Change {
            kind: Kind::Remove(name),
            reply: Some(reply),
        }
    }

    pub fn files(paths: Vec<PathBuf>) -> Change {
        Change {
            kind: Kind::Files(paths),
            reply: None,
        }
    }
}

/// A change checked and sent to the worker, waiting for its answer.
pub struct Pending {
    change: Change,
    prepared: Prepared,
}

/// Everything a change needs, checked.
struct Prepared {
    id: u64,
    next: Config,
    files: Files,
    /// Listeners bound for it, handed to the worker with it.
    opened: Vec<(Role, std::net::TcpListener)>,
    close: Vec<Role>,
    summary: ChangeSummary,
}

impl Supervisor {
    /// Takes a change in: now, or after the ones before it.
    pub(super) fn change(&mut self, change: Change) {
        self.queue.push_back(change);
        self.next_queued();
    }

    /// Starts the next waiting change, unless one is in flight or a worker is starting (it
    /// gets the configuration in force first).
    pub(super) fn next_queued(&mut self) {
        while self.pending.is_none() && !matches!(self.worker, Worker::Starting(_)) {
            let Some(change) = self.queue.pop_front() else {
                return;
            };
            let prepared = match self.prepare(&change.kind) {
                Ok(p) => p,
                Err(e) => {
                    self.finish(change, Err(e));
                    continue;
                }
            };
            let pending = Pending { change, prepared };
            let Worker::Running(w) = &self.worker else {
                self.commit(pending);
                continue;
            };
            let p = &pending.prepared;
            let add = p.opened.iter().map(|(r, _)| r.clone()).collect();
            let msg = ToWorker::Apply(self.apply_message(&p.next, &p.files, add, p.close.clone()));
            let listeners: Vec<_> = p
                .opened
                .iter()
                .filter_map(|(_, l)| l.try_clone().ok())
                .collect();
            let (asker, events, id) = (w.asker.clone(), self.events.clone(), p.id);
            tokio::spawn(async move {
                use std::os::fd::AsFd as _;
                let fds: Vec<_> = listeners.iter().map(|l| l.as_fd()).collect();
                let result = asker
                    .ask(msg, &fds, APPLY_TIMEOUT)
                    .await
                    .and_then(applied_answer);
                let _ = events.send(Event::Applied { change: id, result });
            });
            self.pending = Some(pending);
        }
    }

    /// The worker's answer to the change in flight.
    pub(super) fn applied(&mut self, id: u64, result: anyhow::Result<()>) {
        let Some(pending) = self.pending.take_if(|p| p.prepared.id == id) else {
            return;
        };
        match result {
            Ok(()) => self.commit(pending),
            Err(e) => self.finish(pending.change, Err(e)),
        }
        self.next_queued();
    }

    /// Everything checked, nothing changed yet: the next configuration, its files, its
    /// listeners.
    fn prepare(&mut self, kind: &Kind) -> anyhow::Result<Prepared> {
        let (next, files, warnings) = self.prepare_kind(kind)?;
        for w in warnings {
            warn!("{w}");
        }
        let (opened, close) = self.listener_changes(&next)?;
        let summary = summary(&self.config, &next);
        let id = self.next_change;
        self.next_change += 1;
        Ok(Prepared {
            id,
            next,
            files,
            opened,
            close,
            summary,
        })
    }

    fn prepare_kind(&self, kind: &Kind) -> anyhow::Result<(Config, Files, Vec<String>)> {
        let mut next = self.config.clone();
        let source = match kind {
            Kind::Reload => {
                let source = Source::read(&self.config_path)?;
                let file = source.parse()?;
                if file.datapath.as_ref().map(|d| (&d.interfaces, &d.pin_path))
                    != self
                        .config
                        .datapath
                        .as_ref()
                        .map(|d| (&d.interfaces, &d.pin_path))
                {
                    warn!("reload: [datapath] changes take effect at the next start");
                }
                next.relay = file.relay;
                next.services = file.services;
                Some(source)
            }
            Kind::Add(service) => {
                next.services.push(Service::clone(service));
                None
            }
            Kind::Remove(name) => {
                let before = next.services.len();
                next.services.retain(|s| s.name != *name);
                if next.services.len() == before {
                    bail!("no service named {name:?}");
                }
                None
            }
            Kind::Files(_) => None,
        };
        next.check().map_err(anyhow::Error::msg)?;
        if self.datapath.is_none() && next.services.iter().any(|s| s.listen.is_none()) {
            bail!("services without `listen` need the data path: add [datapath] and restart");
        }
        let checked = service::check(next, source.as_ref())?;
        Ok((checked.config, checked.files, checked.warnings))
    }

    /// The listeners `next` needs that are not open yet (bound now), and the ones it no
    /// longer needs.
    #[allow(clippy::type_complexity)]
    fn listener_changes(
        &self,
        next: &Config,
    ) -> anyhow::Result<(Vec<(Role, std::net::TcpListener)>, Vec<Role>)> {
        let old: HashMap<&str, &Service> = self
            .config
            .services
            .iter()
            .map(|s| (s.name.as_str(), s))
            .collect();
        let mut opened = Vec::new();
        let mut close = Vec::new();
        for s in &next.services {
            let role = Role::Service(s.name.clone());
            let same_listener = old
                .get(s.name.as_str())
                .is_some_and(|o| o.listen == s.listen);
            if let Some(addr) = s.listen
                && !same_listener
            {
                let l =
                    bind(addr).with_context(|| format!("service {}: listen on {addr}", s.name))?;
                opened.push((role.clone(), l));
            }
            if !same_listener && self.listeners.contains_key(&role) {
                close.push(role);
            }
        }
        for name in old.keys() {
            let role = Role::Service(name.to_string());
            if !next.services.iter().any(|s| s.name == *name) && self.listeners.contains_key(&role)
            {
                close.push(role);
            }
        }
        Ok((opened, close))
    }

    /// The worker took it (or there is none to tell): data path, listeners, configuration.
    fn commit(&mut self, pending: Pending) {
        let Pending {
            change,
            prepared: p,
        } = pending;
        if let Some(d) = &mut self.datapath
            && let Err(e) = d.maps.sync(&p.next.services)
        {
            // The worker serves the new services; the maps still say the old ones.
            let e = e.context("sync the policy maps");
            error!("{e:#}");
            return self.finish(change, Err(e));
        }
        for role in &p.close {
            self.listeners.remove(role);
        }
        self.listeners.extend(p.opened);
        for s in p
            .next
            .services
            .iter()
            .filter(|s| p.summary.added.contains(&s.name))
        {
            log_service(s);
        }
        self.config = p.next;
        self.files = p.files;
        self.watch_files();
        self.finish(change, Ok(p.summary));
    }

    /// Tells whoever asked for `change` how it went.
    fn finish(&mut self, change: Change, result: anyhow::Result<ChangeSummary>) {
        match (&change.kind, &result) {
            (Kind::Files(paths), _) => {
                let files = paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                match &result {
                    Ok(_) => {
                        self.file_reloads.0 += 1;
                        info!(%files, "changed CRL applied: new connections and resumptions use it");
                    }
                    Err(e) => {
                        self.file_reloads.1 += 1;
                        error!(%files, "changed CRL NOT applied, the previous one stays in force: {e:#}");
                    }
                }
            }
            (Kind::Reload, Ok(s)) if change.reply.is_none() => {
                info!("SIGHUP: configuration reloaded: {s}");
            }
            (Kind::Reload, Err(e)) if change.reply.is_none() => {
                error!("SIGHUP: reload refused, previous configuration kept: {e:#}");
            }
            _ => {}
        }
        if let Some(reply) = change.reply {
            let _ = reply.send(match result {
                Ok(summary) => Response::ok(&summary),
                Err(e) => Response::error(format!("{e:#}")),
            });
        }
    }

    /// The Apply message for `config`, with the bytes of every file it reads.
    pub(super) fn apply_message(
        &self,
        config: &Config,
        files: &Files,
        add: Vec<Role>,
        close: Vec<Role>,
    ) -> Apply {
        Apply {
            relay: config.relay.clone(),
            services: config.services.clone(),
            files: files.clone(),
            tickets: self.tickets.keys().to_vec(),
            add,
            close,
        }
    }
}

/// The worker's answer to `Apply`.
pub fn applied_answer(answer: FromWorker) -> anyhow::Result<()> {
    match answer {
        FromWorker::Applied { error: None } => Ok(()),
        FromWorker::Applied { error: Some(e) } => bail!("worker refused the configuration: {e}"),
        other => bail!("unexpected answer from the worker: {other:?}"),
    }
}

fn summary(old: &Config, new: &Config) -> ChangeSummary {
    let had = |c: &Config, n: &str| c.services.iter().any(|s| s.name == n);
    ChangeSummary {
        services: new.services.len(),
        added: new
            .services
            .iter()
            .filter(|s| !had(old, &s.name))
            .map(|s| s.name.clone())
            .collect(),
        removed: old
            .services
            .iter()
            .filter(|s| !had(new, &s.name))
            .map(|s| s.name.clone())
            .collect(),
    }
}
