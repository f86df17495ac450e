/*
 * redis_sentinel.c: REDIS_SENTINELS settings, and finding and following the master through
 * Redis Sentinel (redis_sentinel.h) for the Redis client.
 *
 * - Discovery asks one sentinel at a time, in order, through a short-lived client of its own
 *   (AUTH when a password is set, then SENTINEL get-master-addr-by-name), under one deadline
 *   per sentinel that covers connect, handshake and answer. The sentinel that answered moves
 *   to the front, so a dead one at the head of the list costs one deadline once, not every
 *   time (the convention of redis-py's Sentinel).
 * - The watcher is one subscribed client on the sentinel that answered last, on +switch-master.
 *   A sentinel sends that only on a change, and nothing is buffered for a client that was away:
 *   every time the subscription (re)starts, discovery runs once more and a different answer
 *   counts as a switch. When the watcher's link fails, the next sentinel takes over.
 */
#include "redis_sentinel.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <hiredis/hiredis.h>
#include <uriparser/Uri.h>

#include "cm/alloc.h"
#include "cm/backoff.h"
#include "cm/config.h"
#include "cm/error.h"
#include "cm/log.h"

#define SENTINEL_DEFAULT_PORT 26379
#define SWITCH_CHANNEL "+switch-master"
/* Delay before the watcher moves on to the next sentinel, doubled per failure up to the cap:
 * a watcher is an optimisation (failures and -READONLY are noticed anyway), so while every
 * sentinel is down it retries slowly. */
#define WATCH_RETRY_MIN_MS 200
#define WATCH_RETRY_MAX_MS 5000
/* The health probe of the watcher's link. */
#define WATCH_HEALTH_MS 1000

typedef struct {
    char host[256];
    int port;
} saddr_t;

struct cm_redis_sentinel {
    uv_loop_t *loop;
    saddr_t addrs[CM_REDIS_SENTINELS_MAX];
    size_t n;
    char *master;
    char *password;
    char *name;
    uint64_t timeout_ms;
    int watch;
    cm_redis_sentinel_switch_fn on_switch;
    void *ud;

    /* Discovery in progress. `check` marks one the watcher started: its answer is compared
     * with `cur`, not handed to a caller (one asked meanwhile takes it over). */
    int resolving, check;
    int check_stale; /* a +switch-master came during the check: its answer may be older */
    cm_redis_sentinel_resolve_fn cb;
    void *cb_ud;
    size_t tried;      /* sentinels asked in this round; addrs[tried] is being asked */
    cm_redis_t *probe; /* the client asking it */
    uv_timer_t probe_timer;
    char errors[512]; /* what each sentinel of this round did, for the caller's log */

    char cur_host[256]; /* the last address given out, "" before the first */
    int cur_port;

    cm_redis_t *watcher;
    size_t watch_i;             /* index of the watcher's sentinel in addrs */
    cm_backoff_t watch_backoff; /* replicas that lost a sentinel together retry apart */
    uv_timer_t watch_timer;

    int open; /* our timers and the clients still closing */
    int closing;
    void (*done)(void *ud);
    void *done_ud;
};

/* ------------------------------------------------------------------------------------------ */
/* Settings                                                                                    */

/* Parses one "host[:port]" with uriparser, as the authority of a URI. */
static int parse_one(const char *first, const char *after, saddr_t *out)
{
    char buf[300];
    size_t n = (size_t)(after - first);
    if (n == 0 || n + 9 > sizeof buf)
        return UV_EINVAL;
    memcpy(buf, "redis://", 8);
    memcpy(buf + 8, first, n);
    buf[8 + n] = '\0';
    /* redis:// would be taken for our REDIS_URL form: give the host:port form alone. */
    if (memchr(first, '/', n) || memchr(first, '@', n) || memchr(first, '?', n) ||
        memchr(first, '#', n))
        return UV_EINVAL;
    UriUriA uri;
    const char *errpos = NULL;
    if (uriParseSingleUriA(&uri, buf, &errpos) != URI_SUCCESS)
        return UV_EINVAL;
    int rc = UV_EINVAL;
    size_t hl = uri.hostText.first ? (size_t)(uri.hostText.afterLast - uri.hostText.first) : 0;
    if (hl == 0 || hl >= sizeof out->host || uri.userInfo.first)
        goto done;
    memcpy(out->host, uri.hostText.first, hl);
    out->host[hl] = '\0';
    out->port = SENTINEL_DEFAULT_PORT;
    if (uri.portText.first) {
        long port = 0;
        const char *p = uri.portText.first;
        if (p == uri.portText.afterLast)
            goto done;
        for (; p < uri.portText.afterLast; p++) {
            if (*p < '0' || *p > '9' || (port = port * 10 + (*p - '0')) > 65535)
                goto done;
        }
        if (port == 0)
            goto done;
        out->port = (int)port;
    }
    rc = 0;
done:
    uriFreeUriMembersA(&uri);
    return rc;
}

/* Splits the comma list; spaces around each element are ignored. */
static int parse_list(const char *list, saddr_t *out, size_t *n)
{
    *n = 0;
    if (!list || !*list)
        return UV_EINVAL;
    const char *p = list;
    for (;;) {
        const char *end = strchr(p, ',');
        if (!end)
            end = p + strlen(p);
        const char *a = p, *b = end;
        while (a < b && (*a == ' ' || *a == '\t'))
            a++;
        while (b > a && (b[-1] == ' ' || b[-1] == '\t'))
            b--;
        if (*n == CM_REDIS_SENTINELS_MAX || parse_one(a, b, &out[*n]) != 0)
            return UV_EINVAL;
        (*n)++;
        if (!*end)
            return 0;
        p = end + 1;
    }
}

int cm_redis_sentinels_check(const char *list, char *why, size_t whysz)
{
    saddr_t addrs[CM_REDIS_SENTINELS_MAX];
    size_t n;
    if (parse_list(list, addrs, &n) == 0)
        return 0;
    snprintf(why, whysz, "expected a comma list of 1 to %d host:port, got '%s'",
             CM_REDIS_SENTINELS_MAX, list ? list : "");
    return UV_EINVAL;
}

/* A master name is one word of the +switch-master message, which is split at spaces. */
static int valid_master(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 255)
        return 0;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        if (*p <= ' ' || *p == 0x7f)
            return 0;
    return 1;
}

int cm_redis_settings_load(cm_config_t *c, cm_redis_settings_t *out)
{
    static const char def_url[] = "redis://127.0.0.1:6379/0";
    char why[192];
    memset(out, 0, sizeof *out);
    cm_config_str(c, "REDIS_SENTINELS", NULL, &out->sentinels);
    if (out->sentinels && cm_redis_sentinels_check(out->sentinels, why, sizeof why) != 0)
        cm_config_reject(c, "REDIS_SENTINELS", why);
    cm_config_str(c, "REDIS_SENTINEL_MASTER", NULL, &out->sentinel_master);
    if (out->sentinels && !out->sentinel_master)
        cm_config_reject(c, "REDIS_SENTINEL_MASTER", "required with REDIS_SENTINELS");
    else if (!out->sentinels && out->sentinel_master)
        cm_config_reject(c, "REDIS_SENTINEL_MASTER", "set REDIS_SENTINELS too, or unset it");
    else if (out->sentinel_master && !valid_master(out->sentinel_master))
        cm_config_reject(c, "REDIS_SENTINEL_MASTER",
                         "expected a name of 1 to 255 bytes without spaces");
    cm_config_str(c, "REDIS_SENTINEL_PASSWORD", NULL, &out->sentinel_password);
    if (!out->sentinels) {
        cm_config_checked(c, "REDIS_URL", def_url, cm_redis_url_check, &out->url);
        return c->failed ? UV_EINVAL : 0;
    }
    /* The sentinels give the address: REDIS_URL only carries credentials and db, so it is
     * optional even in production. */
    cm_config_str(c, "REDIS_URL", def_url, &out->url);
    cm_redis_url_t u;
    if (cm_redis_url_check(out->url, why, sizeof why) != 0)
        cm_config_reject(c, "REDIS_URL", why);
    else if (cm_redis_url_parse(out->url, &u) == 0 && u.is_unix)
        cm_config_reject(c, "REDIS_URL",
                         "expected redis://, not a unix socket, with REDIS_SENTINELS");
    return c->failed ? UV_EINVAL : 0;
}

void cm_redis_settings_apply(const cm_redis_settings_t *s, cm_redis_config_t *cfg)
{
    cfg->url = s->url;
    cfg->sentinels = s->sentinels;
    cfg->sentinel_master = s->sentinel_master;
    cfg->sentinel_password = s->sentinel_password;
}

/* ------------------------------------------------------------------------------------------ */
/* Lifetime                                                                                    */

static void maybe_free(cm_redis_sentinel_t *s)
{
    if (!s->closing || s->open > 0)
        return;
    void (*done)(void *) = s->done;
    void *done_ud = s->done_ud;
    cm_free(s->master);
    cm_free(s->password);
    cm_free(s->name);
    cm_free(s);
    if (done)
        done(done_ud);
}

static void on_client_closed(void *ud)
{
    cm_redis_sentinel_t *s = ud;
    s->open--;
    maybe_free(s);
}

static void on_timer_closed(uv_handle_t *h)
{
    on_client_closed(h->data);
}

static void close_client(cm_redis_sentinel_t *s, cm_redis_t **c)
{
    if (!*c)
        return;
    s->open++;
    cm_redis_close(*c, on_client_closed, s);
    *c = NULL;
}

/* A client to one sentinel. Its own reconnects are disabled in effect (a long backoff): we
 * move on to the next sentinel instead. */
static int open_client(cm_redis_sentinel_t *s, const saddr_t *a, uint64_t health_ms,
                       void (*on_state)(cm_redis_t *, int, const char *, void *), cm_redis_t **out)
{
    cm_redis_config_t cfg;
    cm_redis_config_defaults(&cfg);
    cfg.timeout_ms = s->timeout_ms;
    cfg.connect_timeout_ms = s->timeout_ms;
    cfg.backoff_min_ms = cfg.backoff_max_ms = 3600000;
    cfg.health_interval_ms = health_ms;
    cfg.on_state = on_state;
    cfg.ud = s;
    cfg.name = "sentinel";
    cm_redis_url_t url;
    memset(&url, 0, sizeof url);
    snprintf(url.host, sizeof url.host, "%s", a->host);
    url.port = a->port;
    if (s->password)
        snprintf(url.password, sizeof url.password, "%s", s->password);
    return cm_redis_open_url(s->loop, &cfg, &url, 1, out);
}

/* ------------------------------------------------------------------------------------------ */
/* Discovery                                                                                   */

static void watch_start(cm_redis_sentinel_t *s);
static void probe_next(cm_redis_sentinel_t *s);

static void note_error(cm_redis_sentinel_t *s, const saddr_t *a, const char *why)
{
    size_t len = strlen(s->errors);
    snprintf(s->errors + len, sizeof s->errors - len, "%s%s:%d: %s", len ? "; " : "", a->host,
             a->port, why ? why : "failed");
}

static void finish(cm_redis_sentinel_t *s, int status, const char *host, int port)
{
    s->resolving = 0;
    uv_timer_stop(&s->probe_timer);
    close_client(s, &s->probe);
    int check = s->check, stale = s->check_stale;
    s->check = s->check_stale = 0;
    if (status == 0) {
        int changed = s->cur_host[0] && (strcmp(s->cur_host, host) != 0 || s->cur_port != port);
        snprintf(s->cur_host, sizeof s->cur_host, "%s", host);
        s->cur_port = port;
        if (s->watch && !s->watcher && !uv_is_active((uv_handle_t *)&s->watch_timer)) {
            s->watch_i = 0; /* the sentinel that just answered */
            watch_start(s);
        }
        if (check) {
            if (changed && !stale) {
                cm_log_warn("redis sentinel: master moved while unwatched", "name", s->name,
                            "master", s->master, "addr", host, NULL);
                s->on_switch(host, port, s->ud);
            }
            return;
        }
    } else if (check) {
        cm_log_debug("redis sentinel: check failed", "name", s->name, "error", s->errors, NULL);
        return;
    }
    cm_redis_sentinel_resolve_fn cb = s->cb;
    s->cb = NULL;
    if (cb)
        cb(status, host, port, status ? s->errors : NULL, s->cb_ud);
}

static void probe_failed(cm_redis_sentinel_t *s, const char *why)
{
    note_error(s, &s->addrs[s->tried], why);
    uv_timer_stop(&s->probe_timer);
    close_client(s, &s->probe);
    s->tried++;
    probe_next(s);
}

/* The sentinel at index i answered: it goes first from now on. */
static void to_front(cm_redis_sentinel_t *s, size_t i)
{
    if (i == 0)
        return;
    saddr_t a = s->addrs[i];
    memmove(&s->addrs[1], &s->addrs[0], i * sizeof a);
    s->addrs[0] = a;
    /* The watcher's sentinel keeps its place in the new order. */
    if (s->watch_i < i)
        s->watch_i++;
    else if (s->watch_i == i)
        s->watch_i = 0;
}

static void on_probe_reply(cm_redis_t *r, struct redisReply *reply, int status, void *ud)
{
    (void)r;
    cm_redis_sentinel_t *s = ud;
    if (s->closing || !s->resolving)
        return;
    if (status != 0) {
        probe_failed(s, status == UV_ETIMEDOUT ? "no answer in time" : cm_strerror(status));
        return;
    }
    if (reply->type == REDIS_REPLY_ERROR) {
        probe_failed(s, reply->str);
        return;
    }
    if (reply->type != REDIS_REPLY_ARRAY || reply->elements != 2 ||
        reply->element[0]->type != REDIS_REPLY_STRING ||
        reply->element[1]->type != REDIS_REPLY_STRING) {
        probe_failed(s, reply->type == REDIS_REPLY_NIL ? "does not know this master name"
                                                       : "unexpected reply");
        return;
    }
    char host[256];
    long port = strtol(reply->element[1]->str, NULL, 10);
    if (reply->element[0]->len >= sizeof host || port <= 0 || port > 65535) {
        probe_failed(s, "bad address in reply");
        return;
    }
    memcpy(host, reply->element[0]->str, reply->element[0]->len + 1);
    to_front(s, s->tried);
    finish(s, 0, host, (int)port);
}

static void on_probe_state(cm_redis_t *r, int up, const char *error, void *ud)
{
    cm_redis_sentinel_t *s = ud;
    if (s->closing || !s->resolving || r != s->probe)
        return;
    if (!up) {
        probe_failed(s, error);
        return;
    }
    const char *argv[3] = {"SENTINEL", "get-master-addr-by-name", s->master};
    int rc = cm_redis_command_argv(r, on_probe_reply, s, 3, argv, NULL);
    if (rc != 0)
        probe_failed(s, cm_strerror(rc));
}

static void on_probe_timer(uv_timer_t *t)
{
    cm_redis_sentinel_t *s = t->data;
    if (s->closing || !s->resolving)
        return;
    if (!s->probe) {
        probe_next(s); /* the round's first step, deferred out of cm_redis_sentinel_resolve */
        return;
    }
    char why[64];
    snprintf(why, sizeof why, "no answer in %llu ms", (unsigned long long)s->timeout_ms);
    probe_failed(s, why);
}

static void probe_next(cm_redis_sentinel_t *s)
{
    while (s->tried < s->n) {
        int rc = open_client(s, &s->addrs[s->tried], 0, on_probe_state, &s->probe);
        if (rc == 0) {
            uv_timer_start(&s->probe_timer, on_probe_timer, s->timeout_ms, 0);
            return;
        }
        note_error(s, &s->addrs[s->tried], cm_strerror(rc));
        s->tried++;
    }
    finish(s, UV_EHOSTUNREACH, NULL, 0);
}

static void round_start(cm_redis_sentinel_t *s)
{
    s->resolving = 1;
    s->tried = 0;
    s->errors[0] = '\0';
    uv_timer_start(&s->probe_timer, on_probe_timer, 0, 0);
}

int cm_redis_sentinel_resolve(cm_redis_sentinel_t *s, cm_redis_sentinel_resolve_fn cb, void *ud)
{
    if (s->closing)
        return UV_EINVAL;
    if (s->resolving && !s->check)
        return UV_EBUSY;
    s->cb = cb;
    s->cb_ud = ud;
    if (s->resolving) {
        s->check = s->check_stale = 0; /* a check running now answers this caller */
        return 0;
    }
    round_start(s);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* +switch-master                                                                              */

static void on_watch_timer(uv_timer_t *t)
{
    cm_redis_sentinel_t *s = t->data;
    if (!s->closing && !s->watcher)
        watch_start(s);
}

/* "<name> <old-ip> <old-port> <new-ip> <new-port>" */
static void on_switch_msg(cm_redis_t *r, const char *channel, const char *payload, size_t len,
                          void *ud)
{
    (void)r;
    (void)channel;
    cm_redis_sentinel_t *s = ud;
    char msg[1024], *save = NULL;
    if (s->closing || len >= sizeof msg)
        return;
    memcpy(msg, payload, len);
    msg[len] = '\0';
    const char *f[5];
    int nf = 0;
    for (char *tok = strtok_r(msg, " ", &save); tok && nf < 5; tok = strtok_r(NULL, " ", &save))
        f[nf++] = tok;
    if (nf != 5 || strcmp(f[0], s->master) != 0)
        return;
    long port = strtol(f[4], NULL, 10);
    if (port <= 0 || port > 65535 || strlen(f[3]) >= sizeof s->cur_host)
        return;
    cm_log_info("redis sentinel: +switch-master", "name", s->name, "master", s->master, "from",
                f[1], "to", f[3], NULL);
    snprintf(s->cur_host, sizeof s->cur_host, "%s", f[3]);
    s->cur_port = (int)port;
    if (s->resolving && s->check)
        s->check_stale = 1; /* the first sentinel asked may not know of this switch yet */
    s->on_switch(s->cur_host, s->cur_port, s->ud);
}

static void on_watch_state(cm_redis_t *r, int up, const char *error, void *ud)
{
    cm_redis_sentinel_t *s = ud;
    if (s->closing || r != s->watcher)
        return;
    if (up) {
        cm_backoff_reset(&s->watch_backoff);
        /* Switches announced while we were not subscribed are lost: look once. */
        if (!s->resolving) {
            s->check = 1;
            round_start(s);
        }
        return;
    }
    cm_log_debug("redis sentinel: watcher down", "name", s->name, "error", error, NULL);
    close_client(s, &s->watcher);
    s->watch_i = (s->watch_i + 1) % s->n;
    uv_timer_start(&s->watch_timer, on_watch_timer, cm_backoff_next(&s->watch_backoff), 0);
}

static void watch_start(cm_redis_sentinel_t *s)
{
    if (open_client(s, &s->addrs[s->watch_i], WATCH_HEALTH_MS, on_watch_state, &s->watcher) != 0 ||
        cm_redis_subscribe(s->watcher, SWITCH_CHANNEL, on_switch_msg, s) != 0) {
        close_client(s, &s->watcher);
        uv_timer_start(&s->watch_timer, on_watch_timer, cm_backoff_next(&s->watch_backoff), 0);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Open and close                                                                              */

int cm_redis_sentinel_new(uv_loop_t *loop, const cm_redis_config_t *cfg, const char *name,
                          cm_redis_sentinel_switch_fn on_switch, void *ud,
                          cm_redis_sentinel_t **out)
{
    if (!cfg->sentinel_master || !valid_master(cfg->sentinel_master) || !on_switch)
        return UV_EINVAL;
    cm_redis_sentinel_t *s = cm_calloc(1, sizeof *s);
    if (!s)
        return UV_ENOMEM;
    if (parse_list(cfg->sentinels, s->addrs, &s->n) != 0) {
        cm_free(s);
        return UV_EINVAL;
    }
    s->master = cm_strdup(cfg->sentinel_master);
    s->password = cfg->sentinel_password && *cfg->sentinel_password
                      ? cm_strdup(cfg->sentinel_password)
                      : NULL;
    s->name = cm_strdup(name ? name : "redis");
    if (!s->master || !s->name ||
        (cfg->sentinel_password && *cfg->sentinel_password && !s->password)) {
        cm_free(s->master);
        cm_free(s->password);
        cm_free(s->name);
        cm_free(s);
        return UV_ENOMEM;
    }
    s->loop = loop;
    cm_backoff_init(&s->watch_backoff, WATCH_RETRY_MIN_MS, WATCH_RETRY_MAX_MS,
                    uv_hrtime() ^ (uint64_t)(uintptr_t)s);
    s->timeout_ms = cfg->sentinel_timeout_ms ? cfg->sentinel_timeout_ms : 500;
    s->watch = cfg->sentinel_watch;
    s->on_switch = on_switch;
    s->ud = ud;
    uv_timer_init(loop, &s->probe_timer);
    uv_timer_init(loop, &s->watch_timer);
    s->probe_timer.data = s->watch_timer.data = s;
    s->open = 2;
    *out = s;
    return 0;
}

void cm_redis_sentinel_close(cm_redis_sentinel_t *s, void (*done)(void *ud), void *ud)
{
    if (s->closing)
        return;
    s->closing = 1;
    s->done = done;
    s->done_ud = ud;
    close_client(s, &s->probe);
    close_client(s, &s->watcher);
    cm_redis_sentinel_resolve_fn cb = s->resolving && !s->check ? s->cb : NULL;
    s->resolving = 0;
    s->cb = NULL;
    uv_close((uv_handle_t *)&s->probe_timer, on_timer_closed);
    uv_close((uv_handle_t *)&s->watch_timer, on_timer_closed);
    /* The owner closes us from its deferred close, outside any of its callers' calls. */
    if (cb)
        cb(UV_ECANCELED, NULL, 0, "closing", s->cb_ud);
}
