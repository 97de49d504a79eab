//! Why a message failed, carried in its headers through dead-lettering, retries and
//! parking. Never holds credentials: the error text is scrubbed and truncated.

use std::{collections::BTreeMap, fmt, str::FromStr};

use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::redact::scrub_secrets;

pub const CLASS_HEADER: &str = "x-thena-class";
pub const REASON_HEADER: &str = "x-thena-reason";
pub const ATTEMPTS_HEADER: &str = "x-thena-attempts";
pub const FIRST_FAILURE_HEADER: &str = "x-thena-first-failure";
pub const LAST_ERROR_HEADER: &str = "x-thena-last-error";
pub const ORIGINAL_EXCHANGE_HEADER: &str = "x-thena-original-exchange";
pub const ORIGINAL_ROUTING_KEY_HEADER: &str = "x-thena-original-routing-key";
pub const RETRY_AT_HEADER: &str = "x-thena-retry-at";
/// Set by [`crate::Publisher::dead_letter`]: the message was dead-lettered by our code
/// (not by RabbitMQ's delivery limit). The replayer removes it when it schedules a retry.
pub const DEAD_LETTERED_AT_HEADER: &str = "x-thena-dead-lettered-at";
/// Set by [`crate::Publisher::park`].
pub const PARKED_AT_HEADER: &str = "x-thena-parked-at";
/// The event's workspace, set by the producer (readable without decoding the body).
pub const WORKSPACE_HEADER: &str = "x-thena-workspace";
/// The backfill job a historical snapshot belongs to (only on the backfill lane).
pub const BACKFILL_JOB_HEADER: &str = "x-thena-backfill-job";

/// Every header that describes a failure; stripped when a message is replayed by hand.
pub const FAILURE_HEADERS: [&str; 10] = [
    CLASS_HEADER,
    REASON_HEADER,
    ATTEMPTS_HEADER,
    FIRST_FAILURE_HEADER,
    LAST_ERROR_HEADER,
    ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    RETRY_AT_HEADER,
    DEAD_LETTERED_AT_HEADER,
    PARKED_AT_HEADER,
];

const LAST_ERROR_MAX_CHARS: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureClass {
    /// Timeouts, 5xx, connection errors: retried with backoff.
    Transient,
    /// 429 / out of budget: waits for the window, not counted as a failed attempt.
    RateLimited,
    /// Will never succeed as is (4xx, undecodable, no integration): parked.
    Permanent,
}

impl FailureClass {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Transient => "transient",
            FailureClass::RateLimited => "rate_limited",
            FailureClass::Permanent => "permanent",
        }
    }
}

impl fmt::Display for FailureClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FailureClass {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "transient" => Ok(FailureClass::Transient),
            "rate_limited" => Ok(FailureClass::RateLimited),
            "permanent" => Ok(FailureClass::Permanent),
            other => Err(format!(
                "unknown failure class {other:?} (expected transient, rate_limited or permanent)"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub class: FailureClass,
    /// Short machine-readable cause, e.g. `vitally_503`, `undecodable`, `no_integration`.
    pub reason: String,
    /// Retries scheduled so far (rate-limited waits are not counted).
    pub attempts: u32,
    pub first_failure: DateTime<Utc>,
    /// Scrubbed of credentials and truncated to 512 characters.
    pub last_error: String,
    /// Where the message was published originally; a retry or a replay goes back there.
    pub original_exchange: String,
    pub original_routing_key: String,
    /// Rate-limited: when the integration's window reopens.
    pub retry_at: Option<DateTime<Utc>>,
}

impl Failure {
    /// The first failure of a message (no retry scheduled yet).
    pub fn new(
        class: FailureClass,
        reason: impl Into<String>,
        last_error: impl fmt::Display,
        original_exchange: impl Into<String>,
        original_routing_key: impl Into<String>,
        now: DateTime<Utc>,
    ) -> Failure {
        Failure {
            class,
            reason: reason.into(),
            attempts: 0,
            // Headers carry milliseconds: keep the value equal to what a reader gets back.
            first_failure: now.trunc_subsecs(3),
            last_error: clean_error(&last_error.to_string()),
            original_exchange: original_exchange.into(),
            original_routing_key: original_routing_key.into(),
            retry_at: None,
        }
    }

    /// The same message failed again: keeps its attempt count, first failure and original
    /// route; takes the new class, reason and error. `retry_at` is cleared.
    pub fn next_attempt(
        &self,
        class: FailureClass,
        reason: impl Into<String>,
        last_error: impl fmt::Display,
    ) -> Failure {
        Failure {
            class,
            reason: reason.into(),
            last_error: clean_error(&last_error.to_string()),
            retry_at: None,
            ..self.clone()
        }
    }

    /// What a consumer calls when a delivery fails: continues the failure history in the
    /// message's headers, or starts one at the delivery's exchange and routing key.
    pub fn for_delivery(
        headers: Option<&FieldTable>,
        exchange: &str,
        routing_key: &str,
        class: FailureClass,
        reason: impl Into<String>,
        last_error: impl fmt::Display,
        now: DateTime<Utc>,
    ) -> Failure {
        match headers.and_then(Failure::from_headers) {
            Some(previous) => previous.next_attempt(class, reason, last_error),
            None => Failure::new(class, reason, last_error, exchange, routing_key, now),
        }
    }

    pub fn with_retry_at(mut self, retry_at: DateTime<Utc>) -> Failure {
        self.retry_at = Some(retry_at.trunc_subsecs(3));
        self
    }

    pub fn to_headers(&self) -> FieldTable {
        let mut table = FieldTable::default();
        for (key, value) in self.header_values() {
            table.insert(key.into(), value);
        }
        table
    }

    /// `headers` merged with this failure: older failure headers are replaced, every other
    /// header (workspace, x-death, ...) is kept.
    pub fn merge_into(&self, headers: Option<&FieldTable>) -> FieldTable {
        let mut map = strip_failure_headers(headers).inner().clone();
        for (key, value) in self.header_values() {
            map.insert(ShortString::from(key), value);
        }
        FieldTable::from(map)
    }

    fn header_values(&self) -> Vec<(&'static str, AMQPValue)> {
        let mut values = vec![
            (CLASS_HEADER, text(self.class.as_str())),
            (REASON_HEADER, text(&self.reason)),
            (
                ATTEMPTS_HEADER,
                AMQPValue::LongLongInt(i64::from(self.attempts)),
            ),
            (FIRST_FAILURE_HEADER, text(&rfc3339(self.first_failure))),
            (LAST_ERROR_HEADER, text(&clean_error(&self.last_error))),
            (ORIGINAL_EXCHANGE_HEADER, text(&self.original_exchange)),
            (
                ORIGINAL_ROUTING_KEY_HEADER,
                text(&self.original_routing_key),
            ),
        ];
        if let Some(retry_at) = self.retry_at {
            values.push((RETRY_AT_HEADER, text(&rfc3339(retry_at))));
        }
        values
    }

    /// `None` when the message carries no (or no readable) failure headers, e.g. a
    /// message RabbitMQ dead-lettered itself at the delivery limit.
    pub fn from_headers(headers: &FieldTable) -> Option<Failure> {
        let class = header_str(headers, CLASS_HEADER)?.parse().ok()?;
        let reason = header_str(headers, REASON_HEADER)?;
        let first_failure = parse_time(&header_str(headers, FIRST_FAILURE_HEADER)?)?;
        Some(Failure {
            class,
            reason,
            attempts: header_u32(headers, ATTEMPTS_HEADER).unwrap_or(0),
            first_failure,
            last_error: header_str(headers, LAST_ERROR_HEADER).unwrap_or_default(),
            original_exchange: header_str(headers, ORIGINAL_EXCHANGE_HEADER).unwrap_or_default(),
            original_routing_key: header_str(headers, ORIGINAL_ROUTING_KEY_HEADER)
                .unwrap_or_default(),
            retry_at: header_str(headers, RETRY_AT_HEADER).and_then(|s| parse_time(&s)),
        })
    }
}

/// `headers` without any failure header (a replayed message starts a fresh history).
pub fn strip_failure_headers(headers: Option<&FieldTable>) -> FieldTable {
    let map: BTreeMap<ShortString, AMQPValue> = headers
        .map(|h| {
            h.inner()
                .iter()
                .filter(|(key, _)| !FAILURE_HEADERS.contains(&key.as_str()))
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect()
        })
        .unwrap_or_default();
    FieldTable::from(map)
}

/// A header's value as text (string headers, or integers rendered).
pub fn header_str(headers: &FieldTable, key: &str) -> Option<String> {
    match headers.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        other => header_int(other).map(|n| n.to_string()),
    }
}

fn header_u32(headers: &FieldTable, key: &str) -> Option<u32> {
    match headers.inner().get(key)? {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).trim().parse().ok(),
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok(),
        other => header_int(other).and_then(|n| u32::try_from(n).ok()),
    }
}

fn header_int(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        _ => None,
    }
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

pub(crate) fn rfc3339(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn parse_time(value: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(value)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn clean_error(error: &str) -> String {
    let scrubbed = scrub_secrets(error);
    match scrubbed.char_indices().nth(LAST_ERROR_MAX_CHARS) {
        Some((cut, _)) => scrubbed[..cut].to_owned(),
        None => scrubbed,
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn sample() -> Failure {
        Failure::new(
            FailureClass::Transient,
            "vitally_503",
            "503 Service Unavailable",
            "thena.requests",
            "request.T1",
            Utc.with_ymd_and_hms(2025, 1, 2, 3, 4, 5).unwrap(),
        )
    }

    #[test]
    fn a_failure_survives_a_round_trip_through_headers() {
        let failure = Failure {
            attempts: 7,
            retry_at: Some(Utc.with_ymd_and_hms(2025, 1, 2, 3, 5, 0).unwrap()),
            ..sample()
        };
        assert_eq!(Failure::from_headers(&failure.to_headers()), Some(failure));
        assert_eq!(
            Failure::from_headers(&sample().to_headers()),
            Some(sample())
        );
    }

    #[test]
    fn headers_use_the_documented_names() {
        let headers = sample().to_headers();
        let keys: Vec<&str> = headers.inner().keys().map(|k| k.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "x-thena-attempts",
                "x-thena-class",
                "x-thena-first-failure",
                "x-thena-last-error",
                "x-thena-original-exchange",
                "x-thena-original-routing-key",
                "x-thena-reason",
            ]
        );
        assert_eq!(
            header_str(&headers, FIRST_FAILURE_HEADER).as_deref(),
            Some("2025-01-02T03:04:05.000Z")
        );
        assert_eq!(header_str(&headers, ATTEMPTS_HEADER).as_deref(), Some("0"));
    }

    #[test]
    fn a_message_without_failure_headers_has_no_failure() {
        let mut headers = FieldTable::default();
        headers.insert("x-death".into(), AMQPValue::Void);
        assert_eq!(Failure::from_headers(&headers), None);
    }

    #[test]
    fn the_last_error_is_truncated_to_512_chars_and_scrubbed() {
        let long = "é".repeat(600);
        assert_eq!(
            Failure {
                last_error: String::new(),
                ..sample()
            }
            .next_attempt(FailureClass::Transient, "x", &long)
            .last_error
            .chars()
            .count(),
            512
        );
        let leaked = sample().next_attempt(
            FailureClass::Permanent,
            "vitally_401",
            "401 with Authorization: Basic dXNlcjpwYXNz",
        );
        assert!(!leaked.last_error.contains("dXNlcjpwYXNz"));
        // Even a Failure built by hand with a long error is cut when it becomes a header.
        let by_hand = Failure {
            last_error: "x".repeat(2000),
            ..sample()
        };
        let stored = header_str(&by_hand.to_headers(), LAST_ERROR_HEADER).unwrap();
        assert_eq!(stored.len(), 512);
    }

    #[test]
    fn a_repeated_failure_keeps_attempts_first_failure_and_route() {
        let first = Failure {
            attempts: 3,
            ..sample()
        };
        let again = Failure::for_delivery(
            Some(&first.with_retry_at(Utc::now()).to_headers()),
            "somewhere.else",
            "request.other",
            FailureClass::Permanent,
            "vitally_404",
            "not found",
            Utc::now(),
        );
        assert_eq!(again.attempts, 3);
        assert_eq!(again.first_failure, sample().first_failure);
        assert_eq!(again.original_exchange, "thena.requests");
        assert_eq!(again.original_routing_key, "request.T1");
        assert_eq!(again.class, FailureClass::Permanent);
        assert_eq!(again.reason, "vitally_404");
        assert_eq!(again.retry_at, None);
    }

    #[test]
    fn a_first_failure_starts_at_the_delivery_route() {
        let now = Utc::now();
        let failure = Failure::for_delivery(
            None,
            "p.requests",
            "request.W",
            FailureClass::Transient,
            "redis",
            "connection refused",
            now,
        );
        assert_eq!(failure.attempts, 0);
        assert_eq!(failure.first_failure, now.trunc_subsecs(3));
        assert_eq!(failure.original_routing_key, "request.W");
    }

    #[test]
    fn merging_replaces_old_failure_headers_and_keeps_the_rest() {
        let mut headers = Failure {
            attempts: 2,
            ..sample()
        }
        .with_retry_at(Utc::now())
        .to_headers();
        headers.insert(WORKSPACE_HEADER.into(), text("T1"));
        let merged = sample().merge_into(Some(&headers));
        assert_eq!(header_str(&merged, WORKSPACE_HEADER).as_deref(), Some("T1"));
        assert_eq!(header_str(&merged, ATTEMPTS_HEADER).as_deref(), Some("0"));
        assert!(!merged.contains_key(RETRY_AT_HEADER));
    }

    #[test]
    fn attempts_are_read_from_any_integer_or_string_header() {
        let mut headers = sample().to_headers();
        headers.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongInt(4));
        assert_eq!(Failure::from_headers(&headers).unwrap().attempts, 4);
        headers.insert(ATTEMPTS_HEADER.into(), text("9"));
        assert_eq!(Failure::from_headers(&headers).unwrap().attempts, 9);
    }
}
