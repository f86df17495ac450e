#include "config.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <uriparser/Uri.h>
#include <uv.h>

const char *const on_config_reloadable[] = {"LOG_LEVEL", NULL};

/* Every JWT_SECRET value published in the repository, refused in production: anyone can sign
 * tokens with them. tests/unit/order-notifier/test_on_config.c (public_secrets_are_refused) reads
 * the repository's example and test files and fails when one they hold is missing here. */
const char *const on_config_public_secrets[] = {
    ON_DEV_JWT_SECRET,
    "change-me-to-32-or-more-random-bytes",      /* deploy/.env.example */
    "not-so-secret-but-long-enough-32-bytes",    /* tests/deploy/fixtures/compose-literal-... */
    "not-so-secret",                             /* tests/deploy/fixtures/k8s-literal-secret */
    "e2e-secret-for-the-order-notifier-tests",   /* tests/e2e */
    "e2e-gateway-secret-at-least-32-bytes-long", /* tests/e2e/test_gateway.py */
    "bench-secret-bench-secret-bench-secret",    /* bench/run */
    NULL,
};

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

int on_config_origin_check(const char *origin, char *why, size_t whysz)
{
    UriUriA uri;
    const char *errpos = NULL;
    const char *end = origin + strlen(origin);
    if (uriParseSingleUriA(&uri, origin, &errpos) != URI_SUCCESS) {
        snprintf(why, whysz, "not a URI");
        return UV_EINVAL;
    }
    int rc = UV_EINVAL;
    size_t slen = uri.scheme.first ? (size_t)(uri.scheme.afterLast - uri.scheme.first) : 0;
    int bracketed = uri.hostData.ip6 != NULL || uri.hostData.ipFuture.first != NULL;
    /* Where an origin ends: after the port, else after the host (and its ']'). Anything
     * beyond (a path, even "/", a query, a fragment) never equals a browser's Origin. */
    const char *last = NULL;
    if (uri.portText.first)
        last = uri.portText.afterLast;
    else if (uri.hostText.afterLast)
        last = uri.hostText.afterLast + (bracketed ? 1 : 0);
    if (!((slen == 4 && strncasecmp(uri.scheme.first, "http", 4) == 0) ||
          (slen == 5 && strncasecmp(uri.scheme.first, "https", 5) == 0))) {
        snprintf(why, whysz, "the scheme is not http or https");
    } else if (uri.userInfo.first) {
        snprintf(why, whysz, "it has user information");
    } else if (!uri.hostText.first || uri.hostText.first == uri.hostText.afterLast) {
        snprintf(why, whysz, "no host");
    } else if (uri.portText.first && uri.portText.first == uri.portText.afterLast) {
        snprintf(why, whysz, "an empty port");
    } else if (last != end || uri.pathHead || uri.absolutePath || uri.query.first ||
               uri.fragment.first) {
        snprintf(why, whysz, "it has a path, a query or a fragment (a trailing '/' is a path)");
    } else {
        rc = 0;
        if (uri.portText.first) {
            long port = 0;
            for (const char *p = uri.portText.first; p < uri.portText.afterLast && port <= 65535;
                 p++)
                port = port * 10 + (*p - '0');
            if (port < 1 || port > 65535) {
                snprintf(why, whysz, "the port is not from 1 to 65535");
                rc = UV_EINVAL;
            }
        }
    }
    uriFreeUriMembersA(&uri);
    return rc;
}

/* An entry of WS_ALLOWED_ORIGINS for a message: cut, with control bytes as '?'. */
static void quote_entry(char *dst, size_t dstsz, const char *s)
{
    size_t n = 0;
    for (; *s && n + 4 < dstsz; s++)
        dst[n++] = ((unsigned char)*s < 0x20 || *s == 0x7f) ? '?' : *s;
    if (*s && n + 4 >= dstsz) {
        memcpy(dst + n, "...", 3);
        n += 3;
    }
    dst[n] = '\0';
}

/* Production refuses "*" and anything that is not an origin (it would never match, and the
 * operator meant something else); development only warns about the latter. */
static void check_origins(cm_config_t *c, on_config_t *out)
{
    for (size_t i = 0; i < out->norigins; i++) {
        const char *o = out->origins[i];
        char q[64], why[80], msg[200];
        if (strcmp(o, "*") == 0) {
            if (out->svc.production)
                cm_config_reject(c, "WS_ALLOWED_ORIGINS",
                                 "'*' (any origin) is not allowed when APP_ENV=production: list "
                                 "the origins, e.g. https://app.example.com");
            continue;
        }
        if (on_config_origin_check(o, why, sizeof why) == 0)
            continue;
        quote_entry(q, sizeof q, o);
        snprintf(msg, sizeof msg, "'%s' is not an origin scheme://host[:port]: %s", q, why);
        if (out->svc.production) {
            cm_config_reject(c, "WS_ALLOWED_ORIGINS", msg);
        } else if (!out->warning[0]) {
            snprintf(out->warning, sizeof out->warning, "WS_ALLOWED_ORIGINS: %s; it never matches",
                     msg);
        }
    }
}

int on_config_load(cm_config_t *c, on_config_t *out)
{
    memset(out, 0, sizeof *out);
    cm_service_settings_load(c, "ORDER_NOTIFIER_LISTEN", "0.0.0.0:8081", &out->svc);
    cm_config_str(c, "PG_CHANNEL", "order_events", &out->pg_channel);
    if (out->pg_channel && !valid_channel(out->pg_channel))
        cm_config_reject(c, "PG_CHANNEL",
                         "expected an identifier of 1 to 63 letters, digits or '_'");

    cm_config_str(c, "JWT_SECRET", NULL, &out->jwt_secret);
    if (!out->jwt_secret) {
        if (out->svc.production)
            cm_config_reject(c, "JWT_SECRET", "required when APP_ENV=production");
        out->jwt_secret = ON_DEV_JWT_SECRET;
        out->jwt_secret_is_dev = 1;
    } else if (out->svc.production) {
        char why[160], msg[192];
        if (cm_config_weak_secret(out->jwt_secret, ON_JWT_SECRET_MIN, on_config_public_secrets, why,
                                  sizeof why) != 0) {
            snprintf(msg, sizeof msg, "%s (APP_ENV=production)", why);
            cm_config_reject(c, "JWT_SECRET", msg);
        }
    }

    cm_config_list(c, "WS_ALLOWED_ORIGINS", out->svc.production ? NULL : "*", &out->origins,
                   &out->norigins);
    if (out->norigins == 0)
        cm_config_reject(c, "WS_ALLOWED_ORIGINS", "required when APP_ENV=production");
    check_origins(c, out);

    cm_config_int(c, "WS_MAX_CONNECTIONS", 10000, 1, 1000000, &out->ws_max_connections);
    cm_config_int(c, "WS_SEND_QUEUE_MAX_BYTES", 1048576, 1024, 1L << 30, &out->ws_send_queue_max);
    cm_config_int(c, "WS_PING_INTERVAL_MS", 25000, 100, 3600000, &out->ws_ping_interval_ms);
    cm_config_int(c, "NOTIFIER_PG_POOL_SIZE", 4, 1, 64, &out->pg_pool_size);
    cm_config_int(c, "NOTIFIER_LOCK_KEY", 7210100, -2147483647L, 2147483647L, &out->lock_key);
    cm_config_int(c, "NOTIFIER_LOCK_RETRY_MS", 1000, 10, 60000, &out->lock_retry_ms);
    cm_config_int(c, "NOTIFIER_LIVENESS_MS", 2000, 100, 60000, &out->liveness_ms);
    cm_config_int(c, "NOTIFIER_CATCHUP_LOOKBACK_MS", 30000, 0, 3600000, &out->lookback_ms);
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
    cm_config_t c;
    cm_config_init_env(&c);
    cm_log_level_t level = cfg->svc.log_level;
    if (cm_config_use_file_at(&c, path, on_config_reloadable) == 0)
        cm_service_log_level(&c, &level);
    int rc = c.failed ? UV_EINVAL : 0;
    if (rc != 0)
        snprintf(err, errsz, "%s", c.error);
    else
        cfg->svc.log_level = level;
    cm_config_release(&c);
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
