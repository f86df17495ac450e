/*
 * cm/http: query parameters (percent-decoded with uriparser) and request header lookup.
 */
#include "cm/http.h"

#include "cm/alloc.h"

#include <string.h>
#include <strings.h>
#include <uriparser/Uri.h>

const char *cm_http_header(const cm_http_request_t *req, const char *name)
{
    for (size_t i = 0; i < req->nheaders; i++) {
        if (strcasecmp(req->headers[i].name, name) == 0)
            return req->headers[i].value;
    }
    return NULL;
}

static int hexval(char ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F')
        return ch - 'A' + 10;
    return -1;
}

/* A '%' must start a two-digit hex escape (RFC 3986 section 2.1), and none may be %00: it
 * would cut a key or value short for every C string function after us. */
static int escapes_valid(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '%') {
            if (i + 2 >= n || hexval(p[i + 1]) < 0 || hexval(p[i + 2]) < 0 ||
                (p[i + 1] == '0' && p[i + 2] == '0'))
                return 0;
            i += 2;
        }
    }
    return 1;
}

int cm_http_query_check(const cm_http_request_t *req)
{
    return escapes_valid(req->query, req->query_len) ? 0 : UV_EINVAL;
}

/* Copies [p, p+n) into dst (size dstsz), decodes it in place with uriparser ('+' as space).
 * Returns the decoded length or UV_E2BIG. */
static int decode_into(const char *p, size_t n, char *dst, size_t dstsz)
{
    if (n + 1 > dstsz) {
        /* Decoding never lengthens; a long raw value may still fit once decoded. */
        if (dstsz == 0)
            return UV_E2BIG;
        char tmp[1024];
        char *buf = n < sizeof tmp ? tmp : cm_malloc(n + 1);
        if (!buf)
            return UV_ENOMEM;
        memcpy(buf, p, n);
        buf[n] = '\0';
        const char *end = uriUnescapeInPlaceExA(buf, URI_TRUE, URI_BR_DONT_TOUCH);
        size_t dl = (size_t)(end - buf);
        int rc = UV_E2BIG;
        if (dl + 1 <= dstsz) {
            memcpy(dst, buf, dl + 1);
            rc = (int)dl;
        }
        if (buf != tmp)
            cm_free(buf);
        return rc;
    }
    memcpy(dst, p, n);
    dst[n] = '\0';
    const char *end = uriUnescapeInPlaceExA(dst, URI_TRUE, URI_BR_DONT_TOUCH);
    return (int)(end - dst);
}

int cm_http_query_param(const cm_http_request_t *req, const char *key, char *out, size_t outsz)
{
    size_t klen = strlen(key);
    const char *q = req->query;
    size_t n = req->query_len;
    size_t i = 0;
    char kbuf[256];
    if (!escapes_valid(q, n))
        return UV_EINVAL;
    int found = UV_ENOENT;
    while (i <= n) {
        const char *seg = q + i;
        const char *amp = memchr(seg, '&', n - i);
        size_t slen = amp ? (size_t)(amp - seg) : n - i;
        const char *eq = memchr(seg, '=', slen);
        size_t rk = eq ? (size_t)(eq - seg) : slen;
        if (slen > 0 && rk >= klen && rk <= 3 * klen) {
            int dk = decode_into(seg, rk, kbuf, sizeof kbuf);
            if (dk >= 0 && (size_t)dk == klen && memcmp(kbuf, key, klen) == 0) {
                /* Two values for one key: which one counts would depend on who reads it (a
                 * proxy may check the first, a framework take the last). */
                if (found != UV_ENOENT)
                    return UV_EEXIST;
                if (!eq) {
                    found = outsz == 0 ? UV_E2BIG : 0;
                    if (outsz)
                        out[0] = '\0';
                } else
                    found = decode_into(eq + 1, slen - rk - 1, out, outsz);
                if (found == UV_ENOMEM)
                    return found;
            }
        }
        if (!amp)
            break;
        i += slen + 1;
    }
    return found;
}
