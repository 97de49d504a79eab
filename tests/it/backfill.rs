//! Opt-in backfill over the wire: historical requests (created before the integration)
//! imported through the admin API or the CLI, on their own lane, each synced once — even
//! when the import is killed half-way and run again.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use chrono::Utc;
use serde_json::Value;
use thena_events::RequestChanged;
use thena_store::backfill as jobs;
use thena_testkit::{proxy::TcpProxy, wait_until};

use crate::support::{Fleet, WS, status_of, versioned};

const TOKEN: &str = "t-backfill-token-0123456789";

/// A request created `days` before now, at `version` (its Status says `v{version}`).
fn historical(id: u64, version: u64, days: i64) -> RequestChanged {
    let mut event = versioned(WS, id, version);
    event.request.created_at = Utc::now() - chrono::Duration::days(days);
    event
}

fn ndjson(events: &[RequestChanged]) -> String {
    events
        .iter()
        .map(|e| serde_json::to_string(e).unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until each request has exactly one instance, at `v{version}`.
async fn all_at(fleet: &Fleet, ids: &[u64], version: u64, deadline: Duration) {
    let want = format!("v{version}");
    wait_until("every backfilled request in Vitally", deadline, || async {
        ids.iter()
            .all(|id| {
                let instances = fleet.instances_for(WS, *id);
                instances.len() == 1 && status_of(&instances[0]) == want
            })
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_posted_to_the_api_syncs_requests_from_before_the_integration_once_each() {
    let mut fleet = Fleet::start_with(Default::default(), &[("PRODUCER_TOKEN", TOKEN)]).await;
    fleet.connect(WS, |_| {}).await;
    fleet.spawn_consumer().await;
    let producer = fleet.spawn_producer().await;
    let base_url = producer.base_url.clone();

    // Live, a request from before the integration is skipped: the product is
    // forward-only.
    fleet.publish(&historical(7001, 1, 30)).await;
    fleet.wait_settled(1).await;
    assert_eq!(fleet.count("skipped", Some("before_integration")), 1);

    // The export: 20 requests, one of them also at an older version, a broken line and
    // a line of another workspace.
    let ids: Vec<u64> = (7001..7021).collect();
    let mut events: Vec<RequestChanged> = ids.iter().map(|id| historical(*id, 3, 30)).collect();
    events.push(historical(7005, 2, 30));
    let mut foreign = historical(7999, 1, 30);
    foreign.workspace_id = "T-OTHER".into();
    events.push(foreign);
    let body = format!("{}\n{{broken\n", ndjson(&events));

    let http = reqwest::Client::new();
    let url = format!("{base_url}/v1/integrations/{WS}/backfill");
    let post = || {
        http.post(&url)
            .bearer_auth(TOKEN)
            .header("content-type", "application/x-ndjson")
            .body(body.clone())
            .send()
    };
    let response = post().await.unwrap();
    assert_eq!(response.status(), 202);
    let started: Value = response.json().await.unwrap();
    println!("{started:#}");
    assert_eq!(started["job"]["requests"], 20);
    assert_eq!(started["rejected"], 2);
    assert_eq!(started["published_now"], 20);
    assert_eq!(started["resumed"], false);
    let job = started["job"]["id"].as_str().unwrap().to_owned();

    all_at(&fleet, &ids, 3, Duration::from_secs(60)).await;
    let progress = wait_until("the job to settle", Duration::from_secs(30), || async {
        let progress = jobs::progress(fleet.store.db(), WS, &job)
            .await
            .unwrap()
            .unwrap();
        progress.is_done().then_some(progress)
    })
    .await;
    assert_eq!(
        (progress.synced, progress.skipped, progress.parked),
        (20, 0, 0)
    );

    // The same export again: the same job, nothing new to send, nothing written twice.
    let again: Value = post().await.unwrap().json().await.unwrap();
    assert_eq!(again["resumed"], true);
    assert_eq!(again["job"]["id"], job.as_str());
    assert_eq!(again["published_now"], 0);
    assert!(ids.iter().all(|id| fleet.instances_for(WS, *id).len() == 1));

    // Said where people look: the integration's history and the job's own view.
    let history = fleet.store.history(WS, 50).await.unwrap();
    let started_line = history
        .iter()
        .find(|h| h.action == "backfill_started")
        .expect("the backfill is in the integration's history");
    assert_eq!(started_line.changes["job"], job.as_str());
    assert_eq!(started_line.changes["requests"], 20);
    let shown: Value = http
        .get(format!("{url}/{job}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(shown["done"], true);
    assert_eq!(shown["synced"], 20);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_killed_half_way_and_run_again_leaves_exactly_one_instance_per_request() {
    let mut fleet = Fleet::start_with(
        Default::default(),
        &[
            ("BACKFILL_BUDGET_SHARE", "1"),
            ("BACKFILL_CONCURRENCY", "8"),
        ],
    )
    .await;
    fleet.connect(WS, |r| r.rate_budget_per_min = 1000).await;
    fleet.spawn_consumer().await;
    let ids: Vec<u64> = (8001..8151).collect();
    let export: Vec<RequestChanged> = ids.iter().map(|id| historical(*id, 2, 90)).collect();
    let file = std::env::temp_dir().join(format!("{}-export.ndjson", fleet.env.prefix));
    std::fs::write(&file, ndjson(&export)).unwrap();

    // The first run talks to RabbitMQ over a slow link, and is killed (SIGKILL) once
    // some of the export is confirmed on the broker and the rest is not.
    let proxy = TcpProxy::start(crate::support::authority(&thena_testkit::amqp_url()))
        .await
        .unwrap();
    proxy.set_latency(Duration::from_millis(40));
    let run = |amqp_url: String| {
        let mut env = fleet.variables();
        env.retain(|(name, _)| *name != "AMQP_URL");
        env.push(("AMQP_URL", amqp_url));
        let mut command = Command::new(env!("CARGO_BIN_EXE_thena-vitally"));
        command
            .args(["backfill", WS, "--file"])
            .arg(&file)
            .args(["--actor", "test", "--no-wait"])
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    };
    let mut first = run(proxy.url_via(&thena_testkit::amqp_url()).unwrap())
        .spawn()
        .unwrap();
    let db = fleet.store.db().clone();
    let at_kill = wait_until(
        "part of the export on the broker",
        Duration::from_secs(60),
        || async {
            let list = jobs::list(&db, WS).await.ok()?;
            let job = list.first()?;
            (job.published > 0).then(|| job.clone())
        },
    )
    .await;
    first.kill().expect("SIGKILL the backfill");
    first.wait().unwrap();
    assert!(
        at_kill.published < ids.len() as u64 && at_kill.published_at.is_none(),
        "killed half-way: {at_kill:?}"
    );

    // Run again: it resumes the same job after what was confirmed.
    let again = run(thena_testkit::amqp_url()).output().unwrap();
    let said = String::from_utf8_lossy(&again.stdout);
    assert!(
        again.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(said.contains("resumed"), "{said}");
    assert!(said.contains(&at_kill.id), "{said}");

    all_at(&fleet, &ids, 2, Duration::from_secs(120)).await;
    let done = wait_until("the job to settle", Duration::from_secs(30), || async {
        let progress = jobs::progress(&db, WS, &at_kill.id).await.unwrap().unwrap();
        progress.is_done().then_some(progress)
    })
    .await;
    println!(
        "killed with {} of {} published; after the rerun: {done:?}",
        at_kill.published,
        ids.len()
    );
    assert_eq!(done.synced + done.skipped, ids.len() as u64);
    assert_eq!(done.parked, 0);
    assert_eq!(
        jobs::list(&db, WS).await.unwrap().len(),
        1,
        "one job for one export"
    );
    let _ = std::fs::remove_file(&file);
    fleet.stop().await;
}
