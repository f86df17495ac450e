/*
 * election.c: the leader election (election.h): the advisory lock on the LISTEN session, the
 * checks of that session, LISTEN on PG_CHANNEL and the liveness checks while leading. What
 * leading means is the owner's business (its lead, unlead and tick callbacks).
 */
#include "election.h"

#include "cm/error.h"
#include "cm/log.h"
#include "cm/pg.h"

#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define QUERY_TIMEOUT_MS 5000
/* After refusing to lead (a pooler that shares the session), how long before trying again: the
 * answer will not change until someone changes the deployment. */
#define REFUSED_RETRY_MS 30000
/* The channel of the election's LISTEN check behind a pooler (each attempt has its own token). */
#define PROBE_CHANNEL "markets_notifier_probe"

static void set_state(on_election_t *e, on_election_state_t st)
{
    if (e->state == ON_ELECTION_LEADING && st != ON_ELECTION_LEADING) {
        if (!e->stopping)
            cm_log_warn("leadership lost: nothing more is published until the lock is held again",
                        NULL);
        e->cbs.unlead(e->cbs.ud);
    }
    e->state = st;
    cm_gauge_set(e->app->m.leader, st == ON_ELECTION_LEADING ? 1 : 0);
}

/*
 * Checking the session the lock was taken on.
 *
 * A session advisory lock and LISTEN belong to one server backend. A connection pooler in
 * transaction (or statement) mode hands every statement to whichever server connection is free:
 * the lock stays on a server connection that other clients then use, pg_try_advisory_lock is
 * re-entrant there (so a second replica landing on it "gets" the lock too: two leaders), and
 * notifications go to a connection we are not on. Behind a pooler PQbackendPID is the pooler's
 * own made-up key, so it cannot be compared with pg_backend_pid() to tell the modes apart; what
 * does is where statements land:
 *  1. the lock statement also returns pg_backend_pid();
 *  2. a second statement on the LISTEN session must run on that same backend and, when the
 *     lock was granted, see it granted to that backend in pg_locks (a pooler that rotates
 *     server connections fails here);
 *  3. when PQbackendPID differs from that pid (there is a pooler), a statement on one of the
 *     pool's connections (another client of the pooler) must run on another backend: a
 *     transaction pooler gives the connection it just got back to the next client (pgbouncer
 *     reuses the most recently freed one), a session pooler never does while we are connected;
 *  4. while leading, every liveness check returns pg_backend_pid() and must see the same pid;
 *  5. behind a pooler, the session LISTENs on a probe channel and the pool statement of step 3
 *     also NOTIFYs it: the notification must arrive, from that statement's backend, within
 *     NOTIFIER_LIVENESS_MS. Steps 2 and 3 catch a transaction pooler only when other traffic
 *     moves server connections around at the right moment; this one does not depend on luck:
 *     a transaction pooler hands the notification to whichever client is on that server
 *     connection then (we are idle, waiting), so it never arrives.
 * Steps 2, 3 and 5 run for a standby too, once per session, when a pooler sits in between (a
 * standby behind a transaction pooler mostly lands where the lock is not, and would otherwise
 * look healthy). A failed check means refusing to lead (not ready, with the reason) and trying
 * again slowly. On a direct connection the checks cost one statement more per lock taken,
 * none per standby attempt.
 */

static void schedule(on_election_t *e, uint64_t ms);
static void schedule_lock(on_election_t *e, uint64_t ms);
static void start_listen(on_election_t *e);
static void on_timer(uv_timer_t *t);
static void maybe_finish(on_election_t *e);

/* Every answer on the LISTEN session starts the same way: the statement is no longer in
 * flight, and a stop only waited for it. With `same_session` (the checks), an answer about a
 * session that has ended since (and the lock with it) is moot: the election starts over once
 * the session is up. Returns 1 when the caller goes on with the answer. */
static int answer_begins(on_election_t *e, int same_session)
{
    e->op_inflight = 0;
    if (e->stopping) {
        maybe_finish(e);
        return 0;
    }
    if (same_session && e->check_of != e->session) {
        if (e->listen_up)
            schedule(e, 0);
        return 0;
    }
    return 1;
}

static void refused_unlock_done(cm_pg_t *pg, const PGresult *res, int err, void *ud)
{
    (void)pg;
    (void)res;
    (void)err;
    on_election_t *e = ud;
    if (!answer_begins(e, 0))
        return;
    if (e->listen_up)
        schedule(e, REFUSED_RETRY_MS);
}

static void refuse(on_election_t *e, const char *why)
{
    snprintf(e->refused, sizeof e->refused, "%s", why);
    cm_log_error("refusing to lead: the LISTEN session does not keep one server session; the "
                 "notifier needs a session-mode pooler or a direct connection to Postgres (a "
                 "pooler in transaction or statement mode cannot hold the leader lock or LISTEN)",
                 "reason", why, NULL);
    set_state(e, ON_ELECTION_STANDBY);
    if (!e->lock_got) {
        schedule(e, REFUSED_RETRY_MS);
        return;
    }
    /* The lock may sit on a pooled server connection; released there if this lands on it, so
     * that it does not keep a correctly connected replica from leading. */
    const char *params[1] = {e->lock_key};
    if (cm_pg_listen_query(e->app->pg, "SELECT pg_advisory_unlock($1::bigint)", 1, params,
                           QUERY_TIMEOUT_MS, refused_unlock_done, e) == 0)
        e->op_inflight = 1;
    else
        schedule(e, REFUSED_RETRY_MS);
}

/* A check could not run (timeout, session lost): not a verdict, so drop the session and with
 * it the lock where it is ours, and start over. `error` and `detail` are for the log. */
static void check_failed(on_election_t *e, const char *what, const char *error, const char *detail)
{
    cm_log_warn("leader lock check failed; resetting the session", "check", what, "error", error,
                "detail", detail, NULL);
    if (e->listen_up) {
        set_state(e, ON_ELECTION_STANDBY);
        e->pause_on_up = 1; /* a check that keeps failing must not turn into a reconnect loop */
        cm_pg_listen_reset(e->app->pg);
    }
}

static void listen_done(cm_pg_t *pg, const PGresult *res, int err, void *ud)
{
    (void)res;
    on_election_t *e = ud;
    if (!answer_begins(e, 0))
        return;
    if (err) {
        cm_log_error("LISTEN failed; resetting the session", "error", cm_strerror(err), "detail",
                     cm_pg_error_detail(pg), NULL);
        if (e->listen_up)
            cm_pg_listen_reset(e->app->pg);
        return;
    }
    set_state(e, ON_ELECTION_LEADING);
    cm_log_info("leader: listening", "channel", e->app->cfg.pg_channel, NULL);
    e->cbs.lead(e->cbs.ud);
    schedule(e, (uint64_t)e->app->cfg.liveness_ms);
}

/* The lock is ours and the session checked: LISTEN, and lead once it is in. */
static void start_listen(on_election_t *e)
{
    /* Quoted: PG_CHANNEL was validated as a plain identifier, quoting keeps its case. */
    char sql[96];
    snprintf(sql, sizeof sql, "LISTEN \"%s\"", e->app->cfg.pg_channel);
    if (cm_pg_listen_query(e->app->pg, sql, 0, NULL, QUERY_TIMEOUT_MS, listen_done, e) == 0)
        e->op_inflight = 1;
    else
        schedule(e, (uint64_t)e->app->cfg.lock_retry_ms);
}

/* Another replica holds the lock. */
static void stand_by(on_election_t *e, int was_standby)
{
    if (!was_standby)
        cm_log_info("standing by: another replica holds the leader lock", NULL);
    set_state(e, ON_ELECTION_STANDBY);
    schedule_lock(e, (uint64_t)e->app->cfg.lock_retry_ms);
}

/* Every check passed: lead with the lock, or stand by without it. */
static void checks_passed(on_election_t *e)
{
    int was_refused = e->refused[0] != '\0';
    if (was_refused) {
        cm_log_info("the LISTEN session passed the leader lock checks: leading is allowed again",
                    NULL);
        e->refused[0] = '\0';
    }
    e->checked = e->session;
    if (e->lock_got)
        start_listen(e);
    else
        stand_by(e, e->was_standby && !was_refused);
}

static void probe_unlisten_done(cm_pg_t *pg, const PGresult *res, int err, void *ud)
{
    (void)res;
    on_election_t *e = ud;
    if (!answer_begins(e, 1))
        return;
    if (err) {
        check_failed(e, "unlisten", cm_strerror(err), cm_pg_error_detail(pg));
        return;
    }
    checks_passed(e);
}

/* Step 5 is over: the notification came (or the wait ran out, `arrived` 0). */
static void probe_finish(on_election_t *e, int arrived)
{
    e->probe_waiting = 0;
    uv_timer_stop(&e->timer);
    char why[256];
    if (!arrived) {
        snprintf(why, sizeof why,
                 "a NOTIFY sent from another session (backend %d) did not reach the LISTEN "
                 "session within %ld ms: the pooler does not keep LISTEN on our session",
                 e->probe_sender, e->app->cfg.liveness_ms);
        refuse(e, why);
        return;
    }
    if (e->probe_be_pid != e->probe_sender) {
        snprintf(why, sizeof why,
                 "the check's notification came from backend %d, not from %d that sent it",
                 e->probe_be_pid, e->probe_sender);
        refuse(e, why);
        return;
    }
    if (cm_pg_listen_query(e->app->pg, "UNLISTEN " PROBE_CHANNEL, 0, NULL,
                           (uint64_t)e->app->cfg.liveness_ms, probe_unlisten_done, e) == 0)
        e->op_inflight = 1;
    else
        schedule(e, (uint64_t)e->app->cfg.lock_retry_ms);
}

int on_election_probe_notify(on_election_t *e, const char *channel, const char *payload, int be_pid)
{
    if (strcmp(channel, PROBE_CHANNEL) != 0)
        return 0;
    /* Another replica's check, or one of an earlier attempt: not ours. */
    if (e->stopping || !e->probe_token[0] || strcmp(payload, e->probe_token) != 0 ||
        e->probe_be_pid)
        return 1;
    e->probe_be_pid = be_pid;
    if (e->probe_waiting)
        probe_finish(e, 1);
    return 1;
}

static void pool_check_done(cm_pg_t *pg, const PGresult *res, int err, void *ud)
{
    on_election_t *e = ud;
    if (!answer_begins(e, 1))
        return;
    if (err || PQntuples(res) != 1) {
        check_failed(e, "pool", err ? cm_strerror(err) : "no row", cm_pg_error_detail(pg));
        return;
    }
    int sender = atoi(PQgetvalue(res, 0, 0));
    if (sender == e->lock_pid) {
        char why[200];
        snprintf(why, sizeof why,
                 "another client's statement ran on the LISTEN session's backend (pid %d): the "
                 "pooler shares server connections between clients",
                 e->lock_pid);
        refuse(e, why);
        return;
    }
    if (e->lock_got) {
        char pid[16];
        snprintf(pid, sizeof pid, "%d", e->lock_pid);
        cm_log_info("leader lock taken through a connection pooler that keeps the session "
                    "so far; checking that LISTEN works on it",
                    "backend_pid", pid, NULL);
    }
    /* Step 5: the notification may be in already; if not, wait for it, bounded. */
    e->probe_sender = sender;
    if (e->probe_be_pid) {
        probe_finish(e, 1);
        return;
    }
    e->probe_waiting = 1;
    uv_timer_start(&e->timer, on_timer, (uint64_t)e->app->cfg.liveness_ms, 0);
}

/* Step 5 starts: LISTEN on the probe channel, then step 3's statement NOTIFYs it. */
static void probe_listen_done(cm_pg_t *pg, const PGresult *res, int err, void *ud)
{
    (void)res;
    on_election_t *e = ud;
    if (!answer_begins(e, 1))
        return;
    if (err) {
        check_failed(e, "listen", cm_strerror(err), cm_pg_error_detail(pg));
        return;
    }
    snprintf(e->probe_token, sizeof e->probe_token, "%s:%u", e->app->instance, ++e->probe_seq);
    e->probe_sender = e->probe_be_pid = 0;
    const char *params[1] = {e->probe_token};
    if (cm_pg_query(e->app->pg,
                    "SELECT pg_backend_pid() FROM (SELECT pg_notify('" PROBE_CHANNEL "', $1)) AS n",
                    1, params, QUERY_TIMEOUT_MS, pool_check_done, e) == 0)
        e->op_inflight = 1;
    else
        check_failed(e, "pool", cm_strerror(UV_ENOTCONN), "the pool is down");
}

/* Step 2: on the LISTEN session again, the same backend (holding the lock, when granted). */
static void held_done(cm_pg_t *pg, const PGresult *res, int err, void *ud)
{
    on_election_t *e = ud;
    if (!answer_begins(e, 1))
        return;
    if (err || PQntuples(res) != 1 || PQnfields(res) != 2) {
        check_failed(e, "session", err ? cm_strerror(err) : "no row", cm_pg_error_detail(pg));
        return;
    }
    int pid = atoi(PQgetvalue(res, 0, 0));
    long held = atol(PQgetvalue(res, 0, 1));
    char why[200];
    if (pid != e->lock_pid) {
        snprintf(why, sizeof why,
                 "two statements of the LISTEN session ran on two server backends (pid %d, "
                 "then %d)",
                 e->lock_pid, pid);
        refuse(e, why);
        return;
    }
    if (e->lock_got && held < 1) {
        snprintf(why, sizeof why,
                 "the lock taken on backend %d is not held by it (pg_locks) a statement later",
                 pid);
        refuse(e, why);
        return;
    }
    if (cm_pg_listen_backend_pid(e->app->pg) == pid) {
        checks_passed(e); /* the server's own backend: a direct connection */
        return;
    }
    /* Steps 3 and 5: a pooler sits in between (its key is not the server's pid). */
    if (cm_pg_listen_query(e->app->pg, "LISTEN " PROBE_CHANNEL, 0, NULL,
                           (uint64_t)e->app->cfg.liveness_ms, probe_listen_done, e) == 0)
        e->op_inflight = 1;
    else
        schedule(e, (uint64_t)e->app->cfg.lock_retry_ms);
}

static void lock_done(cm_pg_t *pg, const PGresult *res, int err, void *ud)
{
    on_election_t *e = ud;
    if (!answer_begins(e, 0))
        return;
    if (err || !e->listen_up) {
        if (err)
            cm_log_warn("advisory lock query failed", "error", cm_strerror(err), "detail",
                        cm_pg_error_detail(pg), NULL);
        if (e->listen_up) {
            set_state(e, ON_ELECTION_STANDBY);
            schedule_lock(e, (uint64_t)e->app->cfg.lock_retry_ms);
        }
        return;
    }
    e->lock_got = PQntuples(res) == 1 && strcmp(PQgetvalue(res, 0, 0), "t") == 0;
    e->lock_pid = PQntuples(res) == 1 && PQnfields(res) > 1 ? atoi(PQgetvalue(res, 0, 1)) : 0;
    e->was_standby = e->state == ON_ELECTION_STANDBY && !e->refused[0];
    int pooler = cm_pg_listen_backend_pid(e->app->pg) != e->lock_pid;
    if (!e->lock_got && (!pooler || e->checked == e->session)) {
        stand_by(e, e->was_standby);
        return;
    }
    if (e->lock_got)
        e->state =
            ON_ELECTION_LOCKING; /* ours from here on (stop's unlock); leading once checked */
    else
        set_state(e, ON_ELECTION_STANDBY);
    e->check_of = e->session;
    const char *params[1] = {e->lock_key};
    if (cm_pg_listen_query(e->app->pg,
                           "SELECT pg_backend_pid(), count(*) FROM pg_locks WHERE locktype ="
                           " 'advisory' AND granted AND pid = pg_backend_pid() AND"
                           " classid::bigint = ($1::bigint >> 32) & 4294967295 AND"
                           " objid::bigint = $1::bigint & 4294967295 AND objsubid = 1",
                           1, params, (uint64_t)e->app->cfg.liveness_ms, held_done, e) == 0)
        e->op_inflight = 1;
    else
        schedule(e, (uint64_t)e->app->cfg.lock_retry_ms);
}

static void try_lock(on_election_t *e)
{
    if (e->op_inflight || e->probe_waiting || !e->listen_up || e->stopping)
        return;
    const char *params[1] = {e->lock_key};
    /* A standby's lock attempts are its liveness check: a hung server is found as fast as a
     * leader finds it, so the replica reconnects (and is ready to take over) that soon. */
    if (cm_pg_listen_query(e->app->pg, "SELECT pg_try_advisory_lock($1::bigint), pg_backend_pid()",
                           1, params, (uint64_t)e->app->cfg.liveness_ms, lock_done, e) == 0) {
        e->op_inflight = 1;
        if (e->state == ON_ELECTION_DOWN)
            e->state = ON_ELECTION_LOCKING;
    } else {
        schedule_lock(e, (uint64_t)e->app->cfg.lock_retry_ms);
    }
}

/* The next lock attempt: after a refusal, the slow pace holds whatever the caller asked. */
static void schedule_lock(on_election_t *e, uint64_t ms)
{
    schedule(e, e->refused[0] && ms < REFUSED_RETRY_MS ? REFUSED_RETRY_MS : ms);
}

static void liveness_done(cm_pg_t *pg, const PGresult *res, int err, void *ud)
{
    on_election_t *e = ud;
    if (!answer_begins(e, 0))
        return;
    if (err) {
        /* A quiet LISTEN connection is not trusted: reset, reconnect, catch up. */
        cm_log_warn("LISTEN session failed its liveness check; reconnecting", "error",
                    cm_strerror(err), "detail", cm_pg_error_detail(pg), NULL);
        if (e->listen_up)
            cm_pg_listen_reset(e->app->pg);
        return;
    }
    /* Step 4: still the backend that holds the lock (a pooler may move us at any statement). */
    int pid = PQntuples(res) == 1 ? atoi(PQgetvalue(res, 0, 0)) : 0;
    if (e->state == ON_ELECTION_LEADING && pid != e->lock_pid) {
        char why[200];
        snprintf(why, sizeof why,
                 "the LISTEN session moved from server backend %d to %d while leading", e->lock_pid,
                 pid);
        refuse(e, why);
        return;
    }
    schedule(e, (uint64_t)e->app->cfg.liveness_ms);
}

static void on_timer(uv_timer_t *t)
{
    on_election_t *e = t->data;
    if (e->stopping || !e->listen_up)
        return;
    if (e->probe_waiting) {
        probe_finish(e, 0);
        return;
    }
    if (e->op_inflight)
        return;
    if (e->state == ON_ELECTION_LEADING) {
        e->cbs.tick(e->cbs.ud);
        uint64_t timeout = (uint64_t)e->app->cfg.liveness_ms;
        if (cm_pg_listen_query(e->app->pg, "SELECT pg_backend_pid()", 0, NULL, timeout,
                               liveness_done, e) == 0)
            e->op_inflight = 1;
        else
            schedule(e, timeout);
    } else {
        try_lock(e);
    }
}

static void schedule(on_election_t *e, uint64_t ms)
{
    if (!e->stopping)
        uv_timer_start(&e->timer, on_timer, ms, 0);
}

void on_election_listen_state(on_election_t *e, int up)
{
    if (e->stopping)
        return;
    e->listen_up = up;
    e->session++;
    e->probe_waiting = 0; /* a check of the old session: moot */
    cm_gauge_set(e->app->m.pg_listener_up, up ? 1 : 0);
    if (!up) {
        /* The session (and the lock with it) is gone; pending statements fail by themselves. */
        uv_timer_stop(&e->timer);
        set_state(e, ON_ELECTION_DOWN);
        return;
    }
    if (e->refused[0] || e->pause_on_up) {
        /* Refused before: a reconnect does not change the pooler. */
        e->pause_on_up = 0;
        schedule_lock(e, (uint64_t)e->app->cfg.lock_retry_ms);
    } else {
        try_lock(e);
    }
}

const char *on_election_refusal(const on_election_t *e)
{
    return e->refused[0] ? e->refused : NULL;
}

int on_election_is_leader(const on_election_t *e)
{
    return e->state == ON_ELECTION_LEADING;
}

int on_election_listen_up(const on_election_t *e)
{
    return e->listen_up;
}

void on_election_init(on_election_t *e, on_app_t *app, const on_election_cbs_t *cbs)
{
    memset(e, 0, sizeof *e);
    e->app = app;
    e->cbs = *cbs;
    snprintf(e->lock_key, sizeof e->lock_key, "%ld", app->cfg.lock_key);
    uv_timer_init(app->loop, &e->timer);
    e->timer.data = e;
    e->timer_open = 1;
    cm_gauge_set(app->m.leader, 0);
    cm_gauge_set(app->m.pg_listener_up, 0);
}

/* ---- stop --------------------------------------------------------------------------------- */

static void maybe_finish(on_election_t *e)
{
    if (!e->stopping || e->finished || e->timer_open || e->unlock_pending || e->op_inflight)
        return;
    e->finished = 1;
    /* Last: the owner may free `e` in it. */
    e->cbs.stopped(e->cbs.ud);
}

static void unlock_done(cm_pg_t *pg, const PGresult *res, int err, void *ud)
{
    (void)res;
    on_election_t *e = ud;
    e->unlock_pending = 0;
    if (err)
        cm_log_warn("advisory unlock failed (the session end releases it)", "error",
                    cm_strerror(err), "detail", cm_pg_error_detail(pg), NULL);
    else
        cm_log_info("leader lock released", NULL);
    maybe_finish(e);
}

static void timer_closed(uv_handle_t *h)
{
    on_election_t *e = h->data;
    e->timer_open = 0;
    maybe_finish(e);
}

void on_election_stop(on_election_t *e)
{
    if (e->stopping)
        return;
    int held = e->state == ON_ELECTION_LEADING || e->state == ON_ELECTION_LOCKING;
    e->stopping = 1;
    set_state(e, ON_ELECTION_DOWN);
    if (held && e->listen_up) {
        const char *params[1] = {e->lock_key};
        if (cm_pg_listen_query(e->app->pg, "SELECT pg_advisory_unlock($1::bigint)", 1, params, 1000,
                               unlock_done, e) == 0)
            e->unlock_pending = 1;
    }
    uv_close((uv_handle_t *)&e->timer, timer_closed);
}
