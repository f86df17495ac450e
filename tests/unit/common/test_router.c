/*
 * cm/router.h tests: registration rules, and dispatch over a real cm_http server (a blocking
 * client thread sends requests on one keep-alive connection; the main thread runs the loop and
 * asserts after joining it).
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>
#include <uv.h>

#include "cm/alloc.h"
#include "cm/json.h"
#include "cm/router.h"

#define NREQ 10
#define RESP_MAX 2048

typedef struct fixture {
    uv_loop_t loop;
    uv_async_t done_async;
    cm_http_server_t *srv;
    cm_router_t *router;
    pthread_t th;
    int port;
    char resp[NREQ][RESP_MAX];
    char routes[NREQ][64];
    int nobs, done_called, a_calls, b_calls;
} fixture_t;

/* ---- client thread ---- */

static int cli_connect(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct timeval tv = {3, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Reads one response; no body for HEAD. */
static void cli_exchange(int fd, const char *req, char *out, int head_only)
{
    send(fd, req, strlen(req), MSG_NOSIGNAL);
    size_t len = 0;
    out[0] = '\0';
    while (len < 4 || memcmp(out + len - 4, "\r\n\r\n", 4) != 0) {
        if (len + 1 >= RESP_MAX || recv(fd, out + len, 1, 0) != 1)
            return;
        out[++len] = '\0';
    }
    const char *cl = strcasestr(out, "\r\nContent-Length: ");
    size_t clen = cl && !head_only ? strtoul(cl + 18, NULL, 10) : 0;
    while (clen > 0 && len + 1 < RESP_MAX) {
        ssize_t r = recv(fd, out + len, clen, 0);
        if (r <= 0)
            return;
        len += (size_t)r;
        clen -= (size_t)r;
        out[len] = '\0';
    }
}

static const char *REQS[NREQ] = {
    "GET /a HTTP/1.1\r\nHost: t\r\n\r\n",
    "HEAD /a HTTP/1.1\r\nHost: t\r\n\r\n",
    "GET /a?x=1 HTTP/1.1\r\nHost: t\r\n\r\n",
    "POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n",
    "GET /nope HTTP/1.1\r\nHost: t\r\n\r\n",
    "POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi",
    "DELETE /b HTTP/1.1\r\nHost: t\r\n\r\n",
    "GET /a/ HTTP/1.1\r\nHost: t\r\n\r\n",
    "PROPFIND /b HTTP/1.1\r\nHost: t\r\n\r\n",
    "GET /A HTTP/1.1\r\nHost: t\r\n\r\n",
};

static void *client_main(void *arg)
{
    fixture_t *fx = arg;
    int fd = cli_connect(fx->port);
    for (int i = 0; i < NREQ; i++)
        cli_exchange(fd, REQS[i], fx->resp[i], strncmp(REQS[i], "HEAD", 4) == 0);
    close(fd);
    uv_async_send(&fx->done_async);
    return NULL;
}

/* ---- loop thread ---- */

static void h_a(cm_http_request_t *req, void *ud)
{
    fixture_t *fx = ud;
    fx->a_calls++;
    cm_http_respond(req, 200, "text/plain", NULL, "route-a", 7);
}

static void h_b(cm_http_request_t *req, void *ud)
{
    fixture_t *fx = ud;
    fx->b_calls++;
    cm_http_respond(req, 201, "text/plain", NULL, req->body, req->body_len);
}

static void observe(const cm_http_request_t *req, int status, double seconds, void *ud)
{
    (void)status;
    (void)seconds;
    fixture_t *fx = ud;
    if (fx->nobs < NREQ)
        snprintf(fx->routes[fx->nobs], sizeof fx->routes[0], "%s", req->route);
    fx->nobs++;
}

static void on_done(void *ud)
{
    fixture_t *fx = ud;
    fx->done_called++;
}

static void on_async_close(uv_handle_t *h)
{
    (void)h;
}

static void on_client_done(uv_async_t *a)
{
    fixture_t *fx = a->data;
    cm_http_server_stop(fx->srv, 500, on_done, fx);
    uv_close((uv_handle_t *)a, on_async_close);
}

static void registration(void **state)
{
    (void)state;
    long before = cm_alloc_live();
    cm_router_t *r = cm_router_new();
    assert_non_null(r);
    assert_int_equal(cm_router_add(r, CM_ROUTE_GET, "/a", h_a, NULL), 0);
    assert_int_equal(cm_router_add(r, CM_ROUTE_POST, "/a", h_a, NULL), UV_EEXIST);
    assert_int_equal(cm_router_add(r, CM_ROUTE_GET, "a", h_a, NULL), UV_EINVAL);
    assert_int_equal(cm_router_add(r, 0, "/z", h_a, NULL), UV_EINVAL);
    assert_int_equal(cm_router_add(r, 1u << 20, "/z", h_a, NULL), UV_EINVAL);
    assert_int_equal(cm_router_add(r, CM_ROUTE_GET, "/z", NULL, NULL), UV_EINVAL);
    /* Many routes grow the table. */
    for (int i = 0; i < 40; i++) {
        char p[16];
        snprintf(p, sizeof p, "/r%d", i);
        assert_int_equal(cm_router_add(r, CM_ROUTE_GET | CM_ROUTE_POST, p, h_a, NULL), 0);
    }
    /* Allocation failures leave the router usable and leak nothing. */
    cm_alloc_fail_after(1);
    assert_int_equal(cm_router_add(r, CM_ROUTE_GET, "/fail1", h_a, NULL), UV_ENOMEM);
    cm_alloc_fail_after(2);
    assert_int_equal(cm_router_add(r, CM_ROUTE_GET, "/fail2", h_a, NULL), UV_ENOMEM);
    cm_alloc_fail_after(0);
    assert_int_equal(cm_router_add(r, CM_ROUTE_GET, "/fail1", h_a, NULL), 0);
    cm_router_free(r);
    cm_router_free(NULL);
    assert_int_equal(cm_alloc_live(), before);
}

static void dispatch(void **state)
{
    (void)state;
    long before = cm_alloc_live();
    fixture_t *fx = calloc(1, sizeof *fx);
    fx->router = cm_router_new();
    assert_int_equal(cm_router_add(fx->router, CM_ROUTE_GET, "/a", h_a, fx), 0);
    assert_int_equal(cm_router_add(fx->router, CM_ROUTE_POST, "/b", h_b, fx), 0);
    assert_int_equal(uv_loop_init(&fx->loop), 0);
    cm_http_config_t cfg;
    cm_http_config_defaults(&cfg);
    cfg.host = "127.0.0.1";
    cfg.port = 0;
    cfg.handler = cm_router_dispatch;
    cfg.handler_ud = fx->router;
    cfg.observe = observe;
    cfg.observe_ud = fx;
    assert_int_equal(cm_http_server_start(&fx->loop, &cfg, &fx->srv), 0);
    fx->port = cm_http_server_port(fx->srv);
    uv_async_init(&fx->loop, &fx->done_async, on_client_done);
    fx->done_async.data = fx;
    assert_int_equal(pthread_create(&fx->th, NULL, client_main, fx), 0);
    uv_run(&fx->loop, UV_RUN_DEFAULT);
    pthread_join(fx->th, NULL);
    assert_int_equal(fx->done_called, 1);
    assert_int_equal(uv_loop_close(&fx->loop), 0);
    cm_router_free(fx->router);
    assert_int_equal(cm_alloc_live(), before);

    /* GET, HEAD (implied by GET), query ignored for matching */
    assert_true(strncmp(fx->resp[0], "HTTP/1.1 200 OK\r\n", 17) == 0);
    assert_non_null(strstr(fx->resp[0], "\r\n\r\nroute-a"));
    assert_true(strncmp(fx->resp[1], "HTTP/1.1 200 OK\r\n", 17) == 0);
    assert_non_null(strstr(fx->resp[1], "Content-Length: 7\r\n"));
    assert_null(strstr(fx->resp[1], "route-a"));
    assert_non_null(strstr(fx->resp[2], "route-a"));
    /* 405 with Allow */
    assert_true(strncmp(fx->resp[3], "HTTP/1.1 405 Method Not Allowed\r\n", 33) == 0);
    assert_non_null(strstr(fx->resp[3], "\r\nAllow: GET, HEAD\r\n"));
    assert_non_null(strstr(fx->resp[3], "\"code\":\"method_not_allowed\""));
    /* 404 */
    assert_true(strncmp(fx->resp[4], "HTTP/1.1 404 Not Found\r\n", 24) == 0);
    assert_non_null(strstr(fx->resp[4], "{\"error\":{\"code\":\"not_found\""));
    /* POST route */
    assert_true(strncmp(fx->resp[5], "HTTP/1.1 201 Created\r\n", 22) == 0);
    assert_non_null(strstr(fx->resp[5], "\r\n\r\nhi"));
    assert_non_null(strstr(fx->resp[6], "\r\nAllow: POST\r\n"));
    /* exact match only: trailing slash and case differ */
    assert_true(strncmp(fx->resp[7], "HTTP/1.1 404 ", 13) == 0);
    assert_true(strncmp(fx->resp[8], "HTTP/1.1 405 ", 13) == 0);
    assert_true(strncmp(fx->resp[9], "HTTP/1.1 404 ", 13) == 0);
    /* metrics labels */
    assert_int_equal(fx->nobs, NREQ);
    assert_string_equal(fx->routes[0], "/a");
    assert_string_equal(fx->routes[3], "/a");
    assert_string_equal(fx->routes[4], "unmatched");
    assert_string_equal(fx->routes[5], "/b");
    assert_int_equal(fx->a_calls, 3);
    assert_int_equal(fx->b_calls, 1);
    free(fx);
}

int main(void)
{
    cm_json_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(registration),
        cmocka_unit_test(dispatch),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
