"""price-service end to end: the real daemon against real Redis and Postgres."""
import concurrent.futures
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid

import pytest

from conftest import (binary_path, http_get_json, http_request, metric, raw_exchange,
                      wait_for)

PRICE = "/api/markets/price?market="


def new_market(db, price="64123.450000", confidence="12.5", source="pyth"):
    market = "T-" + uuid.uuid4().hex[:12].upper()
    with db.cursor() as cur:
        cur.execute("INSERT INTO oracle_prices (market, price, confidence, publish_time, source)"
                    " VALUES (%s, %s, %s, '2026-11-29T20:00:00.123Z', %s)",
                    (market, price, confidence, source))
    return market


def set_price(db, market, price):
    with db.cursor() as cur:
        cur.execute("UPDATE oracle_prices SET price = %s WHERE market = %s", (price, market))


def test_miss_then_hit_with_exact_decimals(start_daemon, db):
    ps = start_daemon("price-service")
    market = new_market(db)
    status, headers, body = http_get_json(ps.url + PRICE + market)
    assert status == 200
    assert headers["cache-status"] == "price-service; fwd=miss; stored"
    assert headers["content-type"] == "application/json"
    assert body == {"market": market, "price": "64123.450000", "confidence": "12.5",
                    "publish_time": "2026-11-29T20:00:00.123Z", "source": "pyth"}
    status, headers, again = http_get_json(ps.url + PRICE + market)
    assert status == 200
    assert headers["cache-status"] in ("price-service; hit", "price-service; hit; detail=memory")
    assert again == body


def test_redis_holds_only_price_entries(start_daemon, db, servers):
    # A Redis database of its own, so other tests' keys do not count.
    url = servers.env["REDIS_URL"].rsplit("/", 1)[0] + "/7"
    servers.redis_cli("-n", "7", "FLUSHDB")
    ps = start_daemon("price-service", {"REDIS_URL": url})
    market = new_market(db, confidence=None)
    http_request("GET", ps.url + PRICE + market,
                 headers={"Authorization": "Bearer secret-token", "Cookie": "session=abc"})
    http_request("GET", ps.url + PRICE + "NO-SUCH-" + uuid.uuid4().hex[:6])
    http_request("GET", ps.url + "/api/markets/prices?markets=" + market + ",OTHER")
    value = servers.redis_cli("-n", "7", "GET", f"price:v1:{market}")
    assert json.loads(value)["confidence"] is None
    keys = servers.redis_cli("-n", "7", "--scan").split()
    # Refresh locks (price:lock:v1:<market>) hold only a random instance token.
    locks = [k for k in keys if k.startswith("price:lock:v1:")]
    keys = [k for k in keys if k not in locks]
    assert keys and all(k.startswith("price:v1:") for k in keys), keys
    for k in locks:
        assert re.fullmatch(r"[0-9a-f]{16}|", servers.redis_cli("-n", "7", "GET", k))
    for k in keys:
        ttl = int(servers.redis_cli("-n", "7", "PTTL", k))
        assert 0 < ttl <= 1000 or ttl == -2  # every entry expires (-2: expired since the SCAN)
        v = servers.redis_cli("-n", "7", "GET", k)
        assert "secret-token" not in v and "session" not in v


def test_expiry_after_ttl(start_daemon, db, servers):
    ps = start_daemon("price-service", {"CACHE_TTL_MS": "300"})
    market = new_market(db, price="1.5")
    assert http_get_json(ps.url + PRICE + market)[2]["price"] == "1.5"
    ttl = int(servers.redis_cli("PTTL", f"price:v1:{market}"))
    assert 0 < ttl <= 300
    set_price(db, market, "2.5")
    status, headers, body = http_get_json(ps.url + PRICE + market)
    assert body["price"] == "1.5" and "hit" in headers["cache-status"]
    time.sleep(0.35)
    status, headers, body = http_get_json(ps.url + PRICE + market)
    assert body["price"] == "2.5"
    assert headers["cache-status"] == "price-service; fwd=miss; stored"


def test_caching_off_bypasses_redis(start_daemon, db, servers):
    ps = start_daemon("price-service", {"CACHE_ENABLED": "false"})
    market = new_market(db)
    for _ in range(3):
        status, headers, body = http_get_json(ps.url + PRICE + market)
        assert status == 200 and headers["cache-status"] == "price-service; fwd=bypass"
    assert servers.redis_cli("EXISTS", f"price:v1:{market}") == "0"
    assert http_get_json(ps.url + "/api/health/redis")[2] == {"status": "disabled"}
    assert metric(ps, "price_cache_lookups_total", '{result="bypass"}') == 3


def test_unknown_market_is_cached_negatively(start_daemon, servers):
    ps = start_daemon("price-service")
    market = "NOPE-" + uuid.uuid4().hex[:8]
    status, headers, body = http_get_json(ps.url + PRICE + market)
    assert status == 404
    assert body["error"]["code"] == "market_not_found"
    before = metric(ps, "origin_requests_total", '{result="not_found"}')
    for _ in range(5):
        assert http_get_json(ps.url + PRICE + market)[0] == 404
    assert metric(ps, "origin_requests_total", '{result="not_found"}') == before
    assert servers.redis_cli("EXISTS", f"price:v1:{market}") == "1"


@pytest.mark.parametrize("planted", [
    "not json", "[1,2]", '{"market":"X"', "\"a string\"", "12", "{}",
    '{"market":"MARKET","price":"1"} ]}, "injected": true, "x":[{',   # bytes after the object
    '{"market":"OTHER","price":"1"}',                                # another market's
    '{"market":"MARKET"}',                                           # no price
    b'{"market":"MARKET","price":"\xff"}',                          # not UTF-8
    '{"market":"MARKET","price":"1","pad":"' + "x" * 5000 + '"}',    # too big to be ours
])
def test_a_cached_value_that_is_not_a_json_object_is_not_served(start_daemon, db, servers,
                                                                planted):
    """Whatever else can write to the shared Redis (or a value cut short) never reaches a
    client: only exactly one price object of the requested market is served; anything else is
    a miss, logged, and the origin's answer replaces it. Single and batch."""
    ps = start_daemon("price-service")
    market = new_market(db)
    def plant(m):
        value = planted if isinstance(planted, bytes) else planted.encode()
        # Bytes as they are (redis-cli -x takes the last argument from stdin).
        subprocess.run(["redis-cli", "-p", str(servers.redis_port), "-x", "SET",
                        f"price:v1:{m}"], input=value.replace(b"MARKET", m.encode()),
                       check=True, capture_output=True)
        servers.redis_cli("PEXPIRE", f"price:v1:{m}", "900")
    plant(market)
    status, headers, body = http_get_json(ps.url + PRICE + market)
    assert status == 200 and body["market"] == market, body
    assert headers["cache-status"] == "price-service; fwd=miss; stored"
    assert json.loads(servers.redis_cli("GET", f"price:v1:{market}"))["market"] == market
    other = new_market(db)
    plant(other)
    status, _, body = http_get_json(ps.url + "/api/markets/prices?markets=" + other)
    assert status == 200 and [p["market"] for p in body["prices"]] == [other], body
    assert body["prices"][0]["price"] == "64123.450000" and body["missing"] == []
    assert json.loads(servers.redis_cli("GET", f"price:v1:{other}"))["market"] == other
    assert any(e.get("msg", "").startswith("cached price is not this market's price object")
               for e in ps.log_lines())


@pytest.mark.parametrize("px", ["3600000", None])
def test_an_entry_that_outlives_the_ttl_is_not_ours(start_daemon, db, servers, px):
    """A negative entry planted with an hour's expiry (or none) made a real market 404 for that
    long, in Redis and in every replica's memory tier: an entry whose remaining TTL is above
    CACHE_TTL_MS was not written by us, so it is a miss and the origin's answer replaces it."""
    ps = start_daemon("price-service")
    market = new_market(db)
    args = ["SET", f"price:v1:{market}", ""] + (["PX", px] if px else [])
    servers.redis_cli(*args)
    status, headers, body = http_get_json(ps.url + PRICE + market)
    assert status == 200 and body["market"] == market, body
    assert headers["cache-status"] == "price-service; fwd=miss; stored"
    assert 0 < int(servers.redis_cli("PTTL", f"price:v1:{market}")) <= 1000


@pytest.mark.parametrize("query", ["", "?market=", "?market=BTC%20USD", "?market=" + "A" * 65,
                                   "?market=BTC/USD", "?market=%ff", "?other=1", "?market=%zz"])
def test_invalid_market_is_400(start_daemon, query):
    ps = start_daemon("price-service")
    status, headers, body = http_get_json(ps.url + "/api/markets/price" + query)
    assert status == 400
    assert body["error"]["code"] == "invalid_market"
    assert body["error"]["message"]


def test_methods_paths_and_head(start_daemon, db):
    ps = start_daemon("price-service")
    market = new_market(db)
    status, headers, body = http_request("POST", ps.url + PRICE + market, body=b"x")
    assert status == 405
    assert "GET" in headers["allow"] and "HEAD" in headers["allow"]
    assert json.loads(body)["error"]["code"] == "method_not_allowed"
    status, _, body = http_request("GET", ps.url + "/api/nothing")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    status, headers, body = http_request("HEAD", ps.url + PRICE + market)
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0


def test_batch_prices(start_daemon, db):
    ps = start_daemon("price-service")
    a, b = new_market(db, price="10.10"), new_market(db, price="20.20")
    missing = "NOPE-" + uuid.uuid4().hex[:6]
    url = f"{ps.url}/api/markets/prices?markets={a},{missing},{b}"
    for _ in range(2):  # cold, then cached
        status, _, body = http_get_json(url)
        assert status == 200
        assert [p["market"] for p in body["prices"]] == [a, b]
        assert [p["price"] for p in body["prices"]] == ["10.10", "20.20"]
        assert body["missing"] == [missing]
    too_many = ",".join(f"M{i}" for i in range(101))
    status, _, body = http_get_json(f"{ps.url}/api/markets/prices?markets={too_many}")
    assert status == 400 and body["error"]["code"] == "invalid_market"
    assert http_get_json(f"{ps.url}/api/markets/prices?markets=A,,B")[0] == 400
    assert http_get_json(f"{ps.url}/api/markets/prices?markets={a}%00,bad!!")[0] == 400


def test_fifty_concurrent_cold_requests_one_origin_query(start_daemon, db):
    ps = start_daemon("price-service")
    market = new_market(db)
    before = metric(ps, "origin_requests_total", '{result="ok"}') or 0

    def one(_):
        conn = http.client.HTTPConnection("127.0.0.1", ps.port, timeout=10)
        conn.request("GET", PRICE + market)
        r = conn.getresponse()
        r.read()
        conn.close()
        return r.status, r.getheader("Cache-Status")

    # Connect all 50 first so their requests land together.
    socks = []
    for _ in range(50):
        s = socket.create_connection(("127.0.0.1", ps.port))
        socks.append(s)
    req = f"GET {PRICE}{market} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    for s in socks:
        s.sendall(req)
    answers = []
    for s in socks:
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        s.close()
        answers.append(data.decode())
    assert all(a.startswith("HTTP/1.1 200") for a in answers)
    statuses = [re.search(r"Cache-Status: (.*)\r\n", a).group(1) for a in answers]
    assert statuses.count("price-service; fwd=miss; stored") == 1, statuses
    assert metric(ps, "origin_requests_total", '{result="ok"}') - before == 1
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert all(s == 200 for s, _ in pool.map(one, range(16)))


def test_malformed_and_oversized_requests(start_daemon, db):
    ps = start_daemon("price-service")
    market = new_market(db)
    out = raw_exchange(ps.port, b"GARBAGE\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400")
    assert b'"bad_request"' in out
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    out = raw_exchange(ps.port, big)
    assert out.startswith(b"HTTP/1.1 431")
    assert b'"headers_too_large"' in out
    many = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-H%d: 1\r\n" % i for i in range(200)) + b"\r\n"
    assert raw_exchange(ps.port, many).startswith(b"HTTP/1.1 431")
    # Bare CR and obs-fold line folding are request-smuggling vectors: refused.
    assert raw_exchange(ps.port, b"GET /healthz HTTP/1.1\rHost: x\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert raw_exchange(ps.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  folded\r\n\r\n"
                        ).startswith(b"HTTP/1.1 400")
    # Still serving.
    assert http_get_json(ps.url + PRICE + market)[0] == 200


def test_pipelined_requests_answered_in_order(start_daemon, db):
    ps = start_daemon("price-service")
    a, b = new_market(db, price="1.25"), new_market(db, price="2.5")
    req = "".join(f"GET {PRICE}{m} HTTP/1.1\r\nHost: x\r\n\r\n" for m in (a, b, a))
    req += "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    out = raw_exchange(ps.port, req.encode()).decode()
    assert out.count("HTTP/1.1 200") == 4
    bodies = re.findall(r'"market":"(T-[0-9A-F]+)"', out)
    assert bodies == [a, b, a]


def test_redis_down_then_back(start_daemon, db, servers):
    ps = start_daemon("price-service", {"CACHE_MEMORY_ENABLED": "false"})
    market = new_market(db)
    assert http_get_json(ps.url + "/api/health/redis")[0] == 200
    assert metric(ps, "redis_up") == 1
    servers.redis_stop()
    try:
        for _ in range(20):
            status, headers, body = http_get_json(ps.url + PRICE + market)
            assert status == 200 and body["market"] == market
        assert "detail=redis-unavailable" in headers["cache-status"]
        status, _, body = http_get_json(ps.url + "/api/health/redis")
        assert status == 503 and body["status"] == "unavailable" and body["redis"] == "down"
        assert wait_for(lambda: metric(ps, "redis_up") == 0)
    finally:
        servers.redis_start()
    assert wait_for(lambda: http_get_json(ps.url + "/api/health/redis")[0] == 200, timeout=15)
    assert metric(ps, "redis_up") == 1
    http_get_json(ps.url + PRICE + market)
    assert wait_for(lambda: "hit" in http_get_json(ps.url + PRICE + market)[1]["cache-status"])
    errors = [l for l in ps.log_lines() if l.get("level") == "error" and "redis" in l.get("msg", "")]
    assert 1 <= len(errors) <= 2, errors  # once per state change, not per request


def test_redis_stalled_counts_timeouts(start_daemon, db, servers):
    ps = start_daemon("price-service", {"REDIS_TIMEOUT_MS": "50", "CACHE_MEMORY_ENABLED": "false"})
    market = new_market(db)
    servers.redis_cli("CLIENT", "PAUSE", "600", "ALL")
    t0 = time.monotonic()
    status, headers, body = http_get_json(ps.url + PRICE + market)
    elapsed = time.monotonic() - t0
    assert status == 200 and body["market"] == market
    assert elapsed < 0.5
    time.sleep(0.7)
    assert metric(ps, "redis_command_timeouts_total") >= 1


def test_origin_down_is_503_unless_cached(start_daemon, db, servers):
    ps = start_daemon("price-service", {"ORIGIN_TIMEOUT_MS": "300", "CACHE_TTL_MS": "60000"})
    cached = new_market(db)
    assert http_get_json(ps.url + PRICE + cached)[0] == 200
    uncached = new_market(db)
    servers.pg_stop()
    try:
        status, headers, body = http_get_json(ps.url + PRICE + uncached)
        assert status == 503 and body["error"]["code"] == "origin_unavailable"
        assert headers["retry-after"] == "1"
        assert http_get_json(ps.url + PRICE + cached)[0] == 200
        assert wait_for(lambda: http_get_json(ps.url + "/readyz")[0] == 503)
    finally:
        servers.pg_start()
    assert wait_for(lambda: http_get_json(ps.url + "/readyz")[0] == 200, timeout=15)
    assert wait_for(lambda: http_get_json(ps.url + PRICE + uncached)[0] == 200, timeout=10)


def test_sighup_reloads_config_file(start_daemon, db, tmp_path):
    conf = tmp_path / "price.conf"
    conf.write_text("# reloadable settings\nCACHE_ENABLED=true\nCACHE_TTL_MS=1000\n")
    ps = start_daemon("price-service", {"CONFIG_FILE": str(conf)})
    market = new_market(db)
    assert "stored" in http_get_json(ps.url + PRICE + market)[1]["cache-status"]
    conf.write_text("CACHE_ENABLED=false\nLOG_LEVEL=debug\n")
    ps.signal(signal.SIGHUP)
    assert wait_for(lambda: http_get_json(ps.url + PRICE + market)[1]["cache-status"]
                    == "price-service; fwd=bypass")
    conf.write_text("CACHE_TTL_MS=abc\n")
    ps.signal(signal.SIGHUP)
    assert wait_for(lambda: any("CACHE_TTL_MS" in l.get("error", "") for l in ps.log_lines()))
    assert http_get_json(ps.url + PRICE + market)[1]["cache-status"] == "price-service; fwd=bypass"
    # A key the file may not set (a typo, or one read at start-up only) refuses the whole
    # reload, naming it; it used to be ignored without a word.
    conf.write_text("CACHE_ENABLED=true\nCACHE_TLL_MS=500\n")
    ps.signal(signal.SIGHUP)
    assert wait_for(lambda: any("CACHE_TLL_MS is not a key this file can set" in l.get("error", "")
                                for l in ps.log_lines()))
    assert http_get_json(ps.url + PRICE + market)[1]["cache-status"] == "price-service; fwd=bypass"


@pytest.mark.parametrize("content", ["REDIS_URL=redis://elsewhere:6379/0\n", "CACHE_TLL_MS=5\n"])
def test_config_file_with_a_key_it_cannot_set_exits_2(tmp_path, content):
    conf = tmp_path / "price.conf"
    conf.write_text("CACHE_TTL_MS=1000\n" + content)
    if not os.path.exists(binary_path("price-service")):
        pytest.skip("not built")
    env = dict(os.environ, PRICE_SERVICE_LISTEN="127.0.0.1:1", CONFIG_FILE=str(conf))
    r = subprocess.run([binary_path("price-service")], env=env, capture_output=True, text=True,
                       timeout=10)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    key = content.split("=")[0]
    assert len(lines) == 1 and "CONFIG_FILE" in lines[0] and f"{key} is not a key" in lines[0], r.stderr


@pytest.mark.parametrize("env,name", [
    ({"CACHE_TTL_MS": "abc"}, "CACHE_TTL_MS"),
    ({"CACHE_TTL_MS": "0"}, "CACHE_TTL_MS"),
    ({"CACHE_ENABLED": "maybe"}, "CACHE_ENABLED"),
    ({"PRICE_SERVICE_LISTEN": "127.0.0.1:70000"}, "PRICE_SERVICE_LISTEN"),
    ({"REDIS_URL": "http://x"}, "REDIS_URL"),
    ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
    ({"APP_ENV": "Production"}, "APP_ENV"),
    ({"DATABASE_URL": "postgresql://db:70000/markets"}, "DATABASE_URL"),
    ({"DATABASE_URL": "host=db port=abc"}, "DATABASE_URL"),
    ({"DATABASE_URL": "postgresql://u:pw@db/markets?sslmode=bogus"}, "DATABASE_URL"),
    ({"PRICE_SERVICE_LISTEN": "no-such-host.invalid:8080"}, "PRICE_SERVICE_LISTEN"),
    ({"APP_ENV": "production", "REDIS_URL": None}, "REDIS_URL"),
    ({"PRICE_CORS_ALLOWED_ORIGINS": "http://a.example/"}, "PRICE_CORS_ALLOWED_ORIGINS"),
])
def test_bad_configuration_exits_2_naming_the_variable(env, name):
    full = dict(os.environ)
    full.update({"PRICE_SERVICE_LISTEN": "127.0.0.1:1"})
    for k, v in env.items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    if not os.path.exists(binary_path("price-service")):
        pytest.skip("not built")
    r = subprocess.run([binary_path("price-service")], env=full, capture_output=True, text=True,
                       timeout=10)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0], r.stderr


def test_cors_only_for_listed_origins(start_daemon, db):
    """PRICE_CORS_ALLOWED_ORIGINS: a listed Origin may read the price endpoints (errors too) from
    a page served elsewhere (the notifier's dashboard); others get no permission, and unset means
    no CORS header at all."""
    market = new_market(db)
    page = "http://127.0.0.1:8081"
    ps = start_daemon("price-service", {"PRICE_CORS_ALLOWED_ORIGINS": f"https://ops.example, {page}"})
    for path in (PRICE + market, "/api/markets/prices?markets=" + market + ",NOPE",
                 PRICE + "bad%20id", PRICE + "NO-SUCH-" + uuid.uuid4().hex[:6]):
        status, headers, _ = http_request("GET", ps.url + path, headers={"Origin": page})
        assert status in (200, 400, 404), (path, status)
        assert headers.get("access-control-allow-origin") == page, (path, headers)
        assert headers.get("vary") == "Origin"
    status, headers, _ = http_request("GET", ps.url + PRICE + market,
                                      headers={"Origin": "http://elsewhere.example"})
    assert status == 200 and "access-control-allow-origin" not in headers
    assert headers.get("vary") == "Origin"
    assert "cache-status" in headers
    _, headers, _ = http_request("GET", ps.url + "/healthz", headers={"Origin": page})
    assert "access-control-allow-origin" not in headers
    plain = start_daemon("price-service")
    _, headers, _ = http_request("GET", plain.url + PRICE + market, headers={"Origin": page})
    assert "access-control-allow-origin" not in headers and "vary" not in headers


def test_help_and_version():
    if not os.path.exists(binary_path("price-service")):
        pytest.skip("not built")
    r = subprocess.run([binary_path("price-service"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "CACHE_TTL_MS" in r.stdout
    r = subprocess.run([binary_path("price-service"), "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and re.match(r"price-service \d+\.\d+\.\d+", r.stdout)


def test_metrics_exposition(start_daemon, db):
    ps = start_daemon("price-service")
    market = new_market(db)
    for _ in range(3):
        http_request("GET", ps.url + PRICE + market)
    _, headers, body = http_request("GET", ps.url + "/metrics")
    text = body.decode()
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    for name in ["price_cache_lookups_total", "price_cache_hit_ratio", "redis_up",
                 "redis_reconnects_total", "redis_command_timeouts_total",
                 "origin_requests_total", "origin_request_duration_seconds_bucket",
                 "http_requests_total", "http_request_duration_seconds_bucket"]:
        assert re.search(rf"^{name}[{{ ]", text, re.M), name
    assert re.search(r'^http_requests_total\{(code="200",route="/api/markets/price"|'
                     r'route="/api/markets/price",code="200")\} 3$', text, re.M)
    series = [l.rpartition(" ")[0] for l in text.splitlines() if l and not l.startswith("#")]
    assert len(series) == len(set(series)), "a series is given twice"
    promtool = shutil.which("promtool")
    if promtool:
        r = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_latency_report(start_daemon, db):
    """Fires a few thousand requests and reports percentiles; asserts only p95 < 500 ms."""
    ps = start_daemon("price-service")
    markets = [new_market(db) for _ in range(10)]
    conn = http.client.HTTPConnection("127.0.0.1", ps.port, timeout=5)
    lat = []
    for i in range(3000):
        t0 = time.perf_counter()
        conn.request("GET", PRICE + markets[i % 10])
        r = conn.getresponse()
        r.read()
        lat.append(time.perf_counter() - t0)
        assert r.status == 200
    conn.close()
    lat.sort()
    p = lambda q: lat[int(q * (len(lat) - 1))] * 1000
    print(f"\nprice-service latency over {len(lat)} requests (one keep-alive client, "
          f"includes the Python client): p50={p(0.5):.3f} ms p95={p(0.95):.3f} ms "
          f"p99={p(0.99):.3f} ms max={lat[-1]*1000:.3f} ms")
    assert p(0.95) < 500


def test_sigterm_with_a_hung_origin_exits_within_10s(start_daemon, db, servers):
    """A request stuck on the origin (long ORIGIN_TIMEOUT_MS) is answered 503 and the process
    still exits 0 within the contract's 10 s."""
    import psycopg2
    ps = start_daemon("price-service", {"ORIGIN_TIMEOUT_MS": "60000"})
    market = new_market(db)
    locker = psycopg2.connect(servers.psql_dsn())
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE oracle_prices IN ACCESS EXCLUSIVE MODE")
        result = {}

        def ask():
            try:
                result["status"] = http_request("GET", ps.url + PRICE + market, timeout=15)[0]
            except OSError as e:
                result["error"] = e

        import threading
        t = threading.Thread(target=ask)
        t.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        ps.signal(signal.SIGTERM)
        ps.proc.wait(12)
        elapsed = time.monotonic() - t0
        t.join(5)
        assert ps.proc.returncode == 0
        assert elapsed < 10, elapsed
        assert result.get("status") == 503, result
    finally:
        locker.rollback()
        locker.close()
