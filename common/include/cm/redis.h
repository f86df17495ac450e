/*
 * cm/redis.h: an asynchronous Redis client on the libuv loop (hiredis 0.14.1 async API).
 *
 * One cm_redis_t is one TCP (or unix socket) connection that reconnects by itself with capped
 * exponential backoff until cm_redis_close. While the link is down every command fails at once
 * with UV_ENOTCONN: callers fall back to the origin instead of queueing and waiting.
 *
 * Link health is judged by progress, not by how many commands wait: the link is stalled when
 * the server owes us something (commands, commands their callers gave up on, a health probe)
 * and nothing at all has come from it for timeout_ms (REDIS_TIMEOUT_MS), counted from the
 * later of the last bytes read and the first write after the link was idle. A stalled link is
 * dropped (stats.stalls), reported down through on_state, and reopened. A healthy server
 * behind a deep pipeline keeps answering, so its link is never dropped. Time the loop itself
 * was busy (a long callback, thousands of commands queued in one turn) is not counted against
 * the server.
 *
 * Separately, a command may have its own deadline (by default timeout_ms, see
 * cm_redis_command_argv_opts), counted from the call and restarted when the loop itself was
 * busy (or the command was not even written yet): past it the caller gets UV_ETIMEDOUT and the
 * late reply, when it comes, is dropped, never handed to another command. Own deadlines never
 * drop the link.
 *
 * Name resolution: hiredis' redisAsyncConnect resolves host names with a blocking getaddrinfo
 * on the loop thread. Use an IP address (or a unix socket) in REDIS_URL where that matters; the
 * same holds for the sentinels of REDIS_SENTINELS and the master addresses they announce (Redis
 * Sentinel announces IP addresses unless it runs with resolve-hostnames/announce-hostnames).
 *
 * Redis Sentinel (cfg.sentinels): the master is found by asking the sentinels in order
 * (SENTINEL get-master-addr-by-name, after AUTH when sentinel_password is set), each with its
 * own deadline (sentinel_timeout_ms), so that a dead or stopped sentinel costs that much and no
 * more; the one that answered is asked first next time. The address it gives is confirmed with
 * ROLE before the link is called up (a replica: ask again after a short delay), and checked
 * with ROLE by the health probe. Every failure asks the sentinels again. A `+switch-master` for
 * our master on the pub/sub of one sentinel (one such connection per client, moved to the next
 * sentinel when it fails) drops the link and connects to the new address at once; so do
 * -READONLY, -LOADING and -MASTERDOWN replies (the command that got one still gets it). The URL
 * then gives only the user, password and database of the data nodes.
 *
 * Callbacks fire exactly once and never from inside the call that started the work.
 */
#ifndef CM_REDIS_H
#define CM_REDIS_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

typedef struct cm_redis cm_redis_t;
struct redisReply;

/* Status codes passed to reply and PING callbacks (cm/error.h; text via cm_strerror):
 * CM_REDIS_OK (0), UV_ETIMEDOUT (no answer in time), UV_ECONNRESET (link lost, or dropped as
 * stalled, while waiting), UV_ECANCELED (client closing). A command refused at once (link down:
 * UV_ENOTCONN) gets no callback: the error is the call's return value. */
enum { CM_REDIS_OK = 0 };

typedef struct cm_redis_config {
    /* redis://[user:password@]host[:port][/db] or unix:///path.sock; borrowed, copied by open. */
    const char *url;
    /* Stall window, and the default own deadline of a command, ms; default 100
     * (REDIS_TIMEOUT_MS). */
    uint64_t timeout_ms;
    uint64_t connect_timeout_ms; /* per connect attempt (TCP + AUTH + SELECT), ms; default 1000 */
    uint64_t backoff_min_ms;     /* reconnect delay after the first failure, ms; default 50 */
    uint64_t backoff_max_ms;     /* cap of the doubling delay (with jitter), ms; default 5000 */
    uint64_t health_interval_ms; /* background PING while idle, ms; default 1000; 0 = off */
    /* Called on every up/down transition only (never twice the same way in a row). `error` is
     * borrowed for the call, NULL when up. May be NULL. */
    void (*on_state)(cm_redis_t *r, int up, const char *error, void *ud);
    void *ud;         /* passed to on_state and message callbacks */
    const char *name; /* for logs ("cache", "pubsub"); borrowed, copied by open; may be NULL */
    /* Redis Sentinel, off when NULL or empty: "host:port,host:port" (REDIS_SENTINELS; port
     * 26379 when left out). Borrowed, copied by open. With it, `url` may be NULL (db 0, no
     * password) and its host and port are not used; a unix:// url is an error. */
    const char *sentinels;
    const char *sentinel_master; /* the master's name (REDIS_SENTINEL_MASTER); required */
    const char
        *sentinel_password; /* AUTH to the sentinels (REDIS_SENTINEL_PASSWORD); may be NULL */
    /* Per sentinel: connect, AUTH and the question, ms; default 500. Also the stall window of
     * the +switch-master subscription. */
    uint64_t sentinel_timeout_ms;
    /* Follow +switch-master on a sentinel's pub/sub; default 1. Off, a switch is noticed
     * through the link's failure, -READONLY or the ROLE health probe only. */
    int sentinel_watch;
} cm_redis_config_t;

/* Fills `cfg` with the defaults above (url NULL, no callbacks). */
void cm_redis_config_defaults(cm_redis_config_t *cfg);

/* The parts of a REDIS_URL. Strings are NUL-terminated and percent-decoded. */
typedef struct cm_redis_url {
    char host[256];     /* TCP host (empty for unix) */
    int port;           /* TCP port, default 6379 */
    char path[256];     /* unix socket path (empty for TCP) */
    char user[128];     /* ACL user name, empty when none (AUTH password alone) */
    char password[256]; /* empty when none */
    int db;             /* SELECT index, default 0 */
    int is_unix;        /* 1 for unix:// */
} cm_redis_url_t;

/* Parses a REDIS_URL (redis://[user:password@]host[:port][/db], unix:///path[?db=N]) with
 * uriparser (RFC 3986). Used at startup to reject bad configuration. Returns 0 or UV_EINVAL
 * (unknown scheme, bad port, db not a number, field too long). */
int cm_redis_url_parse(const char *url, cm_redis_url_t *out);
/* cm_config_check_fn for REDIS_URL: 0 when cm_redis_url_parse accepts `url`, else UV_EINVAL
 * with the expected form written into `why` (whysz bytes). */
int cm_redis_url_check(const char *url, char *why, size_t whysz);
/* cm_config_check_fn for REDIS_SENTINELS: a comma list of host:port ("[v6]:port"; the port
 * defaults to 26379), at most CM_REDIS_SENTINELS_MAX of them. Returns 0 or UV_EINVAL with
 * `why` written. */
int cm_redis_sentinels_check(const char *list, char *why, size_t whysz);
#define CM_REDIS_SENTINELS_MAX 16

struct cm_config;
/* The Redis settings both daemons read the same way, borrowed from the environment. */
typedef struct cm_redis_settings {
    const char *url;               /* REDIS_URL */
    const char *sentinels;         /* REDIS_SENTINELS, NULL when unset */
    const char *sentinel_master;   /* REDIS_SENTINEL_MASTER, NULL when unset */
    const char *sentinel_password; /* REDIS_SENTINEL_PASSWORD, NULL when unset */
} cm_redis_settings_t;
/* Reads REDIS_URL, REDIS_SENTINELS, REDIS_SENTINEL_MASTER and REDIS_SENTINEL_PASSWORD through
 * `c`. REDIS_URL is required in production unless REDIS_SENTINELS is set; the master name is
 * required with REDIS_SENTINELS and refused without it. Returns 0 or UV_EINVAL with c->error
 * naming the variable. */
int cm_redis_settings_load(struct cm_config *c, cm_redis_settings_t *out);
/* Copies the settings into a client configuration (strings stay borrowed). */
void cm_redis_settings_apply(const cm_redis_settings_t *s, cm_redis_config_t *cfg);

/* Creates the client and starts connecting (AUTH [user] password, SELECT db, then up). It keeps
 * reconnecting forever until cm_redis_close. `cfg` is borrowed (copied). *out is set on
 * success; the caller releases it with cm_redis_close. Returns 0, UV_EINVAL (bad URL or
 * config) or UV_ENOMEM. on_state(up=1) fires later, from the loop. */
int cm_redis_open(uv_loop_t *loop, const cm_redis_config_t *cfg, cm_redis_t **out);

/* Non-zero when the link is up (connected, authenticated, db selected, not stalled). */
int cm_redis_is_up(const cm_redis_t *r);

/* Reply callback: fires exactly once, never synchronously. `reply` is borrowed until the
 * callback returns; it is NULL unless status == CM_REDIS_OK. A Redis error reply comes as
 * status 0 with reply->type == REDIS_REPLY_ERROR. */
typedef void (*cm_redis_reply_fn)(cm_redis_t *r, struct redisReply *reply, int status, void *ud);

/* Sends a command in argv form, with its own deadline of cfg.timeout_ms (binary safe; argv and
 * argvlen borrowed, copied before return). Not for (P)SUBSCRIBE/UNSUBSCRIBE/MONITOR (use
 * cm_redis_subscribe), and on a subscribed connection only error replies come back in RESP2 (use
 * cm_redis_ping for liveness there). argvlen may be NULL for NUL-terminated arguments. Returns 0
 * (cb will fire), UV_ENOTCONN when the link is down, UV_EINVAL, or UV_ENOMEM (cb will not fire). cb
 * may be NULL (fire and forget). */
int cm_redis_command_argv(cm_redis_t *r, cm_redis_reply_fn cb, void *ud, int argc,
                          const char **argv, const size_t *argvlen);

/* Per command options. Zero-initialised means no own deadline. */
typedef struct cm_redis_cmd_opts {
    /* Own deadline, ms from the call: past it cb gets UV_ETIMEDOUT (and the reply, when it
     * comes, is dropped). 0 = none: the command waits as long as the link lives, and only a
     * lost or stalled link (UV_ECONNRESET) or cm_redis_close (UV_ECANCELED) fails it. For
     * bulk writes such as PUBLISH bursts, where a deep pipeline must not produce timeouts. */
    uint64_t timeout_ms;
} cm_redis_cmd_opts_t;

/* cm_redis_command_argv with options; `opts` NULL = the defaults of cm_redis_command_argv
 * (own deadline cfg.timeout_ms); borrowed. Same returns. */
int cm_redis_command_argv_opts(cm_redis_t *r, const cm_redis_cmd_opts_t *opts, cm_redis_reply_fn cb,
                               void *ud, int argc, const char **argv, const size_t *argvlen);
/* Same as cm_redis_command_argv with a hiredis format string ("SET %s %b"). Same returns. */
int cm_redis_command(cm_redis_t *r, cm_redis_reply_fn cb, void *ud, const char *fmt, ...);

/* PING round trip for health checks: cb(status, latency in ms). Same firing rules and returns
 * as cm_redis_command. A successful PING also updates stats.last_ping_ms. */
typedef void (*cm_redis_ping_fn)(cm_redis_t *r, int status, double latency_ms, void *ud);
int cm_redis_ping(cm_redis_t *r, cm_redis_ping_fn cb, void *ud);

/* Pub/sub. A connection used for SUBSCRIBE should be its own cm_redis_t (RESP2 allows only
 * (P)SUBSCRIBE family commands on it). Subscriptions are remembered and issued again after
 * every reconnect. cb(channel, payload, len) fires once per message; channel and payload are
 * borrowed for the call. `channel` is borrowed (copied). May be called while down (sent on the
 * next connect). Returns 0, UV_EEXIST (already subscribed), UV_EINVAL or UV_ENOMEM. */
typedef void (*cm_redis_message_fn)(cm_redis_t *r, const char *channel, const char *payload,
                                    size_t len, void *ud);
int cm_redis_subscribe(cm_redis_t *r, const char *channel, cm_redis_message_fn cb, void *ud);
/* Forgets a subscription (and UNSUBSCRIBEs when up). Returns 0 or UV_ENOENT. */
int cm_redis_unsubscribe(cm_redis_t *r, const char *channel);

/* Copies the counters for metrics (redis_reconnects_total, redis_command_timeouts_total...)
 * into the caller's `out`. */
typedef struct cm_redis_stats {
    uint64_t reconnects;    /* successful connects after the first one */
    uint64_t timeouts;      /* commands and PINGs that missed their own deadline */
    uint64_t errors;        /* failed connect attempts and lost links (stalls included) */
    uint64_t stalls;        /* links dropped because the server stopped answering */
    uint64_t last_stall_ms; /* loop time (uv_now) of the latest such drop, 0 = never */
    double last_ping_ms;    /* latency of the last successful PING (health or cm_redis_ping), ms */
    uint64_t master_moves;  /* Sentinel: links that came up on another address than the last */
} cm_redis_stats_t;
void cm_redis_stats(const cm_redis_t *r, cm_redis_stats_t *out);

/* Closes the client: every pending command gets UV_ECANCELED (from the loop, not from inside
 * this call), then `done(ud)` (may be NULL) fires once after the last handle closed and the
 * object was freed. `r` must not be used after this call. Safe to call from any callback of
 * this client. */
void cm_redis_close(cm_redis_t *r, void (*done)(void *ud), void *ud);

#endif
