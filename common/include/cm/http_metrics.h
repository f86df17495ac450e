/*
 * cm/http_metrics.h: http_requests_total{route,code} and http_request_duration_seconds{route}
 * for a cm_http server, as its observe hook.
 */
#ifndef CM_HTTP_METRICS_H
#define CM_HTTP_METRICS_H

#include "cm/http.h"
#include "cm/metrics.h"

typedef struct cm_http_metrics cm_http_metrics_t;

/* Creates the observer; `metrics` is borrowed and must outlive it. NULL on ENOMEM. */
cm_http_metrics_t *cm_http_metrics_new(cm_metrics_t *metrics);
void cm_http_metrics_free(cm_http_metrics_t *hm);

/*
 * Use as cm_http_config.observe with observe_ud = the cm_http_metrics_t. Series are created on
 * first use of a (route, code) pair and cached, so the steady state does no lookups by name.
 * Routes are the router's labels (a fixed set), so the number of series stays bounded.
 */
void cm_http_metrics_observe(const cm_http_request_t *req, int status, double seconds, void *ud);

#endif
