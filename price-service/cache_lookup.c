/*
 * Single lookups, cache-aside: memory tier -> Redis GET (+PTTL in the same round trip) -> on a
 * miss, the market's single flight to the origin. With caching off, straight to the origin.
 */
#include "cache_impl.h"

#include <string.h>
#include <uv.h>

/* A Redis GET on its way. */
typedef struct lookup {
    ps_cache_t *cache;
    ps_cache_cb cb;
    void *ud;
    uint64_t sent_ms; /* a PTTL counts from no earlier than this: the copy never outlives it */
    char market[PS_MARKET_MAX + 1];
} lookup_t;

/* An origin fetch with caching off. */
typedef struct bypass {
    ps_cache_t *cache;
    ps_cache_cb cb;
    void *ud;
} bypass_t;

static void result_from_value(ps_cache_result_t *r, const char *val, size_t len, const char *status)
{
    r->outcome = len ? PS_PRICE_FOUND : PS_PRICE_NOT_FOUND;
    r->body = len ? val : NULL;
    r->body_len = len;
    r->cache_status = status;
    r->age_s = -1;
}

static void on_bypass_origin(int status, const char *body, size_t len, void *arg)
{
    bypass_t *b = arg;
    ps_cache_result_t r = {status == 0           ? PS_PRICE_FOUND
                           : status == UV_ENOENT ? PS_PRICE_NOT_FOUND
                                                 : PS_PRICE_UNAVAILABLE,
                           status == 0 ? body : NULL, status == 0 ? len : 0, PS_CACHE_STATUS_BYPASS,
                           -1};
    b->cb(&r, b->ud);
    cm_free(b);
}

static void on_lookup_get(int status, const char *val, size_t len, int64_t pttl_ms, void *arg)
{
    lookup_t *l = arg;
    ps_cache_t *c = l->cache;
    /* An entry that outlives our TTL (or never expires) was not written by us: a planted
     * negative entry with an hour's PX would make a real market 404 for an hour. */
    int ours = pttl_ms > 0 && (uint64_t)pttl_ms <= c->set.ttl_ms;
    if (status == 0 && val && ours && ps_cache_value_ok(l->market, val, len)) {
        ps_cache_count(c->m_hit, &c->stats.hits);
        uint64_t expires = l->sent_ms + (uint64_t)pttl_ms;
        ps_cache_mem_store(c, l->market, val, len, len > 0, expires);
        ps_cache_stale_record(c, l->market, val, len, expires);
        ps_cache_refresh_maybe(c, l->market, expires, ps_cache_now(c));
        ps_cache_result_t r;
        result_from_value(&r, val, len, PS_CACHE_STATUS_HIT);
        l->cb(&r, l->ud);
        cm_free(l);
        return;
    }
    if (status == 0)
        ps_cache_count(c->m_miss, &c->stats.misses);
    else
        ps_cache_count(c->m_error, &c->stats.errors);
    ps_cache_waiter_t *w = ps_cache_waiter_new(l->cb, l->ud, NULL, 0);
    if (!w) {
        ps_cache_result_t r = {PS_PRICE_UNAVAILABLE, NULL, 0, PS_CACHE_STATUS_MISS, -1};
        l->cb(&r, l->ud);
    } else {
        ps_cache_flight_join_async(c, l->market, w, status != 0);
    }
    cm_free(l);
}

/* Queues an answer known now for the next loop turn; 0 or UV_ENOMEM, like ps_cache_get. */
static int answer_soon(ps_cache_t *c, ps_cache_cb cb, void *ud, const ps_cache_result_t *r)
{
    return ps_cache_ready_answer(c, cb, ud, r, NULL);
}

static int answer_unavailable(ps_cache_t *c, ps_cache_cb cb, void *ud, const char *status)
{
    ps_cache_result_t r = {PS_PRICE_UNAVAILABLE, NULL, 0, status, -1};
    return answer_soon(c, cb, ud, &r);
}

/* The origin could not be asked for `market`: the stale value when there is one. */
static int answer_failed(ps_cache_t *c, const char *market, ps_cache_cb cb, void *ud,
                         const char *status)
{
    ps_cache_result_t r;
    if (ps_cache_stale_answer(c, market, &r))
        return answer_soon(c, cb, ud, &r);
    return answer_unavailable(c, cb, ud, status);
}

/* A waiter for cb joins the flight of `market` (or starts it); what the flight can tell now
 * is queued, like every answer known inside ps_cache_get. */
static int join_flight(ps_cache_t *c, const char *market, ps_cache_cb cb, void *ud,
                       int redis_failed)
{
    const char *failed = redis_failed ? PS_CACHE_STATUS_REDIS_DOWN : PS_CACHE_STATUS_MISS;
    ps_cache_waiter_t *w = ps_cache_waiter_new(cb, ud, NULL, 0);
    if (!w)
        return answer_unavailable(c, cb, ud, PS_CACHE_STATUS_MISS);
    ps_cache_result_t now;
    int rc = ps_cache_flight_join(c, market, w, redis_failed, &now);
    if (rc == 1) /* the flight's body goes with its SET reply: the answer keeps a copy */
        return answer_soon(c, cb, ud, &now);
    return rc < 0 ? answer_failed(c, market, cb, ud, failed) : 0;
}

/* A hit on the in-process copy: queued with a reference on its body, no copy. */
static int answer_memory(ps_cache_t *c, ps_cache_mem_entry_t *e, uint64_t t, ps_cache_cb cb,
                         void *ud)
{
    ps_cache_count(c->m_hit, &c->stats.hits);
    ps_cache_count(c->m_memory_hit, &c->stats.memory_hits);
    ps_cache_result_t r = {e->body && e->body->len ? PS_PRICE_FOUND : PS_PRICE_NOT_FOUND, NULL, 0,
                           PS_CACHE_STATUS_HIT_MEMORY, -1};
    int rc = ps_cache_ready_answer(c, cb, ud, &r, r.outcome == PS_PRICE_FOUND ? e->body : NULL);
    /* One look per copy at the refresh state, not one per hit in the window. */
    if (rc == 0 && !e->refresh_checked && e->expires_ms - t <= ps_cache_refresh_window(c)) {
        e->refresh_checked = 1;
        ps_cache_refresh_maybe(c, e->market, e->expires_ms, t);
    }
    return rc;
}

int ps_cache_get(ps_cache_t *c, const char *market, ps_cache_cb cb, void *ud)
{
    if (!c->set.enabled) {
        ps_cache_count(c->m_bypass, &c->stats.bypasses);
        bypass_t *b = cm_malloc(sizeof *b);
        if (!b)
            return answer_unavailable(c, cb, ud, PS_CACHE_STATUS_BYPASS);
        *b = (bypass_t){c, cb, ud};
        if (c->be.fetch(c->be.ctx, market, on_bypass_origin, b) < 0) {
            cm_free(b);
            return answer_unavailable(c, cb, ud, PS_CACHE_STATUS_BYPASS);
        }
        return 0;
    }

    uint64_t t = ps_cache_now(c);
    ps_cache_mem_entry_t *e = ps_cache_mem_find(c, market, t);
    if (e)
        return answer_memory(c, e, t, cb, ud);

    /* A fetch already in flight answers sooner than Redis would say "miss". A finished one
     * is only for GETs sent before its SET: a new request asks Redis, behind the SET. */
    if (ps_cache_flight_pending(c, market)) {
        ps_cache_count(c->m_miss, &c->stats.misses);
        return join_flight(c, market, cb, ud, 0);
    }

    lookup_t *l = cm_malloc(sizeof *l);
    if (l) {
        char key[PS_CACHE_KEY_MAX];
        ps_cache_key(market, key);
        l->cache = c;
        l->cb = cb;
        l->ud = ud;
        l->sent_ms = t;
        strcpy(l->market, market);
        if (c->be.get(c->be.ctx, key, on_lookup_get, l) == 0)
            return 0;
        cm_free(l);
    }

    /* Redis is down (or memory is short): straight to the origin. */
    ps_cache_count(c->m_error, &c->stats.errors);
    return join_flight(c, market, cb, ud, 1);
}
