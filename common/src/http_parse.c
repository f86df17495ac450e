/*
 * cm/http: llhttp glue. The callbacks copy the request into the connection's buffers; the
 * framing guards check what llhttp 8.1.0 lets through (bare CR, obs-fold, whitespace in field
 * names) and count head bytes; the head checks (version, framing headers, Host, target) refuse
 * what RFC 9112 says to refuse before the request reaches the handler.
 */
#include "http_internal.h"

#include "cm/alloc.h"
#include "cm/log.h"

#include <string.h>
#include <strings.h>

/* ------------------------------------------------------------------------------------------ */
/* Framing guards                                                                              */

/* What a span llhttp reports is: checked framing, skipped body, or a field name. */
enum span { SPAN_FRAMING, SPAN_BODY, SPAN_NAME };

/*
 * Checks framing bytes (everything but body data): a CR must be followed by LF (a bare CR is
 * read differently by different parsers), and a line may not start with SP or HT (obs-fold,
 * RFC 9112 section 5.2: a server must reject it or replace it; we reject). In a field name
 * (`name`) SP and HT are refused anywhere: RFC 9112 section 5.1 forbids whitespace in the name
 * and between it and the colon (a server must answer 400: parsers disagree about the name),
 * and llhttp 8.1.0 hands both over as part of the name. Also counts head bytes for
 * max_header_bytes. Returns 0 or -1 with err_* set.
 */
static int scan_bytes(cm_http_conn_t *c, const char *p, const char *end, int name)
{
    if (p >= end)
        return 0;
    size_t n = (size_t)(end - p);
    int prev = c->scan_prev;
    /* llhttp 8 skips the two bytes after a chunk's data whatever they are ("helloXX0"): a
     * proxy that reads them differently frames another request there (RFC 9112 section 7.1:
     * chunk-data CRLF). */
    while (c->crlf_due && p < end) {
        if (*p != (c->crlf_due == 2 ? '\r' : '\n')) {
            c->err_status = 400;
            c->err_code = "bad_request";
            c->err_msg = "chunk data not followed by CRLF";
            return -1;
        }
        prev = *p++;
        c->crlf_due--;
    }
    if (name) {
        /* The same pass as the framing check (names are on every request's hot path); SP/HT
         * anywhere covers obs-fold. */
        for (; p < end; p++) {
            unsigned char ch = (unsigned char)*p;
            if (ch == ' ' || ch == '\t') {
                c->err_status = 400;
                c->err_code = "bad_request";
                c->err_msg = "whitespace in a header field name";
                return -1;
            }
            if (prev == '\r' && ch != '\n')
                goto bad;
            prev = ch;
        }
    } else {
        for (; p < end; p++) {
            unsigned char ch = (unsigned char)*p;
            if (prev == '\r' && ch != '\n')
                goto bad;
            if (prev == '\n' && (ch == ' ' || ch == '\t'))
                goto bad;
            prev = ch;
        }
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
static int scan_span(cm_http_conn_t *c, const char *at, size_t len, enum span kind)
{
    if (scan_bytes(c, c->scan_pos, at, 0) < 0)
        return -1;
    if (kind == SPAN_BODY) {
        c->scan_prev = 0;
    } else if (scan_bytes(c, at, at + len, kind == SPAN_NAME) < 0) {
        return -1;
    }
    c->scan_pos = at + len;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* llhttp callbacks                                                                            */

/* Fields that hold one value, so two lines of one are two answers to one question, and which
 * line wins depends on who reads (a proxy may check one, we the other): refused. RFC 9110
 * section 5.3 (a sender generates a non-list field once), section 11.6.2 (Authorization),
 * RFC 6454 section 7.3 (Origin), RFC 6455 section 11.3.1 and 11.3.5 (Sec-WebSocket-Key and,
 * in a request, -Version), and Last-Event-ID (one id). Host is counted on its own: it must
 * also be there. */
static const struct {
    const char *name;
    size_t len;
    const char *repeated;
} http_singletons[] = {
    {"authorization", 13, "repeated Authorization header"},
    {"origin", 6, "repeated Origin header"},
    {"last-event-id", 13, "repeated Last-Event-ID header"},
    {"sec-websocket-key", 17, "repeated Sec-WebSocket-Key header"},
    {"sec-websocket-version", 21, "repeated Sec-WebSocket-Version header"},
};

/* The index of `name` in http_singletons, or -1. */
static int http_singleton(const char *name, size_t len)
{
    for (size_t k = 0; k < sizeof http_singletons / sizeof *http_singletons; k++) {
        if (len == http_singletons[k].len && strcasecmp(name, http_singletons[k].name) == 0)
            return (int)k;
    }
    return -1;
}

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
    c->crlf_due = 0;
    c->head_bytes = 0;
    c->trailer_bytes = 0;
    c->headers_done = 0;
    c->req_ready = 0;
    c->in_request = 1;
    c->url_off = c->url_len = 0;
    c->has_version = 0;
    c->msg_start_ns = 0;
    return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t len)
{
    cm_http_conn_t *c = p->data;
    if (scan_span(c, at, len, SPAN_FRAMING) < 0)
        return -1;
    return head_append(c, at, len);
}

static int on_url_complete(llhttp_t *p)
{
    cm_http_conn_t *c = p->data;
    c->url_len = (uint32_t)(c->head.len - c->url_off);
    if (head_append(c, "", 1) < 0) /* the NUL after the target */
        return -1;
    return 0;
}

/* llhttp reports the version only when the request line has one: "GET /" (HTTP/0.9 style)
 * reaches on_headers_complete as version 0.9 without it. */
static int on_version(llhttp_t *p, const char *at, size_t len)
{
    (void)at;
    (void)len;
    cm_http_conn_t *c = p->data;
    c->has_version = 1;
    return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t len)
{
    cm_http_conn_t *c = p->data;
    if (scan_span(c, at, len, SPAN_NAME) < 0) /* trailer fields too */
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
    /* llhttp 8 takes `: value` as a field with an empty name, and then no name bytes came;
     * RFC 9110 section 5.1 makes a name a token (one character at least). */
    if (c->hstate != 1 || c->hoff[c->nh - 1].name_len == 0)
        return set_err(c, 400, "bad_request", "empty header field name");
    if (head_append(c, "", 1) < 0)
        return -1;
    c->hoff[c->nh - 1].value = (uint32_t)c->head.len;
    c->hstate = 2;
    return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len)
{
    cm_http_conn_t *c = p->data;
    if (scan_span(c, at, len, SPAN_FRAMING) < 0)
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

/* http_host_valid, remembered per connection: clients send the same Host on every request. */
static int host_ok(cm_http_conn_t *c, const char *v, size_t len)
{
    if (len == c->host_memo_len && len > 0 && memcmp(v, c->host_memo, len) == 0)
        return 1;
    if (!http_host_valid(v, len))
        return 0;
    if (len <= HOST_MEMO_MAX) {
        memcpy(c->host_memo, v, len);
        c->host_memo_len = len;
    }
    return 1;
}

static int on_headers_complete(llhttp_t *p)
{
    cm_http_conn_t *c = p->data;
    const cm_http_config_t *cfg = &c->srv->cfg;
    cm_http_request_t *r = &c->req;
    c->headers_done = 1;
    c->msg_start_ns = uv_hrtime();

    /* RFC 9112 section 3: the request line ends with the HTTP version; an HTTP/0.9-style line
     * ("GET /") has none and is not served. */
    if (!c->has_version)
        return set_err(c, 400, "bad_request", "request line without an HTTP version");
    /* RFC 9110 section 15.6.6: 505 for a major version we do not speak (llhttp 8.1.0 accepts
     * 0.9 and 2.0 here). */
    if (p->http_major != 1)
        return set_err(c, 505, "unsupported_http_version", "only HTTP/1.x is served");
    /* RFC 9112 section 6.1: Transfer-Encoding in HTTP/1.0 means the framing is faulty (an
     * HTTP/1.0 recipient would read the body by Content-Length or to the close). */
    if ((p->flags & F_TRANSFER_ENCODING) && p->http_minor == 0)
        return set_err(c, 400, "bad_request", "Transfer-Encoding in an HTTP/1.0 request");
    /* RFC 9112 section 6.1: Transfer-Encoding with Content-Length is a smuggling signal. */
    if ((p->flags & F_TRANSFER_ENCODING) && (p->flags & F_CONTENT_LENGTH))
        return set_err(c, 400, "bad_request", "Transfer-Encoding with Content-Length");
    if ((p->flags & F_CONTENT_LENGTH) && p->content_length > cfg->max_body_bytes)
        return set_err(c, 413, "payload_too_large", "request body too large");

    /* An absolute-form target's authority becomes the Host value, copied after the other
     * strings; the room is made first so that the pointers taken below stay valid. */
    if (c->head.data && c->head.data[c->url_off] != '/' &&
        cm_buf_reserve(&c->head, c->url_len + 1) < 0)
        return set_err(c, 500, "internal_error", "out of memory");
    const char *base = c->head.data ? c->head.data : http_empty;
    int hosts = 0, expect_continue = 0;
    size_t host_i = 0;
    unsigned seen = 0;
    for (size_t i = 0; i < c->nh; i++) {
        c->hdrs[i].name = base + c->hoff[i].name;
        c->hdrs[i].value = base + c->hoff[i].value;
        if (c->hoff[i].name_len == 4 && strcasecmp(c->hdrs[i].name, "host") == 0) {
            hosts++;
            host_i = i;
        } else if (c->hoff[i].name_len == 6 && strcasecmp(c->hdrs[i].name, "expect") == 0 &&
                   strcasecmp(c->hdrs[i].value, "100-continue") == 0)
            expect_continue = 1;
        int k = http_singleton(c->hdrs[i].name, c->hoff[i].name_len);
        if (k >= 0) {
            if (seen & (1u << k))
                return set_err(c, 400, "bad_request", http_singletons[k].repeated);
            seen |= 1u << k;
        }
    }
    /* RFC 9112 section 3.2: exactly one Host in HTTP/1.1, at most one otherwise. */
    if (hosts > 1 || (hosts == 0 && p->http_major == 1 && p->http_minor >= 1))
        return set_err(c, 400, "bad_request", "missing or repeated Host header");

    r->conn = c;
    r->method = p->method;
    r->method_name = llhttp_method_name((llhttp_method_t)p->method);
    r->target = base + c->url_off;
    const char *auth;
    size_t auth_len;
    if (http_target_split(r, c->url_len, &auth, &auth_len) < 0)
        return set_err(c, 400, "bad_request", "invalid request-target");
    if (auth) {
        /* RFC 9112 section 3.2.2: the Host field is ignored for the target's authority. */
        if (hosts) {
            size_t off = c->head.len;
            if (head_append(c, auth, auth_len) < 0 || head_append(c, "", 1) < 0)
                return -1;
            c->hdrs[host_i].value = c->head.data + off;
        }
    } else if (hosts && !host_ok(c, c->hdrs[host_i].value, c->hoff[host_i].value_len)) {
        /* RFC 9112 section 3.2: 400 for a Host field with an invalid value. */
        return set_err(c, 400, "bad_request", "invalid Host header");
    }
    r->headers = c->hdrs;
    r->nheaders = c->nh;
    r->http_major = p->http_major;
    r->http_minor = p->http_minor;
    r->is_head = p->method == HTTP_HEAD;
    r->start_ns = c->msg_start_ns;
    c->req_ready = 1;

    if (expect_continue && p->http_major == 1 && p->http_minor >= 1 &&
        (p->flags & (F_CONTENT_LENGTH | F_CHUNKED)) && p->content_length > 0) {
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
        if (http_conn_send(c, cont, sizeof cont - 1, NULL, 0) < 0)
            return set_err(c, 500, "internal_error", "write failed");
    }
    return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t len)
{
    cm_http_conn_t *c = p->data;
    if (scan_span(c, at, len, SPAN_BODY) < 0)
        return -1;
    if ((p->flags & F_CHUNKED) && p->content_length == 0)
        c->crlf_due = 2; /* this chunk's data is complete */
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
    r->body = c->body.data ? c->body.data : http_empty;
    r->body_len = c->body.len;
    r->keep_alive = llhttp_should_keep_alive(p);
    c->in_request = 0;
    return HPE_PAUSED;
}

void http_parser_settings(llhttp_settings_t *s)
{
    llhttp_settings_init(s);
    s->on_message_begin = on_message_begin;
    s->on_url = on_url;
    s->on_url_complete = on_url_complete;
    s->on_version = on_version;
    s->on_header_field = on_header_field;
    s->on_header_field_complete = on_header_field_complete;
    s->on_header_value = on_header_value;
    s->on_header_value_complete = on_header_value_complete;
    s->on_headers_complete = on_headers_complete;
    s->on_body = on_body;
    s->on_message_complete = on_message_complete;
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
    http_timer_disarm(c);
    s->cfg.handler(r, s->cfg.handler_ud);
}

size_t http_conn_feed(cm_http_conn_t *c, const char *data, size_t len)
{
    size_t off = 0;
    c->in_feed = 1;
    while (off < len && !c->busy && !c->raw && c->state == C_OPEN) {
        const char *start = data + off;
        c->scan_pos = start;
        c->err_status = 0;
        llhttp_errno_t e = llhttp_execute(&c->parser, start, len - off);
        if (e == HPE_OK) {
            if (scan_bytes(c, c->scan_pos, data + len, 0) < 0) {
                http_conn_fail(c, c->err_status, c->err_code, c->err_msg);
                break;
            }
            off = len;
            break;
        }
        if (e == HPE_PAUSED) {
            const char *pos = llhttp_get_error_pos(&c->parser);
            llhttp_resume(&c->parser);
            off = (size_t)(pos - data);
            if (scan_bytes(c, c->scan_pos, pos, 0) < 0) {
                http_conn_fail(c, c->err_status, c->err_code, c->err_msg);
                break;
            }
            c->feed_rest = len - off;
            conn_dispatch(c);
            /* The write-queue limit holds per response, not per read: one read can carry
             * hundreds of small requests for big answers. The rest waits in `pending` until
             * the queue drains. */
            if (!c->busy && !c->raw && c->state == C_OPEN && http_write_limit_hit(c))
                break;
            continue;
        }
        if (c->err_status) {
            http_conn_fail(c, c->err_status, c->err_code, c->err_msg);
        } else {
            if (cm_log_enabled(CM_LOG_DEBUG))
                cm_log_debug("http: malformed request", "error", llhttp_errno_name(e), "reason",
                             c->parser.reason, "peer", cm_http_conn_peer(c), NULL);
            http_conn_fail(c, 400, "bad_request", "malformed request");
        }
        break;
    }
    c->in_feed = 0;
    return off;
}
