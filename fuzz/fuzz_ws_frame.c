/*
 * fuzz_ws_frame: common/src/ws_frame.c without a socket: the client frame-header pre-parser,
 * the incremental UTF-8 validator, close-code validation and the server frame encoder.
 *
 * Each is compared with what RFC 6455 (and RFC 3629 for UTF-8) says, written out again here:
 *   - ws_parse_header, fed every prefix of the input, agrees with a reference reading of the
 *     header, never changes its mind (once complete or refused it stays so) and always asks
 *     for more than it has when it says WS_AGAIN;
 *   - ws_utf8_feed gives the same answer fed at once or in pieces, the same as cm_utf8_valid
 *     and a code-point decoder, and an open sequence it accepted can always be completed;
 *   - cm_ws_frame_new's bytes read back (as an unmasked server frame) as the opcode and
 *     payload it was given, in the shortest length form.
 */
#include "fuzz.h"

#include "cm/alloc.h"
#include "cm/utf8.h"
#include "cm/ws.h"
#include "ws_internal.h"

#include <string.h>

/* ---- header ----------------------------------------------------------------------------- */

/* RFC 6455 section 5.2 for a client frame, on the first `have` bytes: 0 with *size and *len
 * (a valid, complete header), WS_AGAIN, or UV_EPROTO when the bytes so far already break a
 * rule. */
static int ref_header(const uint8_t *b, size_t have, size_t *size, uint64_t *len)
{
    if (have < 1)
        return WS_AGAIN;
    int fin = b[0] >> 7, rsv = (b[0] >> 4) & 7, op = b[0] & 0xf;
    int control = op >= 8;
    if (rsv || (op >= 3 && op <= 7) || op >= 11 || (control && !fin))
        return UV_EPROTO;
    if (have < 2)
        return WS_AGAIN;
    if (!(b[1] & 0x80))
        return UV_EPROTO; /* section 5.1: client frames are masked */
    uint64_t l = b[1] & 0x7f;
    if (control && l > 125)
        return UV_EPROTO;
    size_t ext = l == 126 ? 2 : l == 127 ? 8 : 0;
    if (have < 2 + ext + 4)
        return WS_AGAIN;
    if (ext) {
        l = 0;
        for (size_t i = 0; i < ext; i++)
            l = l << 8 | b[2 + i];
        if ((ext == 2 && l <= 125) || (ext == 8 && (l <= 65535 || (l >> 63))))
            return UV_EPROTO;
    }
    *size = 2 + ext + 4;
    *len = l;
    return 0;
}

static void check_header(const uint8_t *data, size_t size)
{
    int prev = WS_AGAIN;
    ws_hdr_t done = {0};
    size_t upto = size < 20 ? size : 20;
    for (size_t have = 0; have <= upto; have++) {
        ws_hdr_t h;
        memset(&h, 0xa5, sizeof h);
        int rc = ws_parse_header(data, have, &h);
        FUZZ_CHECK(rc == 0 || rc == WS_AGAIN || rc == UV_EPROTO);
        size_t rsize = 0;
        uint64_t rlen = 0;
        int ref = ref_header(data, have, &rsize, &rlen);
        FUZZ_CHECK(rc == ref);
        if (rc == WS_AGAIN) {
            FUZZ_CHECK(h.size > have && h.size <= WS_HDR_MAX);
            FUZZ_CHECK(prev == WS_AGAIN);
        } else if (rc == 0) {
            FUZZ_CHECK(h.size == rsize && h.len == rlen && h.size <= have);
            FUZZ_CHECK(h.fin == data[0] >> 7 && h.opcode == (data[0] & 0xf) && h.rsv == 0);
            FUZZ_CHECK(h.masked == 1);
            if (prev == 0)
                FUZZ_CHECK(h.size == done.size && h.len == done.len);
            done = h;
        } else {
            FUZZ_CHECK(prev != 0);
        }
        prev = rc;
    }
}

/* ---- UTF-8 ------------------------------------------------------------------------------ */

/* A code-point decoder (RFC 3629 section 3 and 4): an implementation apart from both. */
static int utf8_ref(const uint8_t *p, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint32_t c = p[i], min;
        size_t k;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xe0) == 0xc0) {
            k = 1, min = 0x80, c &= 0x1f;
        } else if ((c & 0xf0) == 0xe0) {
            k = 2, min = 0x800, c &= 0x0f;
        } else if ((c & 0xf8) == 0xf0) {
            k = 3, min = 0x10000, c &= 0x07;
        } else {
            return 0;
        }
        if (n - i <= k)
            return 0;
        for (size_t j = 1; j <= k; j++) {
            if ((p[i + j] & 0xc0) != 0x80)
                return 0;
            c = c << 6 | (p[i + j] & 0x3f);
        }
        if (c < min || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff))
            return 0;
        i += k + 1;
    }
    return 1;
}

static void check_utf8(const uint8_t *data, size_t size)
{
    ws_utf8_t whole = {0};
    int rc = ws_utf8_feed(&whole, data, size);
    FUZZ_CHECK(rc == 0 || rc == UV_EILSEQ);
    int valid = rc == 0 && ws_utf8_complete(&whole);
    FUZZ_CHECK(valid == cm_utf8_valid((const char *)data, size));
    FUZZ_CHECK(valid == utf8_ref(data, size));

    /* In pieces (cut where the bytes say): the same answer. */
    ws_utf8_t u = {0};
    int prc = 0;
    size_t off = 0;
    while (off < size && prc == 0) {
        size_t n = 1 + data[off] % 7;
        if (n > size - off)
            n = size - off;
        prc = ws_utf8_feed(&u, data + off, n);
        off += n;
    }
    FUZZ_CHECK(prc == rc);
    if (rc == 0)
        FUZZ_CHECK(ws_utf8_complete(&u) == ws_utf8_complete(&whole));

    /* Accepted but open: the bytes it asks for close the sequence into valid UTF-8, so it
     * refused nothing that a later fragment could still make right. */
    if (rc == 0 && !ws_utf8_complete(&whole)) {
        uint8_t *ext = malloc(size + 4);
        FUZZ_CHECK(ext);
        memcpy(ext, data, size);
        size_t n = size;
        ws_utf8_t w = whole;
        ext[n++] = w.lo;
        for (int i = 1; i < w.need; i++)
            ext[n++] = 0x80;
        FUZZ_CHECK(utf8_ref(ext, n));
        FUZZ_CHECK(ws_utf8_feed(&w, ext + size, n - size) == 0 && ws_utf8_complete(&w));
        free(ext);
    }
}

/* ---- close codes ------------------------------------------------------------------------ */

static void check_close_code(unsigned code)
{
    /* RFC 6455 section 7.4.1 and 7.4.2 with the IANA registry (1012-1014). */
    int want = (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) ||
               (code >= 3000 && code <= 4999);
    FUZZ_CHECK(ws_close_code_valid(code) == want);
}

/* ---- encoder ---------------------------------------------------------------------------- */

static void check_encode(const uint8_t *data, size_t size)
{
    static const int ops[] = {
        CM_WS_OP_TEXT, CM_WS_OP_BINARY, CM_WS_OP_CLOSE, CM_WS_OP_PING, CM_WS_OP_PONG, 0, 3, 0xb};
    if (size < 1)
        return;
    int op = ops[data[0] % 8];
    const uint8_t *payload = data + 1;
    size_t len = size - 1;
    /* Lengths past what the input holds: the 16-bit form and the 64-bit one. */
    uint8_t *big = NULL;
    if (len && data[0] >= 0xf0) {
        size_t want = data[0] >= 0xf8 ? 65536 + len : 126 + len * 50;
        big = malloc(want);
        FUZZ_CHECK(big);
        for (size_t i = 0; i < want; i++)
            big[i] = payload[i % len];
        payload = big;
        len = want;
    }
    cm_ws_frame_t *f = NULL;
    int rc = cm_ws_frame_new(op, payload, len, &f);
    int valid_op = op == CM_WS_OP_TEXT || op == CM_WS_OP_BINARY || op == CM_WS_OP_CLOSE ||
                   op == CM_WS_OP_PING || op == CM_WS_OP_PONG;
    if (!valid_op || (op >= 8 && len > 125)) {
        FUZZ_CHECK(rc == UV_EINVAL);
        free(big);
        return;
    }
    FUZZ_CHECK(rc == 0 && f);
    const uint8_t *b = ws_frame_bytes(f);
    size_t n = cm_ws_frame_size(f);
    /* An unmasked server frame, FIN set, the shortest length form. */
    FUZZ_CHECK(n >= 2 && b[0] == (0x80 | op) && !(b[1] & 0x80));
    uint64_t l = b[1] & 0x7f;
    size_t hdr = 2;
    if (l == 126) {
        FUZZ_CHECK(n >= 4);
        l = (uint64_t)b[2] << 8 | b[3];
        hdr = 4;
        FUZZ_CHECK(l >= 126);
    } else if (l == 127) {
        FUZZ_CHECK(n >= 10);
        l = 0;
        for (int i = 0; i < 8; i++)
            l = l << 8 | b[2 + i];
        hdr = 10;
        FUZZ_CHECK(l >= 65536 && !(l >> 63));
    }
    FUZZ_CHECK(l == len && hdr == ws_header_size(len) && n == hdr + len);
    FUZZ_CHECK(memcmp(b + hdr, payload, len) == 0);
    size_t plen;
    const char *p = cm_ws_frame_payload(f, &plen);
    FUZZ_CHECK(plen == len && (const uint8_t *)p == b + hdr);
    FUZZ_CHECK(cm_ws_frame_ref(f) == f);
    cm_ws_frame_unref(f);
    cm_ws_frame_unref(f);
    cm_ws_frame_unref(NULL);
    free(big);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    long live = cm_alloc_live();
    check_header(data, size);
    check_utf8(data, size);
    if (size >= 2)
        check_close_code((unsigned)data[0] << 8 | data[1]);
    check_encode(data, size);
    FUZZ_CHECK(cm_alloc_live() == live);
    return 0;
}
