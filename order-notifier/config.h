/*
 * config.h: the order-notifier's settings from the environment (docs/CONFIGURATION.md).
 *
 * Beyond the contract's variables, a few NOTIFIER_* knobs (advisory lock key, lock retry,
 * liveness interval, catch-up look-back) default to values that meet the contract's "takes
 * over within a few seconds" and can be shortened by tests.
 */
#ifndef ON_CONFIG_H
#define ON_CONFIG_H

#include "cm/config.h"
#include "cm/service.h"

#include <stddef.h>
#include <stdint.h>

/* Used when JWT_SECRET is unset outside production (a warning is logged). */
#define ON_DEV_JWT_SECRET "dev-only-order-notifier-secret-change-me"
/* Shortest JWT_SECRET accepted in production: HS256's key should be as long as its output. */
#define ON_JWT_SECRET_MIN 32

typedef struct on_config {
    /* APP_ENV (production: secrets and origins are required), ORDER_NOTIFIER_LISTEN, REDIS_*,
     * DATABASE_URL, REDIS_TIMEOUT_MS, LOG_LEVEL (reloadable), LOG_FORMAT, CONFIG_FILE (strings
     * borrowed from the environment) */
    cm_service_settings_t svc;
    const char *pg_channel; /* PG_CHANNEL: a plain identifier, LISTENed quoted */
    const char *jwt_secret; /* JWT_SECRET */
    int jwt_secret_is_dev;  /* the dev default is in use */
    char **origins;         /* WS_ALLOWED_ORIGINS (owned: on_config_free); "*" = any */
    size_t norigins;
    long ws_max_connections;  /* WS_MAX_CONNECTIONS */
    long ws_send_queue_max;   /* WS_SEND_QUEUE_MAX_BYTES, bytes */
    long ws_ping_interval_ms; /* WS_PING_INTERVAL_MS */
    long pg_pool_size;        /* NOTIFIER_PG_POOL_SIZE: query connections (resume, catch-up) */
    long lock_key;            /* NOTIFIER_LOCK_KEY: pg advisory lock id of the leader */
    long lock_retry_ms;       /* NOTIFIER_LOCK_RETRY_MS: standby retry of the lock, ms */
    long liveness_ms;         /* NOTIFIER_LIVENESS_MS: liveness query on the LISTEN session, ms */
    long lookback_ms;         /* NOTIFIER_CATCHUP_LOOKBACK_MS: catch-up/replay look-back, ms */
    /* A setting accepted outside production that is probably a mistake (a WS_ALLOWED_ORIGINS
     * entry that is not an origin), for main to log once logging is set up; empty if none. */
    char warning[256];
} on_config_t;

/* The keys CONFIG_FILE may set (NULL-terminated). */
extern const char *const on_config_reloadable[];
/* JWT_SECRET values published in the repository (NULL-terminated), refused in production. */
extern const char *const on_config_public_secrets[];

/*
 * Reads every setting through `c`. In production JWT_SECRET must be fit for HS256
 * (cm_config_weak_secret: not a published value, at least ON_JWT_SECRET_MIN bytes, varied)
 * and WS_ALLOWED_ORIGINS a list of origins without "*". Returns 0, or UV_EINVAL with c->error
 * naming the first bad variable (out->origins may still be allocated: call on_config_free either
 * way). Strings are borrowed from the environment.
 */
int on_config_load(cm_config_t *c, on_config_t *out);
/* Releases what on_config_load allocated. */
void on_config_free(on_config_t *cfg);
/* Re-reads LOG_LEVEL from `path` over the environment (SIGHUP). Returns 0 or UV_EINVAL with
 * `err` set; `cfg` is unchanged on error. */
int on_config_reload(const char *path, on_config_t *cfg, char *err, size_t errsz);
/* 0 when `origin` is a serialized origin (RFC 6454): http or https, "://", a host, an
 * optional port, nothing after; else UV_EINVAL with why (whysz bytes) saying what is wrong. */
int on_config_origin_check(const char *origin, char *why, size_t whysz);
/* Non-zero when `origin` (may be NULL: no Origin header, a non-browser client) is allowed. */
int on_config_origin_allowed(const on_config_t *cfg, const char *origin);

#endif
