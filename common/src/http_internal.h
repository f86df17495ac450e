/*
 * http_internal.h: the pieces of cm/http shared by its sources, not part of the public API.
 *
 * How a connection works:
 * - Every read lands in one server-wide buffer (all connections share it: libuv calls alloc_cb
 *   and read_cb back to back on the loop thread), so an idle connection costs no read buffer.
 *   llhttp copies what it recognises (target, header names and values, body) into the
 *   connection's own reusable buffers, so requests never point into the shared buffer.
 * - llhttp is paused in on_message_complete; the request is then handed to the handler. Bytes
 *   after it (pipelining) are kept in `pending` until the handler responds and are parsed on a
 *   later loop turn (a zero-delay timer), never from inside cm_http_respond().
 * - llhttp 8.1.0 accepts obs-fold, a bare CR in chunk-size lines and whitespace in and after
 *   a field name; those are request smuggling vectors, so every byte that is framing (not
 *   body) is checked here as well, and every field name (http_parse.c).
 * - One timer per connection serves the header timeout, the keep-alive idle timeout, the
 *   linger after a shutdown and the deferred parse. It is re-armed lazily (a deadline field),
 *   so the keep-alive hit path does not touch the timer heap per request.
 * - A connection is freed only when both its handles have closed and no request is with the
 *   handler; a peer that vanishes mid-request leaves the request valid until it is answered.
 * - Raw (upgraded) connections write corked: writes append to the connection's batch (copies
 *   and borrowed references) and the connection joins the server's dirty list; one uv_prepare
 *   handle writes each batch with a single uv_write just before the loop polls again. A WebSocket
 *   fan-out of many small frames per loop turn then costs one writev per socket, and a frame
 *   shared by many sockets is never copied.
 *
 * Files, one job each:
 *   http_server.c   listener, start, graceful stop
 *   http_conn.c     a connection's life: accept, reading, timers, shutdown, close, free
 *   http_parse.c    llhttp glue, framing guards, the checks on a request head
 *   http_target.c   request-target forms and the Host field, with uriparser
 *   http_limits.c   default limits, descriptor limit, connection limit, write-queue limit
 *   http_respond.c  response heads and plain writes
 *   http_raw.c      upgrades and raw connections: corked writes, delivery, wake-ups
 *   http_error.c    JSON error answers (cJSON), the server's own error answers
 *   http_query.c    query parameters and header lookup
 *   http_status.c   reason phrases
 */
#ifndef CM_HTTP_INTERNAL_H
#define CM_HTTP_INTERNAL_H

#include "cm/buf.h"
#include "cm/http.h"

#include <llhttp.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#define READ_BUF_SIZE (64 * 1024)
/* Bytes kept for a connection whose handler is busy before reading stops (backpressure). */
#define PENDING_MAX (64 * 1024)
/* After our FIN, how long unread input is drained before the socket is closed: closing with
 * unread data makes the kernel send RST, which can destroy the response still in flight. */
#define LINGER_MS 2000
/* Unsent response bytes above which a connection stops parsing (and reading) requests: a
 * client that pipelines without reading must not grow our memory without bound. Checked after
 * every response, so the queue passes it by one response at most. */
#define WRITE_QUEUE_MAX (1024 * 1024)
#define LISTEN_BACKLOG 1024

/* Room for this many segments on the stack when a batch is written. */
#define BATCH_STACK_BUFS 64
/* A batch this big is written at once instead of at the end of the loop turn: coalescing small
 * frames is the point, and holding a burst back from the kernel would only count it against
 * the owner's write limit. */
#define BATCH_FLUSH_BYTES (64 * 1024)
/* A Host value up to this long is remembered once valid, so a keep-alive connection sending
 * the same Host on every request pays for its validation once. */
#define HOST_MEMO_MAX 64

enum tmode { T_NONE = 0, T_HEADER, T_IDLE, T_LINGER, T_DEFER };
enum cstate { C_OPEN = 0, C_SHUTDOWN, C_CLOSING };

typedef struct hoff {
    uint32_t name, name_len, value, value_len;
} hoff_t;

/* One byte range of a batch: borrowed (`ref`), or `off` into the batch's copy buffer. */
typedef struct seg {
    const char *ref;
    size_t off, len;
    cm_http_release_fn release;
    void *arg;
} seg_t;

/* A raw connection's output of one loop turn; becomes the uv_write request when written. */
typedef struct batch {
    uv_write_t req;
    cm_http_conn_t *conn;
    cm_buf_t copy;
    size_t bytes;
    unsigned n, cap;
    seg_t seg[];
} batch_t;

struct cm_http_conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_shutdown_t shut;
    cm_http_server_t *srv;
    cm_http_conn_t *prev, *next;

    llhttp_t parser;
    cm_http_request_t req;

    cm_buf_t head; /* target and header strings, NUL-separated */
    cm_buf_t body;
    cm_buf_t pending; /* unparsed (or, raw: undelivered) bytes from ppos */
    size_t ppos;
    size_t feed_rest; /* while parsing: input bytes after the request being handled */
    cm_buf_t out;     /* response head under construction */

    hoff_t *hoff;
    cm_http_header_t *hdrs;
    size_t hcap, nh;
    uint32_t url_off, url_len; /* the target in `head` */
    int hstate;                /* 0 none, 1 in field, 2 in value */
    int has_version;           /* the request line named an HTTP version */

    /* framing scanner (bare CR / obs-fold) and size accounting */
    const char *scan_pos;
    int scan_prev;
    int crlf_due; /* bytes of the CRLF that must follow a chunk's data still to be seen (0-2) */
    size_t head_bytes, trailer_bytes;
    int headers_done, in_request, req_ready;
    int err_status;
    const char *err_code, *err_msg;

    /* timer */
    int tmode;
    uint64_t deadline, due;

    int state;
    int open_handles;
    int closed; /* both handles closed */
    int busy;   /* a request is with the handler */
    int in_feed;
    int reading, user_paused, peer_eof;
    int write_blocked; /* parsing and reading stopped: over WRITE_QUEUE_MAX bytes queued */
    int raw, raw_closed_cb_done;
    int raw_blocked; /* reading stopped: more than write_limit bytes queued */
    int wake;        /* on_read(NULL, 0) asked for */
    int dirty;       /* on the server's dirty list: `batch` waits for the prepare handle */
    cm_http_conn_t *dirty_prev, *dirty_next;
    batch_t *batch;
    size_t write_limit;
    cm_http_raw_cbs_t raw_cbs;
    void *raw_ud;
    uint64_t msg_start_ns;
    size_t host_memo_len; /* host_memo holds a Host value found valid on this connection */
    char host_memo[HOST_MEMO_MAX];
    char peer[64];
};

struct cm_http_server {
    uv_tcp_t listener;
    uv_timer_t stop_timer;
    uv_prepare_t flush; /* writes the dirty raw connections' batches */
    cm_http_conn_t *dirty;
    uv_loop_t *loop;
    cm_http_config_t cfg;
    char *server_header;
    llhttp_settings_t settings;
    char *rbuf;
    cm_http_conn_t *conns;
    size_t nconns;
    int port;
    int stopping, open_handles, done_called, failed;
    void (*done)(void *ud);
    void *done_ud;
};

extern const char http_empty[];

/* Unparsed (raw: undelivered) input bytes. */
static inline size_t http_pending_len(const cm_http_conn_t *c)
{
    return c->pending.len - c->ppos;
}

/* http_server.c */
/* Frees the server once it is stopping and its last connection is gone. */
void http_server_check_done(cm_http_server_t *s);

/* http_conn.c */
void http_on_connection(uv_stream_t *l, int status);
/* Arms the connection timer for `mode` in `ms` (lazily: see the top). */
void http_timer_arm(cm_http_conn_t *c, int mode, uint64_t ms);
void http_timer_disarm(cm_http_conn_t *c);
void http_conn_read_start(cm_http_conn_t *c);
void http_conn_read_stop(cm_http_conn_t *c);
/* Decides what waits next once parsing stopped: the handler, more bytes, or nothing. */
void http_conn_after_feed(cm_http_conn_t *c);
/* Closes gracefully: queued writes are flushed, then FIN, then the socket closes. */
void http_conn_shutdown(cm_http_conn_t *c);
/* Closes both handles at once; the connection is freed from their close callbacks. */
void http_conn_close_now(cm_http_conn_t *c);
/* Frees the connection once both handles have closed and the handler has answered. */
void http_conn_maybe_free(cm_http_conn_t *c);

/* http_parse.c */
void http_parser_settings(llhttp_settings_t *s);
/* Parses `len` bytes and dispatches the complete requests in them until a handler keeps its
 * request, the connection turns raw, its write queue is over the limit, or it closes. Returns
 * the number of bytes consumed. */
size_t http_conn_feed(cm_http_conn_t *c, const char *data, size_t len);

/* http_target.c */
/*
 * Sets req->path and req->query from req->target (`tlen` bytes). origin-form as sent; absolute-form
 * ("http://host/p?q", RFC 9112 section 3.2.2) by its path (an empty one is "/") and query, and
 * then *authority / *authority_len are its host[:port] (else NULL / 0); CONNECT's
 * authority-form and the asterisk-form keep the whole target as the path. Returns 0, or -1
 * for any other target (not an http or https URI with a host and without userinfo).
 */
int http_target_split(cm_http_request_t *r, size_t tlen, const char **authority,
                      size_t *authority_len);
/* Non-zero when `v` (`len` bytes) is a valid Host field value: uri-host [":" port]
 * (RFC 9112 section 3.2, RFC 3986 section 3.2), empty included. */
int http_host_valid(const char *v, size_t len);

/* http_limits.c */
void http_raise_fd_limit(size_t max_connections);
/* Over the connection limit: a canned 503 if the socket takes it at once, then close. */
void http_reject_connection(cm_http_server_t *s);
/* Stops parsing and reading: the write queue is over WRITE_QUEUE_MAX. Returns 1. */
int http_write_limit_block(cm_http_conn_t *c);
/* Non-zero while more than WRITE_QUEUE_MAX response bytes wait for the kernel (and until
 * they drained to half of it): parsing and reading stop. Inline: it runs after every
 * response, and write_queue_size is a public read-only field of uv_stream_t. */
static inline int http_write_limit_hit(cm_http_conn_t *c)
{
    if (!c->write_blocked && c->tcp.write_queue_size <= WRITE_QUEUE_MAX)
        return 0;
    return http_write_limit_block(c);
}
/* After a write completed: parsing starts again once the queue drained to half the limit. */
void http_write_limit_drained(cm_http_conn_t *c);

/* http_respond.c */
/* Writes a then b (either may be empty): uv_try_write first, the rest copied into one
 * uv_write. Returns 0 or a negative code (the caller closes the connection). */
int http_conn_send(cm_http_conn_t *c, const char *a, size_t alen, const char *b, size_t blen);
/* Common tail of every answer: metrics, then release or continue the connection. */
void http_conn_answered(cm_http_conn_t *c, int status, int close, int failed);

/* http_raw.c */
/* Bytes queued on a connection: this turn's batch and what the kernel has not taken. */
size_t http_conn_queued(const cm_http_conn_t *c);
/* Hands this turn's batch to libuv (one uv_write). */
void http_conn_flush(cm_http_conn_t *c);
/* Gives every borrowed range back and frees the batch. */
void http_batch_release(batch_t *b);
void http_dirty_unlink(cm_http_conn_t *c);
/* Delivers up to READ_BUF_SIZE pending bytes to the raw owner's on_read. */
void http_raw_deliver(cm_http_conn_t *c);

/* http_error.c */
/* Answers an error the server found itself (bad framing, limits, timeout) and closes. */
void http_conn_fail(cm_http_conn_t *c, int status, const char *code, const char *msg);

#endif
