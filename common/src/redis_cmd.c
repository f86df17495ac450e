/*
 * redis_cmd.c: commands and PINGs of the Redis client (cm/redis.h): the cmd_t pool, the heap
 * of own deadlines, sending, and handing each outcome to its caller exactly once.
 */
#include <stdarg.h>
#include <string.h>

#include "cm/alloc.h"
#include "redis_internal.h"

/* Min-heap of own deadlines. Room is reserved before hiredis sees a command, so that pushing
 * never fails after hiredis accepted it. */
static int heap_reserve(cm_redis_t *r)
{
    if (r->heap_n < r->heap_cap)
        return 0;
    size_t cap = r->heap_cap ? r->heap_cap * 2 : 64;
    cmd_t **h = cm_realloc(r->heap, cap * sizeof *h);
    if (!h)
        return UV_ENOMEM;
    r->heap = h;
    r->heap_cap = cap;
    return 0;
}

static void heap_set(cm_redis_t *r, size_t i, cmd_t *c)
{
    r->heap[i] = c;
    c->heap_idx = i;
}

static void heap_up(cm_redis_t *r, size_t i)
{
    cmd_t *c = r->heap[i];
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (r->heap[parent]->deadline_ms <= c->deadline_ms)
            break;
        heap_set(r, i, r->heap[parent]);
        i = parent;
    }
    heap_set(r, i, c);
}

void redis_heap_down(cm_redis_t *r, size_t i)
{
    cmd_t *c = r->heap[i];
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= r->heap_n)
            break;
        if (child + 1 < r->heap_n && r->heap[child + 1]->deadline_ms < r->heap[child]->deadline_ms)
            child++;
        if (c->deadline_ms <= r->heap[child]->deadline_ms)
            break;
        heap_set(r, i, r->heap[child]);
        i = child;
    }
    heap_set(r, i, c);
}

static void heap_push(cm_redis_t *r, cmd_t *c)
{
    heap_set(r, r->heap_n++, c);
    heap_up(r, c->heap_idx);
}

void redis_heap_remove(cm_redis_t *r, cmd_t *c)
{
    size_t i = c->heap_idx;
    if (i == NOT_IN_HEAP)
        return;
    c->heap_idx = NOT_IN_HEAP;
    cmd_t *last = r->heap[--r->heap_n];
    if (last == c)
        return;
    heap_set(r, i, last);
    heap_up(r, i);
    redis_heap_down(r, last->heap_idx);
}

static void heap_clear(cm_redis_t *r)
{
    for (size_t i = 0; i < r->heap_n; i++)
        r->heap[i]->heap_idx = NOT_IN_HEAP;
    r->heap_n = 0;
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
    c->heap_idx = NOT_IN_HEAP;
    return c;
}

void redis_cmd_put(cm_redis_t *r, cmd_t *c)
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

void redis_cmd_finish(cm_redis_t *r, cmd_t *c, redisReply *reply, int status)
{
    if (c->cb)
        c->cb(r, reply, status, c->ud);
}

/* Fails every command still waiting for an answer (they become orphans: hiredis still holds
 * them), every late one (already answered) and every PING waiter. */
void redis_fail_all(cm_redis_t *r, int status)
{
    cmd_t *c;
    heap_clear(r);
    while ((c = r->late.head) != NULL) {
        redis_list_remove(&r->late, c);
        c->state = CMD_ORPHAN;
    }
    while ((c = r->pending.head) != NULL) {
        redis_list_remove(&r->pending, c);
        c->state = CMD_ORPHAN;
        redis_cmd_finish(r, c, NULL, status);
    }
    while ((c = r->pings.head) != NULL) {
        redis_list_remove(&r->pings, c);
        if (c->ping_cb)
            c->ping_cb(r, status, 0, c->ud);
        redis_cmd_put(r, c);
    }
    if (!r->closing)
        redis_arm_cmd_timer(r);
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
            redis_link_lost(r, ac, ac->errstr);
            if (c->state == CMD_PENDING) { /* redis_link_lost ignores a stale context */
                redis_list_remove(&r->pending, c);
                redis_heap_remove(r, c);
                redis_cmd_finish(r, c, NULL, r->closing ? UV_ECANCELED : UV_ECONNRESET);
            }
            break;
        }
        /* No timer work here: a timer armed for this command's deadline or for an older stall
         * window only fires early, and on_cmd_timer arms again for what is left. */
        redis_list_remove(&r->pending, c);
        redis_heap_remove(r, c);
        int moved = r->sentinel && redis_not_master_error(reply);
        redis_cmd_finish(r, c, reply, CM_REDIS_OK);
        /* hiredis frees the reply only when we return: its text is still there. */
        if (moved && ac == r->ac)
            redis_reresolve(r, ((redisReply *)reply)->str);
        break;
    case CMD_LATE:
        /* Answered after its own deadline: the user already had UV_ETIMEDOUT. hiredis frees
         * the reply when we return. */
        redis_list_remove(&r->late, c);
        if (!reply)
            redis_link_lost(r, ac, ac->errstr);
        else if (r->sentinel && redis_not_master_error(reply) && ac == r->ac)
            redis_reresolve(r, ((redisReply *)reply)->str);
        break;
    default:
        break;
    }
    redis_cmd_put(r, c);
}

/* A cmd_t, with heap room when it has an own deadline, before hiredis sees the command:
 * nothing may fail once hiredis accepted it. */
static int cmd_prepare(cm_redis_t *r, uint64_t timeout_ms, cm_redis_reply_fn cb, void *ud,
                       cmd_t **out)
{
    if (r->link != LINK_UP || r->closing)
        return UV_ENOTCONN;
    if (timeout_ms && heap_reserve(r) != 0)
        return UV_ENOMEM;
    cmd_t *c = cmd_get(r);
    if (!c)
        return UV_ENOMEM;
    c->cb = cb;
    c->ud = ud;
    c->timeout_ms = timeout_ms;
    *out = c;
    return 0;
}

/* Registers a command once hiredis accepted it. */
static void cmd_sent(cm_redis_t *r, cmd_t *c)
{
    redis_work_starting(r);
    c->state = CMD_PENDING;
    redis_list_push(&r->pending, c);
    if (!c->timeout_ms)
        return;
    c->deadline_ms = redis_deadline_after(uv_now(r->loop), c->timeout_ms);
    c->sent_tx = r->tx_events;
    heap_push(r, c);
    if (c->deadline_ms < r->cmd_due_ms)
        redis_arm_cmd_timer(r);
}

int cm_redis_command_argv_opts(cm_redis_t *r, const cm_redis_cmd_opts_t *opts, cm_redis_reply_fn cb,
                               void *ud, int argc, const char **argv, const size_t *argvlen)
{
    if (!r || argc <= 0 || !argv)
        return UV_EINVAL;
    cmd_t *c;
    int rc = cmd_prepare(r, opts ? opts->timeout_ms : r->cfg.timeout_ms, cb, ud, &c);
    if (rc != 0)
        return rc;
    if (redisAsyncCommandArgv(r->ac, on_cmd_reply, c, argc, argv, argvlen) != REDIS_OK) {
        int err =
            (r->ac->c.flags & (REDIS_DISCONNECTING | REDIS_FREEING)) ? UV_ENOTCONN : UV_ENOMEM;
        redis_cmd_put(r, c);
        return err;
    }
    cmd_sent(r, c);
    return 0;
}

int cm_redis_command_argv(cm_redis_t *r, cm_redis_reply_fn cb, void *ud, int argc,
                          const char **argv, const size_t *argvlen)
{
    return cm_redis_command_argv_opts(r, NULL, cb, ud, argc, argv, argvlen);
}

int cm_redis_command(cm_redis_t *r, cm_redis_reply_fn cb, void *ud, const char *fmt, ...)
{
    if (!r || !fmt)
        return UV_EINVAL;
    cmd_t *c;
    int rc = cmd_prepare(r, r->cfg.timeout_ms, cb, ud, &c);
    if (rc != 0)
        return rc;
    va_list ap;
    va_start(ap, fmt);
    rc = redisvAsyncCommand(r->ac, on_cmd_reply, c, fmt, ap);
    va_end(ap);
    if (rc != REDIS_OK) {
        int err =
            (r->ac->c.flags & (REDIS_DISCONNECTING | REDIS_FREEING)) ? UV_ENOTCONN : UV_EINVAL;
        redis_cmd_put(r, c);
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
    if (redis_send_probe(r) != 0) {
        redis_cmd_put(r, c);
        return UV_ENOTCONN;
    }
    c->ping_cb = cb;
    c->ud = ud;
    c->sent_ms = uv_now(r->loop);
    c->start_ns = uv_hrtime();
    c->state = CMD_PENDING;
    redis_list_push(&r->pings, c);
    redis_arm_cmd_timer(r);
    return 0;
}

void redis_cmds_free(cm_redis_t *r)
{
    cmd_t *c;
    while ((c = r->free_cmds) != NULL) {
        r->free_cmds = c->next;
        cm_free(c);
    }
    cm_free(r->heap);
    r->heap = NULL;
}
