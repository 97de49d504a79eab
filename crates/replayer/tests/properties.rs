//! Properties of the retry policy ([`RetrySchedule::decide`]) over generated failures and
//! clocks, including the product doc's promise: a request shows up in Vitally at most
//! 10 minutes after a fault ends. Simulated clocks only: nothing sleeps.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use proptest::prelude::*;
use thena_broker::{Failure, FailureClass, Topology};
use thena_replayer::schedule::REASON_TOO_OLD;
use thena_replayer::{Decision, RetrySchedule};

const FIVE_MINUTES: Duration = Duration::from_secs(5 * 60);
const TEN_MINUTES: Duration = Duration::from_secs(10 * 60);
/// What one delivery may take in the simulations: a sync takes seconds, so this is generous.
const MAX_PROCESSING: Duration = Duration::from_secs(60);

fn start() -> DateTime<Utc> {
    Utc.timestamp_opt(1_795_000_000, 0)
        .single()
        .expect("valid timestamp")
}

fn delta(d: Duration) -> TimeDelta {
    TimeDelta::from_std(d).expect("simulated durations fit")
}

fn class() -> impl Strategy<Value = FailureClass> {
    prop_oneof![
        Just(FailureClass::Transient),
        Just(FailureClass::RateLimited),
        Just(FailureClass::Permanent),
    ]
}

/// Attempt counts, with the extremes well represented.
fn attempts() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..20, Just(u32::MAX - 1), Just(u32::MAX), any::<u32>()]
}

/// A failure first seen at `first_failure`, rate-limited until `retry_at` when given.
fn failure(
    class: FailureClass,
    attempts: u32,
    first_failure: DateTime<Utc>,
    retry_at: Option<DateTime<Utc>>,
) -> Failure {
    let failure = Failure {
        attempts,
        ..Failure::new(
            class,
            "vitally_503",
            "503 Service Unavailable",
            "thena.requests",
            "request.T1",
            first_failure,
        )
    };
    match retry_at {
        Some(at) => failure.with_retry_at(at),
        None => failure,
    }
}

/// Seconds, from "just now" to days either way.
fn offset_secs() -> impl Strategy<Value = i64> {
    prop_oneof![Just(0i64), -3_600i64..3_600, -864_000i64..864_000]
}

/// Ascending delay tiers as an operator might configure them (possibly none), from a
/// second to 15 minutes, in milliseconds.
fn tiers() -> impl Strategy<Value = Vec<Duration>> {
    prop::collection::vec(1_000u64..900_000, 0..7).prop_map(|mut millis| {
        millis.sort_unstable();
        millis.into_iter().map(Duration::from_millis).collect()
    })
}

/// The longest any single retry waits under `schedule`.
fn longest_delay(schedule: &RetrySchedule) -> Duration {
    schedule.tier_delay(usize::MAX)
}

/// One event through a fault that ends at `start + fault`: every delivery before the end
/// fails (transiently, or rate-limited until the end when `rate_limited[i]`), the first
/// one after it succeeds. Returns when it was delivered, or the park reason.
fn deliver_through_fault(
    schedule: &RetrySchedule,
    fault: Duration,
    processing: &[Duration],
    rate_limited: &[bool],
) -> Result<DateTime<Utc>, String> {
    let fault_ends = start() + delta(fault);
    let mut arrives = start();
    let mut previous: Option<Failure> = None;
    for step in 0usize.. {
        let took = processing[step % processing.len()];
        let done = arrives + delta(took);
        if arrives >= fault_ends {
            return Ok(done);
        }
        // The consumer dead-letters it with the failure headers; the replayer decides.
        let class = if rate_limited[step % rate_limited.len()] {
            FailureClass::RateLimited
        } else {
            FailureClass::Transient
        };
        let current = match previous.take() {
            Some(earlier) => earlier.next_attempt(class, "vitally_503", "503"),
            None => failure(class, 0, arrives, None),
        };
        let current = match class {
            FailureClass::RateLimited => current.with_retry_at(fault_ends),
            FailureClass::Transient | FailureClass::Permanent => current,
        };
        match schedule.decide(&current, done) {
            Decision::Retry {
                delay, attempts, ..
            } => {
                arrives = done + delta(delay);
                previous = Some(Failure {
                    attempts,
                    ..current
                });
            }
            Decision::Park { reason } => return Err(reason),
        }
    }
    unreachable!("the loop returns")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1_000))]

    #[test]
    fn every_retry_waits_under_five_minutes_whatever_the_failure(
        class in class(),
        attempts in attempts(),
        age in offset_secs(),
        window in prop::option::of(offset_secs()),
    ) {
        let schedule = RetrySchedule::default();
        let now = start();
        let f = failure(
            class,
            attempts,
            now - TimeDelta::seconds(age),
            window.map(|w| now + TimeDelta::seconds(w)),
        );
        match schedule.decide(&f, now) {
            Decision::Retry { delay, tier, .. } => {
                prop_assert!(delay < FIVE_MINUTES, "{delay:?}");
                prop_assert!(delay > Duration::ZERO);
                prop_assert_eq!(delay, schedule.tiers[tier]);
            }
            Decision::Park { .. } => {}
        }
    }

    #[test]
    fn a_configured_schedule_only_waits_one_of_its_tiers(
        tiers in tiers(),
        class in class(),
        attempts in attempts(),
        window in prop::option::of(offset_secs()),
    ) {
        let schedule = RetrySchedule { tiers: tiers.clone(), max_age: Duration::from_secs(86_400) };
        let now = start();
        let f = failure(class, attempts, now, window.map(|w| now + TimeDelta::seconds(w)));
        if let Decision::Retry { delay, tier, .. } = schedule.decide(&f, now) {
            prop_assert!(delay <= longest_delay(&schedule));
            if tiers.is_empty() {
                // No tier configured: the fallback.
                prop_assert_eq!(delay, Duration::from_secs(1));
            } else {
                prop_assert!(tier < tiers.len());
                prop_assert_eq!(delay, tiers[tier]);
            }
        }
    }

    #[test]
    fn a_transient_failure_counts_exactly_one_more_attempt(
        attempts in 0u32..u32::MAX,
        age in 0i64..86_400,
    ) {
        let schedule = RetrySchedule::default();
        let now = start();
        let f = failure(FailureClass::Transient, attempts, now - TimeDelta::seconds(age), None);
        match schedule.decide(&f, now) {
            Decision::Retry { attempts: after, tier, .. } => {
                prop_assert_eq!(after, attempts + 1);
                // Later attempts never wait less.
                prop_assert_eq!(tier, schedule.tier_for_attempt(attempts + 1));
                prop_assert!(
                    schedule.tier_delay(tier) >= schedule.tier_delay(schedule.tier_for_attempt(attempts))
                );
            }
            Decision::Park { reason } => {
                return Err(TestCaseError::fail(format!("parked a young failure: {reason}")));
            }
        }
    }

    #[test]
    fn a_rate_limited_failure_never_counts_an_attempt_and_waits_for_its_window(
        attempts in attempts(),
        age in 0i64..86_400,
        window in prop::option::of(offset_secs()),
    ) {
        let schedule = RetrySchedule::default();
        let now = start();
        let retry_at = window.map(|w| now + TimeDelta::seconds(w));
        let f = failure(FailureClass::RateLimited, attempts, now - TimeDelta::seconds(age), retry_at);
        match schedule.decide(&f, now) {
            Decision::Retry { attempts: after, delay, .. } => {
                prop_assert_eq!(after, attempts);
                // It waits out the window, or the longest tier and then asks again.
                let wait = retry_at
                    .and_then(|at| (at - now).to_std().ok())
                    .unwrap_or(Duration::ZERO);
                prop_assert!(delay >= wait.min(longest_delay(&schedule)));
            }
            Decision::Park { reason } => {
                return Err(TestCaseError::fail(format!("parked a young failure: {reason}")));
            }
        }
    }

    #[test]
    fn a_permanent_failure_always_parks_with_its_own_reason(
        attempts in attempts(),
        age in offset_secs(),
        window in prop::option::of(offset_secs()),
        reason in "[a-z_0-9]{1,20}",
    ) {
        let schedule = RetrySchedule::default();
        let now = start();
        let f = Failure {
            reason: reason.clone(),
            ..failure(
                FailureClass::Permanent,
                attempts,
                now - TimeDelta::seconds(age),
                window.map(|w| now + TimeDelta::seconds(w)),
            )
        };
        prop_assert_eq!(schedule.decide(&f, now), Decision::Park { reason });
    }

    #[test]
    fn a_failure_older_than_max_age_parks_as_too_old(
        class in prop_oneof![Just(FailureClass::Transient), Just(FailureClass::RateLimited)],
        attempts in attempts(),
        max_age_secs in 1u64..604_800,
        older_by_ms in prop_oneof![Just(1i64), 1i64..1_000, 1i64..10_000_000_000],
        window in prop::option::of(offset_secs()),
    ) {
        let schedule = RetrySchedule::default().with_max_age(Duration::from_secs(max_age_secs));
        let now = start();
        let first = now - TimeDelta::seconds(max_age_secs as i64) - TimeDelta::milliseconds(older_by_ms);
        let f = failure(class, attempts, first, window.map(|w| now + TimeDelta::seconds(w)));
        prop_assert_eq!(
            schedule.decide(&f, now),
            Decision::Park { reason: REASON_TOO_OLD.to_owned() }
        );
        // At exactly max_age it is not too old yet.
        let on_the_edge = failure(class, attempts, now - TimeDelta::seconds(max_age_secs as i64), None);
        let is_retry = matches!(schedule.decide(&on_the_edge, now), Decision::Retry { .. });
        prop_assert!(is_retry);
    }

    #[test]
    fn after_a_fault_ends_the_event_is_delivered_within_ten_minutes(
        fault_secs in prop_oneof![0u64..600, 0u64..82_800],
        processing in prop::collection::vec(0..=MAX_PROCESSING.as_millis() as u64, 1..8),
        rate_limited in prop::collection::vec(any::<bool>(), 1..8),
    ) {
        // Faults shorter than the 24 h max age minus an hour: longer ones park (tested below).
        let schedule = RetrySchedule::default();
        let fault = Duration::from_secs(fault_secs);
        let processing: Vec<Duration> = processing.into_iter().map(Duration::from_millis).collect();
        let delivered = deliver_through_fault(&schedule, fault, &processing, &rate_limited);
        let delivered = match delivered {
            Ok(at) => at,
            Err(reason) => return Err(TestCaseError::fail(format!("parked: {reason}"))),
        };
        let fault_ends = start() + delta(fault);
        let late = (delivered - fault_ends).to_std().unwrap_or(Duration::ZERO);
        // The next retry comes within one delay (< 5 min) of the end, then one sync.
        prop_assert!(late < FIVE_MINUTES + MAX_PROCESSING + MAX_PROCESSING, "{late:?}");
        prop_assert!(late < TEN_MINUTES, "{late:?}");
    }

    #[test]
    fn with_any_schedule_the_wait_after_a_fault_is_at_most_the_longest_tier(
        tiers in tiers(),
        fault_secs in 0u64..7_200,
    ) {
        let schedule = RetrySchedule { tiers, max_age: Duration::from_secs(86_400) };
        let fault = Duration::from_secs(fault_secs);
        let delivered = deliver_through_fault(&schedule, fault, &[Duration::ZERO], &[false]);
        let delivered = match delivered {
            Ok(at) => at,
            Err(reason) => return Err(TestCaseError::fail(format!("parked: {reason}"))),
        };
        let late = (delivered - (start() + delta(fault))).to_std().unwrap_or(Duration::ZERO);
        prop_assert!(late <= longest_delay(&schedule), "{late:?}");
    }

    #[test]
    fn a_failure_that_never_recovers_parks_as_too_old_after_at_least_max_age(
        max_age_secs in prop_oneof![0u64..600, 0u64..172_800],
        tiers in prop_oneof![Just(RetrySchedule::default().tiers), tiers()],
    ) {
        // Zero processing time: the quickest way to the park.
        let schedule = RetrySchedule { tiers, max_age: Duration::from_secs(max_age_secs) };
        let mut current = failure(FailureClass::Transient, 0, start(), None);
        let mut now = start();
        let mut cumulative = Duration::ZERO;
        loop {
            match schedule.decide(&current, now) {
                Decision::Retry { delay, attempts, .. } => {
                    prop_assert_eq!(attempts, current.attempts + 1);
                    cumulative += delay;
                    now += delta(delay);
                    current.attempts = attempts;
                }
                Decision::Park { reason } => {
                    prop_assert_eq!(reason, REASON_TOO_OLD);
                    break;
                }
            }
        }
        prop_assert!(cumulative >= schedule.max_age, "{cumulative:?}");
        prop_assert!(cumulative <= schedule.max_age + longest_delay(&schedule), "{cumulative:?}");
    }
}

#[test]
fn the_default_schedule_is_the_topology_one_and_its_longest_wait_is_under_five_minutes() {
    // The properties above lean on these two facts.
    let schedule = RetrySchedule::default();
    assert_eq!(schedule, RetrySchedule::for_topology(&Topology::new("any")));
    assert!(longest_delay(&schedule) < FIVE_MINUTES);
    assert!(schedule.tiers.windows(2).all(|w| w[0] <= w[1]));
}
