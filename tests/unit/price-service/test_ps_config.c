/* price-service settings: defaults, validation naming the variable, CONFIG_FILE reloads. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "config.h"

/* A fake environment: NULL-terminated KEY, VALUE pairs. */
static const char *lookup(const char *key, void *ud)
{
    const char *const *kv = ud;
    for (; kv && kv[0]; kv += 2)
        if (strcmp(kv[0], key) == 0)
            return kv[1];
    return NULL;
}

static int load(const char *const *env, ps_config_t *out, char *err)
{
    cm_config_t c;
    cm_config_init(&c, lookup, (void *)env);
    int rc = ps_config_load(&c, out);
    strcpy(err, c.error);
    return rc;
}

static void defaults(void **state)
{
    (void)state;
    ps_config_t cfg;
    char err[CM_CONFIG_ERROR_MAX];
    assert_int_equal(load(NULL, &cfg, err), 0);
    assert_string_equal(cfg.svc.listen_host, "0.0.0.0");
    assert_int_equal(cfg.svc.listen_port, 8080);
    assert_string_equal(cfg.svc.redis.url, "redis://127.0.0.1:6379/0");
    assert_true(cfg.cache_enabled);
    assert_int_equal(cfg.cache_ttl_ms, 1000);
    assert_int_equal(cfg.svc.redis_timeout_ms, 100);
    assert_int_equal(cfg.origin_timeout_ms, 2000);
    assert_int_equal(cfg.cache_refresh_pct, 20);
    assert_int_equal(cfg.cache_stale_ms, 0);
    assert_int_equal(cfg.svc.log_level, CM_LOG_INFO);
    assert_int_equal(cfg.svc.log_format, CM_LOG_JSON);
    assert_false(cfg.svc.production);
}

static void values(void **state)
{
    (void)state;
    const char *env[] = {"PRICE_SERVICE_LISTEN",
                         "127.0.0.1:9000",
                         "CACHE_ENABLED",
                         "false",
                         "CACHE_TTL_MS",
                         "250",
                         "LOG_LEVEL",
                         "debug",
                         "LOG_FORMAT",
                         "text",
                         "REDIS_URL",
                         "redis://:p%40ss@cache:6380/2",
                         NULL};
    ps_config_t cfg;
    char err[CM_CONFIG_ERROR_MAX];
    assert_int_equal(load(env, &cfg, err), 0);
    assert_int_equal(cfg.svc.listen_port, 9000);
    assert_false(cfg.cache_enabled);
    assert_int_equal(cfg.cache_ttl_ms, 250);
    assert_int_equal(cfg.svc.log_level, CM_LOG_DEBUG);
    assert_int_equal(cfg.svc.log_format, CM_LOG_TEXT);
}

static void expect_error(const char *key, const char *value, const char *name)
{
    const char *env[] = {key, value, NULL};
    ps_config_t cfg;
    char err[CM_CONFIG_ERROR_MAX];
    assert_int_equal(load(env, &cfg, err), UV_EINVAL);
    assert_non_null(strstr(err, name));
}

static void invalid_values_name_the_variable(void **state)
{
    (void)state;
    expect_error("CACHE_TTL_MS", "abc", "CACHE_TTL_MS");
    expect_error("CACHE_TTL_MS", "0", "CACHE_TTL_MS");
    expect_error("CACHE_TTL_MS", "60001", "CACHE_TTL_MS");
    expect_error("CACHE_ENABLED", "maybe", "CACHE_ENABLED");
    expect_error("PRICE_SERVICE_LISTEN", "0.0.0.0:70000", "PRICE_SERVICE_LISTEN");
    expect_error("REDIS_URL", "http://x", "REDIS_URL");
    expect_error("DATABASE_URL", "postgresql://[bad", "DATABASE_URL");
    expect_error("REDIS_TIMEOUT_MS", "-5", "REDIS_TIMEOUT_MS");
    expect_error("LOG_LEVEL", "loud", "LOG_LEVEL");
    expect_error("LOG_FORMAT", "xml", "LOG_FORMAT");
    expect_error("CACHE_REFRESH_AHEAD_PCT", "51", "CACHE_REFRESH_AHEAD_PCT");
    expect_error("CACHE_REFRESH_AHEAD_PCT", "-1", "CACHE_REFRESH_AHEAD_PCT");
    expect_error("CACHE_STALE_IF_ERROR_MS", "3600001", "CACHE_STALE_IF_ERROR_MS");
    expect_error("CACHE_STALE_IF_ERROR_MS", "5s", "CACHE_STALE_IF_ERROR_MS");
}

static void production_requires_urls(void **state)
{
    (void)state;
    const char *env[] = {"APP_ENV", "production", "DATABASE_URL", "postgresql://db/markets", NULL};
    ps_config_t cfg;
    char err[CM_CONFIG_ERROR_MAX];
    assert_int_equal(load(env, &cfg, err), UV_EINVAL);
    assert_non_null(strstr(err, "REDIS_URL"));
}

static void cors_allow_list(void **state)
{
    (void)state;
    ps_config_t cfg;
    char err[CM_CONFIG_ERROR_MAX];
    /* Unset: no CORS header at all. */
    assert_int_equal(load(NULL, &cfg, err), 0);
    assert_int_equal(cfg.ncors, 0);
    assert_null(ps_config_cors_headers(&cfg, "http://127.0.0.1:8081"));

    const char *env[] = {"PRICE_CORS_ALLOWED_ORIGINS",
                         "http://127.0.0.1:8081, https://ops.example.com", NULL};
    assert_int_equal(load(env, &cfg, err), 0);
    assert_int_equal(cfg.ncors, 2);
    assert_string_equal(ps_config_cors_headers(&cfg, "http://127.0.0.1:8081"),
                        "Access-Control-Allow-Origin: http://127.0.0.1:8081\r\nVary: Origin\r\n");
    assert_string_equal(ps_config_cors_headers(&cfg, "HTTPS://OPS.example.com"),
                        "Access-Control-Allow-Origin: https://ops.example.com\r\n"
                        "Vary: Origin\r\n");
    /* Not listed, or no Origin: no permission, but caches are told the answer varies. */
    assert_string_equal(ps_config_cors_headers(&cfg, "http://evil.example"), "Vary: Origin\r\n");
    assert_string_equal(ps_config_cors_headers(&cfg, NULL), "Vary: Origin\r\n");

    const char *any[] = {"PRICE_CORS_ALLOWED_ORIGINS", "*", NULL};
    assert_int_equal(load(any, &cfg, err), 0);
    assert_non_null(
        strstr(ps_config_cors_headers(&cfg, "http://x"), "Access-Control-Allow-Origin: *\r\n"));

    expect_error("PRICE_CORS_ALLOWED_ORIGINS", "http://a/", "PRICE_CORS_ALLOWED_ORIGINS");
    expect_error("PRICE_CORS_ALLOWED_ORIGINS", "a.example", "PRICE_CORS_ALLOWED_ORIGINS");
    expect_error("PRICE_CORS_ALLOWED_ORIGINS", "http://a,,http://b", "PRICE_CORS_ALLOWED_ORIGINS");
    const char *prod[] = {"APP_ENV",
                          "production",
                          "REDIS_URL",
                          "redis://r:6379/0",
                          "DATABASE_URL",
                          "postgresql://db/markets",
                          "PRICE_CORS_ALLOWED_ORIGINS",
                          "*",
                          NULL};
    assert_int_equal(load(prod, &cfg, err), UV_EINVAL);
    assert_non_null(strstr(err, "PRICE_CORS_ALLOWED_ORIGINS"));
}

static void reload_from_file(void **state)
{
    (void)state;
    char path[] = "/tmp/ps-config-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "w");
    fputs("# reloadable\nCACHE_ENABLED=false\nCACHE_TTL_MS=42\nLOG_LEVEL=warn\n"
          "CACHE_REFRESH_AHEAD_PCT=10\nCACHE_STALE_IF_ERROR_MS=5000\n",
          f);
    fclose(f);
    ps_config_t cfg;
    char err[CM_CONFIG_ERROR_MAX];
    assert_int_equal(load(NULL, &cfg, err), 0);
    assert_int_equal(ps_config_reload(path, &cfg, err, sizeof err), 0);
    assert_false(cfg.cache_enabled);
    assert_int_equal(cfg.cache_ttl_ms, 42);
    assert_int_equal(cfg.svc.log_level, CM_LOG_WARN);
    assert_int_equal(cfg.cache_refresh_pct, 10);
    assert_int_equal(cfg.cache_stale_ms, 5000);

    /* A bad value leaves every setting as it was. */
    f = fopen(path, "w");
    fputs("CACHE_ENABLED=true\nCACHE_TTL_MS=abc\n", f);
    fclose(f);
    assert_int_equal(ps_config_reload(path, &cfg, err, sizeof err), UV_EINVAL);
    assert_non_null(strstr(err, "CACHE_TTL_MS"));
    assert_false(cfg.cache_enabled);
    assert_int_equal(cfg.cache_ttl_ms, 42);
    unlink(path);
    assert_true(ps_config_reload(path, &cfg, err, sizeof err) < 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(defaults),
        cmocka_unit_test(values),
        cmocka_unit_test(invalid_values_name_the_variable),
        cmocka_unit_test(production_requires_urls),
        cmocka_unit_test(reload_from_file),
        cmocka_unit_test(cors_allow_list),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
