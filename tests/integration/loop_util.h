/*
 * Helpers shared by the integration tests (one test binary per .c file includes this once):
 * run a loop until a counter moves, finish it, count close callbacks, and stop or start the
 * throw-away servers through scripts/servers.sh (MARKETS_SERVERS_DIR).
 */
#ifndef TESTS_LOOP_UTIL_H
#define TESTS_LOOP_UTIL_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

static void tick(uv_timer_t *t)
{
    (void)t;
}

/* Runs the loop until *flag >= want or `ms` passed. Returns 1 when the flag got there. */
static int run_until(uv_loop_t *loop, const int *flag, int want, uint64_t ms)
{
    uv_timer_t ticker;
    uv_timer_init(loop, &ticker);
    uv_timer_start(&ticker, tick, 5, 5);
    uint64_t end = uv_now(loop) + ms;
    while (*flag < want && uv_now(loop) < end)
        uv_run(loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&ticker, NULL);
    uv_run(loop, UV_RUN_NOWAIT);
    return *flag >= want;
}

static void run_for(uv_loop_t *loop, uint64_t ms)
{
    int never = 0;
    run_until(loop, &never, 1, ms);
}

/* Runs what is left (close callbacks) and closes the loop: every handle must be gone. Needs
 * cmocka.h included first. */
static inline void finish_loop(uv_loop_t *loop)
{
    uv_run(loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(loop), 0);
}

static int closed;
static void on_closed(void *ud)
{
    (void)ud;
    closed++;
}

/* Runs `scripts/servers.sh <what> $MARKETS_SERVERS_DIR [extra]` of this source tree (extra may
 * be NULL). Returns the command's status (0 on success). */
static int servers_ctl_with(const char *what, const char *extra)
{
    const char *dir = getenv("MARKETS_SERVERS_DIR");
    char cmd[1024];
    if (!dir)
        return -1;
    snprintf(cmd, sizeof cmd, "%s/scripts/servers.sh %s %s %s >/dev/null 2>&1", MARKETS_SOURCE_DIR,
             what, dir, extra ? extra : "");
    return system(cmd);
}

static inline int servers_ctl(const char *what)
{
    return servers_ctl_with(what, NULL);
}

#endif
