/*
 * election.h: which replica leads: the Postgres advisory lock on the LISTEN session, the
 * checks that the session is one server session (no transaction pooler in between), LISTEN on
 * PG_CHANNEL, and the liveness checks while leading (leader.h tells the whole story).
 *
 * The election knows nothing of what leading means: it tells its owner through callbacks
 * (lead, unlead, tick), and the owner (leader.c, the publish pipeline) only calls in. The owner
 * embeds the on_election_t and keeps it until `stopped` fired.
 */
#ifndef ON_ELECTION_H
#define ON_ELECTION_H

#include <uv.h>

#include "app.h"

typedef enum {
    ON_ELECTION_DOWN = 0, /* no LISTEN session */
    ON_ELECTION_LOCKING,  /* trying the lock, or holding it while the checks run */
    ON_ELECTION_STANDBY,  /* another replica holds it, or this one refuses to lead */
    ON_ELECTION_LEADING,  /* lock held, checks passed, LISTEN in */
} on_election_state_t;

typedef struct on_election_cbs {
    /* Leading from now on (the lock is held and PG_CHANNEL LISTENed to). */
    void (*lead)(void *ud);
    /* Leading is over (session lost, a check failed, stopping): nothing more may go out. */
    void (*unlead)(void *ud);
    /* Every liveness check while leading: a chance to retry what waits for the next one. */
    void (*tick)(void *ud);
    /* After on_election_stop: nothing is in flight any more and the timer is closed; the
     * election is not touched again, so its memory may go. Fires once. */
    void (*stopped)(void *ud);
    void *ud;
} on_election_cbs_t;

/* Members are private to election.c (embedded by the owner, libuv style). */
typedef struct on_election {
    on_app_t *app;
    on_election_cbs_t cbs;
    uv_timer_t timer; /* lock retry (standby), liveness (leader), probe wait */
    on_election_state_t state;
    int listen_up;
    int op_inflight; /* a lock, check or liveness statement on the LISTEN session */
    int stopping;
    int unlock_pending;
    int timer_open;
    int finished; /* `stopped` fired */
    char lock_key[24];

    /* Checks of the session the lock was taken on (election.c, "Checking the session"). */
    int lock_pid;      /* pg_backend_pid() of the statement that took the lock */
    unsigned session;  /* bumps on every LISTEN session up or down */
    unsigned check_of; /* `session` when the lock was taken: later answers must match */
    int pause_on_up;   /* a check failed: the next session waits lock_retry_ms to lock */
    int lock_got;      /* the last lock attempt was granted */
    int was_standby;   /* standing by before the last lock attempt (logged already) */
    unsigned checked;  /* `session` whose checks all passed (0: none): a standby's next attempts
                          skip them */
    /* The LISTEN check (step 5): a NOTIFY from a pool connection must reach the session. */
    char probe_token[48];
    unsigned probe_seq;
    int probe_sender;  /* pg_backend_pid() of the pool statement that sent it; 0: not yet */
    int probe_be_pid;  /* be_pid of the notification received; 0: not yet */
    int probe_waiting; /* sent, the notification not in yet: the timer bounds the wait */
    char refused[256]; /* why this replica refuses to lead; "" when it does not */
} on_election_t;

/* Sets `e` up for `app` (borrowed; app->pg must exist) and the owner's callbacks (copied). It
 * starts working on the first on_election_listen_state(up). Cannot fail. */
void on_election_init(on_election_t *e, on_app_t *app, const on_election_cbs_t *cbs);

/* The LISTEN session went up or down (cm_pg's on_state with listen=1). */
void on_election_listen_state(on_election_t *e, int up);
/* A notification of the election's own LISTEN check (step 5): 1 when it is one (consumed), 0
 * for any other channel. Borrowed arguments; `be_pid` is libpq's. */
int on_election_probe_notify(on_election_t *e, const char *channel, const char *payload,
                             int be_pid);

int on_election_is_leader(const on_election_t *e);
/* Non-zero while the LISTEN session is up. */
int on_election_listen_up(const on_election_t *e);
/* Why this replica refuses to lead, or NULL. Borrowed. */
const char *on_election_refusal(const on_election_t *e);

/* Stops: unlead fires when leading; the lock, when held, is released (pg_advisory_unlock) if the
 * session is up; `stopped` fires from the loop once that and every statement in flight are
 * answered and the timer has closed. */
void on_election_stop(on_election_t *e);

#endif
