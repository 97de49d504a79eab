//! Shared set-up for the integration tests: a real Redis under a unique key prefix
//! (removed again on drop, even when a test panics), a fresh cipher, the HTTP client.

#![allow(dead_code)] // each test file uses a different part of this module

use std::time::Duration;

use base64::{Engine as _, engine::general_purpose::STANDARD};
use redis::aio::ConnectionManager;
use secrecy::SecretString;
use vitally_client::{
    client::VitallyHttp, crypto::SecretCipher, integrations::IntegrationStore,
    metrics::VitallyMetrics, provision::ConnectRequest,
};

pub const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// Redis keys of one test: everything under `prefix`, deleted when this is dropped.
pub struct RedisScope {
    pub prefix: String,
    pub client: redis::Client,
    pub conn: ConnectionManager,
}

impl RedisScope {
    pub async fn new() -> Self {
        let prefix = format!("t-{}", uuid::Uuid::new_v4().simple());
        let client = redis::Client::open(REDIS_URL).expect("redis url");
        let conn = ConnectionManager::new(client.clone())
            .await
            .expect("redis at 127.0.0.1:6379");
        Self {
            prefix,
            client,
            conn,
        }
    }

    pub fn store(&self, cipher: SecretCipher) -> IntegrationStore {
        IntegrationStore::new(self.conn.clone(), &self.prefix, cipher)
    }
}

impl Drop for RedisScope {
    fn drop(&mut self) {
        // Synchronous on purpose: Drop cannot await, and it must also run on panic.
        let Ok(mut conn) = self.client.get_connection() else {
            return;
        };
        let pattern = format!("{}:*", self.prefix);
        let mut cursor = 0u64;
        loop {
            let Ok((next, keys)): redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500)
                .query(&mut conn)
            else {
                return;
            };
            if !keys.is_empty() {
                let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&keys).query(&mut conn);
            }
            if next == 0 {
                return;
            }
            cursor = next;
        }
    }
}

/// A random 32-byte key in the base64 form operators are told to generate.
pub fn random_key() -> SecretString {
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    key[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    SecretString::from(STANDARD.encode(key))
}

pub fn cipher() -> SecretCipher {
    SecretCipher::from_key(&random_key()).expect("valid key")
}

pub fn http(timeout: Duration) -> VitallyHttp {
    VitallyHttp::new(timeout, VitallyMetrics::unregistered()).expect("http client")
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
