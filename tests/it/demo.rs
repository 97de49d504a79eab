//! The README's main job, end to end: every role in one process, every linking case.

use thena_demo::{DemoOptions, customers::PERSONAS, run};
use thena_runtime::Config;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_puts_every_request_where_the_linking_rules_say() {
    let config = Config::defaults_with(&[]).unwrap();
    let report = run(&config, &DemoOptions::default()).await.expect("demo");
    println!("{report}");
    assert_eq!(report.rows.len(), PERSONAS.len());
    assert!(report.mismatches().is_empty(), "{:?}", report.mismatches());
    let retried: u64 = report
        .counters
        .iter()
        .filter(|((outcome, _), _)| outcome == "retried")
        .map(|(_, n)| n)
        .sum();
    assert!(retried >= 1, "the injected outage took the retry path");
    assert!(report.urls.iter().any(|u| u.ends_with("/metrics")));
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
