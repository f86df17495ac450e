/*
 * The leader's publish pipeline (order-notifier/leader.c, included; election.c linked) with fakes
 * for Redis, the LISTEN session and the outbox reader: the order in which events reach Redis,
 * whatever the notifications, the catch-up and the Redis link do. And the checks of the election: a
 * session that does not stay on the lock's backend (a transaction-mode pooler) never leads.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <inttypes.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <string.h>
#include <uv.h>

#include "leader.c"
#include "cm/json.h"

/* ---- fakes ---------------------------------------------------------------------------- */

#define MAXPUB 256
typedef struct {
    char chan[64];
    int64_t id;
    cm_redis_reply_fn cb;
    void *ud;
} sent_t;

static struct {
    int redis_up;
    sent_t sent[MAXPUB];
    int nsent;
    cm_pg_result_fn listen_cb;
    void *listen_ud;
    char listen_sql[512];
    cm_pg_result_fn pool_cb; /* the pool statement in flight (the election's pooler check) */
    void *pool_ud;
    char pool_sql[512];
    char pool_param[64]; /* its first parameter (the LISTEN check's token) */
    int client_pid;      /* PQbackendPID of the LISTEN session */
    on_outbox_row_fn row;
    on_outbox_done_fn done;
    void *read_ud;
    on_outbox_query_t q;
    int reads, cancels;
} F;

int cm_redis_is_up(const cm_redis_t *r)
{
    (void)r;
    return F.redis_up;
}

int cm_redis_command_argv_opts(cm_redis_t *r, const cm_redis_cmd_opts_t *opts, cm_redis_reply_fn cb,
                               void *ud, int argc, const char **argv, const size_t *argvlen)
{
    (void)r;
    assert_non_null(opts);
    assert_int_equal(opts->timeout_ms, 0); /* a deep pipeline must not time out */
    assert_int_equal(argc, 3);
    if (!F.redis_up)
        return UV_ENOTCONN;
    assert_true(F.nsent < MAXPUB);
    sent_t *s = &F.sent[F.nsent++];
    snprintf(s->chan, sizeof s->chan, "%s", argv[1]);
    double at;
    int64_t oid;
    const char *frame;
    size_t frame_len;
    assert_int_equal(
        on_event_envelope_parse(argv[2], argvlen[2], &s->id, &at, &oid, &frame, &frame_len), 0);
    s->cb = cb;
    s->ud = ud;
    return 0;
}

int cm_pg_listen_query(cm_pg_t *pg, const char *sql, int nparams, const char *const *params,
                       uint64_t timeout_ms, cm_pg_result_fn cb, void *ud)
{
    (void)pg;
    (void)nparams;
    (void)params;
    (void)timeout_ms;
    F.listen_cb = cb;
    F.listen_ud = ud;
    snprintf(F.listen_sql, sizeof F.listen_sql, "%s", sql);
    return 0;
}

void cm_pg_listen_reset(cm_pg_t *pg)
{
    (void)pg;
}

int cm_pg_query(cm_pg_t *pg, const char *sql, int nparams, const char *const *params,
                uint64_t timeout_ms, cm_pg_result_fn cb, void *ud)
{
    (void)pg;
    (void)timeout_ms;
    F.pool_cb = cb;
    F.pool_ud = ud;
    snprintf(F.pool_sql, sizeof F.pool_sql, "%s", sql);
    snprintf(F.pool_param, sizeof F.pool_param, "%s", nparams > 0 ? params[0] : "");
    return 0;
}

const char *cm_pg_error_detail(const cm_pg_t *pg)
{
    (void)pg;
    return "fake detail";
}

int cm_pg_listen_backend_pid(const cm_pg_t *pg)
{
    (void)pg;
    return F.client_pid;
}

int on_outbox_read(cm_pg_t *pg, const on_outbox_query_t *q, on_outbox_row_fn row,
                   on_outbox_done_fn done, void *ud, on_outbox_read_t **out)
{
    (void)pg;
    F.q = *q;
    F.row = row;
    F.done = done;
    F.read_ud = ud;
    F.reads++;
    if (out)
        *out = (on_outbox_read_t *)&F;
    return 0;
}

void on_outbox_cancel(on_outbox_read_t *r)
{
    if (r)
        F.cancels++;
}

/* ---- helpers -------------------------------------------------------------------------- */

static uv_loop_t loop;
static on_app_t app;
static on_leader_t *L;

static const char *payload(int64_t id, const char *status, char *buf, size_t n)
{
    snprintf(buf, n,
             "{\"id\":%" PRId64 ",\"user_id\":\"u1\",\"event_type\":\"order.updated\","
             "\"created_at\":\"1\",\"order\":{\"id\":7,\"user_id\":\"u1\",\"status\":\"%s\"}}",
             id, status);
    return buf;
}

static void notify(int64_t id)
{
    char buf[256];
    on_leader_notify(L, "ch", payload(id, "open", buf, sizeof buf));
}

static void notify_big(int64_t id)
{
    char buf[64];
    snprintf(buf, sizeof buf, "{\"id\":%" PRId64 "}", id);
    on_leader_notify(L, "ch", buf);
}

/* Hands one outbox row to the read in flight. */
static void read_row(int64_t id)
{
    char order[128], idtext[24];
    snprintf(order, sizeof order, "{\"id\":7,\"user_id\":\"u1\",\"status\":\"row%" PRId64 "\"}",
             id);
    snprintf(idtext, sizeof idtext, "%" PRId64, id);
    on_event_t ev;
    assert_int_equal(on_event_from_row(id, "u1", "order.updated", order, "1", &ev), 0);
    F.row(&ev, F.read_ud);
}

static void read_done(int status)
{
    on_outbox_done_fn done = F.done;
    F.done = NULL;
    done(status, 0, F.read_ud);
}

/* A one-row result of text columns. */
static PGresult *row_result(int n, const char *const *v)
{
    PGresult *res = PQmakeEmptyPGresult(NULL, PGRES_TUPLES_OK);
    PGresAttDesc attrs[4];
    for (int i = 0; i < n; i++)
        attrs[i] = (PGresAttDesc){.name = (char *)"c", .typid = 25, .typlen = -1, .atttypmod = -1};
    assert_true(PQsetResultAttrs(res, n, attrs));
    for (int i = 0; i < n; i++)
        assert_true(PQsetvalue(res, 0, i, (char *)v[i], (int)strlen(v[i])));
    return res;
}

/* Answers the LISTEN session's statement in flight with one row. */
static void answer_listen(int n, const char *const *v)
{
    PGresult *res = row_result(n, v);
    cm_pg_result_fn cb = F.listen_cb;
    F.listen_cb = NULL;
    cb(NULL, res, 0, F.listen_ud);
    PQclear(res);
}

static void answer_pool(const char *v)
{
    PGresult *res = row_result(1, &v);
    cm_pg_result_fn cb = F.pool_cb;
    F.pool_cb = NULL;
    cb(NULL, res, 0, F.pool_ud);
    PQclear(res);
}

/* The lock attempt ran on backend `pid` and was granted (`got` "t") or not; the next statement
 * of the session ran on `then_pid`, which holds `held` such locks. */
static void try_lock_on(const char *got, const char *pid, const char *then_pid, const char *held)
{
    on_leader_listen_state(L, 1);
    assert_non_null(strstr(F.listen_sql, "pg_try_advisory_lock"));
    assert_non_null(strstr(F.listen_sql, "pg_backend_pid()"));
    answer_listen(2, (const char *const[]){got, pid});
    assert_non_null(strstr(F.listen_sql, "pg_locks"));
    answer_listen(2, (const char *const[]){then_pid, held});
}

static void take_lock(const char *pid, const char *then_pid, const char *held)
{
    try_lock_on("t", pid, then_pid, held);
}

/* Behind a pooler: the session LISTENs on the probe channel, then a pool statement on backend
 * `sender` NOTIFYs it. */
static void probe_sent_from(const char *sender)
{
    assert_non_null(strstr(F.listen_sql, "LISTEN markets_notifier_probe"));
    answer_listen(0, NULL);
    assert_non_null(strstr(F.pool_sql, "pg_notify('markets_notifier_probe'"));
    assert_true(F.pool_param[0] != '\0');
    answer_pool(sender);
}

/* The probe's notification reaches the LISTEN session. */
static void probe_arrives(int be_pid)
{
    assert_true(on_leader_probe_notify(L, "markets_notifier_probe", F.pool_param, be_pid));
}

static void answer_unlisten(void)
{
    assert_non_null(strstr(F.listen_sql, "UNLISTEN markets_notifier_probe"));
    answer_listen(0, NULL);
}

/* Lock granted on a direct connection, LISTEN done, the catch-up read started (not
 * answered). */
static void become_leader(void)
{
    F.redis_up = 1;
    F.client_pid = 4242;
    take_lock("4242", "4242", "1");
    assert_null(F.pool_cb); /* direct: no pooler to look for */
    assert_non_null(strstr(F.listen_sql, "LISTEN"));
    F.listen_cb(NULL, NULL, 0, F.listen_ud);
    assert_true(on_leader_is_leader(L));
    assert_int_equal(F.reads, 1);
    assert_true(F.q.since > 0); /* the catch-up looks back in time */
}

/* The ids published to the user's channel so far, in order. */
static int user_ids(int64_t *out)
{
    int n = 0;
    for (int i = 0; i < F.nsent; i++)
        if (strcmp(F.sent[i].chan, "orders:user:u1") == 0)
            out[n++] = F.sent[i].id;
    return n;
}

/* Redis answers every PUBLISH sent and not answered yet. */
static int answered;
static void confirm_all(int status)
{
    for (; answered < F.nsent; answered++)
        F.sent[answered].cb(NULL, NULL, status, F.sent[answered].ud);
}

static int setup(void **state)
{
    (void)state;
    memset(&F, 0, sizeof F);
    answered = 0;
    uv_loop_init(&loop);
    memset(&app, 0, sizeof app);
    app.loop = &loop;
    app.cfg.lookback_ms = 30000;
    app.cfg.lock_retry_ms = 1000;
    app.cfg.liveness_ms = 2000;
    app.cfg.lock_key = 42;
    app.cfg.pg_channel = "ch";
    app.registry = cm_metrics_new();
    app.m.events_received = cm_metrics_counter(app.registry, "r_total", "r", NULL);
    app.m.events_published = cm_metrics_counter(app.registry, "p_total", "p", NULL);
    app.m.leader = cm_metrics_gauge(app.registry, "l", "l", NULL);
    app.m.pg_listener_up = cm_metrics_gauge(app.registry, "u", "u", NULL);
    assert_int_equal(on_leader_new(&app, &L), 0);
    return 0;
}

static int stopped;
static void on_stopped(void *ud)
{
    (void)ud;
    stopped = 1;
}

static int teardown(void **state)
{
    (void)state;
    stopped = 0;
    on_leader_stop(L, on_stopped, NULL);
    if (F.listen_cb && strstr(F.listen_sql, "unlock"))
        F.listen_cb(NULL, NULL, 0, F.listen_ud);
    confirm_all(UV_ECANCELED);
    if (F.done)
        read_done(UV_ECANCELED);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_true(stopped);
    assert_int_equal(uv_loop_close(&loop), 0);
    cm_metrics_free(app.registry);
    return 0;
}

/* ---- tests ---------------------------------------------------------------------------- */

/* An event too big for NOTIFY holds the ones behind it until its row is read. */
static void big_event_holds_what_follows(void **state)
{
    (void)state;
    become_leader();
    read_done(0); /* nothing to catch up */
    notify(10);
    notify_big(11);
    notify(12);
    int64_t ids[16];
    assert_int_equal(user_ids(ids), 1);
    assert_int_equal(ids[0], 10);
    /* The row read was asked for exactly id 11. */
    assert_int_equal(F.q.after_id, 10);
    assert_int_equal(F.q.upto_id, 11);
    read_row(11);
    read_done(0);
    assert_int_equal(user_ids(ids), 3);
    assert_int_equal(ids[1], 11);
    assert_int_equal(ids[2], 12);
    /* Every event goes to the all-users channel too, right after its user's. */
    assert_int_equal(F.nsent, 6);
    assert_string_equal(F.sent[1].chan, "orders:all");
    assert_int_equal(F.sent[1].id, 10);
    confirm_all(0);
}

/* Notifications during the catch-up wait and are merged in id order; repeats are skipped. */
static void catch_up_merges_in_id_order(void **state)
{
    (void)state;
    become_leader();
    notify(105);
    notify(103);
    int64_t ids[16];
    assert_int_equal(user_ids(ids), 0);
    read_row(101);
    read_row(102);
    read_row(104); /* releases 103 first */
    assert_int_equal(user_ids(ids), 4);
    read_done(0); /* releases 105 */
    notify(102);  /* a late copy of a caught-up event */
    int n = user_ids(ids);
    const int64_t want[] = {101, 102, 103, 104, 105};
    assert_int_equal(n, 5);
    assert_memory_equal(ids, want, sizeof want);
    confirm_all(0);
}

/* What Redis did not confirm is sent again first, in order; what it confirmed is not. */
static void unconfirmed_publishes_go_again_in_order(void **state)
{
    (void)state;
    become_leader();
    read_done(0);
    notify(1);
    notify(2);
    notify(3);
    assert_int_equal(F.nsent, 6);
    /* 1 confirmed (both channels), then the link drops under 2 and 3. */
    F.sent[0].cb(NULL, NULL, 0, F.sent[0].ud);
    F.sent[1].cb(NULL, NULL, 0, F.sent[1].ud);
    F.redis_up = 0;
    for (answered = 2; answered < 6; answered++)
        F.sent[answered].cb(NULL, NULL, UV_ECONNRESET, F.sent[answered].ud);
    notify(4); /* queued while down */
    assert_int_equal(F.nsent, 6);
    F.redis_up = 1;
    on_leader_redis_up(L);
    int64_t ids[16];
    int n = user_ids(ids);
    const int64_t want[] = {1, 2, 3, 2, 3, 4};
    assert_int_equal(n, 6);
    assert_memory_equal(ids, want, sizeof want);
    confirm_all(0);
}

/* Leadership lost: nothing queued goes out any more (the next leader catches up). */
static void lost_leadership_stops_publishing(void **state)
{
    (void)state;
    become_leader();
    read_done(0);
    F.redis_up = 0;
    notify(1);
    notify(2);
    on_leader_listen_state(L, 0);
    assert_false(on_leader_is_leader(L));
    F.redis_up = 1;
    on_leader_redis_up(L);
    assert_int_equal(F.nsent, 0);
    notify(3);
    assert_int_equal(F.nsent, 0);
}

/* A catch-up that fails keeps holding; the retry merges what it finds. */
static void failed_catch_up_is_retried(void **state)
{
    (void)state;
    become_leader();
    read_row(5);
    notify(7);
    read_done(UV_EIO);
    int64_t ids[16];
    assert_int_equal(user_ids(ids), 1); /* 5; 7 still held */
    uv_run(&loop, UV_RUN_ONCE);         /* the retry timer */
    assert_int_equal(F.reads, 2);
    read_row(5); /* published already */
    read_row(6);
    read_done(0);
    int n = user_ids(ids);
    const int64_t want[] = {5, 6, 7};
    assert_int_equal(n, 3);
    assert_memory_equal(ids, want, sizeof want);
    confirm_all(0);
}

/* The refusal as /readyz shows it: set, with `words` in it, and the replica not leading. */
static void assert_refused(const char *words)
{
    const char *why = on_leader_refusal(L);
    assert_non_null(why);
    assert_non_null(strstr(why, words));
    assert_false(on_leader_is_leader(L));
    /* Best effort, the lock is released where it sits; then a slow retry. */
    assert_non_null(strstr(F.listen_sql, "pg_advisory_unlock"));
    F.listen_cb(NULL, NULL, 0, F.listen_ud);
    assert_true(uv_timer_get_due_in(&L->election.timer) > 20000);
}

/* A pooler that rotates server connections: the second statement ran elsewhere. */
static void backend_changing_between_statements_refuses(void **state)
{
    (void)state;
    F.client_pid = 777; /* the pooler's made-up key */
    take_lock("100", "101", "0");
    assert_refused("two server backends");
    assert_null(F.pool_cb);
    /* A new session does not change the verdict before the slow retry. */
    on_leader_listen_state(L, 0);
    F.listen_cb = NULL;
    on_leader_listen_state(L, 1);
    assert_null(F.listen_cb);
    assert_true(uv_timer_get_due_in(&L->election.timer) > 20000);
    assert_non_null(on_leader_refusal(L));
}

/* A pooler that reuses the freed server connection (pgbouncer's default): our statements stay
 * on one backend, but another client lands on it too. */
static void lock_backend_shared_with_another_client_refuses(void **state)
{
    (void)state;
    F.client_pid = 777;
    take_lock("100", "100", "1");
    assert_null(on_leader_refusal(L)); /* not yet decided */
    probe_sent_from("100");
    assert_refused("another client");
}

/* A transaction pooler where other traffic took the freed server connection first, so our
 * pool statement ran elsewhere: the notification it sent never reaches the session. */
static void notification_lost_refuses(void **state)
{
    (void)state;
    app.cfg.liveness_ms = 20;
    F.client_pid = 777;
    take_lock("100", "100", "1");
    probe_sent_from("200");
    assert_null(on_leader_refusal(L));
    uv_run(&loop, UV_RUN_ONCE); /* the wait ends */
    assert_refused("did not reach the LISTEN session");
    /* A late copy changes nothing. */
    assert_true(on_leader_probe_notify(L, "markets_notifier_probe", F.pool_param, 200));
    assert_false(on_leader_is_leader(L));
    /* Other channels are not the check's. */
    assert_false(on_leader_probe_notify(L, "ch", "x", 1));
}

/* A standby behind a transaction pooler mostly lands where the lock is not: it refuses too,
 * rather than look like a healthy standby (it releases nothing it did not take). */
static void standby_behind_shared_pooler_refuses(void **state)
{
    (void)state;
    F.client_pid = 777;
    try_lock_on("f", "100", "100", "0");
    probe_sent_from("100");
    const char *why = on_leader_refusal(L);
    assert_non_null(why);
    assert_non_null(strstr(why, "another client"));
    assert_null(F.listen_cb); /* no unlock */
    assert_true(uv_timer_get_due_in(&L->election.timer) > 20000);
}

/* A standby behind a session pooler stands by, checked at each attempt; a direct one is not
 * checked at all (one statement per attempt). */
static void standby_checks(void **state)
{
    (void)state;
    app.cfg.lock_retry_ms = 20;
    F.client_pid = 777;
    try_lock_on("f", "100", "100", "0");
    probe_sent_from("200");
    probe_arrives(200);
    answer_unlisten();
    assert_null(on_leader_refusal(L));
    assert_false(on_leader_is_leader(L));
    assert_null(F.listen_cb);
    /* The next attempt, at lock_retry_ms, on the same session: no checks again. */
    uv_run(&loop, UV_RUN_ONCE);
    assert_non_null(strstr(F.listen_sql, "pg_try_advisory_lock"));
    answer_listen(2, (const char *const[]){"f", "100"});
    assert_null(F.listen_cb);
    on_leader_listen_state(L, 0);
    F.client_pid = 300;
    on_leader_listen_state(L, 1);
    answer_listen(2, (const char *const[]){"f", "300"});
    assert_null(F.listen_cb);
    assert_null(on_leader_refusal(L));
}

/* A session-mode pooler: the same checks pass, and the replica leads. */
static void session_pooler_leads(void **state)
{
    (void)state;
    F.redis_up = 1;
    F.client_pid = 777;
    take_lock("100", "100", "1");
    assert_non_null(strstr(F.listen_sql, "LISTEN markets_notifier_probe"));
    answer_listen(0, NULL);
    probe_arrives(200); /* before the statement that sent it is answered: fine */
    answer_pool("200");
    answer_unlisten();
    assert_non_null(strstr(F.listen_sql, "LISTEN \"ch\""));
    F.listen_cb(NULL, NULL, 0, F.listen_ud);
    assert_true(on_leader_is_leader(L));
    assert_null(on_leader_refusal(L));
    read_done(0);
}

/* While leading, a liveness check that lands on another backend ends the leadership. */
static void liveness_on_another_backend_refuses(void **state)
{
    (void)state;
    app.cfg.liveness_ms = 20;
    become_leader();
    read_done(0);
    uv_run(&loop, UV_RUN_ONCE); /* the liveness timer */
    assert_non_null(strstr(F.listen_sql, "pg_backend_pid()"));
    answer_listen(1, (const char *const[]){"4242"});
    assert_true(on_leader_is_leader(L)); /* same backend: still leading */
    uv_run(&loop, UV_RUN_ONCE);
    answer_listen(1, (const char *const[]){"5000"});
    assert_refused("moved from server backend 4242 to 5000");
    notify(1);
    assert_int_equal(F.nsent, 0);
}

int main(void)
{
    cm_json_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(big_event_holds_what_follows, setup, teardown),
        cmocka_unit_test_setup_teardown(catch_up_merges_in_id_order, setup, teardown),
        cmocka_unit_test_setup_teardown(unconfirmed_publishes_go_again_in_order, setup, teardown),
        cmocka_unit_test_setup_teardown(lost_leadership_stops_publishing, setup, teardown),
        cmocka_unit_test_setup_teardown(failed_catch_up_is_retried, setup, teardown),
        cmocka_unit_test_setup_teardown(backend_changing_between_statements_refuses, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(lock_backend_shared_with_another_client_refuses, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(session_pooler_leads, setup, teardown),
        cmocka_unit_test_setup_teardown(standby_behind_shared_pooler_refuses, setup, teardown),
        cmocka_unit_test_setup_teardown(standby_checks, setup, teardown),
        cmocka_unit_test_setup_teardown(notification_lost_refuses, setup, teardown),
        cmocka_unit_test_setup_teardown(liveness_on_another_backend_refuses, setup, teardown),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    return rc || cm_alloc_live() != 0;
}
