"""order-notifier end to end: real Postgres, Redis and daemons, WebSocket clients.

Every test uses its own PG_CHANNEL, advisory lock key and user ids, so tests never see each
other's events. start_daemon sets the database's markets.order_channel (which the trigger
reads and the notifier checks at start) to the test's channel, as a deployment would; the
writer also sets it in its own session, so its events go to its test's channel whatever
another test set since.
The helpers here are shared with test_notifier_faults.py.
"""
import base64
import hashlib
import hmac
import json
import os
import socket
import struct
import threading
import time
import uuid

import psycopg2
import pytest
import websocket

from conftest import http_request, metric, wait_for

SECRET = "e2e-secret-for-the-order-notifier-tests"


# ---- helpers ---------------------------------------------------------------------------------

def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_token(sub, exp_in=3600, scope=None, alg="HS256", secret=SECRET, claims=None):
    header = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = {"sub": sub, "exp": int(time.time()) + exp_in} if claims is None else claims
    if scope:
        body["scope"] = scope
    payload = b64url(json.dumps(body).encode())
    signing = f"{header}.{payload}".encode()
    sig = b64url(hmac.new(secret.encode(), signing, hashlib.sha256).digest()) if alg != "none" else ""
    return f"{header}.{payload}.{sig}"


def uid(prefix="u"):
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def notifier_env(**extra):
    """Settings of one test: own channel and lock so concurrent leftovers cannot interfere."""
    env = {
        "JWT_SECRET": SECRET,
        "PG_CHANNEL": "t_" + uuid.uuid4().hex[:12],
        "NOTIFIER_LOCK_KEY": str(int(uuid.uuid4().int % 2_000_000_000)),
        "NOTIFIER_LOCK_RETRY_MS": "200",
        "NOTIFIER_LIVENESS_MS": "500",
        "REDIS_TIMEOUT_MS": "500",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Writer:
    """A Postgres session whose order changes NOTIFY the test's channel."""

    def __init__(self, servers, channel):
        self.conn = psycopg2.connect(servers.psql_dsn())
        self.conn.autocommit = True
        with self.conn.cursor() as cur:
            cur.execute("SELECT set_config('markets.order_channel', %s, false)", (channel,))

    def create(self, user, market="BTC-USD", side="buy", price="100.5", quantity="2"):
        with self.conn.cursor() as cur:
            cur.execute("INSERT INTO orders (user_id, market, side, price, quantity) "
                        "VALUES (%s, %s, %s, %s, %s) RETURNING id",
                        (user, market, side, price, quantity))
            return cur.fetchone()[0]

    def fill(self, order_id, filled):
        with self.conn.cursor() as cur:
            cur.execute("UPDATE orders SET filled_quantity = %s, status = 'partially_filled', "
                        "updated_at = now() WHERE id = %s", (filled, order_id))

    def last_event_id(self, user):
        with self.conn.cursor() as cur:
            cur.execute("SELECT max(id) FROM order_events WHERE user_id = %s", (user,))
            return cur.fetchone()[0] or 0

    def event_ids(self, user, after=0):
        with self.conn.cursor() as cur:
            cur.execute("SELECT id FROM order_events WHERE user_id = %s AND id > %s ORDER BY id",
                        (user, after))
            return [r[0] for r in cur.fetchall()]

    def close(self):
        self.conn.close()


def put_outbox_rows(conn, user, ids):
    """Writes outbox rows with chosen ids (no NOTIFY): ids far above the sequence, removed first
    so a rerun against the same database starts clean."""
    order = {"id": 1, "user_id": user, "market": "BTC-USD", "side": "buy", "price": "1",
             "quantity": "1", "filled_quantity": "0", "status": "open",
             "updated_at": "2026-11-29T20:00:00.000000Z"}
    with conn.cursor() as cur:
        cur.execute("DELETE FROM order_events WHERE id = ANY(%s)", (list(ids),))
        cur.execute("INSERT INTO order_events (id, order_id, user_id, event_type, payload) "
                    "OVERRIDING SYSTEM VALUE SELECT i, 1, %s, 'order.updated', %s::jsonb "
                    "FROM unnest(%s::bigint[]) AS i", (user, json.dumps(order), list(ids)))


def drop_outbox_rows(conn, ids):
    with conn.cursor() as cur:
        cur.execute("DELETE FROM order_events WHERE id = ANY(%s)", (list(ids),))


@pytest.fixture
def writer_for(servers):
    made = []

    def make(daemon):
        w = Writer(servers, daemon.env["PG_CHANNEL"])
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


def ws_url(daemon, token=None, last_event_id=None, recent=None):
    url = f"ws://127.0.0.1:{daemon.port}/ws/orders"
    params = []
    if token:
        params.append("access_token=" + token)
    if last_event_id is not None:
        params.append(f"last_event_id={last_event_id}")
    if recent is not None:
        params.append("recent_event_ids=" + ",".join(str(i) for i in recent))
    return url + ("?" + "&".join(params) if params else "")


def connect(daemon, user, scope=None, last_event_id=None, timeout=5, recent=None, **kw):
    """Connects, checks the welcome frame, returns the socket."""
    ws = websocket.create_connection(
        ws_url(daemon, make_token(user, scope=scope), last_event_id, recent), timeout=timeout, **kw)
    welcome = json.loads(ws.recv())
    assert welcome == {"type": "welcome", "user_id": user, "resumed_from": last_event_id}
    return ws


def recv_json(ws, timeout=5):
    ws.settimeout(timeout)
    while True:
        op, data = ws.recv_data(control_frame=False)
        if op == websocket.ABNF.OPCODE_TEXT:
            return json.loads(data)
        if op == websocket.ABNF.OPCODE_CLOSE:
            raise ConnectionError(f"closed {struct.unpack('!H', data[:2])[0] if data else None}")


def recv_updates(ws, count, timeout=10):
    """Reads `count` order_update frames (other frames are skipped)."""
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            msg = recv_json(ws, timeout=left)
        except websocket.WebSocketTimeoutException:
            break
        if msg.get("type") == "order_update":
            out.append(msg)
    return out


def recv_until_quiet(ws, quiet=0.5):
    out = []
    while True:
        try:
            msg = recv_json(ws, timeout=quiet)
        except websocket.WebSocketTimeoutException:
            return out
        if msg.get("type") == "order_update":
            out.append(msg)


def recv_for(ws, seconds):
    """The order_update frames that arrive within `seconds` (a stream that never goes quiet)."""
    out = []
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return out
        try:
            msg = recv_json(ws, timeout=left)
        except websocket.WebSocketTimeoutException:
            return out
        if msg.get("type") == "order_update":
            out.append(msg)


def close_code(ws, timeout=5):
    """Reads until a close frame and returns its status code (None without one)."""
    ws.settimeout(timeout)
    while True:
        try:
            op, data = ws.recv_data(control_frame=True)
        except (websocket.WebSocketConnectionClosedException, ConnectionError):
            return None
        if op == websocket.ABNF.OPCODE_CLOSE:
            return struct.unpack("!H", data[:2])[0] if len(data) >= 2 else 0


def wait_leader(*daemons, timeout=10):
    def one():
        leaders = [d for d in daemons if metric(d, "notifier_leader") == 1]
        return leaders[0] if len(leaders) == 1 else None
    leader = wait_for(one, timeout)
    assert leader, "no single leader"
    return leader


def raw_ws(daemon, token, extra_headers=b"", rcvbuf=None, welcome=True):
    """A raw socket after a successful upgrade (for frames a client library will not send, and
    close codes such as 1013 that websocket-client refuses to parse)."""
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(5)
    s.connect(("127.0.0.1", daemon.port))
    key = base64.b64encode(os.urandom(16))
    s.sendall(b"GET /ws/orders?access_token=" + token.encode() + b" HTTP/1.1\r\n"
              b"Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n" +
              extra_headers + b"\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    expect = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    assert b"Sec-WebSocket-Accept: " + expect in head
    if welcome:
        # The welcome frame (short, unmasked): 2 header bytes then the JSON.
        hdr = s.recv(2, socket.MSG_WAITALL)
        assert hdr[0] == 0x81 and hdr[1] < 126, hdr
        assert json.loads(s.recv(hdr[1], socket.MSG_WAITALL))["type"] == "welcome"
    return s


def client_frame(opcode, payload, fin=True, masked=True):
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", first, mask_bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def read_frames(s, timeout=3):
    """Server frames until EOF: [(opcode, payload)]."""
    s.settimeout(timeout)
    buf = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    frames, i = [], 0
    while i + 2 <= len(buf):
        op, n = buf[i] & 0x0F, buf[i + 1] & 0x7F
        i += 2
        if n == 126:
            n = struct.unpack("!H", buf[i:i + 2])[0]
            i += 2
        elif n == 127:
            n = struct.unpack("!Q", buf[i:i + 8])[0]
            i += 8
        frames.append((op, buf[i:i + n]))
        i += n
    return frames


def close_code_of(frames):
    for op, data in frames:
        if op == 8:
            return struct.unpack("!H", data[:2])[0] if len(data) >= 2 else 0
    return None


# ---- tests -----------------------------------------------------------------------------------

def test_handshake_rejections(start_daemon):
    on = start_daemon("order-notifier", notifier_env(WS_ALLOWED_ORIGINS="https://ok.example"))
    base = f"{on.url}/ws/orders"
    up = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
          "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    good = make_token("u1")
    # A plain GET: 426 with the protocol to switch to.
    status, headers, body = http_request("GET", base + "?access_token=" + good)
    assert status == 426 and headers["upgrade"] == "websocket"
    assert json.loads(body)["error"]["code"] == "upgrade_required"
    # Tokens: missing, wrong signature, expired, alg none, no sub.
    assert http_request("GET", base, headers=up)[0] == 401
    for bad in (make_token("u1", secret="wrong"), make_token("u1", exp_in=-5),
                make_token("u1", alg="none"), make_token(None, claims={"exp": 2**40}),
                "not.a.jwt"):
        status, headers, _ = http_request("GET", base + "?access_token=" + bad, headers=up)
        assert status == 401, bad
        assert headers["www-authenticate"].startswith("Bearer")
    # Origin: listed passes, others 403 (before the token is even looked at).
    status, headers, _ = http_request("GET", base + "?access_token=" + good,
                                      headers={**up, "Origin": "https://evil.example"})
    assert status == 403
    status, headers, _ = http_request("GET", base, headers={**up, "Origin": "https://ok.example",
                                                            "Authorization": "Bearer " + good})
    assert status == 101 and headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    # Resume ids must be numbers.
    status, _, _ = http_request("GET", base + "?last_event_id=abc&access_token=" + good, headers=up)
    assert status == 400


def test_connection_limit(start_daemon):
    on = start_daemon("order-notifier", notifier_env(WS_MAX_CONNECTIONS=2))
    a, b = connect(on, uid()), connect(on, uid())
    with pytest.raises(websocket.WebSocketBadStatusException) as err:
        websocket.create_connection(ws_url(on, make_token(uid())), timeout=5)
    assert err.value.status_code == 503
    a.close()
    wait_for(lambda: metric(on, "ws_connections") == 1)
    connect(on, uid()).close()
    b.close()


def test_update_reaches_only_its_user(start_daemon, writer_for):
    # A new leader's catch-up re-publishes the look-back window, which after the delivery and
    # failover tests holds a hundred thousand other events: the orders:read:all client below
    # would first read those. This test is about routing, not catch-up: a short look-back.
    on = start_daemon("order-notifier", notifier_env(NOTIFIER_CATCHUP_LOOKBACK_MS=200))
    w = writer_for(on)
    alice, bob = uid("alice"), uid("bob")
    wa, wb = connect(on, alice), connect(on, bob)
    ops = connect(on, uid("ops"), scope="orders:read orders:read:all")
    oid = w.create(alice)
    w.fill(oid, "1")
    got = recv_updates(wa, 2)
    assert [m["event_type"] for m in got] == ["order.created", "order.updated"]
    assert got[1]["order"] == {
        "id": oid, "user_id": alice, "market": "BTC-USD", "side": "buy", "price": "100.5",
        "quantity": "2", "filled_quantity": "1", "status": "partially_filled",
        "updated_at": got[1]["order"]["updated_at"]}
    assert got[0]["event_id"] < got[1]["event_id"]
    assert recv_until_quiet(wb, 0.5) == []
    # orders:read:all sees every user: a new leader's catch-up may re-publish other tests'
    # recent events to it first.
    seen = []
    deadline = time.monotonic() + 10
    while len(seen) < 2 and time.monotonic() < deadline:
        seen += [m["event_id"] for m in recv_updates(ops, 1, timeout=1)
                 if m["order"]["user_id"] == alice]
    assert seen == [m["event_id"] for m in got]
    # The application-level ping.
    wa.send('{"type":"ping"}')
    assert recv_json(wa) == {"type": "pong"}
    for s in (wa, wb, ops):
        s.close()
    assert metric(on, "order_events_published_total") >= 2
    assert metric(on, "notifier_leader") == 1


def test_allow_list_keeps_other_columns_out(start_daemon, writer_for, servers):
    """A column added to orders later never reaches Redis or a socket, even if a payload (the
    trigger's, or a hand-written NOTIFY) carries it."""
    on = start_daemon("order-notifier", notifier_env())
    w = writer_for(on)
    user = uid()
    with w.conn.cursor() as cur:
        cur.execute("ALTER TABLE orders ADD COLUMN IF NOT EXISTS email text")
        cur.execute("ALTER TABLE orders ADD COLUMN IF NOT EXISTS note text")
    # Listen on Redis directly, as another replica would.
    r = socket.create_connection(("127.0.0.1", servers.redis_port), timeout=5)
    chan = f"orders:user:{user}".encode()
    r.sendall(b"*2\r\n$9\r\nSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(chan), chan))
    r.recv(4096)
    ws = connect(on, user)
    with w.conn.cursor() as cur:
        cur.execute("INSERT INTO orders (user_id, market, side, price, quantity, email, note) "
                    "VALUES (%s, 'ETH-USD', 'sell', 10, 1, 'leak@example.com', 'SECRET-NOTE') "
                    "RETURNING id", (user,))
        oid = cur.fetchone()[0]
        # A hostile outbox row and NOTIFY with extra fields, as a careless trigger might write.
        payload = {"id": oid, "user_id": user, "market": "ETH-USD", "side": "sell",
                   "price": "10", "quantity": "1", "filled_quantity": "0", "status": "open",
                   "updated_at": "2026-11-29T20:00:00.000000Z", "email": "leak@example.com",
                   "note": "SECRET-NOTE", "wallet": {"key": "SECRET-KEY"}}
        cur.execute("INSERT INTO order_events (order_id, user_id, event_type, payload) "
                    "VALUES (%s, %s, 'order.updated', %s) RETURNING id",
                    (oid, user, json.dumps(payload)))
        eid = cur.fetchone()[0]
        cur.execute("SELECT pg_notify(%s, %s)", (on.env["PG_CHANNEL"], json.dumps(
            {"id": eid, "user_id": user, "event_type": "order.updated",
             "created_at": str(time.time()), "order": payload})))
    got = recv_updates(ws, 2)
    assert len(got) == 2
    for m in got:
        assert set(m["order"]) == {"id", "user_id", "market", "side", "price", "quantity",
                                   "filled_quantity", "status", "updated_at"}
    time.sleep(0.3)
    r.settimeout(1)
    redis_bytes = b""
    try:
        while True:
            chunk = r.recv(65536)
            if not chunk:
                break
            redis_bytes += chunk
    except socket.timeout:
        pass
    r.close()
    assert redis_bytes.count(b"message") >= 2
    for secret in (b"leak@example.com", b"SECRET-NOTE", b"SECRET-KEY", b"email", b"wallet"):
        assert secret not in redis_bytes
    ws.close()


def test_big_event_is_read_from_the_outbox(start_daemon, writer_for):
    """Over 8000 bytes the NOTIFY carries only the id; the event still arrives whole."""
    on = start_daemon("order-notifier", notifier_env())
    w = writer_for(on)
    user = uid()
    ws = connect(on, user)
    market = "M" * 9000
    w.create(user, market=market)
    got = recv_updates(ws, 1)
    assert got and got[0]["order"]["market"] == market
    ws.close()


def test_resume_gives_exactly_the_missed_events(start_daemon, writer_for):
    on = start_daemon("order-notifier", notifier_env())
    w = writer_for(on)
    user = uid()
    ws = connect(on, user)
    oid = w.create(user)
    first = recv_updates(ws, 1)[0]["event_id"]
    ws.close()
    for i in range(5):
        w.fill(oid, str(i + 1))
    missed = w.event_ids(user, after=first)
    assert len(missed) == 5
    ws = connect(on, user, last_event_id=first)
    got = recv_updates(ws, 5)
    assert [m["event_id"] for m in got] == missed
    assert got[-1]["order"]["filled_quantity"] == "5"
    # Then live ones, with nothing repeated.
    w.fill(oid, "1.5")
    live = recv_updates(ws, 1)
    assert live and live[0]["event_id"] == w.last_event_id(user)
    assert recv_until_quiet(ws, 0.5) == []
    ws.close()
    assert metric(on, "ws_resumes_total") == 1


def test_resume_orders_ids_by_number_not_text(start_daemon, writer_for):
    """Missed ids of different lengths (99999999999 then 100000000000) come in numeric order:
    the replay must not sort the text it selects."""
    on = start_daemon("order-notifier", notifier_env())
    w = writer_for(on)
    user = uid()
    d = 10 ** 11
    ids = [d - 2, d - 1, d, d + 1, d + 2]
    put_outbox_rows(w.conn, user, ids)
    try:
        ws = connect(on, user, last_event_id=d - 3)
        got = [m["event_id"] for m in recv_updates(ws, 5)]
        assert got == ids
        assert recv_until_quiet(ws, 0.3) == []
        ws.close()
    finally:
        drop_outbox_rows(w.conn, ids)


def test_live_sibling_keeps_events_a_resuming_client_replays(start_daemon, writer_for, servers):
    """Two sockets of one user on one replica: a live one, and one that resumes (again and
    again) while events keep committing. What the resuming one replays must still reach the
    live one when it arrives through Redis; each gets every event exactly once."""
    on = start_daemon("order-notifier", notifier_env())
    w = writer_for(on)
    user = uid()
    live = connect(on, user)
    oid = w.create(user)
    stop = threading.Event()
    live_got = []

    def read_live():
        while not stop.is_set():
            live_got.extend(m["event_id"] for m in recv_updates(live, 1000, timeout=0.2))

    def keep_writing():
        w2 = Writer(servers, on.env["PG_CHANNEL"])
        n = 0
        while not stop.is_set():
            w2.fill(oid, str(n))
            n += 1
            time.sleep(0.001)
        w2.close()

    reader = threading.Thread(target=read_live)
    writer = threading.Thread(target=keep_writing)
    reader.start()
    writer.start()
    try:
        for _ in range(8):
            time.sleep(0.1)
            start = max(w.last_event_id(user) - 20, 0)
            before = w.event_ids(user, after=start)  # the replay has these at least
            r = connect(on, user, last_event_id=start)
            got = [m["event_id"] for m in recv_for(r, 0.3)]
            r.close()
            assert len(got) == len(set(got)), "resuming client got duplicates"
            assert set(before) <= set(got), "resume gap"
    finally:
        time.sleep(0.2)
        stop.set()
        writer.join()
    time.sleep(0.5)
    reader.join()
    live_got += [m["event_id"] for m in recv_until_quiet(live, 0.5)]
    expected = w.event_ids(user)
    assert len(live_got) == len(set(live_got)), "live client got duplicates"
    missing = sorted(set(expected) - set(live_got))
    assert not missing, f"live client lost {len(missing)} of {len(expected)}: {missing[:10]}"
    live.close()


def test_resume_with_recent_ids_gets_late_committers(start_daemon, writer_for, servers):
    """Ids commit out of order: two transactions take lower ids, a third commits a higher one
    that the client sees, then the client drops. One low one commits while it is away, the
    other after it resumed. With recent_event_ids (the ids it has) the resumed client gets
    both, each once, and nothing it already had."""
    on = start_daemon("order-notifier", notifier_env())
    w = writer_for(on)
    user = uid()
    ws = connect(on, user)
    oid = w.create(user)
    others = [w.create(user), w.create(user)]  # one order each: no row lock between them
    slow = []
    for o in others:  # open transactions holding the next two ids
        t = Writer(servers, on.env["PG_CHANNEL"])
        t.conn.autocommit = False
        t.fill(o, "0.5")
        slow.append(t)
    w.fill(oid, "1")
    have = [m["event_id"] for m in recv_updates(ws, 4)]
    ws.close()
    last = max(have)
    slow[0].conn.commit()  # committed while the client is away
    w.fill(oid, "1.5")
    away = w.event_ids(user, after=0)
    missed = sorted(set(away) - set(have))
    assert len(missed) == 2 and missed[0] < last < missed[1]
    # Without the list, a resume keeps today's rule (nothing at or below last_event_id).
    plain = connect(on, user, last_event_id=last)
    assert [m["event_id"] for m in recv_updates(plain, 1)] == [missed[1]]
    plain.close()
    ws = connect(on, user, last_event_id=last, recent=have)
    got = [m["event_id"] for m in recv_updates(ws, 2)]
    assert got == missed
    slow[1].conn.commit()  # a lower id again, now arriving live
    late = w.event_ids(user, after=0)
    got += [m["event_id"] for m in recv_updates(ws, 1)]
    got += [m["event_id"] for m in recv_until_quiet(ws, 0.5)]
    assert sorted(got) == sorted(set(late) - set(have))
    assert len(got) == len(set(got))
    ws.close()
    for t in slow:
        t.close()
    # The list needs last_event_id, and no id in it may be above it.
    up = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
          "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    base = f"{on.url}/ws/orders?access_token={make_token(user)}"
    for q in ("&recent_event_ids=1", f"&last_event_id=5&recent_event_ids=6",
              "&last_event_id=5&recent_event_ids=1,x", "&last_event_id=5&recent_event_ids=",
              "&last_event_id=999&recent_event_ids=" + ",".join(["1"] * 257)):
        assert http_request("GET", base + q, headers=up)[0] == 400, q


def test_resume_while_events_keep_committing(start_daemon, writer_for, servers):
    """Replay and live events overlap: the client gets every event once, in a consistent order."""
    on = start_daemon("order-notifier", notifier_env())
    w = writer_for(on)
    user = uid()
    oid = w.create(user)
    for i in range(300):
        w.fill(oid, str(i))
    start = w.last_event_id(user) - 200
    stop = threading.Event()

    def keep_writing():
        w2 = Writer(servers, on.env["PG_CHANNEL"])
        n = 0
        while not stop.is_set():
            w2.fill(oid, str(1000 + n))
            n += 1
            time.sleep(0.002)
        w2.close()

    t = threading.Thread(target=keep_writing)
    t.start()
    try:
        time.sleep(0.1)
        ws = connect(on, user, last_event_id=start)
        got = recv_updates(ws, 250, timeout=10)
        time.sleep(0.3)
    finally:
        stop.set()
        t.join()
    got += recv_until_quiet(ws, 1.0)
    ids = [m["event_id"] for m in got]
    assert len(ids) == len(set(ids)), "duplicate events"
    expected = w.event_ids(user, after=start)
    assert ids[:200] == expected[:200]  # the replay, in id order
    assert sorted(ids) == expected      # then every live event, none missing
    ws.close()


def test_two_replicas_deliver_each_event_once(start_daemon, writer_for):
    env = notifier_env()
    a = start_daemon("order-notifier", env)
    b = start_daemon("order-notifier", env)
    leader = wait_leader(a, b)
    assert metric(a, "notifier_leader") + metric(b, "notifier_leader") == 1
    w = writer_for(a)
    user = uid()
    ca, cb = connect(a, user), connect(b, user)
    oid = w.create(user)
    for i in range(20):
        w.fill(oid, str(i))
    expected = w.event_ids(user)
    for c in (ca, cb):
        got = [m["event_id"] for m in recv_updates(c, len(expected))]
        got += [m["event_id"] for m in recv_until_quiet(c, 0.5)]
        assert got == expected
        c.close()
    standby = b if leader is a else a
    assert metric(standby, "order_events_published_total") == 0


def test_bad_frames_get_the_right_close_code(start_daemon):
    on = start_daemon("order-notifier", notifier_env())
    cases = [
        (client_frame(1, b"hi", masked=False), 1002),                 # unmasked client frame
        (client_frame(1, b"a\xc3\x28z"), 1007),                       # invalid UTF-8
        (client_frame(1, b"x" * 5000), 1009),                         # over 4 KiB
        (client_frame(1, b"x" * 3000, fin=False) +
         client_frame(0, b"x" * 3000), 1009),                         # fragments over 4 KiB
        (client_frame(3, b"x"), 1002),                                # reserved opcode
        (client_frame(0, b"x"), 1002),                                # continuation of nothing
    ]
    for data, code in cases:
        s = raw_ws(on, make_token(uid()))
        s.sendall(data)
        frames = read_frames(s)
        s.close()
        assert close_code_of(frames) == code, (data[:8], frames)
    # Fragmented text with a ping in the middle is fine, and a ping gets its pong.
    s = raw_ws(on, make_token(uid()))
    s.sendall(client_frame(1, b'{"type":', fin=False) + client_frame(9, b"p") +
              client_frame(0, b'"ping"}'))
    frames = read_frames(s, timeout=0.5)
    assert (10, b"p") in frames and (1, b'{"type":"pong"}') in frames, frames
    s.sendall(client_frame(8, struct.pack("!H", 1000)))
    assert close_code_of(read_frames(s)) == 1000
    s.close()
    assert http_request("GET", on.url + "/healthz")[0] == 200


def test_token_expiry_closes_with_1008(start_daemon):
    on = start_daemon("order-notifier", notifier_env())
    ws = websocket.create_connection(ws_url(on, make_token(uid(), exp_in=2)), timeout=5)
    t0 = time.monotonic()
    assert close_code(ws, timeout=5) == 1008
    assert 0.5 < time.monotonic() - t0 < 4


def test_silent_client_is_closed_and_pings_are_sent(start_daemon):
    on = start_daemon("order-notifier", notifier_env(WS_PING_INTERVAL_MS=300))
    s = raw_ws(on, make_token(uid()))
    t0 = time.monotonic()
    frames = read_frames(s, timeout=3)
    elapsed = time.monotonic() - t0
    s.close()
    assert 9 in [op for op, _ in frames]           # protocol pings
    assert close_code_of(frames) is not None       # then closed for silence
    assert 0.5 < elapsed < 2.5
    # A client that answers pings (websocket-client does) stays.
    ws = connect(on, uid())
    ws.settimeout(0.2)
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        try:
            ws.recv()
        except websocket.WebSocketTimeoutException:
            pass
    ws.send('{"type":"ping"}')
    assert recv_json(ws) == {"type": "pong"}
    ws.close()


def test_slow_consumer_is_closed_with_1013(start_daemon, writer_for):
    on = start_daemon("order-notifier", notifier_env(WS_SEND_QUEUE_MAX_BYTES=65536))
    w = writer_for(on)
    user = uid()
    slow = raw_ws(on, make_token(user), rcvbuf=4096)
    fast = connect(on, user)
    other = connect(on, uid())
    received = []
    done = threading.Event()

    def drain():
        while not done.is_set():
            try:
                received.extend(m["event_id"] for m in recv_updates(fast, 10_000, timeout=0.5))
            except Exception:
                return

    t = threading.Thread(target=drain)
    t.start()
    # Big events (about 4 KB each) fill the kernel buffers and then the server's queue.
    oid = w.create(user, market="S" * 3500)
    # Paced (about 2 MB/s to the fast client): unpaced, a loaded machine let the fast client's
    # Python reader fall behind by more than its own queue and kernel buffers, and it was
    # closed as a slow consumer too. The slow one fills in well under a second either way.
    with w.conn.cursor() as cur:
        for i in range(1500):
            cur.execute("UPDATE orders SET filled_quantity = %s WHERE id = %s", (i, oid))
            time.sleep(0.002)
            if i % 50 == 0 and metric(on, "ws_slow_consumer_closes_total"):
                break
    assert wait_for(lambda: metric(on, "ws_slow_consumer_closes_total") >= 1, 10)
    assert metric(on, "ws_slow_consumer_closes_total") == 1, "the fast client was closed too"
    w.fill(oid, "0.5")
    expected = w.event_ids(user)
    wait_for(lambda: len(received) >= len(expected), 10)
    done.set()
    t.join()
    assert received == expected  # the fast client of the same user got everything
    # The slow one finds the 1013 close behind the frames it never read.
    frames = read_frames(slow, timeout=5)
    slow.close()
    assert frames[0][0] == 1 and json.loads(frames[0][1])["type"] == "order_update"
    assert close_code_of(frames) == 1013
    other.send('{"type":"ping"}')
    assert recv_json(other) == {"type": "pong"}
    fast.close()
    other.close()


def test_sigterm_closes_sockets_with_1001(start_daemon):
    on = start_daemon("order-notifier", notifier_env())
    clients = [connect(on, uid()) for _ in range(3)]
    assert metric(on, "notifier_leader") == 1 or wait_leader(on)
    t0 = time.monotonic()
    assert on.stop() == 0
    assert time.monotonic() - t0 < 10
    for c in clients:
        assert close_code(c) == 1001
    with open(on.log_path) as f:
        assert "leader lock released" in f.read()


def test_dashboard_and_health(start_daemon):
    on = start_daemon("order-notifier", notifier_env())
    status, headers, body = http_request("GET", on.url + "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"/ws/orders" in body and b"last_event_id" in body
    wait_leader(on)
    # Ready once PG_CHANNEL has been checked against markets.order_channel too.
    assert wait_for(lambda: http_request("GET", on.url + "/readyz")[0] == 200, 5)
    status, _, body = http_request("GET", on.url + "/readyz")
    assert status == 200 and json.loads(body)["role"] == "leader"
    status, _, body = http_request("GET", on.url + "/api/health/redis")
    assert status == 200 and json.loads(body)["redis"] == "up"
    _, headers, body = http_request("GET", on.url + "/metrics")
    text = body.decode()
    for name in ("ws_connections", "ws_messages_sent_total", "ws_slow_consumer_closes_total",
                 "order_events_received_total", "order_events_published_total",
                 "order_event_delivery_seconds_bucket", "pg_listener_up", "notifier_leader",
                 "redis_up", "http_requests_total"):
        assert f"\n{name}" in text, name
    series = [l.rpartition(" ")[0] for l in text.splitlines() if l and not l.startswith("#")]
    assert len(series) == len(set(series)), "a series is rendered twice"
    import shutil
    import subprocess
    if shutil.which("promtool"):
        p = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
        assert p.returncode == 0, p.stdout + p.stderr


def test_bad_configuration_exits_2(start_daemon):
    import subprocess
    from conftest import binary_path
    for env in ({"PG_CHANNEL": "bad-channel;"}, {"WS_MAX_CONNECTIONS": "abc"},
                {"APP_ENV": "production", "JWT_SECRET": None},
                {"ORDER_NOTIFIER_LISTEN": "127.0.0.1:70000"}):
        full = dict(os.environ)
        full.update({k: v for k, v in env.items() if v is not None})
        for k, v in env.items():
            if v is None:
                full.pop(k, None)
        p = subprocess.run([binary_path("order-notifier")], env=full, capture_output=True,
                           text=True, timeout=10)
        assert p.returncode == 2, (env, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1
        assert next(iter(env)) in p.stderr or "JWT_SECRET" in p.stderr


def test_sighup_reloads_log_level(start_daemon, tmp_path):
    import signal
    cfg = tmp_path / "notifier.env"
    cfg.write_text("LOG_LEVEL=info\n")
    on = start_daemon("order-notifier", notifier_env(CONFIG_FILE=cfg))
    cfg.write_text("# reloaded\nLOG_LEVEL=debug\n")
    on.signal(signal.SIGHUP)
    assert wait_for(lambda: any(l.get("msg") == "SIGHUP: reloaded" and
                                l.get("log_level") == "debug" for l in on.log_lines()), 5)
    # Debug lines now appear (a refused upgrade is logged at debug).
    http_request("GET", on.url + "/ws/orders")
    assert wait_for(lambda: any(l.get("level") == "debug" for l in on.log_lines()), 5)
    cfg.write_text("LOG_LEVEL=shouting\n")
    on.signal(signal.SIGHUP)
    assert wait_for(lambda: any("reload failed" in l.get("msg", "") for l in on.log_lines()), 5)
    # JWT_SECRET is read at start-up only: in the file it is an error, not silently ignored.
    cfg.write_text("LOG_LEVEL=info\nJWT_SECRET=rotated-secret-rotated-secret-rotated\n")
    on.signal(signal.SIGHUP)
    assert wait_for(lambda: any("JWT_SECRET is not a key this file can set" in
                                json.dumps(l) for l in on.log_lines()), 5)


def test_far_future_token_expiry_and_nul_in_sub(start_daemon, writer_for):
    """exp = 1e16 is a valid token that must not overflow the expiry timer (it crashed the
    daemon under UBSan and closed the socket at once without); a NUL inside sub is refused."""
    on = start_daemon("order-notifier", notifier_env())
    w = writer_for(on)
    user = uid()
    token = make_token(user, claims={"sub": user, "exp": 10**16})
    ws = websocket.create_connection(ws_url(on, token), timeout=5)
    assert json.loads(ws.recv())["type"] == "welcome"
    w.create(user)
    assert len(recv_updates(ws, 1)) == 1
    ws.close()
    forged = make_token(user, claims={"sub": user + "\u0000attacker", "exp": int(time.time()) + 60})
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        websocket.create_connection(ws_url(on, forged), timeout=5)
    assert e.value.status_code == 401
    assert on.proc.poll() is None


def test_resume_past_the_limit_says_so(start_daemon, writer_for):
    """More than 1000 missed events: the 1000 oldest come, then a resume_truncated frame."""
    on = start_daemon("order-notifier", notifier_env())
    w = writer_for(on)
    user = uid()
    oid = w.create(user)
    first = w.last_event_id(user)
    for i in range(1005):
        w.fill(oid, str(i))
    ws = connect(on, user, last_event_id=first)
    updates, note = [], None
    deadline = time.monotonic() + 20
    while note is None and time.monotonic() < deadline:
        msg = recv_json(ws, timeout=10)
        if msg.get("type") == "order_update":
            updates.append(msg["event_id"])
        elif msg.get("type") == "resume_truncated":
            note = msg
    assert len(updates) == 1000
    assert note == {"type": "resume_truncated", "limit": 1000,
                    "last_replayed_event_id": updates[-1]}
    ws.close()
