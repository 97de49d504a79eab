//! What to do with a dead-lettered message: pure functions of its failure headers and the
//! clock, tested without sleeping. The replayer loop only carries out the decision.

use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::types::{AMQPValue, FieldTable};
use thena_broker::{DEAD_LETTERED_AT_HEADER, Failure, FailureClass, PARKED_AT_HEADER, Topology};

/// Parked because the message was older than [`RetrySchedule::max_age`].
pub const REASON_TOO_OLD: &str = "too_old";
/// Parked because RabbitMQ dead-lettered it after too many deliveries without an ack
/// (it crashed or stalled consumers): poison.
pub const REASON_DELIVERY_LIMIT: &str = "delivery_limit";

/// Default: a day of retries before a human has to look.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);

/// Used only when someone configures an empty tier list.
const FALLBACK_DELAY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySchedule {
    /// Ascending waits; attempt `n` waits `tiers[min(n - 1, len - 1)]`. They must be the
    /// broker topology's delay tiers (see [`RetrySchedule::for_topology`]).
    pub tiers: Vec<Duration>,
    /// Failures older than this (since the first failure) are parked as `too_old`.
    pub max_age: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send back to the sync queue through delay tier `tier` (which waits `delay`);
    /// `attempts` is the new attempt count to write into the headers.
    Retry {
        tier: usize,
        delay: Duration,
        attempts: u32,
    },
    /// Set aside for humans with this reason.
    Park { reason: String },
}

/// A decision with the failure headers to write on the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub decision: Decision,
    pub failure: Failure,
}

impl Default for RetrySchedule {
    fn default() -> Self {
        RetrySchedule::for_topology(&Topology::new("thena"))
    }
}

impl RetrySchedule {
    /// The topology's tiers, so every retry delay is one a delay queue exists for.
    pub fn for_topology(topology: &Topology) -> RetrySchedule {
        RetrySchedule {
            tiers: topology.delay_tiers.clone(),
            max_age: DEFAULT_MAX_AGE,
        }
    }

    pub fn with_max_age(mut self, max_age: Duration) -> RetrySchedule {
        self.max_age = max_age;
        self
    }

    /// The tier for retry attempt `attempt` (1-based; 0 counts as 1).
    pub fn tier_for_attempt(&self, attempt: u32) -> usize {
        let index = usize::try_from(attempt.saturating_sub(1)).unwrap_or(usize::MAX);
        index.min(self.tiers.len().saturating_sub(1))
    }

    pub fn tier_delay(&self, tier: usize) -> Duration {
        match self.tiers.len() {
            0 => FALLBACK_DELAY,
            len => self.tiers[tier.min(len - 1)],
        }
    }

    /// The smallest tier that waits at least `wait`, else the largest.
    pub fn tier_for_wait(&self, wait: Duration) -> usize {
        self.tiers
            .iter()
            .position(|tier| *tier >= wait)
            .unwrap_or(self.tiers.len().saturating_sub(1))
    }

    /// The whole policy for a message that carries a failure.
    pub fn decide(&self, failure: &Failure, now: DateTime<Utc>) -> Decision {
        let too_old = (now - failure.first_failure)
            .to_std()
            .is_ok_and(|age| age > self.max_age);
        match failure.class {
            FailureClass::Permanent => Decision::Park {
                reason: failure.reason.clone(),
            },
            FailureClass::Transient | FailureClass::RateLimited if too_old => Decision::Park {
                reason: REASON_TOO_OLD.to_owned(),
            },
            FailureClass::Transient => {
                let attempts = failure.attempts.saturating_add(1);
                let tier = self.tier_for_attempt(attempts);
                Decision::Retry {
                    tier,
                    delay: self.tier_delay(tier),
                    attempts,
                }
            }
            // Waiting for a rate-limit window is not a failed attempt.
            FailureClass::RateLimited => {
                let wait = failure
                    .retry_at
                    .and_then(|at| (at - now).to_std().ok())
                    .unwrap_or(Duration::ZERO);
                let tier = self.tier_for_wait(wait);
                Decision::Retry {
                    tier,
                    delay: self.tier_delay(tier),
                    attempts: failure.attempts,
                }
            }
        }
    }

    /// Decision and new headers for a message taken off the dead queue.
    ///
    /// `exchange` and `routing_key` are the message's original route, recorded if it
    /// has no failure history yet.
    ///
    /// Only a message our own code dead-lettered (it carries `x-thena-dead-lettered-at`
    /// and readable failure headers) goes through [`Self::decide`]. A parked message
    /// (`x-thena-parked-at`) came back from the parked queue past its delivery limit (the
    /// replayer could not store it): it is parked again as it was. Anything else reached
    /// the dead queue through RabbitMQ itself (delivery limit): poison, parked at once.
    pub fn plan(
        &self,
        headers: Option<&FieldTable>,
        exchange: &str,
        routing_key: &str,
        now: DateTime<Utc>,
    ) -> Plan {
        let marked = |key: &str| headers.is_some_and(|h| h.contains_key(key));
        match headers.and_then(Failure::from_headers) {
            Some(failure) if marked(PARKED_AT_HEADER) => Plan {
                decision: Decision::Park {
                    reason: failure.reason.clone(),
                },
                failure,
            },
            Some(failure) if marked(DEAD_LETTERED_AT_HEADER) => {
                let decision = self.decide(&failure, now);
                let failure = match &decision {
                    Decision::Retry { attempts, .. } => Failure {
                        attempts: *attempts,
                        ..failure
                    },
                    Decision::Park { reason } => Failure {
                        reason: reason.clone(),
                        ..failure
                    },
                };
                Plan { decision, failure }
            }
            Some(_) | None => {
                let failure = poison_failure(headers, exchange, routing_key, now);
                Plan {
                    decision: Decision::Park {
                        reason: failure.reason.clone(),
                    },
                    failure,
                }
            }
        }
    }
}

/// The failure of a message RabbitMQ dead-lettered itself (it crashed or stalled its
/// consumers until the queue's delivery limit): permanent, with the reason RabbitMQ gave,
/// keeping any earlier failure history (first failure, attempts, original route).
pub fn poison_failure(
    headers: Option<&FieldTable>,
    exchange: &str,
    routing_key: &str,
    now: DateTime<Utc>,
) -> Failure {
    let reason = poison_reason(headers);
    let error = format!(
        "dead-lettered by RabbitMQ ({reason}) after {} deliveries",
        death_count(headers).unwrap_or(0)
    );
    Failure::for_delivery(
        headers,
        exchange,
        routing_key,
        FailureClass::Permanent,
        reason,
        error,
        now,
    )
}

/// Where the message was first published, from its oldest `x-death` entry (RabbitMQ
/// records the exchange and routing keys of the queue it dead-lettered the message from).
pub fn death_route(headers: Option<&FieldTable>) -> Option<(String, String)> {
    let AMQPValue::FieldArray(deaths) = headers?.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(oldest) = deaths.as_slice().last()? else {
        return None;
    };
    let exchange = oldest.inner().get("exchange").and_then(as_text)?;
    let AMQPValue::FieldArray(keys) = oldest.inner().get("routing-keys")? else {
        return None;
    };
    let routing_key = keys.as_slice().first().and_then(as_text)?;
    Some((exchange, routing_key))
}

/// The reason RabbitMQ gave in the newest `x-death` entry: `delivery_limit` for poison,
/// `rejected` if a consumer rejected without requeue. Absent: `delivery_limit`.
pub fn poison_reason(headers: Option<&FieldTable>) -> String {
    newest_death(headers)
        .and_then(|death| death.inner().get("reason").and_then(as_text))
        .unwrap_or_else(|| REASON_DELIVERY_LIMIT.to_owned())
}

fn death_count(headers: Option<&FieldTable>) -> Option<i64> {
    match newest_death(headers)?.inner().get("count")? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

fn newest_death(headers: Option<&FieldTable>) -> Option<&FieldTable> {
    match headers?.inner().get("x-death")? {
        AMQPValue::FieldArray(deaths) => match deaths.as_slice().first()? {
            AMQPValue::FieldTable(death) => Some(death),
            _ => None,
        },
        _ => None,
    }
}

fn as_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;
    use lapin::types::{FieldArray, LongString};

    use super::*;

    fn schedule() -> RetrySchedule {
        RetrySchedule::default()
    }

    fn failure(class: FailureClass, attempts: u32, now: DateTime<Utc>) -> Failure {
        Failure {
            attempts,
            ..Failure::new(
                class,
                "vitally_503",
                "503",
                "thena.requests",
                "request.T1",
                now,
            )
        }
    }

    fn dead_lettered(failure: &Failure) -> FieldTable {
        let mut headers = failure.to_headers();
        headers.insert(
            DEAD_LETTERED_AT_HEADER.into(),
            AMQPValue::LongString("2025-01-01T00:00:00Z".into()),
        );
        headers
    }

    #[test]
    fn the_default_schedule_uses_the_topology_tiers_and_a_day_of_retries() {
        let s = schedule();
        assert_eq!(
            s.tiers,
            [1, 5, 30, 120, 240].map(Duration::from_secs).to_vec()
        );
        assert_eq!(s.max_age, Duration::from_secs(86_400));
    }

    #[test]
    fn attempt_n_waits_the_nth_tier_then_the_largest_forever() {
        let s = schedule();
        let now = Utc::now();
        let expected = [1, 5, 30, 120, 240, 240, 240].map(Duration::from_secs);
        for (previous, want) in expected.iter().enumerate() {
            let decision = s.decide(&failure(FailureClass::Transient, previous as u32, now), now);
            assert_eq!(
                decision,
                Decision::Retry {
                    tier: (previous).min(4),
                    delay: *want,
                    attempts: previous as u32 + 1,
                }
            );
        }
    }

    #[test]
    fn every_retry_delay_is_under_five_minutes_so_a_recovered_fault_is_retried_in_time() {
        // Once a fault ends, the next retry of every event it hit comes within one delay;
        // with a sync taking seconds, that is well inside the 10-minute guarantee.
        let s = schedule();
        let now = Utc::now();
        for attempts in (0..2_000).chain([u32::MAX - 1, u32::MAX]) {
            match s.decide(&failure(FailureClass::Transient, attempts, now), now) {
                Decision::Retry { delay, .. } => assert!(delay < Duration::from_secs(300)),
                Decision::Park { reason } => panic!("parked at attempt {attempts}: {reason}"),
            }
        }
    }

    #[test]
    fn transient_retries_continue_until_max_age_then_park_as_too_old() {
        // Simulated clock: follow one event through its whole retry life.
        let s = schedule();
        let start = Utc::now();
        let mut current = failure(FailureClass::Transient, 0, start);
        let mut now = start;
        let mut retries = 0u32;
        let mut cumulative = Duration::ZERO;
        loop {
            match s.decide(&current, now) {
                Decision::Retry {
                    delay, attempts, ..
                } => {
                    assert_eq!(attempts, current.attempts + 1);
                    retries += 1;
                    cumulative += delay;
                    now += TimeDelta::from_std(delay).unwrap();
                    current.attempts = attempts;
                }
                Decision::Park { reason } => {
                    assert_eq!(reason, REASON_TOO_OLD);
                    break;
                }
            }
        }
        // Parked on the first decision after 24 h, not before.
        assert!(cumulative > s.max_age);
        assert!(cumulative <= s.max_age + Duration::from_secs(240));
        // 1 + 5 + 30 + 120 s, then every 240 s for the rest of the day.
        let expected = 4 + (86_400 - 156) / 240 + 1;
        assert_eq!(retries, expected);
    }

    #[test]
    fn the_first_retries_come_quickly() {
        let s = schedule();
        let now = Utc::now();
        let mut cumulative = Duration::ZERO;
        for attempts in 0..4 {
            if let Decision::Retry { delay, .. } =
                s.decide(&failure(FailureClass::Transient, attempts, now), now)
            {
                cumulative += delay;
            }
        }
        // Four attempts within 3 minutes of the first failure.
        assert_eq!(cumulative, Duration::from_secs(156));
    }

    #[test]
    fn a_permanent_failure_is_parked_with_its_own_reason_even_when_old() {
        let s = schedule();
        let now = Utc::now();
        let mut f = failure(FailureClass::Permanent, 0, now);
        f.reason = "no_integration".into();
        assert_eq!(
            s.decide(&f, now),
            Decision::Park {
                reason: "no_integration".into()
            }
        );
        f.first_failure = now - TimeDelta::days(3);
        assert_eq!(
            s.decide(&f, now),
            Decision::Park {
                reason: "no_integration".into()
            }
        );
    }

    #[test]
    fn a_rate_limited_failure_waits_for_its_window_without_counting_an_attempt() {
        let s = schedule();
        let now = Utc::now();
        for (attempts, wait_secs, tier) in [
            (0, 0, 0),
            (0, 1, 0),
            (3, 2, 1),
            (3, 29, 2),
            (7, 100, 3),
            (7, 3_600, 4),
        ] {
            let f = failure(FailureClass::RateLimited, attempts, now)
                .with_retry_at(now + TimeDelta::seconds(wait_secs));
            match s.decide(&f, now) {
                Decision::Retry {
                    tier: got,
                    delay,
                    attempts: after,
                } => {
                    assert_eq!(after, attempts, "a 429 never counts as an attempt");
                    assert_eq!(got, tier, "wait {wait_secs}s");
                    assert!(delay >= Duration::from_secs(wait_secs as u64).min(s.tiers[4]));
                }
                Decision::Park { reason } => panic!("parked: {reason}"),
            }
        }
        // Window already over, or no window known: the shortest tier.
        let past =
            failure(FailureClass::RateLimited, 2, now).with_retry_at(now - TimeDelta::hours(1));
        assert!(matches!(
            s.decide(&past, now),
            Decision::Retry {
                tier: 0,
                attempts: 2,
                ..
            }
        ));
        let unknown = failure(FailureClass::RateLimited, 2, now);
        assert!(matches!(
            s.decide(&unknown, now),
            Decision::Retry {
                tier: 0,
                attempts: 2,
                ..
            }
        ));
    }

    #[test]
    fn rate_limited_retries_many_times_never_increment_attempts() {
        let s = schedule();
        let start = Utc::now();
        let mut current = failure(FailureClass::RateLimited, 1, start);
        let mut now = start;
        for _ in 0..2_000 {
            current = current.with_retry_at(now + TimeDelta::seconds(45));
            match s.decide(&current, now) {
                Decision::Retry {
                    delay, attempts, ..
                } => {
                    assert_eq!(attempts, 1);
                    now += TimeDelta::from_std(delay).unwrap();
                }
                Decision::Park { reason } => {
                    assert_eq!(reason, REASON_TOO_OLD);
                    assert!(now - current.first_failure > TimeDelta::days(1));
                    return;
                }
            }
        }
        panic!("a day of rate limiting should end in too_old");
    }

    #[test]
    fn max_age_is_configurable() {
        let s = schedule().with_max_age(Duration::from_secs(60));
        let now = Utc::now();
        let mut f = failure(FailureClass::Transient, 2, now);
        f.first_failure = now - TimeDelta::seconds(61);
        assert_eq!(
            s.decide(&f, now),
            Decision::Park {
                reason: REASON_TOO_OLD.into()
            }
        );
        f.first_failure = now - TimeDelta::seconds(59);
        assert!(matches!(s.decide(&f, now), Decision::Retry { .. }));
    }

    #[test]
    fn a_clock_behind_the_first_failure_is_not_too_old() {
        let s = schedule();
        let now = Utc::now();
        let f = failure(FailureClass::Transient, 0, now + TimeDelta::hours(48));
        assert!(matches!(s.decide(&f, now), Decision::Retry { .. }));
    }

    #[test]
    fn a_message_without_our_headers_is_poison_and_parked_as_delivery_limit() {
        let s = schedule();
        let now = Utc::now();
        for headers in [None, Some(FieldTable::default())] {
            let plan = s.plan(headers.as_ref(), "p.requests", "request.T9", now);
            assert_eq!(
                plan.decision,
                Decision::Park {
                    reason: REASON_DELIVERY_LIMIT.into()
                }
            );
            assert_eq!(plan.failure.class, FailureClass::Permanent);
            assert_eq!(plan.failure.original_exchange, "p.requests");
            assert_eq!(plan.failure.original_routing_key, "request.T9");
        }
    }

    #[test]
    fn a_retried_message_that_later_hits_the_delivery_limit_is_poison_too() {
        // It still has failure headers from an earlier retry, but no dead-letter marker:
        // the replayer removed it when it scheduled the retry.
        let s = schedule();
        let now = Utc::now();
        let earlier = failure(FailureClass::Transient, 3, now - TimeDelta::minutes(5));
        let mut headers = earlier.to_headers();
        headers.insert("x-death".into(), x_death("delivery_limit", 6));
        let plan = s.plan(Some(&headers), "p.requests", "request.T1", now);
        assert_eq!(
            plan.decision,
            Decision::Park {
                reason: REASON_DELIVERY_LIMIT.into()
            }
        );
        // The history is kept: first failure and attempts.
        assert_eq!(plan.failure.first_failure, earlier.first_failure);
        assert_eq!(plan.failure.attempts, 3);
        assert!(
            plan.failure.last_error.contains("6 deliveries"),
            "{}",
            plan.failure.last_error
        );
    }

    #[test]
    fn the_poison_reason_comes_from_the_newest_x_death_entry() {
        let mut headers = FieldTable::default();
        headers.insert("x-death".into(), x_death("rejected", 1));
        assert_eq!(poison_reason(Some(&headers)), "rejected");
        assert_eq!(poison_reason(None), REASON_DELIVERY_LIMIT);
    }

    #[test]
    fn a_dead_lettered_transient_failure_is_planned_for_retry_with_attempts_plus_one() {
        let s = schedule();
        let now = Utc::now();
        let f = failure(FailureClass::Transient, 1, now);
        let plan = s.plan(Some(&dead_lettered(&f)), "ignored", "ignored", now);
        assert_eq!(
            plan.decision,
            Decision::Retry {
                tier: 1,
                delay: Duration::from_secs(5),
                attempts: 2
            }
        );
        assert_eq!(plan.failure, Failure { attempts: 2, ..f });
    }

    #[test]
    fn a_dead_lettered_old_failure_is_planned_for_parking_as_too_old() {
        let s = schedule();
        let now = Utc::now();
        let f = failure(FailureClass::Transient, 300, now - TimeDelta::hours(25));
        let plan = s.plan(Some(&dead_lettered(&f)), "ignored", "ignored", now);
        assert_eq!(plan.failure.reason, REASON_TOO_OLD);
        assert_eq!(plan.failure.attempts, 300);
        assert_eq!(plan.failure.last_error, "503");
    }

    #[test]
    fn an_empty_tier_list_still_retries() {
        let s = RetrySchedule {
            tiers: vec![],
            max_age: DEFAULT_MAX_AGE,
        };
        let now = Utc::now();
        assert_eq!(
            s.decide(&failure(FailureClass::Transient, 0, now), now),
            Decision::Retry {
                tier: 0,
                delay: FALLBACK_DELAY,
                attempts: 1
            }
        );
    }

    #[test]
    fn a_parked_message_back_from_the_parked_queue_is_parked_again_as_it_was() {
        let s = schedule();
        let now = Utc::now();
        let parked = Failure {
            attempts: 2,
            ..Failure::new(
                FailureClass::Permanent,
                "vitally_400",
                "400 Bad Request",
                "p.requests",
                "request.T1",
                now - TimeDelta::hours(2),
            )
        };
        let mut headers = parked.to_headers();
        headers.insert(
            PARKED_AT_HEADER.into(),
            AMQPValue::LongString("2025-01-01T00:00:00Z".into()),
        );
        headers.insert("x-death".into(), x_death("delivery_limit", 5));
        let plan = s.plan(Some(&headers), "", "p.requests.parked", now);
        assert_eq!(
            plan.decision,
            Decision::Park {
                reason: "vitally_400".into()
            }
        );
        assert_eq!(plan.failure, parked);
    }

    #[test]
    fn the_original_route_is_read_from_the_oldest_x_death_entry() {
        let entry = |queue: &str, exchange: &str, key: &str| {
            let mut death = FieldTable::default();
            death.insert("queue".into(), AMQPValue::LongString(queue.into()));
            death.insert("exchange".into(), AMQPValue::LongString(exchange.into()));
            death.insert(
                "routing-keys".into(),
                AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString(key.into())])),
            );
            AMQPValue::FieldTable(death)
        };
        let mut headers = FieldTable::default();
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![
                entry("p.requests.dead", "", "p.requests.parked"),
                entry("p.requests.sync", "p.requests", "request.T7"),
            ])),
        );
        assert_eq!(
            death_route(Some(&headers)),
            Some(("p.requests".into(), "request.T7".into()))
        );
        assert_eq!(death_route(Some(&FieldTable::default())), None);
        assert_eq!(death_route(None), None);
    }

    fn x_death(reason: &str, count: i64) -> AMQPValue {
        let mut death = FieldTable::default();
        death.insert(
            "reason".into(),
            AMQPValue::LongString(LongString::from(reason)),
        );
        death.insert("count".into(), AMQPValue::LongLongInt(count));
        death.insert(
            "queue".into(),
            AMQPValue::LongString("p.requests.sync".into()),
        );
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)]))
    }
}
