/* Unit tests of cm_redis_url_parse: the REDIS_URL forms of the contract. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>
#include <uv.h>

#include "cm/redis.h"

static void defaults(void **state)
{
    (void)state;
    cm_redis_url_t u;
    assert_int_equal(cm_redis_url_parse("redis://127.0.0.1", &u), 0);
    assert_string_equal(u.host, "127.0.0.1");
    assert_int_equal(u.port, 6379);
    assert_int_equal(u.db, 0);
    assert_int_equal(u.is_unix, 0);
    assert_string_equal(u.user, "");
    assert_string_equal(u.password, "");
    assert_int_equal(cm_redis_url_parse("redis://localhost/", &u), 0);
    assert_string_equal(u.host, "localhost");
    assert_int_equal(u.db, 0);
}

static void full_form(void **state)
{
    (void)state;
    cm_redis_url_t u;
    assert_int_equal(cm_redis_url_parse("redis://app:p%40ss%3Aw0rd@10.0.0.5:6380/3", &u), 0);
    assert_string_equal(u.host, "10.0.0.5");
    assert_int_equal(u.port, 6380);
    assert_string_equal(u.user, "app");
    assert_string_equal(u.password, "p@ss:w0rd");
    assert_int_equal(u.db, 3);
}

static void password_only(void **state)
{
    (void)state;
    cm_redis_url_t u;
    assert_int_equal(cm_redis_url_parse("redis://:secret@127.0.0.1:6379/0", &u), 0);
    assert_string_equal(u.user, "");
    assert_string_equal(u.password, "secret");
    /* No colon: a user name alone, no password (no AUTH is sent). */
    assert_int_equal(cm_redis_url_parse("redis://someone@127.0.0.1", &u), 0);
    assert_string_equal(u.user, "someone");
    assert_string_equal(u.password, "");
}

static void ipv6_host(void **state)
{
    (void)state;
    cm_redis_url_t u;
    assert_int_equal(cm_redis_url_parse("redis://[::1]:7000/1", &u), 0);
    assert_string_equal(u.host, "::1");
    assert_int_equal(u.port, 7000);
    assert_int_equal(u.db, 1);
}

static void unix_socket(void **state)
{
    (void)state;
    cm_redis_url_t u;
    assert_int_equal(cm_redis_url_parse("unix:///var/run/redis/redis.sock", &u), 0);
    assert_int_equal(u.is_unix, 1);
    assert_string_equal(u.path, "/var/run/redis/redis.sock");
    assert_string_equal(u.host, "");
    assert_int_equal(u.db, 0);
    assert_int_equal(cm_redis_url_parse("unix:///tmp/r%20s.sock?db=2", &u), 0);
    assert_string_equal(u.path, "/tmp/r s.sock");
    assert_int_equal(u.db, 2);
    assert_int_equal(cm_redis_url_parse("unix://host/tmp/r.sock", &u), UV_EINVAL);
    assert_int_equal(cm_redis_url_parse("unix://", &u), UV_EINVAL);
    assert_int_equal(cm_redis_url_parse("unix:///tmp/r.sock?db=x", &u), UV_EINVAL);
}

static void bad_scheme(void **state)
{
    (void)state;
    cm_redis_url_t u;
    assert_int_equal(cm_redis_url_parse("http://127.0.0.1:6379", &u), UV_EINVAL);
    assert_int_equal(cm_redis_url_parse("rediss://127.0.0.1:6379", &u), UV_EINVAL);
    assert_int_equal(cm_redis_url_parse("127.0.0.1:6379", &u), UV_EINVAL);
    assert_int_equal(cm_redis_url_parse("", &u), UV_EINVAL);
    assert_int_equal(cm_redis_url_parse(NULL, &u), UV_EINVAL);
    assert_int_equal(cm_redis_url_parse("redis://", &u), UV_EINVAL);
    assert_int_equal(cm_redis_url_parse("redis://h/0#frag", &u), UV_EINVAL);
}

static void bad_port(void **state)
{
    (void)state;
    cm_redis_url_t u;
    assert_int_equal(cm_redis_url_parse("redis://127.0.0.1:70000", &u), UV_EINVAL);
    assert_int_equal(cm_redis_url_parse("redis://127.0.0.1:0", &u), UV_EINVAL);
    assert_int_equal(cm_redis_url_parse("redis://127.0.0.1:abc", &u), UV_EINVAL);
    assert_int_equal(cm_redis_url_parse("redis://127.0.0.1:-1", &u), UV_EINVAL);
    assert_int_equal(cm_redis_url_parse("redis://127.0.0.1:99999999999999999999", &u), UV_EINVAL);
}

static void bad_db(void **state)
{
    (void)state;
    cm_redis_url_t u;
    assert_int_equal(cm_redis_url_parse("redis://127.0.0.1/abc", &u), UV_EINVAL);
    assert_int_equal(cm_redis_url_parse("redis://127.0.0.1/-1", &u), UV_EINVAL);
    assert_int_equal(cm_redis_url_parse("redis://127.0.0.1/1/2", &u), UV_EINVAL);
    assert_int_equal(cm_redis_url_parse("redis://127.0.0.1/1x", &u), UV_EINVAL);
    assert_int_equal(cm_redis_url_parse("redis://127.0.0.1/0?db=1", &u), UV_EINVAL);
}

static void too_long(void **state)
{
    (void)state;
    cm_redis_url_t u;
    char url[1024];
    memset(url, 0, sizeof url);
    strcpy(url, "redis://:");
    memset(url + strlen(url), 'x', 300);
    strcat(url, "@h");
    assert_int_equal(cm_redis_url_parse(url, &u), UV_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(defaults),  cmocka_unit_test(full_form),   cmocka_unit_test(password_only),
        cmocka_unit_test(ipv6_host), cmocka_unit_test(unix_socket), cmocka_unit_test(bad_scheme),
        cmocka_unit_test(bad_port),  cmocka_unit_test(bad_db),      cmocka_unit_test(too_long),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
