/*
 * cm/ws frames: the header pre-parser, UTF-8 validation, encoding through wslay's frame layer,
 * and the shared encoded frame (cm_ws_frame_t).
 */
#include "cm/ws.h"

#include "cm/alloc.h"
#include "ws_internal.h"

#include <string.h>
#include <uv.h>
#include <wslay/wslay.h>

/* ---- header pre-parser ---------------------------------------------------------------------- */

int ws_parse_header(const uint8_t *buf, size_t have, ws_hdr_t *h)
{
    h->size = 2;
    if (have < 1)
        return WS_AGAIN;
    h->fin = buf[0] >> 7;
    h->rsv = (buf[0] >> 4) & 7;
    h->opcode = buf[0] & 0xf;
    /* Decided on the first byte: nothing after it can make these frames valid. */
    if (h->rsv)
        return UV_EPROTO;
    if ((h->opcode >= 3 && h->opcode <= 7) || h->opcode >= 0xb)
        return UV_EPROTO;
    int control = h->opcode >= 8;
    if (control && !h->fin)
        return UV_EPROTO;
    if (have < 2)
        return WS_AGAIN;
    h->masked = buf[1] >> 7;
    uint8_t len7 = buf[1] & 0x7f;
    if (!h->masked)
        return UV_EPROTO;
    if (control && len7 > 125)
        return UV_EPROTO;
    size_t ext = len7 == 126 ? 2 : len7 == 127 ? 8 : 0;
    h->size = 2 + ext + 4;
    if (have < h->size)
        return WS_AGAIN;
    uint64_t len = len7;
    if (ext) {
        len = 0;
        for (size_t i = 0; i < ext; i++)
            len = len << 8 | buf[2 + i];
        /* §5.2: "the minimal number of bytes MUST be used", and the 64-bit form's top bit is 0. */
        if ((ext == 2 && len < 126) || (ext == 8 && (len < 65536 || len >> 63)))
            return UV_EPROTO;
    }
    h->len = len;
    return 0;
}

/* ---- UTF-8 ---------------------------------------------------------------------------------- */

int ws_utf8_feed(ws_utf8_t *u, const uint8_t *p, size_t n)
{
    const uint8_t *end = p + n;
    while (p < end) {
        uint8_t b = *p++;
        if (u->need) {
            if (b < u->lo || b > u->hi)
                return UV_EILSEQ;
            u->need--;
            u->lo = 0x80;
            u->hi = 0xbf;
            continue;
        }
        if (b < 0x80)
            continue;
        /* The lead byte fixes the length and, for the ranges that would be overlong, a
         * surrogate or past U+10FFFF, narrows the first continuation byte (RFC 3629 §4). */
        u->lo = 0x80;
        u->hi = 0xbf;
        if (b >= 0xc2 && b <= 0xdf) {
            u->need = 1;
        } else if (b >= 0xe0 && b <= 0xef) {
            u->need = 2;
            if (b == 0xe0)
                u->lo = 0xa0;
            else if (b == 0xed)
                u->hi = 0x9f;
        } else if (b >= 0xf0 && b <= 0xf4) {
            u->need = 3;
            if (b == 0xf0)
                u->lo = 0x90;
            else if (b == 0xf4)
                u->hi = 0x8f;
        } else {
            return UV_EILSEQ;
        }
    }
    return 0;
}

int ws_utf8_complete(const ws_utf8_t *u)
{
    return u->need == 0;
}

int ws_close_code_valid(unsigned code)
{
    return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) ||
           (code >= 3000 && code <= 4999);
}

/* ---- encoding ------------------------------------------------------------------------------- */

/*
 * One wslay frame context encodes for everybody: with a sink that always takes every byte,
 * wslay_frame_send emits a whole frame per call and is back in its initial state afterwards,
 * so no per-session context (and its 4 KB input buffer) is needed to send.
 */
static struct {
    wslay_frame_context_ptr ctx;
    long holders;
    ws_sink_fn sink; /* the current ws_encode call's */
    void *arg;
    int rc;
} enc;

static ssize_t enc_send(const uint8_t *data, size_t len, int flags, void *user_data)
{
    (void)flags;
    (void)user_data;
    /* Report success to wslay even when the sink fails, so that its state stays at a frame
     * boundary for the next caller; the error goes back through enc.rc. */
    if (enc.rc == 0)
        enc.rc = enc.sink(data, len, enc.arg);
    return (ssize_t)len;
}

static int enc_genmask(uint8_t *buf, size_t len, void *user_data)
{
    (void)user_data;
    memset(buf, 0, len); /* never called: server frames are unmasked */
    return 0;
}

static wslay_frame_context_ptr encoder(void)
{
    if (!enc.ctx) {
        struct wslay_frame_callbacks cbs = {enc_send, NULL, enc_genmask};
        if (wslay_frame_context_init(&enc.ctx, &cbs, NULL) != 0)
            enc.ctx = NULL;
    }
    return enc.ctx;
}

void ws_encoder_hold(void)
{
    enc.holders++;
}

void ws_encoder_release(void)
{
    if (--enc.holders > 0 || !enc.ctx)
        return;
    wslay_frame_context_free(enc.ctx);
    enc.ctx = NULL;
}

size_t ws_header_size(uint64_t len)
{
    return len < 126 ? 2 : len < 65536 ? 4 : 10;
}

int ws_encode(uint8_t opcode, const void *payload, size_t len, ws_sink_fn sink, void *arg)
{
    if (opcode >= 8 && len > 125)
        return UV_EINVAL;
    ws_encoder_hold();
    wslay_frame_context_ptr ctx = encoder();
    int rc = UV_ENOMEM;
    if (ctx) {
        struct wslay_frame_iocb io = {
            .fin = 1,
            .opcode = opcode,
            .payload_length = len,
            .data = payload,
            .data_length = len,
        };
        enc.sink = sink;
        enc.arg = arg;
        enc.rc = 0;
        ssize_t r = wslay_frame_send(ctx, &io);
        rc = enc.rc;
        if (rc == 0 && (r < 0 || (size_t)r != len))
            rc = UV_EINVAL;
        enc.sink = NULL;
        enc.arg = NULL;
    }
    ws_encoder_release();
    return rc;
}

/* ---- shared frames -------------------------------------------------------------------------- */

struct cm_ws_frame {
    long refs;
    size_t size; /* encoded bytes */
    size_t hdr;  /* header bytes: the payload starts there */
    uint8_t bytes[];
};

typedef struct fill {
    uint8_t *p, *end;
} fill_t;

static int fill_sink(const uint8_t *data, size_t len, void *arg)
{
    fill_t *f = arg;
    if ((size_t)(f->end - f->p) < len)
        return UV_EINVAL;
    memcpy(f->p, data, len);
    f->p += len;
    return 0;
}

int cm_ws_frame_new(int opcode, const void *payload, size_t len, cm_ws_frame_t **out)
{
    if (opcode != CM_WS_OP_TEXT && opcode != CM_WS_OP_BINARY && opcode != CM_WS_OP_PING &&
        opcode != CM_WS_OP_PONG && opcode != CM_WS_OP_CLOSE)
        return UV_EINVAL;
    size_t hdr = ws_header_size(len);
    cm_ws_frame_t *f = cm_malloc(sizeof *f + hdr + len);
    if (!f)
        return UV_ENOMEM;
    f->refs = 1;
    f->hdr = hdr;
    f->size = hdr + len;
    fill_t fl = {f->bytes, f->bytes + f->size};
    int rc = ws_encode((uint8_t)opcode, payload, len, fill_sink, &fl);
    if (rc == 0 && fl.p != fl.end)
        rc = UV_EINVAL;
    if (rc != 0) {
        cm_free(f);
        return rc;
    }
    *out = f;
    return 0;
}

cm_ws_frame_t *cm_ws_frame_ref(cm_ws_frame_t *f)
{
    f->refs++;
    return f;
}

void cm_ws_frame_unref(cm_ws_frame_t *f)
{
    if (f && --f->refs == 0)
        cm_free(f);
}

const char *cm_ws_frame_payload(const cm_ws_frame_t *f, size_t *len)
{
    if (len)
        *len = f->size - f->hdr;
    return (const char *)f->bytes + f->hdr;
}

size_t cm_ws_frame_size(const cm_ws_frame_t *f)
{
    return f->size;
}

const uint8_t *ws_frame_bytes(const cm_ws_frame_t *f)
{
    return f->bytes;
}
