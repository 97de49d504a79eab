//! The README's main job, end to end: every role in one process, every linking case.

use std::time::Duration;

use thena_demo::{DemoOptions, REASONS, customers::PERSONAS, run};
use thena_runtime::Config;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_puts_every_request_where_the_linking_rules_say() {
    let config = Config::defaults_with(&[]).unwrap();
    let options = DemoOptions::default();
    let report = run(&config, &options).await.expect("demo");
    let text = report.to_string();
    println!("{text}");
    assert_eq!(report.rows.len(), PERSONAS.len());
    assert!(report.mismatches().is_empty(), "{:?}", report.mismatches());
    // Requests from every channel; each synced one says where it came from.
    let sources: std::collections::BTreeSet<_> = report.rows.iter().map(|r| r.source).collect();
    assert_eq!(sources.len(), 4, "{sources:?}");
    let synced = report
        .rows
        .iter()
        .filter(|r| matches!(r.outcome, thena_sync::outcome::Outcome::Synced { .. }));
    for row in synced {
        assert_eq!(
            report.sources.get(&row.request_id).map(String::as_str),
            Some(row.source.label()),
            "request {}",
            row.request_id
        );
    }
    let retried: u64 = report
        .counters
        .iter()
        .filter(|((outcome, _), _)| outcome == "retried")
        .map(|(_, n)| n)
        .sum();
    assert!(retried >= 1, "the injected outage took the retry path");
    assert!(report.urls.iter().any(|u| u.ends_with("/metrics")));

    // The counters are read once every event settled: each event sent has exactly one
    // final outcome among them.
    let settled: u64 = report
        .counters
        .iter()
        .filter(|((outcome, _), _)| ["synced", "skipped", "parked"].contains(&outcome.as_str()))
        .map(|(_, n)| n)
        .sum();
    assert!(settled >= (PERSONAS.len() * options.steps) as u64, "{text}");

    // The outage and its recovery, measured.
    let recovery = &report.recovery;
    assert_eq!(report.vitally_503, 3);
    assert!(recovery.retried >= 1 && recovery.retries as u64 == retried);
    assert_eq!(recovery.synced + recovery.superseded, recovery.retried);
    let outage = format!(
        "Vitally answered 503 for 3 call(s); {} event(s) retried",
        recovery.retried
    );
    assert!(text.contains(&outage), "{text}");
    assert!(text.contains("s after the last 503"), "{text}");

    // One instance as Vitally holds it: request 101 (Alice: Acme Corp + Acme EU).
    let instance = report.instance.as_ref().expect("an instance is shown");
    assert_eq!(instance.request_id, 101);
    assert_eq!(instance.organization.as_deref(), Some("Acme Corp"));
    assert_eq!(instance.account.as_deref(), Some("Acme EU"));
    let traits: Vec<&str> = instance.traits.iter().map(|(l, _)| l.as_str()).collect();
    for label in ["Source", "Title", "Status", "Requestor"] {
        assert!(traits.contains(&label), "{traits:?}");
    }
    assert!(
        text.contains("request 101 as Vitally now holds it"),
        "{text}"
    );
    assert!(text.contains("Alice <alice@acme.com>"), "{text}");

    // Every varying reason is explained, in one line each.
    for (reason, meaning) in REASONS {
        assert!(
            text.contains(&format!("  {reason:<16} {meaning}\n")),
            "{reason}"
        );
    }
    // The endpoints are gone once run returns: no dead URLs printed.
    assert!(!text.contains("http://"), "{text}");
    assert!(text.contains("`demo --serve` keeps them up"), "{text}");

    // Each column starts at the same place on every row (request 111 included).
    let header = text.lines().find(|l| l.starts_with("request  ")).unwrap();
    assert!(header.starts_with("request  source  "), "{header}");
    assert!(
        text.contains("\n101      slack     1 org × 1 account"),
        "{text}"
    );
    let column = header.find("requestor").unwrap();
    for row in text
        .lines()
        .filter(|l| l.starts_with("1") && l.len() > column)
    {
        let before: String = row.chars().take(header[..column].chars().count()).collect();
        assert!(
            before.ends_with("  "),
            "{row:?} overflows into the requestor column"
        );
    }
    assert!(report.elapsed > Duration::ZERO && report.elapsed < options.deadline);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_the_demo_fails_and_still_removes_its_queues_and_schema() {
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let config = Config::defaults_with(&[("REDIS_URL", "redis://127.0.0.1:1")]).unwrap();
    let options = DemoOptions {
        run_id: Some(run_id.clone()),
        deadline: Duration::from_secs(10),
        ..DemoOptions::default()
    };
    let error = run(&config, &options).await.expect_err("no Redis, no demo");
    assert!(format!("{error:#}").contains("Redis"), "{error:#}");

    let topology = thena_broker::Topology::new(format!("demo-{run_id}"));
    let connection = lapin::Connection::connect(
        &thena_testkit::amqp_url(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    for queue in [
        topology.sync_queue(),
        topology.dead_queue(),
        topology.parked_queue(),
    ] {
        let channel = connection.create_channel().await.unwrap();
        let found = channel
            .queue_declare(
                queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await;
        assert!(found.is_err(), "{queue} was left behind");
    }
    let _ = connection.close(200, "done".into()).await;
    let db = thena_store::Db::new(
        &secrecy::SecretString::from(thena_testkit::database_url()),
        "public",
    )
    .unwrap();
    let schema = format!("demo_{run_id}");
    let left = db
        .client()
        .await
        .unwrap()
        .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&schema])
        .await
        .unwrap();
    assert!(left.is_none(), "{schema} was left behind");
}

/// `emit` with its defaults against `fake-vitally --demo-seed` syncs: each of its default
/// requestors is a demo persona that links somewhere (the producer keeps a copy, since it
/// must not depend on the demo).
#[test]
fn emits_default_personas_are_demo_customers_that_link() {
    use thena_demo::customers::Expect;
    for persona in thena_producer::emit::demo_seed_personas() {
        let known = PERSONAS
            .iter()
            .find(|p| p.email == persona.email.as_deref())
            .unwrap_or_else(|| panic!("{persona} is not in the demo seed"));
        assert_eq!(known.name, persona.name);
        assert!(
            matches!(known.expect, Expect::Linked { .. }),
            "{persona} is seeded but does not sync: {:?}",
            known.expect
        );
    }
}
