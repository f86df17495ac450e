/* The memory tier: in-process copies of Redis entries, each kept only until that entry's own
 * expiry, so no answer is older than Redis would give. */
#include "cache_impl.h"

#include <string.h>

static void mem_remove(ps_cache_t *c, ps_cache_mem_entry_t *e)
{
    HASH_DEL(c->memory, e);
    ps_cache_body_unref(e->body);
    cm_free(e);
}

void ps_cache_mem_clear(ps_cache_t *c)
{
    ps_cache_mem_entry_t *e, *tmp;
    HASH_ITER(hh, c->memory, e, tmp)
    {
        mem_remove(c, e);
    }
}

ps_cache_mem_entry_t *ps_cache_mem_find(ps_cache_t *c, const char *market, uint64_t now)
{
    ps_cache_mem_entry_t *e;
    HASH_FIND_STR(c->memory, market, e);
    if (e && e->expires_ms <= now) {
        mem_remove(c, e);
        return NULL;
    }
    return e;
}

void ps_cache_mem_store(ps_cache_t *c, const char *market, const char *body, size_t len, int found,
                        uint64_t expires_ms)
{
    if (!c->set.enabled || !c->set.memory_enabled)
        return;
    uint64_t now = ps_cache_now(c);
    if (expires_ms <= now)
        return;
    ps_cache_mem_entry_t *e;
    HASH_FIND_STR(c->memory, market, e);
    if (e)
        mem_remove(c, e);
    /* Entries sit in insertion order and live about one TTL each, so the expired ones are
     * at the front: dropping from the front is amortised O(1). When the tier is still full,
     * the oldest entry makes room (a scan for expired entries on every store took the loop
     * 11 ms per hit with 100k negative entries). */
    while (c->memory &&
           (c->memory->expires_ms <= now || HASH_COUNT(c->memory) >= c->set.memory_max_entries))
        mem_remove(c, c->memory);
    if (c->set.memory_max_entries == 0)
        return;
    e = cm_calloc(1, sizeof *e);
    if (!e)
        return;
    if (found) {
        e->body = ps_cache_body_new(body, len);
        if (!e->body) {
            cm_free(e);
            return;
        }
    }
    e->expires_ms = expires_ms;
    strcpy(e->market, market);
    HASH_ADD_STR(c->memory, market, e);
    if (!e->hh.tbl) { /* uthash could not allocate its table (HASH_NONFATAL_OOM) */
        ps_cache_body_unref(e->body);
        cm_free(e);
    }
}
