/*
 * order-notifier: Postgres LISTEN/NOTIFY -> Redis pub/sub -> WebSocket clients (CONTRACT.md).
 *
 * One libuv loop. Wiring: cm_pg (pool + LISTEN session) feeds the leader (leader.c), which
 * publishes to Redis; every replica's hub (hub.c) subscribes per connected user and writes to
 * the sockets (client.c). SIGTERM/SIGINT: stop accepting, close sockets with 1001, release the
 * leader lock, exit 0. SIGHUP: LOG_LEVEL from CONFIG_FILE.
 */
#include "app.h"
#include "client.h"
#include "config.h"
#include "dashboard.h"
#include "hub.h"
#include "leader.h"

#include "cm/alloc.h"
#include "cm/log.h"
#include "cm/router.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

const char *on_version(void);

#define SHUTDOWN_DEADLINE_MS 5000

static on_app_t app;
/* start() could not listen on ORDER_NOTIFIER_LISTEN for a reason of configuration. */
static int bad_listen;
static uv_signal_t sig_term, sig_int, sig_hup;
static cm_router_t *router;
static int pending_closes;

/* Counters mirrored from the clients' stats at scrape time. */
static cm_metric_t *m_redis_reconnects, *m_redis_timeouts, *m_pg_reconnects;
static double seen_redis_reconnects, seen_redis_timeouts, seen_pg_reconnects;

/* ---- HTTP endpoints ----------------------------------------------------------------------- */

static void handle_dashboard(cm_http_request_t *req, void *ud)
{
    (void)ud;
    cm_http_respond(req, 200, "text/html; charset=utf-8",
                    "Cache-Control: no-cache\r\nX-Content-Type-Options: nosniff\r\n",
                    on_dashboard_html, on_dashboard_html_len);
}

static void handle_healthz(cm_http_request_t *req, void *ud)
{
    (void)ud;
    static const char body[] = "{\"status\":\"ok\"}";
    cm_http_respond(req, 200, "application/json", "Cache-Control: no-store\r\n", body,
                    sizeof body - 1);
}

static void respond_json(cm_http_request_t *req, int status, cJSON *j)
{
    char *s = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    if (!s) {
        cm_http_respond_error(req, 500, "out_of_memory", "out of memory", NULL);
        return;
    }
    cm_http_respond(req, status, "application/json", "Cache-Control: no-store\r\n", s, strlen(s));
    cJSON_free(s);
}

/* Ready when this replica can do its job: LISTEN session up (leading or standing by) and both
 * Redis links up. */
static void handle_readyz(cm_http_request_t *req, void *ud)
{
    (void)ud;
    int listen = app.leader && on_leader_listen_up(app.leader);
    int redis = cm_redis_is_up(app.redis_pub) && cm_redis_is_up(app.redis_sub);
    int ready = listen && redis && !app.stopping;
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "status", ready ? "ready" : "unavailable");
    cJSON_AddStringToObject(j, "role", on_leader_is_leader(app.leader) ? "leader" : "standby");
    cJSON_AddStringToObject(j, "postgres", listen ? "up" : "down");
    cJSON_AddStringToObject(j, "redis", redis ? "up" : "down");
    respond_json(req, ready ? 200 : 503, j);
}

static void redis_ping_done(cm_redis_t *r, int status, double latency_ms, void *ud)
{
    (void)r;
    cm_http_request_t *req = ud;
    cJSON *j = cJSON_CreateObject();
    if (status == CM_REDIS_OK) {
        cJSON_AddStringToObject(j, "status", "ok");
        cJSON_AddStringToObject(j, "redis", "up");
        cJSON_AddNumberToObject(j, "latency_ms", (double)(long)(latency_ms * 1000) / 1000.0);
        respond_json(req, 200, j);
    } else {
        cJSON_AddStringToObject(j, "status", "unavailable");
        cJSON_AddStringToObject(j, "redis", "down");
        cJSON_AddStringToObject(j, "error", uv_strerror(status));
        respond_json(req, 503, j);
    }
}

static void handle_redis_health(cm_http_request_t *req, void *ud)
{
    (void)ud;
    int rc = cm_redis_ping(app.redis_pub, redis_ping_done, req);
    if (rc != 0) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "status", "unavailable");
        cJSON_AddStringToObject(j, "redis", "down");
        cJSON_AddStringToObject(j, "error", uv_strerror(rc));
        respond_json(req, 503, j);
    }
}

static void mirror(cm_metric_t *m, double *seen, double now)
{
    if (now > *seen)
        cm_counter_add(m, now - *seen);
    *seen = now;
}

static void handle_metrics(cm_http_request_t *req, void *ud)
{
    (void)ud;
    cm_redis_stats_t a, b;
    cm_redis_stats(app.redis_pub, &a);
    cm_redis_stats(app.redis_sub, &b);
    mirror(m_redis_reconnects, &seen_redis_reconnects, (double)(a.reconnects + b.reconnects));
    mirror(m_redis_timeouts, &seen_redis_timeouts, (double)(a.timeouts + b.timeouts));
    cm_pg_stats_t p;
    cm_pg_stats(app.pg, &p);
    mirror(m_pg_reconnects, &seen_pg_reconnects, (double)p.reconnects);
    cm_buf_t out = CM_BUF_INIT;
    if (cm_metrics_render(app.registry, &out) != 0) {
        cm_buf_free(&out);
        cm_http_respond_error(req, 500, "out_of_memory", "out of memory", NULL);
        return;
    }
    cm_http_respond(req, 200, CM_METRICS_CONTENT_TYPE, NULL, out.data, out.len);
    cm_buf_free(&out);
}

static void observe_http(const cm_http_request_t *req, int status, double seconds, void *ud)
{
    (void)ud;
    char labels[256], code[8];
    snprintf(code, sizeof code, "%d", status);
    if (cm_metrics_labels(labels, sizeof labels, "route", req->route, "code", code, NULL) < 0)
        return;
    cm_metric_t *c = cm_metrics_counter(app.registry, "http_requests_total",
                                        "HTTP requests by route and status code.", labels);
    if (c)
        cm_counter_inc(c);
    if (cm_metrics_labels(labels, sizeof labels, "route", req->route, NULL) < 0)
        return;
    cm_metric_t *h =
        cm_metrics_histogram(app.registry, "http_request_duration_seconds",
                             "HTTP request duration until the response is queued.", labels,
                             cm_metrics_latency_bounds, cm_metrics_latency_nbounds);
    if (h)
        cm_histogram_observe(h, seconds);
}

/* ---- metrics ------------------------------------------------------------------------------ */

static double ws_connections(void *ud)
{
    (void)ud;
    return app.hub ? (double)on_hub_clients(app.hub) : 0;
}

static double redis_up(void *ud)
{
    (void)ud;
    return app.redis_pub && cm_redis_is_up(app.redis_pub) && app.redis_sub &&
                   cm_redis_is_up(app.redis_sub)
               ? 1
               : 0;
}

static int setup_metrics(void)
{
    static const double delivery_bounds[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                             0.1,    0.25,  0.5,    1,     2.5,  5,     10};
    cm_metrics_t *r = app.registry = cm_metrics_new();
    if (!r)
        return UV_ENOMEM;
    on_metrics_t *m = &app.m;
    m->ws_messages_sent = cm_metrics_counter(r, "ws_messages_sent_total",
                                             "Event frames written to WebSocket clients.", NULL);
    m->ws_slow_closes = cm_metrics_counter(r, "ws_slow_consumer_closes_total",
                                           "Clients closed with 1013 for a full send queue.", NULL);
    m->events_received =
        cm_metrics_counter(r, "order_events_received_total",
                           "Order events read by the leader (NOTIFY or catch-up).", NULL);
    m->events_published = cm_metrics_counter(
        r, "order_events_published_total", "Order events published to Redis by the leader.", NULL);
    m->delivery_seconds = cm_metrics_histogram(
        r, "order_event_delivery_seconds",
        "Time from the event's commit-side timestamp to the WebSocket write.", NULL,
        delivery_bounds, sizeof delivery_bounds / sizeof *delivery_bounds);
    m->pg_listener_up =
        cm_metrics_gauge(r, "pg_listener_up", "1 while the Postgres LISTEN session is up.", NULL);
    m->leader = cm_metrics_gauge(r, "notifier_leader",
                                 "1 while this replica holds the leader lock and publishes.", NULL);
    m->ws_rejected =
        cm_metrics_counter(r, "ws_handshakes_rejected_total",
                           "WebSocket upgrade requests refused before the upgrade.", NULL);
    m->resumes = cm_metrics_counter(r, "ws_resumes_total",
                                    "Connections that resumed with last_event_id.", NULL);
    m->redis_replays =
        cm_metrics_counter(r, "order_events_replayed_total",
                           "Outbox rows replayed to local clients after a Redis reconnect.", NULL);
    cm_metric_t *conns = cm_metrics_gauge_fn(r, "ws_connections", "Open WebSocket connections.",
                                             NULL, ws_connections, NULL);
    cm_metric_t *up = cm_metrics_gauge_fn(r, "redis_up", "1 while both Redis links are up.", NULL,
                                          redis_up, NULL);
    m_redis_reconnects = cm_metrics_counter(r, "redis_reconnects_total",
                                            "Redis reconnections after a lost link.", NULL);
    m_redis_timeouts =
        cm_metrics_counter(r, "redis_command_timeouts_total",
                           "Redis commands not answered within REDIS_TIMEOUT_MS.", NULL);
    m_pg_reconnects = cm_metrics_counter(r, "pg_reconnects_total",
                                         "Postgres reconnections after a lost connection.", NULL);
    if (!m->ws_messages_sent || !m->ws_slow_closes || !m->events_received || !m->events_published ||
        !m->delivery_seconds || !m->pg_listener_up || !m->leader || !m->ws_rejected ||
        !m->resumes || !m->redis_replays || !conns || !up || !m_redis_reconnects ||
        !m_redis_timeouts || !m_pg_reconnects)
        return UV_ENOMEM;
    return 0;
}

/* ---- client callbacks --------------------------------------------------------------------- */

static void pub_state(cm_redis_t *r, int up, const char *error, void *ud)
{
    (void)r;
    (void)ud;
    if (up) {
        cm_log_info("redis publish link up", NULL);
        if (app.leader)
            on_leader_redis_up(app.leader);
    } else {
        cm_log_warn("redis publish link down", "error", error, NULL);
    }
}

static void sub_state(cm_redis_t *r, int up, const char *error, void *ud)
{
    (void)r;
    (void)ud;
    if (up)
        cm_log_info("redis subscribe link up", NULL);
    else
        cm_log_warn("redis subscribe link down", "error", error, NULL);
    if (app.hub)
        on_hub_redis_state(app.hub, up);
}

static void pg_notify(cm_pg_t *pg, const char *channel, const char *payload, int be_pid, void *ud)
{
    (void)pg;
    (void)be_pid;
    (void)ud;
    if (app.leader)
        on_leader_notify(app.leader, channel, payload);
}

static void pg_state(cm_pg_t *pg, int listen, int up, const char *error, void *ud)
{
    (void)pg;
    (void)ud;
    if (listen) {
        if (up)
            cm_log_info("postgres LISTEN session up", NULL);
        else
            cm_log_warn("postgres LISTEN session down", "error", error, NULL);
        if (app.leader)
            on_leader_listen_state(app.leader, up);
    } else if (up) {
        cm_log_info("postgres pool up", NULL);
    } else {
        cm_log_warn("postgres pool down", "error", error, NULL);
    }
}

/* ---- shutdown ----------------------------------------------------------------------------- */

static void closed_one(void *ud)
{
    (void)ud;
    pending_closes--;
}

static void signal_closed(uv_handle_t *h)
{
    (void)h;
}

static void hub_closed(void *ud)
{
    (void)ud;
    app.hub = NULL;
    cm_redis_close(app.redis_pub, closed_one, NULL);
    cm_redis_close(app.redis_sub, closed_one, NULL);
    cm_pg_close(app.pg, closed_one, NULL);
    pending_closes += 3;
    uv_close((uv_handle_t *)&sig_term, signal_closed);
    uv_close((uv_handle_t *)&sig_int, signal_closed);
    uv_close((uv_handle_t *)&sig_hup, signal_closed);
}

static void leader_stopped(void *ud)
{
    (void)ud;
    app.leader = NULL;
    on_hub_close(app.hub, hub_closed, NULL);
}

static void http_stopped(void *ud)
{
    (void)ud;
    app.http = NULL;
    on_leader_stop(app.leader, leader_stopped, NULL);
}

static void shutdown_now(void)
{
    if (app.stopping)
        return;
    app.stopping = 1;
    cm_log_info("shutting down: closing WebSocket clients with 1001", NULL);
    on_hub_close_all(app.hub, ON_WS_CLOSE_GOING_AWAY);
    cm_http_server_stop(app.http, SHUTDOWN_DEADLINE_MS, http_stopped, NULL);
}

static void on_signal(uv_signal_t *s, int signum)
{
    (void)s;
    if (signum == SIGHUP) {
        if (!app.cfg.config_file) {
            cm_log_info("SIGHUP: no CONFIG_FILE to reload", NULL);
            return;
        }
        char err[256];
        if (on_config_reload(app.cfg.config_file, &app.cfg, err, sizeof err) != 0) {
            cm_log_error("SIGHUP: reload failed, keeping the old settings", "error", err, NULL);
            return;
        }
        cm_log_set_level(app.cfg.log_level);
        cm_log_info("SIGHUP: reloaded", "log_level", cm_log_level_name(app.cfg.log_level), NULL);
        return;
    }
    shutdown_now();
}

/* ---- main --------------------------------------------------------------------------------- */

static void usage(FILE *out)
{
    fprintf(out, "usage: order-notifier [--help] [--version]\n"
                 "\n"
                 "Postgres LISTEN/NOTIFY -> Redis pub/sub -> WebSocket (GET /ws/orders), with a\n"
                 "live dashboard at GET /. Configured by environment variables:\n"
                 "  APP_ENV, ORDER_NOTIFIER_LISTEN (0.0.0.0:8081), REDIS_URL, DATABASE_URL,\n"
                 "  PG_CHANNEL (order_events), JWT_SECRET, WS_ALLOWED_ORIGINS (*),\n"
                 "  WS_MAX_CONNECTIONS (10000), WS_SEND_QUEUE_MAX_BYTES (1048576),\n"
                 "  WS_PING_INTERVAL_MS (25000), REDIS_TIMEOUT_MS (100), LOG_LEVEL, LOG_FORMAT,\n"
                 "  CONFIG_FILE (LOG_LEVEL reloaded on SIGHUP), NOTIFIER_LOCK_KEY,\n"
                 "  NOTIFIER_LOCK_RETRY_MS (1000), NOTIFIER_LIVENESS_MS (2000),\n"
                 "  NOTIFIER_CATCHUP_LOOKBACK_MS (30000), NOTIFIER_PG_POOL_SIZE (4).\n"
                 "Exit status: 0 after a clean shutdown, 1 on a runtime failure, 2 on bad\n"
                 "configuration.\n");
}

static int start(void)
{
    app.loop = uv_default_loop();
    snprintf(app.instance, sizeof app.instance, "%ld:%ld", (long)getpid(),
             (long)(on_now() * 1000) % 100000000);
    if (setup_metrics() != 0)
        return UV_ENOMEM;

    cm_redis_config_t rc;
    cm_redis_config_defaults(&rc);
    rc.url = app.cfg.redis_url;
    rc.timeout_ms = (uint64_t)app.cfg.redis_timeout_ms;
    rc.on_state = pub_state;
    rc.name = "publish";
    int rv = cm_redis_open(app.loop, &rc, &app.redis_pub);
    if (rv != 0)
        return rv;
    rc.on_state = sub_state;
    rc.name = "subscribe";
    if ((rv = cm_redis_open(app.loop, &rc, &app.redis_sub)) != 0)
        return rv;

    cm_pg_config_t pc;
    cm_pg_config_defaults(&pc);
    pc.conninfo = app.cfg.database_url;
    pc.pool_size = (int)app.cfg.pg_pool_size;
    pc.application_name = "order-notifier";
    pc.on_notify = pg_notify;
    pc.on_state = pg_state;
    if ((rv = cm_pg_open(app.loop, &pc, &app.pg)) != 0)
        return rv;
    if ((rv = on_hub_new(&app, &app.hub)) != 0 || (rv = on_leader_new(&app, &app.leader)) != 0)
        return rv;

    router = cm_router_new();
    if (!router)
        return UV_ENOMEM;
    if ((rv = cm_router_add(router, CM_ROUTE_GET, "/", handle_dashboard, NULL)) != 0 ||
        (rv = cm_router_add(router, CM_ROUTE_GET, "/ws/orders", on_client_handle_upgrade, &app)) !=
            0 ||
        (rv = cm_router_add(router, CM_ROUTE_GET, "/healthz", handle_healthz, NULL)) != 0 ||
        (rv = cm_router_add(router, CM_ROUTE_GET, "/readyz", handle_readyz, NULL)) != 0 ||
        (rv = cm_router_add(router, CM_ROUTE_GET, "/api/health/redis", handle_redis_health,
                            NULL)) != 0 ||
        (rv = cm_router_add(router, CM_ROUTE_GET, "/metrics", handle_metrics, NULL)) != 0)
        return rv;

    cm_http_config_t hc;
    cm_http_config_defaults(&hc);
    hc.host = app.cfg.listen_host;
    hc.port = app.cfg.listen_port;
    /* Above the WebSocket limit so /metrics and health stay reachable at it. */
    hc.max_connections = (size_t)app.cfg.ws_max_connections + 64;
    hc.handler = cm_router_dispatch;
    hc.handler_ud = router;
    hc.observe = observe_http;
    hc.server_header = "order-notifier";
    if ((rv = cm_http_server_start(app.loop, &hc, &app.http)) != 0) {
        cm_log_error("cannot listen", "address", app.cfg.listen_host, "error", uv_strerror(rv),
                     NULL);
        fprintf(stderr, "order-notifier: cannot listen: %s (ORDER_NOTIFIER_LISTEN=%s:%d)\n",
                uv_strerror(rv), app.cfg.listen_host, app.cfg.listen_port);
        /* A busy port is the machine's state; an address that cannot be used is bad config. */
        bad_listen = rv != UV_EADDRINUSE && rv != UV_ENOMEM;
        return rv;
    }
    char port[8];
    snprintf(port, sizeof port, "%d", cm_http_server_port(app.http));
    cm_log_info("listening", "host", app.cfg.listen_host, "port", port, "channel",
                app.cfg.pg_channel, "version", on_version(), NULL);

    uv_signal_init(app.loop, &sig_term);
    uv_signal_init(app.loop, &sig_int);
    uv_signal_init(app.loop, &sig_hup);
    uv_signal_start(&sig_term, on_signal, SIGTERM);
    uv_signal_start(&sig_int, on_signal, SIGINT);
    uv_signal_start(&sig_hup, on_signal, SIGHUP);
    return 0;
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            return 0;
        }
        if (strcmp(argv[i], "--version") == 0) {
            printf("order-notifier %s\n", on_version());
            return 0;
        }
        fprintf(stderr, "order-notifier: unknown argument '%s' (try --help)\n", argv[i]);
        return 2;
    }

    cm_config_t c;
    cm_config_init_env(&c);
    int rc = cm_config_use_file(&c, on_config_reloadable);
    if (rc == 0)
        rc = on_config_load(&c, &app.cfg);
    if (rc != 0) {
        fprintf(stderr, "order-notifier: %s\n", c.error);
        on_config_free(&app.cfg);
        cm_config_release(&c);
        return 2;
    }
    cm_log_init("order-notifier", app.cfg.log_level, app.cfg.log_format);
    if (app.cfg.jwt_secret_is_dev)
        cm_log_warn("JWT_SECRET is not set: using the fixed development secret", NULL);

    rc = start();
    int status = 0;
    if (rc != 0) {
        cm_log_error("startup failed", "error", uv_strerror(rc), NULL);
        status = bad_listen ? 2 : 1;
        /* Unwind what started so the loop can close. */
        if (app.http)
            shutdown_now();
        else {
            if (app.hub)
                on_hub_close(app.hub, NULL, NULL);
            if (app.leader)
                on_leader_stop(app.leader, NULL, NULL);
            if (app.redis_pub)
                cm_redis_close(app.redis_pub, NULL, NULL);
            if (app.redis_sub)
                cm_redis_close(app.redis_sub, NULL, NULL);
            if (app.pg)
                cm_pg_close(app.pg, NULL, NULL);
        }
    }
    uv_run(app.loop, UV_RUN_DEFAULT);
    if (uv_loop_close(app.loop) != 0)
        cm_log_warn("loop closed with handles still open", NULL);
    cm_log_info("stopped", NULL);
    cm_router_free(router);
    cm_metrics_free(app.registry);
    on_config_free(&app.cfg);
    cm_config_release(&c);
    return status;
}
