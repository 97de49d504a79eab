//! Load and demo generator: realistic request lifecycles (created → assigned → in progress
//! → closed with CSAT, threads growing, categories set), sent through the ingest API
//! ([`emit_http`]) or straight onto the broker ([`emit_broker`]).
//!
//! Generation is pure and deterministic ([`lifecycle`], [`Scenario::events`]); sending is
//! paced by a pure schedule ([`send_offset`]).

use std::{collections::BTreeMap, fmt, str::FromStr, time::Duration};

use chrono::{DateTime, Utc};
use futures_util::{StreamExt, TryStreamExt, stream};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::Value;
use thena_broker::Publisher;
use thena_events::{Change, Request, RequestChanged, Requestor, SCHEMA_V1, Source, ThreadMessage};

/// Who raises a request. The caller picks the mix: a user Vitally knows, a stranger with a
/// company domain (domain fallback), a free-mail stranger (never linked), no email at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Persona {
    pub name: String,
    pub email: Option<String>,
}

impl Persona {
    pub fn new(name: impl Into<String>, email: Option<&str>) -> Self {
        Self {
            name: name.into(),
            email: email.map(str::to_string),
        }
    }
}

/// `Name` or `Name <email>`, the way `--persona` takes it.
impl FromStr for Persona {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (name, email) = match s.split_once('<') {
            Some((name, rest)) => {
                let email = rest
                    .strip_suffix('>')
                    .ok_or_else(|| format!("{s:?}: expected `Name <email>`"))?
                    .trim();
                if !email.contains('@') {
                    return Err(format!("{s:?}: {email:?} is not an email address"));
                }
                (name.trim(), Some(email))
            }
            None => (s, None),
        };
        if name.is_empty() {
            return Err(format!("{s:?}: the persona needs a name"));
        }
        Ok(Persona::new(name, email))
    }
}

impl fmt::Display for Persona {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.email {
            Some(email) => write!(f, "{} <{email}>", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// One of each kind of requestor, for when the caller has no Vitally fixture in mind.
pub fn sample_personas() -> Vec<Persona> {
    vec![
        Persona::new("Harsh Patel", Some("harsh@acme-corp.com")),
        Persona::new("Mia Chen", Some("mia.chen@globex.io")),
        Persona::new("Sam Taylor", Some("sam.taylor1987@gmail.com")),
        Persona::new("Anonymous Slack user", None),
    ]
}

/// `emit`'s requestors when none is given: four people the demo's customer base
/// (`fake-vitally --demo-seed`, `crates/demo/src/customers.rs` PERSONAS) knows and links —
/// org + account, org, account, account + its org — so a hand-run fleet against that
/// fake syncs every request. A copy, since the producer must not depend on the demo
/// (the integration tests check the two agree).
pub fn demo_seed_personas() -> Vec<Persona> {
    vec![
        Persona::new("Alice", Some("alice@acme.com")),
        Persona::new("Carol", Some("carol@acme.com")),
        Persona::new("Dave", Some("dave@solo.io")),
        Persona::new("Ivy", Some("ivy@conglo.com")),
    ]
}

/// A custom category and the values a request may take for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Category {
    pub name: String,
    pub values: Vec<String>,
}

impl Category {
    pub fn new(name: &str, values: &[&str]) -> Self {
        Self {
            name: name.into(),
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }
}

/// The categories [`lifecycle`] uses (pass their names to connect so traits exist).
pub fn default_categories() -> Vec<Category> {
    vec![
        Category::new("Product", &["Request Management", "Marketing Automation"]),
        Category::new("Region", &["EMEA", "AMER", "APAC"]),
    ]
}

/// A batch of request lifecycles for one workspace.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub workspace_id: String,
    /// Requestors, assigned round-robin (request `i` gets persona `i % len`).
    pub personas: Vec<Persona>,
    /// Channels the requests come from, in turn (see [`Scenario::source_of`]).
    pub sources: Vec<Source>,
    pub requests: u64,
    pub first_request_id: u64,
    /// Events per request (at least 3: created, assigned, closed).
    pub steps: usize,
    /// When the first request is created; later requests start a little after.
    pub start: DateTime<Utc>,
    /// Longest gap between two steps of one request (each gap is 10–100 % of it).
    pub max_step_gap: Duration,
    pub categories: Vec<Category>,
    /// Varies content and timing; the same seed gives the same events.
    pub seed: u64,
}

impl Scenario {
    /// Ten six-step requests starting at `start`, sample personas, default categories.
    pub fn new(workspace_id: impl Into<String>, start: DateTime<Utc>) -> Self {
        Self {
            workspace_id: workspace_id.into(),
            personas: sample_personas(),
            sources: Source::ALL.to_vec(),
            requests: 10,
            first_request_id: 1,
            steps: 6,
            start,
            max_step_gap: DEFAULT_MAX_STEP_GAP,
            categories: default_categories(),
            seed: 0,
        }
    }

    /// The events of [`Scenario::events`] with no timestamp after `now`: whatever the
    /// simulated timeline puts later is stamped `now` (orderings are kept, a later step
    /// may tie with an earlier one). A live desk never reports a change from the future.
    /// The timeline is clamped rather than moved back so that, started at `now`, no
    /// request predates an integration connected just before (it would be skipped as
    /// `before_integration`).
    pub fn events_until(&self, now: DateTime<Utc>) -> Vec<RequestChanged> {
        let mut events = self.events();
        for event in &mut events {
            event.occurred_at = event.occurred_at.min(now);
            let request = &mut event.request;
            request.created_at = request.created_at.min(now);
            request.updated_at = request.updated_at.min(now);
            request.closed_at = request.closed_at.map(|at| at.min(now));
            for message in request
                .customer_thread
                .iter_mut()
                .chain(request.internal_thread.iter_mut())
            {
                message.ts = message.ts.min(now);
            }
        }
        events
    }

    /// Every event of every request, interleaved the way a live desk produces them: all
    /// first steps, then all second steps, … (each request's own events stay in order).
    pub fn events(&self) -> Vec<RequestChanged> {
        if self.personas.is_empty() {
            return Vec::new();
        }
        let lifecycles: Vec<Vec<RequestChanged>> = (0..self.requests)
            .map(|i| {
                let persona = &self.personas[(i % self.personas.len() as u64) as usize];
                let stagger = chrono::Duration::seconds(i as i64);
                build(&Spec {
                    workspace: &self.workspace_id,
                    request_id: self.first_request_id + i,
                    persona,
                    source: self.source_of(i),
                    steps: self.steps,
                    start: self.start + stagger,
                    max_gap: self.max_step_gap,
                    categories: &self.categories,
                    seed: self.seed,
                })
            })
            .collect();
        let longest = lifecycles.iter().map(Vec::len).max().unwrap_or(0);
        let mut events = Vec::with_capacity(lifecycles.iter().map(Vec::len).sum());
        for step in 0..longest {
            events.extend(lifecycles.iter().filter_map(|l| l.get(step).cloned()));
        }
        events
    }

    /// The channel of request `i` (counted from 0): the sources in turn, shifted by one
    /// each round of personas, so every persona writes from several channels (the same
    /// person by Slack and by email is one Vitally user). Email needs an address: a
    /// persona without one takes the next channel instead (Slack if email is the only one).
    pub fn source_of(&self, i: u64) -> Source {
        let (Some(persona), n) = (
            self.personas
                .get((i % self.personas.len().max(1) as u64) as usize),
            self.sources.len() as u64,
        ) else {
            return Source::Slack;
        };
        let start = i + i / self.personas.len() as u64;
        (0..n)
            .map(|k| self.sources[((start + k) % n) as usize])
            .find(|source| *source != Source::Email || persona.email.is_some())
            .unwrap_or(Source::Slack)
    }
}

const DEFAULT_MAX_STEP_GAP: Duration = Duration::from_secs(30 * 60);
const MIN_STEPS: usize = 3;

/// The events of one request from creation to closure: `steps` events (at least 3),
/// `version` 1, 2, …, `updated_at` moving forward, the last one closed with a CSAT.
/// Deterministic: the same arguments give the same events (ids included).
pub fn lifecycle(
    workspace: &str,
    request_id: u64,
    persona: &Persona,
    steps: usize,
    start: DateTime<Utc>,
) -> Vec<RequestChanged> {
    build(&Spec {
        workspace,
        request_id,
        persona,
        source: Source::Slack,
        steps,
        start,
        max_gap: DEFAULT_MAX_STEP_GAP,
        categories: &default_categories(),
        seed: 0,
    })
}

struct Spec<'a> {
    workspace: &'a str,
    request_id: u64,
    persona: &'a Persona,
    source: Source,
    steps: usize,
    start: DateTime<Utc>,
    max_gap: Duration,
    categories: &'a [Category],
    seed: u64,
}

struct Topic {
    title: &'static str,
    message: &'static str,
    summary: &'static str,
    tags: &'static [&'static str],
}

const TOPICS: &[Topic] = &[
    Topic {
        title: "SSO login fails for new users",
        message: "Hi team, our new hires cannot log in with SSO since Monday.",
        summary: "New users cannot log in through Okta since Monday.",
        tags: &["sso", "login"],
    },
    Topic {
        title: "Invoice shows the wrong plan",
        message: "Our latest invoice bills us for Enterprise but we are on Growth.",
        summary: "Customer billed for the wrong plan on the latest invoice.",
        tags: &["billing", "invoice"],
    },
    Topic {
        title: "CSV export times out",
        message: "Exporting the accounts report to CSV spins forever and then fails.",
        summary: "Large CSV exports time out.",
        tags: &["export", "performance"],
    },
    Topic {
        title: "Webhook deliveries are delayed",
        message: "Webhooks arrive 20 minutes late since this morning, is something down?",
        summary: "Webhook deliveries delayed by about 20 minutes.",
        tags: &["webhooks", "latency"],
    },
    Topic {
        title: "Need more seats",
        message: "Can we add 15 more seats before the quarter starts?",
        summary: "Seat increase request ahead of the new quarter.",
        tags: &["licensing"],
    },
];
const AGENTS: &[&str] = &["Jane Doe", "Arjun Mehta", "Lena Fischer", "Tomás Ruiz"];
const CUSTOMER_FOLLOW_UPS: &[&str] = &[
    "Any update on this?",
    "Attaching a screenshot of the error.",
    "It happened again this morning.",
    "Thanks, trying that now.",
];
const AGENT_REPLIES: &[&str] = &[
    "Looking into it now.",
    "Could you share the exact error message?",
    "We have a fix rolling out today.",
    "Can you confirm it works on your side now?",
];
const INTERNAL_NOTES: &[&str] = &[
    "Reproduced on staging.",
    "Escalated to the platform team.",
    "Root cause found, patch in review.",
];
const URGENCIES: &[&str] = &["low", "medium", "high", "urgent"];
const SENTIMENTS: &[&str] = &["positive", "neutral", "negative"];
const CSATS: &[&str] = &["5 - Excellent", "4 - Good", "3 - Average", "2 - Poor"];

/// FNV-1a: a stable hash (std's `DefaultHasher` may change between releases).
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn pick(rng: &mut StdRng, items: &[&'static str]) -> &'static str {
    items.choose(rng).copied().unwrap_or_default()
}

fn build(spec: &Spec<'_>) -> Vec<RequestChanged> {
    let steps = spec.steps.max(MIN_STEPS);
    let mut rng = StdRng::seed_from_u64(
        fnv(spec.workspace.as_bytes())
            ^ spec.request_id.rotate_left(17)
            ^ spec.seed.rotate_left(41),
    );
    let topic = &TOPICS[rng.gen_range(0..TOPICS.len())];
    let agent = pick(&mut rng, AGENTS).to_string();
    let max_gap = spec.max_gap.as_millis().max(10) as i64;
    let ws = spec.workspace.to_ascii_lowercase();
    let id = spec.request_id;

    let mut now = spec.start;
    let channel = Channel {
        source: spec.source,
        subject: topic.title,
    };
    let persona = &spec.persona;
    let opening = channel.message(&persona.name, persona.email.as_deref(), topic.message, now);
    let agent_email = format!(
        "{}@support.thena.ai",
        agent.to_lowercase().replace(' ', ".")
    );
    let mut request = Request {
        id,
        version: 1,
        source: spec.source,
        title: Some(topic.title.into()),
        summary: Some(topic.summary.into()),
        message_text: Some(topic.message.into()),
        status: Some("open".into()),
        urgency: Some(pick(&mut rng, URGENCIES).into()),
        sentiment: Some(pick(&mut rng, SENTIMENTS).into()),
        ai_tags: topic.tags.iter().map(|t| t.to_string()).collect(),
        assigned_to: None,
        csat: None,
        customer_thread: vec![opening],
        internal_thread: vec![],
        permalink: channel.permalink(&ws, id, persona, now),
        internal_notification_link: Some(format!(
            "https://{ws}.slack.com/archives/C0TRIAGE/p{}",
            now.timestamp_micros()
        )),
        web_link: Some(format!("https://app.thena.ai/requests/{id}")),
        created_at: now,
        updated_at: now,
        closed_at: None,
        closed_by: None,
        requestor: channel.requestor(persona),
        custom_fields: BTreeMap::new(),
    };
    if let Some(category) = spec.categories.first() {
        set_category(&mut rng, &mut request, category);
    }

    let mut events = Vec::with_capacity(steps);
    let snapshot = |rng: &mut StdRng, change: Change, request: &Request| RequestChanged {
        schema: SCHEMA_V1.into(),
        event_id: uuid::Builder::from_random_bytes(rng.r#gen()).into_uuid(),
        workspace_id: spec.workspace.into(),
        occurred_at: request.updated_at,
        change,
        request: request.clone(),
    };
    events.push(snapshot(&mut rng, Change::Created, &request));

    for step in 2..=steps as u64 {
        let gap = rng.gen_range(max_gap / 10..=max_gap);
        now += chrono::Duration::milliseconds(gap);
        request.version = step;
        request.updated_at = now;
        let change = if step == 2 {
            // Triage: someone takes it.
            request.assigned_to = Some(agent.clone());
            request
                .internal_thread
                .push(message(&agent, "Taking this one.", now));
            Change::Metadata
        } else if step == steps as u64 {
            request.status = Some("closed".into());
            request.csat = Some(pick(&mut rng, CSATS).into());
            request.closed_at = Some(now);
            request.closed_by = Some(agent.clone());
            let last = request.customer_thread.last().cloned();
            request.customer_thread.push(channel.reply(
                &agent,
                &agent_email,
                "Closing this out, thanks for your patience!",
                now,
                last.as_ref(),
            ));
            Change::Metadata
        } else if step == 3 {
            request.status = Some("in_progress".into());
            let reply = pick(&mut rng, AGENT_REPLIES);
            let last = request.customer_thread.last().cloned();
            request.customer_thread.push(channel.reply(
                &agent,
                &agent_email,
                reply,
                now,
                last.as_ref(),
            ));
            Change::Metadata
        } else if step % 2 == 0 {
            // Conversation only: the thread grows, metadata stays.
            let last = request.customer_thread.last().cloned();
            let note = if rng.gen_bool(0.5) {
                let text = pick(&mut rng, CUSTOMER_FOLLOW_UPS);
                let email = persona.email.as_deref().unwrap_or_default();
                channel.reply(&persona.name, email, text, now, last.as_ref())
            } else {
                let text = pick(&mut rng, AGENT_REPLIES);
                channel.reply(&agent, &agent_email, text, now, last.as_ref())
            };
            request.customer_thread.push(note);
            if rng.gen_bool(0.3) {
                request
                    .internal_thread
                    .push(message(&agent, pick(&mut rng, INTERNAL_NOTES), now));
            }
            Change::Thread
        } else {
            // Re-triage: a category is (re)set and the urgency may move.
            if let Some(category) = spec
                .categories
                .get((step as usize / 2) % spec.categories.len().max(1))
            {
                set_category(&mut rng, &mut request, category);
            }
            request.urgency = Some(pick(&mut rng, URGENCIES).into());
            Change::Metadata
        };
        events.push(snapshot(&mut rng, change, &request));
    }
    events
}

fn set_category(rng: &mut StdRng, request: &mut Request, category: &Category) {
    if let Some(value) = category.values.choose(rng) {
        request
            .custom_fields
            .insert(category.name.clone(), value.clone());
    }
}

fn message(author: &str, text: &str, ts: DateTime<Utc>) -> ThreadMessage {
    ThreadMessage::new(author, text, ts)
}

/// How a request's channel shows it: its link, its requestor's id, its messages.
struct Channel<'a> {
    source: Source,
    /// An email's subject (and a Teams post's): the request's title.
    subject: &'a str,
}

impl Channel<'_> {
    /// The message that started the request, in its channel (a web form has no page of
    /// its own here: its Permalink stays empty).
    fn permalink(&self, ws: &str, id: u64, persona: &Persona, at: DateTime<Utc>) -> Option<String> {
        let micros = at.timestamp_micros();
        match self.source {
            Source::Slack => Some(format!(
                "https://{ws}.slack.com/archives/C0CUSTOMER/p{micros}"
            )),
            Source::Email => {
                let domain = persona.email.as_deref()?.rsplit_once('@')?.1;
                Some(format!("mid:{micros:x}.{id}@mail.{domain}"))
            }
            Source::MsTeams => Some(format!(
                "https://teams.microsoft.com/l/message/19:{:016x}@thread.tacv2/{}",
                fnv(ws.as_bytes()),
                at.timestamp_millis()
            )),
            Source::Web => None,
        }
    }

    /// The requestor with their id in this channel (Slack also fills the older
    /// `slack_user_id`; email's id is the address).
    fn requestor(&self, persona: &Persona) -> Requestor {
        let hash = fnv(persona.name.as_bytes());
        let slack_id = format!("U{:08X}", hash as u32);
        let (slack_user_id, external_id) = match self.source {
            Source::Slack => (Some(slack_id.clone()), Some(slack_id)),
            Source::Email => (None, None),
            Source::Web => (None, Some(format!("portal-{:08x}", hash as u32))),
            Source::MsTeams => (
                None,
                Some(uuid::Uuid::from_u64_pair(hash, !hash).to_string()),
            ),
        };
        Requestor {
            name: Some(persona.name.clone()),
            email: persona.email.clone(),
            slack_user_id,
            external_id,
        }
    }

    /// The request's first message: an email with its subject, a Teams post with one.
    fn message(
        &self,
        author: &str,
        email: Option<&str>,
        text: &str,
        ts: DateTime<Utc>,
    ) -> ThreadMessage {
        let mut message = ThreadMessage::new(author, text, ts);
        match self.source {
            Source::Email => {
                message.author_email = email.map(str::to_owned);
                message.subject = Some(self.subject.to_owned());
            }
            Source::MsTeams => message.subject = Some(self.subject.to_owned()),
            Source::Slack | Source::Web => {}
        }
        message
    }

    /// A later message; an email reply has "Re:" and quotes the message before it, as
    /// mail clients do.
    fn reply(
        &self,
        author: &str,
        email: &str,
        text: &str,
        ts: DateTime<Utc>,
        previous: Option<&ThreadMessage>,
    ) -> ThreadMessage {
        let mut message = ThreadMessage::new(author, text, ts);
        if self.source == Source::Email {
            message.author_email = Some(email.to_owned()).filter(|e| !e.is_empty());
            message.subject = Some(format!("Re: {}", self.subject));
            if let Some(previous) = previous {
                let quoted: Vec<String> = previous.text.lines().map(|l| format!("> {l}")).collect();
                message.text = format!(
                    "{text}\n\nOn {}, {} wrote:\n{}",
                    previous.ts.format("%a, %-d %b %Y at %H:%M"),
                    previous.author,
                    quoted.join("\n")
                );
            }
        }
        message
    }
}

/// What happened to emitted events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EmitReport {
    /// Confirmed by the broker (202, or confirmed ids of a partial 503).
    pub accepted: u64,
    /// Refused by the API (400/413/415 …): sending again will not help.
    pub rejected: u64,
    /// Not confirmed because the broker or the API was unavailable: safe to resend.
    pub unavailable: u64,
}

impl EmitReport {
    fn add(mut self, other: EmitReport) -> Self {
        self.accepted += other.accepted;
        self.rejected += other.rejected;
        self.unavailable += other.unavailable;
        self
    }

    pub fn total(&self) -> u64 {
        self.accepted + self.rejected + self.unavailable
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EmitError {
    #[error("could not build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    /// 401/403: every further request would fail the same way.
    #[error("the producer refused the token (HTTP {0})")]
    Unauthorized(u16),
}

/// When the event with index `sent` is due, counted from the start of sending, for
/// `rate_per_sec` events per second (0 = no pacing).
pub fn send_offset(sent: u64, rate_per_sec: u32) -> Duration {
    if rate_per_sec == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos((u128::from(sent) * 1_000_000_000 / u128::from(rate_per_sec)) as u64)
}

/// Requests in flight at once against the API; batches may complete out of order, which
/// the consumers tolerate (a stale version is skipped, the newest snapshot wins).
const HTTP_IN_FLIGHT: usize = 8;
/// Publishes awaiting a confirm at once in [`emit_broker`].
const BROKER_IN_FLIGHT: usize = 64;

/// Posts `events` to `{base_url}/v1/events`, `batch_size` per request (1 = a single
/// object, more = a JSON array), paced to `rate_per_sec` events per second (0 = as fast
/// as possible). Stops early only on 401/403.
pub async fn emit_http(
    base_url: &str,
    token: &SecretString,
    events: &[RequestChanged],
    rate_per_sec: u32,
    batch_size: usize,
) -> Result<EmitReport, EmitError> {
    // reqwest is built without a default crypto provider; a second install is a no-op.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(EmitError::Client)?;
    let url = format!("{}/v1/events", base_url.trim_end_matches('/'));
    let batch_size = batch_size.max(1);
    let start = tokio::time::Instant::now();
    stream::iter(events.chunks(batch_size).enumerate())
        .map(|(n, chunk)| {
            let (client, url) = (&client, url.as_str());
            async move {
                tokio::time::sleep_until(
                    start + send_offset((n * batch_size) as u64, rate_per_sec),
                )
                .await;
                post_batch(client, url, token, chunk).await
            }
        })
        .buffered(HTTP_IN_FLIGHT)
        .try_fold(EmitReport::default(), |total, report| async move {
            Ok(total.add(report))
        })
        .await
}

async fn post_batch(
    client: &reqwest::Client,
    url: &str,
    token: &SecretString,
    chunk: &[RequestChanged],
) -> Result<EmitReport, EmitError> {
    let body = match chunk {
        [one] => serde_json::to_vec(one),
        many => serde_json::to_vec(many),
    };
    let sent = chunk.len() as u64;
    let body = match body {
        Ok(body) => body,
        Err(e) => {
            tracing::warn!(error = %e, "event did not serialize");
            return Ok(EmitReport {
                rejected: sent,
                ..EmitReport::default()
            });
        }
    };
    let response = client
        .post(url)
        .bearer_auth(token.expose_secret())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await;
    match response {
        Ok(response) => {
            let status = response.status().as_u16();
            let body: Option<Value> = response.json().await.ok();
            classify(status, body.as_ref(), sent)
        }
        Err(e) => {
            tracing::warn!(error = %e, "ingest request failed");
            Ok(EmitReport {
                unavailable: sent,
                ..EmitReport::default()
            })
        }
    }
}

/// What one API answer means for the `sent` events it covered.
fn classify(status: u16, body: Option<&Value>, sent: u64) -> Result<EmitReport, EmitError> {
    let report = match status {
        200..=299 => EmitReport {
            accepted: sent,
            ..EmitReport::default()
        },
        401 | 403 => return Err(EmitError::Unauthorized(status)),
        503 => {
            // A partly published batch reports its confirmed ids.
            let confirmed = body
                .and_then(|b| b.get("accepted"))
                .and_then(Value::as_u64)
                .unwrap_or(0)
                .min(sent);
            EmitReport {
                accepted: confirmed,
                unavailable: sent - confirmed,
                ..EmitReport::default()
            }
        }
        429 | 500..=599 => EmitReport {
            unavailable: sent,
            ..EmitReport::default()
        },
        _ => {
            tracing::warn!(status, problems = ?body.and_then(|b| b.get("problems")), "events rejected");
            EmitReport {
                rejected: sent,
                ..EmitReport::default()
            }
        }
    };
    Ok(report)
}

/// Publishes `events` straight onto the broker (no API in between), paced to
/// `rate_per_sec` (0 = as fast as confirms come back).
pub async fn emit_broker(
    publisher: &Publisher,
    events: &[RequestChanged],
    rate_per_sec: u32,
) -> EmitReport {
    let start = tokio::time::Instant::now();
    stream::iter(events.iter().enumerate())
        .map(|(n, event)| async move {
            tokio::time::sleep_until(start + send_offset(n as u64, rate_per_sec)).await;
            match publisher.publish_event(event).await {
                Ok(()) => EmitReport {
                    accepted: 1,
                    ..EmitReport::default()
                },
                Err(e) => {
                    tracing::warn!(event_id = %event.event_id, error = %e, "publish not confirmed");
                    EmitReport {
                        unavailable: 1,
                        ..EmitReport::default()
                    }
                }
            }
        })
        .buffer_unordered(BROKER_IN_FLIGHT)
        .fold(EmitReport::default(), |total, report| async move {
            total.add(report)
        })
        .await
}

/// Where `thena-vitally emit` sends its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// Through the producer API (`POST /v1/events`), like Thena does.
    Http,
    /// Straight onto the exchange, bypassing the API.
    Broker,
}

/// Arguments of `thena-vitally emit` (the token and AMQP URL come from the environment
/// configuration).
#[derive(Debug, Clone, clap::Args)]
pub struct EmitArgs {
    /// Send through the producer API or straight onto the broker.
    #[arg(long, value_enum, default_value_t = Via::Http)]
    pub via: Via,
    /// Base URL of the producer API.
    #[arg(long, env = "PRODUCER_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Slack workspace id of the events.
    #[arg(long, default_value = "T0DEMO")]
    pub workspace: String,
    /// Number of requests (each a full lifecycle).
    #[arg(long, default_value_t = 10)]
    pub requests: u64,
    /// Id of the first request; the others follow.
    #[arg(long, default_value_t = 1)]
    pub first_request_id: u64,
    /// Events per request (at least 3).
    #[arg(long, default_value_t = 6)]
    pub steps: usize,
    /// Events per second (0 = as fast as possible).
    #[arg(long, default_value_t = 50)]
    pub rate: u32,
    /// Events per HTTP request (1 = one object per request).
    #[arg(long, default_value_t = 20)]
    pub batch: usize,
    /// Longest simulated time between two steps of a request, in seconds.
    #[arg(long, default_value_t = 60)]
    pub step_gap_secs: u64,
    /// Seed of the generated content (same seed, same events).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Requestor as `Name` or `Name <email>`; repeat for a mix (default: four people
    /// the `fake-vitally --demo-seed` customer base links, e.g. `Alice <alice@acme.com>`).
    #[arg(long = "persona")]
    pub personas: Vec<Persona>,
    /// Channel the requests come from: slack, email, web or ms_teams; repeat for a mix,
    /// taken in turn (default: all four; a persona without an email never writes by email).
    #[arg(long = "source", value_parser = parse_source)]
    pub sources: Vec<Source>,
}

fn parse_source(s: &str) -> Result<Source, String> {
    Source::parse(s).ok_or_else(|| {
        let names: Vec<&str> = Source::ALL.iter().map(|s| s.as_str()).collect();
        format!("{s:?} is not a channel; use one of {}", names.join(", "))
    })
}

impl EmitArgs {
    /// The scenario these arguments describe, starting at `start`.
    pub fn scenario(&self, start: DateTime<Utc>) -> Scenario {
        Scenario {
            workspace_id: self.workspace.clone(),
            personas: if self.personas.is_empty() {
                demo_seed_personas()
            } else {
                self.personas.clone()
            },
            sources: if self.sources.is_empty() {
                Source::ALL.to_vec()
            } else {
                self.sources.clone()
            },
            requests: self.requests,
            first_request_id: self.first_request_id,
            steps: self.steps,
            start,
            max_step_gap: Duration::from_secs(self.step_gap_secs),
            categories: default_categories(),
            seed: self.seed,
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use thena_events::{Limits, parse_value};
    use uuid::Uuid;

    use super::*;

    fn start() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 25, 10, 0, 0).unwrap()
    }

    #[test]
    fn a_lifecycle_is_valid_ordered_and_ends_closed_with_csat() {
        for persona in sample_personas() {
            for steps in [1, 3, 4, 6, 11] {
                let events = lifecycle("T024BE7LD", 135, &persona, steps, start());
                assert_eq!(events.len(), steps.max(3));
                for event in &events {
                    let value = serde_json::to_value(event).unwrap();
                    assert_eq!(&parse_value(value, &Limits::default()).unwrap(), event);
                }
                assert_eq!(events[0].change, Change::Created);
                assert_eq!(events[0].request.status.as_deref(), Some("open"));
                assert!(events[1].request.assigned_to.is_some());
                for pair in events.windows(2) {
                    assert_eq!(pair[1].request.version, pair[0].request.version + 1);
                    assert!(pair[1].request.updated_at > pair[0].request.updated_at);
                    assert!(
                        pair[1].request.customer_thread.len()
                            >= pair[0].request.customer_thread.len()
                    );
                }
                let last = events.last().unwrap();
                assert_eq!(last.request.status.as_deref(), Some("closed"));
                assert!(last.request.csat.is_some());
                assert_eq!(last.request.closed_at, Some(last.request.updated_at));
                assert_eq!(last.request.requestor.email, persona.email);
            }
        }
    }

    #[test]
    fn a_long_lifecycle_goes_through_in_progress_with_threads_and_categories() {
        let events = lifecycle("T1", 7, &sample_personas()[0], 8, start());
        let statuses: Vec<&str> = events
            .iter()
            .filter_map(|e| e.request.status.as_deref())
            .collect();
        assert!(statuses.contains(&"in_progress"));
        assert!(events.iter().any(|e| e.change == Change::Thread));
        let last = &events.last().unwrap().request;
        assert!(last.customer_thread.len() > 2);
        assert!(last.custom_fields.contains_key("Product"));
        assert!(last.custom_fields.contains_key("Region"));
    }

    #[test]
    fn lifecycles_are_deterministic_and_distinct_per_request() {
        let persona = Persona::new("Mia", Some("mia@globex.io"));
        let a = lifecycle("T1", 1, &persona, 5, start());
        assert_eq!(a, lifecycle("T1", 1, &persona, 5, start()));
        let b = lifecycle("T1", 2, &persona, 5, start());
        assert_ne!(a[0].event_id, b[0].event_id);
        let ids: std::collections::HashSet<Uuid> = a.iter().chain(&b).map(|e| e.event_id).collect();
        assert_eq!(ids.len(), 10);
    }

    #[test]
    fn a_scenario_interleaves_requests_and_keeps_each_in_order() {
        let mut scenario = Scenario::new("T1", start());
        scenario.requests = 5;
        scenario.steps = 4;
        scenario.first_request_id = 100;
        let events = scenario.events();
        assert_eq!(events.len(), 20);
        assert_eq!(
            events[..5].iter().map(|e| e.request.id).collect::<Vec<_>>(),
            [100, 101, 102, 103, 104]
        );
        let mut last_version = BTreeMap::new();
        for event in &events {
            let previous = last_version
                .insert(event.request.id, event.request.version)
                .unwrap_or(0);
            assert_eq!(event.request.version, previous + 1);
        }
        // Round-robin personas: request 104 gets the first persona again.
        assert_eq!(
            events[4].request.requestor.email,
            scenario.personas[0].email
        );
        assert_eq!(events, scenario.events());
        scenario.seed = 9;
        assert_ne!(events, scenario.events());
    }

    #[test]
    fn emitted_events_never_happen_in_the_future() {
        let now = Utc::now();
        let args = <EmitArgs as clap::FromArgMatches>::from_arg_matches(
            &<EmitArgs as clap::Args>::augment_args(clap::Command::new("emit"))
                .get_matches_from(["emit"]),
        )
        .unwrap();
        let naive = args.scenario(now).events();
        assert!(
            naive.iter().any(|e| e.occurred_at > now),
            "the case being fixed"
        );
        let events = args.scenario(now).events_until(now);
        assert_eq!(events.len(), naive.len());
        for event in &events {
            let r = &event.request;
            assert!(event.occurred_at <= now, "{} > {now}", event.occurred_at);
            assert!(
                r.created_at >= now,
                "starts at now: no request predates a connect"
            );
            assert!(r.created_at <= r.updated_at && r.updated_at <= now);
            assert!(r.closed_at.is_none_or(|at| at <= now));
            assert!(
                r.customer_thread
                    .iter()
                    .chain(&r.internal_thread)
                    .all(|m| m.ts <= now)
            );
            thena_events::parse_value(serde_json::to_value(event).unwrap(), &Limits::default())
                .expect("still a valid event");
        }
        // A scenario entirely in the past stays as it is.
        let past = args.scenario(start()).events_until(now);
        assert_eq!(past, args.scenario(start()).events());
    }

    #[test]
    fn a_scenario_raises_valid_requests_from_every_channel() {
        let mut scenario = Scenario::new("T1", start());
        scenario.requests = 12;
        let events = scenario.events();
        let mut seen = std::collections::BTreeSet::new();
        for event in &events {
            let value = serde_json::to_value(event).unwrap();
            assert_eq!(&parse_value(value, &Limits::default()).unwrap(), event);
            let r = &event.request;
            assert_eq!(r.source, scenario.source_of(r.id - 1));
            seen.insert(r.source);
            let link = r.permalink.as_deref().unwrap_or_default();
            match r.source {
                Source::Slack => assert!(link.contains(".slack.com/"), "{link}"),
                Source::Email => {
                    assert!(link.starts_with("mid:"), "{link}");
                    assert!(r.requestor.email.is_some());
                    let first = &r.customer_thread[0];
                    assert_eq!(first.subject.as_deref(), r.title.as_deref());
                    assert_eq!(first.author_email, r.requestor.email);
                }
                Source::MsTeams => {
                    assert!(link.starts_with("https://teams.microsoft.com/"), "{link}")
                }
                Source::Web => assert!(r.permalink.is_none()),
            }
            assert_eq!(
                r.requestor_channel_id().is_some(),
                r.source != Source::Email,
                "{:?}",
                r.source
            );
        }
        assert_eq!(seen.len(), 4, "{seen:?}");
    }

    #[test]
    fn every_persona_writes_from_several_channels_but_never_by_email_without_an_address() {
        let mut scenario = Scenario::new("T1", start());
        scenario.requests = 16;
        let personas = scenario.personas.len() as u64;
        for (p, persona) in scenario.personas.iter().enumerate() {
            let sources: std::collections::BTreeSet<Source> = (0..scenario.requests)
                .filter(|i| i % personas == p as u64)
                .map(|i| scenario.source_of(i))
                .collect();
            assert!(sources.len() >= 3, "{persona}: {sources:?}");
            assert_eq!(
                sources.contains(&Source::Email),
                persona.email.is_some(),
                "{persona}"
            );
        }
        scenario.sources = vec![Source::Email];
        let anonymous = scenario
            .personas
            .iter()
            .position(|p| p.email.is_none())
            .unwrap();
        assert_eq!(scenario.source_of(anonymous as u64), Source::Slack);
        assert_eq!(scenario.source_of(0), Source::Email);
    }

    #[test]
    fn an_email_reply_quotes_the_message_before_it() {
        let mut scenario = Scenario::new("T1", start());
        scenario.sources = vec![Source::Email];
        scenario.requests = 1;
        scenario.steps = 6;
        let last = scenario.events().pop().unwrap();
        let reply = last.request.customer_thread.last().unwrap();
        assert!(reply.subject.as_deref().unwrap().starts_with("Re: "));
        assert!(reply.text.contains(" wrote:\n> "), "{}", reply.text);
        assert_eq!(
            reply
                .author_email
                .as_deref()
                .map(|e| e.ends_with("@support.thena.ai")),
            Some(true)
        );
    }

    #[test]
    fn sources_parse_as_the_contract_spells_them() {
        assert_eq!(parse_source("ms_teams"), Ok(Source::MsTeams));
        let err = parse_source("teams").unwrap_err();
        assert!(err.contains("slack, email, web, ms_teams"), "{err}");
    }

    #[test]
    fn personas_parse_from_the_command_line_form() {
        assert_eq!(
            "Harsh Patel <harsh@acme.com>".parse::<Persona>(),
            Ok(Persona::new("Harsh Patel", Some("harsh@acme.com")))
        );
        assert_eq!(
            "No Mail".parse::<Persona>(),
            Ok(Persona::new("No Mail", None))
        );
        assert!("Bad <nope>".parse::<Persona>().is_err());
        assert!("<a@b.c>".parse::<Persona>().is_err());
        assert!("Open <a@b.c".parse::<Persona>().is_err());
        let persona = Persona::new("Harsh", Some("h@a.io"));
        assert_eq!(persona.to_string().parse::<Persona>(), Ok(persona));
    }

    #[test]
    fn pacing_spreads_events_evenly() {
        assert_eq!(send_offset(0, 100), Duration::ZERO);
        assert_eq!(send_offset(50, 100), Duration::from_millis(500));
        assert_eq!(send_offset(3, 2), Duration::from_millis(1500));
        assert_eq!(send_offset(1_000_000, 0), Duration::ZERO);
    }

    #[test]
    fn answers_are_classified_per_event() {
        let report = |status, body: Value| classify(status, Some(&body), 10).unwrap();
        assert_eq!(report(202, Value::Null).accepted, 10);
        assert_eq!(report(400, Value::Null).rejected, 10);
        assert_eq!(report(413, Value::Null).rejected, 10);
        let partial = report(503, serde_json::json!({"accepted": 4}));
        assert_eq!((partial.accepted, partial.unavailable), (4, 6));
        assert_eq!(classify(503, None, 3).unwrap().unavailable, 3);
        assert_eq!(report(502, Value::Null).unavailable, 10);
        assert!(matches!(
            classify(401, None, 1),
            Err(EmitError::Unauthorized(401))
        ));
        assert!(matches!(
            classify(403, None, 1),
            Err(EmitError::Unauthorized(403))
        ));
    }
}
