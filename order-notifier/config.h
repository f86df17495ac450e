/*
 * config.h: the order-notifier's settings from the environment (CONTRACT.md, "Configuration").
 *
 * Beyond the contract's variables, a few NOTIFIER_* knobs (advisory lock key, lock retry,
 * liveness interval, catch-up look-back) default to values that meet the contract's "takes
 * over within a few seconds" and can be shortened by tests.
 */
#ifndef ON_CONFIG_H
#define ON_CONFIG_H

#include "cm/config.h"
#include "cm/log.h"

#include <stddef.h>
#include <stdint.h>

/* Used when JWT_SECRET is unset outside production (a warning is logged). */
#define ON_DEV_JWT_SECRET "dev-only-order-notifier-secret-change-me"

typedef struct on_config {
    int production;        /* APP_ENV=production: secrets and origins are required */
    char listen_host[256]; /* ORDER_NOTIFIER_LISTEN */
    int listen_port;
    const char *redis_url;    /* REDIS_URL (borrowed from the environment) */
    const char *database_url; /* DATABASE_URL */
    const char *pg_channel;   /* PG_CHANNEL: a plain identifier, LISTENed quoted */
    const char *jwt_secret;   /* JWT_SECRET */
    int jwt_secret_is_dev;    /* the dev default is in use */
    char **origins;           /* WS_ALLOWED_ORIGINS (owned: on_config_free); "*" = any */
    size_t norigins;
    long ws_max_connections;    /* WS_MAX_CONNECTIONS */
    long ws_send_queue_max;     /* WS_SEND_QUEUE_MAX_BYTES, bytes */
    long ws_ping_interval_ms;   /* WS_PING_INTERVAL_MS */
    long redis_timeout_ms;      /* REDIS_TIMEOUT_MS */
    long pg_pool_size;          /* NOTIFIER_PG_POOL_SIZE: query connections (resume, catch-up) */
    long lock_key;              /* NOTIFIER_LOCK_KEY: pg advisory lock id of the leader */
    long lock_retry_ms;         /* NOTIFIER_LOCK_RETRY_MS: standby retry of the lock, ms */
    long liveness_ms;           /* NOTIFIER_LIVENESS_MS: liveness query on the LISTEN session, ms */
    long lookback_ms;           /* NOTIFIER_CATCHUP_LOOKBACK_MS: catch-up/replay look-back, ms */
    cm_log_level_t log_level;   /* LOG_LEVEL (reloadable) */
    cm_log_format_t log_format; /* LOG_FORMAT */
    const char *config_file;    /* CONFIG_FILE */
} on_config_t;

/* The keys CONFIG_FILE may set (NULL-terminated). */
extern const char *const on_config_reloadable[];

/*
 * Reads every setting through `c`. Returns 0, or UV_EINVAL with c->error naming the first bad
 * variable (out->origins may still be allocated: call on_config_free either way). Strings are
 * borrowed from the environment.
 */
int on_config_load(cm_config_t *c, on_config_t *out);
/* Releases what on_config_load allocated. */
void on_config_free(on_config_t *cfg);
/* Re-reads LOG_LEVEL from `path` over the environment (SIGHUP). Returns 0 or UV_EINVAL with
 * `err` set; `cfg` is unchanged on error. */
int on_config_reload(const char *path, on_config_t *cfg, char *err, size_t errsz);
/* Non-zero when `origin` (may be NULL: no Origin header, a non-browser client) is allowed. */
int on_config_origin_allowed(const on_config_t *cfg, const char *origin);

#endif
