-- The origin of prices and the order outbox (see CONTRACT.md). Idempotent: safe to apply again.

CREATE TABLE IF NOT EXISTS oracle_prices (
    market       text PRIMARY KEY,
    price        numeric NOT NULL,
    confidence   numeric,
    publish_time timestamptz NOT NULL,
    source       text NOT NULL
);

CREATE TABLE IF NOT EXISTS orders (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id         text NOT NULL,
    market          text NOT NULL,
    side            text NOT NULL CHECK (side IN ('buy', 'sell')),
    price           numeric,
    quantity        numeric NOT NULL,
    filled_quantity numeric NOT NULL DEFAULT 0,
    status          text NOT NULL DEFAULT 'open'
                    CHECK (status IN ('open', 'partially_filled', 'filled', 'cancelled', 'rejected')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- The outbox: one row per order change, written in the same transaction as the change.
CREATE TABLE IF NOT EXISTS order_events (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id   bigint NOT NULL,
    user_id    text NOT NULL,
    event_type text NOT NULL,
    payload    jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Resume reads one user's events by id; catch-up reads recent events by time.
CREATE INDEX IF NOT EXISTS order_events_user_id_idx ON order_events (user_id, id);
CREATE INDEX IF NOT EXISTS order_events_created_at_idx ON order_events (created_at);
