/*
 * config_file.c: the KEY=VALUE override file (CONFIG_FILE): reading it whole, one key per
 * line, and checking its keys against what it may set. The getters of config.c consult it
 * through cm_config_file_get.
 */
#include "cm/config.h"
#include "config_internal.h"

#include "cm/alloc.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

/* A configuration file larger than this is refused: it is a handful of lines by design. */
#define FILE_MAX (1024 * 1024)

/* ------------------------------------------------------------------------------------------ */
/* KEY=VALUE file                                                                              */
/* ------------------------------------------------------------------------------------------ */

typedef struct entry {
    char *key;
    char *value;
} entry_t;

struct cm_config_file {
    entry_t *entries;
    size_t count;
    size_t cap;
};

void cm_config_file_free(cm_config_file_t *f)
{
    if (!f)
        return;
    for (size_t i = 0; i < f->count; i++) {
        cm_free(f->entries[i].key);
        cm_free(f->entries[i].value);
    }
    cm_free(f->entries);
    cm_free(f);
}

const char *cm_config_file_get(const cm_config_file_t *f, const char *key)
{
    if (!f)
        return NULL;
    for (size_t i = 0; i < f->count; i++) {
        if (strcmp(f->entries[i].key, key) == 0)
            return f->entries[i].value;
    }
    return NULL;
}

/* Stores key=value (copies); a key seen before is overwritten, so the last line wins. */
static int file_put(cm_config_file_t *f, const char *k, size_t klen, const char *v, size_t vlen)
{
    char *value = cm_strndup(v, vlen);
    if (!value)
        return UV_ENOMEM;
    for (size_t i = 0; i < f->count; i++) {
        if (strlen(f->entries[i].key) == klen && memcmp(f->entries[i].key, k, klen) == 0) {
            cm_free(f->entries[i].value);
            f->entries[i].value = value;
            return 0;
        }
    }
    if (f->count == f->cap) {
        size_t cap = f->cap ? f->cap * 2 : 8;
        entry_t *e = cm_realloc(f->entries, cap * sizeof *e);
        if (!e) {
            cm_free(value);
            return UV_ENOMEM;
        }
        f->entries = e;
        f->cap = cap;
    }
    char *key = cm_strndup(k, klen);
    if (!key) {
        cm_free(value);
        return UV_ENOMEM;
    }
    f->entries[f->count].key = key;
    f->entries[f->count].value = value;
    f->count++;
    return 0;
}

static int key_valid(const char *k, size_t len)
{
    if (len == 0)
        return 0;
    for (size_t i = 0; i < len; i++) {
        char ch = k[i];
        int alpha = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || ch == '_';
        if (!alpha && (i == 0 || ch < '0' || ch > '9'))
            return 0;
    }
    return 1;
}

/* Parses one line. Returns 0 (stored or skipped), UV_ENOMEM, or UV_EINVAL with *why set. */
static int parse_line(cm_config_file_t *f, const char *s, size_t len, const char **why)
{
    trim(&s, &len);
    if (len == 0 || s[0] == '#')
        return 0;
    const char *eq = memchr(s, '=', len);
    if (!eq) {
        *why = "expected KEY=VALUE";
        return UV_EINVAL;
    }
    const char *k = s;
    size_t klen = (size_t)(eq - s);
    trim(&k, &klen);
    if (!key_valid(k, klen)) {
        *why = "invalid key (expected letters, digits and '_', not starting with a digit)";
        return UV_EINVAL;
    }
    const char *v = eq + 1;
    size_t vlen = (size_t)(s + len - v);
    trim(&v, &vlen);
    if (vlen && v[0] == '"') {
        const char *close = memchr(v + 1, '"', vlen - 1);
        if (!close) {
            *why = "unterminated double quote";
            return UV_EINVAL;
        }
        if (close != v + vlen - 1) {
            *why = "text after the closing double quote";
            return UV_EINVAL;
        }
        v++;
        vlen -= 2;
    }
    return file_put(f, k, klen, v, vlen);
}

/* Writes "<path><sep><what>" into err. The path is shown up to 256 bytes ("..." after) and any
 * key up to 64, so that the explanation, which comes after them, is always whole within
 * CM_CONFIG_ERROR_MAX. */
static void put_err(char *err, size_t errsz, const char *path, const char *sep, const char *fmt,
                    ...) __attribute__((format(printf, 5, 6)));

static void put_err(char *err, size_t errsz, const char *path, const char *sep, const char *fmt,
                    ...)
{
    if (!err || !errsz)
        return;
    int n = snprintf(err, errsz, "%.256s%s%s", path, strlen(path) > 256 ? "..." : "", sep);
    if (n < 0 || (size_t)n >= errsz)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err + n, errsz - (size_t)n, fmt, ap);
    va_end(ap);
}

/* Reads the whole file into a cm_malloc'd NUL-terminated buffer. */
static int read_all(const char *path, char **data, size_t *size, char *err, size_t errsz)
{
    /* Non-blocking open and a regular-file check: the file is read on the loop (SIGHUP), and
     * a FIFO or device named by mistake would block it for good. */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        int e = errno;
        put_err(err, errsz, path, ": ", "%s", strerror(e));
        return -e;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        put_err(err, errsz, path, ": ", "not a regular file");
        return UV_EINVAL;
    }
    size_t cap = 4096, len = 0;
    char *buf = cm_malloc(cap);
    if (!buf) {
        close(fd);
        put_err(err, errsz, path, ": ", "out of memory");
        return UV_ENOMEM;
    }
    for (;;) {
        if (len > FILE_MAX) { /* checked on what was read: growing doubles past the limit */
            close(fd);
            cm_free(buf);
            put_err(err, errsz, path, ": ", "larger than %d bytes", FILE_MAX);
            return UV_EFBIG;
        }
        if (len + 1 >= cap) {
            char *nb = cm_realloc(buf, cap * 2);
            if (!nb) {
                close(fd);
                cm_free(buf);
                put_err(err, errsz, path, ": ", "out of memory");
                return UV_ENOMEM;
            }
            buf = nb;
            cap *= 2;
        }
        ssize_t n = read(fd, buf + len, cap - len - 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            int e = errno;
            close(fd);
            cm_free(buf);
            put_err(err, errsz, path, ": ", "%s", strerror(e));
            return -e;
        }
        if (n == 0)
            break;
        len += (size_t)n;
    }
    close(fd);
    buf[len] = '\0';
    *data = buf;
    *size = len;
    return 0;
}

int cm_config_file_load(const char *path, cm_config_file_t **out, char *err, size_t errsz)
{
    *out = NULL;
    if (err && errsz)
        err[0] = '\0';
    char *data = NULL;
    size_t size = 0;
    int rc = read_all(path, &data, &size, err, errsz);
    if (rc != 0)
        return rc;
    cm_config_file_t *f = cm_calloc(1, sizeof *f);
    if (!f) {
        cm_free(data);
        put_err(err, errsz, path, ": ", "out of memory");
        return UV_ENOMEM;
    }
    const char *p = data;
    const char *end = data + size;
    for (unsigned line = 1; p < end; line++) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *stop = nl ? nl : end;
        const char *why = NULL;
        if (memchr(p, '\0', (size_t)(stop - p))) {
            why = "NUL byte";
            rc = UV_EINVAL;
        } else {
            rc = parse_line(f, p, (size_t)(stop - p), &why);
        }
        if (rc != 0) {
            if (rc == UV_ENOMEM)
                put_err(err, errsz, path, ": ", "out of memory");
            else
                put_err(err, errsz, path, ":", "%u: %s", line, why);
            cm_config_file_free(f);
            cm_free(data);
            return rc;
        }
        p = stop + 1;
    }
    cm_free(data);
    *out = f;
    return 0;
}

int cm_config_file_check_keys(const cm_config_file_t *f, const char *path, const char *const *keys,
                              char *err, size_t errsz)
{
    for (size_t i = 0; f && keys && i < f->count; i++) {
        const char *const *k = keys;
        while (*k && strcmp(*k, f->entries[i].key) != 0)
            k++;
        if (*k)
            continue;
        char list[512] = "";
        size_t n = 0;
        for (k = keys; *k && n < sizeof list; k++)
            n += (size_t)snprintf(list + n, sizeof list - n, "%s%s", n ? ", " : "", *k);
        /* The key is quoted up to 64 bytes, so that what follows it, the explanation, is
         * always in the error (a long mistyped key cut it off). */
        const char *key = f->entries[i].key;
        int cut = strlen(key) > 64;
        put_err(err, errsz, path, ": ", "%.64s%s is not a key this file can set (it can set %s)",
                key, cut ? "..." : "", list);
        return UV_EINVAL;
    }
    return 0;
}
