/*
 * cm/alloc.h: the one allocation path of the project.
 *
 * Every heap allocation of common/ and the daemons goes through these wrappers so that tests
 * can count live blocks (leaks) and make the Nth allocation fail (error paths). cJSON uses them
 * too once cm_json_init() has run (cm/json.h); the other libraries (libuv, hiredis, libpq) keep
 * their own allocators.
 */
#ifndef CM_ALLOC_H
#define CM_ALLOC_H

#include <stddef.h>

/* malloc/calloc/realloc/strdup with failure injection. Return NULL on failure (or when a
 * failure was injected); the caller owns the block and releases it with cm_free(). */
void *cm_malloc(size_t size);
void *cm_calloc(size_t count, size_t size);
void *cm_realloc(void *ptr, size_t size);
char *cm_strdup(const char *s);
/* Copies at most `len` bytes of `s` and NUL-terminates; caller frees. */
char *cm_strndup(const char *s, size_t len);
/* Releases a block from the functions above; NULL is a no-op. */
void cm_free(void *ptr);

/* Test hook: the `n`th allocation from now fails (1 = the next one); 0 turns injection off. */
void cm_alloc_fail_after(long n);
/* Number of blocks allocated and not yet freed (realloc of a live block counts once). */
long cm_alloc_live(void);

#endif
