/*
 * app.h: the price-service process: what main() builds and the handlers use.
 */
#ifndef PS_APP_H
#define PS_APP_H

#include <uv.h>

#include "backend.h"
#include "cache.h"
#include "cm/metrics.h"
#include "cm/pg.h"
#include "cm/redis.h"
#include "cm/service.h"
#include "config.h"

typedef struct ps_app {
    uv_loop_t *loop;
    ps_config_t cfg;
    cm_service_t *svc;     /* listener, shared endpoints, signals */
    cm_metrics_t *metrics; /* the service's registry */
    cm_redis_t *redis;
    cm_pg_t *pg;
    ps_backend_t *backend;
    ps_cache_t *cache;
    cm_metric_t *m_redis_up, *m_origin_up;
    int deps_closing; /* Redis and the origin are being closed */
} ps_app_t;

/* Routes the price endpoints onto app->svc. Returns 0 or a negative code. */
int ps_handlers_register(ps_app_t *app);

/* The cache settings that app->cfg describes. */
ps_cache_settings_t ps_app_cache_settings(const ps_app_t *app);

#endif
