/*
 * Batch lookups: the memory tier, then one Redis round trip (MGET) for all it does not hold,
 * then the single flights of the misses. Stale values are never used here: a batch has no
 * Cache-Status to say so.
 */
#include "cache_impl.h"

#include <uv.h>

struct ps_cache_batch {
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

static void batch_free(ps_cache_batch_t *b)
{
    cm_free(b->todo);
    cm_free(b->keys);
    cm_free(b);
}

void ps_cache_batch_finish(ps_cache_batch_t *b)
{
    b->cb(b->items, b->n, b->ud);
    batch_free(b);
}

void ps_cache_batch_item_done(ps_cache_batch_t *b, int index, ps_price_outcome_t outcome,
                              const char *body, size_t len)
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
        ps_cache_batch_finish(b);
}

static void batch_miss(ps_cache_batch_t *b, int i, int redis_failed)
{
    ps_cache_waiter_t *w = ps_cache_waiter_new(NULL, NULL, b, i);
    if (!w) {
        ps_cache_batch_item_done(b, i, PS_PRICE_UNAVAILABLE, NULL, 0);
        return;
    }
    ps_cache_flight_join_async(b->cache, b->items[i].market, w, redis_failed);
}

static void on_batch_mget(int status, const char *const *vals, const size_t *lens, int n, void *arg)
{
    ps_cache_batch_t *b = arg;
    ps_cache_t *c = b->cache;
    b->in_call = 1;
    for (int k = 0; k < b->ntodo; k++) {
        int i = b->todo[k];
        if (status == 0 && k < n && vals[k] &&
            ps_cache_value_ok(b->items[i].market, vals[k], lens[k])) {
            ps_cache_count(c->m_hit, &c->stats.hits);
            ps_cache_batch_item_done(b, i, lens[k] ? PS_PRICE_FOUND : PS_PRICE_NOT_FOUND, vals[k],
                                     lens[k]);
            continue;
        }
        if (status == 0)
            ps_cache_count(c->m_miss, &c->stats.misses);
        else
            ps_cache_count(c->m_error, &c->stats.errors);
        batch_miss(b, i, status != 0);
    }
    b->in_call = 0;
    if (b->pending == 0)
        ps_cache_batch_finish(b);
}

int ps_cache_get_many(ps_cache_t *c, ps_cache_batch_item_t *items, int n, ps_cache_batch_cb cb,
                      void *ud)
{
    ps_cache_batch_t *b = cm_calloc(1, sizeof *b);
    if (!b)
        return UV_ENOMEM;
    b->todo = cm_calloc((size_t)n, sizeof *b->todo);
    b->keys = cm_calloc((size_t)n, sizeof *b->keys);
    if (!b->todo || !b->keys) {
        batch_free(b);
        return UV_ENOMEM;
    }
    *b = (ps_cache_batch_t){c, items, n, n, cb, ud, 1, 0, b->todo, b->keys};
    for (int i = 0; i < n; i++) {
        items[i].outcome = PS_PRICE_UNAVAILABLE;
        items[i].body = NULL;
        items[i].body_len = 0;
    }

    uint64_t now = ps_cache_now(c);
    const char *keys[PS_BATCH_MAX];
    for (int i = 0; i < n; i++) {
        ps_cache_mem_entry_t *e =
            c->set.enabled ? ps_cache_mem_find(c, items[i].market, now) : NULL;
        if (e) {
            ps_cache_count(c->m_hit, &c->stats.hits);
            ps_cache_count(c->m_memory_hit, &c->stats.memory_hits);
            int found = e->body && e->body->len;
            ps_cache_batch_item_done(b, i, found ? PS_PRICE_FOUND : PS_PRICE_NOT_FOUND,
                                     found ? e->body->data : NULL, found ? e->body->len : 0);
            if (!e->refresh_checked && e->expires_ms - now <= ps_cache_refresh_window(c)) {
                e->refresh_checked = 1;
                ps_cache_refresh_maybe(c, items[i].market, e->expires_ms, now);
            }
        } else if (b->ntodo < PS_BATCH_MAX) {
            ps_cache_key(items[i].market, b->keys[b->ntodo]);
            keys[b->ntodo] = b->keys[b->ntodo];
            b->todo[b->ntodo++] = i;
        } else {
            ps_cache_batch_item_done(b, i, PS_PRICE_UNAVAILABLE, NULL, 0);
        }
    }

    if (b->ntodo > 0) {
        if (!c->set.enabled) {
            for (int k = 0; k < b->ntodo; k++) {
                ps_cache_count(c->m_bypass, &c->stats.bypasses);
                batch_miss(b, b->todo[k], 0);
            }
        } else if (c->be.mget(c->be.ctx, keys, b->ntodo, on_batch_mget, b) == 0) {
            b->in_call = 0;
            return 0;
        } else {
            for (int k = 0; k < b->ntodo; k++) {
                ps_cache_count(c->m_error, &c->stats.errors);
                batch_miss(b, b->todo[k], 1);
            }
        }
    }
    b->in_call = 0;
    /* Answered without waiting on anything: the callback still comes on the next turn. */
    if (b->pending == 0 && ps_cache_ready_batch(c, b) != 0) {
        ps_cache_batch_release(items, n);
        batch_free(b);
        return UV_ENOMEM;
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
