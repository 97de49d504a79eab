//! The control plane over the wire (real PostgreSQL, RabbitMQ, Redis, fake Vitally):
//! integrations survive Redis losing its data, a rotated key pauses an integration and
//! holds its events until a reconnect or the probe heals it, a replica with the wrong
//! key says so, and traits created in Vitally after connect are picked up.

use std::time::{Duration, Instant};

use fake_vitally::FakeConfig;
use secrecy::SecretString;
use thena_runtime::ops::Readiness;
use thena_testkit::wait_until;
use vitally_client::{
    client::VitallyHttp, integrations::Health, metrics::VitallyMetrics, traits::FieldType,
};

use crate::support::{Fleet, WS, status_of, versioned, wait_all_at};

const NEW_HEADER: &str = "Basic cm90YXRlZC1rZXk6";

async fn health(fleet: &Fleet) -> Health {
    fleet
        .store
        .get(WS)
        .await
        .unwrap()
        .expect("connected")
        .health
}

async fn wait_health(fleet: &Fleet, want: Health, deadline: Duration) -> Duration {
    let started = Instant::now();
    wait_until(
        &format!("integration {}", want.describe()),
        deadline,
        || async { (health(fleet).await == want).then_some(()) },
    )
    .await;
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_pauses_the_integration_holds_its_events_and_a_reconnect_syncs_each_once() {
    let mut fleet = Fleet::start().await;
    fleet.connect(WS, |_| {}).await;
    fleet.spawn_consumer().await;
    fleet.spawn_replayer().await;
    let ids: Vec<u64> = (700..710).collect();
    for id in &ids {
        fleet.publish(&versioned(WS, *id, 1)).await;
    }
    wait_all_at(&fleet, &ids, 1, Duration::from_secs(20)).await;

    // The customer rotates the key in Vitally: the stored header is now rejected.
    fleet.fake.rotate_auth_header(NEW_HEADER.to_owned());
    for version in [2, 3] {
        for id in &ids {
            fleet.publish(&versioned(WS, *id, version)).await;
        }
    }
    let paused_after = wait_health(&fleet, Health::AuthRejected, Duration::from_secs(10)).await;
    println!("paused {paused_after:?} after the rotation");
    wait_until("held events", Duration::from_secs(10), || async {
        (fleet.count("held", Some("auth_rejected")) >= 20).then_some(())
    })
    .await;
    assert_eq!(fleet.count("parked", None), 0, "nothing parked one by one");
    assert_eq!(fleet.count("retried", None), 0, "nothing retried hot");
    let before = fleet.fake.calls().total;
    wait_until("a few hold cycles", Duration::from_secs(10), || async {
        (fleet.count("held", Some("auth_rejected")) >= 60).then_some(())
    })
    .await;
    let rejected_calls = fleet.fake.calls().total - before;
    assert!(
        rejected_calls <= 10,
        "held events cost no Vitally calls ({rejected_calls}; the probe makes a few)"
    );

    // The operator pastes the new key: the integration heals and every held event syncs.
    fleet
        .connect(WS, |r| r.auth_header = SecretString::from(NEW_HEADER))
        .await;
    assert_eq!(health(&fleet).await, Health::Healthy);
    wait_all_at(&fleet, &ids, 3, Duration::from_secs(20)).await;
    assert_eq!(fleet.count("parked", None), 0);
    let history = fleet.store.history(WS, 100).await.unwrap();
    let actions: Vec<&str> = history.iter().map(|h| h.action.as_str()).collect();
    assert_eq!(
        actions,
        ["connected", "paused", "reconnected"],
        "{history:?}"
    );
    assert_eq!(history[1].actor, "consumer");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_resumes_a_paused_integration_once_vitally_accepts_its_key_again() {
    let mut fleet = Fleet::start().await;
    fleet.connect(WS, |_| {}).await;
    fleet.spawn_consumer().await;
    let original = fleet.fake.auth_header();
    fleet.fake.rotate_auth_header(NEW_HEADER.to_owned());
    fleet.publish(&versioned(WS, 720, 1)).await;
    wait_health(&fleet, Health::AuthRejected, Duration::from_secs(10)).await;

    // The key is restored in Vitally (say, the rotation was rolled back): nobody
    // reconnects or replays, the probe (every 300 ms here) notices on its own.
    fleet.fake.add_auth_header(original);
    let healed_after = wait_health(&fleet, Health::Healthy, Duration::from_secs(10)).await;
    println!("healed {healed_after:?} after the key was accepted again");
    wait_all_at(&fleet, &[720], 1, Duration::from_secs(10)).await;
    let history = fleet.store.history(WS, 100).await.unwrap();
    let last = history.last().unwrap();
    assert_eq!(
        (last.action.as_str(), last.actor.as_str()),
        ("resumed", "health-probe")
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_cannot_decrypt_holds_the_events_and_fails_readyz() {
    let mut fleet = Fleet::start().await;
    fleet.connect(WS, |_| {}).await;
    let mut wrong = fleet.config.clone();
    wrong.integrations_key = Some(SecretString::from("ab".repeat(32)));
    let readiness = Readiness::new();
    fleet.spawn_consumer_with(&wrong, readiness.clone()).await;
    assert!(
        !readiness.is_ready(),
        "known at start: {:?}",
        readiness.report()
    );
    assert_eq!(readiness.report().get("integrations_key"), Some(&false));

    fleet.publish(&versioned(WS, 730, 1)).await;
    wait_until("held as undecryptable", Duration::from_secs(10), || async {
        (fleet.count("held", Some("key_undecryptable")) >= 1).then_some(())
    })
    .await;
    assert_eq!(fleet.count("parked", None), 0);
    assert_eq!(fleet.count("retried", None), 0);
    // The record itself is fine: another replica must not see it paused.
    assert_eq!(health(&fleet).await, Health::Healthy);

    // A replica with the fleet's key takes the held event.
    fleet.take_consumer().stop().await;
    fleet.spawn_consumer().await;
    wait_all_at(&fleet, &[730], 1, Duration::from_secs(10)).await;
    fleet.stop().await;
}

/// Every call a consumer makes with a stored record passes the allow-list again: a
/// record connected under a wider `VITALLY_ALLOWED_HOSTS` (or before there was one) is
/// held on a replica that does not allow it, with no call to that host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_does_not_allow_a_stored_api_url_holds_its_events_and_calls_nothing() {
    let mut fleet = Fleet::start().await;
    fleet.connect(WS, |_| {}).await;
    fleet.fake.reset_calls();
    let mut narrow = fleet.config.clone();
    narrow.vitally.allowed_hosts = thena_runtime::egress::AllowList::vitally();
    fleet.spawn_consumer_with(&narrow, Readiness::new()).await;

    fleet.publish(&versioned(WS, 735, 1)).await;
    wait_until(
        "held as api_url_refused",
        Duration::from_secs(10),
        || async { (fleet.count("held", Some("api_url_refused")) >= 1).then_some(()) },
    )
    .await;
    assert_eq!(fleet.fake.calls().total, 0, "{:?}", fleet.fake.calls());
    assert_eq!(fleet.count("parked", None), 0);
    assert_eq!(health(&fleet).await, Health::Healthy);

    // A replica configured like the one that connected takes the held event.
    fleet.take_consumer().stop().await;
    fleet.spawn_consumer().await;
    wait_all_at(&fleet, &[735], 1, Duration::from_secs(10)).await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_every_redis_key_under_load_loses_nothing_duplicates_nothing_and_keeps_integrations()
{
    let mut fleet = Fleet::start_with(FakeConfig::default(), &[]).await;
    let connected = fleet.connect(WS, |_| {}).await;
    fleet.spawn_consumer().await;
    fleet.spawn_consumer().await;
    fleet.spawn_replayer().await;
    let ids: Vec<u64> = (800..840).collect();
    let mut flushed = 0;
    for version in 1..=3 {
        for id in &ids {
            fleet.publish(&versioned(WS, *id, version)).await;
        }
        // Mid-stream, twice: every lock, version copy, cache entry and limiter key goes.
        if version < 3 {
            flushed += thena_testkit::delete_redis_prefix(
                &thena_testkit::redis_url(),
                &fleet.env.redis_prefix,
            )
            .await
            .unwrap();
        }
    }
    assert!(flushed > 0, "there were keys to lose");
    // Locks resume one lock lifetime (8 s here) after the loss was noticed.
    wait_all_at(&fleet, &ids, 3, Duration::from_secs(60)).await;
    assert_eq!(fleet.count("parked", None), 0);
    assert!(
        fleet.count("deferred", Some("redis_data_lost")) > 0,
        "the loss was noticed and waited out"
    );
    let kept = fleet
        .store
        .get(WS)
        .await
        .unwrap()
        .expect("the integration survived");
    assert_eq!(kept.established_at, connected.established_at);
    assert_eq!(kept.health, Health::Healthy);
    // And the durable version record has the latest of each.
    for id in &ids {
        assert_eq!(
            fleet.store.db().synced_version(WS, *id).await.unwrap(),
            Some(3)
        );
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trait_created_in_vitally_after_connect_gets_values_without_a_reconnect() {
    let mut fleet = Fleet::start_with(FakeConfig::default(), &[("CACHE_TTL_FIELDS", "1s")]).await;
    let integration = fleet.connect(WS, |_| {}).await;
    assert!(integration.field("Region").is_none());
    fleet.spawn_consumer().await;
    let with_region = |version: u64| {
        let mut event = versioned(WS, 740, version);
        event
            .request
            .custom_fields
            .insert("Region".into(), "EMEA".into());
        event
    };
    fleet.publish(&with_region(1)).await;
    wait_all_at(&fleet, &[740], 1, Duration::from_secs(10)).await;

    // The FAQ's remedy: the customer creates the trait in Vitally, same label.
    let http =
        VitallyHttp::from_settings(&fleet.config.vitally, VitallyMetrics::unregistered()).unwrap();
    integration
        .client(&http)
        .add_fields(
            &integration.custom_object_id,
            &[("Region", FieldType::String)],
        )
        .await
        .unwrap();
    let started = Instant::now();
    let region_path = || {
        let instance = fleet.instances_for(WS, 740).pop()?;
        instance
            .traits
            .iter()
            .find(|(_, v)| v.as_str() == Some("EMEA"))
            .map(|(k, _)| k.clone())
    };
    // Each change after the trait exists is a chance for the refresh to pick it up.
    let mut version = 1;
    let path = loop {
        version += 1;
        fleet.publish(&with_region(version)).await;
        wait_all_at(&fleet, &[740], version, Duration::from_secs(10)).await;
        if let Some(path) = region_path() {
            break path;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "Region never written after {version} changes"
        );
    };
    println!(
        "Region written to {path} {:?} after the trait was created",
        started.elapsed()
    );
    let stored = fleet.store.get(WS).await.unwrap().unwrap();
    assert!(
        stored.field("Region").is_some(),
        "the field map was refreshed"
    );
    let history = fleet.store.history(WS, 100).await.unwrap();
    assert!(
        history.iter().any(|h| h.action == "fields_refreshed"),
        "{history:?}"
    );
    assert_eq!(fleet.instances_for(WS, 740).len(), 1);
    assert!(status_of(&fleet.instances_for(WS, 740)[0]).starts_with('v'));
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trait_path_vitally_rejects_is_re_read_at_once_and_the_event_retried_not_parked() {
    let mut fleet = Fleet::start().await;
    fleet.connect(WS, |_| {}).await;
    // Our stored path for Status no longer matches Vitally's (the object was edited):
    // Vitally answers 400 naming the unknown trait.
    fleet
        .store
        .modify(WS, "test", "broken_by_test", |broken| {
            broken.fields.get_mut("Status").unwrap().path = "vitally.custom.statusGone".into();
            Ok::<_, vitally_client::integrations::StoreError>(())
        })
        .await
        .unwrap();
    fleet.spawn_consumer().await;
    fleet.spawn_replayer().await;
    fleet.publish(&versioned(WS, 750, 1)).await;
    wait_all_at(&fleet, &[750], 1, Duration::from_secs(20)).await;
    assert_eq!(fleet.count("retried", Some("fields_refreshed")), 1);
    assert_eq!(fleet.count("parked", None), 0);
    let repaired = fleet.store.get(WS).await.unwrap().unwrap();
    assert_ne!(
        repaired.field("Status").unwrap().path,
        "vitally.custom.statusGone"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_object_pauses_the_integration_and_a_reconnect_recreates_it_and_syncs() {
    let mut fleet = Fleet::start().await;
    let integration = fleet.connect(WS, |_| {}).await;
    fleet.spawn_consumer().await;
    fleet.spawn_replayer().await;
    fleet.publish(&versioned(WS, 760, 1)).await;
    wait_all_at(&fleet, &[760], 1, Duration::from_secs(10)).await;

    // Someone deletes "Thena Requests" in Vitally's UI.
    assert!(
        fleet
            .fake
            .delete_custom_object(&integration.custom_object_id)
    );
    fleet.publish(&versioned(WS, 760, 2)).await;
    fleet.publish(&versioned(WS, 761, 1)).await;
    wait_health(&fleet, Health::ObjectMissing, Duration::from_secs(10)).await;
    assert_eq!(fleet.count("parked", None), 0);

    // A reconnect creates the object again; the held events land in it.
    let reconnected = fleet.connect(WS, |_| {}).await;
    assert_ne!(reconnected.custom_object_id, integration.custom_object_id);
    assert_eq!(reconnected.established_at, integration.established_at);
    wait_until(
        "both requests in the new object",
        Duration::from_secs(20),
        || async {
            let at = |id, v: &str| {
                let found = fleet.instances_for(WS, id);
                found.len() == 1 && status_of(&found[0]) == v
            };
            (at(760, "v2") && at(761, "v1")).then_some(())
        },
    )
    .await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_integrations_cli_says_what_connect_did_and_what_set_changed() {
    let fleet = Fleet::start().await;
    let run = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_thena-vitally"))
            .args(args)
            .envs(fleet.variables())
            .env("VITALLY_AUTH_HEADER", fleet.fake.auth_header())
            .env("USER", "oncall")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        (output.status.success(), text)
    };
    let url = fleet.fake.base_url();
    let (ok, connected) = run(&[
        "integrations",
        "connect",
        "--workspace",
        WS,
        "--api-url",
        &url,
        "--category",
        "Region",
    ]);
    assert!(ok, "{connected}");
    assert!(
        connected.contains(&format!(
            "connected {WS}: created the \"Thena Requests\" object"
        )),
        "{connected}"
    );
    assert!(
        connected.contains("trait(s) added:") && connected.contains("Region"),
        "{connected}"
    );
    let (ok, again) = run(&[
        "integrations",
        "connect",
        "--workspace",
        WS,
        "--api-url",
        &url,
    ]);
    assert!(
        ok && again.contains("adopted the existing object")
            && again.contains("no trait was missing"),
        "{again}"
    );

    let (ok, nothing) = run(&["integrations", "set", WS]);
    assert!(ok && nothing.contains("nothing to change"), "{nothing}");
    let (ok, changed) = run(&["integrations", "set", WS, "--update-requests", "false"]);
    assert!(
        ok && changed.contains("update_requests: true → false"),
        "{changed}"
    );
    let (ok, same) = run(&["integrations", "set", WS, "--update-requests", "false"]);
    assert!(ok && same.contains("nothing changed"), "{same}");

    let (ok, history) = run(&["integrations", "history", WS]);
    assert!(ok, "{history}");
    for action in ["connected", "reconnected", "settings_changed"] {
        assert!(history.contains(action), "{action} missing in {history}");
    }
    assert!(history.contains("cli:oncall"), "{history}");
    assert!(!history.contains(&fleet.fake.auth_header()), "{history}");
    let (ok, listed) = run(&["integrations", "list"]);
    assert!(ok && listed.contains("\"health\": \"healthy\""), "{listed}");
    fleet.stop().await;
}
