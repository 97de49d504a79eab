//! Delivery guarantees end to end: transient faults delay events but lose none, 429s do
//! not count as attempts, permanent failures wait parked for a human and replay once.

use std::time::Duration;

use fake_vitally::{Fault, FaultKind};
use thena_events::sample;
use thena_replayer::dlq::{DlqFilter, ReplayOptions, render};
use thena_store::ledger::Ledger;
use thena_testkit::wait_until;

use crate::support::{Fleet, WS};

async fn all_synced_once(
    fleet: &Fleet,
    ids: impl Iterator<Item = u64> + Clone,
    deadline: Duration,
) {
    wait_until("every request synced", deadline, || {
        let ids = ids.clone();
        async move {
            ids.into_iter()
                .all(|id| fleet.instances_for(WS, id).len() == 1)
                .then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vitally_outage_delays_events_but_delivers_every_one_exactly_once() {
    let mut fleet = Fleet::start().await;
    fleet.connect(WS, |_| {}).await;
    fleet.spawn_consumer().await;
    fleet.spawn_replayer().await;
    let outage = Duration::from_secs(2);
    fleet.fake.inject(Fault::Outage {
        duration: outage,
        status: 503,
    });
    let started = std::time::Instant::now();
    let ids = 300..320u64;
    for id in ids.clone() {
        fleet
            .publish(&sample::event(WS, id, 1, Some("alice@acme.com")))
            .await;
    }
    all_synced_once(&fleet, ids.clone(), Duration::from_secs(30)).await;
    assert!(
        started.elapsed() >= outage,
        "nothing could sync during the outage"
    );

    println!("request  delay (occurred → instance created; outage {outage:?})");
    for id in ids.clone() {
        let instance = &fleet.instances_for(WS, id)[0];
        let delay = instance.created_at - fleet.published_at(WS, id);
        println!("{id:>7}  {:>6} ms", delay.num_milliseconds());
    }
    assert!(
        fleet.count("retried", None) >= 1,
        "the outage caused retries"
    );
    assert_eq!(
        fleet.count("parked", None),
        0,
        "a transient fault parks nothing"
    );
    let parked = fleet.env.topology.parked_queue();
    assert_eq!(fleet.env.queue_depth(&parked).await.unwrap(), 0);
    assert_eq!(fleet.parked().await, 0);
    let dead = fleet.env.topology.dead_queue();
    wait_until(
        "the dead-letter queue to drain",
        Duration::from_secs(10),
        || async { (fleet.env.queue_depth(&dead).await.ok()? == 0).then_some(()) },
    )
    .await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_loses_nothing_and_counts_no_failed_attempt() {
    let mut fleet = Fleet::start().await;
    fleet.connect(WS, |_| {}).await;
    fleet.spawn_consumer().await;
    fleet.spawn_replayer().await;
    fleet.fake.inject(Fault::NextN {
        method: None,
        path_prefix: "/resources".into(),
        // Each 429 pauses the integration for its 1 s reset: ten of them keep this test short.
        count: 10,
        kind: FaultKind::Status(429),
    });
    let ids = 400..415u64;
    for id in ids.clone() {
        fleet
            .publish(&sample::event(WS, id, 1, Some("alice@acme.com")))
            .await;
    }
    all_synced_once(&fleet, ids, Duration::from_secs(60)).await;
    assert!(fleet.count("deferred", None) >= 1, "429s deferred events");
    assert_eq!(
        fleet.count("retried", None),
        0,
        "a 429 is not a failed attempt"
    );
    assert_eq!(fleet.count("parked", None), 0);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_error_parks_the_event_until_a_replay_after_the_fix_delivers_it_once() {
    let mut fleet = Fleet::start().await;
    fleet.connect(WS, |_| {}).await;
    // Vitally refuses the instance with a 400 that no retry can fix.
    fleet.fake.inject(Fault::NextN {
        method: Some("POST".into()),
        path_prefix: "/resources/customObjects".into(),
        count: 1,
        kind: FaultKind::Status(400),
    });
    fleet.spawn_consumer().await;
    fleet.spawn_replayer().await;
    fleet
        .publish(&sample::event(WS, 500, 1, Some("alice@acme.com")))
        .await;
    fleet.wait_settled(1).await;
    assert_eq!(fleet.count("parked", Some("vitally_400")), 1);

    // The replayer drains the parked queue into the parked set.
    let dlq = fleet.dlq();
    let all = DlqFilter::default();
    let entries = wait_until(
        "the parked message in PostgreSQL",
        Duration::from_secs(10),
        || async {
            let page = dlq.list(&all, None, 50).await.ok()?;
            (!page.dead_letters.is_empty()).then_some(page.dead_letters)
        },
    )
    .await;
    println!("{}", render::parked_table(&entries, chrono::Utc::now()));
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].reason, "vitally_400");
    assert_eq!(entries[0].request_id, Some(500));

    // Vitally is fixed (the fault answered once); a reconnect on the way is harmless,
    // and a fresh consumer takes the replay.
    fleet.take_consumer().stop().await;
    fleet.connect(WS, |_| {}).await;
    fleet.spawn_consumer().await;
    let options = |dry_run| ReplayOptions {
        dry_run,
        rate_per_sec: None,
        actor: "on-call".into(),
        why: "trait repaired".into(),
    };
    let preview = dlq.prepare_replay(&all, &options(true)).await.unwrap();
    assert_eq!(preview.matched, 1, "1 message would be replayed");
    let job = dlq.prepare_replay(&all, &options(false)).await.unwrap();
    let report = dlq.replay(&fleet.publisher, job, |_| {}).await.unwrap();
    assert_eq!(report.replayed, 1);
    all_synced_once(&fleet, 500..501, Duration::from_secs(20)).await;

    let again = dlq.prepare_replay(&all, &options(false)).await.unwrap();
    assert_eq!(again.matched, 0, "a second replay has nothing left to do");
    assert_eq!(fleet.instances_for(WS, 500).len(), 1);
    // Where did request 500 go? Parked, replayed, then synced.
    let record = wait_until(
        "request 500 synced in the ledger",
        Duration::from_secs(10),
        || async {
            let record = Ledger::read_only(fleet.store.db().clone())
                .show(WS, 500, 50)
                .await
                .ok()??;
            (record.outcome.as_deref() == Some("synced")).then_some(record)
        },
    )
    .await;
    let story: Vec<(&str, &str)> = record
        .history
        .iter()
        .map(|h| (h.outcome.as_str(), h.reason.as_str()))
        .collect();
    let parked_at = story.iter().position(|s| *s == ("parked", "vitally_400"));
    let replayed_at = story.iter().position(|s| *s == ("replayed", "vitally_400"));
    let synced_at = story.iter().rposition(|s| s.0 == "synced");
    assert!(
        parked_at < replayed_at && replayed_at < synced_at && parked_at.is_some(),
        "{story:?}"
    );
    fleet.stop().await;
}
