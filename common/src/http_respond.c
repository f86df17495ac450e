/*
 * cm/http: response heads and plain (not corked) writes.
 */
#include "http_internal.h"

#include "cm/alloc.h"

#include <string.h>

typedef struct wreq {
    uv_write_t req;
    cm_http_conn_t *conn;
    size_t len;
    char data[];
} wreq_t;

static void on_write(uv_write_t *w, int status)
{
    wreq_t *r = (wreq_t *)w;
    cm_http_conn_t *c = r->conn;
    cm_free(r);
    if (status < 0 && status != UV_ECANCELED) {
        http_conn_close_now(c);
        return;
    }
    http_write_limit_drained(c);
}

/* Writes a then b (either may be empty): uv_try_write first, the rest copied into one uv_write.
 * Returns 0 or a negative code (the caller closes the connection). */
int http_conn_send(cm_http_conn_t *c, const char *a, size_t alen, const char *b, size_t blen)
{
    uv_buf_t bufs[2];
    unsigned nb = 0;
    if (alen)
        bufs[nb++] = uv_buf_init((char *)a, (unsigned)alen);
    if (blen)
        bufs[nb++] = uv_buf_init((char *)b, (unsigned)blen);
    if (nb == 0)
        return 0;
    size_t total = alen + blen;
    int n = uv_try_write((uv_stream_t *)&c->tcp, bufs, nb);
    if (n >= 0 && (size_t)n == total)
        return 0;
    if (n < 0 && n != UV_EAGAIN)
        return n;
    size_t done = n < 0 ? 0 : (size_t)n;
    size_t rest = total - done;
    wreq_t *r = cm_malloc(sizeof *r + rest);
    if (!r)
        return UV_ENOMEM;
    r->conn = c;
    r->len = rest;
    char *p = r->data;
    if (done < alen) {
        memcpy(p, a + done, alen - done);
        p += alen - done;
        if (blen)
            memcpy(p, b, blen);
    } else {
        memcpy(p, b + (done - alen), blen - (done - alen));
    }
    uv_buf_t one = uv_buf_init(r->data, (unsigned)rest);
    int rc = uv_write(&r->req, (uv_stream_t *)&c->tcp, &one, 1, on_write);
    if (rc < 0) {
        cm_free(r);
        return rc;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Response heads                                                                              */

static char *put(char *p, const char *s, size_t n)
{
    memcpy(p, s, n);
    return p + n;
}

static char *put_u(char *p, size_t v)
{
    char tmp[24];
    size_t i = sizeof tmp;
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return put(p, tmp + i, sizeof tmp - i);
}

/* Common tail of every answer: metrics, then release or continue the connection. */
void http_conn_answered(cm_http_conn_t *c, int status, int close, int failed)
{
    cm_http_server_t *s = c->srv;
    cm_http_request_t *r = &c->req;
    if (s->cfg.observe) {
        uint64_t start = r->start_ns ? r->start_ns : uv_hrtime();
        double secs = (double)(uv_hrtime() - start) / 1e9;
        s->cfg.observe(r, status, secs, s->cfg.observe_ud);
    }
    c->busy = 0;
    if (c->state == C_CLOSING) {
        http_conn_maybe_free(c);
        return;
    }
    if (failed) {
        http_conn_close_now(c);
        return;
    }
    if (close) {
        http_conn_shutdown(c);
        return;
    }
    if (!c->in_feed)
        http_conn_after_feed(c);
}

int cm_http_respond(cm_http_request_t *req, int status, const char *content_type,
                    const char *headers, const void *body, size_t body_len)
{
    cm_http_conn_t *c = req ? req->conn : NULL;
    if (!c || !c->busy || status < 100 || status > 999)
        return UV_EINVAL;
    cm_http_server_t *s = c->srv;
    /* A request that asked for an upgrade we did not grant leaves bytes of another protocol
     * behind it, so that connection closes too. */
    size_t more = c->in_feed ? c->feed_rest : http_pending_len(c);
    int close = !req->keep_alive || s->stopping || c->parser.upgrade || (c->peer_eof && !more);
    int rc = 0;
    if (c->state == C_OPEN) {
        const char *text = cm_http_status_text(status);
        size_t tl = strlen(text);
        size_t ctl = content_type ? strlen(content_type) : 0;
        size_t hl = headers ? strlen(headers) : 0;
        size_t sl = s->server_header ? strlen(s->server_header) : 0;
        /* RFC 9110 sections 8.6 and 6.4.1: no Content-Length or content in 1xx and 204. */
        int no_length = status < 200 || status == 204;
        int no_body = no_length || status == 304 || req->is_head;
        size_t need = 9 + 3 + 1 + tl + 2 + (sl ? 8 + sl + 2 : 0) + (ctl ? 14 + ctl + 2 : 0) +
                      (no_length ? 0 : 16 + 20 + 2) + 24 + hl + 2;
        cm_buf_reset(&c->out);
        if (cm_buf_reserve(&c->out, need) < 0) {
            rc = UV_ENOMEM;
        } else {
            char *p = c->out.data;
            p = put(p, "HTTP/1.1 ", 9);
            p = put_u(p, (size_t)status);
            *p++ = ' ';
            p = put(p, text, tl);
            p = put(p, "\r\n", 2);
            if (sl) {
                p = put(p, "Server: ", 8);
                p = put(p, s->server_header, sl);
                p = put(p, "\r\n", 2);
            }
            if (ctl) {
                p = put(p, "Content-Type: ", 14);
                p = put(p, content_type, ctl);
                p = put(p, "\r\n", 2);
            }
            if (!no_length) {
                p = put(p, "Content-Length: ", 16);
                p = put_u(p, body_len);
                p = put(p, "\r\n", 2);
            }
            if (close)
                p = put(p, "Connection: close\r\n", 19);
            else if (c->parser.http_major == 1 && c->parser.http_minor == 0)
                p = put(p, "Connection: keep-alive\r\n", 24);
            if (hl)
                p = put(p, headers, hl);
            p = put(p, "\r\n", 2);
            c->out.len = (size_t)(p - c->out.data);
            rc = http_conn_send(c, c->out.data, c->out.len, no_body ? NULL : body,
                                no_body ? 0 : body_len);
        }
    }
    http_conn_answered(c, status, close, rc < 0);
    return rc;
}
