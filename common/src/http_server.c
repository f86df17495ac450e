/*
 * cm/http: the server. Listener, start (address, defaults, llhttp settings), graceful stop.
 */
#include "http_internal.h"

#include "cm/alloc.h"
#include "cm/log.h"

#include <signal.h>
#include <string.h>

const char http_empty[] = "";

static void on_server_close(uv_handle_t *h)
{
    cm_http_server_t *s = h->data;
    if (--s->open_handles > 0)
        return;
    if (s->done && !s->failed)
        s->done(s->done_ud);
    cm_free(s->server_header);
    cm_free(s->rbuf);
    cm_free(s);
}

void http_server_check_done(cm_http_server_t *s)
{
    if (!s->stopping || s->nconns > 0 || s->done_called)
        return;
    s->done_called = 1;
    uv_close((uv_handle_t *)&s->stop_timer, on_server_close);
    uv_close((uv_handle_t *)&s->flush, on_server_close);
}

static void on_stop_deadline(uv_timer_t *t)
{
    cm_http_server_t *s = t->data;
    for (cm_http_conn_t *c = s->conns; c; c = c->next)
        http_conn_close_now(c);
}

int cm_http_server_start(uv_loop_t *loop, const cm_http_config_t *cfg, cm_http_server_t **out)
{
    if (!loop || !cfg || !cfg->handler || !cfg->host || cfg->port < 0 || cfg->port > 65535 || !out)
        return UV_EINVAL;
    /* A write to a peer that reset the connection raises SIGPIPE (libuv writes with writev,
     * which has no MSG_NOSIGNAL); the default action would kill the daemon. */
    struct sigaction old;
    if (sigaction(SIGPIPE, NULL, &old) == 0 && old.sa_handler == SIG_DFL)
        signal(SIGPIPE, SIG_IGN);
    http_raise_fd_limit(cfg->max_connections ? cfg->max_connections : 10000);
    struct sockaddr_storage addr;
    if (uv_ip4_addr(cfg->host, cfg->port, (struct sockaddr_in *)&addr) != 0 &&
        uv_ip6_addr(cfg->host, cfg->port, (struct sockaddr_in6 *)&addr) != 0) {
        /* A name ("localhost"): resolved once, synchronously, before the loop serves anyone. */
        uv_getaddrinfo_t gai;
        struct addrinfo hints = {
            .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE};
        int rc = uv_getaddrinfo(loop, &gai, NULL, cfg->host, NULL, &hints);
        if (rc != 0)
            return rc;
        memcpy(&addr, gai.addrinfo->ai_addr, gai.addrinfo->ai_addrlen);
        if (addr.ss_family == AF_INET6)
            ((struct sockaddr_in6 *)&addr)->sin6_port = htons((uint16_t)cfg->port);
        else
            ((struct sockaddr_in *)&addr)->sin_port = htons((uint16_t)cfg->port);
        uv_freeaddrinfo(gai.addrinfo);
    }
    cm_http_server_t *s = cm_calloc(1, sizeof *s);
    if (!s)
        return UV_ENOMEM;
    s->loop = loop;
    s->cfg = *cfg;
    s->cfg.host = NULL; /* borrowed only for this call */
    cm_http_config_t def;
    cm_http_config_defaults(&def);
    if (!s->cfg.max_header_bytes)
        s->cfg.max_header_bytes = def.max_header_bytes;
    if (!s->cfg.max_headers)
        s->cfg.max_headers = def.max_headers;
    if (!s->cfg.header_timeout_ms)
        s->cfg.header_timeout_ms = def.header_timeout_ms;
    if (!s->cfg.idle_timeout_ms)
        s->cfg.idle_timeout_ms = def.idle_timeout_ms;
    if (!s->cfg.max_connections)
        s->cfg.max_connections = def.max_connections;
    s->rbuf = cm_malloc(READ_BUF_SIZE);
    if (cfg->server_header)
        s->server_header = cm_strdup(cfg->server_header);
    s->cfg.server_header = NULL;
    if (!s->rbuf || (cfg->server_header && !s->server_header)) {
        cm_free(s->rbuf);
        cm_free(s->server_header);
        cm_free(s);
        return UV_ENOMEM;
    }
    http_parser_settings(&s->settings);

    uv_tcp_init(loop, &s->listener);
    uv_timer_init(loop, &s->stop_timer);
    uv_prepare_init(loop, &s->flush);
    s->listener.data = s;
    s->stop_timer.data = s;
    s->flush.data = s;
    s->open_handles = 3;
    int rc = uv_tcp_bind(&s->listener, (struct sockaddr *)&addr, 0);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&s->listener, LISTEN_BACKLOG, http_on_connection);
    if (rc == 0) {
        struct sockaddr_storage bound;
        int blen = (int)sizeof bound;
        rc = uv_tcp_getsockname(&s->listener, (struct sockaddr *)&bound, &blen);
        if (rc == 0)
            s->port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                                        : ((struct sockaddr_in *)&bound)->sin_port);
    }
    if (rc < 0) {
        /* The handles exist now, so the memory goes back on the next loop turn. */
        s->failed = 1;
        uv_close((uv_handle_t *)&s->listener, on_server_close);
        uv_close((uv_handle_t *)&s->stop_timer, on_server_close);
        uv_close((uv_handle_t *)&s->flush, on_server_close);
        return rc;
    }
    *out = s;
    return 0;
}

int cm_http_server_port(const cm_http_server_t *s)
{
    return s->port;
}

size_t cm_http_server_connections(const cm_http_server_t *s)
{
    return s->nconns;
}

void cm_http_server_stop(cm_http_server_t *s, uint64_t deadline_ms, void (*done)(void *ud),
                         void *ud)
{
    if (s->stopping)
        return;
    s->stopping = 1;
    s->done = done;
    s->done_ud = ud;
    uv_close((uv_handle_t *)&s->listener, on_server_close);
    uv_timer_start(&s->stop_timer, on_stop_deadline, deadline_ms, 0);
    cm_http_conn_t *next;
    for (cm_http_conn_t *c = s->conns; c; c = next) {
        next = c->next;
        if (!c->raw && !c->busy && !c->in_request && !http_pending_len(c))
            http_conn_shutdown(c);
    }
    http_server_check_done(s);
}
