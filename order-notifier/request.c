#include "request.h"

#include "hub.h"

#include "cm/alloc.h"
#include "cm/log.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

/* Most ids a client may list in recent_event_ids (they travel in the request line). */
#define RECENT_MAX 256
#define RECENT_TEXT_MAX (RECENT_MAX * 21)
#define TOKEN_MAX 4096

static int cmp_id(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Parses recent_event_ids ("1,5,9": positive ids, none above `last`, at most RECENT_MAX) into
 * a sorted unique array the caller frees. Returns 0, UV_EINVAL or UV_ENOMEM. */
static int parse_recent(const char *text, int64_t last, int64_t **out, size_t *count)
{
    int64_t *ids = cm_malloc(RECENT_MAX * sizeof *ids);
    if (!ids)
        return UV_ENOMEM;
    size_t n = 0;
    const char *p = text;
    for (;;) {
        if (*p < '0' || *p > '9' || n == RECENT_MAX)
            goto bad;
        char *end = NULL;
        errno = 0;
        long long v = strtoll(p, &end, 10);
        if (errno || v <= 0 || v > last)
            goto bad;
        ids[n++] = v;
        if (*end == '\0')
            break;
        if (*end != ',')
            goto bad;
        p = end + 1;
    }
    qsort(ids, n, sizeof *ids, cmp_id);
    size_t u = 0;
    for (size_t i = 0; i < n; i++)
        if (u == 0 || ids[u - 1] != ids[i])
            ids[u++] = ids[i];
    *out = ids;
    *count = u;
    return 0;
bad:
    cm_free(ids);
    return UV_EINVAL;
}

void on_stream_reject(cm_http_request_t *req, on_app_t *app, int status, const char *code,
                      const char *message, const char *headers)
{
    cm_counter_inc(app->m.ws_rejected);
    cm_log_debug("order stream request refused", "code", code, "peer", cm_http_conn_peer(req->conn),
                 NULL);
    cm_http_respond_error(req, status, code, message, headers);
}

/* The token, from `Authorization: Bearer` (RFC 6750 §2.1) or `?access_token` (§2.3), into
 * token (TOKEN_MAX + 1 bytes). Returns its length (0: none sent), UV_ENOMEM, UV_EEXIST (sent
 * twice: §2 allows one method, and one copy; *why says so, a 400) or UV_EINVAL (sent but not
 * usable as one, *why says why, a 401). A token that is there but cannot be one is refused
 * as such, not taken for none. */
static int read_token(const cm_http_request_t *req, char *token, const char **why)
{
    char probe[1];
    int in_query = cm_http_query_param(req, "access_token", probe, sizeof probe);
    if (in_query == UV_ENOMEM)
        return in_query;
    if (in_query == UV_EEXIST) {
        *why = "repeated access_token query parameter";
        return UV_EEXIST;
    }
    const char *auth = cm_http_header(req, "Authorization");
    /* The scheme is the first word (RFC 9110 §11.4); another scheme (Basic) is not ours. */
    size_t scheme = auth ? strcspn(auth, " \t") : 0;
    if (scheme == 6 && strncasecmp(auth, "Bearer", 6) == 0) {
        if (in_query != UV_ENOENT) {
            *why = "the token is sent twice: in Authorization and in access_token";
            return UV_EEXIST;
        }
        /* b64token after exactly one method's worth of spaces (RFC 6750 §2.1: 1*SP). */
        if (auth[6] == '\t') {
            *why = "malformed Authorization header (expected \"Bearer <token>\")";
            return UV_EINVAL;
        }
        const char *t = auth + 6;
        while (*t == ' ')
            t++;
        size_t n = strlen(t);
        if (n > TOKEN_MAX) {
            *why = "token longer than 4096 bytes";
            return UV_EINVAL;
        }
        memcpy(token, t, n + 1);
        return (int)n;
    }
    if (in_query == UV_ENOENT)
        return 0;
    int n = cm_http_query_param(req, "access_token", token, TOKEN_MAX + 1);
    if (n == UV_E2BIG) {
        *why = "token longer than 4096 bytes";
        return UV_EINVAL;
    }
    return n;
}

int on_stream_request_parse(cm_http_request_t *req, on_app_t *app, const char *last_id,
                            on_stream_request_t *out)
{
    memset(out, 0, sizeof *out);
    /* Once for the whole query: a malformed one is a bad request whichever parameter would
     * have been read first (`?access_token=%zz` was an invalid last_event_id). */
    if (cm_http_query_check(req) != 0) {
        on_stream_reject(req, app, 400, "bad_request", "malformed query string", NULL);
        return UV_EINVAL;
    }
    char token[TOKEN_MAX + 1];
    const char *why = NULL;
    int got = read_token(req, token, &why);
    if (got == UV_ENOMEM) {
        cm_http_respond_error(req, 503, "out_of_memory", "out of memory", NULL);
        return UV_ENOMEM;
    }
    if (got == UV_EEXIST) {
        on_stream_reject(req, app, 400, "bad_request", why, NULL);
        return UV_EINVAL;
    }
    if (got < 0) {
        on_stream_reject(
            req, app, 401, "invalid_token", why,
            "WWW-Authenticate: Bearer realm=\"order-notifier\", error=\"invalid_token\"\r\n");
        return UV_EINVAL;
    }
    size_t token_len = (size_t)got;
    if (token_len == 0) {
        on_stream_reject(req, app, 401, "missing_token", "a bearer token is required",
                         "WWW-Authenticate: Bearer realm=\"order-notifier\"\r\n");
        return UV_EINVAL;
    }
    on_jwt_claims_t claims;
    int rc = on_jwt_verify(token, token_len, app->cfg.jwt_secret, strlen(app->cfg.jwt_secret),
                           (int64_t)time(NULL), &claims);
    if (rc != 0) {
        on_stream_reject(
            req, app, 401, "invalid_token", on_jwt_strerror(rc),
            "WWW-Authenticate: Bearer realm=\"order-notifier\", error=\"invalid_token\"\r\n");
        return UV_EINVAL;
    }

    int64_t resume_from = -1;
    char last[128];
    if (last_id) {
        size_t n = strlen(last_id);
        rc = n > 0 && n < sizeof last ? (int)n : UV_EINVAL;
        if (rc > 0)
            memcpy(last, last_id, n + 1);
    } else {
        rc = cm_http_query_param(req, "last_event_id", last, sizeof last);
    }
    if (rc == UV_EEXIST) {
        on_stream_reject(req, app, 400, "bad_request", "repeated last_event_id query parameter",
                         NULL);
        return UV_EINVAL;
    }
    if (rc != UV_ENOENT) {
        /* Digits only (the contract's ^[0-9]+$): strtoll alone would also take leading
         * whitespace and a sign ("%205" read as 5); leading zeros are fine. */
        const char *digits = last;
        while (rc > 0 && *digits == '0' && digits[1])
            digits++;
        int all_digits = rc > 0 && last[strspn(last, "0123456789")] == '\0';
        char *end = NULL;
        errno = 0;
        long long v = all_digits ? strtoll(digits, &end, 10) : -1;
        if (!all_digits || *end || errno || v < 0) {
            on_stream_reject(req, app, 400, "invalid_last_event_id",
                             "last_event_id must be a non-negative integer", NULL);
            return UV_EINVAL;
        }
        resume_from = v;
    }
    int64_t *recent = NULL;
    size_t nrecent = 0;
    char *recent_text = cm_malloc(RECENT_TEXT_MAX);
    rc = recent_text ? cm_http_query_param(req, "recent_event_ids", recent_text, RECENT_TEXT_MAX)
                     : UV_ENOMEM;
    if (rc == UV_EEXIST) {
        cm_free(recent_text);
        on_stream_reject(req, app, 400, "bad_request", "repeated recent_event_ids query parameter",
                         NULL);
        return UV_EINVAL;
    }
    if (rc != UV_ENOENT) {
        if (rc >= 0)
            rc = resume_from >= 0 ? parse_recent(recent_text, resume_from, &recent, &nrecent)
                                  : UV_EINVAL;
        if (rc == UV_ENOMEM) {
            cm_free(recent_text);
            cm_http_respond_error(req, 503, "out_of_memory", "out of memory", NULL);
            return UV_ENOMEM;
        }
        if (rc < 0) {
            cm_free(recent_text);
            on_stream_reject(req, app, 400, "invalid_recent_event_ids",
                             "recent_event_ids must be up to 256 comma-separated ids, none above "
                             "last_event_id (which it requires)",
                             NULL);
            return UV_EINVAL;
        }
    }
    cm_free(recent_text);
    if (on_hub_clients(app->hub) >= (size_t)app->cfg.ws_max_connections) {
        cm_free(recent);
        on_stream_reject(req, app, 503, "too_many_connections", "connection limit reached",
                         "Retry-After: 1\r\n");
        return UV_EINVAL;
    }

    out->claims = claims;
    out->resume_from = resume_from;
    out->recent = recent;
    out->nrecent = nrecent;
    return 0;
}
