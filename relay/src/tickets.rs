//! TLS session ticket keys that outlive a worker.
//!
//! rustls' own ticketer draws its keys inside the process, so every restarted worker would
//! reject every ticket issued before. Here the supervisor owns the keys: it draws them, rotates
//! them on a schedule, and hands the current and the previous one to each worker generation.
//! Workers encrypt with the current key and decrypt with either, so a ticket stays valid for
//! up to two rotation periods, across worker restarts.
//!
//! Ticket format: key id (4 bytes) ‖ nonce (12) ‖ AES-256-GCM ciphertext and tag. The key id is
//! authenticated as associated data.

use std::{
    fmt,
    sync::{Arc, RwLock},
    time::Duration,
};

use aws_lc_rs::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    rand::{SecureRandom as _, SystemRandom},
};
use rustls::server::ProducesTickets;
use serde::{Deserialize, Serialize};

/// One ticket key, as the supervisor sends it to workers.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketKey {
    pub id: u32,
    pub secret: [u8; 32],
}

impl fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TicketKey({:08x})", self.id)
    }
}

impl TicketKey {
    pub fn generate() -> TicketKey {
        let rng = SystemRandom::new();
        let mut secret = [0u8; 32];
        let mut id = [0u8; 4];
        // The system RNG only fails when the kernel has none to give: nothing to fall back on.
        rng.fill(&mut secret)
            .expect("system random number generator");
        rng.fill(&mut id).expect("system random number generator");
        TicketKey {
            id: u32::from_be_bytes(id),
            secret,
        }
    }
}

/// The supervisor's key schedule: newest first.
#[derive(Clone, Debug)]
pub struct KeySchedule {
    keys: Vec<TicketKey>,
}

impl Default for KeySchedule {
    fn default() -> Self {
        Self {
            keys: vec![TicketKey::generate()],
        }
    }
}

impl KeySchedule {
    /// Draws a new current key; the old current one stays valid for decryption.
    pub fn rotate(&mut self) {
        self.keys.insert(0, TicketKey::generate());
        self.keys.truncate(2);
    }

    pub fn keys(&self) -> &[TicketKey] {
        &self.keys
    }

    /// Keys drawn elsewhere (the cluster's leader), newest first; an empty list changes nothing.
    pub fn replace(&mut self, keys: Vec<TicketKey>) {
        if !keys.is_empty() {
            self.keys = keys;
            self.keys.truncate(2);
        }
    }
}

/// A `ProducesTickets` over keys that can be replaced while connections use it.
pub struct SharedTicketer {
    keys: RwLock<Vec<(u32, LessSafeKey)>>,
    lifetime: Duration,
}

impl fmt::Debug for SharedTicketer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<u32> = self
            .keys
            .read()
            .map(|k| k.iter().map(|(id, _)| *id).collect())
            .unwrap_or_default();
        write!(f, "SharedTicketer({ids:08x?})")
    }
}

impl SharedTicketer {
    /// `lifetime` is what clients are told a ticket is good for: two rotation periods.
    pub fn new(keys: &[TicketKey], lifetime: Duration) -> Arc<SharedTicketer> {
        let t = Arc::new(SharedTicketer {
            keys: RwLock::new(Vec::new()),
            lifetime,
        });
        t.set(keys);
        t
    }

    /// Replaces the keys (newest first).
    pub fn set(&self, keys: &[TicketKey]) {
        let keys = keys
            .iter()
            .filter_map(|k| {
                let key = UnboundKey::new(&AES_256_GCM, &k.secret).ok()?;
                Some((k.id, LessSafeKey::new(key)))
            })
            .collect();
        if let Ok(mut slot) = self.keys.write() {
            *slot = keys;
        }
    }
}

impl ProducesTickets for SharedTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.lifetime.as_secs().min(u64::from(u32::MAX)) as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let keys = self.keys.read().ok()?;
        let (id, key) = keys.first()?;
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(4 + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(id.to_be_bytes()),
            &mut body,
        )
        .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < 4 + NONCE_LEN {
            return None;
        }
        let (id, rest) = cipher.split_at(4);
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let id = u32::from_be_bytes(id.try_into().ok()?);
        let keys = self.keys.read().ok()?;
        let (_, key) = keys.iter().find(|(k, _)| *k == id)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let plain = key
            .open_in_place(nonce, Aad::from(id.to_be_bytes()), &mut body)
            .ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_survive_one_rotation_and_a_new_ticketer_with_the_same_keys() {
        let mut schedule = KeySchedule::default();
        let worker1 = SharedTicketer::new(schedule.keys(), Duration::from_secs(7200));
        let ticket = worker1.encrypt(b"session state").unwrap();
        // A new worker generation, same keys: the ticket still opens.
        let worker2 = SharedTicketer::new(schedule.keys(), Duration::from_secs(7200));
        assert_eq!(worker2.decrypt(&ticket).unwrap(), b"session state");
        schedule.rotate();
        worker2.set(schedule.keys());
        assert_eq!(
            worker2.decrypt(&ticket).unwrap(),
            b"session state",
            "previous key"
        );
        let newer = worker2.encrypt(b"x").unwrap();
        assert_ne!(newer[..4], ticket[..4], "new tickets use the new key");
        schedule.rotate();
        worker2.set(schedule.keys());
        assert_eq!(
            worker2.decrypt(&ticket),
            None,
            "two rotations later the ticket is gone"
        );
    }

    #[test]
    fn tampered_or_short_tickets_are_rejected() {
        let t = SharedTicketer::new(KeySchedule::default().keys(), Duration::from_secs(60));
        let mut ticket = t.encrypt(b"state").unwrap();
        let last = ticket.len() - 1;
        ticket[last] ^= 1;
        assert_eq!(t.decrypt(&ticket), None);
        assert_eq!(t.decrypt(&ticket[..10]), None);
        assert_eq!(t.decrypt(&[]), None);
        let other = SharedTicketer::new(KeySchedule::default().keys(), Duration::from_secs(60));
        assert_eq!(
            other.decrypt(&t.encrypt(b"state").unwrap()),
            None,
            "foreign key"
        );
    }
}
