//! The operator console's pages under a realistic load: 10,000 requests in the ledger
//! (30,000 outcomes, a day of hourly counts) across three workspaces, and 5,000 parked
//! messages. Each page is fetched 30 times, interleaved with its admin API twin (the
//! baseline: the same data as JSON, without a page), and the server's own time
//! (`Server-Timing`) is printed with the ratio. `cargo bench --bench console`.

#[allow(dead_code)]
#[path = "../tests/it/support.rs"]
mod support;

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use support::Fleet;
use thena_events::sample;
use thena_store::ledger::{Entry, Ledger};

const TOKEN: &str = "console-bench-admin-token";
const WORKSPACES: [&str; 3] = ["T-ACME", "T-GLOBEX", "T-INITECH"];
const REQUESTS: u64 = 10_000;
const OUTCOMES_PER_REQUEST: u64 = 3;
const PARKED: usize = 5_000;
const ROUNDS: usize = 30;
const GOAL_MS: f64 = 200.0;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let fleet = Fleet::start_with(
        fake_vitally::FakeConfig::default(),
        &[("PRODUCER_TOKEN", TOKEN), ("CONSOLE_ENABLED", "true")],
    )
    .await;
    for ws in WORKSPACES {
        fleet.connect(ws, |_| {}).await;
    }
    let started = Instant::now();
    fill_ledger(&fleet).await;
    park(&fleet).await;
    // The replayer drains the parked queue into the parked set (PostgreSQL).
    let mut fleet = fleet;
    fleet.spawn_replayer().await;
    thena_testkit::wait_until(
        "every parked message in the parked set",
        Duration::from_secs(300),
        || async { (fleet.parked().await >= PARKED as u64).then_some(()) },
    )
    .await;
    println!(
        "filled: {REQUESTS} requests ({} outcomes), {PARKED} parked messages in {:.1} s",
        REQUESTS * OUTCOMES_PER_REQUEST,
        started.elapsed().as_secs_f64()
    );

    let registry = prometheus::Registry::new();
    let state = thena_producer::from_config(&fleet.config, &registry, Default::default())
        .await
        .expect("producer");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(thena_producer::run(listener, state, stop.clone()));
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let cookie = sign_in(&http, &base).await;

    let ws = WORKSPACES[0];
    let id = 4242;
    let pages: Vec<(&str, String, String)> = vec![
        (
            "integrations",
            "/console/integrations".into(),
            "/v1/integrations".into(),
        ),
        (
            "integration",
            format!("/console/integrations/{ws}"),
            format!("/v1/integrations/{ws}"),
        ),
        (
            "add integration (modal)",
            "/console/integrations/new/credentials".into(),
            "/v1/integrations".into(),
        ),
        (
            "lookup by id",
            format!("/console/requests?q={id}"),
            format!("/v1/integrations/{ws}/requests/{id}"),
        ),
        (
            "lookup by email",
            "/console/requests?q=user7%40acme.com".into(),
            format!("/v1/integrations/{ws}/requests?limit=50"),
        ),
        (
            "request",
            format!("/console/requests/{ws}/{id}"),
            format!("/v1/integrations/{ws}/requests/{id}"),
        ),
        (
            "dead letters",
            "/console/dead-letters".into(),
            "/v1/dead-letters?limit=50".into(),
        ),
        (
            "dead letters, filtered",
            format!("/console/dead-letters?workspace={ws}&reason=vitally_400&older_than=1s"),
            format!("/v1/dead-letters?workspace={ws}&reason=vitally_400&older_than=1s&limit=50"),
        ),
        (
            "dead letter",
            "/console/dead-letters/2500".into(),
            "/v1/dead-letters/2500".into(),
        ),
        (
            "purge confirmation",
            format!("/console/dead-letters/purge?workspace={ws}"),
            format!("/v1/dead-letters?workspace={ws}&limit=50"),
        ),
    ];
    let mut console_ms: Vec<Vec<f64>> = vec![Vec::new(); pages.len()];
    let mut console_wall: Vec<Vec<f64>> = vec![Vec::new(); pages.len()];
    let mut api_wall: Vec<Vec<f64>> = vec![Vec::new(); pages.len()];
    for _ in 0..ROUNDS {
        for (n, (_, page, api)) in pages.iter().enumerate() {
            let (server, wall) = fetch_page(&http, &base, page, &cookie).await;
            console_ms[n].push(server);
            console_wall[n].push(wall);
            api_wall[n].push(fetch_api(&http, &base, api).await);
        }
    }

    println!(
        "\n{:<26} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11} {:>7}",
        "page", "first ms", "p50 ms", "p99 ms", "max ms", "wall p50", "API p50", "ratio"
    );
    let mut worst: f64 = 0.0;
    for (n, (name, _, _)) in pages.iter().enumerate() {
        // The first fetch also opens the pool's connections and prepares statements.
        let first = console_ms[n][0];
        let server = &mut console_ms[n];
        let max = percentile(server, 1.0);
        worst = worst.max(max);
        let wall = percentile(&mut console_wall[n], 0.5);
        let api = percentile(&mut api_wall[n], 0.5);
        println!(
            "{:<26} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>11.1} {:>11.1} {:>6.1}×",
            name,
            first,
            percentile(server, 0.5),
            percentile(server, 0.99),
            max,
            wall,
            api,
            wall / api.max(0.001)
        );
    }
    println!(
        "\nslowest page, server time: {worst:.1} ms — {} the {GOAL_MS:.0} ms goal \
         ({REQUESTS} ledger rows, {PARKED} parked messages, {ROUNDS} rounds each; \
         API p50 = the admin API's JSON twin, same run, interleaved)",
        if worst <= GOAL_MS { "within" } else { "OVER" }
    );
    stop.cancel();
    let _ = server.await;
    fleet.stop().await;
}

async fn sign_in(http: &reqwest::Client, base: &str) -> String {
    let answer = http
        .post(format!("{base}/console/sign-in"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={TOKEN}"))
        .send()
        .await
        .unwrap();
    answer.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned()
}

/// (server time from `Server-Timing`, wall time) in ms.
async fn fetch_page(http: &reqwest::Client, base: &str, path: &str, cookie: &str) -> (f64, f64) {
    let started = Instant::now();
    let answer = http
        .get(format!("{base}{path}"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert!(
        answer.status().is_success() || answer.status().is_redirection(),
        "{path}: {}",
        answer.status()
    );
    let timing = answer.headers()["server-timing"]
        .to_str()
        .unwrap()
        .trim_start_matches("console;dur=")
        .parse::<f64>()
        .unwrap();
    answer.bytes().await.unwrap();
    (timing, started.elapsed().as_secs_f64() * 1000.0)
}

async fn fetch_api(http: &reqwest::Client, base: &str, path: &str) -> f64 {
    let started = Instant::now();
    let answer = http
        .get(format!("{base}{path}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success(), "{path}: {}", answer.status());
    answer.bytes().await.unwrap();
    started.elapsed().as_secs_f64() * 1000.0
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let rank = ((p * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

/// 10,000 requests, each with three outcomes, written through the ledger's own writer;
/// then a day of hourly counts behind them.
async fn fill_ledger(fleet: &Fleet) {
    let ledger = Ledger::start(fleet.store.db().clone());
    let outcomes = [
        ("synced", "created", Some(Duration::from_millis(400))),
        ("synced", "updated", Some(Duration::from_millis(900))),
        ("skipped", "domain_unknown", None),
    ];
    let ids: Vec<u64> = (1..=REQUESTS).collect();
    for chunk in ids.chunks(500) {
        join_all(chunk.iter().flat_map(|id| {
            let ws = WORKSPACES[(*id % 3) as usize];
            let email = format!("user{}@acme.com", id % 500);
            let ledger = ledger.clone();
            (1..=OUTCOMES_PER_REQUEST).map(move |version| {
                let ledger = ledger.clone();
                let event = sample::event(ws, *id, version, Some(&email));
                let (outcome, reason, age) = outcomes[(version - 1) as usize];
                async move {
                    ledger
                        .record(Entry {
                            workspace_id: ws.into(),
                            request_id: event.request.id,
                            version,
                            snapshot: serde_json::to_value(&event).ok(),
                            outcome,
                            reason: reason.into(),
                            detail: None,
                            link: None,
                            instance_id: Some(format!("inst-{}", event.request.id)),
                            failed_attempt: false,
                            backfill_job: None,
                            age,
                        })
                        .await
                        .expect("ledger write")
                }
            })
        }))
        .await;
    }
    let client = fleet.store.db().client().await.unwrap();
    client
        .execute(
            "INSERT INTO ledger_hourly (workspace_id, hour, outcome, reason, age_bucket, events)
             SELECT ws, date_trunc('hour', now()) - h * interval '1 hour', o, r, b, 100 + h
             FROM unnest($1::text[]) ws, generate_series(1, 23) h,
                  (VALUES ('synced', 'created', 3::smallint), ('synced', 'updated', 5::smallint),
                          ('skipped', 'domain_unknown', -1::smallint),
                          ('retried', 'vitally_503', -1::smallint),
                          ('deferred', 'vitally_429', -1::smallint)) v(o, r, b)",
            &[&WORKSPACES.to_vec()],
        )
        .await
        .unwrap();
}

/// 5,000 messages in the parked queue, as consumers park them.
async fn park(fleet: &Fleet) {
    let topology = fleet.broker.topology();
    let ids: Vec<u64> = (1..=PARKED as u64).collect();
    for chunk in ids.chunks(250) {
        join_all(chunk.iter().map(|id| {
            let ws = WORKSPACES[(*id % 3) as usize];
            let event = sample::event(ws, 100_000 + id, 1, Some("alice@acme.com"));
            let body = serde_json::to_vec(&event).unwrap();
            let failure = thena_broker::Failure::for_delivery(
                None,
                &topology.exchange(),
                &thena_broker::Topology::routing_key(ws),
                thena_broker::FailureClass::Permanent,
                "vitally_400",
                "Vitally answered 400: unknown trait",
                chrono::Utc::now(),
            );
            let publisher = &fleet.publisher;
            async move {
                publisher
                    .park(
                        &body,
                        &lapin::BasicProperties::default().with_delivery_mode(2),
                        &failure,
                    )
                    .await
                    .expect("park")
            }
        }))
        .await;
    }
}
