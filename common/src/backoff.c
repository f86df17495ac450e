#include "cm/backoff.h"

void cm_backoff_init(cm_backoff_t *b, uint64_t min_ms, uint64_t max_ms, uint64_t seed)
{
    b->min_ms = min_ms ? min_ms : 1;
    b->max_ms = max_ms < b->min_ms ? b->min_ms : max_ms;
    b->base_ms = b->min_ms;
    b->rng = seed ? seed : 0x9e3779b97f4a7c15ull;
}

uint64_t cm_backoff_rand(cm_backoff_t *b)
{
    uint64_t x = b->rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    b->rng = x;
    return x;
}

uint64_t cm_backoff_next(cm_backoff_t *b)
{
    uint64_t d = b->base_ms;
    b->base_ms = d > b->max_ms / 2 ? b->max_ms : d * 2;
    if (d > 1)
        d = d / 2 + cm_backoff_rand(b) % (d / 2 + 1);
    return d;
}

void cm_backoff_reset(cm_backoff_t *b)
{
    b->base_ms = b->min_ms;
}
