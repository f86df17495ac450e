/*
 * price-service: oracle prices over HTTP, cached cache-aside in Redis (docs/openapi.yaml).
 */
#include <cjson/cJSON.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "app.h"
#include "cm/json.h"
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
    "  REDIS_SENTINELS       Sentinel mode: host:port,host:port (REDIS_URL's host unused)\n"
    "  REDIS_SENTINEL_MASTER the master's name at the sentinels (required with them)\n"
    "  REDIS_SENTINEL_PASSWORD  AUTH to the sentinels            [none]\n"
    "  DATABASE_URL          libpq URI or key=value string\n"
    "                        [postgresql://postgres@127.0.0.1:5432/markets]\n"
    "  CACHE_ENABLED         true | false                        [true]\n"
    "  CACHE_TTL_MS          cache entry lifetime, 1..60000      [1000]\n"
    "  CACHE_MEMORY_ENABLED  keep in-process copies until the Redis entry expires [true]\n"
    "  CACHE_REFRESH_AHEAD_PCT  refresh an entry in the last N % of its TTL, 0..50;\n"
    "                        one replica, by a Redis lock; 0 = off   [20]\n"
    "  CACHE_STALE_IF_ERROR_MS  answer the last value this long past its expiry when\n"
    "                        the origin fails, 0..3600000; 0 = off   [0]\n"
    "  REDIS_TIMEOUT_MS      Redis command deadline              [100]\n"
    "  ORIGIN_TIMEOUT_MS     origin query deadline               [2000]\n"
    "  ORIGIN_POOL_SIZE      Postgres connections, 1..64         [4]\n"
    "  PRICE_CORS_ALLOWED_ORIGINS  comma list of origins (http(s)://host[:port], or * outside\n"
    "                        production) whose pages may read the price endpoints  [none]\n"
    "  LOG_LEVEL             debug | info | warn | error         [info]\n"
    "  LOG_FORMAT            json | text                         [json]\n"
    "  CONFIG_FILE           KEY=VALUE file for CACHE_ENABLED, CACHE_TTL_MS,\n"
    "                        CACHE_MEMORY_ENABLED, CACHE_REFRESH_AHEAD_PCT,\n"
    "                        CACHE_STALE_IF_ERROR_MS, LOG_LEVEL; re-read on SIGHUP\n"
    "Signals: SIGTERM/SIGINT drain and exit 0; SIGHUP reloads CONFIG_FILE.\n";

ps_cache_settings_t ps_app_cache_settings(const ps_app_t *app)
{
    return (ps_cache_settings_t){app->cfg.cache_enabled,
                                 (uint64_t)app->cfg.cache_ttl_ms,
                                 app->cfg.cache_memory,
                                 100000,
                                 (unsigned)app->cfg.cache_refresh_pct,
                                 (uint64_t)app->cfg.cache_stale_ms};
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

/* ---- readiness, the Redis probe, the scrape ------------------------------------------- */

static int ready(cJSON *body, void *ud)
{
    ps_app_t *app = ud;
    int origin = cm_pg_is_up(app->pg);
    cJSON_AddStringToObject(body, "origin", origin ? "up" : "down");
    cJSON_AddStringToObject(body, "redis", cm_redis_is_up(app->redis) ? "up" : "down");
    return origin;
}

static cm_redis_t *health_redis(void *ud)
{
    ps_app_t *app = ud;
    return app->cfg.cache_enabled ? app->redis : NULL;
}

static void on_scrape(void *ud)
{
    ps_app_t *app = ud;
    cm_gauge_set(app->m_redis_up, cm_redis_is_up(app->redis) ? 1 : 0);
    cm_gauge_set(app->m_origin_up, cm_pg_is_up(app->pg) ? 1 : 0);
}

/* ---- shutdown ------------------------------------------------------------------------- */

static void on_pg_closed(void *ud)
{
    ps_app_t *app = ud;
    app->pg = NULL;
    cm_service_close(app->svc);
}

static void on_redis_closed(void *ud)
{
    ps_app_t *app = ud;
    app->redis = NULL;
    cm_pg_close(app->pg, on_pg_closed, app);
}

/* Closing the clients answers everything still waiting on them (with errors: 503s). */
static void close_dependencies(void *ud)
{
    ps_app_t *app = ud;
    if (app->deps_closing)
        return;
    app->deps_closing = 1;
    cm_redis_close(app->redis, on_redis_closed, app);
}

/* In-flight requests normally finish within REDIS_TIMEOUT_MS + ORIGIN_TIMEOUT_MS, but those
 * may be set long: past the drain time, what still waits is cancelled so the process exits
 * within the contract's 10 s. */
static void on_drain_late(void *ud)
{
    cm_log_warn("drain time over; cancelling requests still waiting on Redis or the origin", NULL);
    close_dependencies(ud);
}

static void on_stop(int signum, void *ud)
{
    (void)ud;
    cm_log_info("shutting down", "signal", signum == SIGINT ? "SIGINT" : "SIGTERM", NULL);
}

static void on_reload(const char *config_file, void *ud)
{
    ps_app_t *app = ud;
    if (!config_file) {
        cm_log_warn("SIGHUP ignored: CONFIG_FILE is not set", NULL);
        return;
    }
    char err[CM_CONFIG_ERROR_MAX];
    if (ps_config_reload(config_file, &app->cfg, err, sizeof err) != 0) {
        cm_log_error("reload failed; settings unchanged", "error", err, NULL);
        return;
    }
    cm_log_set_level(app->cfg.svc.log_level);
    ps_cache_settings_t s = ps_app_cache_settings(app);
    ps_cache_configure(app->cache, &s);
    char ttl[24], pct[24], stale[24];
    snprintf(ttl, sizeof ttl, "%ld", app->cfg.cache_ttl_ms);
    snprintf(pct, sizeof pct, "%ld", app->cfg.cache_refresh_pct);
    snprintf(stale, sizeof stale, "%ld", app->cfg.cache_stale_ms);
    cm_log_info("configuration reloaded", "cache_enabled",
                app->cfg.cache_enabled ? "true" : "false", "cache_ttl_ms", ttl,
                "cache_refresh_ahead_pct", pct, "cache_stale_if_error_ms", stale, "log_level",
                cm_log_level_name(app->cfg.svc.log_level), NULL);
}

/* ---- start ---------------------------------------------------------------------------- */

static int start(ps_app_t *app)
{
    cm_service_config_t sc = {
        .name = "price-service",
        .settings = &app->cfg.svc,
        .stop_deadline_ms = PS_DRAIN_MS + 1000,
        .ready = ready,
        .not_ready = "not_ready",
        .health_redis = health_redis,
        .on_scrape = on_scrape,
        .oom_code = "internal",
        .on_stop = on_stop,
        .drain_ms = PS_DRAIN_MS,
        .on_drain_late = on_drain_late,
        .on_stopped = close_dependencies,
        .on_reload = on_reload,
        .ud = app,
    };
    int err = cm_service_new(app->loop, &sc, &app->svc);
    if (err)
        return err;
    app->metrics = cm_service_metrics(app->svc);
    app->m_redis_up =
        cm_metrics_gauge(app->metrics, "redis_up", "1 while the Redis link is up, else 0.", NULL);
    app->m_origin_up = cm_metrics_gauge(
        app->metrics, "origin_up", "1 while a Postgres origin connection is up, else 0.", NULL);

    cm_redis_config_t rc;
    cm_redis_config_defaults(&rc);
    cm_redis_settings_apply(&app->cfg.svc.redis, &rc);
    rc.timeout_ms = (uint64_t)app->cfg.svc.redis_timeout_ms;
    rc.on_state = on_redis_state;
    rc.ud = app;
    rc.name = "cache";
    if ((err = cm_redis_open(app->loop, &rc, &app->redis)) ||
        (err = cm_service_mirror_redis(app->svc, app->redis)))
        return err;

    cm_pg_config_t pc;
    cm_pg_config_defaults(&pc);
    pc.conninfo = app->cfg.svc.database_url;
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
    app->cache = app->backend ? ps_cache_new(app->loop, &ops, &s, app->metrics) : NULL;
    if (!app->cache || !app->m_redis_up || !app->m_origin_up)
        return UV_ENOMEM;
    if ((err = ps_handlers_register(app)) || (err = cm_service_start(app->svc)))
        return err;

    char port[8], ttl[24];
    snprintf(port, sizeof port, "%d", cm_service_port(app->svc));
    snprintf(ttl, sizeof ttl, "%ld", app->cfg.cache_ttl_ms);
    /* The token names this replica's refresh locks (price:lock:v1:*) in Redis. */
    cm_log_info("listening", "host", app->cfg.svc.listen_host, "port", port, "version",
                MARKETS_VERSION, "cache_enabled", app->cfg.cache_enabled ? "true" : "false",
                "cache_ttl_ms", ttl, "instance_token", ps_backend_token(app->backend), NULL);
    return 0;
}

static void cleanup(ps_app_t *app)
{
    ps_cache_close(app->cache, NULL, NULL);
    uv_run(app->loop, UV_RUN_DEFAULT); /* the cache's handle closes */
    ps_backend_free(app->backend);
    cm_service_free(app->svc);
}

int main(int argc, char **argv)
{
    cm_json_init();
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

    /* Static: a failed start returns without unwinding what it opened (the process ends),
     * and what stays reachable from here is not reported as leaked by LeakSanitizer. */
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

    app.loop = uv_default_loop();
    int err = start(&app);
    if (err) {
        /* Most start failures are the listen address: name it. */
        fprintf(stderr, "price-service: cannot start: %s (PRICE_SERVICE_LISTEN=%s:%d)\n",
                uv_strerror(err), app.cfg.svc.listen_host, app.cfg.svc.listen_port);
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
