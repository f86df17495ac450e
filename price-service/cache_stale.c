/*
 * Stale-if-error: the last value known per market, kept past its expiry so that a lookup the
 * origin fails can still be answered for at most stale_if_error_ms, saying so.
 */
#include "cache_impl.h"

#include <string.h>

/* Two readings of one entry's expiry (sent + PTTL) differ by a millisecond or two: within
 * this, they are taken as the same entry. */
#define SAME_ENTRY_MS 2

/*
 * The last value known of a market. In update order, so the front holds the longest
 * unrefreshed values, which go first.
 */
struct ps_cache_stale_entry {
    UT_hash_handle hh;
    char *body;
    size_t len;
    uint64_t fetched_ms; /* when the origin gave it: the entry's expiry minus its TTL */
    uint64_t expires_ms; /* the expiry of the entry it copies */
    char market[PS_MARKET_MAX + 1];
};

static void stale_remove(ps_cache_t *c, ps_cache_stale_entry_t *e)
{
    HASH_DEL(c->stale, e);
    cm_free(e->body);
    cm_free(e);
}

void ps_cache_stale_clear(ps_cache_t *c)
{
    ps_cache_stale_entry_t *e, *tmp;
    HASH_ITER(hh, c->stale, e, tmp)
    {
        stale_remove(c, e);
    }
}

size_t ps_cache_stale_count(const ps_cache_t *c)
{
    return HASH_COUNT(c->stale);
}

/* Called once per entry and replica (the entry's first hit or its SET), so the copy is off
 * the memory-tier hit path. Best effort, like the memory tier: a 404 is not worth serving
 * stale, so negative entries are not kept. */
void ps_cache_stale_record(ps_cache_t *c, const char *market, const char *body, size_t len,
                           uint64_t expires_ms)
{
    if (!c->set.enabled || !c->set.stale_if_error_ms || !len)
        return;
    ps_cache_stale_entry_t *e;
    HASH_FIND_STR(c->stale, market, e);
    if (e && expires_ms <= e->expires_ms + SAME_ENTRY_MS)
        return; /* the same entry again (memory tier off: every hit reads Redis), or older */
    if (e)
        stale_remove(c, e);
    uint64_t now = ps_cache_now(c);
    while (c->stale && (c->stale->expires_ms + c->set.stale_if_error_ms <= now ||
                        HASH_COUNT(c->stale) >= c->set.memory_max_entries))
        stale_remove(c, c->stale);
    if (c->set.memory_max_entries == 0 || !(e = cm_calloc(1, sizeof *e)))
        return;
    if (!(e->body = cm_strndup(body, len))) {
        cm_free(e);
        return;
    }
    e->len = len;
    e->expires_ms = expires_ms;
    e->fetched_ms = expires_ms > c->set.ttl_ms ? expires_ms - c->set.ttl_ms : 0;
    strcpy(e->market, market);
    HASH_ADD_STR(c->stale, market, e);
    if (!e->hh.tbl) {
        cm_free(e->body);
        cm_free(e);
    }
}

int ps_cache_stale_answer(ps_cache_t *c, const char *market, ps_cache_result_t *r)
{
    if (!c->set.enabled || !c->set.stale_if_error_ms)
        return 0;
    ps_cache_stale_entry_t *e;
    HASH_FIND_STR(c->stale, market, e);
    uint64_t now = ps_cache_now(c);
    if (!e || now >= e->expires_ms + c->set.stale_if_error_ms)
        return 0;
    ps_cache_count(c->m_stale, &c->stats.stale);
    r->outcome = PS_PRICE_FOUND;
    r->body = e->body;
    r->body_len = e->len;
    r->cache_status = PS_CACHE_STATUS_STALE;
    r->age_s = now > e->fetched_ms ? (long)((now - e->fetched_ms) / 1000) : 0;
    return 1;
}
