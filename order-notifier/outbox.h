/*
 * outbox.h: the one reader of `order_events`, the outbox the trigger writes in the same
 * transaction as each order change.
 *
 * A leader's catch-up, a replica's replay after its Redis subscriber reconnects, a client's
 * resume and the read of an event too big for NOTIFY all go through here. A read is paged by
 * id (ORDER BY order_events.id, so "10" never sorts before "9") until a page comes back short:
 * there is no row cap but the caller's own `limit`, and when that limit cuts the read short
 * the caller is told (`truncated`), so it can tell its client. Rows reach the caller in
 * ascending id order, each id once.
 *
 * Ids are handed out before commit, so a lower id can commit after a higher one was read: a
 * reader that must not miss those looks back in time (`since`) rather than trusting
 * `id > last`; the live path (NOTIFY) brings the ones that commit during the read.
 */
#ifndef ON_OUTBOX_H
#define ON_OUTBOX_H

#include "event.h"

#include "cm/pg.h"

#include <stddef.h>
#include <stdint.h>

typedef struct on_outbox_query {
    int64_t after_id;       /* rows with id > after_id */
    int64_t upto_id;        /* ... and id <= upto_id; 0: no upper bound */
    double since;           /* ... and created_at >= since (Unix seconds); 0: any age */
    const char *user_id;    /* ... of this user; NULL: see users_json */
    const char *users_json; /* ... of these users (a JSON array); both NULL: every user */
    const int64_t *skip;    /* ... except these ids (the client has them); may be NULL */
    size_t nskip;
    size_t limit; /* most rows in all; 0: every row */
} on_outbox_query_t;

typedef struct on_outbox_read on_outbox_read_t;

/* One row, in ascending id order. The callee owns *ev (on_event_clear it, or keep it). Rows
 * that do not decode are skipped with a warning. */
typedef void (*on_outbox_row_fn)(on_event_t *ev, void *ud);
/*
 * The read is over: status 0, UV_ECANCELED (on_outbox_cancel), UV_ETIMEDOUT or UV_EIO (a
 * query failed; the rows delivered so far stand). `truncated` is 1 when `limit` stopped the
 * read with rows left. Fires exactly once, never from inside on_outbox_read; the read is freed
 * after it returns.
 */
typedef void (*on_outbox_done_fn)(int status, int truncated, void *ud);

/*
 * Starts a read. `q` and everything it points to are borrowed (copied before return). Returns
 * 0 and *out (valid until `done` fires; may be NULL if the caller does not need to cancel), or
 * UV_ENOTCONN (no pool connection), UV_ENOMEM, UV_EINVAL: then `done` does not fire.
 */
int on_outbox_read(cm_pg_t *pg, const on_outbox_query_t *q, on_outbox_row_fn row,
                   on_outbox_done_fn done, void *ud, on_outbox_read_t **out);
/* Stops a read: no more rows; `done` fires with UV_ECANCELED once the page in flight returns
 * (or after the current row callback returns, when called from one). */
void on_outbox_cancel(on_outbox_read_t *r);

/* Rows per page (for tests). */
#define ON_OUTBOX_PAGE 2000

#endif
