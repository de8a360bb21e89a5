//! Certificates from an ACME server (RFC 8555) for services with `inbound.cert = "acme"`.
//!
//! The supervisor runs one task per such service. The task keeps the service's certificate in
//! `[acme] storage` (one PEM file per service, key and chain together so that they change
//! together, mode 0600), orders a new one when there is none, when the names changed, or at
//! two thirds of the current one's lifetime (with jitter, so that a fleet does not renew at
//! once), and retries failures with backoff. The old certificate serves until the new one is
//! stored: the supervisor then applies it like a changed file (new connections get it; open
//! ones keep theirs).
//!
//! Validation is tls-alpn-01 (RFC 8737) on the service's own front port: the task makes the
//! answer (`tls::challenge`), the supervisor hands it to the worker and says when it is in
//! force, and only then is the ACME server told to validate. The protocol itself (JWS, nonces,
//! polling) is `instant-acme`'s.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, anyhow, bail};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{error, info, warn};

use crate::{
    config::{Acme, AcmeChallenge},
    tls::challenge,
};

/// Time given to the worker to drop an order's answers.
const WITHDRAW_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest single sleep before a renewal (see `run`).
const MAX_SLEEP: Duration = Duration::from_secs(3600);
/// First wait after a failed order; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// An order (validation included) that takes longer has failed.
const ORDER_TIMEOUT: Duration = Duration::from_secs(120);

/// What the tasks ask of the supervisor.
pub enum Event {
    /// Serve exactly these validation answers from now on; say when the worker has them.
    Challenges(challenge::AnswerSet, oneshot::Sender<anyhow::Result<()>>),
    /// Service `service`'s new certificate is stored at `path`: apply it.
    Issued { service: String, path: PathBuf },
}

/// One service's ACME state, for `relay status` and the metrics.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub orders: u64,
    pub failures: u64,
    pub renewals: u64,
    /// Why the last order failed, until one succeeds.
    pub last_error: Option<String>,
    /// When the next order is due (Unix seconds), when one is scheduled.
    pub next_order: Option<u64>,
}

struct Task {
    names: Vec<String>,
    renew: Arc<Renew>,
    handle: tokio::task::JoinHandle<()>,
}

/// `relay cert renew`: asked, and the task woken. An order under way when it is asked
/// answers it: the request is forgotten when an order starts, so one request is one order.
#[derive(Default)]
struct Renew {
    asked: std::sync::atomic::AtomicBool,
    wake: Notify,
}

impl Renew {
    fn ask(&self) {
        self.asked.store(true, std::sync::atomic::Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// Wakes the task to look at its stored file again, without asking for an order: it
    /// orders only if the file says so, and not before its backoff allows.
    fn look(&self) {
        self.wake.notify_one();
    }

    /// Waits `wait`, or until woken; true when an order was asked for.
    async fn wait(&self, wait: Duration) -> bool {
        if !self.asked.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.wake.notified() => {}
            }
        }
        self.asked.swap(false, std::sync::atomic::Ordering::SeqCst)
    }

    /// An order just ended: it answered whatever was asked meanwhile.
    fn answered(&self) {
        self.asked.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The ACME tasks of the services in force.
pub struct Manager {
    shared: Arc<Shared>,
    tasks: HashMap<String, Task>,
}

/// What the tasks share.
struct Shared {
    acme: Acme,
    events: mpsc::UnboundedSender<Event>,
    /// The account, once loaded or created.
    account: tokio::sync::Mutex<Option<Account>>,
    /// The validation answers in force, by name, over every service; each change makes a new
    /// generation, so the worker never takes an older set for a newer one.
    answers: Mutex<(u64, HashMap<String, challenge::Answer>)>,
    states: Mutex<HashMap<String, State>>,
}

impl Manager {
    pub fn new(acme: Acme, events: mpsc::UnboundedSender<Event>) -> Manager {
        Manager {
            shared: Arc::new(Shared {
                acme,
                events,
                account: tokio::sync::Mutex::new(None),
                answers: Mutex::default(),
                states: Mutex::default(),
            }),
            tasks: HashMap::new(),
        }
    }

    /// The ACME services in force now (name, DNS names): a task for each new one, a new task
    /// for one whose names changed, and none left for one that is gone.
    pub fn set(&mut self, services: &[(String, Vec<String>)]) {
        let mut gone = Vec::new();
        self.tasks.retain(|name, task| {
            let keep = services
                .iter()
                .any(|(n, names)| n == name && *names == task.names);
            if !keep {
                task.handle.abort();
                gone.extend(task.names.iter().map(|n| n.to_ascii_lowercase()));
            }
            keep
        });
        // An order cut short leaves no answer behind.
        if !gone.is_empty() {
            let shared = Arc::clone(&self.shared);
            tokio::spawn(async move { shared.withdraw(&gone).await });
        }
        self.shared
            .states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|name, _| services.iter().any(|(n, _)| n == name));
        for (name, names) in services {
            if self.tasks.contains_key(name) {
                continue;
            }
            let renew = Arc::new(Renew::default());
            let handle = tokio::spawn(run(
                Arc::clone(&self.shared),
                name.clone(),
                names.clone(),
                Arc::clone(&renew),
            ));
            self.tasks.insert(
                name.clone(),
                Task {
                    names: names.clone(),
                    renew,
                    handle,
                },
            );
        }
    }

    /// Wakes `service`'s task to read its stored certificate again (it went away): it orders
    /// one when its backoff allows.
    pub fn look_again(&self, service: &str) {
        if let Some(task) = self.tasks.get(service) {
            task.renew.look();
        }
    }

    /// Orders a new certificate for `service` now.
    pub fn renew(&self, service: &str) -> Result<(), String> {
        let task = self
            .tasks
            .get(service)
            .ok_or_else(|| format!("service {service:?} has no cert = \"acme\""))?;
        task.renew.ask();
        Ok(())
    }

    pub fn states(&self) -> HashMap<String, State> {
        self.shared.state(|s| s.clone())
    }

    /// The validation answers in force (a new worker gets them).
    pub fn answers(&self) -> challenge::AnswerSet {
        self.shared.answers()
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.handle.abort();
        }
    }
}

impl Shared {
    fn state<T>(&self, f: impl FnOnce(&mut HashMap<String, State>) -> T) -> T {
        f(&mut self.states.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn update(&self, service: &str, f: impl FnOnce(&mut State)) {
        self.state(|s| f(s.entry(service.to_string()).or_default()));
    }

    fn answers(&self) -> challenge::AnswerSet {
        let answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        challenge::AnswerSet {
            generation: answers.0,
            answers: answers.1.values().cloned().collect(),
        }
    }

    /// Adds (or, with `None`, withdraws) the answers for `names`, and waits until the worker
    /// serves the new set.
    async fn serve(&self, changes: Vec<(String, Option<challenge::Answer>)>) -> anyhow::Result<()> {
        let set = {
            let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
            for (name, answer) in changes {
                match answer {
                    Some(a) => answers.1.insert(name, a),
                    None => answers.1.remove(&name),
                };
            }
            answers.0 += 1;
            challenge::AnswerSet {
                generation: answers.0,
                answers: answers.1.values().cloned().collect(),
            }
        };
        let (tx, rx) = oneshot::channel();
        self.events
            .send(Event::Challenges(set, tx))
            .map_err(|_| anyhow!("the supervisor is stopping"))?;
        rx.await
            .map_err(|_| anyhow!("the supervisor is stopping"))?
    }

    /// Withdraws the answers for `names` that are in force, if any.
    async fn withdraw(&self, names: &[String]) {
        let present = {
            let answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
            names.iter().any(|n| answers.1.contains_key(n))
        };
        if present
            && let Err(e) = self
                .serve(names.iter().map(|n| (n.clone(), None)).collect())
                .await
        {
            warn!(names = ?names, "validation answers not withdrawn from the worker: {e:#}");
        }
    }

    /// The account: loaded from its file, or created on the ACME server and stored.
    async fn account(&self) -> anyhow::Result<Account> {
        let mut slot = self.account.lock().await;
        if let Some(a) = &*slot {
            return Ok(a.clone());
        }
        let acme = &self.acme;
        let builder = || match &acme.ca {
            Some(ca) => Account::builder_with_root(ca)
                .with_context(|| format!("[acme] ca {}", ca.display())),
            None => Account::builder().context("the system's CA store"),
        };
        let path = acme.account_path();
        let account = match std::fs::read(&path) {
            Ok(bytes) => {
                // The credentials name their server, and instant-acme uses that one: an
                // account of another directory (staging, say) must not be used unnoticed.
                let json: serde_json::Value = serde_json::from_slice(&bytes)
                    .with_context(|| format!("account {}: not JSON", path.display()))?;
                let of = json.get("directory").and_then(|d| d.as_str());
                if of.is_some_and(|d| d != acme.directory) {
                    bail!(
                        "account {} belongs to {}, not to [acme] directory {}: move it away (a \
                         new account is then created) or set [acme] account_key",
                        path.display(),
                        of.unwrap_or_default(),
                        acme.directory
                    );
                }
                let credentials: AccountCredentials = serde_json::from_value(json)
                    .with_context(|| format!("account {}: not ACME credentials", path.display()))?;
                builder()?
                    .from_credentials(credentials)
                    .await
                    .with_context(|| format!("account {}", path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let contact: Vec<&str> = acme.contact.iter().map(String::as_str).collect();
                let new = NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                };
                let (account, credentials) = builder()?
                    .create(&new, acme.directory.clone(), None)
                    .await
                    .with_context(|| format!("create an account at {}", acme.directory))?;
                let json = serde_json::to_vec_pretty(&credentials)?;
                write_private(&path, &json)?;
                info!(account = %account.id(), file = %path.display(), "ACME account created");
                account
            }
            Err(e) => return Err(e).with_context(|| format!("account {}", path.display())),
        };
        *slot = Some(account.clone());
        Ok(account)
    }
}

/// One service's certificate, for as long as the service has `cert = "acme"` with `names`.
async fn run(shared: Arc<Shared>, service: String, names: Vec<String>, renew: Arc<Renew>) {
    let path = shared.acme.stored(&service);
    let lowercase: Vec<String> = names.iter().map(|n| n.to_ascii_lowercase()).collect();
    let mut backoff = FIRST_BACKOFF;
    // After a failure: not before this.
    let mut retry_at: Option<SystemTime> = None;
    loop {
        let stored = std::fs::read(&path)
            .ok()
            .and_then(|pem| Stored::parse(&pem));
        let mut due = match &stored {
            None => SystemTime::now(),
            Some(s) if !s.covers(&names) => {
                info!(service = %service, "the stored certificate does not cover the names: ordering one that does");
                SystemTime::now()
            }
            Some(s) => s.renew_at(),
        };
        if let Some(r) = retry_at {
            due = due.max(r);
        }
        shared.update(&service, |s| s.next_order = Some(unix(due)));
        let wait = due.duration_since(SystemTime::now()).unwrap_or_default();
        if renew.wait(wait.min(MAX_SLEEP)).await {
            info!(service = %service, "certificate renewal asked for");
        } else if SystemTime::now() < due {
            // A long wait is taken in steps: a suspended machine or a clock set forward
            // cannot push a renewal past its time.
            continue;
        }
        shared.update(&service, |s| {
            s.orders += 1;
            s.next_order = None;
        });
        let result = tokio::time::timeout(ORDER_TIMEOUT, order(&shared, &names))
            .await
            .unwrap_or_else(|_| Err(anyhow!("no certificate within {ORDER_TIMEOUT:?}")));
        renew.answered();
        // Stored before anything else can fail or wait: the CA has issued it.
        let result = result.and_then(|pem| {
            write_private(&path, pem.as_bytes())?;
            Ok(pem)
        });
        // Whatever became of the order (a timeout too), its answers go; a worker that does
        // not take the withdrawal in time drops them with the next set or restart.
        let _ = tokio::time::timeout(WITHDRAW_TIMEOUT, shared.withdraw(&lowercase)).await;
        match result {
            Ok(pem) => {
                backoff = FIRST_BACKOFF;
                retry_at = None;
                let not_after = Stored::parse(pem.as_bytes()).map(|s| unix(s.not_after));
                shared.update(&service, |s| {
                    s.last_error = None;
                    if stored.is_some() {
                        s.renewals += 1;
                    }
                });
                info!(service = %service, names = ?names, not_after, file = %path.display(),
                      renewal = stored.is_some(), "ACME certificate issued");
                let _ = shared.events.send(Event::Issued {
                    service: service.clone(),
                    path: path.clone(),
                });
            }
            Err(e) => {
                let why = format!("{e:#}");
                shared.update(&service, |s| {
                    s.failures += 1;
                    s.last_error = Some(why.clone());
                });
                let serving = if stored.is_some() {
                    "the stored certificate keeps serving"
                } else {
                    "TLS clients are refused until one is issued"
                };
                error!(service = %service, next_try_s = backoff.as_secs(),
                       "ACME order failed ({serving}): {why}");
                // Next: after the backoff when there is no good certificate, else at its
                // renewal time; `relay cert renew` at once.
                retry_at = Some(SystemTime::now() + backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// One order, validated through the answers the worker serves (tls-alpn-01 on the front
/// port, or http-01 on a plain port): the key and chain (PEM).
async fn order(shared: &Shared, names: &[String]) -> anyhow::Result<String> {
    let account = shared.account().await?;
    let identifiers: Vec<Identifier> = names.iter().cloned().map(Identifier::Dns).collect();
    let mut order = account
        .new_order(&NewOrder::new(&identifiers))
        .await
        .context("new order")?;
    let (kind, label) = match shared.acme.challenge {
        AcmeChallenge::TlsAlpn01 => (ChallengeType::TlsAlpn01, "tls-alpn-01"),
        AcmeChallenge::Http01 => (ChallengeType::Http01, "http-01"),
    };
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz.context("authorization")?;
        match authz.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => bail!("authorization for {} is {other:?}", authz.identifier()),
        }
        let mut challenge = authz
            .challenge(kind.clone())
            .ok_or_else(|| anyhow!("the ACME server offers no {label} challenge for this name"))?;
        let name = challenge.identifier().to_string().to_ascii_lowercase();
        let key_authorization = challenge.key_authorization();
        let answer = match shared.acme.challenge {
            AcmeChallenge::TlsAlpn01 => {
                challenge::answer(&name, key_authorization.digest().as_ref())
                    .context("make the tls-alpn-01 answer")?
            }
            AcmeChallenge::Http01 => challenge::Answer::Http {
                name: name.clone(),
                token: challenge.token.clone(),
                key_authorization: key_authorization.as_str().to_string(),
            },
        };
        shared
            .serve(vec![(name, Some(answer))])
            .await
            .with_context(|| format!("serve the {label} answer"))?;
        challenge.set_ready().await.context("challenge ready")?;
    }
    let retries = RetryPolicy::new().timeout(ORDER_TIMEOUT);
    match order.poll_ready(&retries).await.context("validation")? {
        OrderStatus::Ready => {}
        status => bail!("the order is {status:?} after validation"),
    }
    let key = order.finalize().await.context("finalize")?;
    let chain = order
        .poll_certificate(&RetryPolicy::new())
        .await
        .context("certificate")?;
    let pem = format!("{key}{chain}");
    if Stored::parse(pem.as_bytes()).is_none() {
        bail!("the ACME server's certificate does not parse, or does not fit its key");
    }
    Ok(pem)
}

/// A stored certificate: what decides when it is renewed.
pub struct Stored {
    not_before: SystemTime,
    pub not_after: SystemTime,
    names: Vec<String>,
    /// Where in the jitter window this certificate renews: drawn from its bytes, so the same
    /// certificate keeps its time however often it is looked at, and a fleet's differ.
    jitter: f64,
}

impl Stored {
    /// The first certificate of `pem` (a key and chain), if it parses and its key fits.
    pub fn parse(pem: &[u8]) -> Option<Stored> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .ok()?;
        let key = PrivateKeyDer::from_pem_slice(pem).ok()?;
        rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain.clone(), key)
            .ok()?;
        let first = chain.first()?;
        let (not_before, not_after, names) = validity(first)?;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, first);
        let mut seed = [0u8; 4];
        seed.copy_from_slice(&digest.as_ref()[..4]);
        Some(Stored {
            not_before,
            not_after,
            names,
            jitter: f64::from(u32::from_le_bytes(seed)) / f64::from(u32::MAX),
        })
    }

    fn covers(&self, names: &[String]) -> bool {
        names
            .iter()
            .all(|n| self.names.iter().any(|m| m.eq_ignore_ascii_case(n)))
    }

    /// Two thirds into its lifetime, give or take a thirtieth of it.
    fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        let spread = life / 15;
        self.not_before + life * 2 / 3 - spread / 2 + spread.mul_f64(self.jitter)
    }
}

/// A certificate's validity and DNS names.
pub fn validity(der: &[u8]) -> Option<(SystemTime, SystemTime, Vec<String>)> {
    use x509_parser::prelude::FromDer as _;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let at = |t: i64| UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    let names = crate::access::Identity::from_der(der)
        .map(|id| id.dns)
        .unwrap_or_default();
    Some((
        at(cert.validity().not_before.timestamp()),
        at(cert.validity().not_after.timestamp()),
        names,
    ))
}

pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Writes `bytes` to `path` for the owner only, atomically (see [`crate::sys::write_private`]),
/// warning when the storage directory lets other users in.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    crate::sys::write_private(path, bytes)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    if let Ok(meta) = std::fs::metadata(dir)
        && meta.permissions().mode() & 0o077 != 0
    {
        warn!(dir = %dir.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777),
              "ACME storage is open to other users: chmod 700 it");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Key and certificate for `names`, valid from January to `until_month` of 2030.
    fn issued(until_month: u8, names: &[&str]) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.not_before = rcgen::date_time_ymd(2030, 1, 1);
        params.not_after = rcgen::date_time_ymd(2030, until_month, 1);
        let cert = params.self_signed(&key).unwrap();
        format!("{}{}", key.serialize_pem(), cert.pem())
    }

    #[test]
    fn renewal_is_due_at_two_thirds_of_the_lifetime_give_or_take() {
        let mut times = std::collections::HashSet::new();
        for _ in 0..20 {
            let stored = Stored::parse(issued(4, &["shop.example"]).as_bytes()).unwrap();
            let life = stored.not_after.duration_since(stored.not_before).unwrap();
            let at = stored.renew_at().duration_since(stored.not_before).unwrap();
            let third = life.as_secs_f64() / 3.0;
            let (low, high) = (
                2.0 * third - life.as_secs_f64() / 30.0,
                2.0 * third + life.as_secs_f64() / 30.0,
            );
            assert!(
                (low..=high).contains(&at.as_secs_f64()),
                "{at:?} of {life:?}"
            );
            assert_eq!(
                stored.renew_at(),
                stored.renew_at(),
                "one time per certificate"
            );
            times.insert(at);
            assert!(stored.covers(&["SHOP.example".into()]));
            assert!(!stored.covers(&["shop.example".into(), "api.example".into()]));
        }
        assert!(
            times.len() > 10,
            "certificates spread over the window: {times:?}"
        );
    }

    #[tokio::test]
    async fn an_account_of_another_directory_is_refused_not_used() {
        // An account made on staging must not be used, unnoticed, for production: the check
        // comes before any request to either server.
        let dir = tempfile::tempdir().unwrap();
        let acme = Acme {
            directory: "https://acme.example/directory".into(),
            contact: Vec::new(),
            account_key: None,
            ca: None,
            storage: dir.path().to_path_buf(),
            challenge: AcmeChallenge::TlsAlpn01,
        };
        let staging = serde_json::json!({
            "id": "https://staging.example/acct/1",
            "key_pkcs8": "AAAA",
            "directory": "https://staging.example/directory",
        });
        std::fs::write(acme.account_path(), staging.to_string()).unwrap();
        let (events, _) = mpsc::unbounded_channel();
        let manager = Manager::new(acme, events);
        let Err(e) = manager.shared.account().await else {
            panic!("an account of another directory was used");
        };
        let e = e.to_string();
        assert!(
            e.contains("belongs to https://staging.example/directory"),
            "{e}"
        );
    }

    #[test]
    fn a_stored_file_holds_together_or_is_not_taken() {
        let good = issued(2, &["shop.example"]);
        assert!(Stored::parse(good.as_bytes()).is_some());
        assert!(
            Stored::parse(&good.as_bytes()[..good.len() / 2]).is_none(),
            "cut short"
        );
        let other_key = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let chain = good.split_once("-----BEGIN CERTIFICATE").unwrap().1;
        let mismatched = format!("{other_key}-----BEGIN CERTIFICATE{chain}");
        assert!(
            Stored::parse(mismatched.as_bytes()).is_none(),
            "a key that does not fit"
        );
    }

    #[test]
    fn stored_files_are_replaced_whole_and_for_the_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store/shop.pem");
        write_private(&path, b"first").unwrap();
        write_private(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["shop.pem"], "no temporary file left");
    }
}
