//! The ticket keys as they are stored in etcd: sealed with the key-encryption key (KEK) every
//! gateway has from a file, so that whoever reads etcd (a backup, an operator, a compromised
//! member of another cluster sharing it) cannot decrypt a session ticket.
//!
//! Stored value: nonce (12 bytes) ‖ AES-256-GCM(KEK, JSON of [`TicketsDoc`]) with the
//! associated data [`AAD`], so a value sealed for another purpose never opens as tickets.

use std::{path::Path, time::SystemTime};

use anyhow::{Context as _, bail};
use aws_lc_rs::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    rand::{SecureRandom as _, SystemRandom},
};
use serde::{Deserialize, Serialize};

use crate::tickets::TicketKey;

const AAD: &[u8] = b"relay cluster tickets v1";

/// The key-encryption key.
pub struct Kek(LessSafeKey);

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(..)")
    }
}

impl Kek {
    /// Reads the KEK file: 32 raw bytes, or 64 hex digits (whitespace around them ignored).
    pub fn read(path: &Path) -> anyhow::Result<Kek> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("key_encryption_key {}", path.display()))?;
        Kek::parse(&bytes).with_context(|| format!("key_encryption_key {}", path.display()))
    }

    pub fn parse(bytes: &[u8]) -> anyhow::Result<Kek> {
        let secret: Vec<u8> = if bytes.len() == 32 {
            bytes.to_vec()
        } else {
            let text = std::str::from_utf8(bytes).unwrap_or("").trim();
            if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!(
                    "must hold 32 random bytes, raw or as 64 hex digits (e.g. `openssl rand -hex \
                     32`); found {} bytes",
                    bytes.len()
                );
            }
            (0..32)
                .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16))
                .collect::<Result<_, _>>()?
        };
        let key = UnboundKey::new(&AES_256_GCM, &secret).map_err(|_| anyhow::anyhow!("bad key"))?;
        Ok(Kek(LessSafeKey::new(key)))
    }

    pub fn seal(&self, doc: &TicketsDoc) -> anyhow::Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| anyhow::anyhow!("no randomness"))?;
        let mut body = serde_json::to_vec(doc)?;
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(AAD),
                &mut body,
            )
            .map_err(|_| anyhow::anyhow!("sealing failed"))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&body);
        Ok(out)
    }

    pub fn open(&self, sealed: &[u8]) -> anyhow::Result<TicketsDoc> {
        if sealed.len() < NONCE_LEN + 16 {
            bail!("too short ({} bytes)", sealed.len());
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| anyhow::anyhow!("nonce"))?;
        let mut body = body.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(AAD), &mut body)
            .map_err(|_| {
                anyhow::anyhow!("cannot be opened with this gateway's key_encryption_key")
            })?;
        let doc: TicketsDoc = serde_json::from_slice(plain).context("sealed ticket keys")?;
        if doc.keys.is_empty() {
            bail!("no keys in the sealed ticket keys");
        }
        Ok(doc)
    }
}

/// The cluster's ticket keys, newest first, and when and by whom they were last rotated.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TicketsDoc {
    pub keys: Vec<TicketKey>,
    /// Seconds since the epoch.
    pub rotated_at: u64,
    pub by: String,
}

impl TicketsDoc {
    /// A new current key in front of `previous`'s current one (which stays valid for
    /// decryption, as on one gateway).
    pub fn rotate(previous: Option<&TicketsDoc>, by: &str) -> TicketsDoc {
        let mut keys = vec![TicketKey::generate()];
        if let Some(k) = previous.and_then(|p| p.keys.first()) {
            keys.push(k.clone());
        }
        TicketsDoc {
            keys,
            rotated_at: now_s(),
            by: by.to_string(),
        }
    }
}

pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_keys_open_with_the_same_kek_only() {
        let kek = Kek::parse(&[7u8; 32]).unwrap();
        let doc = TicketsDoc::rotate(None, "a");
        let sealed = kek.seal(&doc).unwrap();
        let secret = doc.keys[0].secret;
        assert!(
            !sealed.windows(32).any(|w| w == secret),
            "the key never appears in clear"
        );
        let opened = kek.open(&sealed).unwrap();
        assert_eq!(opened.keys, doc.keys);
        let hex = "07".repeat(32);
        assert_eq!(
            Kek::parse(hex.as_bytes())
                .unwrap()
                .open(&sealed)
                .unwrap()
                .keys,
            doc.keys,
            "the hex form is the same key"
        );
        let other = Kek::parse(&[8u8; 32]).unwrap();
        assert!(other.open(&sealed).is_err());
        let mut tampered = sealed.clone();
        tampered[20] ^= 1;
        assert!(kek.open(&tampered).is_err());
        assert!(kek.open(&sealed[..10]).is_err());
        let next = TicketsDoc::rotate(Some(&doc), "b");
        assert_eq!(next.keys.len(), 2);
        assert_eq!(next.keys[1], doc.keys[0], "the previous current key stays");
    }

    #[test]
    fn bad_kek_files_are_refused() {
        for bad in [&b""[..], b"short", &[0u8; 31], &[b'g'; 64]] {
            assert!(Kek::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Kek::parse(format!("{}\n", "ab".repeat(32)).as_bytes()).is_ok());
    }
}
