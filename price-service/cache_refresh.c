/*
 * Refresh-ahead: a hit on an entry in the last refresh_ahead_pct % of its TTL asks for a short
 * Redis lock (SET price:lock:v1:<market> <token> NX PX <window>); the one replica that gets it
 * reads the origin and replaces the entry while every request keeps being answered from the
 * current one. Replicas that lose the lock do nothing: their copies expire with the entry they
 * copied, and the next read finds the new one.
 */
#include "cache_impl.h"

#include <string.h>
#include <uv.h>

/*
 * Refresh-ahead of one market in this replica: lock, then origin, then SET. Kept after it
 * ended until next_try_ms, so the other hits of the same window do not ask for the lock again.
 * In the order of the attempts, so the front holds the oldest, which go first.
 */
struct ps_cache_refresh {
    UT_hash_handle hh;
    ps_cache_t *cache;
    int busy;             /* the lock, the origin or the SET is still to answer */
    uint64_t next_try_ms; /* the lock's own expiry: before it, nobody else can have a new one */
    uint64_t set_sent_ms;
    uint64_t ttl_ms;
    int found;
    char *body;
    size_t len;
    char market[PS_MARKET_MAX + 1];
};

uint64_t ps_cache_refresh_window(const ps_cache_t *c)
{
    return c->set.ttl_ms * c->set.refresh_ahead_pct / 100;
}

static void refresh_remove(ps_cache_t *c, ps_cache_refresh_t *r)
{
    HASH_DEL(c->refreshes, r);
    cm_free(r->body);
    cm_free(r);
}

void ps_cache_refresh_clear(ps_cache_t *c)
{
    ps_cache_refresh_t *r, *tmp;
    HASH_ITER(hh, c->refreshes, r, tmp)
    {
        refresh_remove(c, r);
    }
}

size_t ps_cache_refresh_busy(const ps_cache_t *c)
{
    size_t n = 0;
    for (const ps_cache_refresh_t *r = c->refreshes; r; r = r->hh.next)
        n += r->busy != 0;
    return n;
}

/* Ends an attempt: counted under `result` (and in *stat); the state stays until next_try_ms. */
static void refresh_end(ps_cache_refresh_t *r, cm_metric_t *result, uint64_t *stat)
{
    ps_cache_count(result, stat);
    cm_free(r->body);
    r->body = NULL;
    r->busy = 0;
}

static void on_refresh_set(int status, void *arg)
{
    ps_cache_refresh_t *r = arg;
    ps_cache_t *c = r->cache;
    if (status != 0) {
        refresh_end(r, c->m_refresh_error, &c->stats.refresh_errors);
        return;
    }
    /* The new entry lives from no earlier than the SET was sent: the copy never outlives it. */
    ps_cache_mem_store(c, r->market, r->body, r->len, r->found, r->set_sent_ms + r->ttl_ms);
    if (r->found)
        ps_cache_stale_record(c, r->market, r->body, r->len, r->set_sent_ms + r->ttl_ms);
    refresh_end(r, c->m_refresh_ok, &c->stats.refreshes_ok);
}

static void on_refresh_origin(int status, const char *body, size_t len, void *arg)
{
    ps_cache_refresh_t *r = arg;
    ps_cache_t *c = r->cache;
    /* A failed read leaves the current entry to expire: the lookups after it are misses that
     * try the origin again themselves (and may answer stale). */
    if ((status != 0 && status != UV_ENOENT) || !c->set.enabled) {
        refresh_end(r, c->m_refresh_error, &c->stats.refresh_errors);
        return;
    }
    r->found = status == 0;
    r->len = r->found ? len : 0;
    if (r->found && !(r->body = cm_strndup(body, len))) {
        refresh_end(r, c->m_refresh_error, &c->stats.refresh_errors);
        return;
    }
    char key[PS_CACHE_KEY_MAX];
    ps_cache_key(r->market, key);
    r->ttl_ms = c->set.ttl_ms;
    r->set_sent_ms = ps_cache_now(c);
    int rc =
        c->be.set(c->be.ctx, key, r->found ? r->body : "", r->len, r->ttl_ms, on_refresh_set, r);
    if (rc != 0)
        refresh_end(r, c->m_refresh_error, &c->stats.refresh_errors);
}

static void on_refresh_lock(int status, int acquired, void *arg)
{
    ps_cache_refresh_t *r = arg;
    ps_cache_t *c = r->cache;
    if (status != 0) {
        ps_cache_count(c->m_lock_error, NULL);
        refresh_end(r, c->m_refresh_error, &c->stats.refresh_errors);
        return;
    }
    if (!acquired) {
        /* Another replica refreshes: its SET reaches this one on the next Redis read, once the
         * copies here expired with the entry they copied. */
        ps_cache_count(c->m_lock_lost, NULL);
        refresh_end(r, c->m_refresh_lost, &c->stats.refresh_lock_lost);
        return;
    }
    ps_cache_count(c->m_lock_won, &c->stats.locks_won);
    if (!c->set.enabled) {
        refresh_end(r, c->m_refresh_error, &c->stats.refresh_errors);
        return;
    }
    c->stats.origin_fetches++;
    if (c->be.fetch(c->be.ctx, r->market, on_refresh_origin, r) != 0)
        refresh_end(r, c->m_refresh_error, &c->stats.refresh_errors);
}

void ps_cache_refresh_maybe(ps_cache_t *c, const char *market, uint64_t expires_ms, uint64_t now)
{
    uint64_t window = ps_cache_refresh_window(c);
    if (window == 0 || expires_ms <= now || expires_ms - now > window)
        return;
    ps_cache_refresh_t *r;
    HASH_FIND_STR(c->refreshes, market, r);
    if (r && (r->busy || now < r->next_try_ms))
        return;
    if (r) {
        HASH_DEL(c->refreshes, r); /* back to the end: the table stays in attempt order */
    } else {
        while (c->refreshes && !c->refreshes->busy && c->refreshes->next_try_ms <= now)
            refresh_remove(c, c->refreshes);
        /* Full of attempts under way: this entry just expires and is fetched on a miss. */
        if (HASH_COUNT(c->refreshes) >= c->set.memory_max_entries)
            return;
        if (!(r = cm_calloc(1, sizeof *r)))
            return;
        r->cache = c;
        strcpy(r->market, market);
    }
    HASH_ADD_STR(c->refreshes, market, r);
    if (!r->hh.tbl) {
        cm_free(r);
        return;
    }
    r->busy = 1;
    /* The lock lives one window: it covers the read and the SET, and it is gone before the new
     * entry's own window opens (refresh_ahead_pct <= 50), so it is never released by hand. */
    r->next_try_ms = now + window;
    char key[PS_CACHE_KEY_MAX];
    ps_cache_lock_key(market, key);
    if (c->be.lock(c->be.ctx, key, window, on_refresh_lock, r) != 0) {
        ps_cache_count(c->m_lock_error, NULL);
        refresh_end(r, c->m_refresh_error, &c->stats.refresh_errors);
    }
}
