#include "cm/alloc.h"

#include <stdlib.h>
#include <string.h>

/* Single-threaded by design (one loop per daemon), so plain counters suffice. */
static long live_blocks;
static long fail_countdown;

static int should_fail(void)
{
    if (fail_countdown <= 0)
        return 0;
    return --fail_countdown == 0;
}

void *cm_malloc(size_t size)
{
    if (should_fail())
        return NULL;
    void *p = malloc(size ? size : 1);
    if (p)
        live_blocks++;
    return p;
}

void *cm_calloc(size_t count, size_t size)
{
    if (should_fail())
        return NULL;
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (p)
        live_blocks++;
    return p;
}

void *cm_realloc(void *ptr, size_t size)
{
    if (!ptr)
        return cm_malloc(size);
    if (should_fail())
        return NULL;
    return realloc(ptr, size ? size : 1);
}

char *cm_strndup(const char *s, size_t len)
{
    char *p = cm_malloc(len + 1);
    if (!p)
        return NULL;
    memcpy(p, s, len);
    p[len] = '\0';
    return p;
}

char *cm_strdup(const char *s)
{
    return cm_strndup(s, strlen(s));
}

void cm_free(void *ptr)
{
    if (!ptr)
        return;
    live_blocks--;
    free(ptr);
}

void cm_alloc_fail_after(long n)
{
    fail_countdown = n;
}

long cm_alloc_live(void)
{
    return live_blocks;
}
