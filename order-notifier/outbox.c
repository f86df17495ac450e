#include "outbox.h"

#include "cm/alloc.h"
#include "cm/buf.h"
#include "cm/error.h"
#include "cm/log.h"

#include <inttypes.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#define PAGE_TIMEOUT_MS 5000

/* One statement for every kind of read: a NULL parameter switches its condition off. The
 * planner sees the real values (unnamed statement), so each read uses the index it needs. */
static const char SQL[] =
    "SELECT id::text, user_id, event_type, payload::text, extract(epoch FROM created_at)::text "
    "FROM order_events WHERE id > $1::bigint "
    "AND ($2::bigint IS NULL OR id <= $2::bigint) "
    "AND ($3::float8 IS NULL OR created_at >= to_timestamp($3::float8)) "
    "AND ($4::text IS NULL OR user_id = $4::text) "
    "AND ($5::jsonb IS NULL OR user_id IN (SELECT jsonb_array_elements_text($5::jsonb))) "
    "AND ($6::bigint[] IS NULL OR NOT order_events.id = ANY($6::bigint[])) "
    "ORDER BY order_events.id LIMIT $7::int";

struct on_outbox_read {
    cm_pg_t *pg;
    on_outbox_row_fn row;
    on_outbox_done_fn done;
    void *ud;
    int64_t cursor; /* largest id delivered (or after_id) */
    size_t left;    /* rows still allowed; SIZE_MAX: no limit */
    size_t asked;   /* LIMIT of the page in flight */
    int cancelled;
    char upto[24], since[40];
    char *user_id, *users_json, *skip; /* owned copies, NULL when absent */
};

static void read_free(on_outbox_read_t *r)
{
    cm_free(r->user_id);
    cm_free(r->users_json);
    cm_free(r->skip);
    cm_free(r);
}

static void page_done(cm_pg_t *pg, const PGresult *res, int err, void *ud);
static void start_done(cm_pg_t *pg, const PGresult *res, int err, void *ud);

/* The first id of a time-bounded read. Paging by id from far below it would make Postgres
 * walk the primary key through the whole outbox, filtering by time (a LIMIT over an ordered
 * index looks cheap to the planner, and the recent rows are at the far end): found once
 * through the created_at index instead. A bare min(id) falls into the same trap (Postgres turns
 * it into the first row of the primary key that passes the filter): OFFSET 0 keeps the
 * window's scan on its own index. */
static const char START_SQL[] =
    "SELECT coalesce(min(id), 0)::text FROM (SELECT id FROM order_events "
    "WHERE created_at >= to_timestamp($1::float8) OFFSET 0) w";

static int send_start(on_outbox_read_t *r)
{
    const char *params[1] = {r->since};
    return cm_pg_query(r->pg, START_SQL, 1, params, PAGE_TIMEOUT_MS, start_done, r);
}

static int send_page(on_outbox_read_t *r)
{
    char after[24], limit[16];
    snprintf(after, sizeof after, "%" PRId64, r->cursor);
    /* One row beyond the caller's limit tells a cut read from one that ended. */
    r->asked = r->left < ON_OUTBOX_PAGE ? r->left + 1 : ON_OUTBOX_PAGE;
    snprintf(limit, sizeof limit, "%zu", r->asked);
    const char *params[7] = {
        after,
        r->upto[0] ? r->upto : NULL,
        r->since[0] ? r->since : NULL,
        r->user_id,
        r->users_json,
        r->skip,
        limit,
    };
    return cm_pg_query(r->pg, SQL, 7, params, PAGE_TIMEOUT_MS, page_done, r);
}

static void finish(on_outbox_read_t *r, int status, int truncated)
{
    on_outbox_done_fn done = r->done;
    void *ud = r->ud;
    read_free(r);
    done(status, truncated, ud);
}

/* The outbox's own contract knows two failures: too slow, or anything else. */
static int read_status(int err)
{
    return err == UV_ETIMEDOUT ? UV_ETIMEDOUT : UV_EIO;
}

static void page_done(cm_pg_t *pg, const PGresult *res, int err, void *ud)
{
    on_outbox_read_t *r = ud;
    if (r->cancelled) {
        finish(r, UV_ECANCELED, 0);
        return;
    }
    if (err) {
        cm_log_warn("outbox read failed", "error", cm_strerror(err), "detail",
                    cm_pg_error_detail(pg), NULL);
        finish(r, read_status(err), 0);
        return;
    }
    int n = PQntuples(res);
    int i = 0;
    for (; i < n && !r->cancelled; i++) {
        if (r->left == 0) {
            finish(r, 0, 1);
            return;
        }
        int64_t id = strtoll(PQgetvalue(res, i, 0), NULL, 10);
        if (id > r->cursor)
            r->cursor = id;
        on_event_t ev;
        if (on_event_from_row(id, PQgetvalue(res, i, 1), PQgetvalue(res, i, 2),
                              PQgetvalue(res, i, 3),
                              PQgetisnull(res, i, 4) ? NULL : PQgetvalue(res, i, 4), &ev) != 0) {
            cm_log_warn("skipping an unreadable order_events row", "id", PQgetvalue(res, i, 0),
                        NULL);
            continue;
        }
        if (r->left != SIZE_MAX)
            r->left--;
        r->row(&ev, r->ud);
    }
    if (r->cancelled) {
        finish(r, UV_ECANCELED, 0);
        return;
    }
    /* A short page is the last one; a full one may have more behind it. */
    if ((size_t)n < r->asked) {
        finish(r, 0, 0);
        return;
    }
    int rc = send_page(r);
    if (rc != 0) {
        cm_log_warn("outbox read cut short", "error", uv_strerror(rc), NULL);
        finish(r, rc == UV_ENOTCONN ? UV_EIO : rc, 0);
    }
}

static void start_done(cm_pg_t *pg, const PGresult *res, int err, void *ud)
{
    on_outbox_read_t *r = ud;
    if (r->cancelled) {
        finish(r, UV_ECANCELED, 0);
        return;
    }
    if (err || PQntuples(res) != 1) {
        cm_log_warn("outbox read failed", "error", err ? cm_strerror(err) : "no row", "detail",
                    cm_pg_error_detail(pg), NULL);
        finish(r, err ? read_status(err) : UV_EIO, 0);
        return;
    }
    int64_t first = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    if (first == 0) {
        finish(r, 0, 0); /* nothing in the window */
        return;
    }
    if (first - 1 > r->cursor)
        r->cursor = first - 1;
    int rc = send_page(r);
    if (rc != 0) {
        cm_log_warn("outbox read cut short", "error", uv_strerror(rc), NULL);
        finish(r, rc == UV_ENOTCONN ? UV_EIO : rc, 0);
    }
}

/* "{1,2,3}": a Postgres array literal of the ids to leave out. */
static char *skip_literal(const int64_t *ids, size_t n)
{
    cm_buf_t b = CM_BUF_INIT;
    int ok = cm_buf_append(&b, "{", 1) == 0;
    for (size_t i = 0; ok && i < n; i++) {
        char num[24];
        int len = snprintf(num, sizeof num, "%s%" PRId64, i ? "," : "", ids[i]);
        ok = cm_buf_append(&b, num, (size_t)len) == 0;
    }
    ok = ok && cm_buf_append(&b, "}", 1) == 0;
    if (!ok) {
        cm_buf_free(&b);
        return NULL;
    }
    return cm_buf_steal(&b);
}

int on_outbox_read(cm_pg_t *pg, const on_outbox_query_t *q, on_outbox_row_fn row,
                   on_outbox_done_fn done, void *ud, on_outbox_read_t **out)
{
    if (!pg || !q || !row || !done || q->after_id < 0)
        return UV_EINVAL;
    on_outbox_read_t *r = cm_calloc(1, sizeof *r);
    if (!r)
        return UV_ENOMEM;
    r->pg = pg;
    r->row = row;
    r->done = done;
    r->ud = ud;
    r->cursor = q->after_id;
    r->left = q->limit ? q->limit : SIZE_MAX;
    if (q->upto_id > 0)
        snprintf(r->upto, sizeof r->upto, "%" PRId64, q->upto_id);
    if (q->since > 0)
        snprintf(r->since, sizeof r->since, "%.6f", q->since);
    if ((q->user_id && !(r->user_id = cm_strdup(q->user_id))) ||
        (q->users_json && !(r->users_json = cm_strdup(q->users_json))) ||
        (q->nskip > 0 && !(r->skip = skip_literal(q->skip, q->nskip)))) {
        read_free(r);
        return UV_ENOMEM;
    }
    int rc = r->since[0] ? send_start(r) : send_page(r);
    if (rc != 0) {
        read_free(r);
        return rc;
    }
    if (out)
        *out = r;
    return 0;
}

void on_outbox_cancel(on_outbox_read_t *r)
{
    if (r)
        r->cancelled = 1;
}
