//! Strict validation of an incoming event: every problem, each with its field path, so a
//! sender can fix a bad event in one round trip. serde alone stops at the first error.

use std::fmt;

use chrono::{DateTime, Datelike};
use serde_json::{Map, Value};

use crate::model::{RequestChanged, SCHEMA_V1, Source};

/// One thing wrong with an event.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// Dotted path of the offending field, e.g. `request.requestor.email`; `$` for the whole body.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in one event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid event: {}", self.problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct ValidationError {
    pub problems: Vec<Problem>,
}

/// Size limits; Vitally does not publish its own, so these keep one event reasonable.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub short_text: usize,
    pub long_text: usize,
    pub thread_messages: usize,
    pub custom_fields: usize,
    pub ai_tags: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            short_text: 2_000,
            long_text: 100_000,
            thread_messages: 2_000,
            custom_fields: 200,
            ai_tags: 100,
        }
    }
}

const TOP_FIELDS: &[&str] = &[
    "schema",
    "event_id",
    "workspace_id",
    "occurred_at",
    "change",
    "request",
];
const REQUEST_FIELDS: &[&str] = &[
    "id",
    "version",
    "source",
    "title",
    "summary",
    "message_text",
    "status",
    "urgency",
    "sentiment",
    "ai_tags",
    "assigned_to",
    "csat",
    "customer_thread",
    "internal_thread",
    "permalink",
    "internal_notification_link",
    "web_link",
    "created_at",
    "updated_at",
    "closed_at",
    "closed_by",
    "requestor",
    "custom_fields",
];
const REQUESTOR_FIELDS: &[&str] = &["name", "email", "slack_user_id", "external_id"];
/// The path of the requestor's id in their channel.
const ID: &str = "request.requestor.external_id";
const THREAD_FIELDS: &[&str] = &["author", "text", "ts", "author_email", "subject"];
const SHORT_STRINGS: &[&str] = &[
    "status",
    "urgency",
    "sentiment",
    "assigned_to",
    "csat",
    "closed_by",
    "title",
];
const LONG_STRINGS: &[&str] = &["summary", "message_text"];
const LINKS: &[&str] = &["permalink", "internal_notification_link", "web_link"];

/// Parses and strictly validates one event from raw bytes.
pub fn parse_event(bytes: &[u8], limits: &Limits) -> Result<RequestChanged, ValidationError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| ValidationError {
        problems: vec![Problem {
            path: "$".into(),
            message: format!("not valid JSON: {e}"),
        }],
    })?;
    parse_value(value, limits)
}

/// Validates an already parsed JSON value and turns it into an event.
pub fn parse_value(value: Value, limits: &Limits) -> Result<RequestChanged, ValidationError> {
    let problems = validate_value(&value, limits);
    if !problems.is_empty() {
        return Err(ValidationError { problems });
    }
    // The walk above checked every field the types need, so this only fails on a bug in it.
    serde_json::from_value(value).map_err(|e| ValidationError {
        problems: vec![Problem {
            path: "$".into(),
            message: e.to_string(),
        }],
    })
}

/// Every problem with `value` as a `thena.request.changed/v1` event (empty when valid).
pub fn validate_value(value: &Value, limits: &Limits) -> Vec<Problem> {
    let mut v = Validator {
        problems: Vec::new(),
        limits,
    };
    let Some(top) = v.object("$", value) else {
        return v.problems;
    };
    v.unknown_fields("", top, TOP_FIELDS);

    match top.get("schema") {
        None => v.push("schema", "is required"),
        Some(Value::String(s)) if s == SCHEMA_V1 => {}
        Some(Value::String(s)) => v.push(
            "schema",
            format!("unknown schema {s:?}; this service accepts {SCHEMA_V1:?}"),
        ),
        Some(_) => v.push("schema", "must be a string"),
    }
    if let Some(id) = top.get("event_id") {
        match id.as_str().map(uuid::Uuid::parse_str) {
            Some(Ok(_)) => {}
            _ => v.push("event_id", "must be a UUID string when present"),
        }
    }
    v.workspace_id(top.get("workspace_id"));
    v.timestamp("occurred_at", top.get("occurred_at"), true);
    match top.get("change") {
        None => v.push("change", "is required"),
        Some(Value::String(s)) if matches!(s.as_str(), "created" | "metadata" | "thread") => {}
        Some(other) => v.push(
            "change",
            format!("must be one of \"created\", \"metadata\", \"thread\"; got {other}"),
        ),
    }
    match top.get("request") {
        None => v.push("request", "is required"),
        Some(request) => v.request(request),
    }
    v.problems
}

struct Validator<'a> {
    problems: Vec<Problem>,
    limits: &'a Limits,
}

impl Validator<'_> {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    fn object<'v>(&mut self, path: &str, value: &'v Value) -> Option<&'v Map<String, Value>> {
        let object = value.as_object();
        if object.is_none() {
            self.push(path, format!("must be an object, got {}", kind(value)));
        }
        object
    }

    fn unknown_fields(&mut self, prefix: &str, object: &Map<String, Value>, known: &[&str]) {
        for key in object.keys().filter(|k| !known.contains(&k.as_str())) {
            self.push(join(prefix, key), "unknown field");
        }
    }

    fn workspace_id(&mut self, value: Option<&Value>) {
        match value {
            None => self.push("workspace_id", "is required"),
            Some(Value::String(s)) if s.is_empty() => {
                self.push("workspace_id", "must not be empty")
            }
            Some(Value::String(s)) if s.len() > 64 => {
                self.push("workspace_id", "must be at most 64 characters")
            }
            Some(Value::String(s))
                if !s
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
            {
                self.push(
                    "workspace_id",
                    "may contain only ASCII letters, digits, '_' and '-'",
                )
            }
            Some(Value::String(_)) => {}
            Some(other) => self.push(
                "workspace_id",
                format!("must be a string, got {}", kind(other)),
            ),
        }
    }

    fn timestamp(&mut self, path: &str, value: Option<&Value>, required: bool) {
        match value {
            None | Some(Value::Null) if required => self.push(path, "is required"),
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => match DateTime::parse_from_rfc3339(s) {
                Err(_) => self.push(
                    path,
                    format!("must be an RFC 3339 timestamp with a zone, got {s:?}"),
                ),
                // Events are stored and published in UTC: an offset can push a time at the
                // edge of RFC 3339's years past them, and the published event is then no
                // longer valid (found by fuzzing, see docs/fuzzing.md).
                Ok(time) if !(0..=9999).contains(&time.naive_utc().year()) => self.push(
                    path,
                    format!("must be within the years 0000 to 9999 in UTC, got {s:?}"),
                ),
                Ok(_) => {}
            },
            Some(other) => self.push(
                path,
                format!("must be an RFC 3339 timestamp string, got {}", kind(other)),
            ),
        }
    }

    fn unsigned(&mut self, path: &str, value: Option<&Value>, positive: bool) {
        match value {
            None => self.push(path, "is required"),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(0) if positive => self.push(path, "must be a positive integer"),
                Some(_) => {}
                None => self.push(path, format!("must be a non-negative integer, got {n}")),
            },
            Some(other) => self.push(path, format!("must be an integer, got {}", kind(other))),
        }
    }

    fn optional_string(&mut self, path: &str, value: Option<&Value>, max: usize) -> Option<String> {
        match value {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => {
                let chars = s.chars().count();
                if chars > max {
                    self.push(
                        path,
                        format!("is {chars} characters long, the limit is {max}"),
                    );
                }
                Some(s.clone())
            }
            Some(other) => {
                self.push(path, format!("must be a string, got {}", kind(other)));
                None
            }
        }
    }

    fn required_string(&mut self, path: &str, value: Option<&Value>, max: usize) {
        if value.is_none_or(Value::is_null) {
            self.push(path, "is required");
        } else {
            self.optional_string(path, value, max);
        }
    }

    fn request(&mut self, value: &Value) {
        let Some(request) = self.object("request", value) else {
            return;
        };
        let limits = *self.limits;
        self.unknown_fields("request", request, REQUEST_FIELDS);
        self.unsigned("request.id", request.get("id"), true);
        self.unsigned("request.version", request.get("version"), false);
        let source = self.source(request.get("source"));
        for field in SHORT_STRINGS {
            self.optional_string(
                &format!("request.{field}"),
                request.get(*field),
                limits.short_text,
            );
        }
        for field in LONG_STRINGS {
            self.optional_string(
                &format!("request.{field}"),
                request.get(*field),
                limits.long_text,
            );
        }
        for field in LINKS {
            let path = format!("request.{field}");
            if let Some(link) = self.optional_string(&path, request.get(*field), limits.short_text)
                && !(link.starts_with("https://") || link.starts_with("http://"))
            {
                // An email's own link is its Message-ID.
                let email_permalink = *field == "permalink" && source == Some(Source::Email);
                match (email_permalink, is_mid_uri(&link)) {
                    (true, true) => {}
                    (true, false) => self.push(
                        path,
                        format!("must be an http(s) URL or a mid: URI (RFC 2392), got {link:?}"),
                    ),
                    (false, _) => self.push(path, format!("must be an http(s) URL, got {link:?}")),
                }
            }
        }
        self.timestamp("request.created_at", request.get("created_at"), true);
        self.timestamp("request.updated_at", request.get("updated_at"), true);
        self.timestamp("request.closed_at", request.get("closed_at"), false);
        self.chronology(request);
        self.ai_tags(request.get("ai_tags"));
        self.thread("request.customer_thread", request.get("customer_thread"));
        self.thread("request.internal_thread", request.get("internal_thread"));
        match request.get("requestor") {
            None => self.push("request.requestor", "is required"),
            Some(requestor) => self.requestor(requestor, source),
        }
        self.custom_fields(request.get("custom_fields"));
    }

    /// Timestamps that contradict each other point at a broken sender.
    fn chronology(&mut self, request: &Map<String, Value>) {
        let at = |key: &str| {
            request
                .get(key)
                .and_then(Value::as_str)
                .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        };
        let created = at("created_at");
        if let (Some(created), Some(updated)) = (created, at("updated_at"))
            && updated < created
        {
            self.push("request.updated_at", "is earlier than request.created_at");
        }
        if let (Some(created), Some(closed)) = (created, at("closed_at"))
            && closed < created
        {
            self.push("request.closed_at", "is earlier than request.created_at");
        }
    }

    fn ai_tags(&mut self, value: Option<&Value>) {
        // Absent means empty, but `null` is refused, as by the schema and by serde.
        let Some(value) = value else {
            return;
        };
        let Some(tags) = value.as_array() else {
            self.push(
                "request.ai_tags",
                format!("must be an array of strings, got {}", kind(value)),
            );
            return;
        };
        if tags.len() > self.limits.ai_tags {
            self.push(
                "request.ai_tags",
                format!(
                    "has {} tags, the limit is {}",
                    tags.len(),
                    self.limits.ai_tags
                ),
            );
        }
        for (i, tag) in tags.iter().enumerate() {
            self.required_string(
                &format!("request.ai_tags[{i}]"),
                Some(tag),
                self.limits.short_text,
            );
        }
    }

    fn thread(&mut self, path: &str, value: Option<&Value>) {
        // Absent means empty, but `null` is refused, as by the schema and by serde.
        let Some(value) = value else {
            return;
        };
        let Some(messages) = value.as_array() else {
            self.push(
                path,
                format!("must be an array of messages, got {}", kind(value)),
            );
            return;
        };
        if messages.len() > self.limits.thread_messages {
            self.push(
                path,
                format!(
                    "has {} messages, the limit is {}",
                    messages.len(),
                    self.limits.thread_messages
                ),
            );
        }
        for (i, message) in messages.iter().enumerate() {
            let at = format!("{path}[{i}]");
            let Some(message) = self.object(&at, message) else {
                continue;
            };
            self.unknown_fields(&at, message, THREAD_FIELDS);
            self.required_string(
                &format!("{at}.author"),
                message.get("author"),
                self.limits.short_text,
            );
            self.required_string(
                &format!("{at}.text"),
                message.get("text"),
                self.limits.long_text,
            );
            self.timestamp(&format!("{at}.ts"), message.get("ts"), true);
            self.optional_string(
                &format!("{at}.subject"),
                message.get("subject"),
                self.limits.short_text,
            );
            self.email(&format!("{at}.author_email"), message.get("author_email"));
        }
    }

    /// `request.source`; absent is Slack (a revision 1.0 event). `None` when invalid.
    fn source(&mut self, value: Option<&Value>) -> Option<Source> {
        let Some(value) = value else {
            return Some(Source::Slack);
        };
        let source = value.as_str().and_then(Source::parse);
        if source.is_none() {
            let names: Vec<String> = Source::ALL
                .iter()
                .map(|s| format!("{:?}", s.as_str()))
                .collect();
            self.push(
                "request.source",
                format!("must be one of {}; got {value}", names.join(", ")),
            );
        }
        source
    }

    fn requestor(&mut self, value: &Value, source: Option<Source>) {
        let Some(requestor) = self.object("request.requestor", value) else {
            return;
        };
        self.unknown_fields("request.requestor", requestor, REQUESTOR_FIELDS);
        let max = self.limits.short_text;
        self.optional_string("request.requestor.name", requestor.get("name"), max);
        let slack_id = self.optional_string(
            "request.requestor.slack_user_id",
            requestor.get("slack_user_id"),
            max,
        );
        let email = self.email("request.requestor.email", requestor.get("email"));
        let external_id = self.optional_string(ID, requestor.get("external_id"), max);
        if external_id
            .as_deref()
            .is_some_and(|id| id.trim().is_empty())
        {
            self.push(ID, "must not be blank");
        }
        if let Some(source) = source {
            let email_given = requestor.get("email").is_some_and(|e| !e.is_null());
            self.channel_identity(
                source,
                email_given,
                email.as_deref(),
                slack_id.as_deref(),
                external_id.as_deref().filter(|id| !id.trim().is_empty()),
            );
        }
    }

    /// An email request needs the address, and the requestor's id must not contradict
    /// the channel's own identity.
    fn channel_identity(
        &mut self,
        source: Source,
        email_given: bool,
        email: Option<&str>,
        slack_id: Option<&str>,
        external_id: Option<&str>,
    ) {
        match (source, external_id) {
            (Source::Email, _) if !email_given => self.push(
                "request.requestor.email",
                "is required for an email request (request.source \"email\")",
            ),
            (Source::Email, Some(id)) if email.is_some_and(|e| !e.eq_ignore_ascii_case(id)) => self
                .push(
                    ID,
                    "differs from request.requestor.email: an email requestor's id is the address",
                ),
            (Source::Slack, Some(id)) if slack_id.is_some_and(|s| s != id) => self.push(
                ID,
                "differs from request.requestor.slack_user_id: a Slack requestor's id is the \
                 Slack user id",
            ),
            (Source::Slack | Source::Email | Source::Web | Source::MsTeams, _) => {}
        }
    }

    /// An optional email address at `path`; the address when it is one.
    fn email(&mut self, path: &str, value: Option<&Value>) -> Option<String> {
        let email = self.optional_string(path, value, 254)?;
        match check_email(&email) {
            Ok(()) => Some(email),
            Err(why) => {
                self.push(path, format!("{why}, got {email:?}"));
                None
            }
        }
    }

    fn custom_fields(&mut self, value: Option<&Value>) {
        // Absent means empty, but `null` is refused, as by the schema and by serde.
        let Some(value) = value else {
            return;
        };
        let Some(fields) = self.object("request.custom_fields", value) else {
            return;
        };
        if fields.len() > self.limits.custom_fields {
            self.push(
                "request.custom_fields",
                format!(
                    "has {} categories, the limit is {}",
                    fields.len(),
                    self.limits.custom_fields
                ),
            );
        }
        for (name, value) in fields {
            let path = format!("request.custom_fields.{name}");
            if name.trim().is_empty() {
                self.push(path.clone(), "category name must not be empty");
            }
            self.required_string(&path, Some(value), self.limits.short_text);
        }
    }
}

/// A deliberately simple address check: what linking needs is one `@` and a domain.
fn check_email(email: &str) -> Result<(), &'static str> {
    let (local, domain) = email.split_once('@').ok_or("must be an email address")?;
    if local.is_empty() || domain.is_empty() || domain.contains('@') {
        return Err("must be an email address (local@domain)");
    }
    if email.chars().any(char::is_whitespace) {
        return Err("must not contain whitespace");
    }
    if !domain.contains('.') || domain.starts_with('.') || domain.ends_with('.') {
        return Err("must have a domain like example.com");
    }
    Ok(())
}

/// `mid:` and a Message-ID without its angle brackets (RFC 2392), e.g. `mid:abc@host`.
fn is_mid_uri(link: &str) -> bool {
    link.strip_prefix("mid:").is_some_and(|id| {
        id.contains('@')
            && !id
                .chars()
                .any(|c| c.is_whitespace() || c == '<' || c == '>')
    })
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// "a string", "an array", …: how a JSON value is named in a problem message.
pub fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
