//! What lands in Vitally is what the snapshot says: removed categories are cleared, long
//! threads keep their newest messages, datetimes keep their precision (issue 14).

use std::time::Duration;

use serde_json::Value;
use thena_events::sample;
use thena_testkit::wait_until;

use crate::support::{Fleet, WS};

/// The trait of `instance` whose path ends with `.{key}`.
fn trait_of(instance: &fake_vitally::Instance, key: &str) -> Option<Value> {
    let suffix = format!(".{key}");
    instance
        .traits
        .iter()
        .find(|(k, _)| k.ends_with(&suffix))
        .map(|(_, v)| v.clone())
}

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
