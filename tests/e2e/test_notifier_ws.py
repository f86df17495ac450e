"""order-notifier's WebSocket layer (common/ cm/ws) against the real daemon: the close code of
each protocol error, app pings sent before the welcome, refused upgrades, and a ping flood from
a client that never reads.
"""
import base64
import json
import os
import socket
import struct
import time

import pytest

from conftest import http_request, metric, wait_for
from test_notifier import client_frame, close_code_of, make_token, notifier_env, raw_ws, uid


def upgrade_request(token, method=b"GET", version=b"HTTP/1.1"):
    key = base64.b64encode(os.urandom(16))
    return (method + b" /ws/orders?access_token=" + token.encode() + b" " + version + b"\r\n"
            b"Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n")


def read_head(s):
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        assert chunk, head
        head += chunk
    return head


class Frames:
    """Server frames from a socket, parsed as they come."""

    def __init__(self, s):
        self.s, self.buf, self.pos, self.eof = s, b"", 0, False

    def _parse(self):
        b, p = self.buf, self.pos
        if len(b) - p < 2:
            return None
        n, i = b[p + 1] & 0x7F, p + 2
        if n == 126:
            if len(b) - p < 4:
                return None
            n, i = struct.unpack("!H", b[p + 2:p + 4])[0], p + 4
        elif n == 127:
            if len(b) - p < 10:
                return None
            n, i = struct.unpack("!Q", b[p + 2:p + 10])[0], p + 10
        if len(b) < i + n:
            return None
        self.pos = i + n
        return b[p] & 0x0F, b[i:i + n]

    def next(self, timeout=3):
        self.s.settimeout(timeout)
        while True:
            f = self._parse()
            if f is not None:
                return f
            chunk = self.s.recv(65536)
            if not chunk:
                self.eof = True
                return None
            self.buf, self.pos = self.buf[self.pos:] + chunk, 0

    def until_eof(self, timeout=3):
        """Every frame up to the server's FIN; fails if the connection stays open."""
        out = []
        deadline = time.monotonic() + timeout
        while True:
            f = self.next(timeout=max(0.05, deadline - time.monotonic()))
            if f is None:
                return out
            out.append(f)


# (what the client sends, the close code it must get back)
PROTOCOL_ERRORS = [
    ("FIN=0 ping", client_frame(9, b"x", fin=False), 1002),
    ("126-byte ping", client_frame(9, b"p" * 126), 1002),
    ("1-byte close body", client_frame(8, b"\x03"), 1002),
    ("close code 1005", client_frame(8, struct.pack("!H", 1005)), 1002),
    ("close code 1006", client_frame(8, struct.pack("!H", 1006)), 1002),
    ("close code 1015", client_frame(8, struct.pack("!H", 1015)), 1002),
    ("close code 999", client_frame(8, struct.pack("!H", 999)), 1002),
    ("close code 2000", client_frame(8, struct.pack("!H", 2000)), 1002),
    ("invalid UTF-8 close reason", client_frame(8, struct.pack("!H", 1000) + b"\xc3\x28"), 1007),
    ("reserved opcode 3", client_frame(3, b"x"), 1002),
    ("reserved opcode 0xB", client_frame(0xB, b""), 1002),
    ("RSV1 bit", bytes([0xC1]) + client_frame(1, b"x")[1:], 1002),
    ("unmasked frame", client_frame(1, b"hi", masked=False), 1002),
    ("message over 4 KiB", client_frame(1, b"x" * 4097), 1009),
    ("invalid UTF-8 text", client_frame(1, b"a\xc3\x28z"), 1007),
]


@pytest.mark.parametrize("before_welcome", [False, True], ids=["after-welcome", "before-welcome"])
def test_protocol_errors_get_their_close_code(start_daemon, before_welcome):
    on = start_daemon("order-notifier", notifier_env())
    for name, data, code in PROTOCOL_ERRORS:
        s = raw_ws(on, make_token(uid()), welcome=not before_welcome)
        s.sendall(data)
        frames = Frames(s).until_eof()
        s.close()
        assert close_code_of(frames) == code, (name, frames)
    # Valid closes are echoed with their code, a close without a code with none.
    for body, want in ((struct.pack("!H", 4000) + b"bye", 4000), (b"", 0)):
        s = raw_ws(on, make_token(uid()))
        s.sendall(client_frame(8, body))
        assert close_code_of(Frames(s).until_eof()) == want
        s.close()
    assert http_request("GET", on.url + "/healthz")[0] == 200


def pong_after_welcome(on, same_segment):
    s = socket.create_connection(("127.0.0.1", on.port), timeout=5)
    ping = client_frame(1, b'{"type":"ping"}')
    if same_segment:
        s.sendall(upgrade_request(make_token(uid())) + ping)
        head = read_head(s)
    else:
        s.sendall(upgrade_request(make_token(uid())))
        head = read_head(s)
        s.sendall(ping)
    assert head.startswith(b"HTTP/1.1 101"), head
    frames = Frames(s)
    first, second = frames.next(), frames.next()
    s.close()
    return first, second


@pytest.mark.parametrize("same_segment", [True, False], ids=["same-segment", "after-101"])
def test_app_ping_before_the_welcome_gets_its_pong(start_daemon, same_segment):
    on = start_daemon("order-notifier", notifier_env())
    for _ in range(20):
        first, second = pong_after_welcome(on, same_segment)
        assert first[0] == 1 and json.loads(first[1])["type"] == "welcome"
        assert second == (1, b'{"type":"pong"}')


def test_head_and_http10_upgrades_are_refused(start_daemon):
    on = start_daemon("order-notifier", notifier_env())
    token = make_token(uid())
    before = metric(on, "ws_handshakes_rejected_total") or 0
    with socket.create_connection(("127.0.0.1", on.port), timeout=5) as s:
        s.sendall(upgrade_request(token, method=b"HEAD"))
        head = read_head(s)
    assert head.startswith(b"HTTP/1.1 405"), head
    assert b"\r\nAllow: GET\r\n" in head
    with socket.create_connection(("127.0.0.1", on.port), timeout=5) as s:
        s.sendall(upgrade_request(token, version=b"HTTP/1.0"))
        s.settimeout(5)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    assert json.loads(body)["error"]["code"] == "unsupported_http_version"
    assert metric(on, "ws_handshakes_rejected_total") == before + 2


def vm_rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("payload", [0, 125], ids=["empty-pings", "125-byte-pings"])
def test_ping_flood_is_closed_and_memory_stays_bounded(start_daemon, payload):
    # Under ASan freed blocks wait in a 256 MB quarantine and would count as growth; a small one
    # keeps RSS meaningful (a normal build ignores the variable).
    asan = ":".join(filter(None, [os.environ.get("ASAN_OPTIONS"), "quarantine_size_mb=1"]))
    on = start_daemon("order-notifier", notifier_env(ASAN_OPTIONS=asan))
    s = raw_ws(on, make_token(uid()), rcvbuf=4096)
    time.sleep(0.2)
    rss_before = vm_rss_kb(on.proc.pid)
    ping = client_frame(9, b"p" * payload)
    chunk = ping * (65536 // len(ping))
    s.settimeout(2)
    sent, ended = 0, None
    try:
        while sent < 20 * 1024 * 1024:
            s.sendall(chunk)
            sent += len(chunk)
    except (socket.timeout, BrokenPipeError, ConnectionResetError) as e:
        ended = type(e).__name__  # the daemon stopped reading, or already cut us off
    rss_after = vm_rss_kb(on.proc.pid)
    # What the daemon managed to queue comes first (pongs), then its 1013, then the end.
    try:
        frames = Frames(s).until_eof(timeout=8)
    except ConnectionResetError:
        frames = None  # closed hard at the close deadline before we read
    s.close()
    print(f"\nping flood ({payload}-byte pings): sent {sent / 1e6:.1f} MB ({ended or 'all'}), "
          f"notifier VmRSS {rss_before} kB -> {rss_after} kB")
    assert rss_after - rss_before < 20 * 1024
    assert wait_for(lambda: metric(on, "ws_slow_consumer_closes_total") == 1, 5)
    if frames is not None:
        assert close_code_of(frames) == 1013
    other = raw_ws(on, make_token(uid()))
    other.sendall(client_frame(1, b'{"type":"ping"}'))
    assert Frames(other).next() == (1, b'{"type":"pong"}')
    other.close()
