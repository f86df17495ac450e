#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

#include "cm/pg.h"
#include "cm/redact.h"
#include "cm/redis.h"

static const char *url(const char *in)
{
    static char out[256];
    return cm_redact_url(in, out, sizeof out);
}

static void urls(void **state)
{
    (void)state;
    static const char *const cases[][2] = {
        {"postgresql://user:s3cret@host/db", "postgresql://user:***@host/db"},
        {"postgresql://user:s3cret@host:5432/db?sslmode=require",
         "postgresql://user:***@host:5432/db?sslmode=require"},
        {"postgres://u:p%40ss%3Aword@[::1]:5432/db", "postgres://u:***@[::1]:5432/db"},
        {"redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"},
        {"redis://default:s3cret@r/1", "redis://default:***@r/1"},
        {"postgresql://u@h/db?password=s3cret&sslmode=require", "postgresql://u@h/db?***"},
        {"postgresql://u:@h/db", "postgresql://u:***@h/db"},
        /* No credential: as it is. */
        {"postgresql://postgres@127.0.0.1:5432/markets",
         "postgresql://postgres@127.0.0.1:5432/markets"},
        {"redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"},
        {"unix:///run/redis.sock?db=2", "unix:///run/redis.sock?db=2"},
        {"host=db port=5432 dbname=markets", "host=db port=5432 dbname=markets"},
        /* Not a URI uriparser reads: whatever could be a credential goes. */
        {"postgresql://bob:s3cret@[host/db", "postgresql://***@[host/db"},
        {"postgresql://bob:s3c@ret@h1:5432,h2:5433/db", "postgresql://***@h1:5432,h2:5433/db"},
        {"postgresql://bob:s3 cret@h/db?password=x y", "postgresql://***"},
        {"host=db password=s3cret", "***"},
        {"user:s3cret@host", "***"},
        /* A slash too many: an empty host, and the credentials in the path (fuzz_config). */
        {"redis:///:s3cret@h:6379/0", "redis://***@h:6379/0"},
        {"postgresql:///bob:s3cret@h/db", "postgresql://***@h/db"},
        {"unix:///run/redis@1.sock", "unix:///run/redis@1.sock"},
        /* A '#' or '?' in the credentials ends the authority early (fuzz_config). */
        {"redis://de#ault:s3cret@127.0.0.1:6379/2", "redis://***@127.0.0.1:6379/2"},
        {"postgresql://app?x:s3cret@db/markets", "postgresql://***@db/markets"},
        {"postgresql://h:5432/db?application_name=a@b",
         "postgresql://h:5432/db?application_name=a@b"},
        {"", ""},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
        assert_string_equal(url(cases[i][0]), cases[i][1]);
}

static void small_buffers(void **state)
{
    (void)state;
    char out[12];
    cm_redact_url("postgresql://user:s3cret@host/db", out, sizeof out);
    assert_string_equal(out, "postgresql:");
    cm_redact_url("redis://:s3cret@h/0", out, 9);
    assert_string_equal(out, "redis://");
    cm_redact_url("x", out, 0); /* nothing written */
}

static void messages(void **state)
{
    (void)state;
    char out[256];
    const char *src = "postgresql://bob:s3cret@[host/db";
    cm_redact_message("end of string reached when looking for matching \"]\" in IPv6 host "
                      "address in URI: \"postgresql://bob:s3cret@[host/db\"",
                      src, out, sizeof out);
    assert_string_equal(out, "end of string reached when looking for matching \"]\" in IPv6 host "
                             "address in URI: \"postgresql://***@[host/db\"");
    /* Redacting twice (the check, then the configuration getter) changes nothing more. */
    char again[256];
    cm_redact_message(out, src, again, sizeof again);
    assert_string_equal(again, out);
    /* An option name is a keyword of the source: kept; a token that is not is dropped. */
    cm_redact_message("invalid URI query parameter: \"foo\"", "postgresql://b:pw@h/db?foo=bar", out,
                      sizeof out);
    assert_string_equal(out, "invalid URI query parameter: \"foo\"");
    cm_redact_message("missing \"=\" after \"cret\" in connection info string",
                      "host=h password=s3 cret", out, sizeof out);
    assert_string_equal(out, "missing \"=\" after \"***\" in connection info string");
    /* Only a keyword-shaped token at the start of a source token counts as a keyword. */
    cm_redact_message("invalid connection option \"a:b@h\"", "a:b@h=1", out, sizeof out);
    assert_string_equal(out, "invalid connection option \"***\"");
    cm_redact_message("invalid connection option \"ost\"", "host=h", out, sizeof out);
    assert_string_equal(out, "invalid connection option \"***\"");
    cm_redact_message("invalid connection option \"hots\"", "hots=h port=1", out, sizeof out);
    assert_string_equal(out, "invalid connection option \"hots\"");
    /* The password itself, unquoted, wherever it is. */
    cm_redact_message("cannot use s3cret here", "redis://:s3cret@h/0", out, sizeof out);
    assert_string_equal(out, "cannot use *** here");
    cm_redact_message("bad url redis://:s3cret@h/0 (port)", "redis://:s3cret@h/0", out, sizeof out);
    assert_string_equal(out, "bad url redis://:***@h/0 (port)");
    /* ...also when uriparser cannot read the source: then it is what follows "user:" up to
     * the last '@' (found by fuzz_redact). */
    cm_redact_message("bad \"x\" near s3cret:z", "postgresql://bob:s3cret:z@[h/db", out,
                      sizeof out);
    assert_string_equal(out, "bad \"***\" near ***");
    cm_redact_message("near s3cr@et and s3cr.", "postgresql://bob:s3cr@et@[h/db", out, sizeof out);
    assert_string_equal(out, "near *** and ***.");
    /* A password match stops at a quote of the message: the quoted part is redacted whole. */
    cm_redact_message("option \"pos:x\" bad", "postgresql:/b:s3cret:ion \"pos@h", out, sizeof out);
    assert_string_equal(out, "option \"***\" bad");
    /* A quote the message does not close (it was cut at a line break): redacted to the end
     * (found by fuzz_url). */
    cm_redact_message("invalid percent-encoded token: \"s3cret%0", "postgresql://b:s3cret%0\n@h",
                      out, sizeof out);
    assert_string_equal(out, "invalid percent-encoded token: \"***");
    cm_redact_message("unterminated \"", "host='x", out, sizeof out);
    assert_string_equal(out, "unterminated \"");
    cm_redact_message("at ab", "redis://u:ab@[h", out, sizeof out); /* too short to guess */
    assert_string_equal(out, "at ab");
    cm_redact_message("plain", NULL, out, sizeof out);
    assert_string_equal(out, "plain");
}

/* What the checks say about malformed URLs never holds their password. */
static void checks_do_not_echo_passwords(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "postgresql://bob:s3cret@[host/db",
        "postgresql://bob:s3cret@host/db?foo=bar",
        "postgresql://bob:s3cret@host/db?sslmode",
        "postgresql://bob:s3cret@host/db?a=%zz",
        "postgresql://bob:s3cret@host:99999/db",
        "postgresql://bob:s3cret@[]/db",
        "postgresql://bob:s3cret@host/db?password=s3cret&x=%00",
        "host=h password=s3cret junk",
        "host=h password='s3cret",
        "host=h password=s3cret bogus=1",
        /* A mistyped scheme makes it a key=value string whose first "keyword" (quoted back as
         * an invalid option) is most of the URL (found by fuzz_config). */
        "postgresql:/bob:s3cret@host/db?sslmode=disable",
        "postgres-ql://bob:s3cret@host:5432/db?connect_timeout=5",
        "postgresql//bob:s3cret@host/db?sslmode=require",
        "redis://bob:s3cret@host/0?x=1",
        /* A user, then a '#' left unescaped: the password is in the "fragment" (found by
         * fuzz_config). */
        "redis://d@e#ault:s3cretpassword@127.0.0.1:6379/2",
        /* A '"' in it: libpq quotes it back as it is, quotes included (found by fuzz_config). */
        "C\"postgresql://bob:s3cret@host/db?sslmode=disable",
        "a\"b\"c\"postgresql://bob:s3cret@host/db?sslmode=disable",
        "x\" \"=\" after \"postgresql://bob:s3cret@host/db?sslmode=disable",
        "postgresql://bob:s3cret%0\n/2@db/markets",
        "postgres://bob:s3cret%zz\nx",
        "postgresql:/bob:s3cretpostgresql://pb(:\"post@db/markets?sslmode=require",
        /* The guessed password (after the last ':') is `ion "pos`, which the message holds
         * across the quote that opens the source (found by fuzz_url). */
        "postgresql:/bob:s3cretpostgresql://\x97pw,db\"port5543=5st?gresql:ion \"pos@db/markets"
        "?sslmode=require",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        char why[256];
        assert_int_equal(cm_pg_conninfo_check(bad[i], why, sizeof why), UV_EINVAL);
        assert_null(strstr(why, "s3cret"));
        assert_null(strstr(why, "cret"));
    }
    char why[256];
    assert_int_not_equal(cm_redis_url_check("redis://:s3cret@h:99999/0", why, sizeof why), 0);
    assert_null(strstr(why, "s3cret"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(urls),
        cmocka_unit_test(small_buffers),
        cmocka_unit_test(messages),
        cmocka_unit_test(checks_do_not_echo_passwords),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
