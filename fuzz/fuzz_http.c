/*
 * fuzz_http: the HTTP request path. The input is what a client sends on one connection
 * (requests, pipelined or not, malformed or not); it reaches a cm_http server (llhttp plus our
 * framing guards: bare CR, obs-fold, header and body limits, Host, Transfer-Encoding with
 * Content-Length, Expect) over loopback, routed by cm_router to handlers that answer at once,
 * answer on a later loop turn (the pipelining and busy paths), upgrade to WebSocket or
 * Server-Sent Events, or read query parameters and headers.
 *
 * Checked beyond the sanitizers: what a handler is given is well-formed (NUL-terminated
 * strings, no CR, LF or NUL in header values, exactly one Host in HTTP/1.1, limits honoured),
 * the server closes the connection once the client has sent its FIN and everything is
 * answered, and no cm_malloc block is left after each input.
 */
#include "fuzz.h"

#include "cm/alloc.h"
#include "cm/http.h"
#include "cm/json.h"
#include "cm/router.h"
#include "cm/sse.h"
#include "cm/utf8.h"
#include "cm/ws.h"

#include <llhttp.h>
#include <string.h>
#include <strings.h>

#define MAX_HEADER_BYTES 2048
#define MAX_HEADERS 24
#define MAX_BODY_BYTES 4096

static uv_loop_t loop;
static cm_http_server_t *srv;
static cm_router_t *router;
static int port;
static long live_baseline;

/* ---- what every handler checks ---------------------------------------------------------- */

/* RFC 9110 section 5.6.2: tchar. */
static int is_tchar(char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           (ch && strchr("!#$%&'*+-.^_`|~", ch));
}

static void check_request(const cm_http_request_t *req)
{
    FUZZ_CHECK(req->method_name && *req->method_name);
    FUZZ_CHECK(req->target && req->path == req->target);
    size_t tlen = strlen(req->target);
    FUZZ_CHECK(req->path_len <= tlen);
    FUZZ_CHECK(req->query && strlen(req->query) >= req->query_len);
    FUZZ_CHECK(!memchr(req->path, '?', req->path_len));
    FUZZ_CHECK(req->nheaders <= MAX_HEADERS);
    FUZZ_CHECK(req->body && req->body_len <= MAX_BODY_BYTES && req->body[req->body_len] == '\0');
    FUZZ_CHECK(strcmp(req->route, "unmatched") == 0 || req->route[0] == '/');
    size_t hosts = 0;
    for (size_t i = 0; i < req->nheaders; i++) {
        const cm_http_header_t *h = &req->headers[i];
        FUZZ_CHECK(h->name && h->value);
        /* RFC 9110 section 5.1: a field name is a token, one character at least (llhttp 8
         * takes ": value" as a field with an empty name). RFC 9112 section 5.1: whitespace in
         * it must be refused, or "Content-Length : 5" means a length to a proxy that trims it
         * and nothing to us (llhttp 8 without LLHTTP_STRICT_MODE takes a space as a token
         * character). cm_http refuses both with a 400. */
        FUZZ_CHECK(h->name[0] != '\0');
        for (const char *n = h->name; *n; n++)
            FUZZ_CHECK(is_tchar(*n));
        /* A CR or LF inside a value would be request smuggling material too. */
        FUZZ_CHECK(!strpbrk(h->value, "\r\n"));
        size_t vlen = strlen(h->value);
        FUZZ_CHECK(vlen == 0 || (h->value[0] != ' ' && h->value[0] != '\t'));
        FUZZ_CHECK(vlen == 0 || (h->value[vlen - 1] != ' ' && h->value[vlen - 1] != '\t'));
        hosts += strcasecmp(h->name, "host") == 0;
        FUZZ_CHECK(cm_http_header(req, h->name) != NULL);
    }
    FUZZ_CHECK(hosts <= 1);
    /* A field of one value is never there twice in a request that is served. */
    static const char *const once[] = {"authorization",         "origin",
                                       "last-event-id",         "sec-websocket-key",
                                       "sec-websocket-version", NULL};
    for (const char *const *f = once; *f; f++) {
        int seen = 0;
        for (size_t i = 0; i < req->nheaders; i++)
            seen += strcasecmp(req->headers[i].name, *f) == 0;
        FUZZ_CHECK(seen <= 1);
    }
    if (req->http_major == 1 && req->http_minor >= 1)
        FUZZ_CHECK(hosts == 1);
    /* Query parameters: whatever the query, a bounded, NUL-terminated answer. */
    static const char *const keys[] = {"a", "since", "user", "", NULL};
    for (const char *const *k = keys; *k; k++) {
        char small[4], big[256];
        int n = cm_http_query_param(req, *k, big, sizeof big);
        FUZZ_CHECK(n == UV_ENOENT || n == UV_E2BIG || n == UV_EINVAL || n == UV_ENOMEM ||
                   n == UV_EEXIST || n >= 0);
        /* Malformed is a property of the whole query, whichever key is asked for. */
        FUZZ_CHECK((n == UV_EINVAL) == (cm_http_query_check(req) != 0));
        if (n >= 0) {
            FUZZ_CHECK((size_t)n < sizeof big && strlen(big) == (size_t)n);
            int m = cm_http_query_param(req, *k, small, sizeof small);
            FUZZ_CHECK(m == (n < (int)sizeof small ? n : UV_E2BIG));
        }
    }
}

/* ---- handlers --------------------------------------------------------------------------- */

static void h_echo(cm_http_request_t *req, void *ud)
{
    (void)ud;
    check_request(req);
    const char *ct = cm_http_header(req, "content-type");
    int status = 200;
    if (req->body_len && req->body[0] >= '1' && req->body[0] <= '5')
        status = (req->body[0] - '0') * 100 + (req->body_len % 100);
    if (status < 200 || status == 204 || status == 304)
        status = 200;
    cm_http_respond(req, status, ct ? "text/plain" : NULL,
                    req->query_len ? "Cache-Control: no-store\r\n" : NULL, req->body,
                    req->body_len);
}

static void h_error(cm_http_request_t *req, void *ud)
{
    (void)ud;
    check_request(req);
    /* The message quotes the target: cJSON escapes whatever it holds. */
    cm_http_respond_error(req, 400, "bad_request", req->target, "Retry-After: 1\r\n");
}

/* Answered on a later loop turn: the connection is busy meanwhile, so pipelined requests wait
 * in its buffer and a peer that leaves must not free the request under the handler. */
typedef struct later {
    uv_timer_t timer;
    cm_http_request_t *req;
} later_t;

static void later_closed(uv_handle_t *h)
{
    cm_free(h->data);
}

static void later_fire(uv_timer_t *t)
{
    later_t *l = t->data;
    check_request(l->req);
    cm_http_respond(l->req, 200, "application/json", NULL, "{}", 2);
    l->timer.data = l;
    uv_close((uv_handle_t *)&l->timer, later_closed);
}

static void h_later(cm_http_request_t *req, void *ud)
{
    (void)ud;
    check_request(req);
    later_t *l = cm_calloc(1, sizeof *l);
    if (!l) {
        cm_http_respond_error(req, 503, "out_of_memory", "out of memory", NULL);
        return;
    }
    l->req = req;
    uv_timer_init(&loop, &l->timer);
    l->timer.data = l;
    uv_timer_start(&l->timer, later_fire, 0, 0);
}

/* WebSocket: the handshake check, then a session that echoes (frames are fuzzed on their own
 * in fuzz_ws; here what matters is the upgrade with bytes already read past the head). */
static void ws_message(cm_ws_t *ws, int opcode, const char *data, size_t len, void *ud)
{
    (void)ud;
    if (opcode == CM_WS_OP_TEXT)
        FUZZ_CHECK(cm_utf8_valid(data, len));
    cm_ws_send(ws, opcode, data, len);
}

static void ws_close(cm_ws_t *ws, void *ud)
{
    (void)ws;
    (void)ud;
}

static void h_ws(cm_http_request_t *req, void *ud)
{
    (void)ud;
    check_request(req);
    cm_ws_refusal_t why;
    if (cm_ws_handshake_check(req, NULL, NULL, &why) != 0) {
        FUZZ_CHECK(why.status >= 400 && why.status <= 499 && why.code && why.message);
        cm_ws_refuse(req, &why);
        return;
    }
    cm_ws_config_t cfg;
    cm_ws_config_defaults(&cfg);
    cfg.max_message = 1024;
    static const cm_ws_callbacks_t cbs = {ws_message, NULL, NULL, ws_close};
    cm_ws_t *ws;
    if (cm_ws_accept(req, &cfg, &cbs, NULL, &ws) == 0)
        cm_ws_start(ws);
}

static void sse_close(cm_sse_t *s, void *ud)
{
    (void)s;
    (void)ud;
}

static void h_sse(cm_http_request_t *req, void *ud)
{
    (void)ud;
    check_request(req);
    cm_sse_config_t cfg;
    cm_sse_config_defaults(&cfg);
    static const cm_sse_callbacks_t cbs = {sse_close};
    cm_sse_t *s;
    if (cm_sse_accept(req, &cfg, &cbs, NULL, &s) != 0)
        return;
    const char *last = cm_http_header(req, "Last-Event-ID");
    cm_sse_send(s, "1", "welcome", last ? last : "{}", last ? strlen(last) : 2);
    cm_sse_comment(s, "hello");
}

/* Every response, the server's own 400/408/413/431 included. */
static void observe(const cm_http_request_t *req, int status, double seconds, void *ud)
{
    (void)ud;
    FUZZ_CHECK(status >= 100 && status <= 599);
    FUZZ_CHECK(seconds >= 0);
    FUZZ_CHECK(req && req->route);
}

/* ---- the target ------------------------------------------------------------------------- */

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    cm_json_init();
    fuzz_quiet_logs();
    FUZZ_CHECK(uv_loop_init(&loop) == 0);
    router = cm_router_new();
    FUZZ_CHECK(router);
    FUZZ_CHECK(cm_router_add(router,
                             CM_ROUTE_GET | CM_ROUTE_POST | CM_ROUTE_PUT | CM_ROUTE_DELETE |
                                 CM_ROUTE_PATCH | CM_ROUTE_OPTIONS,
                             "/echo", h_echo, NULL) == 0);
    FUZZ_CHECK(cm_router_add(router, CM_ROUTE_GET | CM_ROUTE_POST, "/later", h_later, NULL) == 0);
    FUZZ_CHECK(cm_router_add(router, CM_ROUTE_GET, "/error", h_error, NULL) == 0);
    FUZZ_CHECK(cm_router_add(router, CM_ROUTE_GET | CM_ROUTE_POST, "/ws", h_ws, NULL) == 0);
    FUZZ_CHECK(cm_router_add(router, CM_ROUTE_GET, "/sse", h_sse, NULL) == 0);
    cm_http_config_t cfg;
    cm_http_config_defaults(&cfg);
    cfg.host = "127.0.0.1";
    cfg.port = 0;
    cfg.max_header_bytes = MAX_HEADER_BYTES;
    cfg.max_headers = MAX_HEADERS;
    cfg.max_body_bytes = MAX_BODY_BYTES;
    cfg.handler = cm_router_dispatch;
    cfg.handler_ud = router;
    cfg.observe = observe;
    cfg.server_header = "fuzz";
    FUZZ_CHECK(cm_http_server_start(&loop, &cfg, &srv) == 0);
    port = cm_http_server_port(srv);
    live_baseline = cm_alloc_live();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_exchange(&loop, srv, port, NULL, 0, data, size, fuzz_hash(data, size));
    FUZZ_CHECK(cm_alloc_live() == live_baseline);
    return 0;
}
