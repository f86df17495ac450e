/*
 * redis_url.c: REDIS_URL parsing (cm_redis_url_parse) and its config check, with uriparser.
 */
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include <uriparser/Uri.h>
#include <uv.h>

#include "cm/redis.h"

/* Percent-decodes `s` in place; a %00 would cut it short without a word (a password `pw%00x`
 * read as `pw`), so it is refused. */
static int unescape_in_place(char *s)
{
    const char *end = uriUnescapeInPlaceExA(s, URI_FALSE, URI_BR_DONT_TOUCH);
    return end && (size_t)(end - s) == strlen(s) ? 0 : UV_EINVAL;
}

static int copy_range(char *dst, size_t cap, const char *first, const char *after, int unescape)
{
    size_t n = (first && after && after > first) ? (size_t)(after - first) : 0;
    if (n >= cap)
        return UV_EINVAL;
    if (n)
        memcpy(dst, first, n);
    dst[n] = '\0';
    return unescape ? unescape_in_place(dst) : 0;
}

static int parse_uint(const char *s, long max, long *out)
{
    if (!*s)
        return UV_EINVAL;
    long v = 0;
    for (const char *p = s; *p; p++) {
        if (*p < '0' || *p > '9')
            return UV_EINVAL;
        v = v * 10 + (*p - '0');
        if (v > max)
            return UV_EINVAL;
    }
    *out = v;
    return 0;
}

/* Reads "db=N" from the query of a unix:// URL. */
static int parse_query_db(const UriUriA *uri, int *db)
{
    char q[64];
    if (!uri->query.first)
        return 0;
    if (copy_range(q, sizeof q, uri->query.first, uri->query.afterLast, 0) != 0)
        return UV_EINVAL;
    if (strncmp(q, "db=", 3) != 0)
        return UV_EINVAL;
    long v;
    if (parse_uint(q + 3, 1 << 20, &v) != 0)
        return UV_EINVAL;
    *db = (int)v;
    return 0;
}

int cm_redis_url_parse(const char *url, cm_redis_url_t *out)
{
    UriUriA uri;
    const char *errpos = NULL;
    int rc = UV_EINVAL;
    char scheme[16];
    char tmp[64];

    if (!url || !out)
        return UV_EINVAL;
    memset(out, 0, sizeof *out);
    out->port = 6379;
    if (uriParseSingleUriA(&uri, url, &errpos) != URI_SUCCESS)
        return UV_EINVAL;
    if (copy_range(scheme, sizeof scheme, uri.scheme.first, uri.scheme.afterLast, 0) != 0)
        goto done;
    if (uri.fragment.first)
        goto done;

    if (strcasecmp(scheme, "unix") == 0) {
        /* unix:///path/to.sock[?db=N]: empty authority, absolute path. A user, password or
         * port there would be dropped without a word (unix://pw%00x@:/s passed): refused. */
        if ((uri.hostText.first && uri.hostText.afterLast != uri.hostText.first) ||
            uri.userInfo.first || uri.portText.first)
            goto done;
        size_t len = 0;
        for (UriPathSegmentA *seg = uri.pathHead; seg; seg = seg->next) {
            size_t n = (size_t)(seg->text.afterLast - seg->text.first);
            if (len + 1 + n >= sizeof out->path)
                goto done;
            out->path[len++] = '/';
            memcpy(out->path + len, seg->text.first, n);
            len += n;
        }
        out->path[len] = '\0';
        if (unescape_in_place(out->path) != 0 || strlen(out->path) < 2)
            goto done;
        if (parse_query_db(&uri, &out->db) != 0)
            goto done;
        out->is_unix = 1;
        out->port = 0;
        rc = 0;
        goto done;
    }
    if (strcasecmp(scheme, "redis") != 0)
        goto done; /* rediss:// (TLS) is not supported by hiredis 0.14.1 */
    if (uri.query.first)
        goto done;
    if (copy_range(out->host, sizeof out->host, uri.hostText.first, uri.hostText.afterLast, 1) !=
            0 ||
        !out->host[0])
        goto done;
    if (uri.portText.first) {
        long port;
        if (copy_range(tmp, sizeof tmp, uri.portText.first, uri.portText.afterLast, 0) != 0 ||
            parse_uint(tmp, 65535, &port) != 0 || port == 0)
            goto done;
        out->port = (int)port;
    }
    if (uri.userInfo.first) {
        const char *colon =
            memchr(uri.userInfo.first, ':', (size_t)(uri.userInfo.afterLast - uri.userInfo.first));
        const char *user_end = colon ? colon : uri.userInfo.afterLast;
        if (copy_range(out->user, sizeof out->user, uri.userInfo.first, user_end, 1) != 0)
            goto done;
        if (colon && copy_range(out->password, sizeof out->password, colon + 1,
                                uri.userInfo.afterLast, 1) != 0)
            goto done;
    }
    if (uri.pathHead) {
        /* "/" alone gives one empty segment; "/3" gives "3"; more segments are an error. */
        if (uri.pathHead->next)
            goto done;
        if (copy_range(tmp, sizeof tmp, uri.pathHead->text.first, uri.pathHead->text.afterLast,
                       0) != 0)
            goto done;
        if (tmp[0]) {
            long db;
            if (parse_uint(tmp, 1 << 20, &db) != 0)
                goto done;
            out->db = (int)db;
        }
    }
    rc = 0;
done:
    uriFreeUriMembersA(&uri);
    if (rc != 0)
        memset(out, 0, sizeof *out);
    return rc;
}

int cm_redis_url_check(const char *url, char *why, size_t whysz)
{
    cm_redis_url_t u;
    if (cm_redis_url_parse(url, &u) == 0)
        return 0;
    snprintf(why, whysz, "expected redis://[user:password@]host[:port][/db] or unix:///path");
    return UV_EINVAL;
}
