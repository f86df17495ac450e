/*
 * fuzz_sse: the Server-Sent Events encoder (common/src/sse.c cm_sse_encode). The input is an
 * event: its first byte says whether it has an id and an event name, and the rest is cut at
 * NUL bytes into the id, the event name and the data (which may hold NULs of its own).
 *
 * An encoded event is read back with the WHATWG HTML "Interpreting an event stream"
 * algorithm, written out below: there must be exactly one event (two for the event encoded
 * twice in a row), with the data the client joins again (the payload with CRLF and CR turned
 * into LF), the event name ("message" when none) and the id; and cm_sse_encode must refuse
 * exactly what cannot be encoded (an id or name with CR, LF; data with a NUL).
 */
#include "fuzz.h"

#include "cm/alloc.h"
#include "cm/buf.h"
#include "cm/sse.h"

#include <string.h>

typedef struct parsed {
    int events;
    cm_buf_t data, type, last_id;
    cm_buf_t data_buf, type_buf, id_buf; /* the spec's buffers */
    int id_set;
} parsed_t;

static void put(cm_buf_t *b, const char *p, size_t n)
{
    FUZZ_CHECK(cm_buf_append(b, p, n) == 0);
}

/* One line of the stream (without its end), as the spec processes it. */
static void line(parsed_t *ps, const char *p, size_t n)
{
    if (n == 0) { /* dispatch */
        ps->events++;
        if (ps->id_set) {
            cm_buf_reset(&ps->last_id);
            put(&ps->last_id, ps->id_buf.data ? ps->id_buf.data : "", ps->id_buf.len);
        }
        if (ps->data_buf.len == 0) {
            ps->events--; /* an empty data buffer dispatches nothing */
        } else {
            size_t len = ps->data_buf.len;
            if (ps->data_buf.data[len - 1] == '\n')
                len--;
            cm_buf_reset(&ps->data);
            put(&ps->data, ps->data_buf.data, len);
            cm_buf_reset(&ps->type);
            if (ps->type_buf.len)
                put(&ps->type, ps->type_buf.data, ps->type_buf.len);
            else
                put(&ps->type, "message", 7);
        }
        cm_buf_reset(&ps->data_buf);
        cm_buf_reset(&ps->type_buf);
        return;
    }
    if (p[0] == ':')
        return; /* comment */
    const char *colon = memchr(p, ':', n);
    size_t flen = colon ? (size_t)(colon - p) : n;
    const char *v = colon ? colon + 1 : p + n;
    size_t vlen = colon ? n - flen - 1 : 0;
    if (vlen && *v == ' ') {
        v++;
        vlen--;
    }
    if (flen == 4 && memcmp(p, "data", 4) == 0) {
        put(&ps->data_buf, v, vlen);
        put(&ps->data_buf, "\n", 1);
    } else if (flen == 5 && memcmp(p, "event", 5) == 0) {
        cm_buf_reset(&ps->type_buf);
        put(&ps->type_buf, v, vlen);
    } else if (flen == 2 && memcmp(p, "id", 2) == 0) {
        if (!memchr(v, '\0', vlen)) {
            cm_buf_reset(&ps->id_buf);
            put(&ps->id_buf, v, vlen);
            ps->id_set = 1;
        }
    } else {
        FUZZ_CHECK(flen == 5 && memcmp(p, "retry", 5) == 0); /* nothing else is written */
    }
}

/* The stream: lines end with CRLF, LF or CR. */
static void parse(parsed_t *ps, const char *p, size_t n)
{
    size_t start = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '\r' || p[i] == '\n') {
            line(ps, p + start, i - start);
            if (p[i] == '\r' && i + 1 < n && p[i + 1] == '\n')
                i++;
            start = i + 1;
        }
    }
    FUZZ_CHECK(start == n); /* the encoder ends every line */
}

static void parsed_free(parsed_t *ps)
{
    cm_buf_free(&ps->data);
    cm_buf_free(&ps->type);
    cm_buf_free(&ps->last_id);
    cm_buf_free(&ps->data_buf);
    cm_buf_free(&ps->type_buf);
    cm_buf_free(&ps->id_buf);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *d, size_t size)
{
    if (size < 1)
        return 0;
    long live = cm_alloc_live();
    int flags = d[0];
    const char *p = (const char *)d + 1, *end = (const char *)d + size;
    char *id = NULL, *event = NULL;
    if (flags & 1) {
        const char *z = memchr(p, '\0', (size_t)(end - p));
        size_t n = z ? (size_t)(z - p) : (size_t)(end - p);
        id = strndup(p, n);
        p = z ? z + 1 : end;
    }
    if (flags & 2) {
        const char *z = memchr(p, '\0', (size_t)(end - p));
        size_t n = z ? (size_t)(z - p) : (size_t)(end - p);
        event = strndup(p, n);
        p = z ? z + 1 : end;
    }
    const char *data = (flags & 4) && p == end ? NULL : p;
    size_t len = (size_t)(end - p);

    cm_buf_t out = CM_BUF_INIT;
    FUZZ_CHECK(cm_buf_puts(&out, "retry: 1000\n\n") == 0); /* what precedes events */
    size_t before = out.len;
    int rc = cm_sse_encode(&out, id, event, data, len);
    int refusable = (id && strpbrk(id, "\r\n")) || (event && strpbrk(event, "\r\n")) ||
                    (len && memchr(p, '\0', len));
    if (refusable) {
        FUZZ_CHECK(rc == UV_EINVAL && out.len == before);
    } else {
        FUZZ_CHECK(rc == 0);
        size_t one = out.len - before;
        char *again = malloc(one); /* twice in a row */
        FUZZ_CHECK(again);
        memcpy(again, out.data + before, one);
        FUZZ_CHECK(cm_buf_append(&out, again, one) == 0);
        free(again);
        parsed_t ps;
        memset(&ps, 0, sizeof ps);
        parse(&ps, out.data, out.len);
        FUZZ_CHECK(ps.events == 2);
        /* What the client joins: the lines of the payload with "\n". */
        cm_buf_t want = CM_BUF_INIT;
        for (size_t i = 0; i < len; i++) {
            if (p[i] == '\r') {
                put(&want, "\n", 1);
                if (i + 1 < len && p[i + 1] == '\n')
                    i++;
            } else {
                put(&want, p + i, 1);
            }
        }
        FUZZ_CHECK(ps.data.len == want.len &&
                   (want.len == 0 || memcmp(ps.data.data, want.data, want.len) == 0));
        const char *type = event && *event ? event : "message";
        FUZZ_CHECK(ps.type.len == strlen(type) && memcmp(ps.type.data, type, ps.type.len) == 0);
        if (id)
            FUZZ_CHECK(ps.id_set && ps.last_id.len == strlen(id) &&
                       (!*id || memcmp(ps.last_id.data, id, ps.last_id.len) == 0));
        else
            FUZZ_CHECK(!ps.id_set);
        cm_buf_free(&want);
        parsed_free(&ps);
    }
    cm_buf_free(&out);
    free(id);
    free(event);
    FUZZ_CHECK(cm_alloc_live() == live);
    return 0;
}
