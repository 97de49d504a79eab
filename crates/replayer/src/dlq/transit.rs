//! Looking into the transit queues — the dead queue (the replayer's input) and the delay
//! tiers — which messages only pass through. Read-only: their messages move on by
//! themselves. The parked set is in PostgreSQL ([`super::Dlq`]), never browsed here.
//!
//! Messages are read with `basic.get` without auto-ack on a private channel and returned
//! when it closes, so looking never loses a message. Each look is one delivery: fine for
//! queues whose messages stay seconds to minutes, which is why the parked set is not a
//! queue any more.

use std::{fmt, str::FromStr, time::Duration};

use chrono::{DateTime, SecondsFormat, Utc};
use lapin::{BasicProperties, Channel, message::Delivery, options::BasicGetOptions};
use thena_broker::{Broker, Failure, FailureClass, Topology, WORKSPACE_HEADER, header_str};

use super::{DlqError, DlqFilter, render};
use crate::{parked::headers_json, replayer::queue_depth, schedule::poison_reason};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DlqQueue {
    /// The parked set (PostgreSQL): what waits for a human.
    #[default]
    Parked,
    /// Waiting for the replayer (normally for milliseconds).
    Dead,
    /// Every delay tier's queue: retried and deferred events waiting for their delay to
    /// end; they go back to the sync queue by themselves.
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

/// One message of a transit queue, as much as can be read from it (an undecodable body
/// still lists, with what its headers say).
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

impl DlqFilter {
    /// Whether a transit message matches (ids name rows of the parked set: none here).
    pub fn matches(&self, entry: &DlqEntry) -> bool {
        self.workspace
            .as_deref()
            .is_none_or(|ws| entry.workspace == ws)
            && self.reason.as_deref().is_none_or(|r| entry.reason == r)
            && self
                .request_id
                .is_none_or(|id| entry.request_id == Some(id))
            && self.ids.is_empty()
            && self
                .older_than
                .is_none_or(|min| entry.age.is_some_and(|age| age >= min))
            && self
                .younger_than
                .is_none_or(|max| entry.age.is_some_and(|age| age < max))
    }
}

/// Lists the matching messages of a transit queue (at most `limit`), without removing any.
pub async fn list(
    broker: &Broker,
    queue: DlqQueue,
    filter: &DlqFilter,
    limit: usize,
) -> Result<Vec<DlqEntry>, DlqError> {
    filter.validate()?;
    transit_only(queue)?;
    let mut entries = Vec::new();
    for name in queue.queue_names(broker.topology()) {
        let scan = Scan::open(broker, queue, name).await?;
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
        scan.close().await;
        entries.extend(read?);
    }
    entries.truncate(limit);
    Ok(entries)
}

/// Headers and pretty-printed body of the transit message with this event id (dead queue
/// first, then the delay tiers).
pub async fn show(broker: &Broker, event_id: &str) -> Result<String, DlqError> {
    let event_id = event_id.trim();
    for queue in [DlqQueue::Dead, DlqQueue::Delay] {
        for name in queue.queue_names(broker.topology()) {
            let scan = Scan::open(broker, queue, name).await?;
            let held = scan.read_all().await;
            let now = Utc::now();
            let found = held.map(|held| {
                held.iter()
                    .find(|h| {
                        DlqEntry::from_message(&h.properties, &h.data, now).event_id == event_id
                    })
                    .map(|h| render_message(queue, h))
            });
            scan.close().await;
            if let Some(text) = found? {
                return Ok(text);
            }
        }
    }
    Err(DlqError::NotFound(event_id.to_owned()))
}

/// Refuses the parked set, which is not a queue to browse.
pub(super) fn transit_only(queue: DlqQueue) -> Result<(), DlqError> {
    match queue {
        DlqQueue::Dead | DlqQueue::Delay => Ok(()),
        DlqQueue::Parked => Err(DlqError::BadOption(
            "the parked set is read from PostgreSQL, not browsed in RabbitMQ".into(),
        )),
    }
}

fn render_message(queue: DlqQueue, delivery: &Delivery) -> String {
    let props = &delivery.properties;
    let optional = |value: Option<String>| value.unwrap_or_else(|| "-".into());
    let mut out = format!("queue: {queue}\n");
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
    let headers = props.headers().as_ref().map(headers_json);
    out.push_str(&render::headers_and_body(
        headers.as_ref(),
        Some(&delivery.data),
    ));
    out
}

/// A private channel holding fetched-but-unacked messages; closing it returns them.
struct Scan {
    channel: Channel,
    queue: DlqQueue,
    name: String,
    depth: u32,
}

impl Scan {
    async fn open(broker: &Broker, queue: DlqQueue, name: String) -> Result<Scan, DlqError> {
        let channel = broker.channel().await?;
        match queue_depth(&channel, &name).await {
            Ok(depth) => Ok(Scan {
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

    /// Returns every message to its queue. (A returned delay-tier message whose delay
    /// ended meanwhile moves on at once; a dead letter goes to the replayer.)
    async fn close(self) {
        close_quietly(&self.channel).await;
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
    use lapin::types::AMQPValue;

    use super::*;

    fn entry(workspace: &str, reason: &str, age_secs: u64, request: u64) -> DlqEntry {
        DlqEntry {
            event_id: "e1".into(),
            workspace: workspace.into(),
            request_id: Some(request),
            reason: reason.into(),
            class: Some(FailureClass::Permanent),
            attempts: 2,
            first_failure: None,
            age: Some(Duration::from_secs(age_secs)),
            last_error: String::new(),
        }
    }

    #[test]
    fn an_empty_filter_matches_every_transit_message() {
        assert!(DlqFilter::default().matches(&entry("W", "r", 5, 7)));
    }

    #[test]
    fn transit_filters_combine_workspace_reason_request_and_age() {
        let filter = DlqFilter {
            workspace: Some("W1".into()),
            reason: Some("vitally_503".into()),
            request_id: Some(7),
            older_than: Some(Duration::from_secs(60)),
            younger_than: Some(Duration::from_secs(3_600)),
            ..DlqFilter::default()
        };
        assert!(filter.matches(&entry("W1", "vitally_503", 120, 7)));
        assert!(!filter.matches(&entry("W2", "vitally_503", 120, 7)));
        assert!(!filter.matches(&entry("W1", "too_old", 120, 7)));
        assert!(!filter.matches(&entry("W1", "vitally_503", 120, 8)));
        assert!(!filter.matches(&entry("W1", "vitally_503", 30, 7)));
        assert!(!filter.matches(&entry("W1", "vitally_503", 7_200, 7)));
        let by_row = DlqFilter {
            ids: vec![3],
            ..DlqFilter::default()
        };
        assert!(!by_row.matches(&entry("W1", "vitally_503", 120, 7)));
    }

    #[test]
    fn an_entry_reads_headers_and_body_and_tolerates_garbage() {
        let now = Utc::now();
        let failure = Failure::new(
            FailureClass::Transient,
            "vitally_503",
            "503",
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
        assert_eq!(e.reason, "vitally_503");
        assert_eq!(e.class, Some(FailureClass::Transient));
        assert_eq!(e.age.map(|a| a.as_secs() / 60), Some(3));

        let garbage = DlqEntry::from_message(&BasicProperties::default(), b"\xff not json", now);
        assert_eq!(garbage.event_id, "-");
        assert_eq!(garbage.workspace, "-");
        assert_eq!(garbage.request_id, None);
        assert_eq!(garbage.reason, "delivery_limit");
        assert_eq!(garbage.age, None);
    }

    #[test]
    fn queue_names_parse_and_the_parked_set_is_not_browsed() {
        assert!("archive".parse::<DlqQueue>().is_err());
        assert_eq!("dead".parse::<DlqQueue>().unwrap(), DlqQueue::Dead);
        assert_eq!("delay".parse::<DlqQueue>().unwrap(), DlqQueue::Delay);
        assert!(transit_only(DlqQueue::Parked).is_err());
        assert!(transit_only(DlqQueue::Delay).is_ok());
    }
}
