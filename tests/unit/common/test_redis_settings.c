/* Unit tests of the shared Redis settings: REDIS_URL, REDIS_SENTINELS, REDIS_SENTINEL_MASTER,
 * REDIS_SENTINEL_PASSWORD (cm_redis_settings_load, cm_redis_sentinels_check). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <string.h>
#include <uv.h>

#include "cm/config.h"
#include "cm/redis.h"

static const char *lookup(const char *key, void *ud)
{
    const char *const *kv = ud;
    for (; kv && kv[0]; kv += 2)
        if (strcmp(kv[0], key) == 0)
            return kv[1];
    return NULL;
}

static int load(const char *const *env, cm_redis_settings_t *out, char *err)
{
    cm_config_t c;
    cm_config_init(&c, lookup, (void *)env);
    cm_config_app_env(&c);
    int rc = cm_redis_settings_load(&c, out);
    strcpy(err, c.error);
    return rc;
}

static void sentinel_lists(void **state)
{
    (void)state;
    char why[192];
    assert_int_equal(cm_redis_sentinels_check("127.0.0.1:26379", why, sizeof why), 0);
    assert_int_equal(
        cm_redis_sentinels_check("10.0.0.1:26379, 10.0.0.2:26380 ,s3", why, sizeof why), 0);
    assert_int_equal(cm_redis_sentinels_check("[::1]:5000,[fe80::1]", why, sizeof why), 0);
    const char *bad[] = {"",      ",",    "a:1,,b:2",        "a:0", "a:65536",
                         "a:x",   "a:",   "redis://a:26379", "a/b", "u@a:1",
                         "a:1?x", "[::1", ":26379",          " , ", "a:1#f"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        why[0] = '\0';
        assert_int_equal(cm_redis_sentinels_check(bad[i], why, sizeof why), UV_EINVAL);
        assert_non_null(strstr(why, "host:port"));
    }
    char many[512] = "";
    for (int i = 0; i <= CM_REDIS_SENTINELS_MAX; i++)
        snprintf(many + strlen(many), sizeof many - strlen(many), "%sh%d:1", i ? "," : "", i);
    assert_int_not_equal(cm_redis_sentinels_check(many, why, sizeof why), 0);
}

static void without_sentinels(void **state)
{
    (void)state;
    cm_redis_settings_t s;
    char err[256];
    assert_int_equal(load(NULL, &s, err), 0);
    assert_string_equal(s.url, "redis://127.0.0.1:6379/0");
    assert_null(s.sentinels);
    assert_null(s.sentinel_master);
    /* Empty means unset (ConfigMap entries with empty defaults). */
    const char *empty[] = {"REDIS_SENTINELS", "", "REDIS_SENTINEL_MASTER", "", NULL};
    assert_int_equal(load(empty, &s, err), 0);
    assert_null(s.sentinels);
    const char *prod[] = {"APP_ENV", "production", NULL};
    assert_int_equal(load(prod, &s, err), UV_EINVAL);
    assert_string_equal(err, "REDIS_URL: required when APP_ENV=production");
    const char *stray[] = {"REDIS_SENTINEL_MASTER", "mymaster", NULL};
    assert_int_equal(load(stray, &s, err), UV_EINVAL);
    assert_non_null(strstr(err, "REDIS_SENTINEL_MASTER: "));
}

static void with_sentinels(void **state)
{
    (void)state;
    cm_redis_settings_t s;
    char err[256];
    const char *env[] = {"APP_ENV",
                         "production",
                         "REDIS_SENTINELS",
                         "10.0.0.1:26379,10.0.0.2:26379",
                         "REDIS_SENTINEL_MASTER",
                         "mymaster",
                         "REDIS_SENTINEL_PASSWORD",
                         "s3cret",
                         NULL};
    /* REDIS_URL is optional then, even in production: the sentinels give the address. */
    assert_int_equal(load(env, &s, err), 0);
    assert_string_equal(s.sentinels, "10.0.0.1:26379,10.0.0.2:26379");
    assert_string_equal(s.sentinel_master, "mymaster");
    assert_string_equal(s.sentinel_password, "s3cret");
    assert_string_equal(s.url, "redis://127.0.0.1:6379/0");

    cm_redis_config_t cfg;
    cm_redis_config_defaults(&cfg);
    assert_int_equal(cfg.sentinel_watch, 1);
    assert_int_equal(cfg.sentinel_timeout_ms, 500);
    cm_redis_settings_apply(&s, &cfg);
    assert_string_equal(cfg.sentinels, s.sentinels);
    assert_string_equal(cfg.sentinel_master, "mymaster");
    assert_string_equal(cfg.sentinel_password, "s3cret");
    assert_string_equal(cfg.url, s.url);
}

static void invalid_values_name_the_variable(void **state)
{
    (void)state;
    static const struct {
        const char *env[7];
        const char *prefix;
    } cases[] = {
        {{"REDIS_SENTINELS", "a:1,,b:2", "REDIS_SENTINEL_MASTER", "m"}, "REDIS_SENTINELS: "},
        {{"REDIS_SENTINELS", "a:1"}, "REDIS_SENTINEL_MASTER: required with REDIS_SENTINELS"},
        {{"REDIS_SENTINELS", "a:1", "REDIS_SENTINEL_MASTER", "my master"},
         "REDIS_SENTINEL_MASTER: "},
        {{"REDIS_SENTINELS", "a:1", "REDIS_SENTINEL_MASTER", "m", "REDIS_URL", "http://x"},
         "REDIS_URL: "},
        {{"REDIS_SENTINELS", "a:1", "REDIS_SENTINEL_MASTER", "m", "REDIS_URL", "unix:///r.sock"},
         "REDIS_URL: "},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        cm_redis_settings_t s;
        char err[256];
        assert_int_equal(load(cases[i].env, &s, err), UV_EINVAL);
        if (strncmp(err, cases[i].prefix, strlen(cases[i].prefix)) != 0)
            fail_msg("case %zu: got '%s'", i, err);
        assert_null(strchr(err, '\n'));
    }
}

/* A bad sentinel configuration is refused by open too (callers that skip the settings). */
static void open_refuses_bad_sentinel_config(void **state)
{
    (void)state;
    uv_loop_t loop;
    uv_loop_init(&loop);
    cm_redis_config_t cfg;
    cm_redis_config_defaults(&cfg);
    cm_redis_t *r = NULL;
    cfg.sentinels = "127.0.0.1:1";
    assert_int_equal(cm_redis_open(&loop, &cfg, &r), UV_EINVAL); /* no master name */
    cfg.sentinel_master = "m";
    cfg.url = "unix:///tmp/r.sock";
    assert_int_equal(cm_redis_open(&loop, &cfg, &r), UV_EINVAL);
    cfg.url = NULL;
    cfg.sentinels = "127.0.0.1:1,,";
    assert_int_equal(cm_redis_open(&loop, &cfg, &r), UV_EINVAL);
    assert_null(r);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(sentinel_lists),
        cmocka_unit_test(without_sentinels),
        cmocka_unit_test(with_sentinels),
        cmocka_unit_test(invalid_values_name_the_variable),
        cmocka_unit_test(open_refuses_bad_sentinel_config),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
