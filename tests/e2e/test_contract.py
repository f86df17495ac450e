"""The contract in docs/ against the real daemons: every answer here (status, headers, body) is
validated against docs/openapi.yaml, and every WebSocket frame and SSE event against the
message schemas of docs/asyncapi.yaml.

An answer whose status the operation does not document fails, and so does a header the
response marks required that is missing, a header value its schema rejects (Cache-Status
against the documented enum), a Content-Type the response does not list, or a body its
schema rejects. The /sse/orders checks skip while the notifier answers that path 404 (not
built yet).
"""
import http.client
import json
import os
import socket
import time
import uuid

import jsonschema
import psycopg2
import pytest
import websocket
import yaml

from conftest import SOURCE_DIR, free_port, http_request, raw_exchange, wait_for
from test_notifier import (client_frame, close_code_of, drop_outbox_rows,  # noqa: F401
                           make_token, notifier_env, put_outbox_rows, raw_ws, read_frames,
                           recv_json, uid, writer_for, ws_url)
from test_price_service import new_market

DOCS = os.path.join(SOURCE_DIR, "docs")

with open(os.path.join(DOCS, "openapi.yaml")) as f:
    OPENAPI = yaml.safe_load(f)
with open(os.path.join(DOCS, "asyncapi.yaml")) as f:
    ASYNCAPI = yaml.safe_load(f)


# ---- schema helpers -------------------------------------------------------------------------

def pointer(doc, ref):
    assert ref.startswith("#/"), ref
    node = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def inline(doc, node, depth=0):
    """`node` with every local $ref replaced by its target (a $ref beside other keywords becomes
    an allOf of both), so one validator needs no resolver."""
    assert depth < 50, "reference cycle"
    if isinstance(node, list):
        return [inline(doc, n, depth + 1) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = inline(doc, pointer(doc, node["$ref"]), depth + 1)
        rest = {k: inline(doc, v, depth + 1) for k, v in node.items() if k != "$ref"}
        if not rest:
            return target
        return {"allOf": [target, rest]}
    return {k: inline(doc, v, depth + 1) for k, v in node.items()}


def validate(schema, value, what, draft=jsonschema.Draft202012Validator):
    errors = sorted(draft(schema).iter_errors(value), key=lambda e: list(e.path))
    assert not errors, f"{what}: {value!r}\n" + "\n".join(
        f"  at /{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:5])


def schema(name):
    """A schema of openapi.yaml's components, inlined."""
    return inline(OPENAPI, OPENAPI["components"]["schemas"][name])


def response_spec(path, method, status):
    """The documented response, or the answers to any request (x-any-request)."""
    if path is None:
        return inline(OPENAPI, OPENAPI["x-any-request"][method])
    op = OPENAPI["paths"][path][method.lower()]
    resp = op["responses"].get(str(status))
    assert resp is not None, f"{method} {path}: status {status} is not documented"
    return inline(OPENAPI, resp)


def check_http(path, method, status, headers, body, expect=None):
    """Validates one answer against openapi.yaml; returns the parsed JSON body (or None)."""
    what = f"{method} {path or '(any)'} -> {status}"
    if expect is not None:
        assert status == expect, f"{what}: expected {expect}; body {body[:300]!r}"
    spec = response_spec(path, method, status)
    for name, h in (spec.get("headers") or {}).items():
        value = headers.get(name.lower())
        if h.get("required"):
            assert value is not None, f"{what}: no {name} header (documented as required)"
        if value is not None and "schema" in h:
            validate(h["schema"], value, f"{what}: header {name}")
    content = spec.get("content")
    if method == "HEAD" or not content:
        assert body == b"", f"{what}: a body where the spec documents none: {body[:200]!r}"
        return None
    ctype = headers.get("content-type", "")
    media = ctype.split(";")[0].strip()
    assert media in content, f"{what}: Content-Type {ctype!r} is not one of {list(content)}"
    if media != "application/json":
        assert body, f"{what}: empty body"
        return None
    data = json.loads(body)
    validate(content[media]["schema"], data, f"{what}: body")
    return data


def call(daemon, method, path, query="", headers=None, body=None, expect=None, spec_path=None):
    """One request, checked against the operation of `path` (or `spec_path`)."""
    status, h, data = http_request(method, daemon.url + path + query, headers=headers, body=body)
    return status, h, check_http(spec_path or path, method, status, h, data, expect)


def parse_raw(out):
    """(status, headers, body) of one raw HTTP/1.1 answer (Content-Length framed)."""
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body[:int(headers.get("content-length", len(body)))]


def message_schema(name, part="payload"):
    return inline(ASYNCAPI, ASYNCAPI["components"]["messages"][name][part])


def check_frame(name, frame, part="payload"):
    """Validates a WebSocket frame (or SSE data) against an AsyncAPI message (draft 7)."""
    validate(message_schema(name, part), frame, f"asyncapi message {name} ({part})",
             draft=jsonschema.Draft7Validator)
    return frame


def close_codes():
    ch = next(c for c in ASYNCAPI["channels"].values() if c["address"] == "/ws/orders")
    return {c["code"] for c in ch["x-close-codes"]}


# ---- price-service --------------------------------------------------------------------------

PRICE = "/api/markets/price"
PRICES = "/api/markets/prices"


def ready(daemon):
    """Waits for /readyz 200 (a price-service answers 503 until its origin pool is connected,
    a few milliseconds after /healthz)."""
    assert wait_for(lambda: http_request("GET", daemon.url + "/readyz")[0] == 200), daemon.logs()
    return daemon


def test_price_service_answers_match_openapi(start_daemon, db):
    ps = ready(start_daemon("price-service"))
    market = new_market(db, confidence=None)
    _, h, body = call(ps, "GET", PRICE, "?market=" + market, expect=200)
    assert body["market"] == market and body["confidence"] is None
    assert h["cache-status"] == "price-service; fwd=miss; stored"
    _, h, _ = call(ps, "GET", PRICE, "?market=" + market, expect=200)
    assert "hit" in h["cache-status"]
    call(ps, "HEAD", PRICE, "?market=" + market, expect=200)

    nope = "NOPE-" + uuid.uuid4().hex[:8]
    call(ps, "GET", PRICE, "?market=" + nope, expect=404)
    _, h, _ = call(ps, "GET", PRICE, "?market=" + nope, expect=404)  # the negative entry
    assert "hit" in h["cache-status"]
    call(ps, "HEAD", PRICE, "?market=" + nope, expect=404)
    for q in ("", "?market=", "?market=BTC/USD", "?market=" + "A" * 65, "?market=%zz",
              f"?market={market}&market={nope}", f"?market={market}&x=%00"):
        _, _, body = call(ps, "GET", PRICE, q, expect=400)
        assert body["error"]["code"] == "invalid_market"

    _, _, body = call(ps, "GET", PRICES, f"?markets={market},{nope},{market}", expect=200)
    assert [p["market"] for p in body["prices"]] == [market] and body["missing"] == [nope]
    too_many = ",".join(f"M{i}" for i in range(101))
    for q in ("", "?markets=", "?markets=A,,B", "?markets=" + too_many):
        call(ps, "GET", PRICES, q, expect=400)

    _, _, body = call(ps, "GET", "/healthz", expect=200)
    _, _, body = call(ps, "GET", "/readyz", expect=200)
    validate(schema("PriceServiceReadiness"), body, "price-service /readyz")
    _, _, body = call(ps, "GET", "/api/health/redis", expect=200)
    validate(schema("RedisHealthUp"), body, "price-service /api/health/redis")
    _, h, _ = call(ps, "GET", "/metrics", expect=200)
    assert h["content-type"] == "text/plain; version=0.0.4; charset=utf-8"

    # Any path, any method (x-any-request).
    for path, method in ((PRICE, "POST"), ("/healthz", "DELETE"), (PRICES, "PUT")):
        status, h, data = http_request(method, ps.url + path, body=b"x")
        check_http(None, "other-method", status, h, data, expect=405)
    status, h, data = http_request("GET", ps.url + "/api/markets")
    check_http(None, "unknown-path", status, h, data, expect=404)


def test_malformed_requests_match_openapi(start_daemon):
    """The framing errors every operation lists: 400 bad_request, 431, 413."""
    ps = ready(start_daemon("price-service"))
    on = start_daemon("order-notifier", notifier_env())
    for d in (ps, on):
        out = raw_exchange(d.port, b"GARBAGE\r\n\r\n")
        check_http("/healthz", "GET", *parse_raw(out), expect=400)
        out = raw_exchange(d.port, b"GET /healthz HTTP/1.1\r\n\r\n")  # no Host
        check_http("/healthz", "GET", *parse_raw(out), expect=400)
        out = raw_exchange(d.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 +
                           b"\r\n\r\n")
        check_http("/healthz", "GET", *parse_raw(out), expect=431)
        out = raw_exchange(d.port, b"GET /readyz HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n\r\n")
        check_http("/readyz", "GET", *parse_raw(out), expect=413)


def test_every_cache_status_is_documented(start_daemon, db, servers):
    """Each value the daemon sends on a 200, under the conditions that produce it."""
    seen = set()

    def get(d, market, expect=200):
        status, h, _ = call(d, "GET", PRICE, "?market=" + market, expect=expect)
        seen.add(h["cache-status"])
        return h["cache-status"]

    ps = ready(start_daemon("price-service"))
    market = new_market(db)
    assert get(ps, market) == "price-service; fwd=miss; stored"
    assert get(ps, market) in ("price-service; hit", "price-service; hit; detail=memory")
    # Concurrent cold requests share one origin fetch: all but the first are collapsed. The
    # origin is held (a lock on its table) until every request is in.
    cold = new_market(db)
    lock = psycopg2.connect(servers.psql_dsn())
    socks = []
    try:
        with lock.cursor() as cur:
            cur.execute("LOCK TABLE oracle_prices IN ACCESS EXCLUSIVE MODE")
        req = f"GET {PRICE}?market={cold} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        for _ in range(5):
            sock = socket.create_connection(("127.0.0.1", ps.port), timeout=10)
            sock.sendall(req.encode())
            socks.append(sock)
        time.sleep(0.3)
    finally:
        lock.commit()
        lock.close()
    for sock in socks:
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        sock.close()
        status, h, body = parse_raw(data)
        check_http(PRICE, "GET", status, h, body, expect=200)
        seen.add(h["cache-status"])
    assert "price-service; fwd=miss; collapsed" in seen, seen

    # Without the in-process copy, a second request is a Redis hit.
    ps2 = ready(start_daemon("price-service", {"CACHE_MEMORY_ENABLED": "false"}))
    get(ps2, market)
    assert "price-service; hit" in seen, seen
    # And with it, within the entry's life, the memory copy.
    ps3 = ready(start_daemon("price-service", {"CACHE_TTL_MS": "60000"}))
    m3 = new_market(db)
    get(ps3, m3)
    wait_for(lambda: get(ps3, m3) == "price-service; hit; detail=memory", timeout=3)
    assert "price-service; hit; detail=memory" in seen, seen

    ps4 = ready(start_daemon("price-service", {"CACHE_ENABLED": "false"}))
    assert get(ps4, market) == "price-service; fwd=bypass"
    _, _, body = call(ps4, "GET", "/api/health/redis", expect=200)
    validate(schema("RedisHealthDisabled"), body, "price-service /api/health/redis, caching off")

    ps5 = ready(start_daemon("price-service", {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}))
    assert get(ps5, market) == "price-service; fwd=miss; detail=redis-unavailable"
    _, _, body = call(ps5, "GET", "/api/health/redis", expect=503)
    validate(schema("RedisHealthDown"), body, "price-service /api/health/redis, Redis down")
    _, _, body = call(ps5, "GET", "/readyz", expect=200)
    assert body["redis"] == "down"

    # Stale-if-error: the entry expired and the origin times out (its table is locked), so the
    # last value answers, with Age (checked against its schema by call()).
    ps6 = ready(start_daemon("price-service", {"CACHE_TTL_MS": "300", "ORIGIN_TIMEOUT_MS": "200",
                                               "CACHE_STALE_IF_ERROR_MS": "5000",
                                               "CACHE_REFRESH_AHEAD_PCT": "0"}))
    m6 = new_market(db)
    assert get(ps6, m6) == "price-service; fwd=miss; stored"
    lock = psycopg2.connect(servers.psql_dsn())
    try:
        with lock.cursor() as cur:
            cur.execute("LOCK TABLE oracle_prices IN ACCESS EXCLUSIVE MODE")
        time.sleep(0.35)
        _, h, body = call(ps6, "GET", PRICE, "?market=" + m6, expect=200)
        seen.add(h["cache-status"])
        assert h["cache-status"] == "price-service; fwd=stale; detail=origin-error"
        assert h["age"] == "0" and body["market"] == m6
    finally:
        lock.commit()
        lock.close()
    assert seen == set(OPENAPI["components"]["schemas"]["CacheStatusAnswered"]["enum"]), seen


def test_origin_unavailable_matches_openapi(start_daemon, db):
    """503 origin_unavailable with its Cache-Status, Retry-After and body; /readyz 503."""
    dead_pg = f"postgresql://postgres@127.0.0.1:{free_port()}/markets"
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    cases = [
        ({}, "price-service; fwd=miss"),
        ({"REDIS_URL": dead_redis}, "price-service; fwd=miss; detail=redis-unavailable"),
        ({"CACHE_ENABLED": "false"}, "price-service; fwd=bypass"),
    ]
    for env, want in cases:
        ps = start_daemon("price-service", {"DATABASE_URL": dead_pg, "ORIGIN_TIMEOUT_MS": "300", **env})
        market = "T-" + uuid.uuid4().hex[:12].upper()
        _, h, body = call(ps, "GET", PRICE, "?market=" + market, expect=503)
        assert body["error"]["code"] == "origin_unavailable"
        assert h["cache-status"] == want
        call(ps, "HEAD", PRICE, "?market=" + market, expect=503)
        _, _, body = call(ps, "GET", PRICES, f"?markets={market},OTHER", expect=503)
        assert body["error"]["code"] == "origin_unavailable"
        _, _, body = call(ps, "GET", "/readyz", expect=503)
        assert body == {"status": "not_ready", "origin": "down",
                        "redis": "down" if "REDIS_URL" in env else body["redis"]}
        call(ps, "GET", "/healthz", expect=200)


# ---- order-notifier: HTTP -------------------------------------------------------------------

UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
WS = "/ws/orders"


def test_notifier_answers_match_openapi(start_daemon):
    on = start_daemon("order-notifier", notifier_env())
    _, h, _ = call(on, "GET", "/", expect=200)
    assert h["content-type"] == "text/html; charset=utf-8"
    call(on, "GET", "/healthz", expect=200)
    assert wait_for(lambda: http_request("GET", on.url + "/readyz")[0] == 200)
    _, _, body = call(on, "GET", "/readyz", expect=200)
    validate(schema("NotifierReadiness"), body, "order-notifier /readyz")
    _, _, body = call(on, "GET", "/api/health/redis", expect=200)
    validate(schema("RedisHealthUp"), body, "order-notifier /api/health/redis")
    call(on, "GET", "/metrics", expect=200)
    for path in ("/", WS, "/metrics"):
        status, h, data = http_request("POST", on.url + path, body=b"x")
        check_http(None, "other-method", status, h, data, expect=405)
    status, h, data = http_request("GET", on.url + "/index.html")
    check_http(None, "unknown-path", status, h, data, expect=404)

    # A notifier whose Redis is gone: /readyz and /api/health/redis say so, as documented.
    down = start_daemon("order-notifier", notifier_env(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"))
    _, _, body = call(down, "GET", "/readyz", expect=503)
    validate(schema("NotifierReadiness"), body, "order-notifier /readyz, Redis down")
    _, _, body = call(down, "GET", "/api/health/redis", expect=503)
    validate(schema("RedisHealthDown"), body, "order-notifier /api/health/redis, Redis down")


def test_websocket_upgrade_rejections_match_openapi(start_daemon):
    on = start_daemon("order-notifier", notifier_env(WS_ALLOWED_ORIGINS="https://ok.example"))
    good = "?access_token=" + make_token("u1")

    def code(query, headers, expect):
        _, h, body = call(on, "GET", WS, query, headers=headers, expect=expect)
        return h, body["error"]["code"]

    assert code(good, {}, 426)[1] == "upgrade_required"
    assert code(good, {**UPGRADE, "Sec-WebSocket-Version": "8"}, 426)[1] == "unsupported_version"
    assert code(good, {**UPGRADE, "Origin": "https://evil.example"}, 403)[1] == "origin_not_allowed"
    h, c = code("", UPGRADE, 401)
    assert c == "missing_token" and h["www-authenticate"] == 'Bearer realm="order-notifier"'
    for bad in (make_token("u1", secret="wrong"), make_token("u1", exp_in=-5), "not.a.jwt"):
        h, c = code("?access_token=" + bad, UPGRADE, 401)
        assert c == "invalid_token" and 'error="invalid_token"' in h["www-authenticate"]
    h, c = code("", {**UPGRADE, "Authorization": "Bearer " + make_token("u1", alg="none")}, 401)
    assert c == "invalid_token"
    # A token that is there but too long is refused as such, in the header and in the query;
    # a query that cannot be decoded is a bad request, not a missing token.
    long_token = "a" * 4097
    for query, headers in (("", {**UPGRADE, "Authorization": "Bearer " + long_token}),
                           ("?access_token=" + long_token, UPGRADE)):
        _, h, body = call(on, "GET", WS, query, headers=headers, expect=401)
        assert body["error"] == {"code": "invalid_token", "message": "token longer than 4096 bytes"}
        assert 'error="invalid_token"' in h["www-authenticate"]
    assert code("?access_token=%zz", UPGRADE, 400)[1] == "bad_request"
    bearer = {**UPGRADE, "Authorization": "Bearer " + make_token("u1")}
    # Malformed wherever it is, whichever parameter would be read first.
    assert code("?access_token=%zz", bearer, 400)[1] == "bad_request"
    assert code("?x=%00", bearer, 400)[1] == "bad_request"
    # One way, one copy (RFC 6750 section 2); a parameter of ours given twice is refused.
    _, _, body = call(on, "GET", WS, good, headers=bearer, expect=400)
    assert body["error"]["code"] == "bad_request" and "twice" in body["error"]["message"]
    for twice in (good + "&access_token=zzz", good + "&last_event_id=1&last_event_id=2",
                  good + "&last_event_id=1&recent_event_ids=1&recent_event_ids=1"):
        _, _, body = call(on, "GET", WS, twice, headers=UPGRADE, expect=400)
        assert body["error"]["code"] == "bad_request" and "repeated" in body["error"]["message"]
    # "Bearer" then a tab is not the Bearer form: a token that cannot be read, not none.
    tab = {**UPGRADE, "Authorization": "Bearer\t" + make_token("u1")}
    assert code("", tab, 401)[1] == "invalid_token"
    no_key = {k: v for k, v in UPGRADE.items() if k != "Sec-WebSocket-Key"}
    assert code(good, no_key, 400)[1] == "bad_request"
    assert code(good + "&last_event_id=abc", UPGRADE, 400)[1] == "invalid_last_event_id"
    assert code(good + "&last_event_id=-1", UPGRADE, 400)[1] == "invalid_last_event_id"
    # ^[0-9]+$: no sign, no space before the digits (strtoll would skip it), nothing after.
    for bad in ("+5", "%2B5", "%205", "%0A5", "5%20", "0x5", ""):
        assert code(good + "&last_event_id=" + bad, UPGRADE, 400)[1] == "invalid_last_event_id", bad
    # Leading zeros are digits too, however many.
    ws = websocket.create_connection(on.url.replace("http", "ws") + WS + good + "&last_event_id="
                                     + "0" * 40 + "5", timeout=5, origin="https://ok.example")
    assert json.loads(ws.recv())["resumed_from"] == 5
    ws.close()
    assert code(good + "&recent_event_ids=1,2", UPGRADE, 400)[1] == "invalid_recent_event_ids"
    assert code(good + "&last_event_id=5&recent_event_ids=9", UPGRADE, 400)[1] == \
        "invalid_recent_event_ids"
    # The upgrade itself: 101 with the documented headers (Origin listed, token in the header).
    status, h, body = http_request("GET", on.url + WS, headers={
        **UPGRADE, "Origin": "https://ok.example", "Authorization": "Bearer " + make_token("u1")})
    check_http(WS, "GET", status, h, b"", expect=101)
    assert h["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_connection_limit_matches_openapi(start_daemon):
    on = start_daemon("order-notifier", notifier_env(WS_MAX_CONNECTIONS=1))
    ws = websocket.create_connection(ws_url(on, make_token(uid())), timeout=5)
    try:
        check_frame("welcome", json.loads(ws.recv()))
        _, h, body = call(on, "GET", WS, "?access_token=" + make_token(uid()), headers=UPGRADE,
                          expect=503)
        assert body["error"]["code"] == "too_many_connections" and h["retry-after"] == "1"
    finally:
        ws.close()


# ---- order-notifier: WebSocket frames ----------------------------------------------------------

def test_websocket_frames_match_asyncapi(start_daemon, writer_for):
    on = start_daemon("order-notifier", notifier_env())
    w = writer_for(on)
    user = uid()
    ws = websocket.create_connection(ws_url(on, make_token(user)), timeout=5)
    welcome = check_frame("welcome", json.loads(ws.recv()))
    assert welcome == {"type": "welcome", "user_id": user, "resumed_from": None}

    oid = w.create(user, price="100.5")
    created = check_frame("orderUpdate", recv_json(ws))
    assert created["event_type"] == "order.created" and created["order"]["id"] == oid
    w.fill(oid, "1")
    updated = check_frame("orderUpdate", recv_json(ws))
    assert updated["event_type"] == "order.updated" and updated["event_id"] > created["event_id"]
    market_order = w.create(user, price=None)
    m = check_frame("orderUpdate", recv_json(ws))
    assert m["order"]["id"] == market_order and m["order"]["price"] is None

    check_frame("ping", {"type": "ping"})
    ws.send(json.dumps({"type": "ping"}))
    assert check_frame("pong", recv_json(ws)) == {"type": "pong"}
    ws.close()

    # A resume: welcome names it, the missed events come as documented.
    w.fill(oid, "2")
    ws = websocket.create_connection(
        ws_url(on, make_token(user), last_event_id=created["event_id"]), timeout=5)
    welcome = check_frame("welcome", json.loads(ws.recv()))
    assert welcome["resumed_from"] == created["event_id"]
    replayed = [check_frame("orderUpdate", recv_json(ws)) for _ in range(3)]
    assert [f["event_id"] for f in replayed] == w.event_ids(user, after=created["event_id"])
    ws.close()


def test_resume_truncated_matches_asyncapi(start_daemon, writer_for):
    """1001 missed events (outbox rows written directly, far above the sequence): 1000
    order_update frames, then resume_truncated."""
    on = start_daemon("order-notifier", notifier_env())
    w = writer_for(on)
    user = uid()
    base = 7 * 10 ** 11 + uuid.uuid4().int % 10 ** 9
    ids = list(range(base, base + 1001))
    put_outbox_rows(w.conn, user, ids)
    try:
        ws = websocket.create_connection(ws_url(on, make_token(user), last_event_id=base - 1),
                                         timeout=10)
        check_frame("welcome", json.loads(ws.recv()))
        got = []
        while True:
            frame = recv_json(ws, timeout=10)
            if frame["type"] != "order_update":
                break
            got.append(check_frame("orderUpdate", frame)["event_id"])
        check_frame("resumeTruncated", frame)
        assert frame == {"type": "resume_truncated", "limit": 1000,
                         "last_replayed_event_id": ids[999]}
        assert got == ids[:1000]
        ws.close()
    finally:
        drop_outbox_rows(w.conn, ids)


def test_close_codes_are_documented(start_daemon):
    on = start_daemon("order-notifier", notifier_env())
    documented = close_codes()
    token = make_token(uid())
    cases = [
        (client_frame(1, b"x" * 5000), 1009),             # over 4 KiB
        (client_frame(1, b"a\xc3\x28z"), 1007),           # invalid UTF-8
        (client_frame(1, b"{}", masked=False), 1002),     # unmasked
        (client_frame(8, b"\x03\xe8"), 1000),             # the client's normal close, answered
    ]
    for frame, want in cases:
        s = raw_ws(on, token)
        try:
            s.sendall(frame)
            got = close_code_of(read_frames(s))
        finally:
            s.close()
        assert got == want and got in documented, (want, got, documented)
    # Token expiry: 1008.
    s = raw_ws(on, make_token(uid(), exp_in=2))
    try:
        got = close_code_of(read_frames(s, timeout=5))
    finally:
        s.close()
    assert got == 1008 and got in documented


# ---- order-notifier: Server-Sent Events -------------------------------------------------------

SSE = "/sse/orders"


def sse_or_skip(on):
    status, _, _ = http_request("GET", on.url + SSE)
    if status == 404:
        pytest.skip("GET /sse/orders answers 404: the notifier does not serve it yet")
    return status


class SseStream:
    """A GET /sse/orders kept open; next_event() parses the text/event-stream format."""

    def __init__(self, on, token=None, last_event_id=None, headers=None, timeout=5):
        self.conn = http.client.HTTPConnection("127.0.0.1", on.port, timeout=timeout)
        h = {"Accept": "text/event-stream", **(headers or {})}
        if token:
            h["Authorization"] = "Bearer " + token
        if last_event_id is not None:
            h["Last-Event-ID"] = str(last_event_id)
        self.conn.request("GET", SSE, headers=h)
        # The stream ends with the connection (no length): http.client hands the socket to the
        # response and forgets it, so keep it for the read timeouts.
        self.sock = self.conn.sock
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.headers = {k.lower(): v for k, v in self.resp.getheaders()}
        self.comments = 0

    def next_event(self, timeout=5):
        """{"fields": {name: value} (id, event, retry), "data": the joined data lines}."""
        self.sock.settimeout(timeout)
        fields, data = {}, []
        while True:
            line = self.resp.readline()
            if not line:
                raise ConnectionError("the stream ended")
            line = line.decode().rstrip("\r\n")
            if line == "":
                # An event is dispatched only with data (a lone `retry:` just sets the delay).
                if data:
                    return {"fields": fields, "data": "\n".join(data)}
                self.retry = fields.get("retry", getattr(self, "retry", None))
                fields = {}
                continue
            if line.startswith(":"):
                self.comments += 1
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            else:
                fields[name] = value

    def close(self):
        self.conn.close()


def check_sse(event, message):
    """An SSE event against its AsyncAPI message: `data` the payload, the fields the headers."""
    check_frame(message, event["fields"], part="headers")
    return check_frame(message, json.loads(event["data"]))


def test_sse_rejections_match_openapi(start_daemon):
    on = start_daemon("order-notifier", notifier_env(WS_ALLOWED_ORIGINS="https://ok.example"))
    sse_or_skip(on)
    good = {"Authorization": "Bearer " + make_token("u1")}
    _, h, body = call(on, "GET", SSE, expect=401)
    assert body["error"]["code"] == "missing_token"
    _, h, body = call(on, "GET", SSE, "?access_token=" + make_token("u1", exp_in=-5), expect=401)
    assert body["error"]["code"] == "invalid_token"
    _, _, body = call(on, "GET", SSE, headers={**good, "Origin": "https://evil.example"},
                      expect=403)
    assert body["error"]["code"] == "origin_not_allowed"
    _, _, body = call(on, "GET", SSE, headers={**good, "Last-Event-ID": "abc"}, expect=400)
    assert body["error"]["code"] == "invalid_last_event_id"
    status, h, data = http_request("POST", on.url + SSE, body=b"x")
    check_http(None, "other-method", status, h, data, expect=405)


def test_sse_stream_matches_asyncapi(start_daemon, writer_for):
    on = start_daemon("order-notifier", notifier_env(WS_PING_INTERVAL_MS=300))
    sse_or_skip(on)
    w = writer_for(on)
    user = uid()
    s = SseStream(on, make_token(user))
    try:
        # The headers only: the body is the stream read below (b"..." stands for it).
        check_http(SSE, "GET", s.status, s.headers, b"...", expect=200)
        welcome = check_sse(s.next_event(), "sseWelcome")
        assert welcome == {"type": "welcome", "user_id": user, "resumed_from": None}
        oid = w.create(user)
        ev = s.next_event()
        frame = check_sse(ev, "sseOrderUpdate")
        assert ev["fields"]["id"] == str(frame["event_id"]) and frame["order"]["id"] == oid
        first = frame["event_id"]
        # Heartbeats: comment lines while nothing happens.
        time.sleep(1)
        w.fill(oid, "1")
        check_sse(s.next_event(), "sseOrderUpdate")
        assert s.comments >= 1, "no comment heartbeat in a second (WS_PING_INTERVAL_MS=300)"
    finally:
        s.close()
    # Last-Event-ID resumes: the missed events, with their ids.
    s = SseStream(on, make_token(user), last_event_id=first)
    try:
        assert s.status == 200
        welcome = check_sse(s.next_event(), "sseWelcome")
        assert welcome["resumed_from"] == first
        ev = s.next_event()
        frame = check_sse(ev, "sseOrderUpdate")
        assert frame["event_id"] == w.event_ids(user, after=first)[0]
    finally:
        s.close()
    # The token in the query, for EventSource.
    conn = http.client.HTTPConnection("127.0.0.1", on.port, timeout=5)
    try:
        conn.request("GET", SSE + "?access_token=" + make_token(user))
        r = conn.getresponse()
        assert r.status == 200
        assert r.getheader("content-type", "").split(";")[0] == "text/event-stream"
    finally:
        conn.close()
