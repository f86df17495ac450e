/* The HTTP endpoints of the price-service (docs/openapi.yaml). */
#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "app.h"
#include "cm/alloc.h"
#include "cm/log.h"
#include "market.h"

static const char JSON[] = "application/json";

static const char *cors(const cm_http_request_t *req);
static const char *with_cors(const cm_http_request_t *req, const char *extra, char *buf,
                             size_t bufsz);

/* Answers with a small JSON object built by cJSON (and the request's CORS lines). */
static void respond_json(cm_http_request_t *req, int status, cJSON *o, const char *headers)
{
    char buf[PS_CORS_ORIGIN_MAX + 128];
    cm_service_respond_json(req, status, o, with_cors(req, headers, buf, sizeof buf), "internal");
}

/* ---- GET /api/markets/price ----------------------------------------------------------- */

/* The CORS header lines of this request (PRICE_CORS_ALLOWED_ORIGINS), set on entry to the
 * price handlers; NULL when there are none. */
static const char *cors(const cm_http_request_t *req)
{
    return req->user;
}

static void set_cors(cm_http_request_t *req, const ps_app_t *app)
{
    if (app->cfg.ncors == 0) /* the default: no header lookup on the hot path */
        return;
    const char *h = ps_config_cors_headers(&app->cfg, cm_http_header(req, "Origin"));
    req->user = (void *)(uintptr_t)h; /* only read back as const char * */
}

/* `extra` followed by the request's CORS lines, in `buf` when both are there. */
static const char *with_cors(const cm_http_request_t *req, const char *extra, char *buf,
                             size_t bufsz)
{
    const char *c = cors(req);
    if (!c || !extra)
        return c ? c : extra;
    snprintf(buf, bufsz, "%s%s", extra, c);
    return buf;
}

static void respond_price(cm_http_request_t *req, const ps_cache_result_t *r)
{
    /* Built with memcpy, not snprintf: on the cache-hit path the formatted print cost ~700
     * instructions a request, a tenth of the daemon's user time (callgrind, bench/run). */
    static const char name[] = "Cache-Status: ";
    char headers[160 + PS_CORS_ORIGIN_MAX + 96];
    size_t len = strnlen(r->cache_status, 160 - sizeof name - 20);
    memcpy(headers, name, sizeof name - 1);
    memcpy(headers + sizeof name - 1, r->cache_status, len);
    memcpy(headers + sizeof name - 1 + len, "\r\n", 3);
    if (r->age_s >= 0) /* a stale answer (RFC 9111, 5.1): rare, so snprintf is fine here */
        snprintf(headers + sizeof name + 1 + len, 160 - (sizeof name + 1 + len), "Age: %ld\r\n",
                 r->age_s);
    const char *c = cors(req);
    if (c) /* at most PS_CORS_ORIGIN_MAX + 45 bytes (config.c) */
        strcat(headers, c);
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
        cm_http_respond_error(req, 400, "invalid_market", msg, cors(req));
        return -1;
    }
    if (n == UV_EEXIST) {
        char msg[64];
        snprintf(msg, sizeof msg, "the %s query parameter is repeated", key);
        cm_http_respond_error(req, 400, "invalid_market", msg, cors(req));
        return -1;
    }
    if (n < 0) {
        const char *why = n != UV_E2BIG                ? "malformed query string"
                          : strcmp(key, "market") == 0 ? "market must be 1 to 64 characters"
                                                       : "at most 100 markets per request";
        cm_http_respond_error(req, 400, "invalid_market", why, cors(req));
        return -1;
    }
    return n;
}

static void handle_price(cm_http_request_t *req, void *ud)
{
    ps_app_t *app = ud;
    set_cors(req, app);
    char market[PS_MARKET_MAX + 2];
    int n = market_param(req, "market", market, sizeof market);
    if (n < 0)
        return;
    if (!ps_market_valid(market, (size_t)n)) {
        cm_http_respond_error(req, 400, "invalid_market",
                              "market must be 1 to 64 of A-Z a-z 0-9 . _ : -", cors(req));
        return;
    }
    if (ps_cache_get(app->cache, market, on_price, req) != 0) {
        char retry[PS_CORS_ORIGIN_MAX + 128];
        cm_http_respond_error(req, 503, "overloaded", "out of memory",
                              with_cors(req, "Retry-After: 1\r\n", retry, sizeof retry));
    }
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
            char buf[PS_CORS_ORIGIN_MAX + 128];
            cm_http_respond_error(req, 503, "origin_unavailable",
                                  "the price origin is unavailable and nothing is cached",
                                  with_cors(req, "Retry-After: 1\r\n", buf, sizeof buf));
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
        if (!item ||
            !cJSON_AddItemToArray(items[i].outcome == PS_PRICE_FOUND ? prices : missing, item)) {
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
    set_cors(req, app);
    char retry[PS_CORS_ORIGIN_MAX + 128];
    batch_req_t *b = cm_malloc(sizeof *b);
    if (!b) {
        cm_http_respond_error(req, 503, "overloaded", "out of memory",
                              with_cors(req, "Retry-After: 1\r\n", retry, sizeof retry));
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
                                  cors(req));
    }
    if (n < 0) {
        cm_free(b);
        return;
    }
    for (int i = 0; i < n; i++)
        b->items[i].market = ids[i];
    if (ps_cache_get_many(app->cache, b->items, n, on_batch, b) == 0)
        return;
    cm_http_respond_error(req, 503, "overloaded", "out of memory",
                          with_cors(req, "Retry-After: 1\r\n", retry, sizeof retry));
    cm_free(b);
}

int ps_handlers_register(ps_app_t *app)
{
    const unsigned GET = CM_ROUTE_GET | CM_ROUTE_HEAD;
    int rc = cm_service_route(app->svc, GET, "/api/markets/price", handle_price, app);
    return rc ? rc : cm_service_route(app->svc, GET, "/api/markets/prices", handle_prices, app);
}
