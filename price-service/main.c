/*
 * price-service: oracle prices over HTTP, cached cache-aside in Redis (CONTRACT.md).
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "app.h"
#include "cm/alloc.h"
#include "cm/log.h"

/* Time SIGTERM gives in-flight requests before they are cancelled (the contract: exit
 * within 10 s). */
#define PS_DRAIN_MS 7000

static const char USAGE[] =
    "Usage: price-service [--help] [--version]\n"
    "\n"
    "Serves GET /api/markets/price?market=<id> and /api/markets/prices?markets=A,B from the\n"
    "oracle_prices table in Postgres, cached cache-aside in Redis. Configured by environment:\n"
    "  APP_ENV               development | production (production: URLs must be set)\n"
    "  PRICE_SERVICE_LISTEN  host:port to listen on              [0.0.0.0:8080]\n"
    "  REDIS_URL             redis://[user:pass@]host[:port][/db] [redis://127.0.0.1:6379/0]\n"
    "  DATABASE_URL          libpq URI or key=value string\n"
    "                        [postgresql://postgres@127.0.0.1:5432/markets]\n"
    "  CACHE_ENABLED         true | false                        [true]\n"
    "  CACHE_TTL_MS          cache entry lifetime, 1..60000      [1000]\n"
    "  CACHE_MEMORY_ENABLED  keep in-process copies until the Redis entry expires [true]\n"
    "  REDIS_TIMEOUT_MS      Redis command deadline              [100]\n"
    "  ORIGIN_TIMEOUT_MS     origin query deadline               [2000]\n"
    "  ORIGIN_POOL_SIZE      Postgres connections, 1..64         [4]\n"
    "  LOG_LEVEL             debug | info | warn | error         [info]\n"
    "  LOG_FORMAT            json | text                         [json]\n"
    "  CONFIG_FILE           KEY=VALUE file for CACHE_ENABLED, CACHE_TTL_MS,\n"
    "                        CACHE_MEMORY_ENABLED, LOG_LEVEL; re-read on SIGHUP\n"
    "Signals: SIGTERM/SIGINT drain and exit 0; SIGHUP reloads CONFIG_FILE.\n";

ps_cache_settings_t ps_app_cache_settings(const ps_app_t *app)
{
    return (ps_cache_settings_t){app->cfg.cache_enabled, (uint64_t)app->cfg.cache_ttl_ms,
                                 app->cfg.cache_memory, 100000};
}

/* ---- state changes of the dependencies: logged once per transition ------------------- */

static void on_redis_state(cm_redis_t *r, int up, const char *error, void *ud)
{
    (void)r;
    ps_app_t *app = ud;
    cm_gauge_set(app->m_redis_up, up);
    if (up)
        cm_log_info("redis available; caching resumes", NULL);
    else
        cm_log_error("redis unavailable; answering from the origin", "error", error, NULL);
}

static void on_pg_state(cm_pg_t *pg, int listen, int up, const char *error, void *ud)
{
    (void)pg;
    (void)listen;
    ps_app_t *app = ud;
    cm_gauge_set(app->m_origin_up, up);
    if (up)
        cm_log_info("origin available", NULL);
    else
        cm_log_error("origin unavailable", "error", error, NULL);
}

/* ---- shutdown ------------------------------------------------------------------------- */

static void on_signal_closed(uv_handle_t *h)
{
    ps_app_t *app = h->data;
    app->open_handles--;
}

static void on_pg_closed(void *ud)
{
    ps_app_t *app = ud;
    app->pg = NULL;
    uv_close((uv_handle_t *)&app->sig_term, on_signal_closed);
    uv_close((uv_handle_t *)&app->sig_int, on_signal_closed);
    uv_close((uv_handle_t *)&app->sig_hup, on_signal_closed);
    uv_close((uv_handle_t *)&app->drain_timer, on_signal_closed);
}

static void on_redis_closed(void *ud)
{
    ps_app_t *app = ud;
    app->redis = NULL;
    cm_pg_close(app->pg, on_pg_closed, app);
}

/* Closing the clients answers everything still waiting on them (with errors: 503s). */
static void close_dependencies(ps_app_t *app)
{
    if (app->deps_closing)
        return;
    app->deps_closing = 1;
    cm_redis_close(app->redis, on_redis_closed, app);
}

static void on_http_stopped(void *ud)
{
    ps_app_t *app = ud;
    app->http = NULL;
    uv_timer_stop(&app->drain_timer);
    close_dependencies(app);
}

/* In-flight requests normally finish within REDIS_TIMEOUT_MS + ORIGIN_TIMEOUT_MS, but those
 * may be set long: past the drain time, what still waits is cancelled so the process exits
 * within the contract's 10 s. */
static void on_drain_timeout(uv_timer_t *t)
{
    ps_app_t *app = t->data;
    cm_log_warn("drain time over; cancelling requests still waiting on Redis or the origin",
                NULL);
    close_dependencies(app);
}

static void on_stop_signal(uv_signal_t *h, int signum)
{
    ps_app_t *app = h->data;
    if (app->stopping)
        return;
    app->stopping = 1;
    cm_log_info("shutting down", "signal", signum == SIGTERM ? "SIGTERM" : "SIGINT", NULL);
    uv_timer_start(&app->drain_timer, on_drain_timeout, PS_DRAIN_MS, 0);
    cm_http_server_stop(app->http, PS_DRAIN_MS + 1000, on_http_stopped, app);
}

static void on_reload_signal(uv_signal_t *h, int signum)
{
    (void)signum;
    ps_app_t *app = h->data;
    if (!app->cfg.config_file) {
        cm_log_warn("SIGHUP ignored: CONFIG_FILE is not set", NULL);
        return;
    }
    char err[256];
    if (ps_config_reload(app->cfg.config_file, &app->cfg, err, sizeof err) != 0) {
        cm_log_error("reload failed; settings unchanged", "error", err, NULL);
        return;
    }
    cm_log_set_level(app->cfg.log_level);
    ps_cache_settings_t s = ps_app_cache_settings(app);
    ps_cache_configure(app->cache, &s);
    char ttl[24];
    snprintf(ttl, sizeof ttl, "%ld", app->cfg.cache_ttl_ms);
    cm_log_info("configuration reloaded", "cache_enabled", app->cfg.cache_enabled ? "true" : "false",
                "cache_ttl_ms", ttl, "log_level", cm_log_level_name(app->cfg.log_level), NULL);
}

/* ---- start ---------------------------------------------------------------------------- */

static int start(ps_app_t *app)
{
    app->metrics = cm_metrics_new();
    app->http_metrics = app->metrics ? cm_http_metrics_new(app->metrics) : NULL;
    if (!app->http_metrics)
        return UV_ENOMEM;
    app->m_redis_up = cm_metrics_gauge(app->metrics, "redis_up",
                                       "1 while the Redis link is up, else 0.", NULL);
    app->m_origin_up = cm_metrics_gauge(app->metrics, "origin_up",
                                        "1 while a Postgres origin connection is up, else 0.", NULL);
    app->m_reconnects = cm_metrics_counter(app->metrics, "redis_reconnects_total",
                                           "Redis reconnections after a lost link.", NULL);
    app->m_timeouts = cm_metrics_counter(app->metrics, "redis_command_timeouts_total",
                                         "Redis commands not answered within REDIS_TIMEOUT_MS.",
                                         NULL);

    cm_redis_config_t rc;
    cm_redis_config_defaults(&rc);
    rc.url = app->cfg.redis_url;
    rc.timeout_ms = (uint64_t)app->cfg.redis_timeout_ms;
    rc.on_state = on_redis_state;
    rc.ud = app;
    rc.name = "cache";
    int err = cm_redis_open(app->loop, &rc, &app->redis);
    if (err)
        return err;

    cm_pg_config_t pc;
    cm_pg_config_defaults(&pc);
    pc.conninfo = app->cfg.database_url;
    pc.pool_size = (int)app->cfg.origin_pool_size;
    pc.application_name = "price-service";
    pc.on_state = on_pg_state;
    pc.ud = app;
    if ((err = cm_pg_open(app->loop, &pc, &app->pg)))
        return err;

    ps_cache_backend_t ops;
    app->backend = ps_backend_new(app->loop, app->redis, app->pg,
                                  (uint64_t)app->cfg.origin_timeout_ms, app->metrics, &ops);
    ps_cache_settings_t s = ps_app_cache_settings(app);
    app->cache = app->backend ? ps_cache_new(&ops, &s, app->metrics) : NULL;
    app->router = cm_router_new();
    if (!app->cache || !app->router)
        return UV_ENOMEM;
    if ((err = ps_handlers_register(app)))
        return err;

    cm_http_config_t hc;
    cm_http_config_defaults(&hc);
    hc.host = app->cfg.listen_host;
    hc.port = app->cfg.listen_port;
    hc.handler = cm_router_dispatch;
    hc.handler_ud = app->router;
    hc.observe = cm_http_metrics_observe;
    hc.observe_ud = app->http_metrics;
    hc.server_header = "price-service";
    if ((err = cm_http_server_start(app->loop, &hc, &app->http)))
        return err;

    uv_signal_t *sigs[3] = {&app->sig_term, &app->sig_int, &app->sig_hup};
    for (int i = 0; i < 3; i++) {
        uv_signal_init(app->loop, sigs[i]);
        sigs[i]->data = app;
        app->open_handles++;
    }
    uv_timer_init(app->loop, &app->drain_timer);
    app->drain_timer.data = app;
    app->open_handles++;
    uv_signal_start(&app->sig_term, on_stop_signal, SIGTERM);
    uv_signal_start(&app->sig_int, on_stop_signal, SIGINT);
    uv_signal_start(&app->sig_hup, on_reload_signal, SIGHUP);

    char port[8], ttl[24];
    snprintf(port, sizeof port, "%d", cm_http_server_port(app->http));
    snprintf(ttl, sizeof ttl, "%ld", app->cfg.cache_ttl_ms);
    cm_log_info("listening", "host", app->cfg.listen_host, "port", port, "version",
                MARKETS_VERSION, "cache_enabled", app->cfg.cache_enabled ? "true" : "false",
                "cache_ttl_ms", ttl, NULL);
    return 0;
}

static void cleanup(ps_app_t *app)
{
    ps_cache_free(app->cache);
    ps_backend_free(app->backend);
    cm_router_free(app->router);
    cm_http_metrics_free(app->http_metrics);
    cm_metrics_free(app->metrics);
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            fputs(USAGE, stdout);
            return 0;
        }
        if (strcmp(argv[i], "--version") == 0) {
            printf("price-service %s\n", MARKETS_VERSION);
            return 0;
        }
        fprintf(stderr, "price-service: unknown argument '%s' (see --help)\n", argv[i]);
        return 2;
    }

    static ps_app_t app;
    cm_config_t c;
    cm_config_init_env(&c);
    int bad = cm_config_use_file(&c, ps_config_reloadable) || ps_config_load(&c, &app.cfg);
    if (bad) {
        fprintf(stderr, "price-service: %s\n", c.error);
        cm_config_release(&c);
        return 2;
    }
    /* Strings the settings borrow from the file are not kept: the file holds only
     * reloadable keys, which are copied into app.cfg by value. */
    cm_config_release(&c);
    cm_log_init("price-service", app.cfg.log_level, app.cfg.log_format);
    signal(SIGPIPE, SIG_IGN);

    app.loop = uv_default_loop();
    int err = start(&app);
    if (err) {
        /* Most start failures are the listen address: name it. */
        fprintf(stderr, "price-service: cannot start: %s (PRICE_SERVICE_LISTEN=%s:%d)\n",
                uv_strerror(err), app.cfg.listen_host, app.cfg.listen_port);
        return err == UV_EADDRINUSE || err == UV_ENOMEM ? 1 : 2;
    }
    uv_run(app.loop, UV_RUN_DEFAULT);
    cleanup(&app);
    int rc = uv_loop_close(app.loop);
    if (rc != 0)
        cm_log_warn("loop closed with handles open", "error", uv_strerror(rc), NULL);
    cm_log_info("stopped", NULL);
    return 0;
}
