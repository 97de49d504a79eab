//! One event in, one [`Outcome`] out: policy, linking (with the Redis cache), mapping and
//! the guarded upsert. No AMQP here — the worker turns outcomes into acks and republishes.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use thena_broker::Wake;
use thena_events::{RequestChanged, decode_event};
use thena_runtime::ops::Readiness;
use thena_store::ledger::Ledger;
use vitally_client::{
    client::{Instance, InstanceBody, Link, NewUser, User, VitallyClient, VitallyHttp},
    error::{ErrorClass, ErrorKind, VitallyError},
    integrations::{Connection, Health, Integration, IntegrationCache, StoreError},
    limiter::{Admission, RateLimiter, Turn, TurnFor},
    mapping::{FieldMap, FieldRef, MappingOptions, map_instance},
    provision::{self, ConnectError},
};

use crate::{
    cache::{Cache, Ttl},
    fault::{self, FaultHook, FaultPoint},
    guard::{LockError, RequestGuards, VersionError},
    instances::{AfterLostCreate, after_lost_create, choose, create_answer_lost},
    linking::{
        DomainChoice, Memberships, NoLink, Relink, Target, UserLink, choose_by_domain,
        is_free_mail, link_user, relink, table_row, user_external_id,
    },
    metrics::SyncMetrics,
    outcome::{Outcome, Skip, Write},
    policy::{self, Lane, PolicyDecision, Toggles},
};

/// How long a call may wait for budget once its event already made a call.
const IN_EVENT_WAIT: Duration = Duration::from_secs(5);

/// Redis mark (cache kind) of a request whose last create's answer was lost.
const UNCONFIRMED: &str = "instance_unconfirmed";

/// A lost create is given this many client timeouts to become searchable.
const CREATE_SETTLE_TIMEOUTS: u32 = 3;

/// How far ahead a request may take its place in the queue for budget: beyond it, an
/// event is deferred without one and asks again (a flood does not book hours ahead).
const QUEUE_HORIZON: Duration = Duration::from_secs(240);

/// How long after its request's place another event of that request comes back: past the
/// holder's write, so it finds its version applied.
const FOLLOWER_MARGIN: Duration = Duration::from_secs(1);

/// Knobs of the pipeline (from the shared configuration).
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    pub user_ttl: Duration,
    pub negative_ttl: Duration,
    pub account_org_ttl: Duration,
    pub domain_ttl: Duration,
    pub instance_ttl: Duration,
    pub free_mail_domains: Vec<String>,
    pub textarea_limit: usize,
    /// Longest wait for an integration's budget before the event is deferred instead.
    pub max_rate_wait: Duration,
    /// Longest wait for another consumer to finish with the same request.
    pub lock_wait: Duration,
    /// Lifetime of a request lock; one event's work is cut off at 3/4 of it.
    pub lock_ttl: Duration,
    /// How old the stored field map may get before it is re-read from Vitally.
    pub fields_ttl: Duration,
    /// Who this replica is in an integration's history (`consumer@host`).
    pub actor: String,
    /// Most of an integration's budget the backfill lane may use.
    pub backfill_budget_share: f64,
}

/// What the pipeline learnt about one event beyond its outcome, for the ledger.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trace {
    /// The version actually processed (newer than the message's when coalesced).
    pub version: Option<u64>,
    /// How the request was linked: the rule, the target, whether a user was created.
    pub link: Option<Value>,
    pub instance_id: Option<String>,
}

/// Collects a [`Trace`] while an event's steps run.
#[derive(Default)]
struct Tracer(std::sync::Mutex<Trace>);

impl Tracer {
    fn update(&self, change: impl FnOnce(&mut Trace)) {
        change(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn take(self) -> Trace {
        self.0.into_inner().unwrap_or_else(|p| p.into_inner())
    }
}

/// Everything the pipeline talks to, shared by all in-flight events.
pub struct Pipeline {
    pub integrations: IntegrationCache,
    pub http: VitallyHttp,
    pub limiter: RateLimiter,
    pub cache: Cache,
    pub guards: RequestGuards,
    pub settings: PipelineSettings,
    pub metrics: SyncMetrics,
    /// Workspaces whose header this replica cannot decrypt; `/readyz` fails while any.
    pub keys: KeyHealth,
    /// Where each request went; also the latest snapshot of each, for coalescing.
    pub ledger: Option<Ledger>,
    /// Tests only ([`crate::worker::Worker::with_fault_hook`]); `None` in production.
    pub(crate) fault: Option<FaultHook>,
}

/// Tracks integrations this replica cannot decrypt (a missing or wrong
/// `INTEGRATIONS_KEYS`): such a replica is not ready, and says which.
#[derive(Clone)]
pub struct KeyHealth {
    readiness: Readiness,
    gauge: prometheus::IntGauge,
    undecryptable: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
}

impl KeyHealth {
    pub const CHECK: &'static str = "integrations_key";

    pub fn new(readiness: Readiness, gauge: prometheus::IntGauge) -> Self {
        readiness.set(Self::CHECK, true);
        Self {
            readiness,
            gauge,
            undecryptable: Arc::default(),
        }
    }

    pub fn set(&self, workspace: &str, decryptable: bool) {
        let mut set = self
            .undecryptable
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let changed = if decryptable {
            set.remove(workspace)
        } else {
            set.insert(workspace.to_owned())
        };
        if changed && !decryptable {
            tracing::error!(
                workspace,
                "cannot decrypt this integration's Vitally header: is INTEGRATIONS_KEYS the \
                 fleet's? Its events are held until it is"
            );
        }
        self.readiness.set(Self::CHECK, set.is_empty());
        self.gauge.set(set.len() as i64);
    }
}

/// Why a step stopped short of a result.
#[derive(Debug)]
enum StepError {
    Vitally(VitallyError),
    /// The integration's budget is spent (or paused after a 429) for longer than we wait.
    OutOfBudget(Duration),
    /// The request has its place in the integration's queue for budget, due after `wait`;
    /// `holder`: this event took it.
    Queued {
        wait: Duration,
        holder: bool,
    },
    /// Another consumer holds this request for longer than we wait.
    Busy,
    /// Redis is needed for the lock or the version guard and is unreachable.
    Redis(String),
    /// The integration record could not be read.
    Store(StoreError),
    /// Retrying cannot help until someone fixes the cause.
    Permanent {
        reason: &'static str,
        error: String,
    },
    /// The event's work outlasted its share of the request lock.
    LeaseExpired(Duration),
    /// Vitally refuses this integration until someone (or the probe) heals it.
    Paused(Health, String),
    /// This replica cannot decrypt the integration's header.
    Undecryptable,
    /// This replica's `VITALLY_ALLOWED_HOSTS` refuses the integration's API URL, or an
    /// address its host resolved to.
    Refused(String),
    /// Redis lost its data; locks resume after this wait.
    Quarantine(Duration),
    /// PostgreSQL (the durable version record) is unreachable.
    Db(String),
    /// Vitally rejected a trait path and the re-read field map differs: try again.
    FieldsChanged(String),
    /// The work panicked (a bug): caught, so the delivery is settled and the lock freed.
    Panicked(String),
}

impl StepError {
    /// The single place a failure becomes an outcome: every class of every error.
    fn into_outcome(self) -> Outcome {
        match self {
            StepError::Vitally(error) => {
                let reason = vitally_reason(&error);
                match error.class() {
                    ErrorClass::Transient => Outcome::Retry {
                        reason,
                        error: error.to_string(),
                    },
                    ErrorClass::RateLimited { reset } => Outcome::Deferred {
                        wake: Wake::NotBefore(reset),
                        reason: "vitally_429",
                    },
                    ErrorClass::Permanent => Outcome::Park {
                        reason,
                        error: error.to_string(),
                    },
                }
            }
            StepError::OutOfBudget(wait) => Outcome::Deferred {
                wake: Wake::NotBefore(wait),
                reason: "rate_budget",
            },
            // The holder comes back when its place is due; the request's other events
            // after its write, when they find their version applied and cost nothing.
            StepError::Queued { wait, holder } => Outcome::Deferred {
                wake: if holder {
                    Wake::OnTime(wait)
                } else {
                    Wake::NotBefore(wait + FOLLOWER_MARGIN)
                },
                reason: "rate_budget",
            },
            StepError::Busy => Outcome::Deferred {
                wake: Wake::NotBefore(Duration::from_secs(1)),
                reason: "request_busy",
            },
            StepError::Redis(error) => Outcome::Retry {
                reason: "redis_unavailable".into(),
                error,
            },
            StepError::Store(error) => Outcome::Retry {
                reason: "integration_store".into(),
                error: error.to_string(),
            },
            StepError::Permanent { reason, error } => Outcome::Park {
                reason: reason.into(),
                error,
            },
            StepError::LeaseExpired(lease) => Outcome::Retry {
                reason: "lock_lease_expired".into(),
                error: format!("the event's work took longer than {lease:?}"),
            },
            StepError::Paused(health, _) => Outcome::Held {
                reason: health.as_str(),
            },
            StepError::Undecryptable => Outcome::Held {
                reason: "key_undecryptable",
            },
            // Like a key this replica lacks: an operator's fix, after which the held
            // events flow again; parking them would need a replay.
            StepError::Refused(refusal) => {
                tracing::warn!(%refusal, "held: the integration's API URL is refused here");
                Outcome::Held {
                    reason: "api_url_refused",
                }
            }
            StepError::Quarantine(wait) => Outcome::Deferred {
                wake: Wake::NotBefore(wait),
                reason: "redis_data_lost",
            },
            StepError::Db(error) => Outcome::Retry {
                reason: "postgres_unavailable".into(),
                error,
            },
            StepError::FieldsChanged(error) => Outcome::Retry {
                reason: "fields_refreshed".into(),
                error,
            },
            // Perhaps a state that passes (a half-written cache entry); if not, it is
            // parked as too_old after RETRY_MAX_AGE like any failure that keeps failing.
            StepError::Panicked(message) => Outcome::Retry {
                reason: "panic".into(),
                error: format!("the event's work panicked: {message}"),
            },
        }
    }
}

impl From<VitallyError> for StepError {
    fn from(error: VitallyError) -> Self {
        match error.kind() {
            ErrorKind::Refused => StepError::Refused(error.body().to_owned()),
            ErrorKind::Status(_)
            | ErrorKind::Timeout
            | ErrorKind::Connect
            | ErrorKind::Transport
            | ErrorKind::Decode
            | ErrorKind::InvalidRequest => StepError::Vitally(error),
        }
    }
}

/// `vitally_503`, `vitally_timeout`, …: the metric and header label of a Vitally failure.
fn vitally_reason(error: &VitallyError) -> String {
    let kind = match error.kind() {
        ErrorKind::Status(status) => return format!("vitally_{status}"),
        ErrorKind::Timeout => "timeout",
        ErrorKind::Connect => "connect",
        ErrorKind::Transport => "transport",
        ErrorKind::Decode => "decode",
        ErrorKind::InvalidRequest => "invalid_request",
        ErrorKind::Refused => "refused",
    };
    format!("vitally_{kind}")
}

fn redis_err(error: redis::RedisError) -> StepError {
    StepError::Redis(error.to_string())
}

fn lock_err(error: LockError) -> StepError {
    match error {
        LockError::Redis(e) => redis_err(e),
        LockError::Quarantine(wait) => StepError::Quarantine(wait),
    }
}

fn version_err(error: VersionError) -> StepError {
    match error {
        VersionError::Redis(e) => redis_err(e),
        VersionError::Db(e) => StepError::Db(e.to_string()),
    }
}

/// Vitally's 400 naming a trait path it does not know.
fn rejects_a_trait(error: &VitallyError) -> bool {
    matches!(error.kind(), ErrorKind::Status(400)) && error.body().contains("trait")
}

/// A Vitally answer that pauses the whole integration rather than failing one event:
/// 401/403 (the key was rotated or revoked), or 404 from the object itself.
fn pausing(error: &VitallyError, object_call: bool) -> Option<Health> {
    match error.kind() {
        ErrorKind::Status(401 | 403) => Some(Health::AuthRejected),
        ErrorKind::Status(404) if object_call => Some(Health::ObjectMissing),
        ErrorKind::Status(_)
        | ErrorKind::Timeout
        | ErrorKind::Connect
        | ErrorKind::Transport
        | ErrorKind::Decode
        | ErrorKind::InvalidRequest
        | ErrorKind::Refused => None,
    }
}

/// One integration's calls, each admitted by the fleet-wide limiter first.
///
/// Only the event's first call is held to `max_wait`: once an event has spent budget,
/// deferring it mid-way would waste that budget, and under a sustained flood no event
/// would ever collect the two or three calls it needs (a livelock the noisy-neighbour
/// benchmark showed). Later calls may wait up to `in_event_wait`.
struct Session<'a> {
    client: VitallyClient,
    limiter: &'a RateLimiter,
    /// The budget's key: one per Vitally key (its fingerprint).
    budget_key: &'a str,
    workspace: &'a str,
    budget: u32,
    max_wait: Duration,
    in_event_wait: Duration,
    /// The request's place in the queue for budget, asked for by the first call.
    turn: TurnFor,
    /// Calls already paid for by the request's place in the queue.
    prepaid: AtomicU32,
    /// Calls asked for so far.
    calls: AtomicU32,
    lane: Lane,
    /// The backfill lane's own budget (a share of the integration's).
    backfill_budget: u32,
}

impl Session<'_> {
    async fn call<T>(
        &self,
        call: impl Future<Output = Result<T, VitallyError>>,
    ) -> Result<T, StepError> {
        self.call_as(false, call).await
    }

    /// A call on the custom object itself, where a 404 means the object is gone.
    async fn object_call<T>(
        &self,
        call: impl Future<Output = Result<T, VitallyError>>,
    ) -> Result<T, StepError> {
        self.call_as(true, call).await
    }

    async fn call_as<T>(
        &self,
        object_call: bool,
        call: impl Future<Output = Result<T, VitallyError>>,
    ) -> Result<T, StepError> {
        self.admit().await?;
        match call.await {
            Ok(value) => Ok(value),
            Err(error) => {
                if let ErrorClass::RateLimited { reset } = error.class() {
                    // Every replica stops calling this integration until Vitally resets.
                    self.limiter
                        .pause_as(self.budget_key, self.workspace, reset)
                        .await;
                }
                if let Some(health) = pausing(&error, object_call) {
                    return Err(StepError::Paused(health, error.to_string()));
                }
                Err(error.into())
            }
        }
    }

    /// Budget for one call, queueing for the request's place in the integration's queue
    /// when the budget is spent. The first call asks for a place paying for one call;
    /// later calls use what that place paid for, then the limiter, and if refused take
    /// a new place paying for every call the event has needed so far plus this one, so
    /// the event (whose earlier lookups are cached by then) can finish when it comes
    /// back — never deferred by the raw backlog and made to queue again from the end.
    async fn admit(&self) -> Result<(), StepError> {
        if self.lane == Lane::Backfill {
            return self.admit_backfill().await;
        }
        let calls = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        let first = calls == 1;
        if !first
            && self
                .prepaid
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
        {
            return Ok(());
        }
        let (max_wait, pay_for) = if first {
            (self.max_wait, 1)
        } else {
            (self.in_event_wait, calls)
        };
        match self
            .limiter
            .take_turn(
                self.budget_key,
                self.workspace,
                self.budget,
                max_wait,
                QUEUE_HORIZON,
                pay_for,
                &self.turn,
            )
            .await
        {
            Turn::Go { prepaid } => {
                self.prepaid.store(prepaid, Ordering::Relaxed);
                Ok(())
            }
            Turn::Queued { wait, holder } => Err(StepError::Queued { wait, holder }),
            Turn::Wait(wait) => Err(StepError::OutOfBudget(wait)),
        }
    }

    /// A backfilled snapshot's call: first a slot of the backfill's own share (waited
    /// for here: the lane has slots of its own), then a slot of the integration's budget
    /// that is free right now — live events never wait for a backfill, and never queue
    /// behind one.
    async fn admit_backfill(&self) -> Result<(), StepError> {
        let share_key = format!("{}:backfill", self.budget_key);
        match self
            .limiter
            .acquire_as(
                &share_key,
                self.workspace,
                self.backfill_budget,
                self.in_event_wait,
            )
            .await
        {
            Admission::Granted => {}
            Admission::Wait(wait) | Admission::Paused(wait) => {
                return Err(StepError::OutOfBudget(wait));
            }
        }
        match self
            .limiter
            .acquire_as(self.budget_key, self.workspace, self.budget, Duration::ZERO)
            .await
        {
            Admission::Granted => Ok(()),
            Admission::Wait(wait) | Admission::Paused(wait) => Err(StepError::OutOfBudget(wait)),
        }
    }
}

impl Pipeline {
    /// Processes one decoded event to its outcome. A `returning` message (deferred,
    /// retried, held, redelivered) is first resolved to its request's latest snapshot:
    /// older messages of a request then cost no Vitally call, and a burst of changes
    /// that waited out a budget costs one write.
    pub async fn process(
        &self,
        event: &RequestChanged,
        returning: bool,
        lane: Lane,
    ) -> (Outcome, Trace) {
        // The message's own id, kept through coalescing: it names the message's place in
        // the queue for budget when it comes back.
        let holder = event.event_id.to_string();
        let newer = if returning {
            self.coalesce(event).await
        } else {
            None
        };
        let event = newer.as_ref().unwrap_or(event);
        let tracer = Tracer::default();
        tracer.update(|t| t.version = Some(event.request.version));
        let outcome = match fault::catch(self.try_process(event, &holder, lane, &tracer)).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(error)) => error.into_outcome(),
            Err(panic) => StepError::Panicked(panic).into_outcome(),
        };
        (outcome, tracer.take())
    }

    /// The ledger's snapshot of this request, if it is newer than the message's.
    async fn coalesce(&self, event: &RequestChanged) -> Option<RequestChanged> {
        let ledger = self.ledger.as_ref()?;
        let stored = ledger
            .latest_snapshot(&event.workspace_id, event.request.id)
            .await;
        match stored {
            Ok(Some((version, snapshot))) if version > event.request.version => {
                let decoded = serde_json::to_vec(&snapshot)
                    .map_err(|e| e.to_string())
                    .and_then(|raw| decode_event(&raw).map_err(|e| e.to_string()));
                match decoded {
                    Ok(newer) => {
                        self.metrics.coalesced.inc();
                        Some(newer)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the ledger's snapshot does not decode; processing the message as sent");
                        None
                    }
                }
            }
            Ok(_) => None,
            // Processing the message as sent is correct, only costlier.
            Err(e) => {
                tracing::debug!(error = %e, "ledger unavailable for coalescing");
                None
            }
        }
    }

    /// The integration, or why its events cannot go on now. "Not connected" is never
    /// taken from a cache: a workspace connected a moment ago may be cached as absent.
    async fn integration(&self, ws: &str) -> Result<Connection, StepError> {
        let found = match self.integrations.get(ws).await {
            Ok(Some(integration)) => Ok(Connection::Connected(integration)),
            Ok(None) => self.integrations.reread(ws).await,
            Err(error) => Err(error),
        };
        match found {
            Ok(found) => {
                self.keys.set(ws, true);
                Ok(found)
            }
            Err(error) if error.is_undecryptable() => {
                self.keys.set(ws, false);
                Err(StepError::Undecryptable)
            }
            Err(error) => Err(StepError::Store(error)),
        }
    }

    /// Pauses the integration the event saw (only if nobody changed it since: a record
    /// just reconnected with a new key stays healthy).
    async fn pause(&self, integration: &Integration, health: Health, detail: &str) {
        match self
            .integrations
            .store()
            .set_health(
                &integration.workspace_id,
                Some(integration.revision),
                health,
                Some(detail),
                &self.settings.actor,
            )
            .await
        {
            Ok(true) => {
                self.integrations.invalidate(&integration.workspace_id);
                tracing::warn!(
                    workspace = %integration.workspace_id,
                    health = health.as_str(),
                    detail,
                    "integration paused: its events are held until it heals"
                );
            }
            Ok(false) => {}
            // Still held: the next event of this integration pauses it.
            Err(e) => tracing::warn!(error = %e, "could not record the pause"),
        }
    }

    async fn try_process(
        &self,
        event: &RequestChanged,
        holder: &str,
        lane: Lane,
        tracer: &Tracer,
    ) -> Result<Outcome, StepError> {
        let integration = match self.integration(&event.workspace_id).await? {
            Connection::Connected(integration) => integration,
            // Before any integration by definition; `requests resync` can send it later.
            Connection::Never => return Ok(Outcome::Skipped(Skip::NeverConnected)),
            // Perhaps this very workspace: ask again once the connect committed.
            Connection::Connecting => {
                return Ok(Outcome::Deferred {
                    wake: Wake::NotBefore(Duration::from_secs(1)),
                    reason: "connect_in_progress",
                });
            }
            Connection::Disconnected => {
                return Ok(Outcome::Park {
                    reason: "no_integration".into(),
                    error: format!(
                        "the Vitally integration of workspace {} is disconnected",
                        event.workspace_id
                    ),
                });
            }
        };
        let toggles = Toggles {
            push_requests: integration.push_requests,
            update_requests: integration.update_requests,
            sync_threads: integration.sync_threads,
            established_at: integration.established_at,
        };
        let may_update = match policy::decide(event, &toggles, lane) {
            PolicyDecision::Skip(reason) => return Ok(Outcome::Skipped(Skip::Policy(reason))),
            PolicyDecision::Sync { may_update } => may_update,
        };

        if integration.health != Health::Healthy {
            return Ok(Outcome::Held {
                reason: integration.health.as_str(),
            });
        }
        // A record stored under a wider VITALLY_ALLOWED_HOSTS (or before there was one).
        if let Err(refusal) = self.http.check_url(&integration.api_url) {
            return Err(StepError::Refused(refusal.to_string()));
        }

        let request_id = event.request.id;
        let Some(lock) = self
            .guards
            .lock(&event.workspace_id, request_id, self.settings.lock_wait)
            .await
            .map_err(lock_err)?
        else {
            return Err(StepError::Busy);
        };
        // Bounded well inside the lock's lifetime: past it another consumer could take the
        // lock and, for a new request, create a second instance.
        let lease = thena_runtime::config::work_lease(self.settings.lock_ttl);
        let work = fault::catch(self.locked(event, holder, lane, &integration, may_update, tracer));
        let result = match tokio::time::timeout(lease, work).await {
            Ok(Ok(result)) => result,
            // Caught here, so the lock is released below.
            Ok(Err(panic)) => Err(StepError::Panicked(panic)),
            Err(_) => Err(StepError::LeaseExpired(lease)),
        };
        self.guards.release(lock).await;
        if let Err(StepError::Paused(health, detail)) = &result {
            self.pause(&integration, *health, detail).await;
        }
        result
    }

    /// The part that must not interleave with another consumer on the same request.
    async fn locked(
        &self,
        event: &RequestChanged,
        holder: &str,
        lane: Lane,
        integration: &Arc<Integration>,
        may_update: bool,
        tracer: &Tracer,
    ) -> Result<Outcome, StepError> {
        let ws = event.workspace_id.as_str();
        let last = self
            .guards
            .last_version(ws, event.request.id)
            .await
            .map_err(version_err)?;
        match last {
            Some(last) if event.request.version < last => {
                return Ok(Outcome::Skipped(Skip::StaleVersion));
            }
            Some(last) if event.request.version == last => {
                return Ok(Outcome::Skipped(Skip::AlreadyApplied));
            }
            Some(_) | None => {}
        }

        let session = Session {
            client: integration.client(&self.http),
            limiter: &self.limiter,
            budget_key: integration.budget_key(),
            workspace: ws,
            budget: integration.rate_budget_per_min,
            max_wait: self.settings.max_rate_wait,
            // Never so long that the event outlives its lock lease.
            in_event_wait: self
                .settings
                .max_rate_wait
                .max(IN_EVENT_WAIT.min(self.settings.lock_ttl / 8)),
            turn: TurnFor {
                request: format!("{ws}:{}", event.request.id),
                holder: holder.to_owned(),
            },
            prepaid: AtomicU32::new(0),
            calls: AtomicU32::new(0),
            lane,
            backfill_budget: ((f64::from(integration.rate_budget_per_min)
                * self.settings.backfill_budget_share)
                .floor() as u32)
                .max(1),
        };
        let linked = self.resolve_target(&session, event, tracer).await?;
        // A version synced before means an instance to keep current, whatever the link.
        let (customer_id, organization_id, link_lost) =
            match relink(linked.as_ref().map_err(|no_link| *no_link), last.is_some()) {
                Relink::Link {
                    account,
                    organization,
                } => (account, organization, None),
                Relink::KeepLast(no_link) => (Link::Keep, Link::Keep, Some(no_link)),
                Relink::Skip(no_link) => return Ok(Outcome::Skipped(Skip::NoLink(no_link))),
            };
        if let Some(fault) = &self.fault {
            fault(FaultPoint::Locked, event);
        }

        let mut fields: FieldMap = integration.fields.clone();
        if Utc::now() - integration.fields_refreshed_at
            > chrono::Duration::from_std(self.settings.fields_ttl).unwrap_or(chrono::TimeDelta::MAX)
        {
            fields = self.refresh_fields(integration).await?;
        }
        let options = MappingOptions {
            textarea_limit: self.settings.textarea_limit,
        };
        let mut mapped = map_instance(event, &fields, &options);
        if integration.auto_create_fields && !mapped.dropped_categories.is_empty() {
            for category in &mapped.dropped_categories {
                let field = self.create_field(integration, category).await?;
                fields.insert(category.clone(), field);
            }
            self.integrations.invalidate(ws);
            mapped = map_instance(event, &fields, &options);
        }
        if !mapped.dropped_categories.is_empty() {
            self.http
                .metrics()
                .mapping_dropped_categories
                .with_label_values(&[ws])
                .inc_by(mapped.dropped_categories.len() as u64);
        }
        let body = InstanceBody {
            name: mapped.name,
            external_id: mapped.external_id,
            customer_id,
            organization_id,
            traits: mapped.traits,
        };

        let outcome = match self
            .upsert(&session, integration, &body, may_update, link_lost, tracer)
            .await
        {
            // The object changed under us (a trait renamed or removed in Vitally): re-read
            // its fields now rather than at the next refresh; if they moved, try again.
            Err(StepError::Vitally(error)) if rejects_a_trait(&error) => {
                let refreshed = self.refresh_fields(integration).await?;
                return Err(if refreshed != fields {
                    StepError::FieldsChanged(error.to_string())
                } else {
                    StepError::Vitally(error)
                });
            }
            other => other?,
        };
        if let Outcome::Synced { .. } = outcome
            && let Err(e) = self
                .guards
                .record_version(ws, event.request.id, event.request.version)
                .await
        {
            // Vitally has this version, but an older one still in flight (a retry, a replay)
            // would not know and overwrite it. Retry: re-applying is idempotent, and once
            // the store is back the version is recorded, so the newest always wins.
            self.metrics.redis_error("record_version");
            let error = format!(
                "synced, but could not record version {}: {e}",
                event.request.version
            );
            return Err(match e {
                VersionError::Redis(_) => StepError::Redis(error),
                VersionError::Db(_) => StepError::Db(error),
            });
        }
        Ok(outcome)
    }

    /// Re-reads the object's field map from Vitally, under the workspace's field lock.
    async fn refresh_fields(&self, integration: &Integration) -> Result<FieldMap, StepError> {
        let refreshed = self
            .under_fields_lock(
                integration,
                provision::refresh_fields(
                    &self.http,
                    self.integrations.store(),
                    integration,
                    &self.settings.actor,
                ),
            )
            .await?;
        Ok(refreshed.fields)
    }

    /// Runs a change of the object's fields once for the whole fleet: under a
    /// workspace-wide lock (Vitally does not deduplicate fields), then drops the cached
    /// record so the new map is read.
    async fn under_fields_lock<T>(
        &self,
        integration: &Integration,
        change: impl Future<Output = Result<T, ConnectError>>,
    ) -> Result<T, StepError> {
        let ws = integration.workspace_id.as_str();
        self.under_lock(&format!("fields:{ws}"), async {
            let changed = change.await;
            self.integrations.invalidate(ws);
            changed.map_err(connect_step_error)
        })
        .await
    }

    /// Runs `work` holding the fleet-wide lock `name`; busy past `lock_wait`, the event
    /// is deferred instead.
    async fn under_lock<T>(
        &self,
        name: &str,
        work: impl Future<Output = Result<T, StepError>>,
    ) -> Result<T, StepError> {
        let Some(lock) = self
            .guards
            .lock_named(name, self.settings.lock_wait)
            .await
            .map_err(lock_err)?
        else {
            return Err(StepError::Busy);
        };
        let result = work.await;
        self.guards.release(lock).await;
        result
    }

    /// Creates a missing category trait once for the whole fleet (idempotent: it
    /// re-reads the object's fields first).
    async fn create_field(
        &self,
        integration: &Integration,
        label: &str,
    ) -> Result<FieldRef, StepError> {
        self.under_fields_lock(
            integration,
            provision::ensure_field(
                &self.http,
                self.integrations.store(),
                integration,
                label,
                &self.settings.actor,
            ),
        )
        .await
    }

    /// Finds the instance by externalId (cached id), then updates or creates it. With
    /// `link_lost` the body keeps the instance's last link: it is updated, never created.
    ///
    /// One instance per request even when Vitally is slow: a create whose answer was lost
    /// (it may have been applied) marks the request in Redis; while marked, Vitally's
    /// search (never the cache) decides, and an empty search does not create until the
    /// lost create had time to surface (see [`crate::instances`]). Any search that finds
    /// several instances keeps the oldest and deletes the others.
    async fn upsert(
        &self,
        session: &Session<'_>,
        integration: &Integration,
        body: &InstanceBody,
        may_update: bool,
        link_lost: Option<NoLink>,
        tracer: &Tracer,
    ) -> Result<Outcome, StepError> {
        let object = integration.custom_object_id.as_str();
        let updated = |instance: Instance| {
            if link_lost.is_some() {
                tracer.update(|t| keep_last_link(t, &instance));
            }
            Outcome::Synced {
                write: link_lost.map_or(Write::Updated, |_| Write::LinkKept),
            }
        };
        let cache_id = format!("{}:{}", integration.workspace_id, body.external_id);
        let ttl = Ttl {
            found: self.settings.instance_ttl,
            // Never cache "no instance": another consumer may create it any moment.
            not_found: None,
        };
        let lost_at: Option<DateTime<Utc>> = self.cache.peek(UNCONFIRMED, &cache_id).await;
        let cached = match lost_at {
            None => {
                self.cache
                    .get_or_fetch("instance", &cache_id, ttl, || {
                        self.search_instance(session, integration, body)
                    })
                    .await?
            }
            Some(lost_at) => {
                let found = self.search_instance(session, integration, body).await?;
                let age = (Utc::now() - lost_at).to_std().unwrap_or_default();
                match after_lost_create(found.is_some(), age, self.create_settle()) {
                    AfterLostCreate::Use { clear_mark } => {
                        if clear_mark {
                            self.cache.invalidate(UNCONFIRMED, &cache_id).await;
                        }
                        self.cache
                            .put("instance", &cache_id, found.as_ref(), ttl)
                            .await;
                        found
                    }
                    AfterLostCreate::Wait => {
                        return Ok(Outcome::Retry {
                            reason: "create_unconfirmed".into(),
                            error: format!(
                                "a create's answer was lost {age:?} ago and its instance is not \
                                 searchable yet; not creating another"
                            ),
                        });
                    }
                    AfterLostCreate::Create => None,
                }
            }
        };

        if let Some(id) = cached {
            tracer.update(|t| t.instance_id = Some(id.clone()));
            if !may_update {
                return Ok(Outcome::Skipped(Skip::UpdateDisabled));
            }
            match session
                .call(session.client.update_instance(object, &id, body))
                .await
            {
                Ok(instance) => return Ok(updated(instance)),
                Err(StepError::Vitally(e)) if e.is_not_found() => {
                    // Deleted in Vitally (or a stale cache): resolve again from the source.
                    self.cache.invalidate("instance", &cache_id).await;
                    if let Some(found) = self.search_instance(session, integration, body).await? {
                        tracer.update(|t| t.instance_id = Some(found.clone()));
                        let instance = session
                            .call(session.client.update_instance(object, &found, body))
                            .await?;
                        self.cache
                            .put("instance", &cache_id, Some(&found), ttl)
                            .await;
                        return Ok(updated(instance));
                    }
                }
                Err(other) => return Err(other),
            }
        }
        if let Some(no_link) = link_lost {
            // Gone from Vitally, and no link to create it under.
            return Ok(Outcome::Skipped(Skip::NoLink(no_link)));
        }
        match session
            .object_call(session.client.create_instance(object, body))
            .await
        {
            Ok(created) => {
                tracer.update(|t| t.instance_id = Some(created.id.clone()));
                self.cache
                    .put("instance", &cache_id, Some(&created.id), ttl)
                    .await;
                Ok(Outcome::Synced {
                    write: Write::Created,
                })
            }
            Err(StepError::Vitally(error)) if create_answer_lost(&error) => {
                let mark = Ttl {
                    found: self.settings.instance_ttl,
                    not_found: None,
                };
                self.cache
                    .put(UNCONFIRMED, &cache_id, Some(&Utc::now()), mark)
                    .await;
                Err(StepError::Vitally(error))
            }
            Err(other) => Err(other),
        }
    }

    /// How long a create whose answer was lost may take to become searchable: a few
    /// client timeouts (the write lands within one; search lags a little behind).
    fn create_settle(&self) -> Duration {
        self.http.timeout() * CREATE_SETTLE_TIMEOUTS
    }

    /// The id of the request's instance by a search in Vitally; of several, the oldest is
    /// kept and the others are deleted (and counted).
    async fn search_instance(
        &self,
        session: &Session<'_>,
        integration: &Integration,
        body: &InstanceBody,
    ) -> Result<Option<String>, StepError> {
        let object = integration.custom_object_id.as_str();
        let found = session
            .object_call(session.client.search_instances(object, &body.external_id))
            .await?;
        let Some(chosen) = choose(&found) else {
            return Ok(None);
        };
        for duplicate in &chosen.duplicates {
            match session
                .call(session.client.delete_instance(object, &duplicate.id))
                .await
            {
                Ok(()) => {
                    self.metrics
                        .duplicates_removed
                        .with_label_values(&[integration.workspace_id.as_str()])
                        .inc();
                    tracing::warn!(
                        workspace = %integration.workspace_id,
                        external_id = %body.external_id,
                        kept = %chosen.keep.id,
                        deleted = %duplicate.id,
                        "deleted a duplicate instance (a create whose answer was lost)"
                    );
                }
                // Another consumer removed it first.
                Err(StepError::Vitally(e)) if e.is_not_found() => {}
                Err(other) => return Err(other),
            }
        }
        Ok(Some(chosen.keep.id.clone()))
    }

    /// The linking table, then the email-domain fallback.
    async fn resolve_target(
        &self,
        session: &Session<'_>,
        event: &RequestChanged,
        tracer: &Tracer,
    ) -> Result<Result<Target, NoLink>, StepError> {
        let ws = event.workspace_id.as_str();
        let Some(email) = event.request.requestor.normalized_email() else {
            tracer.update(|t| {
                t.link = Some(link_trace(
                    "no email: nothing to link by",
                    &Err(NoLink::NoEmail),
                    false,
                ))
            });
            return Ok(Err(NoLink::NoEmail));
        };
        let user_ttl = Ttl {
            found: self.settings.user_ttl,
            not_found: Some(self.settings.negative_ttl),
        };
        let memberships: Option<Memberships> = self
            .cache
            .get_or_fetch("user", &format!("{ws}:{email}"), user_ttl, || async {
                let users = session.call(session.client.users_by_email(&email)).await?;
                Ok::<_, StepError>(merge_memberships(&users))
            })
            .await?;

        let link = match &memberships {
            Some(m) => link_user(&m.organization_ids, &m.account_ids),
            None => UserLink::Unlinked,
        };
        let row = memberships.as_ref().map_or_else(
            || "user not found in Vitally".to_owned(),
            |m| {
                format!(
                    "linking table: {}",
                    table_row(&m.organization_ids, &m.account_ids)
                )
            },
        );
        let linked = match link {
            UserLink::Link(target) => Ok(target),
            UserLink::NoSync(reason) => Err(reason),
            UserLink::AccountAndItsOrganization(account) => {
                let organization = self.account_organization(session, ws, &account).await?;
                Ok(Target {
                    account_id: Some(account),
                    organization_id: organization,
                })
            }
            UserLink::Unlinked => {
                return self
                    .domain_fallback(session, event, &email, memberships.is_some(), &row, tracer)
                    .await;
            }
        };
        tracer.update(|t| t.link = Some(link_trace(&row, &linked, false)));
        Ok(linked)
    }

    async fn account_organization(
        &self,
        session: &Session<'_>,
        ws: &str,
        account: &str,
    ) -> Result<Option<String>, StepError> {
        let ttl = Ttl {
            found: self.settings.account_org_ttl,
            not_found: Some(self.settings.negative_ttl),
        };
        self.cache
            .get_or_fetch("account_org", &format!("{ws}:{account}"), ttl, || async {
                let account = session.call(session.client.account(account)).await?;
                Ok::<_, StepError>(account.and_then(|a| a.organization_id))
            })
            .await
    }

    /// The requestor is not a Vitally user, or is linked nowhere: find the customer by the
    /// email domain and, for an unknown requestor, create the user there.
    async fn domain_fallback(
        &self,
        session: &Session<'_>,
        event: &RequestChanged,
        email: &str,
        user_exists: bool,
        row: &str,
        tracer: &Tracer,
    ) -> Result<Result<Target, NoLink>, StepError> {
        let ws = event.workspace_id.as_str();
        let Some(domain) = event.request.requestor.email_domain() else {
            return Ok(Err(NoLink::NoEmail));
        };
        let rule = format!("{row}; domain fallback on {domain}");
        if is_free_mail(&domain, &self.settings.free_mail_domains) {
            tracer
                .update(|t| t.link = Some(link_trace(&rule, &Err(NoLink::FreeMailDomain), false)));
            return Ok(Err(NoLink::FreeMailDomain));
        }
        // "Nobody at this domain" is an absence: cached like one, so a customer who adds
        // a user there is seen within CACHE_TTL_NEGATIVE, not CACHE_TTL_DOMAIN.
        let ttl = Ttl {
            found: self.settings.domain_ttl,
            not_found: Some(self.settings.negative_ttl),
        };
        let choice = self
            .cache
            .get_or_fetch("domain", &format!("{ws}:{domain}"), ttl, || async {
                let users = session
                    .call(session.client.users_by_email_domain(&domain))
                    .await?;
                let members: Vec<Memberships> = users.iter().map(memberships_of).collect();
                Ok::<_, StepError>(match choose_by_domain(&members) {
                    DomainChoice::NoSync(crate::linking::DomainNoSync::Unknown) => None,
                    known => Some(known),
                })
            })
            .await?
            .unwrap_or(DomainChoice::NoSync(crate::linking::DomainNoSync::Unknown));

        let (target, new_user) = match choice {
            DomainChoice::NoSync(reason) => {
                let no_link = NoLink::from(reason);
                tracer.update(|t| t.link = Some(link_trace(&rule, &Err(no_link), false)));
                return Ok(Err(no_link));
            }
            DomainChoice::Account(account) => (
                Target::account(&account),
                Memberships {
                    organization_ids: vec![],
                    account_ids: vec![account],
                },
            ),
            DomainChoice::Organization(org) => (
                Target::organization(&org),
                Memberships {
                    organization_ids: vec![org],
                    account_ids: vec![],
                },
            ),
        };
        let created = !user_exists
            && self
                .create_requestor(session, event, email, &new_user)
                .await?;
        let linked = Ok(target);
        tracer.update(|t| t.link = Some(link_trace(&rule, &linked, created)));
        Ok(linked)
    }

    /// Creates the requestor as a Vitally user with `memberships`, once per person for the
    /// whole fleet: under a lock on the address, and not at all when they exist by now —
    /// maybe from another channel, under another externalId. The user cache says so when
    /// this fleet created them (the creator fills it before letting go of the lock, and
    /// Vitally's search may lag); else Vitally, asked by email, since the earlier lookup
    /// may have been a cached "not found" and a create whose answer was lost may have been
    /// applied. Returns whether this call created the user.
    async fn create_requestor(
        &self,
        session: &Session<'_>,
        event: &RequestChanged,
        email: &str,
        memberships: &Memberships,
    ) -> Result<bool, StepError> {
        let ws = event.workspace_id.as_str();
        let key = format!("{ws}:{email}");
        self.under_lock(&format!("user:{key}"), async {
            if self.cache.peek::<Memberships>("user", &key).await.is_some() {
                return Ok(false);
            }
            let user_ttl = Ttl {
                found: self.settings.user_ttl,
                not_found: Some(self.settings.negative_ttl),
            };
            let found = session.call(session.client.users_by_email(email)).await?;
            if let Some(existing) = merge_memberships(&found) {
                self.cache
                    .put("user", &key, Some(&existing), user_ttl)
                    .await;
                return Ok(false);
            }
            let request = &event.request;
            let user = NewUser {
                external_id: user_external_id(
                    ws,
                    request.source,
                    request.requestor_channel_id(),
                    email,
                ),
                name: request
                    .requestor
                    .name
                    .clone()
                    .unwrap_or_else(|| email.to_string()),
                email: email.to_string(),
                account_ids: memberships.account_ids.clone(),
                organization_ids: memberships.organization_ids.clone(),
            };
            session.call(session.client.create_user(&user)).await?;
            self.cache
                .put("user", &key, Some(memberships), user_ttl)
                .await;
            Ok(true)
        })
        .await
    }
}

/// The ledger's view of a linking decision.
fn link_trace(rule: &str, linked: &Result<Target, NoLink>, user_created: bool) -> Value {
    match linked {
        Ok(target) => json!({
            "rule": rule,
            "organization_id": target.organization_id,
            "account_id": target.account_id,
            "user_created": user_created,
        }),
        Err(no_link) => json!({"rule": rule, "no_sync": no_link.as_str()}),
    }
}

/// The ledger's view of a request whose linking says no sync now but which keeps its
/// instance: the link Vitally kept, as its answer says.
fn keep_last_link(trace: &mut Trace, instance: &Instance) {
    let kept = json!({
        "organization_id": instance.organization_id,
        "account_id": instance.customer_id,
    });
    match trace.link.as_mut().and_then(Value::as_object_mut) {
        Some(link) => {
            link.insert("kept_last_link".into(), kept);
        }
        None => trace.link = Some(json!({"kept_last_link": kept})),
    }
}

/// A provisioning failure inside an event's work, classified like any other step.
fn connect_step_error(error: ConnectError) -> StepError {
    match error {
        ConnectError::Vitally(error) => match pausing(&error, true) {
            Some(health) => StepError::Paused(health, error.to_string()),
            None => error.into(),
        },
        ConnectError::Store(error) => StepError::Store(error),
        error @ (ConnectError::InvalidUrl(_)
        | ConnectError::InvalidAuthHeader(_)
        | ConnectError::InvalidSetting(_)
        | ConnectError::Unauthorized { .. }
        | ConnectError::Unreachable { .. }
        | ConnectError::AlreadyConnected { .. }
        | ConnectError::Provisioning { .. }
        | ConnectError::UnsupportedFieldType { .. }
        | ConnectError::NotConnected(_)) => StepError::Permanent {
            reason: "field_provisioning",
            error: error.to_string(),
        },
    }
}

pub(crate) fn memberships_of(user: &User) -> Memberships {
    Memberships {
        organization_ids: user.organization_ids.clone(),
        account_ids: user.account_ids.clone(),
    }
}

/// Several Vitally users can share an address; link by all their memberships together.
pub(crate) fn merge_memberships(users: &[User]) -> Option<Memberships> {
    if users.is_empty() {
        return None;
    }
    let mut merged = Memberships::default();
    for user in users {
        merged
            .organization_ids
            .extend(user.organization_ids.iter().cloned());
        merged.account_ids.extend(user.account_ids.iter().cloned());
    }
    merged.organization_ids.sort();
    merged.organization_ids.dedup();
    merged.account_ids.sort();
    merged.account_ids.dedup();
    Some(merged)
}
