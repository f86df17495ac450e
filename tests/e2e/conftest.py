"""Shared fixtures for the end-to-end tests: real Redis, real Postgres, real daemons.

`servers` reuses the servers that scripts/test started (REDIS_URL, DATABASE_URL and
MARKETS_SERVERS_DIR in the environment) or starts its own with scripts/servers.sh, so
`python3 -m pytest tests/e2e` also works alone. `start_daemon` runs a daemon from
MARKETS_BUILD_DIR (default: build/) on a free loopback port and waits for /healthz.
"""
import http.client
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse

import pytest

SOURCE_DIR = os.environ.get(
    "MARKETS_SOURCE_DIR", os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
BUILD_DIR = os.environ.get("MARKETS_BUILD_DIR", os.path.join(SOURCE_DIR, "build"))
SERVERS_SH = os.path.join(SOURCE_DIR, "scripts", "servers.sh")

BINARIES = {
    "price-service": ("price-service/price-service", "PRICE_SERVICE_LISTEN"),
    "order-notifier": ("order-notifier/order-notifier", "ORDER_NOTIFIER_LISTEN"),
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary_path(name):
    return os.path.join(BUILD_DIR, BINARIES[name][0])


class Servers:
    """Redis and Postgres of this test run, with fault injection."""

    def __init__(self, directory, owned):
        self.dir = directory
        self.owned = owned
        self.env = {}
        with open(os.path.join(directory, "env")) as f:
            for line in f:
                key, _, value = line.strip().partition("=")
                if key:
                    self.env[key] = value
        self.redis_port = int(self.env["REDIS_PORT"])
        self.pg_port = int(self.env["PG_PORT"])

    def _run(self, cmd):
        subprocess.run([SERVERS_SH, cmd, self.dir], check=True)

    def redis_stop(self):
        self._run("redis-stop")

    def redis_start(self):
        self._run("redis-start")

    def pg_stop(self):
        self._run("pg-stop")

    def pg_start(self):
        self._run("pg-start")

    def psql_dsn(self):
        return self.env["DATABASE_URL"]

    def redis_cli(self, *args):
        out = subprocess.run(["redis-cli", "-p", str(self.redis_port), *args],
                             check=True, capture_output=True, text=True)
        return out.stdout.strip()


@pytest.fixture(scope="session")
def servers():
    existing = os.environ.get("MARKETS_SERVERS_DIR")
    if existing and os.path.exists(os.path.join(existing, "env")):
        # deploy/sql is the schema only: the demo markets (BTC-USD...) some tests read come
        # from the dev seed, applied here whoever started the servers (idempotent).
        subprocess.run([SERVERS_SH, "seed", existing], check=True)
        yield Servers(existing, owned=False)
        return
    directory = tempfile.mkdtemp(prefix="markets-e2e.")
    os.chmod(directory, 0o755)
    subprocess.run([SERVERS_SH, "start", directory], check=True)
    subprocess.run([SERVERS_SH, "seed", directory], check=True)
    try:
        yield Servers(directory, owned=True)
    finally:
        subprocess.run([SERVERS_SH, "stop", directory], check=False)


@pytest.fixture
def db(servers):
    """A psycopg2 connection in autocommit mode."""
    import psycopg2
    conn = psycopg2.connect(servers.psql_dsn())
    conn.autocommit = True
    yield conn
    conn.close()


class Daemon:
    def __init__(self, name, env, port, log_path):
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.env = env
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([binary_path(name)], env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout=15.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                status, _, _ = http_request("GET", self.url + "/healthz", timeout=1)
                if status == 200:
                    self._settle()
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not healthy after {timeout}s:\n{self.logs()}")

    def _settle(self, timeout=5.0):
        """The price-service answers /healthz before its Postgres pool is up, and its first
        requests would get 503: give it a moment to become ready (tests that keep the origin
        away on purpose simply wait the few seconds out)."""
        if self.name != "price-service":
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if http_request("GET", self.url + "/readyz", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)

    def logs(self):
        self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def log_lines(self):
        """The JSON log lines, parsed (lines that are not JSON are skipped)."""
        out = []
        for line in self.logs().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, timeout=12.0):
        """SIGTERM and wait; returns the exit code (0 expected; ASan leaks make it non-zero)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def set_order_channel(servers, channel):
    """Sets the database-level markets.order_channel, the channel the orders trigger NOTIFYs
    (deploy/sql), the way a deployment that changes PG_CHANNEL does (README); "order_events"
    (the trigger's default) or None resets it. The notifier checks its PG_CHANNEL against it in
    its own sessions, so only sessions opened afterwards see the new value."""
    import psycopg2
    from psycopg2 import sql
    conn = psycopg2.connect(servers.psql_dsn())
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_database()")
            db = sql.Identifier(cur.fetchone()[0])
            if channel in (None, "order_events"):
                cur.execute(sql.SQL("ALTER DATABASE {} RESET markets.order_channel").format(db))
            else:
                cur.execute(sql.SQL("ALTER DATABASE {} SET markets.order_channel = {}")
                            .format(db, sql.Literal(channel)))
    finally:
        conn.close()


@pytest.fixture
def start_daemon(servers, tmp_path):
    """start_daemon(name, env_overrides=None, wait=True, order_channel=...) -> Daemon; all are
    stopped after the test, and one that does not exit 0 on SIGTERM fails it (leaks under ASan
    do that). An order-notifier gets the database's markets.order_channel set to its
    PG_CHANNEL first (the trigger's channel, which it checks at start), unless order_channel
    names another value to set (None: leave the database as it is)."""
    started = []
    channel_set = []
    keep = object()

    def start(name, env_overrides=None, wait=True, order_channel=keep):
        if not os.path.exists(binary_path(name)):
            pytest.skip(f"{binary_path(name)} is not built")
        port = free_port()
        env = dict(os.environ)
        env.update({
            "REDIS_URL": servers.env["REDIS_URL"],
            "DATABASE_URL": servers.env["DATABASE_URL"],
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "info",
            # The suite shares two cores with builds and other tests: a 100 ms Redis deadline
            # would make an unrelated test see "redis-unavailable". Timeout tests set their own.
            "REDIS_TIMEOUT_MS": "1000",
            BINARIES[name][1]: f"127.0.0.1:{port}",
        })
        for k, v in (env_overrides or {}).items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = str(v)
        if name == "order-notifier":
            if order_channel is keep:
                order_channel = env.get("PG_CHANNEL") or "order_events"
            if order_channel is not None:
                set_order_channel(servers, order_channel)
                channel_set.append(order_channel)
        d = Daemon(name, env, port, str(tmp_path / f"{name}-{len(started)}.log"))
        started.append(d)
        if wait:
            d.wait_healthy()
        return d

    yield start
    if channel_set:
        set_order_channel(servers, None)
    bad = []
    for d in started:
        if d.proc.poll() is None:
            code = d.stop()
            if code != 0:
                bad.append(f"{d.name} exited {code} on SIGTERM:\n{d.logs()[-4000:]}")
        else:
            d._log.close()
    if bad:
        pytest.fail("\n".join(bad))


def http_request(method, url, headers=None, body=None, timeout=5):
    """One request on a fresh connection: (status, headers dict with lower-case names, body)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        path = u.path + ("?" + u.query if u.query else "")
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    finally:
        conn.close()


def http_get_json(url, **kw):
    status, headers, body = http_request("GET", url, **kw)
    return status, headers, (json.loads(body) if body else None)


def raw_exchange(port, data, read_timeout=2.0):
    """Sends raw bytes and returns everything read until the server closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except socket.timeout:
            pass
        return b"".join(chunks)


def metric(daemon, name, labels=""):
    """A sample from the daemon's /metrics: the series `name{labels}` when labels are given
    (as rendered, e.g. '{result="hit"}'), else the sum over every series of `name`; None when
    absent."""
    _, _, body = http_request("GET", daemon.url + "/metrics")
    total, found = 0.0, False
    for line in body.decode().splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if (key == name + labels) if labels else (key == name or key.startswith(name + "{")):
            total += float(value)
            found = True
    return total if found else None


def wait_for(pred, timeout=10.0, step=0.05):
    """Polls `pred` until it returns something true or `timeout` seconds pass; returns its
    last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    return pred()
