"""order-notifier under faults: leader loss, Postgres and Redis restarts; and a latency smoke.

Each test commits events while something breaks and checks that a connected client ends up with
every committed event of its user exactly once.
"""
import statistics
import subprocess
import threading
import time

import pytest

from test_notifier import (Writer, connect, drop_outbox_rows, metric, notifier_env,  # noqa: F401
                           put_outbox_rows, recv_json, recv_until_quiet, recv_updates, uid,
                           wait_for, wait_leader, writer_for)


class BackgroundWriter:
    """Commits an order update every `interval` s for `user` until stopped; survives a database
    that goes away for a while (commits then fail and are retried)."""

    def __init__(self, servers, channel, user, interval=0.01):
        self.servers, self.channel, self.user, self.interval = servers, channel, user, interval
        self.stop_flag = threading.Event()
        self.commits = 0
        self.errors = 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        w, oid, n = None, None, 0
        while not self.stop_flag.is_set():
            try:
                if w is None:
                    w = Writer(self.servers, self.channel)
                    if oid is None:
                        oid = w.create(self.user)
                        self.commits += 1
                w.fill(oid, str(n))
                n += 1
                self.commits += 1
            except Exception:
                self.errors += 1
                try:
                    if w:
                        w.close()
                except Exception:
                    pass
                w = None
                time.sleep(0.1)
            time.sleep(self.interval)
        if w:
            w.close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_flag.set()
        self.thread.join(10)


def collect(ws, expected_count, timeout=20):
    got = [m["event_id"] for m in recv_updates(ws, expected_count, timeout=timeout)]
    got += [m["event_id"] for m in recv_until_quiet(ws, 1.0)]
    return got


def check_exactly_once(got, expected):
    assert len(got) == len(set(got)), "duplicates: %s" % sorted(
        {i for i in got if got.count(i) > 1})
    missing = sorted(set(expected) - set(got))
    assert not missing, f"missing {len(missing)} of {len(expected)}: {missing[:20]}"


def test_leader_kill_hands_over_without_loss(start_daemon, writer_for, servers):
    env = notifier_env()
    a = start_daemon("order-notifier", env)
    b = start_daemon("order-notifier", env)
    leader = wait_leader(a, b)
    standby = b if leader is a else a
    user = uid()
    w = writer_for(standby)
    client = connect(standby, user)
    with BackgroundWriter(servers, env["PG_CHANNEL"], user) as bw:
        time.sleep(0.5)
        t0 = time.monotonic()
        leader.kill()                               # SIGKILL: no goodbye, no unlock
        assert wait_for(lambda: metric(standby, "notifier_leader") == 1, 10)
        takeover = time.monotonic() - t0
        time.sleep(0.5)
    expected = w.event_ids(user)
    got = collect(client, len(expected))
    check_exactly_once(got, expected)
    assert takeover < 5, takeover
    assert bw.commits == len(expected)
    client.close()


def test_graceful_leader_stop_hands_over(start_daemon, writer_for, servers):
    env = notifier_env()
    a = start_daemon("order-notifier", env)
    b = start_daemon("order-notifier", env)
    leader = wait_leader(a, b)
    standby = b if leader is a else a
    user = uid()
    w = writer_for(standby)
    client = connect(standby, user)
    with BackgroundWriter(servers, env["PG_CHANNEL"], user):
        time.sleep(0.3)
        assert leader.stop() == 0                   # SIGTERM: unlocks on the way out
        assert wait_for(lambda: metric(standby, "notifier_leader") == 1, 5)
        time.sleep(0.3)
    expected = w.event_ids(user)
    check_exactly_once(collect(client, len(expected)), expected)
    client.close()


def test_listen_session_killed_catches_up(start_daemon, writer_for, servers):
    """The LISTEN backend dies while Postgres stays up: events committed until the notifier has
    reconnected are read back from the outbox."""
    env = notifier_env()
    on = start_daemon("order-notifier", env)
    wait_leader(on)
    user = uid()
    w = writer_for(on)
    client = connect(on, user)
    with BackgroundWriter(servers, env["PG_CHANNEL"], user, interval=0.005):
        time.sleep(0.3)
        with w.conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = 'order-notifier' AND pid <> pg_backend_pid()")
        time.sleep(1.0)
        assert wait_for(lambda: metric(on, "notifier_leader") == 1, 10)
        time.sleep(0.3)
    expected = w.event_ids(user)
    check_exactly_once(collect(client, len(expected)), expected)
    assert metric(on, "pg_reconnects_total") >= 1
    client.close()


def test_catch_up_pages_in_id_order(start_daemon, writer_for, servers):
    """Catch-up reads the outbox in pages of 1000 after the largest id of the previous page; a
    page sorted as text (100000000000 before 99999999000) would make it skip rows."""
    env = notifier_env()
    on = start_daemon("order-notifier", env)
    wait_leader(on)
    user = uid()
    w = writer_for(on)
    client = connect(on, user)
    d = 10 ** 12
    ids = list(range(d - 1000, d + 3))
    put_outbox_rows(w.conn, user, ids)  # no NOTIFY: only a catch-up can find them
    try:
        with w.conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = 'order-notifier' AND pid <> pg_backend_pid()")
        got = collect(client, len(ids), timeout=15)
        check_exactly_once(got, ids)
    finally:
        drop_outbox_rows(w.conn, ids)
    client.close()


def test_postgres_restart_loses_nothing(start_daemon, writer_for, servers):
    env = notifier_env()
    on = start_daemon("order-notifier", env)
    wait_leader(on)
    user = uid()
    client = connect(on, user)
    with BackgroundWriter(servers, env["PG_CHANNEL"], user) as bw:
        time.sleep(0.3)
        servers.pg_stop()
        time.sleep(0.5)
        servers.pg_start()
        assert wait_for(lambda: metric(on, "notifier_leader") == 1, 15)
        wait_for(lambda: bw.commits > 0 and bw.errors > 0, 5)
        time.sleep(0.5)
    w = writer_for(on)
    expected = w.event_ids(user)
    check_exactly_once(collect(client, len(expected)), expected)
    assert bw.errors > 0  # the writer really saw the database go away
    client.close()


def test_redis_restart_loses_nothing(start_daemon, writer_for, servers):
    env = notifier_env()
    a = start_daemon("order-notifier", env)
    b = start_daemon("order-notifier", env)
    wait_leader(a, b)
    user = uid()
    w = writer_for(a)
    ca, cb = connect(a, user), connect(b, user)
    with BackgroundWriter(servers, env["PG_CHANNEL"], user):
        time.sleep(0.3)
        servers.redis_stop()
        time.sleep(1.0)                             # events commit while Redis is gone
        servers.redis_start()
        for d in (a, b):
            assert wait_for(lambda: metric(d, "redis_up") == 1, 10)
        time.sleep(0.5)
    expected = w.event_ids(user)
    for c in (ca, cb):
        check_exactly_once(collect(c, len(expected)), expected)
        c.close()


def test_commit_to_receive_latency(start_daemon, writer_for, capsys):
    """Smoke: a few hundred events, commit to receive; asserts only the contract's 100 ms p99."""
    on = start_daemon("order-notifier", notifier_env())
    wait_leader(on)
    user = uid()
    w = writer_for(on)
    client = connect(on, user)
    oid = w.create(user)
    recv_updates(client, 1)
    latencies = []
    for i in range(300):
        t0 = time.perf_counter()
        w.fill(oid, str(i))                         # autocommit: the statement is the commit
        msg = recv_json(client, timeout=5)
        latencies.append(time.perf_counter() - t0)
        assert msg["type"] == "order_update" and msg["order"]["filled_quantity"] == str(i)
    client.close()
    latencies.sort()
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
    with capsys.disabled():
        print(f"\norder-notifier commit-to-receive over {len(latencies)} events: "
              f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {latencies[-1] * 1000:.2f} ms")
    assert p99 < 100
    assert metric(on, "order_event_delivery_seconds_count") >= 300


def test_catch_up_after_handover_repeats_nothing(start_daemon, writer_for):
    """The new leader re-publishes the look-back window; a client that resumed on the standby
    (a fresh subscription there) must not see any of it twice."""
    env = notifier_env()
    a = start_daemon("order-notifier", env)
    b = start_daemon("order-notifier", env)
    leader = wait_leader(a, b)
    standby = b if leader is a else a
    user = uid()
    w = writer_for(standby)
    oid = w.create(user)
    for i in range(10):
        w.fill(oid, str(i))
    ids = w.event_ids(user)
    resume_from = ids[5]
    client = connect(standby, user, last_event_id=resume_from)
    replayed = [m["event_id"] for m in recv_updates(client, 5)]
    assert replayed == ids[6:]
    leader.kill()
    assert wait_for(lambda: metric(standby, "notifier_leader") == 1, 10)
    assert wait_for(lambda: metric(standby, "order_events_published_total") >= len(ids), 10)
    assert recv_until_quiet(client, 1.0) == []
    w.fill(oid, "99")
    live = recv_updates(client, 1)
    assert [m["event_id"] for m in live] == [w.last_event_id(user)]
    client.close()
