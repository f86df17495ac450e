/*
 * leader.c: the leader's ordered publish pipeline (leader.h): notifications and the catch-up
 * merged in id order, rows read for id-only notifications, PUBLISH on one Redis link with
 * resends after a link failure. Whether this replica leads is election.c's business; it calls
 * in through lead, unlead and tick, and this file only calls it.
 */
#include "leader.h"

#include "dedup.h"
#include "election.h"
#include "event.h"
#include "gate.h"
#include "outbox.h"

#include "cm/alloc.h"
#include "cm/buf.h"
#include "cm/error.h"
#include "cm/log.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

/* Publishes waiting for Redis (queued or to be sent again) beyond which the oldest are dropped:
 * they are still in the outbox, where a replica's replay or a client's resume finds them. */
#define QUEUE_MAX 400000
/* Published ids are remembered this much longer than the look-back of a catch-up. */
#define PUBLISHED_MARGIN_MS 15000
/* Hard bound of that memory (ids): far above what a look-back window holds in practice. */
#define PUBLISHED_CAP (8u << 20)
#define RETRY_MS 200
#define ALL_CHANNEL "orders:all"

/* One event's Redis message, shared by its two PUBLISHes. */
typedef struct msg {
    int refs;
    size_t len;
    char data[];
} msg_t;

/* One PUBLISH, from built to confirmed by Redis. */
typedef struct pub pub_t;
struct pub {
    pub_t *next;
    on_leader_t *l;
    msg_t *msg;
    int is_all; /* the all-users copy: not counted as a published event */
    size_t chan_len;
    char chan[];
};

typedef struct {
    pub_t *head, *tail;
    size_t n;
} pub_list_t;

/* An event in the publish pipeline, in the order Postgres delivered its notification. */
typedef struct item item_t;
struct item {
    item_t *next;
    int64_t id;
    int have; /* ev is filled; 0: the notification carried only the id, the row must be read */
    on_event_t ev;
};

struct on_leader {
    on_app_t *app;
    on_election_t election; /* which replica publishes: it calls lead and unlead */
    uv_timer_t retry_timer; /* catch-up or row read to try again */

    /* The pipeline: items are published strictly in order; a head that needs its row read
     * holds the ones behind it until it is published. */
    item_t *items_head, *items_tail;
    on_gate_t gate;            /* live items held while the catch-up is merged in */
    on_outbox_read_t *catchup; /* catch-up in flight */
    on_outbox_read_t *fetch;   /* read of the head item's row in flight */
    int catchup_needed;        /* leadership started and its catch-up has not finished */
    unsigned gen;              /* bumps on every leadership change: stale reads are dropped */
    int reads;                 /* outbox reads in flight (they borrow `l`) */
    on_idset_t published;

    /* Redis: sent in order on one link, so replies (and failures) come back in order. */
    pub_list_t outq;     /* built, not sent yet */
    pub_list_t inflight; /* sent, not confirmed */
    pub_list_t failed;   /* sent, the link failed before a reply: sent again first */
    uint64_t dropped;

    int stopping;
    int election_stopped; /* its `stopped` fired: its part of the stop is done */
    int handles_open;
    void (*done)(void *ud);
    void *done_ud;
};

typedef struct {
    on_leader_t *l;
    unsigned gen;
} read_ctx_t;

static void maybe_finish(on_leader_t *l);
static void pump(on_leader_t *l);
static void start_catchup(on_leader_t *l);

/* ---- Redis stage ------------------------------------------------------------------------ */

static void list_push(pub_list_t *q, pub_t *p)
{
    p->next = NULL;
    if (q->tail)
        q->tail->next = p;
    else
        q->head = p;
    q->tail = p;
    q->n++;
}

static pub_t *list_pop(pub_list_t *q)
{
    pub_t *p = q->head;
    if (p) {
        q->head = p->next;
        if (!q->head)
            q->tail = NULL;
        q->n--;
        p->next = NULL;
    }
    return p;
}

/* Puts `front` before `q`, emptying `front`. */
static void list_prepend(pub_list_t *q, pub_list_t *front)
{
    if (!front->head)
        return;
    front->tail->next = q->head;
    if (!q->tail)
        q->tail = front->tail;
    q->head = front->head;
    q->n += front->n;
    front->head = front->tail = NULL;
    front->n = 0;
}

static void msg_unref(msg_t *m)
{
    if (m && --m->refs == 0)
        cm_free(m);
}

static void pub_free(pub_t *p)
{
    msg_unref(p->msg);
    cm_free(p);
}

static void list_clear(pub_list_t *q)
{
    pub_t *p;
    while ((p = list_pop(q)) != NULL)
        pub_free(p);
}

static void publish_done(cm_redis_t *r, struct redisReply *reply, int status, void *ud);

/* Sends what is queued while the link is up. hiredis writes the whole batch on the next loop
 * turn, so a burst goes out as one pipeline. No deadline of its own: behind a deep pipeline a
 * PUBLISH waits its turn, and only a lost or stalled link fails it (then it is sent again). */
static void flush_outq(on_leader_t *l)
{
    static const cm_redis_cmd_opts_t no_deadline = {.timeout_ms = 0};
    pub_t *p;
    while (l->outq.head && cm_redis_is_up(l->app->redis_pub)) {
        p = l->outq.head;
        const char *argv[3] = {"PUBLISH", p->chan, p->msg->data};
        size_t lens[3] = {7, p->chan_len, p->msg->len};
        if (cm_redis_command_argv_opts(l->app->redis_pub, &no_deadline, publish_done, p, 3, argv,
                                       lens) != 0)
            return; /* down after all: on_leader_redis_up sends it */
        list_pop(&l->outq);
        list_push(&l->inflight, p);
    }
}

static void publish_done(cm_redis_t *r, struct redisReply *reply, int status, void *ud)
{
    (void)r;
    (void)reply;
    pub_t *p = ud;
    on_leader_t *l = p->l;
    /* Replies come in the order the commands went out. */
    if (l->inflight.head == p)
        list_pop(&l->inflight);
    if (status == CM_REDIS_OK) {
        if (!p->is_all)
            cm_counter_inc(l->app->m.events_published);
        pub_free(p);
    } else if (l->stopping || !on_election_is_leader(&l->election)) {
        pub_free(p);
    } else {
        /* Not confirmed: Redis may or may not have delivered it; receivers drop a repeat. */
        list_push(&l->failed, p);
    }
    maybe_finish(l);
}

/* Keeps the queue bounded while Redis is away. */
static void trim_queue(on_leader_t *l)
{
    while (l->outq.n + l->failed.n > QUEUE_MAX) {
        pub_t *p = l->failed.head ? list_pop(&l->failed) : list_pop(&l->outq);
        if (!p)
            break;
        if (l->dropped++ % 10000 == 0)
            cm_log_error("publish queue full while Redis is away: dropping the oldest (they stay "
                         "in the outbox)",
                         NULL);
        pub_free(p);
    }
}

static pub_t *pub_new(on_leader_t *l, msg_t *m, const char *chan, size_t chan_len, int is_all)
{
    pub_t *p = cm_malloc(sizeof *p + chan_len + 1);
    if (!p)
        return NULL;
    p->next = NULL;
    p->l = l;
    p->msg = m;
    m->refs++;
    p->is_all = is_all;
    p->chan_len = chan_len;
    memcpy(p->chan, chan, chan_len);
    p->chan[chan_len] = '\0';
    return p;
}

/* Queues `ev` for its user's channel and the all-users channel, once per id. */
static void publish_event(on_leader_t *l, const on_event_t *ev)
{
    int added = on_idset_add(&l->published, ev->id, uv_now(l->app->loop));
    if (added == 0)
        return; /* published already (the catch-up and a notification overlapping) */
    cm_buf_t body = CM_BUF_INIT, chan = CM_BUF_INIT;
    msg_t *m = NULL;
    if (on_event_envelope(ev, &body) != 0 || on_event_channel(ev->user_id, &chan) != 0 ||
        !(m = cm_malloc(sizeof *m + body.len + 1))) {
        cm_log_error("cannot build the event message", "error", "out of memory", NULL);
        goto done;
    }
    m->refs = 1;
    m->len = body.len;
    memcpy(m->data, body.data, body.len);
    m->data[body.len] = '\0';
    pub_t *a = pub_new(l, m, chan.data, chan.len, 0);
    pub_t *b = pub_new(l, m, ALL_CHANNEL, strlen(ALL_CHANNEL), 1);
    if (a)
        list_push(&l->outq, a);
    if (b)
        list_push(&l->outq, b);
    if (!a || !b)
        cm_log_error("cannot queue a publish", "error", "out of memory", NULL);
done:
    msg_unref(m);
    cm_buf_free(&body);
    cm_buf_free(&chan);
}

void on_leader_redis_up(on_leader_t *l)
{
    if (l->stopping)
        return;
    if (l->failed.n > 0) {
        char count[24];
        snprintf(count, sizeof count, "%zu", l->failed.n);
        cm_log_info("redis back: publishing unconfirmed events again", "count", count, NULL);
    }
    list_prepend(&l->outq, &l->failed);
    flush_outq(l);
}

/* ---- the pipeline ----------------------------------------------------------------------- */

static item_t *item_new(int64_t id)
{
    item_t *it = cm_calloc(1, sizeof *it);
    if (it)
        it->id = id;
    return it;
}

static void item_free(item_t *it)
{
    on_event_clear(&it->ev);
    cm_free(it);
}

static void item_drop(void *data)
{
    item_free(data);
}

static void items_push(on_leader_t *l, item_t *it)
{
    it->next = NULL;
    if (l->items_tail)
        l->items_tail->next = it;
    else
        l->items_head = it;
    l->items_tail = it;
}

static void items_clear(on_leader_t *l)
{
    item_t *it = l->items_head;
    while (it) {
        item_t *next = it->next;
        item_free(it);
        it = next;
    }
    l->items_head = l->items_tail = NULL;
}

static void fetch_row(on_event_t *ev, void *ud)
{
    read_ctx_t *c = ud;
    on_leader_t *l = c->l;
    item_t *it = l->items_head;
    if (c->gen == l->gen && it && !it->have && it->id == ev->id) {
        it->ev = *ev;
        it->have = 1;
        memset(ev, 0, sizeof *ev);
        return;
    }
    on_event_clear(ev);
}

static void retry_later(uv_timer_t *t);

static void fetch_done(int status, int truncated, void *ud)
{
    (void)truncated;
    read_ctx_t *c = ud;
    on_leader_t *l = c->l;
    unsigned gen = c->gen;
    cm_free(c);
    l->reads--;
    l->fetch = NULL;
    if (l->stopping || gen != l->gen) {
        maybe_finish(l);
        return;
    }
    item_t *it = l->items_head;
    if (status != 0) {
        /* The events behind it wait: publishing them first would reorder an order. */
        uv_timer_start(&l->retry_timer, retry_later, RETRY_MS, 0);
        return;
    }
    if (it && !it->have) {
        char id[24];
        snprintf(id, sizeof id, "%" PRId64, it->id);
        cm_log_warn("a notified event is not in the outbox; skipping it", "id", id, NULL);
        l->items_head = it->next;
        if (!l->items_head)
            l->items_tail = NULL;
        item_free(it);
    }
    pump(l);
}

static void start_fetch(on_leader_t *l, int64_t id)
{
    read_ctx_t *c = cm_malloc(sizeof *c);
    if (!c) {
        uv_timer_start(&l->retry_timer, retry_later, RETRY_MS, 0);
        return;
    }
    *c = (read_ctx_t){l, l->gen};
    on_outbox_query_t q = {.after_id = id - 1, .upto_id = id};
    if (on_outbox_read(l->app->pg, &q, fetch_row, fetch_done, c, &l->fetch) != 0) {
        cm_free(c);
        uv_timer_start(&l->retry_timer, retry_later, RETRY_MS, 0);
        return;
    }
    l->reads++;
}

/* Publishes from the head of the pipeline until it is empty or its head needs its row. */
static void pump(on_leader_t *l)
{
    if (l->stopping || !on_election_is_leader(&l->election))
        return;
    item_t *it;
    while ((it = l->items_head) != NULL) {
        if (!it->have) {
            if (!l->fetch && !uv_is_active((uv_handle_t *)&l->retry_timer))
                start_fetch(l, it->id);
            break;
        }
        l->items_head = it->next;
        if (!l->items_head)
            l->items_tail = NULL;
        publish_event(l, &it->ev);
        item_free(it);
    }
    trim_queue(l);
    flush_outq(l);
}

static void gate_emit(int64_t id, void *data, void *ud)
{
    (void)id;
    items_push(ud, data);
}

static void catchup_row(on_event_t *ev, void *ud)
{
    read_ctx_t *c = ud;
    on_leader_t *l = c->l;
    if (c->gen != l->gen || l->stopping) {
        on_event_clear(ev);
        return;
    }
    /* Held notifications with a lower id go first: the merged stream stays in id order. */
    on_gate_row(&l->gate, ev->id, gate_emit, item_drop, l);
    if (on_idset_has(&l->published, ev->id)) {
        on_event_clear(ev);
        return;
    }
    item_t *it = item_new(ev->id);
    if (!it) {
        on_event_clear(ev);
        return;
    }
    cm_counter_inc(l->app->m.events_received);
    it->ev = *ev;
    it->have = 1;
    memset(ev, 0, sizeof *ev);
    items_push(l, it);
    pump(l);
}

static void catchup_done(int status, int truncated, void *ud)
{
    (void)truncated;
    read_ctx_t *c = ud;
    on_leader_t *l = c->l;
    unsigned gen = c->gen;
    cm_free(c);
    l->reads--;
    l->catchup = NULL;
    if (l->stopping || gen != l->gen || !on_election_is_leader(&l->election)) {
        maybe_finish(l);
        return;
    }
    if (status != 0) {
        /* Keep holding: what was merged is published, the rest comes with the next try. */
        cm_log_warn("catch-up failed, retrying", "error", cm_strerror(status), NULL);
        uv_timer_start(&l->retry_timer, retry_later, RETRY_MS, 0);
        return;
    }
    l->catchup_needed = 0;
    on_gate_release(&l->gate, gate_emit, item_drop, l);
    cm_log_debug("catch-up finished", NULL);
    pump(l);
}

/* Reads the look-back window of the outbox while the notifications that arrive meanwhile are
 * held, so that what the previous leader did not publish goes out before anything newer. */
static void start_catchup(on_leader_t *l)
{
    if (l->catchup)
        return;
    on_gate_hold(&l->gate);
    read_ctx_t *c = cm_malloc(sizeof *c);
    if (!c) {
        uv_timer_start(&l->retry_timer, retry_later, RETRY_MS, 0);
        return;
    }
    *c = (read_ctx_t){l, l->gen};
    on_outbox_query_t q = {.since = on_now() - (double)l->app->cfg.lookback_ms / 1000.0};
    if (on_outbox_read(l->app->pg, &q, catchup_row, catchup_done, c, &l->catchup) != 0) {
        cm_free(c);
        uv_timer_start(&l->retry_timer, retry_later, RETRY_MS, 0);
        return;
    }
    l->reads++;
}

static void retry_later(uv_timer_t *t)
{
    on_leader_t *l = t->data;
    if (l->stopping || !on_election_is_leader(&l->election))
        return;
    if (l->catchup_needed)
        start_catchup(l);
    pump(l);
}

/* Leadership is over: nothing more goes out from here (a new leader catches up). */
static void drop_pipeline(on_leader_t *l)
{
    l->gen++;
    on_outbox_cancel(l->catchup);
    on_outbox_cancel(l->fetch);
    uv_timer_stop(&l->retry_timer);
    items_clear(l);
    on_gate_free(&l->gate, item_drop);
    list_clear(&l->outq);
    list_clear(&l->failed);
    l->catchup_needed = 0;
    on_idset_free(&l->published);
}

/* ---- NOTIFY ------------------------------------------------------------------------------- */

void on_leader_notify(on_leader_t *l, const char *channel, const char *payload)
{
    if (l->stopping || !on_election_is_leader(&l->election))
        return;
    cm_counter_inc(l->app->m.events_received);
    on_event_t ev;
    int rc = on_event_parse(payload, strlen(payload), &ev);
    if (rc != 0 && rc != UV_EAGAIN) {
        cm_log_warn("ignoring a malformed notification", "channel", channel, NULL);
        return;
    }
    item_t *it = item_new(ev.id);
    if (!it) {
        on_event_clear(&ev);
        cm_log_error("cannot queue an event (it stays in the outbox)", "error", "out of memory",
                     NULL);
        return;
    }
    /* UV_EAGAIN: over 8000 bytes, the trigger sent the id only; the row is the truth. */
    it->have = rc == 0;
    it->ev = ev;
    int g = on_gate_live(&l->gate, it->id, it);
    if (g == 0)
        return;
    if (g == ON_GATE_DUP) {
        item_free(it); /* merged from the catch-up already */
        return;
    }
    /* g == 1, or no memory to hold it: better out of order than lost. */
    items_push(l, it);
    pump(l);
}

/* ---- what the election tells ------------------------------------------------------------ */

/* Leadership (re)starts: a new term, which begins by catching up on the look-back window. */
static void on_lead(void *ud)
{
    on_leader_t *l = ud;
    l->gen++;
    l->catchup_needed = 1;
    start_catchup(l);
}

static void on_unlead(void *ud)
{
    drop_pipeline(ud);
}

/* A catch-up that could not even start gets another chance at each liveness check. */
static void on_tick(void *ud)
{
    on_leader_t *l = ud;
    if (l->catchup_needed && !l->catchup)
        start_catchup(l);
}

static void on_election_stopped(void *ud)
{
    on_leader_t *l = ud;
    l->election_stopped = 1;
    maybe_finish(l);
}

void on_leader_listen_state(on_leader_t *l, int up)
{
    if (l->stopping)
        return;
    on_election_listen_state(&l->election, up);
}

int on_leader_probe_notify(on_leader_t *l, const char *channel, const char *payload, int be_pid)
{
    return on_election_probe_notify(&l->election, channel, payload, be_pid);
}

const char *on_leader_refusal(const on_leader_t *l)
{
    return l ? on_election_refusal(&l->election) : NULL;
}

int on_leader_is_leader(const on_leader_t *l)
{
    return on_election_is_leader(&l->election);
}

int on_leader_listen_up(const on_leader_t *l)
{
    return on_election_listen_up(&l->election);
}

int on_leader_new(on_app_t *app, on_leader_t **out)
{
    on_leader_t *l = cm_calloc(1, sizeof *l);
    if (!l)
        return UV_ENOMEM;
    l->app = app;
    on_idset_init(&l->published, PUBLISHED_CAP,
                  (uint64_t)app->cfg.lookback_ms + PUBLISHED_MARGIN_MS);
    on_gate_init(&l->gate);
    const on_election_cbs_t cbs = {on_lead, on_unlead, on_tick, on_election_stopped, l};
    on_election_init(&l->election, app, &cbs);
    uv_timer_init(app->loop, &l->retry_timer);
    l->retry_timer.data = l;
    l->handles_open = 1;
    *out = l;
    return 0;
}

/* ---- stop --------------------------------------------------------------------------------- */

static void free_leader(on_leader_t *l)
{
    drop_pipeline(l);
    list_clear(&l->inflight);
    void (*done)(void *) = l->done;
    void *ud = l->done_ud;
    cm_free(l);
    if (done)
        done(ud);
}

static void maybe_finish(on_leader_t *l)
{
    if (!l->stopping || !l->election_stopped || l->handles_open || l->reads || l->inflight.n)
        return;
    free_leader(l);
}

static void handle_closed(uv_handle_t *h)
{
    on_leader_t *l = h->data;
    l->handles_open--;
    maybe_finish(l);
}

void on_leader_stop(on_leader_t *l, void (*done)(void *ud), void *ud)
{
    if (l->stopping)
        return;
    l->stopping = 1;
    l->done = done;
    l->done_ud = ud;
    /* Drops the pipeline (unlead) and releases the lock; its `stopped` comes later. */
    on_election_stop(&l->election);
    uv_close((uv_handle_t *)&l->retry_timer, handle_closed);
}
