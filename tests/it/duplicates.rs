//! One instance per request when Vitally is slow (issue 14, item 3): creates applied but
//! answered after the client timeout, and a search that lags writes.

use std::time::Duration;

use fake_vitally::{FakeConfig, Fault, FaultKind, Fixture, InstanceSeed};
use thena_testkit::wait_until;

use crate::support::{Fleet, WS, versioned, wait_all_at};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_answers_and_a_lagging_search_at_10_percent_of_creates_leave_no_duplicate() {
    let mut fleet = Fleet::start_with(FakeConfig::default(), &[("VITALLY_TIMEOUT", "1s")]).await;
    let integration = fleet.connect(WS, |_| {}).await;
    // Every new instance is invisible to search for 2.5 s, and every 10th create is
    // applied but answered after the 1 s client timeout: its retry searches, finds
    // nothing yet, and must not create a second instance.
    fleet.fake.inject(Fault::SearchLag {
        lag: Duration::from_millis(2_500),
    });
    fleet.fake.inject(Fault::EveryNth {
        method: Some("POST".into()),
        path_prefix: format!(
            "/resources/customObjects/{}/instances",
            integration.custom_object_id
        ),
        nth: 10,
        kind: FaultKind::AnswerLate(Duration::from_millis(1_500)),
    });
    fleet.spawn_consumer().await;
    fleet.spawn_consumer().await;
    fleet.spawn_replayer().await;

    let ids: Vec<u64> = (1..=200).collect();
    for id in &ids {
        fleet.publish(&versioned(WS, 9_000 + id, 1)).await;
    }
    let requests: Vec<u64> = ids.iter().map(|id| 9_000 + id).collect();
    wait_all_at(&fleet, &requests, 1, Duration::from_secs(90)).await;
    assert!(
        fleet.count("retried", Some("vitally_timeout")) >= 10,
        "the fault hit too few creates"
    );
    // Nothing else is left behind: exactly 200 instances.
    let total = fleet
        .fake
        .instances()
        .iter()
        .filter(|i| i.external_id.starts_with(&format!("thena:{WS}:9")))
        .count();
    assert_eq!(total, 200, "duplicates were created");
    fleet.stop().await;
}

/// The case above, one request at a time: every other create is applied but answered
/// after the client timeout, and its retry (well inside the budget, so it comes back at
/// once) searches while the search still lags — it waits for the create to surface
/// instead of creating a second instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_cannot_see_its_lost_create_yet_waits_instead_of_creating_again() {
    let mut fleet = Fleet::start_with(FakeConfig::default(), &[("VITALLY_TIMEOUT", "1s")]).await;
    let integration = fleet.connect(WS, |_| {}).await;
    fleet.fake.inject(Fault::SearchLag {
        lag: Duration::from_millis(2_500),
    });
    fleet.fake.inject(Fault::EveryNth {
        method: Some("POST".into()),
        path_prefix: format!(
            "/resources/customObjects/{}/instances",
            integration.custom_object_id
        ),
        nth: 2,
        kind: FaultKind::AnswerLate(Duration::from_millis(1_500)),
    });
    fleet.spawn_consumer().await;
    fleet.spawn_replayer().await;
    let requests: Vec<u64> = (9_501..=9_506).collect();
    for id in &requests {
        fleet.publish(&versioned(WS, *id, 1)).await;
    }
    // Every event settles for good (the late answers' retries included).
    fleet
        .wait_settled_within(requests.len() as u64, Duration::from_secs(60))
        .await;
    wait_all_at(&fleet, &requests, 1, Duration::from_secs(10)).await;
    assert!(fleet.count("retried", Some("vitally_timeout")) >= 3);
    assert!(
        fleet.count("retried", Some("create_unconfirmed")) >= 1,
        "no retry waited for a lost create to surface"
    );
    for id in &requests {
        assert_eq!(fleet.instances_for(WS, *id).len(), 1, "request {id}");
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_instances_of_a_request_are_deleted_keeping_the_oldest() {
    let mut fleet = Fleet::start().await;
    let integration = fleet.connect(WS, |_| {}).await;
    let external_id = format!("thena:{WS}:77");
    let seed = |id: &str| InstanceSeed {
        id: Some(id.into()),
        external_id: external_id.clone(),
        name: "Thena Request ID: 77".into(),
        custom_object_id: integration.custom_object_id.clone(),
        customer_id: Some("acc-acme-eu".into()),
        organization_id: None,
        traits: Default::default(),
    };
    // Two instances, as a lost create answer leaves them, one after the other.
    for id in ["inst-oldest", "inst-newer"] {
        fleet
            .fake
            .seed(Fixture {
                instances: vec![seed(id)],
                ..Fixture::default()
            })
            .expect("seed");
    }
    fleet.spawn_consumer().await;
    fleet.publish(&versioned(WS, 77, 1)).await;

    wait_until("one instance left", Duration::from_secs(20), || async {
        let instances = fleet.instances_for(WS, 77);
        (instances.len() == 1 && crate::support::status_of(&instances[0]) == "v1")
            .then_some(instances)
    })
    .await;
    assert_eq!(fleet.instances_for(WS, 77)[0].id, "inst-oldest");
    assert_eq!(
        fleet.counter("thena_vitally_instance_duplicates_removed_total"),
        1
    );
    fleet.stop().await;
}
