//! `validate_value` over JSON values the fuzzer builds: small JSON trees, and edits of the
//! valid sample event (most interesting bugs live next to valid input).
//!
//! Properties: never panics; deterministic; no problems exactly when the value becomes an
//! event (`parse_value` only fails on a bug in the walk); an accepted value survives a
//! round trip through bytes; `parse_event` on the value's bytes agrees with `validate_value`.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Number, Value};
use thena_events::{Limits, decode_event, parse_event, parse_value, sample, validate_value};

/// Field names the validator knows, so edits hit real fields instead of unknown ones.
const KEYS: &[&str] = &[
    "schema",
    "event_id",
    "workspace_id",
    "occurred_at",
    "change",
    "request",
    "id",
    "version",
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
    "name",
    "email",
    "slack_user_id",
    "external_id",
    "source",
    "author",
    "text",
    "ts",
    "author_email",
    "subject",
    "",
    " ",
];

/// Values near the validator's boundaries.
const TEXTS: &[&str] = &[
    "thena.request.changed/v1",
    "thena.request.changed/v2",
    "slack",
    "email",
    "web",
    "ms_teams",
    "mid:CAF=1@mail.thena.ai",
    "mid:<a@b>",
    "created",
    "metadata",
    "thread",
    "Thread",
    "0193c6e2-0000-7000-8000-000000000001",
    "0193c6e2-0000-7000-8000-00000000000",
    "T024BE7LD",
    "T 1",
    "Ť1",
    "2026-11-25T10:00:00Z",
    "2026-11-25T10:00:00+01:00",
    "2026-11-25T10:00:00.123456789-14:00",
    "2026-11-25 10:00:00Z",
    "2026-11-25T10:00:00",
    "2016-12-31T23:59:60Z",
    "0000-01-01T00:00:00+01:00",
    "0000-01-01T00:00:00Z",
    "9999-12-31T23:59:59Z",
    "9999-12-31T23:59:59-01:00",
    "harsh@thena.ai",
    "HARSH@Thena.AI",
    "a@b",
    "a@.b",
    "a@b.",
    "@b.c",
    "a@b@c.d",
    "a b@c.d",
    "https://app.thena.ai/requests/1",
    "http://x",
    "ftp://x",
    "",
    " ",
    "é",
];

#[derive(Arbitrary, Debug)]
enum Text {
    Known(u8),
    Other(String),
    /// A run of one character exactly at or just past a length limit.
    AtLimit(char, u8),
}

/// Both sides of every text limit, default and tight: long runs only where they matter,
/// since building and checking them is what makes an execution slow.
const LENGTHS: &[usize] = &[12, 13, 40, 41, 254, 255, 2_000, 2_001, 100_000, 100_001];

impl Text {
    fn build(&self) -> String {
        match self {
            Text::Known(i) => TEXTS[usize::from(*i) % TEXTS.len()].to_owned(),
            Text::Other(s) => s.clone(),
            Text::AtLimit(c, i) => {
                std::iter::repeat_n(*c, LENGTHS[usize::from(*i) % LENGTHS.len()]).collect()
            }
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Key {
    Known(u8),
    Other(String),
}

impl Key {
    fn build(&self) -> String {
        match self {
            Key::Known(i) => KEYS[usize::from(*i) % KEYS.len()].to_owned(),
            Key::Other(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Json {
    Null,
    Bool(bool),
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    Str(Text),
    Array(Vec<Json>),
    Object(Vec<(Key, Json)>),
    /// A copy of a part of the sample event (a valid thread message, requestor, ...).
    SamplePart(Vec<u8>),
}

/// Deep enough for every level of the event; keeps recursion bounded.
const MAX_DEPTH: usize = 6;

impl Json {
    fn build(&self, sample: &Value, depth: usize) -> Value {
        if depth > MAX_DEPTH {
            return Value::Null;
        }
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Unsigned(n) => Value::from(*n),
            Json::Signed(n) => Value::from(*n),
            Json::Float(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Json::Str(t) => Value::String(t.build()),
            Json::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|item| item.build(sample, depth + 1))
                    .collect(),
            ),
            Json::Object(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, v)| (k.build(), v.build(sample, depth + 1)))
                    .collect::<Map<_, _>>(),
            ),
            Json::SamplePart(path) => walk(sample, path).clone(),
        }
    }
}

/// Follows `path` into `value`: each step picks a child by index modulo the child count.
fn walk<'v>(mut value: &'v Value, path: &[u8]) -> &'v Value {
    for step in path {
        let next = match value {
            Value::Object(map) if !map.is_empty() => {
                map.values().nth(usize::from(*step) % map.len())
            }
            Value::Array(items) if !items.is_empty() => items.get(usize::from(*step) % items.len()),
            _ => None,
        };
        match next {
            Some(child) => value = child,
            None => break,
        }
    }
    value
}

fn walk_mut<'v>(mut value: &'v mut Value, path: &[u8]) -> &'v mut Value {
    for step in path {
        let len = match &*value {
            Value::Object(map) => map.len(),
            Value::Array(items) => items.len(),
            _ => 0,
        };
        if len == 0 {
            break;
        }
        let i = usize::from(*step) % len;
        value = match value {
            Value::Object(map) => map.values_mut().nth(i).expect("index below len"),
            Value::Array(items) => &mut items[i],
            _ => unreachable!("len is 0 for scalars"),
        };
    }
    value
}

#[derive(Arbitrary, Debug)]
enum Action {
    Replace(Json),
    /// Removes the `step`-th field or element of the container at the path.
    Remove(u8),
    /// Sets a field of the object (or appends to the array) at the path.
    Insert(Key, Json),
}

#[derive(Arbitrary, Debug)]
struct Edit {
    path: Vec<u8>,
    action: Action,
}

#[derive(Arbitrary, Debug)]
enum Input {
    /// A value built from scratch.
    Tree(Json),
    /// The valid sample event with a few edits.
    Edited(Vec<Edit>),
}

fn apply(root: &mut Value, edit: &Edit, sample: &Value) {
    let target = walk_mut(root, &edit.path);
    match &edit.action {
        Action::Replace(json) => *target = json.build(sample, 0),
        Action::Remove(step) => match target {
            Value::Object(map) if !map.is_empty() => {
                let key = map
                    .keys()
                    .nth(usize::from(*step) % map.len())
                    .cloned()
                    .expect("index below len");
                map.remove(&key);
            }
            Value::Array(items) if !items.is_empty() => {
                items.remove(usize::from(*step) % items.len());
            }
            _ => {}
        },
        Action::Insert(key, json) => match target {
            Value::Object(map) => {
                map.insert(key.build(), json.build(sample, 0));
            }
            Value::Array(items) => items.push(json.build(sample, 0)),
            _ => {}
        },
    }
}

/// Small limits, so a short input can cross every limit.
const TIGHT: Limits = Limits {
    short_text: 12,
    long_text: 40,
    thread_messages: 2,
    custom_fields: 1,
    ai_tags: 2,
};

fn check(value: &Value, limits: &Limits) {
    let problems = validate_value(value, limits);
    assert_eq!(
        problems,
        validate_value(&value.clone(), limits),
        "validate_value is not deterministic"
    );
    for problem in &problems {
        // The path may be empty: an unknown field named "" at the top level is at "".
        assert!(!problem.message.is_empty(), "{problem:?}");
    }

    let bytes = serde_json::to_vec(value).expect("a Value serializes");
    let from_bytes = parse_event(&bytes, limits);
    assert_eq!(
        from_bytes.is_ok(),
        problems.is_empty(),
        "parse_event on the bytes disagrees with validate_value: {problems:?} vs {from_bytes:?}"
    );

    match parse_value(value.clone(), limits) {
        Ok(event) => {
            assert!(problems.is_empty());
            let json = serde_json::to_vec(&event).expect("an event serializes");
            match parse_event(&json, limits) {
                Ok(again) => assert_eq!(again, event, "round trip changed the event"),
                Err(e) => panic!(
                    "an accepted event, serialized, is rejected: {e}\n{}",
                    String::from_utf8_lossy(&json)
                ),
            }
            match decode_event(&json) {
                Ok(again) => assert_eq!(again, event, "decode after round trip changed it"),
                Err(e) => panic!("an accepted event, serialized, does not decode: {e}"),
            }
        }
        Err(e) => assert!(
            !problems.is_empty(),
            "validate_value found no problem but the value is no event: {e}"
        ),
    }
}

fuzz_target!(|input: Input| {
    let sample = serde_json::to_value(sample::full_event()).expect("the sample serializes");
    let value = match &input {
        Input::Tree(json) => json.build(&sample, 0),
        Input::Edited(edits) => {
            let mut value = sample.clone();
            for edit in edits {
                apply(&mut value, edit, &sample);
            }
            value
        }
    };
    check(&value, &Limits::default());
    check(&value, &TIGHT);
});
