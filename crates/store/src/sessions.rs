//! Operator console sessions: an admin token signs in once and the browser then holds a
//! random session id in a cookie. Only the id's SHA-256 is stored, with the session's
//! scope, its CSRF token and its expiry; signing out deletes the row.

use std::time::Duration;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{Db, DbError};

/// A signed-in session as the console sees it. `Debug` never shows the CSRF token.
#[derive(Clone)]
pub struct Session {
    /// `None`: every workspace; otherwise the one workspace this session may see.
    pub scope: Option<String>,
    csrf: SecretString,
    pub expires_at: DateTime<Utc>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("scope", &self.scope)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// The token every state-changing form of this session carries.
    pub fn csrf_token(&self) -> &str {
        self.csrf.expose_secret()
    }

    /// Whether `presented` is this session's CSRF token (constant time).
    pub fn csrf_matches(&self, presented: &str) -> bool {
        bool::from(
            presented
                .as_bytes()
                .ct_eq(self.csrf.expose_secret().as_bytes()),
        )
    }

    /// Whether this session may see `workspace`.
    pub fn sees(&self, workspace: &str) -> bool {
        self.scope.as_deref().is_none_or(|only| only == workspace)
    }
}

/// A new session: the cookie value (shown to the browser once) and the session.
pub struct Opened {
    pub cookie: SecretString,
    pub session: Session,
}

/// The console's sessions in PostgreSQL. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Sessions {
    db: Db,
}

impl Sessions {
    pub fn new(db: Db) -> Sessions {
        Sessions { db }
    }

    /// Opens a session for `ttl`; also removes sessions that expired (sign-ins are rare,
    /// so this is where the table is kept small).
    pub async fn open(&self, scope: Option<&str>, ttl: Duration) -> Result<Opened, DbError> {
        let cookie = random_token();
        let csrf = random_token();
        let ttl = chrono::Duration::from_std(ttl)
            .map_err(|_| DbError::Unavailable("session lifetime out of range".into()))?;
        let client = self.db.client().await?;
        client
            .execute("DELETE FROM console_sessions WHERE expires_at < now()", &[])
            .await?;
        let row = client
            .query_one(
                "INSERT INTO console_sessions (id_hash, scope, csrf, expires_at)
                 VALUES ($1, $2, $3, now() + $4::bigint * interval '1 millisecond')
                 RETURNING expires_at",
                &[
                    &hash(cookie.expose_secret()),
                    &scope,
                    &csrf.expose_secret(),
                    &ttl.num_milliseconds(),
                ],
            )
            .await?;
        Ok(Opened {
            cookie,
            session: Session {
                scope: scope.map(str::to_owned),
                csrf,
                expires_at: row.get(0),
            },
        })
    }

    /// The live session a cookie names, if any (an expired one is `None`).
    pub async fn get(&self, cookie: &str) -> Result<Option<Session>, DbError> {
        let client = self.db.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT scope, csrf, expires_at FROM console_sessions
                 WHERE id_hash = $1 AND expires_at > now()",
            )
            .await?;
        let row = client.query_opt(&statement, &[&hash(cookie)]).await?;
        Ok(row.map(|row| Session {
            scope: row.get(0),
            csrf: SecretString::from(row.get::<_, String>(1)),
            expires_at: row.get(2),
        }))
    }

    /// Signs a session out; `false` if it was not there.
    pub async fn close(&self, cookie: &str) -> Result<bool, DbError> {
        let client = self.db.client().await?;
        let removed = client
            .execute(
                "DELETE FROM console_sessions WHERE id_hash = $1",
                &[&hash(cookie)],
            )
            .await?;
        Ok(removed == 1)
    }
}

/// 256 random bits, URL-safe.
fn random_token() -> SecretString {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    SecretString::from(URL_SAFE_NO_PAD.encode(bytes))
}

fn hash(cookie: &str) -> String {
    let digest = Sha256::digest(cookie.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(scope: Option<&str>) -> Session {
        Session {
            scope: scope.map(str::to_owned),
            csrf: SecretString::from("csrf-123"),
            expires_at: Utc::now(),
        }
    }

    #[test]
    fn a_scoped_session_sees_only_its_workspace() {
        assert!(session(None).sees("T1"));
        assert!(session(Some("T1")).sees("T1"));
        assert!(!session(Some("T1")).sees("T2"));
    }

    #[test]
    fn the_csrf_token_matches_only_itself_and_never_prints() {
        let s = session(None);
        assert!(s.csrf_matches("csrf-123"));
        assert!(!s.csrf_matches("csrf-12"));
        assert!(!s.csrf_matches(""));
        assert!(!format!("{s:?}").contains("csrf-123"));
    }

    #[test]
    fn tokens_are_long_random_and_stored_only_as_a_hash() {
        let a = random_token();
        let b = random_token();
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert_eq!(a.expose_secret().len(), 43);
        assert_eq!(hash(a.expose_secret()).len(), 64);
        assert_ne!(hash(a.expose_secret()), *a.expose_secret());
    }
}
