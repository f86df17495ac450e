/*
 * cm/http.h tests: a real server on 127.0.0.1 port 0 runs in the test's loop; a client thread
 * talks to it with blocking sockets (receive timeout 3 s) and records what it saw; the main
 * thread asserts after joining it. Every scenario stops the server, closes every handle and
 * checks uv_loop_close() == 0 and that no cm_malloc block is left.
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "cm/alloc.h"
#include "cm/http.h"
#include "cm/json.h"

/* ------------------------------------------------------------------------------------------ */
/* Blocking client helpers (client thread)                                                     */

#define RESP_MAX 8192
#define NRESP 24

typedef struct client client_t;
typedef void (*client_fn)(client_t *cl);

struct client {
    int port;
    client_fn fn;
    uv_async_t done_async;
    /* results, read by the main thread after join */
    char resp[NRESP][RESP_MAX];
    int nresp;
    int val[16];
};

/* rcvbuf > 0 shrinks the receive buffer (before connect, so the window is small). */
static int cli_connect_rcvbuf(int port, int rcvbuf)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (rcvbuf > 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct timeval tv = {3, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static int cli_connect(int port)
{
    return cli_connect_rcvbuf(port, 0);
}

static void cli_send(int fd, const void *p, size_t n)
{
    const char *c = p;
    while (n > 0) {
        ssize_t w = send(fd, c, n, MSG_NOSIGNAL);
        if (w <= 0)
            return;
        c += w;
        n -= (size_t)w;
    }
}

static void cli_sends(int fd, const char *s)
{
    cli_send(fd, s, strlen(s));
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Reads one response (head + Content-Length body; no body when `head_only`) into out.
 * Returns its length, 0 on EOF before any byte, -1 on timeout/error. */
static int cli_read_response(int fd, char *out, size_t outsz, int head_only)
{
    size_t len = 0;
    char *end = NULL;
    while (!end) {
        if (len + 1 >= outsz)
            return -1;
        ssize_t r = recv(fd, out + len, 1, 0); /* byte by byte: never eat the next response */
        if (r == 0)
            return len == 0 ? 0 : -1;
        if (r < 0)
            return -1;
        len++;
        out[len] = '\0';
        if (len >= 4 && memcmp(out + len - 4, "\r\n\r\n", 4) == 0)
            end = out + len;
    }
    size_t clen = 0;
    const char *cl = strcasestr(out, "\r\nContent-Length: ");
    if (cl && !head_only)
        clen = strtoul(cl + 18, NULL, 10);
    while (clen > 0) {
        if (len + 1 >= outsz)
            return -1;
        size_t want = clen < outsz - len - 1 ? clen : outsz - len - 1;
        ssize_t r = recv(fd, out + len, want, 0);
        if (r <= 0)
            return -1;
        len += (size_t)r;
        clen -= (size_t)r;
    }
    out[len] = '\0';
    return (int)len;
}

/* Reads until EOF. Returns the byte count, or -1 on timeout. */
static int cli_read_all(int fd, char *out, size_t outsz)
{
    size_t len = 0;
    for (;;) {
        char tmp[4096];
        ssize_t r = recv(fd, tmp, sizeof tmp, 0);
        if (r == 0)
            break;
        if (r < 0)
            return errno == ECONNRESET ? (int)len : -1;
        size_t keep = (size_t)r;
        if (len + keep >= outsz)
            keep = outsz - len - 1;
        memcpy(out + len, tmp, keep);
        len += keep;
    }
    out[len] = '\0';
    return (int)len;
}

/* 1 when the server closed the connection (EOF or reset) within the receive timeout. */
static int cli_wait_eof(int fd)
{
    char tmp[256];
    for (;;) {
        ssize_t r = recv(fd, tmp, sizeof tmp, 0);
        if (r == 0)
            return 1;
        if (r < 0)
            return errno == ECONNRESET;
    }
}

static char *cl_slot(client_t *cl)
{
    return cl->nresp < NRESP ? cl->resp[cl->nresp++] : cl->resp[NRESP - 1];
}

/* ------------------------------------------------------------------------------------------ */
/* Server side (loop thread)                                                                   */

typedef struct fixture {
    uv_loop_t loop;
    cm_http_server_t *srv;
    client_t *cl;
    pthread_t th;
    int observed, done_called, raw_closed, raw_reads, stop_requested;
    int statuses[64];
    char routes[64][32];
    long live_before;
    uv_timer_t stopper; /* used by /stop */
    size_t max_queued;  /* the most response bytes queued after a /page answer */
} fixture_t;

static fixture_t *FX;

typedef struct later {
    uv_timer_t t;
    cm_http_request_t *req;
    int status;
    char body[64];
} later_t;

static void later_free(uv_handle_t *h)
{
    free(h->data);
}

static void on_later(uv_timer_t *t)
{
    later_t *l = t->data;
    cm_http_respond(l->req, l->status, "text/plain", NULL, l->body, strlen(l->body));
    uv_close((uv_handle_t *)&l->t, later_free);
}

static void respond_later(cm_http_request_t *req, uint64_t ms, const char *body)
{
    later_t *l = calloc(1, sizeof *l);
    l->req = req;
    l->status = 200;
    snprintf(l->body, sizeof l->body, "%s", body);
    uv_timer_init(&FX->loop, &l->t);
    l->t.data = l;
    uv_timer_start(&l->t, on_later, ms, 0);
}

static void raw_on_read(cm_http_conn_t *c, const char *data, ssize_t n, void *ud)
{
    (void)ud;
    if (n < 0)
        return;
    FX->raw_reads++;
    if (n >= 3 && memcmp(data, "bye", 3) == 0) {
        cm_http_conn_write(c, "ciao", 4);
        cm_http_conn_close(c, 0);
        return;
    }
    cm_http_conn_write(c, data, (size_t)n);
}

static void raw_on_close(cm_http_conn_t *c, void *ud)
{
    (void)c;
    (void)ud;
    FX->raw_closed++;
}

static char BIG[4 * 1024 * 1024];
/* /page: a big answer; 200 of them (9.4 MiB) are far over the 1 MiB write-queue limit. */
#define PAGE_BYTES (48 * 1024)
static void on_server_done(void *ud);

static void handler(cm_http_request_t *req, void *ud)
{
    (void)ud;
    char p[256];
    snprintf(p, sizeof p, "%.*s", (int)req->path_len, req->path);
    if (strcmp(p, "/slow") == 0) {
        respond_later(req, 60, "slow");
    } else if (strcmp(p, "/hold") == 0) {
        respond_later(req, 150, "held");
    } else if (strcmp(p, "/stop") == 0) {
        FX->stop_requested = 1;
        cm_http_server_stop(FX->srv, 2000, on_server_done, FX);
        respond_later(req, 30, "stopping");
    } else if (strcmp(p, "/big") == 0) {
        cm_http_respond(req, 200, "application/octet-stream", NULL, BIG, sizeof BIG);
    } else if (strcmp(p, "/kb") == 0) {
        cm_http_respond(req, 200, "application/octet-stream", NULL, BIG, 4096);
    } else if (strcmp(p, "/upgrade") == 0) {
        static const char head[] =
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n";
        cm_http_raw_cbs_t cbs = {raw_on_read, raw_on_close};
        cm_http_conn_t *c = NULL;
        int rc = cm_http_upgrade(req, head, sizeof head - 1, &cbs, NULL, &c);
        assert_int_equal(rc, 0);
        assert_non_null(c);
    } else if (strcmp(p, "/error") == 0) {
        cm_http_respond_error(req, 503, "origin_unavailable", "try \"later\"",
                              "Retry-After: 1\r\n");
    } else if (strcmp(p, "/nocontent") == 0) {
        cm_http_respond(req, 204, NULL, NULL, NULL, 0);
    } else if (strcmp(p, "/host") == 0) {
        char body[512];
        const char *host = cm_http_header(req, "host");
        int n = snprintf(body, sizeof body, "host=%s path=%.*s q=%.*s", host ? host : "-",
                         (int)req->path_len, req->path, (int)req->query_len, req->query);
        cm_http_respond(req, 200, "text/plain", NULL, body, (size_t)n);
    } else if (strcmp(p, "/page") == 0) {
        cm_http_conn_t *c = req->conn;
        cm_http_respond(req, 200, "application/octet-stream", NULL, BIG, PAGE_BYTES);
        size_t q = cm_http_conn_write_queue_size(c);
        if (q > FX->max_queued)
            FX->max_queued = q;
    } else {
        char body[1024];
        const char *ua = cm_http_header(req, "x-test");
        int n =
            snprintf(body, sizeof body, "%s %s q=%.*s h=%s body=%.*s", req->method_name, p,
                     (int)req->query_len, req->query, ua ? ua : "-", (int)req->body_len, req->body);
        cm_http_respond(req, 200, "text/plain", "X-Extra: 1\r\n", body, (size_t)n);
    }
}

static void observe(const cm_http_request_t *req, int status, double seconds, void *ud)
{
    (void)ud;
    assert_true(seconds >= 0.0 && seconds < 10.0);
    if (FX->observed < 64) {
        FX->statuses[FX->observed] = status;
        snprintf(FX->routes[FX->observed], sizeof FX->routes[0], "%s", req->route);
    }
    FX->observed++;
}

static void on_server_done(void *ud)
{
    fixture_t *fx = ud;
    fx->done_called++;
}

static void on_server_done(void *ud);

static void on_async_close(uv_handle_t *h)
{
    (void)h;
}

/* The client thread finished: stop the server so the loop can end. */
static void on_client_done(uv_async_t *a)
{
    fixture_t *fx = a->data;
    if (!fx->stop_requested) {
        fx->stop_requested = 1;
        cm_http_server_stop(fx->srv, 500, on_server_done, fx);
    }
    uv_close((uv_handle_t *)a, on_async_close);
}

static void *client_main(void *arg)
{
    fixture_t *fx = arg;
    fx->cl->fn(fx->cl);
    uv_async_send(&fx->cl->done_async);
    return NULL;
}

static void base_config(cm_http_config_t *cfg)
{
    cm_http_config_defaults(cfg);
    cfg->host = "127.0.0.1";
    cfg->port = 0;
    cfg->handler = handler;
    cfg->observe = observe;
    cfg->server_header = "test-server";
}

/* Runs `fn` in a client thread against a fresh server; returns with the loop closed. */
static void run(fixture_t *fx, const cm_http_config_t *cfg, client_fn fn)
{
    memset(fx, 0, sizeof *fx);
    FX = fx;
    fx->live_before = cm_alloc_live();
    static client_t cl;
    memset(&cl, 0, sizeof cl);
    fx->cl = &cl;
    cl.fn = fn;
    assert_int_equal(uv_loop_init(&fx->loop), 0);
    assert_int_equal(cm_http_server_start(&fx->loop, cfg, &fx->srv), 0);
    cl.port = cm_http_server_port(fx->srv);
    assert_true(cl.port > 0);
    uv_async_init(&fx->loop, &cl.done_async, on_client_done);
    cl.done_async.data = fx;
    assert_int_equal(pthread_create(&fx->th, NULL, client_main, fx), 0);
    uv_run(&fx->loop, UV_RUN_DEFAULT);
    pthread_join(fx->th, NULL);
    assert_int_equal(fx->done_called, 1);
    assert_int_equal(uv_loop_close(&fx->loop), 0);
    assert_int_equal(cm_alloc_live(), fx->live_before);
}

#define RESP(i) (FX->cl->resp[i])

/* ------------------------------------------------------------------------------------------ */
/* Scenarios                                                                                   */

static void c_keepalive(client_t *cl)
{
    int fd = cli_connect(cl->port);
    cli_sends(fd, "GET /a?x=1 HTTP/1.1\r\nHost: t\r\nX-Test:  v1  \r\n\r\n");
    cli_read_response(fd, cl_slot(cl), RESP_MAX, 0);
    cli_sends(fd, "POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello");
    cli_read_response(fd, cl_slot(cl), RESP_MAX, 0);
    /* chunked body */
    cli_sends(fd, "POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                  "3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nTrailer: x\r\n\r\n");
    cli_read_response(fd, cl_slot(cl), RESP_MAX, 0);
    /* Expect: 100-continue gets the interim answer before the body is sent. */
    cli_sends(fd,
              "POST /e HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n");
    cli_read_response(fd, cl_slot(cl), RESP_MAX, 1);
    cli_sends(fd, "world");
    cli_read_response(fd, cl_slot(cl), RESP_MAX, 0);
    cli_sends(fd, "GET /d HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    cli_read_response(fd, cl_slot(cl), RESP_MAX, 0);
    cl->val[0] = cli_wait_eof(fd);
    close(fd);
}

static void keepalive_and_close(void **state)
{
    (void)state;
    fixture_t fx;
    cm_http_config_t cfg;
    base_config(&cfg);
    run(&fx, &cfg, c_keepalive);
    assert_string_equal(RESP(0), "HTTP/1.1 200 OK\r\nServer: test-server\r\n"
                                 "Content-Type: text/plain\r\nContent-Length: 23\r\n"
                                 "X-Extra: 1\r\n\r\nGET /a q=x=1 h=v1 body=");
    assert_non_null(strstr(RESP(1), "\r\n\r\nPOST /b q= h=- body=hello"));
    assert_null(strstr(RESP(1), "Connection:"));
    assert_non_null(strstr(RESP(2), "\r\n\r\nPOST /c q= h=- body=abcde"));
    assert_string_equal(RESP(3), "HTTP/1.1 100 Continue\r\n\r\n");
    assert_non_null(strstr(RESP(4), "\r\n\r\nPOST /e q= h=- body=world"));
    assert_non_null(strstr(RESP(5), "Connection: close\r\n"));
    assert_non_null(strstr(RESP(5), "GET /d"));
    assert_int_equal(fx.cl->val[0], 1);
    assert_int_equal(fx.observed, 5);
    assert_string_equal(fx.routes[0], "unmatched");
}

static void c_http10(client_t *cl)
{
    int fd = cli_connect(cl->port);
    cli_sends(fd, "GET /old HTTP/1.0\r\n\r\n");
    cli_read_response(fd, cl_slot(cl), RESP_MAX, 0);
    cl->val[0] = cli_wait_eof(fd);
    close(fd);
    fd = cli_connect(cl->port);
    cli_sends(fd, "GET /ka HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    cli_read_response(fd, cl_slot(cl), RESP_MAX, 0);
    cli_sends(fd, "GET /ka2 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    cli_read_response(fd, cl_slot(cl), RESP_MAX, 0);
    close(fd);
}

static void http10(void **state)
{
    (void)state;
    fixture_t fx;
    cm_http_config_t cfg;
    base_config(&cfg);
    run(&fx, &cfg, c_http10);
    assert_non_null(strstr(RESP(0), "Connection: close\r\n"));
    assert_int_equal(fx.cl->val[0], 1);
    assert_non_null(strstr(RESP(1), "Connection: keep-alive\r\n"));
    assert_non_null(strstr(RESP(2), "GET /ka2"));
}

static void c_pipeline(client_t *cl)
{
    int fd = cli_connect(cl->port);
    /* One write: the first is answered after a timer, the others at once; the 4th is split. */
    cli_sends(fd, "GET /slow HTTP/1.1\r\nHost: t\r\n\r\n"
                  "GET /fast1 HTTP/1.1\r\nHost: t\r\n\r\n"
                  "GET /slow HTTP/1.1\r\nHost: t\r\n\r\n"
                  "GET /fast2 HT");
    sleep_ms(20);
    cli_sends(fd, "TP/1.1\r\nHost: t\r\n\r\n");
    for (int i = 0; i < 4; i++)
        cli_read_response(fd, cl_slot(cl), RESP_MAX, 0);
    /* Half-close after pipelined requests: all of them are still answered. */
    cli_sends(fd, "GET /slow HTTP/1.1\r\nHost: t\r\n\r\nGET /fast3 HTTP/1.1\r\nHost: t\r\n\r\n");
    shutdown(fd, SHUT_WR);
    cl->val[0] = cli_read_all(fd, cl_slot(cl), RESP_MAX);
    close(fd);
}

static void pipelining_in_order(void **state)
{
    (void)state;
    fixture_t fx;
    cm_http_config_t cfg;
    base_config(&cfg);
    run(&fx, &cfg, c_pipeline);
    assert_true(strstr(RESP(0), "\r\n\r\nslow") != NULL);
    assert_true(strstr(RESP(1), "GET /fast1") != NULL);
    assert_true(strstr(RESP(2), "\r\n\r\nslow") != NULL);
    assert_true(strstr(RESP(3), "GET /fast2") != NULL);
    const char *all = RESP(4);
    const char *a = strstr(all, "slow");
    const char *b = strstr(all, "GET /fast3");
    assert_non_null(a);
    assert_non_null(b);
    assert_true(a < b);
    assert_non_null(strstr(b - 60, "Connection: close")); /* the last answer closes */
    assert_int_equal(fx.observed, 6);
}

static void c_head(client_t *cl)
{
    int fd = cli_connect(cl->port);
    cli_sends(fd, "GET /h HTTP/1.1\r\nHost: t\r\n\r\n");
    cli_read_response(fd, cl_slot(cl), RESP_MAX, 0);
    cli_sends(fd, "HEAD /h HTTP/1.1\r\nHost: t\r\n\r\n");
    cli_read_response(fd, cl_slot(cl), RESP_MAX, 1);
    /* If HEAD leaked a body, it would show up before this response. */
    cli_sends(fd, "GET /nocontent HTTP/1.1\r\nHost: t\r\n\r\n");
    cli_read_response(fd, cl_slot(cl), RESP_MAX, 0);
    cli_sends(fd, "GET /error HTTP/1.1\r\nHost: t\r\n\r\n");
    cli_read_response(fd, cl_slot(cl), RESP_MAX, 0);
    close(fd);
}

static void head_and_status(void **state)
{
    (void)state;
    fixture_t fx;
    cm_http_config_t cfg;
    base_config(&cfg);
    run(&fx, &cfg, c_head);
    assert_non_null(strstr(RESP(0), "Content-Length: 19\r\n"));
    assert_non_null(strstr(RESP(1), "Content-Length: 20\r\n")); /* "HEAD /h ..." is one longer */
    assert_true(strlen(RESP(1)) > 4);
    assert_string_equal(RESP(1) + strlen(RESP(1)) - 4, "\r\n\r\n");
    assert_true(strncmp(RESP(2), "HTTP/1.1 204 No Content\r\n", 25) == 0);
    assert_null(strstr(RESP(2), "Content-Length"));
    assert_true(strncmp(RESP(3), "HTTP/1.1 503 Service Unavailable\r\n", 34) == 0);
    assert_non_null(strstr(RESP(3), "Retry-After: 1\r\n"));
    assert_non_null(strstr(
        RESP(3),
        "\r\n\r\n{\"error\":{\"code\":\"origin_unavailable\",\"message\":\"try \\\"later\\\"\"}}"));
}

/* Sends `req` on a fresh connection and records the whole answer up to EOF. */
static void send_expect_close(client_t *cl, const char *req, size_t len)
{
    int fd = cli_connect(cl->port);
    cli_send(fd, req, len);
    int n = cli_read_all(fd, cl_slot(cl), RESP_MAX);
    cl->val[cl->nresp - 1 < 16 ? cl->nresp - 1 : 15] = n;
    close(fd);
}

static void c_bad(client_t *cl)
{
    static char big[2048];
    memset(big, 'a', sizeof big);
    memcpy(big, "GET / HTTP/1.1\r\nHost: t\r\nX-Big: ", 32);
    memcpy(big + sizeof big - 4, "\r\n\r\n", 4);
    const char *cases[] = {
        "GARBAGE\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",          /* bare CR */
        "GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",  /* obs-fold */
        "GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n\tb\r\n\r\n", /* obs-fold, tab */
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\rabc\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        "0\r\n\r\n",
        "GET / HTTP/1.1\r\n\r\n",                       /* no Host */
        "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", /* two Hosts */
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        "3\r\nabc\r\n0\r\nX: a\r\n b\r\n\r\n", /* folded trailer */
        /* a field of one value, twice */
        "GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer x\r\nauthorization: Bearer y\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nOrigin: http://a\r\nOrigin: http://b\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nLast-Event-ID: 1\r\nLast-Event-ID: 2\r\n\r\n",
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        send_expect_close(cl, cases[i], strlen(cases[i]));
    send_expect_close(cl, big, sizeof big); /* 431: head over 1024 */
    /* 431: too many headers (max 8) */
    const char *many = "GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 1\r\nC: 1\r\nD: 1\r\n"
                       "E: 1\r\nF: 1\r\nG: 1\r\nH: 1\r\n\r\n";
    send_expect_close(cl, many, strlen(many));
    /* 413 by Content-Length */
    const char *large = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n";
    send_expect_close(cl, large, strlen(large));
}

static void bad_requests_rejected(void **state)
{
    (void)state;
    fixture_t fx;
    cm_http_config_t cfg;
    base_config(&cfg);
    cfg.max_header_bytes = 1024;
    cfg.max_headers = 8;
    cfg.max_body_bytes = 64;
    run(&fx, &cfg, c_bad);
    for (int i = 0; i < 14; i++) {
        if (strncmp(RESP(i), "HTTP/1.1 400 Bad Request\r\n", 26) != 0)
            fail_msg("case %d: %s", i, RESP(i));
        assert_non_null(strstr(RESP(i), "Connection: close\r\n"));
        assert_non_null(strstr(RESP(i), "\"code\":\"bad_request\""));
    }
    assert_non_null(strstr(RESP(10), "repeated Authorization header"));
    assert_non_null(strstr(RESP(13), "repeated Last-Event-ID header"));
    assert_true(strncmp(RESP(14), "HTTP/1.1 431 ", 13) == 0);
    assert_non_null(strstr(RESP(14), "\"code\":\"headers_too_large\""));
    assert_true(strncmp(RESP(15), "HTTP/1.1 431 ", 13) == 0);
    assert_true(strncmp(RESP(16), "HTTP/1.1 413 ", 13) == 0);
    assert_int_equal(fx.observed, 17);
    assert_int_equal(fx.statuses[0], 400);
    assert_string_equal(fx.routes[0], "unmatched");
}

static void c_chunked_big(client_t *cl)
{
    int fd = cli_connect(cl->port);
    cli_sends(fd, "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n");
    for (int i = 0; i < 20; i++)
        cli_sends(fd, "8\r\n12345678\r\n");
    cli_sends(fd, "0\r\n\r\n");
    cli_read_all(fd, cl_slot(cl), RESP_MAX);
    close(fd);
}

static void chunked_body_limit(void **state)
{
    (void)state;
    fixture_t fx;
    cm_http_config_t cfg;
    base_config(&cfg);
    cfg.max_body_bytes = 64;
    run(&fx, &cfg, c_chunked_big);
    assert_true(strncmp(RESP(0), "HTTP/1.1 413 ", 13) == 0);
}

static void c_timeouts(client_t *cl)
{
    /* An incomplete head gets 408 and a close once the header timeout passes. */
    int fd = cli_connect(cl->port);
    cli_sends(fd, "GET / HTTP/1.1\r\nHo");
    cli_read_all(fd, cl_slot(cl), RESP_MAX);
    close(fd);
    /* Slowloris: a byte every 40 ms never completes within 200 ms. */
    fd = cli_connect(cl->port);
    const char *req = "GET / HTTP/1.1\r\nHost: t\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    char *slot = cl_slot(cl);
    for (size_t i = 0; req[i]; i++) {
        if (send(fd, req + i, 1, MSG_NOSIGNAL) != 1)
            break;
        sleep_ms(40);
        if (recv(fd, slot, 1, MSG_PEEK | MSG_DONTWAIT) > 0)
            break; /* the server answered (408) before the head was complete */
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    cli_read_all(fd, slot, RESP_MAX);
    cl->val[0] = (int)((t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000);
    close(fd);
    /* A connection that sends nothing is closed silently after the header timeout. */
    fd = cli_connect(cl->port);
    cl->val[1] = cli_read_all(fd, cl_slot(cl), RESP_MAX);
    close(fd);
    /* Idle keep-alive: closed after the idle timeout. */
    fd = cli_connect(cl->port);
    cli_sends(fd, "GET / HTTP/1.1\r\nHost: t\r\n\r\n");
    cli_read_response(fd, cl_slot(cl), RESP_MAX, 0);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    cl->val[2] = cli_wait_eof(fd);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    cl->val[3] = (int)((t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000);
    close(fd);
}

static void timeouts(void **state)
{
    (void)state;
    fixture_t fx;
    cm_http_config_t cfg;
    base_config(&cfg);
    cfg.header_timeout_ms = 200;
    cfg.idle_timeout_ms = 150;
    run(&fx, &cfg, c_timeouts);
    assert_true(strncmp(RESP(0), "HTTP/1.1 408 ", 13) == 0);
    assert_true(strncmp(RESP(1), "HTTP/1.1 408 ", 13) == 0);
    assert_in_range(fx.cl->val[0], 150, 1000);
    assert_int_equal(fx.cl->val[1], 0);
    assert_int_equal(fx.cl->val[2], 1);
    assert_in_range(fx.cl->val[3], 100, 1000);
}

static void c_limit(client_t *cl)
{
    int a = cli_connect(cl->port);
    int b = cli_connect(cl->port);
    cli_sends(a, "GET /1 HTTP/1.1\r\nHost: t\r\n\r\n");
    cli_read_response(a, cl_slot(cl), RESP_MAX, 0);
    cli_sends(b, "GET /2 HTTP/1.1\r\nHost: t\r\n\r\n");
    cli_read_response(b, cl_slot(cl), RESP_MAX, 0);
    int c = cli_connect(cl->port);
    cli_read_all(c, cl_slot(cl), RESP_MAX);
    close(c);
    close(a);
    close(b);
}

static void connection_limit(void **state)
{
    (void)state;
    fixture_t fx;
    cm_http_config_t cfg;
    base_config(&cfg);
    cfg.max_connections = 2;
    run(&fx, &cfg, c_limit);
    assert_non_null(strstr(RESP(0), "GET /1"));
    assert_non_null(strstr(RESP(1), "GET /2"));
    assert_true(strncmp(RESP(2), "HTTP/1.1 503 ", 13) == 0);
    assert_non_null(strstr(RESP(2), "Connection: close"));
}

static void c_disconnect(client_t *cl)
{
    /* Reset while the handler holds the request, and plain close while it holds another. */
    int fd = cli_connect(cl->port);
    cli_sends(fd, "GET /hold HTTP/1.1\r\nHost: t\r\n\r\n");
    sleep_ms(30);
    struct linger lg = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(fd);
    fd = cli_connect(cl->port);
    cli_sends(fd, "GET /hold HTTP/1.1\r\nHost: t\r\n\r\nGET /x HTTP/1.1\r\nHost: t\r\n\r\n");
    sleep_ms(30);
    close(fd);
    sleep_ms(300); /* let both handlers answer into the void */
}

static void peer_disconnect_while_busy(void **state)
{
    (void)state;
    fixture_t fx;
    cm_http_config_t cfg;
    base_config(&cfg);
    run(&fx, &cfg, c_disconnect);
    assert_true(fx.observed >= 2);
    assert_int_equal(fx.statuses[0], 200);
}

static void c_stop(client_t *cl)
{
    int idle = cli_connect(cl->port);
    cli_sends(idle, "GET /warm HTTP/1.1\r\nHost: t\r\n\r\n");
    cli_read_response(idle, cl_slot(cl), RESP_MAX, 0);
    int fd = cli_connect(cl->port);
    cli_sends(fd, "GET /stop HTTP/1.1\r\nHost: t\r\n\r\n");
    cli_read_response(fd, cl_slot(cl), RESP_MAX, 0);
    cl->val[0] = cli_wait_eof(fd);
    cl->val[1] = cli_wait_eof(idle);        /* the idle keep-alive connection was closed at stop */
    cl->val[2] = cli_connect(cl->port) < 0; /* the listener is gone */
    close(fd);
    close(idle);
}

static void graceful_stop(void **state)
{
    (void)state;
    fixture_t fx;
    cm_http_config_t cfg;
    base_config(&cfg);
    run(&fx, &cfg, c_stop);
    assert_non_null(strstr(RESP(1), "Connection: close\r\n"));
    assert_non_null(strstr(RESP(1), "stopping"));
    assert_int_equal(fx.cl->val[0], 1);
    assert_int_equal(fx.cl->val[1], 1);
    assert_int_equal(fx.cl->val[2], 1);
}

static void c_upgrade(client_t *cl)
{
    int fd = cli_connect(cl->port);
    /* Bytes after the head arrive in the same segment: they must reach on_read first. */
    cli_sends(fd, "GET /upgrade HTTP/1.1\r\nHost: t\r\nUpgrade: echo\r\nConnection: Upgrade\r\n"
                  "\r\nhello");
    cli_read_response(fd, cl_slot(cl), RESP_MAX, 1);
    char buf[64] = {0};
    ssize_t n = recv(fd, buf, 5, MSG_WAITALL);
    snprintf(cl_slot(cl), RESP_MAX, "%.*s", (int)(n > 0 ? n : 0), buf);
    cli_sends(fd, "again");
    n = recv(fd, buf, 5, MSG_WAITALL);
    snprintf(cl_slot(cl), RESP_MAX, "%.*s", (int)(n > 0 ? n : 0), buf);
    cli_sends(fd, "bye");
    cli_read_all(fd, cl_slot(cl), RESP_MAX);
    close(fd);
    /* An upgrade request the handler does not grant closes after its answer. */
    fd = cli_connect(cl->port);
    cli_sends(fd, "GET /plain HTTP/1.1\r\nHost: t\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n");
    cli_read_all(fd, cl_slot(cl), RESP_MAX);
    close(fd);
}

static void upgrade_raw(void **state)
{
    (void)state;
    fixture_t fx;
    cm_http_config_t cfg;
    base_config(&cfg);
    run(&fx, &cfg, c_upgrade);
    assert_true(strncmp(RESP(0), "HTTP/1.1 101 Switching Protocols\r\n", 34) == 0);
    assert_string_equal(RESP(1), "hello");
    assert_string_equal(RESP(2), "again");
    assert_string_equal(RESP(3), "ciao");
    assert_non_null(strstr(RESP(4), "Connection: close\r\n"));
    assert_int_equal(fx.raw_closed, 1);
    assert_int_equal(fx.statuses[0], 101);
}

static void c_big(client_t *cl)
{
    int fd = cli_connect(cl->port);
    cli_sends(fd, "GET /big HTTP/1.1\r\nHost: t\r\n\r\nGET /after HTTP/1.1\r\nHost: t\r\n\r\n");
    sleep_ms(100); /* let the kernel buffers fill so the server must queue the rest */
    char head[512];
    size_t len = 0;
    while (len < 4 || memcmp(head + len - 4, "\r\n\r\n", 4) != 0) {
        if (recv(fd, head + len, 1, 0) != 1)
            break;
        len++;
    }
    size_t total = 0;
    static char buf[65536];
    int ok = 1;
    while (total < sizeof BIG) {
        size_t want = sizeof BIG - total < sizeof buf ? sizeof BIG - total : sizeof buf;
        ssize_t r = recv(fd, buf, want, 0);
        if (r <= 0)
            break;
        for (ssize_t i = 0; i < r; i++)
            ok &= buf[i] == (char)((total + (size_t)i) % 251);
        total += (size_t)r;
    }
    cl->val[0] = (int)total;
    cl->val[1] = ok;
    cli_read_response(fd, cl_slot(cl), RESP_MAX, 0);
    close(fd);
}

static void large_response_queued(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof BIG; i++)
        BIG[i] = (char)(i % 251);
    fixture_t fx;
    cm_http_config_t cfg;
    base_config(&cfg);
    run(&fx, &cfg, c_big);
    assert_int_equal(fx.cl->val[0], (int)sizeof BIG);
    assert_int_equal(fx.cl->val[1], 1);
    assert_non_null(strstr(RESP(0), "GET /after"));
}

/* A client that pipelines a flood of requests and reads nothing for a while: every answer
 * still arrives, in order, and the server stops reading instead of queueing without bound. */
static void c_flood(client_t *cl)
{
    /* 4 KiB answers: 12 MiB in all, more than the kernel buffers on both sides can absorb. */
    static const char one[] = "GET /kb HTTP/1.1\r\nHost: t\r\n\r\n";
    enum { N = 3000 };
    int fd = cli_connect_rcvbuf(cl->port, 16384);
    cli_sends(fd, one);
    int rlen = cli_read_response(fd, cl_slot(cl), RESP_MAX, 0);
    static char out[N * (sizeof one - 1)];
    for (size_t i = 0; i < N; i++)
        memcpy(out + i * (sizeof one - 1), one, sizeof one - 1);
    size_t sent = 0, total = sizeof out, got = 0, want = (size_t)rlen * N;
    while (sent < total) { /* phase 1: send without reading */
        ssize_t w = send(fd, out + sent, total - sent, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (w <= 0)
            break;
        sent += (size_t)w;
    }
    sleep_ms(200);
    static char in[65536];
    int ok = 1;
    while (got < want) {
        if (sent < total) {
            ssize_t w = send(fd, out + sent, total - sent, MSG_DONTWAIT | MSG_NOSIGNAL);
            if (w > 0)
                sent += (size_t)w;
        }
        ssize_t r = recv(fd, in, sizeof in, sent < total ? MSG_DONTWAIT : 0);
        if (r == 0 || (r < 0 && sent >= total)) {
            ok = 0;
            break;
        }
        if (r > 0)
            got += (size_t)r;
    }
    cl->val[0] = ok;
    cl->val[1] = (int)(got / 1024);
    cl->val[2] = (int)(want / 1024);
    close(fd);
}

static void pipelined_flood_without_reading(void **state)
{
    (void)state;
    fixture_t fx;
    cm_http_config_t cfg;
    base_config(&cfg);
    run(&fx, &cfg, c_flood);
    assert_int_equal(fx.cl->val[0], 1);
    assert_int_equal(fx.cl->val[1], fx.cl->val[2]);
    assert_int_equal(fx.observed, 3001);
}

/* Garbage, mutated and truncated requests over real sockets: the server must neither crash nor
 * leak (ASan/LSan builds), and must still answer a good request at the end. */
static void c_fuzz(client_t *cl)
{
    static const char *seeds[] = {
        "GET /a?b=c HTTP/1.1\r\nHost: t\r\nX: y\r\n\r\n",
        "POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nbody",
        "POST /p HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n",
        "GET /u HTTP/1.1\r\nHost: t\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
        "GET / HTTP/1.0\r\n\r\n",
    };
    unsigned seed = 12345;
    char buf[512];
    for (int iter = 0; iter < 300; iter++) {
        size_t n;
        int kind = iter % 3;
        const char *s = seeds[(unsigned)iter % (sizeof seeds / sizeof seeds[0])];
        if (kind == 0) { /* random bytes */
            n = (size_t)(rand_r(&seed) % 300) + 1;
            for (size_t i = 0; i < n; i++)
                buf[i] = (char)rand_r(&seed);
        } else if (kind == 1) { /* mutated valid request */
            n = strlen(s);
            memcpy(buf, s, n);
            for (int m = 0; m < 3; m++)
                buf[(size_t)rand_r(&seed) % n] = (char)rand_r(&seed);
        } else { /* truncated, maybe followed by a second copy */
            n = (size_t)rand_r(&seed) % strlen(s);
            memcpy(buf, s, n);
            if (rand_r(&seed) % 2) {
                memcpy(buf + n, s, strlen(s));
                n += strlen(s);
            }
        }
        int fd = cli_connect(cl->port);
        if (fd < 0)
            continue;
        cli_send(fd, buf, n);
        shutdown(fd, SHUT_WR);
        char sink[4096];
        ssize_t r;
        while ((r = recv(fd, sink, sizeof sink, 0)) > 0) {
        }
        if (r < 0 && errno != ECONNRESET)
            cl->val[0]++; /* timed out: the server left the connection open */
        close(fd);
    }
    int fd = cli_connect(cl->port);
    cli_sends(fd, "GET /alive HTTP/1.1\r\nHost: t\r\n\r\n");
    cli_read_response(fd, cl_slot(cl), RESP_MAX, 0);
    close(fd);
}

static void fuzz_garbage(void **state)
{
    (void)state;
    fixture_t fx;
    cm_http_config_t cfg;
    base_config(&cfg);
    cfg.header_timeout_ms = 300;
    cfg.max_body_bytes = 64;
    run(&fx, &cfg, c_fuzz);
    assert_non_null(strstr(RESP(0), "GET /alive"));
    assert_int_equal(fx.cl->val[0], 0);
}

/* ------------------------------------------------------------------------------------------ */
/* RFC 9112 gaps found with conformance suites                                                 */

/* Each answer of `cl` from `from` on must be a `status` error with `code` that closed the
 * connection (send_expect_close read it up to EOF). */
static void assert_refused(int from, int n, const char *status_line, const char *code)
{
    char want[64];
    snprintf(want, sizeof want, "\"code\":\"%s\"", code);
    for (int i = from; i < from + n; i++) {
        if (strncmp(RESP(i), status_line, strlen(status_line)) != 0)
            fail_msg("case %d: %s", i, RESP(i));
        assert_non_null(strstr(RESP(i), "Connection: close\r\n"));
        assert_non_null(strstr(RESP(i), want));
        assert_true(FX->cl->val[i] > 0); /* closed, not left open until the read timeout */
    }
}

static void c_http10_te(client_t *cl)
{
    /* What follows the faulty message must not be served as a second request. */
    static const char *cases[] = {
        "POST /te HTTP/1.0\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
        "0\r\n\r\nGET /next HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        "POST /te HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "POST /te HTTP/1.0\r\nTransfer-Encoding: gzip, chunked\r\nConnection: keep-alive\r\n\r\n"
        "0\r\n\r\n",
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        send_expect_close(cl, cases[i], strlen(cases[i]));
}

/* RFC 9112 section 6.1: Transfer-Encoding in HTTP/1.0 is faulty framing: 400, then close. */
static void http10_transfer_encoding(void **state)
{
    (void)state;
    fixture_t fx;
    cm_http_config_t cfg;
    base_config(&cfg);
    run(&fx, &cfg, c_http10_te);
    assert_refused(0, 3, "HTTP/1.1 400 Bad Request\r\n", "bad_request");
    assert_null(strstr(RESP(0), "/next"));
    assert_int_equal(fx.observed, 3);
}

static void c_host(client_t *cl)
{
    /* Valid values on one keep-alive connection; the last, invalid, one closes it. */
    static const char *good[] = {"example.com:8080", "[::1]:80", "",
                                 "example.com:8080", "10.0.0.1", "example.com:"};
    int fd = cli_connect(cl->port);
    char req[256];
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        snprintf(req, sizeof req, "GET /host HTTP/1.1\r\nHost: %s\r\n\r\n", good[i]);
        cli_sends(fd, req);
        cli_read_response(fd, cl_slot(cl), RESP_MAX, 0);
    }
    cli_sends(fd, "GET /host HTTP/1.1\r\nHost: example.com:8080 x\r\n\r\n");
    cl->val[6] = cli_read_all(fd, cl_slot(cl), RESP_MAX);
    close(fd);
    static const char *bad[] = {
        "GET / HTTP/1.1\r\nHost: bad host\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: user@example.com\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: example.com/path\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: example.com:port\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: [::1\r\n\r\n",
        "GET / HTTP/1.0\r\nHost: a?b\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
        "GET / HTTP/1.1\r\nX: y\r\n\r\n",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        send_expect_close(cl, bad[i], strlen(bad[i]));
}

/* RFC 9112 section 3.2: 400 for a missing (HTTP/1.1), repeated or invalid Host. */
static void invalid_host(void **state)
{
    (void)state;
    fixture_t fx;
    cm_http_config_t cfg;
    base_config(&cfg);
    run(&fx, &cfg, c_host);
    assert_non_null(strstr(RESP(0), "\r\n\r\nhost=example.com:8080 path=/host q="));
    assert_non_null(strstr(RESP(1), "\r\n\r\nhost=[::1]:80 "));
    assert_non_null(strstr(RESP(2), "\r\n\r\nhost= path=/host"));
    assert_non_null(strstr(RESP(3), "\r\n\r\nhost=example.com:8080 "));
    assert_non_null(strstr(RESP(4), "\r\n\r\nhost=10.0.0.1 "));
    assert_non_null(strstr(RESP(5), "\r\n\r\nhost=example.com: "));
    assert_true(strncmp(RESP(6), "HTTP/1.1 400 ", 13) == 0);
    assert_true(fx.cl->val[6] > 0);
    assert_refused(7, 8, "HTTP/1.1 400 Bad Request\r\n", "bad_request");
}

static void c_field_ws(client_t *cl)
{
    static const char *cases[] = {
        "GET / HTTP/1.1\r\nHost: a\r\nBad Header: v\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nName : v\r\n\r\n",
        "GET / HTTP/1.1\r\nHost : a\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nName\t: v\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        "1\r\na\r\n0\r\nTrailer Field: v\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        "1\r\na\r\n0\r\nT : v\r\n\r\n",
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        send_expect_close(cl, cases[i], strlen(cases[i]));
    /* A name split across two reads is checked in both parts. */
    int fd = cli_connect(cl->port);
    cli_sends(fd, "GET / HTTP/1.1\r\nHost: a\r\nSplit");
    sleep_ms(20);
    cli_sends(fd, " Name: v\r\n\r\n");
    cl->val[6] = cli_read_all(fd, cl_slot(cl), RESP_MAX);
    close(fd);
}

/* RFC 9112 section 5.1: whitespace in a field name or before the colon is a 400. */
static void header_name_whitespace(void **state)
{
    (void)state;
    fixture_t fx;
    cm_http_config_t cfg;
    base_config(&cfg);
    run(&fx, &cfg, c_field_ws);
    assert_refused(0, 7, "HTTP/1.1 400 Bad Request\r\n", "bad_request");
    assert_int_equal(fx.observed, 7);
}

static void c_chunk_crlf(client_t *cl)
{
    /* What llhttp 8 skips after a chunk's data must be CRLF; the GET behind must not run. */
    static const char *cases[] = {
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        "5\r\nhelloXX0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        "5\r\nhello\n\n0\r\n\r\n",
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        send_expect_close(cl, cases[i], strlen(cases[i]));
    /* The CRLF split across reads is checked across them, wrong... */
    int fd = cli_connect(cl->port);
    cli_sends(fd, "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello");
    sleep_ms(20);
    cli_sends(fd, "\r");
    sleep_ms(20);
    cli_sends(fd, "X0\r\n\r\n");
    cl->val[2] = cli_read_all(fd, cl_slot(cl), RESP_MAX);
    close(fd);
    /* ...and right. */
    fd = cli_connect(cl->port);
    cli_sends(fd, "POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc");
    sleep_ms(20);
    cli_sends(fd, "\r");
    sleep_ms(20);
    cli_sends(fd, "\n2\r\nde\r\n0\r\n\r\n");
    cli_read_response(fd, cl_slot(cl), RESP_MAX, 0);
    close(fd);
}

/* RFC 9112 section 7.1: chunk-data is followed by CRLF. */
static void chunk_data_crlf(void **state)
{
    (void)state;
    fixture_t fx;
    cm_http_config_t cfg;
    base_config(&cfg);
    run(&fx, &cfg, c_chunk_crlf);
    assert_refused(0, 3, "HTTP/1.1 400 Bad Request\r\n", "bad_request");
    assert_non_null(strstr(RESP(0), "chunk data not followed by CRLF"));
    assert_int_equal(strncmp(RESP(3), "HTTP/1.1 200 ", 13), 0);
    assert_non_null(strstr(RESP(3), "body=abcde"));
    assert_int_equal(fx.observed, 4);
}

static void c_absolute(client_t *cl)
{
    static const char *good[] = {
        "GET http://example.com:8080/host?x=1 HTTP/1.1\r\nHost: other\r\n\r\n",
        "GET HTTP://[::1]/host HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET https://h.example/host?a=b#frag HTTP/1.1\r\nHost: h\r\n\r\n",
        "GET http://h.example?x=1 HTTP/1.1\r\nHost: h\r\n\r\n",
        "GET http://h.example:81 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        "GET http://h.example/host HTTP/1.1\r\nHost: not valid\r\n\r\n",
    };
    int fd = cli_connect(cl->port);
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        cli_sends(fd, good[i]);
        cli_read_response(fd, cl_slot(cl), RESP_MAX, 0);
    }
    close(fd);
    static const char *bad[] = {
        "GET http://user@h.example/host HTTP/1.1\r\nHost: h\r\n\r\n",
        "GET ftp://h.example/host HTTP/1.1\r\nHost: h\r\n\r\n",
        "GET host HTTP/1.1\r\nHost: h\r\n\r\n",
        "GET http:///host HTTP/1.1\r\nHost: h\r\n\r\n",
        "GET http:/host HTTP/1.1\r\nHost: h\r\n\r\n",
        "GET http://h.example/%zz HTTP/1.1\r\nHost: h\r\n\r\n",
        "GET http://h.example/host HTTP/1.1\r\n\r\n", /* HTTP/1.1 still needs a Host */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        send_expect_close(cl, bad[i], strlen(bad[i]));
}

/* RFC 9112 section 3.2.2: the absolute-form is routed by its path and query, and its
 * authority replaces the Host field. */
static void absolute_form_target(void **state)
{
    (void)state;
    fixture_t fx;
    cm_http_config_t cfg;
    base_config(&cfg);
    run(&fx, &cfg, c_absolute);
    assert_non_null(strstr(RESP(0), "\r\n\r\nhost=example.com:8080 path=/host q=x=1"));
    assert_non_null(strstr(RESP(1), "\r\n\r\nhost=[::1] path=/host q="));
    assert_non_null(strstr(RESP(2), "\r\n\r\nhost=h.example path=/host q=a=b"));
    assert_non_null(strstr(RESP(3), "\r\n\r\nGET / q=x=1 h=- body="));
    assert_non_null(strstr(RESP(4), "\r\n\r\nGET / q= h=- body="));
    assert_non_null(strstr(RESP(5), "\r\n\r\nhost=h.example path=/host q="));
    assert_refused(6, 7, "HTTP/1.1 400 Bad Request\r\n", "bad_request");
}

static void c_versions(client_t *cl)
{
    static const char *cases[] = {
        "GET / HTTP/2.0\r\nHost: a\r\n\r\n",
        "GET / HTTP/0.9\r\n\r\n",
        "GET /\r\n\r\n",
        "GET /\r\nHost: a\r\n\r\n",
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        send_expect_close(cl, cases[i], strlen(cases[i]));
}

/* 505 for a major version other than 1 (RFC 9110 section 15.6.6), 400 for a request line
 * without a version (HTTP/0.9 style). */
static void http_versions(void **state)
{
    (void)state;
    fixture_t fx;
    cm_http_config_t cfg;
    base_config(&cfg);
    run(&fx, &cfg, c_versions);
    assert_refused(0, 2, "HTTP/1.1 505 HTTP Version Not Supported\r\n", "unsupported_http_version");
    assert_refused(2, 2, "HTTP/1.1 400 Bad Request\r\n", "bad_request");
    assert_int_equal(fx.statuses[0], 505);
}

/* 200 pipelined requests for a 48 KiB page in one write, and the client reads nothing for a
 * while: the queue of unsent answers stays near the limit (1 MiB) instead of growing to all
 * 200 answers (9.4 MiB); every answer still arrives once the client reads. */
static void c_pages(client_t *cl)
{
    enum { N = 200 };
    static const char one[] = "GET /page HTTP/1.1\r\nHost: t\r\n\r\n";
    static char out[N * (sizeof one - 1)];
    for (size_t i = 0; i < N; i++)
        memcpy(out + i * (sizeof one - 1), one, sizeof one - 1);
    int fd = cli_connect_rcvbuf(cl->port, 4096);
    cli_send(fd, out, sizeof out);
    sleep_ms(500);
    static char in[65536];
    size_t got = 0, head = 0;
    {
        char tmp[1024];
        int n = cli_read_response(fd, tmp, sizeof tmp, 1);
        head = n > 0 ? (size_t)n : 0;
    }
    size_t want = N * (head + PAGE_BYTES) - head;
    while (got < want) {
        ssize_t r = recv(fd, in, sizeof in, 0);
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    cl->val[0] = (int)head;
    cl->val[1] = got == want;
    close(fd);
}

static void pipelined_pages_bounded(void **state)
{
    (void)state;
    fixture_t fx;
    cm_http_config_t cfg;
    base_config(&cfg);
    run(&fx, &cfg, c_pages);
    assert_true(fx.cl->val[0] > 0);
    assert_int_equal(fx.cl->val[1], 1);
    assert_int_equal(fx.observed, 200);
    /* At most the limit plus the one answer (head and body) that crossed it. */
    print_message("most bytes queued: %zu\n", fx.max_queued);
    if (fx.max_queued > 1024 * 1024 + PAGE_BYTES + 1024)
        fail_msg("%zu bytes queued", fx.max_queued);
}

/* ------------------------------------------------------------------------------------------ */
/* Pure functions                                                                              */

static void query_params(void **state)
{
    (void)state;
    cm_http_request_t r;
    memset(&r, 0, sizeof r);
    char out[16];
    r.query = "market=BTC-USD&x=a%20b+c&empty=&flag&k%65y=v&long=0123456789abcdefXYZ";
    r.query_len = strlen(r.query);
    assert_int_equal(cm_http_query_param(&r, "market", out, sizeof out), 7);
    assert_string_equal(out, "BTC-USD");
    assert_int_equal(cm_http_query_param(&r, "x", out, sizeof out), 5);
    assert_string_equal(out, "a b c");
    assert_int_equal(cm_http_query_param(&r, "empty", out, sizeof out), 0);
    assert_string_equal(out, "");
    assert_int_equal(cm_http_query_param(&r, "flag", out, sizeof out), 0);
    assert_int_equal(cm_http_query_param(&r, "key", out, sizeof out), 1);
    assert_string_equal(out, "v");
    assert_int_equal(cm_http_query_param(&r, "missing", out, sizeof out), UV_ENOENT);
    assert_int_equal(cm_http_query_param(&r, "long", out, sizeof out), UV_E2BIG);
    assert_int_equal(cm_http_query_param(&r, "mark", out, sizeof out), UV_ENOENT);
    /* A long escaped value that fits once decoded. */
    r.query = "m=%41%41%41%41%41%41%41%41%41%41";
    r.query_len = strlen(r.query);
    assert_int_equal(cm_http_query_param(&r, "m", out, sizeof out), 10);
    assert_string_equal(out, "AAAAAAAAAA");
    r.query = "a=1&b=%zz";
    r.query_len = strlen(r.query);
    assert_int_equal(cm_http_query_param(&r, "a", out, sizeof out), UV_EINVAL);
    r.query = "a=%4";
    r.query_len = strlen(r.query);
    assert_int_equal(cm_http_query_param(&r, "a", out, sizeof out), UV_EINVAL);
    /* A value that decodes to a NUL byte would be cut short by C string functions. */
    r.query = "m=BTC-USD%00,bad!!";
    r.query_len = strlen(r.query);
    assert_int_equal(cm_http_query_param(&r, "m", out, sizeof out), UV_EINVAL);
    assert_int_equal(cm_http_query_check(&r), UV_EINVAL);
    r.query = "a=1&b=x%00";
    r.query_len = strlen(r.query);
    assert_int_equal(cm_http_query_param(&r, "a", out, sizeof out), UV_EINVAL);
    /* One key twice: which value counts would depend on the reader. */
    static const char *const twice[] = {"a=1&a=2", "a=1&b=2&a", "a&%61=1",
                                        "a=0123456789abcdefXYZ&a=1"};
    for (size_t i = 0; i < sizeof twice / sizeof *twice; i++) {
        r.query = twice[i];
        r.query_len = strlen(r.query);
        assert_int_equal(cm_http_query_check(&r), 0);
        assert_int_equal(cm_http_query_param(&r, "a", out, sizeof out), UV_EEXIST);
        assert_int_equal(cm_http_query_param(&r, "b", out, sizeof out), i == 1 ? 1 : UV_ENOENT);
    }
    r.query = "";
    r.query_len = 0;
    assert_int_equal(cm_http_query_check(&r), 0);
    assert_int_equal(cm_http_query_param(&r, "a", out, sizeof out), UV_ENOENT);
    /* query_len bounds the search (the target after it is not looked at) */
    r.query = "a=1&b=2";
    r.query_len = 3;
    assert_int_equal(cm_http_query_param(&r, "b", out, sizeof out), UV_ENOENT);
    assert_int_equal(cm_http_query_param(&r, "a", out, sizeof out), 1);
}

static void headers_and_texts(void **state)
{
    (void)state;
    cm_http_header_t h[2] = {{"Content-Type", "text/plain"}, {"X-A", "1"}};
    cm_http_request_t r;
    memset(&r, 0, sizeof r);
    r.headers = h;
    r.nheaders = 2;
    assert_string_equal(cm_http_header(&r, "content-type"), "text/plain");
    assert_string_equal(cm_http_header(&r, "X-a"), "1");
    assert_null(cm_http_header(&r, "X-B"));
    assert_string_equal(cm_http_status_text(431), "Request Header Fields Too Large");
    assert_string_equal(cm_http_status_text(799), "Unknown");
    cm_http_config_t cfg;
    cm_http_config_defaults(&cfg);
    assert_int_equal(cfg.max_header_bytes, 8192);
    cm_http_server_t *s = NULL;
    uv_loop_t loop;
    uv_loop_init(&loop);
    assert_int_equal(cm_http_server_start(&loop, &cfg, &s), UV_EINVAL); /* no handler */
    cfg.handler = handler;
    cfg.host = "no-such-host.invalid"; /* names are resolved; this one cannot be */
    assert_true(cm_http_server_start(&loop, &cfg, &s) < 0);
    assert_null(s);
    assert_int_equal(uv_loop_close(&loop), 0);
}

static void bind_failure_frees(void **state)
{
    (void)state;
    long before = cm_alloc_live();
    uv_loop_t loop;
    uv_loop_init(&loop);
    cm_http_config_t cfg;
    base_config(&cfg);
    cm_http_server_t *a = NULL, *b = NULL;
    assert_int_equal(cm_http_server_start(&loop, &cfg, &a), 0);
    cfg.port = cm_http_server_port(a);
    assert_int_equal(cm_http_server_start(&loop, &cfg, &b), UV_EADDRINUSE);
    fixture_t fx;
    memset(&fx, 0, sizeof fx);
    cm_http_server_stop(a, 100, on_server_done, &fx);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(fx.done_called, 1);
    assert_int_equal(uv_loop_close(&loop), 0);
    assert_int_equal(cm_alloc_live(), before);
}

int main(void)
{
    cm_json_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(query_params),
        cmocka_unit_test(headers_and_texts),
        cmocka_unit_test(bind_failure_frees),
        cmocka_unit_test(keepalive_and_close),
        cmocka_unit_test(http10),
        cmocka_unit_test(pipelining_in_order),
        cmocka_unit_test(head_and_status),
        cmocka_unit_test(bad_requests_rejected),
        cmocka_unit_test(chunked_body_limit),
        cmocka_unit_test(timeouts),
        cmocka_unit_test(connection_limit),
        cmocka_unit_test(peer_disconnect_while_busy),
        cmocka_unit_test(graceful_stop),
        cmocka_unit_test(upgrade_raw),
        cmocka_unit_test(large_response_queued),
        cmocka_unit_test(pipelined_flood_without_reading),
        cmocka_unit_test(fuzz_garbage),
        cmocka_unit_test(http10_transfer_encoding),
        cmocka_unit_test(invalid_host),
        cmocka_unit_test(header_name_whitespace),
        cmocka_unit_test(chunk_data_crlf),
        cmocka_unit_test(absolute_form_target),
        cmocka_unit_test(http_versions),
        cmocka_unit_test(pipelined_pages_bounded),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
