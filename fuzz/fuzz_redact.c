/*
 * fuzz_redact: the password masker (common/src/redact.c cm_redact_url, cm_redact_message).
 *
 * The input is cut at NUL bytes into a scheme, a user name, the rest of a password, the rest
 * of a URL (host, port, path, query) and a message template. From them:
 *   - the first part as it is goes through cm_redact_url and cm_redact_message into buffers of
 *     several sizes: always NUL-terminated, and a short buffer holds a prefix of what a long
 *     one does ("cut when too long");
 *   - scheme://user:<password>@rest, whose password starts with a marker that occurs nowhere
 *     else, must come out of cm_redact_url without the marker, whether uriparser reads the URL
 *     or not; and so must a message made from the template, where "$S" stands for the URL and
 *     "$P" for the password in double quotes (how libpq quotes what it could not read).
 */
#include "fuzz.h"

#include "cm/buf.h"
#include "cm/redact.h"

#include <string.h>

#define MARKER "Zq7Xw3Kp"

static void bounded(const char *in, const char *source)
{
    static const size_t sizes[] = {0, 1, 2, 7, 40};
    char full[2048];
    if (source)
        cm_redact_message(in, source, full, sizeof full);
    else
        cm_redact_url(in, full, sizeof full);
    FUZZ_CHECK(strlen(full) < sizeof full);
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        char out[64];
        memset(out, 'x', sizeof out);
        const char *r = source ? cm_redact_message(in, source, out, sizes[i])
                               : cm_redact_url(in, out, sizes[i]);
        FUZZ_CHECK(r == out);
        if (sizes[i] == 0) {
            FUZZ_CHECK(out[0] == 'x'); /* nothing written */
            continue;
        }
        size_t n = strnlen(out, sizes[i]);
        FUZZ_CHECK(n < sizes[i]);
        FUZZ_CHECK(out[sizes[i]] == 'x'); /* nothing past the buffer */
        FUZZ_CHECK(strncmp(out, full, n) == 0);
        if (strlen(full) >= sizes[i]) /* cut: as much as fits */
            FUZZ_CHECK(n == sizes[i] - 1);
    }
}

/* Keeps the bytes of `s` not in `drop`. */
static void filtered(cm_buf_t *b, const char *s, const char *drop)
{
    for (; *s; s++) {
        if (!strchr(drop, *s))
            FUZZ_CHECK(cm_buf_append(b, s, 1) == 0);
    }
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *copy = malloc(size + 1);
    FUZZ_CHECK(copy);
    memcpy(copy, data, size);
    copy[size] = '\0';
    const char *part[5] = {"", "", "", "", ""};
    size_t k = 0;
    for (char *p = copy; k < 5 && p <= copy + size; p += strlen(p) + 1)
        part[k++] = p;

    bounded(part[0], NULL);
    bounded(part[4], part[0]);

    /* scheme://user:MARKER...@rest */
    cm_buf_t url = CM_BUF_INIT, pw = CM_BUF_INIT, msg = CM_BUF_INIT;
    cm_buf_t scheme = CM_BUF_INIT;
    for (const char *s = part[0]; *s; s++) {
        if ((*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9' && scheme.len) ||
            ((*s == '+' || *s == '.' || *s == '-') && scheme.len))
            FUZZ_CHECK(cm_buf_append(&scheme, s, 1) == 0);
    }
    FUZZ_CHECK(cm_buf_puts(&url, scheme.len ? scheme.data : "postgresql") == 0);
    FUZZ_CHECK(cm_buf_puts(&url, "://") == 0);
    filtered(&url, part[1], ":/?#@[]");
    FUZZ_CHECK(cm_buf_puts(&url, ":") == 0);
    FUZZ_CHECK(cm_buf_puts(&pw, MARKER) == 0);
    filtered(&pw, part[2], "/?#@");
    FUZZ_CHECK(cm_buf_puts(&url, pw.data) == 0);
    FUZZ_CHECK(cm_buf_puts(&url, "@") == 0);
    FUZZ_CHECK(cm_buf_puts(&url, part[3]) == 0);
    const char *first = strstr(url.data, MARKER);
    if (first && !strstr(first + 1, MARKER) && !strstr(part[4], MARKER)) {
        char out[4096];
        cm_redact_url(url.data, out, sizeof out);
        FUZZ_CHECK(!strstr(out, MARKER));

        size_t inserted = 0;
        for (const char *t = part[4]; *t; t++) {
            if (t[0] == '$' && t[1] == 'S') {
                FUZZ_CHECK(cm_buf_puts(&msg, url.data) == 0);
                t++;
                inserted++;
            } else if (t[0] == '$' && t[1] == 'P') {
                FUZZ_CHECK(cm_buf_puts(&msg, "\"") == 0 && cm_buf_puts(&msg, pw.data) == 0 &&
                           cm_buf_puts(&msg, "\"") == 0);
                t++;
                inserted++;
            } else {
                FUZZ_CHECK(cm_buf_append(&msg, t, 1) == 0);
            }
        }
        /* (only the marker's own copies: the template's text next to one can spell another) */
        size_t markers = 0;
        for (const char *m = strstr(msg.data ? msg.data : "", MARKER); m; m = strstr(m + 1, MARKER))
            markers++;
        if (msg.len && markers == inserted) {
            cm_redact_message(msg.data, url.data, out, sizeof out);
            FUZZ_CHECK(!strstr(out, MARKER));
        }
    }
    cm_buf_free(&url);
    cm_buf_free(&pw);
    cm_buf_free(&msg);
    cm_buf_free(&scheme);
    free(copy);
    return 0;
}
