#include "leader.h"

#include "dedup.h"
#include "event.h"

#include "cm/alloc.h"
#include "cm/buf.h"
#include "cm/log.h"

#include <inttypes.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Published ids remembered to skip them during catch-up. */
#define PUBLISHED_CAP 65536
/* Failed publishes kept for the next Redis connect. */
#define RETRY_MAX 100000
/* Rows per catch-up page. */
#define CATCHUP_PAGE 1000
#define QUERY_TIMEOUT_MS 5000
#define ALL_CHANNEL "orders:all"

/* Every query that selects `id::text` must ORDER BY order_events.id: a bare `ORDER BY id`
 * names the text output column and sorts "10" before "9" (a LIMIT page then skips rows). */
#define EVENT_COLUMNS                                                                              \
    "SELECT id::text, user_id, event_type, payload::text, extract(epoch FROM created_at)::text "   \
    "FROM order_events "

typedef enum { ST_DOWN = 0, ST_LOCKING, ST_STANDBY, ST_LEADING } state_t;

typedef struct pub pub_t;
struct pub {
    pub_t *next;
    on_leader_t *l;
    int is_all; /* the all-users copy: not counted as a published event */
    size_t chan_len, msg_len;
    char *chan; /* points into data */
    char *msg;
    char data[];
};

struct on_leader {
    on_app_t *app;
    uv_timer_t timer; /* lock retry (standby) or liveness (leader) */
    state_t state;
    int listen_up;
    int op_inflight;      /* a lock or liveness statement on the LISTEN session */
    unsigned catchup_gen; /* bumps on every leadership change: stale pages are dropped */
    int catchup_needed;   /* a catch-up is still to finish for this leadership */
    int catchups;         /* catch-up and fetch queries in flight (they borrow `l`) */
    on_idset_t published;
    pub_t *retry_head, *retry_tail;
    size_t nretry;
    size_t inflight_pubs;
    int stopping;
    int unlock_pending;
    int timer_closed;
    void (*done)(void *ud);
    void *done_ud;
    char lock_key[24];
};

static void schedule(on_leader_t *l, uint64_t ms);
static void try_lock(on_leader_t *l);
static void start_catchup(on_leader_t *l, int64_t after, unsigned gen);
static void maybe_finish(on_leader_t *l);

typedef struct {
    on_leader_t *l;
    unsigned gen;
} catchup_t;

/* ---- publishing --------------------------------------------------------------------------- */

static void retry_push(on_leader_t *l, pub_t *p)
{
    if (l->nretry >= RETRY_MAX) {
        /* Still in the outbox: a replica's replay or a client's resume finds it. */
        pub_t *old = l->retry_head;
        l->retry_head = old->next;
        if (!l->retry_head)
            l->retry_tail = NULL;
        l->nretry--;
        cm_free(old);
    }
    p->next = NULL;
    if (l->retry_tail)
        l->retry_tail->next = p;
    else
        l->retry_head = p;
    l->retry_tail = p;
    l->nretry++;
}

static void publish_done(cm_redis_t *r, struct redisReply *reply, int status, void *ud)
{
    (void)r;
    (void)reply;
    pub_t *p = ud;
    on_leader_t *l = p->l;
    l->inflight_pubs--;
    if (status == CM_REDIS_OK && !l->stopping) {
        if (!p->is_all)
            cm_counter_inc(l->app->m.events_published);
        cm_free(p);
    } else if (!l->stopping) {
        retry_push(l, p);
    } else {
        cm_free(p);
    }
    maybe_finish(l);
}

static void send_pub(on_leader_t *l, pub_t *p)
{
    const char *argv[3] = {"PUBLISH", p->chan, p->msg};
    size_t lens[3] = {7, p->chan_len, p->msg_len};
    if (cm_redis_command_argv(l->app->redis_pub, publish_done, p, 3, argv, lens) == 0) {
        l->inflight_pubs++;
        return;
    }
    retry_push(l, p);
}

static pub_t *pub_new(on_leader_t *l, const char *chan, size_t chan_len, const char *msg,
                      size_t msg_len)
{
    pub_t *p = cm_malloc(sizeof *p + chan_len + msg_len + 2);
    if (!p)
        return NULL;
    p->next = NULL;
    p->l = l;
    p->is_all = 0;
    p->chan = p->data;
    p->chan_len = chan_len;
    memcpy(p->chan, chan, chan_len);
    p->chan[chan_len] = '\0';
    p->msg = p->data + chan_len + 1;
    p->msg_len = msg_len;
    memcpy(p->msg, msg, msg_len);
    p->msg[msg_len] = '\0';
    return p;
}

/* Publishes `ev` to its user's channel and to the all-users channel, once per leadership. */
static void publish_event(on_leader_t *l, const on_event_t *ev)
{
    int added = on_idset_add(&l->published, ev->id);
    if (added == 0)
        return; /* published already (catch-up overlapping NOTIFY) */
    cm_buf_t msg = CM_BUF_INIT, chan = CM_BUF_INIT;
    if (on_event_message(ev, &msg) != 0 || on_event_channel(ev->user_id, &chan) != 0) {
        cm_log_error("cannot build the event message", "error", "out of memory", NULL);
        goto done;
    }
    pub_t *a = pub_new(l, chan.data, chan.len, msg.data, msg.len);
    pub_t *b = pub_new(l, ALL_CHANNEL, strlen(ALL_CHANNEL), msg.data, msg.len);
    if (b)
        b->is_all = 1;
    if (a)
        send_pub(l, a);
    if (b)
        send_pub(l, b);
    if (!a || !b)
        cm_log_error("cannot queue a publish", "error", "out of memory", NULL);
done:
    cm_buf_free(&msg);
    cm_buf_free(&chan);
}

void on_leader_redis_up(on_leader_t *l)
{
    if (l->stopping || !l->retry_head)
        return;
    pub_t *p = l->retry_head;
    size_t n = l->nretry;
    l->retry_head = l->retry_tail = NULL;
    l->nretry = 0;
    char count[24];
    snprintf(count, sizeof count, "%zu", n);
    cm_log_info("redis back: publishing held events again", "count", count, NULL);
    while (p) {
        pub_t *next = p->next;
        send_pub(l, p);
        p = next;
    }
}

/* ---- rows of order_events ----------------------------------------------------------------- */

/* Publishes the rows of an EVENT_COLUMNS result; returns the largest id seen (0 when none). */
static int64_t publish_rows(on_leader_t *l, const PGresult *res, int count_received)
{
    int64_t last = 0;
    int n = PQntuples(res);
    for (int i = 0; i < n; i++) {
        int64_t id = strtoll(PQgetvalue(res, i, 0), NULL, 10);
        if (id > last)
            last = id;
        if (on_idset_has(&l->published, id))
            continue;
        on_event_t ev;
        if (on_event_from_row(id, PQgetvalue(res, i, 1), PQgetvalue(res, i, 2),
                              PQgetvalue(res, i, 3),
                              PQgetisnull(res, i, 4) ? NULL : PQgetvalue(res, i, 4), &ev) != 0) {
            cm_log_warn("skipping an unreadable order_events row", "id", PQgetvalue(res, i, 0),
                        NULL);
            continue;
        }
        if (count_received)
            cm_counter_inc(l->app->m.events_received);
        publish_event(l, &ev);
        on_event_clear(&ev);
    }
    return last;
}

static void catchup_done(cm_pg_t *pg, const PGresult *res, const char *error, void *ud)
{
    (void)pg;
    catchup_t *c = ud;
    on_leader_t *l = c->l;
    unsigned gen = c->gen;
    cm_free(c);
    l->catchups--;
    if (l->stopping || gen != l->catchup_gen || l->state != ST_LEADING) {
        maybe_finish(l);
        return;
    }
    if (error) {
        /* The pool may be reconnecting: the next liveness tick starts over (the published
         * set skips what went out already), the LISTEN side keeps going meanwhile. */
        cm_log_warn("catch-up query failed, retrying", "error", error, NULL);
        return;
    }
    int64_t last = publish_rows(l, res, 1);
    if (PQntuples(res) == CATCHUP_PAGE)
        start_catchup(l, last, gen);
    else {
        l->catchup_needed = 0;
        char n[24];
        snprintf(n, sizeof n, "%d", PQntuples(res));
        cm_log_debug("catch-up finished", "last_page_rows", n, NULL);
    }
}

/* One page of catch-up: events of the look-back window with id above `after`. */
static void start_catchup(on_leader_t *l, int64_t after, unsigned gen)
{
    catchup_t *c = cm_malloc(sizeof *c);
    if (!c) {
        cm_log_error("catch-up skipped", "error", "out of memory", NULL);
        return;
    }
    c->l = l;
    c->gen = gen;
    char secs[32], after_s[24], limit[16];
    snprintf(secs, sizeof secs, "%.3f", (double)l->app->cfg.lookback_ms / 1000.0);
    snprintf(after_s, sizeof after_s, "%" PRId64, after);
    snprintf(limit, sizeof limit, "%d", CATCHUP_PAGE);
    const char *params[3] = {secs, after_s, limit};
    int rc = cm_pg_query(l->app->pg,
                         EVENT_COLUMNS
                         "WHERE created_at >= now() - make_interval(secs => "
                         "$1::float8) AND id > $2::bigint ORDER BY order_events.id LIMIT $3::int",
                         3, params, QUERY_TIMEOUT_MS, catchup_done, c);
    if (rc != 0) {
        cm_free(c); /* no pool connection yet: the next liveness tick retries */
        return;
    }
    l->catchups++;
}

static void fetch_done(cm_pg_t *pg, const PGresult *res, const char *error, void *ud)
{
    (void)pg;
    on_leader_t *l = ud;
    l->catchups--;
    if (!l->stopping) {
        if (error)
            cm_log_warn("cannot read an event too big for NOTIFY (catch-up will retry)", "error",
                        error, NULL);
        else
            publish_rows(l, res, 0);
    }
    maybe_finish(l);
}

/* ---- NOTIFY ------------------------------------------------------------------------------- */

void on_leader_notify(on_leader_t *l, const char *channel, const char *payload)
{
    (void)channel;
    if (l->stopping || l->state != ST_LEADING)
        return;
    cm_counter_inc(l->app->m.events_received);
    on_event_t ev;
    int rc = on_event_parse(payload, strlen(payload), &ev);
    if (rc == 0) {
        publish_event(l, &ev);
        on_event_clear(&ev);
        return;
    }
    if (rc == UV_EAGAIN) {
        /* Over 8000 bytes: the trigger sent the id only, the row is the truth. */
        if (on_idset_has(&l->published, ev.id))
            return;
        char id[24];
        snprintf(id, sizeof id, "%" PRId64, ev.id);
        const char *params[1] = {id};
        if (cm_pg_query(l->app->pg, EVENT_COLUMNS "WHERE id = $1::bigint", 1, params,
                        QUERY_TIMEOUT_MS, fetch_done, l) == 0)
            l->catchups++;
        else
            cm_log_warn("cannot read an event too big for NOTIFY", "id", id, NULL);
        return;
    }
    cm_log_warn("ignoring a malformed notification", "channel", channel, NULL);
}

/* ---- election ----------------------------------------------------------------------------- */

static void set_state(on_leader_t *l, state_t st)
{
    if (l->state == ST_LEADING && st != ST_LEADING && !l->stopping)
        cm_log_warn("leadership lost: the LISTEN session ended", NULL);
    l->state = st;
    cm_gauge_set(l->app->m.leader, st == ST_LEADING ? 1 : 0);
}

static void listen_done(cm_pg_t *pg, const PGresult *res, const char *error, void *ud)
{
    (void)pg;
    (void)res;
    on_leader_t *l = ud;
    l->op_inflight = 0;
    if (l->stopping) {
        maybe_finish(l);
        return;
    }
    if (error) {
        cm_log_error("LISTEN failed; resetting the session", "error", error, NULL);
        if (l->listen_up)
            cm_pg_listen_reset(l->app->pg);
        return;
    }
    set_state(l, ST_LEADING);
    cm_log_info("leader: listening", "channel", l->app->cfg.pg_channel, NULL);
    l->catchup_gen++;
    l->catchup_needed = 1;
    start_catchup(l, 0, l->catchup_gen);
    schedule(l, (uint64_t)l->app->cfg.liveness_ms);
}

static void lock_done(cm_pg_t *pg, const PGresult *res, const char *error, void *ud)
{
    (void)pg;
    on_leader_t *l = ud;
    l->op_inflight = 0;
    if (l->stopping) {
        maybe_finish(l);
        return;
    }
    if (error || !l->listen_up) {
        if (error)
            cm_log_warn("advisory lock query failed", "error", error, NULL);
        if (l->listen_up) {
            set_state(l, ST_STANDBY);
            schedule(l, (uint64_t)l->app->cfg.lock_retry_ms);
        }
        return;
    }
    int got = PQntuples(res) == 1 && strcmp(PQgetvalue(res, 0, 0), "t") == 0;
    if (!got) {
        if (l->state != ST_STANDBY)
            cm_log_info("standing by: another replica holds the leader lock", NULL);
        set_state(l, ST_STANDBY);
        schedule(l, (uint64_t)l->app->cfg.lock_retry_ms);
        return;
    }
    /* Quoted: PG_CHANNEL was validated as a plain identifier, quoting keeps its case. */
    char sql[96];
    snprintf(sql, sizeof sql, "LISTEN \"%s\"", l->app->cfg.pg_channel);
    if (cm_pg_listen_query(l->app->pg, sql, 0, NULL, QUERY_TIMEOUT_MS, listen_done, l) == 0)
        l->op_inflight = 1;
    else
        schedule(l, (uint64_t)l->app->cfg.lock_retry_ms);
    /* The lock is ours from here on, LISTEN or not: leadership is marked once LISTEN is in. */
    l->state = ST_LOCKING;
}

static void try_lock(on_leader_t *l)
{
    if (l->op_inflight || !l->listen_up || l->stopping)
        return;
    const char *params[1] = {l->lock_key};
    if (cm_pg_listen_query(l->app->pg, "SELECT pg_try_advisory_lock($1::bigint)", 1, params,
                           QUERY_TIMEOUT_MS, lock_done, l) == 0) {
        l->op_inflight = 1;
        if (l->state == ST_DOWN)
            l->state = ST_LOCKING;
    } else {
        schedule(l, (uint64_t)l->app->cfg.lock_retry_ms);
    }
}

static void liveness_done(cm_pg_t *pg, const PGresult *res, const char *error, void *ud)
{
    (void)pg;
    (void)res;
    on_leader_t *l = ud;
    l->op_inflight = 0;
    if (l->stopping) {
        maybe_finish(l);
        return;
    }
    if (error) {
        /* A quiet LISTEN connection is not trusted: reset, reconnect, catch up. */
        cm_log_warn("LISTEN session failed its liveness check; reconnecting", "error", error, NULL);
        if (l->listen_up)
            cm_pg_listen_reset(l->app->pg);
        return;
    }
    schedule(l, (uint64_t)l->app->cfg.liveness_ms);
}

static void on_timer(uv_timer_t *t)
{
    on_leader_t *l = t->data;
    if (l->stopping || !l->listen_up || l->op_inflight)
        return;
    if (l->state == ST_LEADING) {
        if (l->catchup_needed && l->catchups == 0)
            start_catchup(l, 0, ++l->catchup_gen);
        uint64_t timeout = (uint64_t)l->app->cfg.liveness_ms;
        if (cm_pg_listen_query(l->app->pg, "SELECT 1", 0, NULL, timeout, liveness_done, l) == 0)
            l->op_inflight = 1;
        else
            schedule(l, timeout);
    } else {
        try_lock(l);
    }
}

static void schedule(on_leader_t *l, uint64_t ms)
{
    if (!l->stopping)
        uv_timer_start(&l->timer, on_timer, ms, 0);
}

void on_leader_listen_state(on_leader_t *l, int up)
{
    if (l->stopping)
        return;
    l->listen_up = up;
    cm_gauge_set(l->app->m.pg_listener_up, up ? 1 : 0);
    if (!up) {
        /* The session (and the lock with it) is gone; pending statements fail by themselves. */
        uv_timer_stop(&l->timer);
        set_state(l, ST_DOWN);
        l->catchup_gen++;
        return;
    }
    try_lock(l);
}

int on_leader_is_leader(const on_leader_t *l)
{
    return l->state == ST_LEADING;
}

int on_leader_listen_up(const on_leader_t *l)
{
    return l->listen_up;
}

int on_leader_new(on_app_t *app, on_leader_t **out)
{
    on_leader_t *l = cm_calloc(1, sizeof *l);
    if (!l)
        return UV_ENOMEM;
    l->app = app;
    on_idset_init(&l->published, PUBLISHED_CAP);
    snprintf(l->lock_key, sizeof l->lock_key, "%ld", app->cfg.lock_key);
    uv_timer_init(app->loop, &l->timer);
    l->timer.data = l;
    cm_gauge_set(app->m.leader, 0);
    cm_gauge_set(app->m.pg_listener_up, 0);
    *out = l;
    return 0;
}

/* ---- stop --------------------------------------------------------------------------------- */

static void free_leader(on_leader_t *l)
{
    pub_t *p = l->retry_head;
    while (p) {
        pub_t *next = p->next;
        cm_free(p);
        p = next;
    }
    on_idset_free(&l->published);
    void (*done)(void *) = l->done;
    void *ud = l->done_ud;
    cm_free(l);
    if (done)
        done(ud);
}

static void maybe_finish(on_leader_t *l)
{
    if (!l->stopping || !l->timer_closed || l->unlock_pending || l->op_inflight || l->catchups ||
        l->inflight_pubs)
        return;
    free_leader(l);
}

static void unlock_done(cm_pg_t *pg, const PGresult *res, const char *error, void *ud)
{
    (void)pg;
    (void)res;
    on_leader_t *l = ud;
    l->unlock_pending = 0;
    if (error)
        cm_log_warn("advisory unlock failed (the session end releases it)", "error", error, NULL);
    else
        cm_log_info("leader lock released", NULL);
    maybe_finish(l);
}

static void timer_closed(uv_handle_t *h)
{
    on_leader_t *l = h->data;
    l->timer_closed = 1;
    maybe_finish(l);
}

void on_leader_stop(on_leader_t *l, void (*done)(void *ud), void *ud)
{
    if (l->stopping)
        return;
    int held = l->state == ST_LEADING || l->state == ST_LOCKING;
    l->stopping = 1;
    l->done = done;
    l->done_ud = ud;
    set_state(l, ST_DOWN);
    if (held && l->listen_up) {
        const char *params[1] = {l->lock_key};
        if (cm_pg_listen_query(l->app->pg, "SELECT pg_advisory_unlock($1::bigint)", 1, params, 1000,
                               unlock_done, l) == 0)
            l->unlock_pending = 1;
    }
    uv_close((uv_handle_t *)&l->timer, timer_closed);
}
