//! PostgreSQL, the control plane's system of record.
//!
//! Redis holds only what may be lost (caches, locks, the limiter, the hot copy of the
//! version guard); PostgreSQL holds what may not: integration records and their history,
//! and the newest version of each request Vitally has. One [`Db`] per process: a small
//! pool whose connections all use the deployment's schema (`DATABASE_SCHEMA`), so tests
//! and demo runs each get their own schema in one database and drop it afterwards.

pub mod backfill;
pub mod dead_letters;
pub mod ledger;
pub mod migrate;
pub mod notify;
pub mod sessions;

use std::{fmt, time::Duration};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use secrecy::{ExposeSecret, SecretString};
use tokio_postgres::{NoTls, error::SqlState};

pub use deadpool_postgres::{GenericClient, Transaction};
pub use tokio_postgres;

/// A connection taken out of the pool for good: closing it (dropping this) ends its
/// session, and with it any session-level lock it held.
pub type Detached = deadpool_postgres::ClientWrapper;

pub fn detach(connection: Object) -> Detached {
    Object::take(connection)
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("DATABASE_URL is not a valid PostgreSQL URL")]
    InvalidUrl,
    #[error("DATABASE_SCHEMA {0:?} is invalid: use lowercase letters, digits and _")]
    InvalidSchema(String),
    #[error("PostgreSQL unavailable: {0}")]
    Unavailable(String),
    #[error("PostgreSQL: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("migration: {0}")]
    Migration(String),
}

impl DbError {
    /// Whether PostgreSQL refused a write because of a unique index.
    pub fn is_unique_violation(&self) -> bool {
        matches!(self, DbError::Query(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION))
    }
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        match error {
            deadpool_postgres::PoolError::Backend(e) => DbError::Unavailable(describe(&e)),
            other => DbError::Unavailable(other.to_string()),
        }
    }
}

/// The database's own message (tokio-postgres' Display says only "db error").
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => db.message().to_owned(),
        None => error.to_string(),
    }
}

/// The process's handle on PostgreSQL. Cheap to clone.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
    pg_config: tokio_postgres::Config,
    schema: String,
}

impl fmt::Debug for Db {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Db")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

/// Checks a schema name, so it can be written into SQL and channel names unquoted.
pub fn valid_schema(schema: &str) -> Result<(), DbError> {
    let mut chars = schema.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && schema.len() <= 63;
    if ok {
        Ok(())
    } else {
        Err(DbError::InvalidSchema(schema.to_owned()))
    }
}

impl Db {
    /// A pool on `url` whose connections work in `schema`. Connects lazily; see
    /// [`Db::ping`] and [`migrate::run`].
    pub fn new(url: &SecretString, schema: &str) -> Result<Db, DbError> {
        valid_schema(schema)?;
        let mut pg_config: tokio_postgres::Config = url
            .expose_secret()
            .parse()
            .map_err(|_| DbError::InvalidUrl)?;
        pg_config
            .options(format!("-c search_path={schema}"))
            .connect_timeout(Duration::from_secs(3))
            .application_name("thena-vitally");
        let manager = Manager::from_config(
            pg_config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            // Queries are short (a record, a version); tests run many pools side by side
            // under PostgreSQL's 100 connections.
            .max_size(8)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(3)))
            .recycle_timeout(Some(Duration::from_secs(3)))
            .build()
            .map_err(|e| DbError::Unavailable(e.to_string()))?;
        Ok(Db {
            pool,
            pg_config,
            schema: schema.to_owned(),
        })
    }

    /// Connects, creating the database if it does not exist yet, and runs the migrations:
    /// what every role does on start.
    pub async fn connect(url: &SecretString, schema: &str) -> Result<Db, DbError> {
        let db = Db::new(url, schema)?;
        migrate::run_creating(&db).await?;
        Ok(db)
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    pub async fn client(&self) -> Result<Object, DbError> {
        Ok(self.pool.get().await?)
    }

    /// `true` when a query answers (for `/readyz`).
    pub async fn ping(&self) -> bool {
        match self.client().await {
            Ok(client) => client.simple_query("SELECT 1").await.is_ok(),
            Err(_) => false,
        }
    }

    /// A fresh machine has the server but not the database: create it, once.
    pub(crate) async fn create_database_if_missing(&self) -> Result<(), DbError> {
        let error = match self.pool.get().await {
            Ok(_) => return Ok(()),
            Err(deadpool_postgres::PoolError::Backend(e))
                if e.code() == Some(&SqlState::INVALID_CATALOG_NAME) =>
            {
                e
            }
            Err(other) => return Err(other.into()),
        };
        let Some(name) = self.pg_config.get_dbname().map(str::to_owned) else {
            return Err(DbError::Unavailable(describe(&error)));
        };
        let mut admin = self.pg_config.clone();
        admin.dbname("postgres").options("");
        let (client, connection) = admin
            .connect(NoTls)
            .await
            .map_err(|e| DbError::Unavailable(describe(&e)))?;
        tokio::spawn(connection);
        let quoted = name.replace('"', "\"\"");
        match client
            .batch_execute(&format!("CREATE DATABASE \"{quoted}\""))
            .await
        {
            Ok(()) => tracing::info!(database = %name, "created the database"),
            // Another replica created it first (reported either way, depending on when
            // the two met).
            Err(e)
                if e.code() == Some(&SqlState::DUPLICATE_DATABASE)
                    || e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {}
            Err(e) => return Err(DbError::Unavailable(describe(&e))),
        }
        Ok(())
    }

    /// A dedicated connection outside the pool (for LISTEN).
    pub(crate) fn pg_config(&self) -> &tokio_postgres::Config {
        &self.pg_config
    }

    /// Drops this deployment's schema and everything in it (tests, the demo).
    pub async fn drop_schema(&self) -> Result<(), DbError> {
        let client = self.client().await?;
        client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema))
            .await?;
        Ok(())
    }

    /// The newest version of a request that Vitally has, if any was recorded.
    pub async fn synced_version(
        &self,
        workspace: &str,
        request_id: u64,
    ) -> Result<Option<u64>, DbError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT synced_version FROM requests WHERE workspace_id = $1 AND request_id = $2",
            )
            .await?;
        let row = client
            .query_opt(&statement, &[&workspace, &(request_id as i64)])
            .await?;
        Ok(row
            .and_then(|row| row.get::<_, Option<i64>>(0))
            .map(|v| v as u64))
    }

    /// Records that Vitally has `version`; never moves the record backwards. Returns the
    /// version now recorded (higher than `version` if a newer one got there first).
    pub async fn record_synced(
        &self,
        workspace: &str,
        request_id: u64,
        version: u64,
    ) -> Result<u64, DbError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO requests (workspace_id, request_id, synced_version, synced_at)
                 VALUES ($1, $2, $3, now())
                 ON CONFLICT (workspace_id, request_id) DO UPDATE
                 SET synced_version = GREATEST(requests.synced_version, EXCLUDED.synced_version),
                     synced_at = CASE WHEN requests.synced_version IS NULL
                                        OR EXCLUDED.synced_version > requests.synced_version
                                      THEN now() ELSE requests.synced_at END
                 RETURNING synced_version",
            )
            .await?;
        let row = client
            .query_one(
                &statement,
                &[&workspace, &(request_id as i64), &(version as i64)],
            )
            .await?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    /// Marks the deployment as started; `true` the very first time (nothing was ever
    /// locked or cached, so an empty Redis is expected, not a loss).
    pub async fn first_start(&self) -> Result<bool, DbError> {
        let client = self.client().await?;
        let inserted = client
            .execute(
                "INSERT INTO fleet DEFAULT VALUES ON CONFLICT (id) DO NOTHING",
                &[],
            )
            .await?;
        Ok(inserted == 1)
    }
}
