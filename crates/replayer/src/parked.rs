//! A parked message as a row of the parked set: pure functions of its properties and
//! body, so the drain's I/O only stores what these decide.

use chrono::{DateTime, Utc};
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use thena_broker::{
    BACKFILL_JOB_HEADER, Failure, PARKED_AT_HEADER, Topology, WORKSPACE_HEADER, header_str,
};
use thena_events::RequestChanged;
use thena_store::{dead_letters::NewDeadLetter, ledger::Entry};

use crate::schedule::{death_route, poison_failure};

/// Headers RabbitMQ adds or rewrites as it redelivers or dead-letters a message, and the
/// park time: none of them makes it another parked message.
const VOLATILE_HEADERS: [&str; 3] = ["x-delivery-count", "x-acquired-count", PARKED_AT_HEADER];

/// Likewise for every header starting with these (`x-death`, `x-first-death-queue`, …).
const VOLATILE_PREFIXES: [&str; 3] = ["x-death", "x-first-death-", "x-last-death-"];

/// What the drain stores for one parked message.
#[derive(Debug, Clone, PartialEq)]
pub struct Parked {
    pub letter: NewDeadLetter,
    /// The event, when the body decodes.
    pub event: Option<RequestChanged>,
    /// RabbitMQ put it in the parked queue (the dead queue's delivery limit), so no one
    /// wrote its request's ledger line yet: the drain does, with the row.
    pub by_rabbitmq: bool,
}

impl Parked {
    /// Pure: reads a message taken off the parked queue.
    pub fn read(
        props: &BasicProperties,
        body: &[u8],
        topology: &Topology,
        now: DateTime<Utc>,
    ) -> Parked {
        let headers = props.headers().as_ref();
        let parked_at = headers
            .and_then(|h| header_str(h, PARKED_AT_HEADER))
            .and_then(|at| DateTime::parse_from_rfc3339(&at).ok())
            .map(|at| at.with_timezone(&Utc));
        let event = thena_events::decode_event(body).ok();
        let workspace = headers
            .and_then(|h| header_str(h, WORKSPACE_HEADER))
            .or_else(|| event.as_ref().map(|e| e.workspace_id.clone()));
        let failure = match (parked_at, headers.and_then(Failure::from_headers)) {
            (Some(_), Some(failure)) => failure,
            _ => {
                let (exchange, routing_key) = death_route(headers)
                    .or_else(|| {
                        let ws = workspace.as_deref()?;
                        Some((topology.exchange(), Topology::routing_key(ws)))
                    })
                    .unwrap_or_else(|| (topology.exchange(), String::new()));
                poison_failure(headers, &exchange, &routing_key, now)
            }
        };
        let letter = NewDeadLetter {
            fingerprint: fingerprint(props, body),
            event_id: props
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
                .or_else(|| event.as_ref().map(|e| e.event_id.to_string())),
            workspace_id: workspace,
            request_id: event.as_ref().map(|e| e.request.id),
            version: event.as_ref().map(|e| e.request.version),
            reason: failure.reason.clone(),
            class: Some(failure.class.to_string()),
            attempts: failure.attempts,
            first_failure: failure.first_failure,
            parked_at: parked_at.unwrap_or(now),
            last_error: without_nul(&failure.last_error),
            original_exchange: failure.original_exchange.clone(),
            original_routing_key: failure.original_routing_key.clone(),
            headers: headers.map_or_else(|| json!({}), headers_json),
            properties: serde_json::to_value(props).unwrap_or(Value::Null),
            body: body.to_vec(),
        };
        Parked {
            letter,
            event,
            by_rabbitmq: parked_at.is_none(),
        }
    }

    /// The request's ledger line for this park, if the drain owes one.
    pub fn ledger_entry(&self) -> Option<Entry> {
        let event = self.event.as_ref().filter(|_| self.by_rabbitmq)?;
        let backfill_job = self
            .letter
            .headers
            .get(BACKFILL_JOB_HEADER)
            .and_then(Value::as_str);
        Some(parked_entry(
            event,
            &self.letter.reason,
            &self.letter.last_error,
            backfill_job,
        ))
    }
}

/// A request's ledger line for a park decided outside the consumer (by the replayer, or
/// by RabbitMQ's delivery limit): the consumer counted the attempts it saw. A backfilled
/// request's park settles its item of `backfill_job`.
pub fn parked_entry(
    event: &RequestChanged,
    reason: &str,
    error: &str,
    backfill_job: Option<&str>,
) -> Entry {
    Entry {
        workspace_id: event.workspace_id.clone(),
        request_id: event.request.id,
        version: event.request.version,
        snapshot: serde_json::to_value(event).ok(),
        outcome: "parked",
        reason: reason.to_owned(),
        detail: Some(error.to_owned()),
        link: None,
        instance_id: None,
        failed_attempt: false,
        backfill_job: backfill_job.map(str::to_owned),
        age: None,
    }
}

/// The parked message's identity: message id, body, and every header but the volatile
/// ones. A redelivery of it (or the same message parked again after bouncing from the
/// parked queue) has the same fingerprint; an event replayed and parked again does not
/// (its new failure starts a new history).
pub fn fingerprint(props: &BasicProperties, body: &[u8]) -> String {
    let stable: std::collections::BTreeMap<&str, &AMQPValue> = props
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .map(|(k, v)| (k.as_str(), v))
                .filter(|(k, _)| !volatile(k))
                .collect()
        })
        .unwrap_or_default();
    let mut hash = Sha256::new();
    let id = props.message_id().as_ref().map(|id| id.to_string());
    hash.update(id.unwrap_or_default().as_bytes());
    hash.update([0]);
    hash.update(serde_json::to_vec(&stable).unwrap_or_default());
    hash.update([0]);
    hash.update(body);
    hash.finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn volatile(header: &str) -> bool {
    VOLATILE_HEADERS.contains(&header) || VOLATILE_PREFIXES.iter().any(|p| header.starts_with(p))
}

/// Headers as JSON for people: strings as strings, numbers as numbers, timestamps as
/// RFC 3339, tables and arrays nested. PostgreSQL's jsonb refuses NUL, so it is dropped.
pub fn headers_json(headers: &FieldTable) -> Value {
    Value::Object(
        headers
            .inner()
            .iter()
            .map(|(key, value)| (without_nul(key.as_str()), value_json(value)))
            .collect(),
    )
}

fn value_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::LongString(s) => {
            Value::String(without_nul(&String::from_utf8_lossy(s.as_bytes())))
        }
        AMQPValue::ShortString(s) => Value::String(without_nul(s.as_str())),
        AMQPValue::FieldArray(items) => {
            Value::Array(items.as_slice().iter().map(value_json).collect())
        }
        AMQPValue::FieldTable(table) => headers_json(table),
        AMQPValue::Timestamp(ts) => i64::try_from(*ts)
            .ok()
            .and_then(|secs| DateTime::from_timestamp(secs, 0))
            .map_or_else(|| json!(ts), |t| json!(t.to_rfc3339())),
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(n) => json!(n),
        AMQPValue::Double(n) => json!(n),
        AMQPValue::DecimalValue(d) => json!(format!("{d:?}")),
        AMQPValue::ByteArray(bytes) => json!(format!("<{} bytes>", bytes.len())),
        AMQPValue::Void => Value::Null,
    }
}

fn without_nul(text: &str) -> String {
    text.replace('\0', "")
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;
    use lapin::types::{FieldArray, LongString};
    use thena_broker::FailureClass;

    use super::*;

    fn topology() -> Topology {
        Topology::new("p")
    }

    fn parked_props(failure: &Failure, parked_at: &str) -> BasicProperties {
        let mut headers = failure.to_headers();
        headers.insert(WORKSPACE_HEADER.into(), AMQPValue::LongString("W1".into()));
        headers.insert(
            PARKED_AT_HEADER.into(),
            AMQPValue::LongString(parked_at.into()),
        );
        BasicProperties::default()
            .with_message_id("ev-1".into())
            .with_headers(headers)
    }

    fn failure(now: DateTime<Utc>) -> Failure {
        Failure {
            attempts: 3,
            ..Failure::new(
                FailureClass::Permanent,
                "vitally_400",
                "400 Bad Request",
                "p.requests",
                "request.W1",
                now - TimeDelta::minutes(10),
            )
        }
    }

    #[test]
    fn a_parked_event_becomes_a_row_with_its_failure_and_request() {
        let now = Utc::now();
        let event = thena_events::sample::event("W1", 42, 7, None);
        let body = serde_json::to_vec(&event).unwrap();
        let props = parked_props(&failure(now), "2026-01-02T03:04:05.678Z");
        let parked = Parked::read(&props, &body, &topology(), now);
        let row = &parked.letter;
        assert_eq!(row.event_id.as_deref(), Some("ev-1"));
        assert_eq!(row.workspace_id.as_deref(), Some("W1"));
        assert_eq!((row.request_id, row.version), (Some(42), Some(7)));
        assert_eq!(row.reason, "vitally_400");
        assert_eq!(row.class.as_deref(), Some("permanent"));
        assert_eq!(row.attempts, 3);
        assert_eq!(row.first_failure, failure(now).first_failure);
        assert_eq!(row.parked_at.to_rfc3339(), "2026-01-02T03:04:05.678+00:00");
        assert_eq!(
            (
                row.original_exchange.as_str(),
                row.original_routing_key.as_str()
            ),
            ("p.requests", "request.W1")
        );
        assert_eq!(row.headers["x-thena-reason"], "vitally_400");
        assert_eq!(row.headers["x-thena-attempts"], 3);
        assert_eq!(row.body, body);
        // The consumer that parked it wrote the ledger line already.
        assert!(!parked.by_rabbitmq);
        assert!(parked.ledger_entry().is_none());
        let back: BasicProperties = serde_json::from_value(row.properties.clone()).unwrap();
        assert_eq!(back, props);
    }

    #[test]
    fn a_message_rabbitmq_parked_is_poison_routed_by_its_x_death_and_owes_a_ledger_line() {
        let now = Utc::now();
        let event = thena_events::sample::event("W2", 5, 2, None);
        let mut death = FieldTable::default();
        death.insert(
            "reason".into(),
            AMQPValue::LongString("delivery_limit".into()),
        );
        death.insert("count".into(), AMQPValue::LongLongInt(6));
        death.insert(
            "exchange".into(),
            AMQPValue::LongString("p.requests".into()),
        );
        death.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString(
                LongString::from("request.W2"),
            )])),
        );
        let mut headers = FieldTable::default();
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        let props = BasicProperties::default().with_headers(headers);
        let parked = Parked::read(
            &props,
            &serde_json::to_vec(&event).unwrap(),
            &topology(),
            now,
        );
        assert!(parked.by_rabbitmq);
        let row = &parked.letter;
        assert_eq!(row.reason, "delivery_limit");
        assert_eq!(row.class.as_deref(), Some("permanent"));
        assert_eq!(row.parked_at, now);
        assert_eq!(row.original_routing_key, "request.W2");
        assert_eq!(row.event_id, Some(event.event_id.to_string()));
        assert!(
            row.last_error.contains("6 deliveries"),
            "{}",
            row.last_error
        );
        let entry = parked.ledger_entry().expect("a ledger line");
        assert_eq!(
            (entry.outcome, entry.reason.as_str()),
            ("parked", "delivery_limit")
        );
        assert_eq!((entry.request_id, entry.version), (5, 2));
    }

    #[test]
    fn garbage_is_stored_with_what_its_headers_say() {
        let now = Utc::now();
        let mut headers = FieldTable::default();
        headers.insert(WORKSPACE_HEADER.into(), AMQPValue::LongString("W3".into()));
        headers.insert("x-odd".into(), AMQPValue::LongString("a\0b".into()));
        let props = BasicProperties::default().with_headers(headers);
        let parked = Parked::read(&props, b"\xff not json", &topology(), now);
        let row = &parked.letter;
        assert_eq!(row.workspace_id.as_deref(), Some("W3"));
        assert_eq!((row.request_id, row.event_id.as_deref()), (None, None));
        assert_eq!(row.original_routing_key, "request.W3");
        assert_eq!(row.headers["x-odd"], "ab");
        assert!(
            parked.ledger_entry().is_none(),
            "no request to write it for"
        );
        let nothing = Parked::read(&BasicProperties::default(), b"", &topology(), now);
        assert_eq!(nothing.letter.original_routing_key, "");
    }

    #[test]
    fn a_redelivery_keeps_the_fingerprint_and_another_failure_changes_it() {
        let now = Utc::now();
        let body = b"{}";
        let props = parked_props(&failure(now), "2026-01-02T03:04:05.678Z");
        let mut redelivered = props.headers().clone().unwrap();
        redelivered.insert("x-delivery-count".into(), AMQPValue::LongLongInt(2));
        redelivered.insert(
            PARKED_AT_HEADER.into(),
            AMQPValue::LongString("later".into()),
        );
        redelivered.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::default()),
        );
        let same = props.clone().with_headers(redelivered);
        assert_eq!(fingerprint(&props, body), fingerprint(&same, body));

        let again = Failure {
            first_failure: now,
            ..failure(now)
        };
        let parked_again = parked_props(&again, "2026-01-02T03:04:05.678Z");
        assert_ne!(fingerprint(&props, body), fingerprint(&parked_again, body));
        assert_ne!(fingerprint(&props, body), fingerprint(&props, b"{ }"));
        let other_id = props.clone().with_message_id("ev-2".into());
        assert_ne!(fingerprint(&props, body), fingerprint(&other_id, body));
    }
}
