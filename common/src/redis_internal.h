/*
 * redis_internal.h: the pieces of the Redis client (cm/redis.h) shared by its sources, not part
 * of the public API. Private to common/.
 *
 * How it is put together:
 *
 * - One hiredis async context (`ac`) at a time per client. hiredis frees a context by itself
 *   when the link fails (after calling every pending callback with a NULL reply, then the
 *   disconnect callback), so every hiredis callback first checks that its context is still the
 *   current one. A context we give up on ourselves (stall, connect timeout, close) is detached
 *   at once and freed from a zero-delay timer, never from inside a hiredis callback.
 * - One small `cmd_t` per command, from a free list. hiredis holds it as privdata until it
 *   calls back exactly once (reply or NULL); the user callback fires exactly once, on the
 *   first of reply, own deadline, lost link or close. A command answered to the user before
 *   hiredis lets go is late (still owed by the server) or an orphan (its context is gone):
 *   hiredis' later call only recycles it and the reply is dropped. Replies come in order and
 *   hiredis hands each to the privdata it was sent with, so a late reply never reaches another
 *   command.
 * - Own deadlines are per command (or none), so commands with one sit in a min-heap by
 *   deadline besides the FIFO of everything pending; one uv timer is armed for the earliest of
 *   that heap, the PING waiters and the stall check.
 * - Link health is judged by progress, not by deadlines: the link is stalled when work is owed
 *   (commands, late commands, probe) and no byte has come from the server for timeout_ms,
 *   counted from the later of the last read and the first write after the link was idle. A
 *   caller's own deadline never drops the link, so a deep pipeline to a healthy server does not
 *   either. Time the loop itself was busy is not the server's: a timer firing late restarts
 *   every clock, and a stall is confirmed only after one more poll phase saw nothing.
 * - Health: PING while idle (or, on a subscribed connection where hiredis 0.14.1 cannot route
 *   a PING reply, a SUBSCRIBE to a private channel whose confirmation serves as the pong).
 *   Probe callbacks get the client as privdata and are counted (sent/acked), since replies
 *   come in order.
 * - Sentinel mode (redis_sentinel.c finds the master and watches for switches): the target is
 *   r->url's host and port, rewritten before each attempt by discovery (LINK_RESOLVING) or
 *   by a +switch-master hint. What a failover looks like from here (a switch, -READONLY, a
 *   ROLE that is not master) drops the link through redis_drop_link like a stall does, with
 *   flags that pick the delay of the next attempt: none, short (ROLE), or the backoff.
 *
 * Files, one job each:
 *   redis.c           open, close and freeing the client, stats
 *   redis_url.c       REDIS_URL parsing and its config check
 *   redis_link.c      the connection's life: connect, Sentinel hand-off, handshake, failover
 *                     signs, loss, reconnect backoff, state reports
 *   redis_health.c    progress and stall detection, own deadlines, probes (health PING/ROLE)
 *   redis_cmd.c       commands and PINGs: the cmd_t pool, the deadline heap, completion
 *   redis_sub.c       subscriptions and pub/sub message dispatch
 *   redis_sentinel.c  REDIS_SENTINELS settings, master discovery, +switch-master watching
 *   redis_uv.c        hiredis' libuv event adapter
 */
#ifndef CM_REDIS_INTERNAL_H
#define CM_REDIS_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <uv.h>

#include "cm/backoff.h"
#include "cm/redis.h"
#include "redis_sentinel.h"

/* A link up this long (ms) has proven itself: the reconnect backoff starts over. */
#define BACKOFF_RESET_AFTER_MS 10000
/* A timer this much later than due (ms, at least; else half the timeout it serves) means the
 * loop itself was busy. */
#define LATE_SLACK_MIN_MS 10
/* Recycled command structs kept per client. */
#define FREE_CMDS_MAX 1024
/* Channel whose SUBSCRIBE confirmation serves as the PING of a subscribed connection. */
#define HEALTH_CHANNEL "__cm_redis_health__"
#define SUB_BUCKETS 256
#define NOT_IN_HEAP SIZE_MAX
/* Sentinel mode: the delay before asking again after a node said it is not the master (ROLE,
 * -LOADING), doubled up to the cap. Short, since during a failover the sentinels' answer
 * changes within a second or two; capped, so that a sentinel that keeps naming a replica is
 * not hammered. */
#define ROLE_RETRY_MIN_MS 100
#define ROLE_RETRY_MAX_MS 1000

typedef enum { CMD_FREE = 0, CMD_PENDING, CMD_LATE, CMD_ORPHAN } cmd_state_t;

typedef struct cmd cmd_t;
struct cmd {
    cmd_t *next, *prev;
    cm_redis_t *r;
    cm_redis_reply_fn cb; /* NULL: fire and forget */
    cm_redis_ping_fn ping_cb;
    void *ud;
    uint64_t timeout_ms;  /* own deadline, 0 = none */
    uint64_t deadline_ms; /* loop time, while in the heap */
    size_t heap_idx;      /* NOT_IN_HEAP unless waiting for its own deadline */
    uint64_t sent_tx;     /* the client's tx_events when queued */
    uint64_t sent_ms;     /* loop time when sent (PING waiters) */
    uint64_t start_ns;    /* hrtime, for PING latency */
    cmd_state_t state;
};

typedef struct {
    cmd_t *head, *tail;
    size_t n;
} cmd_list_t;

typedef struct sub sub_t;
struct sub {
    sub_t *next;
    cm_redis_message_fn cb;
    void *ud;
    char channel[]; /* NUL-terminated */
};

typedef enum { LINK_DOWN = 0, LINK_RESOLVING, LINK_CONNECTING, LINK_UP } link_t;

struct cm_redis {
    uv_loop_t *loop;
    cm_redis_config_t cfg;
    cm_redis_url_t url;
    char *name;
    char addr[300]; /* for logs */
    int quiet;      /* ups and downs logged at debug level (the sentinel module's links) */

    /* Sentinel mode (NULL: the URL's address). r->url.host/port is then the target. */
    cm_redis_sentinel_t *sentinel;
    int hint;                  /* the next attempt goes to r->url as announced, without asking */
    int retry_now;             /* the next attempt starts at once (switch, -READONLY) */
    int role_retry;            /* the next attempt waits for role_backoff (not the master yet) */
    cm_backoff_t role_backoff; /* ROLE_RETRY_MIN_MS..ROLE_RETRY_MAX_MS, reset when up */
    char last_master[300];     /* address of the last link up, for stats.master_moves */

    redisAsyncContext *ac;      /* current context, NULL when down */
    redisAsyncContext *dead_ac; /* detached context waiting to be freed from the loop */
    link_t link;
    int reported; /* -1 nothing reported yet, else the last state given to on_state */
    int ever_up;
    int handshake_left;   /* replies still expected before up */
    cm_backoff_t backoff; /* reconnect delay after failures */
    uint64_t up_since_ms; /* loop time the link came up; 0 while down */

    cmd_list_t pending; /* sent, not answered: oldest first */
    cmd_list_t late;    /* past their own deadline, reply not yet received: oldest first */
    cmd_list_t pings;   /* cm_redis_ping waiters: oldest first */
    cmd_t **heap;       /* pending commands with an own deadline, earliest first */
    size_t heap_n, heap_cap;
    cmd_t *free_cmds;
    int free_count;

    /* Probe (health PING or health SUBSCRIBE) bookkeeping for the current context. */
    uint64_t probes_sent, probes_acked;
    uint64_t probe_start_ns;

    /* Progress of the current link (see the top of this file). */
    uint64_t last_rx_ms;  /* loop time of the last read */
    uint64_t progress_ms; /* start of the stall window */
    int await_wire;       /* work queued on an idle link, not written yet: window not open */
    uint64_t rx_events, tx_events;
    int suspect;             /* stall window over; confirming after one more poll phase */
    uint64_t suspect_due_ms; /* when to confirm */
    uint64_t suspect_rx, suspect_tx;

    sub_t *subs[SUB_BUCKETS];
    size_t sub_count;

    cm_redis_stats_t stats;

    uv_timer_t cmd_timer;    /* earliest deadline */
    uint64_t cmd_due_ms;     /* loop time the cmd_timer is armed for, UINT64_MAX when not */
    uint64_t cmd_slack_ms;   /* lateness of that timer that means a busy loop */
    uv_timer_t conn_timer;   /* connect timeout, then reconnect backoff */
    uv_timer_t health_timer; /* idle PING */
    uv_timer_t defer_timer;  /* zero-delay work: free a detached context, close */
    int handles_open;        /* our timers and the socket adapters not yet closed */
    int closing;
    void (*done)(void *ud);
    void *done_ud;
};

static inline void redis_list_push(cmd_list_t *l, cmd_t *c)
{
    c->next = NULL;
    c->prev = l->tail;
    if (l->tail)
        l->tail->next = c;
    else
        l->head = c;
    l->tail = c;
    l->n++;
}

static inline void redis_list_remove(cmd_list_t *l, cmd_t *c)
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
    l->n--;
}

static inline const char *redis_name(const cm_redis_t *r)
{
    return r->name ? r->name : "redis";
}

/* redis.c */
/* One of our timers or socket adapters closed; the last one frees the client. */
void redis_handle_gone(cm_redis_t *r);
/* Runs the deferred work (free a detached context, finish a close) from the loop. */
void redis_schedule_defer(cm_redis_t *r);

/* redis_link.c */
/* Starts the first attempt from the loop, so that on_state never fires inside open. */
void redis_link_start(cm_redis_t *r);
/* cm_redis_sentinel_switch_fn of the client's discovery object. */
void redis_link_on_switch(const char *host, int port, void *ud);
/* hiredis gave up on `ac` (it frees it right after this); stale contexts are ignored. */
void redis_link_lost(cm_redis_t *r, const redisAsyncContext *ac, const char *error);
/* We give up on the current context: detach it now, free it from the loop, go down. */
void redis_drop_link(cm_redis_t *r, const char *error);
/* Sentinel mode: this link no longer leads to the master; `why` is copied at once. */
void redis_reresolve(cm_redis_t *r, const char *why);
/* Sentinel mode: error replies that mean this node is no longer (or not yet) the master. */
int redis_not_master_error(const redisReply *rep);
/* The role named by a ROLE reply ("master", "slave", "sentinel"), NULL when malformed. */
const char *redis_role_of(const redisReply *rep);

/* redis_health.c */
/* Hooks of the socket adapter (cm_redis_uv_hooks_t); `data` is the client. */
void redis_on_readable(void *data);
void redis_on_writable(void *data);
/* Call before new work is queued (see its definition). */
void redis_work_starting(cm_redis_t *r);
/* Arms cmd_timer for the earliest of own deadlines, PING waiters and the stall check. */
void redis_arm_cmd_timer(cm_redis_t *r);
/* Starts the idle health probe of a link that just came up. */
void redis_health_start(cm_redis_t *r);
/* Sends a probe unless one is already outstanding. Returns 0 or UV_ENOTCONN. */
int redis_send_probe(cm_redis_t *r);
/* A probe was answered; the last outstanding one completes the PING waiters. */
void redis_probe_acked(cm_redis_t *r);
/* A deadline far enough away never comes (UINT64_MAX is "not armed"), instead of wrapping. */
uint64_t redis_deadline_after(uint64_t now, uint64_t timeout_ms);

/* redis_cmd.c */
void redis_heap_down(cm_redis_t *r, size_t i);
void redis_heap_remove(cm_redis_t *r, cmd_t *c);
void redis_cmd_put(cm_redis_t *r, cmd_t *c);
/* Hands the outcome to the command's caller (if it has a callback). */
void redis_cmd_finish(cm_redis_t *r, cmd_t *c, redisReply *reply, int status);
/* Fails every command and PING waiter with `status` (a negative code). */
void redis_fail_all(cm_redis_t *r, int status);
/* Frees the recycled command structs and the heap (the client is going away). */
void redis_cmds_free(cm_redis_t *r);

/* redis_sub.c */
/* hiredis callback of everything sent on a subscribed connection. */
void redis_on_sub_reply(redisAsyncContext *ac, void *reply, void *privdata);
/* SUBSCRIBEs every remembered channel on a link that just came up. */
void redis_issue_subscriptions(cm_redis_t *r);
void redis_subs_free(cm_redis_t *r);

#endif
