/*
 * HTTP/1.1 server on libuv + llhttp (RFC 9112, RFC 9110). See cm/http.h for the model.
 *
 * How a connection works:
 * - Every read lands in one server-wide buffer (all connections share it: libuv calls alloc_cb
 *   and read_cb back to back on the loop thread), so an idle connection costs no read buffer.
 *   llhttp copies what it recognises (target, header names and values, body) into the
 *   connection's own reusable buffers, so requests never point into the shared buffer.
 * - llhttp is paused in on_message_complete; the request is then handed to the handler. Bytes
 *   after it (pipelining) are kept in `pending` until the handler responds and are parsed on a
 *   later loop turn (a zero-delay timer), never from inside cm_http_respond().
 * - llhttp 8.1.0 accepts obs-fold and a bare CR in chunk-size lines; both are request
 *   smuggling vectors, so every byte that is framing (not body) is checked here as well.
 * - One timer per connection serves the header timeout, the keep-alive idle timeout, the
 *   linger after a shutdown and the deferred parse. It is re-armed lazily (a deadline field),
 *   so the keep-alive hit path does not touch the timer heap per request.
 * - A connection is freed only when both its handles have closed and no request is with the
 *   handler; a peer that vanishes mid-request leaves the request valid until it is answered.
 */
#include "cm/http.h"

#include "cm/alloc.h"
#include "cm/buf.h"
#include "cm/log.h"

#include <cjson/cJSON.h>
#include <llhttp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <strings.h>
#include <uriparser/Uri.h>

#define READ_BUF_SIZE (64 * 1024)
/* Bytes kept for a connection whose handler is busy before reading stops (backpressure). */
#define PENDING_MAX (64 * 1024)
/* After our FIN, how long unread input is drained before the socket is closed: closing with
 * unread data makes the kernel send RST, which can destroy the response still in flight. */
#define LINGER_MS 2000
/* Unsent response bytes above which a connection stops reading requests: a client that
 * pipelines without reading must not grow our memory without bound. */
#define WRITE_QUEUE_MAX (1024 * 1024)
#define LISTEN_BACKLOG 1024

enum tmode { T_NONE = 0, T_HEADER, T_IDLE, T_LINGER, T_DEFER };
enum cstate { C_OPEN = 0, C_SHUTDOWN, C_CLOSING };

typedef struct hoff {
    uint32_t name, name_len, value, value_len;
} hoff_t;

struct cm_http_conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_shutdown_t shut;
    cm_http_server_t *srv;
    cm_http_conn_t *prev, *next;

    llhttp_t parser;
    cm_http_request_t req;

    cm_buf_t head; /* target and header strings, NUL-separated */
    cm_buf_t body;
    cm_buf_t pending; /* unparsed (or, raw: undelivered) bytes from ppos */
    size_t ppos;
    size_t feed_rest; /* while parsing: input bytes after the request being handled */
    cm_buf_t out;     /* response head under construction */

    hoff_t *hoff;
    cm_http_header_t *hdrs;
    size_t hcap, nh;
    uint32_t url_off;
    int hstate; /* 0 none, 1 in field, 2 in value */

    /* framing scanner (bare CR / obs-fold) and size accounting */
    const char *scan_pos;
    int scan_prev;
    size_t head_bytes, trailer_bytes;
    int headers_done, in_request, req_ready;
    int err_status;
    const char *err_code, *err_msg;

    /* timer */
    int tmode;
    uint64_t deadline, due;

    int state;
    int open_handles;
    int closed; /* both handles closed */
    int busy;   /* a request is with the handler */
    int in_feed;
    int reading, user_paused, peer_eof, write_blocked;
    int raw, raw_closed_cb_done;
    cm_http_raw_cbs_t raw_cbs;
    void *raw_ud;
    uint64_t msg_start_ns;
    char peer[64];
};

struct cm_http_server {
    uv_tcp_t listener;
    uv_timer_t stop_timer;
    uv_loop_t *loop;
    cm_http_config_t cfg;
    char *server_header;
    llhttp_settings_t settings;
    char *rbuf;
    cm_http_conn_t *conns;
    size_t nconns;
    int port;
    int stopping, open_handles, done_called, failed;
    void (*done)(void *ud);
    void *done_ud;
};

typedef struct wreq {
    uv_write_t req;
    cm_http_conn_t *conn;
    size_t len;
    char data[];
} wreq_t;

typedef struct reject {
    uv_tcp_t tcp;
    uv_shutdown_t shut;
} reject_t;

static const char EMPTY[] = "";

static void conn_close_now(cm_http_conn_t *c);
static void conn_shutdown(cm_http_conn_t *c);
static void conn_after_feed(cm_http_conn_t *c);
static void conn_fail(cm_http_conn_t *c, int status, const char *code, const char *msg);
static void server_check_done(cm_http_server_t *s);

/* ------------------------------------------------------------------------------------------ */
/* Status texts, config                                                                        */

const char *cm_http_status_text(int status)
{
    /* clang-format off */
    switch (status) {
    case 100: return "Continue";
    case 101: return "Switching Protocols";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 406: return "Not Acceptable";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 411: return "Length Required";
    case 412: return "Precondition Failed";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 415: return "Unsupported Media Type";
    case 417: return "Expectation Failed";
    case 422: return "Unprocessable Content";
    case 426: return "Upgrade Required";
    case 428: return "Precondition Required";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default: return "Unknown";
    }
    /* clang-format on */
}

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

/* ------------------------------------------------------------------------------------------ */
/* Timer                                                                                       */

static void on_timer(uv_timer_t *t);

/* Arms the connection timer for `mode` in `ms`. The uv timer is only restarted when the new
 * deadline is earlier than the one it is set for; a later deadline is picked up when it fires. */
static void timer_arm(cm_http_conn_t *c, int mode, uint64_t ms)
{
    if (c->state == C_CLOSING)
        return;
    uint64_t now = uv_now(c->srv->loop);
    c->tmode = mode;
    c->deadline = now + ms;
    if (!uv_is_active((uv_handle_t *)&c->timer) || c->due > c->deadline) {
        c->due = c->deadline;
        uv_timer_start(&c->timer, on_timer, ms, 0);
    }
}

static void timer_disarm(cm_http_conn_t *c)
{
    c->tmode = T_NONE;
}

/* ------------------------------------------------------------------------------------------ */
/* Writing                                                                                     */

static void on_write(uv_write_t *w, int status)
{
    wreq_t *r = (wreq_t *)w;
    cm_http_conn_t *c = r->conn;
    cm_free(r);
    if (status < 0 && status != UV_ECANCELED) {
        conn_close_now(c);
        return;
    }
    if (c->write_blocked && c->state == C_OPEN &&
        uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) < WRITE_QUEUE_MAX / 2) {
        c->write_blocked = 0;
        if (!c->in_feed && !c->busy)
            conn_after_feed(c);
    }
}

/* Writes a then b (either may be empty): uv_try_write first, the rest copied into one uv_write.
 * Returns 0 or a negative code (the caller closes the connection). */
static int conn_send(cm_http_conn_t *c, const char *a, size_t alen, const char *b, size_t blen)
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
/* Closing                                                                                     */

static void conn_free(cm_http_conn_t *c)
{
    cm_http_server_t *s = c->srv;
    if (c->prev)
        c->prev->next = c->next;
    else
        s->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    s->nconns--;
    cm_buf_free(&c->head);
    cm_buf_free(&c->body);
    cm_buf_free(&c->pending);
    cm_buf_free(&c->out);
    cm_free(c->hoff);
    cm_free(c->hdrs);
    cm_free(c);
    server_check_done(s);
}

/* Frees the connection once nothing refers to it any more. */
static void conn_maybe_free(cm_http_conn_t *c)
{
    if (c->closed && !c->busy)
        conn_free(c);
}

static void on_conn_close(uv_handle_t *h)
{
    cm_http_conn_t *c = h->data;
    if (--c->open_handles > 0)
        return;
    c->closed = 1;
    if (c->raw && c->raw_cbs.on_close && !c->raw_closed_cb_done) {
        c->raw_closed_cb_done = 1;
        c->raw_cbs.on_close(c, c->raw_ud);
    }
    conn_maybe_free(c);
}

static void conn_close_now(cm_http_conn_t *c)
{
    if (c->state == C_CLOSING)
        return;
    c->state = C_CLOSING;
    c->tmode = T_NONE;
    c->open_handles = 2;
    uv_close((uv_handle_t *)&c->tcp, on_conn_close);
    uv_close((uv_handle_t *)&c->timer, on_conn_close);
}

static void conn_read_start(cm_http_conn_t *c);

static void on_shutdown(uv_shutdown_t *r, int status)
{
    cm_http_conn_t *c = r->data;
    if (c->state == C_CLOSING)
        return;
    if (status < 0 || c->peer_eof) {
        conn_close_now(c);
        return;
    }
    /* Drain what the peer still sends until it closes too, or the linger time is over. */
    c->user_paused = 0;
    timer_arm(c, T_LINGER, LINGER_MS);
    conn_read_start(c);
}

/* Closes gracefully: queued writes are flushed, then FIN, then the socket closes. */
static void conn_shutdown(cm_http_conn_t *c)
{
    if (c->state != C_OPEN)
        return;
    c->state = C_SHUTDOWN;
    /* uv_shutdown waits for queued writes; a peer that never reads gets the idle timeout to
     * take them, then the socket is closed anyway. */
    timer_arm(c, T_LINGER, c->srv->cfg.idle_timeout_ms);
    c->shut.data = c;
    if (uv_shutdown(&c->shut, (uv_stream_t *)&c->tcp, on_shutdown) < 0)
        conn_close_now(c);
}

/* ------------------------------------------------------------------------------------------ */
/* Framing scanner                                                                             */

/*
 * Checks framing bytes (everything but body data): a CR must be followed by LF (a bare CR is
 * read differently by different parsers), and a line may not start with SP or HT (obs-fold,
 * RFC 9112 section 5.2: a server must reject it or replace it; we reject). Also counts head
 * bytes for max_header_bytes. Returns 0 or -1 with err_* set.
 */
static int scan_bytes(cm_http_conn_t *c, const char *p, const char *end)
{
    if (p >= end)
        return 0;
    size_t n = (size_t)(end - p);
    int prev = c->scan_prev;
    for (; p < end; p++) {
        unsigned char ch = (unsigned char)*p;
        if (prev == '\r' && ch != '\n')
            goto bad;
        if (prev == '\n' && (ch == ' ' || ch == '\t'))
            goto bad;
        prev = ch;
    }
    c->scan_prev = prev;
    const cm_http_config_t *cfg = &c->srv->cfg;
    if (!c->headers_done) {
        c->head_bytes += n;
        if (c->head_bytes > cfg->max_header_bytes) {
            c->err_status = 431;
            c->err_code = "headers_too_large";
            c->err_msg = "request head too large";
            return -1;
        }
    } else {
        c->trailer_bytes += n;
        if (c->trailer_bytes > cfg->max_header_bytes) {
            c->err_status = 431;
            c->err_code = "headers_too_large";
            c->err_msg = "chunk framing or trailers too large";
            return -1;
        }
    }
    return 0;
bad:
    c->err_status = 400;
    c->err_code = "bad_request";
    c->err_msg = "bare CR or obs-fold in request framing";
    return -1;
}

/* Scans the framing bytes between the previous span and `at`, then the span [at, at+len). */
static int scan_span(cm_http_conn_t *c, const char *at, size_t len, int is_body)
{
    if (scan_bytes(c, c->scan_pos, at) < 0)
        return -1;
    if (is_body) {
        c->scan_prev = 0;
    } else if (scan_bytes(c, at, at + len) < 0) {
        return -1;
    }
    c->scan_pos = at + len;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* llhttp callbacks                                                                            */

static int set_err(cm_http_conn_t *c, int status, const char *code, const char *msg)
{
    c->err_status = status;
    c->err_code = code;
    c->err_msg = msg;
    return -1;
}

static int head_append(cm_http_conn_t *c, const char *at, size_t len)
{
    if (cm_buf_append(&c->head, at, len) < 0)
        return set_err(c, 500, "internal_error", "out of memory");
    return 0;
}

static int on_message_begin(llhttp_t *p)
{
    cm_http_conn_t *c = p->data;
    cm_buf_reset(&c->head);
    cm_buf_reset(&c->body);
    c->nh = 0;
    c->hstate = 0;
    c->head_bytes = 0;
    c->trailer_bytes = 0;
    c->headers_done = 0;
    c->req_ready = 0;
    c->in_request = 1;
    c->url_off = 0;
    c->msg_start_ns = 0;
    return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t len)
{
    cm_http_conn_t *c = p->data;
    if (scan_span(c, at, len, 0) < 0)
        return -1;
    return head_append(c, at, len);
}

static int on_url_complete(llhttp_t *p)
{
    cm_http_conn_t *c = p->data;
    if (head_append(c, "", 1) < 0) /* the NUL after the target */
        return -1;
    return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t len)
{
    cm_http_conn_t *c = p->data;
    if (scan_span(c, at, len, 0) < 0)
        return -1;
    if (c->headers_done)
        return 0; /* trailer fields: checked and counted, not kept */
    if (c->hstate != 1) {
        const cm_http_config_t *cfg = &c->srv->cfg;
        if (c->nh >= cfg->max_headers)
            return set_err(c, 431, "headers_too_large", "too many header fields");
        if (c->nh == c->hcap) {
            size_t ncap = c->hcap ? c->hcap * 2 : 16;
            if (ncap > cfg->max_headers)
                ncap = cfg->max_headers;
            hoff_t *no = cm_realloc(c->hoff, ncap * sizeof *no);
            if (!no)
                return set_err(c, 500, "internal_error", "out of memory");
            c->hoff = no;
            cm_http_header_t *nhd = cm_realloc(c->hdrs, ncap * sizeof *nhd);
            if (!nhd)
                return set_err(c, 500, "internal_error", "out of memory");
            c->hdrs = nhd;
            c->hcap = ncap;
        }
        hoff_t *h = &c->hoff[c->nh++];
        h->name = (uint32_t)c->head.len;
        h->name_len = 0;
        h->value = 0;
        h->value_len = 0;
        c->hstate = 1;
    }
    c->hoff[c->nh - 1].name_len += (uint32_t)len;
    return head_append(c, at, len);
}

static int on_header_field_complete(llhttp_t *p)
{
    cm_http_conn_t *c = p->data;
    if (c->headers_done)
        return 0;
    if (head_append(c, "", 1) < 0)
        return -1;
    c->hoff[c->nh - 1].value = (uint32_t)c->head.len;
    c->hstate = 2;
    return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len)
{
    cm_http_conn_t *c = p->data;
    if (scan_span(c, at, len, 0) < 0)
        return -1;
    if (c->headers_done)
        return 0;
    c->hoff[c->nh - 1].value_len += (uint32_t)len;
    return head_append(c, at, len);
}

static int on_header_value_complete(llhttp_t *p)
{
    cm_http_conn_t *c = p->data;
    if (c->headers_done)
        return 0;
    hoff_t *h = &c->hoff[c->nh - 1];
    /* llhttp skips leading whitespace but keeps trailing whitespace (RFC 9110 section 5.5). */
    while (h->value_len > 0) {
        char ch = c->head.data[h->value + h->value_len - 1];
        if (ch != ' ' && ch != '\t')
            break;
        h->value_len--;
    }
    c->head.len = h->value + h->value_len;
    if (head_append(c, "", 1) < 0)
        return -1;
    c->hstate = 0;
    return 0;
}

static int on_headers_complete(llhttp_t *p)
{
    cm_http_conn_t *c = p->data;
    const cm_http_config_t *cfg = &c->srv->cfg;
    cm_http_request_t *r = &c->req;
    c->headers_done = 1;
    c->msg_start_ns = uv_hrtime();

    /* RFC 9112 section 6.1: Transfer-Encoding with Content-Length is a smuggling signal. */
    if ((p->flags & F_TRANSFER_ENCODING) && (p->flags & F_CONTENT_LENGTH))
        return set_err(c, 400, "bad_request", "Transfer-Encoding with Content-Length");
    if ((p->flags & F_CONTENT_LENGTH) && p->content_length > cfg->max_body_bytes)
        return set_err(c, 413, "payload_too_large", "request body too large");

    const char *base = c->head.data ? c->head.data : EMPTY;
    int hosts = 0, expect_continue = 0;
    for (size_t i = 0; i < c->nh; i++) {
        c->hdrs[i].name = base + c->hoff[i].name;
        c->hdrs[i].value = base + c->hoff[i].value;
        if (c->hoff[i].name_len == 4 && strcasecmp(c->hdrs[i].name, "host") == 0)
            hosts++;
        else if (c->hoff[i].name_len == 6 && strcasecmp(c->hdrs[i].name, "expect") == 0 &&
                 strcasecmp(c->hdrs[i].value, "100-continue") == 0)
            expect_continue = 1;
    }
    /* RFC 9112 section 3.2: exactly one Host in HTTP/1.1, at most one otherwise. */
    if (hosts > 1 || (hosts == 0 && p->http_major == 1 && p->http_minor >= 1))
        return set_err(c, 400, "bad_request", "missing or repeated Host header");

    r->conn = c;
    r->method = p->method;
    r->method_name = llhttp_method_name((llhttp_method_t)p->method);
    r->target = base + c->url_off;
    size_t tlen = strlen(r->target);
    const char *q = memchr(r->target, '?', tlen);
    const char *hash = memchr(r->target, '#', tlen);
    const char *pend = q ? q : (hash ? hash : r->target + tlen);
    r->path = r->target;
    r->path_len = (size_t)(pend - r->target);
    if (q) {
        r->query = q + 1;
        r->query_len = (size_t)((hash && hash > q ? hash : r->target + tlen) - r->query);
    } else {
        r->query = EMPTY;
        r->query_len = 0;
    }
    r->headers = c->hdrs;
    r->nheaders = c->nh;
    r->is_head = p->method == HTTP_HEAD;
    r->start_ns = c->msg_start_ns;
    c->req_ready = 1;

    if (expect_continue && p->http_major == 1 && p->http_minor >= 1 &&
        (p->flags & (F_CONTENT_LENGTH | F_CHUNKED)) && p->content_length > 0) {
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
        if (conn_send(c, cont, sizeof cont - 1, NULL, 0) < 0)
            return set_err(c, 500, "internal_error", "write failed");
    }
    return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t len)
{
    cm_http_conn_t *c = p->data;
    if (scan_span(c, at, len, 1) < 0)
        return -1;
    if (c->body.len + len > c->srv->cfg.max_body_bytes)
        return set_err(c, 413, "payload_too_large", "request body too large");
    if (cm_buf_append(&c->body, at, len) < 0)
        return set_err(c, 500, "internal_error", "out of memory");
    return 0;
}

static int on_message_complete(llhttp_t *p)
{
    cm_http_conn_t *c = p->data;
    cm_http_request_t *r = &c->req;
    r->body = c->body.data ? c->body.data : EMPTY;
    r->body_len = c->body.len;
    r->keep_alive = llhttp_should_keep_alive(p);
    c->in_request = 0;
    return HPE_PAUSED;
}

/* ------------------------------------------------------------------------------------------ */
/* Parsing loop                                                                                */

static void conn_dispatch(cm_http_conn_t *c)
{
    cm_http_server_t *s = c->srv;
    cm_http_request_t *r = &c->req;
    r->route = "unmatched";
    r->user = NULL;
    c->busy = 1;
    timer_disarm(c);
    s->cfg.handler(r, s->cfg.handler_ud);
}

/*
 * Parses `len` bytes and dispatches the complete requests in them until a handler keeps its
 * request, the connection turns raw, or it closes. Returns the number of bytes consumed.
 */
static size_t conn_feed(cm_http_conn_t *c, const char *data, size_t len)
{
    size_t off = 0;
    c->in_feed = 1;
    while (off < len && !c->busy && !c->raw && c->state == C_OPEN) {
        const char *start = data + off;
        c->scan_pos = start;
        c->err_status = 0;
        llhttp_errno_t e = llhttp_execute(&c->parser, start, len - off);
        if (e == HPE_OK) {
            if (scan_bytes(c, c->scan_pos, data + len) < 0) {
                conn_fail(c, c->err_status, c->err_code, c->err_msg);
                break;
            }
            off = len;
            break;
        }
        if (e == HPE_PAUSED) {
            const char *pos = llhttp_get_error_pos(&c->parser);
            llhttp_resume(&c->parser);
            off = (size_t)(pos - data);
            if (scan_bytes(c, c->scan_pos, pos) < 0) {
                conn_fail(c, c->err_status, c->err_code, c->err_msg);
                break;
            }
            c->feed_rest = len - off;
            conn_dispatch(c);
            continue;
        }
        if (c->err_status) {
            conn_fail(c, c->err_status, c->err_code, c->err_msg);
        } else {
            if (cm_log_enabled(CM_LOG_DEBUG))
                cm_log_debug("http: malformed request", "error", llhttp_errno_name(e), "reason",
                             c->parser.reason, "peer", cm_http_conn_peer(c), NULL);
            conn_fail(c, 400, "bad_request", "malformed request");
        }
        break;
    }
    c->in_feed = 0;
    return off;
}

static void conn_stash(cm_http_conn_t *c, const char *data, size_t len)
{
    if (len == 0)
        return;
    if (c->ppos > 0) {
        memmove(c->pending.data, c->pending.data + c->ppos, c->pending.len - c->ppos);
        c->pending.len -= c->ppos;
        c->ppos = 0;
    }
    if (cm_buf_append(&c->pending, data, len) < 0)
        conn_close_now(c);
}

static size_t pending_len(const cm_http_conn_t *c)
{
    return c->pending.len - c->ppos;
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)suggested;
    cm_http_conn_t *c = h->data;
    *buf = uv_buf_init(c->srv->rbuf, READ_BUF_SIZE);
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf);

static void conn_read_start(cm_http_conn_t *c)
{
    if (c->reading || c->state == C_CLOSING || c->peer_eof || c->user_paused)
        return;
    if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0)
        c->reading = 1;
}

static void conn_read_stop(cm_http_conn_t *c)
{
    if (!c->reading)
        return;
    uv_read_stop((uv_stream_t *)&c->tcp);
    c->reading = 0;
}

/* Decides what waits next once parsing stopped: the handler, more bytes, or nothing. */
static void conn_after_feed(cm_http_conn_t *c)
{
    if (c->state != C_OPEN)
        return;
    const cm_http_config_t *cfg = &c->srv->cfg;
    if (c->raw) {
        if (pending_len(c) && !c->user_paused)
            timer_arm(c, T_DEFER, 0);
        conn_read_start(c);
        return;
    }
    if (c->busy)
        return;
    if (pending_len(c)) {
        timer_arm(c, T_DEFER, 0);
        return;
    }
    if (c->peer_eof) {
        conn_shutdown(c);
        return;
    }
    if (c->in_request) {
        if (c->tmode != T_HEADER)
            timer_arm(c, T_HEADER, cfg->header_timeout_ms);
    } else {
        timer_arm(c, T_IDLE, cfg->idle_timeout_ms);
    }
    if (uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) > WRITE_QUEUE_MAX) {
        c->write_blocked = 1;
        conn_read_stop(c);
        return;
    }
    conn_read_start(c);
}

static void raw_deliver(cm_http_conn_t *c)
{
    size_t n = pending_len(c);
    if (!n || c->user_paused || c->state != C_OPEN)
        return;
    /* Move the bytes out first: on_read may write, pause or close. The shared read buffer is
     * free now (no read callback is running), so it holds the copy. */
    if (n > READ_BUF_SIZE)
        n = READ_BUF_SIZE;
    char *tmp = c->srv->rbuf;
    memcpy(tmp, c->pending.data + c->ppos, n);
    c->ppos += n;
    if (c->ppos == c->pending.len) {
        cm_buf_reset(&c->pending);
        c->ppos = 0;
    }
    c->raw_cbs.on_read(c, tmp, (ssize_t)n, c->raw_ud);
    if (pending_len(c) && c->state == C_OPEN && !c->user_paused)
        timer_arm(c, T_DEFER, 0);
}

static void on_timer(uv_timer_t *t)
{
    cm_http_conn_t *c = t->data;
    uint64_t now = uv_now(c->srv->loop);
    if (c->tmode == T_NONE || c->state == C_CLOSING)
        return;
    if (c->tmode != T_DEFER && now < c->deadline) {
        c->due = c->deadline;
        uv_timer_start(&c->timer, on_timer, c->deadline - now, 0);
        return;
    }
    int mode = c->tmode;
    c->tmode = T_NONE;
    switch (mode) {
    case T_DEFER:
        if (c->raw) {
            raw_deliver(c);
            return;
        }
        if (c->busy || c->state != C_OPEN)
            return;
        {
            size_t n = conn_feed(c, c->pending.data + c->ppos, pending_len(c));
            c->ppos += n;
            if (c->ppos == c->pending.len) {
                cm_buf_reset(&c->pending);
                c->ppos = 0;
            }
        }
        conn_after_feed(c);
        return;
    case T_HEADER:
        if (c->in_request && c->state == C_OPEN && !c->busy)
            conn_fail(c, 408, "request_timeout", "request not received in time");
        else
            conn_shutdown(c);
        return;
    case T_IDLE:
        conn_shutdown(c); /* flushes a response the peer is still reading */
        return;
    default:
        conn_close_now(c);
        return;
    }
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    cm_http_conn_t *c = st->data;
    if (nread == 0)
        return;
    if (nread < 0) {
        conn_read_stop(c);
        if (c->state != C_OPEN) {
            conn_close_now(c);
            return;
        }
        if (nread == UV_EOF)
            c->peer_eof = 1;
        if (c->raw) {
            c->raw_cbs.on_read(c, NULL, nread, c->raw_ud);
            conn_close_now(c);
            return;
        }
        /* A half-closed peer still gets the answers to what it sent (including a large one
         * still queued); a reset one gets none. */
        if (nread == UV_EOF && (c->busy || pending_len(c)))
            return;
        if (nread == UV_EOF)
            conn_shutdown(c);
        else
            conn_close_now(c);
        return;
    }
    if (c->state != C_OPEN)
        return; /* draining after our FIN */
    size_t n = (size_t)nread;
    if (c->raw) {
        if (pending_len(c) || c->user_paused) {
            conn_stash(c, buf->base, n);
            if (pending_len(c) > PENDING_MAX)
                conn_read_stop(c);
        } else {
            c->raw_cbs.on_read(c, buf->base, nread, c->raw_ud);
        }
        return;
    }
    if (c->busy || pending_len(c)) {
        conn_stash(c, buf->base, n);
        if (pending_len(c) > PENDING_MAX)
            conn_read_stop(c);
        return;
    }
    size_t used = conn_feed(c, buf->base, n);
    if (used < n && c->state == C_OPEN)
        conn_stash(c, buf->base + used, n - used);
    conn_after_feed(c);
}

/* ------------------------------------------------------------------------------------------ */
/* Responding                                                                                  */

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
static void conn_answered(cm_http_conn_t *c, int status, int close, int failed)
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
        conn_maybe_free(c);
        return;
    }
    if (failed) {
        conn_close_now(c);
        return;
    }
    if (close) {
        conn_shutdown(c);
        return;
    }
    if (!c->in_feed)
        conn_after_feed(c);
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
    size_t more = c->in_feed ? c->feed_rest : pending_len(c);
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
            rc = conn_send(c, c->out.data, c->out.len, no_body ? NULL : body,
                           no_body ? 0 : body_len);
        }
    }
    conn_answered(c, status, close, rc < 0);
    return rc;
}

int cm_http_respond_error(cm_http_request_t *req, int status, const char *code, const char *message,
                          const char *headers)
{
    char stack[512];
    char *text = NULL;
    int rc = UV_ENOMEM;
    cJSON *root = cJSON_CreateObject();
    cJSON *err = root ? cJSON_AddObjectToObject(root, "error") : NULL;
    if (err && cJSON_AddStringToObject(err, "code", code ? code : "error") &&
        cJSON_AddStringToObject(err, "message", message ? message : "")) {
        if (cJSON_PrintPreallocated(root, stack, (int)sizeof stack, 0))
            text = stack;
        else
            text = cJSON_PrintUnformatted(root);
    }
    cJSON_Delete(root);
    if (text) {
        rc = cm_http_respond(req, status, "application/json", headers, text, strlen(text));
        if (text != stack)
            cJSON_free(text);
        return rc;
    }
    /* Out of memory: still answer, so the request is not left hanging. */
    static const char fallback[] = "{\"error\":{\"code\":\"internal_error\",\"message\":\"\"}}";
    cm_http_respond(req, status, "application/json", headers, fallback, sizeof fallback - 1);
    return rc;
}

/* Answers an error the server found itself (bad framing, limits, timeout) and closes. */
static void conn_fail(cm_http_conn_t *c, int status, const char *code, const char *msg)
{
    cm_http_request_t *r = &c->req;
    if (!c->req_ready) {
        r->conn = c;
        r->method = c->parser.method;
        r->method_name = EMPTY;
        r->target = r->path = r->query = EMPTY;
        r->path_len = r->query_len = 0;
        r->headers = NULL;
        r->nheaders = 0;
        r->is_head = 0;
        r->start_ns = c->msg_start_ns;
    }
    r->body = EMPTY;
    r->body_len = 0;
    r->keep_alive = 0;
    r->route = "unmatched";
    r->user = NULL;
    c->busy = 1;
    c->in_request = 0;
    timer_disarm(c);
    cm_http_respond_error(r, status, code, msg, NULL);
}

/* ------------------------------------------------------------------------------------------ */
/* Query, headers                                                                              */

const char *cm_http_header(const cm_http_request_t *req, const char *name)
{
    for (size_t i = 0; i < req->nheaders; i++) {
        if (strcasecmp(req->headers[i].name, name) == 0)
            return req->headers[i].value;
    }
    return NULL;
}

static int hexval(char ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F')
        return ch - 'A' + 10;
    return -1;
}

/* A '%' must start a two-digit hex escape (RFC 3986 section 2.1). */
static int escapes_valid(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '%') {
            if (i + 2 >= n || hexval(p[i + 1]) < 0 || hexval(p[i + 2]) < 0)
                return 0;
            i += 2;
        }
    }
    return 1;
}

/* Copies [p, p+n) into dst (size dstsz), decodes it in place with uriparser ('+' as space).
 * Returns the decoded length or UV_E2BIG. */
static int decode_into(const char *p, size_t n, char *dst, size_t dstsz)
{
    if (n + 1 > dstsz) {
        /* Decoding never lengthens; a long raw value may still fit once decoded. */
        if (dstsz == 0)
            return UV_E2BIG;
        char tmp[1024];
        char *buf = n < sizeof tmp ? tmp : cm_malloc(n + 1);
        if (!buf)
            return UV_ENOMEM;
        memcpy(buf, p, n);
        buf[n] = '\0';
        const char *end = uriUnescapeInPlaceExA(buf, URI_TRUE, URI_BR_DONT_TOUCH);
        size_t dl = (size_t)(end - buf);
        int rc = UV_E2BIG;
        if (dl + 1 <= dstsz) {
            memcpy(dst, buf, dl + 1);
            rc = (int)dl;
        }
        if (buf != tmp)
            cm_free(buf);
        return rc;
    }
    memcpy(dst, p, n);
    dst[n] = '\0';
    const char *end = uriUnescapeInPlaceExA(dst, URI_TRUE, URI_BR_DONT_TOUCH);
    return (int)(end - dst);
}

int cm_http_query_param(const cm_http_request_t *req, const char *key, char *out, size_t outsz)
{
    size_t klen = strlen(key);
    const char *q = req->query;
    size_t n = req->query_len;
    size_t i = 0;
    char kbuf[256];
    if (!escapes_valid(q, n))
        return UV_EINVAL;
    while (i <= n) {
        const char *seg = q + i;
        const char *amp = memchr(seg, '&', n - i);
        size_t slen = amp ? (size_t)(amp - seg) : n - i;
        const char *eq = memchr(seg, '=', slen);
        size_t rk = eq ? (size_t)(eq - seg) : slen;
        if (slen > 0 && rk >= klen && rk <= 3 * klen) {
            int dk = decode_into(seg, rk, kbuf, sizeof kbuf);
            if (dk >= 0 && (size_t)dk == klen && memcmp(kbuf, key, klen) == 0) {
                if (!eq) {
                    if (outsz == 0)
                        return UV_E2BIG;
                    out[0] = '\0';
                    return 0;
                }
                int dl = decode_into(eq + 1, slen - rk - 1, out, outsz);
                /* %00 would cut the value short for every C string function after us. */
                if (dl > 0 && memchr(out, '\0', (size_t)dl))
                    return UV_EINVAL;
                return dl;
            }
        }
        if (!amp)
            break;
        i += slen + 1;
    }
    return UV_ENOENT;
}

/* ------------------------------------------------------------------------------------------ */
/* Upgrades and raw connections                                                                */

int cm_http_upgrade(cm_http_request_t *req, const void *response_head, size_t len,
                    const cm_http_raw_cbs_t *cbs, void *ud, cm_http_conn_t **out)
{
    cm_http_conn_t *c = req ? req->conn : NULL;
    if (!c || !c->busy || !cbs || !cbs->on_read)
        return UV_EINVAL;
    if (c->state != C_OPEN || c->peer_eof || c->srv->stopping) {
        conn_answered(c, 101, 1, 1);
        return UV_EPIPE;
    }
    int rc = conn_send(c, response_head, len, NULL, 0);
    if (rc < 0) {
        conn_answered(c, 101, 1, 1);
        return rc;
    }
    c->raw = 1;
    c->raw_cbs = *cbs;
    c->raw_ud = ud;
    timer_disarm(c);
    if (out)
        *out = c;
    conn_answered(c, 101, 0, 0);
    return 0;
}

int cm_http_conn_write(cm_http_conn_t *c, const void *data, size_t len)
{
    if (c->state != C_OPEN)
        return UV_EPIPE;
    int rc = conn_send(c, data, len, NULL, 0);
    if (rc < 0)
        conn_close_now(c);
    return rc;
}

size_t cm_http_conn_write_queue_size(const cm_http_conn_t *c)
{
    return uv_stream_get_write_queue_size((const uv_stream_t *)&c->tcp);
}

void cm_http_conn_read_pause(cm_http_conn_t *c, int paused)
{
    if (paused) {
        c->user_paused = 1;
        conn_read_stop(c);
        return;
    }
    if (!c->user_paused)
        return;
    c->user_paused = 0;
    if (c->state != C_OPEN)
        return;
    if (c->raw && pending_len(c))
        timer_arm(c, T_DEFER, 0);
    if (pending_len(c) <= PENDING_MAX)
        conn_read_start(c);
}

void cm_http_conn_close(cm_http_conn_t *c, int hard)
{
    if (hard)
        conn_close_now(c);
    else
        conn_shutdown(c);
}

const char *cm_http_conn_peer(const cm_http_conn_t *c)
{
    cm_http_conn_t *m = (cm_http_conn_t *)c;
    if (m->peer[0])
        return m->peer;
    struct sockaddr_storage ss;
    int len = (int)sizeof ss;
    char ip[INET6_ADDRSTRLEN] = "";
    if (m->state == C_CLOSING || uv_tcp_getpeername(&m->tcp, (struct sockaddr *)&ss, &len) != 0) {
        return "unknown";
    }
    if (ss.ss_family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        uv_ip6_name(a, ip, sizeof ip);
        snprintf(m->peer, sizeof m->peer, "[%s]:%u", ip, (unsigned)ntohs(a->sin6_port));
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        uv_ip4_name(a, ip, sizeof ip);
        snprintf(m->peer, sizeof m->peer, "%s:%u", ip, (unsigned)ntohs(a->sin_port));
    }
    return m->peer;
}

/* ------------------------------------------------------------------------------------------ */
/* Server                                                                                      */

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

/* Over the connection limit: a canned 503 if the socket takes it at once, then close. */
static void reject_connection(cm_http_server_t *s)
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
static void raise_fd_limit(size_t max_connections)
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

static void on_connection(uv_stream_t *l, int status)
{
    cm_http_server_t *s = l->data;
    if (status < 0) {
        cm_log_warn("http: accept failed", "error", uv_strerror(status), NULL);
        return;
    }
    if (s->stopping)
        return;
    if (s->nconns >= s->cfg.max_connections) {
        reject_connection(s);
        return;
    }
    cm_http_conn_t *c = cm_calloc(1, sizeof *c);
    if (!c) {
        reject_connection(s);
        return;
    }
    c->srv = s;
    if (uv_tcp_init(s->loop, &c->tcp) < 0) {
        cm_free(c);
        return;
    }
    uv_timer_init(s->loop, &c->timer);
    c->tcp.data = c;
    c->timer.data = c;
    c->next = s->conns;
    if (s->conns)
        s->conns->prev = c;
    s->conns = c;
    s->nconns++;
    llhttp_init(&c->parser, HTTP_REQUEST, &s->settings);
    c->parser.data = c;
    if (uv_accept(l, (uv_stream_t *)&c->tcp) < 0) {
        conn_close_now(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    /* A fresh connection must send its first request head within the header timeout. */
    timer_arm(c, T_HEADER, s->cfg.header_timeout_ms);
    conn_read_start(c);
    if (!c->reading)
        conn_close_now(c);
}

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

static void server_check_done(cm_http_server_t *s)
{
    if (!s->stopping || s->nconns > 0 || s->done_called)
        return;
    s->done_called = 1;
    uv_close((uv_handle_t *)&s->stop_timer, on_server_close);
}

static void on_stop_deadline(uv_timer_t *t)
{
    cm_http_server_t *s = t->data;
    for (cm_http_conn_t *c = s->conns; c; c = c->next)
        conn_close_now(c);
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
    raise_fd_limit(cfg->max_connections ? cfg->max_connections : 10000);
    struct sockaddr_storage addr;
    if (uv_ip4_addr(cfg->host, cfg->port, (struct sockaddr_in *)&addr) != 0 &&
        uv_ip6_addr(cfg->host, cfg->port, (struct sockaddr_in6 *)&addr) != 0) {
        /* A name ("localhost"): resolved once, synchronously, before the loop serves anyone. */
        uv_getaddrinfo_t gai;
        struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                                 .ai_flags = AI_PASSIVE};
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
    llhttp_settings_init(&s->settings);
    s->settings.on_message_begin = on_message_begin;
    s->settings.on_url = on_url;
    s->settings.on_url_complete = on_url_complete;
    s->settings.on_header_field = on_header_field;
    s->settings.on_header_field_complete = on_header_field_complete;
    s->settings.on_header_value = on_header_value;
    s->settings.on_header_value_complete = on_header_value_complete;
    s->settings.on_headers_complete = on_headers_complete;
    s->settings.on_body = on_body;
    s->settings.on_message_complete = on_message_complete;

    uv_tcp_init(loop, &s->listener);
    uv_timer_init(loop, &s->stop_timer);
    s->listener.data = s;
    s->stop_timer.data = s;
    s->open_handles = 2;
    int rc = uv_tcp_bind(&s->listener, (struct sockaddr *)&addr, 0);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&s->listener, LISTEN_BACKLOG, on_connection);
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
        if (!c->raw && !c->busy && !c->in_request && !pending_len(c))
            conn_shutdown(c);
    }
    server_check_done(s);
}
