/*
 * cm/http: the request-target (RFC 9112 section 3.2) and the Host field, read with uriparser.
 *
 * The origin-form ("/p?q", nearly every request) is split where it is, without uriparser:
 * llhttp has already checked its characters, and the hit path should not pay for a URI parse.
 * Everything else is rare and goes through uriparser.
 */
#include "http_internal.h"

#include "cm/alloc.h"

#include <string.h>
#include <strings.h>
#include <uriparser/Uri.h>

/* The target as sent: the path ends at '?' or '#', the query at '#'. */
static void split_as_sent(cm_http_request_t *r, const char *t, size_t tlen)
{
    const char *q = memchr(t, '?', tlen);
    const char *hash = memchr(t, '#', tlen);
    const char *pend = q ? q : (hash ? hash : t + tlen);
    r->path = t;
    r->path_len = (size_t)(pend - t);
    if (q) {
        r->query = q + 1;
        r->query_len = (size_t)((hash && hash > q ? hash : t + tlen) - r->query);
    } else {
        r->query = http_empty;
        r->query_len = 0;
    }
}

/* Where the authority of a parsed URI with a host ends: after the port when there is one (even
 * an empty one), else after the host, whose text leaves out an IP literal's closing ']'. */
static const char *authority_end(const UriUriA *u)
{
    if (u->portText.first)
        return u->portText.afterLast;
    if (u->hostData.ip6 || u->hostData.ipFuture.first)
        return u->hostText.afterLast + 1;
    return u->hostText.afterLast;
}

/*
 * absolute-form (RFC 9112 section 3.2.2): an origin server must accept it and take the host
 * from it. Only http and https name this server; RFC 9110 section 4.2 requires their host and
 * deprecates userinfo (section 4.2.4: treat it as an error).
 */
static int split_absolute(cm_http_request_t *r, const char *t, size_t tlen, const char **authority,
                          size_t *authority_len)
{
    UriUriA u;
    const char *err = NULL;
    if (uriParseSingleUriExA(&u, t, t + tlen, &err) != URI_SUCCESS)
        return -1;
    int rc = -1;
    size_t slen = (size_t)(u.scheme.afterLast - u.scheme.first);
    int http = u.scheme.first && ((slen == 4 && strncasecmp(u.scheme.first, "http", 4) == 0) ||
                                  (slen == 5 && strncasecmp(u.scheme.first, "https", 5) == 0));
    if (http && !u.userInfo.first && u.hostText.first && u.hostText.afterLast > u.hostText.first) {
        /* "scheme://" precedes the authority whenever there is a host. */
        const char *auth = u.scheme.afterLast + 3;
        const char *aend = authority_end(&u);
        const char *pend = u.query.first      ? u.query.first - 1
                           : u.fragment.first ? u.fragment.first - 1
                                              : t + tlen;
        /* What follows the authority is the path: empty, or starting with '/'. */
        if (aend <= pend && (aend == pend || *aend == '/')) {
            /* RFC 9112 section 3.2.1: an empty path is "/" in the origin-form. */
            r->path = aend == pend ? "/" : aend;
            r->path_len = aend == pend ? 1 : (size_t)(pend - aend);
            if (u.query.first) {
                r->query = u.query.first;
                r->query_len = (size_t)(u.query.afterLast - u.query.first);
            } else {
                r->query = http_empty;
                r->query_len = 0;
            }
            *authority = auth;
            *authority_len = (size_t)(aend - auth);
            rc = 0;
        }
    }
    uriFreeUriMembersA(&u);
    return rc;
}

int http_target_split(cm_http_request_t *r, size_t tlen, const char **authority,
                      size_t *authority_len)
{
    const char *t = r->target;
    *authority = NULL;
    *authority_len = 0;
    /* origin-form; the authority-form of CONNECT and the asterisk-form ("*") are kept whole
     * as the path, for the router to refuse. */
    if (t[0] == '/' || r->method == HTTP_CONNECT || (tlen == 1 && t[0] == '*')) {
        split_as_sent(r, t, tlen);
        return 0;
    }
    return split_absolute(r, t, tlen, authority, authority_len);
}

int http_host_valid(const char *v, size_t len)
{
    /* Host = uri-host [ ":" port ]: exactly a URI authority without userinfo. uriparser reads
     * an authority only after "//", so the value is parsed as the reference "//value". An
     * empty value is valid (RFC 9112 section 3.2: a target URI without an authority). */
    if (len == 0)
        return 1;
    char stack[256];
    char *buf = len + 2 <= sizeof stack ? stack : cm_malloc(len + 2);
    if (!buf)
        return 0;
    buf[0] = '/';
    buf[1] = '/';
    memcpy(buf + 2, v, len);
    UriUriA u;
    const char *err = NULL;
    int ok = 0;
    if (uriParseSingleUriExA(&u, buf, buf + len + 2, &err) == URI_SUCCESS) {
        ok = !u.scheme.first && !u.userInfo.first && u.hostText.first && !u.pathHead &&
             !u.absolutePath && !u.query.first && !u.fragment.first;
        uriFreeUriMembersA(&u);
    }
    if (buf != stack)
        cm_free(buf);
    return ok;
}
