/*
 * config.c: validated 12-factor configuration getters (the KEY=VALUE override file they consult
 * is config_file.c).
 *
 * Every getter funnels its raw value through raw_value() (file first, then the lookup
 * function) and reports the first failure into c->error as one line that names the key, says
 * what was expected and quotes what it got (sanitised, so a stray control byte cannot break the
 * one-line contract of the startup message).
 */
#include "cm/config.h"
#include "config_internal.h"

#include "cm/alloc.h"
#include "cm/redact.h"

#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <uv.h>

/* ------------------------------------------------------------------------------------------ */
/* Helpers                                                                                     */
/* ------------------------------------------------------------------------------------------ */

/* Quoted values in messages are cut to this many bytes so the message fits c->error. */
#define QUOTE_MAX 64

static const char *env_lookup(const char *key, void *ud)
{
    (void)ud;
    return getenv(key);
}

/* Copies `len` bytes of `s` into dst for a message: control bytes become '?', long values are
 * cut with "...". */
static void quote_value(char *dst, size_t dstsz, const char *s, size_t len)
{
    size_t n = 0;
    for (size_t i = 0; i < len && n + 4 < dstsz; i++) {
        if (i == QUOTE_MAX) {
            memcpy(dst + n, "...", 3);
            n += 3;
            break;
        }
        unsigned char ch = (unsigned char)s[i];
        dst[n++] = (ch < 0x20 || ch == 0x7f) ? '?' : (char)ch;
    }
    dst[n] = '\0';
}

static void set_error(cm_config_t *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void set_error(cm_config_t *c, const char *fmt, ...)
{
    if (c->failed)
        return;
    c->failed = 1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->error, sizeof c->error, fmt, ap);
    va_end(ap);
    /* One line whatever went into it: quote_value sanitises the values a getter quotes, but
     * a check's complaint (cm_config_checked: libpq quotes DATABASE_URL back) or a
     * CONFIG_FILE path arrive as they are. */
    for (char *p = c->error; *p; p++) {
        if ((unsigned char)*p < 0x20 || *p == 0x7f)
            *p = '?';
    }
}

/* Records "KEY: expected <what>, got '<value>'" and returns UV_EINVAL. */
static int fail_value(cm_config_t *c, const char *key, const char *what, const char *v, size_t len)
{
    char q[QUOTE_MAX + 8];
    quote_value(q, sizeof q, v, len);
    set_error(c, "%s: expected %s, got '%s'", key, what, q);
    return UV_EINVAL;
}

static int file_may_override(const cm_config_t *c, const char *key)
{
    if (!c->file)
        return 0;
    if (!c->file_keys)
        return 1;
    for (const char *const *k = c->file_keys; *k; k++) {
        if (strcmp(*k, key) == 0)
            return 1;
    }
    return 0;
}

/* The raw value of key, or NULL when absent or empty (both mean "use the default"). A file
 * value that is empty does not hide the environment. */
static const char *raw_value(const cm_config_t *c, const char *key)
{
    if (file_may_override(c, key)) {
        const char *v = cm_config_file_get(c->file, key);
        if (v && *v)
            return v;
    }
    const char *v = c->lookup ? c->lookup(key, c->ud) : NULL;
    return (v && *v) ? v : NULL;
}

/* Like raw_value but trimmed; returns 0 when absent, empty or only whitespace. */
static int trimmed_value(const cm_config_t *c, const char *key, const char **s, size_t *len)
{
    const char *v = raw_value(c, key);
    if (!v)
        return 0;
    *s = v;
    *len = strlen(v);
    trim(s, len);
    return *len != 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Initialisation                                                                              */
/* ------------------------------------------------------------------------------------------ */

void cm_config_init(cm_config_t *c, cm_config_lookup_fn lookup, void *ud)
{
    memset(c, 0, sizeof *c);
    c->lookup = lookup;
    c->ud = ud;
}

void cm_config_init_env(cm_config_t *c)
{
    cm_config_init(c, env_lookup, NULL);
}

/* ------------------------------------------------------------------------------------------ */
/* Getters                                                                                     */
/* ------------------------------------------------------------------------------------------ */

int cm_config_str(cm_config_t *c, const char *key, const char *def, const char **out)
{
    const char *v = raw_value(c, key);
    *out = v ? v : def;
    return 0;
}

static int parse_bool(const char *s, size_t len, int *out)
{
    static const char *const truthy[] = {"true", "1", "yes", "on"};
    static const char *const falsy[] = {"false", "0", "no", "off"};
    for (size_t i = 0; i < 4; i++) {
        if (strlen(truthy[i]) == len && strncasecmp(s, truthy[i], len) == 0) {
            *out = 1;
            return 0;
        }
        if (strlen(falsy[i]) == len && strncasecmp(s, falsy[i], len) == 0) {
            *out = 0;
            return 0;
        }
    }
    return UV_EINVAL;
}

int cm_config_bool(cm_config_t *c, const char *key, int def, int *out)
{
    *out = def ? 1 : 0;
    const char *s;
    size_t len;
    if (!trimmed_value(c, key, &s, &len))
        return 0;
    int v;
    if (parse_bool(s, len, &v) != 0)
        return fail_value(c, key, "true or false (or 1/0, yes/no, on/off)", s, len);
    *out = v;
    return 0;
}

/* Decimal with optional sign, every byte consumed; no strtol so that " 12", "0x1f", "1e3" and
 * "12ms" are all refused rather than half-read. */
static int parse_long(const char *s, size_t len, long *out)
{
    size_t i = 0;
    int neg = 0;
    if (i < len && (s[i] == '+' || s[i] == '-'))
        neg = s[i++] == '-';
    if (i == len)
        return UV_EINVAL;
    unsigned long limit = neg ? (unsigned long)LONG_MAX + 1 : (unsigned long)LONG_MAX;
    unsigned long acc = 0;
    for (; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return UV_EINVAL;
        unsigned d = (unsigned)(s[i] - '0');
        if (acc > (limit - d) / 10)
            return UV_ERANGE;
        acc = acc * 10 + d;
    }
    *out = neg ? (long)(0 - acc) : (long)acc;
    return 0;
}

int cm_config_int(cm_config_t *c, const char *key, long def, long min, long max, long *out)
{
    *out = def;
    const char *s;
    size_t len;
    if (!trimmed_value(c, key, &s, &len))
        return 0;
    long v;
    int rc = parse_long(s, len, &v);
    if (rc != 0 || v < min || v > max) {
        char what[96];
        snprintf(what, sizeof what, "an integer from %ld to %ld", min, max);
        return fail_value(c, key, what, s, len);
    }
    *out = v;
    return 0;
}

static int enum_find(const char *const *allowed, const char *s, size_t len)
{
    for (int i = 0; allowed[i]; i++) {
        if (strlen(allowed[i]) == len && memcmp(allowed[i], s, len) == 0)
            return i;
    }
    return -1;
}

int cm_config_enum(cm_config_t *c, const char *key, const char *def, const char *const *allowed,
                   int *index_out)
{
    int d = def ? enum_find(allowed, def, strlen(def)) : -1;
    *index_out = d < 0 ? 0 : d;
    if (d < 0) {
        set_error(c, "%s: default '%s' is not an allowed value", key, def ? def : "(null)");
        return UV_EINVAL;
    }
    const char *s;
    size_t len;
    if (!trimmed_value(c, key, &s, &len))
        return 0;
    int i = enum_find(allowed, s, len);
    if (i < 0) {
        char what[160];
        size_t n = (size_t)snprintf(what, sizeof what, "one of");
        for (int k = 0; allowed[k] && n < sizeof what; k++)
            n += (size_t)snprintf(what + n, sizeof what - n, "%s %s", k ? "," : "", allowed[k]);
        return fail_value(c, key, what, s, len);
    }
    *index_out = i;
    return 0;
}

static int host_char(char ch, int bracketed)
{
    if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9'))
        return 1;
    if (ch == '.' || ch == '-' || ch == '_')
        return 1;
    return bracketed && (ch == ':' || ch == '%');
}

/* Splits "host:port" / "[v6]:port" without allocating. */
static int parse_listen(const char *s, size_t len, int allow_zero, char *host, size_t hostsz,
                        int *port)
{
    const char *h;
    size_t hlen;
    const char *p;
    int bracketed = len > 0 && s[0] == '[';
    if (bracketed) {
        const char *close = memchr(s, ']', len);
        if (!close || (size_t)(close - s) + 1 >= len || close[1] != ':')
            return UV_EINVAL;
        h = s + 1;
        hlen = (size_t)(close - h);
        p = close + 2;
    } else {
        const char *colon = NULL;
        for (size_t i = 0; i < len; i++) {
            if (s[i] == ':') {
                if (colon)
                    return UV_EINVAL; /* an IPv6 literal needs brackets */
                colon = s + i;
            }
        }
        if (!colon)
            return UV_EINVAL;
        h = s;
        hlen = (size_t)(colon - s);
        p = colon + 1;
    }
    size_t plen = (size_t)(s + len - p);
    if (hlen == 0 || hlen >= hostsz || plen == 0 || plen > 5)
        return UV_EINVAL;
    for (size_t i = 0; i < hlen; i++) {
        if (!host_char(h[i], bracketed))
            return UV_EINVAL;
    }
    long v = 0;
    for (size_t i = 0; i < plen; i++) {
        if (p[i] < '0' || p[i] > '9')
            return UV_EINVAL;
        v = v * 10 + (p[i] - '0');
    }
    if (v > 65535 || (v == 0 && !allow_zero))
        return UV_EINVAL;
    memcpy(host, h, hlen);
    host[hlen] = '\0';
    *port = (int)v;
    return 0;
}

int cm_config_listen(cm_config_t *c, const char *key, const char *def, char *host, size_t hostsz,
                     int *port)
{
    if (hostsz)
        host[0] = '\0';
    *port = 0;
    if (!def || parse_listen(def, strlen(def), c->allow_port_zero, host, hostsz, port) != 0) {
        set_error(c, "%s: default '%s' is not a valid host:port", key, def ? def : "(null)");
        return UV_EINVAL;
    }
    const char *s;
    size_t len;
    if (!trimmed_value(c, key, &s, &len))
        return 0;
    char tmp_host[256];
    int tmp_port;
    size_t tmpsz = hostsz < sizeof tmp_host ? hostsz : sizeof tmp_host;
    if (parse_listen(s, len, c->allow_port_zero, tmp_host, tmpsz, &tmp_port) != 0) {
        return fail_value(c, key,
                          c->allow_port_zero
                              ? "host:port or [ipv6]:port with a port from 0 to 65535"
                              : "host:port or [ipv6]:port with a port from 1 to 65535",
                          s, len);
    }
    memcpy(host, tmp_host, strlen(tmp_host) + 1);
    *port = tmp_port;
    return 0;
}

void cm_config_list_free(char **items, size_t count)
{
    if (!items)
        return;
    for (size_t i = 0; i < count; i++)
        cm_free(items[i]);
    cm_free(items);
}

/* Splits s into trimmed items. Returns 0, UV_EINVAL on an empty item, UV_ENOMEM. */
static int split_list(const char *s, size_t len, char ***items, size_t *count)
{
    *items = NULL;
    *count = 0;
    if (len == 0)
        return 0;
    size_t n = 1;
    for (size_t i = 0; i < len; i++)
        n += s[i] == ',';
    char **arr = cm_calloc(n, sizeof *arr);
    if (!arr)
        return UV_ENOMEM;
    size_t k = 0;
    const char *start = s;
    const char *end = s + len;
    while (k < n) {
        const char *comma = memchr(start, ',', (size_t)(end - start));
        const char *stop = comma ? comma : end;
        const char *item = start;
        size_t ilen = (size_t)(stop - start);
        trim(&item, &ilen);
        if (ilen == 0) {
            cm_config_list_free(arr, k);
            return UV_EINVAL;
        }
        arr[k] = cm_strndup(item, ilen);
        if (!arr[k]) {
            cm_config_list_free(arr, k);
            return UV_ENOMEM;
        }
        k++;
        start = stop + 1;
    }
    *items = arr;
    *count = n;
    return 0;
}

int cm_config_list(cm_config_t *c, const char *key, const char *def, char ***items, size_t *count)
{
    *items = NULL;
    *count = 0;
    const char *s;
    size_t len;
    int rc = 0;
    if (trimmed_value(c, key, &s, &len)) {
        rc = split_list(s, len, items, count);
        if (rc == 0)
            return 0;
        if (rc == UV_ENOMEM) {
            set_error(c, "%s: out of memory", key);
            return rc;
        }
        rc = fail_value(c, key, "a comma-separated list without empty items", s, len);
    }
    /* Absent, empty or invalid: the caller gets the default, parsed the same way. */
    const char *d = def ? def : "";
    size_t dlen = strlen(d);
    trim(&d, &dlen);
    int drc = split_list(d, dlen, items, count);
    if (drc == UV_ENOMEM) {
        set_error(c, "%s: out of memory", key);
        return drc;
    }
    if (drc != 0) {
        set_error(c, "%s: default '%s' is not a valid list", key, def);
        return drc;
    }
    return rc;
}

/* ---- what both daemons read the same way ---------------------------------------------- */

int cm_config_app_env(cm_config_t *c)
{
    /* A typo ("Production", "prod") must not quietly mean development defaults. */
    static const char *const envs[] = {"development", "production", NULL};
    int idx = 0;
    int rc = cm_config_enum(c, "APP_ENV", "development", envs, &idx);
    c->production = rc == 0 && idx == 1;
    return rc;
}

int cm_config_reject(cm_config_t *c, const char *key, const char *what)
{
    set_error(c, "%s: %s", key, what);
    return UV_EINVAL;
}

int cm_config_checked(cm_config_t *c, const char *key, const char *dev_default,
                      cm_config_check_fn check, const char **out)
{
    cm_config_str(c, key, c->production ? NULL : dev_default, out);
    if (!*out)
        return cm_config_reject(c, key, "required when APP_ENV=production");
    char why[192], safe[192];
    if (check(*out, why, sizeof why) != 0) {
        /* The values checked this way are URLs and connection strings: whatever the check
         * says about one must not show its password. */
        return cm_config_reject(c, key, cm_redact_message(why, *out, safe, sizeof safe));
    }
    return 0;
}

int cm_config_weak_secret(const char *value, size_t min_len, const char *const *known, char *why,
                          size_t whysz)
{
    const char *s = value;
    size_t len = strlen(value);
    trim(&s, &len);
    for (const char *const *k = known; k && *k; k++) {
        /* Surrounding whitespace (a trailing newline from a file) does not make it new. */
        if (strlen(*k) == len && memcmp(*k, s, len) == 0) {
            snprintf(why, whysz,
                     "a value published in the repository (an example or a "
                     "default): generate one, e.g. openssl rand -hex 32");
            return UV_EINVAL;
        }
    }
    static const char *const placeholders[] = {"change-me", "changeme", "change_me"};
    for (size_t i = 0; i < sizeof placeholders / sizeof *placeholders; i++) {
        size_t plen = strlen(placeholders[i]);
        for (size_t j = 0; j + plen <= len; j++) {
            if (strncasecmp(s + j, placeholders[i], plen) == 0) {
                snprintf(why, whysz,
                         "still a placeholder (change-me): generate one, e.g. "
                         "openssl rand -hex 32");
                return UV_EINVAL;
            }
        }
    }
    if (strlen(value) < min_len) {
        snprintf(why, whysz, "too short: expected at least %zu bytes", min_len);
        return UV_EINVAL;
    }
    if (len == 0) {
        snprintf(why, whysz, "only whitespace: expected random bytes, e.g. openssl rand -hex 32");
        return UV_EINVAL;
    }
    /* Length alone accepts 32 spaces or "aaaa...": a real key has many distinct bytes (the
     * hex form of 32 random bytes has about 16). */
    unsigned char seen[256] = {0};
    size_t distinct = 0;
    for (const unsigned char *p = (const unsigned char *)value; *p; p++) {
        distinct += !seen[*p];
        seen[*p] = 1;
    }
    if (distinct < CM_CONFIG_SECRET_MIN_DISTINCT) {
        snprintf(why, whysz,
                 "fewer than %d distinct bytes: expected random bytes, e.g. openssl rand "
                 "-hex 32",
                 CM_CONFIG_SECRET_MIN_DISTINCT);
        return UV_EINVAL;
    }
    return 0;
}

int cm_config_use_file_at(cm_config_t *c, const char *path, const char *const *file_keys)
{
    char err[CM_CONFIG_ERROR_MAX - 16];
    if (cm_config_file_load(path, &c->owned_file, err, sizeof err) != 0 ||
        cm_config_file_check_keys(c->owned_file, path, file_keys, err, sizeof err) != 0) {
        set_error(c, "CONFIG_FILE: %s", err);
        return UV_EINVAL;
    }
    c->file = c->owned_file;
    c->file_keys = file_keys;
    return 0;
}

int cm_config_use_file(cm_config_t *c, const char *const *file_keys)
{
    const char *path = getenv("CONFIG_FILE");
    return path && *path ? cm_config_use_file_at(c, path, file_keys) : 0;
}

void cm_config_release(cm_config_t *c)
{
    if (c->file == c->owned_file)
        c->file = NULL;
    cm_config_file_free(c->owned_file);
    c->owned_file = NULL;
}
