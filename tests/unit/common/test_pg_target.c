#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>
#include <uv.h>

#include "cm/pg.h"

/* Values libpq reads only when it connects are checked at start-up: a DATABASE_URL with
 * sslmode=bogus used to pass, and the daemon then retried a connection that could never be
 * made, forever. */
static void enumerated_values_checked(void **state)
{
    (void)state;
    char why[256];
    static const char *const good[] = {
        "postgresql://u@h/db",
        "postgresql://u@h/db?sslmode=verify-full",
        "postgresql://u@h1:1,h2:2/db?target_session_attrs=read-write",
        "host=h dbname=d sslmode=disable gssencmode=disable channel_binding=prefer",
        "postgresql://u@h/db?sslmode=",
        "postgresql://u:p%40ss@h/db",   /* an '@' in the password, written %40 */
        "host=/run/post@gres dbname=d", /* a socket directory may hold one */
    };
    for (size_t i = 0; i < sizeof good / sizeof *good; i++)
        assert_int_equal(cm_pg_conninfo_check(good[i], why, sizeof why), 0);
    static const struct {
        const char *conninfo, *why;
    } bad[] = {
        {"postgresql://u:secret@h/db?sslmode=bogus",
         "sslmode must be one of disable, allow, prefer, require, verify-ca, verify-full"},
        {"postgresql://u@h/db?target_session_attrs=rw",
         "target_session_attrs must be one of any, read-write, read-only, primary, standby, "
         "prefer-standby"},
        {"host=h gssencmode=yes", "gssencmode must be one of disable, prefer, require"},
        {"host=h channel_binding=on", "channel_binding must be one of disable, prefer, require"},
        /* The password's '@' not escaped: the rest of it would be the host, printed back in
         * every connect error (the adversarial run). */
        {"postgresql://u:sec@secret@127.0.0.1:5432/db",
         "a host name holds '@' (an '@' in the user or password must be written %40)"},
        {"host=h1,sec@secret port=1,2",
         "a host name holds '@' (an '@' in the user or password must be written %40)"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        assert_int_equal(cm_pg_conninfo_check(bad[i].conninfo, why, sizeof why), UV_EINVAL);
        assert_string_equal(why, bad[i].why);
        assert_null(strstr(why, "secret"));
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(enumerated_values_checked),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
