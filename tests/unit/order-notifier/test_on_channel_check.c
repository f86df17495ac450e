/*
 * PG_CHANNEL against markets.order_channel (order-notifier/channel_check.c) with a fake pool:
 * the answers a database can give, the retry when it cannot answer, a re-check after a
 * reconnect, and closing with a query in flight.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <string.h>
#include <uv.h>

#include "channel_check.c"
#include "cm/json.h"

/* ---- a fake cm_pg_query ------------------------------------------------------------------ */

static struct {
    int fail_next; /* answer the next call with this (UV_ENOTCONN...) instead of queueing */
    int calls;     /* queries started */
    char sql[256]; /* the last statement */
    cm_pg_result_fn cb;
    void *ud;
} F;

int cm_pg_query(cm_pg_t *pg, const char *sql, int nparams, const char *const *params,
                uint64_t timeout_ms, cm_pg_result_fn cb, void *ud)
{
    (void)pg;
    (void)params;
    (void)timeout_ms;
    assert_int_equal(nparams, 0);
    if (F.fail_next) {
        int rc = F.fail_next;
        F.fail_next = 0;
        return rc;
    }
    assert_null(F.cb); /* one at a time */
    F.calls++;
    snprintf(F.sql, sizeof F.sql, "%s", sql);
    F.cb = cb;
    F.ud = ud;
    return 0;
}

/* The real one lives beside cm_pg_query in pg.c: faked with it. */
const char *cm_pg_error_detail(const cm_pg_t *pg)
{
    (void)pg;
    return "fake detail";
}

/* Answers the query in flight with one text value (NULL: an SQL NULL), or with error `err`. */
static void answer(const char *value, int err)
{
    assert_non_null(F.cb);
    cm_pg_result_fn cb = F.cb;
    F.cb = NULL;
    if (err) {
        cb(NULL, NULL, err, F.ud);
        return;
    }
    PGresult *res = PQmakeEmptyPGresult(NULL, PGRES_TUPLES_OK);
    PGresAttDesc col = {
        .name = "coalesce", .format = 0, .typid = 25, .typlen = -1, .atttypmod = -1};
    assert_int_equal(PQsetResultAttrs(res, 1, &col), 1);
    if (value)
        assert_int_equal(PQsetvalue(res, 0, 0, (char *)value, (int)strlen(value)), 1);
    else
        assert_int_equal(PQsetvalue(res, 0, 0, NULL, -1), 1);
    cb(NULL, res, 0, F.ud);
    PQclear(res);
}

static uv_loop_t loop;
static long live_at_start;

static int setup(void **state)
{
    (void)state;
    memset(&F, 0, sizeof F);
    live_at_start = cm_alloc_live();
    cm_log_init("test", CM_LOG_ERROR + 1, CM_LOG_JSON); /* quiet */
    return uv_loop_init(&loop);
}

static int teardown(void **state)
{
    (void)state;
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
    assert_int_equal(cm_alloc_live(), live_at_start);
    return 0;
}

static void match_and_mismatch(void **state)
{
    (void)state;
    on_channel_check_t *cc = NULL;
    assert_int_equal(on_channel_check_new(&loop, NULL, "order_events", &cc), 0);
    /* Not ready before the first answer: nothing is known yet. */
    assert_non_null(on_channel_check_problem(cc));
    assert_int_equal(F.calls, 0);
    on_channel_check_run(cc);
    assert_int_equal(F.calls, 1);
    /* The trigger's own expression (deploy/sql/002_order_events_trigger.sql). */
    assert_string_equal(F.sql, "SELECT coalesce(nullif(current_setting('markets.order_channel', "
                               "true), ''), 'order_events')");
    assert_non_null(on_channel_check_problem(cc));
    answer("order_events", 0);
    assert_null(on_channel_check_problem(cc));

    /* A reconnect: the last answer stands until the new one, which differs. */
    on_channel_check_run(cc);
    assert_null(on_channel_check_problem(cc));
    answer("orders_v2", 0);
    const char *why = on_channel_check_problem(cc);
    assert_non_null(why);
    assert_non_null(strstr(why, "PG_CHANNEL 'order_events'"));
    assert_non_null(strstr(why, "'orders_v2'"));
    assert_non_null(strstr(why, "markets.order_channel"));

    /* Fixed in the database, seen at the next reconnect. */
    on_channel_check_run(cc);
    answer("order_events", 0);
    assert_null(on_channel_check_problem(cc));
    on_channel_check_close(cc);
    on_channel_check_close(cc); /* a second call is a no-op */
}

static void odd_values_stay_printable(void **state)
{
    (void)state;
    on_channel_check_t *cc = NULL;
    assert_int_equal(on_channel_check_new(&loop, NULL, "chan", &cc), 0);
    on_channel_check_run(cc);
    answer("bad\nname\xff\x01", 0);
    const char *why = on_channel_check_problem(cc);
    assert_non_null(strstr(why, "'bad?name?"
                                "?'"));
    assert_null(strchr(why, '\n'));
    char longest[600];
    memset(longest, 'x', sizeof longest - 1);
    longest[sizeof longest - 1] = '\0';
    on_channel_check_run(cc);
    answer(longest, 0);
    why = on_channel_check_problem(cc);
    assert_non_null(strstr(why, "xxx...'"));
    assert_true(strlen(why) < 384);
    on_channel_check_close(cc);
}

/* No pool connection yet, then a failed statement: asked again after the retry delay. */
static void retries_until_answered(void **state)
{
    (void)state;
    on_channel_check_t *cc = NULL;
    assert_int_equal(on_channel_check_new(&loop, NULL, "order_events", &cc), 0);
    F.fail_next = UV_ENOTCONN;
    on_channel_check_run(cc);
    assert_int_equal(F.calls, 0);
    uv_run(&loop, UV_RUN_ONCE); /* the retry timer */
    assert_int_equal(F.calls, 1);
    answer(NULL, UV_ETIMEDOUT);
    assert_non_null(on_channel_check_problem(cc));
    uv_run(&loop, UV_RUN_ONCE);
    assert_int_equal(F.calls, 2);
    answer(NULL, 0); /* an SQL NULL is no answer either */
    uv_run(&loop, UV_RUN_ONCE);
    assert_int_equal(F.calls, 3);
    answer("order_events", 0);
    assert_null(on_channel_check_problem(cc));
    on_channel_check_close(cc);
}

/* A reconnect while a query is in flight asks once more after it; closing with a query in
 * flight frees the check only when that query answers (the pool's "closing"). */
static void in_flight(void **state)
{
    (void)state;
    on_channel_check_t *cc = NULL;
    assert_int_equal(on_channel_check_new(&loop, NULL, "order_events", &cc), 0);
    on_channel_check_run(cc);
    on_channel_check_run(cc);
    on_channel_check_run(cc);
    assert_int_equal(F.calls, 1);
    answer("order_events", 0);
    assert_int_equal(F.calls, 2);
    on_channel_check_close(cc);
    uv_run(&loop, UV_RUN_DEFAULT); /* the timer closes; the struct waits for the answer */
    assert_int_equal(cm_alloc_live(), live_at_start + 1);
    answer(NULL, UV_ECANCELED);
    assert_int_equal(F.calls, 2);
    assert_null(on_channel_check_problem(NULL));
    on_channel_check_run(NULL);
    on_channel_check_close(NULL);
}

int main(void)
{
    cm_json_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(match_and_mismatch, setup, teardown),
        cmocka_unit_test_setup_teardown(odd_values_stay_printable, setup, teardown),
        cmocka_unit_test_setup_teardown(retries_until_answered, setup, teardown),
        cmocka_unit_test_setup_teardown(in_flight, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
