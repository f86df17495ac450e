# The harness of the offline check suites (tests/deploy/run.sh, tests/contract/run.sh): sourced,
# never run. The sourcing script sets CHECKS_NAME (its name in messages) and CHECKS_DIR (the
# folder of its package-lock.json and node_modules) first.
#
#   checks_install_debs PKG...   Debian packages that are missing (root, or sudo)
#   checks_install_npm           npm ci of CHECKS_DIR's lock file, once per lock file
#   check NAME COMMAND...        one line "ok"/"FAIL"; the output shown only when it fails
#   skip NAME WHY                one line "skip"
#   checks_summary               "N passed, N failed[, N skipped]"; exit status 0 when none failed

passed=0 failed=0 skipped=0

checks_install_debs() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "$CHECKS_NAME: need root or sudo to install ${missing[*]}" >&2; return 1; }
    sudo="sudo"
  fi
  echo "$CHECKS_NAME: installing ${missing[*]}" >&2
  $sudo apt-get update -q >/dev/null &&
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

checks_install_npm() {
  command -v node >/dev/null && command -v npm >/dev/null || checks_install_debs nodejs npm || return 1
  local stamp="$CHECKS_DIR/node_modules/.lock.sha256" want
  want=$(sha256sum "$CHECKS_DIR/package-lock.json" | cut -d' ' -f1)
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && return 0
  echo "$CHECKS_NAME: npm ci in ${CHECKS_DIR##*/tests/}" >&2
  (cd "$CHECKS_DIR" && npm ci --no-audit --no-fund --loglevel=error >/dev/null) && echo "$want" > "$stamp"
}

check() {
  local name=$1 out; shift
  if out=$("$@" 2>&1); then
    printf 'ok      %s\n' "$name"; passed=$((passed + 1))
  else
    printf 'FAIL    %s\n' "$name"; failed=$((failed + 1))
    printf '%s\n' "$out" | sed 's/^/        /' | head -40
  fi
}

skip() {
  printf 'skip    %s: %s\n' "$1" "$2"; skipped=$((skipped + 1))
}

checks_summary() {
  if [ $skipped -gt 0 ]; then
    echo "$passed passed, $failed failed, $skipped skipped"
  else
    echo "$passed passed, $failed failed"
  fi
  [ $failed -eq 0 ]
}
