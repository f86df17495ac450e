#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "cm/alloc.h"
#include "cm/config.h"
#include "cm/json.h"

/* ------------------------------------------------------------------------------------------ */
/* Fixtures: an injected environment and temporary files                                      */
/* ------------------------------------------------------------------------------------------ */

/* NULL-terminated key, value, key, value... */
static const char *table_lookup(const char *key, void *ud)
{
    const char *const *kv = ud;
    for (; kv[0]; kv += 2) {
        if (strcmp(kv[0], key) == 0)
            return kv[1];
    }
    return NULL;
}

static long live_at_start;

static int setup(void **state)
{
    (void)state;
    live_at_start = cm_alloc_live();
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    cm_alloc_fail_after(0);
    assert_int_equal(cm_alloc_live(), live_at_start);
    return 0;
}

/* Writes `text` to a new temporary file; the path goes into path (PATH_MAX-ish buffer). */
static void write_temp(char *path, size_t pathsz, const char *text)
{
    snprintf(path, pathsz, "/tmp/cm_config_test_XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    size_t len = strlen(text);
    assert_int_equal(write(fd, text, len), (ssize_t)len);
    close(fd);
}

/* ------------------------------------------------------------------------------------------ */
/* Getters                                                                                     */
/* ------------------------------------------------------------------------------------------ */

static void str_values(void **state)
{
    (void)state;
    const char *env[] = {"A", "value with spaces ", "EMPTY", "", NULL};
    cm_config_t c;
    cm_config_init(&c, table_lookup, env);
    const char *s;
    assert_int_equal(cm_config_str(&c, "A", "d", &s), 0);
    assert_string_equal(s, "value with spaces "); /* strings are taken as written */
    assert_int_equal(cm_config_str(&c, "EMPTY", "d", &s), 0);
    assert_string_equal(s, "d");
    assert_int_equal(cm_config_str(&c, "ABSENT", "d", &s), 0);
    assert_string_equal(s, "d");
    assert_int_equal(cm_config_str(&c, "ABSENT", NULL, &s), 0);
    assert_null(s);
    assert_false(c.failed);
    assert_string_equal(c.error, "");
}

static void bool_values(void **state)
{
    (void)state;
    const char *env[] = {"T1", "true", "T2",  "YES", "T3", " On ", "T4", "1", "F1", "False", "F2",
                         "no", "F3",   "OFF", "F4",  "0",  "E",    "",   "W", "  ", NULL};
    cm_config_t c;
    cm_config_init(&c, table_lookup, env);
    int v;
    const char *truthy[] = {"T1", "T2", "T3", "T4"};
    const char *falsy[] = {"F1", "F2", "F3", "F4"};
    for (int i = 0; i < 4; i++) {
        assert_int_equal(cm_config_bool(&c, truthy[i], 0, &v), 0);
        assert_int_equal(v, 1);
        assert_int_equal(cm_config_bool(&c, falsy[i], 1, &v), 0);
        assert_int_equal(v, 0);
    }
    assert_int_equal(cm_config_bool(&c, "E", 1, &v), 0);
    assert_int_equal(v, 1);
    assert_int_equal(cm_config_bool(&c, "W", 0, &v), 0); /* only whitespace: the default */
    assert_int_equal(v, 0);
    assert_int_equal(cm_config_bool(&c, "ABSENT", 7, &v), 0);
    assert_int_equal(v, 1);
    assert_false(c.failed);
}

static void bool_invalid_names_variable(void **state)
{
    (void)state;
    const char *env[] = {"CACHE_ENABLED", "maybe", "OTHER", "2", NULL};
    cm_config_t c;
    cm_config_init(&c, table_lookup, env);
    int v = -1;
    assert_int_equal(cm_config_bool(&c, "CACHE_ENABLED", 1, &v), UV_EINVAL);
    assert_int_equal(v, 1); /* the default, so the caller can carry on and report at the end */
    assert_true(c.failed);
    assert_string_equal(c.error, "CACHE_ENABLED: expected true or false (or 1/0, yes/no, on/off), "
                                 "got 'maybe'");
    /* Only the first error is kept. */
    assert_int_equal(cm_config_bool(&c, "OTHER", 0, &v), UV_EINVAL);
    assert_int_equal(v, 0);
    assert_string_equal(c.error, "CACHE_ENABLED: expected true or false (or 1/0, yes/no, on/off), "
                                 "got 'maybe'");
}

static void int_values(void **state)
{
    (void)state;
    const char *env[] = {"A", "1000", "B", " 42\t", "C",     "+7",    "D",   "-5", "E",
                         "",  "MIN",  "1", "MAX",   "60000", "ZEROS", "007", NULL};
    cm_config_t c;
    cm_config_init(&c, table_lookup, env);
    long v;
    assert_int_equal(cm_config_int(&c, "A", 1, 1, 60000, &v), 0);
    assert_int_equal(v, 1000);
    assert_int_equal(cm_config_int(&c, "B", 1, 1, 60000, &v), 0);
    assert_int_equal(v, 42);
    assert_int_equal(cm_config_int(&c, "C", 1, 1, 60000, &v), 0);
    assert_int_equal(v, 7);
    assert_int_equal(cm_config_int(&c, "D", 0, -10, 10, &v), 0);
    assert_int_equal(v, -5);
    assert_int_equal(cm_config_int(&c, "E", 1000, 1, 60000, &v), 0);
    assert_int_equal(v, 1000);
    assert_int_equal(cm_config_int(&c, "ABSENT", 100, 1, 60000, &v), 0);
    assert_int_equal(v, 100);
    assert_int_equal(cm_config_int(&c, "MIN", 5, 1, 60000, &v), 0);
    assert_int_equal(v, 1);
    assert_int_equal(cm_config_int(&c, "MAX", 5, 1, 60000, &v), 0);
    assert_int_equal(v, 60000);
    assert_int_equal(cm_config_int(&c, "ZEROS", 5, 1, 60000, &v), 0); /* decimal, not octal */
    assert_int_equal(v, 7);
    assert_false(c.failed);
}

static void expect_int_error(const char *value, long min, long max, const char *message)
{
    const char *env[] = {"CACHE_TTL_MS", value, NULL};
    cm_config_t c;
    cm_config_init(&c, table_lookup, env);
    long v = 0;
    assert_int_equal(cm_config_int(&c, "CACHE_TTL_MS", 1000, min, max, &v), UV_EINVAL);
    assert_int_equal(v, 1000);
    assert_true(c.failed);
    assert_string_equal(c.error, message);
}

static void int_invalid_and_out_of_range(void **state)
{
    (void)state;
    expect_int_error("abc", 1, 60000,
                     "CACHE_TTL_MS: expected an integer from 1 to 60000, got 'abc'");
    expect_int_error("0", 1, 60000, "CACHE_TTL_MS: expected an integer from 1 to 60000, got '0'");
    expect_int_error("60001", 1, 60000,
                     "CACHE_TTL_MS: expected an integer from 1 to 60000, got '60001'");
    expect_int_error("-1", 1, 60000, "CACHE_TTL_MS: expected an integer from 1 to 60000, got '-1'");
    expect_int_error("0x10", 1, 60000,
                     "CACHE_TTL_MS: expected an integer from 1 to 60000, got '0x10'");
    expect_int_error("1e3", 1, 60000,
                     "CACHE_TTL_MS: expected an integer from 1 to 60000, got '1e3'");
    expect_int_error("12ms", 1, 60000,
                     "CACHE_TTL_MS: expected an integer from 1 to 60000, got '12ms'");
    expect_int_error("1 2", 1, 60000,
                     "CACHE_TTL_MS: expected an integer from 1 to 60000, got '1 2'");
    expect_int_error("-", 1, 60000, "CACHE_TTL_MS: expected an integer from 1 to 60000, got '-'");
    expect_int_error("99999999999999999999", 1, 60000,
                     "CACHE_TTL_MS: expected an integer from 1 to 60000, "
                     "got '99999999999999999999'");
    /* The full long range parses exactly; one past it overflows. */
    const char *env[] = {"A", "9223372036854775807", "B", "-9223372036854775808",
                         "C", "9223372036854775808", NULL};
    cm_config_t c;
    cm_config_init(&c, table_lookup, env);
    long v;
    assert_int_equal(cm_config_int(&c, "A", 0, LONG_MIN, LONG_MAX, &v), 0);
    assert_true(v == LONG_MAX);
    assert_int_equal(cm_config_int(&c, "B", 0, LONG_MIN, LONG_MAX, &v), 0);
    assert_true(v == LONG_MIN);
    assert_int_equal(cm_config_int(&c, "C", 0, LONG_MIN, LONG_MAX, &v), UV_EINVAL);
}

static void error_message_is_one_line(void **state)
{
    (void)state;
    char long_value[300];
    memset(long_value, '9', sizeof long_value - 1);
    long_value[sizeof long_value - 1] = '\0';
    const char *env[] = {"A", "1\n2\x1b", "B", long_value, NULL};
    cm_config_t c;
    cm_config_init(&c, table_lookup, env);
    long v;
    assert_int_equal(cm_config_int(&c, "A", 1, 1, 10, &v), UV_EINVAL);
    assert_string_equal(c.error, "A: expected an integer from 1 to 10, got '1?2?'");
    cm_config_init(&c, table_lookup, env);
    assert_int_equal(cm_config_int(&c, "B", 1, 1, 10, &v), UV_EINVAL);
    assert_non_null(strstr(c.error, "9999...'"));
    assert_true(strlen(c.error) < 120);
}

static void enum_values(void **state)
{
    (void)state;
    static const char *const levels[] = {"debug", "info", "warn", "error", NULL};
    const char *env[] = {"LOG_LEVEL", "warn", "BAD", "verbose", "CASE", "INFO", NULL};
    cm_config_t c;
    cm_config_init(&c, table_lookup, env);
    int i;
    assert_int_equal(cm_config_enum(&c, "LOG_LEVEL", "info", levels, &i), 0);
    assert_int_equal(i, 2);
    assert_int_equal(cm_config_enum(&c, "ABSENT", "info", levels, &i), 0);
    assert_int_equal(i, 1);
    assert_false(c.failed);
    assert_int_equal(cm_config_enum(&c, "BAD", "info", levels, &i), UV_EINVAL);
    assert_int_equal(i, 1);
    assert_string_equal(c.error, "BAD: expected one of debug, info, warn, error, got 'verbose'");
    cm_config_init(&c, table_lookup, env);
    assert_int_equal(cm_config_enum(&c, "CASE", "info", levels, &i), UV_EINVAL);
    /* A default outside the list is a programming error, reported at startup too. */
    cm_config_init(&c, table_lookup, env);
    assert_int_equal(cm_config_enum(&c, "ABSENT", "trace", levels, &i), UV_EINVAL);
    assert_string_equal(c.error, "ABSENT: default 'trace' is not an allowed value");
}

static void listen_values(void **state)
{
    (void)state;
    const char *env[] = {"A", "127.0.0.1:9000",    "B", "[::1]:8443",
                         "C", "localhost:1",       "D", " example.internal:65535 ",
                         "E", "[fe80::1%eth0]:80", NULL};
    cm_config_t c;
    cm_config_init(&c, table_lookup, env);
    char host[64];
    int port;
    assert_int_equal(cm_config_listen(&c, "ABSENT", "0.0.0.0:8080", host, sizeof host, &port), 0);
    assert_string_equal(host, "0.0.0.0");
    assert_int_equal(port, 8080);
    assert_int_equal(cm_config_listen(&c, "A", "0.0.0.0:8080", host, sizeof host, &port), 0);
    assert_string_equal(host, "127.0.0.1");
    assert_int_equal(port, 9000);
    assert_int_equal(cm_config_listen(&c, "B", "0.0.0.0:8080", host, sizeof host, &port), 0);
    assert_string_equal(host, "::1");
    assert_int_equal(port, 8443);
    assert_int_equal(cm_config_listen(&c, "C", "0.0.0.0:8080", host, sizeof host, &port), 0);
    assert_string_equal(host, "localhost");
    assert_int_equal(port, 1);
    assert_int_equal(cm_config_listen(&c, "D", "0.0.0.0:8080", host, sizeof host, &port), 0);
    assert_string_equal(host, "example.internal");
    assert_int_equal(port, 65535);
    assert_int_equal(cm_config_listen(&c, "E", "0.0.0.0:8080", host, sizeof host, &port), 0);
    assert_string_equal(host, "fe80::1%eth0");
    assert_false(c.failed);
}

static void expect_listen_error(const char *value, int allow_zero)
{
    const char *env[] = {"PRICE_SERVICE_LISTEN", value, NULL};
    cm_config_t c;
    cm_config_init(&c, table_lookup, env);
    c.allow_port_zero = allow_zero;
    char host[16];
    int port;
    assert_int_equal(
        cm_config_listen(&c, "PRICE_SERVICE_LISTEN", "0.0.0.0:8080", host, sizeof host, &port),
        UV_EINVAL);
    assert_string_equal(host, "0.0.0.0");
    assert_int_equal(port, 8080);
    char want[200];
    snprintf(want, sizeof want,
             "PRICE_SERVICE_LISTEN: expected host:port or [ipv6]:port with a port from %d to "
             "65535, got '%s'",
             allow_zero ? 0 : 1, value);
    assert_string_equal(c.error, want);
}

static void listen_invalid(void **state)
{
    (void)state;
    expect_listen_error("0.0.0.0:70000", 0);
    expect_listen_error("0.0.0.0:65536", 1);
    expect_listen_error("0.0.0.0:0", 0);
    expect_listen_error("0.0.0.0", 0);
    expect_listen_error(":8080", 0);
    expect_listen_error("0.0.0.0:", 0);
    expect_listen_error("0.0.0.0:80x", 0);
    expect_listen_error("0.0.0.0:-1", 0);
    expect_listen_error("::1:8080", 0);
    expect_listen_error("[::1]8080", 0);
    expect_listen_error("[::1]", 0);
    expect_listen_error("[]:80", 0);
    expect_listen_error("a b:80", 0);
    expect_listen_error("http://x:80", 0);
    expect_listen_error("a-very-long-hostname.example:80", 0); /* does not fit host[16] */

    /* Port 0 (ephemeral) only when the caller allows it. */
    const char *env[] = {"L", "127.0.0.1:0", NULL};
    cm_config_t c;
    cm_config_init(&c, table_lookup, env);
    c.allow_port_zero = 1;
    char host[16];
    int port = -1;
    assert_int_equal(cm_config_listen(&c, "L", "0.0.0.0:8080", host, sizeof host, &port), 0);
    assert_int_equal(port, 0);
}

static void list_values(void **state)
{
    (void)state;
    const char *env[] = {"A",     " https://a.example , https://b.example,c ",
                         "ONE",   "x",
                         "BAD",   "a,,b",
                         "TRAIL", "a,",
                         "E",     "",
                         NULL};
    cm_config_t c;
    cm_config_init(&c, table_lookup, env);
    char **items;
    size_t n;
    assert_int_equal(cm_config_list(&c, "A", "*", &items, &n), 0);
    assert_int_equal(n, 3);
    assert_string_equal(items[0], "https://a.example");
    assert_string_equal(items[1], "https://b.example");
    assert_string_equal(items[2], "c");
    cm_config_list_free(items, n);
    assert_int_equal(cm_config_list(&c, "ONE", "*", &items, &n), 0);
    assert_int_equal(n, 1);
    assert_string_equal(items[0], "x");
    cm_config_list_free(items, n);
    assert_int_equal(cm_config_list(&c, "E", "*", &items, &n), 0);
    assert_int_equal(n, 1);
    assert_string_equal(items[0], "*");
    cm_config_list_free(items, n);
    assert_int_equal(cm_config_list(&c, "ABSENT", NULL, &items, &n), 0);
    assert_int_equal(n, 0);
    assert_null(items);
    cm_config_list_free(items, n);
    assert_false(c.failed);

    assert_int_equal(cm_config_list(&c, "BAD", "*", &items, &n), UV_EINVAL);
    assert_string_equal(c.error,
                        "BAD: expected a comma-separated list without empty items, got 'a,,b'");
    assert_int_equal(n, 1); /* the default */
    assert_string_equal(items[0], "*");
    cm_config_list_free(items, n);
    cm_config_init(&c, table_lookup, env);
    assert_int_equal(cm_config_list(&c, "TRAIL", NULL, &items, &n), UV_EINVAL);
    assert_int_equal(n, 0);
    cm_config_list_free(items, n);
}

static void list_out_of_memory(void **state)
{
    (void)state;
    const char *env[] = {"A", "a,b,c", NULL};
    for (long k = 1; k <= 4; k++) {
        cm_config_t c;
        cm_config_init(&c, table_lookup, env);
        char **items;
        size_t n;
        cm_alloc_fail_after(k);
        int rc = cm_config_list(&c, "A", NULL, &items, &n);
        cm_alloc_fail_after(0);
        assert_int_equal(rc, UV_ENOMEM);
        assert_string_equal(c.error, "A: out of memory");
        cm_config_list_free(items, n);
    }
}

static void environment_lookup(void **state)
{
    (void)state;
    setenv("CM_CONFIG_TEST_TTL", "250", 1);
    cm_config_t c;
    cm_config_init_env(&c);
    long v;
    assert_int_equal(cm_config_int(&c, "CM_CONFIG_TEST_TTL", 1000, 1, 60000, &v), 0);
    assert_int_equal(v, 250);
    unsetenv("CM_CONFIG_TEST_TTL");
    assert_int_equal(cm_config_int(&c, "CM_CONFIG_TEST_TTL", 1000, 1, 60000, &v), 0);
    assert_int_equal(v, 1000);
}

/* ------------------------------------------------------------------------------------------ */
/* KEY=VALUE file                                                                              */
/* ------------------------------------------------------------------------------------------ */

static void file_format(void **state)
{
    (void)state;
    char path[64];
    write_temp(path, sizeof path,
               "# reloadable settings\n"
               "\n"
               "CACHE_ENABLED=false\n"
               "  CACHE_TTL_MS = 250  \r\n"
               "LOG_LEVEL=\"debug\"\n"
               "QUOTED=\"  spaced # not a comment \"\n"
               "EMPTY=\n"
               "\t# indented comment\n"
               "URL=redis://h:1/0?a=b\n"
               "CACHE_TTL_MS=300\n"
               "LAST=no-newline");
    cm_config_file_t *f = NULL;
    char err[128];
    assert_int_equal(cm_config_file_load(path, &f, err, sizeof err), 0);
    unlink(path);
    assert_non_null(f);
    assert_string_equal(cm_config_file_get(f, "CACHE_ENABLED"), "false");
    assert_string_equal(cm_config_file_get(f, "CACHE_TTL_MS"), "300"); /* the last line wins */
    assert_string_equal(cm_config_file_get(f, "LOG_LEVEL"), "debug");
    assert_string_equal(cm_config_file_get(f, "QUOTED"), "  spaced # not a comment ");
    assert_string_equal(cm_config_file_get(f, "EMPTY"), "");
    assert_string_equal(cm_config_file_get(f, "URL"), "redis://h:1/0?a=b");
    assert_string_equal(cm_config_file_get(f, "LAST"), "no-newline");
    assert_null(cm_config_file_get(f, "ABSENT"));
    assert_null(cm_config_file_get(NULL, "ABSENT"));
    cm_config_file_free(f);
    cm_config_file_free(NULL);
}

static void expect_file_error(const char *text, const char *where_why)
{
    char path[64];
    write_temp(path, sizeof path, text);
    cm_config_file_t *f = (cm_config_file_t *)1;
    char err[256];
    assert_int_equal(cm_config_file_load(path, &f, err, sizeof err), UV_EINVAL);
    assert_null(f);
    char want[256];
    snprintf(want, sizeof want, "%s:%s", path, where_why);
    unlink(path);
    assert_string_equal(err, want);
}

static void file_errors(void **state)
{
    (void)state;
    expect_file_error("A=1\n# ok\nNOT A SETTING\n", "3: expected KEY=VALUE");
    expect_file_error("=1\n", "1: invalid key (expected letters, digits and '_', not starting "
                              "with a digit)");
    expect_file_error("1A=1\n", "1: invalid key (expected letters, digits and '_', not "
                                "starting with a digit)");
    expect_file_error("export A=1\n", "1: invalid key (expected letters, digits and '_', not "
                                      "starting with a digit)");
    expect_file_error("A=1\nB=\"open\n", "2: unterminated double quote");
    expect_file_error("A=\"x\" y\n", "1: text after the closing double quote");
    expect_file_error("A=\"\n", "1: unterminated double quote");
    char nul[] = "A=1\nB=x\0y\n";
    char path[64];
    snprintf(path, sizeof path, "/tmp/cm_config_test_XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, nul, sizeof nul - 1), (ssize_t)(sizeof nul - 1));
    close(fd);
    cm_config_file_t *f;
    char err[128];
    assert_int_equal(cm_config_file_load(path, &f, err, sizeof err), UV_EINVAL);
    char want[128];
    snprintf(want, sizeof want, "%s:2: NUL byte", path);
    assert_string_equal(err, want);
    unlink(path);
}

static void file_missing(void **state)
{
    (void)state;
    cm_config_file_t *f;
    char err[128];
    assert_int_equal(cm_config_file_load("/nonexistent/cm.env", &f, err, sizeof err), UV_ENOENT);
    assert_null(f);
    assert_string_equal(err, "/nonexistent/cm.env: No such file or directory");
    /* No error buffer is fine too. */
    assert_int_equal(cm_config_file_load("/nonexistent/cm.env", &f, NULL, 0), UV_ENOENT);
}

static void file_out_of_memory(void **state)
{
    (void)state;
    char path[64];
    write_temp(path, sizeof path, "A=1\nB=2\nA=3\n");
    /* Every allocation of the load in turn fails cleanly (the teardown checks for leaks). */
    for (long k = 1; k < 20; k++) {
        cm_config_file_t *f;
        char err[128];
        cm_alloc_fail_after(k);
        int rc = cm_config_file_load(path, &f, err, sizeof err);
        cm_alloc_fail_after(0);
        if (rc == 0) {
            assert_string_equal(cm_config_file_get(f, "A"), "3");
            cm_config_file_free(f);
            break;
        }
        assert_int_equal(rc, UV_ENOMEM);
        assert_null(f);
    }
    unlink(path);
}

static void file_overrides_env(void **state)
{
    (void)state;
    char path[64];
    write_temp(path, sizeof path,
               "CACHE_TTL_MS=250\nCACHE_ENABLED=\nLOG_LEVEL=debug\n"
               "PRICE_SERVICE_LISTEN=0.0.0.0:1\nBAD=abc\n");
    cm_config_file_t *f;
    assert_int_equal(cm_config_file_load(path, &f, NULL, 0), 0);
    unlink(path);
    const char *env[] = {
        "CACHE_TTL_MS", "1000", "CACHE_ENABLED", "off", "LOG_LEVEL", "info", "PRICE_SERVICE_LISTEN",
        "0.0.0.0:8080", NULL};
    cm_config_t c;
    cm_config_init(&c, table_lookup, env);
    c.file = f;
    long ttl;
    int on;
    assert_int_equal(cm_config_int(&c, "CACHE_TTL_MS", 1, 1, 60000, &ttl), 0);
    assert_int_equal(ttl, 250);
    assert_int_equal(cm_config_bool(&c, "CACHE_ENABLED", 1, &on), 0);
    assert_int_equal(on, 0); /* an empty file value does not hide the environment */
    char host[32];
    int port;
    assert_int_equal(
        cm_config_listen(&c, "PRICE_SERVICE_LISTEN", "0.0.0.0:80", host, sizeof host, &port), 0);
    assert_int_equal(port, 1);
    /* A value from the file is validated and named like one from the environment. */
    assert_int_equal(cm_config_int(&c, "BAD", 1, 1, 10, &ttl), UV_EINVAL);
    assert_string_equal(c.error, "BAD: expected an integer from 1 to 10, got 'abc'");

    /* With an allow-list, only the reloadable keys come from the file. */
    static const char *const reloadable[] = {"CACHE_ENABLED", "CACHE_TTL_MS", "LOG_LEVEL", NULL};
    cm_config_init(&c, table_lookup, env);
    c.file = f;
    c.file_keys = reloadable;
    assert_int_equal(cm_config_int(&c, "CACHE_TTL_MS", 1, 1, 60000, &ttl), 0);
    assert_int_equal(ttl, 250);
    const char *level;
    assert_int_equal(cm_config_str(&c, "LOG_LEVEL", "info", &level), 0);
    assert_string_equal(level, "debug");
    assert_int_equal(
        cm_config_listen(&c, "PRICE_SERVICE_LISTEN", "0.0.0.0:80", host, sizeof host, &port), 0);
    assert_int_equal(port, 8080);
    assert_false(c.failed);
    cm_config_file_free(f);
}

/* ---- shared settings: APP_ENV, checked strings, CONFIG_FILE ------------------------------ */

static int check_prefix(const char *value, char *why, size_t whysz)
{
    if (strncmp(value, "redis://", 8) == 0)
        return 0;
    snprintf(why, whysz, "expected redis://...");
    return -1;
}

static void checked_settings(void **state)
{
    (void)state;
    const char *dev[] = {NULL};
    cm_config_t c;
    const char *out;
    cm_config_init(&c, table_lookup, (void *)dev);
    cm_config_app_env(&c);
    assert_false(c.production);
    assert_int_equal(cm_config_checked(&c, "REDIS_URL", "redis://dev", check_prefix, &out), 0);
    assert_string_equal(out, "redis://dev");

    const char *prod[] = {"APP_ENV", "production", NULL};
    cm_config_init(&c, table_lookup, (void *)prod);
    cm_config_app_env(&c);
    assert_true(c.production);
    assert_int_equal(cm_config_checked(&c, "REDIS_URL", "redis://dev", check_prefix, &out),
                     UV_EINVAL);
    assert_string_equal(c.error, "REDIS_URL: required when APP_ENV=production");

    const char *bad[] = {"REDIS_URL", "http://x", NULL};
    cm_config_init(&c, table_lookup, (void *)bad);
    assert_int_equal(cm_config_checked(&c, "REDIS_URL", "redis://dev", check_prefix, &out),
                     UV_EINVAL);
    assert_string_equal(c.error, "REDIS_URL: expected redis://...");
    /* The first error is kept. */
    assert_int_equal(cm_config_reject(&c, "OTHER", "nope"), UV_EINVAL);
    assert_string_equal(c.error, "REDIS_URL: expected redis://...");
}

/* A check that quotes the value back, as libpq's parser does. */
static int check_echo(const char *value, char *why, size_t whysz)
{
    snprintf(why, whysz, "cannot read '%s'", value);
    return -1;
}

static void checked_errors_hide_passwords(void **state)
{
    (void)state;
    const char *kv[] = {"DATABASE_URL", "postgresql://app:s3cret@db:5432/markets", NULL};
    cm_config_t c;
    const char *out;
    cm_config_init(&c, table_lookup, (void *)kv);
    assert_int_equal(cm_config_checked(&c, "DATABASE_URL", NULL, check_echo, &out), UV_EINVAL);
    assert_string_equal(c.error,
                        "DATABASE_URL: cannot read 'postgresql://app:***@db:5432/markets'");
    const char *redis[] = {"REDIS_URL", "redis://:s3cret@[r:6379/0", NULL};
    cm_config_init(&c, table_lookup, (void *)redis);
    assert_int_equal(cm_config_checked(&c, "REDIS_URL", NULL, check_echo, &out), UV_EINVAL);
    assert_string_equal(c.error, "REDIS_URL: cannot read 'redis://***@[r:6379/0'");
}

/* What a check says goes into c->error as one line too, even when it quotes a value with a
 * line break or an escape in it (libpq does; found by fuzz_config). */
static void checked_errors_are_one_line(void **state)
{
    (void)state;
    const char *kv[] = {"DATABASE_URL", "host=db\ndbname=x\x1b[2J", NULL};
    cm_config_t c;
    const char *out;
    cm_config_init(&c, table_lookup, (void *)kv);
    assert_int_equal(cm_config_checked(&c, "DATABASE_URL", NULL, check_echo, &out), UV_EINVAL);
    assert_string_equal(c.error, "DATABASE_URL: cannot read 'host=db?dbname=x?[2J'");
    cm_config_init(&c, table_lookup, (void *)kv);
    assert_int_equal(cm_config_reject(&c, "K", "a\rb\x7f"), UV_EINVAL);
    assert_string_equal(c.error, "K: a?b?");
}

static void weak_secrets(void **state)
{
    (void)state;
    static const char *const known[] = {"published-example-value-0123456789", NULL};
    char why[160];
    static const char *const cases[][2] = {
        {"published-example-value-0123456789", "published in the repository"},
        {"  published-example-value-0123456789\n", "published in the repository"},
        {"xChangeMe-0123456789abcdefghijklmn", "placeholder"},
        {"0123456789abcdef", "too short: expected at least 32 bytes"},
        {"                                    ", "only whitespace"},
        {"\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t", "only whitespace"},
        {"abababababababababababababababab", "fewer than 8 distinct bytes"},
        {"abcdefgabcdefgabcdefgabcdefgabcd", "fewer than 8 distinct bytes"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        assert_int_equal(cm_config_weak_secret(cases[i][0], 32, known, why, sizeof why), UV_EINVAL);
        assert_non_null(strstr(why, cases[i][1]));
        assert_null(strstr(why, cases[i][0]));
    }
    assert_int_equal(
        cm_config_weak_secret("abcdefghabcdefghabcdefghabcdefgh", 32, known, why, sizeof why), 0);
    assert_int_equal(
        cm_config_weak_secret("9f2c4e7a1b3d5f60718293a4b5c6d7e8", 32, NULL, why, sizeof why), 0);
}

/* The documented limit is 1 MiB: a file of 1.5 MiB used to load (the check ran on the buffer's
 * size before it doubled, so up to 2 MiB passed). */
static void file_size_limit(void **state)
{
    (void)state;
    static const size_t sizes[] = {1024 * 1024, 1024 * 1024 + 1, 1536 * 1024, 3 * 1024 * 1024};
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        char *text = malloc(sizes[i] + 1);
        assert_non_null(text);
        memset(text, '#', sizes[i]);
        text[sizes[i]] = '\0';
        char path[256], err[200];
        write_temp(path, sizeof path, text);
        free(text);
        cm_config_file_t *f = NULL;
        int rc = cm_config_file_load(path, &f, err, sizeof err);
        if (sizes[i] <= 1024 * 1024) {
            assert_int_equal(rc, 0);
            cm_config_file_free(f);
        } else {
            assert_int_equal(rc, UV_EFBIG);
            assert_non_null(strstr(err, "larger than 1048576 bytes"));
            assert_null(f);
        }
        unlink(path);
    }
}

static void use_file_from_environment(void **state)
{
    (void)state;
    char path[256];
    write_temp(path, sizeof path, "CACHE_TTL_MS=5\n");
    static const char *const reloadable[] = {"CACHE_TTL_MS", "LOG_LEVEL", NULL};
    setenv("CONFIG_FILE", path, 1);
    setenv("CM_TEST_TTL", "7", 1);
    cm_config_t c;
    cm_config_init_env(&c);
    assert_int_equal(cm_config_use_file(&c, reloadable), 0);
    long ttl;
    const char *url;
    assert_int_equal(cm_config_int(&c, "CACHE_TTL_MS", 1000, 1, 60000, &ttl), 0);
    assert_int_equal(ttl, 5);
    cm_config_str(&c, "REDIS_URL", "redis://env-default", &url); /* not in the file: env */
    assert_string_equal(url, getenv("REDIS_URL") ? getenv("REDIS_URL") : "redis://env-default");
    cm_config_release(&c);
    unlink(path);

    /* A key the file may not set (read at start-up only), or a typo, is an error naming it:
     * it used to be ignored without a word. */
    /* A long key is quoted in part, so the explanation is never cut off (found by
     * fuzz_config). */
    char long_key[400];
    memset(long_key, 'K', 300);
    snprintf(long_key + 300, sizeof long_key - 300, "=5\n");
    const char *const bad[] = {"CACHE_TTL_MS=5\nREDIS_URL=redis://file\n", "CACHE_TLL_MS=5\n",
                               long_key};
    static const char *const named[] = {"REDIS_URL is not a key this file can set (it can set "
                                        "CACHE_TTL_MS, LOG_LEVEL)",
                                        "CACHE_TLL_MS is not a key",
                                        "KKKKKKKK... is not a key this file can set (it can set "
                                        "CACHE_TTL_MS, LOG_LEVEL)"};
    for (size_t i = 0; i < 3; i++) {
        write_temp(path, sizeof path, bad[i]);
        setenv("CONFIG_FILE", path, 1);
        cm_config_init_env(&c);
        assert_int_equal(cm_config_use_file(&c, reloadable), UV_EINVAL);
        assert_true(c.failed);
        assert_non_null(strstr(c.error, "CONFIG_FILE: "));
        assert_non_null(strstr(c.error, named[i]));
        cm_config_release(&c);
        unlink(path);
    }

    /* A long path too is shown in part; the explanation stays whole (the adversarial run: a
     * 215-byte path cut it to "TYPO_KEY is not a key this"). */
    write_temp(path, sizeof path, long_key);
    char long_path[1200];
    int n = snprintf(long_path, sizeof long_path, "/tmp/");
    for (int i = 0; i < 300; i++)
        n += snprintf(long_path + n, sizeof long_path - (size_t)n, "./");
    snprintf(long_path + n, sizeof long_path - (size_t)n, "%s", path + 5);
    setenv("CONFIG_FILE", long_path, 1);
    cm_config_init_env(&c);
    assert_int_equal(cm_config_use_file(&c, reloadable), UV_EINVAL);
    if (!strstr(c.error, "/./.") || !strstr(c.error, "...: KKKK") || strlen(c.error) > 460)
        fail_msg("%s", c.error);
    const char *tail =
        "KKKK... is not a key this file can set (it can set CACHE_TTL_MS, LOG_LEVEL)";
    assert_non_null(strstr(c.error, tail));
    assert_string_equal(c.error + strlen(c.error) - strlen(tail), tail);
    cm_config_release(&c);
    unlink(path);

    /* A FIFO would block the loop on SIGHUP: refused without reading. */
    char fifo[] = "/tmp/cm-config-fifo-XXXXXX";
    int tfd = mkstemp(fifo);
    assert_true(tfd >= 0);
    close(tfd);
    unlink(fifo);
    assert_int_equal(mkfifo(fifo, 0600), 0);
    setenv("CONFIG_FILE", fifo, 1);
    cm_config_init_env(&c);
    assert_int_equal(cm_config_use_file(&c, reloadable), UV_EINVAL);
    assert_non_null(strstr(c.error, "not a regular file"));
    cm_config_release(&c);
    unlink(fifo);

    setenv("CONFIG_FILE", "/nonexistent/markets.conf", 1);
    cm_config_init_env(&c);
    assert_int_equal(cm_config_use_file(&c, reloadable), UV_EINVAL);
    assert_non_null(strstr(c.error, "CONFIG_FILE: "));
    cm_config_release(&c);
    unsetenv("CONFIG_FILE");
}

int main(void)
{
    cm_json_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(str_values, setup, teardown),
        cmocka_unit_test_setup_teardown(bool_values, setup, teardown),
        cmocka_unit_test_setup_teardown(bool_invalid_names_variable, setup, teardown),
        cmocka_unit_test_setup_teardown(int_values, setup, teardown),
        cmocka_unit_test_setup_teardown(int_invalid_and_out_of_range, setup, teardown),
        cmocka_unit_test_setup_teardown(error_message_is_one_line, setup, teardown),
        cmocka_unit_test_setup_teardown(enum_values, setup, teardown),
        cmocka_unit_test_setup_teardown(listen_values, setup, teardown),
        cmocka_unit_test_setup_teardown(listen_invalid, setup, teardown),
        cmocka_unit_test_setup_teardown(list_values, setup, teardown),
        cmocka_unit_test_setup_teardown(list_out_of_memory, setup, teardown),
        cmocka_unit_test_setup_teardown(environment_lookup, setup, teardown),
        cmocka_unit_test_setup_teardown(file_format, setup, teardown),
        cmocka_unit_test_setup_teardown(file_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(file_missing, setup, teardown),
        cmocka_unit_test_setup_teardown(file_out_of_memory, setup, teardown),
        cmocka_unit_test_setup_teardown(file_overrides_env, setup, teardown),
        cmocka_unit_test_setup_teardown(checked_settings, setup, teardown),
        cmocka_unit_test_setup_teardown(checked_errors_hide_passwords, setup, teardown),
        cmocka_unit_test_setup_teardown(checked_errors_are_one_line, setup, teardown),
        cmocka_unit_test_setup_teardown(weak_secrets, setup, teardown),
        cmocka_unit_test_setup_teardown(file_size_limit, setup, teardown),
        cmocka_unit_test_setup_teardown(use_file_from_environment, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
