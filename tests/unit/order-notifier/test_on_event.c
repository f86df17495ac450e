#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <cjson/cJSON.h>
#include <string.h>
#include <uv.h>

#include "cm/alloc.h"
#include "cm/json.h"
#include "event.h"

/* A NOTIFY payload as the trigger writes it, plus fields the allow-list must drop. */
static const char notify[] =
    "{\"id\":42,\"user_id\":\"u1\",\"event_type\":\"order.updated\","
    "\"created_at\":\"1800000000.123456\",\"order\":{\"id\":7,\"user_id\":\"u1\","
    "\"market\":\"BTC-USD\",\"side\":\"buy\",\"price\":\"100.50\",\"quantity\":\"2\","
    "\"filled_quantity\":\"1\",\"status\":\"partially_filled\","
    "\"updated_at\":\"2026-11-29T20:00:00.123456Z\",\"email\":\"a@b.c\",\"note\":\"secret\","
    "\"wallet\":{\"key\":\"x\"}}}";

static void parse_notify(void **state)
{
    (void)state;
    on_event_t ev;
    assert_int_equal(on_event_parse(notify, strlen(notify), &ev), 0);
    assert_int_equal(ev.id, 42);
    assert_string_equal(ev.user_id, "u1");
    assert_string_equal(ev.event_type, "order.updated");
    assert_true(ev.created_at > 1800000000.12 && ev.created_at < 1800000000.13);
    assert_null(cJSON_GetObjectItem(ev.order, "email"));
    assert_string_equal(cJSON_GetObjectItem(ev.order, "price")->valuestring, "100.50");
    on_event_clear(&ev);
}

static void frame_is_allow_listed(void **state)
{
    (void)state;
    on_event_t ev;
    assert_int_equal(on_event_parse(notify, strlen(notify), &ev), 0);
    cm_buf_t b = CM_BUF_INIT;
    assert_int_equal(on_event_frame(&ev, &b), 0);
    assert_string_equal(
        b.data, "{\"type\":\"order_update\",\"event_id\":42,\"event_type\":\"order.updated\","
                "\"order\":{\"id\":7,\"user_id\":\"u1\",\"market\":\"BTC-USD\","
                "\"side\":\"buy\",\"price\":\"100.50\",\"quantity\":\"2\","
                "\"filled_quantity\":\"1\",\"status\":\"partially_filled\","
                "\"updated_at\":\"2026-11-29T20:00:00.123456Z\"}}");
    assert_null(strstr(b.data, "email"));
    assert_null(strstr(b.data, "secret"));
    assert_null(strstr(b.data, "wallet"));
    cm_buf_free(&b);
    on_event_clear(&ev);
}

static void message_round_trip(void **state)
{
    (void)state;
    on_event_t ev, back;
    assert_int_equal(on_event_parse(notify, strlen(notify), &ev), 0);
    cm_buf_t msg = CM_BUF_INIT, f1 = CM_BUF_INIT, f2 = CM_BUF_INIT;
    assert_int_equal(on_event_message(&ev, &msg), 0);
    assert_null(strstr(msg.data, "email"));
    assert_null(strstr(msg.data, "note"));
    assert_int_equal(on_event_parse(msg.data, msg.len, &back), 0);
    assert_int_equal(back.id, 42);
    assert_true(back.created_at > 1800000000.12 && back.created_at < 1800000000.13);
    on_event_frame(&ev, &f1);
    on_event_frame(&back, &f2);
    assert_string_equal(f1.data, f2.data);
    cm_buf_free(&msg);
    cm_buf_free(&f1);
    cm_buf_free(&f2);
    on_event_clear(&ev);
    on_event_clear(&back);
}

static void id_only(void **state)
{
    (void)state;
    on_event_t ev;
    assert_int_equal(on_event_parse("{\"id\":99}", 9, &ev), UV_EAGAIN);
    assert_int_equal(ev.id, 99);
    assert_null(ev.user_id);
    assert_null(ev.order);
}

static void invalid_payloads(void **state)
{
    (void)state;
    static const char *bad[] = {
        "",
        "null",
        "[1]",
        "{\"id\":0}",
        "{\"id\":-3}",
        "{\"id\":1.5}",
        "{\"id\":\"x\"}",
        "{\"user_id\":\"u1\"}",
        "{\"id\":1,\"user_id\":\"u1\",\"event_type\":\"t\"}",
        "{\"id\":1,\"user_id\":\"\",\"event_type\":\"t\",\"order\":{}}",
        "{\"id\":1,\"user_id\":\"u1\",\"event_type\":\"t\",\"order\":[]}",
        "{\"id\":1,\"user_id\":5,\"event_type\":\"t\",\"order\":{}}",
        "{\"id\":1,",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        on_event_t ev;
        assert_int_equal(on_event_parse(bad[i], strlen(bad[i]), &ev), UV_EINVAL);
    }
}

static void from_row(void **state)
{
    (void)state;
    on_event_t ev;
    const char *payload = "{\"id\": 7, \"side\": \"sell\", \"price\": null, \"email\": \"x@y\","
                          " \"user_id\": \"u2\", \"market\": \"ETH-USD\", \"status\": \"open\","
                          " \"quantity\": \"1.000000000000000001\"}";
    assert_int_equal(on_event_from_row(5, "u2", "order.created", payload, "1800000001.5", &ev), 0);
    cm_buf_t b = CM_BUF_INIT;
    assert_int_equal(on_event_frame(&ev, &b), 0);
    assert_non_null(strstr(b.data, "\"price\":null"));
    assert_non_null(strstr(b.data, "\"quantity\":\"1.000000000000000001\""));
    assert_null(strstr(b.data, "email"));
    assert_true(ev.created_at == 1800000001.5);
    cm_buf_free(&b);
    on_event_clear(&ev);
    assert_int_equal(on_event_from_row(0, "u2", "t", "{}", NULL, &ev), UV_EINVAL);
    assert_int_equal(on_event_from_row(1, "u2", "t", "nope", NULL, &ev), UV_EINVAL);
}

static void channel(void **state)
{
    (void)state;
    cm_buf_t b = CM_BUF_INIT;
    assert_int_equal(on_event_channel("u1", &b), 0);
    assert_string_equal(b.data, "orders:user:u1");
    cm_buf_free(&b);
}

/* created_at survives the Redis message whatever its size, and what is not a finite positive
 * number (a negative one, 1e999 read as inf) means unknown (found by fuzz_event). */
static void created_at_edges(void **state)
{
    (void)state;
    static const struct {
        const char *at;
        double want;
    } cases[] = {
        {"\"1e30\"", 1e30},
        {"\"2.5e58\"", 2.5e58},
        {"1e300", 1e300},
        {"-5", 0},
        {"1e999", 0},
        {"-1e999", 0},
        {"\"-1\"", 0},
        {"0", 0},
        {"1800000000.5", 1800000000.5},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char payload[256];
        snprintf(payload, sizeof payload,
                 "{\"id\":1,\"user_id\":\"u\",\"event_type\":\"t\",\"created_at\":%s,"
                 "\"order\":{}}",
                 cases[i].at);
        on_event_t ev, back;
        assert_int_equal(on_event_parse(payload, strlen(payload), &ev), 0);
        assert_true(ev.created_at == cases[i].want);
        cm_buf_t b = CM_BUF_INIT;
        assert_int_equal(on_event_message(&ev, &b), 0);
        assert_int_equal(on_event_parse(b.data, b.len, &back), 0);
        assert_true(back.created_at == cases[i].want);
        cm_buf_free(&b);
        on_event_clear(&back);
        on_event_clear(&ev);
    }
}

/* Every id up to 2^53 travels exactly, in the Redis message and in the client frame (cJSON
 * alone printed 9007199254740992 as 9.00719925474099e+15; found by fuzz_event). */
static void large_ids_exact(void **state)
{
    (void)state;
    static const char *const ids[] = {"9007199254740992", "9007199254740991", "1234567890123457",
                                      "1"};
    for (size_t i = 0; i < sizeof ids / sizeof *ids; i++) {
        char payload[256];
        snprintf(payload, sizeof payload,
                 "{\"id\":%s,\"user_id\":\"u\",\"event_type\":\"t\",\"order\":{}}", ids[i]);
        on_event_t ev, back;
        assert_int_equal(on_event_parse(payload, strlen(payload), &ev), 0);
        cm_buf_t b = CM_BUF_INIT;
        assert_int_equal(on_event_message(&ev, &b), 0);
        assert_int_equal(on_event_parse(b.data, b.len, &back), 0);
        assert_int_equal(back.id, ev.id);
        cm_buf_reset(&b);
        assert_int_equal(on_event_frame(&ev, &b), 0);
        char want[64];
        snprintf(want, sizeof want, "\"event_id\":%s,", ids[i]);
        assert_non_null(strstr(b.data, want));
        cm_buf_free(&b);
        on_event_clear(&back);
        on_event_clear(&ev);
    }
}

/* Every finite number in an order travels as the same double, in its shortest form: cJSON
 * alone printed 905441800000000.125 as 905441800000000 (found by fuzz_event). */
static void order_numbers_exact(void **state)
{
    (void)state;
    static const struct {
        const char *in, *out;
    } cases[] = {
        {"905441800000000.123456", "905441800000000.1"},
        {"0.1", "0.1"},
        {"50000.5", "50000.5"},
        {"-2.5", "-2.5"},
        {"123456789.123456789", "123456789.12345679"},
        {"1e20", "1e+20"},
        {"1e300", "1e+300"},
        {"5e-324", "4.94065645841247e-324"},
        {"42", "42"},
        {"-0", "-0"},
        {"-0.0e5", "-0"},
        {"1e999", "null"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char payload[256];
        snprintf(payload, sizeof payload,
                 "{\"id\":7,\"user_id\":\"u\",\"event_type\":\"t\",\"order\":{\"price\":%s}}",
                 cases[i].in);
        on_event_t ev, back;
        assert_int_equal(on_event_parse(payload, strlen(payload), &ev), 0);
        cm_buf_t b = CM_BUF_INIT;
        assert_int_equal(on_event_frame(&ev, &b), 0);
        char want[64];
        snprintf(want, sizeof want, "\"price\":%s", cases[i].out);
        if (!strstr(b.data, want))
            fail_msg("%s: %s has no %s", cases[i].in, b.data, want);
        cm_buf_reset(&b);
        assert_int_equal(on_event_message(&ev, &b), 0);
        assert_int_equal(on_event_parse(b.data, b.len, &back), 0);
        cm_buf_reset(&b);
        assert_int_equal(on_event_frame(&back, &b), 0);
        assert_non_null(strstr(b.data, want));
        cm_buf_free(&b);
        on_event_clear(&back);
        on_event_clear(&ev);
    }
    assert_int_equal(cm_alloc_live(), 0);
}

/* The leader's envelope: read back exactly; anything else is refused, so a replica falls back
 * to the older JSON message or drops the junk. */
static void envelope_round_trip(void **state)
{
    (void)state;
    on_event_t ev;
    assert_int_equal(on_event_parse(notify, strlen(notify), &ev), 0);
    cm_buf_t env = CM_BUF_INIT, frame = CM_BUF_INIT;
    assert_int_equal(on_event_envelope(&ev, &env), 0);
    assert_int_equal(on_event_frame(&ev, &frame), 0);
    int64_t id = 0, oid = -1;
    double at = 0;
    const char *f = NULL;
    size_t flen = 0;
    assert_int_equal(on_event_envelope_parse(env.data, env.len, &id, &at, &oid, &f, &flen), 0);
    assert_int_equal(oid, ev.order_id);
    assert_true(oid > 0);
    assert_int_equal(id, ev.id);
    assert_true(at == 0 || (at > ev.created_at - 1e-5 && at < ev.created_at + 1e-5));
    assert_int_equal(flen, frame.len);
    assert_memory_equal(f, frame.data, flen);
    static const char *const bad[] = {
        "",
        "e1 ",
        "e1 42",
        "e1 42 1.5",
        "e1 x 1.5\n{}",
        "e1 0 1.5\n{}",
        "e1 42 -1\n{}",
        "e1 42 nan\n{}",
        "e1 42 1.5\n",
        "e1 42 1.5\nnot json",
        "e2 42 1.5\n{}",
        "{\"id\":42}",
        "e1 42 1.5x\n{}",
        "e1 42 1.5 x\n{}",
        "e1 42 1.5 -3\n{}",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        assert_int_equal(on_event_envelope_parse(bad[i], strlen(bad[i]), &id, &at, &oid, &f, &flen),
                         UV_EINVAL);
    const char bad_utf8[] = "e1 42 1.5\n{\"x\":\"\xff\"}";
    assert_int_equal(
        on_event_envelope_parse(bad_utf8, sizeof bad_utf8 - 1, &id, &at, &oid, &f, &flen),
        UV_EINVAL);
    cm_buf_free(&env);
    cm_buf_free(&frame);
    on_event_clear(&ev);
    assert_int_equal(cm_alloc_live(), 0);
}

static void allocation_failures(void **state)
{
    (void)state;
    /* Every allocation point fails once, cJSON's included (cm_json_init); nothing may leak or
     * crash. cJSON says NULL for a document it could not read and for one it had no memory for
     * alike, so a failure inside the parse reads as UV_EINVAL. */
    long n = 1;
    for (;; n++) {
        assert_true(n < 1000);
        on_event_t ev;
        cm_alloc_fail_after(n);
        int rc = on_event_parse(notify, strlen(notify), &ev);
        cm_alloc_fail_after(0);
        if (rc == 0) {
            cm_buf_t b = CM_BUF_INIT;
            cm_alloc_fail_after(1);
            assert_int_equal(on_event_frame(&ev, &b), UV_ENOMEM);
            cm_alloc_fail_after(0);
            cm_buf_free(&b);
            on_event_clear(&ev);
            break;
        }
        assert_true(rc == UV_ENOMEM || rc == UV_EINVAL);
        assert_int_equal(cm_alloc_live(), 0);
    }
    /* The same for every allocation of the frame and the message. */
    on_event_t ev;
    assert_int_equal(on_event_parse(notify, strlen(notify), &ev), 0);
    for (int which = 0; which < 2; which++) {
        for (n = 1;; n++) {
            assert_true(n < 1000);
            cm_buf_t b = CM_BUF_INIT;
            cm_alloc_fail_after(n);
            int rc = which ? on_event_message(&ev, &b) : on_event_frame(&ev, &b);
            cm_alloc_fail_after(0);
            cm_buf_free(&b);
            if (rc == 0)
                break;
            assert_int_equal(rc, UV_ENOMEM);
        }
    }
    on_event_clear(&ev);
    assert_int_equal(cm_alloc_live(), 0);
}

int main(void)
{
    cm_json_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(parse_notify),
        cmocka_unit_test(frame_is_allow_listed),
        cmocka_unit_test(message_round_trip),
        cmocka_unit_test(id_only),
        cmocka_unit_test(invalid_payloads),
        cmocka_unit_test(from_row),
        cmocka_unit_test(channel),
        cmocka_unit_test(created_at_edges),
        cmocka_unit_test(large_ids_exact),
        cmocka_unit_test(order_numbers_exact),
        cmocka_unit_test(envelope_round_trip),
        cmocka_unit_test(allocation_failures),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    return rc || cm_alloc_live() != 0;
}
