"""The dashboard page in a real browser (headless Chromium over the DevTools protocol): it
connects with the token from the page, shows live order updates, and after the notifier
restarts it reconnects with last_event_id and catches up. Skipped when chromium is missing."""
import base64
import json
import shutil
import subprocess
import time
import urllib.request

import pytest
import websocket

from conftest import Daemon, free_port
from test_notifier import Writer, make_token, notifier_env, uid, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    def __init__(self):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--remote-debugging-port={self.port}", "--window-size=1200,700", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        targets = wait_for(lambda: self._targets(), 15)
        page = [t for t in targets if t["type"] == "page"][0]
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=10,
                                              suppress_origin=True)
        self.n = 0

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

    def close(self):
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(10)


@pytest.mark.skipif(not CHROMIUM, reason="chromium is not installed")
def test_dashboard_shows_live_updates_and_resumes(start_daemon, servers, tmp_path):
    env = notifier_env()
    on = start_daemon("order-notifier", env)
    user = uid("dash")
    w = Writer(servers, env["PG_CHANNEL"])
    browser = Browser()
    started = []
    try:
        browser.call("Page.navigate", url=f"{on.url}/#token={make_token(user)}")
        assert wait_for(lambda: browser.js("document.getElementById('state').textContent") == "open", 10)
        time.sleep(0.3)
        oid = w.create(user, market="ETH-USD")
        w.fill(oid, "0.5")
        last = w.last_event_id(user)
        assert wait_for(lambda: browser.js("document.getElementById('last').textContent") == str(last), 10)
        row = browser.js(f"document.getElementById('o{oid}').textContent")
        assert "ETH-USD" in row and "partially_filled" in row
        # The notifier goes away; changes commit meanwhile; a new one starts on the same port.
        assert on.stop() == 0
        assert wait_for(lambda: browser.js("document.getElementById('state').textContent").startswith("closed"), 10)
        w.fill(oid, "1.5")
        second = w.create(user, market="SOL-USD")
        last = w.last_event_id(user)
        # Same port (the page reconnects to where it came from), same settings.
        on2 = Daemon("order-notifier", on.env, on.port, str(tmp_path / "notifier-2.log"))
        started.append(on2)
        on2.wait_healthy()
        assert wait_for(lambda: browser.js("document.getElementById('last').textContent") == str(last), 20)
        log = browser.js("document.getElementById('log').textContent")
        assert "resumed from" in log
        assert "1.5" in browser.js(f"document.getElementById('o{oid}').textContent")
        assert "SOL-USD" in browser.js(f"document.getElementById('o{second}').textContent")
        shot = browser.call("Page.captureScreenshot", format="png")
        (tmp_path / "dashboard.png").write_bytes(base64.b64decode(shot["data"]))
    finally:
        browser.close()
        w.close()
        for d in started:
            assert d.stop() == 0
