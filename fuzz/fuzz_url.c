/*
 * fuzz_url: the URL and connection-string parsers of the configuration, REDIS_URL
 * (common/src/redis_url.c cm_redis_url_parse, cm_redis_url_check) and DATABASE_URL
 * (common/src/pg_target.c cm_pg_conninfo_check, over libpq's PQconninfoParse). The input, up
 * to its first NUL byte, is the value.
 *
 * Checked: a parsed REDIS_URL is within its contract (TCP: a host and a port 1..65535; unix:
 * an absolute path, port 0; db 0..2^20) and the check agrees with the parser; the DATABASE_URL
 * check agrees with libpq, says why in one NUL-terminated line whatever the buffer, and that
 * line never holds the password of a URL built around the input (as fuzz_redact).
 */
#include "fuzz.h"

#include "cm/buf.h"
#include "cm/pg.h"
#include "cm/redis.h"

#include <libpq-fe.h>
#include <string.h>

#define MARKER "Zq7Xw3Kp"

static void redis_url(const char *s)
{
    cm_redis_url_t u;
    memset(&u, 0x5a, sizeof u);
    int rc = cm_redis_url_parse(s, &u);
    FUZZ_CHECK(rc == 0 || rc == UV_EINVAL);
    char why[128];
    int crc = cm_redis_url_check(s, why, sizeof why);
    FUZZ_CHECK((rc == 0) == (crc == 0));
    if (crc != 0)
        FUZZ_CHECK(strlen(why) < sizeof why && !strchr(why, '\n'));
    if (rc != 0) {
        /* On error nothing of the URL is left in the output (its password least of all). */
        FUZZ_CHECK(u.host[0] == '\0' && u.password[0] == '\0' && u.user[0] == '\0');
        return;
    }
    FUZZ_CHECK(memchr(u.host, '\0', sizeof u.host) && memchr(u.path, '\0', sizeof u.path));
    FUZZ_CHECK(memchr(u.user, '\0', sizeof u.user) && memchr(u.password, '\0', sizeof u.password));
    FUZZ_CHECK(u.db >= 0 && u.db <= (1 << 20));
    if (u.is_unix) {
        FUZZ_CHECK(u.path[0] == '/' && strlen(u.path) >= 2 && u.port == 0 && !u.host[0]);
    } else {
        FUZZ_CHECK(u.host[0] && u.port >= 1 && u.port <= 65535 && !u.path[0]);
    }
    /* A %00 would decode to a NUL that cuts the field ("redis://:pw%00x@h" read with the
     * password "pw"): refused. */
    FUZZ_CHECK(!strstr(s, "%00"));
}

static void pg_conninfo(const char *s)
{
    static const size_t sizes[] = {256, 16, 1};
    char why[256];
    int rc = cm_pg_conninfo_check(s, why, sizeof why);
    char *err = NULL;
    PQconninfoOption *opts = PQconninfoParse(s, &err);
    FUZZ_CHECK(rc == 0 || rc == UV_EINVAL); /* the one refusal code (cm/error.h) */
    FUZZ_CHECK(rc != 0 || opts);            /* accepted means libpq reads it */
    PQconninfoFree(opts);
    PQfreemem(err);
    if (rc == 0)
        return;
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        char small[256];
        memset(small, 'x', sizeof small);
        FUZZ_CHECK(cm_pg_conninfo_check(s, small, sizes[i]) == rc);
        size_t n = strnlen(small, sizes[i]);
        FUZZ_CHECK(n < sizes[i] && !memchr(small, '\n', n));
        if (sizes[i] < sizeof small)
            FUZZ_CHECK(small[sizes[i]] == 'x');
    }
}

/* postgresql://user:MARKER<s>@h/db and key=value forms around the input: what the check says
 * must not show the password. */
static void pg_password(const char *s)
{
    static const char *const forms[][2] = {
        {"postgresql://bob:" MARKER, "@db/markets"},
        {"postgresql:/bob:" MARKER, "@db/markets?sslmode=require"},
        {"postgres://bob:" MARKER, "@h"},
        {"host=db password=" MARKER, ""},
        {"host=db password='" MARKER, "' port=5432"},
    };
    if (strstr(s, MARKER) || strlen(s) > 512)
        return;
    for (size_t i = 0; i < sizeof forms / sizeof *forms; i++) {
        cm_buf_t b = CM_BUF_INIT;
        FUZZ_CHECK(cm_buf_printf(&b, "%s%s%s", forms[i][0], s, forms[i][1]) == 0);
        char why[512];
        if (cm_pg_conninfo_check(b.data, why, sizeof why) != 0)
            FUZZ_CHECK(!strstr(why, MARKER));
        cm_buf_free(&b);
    }
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *s = malloc(size + 1);
    FUZZ_CHECK(s);
    memcpy(s, data, size);
    s[size] = '\0';
    redis_url(s);
    pg_conninfo(s);
    pg_password(s);
    free(s);
    return 0;
}
