/*
 * pg.c: the asynchronous Postgres client (cm/pg.h) on libpq's non-blocking mode: the public
 * calls, the pool's state as callers see it, results delivered from the loop, and close.
 *
 * The rest, private to common/: pg_conn.c (a connection's life: connect host by host, up, down,
 * backoff), pg_query.c (statements: queues, send, results, deadlines), pg_target.c (the hosts
 * of DATABASE_URL) and pg_internal.h (the structs they share). How it is put together:
 *
 * - `conn_t` is one PGconn: the pool connections and, optionally, the LISTEN session. Each
 *   socket gets its own heap `poller_t` (a uv_poll_t): the socket changes across reconnects
 *   (and may change inside PQconnectPoll), and a closed uv handle cannot be reused before its
 *   close callback, so a new socket simply gets a new poller while the old one closes.
 *   The poller is always closed before PQfinish closes the descriptor.
 * - One timer per connection serves the state it is in: connect deadline (connecting),
 *   reconnect backoff (down) or the in-flight statement's deadline (busy).
 * - `query_t` holds a statement with its parameters copied into one block. Statements wait in
 *   the pool FIFO (or the LISTEN FIFO) until a connection is idle; one timer, armed for the
 *   earliest deadline found by a scan, expires queued statements.
 * - Failures found inside a call or while a connection is torn down are delivered from a
 *   zero-delay timer (the `failed` list), so no callback ever fires inside the call that
 *   started the work and teardown never re-enters user code half-way.
 * - User callbacks may call back into this module (query, listen_reset, close): each
 *   connection carries a generation number, checked after every callback.
 */
#include "pg_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cm/alloc.h"
#include "cm/error.h"
#include "cm/log.h"
#include "cm/redact.h"

/* ------------------------------------------------------------------------------------------ */
/* Deferred delivery and messages                                                              */

static void on_defer(uv_timer_t *t);

void pg_schedule_defer(cm_pg_t *pg)
{
    if (!pg->closed_handles)
        uv_timer_start(&pg->defer_timer, on_defer, 0, 0);
}

/* Copies a libpq message on one line: libpq ends messages with a newline and indents hints
 * on further lines, which would break one-line logs and error strings. */
void pg_trim_copy(char *dst, size_t cap, const char *msg)
{
    size_t n = 0;
    int space = 0;
    if (!msg || !*msg)
        msg = "unknown error";
    for (const char *p = msg; *p && n + 1 < cap; p++) {
        if (*p == '\n' || *p == '\t' || *p == '\r' || *p == ' ') {
            space = 1;
            continue;
        }
        if (space && n > 0 && n + 2 < cap)
            dst[n++] = ' ';
        space = 0;
        dst[n++] = *p;
    }
    dst[n] = '\0';
}

/* Writes `src` into dst with every occurrence of secret[0..n) as CM_REDACTED. */
static void mask_all(char *dst, size_t cap, const char *src, const char *const *secret,
                     const size_t *len, int n)
{
    size_t o = 0;
    for (const char *p = src; *p && o + 1 < cap;) {
        int hit = -1;
        for (int i = 0; i < n && hit < 0; i++) {
            if (len[i] && strncmp(p, secret[i], len[i]) == 0)
                hit = i;
        }
        if (hit >= 0) {
            o += (size_t)snprintf(dst + o, cap - o, "%s", CM_REDACTED);
            if (o >= cap)
                o = cap - 1;
            p += len[hit];
        } else
            dst[o++] = *p++;
    }
    dst[o] = '\0';
}

void pg_error_copy(const cm_pg_t *pg, char *dst, size_t cap, const char *msg)
{
    char trimmed[512];
    pg_trim_copy(trimmed, sizeof trimmed, msg);
    /* What libpq read as the password, and what a host name holds before an '@' (the rest of
     * a password whose '@' was not written %40; cm_pg_conninfo_check refuses it at start-up,
     * cm_pg_open alone does not): masked wherever they show. Host names stay readable. */
    const char *secret[8];
    size_t len[8];
    int n = 0;
    for (const PQconninfoOption *o = pg->opts; o && o->keyword && n < 8; o++) {
        if (!o->val || !*o->val)
            continue;
        if (strcmp(o->keyword, "password") == 0) {
            secret[n] = o->val;
            len[n++] = strlen(o->val);
        } else if (strcmp(o->keyword, "host") == 0) {
            for (const char *h = o->val; *h && n < 8;) {
                size_t hl = strcspn(h, ",");
                const char *at = NULL;
                for (const char *q = h; q < h + hl; q++)
                    at = *q == '@' ? q : at;
                if (at && *h != '/' && at > h) {
                    secret[n] = h;
                    len[n++] = (size_t)(at - h);
                }
                h += hl + (h[hl] == ',');
            }
        }
    }
    mask_all(dst, cap, trimmed, secret, len, n);
}

/* ------------------------------------------------------------------------------------------ */
/* State reporting                                                                             */

static int pool_available(const cm_pg_t *pg)
{
    for (int i = 0; i < pg->npool; i++) {
        const conn_t *c = &pg->pool[i];
        if (c->state == C_IDLE || c->state == C_BUSY || c->resetting)
            return 1;
    }
    return 0;
}

static void report(cm_pg_t *pg, int listen, int up, const char *error, int intentional)
{
    int *rep = listen ? &pg->lreported : &pg->reported;
    if (*rep == up)
        return;
    *rep = up;
    const char *what = listen ? "listen" : "pool";
    if (up)
        cm_log_info("postgres connected", "conn", what, NULL);
    else
        cm_log(intentional ? CM_LOG_INFO : CM_LOG_ERROR, "postgres unavailable", "conn", what,
               "error", error ? error : "unknown", NULL);
    if (!up) {
        /* Nothing can run them now: fail what waits (from the loop). */
        pg_fail_queue_later(pg, listen ? &pg->lqueue : &pg->queue, UV_ENOTCONN,
                            "connection lost: no connection");
    }
    if (pg->cfg.on_state && !pg->closing)
        pg->cfg.on_state(pg, listen, up, up ? NULL : error, pg->cfg.ud);
}

void pg_report_conn(conn_t *c, const char *error, int intentional)
{
    cm_pg_t *pg = c->pg;
    if (c->listen)
        report(pg, 1, c->state == C_IDLE || c->state == C_BUSY, error, intentional);
    else
        report(pg, 0, pool_available(pg), error, intentional);
}

/* ------------------------------------------------------------------------------------------ */
/* Public API                                                                                  */

void cm_pg_config_defaults(cm_pg_config_t *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->pool_size = 4;
    cfg->connect_timeout_ms = 2000;
    cfg->backoff_min_ms = 100;
    cfg->backoff_max_ms = 5000;
    cfg->keepalive_idle_s = 5;
}

static void free_parts(cm_pg_t *pg)
{
    cm_free(pg->conninfo);
    cm_free(pg->app_name);
    cm_free(pg->pool);
    cm_free(pg->lconn);
    cm_free(pg->targets);
    cm_free(pg->target_buf);
    cm_free(pg->kw);
    cm_free(pg->val);
    if (pg->opts)
        PQconninfoFree(pg->opts);
    cm_free(pg);
}

int cm_pg_open(uv_loop_t *loop, const cm_pg_config_t *cfg, cm_pg_t **out)
{
    if (!loop || !cfg || !out || !cfg->conninfo || cfg->pool_size < 1 || cfg->pool_size > 1000 ||
        cfg->connect_timeout_ms == 0 || cfg->backoff_max_ms < cfg->backoff_min_ms ||
        cfg->keepalive_idle_s < 0)
        return UV_EINVAL;
    /* Reject a malformed DATABASE_URL now rather than retrying it forever. */
    char *errmsg = NULL;
    PQconninfoOption *opts = PQconninfoParse(cfg->conninfo, &errmsg);
    if (!opts) {
        if (errmsg) {
            char err[200], safe[256];
            pg_trim_copy(err, sizeof err, errmsg);
            /* libpq's message quotes the URL back, password included. */
            cm_log_error("invalid DATABASE_URL", "error",
                         cm_redact_message(err, cfg->conninfo, safe, sizeof safe), NULL);
            PQfreemem(errmsg);
        }
        return UV_EINVAL;
    }

    cm_pg_t *pg = cm_calloc(1, sizeof *pg);
    if (!pg) {
        PQconninfoFree(opts);
        return UV_ENOMEM;
    }
    pg->loop = loop;
    pg->cfg = *cfg;
    pg->opts = opts;
    pg->conninfo = cm_strdup(cfg->conninfo);
    pg->app_name = cfg->application_name ? cm_strdup(cfg->application_name) : NULL;
    pg->npool = cfg->pool_size;
    pg->pool = cm_calloc((size_t)pg->npool, sizeof *pg->pool);
    pg->lconn = cfg->on_notify ? cm_calloc(1, sizeof *pg->lconn) : NULL;
    if (!pg->conninfo || (cfg->application_name && !pg->app_name) || !pg->pool ||
        (cfg->on_notify && !pg->lconn) || pg_targets_build(pg) != 0) {
        free_parts(pg);
        return UV_ENOMEM;
    }
    pg->cfg.conninfo = pg->conninfo;
    pg->cfg.application_name = pg->app_name;
    snprintf(pg->keepalive_idle, sizeof pg->keepalive_idle, "%d",
             cfg->keepalive_idle_s ? cfg->keepalive_idle_s : 5);
    pg->reported = -1;
    pg->lreported = -1;
    uv_timer_init(loop, &pg->queue_timer);
    pg->queue_timer.data = pg;
    uv_timer_init(loop, &pg->defer_timer);
    pg->defer_timer.data = pg;
    pg->handles_open += 2;
    for (int i = 0; i < pg->npool; i++)
        pg_conn_init(pg, &pg->pool[i], 0, i);
    if (pg->lconn)
        pg_conn_init(pg, pg->lconn, 1, 0);
    /* Connecting starts from the loop: on_state never fires inside this call. */
    for (int i = 0; i < pg->npool; i++)
        uv_timer_start(&pg->pool[i].timer, pg_on_conn_timer, 0, 0);
    if (pg->lconn)
        uv_timer_start(&pg->lconn->timer, pg_on_conn_timer, 0, 0);
    *out = pg;
    return 0;
}

int cm_pg_is_up(const cm_pg_t *pg)
{
    return pg && !pg->closing && pg->reported == 1;
}

int cm_pg_listen_is_up(const cm_pg_t *pg)
{
    return pg && !pg->closing && pg->lconn && pg->lreported == 1;
}

static int submit(cm_pg_t *pg, int listen, const char *sql, int nparams, const char *const *params,
                  uint64_t timeout_ms, cm_pg_result_fn cb, void *ud)
{
    if (!pg || !sql || nparams < 0 || (nparams > 0 && !params) || !cb)
        return UV_EINVAL;
    if (listen && !pg->lconn)
        return UV_EINVAL;
    if (pg->closing)
        return UV_ENOTCONN;
    queue_t *queue = listen ? &pg->lqueue : &pg->queue;
    if (listen ? pg->lreported != 1 : pg->reported != 1)
        return UV_ENOTCONN;
    if (queue->len >= QUEUE_MAX)
        return UV_EBUSY;
    query_t *q = pg_query_new(pg, sql, nparams, params, timeout_ms, cb, ud);
    if (!q)
        return UV_ENOMEM;
    pg_q_push(queue, q);
    if (listen)
        pg_conn_dispatch(pg->lconn);
    else
        pg_pool_dispatch(pg);
    /* Still queued (no idle connection): the queue timer watches its deadline. */
    if (q->owner == queue)
        pg_queue_deadline(pg, q->deadline_ms);
    return 0;
}

int cm_pg_query(cm_pg_t *pg, const char *sql, int nparams, const char *const *params,
                uint64_t timeout_ms, cm_pg_result_fn cb, void *ud)
{
    return submit(pg, 0, sql, nparams, params, timeout_ms, cb, ud);
}

int cm_pg_listen_query(cm_pg_t *pg, const char *sql, int nparams, const char *const *params,
                       uint64_t timeout_ms, cm_pg_result_fn cb, void *ud)
{
    return submit(pg, 1, sql, nparams, params, timeout_ms, cb, ud);
}

void cm_pg_listen_reset(cm_pg_t *pg)
{
    if (!pg || !pg->lconn || pg->closing)
        return;
    conn_t *c = pg->lconn;
    if (c->state == C_DOWN) {
        /* Already down and waiting for its backoff: try now. */
        uv_timer_start(&c->timer, pg_on_conn_timer, 0, 0);
        return;
    }
    /* Already being dropped for a reason of its own (a read-only server): keep its backoff,
     * or a caller that resets on every failure would reconnect to that server in a loop. */
    if (c->state == C_BROKEN)
        return;
    pg_conn_drop(c, "reset", 1);
}

int cm_pg_listen_backend_pid(const cm_pg_t *pg)
{
    if (!pg || pg->closing || !pg->lconn || !pg->lconn->pq || pg->lreported != 1)
        return 0;
    return PQbackendPID(pg->lconn->pq);
}

void cm_pg_stats(const cm_pg_t *pg, cm_pg_stats_t *out)
{
    *out = pg->stats;
    out->queued = pg->queue.len;
}

/* ------------------------------------------------------------------------------------------ */
/* Close                                                                                       */

void pg_finish_if_done(cm_pg_t *pg)
{
    if (pg->handles_open > 0)
        return;
    void (*done)(void *) = pg->done;
    void *done_ud = pg->done_ud;
    free_parts(pg);
    if (done)
        done(done_ud);
}

static void on_conn_timer_closed(uv_handle_t *h)
{
    conn_t *c = h->data;
    cm_pg_t *pg = c->pg;
    pg->handles_open--;
    pg_finish_if_done(pg);
}

static void on_handle_closed(uv_handle_t *h)
{
    cm_pg_t *pg = h->data;
    pg->handles_open--;
    pg_finish_if_done(pg);
}

static void on_defer(uv_timer_t *t)
{
    cm_pg_t *pg = t->data;
    query_t *q;
    while ((q = pg_q_pop(&pg->failed)) != NULL) {
        pg_deliver(pg, q, NULL, q->err, q->detail);
        cm_free(q);
    }
    if (!pg->closing || pg->closed_handles)
        return;
    /* Close: tear every connection down, fail what is left, then close the handles. */
    for (int i = 0; i < pg->npool; i++)
        pg_conn_drop(&pg->pool[i], "closing", 0);
    if (pg->lconn)
        pg_conn_drop(pg->lconn, "closing", 0);
    pg_fail_queue_later(pg, &pg->queue, UV_ECANCELED, NULL);
    pg_fail_queue_later(pg, &pg->lqueue, UV_ECANCELED, NULL);
    while ((q = pg_q_pop(&pg->failed)) != NULL) {
        pg_deliver(pg, q, NULL, q->err, q->detail);
        cm_free(q);
    }
    pg->closed_handles = 1;
    for (int i = 0; i < pg->npool; i++)
        uv_close((uv_handle_t *)&pg->pool[i].timer, on_conn_timer_closed);
    if (pg->lconn)
        uv_close((uv_handle_t *)&pg->lconn->timer, on_conn_timer_closed);
    uv_close((uv_handle_t *)&pg->queue_timer, on_handle_closed);
    uv_close((uv_handle_t *)&pg->defer_timer, on_handle_closed);
}

void cm_pg_close(cm_pg_t *pg, void (*done)(void *ud), void *ud)
{
    if (!pg || pg->closing)
        return;
    pg->closing = 1;
    pg->done = done;
    pg->done_ud = ud;
    uv_timer_stop(&pg->queue_timer);
    pg_schedule_defer(pg);
}

const char *cm_pg_error_detail(const cm_pg_t *pg)
{
    if (!pg || !pg->cb_err)
        return "";
    return pg->cb_detail ? pg->cb_detail : cm_strerror(pg->cb_err);
}
