#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>
#include <uv.h>

#include "cm/alloc.h"
/* Both daemons have a config.h on the tests' include path: name ours by its folder. */
#include "../../order-notifier/config.h"

/* A fake environment: NULL-terminated key/value pairs. */
static const char *lookup(const char *key, void *ud)
{
    const char *const *kv = ud;
    for (; kv[0]; kv += 2)
        if (strcmp(kv[0], key) == 0)
            return kv[1];
    return NULL;
}

static int load(const char *const *kv, on_config_t *cfg, char *err, size_t errsz)
{
    cm_config_t c;
    cm_config_init(&c, lookup, (void *)kv);
    int rc = on_config_load(&c, cfg);
    snprintf(err, errsz, "%s", c.error);
    return rc;
}

static void defaults(void **state)
{
    (void)state;
    const char *kv[] = {NULL};
    on_config_t cfg;
    char err[256];
    assert_int_equal(load(kv, &cfg, err, sizeof err), 0);
    assert_string_equal(cfg.listen_host, "0.0.0.0");
    assert_int_equal(cfg.listen_port, 8081);
    assert_string_equal(cfg.pg_channel, "order_events");
    assert_true(cfg.jwt_secret_is_dev);
    assert_int_equal(cfg.ws_max_connections, 10000);
    assert_int_equal(cfg.ws_send_queue_max, 1048576);
    assert_int_equal(cfg.ws_ping_interval_ms, 25000);
    assert_true(on_config_origin_allowed(&cfg, "https://anything.example"));
    assert_true(on_config_origin_allowed(&cfg, NULL));
    on_config_free(&cfg);
}

static void bad_values_name_the_variable(void **state)
{
    (void)state;
    static const char *const cases[][3] = {
        {"PG_CHANNEL", "orders;drop", "PG_CHANNEL"},
        {"PG_CHANNEL", "1abc", "PG_CHANNEL"},
        {"WS_MAX_CONNECTIONS", "abc", "WS_MAX_CONNECTIONS"},
        {"WS_PING_INTERVAL_MS", "5", "WS_PING_INTERVAL_MS"},
        {"ORDER_NOTIFIER_LISTEN", "127.0.0.1:70000", "ORDER_NOTIFIER_LISTEN"},
        {"REDIS_URL", "http://x", "REDIS_URL"},
        {"LOG_LEVEL", "loud", "LOG_LEVEL"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        const char *kv[] = {cases[i][0], cases[i][1], NULL};
        on_config_t cfg;
        char err[256];
        assert_int_equal(load(kv, &cfg, err, sizeof err), UV_EINVAL);
        assert_non_null(strstr(err, cases[i][2]));
        on_config_free(&cfg);
    }
}

static void production_requires_secrets_and_origins(void **state)
{
    (void)state;
    on_config_t cfg;
    char err[256];
    const char *none[] = {"APP_ENV",
                          "production",
                          "REDIS_URL",
                          "redis://127.0.0.1:6379/0",
                          "DATABASE_URL",
                          "postgresql://x@127.0.0.1/markets",
                          NULL};
    assert_int_equal(load(none, &cfg, err, sizeof err), UV_EINVAL);
    assert_non_null(strstr(err, "JWT_SECRET"));
    on_config_free(&cfg);
    const char *weak[] = {"APP_ENV",
                          "production",
                          "REDIS_URL",
                          "redis://127.0.0.1:6379/0",
                          "DATABASE_URL",
                          "postgresql://x@127.0.0.1/markets",
                          "JWT_SECRET",
                          "short",
                          NULL};
    assert_int_equal(load(weak, &cfg, err, sizeof err), UV_EINVAL);
    assert_non_null(strstr(err, "JWT_SECRET"));
    on_config_free(&cfg);
    const char *no_origins[] = {"APP_ENV",
                                "production",
                                "REDIS_URL",
                                "redis://127.0.0.1:6379/0",
                                "DATABASE_URL",
                                "postgresql://x@127.0.0.1/markets",
                                "JWT_SECRET",
                                "0123456789abcdef0123456789abcdef",
                                NULL};
    assert_int_equal(load(no_origins, &cfg, err, sizeof err), UV_EINVAL);
    assert_non_null(strstr(err, "WS_ALLOWED_ORIGINS"));
    on_config_free(&cfg);
    const char *ok[] = {"APP_ENV",
                        "production",
                        "REDIS_URL",
                        "redis://127.0.0.1:6379/0",
                        "DATABASE_URL",
                        "postgresql://x@127.0.0.1/markets",
                        "JWT_SECRET",
                        "0123456789abcdef0123456789abcdef",
                        "WS_ALLOWED_ORIGINS",
                        "https://app.example, https://ops.example",
                        NULL};
    assert_int_equal(load(ok, &cfg, err, sizeof err), 0);
    assert_false(cfg.jwt_secret_is_dev);
    assert_true(on_config_origin_allowed(&cfg, "https://ops.example"));
    assert_true(on_config_origin_allowed(&cfg, "HTTPS://APP.EXAMPLE"));
    assert_false(on_config_origin_allowed(&cfg, "https://evil.example"));
    assert_false(on_config_origin_allowed(&cfg, "null"));
    on_config_free(&cfg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(defaults),
        cmocka_unit_test(bad_values_name_the_variable),
        cmocka_unit_test(production_requires_secrets_and_origins),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    return rc || cm_alloc_live() != 0;
}
