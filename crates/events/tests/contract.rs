use serde_json::{Value, json};
use thena_events::{
    Limits, SCHEMA_V1, Source, decode_event, json_schema, parse_event, parse_value, sample,
};

fn valid() -> Value {
    serde_json::to_value(sample::full_event()).unwrap()
}

/// Applies `edit` to a valid event and returns the problems as "path: message" lines.
fn problems_after(edit: impl FnOnce(&mut Value)) -> Vec<String> {
    let mut event = valid();
    edit(&mut event);
    match parse_value(event, &Limits::default()) {
        Ok(_) => vec![],
        Err(e) => e.problems.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn a_full_event_round_trips_through_json_unchanged() {
    let event = sample::full_event();
    let bytes = serde_json::to_vec(&event).unwrap();
    assert_eq!(parse_event(&bytes, &Limits::default()).unwrap(), event);
    assert_eq!(decode_event(&bytes).unwrap(), event);
}

#[test]
fn a_missing_event_id_is_assigned() {
    let mut event = valid();
    event.as_object_mut().unwrap().remove("event_id");
    let a = parse_value(event.clone(), &Limits::default()).unwrap();
    let b = parse_value(event, &Limits::default()).unwrap();
    assert_ne!(a.event_id, b.event_id);
}

#[test]
fn optional_fields_may_be_absent() {
    let event = json!({
        "schema": SCHEMA_V1, "workspace_id": "T1", "occurred_at": "2026-11-25T10:00:00Z",
        "change": "created",
        "request": {"id": 1, "version": 0, "created_at": "2026-11-25T10:00:00Z",
                    "updated_at": "2026-11-25T10:00:00+01:00", "requestor": {}}
    });
    // updated_at is 09:00Z, before created_at: the only problem.
    let err = parse_value(event, &Limits::default()).unwrap_err();
    assert_eq!(err.problems.len(), 1, "{err}");
    assert_eq!(err.problems[0].path, "request.updated_at");
}

#[test]
fn each_bad_input_is_rejected_with_a_precise_message() {
    type Edit = Box<dyn FnOnce(&mut Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "missing request id",
            Box::new(|e| {
                e["request"].as_object_mut().unwrap().remove("id");
            }),
            "request.id: is required",
        ),
        (
            "zero request id",
            Box::new(|e| e["request"]["id"] = json!(0)),
            "request.id: must be a positive integer",
        ),
        (
            "negative version",
            Box::new(|e| e["request"]["version"] = json!(-3)),
            "request.version: must be a non-negative integer, got -3",
        ),
        (
            "missing version",
            Box::new(|e| {
                e["request"].as_object_mut().unwrap().remove("version");
            }),
            "request.version: is required",
        ),
        (
            "missing workspace",
            Box::new(|e| {
                e.as_object_mut().unwrap().remove("workspace_id");
            }),
            "workspace_id: is required",
        ),
        (
            "empty workspace",
            Box::new(|e| e["workspace_id"] = json!("")),
            "workspace_id: must not be empty",
        ),
        (
            "workspace with spaces",
            Box::new(|e| e["workspace_id"] = json!("T 1")),
            "workspace_id: may contain only ASCII letters, digits, '_' and '-'",
        ),
        (
            "unknown schema",
            Box::new(|e| e["schema"] = json!("thena.request.changed/v2")),
            "schema: unknown schema \"thena.request.changed/v2\"",
        ),
        (
            "bad occurred_at",
            Box::new(|e| e["occurred_at"] = json!("yesterday")),
            "occurred_at: must be an RFC 3339 timestamp with a zone, got \"yesterday\"",
        ),
        (
            "timestamp without zone",
            Box::new(|e| e["request"]["created_at"] = json!("2026-11-25T10:00:00")),
            "request.created_at: must be an RFC 3339 timestamp with a zone",
        ),
        (
            "numeric timestamp",
            Box::new(|e| e["request"]["updated_at"] = json!(1_700_000_000)),
            "request.updated_at: must be an RFC 3339 timestamp string, got a number",
        ),
        (
            "bad email",
            Box::new(|e| e["request"]["requestor"]["email"] = json!("harsh.thena.ai")),
            "request.requestor.email: must be an email address, got \"harsh.thena.ai\"",
        ),
        (
            "email without domain dot",
            Box::new(|e| e["request"]["requestor"]["email"] = json!("harsh@localhost")),
            "request.requestor.email: must have a domain like example.com",
        ),
        (
            "unknown change",
            Box::new(|e| e["change"] = json!("deleted")),
            "change: must be one of \"created\", \"metadata\", \"thread\"; got \"deleted\"",
        ),
        (
            "over-size title",
            Box::new(|e| e["request"]["title"] = json!("x".repeat(2_001))),
            "request.title: is 2001 characters long, the limit is 2000",
        ),
        (
            "over-size thread message",
            Box::new(|e| e["request"]["customer_thread"][1]["text"] = json!("y".repeat(100_001))),
            "request.customer_thread[1].text: is 100001 characters long, the limit is 100000",
        ),
        (
            "unknown field",
            Box::new(|e| e["request"]["priority"] = json!("p1")),
            "request.priority: unknown field",
        ),
        (
            "tags not strings",
            Box::new(|e| e["request"]["ai_tags"] = json!(["ok", 3])),
            "request.ai_tags[1]: must be a string, got a number",
        ),
        (
            "custom field not a string",
            Box::new(|e| e["request"]["custom_fields"]["Product"] = json!({"a": 1})),
            "request.custom_fields.Product: must be a string, got an object",
        ),
        (
            "link not a URL",
            Box::new(|e| e["request"]["permalink"] = json!("slack://x")),
            "request.permalink: must be an http(s) URL, got \"slack://x\"",
        ),
        (
            "closed before created",
            Box::new(|e| e["request"]["closed_at"] = json!("2020-01-01T00:00:00Z")),
            "request.closed_at: is earlier than request.created_at",
        ),
        (
            "bad event id",
            Box::new(|e| e["event_id"] = json!("nope")),
            "event_id: must be a UUID string when present",
        ),
        (
            "unknown source",
            Box::new(|e| e["request"]["source"] = json!("fax")),
            "request.source: must be one of \"slack\", \"email\", \"web\", \"ms_teams\"; got \"fax\"",
        ),
        (
            "null source",
            Box::new(|e| e["request"]["source"] = Value::Null),
            "request.source: must be one of \"slack\", \"email\", \"web\", \"ms_teams\"; got null",
        ),
        (
            "source in capitals",
            Box::new(|e| e["request"]["source"] = json!("Email")),
            "request.source: must be one of",
        ),
        (
            "email request without an address",
            Box::new(|e| {
                e["request"]["source"] = json!("email");
                e["request"]["requestor"]["email"] = Value::Null;
                e["request"]["permalink"] = Value::Null;
            }),
            "request.requestor.email: is required for an email request (request.source \"email\")",
        ),
        (
            "email request whose id is another address",
            Box::new(|e| {
                e["request"]["source"] = json!("email");
                e["request"]["requestor"]["external_id"] = json!("other@thena.ai");
            }),
            "request.requestor.external_id: differs from request.requestor.email",
        ),
        (
            "slack request whose id is not the slack user id",
            Box::new(|e| e["request"]["requestor"]["external_id"] = json!("U999")),
            "request.requestor.external_id: differs from request.requestor.slack_user_id",
        ),
        (
            "blank requestor id",
            Box::new(|e| e["request"]["requestor"]["external_id"] = json!(" ")),
            "request.requestor.external_id: must not be blank",
        ),
        (
            "mid link on a slack request",
            Box::new(|e| e["request"]["permalink"] = json!("mid:a@b.c")),
            "request.permalink: must be an http(s) URL, got \"mid:a@b.c\"",
        ),
        (
            "email permalink that is no message id",
            Box::new(|e| {
                e["request"]["source"] = json!("email");
                e["request"]["requestor"]["external_id"] = Value::Null;
                e["request"]["permalink"] = json!("mid:<a@b.c>");
            }),
            "request.permalink: must be an http(s) URL or a mid: URI (RFC 2392), got \"mid:<a@b.c>\"",
        ),
        (
            "thread author address",
            Box::new(|e| e["request"]["customer_thread"][0]["author_email"] = json!("harsh")),
            "request.customer_thread[0].author_email: must be an email address, got \"harsh\"",
        ),
        (
            "thread subject not a string",
            Box::new(|e| e["request"]["customer_thread"][1]["subject"] = json!(["Re:"])),
            "request.customer_thread[1].subject: must be a string, got an array",
        ),
        (
            "request not an object",
            Box::new(|e| e["request"] = json!([1])),
            "request: must be an object, got an array",
        ),
    ];
    let total = cases.len();
    for (name, edit, expected) in cases {
        let problems = problems_after(edit);
        assert_eq!(
            problems.len(),
            1,
            "{name}: expected exactly one problem, got {problems:?}"
        );
        assert!(
            problems[0].starts_with(expected),
            "{name}: expected {expected:?}, got {:?}",
            problems[0]
        );
    }
    assert!(total >= 10);
}

#[test]
fn an_event_without_a_source_is_a_valid_slack_request() {
    // Revision 1.0 of the contract: no source, no requestor id, plain thread messages.
    let mut event = valid();
    event["request"].as_object_mut().unwrap().remove("source");
    event["request"]["requestor"]
        .as_object_mut()
        .unwrap()
        .remove("external_id");
    let parsed = parse_value(event.clone(), &Limits::default()).unwrap();
    assert_eq!(parsed.request.source, Source::Slack);
    assert_eq!(parsed.request.requestor_channel_id(), Some("U123"));
    assert_eq!(
        decode_event(&serde_json::to_vec(&event).unwrap())
            .unwrap()
            .request
            .source,
        Source::Slack
    );
}

#[test]
fn every_channel_s_sample_event_is_valid_and_round_trips() {
    for source in Source::ALL {
        let event = sample::full_event_from(source);
        let bytes = serde_json::to_vec(&event).unwrap();
        let parsed = parse_event(&bytes, &Limits::default())
            .unwrap_or_else(|e| panic!("{}: {e}", source.as_str()));
        assert_eq!(parsed, event);
        assert_eq!(
            serde_json::to_value(&event).unwrap()["request"]["source"],
            source.as_str()
        );
        assert_eq!(Source::parse(source.as_str()), Some(source));
    }
}

#[test]
fn the_requestor_s_channel_id_is_the_one_of_the_request_s_channel() {
    let id = |source| {
        sample::full_event_from(source)
            .request
            .requestor_channel_id()
            .map(str::to_owned)
    };
    assert_eq!(id(Source::Slack).as_deref(), Some("U123"));
    assert_eq!(
        id(Source::Email),
        None,
        "the address is an email requestor's id"
    );
    assert_eq!(id(Source::Web).as_deref(), Some("portal-user-42"));
    assert_eq!(
        id(Source::MsTeams).as_deref(),
        Some("8f6c2e1a-5b7d-4e0f-9a3c-2d1b0e9f8a7c")
    );
    // A Teams request carries no Slack id to fall back on; a Slack one does.
    let mut teams = sample::full_event_from(Source::MsTeams).request;
    teams.requestor.external_id = None;
    teams.requestor.slack_user_id = Some("U123".into());
    assert_eq!(teams.requestor_channel_id(), None);
    let mut slack = sample::full_event().request;
    slack.requestor.external_id = None;
    assert_eq!(slack.requestor_channel_id(), Some("U123"));
}

#[test]
fn every_problem_is_reported_at_once() {
    let problems = problems_after(|e| {
        e["schema"] = json!("nope");
        e["workspace_id"] = json!(42);
        e["request"]["id"] = json!("135");
        e["request"]["requestor"]["email"] = json!("not an email");
    });
    let paths: Vec<&str> = problems
        .iter()
        .map(|p| p.split(':').next().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "schema",
            "workspace_id",
            "request.id",
            "request.requestor.email"
        ]
    );
}

#[test]
fn a_body_that_is_not_json_names_the_whole_body() {
    let err = parse_event(b"{not json", &Limits::default()).unwrap_err();
    assert_eq!(err.problems[0].path, "$");
    assert!(err.problems[0].message.starts_with("not valid JSON"));
    let err = parse_event(b"[]", &Limits::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid event: $: must be an object, got an array"
    );
}

#[test]
fn the_consumer_decoder_ignores_fields_added_later_but_not_another_schema() {
    let mut event = valid();
    event["request"]["added_in_v1_1"] = json!(true);
    assert!(decode_event(&serde_json::to_vec(&event).unwrap()).is_ok());
    event["schema"] = json!("other/v9");
    assert!(decode_event(&serde_json::to_vec(&event).unwrap()).is_err());
}

#[test]
fn the_checked_in_json_schema_matches_the_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/event.schema.json");
    let generated = serde_json::to_string_pretty(&json_schema()).unwrap() + "\n";
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::write(path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "docs/event.schema.json is out of date: run `UPDATE_SCHEMA=1 cargo test -p thena-events`"
    );
}

#[test]
fn a_null_list_or_map_is_a_problem_at_its_path_not_a_bare_decode_error() {
    // Found by fuzzing (docs/fuzzing.md): `"ai_tags": null` passed validation, then serde
    // refused it with only "$: invalid type: null, expected a sequence".
    for (field, expected) in [
        (
            "ai_tags",
            "request.ai_tags: must be an array of strings, got null",
        ),
        (
            "customer_thread",
            "request.customer_thread: must be an array of messages, got null",
        ),
        (
            "internal_thread",
            "request.internal_thread: must be an array of messages, got null",
        ),
        (
            "custom_fields",
            "request.custom_fields: must be an object, got null",
        ),
    ] {
        let problems = problems_after(|e| e["request"][field] = Value::Null);
        assert_eq!(problems, [expected], "{field}");
        // Absent still means empty.
        assert_eq!(
            problems_after(|e| {
                e["request"].as_object_mut().unwrap().remove(field);
            }),
            Vec::<String>::new(),
            "{field} absent"
        );
    }
}

#[test]
fn a_time_whose_offset_moves_it_outside_years_0000_to_9999_in_utc_is_refused() {
    // Found by fuzzing (docs/fuzzing.md): these are valid RFC 3339, but the event is kept
    // in UTC, so it was accepted and then published as "+10000-01-01T00:59:59Z" or
    // "-0001-12-31T23:00:00Z", which no longer passes validation.
    for (path, time) in [
        ("occurred_at", "9999-12-31T23:59:59-01:00"),
        ("occurred_at", "0000-01-01T00:00:00+01:00"),
        ("request.closed_at", "9999-12-31T23:59:59-00:01"),
    ] {
        let problems = problems_after(|e| match path.split_once('.') {
            Some((outer, inner)) => e[outer][inner] = json!(time),
            None => e[path] = json!(time),
        });
        assert_eq!(
            problems,
            [format!(
                "{path}: must be within the years 0000 to 9999 in UTC, got {time:?}"
            )],
        );
    }
    // The edges themselves, in UTC or with an offset that stays inside, are fine.
    for time in [
        "0000-01-01T00:00:00Z",
        "0000-01-01T00:00:00-01:00",
        "9999-12-31T23:59:59Z",
        "9999-12-31T23:59:59+01:00",
    ] {
        let mut event = valid();
        event["occurred_at"] = json!(time);
        let parsed = parse_value(event, &Limits::default()).unwrap();
        let again = serde_json::to_vec(&parsed).unwrap();
        assert_eq!(
            parse_event(&again, &Limits::default()).unwrap(),
            parsed,
            "{time}"
        );
    }
}
