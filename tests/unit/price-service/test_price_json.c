/* The JSON body of a price: decimals and times exactly as Postgres gave them. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

#include "price_json.h"

static void encodes_exactly(void **state)
{
    (void)state;
    ps_price_row_t row = {"BTC-USD", "64123.450000000000000001", "12.5", "2026-11-29T20:00:00.123Z",
                          "pyth"};
    cm_buf_t out = CM_BUF_INIT;
    assert_int_equal(ps_price_json(&row, &out), 0);
    assert_string_equal(out.data, "{\"market\":\"BTC-USD\",\"price\":\"64123.450000000000000001\","
                                  "\"confidence\":\"12.5\",\"publish_time\":"
                                  "\"2026-11-29T20:00:00.123Z\",\"source\":\"pyth\"}");
    cm_buf_free(&out);
}

static void null_confidence_and_escaping(void **state)
{
    (void)state;
    ps_price_row_t row = {"A", "1", NULL, "2026-11-29T20:00:00.000Z", "we\"ird\\src\n"};
    cm_buf_t out = CM_BUF_INIT;
    assert_int_equal(ps_price_json(&row, &out), 0);
    assert_non_null(strstr(out.data, "\"confidence\":null"));
    assert_non_null(strstr(out.data, "\"source\":\"we\\\"ird\\\\src\\n\""));
    cm_buf_free(&out);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(encodes_exactly),
        cmocka_unit_test(null_confidence_and_escaping),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
