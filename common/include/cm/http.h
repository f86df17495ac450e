/*
 * cm/http.h: a small HTTP/1.1 server on libuv + llhttp (RFC 9112 message syntax, RFC 9110
 * semantics).
 *
 * Model: one cm_http_server_t listens on host:port. Each connection parses requests with
 * llhttp and hands one request at a time to the handler. The handler answers now or later (the
 * price-service answers after a Redis or Postgres reply) by calling cm_http_respond() exactly
 * once. Pipelined requests wait in the connection's read buffer and are answered in order. If
 * the peer disconnects while a request is with the handler, the connection object stays alive
 * (writes are dropped) until the handler responds: a handler never sees a dangling request.
 *
 * Everything here runs on the loop thread; nothing is thread-safe.
 */
#ifndef CM_HTTP_H
#define CM_HTTP_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <uv.h>

typedef struct cm_http_server cm_http_server_t;
typedef struct cm_http_conn cm_http_conn_t;

/* One request header; both strings are NUL-terminated and borrowed from the connection. */
typedef struct cm_http_header {
    const char *name;  /* as sent (case preserved) */
    const char *value; /* leading/trailing whitespace removed */
} cm_http_header_t;

/*
 * A parsed request. Everything in it is borrowed from the connection and valid until
 * cm_http_respond() (or cm_http_respond_error() / cm_http_upgrade()) returns.
 */
typedef struct cm_http_request {
    cm_http_conn_t *conn;    /* the connection (opaque) */
    int method;              /* llhttp_method_t value, e.g. HTTP_GET */
    const char *method_name; /* "GET" */
    const char *target;      /* raw request-target, NUL-terminated */
    const char *path;        /* target before '?', raw (not percent-decoded) */
    size_t path_len;
    const char *query; /* after '?', raw, "" when none */
    size_t query_len;
    const cm_http_header_t *headers; /* names as sent */
    size_t nheaders;
    const char *body; /* NUL-terminated for convenience; "" when none */
    size_t body_len;
    int http_major; /* request line's HTTP version: 1 and 1 for HTTP/1.1 */
    int http_minor;
    int keep_alive;    /* llhttp_should_keep_alive() at the end of the message */
    int is_head;       /* HEAD: the response is sent without its body (headers unchanged) */
    const char *route; /* set by the router (metrics label); "unmatched" by default */
    uint64_t start_ns; /* uv_hrtime() when the request head was complete */
    void *user;        /* free for the handler; NULL on entry */
} cm_http_request_t;

/* Called once per request; must lead to exactly one cm_http_respond*() or cm_http_upgrade(),
 * now or later. `req` is borrowed until that call returns. */
typedef void (*cm_http_handler_fn)(cm_http_request_t *req, void *ud);

/* Observer called once per response (metrics), including the server's own 400/408/413/431
 * answers (req->route is then "unmatched"): `status`, and `seconds` from req->start_ns to the
 * moment the write was queued. `req` is borrowed for the call. */
typedef void (*cm_http_observe_fn)(const cm_http_request_t *req, int status, double seconds,
                                   void *ud);

typedef struct cm_http_config {
    const char *host;        /* "0.0.0.0"; IPv6 literals work too ("::1"); borrowed for start() */
    int port;                /* 8080; 0 = ephemeral (see cm_http_server_port) */
    size_t max_header_bytes; /* default 8192: request line + headers; over -> 431 + close */
    size_t max_headers;      /* default 64; over -> 431 + close */
    size_t max_body_bytes;   /* default 16384; over -> 413 + close */
    uint64_t header_timeout_ms; /* default 10000: once its first byte is in (or the connection
                                   is accepted), a whole request, head and body, must arrive in
                                   time, else 408 + close (slowloris) */
    uint64_t idle_timeout_ms;   /* default 60000: keep-alive connection idle -> close */
    size_t max_connections;     /* default 10000: above -> 503 written best-effort, then close */
    cm_http_handler_fn handler; /* required */
    void *handler_ud;
    cm_http_observe_fn observe; /* optional */
    void *observe_ud;
    const char *server_header; /* e.g. "price-service" (copied); NULL = no Server header */
} cm_http_config_t;

/* Fills `cfg` with the defaults above (host "0.0.0.0", port 8080, no handler). */
void cm_http_config_defaults(cm_http_config_t *cfg);

/*
 * Binds and listens on cfg->host:cfg->port on `loop` (borrowed; must outlive the server).
 * `cfg` is copied. On success *out is the server (freed by cm_http_server_stop()'s completion).
 * Returns 0, UV_EINVAL (no handler, bad host), UV_ENOMEM, or the bind/listen error
 * (UV_EADDRINUSE...). On failure nothing is left to close (the memory is released on the next
 * loop turn). Sets SIGPIPE to ignored when it still has its default action: a write to a peer
 * that reset the connection must fail with EPIPE, not kill the daemon.
 */
int cm_http_server_start(uv_loop_t *loop, const cm_http_config_t *cfg, cm_http_server_t **out);
/* The bound port (useful after port 0). */
int cm_http_server_port(const cm_http_server_t *s);
/* Open connections, including upgraded ones and ones still closing. */
size_t cm_http_server_connections(const cm_http_server_t *s);

/*
 * Graceful stop: close the listener, close idle keep-alive connections, let in-flight requests
 * finish (their responses carry Connection: close), then close the rest. Upgraded (raw)
 * connections are left to their owner (who closes them with cm_http_conn_close()); after
 * `deadline_ms` everything left is closed hard (raw owners get on_close). `done` (may be NULL)
 * fires once, from the loop, when every connection and handle has closed; the server is freed
 * right after it returns. Calling stop twice is a no-op.
 */
void cm_http_server_stop(cm_http_server_t *s, uint64_t deadline_ms, void (*done)(void *ud),
                         void *ud);

/*
 * Answers `req` (exactly once). `status` is 100..599 (1xx other than 101 is not supported).
 * `content_type` (may be NULL: no Content-Type header). `headers` is extra header lines, each
 * ending "\r\n" (e.g. "Cache-Status: price-service; hit\r\n"), or NULL; borrowed. The body
 * (borrowed, may be NULL when body_len is 0) is copied unless it can be written at once. Adds
 * Content-Length, Server (when configured) and Connection: close when the connection will
 * close; no Date header (RFC 9110 section 6.6.1 lets a server without a reliable clock omit it,
 * and it costs a syscall per second we do not need). For HEAD the body is not sent.
 * Returns 0, or a negative code (UV_ENOMEM...; the request is still considered answered and the
 * connection is closed). After it returns `req` must not be used.
 */
int cm_http_respond(cm_http_request_t *req, int status, const char *content_type,
                    const char *headers, const void *body, size_t body_len);
/* Responds {"error":{"code":code,"message":message}} as application/json (built by cJSON).
 * `code`, `message`, `headers` are borrowed. Returns as cm_http_respond(). */
int cm_http_respond_error(cm_http_request_t *req, int status, const char *code, const char *message,
                          const char *headers);
/* Case-insensitive header lookup (first match); returns the value (borrowed like req) or NULL. */
const char *cm_http_header(const cm_http_request_t *req, const char *name);
/* 0 when the query string is well formed: every '%' starts a two-digit hex escape and none
 * is %00; UV_EINVAL otherwise. */
int cm_http_query_check(const cm_http_request_t *req);
/*
 * Looks up query parameter `key` (percent-decoded, '+' as space; RFC 3986 + HTML form
 * encoding, via uriparser). Writes the NUL-terminated value into `out` (`outsz` bytes).
 * Returns the value length (>= 0), UV_ENOENT if absent, UV_EEXIST if it is there more than
 * once, UV_E2BIG if it does not fit, UV_EINVAL if the query is malformed
 * (cm_http_query_check), UV_ENOMEM.
 */
int cm_http_query_param(const cm_http_request_t *req, const char *key, char *out, size_t outsz);
/* Reason phrase for `status` ("Not Found"); "Unknown" for codes it does not know. Static. */
const char *cm_http_status_text(int status);

/*
 * WebSocket and other upgrades (RFC 9110 section 7.8): the handler writes the whole 101
 * response head itself (`response_head`, `len` bytes, copied) and turns the connection raw;
 * this answers `req` (the request's strings are released when it returns: an upgraded
 * connection keeps no request state). The connection keeps owning the TCP handle; from then on
 * bytes read go to cbs->on_read (`data` borrowed for the call; n < 0 is a UV_EOF or error code
 * and the connection is closing; n == 0 with data NULL is the wake-up asked for with
 * cm_http_conn_wake()) and cbs->on_close fires exactly once when the handle has closed (free
 * your state there; `c` is invalid after it). Bytes already read past the request head are
 * delivered to on_read before any new ones, on a later loop turn (never inside this call).
 * `cbs` is copied. On success *out (may be NULL) is the connection. Returns 0, or a negative
 * code (then no callback fires and the connection is closed as after any failed response).
 */
typedef struct cm_http_raw_cbs {
    void (*on_read)(cm_http_conn_t *c, const char *data, ssize_t n, void *ud);
    void (*on_close)(cm_http_conn_t *c, void *ud);
} cm_http_raw_cbs_t;
int cm_http_upgrade(cm_http_request_t *req, const void *response_head, size_t len,
                    const cm_http_raw_cbs_t *cbs, void *ud, cm_http_conn_t **out);

/*
 * Raw connections write corked: what is queued during one loop turn leaves in one uv_write
 * (one writev) when the loop is about to wait for I/O again (a uv_prepare handle of the
 * server), so a burst of small frames to one peer costs one system call, not one each.
 */

/* Queues `len` bytes of `data` (copied). Returns 0, UV_EPIPE when the connection is closing,
 * or UV_ENOMEM (then the connection is closed). */
int cm_http_conn_write(cm_http_conn_t *c, const void *data, size_t len);
/* Gives back what cm_http_conn_write_ref borrowed. */
typedef void (*cm_http_release_fn)(void *arg);
/*
 * Queues `len` bytes at `data` without copying them: they must stay valid and unchanged until
 * release(arg) (may be NULL) is called, exactly once, from the loop, when the kernel has taken
 * them or the connection has closed (before on_close), never inside this call. Lets one
 * buffer go to many connections. Returns 0, UV_EPIPE when the connection is closing, or
 * UV_ENOMEM (then the connection is closed); release is not called on an error.
 */
int cm_http_conn_write_ref(cm_http_conn_t *c, const void *data, size_t len,
                           cm_http_release_fn release, void *arg);
/* Bytes queued (this loop turn's and those the kernel has not accepted yet): backpressure. */
size_t cm_http_conn_write_queue_size(const cm_http_conn_t *c);
/* Raw connections: reading stops while more than `max` bytes are queued and starts again once
 * the queue is back at or under it, so a peer that makes us write (pongs) without reading
 * cannot grow our memory. 0 (the default) is no limit. */
void cm_http_conn_set_write_limit(cm_http_conn_t *c, size_t max);
/* Pauses (paused=1) or resumes (0) reading: backpressure the other way. */
void cm_http_conn_read_pause(cm_http_conn_t *c, int paused);
/* Raw connections: on_read(c, NULL, 0, ud) once on a later loop turn (several calls before it
 * fires make one), for work the owner must not do inside its own caller's call. */
void cm_http_conn_wake(cm_http_conn_t *c);
/* Closes after the queued writes are flushed (uv_shutdown then uv_close; hard=0) or at once
 * (hard=1). on_close fires later, from the loop. Idempotent. */
void cm_http_conn_close(cm_http_conn_t *c, int hard);
/* The peer address, "127.0.0.1:54321" or "[::1]:54321" (borrowed, lives with the conn). */
const char *cm_http_conn_peer(const cm_http_conn_t *c);

#endif
