/*
 * cache_impl.h: what the parts of the price cache share (cache.h is the public side).
 *
 * cache.c        lifecycle, settings, metrics, stats, keys
 * cache_lookup.c single lookups: memory tier, then Redis GET, then single-flight
 * cache_batch.c  batch lookups: memory tier, then one MGET, then single-flight
 * cache_memory.c the in-process copies of Redis entries
 * cache_flight.c single-flight origin reads and the SET that stores them
 * cache_refresh.c refresh-ahead under a SET NX PX lock
 * cache_stale.c  the last value per market, for stale-if-error
 * cache_ready.c  answers known at once, delivered on the next loop turn
 */
#ifndef PS_CACHE_IMPL_H
#define PS_CACHE_IMPL_H

#include "cache.h"
#include "cm/alloc.h"
#include "cm/metrics.h"
#include "market.h"

#include <uv.h>

/* Every part must see the same uthash configuration: they share the tables. */
#define uthash_malloc(sz) cm_malloc(sz)
#define uthash_free(ptr, sz) cm_free(ptr)
#define HASH_NONFATAL_OOM 1
#include <uthash.h>

/* RFC 9211 Cache-Status values. */
#define PS_CACHE_STATUS_HIT "price-service; hit"
#define PS_CACHE_STATUS_HIT_MEMORY "price-service; hit; detail=memory"
#define PS_CACHE_STATUS_STORED "price-service; fwd=miss; stored"
#define PS_CACHE_STATUS_COLLAPSED "price-service; fwd=miss; collapsed"
#define PS_CACHE_STATUS_BYPASS "price-service; fwd=bypass"
#define PS_CACHE_STATUS_REDIS_DOWN "price-service; fwd=miss; detail=redis-unavailable"
#define PS_CACHE_STATUS_MISS "price-service; fwd=miss"
/* RFC 9211 has no "served stale" parameter: fwd=stale says the stored value was stale, and the
 * detail says why it was answered anyway (the origin failed). */
#define PS_CACHE_STATUS_STALE "price-service; fwd=stale; detail=origin-error"

typedef struct ps_cache_mem_entry ps_cache_mem_entry_t;
typedef struct ps_cache_stale_entry ps_cache_stale_entry_t;
typedef struct ps_cache_refresh ps_cache_refresh_t;
typedef struct ps_cache_flight ps_cache_flight_t;
typedef struct ps_cache_batch ps_cache_batch_t;
typedef struct ps_cache_ready ps_cache_ready_t;

/* A value shared by the memory tier and the answers queued from it, so that a hit needs no
 * copy even when the entry is replaced before the answer goes out. */
typedef struct ps_cache_body {
    unsigned refs;
    size_t len;
    char data[]; /* NUL-terminated */
} ps_cache_body_t;

struct ps_cache {
    ps_cache_backend_t be;
    ps_cache_settings_t set;
    ps_cache_mem_entry_t *memory;
    ps_cache_flight_t *flights;
    ps_cache_refresh_t *refreshes;
    ps_cache_stale_entry_t *stale;
    ps_cache_stats_t stats;
    cm_metric_t *m_hit, *m_miss, *m_error, *m_bypass, *m_memory_hit, *m_collapsed;
    cm_metric_t *m_refresh_ok, *m_refresh_error, *m_refresh_lost;
    cm_metric_t *m_lock_won, *m_lock_lost, *m_lock_error, *m_stale;
    uv_idle_t idle; /* runs while answers wait in ready[]; the cache is freed in its close cb */
    ps_cache_ready_t *ready;
    size_t nready, cap;
    void (*on_closed)(void *ud);
    void *closed_ud;
};

static inline void ps_cache_count(cm_metric_t *m, uint64_t *stat)
{
    if (stat)
        (*stat)++;
    if (m)
        cm_counter_inc(m);
}

static inline uint64_t ps_cache_now(const ps_cache_t *c)
{
    return c->be.now_ms(c->be.ctx);
}

/* ---- memory tier (cache_memory.c) ---------------------------------------------------- */

/* A copy of a Redis entry, valid until that entry's own expiry. */
struct ps_cache_mem_entry {
    UT_hash_handle hh;
    ps_cache_body_t *body; /* NULL for a negative entry */
    uint64_t expires_ms;
    int refresh_checked; /* a hit in the refresh window already asked: the others need not */
    char market[PS_MARKET_MAX + 1];
};

/* The live copy of `market` at `now`, or NULL (an expired copy is dropped on the way). */
ps_cache_mem_entry_t *ps_cache_mem_find(ps_cache_t *c, const char *market, uint64_t now);
/* Keeps a copy until `expires_ms`. Best effort: a full tier or no memory just skips it. */
void ps_cache_mem_store(ps_cache_t *c, const char *market, const char *body, size_t len, int found,
                        uint64_t expires_ms);
void ps_cache_mem_clear(ps_cache_t *c);

/* ---- answers on the next loop turn (cache_ready.c) --------------------------------- */

/* A copy of `len` bytes with one reference, or NULL when memory is short. */
ps_cache_body_t *ps_cache_body_new(const char *data, size_t len);
void ps_cache_body_unref(ps_cache_body_t *b);
/* Queues `res` for `cb` on the next loop turn. With `shared` (borrowed) the answer takes a
 * reference on it and res->body is not read; else res->body is copied. Returns 0 or
 * UV_ENOMEM (nothing queued). */
int ps_cache_ready_answer(ps_cache_t *c, ps_cache_cb cb, void *ud, const ps_cache_result_t *res,
                          ps_cache_body_t *shared);
/* Queues the end of a batch whose items are all answered. Returns 0 or UV_ENOMEM. */
int ps_cache_ready_batch(ps_cache_t *c, ps_cache_batch_t *b);
int ps_cache_ready_init(ps_cache_t *c, uv_loop_t *loop);
/* Closes the handle; its close callback answers what is still queued, then frees `c` and
 * calls c->on_closed. */
void ps_cache_ready_close(ps_cache_t *c);

/* ---- stale-if-error (cache_stale.c) -------------------------------------------------- */

/* Remembers a price that expires at `expires_ms` (never a negative entry). */
void ps_cache_stale_record(ps_cache_t *c, const char *market, const char *body, size_t len,
                           uint64_t expires_ms);
/* Fills `r` with the kept value of `market` when it is at most stale_if_error_ms past its
 * expiry and returns 1, else returns 0. The body is borrowed from the table. */
int ps_cache_stale_answer(ps_cache_t *c, const char *market, ps_cache_result_t *r);
size_t ps_cache_stale_count(const ps_cache_t *c);
void ps_cache_stale_clear(ps_cache_t *c);

/* ---- refresh-ahead (cache_refresh.c) ------------------------------------------------- */

/* How long before its expiry an entry is refreshed (and the lock held), ms; 0 = off. */
uint64_t ps_cache_refresh_window(const ps_cache_t *c);
/* A hit on the entry of `market` that expires at `expires_ms`: in the refresh window, and
 * unless this replica already tried for this entry, asks for the lock. Never delays the hit. */
void ps_cache_refresh_maybe(ps_cache_t *c, const char *market, uint64_t expires_ms, uint64_t now);
/* Attempts still waiting on Redis or the origin. */
size_t ps_cache_refresh_busy(const ps_cache_t *c);
void ps_cache_refresh_clear(ps_cache_t *c);

/* ---- single-flight (cache_flight.c) -------------------------------------------------- */

/* Someone waiting for a flight: a single lookup (cb) or one item of a batch. */
typedef struct ps_cache_waiter {
    struct ps_cache_waiter *next;
    ps_cache_cb cb;
    void *ud;
    ps_cache_batch_t *batch;
    int index;
} ps_cache_waiter_t;

/*
 * One origin fetch shared by every lookup of the market that misses meanwhile. After the
 * origin answered, the flight stays (done) until Redis acknowledges the SET: a GET sent before
 * the SET can still come back empty, and it is then answered from the flight instead of
 * starting a second fetch. Redis answers in order, so after the SET reply no such GET is left.
 */
struct ps_cache_flight {
    UT_hash_handle hh;
    ps_cache_t *cache;
    ps_cache_waiter_t *waiters;
    ps_cache_waiter_t **tail;
    int started_by_lookup; /* the first waiter reports "stored", the others "collapsed" */
    int redis_failed;      /* the GET failed: report redis-unavailable, do not SET */
    int done;
    ps_price_outcome_t outcome;
    char *body;
    size_t len;
    uint64_t set_sent_ms;
    uint64_t ttl_ms;
    char market[PS_MARKET_MAX + 1];
};

ps_cache_waiter_t *ps_cache_waiter_new(ps_cache_cb cb, void *ud, ps_cache_batch_t *b, int index);
/* The flight of `market` still waiting on the origin, or NULL. */
ps_cache_flight_t *ps_cache_flight_pending(ps_cache_t *c, const char *market);
/*
 * Joins the flight of `market` or starts one. Returns 0 when `w` will be answered later,
 * 1 when the flight is already done and `*now` holds its answer (w is freed), or a negative
 * code when the origin fetch failed at once (w is freed).
 */
int ps_cache_flight_join(ps_cache_t *c, const char *market, ps_cache_waiter_t *w, int redis_failed,
                         ps_cache_result_t *now);
/* The same from a callback: answers the waiter at once when the flight cannot. */
void ps_cache_flight_join_async(ps_cache_t *c, const char *market, ps_cache_waiter_t *w,
                                int redis_failed);
/* Drops every flight and its waiters without answering them. */
void ps_cache_flight_clear(ps_cache_t *c);

/* ---- batches (cache_batch.c) --------------------------------------------------------- */

/* Answers item `index` of `b`; the batch finishes when its last item is answered. */
void ps_cache_batch_item_done(ps_cache_batch_t *b, int index, ps_price_outcome_t outcome,
                              const char *body, size_t len);
/* Calls the batch's callback and frees the batch. */
void ps_cache_batch_finish(ps_cache_batch_t *b);

/* A price object is a few hundred bytes; a cached value longer than this is not one of ours. */
#define PS_CACHE_VALUE_MAX 4096

/* Whether a value read from Redis may be served: empty (the negative entry), or exactly one
 * JSON object in valid UTF-8, at most PS_CACHE_VALUE_MAX bytes, whose "market" is `market` and
 * whose "price" is a string. The key is shared with whatever else can write to that Redis:
 * anything else there (planted, truncated, another market's) is logged and taken as a miss, so
 * the origin's answer replaces it. */
int ps_cache_value_ok(const char *market, const char *val, size_t len);

#endif
