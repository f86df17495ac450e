/*
 * fuzz_ws: WebSocket sessions (common/src/ws.c over ws_frame.c's pre-parser and wslay). The
 * input is what a client sends after a fixed, valid handshake: frames, well-formed or not,
 * cut into reads at places chosen per input. The session echoes what it gets; a text message
 * "close" makes it close (1000), "abort" drop the connection, "ping" send a ping.
 *
 * Beyond the sanitizers, the messages the owner receives are compared with what an
 * independent RFC 6455 reading of the same bytes (ref_messages below) says they must be: the
 * same messages in the same order, none after the first protocol error, a message over
 * max_message, or a close. When the session ends for a reason that depends on timing (the
 * send queue cap, early messages past early_max before a deferred cm_ws_start) the received
 * ones must still be a prefix of that list.
 */
#include "fuzz.h"

#include "cm/alloc.h"
#include "cm/json.h"
#include "cm/utf8.h"
#include "cm/ws.h"
#include "ws_internal.h"

#include <string.h>

static const char handshake[] = "GET /ws HTTP/1.1\r\nHost: fuzz\r\nUpgrade: websocket\r\n"
                                "Connection: Upgrade\r\nSec-WebSocket-Key: "
                                "dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

static uv_loop_t loop;
static cm_http_server_t *srv;
static int port;
static long live_baseline;

/* ---- the reference reading -------------------------------------------------------------- */

#define MAX_MSGS 512

typedef struct msg {
    int opcode;
    size_t off, len; /* in the run's message bytes */
} msg_t;

typedef struct run {
    /* what the reference says */
    msg_t want[MAX_MSGS];
    size_t nwant;
    uint8_t *want_bytes;
    size_t want_len;
    /* what the session delivered */
    msg_t got[MAX_MSGS];
    size_t ngot;
    uint8_t *got_bytes;
    size_t got_len;
    size_t cap; /* of both byte buffers: the input's size */
    /* settings of this input */
    size_t max_message, queue_max, early_max;
    int deferred_start;
    /* the session */
    int sessions_open;
    int timing_close; /* ended in a way the reference does not model (1013, 1008, 1011) */
    int command_stop; /* a "close" or "abort" message was acted on */
    uv_timer_t start_timer;
    int start_timer_used;
    cm_ws_t *ws;
} run_t;

static run_t run;

static int text_valid(const uint8_t *p, size_t n)
{
    /* Code point by code point, the RFC 3629 way: an implementation apart from both
     * cm_utf8_valid and ws_utf8_feed. */
    size_t i = 0;
    while (i < n) {
        uint32_t c = p[i];
        size_t k;
        uint32_t min;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xe0) == 0xc0) {
            k = 1, min = 0x80, c &= 0x1f;
        } else if ((c & 0xf0) == 0xe0) {
            k = 2, min = 0x800, c &= 0x0f;
        } else if ((c & 0xf8) == 0xf0) {
            k = 3, min = 0x10000, c &= 0x07;
        } else {
            return 0;
        }
        if (n - i <= k)
            return 0; /* truncated */
        for (size_t j = 1; j <= k; j++) {
            if ((p[i + j] & 0xc0) != 0x80)
                return 0;
            c = c << 6 | (p[i + j] & 0x3f);
        }
        if (c < min || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff))
            return 0;
        i += k + 1;
    }
    return 1;
}

static void want_add(int opcode, const uint8_t *p, size_t n)
{
    if (run.nwant == MAX_MSGS)
        return;
    memcpy(run.want_bytes + run.want_len, p, n);
    run.want[run.nwant++] = (msg_t){opcode, run.want_len, n};
    run.want_len += n;
}

/* Reads the client's frames as RFC 6455 says and lists the messages an endpoint delivers
 * before it must fail the connection (or the peer closes, or a "close"/"abort" command). */
static void ref_messages(const uint8_t *d, size_t n)
{
    size_t pos = 0;
    int msg_op = 0;
    uint8_t *msg = malloc(n + 1);
    FUZZ_CHECK(msg);
    size_t msg_len = 0;
    uint64_t msg_size = 0;
    for (;;) {
        if (n - pos < 2)
            break;
        uint8_t b0 = d[pos], b1 = d[pos + 1];
        int fin = b0 >> 7, rsv = (b0 >> 4) & 7, op = b0 & 0xf;
        int control = op >= 8;
        if (rsv || (op > 2 && op < 8) || op > 10 || (control && !fin) || !(b1 & 0x80))
            break;
        uint64_t len = b1 & 0x7f;
        size_t hdr = 2;
        if (len == 126) {
            if (n - pos < 4)
                break;
            len = (uint64_t)d[pos + 2] << 8 | d[pos + 3];
            hdr = 4;
            if (len < 126)
                break;
        } else if (len == 127) {
            if (n - pos < 10)
                break;
            len = 0;
            for (int i = 0; i < 8; i++)
                len = len << 8 | d[pos + 2 + i];
            hdr = 10;
            if (len < 65536 || len >> 63)
                break;
        }
        if (control && len > 125)
            break;
        if (op == 0 && !msg_op)
            break;
        if ((op == 1 || op == 2) && msg_op)
            break;
        if (!control) {
            if (op)
                msg_size = 0;
            if (len > run.max_message - msg_size)
                break; /* 1009, decided from the header */
            msg_size += len;
        }
        if (n - pos - hdr < 4 || n - pos - hdr - 4 < len)
            break; /* not all here: nothing more is delivered */
        const uint8_t *key = d + pos + hdr;
        const uint8_t *pay = key + 4;
        uint8_t ctl[125];
        uint8_t *dst = control ? ctl : msg + msg_len;
        for (uint64_t i = 0; i < len; i++)
            dst[i] = pay[i] ^ key[i % 4];
        pos += hdr + 4 + (size_t)len;
        if (control) {
            if (op == CM_WS_OP_CLOSE)
                break; /* whatever its body, nothing is read after a close */
            continue;
        }
        if (op)
            msg_op = op;
        msg_len += (size_t)len;
        if (!fin)
            continue;
        if (msg_op == CM_WS_OP_TEXT && !text_valid(msg, msg_len))
            break; /* 1007 */
        want_add(msg_op, msg, msg_len);
        int stop = msg_op == CM_WS_OP_TEXT && ((msg_len == 5 && memcmp(msg, "close", 5) == 0) ||
                                               (msg_len == 5 && memcmp(msg, "abort", 5) == 0));
        msg_op = 0;
        msg_len = 0;
        if (stop)
            break;
    }
    free(msg);
}

/* ---- the session ------------------------------------------------------------------------ */

static void on_message(cm_ws_t *ws, int opcode, const char *data, size_t len, void *ud)
{
    (void)ud;
    FUZZ_CHECK(opcode == CM_WS_OP_TEXT || opcode == CM_WS_OP_BINARY);
    FUZZ_CHECK(len <= run.max_message);
    FUZZ_CHECK(!run.command_stop);
    if (opcode == CM_WS_OP_TEXT)
        FUZZ_CHECK(cm_utf8_valid(data, len));
    if (run.ngot < MAX_MSGS) {
        FUZZ_CHECK(len <= run.cap - run.got_len); /* never more than the client sent */
        memcpy(run.got_bytes + run.got_len, data, len);
        run.got[run.ngot++] = (msg_t){opcode, run.got_len, len};
        run.got_len += len;
    }
    if (opcode == CM_WS_OP_TEXT && len == 5 && memcmp(data, "close", 5) == 0) {
        run.command_stop = 1;
        FUZZ_CHECK(cm_ws_close(ws, CM_WS_CLOSE_NORMAL, "bye") == 0);
        FUZZ_CHECK(cm_ws_closing(ws));
        FUZZ_CHECK(cm_ws_send_text(ws, "x", 1) == UV_EPIPE);
        return;
    }
    if (opcode == CM_WS_OP_TEXT && len == 5 && memcmp(data, "abort", 5) == 0) {
        run.command_stop = 1;
        cm_ws_abort(ws);
        return;
    }
    if (opcode == CM_WS_OP_TEXT && len == 4 && memcmp(data, "ping", 4) == 0) {
        cm_ws_send(ws, CM_WS_OP_PING, "p", 1);
        return;
    }
    /* Echo: copied for binary, as a shared frame for text. */
    if (opcode == CM_WS_OP_BINARY) {
        int rc = cm_ws_send(ws, opcode, data, len);
        FUZZ_CHECK(rc == 0 || rc == UV_ENOBUFS || rc == UV_EPIPE || rc == UV_ENOMEM);
        return;
    }
    cm_ws_frame_t *f;
    if (cm_ws_frame_new(opcode, data, len, &f) == 0) {
        size_t plen;
        const char *p = cm_ws_frame_payload(f, &plen);
        FUZZ_CHECK(plen == len && memcmp(p, data, len) == 0);
        FUZZ_CHECK(cm_ws_frame_size(f) == ws_header_size(len) + len);
        int rc = cm_ws_send_frame(ws, f);
        FUZZ_CHECK(rc == 0 || rc == UV_ENOBUFS || rc == UV_EPIPE || rc == UV_ENOMEM);
        cm_ws_frame_unref(f);
    }
}

static void on_closing(cm_ws_t *ws, uint16_t code, void *ud)
{
    (void)ws;
    (void)ud;
    FUZZ_CHECK(code == 0 || ws_close_code_valid(code));
    if (code == CM_WS_CLOSE_TRY_AGAIN || code == CM_WS_CLOSE_POLICY || code == CM_WS_CLOSE_INTERNAL)
        run.timing_close = 1;
}

static void on_close(cm_ws_t *ws, void *ud)
{
    (void)ud;
    FUZZ_CHECK(ws == run.ws);
    run.sessions_open--;
    run.ws = NULL;
    if (run.start_timer_used && uv_is_active((uv_handle_t *)&run.start_timer))
        uv_timer_stop(&run.start_timer);
}

static void start_later(uv_timer_t *t)
{
    (void)t;
    if (run.ws)
        cm_ws_start(run.ws);
}

static void handler(cm_http_request_t *req, void *ud)
{
    (void)ud;
    cm_ws_refusal_t why;
    FUZZ_CHECK(cm_ws_handshake_check(req, NULL, NULL, &why) == 0);
    cm_ws_config_t cfg;
    cm_ws_config_defaults(&cfg);
    cfg.max_message = run.max_message;
    cfg.send_queue_max = run.queue_max;
    cfg.early_max = run.early_max;
    static const cm_ws_callbacks_t cbs = {on_message, NULL, on_closing, on_close};
    FUZZ_CHECK(run.ws == NULL);
    if (cm_ws_accept(req, &cfg, &cbs, NULL, &run.ws) != 0) {
        run.ws = NULL;
        return;
    }
    run.sessions_open++;
    if (!run.deferred_start) {
        cm_ws_start(run.ws);
        cm_ws_start(run.ws); /* a second call is a no-op */
    } else {
        uv_timer_start(&run.start_timer, start_later, 1, 0);
    }
}

/* ---- the target ------------------------------------------------------------------------- */

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    cm_json_init();
    fuzz_quiet_logs();
    FUZZ_CHECK(uv_loop_init(&loop) == 0);
    cm_http_config_t cfg;
    cm_http_config_defaults(&cfg);
    cfg.host = "127.0.0.1";
    cfg.port = 0;
    cfg.handler = handler;
    FUZZ_CHECK(cm_http_server_start(&loop, &cfg, &srv) == 0);
    port = cm_http_server_port(srv);
    uv_timer_init(&loop, &run.start_timer);
    uv_unref((uv_handle_t *)&run.start_timer);
    live_baseline = cm_alloc_live();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint64_t seed = fuzz_hash(data, size);
    run.nwant = run.ngot = 0;
    run.want_len = run.got_len = 0;
    run.want_bytes = malloc(size + 1);
    run.got_bytes = malloc(size + 1);
    run.cap = size;
    FUZZ_CHECK(run.want_bytes && run.got_bytes);
    /* Small limits for some inputs, so that 1009, 1008 and 1013 are within reach. */
    run.max_message = (seed >> 16) & 1 ? 64 * 1024 : 700;
    run.queue_max = (seed >> 17) & 1 ? 1024 * 1024 : 300;
    run.early_max = (seed >> 18) & 1 ? 8 * 1024 : 200;
    run.deferred_start = (seed >> 19) & 1;
    run.timing_close = 0;
    run.command_stop = 0;
    run.start_timer_used = run.deferred_start;
    ref_messages(data, size);

    fuzz_exchange(&loop, srv, port, handshake, sizeof handshake - 1, data, size, seed);
    FUZZ_CHECK(run.sessions_open == 0 && run.ws == NULL);

    /* What was delivered is what the reference read, or a prefix of it when the session ended
     * for a reason the reference does not model. */
    int prefix_only = run.timing_close || run.deferred_start;
    FUZZ_CHECK(run.ngot <= run.nwant);
    if (!prefix_only)
        FUZZ_CHECK(run.ngot == run.nwant);
    for (size_t i = 0; i < run.ngot; i++) {
        FUZZ_CHECK(run.got[i].opcode == run.want[i].opcode);
        FUZZ_CHECK(run.got[i].len == run.want[i].len);
        FUZZ_CHECK(memcmp(run.got_bytes + run.got[i].off, run.want_bytes + run.want[i].off,
                          run.got[i].len) == 0);
    }
    free(run.want_bytes);
    free(run.got_bytes);
    FUZZ_CHECK(cm_alloc_live() == live_baseline);
    return 0;
}
