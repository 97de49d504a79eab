#!/usr/bin/env bash
# Validates the deployment files offline, installing the tools it needs when they are
# missing (idempotent; a few seconds once they are there):
#   - docker-compose.yml            `docker compose config -q` (or Debian's docker-compose)
#   - deploy/k8s base and overlays  rendered by kustomize, core kinds validated against the
#                                   Kubernetes schemas (kubernetes-validate --strict); the
#                                   CRDs (KEDA, Prometheus Operator) are checked by
#                                   `cargo nextest run --test it manifests`
#   - deploy/prometheus             promtool check config / check rules / test rules, and
#                                   the PrometheusRule is in sync with alerts.yml
#   - deploy/grafana                every dashboard query parses as PromQL (promtool)
# Usage: deploy/check.sh   (from any directory; installing needs apt-get as root, and PyPI
# for the pinned deploy/check-requirements.txt, installed into target/check-venv)
set -euo pipefail
cd "$(dirname "$0")/.."

# promtool is kept here rather than installed with Debian's `prometheus` package, whose
# install would also start a Prometheus server on :9090 (the fleet's METRICS_ADDR).
TOOLS_DIR="${THENA_VITALLY_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/thena-vitally/tools}"
# The interpreter that creates the virtual environment below (tools run in the venv).
BASE_PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

checked=()
skipped=()
started=$SECONDS

step() { printf '\n== %s\n' "$*"; }
ok() {
  checked+=("$1")
  printf 'ok   %s\n' "$1"
}
skip() {
  skipped+=("$1")
  printf 'SKIP %s\n' "$1"
}

apt_updated=0
apt_install() {
  if [[ $apt_updated == 0 ]]; then
    apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# ---------------------------------------------------------------- tools
step "tools"

compose=()
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
else
  # Debian ships no compose plugin; its docker-compose (v1.29) validates the same file.
  echo "installing docker-compose (Debian package)…"
  if apt_install docker-compose && command -v docker-compose >/dev/null 2>&1; then
    compose=(docker-compose)
  fi
fi
if ((${#compose[@]})); then
  echo "compose:             ${compose[*]} ($("${compose[@]}" version --short 2>/dev/null || echo '?'))"
fi

if command -v promtool >/dev/null 2>&1; then
  PROMTOOL="$(command -v promtool)"
elif [[ -x "$TOOLS_DIR/promtool" ]]; then
  PROMTOOL="$TOOLS_DIR/promtool"
else
  echo "installing promtool (from Debian's prometheus package, unpacked into $TOOLS_DIR)…"
  mkdir -p "$TOOLS_DIR"
  (
    cd "$WORK"
    apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq && apt-get download prometheus >/dev/null; }
    dpkg-deb -x prometheus_*.deb unpacked
  )
  install -m 0755 "$WORK/unpacked/usr/bin/promtool" "$TOOLS_DIR/promtool"
  PROMTOOL="$TOOLS_DIR/promtool"
fi
echo "promtool:            $PROMTOOL ($("$PROMTOOL" --version 2>&1 | head -n1 | awk '{print $3}'))"

# kubernetes-validate (PyPI; ships the Kubernetes schemas) and PyYAML, at the versions
# pinned in deploy/check-requirements.txt, in a virtual environment under target/: never
# into the system Python (Debian's refuses: externally-managed environment), and the
# same versions on every machine. Recreated when the pins change.
VENV="${THENA_VITALLY_CHECK_VENV:-$PWD/target/check-venv}"
REQUIREMENTS=deploy/check-requirements.txt
if ! cmp -s "$REQUIREMENTS" "$VENV/requirements.txt" 2>/dev/null; then
  echo "installing $(grep -c '==' "$REQUIREMENTS") pinned Python packages into $VENV…"
  if ! "$BASE_PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt_install python3-venv
  fi
  rm -rf "$VENV"
  "$BASE_PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-input -r "$REQUIREMENTS"
  cp "$REQUIREMENTS" "$VENV/requirements.txt"
fi
PYTHON="$VENV/bin/python"
echo "kubernetes-validate: $("$PYTHON" -m kubernetes_validate --version) in $VENV"

kustomize=()
if command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
  kustomize=(kubectl kustomize)
elif command -v kustomize >/dev/null 2>&1; then
  kustomize=(kustomize build)
fi
echo "kustomize:           ${kustomize[*]:-none (base files are validated one by one)}"

# ---------------------------------------------------------------- docker compose
step "docker-compose.yml"
if ((${#compose[@]})); then
  "${compose[@]}" -f docker-compose.yml config -q
  ok "docker-compose.yml: ${compose[*]} config -q"
else
  skip "docker-compose.yml: no docker compose and none installable (the Rust manifests test still parses it)"
fi

# ---------------------------------------------------------------- kubernetes
step "kubernetes manifests"
# Splits a manifest stream: core kinds go to $2 (schema-validated), the others are listed.
core_kinds() {
  "$PYTHON" - "$1" "$2" <<'PY'
import sys, yaml
CORE = {"Namespace", "Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"}
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
core = [d for d in docs if d.get("kind") in CORE]
other = sorted({f'{d.get("kind")}/{d["metadata"]["name"]}' for d in docs if d.get("kind") not in CORE})
with open(sys.argv[2], "w") as out:
    yaml.safe_dump_all(core, out, sort_keys=False)
print(f"{len(core)} core resources; CRDs left to the Rust test: {', '.join(other) or 'none'}")
PY
}

validate_stream() { # name, file
  core_kinds "$2" "$WORK/core.yaml"
  if [[ -s "$WORK/core.yaml" ]]; then
    "$PYTHON" -m kubernetes_validate --strict --quiet "$WORK/core.yaml"
    ok "$1: kubernetes-validate --strict"
  fi
}

if ((${#kustomize[@]})); then
  for dir in deploy/k8s/base deploy/k8s/overlays/*/; do
    dir="${dir%/}"
    "${kustomize[@]}" "$dir" >"$WORK/rendered.yaml"
    ok "$dir: ${kustomize[*]} renders"
    validate_stream "$dir" "$WORK/rendered.yaml"
  done
else
  for file in deploy/k8s/base/*.yaml; do
    [[ "$(basename "$file")" == kustomization.yaml ]] && continue
    validate_stream "$file" "$file"
  done
  skip "deploy/k8s/overlays: no kustomize to render them (the Rust test parses every file)"
fi

# ---------------------------------------------------------------- prometheus
step "prometheus"
"$PROMTOOL" check config deploy/prometheus/prometheus.yml >/dev/null
ok "deploy/prometheus/prometheus.yml: promtool check config (with its rule file)"
"$PROMTOOL" check rules deploy/prometheus/alerts.yml >/dev/null
ok "deploy/prometheus/alerts.yml: promtool check rules ($(grep -c -- '- alert:' deploy/prometheus/alerts.yml) alerts)"
"$PROMTOOL" test rules deploy/prometheus/alerts.test.yml >/dev/null
ok "deploy/prometheus/alerts.test.yml: promtool test rules"
deploy/sync-alerts.sh --check >/dev/null
ok "deploy/k8s/base/prometheusrule.yaml: same groups as alerts.yml"

# ---------------------------------------------------------------- grafana
step "grafana"
# Each dashboard query becomes a recording rule, so promtool parses it as PromQL. Grafana's
# variables are replaced by values of the same shape first.
for dashboard in deploy/grafana/dashboards/*.json; do
  count="$("$PYTHON" - "$dashboard" "$WORK/dashboard-rules.yml" <<'PY'
import json, sys, yaml
def exprs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from exprs(item)
found = list(exprs(json.load(open(sys.argv[1]))))
subst = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$workspace": ".*"}
rules = []
for i, expr in enumerate(found):
    for var, value in subst.items():
        expr = expr.replace(var, value)
    rules.append({"record": f"dashboard:query_{i}", "expr": expr})
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[2], "w"))
print(len(found))
PY
)"
  "$PROMTOOL" check rules "$WORK/dashboard-rules.yml" >/dev/null
  ok "$dashboard: $count queries parse as PromQL"
done

# ---------------------------------------------------------------- /metrics of every role
# METRICS_DIR: *.prom files written by `thena-vitally demo --metrics-dir` (.ci/run does).
if [[ -n "${METRICS_DIR:-}" ]]; then
  step "metrics"
  shopt -s nullglob
  files=("$METRICS_DIR"/*.prom)
  if (( ${#files[@]} == 0 )); then
    echo "no *.prom files in METRICS_DIR=$METRICS_DIR" >&2
    exit 1
  fi
  for file in "${files[@]}"; do
    "$PROMTOOL" check metrics < "$file"
    ok "$file: promtool check metrics"
  done
fi

printf '\ndeploy/check.sh: %d checks ok, %d skipped, %ds\n' "${#checked[@]}" "${#skipped[@]}" "$((SECONDS - started))"
