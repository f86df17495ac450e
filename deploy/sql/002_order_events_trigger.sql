-- Writes the outbox row and wakes the notifier in the same transaction as the order change.
--
-- The payload is built from an allow-list of order columns: a column added to `orders` later
-- (an email, a note) never reaches the outbox, Redis or a WebSocket. The NOTIFY carries the
-- event id, and the whole event when it fits under Postgres' 8000-byte payload limit;
-- otherwise the notifier reads the row. The channel is the database setting
-- `markets.order_channel` (ALTER DATABASE ... SET), `order_events` when unset.

CREATE OR REPLACE FUNCTION orders_outbox() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    ev_id      bigint;
    ev_type    text;
    ev_at      timestamptz := clock_timestamp();
    ev_payload jsonb;
    note       text;
BEGIN
    ev_type := CASE TG_OP WHEN 'INSERT' THEN 'order.created' ELSE 'order.updated' END;
    ev_payload := jsonb_build_object(
        'id', NEW.id,
        'user_id', NEW.user_id,
        'market', NEW.market,
        'side', NEW.side,
        'price', NEW.price::text,
        'quantity', NEW.quantity::text,
        'filled_quantity', NEW.filled_quantity::text,
        'status', NEW.status,
        'updated_at', to_char(NEW.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'));

    INSERT INTO order_events (order_id, user_id, event_type, payload, created_at)
    VALUES (NEW.id, NEW.user_id, ev_type, ev_payload, ev_at)
    RETURNING id INTO ev_id;

    note := jsonb_build_object(
        'id', ev_id,
        'user_id', NEW.user_id,
        'event_type', ev_type,
        'created_at', extract(epoch FROM ev_at)::text,
        'order', ev_payload)::text;
    IF octet_length(note) >= 8000 THEN
        note := jsonb_build_object('id', ev_id)::text;
    END IF;
    PERFORM pg_notify(coalesce(nullif(current_setting('markets.order_channel', true), ''),
                               'order_events'), note);
    RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS orders_outbox ON orders;
CREATE TRIGGER orders_outbox
    AFTER INSERT OR UPDATE ON orders
    FOR EACH ROW EXECUTE FUNCTION orders_outbox();
