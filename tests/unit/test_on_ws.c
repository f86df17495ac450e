#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>
#include <uv.h>

#include "cm/alloc.h"
#include "ws.h"

/* ---- handshake key ---------------------------------------------------------------------- */

static void accept_key_rfc_vector(void **state)
{
    (void)state;
    char out[ON_WS_ACCEPT_LEN];
    /* RFC 6455 §1.3 */
    assert_int_equal(on_ws_accept_key("dGhlIHNhbXBsZSBub25jZQ==", 24, out), 0);
    assert_string_equal(out, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    assert_int_equal(on_ws_accept_key("x3JJHMbDL1EzLkh9GBhXDw==", 24, out), 0);
    assert_string_equal(out, "HSmrc0sMlYUkAGmm5OPpG2HaGWk=");
}

static void accept_key_invalid(void **state)
{
    (void)state;
    char out[ON_WS_ACCEPT_LEN];
    assert_int_equal(on_ws_accept_key("", 0, out), UV_EINVAL);
    assert_int_equal(on_ws_accept_key("dGhlIHNhbXBsZSBub25jZQ", 22, out), UV_EINVAL);
    assert_int_equal(on_ws_accept_key("dGhlIHNhbXBsZSBub25jZQ==x", 25, out), UV_EINVAL);
    assert_int_equal(on_ws_accept_key("dGhlIHNhbXBsZSBub25j!!==", 24, out), UV_EINVAL);
    assert_int_equal(on_ws_accept_key("dGhlIHNhbXBsZSBub25jZQ=A", 24, out), UV_EINVAL);
}

/* ---- session ---------------------------------------------------------------------------- */

typedef struct {
    uint8_t out[65536];
    size_t out_len;
    char text[8192];
    size_t text_len;
    int texts;
    int activity;
    int fail_write;
} peer_t;

static void on_text(on_ws_t *ws, const char *data, size_t len, void *ud)
{
    (void)ws;
    peer_t *p = ud;
    memcpy(p->text, data, len);
    p->text_len = len;
    p->texts++;
}

static void on_activity(on_ws_t *ws, void *ud)
{
    (void)ws;
    ((peer_t *)ud)->activity++;
}

static int do_write(on_ws_t *ws, const uint8_t *data, size_t len, void *ud)
{
    (void)ws;
    peer_t *p = ud;
    if (p->fail_write)
        return UV_EPIPE;
    memcpy(p->out + p->out_len, data, len);
    p->out_len += len;
    return 0;
}

static const on_ws_callbacks_t cbs = {on_text, on_activity, do_write};

/* A client frame: `fin`, `opcode`, masked unless `unmasked`. Returns its length. */
static size_t frame(uint8_t *buf, int fin, int opcode, const void *payload, size_t len,
                    int unmasked)
{
    static const uint8_t key[4] = {0x11, 0x22, 0x33, 0x44};
    size_t n = 0;
    buf[n++] = (uint8_t)((fin ? 0x80 : 0) | opcode);
    uint8_t m = unmasked ? 0 : 0x80;
    if (len < 126)
        buf[n++] = (uint8_t)(m | len);
    else if (len < 65536) {
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

/* The close code in the last close frame the server wrote, or -1. */
static int sent_close_code(const peer_t *p)
{
    size_t i = 0;
    int code = -1;
    while (i + 2 <= p->out_len) {
        uint8_t op = p->out[i] & 0x0f;
        size_t len = p->out[i + 1] & 0x7f, hdr = 2;
        if (len == 126) {
            len = ((size_t)p->out[i + 2] << 8) | p->out[i + 3];
            hdr = 4;
        } else if (len == 127)
            return -2;
        if (op == 0x8)
            code = len >= 2 ? (p->out[i + hdr] << 8) | p->out[i + hdr + 1] : 0;
        i += hdr + len;
    }
    return code;
}

static int has_opcode(const peer_t *p, int opcode)
{
    size_t i = 0;
    while (i + 2 <= p->out_len) {
        size_t len = p->out[i + 1] & 0x7f, hdr = 2;
        if (len == 126) {
            len = ((size_t)p->out[i + 2] << 8) | p->out[i + 3];
            hdr = 4;
        }
        if ((p->out[i] & 0x0f) == opcode)
            return 1;
        i += hdr + len;
    }
    return 0;
}

static on_ws_t *session(peer_t *p)
{
    memset(p, 0, sizeof *p);
    on_ws_t *ws = NULL;
    assert_int_equal(on_ws_new(&cbs, p, 4096, &ws), 0);
    return ws;
}

static void text_message(void **state)
{
    (void)state;
    peer_t p;
    on_ws_t *ws = session(&p);
    uint8_t buf[256];
    size_t n = frame(buf, 1, 1, "{\"type\":\"ping\"}", 15, 0);
    /* Byte by byte: the parser must keep state across reads. */
    for (size_t i = 0; i < n; i++)
        assert_int_equal(on_ws_feed(ws, buf + i, 1), 0);
    assert_int_equal(p.texts, 1);
    assert_memory_equal(p.text, "{\"type\":\"ping\"}", 15);
    assert_true(p.activity >= 1);
    assert_false(on_ws_finished(ws));
    on_ws_free(ws);
}

static void server_frames_unmasked(void **state)
{
    (void)state;
    peer_t p;
    on_ws_t *ws = session(&p);
    assert_int_equal(on_ws_send_text(ws, "hi", 2), 0);
    assert_int_equal(p.out_len, 4);
    assert_int_equal(p.out[0], 0x81);
    assert_int_equal(p.out[1], 2); /* no mask bit from a server */
    assert_memory_equal(p.out + 2, "hi", 2);
    assert_int_equal(on_ws_queued_bytes(ws), 0);
    assert_int_equal(on_ws_send_ping(ws), 0);
    assert_int_equal(p.out[4], 0x89);
    on_ws_free(ws);
}

static void ping_gets_pong(void **state)
{
    (void)state;
    peer_t p;
    on_ws_t *ws = session(&p);
    uint8_t buf[64];
    size_t n = frame(buf, 1, 9, "abc", 3, 0);
    assert_int_equal(on_ws_feed(ws, buf, n), 0);
    assert_int_equal(p.out[0], 0x8a);
    assert_int_equal(p.out[1], 3);
    assert_memory_equal(p.out + 2, "abc", 3);
    on_ws_free(ws);
}

static void fragmented_with_interleaved_ping(void **state)
{
    (void)state;
    peer_t p;
    on_ws_t *ws = session(&p);
    uint8_t buf[256];
    size_t n = frame(buf, 0, 1, "hel", 3, 0);
    n += frame(buf + n, 1, 9, "", 0, 0); /* control frame between fragments */
    n += frame(buf + n, 0, 0, "lo ", 3, 0);
    n += frame(buf + n, 1, 0, "world", 5, 0);
    assert_int_equal(on_ws_feed(ws, buf, n), 0);
    assert_int_equal(p.texts, 1);
    assert_int_equal(p.text_len, 11);
    assert_memory_equal(p.text, "hello world", 11);
    assert_true(has_opcode(&p, 0xa));
    on_ws_free(ws);
}

static void unmasked_client_frame(void **state)
{
    (void)state;
    peer_t p;
    on_ws_t *ws = session(&p);
    uint8_t buf[64];
    size_t n = frame(buf, 1, 1, "hi", 2, 1);
    on_ws_feed(ws, buf, n);
    assert_int_equal(p.texts, 0);
    assert_int_equal(sent_close_code(&p), 1002);
    assert_true(on_ws_finished(ws));
    on_ws_free(ws);
}

static void invalid_utf8(void **state)
{
    (void)state;
    peer_t p;
    on_ws_t *ws = session(&p);
    uint8_t buf[64];
    size_t n = frame(buf, 1, 1, "a\xc3\x28z", 4, 0);
    on_ws_feed(ws, buf, n);
    assert_int_equal(p.texts, 0);
    assert_int_equal(sent_close_code(&p), 1007);
    on_ws_free(ws);
}

static void too_big(void **state)
{
    (void)state;
    peer_t p;
    on_ws_t *ws = session(&p);
    static uint8_t big[5000], buf[5100];
    memset(big, 'a', sizeof big);
    size_t n = frame(buf, 1, 1, big, sizeof big, 0);
    on_ws_feed(ws, buf, n);
    assert_int_equal(p.texts, 0);
    assert_int_equal(sent_close_code(&p), 1009);
    on_ws_free(ws);

    /* The limit is per message: fragments adding up past it are refused too. */
    ws = session(&p);
    n = frame(buf, 0, 1, big, 3000, 0);
    n += frame(buf + n, 1, 0, big, 2000, 0);
    on_ws_feed(ws, buf, n);
    assert_int_equal(p.texts, 0);
    assert_int_equal(sent_close_code(&p), 1009);
    on_ws_free(ws);

    /* Exactly 4 KiB is fine. */
    ws = session(&p);
    n = frame(buf, 1, 1, big, 4096, 0);
    assert_int_equal(on_ws_feed(ws, buf, n), 0);
    assert_int_equal(p.texts, 1);
    on_ws_free(ws);
}

static void bad_framing(void **state)
{
    (void)state;
    peer_t p;
    on_ws_t *ws = session(&p);
    uint8_t buf[64];
    /* A continuation frame with nothing to continue. */
    size_t n = frame(buf, 1, 0, "x", 1, 0);
    on_ws_feed(ws, buf, n);
    assert_int_equal(sent_close_code(&p), 1002);
    on_ws_free(ws);
    /* A reserved opcode. */
    ws = session(&p);
    n = frame(buf, 1, 3, "x", 1, 0);
    on_ws_feed(ws, buf, n);
    assert_int_equal(sent_close_code(&p), 1002);
    on_ws_free(ws);
    /* A fragmented control frame: wslay rejects it in the frame header and sends a close
     * without a status code (allowed by RFC 6455 §7.1.7); the session must end cleanly. */
    ws = session(&p);
    n = frame(buf, 0, 9, "x", 1, 0);
    assert_int_not_equal(on_ws_feed(ws, buf, n), 0);
    assert_true(sent_close_code(&p) == 0 || sent_close_code(&p) == 1002);
    assert_true(on_ws_finished(ws));
    on_ws_free(ws);
}

static void client_close_echoed(void **state)
{
    (void)state;
    peer_t p;
    on_ws_t *ws = session(&p);
    uint8_t buf[64];
    size_t n = frame(buf, 1, 8, "\x03\xe8", 2, 0);
    assert_int_equal(on_ws_feed(ws, buf, n), 0);
    assert_int_equal(sent_close_code(&p), 1000);
    assert_true(on_ws_finished(ws));
    assert_int_equal(on_ws_send_text(ws, "x", 1), UV_EPIPE);
    on_ws_free(ws);
}

static void server_close(void **state)
{
    (void)state;
    peer_t p;
    on_ws_t *ws = session(&p);
    assert_int_equal(on_ws_close(ws, ON_WS_CLOSE_TRY_AGAIN), 0);
    assert_int_equal(sent_close_code(&p), 1013);
    assert_int_equal(on_ws_close_code_sent(ws), 1013);
    assert_true(on_ws_finished(ws));
    assert_int_equal(on_ws_close(ws, 1000), 0); /* no-op */
    /* Input after our close is ignored, not an error. */
    uint8_t buf[64];
    size_t n = frame(buf, 1, 1, "hi", 2, 0);
    assert_int_equal(on_ws_feed(ws, buf, n), 0);
    assert_int_equal(p.texts, 0);
    on_ws_free(ws);
}

static void write_failure(void **state)
{
    (void)state;
    peer_t p;
    on_ws_t *ws = session(&p);
    p.fail_write = 1;
    assert_int_not_equal(on_ws_send_text(ws, "hi", 2), 0);
    assert_true(on_ws_finished(ws));
    on_ws_free(ws);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(accept_key_rfc_vector),
        cmocka_unit_test(accept_key_invalid),
        cmocka_unit_test(text_message),
        cmocka_unit_test(server_frames_unmasked),
        cmocka_unit_test(ping_gets_pong),
        cmocka_unit_test(fragmented_with_interleaved_ping),
        cmocka_unit_test(unmasked_client_frame),
        cmocka_unit_test(invalid_utf8),
        cmocka_unit_test(too_big),
        cmocka_unit_test(bad_framing),
        cmocka_unit_test(client_close_echoed),
        cmocka_unit_test(server_close),
        cmocka_unit_test(write_failure),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    return rc || cm_alloc_live() != 0;
}
