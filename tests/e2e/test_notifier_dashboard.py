"""The dashboard page in a real browser (headless Chromium over the DevTools protocol): it
connects with the token from the page, shows live order updates, and after the notifier
restarts it reconnects with last_event_id and catches up; its plots get data and draw, its
price board shows the price-service's prices (read cross-origin, PRICE_CORS_ALLOWED_ORIGINS),
and with #transport=sse its EventSource resumes by itself with Last-Event-ID, every event
exactly once. Skipped when chromium is missing.

Screenshots go to <build dir>/e2e-artifacts/ (and to $MARKETS_ARTIFACTS_DIR when set); the
paths are printed (pytest -s shows them)."""
import base64
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid

import pytest
import websocket

from conftest import BUILD_DIR, Daemon, http_get_json, http_request
from test_notifier import Writer, make_token, notifier_env, uid, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Pixels of a plot's own colours (grid, text and background are nearly grey): how we know the
# canvas drew a series, not only that the page holds numbers.
COLOURED_PIXELS = """((ids) => {
  const out = {};
  for (const id of ids) {
    const c = document.getElementById(id);
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 0; i < d.length; i += 4)
      if (d[i + 3] > 128 && Math.max(d[i], d[i + 1], d[i + 2]) - Math.min(d[i], d[i + 1], d[i + 2]) > 60) n++;
    out[id] = n;
  }
  return out;
})(%s)"""


class Browser:
    """One headless Chromium driven over the DevTools protocol. Chromium picks its own
    debugging port (--remote-debugging-port=0) and writes it to DevToolsActivePort in the
    profile: no port is reserved and then raced for. A start that does not come up in time
    is retried once with a fresh profile (a first start on a loaded two-core machine can
    take long); a second failure says what Chromium printed."""

    START_TIMEOUT = 30
    ATTEMPTS = 2

    def __init__(self, width=1280, height=1100):
        errors = []
        for _ in range(self.ATTEMPTS):
            err = self._start(width, height)
            if err is None:
                self.n = 0
                return
            errors.append(err)
        pytest.fail("chromium did not start:\n" + "\n".join(errors))

    def _start(self, width, height):
        self.profile = tempfile.mkdtemp(prefix="markets-chromium.")
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={self.profile}",
             "--remote-debugging-port=0", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=self.stderr)
        self.port = None
        page = wait_for(self._page, self.START_TIMEOUT, 0.1)
        if isinstance(page, dict):
            self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=10,
                                                  suppress_origin=True)
            return None
        rc = self.proc.poll()
        self._stop()
        self.stderr.seek(0)
        tail = self.stderr.read()[-2000:].decode(errors="replace")
        self.stderr.close()
        state = f"exited with {rc}" if rc is not None else f"no page after {self.START_TIMEOUT} s"
        return f"chromium {state}; stderr tail:\n{tail}"

    def _page(self):
        if self.proc.poll() is not None:
            return True  # ends the wait; _start() reads the exit code
        if self.port is None:
            try:
                with open(os.path.join(self.profile, "DevToolsActivePort")) as f:
                    self.port = int(f.readline())
            except (OSError, ValueError):
                return None
        pages = [t for t in self._targets() or [] if t.get("type") == "page"]
        return pages[0] if pages else None

    def _targets(self):
        try:
            return json.load(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json", timeout=1))
        except OSError:
            return None

    def call(self, method, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                return msg.get("result", {})

    def js(self, expr):
        return self.call("Runtime.evaluate", expression=expr, returnByValue=True)["result"].get("value")

    def text(self, element_id):
        return self.js(f"document.getElementById({json.dumps(element_id)}).textContent")

    def screenshot(self, name):
        """Saves a PNG under <build>/e2e-artifacts/ (and $MARKETS_ARTIFACTS_DIR); returns the path."""
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        out = os.path.join(BUILD_DIR, "e2e-artifacts")
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, name)
        with open(path, "wb") as f:
            f.write(data)
        print(f"\ndashboard screenshot: {path}")
        extra = os.environ.get("MARKETS_ARTIFACTS_DIR")
        if extra:
            os.makedirs(extra, exist_ok=True)
            shutil.copyfile(path, os.path.join(extra, name))
            print(f"dashboard screenshot: {os.path.join(extra, name)}")
        return path

    def close(self):
        self.ws.close()
        self._stop()
        self.stderr.close()

    def _stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


def welcomed(browser):
    """The page has had a welcome: its stream is live from here. Before the page has loaded
    there is no `dash` (None)."""
    return (browser.js("window.dash?.conn.welcomes") or 0) >= 1


@pytest.fixture
def browser():
    b = Browser()
    yield b
    b.close()


class Background:
    """Order changes of one user, committed one after another (ids ascend in commit order)
    every `interval` seconds on its own session until stopped."""

    def __init__(self, servers, channel, user, interval=0.05):
        self.w = Writer(servers, channel)
        self.user, self.interval = user, interval
        self.stop_flag = threading.Event()
        self.count = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        oid = None
        while not self.stop_flag.is_set():
            if oid is None or self.count % 4 == 0:
                oid = self.w.create(self.user, market="SOL-USD")
            else:
                self.w.fill(oid, str(self.count % 4 * 0.25))
            self.count += 1
            time.sleep(self.interval)

    def stop(self):
        self.stop_flag.set()
        self.thread.join(10)
        self.w.close()


def test_dashboard_is_one_self_contained_page(start_daemon):
    """Inline CSS and JS, no library, nothing fetched from elsewhere (tests and air-gapped
    operators reach nothing outside the daemons)."""
    on = start_daemon("order-notifier", notifier_env())
    status, headers, body = http_request("GET", on.url + "/")
    page = body.decode()
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    for needle in ("<script src", "<link", "@import", "url(", "<img", "<iframe", "import("):
        assert needle not in page, needle
    assert "new EventSource(" in page and "/sse/orders" in page and "/metrics" in page


@pytest.mark.skipif(not CHROMIUM, reason="chromium is not installed")
def test_dashboard_shows_live_updates_and_resumes(start_daemon, servers, tmp_path, browser):
    env = notifier_env()
    on = start_daemon("order-notifier", env)
    user = uid("dash")
    w = Writer(servers, env["PG_CHANNEL"])
    started = []
    try:
        browser.call("Page.navigate", url=f"{on.url}/#token={make_token(user)}")
        # Events flow from the welcome on (the open event is only the transport's).
        assert wait_for(lambda: welcomed(browser), 10)
        assert browser.js("dash.conn.transport") == "ws"
        oid = w.create(user, market="ETH-USD")
        w.fill(oid, "0.5")
        last = w.last_event_id(user)
        assert wait_for(lambda: browser.text("last") == str(last), 10)
        row = browser.text(f"o{oid}")
        assert "ETH-USD" in row and "partially_filled" in row
        # The notifier goes away; changes commit meanwhile; a new one starts on the same port.
        assert on.stop() == 0
        assert wait_for(lambda: browser.text("state").startswith("closed"), 10)
        w.fill(oid, "1.5")
        second = w.create(user, market="SOL-USD")
        last = w.last_event_id(user)
        # Same port (the page reconnects to where it came from), same settings.
        on2 = Daemon("order-notifier", on.env, on.port, str(tmp_path / "notifier-2.log"))
        started.append(on2)
        on2.wait_healthy()
        assert wait_for(lambda: browser.text("last") == str(last), 20)
        assert "resumed from" in browser.text("log")
        assert "1.5" in browser.text(f"o{oid}")
        assert "SOL-USD" in browser.text(f"o{second}")
        assert browser.js("dash.conn.reconnects") >= 1
        assert browser.text("reconnects") == str(browser.js("dash.conn.reconnects"))
        assert browser.js("dash.conn.dups") == 0
    finally:
        w.close()
        for d in started:
            assert d.stop() == 0


def new_market(db, price):
    market = "T-" + uuid.uuid4().hex[:10].upper()
    with db.cursor() as cur:
        cur.execute("INSERT INTO oracle_prices (market, price, confidence, publish_time, source)"
                    " VALUES (%s, %s, NULL, now(), 'pyth')", (market, price))
    return market


@pytest.mark.skipif(not CHROMIUM, reason="chromium is not installed")
def test_dashboard_plots_metrics_and_price_board(start_daemon, servers, db, browser):
    env = notifier_env()
    on = start_daemon("order-notifier", env)
    # The page is served by the notifier and reads prices from the price-service directly:
    # another origin, allowed by the price-service's CORS allow-list.
    origin = f"http://127.0.0.1:{on.port}"
    ps = start_daemon("price-service", {"PRICE_CORS_ALLOWED_ORIGINS": origin,
                                        "CACHE_TTL_MS": "200"})
    mine = new_market(db, "100.25")
    markets = f"BTC-USD,ETH-USD,SOL-USD,{mine}"
    user = uid("plot")
    busy = Background(servers, env["PG_CHANNEL"], user, interval=0.05)
    try:
        browser.call("Page.navigate",
                     url=f"{on.url}/#token={make_token(user)}&prices={ps.url}&markets={markets}")
        assert wait_for(lambda: browser.text("state") == "open", 10)
        # Prices move meanwhile (the sparkline and the change column).
        for p in ("100.5", "101.125", "100.75"):
            time.sleep(0.6)
            with db.cursor() as cur:
                cur.execute("UPDATE oracle_prices SET price = %s, publish_time = now() "
                            "WHERE market = %s", (p, mine))
        # Two scrapes of /metrics with deliveries between them give the notifier's series.
        assert wait_for(lambda: browser.js("dash.series.p50.length") > 0, 15), \
            browser.js("JSON.stringify(dash.metrics)")
        assert wait_for(lambda: browser.js("dash.series.rate.some((p) => p[1] > 0)"), 10)
        series = browser.js("JSON.parse(JSON.stringify(dash.series))")
        assert series["latency"] and all(isinstance(v, (int, float)) for _, v in series["latency"])
        assert series["published"] and max(v for _, v in series["published"]) > 0
        assert series["p99"] and all(p99 >= p50 for (_, p50), (_, p99)
                                     in zip(series["p50"], series["p99"]))
        assert browser.js("dash.metrics.ok") is True
        assert browser.js("dash.metrics.leader") == 1
        assert browser.js("dash.metrics.connections") >= 1
        assert browser.text("m-role").startswith("leader")
        assert browser.text("c-state") == "open" and browser.text("transport-name").startswith("WebSocket")
        # The board shows what the price-service serves, exactly (decimals as text).
        _, _, body = http_get_json(f"{ps.url}/api/markets/prices?markets={markets}")
        served = {p["market"]: p["price"] for p in body["prices"]}
        assert {"BTC-USD", "ETH-USD", "SOL-USD"} <= set(served)
        assert served[mine] == "100.750000" or served[mine] == "100.75"
        for m, price in served.items():
            assert wait_for(lambda: browser.js(f"dash.prices[{json.dumps(m)}]?.text") == price, 5), m
            assert price in browser.text(f"p-{m}")
        assert len(browser.js(f"dash.prices[{json.dumps(mine)}].history")) >= 2
        assert browser.js("dash.priceStatus.ok") is True
        # Every plot drew its series, the price sparklines too.
        plots = ["plot-rate", "plot-latency", "plot-notifier", f"spark-{mine}"]
        for p in plots:  # redrawn once a second
            assert wait_for(lambda: browser.js(f"dash.draws[{json.dumps(p)}]?.points") > 0, 3), p
        pixels = browser.js(COLOURED_PIXELS % json.dumps(plots))
        assert all(n > 20 for n in pixels.values()), pixels
        # A few more seconds of traffic make a screenshot worth looking at.
        wait_for(lambda: browser.js("dash.series.published.length") >= 4, 10)
        time.sleep(1.1)
        browser.screenshot("dashboard.png")
    finally:
        busy.stop()


@pytest.mark.skipif(not CHROMIUM, reason="chromium is not installed")
def test_dashboard_without_cors_says_why(start_daemon, servers, browser):
    """A price-service that does not list the page's origin: the browser refuses the answer and
    the board says what to set, instead of showing nothing."""
    on = start_daemon("order-notifier", notifier_env())
    ps = start_daemon("price-service")
    browser.call("Page.navigate", url=f"{on.url}/#token={make_token(uid('nocors'))}&prices={ps.url}")
    assert wait_for(lambda: browser.js("dash.priceStatus.ok") is False, 10)
    assert "PRICE_CORS_ALLOWED_ORIGINS" in browser.text("price-status")


@pytest.mark.skipif(not CHROMIUM, reason="chromium is not installed")
def test_event_source_resumes_by_itself_exactly_once(start_daemon, servers, tmp_path, browser):
    env = notifier_env()
    on = start_daemon("order-notifier", env)
    user = uid("sse")
    started = []
    busy = None
    try:
        browser.call("Page.navigate", url=f"{on.url}/#token={make_token(user)}&transport=sse")
        assert wait_for(lambda: browser.text("state") == "open", 10)
        assert browser.js("dash.conn.transport") == "sse"
        assert browser.js("es.url").split("?")[0].endswith("/sse/orders")
        # Every event from here must arrive: the stream is live once the welcome is in (the
        # EventSource opens with the response headers, before the subscription is confirmed).
        assert wait_for(lambda: welcomed(browser), 10)
        busy = Background(servers, env["PG_CHANNEL"], user, interval=0.05)
        assert wait_for(lambda: browser.js("dash.rawIds.length") >= 10, 10)
        # The notifier goes away while events keep committing; a new one starts on the same
        # port a little later.
        assert on.stop() == 0
        assert wait_for(lambda: browser.js("dash.conn.state") != "open", 10)
        before = browser.js("dash.rawIds.length")
        time.sleep(1.5)
        on2 = Daemon("order-notifier", on.env, on.port, str(tmp_path / "notifier-2.log"))
        started.append(on2)
        on2.wait_healthy()
        assert wait_for(lambda: browser.js("dash.conn.state") == "open", 15)
        time.sleep(1.0)
        busy.stop()
        expected = Writer(servers, env["PG_CHANNEL"])
        try:
            ids = expected.event_ids(user)
        finally:
            expected.close()
        assert busy.count == len(ids) and len(ids) > before
        arrived = wait_for(lambda: browser.js("dash.rawIds.length") >= len(ids), 15)
        time.sleep(0.5)  # anything extra (a duplicate) would come now
        got = browser.js("dash.rawIds")
        assert arrived, (f"missing {sorted(set(ids) - set(got))} of {len(ids)}; "
                         f"page log:\n{browser.text('log')}")
        assert len(got) == len(set(got)), "an event arrived twice"
        assert sorted(got) == ids
        assert got == ids  # one writer, so commit order is id order, and so is the stream
        # The browser resumed by itself: the page made one EventSource, which reconnected
        # and sent Last-Event-ID (the welcome says where it resumed from).
        assert browser.js("dash.conn.sources") == 1
        assert browser.js("dash.conn.reconnects") >= 1
        assert "resumed from" in browser.text("log")
        assert browser.js("dash.conn.dups") == 0
    finally:
        if busy:
            busy.stop()
        for d in started:
            assert d.stop() == 0


@pytest.mark.skipif(not CHROMIUM, reason="chromium is not installed")
def test_dashboard_through_the_gateway(start_daemon, servers, browser):
    """Behind deploy/gateway/nginx.conf the page is one origin with the price API: the board
    needs no CORS; the event stream passes unbuffered; /metrics is not public, and the page
    says so."""
    from test_gateway import NGINX, Gateway
    if not os.path.exists(NGINX):
        pytest.skip("nginx is not installed")
    env = notifier_env()
    on = start_daemon("order-notifier", env)
    ps = start_daemon("price-service")
    gw = Gateway(ps.port, on.port)
    user = uid("gw")
    busy = None
    try:
        browser.call("Page.navigate", url=f"{gw.url}/#token={make_token(user)}&transport=sse"
                                          "&markets=BTC-USD,ETH-USD,SOL-USD")
        assert wait_for(lambda: browser.text("state") == "open", 10)
        busy = Background(servers, env["PG_CHANNEL"], user, interval=0.1)
        assert wait_for(lambda: browser.js("dash.conn.events") >= 5, 10)
        assert wait_for(lambda: browser.js("dash.priceStatus.ok") is True, 10), \
            browser.text("price-status")
        assert browser.text("price-source") == "same origin"
        assert browser.js("Object.keys(dash.prices).sort()") == ["BTC-USD", "ETH-USD", "SOL-USD"]
        assert wait_for(lambda: browser.js("dash.metrics.ok") is False, 10)
        assert "404" in browser.text("metrics-status")
    finally:
        if busy:
            busy.stop()
        gw.stop()
