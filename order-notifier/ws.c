#include "ws.h"

#include "cm/alloc.h"

#include <openssl/evp.h>
#include <string.h>
#include <uv.h>
#include <wslay/wslay.h>

#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

struct on_ws {
    wslay_event_context_ptr ctx;
    on_ws_callbacks_t cbs;
    void *ud;
    const uint8_t *in; /* bytes being fed; valid only inside on_ws_feed */
    size_t in_len;
    int failed;
    int closing; /* we asked to close: later input is dropped */
    int in_recv; /* inside wslay_event_recv: queue only, on_ws_feed flushes afterwards */
};

int on_ws_accept_key(const char *key, size_t len, char out[ON_WS_ACCEPT_LEN])
{
    /* The key must be the base64 of 16 random bytes: 24 characters ending in "==". */
    unsigned char raw[24];
    if (len != 24 || key[22] != '=' || key[23] != '=')
        return UV_EINVAL;
    if (EVP_DecodeBlock(raw, (const unsigned char *)key, 24) != 18)
        return UV_EINVAL;
    char cat[24 + sizeof WS_GUID];
    memcpy(cat, key, 24);
    memcpy(cat + 24, WS_GUID, sizeof WS_GUID);
    unsigned char sha[EVP_MAX_MD_SIZE];
    unsigned int sha_len = 0;
    if (!EVP_Digest(cat, 24 + sizeof WS_GUID - 1, sha, &sha_len, EVP_sha1(), NULL) || sha_len != 20)
        return UV_EINVAL;
    if (EVP_EncodeBlock((unsigned char *)out, sha, 20) != ON_WS_ACCEPT_LEN - 1)
        return UV_EINVAL;
    return 0;
}

/* ---- wslay callbacks -------------------------------------------------------------------- */

static ssize_t recv_cb(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, int flags,
                       void *user_data)
{
    (void)flags;
    on_ws_t *ws = user_data;
    if (ws->in_len == 0) {
        wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
        return -1;
    }
    size_t n = len < ws->in_len ? len : ws->in_len;
    memcpy(buf, ws->in, n);
    ws->in += n;
    ws->in_len -= n;
    return (ssize_t)n;
}

/* The transport queues everything it is given, so a send never blocks here; backpressure is
 * measured by the owner from the transport's queue size. */
static ssize_t send_cb(wslay_event_context_ptr ctx, const uint8_t *data, size_t len, int flags,
                       void *user_data)
{
    (void)flags;
    on_ws_t *ws = user_data;
    if (ws->cbs.write(ws, data, len, ws->ud) != 0) {
        wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
        return -1;
    }
    return (ssize_t)len;
}

static void frame_start_cb(wslay_event_context_ptr ctx,
                           const struct wslay_event_on_frame_recv_start_arg *arg, void *user_data)
{
    (void)ctx;
    (void)arg;
    on_ws_t *ws = user_data;
    if (ws->cbs.on_activity && !ws->closing)
        ws->cbs.on_activity(ws, ws->ud);
}

static void msg_cb(wslay_event_context_ptr ctx, const struct wslay_event_on_msg_recv_arg *arg,
                   void *user_data)
{
    (void)ctx;
    on_ws_t *ws = user_data;
    if (ws->closing)
        return;
    if (arg->opcode == WSLAY_TEXT_FRAME && ws->cbs.on_text)
        ws->cbs.on_text(ws, (const char *)arg->msg, arg->msg_length, ws->ud);
    /* Binary messages are not part of the protocol and are ignored. */
}

/* ---- session ---------------------------------------------------------------------------- */

int on_ws_new(const on_ws_callbacks_t *cbs, void *ud, size_t max_msg, on_ws_t **out)
{
    on_ws_t *ws = cm_calloc(1, sizeof *ws);
    if (!ws)
        return UV_ENOMEM;
    ws->cbs = *cbs;
    ws->ud = ud;
    struct wslay_event_callbacks wcbs = {
        .recv_callback = recv_cb,
        .send_callback = send_cb,
        .on_frame_recv_start_callback = frame_start_cb,
        .on_msg_recv_callback = msg_cb,
    };
    if (wslay_event_context_server_init(&ws->ctx, &wcbs, ws) != 0) {
        cm_free(ws);
        return UV_ENOMEM;
    }
    /* Without this wslay would accept (and may allocate for) a 2 GiB message. */
    wslay_event_config_set_max_recv_msg_length(ws->ctx, max_msg);
    *out = ws;
    return 0;
}

void on_ws_free(on_ws_t *ws)
{
    if (!ws)
        return;
    wslay_event_context_free(ws->ctx);
    cm_free(ws);
}

/* Hands everything wslay has queued to the transport. */
static int flush(on_ws_t *ws)
{
    if (ws->failed)
        return UV_EPIPE;
    if (ws->in_recv)
        return 0; /* wslay is not re-entrant: on_ws_feed sends once the input is processed */
    if (wslay_event_want_write(ws->ctx) && wslay_event_send(ws->ctx) != 0) {
        ws->failed = 1;
        return UV_EPIPE;
    }
    return 0;
}

int on_ws_feed(on_ws_t *ws, const uint8_t *data, size_t len)
{
    if (ws->failed)
        return UV_EPIPE;
    if (!wslay_event_get_read_enabled(ws->ctx))
        return 0; /* after a close: further input means nothing (RFC 6455 §5.5.1) */
    ws->in = data;
    ws->in_len = len;
    ws->in_recv = 1;
    int rc = wslay_event_recv(ws->ctx);
    ws->in_recv = 0;
    ws->in = NULL;
    ws->in_len = 0;
    if (rc != 0) {
        /* Some violations (a reserved opcode, say) make wslay fail without queuing a close;
         * the peer still deserves 1002 (RFC 6455 §7.1.7) before the connection goes. */
        if (!wslay_event_get_close_sent(ws->ctx)) {
            (void)wslay_event_queue_close(ws->ctx, ON_WS_CLOSE_PROTOCOL, NULL, 0);
            (void)wslay_event_send(ws->ctx);
        }
        ws->failed = 1;
        return UV_EPROTO;
    }
    return flush(ws);
}

int on_ws_send_text(on_ws_t *ws, const char *data, size_t len)
{
    if (ws->failed || ws->closing || wslay_event_get_close_sent(ws->ctx))
        return UV_EPIPE;
    struct wslay_event_msg msg = {WSLAY_TEXT_FRAME, (const uint8_t *)data, len};
    int rc = wslay_event_queue_msg(ws->ctx, &msg);
    if (rc == WSLAY_ERR_NOMEM)
        return UV_ENOMEM;
    if (rc != 0)
        return UV_EPIPE;
    return flush(ws);
}

int on_ws_send_ping(on_ws_t *ws)
{
    if (ws->failed || wslay_event_get_close_sent(ws->ctx))
        return UV_EPIPE;
    struct wslay_event_msg msg = {WSLAY_PING, NULL, 0};
    if (wslay_event_queue_msg(ws->ctx, &msg) != 0)
        return UV_EPIPE;
    return flush(ws);
}

int on_ws_close(on_ws_t *ws, uint16_t code)
{
    if (ws->closing || ws->failed)
        return 0;
    ws->closing = 1;
    wslay_event_shutdown_read(ws->ctx);
    if (wslay_event_get_close_sent(ws->ctx))
        return 0;
    int rc = wslay_event_queue_close(ws->ctx, code, NULL, 0);
    if (rc != 0 && rc != WSLAY_ERR_NO_MORE_MSG)
        return UV_ENOMEM;
    return flush(ws);
}

int on_ws_finished(const on_ws_t *ws)
{
    if (ws->failed)
        return 1;
    /* wslay stops reading after a close in either direction and stops writing once its
     * close frame is out; when neither remains the connection can go. */
    return wslay_event_get_close_sent(ws->ctx) && !wslay_event_want_write(ws->ctx);
}

uint16_t on_ws_close_code_sent(const on_ws_t *ws)
{
    return wslay_event_get_status_code_sent(ws->ctx);
}

size_t on_ws_queued_bytes(const on_ws_t *ws)
{
    return wslay_event_get_queued_msg_length(ws->ctx);
}
