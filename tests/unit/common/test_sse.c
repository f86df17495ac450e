/* Server-Sent Events encoding (common/src/sse.c). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>
#include <uv.h>

#include "cm/alloc.h"
#include "cm/json.h"
#include "cm/sse.h"

static void expect(const char *id, const char *event, const char *data, const char *want)
{
    cm_buf_t b = CM_BUF_INIT;
    assert_int_equal(cm_sse_encode(&b, id, event, data, strlen(data)), 0);
    assert_int_equal(b.len, strlen(want));
    assert_memory_equal(b.data, want, b.len);
    cm_buf_free(&b);
}

static void one_event(void **state)
{
    (void)state;
    expect("42", NULL, "{\"type\":\"order_update\"}",
           "id: 42\ndata: {\"type\":\"order_update\"}\n\n");
    expect(NULL, "welcome", "{}", "event: welcome\ndata: {}\n\n");
    expect(NULL, NULL, "", "data: \n\n");
}

/* A line break cannot sit inside a data field: every line becomes its own data line, so the
 * client's joined data is the payload again (a trailing break included). */
static void line_breaks_split_data(void **state)
{
    (void)state;
    expect(NULL, NULL, "a\nb", "data: a\ndata: b\n\n");
    expect(NULL, NULL, "a\r\nb\rc", "data: a\ndata: b\ndata: c\n\n");
    expect(NULL, NULL, "a\n", "data: a\ndata: \n\n");
}

/* An id or event name with a line break would forge fields: refused. */
static void bad_fields_refused(void **state)
{
    (void)state;
    cm_buf_t b = CM_BUF_INIT;
    assert_int_equal(cm_sse_encode(&b, "1\ndata: x", NULL, "y", 1), UV_EINVAL);
    assert_int_equal(cm_sse_encode(&b, NULL, "a\rb", "y", 1), UV_EINVAL);
    assert_int_equal(cm_sse_encode(&b, NULL, NULL, "a\0b", 3), UV_EINVAL);
    assert_int_equal(b.len, 0);
    cm_buf_free(&b);
    assert_int_equal(cm_alloc_live(), 0);
}

int main(void)
{
    cm_json_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(one_event),
        cmocka_unit_test(line_breaks_split_data),
        cmocka_unit_test(bad_fields_refused),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    return rc || cm_alloc_live() != 0;
}
