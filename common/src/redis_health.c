/*
 * redis_health.c: is the Redis link alive? Progress and stall detection (see
 * redis_internal.h), the own deadlines of commands and PINGs, and the probes: the idle health
 * PING (ROLE in Sentinel mode) and the PINGs of cm_redis_ping.
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "redis_internal.h"

/* The server owes us something: a command (answered to its caller or not) or a probe. */
static int link_busy(const cm_redis_t *r)
{
    return r->pending.n || r->late.n || r->probes_sent != r->probes_acked;
}

/* Called before new work is queued: on an idle link the stall window opens only once that
 * work is written, since commands queued during a long loop turn wait in hiredis' buffer
 * until the poll phase, and that wait is ours, not the server's. */
void redis_work_starting(cm_redis_t *r)
{
    if (link_busy(r))
        return;
    r->progress_ms = uv_now(r->loop);
    r->await_wire = 1;
    r->suspect = 0;
}

void redis_on_readable(void *data)
{
    cm_redis_t *r = data;
    /* Bytes count, not whole replies: a large reply read over many turns is progress too. */
    uint64_t now = uv_now(r->loop);
    r->rx_events++;
    r->last_rx_ms = now;
    r->progress_ms = now;
}

void redis_on_writable(void *data)
{
    cm_redis_t *r = data;
    r->tx_events++;
    if (r->await_wire && r->link == LINK_UP) {
        r->await_wire = 0;
        r->progress_ms = uv_now(r->loop);
        redis_arm_cmd_timer(r);
    }
}

void redis_probe_acked(cm_redis_t *r)
{
    r->probes_acked++;
    if (r->probes_acked != r->probes_sent)
        return;
    uint64_t now_ns = uv_hrtime();
    r->stats.last_ping_ms = (double)(now_ns - r->probe_start_ns) / 1e6;
    cmd_t *c;
    while ((c = r->pings.head) != NULL) {
        redis_list_remove(&r->pings, c);
        double ms = (double)(now_ns - c->start_ns) / 1e6;
        if (c->ping_cb)
            c->ping_cb(r, CM_REDIS_OK, ms, c->ud);
        redis_cmd_put(r, c);
    }
}

static void on_probe_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    cm_redis_t *r = privdata;
    if (ac != r->ac || r->closing)
        return;
    if (!reply) {
        redis_link_lost(r, ac, ac->errstr);
        return;
    }
    /* Sentinel mode probes with ROLE: a master demoted behind our back still answers, and
     * still takes PUBLISH without an error. */
    const char *role = r->sentinel ? redis_role_of(reply) : "master";
    char why[64];
    snprintf(why, sizeof why, "ROLE says %s", role ? role : "nothing");
    redis_probe_acked(r);
    if ((!role || strcmp(role, "master") != 0) && ac == r->ac)
        redis_reresolve(r, why);
}

/* Sends a probe unless one is already outstanding. Returns 0 or UV_ENOTCONN. */
int redis_send_probe(cm_redis_t *r)
{
    if (r->probes_sent != r->probes_acked)
        return 0;
    redis_work_starting(r);
    int rc;
    if (r->ac->c.flags & REDIS_SUBSCRIBED)
        rc = redisAsyncCommand(r->ac, redis_on_sub_reply, r, "SUBSCRIBE " HEALTH_CHANNEL);
    else
        rc = redisAsyncCommand(r->ac, on_probe_reply, r, r->sentinel ? "ROLE" : "PING");
    if (rc != REDIS_OK)
        return UV_ENOTCONN;
    r->probes_sent++;
    r->probe_start_ns = uv_hrtime();
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Deadlines and stalls                                                                        */

/* A deadline far enough away never comes (UINT64_MAX is "not armed"), instead of wrapping. */
uint64_t redis_deadline_after(uint64_t now, uint64_t timeout_ms)
{
    return timeout_ms < UINT64_MAX - now ? now + timeout_ms : UINT64_MAX;
}

static uint64_t late_slack(uint64_t timeout_ms)
{
    return timeout_ms / 2 > LATE_SLACK_MIN_MS ? timeout_ms / 2 : LATE_SLACK_MIN_MS;
}

/* The loop was busy: whatever was due may be sitting unread in the socket, or not even
 * written. Every clock starts over from now and the poll phase runs before anything is
 * judged. */
static void restart_clocks(cm_redis_t *r, uint64_t now)
{
    for (size_t i = 0; i < r->heap_n; i++)
        r->heap[i]->deadline_ms = redis_deadline_after(now, r->heap[i]->timeout_ms);
    for (size_t i = r->heap_n / 2; i-- > 0;)
        redis_heap_down(r, i);
    for (cmd_t *c = r->pings.head; c; c = c->next)
        c->sent_ms = now;
    r->progress_ms = now;
    r->suspect = 0;
}

static void on_cmd_timer(uv_timer_t *t)
{
    cm_redis_t *r = t->data;
    uint64_t now = uv_now(r->loop);
    uint64_t to = r->cfg.timeout_ms;
    uint64_t due = r->cmd_due_ms;
    cmd_t *c;

    r->cmd_due_ms = UINT64_MAX;
    if (r->closing || r->link != LINK_UP)
        return;
    /* libuv runs timers before it polls sockets, so a timer firing long after its due time
     * means the loop was busy, not that the server was slow. */
    if (now > due + r->cmd_slack_ms) {
        restart_clocks(r, now);
        redis_arm_cmd_timer(r);
        return;
    }
    while (r->heap_n && (c = r->heap[0])->deadline_ms <= now) {
        if (c->sent_tx == r->tx_events) {
            /* Not even written yet: it waited for our loop, not for the server. If the socket
             * stays unwritable, the stall window ends the wait. */
            c->deadline_ms = redis_deadline_after(now, c->timeout_ms);
            redis_heap_down(r, 0);
            continue;
        }
        /* The caller gives up on this one; the link does not. */
        redis_heap_remove(r, c);
        redis_list_remove(&r->pending, c);
        c->state = CMD_LATE;
        redis_list_push(&r->late, c);
        r->stats.timeouts++;
        redis_cmd_finish(r, c, NULL, UV_ETIMEDOUT);
        if (r->closing || r->link != LINK_UP)
            return; /* the callback closed the client */
    }
    while ((c = r->pings.head) != NULL && c->sent_ms + to <= now) {
        redis_list_remove(&r->pings, c);
        r->stats.timeouts++;
        if (c->ping_cb)
            c->ping_cb(r, UV_ETIMEDOUT, 0, c->ud);
        redis_cmd_put(r, c);
        if (r->closing || r->link != LINK_UP)
            return;
    }
    if (link_busy(r) && !r->await_wire && r->progress_ms + to <= now) {
        if (!r->suspect) {
            /* Reads stamped at the start of a long poll phase look older than they are, and
             * the server may have answered while this turn ran: look once more. */
            r->suspect = 1;
            r->suspect_due_ms = now + 1;
            r->suspect_rx = r->rx_events;
            r->suspect_tx = r->tx_events;
            redis_arm_cmd_timer(r);
            return;
        }
        if (r->rx_events == r->suspect_rx && r->tx_events == r->suspect_tx) {
            char msg[96];
            snprintf(msg, sizeof msg, "server stalled: no reply for %" PRIu64 " ms",
                     now - r->progress_ms);
            r->stats.stalls++;
            r->stats.last_stall_ms = now;
            redis_drop_link(r, msg);
            return;
        }
        /* We wrote meanwhile: the server may have been waiting for those bytes. */
        r->progress_ms = now;
    }
    r->suspect = 0;
    redis_arm_cmd_timer(r);
}

void redis_arm_cmd_timer(cm_redis_t *r)
{
    uint64_t to = r->cfg.timeout_ms;
    uint64_t due = UINT64_MAX, slack = late_slack(to);
    if (r->link == LINK_UP && !r->closing) {
        if (r->heap_n) {
            due = r->heap[0]->deadline_ms;
            slack = late_slack(r->heap[0]->timeout_ms);
        }
        uint64_t other = UINT64_MAX;
        if (r->pings.head)
            other = r->pings.head->sent_ms + to;
        if (r->suspect && r->suspect_due_ms < other)
            other = r->suspect_due_ms;
        else if (!r->suspect && link_busy(r) && !r->await_wire && r->progress_ms + to < other)
            other = r->progress_ms + to;
        if (other < due) {
            due = other;
            slack = late_slack(to);
        }
    }
    if (due == UINT64_MAX) {
        uv_timer_stop(&r->cmd_timer);
        r->cmd_due_ms = UINT64_MAX;
        return;
    }
    uint64_t now = uv_now(r->loop);
    r->cmd_due_ms = due > now ? due : now;
    r->cmd_slack_ms = slack;
    uv_timer_start(&r->cmd_timer, on_cmd_timer, due > now ? due - now : 0, 0);
}

static void on_health_timer(uv_timer_t *t)
{
    cm_redis_t *r = t->data;
    if (r->closing || r->link != LINK_UP)
        return;
    uint64_t now = uv_now(r->loop);
    /* Sentinel mode: the ROLE probe goes out busy or not, since commands that are not writes
     * (PUBLISH) keep working on a demoted master. */
    if (r->sentinel && !(r->ac->c.flags & REDIS_SUBSCRIBED)) {
        redis_send_probe(r);
        return;
    }
    /* Only while idle: owed work already watches the link through the stall window. */
    if (link_busy(r) || now - r->last_rx_ms < r->cfg.health_interval_ms)
        return;
    redis_send_probe(r);
}

void redis_health_start(cm_redis_t *r)
{
    if (r->cfg.health_interval_ms)
        uv_timer_start(&r->health_timer, on_health_timer, r->cfg.health_interval_ms,
                       r->cfg.health_interval_ms);
}
