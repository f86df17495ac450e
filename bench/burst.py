#!/usr/bin/env python3
"""bench/burst.py: the order-notifier under one big commit. Prints numbers; never passes or fails.

  bench/burst.py [--build-dir DIR] [--rows 20000] [--repeat 3] [--all] [--on standby|leader]
                 [--fanout-clients 1000] [--fanout-users 100] [--fanout-events 10000]
                 [--skip-burst] [--skip-fanout] [--keep]

Reuses the Redis and Postgres of MARKETS_SERVERS_DIR (a folder scripts/servers.sh started)
when it is set, else starts its own in a temporary folder and stops them at the end. Starts two
notifier replicas from the build dir (MARKETS_BUILD_DIR, default build/), then:

  burst   one WebSocket client of one user (on the standby by default: the path through Redis
          to a replica that did not publish; --all adds an orders:read:all client on the
          leader); one transaction inserts --rows orders of that user; prints, per commit, the
          rate from COMMIT to the last frame at each client (events/s), and the exactly-once
          check against the outbox (received, dups, lost, reordered), and the CPU seconds the
          notifiers and Redis used meanwhile.
  fanout  bench/ws_load holds --fanout-clients connections over --fanout-users users, half on
          each replica; one transaction commits --fanout-events order updates spread evenly
          over those users; prints deliveries/s from COMMIT until the notifiers have written
          every frame (their ws_messages_sent_total), and what ws_load received.

The box is shared and noisy: repeat and compare medians.
"""
import argparse
import base64
import hashlib
import hmac
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "bench-secret-bench-secret-bench-secret"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def token(sub, scope=None):
    def b64(data):
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    body = {"sub": sub, "exp": int(time.time()) + 3600}
    if scope:
        body["scope"] = scope
    signing = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + \
        b64(json.dumps(body).encode())
    return signing + "." + b64(hmac.new(SECRET.encode(), signing.encode(), hashlib.sha256).digest())


# ---- servers and daemons ------------------------------------------------------------------------

class Servers:
    def __init__(self):
        self.dir = os.environ.get("MARKETS_SERVERS_DIR")
        self.owned = not (self.dir and os.path.exists(os.path.join(self.dir, "env")))
        if self.owned:
            self.dir = tempfile.mkdtemp(prefix="markets-burst.")
            os.chmod(self.dir, 0o755)
            log(f"starting Redis and Postgres in {self.dir}")
            subprocess.run([os.path.join(ROOT, "scripts", "servers.sh"), "start", self.dir],
                           check=True, stdout=subprocess.DEVNULL)
        self.env = {}
        with open(os.path.join(self.dir, "env")) as f:
            for line in f:
                k, _, v = line.strip().partition("=")
                if k:
                    self.env[k] = v
        try:
            with open(os.path.join(self.dir, "redis", "redis.pid")) as f:
                self.redis_pid = int(f.read().strip())
        except (OSError, ValueError):
            self.redis_pid = None

    def stop(self, keep=False):
        if self.owned:
            subprocess.run([os.path.join(ROOT, "scripts", "servers.sh"), "stop", self.dir],
                           check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if not keep:
                pg = os.path.join(self.dir, "pg")
                if os.path.islink(pg):  # Postgres' data elsewhere (servers.sh as root)
                    shutil.rmtree(os.path.realpath(pg), ignore_errors=True)
                shutil.rmtree(self.dir, ignore_errors=True)


class Notifier:
    def __init__(self, binary, servers, channel, lock_key, logdir, n):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.update({
            "REDIS_URL": servers.env["REDIS_URL"], "DATABASE_URL": servers.env["DATABASE_URL"],
            "ORDER_NOTIFIER_LISTEN": f"127.0.0.1:{self.port}", "JWT_SECRET": SECRET,
            "PG_CHANNEL": channel, "NOTIFIER_LOCK_KEY": str(lock_key),
            "NOTIFIER_LOCK_RETRY_MS": "200", "WS_MAX_CONNECTIONS": "20000",
            "WS_SEND_QUEUE_MAX_BYTES": str(256 << 20), "REDIS_TIMEOUT_MS": "1000",
            "LOG_LEVEL": "warn", "LOG_FORMAT": "text",
        })
        self.log = open(os.path.join(logdir, f"order-notifier-{n}.log"), "wb")
        self.proc = subprocess.Popen([binary], env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"order-notifier {n} did not start (see {self.log.name})")
            time.sleep(0.05)

    def metric(self, name):
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return 0.0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def wait_idle(notifiers, quiet=0.5, timeout=60):
    """Until the replicas' event counters stay put (a new leader's catch-up is over)."""
    names = ("order_events_received_total", "order_events_published_total",
             "ws_messages_sent_total")
    last, since, deadline = None, time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = [n.metric(m) for n in notifiers for m in names]
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.1)


# ---- a WebSocket client read by its own thread --------------------------------------------------

class Client:
    def __init__(self, name, notifier, user, scope=None):
        self.name, self.user = name, user
        self.sock = socket.create_connection(("127.0.0.1", notifier.port), timeout=5)
        key = base64.b64encode(os.urandom(16))
        self.sock.sendall(b"GET /ws/orders?access_token=" + token(user, scope).encode() +
                          b" HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                          b"Sec-WebSocket-Key: " + key + b"\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise RuntimeError("closed during the upgrade")
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(head.split(b"\r\n")[0].decode())
        self.buf = bytearray(head.split(b"\r\n\r\n", 1)[1])
        self.events = []  # (event id, order id, arrival time)
        self.closed = None
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def pong(self, payload):
        mask = os.urandom(4)
        self.sock.sendall(struct.pack("!BB", 0x8A, 0x80 | len(payload)) + mask +
                          bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def run(self):
        buf = self.buf
        self.sock.settimeout(0.2)
        t = time.monotonic()
        while not self.stop_flag.is_set():
            pos, n = 0, len(buf)
            while n - pos >= 2:
                b1 = buf[pos + 1] & 0x7F
                length, head = b1, 2
                if b1 == 126:
                    if n - pos < 4:
                        break
                    length, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
                elif b1 == 127:
                    if n - pos < 10:
                        break
                    length, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
                if n - pos < head + length:
                    break
                op = buf[pos] & 0x0F
                payload = bytes(buf[pos + head:pos + head + length])
                pos += head + length
                if op == 1:
                    msg = json.loads(payload)
                    if msg.get("type") == "order_update":
                        self.events.append((msg["event_id"], msg["order"]["id"], t))
                elif op == 9:
                    self.pong(payload)
                elif op == 8:
                    self.closed = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 0
                    return
            del buf[:pos]
            try:
                chunk = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            except OSError:
                return
            if not chunk:
                return
            t = time.monotonic()
            buf += chunk

    def close(self):
        self.stop_flag.set()
        self.thread.join(5)
        self.sock.close()


# ---- the runs ---------------------------------------------------------------------------------

def db_connect(servers, channel):
    import psycopg2
    conn = psycopg2.connect(servers.env["DATABASE_URL"])
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT set_config('markets.order_channel', %s, false)", (channel,))
    return conn


def commit_timed(conn, sql, args):
    conn.autocommit = False
    with conn.cursor() as cur:
        cur.execute(sql, args)
    t0 = time.monotonic()
    conn.commit()
    conn.autocommit = True
    return t0


def check(client, expected, t0):
    """received, dups, lost, reordered, events/s from t0 to the last first arrival."""
    want = set(expected)
    first, dups, newest, reordered = {}, 0, {}, 0
    for eid, oid, t in client.events:
        if eid not in want:
            continue
        if eid in first:
            dups += 1
            continue
        first[eid] = t
        if eid < newest.get(oid, 0):
            reordered += 1
        else:
            newest[oid] = eid
    span = (max(first.values()) - t0) if first else 0
    return len(first) + dups, dups, len(want - set(first)), reordered, \
        (len(first) / span if span > 0 else 0)


def run_burst(args, servers, notifiers, leader, standby, channel):
    conn = db_connect(servers, channel)
    user = "burst-" + uuid.uuid4().hex[:10]
    target = standby if args.on == "standby" else leader
    cs = [Client(f"user@{args.on}", target, user)]
    if args.all:
        cs.append(Client("all@leader", leader, "ops-" + uuid.uuid4().hex[:6],
                         "orders:read orders:read:all"))
    time.sleep(0.3)
    pids = [n.proc.pid for n in notifiers] + ([servers.redis_pid] if servers.redis_pid else [])
    rates = []
    have = set()
    for run in range(1, args.repeat + 1):
        cpu0 = [cpu_seconds(p) for p in pids]
        t0 = commit_timed(conn, "INSERT INTO orders (user_id, market, side, price, quantity) "
                          "SELECT %s, 'BTC-USD', 'buy', 100 + g %% 50, 1 "
                          "FROM generate_series(1, %s) g", (user, args.rows))
        with conn.cursor() as cur:
            cur.execute("SELECT id FROM order_events WHERE user_id = %s", (user,))
            batch = {r[0] for r in cur.fetchall()} - have
        have |= batch
        # Until every client has the batch, or nothing has arrived for 10 s.
        while True:
            time.sleep(0.05)
            done = all(batch <= {e[0] for e in c.events} for c in cs)
            idle = time.monotonic() - max([c.events[-1][2] if c.events else t0 for c in cs])
            if done or idle > 10:
                break
        time.sleep(0.5)  # duplicates, if any, come late
        cpu = [cpu_seconds(p) - c0 for p, c0 in zip(pids, cpu0)]
        slowest = None
        for c in cs:
            received, dups, lost, reordered, rate = check(c, batch, t0)
            slowest = rate if slowest is None else min(slowest, rate)
            print(f"burst: rows={args.rows} run={run} client={c.name} rate={rate:.0f} events/s "
                  f"received={received} dups={dups} lost={lost} reordered={reordered}"
                  + (f" closed={c.closed}" if c.closed is not None else ""), flush=True)
        rates.append(slowest)
        print(f"burst: run={run} cpu_s leader={cpu[notifiers.index(leader)]:.2f} "
              f"standby={cpu[notifiers.index(standby)]:.2f}"
              + (f" redis={cpu[2]:.2f}" if len(cpu) > 2 else ""), flush=True)
    print(f"burst: rows={args.rows} median rate (slowest client) {statistics.median(rates):.0f} "
          f"events/s over {len(rates)} commits", flush=True)
    for c in cs:
        c.close()
    conn.close()


def run_fanout(args, servers, notifiers, channel, ws_load):
    if not os.path.exists(ws_load):
        log(f"{ws_load} is not built: skipping the fan-out")
        return
    users, nclients = args.fanout_users, args.fanout_clients
    conn = db_connect(servers, channel)
    with conn.cursor() as cur:  # one order per load user (the names bench/ws_load connects as)
        cur.execute("INSERT INTO orders (user_id, market, side, price, quantity) "
                    "SELECT 'load-u' || g, 'BTC-USD', 'buy', 100, 1000000 "
                    "FROM generate_series(0, %s) g RETURNING id", (users - 1,))
        order_ids = [r[0] for r in cur.fetchall()]
    wait_idle(notifiers)
    procs = []
    per = [nclients // 2, nclients - nclients // 2]
    for n, count in zip(notifiers, per):
        if count < users:
            continue
        env = dict(os.environ, JWT_SECRET=SECRET)
        p = subprocess.Popen([ws_load, "-u", f"ws://127.0.0.1:{n.port}/ws/orders", "-n",
                              str(count), "-U", str(users), "-e", "0"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = p.stdout.readline().strip()
        if not line.startswith("READY"):
            log(f"ws_load did not connect: {line!r}")
            p.kill()
            return
        procs.append((p, count))
    time.sleep(0.5)
    for p, _ in procs:  # start a fresh STATS period
        p.send_signal(signal.SIGUSR1)
        p.stdout.readline()
    rounds = max(1, args.fanout_events // users)
    events = rounds * users
    expected = sum(events * (count // users) for _, count in procs)
    sent0 = sum(n.metric("ws_messages_sent_total") for n in notifiers)
    pids = [n.proc.pid for n in notifiers]
    cpu0 = [cpu_seconds(p) for p in pids]
    body = ";".join(["UPDATE orders SET filled_quantity = filled_quantity + 1, "
                     "status = 'partially_filled', updated_at = clock_timestamp() "
                     "WHERE id = ANY(%(ids)s)"] * rounds)
    t0 = commit_timed(conn, body, {"ids": order_ids})
    last, t_last = sent0, t0
    while True:
        time.sleep(0.02)
        sent = sum(n.metric("ws_messages_sent_total") for n in notifiers)
        now = time.monotonic()
        if sent != last:
            last, t_last = sent, now
        if sent - sent0 >= expected or now - t_last > 10:
            break
    cpu = [cpu_seconds(p) - c for p, c in zip(pids, cpu0)]
    time.sleep(0.5)
    received, closed = 0, 0
    for p, _ in procs:
        p.send_signal(signal.SIGUSR1)
        stats = dict(kv.split("=") for kv in p.stdout.readline().split()[1:])
        received += int(stats["received"])
        closed += int(stats["closed"])
        p.terminate()
        p.wait(10)
    span = t_last - t0
    print(f"fanout: clients={nclients} users={users} events={events} "
          f"deliveries={expected} written={last - sent0:.0f} received={received} closed={closed} "
          f"rate={(last - sent0) / span if span > 0 else 0:.0f} deliveries/s "
          f"({events / span if span > 0 else 0:.0f} events/s) in {span:.2f} s; "
          f"cpu_s replicas={cpu[0]:.2f}/{cpu[1]:.2f}", flush=True)
    conn.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build-dir", default=os.environ.get("MARKETS_BUILD_DIR",
                                                          os.path.join(ROOT, "build")))
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--all", action="store_true", help="add an orders:read:all client")
    ap.add_argument("--on", choices=("standby", "leader"), default="standby")
    ap.add_argument("--fanout-clients", type=int, default=1000)
    ap.add_argument("--fanout-users", type=int, default=100)
    ap.add_argument("--fanout-events", type=int, default=10000)
    ap.add_argument("--skip-burst", action="store_true")
    ap.add_argument("--skip-fanout", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the logs (and own servers' data)")
    args = ap.parse_args()
    binary = os.path.join(args.build_dir, "order-notifier", "order-notifier")
    if not os.path.exists(binary):
        sys.exit(f"bench: {binary} is not built")
    servers = Servers()
    work = tempfile.mkdtemp(prefix="markets-burst-logs.")
    notifiers = []
    try:
        channel = "bench_" + uuid.uuid4().hex[:10]
        lock_key = uuid.uuid4().int % 2_000_000_000
        notifiers = [Notifier(binary, servers, channel, lock_key, work, i) for i in range(2)]
        deadline = time.monotonic() + 15
        while True:
            flags = [n.metric("notifier_leader") for n in notifiers]
            if flags.count(1.0) == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        leader = notifiers[flags.index(1.0)] if 1.0 in flags else notifiers[0]
        standby = notifiers[1] if leader is notifiers[0] else notifiers[0]
        wait_idle(notifiers)
        with open("/proc/loadavg") as f:
            print(f"bench: {os.cpu_count()} CPUs, load {f.read().split()[0]}", flush=True)
        if not args.skip_burst:
            run_burst(args, servers, notifiers, leader, standby, channel)
        if not args.skip_fanout:
            run_fanout(args, servers, notifiers, channel,
                       os.path.join(args.build_dir, "bench", "ws_load"))
    finally:
        for n in notifiers:
            n.stop()
        servers.stop(keep=args.keep)
        if args.keep:
            log(f"kept the notifier logs in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
