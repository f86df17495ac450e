/*
 * pg_internal.h: what the files of the Postgres client (pg.c, pg_conn.c, pg_query.c,
 * pg_target.c) share. Private to common/src; the public interface is cm/pg.h.
 */
#ifndef CM_PG_INTERNAL_H
#define CM_PG_INTERNAL_H

#include <libpq-fe.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "cm/backoff.h"
#include "cm/pg.h"

#define QUEUE_MAX 10000

typedef struct query query_t;
typedef struct queue queue_t;
struct query {
    query_t *next, *prev;
    queue_t *owner; /* the queue holding it, NULL when in flight */
    cm_pg_result_fn cb;
    void *ud;
    uint64_t deadline_ms; /* loop time; 0 = none */
    uint64_t timeout_ms;
    int nparams;
    const char *sql;           /* inside this block */
    const char *const *params; /* inside this block */
    int err;                   /* code to deliver from the failed list */
    char detail[200];          /* and its words (cm_pg_error_detail), "" for none */
};

struct queue {
    query_t *head, *tail;
    size_t len;
};

/* C_BROKEN: found dead inside a user call; dropped from the loop on the next turn. */
typedef enum { C_DOWN = 0, C_CONNECTING, C_IDLE, C_BUSY, C_BROKEN } cstate_t;

typedef struct conn conn_t;

typedef struct poller {
    uv_poll_t handle;
    cm_pg_t *pg;
    conn_t *c; /* NULL once detached (closing) */
} poller_t;

struct conn {
    cm_pg_t *pg;
    int listen; /* 1 for the LISTEN session */
    int index;
    PGconn *pq;
    poller_t *poller;
    int fd;
    int events;
    cstate_t state;
    int flushing;  /* output not yet fully sent: wait for writable too */
    int resetting; /* reopening after our own reset (timeout): still counts as available */
    uint64_t gen;  /* bumped on every teardown: callbacks compare it */
    query_t *q;    /* in flight */
    PGresult *res; /* last result of the statement in flight */
    char broken_err[200];
    cm_backoff_t backoff;
    int ever_up;
    uint64_t last_rx_ms; /* loop time input was last consumed */
    int target;          /* host of DATABASE_URL being tried (index into pg->targets) */
    int tried;           /* hosts tried in this round */
    int on_target;       /* host of the session, while up */
    int move;            /* on another host than the newest session: reopen when idle */
    int read_only;       /* dropped for SQLSTATE 25006: keep backing off across reconnects */
    char round_err[512]; /* what each host answered in this round of attempts */
    uv_timer_t timer;
};

/* One host of DATABASE_URL: what libpq gets as host, hostaddr and port for one attempt (NULL:
 * the keyword is not given). */
typedef struct target {
    const char *host, *hostaddr, *port;
} target_t;

struct cm_pg {
    uv_loop_t *loop;
    cm_pg_config_t cfg;
    char *conninfo;
    char *app_name;
    char keepalive_idle[16];
    PQconninfoOption *opts; /* DATABASE_URL parsed, libpq's allocation */
    target_t *targets;      /* one per host, in the URL's order */
    int ntargets;
    char *target_buf;         /* the split lists the targets point into */
    const char **kw, **val;   /* keyword arrays of an attempt, rebuilt for each */
    uint64_t host_timeout_ms; /* deadline of one attempt at one host */
    int last_target;          /* host of the newest session: where a round starts */
    conn_t *pool;
    int npool;
    conn_t *lconn;  /* NULL without on_notify */
    queue_t queue;  /* pool statements waiting for an idle connection */
    queue_t lqueue; /* LISTEN session statements waiting their turn */
    queue_t failed; /* to deliver from the defer timer */
    int reported;   /* pool: -1 none yet, 0 down, 1 up */
    int lreported;  /* LISTEN session */
    cm_pg_stats_t stats;
    /* What cm_pg_error_detail answers while a result callback runs. */
    int cb_err;
    const char *cb_detail;
    uv_timer_t queue_timer;
    uint64_t queue_due; /* when queue_timer fires; 0 = stopped */
    uv_timer_t defer_timer;
    int handles_open;
    int closing;
    int closed_handles; /* uv_close already called on every handle */
    void (*done)(void *ud);
    void *done_ud;
};

/* ---- pg.c: state as callers see it, deferred delivery, close ------------------------------ */

/* Copies a libpq message on one line (libpq ends messages with a newline and indents hints). */
void pg_trim_copy(char *dst, size_t cap, const char *msg);
/* pg_trim_copy, then redacted against the conninfo: every libpq message that leaves this module
 * goes through it, since libpq quotes back what it read (a password with an unescaped '@' came
 * out as part of the host name it could not resolve). */
void pg_error_copy(const cm_pg_t *pg, char *dst, size_t cap, const char *msg);
/* Reports the pool's or the LISTEN session's up/down after `c` changed state (on_state once per
 * transition). `intentional`: our own reset, logged at info rather than as an error. */
void pg_report_conn(conn_t *c, const char *error, int intentional);
/* Runs the failed list (and a pending close) from the loop on the next turn. */
void pg_schedule_defer(cm_pg_t *pg);
/* Frees the client once its last handle has closed, then calls the close callback. */
void pg_finish_if_done(cm_pg_t *pg);

/* ---- pg_target.c: the hosts of DATABASE_URL ---------------------------------------------- */

/* Splits pg->opts into pg->targets and sizes the keyword arrays. Returns 0 or UV_ENOMEM. */
int pg_targets_build(cm_pg_t *pg);
/* "host:port" of target `i`, for logs and errors. */
void pg_target_label(const cm_pg_t *pg, int i, char *buf, size_t n);

/* ---- pg_conn.c: a connection's life ------------------------------------------------------ */

void pg_conn_init(cm_pg_t *pg, conn_t *c, int listen, int index);
/* "pool" or "listen", for logs. */
const char *pg_conn_label(const conn_t *c);
/* The connection's timer: connect, connect deadline, backoff, broken, follow, statement. */
void pg_on_conn_timer(uv_timer_t *t);
/* Tears the connection down (see pg_conn.c). */
void pg_conn_drop(conn_t *c, const char *error, int reset);
/* Marks the connection dead; it is dropped from the loop (never re-enters user code). */
void pg_conn_break(conn_t *c, const char *error);
void pg_poller_set(conn_t *c, int events);
/* PQflush: 0 with c->flushing telling whether output is still queued, or -1 with libpq's
 * error (one line) in err. */
int pg_conn_flush(conn_t *c, char *err, size_t errsz);

/* ---- pg_query.c: statements -------------------------------------------------------------- */

void pg_q_push(queue_t *q, query_t *x);
void pg_q_push_front(queue_t *q, query_t *x);
void pg_q_remove(queue_t *q, query_t *x);
query_t *pg_q_pop(queue_t *q);
/* A statement with its parameters copied; NULL without memory. */
query_t *pg_query_new(cm_pg_t *pg, const char *sql, int nparams, const char *const *params,
                      uint64_t timeout_ms, cm_pg_result_fn cb, void *ud);
/* Queues `q` for an error callback from the loop; `detail` (may be NULL) is copied. */
void pg_fail_later(cm_pg_t *pg, query_t *q, int err, const char *detail);
void pg_fail_queue_later(cm_pg_t *pg, queue_t *from, int err, const char *detail);
/* Calls `q`'s callback now, with `detail` behind cm_pg_error_detail meanwhile. */
void pg_deliver(cm_pg_t *pg, query_t *q, const PGresult *res, int err, const char *detail);
/* Sends the next statement if `c` is idle; every idle pool connection for the pool queue. */
void pg_conn_dispatch(conn_t *c);
void pg_pool_dispatch(cm_pg_t *pg);
/* Input is readable on `c`: results, notifications, the end of a statement. */
void pg_process_input(conn_t *c);
/* A statement with a deadline was queued: make sure the queue timer fires by then. */
void pg_queue_deadline(cm_pg_t *pg, uint64_t deadline_ms);
/* The connection's timer fired while a statement is in flight (its deadline). */
void pg_query_deadline(conn_t *c);

#endif
