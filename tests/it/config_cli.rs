//! `thena-vitally config`: the values a role would run with, from defaults, the
//! `--config` file and the environment — never a secret, never a URL's password.

use std::process::Command;

#[test]
fn config_shows_file_and_environment_values_with_their_source_and_no_secret() {
    let dir = std::env::temp_dir().join(format!("thena-config-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("fleet.env");
    std::fs::write(
        &file,
        "# a ConfigMap-like file\nNAME_PREFIX=fromfile\nAMQP_URL=amqp://thena:filepass@mq:5672/%2f\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_thena-vitally"))
        .arg("--config")
        .arg(&file)
        .arg("config")
        .env("PRODUCER_TOKEN", "tok-very-secret")
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
        "/readyz checks:",
    ] {
        assert!(shown.contains(expected), "missing {expected:?} in\n{shown}");
    }
    for secret in ["filepass", "redispass", "tok-very-secret"] {
        assert!(!shown.contains(secret), "{secret} shown in\n{shown}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
