/*
 * pg_target.c: the hosts of DATABASE_URL, one connect target each, and the check of the URL.
 *
 * Several hosts (failover). libpq accepts a list of hosts in DATABASE_URL and tries them in
 * order, but on the non-blocking path (PQconnectStartParams + PQconnectPoll) it does not enforce
 * connect_timeout, and a host that accepts TCP and never answers holds the attempt forever;
 * PQconnectPoll has no way to give up on one host and go on to the next. So each host gets an
 * attempt of its own: the parsed DATABASE_URL (PQconninfoParse) is split into one target per
 * host (host, hostaddr and port lists, element by element, as libpq pairs them), and every
 * attempt passes libpq the whole URL with that one host, under our own deadline. Everything else
 * (target_session_attrs above all) goes with every attempt, so libpq still rejects a read-only
 * server for target_session_attrs=read-write, and the next host is tried at once. Only when
 * every host failed does the connection report down and back off. This was preferred to
 * restarting libpq with a rotated host list: same libpq checks, one host per deadline. A host
 * name that resolves to several addresses is one target (libpq walks its addresses inside the
 * attempt). Lists that do not pair up are passed whole: libpq's own error then says why.
 */
#include "pg_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cm/alloc.h"
#include "cm/redact.h"

/* "host:port" of target `i`, for logs and errors. */
void pg_target_label(const cm_pg_t *pg, int i, char *buf, size_t n)
{
    const target_t *t = &pg->targets[i];
    const char *h = t->host && *t->host           ? t->host
                    : t->hostaddr && *t->hostaddr ? t->hostaddr
                                                  : "(default host)";
    if (t->port && *t->port)
        snprintf(buf, n, "%s:%s", h, t->port);
    else
        snprintf(buf, n, "%s", h);
}

/* Elements of a libpq comma-separated list: 0 for NULL or "". */
static int list_len(const char *s)
{
    if (!s || !*s)
        return 0;
    int n = 1;
    for (; *s; s++)
        n += *s == ',';
    return n;
}

/* Non-zero when an entry of the host list `s` that is a name (not a socket directory, '/', or
 * an abstract socket, '@') holds an '@': in a URL that is a password's unescaped '@', the rest
 * of the password taken for the host (and printed back in every connect error). */
static int host_has_at(const char *s)
{
    for (const char *p = s; p && *p;) {
        size_t n = strcspn(p, ",");
        if (*p != '/' && *p != '@' && memchr(p, '@', n))
            return 1;
        p += n + (p[n] == ',');
    }
    return 0;
}

/* Copies list `s` to `*buf` and points out[0..n) at its elements; with one element only, every
 * slot gets it (libpq: a single port applies to every host). */
static void split_list(const char *s, char **buf, const char **out, int n)
{
    if (!s)
        return;
    char *p = *buf;
    size_t len = strlen(s) + 1;
    memcpy(p, s, len);
    *buf += len;
    int one = list_len(s) == 1;
    for (int i = 0; i < n; i++) {
        out[i] = p;
        if (one)
            continue;
        char *comma = strchr(p, ',');
        if (!comma)
            break;
        *comma = '\0';
        p = comma + 1;
    }
}

/* Splits the parsed DATABASE_URL into one target per host (see the top of this file). */
int pg_targets_build(cm_pg_t *pg)
{
    const char *host = NULL, *hostaddr = NULL, *port = NULL, *timeout = NULL;
    size_t nopts = 0;
    for (const PQconninfoOption *o = pg->opts; o->keyword; o++) {
        nopts++;
        if (!o->val)
            continue;
        if (strcmp(o->keyword, "host") == 0)
            host = o->val;
        else if (strcmp(o->keyword, "hostaddr") == 0)
            hostaddr = o->val;
        else if (strcmp(o->keyword, "port") == 0)
            port = o->val;
        else if (strcmp(o->keyword, "connect_timeout") == 0)
            timeout = o->val;
    }
    /* libpq's meaning of connect_timeout (seconds, per host, at least 2) where the URL sets it;
     * our configured deadline otherwise. */
    pg->host_timeout_ms = pg->cfg.connect_timeout_ms;
    long secs = timeout ? strtol(timeout, NULL, 10) : 0;
    if (secs > 0)
        pg->host_timeout_ms = (uint64_t)(secs < 2 ? 2 : secs) * 1000;

    int nh = list_len(host), na = list_len(hostaddr), np = list_len(port);
    int n = nh > na ? nh : na;
    int split = n > 1 && (nh == 0 || na == 0 || nh == na) && (np <= 1 || np == n);
    pg->ntargets = split ? n : 1;
    pg->targets = cm_calloc((size_t)pg->ntargets, sizeof *pg->targets);
    /* Our keywords, every option of the URL, the terminator. */
    pg->kw = cm_calloc(nopts + 8, sizeof *pg->kw);
    pg->val = cm_calloc(nopts + 8, sizeof *pg->val);
    if (!pg->targets || !pg->kw || !pg->val)
        return UV_ENOMEM;
    if (!split) {
        pg->targets[0] = (target_t){host, hostaddr, port};
        return 0;
    }
    size_t bytes = (host ? strlen(host) + 1 : 0) + (hostaddr ? strlen(hostaddr) + 1 : 0) +
                   (port ? strlen(port) + 1 : 0);
    char *buf = pg->target_buf = cm_malloc(bytes);
    const char **parts = cm_calloc((size_t)n * 3, sizeof *parts);
    if (!buf || !parts) {
        cm_free(parts);
        return UV_ENOMEM;
    }
    split_list(host, &buf, parts, n);
    split_list(hostaddr, &buf, parts + n, n);
    split_list(port, &buf, parts + 2 * n, n);
    for (int i = 0; i < n; i++)
        pg->targets[i] = (target_t){parts[i], parts[n + i], parts[2 * n + i]};
    cm_free(parts);
    return 0;
}

/* The options whose values libpq checks only when it connects (each failure then a retry that
 * can never succeed), with what it accepts (libpq's "Parameter Key Words", PostgreSQL 15). */
static const struct {
    const char *key;
    const char *const values[8];
} enumerated[] = {
    {"sslmode", {"disable", "allow", "prefer", "require", "verify-ca", "verify-full", NULL}},
    {"target_session_attrs",
     {"any", "read-write", "read-only", "primary", "standby", "prefer-standby", NULL}},
    {"gssencmode", {"disable", "prefer", "require", NULL}},
    {"channel_binding", {"disable", "prefer", "require", NULL}},
};

/* 0 when `o` is not enumerated or holds one of its values; else the why, and UV_EINVAL. */
static int check_enumerated(const PQconninfoOption *o, char *why, size_t whysz)
{
    if (!o->val || !*o->val)
        return 0;
    for (size_t i = 0; i < sizeof enumerated / sizeof *enumerated; i++) {
        if (strcmp(o->keyword, enumerated[i].key) != 0)
            continue;
        size_t n = 0;
        char list[128] = "";
        for (const char *const *v = enumerated[i].values; *v; v++) {
            if (strcmp(*v, o->val) == 0)
                return 0;
            n += (size_t)snprintf(list + n, n < sizeof list ? sizeof list - n : 0, "%s%s",
                                  n ? ", " : "", *v);
        }
        snprintf(why, whysz, "%s must be one of %s", o->keyword, list);
        return UV_EINVAL;
    }
    return 0;
}

int cm_pg_conninfo_check(const char *conninfo, char *why, size_t whysz)
{
    char *errmsg = NULL;
    PQconninfoOption *opts = PQconninfoParse(conninfo, &errmsg);
    if (opts) {
        /* libpq checks the syntax only; a bad port, or lists of hosts and ports that do not pair
         * up, would mean retrying forever. */
        int bad = 0, nh = 0, na = 0, np = 0;
        for (PQconninfoOption *o = opts; o->keyword; o++) {
            if (check_enumerated(o, why, whysz) != 0) {
                PQconninfoFree(opts);
                return UV_EINVAL;
            }
        }
        for (PQconninfoOption *o = opts; o->keyword && !bad; o++) {
            if (strcmp(o->keyword, "host") == 0 && host_has_at(o->val)) {
                PQconninfoFree(opts);
                snprintf(why, whysz,
                         "a host name holds '@' (an '@' in the user or password "
                         "must be written %%40)");
                return UV_EINVAL;
            }
            if (strcmp(o->keyword, "host") == 0)
                nh = list_len(o->val);
            else if (strcmp(o->keyword, "hostaddr") == 0)
                na = list_len(o->val);
            if (strcmp(o->keyword, "port") != 0 || !o->val)
                continue;
            np = list_len(o->val);
            for (const char *p = o->val; *p && !bad;) { /* "5432" or "5432,5433" */
                char *end;
                long port = strtol(p, &end, 10);
                bad = end == p || port < 1 || port > 65535 || (*end && *end != ',');
                p = *end ? end + 1 : end;
            }
        }
        PQconninfoFree(opts);
        int nhosts = nh > na ? nh : na;
        if (bad) {
            snprintf(why, whysz, "port must be from 1 to 65535");
        } else if (nh && na && nh != na) {
            snprintf(why, whysz, "host and hostaddr must list as many entries each");
            bad = 1;
        } else if (np > 1 && np != (nhosts ? nhosts : 1)) {
            snprintf(why, whysz, "port must list one port, or one per host");
            bad = 1;
        }
        return bad ? UV_EINVAL : 0;
    }
    /* libpq's message ends with a newline (the error is one line) and quotes the string back,
     * password included: only its redacted form is shown. */
    char safe[256];
    if (errmsg)
        errmsg[strcspn(errmsg, "\n")] = '\0';
    cm_redact_message(errmsg ? errmsg : "out of memory", conninfo, safe, sizeof safe);
    snprintf(why, whysz, "not a libpq connection string: %s", safe);
    PQfreemem(errmsg);
    return UV_EINVAL;
}
