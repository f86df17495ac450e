#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <uv.h>

#include "cm/alloc.h"
#include "cm/json.h"
/* Both daemons have a config.h on the tests' include path: name ours by its folder. */
#include "config.h"

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
    char err[CM_CONFIG_ERROR_MAX];
    assert_int_equal(load(kv, &cfg, err, sizeof err), 0);
    assert_string_equal(cfg.svc.listen_host, "0.0.0.0");
    assert_int_equal(cfg.svc.listen_port, 8081);
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
        char err[CM_CONFIG_ERROR_MAX];
        assert_int_equal(load(kv, &cfg, err, sizeof err), UV_EINVAL);
        assert_non_null(strstr(err, cases[i][2]));
        on_config_free(&cfg);
    }
}

static void production_requires_secrets_and_origins(void **state)
{
    (void)state;
    on_config_t cfg;
    char err[CM_CONFIG_ERROR_MAX];
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

/* A production environment with every setting fine, then `key` set to `value`. */
static int load_prod(const char *key, const char *value, on_config_t *cfg, char *err, size_t errsz)
{
    const char *kv[] = {"APP_ENV",
                        "production",
                        "REDIS_URL",
                        "redis://127.0.0.1:6379/0",
                        "DATABASE_URL",
                        "postgresql://x@127.0.0.1/markets",
                        "JWT_SECRET",
                        "9f2c4e7a1b3d5f60718293a4b5c6d7e8f90a1b2c3d4e5f60",
                        "WS_ALLOWED_ORIGINS",
                        "https://app.example",
                        NULL,
                        NULL,
                        NULL};
    int i = 0;
    while (kv[i] && strcmp(kv[i], key) != 0)
        i += 2;
    kv[i] = key;
    kv[i + 1] = value;
    return load(kv, cfg, err, errsz);
}

/* The error names the variable, is one line and never shows the refused secret. */
static void expect_secret_refused(const char *secret, const char *why)
{
    on_config_t cfg;
    char err[CM_CONFIG_ERROR_MAX];
    assert_int_equal(load_prod("JWT_SECRET", secret, &cfg, err, sizeof err), UV_EINVAL);
    assert_true(strncmp(err, "JWT_SECRET: ", 12) == 0);
    assert_non_null(strstr(err, why));
    assert_null(strchr(err, '\n'));
    if (strlen(secret) > 4)
        assert_null(strstr(err, secret));
    on_config_free(&cfg);
}

static void production_refuses_weak_secrets(void **state)
{
    (void)state;
    expect_secret_refused(ON_DEV_JWT_SECRET, "published in the repository");
    expect_secret_refused("change-me-to-32-or-more-random-bytes", "published in the repository");
    expect_secret_refused("change-me-to-32-or-more-random-bytes\n", "published in the repository");
    expect_secret_refused("our-key-CHANGE-ME-0123456789abcdef", "placeholder");
    expect_secret_refused("tiny-key", "too short");
    expect_secret_refused("                                ", "only whitespace");
    expect_secret_refused(" \t\n\r \t\n\r \t\n\r \t\n\r \t\n\r \t\n\r \t\n\r \t\n\r ",
                          "only whitespace");
    expect_secret_refused("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "fewer than 8 distinct");
    expect_secret_refused("abcdefgabcdefgabcdefgabcdefgabcdefg", "fewer than 8 distinct");

    /* 8 distinct bytes and 32 long: enough; what openssl rand -hex 32 prints: fine. */
    on_config_t cfg;
    char err[CM_CONFIG_ERROR_MAX];
    assert_int_equal(
        load_prod("JWT_SECRET", "abcdefghabcdefghabcdefghabcdefgh", &cfg, err, sizeof err), 0);
    on_config_free(&cfg);
    /* Outside production every secret is accepted (tests and the dev stack use public ones). */
    const char *dev[] = {"JWT_SECRET", "change-me-to-32-or-more-random-bytes", NULL};
    assert_int_equal(load(dev, &cfg, err, sizeof err), 0);
    on_config_free(&cfg);
}

static void production_refuses_bad_origins(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "*",
        "https://app.example, *",
        "https://app.example/",
        "https://app.example/path",
        "app.example",
        "null",
        "ftp://app.example",
        "https://user@app.example",
        "https://app.example:0",
        "https://app.example?x=1",
        "https://",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        on_config_t cfg;
        char err[CM_CONFIG_ERROR_MAX];
        assert_int_equal(load_prod("WS_ALLOWED_ORIGINS", bad[i], &cfg, err, sizeof err), UV_EINVAL);
        assert_true(strncmp(err, "WS_ALLOWED_ORIGINS: ", 20) == 0);
        on_config_free(&cfg);
    }
    static const char *const good[] = {
        "https://app.example",
        "http://localhost:8081,http://127.0.0.1:8081",
        "https://APP.example:8443, http://[::1]:8081",
    };
    for (size_t i = 0; i < sizeof good / sizeof *good; i++) {
        on_config_t cfg;
        char err[CM_CONFIG_ERROR_MAX];
        assert_int_equal(load_prod("WS_ALLOWED_ORIGINS", good[i], &cfg, err, sizeof err), 0);
        assert_string_equal(cfg.warning, "");
        on_config_free(&cfg);
    }
}

static void development_warns_about_bad_origins(void **state)
{
    (void)state;
    on_config_t cfg;
    char err[CM_CONFIG_ERROR_MAX];
    const char *kv[] = {"WS_ALLOWED_ORIGINS", "http://localhost:8081/, *", NULL};
    assert_int_equal(load(kv, &cfg, err, sizeof err), 0);
    assert_non_null(strstr(cfg.warning, "WS_ALLOWED_ORIGINS: 'http://localhost:8081/'"));
    assert_true(on_config_origin_allowed(&cfg, "https://any.example")); /* the '*' */
    on_config_free(&cfg);
    const char *star[] = {"WS_ALLOWED_ORIGINS", "*", NULL};
    assert_int_equal(load(star, &cfg, err, sizeof err), 0);
    assert_string_equal(cfg.warning, "");
    on_config_free(&cfg);
}

/* ---- the published secrets, read from the repository's files ------------------------------ */

static char found[64][128];
static int nfound;

static void add_found(const char *v, size_t n)
{
    while (n && (v[n - 1] == '"' || v[n - 1] == '\'' || v[n - 1] == ' ' || v[n - 1] == '\r'))
        n--;
    if (n == 0 || v[0] == '$' || n >= sizeof found[0] || nfound == 64)
        return; /* interpolated (${JWT_SECRET:?...}, $SECRET, "$(openssl ...)") */
    memcpy(found[nfound], v, n);
    found[nfound][n] = '\0';
    nfound++;
}

/* The value after "KEY=" or "KEY: " on a line (quotes stripped), the way env files, compose
 * files, ConfigMap literals and shell scripts write it. */
static void scan_assignment(const char *line, const char *key, int quoted_only)
{
    for (const char *p = strstr(line, key); p; p = strstr(p + 1, key)) {
        if (p > line && (p[-1] == '{' || p[-1] == '$'))
            continue; /* ${JWT_SECRET:?...}: compose's interpolation, not a value */
        const char *v = p + strlen(key);
        if (*v == '"' || *v == '\'')
            v++;
        if (*v == '=' || *v == ':') {
            v++;
            while (*v == ' ')
                v++;
            int quoted = *v == '"' || *v == '\'';
            if (quoted)
                v++;
            else if (quoted_only)
                continue; /* Python: {"JWT_SECRET": SECRET} names a variable */
            add_found(v, strcspn(v, " \"'\n#,)"));
        }
    }
}

static int text_file(const char *name)
{
    static const char *const ends[] = {".yaml", ".yml", ".env.example", ".py", ".sh", ".md"};
    size_t n = strlen(name);
    for (size_t i = 0; i < sizeof ends / sizeof *ends; i++) {
        size_t e = strlen(ends[i]);
        if (n >= e && strcmp(name + n - e, ends[i]) == 0)
            return 1;
    }
    return strcmp(name, "run") == 0 || strcmp(name, "dev") == 0; /* scripts without a suffix */
}

static void scan_file(const char *path)
{
    size_t plen = strlen(path);
    int python = plen > 3 && strcmp(path + plen - 3, ".py") == 0;
    FILE *f = fopen(path, "r");
    if (!f)
        return;
    char line[1024], prev[1024] = "";
    while (fgets(line, sizeof line, f)) {
        scan_assignment(line, "JWT_SECRET", python);
        /* Python and shell: SECRET = "..." / DEV_SECRET = "..." / SECRET=... */
        const char *s = line + strspn(line, " ");
        size_t w = strspn(s, "ABCDEFGHIJKLMNOPQRSTUVWXYZ_");
        if (w >= 6 && strncmp(s + w - 6, "SECRET", 6) == 0) {
            char key[64];
            snprintf(key, sizeof key, "%.*s", (int)w, s);
            const char *v = s + w + strspn(s + w, " ");
            if (*v == '=' && v[1] != '=') {
                v++;
                v += strspn(v, " ");
                int quoted = *v == '"' || *v == '\'';
                if (quoted)
                    v++;
                /* In Python an unquoted value is an expression (secrets.token_hex(32)). */
                if (quoted || !python)
                    add_found(v, strcspn(v, " \"'\n#"));
            }
        }
        /* Kubernetes: "- name: JWT_SECRET" then "value: ..." on the next line. */
        const char *val = strstr(line, "value:");
        if (val && strstr(prev, "name: JWT_SECRET")) {
            val += 6;
            val += strspn(val, " ");
            if (*val == '"' || *val == '\'')
                val++;
            add_found(val, strcspn(val, " \"'\n#"));
        }
        snprintf(prev, sizeof prev, "%s", line);
    }
    fclose(f);
}

static void scan_dir(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return;
    struct dirent *e;
    while ((e = readdir(d))) {
        const char *n = e->d_name;
        /* Not the repository's files: build output, installed npm packages, the dev stack. */
        if (n[0] == '.' && strcmp(n, ".env.example") != 0)
            continue;
        if (strncmp(n, "build", 5) == 0 || strcmp(n, "node_modules") == 0)
            continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, n);
        struct stat st;
        if (stat(path, &st) != 0)
            continue;
        if (S_ISDIR(st.st_mode))
            scan_dir(path);
        else if (S_ISREG(st.st_mode) && text_file(n))
            scan_file(path);
    }
    closedir(d);
}

static void public_secrets_are_refused(void **state)
{
    (void)state;
    nfound = 0;
    scan_dir(MARKETS_SOURCE_DIR);
    /* The scan works: it finds the example file's value and the tests' own. */
    int example = 0, e2e = 0;
    for (int i = 0; i < nfound; i++) {
        example |= strcmp(found[i], "change-me-to-32-or-more-random-bytes") == 0;
        e2e |= strcmp(found[i], "e2e-secret-for-the-order-notifier-tests") == 0;
    }
    assert_true(example);
    assert_true(e2e);
    for (int i = 0; i < nfound; i++) {
        int listed = 0;
        for (const char *const *k = on_config_public_secrets; *k; k++)
            listed |= strcmp(*k, found[i]) == 0;
        if (!listed)
            fail_msg("JWT secret '%s' is published in the repository but missing from "
                     "on_config_public_secrets (order-notifier/config.c)",
                     found[i]);
        expect_secret_refused(found[i], "published in the repository");
    }
}

int main(void)
{
    cm_json_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(defaults),
        cmocka_unit_test(bad_values_name_the_variable),
        cmocka_unit_test(production_requires_secrets_and_origins),
        cmocka_unit_test(production_refuses_weak_secrets),
        cmocka_unit_test(production_refuses_bad_origins),
        cmocka_unit_test(development_warns_about_bad_origins),
        cmocka_unit_test(public_secrets_are_refused),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    return rc || cm_alloc_live() != 0;
}
