//! Changes to the running configuration: a reload (SIGHUP, `relay reload`), `relay service
//! add|remove`, a watched file (certificate, key, CA, CRL) replaced on disk, a new ACME
//! certificate.
//!
//! One at a time, in the order they came. Each is checked in full before anything moves (the
//! next configuration parsed, its files read once and compiled: `service::check`), its new
//! listeners bound, and then sent to the worker; the loop goes on meanwhile, and the worker's
//! answer comes back as an event. Only when the worker took it does the supervisor commit:
//! data path maps, listeners, the configuration and its files. An invalid change, or one the
//! worker refuses, is answered with its error and leaves everything as it was; one the worker
//! does not answer in time also restarts the worker, which then starts with what the
//! supervisor holds. With no worker running, a valid change is committed at once: the next
//! worker starts with it.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, bail};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::{APPLY_TIMEOUT, Event, Supervisor, Worker, bind, log_service};
use crate::{
    config::{Config, Service, Source},
    control::{ChangeSummary, Response},
    handoff::{Apply, Asker, FromWorker, Role, ToWorker},
    service,
    tls::Files,
};

/// What came of a change sent to the worker.
pub enum Answer {
    Taken,
    /// The worker kept its previous services.
    Refused(anyhow::Error),
    /// No answer in time, or the channel failed: the worker's state is unknown.
    Missing(anyhow::Error),
}

/// A change asked for, and who is waiting for its answer.
pub struct Change {
    kind: Kind,
    reply: Option<oneshot::Sender<Response>>,
}

#[derive(Clone)]
enum Kind {
    Reload,
    Add(Box<Service>),
    Remove(String),
    /// Watched files changed: the configuration in force, with its files read again.
    Files(Vec<PathBuf>),
    /// A service entry from the cluster: added, or in place of the one of its name that came
    /// from the cluster before (decided when the change is taken: see `check`).
    ClusterPut {
        service: Box<Service>,
        key: String,
        revision: i64,
    },
    /// A service the cluster no longer has.
    ClusterRemove {
        name: String,
        key: String,
        revision: i64,
    },
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

    pub fn cluster_put(service: Service, key: String, revision: i64) -> Change {
        Change {
            kind: Kind::ClusterPut {
                service: Box::new(service),
                key,
                revision,
            },
            reply: None,
        }
    }

    /// The service a change from the cluster is about.
    pub fn cluster_name(&self) -> Option<&str> {
        match &self.kind {
            Kind::ClusterPut { service, .. } => Some(&service.name),
            Kind::ClusterRemove { name, .. } => Some(name),
            _ => None,
        }
    }

    pub fn cluster_remove(name: String, key: String, revision: i64) -> Change {
        Change {
            kind: Kind::ClusterRemove {
                name,
                key,
                revision,
            },
            reply: None,
        }
    }
}

/// The change in flight.
pub enum Pending {
    /// Its files being read and compiled, off the loop.
    Checking { id: u64, change: Change },
    /// Checked, and sent to the worker: waiting for its answer.
    Sent {
        change: Change,
        prepared: Box<Prepared>,
    },
}

/// A change's next configuration, with the bytes of its files and what they warn of.
pub type CheckResult = anyhow::Result<Box<Next>>;

/// A checked change.
pub struct Next {
    checked: service::Checked,
    /// Services from the cluster that a reloaded file now defines itself (the file's win).
    shadowed: Vec<String>,
}

/// Everything a change needs, checked.
pub struct Prepared {
    id: u64,
    next: Config,
    files: Files,
    directory: Option<crate::directory::Settings>,
    /// Listeners bound for it, handed to the worker with it.
    opened: Vec<(Role, std::net::TcpListener)>,
    close: Vec<Role>,
    summary: ChangeSummary,
    shadowed: Vec<String>,
}

impl Supervisor {
    /// Takes a change in: now, or after the ones before it.
    pub(super) fn change(&mut self, change: Change) {
        self.queue.push_back(change);
        self.next_queued();
    }

    /// Starts the next waiting change, unless one is in flight or a worker is starting (it
    /// gets the configuration in force first). Its files are read and compiled in a blocking
    /// task, whose result comes back as [`Event::Checked`].
    pub(super) fn next_queued(&mut self) {
        if self.pending.is_some() || matches!(self.worker, Worker::Starting(_)) {
            return;
        }
        let Some(change) = self.queue.pop_front() else {
            return;
        };
        let id = self.next_change;
        self.next_change += 1;
        let current = self.config.clone();
        let path = self.config_path.clone();
        let has_datapath = self.datapath.is_some();
        let kind = change.kind.clone();
        let events = self.events.clone();
        let keep = self.cluster_services();
        tokio::task::spawn_blocking(move || {
            let result = check(current, &path, has_datapath, &kind, keep);
            let _ = events.send(Event::Checked { change: id, result });
        });
        self.pending = Some(Pending::Checking { id, change });
    }

    /// The change in flight is checked: refused, committed (no worker to tell), or sent to
    /// the worker.
    pub(super) fn checked(&mut self, id: u64, result: CheckResult) {
        let Some(Pending::Checking { change, .. }) = self
            .pending
            .take_if(|p| matches!(p, Pending::Checking { id: i, .. } if *i == id))
        else {
            return;
        };
        match result.and_then(|checked| self.prepare(id, checked)) {
            Err(e) => self.finish(change, Err(e)),
            Ok(prepared) => self.send(change, prepared),
        }
        self.next_queued();
    }

    fn send(&mut self, change: Change, prepared: Prepared) {
        // A worker started while this change was checked gets it after its first
        // configuration: the channel keeps the order.
        let (Worker::Running(w) | Worker::Starting(w)) = &self.worker else {
            return self.commit(change, prepared);
        };
        let p = &prepared;
        let add = p.opened.iter().map(|(r, _)| r.clone()).collect();
        let msg = ToWorker::Apply(self.apply_message(
            &p.next,
            &p.files,
            &p.directory,
            add,
            p.close.clone(),
        ));
        let listeners = match p
            .opened
            .iter()
            .map(|(_, l)| l.try_clone())
            .collect::<std::io::Result<Vec<_>>>()
        {
            Ok(l) => l,
            Err(e) => {
                let e = anyhow::Error::from(e).context("duplicate a listener for the worker");
                return self.finish(change, Err(e));
            }
        };
        let (id, pid) = (p.id, w.pid);
        self.apply_in_task(&w.asker, msg, listeners, move |answer| Event::Applied {
            change: id,
            pid,
            answer: match answer {
                Ok(answer) => match applied_answer(answer) {
                    Ok(()) => Answer::Taken,
                    Err(e) => Answer::Refused(e),
                },
                Err(e) => Answer::Missing(e),
            },
        });
        self.pending = Some(Pending::Sent {
            change,
            prepared: Box::new(prepared),
        });
    }

    /// The worker's answer to the change in flight.
    pub(super) fn applied(&mut self, id: u64, pid: u32, answer: Answer) {
        let Some(Pending::Sent { change, prepared }) = self
            .pending
            .take_if(|p| matches!(p, Pending::Sent { prepared, .. } if prepared.id == id))
        else {
            return;
        };
        match answer {
            Answer::Taken => self.commit(change, *prepared),
            Answer::Refused(e) => self.finish(change, Err(e)),
            Answer::Missing(e) => {
                // It may have taken the change or not: only a new worker, started with the
                // configuration in force, is known to serve what the supervisor holds.
                error!("worker {pid} did not answer a change ({e:#}): restarting it");
                if matches!(&self.worker, Worker::Running(w) | Worker::Starting(w) if w.pid == pid)
                {
                    crate::sys::kill_now(pid);
                }
                let e = e.context("the worker was restarted with the configuration in force");
                self.finish(change, Err(e));
            }
        }
        self.next_queued();
    }

    /// Everything checked, nothing changed yet: the next configuration, its files, its
    /// listeners (bound now: the loop owns them).
    fn prepare(&mut self, id: u64, checked: Box<Next>) -> anyhow::Result<Prepared> {
        let Next { checked, shadowed } = *checked;
        let service::Checked {
            config: next,
            mut files,
            warnings,
            directory,
        } = checked;
        for w in warnings {
            warn!("{w}");
        }
        self.keep_acme_certificates(&next, &mut files);
        let (opened, close) = self.listener_changes(&next)?;
        let summary = summary(&self.config, &next);
        Ok(Prepared {
            id,
            next,
            files,
            directory,
            opened,
            close,
            summary,
            shadowed,
        })
    }

    /// An ACME certificate in force whose stored file went away or went bad keeps serving
    /// from memory (a file certificate would refuse the change instead; an ACME service has
    /// no one to fix its file but its task), and its task orders a new one now.
    fn keep_acme_certificates(&self, next: &Config, files: &mut Files) {
        for s in next.services.iter().filter(|s| s.inbound.is_acme()) {
            let key = crate::tls::material::acme_file(&s.name);
            if files.contains_key(&key) {
                continue;
            }
            let Some(bytes) = self.files.get(&key) else {
                continue;
            };
            warn!(service = %s.name, "the stored ACME certificate is gone or unusable: the one in force keeps serving, a new one is ordered");
            files.insert(key, bytes.clone());
            if let Some(acme) = &self.acme {
                acme.look_again(&s.name);
            }
        }
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
    fn commit(&mut self, change: Change, p: Prepared) {
        if let Some(d) = &mut self.datapath
            && let Err(e) = d.maps.sync(&p.next.services, &p.next.servers)
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
        self.directory = p.directory;
        self.watch_files();
        self.acme_sync();
        self.ipsec_sync();
        self.cluster_forget(&p.shadowed);
        self.finish(change, Ok(p.summary));
    }

    /// Tells whoever asked for `change` how it went.
    fn finish(&mut self, change: Change, result: anyhow::Result<ChangeSummary>) {
        match (&change.kind, &result) {
            (
                Kind::ClusterPut {
                    service,
                    key,
                    revision,
                    ..
                },
                r,
            ) => {
                let error = r.as_ref().err().map(|e| format!("{e:#}"));
                self.cluster_finished(&service.name, key, *revision, Some(service), error);
            }
            (
                Kind::ClusterRemove {
                    name,
                    key,
                    revision,
                },
                r,
            ) => {
                let error = r.as_ref().err().map(|e| format!("{e:#}"));
                self.cluster_finished(name, key, *revision, None, error);
            }
            (Kind::Files(paths), _) => {
                let files = paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                match &result {
                    Ok(_) => {
                        self.file_reloads.0 += 1;
                        info!(%files, "changed files applied: new connections and resumptions use them");
                    }
                    Err(e) => {
                        self.file_reloads.1 += 1;
                        error!(%files, "changed files NOT applied, the previous ones stay in force: {e:#}");
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

    /// Sends `msg` with `listeners` to the worker in a task; its answer (or why there is none)
    /// comes back to the loop as the event `then` makes of it.
    pub(super) fn apply_in_task(
        &self,
        asker: &Arc<Asker>,
        msg: ToWorker,
        listeners: Vec<std::net::TcpListener>,
        then: impl FnOnce(anyhow::Result<FromWorker>) -> Event + Send + 'static,
    ) {
        let (asker, events) = (Arc::clone(asker), self.events.clone());
        tokio::spawn(async move {
            use std::os::fd::AsFd as _;
            let fds: Vec<_> = listeners.iter().map(|l| l.as_fd()).collect();
            let answer = asker.ask(msg, &fds, APPLY_TIMEOUT).await;
            let _ = events.send(then(answer));
        });
    }

    /// The Apply message for `config`, with the bytes of every file it reads.
    pub(super) fn apply_message(
        &self,
        config: &Config,
        files: &Files,
        directory: &Option<crate::directory::Settings>,
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
            directory: directory.clone(),
        }
    }
}

/// The configuration `kind` makes of `current`, its files read once and compiled: blocking
/// work, done off the loop. `keep` are the services from the cluster, which a reload of the
/// file keeps.
fn check(
    current: Config,
    config_path: &Path,
    has_datapath: bool,
    kind: &Kind,
    keep: Vec<Service>,
) -> CheckResult {
    let mut next = current;
    let mut shadowed = Vec::new();
    let source = match kind {
        Kind::Reload => {
            let source = Source::read(config_path)?;
            let file = source.parse()?;
            if file.datapath.as_ref().map(|d| (&d.interfaces, &d.pin_path))
                != next.datapath.as_ref().map(|d| (&d.interfaces, &d.pin_path))
            {
                warn!("reload: [datapath] changes take effect at the next start");
            }
            if file.cluster.as_ref().map(|c| (&c.etcd, &c.prefix, &c.name))
                != next.cluster.as_ref().map(|c| (&c.etcd, &c.prefix, &c.name))
            {
                warn!("reload: [cluster] changes take effect at the next start");
            }
            if file.acme != next.acme {
                warn!("reload: [acme] changes take effect at the next start");
            }
            // The IPsec task starts with the first [ipsec]; a changed one waits for a start.
            if next.ipsec.is_none() {
                next.ipsec = file.ipsec;
            } else if file.ipsec != next.ipsec {
                warn!("reload: [ipsec] changes take effect at the next start");
            }
            next.servers = file.servers;
            next.relay = file.relay;
            next.directory = file.directory;
            next.services = file.services;
            for s in keep {
                if next.services.iter().any(|f| f.name == s.name) {
                    warn!(service = %s.name, "reload: the file's service replaces the cluster's of the same name");
                    shadowed.push(s.name);
                } else {
                    next.services.push(s);
                }
            }
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
        Kind::ClusterPut { service, .. } => {
            let service = Service::clone(service);
            let owned = keep.iter().any(|k| k.name == service.name);
            match next.services.iter_mut().find(|s| s.name == service.name) {
                Some(slot) if owned => *slot = service,
                // A service of the file or added here of that name: refused as a duplicate.
                _ => next.services.push(service),
            }
            None
        }
        Kind::ClusterRemove { name, .. } => {
            // Only what the cluster owns: never a service of the file of the same name.
            if keep.iter().any(|k| k.name == *name) {
                next.services.retain(|s| s.name != *name);
            }
            None
        }
    };
    next.check().map_err(anyhow::Error::msg)?;
    if !has_datapath && next.services.iter().any(|s| s.listen.is_none()) {
        bail!("services without `listen` need the data path: add [datapath] and restart");
    }
    Ok(Box::new(Next {
        checked: service::check(next, source.as_ref())?,
        shadowed,
    }))
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

/// Checks `service` as the cluster would apply it on this gateway, applying nothing: `relay
/// service add --cluster` refuses what the gateways would refuse, before it is written.
/// `owned`: the services this gateway has from the cluster.
pub(super) fn check_cluster_put(
    current: Config,
    config_path: &Path,
    has_datapath: bool,
    service: Service,
    owned: Vec<Service>,
) -> anyhow::Result<()> {
    let kind = Kind::ClusterPut {
        service: Box::new(service),
        key: String::new(),
        revision: 0,
    };
    check(current, config_path, has_datapath, &kind, owned).map(drop)
}
