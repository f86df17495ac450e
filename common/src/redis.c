/*
 * redis.c: the asynchronous Redis client (cm/redis.h) on hiredis 0.14.1 and our libuv adapter
 * (redis_uv.c): opening, closing and freeing a client. How the client works, and which file
 * does what, is told in redis_internal.h.
 */
#include <stdio.h>
#include <string.h>

#include "cm/alloc.h"
#include "redis_internal.h"

static void on_defer(uv_timer_t *t);

void redis_schedule_defer(cm_redis_t *r)
{
    uv_timer_start(&r->defer_timer, on_defer, 0, 0);
}

void cm_redis_config_defaults(cm_redis_config_t *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->timeout_ms = 100;
    cfg->connect_timeout_ms = 1000;
    cfg->backoff_min_ms = 50;
    cfg->backoff_max_ms = 5000;
    cfg->health_interval_ms = 1000;
    cfg->sentinel_timeout_ms = 500;
    cfg->sentinel_watch = 1;
}

static int open_client(uv_loop_t *loop, const cm_redis_config_t *cfg, const cm_redis_url_t *url,
                       int quiet, int sentinel, cm_redis_t **out)
{
    if (!loop || !out || cfg->timeout_ms == 0 || cfg->connect_timeout_ms == 0 ||
        cfg->backoff_max_ms < cfg->backoff_min_ms || (sentinel && url->is_unix))
        return UV_EINVAL;
    cm_redis_t *r = cm_calloc(1, sizeof *r);
    if (!r)
        return UV_ENOMEM;
    r->url = *url;
    r->quiet = quiet;
    r->name = cm_strdup(cfg->name ? cfg->name : "redis");
    if (!r->name) {
        cm_free(r);
        return UV_ENOMEM;
    }
    if (sentinel) {
        int rc = cm_redis_sentinel_new(loop, cfg, r->name, redis_link_on_switch, r, &r->sentinel);
        if (rc != 0) {
            cm_free(r->name);
            cm_free(r);
            return rc;
        }
        r->handles_open++; /* until on_sentinel_closed */
    }
    r->loop = loop;
    r->cfg = *cfg;
    r->cfg.url = NULL; /* parsed; not kept */
    r->cfg.sentinels = r->cfg.sentinel_master = r->cfg.sentinel_password = NULL; /* copied */
    r->cfg.name = r->name;
    r->reported = -1;
    r->cmd_due_ms = UINT64_MAX;
    /* Seeded apart per process and client, so that replicas do not retry in lockstep. */
    uint64_t seed = uv_hrtime() ^ (uint64_t)(uintptr_t)r;
    cm_backoff_init(&r->backoff, cfg->backoff_min_ms, cfg->backoff_max_ms, seed);
    cm_backoff_init(&r->role_backoff, ROLE_RETRY_MIN_MS, ROLE_RETRY_MAX_MS, ~seed);
    if (r->sentinel)
        snprintf(r->addr, sizeof r->addr, "sentinel:%s", cfg->sentinel_master);
    else if (r->url.is_unix)
        snprintf(r->addr, sizeof r->addr, "unix:%s", r->url.path);
    else
        snprintf(r->addr, sizeof r->addr, "%s:%d", r->url.host, r->url.port);
    uv_timer_t *timers[] = {&r->cmd_timer, &r->conn_timer, &r->health_timer, &r->defer_timer};
    for (size_t i = 0; i < sizeof timers / sizeof timers[0]; i++) {
        uv_timer_init(loop, timers[i]);
        timers[i]->data = r;
        r->handles_open++;
    }
    redis_link_start(r);
    *out = r;
    return 0;
}

int cm_redis_open(uv_loop_t *loop, const cm_redis_config_t *cfg, cm_redis_t **out)
{
    if (!cfg)
        return UV_EINVAL;
    int sentinel = cfg->sentinels && *cfg->sentinels;
    cm_redis_url_t url;
    if (cfg->url) {
        if (cm_redis_url_parse(cfg->url, &url) != 0)
            return UV_EINVAL;
    } else if (sentinel) {
        memset(&url, 0, sizeof url);
        url.port = 6379;
    } else {
        return UV_EINVAL;
    }
    return open_client(loop, cfg, &url, 0, sentinel, out);
}

int cm_redis_open_url(uv_loop_t *loop, const cm_redis_config_t *cfg, const cm_redis_url_t *url,
                      int quiet, cm_redis_t **out)
{
    if (!cfg || !url)
        return UV_EINVAL;
    return open_client(loop, cfg, url, quiet, 0, out);
}

int cm_redis_is_up(const cm_redis_t *r)
{
    return r && r->link == LINK_UP && !r->closing;
}

void cm_redis_stats(const cm_redis_t *r, cm_redis_stats_t *out)
{
    *out = r->stats;
}

/* ------------------------------------------------------------------------------------------ */
/* Close                                                                                       */

/* One of our timers or socket adapters closed; the last one frees the client. */
void redis_handle_gone(cm_redis_t *r)
{
    if (--r->handles_open > 0)
        return;
    redis_cmds_free(r);
    redis_subs_free(r);
    void (*done)(void *) = r->done;
    void *done_ud = r->done_ud;
    cm_free(r->name);
    cm_free(r);
    if (done)
        done(done_ud);
}

static void on_handle_closed(uv_handle_t *h)
{
    redis_handle_gone(h->data);
}

static void on_sentinel_closed(void *ud)
{
    redis_handle_gone(ud);
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
        redis_fail_all(r, UV_ECANCELED);
        redisAsyncFree(ac);
    }
    redis_fail_all(r, UV_ECANCELED);
    uv_close((uv_handle_t *)&r->cmd_timer, on_handle_closed);
    uv_close((uv_handle_t *)&r->conn_timer, on_handle_closed);
    uv_close((uv_handle_t *)&r->health_timer, on_handle_closed);
    uv_close((uv_handle_t *)&r->defer_timer, on_handle_closed);
    if (r->sentinel) {
        cm_redis_sentinel_t *s = r->sentinel;
        r->sentinel = NULL;
        cm_redis_sentinel_close(s, on_sentinel_closed, r);
    }
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
    redis_schedule_defer(r);
}
