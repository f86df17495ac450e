/*
 * backend.h: the cache's backend on the real Redis client and the Postgres origin.
 */
#ifndef PS_BACKEND_H
#define PS_BACKEND_H

#include <stdint.h>
#include <uv.h>

#include "cache.h"

struct cm_redis;
struct cm_pg;
struct cm_metrics;

typedef struct ps_backend ps_backend_t;

/*
 * Wraps `redis` and `pg` (both borrowed; they must outlive the backend) into a
 * ps_cache_backend_t written to *ops. Origin fetches read oracle_prices with a deadline of
 * `origin_timeout_ms` and record origin_requests_total{result} and
 * origin_request_duration_seconds into `metrics` (borrowed, may be NULL). Refresh locks
 * (ops->lock) carry a random instance token. Returns NULL on allocation failure.
 */
/* Hex digits of the instance token, the value of the refresh locks this instance takes. */
#define PS_BACKEND_TOKEN_LEN 16

ps_backend_t *ps_backend_new(uv_loop_t *loop, struct cm_redis *redis, struct cm_pg *pg,
                             uint64_t origin_timeout_ms, struct cm_metrics *metrics,
                             ps_cache_backend_t *ops);
/* The instance token (PS_BACKEND_TOKEN_LEN hex digits), for the start-up log. */
const char *ps_backend_token(const ps_backend_t *b);
void ps_backend_free(ps_backend_t *b);

#endif
