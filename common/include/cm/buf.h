/*
 * cm/buf.h: a growable byte buffer (responses, metrics exposition, log lines).
 */
#ifndef CM_BUF_H
#define CM_BUF_H

#include <stdarg.h>
#include <stddef.h>

typedef struct cm_buf {
    char *data; /* always NUL-terminated when non-NULL; owned by the buffer */
    size_t len; /* bytes used, without the terminating NUL */
    size_t cap; /* bytes allocated */
} cm_buf_t;

/* Kept on one line: clang-format 14 spreads a braced initializer macro over four. */
/* clang-format off */
#define CM_BUF_INIT {NULL, 0, 0}
/* clang-format on */

/* Makes room for `extra` more bytes (plus the NUL). Returns 0 or UV_ENOMEM. */
int cm_buf_reserve(cm_buf_t *b, size_t extra);
/* Appends `len` bytes of `data`. Returns 0 or UV_ENOMEM (the buffer is left unchanged). */
int cm_buf_append(cm_buf_t *b, const void *data, size_t len);
/* Appends a NUL-terminated string. Returns 0 or UV_ENOMEM. */
int cm_buf_puts(cm_buf_t *b, const char *s);
/* Appends printf-formatted text. Returns 0, UV_ENOMEM, or UV_EINVAL on a format error. */
int cm_buf_printf(cm_buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int cm_buf_vprintf(cm_buf_t *b, const char *fmt, va_list ap) __attribute__((format(printf, 2, 0)));
/* Forgets the contents but keeps the memory for reuse. */
void cm_buf_reset(cm_buf_t *b);
/* Releases the memory; the buffer may be used again afterwards. */
void cm_buf_free(cm_buf_t *b);
/* Hands the bytes to the caller (who frees them with cm_free) and empties the buffer. */
char *cm_buf_steal(cm_buf_t *b);

#endif
