/*
 * Integration tests of cm/redis.h against a real redis-server (REDIS_URL). The restart tests
 * and the SIGSTOP test also need MARKETS_SERVERS_DIR (the folder given to scripts/servers.sh
 * start); without it they are skipped.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <uv.h>

#include <hiredis/hiredis.h>

#include "loop_util.h"
#include "redis_util.h"
#include "cm/alloc.h"
#include "cm/log.h"
#include "cm/redis.h"

static const char *redis_url;

/* ---------------------------------------------------------------------------------------- */
/* Helpers                                                                                    */

static cm_redis_t *open_client(uv_loop_t *loop, state_t *st, uint64_t timeout_ms, const char *name)
{
    cm_redis_config_t cfg;
    cm_redis_config_defaults(&cfg);
    cfg.url = redis_url;
    cfg.timeout_ms = timeout_ms;
    cfg.connect_timeout_ms = 300;
    cfg.backoff_min_ms = 20;
    cfg.backoff_max_ms = 200;
    cfg.on_state = on_state;
    cfg.ud = st;
    cfg.name = name;
    cm_redis_t *r = NULL;
    assert_int_equal(cm_redis_open(loop, &cfg, &r), 0);
    assert_non_null(r);
    assert_true(run_until(loop, &st->ups, 1, 2000));
    assert_true(cm_redis_is_up(r));
    return r;
}

typedef struct {
    int calls;
    int status;
    int type;
    char str[128];
    uint64_t at_ms;
} reply_t;

static void on_reply(cm_redis_t *r, struct redisReply *reply, int status, void *ud)
{
    (void)r;
    reply_t *out = ud;
    out->calls++;
    out->status = status;
    out->type = reply ? reply->type : -1;
    out->str[0] = '\0';
    if (reply && reply->str)
        snprintf(out->str, sizeof out->str, "%.*s", (int)reply->len, reply->str);
    if (reply && reply->type == REDIS_REPLY_INTEGER)
        snprintf(out->str, sizeof out->str, "%lld", reply->integer);
    out->at_ms = uv_hrtime() / 1000000;
    if (status != CM_REDIS_OK)
        assert_null(reply);
}

/* ---------------------------------------------------------------------------------------- */
/* Tests                                                                                      */

static void bad_config(void **state)
{
    (void)state;
    uv_loop_t loop;
    uv_loop_init(&loop);
    cm_redis_config_t cfg;
    cm_redis_config_defaults(&cfg);
    cm_redis_t *r = NULL;
    cfg.url = "http://127.0.0.1/";
    assert_int_equal(cm_redis_open(&loop, &cfg, &r), UV_EINVAL);
    cfg.url = NULL;
    assert_int_equal(cm_redis_open(&loop, &cfg, &r), UV_EINVAL);
    cfg.url = redis_url;
    cfg.timeout_ms = 0;
    assert_int_equal(cm_redis_open(&loop, &cfg, &r), UV_EINVAL);
    assert_null(r);
    finish_loop(&loop);
}

static void set_get_round_trip(void **state)
{
    (void)state;
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t st = {0};
    cm_redis_config_t cfg;
    cm_redis_config_defaults(&cfg);
    cfg.url = redis_url;
    cfg.on_state = on_state;
    cfg.ud = &st;
    cm_redis_t *r;
    assert_int_equal(cm_redis_open(&loop, &cfg, &r), 0);
    /* Not up yet (the first attempt runs from the loop): fail fast, no callback. */
    reply_t early = {0};
    assert_int_equal(cm_redis_command(r, on_reply, &early, "PING"), UV_ENOTCONN);
    assert_int_equal(st.ups, 0);
    assert_true(run_until(&loop, &st.ups, 1, 2000));

    reply_t set = {0}, get = {0}, bin = {0};
    const char *argv[] = {"SET", "cm:test:bin", "a\0b"};
    const size_t lens[] = {3, 11, 3};
    assert_int_equal(cm_redis_command(r, on_reply, &set, "SET %s %s", "cm:test:k", "v1"), 0);
    assert_int_equal(cm_redis_command_argv(r, on_reply, &bin, 3, argv, lens), 0);
    assert_int_equal(cm_redis_command(r, on_reply, &get, "GET %s", "cm:test:k"), 0);
    assert_int_equal(set.calls + get.calls + bin.calls, 0); /* never synchronous */
    assert_true(run_until(&loop, &get.calls, 1, 1000));
    assert_int_equal(set.calls, 1);
    assert_int_equal(set.status, 0);
    assert_string_equal(set.str, "OK");
    assert_int_equal(bin.status, 0);
    assert_int_equal(get.status, 0);
    assert_int_equal(get.type, REDIS_REPLY_STRING);
    assert_string_equal(get.str, "v1");

    /* An error reply is status 0 with an error reply. */
    reply_t err = {0};
    assert_int_equal(cm_redis_command(r, on_reply, &err, "NOSUCHCOMMAND"), 0);
    assert_true(run_until(&loop, &err.calls, 1, 1000));
    assert_int_equal(err.status, 0);
    assert_int_equal(err.type, REDIS_REPLY_ERROR);

    /* Fire and forget. */
    assert_int_equal(cm_redis_command(r, NULL, NULL, "DEL %s", "cm:test:bin"), 0);

    /* A PING needs a callback. */
    assert_int_equal(cm_redis_ping(r, NULL, NULL), UV_EINVAL);

    cm_redis_stats_t stats;
    cm_redis_stats(r, &stats);
    assert_int_equal(stats.timeouts, 0);
    assert_int_equal(stats.reconnects, 0);
    close_client(&loop, r);
    assert_int_equal(st.downs, 0);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

typedef struct {
    int calls;
    int status;
    double ms;
} ping_t;

static void on_ping(cm_redis_t *r, int status, double latency_ms, void *ud)
{
    (void)r;
    ping_t *p = ud;
    p->calls++;
    p->status = status;
    p->ms = latency_ms;
}

static void ping_latency(void **state)
{
    (void)state;
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t st = {0};
    cm_redis_t *r = open_client(&loop, &st, 100, "cache");
    ping_t p1 = {0}, p2 = {0};
    assert_int_equal(cm_redis_ping(r, on_ping, &p1), 0);
    assert_int_equal(cm_redis_ping(r, on_ping, &p2), 0);
    assert_int_equal(p1.calls, 0);
    assert_true(run_until(&loop, &p2.calls, 1, 1000));
    assert_int_equal(p1.calls, 1);
    assert_int_equal(p1.status, 0);
    assert_true(p1.ms >= 0 && p1.ms < 500);
    cm_redis_stats_t stats;
    cm_redis_stats(r, &stats);
    assert_true(stats.last_ping_ms > 0);
    close_client(&loop, r);
    finish_loop(&loop);
}

/* CLIENT PAUSE from a second connection holds the server for the first one. A pause shorter
 * than the stall window (timeout_ms) is not a stall: commands past their own deadline get
 * UV_ETIMEDOUT, their late replies are dropped, and commands sent after them get their own
 * replies, never one of the late ones. */
static void own_deadline_is_not_a_stall(void **state)
{
    (void)state;
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t sa = {0}, sb = {0};
    cm_redis_t *a = open_client(&loop, &sa, 1000, "a");
    cm_redis_t *b = open_client(&loop, &sb, 5000, "b");

    reply_t pause = {0};
    assert_int_equal(cm_redis_command(b, on_reply, &pause, "CLIENT PAUSE 300"), 0);
    assert_true(run_until(&loop, &pause.calls, 1, 1000));
    assert_int_equal(pause.status, 0);
    assert_string_equal(pause.str, "OK");

    const cm_redis_cmd_opts_t short_dl = {.timeout_ms = 100}, long_dl = {.timeout_ms = 2000};
    reply_t late[5] = {{0}}, fresh[5] = {{0}};
    char arg[5][16];
    uint64_t t0 = uv_hrtime() / 1000000;
    for (int i = 0; i < 5; i++) {
        snprintf(arg[i], sizeof arg[i], "late-%d", i);
        const char *argv[2] = {"ECHO", arg[i]};
        assert_int_equal(
            cm_redis_command_argv_opts(a, &short_dl, on_reply, &late[i], 2, argv, NULL), 0);
    }
    assert_true(run_until(&loop, &late[4].calls, 1, 1000));
    for (int i = 0; i < 5; i++) {
        assert_int_equal(late[i].calls, 1);
        assert_int_equal(late[i].status, UV_ETIMEDOUT);
        assert_in_range(late[i].at_ms - t0, 95, 290); /* the pause is 300 */
    }
    /* Still paused: these queue behind the late ones, with room to wait. */
    for (int i = 0; i < 5; i++) {
        snprintf(arg[i], sizeof arg[i], "fresh-%d", i);
        const char *argv[2] = {"ECHO", arg[i]};
        assert_int_equal(
            cm_redis_command_argv_opts(a, &long_dl, on_reply, &fresh[i], 2, argv, NULL), 0);
    }
    assert_true(run_until(&loop, &fresh[4].calls, 1, 2000));
    for (int i = 0; i < 5; i++) {
        char want[16];
        snprintf(want, sizeof want, "fresh-%d", i);
        assert_int_equal(fresh[i].calls, 1);
        assert_int_equal(fresh[i].status, CM_REDIS_OK);
        assert_string_equal(fresh[i].str, want);
        assert_int_equal(late[i].calls, 1); /* the late reply was dropped */
    }
    assert_true(cm_redis_is_up(a));
    reply_t again = {0};
    assert_int_equal(cm_redis_command(a, on_reply, &again, "PING"), 0);
    assert_true(run_until(&loop, &again.calls, 1, 1000));
    assert_int_equal(again.status, 0);
    assert_string_equal(again.str, "PONG");
    cm_redis_stats_t stats;
    cm_redis_stats(a, &stats);
    assert_int_equal(stats.timeouts, 5);
    assert_int_equal(stats.stalls, 0);
    assert_int_equal(stats.reconnects, 0);
    assert_int_equal(sa.downs, 0);

    close_client(&loop, a);
    close_client(&loop, b);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

/* 100,000 commands queued in one loop turn, far more than a healthy server answers within
 * timeout_ms: the link stays up, and each callback gets its own reply. */
#define PIPE_N 100000

typedef struct {
    int calls, ok, wrong, timedout, other;
    long long base; /* INCR: the value before the first command */
} pipe_t;
static pipe_t pipe_st;

static void on_pipe_echo(cm_redis_t *r, struct redisReply *reply, int status, void *ud)
{
    (void)r;
    char want[24];
    snprintf(want, sizeof want, "%d", (int)(uintptr_t)ud);
    pipe_st.calls++;
    if (status != CM_REDIS_OK)
        pipe_st.other++;
    else if (reply->type == REDIS_REPLY_STRING && strcmp(reply->str, want) == 0)
        pipe_st.ok++;
    else
        pipe_st.wrong++;
}

static void on_pipe_incr(cm_redis_t *r, struct redisReply *reply, int status, void *ud)
{
    (void)r;
    long long want = pipe_st.base + (long long)(uintptr_t)ud + 1;
    pipe_st.calls++;
    if (status == UV_ETIMEDOUT)
        pipe_st.timedout++;
    else if (status != CM_REDIS_OK)
        pipe_st.other++;
    else if (reply->type == REDIS_REPLY_INTEGER && reply->integer == want)
        pipe_st.ok++;
    else
        pipe_st.wrong++;
}

static void deep_pipeline_is_not_a_stall(void **state)
{
    (void)state;
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t st = {0};
    cm_redis_t *r = open_client(&loop, &st, 100, "pipe");
    char num[24];

    /* No own deadline (how the notifier publishes): nothing may fail. */
    const cm_redis_cmd_opts_t no_dl = {0};
    memset(&pipe_st, 0, sizeof pipe_st);
    for (int i = 0; i < PIPE_N; i++) {
        snprintf(num, sizeof num, "%d", i);
        const char *argv[2] = {"ECHO", num};
        assert_int_equal(cm_redis_command_argv_opts(r, &no_dl, on_pipe_echo, (void *)(uintptr_t)i,
                                                    2, argv, NULL),
                         0);
    }
    assert_int_equal(pipe_st.calls, 0);
    assert_true(run_until(&loop, &pipe_st.calls, PIPE_N, 30000));
    assert_int_equal(pipe_st.ok, PIPE_N);
    assert_int_equal(pipe_st.wrong + pipe_st.other, 0);

    /* The default own deadline (timeout_ms): the tail may time out for its caller, but the
     * link stays up and no reply reaches the wrong command. */
    reply_t del = {0};
    assert_int_equal(cm_redis_command(r, on_reply, &del, "DEL cm:test:pipe"), 0);
    assert_true(run_until(&loop, &del.calls, 1, 1000));
    memset(&pipe_st, 0, sizeof pipe_st);
    for (int i = 0; i < PIPE_N; i++) {
        const char *argv[2] = {"INCR", "cm:test:pipe"};
        assert_int_equal(
            cm_redis_command_argv(r, on_pipe_incr, (void *)(uintptr_t)i, 2, argv, NULL), 0);
    }
    assert_true(run_until(&loop, &pipe_st.calls, PIPE_N, 30000));
    assert_int_equal(pipe_st.ok + pipe_st.timedout, PIPE_N);
    assert_int_equal(pipe_st.wrong + pipe_st.other, 0);
    /* Every INCR ran once, timed out for its caller or not. The GET waits behind the INCRs
     * whose callers gave up but that Redis still runs: no own deadline for it either. */
    reply_t get = {0};
    const char *get_argv[2] = {"GET", "cm:test:pipe"};
    assert_int_equal(cm_redis_command_argv_opts(r, &no_dl, on_reply, &get, 2, get_argv, NULL), 0);
    assert_true(run_until(&loop, &get.calls, 1, 5000));
    assert_int_equal(get.status, 0);
    assert_int_equal(atoi(get.str), PIPE_N);

    cm_redis_stats_t stats;
    cm_redis_stats(r, &stats);
    assert_int_equal(stats.stalls, 0);
    assert_int_equal(stats.reconnects, 0);
    assert_int_equal(stats.errors, 0);
    assert_int_equal(stats.timeouts, (uint64_t)pipe_st.timedout);
    assert_int_equal(st.downs, 0);
    assert_true(cm_redis_is_up(r));
    close_client(&loop, r);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

/* A server that stops answering is dropped, reported down, and reconnected once it answers. */
/* A busy loop is not a slow server: replies that arrived while the loop was blocked are read
 * before any deadline is judged (libuv runs timers before polling sockets). */
static void busy_loop_is_not_a_timeout(void **state)
{
    (void)state;
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t st = {0};
    cm_redis_t *r = open_client(&loop, &st, 50, "busy");
    reply_t replies[5] = {{0}};
    for (int round = 0; round < 5; round++) {
        assert_int_equal(cm_redis_command(r, on_reply, &replies[round], "PING"), 0);
        /* Block the loop well past the deadline; Redis answers meanwhile. */
        uint64_t until = uv_hrtime() + 150 * 1000000ull;
        while (uv_hrtime() < until)
            ;
        uv_update_time(&loop);
        assert_true(run_until(&loop, &replies[round].calls, 1, 1000));
        assert_int_equal(replies[round].status, CM_REDIS_OK);
        assert_string_equal(replies[round].str, "PONG");
    }
    cm_redis_stats_t stats;
    cm_redis_stats(r, &stats);
    assert_int_equal(stats.timeouts, 0);
    assert_int_equal(st.downs, 0);
    close_client(&loop, r);
    finish_loop(&loop);
}

static void stalled_server(void **state)
{
    (void)state;
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t sa = {0}, sb = {0};
    cm_redis_t *a = open_client(&loop, &sa, 50, "a");
    cm_redis_t *b = open_client(&loop, &sb, 2000, "b");

    reply_t pause = {0};
    assert_int_equal(cm_redis_command(b, on_reply, &pause, "CLIENT PAUSE 600"), 0);
    assert_true(run_until(&loop, &pause.calls, 1, 1000));

    reply_t r[3] = {{0}};
    for (int i = 0; i < 3; i++)
        assert_int_equal(cm_redis_command(a, on_reply, &r[i], "GET cm:test:k"), 0);
    assert_true(run_until(&loop, &sa.downs, 1, 1000));
    for (int i = 0; i < 3; i++) {
        assert_int_equal(r[i].calls, 1);
        assert_int_equal(r[i].status, UV_ETIMEDOUT);
    }
    assert_false(cm_redis_is_up(a));
    reply_t fast = {0};
    assert_int_equal(cm_redis_command(a, on_reply, &fast, "PING"), UV_ENOTCONN);
    /* Back up after the pause. */
    assert_true(run_until(&loop, &sa.ups, 2, 3000));
    reply_t ok = {0};
    assert_int_equal(cm_redis_command(a, on_reply, &ok, "PING"), 0);
    assert_true(run_until(&loop, &ok.calls, 1, 1000));
    assert_int_equal(ok.status, 0);
    cm_redis_stats_t stats;
    cm_redis_stats(a, &stats);
    assert_true(stats.reconnects >= 1);
    assert_int_equal(stats.timeouts, 3);
    assert_int_equal(stats.stalls, 1);
    assert_int_equal(sa.downs, 1);
    for (int i = 0; i < 3; i++)
        assert_int_equal(r[i].calls, 1);

    close_client(&loop, a);
    close_client(&loop, b);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

/* CLIENT PAUSE longer than the stall window: a command without an own deadline fails with
 * UV_ECONNRESET when the link is dropped, about timeout_ms after it was written; the client
 * reconnects once the pause is over. */
static void stall_detected_in_time(void **state)
{
    (void)state;
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t sa = {0}, sb = {0};
    cm_redis_t *a = open_client(&loop, &sa, 100, "a");
    cm_redis_t *b = open_client(&loop, &sb, 5000, "b");

    reply_t pause = {0};
    assert_int_equal(cm_redis_command(b, on_reply, &pause, "CLIENT PAUSE 1500 ALL"), 0);
    assert_true(run_until(&loop, &pause.calls, 1, 1000));
    assert_string_equal(pause.str, "OK");
    uint64_t paused_at = uv_hrtime() / 1000000;

    const cm_redis_cmd_opts_t no_dl = {0};
    const char *argv[2] = {"ECHO", "held"};
    reply_t held = {0};
    uint64_t t0 = uv_hrtime() / 1000000;
    assert_int_equal(cm_redis_command_argv_opts(a, &no_dl, on_reply, &held, 2, argv, NULL), 0);
    assert_true(run_until(&loop, &sa.downs, 1, 1000));
    uint64_t took = uv_hrtime() / 1000000 - t0;
    assert_in_range(took, 95, 800); /* the pause is 1500 */
    assert_int_equal(held.calls, 1);
    assert_int_equal(held.status, UV_ECONNRESET);
    assert_false(cm_redis_is_up(a));
    cm_redis_stats_t stats;
    cm_redis_stats(a, &stats);
    assert_int_equal(stats.stalls, 1);
    assert_true(stats.last_stall_ms > 0);
    assert_int_equal(stats.timeouts, 0);

    /* Reconnect attempts fail their handshake while paused; up again once it ends. */
    assert_true(run_until(&loop, &sa.ups, 2, 3000));
    assert_true(uv_hrtime() / 1000000 - paused_at >= 1400);
    reply_t ok = {0};
    assert_int_equal(cm_redis_command_argv_opts(a, &no_dl, on_reply, &ok, 2, argv, NULL), 0);
    assert_true(run_until(&loop, &ok.calls, 1, 1000));
    assert_int_equal(ok.status, 0);
    assert_string_equal(ok.str, "held");
    assert_int_equal(held.calls, 1);
    cm_redis_stats(a, &stats);
    assert_int_equal(stats.reconnects, 1);
    assert_int_equal(stats.stalls, 1);
    assert_int_equal(sa.downs, 1);

    close_client(&loop, a);
    close_client(&loop, b);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

/* The redis-server process of MARKETS_SERVERS_DIR stopped (SIGSTOP) and resumed. */
static long redis_pid(void)
{
    const char *dir = getenv("MARKETS_SERVERS_DIR");
    char path[512];
    if (!dir)
        return -1;
    snprintf(path, sizeof path, "%s/redis/redis.pid", dir);
    FILE *f = fopen(path, "r");
    long pid = -1;
    if (f) {
        if (fscanf(f, "%ld", &pid) != 1)
            pid = -1;
        fclose(f);
    }
    return pid;
}

static long stopped_pid = -1;

static int resume_redis(void **state)
{
    (void)state;
    if (stopped_pid > 0)
        kill((pid_t)stopped_pid, SIGCONT);
    stopped_pid = -1;
    return 0;
}

/* A stopped process still accepts bytes into its socket, answers nothing: the idle health
 * probe finds that out about timeout_ms after it is written. */
static void stopped_server_is_a_stall(void **state)
{
    (void)state;
    long pid = redis_pid();
    if (pid <= 0)
        skip();
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t st = {0};
    cm_redis_config_t cfg;
    cm_redis_config_defaults(&cfg);
    cfg.url = redis_url;
    cfg.timeout_ms = 100;
    cfg.health_interval_ms = 50;
    cfg.connect_timeout_ms = 300;
    cfg.backoff_min_ms = 20;
    cfg.backoff_max_ms = 100;
    cfg.on_state = on_state;
    cfg.ud = &st;
    cfg.name = "sigstop";
    cm_redis_t *r;
    assert_int_equal(cm_redis_open(&loop, &cfg, &r), 0);
    assert_true(run_until(&loop, &st.ups, 1, 2000));

    assert_int_equal(kill((pid_t)pid, SIGSTOP), 0);
    stopped_pid = pid;
    uint64_t t0 = uv_hrtime() / 1000000;
    assert_true(run_until(&loop, &st.downs, 1, 1000));
    /* At most one health interval to the probe, then the stall window. */
    assert_in_range(uv_hrtime() / 1000000 - t0, 95, 800);
    cm_redis_stats_t stats;
    cm_redis_stats(r, &stats);
    assert_int_equal(stats.stalls, 1);

    run_for(&loop, 300);
    assert_int_equal(st.ups, 1);
    resume_redis(NULL);
    assert_true(run_until(&loop, &st.ups, 2, 3000));
    reply_t ping = {0};
    assert_int_equal(cm_redis_command(r, on_reply, &ping, "PING"), 0);
    assert_true(run_until(&loop, &ping.calls, 1, 1000));
    assert_string_equal(ping.str, "PONG");
    cm_redis_stats(r, &stats);
    assert_int_equal(stats.reconnects, 1);
    assert_int_equal(st.downs, 1);
    close_client(&loop, r);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

/* A command without an own deadline behind a pause shorter than the stall window simply gets
 * its reply when the server resumes. */
static void no_deadline_waits_out_a_pause(void **state)
{
    (void)state;
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t sa = {0}, sb = {0};
    cm_redis_t *a = open_client(&loop, &sa, 1000, "a");
    cm_redis_t *b = open_client(&loop, &sb, 5000, "b");

    reply_t pause = {0};
    assert_int_equal(cm_redis_command(b, on_reply, &pause, "CLIENT PAUSE 300"), 0);
    assert_true(run_until(&loop, &pause.calls, 1, 1000));
    const cm_redis_cmd_opts_t no_dl = {0};
    const char *argv[2] = {"ECHO", "waited"};
    reply_t w = {0};
    uint64_t t0 = uv_hrtime() / 1000000;
    assert_int_equal(cm_redis_command_argv_opts(a, &no_dl, on_reply, &w, 2, argv, NULL), 0);
    assert_true(run_until(&loop, &w.calls, 1, 2000));
    assert_int_equal(w.status, CM_REDIS_OK);
    assert_string_equal(w.str, "waited");
    assert_in_range(w.at_ms - t0, 200, 900);
    cm_redis_stats_t stats;
    cm_redis_stats(a, &stats);
    assert_int_equal(stats.timeouts, 0);
    assert_int_equal(stats.stalls, 0);
    assert_int_equal(sa.downs, 0);

    close_client(&loop, a);
    close_client(&loop, b);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

typedef struct {
    int n;
    char last[64];
    char channel[64];
} msgs_t;

static void on_message(cm_redis_t *r, const char *channel, const char *payload, size_t len,
                       void *ud)
{
    (void)r;
    msgs_t *m = ud;
    m->n++;
    snprintf(m->last, sizeof m->last, "%.*s", (int)len, payload);
    snprintf(m->channel, sizeof m->channel, "%s", channel);
}

/* Publishes `payload` every 20 ms until the subscriber got one more message. */
static int publish_until(uv_loop_t *loop, cm_redis_t *pub, const char *channel, const char *payload,
                         msgs_t *m, uint64_t ms)
{
    int want = m->n + 1;
    uint64_t end = uv_now(loop) + ms;
    while (m->n < want && uv_now(loop) < end) {
        if (cm_redis_is_up(pub))
            cm_redis_command(pub, NULL, NULL, "PUBLISH %s %s", channel, payload);
        run_until(loop, &m->n, want, 20);
    }
    return m->n >= want;
}

static void pubsub_and_resubscribe(void **state)
{
    (void)state;
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t ss = {0}, sp = {0};
    msgs_t m1 = {0}, m2 = {0};
    cm_redis_config_t cfg;
    cm_redis_config_defaults(&cfg);
    cfg.url = redis_url;
    cfg.backoff_min_ms = 20;
    cfg.backoff_max_ms = 100;
    cfg.health_interval_ms = 30;
    cfg.on_state = on_state;
    cfg.ud = &ss;
    cfg.name = "pubsub";
    cm_redis_t *sub;
    assert_int_equal(cm_redis_open(&loop, &cfg, &sub), 0);
    /* Subscribing before the link is up is fine: issued on connect. */
    assert_int_equal(cm_redis_subscribe(sub, "cm:test:ch1", on_message, &m1), 0);
    assert_int_equal(cm_redis_subscribe(sub, "cm:test:ch1", on_message, &m1), UV_EEXIST);
    assert_true(run_until(&loop, &ss.ups, 1, 2000));
    assert_int_equal(cm_redis_subscribe(sub, "cm:test:ch2", on_message, &m2), 0);
    cm_redis_t *pub = open_client(&loop, &sp, 500, "pub");

    assert_true(publish_until(&loop, pub, "cm:test:ch1", "hello", &m1, 2000));
    assert_string_equal(m1.last, "hello");
    assert_string_equal(m1.channel, "cm:test:ch1");
    assert_true(publish_until(&loop, pub, "cm:test:ch2", "two", &m2, 2000));
    assert_string_equal(m2.last, "two");

    /* The health probe and cm_redis_ping work on a subscribed connection. */
    run_for(&loop, 150);
    assert_true(cm_redis_is_up(sub));
    ping_t p = {0};
    assert_int_equal(cm_redis_ping(sub, on_ping, &p), 0);
    assert_true(run_until(&loop, &p.calls, 1, 1000));
    assert_int_equal(p.status, 0);

    /* The server drops the subscriber: it reconnects and subscribes again. */
    reply_t kill = {0};
    assert_int_equal(cm_redis_command(pub, on_reply, &kill, "CLIENT KILL TYPE pubsub"), 0);
    assert_true(run_until(&loop, &ss.downs, 1, 2000));
    assert_true(run_until(&loop, &ss.ups, 2, 2000));
    assert_true(publish_until(&loop, pub, "cm:test:ch1", "again", &m1, 2000));
    assert_string_equal(m1.last, "again");

    /* Unsubscribe: no more messages on that channel. */
    assert_int_equal(cm_redis_unsubscribe(sub, "cm:test:ch2"), 0);
    assert_int_equal(cm_redis_unsubscribe(sub, "cm:test:ch2"), UV_ENOENT);
    run_for(&loop, 50);
    int before = m2.n;
    for (int i = 0; i < 3; i++)
        cm_redis_command(pub, NULL, NULL, "PUBLISH cm:test:ch2 x");
    run_for(&loop, 100);
    assert_int_equal(m2.n, before);

    if (getenv("MARKETS_SERVERS_DIR")) {
        /* A real restart: both clients go down and come back; subscriptions are renewed. */
        int ups_s = ss.ups, ups_p = sp.ups;
        assert_int_equal(servers_ctl("redis-stop"), 0);
        assert_true(run_until(&loop, &sp.downs, 1, 3000));
        assert_int_equal(servers_ctl("redis-start"), 0);
        assert_true(run_until(&loop, &sp.ups, ups_p + 1, 5000));
        assert_true(run_until(&loop, &ss.ups, ups_s + 1, 5000));
        assert_true(publish_until(&loop, pub, "cm:test:ch1", "after-restart", &m1, 3000));
        assert_string_equal(m1.last, "after-restart");
    }

    close_client(&loop, sub);
    close_client(&loop, pub);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

static void server_down_and_back(void **state)
{
    (void)state;
    if (!getenv("MARKETS_SERVERS_DIR"))
        skip();
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t st = {0};
    cm_redis_t *r = open_client(&loop, &st, 100, "cache");

    /* A command in flight when the server goes away gets UV_ECONNRESET (or its reply). */
    assert_int_equal(servers_ctl("redis-stop"), 0);
    assert_true(run_until(&loop, &st.downs, 1, 3000));
    assert_false(cm_redis_is_up(r));
    reply_t fast = {0};
    uint64_t t0 = uv_hrtime();
    assert_int_equal(cm_redis_command(r, on_reply, &fast, "GET cm:test:k"), UV_ENOTCONN);
    assert_true(uv_hrtime() - t0 < 1000000); /* fails at once: < 1 ms */
    ping_t p = {0};
    assert_int_equal(cm_redis_ping(r, on_ping, &p), UV_ENOTCONN);
    /* Still down after several reconnect attempts: reported once only. */
    run_for(&loop, 300);
    assert_int_equal(st.downs, 1);
    assert_int_equal(fast.calls, 0);

    assert_int_equal(servers_ctl("redis-start"), 0);
    assert_true(run_until(&loop, &st.ups, 2, 5000));
    reply_t set = {0}, get = {0};
    assert_int_equal(cm_redis_command(r, on_reply, &set, "SET cm:test:k back"), 0);
    assert_int_equal(cm_redis_command(r, on_reply, &get, "GET cm:test:k"), 0);
    assert_true(run_until(&loop, &get.calls, 1, 1000));
    assert_int_equal(get.status, 0);
    assert_string_equal(get.str, "back");
    cm_redis_stats_t stats;
    cm_redis_stats(r, &stats);
    assert_int_equal(stats.reconnects, 1);
    assert_true(stats.errors >= 1);

    close_client(&loop, r);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

/* Never reachable: reported down once, commands fail fast, close is clean. */
static void never_up(void **state)
{
    (void)state;
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t st = {0};
    cm_redis_config_t cfg;
    cm_redis_config_defaults(&cfg);
    cfg.url = "unix:///nonexistent/redis.sock";
    cfg.backoff_min_ms = 5;
    cfg.backoff_max_ms = 20;
    cfg.on_state = on_state;
    cfg.ud = &st;
    cm_redis_t *r;
    assert_int_equal(cm_redis_open(&loop, &cfg, &r), 0);
    assert_int_equal(st.downs, 0); /* not from inside open */
    run_for(&loop, 150);
    assert_int_equal(st.downs, 1);
    assert_int_equal(st.ups, 0);
    cm_redis_stats_t stats;
    cm_redis_stats(r, &stats);
    assert_true(stats.errors >= 3);
    close_client(&loop, r);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

typedef struct {
    int calls, ok, canceled, other;
} many_t;

static void on_counted(cm_redis_t *r, struct redisReply *reply, int status, void *ud)
{
    (void)r;
    (void)reply;
    many_t *m = ud;
    m->calls++;
    if (status == 0)
        m->ok++;
    else if (status == UV_ECANCELED)
        m->canceled++;
    else
        m->other++;
}

static void close_cancels_in_flight(void **state)
{
    (void)state;
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t sa = {0}, sb = {0};
    cm_redis_t *a = open_client(&loop, &sa, 1000, "a");
    cm_redis_t *b = open_client(&loop, &sb, 2000, "b");
    reply_t pause = {0};
    assert_int_equal(cm_redis_command(b, on_reply, &pause, "CLIENT PAUSE 200"), 0);
    assert_true(run_until(&loop, &pause.calls, 1, 1000));

    many_t m = {0};
    for (int i = 0; i < 100; i++)
        assert_int_equal(cm_redis_command(a, on_counted, &m, "INCR cm:test:n"), 0);
    ping_t p = {0};
    assert_int_equal(cm_redis_ping(a, on_ping, &p), 0);
    run_for(&loop, 10);
    int before = closed;
    cm_redis_close(a, on_closed, NULL);
    assert_int_equal(m.calls, 0); /* not from inside close */
    assert_true(run_until(&loop, &closed, before + 1, 2000));
    assert_int_equal(m.calls, 100);
    assert_int_equal(m.canceled, 100);
    assert_int_equal(p.calls, 1);
    assert_int_equal(p.status, UV_ECANCELED);
    assert_int_equal(sa.downs, 0); /* closing is not "down" */

    run_for(&loop, 250);
    assert_int_equal(m.calls, 100);
    close_client(&loop, b);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

/* Closing from inside a reply callback, with more replies buffered behind it. */
static cm_redis_t *closing_from_cb;
static void on_reply_then_close(cm_redis_t *r, struct redisReply *reply, int status, void *ud)
{
    on_counted(r, reply, status, ud);
    if (closing_from_cb) {
        cm_redis_close(closing_from_cb, on_closed, NULL);
        closing_from_cb = NULL;
    }
}

static void close_from_callback(void **state)
{
    (void)state;
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t sa = {0};
    cm_redis_t *a = open_client(&loop, &sa, 1000, "a");
    many_t m = {0};
    closing_from_cb = a;
    for (int i = 0; i < 50; i++)
        assert_int_equal(cm_redis_command(a, on_reply_then_close, &m, "PING"), 0);
    int before = closed;
    assert_true(run_until(&loop, &closed, before + 1, 2000));
    assert_int_equal(m.calls, 50);
    assert_int_equal(m.other, 0);
    assert_true(m.ok >= 1);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

/* AUTH with an ACL user (percent-encoded password) and SELECT; a wrong password fails the
 * handshake, is reported down once and retried without crashing. */
static void auth_and_select(void **state)
{
    (void)state;
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t sa = {0};
    cm_redis_t *admin = open_client(&loop, &sa, 1000, "admin");
    reply_t acl = {0};
    assert_int_equal(
        cm_redis_command(admin, on_reply, &acl, "ACL SETUSER cmtest on >p@ss:w0rd ~* &* +@all"), 0);
    assert_true(run_until(&loop, &acl.calls, 1, 1000));
    assert_string_equal(acl.str, "OK");

    cm_redis_url_t u;
    assert_int_equal(cm_redis_url_parse(redis_url, &u), 0);
    char url[512];
    snprintf(url, sizeof url, "redis://cmtest:p%%40ss%%3Aw0rd@%s:%d/2", u.host, u.port);
    state_t st = {0};
    cm_redis_config_t cfg;
    cm_redis_config_defaults(&cfg);
    cfg.url = url;
    cfg.on_state = on_state;
    cfg.ud = &st;
    cm_redis_t *r;
    assert_int_equal(cm_redis_open(&loop, &cfg, &r), 0);
    assert_true(run_until(&loop, &st.ups, 1, 2000));
    reply_t who = {0}, set = {0}, get0 = {0};
    assert_int_equal(cm_redis_command(r, on_reply, &who, "ACL WHOAMI"), 0);
    assert_int_equal(cm_redis_command(r, on_reply, &set, "SET cm:test:db2 yes"), 0);
    assert_true(run_until(&loop, &set.calls, 1, 1000));
    assert_string_equal(who.str, "cmtest");
    /* Written in db 2, so db 0 (admin) does not see it. */
    assert_int_equal(cm_redis_command(admin, on_reply, &get0, "EXISTS cm:test:db2"), 0);
    assert_true(run_until(&loop, &get0.calls, 1, 1000));
    assert_string_equal(get0.str, "0");
    close_client(&loop, r);

    snprintf(url, sizeof url, "redis://cmtest:wrong@%s:%d/0", u.host, u.port);
    state_t bad = {0};
    cfg.url = url;
    cfg.ud = &bad;
    cfg.backoff_min_ms = 10;
    cfg.backoff_max_ms = 20;
    assert_int_equal(cm_redis_open(&loop, &cfg, &r), 0);
    run_for(&loop, 150);
    assert_int_equal(bad.downs, 1);
    assert_int_equal(bad.ups, 0);
    close_client(&loop, r);

    reply_t del = {0};
    assert_int_equal(cm_redis_command(admin, on_reply, &del, "ACL DELUSER cmtest"), 0);
    assert_true(run_until(&loop, &del.calls, 1, 1000));
    close_client(&loop, admin);
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
    cm_redis_config_t cfg;
    cm_redis_config_defaults(&cfg);
    cfg.url = redis_url;
    cfg.name = "oom";
    for (int n = 1; n <= 4; n++) {
        cm_redis_t *r = NULL;
        cm_alloc_fail_after(n);
        int rc = cm_redis_open(&loop, &cfg, &r);
        cm_alloc_fail_after(0);
        if (rc == 0) {
            close_client(&loop, r);
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
    redis_url = getenv("REDIS_URL");
    if (!redis_url) {
        fprintf(stderr, "REDIS_URL not set: source the env file of scripts/servers.sh start\n");
        return 77;
    }
    cm_log_init("test_redis", CM_LOG_WARN, CM_LOG_TEXT);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(bad_config),
        cmocka_unit_test(set_get_round_trip),
        cmocka_unit_test(ping_latency),
        cmocka_unit_test(auth_and_select),
        cmocka_unit_test(own_deadline_is_not_a_stall),
        cmocka_unit_test(deep_pipeline_is_not_a_stall),
        cmocka_unit_test(busy_loop_is_not_a_timeout),
        cmocka_unit_test(stalled_server),
        cmocka_unit_test(stall_detected_in_time),
        cmocka_unit_test_teardown(stopped_server_is_a_stall, resume_redis),
        cmocka_unit_test(no_deadline_waits_out_a_pause),
        cmocka_unit_test(pubsub_and_resubscribe),
        cmocka_unit_test(server_down_and_back),
        cmocka_unit_test(never_up),
        cmocka_unit_test(close_cancels_in_flight),
        cmocka_unit_test(close_from_callback),
        cmocka_unit_test(open_out_of_memory),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
