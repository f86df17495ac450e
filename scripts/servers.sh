#!/usr/bin/env bash
# Throw-away Redis and Postgres on free loopback ports, with their data under one folder.
#
#   scripts/servers.sh start DIR     start both, create the database, apply deploy/sql, write DIR/env
#   scripts/servers.sh stop DIR      stop both (data kept)
#   scripts/servers.sh redis-stop|redis-start|pg-stop|pg-start DIR   (fault-injection in tests)
#
# DIR/env holds REDIS_URL, DATABASE_URL, REDIS_PORT, PG_PORT for `source`. Postgres refuses to
# run as root, so as root it runs as the `postgres` user, with its data where that user can reach.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
cmd=${1:?usage: servers.sh start|stop|redis-stop|redis-start|pg-stop|pg-start DIR}
DIR=${2:?missing DIR}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)

free_port() {
  /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

as_pg() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# Where Postgres keeps its data: DIR/pg, unless we are root and the postgres user cannot reach
# DIR (a clone under /root, say); then a folder in /var/tmp, linked from DIR/pg.
pg_data_dir() {
  if [ -L "$DIR/pg" ] || [ -d "$DIR/pg" ]; then
    readlink -f "$DIR/pg"; return
  fi
  if [ "$(id -u)" -eq 0 ] && ! runuser -u postgres -- test -w "$DIR" 2>/dev/null; then
    chown postgres "$DIR" 2>/dev/null || true
    if ! runuser -u postgres -- test -w "$DIR" 2>/dev/null; then
      local d; d=$(mktemp -d /var/tmp/markets-pg.XXXXXX)
      chown postgres "$d"; ln -s "$d" "$DIR/pg"; echo "$d"; return
    fi
  fi
  mkdir -p "$DIR/pg"; [ "$(id -u)" -eq 0 ] && chown postgres "$DIR/pg"
  echo "$DIR/pg"
}

redis_start() {
  local port; port=$(cat "$DIR/redis.port" 2>/dev/null || free_port)
  echo "$port" > "$DIR/redis.port"
  mkdir -p "$DIR/redis"
  redis-server --port "$port" --bind 127.0.0.1 --dir "$DIR/redis" --daemonize yes \
    --pidfile "$DIR/redis/redis.pid" --logfile "$DIR/redis/redis.log" \
    --save "" --appendonly no >/dev/null
  for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "servers: redis did not start, see $DIR/redis/redis.log" >&2; return 1
}

redis_stop() {
  local port; port=$(cat "$DIR/redis.port" 2>/dev/null) || return 0
  redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
  for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 || return 0; sleep 0.05; done
}

pg_start() {
  local data; data=$(pg_data_dir)
  local port; port=$(cat "$DIR/pg.port" 2>/dev/null || free_port)
  echo "$port" > "$DIR/pg.port"
  if [ ! -f "$data/PG_VERSION" ]; then
    as_pg "$PGBIN/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
  fi
  as_pg "$PGBIN/pg_ctl" -D "$data" -l "$data/server.log" -w -t 30 start \
    -o "-p $port -c listen_addresses=127.0.0.1 -k $data -c fsync=off -c synchronous_commit=off -c max_connections=200" >/dev/null
}

pg_stop() {
  local data; data=$(readlink -f "$DIR/pg" 2>/dev/null) || return 0
  [ -f "$data/postmaster.pid" ] || return 0
  as_pg "$PGBIN/pg_ctl" -D "$data" -w -t 30 -m fast stop >/dev/null || true
}

apply_schema() {
  local port; port=$(cat "$DIR/pg.port")
  local psql=(env PGOPTIONS=--client-min-messages=warning psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres)
  "${psql[@]}" -d postgres -tc "SELECT 1 FROM pg_database WHERE datname='markets'" | grep -q 1 ||
    "${psql[@]}" -d postgres -c "CREATE DATABASE markets" >/dev/null
  for f in "$ROOT"/deploy/sql/*.sql; do "${psql[@]}" -d markets -f "$f" >/dev/null; done
}

write_env() {
  cat > "$DIR/env" <<ENV
REDIS_PORT=$(cat "$DIR/redis.port")
PG_PORT=$(cat "$DIR/pg.port")
REDIS_URL=redis://127.0.0.1:$(cat "$DIR/redis.port")/0
DATABASE_URL=postgresql://postgres@127.0.0.1:$(cat "$DIR/pg.port")/markets
ENV
}

case "$cmd" in
  start) redis_start; pg_start; apply_schema; write_env ;;
  stop) redis_stop; pg_stop ;;
  redis-start) redis_start ;;
  redis-stop) redis_stop ;;
  pg-start) pg_start ;;
  pg-stop) pg_stop ;;
  *) echo "servers: unknown command $cmd" >&2; exit 2 ;;
esac
