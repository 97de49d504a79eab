//! The parked set: every parked message, one row each, in `dead_letters`; who replayed or
//! purged what in `dead_letter_audit`.
//!
//! The replayer drains the parked queue into this table ([`DeadLetters::insert`], then
//! acks), so operators page, filter, replay and purge here and never browse RabbitMQ.
//! Pages are keyset pages (`id > after`, in id order: oldest parked first), so a page
//! costs the same whatever its depth. This module is SQL only; the operations people call
//! (validation, publishing, rate, audit) are `thena_replayer::dlq`.

use std::{fmt, str::FromStr, time::Duration};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use tokio_postgres::{Row, types::ToSql};

use crate::{
    Db, DbError,
    ledger::{self, Entry},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Waiting for a human.
    #[default]
    Parked,
    /// Sent back to its original route (a second replay finds nothing to do).
    Replayed,
    /// Deleted by a human: the body is gone, the metadata stays for the audit.
    Purged,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Parked => "parked",
            State::Replayed => "replayed",
            State::Purged => "purged",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for State {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "parked" => Ok(State::Parked),
            "replayed" => Ok(State::Replayed),
            "purged" => Ok(State::Purged),
            other => Err(format!(
                "unknown state {other:?} (expected parked, replayed or purged)"
            )),
        }
    }
}

/// A parked message as the replayer's drain stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDeadLetter {
    /// Identity of the parked message; a second insert of it does nothing.
    pub fingerprint: String,
    pub event_id: Option<String>,
    pub workspace_id: Option<String>,
    pub request_id: Option<u64>,
    pub version: Option<u64>,
    pub reason: String,
    pub class: Option<String>,
    pub attempts: u32,
    pub first_failure: DateTime<Utc>,
    pub parked_at: DateTime<Utc>,
    pub last_error: String,
    pub original_exchange: String,
    pub original_routing_key: String,
    /// For people and SQL: header name → value.
    pub headers: Value,
    /// The AMQP properties exactly, to republish the message as it was.
    pub properties: Value,
    pub body: Vec<u8>,
}

/// One dead letter as listed (no body).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub event_id: Option<String>,
    pub workspace_id: Option<String>,
    pub request_id: Option<u64>,
    pub version: Option<u64>,
    pub reason: String,
    pub class: Option<String>,
    pub attempts: u32,
    pub first_failure: DateTime<Utc>,
    pub parked_at: DateTime<Utc>,
    pub last_error: String,
    pub original_exchange: String,
    pub original_routing_key: String,
    pub state: State,
    pub state_by: Option<String>,
    pub state_at: Option<DateTime<Utc>>,
    pub state_why: Option<String>,
}

/// One dead letter with everything stored about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Detail {
    pub letter: DeadLetter,
    pub headers: Value,
    pub properties: Value,
    /// `None` once purged.
    pub body: Option<Vec<u8>>,
}

/// Which dead letters an operation applies to. Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Filter {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<u64>,
    /// First failed at or before this (older than an age).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_before: Option<DateTime<Utc>>,
    /// First failed after this (younger than an age).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_after: Option<DateTime<Utc>>,
    /// Only these dead letters.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<i64>,
    pub state: State,
    /// Only dead letters up to this id: an operation on "everything matching" stays on
    /// what matched when it started (see [`Matched`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub up_to: Option<i64>,
}

/// One page, in id order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page {
    pub dead_letters: Vec<DeadLetter>,
    /// Pass as `after` for the next page; `None` on the last one.
    pub next: Option<i64>,
}

/// What a filter matches right now: how many, and the newest id, so an operation on
/// "everything matching" does not grow while it runs (a replayed message parked again
/// gets a new id and is not replayed a second time by the same run).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Matched {
    pub count: u64,
    pub up_to: Option<i64>,
}

/// What the parked-messages alerts watch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub parked: u64,
    pub oldest_parked_at: Option<DateTime<Utc>>,
}

/// How one dead letter's replay ended.
#[derive(Debug)]
pub enum Replay<E> {
    /// Published and marked replayed.
    Done(Box<DeadLetter>),
    /// Nothing to do: already replayed or purged, or being replayed by someone else now.
    Gone,
    /// The publish failed; it stays parked.
    NotPublished(E),
}

/// A dead letter locked for its replay: what is needed to publish it again.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    pub letter: DeadLetter,
    pub properties: Value,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Replay,
    Purge,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Replay => "replay",
            Action::Purge => "purge",
        }
    }
}

/// The start of an audited operation.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAudit<'a> {
    pub actor: &'a str,
    pub action: Action,
    pub why: &'a str,
    pub filter: &'a Filter,
    pub dry_run: bool,
    pub rate_per_sec: Option<f64>,
    pub matched: u64,
}

/// One line of the audit trail.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub why: String,
    pub workspace_id: Option<String>,
    pub filter: Value,
    pub dry_run: bool,
    pub rate_per_sec: Option<f64>,
    pub matched: u64,
    pub done: u64,
    pub failed: u64,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
}

/// A page of the audit trail, newest first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditPage {
    pub audit: Vec<AuditEntry>,
    /// Pass as `before` for the next (older) page.
    pub next: Option<i64>,
}

const COLUMNS: &str = "id, event_id, workspace_id, request_id, version, reason, class, attempts, \
     first_failure, parked_at, last_error, original_exchange, original_routing_key, state, \
     state_by, state_at, state_why";

const AUDIT_COLUMNS: &str = "id, at, actor, action, why, workspace_id, filter, dry_run, \
     rate_per_sec, matched, done, failed, finished_at, error";

/// The filter as SQL: `$1`…`$8` in every statement that takes one.
const WHERE: &str = "state = $1
     AND ($2::text IS NULL OR workspace_id = $2)
     AND ($3::text IS NULL OR reason = $3)
     AND ($4::bigint IS NULL OR request_id = $4)
     AND ($5::timestamptz IS NULL OR first_failure <= $5)
     AND ($6::timestamptz IS NULL OR first_failure > $6)
     AND (cardinality($7::bigint[]) = 0 OR id = ANY($7))
     AND ($8::bigint IS NULL OR id <= $8)";

/// The filter's values, in `WHERE`'s order.
struct Params {
    state: &'static str,
    request_id: Option<i64>,
    ids: Vec<i64>,
}

impl Params {
    fn of(filter: &Filter) -> Params {
        Params {
            state: filter.state.as_str(),
            request_id: filter.request_id.map(|id| id as i64),
            ids: filter.ids.clone(),
        }
    }

    fn values<'a>(&'a self, filter: &'a Filter) -> Vec<&'a (dyn ToSql + Sync)> {
        vec![
            &self.state,
            &filter.workspace,
            &filter.reason,
            &self.request_id,
            &filter.failed_before,
            &filter.failed_after,
            &self.ids,
            &filter.up_to,
        ]
    }
}

/// The parked set's table. Cheap to clone.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    db: Db,
}

impl DeadLetters {
    pub fn new(db: Db) -> DeadLetters {
        DeadLetters { db }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Stores a parked message, with its request's ledger line when one is due, in one
    /// transaction. `None`: it was already stored (a redelivery), nothing written.
    pub async fn insert(
        &self,
        letter: &NewDeadLetter,
        history: Option<&Entry>,
    ) -> Result<Option<i64>, DbError> {
        let mut client = self.db.client().await?;
        let tx = client.transaction().await?;
        let statement = tx
            .prepare_cached(
                "INSERT INTO dead_letters (fingerprint, event_id, workspace_id, request_id,
                    version, reason, class, attempts, first_failure, parked_at, last_error,
                    original_exchange, original_routing_key, headers, properties, body)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
                 ON CONFLICT (fingerprint) DO NOTHING
                 RETURNING id",
            )
            .await?;
        let row = tx
            .query_opt(
                &statement,
                &[
                    &letter.fingerprint,
                    &letter.event_id,
                    &letter.workspace_id,
                    &letter.request_id.map(|v| v as i64),
                    &letter.version.map(|v| v as i64),
                    &letter.reason,
                    &letter.class,
                    &(letter.attempts.min(i32::MAX as u32) as i32),
                    &letter.first_failure,
                    &letter.parked_at,
                    &letter.last_error,
                    &letter.original_exchange,
                    &letter.original_routing_key,
                    &letter.headers,
                    &letter.properties,
                    &letter.body,
                ],
            )
            .await?;
        let id = row.map(|row| row.get::<_, i64>(0));
        if let (Some(_), Some(entry)) = (id, history) {
            ledger::write_in(&tx, &[entry]).await?;
        }
        tx.commit().await?;
        Ok(id)
    }

    /// Dead letters matching `filter` after `after`, at most `limit`.
    pub async fn list(
        &self,
        filter: &Filter,
        after: Option<i64>,
        limit: i64,
    ) -> Result<Page, DbError> {
        let client = self.db.client().await?;
        let params = Params::of(filter);
        let mut values = params.values(filter);
        let one_more = limit + 1;
        values.extend([&after as &(dyn ToSql + Sync), &one_more]);
        let rows = client
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM dead_letters
                     WHERE {WHERE} AND ($9::bigint IS NULL OR id > $9)
                     ORDER BY id LIMIT $10"
                ),
                &values,
            )
            .await?;
        let mut dead_letters: Vec<DeadLetter> = rows.iter().map(decode).collect();
        let next = if dead_letters.len() as i64 > limit {
            dead_letters.truncate(limit.max(0) as usize);
            dead_letters.last().map(|d| d.id)
        } else {
            None
        };
        Ok(Page { dead_letters, next })
    }

    /// How many dead letters `filter` matches now, and the newest of them.
    pub async fn matched(&self, filter: &Filter) -> Result<Matched, DbError> {
        let client = self.db.client().await?;
        let params = Params::of(filter);
        let row = client
            .query_one(
                &format!("SELECT count(*), max(id) FROM dead_letters WHERE {WHERE}"),
                &params.values(filter),
            )
            .await?;
        Ok(Matched {
            count: row.get::<_, i64>(0) as u64,
            up_to: row.get(1),
        })
    }

    pub async fn get(&self, id: i64) -> Result<Option<Detail>, DbError> {
        self.detail("id = $1", &id).await
    }

    /// The newest dead letter of this event (an event parked, replayed and parked again
    /// has several).
    pub async fn newest_of_event(&self, event_id: &str) -> Result<Option<Detail>, DbError> {
        self.detail("event_id = $1", &event_id).await
    }

    async fn detail(
        &self,
        condition: &str,
        key: &(dyn ToSql + Sync),
    ) -> Result<Option<Detail>, DbError> {
        let client = self.db.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT {COLUMNS}, headers, properties, body FROM dead_letters
                     WHERE {condition} ORDER BY id DESC LIMIT 1"
                ),
                &[key],
            )
            .await?;
        Ok(row.map(|row| Detail {
            letter: decode(&row),
            headers: row.get("headers"),
            properties: row.get("properties"),
            body: row.get("body"),
        }))
    }

    /// Locks dead letter `id` if it is still parked and nobody else holds it, runs
    /// `publish` with it, and marks it replayed by `actor` (with its request's ledger line)
    /// only if `publish` succeeded. A crash after `publish` and before the commit leaves
    /// it parked: a later replay sends it again, which consumers skip as
    /// `already_applied` (or `stale_version`) thanks to the version guard.
    pub async fn replay_one<E>(
        &self,
        id: i64,
        actor: &str,
        why: &str,
        publish: impl AsyncFnOnce(&Claimed) -> Result<(), E>,
    ) -> Result<Replay<E>, DbError> {
        let mut client = self.db.client().await?;
        let tx = client.transaction().await?;
        let row = tx
            .query_opt(
                &format!(
                    "SELECT {COLUMNS}, properties, body FROM dead_letters
                     WHERE id = $1 AND state = 'parked' AND body IS NOT NULL
                     FOR UPDATE SKIP LOCKED"
                ),
                &[&id],
            )
            .await?;
        let Some(row) = row else {
            return Ok(Replay::Gone);
        };
        let claimed = Claimed {
            letter: decode(&row),
            properties: row.get("properties"),
            body: row.get("body"),
        };
        if let Err(error) = publish(&claimed).await {
            return Ok(Replay::NotPublished(error));
        }
        tx.execute(
            "UPDATE dead_letters SET state = 'replayed', state_by = $2, state_at = now(),
                state_why = $3
             WHERE id = $1",
            &[&id, &actor, &why],
        )
        .await?;
        if let Some(entry) = replayed_entry(&claimed.letter, actor, why) {
            ledger::write_in(&tx, &[&entry]).await?;
        }
        tx.commit().await?;
        Ok(Replay::Done(Box::new(claimed.letter)))
    }

    /// Purges what `filter` matches: the bodies are deleted, the rows stay (state purged,
    /// by whom, why). Returns how many.
    pub async fn purge(&self, filter: &Filter, actor: &str, why: &str) -> Result<u64, DbError> {
        let client = self.db.client().await?;
        let params = Params::of(filter);
        let mut values = params.values(filter);
        values.extend([&actor as &(dyn ToSql + Sync), &why]);
        let purged = client
            .execute(
                &format!(
                    "UPDATE dead_letters SET state = 'purged', state_by = $9, state_at = now(),
                        state_why = $10, body = NULL
                     WHERE {WHERE}"
                ),
                &values,
            )
            .await?;
        Ok(purged)
    }

    /// How many messages are parked and since when the oldest.
    pub async fn stats(&self) -> Result<Stats, DbError> {
        let client = self.db.client().await?;
        let row = client
            .query_one(
                "SELECT count(*), min(parked_at) FROM dead_letters WHERE state = 'parked'",
                &[],
            )
            .await?;
        Ok(Stats {
            parked: row.get::<_, i64>(0) as u64,
            oldest_parked_at: row.get(1),
        })
    }

    /// Deletes replayed and purged rows settled longer than `age` ago. Returns how many.
    pub async fn prune(&self, age: Duration) -> Result<u64, DbError> {
        let client = self.db.client().await?;
        let seconds = age.as_secs_f64();
        Ok(client
            .execute(
                "DELETE FROM dead_letters
                 WHERE state <> 'parked' AND state_at < now() - make_interval(secs => $1)",
                &[&seconds],
            )
            .await?)
    }

    /// Opens an audit line; [`Self::audit_progress`] and [`Self::audit_finish`] complete it.
    pub async fn audit_begin(&self, audit: &NewAudit<'_>) -> Result<i64, DbError> {
        let client = self.db.client().await?;
        let filter = serde_json::to_value(audit.filter).unwrap_or(Value::Null);
        let finished = audit.dry_run.then(Utc::now);
        let row = client
            .query_one(
                "INSERT INTO dead_letter_audit (actor, action, why, workspace_id, filter,
                    dry_run, rate_per_sec, matched, finished_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
                &[
                    &audit.actor,
                    &audit.action.as_str(),
                    &audit.why,
                    &audit.filter.workspace,
                    &filter,
                    &audit.dry_run,
                    &audit.rate_per_sec,
                    &(audit.matched as i64),
                    &finished,
                ],
            )
            .await?;
        Ok(row.get(0))
    }

    pub async fn audit_progress(&self, id: i64, done: u64, failed: u64) -> Result<(), DbError> {
        let client = self.db.client().await?;
        client
            .execute(
                "UPDATE dead_letter_audit SET done = $2, failed = $3 WHERE id = $1",
                &[&id, &(done as i64), &(failed as i64)],
            )
            .await?;
        Ok(())
    }

    pub async fn audit_finish(
        &self,
        id: i64,
        done: u64,
        failed: u64,
        error: Option<&str>,
    ) -> Result<(), DbError> {
        let client = self.db.client().await?;
        client
            .execute(
                "UPDATE dead_letter_audit SET done = $2, failed = $3, error = $4,
                    finished_at = now()
                 WHERE id = $1",
                &[&id, &(done as i64), &(failed as i64), &error],
            )
            .await?;
        Ok(())
    }

    /// The audit trail, newest first: of one workspace (operations whose filter named
    /// it), or of the whole fleet.
    pub async fn audit(
        &self,
        workspace: Option<&str>,
        before: Option<i64>,
        limit: i64,
    ) -> Result<AuditPage, DbError> {
        let client = self.db.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {AUDIT_COLUMNS} FROM dead_letter_audit
                     WHERE ($1::text IS NULL OR workspace_id = $1)
                       AND ($2::bigint IS NULL OR id < $2)
                     ORDER BY id DESC LIMIT $3"
                ),
                &[&workspace, &before, &(limit + 1)],
            )
            .await?;
        let mut audit: Vec<AuditEntry> = rows.iter().map(decode_audit).collect();
        let next = if audit.len() as i64 > limit {
            audit.truncate(limit.max(0) as usize);
            audit.last().map(|a| a.id)
        } else {
            None
        };
        Ok(AuditPage { audit, next })
    }

    pub async fn audit_entry(&self, id: i64) -> Result<Option<AuditEntry>, DbError> {
        let client = self.db.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {AUDIT_COLUMNS} FROM dead_letter_audit WHERE id = $1"),
                &[&id],
            )
            .await?;
        Ok(row.as_ref().map(decode_audit))
    }
}

/// The request's history line for a replay: `replayed: <why it was parked>`.
fn replayed_entry(letter: &DeadLetter, actor: &str, why: &str) -> Option<Entry> {
    let detail = if why.is_empty() {
        format!("dead letter {} replayed by {actor}", letter.id)
    } else {
        format!("dead letter {} replayed by {actor}: {why}", letter.id)
    };
    Some(Entry {
        workspace_id: letter.workspace_id.clone()?,
        request_id: letter.request_id?,
        version: letter.version?,
        snapshot: None,
        outcome: "replayed",
        reason: letter.reason.clone(),
        detail: Some(detail),
        link: None,
        instance_id: None,
        failed_attempt: false,
        backfill_job: None,
        age: None,
    })
}

fn decode(row: &Row) -> DeadLetter {
    let unsigned = |name: &str| row.get::<_, Option<i64>>(name).map(|v| v as u64);
    let state: String = row.get("state");
    DeadLetter {
        id: row.get("id"),
        event_id: row.get("event_id"),
        workspace_id: row.get("workspace_id"),
        request_id: unsigned("request_id"),
        version: unsigned("version"),
        reason: row.get("reason"),
        class: row.get("class"),
        attempts: row.get::<_, i32>("attempts").max(0) as u32,
        first_failure: row.get("first_failure"),
        parked_at: row.get("parked_at"),
        last_error: row.get("last_error"),
        original_exchange: row.get("original_exchange"),
        original_routing_key: row.get("original_routing_key"),
        // The table's CHECK allows nothing else.
        state: state.parse().unwrap_or_default(),
        state_by: row.get("state_by"),
        state_at: row.get("state_at"),
        state_why: row.get("state_why"),
    }
}

fn decode_audit(row: &Row) -> AuditEntry {
    let count = |name: &str| row.get::<_, i64>(name).max(0) as u64;
    AuditEntry {
        id: row.get("id"),
        at: row.get("at"),
        actor: row.get("actor"),
        action: row.get("action"),
        why: row.get("why"),
        workspace_id: row.get("workspace_id"),
        filter: row.get("filter"),
        dry_run: row.get("dry_run"),
        rate_per_sec: row.get("rate_per_sec"),
        matched: count("matched"),
        done: count("done"),
        failed: count("failed"),
        finished_at: row.get("finished_at"),
        error: row.get("error"),
    }
}
