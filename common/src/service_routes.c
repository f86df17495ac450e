/*
 * The endpoints every daemon answers the same way: liveness, readiness, the Redis probe and
 * the Prometheus scrape (docs/openapi.yaml). Their answers are never cached by a proxy.
 */
#include "service_internal.h"

#include "cm/error.h"

#include <cjson/cJSON.h>
#include <string.h>

static const char NO_STORE[] = "Cache-Control: no-store\r\n";

int cm_service_respond_json(cm_http_request_t *req, int status, cJSON *body, const char *headers,
                            const char *oom_code)
{
    char *text = body ? cJSON_PrintUnformatted(body) : NULL;
    cJSON_Delete(body);
    if (!text)
        return cm_http_respond_error(req, 500, oom_code, "out of memory", headers);
    int rc = cm_http_respond(req, status, "application/json", headers, text, strlen(text));
    cJSON_free(text);
    return rc;
}

static void handle_healthz(cm_http_request_t *req, void *ud)
{
    (void)ud;
    static const char body[] = "{\"status\":\"ok\"}";
    cm_http_respond(req, 200, "application/json", NO_STORE, body, sizeof body - 1);
}

/* The readiness body, NULL when out of memory. "status" leads it, so it is added before the
 * daemon's fields and its value is set once the daemon has said whether it is ready. */
static cJSON *ready_body(const cm_service_t *s, int *ready)
{
    cJSON *o = cJSON_CreateObject();
    *ready = 0;
    if (!cJSON_AddStringToObject(o, "status", "ready")) {
        cJSON_Delete(o);
        return NULL;
    }
    *ready = s->cfg.ready(o, s->cfg.ud) && !s->stopping;
    if (*ready)
        return o;
    cJSON *word = cJSON_CreateString(s->cfg.not_ready);
    if (!word || !cJSON_ReplaceItemInObjectCaseSensitive(o, "status", word)) {
        cJSON_Delete(word); /* not attached when the replacement failed */
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}

static void handle_readyz(cm_http_request_t *req, void *ud)
{
    cm_service_t *s = ud;
    int ready;
    cJSON *o = ready_body(s, &ready);
    cm_service_respond_json(req, ready ? 200 : 503, o, NO_STORE, s->cfg.oom_code);
}

/* ---- GET /api/health/redis ------------------------------------------------------------ */

typedef struct ping {
    cm_service_t *s;
    cm_http_request_t *req;
} ping_t;

static void answer_ping(cm_service_t *s, cm_http_request_t *req, int status, double latency_ms)
{
    cJSON *o = cJSON_CreateObject();
    if (status == 0) {
        cJSON_AddStringToObject(o, "status", "ok");
        cJSON_AddStringToObject(o, "redis", "up");
        cJSON_AddNumberToObject(o, "latency_ms", (double)(long)(latency_ms * 1000) / 1000);
    } else {
        cJSON_AddStringToObject(o, "status", "unavailable");
        cJSON_AddStringToObject(o, "redis", "down");
        /* The contract's word for a deadline; the system's text for the rest. */
        cJSON_AddStringToObject(o, "error",
                                status == UV_ETIMEDOUT ? "timeout" : cm_strerror(status));
    }
    cm_service_respond_json(req, status == 0 ? 200 : 503, o, NO_STORE, s->cfg.oom_code);
}

static void on_ping(cm_redis_t *r, int status, double latency_ms, void *ud)
{
    (void)r;
    cm_http_request_t *req = ud;
    /* The service rides in req->user: the ping callback has one user pointer only. */
    answer_ping(req->user, req, status, latency_ms);
}

static void handle_health_redis(cm_http_request_t *req, void *ud)
{
    cm_service_t *s = ud;
    cm_redis_t *r = s->cfg.health_redis(s->cfg.ud);
    if (!r) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "status", "disabled");
        cm_service_respond_json(req, 200, o, NO_STORE, s->cfg.oom_code);
        return;
    }
    req->user = s;
    int rc = cm_redis_ping(r, on_ping, req);
    if (rc != 0)
        answer_ping(s, req, rc, 0);
}

/* ---- GET /metrics --------------------------------------------------------------------- */

static void mirror(cm_metric_t *m, double *seen, double now)
{
    if (now > *seen)
        cm_counter_add(m, now - *seen);
    *seen = now;
}

/* The Redis clients keep their own counters; they are brought into the registry at scrape
 * time rather than on every event. */
static void mirror_redis(cm_service_t *s)
{
    double reconnects = 0, timeouts = 0, stalls = 0;
    for (int i = 0; i < s->nmirrored; i++) {
        cm_redis_stats_t st;
        cm_redis_stats(s->mirrored[i], &st);
        reconnects += (double)st.reconnects;
        timeouts += (double)st.timeouts;
        stalls += (double)st.stalls;
    }
    mirror(s->m_reconnects, &s->seen_reconnects, reconnects);
    mirror(s->m_timeouts, &s->seen_timeouts, timeouts);
    mirror(s->m_stalls, &s->seen_stalls, stalls);
}

static void handle_metrics(cm_http_request_t *req, void *ud)
{
    cm_service_t *s = ud;
    mirror_redis(s);
    if (s->cfg.on_scrape)
        s->cfg.on_scrape(s->cfg.ud);
    cm_buf_t out = CM_BUF_INIT;
    if (cm_metrics_render(s->metrics, &out) != 0)
        cm_http_respond_error(req, 500, s->cfg.oom_code, "out of memory", NULL);
    else
        cm_http_respond(req, 200, CM_METRICS_CONTENT_TYPE, NULL, out.data, out.len);
    cm_buf_free(&out);
}

int service_routes_add(cm_service_t *s)
{
    int rc = 0;
    rc = rc ? rc : cm_router_add(s->router, CM_ROUTE_GET, "/healthz", handle_healthz, s);
    rc = rc ? rc : cm_router_add(s->router, CM_ROUTE_GET, "/readyz", handle_readyz, s);
    rc = rc ? rc
            : cm_router_add(s->router, CM_ROUTE_GET, "/api/health/redis", handle_health_redis, s);
    rc = rc ? rc : cm_router_add(s->router, CM_ROUTE_GET, "/metrics", handle_metrics, s);
    return rc;
}
