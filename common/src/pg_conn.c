/*
 * pg_conn.c: one connection's life: connect (one host at a time, each under its own deadline),
 * up, dropped, reconnect after a backoff; the pollers that watch its socket.
 *
 * After a failover. Hosts are tried in the URL's order, wrapping around, from the host of the
 * newest session rather than from the first: an old primary that hangs would otherwise cost
 * its deadline at every reconnect of every connection. And when a connection opens a session
 * on another host than the others are on, the others follow (each idle one is reopened at
 * once, a busy one when its statement is done): a hung old primary never tells the idle
 * connections it holds, and they would each cost a statement deadline to find out. With
 * target_session_attrs=read-write the newest session is on the writable server, so that is
 * where they all belong.
 */
#include "pg_internal.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "cm/alloc.h"
#include "cm/log.h"

static void conn_connect(conn_t *c);
static void attempt_failed(conn_t *c, const char *error);
static void on_poll(uv_poll_t *h, int status, int events);
static void on_poller_closed(uv_handle_t *h);

/* ------------------------------------------------------------------------------------------ */
/* Pollers                                                                                     */

const char *pg_conn_label(const conn_t *c)
{
    return c->listen ? "listen" : "pool";
}

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

void pg_poller_set(conn_t *c, int events)
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
/* Connecting                                                                                  */

static void on_notice(void *arg, const PGresult *res)
{
    conn_t *c = arg;
    char msg[256];
    pg_error_copy(c->pg, msg, sizeof msg, PQresultErrorMessage(res));
    cm_log_debug("postgres notice", "conn", pg_conn_label(c), "message", msg, NULL);
}

/* The other connections move to the host `c` just opened a session on (see the top of this file).
 * Only flags and timers here: the reopening happens from the loop. */
static void follow_host(conn_t *c)
{
    cm_pg_t *pg = c->pg;
    for (int i = 0; i <= pg->npool; i++) {
        conn_t *o = i < pg->npool ? &pg->pool[i] : pg->lconn;
        if (!o || o == c || o->move || o->on_target == c->target ||
            (o->state != C_IDLE && o->state != C_BUSY))
            continue;
        o->move = 1;
        if (o->state == C_IDLE)
            uv_timer_start(&o->timer, pg_on_conn_timer, 0, 0);
    }
}

static void conn_connected(conn_t *c)
{
    cm_pg_t *pg = c->pg;
    uv_timer_stop(&c->timer);
    if (PQsetnonblocking(c->pq, 1) != 0) {
        char err[200];
        pg_error_copy(c->pg, err, sizeof err, PQerrorMessage(c->pq));
        pg_conn_drop(c, err, 0);
        return;
    }
    c->state = C_IDLE;
    c->resetting = 0;
    /* A server that answered read-only last time may well do it again: keep the delay growing
     * instead of reconnecting to it at the shortest one each time. */
    if (!c->read_only)
        cm_backoff_reset(&c->backoff);
    c->read_only = 0;
    if (c->ever_up)
        pg->stats.reconnects++;
    c->ever_up = 1;
    c->on_target = c->target;
    if (pg->ntargets > 1) {
        /* Which host took us matters after a failover: a change of host is logged as such. */
        char host[128];
        pg_target_label(pg, c->target, host, sizeof host);
        cm_log(c->target != pg->last_target ? CM_LOG_INFO : CM_LOG_DEBUG, "postgres session opened",
               "conn", pg_conn_label(c), "host", host, NULL);
        pg->last_target = c->target;
        follow_host(c);
    }
    pg_poller_set(c, UV_READABLE);
    pg_report_conn(c, NULL, 0);
    pg_conn_dispatch(c);
}

/* One step of PQconnectPoll, then wait for what it asked for. */
static void connect_step(conn_t *c)
{
    /* libpq may close the socket and open another inside PQconnectPoll (next address, SSL or
     * GSS fallback), possibly under the same descriptor number: stop watching first. */
    pg_poller_set(c, 0);
    PostgresPollingStatusType st = PQconnectPoll(c->pq);
    if (st == PGRES_POLLING_OK) {
        conn_connected(c);
        return;
    }
    if (st == PGRES_POLLING_FAILED) {
        char err[200];
        pg_error_copy(c->pg, err, sizeof err, PQerrorMessage(c->pq));
        attempt_failed(c, err);
        return;
    }
    /* The socket may have changed (next host, SSL/GSS fallback). */
    if (poller_attach(c) != 0) {
        pg_conn_drop(c, "cannot watch the socket", 0);
        return;
    }
    pg_poller_set(c, st == PGRES_POLLING_READING ? UV_READABLE : UV_WRITABLE);
}

/* The attempt at the current host failed: go on to the next host of DATABASE_URL at once, as
 * libpq itself would; after the last one the connection is down (reported, backoff). */
static void attempt_failed(conn_t *c, const char *error)
{
    cm_pg_t *pg = c->pg;
    if (pg->ntargets == 1) {
        pg_conn_drop(c, error, 0);
        return;
    }
    char host[128];
    pg_target_label(pg, c->target, host, sizeof host);
    size_t len = strlen(c->round_err);
    snprintf(c->round_err + len, sizeof c->round_err - len, "%s%s: %s", len ? "; " : "", host,
             error);
    if (++c->tried >= pg->ntargets) {
        char err[sizeof c->round_err];
        snprintf(err, sizeof err, "%s", c->round_err);
        pg_conn_drop(c, err, 0);
        return;
    }
    cm_log_debug("postgres host failed, trying the next one", "conn", pg_conn_label(c), "host",
                 host, "error", error, NULL);
    /* Only a connecting PGconn gets here: nothing in flight, nothing to report. */
    c->gen++;
    poller_release(c);
    PQfinish(c->pq);
    c->pq = NULL;
    uv_timer_stop(&c->timer);
    c->state = C_DOWN;
    c->target = (c->target + 1) % pg->ntargets;
    conn_connect(c);
}

static void conn_connect(conn_t *c)
{
    cm_pg_t *pg = c->pg;
    const target_t *t = &pg->targets[c->target];
    static char interval[] = "2", count[] = "3";
    const char **kw = pg->kw, **val = pg->val;
    int n = 0;
    /* Ours first: the same keywords in DATABASE_URL come later and win. */
    kw[n] = "keepalives", val[n++] = "1";
    kw[n] = "keepalives_idle", val[n++] = pg->keepalive_idle;
    kw[n] = "keepalives_interval", val[n++] = interval;
    kw[n] = "keepalives_count", val[n++] = count;
    if (pg->app_name)
        kw[n] = "application_name", val[n++] = pg->app_name;
    for (const PQconninfoOption *o = pg->opts; o->keyword; o++) {
        const char *v = o->val;
        if (strcmp(o->keyword, "host") == 0)
            v = t->host;
        else if (strcmp(o->keyword, "hostaddr") == 0)
            v = t->hostaddr;
        else if (strcmp(o->keyword, "port") == 0)
            v = t->port;
        if (v)
            kw[n] = o->keyword, val[n++] = v;
    }
    kw[n] = NULL, val[n] = NULL;

    c->state = C_CONNECTING;
    c->flushing = 0;
    /* expand_dbname 0: the URL was expanded by PQconninfoParse already; dbname is a name. */
    c->pq = PQconnectStartParams(kw, val, 0);
    if (!c->pq) {
        pg_conn_drop(c, "out of memory", 0);
        return;
    }
    if (PQstatus(c->pq) == CONNECTION_BAD) {
        char err[200];
        pg_error_copy(c->pg, err, sizeof err, PQerrorMessage(c->pq));
        attempt_failed(c, err);
        return;
    }
    /* Notices (e.g. "relation already exists, skipping") go to our log, not to stderr. */
    PQsetNoticeReceiver(c->pq, on_notice, c);
    if (poller_attach(c) != 0) {
        pg_conn_drop(c, "cannot watch the socket", 0);
        return;
    }
    /* libpq ignores connect_timeout on this path: this deadline is the attempt's, per host. */
    uv_timer_start(&c->timer, pg_on_conn_timer, pg->host_timeout_ms, 0);
    /* As the libpq docs say: before the first PQconnectPoll, behave as if it returned
     * PGRES_POLLING_WRITING. */
    pg_poller_set(c, UV_WRITABLE);
}

/* ------------------------------------------------------------------------------------------ */
/* Teardown and the connection timer                                                           */

/* Tears the connection down. `reset`: our own decision (timeout, listen_reset): reopen at once
 * and, for the pool, keep counting as available meanwhile. The statement in flight and, for
 * the LISTEN session, its queue are failed from the loop. */
void pg_conn_drop(conn_t *c, const char *error, int reset)
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
    /* The next round starts from the newest session's host (see the top of this file). */
    c->target = pg->last_target;
    c->tried = 0;
    c->move = 0;
    c->round_err[0] = '\0';
    if (c->q) {
        char msg[sizeof c->q->detail];
        snprintf(msg, sizeof msg, "connection lost: %s", error);
        if (pg->closing)
            pg_fail_later(pg, c->q, UV_ECANCELED, NULL);
        else
            pg_fail_later(pg, c->q, UV_ENOTCONN, msg);
        c->q = NULL;
    }
    if (pg->closing)
        return;
    pg->stats.errors += reset ? 0 : 1;
    c->resetting = reset && !c->listen;
    if (was_up || !c->ever_up || reset)
        cm_log_debug("postgres connection closed", "conn", pg_conn_label(c), "error", error, NULL);
    pg_report_conn(c, error, reset);
    uv_timer_start(&c->timer, pg_on_conn_timer, reset ? 0 : cm_backoff_next(&c->backoff), 0);
}

void pg_on_conn_timer(uv_timer_t *t)
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
        snprintf(msg, sizeof msg, "connect timeout after %" PRIu64 " ms", pg->host_timeout_ms);
        if (pg->ntargets > 1 && c->tried + 1 < pg->ntargets) {
            char host[128];
            pg_target_label(pg, c->target, host, sizeof host);
            cm_log_warn("postgres host did not answer in time; trying the next one", "conn",
                        pg_conn_label(c), "host", host, NULL);
        }
        attempt_failed(c, msg);
        break;
    }
    case C_BROKEN:
        pg_conn_drop(c, c->broken_err, 0);
        break;
    case C_IDLE:
        if (c->move)
            pg_conn_drop(c, "another connection opened a session on another host: following it", 1);
        break;
    case C_BUSY:
        pg_query_deadline(c);
        break;
    default:
        break;
    }
}

/* Marks the connection dead without re-entering user code: on_conn_timer drops it. */
void pg_conn_break(conn_t *c, const char *error)
{
    snprintf(c->broken_err, sizeof c->broken_err, "%s", error);
    c->state = C_BROKEN;
    pg_poller_set(c, 0);
    uv_timer_start(&c->timer, pg_on_conn_timer, 0, 0);
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
        pg_process_input(c);
        if (c->gen == gen)
            pg_conn_drop(c, uv_strerror(status), 0);
        return;
    }
    if (c->state == C_CONNECTING) {
        connect_step(c);
        return;
    }
    if ((events & UV_WRITABLE) && c->flushing) {
        char err[200];
        if (pg_conn_flush(c, err, sizeof err) != 0) {
            pg_conn_drop(c, err, 0);
            return;
        }
        pg_poller_set(c, UV_READABLE | (c->flushing ? UV_WRITABLE : 0));
    }
    if (events & UV_READABLE)
        pg_process_input(c);
}

void pg_conn_init(cm_pg_t *pg, conn_t *c, int listen, int index)
{
    c->pg = pg;
    c->listen = listen;
    c->index = index;
    c->fd = -1;
    cm_backoff_init(&c->backoff, pg->cfg.backoff_min_ms, pg->cfg.backoff_max_ms,
                    uv_hrtime() ^ (uint64_t)(uintptr_t)c);
    uv_timer_init(pg->loop, &c->timer);
    c->timer.data = c;
    pg->handles_open++;
}

static void on_poller_closed(uv_handle_t *h)
{
    poller_t *p = h->data;
    cm_pg_t *pg = p->pg;
    cm_free(p);
    pg->handles_open--;
    if (pg->closed_handles)
        pg_finish_if_done(pg);
}

int pg_conn_flush(conn_t *c, char *err, size_t errsz)
{
    int f = PQflush(c->pq);
    if (f < 0) {
        pg_error_copy(c->pg, err, errsz, PQerrorMessage(c->pq));
        return -1;
    }
    c->flushing = f == 1;
    return 0;
}
