/*
 * service_internal.h: private to common/src/service*.c. The service's state, shared by its
 * life cycle (service.c) and its endpoints (service_routes.c).
 */
#ifndef CM_SERVICE_INTERNAL_H
#define CM_SERVICE_INTERNAL_H

#include "cm/http_metrics.h"
#include "cm/router.h"
#include "cm/service.h"

#define SERVICE_MAX_MIRRORED 4

struct cm_service {
    uv_loop_t *loop;
    cm_service_config_t cfg;
    cm_metrics_t *metrics;
    cm_http_metrics_t *http_metrics;
    cm_router_t *router;
    cm_http_server_t *http;
    uv_signal_t sig_term, sig_int, sig_hup;
    uv_timer_t drain_timer;
    int handles_open; /* signal and timer handles not yet closed */
    int started;      /* the handles were initialised */
    int closing;      /* cm_service_close was called */
    int stopping;
    /* Redis links whose client-side counters /metrics mirrors. */
    cm_redis_t *mirrored[SERVICE_MAX_MIRRORED];
    int nmirrored;
    cm_metric_t *m_reconnects, *m_timeouts, *m_stalls;
    double seen_reconnects, seen_timeouts, seen_stalls;
};

/* Routes /healthz, /readyz, /api/health/redis and /metrics. Returns 0 or a negative code. */
int service_routes_add(cm_service_t *s);

#endif
