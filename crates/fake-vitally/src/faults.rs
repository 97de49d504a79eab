//! Injected failures for `/resources` calls.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// A failure to inject. As JSON (for `POST /_fake/faults`):
///
/// ```json
/// {"type": "next_n", "method": "PUT", "path_prefix": "/resources/customObjects", "count": 2, "kind": {"status": 503}}
/// {"type": "next_n", "path_prefix": "/resources/users", "count": 1, "kind": {"latency_ms": 250}}
/// {"type": "next_n", "count": 1, "kind": "drop"}
/// {"type": "outage", "duration_ms": 500, "status": 503}
/// {"type": "search_lag", "lag_ms": 1500}
/// {"type": "every_nth", "method": "POST", "path_prefix": "/resources/customObjects/co-1/instances", "nth": 10, "kind": {"answer_late_ms": 3000}}
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Fault {
    /// The next `count` calls whose method matches (any when `None`, compared
    /// case-insensitively) and whose path starts with `path_prefix` (any when
    /// empty) suffer `kind`. Earlier-injected faults match first.
    NextN {
        #[serde(default)]
        method: Option<String>,
        #[serde(default)]
        path_prefix: String,
        count: u32,
        kind: FaultKind,
    },
    /// Every `nth` matching call (the nth, 2nth, …; matched like `NextN`) suffers
    /// `kind`, until cleared: "10 % of creates" is `nth: 10`.
    EveryNth {
        #[serde(default)]
        method: Option<String>,
        #[serde(default)]
        path_prefix: String,
        nth: u32,
        kind: FaultKind,
    },
    /// Search lags writes: an instance stays invisible to instance search for
    /// `lag` after it was created, until cleared.
    SearchLag {
        #[serde(rename = "lag_ms", with = "millis")]
        lag: Duration,
    },
    /// Every `/resources` call fails with `status` until `duration` after injection.
    Outage {
        #[serde(rename = "duration_ms", with = "millis")]
        duration: Duration,
        status: u16,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// Answer with this status and `{"error": ...}`. A 429 carries the RateLimit
    /// headers with `Remaining: 0` and `Reset: 1`.
    Status(u16),
    /// Wait this long, then handle the call normally.
    #[serde(rename = "latency_ms", with = "millis")]
    Latency(Duration),
    /// Cut the connection without sending a response.
    Drop,
    /// Apply the call, then answer this much later (past a client's timeout, the
    /// write happened but its answer is lost).
    #[serde(rename = "answer_late_ms", with = "millis")]
    AnswerLate(Duration),
}

/// Durations as whole milliseconds in JSON.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

impl Fault {
    /// The status this fault answers with, if any, for validating injected faults.
    pub(crate) fn status(&self) -> Option<u16> {
        match self {
            Self::NextN {
                kind: FaultKind::Status(status),
                ..
            }
            | Self::EveryNth {
                kind: FaultKind::Status(status),
                ..
            }
            | Self::Outage { status, .. } => Some(*status),
            Self::NextN { .. } | Self::EveryNth { .. } | Self::SearchLag { .. } => None,
        }
    }
}

/// What to do with one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    Status(u16),
    Latency(Duration),
    Drop,
    AnswerLate(Duration),
}

impl From<&FaultKind> for Action {
    fn from(kind: &FaultKind) -> Self {
        match kind {
            FaultKind::Status(status) => Action::Status(*status),
            FaultKind::Latency(delay) => Action::Latency(*delay),
            FaultKind::Drop => Action::Drop,
            FaultKind::AnswerLate(delay) => Action::AnswerLate(*delay),
        }
    }
}

/// `method` (any when `None`, case-insensitive) and `path_prefix` (any when empty) match.
fn matches(wanted: Option<&str>, path_prefix: &str, method: &str, path: &str) -> bool {
    wanted.is_none_or(|m| m.eq_ignore_ascii_case(method)) && path.starts_with(path_prefix)
}

#[derive(Debug)]
enum Armed {
    NextN {
        method: Option<String>,
        path_prefix: String,
        remaining: u32,
        kind: FaultKind,
    },
    EveryNth {
        method: Option<String>,
        path_prefix: String,
        nth: u32,
        seen: u32,
        kind: FaultKind,
    },
    SearchLag(Duration),
    Outage {
        until: Instant,
        status: u16,
    },
}

#[derive(Debug, Default)]
pub(crate) struct Faults {
    armed: Vec<Armed>,
}

impl Faults {
    pub(crate) fn inject(&mut self, fault: Fault, now: Instant) {
        self.armed.push(match fault {
            Fault::NextN {
                method,
                path_prefix,
                count,
                kind,
            } => Armed::NextN {
                method,
                path_prefix,
                remaining: count,
                kind,
            },
            Fault::EveryNth {
                method,
                path_prefix,
                nth,
                kind,
            } => Armed::EveryNth {
                method,
                path_prefix,
                nth: nth.max(1),
                seen: 0,
                kind,
            },
            Fault::SearchLag { lag } => Armed::SearchLag(lag),
            Fault::Outage { duration, status } => Armed::Outage {
                until: now + duration,
                status,
            },
        });
    }

    pub(crate) fn clear(&mut self) {
        self.armed.clear();
    }

    /// How long a new instance stays invisible to search (the longest armed lag).
    pub(crate) fn search_lag(&self) -> Option<std::time::Duration> {
        self.armed
            .iter()
            .filter_map(|armed| match armed {
                Armed::SearchLag(lag) => Some(*lag),
                Armed::NextN { .. } | Armed::EveryNth { .. } | Armed::Outage { .. } => None,
            })
            .max()
    }

    /// The fault, if any, that applies to this call; consumes one use of it. An
    /// outage wins over per-call faults.
    pub(crate) fn take(&mut self, method: &str, path: &str, now: Instant) -> Option<Action> {
        self.armed.retain(|armed| match armed {
            Armed::NextN { remaining, .. } => *remaining > 0,
            Armed::EveryNth { .. } | Armed::SearchLag(_) => true,
            Armed::Outage { until, .. } => now < *until,
        });
        let outage = self.armed.iter().find_map(|armed| match armed {
            Armed::Outage { status, .. } => Some(Action::Status(*status)),
            Armed::NextN { .. } | Armed::EveryNth { .. } | Armed::SearchLag(_) => None,
        });
        if outage.is_some() {
            return outage;
        }
        self.armed.iter_mut().find_map(|armed| match armed {
            Armed::NextN {
                method: wanted,
                path_prefix,
                remaining,
                kind,
            } if matches(wanted.as_deref(), path_prefix, method, path) => {
                *remaining -= 1;
                Some(Action::from(&*kind))
            }
            Armed::EveryNth {
                method: wanted,
                path_prefix,
                nth,
                seen,
                kind,
            } if matches(wanted.as_deref(), path_prefix, method, path) => {
                *seen += 1;
                (*seen % *nth == 0).then(|| Action::from(&*kind))
            }
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn faults_have_a_readable_json_form() {
        let cases = [
            (
                json!({"type": "next_n", "method": "PUT", "path_prefix": "/resources/users", "count": 2, "kind": {"status": 503}}),
                Fault::NextN {
                    method: Some("PUT".into()),
                    path_prefix: "/resources/users".into(),
                    count: 2,
                    kind: FaultKind::Status(503),
                },
            ),
            (
                json!({"type": "next_n", "method": null, "path_prefix": "", "count": 1, "kind": {"latency_ms": 250}}),
                Fault::NextN {
                    method: None,
                    path_prefix: String::new(),
                    count: 1,
                    kind: FaultKind::Latency(Duration::from_millis(250)),
                },
            ),
            (
                json!({"type": "outage", "duration_ms": 500, "status": 503}),
                Fault::Outage {
                    duration: Duration::from_millis(500),
                    status: 503,
                },
            ),
        ];
        for (value, fault) in cases {
            assert_eq!(serde_json::to_value(&fault).ok(), Some(value.clone()));
            assert_eq!(serde_json::from_value::<Fault>(value).ok(), Some(fault));
        }
        let drop: Fault =
            serde_json::from_value(json!({"type": "next_n", "count": 1, "kind": "drop"}))
                .expect("minimal next_n parses");
        assert_eq!(
            drop,
            Fault::NextN {
                method: None,
                path_prefix: String::new(),
                count: 1,
                kind: FaultKind::Drop
            }
        );
    }

    #[test]
    fn a_next_n_fault_matches_method_and_prefix_then_runs_out() {
        let now = Instant::now();
        let mut faults = Faults::default();
        faults.inject(
            Fault::NextN {
                method: Some("post".into()),
                path_prefix: "/resources/users".into(),
                count: 2,
                kind: FaultKind::Status(500),
            },
            now,
        );
        assert_eq!(faults.take("GET", "/resources/users/search", now), None);
        assert_eq!(faults.take("POST", "/resources/accounts", now), None);
        assert_eq!(
            faults.take("POST", "/resources/users", now),
            Some(Action::Status(500))
        );
        assert_eq!(
            faults.take("POST", "/resources/users", now),
            Some(Action::Status(500))
        );
        assert_eq!(faults.take("POST", "/resources/users", now), None);
    }

    #[test]
    fn an_outage_ends_when_its_window_does() {
        let now = Instant::now();
        let mut faults = Faults::default();
        faults.inject(
            Fault::Outage {
                duration: Duration::from_secs(1),
                status: 503,
            },
            now,
        );
        assert_eq!(
            faults.take(
                "GET",
                "/resources/accounts",
                now + Duration::from_millis(999)
            ),
            Some(Action::Status(503))
        );
        assert_eq!(
            faults.take("GET", "/resources/accounts", now + Duration::from_secs(1)),
            None
        );
    }

    #[test]
    fn an_every_nth_fault_hits_every_nth_matching_call_and_parses() {
        let fault: Fault = serde_json::from_value(json!({
            "type": "every_nth", "method": "POST", "path_prefix": "/resources/customObjects/c/instances",
            "nth": 3, "kind": {"answer_late_ms": 1500}
        }))
        .expect("parses");
        let now = Instant::now();
        let mut faults = Faults::default();
        faults.inject(fault, now);
        let path = "/resources/customObjects/c/instances";
        let hits: Vec<Option<Action>> = (0..6).map(|_| faults.take("POST", path, now)).collect();
        let late = Some(Action::AnswerLate(Duration::from_millis(1500)));
        assert_eq!(hits, vec![None, None, late, None, None, late]);
        assert_eq!(faults.take("PUT", path, now), None);
        let lag: Fault =
            serde_json::from_value(json!({"type": "search_lag", "lag_ms": 200})).expect("lag");
        faults.inject(lag, now);
        assert_eq!(faults.search_lag(), Some(Duration::from_millis(200)));
        faults.clear();
        assert_eq!(faults.search_lag(), None);
    }
}
