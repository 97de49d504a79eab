use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The only schema this crate speaks.
pub const SCHEMA_V1: &str = "thena.request.changed/v1";

/// One change of one Thena request: a full snapshot, so the latest version always wins and
/// any single event is enough to rebuild the Vitally instance.
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Request {
    /// Thena request id (the "Thena Request Id" number trait).
    pub id: u64,
    /// Monotonic per request; an event older than the last applied one is skipped.
    pub version: u64,
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
    #[serde(default)]
    pub slack_user_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ThreadMessage {
    pub author: String,
    pub text: String,
    pub ts: DateTime<Utc>,
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
