/*
 * cm/ws sessions. See cm/ws.h for the model.
 *
 * Reading, per frame: header bytes collect in `hdr` until ws_parse_header() has a whole
 * header and accepts it; the order checks (a continuation needs a message, a new message
 * needs none in progress) and the size check follow; only then does wslay's frame layer get
 * the header, followed by at most this frame's payload bytes, so its buffer is empty whenever
 * a frame ends and its context can be freed between frames.
 */
#include "cm/ws.h"

#include "cm/alloc.h"
#include "cm/buf.h"
#include "ws_internal.h"

#include <string.h>
#include <uv.h>
#include <wslay/wslay.h>

/* An early message in `early`: its opcode (1 byte) and length (4, host order), then it. */
#define EARLY_REC 5

struct cm_ws {
    cm_http_conn_t *conn;
    cm_ws_callbacks_t cbs;
    void *ud;
    size_t max_message, queue_max, early_max;

    /* the frame being read */
    uint8_t hdr[WS_HDR_MAX];
    size_t hdr_have;
    ws_hdr_t fh;
    int in_frame;     /* header accepted: wslay is reading the payload */
    size_t hdr_fed;   /* header bytes handed to wslay */
    uint64_t pay_fed; /* payload bytes handed to wslay */
    uint64_t pay_got; /* payload bytes wslay gave back */
    wslay_frame_context_ptr rx;
    const uint8_t *in; /* input wslay may take now: this frame's bytes only */
    size_t in_len;

    uint8_t ctl[125]; /* control frame payload (§5.5: at most 125 bytes) */
    size_t ctl_len;
    int msg_op;        /* opcode of the message being reassembled; 0: none */
    uint64_t msg_size; /* its payload so far, counting the frame being read */
    cm_buf_t msg;
    ws_utf8_t utf8;

    cm_buf_t early;
    int started;
    int closing; /* a close is queued or the connection is going: input means nothing */
    uint16_t code_sent, code_received;
};

void cm_ws_config_defaults(cm_ws_config_t *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->max_message = 64 * 1024;
    cfg->send_queue_max = 1024 * 1024;
    cfg->early_max = 8 * 1024;
}

/* ---- writing -------------------------------------------------------------------------------- */

static int conn_sink(const uint8_t *data, size_t len, void *arg)
{
    cm_ws_t *ws = arg;
    return cm_http_conn_write(ws->conn, data, len);
}

/* Encodes a frame into the connection's queue (one copy). A failure leaves the connection
 * closing (cm_http closes it on UV_ENOMEM), so the session is too. */
static int queue_frame(cm_ws_t *ws, uint8_t opcode, const void *data, size_t len)
{
    int rc = ws_encode(opcode, data, len, conn_sink, ws);
    if (rc != 0 && rc != UV_EINVAL)
        ws->closing = 1;
    return rc;
}

/* The cap is on what was waiting before the frame just queued (`just` bytes): a peer behind
 * by more than the cap is slow, but one frame bigger than the cap (a big order event) still
 * goes to a peer that keeps up, rather than closing every client it is for, at every try. */
static int over_cap(const cm_ws_t *ws, size_t just)
{
    size_t queued = cm_http_conn_write_queue_size(ws->conn);
    return queued > just && queued - just > ws->queue_max;
}

/* Queues our close and closes the TCP connection once the queue is written: RFC 6455 §7.1.1
 * has the server close the connection first. */
static void send_close(cm_ws_t *ws, uint16_t code, const char *reason, size_t rlen)
{
    uint8_t body[125];
    size_t n = 0;
    if (code) {
        body[0] = (uint8_t)(code >> 8);
        body[1] = (uint8_t)code;
        if (rlen)
            memcpy(body + 2, reason, rlen);
        n = 2 + rlen;
    }
    ws->closing = 1;
    ws->code_sent = code;
    /* The close goes in even past the cap (a few bytes); if even that fails, drop the line. */
    if (ws_encode(CM_WS_OP_CLOSE, body, n, conn_sink, ws) != 0) {
        cm_http_conn_close(ws->conn, 1);
        return;
    }
    /* Input means nothing any more; a flooding peer should not keep us reading it. cm_http
     * drains it again once our FIN is out (its linger). */
    cm_http_conn_read_pause(ws->conn, 1);
    cm_http_conn_close(ws->conn, 0);
}

/* Fails the connection (RFC 6455 §7.1.7) with `code`. Returns -1 so callers can stop. */
static int fail(cm_ws_t *ws, uint16_t code)
{
    if (ws->closing)
        return -1;
    send_close(ws, code, NULL, 0);
    if (ws->cbs.on_closing)
        ws->cbs.on_closing(ws, code, ws->ud);
    return -1;
}

int cm_ws_send(cm_ws_t *ws, int opcode, const void *data, size_t len)
{
    if (opcode != CM_WS_OP_TEXT && opcode != CM_WS_OP_BINARY && opcode != CM_WS_OP_PING &&
        opcode != CM_WS_OP_PONG)
        return UV_EINVAL;
    if (opcode >= 8 && len > 125)
        return UV_EINVAL;
    if (ws->closing)
        return UV_EPIPE;
    int rc = queue_frame(ws, (uint8_t)opcode, data, len);
    if (rc != 0)
        return rc;
    return over_cap(ws, len + 14) ? UV_ENOBUFS : 0;
}

int cm_ws_send_text(cm_ws_t *ws, const char *data, size_t len)
{
    return cm_ws_send(ws, CM_WS_OP_TEXT, data, len);
}

static void frame_release(void *arg)
{
    cm_ws_frame_unref(arg);
}

int cm_ws_send_frame(cm_ws_t *ws, cm_ws_frame_t *f)
{
    if (ws->closing)
        return UV_EPIPE;
    cm_ws_frame_ref(f);
    int rc =
        cm_http_conn_write_ref(ws->conn, ws_frame_bytes(f), cm_ws_frame_size(f), frame_release, f);
    if (rc != 0) {
        cm_ws_frame_unref(f);
        ws->closing = 1;
        return rc;
    }
    return over_cap(ws, cm_ws_frame_size(f)) ? UV_ENOBUFS : 0;
}

int cm_ws_close(cm_ws_t *ws, uint16_t code, const char *reason)
{
    size_t rlen = reason ? strlen(reason) : 0;
    if ((code && !ws_close_code_valid(code)) || rlen > 123 || (rlen && !code))
        return UV_EINVAL;
    if (ws->closing)
        return 0;
    send_close(ws, code, reason, rlen);
    return 0;
}

void cm_ws_abort(cm_ws_t *ws)
{
    ws->closing = 1;
    cm_http_conn_close(ws->conn, 1);
}

/* ---- reading -------------------------------------------------------------------------------- */

/* Hands a complete message to the owner, or keeps it until cm_ws_start (and behind the kept
 * ones until they are out, so the order holds). Returns 0, or -1 to stop reading. */
static int deliver(cm_ws_t *ws, int opcode, const char *data, size_t len)
{
    if (!ws->started || ws->early.len) {
        if (ws->early.len + EARLY_REC + len > ws->early_max)
            return fail(ws, CM_WS_CLOSE_POLICY);
        uint8_t rec[EARLY_REC];
        uint32_t n = (uint32_t)len;
        rec[0] = (uint8_t)opcode;
        memcpy(rec + 1, &n, 4);
        if (cm_buf_append(&ws->early, rec, EARLY_REC) != 0 ||
            cm_buf_append(&ws->early, data, len) != 0)
            return fail(ws, CM_WS_CLOSE_INTERNAL);
        return 0;
    }
    ws->cbs.on_message(ws, opcode, data, len, ws->ud);
    return ws->closing ? -1 : 0;
}

static void deliver_early(cm_ws_t *ws)
{
    if (!ws->started)
        return;
    cm_buf_t e = ws->early;
    ws->early = (cm_buf_t)CM_BUF_INIT;
    size_t off = 0;
    while (off + EARLY_REC <= e.len && !ws->closing) {
        uint32_t n;
        memcpy(&n, e.data + off + 1, 4);
        ws->cbs.on_message(ws, (uint8_t)e.data[off], e.data + off + EARLY_REC, n, ws->ud);
        off += EARLY_REC + n;
    }
    cm_buf_free(&e);
}

static int message_end(cm_ws_t *ws, const char *data, size_t len)
{
    int op = ws->msg_op;
    ws->msg_op = 0;
    if (op == CM_WS_OP_TEXT && !ws_utf8_complete(&ws->utf8))
        return fail(ws, CM_WS_CLOSE_INVALID_DATA);
    int rc = deliver(ws, op, data, len);
    cm_buf_free(&ws->msg);
    return rc;
}

static int control_end(cm_ws_t *ws)
{
    switch (ws->fh.opcode) {
    case CM_WS_OP_PING: {
        /* A pong that would take the queue past its cap means a peer that makes us write
         * without reading: close (1013) rather than queue without bound. */
        size_t pong = ws_header_size(ws->ctl_len) + ws->ctl_len;
        if (cm_http_conn_write_queue_size(ws->conn) + pong > ws->queue_max)
            return fail(ws, CM_WS_CLOSE_TRY_AGAIN);
        return queue_frame(ws, CM_WS_OP_PONG, ws->ctl, ws->ctl_len) == 0 ? 0 : -1;
    }
    case CM_WS_OP_CLOSE: {
        uint16_t code = 0;
        if (ws->ctl_len == 1)
            return fail(ws, CM_WS_CLOSE_PROTOCOL); /* §5.5.1: a body starts with a code */
        if (ws->ctl_len >= 2) {
            code = (uint16_t)(ws->ctl[0] << 8 | ws->ctl[1]);
            if (!ws_close_code_valid(code))
                return fail(ws, CM_WS_CLOSE_PROTOCOL);
            ws_utf8_t u = {0};
            if (ws_utf8_feed(&u, ws->ctl + 2, ws->ctl_len - 2) != 0 || !ws_utf8_complete(&u))
                return fail(ws, CM_WS_CLOSE_INVALID_DATA);
        }
        ws->code_received = code ? code : CM_WS_CLOSE_NO_STATUS;
        /* §5.5.1: the reply typically echoes the code. */
        send_close(ws, code, NULL, 0);
        if (ws->cbs.on_closing)
            ws->cbs.on_closing(ws, code, ws->ud);
        return -1;
    }
    default: /* a pong: liveness only */
        return 0;
    }
}

/* A piece of the current frame's payload (unmasked by wslay); `last` when the frame ends with
 * it. Returns 0, or -1 to stop reading. */
static int frame_chunk(cm_ws_t *ws, const uint8_t *data, size_t len, int last)
{
    const ws_hdr_t *h = &ws->fh;
    if (h->opcode >= 8) {
        memcpy(ws->ctl + ws->ctl_len, data, len);
        ws->ctl_len += len;
        return last ? control_end(ws) : 0;
    }
    /* Checked as it arrives, so a bad byte fails the connection at once (fail fast). */
    if (ws->msg_op == CM_WS_OP_TEXT && ws_utf8_feed(&ws->utf8, data, len) != 0)
        return fail(ws, CM_WS_CLOSE_INVALID_DATA);
    int done = last && h->fin;
    /* A whole message in one piece goes out from wslay's buffer, uncopied. */
    if (done && ws->msg.len == 0 && len == ws->msg_size)
        return message_end(ws, (const char *)data, len);
    if (len && cm_buf_append(&ws->msg, data, len) != 0)
        return fail(ws, CM_WS_CLOSE_INTERNAL);
    return done ? message_end(ws, ws->msg.data, ws->msg.len) : 0;
}

static ssize_t rx_recv(uint8_t *buf, size_t len, int flags, void *user_data)
{
    (void)flags;
    cm_ws_t *ws = user_data;
    size_t n = 0;
    if (ws->hdr_fed < ws->fh.size) {
        n = ws->fh.size - ws->hdr_fed;
        if (n > len)
            n = len;
        memcpy(buf, ws->hdr + ws->hdr_fed, n);
        ws->hdr_fed += n;
    }
    size_t m = len - n < ws->in_len ? len - n : ws->in_len;
    if (m) {
        memcpy(buf + n, ws->in, m);
        ws->in += m;
        ws->in_len -= m;
        ws->pay_fed += m;
    }
    return (ssize_t)(n + m); /* 0: wslay answers WSLAY_ERR_WANT_READ */
}

/* The header in `hdr` was accepted by the pre-parser: checks what depends on the session's
 * state and gets wslay ready for the frame. Returns 0 or -1. */
static int frame_begin(cm_ws_t *ws)
{
    const ws_hdr_t *h = &ws->fh;
    ws->hdr_have = 0;
    if (h->opcode >= 8) {
        ws->ctl_len = 0;
    } else if (h->opcode == 0) {
        if (!ws->msg_op)
            return fail(ws, CM_WS_CLOSE_PROTOCOL); /* a continuation of nothing */
    } else {
        if (ws->msg_op)
            return fail(ws, CM_WS_CLOSE_PROTOCOL); /* §5.4: fragments may not interleave */
        ws->msg_op = h->opcode;
        ws->msg_size = 0;
        memset(&ws->utf8, 0, sizeof ws->utf8);
    }
    if (h->opcode < 8) {
        /* Refused from the header, before any of the payload is read or kept. */
        if (h->len > ws->max_message - ws->msg_size)
            return fail(ws, CM_WS_CLOSE_TOO_BIG);
        ws->msg_size += h->len;
    }
    if (!ws->rx) {
        struct wslay_frame_callbacks cbs = {NULL, rx_recv, NULL};
        if (wslay_frame_context_init(&ws->rx, &cbs, ws) != 0) {
            ws->rx = NULL;
            return fail(ws, CM_WS_CLOSE_INTERNAL);
        }
    }
    ws->in_frame = 1;
    ws->hdr_fed = 0;
    ws->pay_fed = 0;
    ws->pay_got = 0;
    return 0;
}

/* Lets wslay read the current frame from `p` (at most its remaining payload). Returns the
 * bytes used. */
static size_t pump(cm_ws_t *ws, const uint8_t *p, size_t n)
{
    uint64_t left = ws->fh.len - ws->pay_fed;
    ws->in = p;
    ws->in_len = n < left ? n : (size_t)left;
    size_t offered = ws->in_len;
    while (ws->in_frame && !ws->closing) {
        struct wslay_frame_iocb io;
        ssize_t r = wslay_frame_recv(ws->rx, &io);
        if (r == WSLAY_ERR_WANT_READ)
            break;
        if (r < 0) {
            fail(ws, CM_WS_CLOSE_PROTOCOL);
            break;
        }
        ws->pay_got += io.data_length;
        int last = ws->pay_got == ws->fh.len;
        if (last)
            ws->in_frame = 0;
        if (frame_chunk(ws, io.data, io.data_length, last) != 0)
            break;
    }
    size_t used = offered - ws->in_len;
    ws->in = NULL;
    ws->in_len = 0;
    return used;
}

static void feed(cm_ws_t *ws, const uint8_t *p, size_t n)
{
    while (n > 0 && !ws->closing) {
        if (!ws->in_frame) {
            ws_hdr_t *h = &ws->fh;
            int rc = ws_parse_header(ws->hdr, ws->hdr_have, h);
            /* Never past the header's end: payload bytes do not belong in `hdr`. */
            while (rc == WS_AGAIN && n > 0) {
                size_t take = h->size - ws->hdr_have;
                if (take > n)
                    take = n;
                memcpy(ws->hdr + ws->hdr_have, p, take);
                ws->hdr_have += take;
                p += take;
                n -= take;
                rc = ws_parse_header(ws->hdr, ws->hdr_have, h);
            }
            if (rc == WS_AGAIN)
                return;
            if (rc < 0) {
                fail(ws, CM_WS_CLOSE_PROTOCOL);
                return;
            }
            if (frame_begin(ws) != 0)
                return;
        }
        size_t used = pump(ws, p, n);
        p += used;
        n -= used;
    }
}

static void on_raw_read(cm_http_conn_t *c, const char *data, ssize_t n, void *ud)
{
    (void)c;
    cm_ws_t *ws = ud;
    if (n == 0) {
        if (!data)
            deliver_early(ws);
        return;
    }
    if (n < 0 || ws->closing)
        return; /* EOF or error: on_close follows */
    if (ws->cbs.on_activity) {
        ws->cbs.on_activity(ws, ws->ud);
        if (ws->closing)
            return;
    }
    feed(ws, (const uint8_t *)data, (size_t)n);
    /* Between frames wslay holds nothing, so an idle socket keeps no 4 KB context. */
    if (ws->rx && (!ws->in_frame || ws->closing)) {
        wslay_frame_context_free(ws->rx);
        ws->rx = NULL;
    }
}

static void on_raw_close(cm_http_conn_t *c, void *ud)
{
    (void)c;
    cm_ws_t *ws = ud;
    ws->closing = 1;
    ws->cbs.on_close(ws, ws->ud);
    if (ws->rx)
        wslay_frame_context_free(ws->rx);
    cm_buf_free(&ws->msg);
    cm_buf_free(&ws->early);
    ws_encoder_release();
    cm_free(ws);
}

/* ---- the session ---------------------------------------------------------------------------- */

int cm_ws_accept(cm_http_request_t *req, const cm_ws_config_t *cfg, const cm_ws_callbacks_t *cbs,
                 void *ud, cm_ws_t **out)
{
    static const cm_http_raw_cbs_t raw = {on_raw_read, on_raw_close};
    if (!cbs || !cbs->on_message || !cbs->on_close)
        return UV_EINVAL;
    cm_ws_config_t def;
    cm_ws_config_defaults(&def);
    if (!cfg)
        cfg = &def;
    const char *key = cm_http_header(req, "Sec-WebSocket-Key");
    char accept[CM_WS_ACCEPT_LEN];
    if (!key || cm_ws_accept_key(key, strlen(key), accept) != 0) {
        cm_http_respond_error(req, 400, "bad_request", "missing or invalid Sec-WebSocket-Key",
                              NULL);
        return UV_EINVAL;
    }
    cm_ws_t *ws = cm_calloc(1, sizeof *ws);
    cm_buf_t head = CM_BUF_INIT;
    if (!ws || cm_buf_printf(&head,
                             "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                             "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n%s\r\n",
                             accept, cfg->headers ? cfg->headers : "") != 0) {
        cm_free(ws);
        cm_buf_free(&head);
        cm_http_respond_error(req, 503, "out_of_memory", "out of memory", NULL);
        return UV_ENOMEM;
    }
    ws->cbs = *cbs;
    ws->ud = ud;
    ws->max_message = cfg->max_message ? cfg->max_message : def.max_message;
    ws->queue_max = cfg->send_queue_max ? cfg->send_queue_max : def.send_queue_max;
    ws->early_max = cfg->early_max ? cfg->early_max : def.early_max;
    int rc = cm_http_upgrade(req, head.data, head.len, &raw, ws, &ws->conn);
    cm_buf_free(&head);
    if (rc != 0) {
        cm_free(ws);
        return rc;
    }
    cm_http_conn_set_write_limit(ws->conn, ws->queue_max);
    ws_encoder_hold();
    *out = ws;
    return 0;
}

void cm_ws_start(cm_ws_t *ws)
{
    if (ws->started)
        return;
    ws->started = 1;
    if (ws->early.len && !ws->closing)
        cm_http_conn_wake(ws->conn);
}

size_t cm_ws_queued_bytes(const cm_ws_t *ws)
{
    return cm_http_conn_write_queue_size(ws->conn);
}

int cm_ws_closing(const cm_ws_t *ws)
{
    return ws->closing;
}

uint16_t cm_ws_close_code_sent(const cm_ws_t *ws)
{
    return ws->code_sent;
}

uint16_t cm_ws_close_code_received(const cm_ws_t *ws)
{
    return ws->code_received;
}

cm_http_conn_t *cm_ws_conn(const cm_ws_t *ws)
{
    return ws->conn;
}
