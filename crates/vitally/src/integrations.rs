//! Integration records: one per Slack workspace, in PostgreSQL (the system of record),
//! with the Vitally auth header sealed by the deployment's key ring, a history row for
//! every change, and a `NOTIFY` on commit so every consumer's cache drops the old copy
//! at once ([`IntegrationCache`]).

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::{Value, json};
use thena_store::{Db, DbError, notify, tokio_postgres::Row};
use tokio::time::Instant;

use crate::{
    client::{VitallyClient, VitallyHttp},
    crypto::{CipherError, KeyRing},
};

/// How long a consumer trusts a cached record when no change notification arrives.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(30);

/// A workspace's record as PostgreSQL holds it, read past every cache.
#[derive(Debug, Clone)]
pub enum Connection {
    Connected(Arc<Integration>),
    /// Connected once and disconnected since (the row and its `established_at` remain).
    Disconnected,
    /// No record at all: nobody ever connected the workspace.
    Never,
    /// A connect (of any workspace: they run one at a time) has not committed yet.
    Connecting,
}

/// Where to write one trait (defined with the mapping that reads it).
pub use crate::mapping::FieldRef;

/// Whether Vitally accepts this integration's calls. A paused integration's events are
/// held in the broker, not parked, and flow again once it heals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Healthy,
    /// Vitally answered 401/403: the key was rotated or revoked.
    AuthRejected,
    /// The "Thena Requests" object is gone from Vitally.
    ObjectMissing,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::AuthRejected => "auth_rejected",
            Health::ObjectMissing => "object_missing",
        }
    }

    fn parse(raw: &str) -> Option<Health> {
        [Health::Healthy, Health::AuthRejected, Health::ObjectMissing]
            .into_iter()
            .find(|h| h.as_str() == raw)
    }

    /// `healthy` or `paused: <why>`, as operators read it.
    pub fn describe(self) -> String {
        match self {
            Health::Healthy => "healthy".to_owned(),
            paused => format!("paused: {}", paused.as_str()),
        }
    }
}

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
    /// When `fields` was last read from Vitally.
    pub fields_refreshed_at: DateTime<Utc>,
    /// Keyed fingerprint of (API host, auth header); also the fleet-wide budget's key.
    pub fingerprint: String,
    pub health: Health,
    pub health_detail: Option<String>,
    pub health_changed_at: DateTime<Utc>,
    pub connected_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Bumped by every stored change.
    pub revision: i64,
}

impl Integration {
    /// A client for this integration over the shared pool.
    pub fn client(&self, http: &VitallyHttp) -> VitallyClient {
        http.client(&self.api_url, self.auth_header.clone(), &self.workspace_id)
    }

    pub fn field(&self, label: &str) -> Option<&FieldRef> {
        self.fields.get(label)
    }

    /// The key of the fleet-wide rate budget: one per Vitally key, whatever the workspace.
    pub fn budget_key(&self) -> &str {
        &self.fingerprint
    }

    /// The record for `show` / `list` output: everything but the credential.
    pub fn redacted(&self) -> Value {
        let mut view = settings_view(self);
        let extra = json!({
            "api_url": self.api_url,
            "auth_header": redact_header(&self.auth_header),
            "custom_object_id": self.custom_object_id,
            "fields_refreshed_at": self.fields_refreshed_at,
            "health": self.health.describe(),
            "health_detail": self.health_detail,
            "health_changed_at": self.health_changed_at,
            "connected_at": self.connected_at,
            "updated_at": self.updated_at,
            "revision": self.revision,
        });
        if let (Some(view), Value::Object(extra)) = (view.as_object_mut(), extra) {
            view.extend(extra);
        }
        view
    }
}

/// The settings an operator changes, as history records them.
fn settings_view(i: &Integration) -> Value {
    json!({
        "workspace_id": i.workspace_id,
        "push_requests": i.push_requests,
        "update_requests": i.update_requests,
        "sync_threads": i.sync_threads,
        "auto_create_fields": i.auto_create_fields,
        "rate_budget_per_min": i.rate_budget_per_min,
        "established_at": i.established_at,
        "fields": i.fields,
    })
}

/// `{"setting": {"from": …, "to": …}}` for every setting that differs.
pub fn diff(before: &Value, after: &Value) -> Value {
    let empty = serde_json::Map::new();
    let before = before.as_object().unwrap_or(&empty);
    let mut changes = serde_json::Map::new();
    for (key, to) in after.as_object().unwrap_or(&empty) {
        let from = before.get(key).unwrap_or(&Value::Null);
        if from != to {
            changes.insert(key.clone(), json!({"from": from, "to": to}));
        }
    }
    Value::Object(changes)
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

/// The parts of an earlier record (connected or not) that outlive a reconnect.
#[derive(Debug, Clone)]
pub struct PreviousConnection {
    pub established_at: DateTime<Utc>,
    pub custom_object_id: String,
    pub disconnected: bool,
}

/// One row of an integration's history. Never holds a secret.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryEntry {
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub changes: Value,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("integration store: {0}")]
    Db(#[from] DbError),
    #[error("integration record for workspace {workspace} is unreadable: {reason}")]
    Corrupt { workspace: String, reason: String },
    #[error("integration record for workspace {workspace}: {source}")]
    Cipher {
        workspace: String,
        #[source]
        source: CipherError,
    },
}

impl From<thena_store::tokio_postgres::Error> for StoreError {
    fn from(error: thena_store::tokio_postgres::Error) -> Self {
        StoreError::Db(DbError::Query(error))
    }
}

impl StoreError {
    /// This replica cannot open the record's auth header (another key, a lost key).
    pub fn is_undecryptable(&self) -> bool {
        matches!(self, StoreError::Cipher { .. })
    }
}

const COLUMNS: &str = "workspace_id, api_url, auth_key_id, auth_header_enc, fingerprint, \
     push_requests, update_requests, sync_threads, auto_create_fields, rate_budget_per_min, \
     established_at, custom_object_id, fields, fields_refreshed_at, health, health_detail, \
     health_changed_at, connected_at, updated_at, revision";

/// Integration records in PostgreSQL. Cheap to clone.
#[derive(Clone)]
pub struct IntegrationStore {
    db: Db,
    keys: Arc<KeyRing>,
}

impl fmt::Debug for IntegrationStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IntegrationStore")
            .field("schema", &self.db.schema())
            .finish_non_exhaustive()
    }
}

/// Held while one connect runs; dropping it (even by a panic or a cancelled request)
/// closes its connection, which releases the lock.
pub struct ConnectLock {
    connection: thena_store::Detached,
    key: String,
}

impl ConnectLock {
    /// Releases the lock now. Dropping releases it too, but only once the server saw
    /// the connection close: until then consumers would still see a connect under way.
    pub async fn release(self) {
        if let Err(e) = self
            .connection
            .execute(
                "SELECT pg_advisory_unlock(hashtextextended($1, 0))",
                &[&self.key],
            )
            .await
        {
            tracing::debug!(error = %e, "connect lock released by closing its connection");
        }
    }
}

impl IntegrationStore {
    /// The store every role reads, as configured: PostgreSQL at `DATABASE_URL` (migrated
    /// on connect), headers sealed with `INTEGRATIONS_KEYS` / `INTEGRATIONS_KEY`.
    pub async fn from_config(config: &thena_runtime::Config) -> anyhow::Result<Self> {
        use anyhow::Context;
        let (is_ring, key) = config.require_integrations_keys()?;
        let keys = if is_ring {
            KeyRing::parse(&key).context("INTEGRATIONS_KEYS")?
        } else {
            KeyRing::single(&key).context("INTEGRATIONS_KEY")?
        };
        let db = Db::connect(&config.database_url, &config.database_schema)
            .await
            .context("cannot open PostgreSQL (DATABASE_URL)")?;
        Ok(Self::new(db, keys))
    }

    pub fn new(db: Db, keys: KeyRing) -> Self {
        Self {
            db,
            keys: Arc::new(keys),
        }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn keys(&self) -> &KeyRing {
        &self.keys
    }

    /// The `NOTIFY` channel carrying the workspace id of every change.
    pub fn changes_channel(&self) -> String {
        notify::channel(&self.db, "integrations")
    }

    /// The connected record of `workspace_id` (a disconnected one is `None`).
    pub async fn get(&self, workspace_id: &str) -> Result<Option<Integration>, StoreError> {
        let client = self.db.client().await.map_err(StoreError::Db)?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT {COLUMNS} FROM integrations
                     WHERE workspace_id = $1 AND disconnected_at IS NULL"
                ),
                &[&workspace_id],
            )
            .await?;
        row.map(|row| self.decode(&row)).transpose()
    }

    /// The workspace's record, read under the connect lock in shared mode: while a
    /// connect is under way (it holds the lock until its record committed) the answer is
    /// `Connecting`, so `Never` is only said of a workspace nobody was connecting at
    /// that moment. It does not wait for the lock: a pooled connection is not held
    /// through someone else's connect.
    pub async fn connection(&self, workspace_id: &str) -> Result<Connection, StoreError> {
        let mut client = self.db.client().await.map_err(StoreError::Db)?;
        let tx = client.transaction().await?;
        let free: bool = tx
            .query_one(
                "SELECT pg_try_advisory_xact_lock_shared(hashtextextended($1, 0))",
                &[&self.connect_lock()],
            )
            .await?
            .get(0);
        if !free {
            return Ok(Connection::Connecting);
        }
        let row = tx
            .query_opt(
                &format!(
                    "SELECT {COLUMNS}, disconnected_at IS NOT NULL AS disconnected
                     FROM integrations WHERE workspace_id = $1"
                ),
                &[&workspace_id],
            )
            .await?;
        tx.commit().await?;
        match row {
            None => Ok(Connection::Never),
            Some(row) if row.get::<_, bool>("disconnected") => Ok(Connection::Disconnected),
            Some(row) => Ok(Connection::Connected(Arc::new(self.decode(&row)?))),
        }
    }

    /// Every connected record, ordered by workspace id. An unreadable record fails the
    /// listing with its workspace named; [`Self::views`] lists around it.
    pub async fn list(&self) -> Result<Vec<Integration>, StoreError> {
        self.rows()
            .await?
            .iter()
            .map(|row| self.decode(row))
            .collect()
    }

    /// Every connected record as operators see it: a record this replica cannot decrypt
    /// is listed as `paused: key_undecryptable` instead of failing the list.
    pub async fn views(&self) -> Result<Vec<Value>, StoreError> {
        Ok(self
            .rows()
            .await?
            .iter()
            .map(|row| match self.decode(row) {
                Ok(integration) => integration.redacted(),
                Err(error) => json!({
                    "workspace_id": row.get::<_, String>("workspace_id"),
                    "api_url": row.get::<_, String>("api_url"),
                    "health": "paused: key_undecryptable",
                    "health_detail": error.to_string(),
                }),
            })
            .collect())
    }

    /// The budget key (fingerprint) of every connected workspace: what the limiter's
    /// figures are kept under.
    pub async fn budget_keys(&self) -> Result<HashMap<String, String>, StoreError> {
        let client = self.db.client().await.map_err(StoreError::Db)?;
        let rows = client
            .query(
                "SELECT workspace_id, fingerprint FROM integrations WHERE disconnected_at IS NULL",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Connected integrations that are paused, for the health probe (records this replica
    /// cannot decrypt are left to a replica that can).
    pub async fn paused(&self) -> Result<Vec<Integration>, StoreError> {
        Ok(self
            .rows()
            .await?
            .iter()
            .filter(|row| row.get::<_, String>("health") != Health::Healthy.as_str())
            .filter_map(|row| self.decode(row).ok())
            .collect())
    }

    /// Workspaces whose auth header this replica cannot open (a missing or wrong key).
    pub async fn undecryptable(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .rows()
            .await?
            .iter()
            .filter(|row| self.decode(row).is_err())
            .map(|row| row.get::<_, String>("workspace_id"))
            .collect())
    }

    async fn rows(&self) -> Result<Vec<Row>, StoreError> {
        let client = self.db.client().await.map_err(StoreError::Db)?;
        Ok(client
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM integrations WHERE disconnected_at IS NULL
                     ORDER BY workspace_id"
                ),
                &[],
            )
            .await?)
    }

    /// What a reconnect keeps from an earlier record, connected or disconnected, read
    /// without decrypting it (so a record sealed by a lost key can still be replaced).
    pub async fn previous_connection(
        &self,
        workspace_id: &str,
    ) -> Result<Option<PreviousConnection>, StoreError> {
        let client = self.db.client().await.map_err(StoreError::Db)?;
        let row = client
            .query_opt(
                "SELECT established_at, custom_object_id, disconnected_at IS NOT NULL
                 FROM integrations WHERE workspace_id = $1",
                &[&workspace_id],
            )
            .await?;
        Ok(row.map(|row| PreviousConnection {
            established_at: row.get(0),
            custom_object_id: row.get(1),
            disconnected: row.get(2),
        }))
    }

    /// The fingerprints one Vitally key has under every key of the ring.
    pub fn fingerprints(&self, api_url: &str, auth_header: &SecretString) -> Vec<String> {
        self.keys
            .fingerprints(&fingerprint_parts(api_url, auth_header))
    }

    /// Another connected workspace already using the Vitally behind `fingerprints`.
    pub async fn connected_elsewhere(
        &self,
        workspace_id: &str,
        fingerprints: &[String],
    ) -> Result<Option<String>, StoreError> {
        let client = self.db.client().await.map_err(StoreError::Db)?;
        let row = client
            .query_opt(
                "SELECT workspace_id FROM integrations
                 WHERE fingerprint = ANY($1) AND workspace_id <> $2 AND disconnected_at IS NULL
                 ORDER BY workspace_id LIMIT 1",
                &[&fingerprints, &workspace_id],
            )
            .await?;
        Ok(row.map(|row| row.get(0)))
    }

    /// The advisory lock (by name) a connect holds from before its first Vitally call
    /// until after its record committed.
    pub fn connect_lock(&self) -> String {
        format!("{}:connect", self.db.schema())
    }

    /// Serialises connects fleet-wide (they are rare, and both "one object per
    /// workspace" and "one workspace per Vitally" need a check-then-write).
    pub async fn lock_connects(&self) -> Result<ConnectLock, StoreError> {
        let object = self.db.client().await.map_err(StoreError::Db)?;
        // Out of the pool: closing this connection is what releases the lock.
        let client = thena_store::detach(object);
        client.batch_execute("SET lock_timeout = '60s'").await?;
        client
            .execute(
                "SELECT pg_advisory_lock(hashtextextended($1, 0))",
                &[&self.connect_lock()],
            )
            .await?;
        Ok(ConnectLock {
            connection: client,
            key: self.connect_lock(),
        })
    }

    /// Stores a (re)connected record, healthy, and records `action` in the history.
    /// Returns the record as stored (its revision, times).
    pub async fn save_connection(
        &self,
        integration: &Integration,
        actor: &str,
        action: &str,
        details: Value,
    ) -> Result<Integration, StoreError> {
        let ws = integration.workspace_id.as_str();
        let (key_id, sealed) =
            self.keys
                .encrypt(&integration.auth_header, ws)
                .map_err(|source| StoreError::Cipher {
                    workspace: ws.to_owned(),
                    source,
                })?;
        let fingerprint = self.keys.fingerprint(&fingerprint_parts(
            &integration.api_url,
            &integration.auth_header,
        ));
        let fields = serde_json::to_value(&integration.fields).map_err(|e| corrupt(ws, e))?;
        let mut client = self.db.client().await.map_err(StoreError::Db)?;
        let tx = client.transaction().await?;
        let before = tx
            .query_opt(
                &format!("SELECT {COLUMNS} FROM integrations WHERE workspace_id = $1 FOR UPDATE"),
                &[&ws],
            )
            .await?
            .and_then(|row| self.decode(&row).ok())
            .map(|i| settings_view(&i));
        let row = tx
            .query_one(
                &format!(
                    "INSERT INTO integrations (workspace_id, api_url, auth_key_id, auth_header_enc,
                        fingerprint, push_requests, update_requests, sync_threads,
                        auto_create_fields, rate_budget_per_min, established_at,
                        custom_object_id, fields)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
                     ON CONFLICT (workspace_id) DO UPDATE SET
                        api_url = EXCLUDED.api_url, auth_key_id = EXCLUDED.auth_key_id,
                        auth_header_enc = EXCLUDED.auth_header_enc,
                        fingerprint = EXCLUDED.fingerprint,
                        push_requests = EXCLUDED.push_requests,
                        update_requests = EXCLUDED.update_requests,
                        sync_threads = EXCLUDED.sync_threads,
                        auto_create_fields = EXCLUDED.auto_create_fields,
                        rate_budget_per_min = EXCLUDED.rate_budget_per_min,
                        established_at = EXCLUDED.established_at,
                        custom_object_id = EXCLUDED.custom_object_id,
                        fields = EXCLUDED.fields, fields_refreshed_at = now(),
                        health = 'healthy', health_detail = NULL,
                        health_changed_at = CASE WHEN integrations.health = 'healthy'
                            THEN integrations.health_changed_at ELSE now() END,
                        connected_at = CASE WHEN integrations.disconnected_at IS NULL
                            THEN integrations.connected_at ELSE now() END,
                        disconnected_at = NULL, updated_at = now(),
                        revision = integrations.revision + 1
                     RETURNING {COLUMNS}"
                ),
                &[
                    &ws,
                    &integration.api_url,
                    &key_id,
                    &sealed,
                    &fingerprint,
                    &integration.push_requests,
                    &integration.update_requests,
                    &integration.sync_threads,
                    &integration.auto_create_fields,
                    &(integration.rate_budget_per_min as i32),
                    &integration.established_at,
                    &integration.custom_object_id,
                    &fields,
                ],
            )
            .await?;
        let stored = self.decode(&row)?;
        let mut changes = diff(&before.unwrap_or(Value::Null), &settings_view(&stored));
        if let (Some(changes), Value::Object(details)) = (changes.as_object_mut(), details) {
            changes.extend(details);
        }
        self.commit_change(tx, ws, actor, action, &changes).await?;
        Ok(stored)
    }

    /// Changes a connected record under a row lock: `change` edits it (and may refuse);
    /// if anything differs, the new settings are stored, the difference is written to the
    /// history as `action`, and consumers are told. `None` if not connected.
    pub async fn modify<E: From<StoreError>>(
        &self,
        workspace_id: &str,
        actor: &str,
        action: &str,
        change: impl FnOnce(&mut Integration) -> Result<(), E>,
    ) -> Result<Option<(Integration, Value)>, E> {
        let mut client = self
            .db
            .client()
            .await
            .map_err(|e| E::from(StoreError::Db(e)))?;
        let tx = client.transaction().await.map_err(|e| E::from(e.into()))?;
        let row = tx
            .query_opt(
                &format!(
                    "SELECT {COLUMNS} FROM integrations
                     WHERE workspace_id = $1 AND disconnected_at IS NULL FOR UPDATE"
                ),
                &[&workspace_id],
            )
            .await
            .map_err(|e| E::from(e.into()))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let mut integration = self.decode(&row)?;
        let before = settings_view(&integration);
        change(&mut integration)?;
        let changes = diff(&before, &settings_view(&integration));
        if changes.as_object().is_none_or(|c| c.is_empty()) {
            return Ok(Some((integration, changes)));
        }
        let fields = serde_json::to_value(&integration.fields)
            .map_err(|e| E::from(corrupt(workspace_id, e)))?;
        let row = tx
            .query_one(
                &format!(
                    "UPDATE integrations SET push_requests = $2, update_requests = $3,
                        sync_threads = $4, auto_create_fields = $5, rate_budget_per_min = $6,
                        established_at = $7, fields = $8, fields_refreshed_at = $9,
                        updated_at = now(), revision = revision + 1
                     WHERE workspace_id = $1 RETURNING {COLUMNS}"
                ),
                &[
                    &workspace_id,
                    &integration.push_requests,
                    &integration.update_requests,
                    &integration.sync_threads,
                    &integration.auto_create_fields,
                    &(integration.rate_budget_per_min as i32),
                    &integration.established_at,
                    &fields,
                    &integration.fields_refreshed_at,
                ],
            )
            .await
            .map_err(|e| E::from(e.into()))?;
        let stored = self.decode(&row)?;
        self.commit_change(tx, workspace_id, actor, action, &changes)
            .await?;
        Ok(Some((stored, changes)))
    }

    /// Notes that the field map was just re-read from Vitally, without a history row
    /// when nothing changed.
    pub async fn touch_fields(&self, workspace_id: &str) -> Result<(), StoreError> {
        let client = self.db.client().await.map_err(StoreError::Db)?;
        client
            .execute(
                "UPDATE integrations SET fields_refreshed_at = now() WHERE workspace_id = $1",
                &[&workspace_id],
            )
            .await?;
        Ok(())
    }

    /// Moves a connected integration to `health`. With `seen_revision`, only if the record
    /// is still the one the caller used (a pause seen with an old key must not pause a
    /// record just reconnected with a new one). `true` if it changed.
    pub async fn set_health(
        &self,
        workspace_id: &str,
        seen_revision: Option<i64>,
        health: Health,
        detail: Option<&str>,
        actor: &str,
    ) -> Result<bool, StoreError> {
        let mut client = self.db.client().await.map_err(StoreError::Db)?;
        let tx = client.transaction().await?;
        let changed = tx
            .query_opt(
                "UPDATE integrations SET health = $3, health_detail = $4,
                    health_changed_at = now(), updated_at = now(), revision = revision + 1
                 WHERE workspace_id = $1 AND disconnected_at IS NULL AND health <> $3
                   AND ($2::bigint IS NULL OR revision = $2)
                 RETURNING health",
                &[&workspace_id, &seen_revision, &health.as_str(), &detail],
            )
            .await?;
        if changed.is_none() {
            return Ok(false);
        }
        let action = match health {
            Health::Healthy => "resumed",
            Health::AuthRejected | Health::ObjectMissing => "paused",
        };
        let changes = json!({"health": health.describe(), "detail": detail});
        self.commit_change(tx, workspace_id, actor, action, &changes)
            .await?;
        Ok(true)
    }

    /// Soft delete: events stop syncing, and the row keeps `established_at` so a later
    /// reconnect never widens the forward-only window. `false` if it was not connected.
    pub async fn disconnect(&self, workspace_id: &str, actor: &str) -> Result<bool, StoreError> {
        let mut client = self.db.client().await.map_err(StoreError::Db)?;
        let tx = client.transaction().await?;
        let changed = tx
            .execute(
                "UPDATE integrations SET disconnected_at = now(), updated_at = now(),
                    revision = revision + 1
                 WHERE workspace_id = $1 AND disconnected_at IS NULL",
                &[&workspace_id],
            )
            .await?;
        if changed == 0 {
            return Ok(false);
        }
        self.commit_change(tx, workspace_id, actor, "disconnected", &json!({}))
            .await?;
        Ok(true)
    }

    /// The newest `limit` history rows of a workspace, oldest first.
    pub async fn history(
        &self,
        workspace_id: &str,
        limit: i64,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        let client = self.db.client().await.map_err(StoreError::Db)?;
        let rows = client
            .query(
                "SELECT at, actor, action, changes FROM (
                    SELECT id, at, actor, action, changes FROM integration_events
                    WHERE workspace_id = $1 ORDER BY id DESC LIMIT $2) newest
                 ORDER BY id",
                &[&workspace_id, &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| HistoryEntry {
                at: row.get(0),
                actor: row.get(1),
                action: row.get(2),
                changes: row.get(3),
            })
            .collect())
    }

    /// Re-seals every record not under the newest key (after adding one to the ring), and
    /// re-computes its fingerprint under it. Returns how many moved.
    pub async fn reencrypt(&self, actor: &str) -> Result<usize, StoreError> {
        let primary = self.keys.primary_id().to_owned();
        let client = self.db.client().await.map_err(StoreError::Db)?;
        let stale: Vec<String> = client
            .query(
                "SELECT workspace_id FROM integrations WHERE auth_key_id <> $1",
                &[&primary],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        drop(client);
        let mut moved = 0;
        for ws in stale {
            let mut client = self.db.client().await.map_err(StoreError::Db)?;
            let tx = client.transaction().await?;
            let Some(row) = tx
                .query_opt(
                    &format!(
                        "SELECT {COLUMNS} FROM integrations WHERE workspace_id = $1 FOR UPDATE"
                    ),
                    &[&ws],
                )
                .await?
            else {
                continue;
            };
            let integration = self.decode(&row)?;
            let (key_id, sealed) =
                self.keys
                    .encrypt(&integration.auth_header, &ws)
                    .map_err(|source| StoreError::Cipher {
                        workspace: ws.clone(),
                        source,
                    })?;
            let fingerprint = self.keys.fingerprint(&fingerprint_parts(
                &integration.api_url,
                &integration.auth_header,
            ));
            let from: String = row.get("auth_key_id");
            tx.execute(
                "UPDATE integrations SET auth_key_id = $2, auth_header_enc = $3,
                    fingerprint = $4, updated_at = now(), revision = revision + 1
                 WHERE workspace_id = $1",
                &[&ws, &key_id, &sealed, &fingerprint],
            )
            .await?;
            let changes = json!({"key_id": {"from": from, "to": key_id}});
            self.commit_change(tx, &ws, actor, "reencrypted", &changes)
                .await?;
            moved += 1;
        }
        Ok(moved)
    }

    /// The end of every change: its history row, the notification (sent on commit), the
    /// commit.
    async fn commit_change(
        &self,
        tx: thena_store::Transaction<'_>,
        workspace_id: &str,
        actor: &str,
        action: &str,
        changes: &Value,
    ) -> Result<(), StoreError> {
        tx.execute(
            "INSERT INTO integration_events (workspace_id, actor, action, changes)
             VALUES ($1, $2, $3, $4)",
            &[&workspace_id, &actor, &action, changes],
        )
        .await?;
        notify::notify(&tx, &self.changes_channel(), workspace_id)
            .await
            .map_err(StoreError::Db)?;
        tx.commit().await?;
        Ok(())
    }

    fn decode(&self, row: &Row) -> Result<Integration, StoreError> {
        let ws: String = row.get("workspace_id");
        let fields: Value = row.get("fields");
        let fields = serde_json::from_value(fields).map_err(|e| corrupt(&ws, e))?;
        let health: String = row.get("health");
        let health = Health::parse(&health).ok_or_else(|| StoreError::Corrupt {
            workspace: ws.clone(),
            reason: format!("unknown health {health:?}"),
        })?;
        // The workspace id is the associated data: a header copied from another record
        // does not decrypt here.
        let key_id: String = row.get("auth_key_id");
        let sealed: String = row.get("auth_header_enc");
        let auth_header =
            self.keys
                .decrypt(&key_id, &sealed, &ws)
                .map_err(|source| StoreError::Cipher {
                    workspace: ws.clone(),
                    source,
                })?;
        Ok(Integration {
            api_url: row.get("api_url"),
            auth_header,
            push_requests: row.get("push_requests"),
            update_requests: row.get("update_requests"),
            sync_threads: row.get("sync_threads"),
            auto_create_fields: row.get("auto_create_fields"),
            rate_budget_per_min: row.get::<_, i32>("rate_budget_per_min") as u32,
            established_at: row.get("established_at"),
            custom_object_id: row.get("custom_object_id"),
            fields,
            fields_refreshed_at: row.get("fields_refreshed_at"),
            fingerprint: row.get("fingerprint"),
            health,
            health_detail: row.get("health_detail"),
            health_changed_at: row.get("health_changed_at"),
            connected_at: row.get("connected_at"),
            updated_at: row.get("updated_at"),
            revision: row.get("revision"),
            workspace_id: ws,
        })
    }
}

/// What identifies one Vitally key: the API host and the header.
fn fingerprint_parts<'a>(api_url: &'a str, auth_header: &'a SecretString) -> [&'a str; 2] {
    let host = api_url
        .split_once("://")
        .map_or(api_url, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    [host, auth_header.expose_secret().trim()]
}

fn corrupt(workspace: &str, error: impl fmt::Display) -> StoreError {
    StoreError::Corrupt {
        workspace: workspace.to_owned(),
        reason: error.to_string(),
    }
}

type CacheEntry = (Instant, Option<Arc<Integration>>);

/// Read-through cache of integration records for consumers. A change notification drops
/// the entry at once ([`IntegrationCache::follow_changes`]); `ttl` is only the backstop
/// for a notification lost while the listener reconnected.
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

    /// Reads the workspace past the cache ([`IntegrationStore::connection`]) and keeps
    /// what it found.
    pub async fn reread(&self, workspace_id: &str) -> Result<Connection, StoreError> {
        let connection = self.store.connection(workspace_id).await?;
        let found = match &connection {
            Connection::Connected(integration) => Some(integration.clone()),
            Connection::Disconnected | Connection::Never => None,
            // Nothing learnt yet.
            Connection::Connecting => return Ok(connection),
        };
        self.lock()
            .insert(workspace_id.to_owned(), (Instant::now(), found));
        Ok(connection)
    }

    /// Forgets one workspace, e.g. after this process changed it.
    pub fn invalidate(&self, workspace_id: &str) {
        self.lock().remove(workspace_id);
    }

    pub fn invalidate_all(&self) {
        self.lock().clear();
    }

    /// Drops cached records as their change notifications arrive, until `shutdown`.
    pub fn follow_changes(&self, shutdown: tokio_util::sync::CancellationToken) {
        let mut notices = notify::listen(self.store.db(), self.store.changes_channel(), shutdown);
        let cache = self.clone();
        tokio::spawn(async move {
            while let Some(notice) = notices.recv().await {
                match notice {
                    notify::Notice::Changed(workspace_id) => cache.invalidate(&workspace_id),
                    notify::Notice::Resync => cache.invalidate_all(),
                }
            }
        });
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
    fn the_redacted_header_keeps_the_scheme_and_hides_the_credential() {
        assert_eq!(
            redact_header(&SecretString::from("Basic c2VjcmV0LWtleTo=")),
            "Basic <redacted>"
        );
        assert_eq!(
            redact_header(&SecretString::from("c2VjcmV0LWtleTo=")),
            "<redacted>"
        );
    }

    #[test]
    fn a_diff_names_each_changed_setting_with_both_values() {
        let before = json!({"push_requests": true, "rate_budget_per_min": 600});
        let after = json!({"push_requests": false, "rate_budget_per_min": 600});
        assert_eq!(
            diff(&before, &after),
            json!({"push_requests": {"from": true, "to": false}})
        );
        assert_eq!(diff(&after, &after), json!({}));
    }

    #[test]
    fn the_fingerprint_is_of_the_host_and_header_only() {
        let header = SecretString::from(" Basic abc ");
        assert_eq!(
            fingerprint_parts("https://acme.rest.vitally.io/", &header),
            ["acme.rest.vitally.io", "Basic abc"]
        );
        assert_eq!(
            fingerprint_parts("http://127.0.0.1:9/x", &header)[0],
            "127.0.0.1:9"
        );
    }
}
