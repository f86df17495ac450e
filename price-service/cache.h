/*
 * cache.h: cache-aside for oracle prices, with single-flight and a memory tier.
 *
 * A lookup goes: memory tier (an in-process copy kept only until the Redis entry's own expiry,
 * so no answer is older than Redis would give) -> Redis GET (+PTTL in the same round trip) ->
 * on a miss, one origin fetch per market however many requests want it (single-flight; the
 * others are "collapsed") -> SET with PX = the TTL -> answer. Unknown markets are cached
 * negatively (an empty value) for the same TTL. When Redis is down or slow, lookups go
 * straight to the origin. Cache-Status values follow RFC 9211.
 *
 * Refresh-ahead: a hit on an entry in the last refresh_ahead_pct % of its TTL asks for a short
 * Redis lock (SET price:lock:v1:<market> <token> NX PX <window>); the one replica that gets it
 * reads the origin and replaces the entry (SET ... PX ttl) while every request keeps being
 * answered from the current entry, so a market steadily asked for costs about one origin read
 * per TTL across all replicas and no request waits for it. Replicas that lose the lock do
 * nothing: their copies expire with the entry they copied, and the next read finds the new one.
 *
 * Stale-if-error (stale_if_error_ms > 0): the last value seen per market is kept in process;
 * when the origin fails for a lookup it is answered for at most that long past its expiry,
 * with Cache-Status "price-service; fwd=stale; detail=origin-error" and an Age.
 *
 * Every answer comes through the callback, exactly once, and never from inside the call that
 * asked: one known at once (a memory-tier hit, a failure) waits for the next loop turn on an
 * idle handle the cache owns.
 *
 * The cache talks to Redis and the origin only through ps_cache_backend_t, so the state
 * machine is unit-tested with a scripted backend and run for real with backend.c.
 */
#ifndef PS_CACHE_H
#define PS_CACHE_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

struct cm_metrics;

typedef enum {
    PS_PRICE_FOUND = 0,
    PS_PRICE_NOT_FOUND,   /* the origin has no such market (maybe a cached negative) */
    PS_PRICE_UNAVAILABLE, /* origin failed or timed out, nothing cached */
} ps_price_outcome_t;

typedef struct ps_cache_result {
    ps_price_outcome_t outcome;
    const char *body;         /* FOUND: the JSON body; borrowed until the callback returns */
    size_t body_len;          /* bytes */
    const char *cache_status; /* RFC 9211 Cache-Status value; static */
    long age_s; /* seconds since the origin gave the value (an Age header); -1: no Age */
} ps_cache_result_t;

typedef void (*ps_cache_cb)(const ps_cache_result_t *res, void *ud);

/* Backend callbacks. Statuses are 0 or negative UV_E* codes. */
/* GET: val NULL with status 0 is a miss; pttl_ms is the entry's remaining TTL (-1 unknown). */
typedef void (*ps_kv_get_cb)(int status, const char *val, size_t len, int64_t pttl_ms, void *arg);
/* MGET: vals[i] NULL for a miss; arrays borrowed for the call. */
typedef void (*ps_kv_mget_cb)(int status, const char *const *vals, const size_t *lens, int n,
                              void *arg);
typedef void (*ps_kv_set_cb)(int status, void *arg);
/* Lock: acquired 1 when this instance took it, 0 when another holder has it. */
typedef void (*ps_kv_lock_cb)(int status, int acquired, void *arg);
/* Origin: 0 with the JSON body, UV_ENOENT for an unknown market, other negatives on failure. */
typedef void (*ps_origin_cb)(int status, const char *body, size_t len, void *arg);

/* Each operation returns 0 (its callback fires later, exactly once) or a negative code (it
 * failed at once and its callback never fires). */
typedef struct ps_cache_backend {
    int (*get)(void *ctx, const char *key, ps_kv_get_cb cb, void *arg);
    int (*mget)(void *ctx, const char *const *keys, int n, ps_kv_mget_cb cb, void *arg);
    int (*set)(void *ctx, const char *key, const char *val, size_t len, uint64_t ttl_ms,
               ps_kv_set_cb cb, void *arg);
    /* SET key <this instance's token> NX PX ttl_ms: never released, it expires by itself. */
    int (*lock)(void *ctx, const char *key, uint64_t ttl_ms, ps_kv_lock_cb cb, void *arg);
    int (*fetch)(void *ctx, const char *market, ps_origin_cb cb, void *arg);
    uint64_t (*now_ms)(void *ctx); /* a monotonic clock, ms */
    void *ctx;
} ps_cache_backend_t;

typedef struct ps_cache_settings {
    int enabled;               /* CACHE_ENABLED: 0 bypasses Redis and the memory tier */
    uint64_t ttl_ms;           /* CACHE_TTL_MS */
    int memory_enabled;        /* CACHE_MEMORY_ENABLED: keep copies until the Redis entry expires */
    size_t memory_max_entries; /* also bounds the refresh and stale-if-error tables */
    /* CACHE_REFRESH_AHEAD_PCT, 0..50: the share of the TTL before expiry in which a hit starts
     * a refresh; 0 turns refresh-ahead off. At most 50 so that the lock, held for that window,
     * is free again before the next entry's window opens. */
    unsigned refresh_ahead_pct;
    uint64_t stale_if_error_ms; /* CACHE_STALE_IF_ERROR_MS: 0 = off */
} ps_cache_settings_t;

typedef struct ps_cache ps_cache_t;

/* Longest Redis key: "price:lock:v1:" plus a market id. */
#define PS_CACHE_KEY_MAX 80

/* Creates a cache whose answers run on `loop`. `backend` is copied; `metrics` (may be NULL)
 * is borrowed and receives
 * price_cache_lookups_total{result}, price_cache_memory_hits_total, price_cache_hit_ratio,
 * price_cache_collapsed_total, price_cache_refreshes_total{result="ok|error|lock_lost"},
 * price_cache_refresh_lock_total{result="won|lost|error"}, price_cache_stale_total. Returns
 * NULL on allocation failure. */
ps_cache_t *ps_cache_new(uv_loop_t *loop, const ps_cache_backend_t *backend,
                         const ps_cache_settings_t *settings, struct cm_metrics *metrics);
/* Applies reloaded settings; turning caching off or changing the TTL drops the memory tier,
 * turning caching or stale-if-error off drops the kept stale values. */
void ps_cache_configure(ps_cache_t *c, const ps_cache_settings_t *settings);
/* Closes the cache; `done` (may be NULL) is called with `ud` once it is freed, on a later loop
 * turn, after the answers still queued went out. Backend callbacks must not be pending (close
 * the backend first: its pending operations then complete with errors and the cache answers
 * their waiters). NULL is a no-op. */
void ps_cache_close(ps_cache_t *c, void (*done)(void *ud), void *ud);

/*
 * Looks one market up. `market` must be a valid market id (NUL-terminated; copied).
 * Returns 0 when `cb` will be called exactly once, on a later loop turn at the earliest (a
 * memory-tier hit comes on the next one), or UV_ENOMEM when the lookup could not even be
 * queued: `cb` is then never called.
 */
int ps_cache_get(ps_cache_t *c, const char *market, ps_cache_cb cb, void *ud);

/* One market of a batch lookup. */
typedef struct ps_cache_batch_item {
    const char *market;         /* set by the caller: a valid id, borrowed until answered */
    ps_price_outcome_t outcome; /* FOUND, NOT_FOUND or UNAVAILABLE */
    char *body;                 /* FOUND: a copy, released by ps_cache_batch_release() */
    size_t body_len;
} ps_cache_batch_item_t;
typedef void (*ps_cache_batch_cb)(ps_cache_batch_item_t *items, int n, void *ud);

/*
 * Looks `n` markets up with one Redis round trip (MGET) for all that the memory tier does not
 * hold, then single-flight origin fetches for the misses. `items` (caller-owned, .market set)
 * is borrowed until answered. Stale values are never used here: a batch has no Cache-Status
 * to say so. Returns 0 when `cb` will fire exactly once, on a later loop turn at the earliest
 * (the callback then releases the bodies with ps_cache_batch_release()), or UV_ENOMEM: `cb`
 * never fires and the items hold no bodies.
 */
int ps_cache_get_many(ps_cache_t *c, ps_cache_batch_item_t *items, int n, ps_cache_batch_cb cb,
                      void *ud);
void ps_cache_batch_release(ps_cache_batch_item_t *items, int n);

/* Counters, for tests and the hit ratio. */
typedef struct ps_cache_stats {
    uint64_t hits, memory_hits, misses, errors, bypasses, collapsed, origin_fetches;
    uint64_t refreshes_ok, refresh_errors, refresh_lock_lost, locks_won, stale;
    size_t memory_entries, flights, refreshes_busy, stale_entries;
} ps_cache_stats_t;
void ps_cache_stats(const ps_cache_t *c, ps_cache_stats_t *out);

/* Writes the Redis key of a market ("price:v1:BTC-USD") into out (PS_CACHE_KEY_MAX bytes). */
void ps_cache_key(const char *market, char *out);
/* Writes the refresh lock's key ("price:lock:v1:BTC-USD") into out (PS_CACHE_KEY_MAX bytes). */
void ps_cache_lock_key(const char *market, char *out);

#endif
