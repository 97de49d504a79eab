//! Integration records: one per Slack workspace, stored in Redis with the Vitally auth
//! header encrypted, plus a short in-process cache for consumers.
//!
//! Layout under `{prefix}`:
//! - `{prefix}:integrations` — hash, field = workspace id, value = JSON record;
//! - `{prefix}:integrations:version` — counter bumped by every put/delete;
//! - channel `{prefix}:integrations:changed` — the workspace id of each change.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use redis::{AsyncCommands, aio::ConnectionManager};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::{
    client::{VitallyClient, VitallyHttp},
    crypto::{CipherError, SecretCipher},
};

/// How long a consumer trusts a cached record before re-reading it.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(2);

/// Where to write one trait (defined with the mapping that reads it).
pub use crate::mapping::FieldRef;

/// One workspace's connection to Vitally. `Debug` redacts the auth header.
#[derive(Debug, Clone)]
pub struct Integration {
    pub workspace_id: String,
    pub api_url: String,
    pub auth_header: SecretString,
    pub push_requests: bool,
    pub update_requests: bool,
    pub sync_threads: bool,
    pub auto_create_fields: bool,
    pub rate_budget_per_min: u32,
    /// Requests created before this are not synced (forward-only).
    pub established_at: DateTime<Utc>,
    pub custom_object_id: String,
    /// Trait label → where Vitally stores it.
    pub fields: BTreeMap<String, FieldRef>,
}

impl Integration {
    /// A client for this integration over the shared pool.
    pub fn client(&self, http: &VitallyHttp) -> VitallyClient {
        http.client(&self.api_url, self.auth_header.clone(), &self.workspace_id)
    }

    pub fn field(&self, label: &str) -> Option<&FieldRef> {
        self.fields.get(label)
    }

    /// The record for `show` / `list` output: everything but the credential.
    pub fn redacted(&self) -> Value {
        json!({
            "workspace_id": self.workspace_id,
            "api_url": self.api_url,
            "auth_header": redact_header(&self.auth_header),
            "push_requests": self.push_requests,
            "update_requests": self.update_requests,
            "sync_threads": self.sync_threads,
            "auto_create_fields": self.auto_create_fields,
            "rate_budget_per_min": self.rate_budget_per_min,
            "established_at": self.established_at,
            "custom_object_id": self.custom_object_id,
            "fields": self.fields,
        })
    }
}

/// Keeps the scheme word (`Basic`, `Bearer`) so an operator can tell what was pasted.
fn redact_header(header: &SecretString) -> String {
    let scheme = header
        .expose_secret()
        .split_whitespace()
        .next()
        .filter(|word| word.eq_ignore_ascii_case("basic") || word.eq_ignore_ascii_case("bearer"));
    match scheme {
        Some(scheme) => format!("{scheme} <redacted>"),
        None => "<redacted>".to_owned(),
    }
}

/// The record as stored: identical but for the encrypted header.
#[derive(Serialize, Deserialize)]
struct StoredIntegration {
    workspace_id: String,
    api_url: String,
    auth_header_enc: String,
    push_requests: bool,
    update_requests: bool,
    sync_threads: bool,
    auto_create_fields: bool,
    rate_budget_per_min: u32,
    established_at: DateTime<Utc>,
    custom_object_id: String,
    #[serde(default)]
    fields: BTreeMap<String, FieldRef>,
}

/// The parts of an earlier record that outlive a reconnect.
#[derive(Debug, Clone)]
pub(crate) struct PreviousConnection {
    pub(crate) established_at: DateTime<Utc>,
    pub(crate) custom_object_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("integration store unavailable: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("integration record for workspace {workspace} is unreadable: {reason}")]
    Corrupt { workspace: String, reason: String },
    #[error("integration record for workspace {workspace}: {source}")]
    Cipher {
        workspace: String,
        #[source]
        source: CipherError,
    },
}

/// Integration records in Redis. Cheap to clone.
#[derive(Clone)]
pub struct IntegrationStore {
    redis: ConnectionManager,
    prefix: String,
    cipher: Arc<SecretCipher>,
}

impl fmt::Debug for IntegrationStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IntegrationStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl IntegrationStore {
    /// The store every role reads, as configured: Redis at `REDIS_URL`, keys under
    /// `REDIS_PREFIX`, auth headers encrypted with `INTEGRATIONS_KEY` (required).
    pub async fn from_config(config: &thena_runtime::Config) -> anyhow::Result<Self> {
        use anyhow::Context;
        let key = config.require_integrations_key()?;
        let cipher = SecretCipher::from_key(&key).context("INTEGRATIONS_KEY")?;
        let redis = thena_runtime::redis::connect(&config.redis_url)
            .await
            .context("cannot connect to Redis (REDIS_URL)")?;
        Ok(Self::new(redis, &config.redis_prefix, cipher))
    }

    pub fn new(redis: ConnectionManager, key_prefix: &str, cipher: SecretCipher) -> Self {
        Self {
            redis,
            prefix: key_prefix.to_owned(),
            cipher: Arc::new(cipher),
        }
    }

    /// The hash holding every record.
    pub fn records_key(&self) -> String {
        format!("{}:integrations", self.prefix)
    }

    pub fn version_key(&self) -> String {
        format!("{}:integrations:version", self.prefix)
    }

    /// Pub/sub channel that carries the workspace id of every change.
    pub fn changes_channel(&self) -> String {
        format!("{}:integrations:changed", self.prefix)
    }

    pub async fn get(&self, workspace_id: &str) -> Result<Option<Integration>, StoreError> {
        let mut redis = self.redis.clone();
        let raw: Option<String> = redis.hget(self.records_key(), workspace_id).await?;
        raw.map(|raw| self.decode(workspace_id, &raw)).transpose()
    }

    /// Creates or replaces the record, then announces the change.
    pub async fn put(&self, integration: &Integration) -> Result<(), StoreError> {
        let ws = integration.workspace_id.as_str();
        let raw = self.encode(integration)?;
        let mut redis = self.redis.clone();
        let _: () = redis::pipe()
            .atomic()
            .hset(self.records_key(), ws, raw)
            .ignore()
            .incr(self.version_key(), 1)
            .ignore()
            .publish(self.changes_channel(), ws)
            .ignore()
            .query_async(&mut redis)
            .await?;
        Ok(())
    }

    /// Removes the record; `false` if there was none.
    pub async fn delete(&self, workspace_id: &str) -> Result<bool, StoreError> {
        let mut redis = self.redis.clone();
        let (removed,): (u64,) = redis::pipe()
            .atomic()
            .hdel(self.records_key(), workspace_id)
            .incr(self.version_key(), 1)
            .ignore()
            .publish(self.changes_channel(), workspace_id)
            .ignore()
            .query_async(&mut redis)
            .await?;
        Ok(removed > 0)
    }

    /// Every record, ordered by workspace id. An unreadable record fails the listing with
    /// its workspace named, so an operator can fix or remove it.
    pub async fn list(&self) -> Result<Vec<Integration>, StoreError> {
        let mut redis = self.redis.clone();
        let all: BTreeMap<String, String> = redis.hgetall(self.records_key()).await?;
        all.iter().map(|(ws, raw)| self.decode(ws, raw)).collect()
    }

    /// What a reconnect keeps from the earlier record, read without decrypting it, so a
    /// record written under a since-rotated key can still be replaced by connecting again.
    pub(crate) async fn previous_connection(
        &self,
        workspace_id: &str,
    ) -> Result<Option<PreviousConnection>, StoreError> {
        let mut redis = self.redis.clone();
        let raw: Option<String> = redis.hget(self.records_key(), workspace_id).await?;
        let Some(raw) = raw else {
            return Ok(None);
        };
        let stored: StoredIntegration =
            serde_json::from_str(&raw).map_err(|err| StoreError::Corrupt {
                workspace: workspace_id.to_owned(),
                reason: err.to_string(),
            })?;
        Ok(Some(PreviousConnection {
            established_at: stored.established_at,
            custom_object_id: stored.custom_object_id,
        }))
    }

    /// Bumped by every change; lets a reader tell that something moved.
    pub async fn version(&self) -> Result<u64, StoreError> {
        let mut redis = self.redis.clone();
        let version: Option<u64> = redis.get(self.version_key()).await?;
        Ok(version.unwrap_or(0))
    }

    fn encode(&self, i: &Integration) -> Result<String, StoreError> {
        let auth_header_enc = self
            .cipher
            .encrypt(&i.auth_header, &i.workspace_id)
            .map_err(|source| StoreError::Cipher {
                workspace: i.workspace_id.clone(),
                source,
            })?;
        let stored = StoredIntegration {
            workspace_id: i.workspace_id.clone(),
            api_url: i.api_url.clone(),
            auth_header_enc,
            push_requests: i.push_requests,
            update_requests: i.update_requests,
            sync_threads: i.sync_threads,
            auto_create_fields: i.auto_create_fields,
            rate_budget_per_min: i.rate_budget_per_min,
            established_at: i.established_at,
            custom_object_id: i.custom_object_id.clone(),
            fields: i.fields.clone(),
        };
        serde_json::to_string(&stored).map_err(|err| StoreError::Corrupt {
            workspace: i.workspace_id.clone(),
            reason: err.to_string(),
        })
    }

    fn decode(&self, workspace_id: &str, raw: &str) -> Result<Integration, StoreError> {
        let stored: StoredIntegration =
            serde_json::from_str(raw).map_err(|err| StoreError::Corrupt {
                workspace: workspace_id.to_owned(),
                reason: err.to_string(),
            })?;
        if stored.workspace_id != workspace_id {
            return Err(StoreError::Corrupt {
                workspace: workspace_id.to_owned(),
                reason: format!("record names workspace {}", stored.workspace_id),
            });
        }
        // The workspace id is the associated data: a header copied from another record
        // does not decrypt here.
        let auth_header = self
            .cipher
            .decrypt(&stored.auth_header_enc, workspace_id)
            .map_err(|source| StoreError::Cipher {
                workspace: workspace_id.to_owned(),
                source,
            })?;
        Ok(Integration {
            workspace_id: stored.workspace_id,
            api_url: stored.api_url,
            auth_header,
            push_requests: stored.push_requests,
            update_requests: stored.update_requests,
            sync_threads: stored.sync_threads,
            auto_create_fields: stored.auto_create_fields,
            rate_budget_per_min: stored.rate_budget_per_min,
            established_at: stored.established_at,
            custom_object_id: stored.custom_object_id,
            fields: stored.fields,
        })
    }
}

type CacheEntry = (Instant, Option<Arc<Integration>>);

/// Read-through cache of integration records for consumers: each record (or its
/// absence) is trusted for `ttl`, so a toggle change or disconnect is seen within it.
#[derive(Clone)]
pub struct IntegrationCache {
    store: IntegrationStore,
    ttl: Duration,
    entries: Arc<Mutex<HashMap<String, CacheEntry>>>,
}

impl fmt::Debug for IntegrationCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IntegrationCache")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl IntegrationCache {
    pub fn new(store: IntegrationStore, ttl: Duration) -> Self {
        Self {
            store,
            ttl,
            entries: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub fn store(&self) -> &IntegrationStore {
        &self.store
    }

    pub async fn get(&self, workspace_id: &str) -> Result<Option<Arc<Integration>>, StoreError> {
        if let Some(hit) = self.fresh(workspace_id) {
            return Ok(hit);
        }
        let loaded = self.store.get(workspace_id).await?.map(Arc::new);
        self.lock()
            .insert(workspace_id.to_owned(), (Instant::now(), loaded.clone()));
        Ok(loaded)
    }

    /// Forgets one workspace, e.g. after this process changed it.
    pub fn invalidate(&self, workspace_id: &str) {
        self.lock().remove(workspace_id);
    }

    pub fn invalidate_all(&self) {
        self.lock().clear();
    }

    fn fresh(&self, workspace_id: &str) -> Option<Option<Arc<Integration>>> {
        let entries = self.lock();
        let (loaded_at, value) = entries.get(workspace_id)?;
        (loaded_at.elapsed() < self.ttl).then(|| value.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CacheEntry>> {
        // A panic while holding the lock cannot leave the map inconsistent.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_redacted_view_keeps_the_scheme_and_hides_the_credential() {
        let integration = Integration {
            workspace_id: "T1".into(),
            api_url: "https://acme.rest.vitally.io".into(),
            auth_header: SecretString::from("Basic c2VjcmV0LWtleTo="),
            push_requests: true,
            update_requests: true,
            sync_threads: false,
            auto_create_fields: false,
            rate_budget_per_min: 600,
            established_at: Utc::now(),
            custom_object_id: "co1".into(),
            fields: BTreeMap::new(),
        };
        let shown = integration.redacted().to_string();
        assert!(shown.contains("\"Basic <redacted>\""), "{shown}");
        assert!(!shown.contains("c2VjcmV0"));
        assert!(!format!("{integration:?}").contains("c2VjcmV0"));
        assert_eq!(
            redact_header(&SecretString::from("c2VjcmV0LWtleTo=")),
            "<redacted>"
        );
    }
}
