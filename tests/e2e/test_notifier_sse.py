"""GET /sse/orders: the order stream as Server-Sent Events, through the same delivery pipeline
as the WebSocket clients (hub, gate, resume, de-duplication)."""
import json
import signal
import socket
import time

from conftest import metric, wait_for
from test_notifier import (connect, make_token, notifier_env, recv_updates, uid,  # noqa: F401
                           writer_for)


class Sse:
    """A raw GET /sse/orders; events() parses text/event-stream as EventSource would."""

    def __init__(self, daemon, token, last_event_id=None, rcvbuf=None, query_token=False):
        self.s = socket.socket()
        if rcvbuf:
            self.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.s.connect(("127.0.0.1", daemon.port))
        path = "/sse/orders" + (f"?access_token={token}" if query_token else "")
        head = f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
        if not query_token:
            head += f"Authorization: Bearer {token}\r\n"
        if last_event_id is not None:
            head += f"Last-Event-ID: {last_event_id}\r\n"
        self.s.sendall((head + "\r\n").encode())
        self.buf = b""
        self.comments = 0
        self.last_id = None
        self.status, self.headers = self._head()

    def _read(self, timeout):
        self.s.settimeout(timeout)
        chunk = self.s.recv(65536)
        if not chunk:
            raise EOFError
        self.buf += chunk

    def _head(self):
        while b"\r\n\r\n" not in self.buf:
            self._read(5)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}

    def next(self, timeout=5):
        """The next dispatched message: {"id": last event id, "data": parsed JSON}."""
        data = []
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" not in self.buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self._read(left)
            line, self.buf = self.buf.split(b"\n", 1)
            line = line.decode()
            if line == "":
                if data:
                    return {"id": self.last_id, "data": json.loads("\n".join(data))}
                continue
            if line.startswith(":"):
                self.comments += 1
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            elif name == "id":
                self.last_id = value

    def updates(self, count, timeout=10):
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < count and time.monotonic() < deadline:
            try:
                m = self.next(deadline - time.monotonic())
            except TimeoutError:
                break
            if m["data"].get("type") == "order_update":
                assert m["id"] == str(m["data"]["event_id"])
                out.append(m["data"])
        return out

    def close(self):
        self.s.close()


def burst(w, user, n):
    with w.conn.cursor() as cur:
        cur.execute("INSERT INTO orders (user_id, market, side, price, quantity) "
                    "SELECT %s, 'BTC-USD', 'buy', '1', '1' FROM generate_series(1, %s)", (user, n))


def test_sse_and_websocket_share_the_stream(start_daemon, writer_for):
    on = start_daemon("order-notifier", notifier_env(WS_SEND_QUEUE_MAX_BYTES=64 << 20))
    w = writer_for(on)
    user = uid("sse")
    s = Sse(on, make_token(user))
    assert s.status == 200 and s.headers["content-type"] == "text/event-stream"
    welcome = s.next()
    assert welcome["data"] == {"type": "welcome", "user_id": user, "resumed_from": None}
    ws = connect(on, user)
    burst(w, user, 2000)
    ids = w.event_ids(user)
    got_sse = [m["event_id"] for m in s.updates(len(ids), timeout=20)]
    got_ws = [m["event_id"] for m in recv_updates(ws, len(ids), timeout=20)]
    assert got_sse == ids, f"sse: {len(got_sse)} of {len(ids)}"
    assert got_ws == ids
    ws.close()
    s.close()


def test_last_event_id_resumes_exactly(start_daemon, writer_for):
    on = start_daemon("order-notifier", notifier_env())
    w = writer_for(on)
    user = uid("sse")
    s = Sse(on, make_token(user), query_token=True)
    s.next()
    oid = w.create(user)
    first = s.updates(1)[0]["event_id"]
    s.close()
    for i in range(5):
        w.fill(oid, str(i + 1))
    missed = w.event_ids(user, after=first)
    s = Sse(on, make_token(user), last_event_id=first)
    assert s.next()["data"]["resumed_from"] == first
    got = [m["event_id"] for m in s.updates(len(missed))]
    assert got == missed
    w.fill(oid, "9")
    live = s.updates(1)
    assert [m["event_id"] for m in live] == w.event_ids(user, after=missed[-1])
    s.close()


def test_heartbeats_and_slow_consumer(start_daemon, writer_for):
    on = start_daemon("order-notifier", notifier_env(WS_PING_INTERVAL_MS=200,
                                                     WS_SEND_QUEUE_MAX_BYTES=65536))
    w = writer_for(on)
    user = uid("sse")
    s = Sse(on, make_token(user))
    s.next()
    time.sleep(0.6)
    oid = w.create(user)
    assert s.updates(1)[0]["order"]["id"] == oid
    assert s.comments >= 2
    s.close()
    # One that never reads: closed once its queue passes the cap, and counted.
    before = metric(on, "ws_slow_consumer_closes_total") or 0
    slow = Sse(on, make_token(user), rcvbuf=4096)
    burst(w, user, 20000)  # more than the kernel buffers of a loopback socket hold
    assert wait_for(lambda: (metric(on, "ws_slow_consumer_closes_total") or 0) > before, 15)
    slow.s.settimeout(5)
    try:
        while slow.s.recv(65536):
            pass
    except (ConnectionResetError, TimeoutError, socket.timeout):
        pass
    slow.close()


def test_refusals_and_shutdown(start_daemon):
    on = start_daemon("order-notifier", notifier_env(WS_ALLOWED_ORIGINS="https://ok.example"))
    bad = Sse(on, "not-a-token")
    assert bad.status == 401
    bad.close()
    s = socket.create_connection(("127.0.0.1", on.port))
    s.sendall(b"GET /sse/orders HTTP/1.1\r\nHost: x\r\nOrigin: https://evil.example\r\n"
              b"Authorization: Bearer " + make_token("u1").encode() + b"\r\n\r\n")
    assert s.recv(4096).startswith(b"HTTP/1.1 403")
    s.close()
    s = socket.create_connection(("127.0.0.1", on.port))
    s.sendall(b"HEAD /sse/orders HTTP/1.1\r\nHost: x\r\n\r\n")
    assert s.recv(4096).startswith(b"HTTP/1.1 405")
    s.close()
    # SIGTERM ends the stream (EventSource then reconnects, with Last-Event-ID).
    st = Sse(on, make_token(uid("sse")))
    st.next()
    on.signal(signal.SIGTERM)
    st.s.settimeout(10)
    rest = b""
    while True:
        chunk = st.s.recv(65536)
        if not chunk:
            break
        rest += chunk
    st.close()
    assert on.proc.wait(12) == 0


def test_an_event_bigger_than_the_queue_cap_reaches_readers(start_daemon, writer_for):
    """One order event larger than WS_SEND_QUEUE_MAX_BYTES goes to clients that read (the cap
    is on what waits before it); it closed every client of the user, at every resume."""
    on = start_daemon("order-notifier", notifier_env(WS_SEND_QUEUE_MAX_BYTES=65536))
    w = writer_for(on)
    user = uid("big")
    s = Sse(on, make_token(user))
    s.next()
    ws = connect(on, user)
    oid = w.create(user, market="M" * 300000)
    w.fill(oid, "1")
    got_ws = recv_updates(ws, 2, timeout=15)
    got_sse = s.updates(2, timeout=15)
    assert [m["order"]["id"] for m in got_ws] == [oid, oid]
    assert len(got_ws[0]["order"]["market"]) == 300000
    assert [m["event_id"] for m in got_sse] == [m["event_id"] for m in got_ws]
    assert (metric(on, "ws_slow_consumer_closes_total") or 0) == 0
    ws.close()
    s.close()
