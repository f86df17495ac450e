/*
 * cm/pg.h: an asynchronous Postgres client on the libuv loop (libpq non-blocking mode).
 *
 * A cm_pg_t holds a small pool of connections for queries and, when on_notify is set, one
 * dedicated session for LISTEN (and other session-level statements such as advisory locks).
 * Each connection is driven by a uv_poll_t on PQsocket, following the libpq "Asynchronous
 * Command Processing" chapter: PQconnectStartParams + PQconnectPoll, PQsendQueryParams,
 * PQflush, PQconsumeInput / PQisBusy / PQgetResult, PQnotifies after every input.
 *
 * Dead connections fail their in-flight query and reconnect with capped exponential backoff.
 * While no pool connection is up, queries fail at once with UV_ENOTCONN (the caller answers
 * 503 instead of waiting).
 *
 * Failover: DATABASE_URL may list several hosts in libpq's own syntax
 * (postgresql://h1:p1,h2:p2/db?target_session_attrs=read-write). Every connection tries them in
 * that order, each host with its own deadline (connect_timeout_ms, or connect_timeout from the
 * URL), and goes on to the next one when a host refuses, hangs or, under
 * target_session_attrs, is of the wrong kind; only a round where every host failed counts as a
 * failure. A statement answered with SQLSTATE 25006 (read-only transaction: the session landed
 * on a standby) gets that error, and its connection is dropped and opened again.
 *
 * Name resolution: libpq resolves host names with a blocking getaddrinfo inside
 * PQconnectStartParams, on the loop thread. Use hostaddr or an IP address where that matters.
 *
 * Callbacks fire exactly once and never from inside the call that started the work.
 */
#ifndef CM_PG_H
#define CM_PG_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

typedef struct cm_pg cm_pg_t;
struct pg_result;

typedef struct cm_pg_config {
    /* DATABASE_URL: a libpq URI or key=value string, one host or several; borrowed, copied. */
    const char *conninfo;
    int pool_size;                /* connections for queries; default 4 */
    uint64_t connect_timeout_ms;  /* one host's connect deadline, ms; default 2000 (see above) */
    uint64_t backoff_min_ms;      /* reconnect delay after the first failure, ms; default 100 */
    uint64_t backoff_max_ms;      /* cap of the doubling delay (with jitter), ms; default 5000 */
    int keepalive_idle_s;         /* libpq keepalives_idle, s; default 5 (interval 2, count 3) */
    const char *application_name; /* borrowed, copied; may be NULL */
    /* Optional: when set, a dedicated LISTEN connection is opened. channel and payload are
     * borrowed for the call. Statements such as LISTEN go through cm_pg_listen_query (they
     * must be issued again by the caller after every reconnect: on_state tells when). Only
     * notifications that arrive on the LISTEN connection are delivered: behind a transaction
     * pooler a pool connection can carry another client's, and none of them is ours. */
    void (*on_notify)(cm_pg_t *pg, const char *channel, const char *payload, int be_pid, void *ud);
    /* Up/down transitions, each reported once. `listen` is 0 for the pool (up = at least one
     * pool connection is up) and 1 for the LISTEN connection. `error` is libpq's reason for
     * the loss, for logs (a transition is not an outcome of a request: no code), borrowed,
     * NULL when up. May be NULL. */
    void (*on_state)(cm_pg_t *pg, int listen, int up, const char *error, void *ud);
    void *ud;
} cm_pg_config_t;

/* Fills `cfg` with the defaults above (conninfo NULL, no callbacks). */
void cm_pg_config_defaults(cm_pg_config_t *cfg);

/* Creates the client and starts connecting every connection. `cfg` is borrowed (copied).
 * *out is set on success; release with cm_pg_close. Returns 0, UV_EINVAL (bad conninfo or
 * config) or UV_ENOMEM. on_state fires later, from the loop. */
int cm_pg_open(uv_loop_t *loop, const cm_pg_config_t *cfg, cm_pg_t **out);

/* cm_config_check_fn for DATABASE_URL: 0 when libpq's PQconninfoParse accepts `conninfo`
 * (a URI or key=value string) and its ports and host lists make sense, else UV_EINVAL with the
 * reason (libpq's message, password redacted) in `why` (whysz bytes). */
int cm_pg_conninfo_check(const char *conninfo, char *why, size_t whysz);

/* Non-zero when at least one pool connection is up. */
int cm_pg_is_up(const cm_pg_t *pg);
/* Non-zero when the LISTEN connection is up. */
int cm_pg_listen_is_up(const cm_pg_t *pg);
/* The backend process id the server gave the LISTEN session when it connected (PQbackendPID),
 * 0 while that session is down. Behind a connection pooler this is the pooler's, not the
 * server's: comparing it with pg_backend_pid() tells whether the session is direct. */
int cm_pg_listen_backend_pid(const cm_pg_t *pg);

/* Result callback: fires exactly once, never synchronously. `err` follows cm/error.h:
 *   0             the statement succeeded; `res` is its result.
 *   UV_ETIMEDOUT  not answered within timeout_ms (queued or in flight).
 *   UV_ENOTCONN   no connection to run it on, or the connection was lost under it.
 *   UV_ECANCELED  the client is closing (cm_pg_close).
 *   CM_EREADONLY  SQLSTATE 25006: the session sits on a read-only server (see above).
 *   CM_ESERVER    any other error the server answered the statement with.
 *   CM_EPROTO     libpq could not make sense of the answer.
 *   UV_EINVAL     libpq refused to send the statement (its parameters).
 * `res` is borrowed (PQclear'd after the callback returns). It is NULL for the codes of the
 * client's own making (timeout, no connection, closing); for CM_EREADONLY and CM_ESERVER it is
 * the PGRES_FATAL_ERROR result, so PG_DIAG_SQLSTATE and the other fields can be read.
 * Text: cm_strerror(err) names the code; cm_pg_error_detail(pg) gives the words behind it. */
typedef void (*cm_pg_result_fn)(cm_pg_t *pg, const struct pg_result *res, int err, void *ud);

/* Inside a result callback with err != 0: the server's or libpq's own message about it, on one
 * line (the server's error message, libpq's reason for a lost connection, "statement timeout
 * after 500 ms"), or cm_strerror(err) when there is nothing more to say; for logs, not for
 * deciding (decide on `err`). Borrowed until the callback returns. "" for a success, outside a
 * callback, and for a NULL `pg`. */
const char *cm_pg_error_detail(const cm_pg_t *pg);

/* Runs a parameterised statement (text params, text results: numeric stays a string exactly as
 * stored). One statement per call (extended protocol). sql and params are borrowed (copied
 * before return); a NULL param is SQL NULL. cb is required; ud is passed back.
 * Queued while every pool connection is busy. timeout_ms counts from this call, 0 = none; a
 * statement not answered in time gets UV_ETIMEDOUT and its connection is dropped and
 * reopened (PQcancel is blocking). Returns 0 (cb will fire), UV_ENOTCONN when no pool
 * connection is up, UV_EBUSY when 10000 statements are already queued, UV_EINVAL or UV_ENOMEM
 * (cb will not fire). */
int cm_pg_query(cm_pg_t *pg, const char *sql, int nparams, const char *const *params,
                uint64_t timeout_ms, cm_pg_result_fn cb, void *ud);

/* Same, on the dedicated LISTEN session (LISTEN, pg_try_advisory_lock...). Statements run one
 * at a time, in order. Returns UV_ENOTCONN when that session is down, UV_EINVAL when on_notify
 * was not configured. */
int cm_pg_listen_query(cm_pg_t *pg, const char *sql, int nparams, const char *const *params,
                       uint64_t timeout_ms, cm_pg_result_fn cb, void *ud);

/* Drops and reopens the LISTEN session (liveness check failed, leadership lost...): its pending
 * statements get UV_ENOTCONN ("connection lost: reset"), on_state(listen=1, up=0) fires, then up
 * again. */
void cm_pg_listen_reset(cm_pg_t *pg);

/* Copies the counters for metrics into the caller's `out`. */
typedef struct cm_pg_stats {
    uint64_t reconnects; /* successful connects after each connection's first one */
    uint64_t timeouts;   /* statements answered UV_ETIMEDOUT */
    uint64_t errors;     /* failed connect attempts and lost connections */
    uint64_t queued;     /* statements waiting for a free pool connection now */
} cm_pg_stats_t;
void cm_pg_stats(const cm_pg_t *pg, cm_pg_stats_t *out);

/* Closes: pending statements get UV_ECANCELED (from the loop), then `done(ud)` (may be
 * NULL) fires once after every handle closed and the object was freed. `pg` must not be used
 * after this call. Safe to call from any callback of this client. */
void cm_pg_close(cm_pg_t *pg, void (*done)(void *ud), void *ud);

#endif
