#include "cache.h"

#include "cm/alloc.h"
#include "cm/metrics.h"
#include "market.h"

#include <string.h>
#include <uv.h>

#define uthash_malloc(sz) cm_malloc(sz)
#define uthash_free(ptr, sz) cm_free(ptr)
#define HASH_NONFATAL_OOM 1
#include <uthash.h>

/* RFC 9211 Cache-Status values. */
static const char STATUS_HIT[] = "price-service; hit";
static const char STATUS_HIT_MEMORY[] = "price-service; hit; detail=memory";
static const char STATUS_STORED[] = "price-service; fwd=miss; stored";
static const char STATUS_COLLAPSED[] = "price-service; fwd=miss; collapsed";
static const char STATUS_BYPASS[] = "price-service; fwd=bypass";
static const char STATUS_REDIS_DOWN[] = "price-service; fwd=miss; detail=redis-unavailable";
static const char STATUS_MISS[] = "price-service; fwd=miss";

/* ---- types ---------------------------------------------------------------------------- */

/* A copy of a Redis entry, valid until that entry's own expiry. */
typedef struct mem_entry {
    UT_hash_handle hh;
    char *body; /* NULL for a negative entry */
    size_t len;
    uint64_t expires_ms;
    char market[PS_MARKET_MAX + 1];
} mem_entry_t;

typedef struct batch batch_t;

/* Someone waiting for a flight: a single lookup (cb) or one item of a batch. */
typedef struct waiter {
    struct waiter *next;
    ps_cache_cb cb;
    void *ud;
    batch_t *batch;
    int index;
} waiter_t;

/*
 * One origin fetch shared by every lookup of the market that misses meanwhile. After the
 * origin answered, the flight stays (done) until Redis acknowledges the SET: a GET sent before
 * the SET can still come back empty, and it is then answered from the flight instead of
 * starting a second fetch. Redis answers in order, so after the SET reply no such GET is left.
 */
typedef struct flight {
    UT_hash_handle hh;
    ps_cache_t *cache;
    waiter_t *waiters;
    waiter_t **tail;
    int started_by_lookup; /* the first waiter reports "stored", the others "collapsed" */
    int redis_failed;      /* the GET failed: report redis-unavailable, do not SET */
    int done;
    ps_price_outcome_t outcome;
    char *body;
    size_t len;
    uint64_t set_sent_ms;
    uint64_t ttl_ms;
    char market[PS_MARKET_MAX + 1];
} flight_t;

/* A Redis GET on its way. */
typedef struct lookup {
    ps_cache_t *cache;
    ps_cache_cb cb;
    void *ud;
    char market[PS_MARKET_MAX + 1];
} lookup_t;

/* An origin fetch with caching off. */
typedef struct bypass {
    ps_cache_t *cache;
    ps_cache_cb cb;
    void *ud;
} bypass_t;

struct batch {
    ps_cache_t *cache;
    ps_cache_batch_item_t *items;
    int n;
    int pending; /* items not answered yet */
    ps_cache_batch_cb cb;
    void *ud;
    int in_call; /* inside a loop over items: finishing is left to the loop's end */
    int ntodo;   /* items asked of Redis, their indexes in todo[] */
    int *todo;
    char (*keys)[PS_CACHE_KEY_MAX];
};

struct ps_cache {
    ps_cache_backend_t be;
    ps_cache_settings_t set;
    mem_entry_t *memory;
    flight_t *flights;
    ps_cache_stats_t stats;
    cm_metric_t *m_hit, *m_miss, *m_error, *m_bypass, *m_memory_hit, *m_collapsed;
};

/* ---- helpers -------------------------------------------------------------------------- */

static void count(cm_metric_t *m, uint64_t *stat)
{
    (*stat)++;
    if (m)
        cm_counter_inc(m);
}

void ps_cache_key(const char *market, char *out)
{
    memcpy(out, "price:v1:", 9);
    size_t len = strnlen(market, PS_MARKET_MAX);
    memcpy(out + 9, market, len);
    out[9 + len] = '\0';
}

static double hit_ratio(void *ud)
{
    const ps_cache_t *c = ud;
    double total = (double)(c->stats.hits + c->stats.misses + c->stats.errors);
    return total > 0 ? (double)c->stats.hits / total : 0.0;
}

/* ---- memory tier ---------------------------------------------------------------------- */

static void mem_remove(ps_cache_t *c, mem_entry_t *e)
{
    HASH_DEL(c->memory, e);
    cm_free(e->body);
    cm_free(e);
}

static void mem_clear(ps_cache_t *c)
{
    mem_entry_t *e, *tmp;
    HASH_ITER(hh, c->memory, e, tmp)
    {
        mem_remove(c, e);
    }
}

static mem_entry_t *mem_find(ps_cache_t *c, const char *market, uint64_t now)
{
    mem_entry_t *e;
    HASH_FIND_STR(c->memory, market, e);
    if (e && e->expires_ms <= now) {
        mem_remove(c, e);
        return NULL;
    }
    return e;
}

/* Keeps a copy until `expires_ms`. Best effort: a full tier or no memory just skips it. */
static void mem_store(ps_cache_t *c, const char *market, const char *body, size_t len, int found,
                      uint64_t expires_ms)
{
    if (!c->set.enabled || !c->set.memory_enabled)
        return;
    uint64_t now = c->be.now_ms(c->be.ctx);
    if (expires_ms <= now)
        return;
    mem_entry_t *e;
    HASH_FIND_STR(c->memory, market, e);
    if (e)
        mem_remove(c, e);
    /* Entries sit in insertion order and live about one TTL each, so the expired ones are
     * at the front: dropping from the front is amortised O(1). When the tier is still full,
     * the oldest entry makes room (a scan for expired entries on every store took the loop
     * 11 ms per hit with 100k negative entries). */
    while (c->memory && (c->memory->expires_ms <= now ||
                         HASH_COUNT(c->memory) >= c->set.memory_max_entries))
        mem_remove(c, c->memory);
    if (c->set.memory_max_entries == 0)
        return;
    e = cm_calloc(1, sizeof *e);
    if (!e)
        return;
    if (found) {
        e->body = cm_strndup(body, len);
        if (!e->body) {
            cm_free(e);
            return;
        }
        e->len = len;
    }
    e->expires_ms = expires_ms;
    strcpy(e->market, market);
    HASH_ADD_STR(c->memory, market, e);
    if (!e->hh.tbl) { /* uthash could not allocate its table (HASH_NONFATAL_OOM) */
        cm_free(e->body);
        cm_free(e);
    }
}

/* ---- delivery ------------------------------------------------------------------------- */

static void batch_free(batch_t *b)
{
    cm_free(b->todo);
    cm_free(b->keys);
    cm_free(b);
}

static void batch_finish(batch_t *b)
{
    b->cb(b->items, b->n, b->ud);
    batch_free(b);
}

static void batch_item_done(batch_t *b, int index, ps_price_outcome_t outcome, const char *body,
                            size_t len)
{
    ps_cache_batch_item_t *it = &b->items[index];
    it->outcome = outcome;
    if (outcome == PS_PRICE_FOUND) {
        it->body = cm_strndup(body, len);
        it->body_len = len;
        if (!it->body)
            it->outcome = PS_PRICE_UNAVAILABLE;
    }
    if (--b->pending == 0 && !b->in_call)
        batch_finish(b);
}

static void deliver(waiter_t *w, ps_price_outcome_t outcome, const char *body, size_t len,
                    const char *status)
{
    if (w->batch) {
        batch_item_done(w->batch, w->index, outcome, body, len);
        return;
    }
    ps_cache_result_t r = {outcome, outcome == PS_PRICE_FOUND ? body : NULL,
                           outcome == PS_PRICE_FOUND ? len : 0, status};
    w->cb(&r, w->ud);
}

static void result_from_value(ps_cache_result_t *r, const char *val, size_t len,
                              const char *status)
{
    r->outcome = len ? PS_PRICE_FOUND : PS_PRICE_NOT_FOUND;
    r->body = len ? val : NULL;
    r->body_len = len;
    r->cache_status = status;
}

/* ---- single-flight -------------------------------------------------------------------- */

static void flight_free(ps_cache_t *c, flight_t *f)
{
    HASH_DEL(c->flights, f);
    cm_free(f->body);
    cm_free(f);
}

static void on_flight_set(int status, void *arg)
{
    flight_t *f = arg;
    ps_cache_t *c = f->cache;
    if (status == 0)
        mem_store(c, f->market, f->body, f->len, f->outcome == PS_PRICE_FOUND,
                  f->set_sent_ms + f->ttl_ms);
    flight_free(c, f);
}

static void on_flight_origin(int status, const char *body, size_t len, void *arg)
{
    flight_t *f = arg;
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
        f->set_sent_ms = c->be.now_ms(c->be.ctx);
        keep = c->be.set(c->be.ctx, key, f->body ? f->body : "", f->len, f->ttl_ms, on_flight_set,
                         f) == 0;
    }

    waiter_t *w = f->waiters;
    f->waiters = NULL;
    f->tail = &f->waiters;
    const char *first = f->redis_failed                          ? STATUS_REDIS_DOWN
                        : f->outcome == PS_PRICE_UNAVAILABLE ? STATUS_MISS
                                                                 : STATUS_STORED;
    int is_first = f->started_by_lookup;
    while (w) {
        waiter_t *next = w->next;
        deliver(w, f->outcome, f->body, f->len, is_first ? first : STATUS_COLLAPSED);
        is_first = 0;
        cm_free(w);
        w = next;
    }
    if (!keep)
        flight_free(c, f);
}

static waiter_t *waiter_new(ps_cache_cb cb, void *ud, batch_t *b, int index)
{
    waiter_t *w = cm_calloc(1, sizeof *w);
    if (w) {
        w->cb = cb;
        w->ud = ud;
        w->batch = b;
        w->index = index;
    }
    return w;
}

static void flight_add(flight_t *f, waiter_t *w)
{
    *f->tail = w;
    f->tail = &w->next;
}

/*
 * Joins the flight of `market` or starts one. Returns 0 when `w` will be answered later,
 * 1 when the flight is already done and `*now` holds its answer (w is freed), or a negative
 * code when the origin fetch failed at once (w is freed).
 */
static int flight_join(ps_cache_t *c, const char *market, waiter_t *w, int redis_failed,
                       ps_cache_result_t *now)
{
    flight_t *f;
    HASH_FIND_STR(c->flights, market, f);
    if (f) {
        count(c->m_collapsed, &c->stats.collapsed);
        if (f->done) {
            now->outcome = f->outcome;
            now->body = f->body;
            now->body_len = f->len;
            now->cache_status = STATUS_COLLAPSED;
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

/* The same from a callback: answers the waiter at once when the flight cannot. */
static void flight_join_async(ps_cache_t *c, const char *market, waiter_t *w, int redis_failed)
{
    waiter_t copy = *w;
    ps_cache_result_t now;
    int rc = flight_join(c, market, w, redis_failed, &now);
    if (rc == 1)
        deliver(&copy, now.outcome, now.body, now.body_len, now.cache_status);
    else if (rc < 0)
        deliver(&copy, PS_PRICE_UNAVAILABLE, NULL, 0,
                redis_failed ? STATUS_REDIS_DOWN : STATUS_MISS);
}

/* ---- single lookups ------------------------------------------------------------------- */

static void on_bypass_origin(int status, const char *body, size_t len, void *arg)
{
    bypass_t *b = arg;
    ps_cache_result_t r = {status == 0            ? PS_PRICE_FOUND
                           : status == UV_ENOENT ? PS_PRICE_NOT_FOUND
                                                  : PS_PRICE_UNAVAILABLE,
                           status == 0 ? body : NULL, status == 0 ? len : 0, STATUS_BYPASS};
    b->cb(&r, b->ud);
    cm_free(b);
}

static void on_lookup_get(int status, const char *val, size_t len, int64_t pttl_ms, void *arg)
{
    lookup_t *l = arg;
    ps_cache_t *c = l->cache;
    if (status == 0 && val) {
        count(c->m_hit, &c->stats.hits);
        if (pttl_ms > 0)
            mem_store(c, l->market, val, len, len > 0,
                      c->be.now_ms(c->be.ctx) + (uint64_t)pttl_ms);
        ps_cache_result_t r;
        result_from_value(&r, val, len, STATUS_HIT);
        l->cb(&r, l->ud);
        cm_free(l);
        return;
    }
    if (status == 0)
        count(c->m_miss, &c->stats.misses);
    else
        count(c->m_error, &c->stats.errors);
    waiter_t *w = waiter_new(l->cb, l->ud, NULL, 0);
    if (!w) {
        ps_cache_result_t r = {PS_PRICE_UNAVAILABLE, NULL, 0, STATUS_MISS};
        l->cb(&r, l->ud);
    } else {
        flight_join_async(c, l->market, w, status != 0);
    }
    cm_free(l);
}

static int answer_unavailable(ps_cache_result_t *now, const char *status)
{
    now->outcome = PS_PRICE_UNAVAILABLE;
    now->body = NULL;
    now->body_len = 0;
    now->cache_status = status;
    return 1;
}

int ps_cache_get(ps_cache_t *c, const char *market, ps_cache_cb cb, void *ud,
                 ps_cache_result_t *now)
{
    if (!c->set.enabled) {
        count(c->m_bypass, &c->stats.bypasses);
        bypass_t *b = cm_malloc(sizeof *b);
        if (!b)
            return answer_unavailable(now, STATUS_BYPASS);
        *b = (bypass_t){c, cb, ud};
        if (c->be.fetch(c->be.ctx, market, on_bypass_origin, b) < 0) {
            cm_free(b);
            return answer_unavailable(now, STATUS_BYPASS);
        }
        return 0;
    }

    mem_entry_t *e = mem_find(c, market, c->be.now_ms(c->be.ctx));
    if (e) {
        count(c->m_hit, &c->stats.hits);
        count(c->m_memory_hit, &c->stats.memory_hits);
        result_from_value(now, e->body, e->len, STATUS_HIT_MEMORY);
        return 1;
    }

    /* A fetch already in flight answers sooner than Redis would say "miss". A finished one
     * is only for GETs sent before its SET: a new request asks Redis, behind the SET. */
    flight_t *f;
    HASH_FIND_STR(c->flights, market, f);
    if (f && !f->done) {
        count(c->m_miss, &c->stats.misses);
        waiter_t *w = waiter_new(cb, ud, NULL, 0);
        if (!w)
            return answer_unavailable(now, STATUS_MISS);
        int rc = flight_join(c, market, w, 0, now);
        return rc < 0 ? answer_unavailable(now, STATUS_MISS) : rc;
    }

    lookup_t *l = cm_malloc(sizeof *l);
    if (l) {
        char key[PS_CACHE_KEY_MAX];
        ps_cache_key(market, key);
        l->cache = c;
        l->cb = cb;
        l->ud = ud;
        strcpy(l->market, market);
        if (c->be.get(c->be.ctx, key, on_lookup_get, l) == 0)
            return 0;
        cm_free(l);
    }

    /* Redis is down (or memory is short): straight to the origin. */
    count(c->m_error, &c->stats.errors);
    waiter_t *w = waiter_new(cb, ud, NULL, 0);
    if (!w)
        return answer_unavailable(now, STATUS_MISS);
    int rc = flight_join(c, market, w, 1, now);
    return rc < 0 ? answer_unavailable(now, STATUS_REDIS_DOWN) : rc;
}

/* ---- batch lookups -------------------------------------------------------------------- */

static void batch_miss(batch_t *b, int i, int redis_failed)
{
    waiter_t *w = waiter_new(NULL, NULL, b, i);
    if (!w) {
        batch_item_done(b, i, PS_PRICE_UNAVAILABLE, NULL, 0);
        return;
    }
    flight_join_async(b->cache, b->items[i].market, w, redis_failed);
}

static void on_batch_mget(int status, const char *const *vals, const size_t *lens, int n,
                          void *arg)
{
    batch_t *b = arg;
    ps_cache_t *c = b->cache;
    b->in_call = 1;
    for (int k = 0; k < b->ntodo; k++) {
        int i = b->todo[k];
        if (status == 0 && k < n && vals[k]) {
            count(c->m_hit, &c->stats.hits);
            batch_item_done(b, i, lens[k] ? PS_PRICE_FOUND : PS_PRICE_NOT_FOUND, vals[k],
                            lens[k]);
            continue;
        }
        if (status == 0)
            count(c->m_miss, &c->stats.misses);
        else
            count(c->m_error, &c->stats.errors);
        batch_miss(b, i, status != 0);
    }
    b->in_call = 0;
    if (b->pending == 0)
        batch_finish(b);
}

int ps_cache_get_many(ps_cache_t *c, ps_cache_batch_item_t *items, int n, ps_cache_batch_cb cb,
                      void *ud)
{
    batch_t *b = cm_calloc(1, sizeof *b);
    if (!b)
        return UV_ENOMEM;
    b->todo = cm_calloc((size_t)n, sizeof *b->todo);
    b->keys = cm_calloc((size_t)n, sizeof *b->keys);
    if (!b->todo || !b->keys) {
        batch_free(b);
        return UV_ENOMEM;
    }
    *b = (batch_t){c, items, n, n, cb, ud, 1, 0, b->todo, b->keys};
    for (int i = 0; i < n; i++) {
        items[i].outcome = PS_PRICE_UNAVAILABLE;
        items[i].body = NULL;
        items[i].body_len = 0;
    }

    uint64_t now = c->be.now_ms(c->be.ctx);
    const char *keys[PS_BATCH_MAX];
    for (int i = 0; i < n; i++) {
        mem_entry_t *e = c->set.enabled ? mem_find(c, items[i].market, now) : NULL;
        if (e) {
            count(c->m_hit, &c->stats.hits);
            count(c->m_memory_hit, &c->stats.memory_hits);
            batch_item_done(b, i, e->body ? PS_PRICE_FOUND : PS_PRICE_NOT_FOUND, e->body, e->len);
        } else if (b->ntodo < PS_BATCH_MAX) {
            ps_cache_key(items[i].market, b->keys[b->ntodo]);
            keys[b->ntodo] = b->keys[b->ntodo];
            b->todo[b->ntodo++] = i;
        } else {
            batch_item_done(b, i, PS_PRICE_UNAVAILABLE, NULL, 0);
        }
    }

    if (b->ntodo > 0) {
        if (!c->set.enabled) {
            for (int k = 0; k < b->ntodo; k++) {
                count(c->m_bypass, &c->stats.bypasses);
                batch_miss(b, b->todo[k], 0);
            }
        } else if (c->be.mget(c->be.ctx, keys, b->ntodo, on_batch_mget, b) == 0) {
            b->in_call = 0;
            return 0;
        } else {
            for (int k = 0; k < b->ntodo; k++) {
                count(c->m_error, &c->stats.errors);
                batch_miss(b, b->todo[k], 1);
            }
        }
    }
    b->in_call = 0;
    if (b->pending == 0) {
        batch_free(b);
        return 1;
    }
    return 0;
}

void ps_cache_batch_release(ps_cache_batch_item_t *items, int n)
{
    for (int i = 0; i < n; i++) {
        cm_free(items[i].body);
        items[i].body = NULL;
    }
}

/* ---- lifecycle ------------------------------------------------------------------------ */

ps_cache_t *ps_cache_new(const ps_cache_backend_t *backend, const ps_cache_settings_t *settings,
                         struct cm_metrics *metrics)
{
    ps_cache_t *c = cm_calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->be = *backend;
    c->set = *settings;
    if (metrics) {
        const char *name = "price_cache_lookups_total";
        const char *help = "Price cache lookups by result (hit includes memory-tier hits).";
        c->m_hit = cm_metrics_counter(metrics, name, help, "result=\"hit\"");
        c->m_miss = cm_metrics_counter(metrics, name, help, "result=\"miss\"");
        c->m_error = cm_metrics_counter(metrics, name, help, "result=\"error\"");
        c->m_bypass = cm_metrics_counter(metrics, name, help, "result=\"bypass\"");
        c->m_memory_hit = cm_metrics_counter(
            metrics, "price_cache_memory_hits_total",
            "Hits answered from the in-process copy of a Redis entry, before its expiry.", NULL);
        c->m_collapsed = cm_metrics_counter(
            metrics, "price_cache_collapsed_total",
            "Lookups that shared another lookup's origin fetch (single-flight).", NULL);
        cm_metrics_gauge_fn(metrics, "price_cache_hit_ratio",
                            "Hits / (hits + misses + errors) since start.", NULL, hit_ratio, c);
    }
    return c;
}

void ps_cache_configure(ps_cache_t *c, const ps_cache_settings_t *settings)
{
    if (settings->enabled != c->set.enabled || settings->ttl_ms != c->set.ttl_ms ||
        settings->memory_enabled != c->set.memory_enabled)
        mem_clear(c);
    c->set = *settings;
}

void ps_cache_free(ps_cache_t *c)
{
    if (!c)
        return;
    mem_clear(c);
    flight_t *f, *tmp;
    HASH_ITER(hh, c->flights, f, tmp)
    {
        waiter_t *w = f->waiters;
        while (w) {
            waiter_t *next = w->next;
            cm_free(w);
            w = next;
        }
        flight_free(c, f);
    }
    cm_free(c);
}

void ps_cache_stats(const ps_cache_t *c, ps_cache_stats_t *out)
{
    *out = c->stats;
    out->memory_entries = HASH_COUNT(c->memory);
    out->flights = HASH_COUNT(c->flights);
}
