//! `thena-vitally config`: the values a role would run with, from defaults, the
//! `--config` file and the environment — never a secret, never a URL's password — and
//! roles that refuse to start on a value outside its range.

use std::process::{Command, Output};

fn temp_file(contents: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("thena-config-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("fleet.env");
    std::fs::write(&file, contents).unwrap();
    file
}

/// The binary with only `vars` in its environment.
fn run(args: &[&str], vars: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_thena-vitally"))
        .args(args)
        .env_clear()
        .envs(vars.iter().copied())
        .output()
        .unwrap()
}

fn all_text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

#[test]
fn config_shows_file_and_environment_values_with_their_source_and_no_secret() {
    let file = temp_file(
        "# a ConfigMap-like file\nNAME_PREFIX=fromfile\nAMQP_URL=amqp://thena:filepass@mq:5672/%2f\n",
    );
    let output = Command::new(env!("CARGO_BIN_EXE_thena-vitally"))
        .arg("--config")
        .arg(&file)
        .arg("config")
        .env("PRODUCER_TOKEN", "tok-very-secret-0001")
        .env("REDIS_URL", "redis://:redispass@redis:6379")
        .env_remove("NAME_PREFIX")
        .env_remove("AMQP_URL")
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{shown}");
    for expected in [
        "fromfile (file)",
        "amqp://thena:***@mq:5672/%2f (file)",
        "redis://:***@redis:6379 (environment)",
        "<set, redacted> (environment)",
        "postgres://postgres@127.0.0.1:5432/thena_vitally (default)",
        "allowed: 1–1024",
        "allowed: 5s–1h",
        "/readyz checks:",
        "The configuration is valid.",
    ] {
        assert!(shown.contains(expected), "missing {expected:?} in\n{shown}");
    }
    for secret in ["filepass", "redispass", "tok-very-secret"] {
        assert!(!shown.contains(secret), "{secret} shown in\n{shown}");
    }
    std::fs::remove_dir_all(file.parent().unwrap()).unwrap();
}

/// Passwords in every URL-valued variable, from every source, in the awkward shapes
/// operators write them (unencoded `@`, `/`, `:`, a query parameter, a keyword string).
#[test]
fn config_output_holds_no_password_from_any_source_even_when_invalid() {
    let file = temp_file(
        "AMQP_URL=amqp://thena:Pw-file-amqp@mq:5672/%2f\nDATABASE_URL=postgres://pg:Pw-file@pg/x\n",
    );
    let file_arg = file.to_str().unwrap();
    let passwords = [
        "Pw-file-amqp",
        "Pw-file",
        "Pw-env-redis",
        "Pw/env@db:x?y",
        "Pw-env-query",
        "Pw-keyword",
        "tok-very-secret",
        "key-very-secret",
        "guest:guest",
    ];
    let valid = [
        ("REDIS_URL", "rediss://admin:Pw-env-redis@redis:6380/0"),
        ("DATABASE_URL", "postgres://pg:Pw/env@db:x?y@pg:5432/thena"),
        ("PRODUCER_TOKEN", "tok-very-secret-0001"),
        ("INTEGRATIONS_KEYS", "k1:key-very-secret"),
        ("VITALLY_ALLOWED_HOSTS", "http://127.0.0.1:8089"),
    ];
    // The defaults hold a password too (guest:guest).
    let text = all_text(&run(&["config"], &[]));
    assert!(
        text.contains("amqp://guest:***@127.0.0.1:5672/%2f (default)"),
        "{text}"
    );
    assert!(!text.contains("guest:guest"), "{text}");

    let out = run(&["--config", file_arg, "config"], &valid);
    let text = all_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("amqp://thena:***@mq:5672/%2f (file)"),
        "{text}"
    );
    assert!(
        text.contains("rediss://admin:***@redis:6380/0 (environment)"),
        "{text}"
    );

    // Invalid values are shown (redacted) and the error names the variable, not a secret.
    for (name, value) in [
        (
            "DATABASE_URL",
            "postgres://pg:x@pg/db?password=Pw-env-query",
        ),
        ("DATABASE_URL", "host=pg password=Pw-keyword"),
        ("AMQP_URL", "http://thena:Pw-file-amqp@mq"),
        ("REQUEST_LOCK_TTL", "1ms"),
    ] {
        let mut vars = valid.to_vec();
        vars.push((name, value));
        let out = run(&["--config", file_arg, "config"], &vars);
        let text = all_text(&out);
        if name == "REQUEST_LOCK_TTL" || value.starts_with("host=") || value.starts_with("http:") {
            assert!(!out.status.success(), "{name}={value} accepted:\n{text}");
            assert!(text.contains(&format!("{name} is invalid")), "{text}");
        }
        for password in passwords {
            assert!(
                !text.contains(password),
                "{password} shown for {name}={value}:\n{text}"
            );
        }
    }
    std::fs::remove_dir_all(file.parent().unwrap()).unwrap();
}

#[test]
fn each_role_refuses_to_start_on_a_value_outside_its_range_and_says_which() {
    let base = [
        ("INTEGRATIONS_KEY", thena_testkit::TEST_INTEGRATIONS_KEY),
        ("PRODUCER_TOKEN", "0123456789abcdef0123"),
        // Nothing listens here: a role that got past its configuration would fail
        // differently (cannot connect), not with the message asserted below.
        ("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f"),
        ("METRICS_ADDR", "127.0.0.1:0"),
        ("HTTP_ADDR", "127.0.0.1:0"),
    ];
    let cases = [
        (
            "producer",
            "PRODUCER_TOKEN",
            "x",
            "PRODUCER_TOKEN is invalid: must be at least 16 characters, got 1",
        ),
        (
            "producer",
            "INGEST_BODY_LIMIT",
            "99999999999999",
            "INGEST_BODY_LIMIT is invalid: allowed: 1024–16777216; got \"99999999999999\"",
        ),
        (
            "consumer",
            "FREE_MAIL_DOMAINS",
            ",,,",
            "FREE_MAIL_DOMAINS is invalid: lists no domain",
        ),
        (
            "consumer",
            "REQUEST_LOCK_TTL",
            "1ms",
            "REQUEST_LOCK_TTL is invalid: allowed: 5s–1h; got \"1ms\"",
        ),
        (
            "consumer",
            "VITALLY_BUDGET_PER_MIN",
            "5000",
            "VITALLY_BUDGET_PER_MIN is invalid: allowed: 1–1000",
        ),
        (
            "consumer",
            "CONSUMER_CONCURRENCY",
            "1000000000",
            "CONSUMER_CONCURRENCY is invalid: allowed: 1–1024",
        ),
        (
            "replayer",
            "RETRY_MAX_AGE",
            "0s",
            "RETRY_MAX_AGE is invalid: allowed: 10m–30d",
        ),
        (
            "replayer",
            "SHUTDOWN_GRACE",
            "0s",
            "SHUTDOWN_GRACE is invalid: allowed: 1s–10m",
        ),
        (
            "consumer",
            "VITALLY_TIMEOUT",
            "1m",
            "REQUEST_LOCK_TTL, RATE_LIMIT_MAX_WAIT and VITALLY_TIMEOUT do not fit together",
        ),
    ];
    for (role, name, value, expected) in cases {
        let mut vars = base.to_vec();
        vars.push((name, value));
        let out = run(&[role], &vars);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{role} {name}={value}: {stderr}"
        );
        assert!(
            stderr.contains(&format!("error: configuration: {expected}")),
            "{role} {name}={value}: {stderr}"
        );
    }
}
