/*
 * leader.h: the publishing side of the notifier: leader election, LISTEN, catch-up, PUBLISH.
 *
 * Exactly one replica publishes: the one holding the Postgres advisory lock
 * (pg_try_advisory_lock, session level) on its LISTEN session. The others retry the lock every
 * NOTIFIER_LOCK_RETRY_MS and take over as soon as the leader's session ends (Postgres releases
 * a session lock when the backend exits, including when the leader's process dies).
 *
 * The leader LISTENs on PG_CHANNEL and publishes through one ordered pipeline: events go to
 * Redis in the order Postgres delivered their notifications. A notification that carries only
 * an id (its payload was over the NOTIFY limit) holds the events behind it until its row has
 * been read and published, so an order's `filled` never overtakes its `partially_filled`.
 * After every (re)start of leadership it reads `order_events` of the last
 * NOTIFIER_CATCHUP_LOOKBACK_MS through the outbox reader (by time, not `id > last`: ids commit
 * out of order) while holding the notifications that arrive meanwhile, and merges the two in
 * id order (gate.h); what it published already in this term is skipped (a set of the ids of
 * the look-back window). A quiet LISTEN session is checked by a liveness query every
 * NOTIFIER_LIVENESS_MS; on failure it is reset, and leadership with it: the queue is dropped,
 * nothing more is published until the lock is held again.
 *
 * How long an old leader may go on publishing. Postgres releases the lock when the leader's
 * backend ends, and a new leader can take it from then on. A leader that sees its session end
 * (the server stopped, failed over, killed the backend) drops its queue at once, before its
 * lock could be anyone else's. A leader cut off without seeing it (a partition, a hung server)
 * learns at its next liveness check: one is sent every NOTIFIER_LIVENESS_MS and fails after
 * another NOTIFIER_LIVENESS_MS, so it stops at most 2 x NOTIFIER_LIVENESS_MS after losing the
 * server; a new leader on the promoted server may overlap with it for that long, and what the
 * old one still sends then is a repeat that receivers drop. PUBLISHes already written to Redis
 * are not taken back.
 *
 * The lock must be held by one server session (election.c, "Checking the session"): after taking
 * it the notifier checks that its LISTEN session stays on the backend that holds the lock and,
 * behind a pooler, that no other client lands on that backend (a standby behind a pooler is
 * checked the same way at each attempt). A pooler in transaction or statement mode fails that:
 * the replica then refuses to lead (an error in the log, /readyz 503 with the reason) and tries
 * again every 30 s.
 *
 * Redis: one link, commands in order, so replies come back in order. What Redis did not confirm
 * before a link failure is sent again first, in its order, when the link is back; subscribers
 * drop the repeats of what it had delivered after all (their id sets cover the look-back).
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
/* A notification of the election's own LISTEN check (election.c, step 5): returns 1 when it is
 * one (consumed), 0 for any other channel. Borrowed arguments; `be_pid` is libpq's. */
int on_leader_probe_notify(on_leader_t *l, const char *channel, const char *payload, int be_pid);
/* A notification from the LISTEN session; `channel` and `payload` are borrowed. */
void on_leader_notify(on_leader_t *l, const char *channel, const char *payload);
/* The publishing Redis link came up: resend what failed meanwhile. */
void on_leader_redis_up(on_leader_t *l);

/* Non-zero while this replica holds the lock and LISTENs. */
int on_leader_is_leader(const on_leader_t *l);
/* Non-zero while the LISTEN session is up (leader or standing by). */
int on_leader_listen_up(const on_leader_t *l);
/* Why this replica refuses to lead (a transaction-mode pooler), or NULL. Borrowed. */
const char *on_leader_refusal(const on_leader_t *l);

/*
 * Stops: releases the advisory lock when held and the session is up (pg_advisory_unlock), stops
 * the timer, then calls done(ud) from the loop and frees `l`. Pending catch-up and fetch
 * queries still complete through cm_pg before pg is closed (their results are dropped).
 */
void on_leader_stop(on_leader_t *l, void (*done)(void *ud), void *ud);

#endif
