/*
 * cm/service.h: the shell both daemons run in.
 *
 * A cm_service_t owns what every daemon of the project has and answers the same way: the
 * metrics registry, the router and its HTTP listener, the endpoints `/healthz`, `/readyz`,
 * `/api/health/redis` and `/metrics` (with http_requests_total and
 * http_request_duration_seconds), the signals (SIGTERM/SIGINT drain, SIGHUP reload) and the
 * settings both read (APP_ENV, DATABASE_URL, REDIS_*, LOG_*, CONFIG_FILE and the listen
 * address). A daemon supplies only what is its own: its routes, the fields of its readiness
 * body, and what it does when it starts, reloads and stops.
 *
 * Life cycle, all on the loop thread:
 *     cm_service_new()      registry and router; the daemon registers its metrics and routes
 *     cm_service_start()    the shared routes, the listener, the signal handlers
 *     SIGTERM / SIGINT      cfg.on_stop, then the listener drains; cfg.on_stopped once it has
 *     cm_service_close()    the daemon's own shutdown is done: the signal handlers go
 *     uv_run() returns      cm_service_free()
 *
 * SIGPIPE is ignored by cm_http_server_start() (cm/http.h), which the service calls.
 */
#ifndef CM_SERVICE_H
#define CM_SERVICE_H

#include <stdint.h>
#include <uv.h>

#include "cm/config.h"
#include "cm/http.h"
#include "cm/log.h"
#include "cm/metrics.h"
#include "cm/redis.h"
#include "cm/router.h"

struct cJSON;

typedef struct cm_service cm_service_t;

/* ---- the settings both daemons read ---------------------------------------------------- */

typedef struct cm_service_settings {
    int production;             /* APP_ENV=production: no development defaults for URLs */
    char listen_host[256];      /* the daemon's *_LISTEN key */
    int listen_port;            /* 0 only with c->allow_port_zero */
    cm_redis_settings_t redis;  /* REDIS_URL, REDIS_SENTINELS... (borrowed like the strings) */
    const char *database_url;   /* DATABASE_URL */
    long redis_timeout_ms;      /* REDIS_TIMEOUT_MS, 1..60000 */
    cm_log_level_t log_level;   /* LOG_LEVEL (reloadable by both daemons) */
    cm_log_format_t log_format; /* LOG_FORMAT */
    const char *config_file;    /* CONFIG_FILE, NULL when unset */
} cm_service_settings_t;

/*
 * Reads the shared settings through `c` (borrowed), the listen address from `listen_key` with
 * `listen_default` ("0.0.0.0:8080"). Strings in `out` are borrowed from the environment or
 * c->file. Returns 0, or UV_EINVAL with c->error naming the first bad variable (the other
 * fields then hold their defaults, so the caller may go on reading its own keys).
 */
int cm_service_settings_load(cm_config_t *c, const char *listen_key, const char *listen_default,
                             cm_service_settings_t *out);
/* Reads LOG_LEVEL (debug | info | warn | error, default info) through `c` into *out; for the
 * daemons' SIGHUP reloads. Returns 0 or UV_EINVAL (with c->error; *out untouched). */
int cm_service_log_level(cm_config_t *c, cm_log_level_t *out);

/* ---- the service ----------------------------------------------------------------------- */

/*
 * Fills `body` (borrowed for the call; "status" is already its first member) with the daemon's
 * own readiness fields and returns non-zero when the daemon is ready. The service answers 503
 * while it is stopping whatever this returns.
 */
typedef int (*cm_service_ready_fn)(struct cJSON *body, void *ud);

typedef struct cm_service_config {
    const char *name; /* "price-service": log service name and Server header; borrowed for
                         the service's lifetime */
    const cm_service_settings_t *settings; /* listen address, logging; borrowed likewise */
    size_t max_connections;                /* the listener's limit; 0 = cm_http's default */
    uint64_t stop_deadline_ms; /* after SIGTERM, what is still open then is closed hard */
    /* Readiness: required. `not_ready` is the status word of a 503 ("not_ready"); ready is
     * always "ready". */
    cm_service_ready_fn ready;
    const char *not_ready;
    /* The link GET /api/health/redis pings; NULL answers {"status":"disabled"}. Required. */
    cm_redis_t *(*health_redis)(void *ud);
    /* Optional: called before each /metrics render, to bring values kept elsewhere in. */
    void (*on_scrape)(void *ud);
    /* The error code of a 500 when an answer cannot be built (out of memory). */
    const char *oom_code;
    /* Optional: the first SIGTERM or SIGINT (or cm_service_stop, signum 0), before the
     * listener starts draining; the daemon logs and starts its own shutdown here. */
    void (*on_stop)(int signum, void *ud);
    /* Optional: `drain_ms` after on_stop, if the listener has not drained by then. */
    uint64_t drain_ms;
    void (*on_drain_late)(void *ud);
    /* Required: the listener has drained and is gone; the daemon closes the rest and then
     * calls cm_service_close(). */
    void (*on_stopped)(void *ud);
    /* Optional: SIGHUP, with settings->config_file (may be NULL: not set); the daemon
     * re-reads its reloadable keys and logs the outcome. */
    void (*on_reload)(const char *config_file, void *ud);
    void *ud; /* passed to every callback above; borrowed */
} cm_service_config_t;

/*
 * Sets up logging (cfg->name, settings->log_level and log_format) and creates the service on
 * `loop` (borrowed): its metrics registry, its router and the Redis mirror counters
 * (redis_reconnects_total, redis_command_timeouts_total, redis_stalls_total). `cfg` is copied.
 * Returns 0 with *out set (free with cm_service_free), UV_EINVAL (a required field missing)
 * or UV_ENOMEM. Opens no handle.
 */
int cm_service_new(uv_loop_t *loop, const cm_service_config_t *cfg, cm_service_t **out);
/* The registry /metrics renders; owned by the service, valid until cm_service_free. */
cm_metrics_t *cm_service_metrics(const cm_service_t *s);
/* Routes a path of the daemon's own, as cm_router_add() (cm/router.h). Before start. */
int cm_service_route(cm_service_t *s, unsigned methods, const char *path, cm_http_handler_fn fn,
                     void *ud);
/* Sums `r`'s reconnections, timeouts and stalls into the mirror counters at each scrape
 * (borrowed: must outlive the service's last render; at most 4 links). 0 or UV_ENOSPC. */
int cm_service_mirror_redis(cm_service_t *s, cm_redis_t *r);

/*
 * Routes the shared endpoints, listens on settings->listen_host:listen_port and installs the
 * signal handlers. Returns 0, or the listener's error (UV_EADDRINUSE, UV_EINVAL for an address
 * that cannot be used, UV_ENOMEM...); on failure no handle is left open.
 */
int cm_service_start(cm_service_t *s);
/* The bound port (after start). */
int cm_service_port(const cm_service_t *s);
/* Non-zero from the first stop signal (or cm_service_stop) on. */
int cm_service_stopping(const cm_service_t *s);
/* Stops as SIGTERM does (on_stop gets signum 0); a no-op once stopping or before start. */
void cm_service_stop(cm_service_t *s);
/* Closes the signal handlers and the drain timer (from on_stopped, or after a failed start);
 * the loop can then end. Idempotent. */
void cm_service_close(cm_service_t *s);
/* Frees the service once the loop has run to its end (every handle closed); NULL is a no-op. */
void cm_service_free(cm_service_t *s);

/*
 * Answers `req` with `body` as JSON (takes ownership of `body`; NULL is treated as out of
 * memory), `headers` (borrowed, may be NULL) as extra lines; a 500 with `oom_code` (and `headers`)
 * when the text cannot be built. Returns as cm_http_respond().
 */
int cm_service_respond_json(cm_http_request_t *req, int status, struct cJSON *body,
                            const char *headers, const char *oom_code);

#endif
