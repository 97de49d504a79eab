//! The deployment files agree with the binary they deploy: every YAML under `deploy/` and
//! `docker-compose.yml` parses, and the variables, ports, probe paths, subcommands, queue
//! and metric names they use are the ones the code defines. Needs no docker, kubectl or
//! network (`deploy/check.sh` runs the schema validators and promtool).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_yaml_ng::Value;
use thena_runtime::{
    Config,
    config::{VARIABLES, parse_duration},
    ops,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// The binary's subcommands (src/cli/mod.rs).
const SUBCOMMANDS: &[&str] = &[
    "consumer",
    "producer",
    "replayer",
    "dlq",
    "integrations",
    "fake-vitally",
    "emit",
    "demo",
    "config",
];

/// Variables read outside `thena_runtime::config`: by tracing's filter, or by one
/// subcommand's own flags (clap `env = …`).
const EXTRA_VARIABLES: &[&str] = &[
    "RUST_LOG",
    "FAKE_VITALLY_AUTH_HEADER",
    "FAKE_VITALLY_RATE_LIMIT",
    "VITALLY_AUTH_HEADER",
    "PRODUCER_URL",
];

/// The image every compose service of ours runs.
const COMPOSE_IMAGE: &str = "thena-vitally:local";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path = root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn files_with_extension(dir: &str, extensions: &[&str]) -> Vec<PathBuf> {
    let mut all = Vec::new();
    files_under(&root().join(dir), &mut all);
    all.retain(|p| {
        p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| extensions.contains(&e))
    });
    all
}

/// Every document of a (multi-document) YAML file, merge keys (`<<:`) applied. Documents
/// are split at `---` lines (a block scalar cannot hold one at column 0).
fn load_yaml(path: &Path) -> Vec<Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut documents = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" {
            documents.push(String::new());
        } else if let Some(current) = documents.last_mut() {
            current.push_str(line);
            current.push('\n');
        }
    }
    documents
        .iter()
        .filter(|doc| {
            doc.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .map(|doc| {
            let mut value: Value = serde_yaml_ng::from_str(doc)
                .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
            value
                .apply_merge()
                .unwrap_or_else(|e| panic!("{}: merge keys: {e}", path.display()));
            value
        })
        .collect()
}

fn load_one(relative: &str) -> Value {
    let mut docs = load_yaml(&root().join(relative));
    assert_eq!(docs.len(), 1, "{relative}: expected one YAML document");
    docs.remove(0)
}

fn str_of<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {value:?}"))
}

fn seq<'a>(value: &'a Value, what: &str) -> &'a [Value] {
    value
        .as_sequence()
        .map(Vec::as_slice)
        .unwrap_or_else(|| panic!("{what}: expected a list, got {value:?}"))
}

/// A scalar as text (YAML may type `"32"` or `32`).
fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

fn string_map(value: &Value, what: &str) -> BTreeMap<String, String> {
    value
        .as_mapping()
        .unwrap_or_else(|| panic!("{what}: expected a mapping"))
        .iter()
        .map(|(k, v)| (str_of(k, what).to_string(), scalar(v)))
        .collect()
}

fn default_of(name: &str) -> &'static str {
    VARIABLES
        .iter()
        .find(|v| v.name == name)
        .and_then(|v| v.default)
        .unwrap_or_else(|| panic!("{name} has no default in VARIABLES"))
}

fn is_known_variable(name: &str) -> bool {
    VARIABLES.iter().any(|v| v.name == name) || EXTRA_VARIABLES.contains(&name)
}

fn port_of(addr: &str) -> u16 {
    addr.parse::<SocketAddr>()
        .unwrap_or_else(|e| panic!("{addr:?} is not a socket address: {e}"))
        .port()
}

/// `value` of `NAME`, else the binary's default.
fn setting(env: &BTreeMap<String, String>, name: &str) -> String {
    env.get(name)
        .cloned()
        .unwrap_or_else(|| default_of(name).to_string())
}

fn config_from(env: &BTreeMap<String, String>, what: &str) -> Config {
    Config::from_sources(HashMap::new(), env.clone())
        .unwrap_or_else(|e| panic!("{what}: the binary refuses this configuration: {e}"))
}

// ------------------------------------------------------------------ Kubernetes

struct Kube {
    docs: Vec<Value>,
}

impl Kube {
    /// Every resource the base kustomization lists.
    fn base() -> Kube {
        let kustomization = load_one("deploy/k8s/base/kustomization.yaml");
        let docs = seq(&kustomization["resources"], "base resources")
            .iter()
            .flat_map(|file| {
                load_yaml(
                    &root()
                        .join("deploy/k8s/base")
                        .join(str_of(file, "resource")),
                )
            })
            .collect();
        Kube { docs }
    }

    fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|d| d["kind"] == kind).collect()
    }

    fn one(&self, kind: &str) -> &Value {
        let found = self.of_kind(kind);
        assert_eq!(found.len(), 1, "expected exactly one {kind}");
        found[0]
    }

    fn named(&self, kind: &str, name: &str) -> &Value {
        self.of_kind(kind)
            .into_iter()
            .find(|d| d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} named {name}"))
    }

    fn config_map(&self) -> BTreeMap<String, String> {
        string_map(&self.one("ConfigMap")["data"], "ConfigMap data")
    }

    fn secret(&self) -> BTreeMap<String, String> {
        string_map(&self.one("Secret")["stringData"], "Secret stringData")
    }

    /// What a pod's environment holds: the ConfigMap and the Secret together.
    fn environment(&self) -> BTreeMap<String, String> {
        let mut env = self.config_map();
        env.extend(self.secret());
        env
    }

    fn deployments(&self) -> Vec<(String, &Value)> {
        self.of_kind("Deployment")
            .into_iter()
            .map(|d| (scalar(&d["metadata"]["name"]), d))
            .collect()
    }
}

fn containers(deployment: &Value) -> &[Value] {
    seq(
        &deployment["spec"]["template"]["spec"]["containers"],
        "containers",
    )
}

/// `port` of a probe or a Service's targetPort: a number, or a container port's name.
fn resolve_port(port: &Value, container: &Value) -> u16 {
    match port {
        Value::Number(n) => n
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .expect("port"),
        Value::String(name) => seq(&container["ports"], "ports")
            .iter()
            .find(|p| p["name"] == name.as_str())
            .and_then(|p| p["containerPort"].as_u64())
            .and_then(|n| u16::try_from(n).ok())
            .unwrap_or_else(|| panic!("no container port named {name}")),
        other => panic!("unexpected port {other:?}"),
    }
}

// ------------------------------------------------------------------ docker compose

fn compose() -> Value {
    load_one("docker-compose.yml")
}

/// `${NAME:-default}` → default, the way compose fills an unset variable.
fn interpolate(raw: &str) -> String {
    let mut out = String::new();
    let mut rest = raw;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("unterminated ${") + start;
        let inner = &rest[start + 2..end];
        out.push_str(inner.split_once(":-").map_or("", |(_, default)| default));
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

struct Service<'a> {
    name: String,
    spec: &'a Value,
}

impl Service<'_> {
    fn env(&self) -> BTreeMap<String, String> {
        match &self.spec["environment"] {
            Value::Null => BTreeMap::new(),
            Value::Mapping(map) => map
                .iter()
                .map(|(k, v)| (scalar(k), interpolate(&scalar(v))))
                .collect(),
            Value::Sequence(items) => items
                .iter()
                .map(|item| {
                    let text = scalar(item);
                    let (k, v) = text.split_once('=').expect("NAME=value");
                    (k.to_string(), interpolate(v))
                })
                .collect(),
            other => panic!("{}: environment {other:?}", self.name),
        }
    }

    fn command(&self) -> Vec<String> {
        seq(&self.spec["command"], &self.name)
            .iter()
            .map(scalar)
            .collect()
    }

    fn healthcheck_url(&self) -> Option<String> {
        let check = &self.spec["healthcheck"];
        if check["disable"] == true {
            return None;
        }
        seq(&check["test"], &self.name)
            .iter()
            .map(scalar)
            .find(|arg| arg.starts_with("http://"))
    }
}

fn compose_services(compose: &Value) -> Vec<Service<'_>> {
    compose["services"]
        .as_mapping()
        .expect("services")
        .iter()
        .map(|(name, spec)| Service {
            name: scalar(name),
            spec,
        })
        .collect()
}

/// The services that run this project's image.
fn our_services(compose: &Value) -> Vec<Service<'_>> {
    let ours: Vec<_> = compose_services(compose)
        .into_iter()
        .filter(|s| s.spec["image"] == COMPOSE_IMAGE)
        .collect();
    assert!(ours.len() >= 5, "compose runs too few of our services");
    ours
}

/// `http://host:port/path` → (port, path).
fn url_port_and_path(url: &str) -> (u16, String) {
    let rest = url.strip_prefix("http://").expect("http URL");
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let port = authority
        .rsplit_once(':')
        .map_or(80, |(_, p)| p.parse().expect("port"));
    (port, format!("/{path}"))
}

// ------------------------------------------------------------------ PromQL

/// Metric names a PromQL expression selects: identifiers that are not functions,
/// keywords, label names (`{…}`, `by (…)`), strings, durations or Grafana variables.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const OPERATORS: &[&str] = &[
        "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan",
    ];
    // Aggregations may be followed by `by (…)` rather than by their parenthesis.
    const AGGREGATIONS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let skip_until = |from: usize, close: char| -> usize {
        let mut i = from + 1;
        let mut quote = None;
        while i < chars.len() {
            match (quote, chars[i]) {
                (Some(_), '\\') => i += 1,
                (Some(q), c) if c == q => quote = None,
                (None, '"' | '\'' | '`') => quote = Some(chars[i]),
                (None, c) if c == close => return i + 1,
                _ => {}
            }
            i += 1;
        }
        i
    };
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            let mut j = i + 1;
            while j < chars.len() && chars[j] != c {
                j += if chars[j] == '\\' { 2 } else { 1 };
            }
            i = j + 1;
        } else if c == '{' {
            i = skip_until(i, '}');
        } else if c == '[' {
            i = skip_until(i, ']');
        } else if c.is_ascii_digit() || c == '$' {
            // A number, or a Grafana variable.
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "._".contains(chars[i])) {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let opens = chars.get(next) == Some(&'(');
            if LABEL_LISTS.contains(&word.as_str()) {
                if opens {
                    i = skip_until(next, ')');
                }
            } else if !opens
                && !OPERATORS.contains(&word.to_ascii_lowercase().as_str())
                && !AGGREGATIONS.contains(&word.as_str())
            {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Every `"expr"` in a JSON tree (a Grafana dashboard), with the panel's title.
fn json_exprs(node: &serde_json::Value, title: &str, out: &mut Vec<(String, String)>) {
    match node {
        serde_json::Value::Object(map) => {
            let title = map.get("title").and_then(|t| t.as_str()).unwrap_or(title);
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", serde_json::Value::String(expr)) => {
                        out.push((title.to_string(), expr.clone()))
                    }
                    _ => json_exprs(value, title, out),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                json_exprs(item, title, out);
            }
        }
        _ => {}
    }
}

fn alert_rules() -> Vec<Value> {
    let alerts = load_one("deploy/prometheus/alerts.yml");
    seq(&alerts["groups"], "groups")
        .iter()
        .flat_map(|group| seq(&group["rules"], "rules").to_vec())
        .collect()
}

/// Every `.rs` file of the binary and the crates, concatenated.
fn rust_sources() -> String {
    let mut files = files_with_extension("src", &["rs"]);
    files.extend(files_with_extension("crates", &["rs"]));
    files
        .iter()
        .filter(|p| p.components().any(|c| c.as_os_str() == "src"))
        .map(|p| std::fs::read_to_string(p).expect("read source"))
        .collect::<Vec<_>>()
        .join("\n")
}

// ================================================================== tests

#[test]
fn every_yaml_file_of_the_deployment_parses() {
    let mut files = files_with_extension("deploy", &["yml", "yaml"]);
    files.push(root().join("docker-compose.yml"));
    let mut documents = 0;
    for file in &files {
        let docs = load_yaml(file);
        assert!(!docs.is_empty(), "{} has no document", file.display());
        documents += docs.len();
    }
    for expected in [
        "deploy/k8s/base/kustomization.yaml",
        "deploy/k8s/overlays/example/kustomization.yaml",
        "deploy/prometheus/prometheus.yml",
        "deploy/prometheus/alerts.yml",
        "deploy/grafana/provisioning/datasources/prometheus.yml",
        "deploy/grafana/provisioning/dashboards/thena-vitally.yml",
    ] {
        assert!(
            files.contains(&root().join(expected)),
            "{expected} is missing"
        );
    }
    assert!(
        documents > files.len(),
        "multi-document files were not split"
    );
}

#[test]
fn the_kustomizations_name_only_files_that_exist_and_leave_none_out() {
    for dir in ["deploy/k8s/base", "deploy/k8s/overlays/example"] {
        let kustomization = load_one(&format!("{dir}/kustomization.yaml"));
        let mut listed = BTreeSet::new();
        for entry in seq(&kustomization["resources"], dir) {
            let path = root().join(dir).join(str_of(entry, dir));
            assert!(
                path.exists(),
                "{dir} lists {} which does not exist",
                path.display()
            );
            listed.insert(path);
        }
        if let Some(patches) = kustomization["patches"].as_sequence() {
            for patch in patches {
                if let Some(file) = patch["path"].as_str() {
                    let path = root().join(dir).join(file);
                    assert!(path.exists(), "{dir}: patch {file} does not exist");
                    listed.insert(path);
                }
            }
        }
        for file in files_with_extension(dir, &["yaml", "yml"]) {
            let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name != "kustomization.yaml" {
                assert!(
                    listed.contains(&file),
                    "{} is not used by {dir}/kustomization.yaml",
                    file.display()
                );
            }
        }
    }
    let overlay = load_one("deploy/k8s/overlays/example/kustomization.yaml");
    assert!(
        overlay["namespace"].as_str().is_some(),
        "the overlay sets a namespace"
    );
    let base = Kube::base();
    for image in seq(&overlay["images"], "images") {
        let name = str_of(&image["name"], "image name");
        assert!(image["newTag"].as_str().is_some(), "the overlay pins a tag");
        for (deployment, spec) in base.deployments() {
            for container in containers(spec) {
                assert_eq!(
                    container["image"].as_str(),
                    Some(name),
                    "{deployment}: the overlay's image name must match the container's"
                );
            }
        }
    }
}

#[test]
fn kubernetes_and_compose_set_only_variables_the_binary_reads() {
    let kube = Kube::base();
    let mut used: Vec<(String, String)> = Vec::new();
    for name in kube.config_map().keys() {
        used.push(("ConfigMap".into(), name.clone()));
    }
    let secret = kube.secret();
    for name in secret.keys() {
        used.push(("Secret".into(), name.clone()));
    }
    for (deployment, spec) in kube.deployments() {
        for container in containers(spec) {
            for env in container["env"].as_sequence().into_iter().flatten() {
                let name = scalar(&env["name"]);
                if let Some(key) = env["valueFrom"]["secretKeyRef"]["key"].as_str() {
                    assert_eq!(
                        env["valueFrom"]["secretKeyRef"]["name"],
                        kube.one("Secret")["metadata"]["name"],
                        "{deployment}: {name} comes from another Secret"
                    );
                    assert!(
                        secret.contains_key(key),
                        "{deployment}: no Secret key {key}"
                    );
                }
                used.push((deployment.clone(), name));
            }
            for source in seq(&container["envFrom"], &deployment) {
                assert_eq!(
                    source["configMapRef"]["name"],
                    kube.one("ConfigMap")["metadata"]["name"],
                    "{deployment}: envFrom names another ConfigMap"
                );
            }
        }
    }
    let overlay = load_one("deploy/k8s/overlays/example/config.yaml");
    for name in string_map(&overlay["data"], "overlay config").keys() {
        used.push(("overlay config".into(), name.clone()));
    }
    let compose = compose();
    for service in our_services(&compose) {
        for name in service.env().keys() {
            used.push((format!("compose {}", service.name), name.clone()));
        }
    }
    let unknown: Vec<_> = used
        .iter()
        .filter(|(_, name)| !is_known_variable(name))
        .collect();
    assert!(
        unknown.is_empty(),
        "variables the binary never reads: {unknown:?}"
    );

    // Secrets stay out of the ConfigMap; everything that may hold a password is a Secret.
    let config_map = kube.config_map();
    for var in VARIABLES.iter().filter(|v| v.secret) {
        assert!(
            !config_map.contains_key(var.name),
            "{} is in the ConfigMap",
            var.name
        );
        assert!(
            secret.contains_key(var.name),
            "{} is not in the Secret",
            var.name
        );
    }
    for name in ["AMQP_URL", "REDIS_URL", "DATABASE_URL"] {
        assert!(
            secret.contains_key(name) && !config_map.contains_key(name),
            "{name}"
        );
    }
}

#[test]
fn every_configuration_in_the_manifests_is_accepted_by_the_binary() {
    let kube = Kube::base();
    config_from(&kube.environment(), "Kubernetes base");
    let mut example = kube.environment();
    example.extend(string_map(
        &load_one("deploy/k8s/overlays/example/config.yaml")["data"],
        "overlay config",
    ));
    config_from(&example, "Kubernetes example overlay");
    let compose = compose();
    for service in our_services(&compose) {
        config_from(&service.env(), &format!("compose {}", service.name));
        if let Some(key) = service.env().get("INTEGRATIONS_KEY") {
            vitally_client::crypto::SecretCipher::from_key(&key.clone().into())
                .unwrap_or_else(|e| panic!("compose {}: INTEGRATIONS_KEY: {e}", service.name));
        }
    }
    // The committed Secret must never hold a usable credential: a placeholder, or empty
    // for an optional one (the key ring, used only while rotating).
    for (name, value) in kube.secret() {
        assert!(
            value.contains("change-me") || (name == "INTEGRATIONS_KEYS" && value.is_empty()),
            "the Secret's {name} is not a placeholder"
        );
    }
}

#[test]
fn every_port_is_the_port_of_http_addr_or_metrics_addr() {
    let kube = Kube::base();
    let config = kube.config_map();
    let http = port_of(&setting(&config, "HTTP_ADDR"));
    let metrics = port_of(&setting(&config, "METRICS_ADDR"));
    assert_eq!(
        http,
        port_of(default_of("HTTP_ADDR")),
        "HTTP_ADDR is not the default"
    );
    assert_eq!(
        metrics,
        port_of(default_of("METRICS_ADDR")),
        "METRICS_ADDR is not the default"
    );
    for (deployment, spec) in kube.deployments() {
        for container in containers(spec) {
            for port in seq(&container["ports"], &deployment) {
                let expected = match port["name"].as_str() {
                    Some("http") => http,
                    Some("metrics") => metrics,
                    other => panic!("{deployment}: unexpected port name {other:?}"),
                };
                assert_eq!(port["containerPort"].as_u64(), Some(u64::from(expected)));
            }
            for probe in ["readinessProbe", "livenessProbe"] {
                let port = resolve_port(&container[probe]["httpGet"]["port"], container);
                assert_eq!(
                    port, metrics,
                    "{deployment}: {probe} is not on METRICS_ADDR"
                );
            }
        }
    }
    for service in kube.of_kind("Service") {
        let name = scalar(&service["metadata"]["name"]);
        let selector = string_map(&service["spec"]["selector"], "selector");
        let target = kube
            .deployments()
            .into_iter()
            .find(|(_, d)| {
                selector.iter().all(|(k, v)| {
                    d["spec"]["template"]["metadata"]["labels"][k.as_str()] == v.as_str()
                })
            })
            .unwrap_or_else(|| panic!("Service {name} selects no Deployment"));
        let container = &containers(target.1)[0];
        for port in seq(&service["spec"]["ports"], &name) {
            let target_port = resolve_port(&port["targetPort"], container);
            assert_eq!(
                port["port"].as_u64(),
                Some(u64::from(target_port)),
                "{name}"
            );
        }
        assert!(
            seq(&service["spec"]["ports"], &name)
                .iter()
                .any(|p| p["name"] == "metrics"),
            "Service {name} has no metrics port to scrape"
        );
    }

    let compose = compose();
    for service in our_services(&compose) {
        let env = service.env();
        let http = port_of(&setting(&env, "HTTP_ADDR"));
        let metrics = port_of(&setting(&env, "METRICS_ADDR"));
        if let Some(url) = service.healthcheck_url() {
            let (port, path) = url_port_and_path(&url);
            assert!(port == metrics || port == http, "{}: {url}", service.name);
            if port == metrics {
                assert!(["/readyz", "/healthz"].contains(&path.as_str()), "{url}");
            }
        }
        for published in service.spec["ports"].as_sequence().into_iter().flatten() {
            let container_port: u16 = scalar(published)
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .expect("published port");
            assert!(
                container_port == http || container_port == metrics,
                "{}",
                service.name
            );
        }
    }
}

#[tokio::test]
async fn probes_ask_the_paths_the_ops_router_serves() {
    let kube = Kube::base();
    let mut paths = BTreeMap::new();
    for (deployment, spec) in kube.deployments() {
        for container in containers(spec) {
            for (probe, expected) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")]
            {
                let path = scalar(&container[probe]["httpGet"]["path"]);
                assert_eq!(path, expected, "{deployment}: {probe}");
                paths.insert(path, probe);
            }
        }
    }
    let compose = compose();
    for service in our_services(&compose) {
        let metrics = port_of(&setting(&service.env(), "METRICS_ADDR"));
        if let Some(url) = service.healthcheck_url() {
            let (port, path) = url_port_and_path(&url);
            if port == metrics {
                paths.insert(path, "readinessProbe");
            }
        }
    }

    // The router every role serves on METRICS_ADDR, on a free port of this machine.
    let readiness = ops::Readiness::new();
    let shutdown = CancellationToken::new();
    let addr = ops::spawn(
        "127.0.0.1:0".parse().expect("addr"),
        prometheus::Registry::new(),
        readiness.clone(),
        shutdown.clone(),
    )
    .await
    .expect("ops server");
    for path in paths.keys() {
        assert_eq!(get_status(addr, path).await, 200, "{path}");
    }
    // A role whose broker is down must fail its readiness probe but not its liveness one.
    readiness.set("broker", false);
    for (path, probe) in &paths {
        let expected = if *probe == "readinessProbe" { 503 } else { 200 };
        assert_eq!(
            get_status(addr, path).await,
            expected,
            "{path} with the broker down"
        );
    }
    shutdown.cancel();
}

/// One HTTP/1.1 GET over a plain socket: the status code.
async fn get_status(addr: SocketAddr, path: &str) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .expect("response within 5 s")
        .expect("read");
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"))
}

#[test]
fn pods_get_more_time_to_stop_than_the_shutdown_grace() {
    let kube = Kube::base();
    let grace = parse_duration(&setting(&kube.config_map(), "SHUTDOWN_GRACE")).expect("grace");
    for (deployment, spec) in kube.deployments() {
        let termination = spec["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(30);
        assert!(
            Duration::from_secs(termination) > grace,
            "{deployment}: terminationGracePeriodSeconds {termination} must exceed SHUTDOWN_GRACE {grace:?}"
        );
    }
    let compose = compose();
    for service in our_services(&compose) {
        let grace = parse_duration(&setting(&service.env(), "SHUTDOWN_GRACE")).expect("grace");
        let stop = service.spec["stop_grace_period"]
            .as_str()
            .map_or(Duration::from_secs(10), |s| {
                parse_duration(s).expect("stop grace")
            });
        assert!(stop > grace, "compose {}: stop_grace_period", service.name);
    }
}

#[test]
fn every_container_runs_a_real_subcommand() {
    let kube = Kube::base();
    for (deployment, spec) in kube.deployments() {
        for container in containers(spec) {
            let args = seq(&container["args"], &deployment);
            let role = scalar(&args[0]);
            assert!(SUBCOMMANDS.contains(&role.as_str()), "{deployment}: {role}");
            assert!(
                deployment.ends_with(&role),
                "{deployment} runs `{role}`: name and role disagree"
            );
        }
    }
    let compose = compose();
    let mut roles = BTreeSet::new();
    for service in our_services(&compose) {
        let command = service.command();
        assert!(
            SUBCOMMANDS.contains(&command[0].as_str()),
            "compose {}: {command:?}",
            service.name
        );
        roles.insert(command[0].clone());
    }
    for role in ["producer", "consumer", "replayer", "fake-vitally", "emit"] {
        assert!(roles.contains(role), "compose runs no {role}");
    }
}

#[test]
fn deployments_run_as_the_images_unprivileged_user_and_drop_everything() {
    let dockerfile = read("Dockerfile");
    let user: u64 = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .and_then(|u| u.split(':').next())
        .and_then(|u| u.trim().parse().ok())
        .expect("the Dockerfile sets a numeric USER");
    assert!(dockerfile.contains("ENTRYPOINT [\"thena-vitally\"]"));
    let kube = Kube::base();
    for (deployment, spec) in kube.deployments() {
        let pod = &spec["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{deployment}");
        assert_eq!(
            pod["securityContext"]["runAsUser"].as_u64(),
            Some(user),
            "{deployment}"
        );
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        for container in containers(spec) {
            let security = &container["securityContext"];
            assert_eq!(security["readOnlyRootFilesystem"], true, "{deployment}");
            assert_eq!(security["allowPrivilegeEscalation"], false, "{deployment}");
            assert_eq!(
                seq(&security["capabilities"]["drop"], "drop"),
                [Value::from("ALL")]
            );
            for bound in ["requests", "limits"] {
                for resource in ["cpu", "memory"] {
                    assert!(
                        !container["resources"][bound][resource].is_null(),
                        "{deployment}: resources.{bound}.{resource}"
                    );
                }
            }
        }
    }
    let budgets: BTreeSet<String> = kube
        .of_kind("PodDisruptionBudget")
        .iter()
        .map(|pdb| scalar(&pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]))
        .collect();
    assert_eq!(
        budgets,
        BTreeSet::from(["consumer".into(), "producer".into()])
    );
}

#[test]
fn keda_scales_the_consumers_on_the_sync_queue_of_the_configured_prefix() {
    let kube = Kube::base();
    let config = config_from(&kube.environment(), "Kubernetes base");
    let sync_queue = thena_broker::Topology::from_config(&config).sync_queue();
    assert_eq!(sync_queue, format!("{}.requests.sync", config.name_prefix));

    let scaled = kube.one("ScaledObject");
    assert_eq!(scaled["apiVersion"], "keda.sh/v1alpha1");
    let target = str_of(&scaled["spec"]["scaleTargetRef"]["name"], "scaleTargetRef");
    let consumer = kube.named("Deployment", target);
    assert_eq!(scalar(&containers(consumer)[0]["args"][0]), "consumer");
    let (min, max) = (
        scaled["spec"]["minReplicaCount"].as_u64().expect("min"),
        scaled["spec"]["maxReplicaCount"].as_u64().expect("max"),
    );
    assert!(1 <= min && min <= max, "replica bounds {min}..{max}");

    let triggers = seq(&scaled["spec"]["triggers"], "triggers");
    assert_eq!(triggers.len(), 1);
    let trigger = &triggers[0];
    assert_eq!(trigger["type"], "rabbitmq");
    assert_eq!(
        trigger["metadata"]["queueName"].as_str(),
        Some(sync_queue.as_str())
    );
    assert_eq!(trigger["metadata"]["mode"], "QueueLength");
    scalar(&trigger["metadata"]["value"])
        .parse::<u32>()
        .expect("a numeric target queue length");

    let auth_name = str_of(&trigger["authenticationRef"]["name"], "authenticationRef");
    let auth = kube.named("TriggerAuthentication", auth_name);
    let refs = seq(&auth["spec"]["secretTargetRef"], "secretTargetRef");
    let host = refs
        .iter()
        .find(|r| r["parameter"] == "host")
        .expect("the trigger's host comes from the Secret");
    assert_eq!(host["name"], kube.one("Secret")["metadata"]["name"]);
    assert_eq!(host["key"], "AMQP_URL");
}

#[test]
fn the_service_monitor_scrapes_every_role_and_job_names_match_the_alerts() {
    let kube = Kube::base();
    let monitor = kube.one("ServiceMonitor");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    let selector = string_map(&monitor["spec"]["selector"]["matchLabels"], "selector");
    let endpoints = seq(&monitor["spec"]["endpoints"], "endpoints");
    let port_name = str_of(&endpoints[0]["port"], "endpoint port");
    assert_eq!(endpoints[0]["path"], "/metrics");
    let mut services = BTreeSet::new();
    for service in kube.of_kind("Service") {
        let name = scalar(&service["metadata"]["name"]);
        for (k, v) in &selector {
            assert_eq!(
                service["metadata"]["labels"][k.as_str()],
                v.as_str(),
                "{name}"
            );
        }
        assert!(
            seq(&service["spec"]["ports"], &name)
                .iter()
                .any(|p| p["name"] == port_name),
            "{name} has no port {port_name}"
        );
        services.insert(name);
    }

    // docker-compose's Prometheus uses the Service names as job names, like the operator.
    let prometheus = load_one("deploy/prometheus/prometheus.yml");
    let compose = compose();
    let ours = our_services(&compose);
    let mut jobs = BTreeSet::new();
    for job in seq(&prometheus["scrape_configs"], "scrape_configs") {
        let name = scalar(&job["job_name"]);
        jobs.insert(name.clone());
        let Some(role) = name.strip_prefix("thena-vitally-") else {
            continue;
        };
        let sd = &seq(&job["dns_sd_configs"], &name)[0];
        let host = scalar(&seq(&sd["names"], &name)[0]);
        let service = ours
            .iter()
            .find(|s| s.name == host)
            .unwrap_or_else(|| panic!("job {name} scrapes {host}, no compose service"));
        assert_eq!(service.command()[0], role, "job {name}");
        assert_eq!(
            sd["port"].as_u64(),
            Some(u64::from(port_of(&setting(&service.env(), "METRICS_ADDR")))),
            "job {name}"
        );
    }
    for service in &services {
        assert!(
            jobs.contains(service),
            "compose's Prometheus has no job {service}"
        );
    }
    assert!(jobs.contains("rabbitmq"));

    // Every `up{job="…"}` of the alerts names a job both Prometheus setups have.
    for rule in alert_rules() {
        let expr = scalar(&rule["expr"]);
        for part in expr.split("job=\"").skip(1) {
            let job = part.split('"').next().unwrap_or("");
            assert!(
                services.contains(job) && jobs.contains(job),
                "{expr}: no job {job}"
            );
        }
    }
}

#[test]
fn the_prometheus_rule_carries_the_same_groups_as_alerts_yml() {
    let kube = Kube::base();
    let rule = kube.one("PrometheusRule");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    let alerts = load_one("deploy/prometheus/alerts.yml");
    let hint = "run deploy/sync-alerts.sh after editing deploy/prometheus/alerts.yml";
    let (ours, theirs) = (
        seq(&rule["spec"]["groups"], "PrometheusRule groups"),
        seq(&alerts["groups"], "alerts.yml groups"),
    );
    assert_eq!(ours.len(), theirs.len(), "{hint}");
    for (a, b) in ours.iter().zip(theirs) {
        let (a_rules, b_rules) = (seq(&a["rules"], "rules"), seq(&b["rules"], "rules"));
        assert_eq!(a["name"], b["name"], "{hint}");
        assert_eq!(
            a_rules.len(),
            b_rules.len(),
            "{}: {hint}",
            scalar(&a["name"])
        );
        for (x, y) in a_rules.iter().zip(b_rules) {
            assert_eq!(x, y, "{}: {hint}", scalar(&y["alert"]));
        }
    }
    assert_eq!(rule["spec"]["groups"], alerts["groups"], "{hint}");
    let names: Vec<String> = alert_rules().iter().map(|r| scalar(&r["alert"])).collect();
    let unique: BTreeSet<_> = names.iter().collect();
    assert_eq!(unique.len(), names.len(), "duplicate alert names");
    for rule in alert_rules() {
        let name = scalar(&rule["alert"]);
        assert!(
            ["critical", "warning", "info"].contains(&scalar(&rule["labels"]["severity"]).as_str()),
            "{name}: severity"
        );
        assert!(
            rule["annotations"]["summary"].as_str().is_some(),
            "{name}: summary"
        );
    }
    // The cases the brief of the fleet asks an alert for.
    for required in [
        "thena_vitally_event_age_seconds_bucket",
        "thena_vitally_parked_messages",
        "thena_vitally_parked_oldest_age_seconds",
        "thena_vitally_queue_messages",
        "thena_vitally_vitally_requests_total",
        "up",
    ] {
        assert!(
            alert_rules()
                .iter()
                .any(|r| metric_names(&scalar(&r["expr"])).contains(required)),
            "no alert on {required}"
        );
    }
}

#[test]
fn dashboards_and_alerts_query_only_metrics_the_code_exports() {
    let sources = rust_sources();
    let exported = |name: &str| -> bool {
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        sources.contains(&format!("\"{base}\"")) || sources.contains(&format!("\"{name}\""))
    };
    let mut queries: Vec<(String, String)> = alert_rules()
        .iter()
        .map(|r| (format!("alert {}", scalar(&r["alert"])), scalar(&r["expr"])))
        .collect();

    let mut panels = 0;
    for file in files_with_extension("deploy/grafana/dashboards", &["json"]) {
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).expect("read dashboard"))
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", file.display()));
        assert!(
            dashboard["uid"].as_str().is_some(),
            "{}: uid",
            file.display()
        );
        let list = dashboard["panels"].as_array().expect("panels");
        panels += list.len();
        for panel in list.iter().filter(|p| p["type"] != "row") {
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "panel {} does not use the datasource variable",
                panel["title"]
            );
            assert!(
                panel["targets"].as_array().is_some_and(|t| !t.is_empty()),
                "panel {} has no query",
                panel["title"]
            );
        }
        json_exprs(&dashboard, "dashboard", &mut queries);
        for variable in dashboard["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(definition) = variable["definition"].as_str() {
                let inner = definition
                    .strip_prefix("label_values(")
                    .and_then(|rest| rest.split(',').next())
                    .unwrap_or(definition);
                queries.push((format!("variable {}", variable["name"]), inner.to_string()));
            }
        }
    }
    assert!(panels >= 10, "the dashboard has only {panels} panels");

    let mut seen = BTreeSet::new();
    for (origin, expr) in &queries {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{origin}: {expr} selects no metric");
        for name in names {
            let allowed = name == "up"
                || name.starts_with("rabbitmq_")
                || (name.starts_with("thena_vitally_") && exported(&name));
            assert!(
                allowed,
                "{origin}: {name} is not a metric the fleet exports ({expr})"
            );
            seen.insert(name);
        }
    }
    // The dashboard's promised panels: outcomes, Vitally calls and headroom, event age,
    // queue depths, cache, limiter, in-flight.
    for required in [
        "thena_vitally_events_total",
        "thena_vitally_vitally_requests_total",
        "thena_vitally_vitally_request_duration_seconds_bucket",
        "thena_vitally_vitally_ratelimit_remaining",
        "thena_vitally_event_age_seconds_bucket",
        "thena_vitally_queue_messages",
        "thena_vitally_cache_lookups_total",
        "thena_vitally_limiter_waits_total",
        "thena_vitally_limiter_paused_total",
        "thena_vitally_consumer_in_flight",
    ] {
        assert!(seen.contains(required), "nothing shows {required}");
    }
}

#[test]
fn queue_labels_in_queries_are_the_ones_the_replayer_exports() {
    let registry = prometheus::Registry::new();
    thena_broker::BrokerMetrics::register(&registry).expect("register");
    let exported: BTreeSet<String> = registry
        .gather()
        .iter()
        .filter(|family| family.name() == "thena_vitally_queue_messages")
        .flat_map(|family| family.get_metric().to_vec())
        .flat_map(|metric| metric.get_label().to_vec())
        .filter(|label| label.name() == "queue")
        .map(|label| label.value().to_string())
        .collect();
    assert!(exported.contains("parked") && exported.contains("dead"));
    let mut texts: Vec<String> = alert_rules().iter().map(|r| scalar(&r["expr"])).collect();
    texts.push(read("deploy/grafana/dashboards/thena-vitally.json").replace("\\\"", "\""));
    for text in texts {
        for part in text.split("queue=\"").skip(1) {
            let queue = part.split('"').next().unwrap_or("");
            assert!(
                exported.contains(queue),
                "queue label {queue:?} is never exported"
            );
        }
    }
}

#[test]
fn compose_runs_the_fleet_with_persistent_redis_and_three_consumers() {
    let compose = compose();
    let services = compose_services(&compose);
    let names: BTreeSet<String> = services.iter().map(|s| s.name.clone()).collect();
    for service in &services {
        if let Some(deps) = service.spec["depends_on"].as_mapping() {
            for (dep, condition) in deps {
                assert!(
                    names.contains(&scalar(dep)),
                    "{} depends on {dep:?}",
                    service.name
                );
                assert!(
                    [
                        "service_started",
                        "service_healthy",
                        "service_completed_successfully"
                    ]
                    .contains(&scalar(&condition["condition"]).as_str()),
                    "{}: condition",
                    service.name
                );
                if condition["condition"] == "service_healthy" {
                    let target = services
                        .iter()
                        .find(|s| s.name == scalar(dep))
                        .expect("dep");
                    assert!(
                        !target.spec["healthcheck"]["test"].is_null()
                            && target.spec["healthcheck"]["disable"] != true,
                        "{} waits for {dep:?} to be healthy, which has no healthcheck",
                        service.name
                    );
                }
            }
        }
    }
    let by_name = |name: &str| {
        services
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no compose service {name}"))
    };

    let redis = by_name("redis");
    let command = redis.command().join(" ");
    assert!(
        command.contains("--appendonly yes"),
        "redis persistence is off: {command}"
    );
    assert!(
        seq(&redis.spec["volumes"], "redis volumes")
            .iter()
            .any(|v| scalar(v).ends_with(":/data")),
        "redis keeps /data in no volume"
    );
    let consumers = our_services(&compose)
        .into_iter()
        .find(|s| s.command()[0] == "consumer")
        .expect("a consumer service");
    assert_eq!(consumers.spec["deploy"]["replicas"].as_u64(), Some(3));
    let fake = our_services(&compose)
        .into_iter()
        .find(|s| s.command()[0] == "fake-vitally")
        .expect("a fake-vitally service");
    assert!(fake.command().contains(&"--demo-seed".to_string()));

    // RabbitMQ serves the metrics Prometheus scrapes.
    let plugins = read("deploy/rabbitmq/enabled_plugins");
    assert!(plugins.contains("rabbitmq_prometheus") && plugins.contains("rabbitmq_management"));
    let rabbit_volumes: Vec<String> = seq(&by_name("rabbitmq").spec["volumes"], "volumes")
        .iter()
        .map(scalar)
        .collect();
    assert!(
        rabbit_volumes
            .iter()
            .any(|v| v.starts_with("./deploy/rabbitmq/enabled_plugins:"))
    );

    // Every file a service mounts from the repository exists; Prometheus gets its rules.
    for service in &services {
        for volume in service.spec["volumes"].as_sequence().into_iter().flatten() {
            let volume = scalar(volume);
            if let Some(source) = volume.strip_prefix("./").and_then(|v| v.split(':').next()) {
                assert!(root().join(source).exists(), "{}: {source}", service.name);
            }
        }
    }
    let prometheus = load_one("deploy/prometheus/prometheus.yml");
    for rule_file in seq(&prometheus["rule_files"], "rule_files") {
        let mounted = seq(&by_name("prometheus").spec["volumes"], "volumes")
            .iter()
            .map(scalar)
            .any(|v| v.ends_with(&format!("/{}:ro", scalar(rule_file))));
        assert!(mounted, "prometheus does not mount {rule_file:?}");
    }
}

#[test]
fn the_variables_read_outside_the_config_module_are_read_by_the_code() {
    let sources = rust_sources();
    for name in EXTRA_VARIABLES.iter().filter(|n| **n != "RUST_LOG") {
        assert!(
            sources.contains(&format!("\"{name}\"")),
            "nothing in the code reads {name}"
        );
    }
    assert!(
        sources.contains("EnvFilter::try_from_default_env"),
        "RUST_LOG"
    );
}

#[test]
fn the_promql_scanner_finds_metric_names_and_nothing_else() {
    let names = |expr: &str| metric_names(expr).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (le, endpoint) (rate(a_bucket{le=~"600|600.0", x="by"}[$__rate_interval]))) > 4 * 3600"#
        ),
        ["a_bucket"]
    );
    assert_eq!(
        names(r#"absent(up{job="c"} == 1) or max(b) unless on (x) group_left (y) c offset 5m"#),
        ["b", "c", "up"]
    );
    assert_eq!(
        names("sum(rate(x[5m])) by (outcome) / ignoring(q) y"),
        ["x", "y"]
    );
    assert!(names("1 + 2e3").is_empty());
}

/// `docker compose up` must work where RabbitMQ, Redis and PostgreSQL (or a hand-run
/// fleet) already listen: every published host port is a `${…_HOST_PORT:-N}` variable
/// whose default N is none of theirs, and no two services share one.
#[test]
fn compose_host_ports_are_variables_that_miss_locally_running_services() {
    const LOCAL: [u16; 8] = [5672, 15672, 15692, 6379, 5432, 8080, 9090, 3000];
    let compose = compose();
    let mut seen = BTreeMap::new();
    for service in compose_services(&compose) {
        for published in service.spec["ports"].as_sequence().into_iter().flatten() {
            let raw = scalar(published);
            // "127.0.0.1:${NAME:-default}:container"
            let host = raw
                .split_once("${")
                .and_then(|(_, rest)| rest.split_once('}'))
                .map(|(inner, _)| inner)
                .unwrap_or_else(|| panic!("{}: {raw} has a fixed host port", service.name));
            let (name, default) = host.split_once(":-").expect("a default");
            assert!(name.ends_with("_HOST_PORT"), "{}: {raw}", service.name);
            let port: u16 = default.parse().expect("a numeric default");
            assert!(!LOCAL.contains(&port), "{}: {raw} collides", service.name);
            assert!(raw.starts_with("127.0.0.1:"), "{}: {raw}", service.name);
            if let Some(other) = seen.insert(port, service.name.clone()) {
                panic!("{} and {other} both publish {port}", service.name);
            }
        }
    }
    assert!(seen.len() >= 8, "{seen:?}");
}
