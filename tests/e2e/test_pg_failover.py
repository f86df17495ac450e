"""Postgres failover end to end: both daemons on a multi-host DATABASE_URL, a real primary and
its streaming standby, the primary stopped (or hung: every process SIGSTOPped) and the standby
promoted; and the notifier behind pgbouncer, which must refuse to lead in transaction mode and
may lead in session mode.

The failover test has a primary/standby pair of its own in a temp folder (servers.sh pg-init,
standby-start), so promoting the standby leaves the shared servers as they were; Redis is the
shared one. The pooler tests put pgbouncer in front of the shared Postgres and stop it after.
"""
import concurrent.futures
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid

import psycopg2
import pytest

from conftest import SERVERS_SH, http_get_json, metric, set_order_channel, wait_for
from test_notifier import (Writer, connect, notifier_env, recv_updates, recv_until_quiet,  # noqa: F401
                           uid, wait_leader, writer_for)

PRICE = "/api/markets/price?market="


def servers_sh(*args):
    subprocess.run([SERVERS_SH, *args], check=True)


class Dsn:
    """What Writer needs of a servers object: a connection string."""

    def __init__(self, dsn):
        self.dsn = dsn

    def psql_dsn(self):
        return self.dsn


class Pair:
    """A primary and its streaming standby of one test."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="markets-failover.")
        os.chmod(self.dir, 0o755)
        servers_sh("pg-init", self.dir)
        servers_sh("standby-start", self.dir)
        self.primary = self._port("pg.port")
        self.standby = self._port("standby.port")
        self.frozen = []

    def _port(self, name):
        with open(os.path.join(self.dir, name)) as f:
            return int(f.read())

    def dsn(self, port):
        return f"postgresql://postgres@127.0.0.1:{port}/markets"

    def url(self):
        return (f"postgresql://postgres@127.0.0.1:{self.primary},127.0.0.1:{self.standby}"
                "/markets?target_session_attrs=read-write")

    def db(self, port):
        conn = psycopg2.connect(self.dsn(port))
        conn.autocommit = True
        return conn

    def freeze_primary(self):
        """A hung server: the postmaster (first, so it starts no one new) and every child stop;
        the kernel still completes TCP handshakes and ACKs keepalives for them."""
        with open(os.path.join(os.path.realpath(os.path.join(self.dir, "pg")),
                               "postmaster.pid")) as f:
            postmaster = int(f.readline())
        os.kill(postmaster, signal.SIGSTOP)
        self.frozen.append(postmaster)
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(postmaster)],
                             capture_output=True, text=True, check=True).stdout.split()
        for pid in map(int, out):
            os.kill(pid, signal.SIGSTOP)
            self.frozen.append(pid)

    def thaw_and_stop_primary(self):
        for pid in self.frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.frozen = []
        subprocess.run([SERVERS_SH, "pg-stop", self.dir], check=False)

    def close(self):
        if self.frozen:
            self.thaw_and_stop_primary()
        subprocess.run([SERVERS_SH, "stop", self.dir], check=False)
        for name in ("pg", "standby"):  # data elsewhere when servers.sh ran as root
            path = os.path.join(self.dir, name)
            if os.path.islink(path):
                shutil.rmtree(os.path.realpath(path), ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def pair():
    p = Pair()
    try:
        yield p
    finally:
        p.close()


def new_market(conn, price):
    market = "F-" + uuid.uuid4().hex[:12].upper()
    with conn.cursor() as cur:
        cur.execute("INSERT INTO oracle_prices (market, price, confidence, publish_time, source)"
                    " VALUES (%s, %s, NULL, now(), 'failover')", (market, price))
    return market


def price_of(ps, market):
    """The price price-service answers, None while it answers an error (a 503 comes after
    ORIGIN_TIMEOUT_MS at most)."""
    status, _, body = http_get_json(ps.url + PRICE + market, timeout=10)
    return body["price"] if status == 200 else None


def times_when(timeout, **conds):
    """Waits for every condition at once (each polled on its own thread, so a slow one does not
    delay the others' measurement); returns the monotonic time each first held, None if it did
    not within `timeout` seconds."""
    def one(pred):
        return time.monotonic() if wait_for(pred, timeout, step=0.02) else None
    with concurrent.futures.ThreadPoolExecutor(len(conds)) as pool:
        futures = {name: pool.submit(one, pred) for name, pred in conds.items()}
        return {name: f.result() for name, f in futures.items()}


def roles(*daemons):
    out = []
    for d in daemons:
        status, _, body = http_get_json(d.url + "/readyz")
        out.append((status, body["role"]))
    return sorted(out)


def start_stack(start_daemon, pair):
    """price-service and two notifier replicas on the pair, a client on the standby replica
    that got one event committed on the primary."""
    ps = start_daemon("price-service", {"DATABASE_URL": pair.url(), "CACHE_TTL_MS": "200"})
    env = notifier_env(DATABASE_URL=pair.url())
    # The trigger's channel, set on the pair's database (the standby gets it by replication).
    set_order_channel(Dsn(pair.dsn(pair.primary)), env["PG_CHANNEL"])
    a = start_daemon("order-notifier", env, order_channel=None)
    b = start_daemon("order-notifier", env, order_channel=None)
    old = pair.db(pair.primary)
    m0 = new_market(old, "1.25")
    old.close()
    assert wait_for(lambda: price_of(ps, m0) == "1.25", 10)
    leader = wait_leader(a, b, timeout=15)
    user = uid()
    client = connect(b if leader is a else a, user)
    w_old = Writer(Dsn(pair.dsn(pair.primary)), env["PG_CHANNEL"])
    w_old.create(user)
    assert len(recv_updates(client, 1)) == 1
    return ps, env, a, b, leader, user, client, w_old


def wait_replicated(pair, user, count):
    """Replication is asynchronous (and commits do not wait for the disk here): what the
    standby has not received when the primary goes is lost, so wait for it."""
    conn = pair.db(pair.standby)
    with conn.cursor() as cur:
        def replicated():
            cur.execute("SELECT count(*) FROM order_events WHERE user_id = %s", (user,))
            return cur.fetchone()[0] == count
        assert wait_for(replicated, 10)
    conn.close()


def one_leader(a, b):
    leaders = [d for d in (a, b) if metric(d, "notifier_leader") == 1]
    return leaders[0] if len(leaders) == 1 else None


def test_failover_to_a_promoted_standby(start_daemon, servers, pair, capsys):
    ps, env, a, b, leader, user, client, w_old = start_stack(start_daemon, pair)
    # An event nobody is notified of (another channel): only a catch-up can deliver it, and the
    # only catch-up after this is the new leader's, on the promoted standby.
    silent = Writer(Dsn(pair.dsn(pair.primary)), "t_silent_" + uuid.uuid4().hex[:8])
    silent.create(user)
    assert recv_until_quiet(client, 0.5) == []
    assert len(w_old.event_ids(user)) == 2
    wait_replicated(pair, user, 2)
    w_old.close()
    silent.close()

    t0 = time.monotonic()
    servers_sh("pg-stop", pair.dir)
    t_stopped = time.monotonic()
    # The session (and the lock) ended with the server: no one leads before the promotion.
    assert wait_for(lambda: metric(a, "notifier_leader") == 0 and
                    metric(b, "notifier_leader") == 0, 5, step=0.02)
    t_no_leader = time.monotonic()
    servers_sh("standby-promote", pair.dir)
    t_promoted = time.monotonic()
    new = pair.db(pair.standby)
    m1 = new_market(new, "2.5")  # exists on the new primary only
    t = times_when(15, price=lambda: price_of(ps, m1) == "2.5", leader=lambda: one_leader(a, b))
    assert t["price"], ps.logs()[-3000:]
    assert t["leader"], a.logs()[-3000:] + b.logs()[-3000:]
    t_price, t_leader = t["price"], t["leader"]
    # The other replica back as a standby; exactly one leader, and it stays so.
    assert wait_for(lambda: roles(a, b) == [(200, "leader"), (200, "standby")], 15, step=0.05), \
        roles(a, b)
    for _ in range(10):
        assert roles(a, b) == [(200, "leader"), (200, "standby")]
        time.sleep(0.1)

    w_new = Writer(Dsn(pair.dsn(pair.standby)), env["PG_CHANNEL"])
    t_commit = time.monotonic()
    w_new.create(user)
    ids = w_new.event_ids(user)
    assert len(ids) == 3
    got = recv_updates(client, 2, timeout=15)
    t_delivered = time.monotonic()
    got += recv_until_quiet(client, 1.0)
    # The silent event came by the catch-up, the new one by NOTIFY; nothing twice.
    assert [m["event_id"] for m in got] == ids[1:], (got, ids)
    assert f"127.0.0.1:{pair.standby}" in ps.logs()  # "postgres session opened" on the 2nd host
    w_new.close()
    new.close()
    client.close()
    with capsys.disabled():
        print(f"\nfailover: primary stopped in {t_stopped - t0:.2f} s (no leader "
              f"{t_no_leader - t_stopped:.2f} s later), standby promoted in "
              f"{t_promoted - t_no_leader:.2f} s; price-service answered from the new primary "
              f"{t_price - t_promoted:.2f} s after the promotion ({t_price - t0:.2f} s after the "
              f"stop began); one notifier leader {t_leader - t_promoted:.2f} s after the "
              f"promotion; commit to receive on the new primary {t_delivered - t_commit:.2f} s")
    assert t_price - t_promoted < 8
    assert t_leader - t_promoted < 10


def test_failover_from_a_hung_primary(start_daemon, servers, pair, capsys):
    """The primary hangs (accepts TCP, never answers) rather than going away: the daemons find
    out by their own deadlines (ORIGIN_TIMEOUT_MS, the LISTEN liveness check), and each
    reconnect gives the hung first host up after its per-host connect deadline (2 s)."""
    ps, env, a, b, leader, user, client, w_old = start_stack(start_daemon, pair)
    wait_replicated(pair, user, 1)
    w_old.close()
    t0 = time.monotonic()
    pair.freeze_primary()
    servers_sh("standby-promote", pair.dir)
    t_promoted = time.monotonic()
    new = pair.db(pair.standby)
    m1 = new_market(new, "3.75")
    # The old leader stops publishing once its liveness check fails (NOTIFIER_LIVENESS_MS=500:
    # sent every 0.5 s, failing after 0.5 s more), and some replica leads on the new primary.
    stopped = []

    def leader_back():
        if not stopped:
            if metric(leader, "notifier_leader") == 0:
                stopped.append(time.monotonic())
            return False
        return one_leader(a, b)
    # The standby replica learns from its lock attempt's deadline (NOTIFIER_LIVENESS_MS too);
    # then exactly one leader, and the other replica ready as a standby.
    t = times_when(20, price=lambda: price_of(ps, m1) == "3.75", leader=leader_back,
                   both=lambda: stopped and roles(a, b) == [(200, "leader"), (200, "standby")])
    assert t["price"], ps.logs()[-3000:]
    assert t["leader"] and t["both"], a.logs()[-3000:] + b.logs()[-3000:]
    t_price, t_leader, t_both, t_old_stopped = t["price"], t["leader"], t["both"], stopped[0]
    assert roles(a, b) == [(200, "leader"), (200, "standby")]
    w_new = Writer(Dsn(pair.dsn(pair.standby)), env["PG_CHANNEL"])
    t_commit = time.monotonic()
    w_new.create(user)
    ids = w_new.event_ids(user)
    assert len(ids) == 2
    got = recv_updates(client, 1, timeout=15)
    t_delivered = time.monotonic()
    got += recv_until_quiet(client, 1.0)
    assert [m["event_id"] for m in got] == ids[1:], (got, ids)
    assert any(e.get("msg") == "postgres host did not answer in time; trying the next one"
               for e in ps.log_lines())
    w_new.close()
    new.close()
    client.close()
    pair.thaw_and_stop_primary()
    with capsys.disabled():
        print(f"\nfailover (hung primary): old leader stopped publishing "
              f"{t_old_stopped - t0:.2f} s after the hang; after the promotion: price-service "
              f"answered from the new primary in {t_price - t_promoted:.2f} s, one notifier "
              f"leader in {t_leader - t_promoted:.2f} s, /readyz leader + standby in "
              f"{t_both - t_promoted:.2f} s; then commit to receive {t_delivered - t_commit:.2f} s")
    assert t_old_stopped - t0 < 2.5
    assert t_price - t_promoted < 10
    assert t_leader - t_promoted < 10
    assert t_delivered - t_commit < 3


@pytest.fixture
def pgbouncer(servers):
    started = []

    def start(mode):
        servers_sh("pgbouncer-start", servers.dir, mode)
        started.append(mode)
        with open(os.path.join(servers.dir, f"pgbouncer-{mode}.port")) as f:
            return f"postgresql://postgres@127.0.0.1:{int(f.read())}/markets"

    yield start
    for mode in started:
        subprocess.run([SERVERS_SH, "pgbouncer-stop", servers.dir, mode], check=False)


def pooled_env(servers, pgbouncer, mode):
    """A notifier's settings through pgbouncer in `mode`. The trigger's channel is set on the
    database first: server connections the pooler opens keep the settings they started with."""
    env = notifier_env()
    set_order_channel(servers, env["PG_CHANNEL"])
    env["DATABASE_URL"] = pgbouncer(mode)
    return env


class PooledTraffic:
    """Other clients of the pooler, one statement after another: they take the server
    connection our sessions just freed, so the cheap checks (same backend twice, another
    client on ours) may pass by luck and only the LISTEN check can tell."""

    def __init__(self, url, clients=2):
        self.url, self.stop = url, threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(clients)]

    def run(self):
        conn = psycopg2.connect(self.url)
        conn.autocommit = True
        with conn.cursor() as cur:
            while not self.stop.is_set():
                cur.execute("SELECT pg_backend_pid()")
        conn.close()

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(5)


def test_transaction_pooler_refuses_to_lead(start_daemon, servers, pgbouncer):
    env = pooled_env(servers, pgbouncer, "transaction")
    with PooledTraffic(env["DATABASE_URL"]):
        a = start_daemon("order-notifier", env)
        b = start_daemon("order-notifier", env)
        check_refusals(a, b)


def refusals(d):
    return [e for e in d.log_lines() if e.get("msg", "").startswith("refusing to lead")]


def check_refusals(a, b):
    """Each replica logs why it refuses to lead and is not ready with that reason (not with a
    reason of its start-up, such as the PG_CHANNEL check still to come); never a leader."""
    def refused(d):
        lines = refusals(d)
        if not lines:
            return None
        status, _, body = http_get_json(d.url + "/readyz")
        return status == 503 and body.get("reason") == lines[-1]["reason"] and (body, lines[-1])
    for d in (a, b):
        got = wait_for(lambda: refused(d), 15)
        assert got, d.logs()[-3000:]
        body, line = got
        assert body["role"] == "standby" and body["postgres"] == "up", body
        assert "session-mode pooler or a direct connection" in line["msg"]
    # Never a leader, while retrying slowly (30 s: no second try within the test).
    for _ in range(15):
        assert metric(a, "notifier_leader") == 0 and metric(b, "notifier_leader") == 0
        time.sleep(0.1)


def test_session_pooler_leads(start_daemon, writer_for, servers, pgbouncer):
    on = start_daemon("order-notifier", pooled_env(servers, pgbouncer, "session"))
    wait_leader(on)
    status, _, body = http_get_json(on.url + "/readyz")
    assert status == 200 and body["role"] == "leader" and "reason" not in body
    user = uid()
    client = connect(on, user)
    w = writer_for(on)  # straight to Postgres: the NOTIFY reaches the LISTEN behind the pooler
    w.create(user)
    assert [m["event_id"] for m in recv_updates(client, 1)] == w.event_ids(user)
    client.close()
    assert any(e.get("msg", "").startswith("leader lock taken through a connection pooler")
               for e in on.log_lines())
