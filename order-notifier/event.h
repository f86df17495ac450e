/*
 * event.h: order events as they travel NOTIFY -> Redis -> WebSocket.
 *
 * An event comes from a NOTIFY payload, an `order_events` row or a Redis message and always
 * goes out through the allow-list: only the contract's order fields (id, user_id, market, side,
 * price, quantity, filled_quantity, status, updated_at) are copied, so a column added to
 * `orders` later can never reach Redis or a socket, whatever the trigger puts in the payload.
 * Decimals stay strings end to end (cJSON numbers are doubles).
 */
#ifndef ON_EVENT_H
#define ON_EVENT_H

#include "cm/buf.h"

#include <stddef.h>
#include <stdint.h>

struct cJSON;

typedef struct on_event {
    int64_t id;          /* order_events.id, > 0 */
    char *user_id;       /* owned */
    char *event_type;    /* owned, e.g. "order.updated" */
    double created_at;   /* commit-side timestamp, Unix seconds (0: unknown) */
    int64_t order_id;    /* the order's id (0: unknown), for per-order order at receivers */
    struct cJSON *order; /* owned, allow-listed copy */
} on_event_t;

/* The order fields that may leave Postgres, NULL-terminated. */
extern const char *const on_event_order_fields[];

/*
 * Parses a NOTIFY payload or a Redis message (`len` bytes, borrowed):
 * {"id","user_id","event_type","created_at","order":{...}}. Returns 0 with *ev filled (clear
 * with on_event_clear), UV_EAGAIN when it carries only {"id"} (the payload was too big for
 * NOTIFY: read the row; ev->id is set and nothing else), UV_EINVAL (also when cJSON ran out of
 * memory reading it: it does not tell the two apart) or UV_ENOMEM.
 */
int on_event_parse(const char *payload, size_t len, on_event_t *ev);

/*
 * Builds an event from an `order_events` row: `id`, `user_id`, `event_type`, `payload_json`
 * (the jsonb column as text) and `created_at` (epoch seconds as text, may be NULL); all
 * borrowed. Returns 0, UV_EINVAL or UV_ENOMEM.
 */
int on_event_from_row(int64_t id, const char *user_id, const char *event_type,
                      const char *payload_json, const char *created_at, on_event_t *ev);

/* Appends the Redis pub/sub message for `ev` (the parse format above) to `out`.
 * Returns 0 or UV_ENOMEM. */
int on_event_message(const on_event_t *ev, cm_buf_t *out);
/* Appends the client frame {"type":"order_update","event_id",...,"order":{...}} to `out`.
 * Returns 0 or UV_ENOMEM. */
int on_event_frame(const on_event_t *ev, cm_buf_t *out);

/*
 * The message the leader publishes: a header line "e1 <id> <created_at> <order_id>\n" and the
 * client
 * frame itself, so that the event is decoded and encoded once, by the leader, and every
 * replica passes the frame on as it is (the allow-list was applied when it was built).
 * Receivers still read the older JSON message (on_event_parse) during an upgrade.
 */
int on_event_envelope(const on_event_t *ev, cm_buf_t *out);
/* Reads an envelope (`len` bytes at `msg`, borrowed): the id, the commit-side time, the order
 * id (0 when the header has none) and the frame (*frame points into `msg`). Returns 0, or
 * UV_EINVAL when `msg` is not one (a bad header, or a frame that is not UTF-8 text). */
int on_event_envelope_parse(const char *msg, size_t len, int64_t *id, double *created_at,
                            int64_t *order_id, const char **frame, size_t *frame_len);
/* The Redis channel of a user: "orders:user:<user_id>", appended to `out`. */
int on_event_channel(const char *user_id, cm_buf_t *out);

/* Releases what `ev` owns and zeroes it. */
void on_event_clear(on_event_t *ev);

#endif
