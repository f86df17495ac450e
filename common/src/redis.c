/*
 * redis.c: the asynchronous Redis client (cm/redis.h) on hiredis 0.14.1 and its libuv adapter.
 *
 * Private to common/. How it is put together:
 *
 * - One hiredis async context (`ac`) at a time per client. hiredis frees a context by itself
 *   when the link fails (after calling every pending callback with a NULL reply, then the
 *   disconnect callback), so every hiredis callback first checks that its context is still the
 *   current one. A context we give up on ourselves (stall, connect timeout, close) is detached
 *   at once and freed from a zero-delay timer, never from inside a hiredis callback.
 * - One small `cmd_t` per command, from a free list. hiredis holds it as privdata until it
 *   calls back exactly once (reply or NULL); the user callback fires exactly once, on the
 *   first of reply, timeout, lost link or close. A command answered to the user before hiredis
 *   lets go is an orphan: hiredis' later call only recycles it (and frees the late reply).
 * - Commands are answered in order, so pending commands sit in a FIFO and one uv timer is armed
 *   for the earliest deadline (head of the FIFO, oldest late command, PING waiters, probe).
 * - Health: PING while idle (or, on a subscribed connection where hiredis 0.14.1 cannot route
 *   a PING reply, a SUBSCRIBE to a private channel whose confirmation serves as the pong).
 *   Probe callbacks get the client as privdata and are counted (sent/acked), since replies
 *   come in order.
 */
#include "cm/redis.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <hiredis/adapters/libuv.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <uriparser/Uri.h>

#include "cm/alloc.h"
#include "cm/log.h"

/* A link up this long (ms) has proven itself: the reconnect backoff starts over. */
#define BACKOFF_RESET_AFTER_MS 10000
/* Consecutive timeouts after which the server is considered stalled. */
#define STALL_TIMEOUTS 3
/* A command (or probe) outstanding this many timeouts long means a stalled server. */
#define STALL_FACTOR 5
/* Recycled command structs kept per client. */
#define FREE_CMDS_MAX 1024
/* Channel whose SUBSCRIBE confirmation serves as the PING of a subscribed connection. */
#define HEALTH_CHANNEL "__cm_redis_health__"
#define SUB_BUCKETS 256

typedef enum { CMD_FREE = 0, CMD_PENDING, CMD_LATE, CMD_ORPHAN } cmd_state_t;

typedef struct cmd cmd_t;
struct cmd {
    cmd_t *next, *prev;
    cm_redis_t *r;
    cm_redis_reply_fn cb; /* NULL: fire and forget */
    cm_redis_ping_fn ping_cb;
    void *ud;
    uint64_t sent_ms;  /* loop time when sent (deadline = sent_ms + timeout_ms) */
    uint64_t start_ns; /* hrtime, for PING latency */
    cmd_state_t state;
};

typedef struct {
    cmd_t *head, *tail;
} cmd_list_t;

typedef struct sub sub_t;
struct sub {
    sub_t *next;
    cm_redis_message_fn cb;
    void *ud;
    char channel[]; /* NUL-terminated */
};

typedef enum { LINK_DOWN = 0, LINK_CONNECTING, LINK_UP } link_t;

struct cm_redis {
    uv_loop_t *loop;
    cm_redis_config_t cfg;
    cm_redis_url_t url;
    char *name;
    char addr[300]; /* for logs */

    redisAsyncContext *ac;      /* current context, NULL when down */
    redisAsyncContext *dead_ac; /* detached context waiting to be freed from the loop */
    link_t link;
    int reported; /* -1 nothing reported yet, else the last state given to on_state */
    int ever_up;
    int handshake_left; /* replies still expected before up */
    uint64_t backoff_ms;
    uint64_t up_since_ms; /* loop time the link came up; 0 while down */
    uint64_t rng;

    cmd_list_t pending; /* sent, not answered: oldest first */
    cmd_list_t late;    /* timed out, reply not yet received: oldest first */
    cmd_list_t pings;   /* cm_redis_ping waiters: oldest first */
    cmd_t *free_cmds;
    int free_count;
    int consecutive_timeouts;

    /* Probe (health PING or health SUBSCRIBE) bookkeeping for the current context. */
    uint64_t probes_sent, probes_acked;
    uint64_t probe_sent_ms, probe_start_ns;
    int probe_timed_out;
    uint64_t last_rx_ms;

    sub_t *subs[SUB_BUCKETS];
    size_t sub_count;

    cm_redis_stats_t stats;

    uv_timer_t cmd_timer;    /* earliest deadline */
    uint64_t cmd_due_ms;     /* loop time the cmd_timer was armed for */
    uv_timer_t conn_timer;   /* connect timeout, then reconnect backoff */
    uv_timer_t health_timer; /* idle PING */
    uv_timer_t defer_timer;  /* zero-delay work: free a detached context, close */
    int handles_open;
    int closing;
    void (*done)(void *ud);
    void *done_ud;
};

static void arm_cmd_timer(cm_redis_t *r);
static void start_connect(cm_redis_t *r);
static void link_lost(cm_redis_t *r, const redisAsyncContext *ac, const char *error);
static void drop_link(cm_redis_t *r, const char *error);

/* ------------------------------------------------------------------------------------------ */
/* Small lists                                                                                 */

static void list_push(cmd_list_t *l, cmd_t *c)
{
    c->next = NULL;
    c->prev = l->tail;
    if (l->tail)
        l->tail->next = c;
    else
        l->head = c;
    l->tail = c;
}

static void list_remove(cmd_list_t *l, cmd_t *c)
{
    if (c->prev)
        c->prev->next = c->next;
    else
        l->head = c->next;
    if (c->next)
        c->next->prev = c->prev;
    else
        l->tail = c->prev;
    c->next = c->prev = NULL;
}

static cmd_t *cmd_get(cm_redis_t *r)
{
    cmd_t *c = r->free_cmds;
    if (c) {
        r->free_cmds = c->next;
        r->free_count--;
    } else {
        c = cm_malloc(sizeof *c);
        if (!c)
            return NULL;
    }
    memset(c, 0, sizeof *c);
    c->r = r;
    return c;
}

static void cmd_put(cm_redis_t *r, cmd_t *c)
{
    c->state = CMD_FREE;
    if (r->free_count >= FREE_CMDS_MAX) {
        cm_free(c);
        return;
    }
    c->next = r->free_cmds;
    r->free_cmds = c;
    r->free_count++;
}

static uint64_t next_rand(cm_redis_t *r)
{
    /* xorshift64: jitter only, no quality needed. */
    uint64_t x = r->rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    r->rng = x;
    return x;
}

static uint32_t chan_hash(const char *s)
{
    uint32_t h = 2166136261u;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 16777619u;
    return h % SUB_BUCKETS;
}

static const char *rname(const cm_redis_t *r)
{
    return r->name ? r->name : "redis";
}

/* ------------------------------------------------------------------------------------------ */
/* URL                                                                                         */

static int copy_range(char *dst, size_t cap, const char *first, const char *after, int unescape)
{
    size_t n = (first && after && after > first) ? (size_t)(after - first) : 0;
    if (n >= cap)
        return UV_EINVAL;
    if (n)
        memcpy(dst, first, n);
    dst[n] = '\0';
    if (unescape)
        uriUnescapeInPlaceExA(dst, URI_FALSE, URI_BR_DONT_TOUCH);
    return 0;
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
        /* unix:///path/to.sock[?db=N]: empty authority, absolute path. */
        if (uri.hostText.first && uri.hostText.afterLast != uri.hostText.first)
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
        uriUnescapeInPlaceExA(out->path, URI_FALSE, URI_BR_DONT_TOUCH);
        if (strlen(out->path) < 2)
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

/* ------------------------------------------------------------------------------------------ */
/* State reporting                                                                             */

static void report(cm_redis_t *r, int up, const char *error)
{
    if (r->reported == up)
        return;
    r->reported = up;
    if (up)
        cm_log_info("redis connected", "name", rname(r), "addr", r->addr, NULL);
    else
        cm_log_error("redis unavailable", "name", rname(r), "addr", r->addr, "error",
                     error ? error : "unknown", NULL);
    if (r->cfg.on_state && !r->closing)
        r->cfg.on_state(r, up, up ? NULL : error, r->cfg.ud);
}

/* ------------------------------------------------------------------------------------------ */
/* Completing commands                                                                         */

static void finish_cmd(cm_redis_t *r, cmd_t *c, redisReply *reply, int status)
{
    if (c->cb)
        c->cb(r, reply, status, c->ud);
}

/* Fails every command still waiting for an answer (they become orphans: hiredis still holds
 * them), every late one (already answered) and every PING waiter. */
static void fail_all(cm_redis_t *r, int status)
{
    cmd_t *c;
    while ((c = r->late.head) != NULL) {
        list_remove(&r->late, c);
        c->state = CMD_ORPHAN;
    }
    while ((c = r->pending.head) != NULL) {
        list_remove(&r->pending, c);
        c->state = CMD_ORPHAN;
        finish_cmd(r, c, NULL, status);
    }
    while ((c = r->pings.head) != NULL) {
        list_remove(&r->pings, c);
        if (c->ping_cb)
            c->ping_cb(r, status, 0, c->ud);
        cmd_put(r, c);
    }
    if (!r->closing)
        arm_cmd_timer(r);
}

static void note_timeout(cm_redis_t *r)
{
    r->stats.timeouts++;
    r->consecutive_timeouts++;
}

/* hiredis reply callback of every user command. */
static void on_cmd_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    cmd_t *c = privdata;
    cm_redis_t *r = c->r;
    switch (c->state) {
    case CMD_PENDING:
        if (!reply) {
            /* The context is being freed by hiredis: the link is gone. */
            link_lost(r, ac, ac->errstr);
            if (c->state == CMD_PENDING) { /* link_lost ignores a stale context */
                list_remove(&r->pending, c);
                finish_cmd(r, c, NULL, r->closing ? UV_ECANCELED : UV_ECONNRESET);
            }
            break;
        }
        list_remove(&r->pending, c);
        r->consecutive_timeouts = 0;
        r->last_rx_ms = uv_now(r->loop);
        if (!r->closing)
            arm_cmd_timer(r);
        finish_cmd(r, c, reply, CM_REDIS_OK);
        break;
    case CMD_LATE:
        /* Answered after its deadline: the user already had UV_ETIMEDOUT. hiredis frees the
         * reply when we return. */
        list_remove(&r->late, c);
        if (reply)
            r->last_rx_ms = uv_now(r->loop);
        else
            link_lost(r, ac, ac->errstr);
        if (!r->closing)
            arm_cmd_timer(r);
        break;
    default:
        break;
    }
    cmd_put(r, c);
}

/* ------------------------------------------------------------------------------------------ */
/* Probes (health and cm_redis_ping)                                                           */

static void probe_acked(cm_redis_t *r)
{
    r->probes_acked++;
    r->last_rx_ms = uv_now(r->loop);
    if (r->probes_acked != r->probes_sent)
        return;
    uint64_t now_ns = uv_hrtime();
    if (!r->probe_timed_out) {
        r->consecutive_timeouts = 0;
        r->stats.last_ping_ms = (double)(now_ns - r->probe_start_ns) / 1e6;
    }
    r->probe_timed_out = 0;
    cmd_t *c;
    while ((c = r->pings.head) != NULL) {
        list_remove(&r->pings, c);
        double ms = (double)(now_ns - c->start_ns) / 1e6;
        if (c->ping_cb)
            c->ping_cb(r, CM_REDIS_OK, ms, c->ud);
        cmd_put(r, c);
    }
    if (!r->closing)
        arm_cmd_timer(r);
}

/* A channel message or (un)subscribe confirmation on a subscribed connection. */
static void on_sub_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    cm_redis_t *r = privdata;
    redisReply *rep = reply;
    if (ac != r->ac || r->closing)
        return;
    if (!rep) {
        link_lost(r, ac, ac->errstr);
        return;
    }
    r->last_rx_ms = uv_now(r->loop);
    if (rep->type != REDIS_REPLY_ARRAY || rep->elements < 3 ||
        rep->element[0]->type != REDIS_REPLY_STRING || rep->element[1]->type != REDIS_REPLY_STRING)
        return;
    const char *kind = rep->element[0]->str;
    const char *channel = rep->element[1]->str;
    if (strcasecmp(kind, "message") == 0) {
        redisReply *payload = rep->element[2];
        if (payload->type != REDIS_REPLY_STRING)
            return;
        for (sub_t *s = r->subs[chan_hash(channel)]; s; s = s->next) {
            if (strcmp(s->channel, channel) == 0) {
                s->cb(r, channel, payload->str, payload->len, s->ud);
                break;
            }
        }
    } else if (strcasecmp(kind, "subscribe") == 0 && strcmp(channel, HEALTH_CHANNEL) == 0) {
        probe_acked(r);
    }
}

static void on_probe_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    cm_redis_t *r = privdata;
    if (ac != r->ac || r->closing)
        return;
    if (!reply) {
        link_lost(r, ac, ac->errstr);
        return;
    }
    probe_acked(r);
}

/* Sends a probe unless one is already outstanding. Returns 0 or UV_ENOTCONN. */
static int send_probe(cm_redis_t *r)
{
    if (r->probes_sent != r->probes_acked)
        return 0;
    int rc;
    if (r->ac->c.flags & REDIS_SUBSCRIBED)
        rc = redisAsyncCommand(r->ac, on_sub_reply, r, "SUBSCRIBE " HEALTH_CHANNEL);
    else
        rc = redisAsyncCommand(r->ac, on_probe_reply, r, "PING");
    if (rc != REDIS_OK)
        return UV_ENOTCONN;
    r->probes_sent++;
    r->probe_sent_ms = uv_now(r->loop);
    r->probe_start_ns = uv_hrtime();
    r->probe_timed_out = 0;
    arm_cmd_timer(r);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Deadlines                                                                                   */

static void on_cmd_timer(uv_timer_t *t)
{
    cm_redis_t *r = t->data;
    uint64_t now = uv_now(r->loop);
    uint64_t to = r->cfg.timeout_ms;
    cmd_t *c;

    if (r->closing || r->link != LINK_UP)
        return;
    /* A timer firing long after its due time means the loop itself was busy (a burst of work
     * in one iteration): commands queued meanwhile were not even written yet, and replies may
     * be waiting unread, since libuv runs timers before it polls sockets. That delay is ours,
     * not the server's: restart every clock from now and let the poll phase run first. */
    if (now > r->cmd_due_ms + to / 2) {
        cmd_list_t *lists[3] = {&r->pending, &r->late, &r->pings};
        for (int i = 0; i < 3; i++)
            for (c = lists[i]->head; c; c = c->next)
                c->sent_ms = now;
        r->probe_sent_ms = now;
        arm_cmd_timer(r);
        return;
    }
    while ((c = r->pending.head) != NULL && c->sent_ms + to <= now) {
        list_remove(&r->pending, c);
        c->state = CMD_LATE;
        list_push(&r->late, c);
        note_timeout(r);
        finish_cmd(r, c, NULL, UV_ETIMEDOUT);
        if (r->closing || r->link != LINK_UP)
            return; /* the callback closed the client */
    }
    while ((c = r->pings.head) != NULL && c->sent_ms + to <= now) {
        list_remove(&r->pings, c);
        if (c->ping_cb)
            c->ping_cb(r, UV_ETIMEDOUT, 0, c->ud);
        cmd_put(r, c);
        if (r->closing || r->link != LINK_UP)
            return;
    }
    int probe_out = r->probes_sent != r->probes_acked;
    if (probe_out && !r->probe_timed_out && r->probe_sent_ms + to <= now) {
        r->probe_timed_out = 1;
        note_timeout(r);
    }
    const char *stall = NULL;
    if (r->consecutive_timeouts >= STALL_TIMEOUTS)
        stall = "server stalled: consecutive command timeouts";
    else if ((r->late.head && r->late.head->sent_ms + STALL_FACTOR * to <= now) ||
             (probe_out && r->probe_sent_ms + STALL_FACTOR * to <= now))
        stall = "server stalled: no reply";
    if (stall) {
        drop_link(r, stall);
        return;
    }
    arm_cmd_timer(r);
}

static void arm_cmd_timer(cm_redis_t *r)
{
    uint64_t to = r->cfg.timeout_ms;
    uint64_t due = UINT64_MAX;
    if (r->link == LINK_UP) {
        if (r->pending.head)
            due = r->pending.head->sent_ms + to;
        if (r->pings.head && r->pings.head->sent_ms + to < due)
            due = r->pings.head->sent_ms + to;
        if (r->late.head && r->late.head->sent_ms + STALL_FACTOR * to < due)
            due = r->late.head->sent_ms + STALL_FACTOR * to;
        if (r->probes_sent != r->probes_acked) {
            uint64_t p = r->probe_sent_ms + (r->probe_timed_out ? STALL_FACTOR * to : to);
            if (p < due)
                due = p;
        }
    }
    if (due == UINT64_MAX) {
        uv_timer_stop(&r->cmd_timer);
        return;
    }
    uint64_t now = uv_now(r->loop);
    r->cmd_due_ms = due > now ? due : now;
    uv_timer_start(&r->cmd_timer, on_cmd_timer, due > now ? due - now : 0, 0);
}

static void on_health_timer(uv_timer_t *t)
{
    cm_redis_t *r = t->data;
    if (r->closing || r->link != LINK_UP)
        return;
    uint64_t now = uv_now(r->loop);
    /* Only while idle: pending commands already watch the link through their deadlines. */
    if (r->pending.head || now - r->last_rx_ms < r->cfg.health_interval_ms)
        return;
    send_probe(r);
}

/* ------------------------------------------------------------------------------------------ */
/* Connection life cycle                                                                       */

static void on_defer(uv_timer_t *t);

static void schedule_defer(cm_redis_t *r)
{
    uv_timer_start(&r->defer_timer, on_defer, 0, 0);
}

static void on_conn_timer(uv_timer_t *t)
{
    cm_redis_t *r = t->data;
    if (r->closing)
        return;
    if (r->link == LINK_CONNECTING) {
        char msg[64];
        snprintf(msg, sizeof msg, "connect timeout after %" PRIu64 " ms",
                 r->cfg.connect_timeout_ms);
        drop_link(r, msg);
    } else if (r->link == LINK_DOWN && !r->ac) {
        if (r->dead_ac) {
            redisAsyncContext *ac = r->dead_ac;
            r->dead_ac = NULL;
            redisAsyncFree(ac);
        }
        start_connect(r);
    }
}

static void schedule_reconnect(cm_redis_t *r)
{
    if (r->closing)
        return;
    /* The backoff starts over only after a link that stayed up a while: a server that
     * accepts connections and then stalls must not be reconnected to as fast as possible. */
    if (r->up_since_ms && uv_now(r->loop) - r->up_since_ms >= BACKOFF_RESET_AFTER_MS)
        r->backoff_ms = r->cfg.backoff_min_ms;
    r->up_since_ms = 0;
    uint64_t d = r->backoff_ms;
    /* Jitter: somewhere in [d/2, d], so replicas do not reconnect in lockstep. */
    if (d > 1)
        d = d / 2 + next_rand(r) % (d / 2 + 1);
    r->backoff_ms =
        r->backoff_ms * 2 > r->cfg.backoff_max_ms ? r->cfg.backoff_max_ms : r->backoff_ms * 2;
    if (r->backoff_ms < r->cfg.backoff_min_ms)
        r->backoff_ms = r->cfg.backoff_min_ms;
    uv_timer_start(&r->conn_timer, on_conn_timer, d, 0);
}

/* Leaves the up/connecting state after a failure: fails what is pending, reports down once,
 * plans the next attempt. The context itself is handled by the caller. */
static void went_down(cm_redis_t *r, const char *error)
{
    r->link = LINK_DOWN;
    r->stats.errors++;
    uv_timer_stop(&r->cmd_timer);
    uv_timer_stop(&r->health_timer);
    uv_timer_stop(&r->conn_timer);
    if (r->reported == 1 || r->reported == -1)
        report(r, 0, error);
    else
        cm_log_debug("redis connect failed", "name", rname(r), "error", error, NULL);
    fail_all(r, r->closing ? UV_ECANCELED : UV_ECONNRESET);
    schedule_reconnect(r);
}

/* hiredis gave up on `ac` (it frees it right after this). */
static void link_lost(cm_redis_t *r, const redisAsyncContext *ac, const char *error)
{
    if (ac == r->dead_ac) {
        r->dead_ac = NULL; /* hiredis frees it: do not free it again */
        return;
    }
    if (ac != r->ac)
        return;
    r->ac = NULL;
    went_down(r, error && *error ? error : "connection lost");
}

/* We give up on the current context: detach it now, free it from the loop. */
static void drop_link(cm_redis_t *r, const char *error)
{
    redisAsyncContext *ac = r->ac;
    if (!ac)
        return;
    r->ac = NULL;
    if (r->dead_ac) /* cannot happen: the defer timer runs before any reconnect */
        redisAsyncFree(r->dead_ac);
    r->dead_ac = ac;
    /* No more events for it: what is still buffered is ignored as stale. */
    redisLibuvEvents *ev = ac->ev.data;
    if (ev)
        uv_poll_stop(&ev->handle);
    schedule_defer(r);
    went_down(r, error);
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    cm_redis_t *r = ac->data;
    if (status != REDIS_OK)
        link_lost(r, ac, ac->errstr);
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    cm_redis_t *r = ac->data;
    (void)status;
    link_lost(r, ac, ac->errstr);
}

static void issue_subscriptions(cm_redis_t *r);

/* Reply to AUTH, SELECT and the final PING of the handshake. */
static void on_handshake_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    cm_redis_t *r = privdata;
    redisReply *rep = reply;
    if (ac != r->ac || r->closing)
        return;
    if (!rep) {
        link_lost(r, ac, ac->errstr);
        return;
    }
    if (rep->type == REDIS_REPLY_ERROR) {
        char msg[300];
        snprintf(msg, sizeof msg, "handshake: %s", rep->str);
        drop_link(r, msg);
        return;
    }
    if (--r->handshake_left > 0)
        return;
    r->link = LINK_UP;
    uv_timer_stop(&r->conn_timer);
    r->up_since_ms = uv_now(r->loop);
    if (r->ever_up)
        r->stats.reconnects++;
    r->ever_up = 1;
    r->consecutive_timeouts = 0;
    r->last_rx_ms = uv_now(r->loop);
    issue_subscriptions(r);
    if (r->cfg.health_interval_ms)
        uv_timer_start(&r->health_timer, on_health_timer, r->cfg.health_interval_ms,
                       r->cfg.health_interval_ms);
    report(r, 1, NULL);
}

static void start_connect(cm_redis_t *r)
{
    redisAsyncContext *ac;
    char port[16];
    r->link = LINK_CONNECTING;
    if (r->url.is_unix)
        ac = redisAsyncConnectUnix(r->url.path);
    else
        ac = redisAsyncConnect(r->url.host, r->url.port);
    if (!ac) {
        went_down(r, "out of memory");
        return;
    }
    if (ac->err) {
        char msg[160];
        snprintf(msg, sizeof msg, "%s", ac->errstr);
        redisAsyncFree(ac);
        went_down(r, msg);
        return;
    }
    ac->data = r;
    if (redisLibuvAttach(ac, r->loop) != REDIS_OK) {
        /* The adapter sets its hooks before it can fail; its cleanup would then run on NULL. */
        memset(&ac->ev, 0, sizeof ac->ev);
        redisAsyncFree(ac);
        went_down(r, "cannot watch the socket");
        return;
    }
    r->ac = ac;
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    r->probes_sent = r->probes_acked = 0;
    r->probe_timed_out = 0;
    r->handshake_left = 0;
    /* Queued now, written by hiredis once the socket connects. */
    if (r->url.password[0]) {
        const char *argv[3] = {"AUTH", r->url.user, r->url.password};
        if (r->url.user[0])
            redisAsyncCommandArgv(ac, on_handshake_reply, r, 3, argv, NULL);
        else {
            argv[1] = r->url.password;
            redisAsyncCommandArgv(ac, on_handshake_reply, r, 2, argv, NULL);
        }
        r->handshake_left++;
    }
    if (r->url.db) {
        snprintf(port, sizeof port, "%d", r->url.db);
        const char *argv[2] = {"SELECT", port};
        redisAsyncCommandArgv(ac, on_handshake_reply, r, 2, argv, NULL);
        r->handshake_left++;
    }
    /* A final PING: the server answers (not LOADING, not paused) before we call it up. */
    redisAsyncCommand(ac, on_handshake_reply, r, "PING");
    r->handshake_left++;
    uv_timer_start(&r->conn_timer, on_conn_timer, r->cfg.connect_timeout_ms, 0);
}

/* ------------------------------------------------------------------------------------------ */
/* Subscriptions                                                                               */

static sub_t **sub_find(cm_redis_t *r, const char *channel)
{
    sub_t **pp = &r->subs[chan_hash(channel)];
    while (*pp && strcmp((*pp)->channel, channel) != 0)
        pp = &(*pp)->next;
    return pp;
}

static void issue_subscriptions(cm_redis_t *r)
{
    /* One SUBSCRIBE per channel keeps this allocation-free and never too long. */
    for (int b = 0; b < SUB_BUCKETS; b++)
        for (sub_t *s = r->subs[b]; s; s = s->next) {
            const char *argv[2] = {"SUBSCRIBE", s->channel};
            redisAsyncCommandArgv(r->ac, on_sub_reply, r, 2, argv, NULL);
        }
}

int cm_redis_subscribe(cm_redis_t *r, const char *channel, cm_redis_message_fn cb, void *ud)
{
    if (!r || !channel || !*channel || !cb || r->closing)
        return UV_EINVAL;
    sub_t **pp = sub_find(r, channel);
    if (*pp)
        return UV_EEXIST;
    size_t len = strlen(channel);
    sub_t *s = cm_malloc(sizeof *s + len + 1);
    if (!s)
        return UV_ENOMEM;
    s->next = NULL;
    s->cb = cb;
    s->ud = ud;
    memcpy(s->channel, channel, len + 1);
    *pp = s;
    r->sub_count++;
    if (r->link == LINK_UP) {
        const char *argv[2] = {"SUBSCRIBE", s->channel};
        redisAsyncCommandArgv(r->ac, on_sub_reply, r, 2, argv, NULL);
    }
    return 0;
}

int cm_redis_unsubscribe(cm_redis_t *r, const char *channel)
{
    if (!r || !channel)
        return UV_ENOENT;
    sub_t **pp = sub_find(r, channel);
    sub_t *s = *pp;
    if (!s)
        return UV_ENOENT;
    *pp = s->next;
    r->sub_count--;
    if (r->link == LINK_UP && !r->closing) {
        const char *argv[2] = {"UNSUBSCRIBE", s->channel};
        redisAsyncCommandArgv(r->ac, on_sub_reply, r, 2, argv, NULL);
    }
    cm_free(s);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Public API                                                                                  */

void cm_redis_config_defaults(cm_redis_config_t *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->timeout_ms = 100;
    cfg->connect_timeout_ms = 1000;
    cfg->backoff_min_ms = 50;
    cfg->backoff_max_ms = 5000;
    cfg->health_interval_ms = 1000;
}

int cm_redis_open(uv_loop_t *loop, const cm_redis_config_t *cfg, cm_redis_t **out)
{
    if (!loop || !cfg || !out || !cfg->url || cfg->timeout_ms == 0 ||
        cfg->connect_timeout_ms == 0 || cfg->backoff_max_ms < cfg->backoff_min_ms)
        return UV_EINVAL;
    cm_redis_t *r = cm_calloc(1, sizeof *r);
    if (!r)
        return UV_ENOMEM;
    if (cm_redis_url_parse(cfg->url, &r->url) != 0) {
        cm_free(r);
        return UV_EINVAL;
    }
    r->name = cm_strdup(cfg->name ? cfg->name : "redis");
    if (!r->name) {
        cm_free(r);
        return UV_ENOMEM;
    }
    r->loop = loop;
    r->cfg = *cfg;
    r->cfg.url = NULL; /* parsed; not kept */
    r->cfg.name = r->name;
    r->reported = -1;
    r->backoff_ms = cfg->backoff_min_ms ? cfg->backoff_min_ms : 1;
    r->rng = uv_hrtime() ^ (uint64_t)(uintptr_t)r;
    if (!r->rng)
        r->rng = 0x9e3779b97f4a7c15ull;
    if (r->url.is_unix)
        snprintf(r->addr, sizeof r->addr, "unix:%s", r->url.path);
    else
        snprintf(r->addr, sizeof r->addr, "%s:%d", r->url.host, r->url.port);
    uv_timer_t *timers[] = {&r->cmd_timer, &r->conn_timer, &r->health_timer, &r->defer_timer};
    for (size_t i = 0; i < sizeof timers / sizeof timers[0]; i++) {
        uv_timer_init(loop, timers[i]);
        timers[i]->data = r;
        r->handles_open++;
    }
    /* The first attempt runs from the loop so that on_state never fires inside this call. */
    uv_timer_start(&r->conn_timer, on_conn_timer, 0, 0);
    *out = r;
    return 0;
}

int cm_redis_is_up(const cm_redis_t *r)
{
    return r && r->link == LINK_UP && !r->closing;
}

/* Registers a command cmd_t in the FIFO once hiredis accepted it. */
static void cmd_sent(cm_redis_t *r, cmd_t *c)
{
    c->state = CMD_PENDING;
    c->sent_ms = uv_now(r->loop);
    int was_empty = r->pending.head == NULL;
    list_push(&r->pending, c);
    if (was_empty)
        arm_cmd_timer(r);
}

int cm_redis_command_argv(cm_redis_t *r, cm_redis_reply_fn cb, void *ud, int argc,
                          const char **argv, const size_t *argvlen)
{
    if (!r || argc <= 0 || !argv)
        return UV_EINVAL;
    if (r->link != LINK_UP || r->closing)
        return UV_ENOTCONN;
    cmd_t *c = cmd_get(r);
    if (!c)
        return UV_ENOMEM;
    c->cb = cb;
    c->ud = ud;
    if (redisAsyncCommandArgv(r->ac, on_cmd_reply, c, argc, argv, argvlen) != REDIS_OK) {
        int err =
            (r->ac->c.flags & (REDIS_DISCONNECTING | REDIS_FREEING)) ? UV_ENOTCONN : UV_ENOMEM;
        cmd_put(r, c);
        return err;
    }
    cmd_sent(r, c);
    return 0;
}

int cm_redis_command(cm_redis_t *r, cm_redis_reply_fn cb, void *ud, const char *fmt, ...)
{
    if (!r || !fmt)
        return UV_EINVAL;
    if (r->link != LINK_UP || r->closing)
        return UV_ENOTCONN;
    cmd_t *c = cmd_get(r);
    if (!c)
        return UV_ENOMEM;
    c->cb = cb;
    c->ud = ud;
    va_list ap;
    va_start(ap, fmt);
    int rc = redisvAsyncCommand(r->ac, on_cmd_reply, c, fmt, ap);
    va_end(ap);
    if (rc != REDIS_OK) {
        int err =
            (r->ac->c.flags & (REDIS_DISCONNECTING | REDIS_FREEING)) ? UV_ENOTCONN : UV_EINVAL;
        cmd_put(r, c);
        return err;
    }
    cmd_sent(r, c);
    return 0;
}

int cm_redis_ping(cm_redis_t *r, cm_redis_ping_fn cb, void *ud)
{
    if (!r || !cb)
        return UV_EINVAL;
    if (r->link != LINK_UP || r->closing)
        return UV_ENOTCONN;
    cmd_t *c = cmd_get(r);
    if (!c)
        return UV_ENOMEM;
    if (send_probe(r) != 0) {
        cmd_put(r, c);
        return UV_ENOTCONN;
    }
    c->ping_cb = cb;
    c->ud = ud;
    c->sent_ms = uv_now(r->loop);
    c->start_ns = uv_hrtime();
    c->state = CMD_PENDING;
    list_push(&r->pings, c);
    arm_cmd_timer(r);
    return 0;
}

void cm_redis_stats(const cm_redis_t *r, cm_redis_stats_t *out)
{
    *out = r->stats;
}

/* ------------------------------------------------------------------------------------------ */
/* Close                                                                                       */

static void on_handle_closed(uv_handle_t *h)
{
    cm_redis_t *r = h->data;
    if (--r->handles_open > 0)
        return;
    cmd_t *c;
    while ((c = r->free_cmds) != NULL) {
        r->free_cmds = c->next;
        cm_free(c);
    }
    for (int b = 0; b < SUB_BUCKETS; b++) {
        sub_t *s = r->subs[b];
        while (s) {
            sub_t *next = s->next;
            cm_free(s);
            s = next;
        }
    }
    void (*done)(void *) = r->done;
    void *done_ud = r->done_ud;
    cm_free(r->name);
    cm_free(r);
    if (done)
        done(done_ud);
}

static void on_defer(uv_timer_t *t)
{
    cm_redis_t *r = t->data;
    /* Outside any hiredis callback here, so freeing a context is safe. Its pending callbacks
     * run now with NULL replies; they only recycle orphans. */
    if (r->dead_ac) {
        redisAsyncContext *ac = r->dead_ac;
        r->dead_ac = NULL;
        redisAsyncFree(ac);
    }
    if (!r->closing)
        return;
    if (r->ac) {
        redisAsyncContext *ac = r->ac;
        r->ac = NULL;
        r->link = LINK_DOWN;
        fail_all(r, UV_ECANCELED);
        redisAsyncFree(ac);
    }
    fail_all(r, UV_ECANCELED);
    uv_close((uv_handle_t *)&r->cmd_timer, on_handle_closed);
    uv_close((uv_handle_t *)&r->conn_timer, on_handle_closed);
    uv_close((uv_handle_t *)&r->health_timer, on_handle_closed);
    uv_close((uv_handle_t *)&r->defer_timer, on_handle_closed);
}

void cm_redis_close(cm_redis_t *r, void (*done)(void *ud), void *ud)
{
    if (!r || r->closing)
        return;
    r->closing = 1;
    r->done = done;
    r->done_ud = ud;
    uv_timer_stop(&r->cmd_timer);
    uv_timer_stop(&r->conn_timer);
    uv_timer_stop(&r->health_timer);
    schedule_defer(r);
}

int cm_redis_url_check(const char *url, char *why, size_t whysz)
{
    cm_redis_url_t u;
    if (cm_redis_url_parse(url, &u) == 0)
        return 0;
    snprintf(why, whysz, "expected redis://[user:password@]host[:port][/db] or unix:///path");
    return -1;
}
