use std::time::Duration;

use chrono::Utc;
use thena_demo::customers::{Expect, PERSONAS};
use thena_events::{Change, sample};
use thena_testkit::wait_until;

use crate::support::{Fleet, WS, status_of};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_linking_case_lands_where_the_product_doc_says() {
    let mut fleet = Fleet::start().await;
    fleet.connect(WS, |_| {}).await;
    fleet.spawn_consumer().await;

    for (i, persona) in PERSONAS.iter().enumerate() {
        let mut event = sample::event(WS, 1000 + i as u64, 1, persona.email);
        event.request.requestor.name = Some(persona.name.to_string());
        fleet.publish(&event).await;
    }
    fleet.wait_settled(PERSONAS.len() as u64).await;

    for (i, persona) in PERSONAS.iter().enumerate() {
        let instances = fleet.instances_for(WS, 1000 + i as u64);
        match persona.expect {
            Expect::Linked {
                account,
                organization,
            } => {
                assert_eq!(
                    instances.len(),
                    1,
                    "{}: expected one instance",
                    persona.case
                );
                assert_eq!(
                    instances[0].customer_id.as_deref(),
                    account,
                    "{}: account",
                    persona.case
                );
                assert_eq!(
                    instances[0].organization_id.as_deref(),
                    organization,
                    "{}: organization",
                    persona.case
                );
            }
            Expect::Skipped(reason) => {
                assert!(
                    instances.is_empty(),
                    "{}: expected no instance",
                    persona.case
                );
                assert!(
                    fleet.count("skipped", Some(reason)) >= 1,
                    "{}: skip reason {reason} not counted",
                    persona.case
                );
            }
        }
    }
    // The fallback created the unknown requestors in the chosen customer.
    let users = fleet.fake.dump().users;
    let newbie = users
        .iter()
        .find(|u| u.email.as_deref() == Some("newbie@initech.com"))
        .expect("newbie created");
    assert_eq!(newbie.account_ids, vec!["acc-initech".to_string()]);
    assert_eq!(newbie.external_id, format!("thena:{WS}:U1009"));
    let stranger = users
        .iter()
        .find(|u| u.email.as_deref() == Some("stranger@wayne.com"))
        .expect("stranger created");
    assert_eq!(stranger.organization_ids, vec!["org-wayne".to_string()]);
    assert!(
        !users
            .iter()
            .any(|u| u.email.as_deref() == Some("someone@gmail.com")),
        "never for free mail"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toggles_forward_only_and_thread_changes_decide_what_syncs() {
    let mut fleet = Fleet::start().await;
    fleet.connect(WS, |r| r.update_requests = false).await;
    fleet.connect("T-OFF", |r| r.push_requests = false).await;
    fleet.spawn_consumer().await;

    // update_requests off: created, never updated.
    fleet
        .publish(&sample::event(WS, 1, 1, Some("alice@acme.com")))
        .await;
    fleet.wait_settled(1).await;
    let mut v2 = sample::event(WS, 1, 2, Some("alice@acme.com"));
    v2.request.status = Some("closed".into());
    fleet.publish(&v2).await;
    // push_requests off: nothing.
    fleet
        .publish(&sample::event("T-OFF", 2, 1, Some("alice@acme.com")))
        .await;
    // Created before the integration was established: forward-only.
    let mut old = sample::event(WS, 3, 1, Some("alice@acme.com"));
    old.request.created_at = Utc::now() - chrono::Duration::days(30);
    fleet.publish(&old).await;
    // Only the thread changed: waits for the next metadata change.
    let mut thread = sample::event(WS, 1, 3, Some("alice@acme.com"));
    thread.change = Change::Thread;
    fleet.publish(&thread).await;
    fleet.wait_settled(5).await;

    assert_eq!(fleet.count("skipped", Some("update_disabled")), 1);
    assert_eq!(fleet.count("skipped", Some("push_disabled")), 1);
    assert_eq!(fleet.count("skipped", Some("before_integration")), 1);
    assert_eq!(fleet.count("skipped", Some("thread_only")), 1);
    let instance = &fleet.instances_for(WS, 1)[0];
    let status = status_of(instance);
    assert_eq!(
        status, "open",
        "update_requests off left the instance alone"
    );
    assert!(fleet.instances_for("T-OFF", 2).is_empty());
    assert!(fleet.instances_for(WS, 3).is_empty());
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_version_never_overwrites_a_newer_one() {
    let mut fleet = Fleet::start().await;
    fleet.connect(WS, |_| {}).await;
    fleet.spawn_consumer().await;
    let mut newer = sample::event(WS, 7, 5, Some("alice@acme.com"));
    newer.request.status = Some("closed".into());
    fleet.publish(&newer).await;
    fleet.wait_settled(1).await;
    let mut older = sample::event(WS, 7, 4, Some("alice@acme.com"));
    older.request.status = Some("open".into());
    fleet.publish(&older).await;
    fleet.publish(&newer).await; // the same version again: a redelivery
    fleet.wait_settled(3).await;

    assert_eq!(fleet.count("skipped", Some("stale_version")), 1);
    assert_eq!(fleet.count("skipped", Some("already_applied")), 1);
    let instances = fleet.instances_for(WS, 7);
    assert_eq!(instances.len(), 1);
    let status = status_of(&instances[0]);
    assert_eq!(status, "closed");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_message_is_parked_at_once_and_the_rest_flows() {
    let mut fleet = Fleet::start().await;
    fleet.connect(WS, |_| {}).await;
    fleet.spawn_consumer().await;
    fleet.publish_raw(b"{this is not an event").await;
    fleet
        .publish(&sample::event(WS, 8, 1, Some("alice@acme.com")))
        .await;
    fleet.wait_settled(2).await;
    assert_eq!(fleet.count("parked", Some("undecodable")), 1);
    assert_eq!(fleet.instances_for(WS, 8).len(), 1);
    let parked = fleet.env.topology.parked_queue();
    assert_eq!(fleet.env.queue_depth(&parked).await.unwrap(), 1);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_and_racing_consumers_make_exactly_one_instance_at_the_latest_version() {
    let mut fleet = Fleet::start().await;
    fleet.connect(WS, |_| {}).await;
    fleet.spawn_consumer().await;
    fleet.spawn_consumer().await;
    let requests = 20u64;
    let versions = 4u64;
    let mut published = 0;
    for version in 1..=versions {
        for id in 0..requests {
            let mut event = sample::event(WS, 100 + id, version, Some("alice@acme.com"));
            event.request.status = Some(format!("v{version}"));
            // Every event twice: at-least-once delivery means duplicates happen.
            fleet.publish(&event).await;
            fleet.publish(&event).await;
            published += 2;
        }
    }
    fleet.wait_settled(published).await;
    for id in 0..requests {
        let instances = fleet.instances_for(WS, 100 + id);
        assert_eq!(instances.len(), 1, "request {id}: one instance");
        let status = status_of(&instances[0]);
        assert_eq!(
            status,
            format!("v{versions}"),
            "request {id}: latest version"
        );
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_update_to_a_known_request_costs_exactly_one_vitally_call() {
    let mut fleet = Fleet::start().await;
    fleet.connect(WS, |_| {}).await;
    fleet.spawn_consumer().await;
    fleet
        .publish(&sample::event(WS, 11, 1, Some("alice@acme.com")))
        .await;
    fleet
        .publish(&sample::event(WS, 11, 2, Some("alice@acme.com")))
        .await;
    fleet.wait_settled(2).await;
    fleet.fake.reset_calls();
    fleet
        .publish(&sample::event(WS, 11, 3, Some("alice@acme.com")))
        .await;
    fleet.wait_settled(3).await;
    let calls = fleet.fake.calls();
    assert_eq!(calls.total, 1, "warm path: {:?}", calls.by_route);
    assert_eq!(
        calls.route("PUT /resources/customObjects/:id/instances/:id"),
        1
    );
    fleet.stop().await;
}

/// The in-process variant; `chaos.rs` SIGKILLs a consumer process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_consumer_mid_batch_loses_nothing() {
    let mut fleet = Fleet::start().await;
    fleet.connect(WS, |_| {}).await;
    // Slow Vitally so the first consumer is surely mid-batch when it dies.
    fleet.fake.inject(fake_vitally::Fault::NextN {
        method: None,
        path_prefix: "/resources".into(),
        count: 40,
        kind: fake_vitally::FaultKind::Latency(Duration::from_millis(50)),
    });
    fleet.spawn_consumer().await;
    let n = 60u64;
    for id in 0..n {
        fleet
            .publish(&sample::event(WS, 200 + id, 1, Some("alice@acme.com")))
            .await;
    }
    wait_until(
        "the first consumer to be mid-batch",
        Duration::from_secs(20),
        || async { (fleet.settled() >= 5).then_some(()) },
    )
    .await;
    fleet.take_consumer().kill().await;
    fleet.spawn_consumer().await;
    wait_until("every request synced", Duration::from_secs(30), || async {
        (0..n)
            .all(|id| fleet.instances_for(WS, 200 + id).len() == 1)
            .then_some(())
    })
    .await;
    for id in 0..n {
        assert_eq!(fleet.instances_for(WS, 200 + id).len(), 1, "request {id}");
    }
    fleet.stop().await;
}
