#include "market.h"

#include <string.h>
#include <uv.h>

static int market_char(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' ||
           c == '_' || c == ':' || c == '-';
}

int ps_market_valid(const char *id, size_t len)
{
    if (len == 0 || len > PS_MARKET_MAX)
        return 0;
    for (size_t i = 0; i < len; i++)
        if (!market_char((unsigned char)id[i]))
            return 0;
    return 1;
}

int ps_market_split(const char *list, char *storage, const char **out, int max)
{
    int n = 0;
    size_t total = strlen(list);
    memcpy(storage, list, total + 1);
    char *p = storage;
    for (;;) {
        char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        if (!ps_market_valid(p, len))
            return UV_EINVAL;
        p[len] = '\0';
        int dup = 0;
        for (int i = 0; i < n && !dup; i++)
            dup = strcmp(out[i], p) == 0;
        if (!dup) {
            if (n == max)
                return UV_E2BIG;
            out[n++] = p;
        }
        if (!comma)
            break;
        p = comma + 1;
    }
    return n;
}
