//! Integration records in a real Redis: encrypted at rest, bound to their workspace,
//! announced on change, and seen by consumers' caches within the TTL.

mod common;

use std::{collections::BTreeMap, time::Duration};

use chrono::Utc;
use common::{RedisScope, eventually};
use futures_util::StreamExt;
use redis::AsyncCommands;
use secrecy::{ExposeSecret, SecretString};
use vitally_client::{
    integrations::{FieldRef, Integration, IntegrationCache, StoreError},
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
    Integration {
        workspace_id: ws.to_owned(),
        api_url: "https://acme.rest.vitally.io".into(),
        auth_header: SecretString::from(HEADER),
        push_requests: true,
        update_requests: true,
        sync_threads: false,
        auto_create_fields: false,
        rate_budget_per_min: 600,
        established_at: Utc::now(),
        custom_object_id: "co-1".into(),
        fields,
    }
}

fn assert_same(a: &Integration, b: &Integration) {
    assert_eq!(a.workspace_id, b.workspace_id);
    assert_eq!(a.api_url, b.api_url);
    assert_eq!(a.auth_header.expose_secret(), b.auth_header.expose_secret());
    assert_eq!(
        (
            a.push_requests,
            a.update_requests,
            a.sync_threads,
            a.auto_create_fields
        ),
        (
            b.push_requests,
            b.update_requests,
            b.sync_threads,
            b.auto_create_fields
        )
    );
    assert_eq!(a.rate_budget_per_min, b.rate_budget_per_min);
    assert_eq!(a.established_at, b.established_at);
    assert_eq!(a.custom_object_id, b.custom_object_id);
    assert_eq!(a.fields, b.fields);
}

#[tokio::test]
async fn a_record_round_trips_with_the_auth_header_encrypted_at_rest() {
    let redis = RedisScope::new().await;
    let store = redis.store(common::cipher());
    let record = integration("T-rt");
    store.put(&record).await.unwrap();

    let mut conn = redis.conn.clone();
    let raw: String = conn.hget(store.records_key(), "T-rt").await.unwrap();
    assert!(raw.contains("\"auth_header_enc\":\"v1:"), "{raw}");
    assert!(!raw.contains(HEADER) && !raw.contains(TOKEN), "{raw}");
    assert!(!raw.contains("super-secret"));

    let loaded = store.get("T-rt").await.unwrap().expect("stored");
    assert_same(&loaded, &record);
    assert!(store.get("T-none").await.unwrap().is_none());
}

#[tokio::test]
async fn another_key_or_another_workspace_cannot_decrypt_a_record() {
    let redis = RedisScope::new().await;
    let store = redis.store(common::cipher());
    store.put(&integration("T-a")).await.unwrap();

    let other_key = redis.store(common::cipher());
    let err = other_key.get("T-a").await.unwrap_err();
    assert!(matches!(err, StoreError::Cipher { .. }), "{err:?}");
    assert!(err.to_string().contains("could not be decrypted"));

    // Copy T-a's ciphertext onto a record for T-b: the workspace is the AAD.
    let mut conn = redis.conn.clone();
    let raw: String = conn.hget(store.records_key(), "T-a").await.unwrap();
    let forged = raw.replace("\"workspace_id\":\"T-a\"", "\"workspace_id\":\"T-b\"");
    let _: () = conn.hset(store.records_key(), "T-b", forged).await.unwrap();
    let err = store.get("T-b").await.unwrap_err();
    assert!(matches!(err, StoreError::Cipher { .. }), "{err:?}");

    let _: () = conn
        .hset(store.records_key(), "T-c", "{not json")
        .await
        .unwrap();
    let err = store.get("T-c").await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
}

#[tokio::test]
async fn puts_and_deletes_bump_the_version_and_announce_the_workspace() {
    let redis = RedisScope::new().await;
    let store = redis.store(common::cipher());
    let mut pubsub = redis.client.get_async_pubsub().await.unwrap();
    pubsub.subscribe(store.changes_channel()).await.unwrap();
    let mut messages = pubsub.into_on_message();

    assert_eq!(store.version().await.unwrap(), 0);
    store.put(&integration("T-v")).await.unwrap();
    assert_eq!(store.version().await.unwrap(), 1);
    assert!(store.delete("T-v").await.unwrap());
    assert_eq!(store.version().await.unwrap(), 2);
    assert!(!store.delete("T-v").await.unwrap());

    let mut announced = Vec::new();
    for _ in 0..2 {
        let msg = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .expect("change announced")
            .expect("subscription open");
        announced.push(msg.get_payload::<String>().unwrap());
    }
    assert_eq!(announced, ["T-v", "T-v"]);
}

#[tokio::test]
async fn list_returns_every_record_in_workspace_order() {
    let redis = RedisScope::new().await;
    let store = redis.store(common::cipher());
    assert!(store.list().await.unwrap().is_empty());
    for ws in ["T-2", "T-1", "T-3"] {
        store.put(&integration(ws)).await.unwrap();
    }
    let listed: Vec<String> = store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.workspace_id)
        .collect();
    assert_eq!(listed, ["T-1", "T-2", "T-3"]);
    let shown = store.list().await.unwrap()[0].redacted().to_string();
    assert!(!shown.contains(TOKEN), "{shown}");
}

#[tokio::test]
async fn the_cache_sees_a_toggle_change_once_its_ttl_has_passed() {
    let redis = RedisScope::new().await;
    let store = redis.store(common::cipher());
    store.put(&integration("T-cache")).await.unwrap();
    let ttl = Duration::from_secs(1);
    let cache = IntegrationCache::new(store.clone(), ttl);

    let first = cache.get("T-cache").await.unwrap().expect("cached");
    assert!(first.push_requests);
    provision::set_toggles(
        &store,
        "T-cache",
        Toggles {
            push_requests: Some(false),
            ..Toggles::default()
        },
    )
    .await
    .unwrap();
    // Within the TTL the cached record is served without a Redis read.
    let cached = cache.get("T-cache").await.unwrap().unwrap();
    let started = tokio::time::Instant::now();
    assert!(cached.push_requests, "served from cache");

    let seen = eventually(Duration::from_secs(5), || async {
        let now = cache.get("T-cache").await.unwrap().unwrap();
        (!now.push_requests).then_some(())
    })
    .await;
    assert!(seen.is_some(), "toggle change seen");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn the_cache_remembers_absence_until_the_ttl_or_an_invalidation() {
    let redis = RedisScope::new().await;
    let store = redis.store(common::cipher());
    let cache = IntegrationCache::new(store.clone(), Duration::from_secs(60));

    assert!(cache.get("T-neg").await.unwrap().is_none());
    store.put(&integration("T-neg")).await.unwrap();
    assert!(
        cache.get("T-neg").await.unwrap().is_none(),
        "negative result cached"
    );
    cache.invalidate("T-neg");
    assert!(cache.get("T-neg").await.unwrap().is_some());

    store.delete("T-neg").await.unwrap();
    assert!(cache.get("T-neg").await.unwrap().is_some(), "still cached");
    cache.invalidate_all();
    assert!(cache.get("T-neg").await.unwrap().is_none());
}
