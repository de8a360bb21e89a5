//! The supervisor's side of `[acme]` and of the certificates it serves: the ACME tasks
//! (`crate::acme`) get the services in force after every change, their validation answers
//! reach the worker, a stored certificate is applied like a changed file, and `relay status`
//! and the metrics tell each certificate's end of validity and where it comes from.

use std::time::Duration;

use tokio::sync::oneshot;
use tracing::warn;

use super::{Supervisor, Worker, changes::Change};
use crate::{
    acme::{self, Event},
    control::{CertificateInfo, Response, ServiceInfo},
    handoff::{FromWorker, ToWorker},
    tls::{challenge::AnswerSet, material},
};

/// Time the worker gets to take new validation answers.
const ANSWERS_TIMEOUT: Duration = Duration::from_secs(5);

impl Supervisor {
    pub(super) fn acme_event(&mut self, event: Event) {
        match event {
            Event::Challenges(answers, done) => self.send_answers(answers, done),
            Event::Issued { service, path } => {
                tracing::info!(service = %service, "applying the new ACME certificate");
                self.change(Change::files(vec![path]));
            }
        }
    }

    /// Hands the worker the validation answers in force; `done` hears when it serves them.
    /// Without a worker serving, `done` waits for the next one (the order's own timeout
    /// bounds that).
    pub(super) fn send_answers(
        &mut self,
        answers: AnswerSet,
        done: oneshot::Sender<anyhow::Result<()>>,
    ) {
        let Worker::Running(w) = &self.worker else {
            self.answers_waiting.push(done);
            return;
        };
        let asker = w.asker.clone();
        tokio::spawn(async move {
            let result = match asker
                .ask(ToWorker::Challenges(answers), &[], ANSWERS_TIMEOUT)
                .await
            {
                Ok(FromWorker::Applied { error: None }) => Ok(()),
                Ok(FromWorker::Applied { error: Some(e) }) => Err(anyhow::anyhow!("worker: {e}")),
                Ok(other) => Err(anyhow::anyhow!("unexpected answer: {other:?}")),
                Err(e) => Err(e),
            };
            let _ = done.send(result);
        });
    }

    /// A new worker serves: it gets the validation answers in force, and the orders that
    /// waited for a worker hear when it has them.
    pub(super) fn answers_to_new_worker(&mut self) {
        let Some(answers) = self.acme.as_ref().map(acme::Manager::answers) else {
            return;
        };
        let waiting = std::mem::take(&mut self.answers_waiting);
        if answers.answers.is_empty() && waiting.is_empty() {
            return;
        }
        let (tx, rx) = oneshot::channel();
        self.send_answers(answers, tx);
        tokio::spawn(async move {
            let result = rx
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("stopping")));
            if let Err(e) = &result {
                warn!("ACME validation answers not handed to the new worker: {e:#}");
            }
            for done in waiting {
                let _ = done.send(
                    result
                        .as_ref()
                        .map(|_| ())
                        .map_err(|e| anyhow::anyhow!("{e:#}")),
                );
            }
        });
    }

    /// Tells the ACME tasks which services have `cert = "acme"` now.
    pub(super) fn acme_sync(&mut self) {
        let Some(manager) = &mut self.acme else {
            return;
        };
        let services: Vec<(String, Vec<String>)> = self
            .config
            .services
            .iter()
            .filter(|s| s.inbound.is_acme())
            .map(|s| (s.name.clone(), s.inbound.names.clone()))
            .collect();
        manager.set(&services);
    }

    pub(super) fn renew_certificate(&self, service: String, reply: oneshot::Sender<Response>) {
        let result = match &self.acme {
            Some(m) => m.renew(&service),
            None => Err("no [acme] section: no certificate is ordered".to_string()),
        };
        let _ = reply.send(match result {
            Ok(()) => Response::ok(&format!("ordering a new certificate for {service}")),
            Err(e) => Response::error(e),
        });
    }

    /// The services in force as `relay status` shows them, with their certificates.
    pub(super) fn service_infos(&self) -> Vec<ServiceInfo> {
        let states = self.acme.as_ref().map(acme::Manager::states);
        let sas = self.ipsec.as_ref().map(crate::ipsec::Manager::infos);
        let clients = self.ipsec.as_ref().map(crate::ipsec::Manager::clients);
        self.config
            .services
            .iter()
            .map(|s| {
                let mut info = ServiceInfo::from(s);
                info.certificates = self.certificates(s);
                info.acme = states.as_ref().and_then(|st| st.get(&s.name).cloned());
                info.ipsec = sas.as_ref().and_then(|sa| sa.get(&s.name).cloned());
                info.ipsec_clients = clients.as_ref().and_then(|c| c.get(&s.name).cloned());
                info
            })
            .collect()
    }

    fn certificates(&self, s: &crate::config::Service) -> Vec<CertificateInfo> {
        if s.inbound.level == crate::config::Level::Plain {
            return Vec::new();
        }
        let mut out = Vec::new();
        let default = if s.inbound.is_acme() {
            let path = self.config.acme.as_ref().map(|a| a.stored(&s.name));
            Some(("acme", material::acme_file(&s.name), path))
        } else {
            s.inbound.cert.clone().map(|p| ("file", p.clone(), Some(p)))
        };
        let sni = s
            .inbound
            .sni
            .iter()
            .map(|e| ("file", e.cert.clone(), Some(e.cert.clone())));
        for (n, (source, key, path)) in default.into_iter().chain(sni).enumerate() {
            let first = self.files.get(&key).and_then(|pem| {
                use rustls::pki_types::{CertificateDer, pem::PemObject as _};
                CertificateDer::pem_slice_iter(pem).next()?.ok()
            });
            let validity = first.as_deref().and_then(acme::validity);
            out.push(CertificateInfo {
                key: match n {
                    0 => "inbound.cert".to_string(),
                    n => format!("inbound.sni[{}].cert", n - 1),
                },
                source: source.to_string(),
                path: path.map(|p| p.display().to_string()).unwrap_or_default(),
                not_after: validity.as_ref().map(|(_, end, _)| acme::unix(*end)),
                names: validity.map(|(_, _, names)| names).unwrap_or_default(),
            });
        }
        out
    }
}
