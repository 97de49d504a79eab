//! What lands in Vitally is what the snapshot says: removed categories are cleared, long
//! threads keep their newest messages, datetimes keep their precision (issue 14).

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::Value;
use thena_events::{ThreadMessage, sample};
use thena_testkit::wait_until;

use crate::support::{Fleet, WS, trait_of};

/// Waits until the request's only instance satisfies `check`, and returns it.
async fn wait_instance(
    fleet: &Fleet,
    request_id: u64,
    what: &str,
    check: impl Fn(&fake_vitally::Instance) -> bool,
) -> fake_vitally::Instance {
    wait_until(what, Duration::from_secs(20), || async {
        let instances = fleet.instances_for(WS, request_id);
        (instances.len() == 1 && check(&instances[0])).then(|| instances[0].clone())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_category_removed_from_the_request_is_cleared_in_vitally() {
    let mut fleet = Fleet::start().await;
    fleet
        .connect(WS, |r| {
            r.categories = vec!["Product".into(), "Region".into()]
        })
        .await;
    fleet.spawn_consumer().await;

    let mut v1 = sample::event(WS, 51, 1, Some("alice@acme.com"));
    v1.request
        .custom_fields
        .insert("Product".into(), "SSO".into());
    v1.request
        .custom_fields
        .insert("Region".into(), "EMEA".into());
    fleet.publish(&v1).await;
    wait_instance(&fleet, 51, "v1 with both categories", |i| {
        trait_of(i, "region") == Some(Value::from("EMEA"))
    })
    .await;

    let mut v2 = sample::event(WS, 51, 2, Some("alice@acme.com"));
    v2.request.created_at = v1.request.created_at;
    v2.request.status = Some("v2".into());
    v2.request
        .custom_fields
        .insert("Product".into(), "SSO".into());
    fleet.publish(&v2).await;
    fleet.wait_settled(2).await;

    let instance = wait_instance(&fleet, 51, "v2 applied", |i| {
        trait_of(i, "status") == Some(Value::from("v2"))
    })
    .await;
    assert_eq!(trait_of(&instance, "product"), Some(Value::from("SSO")));
    assert_eq!(
        trait_of(&instance, "region"),
        None,
        "the removed category keeps its old value: {:?}",
        instance.traits
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_thread_keeps_its_newest_messages_behind_an_earlier_marker() {
    let mut fleet = Fleet::start_with(Default::default(), &[("TEXTAREA_LIMIT", "600")]).await;
    fleet.connect(WS, |_| {}).await;
    fleet.spawn_consumer().await;

    let mut event = sample::event(WS, 52, 1, Some("alice@acme.com"));
    let start = event.request.created_at;
    event.request.customer_thread = (0..100)
        .map(|i| {
            ThreadMessage::new(
                "Harsh",
                format!("message number {i}"),
                start + chrono::Duration::seconds(i),
            )
        })
        .collect();
    fleet.publish(&event).await;

    let instance = wait_instance(&fleet, 52, "the instance", |_| true).await;
    let thread = trait_of(&instance, "customerThread")
        .and_then(|v| v.as_str().map(str::to_string))
        .expect("a customer thread");
    assert!(
        thread.ends_with(": message number 99"),
        "the newest message is lost: …{}",
        &thread[thread.len().saturating_sub(80)..]
    );
    let first = thread.lines().next().unwrap_or_default();
    let earlier: u64 = first
        .strip_prefix("… ")
        .and_then(|rest| rest.strip_suffix(" earlier messages"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no leading marker: {first:?}"));
    let kept = thread.lines().count() as u64 - 1;
    assert_eq!(earlier + kept, 100, "every message is kept or counted");
    assert!(
        thread
            .lines()
            .nth(1)
            .unwrap()
            .contains(&format!("number {earlier}"))
    );
    assert!(
        thread.chars().count() <= 600,
        "{} chars",
        thread.chars().count()
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datetimes_reach_vitally_with_the_precision_thena_sent() {
    let mut fleet = Fleet::start().await;
    fleet.connect(WS, |_| {}).await;
    fleet.spawn_consumer().await;

    let mut event = sample::event(WS, 53, 1, Some("alice@acme.com"));
    // Now, with exactly 123 ms (the connect set established_at a moment ago).
    let now = Utc::now() + chrono::Duration::seconds(1);
    let millis = |t: DateTime<Utc>| -> DateTime<Utc> {
        Utc.timestamp_millis_opt(t.timestamp() * 1000 + 123)
            .single()
            .expect("valid")
    };
    event.request.created_at = millis(now);
    event.request.updated_at = millis(now + chrono::Duration::seconds(5));
    fleet.publish(&event).await;

    let instance = wait_instance(&fleet, 53, "the instance", |_| true).await;
    let expect =
        |t: DateTime<Utc>| Some(Value::from(t.format("%Y-%m-%dT%H:%M:%S.123Z").to_string()));
    assert_eq!(
        trait_of(&instance, "requestCreatedAt"),
        expect(event.request.created_at)
    );
    assert_eq!(
        trait_of(&instance, "requestUpdatedAt"),
        expect(event.request.updated_at)
    );
    fleet.stop().await;
}
