#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>
#include <uv.h>

#include "cm/backoff.h"
#include "cm/error.h"

static void doubles_with_jitter_and_caps(void **state)
{
    (void)state;
    cm_backoff_t b;
    cm_backoff_init(&b, 100, 1000, 42);
    uint64_t base = 100;
    for (int i = 0; i < 20; i++) {
        uint64_t d = cm_backoff_next(&b);
        assert_true(d >= base / 2 && d <= base);
        base = base * 2 > 1000 ? 1000 : base * 2;
    }
    cm_backoff_reset(&b);
    uint64_t d = cm_backoff_next(&b);
    assert_true(d >= 50 && d <= 100);
}

static void jitter_spreads_replicas(void **state)
{
    (void)state;
    /* Two replicas that failed together wait different times (seeds differ per process). */
    cm_backoff_t a, b;
    cm_backoff_init(&a, 1000, 1000, 1);
    cm_backoff_init(&b, 1000, 1000, 2);
    int differ = 0;
    for (int i = 0; i < 10; i++)
        differ += cm_backoff_next(&a) != cm_backoff_next(&b);
    assert_true(differ >= 8);
}

static void odd_settings(void **state)
{
    (void)state;
    cm_backoff_t b;
    cm_backoff_init(&b, 0, 0, 0); /* taken as 1 ms, no jitter left to draw */
    for (int i = 0; i < 5; i++)
        assert_int_equal(cm_backoff_next(&b), 1);
    cm_backoff_init(&b, 500, 100, 7); /* max below min: min */
    for (int i = 0; i < 5; i++) {
        uint64_t d = cm_backoff_next(&b);
        assert_true(d >= 250 && d <= 500);
    }
    cm_backoff_init(&b, 1, UINT64_MAX, 7); /* doubling never wraps */
    uint64_t prev = 0;
    for (int i = 0; i < 80; i++) {
        uint64_t d = cm_backoff_next(&b);
        assert_true(d >= prev / 4);
        prev = d;
    }
}

static void strerror_texts(void **state)
{
    (void)state;
    assert_string_equal(cm_strerror(0), "ok");
    assert_string_equal(cm_strerror(UV_ETIMEDOUT), uv_strerror(UV_ETIMEDOUT));
    assert_string_equal(cm_strerror(CM_ESERVER), "server error");
    assert_string_equal(cm_strerror(CM_EREADONLY), "server is read-only");
    assert_string_equal(cm_strerror(CM_EPROTO), "protocol error");
    assert_string_equal(cm_strerror(-4999), "unknown error"); /* not in libuv's table */
    assert_string_equal(cm_strerror(1), "unknown error");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(doubles_with_jitter_and_caps),
        cmocka_unit_test(jitter_spreads_replicas),
        cmocka_unit_test(odd_settings),
        cmocka_unit_test(strerror_texts),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
