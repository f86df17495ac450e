/*
 * cm/http: limits. The defaults of the request limits, the descriptor limit, the connection
 * limit (a canned 503) and the write-queue limit of a connection that does not read its
 * answers.
 */
#include "http_internal.h"

#include "cm/alloc.h"
#include "cm/log.h"

#include <stdio.h>
#include <string.h>
#include <sys/resource.h>

typedef struct reject {
    uv_tcp_t tcp;
    uv_shutdown_t shut;
} reject_t;

/* ------------------------------------------------------------------------------------------ */
/* Request limits, descriptors, connections                                                    */

void cm_http_config_defaults(cm_http_config_t *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->host = "0.0.0.0";
    cfg->port = 8080;
    cfg->max_header_bytes = 8192;
    cfg->max_headers = 64;
    cfg->max_body_bytes = 16384;
    cfg->header_timeout_ms = 10000;
    cfg->idle_timeout_ms = 60000;
    cfg->max_connections = 10000;
}

static void on_reject_close(uv_handle_t *h)
{
    cm_free(h->data);
}

static void on_reject_shutdown(uv_shutdown_t *r, int status)
{
    (void)status;
    reject_t *j = r->data;
    uv_close((uv_handle_t *)&j->tcp, on_reject_close);
}

void http_reject_connection(cm_http_server_t *s)
{
    static const char resp[] =
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        "Content-Length: 71\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"
        "{\"error\":{\"code\":\"overloaded\",\"message\":\"too many connections open\"}}";
    reject_t *j = cm_malloc(sizeof *j);
    if (!j)
        return;
    j->tcp.data = j;
    j->shut.data = j;
    if (uv_tcp_init(s->loop, &j->tcp) < 0) {
        cm_free(j);
        return;
    }
    if (uv_accept((uv_stream_t *)&s->listener, (uv_stream_t *)&j->tcp) == 0) {
        uv_buf_t b = uv_buf_init((char *)resp, sizeof resp - 1);
        (void)uv_try_write((uv_stream_t *)&j->tcp, &b, 1);
        if (uv_shutdown(&j->shut, (uv_stream_t *)&j->tcp, on_reject_shutdown) == 0)
            return;
    }
    uv_close((uv_handle_t *)&j->tcp, on_reject_close);
}

/* The default soft limit of 1024 descriptors would cap connections far below
 * max_connections (and libuv then drops the excess silently): raise it toward the hard
 * limit, as nginx's worker_rlimit_nofile does. */
void http_raise_fd_limit(size_t max_connections)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return;
    rlim_t want = (rlim_t)max_connections + 256; /* clients, plus Redis, Postgres, logs */
    if (rl.rlim_cur >= want)
        return;
    rl.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max > want ? want : rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur < want) {
        char have[24];
        snprintf(have, sizeof have, "%llu", (unsigned long long)rl.rlim_cur);
        cm_log_warn("http: the open-files limit is below the connection limit", "nofile", have,
                    NULL);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Write queue                                                                                 */

int http_write_limit_block(cm_http_conn_t *c)
{
    c->write_blocked = 1;
    http_conn_read_stop(c);
    return 1;
}

void http_write_limit_drained(cm_http_conn_t *c)
{
    /* Half the limit: hysteresis, so a peer reading slowly does not flip reading on and off
     * with every write that completes. */
    if (c->write_blocked && c->state == C_OPEN &&
        uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) < WRITE_QUEUE_MAX / 2) {
        c->write_blocked = 0;
        if (!c->in_feed && !c->busy)
            http_conn_after_feed(c);
    }
}
