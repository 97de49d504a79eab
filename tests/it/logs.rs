//! A consumer's logs say which event they are about (issue 14, item 11): every line of
//! an event's work carries its event id, workspace, request id and version (the `event`
//! span), also as `LOG_FORMAT=json`, and each outcome is logged once at `info`. Read from
//! the standard output of a real `thena-vitally consumer` process.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use fake_vitally::{Fault, FaultKind};
use serde_json::Value;
use thena_events::{RequestChanged, sample};
use thena_testkit::wait_until;

use crate::support::{Fleet, Process, WS};

/// Starts the consumer binary against the fleet; its stdout lines are collected.
fn consumer_process(fleet: &Fleet) -> (Process, Arc<Mutex<Vec<String>>>) {
    let mut env = fleet.variables();
    env.extend([
        ("AMQP_URL", thena_testkit::amqp_url()),
        ("REDIS_URL", thena_testkit::redis_url()),
        ("LOG_FORMAT", "json".to_string()),
        // The Vitally client's and the pipeline's debug lines too.
        (
            "RUST_LOG",
            "info,thena_sync=debug,vitally_client=debug".to_string(),
        ),
    ]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_thena-vitally"))
        .arg("consumer")
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the consumer process");
    let stdout = child.stdout.take().expect("piped stdout");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    (Process(child), lines)
}

/// The `event` span among a line's spans, if the line was logged inside one.
fn event_span(line: &Value) -> Option<&Value> {
    line["spans"]
        .as_array()?
        .iter()
        .find(|span| span["name"] == "event")
}

/// Whether `span` names exactly this event.
fn names(span: &Value, event: &RequestChanged) -> bool {
    span["event_id"] == event.event_id.to_string()
        && span["workspace"] == event.workspace_id
        && span["request_id"] == event.request.id
        && span["version"] == event.request.version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_of_an_events_work_names_it_and_its_outcome_is_logged_once_at_info() {
    let fleet = Fleet::start().await;
    fleet.connect(WS, |_| {}).await;
    let (_process, lines) = consumer_process(&fleet);

    // One event per kind of ending: retried (a 503 on its create), synced, skipped.
    fleet.fake.inject(Fault::NextN {
        method: Some("POST".into()),
        path_prefix: "/resources/customObjects".into(),
        count: 1,
        kind: FaultKind::Status(503),
    });
    let events: Vec<(RequestChanged, &str)> = vec![
        (sample::event(WS, 83, 1, Some("alice@acme.com")), "retried"),
        (sample::event(WS, 81, 1, Some("alice@acme.com")), "synced"),
        (sample::event(WS, 82, 1, None), "skipped"),
    ];
    for (event, _) in &events {
        fleet.publish(event).await;
        // One at a time, so the 503 is the first event's.
        wait_until("its outcome logged", Duration::from_secs(30), || async {
            lines
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("event handled") && l.contains(&event.event_id.to_string()))
                .then_some(())
        })
        .await;
    }

    let logged: Vec<Value> = lines
        .lock()
        .unwrap()
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    let mut handled: HashMap<u64, Vec<&Value>> = HashMap::new();
    let mut vitally_calls: HashMap<u64, usize> = HashMap::new();
    for line in &logged {
        let target = line["target"].as_str().unwrap_or_default();
        let Some(span) = event_span(line) else {
            // Outside any event: start-up and the like, never the work of one.
            assert!(
                !target.starts_with("vitally_client::client")
                    && line["fields"]["message"] != "event handled",
                "a line of an event's work without its span: {line}"
            );
            continue;
        };
        let (event, _) = events
            .iter()
            .find(|(event, _)| names(span, event))
            .unwrap_or_else(|| panic!("a span naming no event of ours, or partly: {line}"));
        if line["fields"]["message"] == "event handled" {
            handled.entry(event.request.id).or_default().push(line);
        }
        if target.starts_with("vitally_client::client") {
            *vitally_calls.entry(event.request.id).or_default() += 1;
        }
    }
    for (event, outcome) in &events {
        let id = event.request.id;
        println!("{}", serde_json::to_string(&handled[&id]).unwrap());
        let once = handled.get(&id).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(
            once.len(),
            1,
            "request {id}: one outcome line, got {once:#?}"
        );
        assert_eq!(once[0]["level"], "INFO", "{}", once[0]);
        assert_eq!(once[0]["fields"]["outcome"], *outcome, "{}", once[0]);
    }
    // The Vitally calls of the synced and the retried event are logged inside their span.
    assert!(
        vitally_calls.get(&81).is_some_and(|n| *n >= 2),
        "{vitally_calls:?}"
    );
    assert!(
        vitally_calls.get(&83).is_some_and(|n| *n >= 2),
        "{vitally_calls:?}"
    );
    let retried = handled[&83][0];
    assert_eq!(retried["fields"]["reason"], "vitally_503", "{retried}");
    fleet.stop().await;
}
