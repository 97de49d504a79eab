//! Resync: send the latest stored snapshots of a workspace's requests through the
//! pipeline again, for customer data fixed in Vitally after they were skipped. What
//! `requests resync` and the console run. A version Vitally already has is skipped as
//! `already_applied` by the consumers, so a resync never duplicates.

use std::time::Duration;

use redis::aio::ConnectionManager;
use serde::Serialize;
use thena_broker::Publisher;
use thena_store::ledger::{Filter, Ledger};

use crate::explain::{ExplainError, decode_snapshot};

/// Highest accepted rate, requests per second.
pub const MAX_RATE: f64 = 1000.0;

/// One request resent (or that would be, in a dry run).
#[derive(Debug, Clone, Serialize)]
pub struct Resent {
    pub request_id: u64,
    pub version: u64,
    /// Its outcome in the ledger before the resync (`skipped: domain_unknown`).
    pub outcome: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    #[error("the rate must be between 0 and {MAX_RATE} per second, got {0}")]
    Rate(f64),
    #[error(transparent)]
    Snapshot(#[from] ExplainError),
    #[error("the ledger: {0}")]
    Ledger(#[from] thena_store::DbError),
    #[error("publishing: {0}")]
    Publish(#[from] thena_broker::PublishError),
}

/// Forgets `workspace`'s cached Vitally lookups (the fix was made in Vitally); returns
/// how many keys went.
pub async fn clear_cached_lookups(
    redis: &mut ConnectionManager,
    redis_prefix: &str,
    workspace: &str,
) -> redis::RedisResult<usize> {
    let pattern = format!("{redis_prefix}:cache:*:{workspace}:*");
    thena_runtime::redis::delete_matching(redis, &pattern).await
}

/// Resends the latest snapshot of every request of `workspace` matching `filter`, at most
/// `rate` per second, calling `each` for every one; with no `publisher` (a dry run) only
/// says what would be resent. Returns how many.
pub async fn resync(
    ledger: &Ledger,
    publisher: Option<&Publisher>,
    workspace: &str,
    mut filter: Filter,
    rate: f64,
    mut each: impl FnMut(&Resent),
) -> Result<u64, ResyncError> {
    if !(rate > 0.0 && rate <= MAX_RATE) {
        return Err(ResyncError::Rate(rate));
    }
    let pause = Duration::from_secs_f64(1.0 / rate);
    let mut sent = 0u64;
    loop {
        let page = ledger.list(workspace, &filter, 200).await?;
        for record in &page.requests {
            let Some((_, snapshot)) = ledger.latest_snapshot(workspace, record.request_id).await?
            else {
                continue;
            };
            let event = decode_snapshot(record.request_id, &snapshot)?;
            if let Some(publisher) = publisher {
                if sent > 0 {
                    tokio::time::sleep(pause).await;
                }
                publisher.publish_event(&event).await?;
            }
            sent += 1;
            each(&Resent {
                request_id: record.request_id,
                version: event.request.version,
                outcome: outcome_text(record.outcome.as_deref(), record.reason.as_deref()),
            });
        }
        match page.next {
            Some(next) => filter.after = Some(next),
            None => return Ok(sent),
        }
    }
}

/// `skipped: domain_unknown`, `synced`, or `—` for an outcome the ledger does not have.
pub fn outcome_text(outcome: Option<&str>, reason: Option<&str>) -> String {
    match (outcome, reason) {
        (Some(outcome), Some(reason)) => format!("{outcome}: {reason}"),
        (Some(outcome), None) => outcome.to_owned(),
        (None, _) => "—".to_owned(),
    }
}
