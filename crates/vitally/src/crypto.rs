//! Encryption at rest for integration credentials (ChaCha20-Poly1305), with a key ring
//! so the key can be rotated: each record names the id of the key that sealed it.
//!
//! Stored form: `v1:` + base64(nonce ‖ ciphertext ‖ tag), a fresh random nonce per call.
//! The associated data is the workspace id, so a ciphertext copied onto another
//! workspace's record does not decrypt.

use std::fmt;

use base64::{Engine as _, engine::general_purpose::STANDARD};
use chacha20poly1305::{
    AeadCore, ChaCha20Poly1305, KeyInit, Nonce,
    aead::{Aead, OsRng, Payload},
};
use secrecy::{ExposeSecret, SecretString, zeroize::Zeroizing};

const VERSION_PREFIX: &str = "v1:";
const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum CipherError {
    #[error(
        "the integrations encryption key is invalid: {0}; it must be 32 random bytes as base64 \
         or 64 hex characters, generate one with `openssl rand -base64 32`"
    )]
    InvalidKey(&'static str),
    #[error("stored secret is not in the expected `v1:<base64>` form")]
    Malformed,
    #[error(
        "stored secret could not be decrypted (wrong key, tampered value, or it belongs to \
         another workspace)"
    )]
    Decrypt,
    #[error("secret could not be encrypted")]
    Encrypt,
    #[error(
        "stored secret was encrypted with key id {0:?}, which is not in this replica's \
         INTEGRATIONS_KEYS"
    )]
    UnknownKey(String),
    #[error("INTEGRATIONS_KEYS is invalid: {0}; write `id:key,id:key` with the newest key first")]
    InvalidRing(String),
}

/// Encrypts and decrypts integration secrets with one key.
#[derive(Clone)]
pub struct SecretCipher {
    aead: ChaCha20Poly1305,
    /// Derived from the key: makes fingerprints that reveal nothing of a header.
    fingerprint_key: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for SecretCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretCipher { key: <redacted> }")
    }
}

impl SecretCipher {
    /// Accepts 32 bytes written as 64 hex characters or as standard base64.
    pub fn from_key(key: &SecretString) -> Result<Self, CipherError> {
        let text = key.expose_secret().trim();
        if text.is_empty() {
            return Err(CipherError::InvalidKey("it is empty"));
        }
        let bytes = decode_key(text)?;
        if bytes.len() != KEY_LEN {
            return Err(CipherError::InvalidKey("it does not decode to 32 bytes"));
        }
        let aead = ChaCha20Poly1305::new_from_slice(&bytes)
            .map_err(|_| CipherError::InvalidKey("it does not decode to 32 bytes"))?;
        let fingerprint_key = Zeroizing::new(hmac_sha256(&bytes, b"thena-vitally fingerprint v1"));
        Ok(Self {
            aead,
            fingerprint_key,
        })
    }

    /// A keyed fingerprint of `parts`: equal inputs give equal fingerprints under one key,
    /// and nothing about the inputs can be learnt from it.
    pub fn fingerprint(&self, parts: &[&str]) -> String {
        let message = parts.join("\n");
        hex(&hmac_sha256(&self.fingerprint_key, message.as_bytes()))
    }

    /// Encrypts `plaintext`, bound to `aad` (the workspace id).
    pub fn encrypt(&self, plaintext: &SecretString, aad: &str) -> Result<String, CipherError> {
        let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
        let sealed = self
            .aead
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext.expose_secret().as_bytes(),
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| CipherError::Encrypt)?;
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(format!("{VERSION_PREFIX}{}", STANDARD.encode(out)))
    }

    /// Reverses [`encrypt`](Self::encrypt); fails unless key, value and `aad` all match.
    pub fn decrypt(&self, stored: &str, aad: &str) -> Result<SecretString, CipherError> {
        let encoded = stored
            .strip_prefix(VERSION_PREFIX)
            .ok_or(CipherError::Malformed)?;
        let raw = STANDARD
            .decode(encoded)
            .map_err(|_| CipherError::Malformed)?;
        if raw.len() < NONCE_LEN + TAG_LEN {
            return Err(CipherError::Malformed);
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let plain = Zeroizing::new(
            self.aead
                .decrypt(
                    Nonce::from_slice(nonce),
                    Payload {
                        msg: sealed,
                        aad: aad.as_bytes(),
                    },
                )
                .map_err(|_| CipherError::Decrypt)?,
        );
        let text = std::str::from_utf8(&plain).map_err(|_| CipherError::Decrypt)?;
        Ok(SecretString::from(text))
    }
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    use hmac::{Hmac, Mac};
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key");
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The keys of one deployment, newest first: new secrets are sealed with the first, and
/// any of them opens a secret that names it. `INTEGRATIONS_KEY=K` is the ring `k1:K`.
#[derive(Clone, Debug)]
pub struct KeyRing {
    keys: Vec<(String, SecretCipher)>,
}

impl KeyRing {
    /// The id a lone `INTEGRATIONS_KEY` gets, so it can later join a ring unchanged.
    pub const SINGLE_KEY_ID: &'static str = "k1";

    pub fn single(key: &SecretString) -> Result<Self, CipherError> {
        Ok(Self {
            keys: vec![(Self::SINGLE_KEY_ID.to_owned(), SecretCipher::from_key(key)?)],
        })
    }

    /// `id:key,id:key,…`, newest first.
    pub fn parse(ring: &SecretString) -> Result<Self, CipherError> {
        let mut keys: Vec<(String, SecretCipher)> = Vec::new();
        for entry in ring.expose_secret().split(',').map(str::trim) {
            let Some((id, key)) = entry.split_once(':') else {
                return Err(CipherError::InvalidRing(
                    "an entry has no `id:` in front of its key".into(),
                ));
            };
            let id = id.trim();
            if id.is_empty()
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(CipherError::InvalidRing(format!(
                    "key id {id:?} is not a plain word"
                )));
            }
            if keys.iter().any(|(known, _)| known == id) {
                return Err(CipherError::InvalidRing(format!(
                    "key id {id:?} appears twice"
                )));
            }
            keys.push((
                id.to_owned(),
                SecretCipher::from_key(&SecretString::from(key.trim()))?,
            ));
        }
        Ok(Self { keys })
    }

    pub fn primary_id(&self) -> &str {
        &self.keys[0].0
    }

    fn primary(&self) -> &SecretCipher {
        &self.keys[0].1
    }

    /// Seals with the newest key: `(key id, stored form)`.
    pub fn encrypt(
        &self,
        plaintext: &SecretString,
        aad: &str,
    ) -> Result<(String, String), CipherError> {
        Ok((
            self.primary_id().to_owned(),
            self.primary().encrypt(plaintext, aad)?,
        ))
    }

    pub fn decrypt(
        &self,
        key_id: &str,
        stored: &str,
        aad: &str,
    ) -> Result<SecretString, CipherError> {
        let (_, cipher) = self
            .keys
            .iter()
            .find(|(id, _)| id == key_id)
            .ok_or_else(|| CipherError::UnknownKey(key_id.to_owned()))?;
        cipher.decrypt(stored, aad)
    }

    /// `id:hex` under the newest key.
    pub fn fingerprint(&self, parts: &[&str]) -> String {
        format!(
            "{}:{}",
            self.primary_id(),
            self.primary().fingerprint(parts)
        )
    }

    /// The fingerprint under every key: a record fingerprinted before a rotation still
    /// matches one of these.
    pub fn fingerprints(&self, parts: &[&str]) -> Vec<String> {
        self.keys
            .iter()
            .map(|(id, cipher)| format!("{id}:{}", cipher.fingerprint(parts)))
            .collect()
    }
}

fn decode_key(text: &str) -> Result<Zeroizing<Vec<u8>>, CipherError> {
    if text.len() == 2 * KEY_LEN && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(Zeroizing::new(decode_hex(text)));
    }
    STANDARD
        .decode(text)
        .map(Zeroizing::new)
        .map_err(|_| CipherError::InvalidKey("it is neither 64 hex characters nor base64"))
}

/// Caller checked that `text` is an even number of ASCII hex digits.
fn decode_hex(text: &str) -> Vec<u8> {
    fn nibble(b: u8) -> u8 {
        match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => 0,
        }
    }
    text.as_bytes()
        .chunks_exact(2)
        .map(|pair| (nibble(pair[0]) << 4) | nibble(pair[1]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_b64() -> SecretString {
        SecretString::from(STANDARD.encode([7u8; 32]))
    }

    #[test]
    fn a_secret_round_trips_and_each_encryption_uses_a_fresh_nonce() {
        let cipher = SecretCipher::from_key(&key_b64()).unwrap();
        let secret = SecretString::from("Basic c2VjcmV0Og==");
        let a = cipher.encrypt(&secret, "T1").unwrap();
        let b = cipher.encrypt(&secret, "T1").unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("v1:"));
        assert!(!a.contains("c2VjcmV0Og"));
        assert_eq!(
            cipher.decrypt(&a, "T1").unwrap().expose_secret(),
            "Basic c2VjcmV0Og=="
        );
    }

    #[test]
    fn a_ring_opens_what_an_older_key_sealed_and_seals_with_the_newest() {
        let old = STANDARD.encode([7u8; 32]);
        let new = STANDARD.encode([9u8; 32]);
        let before = KeyRing::single(&SecretString::from(old.clone())).unwrap();
        let (id, sealed) = before
            .encrypt(&SecretString::from("Basic x"), "T1")
            .unwrap();
        assert_eq!(id, "k1");
        let ring = KeyRing::parse(&SecretString::from(format!("k2:{new},k1:{old}"))).unwrap();
        assert_eq!(
            ring.decrypt(&id, &sealed, "T1").unwrap().expose_secret(),
            "Basic x"
        );
        assert_eq!(
            ring.encrypt(&SecretString::from("y"), "T1").unwrap().0,
            "k2"
        );
        assert!(matches!(
            ring.decrypt("k9", &sealed, "T1"),
            Err(CipherError::UnknownKey(_))
        ));
        assert!(
            ring.fingerprints(&["h", "x"])
                .contains(&before.fingerprint(&["h", "x"]))
        );
        assert_ne!(ring.fingerprint(&["h", "x"]), ring.fingerprint(&["h", "y"]));
        assert!(!ring.fingerprint(&["h", "Basic x"]).contains("Basic"));
        for bad in [
            "",
            "nokey",
            &format!("a:{old},a:{new}"),
            &format!("bad id:{old}"),
        ] {
            assert!(KeyRing::parse(&SecretString::from(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hex_and_base64_forms_of_the_same_key_are_interchangeable() {
        let hex: String = [7u8; 32].iter().map(|b| format!("{b:02x}")).collect();
        let from_hex = SecretCipher::from_key(&SecretString::from(hex)).unwrap();
        let from_b64 = SecretCipher::from_key(&key_b64()).unwrap();
        let stored = from_hex.encrypt(&SecretString::from("x"), "T1").unwrap();
        assert_eq!(
            from_b64.decrypt(&stored, "T1").unwrap().expose_secret(),
            "x"
        );
    }

    #[test]
    fn bad_keys_are_refused_with_a_hint_to_generate_one() {
        for bad in [
            "",
            "   ",
            "short",
            "zz",
            &STANDARD.encode([1u8; 16]),
            &"g".repeat(64),
        ] {
            let err = SecretCipher::from_key(&SecretString::from(bad)).unwrap_err();
            assert!(
                err.to_string().contains("openssl rand -base64 32"),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn wrong_key_wrong_workspace_and_tampering_all_fail() {
        let cipher = SecretCipher::from_key(&key_b64()).unwrap();
        let other =
            SecretCipher::from_key(&SecretString::from(STANDARD.encode([8u8; 32]))).unwrap();
        let stored = cipher.encrypt(&SecretString::from("secret"), "T1").unwrap();
        assert!(matches!(
            other.decrypt(&stored, "T1"),
            Err(CipherError::Decrypt)
        ));
        assert!(matches!(
            cipher.decrypt(&stored, "T2"),
            Err(CipherError::Decrypt)
        ));
        let mut raw = STANDARD.decode(&stored[3..]).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        let tampered = format!("v1:{}", STANDARD.encode(raw));
        assert!(matches!(
            cipher.decrypt(&tampered, "T1"),
            Err(CipherError::Decrypt)
        ));
        for malformed in ["", "v2:abc", "v1:!!!", "v1:AAAA", "Basic c2VjcmV0Og=="] {
            assert!(matches!(
                cipher.decrypt(malformed, "T1"),
                Err(CipherError::Malformed)
            ));
        }
    }

    #[test]
    fn debug_shows_no_key_material() {
        let cipher = SecretCipher::from_key(&key_b64()).unwrap();
        assert_eq!(format!("{cipher:?}"), "SecretCipher { key: <redacted> }");
    }
}
