use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The only schema this crate speaks.
pub const SCHEMA_V1: &str = "thena.request.changed/v1";

/// One change of one Thena request: a full snapshot, so the latest version always wins and
/// any single event is enough to rebuild the Vitally instance.
///
/// Revision 1.1 of the contract added, all optional: `request.source` (the channel the
/// request came from; absent means Slack), `request.requestor.external_id` (the
/// requestor's id in that channel) and a thread message's `subject` and `author_email`.
/// An event without them is a valid revision 1.0 event, so the schema id stays `v1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "thena.request.changed/v1")]
pub struct RequestChanged {
    /// Always `thena.request.changed/v1`.
    pub schema: String,
    /// Unique per event; assigned by the producer when absent.
    #[serde(default = "Uuid::now_v7")]
    #[schemars(skip_serializing_if = "no_schema_default")]
    pub event_id: Uuid,
    /// Slack workspace id: one workspace is one Vitally integration.
    pub workspace_id: String,
    pub occurred_at: DateTime<Utc>,
    pub change: Change,
    pub request: Request,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Created,
    Metadata,
    /// Only new thread messages; synced with the next metadata change unless the
    /// integration opted into thread sync.
    Thread,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Created => "created",
            Change::Metadata => "metadata",
            Change::Thread => "thread",
        }
    }
}

/// The channel a customer raised a request in (the product doc's "Slack, Email, Web, and
/// Microsoft Teams"): `web` is a form or chat on the customer's web portal.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    // Every event from before contract revision 1.1.
    #[default]
    Slack,
    Email,
    Web,
    MsTeams,
}

impl Source {
    pub const ALL: [Source; 4] = [Source::Slack, Source::Email, Source::Web, Source::MsTeams];

    /// As the contract spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Slack => "slack",
            Source::Email => "email",
            Source::Web => "web",
            Source::MsTeams => "ms_teams",
        }
    }

    /// As a person reads it (the product doc's names).
    pub fn label(self) -> &'static str {
        match self {
            Source::Slack => "Slack",
            Source::Email => "Email",
            Source::Web => "Web",
            Source::MsTeams => "Microsoft Teams",
        }
    }

    pub fn parse(s: &str) -> Option<Source> {
        Source::ALL.into_iter().find(|source| source.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Request {
    /// Thena request id (the "Thena Request Id" number trait).
    pub id: u64,
    /// Monotonic per request; an event older than the last applied one is skipped.
    pub version: u64,
    /// Where the customer raised the request; absent in events from before contract
    /// revision 1.1, which are all Slack requests.
    #[serde(default)]
    pub source: Source,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub summary: Option<String>,
    #[serde(default)]
    pub message_text: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub urgency: Option<String>,
    #[serde(default)]
    pub sentiment: Option<String>,
    #[serde(default)]
    pub ai_tags: Vec<String>,
    #[serde(default)]
    pub assigned_to: Option<String>,
    #[serde(default)]
    pub csat: Option<String>,
    #[serde(default)]
    pub customer_thread: Vec<ThreadMessage>,
    #[serde(default)]
    pub internal_thread: Vec<ThreadMessage>,
    /// The message that started the request, in its channel: the Slack permalink, the
    /// Teams message link, the email's `mid:` URI (RFC 2392), the web page it was sent
    /// from.
    #[serde(default)]
    pub permalink: Option<String>,
    #[serde(default)]
    pub internal_notification_link: Option<String>,
    #[serde(default)]
    pub web_link: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(default)]
    pub closed_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub closed_by: Option<String>,
    pub requestor: Requestor,
    /// Custom tags and categories: category name → value.
    #[serde(default)]
    pub custom_fields: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct Requestor {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    /// Kept for compatibility: a Slack request's requestor id, the same as `external_id`.
    #[serde(default)]
    pub slack_user_id: Option<String>,
    /// The requestor's id in the request's channel (`source`): the Slack user id, the
    /// Microsoft Entra user id in Teams, the portal user id on the web. For email the
    /// address is the id, so it may be left out.
    #[serde(default)]
    pub external_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ThreadMessage {
    pub author: String,
    pub text: String,
    pub ts: DateTime<Utc>,
    /// The author's address (email, and Teams when known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author_email: Option<String>,
    /// An email's subject, or a Teams channel post's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

impl ThreadMessage {
    /// A message with only an author, a text and a time, as Slack has them.
    pub fn new(author: impl Into<String>, text: impl Into<String>, ts: DateTime<Utc>) -> Self {
        Self {
            author: author.into(),
            text: text.into(),
            ts,
            author_email: None,
            subject: None,
        }
    }
}

/// A generated id is no default: keep it out of the JSON Schema, which must be stable.
fn no_schema_default(_: &Uuid) -> bool {
    true
}

impl RequestChanged {
    /// The Vitally instance's externalId: stable per workspace and request.
    pub fn external_id(&self) -> String {
        format!("thena:{}:{}", self.workspace_id, self.request.id)
    }
}

impl Request {
    /// The requestor's own id in the request's channel, if the event carries one. Email
    /// has none apart from the address.
    pub fn requestor_channel_id(&self) -> Option<&str> {
        let requestor = &self.requestor;
        let id = match self.source {
            Source::Slack => requestor
                .external_id
                .as_deref()
                .or(requestor.slack_user_id.as_deref()),
            Source::Web | Source::MsTeams => requestor.external_id.as_deref(),
            Source::Email => None,
        };
        id.map(str::trim).filter(|id| !id.is_empty())
    }
}

impl Requestor {
    /// The email, trimmed and lower-cased, if one was shared.
    pub fn normalized_email(&self) -> Option<String> {
        self.email
            .as_deref()
            .map(|e| e.trim().to_ascii_lowercase())
            .filter(|e| !e.is_empty())
    }

    /// Lower-cased email domain, if there is a usable email.
    pub fn email_domain(&self) -> Option<String> {
        let email = self.email.as_deref()?.trim();
        let (_, domain) = email.rsplit_once('@')?;
        (!domain.is_empty()).then(|| domain.to_ascii_lowercase())
    }
}
