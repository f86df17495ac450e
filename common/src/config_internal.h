/* config_internal.h: what config.c and config_file.c share. */
#ifndef CM_CONFIG_INTERNAL_H
#define CM_CONFIG_INTERNAL_H

#include <stddef.h>

static inline int config_is_space(char ch)
{
    return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n' || ch == '\v' || ch == '\f';
}

/* Narrows [*s, *s + *len) to its non-whitespace core. */
static inline void trim(const char **s, size_t *len)
{
    while (*len && config_is_space(**s)) {
        (*s)++;
        (*len)--;
    }
    while (*len && config_is_space((*s)[*len - 1]))
        (*len)--;
}

struct cm_config_file;
/* 0 when every key of `f` is in `keys`; else UV_EINVAL with the message in err. */
int cm_config_file_check_keys(const struct cm_config_file *f, const char *path,
                              const char *const *keys, char *err, size_t errsz);

#endif
