#include "backend.h"

#include <hiredis/hiredis.h>
#include <libpq-fe.h>
#include <string.h>
#include <uv.h>

#include "cm/alloc.h"
#include "cm/buf.h"
#include "cm/metrics.h"
#include "cm/pg.h"
#include "cm/redis.h"
#include "market.h"
#include "price_json.h"

/* Decimals as text exactly as stored; the time as RFC 3339 UTC with milliseconds. */
static const char ORIGIN_SQL[] =
    "SELECT market, price::text, confidence::text,"
    " to_char(publish_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), source"
    " FROM oracle_prices WHERE market = $1";

struct ps_backend {
    uv_loop_t *loop;
    cm_redis_t *redis;
    cm_pg_t *pg;
    uint64_t origin_timeout_ms;
    cm_metric_t *m_ok, *m_not_found, *m_error, *m_duration;
    /* The value of the refresh locks this instance takes: random, so it names nothing about
     * the host and two replicas never share it. */
    char token[PS_BACKEND_TOKEN_LEN + 1];
};

/* ---- Redis ---------------------------------------------------------------------------- */

/* GET and PTTL go out back to back and come back together: one round trip. */
typedef struct get_op {
    ps_kv_get_cb cb;
    void *arg;
    int status;
    int has_value;
    int pttl_sent; /* 0: the GET callback answers alone, without a remaining TTL */
    char *value;
    size_t len;
} get_op_t;

static void get_finish(get_op_t *op, int64_t pttl)
{
    op->cb(op->status, op->has_value ? (op->value ? op->value : "") : NULL, op->len, pttl, op->arg);
    cm_free(op->value);
    cm_free(op);
}

static void on_get(cm_redis_t *r, redisReply *reply, int status, void *ud)
{
    (void)r;
    get_op_t *op = ud;
    if (status == 0 && reply->type == REDIS_REPLY_STRING) {
        op->has_value = 1;
        op->len = reply->len;
        if (reply->len) {
            op->value = cm_strndup(reply->str, reply->len);
            if (!op->value)
                op->status = UV_ENOMEM;
        }
    } else if (status == 0 && reply->type != REDIS_REPLY_NIL) {
        op->status = UV_EPROTO;
    } else if (status != 0) {
        op->status = status;
    }
    if (!op->pttl_sent)
        get_finish(op, -1);
}

static void on_pttl(cm_redis_t *r, redisReply *reply, int status, void *ud)
{
    (void)r;
    int64_t pttl = status == 0 && reply->type == REDIS_REPLY_INTEGER ? reply->integer : -1;
    get_finish(ud, pttl);
}

static int be_get(void *ctx, const char *key, ps_kv_get_cb cb, void *arg)
{
    ps_backend_t *b = ctx;
    get_op_t *op = cm_calloc(1, sizeof *op);
    if (!op)
        return UV_ENOMEM;
    op->cb = cb;
    op->arg = arg;
    const char *argv[2] = {"GET", key};
    size_t lens[2] = {3, strlen(key)};
    int rc = cm_redis_command_argv(b->redis, on_get, op, 2, argv, lens);
    if (rc != 0) {
        cm_free(op);
        return rc;
    }
    argv[0] = "PTTL";
    lens[0] = 4;
    op->pttl_sent = cm_redis_command_argv(b->redis, on_pttl, op, 2, argv, lens) == 0;
    return 0;
}

typedef struct mget_op {
    ps_kv_mget_cb cb;
    void *arg;
} mget_op_t;

static void on_mget(cm_redis_t *r, redisReply *reply, int status, void *ud)
{
    (void)r;
    mget_op_t *op = ud;
    if (status == 0 && reply->type == REDIS_REPLY_ARRAY && reply->elements <= PS_BATCH_MAX) {
        const char *vals[PS_BATCH_MAX];
        size_t lens[PS_BATCH_MAX];
        for (size_t i = 0; i < reply->elements; i++) {
            redisReply *e = reply->element[i];
            vals[i] = e->type == REDIS_REPLY_STRING ? e->str : NULL;
            lens[i] = e->type == REDIS_REPLY_STRING ? e->len : 0;
        }
        op->cb(0, vals, lens, (int)reply->elements, op->arg);
    } else {
        op->cb(status ? status : UV_EPROTO, NULL, NULL, 0, op->arg);
    }
    cm_free(op);
}

static int be_mget(void *ctx, const char *const *keys, int n, ps_kv_mget_cb cb, void *arg)
{
    ps_backend_t *b = ctx;
    if (n > PS_BATCH_MAX)
        return UV_E2BIG;
    const char *argv[PS_BATCH_MAX + 1];
    size_t lens[PS_BATCH_MAX + 1];
    argv[0] = "MGET";
    lens[0] = 4;
    for (int i = 0; i < n; i++) {
        argv[i + 1] = keys[i];
        lens[i + 1] = strlen(keys[i]);
    }
    mget_op_t *op = cm_malloc(sizeof *op);
    if (!op)
        return UV_ENOMEM;
    *op = (mget_op_t){cb, arg};
    int rc = cm_redis_command_argv(b->redis, on_mget, op, n + 1, argv, lens);
    if (rc != 0)
        cm_free(op);
    return rc;
}

typedef struct set_op {
    ps_kv_set_cb cb;
    void *arg;
} set_op_t;

static void on_set(cm_redis_t *r, redisReply *reply, int status, void *ud)
{
    (void)r;
    set_op_t *op = ud;
    op->cb(status ? status : reply->type == REDIS_REPLY_ERROR ? UV_EPROTO : 0, op->arg);
    cm_free(op);
}

static int be_set(void *ctx, const char *key, const char *val, size_t len, uint64_t ttl_ms,
                  ps_kv_set_cb cb, void *arg)
{
    ps_backend_t *b = ctx;
    char ttl[24];
    snprintf(ttl, sizeof ttl, "%llu", (unsigned long long)ttl_ms);
    const char *argv[5] = {"SET", key, val, "PX", ttl};
    size_t lens[5] = {3, strlen(key), len, 2, strlen(ttl)};
    set_op_t *op = cm_malloc(sizeof *op);
    if (!op)
        return UV_ENOMEM;
    *op = (set_op_t){cb, arg};
    int rc = cm_redis_command_argv(b->redis, on_set, op, 5, argv, lens);
    if (rc != 0)
        cm_free(op);
    return rc;
}

typedef struct lock_op {
    ps_kv_lock_cb cb;
    void *arg;
} lock_op_t;

static void on_lock(cm_redis_t *r, redisReply *reply, int status, void *ud)
{
    (void)r;
    lock_op_t *op = ud;
    if (status != 0)
        op->cb(status, 0, op->arg);
    else if (reply->type == REDIS_REPLY_STATUS) /* +OK: ours */
        op->cb(0, 1, op->arg);
    else if (reply->type == REDIS_REPLY_NIL) /* NX refused: someone else holds it */
        op->cb(0, 0, op->arg);
    else
        op->cb(UV_EPROTO, 0, op->arg);
    cm_free(op);
}

static int be_lock(void *ctx, const char *key, uint64_t ttl_ms, ps_kv_lock_cb cb, void *arg)
{
    ps_backend_t *b = ctx;
    char ttl[24];
    snprintf(ttl, sizeof ttl, "%llu", (unsigned long long)(ttl_ms ? ttl_ms : 1));
    const char *argv[6] = {"SET", key, b->token, "NX", "PX", ttl};
    size_t lens[6] = {3, strlen(key), strlen(b->token), 2, 2, strlen(ttl)};
    lock_op_t *op = cm_malloc(sizeof *op);
    if (!op)
        return UV_ENOMEM;
    *op = (lock_op_t){cb, arg};
    int rc = cm_redis_command_argv(b->redis, on_lock, op, 6, argv, lens);
    if (rc != 0)
        cm_free(op);
    return rc;
}

static void inc(cm_metric_t *m)
{
    if (m)
        cm_counter_inc(m);
}

/* ---- origin --------------------------------------------------------------------------- */

typedef struct fetch_op {
    ps_backend_t *b;
    ps_origin_cb cb;
    void *arg;
    uint64_t start_ns;
} fetch_op_t;

static void on_fetch(cm_pg_t *pg, const PGresult *res, int err, void *ud)
{
    (void)pg;
    fetch_op_t *op = ud;
    ps_backend_t *b = op->b;
    if (b->m_duration)
        cm_histogram_observe(b->m_duration, (double)(uv_hrtime() - op->start_ns) / 1e9);
    if (err || !res || PQresultStatus(res) != PGRES_TUPLES_OK) {
        /* The cache's contract: too slow, or unavailable for any other reason. */
        inc(b->m_error);
        op->cb(err == UV_ETIMEDOUT ? UV_ETIMEDOUT : UV_EIO, NULL, 0, op->arg);
    } else if (PQntuples(res) == 0) {
        inc(b->m_not_found);
        op->cb(UV_ENOENT, NULL, 0, op->arg);
    } else {
        ps_price_row_t row = {
            PQgetvalue(res, 0, 0),
            PQgetvalue(res, 0, 1),
            PQgetisnull(res, 0, 2) ? NULL : PQgetvalue(res, 0, 2),
            PQgetvalue(res, 0, 3),
            PQgetvalue(res, 0, 4),
        };
        cm_buf_t body = CM_BUF_INIT;
        if (ps_price_json(&row, &body) == 0) {
            inc(b->m_ok);
            op->cb(0, body.data, body.len, op->arg);
        } else {
            inc(b->m_error);
            op->cb(UV_ENOMEM, NULL, 0, op->arg);
        }
        cm_buf_free(&body);
    }
    cm_free(op);
}

static int be_fetch(void *ctx, const char *market, ps_origin_cb cb, void *arg)
{
    ps_backend_t *b = ctx;
    fetch_op_t *op = cm_malloc(sizeof *op);
    if (!op)
        return UV_ENOMEM;
    *op = (fetch_op_t){b, cb, arg, uv_hrtime()};
    const char *params[1] = {market};
    int rc = cm_pg_query(b->pg, ORIGIN_SQL, 1, params, b->origin_timeout_ms, on_fetch, op);
    if (rc != 0) {
        inc(b->m_error);
        cm_free(op);
    }
    return rc;
}

/* The real clock, not the loop's cached time: an entry must not outlive its Redis twin. */
static uint64_t be_now(void *ctx)
{
    (void)ctx;
    return uv_hrtime() / 1000000;
}

ps_backend_t *ps_backend_new(uv_loop_t *loop, cm_redis_t *redis, cm_pg_t *pg,
                             uint64_t origin_timeout_ms, cm_metrics_t *metrics,
                             ps_cache_backend_t *ops)
{
    ps_backend_t *b = cm_calloc(1, sizeof *b);
    if (!b)
        return NULL;
    b->loop = loop;
    b->redis = redis;
    b->pg = pg;
    b->origin_timeout_ms = origin_timeout_ms;
    unsigned char rnd[PS_BACKEND_TOKEN_LEN / 2];
    if (uv_random(NULL, NULL, rnd, sizeof rnd, 0, NULL) != 0) {
        /* No entropy source: the clock and the pid still tell replicas apart. */
        uint64_t mix = uv_hrtime() ^ ((uint64_t)uv_os_getpid() << 32);
        for (size_t i = 0; i < sizeof rnd; i++)
            rnd[i] = (unsigned char)(mix >> (8 * (i % 8)));
    }
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < sizeof rnd; i++) {
        b->token[2 * i] = hex[rnd[i] >> 4];
        b->token[2 * i + 1] = hex[rnd[i] & 15];
    }
    b->token[PS_BACKEND_TOKEN_LEN] = '\0';
    if (metrics) {
        const char *name = "origin_requests_total";
        const char *help = "Origin (Postgres) price queries by result.";
        b->m_ok = cm_metrics_counter(metrics, name, help, "result=\"ok\"");
        b->m_not_found = cm_metrics_counter(metrics, name, help, "result=\"not_found\"");
        b->m_error = cm_metrics_counter(metrics, name, help, "result=\"error\"");
        b->m_duration = cm_metrics_histogram(metrics, "origin_request_duration_seconds",
                                             "Origin query latency.", NULL,
                                             cm_metrics_latency_bounds, cm_metrics_latency_nbounds);
    }
    *ops = (ps_cache_backend_t){be_get, be_mget, be_set, be_lock, be_fetch, be_now, b};
    return b;
}

const char *ps_backend_token(const ps_backend_t *b)
{
    return b->token;
}

void ps_backend_free(ps_backend_t *b)
{
    cm_free(b);
}
