/*
 * fuzz_config: common/src/config.c. The input is a CONFIG_FILE (KEY=VALUE lines), loaded from
 * a memfd (cm_config_file_load and cm_config_use_file, the daemons' path); every value in it
 * then goes through every getter: cm_config_str/bool/int/enum/listen/list/checked (with the
 * REDIS_URL and DATABASE_URL checks) and cm_config_weak_secret.
 *
 * Checked beyond the sanitizers: the file reads as its documented grammar says (a reference
 * parser below: same keys, same values, the same first bad line); a getter's output is its
 * default on error and within its contract otherwise; c->error is one NUL-terminated line that
 * names the key and, when a checked value carries a password, does not show it.
 */
#include "fuzz.h"

#include "cm/alloc.h"
#include "cm/config.h"
#include "cm/json.h"
#include "cm/pg.h"
#include "cm/redis.h"

#include <limits.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* ---- the reference reading of the file -------------------------------------------------- */

#define REF_MAX 64

typedef struct ref {
    char *key[REF_MAX];
    char *value[REF_MAX];
    size_t n;
    unsigned bad_line; /* first malformed line (1-based), 0 when none */
    int overflow;      /* more distinct keys than REF_MAX */
} ref_t;

static int ws(char ch)
{
    return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n' || ch == '\v' || ch == '\f';
}

static void ref_put(ref_t *r, const char *k, size_t kl, const char *v, size_t vl)
{
    for (size_t i = 0; i < r->n; i++) {
        if (strlen(r->key[i]) == kl && memcmp(r->key[i], k, kl) == 0) {
            free(r->value[i]);
            r->value[i] = strndup(v, vl);
            return;
        }
    }
    if (r->n == REF_MAX) {
        r->overflow = 1;
        return;
    }
    r->key[r->n] = strndup(k, kl);
    r->value[r->n] = strndup(v, vl);
    r->n++;
}

/* The format as cm/config.h documents it, line by line. */
static void ref_parse(ref_t *r, const char *d, size_t n)
{
    memset(r, 0, sizeof *r);
    unsigned line = 0;
    size_t pos = 0;
    while (pos < n) {
        line++;
        size_t end = pos;
        while (end < n && d[end] != '\n')
            end++;
        const char *s = d + pos, *e = d + end;
        pos = end + 1;
        if (memchr(s, '\0', (size_t)(e - s))) {
            r->bad_line = line;
            return;
        }
        while (s < e && ws(*s))
            s++;
        while (e > s && ws(e[-1]))
            e--;
        if (s == e || *s == '#')
            continue;
        const char *eq = memchr(s, '=', (size_t)(e - s));
        if (!eq) {
            r->bad_line = line;
            return;
        }
        const char *ks = s, *ke = eq;
        while (ke > ks && ws(ke[-1]))
            ke--;
        int key_ok = ke > ks && !(*ks >= '0' && *ks <= '9');
        for (const char *k = ks; k < ke && key_ok; k++)
            key_ok = (*k >= 'a' && *k <= 'z') || (*k >= 'A' && *k <= 'Z') ||
                     (*k >= '0' && *k <= '9') || *k == '_';
        if (!key_ok) {
            r->bad_line = line;
            return;
        }
        const char *vs = eq + 1, *ve = e;
        while (vs < ve && ws(*vs))
            vs++;
        if (vs < ve && *vs == '"') {
            const char *close = memchr(vs + 1, '"', (size_t)(ve - vs - 1));
            if (!close || close != ve - 1) {
                r->bad_line = line;
                return;
            }
            vs++;
            ve--;
        }
        ref_put(r, ks, (size_t)(ke - ks), vs, (size_t)(ve - vs));
    }
}

static void ref_free(ref_t *r)
{
    for (size_t i = 0; i < r->n; i++) {
        free(r->key[i]);
        free(r->value[i]);
    }
}

/* ---- getters ---------------------------------------------------------------------------- */

/* c->error: NUL-terminated, one line, printable (the startup message contract). */
static void check_error(const cm_config_t *c, const char *key)
{
    size_t n = strnlen(c->error, sizeof c->error);
    FUZZ_CHECK(n < sizeof c->error);
    if (!c->failed) {
        FUZZ_CHECK(n == 0);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)c->error[i];
        FUZZ_CHECK(ch >= 0x20 && ch != 0x7f);
    }
    if (key && strlen(key) + 2 < sizeof c->error)
        FUZZ_CHECK(strncmp(c->error, key, strlen(key)) == 0 && c->error[strlen(key)] == ':');
}

static const char *no_env(const char *key, void *ud)
{
    (void)key;
    (void)ud;
    return NULL;
}

static int trimmed_empty(const char *v)
{
    while (*v && ws(*v))
        v++;
    return *v == '\0';
}

/* Non-zero when what `check` says about `value` with its 8 bytes at `off` changed still holds
 * `pw`: then pw is in the parser's own words ("paramete" of libpq's "invalid URI query
 * parameter"), not taken from the value. */
static int in_fixed_words(cm_config_check_fn check, const char *value, ptrdiff_t off,
                          const char *pw)
{
    size_t n = strlen(value);
    char *alt = malloc(n + 1);
    FUZZ_CHECK(alt);
    memcpy(alt, value, n + 1);
    memcpy(alt + off, "QxQxQxQx", 8);
    char why[512] = "";
    check(alt, why, sizeof why);
    free(alt);
    return strstr(why, pw) != NULL;
}

static void getters(cm_config_file_t *f, const char *key, const char *value)
{
    cm_config_t c;
    int rc;

    cm_config_init(&c, no_env, NULL);
    c.file = f;
    const char *s;
    FUZZ_CHECK(cm_config_str(&c, key, "dflt", &s) == 0);
    FUZZ_CHECK(strcmp(s, *value ? value : "dflt") == 0);

    cm_config_init(&c, no_env, NULL);
    c.file = f;
    int b = 7;
    rc = cm_config_bool(&c, key, 1, &b);
    FUZZ_CHECK(b == 0 || b == 1);
    if (rc != 0)
        FUZZ_CHECK(b == 1 && c.failed);
    check_error(&c, key);

    static const long ranges[][2] = {{1, 60000}, {LONG_MIN, LONG_MAX}, {-5, 5}, {0, 0}};
    for (size_t i = 0; i < sizeof ranges / sizeof *ranges; i++) {
        cm_config_init(&c, no_env, NULL);
        c.file = f;
        long v;
        rc = cm_config_int(&c, key, ranges[i][0], ranges[i][0], ranges[i][1], &v);
        FUZZ_CHECK(v >= ranges[i][0] && v <= ranges[i][1]);
        if (rc != 0)
            FUZZ_CHECK(v == ranges[i][0]);
        else if (!trimmed_empty(value)) {
            /* Accepted: the whole trimmed value is the decimal number. */
            char buf[32];
            snprintf(buf, sizeof buf, "%ld", v);
            const char *p = value;
            while (ws(*p))
                p++;
            if (*p == '+')
                p++;
            FUZZ_CHECK(strtol(p, NULL, 10) == v);
        }
        check_error(&c, key);
    }

    static const char *const levels[] = {"debug", "info", "warn", "error", NULL};
    cm_config_init(&c, no_env, NULL);
    c.file = f;
    int idx = -1;
    rc = cm_config_enum(&c, key, "info", levels, &idx);
    FUZZ_CHECK(idx >= 0 && idx <= 3);
    if (rc != 0)
        FUZZ_CHECK(idx == 1);
    check_error(&c, key);

    static const size_t hostsz[] = {256, 8, 1, 0};
    for (size_t i = 0; i < sizeof hostsz / sizeof *hostsz; i++) {
        for (int zero = 0; zero < 2; zero++) {
            cm_config_init(&c, no_env, NULL);
            c.file = f;
            c.allow_port_zero = zero;
            char host[256];
            memset(host, 'x', sizeof host);
            int port = -1;
            rc = cm_config_listen(&c, key, "0.0.0.0:8080", host, hostsz[i], &port);
            check_error(&c, key);
            if (hostsz[i] < 8) {
                FUZZ_CHECK(rc != 0); /* not even the default fits */
                continue;
            }
            FUZZ_CHECK(strlen(host) < hostsz[i] && host[0] != '\0');
            FUZZ_CHECK(port >= (zero ? 0 : 1) && port <= 65535);
            if (rc != 0)
                FUZZ_CHECK(strcmp(host, "0.0.0.0") == 0 && port == 8080);
        }
    }

    cm_config_init(&c, no_env, NULL);
    c.file = f;
    char **items = NULL;
    size_t count = 0;
    rc = cm_config_list(&c, key, "a, b", &items, &count);
    FUZZ_CHECK(rc == 0 || rc == UV_EINVAL || rc == UV_ENOMEM);
    for (size_t i = 0; i < count; i++) {
        size_t n = strlen(items[i]);
        FUZZ_CHECK(n > 0 && !strchr(items[i], ',') && !ws(items[i][0]) && !ws(items[i][n - 1]));
    }
    if (rc == UV_EINVAL)
        FUZZ_CHECK(count == 2 && strcmp(items[0], "a") == 0 && strcmp(items[1], "b") == 0);
    cm_config_list_free(items, count);
    check_error(&c, key);

    /* URL checks: whatever they say, the message must not show a password. */
    static const cm_config_check_fn checks[] = {cm_redis_url_check, cm_pg_conninfo_check};
    for (size_t i = 0; i < 2; i++) {
        for (int prod = 0; prod < 2; prod++) {
            cm_config_init(&c, no_env, NULL);
            c.file = f;
            c.production = prod;
            const char *out = NULL;
            rc = cm_config_checked(&c, key, "redis://127.0.0.1:6379", checks[i], &out);
            check_error(&c, key);
            if (rc == 0)
                FUZZ_CHECK(out && checks[i](out, (char[64]){0}, 64) == 0);
            if (rc != 0 && *value) {
                /* A password-looking part between "://user:" and "@" must not show: the
                 * userinfo, or where it is in a URL with slashes too many ("x:///u:pw@h"). */
                const char *sep = strstr(value, "://");
                const char *ui = sep ? sep + 3 : NULL;
                while (ui && *ui == '/')
                    ui++;
                const char *at = ui ? strrchr(ui, '@') : NULL;
                const char *colon = at ? memchr(ui, ':', (size_t)(at - ui)) : NULL;
                if (colon && memchr(ui, '/', (size_t)(colon - ui)))
                    colon = NULL; /* in the path, past a host: a database name */
                if (colon && at - colon > 8) {
                    char pw[16];
                    memcpy(pw, colon + 1, 8);
                    pw[8] = '\0';
                    /* ...when it is plain text and only there (a copy of it elsewhere in
                     * the value may show legitimately). */
                    const char *first = strstr(value, pw);
                    int plain = !strpbrk(pw, "/?#@[]%\"\\ ") && first == colon + 1 &&
                                !strstr(first + 1, pw);
                    /* (and not in the check's own words: "[user:password@]") */
                    static char stock[2][192];
                    if (!stock[i][0])
                        checks[i]("x", stock[i], sizeof stock[i]);
                    if (plain && !strstr(stock[i], pw) && !strstr(key, pw) &&
                        !in_fixed_words(checks[i], value, colon + 1 - value, pw))
                        FUZZ_CHECK(!strstr(c.error, pw));
                }
            }
        }
    }

    char why[96];
    rc = cm_config_weak_secret(value, 16, (const char *const[]){"dev-secret", NULL}, why,
                               sizeof why);
    FUZZ_CHECK(rc == 0 || rc == UV_EINVAL);
    if (rc == 0)
        FUZZ_CHECK(strlen(value) >= 16);
    else /* never quotes the value (a long one could not be in the fixed phrases) */
        FUZZ_CHECK(strlen(why) < sizeof why && (strlen(value) < 12 || !strstr(why, value)));
}

/* ---- the target ------------------------------------------------------------------------- */

static int memfd = -1;
static char path[64];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    cm_json_init();
    fuzz_quiet_logs();
    memfd = memfd_create("fuzz-config", MFD_CLOEXEC);
    FUZZ_CHECK(memfd >= 0);
    snprintf(path, sizeof path, "/proc/self/fd/%d", memfd);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    long live = cm_alloc_live();
    FUZZ_CHECK(ftruncate(memfd, 0) == 0);
    FUZZ_CHECK(pwrite(memfd, data, size, 0) == (ssize_t)size);

    ref_t ref;
    ref_parse(&ref, (const char *)data, size);

    cm_config_file_t *f = NULL;
    char err[200];
    int rc = cm_config_file_load(path, &f, err, sizeof err);
    if (ref.bad_line) {
        FUZZ_CHECK(rc == UV_EINVAL && f == NULL);
        char want[96];
        snprintf(want, sizeof want, "%s:%u: ", path, ref.bad_line);
        FUZZ_CHECK(strncmp(err, want, strlen(want)) == 0);
        FUZZ_CHECK(!strchr(err, '\n'));
    } else {
        FUZZ_CHECK(rc == 0 && f != NULL);
        for (size_t i = 0; i < ref.n; i++) {
            const char *v = cm_config_file_get(f, ref.key[i]);
            FUZZ_CHECK(v && strcmp(v, ref.value[i]) == 0);
        }
        for (size_t i = 0; i < ref.n && i < 4; i++)
            getters(f, ref.key[i], ref.value[i]);
    }
    cm_config_file_free(f);

    /* The daemons' way: CONFIG_FILE names it, limited to reloadable keys. */
    static const char *const reloadable[] = {"CACHE_TTL_MS", "LOG_LEVEL", NULL};
    setenv("CONFIG_FILE", path, 1);
    cm_config_t c;
    cm_config_init(&c, no_env, NULL);
    rc = cm_config_use_file(&c, reloadable);
    /* Refused: a bad line, or a key the file may not set (a typo, a start-up-only key). */
    int foreign = 0;
    for (size_t i = 0; i < ref.n; i++)
        foreign |= strcmp(ref.key[i], "CACHE_TTL_MS") != 0 && strcmp(ref.key[i], "LOG_LEVEL") != 0;
    FUZZ_CHECK((rc == 0) == (ref.bad_line == 0 && !foreign));
    if (rc != 0 && !ref.bad_line)
        FUZZ_CHECK(strstr(c.error, " is not a key this file can set (it can set CACHE_TTL_MS, "
                                   "LOG_LEVEL)") != NULL);
    check_error(&c, rc ? "CONFIG_FILE" : NULL);
    long ttl;
    cm_config_int(&c, "CACHE_TTL_MS", 1000, 1, 60000, &ttl);
    const char *other;
    cm_config_str(&c, ref.n ? ref.key[0] : "X", NULL, &other);
    int reloadable_key =
        ref.n && (strcmp(ref.key[0], "CACHE_TTL_MS") == 0 || strcmp(ref.key[0], "LOG_LEVEL") == 0);
    if (!reloadable_key)
        FUZZ_CHECK(other == NULL); /* the file may not override what is not reloadable */
    cm_config_release(&c);
    unsetenv("CONFIG_FILE");

    ref_free(&ref);
    FUZZ_CHECK(cm_alloc_live() == live);
    return 0;
}
