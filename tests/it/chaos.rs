//! Chaos: real faults against a running fleet — a consumer process killed with SIGKILL,
//! RabbitMQ and Redis "restarting" (a [`TcpProxy`] in front of them is cut, so only this
//! test's connections die), Vitally down, rate-limiting or slow — with compressed timings.
//!
//! Every case ends with the same accounting ([`Chaos::account`]): each request exists in
//! Vitally exactly once at its latest version (its Status trait carries the version), or
//! it was skipped for its stated reason; every event the in-process consumers saw ended
//! synced or skipped; and nothing is left in the sync, dead or delay queues.
//!
//! A request lock whose holder died, or that could not be released while Redis was away,
//! blocks its request until the lock expires: tests run with `REQUEST_LOCK_TTL=8s`
//! (production: 60 s). The last Redis case pins a bug this suite found: a version synced
//! while Redis was away went unrecorded and an older one overwrote it later; the
//! consumer now retries such an event until its version is recorded.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use fake_vitally::{FakeConfig, Fault, FaultKind};
use prometheus::Registry;
use secrecy::SecretString;
use thena_events::sample;
use thena_runtime::{Config, ops::Readiness};
use thena_sync::{outcome::Outcome, worker::Settled};
use thena_testkit::{proxy::TcpProxy, wait_until};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use crate::support::{Fleet, Process, WS, authority, status_of};

/// Linked to an account: these requests must end up in Vitally.
const LINKED: &str = "alice@acme.com";
/// A Vitally user in two accounts: never synced (after a Vitally lookup, so faults apply).
const AMBIGUOUS: &str = "gina@multi.co";
const AMBIGUOUS_REASON: &str = "user_in_many_accounts";

/// How long the accounting waits for the fleet to catch up after the fault ended.
const CATCH_UP: Duration = Duration::from_secs(40);
/// A request lock whose holder died (or could not release it while Redis was away)
/// blocks that request until the lock expires: REQUEST_LOCK_TTL (60 s) plus catching up.
const CATCH_UP_AFTER_LOST_LOCKS: Duration = Duration::from_secs(100);

/// What the accounting expects of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// One instance whose Status is `v{version}` of the highest version published.
    Latest,
    /// No instance; every final outcome is this skip reason (or a redelivery skip).
    Skipped(&'static str),
}

/// What the in-process consumers counted, by outcome (and reason).
#[derive(Debug)]
struct Tally {
    synced: u64,
    skipped: u64,
    retried: BTreeMap<String, u64>,
    deferred: BTreeMap<String, u64>,
}

impl Tally {
    fn retried(&self, reason: &str) -> u64 {
        self.retried.get(reason).copied().unwrap_or(0)
    }

    fn deferred(&self, reason: &str) -> u64 {
        self.deferred.get(reason).copied().unwrap_or(0)
    }
}

/// A role running in this process, as the binary runs it.
struct Role {
    registry: Registry,
    readiness: Readiness,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

/// A fleet plus what a chaos case needs: roles on chosen connections, an observer of
/// every settled delivery, and the expected end state of each request.
struct Chaos {
    name: &'static str,
    fleet: Fleet,
    roles: Vec<Role>,
    observer: mpsc::UnboundedSender<Settled>,
    settled: Arc<Mutex<Vec<Settled>>>,
    /// Request id → (highest version published, expectation).
    requests: BTreeMap<u64, (u64, Expect)>,
    /// Every (request id, version) published.
    published: Vec<(u64, u64)>,
    /// Settled by a consumer process this test killed (from its last metrics scrape):
    /// those events are not seen by the observer.
    unobserved: Option<u64>,
    /// How long [`Chaos::account`] waits for the fleet to catch up.
    catch_up: Duration,
    started: Instant,
}

impl Chaos {
    async fn start(name: &'static str, overrides: &[(&'static str, &str)]) -> Chaos {
        let fleet = Fleet::start_with(FakeConfig::default(), overrides).await;
        // The full budget Vitally allows (1000/min, ~17 calls/s fleet-wide) paces every
        // case: the event counts below are sized to it.
        fleet.connect(WS, |_| {}).await;
        let (observer, mut observed) = mpsc::unbounded_channel();
        let settled: Arc<Mutex<Vec<Settled>>> = Arc::default();
        let sink = settled.clone();
        tokio::spawn(async move {
            while let Some(one) = observed.recv().await {
                sink.lock().unwrap().push(one);
            }
        });
        Chaos {
            name,
            fleet,
            roles: Vec::new(),
            observer,
            settled,
            requests: BTreeMap::new(),
            published: Vec::new(),
            unobserved: None,
            catch_up: CATCH_UP,
            started: Instant::now(),
        }
    }

    /// The fleet's configuration with RabbitMQ and/or Redis reached through a proxy.
    fn config_via(&self, amqp: Option<&TcpProxy>, redis: Option<&TcpProxy>) -> Config {
        use secrecy::ExposeSecret;
        let mut config = self.fleet.config.clone();
        if let Some(proxy) = amqp {
            let url = proxy.url_via(config.amqp_url.expose_secret()).unwrap();
            config.amqp_url = SecretString::from(url);
        }
        if let Some(proxy) = redis {
            let url = proxy.url_via(config.redis_url.expose_secret()).unwrap();
            config.redis_url = SecretString::from(url);
        }
        config
    }

    async fn spawn_consumer(&mut self, config: &Config) {
        let registry = Registry::new();
        let readiness = Readiness::new();
        let mut worker = thena_sync::app::build_worker(config, &registry, readiness.clone())
            .await
            .expect("consumer");
        worker.observer = Some(self.observer.clone());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(worker.run(shutdown.clone()));
        self.roles.push(Role {
            registry,
            readiness,
            shutdown,
            task,
        });
    }

    async fn spawn_replayer(&mut self, config: &Config) {
        let registry = Registry::new();
        let readiness = Readiness::new();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let config = config.clone();
            let registry = registry.clone();
            let readiness = readiness.clone();
            let shutdown = shutdown.clone();
            async move { thena_replayer::run_from_config(&config, &registry, readiness, shutdown).await }
        });
        self.roles.push(Role {
            registry,
            readiness,
            shutdown,
            task,
        });
    }

    /// Publishes version `version` of request `id` (its Status says `v{version}`).
    async fn publish(&mut self, id: u64, version: u64, email: &str) {
        let mut event = sample::event(WS, id, version, Some(email));
        event.request.status = Some(format!("v{version}"));
        self.fleet.publish(&event).await;
        let expect = if email == AMBIGUOUS {
            Expect::Skipped(AMBIGUOUS_REASON)
        } else {
            Expect::Latest
        };
        let entry = self.requests.entry(id).or_insert((version, expect));
        entry.0 = entry.0.max(version);
        self.published.push((id, version));
    }

    /// `requests` linked requests and `skipped` ambiguous ones, `versions` versions each,
    /// in publishing order: every request's v1, then every v2, ...
    fn plan(
        first_id: u64,
        requests: u64,
        skipped: u64,
        versions: u64,
    ) -> Vec<(u64, u64, &'static str)> {
        let mut plan = Vec::new();
        for version in 1..=versions {
            for n in 0..requests + skipped {
                let email = if n < requests { LINKED } else { AMBIGUOUS };
                plan.push((first_id + n, version, email));
            }
        }
        plan
    }

    /// Every sample of metric `name` across this test's roles: labels and value.
    fn samples(&self, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        self.roles
            .iter()
            .flat_map(|role| role.registry.gather())
            .filter(|family| family.name() == name)
            .flat_map(|family| family.get_metric().to_vec())
            .map(|metric| {
                let labels = metric
                    .get_label()
                    .iter()
                    .map(|l| (l.name().to_string(), l.value().to_string()))
                    .collect();
                // A counter's gauge part is zero and vice versa.
                let value = metric.get_counter().get_value() + metric.get_gauge().get_value();
                (labels, value)
            })
            .collect()
    }

    /// Sum of metric `name` over the samples that carry every `(label, value)` given.
    fn sum(&self, name: &str, wanted: &[(&str, &str)]) -> u64 {
        self.samples(name)
            .into_iter()
            .filter(|(labels, _)| {
                wanted
                    .iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, value)| value as u64)
            .sum()
    }

    /// Events counted by outcome (and reason) across this test's in-process roles.
    fn count(&self, outcome: &str, reason: Option<&str>) -> u64 {
        match reason {
            Some(reason) => self.sum(
                "thena_vitally_events_total",
                &[("outcome", outcome), ("reason", reason)],
            ),
            None => self.sum("thena_vitally_events_total", &[("outcome", outcome)]),
        }
    }

    /// Versions of request `id` that reached any outcome in an in-process consumer.
    fn settled_versions(&self, id: u64) -> Vec<u64> {
        self.settled
            .lock()
            .unwrap()
            .iter()
            .filter(|one| one.request_id == Some(id))
            .filter_map(|one| one.version)
            .collect()
    }

    /// Waits until version `version` of request `id` ended synced or skipped.
    async fn wait_final(&self, id: u64, version: u64) {
        wait_until(
            &format!("request {id} v{version} synced or skipped"),
            Duration::from_secs(15),
            || async {
                self.settled
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|one| {
                        one.request_id == Some(id)
                            && one.version == Some(version)
                            && matches!(one.outcome, Outcome::Synced { .. } | Outcome::Skipped(_))
                    })
                    .then_some(())
            },
        )
        .await;
    }

    /// Counts by reason for one outcome, e.g. `{vitally_503: 7, vitally_timeout: 2}`.
    fn reasons(&self, outcome: &str) -> BTreeMap<String, u64> {
        let mut reasons = BTreeMap::new();
        for (labels, value) in self.samples("thena_vitally_events_total") {
            if labels.get("outcome").map(String::as_str) == Some(outcome) {
                let reason = labels.get("reason").cloned().unwrap_or_default();
                *reasons.entry(reason).or_default() += value as u64;
            }
        }
        reasons
    }

    fn in_flight(&self) -> u64 {
        self.sum("thena_vitally_consumer_in_flight", &[])
    }

    /// Requests not (yet) in their expected state, with what is wrong.
    fn misplaced(&self) -> Vec<String> {
        let instances = self.fleet.fake.instances();
        let mut wrong = Vec::new();
        for (&id, &(latest, expect)) in &self.requests {
            let external_id = format!("thena:{WS}:{id}");
            let found: Vec<_> = instances
                .iter()
                .filter(|i| i.external_id == external_id)
                .collect();
            let statuses: Vec<String> = found.iter().map(|i| status_of(i)).collect();
            let ok = match expect {
                Expect::Latest => statuses == [format!("v{latest}")],
                Expect::Skipped(_) => statuses.is_empty(),
            };
            if !ok {
                wrong.push(format!(
                    "request {id} (latest v{latest}, {expect:?}): instances {statuses:?}"
                ));
            }
        }
        wrong
    }

    /// Depth of every queue an unfinished event could sit in.
    async fn backlog(&self) -> Option<BTreeMap<String, u32>> {
        let topology = &self.fleet.env.topology;
        let mut queues = vec![topology.sync_queue(), topology.dead_queue()];
        queues.extend(topology.delay_queues());
        let mut depths = BTreeMap::new();
        for queue in queues {
            let depth = self.fleet.env.queue_depth(&queue).await.ok()?;
            depths.insert(queue, depth);
        }
        Some(depths)
    }

    /// The accounting every case ends with; prints the case's one-line summary and
    /// shuts the fleet down.
    async fn account(self, detail: impl FnOnce(&Chaos) -> String) -> Tally {
        let started = Instant::now();
        loop {
            let wrong = self.misplaced();
            if wrong.is_empty() {
                break;
            }
            assert!(
                started.elapsed() < self.catch_up,
                "{}: after {:?} not every request is in Vitally exactly once at its \
                 latest version: {wrong:#?}\nretried: {:?}, deferred: {:?}",
                self.name,
                self.catch_up,
                self.reasons("retried"),
                self.reasons("deferred"),
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Quiet twice in a row: no queue holds anything and no consumer works on
        // anything (a dead letter in the replayer's hands shows up in a delay queue).
        let quiet_before = std::cell::Cell::new(false);
        wait_until(
            "the sync, dead and delay queues to drain",
            self.catch_up,
            || async {
                let quiet = self
                    .backlog()
                    .await
                    .is_some_and(|backlog| backlog.values().all(|depth| *depth == 0))
                    && self.in_flight() == 0;
                (quiet_before.replace(quiet) && quiet).then_some(())
            },
        )
        .await;
        // Nothing arrived late to break what was checked above.
        let wrong = self.misplaced();
        assert!(wrong.is_empty(), "{}: {wrong:#?}", self.name);

        let parked = self.fleet.env.topology.parked_queue();
        assert_eq!(
            self.fleet.env.queue_depth(&parked).await.unwrap(),
            0,
            "{}: a transient fault parks nothing",
            self.name
        );
        assert_eq!(
            self.fleet.parked().await,
            0,
            "{}: nothing in the parked set",
            self.name
        );
        assert_eq!(self.count("parked", None), 0, "{}: parked", self.name);

        // Every event the in-process consumers saw ended synced or skipped for a reason
        // that fits its request.
        let settled = self.settled.lock().unwrap().clone();
        let mut finals: BTreeSet<(u64, u64)> = BTreeSet::new();
        for one in &settled {
            let (Some(id), Some(version)) = (one.request_id, one.version) else {
                panic!("{}: an undecodable delivery: {one:?}", self.name);
            };
            let (_, expect) = self.requests[&id];
            match &one.outcome {
                Outcome::Synced { .. } => {
                    assert_eq!(expect, Expect::Latest, "{}: synced {one:?}", self.name);
                    finals.insert((id, version));
                }
                Outcome::Skipped(skip) => {
                    let reason = skip.as_str();
                    let fits = matches!(reason, "stale_version" | "already_applied")
                        || expect == Expect::Skipped(reason);
                    assert!(
                        fits,
                        "{}: request {id} v{version} skipped as {reason}",
                        self.name
                    );
                    finals.insert((id, version));
                }
                Outcome::Deferred { .. } | Outcome::Retry { .. } => {}
                Outcome::Park { .. } => panic!("{}: parked {one:?}", self.name),
                Outcome::Held { .. } => panic!(
                    "{}: held {one:?} (no integration is paused here)",
                    self.name
                ),
            }
        }
        let unsettled: Vec<_> = self
            .published
            .iter()
            .filter(|event| !finals.contains(event))
            .collect();
        match self.unobserved {
            // Those were settled by the process this test killed, before it died: at most
            // what it had settled when last scraped plus what it held (prefetch 64).
            Some(by_killed) => assert!(
                unsettled.len() as u64 <= by_killed + 64,
                "{}: {} events without a final outcome, the killed consumer settled ~{by_killed}",
                self.name,
                unsettled.len()
            ),
            None => assert!(
                unsettled.is_empty(),
                "{}: events without a final outcome: {unsettled:?}",
                self.name
            ),
        }

        let linked = self
            .requests
            .values()
            .filter(|(_, e)| *e == Expect::Latest)
            .count();
        let tally = Tally {
            synced: self.count("synced", None),
            skipped: self.count("skipped", None),
            retried: self.reasons("retried"),
            deferred: self.reasons("deferred"),
        };
        let killed = match self.unobserved {
            Some(_) => format!(" settled-by-the-killed-process={}", unsettled.len()),
            None => String::new(),
        };
        println!(
            "chaos {}: events={} requests={} (linked {linked}) synced={} skipped={} \
             retried={:?} deferred={:?} requeued={}{killed} elapsed={:.1?} {}",
            self.name,
            self.published.len(),
            self.requests.len(),
            tally.synced,
            tally.skipped,
            tally.retried,
            tally.deferred,
            self.count("requeued", None),
            self.started.elapsed(),
            detail(&self),
        );
        self.stop().await;
        tally
    }

    async fn stop(self) {
        for role in self.roles {
            role.shutdown.cancel();
            match role.task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("{}: a role failed: {e:#}", self.name),
                Err(e) => panic!("{}: a role panicked: {e}", self.name),
            }
        }
        self.fleet.stop().await;
    }
}

/// `GET path` over plain HTTP/1.0 (the ops endpoints of a child process).
async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    Some(response)
}

/// Sum of a metric's samples whose line contains every one of `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(name) && !line.starts_with('#'))
        .filter(|line| {
            line[name.len()..].starts_with(['{', ' ']) && labels.iter().all(|l| line.contains(l))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Deletes one key of this test's Redis prefix, on a direct connection.
async fn redis_del(key: &str) {
    let client = redis::Client::open(thena_testkit::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::AsyncCommands::del(&mut conn, key).await.unwrap();
}

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// Something done to the fleet's surroundings mid-stream.
enum Step<'a> {
    Cut(&'a TcpProxy),
    Restore(&'a TcpProxy),
    Inject(Fault),
}

/// Publishes `plan` as a steady stream, one event per `every`, taking each step just
/// before the event at its index. Returns when each step was taken.
async fn stream(
    chaos: &mut Chaos,
    plan: &[(u64, u64, &'static str)],
    every: Duration,
    mut steps: Vec<(usize, Step<'_>)>,
) -> Vec<Instant> {
    let mut taken = Vec::new();
    let mut ticks = tokio::time::interval(every);
    // A late tick must not be made up by a burst: the stream's pace times the fault.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for (n, (id, version, email)) in plan.iter().enumerate() {
        ticks.tick().await;
        while let Some(index) = steps.iter().position(|(at, _)| *at == n) {
            match steps.remove(index).1 {
                Step::Cut(proxy) => proxy.cut().await,
                Step::Restore(proxy) => proxy.restore().await.expect("restore the proxy"),
                Step::Inject(fault) => chaos.fleet.fake.inject(fault),
            }
            taken.push(Instant::now());
        }
        chaos.publish(*id, *version, email).await;
    }
    assert!(steps.is_empty(), "steps past the end of the stream");
    taken
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn a_consumer_process_killed_with_sigkill_mid_batch_loses_and_duplicates_nothing() {
    let mut chaos = Chaos::start("sigkill", &[]).await;
    chaos.catch_up = CATCH_UP_AFTER_LOST_LOCKS;
    let direct = chaos.fleet.config.clone();
    chaos.spawn_replayer(&direct).await;
    // Slow Vitally, so the process surely has events in flight when it dies.
    chaos.fleet.fake.inject(Fault::NextN {
        method: None,
        path_prefix: "/resources".into(),
        count: 300,
        kind: FaultKind::Latency(Duration::from_millis(150)),
    });
    for (id, version, email) in Chaos::plan(1_000, 20, 3, 3) {
        chaos.publish(id, version, email).await;
    }

    let metrics_addr = free_port();
    let mut env: Vec<(&str, String)> = chaos.fleet.variables();
    env.retain(|(name, _)| *name != "METRICS_ADDR");
    env.extend([
        ("AMQP_URL", thena_testkit::amqp_url()),
        ("REDIS_URL", thena_testkit::redis_url()),
        ("METRICS_ADDR", metrics_addr.to_string()),
        ("RUST_LOG", "warn".to_string()),
    ]);
    let mut child = Process(
        std::process::Command::new(env!("CARGO_BIN_EXE_thena-vitally"))
            .arg("consumer")
            .env_clear()
            .envs(env)
            .stdin(Stdio::null())
            .spawn()
            .expect("start the consumer process"),
    );

    // Mid-batch: it has synced some events and is working on others.
    let at_kill = wait_until(
        "the consumer process to be mid-batch",
        Duration::from_secs(20),
        || async {
            let text = http_get(metrics_addr, "/metrics").await?;
            let synced = metric(&text, "thena_vitally_events_total", &["outcome=\"synced\""]);
            let settled = synced
                + metric(
                    &text,
                    "thena_vitally_events_total",
                    &["outcome=\"skipped\""],
                );
            let in_flight = metric(&text, "thena_vitally_consumer_in_flight", &[]);
            (synced >= 5.0 && in_flight >= 1.0).then_some((settled as u64, in_flight as u64))
        },
    )
    .await;
    // `Child::kill` is SIGKILL on Unix: no shutdown hook, no graceful drain.
    child.0.kill().expect("SIGKILL the consumer process");
    let status = child.0.wait().expect("reap the consumer process");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "killed by SIGKILL: {status:?}"
    );

    chaos.unobserved = Some(at_kill.0);
    chaos.spawn_consumer(&direct).await;
    chaos
        .account(|_| {
            format!(
                "(killed with {} in flight after settling {})",
                at_kill.1, at_kill.0
            )
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_restarting_under_load_loses_and_duplicates_nothing() {
    let mut chaos = Chaos::start("rabbitmq-restart", &[]).await;
    let proxy = TcpProxy::start(authority(&thena_testkit::amqp_url()))
        .await
        .unwrap();
    let via_proxy = chaos.config_via(Some(&proxy), None);
    chaos.spawn_consumer(&via_proxy).await;
    chaos.spawn_consumer(&via_proxy).await;
    chaos.spawn_replayer(&via_proxy).await;
    let before = proxy.accepted();

    let plan = Chaos::plan(2_000, 20, 3, 4);
    let steps = vec![(20, Step::Cut(&proxy)), (75, Step::Restore(&proxy))];
    let taken = stream(&mut chaos, &plan, Duration::from_millis(25), steps).await;
    let outage = taken[1] - taken[0];
    assert!(
        outage >= Duration::from_secs(1),
        "the broker was away {outage:?}"
    );
    // Every role came back on a new connection of its own, and says it is ready.
    wait_until(
        "every role to reconnect",
        Duration::from_secs(20),
        || async {
            (proxy.accepted() >= before + chaos.roles.len()
                && chaos.roles.iter().all(|role| role.readiness.is_ready()))
            .then_some(())
        },
    )
    .await;
    chaos
        .account(|_| {
            format!(
                "(broker away {outage:.1?}, {} reconnections)",
                proxy.accepted() - before
            )
        })
        .await;
}

/// Requests streamed through a fleet whose Redis "restarts" mid-stream for ~1.4 s.
async fn redis_restart(name: &'static str, plan: &[(u64, u64, &'static str)], every: Duration) {
    let mut chaos = Chaos::start(name, &[]).await;
    // A lock taken just before the cut cannot be released: a later event of that request
    // (another version, or the same event retried) waits for REQUEST_LOCK_TTL.
    chaos.catch_up = CATCH_UP_AFTER_LOST_LOCKS;
    let proxy = TcpProxy::start(authority(&thena_testkit::redis_url()))
        .await
        .unwrap();
    let via_proxy = chaos.config_via(None, Some(&proxy));
    chaos.spawn_consumer(&via_proxy).await;
    chaos.spawn_consumer(&via_proxy).await;
    chaos.spawn_replayer(&via_proxy).await;
    let before = proxy.accepted();

    let cut_at = 10;
    let restore_at =
        cut_at + (Duration::from_millis(1_400).as_millis() / every.as_millis()) as usize;
    let steps = vec![
        (cut_at, Step::Cut(&proxy)),
        (restore_at, Step::Restore(&proxy)),
    ];
    let taken = stream(&mut chaos, plan, every, steps).await;
    let outage = taken[1] - taken[0];
    assert!(
        outage >= Duration::from_secs(1),
        "Redis was away {outage:?}"
    );
    // Each consumer's Redis connection (caches, locks, limiter) comes back; integration
    // records live in PostgreSQL.
    wait_until("the consumers to reconnect to Redis", CATCH_UP, || async {
        (proxy.accepted() >= before + 2).then_some(())
    })
    .await;
    let tally = chaos
        .account(|_| {
            format!(
                "(Redis away {outage:.1?}, {} reconnections)",
                proxy.accepted() - before
            )
        })
        .await;
    assert!(
        tally.retried("redis_unavailable") + tally.retried("integration_store") >= 1,
        "events met the outage and were retried: {tally:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn redis_restarting_under_load_loses_and_duplicates_nothing() {
    redis_restart(
        "redis-restart",
        &Chaos::plan(3_000, 60, 4, 1),
        Duration::from_millis(30),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn redis_restarting_mid_stream_still_lets_the_latest_version_win() {
    redis_restart(
        "redis-restart-versions",
        &Chaos::plan(3_500, 20, 3, 4),
        Duration::from_millis(25),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn a_version_synced_while_redis_is_away_is_never_overwritten_by_an_older_one() {
    let mut chaos = Chaos::start("unrecorded-version", &[]).await;
    chaos.catch_up = Duration::from_secs(15);
    let proxy = TcpProxy::start(authority(&thena_testkit::redis_url()))
        .await
        .unwrap();
    let via_proxy = chaos.config_via(None, Some(&proxy));
    let direct = chaos.fleet.config.clone();
    chaos.spawn_consumer(&via_proxy).await;
    chaos.spawn_replayer(&direct).await;
    let id = 7_000;
    chaos.publish(id, 1, LINKED).await;
    chaos.wait_final(id, 1).await;

    // v3's update is slow; Redis goes away while Vitally applies it.
    chaos.fleet.fake.inject(Fault::NextN {
        method: Some("PUT".into()),
        path_prefix: "/resources/customObjects".into(),
        count: 1,
        kind: FaultKind::Latency(Duration::from_secs(2)),
    });
    chaos.publish(id, 3, LINKED).await;
    // The cached instance id was just read: the PUT is under way.
    wait_until("v3's update to start", Duration::from_secs(10), || async {
        (chaos.sum(
            "thena_vitally_cache_lookups_total",
            &[("kind", "instance"), ("result", "hit")],
        ) >= 1)
            .then_some(())
    })
    .await;
    proxy.cut().await;
    wait_until("v3 to reach Vitally", Duration::from_secs(10), || async {
        (chaos
            .fleet
            .instances_for(WS, id)
            .first()
            .map(status_of)
            .as_deref()
            == Some("v3"))
        .then_some(())
    })
    .await;
    wait_until("v3's outcome", Duration::from_secs(10), || async {
        chaos.settled_versions(id).contains(&3).then_some(())
    })
    .await;
    proxy.restore().await.unwrap();
    // What REQUEST_LOCK_TTL does 60 s later: the lock v3 could not release expires.
    let lock = format!("{}:lock:{WS}:{id}", chaos.fleet.env.redis_prefix);
    redis_del(&lock).await;

    // An older version arrives late (a retry, a replay): it must not win.
    chaos.publish(id, 2, LINKED).await;
    chaos.wait_final(id, 2).await;
    let now = chaos.fleet.instances_for(WS, id).first().map(status_of);
    let unrecorded = chaos.sum(
        "thena_vitally_redis_errors_total",
        &[("op", "record_version")],
    );
    println!(
        "unrecorded-version: versions not recorded: {unrecorded}; Status after the late v2: {now:?}"
    );
    chaos.account(|_| String::new()).await;
}

/// A Vitally fault injected mid-stream into a fleet of two consumers and a replayer.
async fn vitally_fault(
    name: &'static str,
    overrides: &[(&'static str, &str)],
    first_id: u64,
    fault: Fault,
) -> Chaos {
    let mut chaos = Chaos::start(name, overrides).await;
    let direct = chaos.fleet.config.clone();
    chaos.spawn_consumer(&direct).await;
    chaos.spawn_consumer(&direct).await;
    chaos.spawn_replayer(&direct).await;
    let plan = Chaos::plan(first_id, 20, 3, 4);
    stream(
        &mut chaos,
        &plan,
        Duration::from_millis(10),
        vec![(20, Step::Inject(fault))],
    )
    .await;
    chaos
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vitally_down_for_a_window_delays_every_version_but_the_latest_wins() {
    let outage = Duration::from_millis(1_500);
    let chaos = vitally_fault(
        "vitally-outage",
        &[],
        4_000,
        Fault::Outage {
            duration: outage,
            status: 503,
        },
    )
    .await;
    let tally = chaos
        .account(|chaos| {
            format!(
                "(503 for {outage:?}: {} calls failed)",
                chaos.fleet.fake.calls().status(503)
            )
        })
        .await;
    assert!(
        tally.retried("vitally_503") >= 1,
        "the outage caused retries: {tally:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_defers_every_version_but_the_latest_wins() {
    let storm = 40;
    let chaos = vitally_fault(
        "vitally-429-storm",
        &[],
        5_000,
        Fault::NextN {
            method: None,
            path_prefix: "/resources".into(),
            count: storm,
            kind: FaultKind::Status(429),
        },
    )
    .await;
    let tally = chaos
        .account(|chaos| {
            format!(
                "({} calls answered 429)",
                chaos.fleet.fake.calls().status(429)
            )
        })
        .await;
    assert!(
        tally.deferred("vitally_429") >= 1,
        "429s deferred events: {tally:?}"
    );
    assert!(
        tally.retried.is_empty(),
        "a 429 is not a failed attempt: {tally:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_vitally_times_out_calls_which_are_retried_and_the_latest_wins() {
    let chaos = vitally_fault(
        "vitally-slow",
        &[("VITALLY_TIMEOUT", "300ms")],
        6_000,
        Fault::NextN {
            method: None,
            path_prefix: "/resources".into(),
            count: 30,
            kind: FaultKind::Latency(Duration::from_millis(600)),
        },
    )
    .await;
    let tally = chaos
        .account(|_| "(30 calls took 600 ms, VITALLY_TIMEOUT 300 ms)".into())
        .await;
    assert!(
        tally.retried("vitally_timeout") >= 1,
        "client timeouts were retried: {tally:?}"
    );
}
