/*
 * redis_uv.h: the libuv event adapter of hiredis 0.14.1 async contexts, private to the Redis
 * client (redis_link.c attaches it).
 *
 * Replaces hiredis' adapters/libuv.h, which restarts the poll on every add/del hook (one
 * failing epoll_ctl per queued command in a pipeline). This one keeps the event mask the poll
 * watches and touches the poll only when that mask really changes.
 *
 * Ownership: the adapter object owns its uv_poll_t and frees itself in the poll's close
 * callback. hiredis' cleanup hook (run once while it frees the context, before it closes the
 * socket) starts that close; hooks->closed then tells the owner the handle is gone.
 */
#ifndef CM_REDIS_UV_H
#define CM_REDIS_UV_H

#include <uv.h>

struct redisAsyncContext;

typedef struct cm_redis_uv_hooks {
    /* Called with `data` before hiredis handles a readable event (data or EOF arrived), then
     * before it handles a writable one (bytes are about to be written). Either may be NULL. */
    void (*readable)(void *data);
    void (*writable)(void *data);
    /* Called once from the poll's close callback, after the adapter freed itself. */
    void (*closed)(void *data);
    void *data;
} cm_redis_uv_hooks_t;

/* Watches the socket of `ac` (connecting or connected) on `loop`. `hooks` is copied. Returns
 * 0, UV_EBUSY (the context already has an adapter), UV_ENOMEM, or the error of uv_poll_init;
 * on error `ac` is left without hooks and hooks->closed will not be called. */
int cm_redis_uv_attach(struct redisAsyncContext *ac, uv_loop_t *loop,
                       const cm_redis_uv_hooks_t *hooks);

/* Stops watching the socket of `ac` for good, for a context its owner gave up on and frees
 * later: no more events, whatever hiredis asks for meanwhile. */
void cm_redis_uv_detach(struct redisAsyncContext *ac);

#endif
