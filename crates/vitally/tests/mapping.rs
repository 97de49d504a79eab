//! The pure trait mapping: every product-doc trait, typed as Vitally expects, written
//! under the paths Vitally returned, pinned by a golden file.

use std::path::PathBuf;

use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use serde_json::{Value, json};
use thena_events::{RequestChanged, Source, ThreadMessage, sample};
use vitally_client::{
    mapping::{
        FieldMap, FieldRef, MappingOptions, TRUNCATION_MARKER, earlier_marker, map_instance,
        render_thread, render_thread_within, truncate,
    },
    traits::{EXTRA_TRAITS, FIXED_TRAITS, FieldType, label, own_traits},
};

/// "Request Internal Notification Link" → "requestInternalNotificationLink".
fn camel(label: &str) -> String {
    label
        .split_whitespace()
        .enumerate()
        .map(|(i, w)| {
            let lower = w.to_lowercase();
            if i == 0 {
                lower
            } else {
                let mut c = lower.chars();
                c.next()
                    .map(|f| f.to_uppercase().chain(c).collect())
                    .unwrap_or_default()
            }
        })
        .collect()
}

/// The field map as Vitally lists it after provisioning: own traits plus `categories`.
fn vitally_fields(categories: &[&str]) -> FieldMap {
    let mut all: Vec<(&str, FieldType)> = own_traits().collect();
    all.extend(categories.iter().map(|c| (*c, FieldType::String)));
    all.into_iter()
        .map(|(l, t)| {
            let path = format!("vitally.custom.{}", camel(l));
            (
                l.to_string(),
                FieldRef {
                    path,
                    field_type: t,
                },
            )
        })
        .collect()
}

fn path(fields: &FieldMap, label: &str) -> String {
    fields[label].path.clone()
}

fn at(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_795_000_000 + secs, 0)
        .single()
        .expect("valid timestamp")
}

fn msg(author: &str, text: &str, secs: i64) -> ThreadMessage {
    ThreadMessage::new(author, text, at(secs))
}

#[test]
fn a_full_event_fills_all_22_product_doc_traits_with_the_right_json_types() {
    let event = sample::full_event();
    let fields = vitally_fields(&["Product"]);
    let mapped = map_instance(&event, &fields, &MappingOptions::default());

    // The product doc's 22: the built-in name, 20 fixed traits, the category's field.
    assert_eq!(mapped.name, "Thena Request ID: 135");
    assert_eq!(mapped.external_id, "thena:T024BE7LD:135");
    let product_doc = 1 + FIXED_TRAITS.len() + 1;
    assert_eq!(product_doc, 22);
    // Plus the extra traits (Source), all written as fields.
    assert_eq!(
        mapped.traits.len(),
        product_doc - 1 + EXTRA_TRAITS.len(),
        "20 fixed traits + 1 category + Source: {:#?}",
        mapped.traits
    );
    assert!(mapped.missing_fixed.is_empty());
    assert!(mapped.dropped_categories.is_empty());
    assert!(mapped.mistyped.is_empty());

    for (l, t) in own_traits() {
        let value = &mapped.traits[&path(&fields, l)];
        match t {
            FieldType::String | FieldType::Textarea => {
                assert!(value.is_string(), "{l} should be a string, got {value}")
            }
            FieldType::Number => assert!(value.is_u64(), "{l} should be a number, got {value}"),
            FieldType::Datetime => {
                let s = value
                    .as_str()
                    .unwrap_or_else(|| panic!("{l} should be a string"));
                assert!(s.ends_with('Z'), "{l} = {s} should be UTC with Z");
                DateTime::parse_from_rfc3339(s).unwrap_or_else(|e| panic!("{l} = {s}: {e}"));
            }
        }
    }
    let get = |l: &str| mapped.traits[&path(&fields, l)].clone();
    assert_eq!(get(label::REQUEST_ID), json!(135));
    assert_eq!(get(label::SOURCE), json!("Slack"));
    assert_eq!(get(label::AI_TAGS), json!("billing, sso"));
    assert_eq!(get(label::REQUESTOR), json!("Harsh <harsh@thena.ai>"));
    assert_eq!(get(label::CREATED_AT), json!("2026-11-18T11:06:40Z"));
    // The precision Thena sent, never cut to seconds.
    assert_eq!(get(label::UPDATED_AT), json!("2026-11-18T11:16:40.125Z"));
    assert_eq!(get("Product"), json!("Request Management"));
    assert_eq!(
        get(label::CUSTOMER_THREAD),
        json!(
            "Harsh (2026-11-18T11:06:40Z): Hi team, our new hires cannot log in with SSO.\n\
             Jane Doe (2026-11-18T11:08:40.250Z): Looking into it now."
        )
    );
}

/// The golden file of a channel's full event (Slack's keeps its original name).
fn golden_path(source: Source) -> PathBuf {
    let name = match source {
        Source::Slack => "full_event_instance.json".to_owned(),
        other => format!("full_event_{}_instance.json", other.as_str()),
    };
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

#[test]
fn the_full_event_of_every_channel_maps_to_its_golden_instance_body() {
    for source in Source::ALL {
        check_golden(source);
    }
}

fn check_golden(source: Source) {
    let mapped = map_instance(
        &sample::full_event_from(source),
        &vitally_fields(&["Product"]),
        &MappingOptions::default(),
    );
    let body = json!({
        "name": mapped.name,
        "externalId": mapped.external_id,
        "traits": mapped.traits,
    });
    let actual = serde_json::to_string_pretty(&body).expect("serializes") + "\n";
    let file = golden_path(source);
    if std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(file.parent().expect("has a parent")).expect("create golden dir");
        std::fs::write(&file, &actual).expect("write golden file");
        return;
    }
    let expected = std::fs::read_to_string(&file).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}\nrun with UPDATE_GOLDEN=1 to create it",
            file.display()
        )
    });
    assert!(
        expected == actual,
        "the instance body for sample::full_event_from({source:?}) changed.\n\
         If the change is intended, regenerate with:\n  \
         UPDATE_GOLDEN=1 cargo test -p vitally-client --test mapping\n\
         --- expected ({})\n{expected}\n--- actual\n{actual}",
        file.display()
    );
}

/// The Customer Thread trait of `event` with a textarea limit of `limit` characters.
fn customer_thread_within(event: &RequestChanged, limit: usize) -> String {
    let fields = vitally_fields(&[]);
    let opts = MappingOptions {
        textarea_limit: limit,
    };
    let mapped = map_instance(event, &fields, &opts);
    mapped.traits[&path(&fields, label::CUSTOMER_THREAD)]
        .as_str()
        .expect("a customer thread")
        .to_owned()
}

#[test]
fn a_long_thread_keeps_the_newest_messages_after_an_earlier_marker() {
    let mut event = sample::full_event();
    event.request.customer_thread = (0..200)
        .map(|i| msg("Harsh", &format!("message number {i} ✓ ünïcødé"), i))
        .collect();
    let thread = customer_thread_within(&event, 500);
    let lines: Vec<&str> = thread.lines().collect();
    let kept = lines.len() - 1;
    assert_eq!(lines[0], earlier_marker(200 - kept), "{thread}");
    assert!(kept >= 5, "only {kept} messages kept");
    assert!(
        thread.chars().count() <= 500,
        "{} chars",
        thread.chars().count()
    );
    // The newest message is last, and the kept ones are the newest, in order.
    assert!(
        lines[kept].starts_with("Harsh (2026-11-18T11:09:59Z): message number 199 ✓"),
        "{thread}"
    );
    assert!(lines[1].contains(&format!("message number {} ", 200 - kept)));
    // Short textareas are left alone.
    let fields = vitally_fields(&[]);
    let opts = MappingOptions {
        textarea_limit: 500,
    };
    let mapped = map_instance(&event, &fields, &opts);
    assert_eq!(
        mapped.traits[&path(&fields, label::TITLE)],
        json!("SSO login fails for new users")
    );
}

#[test]
fn a_thread_within_the_limit_is_whole_and_one_huge_message_is_cut() {
    let messages = vec![msg("Ann", "short", 0), msg("Bob", "also short", 1)];
    assert_eq!(
        render_thread_within(&messages, 10_000),
        render_thread(&messages)
    );
    assert_eq!(render_thread_within(&[], 10), None);
    assert_eq!(earlier_marker(1), "… 1 earlier message");

    let huge = "x".repeat(1_000);
    let one = render_thread_within(&[msg("Ann", &huge, 0)], 100).expect("a thread");
    assert!(
        one.starts_with("Ann (") && one.ends_with(TRUNCATION_MARKER),
        "{one}"
    );
    let two =
        render_thread_within(&[msg("Ann", "hi", 0), msg("Bob", &huge, 1)], 100).expect("a thread");
    assert!(two.starts_with("… 1 earlier message\nBob ("), "{two}");
    assert!(two.ends_with(TRUNCATION_MARKER));
}

#[test]
fn threads_are_ordered_by_time_newest_last_one_message_per_line() {
    let mut event = sample::full_event();
    event.request.internal_thread = vec![
        msg("Jane", "third", 30),
        msg("Bob", "first\nwith a second line", 10),
        msg("Ann", "second", 20),
    ];
    let fields = vitally_fields(&[]);
    let mapped = map_instance(&event, &fields, &MappingOptions::default());
    let thread = mapped.traits[&path(&fields, label::INTERNAL_THREAD)]
        .as_str()
        .expect("string");
    assert_eq!(
        thread,
        "Bob (2026-11-18T11:06:50Z): first\n  with a second line\n\
         Ann (2026-11-18T11:07:00Z): second\n\
         Jane (2026-11-18T11:07:10Z): third"
    );
}

#[test]
fn a_category_without_a_field_is_dropped_and_listed() {
    let mut event = sample::full_event();
    event
        .request
        .custom_fields
        .insert("Region".into(), "EMEA".into());
    let fields = vitally_fields(&["Product"]);
    let mapped = map_instance(&event, &fields, &MappingOptions::default());
    assert_eq!(mapped.dropped_categories, vec!["Region".to_string()]);
    assert_eq!(
        mapped.traits[&path(&fields, "Product")],
        json!("Request Management")
    );
    assert!(
        !mapped.traits.values().any(|v| v == "EMEA"),
        "dropped value written somewhere"
    );
}

#[test]
fn a_category_field_the_snapshot_does_not_mention_is_cleared_with_null() {
    let mut event = sample::full_event();
    event.request.custom_fields.clear();
    event
        .request
        .custom_fields
        .insert("region".into(), "EMEA".into());
    let mut fields = vitally_fields(&["Product", "Region", "Score"]);
    // A number field can never hold a category: not ours to clear.
    fields.get_mut("Score").expect("score").field_type = FieldType::Number;
    let mapped = map_instance(&event, &fields, &MappingOptions::default());
    assert_eq!(mapped.traits[&path(&fields, "Product")], Value::Null);
    assert_eq!(mapped.traits[&path(&fields, "Region")], json!("EMEA"));
    assert!(!mapped.traits.contains_key(&path(&fields, "Score")));
    assert!(mapped.dropped_categories.is_empty());
    assert_eq!(
        mapped.traits.len(),
        23,
        "20 fixed + Source + Product + Region"
    );
}

#[test]
fn a_category_matches_its_field_case_insensitively_but_an_exact_label_wins() {
    let mut event = sample::full_event();
    event.request.custom_fields.clear();
    event
        .request
        .custom_fields
        .insert("product".into(), "lower".into());
    event
        .request
        .custom_fields
        .insert("Product".into(), "exact".into());
    event
        .request
        .custom_fields
        .insert("REGION".into(), "EMEA".into());
    // A category named like a fixed trait never overwrites it.
    event
        .request
        .custom_fields
        .insert("status".into(), "hijack".into());
    let fields = vitally_fields(&["Product", "Region"]);
    let mapped = map_instance(&event, &fields, &MappingOptions::default());
    assert_eq!(mapped.traits[&path(&fields, "Product")], json!("exact"));
    assert_eq!(mapped.traits[&path(&fields, "Region")], json!("EMEA"));
    assert_eq!(mapped.traits[&path(&fields, label::STATUS)], json!("open"));
    assert_eq!(
        mapped.dropped_categories,
        vec!["product".to_string(), "status".to_string()]
    );
}

#[test]
fn traits_are_written_under_the_paths_vitally_returned_even_unusual_ones() {
    let mut fields = vitally_fields(&["Product"]);
    fields.get_mut(label::STATUS).expect("status").path = "vitally.custom.status2".into();
    fields.get_mut("Product").expect("product").path = "vitally.custom.x_17".into();
    let mapped = map_instance(&sample::full_event(), &fields, &MappingOptions::default());
    assert_eq!(mapped.traits["vitally.custom.status2"], json!("open"));
    assert_eq!(
        mapped.traits["vitally.custom.x_17"],
        json!("Request Management")
    );
    assert!(!mapped.traits.contains_key("vitally.custom.status"));
    assert!(!mapped.traits.contains_key("vitally.custom.product"));
    assert!(
        mapped
            .traits
            .keys()
            .all(|k| k.starts_with("vitally.custom.")),
        "a label leaked in as a key"
    );
}

#[test]
fn absent_values_in_the_snapshot_clear_their_traits_with_null() {
    let event: RequestChanged = sample::event("T1", 9, 2, None);
    let fields = vitally_fields(&[]);
    let mapped = map_instance(&event, &fields, &MappingOptions::default());
    for l in [
        label::CLOSED_AT,
        label::CLOSED_BY,
        label::CSAT,
        label::SUMMARY,
        label::AI_TAGS,
        label::CUSTOMER_THREAD,
        label::INTERNAL_THREAD,
        label::REQUESTOR,
        label::ASSIGNED_TO,
        label::WEB_LINK,
    ] {
        assert_eq!(
            mapped.traits[&path(&fields, l)],
            Value::Null,
            "{l} should be null"
        );
    }
    assert_eq!(
        mapped.traits.len(),
        own_traits().count(),
        "every own trait is written, cleared ones as null"
    );
}

#[test]
fn the_requestor_is_whichever_of_name_and_email_exists() {
    let fields = vitally_fields(&[]);
    let requestor = |name: Option<&str>, email: Option<&str>| {
        let mut event = sample::full_event();
        event.request.requestor.name = name.map(str::to_string);
        event.request.requestor.email = email.map(str::to_string);
        map_instance(&event, &fields, &MappingOptions::default()).traits
            [&path(&fields, label::REQUESTOR)]
            .clone()
    };
    assert_eq!(requestor(Some("Harsh"), None), json!("Harsh"));
    assert_eq!(requestor(None, Some("h@thena.ai")), json!("h@thena.ai"));
    assert_eq!(
        requestor(Some(" "), Some("h@thena.ai")),
        json!("h@thena.ai")
    );
}

#[test]
fn fixed_traits_missing_from_the_field_map_are_listed_and_not_guessed() {
    let mut fields = vitally_fields(&["Product"]);
    fields.remove(label::URGENCY);
    fields.remove(label::CSAT);
    let mapped = map_instance(&sample::full_event(), &fields, &MappingOptions::default());
    assert_eq!(mapped.missing_fixed, vec![label::CSAT, label::URGENCY]);
    assert!(!mapped.traits.contains_key("vitally.custom.urgency"));
    assert_eq!(mapped.traits.len(), own_traits().count() - 2 + 1);
}

#[test]
fn a_field_of_another_type_gets_text_when_lossless_and_is_skipped_otherwise() {
    let mut fields = vitally_fields(&["Product"]);
    // An adopted object where someone made the id a string and Product a number.
    fields.get_mut(label::REQUEST_ID).expect("id").field_type = FieldType::String;
    fields.get_mut("Product").expect("product").field_type = FieldType::Number;
    let mapped = map_instance(&sample::full_event(), &fields, &MappingOptions::default());
    assert_eq!(
        mapped.traits[&path(&fields, label::REQUEST_ID)],
        json!("135")
    );
    assert!(!mapped.traits.contains_key(&path(&fields, "Product")));
    assert_eq!(mapped.mistyped, vec!["Product".to_string()]);
}

/// The value of trait `l` for `event`, mapped with the default options.
fn trait_value(event: &RequestChanged, l: &str) -> Value {
    let fields = vitally_fields(&[]);
    map_instance(event, &fields, &MappingOptions::default()).traits[&path(&fields, l)].clone()
}

#[test]
fn the_source_trait_names_the_channel_and_an_event_without_one_is_slack() {
    let names: Vec<Value> = Source::ALL
        .iter()
        .map(|s| trait_value(&sample::full_event_from(*s), label::SOURCE))
        .collect();
    assert_eq!(
        names,
        [
            json!("Slack"),
            json!("Email"),
            json!("Web"),
            json!("Microsoft Teams")
        ]
    );
    // A revision 1.0 event (no source) decodes as Slack.
    let mut old = serde_json::to_value(sample::full_event()).unwrap();
    old["request"].as_object_mut().unwrap().remove("source");
    let old: RequestChanged = serde_json::from_value(old).unwrap();
    assert_eq!(trait_value(&old, label::SOURCE), json!("Slack"));
}

#[test]
fn the_permalink_is_the_channel_s_own_link_or_cleared() {
    let with = |source: Source, link: Option<&str>| {
        let mut event = sample::full_event_from(source);
        event.request.permalink = link.map(str::to_owned);
        trait_value(&event, label::PERMALINK)
    };
    let slack = "https://acme.slack.com/archives/C1/p1";
    let teams = "https://teams.microsoft.com/l/message/19:c0ffee@thread.tacv2/1795000000000";
    let cases = [
        (Source::Slack, Some(slack), json!(slack)),
        (Source::MsTeams, Some(teams), json!(teams)),
        (
            Source::Email,
            Some("mid:CAF=1@mail.thena.ai"),
            json!("mid:CAF=1@mail.thena.ai"),
        ),
        (
            Source::Web,
            Some("https://help.thena.ai/contact"),
            json!("https://help.thena.ai/contact"),
        ),
        // Thena's Slack copy of a request from another channel is not its own link.
        (Source::Email, Some(slack), Value::Null),
        (
            Source::MsTeams,
            Some("https://thena.slack.com/archives/C2/p3"),
            Value::Null,
        ),
        (
            Source::Web,
            Some("https://slack.com/app_redirect?channel=C1"),
            Value::Null,
        ),
        // A host that merely looks like Slack is the channel's own.
        (
            Source::Web,
            Some("https://notslack.com/x"),
            json!("https://notslack.com/x"),
        ),
        // No link: cleared, whatever the channel.
        (Source::Slack, None, Value::Null),
        (Source::Email, None, Value::Null),
        (Source::Web, Some("  "), Value::Null),
    ];
    for (source, link, expected) in cases {
        assert_eq!(with(source, link), expected, "{source:?} {link:?}");
    }
}

#[test]
fn an_email_thread_shows_addresses_subjects_once_and_no_quoted_history() {
    let thread = trait_value(
        &sample::full_event_from(Source::Email),
        label::CUSTOMER_THREAD,
    );
    assert_eq!(
        thread,
        json!(
            "Harsh <harsh@thena.ai> (2026-11-18T11:06:40Z): SSO login fails for new users — \
             Hi team,\n  our new hires cannot log in with SSO.\n  Harsh\n\
             Jane Doe <jane@support.acme.io> (2026-11-18T11:08:40.250Z): Looking into it now."
        )
    );
    // A new subject in the exchange shows; a forward that is all quote keeps its text.
    let mut event = sample::full_event_from(Source::Email);
    let mut forward = msg("Harsh", "> Forwarded:\n> the original", 200);
    forward.subject = Some("Fwd: Okta metadata".into());
    event.request.customer_thread.push(forward);
    let thread = trait_value(&event, label::CUSTOMER_THREAD);
    assert!(
        thread.as_str().unwrap().ends_with(
            "Harsh (2026-11-18T11:10:00Z): Fwd: Okta metadata — > Forwarded:\n  > the original"
        ),
        "{thread}"
    );
}

#[test]
fn quoted_text_is_only_dropped_from_email_threads() {
    let quoted = "See the log:\n> ERROR 42";
    for source in [Source::Slack, Source::Web, Source::MsTeams] {
        let mut event = sample::full_event_from(source);
        event.request.customer_thread = vec![msg("Ann", quoted, 0)];
        assert_eq!(
            trait_value(&event, label::CUSTOMER_THREAD),
            json!("Ann (2026-11-18T11:06:40Z): See the log:\n  > ERROR 42"),
            "{source:?}"
        );
    }
}

#[test]
fn a_teams_conversation_reads_like_a_slack_thread_with_its_post_subject() {
    assert_eq!(
        trait_value(
            &sample::full_event_from(Source::MsTeams),
            label::CUSTOMER_THREAD
        ),
        json!(
            "Harsh (2026-11-18T11:06:40Z): SSO login fails for new users — Hi team, our new \
             hires cannot log in with SSO.\n\
             Jane Doe (2026-11-18T11:08:40.250Z): Looking into it now."
        )
    );
}

#[test]
fn a_long_email_thread_keeps_its_newest_messages_after_an_earlier_marker() {
    let mut event = sample::full_event_from(Source::Email);
    event.request.customer_thread = (0..200)
        .map(|i| {
            let mut m = msg(
                "Harsh",
                &format!("reply {i}\n\nOn Mon, Jane wrote:\n> reply {}", i.max(1) - 1),
                i,
            );
            m.author_email = Some("harsh@thena.ai".into());
            m.subject = Some(format!("{}Login", "Re: ".repeat(i as usize % 3)));
            m
        })
        .collect();
    let thread = customer_thread_within(&event, 500);
    let lines: Vec<&str> = thread.lines().collect();
    let kept = lines.len() - 1;
    assert_eq!(lines[0], earlier_marker(200 - kept), "{thread}");
    assert!(thread.chars().count() <= 500, "{thread}");
    assert_eq!(
        lines[kept], "Harsh <harsh@thena.ai> (2026-11-18T11:09:59Z): reply 199",
        "newest last, without its quote: {thread}"
    );
    assert!(!thread.contains("> reply"), "no quoted history: {thread}");
}

proptest! {
    #[test]
    fn truncation_never_exceeds_the_limit_plus_marker(s in ".{0,300}", limit in 0usize..320) {
        let out = truncate(&s, limit);
        let marker = TRUNCATION_MARKER.chars().count();
        prop_assert!(out.chars().count() <= limit + marker);
        prop_assert!(std::str::from_utf8(out.as_bytes()).is_ok());
        if s.chars().count() <= limit {
            prop_assert_eq!(&out, &s);
        } else {
            prop_assert!(out.ends_with(TRUNCATION_MARKER));
            let kept: String = s.chars().take(limit).collect();
            prop_assert_eq!(out, kept + TRUNCATION_MARKER);
        }
    }

    #[test]
    fn every_textarea_trait_stays_within_the_limit(
        text in "\\PC{0,120}",
        authors in proptest::collection::vec("\\PC{0,12}", 0..8),
        limit in 0usize..150,
    ) {
        let mut event = sample::full_event();
        event.request.title = Some(text.clone());
        event.request.summary = Some(text.repeat(3));
        event.request.csat = Some(text.clone());
        event.request.customer_thread =
            authors.iter().enumerate().map(|(i, a)| msg(a, &text, i as i64)).collect();
        let fields = vitally_fields(&[]);
        let mapped = map_instance(&event, &fields, &MappingOptions { textarea_limit: limit });
        let marker = TRUNCATION_MARKER.chars().count();
        for (l, t) in own_traits() {
            if t == FieldType::Textarea
                && let Some(s) = mapped.traits[&path(&fields, l)].as_str()
            {
                prop_assert!(s.chars().count() <= limit + marker, "{} too long", l);
            }
        }
    }
}
