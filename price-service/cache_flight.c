/*
 * Single-flight: one origin read per market however many lookups miss it meanwhile (the
 * others are "collapsed"), then the SET that stores what the origin said.
 */
#include "cache_impl.h"

#include <string.h>
#include <uv.h>

static void flight_free(ps_cache_t *c, ps_cache_flight_t *f)
{
    HASH_DEL(c->flights, f);
    cm_free(f->body);
    cm_free(f);
}

static void deliver(ps_cache_waiter_t *w, ps_price_outcome_t outcome, const char *body, size_t len,
                    const char *status)
{
    if (w->batch) {
        ps_cache_batch_item_done(w->batch, w->index, outcome, body, len);
        return;
    }
    ps_cache_result_t r = {outcome, outcome == PS_PRICE_FOUND ? body : NULL,
                           outcome == PS_PRICE_FOUND ? len : 0, status, -1};
    w->cb(&r, w->ud);
}

/* The origin could not answer `w`: the stale value when there is one (single lookups only:
 * a batch has no Cache-Status to say so), else "unavailable". */
static void deliver_failed(ps_cache_t *c, const char *market, ps_cache_waiter_t *w,
                           const char *status)
{
    ps_cache_result_t r;
    if (!w->batch && ps_cache_stale_answer(c, market, &r))
        w->cb(&r, w->ud);
    else
        deliver(w, PS_PRICE_UNAVAILABLE, NULL, 0, status);
}

static void on_flight_set(int status, void *arg)
{
    ps_cache_flight_t *f = arg;
    ps_cache_t *c = f->cache;
    if (status == 0) {
        ps_cache_mem_store(c, f->market, f->body, f->len, f->outcome == PS_PRICE_FOUND,
                           f->set_sent_ms + f->ttl_ms);
        ps_cache_stale_record(c, f->market, f->body, f->len, f->set_sent_ms + f->ttl_ms);
    }
    flight_free(c, f);
}

static void on_flight_origin(int status, const char *body, size_t len, void *arg)
{
    ps_cache_flight_t *f = arg;
    ps_cache_t *c = f->cache;
    f->done = 1;
    if (status == 0) {
        f->outcome = PS_PRICE_FOUND;
        f->body = cm_strndup(body, len);
        f->len = len;
        if (!f->body)
            f->outcome = PS_PRICE_UNAVAILABLE;
    } else if (status == UV_ENOENT) {
        f->outcome = PS_PRICE_NOT_FOUND;
    } else {
        f->outcome = PS_PRICE_UNAVAILABLE;
    }

    /* Store before answering, so that a request arriving right after sees the entry. */
    int keep = 0;
    if (f->outcome != PS_PRICE_UNAVAILABLE && c->set.enabled && !f->redis_failed) {
        char key[PS_CACHE_KEY_MAX];
        ps_cache_key(f->market, key);
        f->ttl_ms = c->set.ttl_ms;
        f->set_sent_ms = ps_cache_now(c);
        keep = c->be.set(c->be.ctx, key, f->body ? f->body : "", f->len, f->ttl_ms, on_flight_set,
                         f) == 0;
    }

    ps_cache_waiter_t *w = f->waiters;
    f->waiters = NULL;
    f->tail = &f->waiters;
    const char *first = f->redis_failed                      ? PS_CACHE_STATUS_REDIS_DOWN
                        : f->outcome == PS_PRICE_UNAVAILABLE ? PS_CACHE_STATUS_MISS
                                                             : PS_CACHE_STATUS_STORED;
    int is_first = f->started_by_lookup;
    while (w) {
        ps_cache_waiter_t *next = w->next;
        const char *st = is_first ? first : PS_CACHE_STATUS_COLLAPSED;
        if (f->outcome == PS_PRICE_UNAVAILABLE)
            deliver_failed(c, f->market, w, st);
        else
            deliver(w, f->outcome, f->body, f->len, st);
        is_first = 0;
        cm_free(w);
        w = next;
    }
    if (!keep)
        flight_free(c, f);
}

ps_cache_waiter_t *ps_cache_waiter_new(ps_cache_cb cb, void *ud, ps_cache_batch_t *b, int index)
{
    ps_cache_waiter_t *w = cm_calloc(1, sizeof *w);
    if (w) {
        w->cb = cb;
        w->ud = ud;
        w->batch = b;
        w->index = index;
    }
    return w;
}

static void flight_add(ps_cache_flight_t *f, ps_cache_waiter_t *w)
{
    *f->tail = w;
    f->tail = &w->next;
}

ps_cache_flight_t *ps_cache_flight_pending(ps_cache_t *c, const char *market)
{
    ps_cache_flight_t *f;
    HASH_FIND_STR(c->flights, market, f);
    return f && !f->done ? f : NULL;
}

int ps_cache_flight_join(ps_cache_t *c, const char *market, ps_cache_waiter_t *w, int redis_failed,
                         ps_cache_result_t *now)
{
    ps_cache_flight_t *f;
    HASH_FIND_STR(c->flights, market, f);
    if (f) {
        ps_cache_count(c->m_collapsed, &c->stats.collapsed);
        if (f->done) {
            now->outcome = f->outcome;
            now->body = f->body;
            now->body_len = f->len;
            now->cache_status = PS_CACHE_STATUS_COLLAPSED;
            now->age_s = -1;
            cm_free(w);
            return 1;
        }
        flight_add(f, w);
        return 0;
    }
    f = cm_calloc(1, sizeof *f);
    if (!f) {
        cm_free(w);
        return UV_ENOMEM;
    }
    f->cache = c;
    f->tail = &f->waiters;
    f->redis_failed = redis_failed;
    f->started_by_lookup = w->batch == NULL;
    strcpy(f->market, market);
    HASH_ADD_STR(c->flights, market, f);
    if (!f->hh.tbl) {
        cm_free(f);
        cm_free(w);
        return UV_ENOMEM;
    }
    c->stats.origin_fetches++;
    int rc = c->be.fetch(c->be.ctx, market, on_flight_origin, f);
    if (rc < 0) {
        flight_free(c, f);
        cm_free(w);
        return rc;
    }
    flight_add(f, w);
    return 0;
}

void ps_cache_flight_join_async(ps_cache_t *c, const char *market, ps_cache_waiter_t *w,
                                int redis_failed)
{
    ps_cache_waiter_t copy = *w;
    ps_cache_result_t now;
    int rc = ps_cache_flight_join(c, market, w, redis_failed, &now);
    if (rc == 1)
        deliver(&copy, now.outcome, now.body, now.body_len, now.cache_status);
    else if (rc < 0)
        deliver_failed(c, market, &copy,
                       redis_failed ? PS_CACHE_STATUS_REDIS_DOWN : PS_CACHE_STATUS_MISS);
}

void ps_cache_flight_clear(ps_cache_t *c)
{
    ps_cache_flight_t *f, *tmp;
    HASH_ITER(hh, c->flights, f, tmp)
    {
        ps_cache_waiter_t *w = f->waiters;
        while (w) {
            ps_cache_waiter_t *next = w->next;
            cm_free(w);
            w = next;
        }
        flight_free(c, f);
    }
}
