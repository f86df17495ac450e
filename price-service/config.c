#include "config.h"

#include <stdio.h>
#include <string.h>
#include <uv.h>

#include "cm/pg.h"
#include "cm/redis.h"

const char *const ps_config_reloadable[] = {"CACHE_ENABLED", "CACHE_TTL_MS",
                                            "CACHE_MEMORY_ENABLED", "LOG_LEVEL", NULL};

static const char *const levels[] = {"debug", "info", "warn", "error", NULL};
static const char *const formats[] = {"json", "text", NULL};

/* Records "<KEY>: <what>" as the error unless an earlier one is there. */
static void reloadable(cm_config_t *c, ps_config_t *out)
{
    int idx;
    cm_config_bool(c, "CACHE_ENABLED", 1, &out->cache_enabled);
    cm_config_int(c, "CACHE_TTL_MS", 1000, 1, 60000, &out->cache_ttl_ms);
    cm_config_bool(c, "CACHE_MEMORY_ENABLED", 1, &out->cache_memory);
    if (cm_config_enum(c, "LOG_LEVEL", "info", levels, &idx) == 0)
        out->log_level = (cm_log_level_t)idx;
}

int ps_config_load(cm_config_t *c, ps_config_t *out)
{
    memset(out, 0, sizeof *out);
    int idx;
    cm_config_app_env(c);
    out->production = c->production;
    cm_config_listen(c, "PRICE_SERVICE_LISTEN", "0.0.0.0:8080", out->listen_host,
                     sizeof out->listen_host, &out->listen_port);
    cm_config_checked(c, "REDIS_URL", "redis://127.0.0.1:6379/0", cm_redis_url_check,
                      &out->redis_url);
    cm_config_checked(c, "DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/markets",
                      cm_pg_conninfo_check, &out->database_url);
    reloadable(c, out);
    cm_config_int(c, "REDIS_TIMEOUT_MS", 100, 1, 60000, &out->redis_timeout_ms);
    cm_config_int(c, "ORIGIN_TIMEOUT_MS", 2000, 1, 600000, &out->origin_timeout_ms);
    cm_config_int(c, "ORIGIN_POOL_SIZE", 4, 1, 64, &out->origin_pool_size);
    if (cm_config_enum(c, "LOG_FORMAT", "json", formats, &idx) == 0)
        out->log_format = (cm_log_format_t)idx;
    cm_config_str(c, "CONFIG_FILE", NULL, &out->config_file);
    return c->failed ? UV_EINVAL : 0;
}

int ps_config_reload(const char *path, ps_config_t *cfg, char *err, size_t errsz)
{
    cm_config_file_t *file = NULL;
    int rc = cm_config_file_load(path, &file, err, errsz);
    if (rc != 0)
        return rc;
    cm_config_t c;
    cm_config_init_env(&c);
    c.file = file;
    c.file_keys = ps_config_reloadable;
    ps_config_t next = *cfg;
    reloadable(&c, &next);
    if (c.failed) {
        snprintf(err, errsz, "%s", c.error);
        rc = UV_EINVAL;
    } else {
        *cfg = next;
    }
    cm_config_file_free(file);
    return rc;
}
