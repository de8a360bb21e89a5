//! The cluster task: one connection to etcd at a time ("session"), and between sessions a
//! backoff during which this gateway serves what it last applied.
//!
//! A session:
//! 1. grants a lease (`[cluster] lease_ttl`) and keeps it alive from a task of its own (so no
//!    slow request delays a renewal); the member key and the leadership are bound to it, so
//!    both end when this gateway stops answering;
//! 2. reads everything under the prefix at one revision (a full sync, which the supervisor
//!    compares with what it applied), then watches from the next revision: no change is
//!    missed, whatever happened while this gateway was away (etcd compacted, restored from a
//!    backup, the gateway restarted). A watch that etcd cancels because it fell behind a
//!    compaction is answered by another full sync;
//! 3. campaigns for leadership; the leader draws new ticket keys every `ticket_rotation`;
//! 4. answers the supervisor's commands (writes, status, rotate now, stop).
//!
//! Any error ends the session (the lease is revoked if etcd still answers, so leadership moves
//! at once); the next one starts after a backoff.

use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KeyValue, PutOptions, TlsOptions, Txn, TxnOp, WatchOptions, WatchStream,
};
use tokio::{
    sync::{mpsc, oneshot},
    time::{Instant, sleep_until, timeout},
};
use tracing::{debug, info, warn};

use super::{
    Command, Entry, Member, Update, election, members_prefix, parse_service, sealed::Kek,
    sealed::TicketsDoc, services_prefix, tickets_key,
};
use crate::config;

/// Longest wait for one etcd request.
const RPC_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// After a failed rotation (etcd refused, another gateway's keys it cannot open), the leader
/// tries again this much later.
const ROTATION_RETRY: Duration = Duration::from_secs(5);

/// What the task needs to know.
pub struct Settings {
    pub cluster: config::Cluster,
    pub ticket_rotation: Duration,
    pub kek: Arc<Kek>,
    /// The ticket keys it starts with (its cache's).
    pub tickets: Option<TicketsDoc>,
    /// Where inline PEM from service entries is written.
    pub pem_dir: std::path::PathBuf,
}

/// What outlives a session.
struct State {
    /// The newest revision this gateway has seen of the keys it watches.
    revision: i64,
    member: Member,
    tickets: Option<TicketsDoc>,
}

/// Runs until the supervisor sends `Stop` or goes away.
pub async fn run(
    s: Settings,
    updates: mpsc::UnboundedSender<Update>,
    mut commands: mpsc::Receiver<Command>,
) {
    let mut state = State {
        revision: 0,
        member: Member {
            name: s.cluster.name.clone(),
            ..Member::default()
        },
        tickets: s.tickets.clone(),
    };
    let mut backoff = BACKOFF_FIRST;
    let mut reported = false;
    loop {
        let started = Instant::now();
        let end = Session::run(&s, &mut state, &updates, &mut commands).await;
        let e = match end {
            Ok(()) => return,
            Err(e) => e,
        };
        let _ = updates.send(Update::Connected(false));
        let _ = updates.send(Update::Leader(false));
        if started.elapsed() > Duration::from_secs(30) {
            backoff = BACKOFF_FIRST;
        }
        if !reported || started.elapsed() > Duration::from_secs(30) {
            warn!(
                "cluster: etcd unreachable ({e:#}); serving the last state applied (revision {}), \
                 ticket rotation paused, retrying",
                state.revision
            );
            reported = true;
        } else {
            debug!("cluster: still no etcd ({e:#}), next try in {backoff:?}");
        }
        let until = Instant::now() + backoff;
        loop {
            tokio::select! {
                () = sleep_until(until) => break,
                command = commands.recv() => match command {
                    None => return,
                    Some(Command::Stop { done }) => {
                        let _ = done.send(());
                        return;
                    }
                    Some(c) => offline(c, &mut state, &e),
                },
            }
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// A command while etcd is unreachable: writes are refused, this gateway's state is kept.
fn offline(command: Command, state: &mut State, why: &anyhow::Error) {
    let unreachable = || anyhow::anyhow!("etcd is unreachable: {why:#}");
    match command {
        Command::Member(m) => state.member = m,
        Command::Put { reply, .. } | Command::Delete { reply, .. } | Command::Rotate { reply } => {
            let _ = reply.send(Err(unreachable()));
        }
        Command::Status { reply } => {
            let _ = reply.send(Err(unreachable()));
        }
        Command::Stop { .. } => unreachable!("handled by the caller"),
    }
}

async fn rpc<T>(
    what: &str,
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> anyhow::Result<T> {
    match timeout(RPC_TIMEOUT, f).await {
        Ok(r) => r.with_context(|| what.to_string()),
        Err(_) => bail!("{what}: no answer within {RPC_TIMEOUT:?}"),
    }
}

async fn connect(c: &config::Cluster) -> anyhow::Result<Client> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        // HTTP/2 pings: a watch on a dead connection ends within seconds.
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true);
    if let Some(ca) = &c.ca {
        let read = |p: &std::path::Path| {
            std::fs::read(p).with_context(|| format!("[cluster] {}", p.display()))
        };
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let (Some(cert), Some(key)) = (&c.cert, &c.key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        options = options.with_tls(tls);
    }
    rpc("connect", Client::connect(&c.etcd, Some(options))).await
}

struct Session<'a> {
    s: &'a Settings,
    client: Client,
    lease: i64,
    updates: &'a mpsc::UnboundedSender<Update>,
    /// Set once this gateway won the election.
    leader: bool,
    next_rotation: Option<Instant>,
    /// The member value last written.
    written: Option<Member>,
}

impl Session<'_> {
    async fn run(
        s: &Settings,
        state: &mut State,
        updates: &mpsc::UnboundedSender<Update>,
        commands: &mut mpsc::Receiver<Command>,
    ) -> anyhow::Result<()> {
        let c = &s.cluster;
        let mut client = connect(c).await?;
        let ttl = c.lease_ttl.as_secs().max(2) as i64;
        let lease = rpc("grant a lease", client.lease_grant(ttl, None))
            .await?
            .id();
        let (keeper, kept) = rpc("keep the lease", client.lease_keep_alive(lease)).await?;
        let (lost_tx, mut lease_lost) = oneshot::channel();
        let renewals = AbortOnDrop(tokio::spawn(keep_alive(keeper, kept, c.lease_ttl, lost_tx)));
        let mut session = Session {
            s,
            client,
            lease,
            updates,
            leader: false,
            next_rotation: None,
            written: None,
        };
        let result = session.serve(state, commands, &mut lease_lost).await;
        drop(renewals);
        if result.is_err() {
            // Best effort: if etcd still answers, the leadership and the member key go now
            // rather than a lease TTL later.
            let _ = timeout(
                Duration::from_secs(1),
                session.client.lease_revoke(session.lease),
            )
            .await;
        }
        result
    }

    /// The session's loop; `Ok` when the supervisor is done with the cluster.
    async fn serve(
        &mut self,
        state: &mut State,
        commands: &mut mpsc::Receiver<Command>,
        lease_lost: &mut oneshot::Receiver<anyhow::Error>,
    ) -> anyhow::Result<()> {
        let c = &self.s.cluster;
        let mut watch = self.full_sync(state).await?;
        let _ = self.updates.send(Update::Connected(true));
        info!(
            endpoints = ?c.etcd, member = %c.name, revision = state.revision,
            "cluster: connected to etcd"
        );
        self.write_member(state).await?;
        let mut campaign = {
            let mut client = self.client.clone();
            let (name, value, lease) = (election(&c.prefix), c.name.clone(), self.lease);
            Box::pin(async move { client.campaign(name, value, lease).await })
        };
        loop {
            let rotation = self.next_rotation;
            tokio::select! {
                message = watch.message() => {
                    let Some(response) = message.context("watch")? else {
                        bail!("etcd ended the watch");
                    };
                    if response.canceled() {
                        if response.compact_revision() > 0 {
                            info!(
                                compacted = response.compact_revision(), have = state.revision,
                                "cluster: the watch fell behind a compaction: full resync"
                            );
                            watch = self.full_sync(state).await?;
                            continue;
                        }
                        bail!("etcd canceled the watch: {}", response.cancel_reason());
                    }
                    let changed: Vec<(EventType, KeyValue)> = response
                        .events()
                        .iter()
                        .filter_map(|e| Some((e.event_type(), e.kv()?.clone())))
                        .collect();
                    self.changes(state, changed, false);
                }
                lost = &mut *lease_lost => {
                    return Err(lost.unwrap_or_else(|_| anyhow::anyhow!("lease renewals ended")));
                }
                won = &mut campaign, if !self.leader => {
                    won.context("campaign for leadership")?;
                    self.leader = true;
                    self.schedule_rotation(state);
                    let _ = self.updates.send(Update::Leader(true));
                    info!(member = %c.name, "cluster: this gateway leads: it rotates the ticket keys");
                    self.write_member(state).await?;
                }
                () = sleep_until(rotation.unwrap_or_else(Instant::now)), if rotation.is_some() => {
                    match self.rotate(state).await {
                        Ok(revision) => info!(revision, "cluster: ticket keys rotated (leader)"),
                        Err(e) => {
                            warn!("cluster: ticket key rotation failed, retrying: {e:#}");
                            self.next_rotation = Some(Instant::now() + ROTATION_RETRY);
                        }
                    }
                }
                command = commands.recv() => match command {
                    None => return Ok(()),
                    Some(Command::Stop { done }) => {
                        self.leave().await;
                        let _ = done.send(());
                        return Ok(());
                    }
                    Some(command) => self.command(state, command).await?,
                },
            }
        }
    }

    /// Everything under the prefix at one revision (the supervisor compares it with what it
    /// applied), then a watch from the next.
    async fn full_sync(&mut self, state: &mut State) -> anyhow::Result<WatchStream> {
        let prefix = format!("{}/", self.s.cluster.prefix);
        let response = rpc(
            "read the cluster",
            self.client
                .get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let revision = response.header().map_or(0, |h| h.revision());
        let kvs = response
            .kvs()
            .iter()
            .map(|kv| (EventType::Put, kv.clone()))
            .collect();
        state.revision = revision;
        self.changes(state, kvs, true);
        self.watch_from(revision + 1).await
    }

    async fn watch_from(&mut self, revision: i64) -> anyhow::Result<WatchStream> {
        let prefix = format!("{}/", self.s.cluster.prefix);
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision);
        rpc(
            "watch the cluster",
            self.client.watch(prefix, Some(options)),
        )
        .await
    }

    /// Sorts changed keys into service entries (one update) and ticket keys.
    fn changes(&mut self, state: &mut State, kvs: Vec<(EventType, KeyValue)>, full: bool) {
        let services = services_prefix(&self.s.cluster.prefix);
        let tickets = tickets_key(&self.s.cluster.prefix);
        let mut entries = Vec::new();
        let mut newest = state.revision;
        for (kind, kv) in kvs {
            newest = newest.max(kv.mod_revision());
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            if let Some(name) = key.strip_prefix(&services) {
                let value = match kind {
                    EventType::Delete => None,
                    EventType::Put => Some(parse_service(
                        name,
                        kv.value(),
                        &self.s.cluster.material,
                        &self.s.pem_dir,
                    )),
                };
                entries.push(Entry {
                    name: name.to_string(),
                    key,
                    revision: kv.mod_revision(),
                    value,
                });
            } else if key == tickets && kind == EventType::Delete {
                // An operator's way to start over (a new key-encryption key): the leader draws
                // new keys now; until then every gateway keeps the keys it has.
                warn!(%key, "cluster: the ticket keys were deleted; the leader draws new ones");
                state.tickets = None;
                self.schedule_rotation(state);
            } else if key == tickets && kind == EventType::Put {
                match self.s.kek.open(kv.value()) {
                    Ok(doc) => {
                        let _ = self.updates.send(Update::Tickets {
                            keys: doc.keys.clone(),
                            sealed: kv.value().to_vec(),
                            rotated_at: doc.rotated_at,
                        });
                        state.tickets = Some(doc);
                        self.schedule_rotation(state);
                    }
                    Err(e) => {
                        warn!(%key, "cluster: ticket keys NOT taken, the previous stay: {e:#}")
                    }
                }
            }
        }
        state.revision = newest;
        if full || !entries.is_empty() {
            let _ = self.updates.send(Update::Services {
                revision: state.revision,
                full,
                entries,
            });
        }
    }

    /// The leader's next rotation: a period after the last (at once when there are none).
    fn schedule_rotation(&mut self, state: &State) {
        if !self.leader {
            return;
        }
        let period = self.s.ticket_rotation;
        self.next_rotation = Some(match &state.tickets {
            None => Instant::now(),
            Some(doc) => {
                let age =
                    Duration::from_secs(super::sealed::now_s().saturating_sub(doc.rotated_at));
                Instant::now() + period.saturating_sub(age)
            }
        });
    }

    /// New ticket keys, written only if nobody else wrote since the ones this gateway has
    /// (compare-and-swap on the key's revision): any member may rotate, none overwrites another.
    async fn rotate(&mut self, state: &mut State) -> anyhow::Result<i64> {
        let key = tickets_key(&self.s.cluster.prefix);
        let current = rpc("read the ticket keys", self.client.get(key.as_str(), None)).await?;
        let kv = current.kvs().first();
        let previous = match kv {
            None => None,
            Some(kv) => Some(self.s.kek.open(kv.value()).with_context(|| {
                format!(
                    "the ticket keys in {key} (not rotated: every gateway needs the same \
                     key_encryption_key; after changing it on all of them, delete {key})"
                )
            })?),
        };
        let doc = TicketsDoc::rotate(previous.as_ref(), &self.s.cluster.name);
        let sealed = self.s.kek.seal(&doc)?;
        let unchanged = match kv {
            Some(kv) => Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision()),
            None => Compare::version(key.as_str(), CompareOp::Equal, 0),
        };
        let txn = Txn::new()
            .when([unchanged])
            .and_then([TxnOp::put(key.as_str(), sealed, None)]);
        let response = rpc("write the ticket keys", self.client.txn(txn)).await?;
        if !response.succeeded() {
            bail!("another gateway rotated the ticket keys at the same moment");
        }
        state.tickets = Some(doc);
        self.schedule_rotation(state);
        Ok(response.header().map_or(0, |h| h.revision()))
    }

    async fn command(&mut self, state: &mut State, command: Command) -> anyhow::Result<()> {
        let prefix = &self.s.cluster.prefix;
        match command {
            Command::Member(m) => {
                state.member = m;
                self.write_member(state).await?;
            }
            Command::Put { service, reply } => {
                let key = format!("{}{}", services_prefix(prefix), service.name);
                let result = match serde_json::to_vec(&service) {
                    Ok(value) => rpc("write the service", self.client.put(key, value, None))
                        .await
                        .map(|r| r.header().map_or(0, |h| h.revision())),
                    Err(e) => Err(e.into()),
                };
                let _ = reply.send(result);
            }
            Command::Delete { name, reply } => {
                let key = format!("{}{name}", services_prefix(prefix));
                let result = rpc("delete the service", self.client.delete(key.as_str(), None))
                    .await
                    .and_then(|r| {
                        if r.deleted() == 0 {
                            bail!("no service {name:?} in the cluster ({key})");
                        }
                        Ok(r.header().map_or(0, |h| h.revision()))
                    });
                let _ = reply.send(result);
            }
            Command::Rotate { reply } => {
                let _ = reply.send(self.rotate(state).await);
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status().await);
            }
            Command::Stop { .. } => unreachable!("handled by the session loop"),
        }
        Ok(())
    }

    async fn status(&mut self) -> anyhow::Result<(Vec<Member>, Option<String>)> {
        let prefix = members_prefix(&self.s.cluster.prefix);
        let response = rpc(
            "list the members",
            self.client
                .get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let members = response
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
            .collect();
        let leader = match timeout(
            RPC_TIMEOUT,
            self.client.leader(election(&self.s.cluster.prefix)),
        )
        .await
        {
            Ok(Ok(r)) => r
                .kv()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            // etcd answers "election: no leader" as an error.
            _ => None,
        };
        Ok((members, leader))
    }

    async fn write_member(&mut self, state: &State) -> anyhow::Result<()> {
        let mut member = state.member.clone();
        member.name = self.s.cluster.name.clone();
        member.leader = self.leader;
        if self.written.as_ref() == Some(&member) {
            return Ok(());
        }
        let key = format!("{}{}", members_prefix(&self.s.cluster.prefix), member.name);
        let value = serde_json::to_vec(&member)?;
        let options = PutOptions::new().with_lease(self.lease);
        rpc(
            "write the member key",
            self.client.put(key, value, Some(options)),
        )
        .await?;
        self.written = Some(member);
        Ok(())
    }

    /// Gives the lease back: the member key and the leadership go now, not a TTL later.
    async fn leave(&mut self) {
        match timeout(Duration::from_secs(2), self.client.lease_revoke(self.lease)).await {
            Ok(Ok(_)) => info!("cluster: left (member key removed, leadership released)"),
            Ok(Err(e)) => warn!("cluster: lease not revoked, it expires by itself: {e}"),
            Err(_) => warn!("cluster: lease not revoked in time, it expires by itself"),
        }
    }
}

/// Renews the lease every third of its TTL, each renewal bounded by that third; tells the
/// session when a renewal fails (the lease may be gone: the session ends and starts over).
async fn keep_alive(
    mut keeper: etcd_client::LeaseKeeper,
    mut kept: etcd_client::LeaseKeepAliveStream,
    ttl: Duration,
    lost: oneshot::Sender<anyhow::Error>,
) {
    let period = (ttl / 3).max(Duration::from_millis(500));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let renewed = timeout(period, async {
            keeper.keep_alive().await?;
            kept.message().await
        })
        .await;
        let e = match renewed {
            Ok(Ok(Some(r))) if r.ttl() > 0 => continue,
            Ok(Ok(_)) => anyhow::anyhow!("lease {:x} expired", keeper.id()),
            Ok(Err(e)) => anyhow::Error::from(e).context("renew the lease"),
            Err(_) => anyhow::anyhow!("lease renewal: no answer within {period:?}"),
        };
        let _ = lost.send(e);
        return;
    }
}

/// A task that ends with the session.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
