#include "config.h"

#include "cm/pg.h"
#include "cm/redis.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <uv.h>

const char *const on_config_reloadable[] = {"LOG_LEVEL", NULL};

static const char *const levels[] = {"debug", "info", "warn", "error", NULL};
static const char *const formats[] = {"json", "text", NULL};

/* LISTEN takes an identifier, not a parameter: keep it to a plain one. */
static int valid_channel(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 63 || !(s[0] == '_' || ((s[0] | 0x20) >= 'a' && (s[0] | 0x20) <= 'z')))
        return 0;
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        if (!(ch == '_' || (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') ||
              (ch >= 'A' && ch <= 'Z')))
            return 0;
    }
    return 1;
}

int on_config_load(cm_config_t *c, on_config_t *out)
{
    memset(out, 0, sizeof *out);
    int idx;
    cm_config_app_env(c);
    out->production = c->production;
    cm_config_listen(c, "ORDER_NOTIFIER_LISTEN", "0.0.0.0:8081", out->listen_host,
                     sizeof out->listen_host, &out->listen_port);
    cm_config_checked(c, "REDIS_URL", "redis://127.0.0.1:6379/0", cm_redis_url_check,
                      &out->redis_url);
    cm_config_checked(c, "DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/markets",
                      cm_pg_conninfo_check, &out->database_url);
    cm_config_str(c, "PG_CHANNEL", "order_events", &out->pg_channel);
    if (out->pg_channel && !valid_channel(out->pg_channel))
        cm_config_reject(c, "PG_CHANNEL", "expected an identifier of 1 to 63 letters, digits or '_'");

    cm_config_str(c, "JWT_SECRET", NULL, &out->jwt_secret);
    if (!out->jwt_secret) {
        if (out->production)
            cm_config_reject(c, "JWT_SECRET", "required when APP_ENV=production");
        out->jwt_secret = ON_DEV_JWT_SECRET;
        out->jwt_secret_is_dev = 1;
    } else if (out->production && strlen(out->jwt_secret) < 32) {
        cm_config_reject(c, "JWT_SECRET", "expected at least 32 bytes for HS256 in production");
    }

    cm_config_list(c, "WS_ALLOWED_ORIGINS", out->production ? NULL : "*", &out->origins,
                   &out->norigins);
    if (out->norigins == 0)
        cm_config_reject(c, "WS_ALLOWED_ORIGINS", "required when APP_ENV=production");

    cm_config_int(c, "WS_MAX_CONNECTIONS", 10000, 1, 1000000, &out->ws_max_connections);
    cm_config_int(c, "WS_SEND_QUEUE_MAX_BYTES", 1048576, 1024, 1L << 30, &out->ws_send_queue_max);
    cm_config_int(c, "WS_PING_INTERVAL_MS", 25000, 100, 3600000, &out->ws_ping_interval_ms);
    cm_config_int(c, "REDIS_TIMEOUT_MS", 100, 1, 60000, &out->redis_timeout_ms);
    cm_config_int(c, "NOTIFIER_PG_POOL_SIZE", 4, 1, 64, &out->pg_pool_size);
    cm_config_int(c, "NOTIFIER_LOCK_KEY", 7210100, -2147483647L, 2147483647L, &out->lock_key);
    cm_config_int(c, "NOTIFIER_LOCK_RETRY_MS", 1000, 10, 60000, &out->lock_retry_ms);
    cm_config_int(c, "NOTIFIER_LIVENESS_MS", 2000, 100, 60000, &out->liveness_ms);
    cm_config_int(c, "NOTIFIER_CATCHUP_LOOKBACK_MS", 30000, 0, 3600000, &out->lookback_ms);
    if (cm_config_enum(c, "LOG_LEVEL", "info", levels, &idx) == 0)
        out->log_level = (cm_log_level_t)idx;
    if (cm_config_enum(c, "LOG_FORMAT", "json", formats, &idx) == 0)
        out->log_format = (cm_log_format_t)idx;
    cm_config_str(c, "CONFIG_FILE", NULL, &out->config_file);
    return c->failed ? UV_EINVAL : 0;
}

void on_config_free(on_config_t *cfg)
{
    cm_config_list_free(cfg->origins, cfg->norigins);
    cfg->origins = NULL;
    cfg->norigins = 0;
}

int on_config_reload(const char *path, on_config_t *cfg, char *err, size_t errsz)
{
    cm_config_file_t *file = NULL;
    int rc = cm_config_file_load(path, &file, err, errsz);
    if (rc != 0)
        return rc;
    cm_config_t c;
    cm_config_init_env(&c);
    c.file = file;
    c.file_keys = on_config_reloadable;
    int idx;
    if (cm_config_enum(&c, "LOG_LEVEL", "info", levels, &idx) == 0) {
        cfg->log_level = (cm_log_level_t)idx;
    } else {
        snprintf(err, errsz, "%s", c.error);
        rc = UV_EINVAL;
    }
    cm_config_file_free(file);
    return rc;
}

int on_config_origin_allowed(const on_config_t *cfg, const char *origin)
{
    for (size_t i = 0; i < cfg->norigins; i++) {
        if (strcmp(cfg->origins[i], "*") == 0)
            return 1;
        /* Origins are case-insensitive in scheme and host (RFC 6454 §6.1). */
        if (origin && strcasecmp(cfg->origins[i], origin) == 0)
            return 1;
    }
    /* A client that sends no Origin is not a browser: the token alone decides. */
    return origin == NULL;
}
