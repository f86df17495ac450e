/*
 * pg_query.c: statements: copied into one block, queued, sent on an idle connection, their
 * results read and delivered, their deadlines kept.
 *
 * A statement refused with SQLSTATE 25006 (read_only_sql_transaction) means the session sits on
 * a read-only server (a standby, or a primary demoted under us): the connection is dropped and
 * opened again, so target_session_attrs picks the host again, rather than kept for more writes
 * that must fail.
 */
#include "pg_internal.h"

#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>

#include "cm/alloc.h"
#include "cm/error.h"
#include "cm/log.h"

/* ------------------------------------------------------------------------------------------ */
/* Queues                                                                                      */

void pg_q_push(queue_t *q, query_t *x)
{
    x->owner = q;
    x->next = NULL;
    x->prev = q->tail;
    if (q->tail)
        q->tail->next = x;
    else
        q->head = x;
    q->tail = x;
    q->len++;
}

void pg_q_push_front(queue_t *q, query_t *x)
{
    x->owner = q;
    x->prev = NULL;
    x->next = q->head;
    if (q->head)
        q->head->prev = x;
    else
        q->tail = x;
    q->head = x;
    q->len++;
}

void pg_q_remove(queue_t *q, query_t *x)
{
    if (x->prev)
        x->prev->next = x->next;
    else
        q->head = x->next;
    if (x->next)
        x->next->prev = x->prev;
    else
        q->tail = x->prev;
    x->next = x->prev = NULL;
    x->owner = NULL;
    q->len--;
}

query_t *pg_q_pop(queue_t *q)
{
    query_t *x = q->head;
    if (x)
        pg_q_remove(q, x);
    return x;
}

/* Copies the statement and its parameters into one block. */
query_t *pg_query_new(cm_pg_t *pg, const char *sql, int nparams, const char *const *params,
                      uint64_t timeout_ms, cm_pg_result_fn cb, void *ud)
{
    size_t sql_len = strlen(sql) + 1;
    size_t size = sizeof(query_t) + (size_t)nparams * sizeof(char *) + sql_len;
    for (int i = 0; i < nparams; i++)
        if (params[i])
            size += strlen(params[i]) + 1;
    query_t *q = cm_malloc(size);
    if (!q)
        return NULL;
    memset(q, 0, sizeof *q);
    char **pv = (char **)(q + 1);
    char *p = (char *)(pv + nparams);
    for (int i = 0; i < nparams; i++) {
        if (!params[i]) {
            pv[i] = NULL;
            continue;
        }
        size_t n = strlen(params[i]) + 1;
        memcpy(p, params[i], n);
        pv[i] = p;
        p += n;
    }
    memcpy(p, sql, sql_len);
    q->sql = p;
    q->params = (const char *const *)pv;
    q->nparams = nparams;
    q->cb = cb;
    q->ud = ud;
    q->deadline_ms = timeout_ms ? uv_now(pg->loop) + timeout_ms : 0;
    q->timeout_ms = timeout_ms;
    return q;
}

/* ------------------------------------------------------------------------------------------ */
/* Delivering results                                                                          */

/* Queues `q` for an error callback from the loop. `detail` (may be NULL) is copied. */
void pg_fail_later(cm_pg_t *pg, query_t *q, int err, const char *detail)
{
    q->err = err;
    snprintf(q->detail, sizeof q->detail, "%s", detail ? detail : "");
    pg_q_push(&pg->failed, q);
    pg_schedule_defer(pg);
}

void pg_fail_queue_later(cm_pg_t *pg, queue_t *from, int err, const char *detail)
{
    query_t *q;
    while ((q = pg_q_pop(from)) != NULL)
        pg_fail_later(pg, q, err, detail);
}

/* Calls the statement's callback with its outcome; `detail` is what cm_pg_error_detail gives
 * meanwhile. Saved and restored: a callback may close the client, which delivers nothing
 * synchronously, but nothing here should depend on that. */
void pg_deliver(cm_pg_t *pg, query_t *q, const PGresult *res, int err, const char *detail)
{
    if (!q->cb)
        return;
    int saved_err = pg->cb_err;
    const char *saved_detail = pg->cb_detail;
    pg->cb_err = err;
    pg->cb_detail = detail && *detail ? detail : NULL;
    q->cb(pg, res, err, q->ud);
    pg->cb_err = saved_err;
    pg->cb_detail = saved_detail;
}

/* ------------------------------------------------------------------------------------------ */
/* Sending and receiving                                                                       */

/* Sends the next statement if the connection is idle. */
void pg_conn_dispatch(conn_t *c)
{
    cm_pg_t *pg = c->pg;
    queue_t *from = c->listen ? &pg->lqueue : &pg->queue;
    while (c->state == C_IDLE && !c->move && !pg->closing && from->head) {
        query_t *q = pg_q_pop(from);
        if (PQsendQueryParams(c->pq, q->sql, q->nparams, NULL, q->params, NULL, NULL, 0) != 1) {
            char err[200];
            pg_error_copy(c->pg, err, sizeof err, PQerrorMessage(c->pq));
            if (PQstatus(c->pq) == CONNECTION_BAD) {
                /* Not the statement's fault: give it back; the connection is dropped from the
                 * loop (this may run inside cm_pg_query). */
                pg_q_push_front(from, q);
                pg_conn_break(c, err);
                return;
            }
            /* The connection is fine: libpq refused the statement itself. */
            pg_fail_later(pg, q, UV_EINVAL, err);
            continue;
        }
        c->q = q;
        c->state = C_BUSY;
        if (q->deadline_ms) {
            uint64_t now = uv_now(pg->loop);
            uv_timer_start(&c->timer, pg_on_conn_timer,
                           q->deadline_ms > now ? q->deadline_ms - now : 0, 0);
        }
        char err[200];
        if (pg_conn_flush(c, err, sizeof err) != 0) {
            pg_conn_break(c, err);
            return;
        }
        pg_poller_set(c, UV_READABLE | (c->flushing ? UV_WRITABLE : 0));
    }
}

/* Finds an idle pool connection for the head of the pool queue. */
void pg_pool_dispatch(cm_pg_t *pg)
{
    for (int i = 0; i < pg->npool && pg->queue.head; i++)
        if (pg->pool[i].state == C_IDLE)
            pg_conn_dispatch(&pg->pool[i]);
}

static void drain_notifies(conn_t *c, uint64_t gen)
{
    cm_pg_t *pg = c->pg;
    PGnotify *n;
    while (c->gen == gen && c->pq && (n = PQnotifies(c->pq)) != NULL) {
        if (c->listen && pg->cfg.on_notify && !pg->closing)
            pg->cfg.on_notify(pg, n->relname, n->extra ? n->extra : "", n->be_pid, pg->cfg.ud);
        PQfreemem(n);
    }
}

/* The code a finished statement gets (see cm_pg_result_fn): a result that carries an SQLSTATE
 * is the server's verdict; one without is libpq's own (a connection that broke under the
 * statement, or an answer it could not read). */
static int result_error(const conn_t *c, const PGresult *res, const char *sqlstate)
{
    ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK || st == PGRES_EMPTY_QUERY)
        return 0;
    if (sqlstate && *sqlstate)
        return strcmp(sqlstate, "25006") == 0 ? CM_EREADONLY : CM_ESERVER;
    if (PQstatus(c->pq) == CONNECTION_BAD)
        return UV_ENOTCONN;
    return CM_EPROTO;
}

/* The statement in flight is complete: deliver its last result. */
static void complete_query(conn_t *c)
{
    cm_pg_t *pg = c->pg;
    query_t *q = c->q;
    PGresult *res = c->res;
    c->q = NULL;
    c->res = NULL;
    c->state = C_IDLE;
    uv_timer_stop(&c->timer);
    if (c->move)
        uv_timer_start(&c->timer, pg_on_conn_timer, 0, 0); /* reopened on the others' host */
    const char *sqlstate = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    if (sqlstate && strcmp(sqlstate, "25006") == 0) {
        /* Before the callback, so nothing it queues goes to this session. */
        c->read_only = 1;
        cm_log_warn("postgres server is read-only; reconnecting", "conn", pg_conn_label(c), NULL);
        pg_conn_break(c, "server is read-only (SQLSTATE 25006)");
    }
    if (q) {
        int err = result_error(c, res, sqlstate);
        char detail[300] = "";
        if (err)
            pg_error_copy(pg, detail, sizeof detail,
                          res ? PQresultErrorMessage(res) : PQerrorMessage(c->pq));
        pg_deliver(pg, q, res, err, detail);
    }
    if (res)
        PQclear(res);
    cm_free(q);
}

/* The connection failed in libpq's own words: it is dropped (and reconnects). */
static void drop_libpq_error(conn_t *c)
{
    char err[200];
    pg_error_copy(c->pg, err, sizeof err, PQerrorMessage(c->pq));
    pg_conn_drop(c, err, 0);
}

void pg_process_input(conn_t *c)
{
    cm_pg_t *pg = c->pg;
    uint64_t gen = c->gen;
    if (!PQconsumeInput(c->pq)) {
        drop_libpq_error(c);
        return;
    }
    c->last_rx_ms = uv_now(pg->loop);
    drain_notifies(c, gen);
    if (c->gen != gen)
        return;
    char why[200];
    if (c->flushing && pg_conn_flush(c, why, sizeof why) != 0) {
        pg_conn_drop(c, why, 0);
        return;
    }
    while (c->gen == gen && !PQisBusy(c->pq)) {
        PGresult *res = PQgetResult(c->pq);
        if (!res) {
            if (c->state == C_BUSY) {
                complete_query(c);
                if (c->gen != gen || pg->closing)
                    return;
                drain_notifies(c, gen);
                if (c->gen != gen)
                    return;
                if (c->listen)
                    pg_conn_dispatch(c);
                else
                    pg_pool_dispatch(pg);
                if (c->gen != gen)
                    return;
            }
            break;
        }
        if (c->state == C_BUSY) {
            if (c->res)
                PQclear(c->res); /* keep the last one */
            c->res = res;
        } else {
            PQclear(res); /* nothing asked: an error the server sent on its own */
        }
        drain_notifies(c, gen);
    }
    if (c->gen != gen || c->state == C_BROKEN)
        return;
    if (PQstatus(c->pq) == CONNECTION_BAD) {
        drop_libpq_error(c);
        return;
    }
    pg_poller_set(c, UV_READABLE | (c->flushing ? UV_WRITABLE : 0));
}

/* ------------------------------------------------------------------------------------------ */
/* Deadlines                                                                                   */

static void on_queue_timer(uv_timer_t *t)
{
    cm_pg_t *pg = t->data;
    uint64_t now = uv_now(pg->loop);
    uint64_t due = 0;
    pg->queue_due = 0;
    queue_t *queues[2] = {&pg->queue, &pg->lqueue};
    for (int i = 0; i < 2; i++) {
        for (query_t *q = queues[i]->head, *next; q; q = next) {
            next = q->next;
            if (!q->deadline_ms)
                continue;
            if (q->deadline_ms <= now) {
                pg_q_remove(queues[i], q);
                pg->stats.timeouts++;
                pg_fail_later(pg, q, UV_ETIMEDOUT, "statement timeout while queued");
            } else if (!due || q->deadline_ms < due) {
                due = q->deadline_ms;
            }
        }
    }
    if (due && !pg->closing) {
        pg->queue_due = due;
        uv_timer_start(&pg->queue_timer, on_queue_timer, due - now, 0);
    }
}

/* A statement with a deadline was queued: make sure the queue timer fires by then. */
void pg_queue_deadline(cm_pg_t *pg, uint64_t deadline_ms)
{
    if (!deadline_ms || (pg->queue_due && pg->queue_due <= deadline_ms))
        return;
    uint64_t now = uv_now(pg->loop);
    pg->queue_due = deadline_ms;
    uv_timer_start(&pg->queue_timer, on_queue_timer, deadline_ms > now ? deadline_ms - now : 0, 0);
}

/* The connection's timer fired while a statement is in flight (its deadline). */
void pg_query_deadline(conn_t *c)
{
    cm_pg_t *pg = c->pg;
    /* A connection whose input keeps coming is alive, not stalled: on the LISTEN session a
     * burst of notifications arrives ahead of the result, and a loop busy with them must
     * not blame the server. Input waiting in the socket is read before judging. */
    uint64_t now = uv_now(pg->loop);
    if (c->fd >= 0) {
        struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
        if (poll(&pfd, 1, 0) == 1 && (pfd.revents & POLLIN)) {
            uint64_t gen = c->gen;
            pg_process_input(c);
            if (c->gen != gen || c->state != C_BUSY || pg->closing)
                return;
        }
    }
    if (c->q && c->q->timeout_ms && c->last_rx_ms && now - c->last_rx_ms < c->q->timeout_ms) {
        uv_timer_start(&c->timer, pg_on_conn_timer, c->last_rx_ms + c->q->timeout_ms - now, 0);
        return;
    }
    /* The statement in flight missed its deadline. PQcancel would block the loop, so the
     * connection is dropped and reopened instead. */
    query_t *q = c->q;
    c->q = NULL;
    pg->stats.timeouts++;
    char detail[64];
    snprintf(detail, sizeof detail, "statement timeout after %" PRIu64 " ms", q->timeout_ms);
    pg_deliver(pg, q, NULL, UV_ETIMEDOUT, detail);
    cm_free(q);
    if (!pg->closing && c->state == C_BUSY)
        pg_conn_drop(c, "statement timeout", 1);
}
