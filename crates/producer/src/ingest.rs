//! `POST /v1/events`: decode (one object, a JSON array, or NDJSON), validate every event
//! strictly, publish all of them with confirms, answer 202 only when every one is confirmed.
//!
//! Decoding and validation are pure ([`framing`], [`decode`]); the handler adds the broker.

use std::time::{Duration, Instant};

use axum::{
    Json,
    body::Bytes,
    extract::{State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use futures_util::future::join_all;
use serde::Serialize;
use serde_json::{Value, json};
use thena_broker::Publisher;
use thena_events::{Limits, Problem, RequestChanged, parse_value};
use uuid::Uuid;

use crate::{app::AppState, error::ApiError, metrics::EventOutcome};

/// How the events in a body are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// One event object or an array of events.
    Json,
    /// One event per line (`application/x-ndjson`); blank lines are ignored.
    Ndjson,
}

/// The framing for a `Content-Type`, or `None` when the media type is not one we read.
/// An absent header means JSON: `curl -d` and most webhooks senders omit or mangle it.
pub fn framing(content_type: Option<&str>) -> Option<Framing> {
    let Some(content_type) = content_type else {
        return Some(Framing::Json);
    };
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => Some(Framing::Json),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => {
            Some(Framing::Ndjson)
        }
        other if other.starts_with("application/") && other.ends_with("+json") => {
            Some(Framing::Json)
        }
        _ => None,
    }
}

/// One problem of one event in a body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventProblem {
    /// Position of the event in the body (0-based; NDJSON counts non-blank lines).
    pub index: usize,
    /// 1-based line number, for NDJSON bodies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// Field path inside the event (`$` for the event as a whole).
    pub path: String,
    pub message: String,
}

/// Why a body was refused before anything was published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The body is not JSON (or not an object/array) at all.
    Malformed(Vec<EventProblem>),
    /// Zero events.
    Empty,
    /// At least one event is invalid: every problem of every event.
    Invalid {
        events: usize,
        problems: Vec<EventProblem>,
    },
}

impl Rejection {
    /// Events counted as rejected (a body we could not split counts as one).
    pub fn events(&self) -> usize {
        match self {
            Rejection::Malformed(_) | Rejection::Empty => 1,
            Rejection::Invalid { events, .. } => *events,
        }
    }

    fn into_api_error(self) -> ApiError {
        match self {
            Rejection::Malformed(problems) => {
                ApiError::new(StatusCode::BAD_REQUEST, "malformed body")
                    .with("problems", json!(problems))
            }
            Rejection::Empty => ApiError::new(StatusCode::BAD_REQUEST, "no events in body")
                .with("problems", json!([])),
            Rejection::Invalid { problems, .. } => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid events")
                    .with("problems", json!(problems))
            }
        }
    }
}

/// Splits a body into events and validates each: either every event is valid, or the
/// rejection lists every problem of every event (so a sender fixes them in one go).
pub fn decode(
    framing: Framing,
    body: &[u8],
    limits: &Limits,
) -> Result<Vec<RequestChanged>, Rejection> {
    let items: Vec<(Option<usize>, Result<Value, String>)> = match framing {
        Framing::Json => match serde_json::from_slice::<Value>(body) {
            Ok(Value::Array(items)) => items.into_iter().map(|v| (None, Ok(v))).collect(),
            Ok(object @ Value::Object(_)) => vec![(None, Ok(object))],
            Ok(other) => {
                return Err(Rejection::Malformed(vec![whole_body(format!(
                    "must be an event object or an array of events, got {}",
                    thena_events::json_kind(&other)
                ))]));
            }
            Err(e) => {
                return Err(Rejection::Malformed(vec![whole_body(format!(
                    "not valid JSON: {e}"
                ))]));
            }
        },
        Framing::Ndjson => {
            let Ok(text) = std::str::from_utf8(body) else {
                return Err(Rejection::Malformed(vec![whole_body("not valid UTF-8")]));
            };
            text.lines()
                .enumerate()
                .filter(|(_, line)| !line.trim().is_empty())
                .map(|(n, line)| {
                    let value = serde_json::from_str::<Value>(line)
                        .map_err(|e| format!("not valid JSON: {e}"));
                    (Some(n + 1), value)
                })
                .collect()
        }
    };
    if items.is_empty() {
        return Err(Rejection::Empty);
    }

    let events = items.len();
    let mut problems = Vec::new();
    let mut valid = Vec::with_capacity(events);
    for (index, (line, item)) in items.into_iter().enumerate() {
        let parsed = item.map_err(|message| {
            vec![Problem {
                path: "$".into(),
                message,
            }]
        });
        match parsed.and_then(|value| parse_value(value, limits).map_err(|e| e.problems)) {
            Ok(event) => valid.push(event),
            Err(found) => problems.extend(found.into_iter().map(|p| at(index, line, p))),
        }
    }
    if problems.is_empty() {
        Ok(valid)
    } else {
        Err(Rejection::Invalid { events, problems })
    }
}

fn at(index: usize, line: Option<usize>, problem: Problem) -> EventProblem {
    EventProblem {
        index,
        line,
        path: problem.path,
        message: problem.message,
    }
}

fn whole_body(message: impl Into<String>) -> EventProblem {
    EventProblem {
        index: 0,
        line: None,
        path: "$".into(),
        message: message.into(),
    }
}

/// Why one event was not confirmed. Every variant means "the broker could not take it
/// now": the client retries the whole batch and consumers dedupe by version.
#[derive(Debug)]
enum Unconfirmed {
    Broker(thena_broker::PublishError),
    Timeout(Duration),
}

async fn publish_one(
    publisher: &Publisher,
    event: &RequestChanged,
    timeout: Duration,
) -> Result<(), Unconfirmed> {
    match tokio::time::timeout(timeout, publisher.publish_event(event)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Unconfirmed::Broker(e)),
        Err(_) => Err(Unconfirmed::Timeout(timeout)),
    }
}

/// Publishes a batch concurrently (confirms are pipelined on the channel) and reports,
/// in input order, which events were confirmed.
async fn publish_batch(
    publisher: &Publisher,
    events: &[RequestChanged],
    timeout: Duration,
) -> Vec<bool> {
    let results = join_all(events.iter().map(|e| publish_one(publisher, e, timeout))).await;
    events
        .iter()
        .zip(results)
        .map(|(event, result)| match result {
            Ok(()) => true,
            Err(Unconfirmed::Broker(e)) => {
                tracing::warn!(event_id = %event.event_id, workspace_id = %event.workspace_id, request_id = event.request.id, error = %e, "publish not confirmed");
                false
            }
            Err(Unconfirmed::Timeout(after)) => {
                tracing::warn!(event_id = %event.event_id, workspace_id = %event.workspace_id, request_id = event.request.id, ?after, "publish confirm timed out");
                false
            }
        })
        .collect()
}

pub(crate) async fn post_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let (response, outcomes) = ingest(&state, &headers, body).await;
    let metrics = state.metrics();
    for (outcome, events) in outcomes {
        metrics.count(outcome, events);
    }
    metrics.observe(response.status().as_u16(), started.elapsed().as_secs_f64());
    response
}

async fn ingest(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> (Response, Vec<(EventOutcome, usize)>) {
    let refused = |error: ApiError| (error.into_response(), vec![(EventOutcome::Rejected, 1)]);
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return refused(
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body too large")
                    .with("limit_bytes", state.config().body_limit),
            );
        }
        Err(rejection) => {
            return refused(
                ApiError::new(rejection.status(), "could not read the body")
                    .with("detail", rejection.body_text()),
            );
        }
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let Some(framing) = framing(content_type) else {
        return refused(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send application/json (one event or an array) or application/x-ndjson",
        ));
    };

    let events = match decode(framing, &body, state.limits()) {
        Ok(events) => events,
        Err(rejection) => {
            let count = rejection.events();
            return (
                rejection.into_api_error().into_response(),
                vec![(EventOutcome::Rejected, count)],
            );
        }
    };

    let confirmed = publish_batch(state.publisher(), &events, state.config().publish_timeout).await;
    let (ok, failed): (Vec<_>, Vec<_>) = events.iter().zip(&confirmed).partition(|(_, c)| **c);
    let ids = |list: Vec<(&RequestChanged, &bool)>| {
        list.into_iter()
            .map(|(e, _)| e.event_id)
            .collect::<Vec<Uuid>>()
    };
    let (ok, failed) = (ids(ok), ids(failed));
    if failed.is_empty() {
        let body = json!({ "accepted": ok.len(), "event_ids": ok });
        let outcomes = vec![(EventOutcome::Accepted, ok.len())];
        return ((StatusCode::ACCEPTED, Json(body)).into_response(), outcomes);
    }
    let outcomes = vec![
        (EventOutcome::Accepted, ok.len()),
        (EventOutcome::Unavailable, failed.len()),
    ];
    let error = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "broker unavailable; retry the events that were not confirmed",
    )
    .with("accepted", ok.len())
    .with("event_ids", json!(ok))
    .with("unconfirmed_event_ids", json!(failed))
    .retry_later();
    (error.into_response(), outcomes)
}

#[cfg(test)]
mod tests {
    use thena_events::sample;

    use super::*;

    fn json_of(events: &[RequestChanged]) -> Vec<u8> {
        serde_json::to_vec(events).unwrap()
    }

    #[test]
    fn content_types_pick_the_framing() {
        assert_eq!(framing(None), Some(Framing::Json));
        assert_eq!(
            framing(Some("application/json; charset=utf-8")),
            Some(Framing::Json)
        );
        assert_eq!(framing(Some("Application/JSON")), Some(Framing::Json));
        assert_eq!(
            framing(Some("application/cloudevents-batch+json")),
            Some(Framing::Json)
        );
        assert_eq!(framing(Some("application/x-ndjson")), Some(Framing::Ndjson));
        assert_eq!(framing(Some("text/plain")), None);
        assert_eq!(framing(Some("application/x-www-form-urlencoded")), None);
    }

    #[test]
    fn one_object_and_an_array_both_decode() {
        let one = sample::full_event();
        let decoded = decode(
            Framing::Json,
            &serde_json::to_vec(&one).unwrap(),
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(decoded, vec![one.clone()]);

        let two = vec![one.clone(), sample::event("T1", 2, 1, None)];
        let decoded = decode(Framing::Json, &json_of(&two), &Limits::default()).unwrap();
        assert_eq!(decoded, two);
    }

    #[test]
    fn a_missing_event_id_is_assigned() {
        let mut value = serde_json::to_value(sample::full_event()).unwrap();
        value.as_object_mut().unwrap().remove("event_id");
        let decoded = decode(
            Framing::Json,
            value.to_string().as_bytes(),
            &Limits::default(),
        )
        .unwrap();
        assert_ne!(decoded[0].event_id, Uuid::nil());
        assert_ne!(decoded[0].event_id, sample::full_event().event_id);
    }

    #[test]
    fn ndjson_skips_blank_lines_and_reports_line_numbers() {
        let a = serde_json::to_string(&sample::event("T1", 1, 1, None)).unwrap();
        let body = format!("{a}\n\n   \n{{\"schema\":1}}\n{a}\n");
        let Err(Rejection::Invalid { events, problems }) =
            decode(Framing::Ndjson, body.as_bytes(), &Limits::default())
        else {
            panic!("expected invalid");
        };
        assert_eq!(events, 3);
        assert!(
            problems.iter().all(|p| p.index == 1 && p.line == Some(4)),
            "{problems:?}"
        );
        assert!(problems.iter().any(|p| p.path == "schema"));
        assert!(problems.iter().any(|p| p.path == "request"));

        let ok = format!("{a}\r\n{a}");
        assert_eq!(
            decode(Framing::Ndjson, ok.as_bytes(), &Limits::default())
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn every_problem_of_every_event_is_listed() {
        let mut first = serde_json::to_value(sample::event("T1", 1, 1, None)).unwrap();
        first["request"].as_object_mut().unwrap().remove("id");
        let good = serde_json::to_value(sample::event("T1", 2, 1, None)).unwrap();
        let mut third = serde_json::to_value(sample::event("T1", 3, 1, None)).unwrap();
        third["workspace_id"] = json!("bad space");
        third["request"]["requestor"]["email"] = json!("nope");
        let body = json!([first, good, third]).to_string();

        let Err(Rejection::Invalid { events, problems }) =
            decode(Framing::Json, body.as_bytes(), &Limits::default())
        else {
            panic!("expected invalid");
        };
        assert_eq!(events, 3);
        let found: Vec<(usize, &str)> = problems
            .iter()
            .map(|p| (p.index, p.path.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                (0, "request.id"),
                (2, "workspace_id"),
                (2, "request.requestor.email")
            ]
        );
    }

    #[test]
    fn bodies_that_are_not_events_are_malformed() {
        for body in ["not json", "", "42", "\"text\"", "null"] {
            let Err(Rejection::Malformed(problems)) =
                decode(Framing::Json, body.as_bytes(), &Limits::default())
            else {
                panic!("{body:?} should be malformed");
            };
            assert_eq!(problems[0].path, "$");
        }
        assert_eq!(
            decode(Framing::Json, b"[]", &Limits::default()),
            Err(Rejection::Empty)
        );
        assert_eq!(
            decode(Framing::Ndjson, b"\n \n", &Limits::default()),
            Err(Rejection::Empty)
        );
        assert!(matches!(
            decode(Framing::Ndjson, &[0xff, 0xfe], &Limits::default()),
            Err(Rejection::Malformed(_))
        ));
    }

    #[test]
    fn a_non_object_inside_an_array_is_a_problem_of_that_index() {
        let good = serde_json::to_value(sample::event("T1", 2, 1, None)).unwrap();
        let body = json!([good, 7]).to_string();
        let Err(Rejection::Invalid { problems, .. }) =
            decode(Framing::Json, body.as_bytes(), &Limits::default())
        else {
            panic!("expected invalid");
        };
        assert_eq!(problems.len(), 1);
        assert_eq!((problems[0].index, problems[0].path.as_str()), (1, "$"));
    }
}
