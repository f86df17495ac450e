/*
 * The settings both daemons read, declared once so their names, defaults, ranges and
 * messages cannot drift apart (docs/CONFIGURATION.md).
 */
#include "cm/pg.h"
#include "cm/service.h"

#include <string.h>

static const char *const LEVELS[] = {"debug", "info", "warn", "error", NULL};
static const char *const FORMATS[] = {"json", "text", NULL};

int cm_service_log_level(cm_config_t *c, cm_log_level_t *out)
{
    int idx;
    int rc = cm_config_enum(c, "LOG_LEVEL", "info", LEVELS, &idx);
    if (rc == 0)
        *out = (cm_log_level_t)idx;
    return rc;
}

int cm_service_settings_load(cm_config_t *c, const char *listen_key, const char *listen_default,
                             cm_service_settings_t *out)
{
    memset(out, 0, sizeof *out);
    cm_config_app_env(c);
    out->production = c->production;
    cm_config_listen(c, listen_key, listen_default, out->listen_host, sizeof out->listen_host,
                     &out->listen_port);
    cm_redis_settings_load(c, &out->redis);
    cm_config_checked(c, "DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/markets",
                      cm_pg_conninfo_check, &out->database_url);
    cm_config_int(c, "REDIS_TIMEOUT_MS", 100, 1, 60000, &out->redis_timeout_ms);
    out->log_level = CM_LOG_INFO;
    cm_service_log_level(c, &out->log_level);
    int idx;
    if (cm_config_enum(c, "LOG_FORMAT", "json", FORMATS, &idx) == 0)
        out->log_format = (cm_log_format_t)idx;
    cm_config_str(c, "CONFIG_FILE", NULL, &out->config_file);
    return c->failed ? UV_EINVAL : 0;
}
