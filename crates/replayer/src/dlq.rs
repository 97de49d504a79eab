//! Operations on parked and dead-lettered messages, for the `thena-vitally dlq` CLI:
//! list, show, replay (dry-run, rate limit, audit) and purge.
//!
//! Messages are read with `basic.get` without auto-ack on a private channel; what is not
//! explicitly acked (replayed) goes back to its queue when that channel closes, so
//! looking never loses a message.

use std::{collections::BTreeSet, fmt, str::FromStr, time::Duration};

use chrono::{DateTime, SecondsFormat, Utc};
use lapin::{
    BasicProperties, Channel,
    message::Delivery,
    options::{BasicAckOptions, BasicGetOptions, QueuePurgeOptions},
    types::{AMQPValue, FieldTable, LongString},
};
use thena_broker::{
    Broker, BrokerError, Failure, FailureClass, Topology, WORKSPACE_HEADER, header_str,
    strip_failure_headers,
};

use crate::{replayer::queue_depth, schedule::poison_reason};

pub const REPLAYED_BY_HEADER: &str = "x-thena-replayed-by";
pub const REPLAYED_AT_HEADER: &str = "x-thena-replayed-at";
pub const REPLAY_REASON_HEADER: &str = "x-thena-replay-reason";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DlqQueue {
    /// Set aside for humans by the replayer or a consumer.
    #[default]
    Parked,
    /// Waiting for the replayer (normally short-lived).
    Dead,
    /// Every delay tier's queue: retried and deferred events waiting for their delay to
    /// end. Read-only: they go back to the sync queue by themselves.
    Delay,
}

impl DlqQueue {
    /// The RabbitMQ queues this stands for (one, or one per delay tier).
    pub fn queue_names(self, topology: &Topology) -> Vec<String> {
        match self {
            DlqQueue::Parked => vec![topology.parked_queue()],
            DlqQueue::Dead => vec![topology.dead_queue()],
            DlqQueue::Delay => topology.delay_queues(),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DlqQueue::Parked => "parked",
            DlqQueue::Dead => "dead",
            DlqQueue::Delay => "delay",
        }
    }
}

impl fmt::Display for DlqQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DlqQueue {
    type Err = DlqError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "parked" => Ok(DlqQueue::Parked),
            "dead" => Ok(DlqQueue::Dead),
            "delay" => Ok(DlqQueue::Delay),
            other => Err(DlqError::BadFilter(format!(
                "unknown queue {other:?} (expected parked, dead or delay)"
            ))),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// Names the host, never the password: "cannot connect to RabbitMQ at host:port: ...".
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("bad filter: {0}")]
    BadFilter(String),
    #[error("bad option: {0}")]
    BadOption(String),
    #[error(
        "the delay queues can be listed and shown, not replayed or purged: their messages go \
         back to the sync queue by themselves when their delay ends"
    )]
    DelayIsReadOnly,
    #[error("no message with event id {0} in the parked or dead queue")]
    NotFound(String),
    #[error(
        "refusing to purge the {queue} queue ({messages} messages) without --yes-really \
         (irreversible)"
    )]
    ConfirmRequired { queue: DlqQueue, messages: u32 },
    #[error("RabbitMQ error on the {queue} queue: {source}")]
    Amqp {
        queue: DlqQueue,
        #[source]
        source: lapin::Error,
    },
}

/// Which messages an operation applies to. Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DlqFilter {
    pub queue: DlqQueue,
    pub workspace: Option<String>,
    pub reason: Option<String>,
    /// Age is measured from the first failure.
    pub older_than: Option<Duration>,
    pub younger_than: Option<Duration>,
    /// Event ids (the message id).
    pub ids: Vec<String>,
}

impl DlqFilter {
    pub fn validate(&self) -> Result<(), DlqError> {
        if let (Some(older), Some(younger)) = (self.older_than, self.younger_than)
            && older >= younger
        {
            return Err(DlqError::BadFilter(format!(
                "older than {} and younger than {} matches nothing",
                format_age(older),
                format_age(younger)
            )));
        }
        for (name, value) in [("workspace", &self.workspace), ("reason", &self.reason)] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(DlqError::BadFilter(format!("empty {name}")));
            }
        }
        if self.ids.iter().any(|id| id.trim().is_empty()) {
            return Err(DlqError::BadFilter("empty event id".into()));
        }
        Ok(())
    }

    pub fn matches(&self, entry: &DlqEntry) -> bool {
        let ids: BTreeSet<&str> = self.ids.iter().map(String::as_str).collect();
        self.workspace
            .as_deref()
            .is_none_or(|ws| entry.workspace == ws)
            && self.reason.as_deref().is_none_or(|r| entry.reason == r)
            && (ids.is_empty() || ids.contains(entry.event_id.as_str()))
            && self
                .older_than
                .is_none_or(|min| entry.age.is_some_and(|age| age >= min))
            && self
                .younger_than
                .is_none_or(|max| entry.age.is_some_and(|age| age < max))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub offset: usize,
    pub limit: usize,
}

impl Default for Page {
    fn default() -> Self {
        Page {
            offset: 0,
            limit: 50,
        }
    }
}

/// One parked or dead message, as much as can be read from it (an undecodable body still
/// lists, with what its headers say).
#[derive(Debug, Clone, PartialEq)]
pub struct DlqEntry {
    pub event_id: String,
    pub workspace: String,
    pub request_id: Option<u64>,
    pub reason: String,
    pub class: Option<FailureClass>,
    pub attempts: u32,
    pub first_failure: Option<DateTime<Utc>>,
    pub age: Option<Duration>,
    pub last_error: String,
}

impl DlqEntry {
    /// Pure: reads the entry from a message's properties and body.
    pub fn from_message(props: &BasicProperties, body: &[u8], now: DateTime<Utc>) -> DlqEntry {
        let headers = props.headers().as_ref();
        let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        let json_str = |pointer: &str| {
            json.as_ref()
                .and_then(|v| v.pointer(pointer))
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        };
        let failure = headers.and_then(Failure::from_headers);
        let event_id = props
            .message_id()
            .as_ref()
            .map(|id| id.to_string())
            .or_else(|| json_str("/event_id"))
            .unwrap_or_else(|| "-".into());
        let workspace = headers
            .and_then(|h| header_str(h, WORKSPACE_HEADER))
            .or_else(|| json_str("/workspace_id"))
            .unwrap_or_else(|| "-".into());
        let request_id = json
            .as_ref()
            .and_then(|v| v.pointer("/request/id"))
            .and_then(serde_json::Value::as_u64);
        let first_failure = failure.as_ref().map(|f| f.first_failure).or_else(|| {
            props
                .timestamp()
                .and_then(|ts| i64::try_from(ts).ok())
                .and_then(|secs| DateTime::from_timestamp(secs, 0))
        });
        DlqEntry {
            event_id,
            workspace,
            request_id,
            reason: failure
                .as_ref()
                .map(|f| f.reason.clone())
                .unwrap_or_else(|| poison_reason(headers)),
            class: failure.as_ref().map(|f| f.class),
            attempts: failure.as_ref().map_or(0, |f| f.attempts),
            age: first_failure.and_then(|at| (now - at).to_std().ok()),
            first_failure,
            last_error: failure.map(|f| f.last_error).unwrap_or_default(),
        }
    }
}

/// A plain-text table for the terminal.
pub fn render_table(entries: &[DlqEntry]) -> String {
    if entries.is_empty() {
        return "no matching messages\n".into();
    }
    let header = [
        "EVENT ID",
        "WORKSPACE",
        "REQUEST",
        "REASON",
        "CLASS",
        "ATTEMPTS",
        "FIRST FAILURE",
        "AGE",
    ];
    let rows: Vec<[String; 8]> = entries
        .iter()
        .map(|e| {
            [
                e.event_id.clone(),
                e.workspace.clone(),
                e.request_id.map_or("-".into(), |id| id.to_string()),
                e.reason.clone(),
                e.class.map_or("-".into(), |c| c.to_string()),
                e.attempts.to_string(),
                e.first_failure
                    .map_or("-".into(), |t| t.to_rfc3339_opts(SecondsFormat::Secs, true)),
                e.age.map_or("-".into(), format_age),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    out
}

/// `59s`, `4m05s`, `2h03m`, `3d04h`.
pub fn format_age(age: Duration) -> String {
    let secs = age.as_secs();
    match secs {
        0..60 => format!("{secs}s"),
        60..3_600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3_600..86_400 => format!("{}h{:02}m", secs / 3_600, secs % 3_600 / 60),
        _ => format!("{}d{:02}h", secs / 86_400, secs % 86_400 / 3_600),
    }
}

/// Parses `90s`, `15m`, `2h`, `3d` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, DlqError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || {
        DlqError::BadFilter(format!(
            "cannot read duration {text:?} (use e.g. 90s, 15m, 2h, 3d)"
        ))
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    let unit_secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(unit_secs)
        .map(Duration::from_secs)
        .ok_or_else(bad)
}

/// What every command says when no message matches, whether the queue is empty or the
/// filter matched nothing: there is nothing to do, which is success.
pub fn nothing_to_do(queue: DlqQueue) -> String {
    format!("no matching messages in the {queue} queue: nothing to do\n")
}

/// Lists matching messages (after `page.offset`, at most `page.limit`), without removing
/// any. An empty queue lists nothing (the CLI says [`nothing_to_do`]).
pub async fn list(
    broker: &Broker,
    filter: &DlqFilter,
    page: Page,
) -> Result<Vec<DlqEntry>, DlqError> {
    filter.validate()?;
    let queue = filter.queue;
    let mut entries = Vec::new();
    for name in queue.queue_names(broker.topology()) {
        let scan = Scan::open(broker, queue, name).await?;
        if scan.depth == 0 {
            scan.close(0).await;
            continue;
        }
        let held = scan.read_all().await;
        let now = Utc::now();
        let read = held.map(|held| {
            held.iter()
                .map(|h| {
                    let mut entry = DlqEntry::from_message(&h.properties, &h.data, now);
                    if queue == DlqQueue::Delay && entry.class.is_none() {
                        // No failure headers: deferred (rate budget, busy, held), not failed.
                        entry.reason = "deferred".into();
                    }
                    entry
                })
                .filter(|e| filter.matches(e))
                .collect::<Vec<_>>()
        });
        scan.close(0).await;
        entries.extend(read?);
    }
    Ok(entries
        .into_iter()
        .skip(page.offset)
        .take(page.limit)
        .collect())
}

/// Headers and pretty-printed body of the message with this event id (parked queue first,
/// then dead, then the delay queues).
pub async fn show(broker: &Broker, id: &str) -> Result<String, DlqError> {
    let id = id.trim();
    if id.is_empty() {
        return Err(DlqError::BadFilter("empty event id".into()));
    }
    for queue in [DlqQueue::Parked, DlqQueue::Dead, DlqQueue::Delay] {
        for name in queue.queue_names(broker.topology()) {
            let scan = Scan::open(broker, queue, name).await?;
            let held = scan.read_all().await;
            let now = Utc::now();
            let found = held.map(|held| {
                held.iter()
                    .find(|h| DlqEntry::from_message(&h.properties, &h.data, now).event_id == id)
                    .map(|h| render_message(queue, h))
            });
            scan.close(0).await;
            if let Some(text) = found? {
                return Ok(text);
            }
        }
    }
    Err(DlqError::NotFound(id.to_owned()))
}

fn render_message(queue: DlqQueue, delivery: &Delivery) -> String {
    let props = &delivery.properties;
    let mut out = format!("queue: {queue}\n");
    let optional = |value: Option<String>| value.unwrap_or_else(|| "-".into());
    out.push_str(&format!(
        "message_id: {}\n",
        optional(props.message_id().as_ref().map(|v| v.to_string()))
    ));
    out.push_str(&format!(
        "content_type: {}\n",
        optional(props.content_type().as_ref().map(|v| v.to_string()))
    ));
    out.push_str(&format!(
        "published_at: {}\n",
        optional(
            props
                .timestamp()
                .and_then(|ts| i64::try_from(ts).ok())
                .and_then(|secs| DateTime::from_timestamp(secs, 0))
                .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
        )
    ));
    out.push_str("headers:\n");
    if let Some(headers) = props.headers() {
        for (key, value) in headers {
            out.push_str(&format!("  {key}: {}\n", render_value(value)));
        }
    }
    out.push_str("body:\n");
    match serde_json::from_slice::<serde_json::Value>(&delivery.data) {
        Ok(json) => out.push_str(&serde_json::to_string_pretty(&json).unwrap_or_default()),
        Err(_) => out.push_str(&String::from_utf8_lossy(&delivery.data)),
    }
    out.push('\n');
    out
}

/// A header value as one line (x-death tables and arrays as `{k=v, ...}` / `[...]`).
fn render_value(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::FieldArray(items) => format!(
            "[{}]",
            items
                .as_slice()
                .iter()
                .map(render_value)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        AMQPValue::FieldTable(table) => format!(
            "{{{}}}",
            table
                .inner()
                .iter()
                .map(|(k, v)| format!("{k}={}", render_value(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        AMQPValue::Timestamp(ts) => i64::try_from(*ts)
            .ok()
            .and_then(|secs| DateTime::from_timestamp(secs, 0))
            .map_or_else(|| ts.to_string(), |t| t.to_rfc3339()),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::DecimalValue(d) => format!("{d:?}"),
        AMQPValue::ByteArray(bytes) => format!("<{} bytes>", bytes.len()),
        AMQPValue::Void => "-".into(),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReplayOptions {
    pub dry_run: bool,
    /// At most this many messages republished per second.
    pub rate_per_sec: Option<f64>,
    /// Who replays (audit): an operator name or `$USER`.
    pub actor: String,
    /// Why (audit): free text, e.g. a ticket reference.
    pub reason: String,
}

/// One audited replay (also logged at info level, target `thena::audit`).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditLine {
    pub at: DateTime<Utc>,
    pub actor: String,
    pub why: String,
    pub event_id: String,
    pub workspace: String,
    pub from_queue: DlqQueue,
    pub to_exchange: String,
    pub to_routing_key: String,
    pub dry_run: bool,
}

impl fmt::Display for AuditLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} event {} (workspace {}) from {} to {} / {} by {:?} because {:?}",
            self.at.to_rfc3339_opts(SecondsFormat::Secs, true),
            if self.dry_run {
                "would replay"
            } else {
                "replayed"
            },
            self.event_id,
            self.workspace,
            self.from_queue,
            self.to_exchange,
            self.to_routing_key,
            self.actor,
            self.why,
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReplayReport {
    pub queue: DlqQueue,
    pub dry_run: bool,
    /// Messages that matched the filter.
    pub matched: usize,
    /// Republished with confirm and removed from the queue (0 in a dry run).
    pub replayed: usize,
    /// Messages in the queue that did not match (left in place).
    pub skipped: usize,
    /// Matching messages left in place because republishing failed: (event id, error).
    pub failed: Vec<(String, String)>,
    pub audit: Vec<AuditLine>,
}

impl ReplayReport {
    fn nothing(queue: DlqQueue, dry_run: bool) -> Self {
        ReplayReport {
            queue,
            dry_run,
            matched: 0,
            replayed: 0,
            skipped: 0,
            failed: Vec::new(),
            audit: Vec::new(),
        }
    }

    /// One line per audited message, then the totals; when nothing matched, only
    /// [`nothing_to_do`].
    pub fn render(&self) -> String {
        if self.matched == 0 {
            return nothing_to_do(self.queue);
        }
        let mut out = String::new();
        for line in &self.audit {
            out.push_str(&line.to_string());
            out.push('\n');
        }
        for (event_id, error) in &self.failed {
            out.push_str(&format!("FAILED {event_id}: {error}\n"));
        }
        out.push_str(&format!(
            "{}: {} matched, {} replayed, {} skipped (not matching), {} failed\n",
            if self.dry_run { "dry run" } else { "replay" },
            self.matched,
            self.replayed,
            self.skipped,
            self.failed.len()
        ));
        out
    }
}

/// Republishes every matching message to its original exchange and routing key, failure
/// headers stripped and `x-thena-replayed-by/at` added, with publisher confirm, and only
/// then removes it from the queue. A second replay therefore finds nothing to do. Stops at
/// the first publish error (the rest stays in the queue). `progress(done, total)` is
/// called after each message.
pub async fn replay(
    broker: &Broker,
    filter: &DlqFilter,
    options: &ReplayOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<ReplayReport, DlqError> {
    filter.validate()?;
    let interval = match options.rate_per_sec {
        None => None,
        Some(rate) if rate.is_finite() && rate > 0.0 => Some(Duration::from_secs_f64(1.0 / rate)),
        Some(rate) => {
            return Err(DlqError::BadOption(format!(
                "rate must be a positive number of messages per second, not {rate}"
            )));
        }
    };
    if options.actor.trim().is_empty() {
        return Err(DlqError::BadOption(
            "an actor is required for the audit log".into(),
        ));
    }
    let queue = filter.queue;
    if queue == DlqQueue::Delay {
        return Err(DlqError::DelayIsReadOnly);
    }
    let publisher = broker.publisher().await?;
    let name = queue.queue_names(broker.topology()).remove(0);
    let scan = Scan::open(broker, queue, name).await?;
    if scan.depth == 0 {
        scan.close(0).await;
        publisher.close().await;
        return Ok(ReplayReport::nothing(queue, options.dry_run));
    }
    let held = match scan.read_all().await {
        Ok(held) => held,
        Err(error) => {
            scan.close(0).await;
            publisher.close().await;
            return Err(error);
        }
    };
    let now = Utc::now();
    let (selected, others): (Vec<_>, Vec<_>) = held
        .into_iter()
        .partition(|h| filter.matches(&DlqEntry::from_message(&h.properties, &h.data, now)));
    let total = selected.len();
    let mut report = ReplayReport {
        queue,
        dry_run: options.dry_run,
        matched: total,
        replayed: 0,
        skipped: others.len(),
        failed: Vec::new(),
        audit: Vec::new(),
    };
    let mut next_slot = tokio::time::Instant::now();
    for (done, delivery) in selected.iter().enumerate() {
        let entry = DlqEntry::from_message(&delivery.properties, &delivery.data, now);
        let Some((exchange, routing_key)) = original_route(broker.topology(), delivery, &entry)
        else {
            report
                .failed
                .push((entry.event_id, "no original route in its headers".into()));
            continue;
        };
        let at = Utc::now();
        let audit = AuditLine {
            at,
            actor: options.actor.clone(),
            why: options.reason.clone(),
            event_id: entry.event_id.clone(),
            workspace: entry.workspace.clone(),
            from_queue: queue,
            to_exchange: exchange.clone(),
            to_routing_key: routing_key.clone(),
            dry_run: options.dry_run,
        };
        if !options.dry_run {
            if let Some(interval) = interval {
                tokio::time::sleep_until(next_slot).await;
                next_slot = tokio::time::Instant::now() + interval;
            }
            let props = replayed_properties(&delivery.properties, options, at);
            if let Err(error) = publisher
                .publish_raw(&exchange, &routing_key, &delivery.data, props)
                .await
            {
                report.failed.push((entry.event_id, error.to_string()));
                // Something is wrong with the broker or the route: stop here.
                break;
            }
            if let Err(source) = delivery.ack(BasicAckOptions::default()).await {
                // Republished but still parked: a second replay would publish it again.
                report.failed.push((
                    entry.event_id,
                    format!("replayed, but could not be removed from the {queue} queue: {source}"),
                ));
                break;
            }
            report.replayed += 1;
        }
        tracing::info!(
            target: "thena::audit",
            actor = %audit.actor,
            at = %audit.at.to_rfc3339(),
            why = %audit.why,
            event_id = %audit.event_id,
            workspace = %audit.workspace,
            from_queue = %queue,
            to_exchange = %audit.to_exchange,
            to_routing_key = %audit.to_routing_key,
            dry_run = audit.dry_run,
            "dlq replay"
        );
        report.audit.push(audit);
        progress(done + 1, total);
    }
    drop(selected);
    drop(others);
    scan.close(report.replayed).await;
    publisher.close().await;
    Ok(report)
}

/// Removes every message of the queue. Refuses unless `confirm` is true.
pub async fn purge(broker: &Broker, queue: DlqQueue, confirm: bool) -> Result<u32, DlqError> {
    if queue == DlqQueue::Delay {
        return Err(DlqError::DelayIsReadOnly);
    }
    let name = queue.queue_names(broker.topology()).remove(0);
    let channel = broker.channel().await?;
    let amqp = |source| DlqError::Amqp { queue, source };
    let result = async {
        if !confirm {
            let messages = queue_depth(&channel, &name).await.map_err(amqp)?;
            return Err(DlqError::ConfirmRequired { queue, messages });
        }
        let purged = channel
            .queue_purge(name.as_str().into(), QueuePurgeOptions::default())
            .await
            .map_err(amqp)?;
        tracing::info!(target: "thena::audit", queue = %queue, purged, "dlq purge");
        Ok(purged)
    }
    .await;
    close_quietly(&channel).await;
    result
}

/// Where a replayed message goes: its failure headers' original route, else the requests
/// exchange with its workspace's routing key.
fn original_route(
    topology: &Topology,
    delivery: &Delivery,
    entry: &DlqEntry,
) -> Option<(String, String)> {
    let failure = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(Failure::from_headers);
    match failure {
        Some(f) if !f.original_routing_key.is_empty() => {
            let exchange = if f.original_exchange.is_empty() {
                topology.exchange()
            } else {
                f.original_exchange
            };
            Some((exchange, f.original_routing_key))
        }
        _ if entry.workspace != "-" => {
            Some((topology.exchange(), Topology::routing_key(&entry.workspace)))
        }
        _ => None,
    }
}

fn replayed_properties(
    props: &BasicProperties,
    options: &ReplayOptions,
    at: DateTime<Utc>,
) -> BasicProperties {
    let mut headers: FieldTable = strip_failure_headers(props.headers().as_ref());
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    headers.insert(REPLAYED_BY_HEADER.into(), text(&options.actor));
    headers.insert(
        REPLAYED_AT_HEADER.into(),
        text(&at.to_rfc3339_opts(SecondsFormat::Millis, true)),
    );
    if !options.reason.is_empty() {
        headers.insert(REPLAY_REASON_HEADER.into(), text(&options.reason));
    }
    props.clone().with_headers(headers).with_delivery_mode(2)
}

/// A private channel holding fetched-but-unacked messages; closing it returns them.
struct Scan {
    broker: Broker,
    channel: Channel,
    queue: DlqQueue,
    name: String,
    depth: u32,
}

/// How long [`Scan::close`] waits for returned messages to be counted in the queue again.
const RETURN_SETTLE_TIMEOUT: Duration = Duration::from_secs(3);

impl Scan {
    async fn open(broker: &Broker, queue: DlqQueue, name: String) -> Result<Scan, DlqError> {
        let channel = broker.channel().await?;
        match queue_depth(&channel, &name).await {
            Ok(depth) => Ok(Scan {
                broker: broker.clone(),
                channel,
                queue,
                name,
                depth,
            }),
            Err(source) => {
                close_quietly(&channel).await;
                Err(DlqError::Amqp { queue, source })
            }
        }
    }

    /// Fetches (without ack) the messages that were in the queue when it was opened.
    async fn read_all(&self) -> Result<Vec<Delivery>, DlqError> {
        let mut held = Vec::new();
        while held.len() < self.depth as usize {
            let got = self
                .channel
                .basic_get(self.name.as_str().into(), BasicGetOptions { no_ack: false })
                .await
                .map_err(|source| DlqError::Amqp {
                    queue: self.queue,
                    source,
                })?;
            match got {
                Some(message) => held.push(message.delivery),
                None => break,
            }
        }
        Ok(held)
    }

    /// Returns every message not acked to the queue, and waits (briefly) until the queue
    /// counts them again, so a command run right after this one sees them.
    async fn close(self, acked: usize) {
        close_quietly(&self.channel).await;
        if self.queue == DlqQueue::Delay {
            // A returned message whose delay ended meanwhile moves on at once: the depth
            // need not come back, and nothing is waiting to read it.
            return;
        }
        let expected = (self.depth as usize).saturating_sub(acked);
        let Ok(probe) = self.broker.channel().await else {
            return;
        };
        let until = tokio::time::Instant::now() + RETURN_SETTLE_TIMEOUT;
        while tokio::time::Instant::now() < until {
            match queue_depth(&probe, &self.name).await {
                Ok(depth) if depth as usize >= expected => break,
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(_) => return,
            }
        }
        close_quietly(&probe).await;
    }
}

async fn close_quietly(channel: &Channel) {
    if channel.status().connected()
        && let Err(error) = channel.close(200, "dlq done".into()).await
    {
        tracing::debug!(%error, "closing the dlq channel failed");
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;

    fn entry(workspace: &str, reason: &str, age_secs: u64, id: &str) -> DlqEntry {
        DlqEntry {
            event_id: id.into(),
            workspace: workspace.into(),
            request_id: Some(7),
            reason: reason.into(),
            class: Some(FailureClass::Permanent),
            attempts: 2,
            first_failure: None,
            age: Some(Duration::from_secs(age_secs)),
            last_error: String::new(),
        }
    }

    #[test]
    fn an_empty_filter_matches_everything() {
        assert!(DlqFilter::default().matches(&entry("W", "r", 5, "e1")));
    }

    #[test]
    fn filters_combine_workspace_reason_age_and_ids() {
        let filter = DlqFilter {
            workspace: Some("W1".into()),
            reason: Some("no_integration".into()),
            older_than: Some(Duration::from_secs(60)),
            younger_than: Some(Duration::from_secs(3_600)),
            ids: vec!["e1".into(), "e2".into()],
            ..DlqFilter::default()
        };
        assert!(filter.matches(&entry("W1", "no_integration", 120, "e1")));
        assert!(!filter.matches(&entry("W2", "no_integration", 120, "e1")));
        assert!(!filter.matches(&entry("W1", "too_old", 120, "e1")));
        assert!(!filter.matches(&entry("W1", "no_integration", 30, "e1")));
        assert!(!filter.matches(&entry("W1", "no_integration", 7_200, "e1")));
        assert!(!filter.matches(&entry("W1", "no_integration", 120, "e3")));
    }

    #[test]
    fn a_contradictory_or_empty_filter_is_refused() {
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
        assert!("archive".parse::<DlqQueue>().is_err());
        assert_eq!("dead".parse::<DlqQueue>().unwrap(), DlqQueue::Dead);
        assert_eq!("delay".parse::<DlqQueue>().unwrap(), DlqQueue::Delay);
    }

    #[test]
    fn durations_read_like_an_operator_writes_them() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration(" 2h").unwrap(), Duration::from_secs(7_200));
        assert_eq!(parse_duration("3d").unwrap(), Duration::from_secs(259_200));
        for bad in ["", "h", "2 h", "2w", "-1s", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ages_are_short_and_readable() {
        assert_eq!(format_age(Duration::from_secs(59)), "59s");
        assert_eq!(format_age(Duration::from_secs(245)), "4m05s");
        assert_eq!(format_age(Duration::from_secs(7_380)), "2h03m");
        assert_eq!(format_age(Duration::from_secs(273_600)), "3d04h");
    }

    #[test]
    fn an_entry_reads_headers_and_body_and_tolerates_garbage() {
        let now = Utc::now();
        let failure = Failure::new(
            FailureClass::Permanent,
            "no_integration",
            "no integration for workspace W1",
            "p.requests",
            "request.W1",
            now - TimeDelta::minutes(3),
        );
        let mut headers = failure.to_headers();
        headers.insert(WORKSPACE_HEADER.into(), AMQPValue::LongString("W1".into()));
        let props = BasicProperties::default()
            .with_message_id("ev-1".into())
            .with_headers(headers);
        let event = thena_events::sample::event("W1", 99, 1, None);
        let body = serde_json::to_vec(&event).unwrap();
        let e = DlqEntry::from_message(&props, &body, now);
        assert_eq!(e.event_id, "ev-1");
        assert_eq!(e.workspace, "W1");
        assert_eq!(e.request_id, Some(99));
        assert_eq!(e.reason, "no_integration");
        assert_eq!(e.class, Some(FailureClass::Permanent));
        assert_eq!(e.age.map(|a| a.as_secs() / 60), Some(3));

        let garbage = DlqEntry::from_message(&BasicProperties::default(), b"\xff not json", now);
        assert_eq!(garbage.event_id, "-");
        assert_eq!(garbage.workspace, "-");
        assert_eq!(garbage.request_id, None);
        assert_eq!(garbage.reason, "delivery_limit");
        assert_eq!(garbage.age, None);
    }

    #[test]
    fn the_table_has_a_header_and_aligned_rows() {
        let table = render_table(&[
            entry("W1", "no_integration", 65, "e1"),
            entry("WORKSPACE-LONG", "too_old", 90_000, "e2"),
        ]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].starts_with("EVENT ID  WORKSPACE       REQUEST"),
            "{table}"
        );
        assert!(lines[1].contains("no_integration") && lines[1].ends_with("1m05s"));
        assert!(lines[2].ends_with("1d01h"));
        let reason_column = lines[0].find("REASON").unwrap();
        assert_eq!(&lines[2][reason_column..reason_column + 7], "too_old");
        assert_eq!(render_table(&[]), "no matching messages\n");
    }

    #[test]
    fn a_replayed_message_loses_its_failure_headers_and_gains_the_audit_ones() {
        let now = Utc::now();
        let mut headers =
            Failure::new(FailureClass::Permanent, "x", "y", "e", "r", now).to_headers();
        headers.insert(WORKSPACE_HEADER.into(), AMQPValue::LongString("W1".into()));
        let props = BasicProperties::default()
            .with_message_id("ev".into())
            .with_headers(headers);
        let options = ReplayOptions {
            dry_run: false,
            rate_per_sec: None,
            actor: "ops@thena".into(),
            reason: "INC-42".into(),
        };
        let out = replayed_properties(&props, &options, now);
        let h = out.headers().clone().unwrap();
        assert!(Failure::from_headers(&h).is_none());
        assert!(!h.contains_key("x-thena-reason"));
        assert_eq!(header_str(&h, WORKSPACE_HEADER).as_deref(), Some("W1"));
        assert_eq!(
            header_str(&h, REPLAYED_BY_HEADER).as_deref(),
            Some("ops@thena")
        );
        assert!(header_str(&h, REPLAYED_AT_HEADER).is_some());
        assert_eq!(out.message_id().as_ref().unwrap().as_str(), "ev");
    }
}
