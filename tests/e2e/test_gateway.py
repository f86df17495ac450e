"""The API gateway (deploy/gateway/nginx.conf) end to end: a real nginx (Debian package) with the
committed configuration in front of the real daemons.

The configuration is copied to a temp folder with only what cannot work unprivileged here
rewritten: the upstream addresses (compose service names -> the daemons' loopback ports), the
listen port, and the pid/log/temp paths. Routing, headers and timeouts stay as committed.

Without the daemons' binaries the daemon tests skip; the header test runs with a small Python
upstream instead and needs only nginx.
"""
import base64
import hashlib
import hmac
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid

import psycopg2
import pytest
import websocket

from conftest import SOURCE_DIR, binary_path, free_port, http_request

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
CONF = os.path.join(SOURCE_DIR, "deploy", "gateway", "nginx.conf")
SECRET = "e2e-gateway-secret-at-least-32-bytes-long"

pytestmark = pytest.mark.skipif(not os.path.exists(NGINX), reason="nginx is not installed")


def gateway_conf(text, workdir, listen_port, price_port, notifier_port):
    """The committed configuration with addresses and paths made local; every rewrite must hit."""
    rewrites = [
        (r"server price-service:8080;", f"server 127.0.0.1:{price_port};"),
        (r"server order-notifier:8081;", f"server 127.0.0.1:{notifier_port};"),
        (r"listen 8000;", f"listen 127.0.0.1:{listen_port};"),
        (r"pid /var/run/nginx\.pid;", f"pid {workdir}/nginx.pid;"),
        (r"/var/log/nginx/", f"{workdir}/"),
        (r"/var/cache/nginx/", f"{workdir}/"),
        (r"worker_processes auto;", "worker_processes 1;"),
    ]
    for pattern, repl in rewrites:
        text, n = re.subn(pattern, repl, text)
        assert n > 0, f"deploy/gateway/nginx.conf no longer has {pattern!r}"
    return text


class Gateway:
    def __init__(self, price_port, notifier_port):
        # Its own folder, readable by nginx's workers (they run as nobody when started as root).
        self.dir = tempfile.mkdtemp(prefix="markets-gateway.")
        os.chmod(self.dir, 0o755)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with open(CONF) as f:
            conf = gateway_conf(f.read(), self.dir, self.port, price_port, notifier_port)
        self.conf = os.path.join(self.dir, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(conf)
        self.proc = subprocess.Popen(
            [NGINX, "-c", self.conf, "-p", self.dir, "-e", os.path.join(self.dir, "error.log"),
             "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited {self.proc.returncode}: {self.proc.stderr.read().decode()}"
                                   f"\n{self.error_log()}")
            try:
                status, _, _ = http_request("GET", self.url + "/gateway/healthz", timeout=1)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"nginx did not answer on {self.url}:\n{self.error_log()}")

    def error_log(self):
        try:
            with open(os.path.join(self.dir, "error.log")) as f:
                return f.read()
        except OSError:
            return ""

    def access_log(self, wait_for=None, timeout=5.0):
        """The access log's entries; with `wait_for`, polls until an entry has that request id
        (nginx writes the line after the response has gone out)."""
        deadline = time.monotonic() + timeout
        while True:
            with open(os.path.join(self.dir, "access.log")) as f:
                entries = [json.loads(line) for line in f if line.strip()]
            if wait_for is None or any(e.get("request_id") == wait_for for e in entries) \
                    or time.monotonic() > deadline:
                return entries
            time.sleep(0.02)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: finish requests, close sockets
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---- without the daemons: what nginx passes upstream -----------------------------------------

class EchoHandler(http.server.BaseHTTPRequestHandler):
    """Answers every GET with the request line and headers it received, as JSON."""
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = json.dumps({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def echo_gateway():
    servers = []
    for _ in range(2):
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    gw = Gateway(servers[0].server_address[1], servers[1].server_address[1])
    try:
        yield gw, servers[0].server_address[1], servers[1].server_address[1]
    finally:
        gw.stop()
        for srv in servers:
            srv.shutdown()
            srv.server_close()


def test_gateway_routes_and_forwards_request_id_and_client_address(echo_gateway):
    gw, price_port, notifier_port = echo_gateway

    # The caller's request id goes to the service and comes back.
    status, headers, body = http_request("GET", gw.url + "/api/markets/price?market=BTC-USD",
                                         headers={"X-Request-Id": "e2e-gw-1"})
    assert status == 200
    seen = json.loads(body)
    assert seen["path"] == "/api/markets/price?market=BTC-USD"
    assert seen["headers"]["x-request-id"] == "e2e-gw-1"
    assert headers["x-request-id"] == "e2e-gw-1"
    assert seen["headers"]["x-real-ip"] == "127.0.0.1"
    assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"
    assert seen["headers"]["host"] == f"127.0.0.1:{gw.port}"

    # Without one, nginx makes one, the same upstream and downstream.
    status, headers, body = http_request("GET", gw.url + "/api/markets/prices?markets=A,B")
    rid = json.loads(body)["headers"]["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    assert headers["x-request-id"] == rid

    # A proxy in front of the gateway: its X-Forwarded-For is kept and the peer appended.
    _, _, body = http_request("GET", gw.url + "/api/markets/price?market=X",
                              headers={"X-Forwarded-For": "203.0.113.7"})
    assert json.loads(body)["headers"]["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"

    # Which upstream got what: the access log names it.
    http_request("GET", gw.url + "/ws/orders", headers={"X-Request-Id": "e2e-gw-ws"})
    http_request("GET", gw.url + "/", headers={"X-Request-Id": "e2e-gw-root"})
    routed = {e["request_id"]: e["upstream"] for e in gw.access_log(wait_for="e2e-gw-root")}
    assert routed["e2e-gw-1"] == f"127.0.0.1:{price_port}"
    assert routed["e2e-gw-ws"] == f"127.0.0.1:{notifier_port}"
    assert routed["e2e-gw-root"] == f"127.0.0.1:{notifier_port}"

    # Internal endpoints stay internal; the gateway's own health check needs no upstream.
    status, _, body = http_request("GET", gw.url + "/metrics")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"


# ---- with the real daemons -------------------------------------------------------------------

def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_token(sub, exp_in=300):
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64url(json.dumps({"sub": sub, "exp": int(time.time()) + exp_in}).encode())
    sig = hmac.new(SECRET.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(sig)}"


@pytest.fixture
def daemons_gateway(servers, start_daemon):
    for name in ("price-service", "order-notifier"):
        if not os.path.exists(binary_path(name)):
            pytest.skip(f"{binary_path(name)} is not built")
    channel = "gw_" + uuid.uuid4().hex[:12]
    price = start_daemon("price-service")
    notifier = start_daemon("order-notifier", {
        "JWT_SECRET": SECRET,
        "PG_CHANNEL": channel,
        # Own leader lock, so leftovers of other tests cannot hold it.
        "NOTIFIER_LOCK_KEY": str(uuid.uuid4().int % 2_000_000_000),
        "NOTIFIER_LOCK_RETRY_MS": "200",
    })
    gw = Gateway(price.port, notifier.port)
    try:
        yield gw, notifier, channel
    finally:
        gw.stop()


def wait_ready(url, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _, _ = http_request("GET", url + "/readyz", timeout=2)
        if status == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"{url} not ready after {timeout}s")


def test_price_request_through_gateway(daemons_gateway, db):
    gw, _, _ = daemons_gateway
    with db.cursor() as cur:
        cur.execute("SELECT price::text FROM oracle_prices WHERE market = 'BTC-USD'")
        price = cur.fetchone()[0]

    status, headers, body = http_request("GET", gw.url + "/api/markets/price?market=BTC-USD",
                                         headers={"X-Request-Id": "e2e-gw-price"})
    assert status == 200, body
    doc = json.loads(body)
    assert doc["market"] == "BTC-USD"
    assert doc["price"] == price
    assert headers["x-request-id"] == "e2e-gw-price"
    assert headers["cache-status"].startswith("price-service;")

    # The daemon's own errors pass through unchanged.
    status, _, body = http_request("GET", gw.url + "/api/markets/price?market=no%20such")
    assert status == 400
    assert json.loads(body)["error"]["code"] == "invalid_market"


def test_websocket_order_update_through_gateway(daemons_gateway, servers):
    gw, notifier, channel = daemons_gateway
    wait_ready(notifier.url)
    user = f"gw-{uuid.uuid4().hex[:10]}"
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{gw.port}/ws/orders?access_token={make_token(user)}",
        timeout=10, origin=gw.url, header=["X-Request-Id: e2e-gw-ws"])
    try:
        welcome = json.loads(ws.recv())
        assert welcome["type"] == "welcome" and welcome["user_id"] == user

        # The application-level ping goes through the proxied connection both ways.
        ws.send(json.dumps({"type": "ping"}))
        assert json.loads(ws.recv()) == {"type": "pong"}

        conn = psycopg2.connect(servers.psql_dsn())
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT set_config('markets.order_channel', %s, false)", (channel,))
                cur.execute("INSERT INTO orders (user_id, market, side, price, quantity) "
                            "VALUES (%s, 'ETH-USD', 'sell', '3400.5', '1.25') RETURNING id", (user,))
                order_id = cur.fetchone()[0]
        finally:
            conn.close()

        deadline = time.monotonic() + 10
        while True:
            assert time.monotonic() < deadline, "no order_update through the gateway"
            frame = json.loads(ws.recv())
            if frame.get("type") == "order_update":
                break
        assert frame["order"]["id"] == order_id
        assert frame["order"]["user_id"] == user
        assert frame["order"]["price"] == "3400.5"
        assert frame["order"]["status"] == "open"
    finally:
        ws.close()


def test_dashboard_and_upgrade_rules_through_gateway(daemons_gateway):
    gw, _, _ = daemons_gateway
    status, headers, body = http_request("GET", gw.url + "/")
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    # A plain GET to the WebSocket endpoint is the notifier's 426, not a gateway error.
    status, _, _ = http_request("GET", gw.url + "/ws/orders?access_token=" + make_token("u"))
    assert status == 426
