#include "cm/redact.h"

#include <ctype.h>
#include <string.h>
#include <strings.h>
#include <uriparser/Uri.h>

/* A bounded writer: appends what fits, always NUL-terminated. */
typedef struct out {
    char *p;
    size_t cap, len;
} out_t;

static void put(out_t *o, const char *s, size_t n)
{
    if (o->cap == 0)
        return;
    size_t room = o->cap - 1 - o->len;
    if (n > room)
        n = room;
    memcpy(o->p + o->len, s, n);
    o->len += n;
    o->p[o->len] = '\0';
}

static void puts_(out_t *o, const char *s)
{
    put(o, s, strlen(s));
}

static int mentions_password(const char *s)
{
    for (; *s; s++) {
        if (strncasecmp(s, "password", 8) == 0)
            return 1;
    }
    return 0;
}

/* The URI's password: the userinfo after its first ':' (RFC 3986 §3.2.1). Sets *first and
 * *after, or returns 0 when there is none. */
static int uri_password(const UriUriA *uri, const char **first, const char **after)
{
    if (!uri->userInfo.first || uri->userInfo.afterLast <= uri->userInfo.first)
        return 0;
    const char *colon =
        memchr(uri->userInfo.first, ':', (size_t)(uri->userInfo.afterLast - uri->userInfo.first));
    if (!colon)
        return 0;
    *first = colon + 1;
    *after = uri->userInfo.afterLast;
    return 1;
}

/* Not a URI uriparser accepts (a typo, a libpq multi-host list): nothing in it can be located
 * with confidence, so everything that could be a credential goes. */
static void redact_unparsed(const char *url, out_t *o)
{
    const char *sep = strstr(url, "://");
    int has_at = strchr(url, '@') != NULL;
    if (!sep) {
        puts_(o, has_at || mentions_password(url) ? CM_REDACTED : url);
        return;
    }
    const char *at = strrchr(url, '@');
    if (mentions_password(sep) || (at && mentions_password(at))) {
        put(o, url, (size_t)(sep + 3 - url));
        puts_(o, CM_REDACTED);
    } else if (at) {
        put(o, url, (size_t)(sep + 3 - url));
        puts_(o, CM_REDACTED);
        puts_(o, at);
    } else {
        puts_(o, url);
    }
}

/* "user:pw@host" reads as scheme "user" and a path, "redis:///:pw@host" (a slash too many) as
 * an empty host and a path, "redis://u#x:pw@host" (a '#', '?' or '/' left unescaped in the
 * credentials) as host "u" and a fragment, "redis://d@e#x:pw@host" as user "d", host "e" and
 * a fragment (found by fuzz_config): RFC 3986 puts no credentials there, but for a mistyped
 * URL that is where they are. An empty host, or an '@' past the authority, only counts with a
 * ':' before it ("unix:///run/redis@1.sock" holds no password). */
static int mistyped(const UriUriA *uri, const char *url)
{
    const char *sep = strstr(url, "://");
    const char *last_at = strrchr(url, '@');
    if (!uri->hostText.first)
        return last_at != NULL;
    int empty_host = uri->hostText.first == uri->hostText.afterLast;
    if (empty_host && sep && last_at > sep && memchr(sep + 3, ':', (size_t)(last_at - sep - 3)))
        return 1;
    const char *auth_end = uri->portText.first ? uri->portText.afterLast : uri->hostText.afterLast;
    return last_at > auth_end && memchr(auth_end, ':', (size_t)(last_at - auth_end));
}

/* The password of a URL uriparser cannot read (or a mistyped one), as a guess: what follows
 * the first ':' after "scheme://" (or the start) up to the last '@' (the part redact_unparsed
 * hides), or up to the first '@' after it (where libpq ends it: "bob:p@ss@host" is a password
 * with an '@' left unescaped). *after and *after2 are the two ends (the same when there is one
 * '@'); a guess shorter than 4 bytes is not made (it would mask letters all over a message). */
static int unparsed_password(const char *url, const char **first, const char **after,
                             const char **after2)
{
    const char *sep = strstr(url, "://");
    const char *start = sep ? sep + 3 : url;
    const char *at = strrchr(start, '@');
    const char *colon = at ? memchr(start, ':', (size_t)(at - start)) : NULL;
    if (!colon || at - colon - 1 < 4)
        return 0;
    *first = colon + 1;
    *after = at;
    *after2 = strchr(colon + 1, '@');
    if (*after2 - *first < 4)
        *after2 = at;
    return 1;
}

static void redact_url(const char *url, out_t *o)
{
    UriUriA uri;
    const char *errpos = NULL;
    if (uriParseSingleUriA(&uri, url, &errpos) != URI_SUCCESS) {
        redact_unparsed(url, o);
        return;
    }
    if (mistyped(&uri, url)) {
        uriFreeUriMembersA(&uri);
        redact_unparsed(url, o);
        return;
    }
    const char *end = url + strlen(url);
    const char *pw = NULL, *pw_end = NULL;
    int has_pw = uri_password(&uri, &pw, &pw_end);
    /* A query is dropped whole when it names a password: its parameters' syntax is the
     * client library's, not RFC 3986's. */
    const char *q = uri.query.first;
    int drop_query = q && mentions_password(q);
    const char *p = url;
    if (has_pw) {
        put(o, p, (size_t)(pw - p));
        puts_(o, CM_REDACTED);
        p = pw_end;
    }
    if (drop_query) {
        put(o, p, (size_t)(q - p));
        puts_(o, CM_REDACTED);
        p = uri.query.afterLast;
    }
    put(o, p, (size_t)(end - p));
    uriFreeUriMembersA(&uri);
}

const char *cm_redact_url(const char *url, char *out, size_t outsz)
{
    out_t o = {out, outsz, 0};
    if (outsz)
        out[0] = '\0';
    if (url)
        redact_url(url, &o);
    return out;
}

/* Non-zero when the n bytes at s are shaped like a libpq keyword (letters, digits, '_') and
 * start a token of src followed by '=' (an unknown option name, not a value). Anything else a
 * parser quotes back may hold a password: with a mistyped scheme, libpq reads
 * "postgresql:/bob:pw@db/x?sslmode=disable" as key=value and calls all of it before the '=' an
 * invalid option. */
static int is_keyword(const char *src, const char *s, size_t n)
{
    if (n == 0 || n > 64)
        return 0;
    for (size_t i = 0; i < n; i++) {
        if (!isalnum((unsigned char)s[i]) && s[i] != '_')
            return 0;
    }
    for (const char *f = src; *f; f++) {
        int start = f == src || isspace((unsigned char)f[-1]) || f[-1] == '?' || f[-1] == '&';
        if (start && strncmp(f, s, n) == 0 && f[n] == '=')
            return 1;
    }
    return 0;
}

const char *cm_redact_message(const char *msg, const char *source, char *out, size_t outsz)
{
    out_t o = {out, outsz, 0};
    if (outsz)
        out[0] = '\0';
    if (!msg)
        return out;
    if (!source || !*source) {
        puts_(&o, msg);
        return out;
    }
    char masked[512];
    cm_redact_url(source, masked, sizeof masked);
    size_t slen = strlen(source);
    /* The password, when uriparser can find one: replaced wherever it shows up unquoted. */
    const char *pw = NULL, *pw_end = NULL;
    UriUriA uri;
    const char *errpos = NULL;
    int parsed = uriParseSingleUriA(&uri, source, &errpos) == URI_SUCCESS;
    const char *pw_end2 = NULL;
    int found = parsed && !mistyped(&uri, source)
                    ? uri_password(&uri, &pw, &pw_end)
                    : unparsed_password(source, &pw, &pw_end, &pw_end2);
    size_t pwlen = found ? (size_t)(pw_end - pw) : 0;
    size_t pwlen2 = found && pw_end2 ? (size_t)(pw_end2 - pw) : 0; /* <= pwlen */

    /* The source, then quoted parts (before the password: a guessed password may begin
     * with a '"' and must not take the quote away from what it opens), then the password. */
    for (const char *p = msg; *p;) {
        if (strncmp(p, source, slen) == 0) {
            puts_(&o, masked);
            p += slen;
        } else if (*p == '"') {
            const char *q = p + 1;
            /* libpq quotes what it read without escaping it: when the source holds a '"',
             * `invalid connection option "a"b:pw"` quotes a"b:pw, and the next '"' would end
             * the quoted part too early, leaving the rest outside. Where the quotes cannot be
             * told apart, all of it up to the last '"' is one quoted part. A quote that is not
             * closed (the message was cut at a line break, inside it) runs to the end. */
            const char *close = strchr(source, '"') ? strrchr(q, '"') : strchr(q, '"');
            int closed = close != NULL;
            if (!closed)
                close = q + strlen(q);
            size_t n = (size_t)(close - q);
            /* Whatever else libpq quotes (a token it choked on, a parameter) may be a piece of
             * a password. */
            int keep = is_keyword(source, q, n) || (n == 1 && !isalnum((unsigned char)*q)) ||
                       (n == 0 && !closed) ||
                       (n == strlen(masked) && strncmp(q, masked, n) == 0); /* done already */
            if (n == slen && strncmp(q, source, n) == 0) {
                put(&o, "\"", 1);
                puts_(&o, masked);
                put(&o, "\"", closed);
            } else if (keep) {
                put(&o, p, n + 1 + closed);
            } else {
                put(&o, "\"" CM_REDACTED "\"", 4 + closed);
            }
            p = q + n + closed;
        } else if ((pwlen && strncmp(p, pw, pwlen) == 0) ||
                   (pwlen2 && strncmp(p, pw, pwlen2) == 0)) {
            /* A quoted part is taken whole by the branch above, so a match here must not take
             * a '"' of the message with it: what that quote opens would be left outside any
             * quotes, in clear (`option "pos...` matched the guessed password `ion "pos`;
             * found by fuzz_url). Up to the quote is redacted; the quote starts a part. */
            size_t n = strncmp(p, pw, pwlen) == 0 ? pwlen : pwlen2;
            const char *quote = memchr(p, '"', n);
            puts_(&o, CM_REDACTED);
            p += quote ? (size_t)(quote - p) : n;
        } else {
            put(&o, p, 1);
            p++;
        }
    }
    if (parsed)
        uriFreeUriMembersA(&uri);
    return out;
}
