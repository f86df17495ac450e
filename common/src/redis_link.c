/*
 * redis_link.c: the life of the Redis client's connection (see redis_internal.h): Sentinel
 * discovery hand-off, connect, handshake, the signs of a failover, loss, and the delay before
 * the next attempt.
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "cm/log.h"
#include "redis_internal.h"
#include "redis_uv.h"

static void start_connect(cm_redis_t *r);
static void went_down(cm_redis_t *r, const char *error);
static void on_resolved(int status, const char *host, int port, const char *error, void *ud);

static void report(cm_redis_t *r, int up, const char *error)
{
    if (r->reported == up)
        return;
    r->reported = up;
    if (r->quiet)
        cm_log_debug(up ? "redis connected" : "redis unavailable", "name", redis_name(r), "addr",
                     r->addr, "error",
                     up      ? ""
                     : error ? error
                             : "unknown",
                     NULL);
    else if (up)
        cm_log_info("redis connected", "name", redis_name(r), "addr", r->addr, NULL);
    else
        cm_log_error("redis unavailable", "name", redis_name(r), "addr", r->addr, "error",
                     error ? error : "unknown", NULL);
    if (r->cfg.on_state && !r->closing)
        r->cfg.on_state(r, up, up ? NULL : error, r->cfg.ud);
}

/* Sentinel mode: error replies that mean this node is no longer (or not yet) the master. */
int redis_not_master_error(const redisReply *rep)
{
    return rep && rep->type == REDIS_REPLY_ERROR && rep->str &&
           (strncmp(rep->str, "READONLY", 8) == 0 || strncmp(rep->str, "LOADING", 7) == 0 ||
            strncmp(rep->str, "MASTERDOWN", 10) == 0);
}

/* The role named by a ROLE reply ("master", "slave", "sentinel"), NULL when malformed. */
const char *redis_role_of(const redisReply *rep)
{
    if (!rep || rep->type != REDIS_REPLY_ARRAY || rep->elements < 1 ||
        rep->element[0]->type != REDIS_REPLY_STRING)
        return NULL;
    return rep->element[0]->str;
}

/* Sentinel mode: this link no longer leads to the master. Dropped now, the sentinels are asked
 * again at once. `why` is copied before anything else runs. */
void redis_reresolve(cm_redis_t *r, const char *why)
{
    char msg[300];
    if (r->closing || (r->link != LINK_UP && r->link != LINK_CONNECTING))
        return;
    snprintf(msg, sizeof msg, "not the master any more: %s", why);
    r->retry_now = 1;
    redis_drop_link(r, msg);
}

static void on_adapter_closed(void *data)
{
    redis_handle_gone(data);
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
        redis_drop_link(r, msg);
    } else if (r->link == LINK_DOWN && !r->ac) {
        if (r->dead_ac) {
            redisAsyncContext *ac = r->dead_ac;
            r->dead_ac = NULL;
            redisAsyncFree(ac);
        }
        if (r->sentinel && !r->hint) {
            r->link = LINK_RESOLVING;
            if (cm_redis_sentinel_resolve(r->sentinel, on_resolved, r) != 0)
                went_down(r, "sentinel discovery busy");
            return;
        }
        r->hint = 0;
        start_connect(r);
    }
}

static void set_target(cm_redis_t *r, const char *host, int port)
{
    snprintf(r->url.host, sizeof r->url.host, "%s", host);
    r->url.port = port;
    snprintf(r->addr, sizeof r->addr, "%s:%d", host, port);
}

static void on_resolved(int status, const char *host, int port, const char *error, void *ud)
{
    cm_redis_t *r = ud;
    if (r->closing || r->link != LINK_RESOLVING)
        return;
    if (status != 0) {
        char msg[700];
        snprintf(msg, sizeof msg, "sentinel: no master address: %s", error ? error : "failed");
        went_down(r, msg);
        return;
    }
    /* A +switch-master that came while we asked is newer than this answer. */
    if (!r->hint)
        set_target(r, host, port);
    r->hint = 0;
    start_connect(r);
}

void redis_link_on_switch(const char *host, int port, void *ud)
{
    cm_redis_t *r = ud;
    if (r->closing)
        return;
    int same = strcmp(r->url.host, host) == 0 && r->url.port == port;
    if (same && (r->link == LINK_UP || r->link == LINK_CONNECTING))
        return;
    if (r->link == LINK_UP || r->link == LINK_CONNECTING) {
        char msg[340];
        snprintf(msg, sizeof msg, "sentinel: the master moved to %s:%d", host, port);
        r->retry_now = 1;
        redis_drop_link(r,
                        msg); /* reported with the old address; the reconnect waits for the loop */
    } else if (r->link == LINK_DOWN && !r->ac) {
        uv_timer_start(&r->conn_timer, on_conn_timer, 0, 0);
    }
    /* LINK_RESOLVING: on_resolved takes the hint. */
    set_target(r, host, port);
    r->hint = 1;
}

static void schedule_reconnect(cm_redis_t *r)
{
    if (r->closing)
        return;
    /* The backoff starts over only after a link that stayed up a while: a server that
     * accepts connections and then stalls must not be reconnected to as fast as possible. */
    if (r->up_since_ms && uv_now(r->loop) - r->up_since_ms >= BACKOFF_RESET_AFTER_MS)
        cm_backoff_reset(&r->backoff);
    r->up_since_ms = 0;
    uint64_t d;
    if (r->retry_now)
        d = 0; /* not a failure of the master: it moved, and the sentinels know where */
    else if (r->role_retry)
        d = cm_backoff_next(&r->role_backoff);
    else
        d = cm_backoff_next(&r->backoff);
    r->retry_now = r->role_retry = 0;
    uv_timer_start(&r->conn_timer, on_conn_timer, d, 0);
}

/* Leaves the up/connecting state after a failure: fails what is pending, reports down once,
 * plans the next attempt. The context itself is handled by the caller. */
static void went_down(cm_redis_t *r, const char *error)
{
    r->link = LINK_DOWN;
    r->stats.errors++;
    uv_timer_stop(&r->cmd_timer);
    r->cmd_due_ms = UINT64_MAX;
    uv_timer_stop(&r->health_timer);
    uv_timer_stop(&r->conn_timer);
    if (r->reported == 1 || r->reported == -1)
        report(r, 0, error);
    else
        cm_log_debug("redis connect failed", "name", redis_name(r), "error", error, NULL);
    redis_fail_all(r, r->closing ? UV_ECANCELED : UV_ECONNRESET);
    schedule_reconnect(r);
}

/* hiredis gave up on `ac` (it frees it right after this). */
void redis_link_lost(cm_redis_t *r, const redisAsyncContext *ac, const char *error)
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
void redis_drop_link(cm_redis_t *r, const char *error)
{
    redisAsyncContext *ac = r->ac;
    if (!ac)
        return;
    r->ac = NULL;
    if (r->dead_ac) /* cannot happen: the defer timer runs before any reconnect */
        redisAsyncFree(r->dead_ac);
    r->dead_ac = ac;
    /* No more events for it: what is still buffered is ignored as stale. */
    cm_redis_uv_detach(ac);
    redis_schedule_defer(r);
    went_down(r, error);
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    cm_redis_t *r = ac->data;
    if (status != REDIS_OK)
        redis_link_lost(r, ac, ac->errstr);
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    cm_redis_t *r = ac->data;
    (void)status;
    redis_link_lost(r, ac, ac->errstr);
}

/* Reply to AUTH, SELECT and the final PING of the handshake. */
static void on_handshake_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    cm_redis_t *r = privdata;
    redisReply *rep = reply;
    if (ac != r->ac || r->closing)
        return;
    if (!rep) {
        redis_link_lost(r, ac, ac->errstr);
        return;
    }
    if (rep->type == REDIS_REPLY_ERROR) {
        char msg[300];
        snprintf(msg, sizeof msg, "handshake: %s", rep->str);
        r->role_retry = r->sentinel && redis_not_master_error(rep);
        redis_drop_link(r, msg);
        return;
    }
    /* Only ROLE answers the handshake with an array. */
    const char *role = rep->type == REDIS_REPLY_ARRAY ? redis_role_of(rep) : NULL;
    if (rep->type == REDIS_REPLY_ARRAY && (!role || strcmp(role, "master") != 0)) {
        char msg[360];
        snprintf(msg, sizeof msg, "ROLE: %s is %s, not the master", r->addr,
                 role ? role : "unknown");
        r->role_retry = 1;
        redis_drop_link(r, msg);
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
    if (r->sentinel) {
        if (r->last_master[0] && strcmp(r->last_master, r->addr) != 0)
            r->stats.master_moves++;
        snprintf(r->last_master, sizeof r->last_master, "%s", r->addr);
        cm_backoff_reset(&r->role_backoff);
    }
    r->last_rx_ms = r->progress_ms = uv_now(r->loop);
    r->await_wire = 0;
    r->suspect = 0;
    redis_issue_subscriptions(r);
    redis_health_start(r);
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
    const cm_redis_uv_hooks_t hooks = {redis_on_readable, redis_on_writable, on_adapter_closed, r};
    int rc = cm_redis_uv_attach(ac, r->loop, &hooks);
    if (rc != 0) {
        redisAsyncFree(ac); /* no hooks were set: nothing of the adapter to clean up */
        went_down(r, rc == UV_ENOMEM ? "out of memory" : "cannot watch the socket");
        return;
    }
    r->handles_open++; /* the adapter's poll, until on_adapter_closed */
    r->ac = ac;
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    r->probes_sent = r->probes_acked = 0;
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
    /* Sentinel mode: the address came from a sentinel, whose view may be a moment old. */
    if (r->sentinel) {
        redisAsyncCommand(ac, on_handshake_reply, r, "ROLE");
        r->handshake_left++;
    }
    /* A final PING: the server answers (not LOADING, not paused) before we call it up. */
    redisAsyncCommand(ac, on_handshake_reply, r, "PING");
    r->handshake_left++;
    uv_timer_start(&r->conn_timer, on_conn_timer, r->cfg.connect_timeout_ms, 0);
}

void redis_link_start(cm_redis_t *r)
{
    uv_timer_start(&r->conn_timer, on_conn_timer, 0, 0);
}
