/*
 * The service's life cycle: creation, the listener, the signals and the drain on SIGTERM.
 * Its endpoints are in service_routes.c.
 */
#include "service_internal.h"

#include <signal.h>

#include "cm/alloc.h"

int cm_service_new(uv_loop_t *loop, const cm_service_config_t *cfg, cm_service_t **out)
{
    *out = NULL;
    if (!loop || !cfg || !cfg->name || !cfg->settings || !cfg->ready || !cfg->not_ready ||
        !cfg->health_redis || !cfg->oom_code || !cfg->on_stopped)
        return UV_EINVAL;
    cm_log_init(cfg->name, cfg->settings->log_level, cfg->settings->log_format);
    cm_service_t *s = cm_calloc(1, sizeof *s);
    if (!s)
        return UV_ENOMEM;
    s->loop = loop;
    s->cfg = *cfg;
    s->metrics = cm_metrics_new();
    s->http_metrics = s->metrics ? cm_http_metrics_new(s->metrics) : NULL;
    s->router = cm_router_new();
    if (s->metrics) {
        s->m_reconnects = cm_metrics_counter(s->metrics, "redis_reconnects_total",
                                             "Redis reconnections after a lost link.", NULL);
        s->m_timeouts =
            cm_metrics_counter(s->metrics, "redis_command_timeouts_total",
                               "Redis commands not answered within REDIS_TIMEOUT_MS.", NULL);
        s->m_stalls = cm_metrics_counter(s->metrics, "redis_stalls_total",
                                         "Redis links dropped because nothing came back for "
                                         "REDIS_TIMEOUT_MS while owed replies.",
                                         NULL);
    }
    if (!s->http_metrics || !s->router || !s->m_reconnects || !s->m_timeouts || !s->m_stalls) {
        cm_service_free(s);
        return UV_ENOMEM;
    }
    *out = s;
    return 0;
}

cm_metrics_t *cm_service_metrics(const cm_service_t *s)
{
    return s->metrics;
}

int cm_service_route(cm_service_t *s, unsigned methods, const char *path, cm_http_handler_fn fn,
                     void *ud)
{
    return cm_router_add(s->router, methods, path, fn, ud);
}

int cm_service_mirror_redis(cm_service_t *s, cm_redis_t *r)
{
    if (s->nmirrored == SERVICE_MAX_MIRRORED)
        return UV_ENOSPC;
    s->mirrored[s->nmirrored++] = r;
    return 0;
}

/* ---- stopping ------------------------------------------------------------------------- */

static void on_handle_closed(uv_handle_t *h)
{
    cm_service_t *s = h->data;
    s->handles_open--;
}

void cm_service_close(cm_service_t *s)
{
    if (!s->started || s->closing)
        return;
    s->closing = 1;
    uv_close((uv_handle_t *)&s->sig_term, on_handle_closed);
    uv_close((uv_handle_t *)&s->sig_int, on_handle_closed);
    uv_close((uv_handle_t *)&s->sig_hup, on_handle_closed);
    uv_close((uv_handle_t *)&s->drain_timer, on_handle_closed);
}

static void on_http_stopped(void *ud)
{
    cm_service_t *s = ud;
    s->http = NULL;
    uv_timer_stop(&s->drain_timer);
    s->cfg.on_stopped(s->cfg.ud);
}

static void on_drain_timeout(uv_timer_t *t)
{
    cm_service_t *s = t->data;
    s->cfg.on_drain_late(s->cfg.ud);
}

static void begin_stop(cm_service_t *s, int signum)
{
    if (s->stopping || !s->http)
        return;
    s->stopping = 1;
    if (s->cfg.on_stop)
        s->cfg.on_stop(signum, s->cfg.ud);
    if (s->cfg.on_drain_late && s->cfg.drain_ms)
        uv_timer_start(&s->drain_timer, on_drain_timeout, s->cfg.drain_ms, 0);
    cm_http_server_stop(s->http, s->cfg.stop_deadline_ms, on_http_stopped, s);
}

void cm_service_stop(cm_service_t *s)
{
    begin_stop(s, 0);
}

int cm_service_stopping(const cm_service_t *s)
{
    return s->stopping;
}

/* The handles stay open until cm_service_close, past the drain: a second SIGTERM while the
 * daemon closes its clients must not get the default action, which would kill it mid-way and
 * turn a clean exit into 143. */
static void on_stop_signal(uv_signal_t *h, int signum)
{
    begin_stop(h->data, signum);
}

static void on_reload_signal(uv_signal_t *h, int signum)
{
    (void)signum;
    cm_service_t *s = h->data;
    if (s->cfg.on_reload)
        s->cfg.on_reload(s->cfg.settings->config_file, s->cfg.ud);
}

/* ---- starting ------------------------------------------------------------------------- */

int cm_service_start(cm_service_t *s)
{
    int err = service_routes_add(s);
    if (err)
        return err;
    cm_http_config_t hc;
    cm_http_config_defaults(&hc);
    hc.host = s->cfg.settings->listen_host;
    hc.port = s->cfg.settings->listen_port;
    if (s->cfg.max_connections)
        hc.max_connections = s->cfg.max_connections;
    hc.handler = cm_router_dispatch;
    hc.handler_ud = s->router;
    hc.observe = cm_http_metrics_observe;
    hc.observe_ud = s->http_metrics;
    hc.server_header = s->cfg.name;
    if ((err = cm_http_server_start(s->loop, &hc, &s->http)))
        return err;

    uv_signal_t *sigs[3] = {&s->sig_term, &s->sig_int, &s->sig_hup};
    for (int i = 0; i < 3; i++) {
        uv_signal_init(s->loop, sigs[i]);
        sigs[i]->data = s;
    }
    uv_timer_init(s->loop, &s->drain_timer);
    s->drain_timer.data = s;
    s->handles_open = 4;
    s->started = 1;
    uv_signal_start(&s->sig_term, on_stop_signal, SIGTERM);
    uv_signal_start(&s->sig_int, on_stop_signal, SIGINT);
    uv_signal_start(&s->sig_hup, on_reload_signal, SIGHUP);
    return 0;
}

int cm_service_port(const cm_service_t *s)
{
    return s->http ? cm_http_server_port(s->http) : 0;
}

void cm_service_free(cm_service_t *s)
{
    if (!s)
        return;
    cm_router_free(s->router);
    cm_http_metrics_free(s->http_metrics);
    cm_metrics_free(s->metrics);
    cm_free(s);
}
