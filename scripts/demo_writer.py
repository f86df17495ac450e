#!/usr/bin/python3
"""Demo order flow for the dev stack: inserts and updates orders of a few users every ~200 ms.

Reads DATABASE_URL (and JWT_SECRET, PG_CHANNEL, NOTIFIER_URL, PRICES_URL if set) from the environment and
prints a development token per user for the order-notifier dashboard, e.g.
http://127.0.0.1:8081/#token=<jwt>. The orders table's trigger writes the outbox row and
NOTIFYs the notifier; this script only changes orders.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/markets scripts/demo_writer.py [--once]
"""
import base64
import hashlib
import hmac
import json
import os
import random
import sys
import time

import psycopg2

from redact import redact

# The notifier's built-in development secret (used when JWT_SECRET is unset outside production).
DEV_SECRET = "dev-only-order-notifier-secret-change-me"
USERS = ["alice", "bob", "carol"]
MARKETS = {"BTC-USD": 64000.0, "ETH-USD": 3400.0, "SOL-USD": 150.0}


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def dev_token(sub, secret, scope=None, ttl=24 * 3600):
    """HS256 JWT as the notifier expects (sub, exp, optional scope)."""
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    claims = {"sub": sub, "exp": int(time.time()) + ttl}
    if scope:
        claims["scope"] = scope
    payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
    sig = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(sig)}"


def connect(dsn, channel):
    while True:
        try:
            conn = psycopg2.connect(dsn)
            conn.autocommit = True
            if channel:
                with conn.cursor() as cur:
                    cur.execute("SELECT set_config('markets.order_channel', %s, false)", (channel,))
            return conn
        except psycopg2.OperationalError as e:
            why = redact(str(e.pgerror or e).strip(), dsn)
            print(f"demo-writer: database unavailable ({why}); retrying", flush=True)
            time.sleep(1)
        except psycopg2.ProgrammingError as e:  # a malformed DATABASE_URL: retrying cannot help
            print(f"demo-writer: DATABASE_URL: {redact(str(e).strip(), dsn)}", file=sys.stderr)
            sys.exit(2)


def step(cur, open_orders):
    """One change: a new order, a fill, or a cancel."""
    user = random.choice(USERS)
    mine = [o for o in open_orders if o[1] == user]
    if not mine or random.random() < 0.3:
        market = random.choice(list(MARKETS))
        price = round(MARKETS[market] * random.uniform(0.98, 1.02), 2)
        qty = round(random.uniform(0.1, 5), 3)
        cur.execute("INSERT INTO orders (user_id, market, side, price, quantity) "
                    "VALUES (%s, %s, %s, %s, %s) RETURNING id",
                    (user, market, random.choice(["buy", "sell"]), price, qty))
        open_orders.append([cur.fetchone()[0], user, qty, 0.0])
        return
    order = random.choice(mine)
    if random.random() < 0.1:
        cur.execute("UPDATE orders SET status = 'cancelled', updated_at = now() WHERE id = %s",
                    (order[0],))
        open_orders.remove(order)
        return
    order[3] = min(order[2], round(order[3] + order[2] * random.uniform(0.2, 0.6), 3))
    status = "filled" if order[3] >= order[2] else "partially_filled"
    cur.execute("UPDATE orders SET filled_quantity = %s, status = %s, updated_at = now() "
                "WHERE id = %s", (order[3], status, order[0]))
    if status == "filled":
        open_orders.remove(order)


def main():
    dsn = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/markets")
    secret = os.environ.get("JWT_SECRET") or DEV_SECRET
    channel = os.environ.get("PG_CHANNEL")
    base = os.environ.get("NOTIFIER_URL", "http://127.0.0.1:8081")
    # The dashboard's price board reads this price-service (which must allow the page's
    # origin: PRICE_CORS_ALLOWED_ORIGINS); without it, the page's own origin (the gateway).
    prices = os.environ.get("PRICES_URL")
    extra = f"&prices={prices}" if prices else ""
    for user in USERS:
        print(f"demo-writer: dashboard for {user}: {base}/#token={dev_token(user, secret)}{extra}")
    print(f"demo-writer: dashboard for every user: "
          f"{base}/#token={dev_token('ops', secret, scope='orders:read:all')}{extra}", flush=True)
    once = "--once" in sys.argv
    conn = connect(dsn, channel)
    open_orders = []
    while True:
        try:
            with conn.cursor() as cur:
                step(cur, open_orders)
        except psycopg2.Error as e:
            print(f"demo-writer: {e.__class__.__name__}: {redact(str(e).strip(), dsn)}; "
                  "reconnecting", flush=True)
            try:
                conn.close()
            except psycopg2.Error:
                pass
            conn = connect(dsn, channel)
        if once:
            return
        time.sleep(0.2)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
