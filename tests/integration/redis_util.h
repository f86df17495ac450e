/*
 * Helpers of the Redis integration tests (test_redis.c, test_redis_sentinel.c): a link's
 * up/down reports and closing a client. Include after loop_util.h.
 */
#ifndef TESTS_REDIS_UTIL_H
#define TESTS_REDIS_UTIL_H

#include "cm/redis.h"

typedef struct {
    int ups, downs;
    int up; /* last state */
} state_t;

static void on_state(cm_redis_t *r, int up, const char *error, void *ud)
{
    (void)r;
    state_t *s = ud;
    if (up) {
        s->ups++;
        assert_null(error);
    } else {
        s->downs++;
        assert_non_null(error);
    }
    s->up = up;
}

static void close_client(uv_loop_t *loop, cm_redis_t *r)
{
    int before = closed;
    cm_redis_close(r, on_closed, NULL);
    assert_true(run_until(loop, &closed, before + 1, 3000));
}

#endif
