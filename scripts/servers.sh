#!/usr/bin/env bash
# Throw-away Redis and Postgres on free loopback ports, with their data under one folder.
#
#   scripts/servers.sh start DIR     start both, create the database, apply deploy/sql, write DIR/env
#   scripts/servers.sh seed DIR      add the demo markets of scripts/dev_seed.sql (dev stack, tests)
#   scripts/servers.sh stop DIR      stop everything started in DIR (data kept)
#   scripts/servers.sh redis-stop|redis-start|pg-stop|pg-start DIR   (fault-injection in tests)
#   scripts/servers.sh pg-init DIR   Postgres only (database and schema): a primary of its own
#
# Failover (a streaming standby of DIR's Postgres, the primary):
#   scripts/servers.sh standby-start DIR    pg_basebackup -R -X stream the first time, then start
#   scripts/servers.sh standby-promote DIR  pg_ctl promote: the standby becomes a primary
#   scripts/servers.sh standby-stop DIR     stop it (data kept: it goes on streaming when started)
#   scripts/servers.sh standby-drop DIR     stop it and delete its data
#
# A connection pooler in front of DIR's Postgres (MODE transaction or session):
#   scripts/servers.sh pgbouncer-start DIR MODE   pgbouncer on a free port (DIR/pgbouncer-MODE.port)
#   scripts/servers.sh pgbouncer-stop DIR MODE
#
# DIR/env holds REDIS_URL, DATABASE_URL, REDIS_PORT, PG_PORT (and STANDBY_PORT while a standby
# exists) for `source`. Postgres and pgbouncer refuse to run as root, so as root they run as the
# `postgres` user, with their files where that user can reach.
#
# A Redis Sentinel group of its own, for the failover tests (`stop` stops it too):
#
#   scripts/servers.sh sentinel-start DIR        a master, one replica, three sentinels
#   scripts/servers.sh sentinel-stop DIR
#   scripts/servers.sh sentinel-wait DIR         until the group is healthy again after a test
#                                                (one master all sentinels agree on, a synced
#                                                replica they all see)
#   scripts/servers.sh sentinel-node-start DIR PORT   restarts a killed data node as a replica
#
# It adds to DIR/env: SENTINEL_ADDRS (host:port,...), SENTINEL_PORTS (p,p,p), SENTINEL_MASTER_NAME,
# SENTINEL_NODE_PORTS (p,p), SENTINEL_PASSWORD (of the sentinels) and SENTINEL_DATA_PASSWORD (of the
# data nodes). These names are not the daemons' REDIS_SENTINEL* on purpose: every daemon a test
# starts inherits DIR/env, and only the sentinel tests should run in Sentinel mode. Down-after is
# 1 s and the failover timeout 2 s, so that a failover takes a few seconds.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
# pgbouncer lives in /usr/sbin, which a normal user's PATH lacks.
PGBOUNCER=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
cmd=${1:?usage: servers.sh COMMAND DIR (see the top of this file)}
DIR=${2:?missing DIR}
MODE=${3:-}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)

free_port() {
  /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

as_pg() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# Where the postgres user keeps the files of NAME (pg: the primary's data, standby, pgbouncer-*):
# DIR/NAME, unless we are root and the postgres user cannot reach DIR (a clone under /root,
# say); then a folder in /var/tmp, linked from DIR/NAME.
pg_data_dir() {
  local name=${1:-pg}
  if [ -L "$DIR/$name" ] || [ -d "$DIR/$name" ]; then
    readlink -f "$DIR/$name"; return
  fi
  if [ "$(id -u)" -eq 0 ] && ! runuser -u postgres -- test -w "$DIR" 2>/dev/null; then
    chown postgres "$DIR" 2>/dev/null || true
    if ! runuser -u postgres -- test -w "$DIR" 2>/dev/null; then
      local d; d=$(mktemp -d /var/tmp/markets-pg.XXXXXX)
      chown postgres "$d"; ln -s "$d" "$DIR/$name"; echo "$d"; return
    fi
  fi
  mkdir -p "$DIR/$name"; if [ "$(id -u)" -eq 0 ]; then chown postgres "$DIR/$name"; fi
  echo "$DIR/$name"
}

# Options of every server here. wal_level=replica and WAL senders: a standby can stream from it.
pg_opts() {  # pg_opts PORT DATA
  echo "-p $1 -c listen_addresses=127.0.0.1 -k $2 -c fsync=off -c synchronous_commit=off -c max_connections=200 -c wal_level=replica -c max_wal_senders=10"
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
  # initdb's pg_hba.conf has it; a data folder made elsewhere may not.
  grep -Eq '^host[[:space:]]+replication[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust' "$data/pg_hba.conf" ||
    echo "host replication all 127.0.0.1/32 trust" | as_pg tee -a "$data/pg_hba.conf" >/dev/null
  as_pg "$PGBIN/pg_ctl" -D "$data" -l "$data/server.log" -w -t 30 start -o "$(pg_opts "$port" "$data")" >/dev/null
}

pg_stop() {
  local data; data=$(readlink -f "$DIR/pg" 2>/dev/null) || return 0
  [ -f "$data/postmaster.pid" ] || return 0
  as_pg "$PGBIN/pg_ctl" -D "$data" -w -t 30 -m fast stop >/dev/null || true
}

psql_pg() {
  env PGOPTIONS=--client-min-messages=warning psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 \
    -p "$(cat "$DIR/pg.port")" -U postgres "$@"
}

apply_schema() {
  psql_pg -d postgres -tc "SELECT 1 FROM pg_database WHERE datname='markets'" | grep -q 1 ||
    psql_pg -d postgres -c "CREATE DATABASE markets" >/dev/null
  for f in "$ROOT"/deploy/sql/*.sql; do psql_pg -d markets -f "$f" >/dev/null; done
}

# Demo data is not part of the schema: deploy/sql is what production applies.
seed() {
  psql_pg -d markets -f "$ROOT/scripts/dev_seed.sql" >/dev/null
}

# The standby: a base backup of the primary with -R (standby.signal and primary_conninfo), so it
# streams from the primary's port until promoted.
standby_start() {
  local primary; primary=$(cat "$DIR/pg.port")
  local data; data=$(pg_data_dir standby)
  local port; port=$(cat "$DIR/standby.port" 2>/dev/null || free_port)
  echo "$port" > "$DIR/standby.port"
  if [ ! -f "$data/PG_VERSION" ]; then
    # The sockets in the primary's data folder are skipped, as they should be: no need to say so.
    as_pg "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$primary" -U postgres -D "$data" -R -X stream -c fast \
      2> >(grep -v "skipping special file" >&2)
    as_pg chmod 700 "$data"
  fi
  as_pg "$PGBIN/pg_ctl" -D "$data" -l "$data/server.log" -w -t 30 start -o "$(pg_opts "$port" "$data")" >/dev/null
  write_env
}

standby_promote() {
  local data; data=$(readlink -f "$DIR/standby")
  as_pg "$PGBIN/pg_ctl" -D "$data" -w -t 30 promote >/dev/null
}

standby_stop() {
  local data; data=$(readlink -f "$DIR/standby" 2>/dev/null) || return 0
  [ -f "$data/postmaster.pid" ] || return 0
  as_pg "$PGBIN/pg_ctl" -D "$data" -w -t 30 -m fast stop >/dev/null || true
}

standby_drop() {
  standby_stop
  local data; data=$(readlink -f "$DIR/standby" 2>/dev/null) || true
  [ -n "$data" ] && rm -rf "$data"
  rm -rf "$DIR/standby" "$DIR/standby.port"
  write_env
}

pgbouncer_start() {
  case "$MODE" in transaction|session) ;; *) echo "servers: pgbouncer MODE is transaction or session" >&2; exit 2 ;; esac
  local d; d=$(pg_data_dir "pgbouncer-$MODE")
  local port; port=$(cat "$DIR/pgbouncer-$MODE.port" 2>/dev/null || free_port)
  echo "$port" > "$DIR/pgbouncer-$MODE.port"
  as_pg tee "$d/userlist.txt" >/dev/null <<<'"postgres" ""'
  as_pg tee "$d/pgbouncer.ini" >/dev/null <<INI
[databases]
* = host=127.0.0.1 port=$(cat "$DIR/pg.port")

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $d/userlist.txt
pool_mode = $MODE
max_client_conn = 200
default_pool_size = 20
logfile = $d/pgbouncer.log
pidfile = $d/pgbouncer.pid
INI
  as_pg "$PGBOUNCER" -d -q "$d/pgbouncer.ini"
  for _ in $(seq 100); do
    psql -X -q -h 127.0.0.1 -p "$port" -U postgres -d markets -c 'SELECT 1' >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "servers: pgbouncer did not start, see $d/pgbouncer.log" >&2; return 1
}

pgbouncer_stop() {
  local d; d=$(readlink -f "$DIR/pgbouncer-$MODE" 2>/dev/null) || return 0
  local pid; pid=$(cat "$d/pgbouncer.pid" 2>/dev/null) || return 0
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.05; done
  kill -9 "$pid" 2>/dev/null || true
}

write_env() {
  {
    if [ -f "$DIR/redis.port" ]; then
      echo "REDIS_PORT=$(cat "$DIR/redis.port")"
      echo "REDIS_URL=redis://127.0.0.1:$(cat "$DIR/redis.port")/0"
    fi
    echo "PG_PORT=$(cat "$DIR/pg.port")"
    echo "DATABASE_URL=postgresql://postgres@127.0.0.1:$(cat "$DIR/pg.port")/markets"
    if [ -f "$DIR/standby.port" ]; then echo "STANDBY_PORT=$(cat "$DIR/standby.port")"; fi
  } > "$DIR/env"
  if [ -f "$DIR/sentinel/env" ]; then cat "$DIR/sentinel/env" >> "$DIR/env"; fi
}

SENTINEL_MASTER_NAME=markets
SENTINEL_PASSWORD=sentinel-test-pw
SENTINEL_DATA_PASSWORD=data-test-pw

sentinel_cli() {  # sentinel_cli PORT ARGS...: a sentinel
  REDISCLI_AUTH=$SENTINEL_PASSWORD redis-cli -p "$@" 2>/dev/null
}
node_cli() {  # node_cli PORT ARGS...: a data node of the group
  REDISCLI_AUTH=$SENTINEL_DATA_PASSWORD redis-cli -p "$@" 2>/dev/null
}

# node_start PORT [MASTER_PORT]: a data node of the group, a replica when MASTER_PORT is given.
node_start() {
  local port=$1 d="$DIR/sentinel/node-$1" repl=()
  [ -n "${2:-}" ] && repl=(--replicaof 127.0.0.1 "$2")
  mkdir -p "$d"
  redis-server --port "$port" --bind 127.0.0.1 --dir "$d" --daemonize yes \
    --pidfile "$d/redis.pid" --logfile "$d/redis.log" --save "" --appendonly no \
    --requirepass "$SENTINEL_DATA_PASSWORD" --masterauth "$SENTINEL_DATA_PASSWORD" --repl-diskless-sync-delay 0 \
    "${repl[@]}" >/dev/null
  for _ in $(seq 100); do node_cli "$port" ping 2>/dev/null | grep -q PONG && return 0; sleep 0.05; done
  echo "servers: redis node $port did not start, see $d/redis.log" >&2; return 1
}

sentinel_one_start() {  # sentinel_one_start PORT MASTER_PORT
  local port=$1 d="$DIR/sentinel/sentinel-$1"
  mkdir -p "$d"
  # Sentinel rewrites its file (it records what it learns), so it is ours and writable.
  cat > "$d/sentinel.conf" <<CONF
port $port
bind 127.0.0.1
daemonize yes
dir $d
pidfile $d/sentinel.pid
logfile $d/sentinel.log
requirepass $SENTINEL_PASSWORD
sentinel sentinel-pass $SENTINEL_PASSWORD
sentinel monitor $SENTINEL_MASTER_NAME 127.0.0.1 $2 2
sentinel auth-pass $SENTINEL_MASTER_NAME $SENTINEL_DATA_PASSWORD
sentinel down-after-milliseconds $SENTINEL_MASTER_NAME 1000
sentinel failover-timeout $SENTINEL_MASTER_NAME 2000
sentinel parallel-syncs $SENTINEL_MASTER_NAME 1
CONF
  redis-sentinel "$d/sentinel.conf" >/dev/null
  for _ in $(seq 100); do sentinel_cli "$port" ping | grep -q PONG && return 0; sleep 0.05; done
  echo "servers: sentinel $port did not start, see $d/sentinel.log" >&2; return 1
}

sentinel_ports() { cat "$DIR/sentinel/sentinel.ports" 2>/dev/null; }
node_ports() { cat "$DIR/sentinel/node.ports" 2>/dev/null; }

# Healthy: every sentinel names the same master, that node says it is a master with a replica
# whose link is up, and every sentinel sees that replica and the two other sentinels (what a
# SIGKILL failover needs: quorum and a majority to elect a leader).
sentinel_healthy() {
  local master="" p addr mport
  for p in $(sentinel_ports); do
    addr=$(sentinel_cli "$p" sentinel get-master-addr-by-name "$SENTINEL_MASTER_NAME" | tr '\n' ':')
    [ -n "$addr" ] || return 1
    [ -z "$master" ] || [ "$master" = "$addr" ] || return 1
    master=$addr
  done
  mport=$(cut -d: -f2 <<<"$master")
  node_cli "$mport" info replication | grep -q '^role:master' || return 1
  node_cli "$mport" info replication | grep -q '^slave0:.*state=online' || return 1
  for p in $(node_ports); do
    [ "$p" = "$mport" ] && continue
    node_cli "$p" info replication | grep -q '^master_link_status:up' || return 1
  done
  for p in $(sentinel_ports); do
    sentinel_cli "$p" sentinel replicas "$SENTINEL_MASTER_NAME" | grep -qx 'slave' || return 1
    sentinel_cli "$p" sentinel replicas "$SENTINEL_MASTER_NAME" | grep -Eq '^(.*,)?(s_down|o_down|disconnected)(,.*)?$' && return 1
    [ "$(sentinel_cli "$p" sentinel sentinels "$SENTINEL_MASTER_NAME" | grep -cx 'sentinel')" -ge 2 ] || return 1
  done
  # A failover still running (or just ended) refuses SENTINEL FAILOVER.
  for p in $(sentinel_ports); do
    sentinel_cli "$p" sentinel master "$SENTINEL_MASTER_NAME" | grep -Eq '^(.*,)?(failover_in_progress|s_down|o_down)(,.*)?$' && return 1
  done
  return 0
}

sentinel_wait() {
  for _ in $(seq 600); do sentinel_healthy && return 0; sleep 0.1; done
  echo "servers: the sentinel group did not become healthy in 60 s" >&2; return 1
}

# node_restart PORT: a killed data node comes back as a replica of the current master.
node_restart() {
  local p master=""
  for p in $(sentinel_ports); do
    master=$(sentinel_cli "$p" sentinel get-master-addr-by-name "$SENTINEL_MASTER_NAME" | sed -n 2p)
    [ -n "$master" ] && break
  done
  if [ -n "$master" ] && [ "$master" != "$1" ]; then node_start "$1" "$master"; else node_start "$1"; fi
}

sentinel_start() {
  mkdir -p "$DIR/sentinel"
  if [ ! -f "$DIR/sentinel/node.ports" ]; then
    echo "$(free_port) $(free_port)" > "$DIR/sentinel/node.ports"
    echo "$(free_port) $(free_port) $(free_port)" > "$DIR/sentinel/sentinel.ports"
  fi
  local nodes sentinels
  read -r -a nodes < "$DIR/sentinel/node.ports"
  read -r -a sentinels < "$DIR/sentinel/sentinel.ports"
  node_start "${nodes[0]}"
  node_start "${nodes[1]}" "${nodes[0]}"
  for p in "${sentinels[@]}"; do sentinel_one_start "$p" "${nodes[0]}"; done
  local addrs="" p
  for p in "${sentinels[@]}"; do addrs="${addrs:+$addrs,}127.0.0.1:$p"; done
  cat > "$DIR/sentinel/env" <<ENV
SENTINEL_ADDRS=$addrs
SENTINEL_PORTS=$(IFS=,; echo "${sentinels[*]}")
SENTINEL_NODE_PORTS=$(IFS=,; echo "${nodes[*]}")
SENTINEL_MASTER_NAME=$SENTINEL_MASTER_NAME
SENTINEL_PASSWORD=$SENTINEL_PASSWORD
SENTINEL_DATA_PASSWORD=$SENTINEL_DATA_PASSWORD
ENV
  [ -f "$DIR/env" ] && sed -i '/^SENTINEL_/d' "$DIR/env"
  cat "$DIR/sentinel/env" >> "$DIR/env"
  sentinel_wait
}

stop_pidfile() {  # stop_pidfile FILE: SIGTERM, then SIGKILL after 5 s
  local pid; pid=$(cat "$1" 2>/dev/null) || return 0
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.05; done
  kill -9 "$pid" 2>/dev/null || true
}

sentinel_stop() {
  [ -d "$DIR/sentinel" ] || return 0
  local f
  for f in "$DIR"/sentinel/sentinel-*/sentinel.pid "$DIR"/sentinel/node-*/redis.pid; do
    [ -f "$f" ] && stop_pidfile "$f"
  done
  return 0
}

case "$cmd" in
  start) redis_start; pg_start; apply_schema; write_env ;;
  seed) seed ;;
  stop)
    for m in transaction session; do MODE=$m pgbouncer_stop; done
    standby_stop; sentinel_stop; redis_stop; pg_stop ;;
  sentinel-start) sentinel_start ;;
  sentinel-stop) sentinel_stop ;;
  sentinel-wait) sentinel_wait ;;
  sentinel-node-start) node_restart "${3:?missing PORT}" ;;
  redis-start) redis_start ;;
  redis-stop) redis_stop ;;
  pg-start) pg_start ;;
  pg-stop) pg_stop ;;
  pg-init) pg_start; apply_schema; write_env ;;
  standby-start) standby_start ;;
  standby-promote) standby_promote ;;
  standby-stop) standby_stop ;;
  standby-drop) standby_drop ;;
  pgbouncer-start) pgbouncer_start ;;
  pgbouncer-stop) pgbouncer_stop ;;
  *) echo "servers: unknown command $cmd" >&2; exit 2 ;;
esac
