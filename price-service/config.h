/*
 * config.h: the price-service's settings, from the environment (CONTRACT.md, "Configuration").
 */
#ifndef PS_CONFIG_H
#define PS_CONFIG_H

#include "cm/config.h"
#include "cm/log.h"

typedef struct ps_config {
    int production;          /* APP_ENV=production: no dev defaults for URLs */
    char listen_host[256];   /* PRICE_SERVICE_LISTEN */
    int listen_port;
    const char *redis_url;   /* REDIS_URL (borrowed from the environment) */
    const char *database_url;/* DATABASE_URL */
    int cache_enabled;       /* CACHE_ENABLED (reloadable) */
    long cache_ttl_ms;       /* CACHE_TTL_MS, 1..60000 (reloadable) */
    int cache_memory;        /* CACHE_MEMORY_ENABLED (reloadable): the memory tier */
    long redis_timeout_ms;   /* REDIS_TIMEOUT_MS */
    long origin_timeout_ms;  /* ORIGIN_TIMEOUT_MS */
    long origin_pool_size;   /* ORIGIN_POOL_SIZE: Postgres connections */
    cm_log_level_t log_level;   /* LOG_LEVEL (reloadable) */
    cm_log_format_t log_format; /* LOG_FORMAT */
    const char *config_file; /* CONFIG_FILE: KEY=VALUE overrides of the reloadable keys */
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

#endif
