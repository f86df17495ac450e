/*
 * Integration tests of cm/redis.h in Sentinel mode against the group of
 * `scripts/servers.sh sentinel-start` (real redis-server and redis-sentinel processes; the
 * SENTINEL_* variables of its env file). Without them every test is skipped.
 *
 * The failover tests leave the group healthy for the next one (sentinel-wait) and print how
 * long the client took to follow.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include <hiredis/hiredis.h>

#include "loop_util.h"
#include "redis_util.h"
#include "cm/alloc.h"
#include "cm/log.h"
#include "cm/redis.h"

static const char *sentinel_addrs, *master_name, *sentinel_pw, *data_pw;
static int sentinel_ports[3], nsentinels;
static char data_url[256];

/* ---------------------------------------------------------------------------------------- */
/* The group, through hiredis' blocking API                                                 */

static redisReply *admin(int port, const char *password, const char *fmt, ...)
{
    struct timeval tv = {2, 0};
    redisContext *c = redisConnectWithTimeout("127.0.0.1", port, tv);
    if (!c || c->err) {
        if (c)
            redisFree(c);
        return NULL;
    }
    redisSetTimeout(c, tv);
    redisReply *auth = redisCommand(c, "AUTH %s", password);
    if (auth)
        freeReplyObject(auth);
    va_list ap;
    va_start(ap, fmt);
    redisReply *rep = redisvCommand(c, fmt, ap);
    va_end(ap);
    redisFree(c);
    return rep;
}

/* The master's port as the first sentinel that answers sees it; 0 when none does. */
static int master_port(void)
{
    for (int i = 0; i < nsentinels; i++) {
        redisReply *rep = admin(sentinel_ports[i], sentinel_pw,
                                "SENTINEL get-master-addr-by-name %s", master_name);
        int port = 0;
        if (rep && rep->type == REDIS_REPLY_ARRAY && rep->elements == 2)
            port = atoi(rep->element[1]->str);
        if (rep)
            freeReplyObject(rep);
        if (port)
            return port;
    }
    return 0;
}

static void sentinel_failover(void)
{
    redisReply *rep = admin(sentinel_ports[0], sentinel_pw, "SENTINEL FAILOVER %s", master_name);
    assert_non_null(rep);
    if (rep->type == REDIS_REPLY_ERROR)
        fail_msg("SENTINEL FAILOVER: %s", rep->str);
    freeReplyObject(rep);
}

static void group_wait(void)
{
    assert_int_equal(servers_ctl("sentinel-wait"), 0);
}

static long node_pid(int port)
{
    char path[512];
    snprintf(path, sizeof path, "%s/sentinel/node-%d/redis.pid", getenv("MARKETS_SERVERS_DIR"),
             port);
    FILE *f = fopen(path, "r");
    long pid = -1;
    if (f) {
        if (fscanf(f, "%ld", &pid) != 1)
            pid = -1;
        fclose(f);
    }
    return pid;
}

/* scripts/servers.sh sentinel-node-start DIR PORT: the killed node back, as a replica. */
static void node_restart(int port)
{
    char arg[16];
    snprintf(arg, sizeof arg, "%d", port);
    assert_int_equal(servers_ctl_with("sentinel-node-start", arg), 0);
}

static void need_group(void)
{
    if (!sentinel_addrs || !getenv("MARKETS_SERVERS_DIR"))
        skip();
}

/* ---------------------------------------------------------------------------------------- */
/* Clients                                                                                    */

static cm_redis_config_t client_config(state_t *st, const char *sentinels)
{
    cm_redis_config_t cfg;
    cm_redis_config_defaults(&cfg);
    cfg.url = data_url;
    cfg.timeout_ms = 500;
    cfg.connect_timeout_ms = 500;
    cfg.backoff_min_ms = 20;
    cfg.backoff_max_ms = 500;
    cfg.sentinels = sentinels ? sentinels : sentinel_addrs;
    cfg.sentinel_master = master_name;
    cfg.sentinel_password = sentinel_pw;
    cfg.sentinel_timeout_ms = 300;
    cfg.on_state = on_state;
    cfg.ud = st;
    cfg.name = "sentinel-test";
    return cfg;
}

/* A stream of SETs, one every 10 ms while the link is up, with what came back. */
typedef struct {
    cm_redis_t *r;
    uv_loop_t *loop;
    uv_timer_t timer;
    int ok, errors, readonly, failed;
    uint64_t last_ok_ms;  /* loop time of the last OK */
    uint64_t moves_at_ok; /* stats.master_moves when it was sent */
    int seq;
} writer_t;

typedef struct {
    writer_t *w;
    uint64_t moves;
} write_op_t;

static void on_set(cm_redis_t *r, struct redisReply *reply, int status, void *ud)
{
    (void)r;
    write_op_t *op = ud;
    writer_t *w = op->w;
    if (status != CM_REDIS_OK) {
        w->failed++;
    } else if (reply->type == REDIS_REPLY_ERROR) {
        w->errors++;
        if (strncmp(reply->str, "READONLY", 8) == 0)
            w->readonly++;
    } else {
        w->ok++;
        w->last_ok_ms = uv_now(w->loop);
        w->moves_at_ok = op->moves;
    }
    cm_free(op);
}

static void on_write_tick(uv_timer_t *t)
{
    writer_t *w = t->data;
    if (!cm_redis_is_up(w->r))
        return;
    write_op_t *op = cm_malloc(sizeof *op);
    assert_non_null(op);
    cm_redis_stats_t st;
    cm_redis_stats(w->r, &st);
    op->w = w;
    op->moves = st.master_moves;
    char val[16];
    snprintf(val, sizeof val, "%d", ++w->seq);
    const char *argv[] = {"SET", "cm:sentinel:test", val};
    if (cm_redis_command_argv(w->r, on_set, op, 3, argv, NULL) != 0)
        cm_free(op);
}

static void writer_start(uv_loop_t *loop, writer_t *w, cm_redis_t *r)
{
    memset(w, 0, sizeof *w);
    w->r = r;
    w->loop = loop;
    uv_timer_init(loop, &w->timer);
    w->timer.data = w;
    uv_timer_start(&w->timer, on_write_tick, 10, 10);
}

static void writer_stop(writer_t *w)
{
    uv_close((uv_handle_t *)&w->timer, NULL);
}

/* Runs until a SET sent after the link moved to another master succeeded; returns the loop
 * time of that, 0 on timeout. */
static uint64_t until_moved(uv_loop_t *loop, writer_t *w, uint64_t moves_before, uint64_t ms)
{
    uint64_t end = uv_now(loop) + ms;
    while (uv_now(loop) < end) {
        if (w->ok && w->moves_at_ok > moves_before)
            return w->last_ok_ms;
        run_for(loop, 10);
    }
    return 0;
}

/* Messages of one channel. */
typedef struct {
    int n;
    char last[64];
} msgs_t;

static void on_msg(cm_redis_t *r, const char *channel, const char *payload, size_t len, void *ud)
{
    (void)r;
    (void)channel;
    msgs_t *m = ud;
    m->n++;
    snprintf(m->last, sizeof m->last, "%.*s", (int)len, payload);
}

/* ---------------------------------------------------------------------------------------- */
/* Tests                                                                                      */

/* REDIS_URL's host is wrong on purpose: only the sentinels can lead to the master. The db
 * and the password of the URL are used. */
static void discovery_ignores_the_url_host(void **state)
{
    (void)state;
    need_group();
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t st = {0};
    cm_redis_config_t cfg = client_config(&st, NULL);
    cm_redis_t *r;
    assert_int_equal(cm_redis_open(&loop, &cfg, &r), 0);
    assert_true(run_until(&loop, &st.ups, 1, 3000));
    writer_t w;
    writer_start(&loop, &w, r);
    assert_true(run_until(&loop, &w.ok, 3, 2000));
    /* It is the master's db 3 that got them. */
    redisReply *rep = admin(master_port(), data_pw, "SELECT 3");
    freeReplyObject(rep);
    rep = admin(master_port(), data_pw, "EXISTS cm:sentinel:test");
    assert_non_null(rep);
    freeReplyObject(rep);
    writer_stop(&w);
    close_client(&loop, r);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

/* A listening socket that never answers: connect succeeds, then nothing, like a stopped
 * sentinel. */
static int black_hole(int *port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(fd, 16), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    *port = ntohs(a.sin_port);
    return fd;
}

static int closed_port(void)
{
    int port;
    int fd = black_hole(&port);
    close(fd);
    return port;
}

/* Dead sentinels first in the list: one refuses, one accepts and never answers. Each costs
 * at most its own deadline, and the sentinel that answered is asked first afterwards. */
static void dead_sentinels_are_skipped(void **state)
{
    (void)state;
    need_group();
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    int hole_port;
    int hole = black_hole(&hole_port);
    char list[512];
    snprintf(list, sizeof list, "127.0.0.1:%d,127.0.0.1:%d,%s", closed_port(), hole_port,
             sentinel_addrs);
    state_t st = {0};
    cm_redis_config_t cfg = client_config(&st, list);
    cfg.sentinel_watch = 0;
    /* Long enough that a second wait for the black hole cannot pass for a loaded machine. */
    cfg.sentinel_timeout_ms = 1000;
    cm_redis_t *r;
    uint64_t t0 = uv_hrtime();
    assert_int_equal(cm_redis_open(&loop, &cfg, &r), 0);
    assert_true(run_until(&loop, &st.ups, 1, 5000));
    double first_ms = (double)(uv_hrtime() - t0) / 1e6;
    /* The black hole's deadline (1000 ms), plus connecting. */
    assert_true(first_ms >= 950 && first_ms < 3000);

    /* Drop the link from the server side: rediscovery goes to the good sentinel first. */
    redisReply *rep = admin(master_port(), data_pw, "CLIENT KILL TYPE normal");
    assert_non_null(rep);
    freeReplyObject(rep);
    assert_true(run_until(&loop, &st.downs, 1, 3000));
    t0 = uv_hrtime();
    assert_true(run_until(&loop, &st.ups, 2, 3000));
    double again_ms = (double)(uv_hrtime() - t0) / 1e6;
    printf("sentinel: dead sentinels first: up after %.0f ms, again after %.0f ms\n", first_ms,
           again_ms);
    assert_true(again_ms < 800);
    close_client(&loop, r);
    close(hole);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

/* No sentinel answers: down is reported once, and rounds repeat with backoff. */
static void no_sentinel_answers(void **state)
{
    (void)state;
    need_group();
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    char list[64];
    snprintf(list, sizeof list, "127.0.0.1:%d", closed_port());
    state_t st = {0};
    cm_redis_config_t cfg = client_config(&st, list);
    cm_redis_t *r;
    assert_int_equal(cm_redis_open(&loop, &cfg, &r), 0);
    assert_true(run_until(&loop, &st.downs, 1, 2000));
    assert_int_equal(cm_redis_command(r, NULL, NULL, "PING"), UV_ENOTCONN);
    run_for(&loop, 500);
    assert_int_equal(st.downs, 1);
    assert_int_equal(st.ups, 0);
    cm_redis_stats_t s;
    cm_redis_stats(r, &s);
    assert_true(s.errors >= 3);
    close_client(&loop, r);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

/* SENTINEL FAILOVER: commands and a subscription follow the new master within seconds. */
static void follows_sentinel_failover(void **state)
{
    (void)state;
    need_group();
    group_wait();
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t st = {0}, ss = {0}, sp = {0};
    cm_redis_config_t cfg = client_config(&st, NULL);
    cm_redis_t *r, *sub, *pub;
    assert_int_equal(cm_redis_open(&loop, &cfg, &r), 0);
    cfg.ud = &ss;
    assert_int_equal(cm_redis_open(&loop, &cfg, &sub), 0);
    cfg.ud = &sp;
    assert_int_equal(cm_redis_open(&loop, &cfg, &pub), 0);
    msgs_t m = {0};
    assert_int_equal(cm_redis_subscribe(sub, "cm:sentinel:ch", on_msg, &m), 0);
    assert_true(run_until(&loop, &st.ups, 1, 3000));
    assert_true(run_until(&loop, &ss.ups, 1, 3000));
    assert_true(run_until(&loop, &sp.ups, 1, 3000));
    writer_t w;
    writer_start(&loop, &w, r);
    assert_true(run_until(&loop, &w.ok, 5, 2000));

    int old_master = master_port();
    uint64_t t0 = uv_now(&loop);
    sentinel_failover();
    uint64_t at = until_moved(&loop, &w, 0, 10000);
    assert_true(at > 0);
    printf("sentinel: SENTINEL FAILOVER: writes on the new master after %" PRIu64 " ms\n", at - t0);
    assert_true(at - t0 < 5000);
    assert_int_not_equal(master_port(), old_master);
    cm_redis_stats_t s;
    cm_redis_stats(r, &s);
    assert_int_equal(s.master_moves, 1);

    /* The subscription was issued again on the new master. */
    assert_true(run_until(&loop, &ss.ups, 2, 5000));
    assert_true(run_until(&loop, &sp.ups, 2, 5000));
    int want = m.n + 1;
    uint64_t end = uv_now(&loop) + 3000;
    while (m.n < want && uv_now(&loop) < end) {
        cm_redis_command(pub, NULL, NULL, "PUBLISH cm:sentinel:ch after");
        run_until(&loop, &m.n, want, 50);
    }
    assert_true(m.n >= want);
    assert_string_equal(m.last, "after");

    writer_stop(&w);
    close_client(&loop, r);
    close_client(&loop, sub);
    close_client(&loop, pub);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
    group_wait();
}

/* SIGKILL of the master: the client follows once the sentinels agree it is down (1 s) and
 * promoted the replica. */
static void follows_master_sigkill(void **state)
{
    (void)state;
    need_group();
    group_wait();
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t st = {0};
    cm_redis_config_t cfg = client_config(&st, NULL);
    cm_redis_t *r;
    assert_int_equal(cm_redis_open(&loop, &cfg, &r), 0);
    assert_true(run_until(&loop, &st.ups, 1, 3000));
    writer_t w;
    writer_start(&loop, &w, r);
    assert_true(run_until(&loop, &w.ok, 5, 2000));

    int old_master = master_port();
    long pid = node_pid(old_master);
    assert_true(pid > 0);
    uint64_t t0 = uv_now(&loop);
    assert_int_equal(kill((pid_t)pid, SIGKILL), 0);
    assert_true(run_until(&loop, &st.downs, 1, 2000));
    uint64_t at = until_moved(&loop, &w, 0, 15000);
    assert_true(at > 0);
    printf("sentinel: master SIGKILL: writes on the new master after %" PRIu64
           " ms (down-after 1000 ms)\n",
           at - t0);
    assert_true(at - t0 < 8000);
    assert_int_equal(st.downs, 1);

    writer_stop(&w);
    close_client(&loop, r);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
    node_restart(old_master);
    group_wait();
}

/* A master demoted under the client (REPLICAOF on it) answers writes with -READONLY: that
 * alone moves the client (no +switch-master watcher, no ROLE probe here). */
static void readonly_moves_to_the_new_master(void **state)
{
    (void)state;
    need_group();
    group_wait();
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t st = {0};
    cm_redis_config_t cfg = client_config(&st, NULL);
    cfg.sentinel_watch = 0;
    cfg.health_interval_ms = 0;
    cm_redis_t *r;
    assert_int_equal(cm_redis_open(&loop, &cfg, &r), 0);
    assert_true(run_until(&loop, &st.ups, 1, 3000));
    writer_t w;
    writer_start(&loop, &w, r);
    assert_true(run_until(&loop, &w.ok, 5, 2000));

    /* The sentinels promote the replica; the old master would be turned into a replica by
     * them some seconds later: do it now, as an operator or a partition healing would. */
    int old_master = master_port();
    sentinel_failover();
    int new_master = 0;
    for (int i = 0; i < 100 && (new_master = master_port()) == old_master; i++)
        run_for(&loop, 50);
    assert_int_not_equal(new_master, old_master);
    /* Still writing to the old master: the client did not notice. */
    assert_true(run_until(&loop, &w.ok, w.ok + 1, 2000));
    assert_int_equal(w.moves_at_ok, 0);
    uint64_t t0 = uv_now(&loop);
    redisReply *rep = admin(old_master, data_pw, "REPLICAOF 127.0.0.1 %d", new_master);
    assert_non_null(rep);
    assert_int_not_equal(rep->type, REDIS_REPLY_ERROR);
    freeReplyObject(rep);
    uint64_t at = until_moved(&loop, &w, 0, 5000);
    assert_true(at > 0);
    printf("sentinel: demoted master (-READONLY): writes on the new master after %" PRIu64
           " ms, %d READONLY replies\n",
           at - t0, w.readonly);
    assert_true(w.readonly >= 1);
    assert_true(at - t0 < 3000);

    writer_stop(&w);
    close_client(&loop, r);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
    group_wait();
}

/* ---------------------------------------------------------------------------------------- */
/* A fake sentinel on the test's loop: it names the replica for its first `lies` questions,
 * then the master, and remembers the password it was given. Requests are parsed with
 * hiredis' reply reader (a request is an array of bulk strings). */

typedef struct {
    uv_tcp_t server;
    int lies, asked;
    int replica_port, master_port;
    char auth[64];
} fake_t;

typedef struct {
    uv_tcp_t tcp;
    fake_t *f;
    redisReader *reader;
} fake_conn_t;

static void fake_closed(uv_handle_t *h)
{
    fake_conn_t *c = h->data;
    redisReaderFree(c->reader);
    free(c);
}

static void fake_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    (void)h;
    buf->base = malloc(hint);
    buf->len = hint;
}

static void fake_written(uv_write_t *w, int status)
{
    (void)status;
    free(w);
}

static void fake_send(fake_conn_t *c, const char *text)
{
    size_t n = strlen(text);
    uv_write_t *w = malloc(sizeof *w + n);
    memcpy(w + 1, text, n);
    uv_buf_t b = uv_buf_init((char *)(w + 1), (unsigned)n);
    uv_write(w, (uv_stream_t *)&c->tcp, &b, 1, fake_written);
}

static void fake_answer(fake_conn_t *c, redisReply *req)
{
    char out[256];
    if (req->type != REDIS_REPLY_ARRAY || req->elements < 1)
        return;
    const char *cmd = req->element[0]->str;
    if (strcasecmp(cmd, "AUTH") == 0 && req->elements == 2) {
        snprintf(c->f->auth, sizeof c->f->auth, "%s", req->element[1]->str);
        fake_send(c, "+OK\r\n");
    } else if (strcasecmp(cmd, "PING") == 0) {
        fake_send(c, "+PONG\r\n");
    } else if (strcasecmp(cmd, "SENTINEL") == 0) {
        int port = c->f->asked++ < c->f->lies ? c->f->replica_port : c->f->master_port;
        char p[16];
        snprintf(p, sizeof p, "%d", port);
        snprintf(out, sizeof out, "*2\r\n$9\r\n127.0.0.1\r\n$%zu\r\n%s\r\n", strlen(p), p);
        fake_send(c, out);
    } else if (strcasecmp(cmd, "SUBSCRIBE") == 0 && req->elements == 2) {
        const char *ch = req->element[1]->str;
        snprintf(out, sizeof out, "*3\r\n$9\r\nsubscribe\r\n$%zu\r\n%s\r\n:1\r\n", strlen(ch), ch);
        fake_send(c, out);
    } else {
        fake_send(c, "-ERR unknown command\r\n");
    }
}

static void fake_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    fake_conn_t *c = s->data;
    if (n > 0) {
        redisReaderFeed(c->reader, buf->base, (size_t)n);
        void *req;
        while (redisReaderGetReply(c->reader, &req) == REDIS_OK && req) {
            fake_answer(c, req);
            freeReplyObject(req);
        }
    }
    free(buf->base);
    if (n < 0 && !uv_is_closing((uv_handle_t *)s))
        uv_close((uv_handle_t *)s, fake_closed);
}

static void fake_accept(uv_stream_t *server, int status)
{
    if (status != 0)
        return;
    fake_conn_t *c = calloc(1, sizeof *c);
    c->f = server->data;
    c->reader = redisReaderCreate();
    uv_tcp_init(server->loop, &c->tcp);
    c->tcp.data = c;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) == 0)
        uv_read_start((uv_stream_t *)&c->tcp, fake_alloc, fake_read);
    else
        uv_close((uv_handle_t *)&c->tcp, fake_closed);
}

static int fake_start(uv_loop_t *loop, fake_t *f)
{
    struct sockaddr_in a;
    uv_ip4_addr("127.0.0.1", 0, &a);
    uv_tcp_init(loop, &f->server);
    f->server.data = f;
    assert_int_equal(uv_tcp_bind(&f->server, (struct sockaddr *)&a, 0), 0);
    assert_int_equal(uv_listen((uv_stream_t *)&f->server, 16, fake_accept), 0);
    int len = sizeof a;
    uv_tcp_getsockname(&f->server, (struct sockaddr *)&a, &len);
    return ntohs(a.sin_port);
}

/* The sentinel names a replica: ROLE in the handshake refuses it, and the client asks again
 * shortly (not after the backoff) until it names the master. AUTH carries the password. */
static void replica_is_refused_by_role(void **state)
{
    (void)state;
    need_group();
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    int master = master_port();
    int replica = 0;
    const char *ports = getenv("SENTINEL_NODE_PORTS");
    int a = 0, b = 0;
    assert_int_equal(sscanf(ports, "%d,%d", &a, &b), 2);
    replica = a == master ? b : a;
    fake_t f = {.lies = 3, .replica_port = replica, .master_port = master};
    char list[64];
    snprintf(list, sizeof list, "127.0.0.1:%d", fake_start(&loop, &f));
    state_t st = {0};
    cm_redis_config_t cfg = client_config(&st, list);
    cfg.backoff_min_ms = cfg.backoff_max_ms = 2000; /* a plain failure would wait this long */
    cfg.sentinel_watch = 0; /* its check after subscribing would take one of the lies */
    cm_redis_t *r;
    uint64_t t0 = uv_hrtime();
    assert_int_equal(cm_redis_open(&loop, &cfg, &r), 0);
    assert_true(run_until(&loop, &st.ups, 1, 3000));
    double ms = (double)(uv_hrtime() - t0) / 1e6;
    printf("sentinel: named a replica 3 times: up on the master after %.0f ms\n", ms);
    assert_true(ms < 1500);
    assert_int_equal(f.asked, 4);
    assert_string_equal(f.auth, sentinel_pw);
    assert_int_equal(st.downs, 1); /* the first refusal; the retries are not reported again */
    cm_redis_stats_t s;
    cm_redis_stats(r, &s);
    assert_int_equal(s.errors, 3);
    close_client(&loop, r);
    uv_close((uv_handle_t *)&f.server, NULL); /* its connections close on the client's EOF */
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

/* Allocation failures inside open (the sentinel part included) leak nothing. */
static void open_out_of_memory(void **state)
{
    (void)state;
    need_group();
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    state_t st = {0};
    cm_redis_config_t cfg = client_config(&st, NULL);
    for (int n = 1; n <= 8; n++) {
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

/* Closing while the sentinels are being asked (a black hole holds the round). */
static void close_while_resolving(void **state)
{
    (void)state;
    need_group();
    long live = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    int hole_port;
    int hole = black_hole(&hole_port);
    char list[64];
    snprintf(list, sizeof list, "127.0.0.1:%d", hole_port);
    state_t st = {0};
    cm_redis_config_t cfg = client_config(&st, list);
    cm_redis_t *r;
    assert_int_equal(cm_redis_open(&loop, &cfg, &r), 0);
    run_for(&loop, 100);
    close_client(&loop, r);
    assert_int_equal(st.ups, 0);
    close(hole);
    finish_loop(&loop);
    assert_int_equal(cm_alloc_live(), live);
}

int main(void)
{
    sentinel_addrs = getenv("SENTINEL_ADDRS");
    master_name = getenv("SENTINEL_MASTER_NAME");
    sentinel_pw = getenv("SENTINEL_PASSWORD");
    data_pw = getenv("SENTINEL_DATA_PASSWORD");
    const char *ports = getenv("SENTINEL_PORTS");
    if (!sentinel_addrs || !master_name || !sentinel_pw || !data_pw || !ports) {
        fprintf(stderr, "no Sentinel group (scripts/servers.sh sentinel-start): tests skipped\n");
        sentinel_addrs = NULL;
    } else {
        nsentinels =
            sscanf(ports, "%d,%d,%d", &sentinel_ports[0], &sentinel_ports[1], &sentinel_ports[2]);
        /* The address is wrong on purpose (nothing listens on port 1): never connected to. */
        snprintf(data_url, sizeof data_url, "redis://:%s@127.0.0.1:1/3", data_pw);
    }
    cm_log_init("test_redis_sentinel", CM_LOG_WARN, CM_LOG_TEXT);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(discovery_ignores_the_url_host),
        cmocka_unit_test(dead_sentinels_are_skipped),
        cmocka_unit_test(no_sentinel_answers),
        cmocka_unit_test(close_while_resolving),
        cmocka_unit_test(replica_is_refused_by_role),
        cmocka_unit_test(open_out_of_memory),
        cmocka_unit_test(follows_sentinel_failover),
        cmocka_unit_test(follows_master_sigkill),
        cmocka_unit_test(readonly_moves_to_the_new_master),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
