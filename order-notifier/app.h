/*
 * app.h: the pieces of one order-notifier process, shared by its modules.
 *
 * Private to order-notifier/. main.c owns the struct and everything in it; the modules
 * (leader, hub, client) borrow it for their lifetime. Everything runs on one loop thread.
 */
#ifndef ON_APP_H
#define ON_APP_H

#include "config.h"

#include "cm/http.h"
#include "cm/metrics.h"
#include "cm/pg.h"
#include "cm/redis.h"

#include <uv.h>

struct on_hub;
struct on_leader;

typedef struct on_metrics {
    cm_metric_t *ws_messages_sent; /* ws_messages_sent_total */
    cm_metric_t *ws_slow_closes;   /* ws_slow_consumer_closes_total */
    cm_metric_t *events_received;  /* order_events_received_total */
    cm_metric_t *events_published; /* order_events_published_total */
    cm_metric_t *delivery_seconds; /* order_event_delivery_seconds */
    cm_metric_t *pg_listener_up;   /* pg_listener_up */
    cm_metric_t *leader;           /* notifier_leader */
    cm_metric_t *ws_rejected;      /* ws_handshakes_rejected_total (all codes) */
    cm_metric_t *resumes;          /* ws_resumes_total */
    cm_metric_t *redis_replays;    /* order_events_replayed_total */
} on_metrics_t;

typedef struct on_app {
    uv_loop_t *loop;
    on_config_t cfg;
    cm_metrics_t *registry; /* the service's (cm/service.h) */
    on_metrics_t m;
    cm_redis_t *redis_pub; /* PUBLISH, PING, health */
    cm_redis_t *redis_sub; /* SUBSCRIBE only */
    cm_pg_t *pg;           /* pool (resume, catch-up) + the LISTEN session */
    struct on_hub *hub;
    struct on_leader *leader;
    int stopping;      /* from the first stop signal on: new streams are refused */
    char instance[40]; /* this process, for sync markers and logs: "<host>:<pid>:<rand>" */
} on_app_t;

/* Wall clock in seconds (event timestamps come from Postgres' clock_timestamp()). */
double on_now(void);

#endif
