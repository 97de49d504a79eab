//! Events of a workspace that was never connected are skipped and counted, never parked
//! (issue 14, item 10) — but only once PostgreSQL, read past every cache and after any
//! connect in progress, says so: an event racing a fresh connect syncs.

use std::time::Duration;

use chrono::Utc;
use prometheus::Registry;
use thena_events::sample;
use thena_runtime::ops::Readiness;
use thena_store::ledger::Ledger;
use thena_sync::{
    outcome::{Outcome, Skip},
    policy::Lane,
};
use thena_testkit::wait_until;

use crate::support::{Fleet, WS};

/// Connects made in these tests start an hour back, so requests created during them sync.
fn an_hour_ago() -> Option<chrono::DateTime<Utc>> {
    Some(Utc::now() - chrono::Duration::hours(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_a_never_connected_workspace_are_skipped_counted_and_in_the_ledger() {
    let mut fleet = Fleet::start().await;
    fleet.connect(WS, |_| {}).await;
    // Connected once, then disconnected: its events still wait for a reconnect, parked.
    fleet.connect("T-GONE", |_| {}).await;
    vitally_client::provision::disconnect(&fleet.store, "T-GONE", "test")
        .await
        .unwrap();
    fleet.spawn_consumer().await;

    for id in 1..=3 {
        fleet
            .publish(&sample::event("T-NEVER", id, 1, Some("alice@acme.com")))
            .await;
    }
    fleet
        .publish(&sample::event("T-GONE", 9, 1, Some("alice@acme.com")))
        .await;
    fleet
        .publish(&sample::event(WS, 1, 1, Some("alice@acme.com")))
        .await;
    fleet.wait_settled(5).await;

    assert_eq!(fleet.count("skipped", Some("never_connected")), 3);
    assert_eq!(fleet.count("parked", None), 1, "only the disconnected one");
    assert_eq!(fleet.count("parked", Some("no_integration")), 1);
    let parked = fleet.broker.topology().parked_queue();
    assert_eq!(fleet.env.queue_depth(&parked).await.unwrap(), 1);
    let ledger = Ledger::read_only(fleet.store.db().clone());
    for id in 1..=3 {
        let row = ledger
            .show("T-NEVER", id, 50)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("T-NEVER {id} is in the ledger"));
        assert_eq!(
            (row.outcome.as_deref(), row.reason.as_deref()),
            (Some("skipped"), Some("never_connected"))
        );
        assert!(row.snapshot.is_some(), "kept for a later resync");
    }
    assert_eq!(fleet.instances_for(WS, 1).len(), 1);
    fleet.stop().await;
}

/// Connects waiting for the fleet's connect lock (held by the test).
async fn waiting_for_the_connect_lock(fleet: &Fleet) -> i64 {
    let client = fleet.store.db().client().await.unwrap();
    // A bigint advisory key shows in pg_locks as its high (classid) and low (objid) halves.
    client
        .query_one(
            "SELECT count(*) FROM pg_locks, (SELECT hashtextextended($1, 0) AS k) key
             WHERE locktype = 'advisory' AND NOT granted AND objsubid = 1
               AND classid::bigint = (key.k >> 32) & 4294967295
               AND objid::bigint = key.k & 4294967295",
            &[&fleet.store.connect_lock()],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_racing_a_fresh_connect_is_deferred_until_it_committed_then_syncs() {
    let mut fleet = Fleet::start().await;
    fleet.spawn_consumer().await;
    // A connect of T-RACE is under way: the test holds the lock it is queued behind.
    let held = fleet.store.lock_connects().await.unwrap();
    let connect = fleet.connect("T-RACE", |r| r.established_at = an_hour_ago());
    let race = async {
        wait_until(
            "the connect to queue for the lock",
            Duration::from_secs(20),
            || async { (waiting_for_the_connect_lock(&fleet).await >= 1).then_some(()) },
        )
        .await;
        fleet
            .publish(&sample::event("T-RACE", 1, 1, Some("alice@acme.com")))
            .await;
        wait_until(
            "the consumer to defer the event while the connect is under way",
            Duration::from_secs(20),
            || async { (fleet.count("deferred", Some("connect_in_progress")) >= 1).then_some(()) },
        )
        .await;
        drop(held);
    };
    tokio::join!(connect, race);

    fleet.wait_settled_within(1, Duration::from_secs(30)).await;
    assert_eq!(fleet.count("skipped", None), 0, "not skipped");
    assert_eq!(fleet.count("synced", Some("created")), 1);
    assert_eq!(fleet.instances_for("T-RACE", 1).len(), 1);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workspace_cached_as_unconnected_is_read_again_before_an_event_is_skipped() {
    // The cached record lives an hour, and no change notification reaches this pipeline:
    // only a read past the cache can see the connect.
    let fleet = Fleet::start_with(Default::default(), &[("INTEGRATION_REFRESH", "1h")]).await;
    let worker = thena_sync::app::build_worker(&fleet.config, &Registry::new(), Readiness::new())
        .await
        .unwrap();
    let pipeline = worker.pipeline.clone();

    let first = sample::event("T-LATE", 1, 1, Some("alice@acme.com"));
    let (outcome, _) = pipeline.process(&first, false, Lane::Live).await;
    assert_eq!(outcome, Outcome::Skipped(Skip::NeverConnected));

    fleet
        .connect("T-LATE", |r| r.established_at = an_hour_ago())
        .await;
    let second = sample::event("T-LATE", 2, 1, Some("alice@acme.com"));
    let (outcome, _) = pipeline.process(&second, false, Lane::Live).await;
    assert!(
        matches!(outcome, Outcome::Synced { .. }),
        "a stale cache must not skip it: {outcome:?}"
    );
    assert_eq!(fleet.instances_for("T-LATE", 2).len(), 1);
    drop((worker, pipeline));
    fleet.stop().await;
}
