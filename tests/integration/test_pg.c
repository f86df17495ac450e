/*
 * Integration tests of cm/pg.h against a real Postgres (DATABASE_URL). The restart test also
 * needs MARKETS_SERVERS_DIR (the folder given to scripts/servers.sh start); without it, it is
 * skipped.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include <libpq-fe.h>

#include "loop_util.h"
#include "cm/alloc.h"
#include "cm/log.h"
#include "cm/pg.h"

static const char *db_url;

/* ---------------------------------------------------------------------------------------- */
/* Helpers                                                                                    */

typedef struct {
    int ups, downs;   /* pool */
    int lups, ldowns; /* LISTEN session */
    int notifies;
    char channel[64];
    char payload[256];
} state_t;

static void on_state(cm_pg_t *pg, int listen, int up, const char *error, void *ud)
{
    (void)pg;
    state_t *s = ud;
    if (up)
        assert_null(error);
    else
        assert_non_null(error);
    if (listen)
        (up ? s->lups++ : s->ldowns++);
    else
        (up ? s->ups++ : s->downs++);
}

static void on_notify(cm_pg_t *pg, const char *channel, const char *payload, int be_pid, void *ud)
{
    (void)pg;
    state_t *s = ud;
    assert_true(be_pid > 0);
    s->notifies++;
    snprintf(s->channel, sizeof s->channel, "%s", channel);
    snprintf(s->payload, sizeof s->payload, "%s", payload);
}

static cm_pg_t *open_pg(uv_loop_t *loop, state_t *st, int pool, int listen)
{
    cm_pg_config_t cfg;
    cm_pg_config_defaults(&cfg);
    cfg.conninfo = db_url;
    cfg.pool_size = pool;
    cfg.backoff_min_ms = 20;
    cfg.backoff_max_ms = 200;
    cfg.application_name = "cm-test";
    cfg.on_state = on_state;
    cfg.on_notify = listen ? on_notify : NULL;
    cfg.ud = st;
    cm_pg_t *pg = NULL;
    assert_int_equal(cm_pg_open(loop, &cfg, &pg), 0);
    assert_int_equal(st->ups, 0); /* never from inside open */
    assert_true(run_until(loop, &st->ups, 1, 3000));
    assert_true(cm_pg_is_up(pg));
    if (listen) {
        assert_true(run_until(loop, &st->lups, 1, 3000));
        assert_true(cm_pg_listen_is_up(pg));
    }
    return pg;
}

static void close_pg(uv_loop_t *loop, cm_pg_t *pg)
{
    int before = closed;
    cm_pg_close(pg, on_closed, NULL);
    assert_true(run_until(loop, &closed, before + 1, 3000));
}

static void finish_loop(uv_loop_t *loop)
{
    uv_run(loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(loop), 0);
}

typedef struct {
    int calls;
    int ok;
    char error[256];
    char sqlstate[8];
    int rows;
    char v[4][128]; /* first row, up to 4 columns ("<null>" for NULL) */
    uint64_t at_ms;
} result_t;

static void on_result(cm_pg_t *pg, const struct pg_result *res, const char *error, void *ud)
{
    (void)pg;
    result_t *r = ud;
    r->calls++;
    r->at_ms = uv_hrtime() / 1000000;
    r->ok = error == NULL;
    snprintf(r->error, sizeof r->error, "%s", error ? error : "");
    if (!res)
        return;
    const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    snprintf(r->sqlstate, sizeof r->sqlstate, "%s", state ? state : "");
    r->rows = PQntuples(res);
    for (int i = 0; i < PQnfields(res) && i < 4 && r->rows > 0; i++)
        snprintf(r->v[i], sizeof r->v[i], "%s",
                 PQgetisnull(res, 0, i) ? "<null>" : PQgetvalue(res, 0, i));
}

/* ---------------------------------------------------------------------------------------- */
/* Tests                                                                                      */

static void bad_config(void **state)
{
    (void)state;
    uv_loop_t loop;
    uv_loop_init(&loop);
    cm_pg_config_t cfg;
    cm_pg_config_defaults(&cfg);
    cm_pg_t *pg = NULL;
    assert_int_equal(cm_pg_open(&loop, &cfg, &pg), UV_EINVAL); /* no conninfo */
    cfg.conninfo = "postgresql://[bad";
    assert_int_equal(cm_pg_open(&loop, &cfg, &pg), UV_EINVAL);
    cfg.conninfo = "nosuchkey=1";
    assert_int_equal(cm_pg_open(&loop, &cfg, &pg), UV_EINVAL);
    cfg.conninfo = db_url;
    cfg.pool_size = 0;
    assert_int_equal(cm_pg_open(&loop, &cfg, &pg), UV_EINVAL);
    assert_null(pg);
    finish_loop(&loop);
}

static void numeric_round_trip(void **state)
{
    (void)state;
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t st = {0};
    cm_pg_t *pg = open_pg(&loop, &st, 1, 0); /* one session: the temp table stays visible */

    result_t create = {0}, ins = {0}, sel = {0}, early = {0};
    assert_int_equal(cm_pg_query(pg,
                                 "create temp table cm_t (market text primary key, price numeric "
                                 "not null, confidence numeric)",
                                 0, NULL, 1000, on_result, &create),
                     0);
    const char *p1[] = {"BTC-USD", "64123.4500000001", NULL};
    assert_int_equal(
        cm_pg_query(pg, "insert into cm_t values ($1, $2, $3)", 3, p1, 1000, on_result, &ins), 0);
    const char *p2[] = {"ETH-USD", "123456789012345678901234567890.123456789000",
                        "0.000000000000000001"};
    result_t ins2 = {0};
    assert_int_equal(
        cm_pg_query(pg, "insert into cm_t values ($1, $2, $3)", 3, p2, 1000, on_result, &ins2), 0);
    assert_int_equal(create.calls + ins.calls, 0); /* never synchronous */
    const char *k1[] = {"BTC-USD"};
    assert_int_equal(cm_pg_query(pg, "select market, price, confidence from cm_t where market = $1",
                                 1, k1, 1000, on_result, &sel),
                     0);
    assert_true(run_until(&loop, &sel.calls, 1, 2000));
    assert_int_equal(create.calls, 1);
    assert_true(create.ok);
    assert_true(ins.ok);
    assert_true(ins2.ok);
    assert_true(sel.ok);
    assert_int_equal(sel.rows, 1);
    assert_string_equal(sel.v[0], "BTC-USD");
    assert_string_equal(sel.v[1], "64123.4500000001");
    assert_string_equal(sel.v[2], "<null>");

    result_t sel2 = {0};
    const char *k2[] = {"ETH-USD"};
    assert_int_equal(cm_pg_query(pg, "select price, confidence from cm_t where market = $1", 1, k2,
                                 1000, on_result, &sel2),
                     0);
    assert_true(run_until(&loop, &sel2.calls, 1, 2000));
    assert_string_equal(sel2.v[0], "123456789012345678901234567890.123456789000");
    assert_string_equal(sel2.v[1], "0.000000000000000001");

    /* A failing statement: error set, result given for its SQLSTATE. */
    result_t bad = {0};
    assert_int_equal(cm_pg_query(pg, "select 1/0", 0, NULL, 1000, on_result, &bad), 0);
    assert_true(run_until(&loop, &bad.calls, 1, 2000));
    assert_false(bad.ok);
    assert_non_null(strstr(bad.error, "division by zero"));
    assert_string_equal(bad.sqlstate, "22012");
    /* The session is still usable afterwards. */
    result_t after = {0};
    assert_int_equal(cm_pg_query(pg, "select count(*) from cm_t", 0, NULL, 1000, on_result, &after),
                     0);
    assert_true(run_until(&loop, &after.calls, 1, 2000));
    assert_string_equal(after.v[0], "2");
    (void)early;

    close_pg(&loop, pg);
    assert_int_equal(st.downs, 0);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

typedef struct {
    int calls, ok, wrong;
} many_t;

typedef struct {
    many_t *m;
    int expect;
} one_t;

static void on_many(cm_pg_t *pg, const struct pg_result *res, const char *error, void *ud)
{
    (void)pg;
    one_t *o = ud;
    o->m->calls++;
    if (!error && res && PQntuples(res) == 1 && atoi(PQgetvalue(res, 0, 0)) == o->expect)
        o->m->ok++;
    else
        o->m->wrong++;
}

static void many_concurrent(void **state)
{
    (void)state;
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t st = {0};
    cm_pg_t *pg = open_pg(&loop, &st, 4, 0);
    enum { N = 500 };
    static one_t ones[N];
    static char bufs[N][16];
    many_t m = {0};
    uint64_t t0 = uv_hrtime();
    for (int i = 0; i < N; i++) {
        ones[i].m = &m;
        ones[i].expect = i * 2;
        snprintf(bufs[i], sizeof bufs[i], "%d", i);
        const char *p[] = {bufs[i]};
        assert_int_equal(cm_pg_query(pg, "select $1::int * 2", 1, p, 5000, on_many, &ones[i]), 0);
    }
    cm_pg_stats_t stats;
    cm_pg_stats(pg, &stats);
    assert_true(stats.queued >= N - 4);
    assert_true(run_until(&loop, &m.calls, N, 10000));
    double ms = (double)(uv_hrtime() - t0) / 1e6;
    print_message("%d queries over 4 connections in %.1f ms (%.0f/s)\n", N, ms, N / ms * 1000);
    assert_int_equal(m.ok, N);
    assert_int_equal(m.wrong, 0);
    cm_pg_stats(pg, &stats);
    assert_int_equal(stats.queued, 0);
    close_pg(&loop, pg);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

static void query_timeout(void **state)
{
    (void)state;
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t st = {0};
    cm_pg_t *pg = open_pg(&loop, &st, 1, 0);

    /* In flight: "timeout" after ~100 ms, the connection is reopened. */
    result_t slow = {0};
    uint64_t t0 = uv_hrtime() / 1000000;
    assert_int_equal(cm_pg_query(pg, "select pg_sleep(1)", 0, NULL, 100, on_result, &slow), 0);
    /* Queued behind it with its own deadline: runs on the reopened connection. */
    result_t next = {0};
    assert_int_equal(cm_pg_query(pg, "select 42", 0, NULL, 2000, on_result, &next), 0);
    assert_true(run_until(&loop, &slow.calls, 1, 2000));
    assert_false(slow.ok);
    assert_string_equal(slow.error, "timeout");
    assert_in_range(slow.at_ms - t0, 95, 180);
    assert_true(run_until(&loop, &next.calls, 1, 2000));
    assert_true(next.ok);
    assert_string_equal(next.v[0], "42");
    assert_int_equal(st.downs, 0); /* a reset after a timeout is not an outage */

    /* Queued and never reached its turn in time. */
    result_t blocker = {0}, queued = {0};
    assert_int_equal(cm_pg_query(pg, "select pg_sleep(0.4)", 0, NULL, 2000, on_result, &blocker),
                     0);
    t0 = uv_hrtime() / 1000000;
    assert_int_equal(cm_pg_query(pg, "select 1", 0, NULL, 100, on_result, &queued), 0);
    assert_true(run_until(&loop, &queued.calls, 1, 2000));
    assert_string_equal(queued.error, "timeout");
    assert_in_range(queued.at_ms - t0, 95, 180);
    assert_true(run_until(&loop, &blocker.calls, 1, 2000));
    assert_true(blocker.ok);
    cm_pg_stats_t stats;
    cm_pg_stats(pg, &stats);
    assert_int_equal(stats.timeouts, 2);

    close_pg(&loop, pg);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

static void listen_notify(void **state)
{
    (void)state;
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t st = {0};
    cm_pg_t *pg = open_pg(&loop, &st, 2, 1);

    result_t lis = {0}, lock = {0};
    assert_int_equal(cm_pg_listen_query(pg, "listen cm_test", 0, NULL, 1000, on_result, &lis), 0);
    assert_int_equal(cm_pg_listen_query(pg, "select pg_try_advisory_lock(4242)", 0, NULL, 1000,
                                        on_result, &lock),
                     0);
    assert_true(run_until(&loop, &lock.calls, 1, 2000));
    assert_true(lis.ok);
    assert_string_equal(lock.v[0], "t");

    result_t n1 = {0};
    const char *pl[] = {"cm_test", "{\"id\":1}"};
    assert_int_equal(cm_pg_query(pg, "select pg_notify($1, $2)", 2, pl, 1000, on_result, &n1), 0);
    assert_true(run_until(&loop, &st.notifies, 1, 2000));
    assert_string_equal(st.channel, "cm_test");
    assert_string_equal(st.payload, "{\"id\":1}");

    /* Reset: the session (and its lock) is gone; the caller LISTENs again once it is back. */
    int ldowns = st.ldowns, lups = st.lups;
    cm_pg_listen_reset(pg);
    assert_int_equal(st.ldowns, ldowns + 1);
    assert_false(cm_pg_listen_is_up(pg));
    result_t refused = {0};
    assert_int_equal(cm_pg_listen_query(pg, "listen cm_test", 0, NULL, 1000, on_result, &refused),
                     UV_ENOTCONN);
    assert_true(run_until(&loop, &st.lups, lups + 1, 3000));
    result_t lis2 = {0};
    assert_int_equal(cm_pg_listen_query(pg, "listen cm_test", 0, NULL, 1000, on_result, &lis2), 0);
    assert_true(run_until(&loop, &lis2.calls, 1, 2000));
    const char *pl2[] = {"cm_test", "second"};
    result_t n2 = {0};
    assert_int_equal(cm_pg_query(pg, "select pg_notify($1, $2)", 2, pl2, 1000, on_result, &n2), 0);
    assert_true(run_until(&loop, &st.notifies, 2, 2000));
    assert_string_equal(st.payload, "second");
    assert_int_equal(st.downs, 0);

    /* Listen statements without a LISTEN session are refused. */
    state_t st2 = {0};
    cm_pg_t *plain = open_pg(&loop, &st2, 1, 0);
    assert_int_equal(cm_pg_listen_query(plain, "listen x", 0, NULL, 0, on_result, &lis), UV_EINVAL);
    close_pg(&loop, plain);

    close_pg(&loop, pg);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

static void restart(void **state)
{
    (void)state;
    if (!getenv("MARKETS_SERVERS_DIR"))
        skip();
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t st = {0};
    cm_pg_t *pg = open_pg(&loop, &st, 2, 1);
    result_t lis = {0};
    assert_int_equal(cm_pg_listen_query(pg, "listen cm_test", 0, NULL, 1000, on_result, &lis), 0);
    assert_true(run_until(&loop, &lis.calls, 1, 2000));

    /* In flight when the server stops: fails with a "connection lost" error. */
    result_t inflight = {0};
    assert_int_equal(cm_pg_query(pg, "select pg_sleep(5)", 0, NULL, 10000, on_result, &inflight),
                     0);
    run_for(&loop, 50);
    assert_int_equal(servers_ctl("pg-stop"), 0);
    assert_true(run_until(&loop, &st.downs, 1, 5000));
    assert_true(run_until(&loop, &st.ldowns, 1, 5000));
    assert_true(run_until(&loop, &inflight.calls, 1, 2000));
    assert_false(inflight.ok);
    assert_non_null(strstr(inflight.error, "connection lost"));
    assert_false(cm_pg_is_up(pg));
    result_t fast = {0};
    assert_int_equal(cm_pg_query(pg, "select 1", 0, NULL, 1000, on_result, &fast), UV_ENOTCONN);
    run_for(&loop, 300);
    assert_int_equal(st.downs, 1); /* reported once, however many attempts failed */

    assert_int_equal(servers_ctl("pg-start"), 0);
    assert_true(run_until(&loop, &st.ups, 2, 10000));
    assert_true(run_until(&loop, &st.lups, 2, 10000));
    result_t ok = {0};
    assert_int_equal(cm_pg_query(pg, "select 7", 0, NULL, 1000, on_result, &ok), 0);
    assert_true(run_until(&loop, &ok.calls, 1, 2000));
    assert_true(ok.ok);
    assert_string_equal(ok.v[0], "7");
    cm_pg_stats_t stats;
    cm_pg_stats(pg, &stats);
    assert_true(stats.reconnects >= 2); /* the LISTEN session and at least one pool connection */
    assert_int_equal(fast.calls, 0);

    close_pg(&loop, pg);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

static void unreachable(void **state)
{
    (void)state;
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t st = {0};
    cm_pg_config_t cfg;
    cm_pg_config_defaults(&cfg);
    cfg.conninfo = "host=127.0.0.1 port=1 dbname=x user=x";
    cfg.pool_size = 2;
    cfg.backoff_min_ms = 5;
    cfg.backoff_max_ms = 20;
    cfg.on_state = on_state;
    cfg.on_notify = on_notify;
    cfg.ud = &st;
    cm_pg_t *pg;
    assert_int_equal(cm_pg_open(&loop, &cfg, &pg), 0);
    run_for(&loop, 150);
    assert_int_equal(st.downs, 1);
    assert_int_equal(st.ldowns, 1);
    assert_int_equal(st.ups + st.lups, 0);
    result_t r = {0};
    assert_int_equal(cm_pg_query(pg, "select 1", 0, NULL, 100, on_result, &r), UV_ENOTCONN);
    cm_pg_stats_t stats;
    cm_pg_stats(pg, &stats);
    assert_true(stats.errors >= 4);
    close_pg(&loop, pg);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

typedef struct {
    int calls, closing, other;
} cancel_t;

static void on_cancel(cm_pg_t *pg, const struct pg_result *res, const char *error, void *ud)
{
    (void)pg;
    (void)res;
    cancel_t *c = ud;
    c->calls++;
    if (error && strcmp(error, "closing") == 0)
        c->closing++;
    else
        c->other++;
}

static void close_in_flight(void **state)
{
    (void)state;
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t st = {0};
    cm_pg_t *pg = open_pg(&loop, &st, 3, 1);
    cancel_t c = {0};
    for (int i = 0; i < 20; i++)
        assert_int_equal(cm_pg_query(pg, "select pg_sleep(2)", 0, NULL, 5000, on_cancel, &c), 0);
    assert_int_equal(cm_pg_listen_query(pg, "select pg_sleep(2)", 0, NULL, 5000, on_cancel, &c), 0);
    assert_int_equal(cm_pg_listen_query(pg, "select 1", 0, NULL, 5000, on_cancel, &c), 0);
    run_for(&loop, 30);
    int before = closed;
    uint64_t t0 = uv_hrtime();
    cm_pg_close(pg, on_closed, NULL);
    assert_int_equal(c.calls, 0); /* not from inside close */
    assert_true(run_until(&loop, &closed, before + 1, 3000));
    assert_true(uv_hrtime() - t0 < 500 * 1000000ull); /* no waiting for the server */
    assert_int_equal(c.calls, 22);
    assert_int_equal(c.closing, 22);
    assert_int_equal(st.downs, 0);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

/* Closing from inside a result callback while other statements are in flight. */
static cm_pg_t *close_me;
static void on_then_close(cm_pg_t *pg, const struct pg_result *res, const char *error, void *ud)
{
    on_cancel(pg, res, error, ud);
    if (close_me) {
        cm_pg_close(close_me, on_closed, NULL);
        close_me = NULL;
    }
}

static void close_from_callback(void **state)
{
    (void)state;
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t st = {0};
    cm_pg_t *pg = open_pg(&loop, &st, 2, 0);
    cancel_t c = {0};
    close_me = pg;
    assert_int_equal(cm_pg_query(pg, "select 1", 0, NULL, 5000, on_then_close, &c), 0);
    for (int i = 0; i < 5; i++)
        assert_int_equal(cm_pg_query(pg, "select pg_sleep(1)", 0, NULL, 5000, on_then_close, &c),
                         0);
    int before = closed;
    assert_true(run_until(&loop, &closed, before + 1, 3000));
    assert_int_equal(c.calls, 6);
    assert_int_equal(c.closing, 5);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

/* The notifier resets the LISTEN session from inside one of its statement callbacks. */
static cm_pg_t *reset_me;
static void on_then_reset(cm_pg_t *pg, const struct pg_result *res, const char *error, void *ud)
{
    on_result(pg, res, error, ud);
    if (reset_me) {
        cm_pg_listen_reset(reset_me);
        reset_me = NULL;
    }
}

static void listen_reset_from_callback(void **state)
{
    (void)state;
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t st = {0};
    cm_pg_t *pg = open_pg(&loop, &st, 1, 1);
    result_t a = {0}, b = {0};
    reset_me = pg;
    assert_int_equal(cm_pg_listen_query(pg, "select 1", 0, NULL, 1000, on_then_reset, &a), 0);
    assert_int_equal(cm_pg_listen_query(pg, "select 2", 0, NULL, 1000, on_result, &b), 0);
    assert_true(run_until(&loop, &b.calls, 1, 2000));
    assert_true(a.ok);
    assert_false(b.ok); /* queued behind the reset: failed, not lost */
    assert_non_null(strstr(b.error, "connection lost"));
    assert_true(run_until(&loop, &st.lups, 2, 3000));
    result_t c = {0};
    assert_int_equal(cm_pg_listen_query(pg, "select 3", 0, NULL, 1000, on_result, &c), 0);
    assert_true(run_until(&loop, &c.calls, 1, 2000));
    assert_string_equal(c.v[0], "3");
    assert_int_equal(a.calls + b.calls, 2);
    close_pg(&loop, pg);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

/* The pool queue is bounded; what was accepted still gets exactly one callback. */
static void queue_bound(void **state)
{
    (void)state;
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t st = {0};
    cm_pg_t *pg = open_pg(&loop, &st, 1, 0);
    cancel_t c = {0};
    int accepted = 0, rc = 0;
    while ((rc = cm_pg_query(pg, "select pg_sleep(1)", 0, NULL, 0, on_cancel, &c)) == 0)
        accepted++;
    assert_int_equal(rc, UV_EBUSY);
    assert_int_equal(accepted, 10000 + 1); /* one in flight, 10000 queued */
    cm_pg_stats_t stats;
    cm_pg_stats(pg, &stats);
    assert_int_equal(stats.queued, 10000);
    close_pg(&loop, pg);
    assert_int_equal(c.calls, accepted);
    assert_int_equal(c.closing, accepted);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

/* Allocation failures inside open are reported and leak nothing. */
static void open_out_of_memory(void **state)
{
    (void)state;
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    cm_pg_config_t cfg;
    cm_pg_config_defaults(&cfg);
    cfg.conninfo = db_url;
    cfg.application_name = "cm-test";
    cfg.on_notify = on_notify;
    for (int n = 1; n <= 5; n++) {
        cm_pg_t *pg = NULL;
        cm_alloc_fail_after(n);
        int rc = cm_pg_open(&loop, &cfg, &pg);
        cm_alloc_fail_after(0);
        if (rc == 0) {
            close_pg(&loop, pg);
            break;
        }
        assert_int_equal(rc, UV_ENOMEM);
        assert_int_equal(cm_alloc_live(), live);
    }
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

int main(void)
{
    db_url = getenv("DATABASE_URL");
    if (!db_url) {
        fprintf(stderr, "DATABASE_URL not set: source the env file of scripts/servers.sh start\n");
        return 77;
    }
    cm_log_init("test_pg", CM_LOG_WARN, CM_LOG_TEXT);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(bad_config),      cmocka_unit_test(numeric_round_trip),
        cmocka_unit_test(many_concurrent), cmocka_unit_test(query_timeout),
        cmocka_unit_test(listen_notify),   cmocka_unit_test(listen_reset_from_callback),
        cmocka_unit_test(restart),         cmocka_unit_test(unreachable),
        cmocka_unit_test(close_in_flight), cmocka_unit_test(close_from_callback),
        cmocka_unit_test(queue_bound),     cmocka_unit_test(open_out_of_memory),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
