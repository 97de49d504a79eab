//! Shared set-up for the integration tests: a real PostgreSQL schema of its own (removed
//! again at cleanup or on drop, even when a test panics), a fresh key, the HTTP client.

#![allow(dead_code)] // each test file uses a different part of this module

use std::time::Duration;

use base64::{Engine as _, engine::general_purpose::STANDARD};
use fake_vitally::RunningFake;
use secrecy::SecretString;
use thena_runtime::egress::AllowList;
use vitally_client::{
    client::VitallyHttp,
    crypto::KeyRing,
    integrations::{Integration, IntegrationStore},
    metrics::VitallyMetrics,
    provision::{self, ConnectError, ConnectRequest},
};

pub const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// One test's PostgreSQL schema (and Redis prefix), removed at cleanup or on drop.
pub struct Scope {
    pub env: thena_testkit::TestEnv,
}

impl Scope {
    pub fn new() -> Self {
        Self {
            env: thena_testkit::TestEnv::new(),
        }
    }

    /// A store in this scope's schema, sealing with `keys`.
    pub async fn store(&self, keys: KeyRing) -> IntegrationStore {
        IntegrationStore::new(self.env.db().await, keys)
    }

    pub async fn cleanup(self) {
        self.env.cleanup().await;
    }
}

/// A random 32-byte key in the base64 form operators are told to generate.
pub fn random_key() -> SecretString {
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    key[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    SecretString::from(STANDARD.encode(key))
}

/// A fresh one-key ring.
pub fn cipher() -> KeyRing {
    KeyRing::single(&random_key()).expect("valid key")
}

pub const ACTOR: &str = "test";

/// `provision::connect` by the test actor, returning the stored record.
pub async fn connect(
    http: &VitallyHttp,
    store: &IntegrationStore,
    req: ConnectRequest,
) -> Result<Integration, ConnectError> {
    provision::connect(http, store, req, ACTOR)
        .await
        .map(|connected| connected.integration)
}

/// A client that may reach `fake` (plain http on loopback, allowed by its exact
/// origin, as `VITALLY_ALLOWED_HOSTS` would) besides Vitally's own hosts.
pub fn http(fake: &RunningFake, timeout: Duration) -> VitallyHttp {
    http_allowing(&[&fake.base_url()], timeout)
}

/// Vitally's hosts and the fake's origin.
pub fn allowing(fake: &RunningFake) -> AllowList {
    AllowList::vitally()
        .with(&fake.base_url())
        .expect("the fake's origin")
}

pub fn http_allowing(origins: &[&str], timeout: Duration) -> VitallyHttp {
    let allowed = origins
        .iter()
        .try_fold(AllowList::vitally(), |list, origin| list.with(origin))
        .expect("allow-list entries");
    VitallyHttp::new(timeout, allowed, VitallyMetrics::unregistered()).expect("http client")
}

pub fn connect_request(
    api_url: &str,
    auth_header: &str,
    workspace_id: &str,
    categories: &[&str],
) -> ConnectRequest {
    ConnectRequest {
        workspace_id: workspace_id.to_owned(),
        api_url: api_url.to_owned(),
        auth_header: SecretString::from(auth_header),
        categories: categories.iter().map(|c| (*c).to_owned()).collect(),
        push_requests: true,
        update_requests: true,
        sync_threads: false,
        auto_create_fields: false,
        rate_budget_per_min: 600,
        established_at: None,
    }
}

/// Polls `check` until it yields a value or `deadline` passes.
pub async fn eventually<T, F, Fut>(deadline: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= until {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
