/*
 * Answers known before the call that asked returned (memory-tier hits, collapsed lookups of a
 * finished flight, failures) wait here for the next loop turn, so a callback never fires from
 * inside ps_cache_get() or ps_cache_get_many(). This is the hit path: a queued answer is an
 * array slot and a reference on the copy's body, no allocation once the array has grown, and
 * the idle handle runs only while answers wait (it also keeps the loop from blocking in poll
 * with answers queued).
 */
#include "cache_impl.h"

#include <string.h>

struct ps_cache_ready {
    ps_cache_cb cb;
    void *ud;
    ps_cache_batch_t *batch; /* a finished batch instead of a single answer */
    ps_cache_body_t *body;   /* a reference, or NULL */
    ps_price_outcome_t outcome;
    const char *status;
    long age_s;
};

/* Grown by doubling from this many slots: enough for a loop turn of a few hundred clients. */
#define READY_MIN 64

ps_cache_body_t *ps_cache_body_new(const char *data, size_t len)
{
    ps_cache_body_t *b = cm_malloc(sizeof *b + len + 1);
    if (!b)
        return NULL;
    b->refs = 1;
    b->len = len;
    memcpy(b->data, data, len);
    b->data[len] = '\0';
    return b;
}

void ps_cache_body_unref(ps_cache_body_t *b)
{
    if (b && --b->refs == 0)
        cm_free(b);
}

static void answer(const ps_cache_ready_t *r)
{
    if (r->batch) {
        ps_cache_batch_finish(r->batch);
        return;
    }
    ps_cache_result_t res = {r->outcome, r->body ? r->body->data : NULL, r->body ? r->body->len : 0,
                             r->status, r->age_s};
    r->cb(&res, r->ud);
    ps_cache_body_unref(r->body);
}

/* Answers what was queued before this turn; what those callbacks queue waits for the next,
 * so one turn's work stays bounded. */
static void ready_drain(ps_cache_t *c)
{
    size_t n = c->nready;
    for (size_t i = 0; i < n; i++) {
        ps_cache_ready_t r = c->ready[i]; /* a callback may grow (move) the array */
        answer(&r);
    }
    memmove(c->ready, c->ready + n, (c->nready - n) * sizeof *c->ready);
    c->nready -= n;
}

static void on_idle(uv_idle_t *h)
{
    ps_cache_t *c = h->data;
    ready_drain(c);
    if (c->nready == 0)
        uv_idle_stop(&c->idle);
}

static int ready_push(ps_cache_t *c, const ps_cache_ready_t *r)
{
    if (c->nready == c->cap) {
        size_t cap = c->cap ? c->cap * 2 : READY_MIN;
        ps_cache_ready_t *a = cm_realloc(c->ready, cap * sizeof *a);
        if (!a)
            return UV_ENOMEM;
        c->ready = a;
        c->cap = cap;
    }
    if (c->nready == 0 && !uv_is_closing((uv_handle_t *)&c->idle))
        uv_idle_start(&c->idle, on_idle);
    c->ready[c->nready++] = *r;
    return 0;
}

int ps_cache_ready_answer(ps_cache_t *c, ps_cache_cb cb, void *ud, const ps_cache_result_t *res,
                          ps_cache_body_t *shared)
{
    ps_cache_ready_t r = {cb, ud, NULL, shared, res->outcome, res->cache_status, res->age_s};
    if (shared)
        shared->refs++;
    else if (res->body && !(r.body = ps_cache_body_new(res->body, res->body_len)))
        return UV_ENOMEM;
    int rc = ready_push(c, &r);
    if (rc != 0)
        ps_cache_body_unref(r.body);
    return rc;
}

int ps_cache_ready_batch(ps_cache_t *c, ps_cache_batch_t *b)
{
    ps_cache_ready_t r = {NULL, NULL, b, NULL, PS_PRICE_UNAVAILABLE, NULL, -1};
    return ready_push(c, &r);
}

int ps_cache_ready_init(ps_cache_t *c, uv_loop_t *loop)
{
    int rc = uv_idle_init(loop, &c->idle);
    c->idle.data = c;
    return rc;
}

static void on_idle_closed(uv_handle_t *h)
{
    ps_cache_t *c = h->data;
    /* Answers still queued were promised: they come now, on this later turn. */
    while (c->nready > 0)
        ready_drain(c);
    void (*done)(void *) = c->on_closed;
    void *ud = c->closed_ud;
    cm_free(c->ready);
    cm_free(c);
    if (done)
        done(ud);
}

void ps_cache_ready_close(ps_cache_t *c)
{
    uv_close((uv_handle_t *)&c->idle, on_idle_closed);
}
