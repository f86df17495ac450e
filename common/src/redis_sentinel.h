/*
 * redis_sentinel.h: Redis Sentinel discovery and +switch-master watching for the Redis
 * client, private to common/.
 *
 * The sentinel links are plain cm_redis clients themselves (opened with cm_redis_open_url), so
 * that connect deadlines, stall detection and re-subscription are the same code as for the
 * data links.
 */
#ifndef CM_REDIS_SENTINEL_H
#define CM_REDIS_SENTINEL_H

#include <stddef.h>
#include <uv.h>

#include "cm/redis.h"

typedef struct cm_redis_sentinel cm_redis_sentinel_t;

/* Opens a plain client to an address already parsed (`url` borrowed, copied). cfg->url and the
 * sentinel fields are ignored. `quiet` logs its ups and downs at debug level only: the sentinel
 * links are not what an operator watches. Same returns as cm_redis_open. */
int cm_redis_open_url(uv_loop_t *loop, const cm_redis_config_t *cfg, const cm_redis_url_t *url,
                      int quiet, cm_redis_t **out);

/* Called for a +switch-master of our master, and when the check made after the watching
 * connection (re)subscribed found another address than the last one given out. `host` is
 * borrowed for the call. */
typedef void (*cm_redis_sentinel_switch_fn)(const char *host, int port, void *ud);

/* A new discovery object for cfg->sentinels, cfg->sentinel_master, cfg->sentinel_password,
 * cfg->sentinel_timeout_ms and cfg->sentinel_watch (all copied). Returns 0, UV_EINVAL or
 * UV_ENOMEM. */
int cm_redis_sentinel_new(uv_loop_t *loop, const cm_redis_config_t *cfg, const char *name,
                          cm_redis_sentinel_switch_fn on_switch, void *ud,
                          cm_redis_sentinel_t **out);

/* Resolve callback: status 0 with the master's address (borrowed for the call), or
 * UV_EHOSTUNREACH (no sentinel gave one; `error` says what each answered) or UV_ECANCELED
 * (closing). Fires exactly once, never from inside cm_redis_sentinel_resolve. */
typedef void (*cm_redis_sentinel_resolve_fn)(int status, const char *host, int port,
                                             const char *error, void *ud);

/* Asks the sentinels in order for the master's address. One at a time: UV_EBUSY while one
 * runs. Starts the +switch-master watcher after the first answer. Returns 0, UV_EBUSY or
 * UV_EINVAL (closing). */
int cm_redis_sentinel_resolve(cm_redis_sentinel_t *s, cm_redis_sentinel_resolve_fn cb, void *ud);

/* Closes the object: a running resolve gets UV_ECANCELED, then done(ud) once everything is
 * freed. */
void cm_redis_sentinel_close(cm_redis_sentinel_t *s, void (*done)(void *ud), void *ud);

#endif
