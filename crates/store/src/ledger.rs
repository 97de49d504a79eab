//! The request ledger: where each request went, and why.
//!
//! One row per (workspace, request) in `requests` — the latest snapshot received, the
//! outcome of its latest version (`synced`, `skipped`, `deferred`, `held`, `retried`,
//! `parked`) with its reason, the linking decision, the Vitally instance, attempts — and
//! the last [`HISTORY_PER_REQUEST`] outcomes in `request_events`.
//!
//! Consumers write it on the hot path, so writes are grouped: [`Ledger::record`] hands
//! its entry to one writer task and waits until the transaction holding it committed;
//! whatever arrived while a batch was being written goes into the next one (group
//! commit). A delivery is acked only after its entry is durable.

use std::{collections::HashMap, time::Duration};

use chrono::{DateTime, Utc};
use futures_util::future::try_join_all;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::{Db, DbError, Transaction};

pub mod hourly;

/// Outcomes kept per request.
pub const HISTORY_PER_REQUEST: i64 = 50;
/// Most entries in one transaction.
const MAX_BATCH: usize = 256;

/// One outcome of one event.
#[derive(Debug, Clone)]
pub struct Entry {
    pub workspace_id: String,
    pub request_id: u64,
    pub version: u64,
    /// The snapshot the event carried (kept if it is the newest seen).
    pub snapshot: Option<Value>,
    pub outcome: &'static str,
    pub reason: String,
    pub detail: Option<String>,
    /// How the request was linked (which rule, which organization/account, user created).
    pub link: Option<Value>,
    pub instance_id: Option<String>,
    /// Whether this outcome cost an attempt (a failure that will be retried or parked).
    pub failed_attempt: bool,
    /// The backfill job the event came from, which a final outcome settles.
    pub backfill_job: Option<String>,
    /// A synced event's age: its change in Thena (`occurred_at`) → Vitally's 2xx.
    pub age: Option<Duration>,
}

impl Entry {
    /// Whether the request is done with, for now: nothing of this event comes back.
    fn is_final(&self) -> bool {
        matches!(self.outcome, "synced" | "skipped" | "parked")
    }
}

/// One row of a request's history.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryRow {
    pub at: DateTime<Utc>,
    pub version: u64,
    pub outcome: String,
    pub reason: String,
    pub detail: Option<String>,
}

/// A request as the ledger knows it.
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    pub workspace_id: String,
    pub request_id: u64,
    pub latest_version: Option<u64>,
    pub synced_version: Option<u64>,
    pub synced_at: Option<DateTime<Utc>>,
    pub instance_id: Option<String>,
    pub outcome: Option<String>,
    pub reason: Option<String>,
    pub outcome_at: Option<DateTime<Utc>>,
    pub link: Option<Value>,
    pub attempts: i32,
    pub first_seen_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<HistoryRow>,
}

/// Which requests to list.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub outcome: Option<String>,
    pub reason: Option<String>,
    pub since: Option<DateTime<Utc>>,
    /// Only these request ids (resync `--ids`).
    pub ids: Vec<u64>,
    /// Continue after this request id (the previous page's `next`).
    pub after: Option<u64>,
}

/// One page of a listing, in request-id order.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub requests: Vec<RequestRecord>,
    /// Pass as `after` for the next page; `None` on the last one.
    pub next: Option<u64>,
}

type Pending = (Entry, oneshot::Sender<Result<(), String>>);

/// The process's ledger handle. Cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    db: Db,
    entries: mpsc::Sender<Pending>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").field("db", &self.db).finish()
    }
}

const COLUMNS: &str = "workspace_id, request_id, latest_version, synced_version, synced_at, \
     instance_id, outcome, reason, outcome_at, link, attempts, first_seen_at";

impl Ledger {
    /// Starts the writer task; it ends when every handle is dropped.
    pub fn start(db: Db) -> Ledger {
        let (entries, pending) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(write_batches(db.clone(), pending));
        Ledger { db, entries }
    }

    /// For readers (the CLI, the admin API): [`Ledger::record`] refuses.
    pub fn read_only(db: Db) -> Ledger {
        let (entries, _) = mpsc::channel(1);
        Ledger { db, entries }
    }

    /// Records one outcome; returns once it is durable.
    pub async fn record(&self, entry: Entry) -> Result<(), DbError> {
        let (done, durable) = oneshot::channel();
        self.entries
            .send((entry, done))
            .await
            .map_err(|_| DbError::Unavailable("the ledger writer stopped".into()))?;
        match durable.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(DbError::Unavailable(error)),
            Err(_) => Err(DbError::Unavailable("the ledger writer stopped".into())),
        }
    }

    /// The newest snapshot received for a request: `(version, snapshot)`.
    pub async fn latest_snapshot(
        &self,
        workspace: &str,
        request_id: u64,
    ) -> Result<Option<(u64, Value)>, DbError> {
        let client = self.db.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT latest_version, latest_snapshot FROM requests
                 WHERE workspace_id = $1 AND request_id = $2 AND latest_snapshot IS NOT NULL",
            )
            .await?;
        let row = client
            .query_opt(&statement, &[&workspace, &(request_id as i64)])
            .await?;
        Ok(row.map(|row| (row.get::<_, i64>(0) as u64, row.get(1))))
    }

    /// A request with its snapshot and its newest `history` outcomes (oldest first).
    pub async fn show(
        &self,
        workspace: &str,
        request_id: u64,
        history: i64,
    ) -> Result<Option<RequestRecord>, DbError> {
        let client = self.db.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT {COLUMNS}, latest_snapshot FROM requests
                     WHERE workspace_id = $1 AND request_id = $2"
                ),
                &[&workspace, &(request_id as i64)],
            )
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let mut record = decode(&row);
        record.snapshot = row.get("latest_snapshot");
        let rows = client
            .query(
                "SELECT at, version, outcome, reason, detail FROM (
                    SELECT id, at, version, outcome, reason, detail FROM request_events
                    WHERE workspace_id = $1 AND request_id = $2 ORDER BY id DESC LIMIT $3) newest
                 ORDER BY id",
                &[&workspace, &(request_id as i64), &history],
            )
            .await?;
        record.history = rows
            .iter()
            .map(|r| HistoryRow {
                at: r.get(0),
                version: r.get::<_, i64>(1) as u64,
                outcome: r.get(2),
                reason: r.get(3),
                detail: r.get(4),
            })
            .collect();
        Ok(Some(record))
    }

    /// Requests of a workspace matching `filter`, `limit` at a time.
    pub async fn list(
        &self,
        workspace: &str,
        filter: &Filter,
        limit: i64,
    ) -> Result<Page, DbError> {
        let client = self.db.client().await?;
        let ids: Vec<i64> = filter.ids.iter().map(|id| *id as i64).collect();
        let rows = client
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM requests
                     WHERE workspace_id = $1
                       AND ($2::text IS NULL OR outcome = $2)
                       AND ($3::text IS NULL OR reason = $3)
                       AND ($4::timestamptz IS NULL OR outcome_at >= $4)
                       AND (cardinality($5::bigint[]) = 0 OR request_id = ANY($5))
                       AND ($6::bigint IS NULL OR request_id > $6)
                     ORDER BY request_id LIMIT $7"
                ),
                &[
                    &workspace,
                    &filter.outcome,
                    &filter.reason,
                    &filter.since,
                    &ids,
                    &filter.after.map(|a| a as i64),
                    &(limit + 1),
                ],
            )
            .await?;
        let mut requests: Vec<RequestRecord> = rows.iter().map(decode).collect();
        let next = if requests.len() as i64 > limit {
            requests.truncate(limit as usize);
            requests.last().map(|r| r.request_id)
        } else {
            None
        };
        Ok(Page { requests, next })
    }
}

impl Ledger {
    /// Requests whose latest snapshot's requestor has `email` (any case), newest first,
    /// in `workspaces` (all when `None`).
    pub async fn find_by_email(
        &self,
        workspaces: Option<&[String]>,
        email: &str,
        limit: i64,
    ) -> Result<Vec<RequestRecord>, DbError> {
        let client = self.db.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM requests
                     WHERE lower(latest_snapshot #>> '{{request,requestor,email}}') = lower($1)
                       AND ($2::text[] IS NULL OR workspace_id = ANY($2))
                     ORDER BY outcome_at DESC NULLS LAST LIMIT $3"
                ),
                &[&email.trim(), &workspaces, &limit],
            )
            .await?;
        Ok(rows.iter().map(decode).collect())
    }

    /// When each workspace's requests last synced, for `workspaces` (all when `None`).
    pub async fn last_synced(
        &self,
        workspaces: Option<&[String]>,
    ) -> Result<HashMap<String, DateTime<Utc>>, DbError> {
        let client = self.db.client().await?;
        let rows = client
            .query(
                "SELECT workspace_id, max(synced_at) FROM requests
                 WHERE ($1::text[] IS NULL OR workspace_id = ANY($1)) AND synced_at IS NOT NULL
                 GROUP BY workspace_id",
                &[&workspaces],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Each workspace's outcomes over the last `hours` whole hours (see [`hourly`]).
    pub async fn activity(
        &self,
        workspaces: &[String],
        now: DateTime<Utc>,
        hours: u32,
    ) -> Result<Vec<hourly::Activity>, DbError> {
        let window = hourly::window(now, hours);
        let Some(since) = window.first() else {
            return Ok(Vec::new());
        };
        let rows = hourly::rows(&self.db, Some(workspaces), *since).await?;
        Ok(workspaces
            .iter()
            .map(|ws| hourly::activity(ws, &rows, &window))
            .collect())
    }
}

fn decode(row: &tokio_postgres::Row) -> RequestRecord {
    let version = |name: &str| row.get::<_, Option<i64>>(name).map(|v| v as u64);
    RequestRecord {
        workspace_id: row.get("workspace_id"),
        request_id: row.get::<_, i64>("request_id") as u64,
        latest_version: version("latest_version"),
        synced_version: version("synced_version"),
        synced_at: row.get("synced_at"),
        instance_id: row.get("instance_id"),
        outcome: row.get("outcome"),
        reason: row.get("reason"),
        outcome_at: row.get("outcome_at"),
        link: row.get("link"),
        attempts: row.get("attempts"),
        first_seen_at: row.get("first_seen_at"),
        snapshot: None,
        history: Vec::new(),
    }
}

/// The writer: takes what is queued (at most [`MAX_BATCH`]), writes it in one
/// transaction, answers every waiter, repeats.
async fn write_batches(db: Db, mut pending: mpsc::Receiver<Pending>) {
    let mut pruned_at: Option<tokio::time::Instant> = None;
    while let Some(first) = pending.recv().await {
        if pruned_at.is_none_or(|at| at.elapsed() > Duration::from_secs(3600)) {
            pruned_at = Some(tokio::time::Instant::now());
            if let Err(e) = hourly::prune(&db).await {
                tracing::warn!(error = %e, "could not prune old hourly ledger counts");
            }
        }
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match pending.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        let entries: Vec<&Entry> = batch.iter().map(|(entry, _)| entry).collect();
        let written =
            match tokio::time::timeout(Duration::from_secs(10), write(&db, &entries)).await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(_) => Err("the ledger write timed out".to_owned()),
            };
        for (_, done) in batch {
            // A waiter that gave up is no reason to stop writing for the others.
            let _ = done.send(written.clone());
        }
    }
}

async fn write(db: &Db, entries: &[&Entry]) -> Result<(), DbError> {
    let mut client = db.client().await?;
    let tx = client.transaction().await?;
    write_in(&tx, entries).await?;
    tx.commit().await?;
    Ok(())
}

/// Writes `entries` inside the caller's transaction, for a write that must commit with
/// them or not at all (a dead letter stored or replayed and its request's history line).
pub async fn write_in(tx: &Transaction<'_>, entries: &[&Entry]) -> Result<(), DbError> {
    let upsert = tx
        .prepare_cached(
            "INSERT INTO requests (workspace_id, request_id, latest_version, latest_snapshot,
                instance_id, outcome, reason, outcome_at, link, attempts)
             VALUES ($1, $2, $3, $4, $5, $6, $7, now(), $8, $9)
             ON CONFLICT (workspace_id, request_id) DO UPDATE SET
                latest_snapshot = CASE
                    WHEN requests.latest_version IS NULL
                      OR EXCLUDED.latest_version >= requests.latest_version
                    THEN COALESCE(EXCLUDED.latest_snapshot, requests.latest_snapshot)
                    ELSE requests.latest_snapshot END,
                -- The row tells the fate of the latest version; older ones go to history.
                outcome = CASE
                    WHEN requests.latest_version IS NULL
                      OR EXCLUDED.latest_version >= requests.latest_version
                    THEN EXCLUDED.outcome ELSE requests.outcome END,
                reason = CASE
                    WHEN requests.latest_version IS NULL
                      OR EXCLUDED.latest_version >= requests.latest_version
                    THEN EXCLUDED.reason ELSE requests.reason END,
                outcome_at = CASE
                    WHEN requests.latest_version IS NULL
                      OR EXCLUDED.latest_version >= requests.latest_version
                    THEN now() ELSE requests.outcome_at END,
                latest_version = GREATEST(requests.latest_version, EXCLUDED.latest_version),
                link = COALESCE(EXCLUDED.link, requests.link),
                instance_id = COALESCE(EXCLUDED.instance_id, requests.instance_id),
                attempts = requests.attempts + EXCLUDED.attempts",
        )
        .await?;
    let history = tx
        .prepare_cached(
            "INSERT INTO request_events (workspace_id, request_id, version, outcome, reason, detail)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .await?;
    let prune = tx
        .prepare_cached(
            "DELETE FROM request_events WHERE workspace_id = $1 AND request_id = $2 AND id <= (
                SELECT id FROM request_events WHERE workspace_id = $1 AND request_id = $2
                ORDER BY id DESC OFFSET $3 LIMIT 1)",
        )
        .await?;
    // Pipelined on one connection: statements run in the order they are sent, so a
    // request seen twice in one batch keeps its outcomes in order.
    try_join_all(entries.iter().map(|entry| {
        let request_id = entry.request_id as i64;
        let version = entry.version as i64;
        let attempts = i32::from(entry.failed_attempt);
        let tx = &tx;
        let upsert = &upsert;
        async move {
            tx.execute(
                upsert,
                &[
                    &entry.workspace_id,
                    &request_id,
                    &version,
                    &entry.snapshot,
                    &entry.instance_id,
                    &entry.outcome,
                    &entry.reason,
                    &entry.link,
                    &attempts,
                ],
            )
            .await
        }
    }))
    .await?;
    try_join_all(entries.iter().map(|entry| {
        let request_id = entry.request_id as i64;
        let version = entry.version as i64;
        let tx = &tx;
        let history = &history;
        async move {
            tx.execute(
                history,
                &[
                    &entry.workspace_id,
                    &request_id,
                    &version,
                    &entry.outcome,
                    &entry.reason,
                    &entry.detail,
                ],
            )
            .await
        }
    }))
    .await?;
    let mut touched: Vec<(&str, i64)> = entries
        .iter()
        .map(|e| (e.workspace_id.as_str(), e.request_id as i64))
        .collect();
    touched.sort_unstable();
    touched.dedup();
    try_join_all(touched.iter().map(|(ws, id)| {
        let tx = &tx;
        let prune = &prune;
        async move { tx.execute(prune, &[ws, id, &HISTORY_PER_REQUEST]).await }
    }))
    .await?;
    settle_backfills(tx, entries).await?;
    // Last, so the hour's counter rows (shared by every consumer) are locked briefly.
    hourly::add(tx, entries).await?;
    Ok(())
}

/// A backfilled request's first final outcome settles its item, in the ledger's own
/// transaction (a job's progress never runs ahead of, or behind, its requests' rows).
async fn settle_backfills(tx: &Transaction<'_>, entries: &[&Entry]) -> Result<(), DbError> {
    let settle = tx
        .prepare_cached(
            "UPDATE backfill_items SET outcome = $3, reason = $4, settled_at = now()
             WHERE job_id = $1 AND request_id = $2 AND settled_at IS NULL",
        )
        .await?;
    try_join_all(entries.iter().filter(|e| e.is_final()).filter_map(|entry| {
        let job = entry.backfill_job.as_ref()?;
        let request_id = entry.request_id as i64;
        let settle = &settle;
        Some(async move {
            tx.execute(settle, &[job, &request_id, &entry.outcome, &entry.reason])
                .await
        })
    }))
    .await?;
    Ok(())
}
