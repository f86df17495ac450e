/*
 * Integration tests of cm/pg.h against a real Postgres (DATABASE_URL). The restart and standby
 * tests also need MARKETS_SERVERS_DIR (the folder given to scripts/servers.sh start); without
 * it, they are skipped. The standby test starts a streaming standby of that Postgres
 * (servers.sh standby-start) and removes it afterwards.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>
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
#include "cm/error.h"
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
    char error[600]; /* of the last down */
} state_t;

static void on_state(cm_pg_t *pg, int listen, int up, const char *error, void *ud)
{
    (void)pg;
    state_t *s = ud;
    if (up)
        assert_null(error);
    else
        assert_non_null(error);
    if (!up)
        snprintf(s->error, sizeof s->error, "%s", error);
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

typedef struct {
    int calls;
    int ok;
    int err;         /* the code (cm/error.h) */
    char error[256]; /* cm_pg_error_detail's words for it */
    char sqlstate[8];
    int rows;
    char v[4][128]; /* first row, up to 4 columns ("<null>" for NULL) */
    uint64_t at_ms;
} result_t;

static void on_result(cm_pg_t *pg, const struct pg_result *res, int err, void *ud)
{
    result_t *r = ud;
    r->calls++;
    r->at_ms = uv_hrtime() / 1000000;
    r->ok = err == 0;
    r->err = err;
    snprintf(r->error, sizeof r->error, "%s", cm_pg_error_detail(pg));
    if (err == 0)
        assert_string_equal(r->error, ""); /* no words for a success */
    else
        assert_true(r->error[0] != '\0');
    if (!res)
        return;
    const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    snprintf(r->sqlstate, sizeof r->sqlstate, "%s", state ? state : "");
    r->rows = PQntuples(res);
    for (int i = 0; i < PQnfields(res) && i < 4 && r->rows > 0; i++)
        snprintf(r->v[i], sizeof r->v[i], "%s",
                 PQgetisnull(res, 0, i) ? "<null>" : PQgetvalue(res, 0, i));
}

/* The user, database and port of DATABASE_URL, for connection strings of several hosts. */
static void db_parts(char *user, char *dbname, char *port, size_t n)
{
    PQconninfoOption *opts = PQconninfoParse(db_url, NULL);
    assert_non_null(opts);
    snprintf(user, n, "postgres");
    snprintf(dbname, n, "markets");
    snprintf(port, n, "5432");
    for (PQconninfoOption *o = opts; o->keyword; o++) {
        if (!o->val)
            continue;
        if (strcmp(o->keyword, "user") == 0)
            snprintf(user, n, "%s", o->val);
        else if (strcmp(o->keyword, "dbname") == 0)
            snprintf(dbname, n, "%s", o->val);
        else if (strcmp(o->keyword, "port") == 0)
            snprintf(port, n, "%s", o->val);
    }
    PQconninfoFree(opts);
}

/* A loopback port that completes the TCP handshake (the kernel does, from the backlog) and never
 * says a word: a hung server, as far as libpq can tell. Returns the socket; *port gets its
 * port. */
static int hung_listener(int *port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(fd, 64), 0);
    socklen_t len = sizeof a;
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    *port = ntohs(a.sin_port);
    return fd;
}

static cm_pg_t *open_with(uv_loop_t *loop, state_t *st, const char *conninfo, int pool, int listen,
                          uint64_t host_timeout_ms)
{
    cm_pg_config_t cfg;
    cm_pg_config_defaults(&cfg);
    cfg.conninfo = conninfo;
    cfg.pool_size = pool;
    cfg.connect_timeout_ms = host_timeout_ms;
    cfg.backoff_min_ms = 20;
    cfg.backoff_max_ms = 200;
    cfg.application_name = "cm-test";
    cfg.on_state = on_state;
    cfg.on_notify = listen ? on_notify : NULL;
    cfg.ud = st;
    cm_pg_t *pg = NULL;
    assert_int_equal(cm_pg_open(loop, &cfg, &pg), 0);
    return pg;
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

    /* DATABASE_URL checks: lists that libpq could not pair up are refused at startup. */
    char why[200];
    assert_int_equal(cm_pg_conninfo_check("postgresql://a:1,b:2/db?target_session_attrs=read-write",
                                          why, sizeof why),
                     0);
    assert_int_equal(cm_pg_conninfo_check("host=a,b port=5432", why, sizeof why), 0);
    assert_int_not_equal(cm_pg_conninfo_check("host=a,b port=1,2,3", why, sizeof why), 0);
    assert_non_null(strstr(why, "one per host"));
    assert_int_not_equal(cm_pg_conninfo_check("host=a,b hostaddr=127.0.0.1", why, sizeof why), 0);
    assert_int_not_equal(cm_pg_conninfo_check("host=a port=0", why, sizeof why), 0);
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

    /* A failing statement: the server's error, result given for its SQLSTATE. */
    result_t bad = {0};
    assert_int_equal(cm_pg_query(pg, "select 1/0", 0, NULL, 1000, on_result, &bad), 0);
    assert_true(run_until(&loop, &bad.calls, 1, 2000));
    assert_false(bad.ok);
    assert_int_equal(bad.err, CM_ESERVER);
    assert_non_null(strstr(bad.error, "division by zero"));
    /* The words belong to the callback: none outside it. */
    assert_string_equal(cm_pg_error_detail(pg), "");
    assert_string_equal(cm_pg_error_detail(NULL), "");
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

static void on_many(cm_pg_t *pg, const struct pg_result *res, int err, void *ud)
{
    (void)pg;
    one_t *o = ud;
    o->m->calls++;
    if (!err && res && PQntuples(res) == 1 && atoi(PQgetvalue(res, 0, 0)) == o->expect)
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
    assert_int_equal(slow.err, UV_ETIMEDOUT);
    assert_non_null(strstr(slow.error, "statement timeout"));
    /* Bounds with room for a loaded machine (CI), still far from the 1 s the sleep takes. */
    assert_in_range(slow.at_ms - t0, 95, 700);
    assert_true(run_until(&loop, &next.calls, 1, 2000));
    assert_true(next.ok);
    assert_string_equal(next.v[0], "42");
    assert_int_equal(st.downs, 0); /* a reset after a timeout is not an outage */

    /* Queued and never reached its turn in time. */
    result_t blocker = {0}, queued = {0};
    assert_int_equal(cm_pg_query(pg, "select pg_sleep(1)", 0, NULL, 3000, on_result, &blocker), 0);
    t0 = uv_hrtime() / 1000000;
    assert_int_equal(cm_pg_query(pg, "select 1", 0, NULL, 100, on_result, &queued), 0);
    assert_true(run_until(&loop, &queued.calls, 1, 2000));
    assert_int_equal(queued.err, UV_ETIMEDOUT);
    assert_in_range(queued.at_ms - t0, 95, 700);
    assert_true(run_until(&loop, &blocker.calls, 1, 3000));
    assert_true(blocker.ok);
    cm_pg_stats_t stats;
    cm_pg_stats(pg, &stats);
    assert_int_equal(stats.timeouts, 2);

    close_pg(&loop, pg);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

/* A loop that was busy past a statement's deadline does not blame the server: the answer
 * waiting in the socket is read before the deadline is judged (a LISTEN session flooded by a
 * burst of notifications lost its leader lock this way). */
static void busy_loop_is_not_a_timeout(void **state)
{
    (void)state;
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t st = {0};
    cm_pg_t *pg = open_pg(&loop, &st, 1, 1);
    assert_true(run_until(&loop, &st.lups, 1, 3000));
    result_t r = {0};
    assert_int_equal(cm_pg_listen_query(pg, "select 7", 0, NULL, 100, on_result, &r), 0);
    /* Let the statement go out, then hold the loop well past its deadline. */
    uv_run(&loop, UV_RUN_NOWAIT);
    uv_sleep(300);
    uv_update_time(&loop);
    assert_true(run_until(&loop, &r.calls, 1, 2000));
    assert_true(r.ok);
    assert_string_equal(r.v[0], "7");
    cm_pg_stats_t stats;
    cm_pg_stats(pg, &stats);
    assert_int_equal(stats.timeouts, 0);
    assert_int_equal(st.ldowns, 0);

    /* A notification flood ahead of the result keeps the statement alive too. */
    result_t flood = {0}, probe = {0};
    assert_int_equal(cm_pg_listen_query(pg, "listen busy_ch", 0, NULL, 2000, on_result, &flood), 0);
    assert_true(run_until(&loop, &flood.calls, 1, 2000));
    result_t sent = {0};
    assert_int_equal(cm_pg_query(pg,
                                 "select count(pg_notify('busy_ch', g::text)) "
                                 "from generate_series(1, 50000) g",
                                 0, NULL, 5000, on_result, &sent),
                     0);
    assert_true(run_until(&loop, &sent.calls, 1, 5000));
    assert_true(sent.ok);
    assert_int_equal(cm_pg_listen_query(pg, "select 8", 0, NULL, 100, on_result, &probe), 0);
    assert_true(run_until(&loop, &probe.calls, 1, 5000));
    assert_true(probe.ok);
    assert_true(st.notifies >= 50000);
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

/* Only the LISTEN session's notifications reach on_notify. Behind a transaction pooler a pool
 * connection can sit on a server connection another client LISTENed on; taking what arrives
 * there as ours let the notifier's pooler check pass by luck (its probe NOTIFY, sent from the
 * pool, came back on the pool). Here the pool connection LISTENs itself, as such a server
 * connection would. */
static void pool_notifications_dropped(void **state)
{
    (void)state;
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t st = {0};
    cm_pg_t *pg = open_pg(&loop, &st, 1, 1);
    result_t lis = {0}, n1 = {0}, n2 = {0}, n3 = {0};
    assert_int_equal(cm_pg_query(pg, "listen cm_pool_only", 0, NULL, 1000, on_result, &lis), 0);
    assert_true(run_until(&loop, &lis.calls, 1, 2000));
    assert_true(lis.ok);
    /* The same (only) pool connection notifies its own LISTEN: the server sends it back there. */
    const char *pl[] = {"cm_pool_only", "not ours"};
    assert_int_equal(cm_pg_query(pg, "select pg_notify($1, $2)", 2, pl, 1000, on_result, &n1), 0);
    assert_true(run_until(&loop, &n1.calls, 1, 2000));
    assert_int_equal(cm_pg_query(pg, "select 1", 0, NULL, 1000, on_result, &n2), 0);
    assert_true(run_until(&loop, &n2.calls, 1, 2000));
    /* The LISTEN session's own notification still arrives, and it is the only one. */
    result_t ll = {0};
    assert_int_equal(cm_pg_listen_query(pg, "listen cm_session", 0, NULL, 1000, on_result, &ll), 0);
    assert_true(run_until(&loop, &ll.calls, 1, 2000));
    const char *pl2[] = {"cm_session", "ours"};
    assert_int_equal(cm_pg_query(pg, "select pg_notify($1, $2)", 2, pl2, 1000, on_result, &n3), 0);
    assert_true(run_until(&loop, &st.notifies, 1, 2000));
    assert_string_equal(st.payload, "ours");
    run_for(&loop, 100);
    assert_int_equal(st.notifies, 1);
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
    assert_int_equal(inflight.err, UV_ENOTCONN);
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

/* The first host accepts TCP and never answers: each connection gives it up at its own
 * deadline (libpq would wait forever on this path) and connects to the second host; later
 * reconnects start there. */
static void hung_first_host(void **state)
{
    (void)state;
    long live = cm_alloc_live();
    char user[64], dbname[64], port[16], conninfo[512];
    db_parts(user, dbname, port, sizeof user);
    int hung_port;
    int hung = hung_listener(&hung_port);
    snprintf(conninfo, sizeof conninfo,
             "postgresql://%s@127.0.0.1:%d,127.0.0.1:%s/%s?target_session_attrs=read-write", user,
             hung_port, port, dbname);
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t st = {0};
    uint64_t t0 = uv_hrtime();
    cm_pg_t *pg = open_with(&loop, &st, conninfo, 2, 1, 1000);
    assert_true(run_until(&loop, &st.ups, 1, 5000));
    assert_true(run_until(&loop, &st.lups, 1, 5000));
    double ms = (double)(uv_hrtime() - t0) / 1e6;
    print_message("hung first host: connected to the second after %.0f ms (deadline 1000)\n", ms);
    assert_true(ms >= 990 && ms < 3000);
    assert_int_equal(st.downs + st.ldowns, 0); /* a host given up is not an outage */
    result_t r = {0};
    assert_int_equal(
        cm_pg_query(pg, "select inet_server_port()::text", 0, NULL, 5000, on_result, &r), 0);
    assert_true(run_until(&loop, &r.calls, 1, 6000));
    if (!r.ok)
        print_message("query failed: %s\n", r.error);
    assert_string_equal(r.v[0], port);
    /* A reconnect starts from the host that answered last: the hung one costs nothing more. */
    t0 = uv_hrtime();
    cm_pg_listen_reset(pg);
    assert_true(run_until(&loop, &st.lups, 2, 3000));
    ms = (double)(uv_hrtime() - t0) / 1e6;
    assert_true(ms < 900); /* the hung host would cost 1000 */
    close_pg(&loop, pg);
    finish_loop(&loop);
    close(hung);
    assert_int_equal(cm_alloc_live(), live);
}

/* Every host fails: one report, naming each host with its own error. */
static void every_host_fails(void **state)
{
    (void)state;
    long live = cm_alloc_live();
    int hung_port;
    int hung = hung_listener(&hung_port);
    char conninfo[256];
    snprintf(conninfo, sizeof conninfo, "host=127.0.0.1,127.0.0.1 port=1,%d dbname=x user=x",
             hung_port);
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t st = {0};
    cm_pg_config_t cfg;
    cm_pg_config_defaults(&cfg);
    cfg.conninfo = conninfo;
    cfg.pool_size = 1;
    cfg.connect_timeout_ms = 100;
    cfg.on_state = on_state;
    cfg.ud = &st;
    cm_pg_t *pg = NULL;
    assert_int_equal(cm_pg_open(&loop, &cfg, &pg), 0);
    assert_true(run_until(&loop, &st.downs, 1, 2000));
    run_for(&loop, 300);
    assert_int_equal(st.downs, 1);
    assert_int_equal(st.ups, 0);
    char want[64];
    snprintf(want, sizeof want, "; 127.0.0.1:%d: connect timeout after 100 ms", hung_port);
    assert_non_null(strstr(st.error, "127.0.0.1:1: connection to server"));
    assert_non_null(strstr(st.error, want));
    close_pg(&loop, pg);
    finish_loop(&loop);
    close(hung);
    assert_int_equal(cm_alloc_live(), live);
}

static int standby_port(void)
{
    char path[512];
    snprintf(path, sizeof path, "%s/standby.port", getenv("MARKETS_SERVERS_DIR"));
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    int port = 0;
    assert_int_equal(fscanf(f, "%d", &port), 1);
    fclose(f);
    return port;
}

/* A streaming standby first in the list: target_session_attrs=read-write skips it. Without it,
 * the session lands on the standby, and the first write refused with SQLSTATE 25006 drops that
 * connection rather than keeping it. */
static void read_only_standby_skipped(void **state)
{
    (void)state;
    if (!getenv("MARKETS_SERVERS_DIR"))
        skip();
    assert_int_equal(servers_ctl("standby-start"), 0);
    long live = cm_alloc_live();
    char user[64], dbname[64], port[16], conninfo[512];
    db_parts(user, dbname, port, sizeof user);
    int sport = standby_port();
    uv_loop_t loop;
    uv_loop_init(&loop);

    snprintf(conninfo, sizeof conninfo,
             "postgresql://%s@127.0.0.1:%d,127.0.0.1:%s/%s?target_session_attrs=read-write", user,
             sport, port, dbname);
    state_t st = {0};
    cm_pg_t *pg = open_with(&loop, &st, conninfo, 1, 1, 2000);
    assert_true(run_until(&loop, &st.ups, 1, 3000));
    assert_true(run_until(&loop, &st.lups, 1, 3000));
    result_t r = {0};
    assert_int_equal(cm_pg_query(pg, "select pg_is_in_recovery()::text, inet_server_port()::text",
                                 0, NULL, 5000, on_result, &r),
                     0);
    assert_true(run_until(&loop, &r.calls, 1, 6000));
    assert_string_equal(r.v[0], "false");
    assert_string_equal(r.v[1], port);
    result_t lis = {0};
    assert_int_equal(cm_pg_listen_query(pg, "listen cm_ro", 0, NULL, 5000, on_result, &lis), 0);
    assert_true(run_until(&loop, &lis.calls, 1, 6000));
    assert_true(lis.ok);
    close_pg(&loop, pg);

    /* Without target_session_attrs: the standby answers, until something writes. */
    snprintf(conninfo, sizeof conninfo, "postgresql://%s@127.0.0.1:%d,127.0.0.1:%s/%s", user, sport,
             port, dbname);
    state_t st2 = {0};
    pg = open_with(&loop, &st2, conninfo, 1, 0, 2000);
    assert_true(run_until(&loop, &st2.ups, 1, 3000));
    result_t rec = {0}, write = {0}, after = {0};
    assert_int_equal(
        cm_pg_query(pg, "select pg_is_in_recovery()::text", 0, NULL, 5000, on_result, &rec), 0);
    assert_int_equal(
        cm_pg_query(pg, "create temp table cm_ro (x int)", 0, NULL, 5000, on_result, &write), 0);
    assert_true(run_until(&loop, &write.calls, 1, 6000));
    assert_string_equal(rec.v[0], "true");
    assert_false(write.ok);
    assert_string_equal(write.sqlstate, "25006");
    assert_int_equal(write.err, CM_EREADONLY);
    /* The only pool connection was dropped for it, and comes back (to the standby again: the
     * deployment has to say read-write for more). */
    assert_true(run_until(&loop, &st2.downs, 1, 2000));
    assert_true(run_until(&loop, &st2.ups, 2, 3000));
    assert_int_equal(cm_pg_query(pg, "select 1", 0, NULL, 5000, on_result, &after), 0);
    assert_true(run_until(&loop, &after.calls, 1, 6000));
    assert_true(after.ok);
    cm_pg_stats_t stats;
    cm_pg_stats(pg, &stats);
    assert_int_equal(stats.reconnects, 1);
    close_pg(&loop, pg);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
    assert_int_equal(servers_ctl("standby-drop"), 0);
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

    /* libpq quotes back what it read (a password's unescaped '@' left the rest of it in the
     * host it could not resolve): what a down reports is redacted against the conninfo. Here
     * the socket directory holds the password's text, with no DNS lookup to wait for. */
    st = (state_t){0};
    cfg.conninfo = "postgresql://x:SEKRIT@%2Fnonexistent%2FSEKRIT:1/x";
    assert_int_equal(cm_pg_open(&loop, &cfg, &pg), 0);
    run_for(&loop, 150);
    assert_true(st.downs >= 1);
    print_message("unreachable: down with \"%s\"\n", st.error);
    assert_null(strstr(st.error, "SEKRIT"));
    assert_non_null(strstr(st.error, "***"));
    close_pg(&loop, pg);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

typedef struct {
    int calls, closing, other;
} cancel_t;

static void on_cancel(cm_pg_t *pg, const struct pg_result *res, int err, void *ud)
{
    (void)pg;
    (void)res;
    cancel_t *c = ud;
    c->calls++;
    if (err == UV_ECANCELED)
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
static void on_then_close(cm_pg_t *pg, const struct pg_result *res, int err, void *ud)
{
    on_cancel(pg, res, err, ud);
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
static void on_then_reset(cm_pg_t *pg, const struct pg_result *res, int err, void *ud)
{
    on_result(pg, res, err, ud);
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
    assert_int_equal(b.err, UV_ENOTCONN);
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
    for (int n = 1; n <= 10; n++) {
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
        cmocka_unit_test(bad_config),
        cmocka_unit_test(numeric_round_trip),
        cmocka_unit_test(many_concurrent),
        cmocka_unit_test(query_timeout),
        cmocka_unit_test(listen_notify),
        cmocka_unit_test(listen_reset_from_callback),
        cmocka_unit_test(pool_notifications_dropped),
        cmocka_unit_test(restart),
        cmocka_unit_test(unreachable),
        cmocka_unit_test(hung_first_host),
        cmocka_unit_test(every_host_fails),
        cmocka_unit_test(read_only_standby_skipped),
        cmocka_unit_test(close_in_flight),
        cmocka_unit_test(close_from_callback),
        cmocka_unit_test(queue_bound),
        cmocka_unit_test(open_out_of_memory),
        cmocka_unit_test(busy_loop_is_not_a_timeout),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
