/*
 * leader.h: the publishing side of the notifier: leader election, LISTEN, catch-up, PUBLISH.
 *
 * Exactly one replica publishes: the one holding the Postgres advisory lock
 * (pg_try_advisory_lock, session level) on its LISTEN session. The others retry the lock every
 * NOTIFIER_LOCK_RETRY_MS and take over as soon as the leader's session ends (Postgres releases
 * a session lock when the backend exits, including when the leader's process dies).
 *
 * The leader LISTENs on PG_CHANNEL, and after every (re)start of leadership it reads
 * `order_events` of the last NOTIFIER_CATCHUP_LOOKBACK_MS (by time, not `id > last`: ids commit
 * out of order) and publishes what it has not published yet (a set of recent ids). A quiet
 * LISTEN session is checked by a liveness query every NOTIFIER_LIVENESS_MS; on failure it is
 * reset. Publishes that fail while Redis is down are kept (bounded) and sent again when Redis
 * is back: the events are in the outbox too, so subscribers de-duplicate by id.
 */
#ifndef ON_LEADER_H
#define ON_LEADER_H

#include "app.h"

typedef struct on_leader on_leader_t;

/* Creates the leader state machine for `app` (borrowed; app->pg and app->redis_pub must exist).
 * Returns 0 and *out, or UV_ENOMEM. It starts working on the first on_leader_listen_state(up). */
int on_leader_new(on_app_t *app, on_leader_t **out);

/* The LISTEN session went up or down (from cm_pg's on_state with listen=1). */
void on_leader_listen_state(on_leader_t *l, int up);
/* A notification from the LISTEN session; `channel` and `payload` are borrowed. */
void on_leader_notify(on_leader_t *l, const char *channel, const char *payload);
/* The publishing Redis link came up: resend what failed meanwhile. */
void on_leader_redis_up(on_leader_t *l);

/* Non-zero while this replica holds the lock and LISTENs. */
int on_leader_is_leader(const on_leader_t *l);
/* Non-zero while the LISTEN session is up (leader or standing by). */
int on_leader_listen_up(const on_leader_t *l);

/*
 * Stops: releases the advisory lock when held and the session is up (pg_advisory_unlock), stops
 * the timer, then calls done(ud) from the loop and frees `l`. Pending catch-up and fetch
 * queries still complete through cm_pg before pg is closed (their results are dropped).
 */
void on_leader_stop(on_leader_t *l, void (*done)(void *ud), void *ud);

#endif
