/*
 * The outbox reader (order-notifier/outbox.c) against a real Postgres: paging, the caller's
 * limit, the filters, and a time-bounded read that does not walk the whole outbox (a replica's
 * replay timed out on an outbox of two million rows).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <inttypes.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "loop_util.h"

#include "outbox.c"

static const char *db_url;
static PGconn *admin; /* blocking, for set-up and EXPLAIN */
static char user[64];

static void exec_ok(const char *sql)
{
    PGresult *res = PQexec(admin, sql);
    if (PQresultStatus(res) != PGRES_COMMAND_OK && PQresultStatus(res) != PGRES_TUPLES_OK)
        fail_msg("%s: %s", sql, PQerrorMessage(admin));
    PQclear(res);
}

static int64_t scalar(const char *sql)
{
    PGresult *res = PQexec(admin, sql);
    assert_int_equal(PQresultStatus(res), PGRES_TUPLES_OK);
    int64_t v = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    PQclear(res);
    return v;
}

typedef struct {
    int64_t ids[4096];
    int n;
    int done, status, truncated;
} sink_t;

static void on_row(on_event_t *ev, void *ud)
{
    sink_t *s = ud;
    if (s->n < 4096)
        s->ids[s->n++] = ev->id;
    on_event_clear(ev);
}

static void on_done(int status, int truncated, void *ud)
{
    sink_t *s = ud;
    s->done++;
    s->status = status;
    s->truncated = truncated;
}

static void on_state(cm_pg_t *pg, int listen, int up, const char *error, void *ud)
{
    (void)pg;
    (void)listen;
    (void)error;
    if (up)
        (*(int *)ud)++;
}

static cm_pg_t *open_pg(uv_loop_t *loop, int *ups)
{
    cm_pg_config_t cfg;
    cm_pg_config_defaults(&cfg);
    cfg.conninfo = db_url;
    cfg.pool_size = 1;
    cfg.on_state = on_state;
    cfg.ud = ups;
    cm_pg_t *pg = NULL;
    assert_int_equal(cm_pg_open(loop, &cfg, &pg), 0);
    assert_true(run_until(loop, ups, 1, 5000));
    return pg;
}

static void read_all(uv_loop_t *loop, cm_pg_t *pg, const on_outbox_query_t *q, sink_t *s)
{
    memset(s, 0, sizeof *s);
    assert_int_equal(on_outbox_read(pg, q, on_row, on_done, s, NULL), 0);
    assert_int_equal(s->done, 0); /* never from inside the call */
    assert_true(run_until(loop, &s->done, 1, 30000));
    assert_int_equal(s->done, 1);
}

/* 5,000 rows of our user: pages of 2,000, in id order, each once, no cap; the caller's limit
 * cuts and says so; skip, upto and the user filter. */
static void paging_limit_filters(void **state)
{
    (void)state;
    uv_loop_t loop;
    uv_loop_init(&loop);
    int ups = 0;
    cm_pg_t *pg = open_pg(&loop, &ups);
    int64_t before = scalar("SELECT coalesce(max(id), 0) FROM order_events");
    char sql[512];
    snprintf(sql, sizeof sql,
             "INSERT INTO order_events (order_id, user_id, event_type, payload) SELECT g, '%s', "
             "'order.updated', jsonb_build_object('id', g) FROM generate_series(1, 5000) g",
             user);
    exec_ok(sql);
    sink_t s;
    on_outbox_query_t q = {.after_id = before, .user_id = user};
    read_all(&loop, pg, &q, &s);
    assert_int_equal(s.status, 0);
    assert_int_equal(s.n, 4096); /* the sink keeps 4096; the count below is the reader's */
    for (int i = 1; i < s.n; i++)
        assert_true(s.ids[i - 1] < s.ids[i]);
    assert_false(s.truncated);

    q.limit = 1000;
    read_all(&loop, pg, &q, &s);
    assert_int_equal(s.n, 1000);
    assert_true(s.truncated);
    q.limit = 5000; /* exactly all: not truncated */
    read_all(&loop, pg, &q, &s);
    assert_false(s.truncated);

    snprintf(sql, sizeof sql, "SELECT min(id) FROM order_events WHERE user_id = '%s'", user);
    int64_t first = scalar(sql); /* ids may have gaps: deleted rows left the sequence ahead */
    int64_t skip[2] = {first + 1, first + 3};
    on_outbox_query_t q2 = {
        .after_id = before, .upto_id = first + 4, .user_id = user, .skip = skip, .nskip = 2};
    read_all(&loop, pg, &q2, &s);
    assert_int_equal(s.n, 3);
    assert_int_equal(s.ids[0], first);
    assert_int_equal(s.ids[1], first + 2);
    assert_int_equal(s.ids[2], first + 4);

    on_outbox_query_t q3 = {.after_id = before, .user_id = "nobody-at-all"};
    read_all(&loop, pg, &q3, &s);
    assert_int_equal(s.n, 0);
    assert_int_equal(s.status, 0);

    cm_pg_close(pg, NULL, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
}

/*
 * A time-bounded read of a large outbox: 300,000 rows an hour old, 10 recent. The read finds
 * the recent ones, and the statements it runs touch about as many rows as it returns (the
 * plan Postgres picks is checked with EXPLAIN ANALYZE on the same statements).
 */
static void window_read_does_not_walk_the_outbox(void **state)
{
    (void)state;
    char sql[1024];
    snprintf(sql, sizeof sql,
             "INSERT INTO order_events (order_id, user_id, event_type, payload, created_at) "
             "SELECT g, '%s-old', 'order.updated', '{}'::jsonb, now() - interval '1 hour' "
             "FROM generate_series(1, 300000) g",
             user);
    exec_ok(sql);
    snprintf(
        sql, sizeof sql,
        "INSERT INTO order_events (order_id, user_id, event_type, payload) SELECT g, '%s-new', "
        "'order.updated', '{}'::jsonb FROM generate_series(1, 10) g",
        user);
    exec_ok(sql);
    snprintf(sql, sizeof sql, "SELECT min(id) FROM order_events WHERE user_id = '%s-new'", user);
    int64_t first = scalar(sql);
    char recent_user[80];
    snprintf(recent_user, sizeof recent_user, "%s-new", user);
    exec_ok("ANALYZE order_events");
    uv_loop_t loop;
    uv_loop_init(&loop);
    int ups = 0;
    cm_pg_t *pg = open_pg(&loop, &ups);
    double since = (double)scalar("SELECT extract(epoch FROM now())::bigint") - 60;
    sink_t s;
    on_outbox_query_t q = {.since = since, .user_id = recent_user};
    read_all(&loop, pg, &q, &s);
    assert_int_equal(s.status, 0);
    assert_int_equal(s.n, 10);
    assert_int_equal(s.ids[0], first);

    /* The plans: the start through the created_at index, the page from there on. */
    char since_s[40];
    snprintf(since_s, sizeof since_s, "%.6f", since);
    const char *p1[1] = {since_s};
    char explain[2048];
    snprintf(explain, sizeof explain, "EXPLAIN (ANALYZE, FORMAT TEXT) %s", START_SQL);
    PGresult *res = PQexecParams(admin, explain, 1, NULL, p1, NULL, NULL, 0);
    assert_int_equal(PQresultStatus(res), PGRES_TUPLES_OK);
    for (int i = 0; i < PQntuples(res); i++)
        if (strstr(PQgetvalue(res, i, 0), "order_events_pkey"))
            fail_msg("the start walks the primary key: %s", PQgetvalue(res, i, 0));
    PQclear(res);
    char after[24];
    snprintf(after, sizeof after, "%" PRId64, first - 1);
    const char *p2[7] = {after, NULL, since_s, recent_user, NULL, NULL, "2000"};
    snprintf(explain, sizeof explain, "EXPLAIN (ANALYZE, FORMAT TEXT) %s", SQL);
    res = PQexecParams(admin, explain, 7, NULL, p2, NULL, NULL, 0);
    assert_int_equal(PQresultStatus(res), PGRES_TUPLES_OK);
    for (int i = 0; i < PQntuples(res); i++) {
        const char *line = PQgetvalue(res, i, 0);
        const char *removed = strstr(line, "Rows Removed by Filter: ");
        if (removed)
            assert_true(strtoll(removed + 24, NULL, 10) < 1000);
    }
    PQclear(res);

    snprintf(sql, sizeof sql, "DELETE FROM order_events WHERE user_id = '%s-old'", user);
    exec_ok(sql);
    cm_pg_close(pg, NULL, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
}

/* loop_util.h's helpers this file does not need. */
static void (*const unused_helpers[])(void) = {(void (*)(void))run_for, (void (*)(void))on_closed,
                                               (void (*)(void))servers_ctl};

int main(void)
{
    (void)unused_helpers;
    db_url = getenv("DATABASE_URL");
    if (!db_url) {
        fprintf(stderr, "DATABASE_URL is not set: skipping\n");
        return 0;
    }
    admin = PQconnectdb(db_url);
    if (PQstatus(admin) != CONNECTION_OK) {
        fprintf(stderr, "%s\n", PQerrorMessage(admin));
        return 1;
    }
    snprintf(user, sizeof user, "outbox-test-%ld", (long)getpid());
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(paging_limit_filters),
        cmocka_unit_test(window_read_does_not_walk_the_outbox),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    char sql[256];
    snprintf(sql, sizeof sql, "DELETE FROM order_events WHERE user_id LIKE '%s%%'", user);
    exec_ok(sql);
    PQfinish(admin);
    return rc;
}
