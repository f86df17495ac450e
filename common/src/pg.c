/*
 * pg.c: the asynchronous Postgres client (cm/pg.h) on libpq's non-blocking mode.
 *
 * Private to common/. How it is put together:
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
#include "cm/pg.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "cm/alloc.h"
#include "cm/log.h"

#define QUEUE_MAX 10000

typedef struct query query_t;
typedef struct queue queue_t;
struct query {
    query_t *next, *prev;
    queue_t *owner; /* the queue holding it, NULL when in flight */
    cm_pg_result_fn cb;
    void *ud;
    uint64_t deadline_ms; /* loop time; 0 = none */
    int nparams;
    const char *sql;           /* inside this block */
    const char *const *params; /* inside this block */
    char err[200];             /* error to deliver from the failed list */
};

struct queue {
    query_t *head, *tail;
    size_t len;
};

/* C_BROKEN: found dead inside a user call; dropped from the loop on the next turn. */
typedef enum { C_DOWN = 0, C_CONNECTING, C_IDLE, C_BUSY, C_BROKEN } cstate_t;

typedef struct conn conn_t;

typedef struct poller {
    uv_poll_t handle;
    cm_pg_t *pg;
    conn_t *c; /* NULL once detached (closing) */
} poller_t;

struct conn {
    cm_pg_t *pg;
    int listen; /* 1 for the LISTEN session */
    int index;
    PGconn *pq;
    poller_t *poller;
    int fd;
    int events;
    cstate_t state;
    int flushing;  /* output not yet fully sent: wait for writable too */
    int resetting; /* reopening after our own reset (timeout): still counts as available */
    uint64_t gen;  /* bumped on every teardown: callbacks compare it */
    query_t *q;    /* in flight */
    PGresult *res; /* last result of the statement in flight */
    char broken_err[200];
    uint64_t backoff_ms;
    int ever_up;
    uv_timer_t timer;
};

struct cm_pg {
    uv_loop_t *loop;
    cm_pg_config_t cfg;
    char *conninfo;
    char *app_name;
    char keepalive_idle[16];
    conn_t *pool;
    int npool;
    conn_t *lconn;  /* NULL without on_notify */
    queue_t queue;  /* pool statements waiting for an idle connection */
    queue_t lqueue; /* LISTEN session statements waiting their turn */
    queue_t failed; /* to deliver from the defer timer */
    int reported;   /* pool: -1 none yet, 0 down, 1 up */
    int lreported;  /* LISTEN session */
    uint64_t rng;
    cm_pg_stats_t stats;
    uv_timer_t queue_timer;
    uint64_t queue_due; /* when queue_timer fires; 0 = stopped */
    uv_timer_t defer_timer;
    int handles_open;
    int closing;
    int closed_handles; /* uv_close already called on every handle */
    void (*done)(void *ud);
    void *done_ud;
};

static void conn_connect(conn_t *c);
static void conn_drop(conn_t *c, const char *error, int reset);
static void conn_dispatch(conn_t *c);
static void process_input(conn_t *c);
static void poller_set(conn_t *c, int events);

/* ------------------------------------------------------------------------------------------ */
/* Queues                                                                                      */

static void q_push(queue_t *q, query_t *x)
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

static void q_push_front(queue_t *q, query_t *x)
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

static void q_remove(queue_t *q, query_t *x)
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

static query_t *q_pop(queue_t *q)
{
    query_t *x = q->head;
    if (x)
        q_remove(q, x);
    return x;
}

/* Copies the statement and its parameters into one block. */
static query_t *query_new(cm_pg_t *pg, const char *sql, int nparams, const char *const *params,
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
    return q;
}

/* ------------------------------------------------------------------------------------------ */
/* Delivering results                                                                          */

static void on_defer(uv_timer_t *t);

static void schedule_defer(cm_pg_t *pg)
{
    if (!pg->closed_handles)
        uv_timer_start(&pg->defer_timer, on_defer, 0, 0);
}

/* Queues `q` for an error callback from the loop. */
static void fail_later(cm_pg_t *pg, query_t *q, const char *error)
{
    snprintf(q->err, sizeof q->err, "%s", error);
    q_push(&pg->failed, q);
    schedule_defer(pg);
}

static void fail_queue_later(cm_pg_t *pg, queue_t *from, const char *error)
{
    query_t *q;
    while ((q = q_pop(from)) != NULL)
        fail_later(pg, q, error);
}

/* Copies a libpq message on one line: libpq ends messages with a newline and indents hints
 * on further lines, which would break one-line logs and error strings. */
static void trim_copy(char *dst, size_t cap, const char *msg)
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

static const char *label(const conn_t *c)
{
    return c->listen ? "listen" : "pool";
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
        fail_queue_later(pg, listen ? &pg->lqueue : &pg->queue, "connection lost: no connection");
    }
    if (pg->cfg.on_state && !pg->closing)
        pg->cfg.on_state(pg, listen, up, up ? NULL : error, pg->cfg.ud);
}

static void report_conn(conn_t *c, const char *error, int intentional)
{
    cm_pg_t *pg = c->pg;
    if (c->listen)
        report(pg, 1, c->state == C_IDLE || c->state == C_BUSY, error, intentional);
    else
        report(pg, 0, pool_available(pg), error, intentional);
}

/* ------------------------------------------------------------------------------------------ */
/* Pollers                                                                                     */

static void on_poller_closed(uv_handle_t *h);

static void poller_release(conn_t *c)
{
    if (!c->poller)
        return;
    c->poller->c = NULL;
    uv_close((uv_handle_t *)&c->poller->handle, on_poller_closed);
    c->poller = NULL;
    c->fd = -1;
    c->events = 0;
}

static void on_poll(uv_poll_t *h, int status, int events);

/* Makes sure a poller watches the current socket of c->pq. Returns 0 or a UV error. */
static int poller_attach(conn_t *c)
{
    int fd = PQsocket(c->pq);
    if (fd < 0)
        return UV_EBADF;
    if (c->poller && c->fd == fd)
        return 0;
    poller_release(c);
    poller_t *p = cm_malloc(sizeof *p);
    if (!p)
        return UV_ENOMEM;
    int rc = uv_poll_init(c->pg->loop, &p->handle, fd);
    if (rc != 0) {
        cm_free(p);
        return rc;
    }
    p->handle.data = p;
    p->pg = c->pg;
    p->c = c;
    c->poller = p;
    c->fd = fd;
    c->events = 0;
    c->pg->handles_open++;
    return 0;
}

static void poller_set(conn_t *c, int events)
{
    if (!c->poller || c->events == events)
        return;
    c->events = events;
    if (events)
        uv_poll_start(&c->poller->handle, events, on_poll);
    else
        uv_poll_stop(&c->poller->handle);
}

/* ------------------------------------------------------------------------------------------ */
/* Connections                                                                                 */

static uint64_t next_rand(cm_pg_t *pg)
{
    uint64_t x = pg->rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    pg->rng = x;
    return x;
}

static void on_conn_timer(uv_timer_t *t);

static void on_notice(void *arg, const PGresult *res)
{
    conn_t *c = arg;
    char msg[256];
    trim_copy(msg, sizeof msg, PQresultErrorMessage(res));
    cm_log_debug("postgres notice", "conn", label(c), "message", msg, NULL);
}

static void conn_connected(conn_t *c)
{
    cm_pg_t *pg = c->pg;
    uv_timer_stop(&c->timer);
    if (PQsetnonblocking(c->pq, 1) != 0) {
        char err[200];
        trim_copy(err, sizeof err, PQerrorMessage(c->pq));
        conn_drop(c, err, 0);
        return;
    }
    c->state = C_IDLE;
    c->resetting = 0;
    c->backoff_ms = pg->cfg.backoff_min_ms;
    if (c->ever_up)
        pg->stats.reconnects++;
    c->ever_up = 1;
    poller_set(c, UV_READABLE);
    report_conn(c, NULL, 0);
    conn_dispatch(c);
}

/* One step of PQconnectPoll, then wait for what it asked for. */
static void connect_step(conn_t *c)
{
    /* libpq may close the socket and open another inside PQconnectPoll (next address, SSL or
     * GSS fallback), possibly under the same descriptor number: stop watching first. */
    poller_set(c, 0);
    PostgresPollingStatusType st = PQconnectPoll(c->pq);
    if (st == PGRES_POLLING_OK) {
        conn_connected(c);
        return;
    }
    if (st == PGRES_POLLING_FAILED) {
        char err[200];
        trim_copy(err, sizeof err, PQerrorMessage(c->pq));
        conn_drop(c, err, 0);
        return;
    }
    /* The socket may have changed (next host, SSL/GSS fallback). */
    if (poller_attach(c) != 0) {
        conn_drop(c, "cannot watch the socket", 0);
        return;
    }
    poller_set(c, st == PGRES_POLLING_READING ? UV_READABLE : UV_WRITABLE);
}

static void conn_connect(conn_t *c)
{
    cm_pg_t *pg = c->pg;
    char interval[] = "2", count[] = "3";
    const char *kw[8], *val[8];
    int n = 0;
    /* Ours first: keywords from DATABASE_URL (expanded from dbname) override them. */
    kw[n] = "keepalives", val[n++] = "1";
    kw[n] = "keepalives_idle", val[n++] = pg->keepalive_idle;
    kw[n] = "keepalives_interval", val[n++] = interval;
    kw[n] = "keepalives_count", val[n++] = count;
    if (pg->app_name)
        kw[n] = "application_name", val[n++] = pg->app_name;
    kw[n] = "dbname", val[n++] = pg->conninfo;
    kw[n] = NULL, val[n] = NULL;

    c->state = C_CONNECTING;
    c->flushing = 0;
    c->pq = PQconnectStartParams(kw, val, 1);
    if (!c->pq) {
        conn_drop(c, "out of memory", 0);
        return;
    }
    if (PQstatus(c->pq) == CONNECTION_BAD) {
        char err[200];
        trim_copy(err, sizeof err, PQerrorMessage(c->pq));
        conn_drop(c, err, 0);
        return;
    }
    /* Notices (e.g. "relation already exists, skipping") go to our log, not to stderr. */
    PQsetNoticeReceiver(c->pq, on_notice, c);
    if (poller_attach(c) != 0) {
        conn_drop(c, "cannot watch the socket", 0);
        return;
    }
    uv_timer_start(&c->timer, on_conn_timer, pg->cfg.connect_timeout_ms, 0);
    /* As the libpq docs say: before the first PQconnectPoll, behave as if it returned
     * PGRES_POLLING_WRITING. */
    poller_set(c, UV_WRITABLE);
}

/* Tears the connection down. `reset`: our own decision (timeout, listen_reset): reopen at once
 * and, for the pool, keep counting as available meanwhile. The statement in flight and, for
 * the LISTEN session, its queue are failed from the loop. */
static void conn_drop(conn_t *c, const char *error, int reset)
{
    cm_pg_t *pg = c->pg;
    int was_up = c->state == C_IDLE || c->state == C_BUSY || c->state == C_BROKEN;
    c->gen++;
    poller_release(c);
    if (c->res) {
        PQclear(c->res);
        c->res = NULL;
    }
    if (c->pq) {
        PQfinish(c->pq);
        c->pq = NULL;
    }
    c->state = C_DOWN;
    c->flushing = 0;
    uv_timer_stop(&c->timer);
    char msg[200];
    snprintf(msg, sizeof msg, "%s%s",
             pg->closing ? "" : "connection lost: ", pg->closing ? "closing" : error);
    if (c->q) {
        fail_later(pg, c->q, msg);
        c->q = NULL;
    }
    if (pg->closing)
        return;
    pg->stats.errors += reset ? 0 : 1;
    c->resetting = reset && !c->listen;
    if (was_up || !c->ever_up || reset)
        cm_log_debug("postgres connection closed", "conn", label(c), "error", error, NULL);
    report_conn(c, error, reset);
    uint64_t d;
    if (reset) {
        d = 0;
    } else {
        d = c->backoff_ms;
        if (d > 1)
            d = d / 2 + next_rand(pg) % (d / 2 + 1);
        c->backoff_ms =
            c->backoff_ms * 2 > pg->cfg.backoff_max_ms ? pg->cfg.backoff_max_ms : c->backoff_ms * 2;
        if (c->backoff_ms < 1)
            c->backoff_ms = 1;
    }
    uv_timer_start(&c->timer, on_conn_timer, d, 0);
}

static void on_conn_timer(uv_timer_t *t)
{
    conn_t *c = t->data;
    cm_pg_t *pg = c->pg;
    if (pg->closing)
        return;
    switch (c->state) {
    case C_DOWN:
        conn_connect(c);
        break;
    case C_CONNECTING: {
        char msg[64];
        snprintf(msg, sizeof msg, "connect timeout after %" PRIu64 " ms",
                 pg->cfg.connect_timeout_ms);
        conn_drop(c, msg, 0);
        break;
    }
    case C_BROKEN:
        conn_drop(c, c->broken_err, 0);
        break;
    case C_BUSY: {
        /* The statement in flight missed its deadline. PQcancel would block the loop, so the
         * connection is dropped and reopened instead. */
        query_t *q = c->q;
        c->q = NULL;
        pg->stats.timeouts++;
        if (q->cb)
            q->cb(pg, NULL, "timeout", q->ud);
        cm_free(q);
        if (!pg->closing && c->state == C_BUSY)
            conn_drop(c, "statement timeout", 1);
        break;
    }
    default:
        break;
    }
}

/* Marks the connection dead without re-entering user code: on_conn_timer drops it. */
static void conn_break(conn_t *c, const char *error)
{
    snprintf(c->broken_err, sizeof c->broken_err, "%s", error);
    c->state = C_BROKEN;
    poller_set(c, 0);
    uv_timer_start(&c->timer, on_conn_timer, 0, 0);
}

/* Sends the next statement if the connection is idle. */
static void conn_dispatch(conn_t *c)
{
    cm_pg_t *pg = c->pg;
    queue_t *from = c->listen ? &pg->lqueue : &pg->queue;
    while (c->state == C_IDLE && !pg->closing && from->head) {
        query_t *q = q_pop(from);
        if (PQsendQueryParams(c->pq, q->sql, q->nparams, NULL, q->params, NULL, NULL, 0) != 1) {
            char err[200];
            trim_copy(err, sizeof err, PQerrorMessage(c->pq));
            if (PQstatus(c->pq) == CONNECTION_BAD) {
                /* Not the statement's fault: give it back; the connection is dropped from the
                 * loop (this may run inside cm_pg_query). */
                q_push_front(from, q);
                conn_break(c, err);
                return;
            }
            fail_later(pg, q, err);
            continue;
        }
        c->q = q;
        c->state = C_BUSY;
        if (q->deadline_ms) {
            uint64_t now = uv_now(pg->loop);
            uv_timer_start(&c->timer, on_conn_timer,
                           q->deadline_ms > now ? q->deadline_ms - now : 0, 0);
        }
        int f = PQflush(c->pq);
        if (f < 0) {
            char err[200];
            trim_copy(err, sizeof err, PQerrorMessage(c->pq));
            conn_break(c, err);
            return;
        }
        c->flushing = f == 1;
        poller_set(c, UV_READABLE | (c->flushing ? UV_WRITABLE : 0));
    }
}

/* Finds an idle pool connection for the head of the pool queue. */
static void pool_dispatch(cm_pg_t *pg)
{
    for (int i = 0; i < pg->npool && pg->queue.head; i++)
        if (pg->pool[i].state == C_IDLE)
            conn_dispatch(&pg->pool[i]);
}

static void drain_notifies(conn_t *c, uint64_t gen)
{
    cm_pg_t *pg = c->pg;
    PGnotify *n;
    while (c->gen == gen && c->pq && (n = PQnotifies(c->pq)) != NULL) {
        if (pg->cfg.on_notify && !pg->closing)
            pg->cfg.on_notify(pg, n->relname, n->extra ? n->extra : "", n->be_pid, pg->cfg.ud);
        PQfreemem(n);
    }
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
    if (q && q->cb) {
        ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
        if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK || st == PGRES_EMPTY_QUERY) {
            q->cb(pg, res, NULL, q->ud);
        } else {
            char err[300];
            trim_copy(err, sizeof err, res ? PQresultErrorMessage(res) : PQerrorMessage(c->pq));
            q->cb(pg, res, err, q->ud);
        }
    }
    if (res)
        PQclear(res);
    cm_free(q);
}

static void process_input(conn_t *c)
{
    cm_pg_t *pg = c->pg;
    uint64_t gen = c->gen;
    if (!PQconsumeInput(c->pq)) {
        char err[200];
        trim_copy(err, sizeof err, PQerrorMessage(c->pq));
        conn_drop(c, err, 0);
        return;
    }
    drain_notifies(c, gen);
    if (c->gen != gen)
        return;
    if (c->flushing) {
        int f = PQflush(c->pq);
        if (f < 0) {
            char err[200];
            trim_copy(err, sizeof err, PQerrorMessage(c->pq));
            conn_drop(c, err, 0);
            return;
        }
        c->flushing = f == 1;
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
                    conn_dispatch(c);
                else
                    pool_dispatch(pg);
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
    if (c->gen != gen)
        return;
    if (PQstatus(c->pq) == CONNECTION_BAD) {
        char err[200];
        trim_copy(err, sizeof err, PQerrorMessage(c->pq));
        conn_drop(c, err, 0);
        return;
    }
    poller_set(c, UV_READABLE | (c->flushing ? UV_WRITABLE : 0));
}

static void on_poll(uv_poll_t *h, int status, int events)
{
    poller_t *p = h->data;
    conn_t *c = p->c;
    if (!c || c->pg->closing)
        return;
    if (c->state == C_BROKEN || c->state == C_DOWN)
        return;
    if (status < 0) {
        /* libuv reports POLLERR this way and has stopped the handle. libpq tells the real
         * cause (connection refused, reset...). */
        c->events = 0;
        uint64_t gen = c->gen;
        if (c->state == C_CONNECTING) {
            connect_step(c);
            return;
        }
        process_input(c);
        if (c->gen == gen)
            conn_drop(c, uv_strerror(status), 0);
        return;
    }
    if (c->state == C_CONNECTING) {
        connect_step(c);
        return;
    }
    if ((events & UV_WRITABLE) && c->flushing) {
        int f = PQflush(c->pq);
        if (f < 0) {
            char err[200];
            trim_copy(err, sizeof err, PQerrorMessage(c->pq));
            conn_drop(c, err, 0);
            return;
        }
        c->flushing = f == 1;
        poller_set(c, UV_READABLE | (c->flushing ? UV_WRITABLE : 0));
    }
    if (events & UV_READABLE)
        process_input(c);
}

/* ------------------------------------------------------------------------------------------ */
/* Queue deadlines                                                                             */

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
                q_remove(queues[i], q);
                pg->stats.timeouts++;
                fail_later(pg, q, "timeout");
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
static void queue_deadline(cm_pg_t *pg, uint64_t deadline_ms)
{
    if (!deadline_ms || (pg->queue_due && pg->queue_due <= deadline_ms))
        return;
    uint64_t now = uv_now(pg->loop);
    pg->queue_due = deadline_ms;
    uv_timer_start(&pg->queue_timer, on_queue_timer, deadline_ms > now ? deadline_ms - now : 0, 0);
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

static void conn_init(cm_pg_t *pg, conn_t *c, int listen, int index)
{
    c->pg = pg;
    c->listen = listen;
    c->index = index;
    c->fd = -1;
    c->backoff_ms = pg->cfg.backoff_min_ms ? pg->cfg.backoff_min_ms : 1;
    uv_timer_init(pg->loop, &c->timer);
    c->timer.data = c;
    pg->handles_open++;
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
            char err[200];
            trim_copy(err, sizeof err, errmsg);
            cm_log_error("invalid DATABASE_URL", "error", err, NULL);
            PQfreemem(errmsg);
        }
        return UV_EINVAL;
    }
    PQconninfoFree(opts);

    cm_pg_t *pg = cm_calloc(1, sizeof *pg);
    if (!pg)
        return UV_ENOMEM;
    pg->loop = loop;
    pg->cfg = *cfg;
    pg->conninfo = cm_strdup(cfg->conninfo);
    pg->app_name = cfg->application_name ? cm_strdup(cfg->application_name) : NULL;
    pg->npool = cfg->pool_size;
    pg->pool = cm_calloc((size_t)pg->npool, sizeof *pg->pool);
    pg->lconn = cfg->on_notify ? cm_calloc(1, sizeof *pg->lconn) : NULL;
    if (!pg->conninfo || (cfg->application_name && !pg->app_name) || !pg->pool ||
        (cfg->on_notify && !pg->lconn)) {
        cm_free(pg->conninfo);
        cm_free(pg->app_name);
        cm_free(pg->pool);
        cm_free(pg->lconn);
        cm_free(pg);
        return UV_ENOMEM;
    }
    pg->cfg.conninfo = pg->conninfo;
    pg->cfg.application_name = pg->app_name;
    snprintf(pg->keepalive_idle, sizeof pg->keepalive_idle, "%d",
             cfg->keepalive_idle_s ? cfg->keepalive_idle_s : 5);
    pg->reported = -1;
    pg->lreported = -1;
    pg->rng = uv_hrtime() ^ (uint64_t)(uintptr_t)pg;
    if (!pg->rng)
        pg->rng = 0x9e3779b97f4a7c15ull;
    uv_timer_init(loop, &pg->queue_timer);
    pg->queue_timer.data = pg;
    uv_timer_init(loop, &pg->defer_timer);
    pg->defer_timer.data = pg;
    pg->handles_open += 2;
    for (int i = 0; i < pg->npool; i++)
        conn_init(pg, &pg->pool[i], 0, i);
    if (pg->lconn)
        conn_init(pg, pg->lconn, 1, 0);
    /* Connecting starts from the loop: on_state never fires inside this call. */
    for (int i = 0; i < pg->npool; i++)
        uv_timer_start(&pg->pool[i].timer, on_conn_timer, 0, 0);
    if (pg->lconn)
        uv_timer_start(&pg->lconn->timer, on_conn_timer, 0, 0);
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
    query_t *q = query_new(pg, sql, nparams, params, timeout_ms, cb, ud);
    if (!q)
        return UV_ENOMEM;
    q_push(queue, q);
    if (listen)
        conn_dispatch(pg->lconn);
    else
        pool_dispatch(pg);
    /* Still queued (no idle connection): the queue timer watches its deadline. */
    if (q->owner == queue)
        queue_deadline(pg, q->deadline_ms);
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
        uv_timer_start(&c->timer, on_conn_timer, 0, 0);
        return;
    }
    conn_drop(c, "reset", 1);
}

void cm_pg_stats(const cm_pg_t *pg, cm_pg_stats_t *out)
{
    *out = pg->stats;
    out->queued = pg->queue.len;
}

/* ------------------------------------------------------------------------------------------ */
/* Close                                                                                       */

static void finish_if_done(cm_pg_t *pg)
{
    if (pg->handles_open > 0)
        return;
    void (*done)(void *) = pg->done;
    void *done_ud = pg->done_ud;
    cm_free(pg->conninfo);
    cm_free(pg->app_name);
    cm_free(pg->pool);
    cm_free(pg->lconn);
    cm_free(pg);
    if (done)
        done(done_ud);
}

static void on_poller_closed(uv_handle_t *h)
{
    poller_t *p = h->data;
    cm_pg_t *pg = p->pg;
    cm_free(p);
    pg->handles_open--;
    if (pg->closed_handles)
        finish_if_done(pg);
}

static void on_conn_timer_closed(uv_handle_t *h)
{
    conn_t *c = h->data;
    cm_pg_t *pg = c->pg;
    pg->handles_open--;
    finish_if_done(pg);
}

static void on_handle_closed(uv_handle_t *h)
{
    cm_pg_t *pg = h->data;
    pg->handles_open--;
    finish_if_done(pg);
}

static void on_defer(uv_timer_t *t)
{
    cm_pg_t *pg = t->data;
    query_t *q;
    while ((q = q_pop(&pg->failed)) != NULL) {
        if (q->cb)
            q->cb(pg, NULL, q->err, q->ud);
        cm_free(q);
    }
    if (!pg->closing || pg->closed_handles)
        return;
    /* Close: tear every connection down, fail what is left, then close the handles. */
    for (int i = 0; i < pg->npool; i++)
        conn_drop(&pg->pool[i], "closing", 0);
    if (pg->lconn)
        conn_drop(pg->lconn, "closing", 0);
    fail_queue_later(pg, &pg->queue, "closing");
    fail_queue_later(pg, &pg->lqueue, "closing");
    while ((q = q_pop(&pg->failed)) != NULL) {
        if (q->cb)
            q->cb(pg, NULL, q->err, q->ud);
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
    schedule_defer(pg);
}

int cm_pg_conninfo_check(const char *conninfo, char *why, size_t whysz)
{
    char *errmsg = NULL;
    PQconninfoOption *opts = PQconninfoParse(conninfo, &errmsg);
    if (opts) {
        /* libpq checks the syntax only; a bad port would mean retrying forever. */
        int bad = 0;
        for (PQconninfoOption *o = opts; o->keyword && !bad; o++) {
            if (strcmp(o->keyword, "port") != 0 || !o->val)
                continue;
            for (const char *p = o->val; *p && !bad;) { /* "5432" or "5432,5433" */
                char *end;
                long port = strtol(p, &end, 10);
                bad = end == p || port < 1 || port > 65535 || (*end && *end != ',');
                p = *end ? end + 1 : end;
            }
        }
        PQconninfoFree(opts);
        if (!bad)
            return 0;
        snprintf(why, whysz, "port must be from 1 to 65535");
        return -1;
    }
    /* libpq's message ends with a newline; the error is one line. */
    snprintf(why, whysz, "not a libpq connection string: %s", errmsg ? errmsg : "out of memory");
    why[strcspn(why, "\n")] = '\0';
    PQfreemem(errmsg);
    return -1;
}
