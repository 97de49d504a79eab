//! Encryption at rest for integration credentials (ChaCha20-Poly1305).
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
}

/// Encrypts and decrypts integration secrets with one key.
#[derive(Clone)]
pub struct SecretCipher {
    aead: ChaCha20Poly1305,
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
        Ok(Self { aead })
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
