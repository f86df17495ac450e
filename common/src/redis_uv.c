/*
 * redis_uv.c: hiredis 0.14.1 async contexts on a libuv poll (redis_uv.h).
 *
 * hiredis calls addWrite for every command it queues and addRead/delWrite around every read
 * and write. On Linux each uv_poll_start (and uv_poll_stop) first removes the descriptor from
 * epoll at once and re-adds it on the next poll, so a pipeline of N commands costs N failing
 * epoll_ctl calls. Here the hooks only update `want`; sync() compares it with the mask the
 * poll watches and calls libuv only on a real change.
 */
#include "redis_uv.h"

#include <hiredis/async.h>

#include "cm/alloc.h"

typedef struct redis_uv {
    uv_poll_t poll;
    redisAsyncContext *ac; /* NULL once hiredis let go of the context (cleanup hook) */
    int want;              /* UV_READABLE | UV_WRITABLE as asked by hiredis */
    int watching;          /* the mask the poll was last started with, 0 when stopped */
    int detached;          /* the owner gave up on the context: never watch again */
    cm_redis_uv_hooks_t hooks;
} redis_uv_t;

static void on_poll(uv_poll_t *h, int status, int events);

static void sync_poll(redis_uv_t *p)
{
    int target = p->detached || !p->ac ? 0 : p->want;
    if (target == p->watching)
        return;
    if (target == 0) {
        uv_poll_stop(&p->poll);
        p->watching = 0;
        return;
    }
    /* Left at 0 on failure, so that the next hook tries again. */
    p->watching = uv_poll_start(&p->poll, target, on_poll) == 0 ? target : 0;
}

static void on_poll(uv_poll_t *h, int status, int events)
{
    redis_uv_t *p = h->data;
    if (status < 0) {
        /* libuv stopped the poll (EPOLLERR: refused connect, reset link). A read makes hiredis
         * meet the socket error itself and tear the context down. */
        p->watching = 0;
        events = UV_READABLE;
    }
    /* Each step may free the context (p->ac NULL) or detach it: check again before the next. */
    if ((events & UV_READABLE) && p->ac && !p->detached) {
        if (p->hooks.readable)
            p->hooks.readable(p->hooks.data);
        if (p->ac && !p->detached)
            redisAsyncHandleRead(p->ac);
    }
    if ((events & UV_WRITABLE) && p->ac && !p->detached) {
        if (p->hooks.writable)
            p->hooks.writable(p->hooks.data);
        if (p->ac && !p->detached)
            redisAsyncHandleWrite(p->ac);
    }
    if (p->ac && status < 0)
        sync_poll(p); /* still alive after the read: watch again what hiredis wants */
}

static void add_read(void *privdata)
{
    redis_uv_t *p = privdata;
    p->want |= UV_READABLE;
    sync_poll(p);
}

static void del_read(void *privdata)
{
    redis_uv_t *p = privdata;
    p->want &= ~UV_READABLE;
    sync_poll(p);
}

static void add_write(void *privdata)
{
    redis_uv_t *p = privdata;
    p->want |= UV_WRITABLE;
    sync_poll(p);
}

static void del_write(void *privdata)
{
    redis_uv_t *p = privdata;
    p->want &= ~UV_WRITABLE;
    sync_poll(p);
}

static void on_close(uv_handle_t *h)
{
    redis_uv_t *p = h->data;
    cm_redis_uv_hooks_t hooks = p->hooks;
    cm_free(p);
    if (hooks.closed)
        hooks.closed(hooks.data);
}

/* hiredis frees the context right after this and then closes the socket: the poll must be
 * closed now (uv_close stops it at once), while the descriptor is still valid. */
static void cleanup(void *privdata)
{
    redis_uv_t *p = privdata;
    p->ac->ev.data = NULL;
    p->ac = NULL;
    p->watching = 0;
    uv_close((uv_handle_t *)&p->poll, on_close);
}

int cm_redis_uv_attach(redisAsyncContext *ac, uv_loop_t *loop, const cm_redis_uv_hooks_t *hooks)
{
    if (ac->ev.data)
        return UV_EBUSY;
    redis_uv_t *p = cm_calloc(1, sizeof *p);
    if (!p)
        return UV_ENOMEM;
    int rc = uv_poll_init(loop, &p->poll, ac->c.fd);
    if (rc != 0) {
        /* The handle was not registered with the loop: plain free is right here. */
        cm_free(p);
        return rc;
    }
    p->poll.data = p;
    p->ac = ac;
    p->hooks = *hooks;
    /* Hooks only once nothing can fail any more: hiredis must never call into a half-made
     * adapter (its cleanup would run on it when the caller frees the context). */
    ac->ev.data = p;
    ac->ev.addRead = add_read;
    ac->ev.delRead = del_read;
    ac->ev.addWrite = add_write;
    ac->ev.delWrite = del_write;
    ac->ev.cleanup = cleanup;
    return 0;
}

void cm_redis_uv_detach(redisAsyncContext *ac)
{
    redis_uv_t *p = ac->ev.data;
    if (!p || p->ac != ac)
        return;
    p->detached = 1;
    sync_poll(p);
}
