#include "frame.h"
#include "event.h"

#include "cm/alloc.h"
#include "cm/buf.h"
#include "cm/sse.h"

#include <inttypes.h>
#include <stdio.h>

on_frame_t *on_frame_new(int64_t id, double created_at, const char *data, size_t len)
{
    on_frame_t *f = cm_calloc(1, sizeof *f);
    if (!f)
        return NULL;
    if (cm_ws_frame_new(CM_WS_OP_TEXT, data, len, &f->ws) != 0) {
        cm_free(f);
        return NULL;
    }
    f->refs = 1;
    f->id = id;
    f->created_at = created_at;
    return f;
}

void on_frame_ref(on_frame_t *f)
{
    f->refs++;
}

void on_frame_unref(on_frame_t *f)
{
    if (f && --f->refs == 0) {
        cm_ws_frame_unref(f->ws);
        cm_free(f->sse);
        cm_free(f);
    }
}

const char *on_frame_sse(on_frame_t *f, size_t *len)
{
    if (!f->sse) {
        size_t plen = 0;
        const char *payload = cm_ws_frame_payload(f->ws, &plen);
        char id[24];
        snprintf(id, sizeof id, "%" PRId64, f->id);
        cm_buf_t b = CM_BUF_INIT;
        if (cm_sse_encode(&b, id, NULL, payload, plen) != 0) {
            cm_buf_free(&b);
            return NULL;
        }
        f->sse_len = b.len;
        f->sse = cm_buf_steal(&b);
    }
    *len = f->sse_len;
    return f->sse;
}

on_frame_t *on_frame_from_event(const on_event_t *ev)
{
    cm_buf_t b = CM_BUF_INIT;
    on_frame_t *f = NULL;
    if (on_event_frame(ev, &b) == 0)
        f = on_frame_new(ev->id, ev->created_at, b.data, b.len);
    if (f)
        f->order_id = ev->order_id;
    cm_buf_free(&b);
    return f;
}
