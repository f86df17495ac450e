/*
 * cm/service: its pure parts. The shared settings (defaults, the daemon's listen key, errors
 * naming the variable, LOG_LEVEL for reloads), the readiness body and the configuration
 * checks of cm_service_new. The endpoints over a socket are covered end to end.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

/* The statics under test (ready_body). */
#include "service_routes.c"

/* A fake environment: NULL-terminated KEY, VALUE pairs. */
static const char *lookup(const char *key, void *ud)
{
    const char *const *kv = ud;
    for (; kv && kv[0]; kv += 2)
        if (strcmp(kv[0], key) == 0)
            return kv[1];
    return NULL;
}

static int load(const char *const *env, cm_service_settings_t *out, cm_config_t *c)
{
    cm_config_init(c, lookup, (void *)env);
    return cm_service_settings_load(c, "X_LISTEN", "0.0.0.0:8080", out);
}

static void settings_defaults(void **state)
{
    (void)state;
    cm_config_t c;
    cm_service_settings_t s;
    assert_int_equal(load(NULL, &s, &c), 0);
    assert_false(s.production);
    assert_string_equal(s.listen_host, "0.0.0.0");
    assert_int_equal(s.listen_port, 8080);
    assert_string_equal(s.redis.url, "redis://127.0.0.1:6379/0");
    assert_string_equal(s.database_url, "postgresql://postgres@127.0.0.1:5432/markets");
    assert_int_equal(s.redis_timeout_ms, 100);
    assert_int_equal(s.log_level, CM_LOG_INFO);
    assert_int_equal(s.log_format, CM_LOG_JSON);
    assert_null(s.config_file);
}

static void settings_from_env(void **state)
{
    (void)state;
    const char *env[] = {
        "X_LISTEN",   "127.0.0.1:9000", "REDIS_TIMEOUT_MS", "250",         "LOG_LEVEL", "debug",
        "LOG_FORMAT", "text",           "CONFIG_FILE",      "/etc/x.conf", NULL};
    cm_config_t c;
    cm_service_settings_t s;
    assert_int_equal(load(env, &s, &c), 0);
    assert_string_equal(s.listen_host, "127.0.0.1");
    assert_int_equal(s.listen_port, 9000);
    assert_int_equal(s.redis_timeout_ms, 250);
    assert_int_equal(s.log_level, CM_LOG_DEBUG);
    assert_int_equal(s.log_format, CM_LOG_TEXT);
    assert_string_equal(s.config_file, "/etc/x.conf");
}

static void settings_errors_name_the_key(void **state)
{
    (void)state;
    static const char *const cases[][3] = {
        {"X_LISTEN", "127.0.0.1:70000", "X_LISTEN"},
        {"REDIS_TIMEOUT_MS", "0", "REDIS_TIMEOUT_MS"},
        {"LOG_LEVEL", "loud", "LOG_LEVEL"},
        {"LOG_FORMAT", "xml", "LOG_FORMAT"},
        {"APP_ENV", "Production", "APP_ENV"},
        {"DATABASE_URL", "host=db port=abc", "DATABASE_URL"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *env[] = {cases[i][0], cases[i][1], NULL};
        cm_config_t c;
        cm_service_settings_t s;
        assert_int_equal(load(env, &s, &c), UV_EINVAL);
        assert_non_null(strstr(c.error, cases[i][2]));
    }
}

static void production_requires_urls(void **state)
{
    (void)state;
    const char *env[] = {"APP_ENV", "production", NULL};
    cm_config_t c;
    cm_service_settings_t s;
    assert_int_equal(load(env, &s, &c), UV_EINVAL);
    assert_true(s.production);
    assert_non_null(strstr(c.error, "required when APP_ENV=production"));
}

static void log_level_for_reloads(void **state)
{
    (void)state;
    const char *env[] = {"LOG_LEVEL", "warn", NULL};
    cm_config_t c;
    cm_config_init(&c, lookup, (void *)env);
    cm_log_level_t level = CM_LOG_DEBUG;
    assert_int_equal(cm_service_log_level(&c, &level), 0);
    assert_int_equal(level, CM_LOG_WARN);
    const char *bad[] = {"LOG_LEVEL", "shouting", NULL};
    cm_config_init(&c, lookup, (void *)bad);
    assert_int_equal(cm_service_log_level(&c, &level), UV_EINVAL);
    assert_int_equal(level, CM_LOG_WARN); /* untouched */
}

/* ---- the readiness body --------------------------------------------------------------- */

static int fake_ready(cJSON *body, void *ud)
{
    const int *up = ud;
    cJSON_AddStringToObject(body, "origin", *up ? "up" : "down");
    return *up;
}

static char *ready_text(cm_service_t *s, int *ready)
{
    cJSON *o = ready_body(s, ready);
    assert_non_null(o);
    char *text = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return text;
}

static void readiness_body(void **state)
{
    (void)state;
    int up = 1, ready;
    cm_service_t s = {0};
    s.cfg.ready = fake_ready;
    s.cfg.not_ready = "not_ready";
    s.cfg.ud = &up;

    char *t = ready_text(&s, &ready);
    assert_true(ready);
    assert_string_equal(t, "{\"status\":\"ready\",\"origin\":\"up\"}");
    cJSON_free(t);

    up = 0;
    t = ready_text(&s, &ready);
    assert_false(ready);
    assert_string_equal(t, "{\"status\":\"not_ready\",\"origin\":\"down\"}");
    cJSON_free(t);

    /* Stopping is never ready, whatever the daemon says. */
    up = 1;
    s.stopping = 1;
    s.cfg.not_ready = "unavailable";
    t = ready_text(&s, &ready);
    assert_false(ready);
    assert_string_equal(t, "{\"status\":\"unavailable\",\"origin\":\"up\"}");
    cJSON_free(t);
}

/* ---- cm_service_new ------------------------------------------------------------------- */

static cm_redis_t *no_redis(void *ud)
{
    (void)ud;
    return NULL;
}

static void stopped(void *ud)
{
    (void)ud;
}

static void new_checks_required_fields(void **state)
{
    (void)state;
    uv_loop_t loop;
    assert_int_equal(uv_loop_init(&loop), 0);
    cm_service_settings_t settings = {.listen_host = "127.0.0.1"};
    cm_service_config_t cfg = {
        .name = "test",
        .settings = &settings,
        .ready = fake_ready,
        .not_ready = "not_ready",
        .health_redis = no_redis,
        .oom_code = "internal",
        .on_stopped = stopped,
    };
    cm_service_t *s = (cm_service_t *)&cfg; /* set to NULL on failure */
    cm_service_config_t bad = cfg;
    bad.ready = NULL;
    assert_int_equal(cm_service_new(&loop, &bad, &s), UV_EINVAL);
    assert_null(s);
    bad = cfg;
    bad.on_stopped = NULL;
    assert_int_equal(cm_service_new(&loop, &bad, &s), UV_EINVAL);

    assert_int_equal(cm_service_new(&loop, &cfg, &s), 0);
    assert_non_null(cm_service_metrics(s));
    assert_false(cm_service_stopping(s));
    /* Before start there is nothing to stop or close: both are no-ops. */
    cm_service_stop(s);
    cm_service_close(s);
    assert_false(cm_service_stopping(s));
    assert_int_equal(cm_service_route(s, CM_ROUTE_GET, "/own", NULL, NULL), UV_EINVAL);
    for (int i = 0; i < SERVICE_MAX_MIRRORED; i++)
        assert_int_equal(cm_service_mirror_redis(s, NULL), 0);
    assert_int_equal(cm_service_mirror_redis(s, NULL), UV_ENOSPC);
    cm_service_free(s);
    assert_int_equal(uv_run(&loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(uv_loop_close(&loop), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(settings_defaults),
        cmocka_unit_test(settings_from_env),
        cmocka_unit_test(settings_errors_name_the_key),
        cmocka_unit_test(production_requires_urls),
        cmocka_unit_test(log_level_for_reloads),
        cmocka_unit_test(readiness_body),
        cmocka_unit_test(new_checks_required_fields),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
