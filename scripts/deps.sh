#!/usr/bin/env bash
# Installs the Debian 12 packages the build, the dev stack and the tests need.
# Idempotent: when every package is already installed it returns in well under a second.
set -euo pipefail

PKGS=(
  build-essential cmake pkg-config git curl ca-certificates procps
  libuv1-dev libhiredis-dev node-llhttp libwslay-dev libcjson-dev libpq-dev libssl-dev libcmocka-dev liburiparser-dev uthash-dev
  redis-server redis-tools redis-sentinel postgresql postgresql-client pgbouncer
  python3 python3-pytest python3-websocket python3-psycopg2 python3-yaml python3-jsonschema
  wrk nginx-light prometheus
  clang libclang-rt-14-dev llvm-14 clang-format
)
if [ "${DEPS_EXTRA:-}" != "" ]; then
  # shellcheck disable=SC2206
  PKGS+=(${DEPS_EXTRA})
fi

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "deps: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  SUDO="sudo"
fi
echo "deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
# The Debian packages start system-wide servers on the default ports; the stack and the tests
# run their own on other ports, so leave the system ones alone but do not depend on them.
