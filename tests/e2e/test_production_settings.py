"""Production safety of the real daemons: unsafe APP_ENV=production settings are refused at
start (exit 2, one line naming the variable, never a password), a token whose sub is not
UTF-8 gets 401, and a PG_CHANNEL that is not the trigger's channel keeps /readyz at 503."""
import hashlib
import hmac
import json
import os
import secrets
import subprocess
import time

import psycopg2
import pytest
import websocket

from conftest import (binary_path, free_port, http_request, raw_exchange, set_order_channel,
                      wait_for)
from test_notifier import SECRET, b64url, notifier_env, uid, ws_url

DB_PASSWORD = "db-pw-Xy7Qz"
REDIS_PASSWORD = "redis-pw-Kq3Vb"
# Made at run time: a key written here would be a published one, which production refuses
# (and unit_on_config's scan of the repository would demand it be listed as such).
GOOD_SECRET = secrets.token_hex(32)

# Valid production settings (the servers need not exist: configuration is checked first).
PRODUCTION = {
    "APP_ENV": "production",
    "REDIS_URL": f"redis://:{REDIS_PASSWORD}@127.0.0.1:1/0",
    "DATABASE_URL": f"postgresql://app:{DB_PASSWORD}@127.0.0.1:1/markets",
    "JWT_SECRET": GOOD_SECRET,
    "WS_ALLOWED_ORIGINS": "https://app.example.com",
    "ORDER_NOTIFIER_LISTEN": "127.0.0.1:1",
    "PRICE_SERVICE_LISTEN": "127.0.0.1:1",
}


def run_daemon(name, overrides):
    if not os.path.exists(binary_path(name)):
        pytest.skip(f"{binary_path(name)} is not built")
    env = {k: v for k, v in os.environ.items() if k not in ("CONFIG_FILE", "PG_CHANNEL")}
    env.update(PRODUCTION)
    env.update(overrides)
    return subprocess.run([binary_path(name)], env=env, capture_output=True, text=True,
                          timeout=10)


def assert_refused(p, variable, *hidden):
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert variable in lines[0], p.stderr
    for h in (DB_PASSWORD, REDIS_PASSWORD) + hidden:
        assert h not in p.stderr and h not in p.stdout, (h, p.stderr)


@pytest.mark.parametrize("secret,why", [
    ("dev-only-order-notifier-secret-change-me", "published in the repository"),
    ("change-me-to-32-or-more-random-bytes", "published in the repository"),
    (SECRET, "published in the repository"),
    (" " * 32, "only whitespace"),
    ("a" * 40, "fewer than 8 distinct bytes"),
    ("0123456" * 6, "fewer than 8 distinct bytes"),
    ("short-key", "too short"),
])
def test_weak_jwt_secret_is_refused(secret, why):
    p = run_daemon("order-notifier", {"JWT_SECRET": secret})
    assert_refused(p, "JWT_SECRET", *([secret] if secret.strip() else []))
    assert why in p.stderr


@pytest.mark.parametrize("origins", [
    "*",
    "https://app.example.com,*",
    "https://app.example.com/",
    "https://app.example.com/dashboard",
    "app.example.com",
    "ftp://app.example.com",
    "null",
])
def test_bad_allowed_origins_are_refused(origins):
    p = run_daemon("order-notifier", {"WS_ALLOWED_ORIGINS": origins})
    assert_refused(p, "WS_ALLOWED_ORIGINS")


@pytest.mark.parametrize("name", ["order-notifier", "price-service"])
@pytest.mark.parametrize("variable,value", [
    ("DATABASE_URL", f"postgresql://app:{DB_PASSWORD}@[127.0.0.1/markets"),
    ("DATABASE_URL", f"postgresql://app:{DB_PASSWORD}@127.0.0.1/markets?bogus=1"),
    ("DATABASE_URL", f"postgresql://app:{DB_PASSWORD}@127.0.0.1:99999/markets"),
    ("DATABASE_URL", f"host=127.0.0.1 password={DB_PASSWORD} junk"),
    ("DATABASE_URL", f"host=127.0.0.1 password='{DB_PASSWORD}"),
    ("REDIS_URL", f"redis://:{REDIS_PASSWORD}@127.0.0.1:99999/0"),
    ("REDIS_URL", f"redis://:{REDIS_PASSWORD}@[127.0.0.1/0"),
])
def test_malformed_url_is_refused_without_its_password(name, variable, value):
    p = run_daemon(name, {variable: value})
    assert_refused(p, variable)


def test_the_base_production_settings_are_accepted(tmp_path):
    """The settings the refusals above start from are fine as they are: the daemon starts
    (its servers are unreachable, so it keeps reconnecting) and exits 0 on SIGTERM."""
    if not os.path.exists(binary_path("order-notifier")):
        pytest.skip("not built")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("CONFIG_FILE", "PG_CHANNEL")}
    env.update(PRODUCTION)
    env["ORDER_NOTIFIER_LISTEN"] = f"127.0.0.1:{port}"
    with open(tmp_path / "notifier.log", "wb") as log:
        p = subprocess.Popen([binary_path("order-notifier")], env=env, stdout=log,
                             stderr=subprocess.STDOUT)
        try:
            def healthy():
                try:
                    return http_request("GET", f"http://127.0.0.1:{port}/healthz")[0] == 200
                except OSError:
                    return p.poll() is not None
            assert wait_for(healthy, 10) and p.poll() is None, (tmp_path / "notifier.log").read_text()
        finally:
            p.terminate()
            assert p.wait(15) == 0
    text = (tmp_path / "notifier.log").read_text()
    assert DB_PASSWORD not in text and REDIS_PASSWORD not in text and GOOD_SECRET not in text


def test_development_warns_about_a_malformed_origin(start_daemon):
    on = start_daemon("order-notifier", notifier_env(
        WS_ALLOWED_ORIGINS="http://localhost:8081/,http://127.0.0.1:8081"))
    assert wait_for(lambda: any(
        l.get("level") == "warn" and "WS_ALLOWED_ORIGINS" in l.get("detail", "") and
        "http://localhost:8081/" in l.get("detail", "") for l in on.log_lines()), 5), on.logs()


# ---- a sub that is not UTF-8 --------------------------------------------------------------

def raw_token(payload: bytes, secret=SECRET):
    """An HS256 token over raw payload bytes (json.dumps would escape what we want raw)."""
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(payload)
    sig = hmac.new(secret.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64url(sig)}"


@pytest.mark.parametrize("sub", [b"u\xff", b"caf\xc3", b"\xc0\xaf", b"u\xed\xa0\x80x"])
def test_sub_that_is_not_utf8_gets_401(start_daemon, sub):
    on = start_daemon("order-notifier", notifier_env(LOG_LEVEL="debug"))
    exp = str(int(time.time()) + 600).encode()
    token = raw_token(b'{"sub":"' + sub + b'","exp":' + exp + b"}")
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        websocket.create_connection(ws_url(on, token), timeout=5)
    assert e.value.status_code == 401
    # The body and the challenge say why, as for any other bad token.
    reply = raw_exchange(on.port, (
        f"GET /ws/orders?access_token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
    assert b'error="invalid_token"' in reply and b"invalid_token" in reply.split(b"\r\n\r\n", 1)[1]
    # Every log line stays valid UTF-8 and valid JSON.
    with open(on.log_path, "rb") as f:
        for line in f.read().decode("utf-8").splitlines():
            json.loads(line)
    assert on.proc.poll() is None

    # The same token with the sub in UTF-8 is welcome, and its sub comes back intact.
    user = uid() + "-caf\u00e9"
    token = raw_token(b'{"sub":"' + user.encode() + b'","exp":' + exp + b"}")
    ws = websocket.create_connection(ws_url(on, token), timeout=5)
    assert json.loads(ws.recv())["user_id"] == user
    ws.close()


# ---- PG_CHANNEL against the trigger's channel ----------------------------------------------

def terminate_notifier_sessions(servers):
    """Ends the notifier's Postgres sessions (as a failover or a network cut would), so it
    reconnects and checks again."""
    conn = psycopg2.connect(servers.psql_dsn())
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'order-notifier' AND pid <> pg_backend_pid()")
    conn.close()


def readyz(on):
    status, _, body = http_request("GET", on.url + "/readyz")
    return status, json.loads(body)


def test_pg_channel_mismatch_is_not_ready(start_daemon, servers):
    env = notifier_env()
    channel = env["PG_CHANNEL"]
    # The database keeps the trigger's default channel: PG_CHANNEL is not it.
    on = start_daemon("order-notifier", env, order_channel="order_events")
    # The channel check runs on a pool session once the pool is up ("not checked yet" until
    # then); the LISTEN session and Redis may come up a little later (a loaded machine, an ASan
    # build): wait for all three and for the check's answer.
    assert wait_for(lambda: (lambda s, b: s == 503 and "not checked yet" not in b.get("reason", "yet")
                             and b["postgres"] == "up" and b["redis"] == "up")(*readyz(on)), 15), \
        readyz(on)
    status, body = readyz(on)
    assert status == 503 and body["postgres"] == "up" and body["redis"] == "up"
    assert f"PG_CHANNEL '{channel}'" in body["reason"] and "'order_events'" in body["reason"]
    assert "markets.order_channel" in body["reason"]
    errors = [l for l in on.log_lines() if l.get("level") == "error" and
              l.get("pg_channel") == channel and l.get("order_channel") == "order_events"]
    assert len(errors) == 1, on.logs()

    # The operator sets the database's channel; the notifier's next sessions see it.
    set_order_channel(servers, channel)
    terminate_notifier_sessions(servers)
    assert wait_for(lambda: readyz(on)[0] == 200, 15), readyz(on)
    assert "reason" not in readyz(on)[1]
    assert any("matches the trigger's channel again" in l.get("msg", "")
               for l in on.log_lines())

    # And the other way round: the database moves to another channel.
    set_order_channel(servers, "elsewhere")
    terminate_notifier_sessions(servers)
    assert wait_for(lambda: "'elsewhere'" in readyz(on)[1].get("reason", ""), 15), readyz(on)
    assert readyz(on)[0] == 503


def test_pg_channel_matching_the_database_is_ready(start_daemon):
    on = start_daemon("order-notifier", notifier_env())  # the database set to its channel
    assert wait_for(lambda: readyz(on)[0] == 200, 10), readyz(on)
    on2 = start_daemon("order-notifier", notifier_env(PG_CHANNEL="order_events"))  # default
    assert wait_for(lambda: readyz(on2)[0] == 200, 10), readyz(on2)


# ---- the dev stack's scripts print no password either --------------------------------------

SCRIPTS = os.path.join(os.path.dirname(__file__), "..", "..", "scripts")


@pytest.mark.parametrize("dsn", [
    f"postgresql://app:{DB_PASSWORD}@[127.0.0.1/markets",
    f"postgresql://app:{DB_PASSWORD}@127.0.0.1:1/markets?bogus=1",
    f"host=127.0.0.1 password={DB_PASSWORD} junk",
])
def test_scripts_do_not_print_the_database_password(dsn):
    env = dict(os.environ, DATABASE_URL=dsn, FEEDER_INTERVAL_MS="50")
    p = subprocess.run(["/usr/bin/python3", os.path.join(SCRIPTS, "demo_writer.py"), "--once"],
                       env=env, capture_output=True, text=True, timeout=20)
    assert p.returncode == 2, p.stderr
    assert "DATABASE_URL" in p.stderr
    assert DB_PASSWORD not in p.stdout + p.stderr
    feeder = subprocess.Popen(["/usr/bin/python3", os.path.join(SCRIPTS, "price_feeder.py")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    feeder.terminate()
    out, err = feeder.communicate(timeout=10)
    assert "price_feeder:" in err
    assert DB_PASSWORD not in out + err
