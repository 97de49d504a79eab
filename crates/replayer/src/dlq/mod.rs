//! The dead-letter operations: one library behind `thena-vitally dlq`, the admin API and
//! the console. Handlers parse their input into a [`DlqFilter`] and options, call
//! [`Dlq`], and render what it returns; none of them holds logic of its own.
//!
//! - [`Dlq::list`] / [`Dlq::show`]: keyset pages of the parked set (PostgreSQL) by
//!   workspace, reason, request, age, id; one dead letter with its headers and event.
//! - [`Dlq::prepare_replay`] (validates, counts — the dry run's "47 messages would be
//!   replayed" — and opens the audit line), then [`Dlq::replay`] (publish with confirm to
//!   the original route, mark replayed, at a rate). The API answers after the first and
//!   runs the second in the background; the CLI runs both.
//! - [`Dlq::purge`]: refuses without confirmation; deletes the bodies, keeps the rows.
//! - [`Dlq::audit`]: who replayed or purged what, newest first.
//! - [`transit`]: a look into the dead and delay queues, which messages only pass through.

pub mod render;
pub mod transit;

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString},
};
use serde::Serialize;
use serde_json::Value;
use thena_broker::{BrokerError, Publisher, strip_failure_headers};
use thena_store::{
    Db, DbError,
    dead_letters::{
        Action, AuditEntry, AuditPage, Claimed, DeadLetter, DeadLetters, Filter, Matched, NewAudit,
        Page, Replay, State,
    },
};

pub use transit::{DlqEntry, DlqQueue};

pub const REPLAYED_BY_HEADER: &str = "x-thena-replayed-by";
pub const REPLAYED_AT_HEADER: &str = "x-thena-replayed-at";
pub const REPLAY_REASON_HEADER: &str = "x-thena-replay-reason";

/// Largest page.
pub const MAX_PAGE: i64 = 1_000;
/// Dead letters read per step of a replay.
const REPLAY_BATCH: i64 = 200;
/// Longest actor and why, and most ids in one filter: bad input gets bounded work.
const MAX_TEXT: usize = 500;
const MAX_IDS: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// Names the host, never the password: "cannot connect to RabbitMQ at host:port: ...".
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("PostgreSQL: {0}")]
    Db(#[from] DbError),
    #[error("bad filter: {0}")]
    BadFilter(String),
    #[error("bad option: {0}")]
    BadOption(String),
    #[error(
        "the {0} queue can be listed and shown, not replayed or purged: its messages move on \
         by themselves (a delay tier's back to the sync queue when the delay ends, a dead \
         letter to a delay tier or the parked set)"
    )]
    TransitIsReadOnly(DlqQueue),
    #[error("no dead letter {0}")]
    NotFound(String),
    #[error("refusing to purge {matched} parked message(s) without confirmation (irreversible)")]
    ConfirmRequired { matched: u64 },
    #[error("RabbitMQ error on the {queue} queue: {source}")]
    Amqp {
        queue: DlqQueue,
        #[source]
        source: lapin::Error,
    },
}

/// Which dead letters an operation applies to, as people say it (ages, not instants).
/// Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DlqFilter {
    pub workspace: Option<String>,
    pub reason: Option<String>,
    pub request_id: Option<u64>,
    /// Age is measured from the first failure.
    pub older_than: Option<Duration>,
    pub younger_than: Option<Duration>,
    /// Dead letter ids (the first column of `dlq list`).
    pub ids: Vec<i64>,
    /// Listing only: replay and purge act on parked dead letters.
    pub state: State,
}

impl DlqFilter {
    pub fn validate(&self) -> Result<(), DlqError> {
        if let (Some(older), Some(younger)) = (self.older_than, self.younger_than)
            && older >= younger
        {
            return Err(DlqError::BadFilter(format!(
                "older than {} and younger than {} matches nothing",
                render::format_age(older),
                render::format_age(younger)
            )));
        }
        for (name, value) in [("workspace", &self.workspace), ("reason", &self.reason)] {
            match value.as_deref() {
                Some(v) if v.trim().is_empty() => {
                    return Err(DlqError::BadFilter(format!("empty {name}")));
                }
                Some(v) if v.len() > MAX_TEXT => {
                    return Err(DlqError::BadFilter(format!("{name} is too long")));
                }
                _ => {}
            }
        }
        if self.ids.len() > MAX_IDS {
            return Err(DlqError::BadFilter(format!(
                "{} ids: at most {MAX_IDS} at once",
                self.ids.len()
            )));
        }
        Ok(())
    }

    /// The filter with its ages turned into instants before `now`.
    pub fn at(&self, now: DateTime<Utc>) -> Filter {
        let before = |age: Duration| {
            chrono::Duration::from_std(age)
                .ok()
                .and_then(|age| now.checked_sub_signed(age))
                .unwrap_or(DateTime::<Utc>::MIN_UTC)
        };
        Filter {
            workspace: self.workspace.clone(),
            reason: self.reason.clone(),
            request_id: self.request_id,
            failed_before: self.older_than.map(before),
            failed_after: self.younger_than.map(before),
            ids: self.ids.clone(),
            state: self.state,
            up_to: None,
        }
    }
}

/// One dead letter with everything stored about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Shown {
    pub dead_letter: DeadLetter,
    pub headers: Value,
    /// `None` once purged.
    pub body: Option<Vec<u8>>,
}

impl Serialize for Shown {
    /// `event` when the body is JSON (it nearly always is), else `body_text`.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Json<'a> {
            dead_letter: &'a DeadLetter,
            headers: &'a Value,
            event: Option<Value>,
            #[serde(skip_serializing_if = "Option::is_none")]
            body_text: Option<String>,
        }
        let event = self
            .body
            .as_deref()
            .and_then(|b| serde_json::from_slice(b).ok());
        let body_text = match (&event, &self.body) {
            (None, Some(body)) => Some(String::from_utf8_lossy(body).into_owned()),
            _ => None,
        };
        Json {
            dead_letter: &self.dead_letter,
            headers: &self.headers,
            event,
            body_text,
        }
        .serialize(serializer)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReplayOptions {
    /// Count and list, send nothing.
    pub dry_run: bool,
    /// At most this many messages republished per second; `None`: as fast as confirms
    /// come back.
    pub rate_per_sec: Option<f64>,
    /// Who replays (audit): an operator's name.
    pub actor: String,
    /// Why (audit): free text, e.g. a ticket reference.
    pub why: String,
}

impl ReplayOptions {
    fn validate(&self) -> Result<Option<Duration>, DlqError> {
        require_actor(&self.actor, &self.why)?;
        match self.rate_per_sec {
            None => Ok(None),
            Some(rate) if rate.is_finite() && rate > 0.0 && rate <= 10_000.0 => {
                Ok(Some(Duration::from_secs_f64(1.0 / rate)))
            }
            Some(rate) => Err(DlqError::BadOption(format!(
                "rate must be a number of messages per second above 0 and at most 10000, \
                 not {rate}"
            ))),
        }
    }
}

fn page_limit(limit: i64) -> Result<(), DlqError> {
    if (1..=MAX_PAGE).contains(&limit) {
        Ok(())
    } else {
        Err(DlqError::BadOption(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )))
    }
}

fn require_actor(actor: &str, why: &str) -> Result<(), DlqError> {
    if actor.trim().is_empty() {
        return Err(DlqError::BadOption(
            "an actor is required for the audit trail".into(),
        ));
    }
    if actor.len() > MAX_TEXT || why.len() > MAX_TEXT {
        return Err(DlqError::BadOption(format!(
            "actor and why are limited to {MAX_TEXT} bytes"
        )));
    }
    Ok(())
}

/// A replay counted and audited, ready to run (a dry run is finished already).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplayJob {
    /// Its audit line (`None` when nothing matched: nothing was done or recorded).
    pub audit_id: Option<i64>,
    pub dry_run: bool,
    /// How many dead letters it covers ("47 messages would be replayed").
    pub matched: u64,
    #[serde(skip)]
    filter: Filter,
    #[serde(skip)]
    options: ReplayOptions,
    #[serde(skip)]
    interval: Option<Duration>,
}

/// One dead letter replayed (or that a dry run would replay). Also logged at info level,
/// target `thena::audit`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplayLine {
    pub at: DateTime<Utc>,
    pub actor: String,
    pub why: String,
    pub dead_letter: i64,
    pub event_id: Option<String>,
    pub workspace: Option<String>,
    pub request_id: Option<u64>,
    pub to_exchange: String,
    pub to_routing_key: String,
    pub dry_run: bool,
}

impl std::fmt::Display for ReplayLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} event {} (dead letter {}, workspace {}) to {} / {} by {:?} because {:?}",
            self.at.to_rfc3339_opts(SecondsFormat::Secs, true),
            if self.dry_run {
                "would replay"
            } else {
                "replayed"
            },
            self.event_id.as_deref().unwrap_or("-"),
            self.dead_letter,
            self.workspace.as_deref().unwrap_or("-"),
            self.to_exchange,
            self.to_routing_key,
            self.actor,
            self.why,
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplayReport {
    pub audit_id: Option<i64>,
    pub dry_run: bool,
    /// Dead letters the filter matched when the replay was prepared.
    pub matched: u64,
    /// Republished with confirm and marked replayed (0 in a dry run).
    pub replayed: u64,
    /// Replayed or purged meanwhile by someone else: nothing to do.
    pub gone: u64,
    /// Left parked because republishing failed: (dead letter, error). A replay stops at
    /// the first (something is wrong with the broker or the route).
    pub failed: Vec<(i64, String)>,
}

impl ReplayReport {
    /// The totals (the CLI prints each [`ReplayLine`] before); when nothing matched, only
    /// [`render::NOTHING_TO_DO`].
    pub fn render(&self) -> String {
        if self.matched == 0 {
            return render::NOTHING_TO_DO.to_owned();
        }
        let mut out = String::new();
        for (id, error) in &self.failed {
            out.push_str(&format!("FAILED dead letter {id}: {error}\n"));
        }
        let audit = self
            .audit_id
            .map_or(String::new(), |id| format!(" (audit {id})"));
        if self.dry_run {
            out.push_str(&format!(
                "dry run: {} message(s) would be replayed{audit}\n",
                self.matched
            ));
        } else {
            out.push_str(&format!(
                "replay: {} matched, {} replayed, {} already gone, {} failed{audit}\n",
                self.matched,
                self.replayed,
                self.gone,
                self.failed.len()
            ));
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PurgeOptions {
    /// Without it, nothing is deleted: [`DlqError::ConfirmRequired`] says how many
    /// would be.
    pub confirm: bool,
    pub actor: String,
    pub why: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PurgeReport {
    pub audit_id: Option<i64>,
    pub matched: u64,
    pub purged: u64,
}

/// The parked set's operations. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Dlq {
    store: DeadLetters,
}

impl Dlq {
    pub fn new(db: Db) -> Dlq {
        Dlq {
            store: DeadLetters::new(db),
        }
    }

    /// A page of dead letters matching `filter`, after the previous page's `next`.
    pub async fn list(
        &self,
        filter: &DlqFilter,
        after: Option<i64>,
        limit: i64,
    ) -> Result<Page, DlqError> {
        filter.validate()?;
        page_limit(limit)?;
        Ok(self
            .store
            .list(&filter.at(Utc::now()), after, limit)
            .await?)
    }

    /// One dead letter by id — or by event id, the newest of that event's. With
    /// `workspace`, only one of that workspace (another's is "not found").
    pub async fn show(&self, key: &str, workspace: Option<&str>) -> Result<Shown, DlqError> {
        let key = key.trim();
        let found = match key.parse::<i64>() {
            Ok(id) => self.store.get(id).await?,
            Err(_) if !key.is_empty() && key.len() <= MAX_TEXT => {
                self.store.newest_of_event(key).await?
            }
            Err(_) => return Err(DlqError::BadFilter("empty or overlong id".into())),
        };
        let found = found
            .filter(|d| workspace.is_none_or(|ws| d.letter.workspace_id.as_deref() == Some(ws)));
        match found {
            Some(detail) => Ok(Shown {
                dead_letter: detail.letter,
                headers: detail.headers,
                body: detail.body,
            }),
            None => Err(DlqError::NotFound(key.to_owned())),
        }
    }

    /// Validates a replay, counts what it covers (bounded to the dead letters parked
    /// now, so a message parked again while it runs is not replayed twice) and opens its
    /// audit line. A dry run ends here, recorded as such.
    pub async fn prepare_replay(
        &self,
        filter: &DlqFilter,
        options: &ReplayOptions,
    ) -> Result<ReplayJob, DlqError> {
        filter.validate()?;
        let interval = options.validate()?;
        if filter.state != State::Parked {
            return Err(DlqError::BadFilter(
                "only parked dead letters can be replayed".into(),
            ));
        }
        let (bounded, matched) = self.bounded(filter).await?;
        let audit_id = match matched.count {
            0 => None,
            count => Some(
                self.store
                    .audit_begin(&NewAudit {
                        actor: &options.actor,
                        action: Action::Replay,
                        why: &options.why,
                        filter: &bounded,
                        dry_run: options.dry_run,
                        rate_per_sec: options.rate_per_sec,
                        matched: count,
                    })
                    .await?,
            ),
        };
        Ok(ReplayJob {
            audit_id,
            dry_run: options.dry_run,
            matched: matched.count,
            filter: bounded,
            options: options.clone(),
            interval,
        })
    }

    /// Carries out a prepared replay, oldest first: each dead letter is republished to
    /// its original exchange and routing key (failure headers stripped, the replay
    /// markers added) with a publisher confirm, then marked replayed with a line in its
    /// request's history — so a second replay finds nothing to do. Stops at the first
    /// publish error; the audit line records how far it got. A dry run's job only
    /// previews ([`Self::preview`]).
    pub async fn replay(
        &self,
        publisher: &Publisher,
        job: ReplayJob,
        each: impl FnMut(&ReplayLine),
    ) -> Result<ReplayReport, DlqError> {
        let publisher = (!job.dry_run).then_some(publisher);
        self.run(publisher, job, each).await
    }

    /// Calls `each` with what a replay of `job` would send, sending nothing (a dry run
    /// needs no broker).
    pub async fn preview(
        &self,
        job: ReplayJob,
        each: impl FnMut(&ReplayLine),
    ) -> Result<ReplayReport, DlqError> {
        self.run(None, job, each).await
    }

    /// Replays with `publisher`, or only previews without one.
    async fn run(
        &self,
        publisher: Option<&Publisher>,
        job: ReplayJob,
        mut each: impl FnMut(&ReplayLine),
    ) -> Result<ReplayReport, DlqError> {
        let mut report = ReplayReport {
            audit_id: job.audit_id,
            dry_run: publisher.is_none(),
            matched: job.matched,
            replayed: 0,
            gone: 0,
            failed: Vec::new(),
        };
        if job.filter.up_to.is_none() {
            return Ok(report);
        }
        let ran = self.pages(publisher, &job, &mut report, &mut each).await;
        if let (Some(audit), Some(_)) = (job.audit_id, publisher) {
            let error = match (&ran, report.failed.first()) {
                (Err(e), _) => Some(e.to_string()),
                (Ok(()), Some((id, e))) => Some(format!("dead letter {id}: {e}")),
                (Ok(()), None) => None,
            };
            let failed = report.failed.len() as u64;
            self.store
                .audit_finish(audit, report.replayed, failed, error.as_deref())
                .await?;
        }
        ran.map(|()| report)
    }

    async fn pages(
        &self,
        publisher: Option<&Publisher>,
        job: &ReplayJob,
        report: &mut ReplayReport,
        each: &mut impl FnMut(&ReplayLine),
    ) -> Result<(), DlqError> {
        let options = &job.options;
        let mut next_slot = tokio::time::Instant::now();
        let mut after = None;
        loop {
            let page = self.store.list(&job.filter, after, REPLAY_BATCH).await?;
            for letter in &page.dead_letters {
                let Some(publisher) = publisher else {
                    each(&line(letter, options, true));
                    continue;
                };
                if let Some(interval) = job.interval {
                    tokio::time::sleep_until(next_slot).await;
                    next_slot = tokio::time::Instant::now() + interval;
                }
                let publish =
                    async |claimed: &Claimed| republish(publisher, claimed, options).await;
                match self
                    .store
                    .replay_one(letter.id, &options.actor, &options.why, publish)
                    .await?
                {
                    Replay::Done(letter) => {
                        report.replayed += 1;
                        let line = line(&letter, options, false);
                        audit_log(&line);
                        each(&line);
                    }
                    Replay::Gone => report.gone += 1,
                    Replay::NotPublished(error) => {
                        report.failed.push((letter.id, error));
                        return Ok(());
                    }
                }
            }
            if let (Some(audit), Some(_)) = (job.audit_id, publisher) {
                self.store.audit_progress(audit, report.replayed, 0).await?;
            }
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(()),
            }
        }
    }

    /// Purges the parked dead letters `filter` matches — only with `confirm`; without it
    /// [`DlqError::ConfirmRequired`] says how many it would. The bodies are deleted; the
    /// rows stay as `purged` (who, when, why) for the audit.
    pub async fn purge(
        &self,
        filter: &DlqFilter,
        options: &PurgeOptions,
    ) -> Result<PurgeReport, DlqError> {
        filter.validate()?;
        require_actor(&options.actor, &options.why)?;
        if filter.state != State::Parked {
            return Err(DlqError::BadFilter(
                "only parked dead letters can be purged".into(),
            ));
        }
        let (bounded, matched) = self.bounded(filter).await?;
        if matched.up_to.is_none() {
            return Ok(PurgeReport {
                audit_id: None,
                matched: 0,
                purged: 0,
            });
        }
        if !options.confirm {
            return Err(DlqError::ConfirmRequired {
                matched: matched.count,
            });
        }
        let audit = self
            .store
            .audit_begin(&NewAudit {
                actor: &options.actor,
                action: Action::Purge,
                why: &options.why,
                filter: &bounded,
                dry_run: false,
                rate_per_sec: None,
                matched: matched.count,
            })
            .await?;
        let purged = self
            .store
            .purge(&bounded, &options.actor, &options.why)
            .await?;
        self.store.audit_finish(audit, purged, 0, None).await?;
        tracing::info!(
            target: "thena::audit",
            actor = %options.actor,
            why = %options.why,
            purged,
            audit,
            "dlq purge"
        );
        Ok(PurgeReport {
            audit_id: Some(audit),
            matched: matched.count,
            purged,
        })
    }

    /// The filter at this instant, bounded to what it matches now: an operation on
    /// "everything matching" does not grow while it runs.
    async fn bounded(&self, filter: &DlqFilter) -> Result<(Filter, Matched), DlqError> {
        let mut bounded = filter.at(Utc::now());
        let matched = self.store.matched(&bounded).await?;
        bounded.up_to = matched.up_to;
        Ok((bounded, matched))
    }

    /// The audit trail, newest first: a workspace's, or the whole fleet's.
    pub async fn audit(
        &self,
        workspace: Option<&str>,
        before: Option<i64>,
        limit: i64,
    ) -> Result<AuditPage, DlqError> {
        page_limit(limit)?;
        Ok(self.store.audit(workspace, before, limit).await?)
    }

    /// One audit line (a running replay's progress); with `workspace`, only its own.
    pub async fn audit_entry(
        &self,
        id: i64,
        workspace: Option<&str>,
    ) -> Result<AuditEntry, DlqError> {
        self.store
            .audit_entry(id)
            .await?
            .filter(|a| workspace.is_none_or(|ws| a.workspace_id.as_deref() == Some(ws)))
            .ok_or_else(|| DlqError::NotFound(format!("audit {id}")))
    }
}

fn line(letter: &DeadLetter, options: &ReplayOptions, dry_run: bool) -> ReplayLine {
    ReplayLine {
        at: Utc::now(),
        actor: options.actor.clone(),
        why: options.why.clone(),
        dead_letter: letter.id,
        event_id: letter.event_id.clone(),
        workspace: letter.workspace_id.clone(),
        request_id: letter.request_id,
        to_exchange: letter.original_exchange.clone(),
        to_routing_key: letter.original_routing_key.clone(),
        dry_run,
    }
}

fn audit_log(line: &ReplayLine) {
    tracing::info!(
        target: "thena::audit",
        actor = %line.actor,
        at = %line.at.to_rfc3339(),
        why = %line.why,
        dead_letter = line.dead_letter,
        event_id = line.event_id.as_deref().unwrap_or("-"),
        workspace = line.workspace.as_deref().unwrap_or("-"),
        to_exchange = %line.to_exchange,
        to_routing_key = %line.to_routing_key,
        "dlq replay"
    );
}

/// Publishes a claimed dead letter to its original route, with a confirm.
async fn republish(
    publisher: &Publisher,
    claimed: &Claimed,
    options: &ReplayOptions,
) -> Result<(), String> {
    let letter = &claimed.letter;
    if letter.original_routing_key.is_empty() {
        return Err("no original route in its headers".into());
    }
    let props: BasicProperties = serde_json::from_value(claimed.properties.clone())
        .map_err(|e| format!("its stored properties do not read back: {e}"))?;
    publisher
        .publish_raw(
            &letter.original_exchange,
            &letter.original_routing_key,
            &claimed.body,
            replayed_properties(&props, options, Utc::now()),
        )
        .await
        .map_err(|e| e.to_string())
}

/// RabbitMQ's own per-delivery counters: meaningless on a republished message.
const DELIVERY_COUNTERS: [&str; 2] = ["x-delivery-count", "x-acquired-count"];

fn replayed_properties(
    props: &BasicProperties,
    options: &ReplayOptions,
    at: DateTime<Utc>,
) -> BasicProperties {
    let kept: std::collections::BTreeMap<_, _> = strip_failure_headers(props.headers().as_ref())
        .inner()
        .iter()
        .filter(|(key, _)| !DELIVERY_COUNTERS.contains(&key.as_str()))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    let mut headers = FieldTable::from(kept);
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    headers.insert(REPLAYED_BY_HEADER.into(), text(&options.actor));
    headers.insert(
        REPLAYED_AT_HEADER.into(),
        text(&at.to_rfc3339_opts(SecondsFormat::Millis, true)),
    );
    if !options.why.is_empty() {
        headers.insert(REPLAY_REASON_HEADER.into(), text(&options.why));
    }
    props.clone().with_headers(headers).with_delivery_mode(2)
}

#[cfg(test)]
mod tests {
    use thena_broker::{Failure, FailureClass, WORKSPACE_HEADER, header_str};

    use super::*;

    #[test]
    fn a_contradictory_empty_or_oversized_filter_is_refused() {
        let contradictory = DlqFilter {
            older_than: Some(Duration::from_secs(3_600)),
            younger_than: Some(Duration::from_secs(60)),
            ..DlqFilter::default()
        };
        let error = contradictory.validate().unwrap_err().to_string();
        assert_eq!(
            error,
            "bad filter: older than 1h00m and younger than 1m00s matches nothing"
        );
        let empty = DlqFilter {
            workspace: Some(" ".into()),
            ..DlqFilter::default()
        };
        assert!(empty.validate().is_err());
        let many = DlqFilter {
            ids: (0..20_000).collect(),
            ..DlqFilter::default()
        };
        assert!(many.validate().is_err());
    }

    #[test]
    fn ages_become_first_failure_bounds() {
        let now = Utc::now();
        let filter = DlqFilter {
            older_than: Some(Duration::from_secs(900)),
            younger_than: Some(Duration::from_secs(7_200)),
            ..DlqFilter::default()
        }
        .at(now);
        assert_eq!(
            filter.failed_before,
            Some(now - chrono::TimeDelta::minutes(15))
        );
        assert_eq!(filter.failed_after, Some(now - chrono::TimeDelta::hours(2)));
        let ancient = DlqFilter {
            older_than: Some(Duration::from_secs(u64::MAX)),
            ..DlqFilter::default()
        };
        assert_eq!(
            ancient.at(now).failed_before,
            Some(DateTime::<Utc>::MIN_UTC)
        );
    }

    #[test]
    fn a_replay_needs_an_actor_and_a_sane_rate() {
        let options = |actor: &str, rate: Option<f64>| ReplayOptions {
            dry_run: false,
            rate_per_sec: rate,
            actor: actor.into(),
            why: String::new(),
        };
        assert!(options(" ", None).validate().is_err());
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 20_000.0] {
            assert!(options("ana", Some(bad)).validate().is_err(), "{bad}");
        }
        assert_eq!(
            options("ana", Some(20.0)).validate().unwrap(),
            Some(Duration::from_millis(50))
        );
        assert_eq!(options("ana", None).validate().unwrap(), None);
    }

    #[test]
    fn a_replayed_message_loses_its_failure_headers_and_gains_the_audit_ones() {
        let now = Utc::now();
        let mut headers =
            Failure::new(FailureClass::Permanent, "x", "y", "e", "r", now).to_headers();
        headers.insert(WORKSPACE_HEADER.into(), AMQPValue::LongString("W1".into()));
        headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(3));
        let props = BasicProperties::default()
            .with_message_id("ev".into())
            .with_headers(headers);
        let options = ReplayOptions {
            dry_run: false,
            rate_per_sec: None,
            actor: "ops@thena".into(),
            why: "INC-42".into(),
        };
        let out = replayed_properties(&props, &options, now);
        let h = out.headers().clone().unwrap();
        assert!(Failure::from_headers(&h).is_none());
        assert!(!h.contains_key("x-thena-reason"));
        assert!(!h.contains_key("x-delivery-count"));
        assert_eq!(header_str(&h, WORKSPACE_HEADER).as_deref(), Some("W1"));
        assert_eq!(
            header_str(&h, REPLAYED_BY_HEADER).as_deref(),
            Some("ops@thena")
        );
        assert_eq!(
            header_str(&h, REPLAY_REASON_HEADER).as_deref(),
            Some("INC-42")
        );
        assert!(header_str(&h, REPLAYED_AT_HEADER).is_some());
        assert_eq!(out.message_id().as_ref().unwrap().as_str(), "ev");
        assert_eq!(out.delivery_mode(), &Some(2));
    }

    #[test]
    fn a_report_says_nothing_to_do_a_preview_or_the_totals() {
        let mut report = ReplayReport {
            audit_id: None,
            dry_run: true,
            matched: 0,
            replayed: 0,
            gone: 0,
            failed: Vec::new(),
        };
        assert_eq!(report.render(), render::NOTHING_TO_DO);
        report.matched = 47;
        report.audit_id = Some(3);
        assert_eq!(
            report.render(),
            "dry run: 47 message(s) would be replayed (audit 3)\n"
        );
        report.dry_run = false;
        report.replayed = 46;
        report.failed.push((9, "unroutable".into()));
        assert_eq!(
            report.render(),
            "FAILED dead letter 9: unroutable\n\
             replay: 47 matched, 46 replayed, 0 already gone, 1 failed (audit 3)\n"
        );
    }
}
