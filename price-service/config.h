/*
 * config.h: the price-service's settings, from the environment (docs/CONFIGURATION.md).
 */
#ifndef PS_CONFIG_H
#define PS_CONFIG_H

#include "cm/config.h"
#include "cm/service.h"

/* PRICE_CORS_ALLOWED_ORIGINS: at most this many entries, each at most this long. */
#define PS_CORS_MAX 16
#define PS_CORS_ORIGIN_MAX 200

typedef struct ps_config {
    /* APP_ENV, PRICE_SERVICE_LISTEN, REDIS_*, DATABASE_URL, LOG_LEVEL (reloadable), LOG_FORMAT,
     * CONFIG_FILE (strings borrowed from the environment) */
    cm_service_settings_t svc;
    int cache_enabled;      /* CACHE_ENABLED (reloadable) */
    long cache_ttl_ms;      /* CACHE_TTL_MS, 1..60000 (reloadable) */
    int cache_memory;       /* CACHE_MEMORY_ENABLED (reloadable): the memory tier */
    long cache_refresh_pct; /* CACHE_REFRESH_AHEAD_PCT, 0..50 (reloadable); 0 = off */
    long cache_stale_ms;    /* CACHE_STALE_IF_ERROR_MS, 0..3600000 (reloadable); 0 = off */
    long origin_timeout_ms; /* ORIGIN_TIMEOUT_MS */
    long origin_pool_size;  /* ORIGIN_POOL_SIZE: Postgres connections */
    /* PRICE_CORS_ALLOWED_ORIGINS: browser origins that may read the price endpoints (a page
     * served elsewhere, the notifier's dashboard); none = no CORS headers at all. Each entry is
     * kept as the response header lines it earns ("Access-Control-Allow-Origin: o\r\n..."). */
    int ncors;
    char cors_origin[PS_CORS_MAX][PS_CORS_ORIGIN_MAX + 1];
    char cors_header[PS_CORS_MAX][PS_CORS_ORIGIN_MAX + 64];
} ps_config_t;

/* The keys CONFIG_FILE may set (NULL-terminated). */
extern const char *const ps_config_reloadable[];

/*
 * Reads every setting through `c` (environment, and c->file for the reloadable keys).
 * Returns 0, or UV_EINVAL with c->error naming the first bad variable. Strings in `out` are
 * borrowed from the environment or the file.
 */
int ps_config_load(cm_config_t *c, ps_config_t *out);

/*
 * Re-reads only the reloadable keys into `cfg` from the file at `path` over the environment
 * (SIGHUP). On error, returns UV_EINVAL with `err` (errsz bytes) naming the key or file line,
 * and leaves `cfg` unchanged.
 */
int ps_config_reload(const char *path, ps_config_t *cfg, char *err, size_t errsz);

/*
 * The CORS header lines for a request with this Origin header value (NULL when absent): the
 * entry's Access-Control-Allow-Origin and Vary lines when it is listed (or "*" is), "Vary:
 * Origin" alone when it is not, NULL when the allow-list is empty. Borrowed from `cfg`.
 */
const char *ps_config_cors_headers(const ps_config_t *cfg, const char *origin);

#endif
