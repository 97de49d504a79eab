//! Pure mapping of one Thena request snapshot onto the traits of its "Thena Requests"
//! instance. No I/O: the field map (label → path and type, as Vitally returned it) is
//! passed in, so the same event always yields the same instance body.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};
use thena_events::{Request, RequestChanged, Source, ThreadMessage};

use crate::traits::{FieldType, label, own_traits};

/// Appended to every textarea value that was cut at the configured limit.
pub const TRUNCATION_MARKER: &str = "… (truncated)";

/// Default textarea limit in characters; Vitally does not publish one.
pub const DEFAULT_TEXTAREA_LIMIT: usize = 10_000;

/// Where Vitally stores one trait: the `path` it returned for the field, and its type.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct FieldRef {
    pub path: String,
    pub field_type: FieldType,
}

/// Field label → where to write it, as listed by Vitally for the custom object.
pub type FieldMap = BTreeMap<String, FieldRef>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappingOptions {
    /// Maximum characters of a textarea value before the truncation marker.
    pub textarea_limit: usize,
}

impl Default for MappingOptions {
    fn default() -> Self {
        Self {
            textarea_limit: DEFAULT_TEXTAREA_LIMIT,
        }
    }
}

/// The instance body for one event, plus what could not be mapped (for counting).
#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    /// "Thena Request ID: {id}".
    pub name: String,
    /// `thena:{workspace}:{id}`.
    pub external_id: String,
    /// Keyed by the field path Vitally returned, never by the label. `null` clears.
    pub traits: Map<String, Value>,
    /// Custom categories with no matching field (product doc: dropped).
    pub dropped_categories: Vec<String>,
    /// Fixed trait labels the field map lacks (provisioning drifted, or an integration
    /// connected before an extra trait existed and not reconnected since).
    pub missing_fixed: Vec<&'static str>,
    /// Labels whose Vitally field has a type the value cannot be written as (e.g. a
    /// category matched a number field); skipped so one bad field does not make Vitally
    /// reject the whole instance.
    pub mistyped: Vec<String>,
}

/// Maps `event` onto the fields in `fields`. Every fixed trait present in the map is
/// written (absent values as `null`, since the event is a full snapshot), and so is every
/// category field: a category absent from the snapshot is cleared with `null`.
pub fn map_instance(event: &RequestChanged, fields: &FieldMap, opts: &MappingOptions) -> Mapped {
    let mut traits = Map::new();
    let mut missing_fixed = Vec::new();
    let mut mistyped = Vec::new();

    for (fixed_label, canonical) in own_traits() {
        let Some(field) = lookup(fields, fixed_label) else {
            missing_fixed.push(fixed_label);
            continue;
        };
        let value = fixed_value(event, fixed_label, opts);
        match coerce(value, canonical, field.field_type) {
            Some(v) => {
                traits.insert(field.path.clone(), v);
            }
            None => mistyped.push(fixed_label.to_string()),
        }
    }

    let (categories, dropped_categories) = match_categories(event, fields);
    for (category, field) in categories {
        let value = Value::String(event.request.custom_fields[category].clone());
        match coerce(value, FieldType::String, field.field_type) {
            Some(v) => {
                traits.insert(field.path.clone(), v);
            }
            None => mistyped.push(category.clone()),
        }
    }
    // The snapshot lists every category the request has: a category field it does not
    // mention was removed from the request (or never set), so its old value is cleared.
    for field in owned_category_fields(fields) {
        traits.entry(field.path.clone()).or_insert(Value::Null);
    }

    Mapped {
        name: format!("Thena Request ID: {}", event.request.id),
        external_id: event.external_id(),
        traits,
        dropped_categories,
        missing_fixed,
        mistyped,
    }
}

/// The field for `label`: exact label first, else a case-insensitive match (an adopted
/// object may have been created by hand).
fn lookup<'a>(fields: &'a FieldMap, label: &str) -> Option<&'a FieldRef> {
    fields.get(label).or_else(|| {
        let lower = label.to_lowercase();
        fields
            .iter()
            .find(|(l, _)| l.to_lowercase() == lower)
            .map(|(_, f)| f)
    })
}

fn is_fixed_label(l: &str) -> bool {
    let lower = l.to_lowercase();
    own_traits().any(|(f, _)| f.to_lowercase() == lower)
}

/// The object's fields that hold custom categories: every field that is not a fixed
/// trait and can hold a category's text (the object is ours, and a category's field is
/// labelled like the category; a number or datetime field never receives one).
fn owned_category_fields(fields: &FieldMap) -> impl Iterator<Item = &FieldRef> {
    fields
        .iter()
        .filter(|(l, f)| {
            !is_fixed_label(l) && matches!(f.field_type, FieldType::String | FieldType::Textarea)
        })
        .map(|(_, f)| f)
}

/// Pairs each custom category with its field; exact labels win over case-insensitive
/// ones so two categories never fight over one field. Fixed-trait fields are never a
/// category's target. Returns (matched, dropped).
fn match_categories<'a>(
    event: &'a RequestChanged,
    fields: &'a FieldMap,
) -> (Vec<(&'a String, &'a FieldRef)>, Vec<String>) {
    let custom = &event.request.custom_fields;
    let mut matched: Vec<(&String, &FieldRef)> = Vec::new();
    let mut claimed: BTreeSet<&str> = BTreeSet::new();
    let mut pending: Vec<&String> = Vec::new();

    for category in custom.keys() {
        match fields.get_key_value(category.as_str()) {
            Some((l, f)) if !is_fixed_label(l) => {
                claimed.insert(l.as_str());
                matched.push((category, f));
            }
            _ => pending.push(category),
        }
    }
    let mut dropped = Vec::new();
    for category in pending {
        let lower = category.to_lowercase();
        let hit = fields.iter().find(|(l, _)| {
            !claimed.contains(l.as_str()) && !is_fixed_label(l) && l.to_lowercase() == lower
        });
        match hit {
            Some((l, f)) => {
                claimed.insert(l.as_str());
                matched.push((category, f));
            }
            None => dropped.push(category.clone()),
        }
    }
    (matched, dropped)
}

fn fixed_value(event: &RequestChanged, fixed_label: &str, opts: &MappingOptions) -> Value {
    let r = &event.request;
    let limit = opts.textarea_limit;
    let text = |v: &Option<String>| opt_string(v.as_deref().map(|s| truncate(s, limit)));
    let plain = |v: &Option<String>| opt_string(v.clone());
    match fixed_label {
        label::AI_TAGS => opt_string((!r.ai_tags.is_empty()).then(|| r.ai_tags.join(", "))),
        label::ASSIGNED_TO => plain(&r.assigned_to),
        label::CSAT => text(&r.csat),
        label::CUSTOMER_THREAD => opt_string(render_thread_within(&customer_thread(r), limit)),
        label::INTERNAL_THREAD => opt_string(render_thread_within(&r.internal_thread, limit)),
        label::MESSAGE_TEXT => text(&r.message_text),
        label::PERMALINK => opt_string(permalink(r)),
        label::CLOSED_AT => opt_string(r.closed_at.as_ref().map(datetime)),
        label::CLOSED_BY => plain(&r.closed_by),
        label::CREATED_AT => Value::String(datetime(&r.created_at)),
        label::NOTIFICATION_LINK => plain(&r.internal_notification_link),
        label::REQUESTOR => opt_string(requestor(&r.requestor)),
        label::UPDATED_AT => Value::String(datetime(&r.updated_at)),
        label::WEB_LINK => plain(&r.web_link),
        label::SENTIMENT => plain(&r.sentiment),
        label::STATUS => plain(&r.status),
        label::SUMMARY => text(&r.summary),
        label::REQUEST_ID => Value::from(r.id),
        label::TITLE => text(&r.title),
        label::URGENCY => plain(&r.urgency),
        label::SOURCE => Value::String(r.source.label().to_owned()),
        // own_traits() and this match list the same labels; a new label without a
        // value is a programming error that the full-event test catches as `null`.
        _ => Value::Null,
    }
}

fn opt_string(v: Option<String>) -> Value {
    v.map_or(Value::Null, Value::String)
}

/// Writes a value of type `canonical` into a field of type `target`, when lossless.
fn coerce(value: Value, canonical: FieldType, target: FieldType) -> Option<Value> {
    if value.is_null() || canonical == target {
        return Some(value);
    }
    match (canonical, target) {
        // Anything can be shown as text.
        (_, FieldType::String | FieldType::Textarea) => Some(match value {
            Value::String(s) => Value::String(s),
            other => Value::String(other.to_string()),
        }),
        (_, FieldType::Number | FieldType::Datetime) => None,
    }
}

/// RFC 3339 in UTC with the precision Thena sent: no fraction for whole seconds, else
/// milliseconds, microseconds or nanoseconds as needed (never cut to seconds).
fn datetime(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// "name <email>", or whichever of the two exists.
fn requestor(r: &thena_events::Requestor) -> Option<String> {
    let name = r.name.as_deref().map(str::trim).filter(|s| !s.is_empty());
    let email = r.email.as_deref().map(str::trim).filter(|s| !s.is_empty());
    match (name, email) {
        (Some(n), Some(e)) => Some(format!("{n} <{e}>")),
        (Some(n), None) => Some(n.to_string()),
        (None, Some(e)) => Some(e.to_string()),
        (None, None) => None,
    }
}

/// The Permalink trait: the link to the message that started the request, in the request's
/// own channel (Slack permalink, Teams message link, an email's `mid:` URI, the web page),
/// or nothing. A Slack link on a request from another channel is Thena's Slack copy of
/// it, not the channel's own: it is not written (the triage copy has a trait of its own,
/// Request Internal Notification Link).
fn permalink(request: &Request) -> Option<String> {
    let link = request.permalink.as_deref().map(str::trim)?;
    let own = match request.source {
        Source::Slack => true,
        Source::Email | Source::Web | Source::MsTeams => !is_slack_link(link),
    };
    (own && !link.is_empty()).then(|| link.to_owned())
}

fn is_slack_link(link: &str) -> bool {
    reqwest::Url::parse(link).is_ok_and(|url| {
        url.host_str()
            .is_some_and(|host| host == "slack.com" || host.ends_with(".slack.com"))
    })
}

/// The customer thread as rendered. Email replies usually carry the whole earlier
/// exchange as quoted text (`> …` under an "On …, X wrote:" line); every earlier message
/// is in the thread already, so the quote is left out and the limit keeps more messages.
fn customer_thread(request: &Request) -> Cow<'_, [ThreadMessage]> {
    match request.source {
        Source::Email => Cow::Owned(
            request
                .customer_thread
                .iter()
                .map(|m| ThreadMessage {
                    text: without_quoted_reply(&m.text),
                    ..m.clone()
                })
                .collect(),
        ),
        Source::Slack | Source::Web | Source::MsTeams => Cow::Borrowed(&request.customer_thread),
    }
}

/// `text` without its quoted lines (`>`) and the "… wrote:" line that introduces them; the
/// whole text if that would leave nothing (a forward is all quote).
fn without_quoted_reply(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let quoted = |line: &str| line.trim_start().starts_with('>');
    let kept: Vec<&str> = lines
        .iter()
        .enumerate()
        .filter(|(i, line)| {
            let introduces_quote = line.trim_end().ends_with("wrote:")
                && lines[i + 1..]
                    .iter()
                    .find(|l| !l.trim().is_empty())
                    .is_some_and(|l| quoted(l));
            !quoted(line) && !introduces_quote
        })
        .map(|(_, line)| *line)
        .collect();
    if kept.iter().all(|line| line.trim().is_empty()) {
        text.to_owned()
    } else {
        kept.join("\n")
    }
}

/// One message per line, oldest first so the newest is last: "author (ts): text" — with
/// the address, "author <email> (ts): …"; with a subject that differs from the previous
/// message's (ignoring "Re:"/"Fwd:"), "…: subject — text". Line breaks inside a message are
/// indented and blank lines dropped, so every unindented line starts a message.
pub fn render_thread(messages: &[ThreadMessage]) -> Option<String> {
    let lines = thread_lines(messages);
    (!lines.is_empty()).then(|| lines.join("\n"))
}

fn thread_lines(messages: &[ThreadMessage]) -> Vec<String> {
    let mut sorted: Vec<&ThreadMessage> = messages.iter().collect();
    // Stable: messages with the same timestamp keep their order.
    sorted.sort_by_key(|m| m.ts);
    let mut topic: Option<String> = None;
    sorted
        .iter()
        .map(|m| {
            let mut line = m.author.clone();
            if let Some(email) = m.author_email.as_deref() {
                line.push_str(&format!(" <{email}>"));
            }
            line.push_str(&format!(" ({}): ", datetime(&m.ts)));
            let subject = m
                .subject
                .as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty());
            if let Some(subject) = subject {
                let this = subject_topic(subject);
                if topic.as_deref() != Some(this.as_str()) {
                    line.push_str(subject);
                    line.push_str(" — ");
                }
                topic = Some(this);
            }
            let body: Vec<&str> = m.text.lines().filter(|l| !l.trim().is_empty()).collect();
            line.push_str(&body.join("\n  "));
            line
        })
        .collect()
}

/// A subject without its reply and forward prefixes, lower-cased: "RE: Fwd: Login" → "login".
fn subject_topic(subject: &str) -> String {
    let mut rest = subject.trim();
    loop {
        let lower = rest.to_ascii_lowercase();
        let Some(prefix) = ["re:", "fw:", "fwd:", "aw:", "sv:", "wg:"]
            .iter()
            .find(|p| lower.starts_with(*p))
        else {
            return rest.to_lowercase();
        };
        rest = rest[prefix.len()..].trim_start();
    }
}

/// The first line of a thread that lost its `n` oldest messages to the limit.
pub fn earlier_marker(n: usize) -> String {
    if n == 1 {
        "… 1 earlier message".to_string()
    } else {
        format!("… {n} earlier messages")
    }
}

/// The thread as `render_thread` shows it, within `limit` characters: when it is longer,
/// the newest messages that fit are kept (a CSM needs the latest replies), after a first
/// line `… N earlier messages`. If not even the newest message fits, it is cut at the
/// limit with the truncation marker, so the result never exceeds `limit` + marker.
pub fn render_thread_within(messages: &[ThreadMessage], limit: usize) -> Option<String> {
    let lines = thread_lines(messages);
    let full = lines.join("\n");
    if lines.is_empty() || full.chars().count() <= limit {
        return (!lines.is_empty()).then_some(full);
    }
    let total = lines.len();
    // The most newest lines that fit after the marker (sizes in characters).
    let mut kept_chars = 0;
    let mut best = None;
    for (k, line) in lines.iter().rev().enumerate() {
        let kept = k + 1;
        kept_chars += line.chars().count() + 1; // the line and the break before it
        if kept < total && earlier_marker(total - kept).chars().count() + kept_chars <= limit {
            best = Some(kept);
        }
    }
    Some(match best {
        Some(kept) => {
            let mut out = earlier_marker(total - kept);
            for line in &lines[total - kept..] {
                out.push('\n');
                out.push_str(line);
            }
            out
        }
        // A single message too long on its own: its beginning.
        None if total == 1 => truncate(&lines[0], limit),
        None => truncate(
            &format!("{}\n{}", earlier_marker(total - 1), lines[total - 1]),
            limit,
        ),
    })
}

/// Cuts `s` to at most `limit` characters (on a char boundary) and appends the marker
/// when anything was cut, so the result never exceeds `limit` + marker characters.
pub fn truncate(s: &str, limit: usize) -> String {
    match s.char_indices().nth(limit) {
        None => s.to_string(),
        Some((cut, _)) => {
            let mut out = String::with_capacity(cut + TRUNCATION_MARKER.len());
            out.push_str(&s[..cut]);
            out.push_str(TRUNCATION_MARKER);
            out
        }
    }
}
