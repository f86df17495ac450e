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
    op_t gets[QMAX], sets[QMAX], fetches[QMAX], mgets[QMAX];
    int ngets, nsets, nfetches, nmgets;
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

static const ps_cache_backend_t backend = {f_get, f_mget, f_set, f_fetch, f_now, NULL};

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

/* Results collected from callbacks. */
static struct got {
    int n;
    ps_price_outcome_t outcome[QMAX];
    char status[QMAX][80];
    char body[QMAX][256];
} got;

static void on_result(const ps_cache_result_t *r, void *ud)
{
    (void)ud;
    int i = got.n++;
    got.outcome[i] = r->outcome;
    strcpy(got.status[i], r->cache_status);
    got.body[i][0] = '\0';
    if (r->body) {
        memcpy(got.body[i], r->body, r->body_len);
        got.body[i][r->body_len] = '\0';
    }
}

static ps_cache_settings_t settings(int memory)
{
    return (ps_cache_settings_t){1, 1000, memory, 1000};
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
    assert_int_equal(cm_alloc_live(), live_before);
    return 0;
}

static const char BODY[] = "{\"market\":\"BTC-USD\",\"price\":\"64123.45\"}";

static void miss_then_hit(void **state)
{
    (void)state;
    ps_cache_settings_t s = settings(0);
    ps_cache_t *c = ps_cache_new(&backend, &s, NULL);
    ps_cache_result_t now;

    assert_int_equal(ps_cache_get(c, "BTC-USD", on_result, NULL, &now), 0);
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

    assert_int_equal(ps_cache_get(c, "BTC-USD", on_result, NULL, &now), 0);
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
    ps_cache_free(c);
}

static void fifty_concurrent_misses_one_fetch(void **state)
{
    (void)state;
    ps_cache_settings_t s = settings(0);
    ps_cache_t *c = ps_cache_new(&backend, &s, NULL);
    ps_cache_result_t now;
    for (int i = 0; i < 50; i++)
        assert_int_equal(ps_cache_get(c, "ETH-USD", on_result, NULL, &now), 0);
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
    ps_cache_free(c);
}

/* A GET sent before the SET may still say "miss": the finished flight answers it. */
static void late_miss_joins_finished_flight(void **state)
{
    (void)state;
    ps_cache_settings_t s = settings(0);
    ps_cache_t *c = ps_cache_new(&backend, &s, NULL);
    ps_cache_result_t now;
    ps_cache_get(c, "SOL-USD", on_result, NULL, &now);
    ps_cache_get(c, "SOL-USD", on_result, NULL, &now); /* both GETs out before any reply */
    assert_int_equal(fk.ngets, 2);
    get_reply(0, 0, NULL, -2);
    /* A third request while the fetch runs joins it without asking Redis. */
    ps_cache_get(c, "SOL-USD", on_result, NULL, &now);
    assert_int_equal(fk.ngets, 2);
    fetch_reply(0, 0, BODY);
    assert_int_equal(got.n, 2);
    assert_int_equal(fk.nsets, 1);
    /* The second GET comes back "miss" after the origin answered, before the SET reply. */
    get_reply(1, 0, NULL, -2);
    assert_int_equal(got.n, 3);
    assert_string_equal(got.status[2], "price-service; fwd=miss; collapsed");
    assert_string_equal(got.body[2], BODY);
    /* A new request asks Redis (behind the SET) rather than the finished flight. */
    assert_int_equal(ps_cache_get(c, "SOL-USD", on_result, NULL, &now), 0);
    assert_int_equal(fk.ngets, 3);
    assert_int_equal(fk.nfetches, 1);
    set_reply(0, 0);
    get_reply(2, 0, BODY, 1000);
    assert_string_equal(got.status[3], "price-service; hit");
    ps_cache_stats_t st;
    ps_cache_stats(c, &st);
    assert_int_equal(st.flights, 0);
    ps_cache_free(c);
}

static void negative_caching(void **state)
{
    (void)state;
    ps_cache_settings_t s = settings(0);
    ps_cache_t *c = ps_cache_new(&backend, &s, NULL);
    ps_cache_result_t now;
    ps_cache_get(c, "NOPE", on_result, NULL, &now);
    get_reply(0, 0, NULL, -2);
    fetch_reply(0, UV_ENOENT, NULL);
    assert_int_equal(got.outcome[0], PS_PRICE_NOT_FOUND);
    assert_int_equal(fk.nsets, 1);
    assert_int_equal(fk.sets[0].len, 0);
    set_reply(0, 0);
    ps_cache_get(c, "NOPE", on_result, NULL, &now);
    get_reply(1, 0, "", 500);
    assert_int_equal(got.outcome[1], PS_PRICE_NOT_FOUND);
    assert_string_equal(got.status[1], "price-service; hit");
    assert_int_equal(fk.nfetches, 1);
    ps_cache_free(c);
}

static void memory_tier_until_redis_expiry(void **state)
{
    (void)state;
    ps_cache_settings_t s = settings(1);
    ps_cache_t *c = ps_cache_new(&backend, &s, NULL);
    ps_cache_result_t now;
    ps_cache_get(c, "BTC-USD", on_result, NULL, &now);
    get_reply(0, 0, BODY, 300); /* the Redis entry lives 300 ms more */
    fk.now += 299;
    assert_int_equal(ps_cache_get(c, "BTC-USD", on_result, NULL, &now), 1);
    assert_string_equal(now.cache_status, "price-service; hit; detail=memory");
    assert_memory_equal(now.body, BODY, strlen(BODY));
    fk.now += 1; /* the Redis entry has expired: so has the copy */
    assert_int_equal(ps_cache_get(c, "BTC-USD", on_result, NULL, &now), 0);
    assert_int_equal(fk.ngets, 2);
    get_reply(1, 0, NULL, -2);
    fetch_reply(0, 0, BODY);
    set_reply(0, 0); /* stored for TTL from when the SET was sent */
    fk.now += 999;
    assert_int_equal(ps_cache_get(c, "BTC-USD", on_result, NULL, &now), 1);
    fk.now += 1;
    assert_int_equal(ps_cache_get(c, "BTC-USD", on_result, NULL, &now), 0);
    get_reply(2, UV_ETIMEDOUT, NULL, -1);
    fetch_reply(1, 0, BODY);
    ps_cache_free(c);
}

/* A full memory tier evicts its oldest entries in O(1) rather than scanning or refusing. */
static void memory_tier_bounded(void **state)
{
    (void)state;
    ps_cache_settings_t s = {1, 1000, 1, 3};
    ps_cache_t *c = ps_cache_new(&backend, &s, NULL);
    ps_cache_result_t now;
    const char *markets[] = {"A", "B", "C", "D"};
    for (int i = 0; i < 4; i++) {
        ps_cache_get(c, markets[i], on_result, NULL, &now);
        get_reply(i, 0, "", 1000); /* negative entries, as a flood of unknown ids makes */
        fk.now += 1;
    }
    ps_cache_stats_t st;
    ps_cache_stats(c, &st);
    assert_int_equal(st.memory_entries, 3);
    assert_int_equal(ps_cache_get(c, "A", on_result, NULL, &now), 0); /* evicted: asks Redis */
    assert_int_equal(ps_cache_get(c, "D", on_result, NULL, &now), 1); /* newest kept */
    get_reply(4, 0, NULL, -2);
    fetch_reply(0, UV_ENOENT, NULL);
    set_reply(0, 0);
    ps_cache_free(c);
}

static void redis_down_goes_to_origin(void **state)
{
    (void)state;
    ps_cache_settings_t s = settings(1);
    ps_cache_t *c = ps_cache_new(&backend, &s, NULL);
    ps_cache_result_t now;
    fk.down = 1;
    assert_int_equal(ps_cache_get(c, "BTC-USD", on_result, NULL, &now), 0);
    assert_int_equal(fk.nfetches, 1);
    fetch_reply(0, 0, BODY);
    assert_int_equal(got.outcome[0], PS_PRICE_FOUND);
    assert_string_equal(got.status[0], "price-service; fwd=miss; detail=redis-unavailable");
    assert_int_equal(fk.nsets, 0);

    /* Redis answers, but with an error (a timeout): the same. */
    fk.down = 0;
    ps_cache_get(c, "BTC-USD", on_result, NULL, &now);
    get_reply(0, UV_ETIMEDOUT, NULL, -1);
    fetch_reply(1, 0, BODY);
    assert_string_equal(got.status[1], "price-service; fwd=miss; detail=redis-unavailable");
    assert_int_equal(fk.nsets, 0);
    ps_cache_stats_t st;
    ps_cache_stats(c, &st);
    assert_int_equal(st.errors, 2);
    ps_cache_free(c);
}

static void origin_failure(void **state)
{
    (void)state;
    ps_cache_settings_t s = settings(0);
    ps_cache_t *c = ps_cache_new(&backend, &s, NULL);
    ps_cache_result_t now;
    ps_cache_get(c, "BTC-USD", on_result, NULL, &now);
    ps_cache_get(c, "BTC-USD", on_result, NULL, &now);
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
    assert_int_equal(ps_cache_get(c, "BTC-USD", on_result, NULL, &now), 1);
    assert_int_equal(now.outcome, PS_PRICE_UNAVAILABLE);
    ps_cache_free(c);
}

static void bypass_when_disabled(void **state)
{
    (void)state;
    ps_cache_settings_t s = settings(1);
    s.enabled = 0;
    ps_cache_t *c = ps_cache_new(&backend, &s, NULL);
    ps_cache_result_t now;
    ps_cache_get(c, "BTC-USD", on_result, NULL, &now);
    ps_cache_get(c, "BTC-USD", on_result, NULL, &now);
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
    ps_cache_get(c, "BTC-USD", on_result, NULL, &now);
    assert_int_equal(fk.ngets, 1);
    get_reply(0, 0, BODY, 10);
    ps_cache_free(c);
}

static struct {
    int calls;
    ps_cache_batch_item_t *items;
} batch_got;

static void on_batch(ps_cache_batch_item_t *items, int n, void *ud)
{
    (void)n;
    (void)ud;
    batch_got.calls++;
    batch_got.items = items;
}

static void batch_lookup(void **state)
{
    (void)state;
    ps_cache_settings_t s = settings(1);
    ps_cache_t *c = ps_cache_new(&backend, &s, NULL);
    ps_cache_result_t now;
    /* Put BTC-USD in the memory tier. */
    ps_cache_get(c, "BTC-USD", on_result, NULL, &now);
    get_reply(0, 0, BODY, 1000);

    memset(&batch_got, 0, sizeof batch_got);
    ps_cache_batch_item_t items[3] = {{.market = "BTC-USD"}, {.market = "ETH-USD"},
                                      {.market = "NOPE"}};
    assert_int_equal(ps_cache_get_many(c, items, 3, on_batch, NULL), 0);
    assert_int_equal(fk.nmgets, 1);
    assert_int_equal(fk.mgets[0].n, 2);
    assert_string_equal(fk.mgets[0].key, "price:v1:ETH-USD");
    const char *vals[2] = {"{\"market\":\"ETH-USD\"}", NULL};
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

    /* Everything in memory: answered at once, no callback. */
    ps_cache_batch_item_t again[2] = {{.market = "BTC-USD"}, {.market = "NOPE"}};
    assert_int_equal(ps_cache_get_many(c, again, 2, on_batch, NULL), 1);
    assert_int_equal(again[1].outcome, PS_PRICE_NOT_FOUND);
    assert_int_equal(batch_got.calls, 1);
    ps_cache_batch_release(again, 2);
    ps_cache_free(c);
}

static void metrics_and_ratio(void **state)
{
    (void)state;
    cm_metrics_t *m = cm_metrics_new();
    ps_cache_settings_t s = settings(1);
    ps_cache_t *c = ps_cache_new(&backend, &s, m);
    ps_cache_result_t now;
    ps_cache_get(c, "BTC-USD", on_result, NULL, &now);
    get_reply(0, 0, NULL, -2);
    fetch_reply(0, 0, BODY);
    set_reply(0, 0);
    for (int i = 0; i < 3; i++)
        ps_cache_get(c, "BTC-USD", on_result, NULL, &now);
    cm_buf_t out = CM_BUF_INIT;
    assert_int_equal(cm_metrics_render(m, &out), 0);
    assert_non_null(strstr(out.data, "price_cache_lookups_total{result=\"hit\"} 3"));
    assert_non_null(strstr(out.data, "price_cache_lookups_total{result=\"miss\"} 1"));
    assert_non_null(strstr(out.data, "price_cache_hit_ratio 0.75"));
    cm_buf_free(&out);
    ps_cache_free(c);
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
        ps_cache_t *c = ps_cache_new(&backend, &s, NULL);
        if (!c)
            continue;
        cm_alloc_fail_after(fail);
        ps_cache_result_t now;
        int sync = 0;
        for (int i = 0; i < 3; i++)
            sync += ps_cache_get(c, "BTC-USD", on_result, NULL, &now);
        for (int i = 0; i < fk.ngets; i++)
            get_reply(i, 0, NULL, -2);
        for (int i = 0; i < fk.nfetches; i++)
            fetch_reply(i, 0, BODY);
        for (int i = 0; i < fk.nsets; i++)
            set_reply(i, 0);
        assert_int_equal(got.n + sync, 3);
        cm_alloc_fail_after(0);
        ps_cache_free(c);
    }
}

int main(void)
{
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
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
