/* The HTTP endpoints of the price-service (CONTRACT.md, "price-service HTTP API"). */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <string.h>

#include "app.h"
#include "cm/alloc.h"
#include "cm/buf.h"
#include "cm/log.h"
#include "market.h"

static const char JSON[] = "application/json";

/* Answers with a small JSON object built by cJSON. */
static void respond_json(cm_http_request_t *req, int status, cJSON *o, const char *headers)
{
    char *text = o ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    if (!text) {
        cm_http_respond_error(req, 500, "internal", "out of memory", NULL);
        return;
    }
    cm_http_respond(req, status, JSON, headers, text, strlen(text));
    cJSON_free(text);
}

/* ---- GET /api/markets/price ----------------------------------------------------------- */

static void respond_price(cm_http_request_t *req, const ps_cache_result_t *r)
{
    /* Built with memcpy, not snprintf: on the cache-hit path the formatted print cost ~700
     * instructions a request, a tenth of the daemon's user time (callgrind, bench/run). */
    static const char name[] = "Cache-Status: ";
    char headers[160];
    size_t len = strnlen(r->cache_status, sizeof headers - sizeof name - 20);
    memcpy(headers, name, sizeof name - 1);
    memcpy(headers + sizeof name - 1, r->cache_status, len);
    memcpy(headers + sizeof name - 1 + len, "\r\n", 3);
    switch (r->outcome) {
    case PS_PRICE_FOUND:
        cm_http_respond(req, 200, JSON, headers, r->body, r->body_len);
        break;
    case PS_PRICE_NOT_FOUND:
        cm_http_respond_error(req, 404, "market_not_found", "no price for this market", headers);
        break;
    default:
        strcat(headers, "Retry-After: 1\r\n");
        cm_http_respond_error(req, 503, "origin_unavailable",
                              "the price origin is unavailable and nothing is cached", headers);
        break;
    }
}

static void on_price(const ps_cache_result_t *r, void *ud)
{
    respond_price(ud, r);
}

/* Reads ?<key>= into out; answers 400 invalid_market itself and returns -1 when unusable. */
static int market_param(cm_http_request_t *req, const char *key, char *out, size_t outsz)
{
    int n = cm_http_query_param(req, key, out, outsz);
    if (n == UV_ENOENT || n == 0) {
        char msg[64];
        snprintf(msg, sizeof msg, "the %s query parameter is required", key);
        cm_http_respond_error(req, 400, "invalid_market", msg, NULL);
        return -1;
    }
    if (n < 0) {
        const char *why = n != UV_E2BIG              ? "malformed query string"
                          : strcmp(key, "market") == 0 ? "market must be 1 to 64 characters"
                                                       : "at most 100 markets per request";
        cm_http_respond_error(req, 400, "invalid_market", why, NULL);
        return -1;
    }
    return n;
}

static void handle_price(cm_http_request_t *req, void *ud)
{
    ps_app_t *app = ud;
    char market[PS_MARKET_MAX + 2];
    int n = market_param(req, "market", market, sizeof market);
    if (n < 0)
        return;
    if (!ps_market_valid(market, (size_t)n)) {
        cm_http_respond_error(req, 400, "invalid_market",
                              "market must be 1 to 64 of A-Z a-z 0-9 . _ : -", NULL);
        return;
    }
    ps_cache_result_t now;
    if (ps_cache_get(app->cache, market, on_price, req, &now) == 1)
        respond_price(req, &now);
}

/* ---- GET /api/markets/prices ---------------------------------------------------------- */

typedef struct batch_req {
    cm_http_request_t *req;
    ps_cache_batch_item_t items[PS_BATCH_MAX];
    char storage[PS_BATCH_MAX * (PS_MARKET_MAX + 1) + 1];
} batch_req_t;

static void respond_batch(cm_http_request_t *req, ps_cache_batch_item_t *items, int n)
{
    for (int i = 0; i < n; i++) {
        if (items[i].outcome == PS_PRICE_UNAVAILABLE) {
            cm_http_respond_error(req, 503, "origin_unavailable",
                                  "the price origin is unavailable and nothing is cached",
                                  "Retry-After: 1\r\n");
            return;
        }
    }
    cJSON *o = cJSON_CreateObject();
    cJSON *prices = cJSON_AddArrayToObject(o, "prices");
    cJSON *missing = cJSON_AddArrayToObject(o, "missing");
    if (!prices || !missing) {
        cJSON_Delete(o);
        o = NULL;
    }
    for (int i = 0; o && i < n; i++) {
        cJSON *item = items[i].outcome == PS_PRICE_FOUND
                          ? cJSON_ParseWithLength(items[i].body, items[i].body_len)
                          : cJSON_CreateString(items[i].market);
        if (!item || !cJSON_AddItemToArray(items[i].outcome == PS_PRICE_FOUND ? prices : missing,
                                           item)) {
            cJSON_Delete(item);
            cJSON_Delete(o);
            o = NULL;
        }
    }
    respond_json(req, 200, o, NULL);
}

static void on_batch(ps_cache_batch_item_t *items, int n, void *ud)
{
    batch_req_t *b = ud;
    respond_batch(b->req, items, n);
    ps_cache_batch_release(items, n);
    cm_free(b);
}

static void handle_prices(cm_http_request_t *req, void *ud)
{
    ps_app_t *app = ud;
    batch_req_t *b = cm_malloc(sizeof *b);
    if (!b) {
        cm_http_respond_error(req, 503, "overloaded", "out of memory", "Retry-After: 1\r\n");
        return;
    }
    b->req = req;
    char list[sizeof b->storage];
    int n = market_param(req, "markets", list, sizeof list);
    const char *ids[PS_BATCH_MAX];
    if (n >= 0) {
        n = ps_market_split(list, b->storage, ids, PS_BATCH_MAX);
        if (n < 0)
            cm_http_respond_error(req, 400, "invalid_market",
                                  n == UV_E2BIG ? "at most 100 markets per request"
                                                : "markets must be a comma list of market ids",
                                  NULL);
    }
    if (n < 0) {
        cm_free(b);
        return;
    }
    for (int i = 0; i < n; i++)
        b->items[i].market = ids[i];
    int rc = ps_cache_get_many(app->cache, b->items, n, on_batch, b);
    if (rc == 0)
        return;
    if (rc == 1)
        respond_batch(req, b->items, n);
    else
        cm_http_respond_error(req, 503, "overloaded", "out of memory", "Retry-After: 1\r\n");
    ps_cache_batch_release(b->items, n);
    cm_free(b);
}

/* ---- health, readiness, metrics ------------------------------------------------------- */

static void on_ping(cm_redis_t *r, int status, double latency_ms, void *ud)
{
    (void)r;
    cm_http_request_t *req = ud;
    cJSON *o = cJSON_CreateObject();
    if (status == 0) {
        cJSON_AddStringToObject(o, "status", "ok");
        cJSON_AddStringToObject(o, "redis", "up");
        cJSON_AddNumberToObject(o, "latency_ms", (double)(long)(latency_ms * 1000) / 1000);
        respond_json(req, 200, o, "Cache-Control: no-store\r\n");
        return;
    }
    cJSON_AddStringToObject(o, "status", "unavailable");
    cJSON_AddStringToObject(o, "redis", "down");
    cJSON_AddStringToObject(o, "error", status == UV_ETIMEDOUT ? "timeout" : uv_strerror(status));
    respond_json(req, 503, o, "Cache-Control: no-store\r\n");
}

static void handle_health_redis(cm_http_request_t *req, void *ud)
{
    ps_app_t *app = ud;
    if (!app->cfg.cache_enabled) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "status", "disabled");
        respond_json(req, 200, o, "Cache-Control: no-store\r\n");
        return;
    }
    int rc = cm_redis_ping(app->redis, on_ping, req);
    if (rc != 0)
        on_ping(app->redis, rc == UV_ENOTCONN ? UV_ENOTCONN : rc, 0, req);
}

static void handle_healthz(cm_http_request_t *req, void *ud)
{
    (void)ud;
    static const char body[] = "{\"status\":\"ok\"}";
    cm_http_respond(req, 200, JSON, "Cache-Control: no-store\r\n", body, sizeof body - 1);
}

static void handle_readyz(cm_http_request_t *req, void *ud)
{
    ps_app_t *app = ud;
    cJSON *o = cJSON_CreateObject();
    int ready = !app->stopping && cm_pg_is_up(app->pg);
    cJSON_AddStringToObject(o, "status", ready ? "ready" : "not_ready");
    cJSON_AddStringToObject(o, "origin", cm_pg_is_up(app->pg) ? "up" : "down");
    cJSON_AddStringToObject(o, "redis", cm_redis_is_up(app->redis) ? "up" : "down");
    respond_json(req, ready ? 200 : 503, o, "Cache-Control: no-store\r\n");
}

/* Counters kept by the Redis client are brought into the registry at scrape time. */
static void sync_redis_stats(ps_app_t *app)
{
    cm_redis_stats_t st;
    cm_redis_stats(app->redis, &st);
    cm_counter_add(app->m_reconnects, (double)(st.reconnects - app->seen_reconnects));
    cm_counter_add(app->m_timeouts, (double)(st.timeouts - app->seen_timeouts));
    app->seen_reconnects = st.reconnects;
    app->seen_timeouts = st.timeouts;
    cm_gauge_set(app->m_redis_up, cm_redis_is_up(app->redis) ? 1 : 0);
    cm_gauge_set(app->m_origin_up, cm_pg_is_up(app->pg) ? 1 : 0);
}

static void handle_metrics(cm_http_request_t *req, void *ud)
{
    ps_app_t *app = ud;
    sync_redis_stats(app);
    cm_buf_t out = CM_BUF_INIT;
    if (cm_metrics_render(app->metrics, &out) != 0)
        cm_http_respond_error(req, 500, "internal", "out of memory", NULL);
    else
        cm_http_respond(req, 200, CM_METRICS_CONTENT_TYPE, NULL, out.data, out.len);
    cm_buf_free(&out);
}

int ps_handlers_register(ps_app_t *app)
{
    const unsigned GET = CM_ROUTE_GET | CM_ROUTE_HEAD;
    int rc = 0;
    rc = rc ? rc : cm_router_add(app->router, GET, "/api/markets/price", handle_price, app);
    rc = rc ? rc : cm_router_add(app->router, GET, "/api/markets/prices", handle_prices, app);
    rc = rc ? rc : cm_router_add(app->router, GET, "/api/health/redis", handle_health_redis, app);
    rc = rc ? rc : cm_router_add(app->router, GET, "/healthz", handle_healthz, app);
    rc = rc ? rc : cm_router_add(app->router, GET, "/readyz", handle_readyz, app);
    rc = rc ? rc : cm_router_add(app->router, GET, "/metrics", handle_metrics, app);
    return rc;
}
