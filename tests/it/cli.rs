//! The command line as an operator meets it: the built binary, run against the real
//! local RabbitMQ, Redis and PostgreSQL under a test-unique prefix; exit codes and what it
//! prints.

use std::process::{Command, Output, Stdio};

use chrono::Utc;
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};
use secrecy::SecretString;
use thena_broker::{Broker, Failure, FailureClass, Topology, WORKSPACE_HEADER};
use thena_testkit::TestEnv;

/// Runs `thena-vitally args…` with only this test's configuration in its environment
/// (no `$USER`, no terminal), and returns what it did.
pub fn run(env: &TestEnv, args: &[&str], extra: &[(&str, &str)]) -> Output {
    let mut vars: Vec<(&str, String)> = env.config_overrides();
    vars.extend([
        ("AMQP_URL", thena_testkit::amqp_url()),
        ("REDIS_URL", thena_testkit::redis_url()),
    ]);
    vars.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    Command::new(env!("CARGO_BIN_EXE_thena-vitally"))
        .args(args)
        .env_clear()
        .envs(vars)
        .stdin(Stdio::null())
        .output()
        .expect("run thena-vitally")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

async fn broker(env: &TestEnv) -> Broker {
    Broker::connect(
        SecretString::from(thena_testkit::amqp_url()),
        "thena-it-cli",
        env.topology.clone(),
    )
    .await
    .expect("local RabbitMQ")
}

/// Parks one event the way a consumer does (permanent failure `reason`).
async fn park(broker: &Broker, workspace: &str, request_id: u64, reason: &str) -> String {
    let event = thena_events::sample::event(workspace, request_id, 1, None);
    let mut headers = FieldTable::default();
    headers.insert(
        WORKSPACE_HEADER.into(),
        AMQPValue::LongString(workspace.into()),
    );
    let props = BasicProperties::default()
        .with_message_id(event.event_id.to_string().into())
        .with_content_type("application/json".into())
        .with_headers(headers);
    let failure = Failure::new(
        FailureClass::Permanent,
        reason,
        format!("{reason} happened"),
        broker.topology().exchange(),
        Topology::routing_key(workspace),
        Utc::now(),
    );
    broker
        .publisher()
        .await
        .unwrap()
        .park(&serde_json::to_vec(&event).unwrap(), &props, &failure)
        .await
        .unwrap();
    event.event_id.to_string()
}

/// Lets a replayer drain the parked queue into the parked set until it holds `n`.
async fn stored(env: &TestEnv, broker: &Broker, n: u64) {
    let db = env.db().await;
    let registry = prometheus::Registry::new();
    let metrics = thena_replayer::ReplayerMetrics::register(&registry).unwrap();
    let deps = thena_replayer::ReplayerDeps::new(broker.clone(), db.clone());
    let schedule = thena_replayer::RetrySchedule::for_topology(broker.topology());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let replayer = tokio::spawn(thena_replayer::run_replayer(
        deps,
        schedule,
        metrics,
        shutdown.clone(),
    ));
    let store = thena_store::dead_letters::DeadLetters::new(db);
    thena_testkit::wait_until(
        &format!("{n} parked messages stored"),
        std::time::Duration::from_secs(10),
        || async { (store.stats().await.ok()?.parked == n).then_some(()) },
    )
    .await;
    shutdown.cancel();
    replayer.await.unwrap().unwrap();
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .or_else(|_| std::fs::read_to_string("/proc/sys/kernel/hostname"))
        .expect("a host name")
        .trim()
        .to_owned()
}

#[tokio::test]
async fn dlq_on_an_empty_queue_succeeds_and_says_there_is_nothing_to_do() {
    let env = TestEnv::new();
    let broker = broker(&env).await;
    let channel = broker.channel().await.unwrap();
    env.topology.declare(&channel).await.unwrap();

    let nothing = "no matching parked messages: nothing to do\n";
    for args in [
        &["dlq", "list"][..],
        &["dlq", "replay"],
        &["dlq", "replay", "--dry-run"],
        &["dlq", "purge"],
    ] {
        let out = run(&env, args, &[]);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert_eq!(stdout(&out), nothing, "{args:?}");
        assert_eq!(stderr(&out), "", "{args:?}");
    }
    // A filter that matches nothing says exactly the same.
    park(&broker, "WCLI", 1, "no_integration").await;
    stored(&env, &broker, 1).await;
    for args in [
        &["dlq", "list", "--workspace", "WOTHER"][..],
        &["dlq", "replay", "--reason", "vitally_400"],
    ] {
        let out = run(&env, args, &[]);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert_eq!(stdout(&out), nothing, "{args:?}");
    }
    let out = run(&env, &["dlq", "list", "--queue", "dead"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "no matching messages in the dead queue: nothing to do\n"
    );
    let _ = channel.close(200, "done".into()).await;
    broker.close().await;
    env.cleanup().await;
}

#[tokio::test]
async fn dlq_replay_prints_each_audit_line_once_by_the_host_when_user_is_unset() {
    let env = TestEnv::new();
    let broker = broker(&env).await;
    let channel = broker.channel().await.unwrap();
    env.topology.declare(&channel).await.unwrap();
    let event_id = park(&broker, "WCLI", 7, "vitally_400").await;
    stored(&env, &broker, 1).await;

    let out = run(&env, &["dlq", "replay", "--why", "INC-7 fixed"], &[]);
    let (text, errors) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "{errors}");
    // No $USER in the environment: the host name, never `unknown`.
    let by = format!("by {:?} because \"INC-7 fixed\"", host_name());
    let audit: Vec<&str> = text.lines().filter(|l| l.contains(&event_id)).collect();
    assert_eq!(audit.len(), 1, "{text}");
    assert!(
        audit[0].contains("replayed event") && audit[0].contains(&by),
        "{text}"
    );
    assert!(!text.contains("unknown"), "{text}");
    assert!(
        text.ends_with("replay: 1 matched, 1 replayed, 0 already gone, 0 failed (audit 1)\n"),
        "{text}"
    );
    assert_eq!(
        env.queue_depth(&env.topology.sync_queue()).await.unwrap(),
        1,
        "sent back to its route"
    );
    // Nothing on stderr: no log copy of the audit line, no error from closing the broker.
    assert_eq!(errors, "", "stderr");

    // --actor wins over $USER.
    park(&broker, "WCLI", 8, "vitally_400").await;
    stored(&env, &broker, 1).await;
    let out = run(
        &env,
        &["dlq", "replay", "--dry-run", "--actor", "oncall-ana"],
        &[("USER", "someone-else")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("would replay event"),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("by \"oncall-ana\""),
        "{}",
        stdout(&out)
    );
    let out = run(&env, &["dlq", "replay", "--dry-run"], &[("USER", "ana")]);
    assert!(stdout(&out).contains("by \"ana\""), "{}", stdout(&out));
    assert!(
        stdout(&out).ends_with("dry run: 1 message(s) would be replayed (audit 3)\n"),
        "{}",
        stdout(&out)
    );
    // The audit trail has both dry runs and the replay, newest first.
    let out = run(&env, &["dlq", "audit"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let trail: Vec<String> = stdout(&out).lines().skip(1).map(str::to_owned).collect();
    assert_eq!(trail.len(), 3, "{}", stdout(&out));
    assert!(
        trail[0].contains("ana") && trail[0].contains("replay (dry run)"),
        "{trail:?}"
    );
    assert!(trail[1].contains("oncall-ana"), "{trail:?}");
    assert!(
        trail[2].contains(&host_name()) && trail[2].contains("INC-7 fixed"),
        "{trail:?}"
    );

    let _ = channel.close(200, "done".into()).await;
    broker.close().await;
    env.cleanup().await;
}

#[tokio::test]
async fn dlq_purge_without_confirmation_names_the_flag_it_wants() {
    let env = TestEnv::new();
    let broker = broker(&env).await;
    let channel = broker.channel().await.unwrap();
    env.topology.declare(&channel).await.unwrap();
    park(&broker, "WCLI", 9, "no_integration").await;
    stored(&env, &broker, 1).await;

    let out = run(&env, &["dlq", "purge"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "error: refusing to purge 1 parked message(s) without confirmation (irreversible); \
         add --yes-really\n"
    );
    let out = run(&env, &["dlq", "list"], &[]);
    assert_eq!(
        stdout(&out).lines().count(),
        2,
        "still parked: {}",
        stdout(&out)
    );
    let out = run(
        &env,
        &["dlq", "purge", "--yes-really", "--why", "test tenant"],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "purged 1 parked message(s) (audit 1)\n");
    let out = run(&env, &["dlq", "list", "--state", "purged"], &[]);
    assert!(stdout(&out).contains("purged"), "{}", stdout(&out));

    let _ = channel.close(200, "done".into()).await;
    broker.close().await;
    env.cleanup().await;
}

#[test]
fn every_dlq_flag_and_argument_has_help_text() {
    let env = TestEnv::new();
    for sub in ["list", "show", "replay", "purge", "audit"] {
        let out = run(&env, &["dlq", sub, "-h"], &[]);
        assert!(out.status.success(), "{sub}: {}", stderr(&out));
        let help = stdout(&out);
        // clap prints a bare name (or only `[default: …]`) when an option or argument
        // has no doc comment.
        for line in help.lines().filter(|l| l.starts_with("  ")) {
            let trimmed = line.trim();
            let is_arg = trimmed.starts_with('-') || trimmed.starts_with('<');
            let help_text = trimmed.split_once("  ").map(|(_, text)| text.trim_start());
            let flag_only = is_arg && help_text.is_none_or(|text| text.starts_with('['));
            assert!(!flag_only, "dlq {sub}: no help for {trimmed:?}\n{help}");
        }
    }
}

#[test]
fn a_producer_without_a_token_refuses_before_opening_its_ops_port() {
    let env = TestEnv::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let out = run(&env, &["producer"], &[("METRICS_ADDR", &metrics)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("PRODUCER_TOKEN is required"),
        "{}",
        stderr(&out)
    );
    // Nothing was served, not even for a moment.
    assert!(!stdout(&out).contains("ops endpoints"), "{}", stdout(&out));
}

#[test]
fn redirected_logs_have_no_colour_codes_and_errors_name_each_cause_once() {
    let env = TestEnv::new();
    // The ops port opens (an info line), then RabbitMQ refuses the connection.
    let out = run(
        &env,
        &["producer"],
        &[
            ("PRODUCER_TOKEN", "cli-test-token-0001"),
            ("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f"),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let (logs, errors) = (stdout(&out), stderr(&out));
    assert!(logs.contains("ops endpoints"), "{logs}");
    assert!(
        !logs.contains('\x1b') && !errors.contains('\x1b'),
        "{logs:?}"
    );

    // Redis' error already carries its io cause: printed once, not twice.
    let out = run(&env, &["consumer"], &[("REDIS_URL", "redis://127.0.0.1:1")]);
    assert_eq!(out.status.code(), Some(1));
    let errors = stderr(&out);
    let refused = std::io::Error::from_raw_os_error(111).to_string(); // ECONNREFUSED
    assert!(
        errors.starts_with("error: cannot connect to Redis"),
        "{errors}"
    );
    assert_eq!(errors.matches(&refused).count(), 1, "{errors}");
    assert!(!stdout(&out).contains('\x1b'));
}

async fn schema_exists(schema: &str) -> bool {
    let db =
        thena_store::Db::new(&SecretString::from(thena_testkit::database_url()), "public").unwrap();
    db.client()
        .await
        .unwrap()
        .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&schema])
        .await
        .unwrap()
        .is_some()
}

#[tokio::test]
async fn teardown_lists_then_removes_a_fleets_queues_exchanges_redis_keys_and_schema() {
    use redis::AsyncCommands;
    let env = TestEnv::new();
    let broker = broker(&env).await;
    let channel = broker.channel().await.unwrap();
    env.topology.declare(&channel).await.unwrap();
    park(&broker, "WCLI", 1, "no_integration").await;
    let _ = channel.close(200, "done".into()).await;
    broker.close().await;
    let _db = env.db().await; // creates and migrates the schema
    let client = redis::Client::open(thena_testkit::redis_url()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let (mine, neighbour) = (
        [
            format!("{}:epoch", env.redis_prefix),
            format!("{}:cache:x", env.redis_prefix),
        ],
        format!("{}x:kept", env.redis_prefix),
    );
    for key in mine.iter().chain([&neighbour]) {
        let _: () = redis.set(key, "1").await.unwrap();
    }
    let queues = env.topology.queues();
    let exchanges = env.topology.exchanges();
    let args = ["teardown", "--prefix", &env.prefix, "--schema", &env.schema];

    let out = run(&env, &[&args[..], &["--dry-run"]].concat(), &[]);
    let listed = stdout(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    for queue in &queues {
        assert!(
            listed.contains(&format!("would delete queue {queue} (")),
            "{listed}"
        );
    }
    for exchange in &exchanges {
        assert!(
            listed.contains(&format!("would delete exchange {exchange}\n")),
            "{listed}"
        );
    }
    assert!(
        listed.contains(&format!(
            "would delete 2 Redis key(s) under {}:*",
            env.redis_prefix
        )),
        "{listed}"
    );
    assert!(listed.contains(&format!("would delete PostgreSQL schema {}", env.schema)));
    // A dry run changes nothing.
    assert_eq!(
        env.queue_depth(&env.topology.parked_queue()).await.unwrap(),
        1
    );
    assert!(redis.exists::<_, bool>(&mine[0]).await.unwrap());
    assert!(schema_exists(&env.schema).await);

    let out = run(&env, &args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), listed.replace("would delete", "deleted"));
    for queue in &queues {
        assert!(env.queue_depth(queue).await.is_err(), "{queue} is gone");
    }
    for key in &mine {
        assert!(!redis.exists::<_, bool>(key).await.unwrap(), "{key}");
    }
    assert!(
        redis.exists::<_, bool>(&neighbour).await.unwrap(),
        "another prefix's key stays"
    );
    assert!(!schema_exists(&env.schema).await);

    let out = run(&env, &args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!("nothing to remove for prefix {}\n", env.prefix)
    );

    let _: () = redis.del(&neighbour).await.unwrap();
    env.cleanup().await;
}

#[test]
fn fake_vitally_help_states_its_auth_header_and_fault_api() {
    let env = TestEnv::new();
    let out = run(&env, &["fake-vitally", "--help"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let help = stdout(&out);
    assert!(
        help.contains(&format!(
            "Authorization: {}",
            fake_vitally::default_auth_header()
        )),
        "{help}"
    );
    for needle in [
        "POST   /_fake/faults",
        "/_fake/auth-headers",
        "\"type\":\"outage\"",
        "no METRICS_ADDR",
    ] {
        assert!(help.contains(needle), "{needle}:\n{help}");
    }
}

#[tokio::test]
async fn dlq_list_shows_what_waits_in_the_delay_queues_and_refuses_to_replay_them() {
    // One long tier, so the message is still waiting when the CLI looks.
    let env = TestEnv::with_tiers(vec![std::time::Duration::from_secs(120)]);
    let broker = broker(&env).await;
    let channel = broker.channel().await.unwrap();
    env.topology.declare(&channel).await.unwrap();
    let event = thena_events::sample::event("WDELAY", 42, 3, None);
    let props = BasicProperties::default()
        .with_message_id(event.event_id.to_string().into())
        .with_content_type("application/json".into());
    let publisher = broker.publisher().await.unwrap();
    publisher
        .defer(
            &serde_json::to_vec(&event).unwrap(),
            &props,
            &Topology::routing_key("WDELAY"),
            thena_broker::Wake::NotBefore(std::time::Duration::from_secs(1)),
            None,
        )
        .await
        .unwrap();
    publisher.close().await;
    let delay_queue = env.topology.delay_queue(0);
    thena_testkit::wait_until(
        "the deferred message",
        std::time::Duration::from_secs(5),
        || async { (env.queue_depth(&delay_queue).await.ok()? == 1).then_some(()) },
    )
    .await;

    let out = run(&env, &["dlq", "list", "--queue", "delay"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    let row = table
        .lines()
        .find(|l| l.starts_with(&event.event_id.to_string()))
        .unwrap_or_else(|| panic!("the deferred event is listed:\n{table}"));
    assert!(
        row.contains("WDELAY") && row.contains("42") && row.contains("deferred"),
        "{row}"
    );
    let out = run(&env, &["dlq", "show", &event.event_id.to_string()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("queue: delay\n"),
        "{}",
        stdout(&out)
    );
    // Looking returns the message to its queue.
    thena_testkit::wait_until(
        "the message back in its delay queue",
        std::time::Duration::from_secs(5),
        || async { (env.queue_depth(&delay_queue).await.ok()? == 1).then_some(()) },
    )
    .await;

    for args in [
        &["dlq", "replay", "--queue", "delay"][..],
        &["dlq", "purge", "--queue", "delay", "--yes-really"],
    ] {
        let out = run(&env, args, &[]);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&out).contains("the delay queue can be listed and shown"),
            "{}",
            stderr(&out)
        );
    }
    assert_eq!(env.queue_depth(&delay_queue).await.unwrap(), 1);
    let _ = channel.close(200, "done".into()).await;
    broker.close().await;
    env.cleanup().await;
}

/// `integrations connect` refuses what the admin API refuses, before any connection:
/// a local listener counts none, until its origin is listed explicitly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integrations_connect_refuses_ssrf_forms_without_connecting_until_the_origin_is_listed() {
    let env = TestEnv::new();
    let target = thena_testkit::target::TcpTarget::http("200 OK", "{}")
        .await
        .unwrap();
    let port = target.port();
    let auth = ("VITALLY_AUTH_HEADER", "Basic c3NyZjo=");
    let connect = |url: &str, extra: &[(&str, &str)]| {
        let mut vars = vec![auth];
        vars.extend_from_slice(extra);
        let args = [
            "integrations",
            "connect",
            "--workspace",
            "T-SSRF",
            "--api-url",
            url,
        ];
        run(&env, &args, &vars)
    };
    for url in [
        format!("http://127.1:{port}"),
        format!("https://0x7f000001:{port}"),
        format!("https://[::ffff:127.0.0.1]:{port}"),
        format!("https://localhost:{port}"),
        "http://169.254.169.254/latest/meta-data".to_owned(),
    ] {
        let out = connect(&url, &[]);
        assert_eq!(out.status.code(), Some(1), "{url}: {}", stdout(&out));
        assert!(
            stderr(&out).contains("error: invalid Vitally API URL"),
            "{url}: {}",
            stderr(&out)
        );
        assert_eq!(target.accepted(), 0, "{url} reached the listener");
    }
    // Listed by its exact origin it is called (and found not to be Vitally).
    let origin = format!("http://127.0.0.1:{port}");
    let out = connect(&origin, &[("VITALLY_ALLOWED_HOSTS", &origin)]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(target.accepted() >= 1, "{}", stderr(&out));
    env.cleanup().await;
}

/// The libraries' own parse and connect errors for the three URLs, as a role prints
/// them: never the password.
#[test]
fn a_malformed_or_unreachable_url_stops_the_role_without_repeating_its_password() {
    let env = TestEnv::new();
    let cases = [
        (
            "replayer",
            "AMQP_URL",
            "amqp://u:Pw-amqp-1@host:notaport/%2f",
        ),
        ("replayer", "AMQP_URL", "amqp://u:Pw-amqp-2@[::1/%2f"),
        ("consumer", "REDIS_URL", "redis://:Pw-redis-1@host:notaport"),
        ("consumer", "REDIS_URL", "redis://u:Pw-redis-2@127.0.0.1:1"),
        (
            "migrate",
            "DATABASE_URL",
            "postgres://u:Pw-pg-1@host:notaport/db",
        ),
        (
            "migrate",
            "DATABASE_URL",
            "postgres://u:Pw-pg-2@127.0.0.1:1/db",
        ),
    ];
    for (role, name, url) in cases {
        let out = run(&env, &[role], &[(name, url)]);
        let text = stdout(&out) + &stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{role} {name}={url}: {text}");
        assert!(
            !text.contains("Pw-"),
            "{role} {name}={url} shows the password: {text}"
        );
    }
    drop(env);
}
