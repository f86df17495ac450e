#!/usr/bin/env bash
# Offline checks of the API contract, docs/openapi.yaml and docs/asyncapi.yaml: no daemon, no
# network beyond the Debian and npm registries for the first install. One line per check, then
# "N passed, N failed". Exit 0 only when nothing failed. (tests/e2e/test_contract.py checks the
# same documents against the running daemons.)
#
#   tests/contract/run.sh
#
# Installs what it needs, idempotently: Debian's nodejs and npm when missing; the npm packages
# of tests/contract/package-lock.json into tests/contract/node_modules (git-ignored): Redocly
# CLI (lints both specs), the AsyncAPI parser, ajv, yaml. Each check also runs on a broken
# input it must reject: the files in tests/contract/fixtures/ and mutants of the real specs.
set -uo pipefail
export NPM_CONFIG_UPDATE_NOTIFIER=false REDOCLY_TELEMETRY=off REDOCLY_SUPPRESS_UPDATE_NOTICE=true

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
DOCS="$ROOT/docs"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/markets-contract.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
NODE_BIN="$HERE/node_modules/.bin"

CHECKS_NAME="contract checks" CHECKS_DIR=$HERE
. "$HERE/../lib/checks.sh"

if ! checks_install_npm; then
  echo "contract checks: could not install the checkers"
  echo "0 passed, 1 failed"
  exit 1
fi

# rejects EXPECT COMMAND...: the command must fail, and say EXPECT (case-insensitive).
rejects() {
  local expect=$1 out; shift
  if out=$("$@" 2>&1); then
    echo "accepted (it must be rejected with: $expect)"; return 1
  fi
  grep -qiF -- "$expect" <<<"$out" || { echo "rejected, but not for \"$expect\":"; echo "$out"; return 1; }
}

# ---------------------------------------------------------------------------------------------
# The checks, each on one file so the fixtures and mutants go through the very same code.

REDOCLY_VERSION=$(node -p 'require(process.argv[1]).version' "$HERE/node_modules/@redocly/cli/package.json")
PARSER_VERSION=$(node -p 'require(process.argv[1]).version' "$HERE/node_modules/@asyncapi/parser/package.json")

# Redocly's recommended-strict rules (tests/contract/redocly.yaml): every warning fails, and
# media-type examples are validated against their schemas.
openapi_lint() { "$NODE_BIN/redocly" lint --config "$HERE/redocly.yaml" --format=stylish "$1"; }
asyncapi_lint() { "$NODE_BIN/redocly" lint --config "$HERE/redocly.yaml" --format=stylish "$1"; }
asyncapi_parse() { node "$HERE/checks.js" asyncapi "$1"; }
async_examples() { node "$HERE/checks.js" async-examples "$1"; }
drift() { node "$HERE/checks.js" drift "$1" "$2" "$ROOT"; }
doc_links() { node "$HERE/checks.js" links "$DOCS" "$ROOT"; }

check "redocly $REDOCLY_VERSION lint docs/openapi.yaml (OpenAPI 3.1, recommended-strict)" openapi_lint "$DOCS/openapi.yaml"
check "redocly $REDOCLY_VERSION lint docs/asyncapi.yaml (AsyncAPI 3.0, recommended-strict)" asyncapi_lint "$DOCS/asyncapi.yaml"
check "@asyncapi/parser $PARSER_VERSION: docs/asyncapi.yaml has no error or warning" asyncapi_parse "$DOCS/asyncapi.yaml"
check "docs/asyncapi.yaml: every message example validates against its payload and headers" async_examples "$DOCS/asyncapi.yaml"
check "specs == sources: routes, error codes and statuses, Cache-Status, close codes, frame types, order fields, variables" \
  drift "$DOCS/openapi.yaml" "$DOCS/asyncapi.yaml"
check "docs/README.md, README.md and both specs link the three documents" doc_links

# ---------------------------------------------------------------------------------------------
# Fixtures: broken files that the checks above must reject, each for the reason it names.
# A fixture's first lines say which check and which message:  "# check: NAME" / "# expect: TEXT"

for fx in "$HERE"/fixtures/*; do
  fn=$(sed -n 's/^# check: *//p' "$fx" | head -1)
  expect=$(sed -n 's/^# expect: *//p' "$fx" | head -1)
  if [ -z "$fn" ] || [ -z "$expect" ]; then
    check "fixture $(basename "$fx")" false
    continue
  fi
  check "fixture $(basename "$fx") is rejected by $fn ($expect)" rejects "$expect" "$fn" "$fx"
done

# Mutants: the real specs with one thing the daemons send taken out; the drift check must see it.
mutant() {  # mutant NAME FILE SED-SCRIPT -> prints the mutant's path
  local out="$WORK/$1.yaml"
  sed -e "$3" "$2" > "$out"
  cmp -s "$2" "$out" && { echo "mutant $1 is the same as its source: the sed script no longer matches" >&2; return 1; }
  echo "$out"
}
drift_mutant() {  # drift_mutant NAME openapi|asyncapi SED-SCRIPT EXPECT
  local m oas="$DOCS/openapi.yaml" aas="$DOCS/asyncapi.yaml"
  if [ "$2" = openapi ]; then m=$(mutant "$1" "$oas" "$3") && oas=$m; else m=$(mutant "$1" "$aas" "$3") && aas=$m; fi
  [ -n "$m" ] || return 1
  rejects "$4" drift "$oas" "$aas"
}
check "mutant: a Cache-Status value left out is found" drift_mutant cache-status openapi \
  '/^        - price-service; fwd=miss; collapsed$/d' "price-service; fwd=miss; collapsed is sent by the daemons but not documented"
check "mutant: an error code under the wrong status is found" drift_mutant error-status openapi \
  's/const: market_not_found}/const: not_found}/' "the daemons answer 404 market_not_found, which no response documents"
check "mutant: a close code left out is found" drift_mutant close-code asyncapi \
  '/{code: 1009,/d' "1009 is sent by the daemons but not documented"
check "mutant: a renamed frame type is found" drift_mutant frame-type asyncapi \
  's/const: pong$/const: pang/' "pong is sent by the daemons but not documented"
check "mutant: an order field the allow-list lacks is found" drift_mutant order-field asyncapi \
  's/^        market:$/        email: {type: string}\n        market:/' "email is documented but the sources never send it"

checks_summary
