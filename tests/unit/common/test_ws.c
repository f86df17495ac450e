/*
 * cm/ws tests. The pure parts (accept key, header pre-parser, UTF-8, close codes, handshake
 * checks, shared frames) are called directly. Sessions run on a real cm_http server on
 * 127.0.0.1 port 0 in the test's loop while a client thread speaks raw RFC 6455 over blocking
 * sockets (masked frames built here, receive timeout 2 s) and records what came back; the main
 * thread asserts after joining it. Every session scenario ends with the server stopped, every
 * handle closed, uv_loop_close() == 0 and no cm_malloc block left.
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <llhttp.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "cm/alloc.h"
#include "cm/http.h"
#include "cm/json.h"
#include "cm/ws.h"
#include "ws_internal.h"

/* ---- accept key ----------------------------------------------------------------------------- */

static void accept_key_rfc_vector(void **state)
{
    (void)state;
    char out[CM_WS_ACCEPT_LEN];
    /* RFC 6455 §1.3 */
    assert_int_equal(cm_ws_accept_key("dGhlIHNhbXBsZSBub25jZQ==", 24, out), 0);
    assert_string_equal(out, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    assert_int_equal(cm_ws_accept_key("x3JJHMbDL1EzLkh9GBhXDw==", 24, out), 0);
    assert_string_equal(out, "HSmrc0sMlYUkAGmm5OPpG2HaGWk=");
}

static void accept_key_invalid(void **state)
{
    (void)state;
    char out[CM_WS_ACCEPT_LEN];
    assert_int_equal(cm_ws_accept_key("", 0, out), UV_EINVAL);
    assert_int_equal(cm_ws_accept_key("dGhlIHNhbXBsZSBub25jZQ", 22, out), UV_EINVAL);
    assert_int_equal(cm_ws_accept_key("dGhlIHNhbXBsZSBub25jZQ==x", 25, out), UV_EINVAL);
    assert_int_equal(cm_ws_accept_key("dGhlIHNhbXBsZSBub25j!!==", 24, out), UV_EINVAL);
    assert_int_equal(cm_ws_accept_key("dGhlIHNhbXBsZSBub25jZQ=A", 24, out), UV_EINVAL);
}

/* ---- header pre-parser ---------------------------------------------------------------------- */

/* A client frame: `b0` is the first byte (FIN, RSV, opcode), masked unless `unmasked`; the
 * 16- and 64-bit length forms are used as `len` needs unless `wide` forces 64 bits. */
static size_t frame_ex(uint8_t *buf, uint8_t b0, const void *payload, size_t len, int unmasked,
                       int wide)
{
    static const uint8_t key[4] = {0x11, 0x22, 0x33, 0x44};
    size_t n = 0;
    buf[n++] = b0;
    uint8_t m = unmasked ? 0 : 0x80;
    if (len < 126 && !wide) {
        buf[n++] = (uint8_t)(m | len);
    } else if (len < 65536 && !wide) {
        buf[n++] = m | 126;
        buf[n++] = (uint8_t)(len >> 8);
        buf[n++] = (uint8_t)len;
    } else {
        buf[n++] = m | 127;
        for (int i = 7; i >= 0; i--)
            buf[n++] = (uint8_t)((uint64_t)len >> (8 * i));
    }
    if (!unmasked) {
        memcpy(buf + n, key, 4);
        n += 4;
    }
    for (size_t i = 0; i < len; i++)
        buf[n + i] = ((const uint8_t *)payload)[i] ^ (unmasked ? 0 : key[i % 4]);
    return n + len;
}

static size_t frame(uint8_t *buf, int fin, int opcode, const void *payload, size_t len)
{
    return frame_ex(buf, (uint8_t)((fin ? 0x80 : 0) | opcode), payload, len, 0, 0);
}

static void header_incremental(void **state)
{
    (void)state;
    uint8_t buf[400], big[300];
    memset(big, 'a', sizeof big);
    size_t n = frame(buf, 1, 1, big, 300); /* 2 + 2 + 4 header bytes */
    ws_hdr_t h;
    for (size_t have = 0; have < 8; have++) {
        assert_int_equal(ws_parse_header(buf, have, &h), WS_AGAIN);
        assert_true(h.size > have);
    }
    assert_int_equal(ws_parse_header(buf, 8, &h), 0);
    assert_int_equal(h.size, 8);
    assert_int_equal(h.len, 300);
    assert_int_equal(h.opcode, 1);
    assert_true(h.fin && h.masked);
    assert_int_equal(n, 308);

    n = frame(buf, 0, 0, "", 0);
    assert_int_equal(ws_parse_header(buf, n, &h), 0);
    assert_int_equal(h.size, 6);
    assert_int_equal(h.len, 0);
    assert_false(h.fin);

    n = frame_ex(buf, 0x82, big, 0, 0, 1);                    /* 64-bit form, length 0 */
    assert_int_equal(ws_parse_header(buf, n, &h), UV_EPROTO); /* not the shortest form */
}

static void header_rejections(void **state)
{
    (void)state;
    uint8_t buf[300], p[200];
    memset(p, 'x', sizeof p);
    ws_hdr_t h;
    /* Decided on the first byte: RSV bits, reserved opcodes, a fragmented control frame. */
    buf[0] = 0xc1; /* FIN + RSV1 + text */
    assert_int_equal(ws_parse_header(buf, 1, &h), UV_EPROTO);
    for (int op = 3; op <= 0xf; op++) {
        if (op >= 8 && op <= 0xa)
            continue;
        buf[0] = (uint8_t)(0x80 | op);
        assert_int_equal(ws_parse_header(buf, 1, &h), UV_EPROTO);
    }
    buf[0] = 0x09; /* ping without FIN */
    assert_int_equal(ws_parse_header(buf, 1, &h), UV_EPROTO);
    /* On the second: no mask, a control payload over 125. */
    size_t n = frame_ex(buf, 0x81, "hi", 2, 1, 0);
    assert_int_equal(ws_parse_header(buf, n, &h), UV_EPROTO);
    n = frame(buf, 1, 9, p, 126);
    assert_int_equal(ws_parse_header(buf, 2, &h), UV_EPROTO);
    /* Lengths not in their shortest form, or with the 64-bit form's top bit. */
    n = frame_ex(buf, 0x81, p, 100, 0, 1);
    assert_int_equal(ws_parse_header(buf, n, &h), UV_EPROTO);
    uint8_t h16[] = {0x81, 0xfe, 0x00, 0x7d, 1, 2, 3, 4};
    assert_int_equal(ws_parse_header(h16, sizeof h16, &h), UV_EPROTO);
    uint8_t h64[] = {0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4};
    assert_int_equal(ws_parse_header(h64, sizeof h64, &h), UV_EPROTO);
    /* A 125-byte ping and a 126-byte text frame are fine. */
    n = frame(buf, 1, 9, p, 125);
    assert_int_equal(ws_parse_header(buf, n, &h), 0);
    n = frame(buf, 1, 1, p, 126);
    assert_int_equal(ws_parse_header(buf, n, &h), 0);
}

/* ---- UTF-8 and close codes ------------------------------------------------------------------ */

static int utf8_ok(const char *s, size_t n)
{
    ws_utf8_t u = {0};
    return ws_utf8_feed(&u, (const uint8_t *)s, n) == 0 && ws_utf8_complete(&u);
}

static void utf8_validation(void **state)
{
    (void)state;
    assert_true(utf8_ok("hello", 5));
    assert_true(utf8_ok("\xc2\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 \xf4\x8f\xbf\xbf", 16));
    assert_true(utf8_ok("\xed\x9f\xbf", 3));      /* U+D7FF */
    assert_false(utf8_ok("a\xc3\x28z", 4));       /* bad continuation */
    assert_false(utf8_ok("\xc0\xaf", 2));         /* overlong */
    assert_false(utf8_ok("\xe0\x80\xaf", 3));     /* overlong */
    assert_false(utf8_ok("\xed\xa0\x80", 3));     /* surrogate */
    assert_false(utf8_ok("\xf4\x90\x80\x80", 4)); /* past U+10FFFF */
    assert_false(utf8_ok("\xf5\x80\x80\x80", 4));
    assert_false(utf8_ok("\xe2\x82", 2)); /* cut short */
    assert_false(utf8_ok("\x80", 1));
    /* Across fragments, byte by byte. */
    const char *s = "\xf0\x9f\x98\x80";
    ws_utf8_t u = {0};
    for (int i = 0; i < 4; i++) {
        assert_int_equal(ws_utf8_feed(&u, (const uint8_t *)s + i, 1), 0);
        assert_int_equal(ws_utf8_complete(&u), i == 3);
    }
}

static void close_codes(void **state)
{
    (void)state;
    unsigned ok[] = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010,
                     1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999};
    unsigned bad[] = {0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535};
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++)
        assert_true(ws_close_code_valid(ok[i]));
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_false(ws_close_code_valid(bad[i]));
}

/* ---- handshake checks ----------------------------------------------------------------------- */

static int origin_hook(const char *origin, void *ud)
{
    (*(int *)ud)++;
    return origin && strcmp(origin, "https://ok.example") == 0;
}

static int check(int method, int minor, const char *upgrade, const char *version, const char *key,
                 const char *origin, cm_ws_refusal_t *why)
{
    cm_http_header_t h[6];
    size_t n = 0;
    h[n++] = (cm_http_header_t){"Host", "x"};
    if (upgrade) {
        h[n++] = (cm_http_header_t){"Upgrade", upgrade};
        h[n++] = (cm_http_header_t){"Connection", "keep-alive, Upgrade"};
    }
    if (version)
        h[n++] = (cm_http_header_t){"Sec-WebSocket-Version", version};
    if (key)
        h[n++] = (cm_http_header_t){"Sec-WebSocket-Key", key};
    if (origin)
        h[n++] = (cm_http_header_t){"Origin", origin};
    cm_http_request_t r;
    memset(&r, 0, sizeof r);
    r.method = method;
    r.http_major = 1;
    r.http_minor = minor;
    r.headers = h;
    r.nheaders = n;
    int calls = 0;
    memset(why, 0, sizeof *why);
    return cm_ws_handshake_check(&r, origin_hook, &calls, why);
}

static void handshake_checks(void **state)
{
    (void)state;
    const char *key = "dGhlIHNhbXBsZSBub25jZQ==", *ok = "https://ok.example";
    cm_ws_refusal_t w;
    assert_int_equal(check(HTTP_GET, 1, "websocket", "13", key, ok, &w), 0);
    assert_int_equal(check(HTTP_GET, 1, "WebSocket", "13", key, ok, &w), 0);

    assert_int_equal(check(HTTP_HEAD, 1, "websocket", "13", key, ok, &w), UV_EPROTO);
    assert_int_equal(w.status, 405);
    assert_string_equal(w.code, "method_not_allowed");
    assert_string_equal(w.headers, "Allow: GET\r\n");
    assert_int_equal(check(HTTP_POST, 1, "websocket", "13", key, ok, &w), UV_EPROTO);
    assert_int_equal(w.status, 405);

    assert_int_equal(check(HTTP_GET, 0, "websocket", "13", key, ok, &w), UV_EPROTO);
    assert_int_equal(w.status, 400);
    assert_string_equal(w.code, "unsupported_http_version");

    assert_int_equal(check(HTTP_GET, 1, NULL, "13", key, ok, &w), UV_EPROTO);
    assert_int_equal(w.status, 426);
    assert_string_equal(w.code, "upgrade_required");
    assert_non_null(strstr(w.headers, "Upgrade: websocket\r\n"));
    assert_int_equal(check(HTTP_GET, 1, "h2c", "13", key, ok, &w), UV_EPROTO);
    assert_int_equal(w.status, 426);

    assert_int_equal(check(HTTP_GET, 1, "websocket", "8", key, ok, &w), UV_EPROTO);
    assert_int_equal(w.status, 426);
    assert_string_equal(w.code, "unsupported_version");
    assert_non_null(strstr(w.headers, "Sec-WebSocket-Version: 13\r\n"));
    assert_int_equal(check(HTTP_GET, 1, "websocket", NULL, key, ok, &w), UV_EPROTO);
    assert_string_equal(w.code, "unsupported_version");

    assert_int_equal(check(HTTP_GET, 1, "websocket", "13", NULL, ok, &w), UV_EPROTO);
    assert_int_equal(w.status, 400);
    assert_string_equal(w.code, "bad_request");
    assert_int_equal(check(HTTP_GET, 1, "websocket", "13", "c2hvcnQ=", ok, &w), UV_EPROTO);
    assert_int_equal(w.status, 400);

    assert_int_equal(check(HTTP_GET, 1, "websocket", "13", key, "https://evil.example", &w),
                     UV_EPROTO);
    assert_int_equal(w.status, 403);
    assert_string_equal(w.code, "origin_not_allowed");
    assert_int_equal(check(HTTP_GET, 1, "websocket", "13", key, NULL, &w), UV_EPROTO);
    assert_int_equal(w.status, 403);

    /* A list field may come as several lines (RFC 9110 section 5.3). */
    cm_http_header_t h[] = {{"Host", "x"},
                            {"Upgrade", "websocket"},
                            {"Connection", "keep-alive"},
                            {"connection", "Upgrade"},
                            {"Sec-WebSocket-Version", "13"},
                            {"Sec-WebSocket-Key", key}};
    cm_http_request_t r;
    memset(&r, 0, sizeof r);
    r.method = HTTP_GET;
    r.http_major = r.http_minor = 1;
    r.headers = h;
    r.nheaders = sizeof h / sizeof *h;
    assert_int_equal(cm_ws_handshake_check(&r, NULL, NULL, &w), 0);
    r.nheaders = 3; /* no line says Upgrade */
    assert_int_equal(cm_ws_handshake_check(&r, NULL, NULL, &w), UV_EPROTO);
    assert_int_equal(w.status, 426);
}

/* ---- shared frames -------------------------------------------------------------------------- */

static void frame_encoding(void **state)
{
    (void)state;
    static uint8_t p[70000];
    memset(p, 'z', sizeof p);
    size_t lens[] = {0, 125, 126, 65535, 65536, 70000};
    size_t hdrs[] = {2, 2, 4, 4, 10, 10};
    for (size_t i = 0; i < 6; i++) {
        cm_ws_frame_t *f = NULL;
        assert_int_equal(cm_ws_frame_new(CM_WS_OP_BINARY, p, lens[i], &f), 0);
        assert_int_equal(cm_ws_frame_size(f), hdrs[i] + lens[i]);
        const uint8_t *b = ws_frame_bytes(f);
        assert_int_equal(b[0], 0x82);
        assert_int_equal(b[1] & 0x80, 0); /* servers do not mask */
        size_t len = 0;
        const char *pl = cm_ws_frame_payload(f, &len);
        assert_int_equal(len, lens[i]);
        assert_ptr_equal(pl, (const char *)b + hdrs[i]);
        cm_ws_frame_unref(f);
    }
    cm_ws_frame_t *f = NULL;
    assert_int_equal(cm_ws_frame_new(CM_WS_OP_PING, p, 126, &f), UV_EINVAL);
    assert_int_equal(cm_ws_frame_new(3, p, 1, &f), UV_EINVAL);
    assert_int_equal(cm_ws_frame_new(CM_WS_OP_TEXT, "hi", 2, &f), 0);
    assert_memory_equal(ws_frame_bytes(f), "\x81\x02hi", 4);
    assert_ptr_equal(cm_ws_frame_ref(f), f);
    cm_ws_frame_unref(f);
    cm_ws_frame_unref(f);
    cm_ws_frame_unref(NULL);
    assert_int_equal(cm_alloc_live(), 0);
}

/* ---- sessions: the server side (loop thread) ------------------------------------------------- */

#define MAX_SESSIONS 8
#define MAX_MSGS 16

typedef struct srv {
    uv_loop_t loop;
    cm_http_server_t *http;
    uv_async_t done_async;
    uv_timer_t start_timer;
    cm_ws_config_t cfg;
    int start_delay_ms; /* < 0: cm_ws_start in the handler */
    cm_ws_t *live[MAX_SESSIONS];
    cm_ws_frame_t *shared;
    /* records, read after the client thread is joined */
    int accepted, closes, started;
    int nmsgs;
    char msg[MAX_MSGS][256];
    int msg_before_start;
    int closing_codes[MAX_SESSIONS], nclosing; /* the first codes, and how many */
    int enobufs, fill_frames;
    size_t queued_at_after; /* queue size when "after" arrived */
} srv_t;

static void track(srv_t *s, cm_ws_t *ws, int add)
{
    for (int i = 0; i < MAX_SESSIONS; i++) {
        if (add ? s->live[i] == NULL : s->live[i] == ws) {
            s->live[i] = add ? ws : NULL;
            return;
        }
    }
}

static void s_on_message(cm_ws_t *ws, int opcode, const char *data, size_t len, void *ud)
{
    srv_t *s = ud;
    if (!s->started)
        s->msg_before_start = 1;
    if (s->nmsgs < MAX_MSGS) {
        snprintf(s->msg[s->nmsgs], sizeof s->msg[0], "%d:%.*s", opcode,
                 (int)(len < 200 ? len : 200), data);
        s->nmsgs++;
    }
    if (len == 4 && memcmp(data, "fill", 4) == 0) {
        /* Sends until the cap says stop, and does not close: reading must pause instead. */
        static char chunk[32768];
        memset(chunk, 'f', sizeof chunk);
        for (int i = 0; i < 4000; i++) {
            s->fill_frames++;
            int rc = cm_ws_send_text(ws, chunk, sizeof chunk);
            if (rc == UV_ENOBUFS) {
                s->enobufs++;
                break;
            }
            assert_int_equal(rc, 0);
        }
    } else if (len == 5 && memcmp(data, "after", 5) == 0) {
        s->queued_at_after = cm_ws_queued_bytes(ws);
        assert_int_equal(cm_ws_send_text(ws, "ack", 3), 0);
    } else if (len == 6 && memcmp(data, "shared", 6) == 0) {
        assert_int_equal(cm_ws_send_frame(ws, s->shared), 0);
    } else if (len == 8 && memcmp(data, "close-me", 8) == 0) {
        assert_int_equal(cm_ws_close(ws, CM_WS_CLOSE_GOING_AWAY, "bye"), 0);
        assert_int_equal(cm_ws_send_text(ws, "x", 1), UV_EPIPE);
        assert_int_equal(cm_ws_close(ws, CM_WS_CLOSE_NORMAL, NULL), 0); /* no-op */
    } else if (len >= 5 && memcmp(data, "echo:", 5) == 0) {
        assert_int_equal(cm_ws_send(ws, opcode, data + 5, len - 5), 0);
    }
}

static void s_on_closing(cm_ws_t *ws, uint16_t code, void *ud)
{
    (void)ws;
    srv_t *s = ud;
    if (s->nclosing < MAX_SESSIONS)
        s->closing_codes[s->nclosing] = code;
    s->nclosing++;
}

static void s_on_close(cm_ws_t *ws, void *ud)
{
    srv_t *s = ud;
    s->closes++;
    track(s, ws, 0);
}

static const cm_ws_callbacks_t s_cbs = {s_on_message, NULL, s_on_closing, s_on_close};

static void on_start_timer(uv_timer_t *t)
{
    srv_t *s = t->data;
    s->started = 1;
    for (int i = 0; i < MAX_SESSIONS; i++)
        if (s->live[i])
            cm_ws_start(s->live[i]);
}

static void handler(cm_http_request_t *req, void *ud)
{
    srv_t *s = ud;
    cm_ws_refusal_t why;
    if (cm_ws_handshake_check(req, NULL, NULL, &why) != 0) {
        cm_ws_refuse(req, &why);
        return;
    }
    cm_ws_t *ws = NULL;
    if (cm_ws_accept(req, &s->cfg, &s_cbs, s, &ws) != 0)
        return;
    s->accepted++;
    track(s, ws, 1);
    if (s->start_delay_ms < 0) {
        s->started = 1;
        cm_ws_start(ws);
    } else if (!uv_is_active((uv_handle_t *)&s->start_timer)) {
        uv_timer_start(&s->start_timer, on_start_timer, (uint64_t)s->start_delay_ms, 0);
    }
}

static void on_stopped(void *ud)
{
    ((srv_t *)ud)->http = NULL;
}

static void on_done(uv_async_t *a)
{
    srv_t *s = a->data;
    for (int i = 0; i < MAX_SESSIONS; i++)
        if (s->live[i])
            cm_ws_abort(s->live[i]);
    cm_http_server_stop(s->http, 1000, on_stopped, s);
    uv_close((uv_handle_t *)&s->done_async, NULL);
    uv_close((uv_handle_t *)&s->start_timer, NULL);
}

/* ---- sessions: the client side (client thread) ----------------------------------------------- */

typedef struct client client_t;
typedef void (*client_fn)(client_t *cl);

struct client {
    int port;
    client_fn fn;
    srv_t *srv; /* only for done_async */
    int val[32];
    size_t sent, got;
    char text[64];
};

static int cli_connect(int port, int rcvbuf)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (rcvbuf > 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct timeval tv = {2, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static size_t cli_send(int fd, const void *p, size_t n)
{
    const char *c = p;
    size_t done = 0;
    while (done < n) {
        ssize_t w = send(fd, c + done, n - done, MSG_NOSIGNAL);
        if (w <= 0)
            break;
        done += (size_t)w;
    }
    return done;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static int upgrade_request(char *out, size_t outsz, const char *key)
{
    return snprintf(out, outsz,
                    "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: %s\r\n\r\n",
                    key);
}

/* Reads the response head byte by byte (never eating a frame). Returns its status or -1. */
static int cli_read_head(int fd, char *head, size_t cap)
{
    size_t len = 0;
    while (len + 1 < cap) {
        if (recv(fd, head + len, 1, 0) != 1)
            return -1;
        len++;
        head[len] = '\0';
        if (len >= 4 && memcmp(head + len - 4, "\r\n\r\n", 4) == 0)
            return atoi(head + 9);
    }
    return -1;
}

/* Upgrades, sending `extra` in the same send() as the request's end when given. Returns 1 when
 * the server answered 101 with the right Sec-WebSocket-Accept. */
static int cli_upgrade_with(int fd, const void *extra, size_t elen)
{
    const char *key = "dGhlIHNhbXBsZSBub25jZQ==";
    char req[512 + 256], head[1024];
    int n = upgrade_request(req, 512, key);
    memcpy(req + n, extra, elen);
    cli_send(fd, req, (size_t)n + elen);
    if (cli_read_head(fd, head, sizeof head) != 101)
        return 0;
    return strstr(head, "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n") != NULL;
}

static int cli_open(int port, int rcvbuf)
{
    int fd = cli_connect(port, rcvbuf);
    if (fd >= 0 && !cli_upgrade_with(fd, "", 0)) {
        close(fd);
        return -1;
    }
    return fd;
}

typedef struct rframe {
    int op;
    size_t len;
    char data[128]; /* the first 128 bytes */
} rframe_t;

typedef struct reader {
    uint8_t buf[1 << 16];
    size_t have;
    int eof;     /* the server closed the connection */
    int stalled; /* nothing for the receive timeout, or an error */
} reader_t;

/* Reads server frames: the complete ones buffered (up to `max`), waiting for more only while
 * there are none; returns how many (0 at EOF or a stall). Payloads longer than 128 bytes are
 * skipped over, their length kept. */
static int cli_some(int fd, rframe_t *out, int max, reader_t *r)
{
    int n = 0;
    size_t skip = 0;
    for (;;) {
        while (n < max) {
            size_t i = 0;
            if (r->have < 2)
                break;
            size_t len = r->buf[1] & 0x7f, hdr = 2;
            if (len == 126) {
                if (r->have < 4)
                    break;
                len = (size_t)r->buf[2] << 8 | r->buf[3];
                hdr = 4;
            } else if (len == 127) {
                if (r->have < 10)
                    break;
                len = 0;
                for (int k = 0; k < 8; k++)
                    len = len << 8 | r->buf[2 + k];
                hdr = 10;
            }
            size_t keep = len < sizeof out[n].data ? len : sizeof out[n].data;
            if (r->have < hdr + keep)
                break;
            out[n].op = r->buf[0] & 0xf;
            out[n].len = len;
            memcpy(out[n].data, r->buf + hdr, keep);
            n++;
            i = hdr + keep;
            skip = len - keep;
            size_t drop = skip < r->have - i ? skip : r->have - i;
            i += drop;
            skip -= drop;
            memmove(r->buf, r->buf + i, r->have - i);
            r->have -= i;
            while (skip > 0) {
                uint8_t tmp[65536];
                ssize_t g = recv(fd, tmp, skip < sizeof tmp ? skip : sizeof tmp, 0);
                if (g <= 0) {
                    r->eof = g == 0;
                    r->stalled = g < 0;
                    return n;
                }
                skip -= (size_t)g;
            }
        }
        if (n > 0 || r->eof || r->stalled)
            return n;
        ssize_t g = recv(fd, r->buf + r->have, sizeof r->buf - r->have, 0);
        if (g <= 0) {
            r->eof = g == 0;
            r->stalled = g < 0;
            return n;
        }
        r->have += (size_t)g;
    }
}

/* Reads until `want` frames (up to `max`), EOF or a stall; returns how many. */
static int cli_frames(int fd, rframe_t *out, int max, int want, reader_t *r)
{
    int n = 0;
    while (n < want && n < max) {
        int got = cli_some(fd, out + n, max - n, r);
        if (got == 0)
            break;
        n += got;
    }
    return n;
}

#define ALL 1000000

/* The close code of the first close frame (0: a close without one; -1: none). */
static int close_code_of(const rframe_t *f, int n)
{
    for (int i = 0; i < n; i++)
        if (f[i].op == 8)
            return f[i].len >= 2 ? ((uint8_t)f[i].data[0] << 8 | (uint8_t)f[i].data[1]) : 0;
    return -1;
}

static void *client_main(void *arg)
{
    client_t *cl = arg;
    cl->fn(cl);
    uv_async_send(&cl->srv->done_async);
    return NULL;
}

typedef struct fixture {
    srv_t *srv;
    client_t cl;
} fixture_t;

static int setup(void **state)
{
    fixture_t *fx = calloc(1, sizeof *fx);
    fx->srv = calloc(1, sizeof *fx->srv);
    cm_ws_config_defaults(&fx->srv->cfg);
    fx->srv->cfg.max_message = 4096;
    fx->srv->cfg.early_max = 512;
    fx->srv->start_delay_ms = -1;
    *state = fx;
    return 0;
}

static int teardown(void **state)
{
    fixture_t *fx = *state;
    free(fx->srv);
    free(fx);
    return 0;
}

static void run(fixture_t *fx, client_fn fn)
{
    srv_t *s = fx->srv;
    assert_int_equal(uv_loop_init(&s->loop), 0);
    cm_http_config_t hc;
    cm_http_config_defaults(&hc);
    hc.host = "127.0.0.1";
    hc.port = 0;
    hc.handler = handler;
    hc.handler_ud = s;
    hc.idle_timeout_ms = 3000; /* a shutdown that cannot flush ends in time */
    assert_int_equal(cm_http_server_start(&s->loop, &hc, &s->http), 0);
    uv_async_init(&s->loop, &s->done_async, on_done);
    s->done_async.data = s;
    uv_timer_init(&s->loop, &s->start_timer);
    s->start_timer.data = s;
    fx->cl.port = cm_http_server_port(s->http);
    fx->cl.fn = fn;
    fx->cl.srv = s;
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, client_main, &fx->cl), 0);
    uv_run(&s->loop, UV_RUN_DEFAULT);
    pthread_join(th, NULL);
    assert_null(s->http);
    assert_int_equal(uv_loop_close(&s->loop), 0);
    assert_int_equal(s->closes, s->accepted);
    if (s->shared) {
        cm_ws_frame_unref(s->shared);
        s->shared = NULL;
    }
    assert_int_equal(cm_alloc_live(), 0);
}

/* ---- session scenarios ------------------------------------------------------------------------
 */

/* Each bad frame, sent on its own connection, and the close code it must get. */
static size_t bad_case(int i, uint8_t *buf)
{
    static uint8_t p[5000];
    memset(p, 'x', sizeof p);
    switch (i) {
    case 0:
        return frame(buf, 0, 9, "x", 1); /* FIN=0 ping */
    case 1:
        return frame_ex(buf, 0x89, p, 126, 0, 0); /* 126-byte ping */
    case 2:
        return frame(buf, 1, 8, "\x03", 1); /* 1-byte close */
    case 3:
        return frame(buf, 1, 8, "\x03\xed", 2); /* 1005 */
    case 4:
        return frame(buf, 1, 8, "\x03\xee", 2); /* 1006 */
    case 5:
        return frame(buf, 1, 8, "\x03\xf7", 2); /* 1015 */
    case 6:
        return frame(buf, 1, 8, "\x03\xe7", 2); /* 999 */
    case 7:
        return frame(buf, 1, 8, "\x03\xf8", 2); /* 1016 */
    case 8:
        return frame(buf, 1, 8, "\x0b\xb7", 2); /* 2999 */
    case 9:
        return frame(buf, 1, 8, "\x03\xe8\xc3\x28", 4); /* bad reason */
    case 10:
        return frame(buf, 1, 3, "x", 1); /* opcode 3 */
    case 11:
        return frame(buf, 1, 0xb, "x", 1); /* opcode 0xb */
    case 12:
        return frame_ex(buf, 0xc1, "x", 1, 0, 0); /* RSV1 */
    case 13:
        return frame_ex(buf, 0x91, "x", 1, 0, 0); /* RSV3 */
    case 14:
        return frame_ex(buf, 0x81, "hi", 2, 1, 0); /* unmasked */
    case 15:
        return frame(buf, 1, 1, p, 4097); /* too big */
    case 16: {                            /* fragments */
        size_t n = frame(buf, 0, 1, p, 3000);
        return n + frame(buf + n, 1, 0, p, 1097);
    }
    case 17:
        return frame(buf, 1, 1, "a\xc3\x28z", 4); /* bad UTF-8 */
    case 18: {                                    /* cut short */
        size_t n = frame(buf, 0, 1, "\xe2\x82", 2);
        return n + frame(buf + n, 1, 0, "", 0);
    }
    case 19:
        return frame(buf, 1, 0, "x", 1); /* orphan */
    case 20: {                           /* interleaved */
        size_t n = frame(buf, 0, 1, "a", 1);
        return n + frame(buf + n, 1, 1, "b", 1);
    }
    case 21:
        return frame_ex(buf, 0x81, "x", 1, 0, 1); /* long form */
    default:
        return 0;
    }
}

static const int bad_codes[] = {1002, 1002, 1002, 1002, 1002, 1002, 1002, 1002, 1002, 1007, 1002,
                                1002, 1002, 1002, 1002, 1009, 1009, 1007, 1007, 1002, 1002, 1002};
#define NBAD ((int)(sizeof bad_codes / sizeof bad_codes[0]))

static void c_bad_frames(client_t *cl)
{
    static uint8_t buf[12000];
    static rframe_t f[8];
    for (int i = 0; i < NBAD; i++) {
        int fd = cli_open(cl->port, 0);
        cl->val[i] = -100;
        if (fd < 0)
            continue;
        cli_send(fd, buf, bad_case(i, buf));
        reader_t *r = calloc(1, sizeof *r);
        int n = cli_frames(fd, f, 8, ALL, r);
        cl->val[i] = r->eof ? close_code_of(f, n) : -200; /* the TCP connection must end too */
        free(r);
        close(fd);
    }
}

static void bad_frames_get_their_close_code(void **state)
{
    fixture_t *fx = *state;
    run(fx, c_bad_frames);
    for (int i = 0; i < NBAD; i++) {
        if (fx->cl.val[i] != bad_codes[i])
            fail_msg("case %d: close code %d, want %d", i, fx->cl.val[i], bad_codes[i]);
    }
    assert_int_equal(fx->srv->nclosing, NBAD); /* the owner heard of each */
    assert_int_equal(fx->srv->nmsgs, 0);
}

/* Fragments with a ping between them; a message in pieces across reads; both closes. */
static void c_messages_and_closes(client_t *cl)
{
    static uint8_t buf[2000], p[300];
    rframe_t f[8];
    reader_t *r = calloc(1, sizeof *r);
    int fd = cli_open(cl->port, 0);
    size_t n = frame(buf, 0, 1, "echo:hel", 8);
    n += frame(buf + n, 1, 9, "pp", 2);
    n += frame(buf + n, 0, 0, "lo ", 3);
    n += frame(buf + n, 1, 0, "w\xc3\xb6rld", 6);
    cli_send(fd, buf, n);
    int got = cli_frames(fd, f, 2, 2, r);
    cl->val[0] = got == 2 && f[0].op == 0xa && f[0].len == 2 && !memcmp(f[0].data, "pp", 2);
    cl->val[1] =
        got == 2 && f[1].op == 1 && f[1].len == 12 && !memcmp(f[1].data, "hello w\xc3\xb6rld", 12);
    /* 300 bytes (16-bit length) split inside the header and the payload: separate reads. */
    memcpy(p, "echo:", 5);
    memset(p + 5, 'q', sizeof p - 5);
    n = frame(buf, 1, 2, p, sizeof p);
    size_t cuts[] = {0, 1, 3, 7, 100, n};
    for (int i = 0; i < 5; i++) {
        cli_send(fd, buf + cuts[i], cuts[i + 1] - cuts[i]);
        sleep_ms(20);
    }
    got = cli_frames(fd, f, 1, 1, r);
    cl->val[2] = got == 1 && f[0].op == 2 && f[0].len == 295 && f[0].data[0] == 'q';
    /* Exactly max_message (4096 here) is fine. */
    static uint8_t big[4200], whole[4096];
    memcpy(whole, "echo:", 5);
    memset(whole + 5, 'm', sizeof whole - 5);
    cli_send(fd, big, frame(big, 1, 1, whole, sizeof whole));
    got = cli_frames(fd, f, 1, 1, r);
    cl->val[9] = got == 1 && f[0].op == 1 && f[0].len == 4091;
    /* The client's close is echoed, then the TCP connection ends. */
    cli_send(fd, buf, frame(buf, 1, 8, "\x0b\xb8see you", 9)); /* 3000 */
    got = cli_frames(fd, f, 8, ALL, r);
    cl->val[3] = close_code_of(f, got);
    cl->val[4] = r->eof;
    close(fd);

    /* A close without a code gets one without a code. */
    memset(r, 0, sizeof *r);
    fd = cli_open(cl->port, 0);
    cli_send(fd, buf, frame(buf, 1, 8, "", 0));
    got = cli_frames(fd, f, 8, ALL, r);
    cl->val[5] = got == 1 && f[0].op == 8 && f[0].len == 0 && r->eof;
    close(fd);

    /* A close the server starts carries its code and reason. */
    memset(r, 0, sizeof *r);
    fd = cli_open(cl->port, 0);
    cli_send(fd, buf, frame(buf, 1, 1, "close-me", 8));
    got = cli_frames(fd, f, 8, ALL, r);
    cl->val[6] = close_code_of(f, got);
    cl->val[7] = got >= 1 && f[got - 1].len == 5 && !memcmp(f[got - 1].data + 2, "bye", 3);
    cl->val[8] = r->eof;
    close(fd);
    free(r);
}

static void messages_pings_and_closes(void **state)
{
    fixture_t *fx = *state;
    run(fx, c_messages_and_closes);
    int *v = fx->cl.val;
    assert_true(v[0]); /* pong echoes the ping's payload, before the message completes */
    assert_true(v[1]);
    assert_true(v[2]);
    assert_int_equal(v[3], 3000);
    assert_true(v[4]);
    assert_true(v[5]);
    assert_int_equal(v[6], 1001);
    assert_true(v[7]);
    assert_true(v[8]);
    assert_true(v[9]);
    srv_t *s = fx->srv;
    assert_int_equal(s->nmsgs, 4);
    assert_string_equal(s->msg[0], "1:echo:hello w\xc3\xb6rld");
    assert_int_equal(s->nclosing, 2); /* the client's closes, not the one the owner asked for */
    assert_int_equal(s->closing_codes[0], 3000);
    assert_int_equal(s->closing_codes[1], 0);
}

/* Messages sent before the owner starts the session: the first in the same segment as the
 * request's end, the second right after the 101. */
static void c_early(client_t *cl)
{
    uint8_t buf[1200];
    rframe_t f[8];
    reader_t *r = calloc(1, sizeof *r);
    size_t n = frame(buf, 1, 1, "echo:one", 8);
    int fd = cli_connect(cl->port, 0);
    cl->val[0] = cli_upgrade_with(fd, buf, n);
    n = frame(buf, 1, 9, "", 0); /* a ping is answered even before the start */
    n += frame(buf + n, 1, 1, "echo:two", 8);
    cli_send(fd, buf, n);
    int got = cli_frames(fd, f, 3, 3, r);
    cl->val[1] =
        got == 3 && f[0].op == 0xa && !memcmp(f[1].data, "one", 3) && !memcmp(f[2].data, "two", 3);
    close(fd);

    /* More than early_max (512 bytes here) before the start: 1008. */
    memset(r, 0, sizeof *r);
    fd = cli_open(cl->port, 0);
    static char p[300];
    memset(p, 'e', sizeof p);
    n = frame(buf, 1, 1, p, sizeof p);
    n += frame(buf + n, 1, 1, p, sizeof p);
    cli_send(fd, buf, n);
    got = cli_frames(fd, f, 8, ALL, r);
    cl->val[2] = close_code_of(f, got);
    close(fd);
    free(r);
}

static void early_messages_wait_for_start(void **state)
{
    fixture_t *fx = *state;
    fx->srv->start_delay_ms = 300;
    run(fx, c_early);
    assert_true(fx->cl.val[0]);
    assert_true(fx->cl.val[1]);
    assert_int_equal(fx->cl.val[2], 1008);
    srv_t *s = fx->srv;
    assert_false(s->msg_before_start);
    assert_int_equal(s->nmsgs, 2);
    assert_string_equal(s->msg[0], "1:echo:one");
    assert_string_equal(s->msg[1], "1:echo:two");
}

/* A peer that sends pings and never reads: once the pongs would pass the cap the session
 * closes with 1013 and stops reading, so the peer's sends stall. */
static void c_ping_flood(client_t *cl)
{
    int fd = cli_open(cl->port, 4096);
    struct timeval tv = {0, 100000};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    static uint8_t chunk[65536];
    static char p[125];
    memset(p, 'p', sizeof p);
    size_t one = frame(chunk, 1, 9, p, sizeof p), n = 0;
    while (n + one <= sizeof chunk)
        n += frame(chunk + n, 1, 9, p, sizeof p);
    const size_t total = 64u << 20;
    while (cl->sent < total) {
        size_t w = cli_send(fd, chunk, n);
        cl->sent += w;
        if (w < n)
            break;
    }
    /* Now read: the pongs that fit, then the close. */
    static rframe_t f[4096];
    reader_t *r = calloc(1, sizeof *r);
    int code = -1;
    while (!r->eof && !r->stalled) {
        int got = cli_frames(fd, f, 4096, 4096, r);
        if (code < 0)
            code = close_code_of(f, got);
        cl->got += (size_t)got;
    }
    cl->val[0] = code;
    cl->val[1] = r->eof;
    free(r);
    close(fd);
}

static void ping_flood_closes_and_stops_reading(void **state)
{
    fixture_t *fx = *state;
    fx->srv->cfg.send_queue_max = 16384;
    run(fx, c_ping_flood);
    assert_int_equal(fx->cl.val[0], 1013);
    assert_true(fx->cl.val[1]);
    assert_true(fx->cl.sent < (64u << 20)); /* reading stopped: the sends stalled */
    assert_int_equal(fx->srv->nclosing, 1);
    assert_int_equal(fx->srv->closing_codes[0], 1013);
}

/* An owner that keeps a session over its cap: reading pauses until the peer has drained it. */
static void c_backpressure(client_t *cl)
{
    uint8_t buf[64];
    int fd = cli_open(cl->port, 4096);
    cli_send(fd, buf, frame(buf, 1, 1, "fill", 4));
    sleep_ms(200);
    cli_send(fd, buf, frame(buf, 1, 1, "after", 5));
    sleep_ms(200);
    /* Drain everything the fill queued; "after" is read by the server once the queue is back
     * under its cap, and echoed. */
    reader_t *r = calloc(1, sizeof *r);
    static rframe_t f[256];
    size_t frames = 0;
    int acked = 0, got;
    while (!acked && (got = cli_some(fd, f, 256, r)) > 0) {
        for (int i = 0; i < got; i++) {
            if (f[i].op == 1 && f[i].len == 32768 && f[i].data[0] == 'f')
                frames++;
            else if (f[i].op == 1 && f[i].len == 3 && !memcmp(f[i].data, "ack", 3))
                acked = 1;
        }
    }
    cl->got = frames;
    cl->val[1] = acked;
    cli_send(fd, buf, frame(buf, 1, 8, "\x03\xe8", 2));
    got = cli_frames(fd, f, 8, ALL, r);
    cl->val[0] = close_code_of(f, got);
    free(r);
    close(fd);
}

static void over_cap_pauses_reading(void **state)
{
    fixture_t *fx = *state;
    fx->srv->cfg.send_queue_max = 65536;
    run(fx, c_backpressure);
    srv_t *s = fx->srv;
    assert_int_equal(s->enobufs, 1);
    assert_int_equal(fx->cl.got, (size_t)s->fill_frames); /* nothing lost or cut */
    assert_int_equal(fx->cl.val[0], 1000);
    assert_true(fx->cl.val[1]);
    assert_int_equal(s->nmsgs, 2);
    assert_string_equal(s->msg[1], "1:after");
    assert_true(s->queued_at_after <= 65536);
}

/* One encoded frame to three sessions: each gets the same bytes; the frame is freed once,
 * after the last write released it (run() checks that no block is left). */
static void c_shared(client_t *cl)
{
    uint8_t buf[64];
    int fds[3];
    rframe_t f[2];
    for (int i = 0; i < 3; i++) {
        fds[i] = cli_open(cl->port, 0);
        cli_send(fds[i], buf, frame(buf, 1, 1, "shared", 6));
    }
    for (int i = 0; i < 3; i++) {
        reader_t *r = calloc(1, sizeof *r);
        int got = cli_frames(fds[i], f, 1, 1, r);
        cl->val[i] =
            got == 1 && f[0].op == 1 && f[0].len == 11 && !memcmp(f[0].data, "hello all", 9);
        free(r);
        close(fds[i]);
    }
}

static void shared_frame_freed_once(void **state)
{
    fixture_t *fx = *state;
    long before = cm_alloc_live();
    assert_int_equal(cm_ws_frame_new(CM_WS_OP_TEXT, "hello all!!", 11, &fx->srv->shared), 0);
    assert_int_equal(cm_alloc_live(), before + 1);
    run(fx, c_shared); /* drops our reference after the server is gone */
    assert_true(fx->cl.val[0] && fx->cl.val[1] && fx->cl.val[2]);
    assert_int_equal(fx->srv->accepted, 3);
}

/* Refusals over the wire: HEAD and HTTP/1.0 never get a 101. */
static void c_refusals(client_t *cl)
{
    const char *reqs[] = {
        "HEAD /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        "GET /ws HTTP/1.0\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    };
    for (int i = 0; i < 2; i++) {
        int fd = cli_connect(cl->port, 0);
        char head[1024];
        cli_send(fd, reqs[i], strlen(reqs[i]));
        cl->val[i] = cli_read_head(fd, head, sizeof head);
        close(fd);
    }
}

static void head_and_http10_refused(void **state)
{
    fixture_t *fx = *state;
    run(fx, c_refusals);
    assert_int_equal(fx->cl.val[0], 405);
    assert_int_equal(fx->cl.val[1], 400);
    assert_int_equal(fx->srv->accepted, 0);
}

int main(void)
{
    cm_json_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(accept_key_rfc_vector),
        cmocka_unit_test(accept_key_invalid),
        cmocka_unit_test(header_incremental),
        cmocka_unit_test(header_rejections),
        cmocka_unit_test(utf8_validation),
        cmocka_unit_test(close_codes),
        cmocka_unit_test(handshake_checks),
        cmocka_unit_test(frame_encoding),
        cmocka_unit_test_setup_teardown(bad_frames_get_their_close_code, setup, teardown),
        cmocka_unit_test_setup_teardown(messages_pings_and_closes, setup, teardown),
        cmocka_unit_test_setup_teardown(early_messages_wait_for_start, setup, teardown),
        cmocka_unit_test_setup_teardown(ping_flood_closes_and_stops_reading, setup, teardown),
        cmocka_unit_test_setup_teardown(over_cap_pauses_reading, setup, teardown),
        cmocka_unit_test_setup_teardown(shared_frame_freed_once, setup, teardown),
        cmocka_unit_test_setup_teardown(head_and_http10_refused, setup, teardown),
    };
    /* WS_TEST=name runs one test (cmocka's filter), for debugging one scenario. */
    if (getenv("WS_TEST"))
        cmocka_set_test_filter(getenv("WS_TEST"));
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    return rc || cm_alloc_live() != 0;
}
