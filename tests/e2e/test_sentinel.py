"""Both daemons through Redis Sentinel, end to end, across failovers.

The group is the one `scripts/servers.sh sentinel-start` runs (a master, a replica, three
sentinels with 1 s down-after; the SENTINEL_* lines of the servers' env file); without it these
tests are skipped. The daemons get REDIS_SENTINELS and a REDIS_URL whose address is wrong on
purpose (nothing listens on 127.0.0.1:1), so only the sentinels can lead them to the master.

Measured and printed, one `sentinel: ...` line per test: for the price-service, requests during
the failover (none may fail: the origin answers while Redis is away) and the time from the
failover to the first Cache-Status hit on the new master; for the notifier, the delivery tally
of a stream of commits across the failover (every client gets every event once) and the time to
the first event delivered after the switch.
"""
import os
import signal
import subprocess
import threading
import time

import pytest

from conftest import SERVERS_SH, binary_path, http_request, metric, wait_for
from test_delivery import ALL_SCOPE, Tally, clients, db_for, report, settle, uid  # noqa: F401
from test_delivery import two_replicas
from test_price_service import PRICE, new_market

KINDS = ["failover", "sigkill"]


class Group:
    """The Sentinel group: who is master, failover, kill, wait until healthy."""

    def __init__(self, servers):
        env = servers.env
        self.dir = servers.dir
        self.addrs = env["SENTINEL_ADDRS"]
        self.ports = [int(p) for p in env["SENTINEL_PORTS"].split(",")]
        self.name = env["SENTINEL_MASTER_NAME"]
        self.password = env["SENTINEL_PASSWORD"]
        self.data_password = env["SENTINEL_DATA_PASSWORD"]

    def _cli(self, port, password, *args):
        out = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                             env=dict(os.environ, REDISCLI_AUTH=password), timeout=10)
        return out.stdout.strip()

    def master_port(self):
        for p in self.ports:
            lines = self._cli(p, self.password, "SENTINEL", "get-master-addr-by-name",
                              self.name).splitlines()
            if len(lines) == 2:
                return int(lines[1])
        return None

    def wait_healthy(self):
        subprocess.run([SERVERS_SH, "sentinel-wait", self.dir], check=True)

    def failover(self):
        out = self._cli(self.ports[0], self.password, "SENTINEL", "FAILOVER", self.name)
        assert out == "OK", out

    def kill_master(self):
        port = self.master_port()
        with open(os.path.join(self.dir, "sentinel", f"node-{port}", "redis.pid")) as f:
            os.kill(int(f.read().strip()), signal.SIGKILL)
        return port

    def restart_node(self, port):
        subprocess.run([SERVERS_SH, "sentinel-node-start", self.dir, str(port)], check=True)

    def env(self, **extra):
        """The daemons' settings for this group, with a wrong REDIS_URL address."""
        e = {
            "REDIS_SENTINELS": self.addrs,
            "REDIS_SENTINEL_MASTER": self.name,
            "REDIS_SENTINEL_PASSWORD": self.password,
            "REDIS_URL": f"redis://:{self.data_password}@127.0.0.1:1/0",
        }
        e.update({k: str(v) for k, v in extra.items()})
        return e

    def trigger(self, kind):
        """Fails the master over (`failover`) or kills it (`sigkill`); returns the killed
        node's port for restart(), or None."""
        if kind == "failover":
            self.failover()
            return None
        return self.kill_master()

    def restore(self, killed):
        if killed:
            self.restart_node(killed)
        self.wait_healthy()


@pytest.fixture
def group(servers):
    if "SENTINEL_ADDRS" not in servers.env:
        pytest.skip("no Sentinel group (scripts/servers.sh sentinel-start)")
    g = Group(servers)
    g.wait_healthy()
    return g


# ---- configuration ----------------------------------------------------------------------------

@pytest.mark.parametrize("daemon", ["price-service", "order-notifier"])
@pytest.mark.parametrize("env,name", [
    ({"REDIS_SENTINELS": "127.0.0.1:26379"}, "REDIS_SENTINEL_MASTER"),
    ({"REDIS_SENTINELS": "127.0.0.1:26379,,", "REDIS_SENTINEL_MASTER": "m"}, "REDIS_SENTINELS"),
    ({"REDIS_SENTINELS": "127.0.0.1:99999", "REDIS_SENTINEL_MASTER": "m"}, "REDIS_SENTINELS"),
    ({"REDIS_SENTINEL_MASTER": "m"}, "REDIS_SENTINEL_MASTER"),
    ({"REDIS_SENTINELS": "127.0.0.1:26379", "REDIS_SENTINEL_MASTER": "m",
      "REDIS_URL": "unix:///tmp/r.sock"}, "REDIS_URL"),
])
def test_bad_sentinel_settings_exit_2_naming_the_variable(daemon, env, name):
    if not os.path.exists(binary_path(daemon)):
        pytest.skip("not built")
    full = dict(os.environ, PRICE_SERVICE_LISTEN="127.0.0.1:1", ORDER_NOTIFIER_LISTEN="127.0.0.1:1")
    full.update(env)
    r = subprocess.run([binary_path(daemon)], env=full, capture_output=True, text=True, timeout=10)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f" {name}: " in f" {lines[0]}", r.stderr


def test_production_needs_no_redis_url_with_sentinels(start_daemon, group):
    """With REDIS_SENTINELS, REDIS_URL is optional even in production (db 0, no password:
    the data nodes here have one, so the link stays down, but the daemon starts)."""
    ps = start_daemon("price-service", dict(group.env(APP_ENV="production"), REDIS_URL=None))
    assert metric(ps, "redis_up") == 0


# ---- price-service ----------------------------------------------------------------------------

class Traffic:
    """Price requests in a loop from a thread: (start time, status, Cache-Status) of each."""

    def __init__(self, daemon, market):
        self.url = daemon.url + PRICE + market
        self.results = []
        self.errors = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                status, headers, _ = http_request("GET", self.url, timeout=5)
                self.results.append((t, status, headers.get("cache-status", "")))
            except OSError as e:
                self.errors.append(f"{type(e).__name__}: {e}")
            time.sleep(0.01)

    def stop(self):
        self._stop.set()
        self.thread.join(10)


@pytest.mark.parametrize("kind", KINDS)
def test_price_service_follows_the_master(start_daemon, db, group, kind):
    """No failed price request across the failover, and caching resumes on the new master."""
    ps = start_daemon("price-service", group.env(CACHE_MEMORY_ENABLED="false",
                                                 REDIS_TIMEOUT_MS="200"))
    market = new_market(db)
    assert wait_for(lambda: metric(ps, "redis_up") == 1, 10)
    assert wait_for(lambda: http_request("GET", ps.url + PRICE + market)[1]
                    .get("cache-status", "").endswith("hit"), 5)
    reconnects = metric(ps, "redis_reconnects_total")
    old = group.master_port()
    traffic = Traffic(ps, market)
    killed = None
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        killed = group.trigger(kind)
        # The daemon is on the new master once its link came up again there.
        assert wait_for(lambda: metric(ps, "redis_reconnects_total") > reconnects, 15), \
            "the cache link did not reconnect"
        t_up = time.monotonic()
        assert wait_for(lambda: any(t >= t_up and cs.endswith("hit")
                                    for t, _, cs in list(traffic.results)), 10)
        time.sleep(0.3)
    finally:
        traffic.stop()
        new = group.master_port()
        group.restore(killed)
    assert new != old
    res = traffic.results
    failed = [r for r in res if r[1] != 200]
    down = [r for r in res if r[0] >= t0 and "redis-unavailable" in r[2]]
    first_hit = min(t for t, _, cs in res if t >= t_up and cs.endswith("hit"))
    print(f"\nsentinel: price-service {kind}: {len(res)} requests, {len(failed)} failed, "
          f"{len(down)} answered from the origin while Redis was away, link up on the new "
          f"master after {(t_up - t0) * 1000:.0f} ms, first hit after "
          f"{(first_hit - t0) * 1000:.0f} ms", flush=True)
    assert not traffic.errors, traffic.errors[:3]
    assert not failed, failed[:3]
    assert first_hit - t0 < (5 if kind == "failover" else 8)
    logs = [l for l in ps.log_lines() if l.get("msg") == "redis connected"]
    assert logs and logs[-1].get("addr", "").endswith(f":{new}")


# ---- order-notifier ---------------------------------------------------------------------------

class Stream:
    """One small commit every 20 ms (one order of `user`) from a thread until stopped."""

    def __init__(self, db, user):
        self.db = db
        self.user = user
        self.commits = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.db.burst([self.user], 1)
            self.commits.append(time.monotonic())
            time.sleep(0.02)

    def stop(self):
        self._stop.set()
        self.thread.join(10)


@pytest.mark.parametrize("kind", KINDS)
def test_notifier_delivers_every_event_once_across_failover(start_daemon, db_for, clients, group,
                                                            kind):
    """Clients on the leader and on the standby, a commit every 20 ms from before the
    failover until after it: every client gets every event once, in order."""
    leader, standby = two_replicas(start_daemon, **group.env())
    for d in (leader, standby):
        assert wait_for(lambda d=d: metric(d, "redis_up") == 1, 10)
    db = db_for(leader)
    user = uid("sentinel")
    cs = [clients("user@leader", leader, user), clients("user@standby", standby, user),
          clients("all@standby", standby, uid("ops"), ALL_SCOPE)]
    reconnects = {d: metric(d, "redis_reconnects_total") for d in (leader, standby)}
    old = group.master_port()
    stream = Stream(db, user)
    killed = None
    try:
        time.sleep(1.0)
        t0 = time.monotonic()
        killed = group.trigger(kind)
        for d in (leader, standby):
            # Both links of each replica: publish and subscribe.
            assert wait_for(lambda d=d: metric(d, "redis_reconnects_total") >= reconnects[d] + 2
                            and metric(d, "redis_up") == 1, 15), "a replica did not follow"
        t_up = time.monotonic()
        time.sleep(1.0)
    finally:
        stream.stop()
        new = group.master_port()
    try:
        expected = db.events([user])
        settle({c: set(expected) for c in cs},
               watch=[lambda d=d: metric(d, "order_events_replayed_total")
                      for d in (leader, standby)])
        tallies = [Tally(c, expected, {user}) for c in cs]
        after = [e.t for c in cs for e in c.events if e.t >= t_up]
        report(f"sentinel_{kind}", 1, tallies,
               note=f"events={len(expected)} links_up_after_ms={(t_up - t0) * 1000:.0f}")
        print(f"sentinel: order-notifier {kind}: {len(expected)} events, every client got "
              f"each once; both replicas' links up on the new master after "
              f"{(t_up - t0) * 1000:.0f} ms; {len(after)} deliveries after that", flush=True)
    finally:
        group.restore(killed)
    assert new != old
