/*
 * order-notifier: Postgres LISTEN/NOTIFY -> Redis pub/sub -> WebSocket and SSE clients
 * (docs/asyncapi.yaml).
 *
 * One libuv loop. Wiring: cm_pg (pool + LISTEN session) feeds the leader (leader.c), which
 * publishes to Redis; every replica's hub (hub.c) subscribes per connected user and writes to
 * the sockets (client.c). SIGTERM/SIGINT: stop accepting, close sockets with 1001, release the
 * leader lock, exit 0. SIGHUP: LOG_LEVEL from CONFIG_FILE.
 */
#include "app.h"
#include "channel_check.h"
#include "client.h"
#include "config.h"
#include "dashboard.h"
#include "hub.h"
#include "leader.h"

#include "cm/alloc.h"
#include "cm/error.h"
#include "cm/json.h"
#include "cm/log.h"
#include "cm/service.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

const char *on_version(void);

#define SHUTDOWN_DEADLINE_MS 5000

/* The process: the modules' shared state and what only main.c uses. */
typedef struct notifier {
    on_app_t app;
    cm_service_t *svc;
    on_channel_check_t *chan_check; /* PG_CHANNEL against markets.order_channel */
    int bad_listen; /* start() could not listen on ORDER_NOTIFIER_LISTEN for a reason of
                       configuration */
    cm_metric_t *m_pg_reconnects; /* mirrored from the pool's stats at scrape time */
    double seen_pg_reconnects;
} notifier_t;

/* ---- HTTP endpoints ----------------------------------------------------------------------- */

static void handle_dashboard(cm_http_request_t *req, void *ud)
{
    (void)ud;
    cm_http_respond(req, 200, "text/html; charset=utf-8",
                    "Cache-Control: no-cache\r\nX-Content-Type-Options: nosniff\r\n",
                    on_dashboard_html, on_dashboard_html_len);
}

/* Ready when this replica can do its job: LISTEN session up (leading or standing by) on the
 * channel the trigger notifies, both Redis links up, and not refusing to lead: a replica behind
 * a transaction-mode pooler could never take over, so it must not count as a healthy standby. */
static int ready(cJSON *j, void *ud)
{
    notifier_t *n = ud;
    on_app_t *app = &n->app;
    int listen = app->leader && on_leader_listen_up(app->leader);
    int redis = cm_redis_is_up(app->redis_pub) && cm_redis_is_up(app->redis_sub);
    const char *channel_problem = on_channel_check_problem(n->chan_check);
    const char *refused = app->leader ? on_leader_refusal(app->leader) : NULL;
    cJSON_AddStringToObject(j, "role", on_leader_is_leader(app->leader) ? "leader" : "standby");
    cJSON_AddStringToObject(j, "postgres", listen ? "up" : "down");
    cJSON_AddStringToObject(j, "redis", redis ? "up" : "down");
    if (refused)
        cJSON_AddStringToObject(j, "reason", refused);
    else if (channel_problem)
        cJSON_AddStringToObject(j, "reason", channel_problem);
    return listen && redis && !channel_problem && !refused;
}

static cm_redis_t *health_redis(void *ud)
{
    notifier_t *n = ud;
    return n->app.redis_pub;
}

static void on_scrape(void *ud)
{
    notifier_t *n = ud;
    cm_pg_stats_t p;
    cm_pg_stats(n->app.pg, &p);
    if ((double)p.reconnects > n->seen_pg_reconnects)
        cm_counter_add(n->m_pg_reconnects, (double)p.reconnects - n->seen_pg_reconnects);
    n->seen_pg_reconnects = (double)p.reconnects;
}

/* ---- metrics ------------------------------------------------------------------------------ */

static double ws_connections(void *ud)
{
    on_app_t *app = ud;
    return app->hub ? (double)on_hub_clients(app->hub) : 0;
}

static double redis_up(void *ud)
{
    on_app_t *app = ud;
    return app->redis_pub && cm_redis_is_up(app->redis_pub) && app->redis_sub &&
                   cm_redis_is_up(app->redis_sub)
               ? 1
               : 0;
}

static int setup_metrics(notifier_t *n)
{
    static const double delivery_bounds[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                             0.1,    0.25,  0.5,    1,     2.5,  5,     10};
    cm_metrics_t *r = n->app.registry = cm_service_metrics(n->svc);
    on_metrics_t *m = &n->app.m;
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
                                             NULL, ws_connections, &n->app);
    cm_metric_t *up = cm_metrics_gauge_fn(r, "redis_up", "1 while both Redis links are up.", NULL,
                                          redis_up, &n->app);
    n->m_pg_reconnects = cm_metrics_counter(
        r, "pg_reconnects_total", "Postgres reconnections after a lost connection.", NULL);
    if (!m->ws_messages_sent || !m->ws_slow_closes || !m->events_received || !m->events_published ||
        !m->delivery_seconds || !m->pg_listener_up || !m->leader || !m->ws_rejected ||
        !m->resumes || !m->redis_replays || !conns || !up || !n->m_pg_reconnects)
        return UV_ENOMEM;
    return 0;
}

/* ---- client callbacks --------------------------------------------------------------------- */

static void pub_state(cm_redis_t *r, int up, const char *error, void *ud)
{
    (void)r;
    on_app_t *app = ud;
    if (up) {
        cm_log_info("redis publish link up", NULL);
        if (app->leader)
            on_leader_redis_up(app->leader);
    } else {
        cm_log_warn("redis publish link down", "error", error, NULL);
    }
}

static void sub_state(cm_redis_t *r, int up, const char *error, void *ud)
{
    (void)r;
    on_app_t *app = ud;
    if (up)
        cm_log_info("redis subscribe link up", NULL);
    else
        cm_log_warn("redis subscribe link down", "error", error, NULL);
    if (app->hub)
        on_hub_redis_state(app->hub, up);
}

static void pg_notify(cm_pg_t *pg, const char *channel, const char *payload, int be_pid, void *ud)
{
    (void)pg;
    notifier_t *n = ud;
    on_leader_t *l = n->app.leader;
    if (l && !on_leader_probe_notify(l, channel, payload, be_pid))
        on_leader_notify(l, channel, payload);
}

static void pg_state(cm_pg_t *pg, int listen, int up, const char *error, void *ud)
{
    (void)pg;
    notifier_t *n = ud;
    if (listen) {
        if (up)
            cm_log_info("postgres LISTEN session up", NULL);
        else
            cm_log_warn("postgres LISTEN session down", "error", error, NULL);
        if (n->app.leader)
            on_leader_listen_state(n->app.leader, up);
        if (up)
            on_channel_check_run(n->chan_check);
    } else if (up) {
        cm_log_info("postgres pool up", NULL);
    } else {
        cm_log_warn("postgres pool down", "error", error, NULL);
    }
}

/* ---- shutdown ----------------------------------------------------------------------------- */

static void hub_closed(void *ud)
{
    notifier_t *n = ud;
    n->app.hub = NULL;
    on_channel_check_close(n->chan_check);
    cm_redis_close(n->app.redis_pub, NULL, NULL);
    cm_redis_close(n->app.redis_sub, NULL, NULL);
    cm_pg_close(n->app.pg, NULL, NULL);
    cm_service_close(n->svc);
}

static void leader_stopped(void *ud)
{
    notifier_t *n = ud;
    n->app.leader = NULL;
    on_hub_close(n->app.hub, hub_closed, n);
}

static void http_stopped(void *ud)
{
    notifier_t *n = ud;
    on_leader_stop(n->app.leader, leader_stopped, n);
}

static void on_stop(int signum, void *ud)
{
    (void)signum;
    notifier_t *n = ud;
    n->app.stopping = 1;
    cm_log_info("shutting down: closing WebSocket clients with 1001", NULL);
    on_hub_close_all(n->app.hub, ON_WS_CLOSE_GOING_AWAY);
}

static void on_reload(const char *config_file, void *ud)
{
    notifier_t *n = ud;
    if (!config_file) {
        cm_log_info("SIGHUP: no CONFIG_FILE to reload", NULL);
        return;
    }
    char err[CM_CONFIG_ERROR_MAX];
    if (on_config_reload(config_file, &n->app.cfg, err, sizeof err) != 0) {
        cm_log_error("SIGHUP: reload failed, keeping the old settings", "error", err, NULL);
        return;
    }
    cm_log_set_level(n->app.cfg.svc.log_level);
    cm_log_info("SIGHUP: reloaded", "log_level", cm_log_level_name(n->app.cfg.svc.log_level), NULL);
}

/* ---- main --------------------------------------------------------------------------------- */

static void usage(FILE *out)
{
    fprintf(out, "usage: order-notifier [--help] [--version]\n"
                 "\n"
                 "Postgres LISTEN/NOTIFY -> Redis pub/sub -> WebSocket (GET /ws/orders) and\n"
                 "Server-Sent Events (GET /sse/orders), with a live dashboard at GET /.\n"
                 "Configured by environment variables (docs/CONFIGURATION.md):\n"
                 "  APP_ENV, ORDER_NOTIFIER_LISTEN (0.0.0.0:8081), REDIS_URL, DATABASE_URL,\n"
                 "  REDIS_SENTINELS (host:port,...), REDIS_SENTINEL_MASTER,\n"
                 "  REDIS_SENTINEL_PASSWORD,\n"
                 "  PG_CHANNEL (order_events), JWT_SECRET, WS_ALLOWED_ORIGINS (*),\n"
                 "  WS_MAX_CONNECTIONS (10000), WS_SEND_QUEUE_MAX_BYTES (1048576),\n"
                 "  WS_PING_INTERVAL_MS (25000), REDIS_TIMEOUT_MS (100), LOG_LEVEL, LOG_FORMAT,\n"
                 "  CONFIG_FILE (LOG_LEVEL reloaded on SIGHUP), NOTIFIER_LOCK_KEY (7210100),\n"
                 "  NOTIFIER_LOCK_RETRY_MS (1000), NOTIFIER_LIVENESS_MS (2000),\n"
                 "  NOTIFIER_CATCHUP_LOOKBACK_MS (30000), NOTIFIER_PG_POOL_SIZE (4).\n"
                 "Exit status: 0 after a clean shutdown, 1 on a runtime failure, 2 on bad\n"
                 "configuration.\n");
}

static int start(notifier_t *n)
{
    on_app_t *app = &n->app;
    app->loop = uv_default_loop();
    snprintf(app->instance, sizeof app->instance, "%ld:%ld", (long)getpid(),
             (long)(on_now() * 1000) % 100000000);
    cm_service_config_t sc = {
        .name = "order-notifier",
        .settings = &app->cfg.svc,
        /* Above the WebSocket limit so /metrics and health stay reachable at it. */
        .max_connections = (size_t)app->cfg.ws_max_connections + 64,
        .stop_deadline_ms = SHUTDOWN_DEADLINE_MS,
        .ready = ready,
        .not_ready = "unavailable",
        .health_redis = health_redis,
        .on_scrape = on_scrape,
        .oom_code = "out_of_memory",
        .on_stop = on_stop,
        .on_stopped = http_stopped,
        .on_reload = on_reload,
        .ud = n,
    };
    int rv = cm_service_new(app->loop, &sc, &n->svc);
    if (rv != 0)
        return rv;
    if (app->cfg.jwt_secret_is_dev)
        cm_log_warn("JWT_SECRET is not set: using the fixed development secret", NULL);
    if (app->cfg.warning[0])
        cm_log_warn("questionable configuration", "detail", app->cfg.warning, NULL);
    if ((rv = setup_metrics(n)) != 0)
        return rv;

    cm_redis_config_t rc;
    cm_redis_config_defaults(&rc);
    cm_redis_settings_apply(&app->cfg.svc.redis, &rc);
    rc.timeout_ms = (uint64_t)app->cfg.svc.redis_timeout_ms;
    rc.on_state = pub_state;
    rc.ud = app;
    rc.name = "publish";
    if ((rv = cm_redis_open(app->loop, &rc, &app->redis_pub)) != 0 ||
        (rv = cm_service_mirror_redis(n->svc, app->redis_pub)) != 0)
        return rv;
    rc.on_state = sub_state;
    rc.name = "subscribe";
    if ((rv = cm_redis_open(app->loop, &rc, &app->redis_sub)) != 0 ||
        (rv = cm_service_mirror_redis(n->svc, app->redis_sub)) != 0)
        return rv;

    cm_pg_config_t pc;
    cm_pg_config_defaults(&pc);
    pc.conninfo = app->cfg.svc.database_url;
    pc.pool_size = (int)app->cfg.pg_pool_size;
    pc.application_name = "order-notifier";
    pc.on_notify = pg_notify;
    pc.on_state = pg_state;
    pc.ud = n;
    if ((rv = cm_pg_open(app->loop, &pc, &app->pg)) != 0 ||
        (rv = on_channel_check_new(app->loop, app->pg, app->cfg.pg_channel, &n->chan_check)) != 0)
        return rv;
    if ((rv = on_hub_new(app, &app->hub)) != 0 || (rv = on_leader_new(app, &app->leader)) != 0)
        return rv;

    if ((rv = cm_service_route(n->svc, CM_ROUTE_GET, "/", handle_dashboard, NULL)) != 0 ||
        (rv = cm_service_route(n->svc, CM_ROUTE_GET, "/sse/orders", on_client_handle_sse, app)) !=
            0 ||
        (rv = cm_service_route(n->svc, CM_ROUTE_GET, "/ws/orders", on_client_handle_upgrade,
                               app)) != 0)
        return rv;

    if ((rv = cm_service_start(n->svc)) != 0) {
        cm_log_error("cannot listen", "address", app->cfg.svc.listen_host, "error", uv_strerror(rv),
                     NULL);
        fprintf(stderr, "order-notifier: cannot listen: %s (ORDER_NOTIFIER_LISTEN=%s:%d)\n",
                uv_strerror(rv), app->cfg.svc.listen_host, app->cfg.svc.listen_port);
        /* A busy port is the machine's state; an address that cannot be used is bad config. */
        n->bad_listen = rv != UV_EADDRINUSE && rv != UV_ENOMEM;
        return rv;
    }
    char port[8];
    snprintf(port, sizeof port, "%d", cm_service_port(n->svc));
    cm_log_info("listening", "host", app->cfg.svc.listen_host, "port", port, "channel",
                app->cfg.pg_channel, "version", on_version(), NULL);
    return 0;
}

/* Unwinds what a failed start() opened so the loop can close. */
static void unwind(notifier_t *n)
{
    on_app_t *app = &n->app;
    if (app->hub)
        on_hub_close(app->hub, NULL, NULL);
    if (app->leader)
        on_leader_stop(app->leader, NULL, NULL);
    on_channel_check_close(n->chan_check);
    if (app->redis_pub)
        cm_redis_close(app->redis_pub, NULL, NULL);
    if (app->redis_sub)
        cm_redis_close(app->redis_sub, NULL, NULL);
    if (app->pg)
        cm_pg_close(app->pg, NULL, NULL);
}

int main(int argc, char **argv)
{
    cm_json_init();
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

    notifier_t n = {0};
    cm_config_t c;
    cm_config_init_env(&c);
    int rc = cm_config_use_file(&c, on_config_reloadable);
    if (rc == 0)
        rc = on_config_load(&c, &n.app.cfg);
    if (rc != 0) {
        fprintf(stderr, "order-notifier: %s\n", c.error);
        on_config_free(&n.app.cfg);
        cm_config_release(&c);
        return 2;
    }
    rc = start(&n);
    int status = 0;
    if (rc != 0) {
        cm_log_error("startup failed", "error", uv_strerror(rc), NULL);
        status = n.bad_listen ? 2 : 1;
        unwind(&n);
    }
    uv_run(n.app.loop, UV_RUN_DEFAULT);
    if (uv_loop_close(n.app.loop) != 0)
        cm_log_warn("loop closed with handles still open", NULL);
    cm_log_info("stopped", NULL);
    cm_service_free(n.svc);
    on_config_free(&n.app.cfg);
    cm_config_release(&c);
    return status;
}
