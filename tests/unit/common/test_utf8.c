#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

#include "cm/utf8.h"

static int valid(const char *s)
{
    return cm_utf8_valid(s, strlen(s));
}

static void well_formed(void **state)
{
    (void)state;
    assert_true(valid(""));
    assert_true(valid("plain ascii\x7f"));
    assert_true(valid("\xc2\x80 \xdf\xbf"));         /* U+0080, U+07FF */
    assert_true(valid("\xe0\xa0\x80 \xef\xbf\xbf")); /* U+0800, U+FFFF */
    assert_true(valid("\xed\x9f\xbf \xee\x80\x80")); /* around the surrogates */
    assert_true(valid("\xf0\x90\x80\x80"));          /* U+10000 */
    assert_true(valid("\xf4\x8f\xbf\xbf"));          /* U+10FFFF */
    assert_true(cm_utf8_valid("a\0b", 3));           /* NUL is a code point */
    assert_int_equal(cm_utf8_seq_len("\xe2\x82\xac!", 4), 3);
    assert_int_equal(cm_utf8_seq_len("A", 1), 1);
}

static void ill_formed(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "\x80",             /* continuation alone */
        "\xbf",             /* continuation alone */
        "\xc0\xaf",         /* overlong '/' */
        "\xc1\xbf",         /* overlong */
        "\xe0\x80\xaf",     /* overlong 3-byte */
        "\xf0\x80\x80\xaf", /* overlong 4-byte */
        "\xed\xa0\x80",     /* U+D800, a surrogate */
        "\xed\xbf\xbf",     /* U+DFFF */
        "\xf4\x90\x80\x80", /* U+110000 */
        "\xf5\x80\x80\x80", /* lead byte past F4 */
        "\xff",
        "\xfe",
        "\xc3",         /* truncated */
        "\xe2\x82",     /* truncated */
        "\xf0\x9f\x98", /* truncated */
        "\xc3(",        /* bad continuation */
        "ok\xe2\x28\xa1",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        assert_false(valid(bad[i]));
    assert_int_equal(cm_utf8_seq_len("\xe2\x82\xac", 2), 0); /* cut by the length */
    assert_int_equal(cm_utf8_seq_len("", 0), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(well_formed),
        cmocka_unit_test(ill_formed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
