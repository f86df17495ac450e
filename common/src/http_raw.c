/*
 * cm/http: upgrades and raw connections. Writes are corked: what is queued during a loop turn
 * leaves in one uv_write from the server's prepare handle (see http_internal.h).
 */
#include "http_internal.h"

#include "cm/alloc.h"

#include <string.h>

static void on_flush_prepare(uv_prepare_t *p);

/* ------------------------------------------------------------------------------------------ */
/* The corked batch                                                                            */

size_t http_conn_queued(const cm_http_conn_t *c)
{
    return (c->batch ? c->batch->bytes : 0) +
           uv_stream_get_write_queue_size((const uv_stream_t *)&c->tcp);
}

/* Gives every borrowed range back and frees the batch. */
void http_batch_release(batch_t *b)
{
    for (unsigned i = 0; i < b->n; i++)
        if (b->seg[i].release)
            b->seg[i].release(b->seg[i].arg);
    cm_buf_free(&b->copy);
    cm_free(b);
}

void http_dirty_unlink(cm_http_conn_t *c)
{
    if (!c->dirty)
        return;
    cm_http_server_t *s = c->srv;
    if (c->dirty_prev)
        c->dirty_prev->dirty_next = c->dirty_next;
    else
        s->dirty = c->dirty_next;
    if (c->dirty_next)
        c->dirty_next->dirty_prev = c->dirty_prev;
    c->dirty_prev = c->dirty_next = NULL;
    c->dirty = 0;
}

static void dirty_link(cm_http_conn_t *c)
{
    if (c->dirty)
        return;
    cm_http_server_t *s = c->srv;
    c->dirty = 1;
    c->dirty_prev = NULL;
    c->dirty_next = s->dirty;
    if (s->dirty)
        s->dirty->dirty_prev = c;
    s->dirty = c;
    if (!uv_is_active((uv_handle_t *)&s->flush))
        uv_prepare_start(&s->flush, on_flush_prepare);
}

/* Reading starts again once the queue is back under the owner's limit. */
static void raw_unblock(cm_http_conn_t *c)
{
    if (!c->raw_blocked || (c->write_limit && http_conn_queued(c) > c->write_limit))
        return;
    c->raw_blocked = 0;
    if (c->state != C_OPEN)
        return;
    if (http_pending_len(c) && !c->user_paused)
        http_timer_arm(c, T_DEFER, 0);
    http_conn_read_start(c);
}

static void on_batch_write(uv_write_t *w, int status)
{
    batch_t *b = (batch_t *)w;
    cm_http_conn_t *c = b->conn;
    http_batch_release(b);
    if (status < 0 && status != UV_ECANCELED) {
        http_conn_close_now(c);
        return;
    }
    raw_unblock(c);
}

/* Hands the batch to libuv: one uv_write, which tries a writev at once. On failure the batch
 * stays with the connection, which closes and releases it from its close callback. */
void http_conn_flush(cm_http_conn_t *c)
{
    batch_t *b = c->batch;
    http_dirty_unlink(c);
    if (!b || c->state != C_OPEN)
        return;
    uv_buf_t stack[BATCH_STACK_BUFS];
    uv_buf_t *bufs = b->n <= BATCH_STACK_BUFS ? stack : cm_malloc(b->n * sizeof *bufs);
    if (!bufs) {
        http_conn_close_now(c);
        return;
    }
    for (unsigned i = 0; i < b->n; i++) {
        const seg_t *g = &b->seg[i];
        bufs[i] = uv_buf_init((char *)(g->ref ? g->ref : b->copy.data + g->off), (unsigned)g->len);
    }
    c->batch = NULL;
    int rc = uv_write(&b->req, (uv_stream_t *)&c->tcp, bufs, b->n, on_batch_write);
    if (bufs != stack)
        cm_free(bufs);
    if (rc < 0) {
        c->batch = b;
        http_conn_close_now(c);
    }
}

static void on_flush_prepare(uv_prepare_t *p)
{
    cm_http_server_t *s = p->data;
    while (s->dirty)
        http_conn_flush(s->dirty);
    uv_prepare_stop(p);
}

/* Adds a range to this turn's batch: borrowed when `ref` is set, else `len` bytes of `data`
 * copied (next to the previous copy when that was the last range, so copies coalesce). */
static int raw_queue(cm_http_conn_t *c, const char *ref, const void *data, size_t len,
                     cm_http_release_fn release, void *arg)
{
    if (!c->raw || c->state != C_OPEN)
        return UV_EPIPE;
    batch_t *b = c->batch;
    int extend = !ref && b && b->n > 0 && !b->seg[b->n - 1].ref;
    if (!extend && (!b || b->n == b->cap)) {
        unsigned cap = b ? b->cap * 2 : 8;
        batch_t *nb = cm_realloc(b, sizeof *nb + cap * sizeof nb->seg[0]);
        if (!nb) {
            http_conn_close_now(c);
            return UV_ENOMEM;
        }
        if (!b) {
            memset(nb, 0, sizeof *nb);
            nb->conn = c;
        }
        nb->cap = cap;
        c->batch = b = nb;
    }
    if (!ref) {
        size_t off = b->copy.len;
        if (cm_buf_append(&b->copy, data, len) < 0) {
            http_conn_close_now(c);
            return UV_ENOMEM;
        }
        if (extend)
            b->seg[b->n - 1].len += len;
        else
            b->seg[b->n++] = (seg_t){NULL, off, len, NULL, NULL};
    } else {
        b->seg[b->n++] = (seg_t){ref, 0, len, release, arg};
    }
    b->bytes += len;
    size_t flush_at = BATCH_FLUSH_BYTES;
    if (c->write_limit && c->write_limit / 2 < flush_at)
        flush_at = c->write_limit / 2 + 1;
    if (b->bytes >= flush_at)
        http_conn_flush(c);
    else
        dirty_link(c);
    if (c->state != C_OPEN)
        return 0; /* a failed write closed it; queued ranges are released with the rest */
    if (c->write_limit && !c->raw_blocked && http_conn_queued(c) > c->write_limit) {
        c->raw_blocked = 1;
        http_conn_read_stop(c);
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Reading                                                                                     */

void http_raw_deliver(cm_http_conn_t *c)
{
    size_t n = http_pending_len(c);
    if (!n || c->user_paused || c->raw_blocked || c->state != C_OPEN)
        return;
    /* Move the bytes out first: on_read may write, pause or close. The shared read buffer is
     * free now (no read callback is running), so it holds the copy. */
    if (n > READ_BUF_SIZE)
        n = READ_BUF_SIZE;
    char *tmp = c->srv->rbuf;
    memcpy(tmp, c->pending.data + c->ppos, n);
    c->ppos += n;
    if (c->ppos == c->pending.len) {
        cm_buf_reset(&c->pending);
        c->ppos = 0;
    }
    c->raw_cbs.on_read(c, tmp, (ssize_t)n, c->raw_ud);
    if (http_pending_len(c) && c->state == C_OPEN && !c->user_paused && !c->raw_blocked)
        http_timer_arm(c, T_DEFER, 0);
}

/* ------------------------------------------------------------------------------------------ */
/* Raw connection calls of the API                                                             */

int cm_http_upgrade(cm_http_request_t *req, const void *response_head, size_t len,
                    const cm_http_raw_cbs_t *cbs, void *ud, cm_http_conn_t **out)
{
    cm_http_conn_t *c = req ? req->conn : NULL;
    if (!c || !c->busy || !cbs || !cbs->on_read)
        return UV_EINVAL;
    if (c->state != C_OPEN || c->peer_eof || c->srv->stopping) {
        http_conn_answered(c, 101, 1, 1);
        return UV_EPIPE;
    }
    int rc = http_conn_send(c, response_head, len, NULL, 0);
    if (rc < 0) {
        http_conn_answered(c, 101, 1, 1);
        return rc;
    }
    c->raw = 1;
    c->raw_cbs = *cbs;
    c->raw_ud = ud;
    http_timer_disarm(c);
    if (out)
        *out = c;
    http_conn_answered(c, 101, 0, 0);
    /* The request's strings are not needed any more; an idle upgraded connection (thousands of
     * WebSockets) should not keep them. */
    cm_buf_free(&c->head);
    cm_buf_free(&c->body);
    cm_buf_free(&c->out);
    cm_free(c->hoff);
    cm_free(c->hdrs);
    c->hoff = NULL;
    c->hdrs = NULL;
    c->hcap = c->nh = 0;
    memset(&c->req, 0, sizeof c->req);
    return 0;
}

int cm_http_conn_write(cm_http_conn_t *c, const void *data, size_t len)
{
    if (len == 0)
        return c->state == C_OPEN ? 0 : UV_EPIPE;
    return raw_queue(c, NULL, data, len, NULL, NULL);
}

int cm_http_conn_write_ref(cm_http_conn_t *c, const void *data, size_t len,
                           cm_http_release_fn release, void *arg)
{
    return raw_queue(c, data, NULL, len, release, arg);
}

size_t cm_http_conn_write_queue_size(const cm_http_conn_t *c)
{
    return http_conn_queued(c);
}

void cm_http_conn_set_write_limit(cm_http_conn_t *c, size_t max)
{
    c->write_limit = max;
    raw_unblock(c);
    if (max && !c->raw_blocked && http_conn_queued(c) > max) {
        c->raw_blocked = 1;
        http_conn_read_stop(c);
    }
}

void cm_http_conn_wake(cm_http_conn_t *c)
{
    if (!c->raw || c->state != C_OPEN)
        return;
    c->wake = 1;
    http_timer_arm(c, T_DEFER, 0);
}
