#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>
#include <uv.h>

#include "market.h"

static void valid_ids(void **state)
{
    (void)state;
    assert_true(ps_market_valid("BTC-USD", 7));
    assert_true(ps_market_valid("Crypto.BTC/USD", 10)); /* prefix only: "Crypto.BTC" */
    assert_true(ps_market_valid("a:b_c.d-1", 9));
    char longest[PS_MARKET_MAX];
    memset(longest, 'A', sizeof longest);
    assert_true(ps_market_valid(longest, sizeof longest));
}

static void invalid_ids(void **state)
{
    (void)state;
    assert_false(ps_market_valid("", 0));
    assert_false(ps_market_valid("BTC USD", 7));
    assert_false(ps_market_valid("BTC/USD", 7));
    assert_false(ps_market_valid("BTC%00", 6));
    assert_false(ps_market_valid("\xc3\xa9", 2));
    assert_false(ps_market_valid("a\0b", 3));
    char too_long[PS_MARKET_MAX + 1];
    memset(too_long, 'A', sizeof too_long);
    assert_false(ps_market_valid(too_long, sizeof too_long));
}

static void split_lists(void **state)
{
    (void)state;
    char storage[64];
    const char *ids[4];
    assert_int_equal(ps_market_split("A,B,A,C", storage, ids, 4), 3);
    assert_string_equal(ids[0], "A");
    assert_string_equal(ids[2], "C");
    assert_int_equal(ps_market_split("A,,B", storage, ids, 4), UV_EINVAL);
    assert_int_equal(ps_market_split("", storage, ids, 4), UV_EINVAL);
    assert_int_equal(ps_market_split("A,", storage, ids, 4), UV_EINVAL);
    assert_int_equal(ps_market_split("A,B,C,D,E", storage, ids, 4), UV_E2BIG);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(valid_ids),
        cmocka_unit_test(invalid_ids),
        cmocka_unit_test(split_lists),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
