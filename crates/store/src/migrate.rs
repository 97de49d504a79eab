//! Embedded, versioned migrations: each file in `migrations/` runs once per schema, in
//! order, in one transaction under an advisory lock, so replicas starting together
//! migrate once. An applied migration whose text changed is refused, not re-run.

use crate::{Db, DbError};

pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "control_plane",
        sql: include_str!("../migrations/0001_control_plane.sql"),
    },
    Migration {
        version: 2,
        name: "request_ledger",
        sql: include_str!("../migrations/0002_request_ledger.sql"),
    },
    Migration {
        version: 3,
        name: "dead_letters",
        sql: include_str!("../migrations/0003_dead_letters.sql"),
    },
    Migration {
        version: 4,
        name: "backfill",
        sql: include_str!("../migrations/0004_backfill.sql"),
    },
    Migration {
        version: 5,
        name: "console",
        sql: include_str!("../migrations/0005_console.sql"),
    },
];

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub applied: Vec<i32>,
    pub current: i32,
}

/// [`run`], creating the database first if the server does not have it yet.
pub async fn run_creating(db: &Db) -> Result<Report, DbError> {
    db.create_database_if_missing().await?;
    run(db).await
}

/// Brings the schema up to the newest migration this binary knows.
pub async fn run(db: &Db) -> Result<Report, DbError> {
    let mut client = db.client().await?;
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&lock_key(db.schema())],
    )
    .await?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}._migrations (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             checksum   text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         );",
        schema = db.schema()
    ))
    .await?;
    let rows = tx
        .query(
            "SELECT version, checksum FROM _migrations ORDER BY version",
            &[],
        )
        .await?;
    let done: Vec<(i32, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut applied = Vec::new();
    for migration in MIGRATIONS {
        let checksum = checksum(migration.sql);
        match done.iter().find(|(v, _)| *v == migration.version) {
            Some((_, recorded)) if *recorded == checksum => continue,
            Some(_) => {
                return Err(DbError::Migration(format!(
                    "migration {} ({}) was changed after it was applied",
                    migration.version, migration.name
                )));
            }
            None => {}
        }
        tx.batch_execute(migration.sql).await?;
        tx.execute(
            "INSERT INTO _migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[&migration.version, &migration.name, &checksum],
        )
        .await?;
        applied.push(migration.version);
    }
    tx.commit().await?;
    let known = MIGRATIONS.last().map_or(0, |m| m.version);
    let current = done.iter().map(|(v, _)| *v).max().unwrap_or(0).max(known);
    if current > known {
        // A newer binary migrated further; this one only needs what it knows.
        tracing::warn!(current, known, "the schema is newer than this binary");
    }
    if !applied.is_empty() {
        tracing::info!(schema = db.schema(), ?applied, "migrated");
    }
    Ok(Report { applied, current })
}

/// One advisory lock per schema (FNV-1a of its name).
fn lock_key(schema: &str) -> i64 {
    fnv1a(schema.as_bytes()) as i64
}

fn checksum(sql: &str) -> String {
    format!("{:016x}", fnv1a(sql.as_bytes()))
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_ascend_and_checksums_are_stable() {
        assert!(MIGRATIONS.windows(2).all(|w| w[0].version < w[1].version));
        assert_eq!(checksum("SELECT 1"), checksum("SELECT 1"));
        assert_ne!(checksum("SELECT 1"), checksum("SELECT 2"));
        assert_ne!(lock_key("a"), lock_key("b"));
    }
}
