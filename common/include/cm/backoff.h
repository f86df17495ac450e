/*
 * cm/backoff.h: the reconnect delay of every link (Redis, Postgres): capped exponential
 * backoff with jitter.
 *
 * Each failure doubles the base delay up to max_ms; the delay handed out is drawn from
 * [base/2, base] ("equal jitter"), so that replicas which lost a server at the same moment do
 * not come back in lockstep. A link that has proven itself resets the base to min_ms.
 */
#ifndef CM_BACKOFF_H
#define CM_BACKOFF_H

#include <stdint.h>

typedef struct {
    uint64_t min_ms, max_ms;
    uint64_t base_ms; /* the next delay before jitter */
    uint64_t rng;     /* xorshift64 state: jitter only, no quality needed */
} cm_backoff_t;

/* min_ms 0 is taken as 1; max_ms below min_ms as min_ms. `seed` spreads replicas apart (any
 * value; 0 is replaced). */
void cm_backoff_init(cm_backoff_t *b, uint64_t min_ms, uint64_t max_ms, uint64_t seed);

/* The delay to wait before the next attempt, in [base/2, base]; the base then doubles, capped
 * at max_ms. */
uint64_t cm_backoff_next(cm_backoff_t *b);

/* After a success that counts: the next failure waits about min_ms again. */
void cm_backoff_reset(cm_backoff_t *b);

/* A number from the same generator (for callers that need jitter of their own). */
uint64_t cm_backoff_rand(cm_backoff_t *b);

#endif
