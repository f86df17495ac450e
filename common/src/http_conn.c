/*
 * cm/http: a connection's life. Accept, reading into the shared buffer, the one timer
 * (header timeout, idle timeout, linger, deferred parse), graceful shutdown, close and free.
 */
#include "http_internal.h"

#include "cm/alloc.h"
#include "cm/log.h"

#include <stdio.h>
#include <string.h>

static void on_timer(uv_timer_t *t);
static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf);

/* ------------------------------------------------------------------------------------------ */
/* Accept                                                                                     */

void http_on_connection(uv_stream_t *l, int status)
{
    cm_http_server_t *s = l->data;
    if (status < 0) {
        cm_log_warn("http: accept failed", "error", uv_strerror(status), NULL);
        return;
    }
    if (s->stopping)
        return;
    if (s->nconns >= s->cfg.max_connections) {
        http_reject_connection(s);
        return;
    }
    cm_http_conn_t *c = cm_calloc(1, sizeof *c);
    if (!c) {
        http_reject_connection(s);
        return;
    }
    c->srv = s;
    if (uv_tcp_init(s->loop, &c->tcp) < 0) {
        cm_free(c);
        return;
    }
    uv_timer_init(s->loop, &c->timer);
    c->tcp.data = c;
    c->timer.data = c;
    c->next = s->conns;
    if (s->conns)
        s->conns->prev = c;
    s->conns = c;
    s->nconns++;
    llhttp_init(&c->parser, HTTP_REQUEST, &s->settings);
    c->parser.data = c;
    if (uv_accept(l, (uv_stream_t *)&c->tcp) < 0) {
        http_conn_close_now(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    /* A fresh connection must send its first request head within the header timeout. */
    http_timer_arm(c, T_HEADER, s->cfg.header_timeout_ms);
    http_conn_read_start(c);
    if (!c->reading)
        http_conn_close_now(c);
}

/* ------------------------------------------------------------------------------------------ */
/* Reading                                                                                    */

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)suggested;
    cm_http_conn_t *c = h->data;
    *buf = uv_buf_init(c->srv->rbuf, READ_BUF_SIZE);
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf);

void http_conn_read_start(cm_http_conn_t *c)
{
    if (c->reading || c->state == C_CLOSING || c->peer_eof || c->user_paused || c->raw_blocked)
        return;
    if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0)
        c->reading = 1;
}

void http_conn_read_stop(cm_http_conn_t *c)
{
    if (!c->reading)
        return;
    uv_read_stop((uv_stream_t *)&c->tcp);
    c->reading = 0;
}

static void conn_stash(cm_http_conn_t *c, const char *data, size_t len)
{
    if (len == 0)
        return;
    if (c->ppos > 0) {
        memmove(c->pending.data, c->pending.data + c->ppos, c->pending.len - c->ppos);
        c->pending.len -= c->ppos;
        c->ppos = 0;
    }
    if (cm_buf_append(&c->pending, data, len) < 0)
        http_conn_close_now(c);
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    cm_http_conn_t *c = st->data;
    if (nread == 0)
        return;
    if (nread < 0) {
        http_conn_read_stop(c);
        if (c->state != C_OPEN) {
            http_conn_close_now(c);
            return;
        }
        if (nread == UV_EOF)
            c->peer_eof = 1;
        if (c->raw) {
            c->raw_cbs.on_read(c, NULL, nread, c->raw_ud);
            http_conn_close_now(c);
            return;
        }
        /* A half-closed peer still gets the answers to what it sent (including a large one
         * still queued); a reset one gets none. */
        if (nread == UV_EOF && (c->busy || http_pending_len(c)))
            return;
        if (nread == UV_EOF)
            http_conn_shutdown(c);
        else
            http_conn_close_now(c);
        return;
    }
    if (c->state != C_OPEN)
        return; /* draining after our FIN */
    size_t n = (size_t)nread;
    if (c->raw) {
        if (http_pending_len(c) || c->user_paused || c->raw_blocked) {
            conn_stash(c, buf->base, n);
            if (http_pending_len(c) > PENDING_MAX)
                http_conn_read_stop(c);
        } else {
            c->raw_cbs.on_read(c, buf->base, nread, c->raw_ud);
        }
        return;
    }
    if (c->busy || c->write_blocked || http_pending_len(c)) {
        conn_stash(c, buf->base, n);
        if (http_pending_len(c) > PENDING_MAX)
            http_conn_read_stop(c);
        return;
    }
    size_t used = http_conn_feed(c, buf->base, n);
    if (used < n && c->state == C_OPEN)
        conn_stash(c, buf->base + used, n - used);
    http_conn_after_feed(c);
}

/* Decides what waits next once parsing stopped: the handler, more bytes, or nothing. */
void http_conn_after_feed(cm_http_conn_t *c)
{
    if (c->state != C_OPEN)
        return;
    const cm_http_config_t *cfg = &c->srv->cfg;
    if (c->raw) {
        if (http_pending_len(c) && !c->user_paused)
            http_timer_arm(c, T_DEFER, 0);
        http_conn_read_start(c);
        return;
    }
    if (c->busy)
        return;
    if (!http_pending_len(c) && c->peer_eof) {
        http_conn_shutdown(c);
        return;
    }
    /* Over the write-queue limit the next request waits, parsed or not, until the queue
     * drains (http_write_limit_drained); the idle timeout bounds a peer that never reads. */
    int blocked = http_write_limit_hit(c);
    if (http_pending_len(c) && !blocked) {
        http_timer_arm(c, T_DEFER, 0);
        return;
    }
    if (c->in_request) {
        if (c->tmode != T_HEADER)
            http_timer_arm(c, T_HEADER, cfg->header_timeout_ms);
    } else {
        http_timer_arm(c, T_IDLE, cfg->idle_timeout_ms);
    }
    if (!blocked)
        http_conn_read_start(c);
}

/* ------------------------------------------------------------------------------------------ */
/* Timer                                                                                      */

/* Arms the connection timer for `mode` in `ms`. The uv timer is only restarted when the new
 * deadline is earlier than the one it is set for; a later deadline is picked up when it fires. */
void http_timer_arm(cm_http_conn_t *c, int mode, uint64_t ms)
{
    if (c->state == C_CLOSING)
        return;
    uint64_t now = uv_now(c->srv->loop);
    c->tmode = mode;
    c->deadline = now + ms;
    if (!uv_is_active((uv_handle_t *)&c->timer) || c->due > c->deadline) {
        c->due = c->deadline;
        uv_timer_start(&c->timer, on_timer, ms, 0);
    }
}

void http_timer_disarm(cm_http_conn_t *c)
{
    c->tmode = T_NONE;
}

static void on_timer(uv_timer_t *t)
{
    cm_http_conn_t *c = t->data;
    uint64_t now = uv_now(c->srv->loop);
    if (c->tmode == T_NONE || c->state == C_CLOSING)
        return;
    if (c->tmode != T_DEFER && now < c->deadline) {
        c->due = c->deadline;
        uv_timer_start(&c->timer, on_timer, c->deadline - now, 0);
        return;
    }
    int mode = c->tmode;
    c->tmode = T_NONE;
    switch (mode) {
    case T_DEFER:
        if (c->raw) {
            if (c->wake) {
                c->wake = 0;
                c->raw_cbs.on_read(c, NULL, 0, c->raw_ud);
                if (c->state != C_OPEN)
                    return;
            }
            http_raw_deliver(c);
            return;
        }
        if (c->busy || c->write_blocked || c->state != C_OPEN)
            return;
        {
            size_t n = http_conn_feed(c, c->pending.data + c->ppos, http_pending_len(c));
            c->ppos += n;
            if (c->ppos == c->pending.len) {
                cm_buf_reset(&c->pending);
                c->ppos = 0;
            }
        }
        http_conn_after_feed(c);
        return;
    case T_HEADER:
        if (c->in_request && c->state == C_OPEN && !c->busy)
            http_conn_fail(c, 408, "request_timeout", "request not received in time");
        else
            http_conn_shutdown(c);
        return;
    case T_IDLE:
        http_conn_shutdown(c); /* flushes a response the peer is still reading */
        return;
    default:
        http_conn_close_now(c);
        return;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Closing                                                                                    */

static void on_shutdown(uv_shutdown_t *r, int status)
{
    cm_http_conn_t *c = r->data;
    if (c->state == C_CLOSING)
        return;
    if (status < 0 || c->peer_eof) {
        http_conn_close_now(c);
        return;
    }
    /* Drain what the peer still sends until it closes too, or the linger time is over. */
    c->user_paused = 0;
    c->raw_blocked = 0;
    http_timer_arm(c, T_LINGER, LINGER_MS);
    http_conn_read_start(c);
}

/* Closes gracefully: queued writes are flushed, then FIN, then the socket closes. */
void http_conn_shutdown(cm_http_conn_t *c)
{
    if (c->state != C_OPEN)
        return;
    /* uv_shutdown waits for the writes queued before it, so this turn's batch goes first. */
    if (c->batch) {
        http_conn_flush(c);
        if (c->state != C_OPEN)
            return;
    }
    c->state = C_SHUTDOWN;
    /* uv_shutdown waits for queued writes; a peer that never reads gets the idle timeout to
     * take them, then the socket is closed anyway. */
    http_timer_arm(c, T_LINGER, c->srv->cfg.idle_timeout_ms);
    c->shut.data = c;
    if (uv_shutdown(&c->shut, (uv_stream_t *)&c->tcp, on_shutdown) < 0)
        http_conn_close_now(c);
}

static void conn_free(cm_http_conn_t *c)
{
    cm_http_server_t *s = c->srv;
    if (c->prev)
        c->prev->next = c->next;
    else
        s->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    s->nconns--;
    cm_buf_free(&c->head);
    cm_buf_free(&c->body);
    cm_buf_free(&c->pending);
    cm_buf_free(&c->out);
    cm_free(c->hoff);
    cm_free(c->hdrs);
    cm_free(c);
    http_server_check_done(s);
}

/* Frees the connection once nothing refers to it any more. */
void http_conn_maybe_free(cm_http_conn_t *c)
{
    if (c->closed && !c->busy)
        conn_free(c);
}

static void on_conn_close(uv_handle_t *h)
{
    cm_http_conn_t *c = h->data;
    if (--c->open_handles > 0)
        return;
    c->closed = 1;
    /* Borrowed ranges go back before the owner hears of the close, so it can free them. */
    if (c->batch) {
        http_batch_release(c->batch);
        c->batch = NULL;
    }
    if (c->raw && c->raw_cbs.on_close && !c->raw_closed_cb_done) {
        c->raw_closed_cb_done = 1;
        c->raw_cbs.on_close(c, c->raw_ud);
    }
    http_conn_maybe_free(c);
}

void http_conn_close_now(cm_http_conn_t *c)
{
    if (c->state == C_CLOSING)
        return;
    c->state = C_CLOSING;
    c->tmode = T_NONE;
    http_dirty_unlink(c);
    c->open_handles = 2;
    uv_close((uv_handle_t *)&c->tcp, on_conn_close);
    uv_close((uv_handle_t *)&c->timer, on_conn_close);
}

/* ------------------------------------------------------------------------------------------ */
/* Connection calls of the API                                                                */

void cm_http_conn_read_pause(cm_http_conn_t *c, int paused)
{
    if (paused) {
        c->user_paused = 1;
        http_conn_read_stop(c);
        return;
    }
    if (!c->user_paused)
        return;
    c->user_paused = 0;
    if (c->state != C_OPEN)
        return;
    if (c->raw && http_pending_len(c))
        http_timer_arm(c, T_DEFER, 0);
    if (http_pending_len(c) <= PENDING_MAX)
        http_conn_read_start(c);
}

void cm_http_conn_close(cm_http_conn_t *c, int hard)
{
    if (hard)
        http_conn_close_now(c);
    else
        http_conn_shutdown(c);
}

const char *cm_http_conn_peer(const cm_http_conn_t *c)
{
    cm_http_conn_t *m = (cm_http_conn_t *)c;
    if (m->peer[0])
        return m->peer;
    struct sockaddr_storage ss;
    int len = (int)sizeof ss;
    char ip[INET6_ADDRSTRLEN] = "";
    if (m->state == C_CLOSING || uv_tcp_getpeername(&m->tcp, (struct sockaddr *)&ss, &len) != 0) {
        return "unknown";
    }
    if (ss.ss_family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        uv_ip6_name(a, ip, sizeof ip);
        snprintf(m->peer, sizeof m->peer, "[%s]:%u", ip, (unsigned)ntohs(a->sin6_port));
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        uv_ip4_name(a, ip, sizeof ip);
        snprintf(m->peer, sizeof m->peer, "%s:%u", ip, (unsigned)ntohs(a->sin_port));
    }
    return m->peer;
}
