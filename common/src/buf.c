#include "cm/buf.h"

#include "cm/alloc.h"

#include <stdio.h>
#include <string.h>
#include <uv.h>

int cm_buf_reserve(cm_buf_t *b, size_t extra)
{
    size_t need = b->len + extra + 1;
    if (need <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need)
        cap *= 2;
    char *p = cm_realloc(b->data, cap);
    if (!p)
        return UV_ENOMEM;
    b->data = p;
    b->cap = cap;
    return 0;
}

int cm_buf_append(cm_buf_t *b, const void *data, size_t len)
{
    if (cm_buf_reserve(b, len) != 0)
        return UV_ENOMEM;
    if (len)
        memcpy(b->data + b->len, data, len);
    b->len += len;
    b->data[b->len] = '\0';
    return 0;
}

int cm_buf_puts(cm_buf_t *b, const char *s)
{
    return cm_buf_append(b, s, strlen(s));
}

int cm_buf_vprintf(cm_buf_t *b, const char *fmt, va_list ap)
{
    va_list copy;
    va_copy(copy, ap);
    char small[256];
    int n = vsnprintf(small, sizeof small, fmt, copy);
    va_end(copy);
    if (n < 0)
        return UV_EINVAL;
    if ((size_t)n < sizeof small)
        return cm_buf_append(b, small, (size_t)n);
    if (cm_buf_reserve(b, (size_t)n) != 0)
        return UV_ENOMEM;
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    b->len += (size_t)n;
    return 0;
}

int cm_buf_printf(cm_buf_t *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = cm_buf_vprintf(b, fmt, ap);
    va_end(ap);
    return rc;
}

void cm_buf_reset(cm_buf_t *b)
{
    b->len = 0;
    if (b->data)
        b->data[0] = '\0';
}

void cm_buf_free(cm_buf_t *b)
{
    cm_free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

char *cm_buf_steal(cm_buf_t *b)
{
    char *p = b->data;
    b->data = NULL;
    b->len = b->cap = 0;
    return p;
}
