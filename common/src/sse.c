#include "cm/sse.h"

#include "cm/alloc.h"

#include <stdio.h>
#include <string.h>
#include <uv.h>

struct cm_sse {
    cm_http_conn_t *conn;
    cm_sse_callbacks_t cbs;
    void *ud;
    size_t queue_max;
    int closing;
};

void cm_sse_config_defaults(cm_sse_config_t *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->send_queue_max = 1u << 20;
    cfg->retry_ms = 1000;
}

static int field_ok(const char *v)
{
    return v && !strpbrk(v, "\r\n");
}

int cm_sse_encode(cm_buf_t *out, const char *id, const char *event, const char *data, size_t len)
{
    if (!data)
        data = "";
    if ((id && !field_ok(id)) || (event && !field_ok(event)) || (len && memchr(data, '\0', len)))
        return UV_EINVAL;
    int rc = 0;
    if (id)
        rc = cm_buf_printf(out, "id: %s\n", id);
    if (rc == 0 && event)
        rc = cm_buf_printf(out, "event: %s\n", event);
    /* A data field cannot hold a line break: each line of the payload is a data line, and the
     * client joins them with "\n" again (a trailing break becomes an empty last line, so it
     * survives). CRLF and a lone CR are line breaks too. */
    const char *p = data, *end = data + len;
    while (rc == 0) {
        const char *eol = p;
        while (eol < end && *eol != '\n' && *eol != '\r')
            eol++;
        rc = cm_buf_append(out, "data: ", 6);
        if (rc == 0)
            rc = cm_buf_append(out, p, (size_t)(eol - p));
        if (rc == 0)
            rc = cm_buf_append(out, "\n", 1);
        if (eol == end)
            break;
        p = eol + 1;
        if (*eol == '\r' && p < end && *p == '\n')
            p++;
    }
    if (rc == 0)
        rc = cm_buf_append(out, "\n", 1);
    return rc ? UV_ENOMEM : 0;
}

/* As cm/ws: the cap is on what was waiting before the `just` bytes queued now, so one event
 * bigger than the cap still reaches a reader that keeps up. */
static int queued_result(cm_sse_t *s, int rc, size_t just)
{
    if (rc != 0)
        return rc;
    size_t queued = cm_http_conn_write_queue_size(s->conn);
    if (s->queue_max && queued > just && queued - just > s->queue_max)
        return UV_ENOBUFS;
    return 0;
}

int cm_sse_send(cm_sse_t *s, const char *id, const char *event, const char *data, size_t len)
{
    if (s->closing)
        return UV_EPIPE;
    cm_buf_t b = CM_BUF_INIT;
    int rc = cm_sse_encode(&b, id, event, data, len);
    size_t just = b.len;
    if (rc == 0)
        rc = cm_http_conn_write(s->conn, b.data, b.len);
    cm_buf_free(&b);
    return queued_result(s, rc, just);
}

int cm_sse_send_ref(cm_sse_t *s, const void *bytes, size_t len, cm_http_release_fn release,
                    void *arg)
{
    if (s->closing)
        return UV_EPIPE;
    return queued_result(s, cm_http_conn_write_ref(s->conn, bytes, len, release, arg), len);
}

int cm_sse_comment(cm_sse_t *s, const char *text)
{
    if (s->closing)
        return UV_EPIPE;
    if (!field_ok(text))
        return UV_EINVAL;
    char line[256];
    int n = snprintf(line, sizeof line, ": %s\n\n", text);
    if (n < 0 || (size_t)n >= sizeof line)
        return UV_EINVAL;
    return queued_result(s, cm_http_conn_write(s->conn, line, (size_t)n), (size_t)n);
}

void cm_sse_close(cm_sse_t *s)
{
    if (s->closing)
        return;
    s->closing = 1;
    cm_http_conn_close(s->conn, 0);
}

void cm_sse_abort(cm_sse_t *s)
{
    s->closing = 1;
    cm_http_conn_close(s->conn, 1);
}

size_t cm_sse_queued_bytes(const cm_sse_t *s)
{
    return cm_http_conn_write_queue_size(s->conn);
}

cm_http_conn_t *cm_sse_conn(const cm_sse_t *s)
{
    return s->conn;
}

static void raw_read(cm_http_conn_t *c, const char *data, ssize_t n, void *ud)
{
    (void)c;
    (void)data;
    (void)n;
    (void)ud;
    /* Nothing is expected from the client: bytes are dropped, an EOF is followed by on_close. */
}

static void raw_close(cm_http_conn_t *c, void *ud)
{
    (void)c;
    cm_sse_t *s = ud;
    s->closing = 1;
    if (s->cbs.on_close)
        s->cbs.on_close(s, s->ud);
    cm_free(s);
}

int cm_sse_accept(cm_http_request_t *req, const cm_sse_config_t *cfg, const cm_sse_callbacks_t *cbs,
                  void *ud, cm_sse_t **out)
{
    cm_sse_t *s = cm_calloc(1, sizeof *s);
    if (!s) {
        cm_http_respond_error(req, 503, "out_of_memory", "out of memory", NULL);
        return UV_ENOMEM;
    }
    s->cbs = *cbs;
    s->ud = ud;
    s->queue_max = cfg->send_queue_max;
    cm_buf_t head = CM_BUF_INIT;
    int rc = cm_buf_printf(&head,
                           "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                           "Cache-Control: no-store\r\nConnection: close\r\n"
                           "X-Accel-Buffering: no\r\n%s\r\n",
                           cfg->headers ? cfg->headers : "");
    /* The stream's first bytes: how soon EventSource reconnects after a lost connection. */
    if (rc == 0 && cfg->retry_ms)
        rc = cm_buf_printf(&head, "retry: %llu\n\n", (unsigned long long)cfg->retry_ms);
    if (rc != 0) {
        cm_buf_free(&head);
        cm_free(s);
        cm_http_respond_error(req, 503, "out_of_memory", "out of memory", NULL);
        return UV_ENOMEM;
    }
    static const cm_http_raw_cbs_t raw = {raw_read, raw_close};
    rc = cm_http_upgrade(req, head.data, head.len, &raw, s, &s->conn);
    cm_buf_free(&head);
    if (rc != 0) {
        cm_free(s);
        return rc;
    }
    *out = s;
    return 0;
}
