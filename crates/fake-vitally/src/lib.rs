//! An in-memory fake of the Vitally REST API (as described in
//! `design/vitally-api.md`), served over real HTTP.
//!
//! Use it in-process from tests ([`FakeVitally::spawn`]) or as a standalone server
//! ([`run`]). Besides the `/resources` API it serves unauthenticated admin endpoints
//! under `/_fake/` to seed data, read the state and call counts, change the rate
//! limit and accepted keys, and inject faults; [`FakeVitally`] offers the same
//! operations directly.
//!
//! The fake is deliberately strict where Vitally's docs say a client must be
//! careful (trait keys must be field paths, values must fit the field type,
//! references must be Vitally ids), so client bugs fail loudly in tests.
//!
//! Every authenticated `/resources` call passes, in order: the rate limit (a 429
//! does not consume budget), then injected faults, then the handler. Calls that fail
//! authentication get a 401 without rate-limit headers.
//!
//! # Admin endpoints (no auth, not counted, never faulted)
//!
//! | call | body | answer |
//! |---|---|---|
//! | `POST /_fake/seed` | [`Fixture`] | 200 [`StateDump`], or 400 `{"error"}` and nothing added |
//! | `GET /_fake/state` | | 200 [`StateDump`] |
//! | `GET /_fake/calls` | | 200 [`CallCounts`] |
//! | `DELETE /_fake/calls` | | 204 |
//! | `POST /_fake/faults` | [`Fault`] | 204, or 400 (status outside 400..=599) |
//! | `DELETE /_fake/faults` | | 204 |
//! | `PUT /_fake/rate-limit` | `{"limit": 5, "window_ms": 1000}` | 204 |
//! | `POST /_fake/auth-headers` | `{"header": "Basic ..."}` | 204 (also accept it) |
//! | `DELETE /_fake/custom-objects/{id}` | — | 204, or 404 (the object was deleted in Vitally's UI) |
//! | `PUT /_fake/auth-headers` | `{"header": "Basic ..."}` | 204 (a key rotation: accept only it) |
//! | `GET /_fake/healthz` | | 200 `{"status": "ok"}` |

mod admin;
mod calls;
mod error;
mod faults;
mod http;
mod limits;
mod model;
mod query;
mod store;

use std::{
    fmt,
    future::Future,
    io,
    net::{Ipv4Addr, SocketAddr},
    ops::Deref,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use anyhow::Context as _;
use base64::{Engine as _, engine::general_purpose::STANDARD};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle, time::Instant};

pub use crate::{
    calls::CallCounts,
    faults::{Fault, FaultKind},
    model::{
        Account, AccountSeed, CustomField, CustomObject, CustomObjectSeed, FieldSeed, FieldType,
        Fixture, Instance, InstanceSeed, Organization, OrganizationSeed, Page, StateDump, Traits,
        User, UserSeed,
    },
};
use crate::{faults::Faults, limits::RateLimiter, store::Store};

/// The secret key the fake accepts by default.
pub const DEFAULT_SECRET_KEY: &str = "fake-secret-key";

/// `Basic base64("fake-secret-key:")`, the `Authorization` value accepted by default.
pub fn default_auth_header() -> String {
    format!(
        "Basic {}",
        STANDARD.encode(format!("{DEFAULT_SECRET_KEY}:"))
    )
}

#[derive(Clone)]
pub struct FakeConfig {
    /// Exact `Authorization` values accepted; each is its own rate-limit key.
    pub auth_headers: Vec<String>,
    /// Requests per `window` per key.
    pub rate_limit: u32,
    pub window: Duration,
}

impl Default for FakeConfig {
    /// Vitally's documented limit: 1000 requests per minute.
    fn default() -> Self {
        Self {
            auth_headers: vec![default_auth_header()],
            rate_limit: 1000,
            window: Duration::from_secs(60),
        }
    }
}

/// Auth headers are secrets: show how many there are, never their values.
impl fmt::Debug for FakeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeConfig")
            .field(
                "auth_headers",
                &format_args!("<{} redacted>", self.auth_headers.len()),
            )
            .field("rate_limit", &self.rate_limit)
            .field("window", &self.window)
            .finish()
    }
}

/// The fake's state, shared by every clone and by the HTTP API.
#[derive(Clone)]
pub struct FakeVitally {
    shared: Arc<Shared>,
}

struct Shared {
    store: Mutex<Store>,
    auth_headers: Mutex<Vec<String>>,
    limiter: Mutex<RateLimiter>,
    faults: Mutex<Faults>,
    calls: Mutex<CallCounts>,
}

/// A panicking test must not wedge every later call, so poisoning is ignored: each
/// critical section leaves its data consistent before anything can panic.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FakeVitally {
    pub fn new(config: FakeConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                store: Mutex::new(Store::default()),
                auth_headers: Mutex::new(config.auth_headers),
                limiter: Mutex::new(RateLimiter::new(config.rate_limit, config.window)),
                faults: Mutex::new(Faults::default()),
                calls: Mutex::new(CallCounts::default()),
            }),
        }
    }

    /// The whole API, `/resources` and `/_fake`.
    pub fn router(&self) -> axum::Router {
        http::router(self.clone())
    }

    /// Serves on `listener` until `shutdown` resolves, then finishes in-flight calls.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }

    /// Serves a new fake on `127.0.0.1` at a free port, in a background task that
    /// stops when the returned handle is shut down or dropped.
    pub async fn spawn(config: FakeConfig) -> anyhow::Result<RunningFake> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("binding the fake Vitally listener")?;
        let addr = listener.local_addr()?;
        let fake = Self::new(config);
        let (stop, stopped) = oneshot::channel::<()>();
        // A dropped sender also resolves the receiver, so dropping the handle stops
        // the server.
        let task = tokio::spawn(fake.clone().serve(listener, async {
            let _ = stopped.await;
        }));
        Ok(RunningFake {
            addr,
            fake,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Adds `fixture` atomically: on error (naming the bad entry) nothing is added.
    pub fn seed(&self, fixture: Fixture) -> Result<(), String> {
        let mut store = self.store();
        let mut seeded = store.clone();
        seeded.apply_fixture(fixture)?;
        *store = seeded;
        Ok(())
    }

    pub fn dump(&self) -> StateDump {
        self.store().dump()
    }

    pub fn calls(&self) -> CallCounts {
        lock(&self.shared.calls).clone()
    }

    pub fn reset_calls(&self) {
        *lock(&self.shared.calls) = CallCounts::default();
    }

    pub fn inject(&self, fault: Fault) {
        lock(&self.shared.faults).inject(fault, Instant::now());
    }

    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
    }

    /// Applies to every key from the next call on; calls already in the window
    /// still count.
    pub fn set_rate_limit(&self, limit: u32, window: Duration) {
        lock(&self.shared.limiter).reconfigure(limit, window);
    }

    pub fn add_auth_header(&self, header: String) {
        let mut headers = lock(&self.shared.auth_headers);
        if !headers.contains(&header) {
            headers.push(header);
        }
    }

    /// A key rotation in Vitally: `header` is accepted from now on, every other one is
    /// rejected with 401.
    pub fn rotate_auth_header(&self, header: String) {
        *lock(&self.shared.auth_headers) = vec![header];
    }

    /// The fault "the object was deleted in Vitally": the object and its instances go.
    pub fn delete_custom_object(&self, id: &str) -> bool {
        self.store().delete_custom_object(id)
    }

    /// All custom object instances, in creation order.
    pub fn instances(&self) -> Vec<Instance> {
        self.store().instances()
    }

    fn auth_header(&self) -> Option<String> {
        lock(&self.shared.auth_headers).first().cloned()
    }

    pub(crate) fn accepts(&self, header: &str) -> bool {
        lock(&self.shared.auth_headers).iter().any(|h| h == header)
    }

    pub(crate) fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.shared.store)
    }

    pub(crate) fn limiter(&self) -> MutexGuard<'_, RateLimiter> {
        lock(&self.shared.limiter)
    }

    pub(crate) fn faults(&self) -> MutexGuard<'_, Faults> {
        lock(&self.shared.faults)
    }

    pub(crate) fn calls_mut(&self) -> MutexGuard<'_, CallCounts> {
        lock(&self.shared.calls)
    }
}

/// A fake serving in a background task. Derefs to its [`FakeVitally`].
pub struct RunningFake {
    pub addr: SocketAddr,
    pub fake: FakeVitally,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl RunningFake {
    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The first accepted `Authorization` value (empty if none is configured).
    pub fn auth_header(&self) -> String {
        self.fake.auth_header().unwrap_or_default()
    }

    /// Stops accepting connections and waits for in-flight calls to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!(%error, "fake Vitally server failed"),
                Err(error) => tracing::warn!(%error, "fake Vitally server task failed"),
            }
        }
    }
}

impl Deref for RunningFake {
    type Target = FakeVitally;

    fn deref(&self) -> &FakeVitally {
        &self.fake
    }
}

/// The standalone server: binds `addr`, applies `seed`, serves until `shutdown`.
pub async fn run(
    addr: SocketAddr,
    config: FakeConfig,
    seed: Option<Fixture>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let fake = FakeVitally::new(config);
    if let Some(fixture) = seed {
        fake.seed(fixture)
            .map_err(|e| anyhow::anyhow!("invalid seed fixture: {e}"))?;
    }
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the fake Vitally listener on {addr}"))?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "fake Vitally listening");
    fake.serve(listener, shutdown)
        .await
        .context("serving fake Vitally")
}
