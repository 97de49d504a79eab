//! Outcomes per workspace and hour, written with the ledger in the same transaction:
//! what the console's 24-hour figures and chart read (a few dozen rows per workspace
//! rather than the requests' histories). A synced event's age (change in Thena →
//! Vitally's 2xx) is counted in a fixed logarithmic bucket, so a percentile per hour
//! is a sum of counts.

use std::{collections::BTreeMap, time::Duration};

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use serde::Serialize;

use super::Entry;
use crate::{Db, DbError, Transaction};

/// Upper bounds of the age buckets, milliseconds; a last bucket holds everything older.
pub const AGE_BOUNDS_MS: [u64; 14] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 120_000, 300_000, 600_000,
    1_800_000, 3_600_000,
];
/// The bucket of outcomes that have no age.
pub const NO_AGE: i16 = -1;
/// Hourly rows older than this are removed.
pub const KEEP: TimeDelta = TimeDelta::days(8);

/// The bucket an age falls in.
pub fn age_bucket(age: Duration) -> i16 {
    let ms = age.as_millis();
    AGE_BOUNDS_MS
        .iter()
        .position(|bound| ms <= u128::from(*bound))
        .unwrap_or(AGE_BOUNDS_MS.len()) as i16
}

/// The upper bound of a bucket; `None` for the open last bucket (and for [`NO_AGE`]).
pub fn bucket_bound(bucket: i16) -> Option<Duration> {
    usize::try_from(bucket)
        .ok()
        .and_then(|b| AGE_BOUNDS_MS.get(b))
        .map(|ms| Duration::from_millis(*ms))
}

/// The bucket holding the `p` quantile (0 < p ≤ 1) of `counts` (bucket → events).
pub fn quantile_bucket(counts: &BTreeMap<i16, i64>, p: f64) -> Option<i16> {
    let total: i64 = counts.values().sum();
    if total <= 0 {
        return None;
    }
    let rank = (p * total as f64).ceil().max(1.0) as i64;
    let mut seen = 0;
    counts.iter().find_map(|(bucket, n)| {
        seen += n;
        (seen >= rank).then_some(*bucket)
    })
}

/// One hour of one workspace, as the chart draws it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HourBar {
    pub hour: DateTime<Utc>,
    pub synced: i64,
    pub skipped: i64,
    /// Retried and parked: outcomes that cost an attempt.
    pub failed: i64,
    /// Deferred and held: waiting, not failing.
    pub waiting: i64,
    /// The hour's p99 event age, as its bucket's upper bound in ms (`None`: no synced
    /// event, or older than the last bound).
    pub p99_age_ms: Option<u64>,
    /// Whether some synced event was older than the last bound.
    pub p99_over_last_bound: bool,
}

/// A workspace's outcomes over a window of whole hours.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Activity {
    pub workspace_id: String,
    /// Oldest first, one per hour of the window (empty hours included).
    pub hours: Vec<HourBar>,
    /// Outcome → events over the window.
    pub totals: BTreeMap<String, i64>,
    /// `(outcome, reason)` → events over the window.
    pub reasons: BTreeMap<String, i64>,
    /// Vitally's 429 answers over the window (each deferred its event).
    pub rate_limited: i64,
    /// The window's p99 event age (ms, a bucket's upper bound).
    pub p99_age_ms: Option<u64>,
}

/// One stored row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub workspace_id: String,
    pub hour: DateTime<Utc>,
    pub outcome: String,
    pub reason: String,
    pub age_bucket: i16,
    pub events: i64,
}

/// The rows of `workspaces` (all when `None`) since `since`.
pub async fn rows(
    db: &Db,
    workspaces: Option<&[String]>,
    since: DateTime<Utc>,
) -> Result<Vec<Row>, DbError> {
    let client = db.client().await?;
    let rows = client
        .query(
            "SELECT workspace_id, hour, outcome, reason, age_bucket, events FROM ledger_hourly
             WHERE hour >= $1 AND ($2::text[] IS NULL OR workspace_id = ANY($2))",
            &[&since, &workspaces],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Row {
            workspace_id: r.get(0),
            hour: r.get(1),
            outcome: r.get(2),
            reason: r.get(3),
            age_bucket: r.get(4),
            events: r.get(5),
        })
        .collect())
}

/// The last `hours` whole hours up to `now` (the current one included), oldest first.
pub fn window(now: DateTime<Utc>, hours: u32) -> Vec<DateTime<Utc>> {
    let current = now.duration_trunc(TimeDelta::hours(1)).unwrap_or(now);
    (0..i64::from(hours))
        .rev()
        .map(|back| current - TimeDelta::hours(back))
        .collect()
}

/// Folds one workspace's rows into its activity over `hours` (pure).
pub fn activity(workspace: &str, rows: &[Row], hours: &[DateTime<Utc>]) -> Activity {
    let mut activity = Activity {
        workspace_id: workspace.to_owned(),
        ..Activity::default()
    };
    let mut ages: BTreeMap<i16, i64> = BTreeMap::new();
    let mut per_hour: BTreeMap<DateTime<Utc>, (HourBar, BTreeMap<i16, i64>)> = hours
        .iter()
        .map(|h| {
            let bar = HourBar {
                hour: *h,
                ..HourBar::default()
            };
            (*h, (bar, BTreeMap::new()))
        })
        .collect();
    for row in rows.iter().filter(|r| r.workspace_id == workspace) {
        let Some((bar, bar_ages)) = per_hour.get_mut(&row.hour) else {
            continue;
        };
        *activity.totals.entry(row.outcome.clone()).or_default() += row.events;
        *activity
            .reasons
            .entry(format!("{}: {}", row.outcome, row.reason))
            .or_default() += row.events;
        match row.outcome.as_str() {
            "synced" => bar.synced += row.events,
            "skipped" => bar.skipped += row.events,
            "retried" | "parked" => bar.failed += row.events,
            "deferred" | "held" => bar.waiting += row.events,
            // An operator's replay is not an outcome of an event: counted, not drawn.
            _ => {}
        }
        if row.outcome == "deferred" && row.reason == "vitally_429" {
            activity.rate_limited += row.events;
        }
        if row.age_bucket != NO_AGE {
            *bar_ages.entry(row.age_bucket).or_default() += row.events;
            *ages.entry(row.age_bucket).or_default() += row.events;
        }
    }
    activity.hours = per_hour
        .into_values()
        .map(|(mut bar, bar_ages)| {
            let p99 = quantile_bucket(&bar_ages, 0.99);
            bar.p99_age_ms = p99.and_then(bucket_bound).map(|d| d.as_millis() as u64);
            bar.p99_over_last_bound = p99.is_some() && bar.p99_age_ms.is_none();
            bar
        })
        .collect();
    activity.p99_age_ms = quantile_bucket(&ages, 0.99)
        .and_then(bucket_bound)
        .map(|d| d.as_millis() as u64);
    activity
}

/// A batch's counts: (workspace, outcome, reason, age bucket) → events, in key order so
/// every writer locks the shared rows in the same order (no deadlock between consumers).
fn rollup<'a>(entries: &[&'a Entry]) -> BTreeMap<(&'a str, &'static str, &'a str, i16), i64> {
    let mut counts = BTreeMap::new();
    for entry in entries {
        let bucket = entry.age.map_or(NO_AGE, age_bucket);
        *counts
            .entry((
                entry.workspace_id.as_str(),
                entry.outcome,
                entry.reason.as_str(),
                bucket,
            ))
            .or_default() += 1;
    }
    counts
}

/// Adds a batch's outcomes to the current hour (one statement).
pub(super) async fn add(tx: &Transaction<'_>, entries: &[&Entry]) -> Result<(), DbError> {
    let counts = rollup(entries);
    let mut workspaces = Vec::with_capacity(counts.len());
    let mut outcomes = Vec::with_capacity(counts.len());
    let mut reasons = Vec::with_capacity(counts.len());
    let mut buckets = Vec::with_capacity(counts.len());
    let mut events = Vec::with_capacity(counts.len());
    for ((ws, outcome, reason, bucket), n) in counts {
        workspaces.push(ws);
        outcomes.push(outcome);
        reasons.push(reason);
        buckets.push(bucket);
        events.push(n);
    }
    let statement = tx
        .prepare_cached(
            "INSERT INTO ledger_hourly (workspace_id, hour, outcome, reason, age_bucket, events)
             SELECT ws, date_trunc('hour', now()), o, r, b, n
             FROM unnest($1::text[], $2::text[], $3::text[], $4::smallint[], $5::bigint[])
                  WITH ORDINALITY AS t(ws, o, r, b, n, i)
             ORDER BY i
             ON CONFLICT (workspace_id, hour, outcome, reason, age_bucket)
             DO UPDATE SET events = ledger_hourly.events + EXCLUDED.events",
        )
        .await?;
    tx.execute(
        &statement,
        &[&workspaces, &outcomes, &reasons, &buckets, &events],
    )
    .await?;
    Ok(())
}

/// Removes hours older than [`KEEP`].
pub(super) async fn prune(db: &Db) -> Result<u64, DbError> {
    let client = db.client().await?;
    Ok(client
        .execute(
            "DELETE FROM ledger_hourly WHERE hour < now() - $1::bigint * interval '1 hour'",
            &[&KEEP.num_hours()],
        )
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(hour: DateTime<Utc>, outcome: &str, reason: &str, bucket: i16, n: i64) -> Row {
        Row {
            workspace_id: "T1".into(),
            hour,
            outcome: outcome.into(),
            reason: reason.into(),
            age_bucket: bucket,
            events: n,
        }
    }

    #[test]
    fn ages_fall_in_the_bucket_of_their_upper_bound() {
        assert_eq!(age_bucket(Duration::ZERO), 0);
        assert_eq!(age_bucket(Duration::from_millis(100)), 0);
        assert_eq!(age_bucket(Duration::from_millis(101)), 1);
        assert_eq!(age_bucket(Duration::from_secs(3)), 5);
        assert_eq!(age_bucket(Duration::from_secs(7200)), 14);
        assert_eq!(bucket_bound(5), Some(Duration::from_secs(5)));
        assert_eq!(bucket_bound(14), None);
        assert_eq!(bucket_bound(NO_AGE), None);
    }

    #[test]
    fn the_p99_bucket_is_where_the_count_reaches_99_percent() {
        let mut counts = BTreeMap::new();
        counts.insert(0, 98);
        counts.insert(3, 1);
        counts.insert(9, 1);
        assert_eq!(quantile_bucket(&counts, 0.99), Some(3));
        assert_eq!(quantile_bucket(&counts, 1.0), Some(9));
        assert_eq!(quantile_bucket(&counts, 0.5), Some(0));
        assert_eq!(quantile_bucket(&BTreeMap::new(), 0.99), None);
    }

    #[test]
    fn activity_fills_every_hour_and_sorts_outcomes_into_the_chart_series() {
        let now = "2026-12-02T10:30:00Z".parse::<DateTime<Utc>>().unwrap();
        let hours = window(now, 3);
        assert_eq!(hours.len(), 3);
        assert_eq!(
            hours[2],
            "2026-12-02T10:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        let rows = vec![
            row(hours[2], "synced", "created", 3, 10),
            row(hours[2], "skipped", "domain_unknown", NO_AGE, 2),
            row(hours[2], "retried", "vitally_503", NO_AGE, 1),
            row(hours[0], "deferred", "vitally_429", NO_AGE, 4),
            row(hours[0] - TimeDelta::hours(5), "synced", "created", 0, 99),
            Row {
                workspace_id: "T2".into(),
                ..row(hours[2], "synced", "created", 0, 7)
            },
        ];
        let a = activity("T1", &rows, &hours);
        assert_eq!(a.hours.len(), 3);
        assert_eq!(a.hours[2].synced, 10);
        assert_eq!(a.hours[2].skipped, 2);
        assert_eq!(a.hours[2].failed, 1);
        assert_eq!(a.hours[2].p99_age_ms, Some(1_000));
        assert_eq!(a.hours[0].waiting, 4);
        assert_eq!(
            a.hours[1],
            HourBar {
                hour: hours[1],
                ..HourBar::default()
            }
        );
        assert_eq!(a.rate_limited, 4);
        assert_eq!(a.totals["synced"], 10);
        assert_eq!(a.reasons["skipped: domain_unknown"], 2);
        assert_eq!(a.p99_age_ms, Some(1_000));
    }

    #[test]
    fn a_batch_rolls_up_by_workspace_outcome_reason_and_age() {
        let entry = |ws: &str, outcome: &'static str, age: Option<u64>| Entry {
            workspace_id: ws.into(),
            request_id: 1,
            version: 1,
            snapshot: None,
            outcome,
            reason: "r".into(),
            detail: None,
            link: None,
            instance_id: None,
            failed_attempt: false,
            backfill_job: None,
            age: age.map(Duration::from_millis),
        };
        let entries = [
            entry("T2", "synced", Some(50)),
            entry("T1", "synced", Some(50)),
            entry("T1", "synced", Some(60)),
            entry("T1", "skipped", None),
        ];
        let refs: Vec<&Entry> = entries.iter().collect();
        let counts: Vec<_> = rollup(&refs).into_iter().collect();
        assert_eq!(
            counts,
            vec![
                (("T1", "skipped", "r", NO_AGE), 1),
                (("T1", "synced", "r", 0), 2),
                (("T2", "synced", "r", 0), 1),
            ]
        );
    }
}
