"""order-notifier delivery guarantees, end to end, under load and faults.

The promise: every event reaches every authorised client exactly once, in per-order order, with
none lost across bursts, reconnects and replica failover. Real Redis, real Postgres, two
notifier replicas, real WebSocket clients. Each client is read by its own thread (raw socket,
frames parsed here, pings answered), so no client is ever a slow consumer; the send queue limit
is raised as well, so a close for a full queue can only mean the daemon fell behind badly.

What every check counts, per client, against the outbox (SELECT ... FROM order_events):
  dups       deliveries beyond the first of an event
  lost       events of the client's scope that never arrived
  reordered  events that arrived after a later event of the same order
  foreign    events outside the client's scope (another user's, to a user client)
One line per run, `delivery: test=... run=... dups=... lost=... reordered=... rate=...`, is
printed (and appended to $DELIVERY_LOG when set), so repeated runs can be counted:

  DELIVERY_REPEAT=10 DELIVERY_LOG=delivery.log python3 -m pytest tests/e2e/test_delivery.py

Knobs: DELIVERY_REPEAT (runs of each test, default 1), DELIVERY_BURST (rows per burst commit,
default 20000), DELIVERY_STALL_S (seconds without a frame after which the missing events count
as lost, default 5).
"""
import collections
import json
import os
import socket
import struct
import threading
import time
import uuid

import psycopg2
import pytest

from test_notifier import make_token, metric, notifier_env, raw_ws, wait_for, wait_leader

REPEAT = max(1, int(os.environ.get("DELIVERY_REPEAT", "1")))
BURST = max(100, int(os.environ.get("DELIVERY_BURST", "20000")))
STALL_S = float(os.environ.get("DELIVERY_STALL_S", "5"))
DEADLINE_S = 180
RUNS = pytest.mark.parametrize("run", range(1, REPEAT + 1), ids=lambda r: f"run{r}")
ALL_SCOPE = "orders:read orders:read:all"


def delivery_env(**extra):
    """notifier_env, with a send queue no burst of these tests fills (the readers keep up; a
    1013 close would then mean the daemon stalled) and pings far apart."""
    return notifier_env(WS_SEND_QUEUE_MAX_BYTES=256 << 20, WS_PING_INTERVAL_MS=60000, **extra)


def uid(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# ---- a WebSocket client read by its own thread -------------------------------------------------

Event = collections.namedtuple("Event", "id order user status filled market_len t")


class Client:
    """A connected WebSocket client whose frames a thread reads as fast as they come.

    `events` holds every order_update in arrival order (duplicates included) with its arrival
    time; `close_code` is set when the server closes."""

    def __init__(self, name, daemon, user, scope=None):
        self.name = name
        self.user = user
        self.all_users = scope is not None and "orders:read:all" in scope
        self.sock = raw_ws(daemon, make_token(user, scope=scope))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.events = []
        self.other = []          # other text frames (resume_truncated, ...)
        self.close_code = None
        self.error = None
        self.last_rx = time.monotonic()
        self._stop = threading.Event()
        self._send_lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _send(self, opcode, payload):
        key = os.urandom(4)
        n = len(payload)
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n) if n < 126 else \
            struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        with self._send_lock:
            self.sock.sendall(head + key + masked)

    def _text(self, data, t):
        msg = json.loads(data)
        if msg.get("type") != "order_update":
            self.other.append(msg)
            return
        o = msg.get("order") or {}
        self.events.append(Event(msg["event_id"], o.get("id"), o.get("user_id"), o.get("status"),
                                 o.get("filled_quantity"), len(o.get("market") or ""), t))

    def _run(self):
        buf = bytearray()
        frag = None
        self.sock.settimeout(0.2)
        try:
            while not self._stop.is_set():
                try:
                    chunk = self.sock.recv(1 << 20)
                except socket.timeout:
                    continue
                if not chunk:
                    self.error = self.error or "EOF"
                    return
                t = time.monotonic()
                self.last_rx = t
                buf += chunk
                pos, n = 0, len(buf)
                while n - pos >= 2:
                    b0, b1 = buf[pos], buf[pos + 1]
                    length, head = b1 & 0x7F, 2
                    if length == 126:
                        if n - pos < 4:
                            break
                        length, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
                    elif length == 127:
                        if n - pos < 10:
                            break
                        length, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
                    if b1 & 0x80:
                        self.error = "masked server frame"
                        return
                    if n - pos < head + length:
                        break
                    payload = bytes(buf[pos + head:pos + head + length])
                    pos += head + length
                    fin, op = b0 & 0x80, b0 & 0x0F
                    if op == 0x9:
                        self._send(0xA, payload)
                    elif op == 0x8:
                        self.close_code = (struct.unpack("!H", payload[:2])[0]
                                           if len(payload) >= 2 else 0)
                        return
                    elif op == 0x1 or op == 0x0:
                        frag = payload if op == 0x1 else (frag or b"") + payload
                        if fin:
                            self._text(frag, t)
                            frag = None
                del buf[:pos]
        except OSError as e:
            self.error = f"{type(e).__name__}: {e}"

    def close(self):
        self._stop.set()
        self.thread.join(5)
        try:
            if self.close_code is None:
                self._send(0x8, struct.pack("!H", 1000))
        except OSError:
            pass
        self.sock.close()

    def ids(self):
        return {e.id for e in self.events}


@pytest.fixture
def clients():
    """clients(name, daemon, user, scope=None) -> Client; all closed after the test."""
    made = []

    def make(name, daemon, user, scope=None):
        c = Client(name, daemon, user, scope)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


# ---- the outbox and the writers ---------------------------------------------------------------

class Db:
    """A Postgres session whose order changes NOTIFY the test's channel."""

    def __init__(self, servers, channel):
        self.conn = psycopg2.connect(servers.psql_dsn())
        self.conn.autocommit = True
        with self.conn.cursor() as cur:
            cur.execute("SELECT set_config('markets.order_channel', %s, false)", (channel,))

    def execute(self, sql, args=()):
        with self.conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else None

    def burst(self, users, rows):
        """One transaction inserting `rows` orders spread over `users` (a list); returns
        (time.monotonic() just before COMMIT, just after)."""
        self.conn.autocommit = False
        try:
            with self.conn.cursor() as cur:
                cur.execute(
                    "INSERT INTO orders (user_id, market, side, price, quantity) "
                    "SELECT (%s::text[])[1 + g %% %s], 'BTC-USD', "
                    "CASE WHEN g %% 2 = 0 THEN 'buy' ELSE 'sell' END, 100 + g %% 50, 1 + g %% 7 "
                    "FROM generate_series(1, %s) g", (list(users), len(users), rows))
            t0 = time.monotonic()
            self.conn.commit()
            return t0, time.monotonic()
        finally:
            self.conn.autocommit = True

    def events(self, users):
        """{event id: (order id, status, filled_quantity)} of these users' events."""
        rows = self.execute("SELECT id, order_id, payload->>'status', payload->>'filled_quantity' "
                            "FROM order_events WHERE user_id = ANY(%s)", (list(users),))
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    def close(self):
        self.conn.close()


@pytest.fixture
def db_for(servers):
    made = []

    def make(daemon):
        d = Db(servers, daemon.env["PG_CHANNEL"])
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


# ---- Redis, spoken directly -------------------------------------------------------------------

class Resp:
    """A minimal RESP connection, for commands on a server whose client limit is lowered."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.f = self.sock.makefile("rb")

    def __call__(self, *args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            a = str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.sock.sendall(b"".join(out))
        return self._reply()

    def _reply(self):
        line = self.f.readline()
        kind, rest = line[:1], line[1:].rstrip(b"\r\n")
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.f.read(n + 2)[:-2].decode()
        if kind == b"*":
            return [self._reply() for _ in range(int(rest))]
        raise RuntimeError(f"bad reply {line!r}")

    def close(self):
        self.f.close()
        self.sock.close()


def redis_ports_of(pid, redis_port):
    """Local ports of the process's TCP connections to Redis (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = open(f"/proc/{pid}/net/{table}").read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[9] in inodes and int(f[2].rsplit(":", 1)[1], 16) == redis_port:
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


def subscriber_id(resp, daemon, redis_port):
    """Redis' client id of the daemon's subscribing connection."""
    ports = redis_ports_of(daemon.proc.pid, redis_port)
    for line in resp("CLIENT", "LIST").splitlines():
        kv = dict(x.split("=", 1) for x in line.split() if "=" in x)
        if int(kv["addr"].rsplit(":", 1)[1]) in ports and int(kv.get("sub", 0)) > 0:
            return kv["id"]
    raise AssertionError(f"no subscriber connection of pid {daemon.proc.pid} (ports {ports})")


# ---- waiting and counting ---------------------------------------------------------------------

def wait_idle(*daemons, quiet=0.5, timeout=60):
    """Until the daemons' event counters stay put for `quiet` s (a new leader's catch-up of
    other tests' recent events is over)."""
    names = ("order_events_received_total", "order_events_published_total",
             "ws_messages_sent_total")
    last, since = None, time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = [metric(d, n) for d in daemons for n in names]
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.1)


def settle(wants, watch=(), quiet=1.5, stall=STALL_S, timeout=DEADLINE_S):
    """Waits until every client of `wants` ({client: set of event ids}) has its events and then
    nothing arrives (and every `watch` value stays the same) for `quiet` s, or until no client
    has received a frame for `stall` s (what is still missing is lost), or `timeout`."""
    start = time.monotonic()
    last_watch, watch_since = None, start
    while time.monotonic() - start < timeout:
        time.sleep(0.1)
        now = time.monotonic()
        values = [w() for w in watch]
        if values != last_watch:
            last_watch, watch_since = values, now
        last_rx = max([c.last_rx for c in wants] + [start])
        calm = min(now - last_rx, now - watch_since)
        complete = all(want <= c.ids() or c.close_code is not None or c.error
                       for c, want in wants.items())
        if complete and calm >= quiet:
            return
        if not complete and now - last_rx >= stall and now - watch_since >= stall:
            return


class Tally:
    """Deliveries of one client against the events it should have had."""

    def __init__(self, client, expected, users):
        """`expected`: {event id: (order id, status, filled)}; `users`: every user of the test
        (an orders:read:all client gets other tests' events too: those are not counted)."""
        self.client = client
        if client.all_users:
            got = [e for e in client.events if e.user in users]
        else:
            got = [e for e in client.events if e.user == client.user]
        self.foreign = 0 if client.all_users else len(client.events) - len(got)
        counts = collections.Counter(e.id for e in got)
        self.received = len(got)
        self.dups = sum(n - 1 for n in counts.values())
        self.dup_ids = sorted(i for i, n in counts.items() if n > 1)
        self.lost_ids = sorted(set(expected) - set(counts))
        self.lost = len(self.lost_ids)
        self.unknown = sorted(set(counts) - set(expected))
        # Per order, first arrivals only: an event behind a later one of the same order.
        newest, self.reordered, self.reordered_ex = {}, 0, []
        seen, self.corrupt = set(), 0
        for e in got:
            if e.id in seen:
                continue
            seen.add(e.id)
            if e.id in expected:
                order, status, filled = expected[e.id]
                if (e.order, e.status, e.filled) != (order, status, filled):
                    self.corrupt += 1
            top = newest.get(e.order, 0)
            if e.id < top:
                self.reordered += 1
                if len(self.reordered_ex) < 5:
                    self.reordered_ex.append((e.order, e.id, top))
            else:
                newest[e.order] = e.id
        self.expected = len(expected)

    def ok(self):
        c = self.client
        return not (self.dups or self.lost or self.reordered or self.foreign or self.unknown or
                    self.corrupt or c.close_code is not None or c.error)

    def __str__(self):
        c = self.client
        s = (f"{c.name}: expected={self.expected} received={self.received} dups={self.dups} "
             f"lost={self.lost} reordered={self.reordered}")
        if self.foreign:
            s += f" foreign={self.foreign}"
        if self.unknown:
            s += f" unknown={len(self.unknown)}"
        if self.corrupt:
            s += f" corrupt={self.corrupt}"
        if self.dup_ids:
            s += f" dup_ids={self.dup_ids[:5]}"
        if self.lost_ids:
            s += f" lost_ids={self.lost_ids[:5]}{'...' if self.lost > 5 else ''}"
        if self.reordered_ex:
            s += f" reordered(order,id,after)={self.reordered_ex}"
        if c.close_code is not None:
            s += f" closed={c.close_code}"
        if c.error:
            s += f" error={c.error}"
        if c.other:
            s += f" other_frames={[m.get('type') for m in c.other][:3]}"
        return s


def burst_rate(client, ids, t0):
    """Events/s from `t0` (just before COMMIT) to the arrival of the last of `ids` at the
    client (first arrivals), over the events of `ids` that arrived; None without any."""
    times = {}
    for e in client.events:
        if e.id in ids and e.id not in times:
            times[e.id] = e.t
    if not times:
        return None
    span = max(times.values()) - t0
    return len(times) / span if span > 0 else None


def report(test, run, tallies, rates=(), note=""):
    """Prints the run's one-line summary (appended to $DELIVERY_LOG too) and fails with every
    client's numbers when a client missed, repeated or reordered anything."""
    dups = sum(t.dups for t in tallies)
    lost = sum(t.lost for t in tallies)
    reordered = sum(t.reordered for t in tallies)
    rates = [r for r in rates if r]
    rate = f"{min(rates):.0f}" if rates else "-"
    line = (f"delivery: test={test} run={run} dups={dups} lost={lost} reordered={reordered} "
            f"rate={rate}")
    foreign = sum(t.foreign for t in tallies)
    extra = [f"foreign={foreign}"] if foreign else []
    closed = [t.client.name for t in tallies if t.client.close_code is not None or t.client.error]
    if closed:
        extra.append("closed=" + ",".join(closed))
    if note:
        extra.append(note)
    line = " ".join([line] + extra)
    print("\n" + line, flush=True)
    log = os.environ.get("DELIVERY_LOG")
    if log:
        with open(log, "a") as f:
            f.write(line + "\n")
    if not all(t.ok() for t in tallies):
        pytest.fail(line + "\n  " + "\n  ".join(str(t) for t in tallies), pytrace=False)


def two_replicas(start_daemon, **env):
    """(leader, standby) of a fresh pair, once the leader's catch-up is over."""
    e = delivery_env(**env)
    a = start_daemon("order-notifier", e)
    b = start_daemon("order-notifier", e)
    leader = wait_leader(a, b)
    standby = b if leader is a else a
    wait_idle(a, b)
    return leader, standby


# ---- tests ------------------------------------------------------------------------------------

@RUNS
def test_burst_reaches_every_client_once(start_daemon, db_for, clients, run):
    """Three commits of BURST orders of one user, each in one transaction: the user's clients
    on the leader and on the standby, and an orders:read:all client, get every event once."""
    leader, standby = two_replicas(start_daemon)
    db = db_for(leader)
    user = uid("burst")
    cs = [clients("user@leader", leader, user), clients("user@standby", standby, user),
          clients("all@standby", standby, uid("ops"), ALL_SCOPE)]
    rates, seen = [], set()
    for _ in range(3):
        t0, _ = db.burst([user], BURST)
        batch = set(db.events([user])) - seen
        seen |= batch
        settle({c: seen for c in cs}, quiet=0.3)
        rates.append(min(burst_rate(c, batch, t0) or 0 for c in cs))
    settle({c: seen for c in cs}, quiet=1.0)
    expected = db.events([user])
    tallies = [Tally(c, expected, {user}) for c in cs]
    report("burst", run, tallies, [sorted(rates)[1]],
           note="rates=" + ",".join(f"{r:.0f}" for r in rates))


@RUNS
def test_big_event_keeps_its_place(start_daemon, db_for, clients, servers, run):
    """Four writers, each with its own user and orders; each order goes open, partially_filled,
    then an update over 8000 bytes (a long market: the NOTIFY carries only the id, the leader
    reads the row), then back to a short market, partially_filled and filled. Every client sees
    every order's events in id order, each once."""
    leader, standby = two_replicas(start_daemon)
    users = [uid(f"big{i}") for i in range(4)]
    cs = [clients(f"user{i}@standby", standby, u) for i, u in enumerate(users)]
    cs.append(clients("all@leader", leader, uid("ops"), ALL_SCOPE))
    cs.append(clients("all@standby", standby, uid("ops"), ALL_SCOPE))
    orders_each = 25
    big = "BIG-" + "x" * 9000
    errors = []

    def write(user):
        try:
            d = Db(servers, leader.env["PG_CHANNEL"])
            for _ in range(orders_each):
                (oid,), = d.execute("INSERT INTO orders (user_id, market, side, price, quantity) "
                                    "VALUES (%s, 'BTC-USD', 'buy', 100, 2) RETURNING id", (user,))
                steps = [("BTC-USD", "0.5", "partially_filled"),
                         (big, "0.75", "partially_filled"),
                         ("BTC-USD", "1", "partially_filled"),
                         ("BTC-USD", "1.5", "partially_filled"),
                         ("BTC-USD", "2", "filled")]
                for market, filled, status in steps:
                    d.execute("UPDATE orders SET market = %s, filled_quantity = %s, status = %s, "
                              "updated_at = now() WHERE id = %s", (market, filled, status, oid))
            d.close()
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=write, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    db = db_for(leader)
    expected = db.events(users)
    assert len(expected) == len(users) * orders_each * 6
    per_user = {u: db.events([u]) for u in users}
    wants = {c: set(per_user[users[i]]) for i, c in enumerate(cs[:4])}
    wants.update({c: set(expected) for c in cs[4:]})
    settle(wants)
    tallies = [Tally(c, per_user[users[i]], {users[i]}) for i, c in enumerate(cs[:4])]
    tallies += [Tally(c, expected, set(users)) for c in cs[4:]]
    bigs = [e for e in cs[-1].events if e.market_len > 8000]
    report("big_event", run, tallies, note=f"big_frames={len(bigs)}")


@RUNS
def test_standby_subscriber_cut_with_a_full_look_back(start_daemon, db_for, clients, servers,
                                                      run):
    """More than 10,000 events of other users are in the look-back window; the standby's Redis
    subscriber is cut (CLIENT KILL, and Redis takes no new client until the leader has published
    3 events of user X). The standby's orders:read:all client and its client of X get the missed
    events, each once; nothing the all-users client already had comes again."""
    leader, standby = two_replicas(start_daemon)
    db = db_for(leader)
    x = uid("cutx")
    others = [uid(f"cut{i}") for i in range(20)]
    everyone = set(others) | {x}
    x_standby = clients("x@standby", standby, x)
    all_standby = clients("all@standby", standby, uid("ops"), ALL_SCOPE)
    x_leader = clients("x@leader", leader, x)
    db.burst(others, 10_500)
    before = db.events(others)
    settle({all_standby: set(before)}, quiet=0.3)
    resp = Resp(servers.redis_port)
    maxclients = resp("CONFIG", "GET", "maxclients")[1]
    try:
        victim = subscriber_id(resp, standby, servers.redis_port)
        published = metric(leader, "order_events_published_total")
        resp("CONFIG", "SET", "maxclients", "1")   # the standby cannot reconnect for now
        assert resp("CLIENT", "KILL", "ID", victim) == 1
        t0 = time.monotonic()
        (oid,), = db.execute("INSERT INTO orders (user_id, market, side, price, quantity) "
                             "VALUES (%s, 'ETH-USD', 'sell', 10, 3) RETURNING id", (x,))
        db.execute("UPDATE orders SET filled_quantity = 1, status = 'partially_filled' "
                   "WHERE id = %s", (oid,))
        db.execute("UPDATE orders SET filled_quantity = 3, status = 'filled' WHERE id = %s",
                   (oid,))
        assert wait_for(lambda: metric(leader, "order_events_published_total") >= published + 3,
                        10), "the leader did not publish X's events"
        time.sleep(0.2)
    finally:
        resp("CONFIG", "SET", "maxclients", maxclients)
        resp.close()
    assert wait_for(lambda: metric(standby, "redis_up") == 1, 15), "standby did not reconnect"
    mine = db.events([x])
    assert len(mine) == 3
    expected = db.events(list(everyone))
    settle({x_standby: set(mine), all_standby: set(expected), x_leader: set(mine)},
           watch=[lambda: metric(standby, "order_events_replayed_total")])
    tallies = [Tally(x_standby, mine, {x}), Tally(all_standby, expected, everyone),
               Tally(x_leader, mine, {x})]
    report("subscriber_cut", run, tallies, [burst_rate(x_standby, set(mine), t0)],
           note=f"replayed={metric(standby, 'order_events_replayed_total'):.0f}")


@RUNS
@pytest.mark.parametrize("when", ["50ms", "half"])
def test_leader_killed_mid_burst(start_daemon, db_for, clients, when, run):
    """The leader is SIGKILLed during a BURST-row commit's delivery: about 50 ms after the
    commit (little published yet), or once the standby's user client has half of the burst.
    The standby takes over, and its clients (the user's, and an orders:read:all one) get
    every event once, per-order order kept."""
    leader, standby = two_replicas(start_daemon)
    db = db_for(standby)
    user = uid("kill")
    cs = [clients("user@standby", standby, user),
          clients("all@standby", standby, uid("ops"), ALL_SCOPE)]
    clients("user@leader", leader, user)  # dies with the leader: not checked
    t0, t1 = db.burst([user], BURST)
    if when == "half":
        wait_for(lambda: len(cs[0].events) >= BURST // 2, 30, step=0.002)
    else:
        time.sleep(max(0.0, 0.05 - (time.monotonic() - t1)))
    leader.kill()
    killed_after = time.monotonic() - t1
    before_kill = len(cs[0].events)
    expected = db.events([user])
    took = wait_for(lambda: metric(standby, "notifier_leader") == 1, 15)
    assert took, "the standby did not take over"
    settle({c: set(expected) for c in cs},
           watch=[lambda: metric(standby, "order_events_received_total")])
    tallies = [Tally(c, expected, {user}) for c in cs]
    report(f"leader_kill_{when}", run, tallies, [burst_rate(c, set(expected), t0) for c in cs],
           note=f"killed_after_ms={killed_after * 1000:.0f} had_before_kill={before_kill}")


@RUNS
def test_redis_restart_mid_burst(start_daemon, db_for, clients, servers, run):
    """Redis is stopped about 50 ms after a BURST-row commit and started again half a second
    later: clients on both replicas get every event once."""
    leader, standby = two_replicas(start_daemon)
    db = db_for(leader)
    user = uid("redis")
    cs = [clients("user@leader", leader, user), clients("user@standby", standby, user),
          clients("all@standby", standby, uid("ops"), ALL_SCOPE)]
    t0, t1 = db.burst([user], BURST)
    time.sleep(max(0.0, 0.05 - (time.monotonic() - t1)))
    stopped_after = time.monotonic() - t1
    try:
        servers.redis_stop()
        time.sleep(0.5)
    finally:
        servers.redis_start()
    for d in (leader, standby):
        assert wait_for(lambda: metric(d, "redis_up") == 1, 15), "a replica did not reconnect"
    expected = db.events([user])
    settle({c: set(expected) for c in cs},
           watch=[lambda d=d: metric(d, "order_events_replayed_total") for d in (leader, standby)])
    tallies = [Tally(c, expected, {user}) for c in cs]
    report("redis_restart", run, tallies, [burst_rate(c, set(expected), t0) for c in cs],
           note=f"stopped_after_ms={stopped_after * 1000:.0f}")
