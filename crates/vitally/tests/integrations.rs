//! Integration records in a real PostgreSQL: encrypted at rest, bound to their
//! workspace, soft-deleted, with a history of every change, announced over NOTIFY and
//! seen by consumers' caches at once.

mod common;

use std::{collections::BTreeMap, time::Duration};

use chrono::{TimeZone, Utc};
use common::{Scope, eventually};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use thena_store::notify::{self, Notice};
use tokio_util::sync::CancellationToken;
use vitally_client::{
    integrations::{FieldRef, Health, Integration, IntegrationCache, IntegrationStore, StoreError},
    provision::{self, Toggles},
    traits::FieldType,
};

const HEADER: &str = "Basic c3VwZXItc2VjcmV0LWtleTo=";
const TOKEN: &str = "c3VwZXItc2VjcmV0LWtleTo=";

fn integration(ws: &str) -> Integration {
    let mut fields = BTreeMap::new();
    fields.insert(
        "Title".to_owned(),
        FieldRef {
            path: "vitally.custom.title".into(),
            field_type: FieldType::Textarea,
        },
    );
    let now = Utc::now();
    Integration {
        workspace_id: ws.to_owned(),
        api_url: "https://acme.rest.vitally.io".into(),
        // One Vitally per workspace: each test record gets its own key.
        auth_header: SecretString::from(format!("{HEADER}{ws}")),
        push_requests: true,
        update_requests: true,
        sync_threads: false,
        auto_create_fields: false,
        rate_budget_per_min: 600,
        established_at: Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap(),
        custom_object_id: "co-1".into(),
        fields,
        fields_refreshed_at: now,
        fingerprint: String::new(),
        health: Health::Healthy,
        health_detail: None,
        health_changed_at: now,
        connected_at: now,
        updated_at: now,
        revision: 0,
    }
}

async fn save(store: &IntegrationStore, record: &Integration) -> Integration {
    store
        .save_connection(record, "test", "connected", json!({}))
        .await
        .expect("saved")
}

/// Every column of every control-plane table as text, to grep for secrets.
async fn all_rows(store: &IntegrationStore) -> String {
    let client = store.db().client().await.unwrap();
    let mut out = String::new();
    for table in ["integrations", "integration_events"] {
        for row in client
            .query(&format!("SELECT row_to_json(t)::text FROM {table} t"), &[])
            .await
            .unwrap()
        {
            out.push_str(&row.get::<_, String>(0));
            out.push('\n');
        }
    }
    out
}

#[tokio::test]
async fn a_record_round_trips_with_the_auth_header_encrypted_at_rest() {
    let scope = Scope::new();
    let store = scope.store(common::cipher()).await;
    let record = integration("T-rt");
    let stored = save(&store, &record).await;
    assert_eq!(stored.revision, 1);
    assert_eq!(stored.established_at, record.established_at);
    assert!(
        stored.fingerprint.starts_with("k1:"),
        "{}",
        stored.fingerprint
    );

    let rows = all_rows(&store).await;
    assert!(rows.contains("\"auth_header_enc\":\"v1:"), "{rows}");
    assert!(!rows.contains(HEADER) && !rows.contains(TOKEN), "{rows}");

    let loaded = store.get("T-rt").await.unwrap().expect("stored");
    assert_eq!(
        loaded.auth_header.expose_secret(),
        record.auth_header.expose_secret()
    );
    assert_eq!(loaded.fields, record.fields);
    assert!(store.get("T-none").await.unwrap().is_none());
    scope.cleanup().await;
}

#[tokio::test]
async fn another_key_or_another_workspace_cannot_decrypt_a_record() {
    let scope = Scope::new();
    let store = scope.store(common::cipher()).await;
    save(&store, &integration("T-a")).await;
    save(&store, &integration("T-b")).await;

    let other_key = scope.store(common::cipher()).await;
    let err = other_key.get("T-a").await.unwrap_err();
    assert!(matches!(err, StoreError::Cipher { .. }), "{err:?}");
    assert!(err.is_undecryptable());
    assert!(err.to_string().contains("could not be decrypted"));
    assert_eq!(other_key.undecryptable().await.unwrap(), ["T-a", "T-b"]);
    let views = other_key.views().await.unwrap();
    assert_eq!(views[0]["health"], "paused: key_undecryptable");

    // Copy T-a's ciphertext onto T-b's record: the workspace is the associated data.
    let client = store.db().client().await.unwrap();
    client
        .execute(
            "UPDATE integrations SET auth_header_enc =
               (SELECT auth_header_enc FROM integrations WHERE workspace_id = 'T-a')
             WHERE workspace_id = 'T-b'",
            &[],
        )
        .await
        .unwrap();
    let err = store.get("T-b").await.unwrap_err();
    assert!(matches!(err, StoreError::Cipher { .. }), "{err:?}");
    scope.cleanup().await;
}

#[tokio::test]
async fn every_change_is_announced_and_written_to_the_history_without_the_secret() {
    let scope = Scope::new();
    let store = scope.store(common::cipher()).await;
    let shutdown = CancellationToken::new();
    let mut notices = notify::listen(store.db(), store.changes_channel(), shutdown.clone());
    assert_eq!(notices.recv().await, Some(Notice::Resync));

    save(&store, &integration("T-v")).await;
    let toggles = Toggles {
        update_requests: Some(false),
        ..Toggles::default()
    };
    let (_, changes) = provision::set_toggles(&store, "T-v", toggles, "alice")
        .await
        .unwrap();
    assert_eq!(
        changes,
        json!({"update_requests": {"from": true, "to": false}})
    );
    let (_, unchanged) = provision::set_toggles(&store, "T-v", toggles, "alice")
        .await
        .unwrap();
    assert_eq!(unchanged, json!({}), "the same value again is no change");
    assert!(
        store
            .set_health("T-v", None, Health::AuthRejected, Some("401"), "consumer")
            .await
            .unwrap()
    );
    assert!(
        !store
            .set_health("T-v", Some(1), Health::Healthy, None, "probe")
            .await
            .unwrap(),
        "an old revision changes nothing"
    );
    assert!(
        store
            .set_health("T-v", None, Health::Healthy, None, "probe")
            .await
            .unwrap()
    );
    assert!(store.disconnect("T-v", "bob").await.unwrap());
    assert!(!store.disconnect("T-v", "bob").await.unwrap());

    let mut announced = Vec::new();
    for _ in 0..5 {
        let notice = tokio::time::timeout(Duration::from_secs(5), notices.recv())
            .await
            .expect("change announced");
        announced.push(notice);
    }
    assert!(
        announced
            .iter()
            .all(|n| *n == Some(Notice::Changed("T-v".into()))),
        "{announced:?}"
    );

    let history = store.history("T-v", 100).await.unwrap();
    let actions: Vec<(&str, &str)> = history
        .iter()
        .map(|h| (h.action.as_str(), h.actor.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            ("connected", "test"),
            ("settings_changed", "alice"),
            ("paused", "consumer"),
            ("resumed", "probe"),
            ("disconnected", "bob")
        ]
    );
    assert_eq!(history[2].changes["health"], "paused: auth_rejected");
    let rows = all_rows(&store).await;
    assert!(!rows.contains(TOKEN), "{rows}");

    // Soft delete: gone for consumers, but `established_at` outlives it.
    assert!(store.get("T-v").await.unwrap().is_none());
    let previous = store
        .previous_connection("T-v")
        .await
        .unwrap()
        .expect("kept");
    assert!(previous.disconnected);
    assert_eq!(previous.established_at, integration("T-v").established_at);
    shutdown.cancel();
    scope.cleanup().await;
}

#[tokio::test]
async fn list_returns_every_connected_record_in_workspace_order() {
    let scope = Scope::new();
    let store = scope.store(common::cipher()).await;
    assert!(store.list().await.unwrap().is_empty());
    for ws in ["T-2", "T-1", "T-3"] {
        save(&store, &integration(ws)).await;
    }
    store.disconnect("T-3", "test").await.unwrap();
    let listed: Vec<String> = store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.workspace_id)
        .collect();
    assert_eq!(listed, ["T-1", "T-2"]);
    let shown = serde_json::to_string(&store.views().await.unwrap()).unwrap();
    assert!(!shown.contains(TOKEN), "{shown}");
    assert!(shown.contains("\"health\":\"healthy\""), "{shown}");
    scope.cleanup().await;
}

#[tokio::test]
async fn the_cache_drops_a_changed_record_at_once_on_its_notification() {
    let scope = Scope::new();
    let store = scope.store(common::cipher()).await;
    save(&store, &integration("T-cache")).await;
    // A TTL far beyond the test: only the notification can refresh the entry.
    let cache = IntegrationCache::new(store.clone(), Duration::from_secs(3600));
    let shutdown = CancellationToken::new();
    cache.follow_changes(shutdown.clone());

    let first = cache.get("T-cache").await.unwrap().expect("cached");
    assert!(first.push_requests);
    let toggles = Toggles {
        push_requests: Some(false),
        ..Toggles::default()
    };
    // The listener may still be connecting; each change is announced on commit.
    let seen = eventually(Duration::from_secs(10), || async {
        provision::set_toggles(
            &store,
            "T-cache",
            Toggles {
                push_requests: Some(true),
                ..toggles
            },
            "test",
        )
        .await
        .unwrap();
        provision::set_toggles(&store, "T-cache", toggles, "test")
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        loop {
            let now = cache.get("T-cache").await.unwrap().unwrap();
            if !now.push_requests {
                return Some(started.elapsed());
            }
            if started.elapsed() > Duration::from_millis(500) {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("toggle change seen without waiting for the TTL");
    println!("cache saw the change {seen:?} after the commit");
    shutdown.cancel();
    scope.cleanup().await;
}

#[tokio::test]
async fn the_cache_remembers_absence_until_the_ttl_or_an_invalidation() {
    let scope = Scope::new();
    let store = scope.store(common::cipher()).await;
    let cache = IntegrationCache::new(store.clone(), Duration::from_secs(60));

    assert!(cache.get("T-neg").await.unwrap().is_none());
    save(&store, &integration("T-neg")).await;
    assert!(
        cache.get("T-neg").await.unwrap().is_none(),
        "negative result cached"
    );
    cache.invalidate("T-neg");
    assert!(cache.get("T-neg").await.unwrap().is_some());

    store.disconnect("T-neg", "test").await.unwrap();
    assert!(cache.get("T-neg").await.unwrap().is_some(), "still cached");
    cache.invalidate_all();
    assert!(cache.get("T-neg").await.unwrap().is_none());
    scope.cleanup().await;
}

#[tokio::test]
async fn reencrypt_moves_every_record_to_the_newest_key_of_the_ring() {
    use vitally_client::crypto::KeyRing;
    let scope = Scope::new();
    let old_key = common::random_key();
    let old = scope.store(KeyRing::single(&old_key).unwrap()).await;
    save(&old, &integration("T-k1")).await;
    let before = old.get("T-k1").await.unwrap().unwrap().fingerprint;

    let ring = SecretString::from(format!(
        "k2:{},k1:{}",
        common::random_key().expose_secret(),
        old_key.expose_secret()
    ));
    let rotated = scope.store(KeyRing::parse(&ring).unwrap()).await;
    // Both keys open it during the rotation; the newest seals new records.
    assert!(rotated.get("T-k1").await.unwrap().is_some());
    assert_eq!(rotated.reencrypt("test").await.unwrap(), 1);
    assert_eq!(
        rotated.reencrypt("test").await.unwrap(),
        0,
        "nothing left under k1"
    );
    let after = rotated.get("T-k1").await.unwrap().unwrap();
    assert!(after.fingerprint.starts_with("k2:") && after.fingerprint != before);
    assert!(
        old.get("T-k1").await.unwrap_err().is_undecryptable(),
        "the old key alone no longer opens it"
    );
    let history = rotated.history("T-k1", 10).await.unwrap();
    assert_eq!(history.last().unwrap().action, "reencrypted");
    assert_eq!(
        history.last().unwrap().changes["key_id"],
        json!({"from": "k1", "to": "k2"})
    );
    scope.cleanup().await;
}
