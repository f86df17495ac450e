/*
 * cm/sse.h: a Server-Sent Events stream (WHATWG HTML, "Server-sent events") on a cm_http
 * connection.
 *
 * The response is `200 text/event-stream`, delimited by the connection's close (no length,
 * no chunked coding: what EventSource and every proxy understand). Events are written corked
 * through cm_http (one write per loop turn), either encoded here (cm_sse_send) or already
 * encoded and shared between connections (cm_sse_send_ref). Everything queued counts against
 * `send_queue_max`: past it a send still queues but returns UV_ENOBUFS, and the owner decides
 * (a slow consumer is closed). The client sends nothing after its request; whatever it does
 * send is read and dropped, and its EOF ends the stream.
 *
 * Callbacks fire from the loop, never from inside the call that started the work.
 */
#ifndef CM_SSE_H
#define CM_SSE_H

#include "cm/buf.h"
#include "cm/http.h"

#include <stddef.h>
#include <stdint.h>

typedef struct cm_sse cm_sse_t;

typedef struct cm_sse_callbacks {
    /* The connection has closed (either side); `s` is freed after this returns. */
    void (*on_close)(cm_sse_t *s, void *ud);
} cm_sse_callbacks_t;

typedef struct cm_sse_config {
    size_t send_queue_max; /* bytes queued before sends return UV_ENOBUFS; 0: no limit */
    uint64_t retry_ms;     /* reconnection time sent to the client (`retry:`); 0: none */
    const char *headers;   /* extra response header lines ("Name: value\r\n"...), or NULL */
} cm_sse_config_t;

/* Fills `cfg` with the defaults: 1 MiB queue, retry 1000 ms, no extra headers. */
void cm_sse_config_defaults(cm_sse_config_t *cfg);

/*
 * Answers `req` with the stream's head and takes the connection over. `cfg` and `cbs` are
 * copied. Returns 0 and *out (valid until on_close returns), or a negative code: `req` has
 * been answered (503) or its connection closed, and no callback fires.
 */
int cm_sse_accept(cm_http_request_t *req, const cm_sse_config_t *cfg, const cm_sse_callbacks_t *cbs,
                  void *ud, cm_sse_t **out);

/*
 * Appends one event to `out`: an `id:` line when `id` is not NULL, an `event:` line when
 * `event` is not NULL, one `data:` line per line of `data` (`len` bytes), and the blank line
 * that ends it. Returns 0, UV_EINVAL (an id or event name with a CR, LF or NUL) or UV_ENOMEM.
 */
int cm_sse_encode(cm_buf_t *out, const char *id, const char *event, const char *data, size_t len);

/* Encodes and queues one event (as cm_sse_encode). Returns 0, UV_ENOBUFS (queued, but the
 * queue is past send_queue_max), UV_EPIPE (closing), UV_EINVAL or UV_ENOMEM. */
int cm_sse_send(cm_sse_t *s, const char *id, const char *event, const char *data, size_t len);
/* Queues `len` bytes of events encoded already, by reference (cm_http_conn_write_ref: they
 * stay valid until release(arg)). Same returns. */
int cm_sse_send_ref(cm_sse_t *s, const void *bytes, size_t len, cm_http_release_fn release,
                    void *arg);
/* Queues a comment line (": text"), the heartbeat that keeps proxies from timing out. */
int cm_sse_comment(cm_sse_t *s, const char *text);

/* Ends the stream once what is queued has been written. Idempotent. */
void cm_sse_close(cm_sse_t *s);
/* Ends it at once (a peer that does not read). */
void cm_sse_abort(cm_sse_t *s);

/* Bytes queued and not yet taken by the kernel. */
size_t cm_sse_queued_bytes(const cm_sse_t *s);
/* The connection (for its peer address). */
cm_http_conn_t *cm_sse_conn(const cm_sse_t *s);

#endif
