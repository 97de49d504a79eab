//! Backfill jobs: which historical requests an operator imported, how far publishing got
//! (so a rerun after a crash resumes), and how each request settled.
//!
//! A job is identified by its workspace and the export's content hash: importing the same
//! export again resumes it rather than starting a second one. Items are the export's
//! requests, each at its newest version, in publishing order; consumers settle them in the
//! ledger's own transaction ([`crate::ledger::Entry::backfill_job`]).

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};

use crate::{Db, DbError, GenericClient};

/// A job to open: the export's requests (id, newest version), in publishing order.
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    pub id: String,
    pub workspace_id: &'a str,
    pub source: &'a str,
    pub content_hash: &'a str,
    pub actor: &'a str,
    pub items: &'a [(u64, u64)],
    pub rejected: u32,
}

/// A job and how far it got.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub id: String,
    pub workspace_id: String,
    pub source: String,
    pub actor: String,
    pub created_at: DateTime<Utc>,
    /// Requests in the export (its lines, less rejected ones and older duplicates).
    pub requests: u64,
    pub rejected: u64,
    /// Requests confirmed on the broker.
    pub published: u64,
    pub published_at: Option<DateTime<Utc>>,
    /// Requests settled for good, by outcome.
    pub synced: u64,
    pub skipped: u64,
    pub parked: u64,
}

impl Progress {
    pub fn settled(&self) -> u64 {
        self.synced + self.skipped + self.parked
    }

    pub fn is_done(&self) -> bool {
        self.published_at.is_some() && self.settled() >= self.requests
    }
}

/// Opens `job`, or finds the job of the same export (`resumed`: true). One transaction:
/// the job, its items and a `backfill_started` line in the integration's history.
pub async fn open(db: &Db, job: NewJob<'_>) -> Result<(Progress, bool), DbError> {
    let mut client = db.client().await?;
    let tx = client.transaction().await?;
    let inserted = tx
        .execute(
            "INSERT INTO backfill_jobs (id, workspace_id, source, content_hash, rejected, actor)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (workspace_id, content_hash) DO NOTHING",
            &[
                &job.id,
                &job.workspace_id,
                &job.source,
                &job.content_hash,
                &(job.rejected as i32),
                &job.actor,
            ],
        )
        .await?;
    let resumed = inserted == 0;
    if !resumed {
        let positions: Vec<i32> = (0..job.items.len() as i32).collect();
        let requests: Vec<i64> = job.items.iter().map(|(id, _)| *id as i64).collect();
        let versions: Vec<i64> = job.items.iter().map(|(_, v)| *v as i64).collect();
        tx.execute(
            "INSERT INTO backfill_items (job_id, position, request_id, version)
             SELECT $1, * FROM unnest($2::int[], $3::bigint[], $4::bigint[])",
            &[&job.id, &positions, &requests, &versions],
        )
        .await?;
        tx.execute(
            "INSERT INTO integration_events (workspace_id, actor, action, changes)
             VALUES ($1, $2, 'backfill_started', $3)",
            &[
                &job.workspace_id,
                &job.actor,
                &json!({
                    "job": job.id,
                    "source": job.source,
                    "requests": job.items.len(),
                    "rejected": job.rejected,
                    "forward_only": "bypassed for these requests, by this explicit import",
                }),
            ],
        )
        .await?;
    }
    let id: String = tx
        .query_one(
            "SELECT id FROM backfill_jobs WHERE workspace_id = $1 AND content_hash = $2",
            &[&job.workspace_id, &job.content_hash],
        )
        .await?
        .get(0);
    let progress = read(&tx, &id).await?.ok_or_else(|| {
        DbError::Unavailable(format!("backfill job {id} vanished while it was opened"))
    })?;
    tx.commit().await?;
    Ok((progress, resumed))
}

/// The items of `job` from `position` on, in publishing order: (request id, version).
pub async fn items_from(db: &Db, job: &str, position: u64) -> Result<Vec<(u64, u64)>, DbError> {
    let rows = db
        .client()
        .await?
        .query(
            "SELECT request_id, version FROM backfill_items
             WHERE job_id = $1 AND position >= $2 ORDER BY position",
            &[&job, &(position as i32)],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| (row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64))
        .collect())
}

/// Records that items [0, `through`) are confirmed on the broker (never moves back).
pub async fn mark_published(db: &Db, job: &str, through: u64) -> Result<(), DbError> {
    db.client()
        .await?
        .execute(
            "UPDATE backfill_jobs SET published = GREATEST(published, $2) WHERE id = $1",
            &[&job, &(through as i32)],
        )
        .await?;
    Ok(())
}

/// Records that every item is on the broker.
pub async fn finish_publishing(db: &Db, job: &str) -> Result<(), DbError> {
    db.client()
        .await?
        .execute(
            "UPDATE backfill_jobs SET published_at = COALESCE(published_at, now()),
                published = (SELECT count(*) FROM backfill_items WHERE job_id = $1)
             WHERE id = $1",
            &[&job],
        )
        .await?;
    Ok(())
}

/// One job of `workspace_id`.
pub async fn progress(db: &Db, workspace_id: &str, job: &str) -> Result<Option<Progress>, DbError> {
    let client = db.client().await?;
    Ok(read(&client, job)
        .await?
        .filter(|p| p.workspace_id == workspace_id))
}

/// The workspace's jobs, newest first.
pub async fn list(db: &Db, workspace_id: &str) -> Result<Vec<Progress>, DbError> {
    let client = db.client().await?;
    let ids = client
        .query(
            "SELECT id FROM backfill_jobs WHERE workspace_id = $1 ORDER BY created_at DESC",
            &[&workspace_id],
        )
        .await?;
    let mut jobs = Vec::with_capacity(ids.len());
    for row in ids {
        let id: String = row.get(0);
        if let Some(job) = read(&client, &id).await? {
            jobs.push(job);
        }
    }
    Ok(jobs)
}

async fn read(client: &impl GenericClient, job: &str) -> Result<Option<Progress>, DbError> {
    let row = client
        .query_opt(
            "SELECT j.id, j.workspace_id, j.source, j.actor, j.created_at, j.rejected,
                    j.published, j.published_at,
                    count(i.request_id) AS requests,
                    count(*) FILTER (WHERE i.outcome = 'synced') AS synced,
                    count(*) FILTER (WHERE i.outcome = 'skipped') AS skipped,
                    count(*) FILTER (WHERE i.outcome = 'parked') AS parked
             FROM backfill_jobs j LEFT JOIN backfill_items i ON i.job_id = j.id
             WHERE j.id = $1
             GROUP BY j.id",
            &[&job],
        )
        .await?;
    Ok(row.map(|row| Progress {
        id: row.get("id"),
        workspace_id: row.get("workspace_id"),
        source: row.get("source"),
        actor: row.get("actor"),
        created_at: row.get("created_at"),
        requests: row.get::<_, i64>("requests") as u64,
        rejected: row.get::<_, i32>("rejected") as u64,
        published: row.get::<_, i32>("published") as u64,
        published_at: row.get("published_at"),
        synced: row.get::<_, i64>("synced") as u64,
        skipped: row.get::<_, i64>("skipped") as u64,
        parked: row.get::<_, i64>("parked") as u64,
    }))
}

/// The JSON the CLI and the admin API show for a job.
pub fn view(progress: &Progress) -> Value {
    let mut value = serde_json::to_value(progress).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut value {
        map.insert("settled".into(), progress.settled().into());
        map.insert("done".into(), progress.is_done().into());
    }
    value
}
