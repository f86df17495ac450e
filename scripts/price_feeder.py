#!/usr/bin/env python3
"""Demo oracle feeder: moves the prices of every market in oracle_prices every few hundred ms,
so the dev stack's cache sees entries expire and refill. DATABASE_URL from the environment."""
import os
import random
import signal
import sys
import time
from decimal import Decimal

import psycopg2

from redact import redact


def main():
    interval = float(os.environ.get("FEEDER_INTERVAL_MS", "300")) / 1000
    dsn = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/markets")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    conn = None
    while True:
        try:
            if conn is None:
                conn = psycopg2.connect(dsn)
                conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT market, price FROM oracle_prices")
                for market, price in cur.fetchall():
                    step = Decimal(random.uniform(-0.002, 0.002)).quantize(Decimal("0.000001"))
                    exp = price.as_tuple().exponent
                    new = (price * (1 + step)).quantize(Decimal(1).scaleb(min(exp, -2)))
                    cur.execute("UPDATE oracle_prices SET price = %s, publish_time = now()"
                                " WHERE market = %s", (new, market))
            time.sleep(interval)
        except psycopg2.Error as e:
            # libpq quotes a malformed DATABASE_URL back, password included.
            print(f"price_feeder: {redact(str(e).strip(), dsn)}", file=sys.stderr)
            conn = None
            time.sleep(1)
        except KeyboardInterrupt:
            return


if __name__ == "__main__":
    main()
