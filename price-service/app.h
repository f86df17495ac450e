/*
 * app.h: the price-service process: what main() builds and the handlers use.
 */
#ifndef PS_APP_H
#define PS_APP_H

#include <uv.h>

#include "backend.h"
#include "cache.h"
#include "cm/http.h"
#include "cm/http_metrics.h"
#include "cm/metrics.h"
#include "cm/pg.h"
#include "cm/redis.h"
#include "cm/router.h"
#include "config.h"

typedef struct ps_app {
    uv_loop_t *loop;
    ps_config_t cfg;
    cm_metrics_t *metrics;
    cm_http_metrics_t *http_metrics;
    cm_redis_t *redis;
    cm_pg_t *pg;
    ps_backend_t *backend;
    ps_cache_t *cache;
    cm_router_t *router;
    cm_http_server_t *http;
    uv_signal_t sig_term, sig_int, sig_hup;
    uv_timer_t drain_timer; /* shutdown: cancels what still waits on Redis or the origin */
    cm_metric_t *m_redis_up, *m_origin_up, *m_reconnects, *m_timeouts;
    uint64_t seen_reconnects, seen_timeouts;
    int stopping;
    int open_handles; /* signal and timer handles not yet closed */
    int deps_closing; /* Redis and the origin are being closed */
} ps_app_t;

/* Routes every endpoint of the contract onto app->router. Returns 0 or a negative code. */
int ps_handlers_register(ps_app_t *app);

/* The cache settings that app->cfg describes. */
ps_cache_settings_t ps_app_cache_settings(const ps_app_t *app);

#endif
