/* The cache-aside state machine and single-flight, driven by a scripted backend: each Redis
 * or origin operation waits in a queue until the test completes it, in the order it chooses. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "cache.h"
#include "cm/alloc.h"
#include "cm/json.h"
#include "cm/metrics.h"

#define QMAX 256

typedef struct op {
    char key[128];
    char val[256];
    size_t len;
    uint64_t ttl;
    void *cb;
    void *arg;
    int n;
} op_t;

static struct fake {
    op_t gets[QMAX], sets[QMAX], fetches[QMAX], mgets[QMAX], locks[QMAX];
    int ngets, nsets, nfetches, nmgets, nlocks;
    int dgets, dsets, dfetches, dlocks; /* how many drain_ok() already answered */
    int down, fetch_down;
    uint64_t now;
} fk;

static int f_get(void *ctx, const char *key, ps_kv_get_cb cb, void *arg)
{
    (void)ctx;
    if (fk.down)
        return UV_ENOTCONN;
    op_t *o = &fk.gets[fk.ngets++];
    strcpy(o->key, key);
    o->cb = (void *)cb;
    o->arg = arg;
    return 0;
}

static int f_mget(void *ctx, const char *const *keys, int n, ps_kv_mget_cb cb, void *arg)
{
    (void)ctx;
    if (fk.down)
        return UV_ENOTCONN;
    op_t *o = &fk.mgets[fk.nmgets++];
    strcpy(o->key, keys[0]);
    o->n = n;
    o->cb = (void *)cb;
    o->arg = arg;
    return 0;
}

static int f_set(void *ctx, const char *key, const char *val, size_t len, uint64_t ttl,
                 ps_kv_set_cb cb, void *arg)
{
    (void)ctx;
    if (fk.down)
        return UV_ENOTCONN;
    op_t *o = &fk.sets[fk.nsets++];
    strcpy(o->key, key);
    memcpy(o->val, val, len);
    o->len = len;
    o->ttl = ttl;
    o->cb = (void *)cb;
    o->arg = arg;
    return 0;
}

static int f_lock(void *ctx, const char *key, uint64_t ttl, ps_kv_lock_cb cb, void *arg)
{
    (void)ctx;
    if (fk.down)
        return UV_ENOTCONN;
    op_t *o = &fk.locks[fk.nlocks++];
    strcpy(o->key, key);
    o->ttl = ttl;
    o->cb = (void *)cb;
    o->arg = arg;
    return 0;
}

static int f_fetch(void *ctx, const char *market, ps_origin_cb cb, void *arg)
{
    (void)ctx;
    if (fk.fetch_down)
        return UV_ENOTCONN;
    op_t *o = &fk.fetches[fk.nfetches++];
    strcpy(o->key, market);
    o->cb = (void *)cb;
    o->arg = arg;
    return 0;
}

static uint64_t f_now(void *ctx)
{
    (void)ctx;
    return fk.now;
}

static const ps_cache_backend_t backend = {f_get, f_mget, f_set, f_lock, f_fetch, f_now, NULL};

static void get_reply(int i, int status, const char *val, int64_t pttl)
{
    ((ps_kv_get_cb)fk.gets[i].cb)(status, val, val ? strlen(val) : 0, pttl, fk.gets[i].arg);
}

static void fetch_reply(int i, int status, const char *body)
{
    ((ps_origin_cb)fk.fetches[i].cb)(status, body, body ? strlen(body) : 0, fk.fetches[i].arg);
}

static void set_reply(int i, int status)
{
    ((ps_kv_set_cb)fk.sets[i].cb)(status, fk.sets[i].arg);
}

static void lock_reply(int i, int status, int acquired)
{
    ((ps_kv_lock_cb)fk.locks[i].cb)(status, acquired, fk.locks[i].arg);
}

static uv_loop_t loop;
static int in_call; /* inside ps_cache_get or ps_cache_get_many: no callback may fire */

/* Results collected from callbacks. */
static struct got {
    int n;
    ps_price_outcome_t outcome[QMAX];
    char status[QMAX][80];
    char body[QMAX][256];
    long age[QMAX];
} got;

static void on_result(const ps_cache_result_t *r, void *ud)
{
    (void)ud;
    assert_false(in_call);
    int i = got.n++;
    got.outcome[i] = r->outcome;
    strcpy(got.status[i], r->cache_status);
    got.age[i] = r->age_s;
    got.body[i][0] = '\0';
    if (r->body) {
        memcpy(got.body[i], r->body, r->body_len);
        got.body[i][r->body_len] = '\0';
    }
}

/* One loop turn: the answers the cache queued go out. */
static void turn(void)
{
    uv_run(&loop, UV_RUN_NOWAIT);
}

/* ps_cache_get, checking that it returns 0 or a negative code and answers nothing itself. */
static int get(ps_cache_t *c, const char *market)
{
    int before = got.n;
    in_call = 1;
    int rc = ps_cache_get(c, market, on_result, NULL);
    in_call = 0;
    assert_true(rc == 0 || rc == UV_ENOMEM);
    assert_int_equal(got.n, before);
    return rc;
}

/* A lookup and the loop turn after it: how many answers that turn gave (1 for what the cache
 * knew at once), or get()'s negative code. */
static int lookup(ps_cache_t *c, const char *market)
{
    int before = got.n;
    int rc = get(c, market);
    if (rc < 0)
        return rc;
    turn();
    return got.n - before;
}

static void cache_free(ps_cache_t *c)
{
    ps_cache_close(c, NULL, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
}

static ps_cache_settings_t settings(int memory)
{
    return (ps_cache_settings_t){1, 1000, memory, 1000, 0, 0};
}

static long live_before;

static int setup(void **state)
{
    (void)state;
    memset(&fk, 0, sizeof fk);
    memset(&got, 0, sizeof got);
    fk.now = 1000000;
    live_before = cm_alloc_live();
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    cm_alloc_fail_after(0);
    assert_int_equal(uv_loop_alive(&loop), 0);
    assert_int_equal(cm_alloc_live(), live_before);
    return 0;
}

static const char BODY[] = "{\"market\":\"BTC-USD\",\"price\":\"64123.45\"}";
/* A cached value is served only for its own market (ps_cache_value_ok). */
static const char BODY_SOL[] = "{\"market\":\"SOL-USD\",\"price\":\"150.25\"}";
static const char BODY_ETH[] = "{\"market\":\"ETH-USD\",\"price\":\"3200.5\"}";

static void miss_then_hit(void **state)
{
    (void)state;
    ps_cache_settings_t s = settings(0);
    ps_cache_t *c = ps_cache_new(&loop, &backend, &s, NULL);

    assert_int_equal(lookup(c, "BTC-USD"), 0);
    assert_int_equal(fk.ngets, 1);
    assert_string_equal(fk.gets[0].key, "price:v1:BTC-USD");
    get_reply(0, 0, NULL, -2);
    assert_int_equal(fk.nfetches, 1);
    fetch_reply(0, 0, BODY);
    assert_int_equal(got.n, 1);
    assert_int_equal(got.outcome[0], PS_PRICE_FOUND);
    assert_string_equal(got.status[0], "price-service; fwd=miss; stored");
    assert_string_equal(got.body[0], BODY);
    assert_int_equal(fk.nsets, 1);
    assert_int_equal(fk.sets[0].ttl, 1000);
    assert_memory_equal(fk.sets[0].val, BODY, strlen(BODY));
    set_reply(0, 0);

    assert_int_equal(lookup(c, "BTC-USD"), 0);
    get_reply(1, 0, BODY, 900);
    assert_int_equal(got.n, 2);
    assert_string_equal(got.status[1], "price-service; hit");
    assert_string_equal(got.body[1], BODY);
    assert_int_equal(fk.nfetches, 1);

    ps_cache_stats_t st;
    ps_cache_stats(c, &st);
    assert_int_equal(st.hits, 1);
    assert_int_equal(st.misses, 1);
    assert_int_equal(st.flights, 0);
    cache_free(c);
}

static void fifty_concurrent_misses_one_fetch(void **state)
{
    (void)state;
    ps_cache_settings_t s = settings(0);
    ps_cache_t *c = ps_cache_new(&loop, &backend, &s, NULL);
    for (int i = 0; i < 50; i++)
        assert_int_equal(lookup(c, "ETH-USD"), 0);
    assert_int_equal(fk.ngets, 50);
    for (int i = 0; i < 50; i++)
        get_reply(i, 0, NULL, -2);
    assert_int_equal(fk.nfetches, 1);
    assert_int_equal(got.n, 0);
    fetch_reply(0, 0, BODY);
    assert_int_equal(got.n, 50);
    assert_string_equal(got.status[0], "price-service; fwd=miss; stored");
    for (int i = 1; i < 50; i++) {
        assert_string_equal(got.status[i], "price-service; fwd=miss; collapsed");
        assert_string_equal(got.body[i], BODY);
    }
    assert_int_equal(fk.nsets, 1);
    set_reply(0, 0);
    cache_free(c);
}

/* A GET sent before the SET may still say "miss": the finished flight answers it. */
static void late_miss_joins_finished_flight(void **state)
{
    (void)state;
    ps_cache_settings_t s = settings(0);
    ps_cache_t *c = ps_cache_new(&loop, &backend, &s, NULL);
    lookup(c, "SOL-USD");
    lookup(c, "SOL-USD"); /* both GETs out before any reply */
    assert_int_equal(fk.ngets, 2);
    get_reply(0, 0, NULL, -2);
    /* A third request while the fetch runs joins it without asking Redis. */
    lookup(c, "SOL-USD");
    assert_int_equal(fk.ngets, 2);
    fetch_reply(0, 0, BODY_SOL);
    assert_int_equal(got.n, 2);
    assert_int_equal(fk.nsets, 1);
    /* The second GET comes back "miss" after the origin answered, before the SET reply. */
    get_reply(1, 0, NULL, -2);
    assert_int_equal(got.n, 3);
    assert_string_equal(got.status[2], "price-service; fwd=miss; collapsed");
    assert_string_equal(got.body[2], BODY_SOL);
    /* A new request asks Redis (behind the SET) rather than the finished flight. */
    assert_int_equal(lookup(c, "SOL-USD"), 0);
    assert_int_equal(fk.ngets, 3);
    assert_int_equal(fk.nfetches, 1);
    set_reply(0, 0);
    get_reply(2, 0, BODY_SOL, 1000);
    assert_string_equal(got.status[3], "price-service; hit");
    ps_cache_stats_t st;
    ps_cache_stats(c, &st);
    assert_int_equal(st.flights, 0);
    cache_free(c);
}

static void negative_caching(void **state)
{
    (void)state;
    ps_cache_settings_t s = settings(0);
    ps_cache_t *c = ps_cache_new(&loop, &backend, &s, NULL);
    lookup(c, "NOPE");
    get_reply(0, 0, NULL, -2);
    fetch_reply(0, UV_ENOENT, NULL);
    assert_int_equal(got.outcome[0], PS_PRICE_NOT_FOUND);
    assert_int_equal(fk.nsets, 1);
    assert_int_equal(fk.sets[0].len, 0);
    set_reply(0, 0);
    lookup(c, "NOPE");
    get_reply(1, 0, "", 500);
    assert_int_equal(got.outcome[1], PS_PRICE_NOT_FOUND);
    assert_string_equal(got.status[1], "price-service; hit");
    assert_int_equal(fk.nfetches, 1);
    cache_free(c);
}

static void memory_tier_until_redis_expiry(void **state)
{
    (void)state;
    ps_cache_settings_t s = settings(1);
    ps_cache_t *c = ps_cache_new(&loop, &backend, &s, NULL);
    lookup(c, "BTC-USD");
    get_reply(0, 0, BODY, 300); /* the Redis entry lives 300 ms more */
    fk.now += 299;
    assert_int_equal(lookup(c, "BTC-USD"), 1);
    assert_string_equal(got.status[got.n - 1], "price-service; hit; detail=memory");
    assert_memory_equal(got.body[got.n - 1], BODY, strlen(BODY));
    fk.now += 1; /* the Redis entry has expired: so has the copy */
    assert_int_equal(lookup(c, "BTC-USD"), 0);
    assert_int_equal(fk.ngets, 2);
    get_reply(1, 0, NULL, -2);
    fetch_reply(0, 0, BODY);
    set_reply(0, 0); /* stored for TTL from when the SET was sent */
    fk.now += 999;
    assert_int_equal(lookup(c, "BTC-USD"), 1);
    fk.now += 1;
    assert_int_equal(lookup(c, "BTC-USD"), 0);
    get_reply(2, UV_ETIMEDOUT, NULL, -1);
    fetch_reply(1, 0, BODY);
    cache_free(c);
}

/* A full memory tier evicts its oldest entries in O(1) rather than scanning or refusing. */
static void memory_tier_bounded(void **state)
{
    (void)state;
    ps_cache_settings_t s = {1, 1000, 1, 3, 0, 0};
    ps_cache_t *c = ps_cache_new(&loop, &backend, &s, NULL);
    const char *markets[] = {"A", "B", "C", "D"};
    for (int i = 0; i < 4; i++) {
        lookup(c, markets[i]);
        get_reply(i, 0, "", 1000); /* negative entries, as a flood of unknown ids makes */
        fk.now += 1;
    }
    ps_cache_stats_t st;
    ps_cache_stats(c, &st);
    assert_int_equal(st.memory_entries, 3);
    assert_int_equal(lookup(c, "A"), 0); /* evicted: asks Redis */
    assert_int_equal(lookup(c, "D"), 1); /* newest kept */
    get_reply(4, 0, NULL, -2);
    fetch_reply(0, UV_ENOENT, NULL);
    set_reply(0, 0);
    cache_free(c);
}

static void redis_down_goes_to_origin(void **state)
{
    (void)state;
    ps_cache_settings_t s = settings(1);
    ps_cache_t *c = ps_cache_new(&loop, &backend, &s, NULL);
    fk.down = 1;
    assert_int_equal(lookup(c, "BTC-USD"), 0);
    assert_int_equal(fk.nfetches, 1);
    fetch_reply(0, 0, BODY);
    assert_int_equal(got.outcome[0], PS_PRICE_FOUND);
    assert_string_equal(got.status[0], "price-service; fwd=miss; detail=redis-unavailable");
    assert_int_equal(fk.nsets, 0);

    /* Redis answers, but with an error (a timeout): the same. */
    fk.down = 0;
    lookup(c, "BTC-USD");
    get_reply(0, UV_ETIMEDOUT, NULL, -1);
    fetch_reply(1, 0, BODY);
    assert_string_equal(got.status[1], "price-service; fwd=miss; detail=redis-unavailable");
    assert_int_equal(fk.nsets, 0);
    ps_cache_stats_t st;
    ps_cache_stats(c, &st);
    assert_int_equal(st.errors, 2);
    cache_free(c);
}

static void origin_failure(void **state)
{
    (void)state;
    ps_cache_settings_t s = settings(0);
    ps_cache_t *c = ps_cache_new(&loop, &backend, &s, NULL);
    lookup(c, "BTC-USD");
    lookup(c, "BTC-USD");
    get_reply(0, 0, NULL, -2);
    fetch_reply(0, UV_ETIMEDOUT, NULL);
    assert_int_equal(got.n, 1);
    assert_int_equal(fk.nsets, 0);
    /* A failed fetch is not shared with later misses: the next one tries again. */
    get_reply(1, 0, NULL, -2);
    assert_int_equal(fk.nfetches, 2);
    fetch_reply(1, UV_ETIMEDOUT, NULL);
    assert_int_equal(got.n, 2);
    assert_int_equal(got.outcome[0], PS_PRICE_UNAVAILABLE);
    assert_int_equal(got.outcome[1], PS_PRICE_UNAVAILABLE);
    assert_int_equal(fk.nsets, 0);
    /* Nothing is remembered: the next request tries the origin again. */
    fk.fetch_down = 1;
    fk.down = 1;
    assert_int_equal(lookup(c, "BTC-USD"), 1);
    assert_int_equal(got.outcome[got.n - 1], PS_PRICE_UNAVAILABLE);
    cache_free(c);
}

static void bypass_when_disabled(void **state)
{
    (void)state;
    ps_cache_settings_t s = settings(1);
    s.enabled = 0;
    ps_cache_t *c = ps_cache_new(&loop, &backend, &s, NULL);
    lookup(c, "BTC-USD");
    lookup(c, "BTC-USD");
    assert_int_equal(fk.ngets, 0);
    assert_int_equal(fk.nfetches, 2);
    fetch_reply(0, 0, BODY);
    fetch_reply(1, UV_ENOENT, NULL);
    assert_string_equal(got.status[0], "price-service; fwd=bypass");
    assert_int_equal(got.outcome[1], PS_PRICE_NOT_FOUND);
    assert_int_equal(fk.nsets, 0);

    /* Reload turns caching on. */
    s.enabled = 1;
    ps_cache_configure(c, &s);
    lookup(c, "BTC-USD");
    assert_int_equal(fk.ngets, 1);
    get_reply(0, 0, BODY, 10);
    cache_free(c);
}

static struct {
    int calls;
    ps_cache_batch_item_t *items;
} batch_got;

static void on_batch(ps_cache_batch_item_t *items, int n, void *ud)
{
    (void)n;
    (void)ud;
    assert_false(in_call);
    batch_got.calls++;
    batch_got.items = items;
}

/* ps_cache_get_many and the loop turn after it, like lookup(): 0 while the batch waits on
 * the backend, 1 when that turn finished it, or a negative code. */
static int get_many(ps_cache_t *c, ps_cache_batch_item_t *items, int n, ps_cache_batch_cb cb,
                    void *ud)
{
    int before = batch_got.calls;
    in_call = 1;
    int rc = ps_cache_get_many(c, items, n, cb, ud);
    in_call = 0;
    if (rc < 0)
        return rc;
    assert_int_equal(rc, 0);
    assert_int_equal(batch_got.calls, before);
    turn();
    return batch_got.calls - before;
}

static void batch_lookup(void **state)
{
    (void)state;
    ps_cache_settings_t s = settings(1);
    ps_cache_t *c = ps_cache_new(&loop, &backend, &s, NULL);
    /* Put BTC-USD in the memory tier. */
    lookup(c, "BTC-USD");
    get_reply(0, 0, BODY, 1000);

    memset(&batch_got, 0, sizeof batch_got);
    ps_cache_batch_item_t items[3] = {
        {.market = "BTC-USD"}, {.market = "ETH-USD"}, {.market = "NOPE"}};
    assert_int_equal(get_many(c, items, 3, on_batch, NULL), 0);
    assert_int_equal(fk.nmgets, 1);
    assert_int_equal(fk.mgets[0].n, 2);
    assert_string_equal(fk.mgets[0].key, "price:v1:ETH-USD");
    const char *vals[2] = {BODY_ETH, NULL};
    size_t lens[2] = {strlen(vals[0]), 0};
    ((ps_kv_mget_cb)fk.mgets[0].cb)(0, vals, lens, 2, fk.mgets[0].arg);
    assert_int_equal(batch_got.calls, 0);
    assert_int_equal(fk.nfetches, 1);
    assert_string_equal(fk.fetches[0].key, "NOPE");
    fetch_reply(0, UV_ENOENT, NULL);
    assert_int_equal(batch_got.calls, 1);
    assert_int_equal(items[0].outcome, PS_PRICE_FOUND);
    assert_memory_equal(items[0].body, BODY, strlen(BODY));
    assert_int_equal(items[1].outcome, PS_PRICE_FOUND);
    assert_int_equal(items[2].outcome, PS_PRICE_NOT_FOUND);
    ps_cache_batch_release(items, 3);
    set_reply(0, 0);

    /* Everything in memory: still through the callback, on the next loop turn. */
    ps_cache_batch_item_t again[2] = {{.market = "BTC-USD"}, {.market = "NOPE"}};
    assert_int_equal(get_many(c, again, 2, on_batch, NULL), 1);
    assert_int_equal(again[1].outcome, PS_PRICE_NOT_FOUND);
    assert_int_equal(batch_got.calls, 2);
    ps_cache_batch_release(again, 2);
    cache_free(c);
}

static void metrics_and_ratio(void **state)
{
    (void)state;
    cm_metrics_t *m = cm_metrics_new();
    ps_cache_settings_t s = settings(1);
    ps_cache_t *c = ps_cache_new(&loop, &backend, &s, m);
    lookup(c, "BTC-USD");
    get_reply(0, 0, NULL, -2);
    fetch_reply(0, 0, BODY);
    set_reply(0, 0);
    for (int i = 0; i < 3; i++)
        lookup(c, "BTC-USD");
    cm_buf_t out = CM_BUF_INIT;
    assert_int_equal(cm_metrics_render(m, &out), 0);
    assert_non_null(strstr(out.data, "price_cache_lookups_total{result=\"hit\"} 3"));
    assert_non_null(strstr(out.data, "price_cache_lookups_total{result=\"miss\"} 1"));
    assert_non_null(strstr(out.data, "price_cache_hit_ratio 0.75"));
    cm_buf_free(&out);
    cache_free(c);
    cm_metrics_free(m);
}

/* Every allocation failing in turn: no crash, no leak, each callback at most once. */
static void allocation_failures(void **state)
{
    (void)state;
    for (long fail = 1; fail < 40; fail++) {
        memset(&fk, 0, sizeof fk);
        memset(&got, 0, sizeof got);
        ps_cache_settings_t s = settings(1);
        ps_cache_t *c = ps_cache_new(&loop, &backend, &s, NULL);
        if (!c)
            continue;
        cm_alloc_fail_after(fail);
        int refused = 0;
        for (int i = 0; i < 3; i++)
            refused += get(c, "BTC-USD") < 0;
        turn();
        for (int i = 0; i < fk.ngets; i++)
            get_reply(i, 0, NULL, -2);
        for (int i = 0; i < fk.nfetches; i++)
            fetch_reply(i, 0, BODY);
        for (int i = 0; i < fk.nsets; i++)
            set_reply(i, 0);
        assert_int_equal(got.n + refused, 3);
        cm_alloc_fail_after(0);
        cache_free(c);
    }
}

static const char BODY2[] = "{\"market\":\"BTC-USD\",\"price\":\"64200.00\"}";

/* Refresh-ahead and stale-if-error settings on top of the usual ones. */
static ps_cache_settings_t settings_ra(int memory, unsigned pct, uint64_t stale_ms)
{
    ps_cache_settings_t s = settings(memory);
    s.refresh_ahead_pct = pct;
    s.stale_if_error_ms = stale_ms;
    return s;
}

/* In the last 20 % of the TTL one hit asks for the lock, once; the winner reads the origin and
 * replaces the entry while every request is still answered at once from the current one. */
static void refresh_ahead_in_window_once(void **state)
{
    (void)state;
    ps_cache_settings_t s = settings_ra(1, 20, 0);
    ps_cache_t *c = ps_cache_new(&loop, &backend, &s, NULL);
    lookup(c, "BTC-USD");
    get_reply(0, 0, BODY, 1000); /* expires at t0 + 1000 */
    assert_int_equal(fk.nlocks, 0);
    fk.now += 799; /* 201 ms left: not yet */
    assert_int_equal(lookup(c, "BTC-USD"), 1);
    assert_int_equal(fk.nlocks, 0);
    fk.now += 1; /* 200 ms left: the window */
    for (int i = 0; i < 20; i++) {
        assert_int_equal(lookup(c, "BTC-USD"), 1);
        assert_string_equal(got.status[got.n - 1], "price-service; hit; detail=memory");
        assert_memory_equal(got.body[got.n - 1], BODY, strlen(BODY));
        assert_int_equal(got.age[got.n - 1], -1);
    }
    assert_int_equal(fk.nlocks, 1);
    assert_string_equal(fk.locks[0].key, "price:lock:v1:BTC-USD");
    assert_int_equal(fk.locks[0].ttl, 200);
    assert_int_equal(fk.nfetches, 0);
    lock_reply(0, 0, 1);
    assert_int_equal(fk.nfetches, 1);
    fk.now += 10;
    assert_int_equal(lookup(c, "BTC-USD"), 1); /* no wait */
    fetch_reply(0, 0, BODY2);
    assert_int_equal(fk.nsets, 1);
    assert_string_equal(fk.sets[0].key, "price:v1:BTC-USD");
    assert_int_equal(fk.sets[0].ttl, 1000);
    assert_memory_equal(fk.sets[0].val, BODY2, strlen(BODY2));
    /* Until Redis has it, the current entry answers. */
    assert_int_equal(lookup(c, "BTC-USD"), 1);
    assert_memory_equal(got.body[got.n - 1], BODY, strlen(BODY));
    set_reply(0, 0);
    assert_int_equal(lookup(c, "BTC-USD"), 1);
    assert_memory_equal(got.body[got.n - 1], BODY2, strlen(BODY2));
    assert_int_equal(fk.ngets, 1);
    /* Every lookup answered once, through the callback; only the first waited (for Redis). */
    assert_int_equal(got.n, 25);

    /* The new entry lives 1000 ms from its SET (t0 + 810): its own window opens 800 ms later. */
    fk.now += 799;
    assert_int_equal(lookup(c, "BTC-USD"), 1);
    assert_int_equal(fk.nlocks, 1);
    fk.now += 1;
    assert_int_equal(lookup(c, "BTC-USD"), 1);
    assert_int_equal(fk.nlocks, 2);
    lock_reply(1, 0, 0);
    ps_cache_stats_t st;
    ps_cache_stats(c, &st);
    assert_int_equal(st.refreshes_ok, 1);
    assert_int_equal(st.locks_won, 1);
    assert_int_equal(st.refresh_lock_lost, 1);
    assert_int_equal(st.refreshes_busy, 0);
    assert_int_equal(st.misses, 0);
    cache_free(c);
}

/* A replica that loses the lock does nothing: no origin read, no SET; its copy expires with
 * the entry it copied and the next read finds the winner's entry in Redis. */
static void refresh_lock_lost_does_nothing(void **state)
{
    (void)state;
    ps_cache_settings_t s = settings_ra(1, 20, 0);
    ps_cache_t *c = ps_cache_new(&loop, &backend, &s, NULL);
    lookup(c, "BTC-USD");
    get_reply(0, 0, BODY, 150); /* already in the window: the Redis hit asks */
    assert_int_equal(got.n, 1);
    assert_string_equal(got.status[0], "price-service; hit");
    assert_int_equal(fk.nlocks, 1);
    lock_reply(0, 0, 0);
    for (int i = 0; i < 10; i++) {
        fk.now += 14;
        assert_int_equal(lookup(c, "BTC-USD"), 1);
    }
    assert_int_equal(fk.nlocks, 1);
    assert_int_equal(fk.nfetches, 0);
    assert_int_equal(fk.nsets, 0);
    fk.now += 10; /* the entry's expiry: so is the copy's */
    assert_int_equal(lookup(c, "BTC-USD"), 0);
    assert_int_equal(fk.ngets, 2);
    get_reply(1, 0, BODY2, 860); /* the winner's entry */
    assert_string_equal(got.status[got.n - 1], "price-service; hit");
    assert_string_equal(got.body[got.n - 1], BODY2);
    assert_int_equal(fk.nfetches, 0);
    ps_cache_stats_t st;
    ps_cache_stats(c, &st);
    assert_int_equal(st.refresh_lock_lost, 1);
    assert_int_equal(st.origin_fetches, 0);
    cache_free(c);
}

/* Memory tier off: every hit reads Redis, and still only the first one in the window asks
 * for the lock. A Redis error on the lock is only counted. */
static void refresh_without_memory_tier(void **state)
{
    (void)state;
    cm_metrics_t *m = cm_metrics_new();
    ps_cache_settings_t s = settings_ra(0, 20, 0);
    ps_cache_t *c = ps_cache_new(&loop, &backend, &s, m);
    for (int i = 0; i < 5; i++) {
        assert_int_equal(lookup(c, "ETH-USD"), 0);
        get_reply(i, 0, BODY_ETH, 190 - i);
    }
    assert_int_equal(got.n, 5);
    assert_int_equal(fk.nlocks, 1);
    lock_reply(0, UV_ETIMEDOUT, 0);
    assert_int_equal(fk.nfetches, 0);
    lookup(c, "ETH-USD");
    get_reply(5, 0, BODY_ETH, 180);
    assert_int_equal(fk.nlocks, 1); /* not again before the lock would have expired */

    /* Redis refusing the lock at once is the same. */
    fk.now += 2000;
    lookup(c, "ETH-USD");
    fk.down = 1;
    get_reply(6, 0, BODY_ETH, 100);
    fk.down = 0;
    assert_int_equal(fk.nlocks, 1);
    cm_buf_t out = CM_BUF_INIT;
    assert_int_equal(cm_metrics_render(m, &out), 0);
    assert_non_null(strstr(out.data, "price_cache_refreshes_total{result=\"error\"} 2"));
    assert_non_null(strstr(out.data, "price_cache_refresh_lock_total{result=\"error\"} 2"));
    assert_non_null(strstr(out.data, "price_cache_refreshes_total{result=\"ok\"} 0"));
    assert_non_null(strstr(out.data, "price_cache_stale_total 0"));
    cm_buf_free(&out);
    cache_free(c);
    cm_metrics_free(m);
}

/* A refresh whose origin read fails leaves the entry to its own expiry: never served past it. */
static void failed_refresh_never_serves_past_expiry(void **state)
{
    (void)state;
    ps_cache_settings_t s = settings_ra(1, 20, 0);
    ps_cache_t *c = ps_cache_new(&loop, &backend, &s, NULL);
    lookup(c, "BTC-USD");
    get_reply(0, 0, BODY, 100);
    lock_reply(0, 0, 1);
    fetch_reply(0, UV_ETIMEDOUT, NULL);
    assert_int_equal(fk.nsets, 0);
    fk.now += 99;
    assert_int_equal(lookup(c, "BTC-USD"), 1);
    fk.now += 1;
    assert_int_equal(lookup(c, "BTC-USD"), 0); /* asks Redis */
    get_reply(1, 0, NULL, -2);
    assert_int_equal(fk.nfetches, 2); /* a cold miss: single-flight as before */
    fetch_reply(1, 0, BODY2);
    assert_string_equal(got.status[got.n - 1], "price-service; fwd=miss; stored");
    set_reply(0, 0);
    ps_cache_stats_t st;
    ps_cache_stats(c, &st);
    assert_int_equal(st.refresh_errors, 1);
    assert_int_equal(st.refreshes_ok, 0);
    cache_free(c);
}

/* A SET that Redis refuses is an error too, and the memory tier keeps the old copy only until
 * its own expiry. A refresh that finds the market gone stores the negative entry. */
static void refresh_set_failure_and_negative(void **state)
{
    (void)state;
    ps_cache_settings_t s = settings_ra(1, 20, 0);
    ps_cache_t *c = ps_cache_new(&loop, &backend, &s, NULL);
    lookup(c, "BTC-USD");
    get_reply(0, 0, BODY, 100);
    lock_reply(0, 0, 1);
    fetch_reply(0, 0, BODY2);
    set_reply(0, UV_ETIMEDOUT);
    assert_int_equal(lookup(c, "BTC-USD"), 1);
    assert_memory_equal(got.body[got.n - 1], BODY, strlen(BODY));
    /* Not again before the lock that was taken has expired (one window, 200 ms). */
    fk.now += 150;
    lookup(c, "BTC-USD");
    get_reply(1, 0, BODY, 100);
    assert_int_equal(fk.nlocks, 1);
    fk.now += 50; /* a memory hit now, past next_try */
    assert_int_equal(lookup(c, "BTC-USD"), 1);
    assert_int_equal(fk.nlocks, 2);
    lock_reply(1, 0, 1);
    fetch_reply(1, UV_ENOENT, NULL);
    assert_int_equal(fk.sets[1].len, 0);
    set_reply(1, 0);
    assert_int_equal(lookup(c, "BTC-USD"), 1);
    assert_int_equal(got.outcome[got.n - 1], PS_PRICE_NOT_FOUND);
    cache_free(c);
}

/* Stale-if-error: the last value is answered for at most stale_if_error_ms past its expiry,
 * with Age (seconds since the origin gave it), then 503. */
static void stale_if_error_bound_and_age(void **state)
{
    (void)state;
    cm_metrics_t *m = cm_metrics_new();
    ps_cache_settings_t s = settings_ra(1, 0, 3000);
    ps_cache_t *c = ps_cache_new(&loop, &backend, &s, m);
    uint64_t t0 = fk.now;
    lookup(c, "BTC-USD");
    get_reply(0, 0, NULL, -2);
    fetch_reply(0, 0, BODY);
    set_reply(0, 0); /* fetched at t0, expires at t0 + 1000 */
    assert_int_equal(got.age[0], -1);

    fk.now = t0 + 1500;
    lookup(c, "BTC-USD");
    lookup(c, "BTC-USD");
    get_reply(1, 0, NULL, -2);
    get_reply(2, 0, NULL, -2);
    fetch_reply(1, UV_ETIMEDOUT, NULL);
    assert_int_equal(got.n, 3);
    for (int i = 1; i < 3; i++) {
        assert_int_equal(got.outcome[i], PS_PRICE_FOUND);
        assert_string_equal(got.status[i], "price-service; fwd=stale; detail=origin-error");
        assert_string_equal(got.body[i], BODY);
        assert_int_equal(got.age[i], 1);
    }
    assert_int_equal(fk.nsets, 1); /* a stale value is never stored again */

    /* The origin refusing at once, Redis down too: the same, just before the bound. */
    fk.now = t0 + 3999;
    fk.fetch_down = 1;
    fk.down = 1;
    assert_int_equal(lookup(c, "BTC-USD"), 1);
    assert_int_equal(got.outcome[got.n - 1], PS_PRICE_FOUND);
    assert_string_equal(got.status[got.n - 1], "price-service; fwd=stale; detail=origin-error");
    assert_int_equal(got.age[got.n - 1], 3);
    fk.now = t0 + 4000; /* 3000 ms past the expiry: over */
    assert_int_equal(lookup(c, "BTC-USD"), 1);
    assert_int_equal(got.outcome[got.n - 1], PS_PRICE_UNAVAILABLE);
    assert_int_equal(got.age[got.n - 1], -1);

    /* A batch has no Cache-Status to say "stale": it never gets one. */
    fk.now = t0 + 2000;
    ps_cache_batch_item_t items[1] = {{.market = "BTC-USD"}};
    assert_int_equal(get_many(c, items, 1, on_batch, NULL), 1);
    assert_int_equal(items[0].outcome, PS_PRICE_UNAVAILABLE);
    ps_cache_batch_release(items, 1);

    cm_buf_t out = CM_BUF_INIT;
    assert_int_equal(cm_metrics_render(m, &out), 0);
    assert_non_null(strstr(out.data, "price_cache_stale_total 3"));
    cm_buf_free(&out);
    ps_cache_stats_t st;
    ps_cache_stats(c, &st);
    assert_int_equal(st.stale, 3);
    assert_int_equal(st.stale_entries, 1);
    cache_free(c);
    cm_metrics_free(m);
}

/* The kept value follows the newest entry (Age counts from its fetch, whichever replica made
 * it), ignores negative entries, and goes when stale-if-error is turned off. */
static void stale_follows_newest_entry(void **state)
{
    (void)state;
    ps_cache_settings_t s = settings_ra(0, 0, 5000);
    ps_cache_t *c = ps_cache_new(&loop, &backend, &s, NULL);
    uint64_t t0 = fk.now;
    lookup(c, "BTC-USD");
    get_reply(0, 0, BODY, 1000); /* fetched at t0 by someone */
    fk.now = t0 + 700;
    lookup(c, "BTC-USD");
    get_reply(1, 0, BODY2, 1000); /* a newer entry, fetched at t0 + 700 */
    lookup(c, "NOPE");
    get_reply(2, 0, "", 1000);
    fk.now = t0 + 3800;
    fk.fetch_down = 1;
    fk.down = 1;
    assert_int_equal(lookup(c, "BTC-USD"), 1);
    assert_memory_equal(got.body[got.n - 1], BODY2, strlen(BODY2));
    assert_int_equal(got.age[got.n - 1], 3);
    assert_int_equal(lookup(c, "NOPE"), 1);
    assert_int_equal(got.outcome[got.n - 1], PS_PRICE_UNAVAILABLE);
    s.stale_if_error_ms = 0;
    ps_cache_configure(c, &s);
    assert_int_equal(lookup(c, "BTC-USD"), 1);
    assert_int_equal(got.outcome[got.n - 1], PS_PRICE_UNAVAILABLE);
    ps_cache_stats_t st;
    ps_cache_stats(c, &st);
    assert_int_equal(st.stale_entries, 0);
    cache_free(c);
}

/* Answers every queued operation (in order, repeatedly) with success until none is left. */
static void drain_ok(const char *body)
{
    while (fk.dgets < fk.ngets || fk.dfetches < fk.nfetches || fk.dsets < fk.nsets ||
           fk.dlocks < fk.nlocks) {
        while (fk.dgets < fk.ngets)
            get_reply(fk.dgets++, 0, NULL, -2);
        while (fk.dlocks < fk.nlocks)
            lock_reply(fk.dlocks++, 0, 1);
        while (fk.dfetches < fk.nfetches)
            fetch_reply(fk.dfetches++, 0, body);
        while (fk.dsets < fk.nsets)
            set_reply(fk.dsets++, 0);
    }
}

/* Refresh-ahead and stale-if-error with every allocation failing in turn: no leak, no crash,
 * each lookup answered exactly once. */
static void refresh_allocation_failures(void **state)
{
    (void)state;
    for (long fail = 1; fail < 40; fail++) {
        memset(&fk, 0, sizeof fk);
        memset(&got, 0, sizeof got);
        fk.now = 1000000;
        ps_cache_settings_t s = settings_ra(1, 20, 2000);
        ps_cache_t *c = ps_cache_new(&loop, &backend, &s, NULL);
        if (!c)
            continue;
        int refused = get(c, "BTC-USD") < 0;
        drain_ok(BODY);
        cm_alloc_fail_after(fail);
        fk.now += 850; /* the window */
        for (int i = 0; i < 3; i++)
            refused += get(c, "BTC-USD") < 0;
        turn();
        drain_ok(BODY2);
        fk.now += 1500; /* expired: the origin fails, stale answers */
        fk.fetch_down = 1;
        for (int i = 0; i < 2; i++)
            refused += get(c, "BTC-USD") < 0;
        turn();
        drain_ok(BODY);
        assert_int_equal(got.n + refused, 6);
        cm_alloc_fail_after(0);
        cache_free(c);
    }
}

/* Whatever the cache knows at once comes through the callback on the next loop turn, exactly
 * once, never from inside ps_cache_get (get() checks that) or ps_cache_get_many. */
static void answers_known_at_once_come_next_turn(void **state)
{
    (void)state;
    ps_cache_settings_t s = settings_ra(1, 0, 5000);
    ps_cache_t *c = ps_cache_new(&loop, &backend, &s, NULL);
    get(c, "BTC-USD");
    get_reply(0, 0, BODY, 300);
    get(c, "NOPE");
    get_reply(1, 0, "", 300);
    assert_int_equal(got.n, 2);

    /* Memory-tier hits, found and negative. */
    assert_int_equal(get(c, "BTC-USD"), 0);
    assert_int_equal(get(c, "NOPE"), 0);
    assert_int_equal(got.n, 2);
    /* The copies go before the turn: the queued answers keep the value they were given. */
    ps_cache_configure(c, &s);
    s.ttl_ms = 2000;
    ps_cache_configure(c, &s);
    turn();
    assert_int_equal(got.n, 4);
    assert_string_equal(got.status[2], "price-service; hit; detail=memory");
    assert_string_equal(got.body[2], BODY);
    assert_int_equal(got.outcome[3], PS_PRICE_NOT_FOUND);
    turn();
    assert_int_equal(got.n, 4); /* once */

    /* Redis down and the origin failing at once: the stale value, then "unavailable". */
    fk.down = 1;
    fk.fetch_down = 1;
    assert_int_equal(get(c, "BTC-USD"), 0);
    assert_int_equal(get(c, "ETH-USD"), 0);
    turn();
    assert_int_equal(got.n, 6);
    assert_string_equal(got.status[4], "price-service; fwd=stale; detail=origin-error");
    assert_string_equal(got.body[4], BODY);
    assert_int_equal(got.outcome[5], PS_PRICE_UNAVAILABLE);

    /* A finished flight, waiting for its SET reply, answers a lookup that cannot reach Redis. */
    fk.down = 0;
    fk.fetch_down = 0;
    get(c, "SOL-USD");
    get_reply(2, 0, NULL, -2);
    fetch_reply(0, 0, BODY2);
    assert_int_equal(got.n, 7);
    fk.down = 1;
    assert_int_equal(get(c, "SOL-USD"), 0);
    set_reply(0, 0); /* the flight and its body go before the turn */
    turn();
    assert_int_equal(got.n, 8);
    assert_string_equal(got.status[7], "price-service; fwd=miss; collapsed");
    assert_string_equal(got.body[7], BODY2);

    /* Caching off and the origin failing at once. */
    fk.down = 0;
    fk.fetch_down = 1;
    s.enabled = 0;
    ps_cache_configure(c, &s);
    assert_int_equal(get(c, "BTC-USD"), 0);
    turn();
    assert_int_equal(got.n, 9);
    assert_string_equal(got.status[8], "price-service; fwd=bypass");

    /* Closing answers what is still queued, on the close's own later turn. */
    assert_int_equal(get(c, "BTC-USD"), 0);
    cache_free(c);
    assert_int_equal(got.n, 10);
}

int main(void)
{
    cm_json_init();
    uv_loop_init(&loop);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(miss_then_hit, setup, teardown),
        cmocka_unit_test_setup_teardown(fifty_concurrent_misses_one_fetch, setup, teardown),
        cmocka_unit_test_setup_teardown(late_miss_joins_finished_flight, setup, teardown),
        cmocka_unit_test_setup_teardown(negative_caching, setup, teardown),
        cmocka_unit_test_setup_teardown(memory_tier_until_redis_expiry, setup, teardown),
        cmocka_unit_test_setup_teardown(memory_tier_bounded, setup, teardown),
        cmocka_unit_test_setup_teardown(redis_down_goes_to_origin, setup, teardown),
        cmocka_unit_test_setup_teardown(origin_failure, setup, teardown),
        cmocka_unit_test_setup_teardown(bypass_when_disabled, setup, teardown),
        cmocka_unit_test_setup_teardown(batch_lookup, setup, teardown),
        cmocka_unit_test_setup_teardown(metrics_and_ratio, setup, teardown),
        cmocka_unit_test_setup_teardown(allocation_failures, setup, teardown),
        cmocka_unit_test_setup_teardown(refresh_ahead_in_window_once, setup, teardown),
        cmocka_unit_test_setup_teardown(refresh_lock_lost_does_nothing, setup, teardown),
        cmocka_unit_test_setup_teardown(refresh_without_memory_tier, setup, teardown),
        cmocka_unit_test_setup_teardown(failed_refresh_never_serves_past_expiry, setup, teardown),
        cmocka_unit_test_setup_teardown(refresh_set_failure_and_negative, setup, teardown),
        cmocka_unit_test_setup_teardown(stale_if_error_bound_and_age, setup, teardown),
        cmocka_unit_test_setup_teardown(stale_follows_newest_entry, setup, teardown),
        cmocka_unit_test_setup_teardown(refresh_allocation_failures, setup, teardown),
        cmocka_unit_test_setup_teardown(answers_known_at_once_come_next_turn, setup, teardown),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    uv_loop_close(&loop);
    return failed;
}
