#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <cjson/cJSON.h>
#include <string.h>
#include <uv.h>

#include "cm/alloc.h"
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

static void allocation_failures(void **state)
{
    (void)state;
    /* Every allocation point fails once; nothing may leak or crash. */
    for (long n = 1; n < 20; n++) {
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
        } else {
            assert_int_equal(rc, UV_ENOMEM);
        }
    }
    assert_int_equal(cm_alloc_live(), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(parse_notify),
        cmocka_unit_test(frame_is_allow_listed),
        cmocka_unit_test(message_round_trip),
        cmocka_unit_test(id_only),
        cmocka_unit_test(invalid_payloads),
        cmocka_unit_test(from_row),
        cmocka_unit_test(channel),
        cmocka_unit_test(allocation_failures),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    return rc || cm_alloc_live() != 0;
}
