#include "config.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <uv.h>

const char *const ps_config_reloadable[] = {"CACHE_ENABLED",
                                            "CACHE_TTL_MS",
                                            "CACHE_MEMORY_ENABLED",
                                            "CACHE_REFRESH_AHEAD_PCT",
                                            "CACHE_STALE_IF_ERROR_MS",
                                            "LOG_LEVEL",
                                            NULL};

/* The cache's reloadable keys (LOG_LEVEL is read with the shared settings). */
static void reloadable(cm_config_t *c, ps_config_t *out)
{
    cm_config_bool(c, "CACHE_ENABLED", 1, &out->cache_enabled);
    cm_config_int(c, "CACHE_TTL_MS", 1000, 1, 60000, &out->cache_ttl_ms);
    cm_config_bool(c, "CACHE_MEMORY_ENABLED", 1, &out->cache_memory);
    /* At most 50: the refresh lock is held for the window and must be free again before the
     * next entry's window opens. */
    cm_config_int(c, "CACHE_REFRESH_AHEAD_PCT", 20, 0, 50, &out->cache_refresh_pct);
    cm_config_int(c, "CACHE_STALE_IF_ERROR_MS", 0, 0, 3600000, &out->cache_stale_ms);
}

/* An allow-list entry is "*" or an origin as browsers send it: http(s)://host[:port], printable
 * ASCII, no path (not even a trailing '/'). */
static int origin_ok(const char *o)
{
    size_t skip = strncmp(o, "http://", 7) == 0 ? 7 : strncmp(o, "https://", 8) == 0 ? 8 : 0;
    if (!skip || !o[skip])
        return 0;
    for (const char *p = o + skip; *p; p++)
        if (*p <= ' ' || *p >= 0x7f || *p == '/' || *p == '?' || *p == '#' || *p == ',')
            return 0;
    return 1;
}

static void cors(cm_config_t *c, ps_config_t *out)
{
    char **items = NULL;
    size_t n = 0;
    if (cm_config_list(c, "PRICE_CORS_ALLOWED_ORIGINS", NULL, &items, &n) == 0) {
        if (n > PS_CORS_MAX)
            cm_config_reject(c, "PRICE_CORS_ALLOWED_ORIGINS", "at most 16 origins");
        for (size_t i = 0; i < n && i < PS_CORS_MAX; i++) {
            const char *o = items[i];
            if (strlen(o) > PS_CORS_ORIGIN_MAX || (strcmp(o, "*") != 0 && !origin_ok(o))) {
                cm_config_reject(c, "PRICE_CORS_ALLOWED_ORIGINS",
                                 "expected '*' or origins http(s)://host[:port] (no path, at "
                                 "most 200 characters), comma-separated");
                break;
            }
            if (strcmp(o, "*") == 0 && out->svc.production) {
                cm_config_reject(c, "PRICE_CORS_ALLOWED_ORIGINS",
                                 "'*' (any origin) is not allowed when APP_ENV=production: list "
                                 "the origins");
                break;
            }
            snprintf(out->cors_origin[i], sizeof out->cors_origin[i], "%s", o);
            snprintf(out->cors_header[i], sizeof out->cors_header[i],
                     "Access-Control-Allow-Origin: %s\r\nVary: Origin\r\n", o);
            out->ncors = (int)i + 1;
        }
    }
    cm_config_list_free(items, n);
}

const char *ps_config_cors_headers(const ps_config_t *cfg, const char *origin)
{
    if (cfg->ncors == 0)
        return NULL;
    for (int i = 0; i < cfg->ncors; i++) {
        /* Scheme and host compare case-insensitively (RFC 6454, 6.1). */
        if (strcmp(cfg->cors_origin[i], "*") == 0 ||
            (origin && strcasecmp(cfg->cors_origin[i], origin) == 0))
            return cfg->cors_header[i];
    }
    return "Vary: Origin\r\n";
}

int ps_config_load(cm_config_t *c, ps_config_t *out)
{
    memset(out, 0, sizeof *out);
    cm_service_settings_load(c, "PRICE_SERVICE_LISTEN", "0.0.0.0:8080", &out->svc);
    reloadable(c, out);
    cm_config_int(c, "ORIGIN_TIMEOUT_MS", 2000, 1, 600000, &out->origin_timeout_ms);
    cm_config_int(c, "ORIGIN_POOL_SIZE", 4, 1, 64, &out->origin_pool_size);
    cors(c, out);
    return c->failed ? UV_EINVAL : 0;
}

int ps_config_reload(const char *path, ps_config_t *cfg, char *err, size_t errsz)
{
    cm_config_t c;
    cm_config_init_env(&c);
    ps_config_t next = *cfg;
    if (cm_config_use_file_at(&c, path, ps_config_reloadable) == 0) {
        reloadable(&c, &next);
        cm_service_log_level(&c, &next.svc.log_level);
    }
    int rc = c.failed ? UV_EINVAL : 0;
    if (rc != 0)
        snprintf(err, errsz, "%s", c.error);
    else
        *cfg = next;
    cm_config_release(&c);
    return rc;
}
