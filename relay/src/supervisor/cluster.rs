//! The supervisor's side of the cluster: it starts the etcd task, turns what the task reports
//! into changes (the same checked path as `relay service add|remove`), hands the cluster's
//! ticket keys to the worker, keeps the local cache and this gateway's member state, and
//! serves the control requests that read or write the cluster.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use super::{Supervisor, Worker, changes::Change};
use crate::{
    cluster::{
        ClusterStatus, Command, Entry, Member, Update,
        cache::{self, Cached},
        etcd,
        sealed::{Kek, TicketsDoc},
        services_prefix, tickets_key,
    },
    config::Service,
    control::{ClusterInfo, ClusterWrite, Response},
};

/// The link to the cluster task and what this gateway applied from the cluster.
pub struct Link {
    name: String,
    commands: mpsc::Sender<Command>,
    pub connected: bool,
    pub leader: bool,
    /// The etcd revision of the service set applied.
    pub revision: i64,
    pub applied: u64,
    pub refused: u64,
    /// The services that came from the cluster, as applied, and their keys' revisions.
    services: BTreeMap<String, Service>,
    revisions: BTreeMap<String, i64>,
    /// Entries refused, by name, with the revision refused (not retried until it changes, or
    /// the next full sync).
    refused_at: HashMap<String, i64>,
    /// Cluster changes queued and not finished yet, by service name.
    queued: HashMap<String, usize>,
    sealed_tickets: Option<Vec<u8>>,
    /// When the ticket keys in force were drawn (seconds since the epoch).
    tickets_rotated_at: Option<u64>,
    cache: watch::Sender<Cached>,
    /// The member state last sent.
    member: Option<Member>,
}

/// The cached cluster state, and its ticket keys opened.
pub type FromCache = Option<(Cached, Option<TicketsDoc>)>;

/// Starts the cluster task for `[cluster]`; returns the link, where the task's updates arrive,
/// and the cached state to start from.
pub fn start(
    c: &crate::config::Cluster,
    ticket_rotation: Duration,
) -> anyhow::Result<(Link, mpsc::UnboundedReceiver<Update>, FromCache)> {
    let kek = Arc::new(Kek::read(&c.key_encryption_key)?);
    let cached = match cache::load(&c.cache) {
        Ok(cached) => cached,
        Err(e) => {
            warn!("{e:#}: starting without it");
            None
        }
    };
    let tickets = cached
        .as_ref()
        .and_then(|k| k.tickets.as_deref())
        .and_then(unhex)
        .and_then(|sealed| kek.open(&sealed).ok());
    let (updates_tx, updates) = mpsc::unbounded_channel();
    let (commands, commands_rx) = mpsc::channel(64);
    let settings = etcd::Settings {
        cluster: c.clone(),
        ticket_rotation,
        kek,
        tickets: tickets.clone(),
        pem_dir: cache::pem_dir(&c.cache),
    };
    tokio::spawn(etcd::run(settings, updates_tx, commands_rx));
    let link = Link {
        name: c.name.clone(),
        commands,
        connected: false,
        leader: false,
        revision: 0,
        applied: 0,
        refused: 0,
        services: BTreeMap::new(),
        revisions: BTreeMap::new(),
        refused_at: HashMap::new(),
        queued: HashMap::new(),
        sealed_tickets: None,
        tickets_rotated_at: None,
        cache: cache::writer(c.cache.clone()),
        member: None,
    };
    Ok((link, updates, cached.map(|k| (k, tickets))))
}

impl Supervisor {
    /// The cached cluster state, applied before etcd answers: its services as changes (each
    /// checked), its ticket keys at once.
    pub(super) fn start_from_cache(&mut self, cached: Cached, tickets: Option<TicketsDoc>) {
        let prefix = services_prefix(&self.cluster_prefix());
        let Some(link) = &mut self.cluster else {
            return;
        };
        info!(
            revision = cached.revision,
            services = cached.services.len(),
            tickets = tickets.is_some(),
            "cluster: starting from the local cache of the last cluster state, until etcd answers"
        );
        link.revision = cached.revision;
        link.sealed_tickets = cached.tickets.as_deref().and_then(unhex);
        if let Some(doc) = tickets {
            link.tickets_rotated_at = Some(doc.rotated_at);
            self.tickets.replace(doc.keys);
        }
        let mut changes = Vec::new();
        for (name, service) in cached.services {
            let key = format!("{prefix}{name}");
            let revision = cached
                .revisions
                .get(&name)
                .copied()
                .unwrap_or(cached.revision);
            *link.queued.entry(name.clone()).or_default() += 1;
            changes.push(Change::cluster_put(service, key, revision));
        }
        for c in changes {
            self.change(c);
        }
    }

    pub(super) fn cluster_update(&mut self, update: Update) {
        let Some(link) = &mut self.cluster else {
            return;
        };
        match update {
            Update::Connected(up) => {
                if link.connected && !up {
                    error!("cluster: lost etcd: serving the last state applied (fail static)");
                }
                link.connected = up;
                if up {
                    link.member = None;
                    self.publish_member();
                }
            }
            Update::Leader(leader) => link.leader = leader,
            Update::Tickets {
                keys,
                sealed,
                rotated_at,
            } => {
                let ids: Vec<String> = keys.iter().map(|k| format!("{:08x}", k.id)).collect();
                info!(keys = ?ids, "cluster: session ticket keys from the cluster");
                link.sealed_tickets = Some(sealed);
                link.tickets_rotated_at = Some(rotated_at);
                self.tickets.replace(keys);
                self.send_tickets();
                self.write_cache();
            }
            Update::Services {
                revision,
                full,
                entries,
            } => self.cluster_services_changed(revision, full, entries),
        }
    }

    /// Queues a change for each entry that differs from what is applied (or about to be:
    /// changes queued before this one are taken first, in order). Whether a put replaces a
    /// service, and whether a removal has one to remove, is decided when the change is taken,
    /// against what the cluster then owns.
    fn cluster_services_changed(&mut self, revision: i64, full: bool, entries: Vec<Entry>) {
        let prefix = services_prefix(&self.cluster_prefix());
        let Some(link) = &mut self.cluster else {
            return;
        };
        let mut changes = Vec::new();
        if full {
            let known: std::collections::BTreeSet<&String> =
                link.services.keys().chain(link.queued.keys()).collect();
            for name in known {
                if !entries.iter().any(|e| e.name == *name) {
                    let key = format!("{prefix}{name}");
                    changes.push(Change::cluster_remove(name.clone(), key, revision));
                }
            }
        }
        for e in entries {
            let queued = link.queued.contains_key(&e.name);
            match e.value {
                None => {
                    link.refused_at.remove(&e.name);
                    if link.services.contains_key(&e.name) || queued {
                        changes.push(Change::cluster_remove(e.name, e.key, e.revision));
                    }
                }
                Some(Err(why)) => {
                    if link.refused_at.get(&e.name) != Some(&e.revision) {
                        link.refused += 1;
                        link.refused_at.insert(e.name.clone(), e.revision);
                        error!(key = %e.key, revision = e.revision,
                               "cluster: service entry refused, the rest keeps running: {why}");
                    }
                }
                Some(Ok(service)) => {
                    let same = !queued && link.services.get(&e.name) == Some(&service);
                    // A full sync tries again what this gateway refused before: what it lacked
                    // (a file, an address) may be there now.
                    let refused_before = !full && link.refused_at.get(&e.name) == Some(&e.revision);
                    if same {
                        // Written again unchanged: nothing to apply, but its revision is the
                        // one every member compares.
                        link.revisions.insert(e.name, e.revision);
                    } else if !refused_before {
                        changes.push(Change::cluster_put(service, e.key, e.revision));
                    }
                }
            }
        }
        for c in &changes {
            if let Some(name) = c.cluster_name() {
                *link.queued.entry(name.to_string()).or_default() += 1;
            }
        }
        if changes.is_empty() {
            link.revision = link.revision.max(revision);
            self.publish_member();
            self.write_cache();
        }
        for c in changes {
            self.change(c);
        }
    }

    /// A cluster change went through (or not): counted, logged, remembered.
    pub(super) fn cluster_finished(
        &mut self,
        name: &str,
        key: &str,
        revision: i64,
        put: Option<&Service>,
        error: Option<String>,
    ) {
        let Some(link) = &mut self.cluster else {
            return;
        };
        if let Some(n) = link.queued.get_mut(name) {
            *n -= 1;
            if *n == 0 {
                link.queued.remove(name);
            }
        }
        match error {
            None => {
                link.applied += 1;
                link.refused_at.remove(name);
                match put {
                    Some(s) => {
                        info!(service = %name, %key, revision, "cluster: service applied");
                        link.services.insert(name.to_string(), s.clone());
                        link.revisions.insert(name.to_string(), revision);
                    }
                    None => {
                        info!(service = %name, %key, revision, "cluster: service removed");
                        link.services.remove(name);
                        link.revisions.remove(name);
                    }
                }
            }
            Some(e) => {
                link.refused += 1;
                link.refused_at.insert(name.to_string(), revision);
                error!(%key, revision, "cluster: service entry refused, the rest keeps running: {e}");
            }
        }
        link.revision = link.revision.max(revision);
        self.publish_member();
        self.write_cache();
    }

    /// After a reload: services the file now defines under a cluster service's name are the
    /// file's (it wins); the cluster no longer replaces or removes them.
    pub(super) fn cluster_forget(&mut self, shadowed: &[String]) {
        let Some(link) = &mut self.cluster else {
            return;
        };
        if shadowed.is_empty() {
            return;
        }
        for name in shadowed {
            link.services.remove(name);
            link.revisions.remove(name);
        }
        self.publish_member();
        self.write_cache();
    }

    /// Whether `name` came from the cluster (removed with `--cluster`, not here).
    pub(super) fn is_cluster_service(&self, name: &str) -> bool {
        self.cluster
            .as_ref()
            .is_some_and(|l| l.services.contains_key(name))
    }

    /// The services from the cluster, which a reload of the file keeps.
    pub(super) fn cluster_services(&self) -> Vec<Service> {
        self.cluster
            .as_ref()
            .map(|l| l.services.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Tells the cluster task this gateway's state for its member key, when it changed.
    pub(super) fn publish_member(&mut self) {
        let health = match &self.worker {
            Worker::Running(_) => "serving",
            Worker::Starting(_) => "worker starting",
            Worker::Down { .. } => "worker down",
        };
        let services = self.config.services.len();
        let Some(link) = &mut self.cluster else {
            return;
        };
        let member = Member {
            name: link.name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            revision: link.revision,
            digest: crate::cluster::digest(link.revisions.iter()),
            services,
            health: health.into(),
            leader: link.leader,
        };
        if link.member.as_ref() == Some(&member) {
            return;
        }
        if link
            .commands
            .try_send(Command::Member(member.clone()))
            .is_ok()
        {
            link.member = Some(member);
        }
    }

    fn write_cache(&mut self) {
        let Some(link) = &self.cluster else {
            return;
        };
        let cached = Cached {
            revision: link.revision,
            services: link.services.clone(),
            revisions: link.revisions.clone(),
            tickets: link.sealed_tickets.as_deref().map(hex),
        };
        link.cache.send_if_modified(|c| {
            let changed = *c != cached;
            *c = cached;
            changed
        });
    }

    pub(super) fn cluster_info(&self) -> Option<ClusterInfo> {
        self.cluster.as_ref().map(|l| ClusterInfo {
            name: l.name.clone(),
            connected: l.connected,
            leader: l.leader,
            revision: l.revision,
            applied: l.applied,
            refused: l.refused,
            services: l.services.keys().cloned().collect(),
            digest: crate::cluster::digest(l.revisions.iter()),
            tickets_age_s: l
                .tickets_rotated_at
                .map(|t| crate::cluster::sealed::now_s().saturating_sub(t)),
        })
    }

    // ------------------------------------------------------------------ control requests

    /// `relay service add --cluster`: checked here as every gateway will check it, then
    /// written to etcd; it applies here, as everywhere, from the watch.
    pub(super) fn cluster_add(&mut self, service: Service, reply: oneshot::Sender<Response>) {
        let Some(link) = &self.cluster else {
            let _ = reply.send(Response::error("--cluster needs a [cluster] section"));
            return;
        };
        let (current, path) = (self.config.clone(), self.config_path.clone());
        let has_datapath = self.datapath.is_some();
        let owned = self.cluster_services();
        let commands = link.commands.clone();
        let (material, pem_dir) = self
            .config
            .cluster
            .as_ref()
            .map(|c| (c.material.clone(), cache::pem_dir(&c.cache)))
            .unwrap_or_default();
        let key = format!(
            "{}{}",
            services_prefix(&self.cluster_prefix()),
            service.name
        );
        tokio::spawn(async move {
            let checked = {
                let service = service.clone();
                tokio::task::spawn_blocking(move || {
                    crate::cluster::check_paths(&service, &material, &pem_dir)
                        .map_err(anyhow::Error::msg)?;
                    super::changes::check_cluster_put(current, &path, has_datapath, service, owned)
                })
                .await
                .context("check")
                .and_then(|r| r)
            };
            let result = match checked {
                Err(e) => Err(e.context("not written to the cluster")),
                Ok(()) => {
                    let (tx, rx) = oneshot::channel();
                    let put = Command::Put {
                        service: Box::new(service),
                        reply: tx,
                    };
                    ask(&commands, put, rx).await
                }
            };
            let _ = reply.send(written(key, result));
        });
    }

    pub(super) fn cluster_remove(&mut self, name: String, reply: oneshot::Sender<Response>) {
        let Some(link) = &self.cluster else {
            let _ = reply.send(Response::error("--cluster needs a [cluster] section"));
            return;
        };
        let commands = link.commands.clone();
        let key = format!("{}{name}", services_prefix(&self.cluster_prefix()));
        tokio::spawn(async move {
            let (tx, rx) = oneshot::channel();
            let result = ask(&commands, Command::Delete { name, reply: tx }, rx).await;
            let _ = reply.send(written(key, result));
        });
    }

    /// New ticket keys now: through the cluster (every gateway takes them from its watch), or
    /// this gateway's own.
    pub(super) fn rotate_now(&mut self, reply: oneshot::Sender<Response>) {
        let Some(link) = &self.cluster else {
            self.rotate_tickets();
            let _ = reply.send(Response::ok(&ClusterWrite {
                key: String::new(),
                revision: 0,
            }));
            return;
        };
        let commands = link.commands.clone();
        let key = tickets_key(&self.cluster_prefix());
        tokio::spawn(async move {
            let (tx, rx) = oneshot::channel();
            let result = ask(&commands, Command::Rotate { reply: tx }, rx).await;
            let _ = reply.send(written(key, result));
        });
    }

    pub(super) fn cluster_status(&mut self, reply: oneshot::Sender<Response>) {
        let Some(info) = self.cluster_info() else {
            let _ = reply.send(Response::error("this relay has no [cluster] section"));
            return;
        };
        let commands = self.cluster.as_ref().map(|l| l.commands.clone());
        tokio::spawn(async move {
            let (tx, rx) = oneshot::channel();
            let asked = match commands {
                Some(c) => ask(&c, Command::Status { reply: tx }, rx).await,
                None => Err(anyhow::anyhow!("no cluster task")),
            };
            let mut status = ClusterStatus {
                name: info.name,
                connected: info.connected,
                revision: info.revision,
                leader: None,
                members: Vec::new(),
                agree: false,
                error: None,
            };
            match asked {
                Ok((members, leader)) => {
                    status.agree = !members.is_empty()
                        && members
                            .iter()
                            .all(|m: &Member| m.digest == members[0].digest);
                    status.members = members;
                    status.leader = leader;
                }
                Err(e) => status.error = Some(format!("{e:#}")),
            }
            let _ = reply.send(Response::ok(&status));
        });
    }

    /// Leaves the cluster at shutdown: the lease is revoked, so the member key and the
    /// leadership go at once.
    pub(super) async fn leave_cluster(&mut self) {
        let Some(link) = &self.cluster else {
            return;
        };
        let (done, left) = oneshot::channel();
        if link.commands.send(Command::Stop { done }).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(3), left).await;
        }
    }

    fn cluster_prefix(&self) -> String {
        self.config
            .cluster
            .as_ref()
            .map(|c| c.prefix.clone())
            .unwrap_or_default()
    }
}

/// Sends `command` to the cluster task and waits for its answer.
async fn ask<T>(
    commands: &mpsc::Sender<Command>,
    command: Command,
    answer: oneshot::Receiver<anyhow::Result<T>>,
) -> anyhow::Result<T> {
    commands
        .send(command)
        .await
        .map_err(|_| anyhow::anyhow!("the cluster task has ended"))?;
    match tokio::time::timeout(Duration::from_secs(15), answer).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => anyhow::bail!("the cluster task has ended"),
        Err(_) => anyhow::bail!("no answer from etcd in time"),
    }
}

fn written(key: String, result: anyhow::Result<i64>) -> Response {
    match result {
        Ok(revision) => Response::ok(&ClusterWrite { key, revision }),
        Err(e) => Response::error(format!("{e:#}")),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len() / 2)
        .map(|i| u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}
