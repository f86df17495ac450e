#include "client.h"

#include "event.h"
#include "hub.h"

#include "cm/alloc.h"
#include "cm/buf.h"
#include "cm/log.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

/* Client messages above this close with 1009 (CONTRACT.md). */
#define MAX_CLIENT_MESSAGE 4096
/* A closing connection that does not drain its queue in this time is closed hard. */
#define CLOSE_DEADLINE_MS 5000
#define RESUME_LIMIT 1000
/* Most ids a client may list in recent_event_ids (they travel in the request line). */
#define RECENT_MAX 256
#define RECENT_TEXT_MAX (RECENT_MAX * 21)
#define QUERY_TIMEOUT_MS 5000
#define TOKEN_MAX 4096
/* How long a resumed client remembers the ids it replayed: at least a minute (or two ping
 * intervals), and longer than NOTIFIER_CATCHUP_LOOKBACK_MS, because a catch-up only
 * re-publishes events created within that look-back, and every replayed event was created
 * before the resume. */
#define REPLAYED_GRACE_MIN_MS 60000
#define REPLAYED_GRACE_MARGIN_MS 10000

/* ---- frames --------------------------------------------------------------------------------- */

on_frame_t *on_frame_new(int64_t id, double created_at, const char *data, size_t len)
{
    on_frame_t *f = cm_malloc(sizeof *f + len + 1);
    if (!f)
        return NULL;
    f->refs = 1;
    f->id = id;
    f->created_at = created_at;
    f->len = len;
    memcpy(f->data, data, len);
    f->data[len] = '\0';
    return f;
}

void on_frame_ref(on_frame_t *f)
{
    f->refs++;
}

void on_frame_unref(on_frame_t *f)
{
    if (f && --f->refs == 0)
        cm_free(f);
}

static void drop_frame(void *data)
{
    on_frame_unref(data);
}

/* ---- life ------------------------------------------------------------------------------------ */

static void maybe_free(on_client_t *c)
{
    if (!c->conn_closed || c->pending > 0)
        return;
    cm_free(c->replayed);
    cm_free(c->recent);
    on_ws_free(c->ws);
    cm_free(c);
}

static void timer_closed(uv_handle_t *h)
{
    on_client_t *c = h->data;
    c->pending--;
    maybe_free(c);
}

/* The WebSocket session is over: flush what is queued (our close frame last), then close the
 * TCP connection; a peer that does not read is cut off at the deadline. */
static void finish(on_client_t *c)
{
    c->closing = 1;
    if (!c->conn || c->conn_closed)
        return;
    cm_http_conn_close(c->conn, 0);
}

static void on_ping_timer(uv_timer_t *t);

void on_client_close(on_client_t *c, uint16_t code)
{
    if (c->closing || c->conn_closed)
        return;
    c->closing = 1;
    (void)on_ws_close(c->ws, code);
    uv_timer_start(&c->ping_timer, on_ping_timer, CLOSE_DEADLINE_MS, 0);
    finish(c);
}

static void on_ping_timer(uv_timer_t *t)
{
    on_client_t *c = t->data;
    if (c->conn_closed)
        return;
    if (c->closing) {
        cm_log_debug("closing a connection that did not drain in time", "peer",
                     cm_http_conn_peer(c->conn), NULL);
        cm_http_conn_close(c->conn, 1);
        return;
    }
    uint64_t interval = (uint64_t)c->app->cfg.ws_ping_interval_ms;
    if (uv_now(c->app->loop) - c->last_rx_ms >= 2 * interval) {
        cm_log_info("closing a silent client", "peer", cm_http_conn_peer(c->conn), "user",
                    c->claims.sub, NULL);
        on_client_close(c, ON_WS_CLOSE_GOING_AWAY);
        return;
    }
    if (on_ws_send_ping(c->ws) != 0)
        on_client_close(c, ON_WS_CLOSE_INTERNAL);
}

/* Longest single wait for a token's expiry (1 day); a later `exp` re-arms the timer. */
#define EXPIRY_STEP_S 86400

/* Arms the expiry timer toward claims.exp in steps, so any `exp` (up to INT64_MAX seconds)
 * fits the timer without overflowing milliseconds. */
static void arm_expiry(on_client_t *c);

static void on_expiry(uv_timer_t *t)
{
    on_client_t *c = t->data;
    if ((int64_t)time(NULL) < c->claims.exp) {
        arm_expiry(c);
        return;
    }
    cm_log_info("token expired; closing", "user", c->claims.sub, NULL);
    on_client_close(c, ON_WS_CLOSE_POLICY);
}

static void arm_expiry(on_client_t *c)
{
    int64_t now = (int64_t)time(NULL);
    int64_t left_s = c->claims.exp > now ? c->claims.exp - now : 0;
    if (left_s > EXPIRY_STEP_S)
        left_s = EXPIRY_STEP_S;
    uv_timer_start(&c->expiry_timer, on_expiry, (uint64_t)left_s * 1000, 0);
}

/* ---- sending ------------------------------------------------------------------------------- */

/* Sends one text frame and enforces WS_SEND_QUEUE_MAX_BYTES. Returns 0 while the client is
 * still open. */
static int send_text(on_client_t *c, const char *data, size_t len)
{
    if (c->closing)
        return UV_EPIPE;
    if (on_ws_send_text(c->ws, data, len) != 0) {
        finish(c);
        return UV_EPIPE;
    }
    size_t queued = cm_http_conn_write_queue_size(c->conn) + on_ws_queued_bytes(c->ws);
    if (queued > (size_t)c->app->cfg.ws_send_queue_max) {
        char q[24];
        snprintf(q, sizeof q, "%zu", queued);
        cm_log_warn("slow consumer: closing with 1013", "user", c->claims.sub, "queued_bytes", q,
                    "peer", cm_http_conn_peer(c->conn), NULL);
        cm_counter_inc(c->app->m.ws_slow_closes);
        on_client_close(c, ON_WS_CLOSE_TRY_AGAIN);
        return UV_ENOBUFS;
    }
    return 0;
}

static void send_frame(on_client_t *c, const on_frame_t *f)
{
    if (send_text(c, f->data, f->len) != 0 && c->closing)
        return;
    cm_counter_inc(c->app->m.ws_messages_sent);
    if (f->created_at > 0) {
        double d = on_now() - f->created_at;
        cm_histogram_observe(c->app->m.delivery_seconds, d > 0 ? d : 0);
    }
}

void on_client_deliver(on_client_t *c, on_frame_t *f)
{
    if (c->closing || !c->started)
        return;
    /* A resumed client has everything up to last_event_id: a look-back re-publish (catch-up
     * after a leader change, the replay after a Redis reconnect) must not show it again. */
    if (c->resume_from >= 0 && f->id <= c->resume_from) {
        /* ...unless the client's recent_event_ids says it has not seen this one: a late
         * committer (a lower id committed after the client saw last_event_id). */
        if (!c->recent || f->id < c->recent[0] || f->id == c->resume_from ||
            on_idlist_has(c->recent, c->nrecent, f->id))
            return;
    }
    if (c->replayed) {
        if (uv_now(c->app->loop) >= c->replayed_until_ms) {
            cm_free(c->replayed);
            c->replayed = NULL;
            c->nreplayed = 0;
        } else if (on_idlist_has(c->replayed, c->nreplayed, f->id)) {
            return;
        }
    }
    if (c->replaying) {
        on_frame_ref(f);
        if (on_resume_live(&c->resume, f->id, f) != 0) {
            on_frame_unref(f);
            on_client_close(c, ON_WS_CLOSE_INTERNAL);
        }
        return;
    }
    send_frame(c, f);
}

/* ---- resume ------------------------------------------------------------------------------- */

static void emit_held(int64_t id, void *data, int dup, void *ud)
{
    (void)id;
    on_client_t *c = ud;
    on_frame_t *f = data;
    if (!dup && !c->closing)
        send_frame(c, f);
    on_frame_unref(f);
}

static void resume_done(cm_pg_t *pg, const PGresult *res, const char *error, void *ud)
{
    (void)pg;
    on_client_t *c = ud;
    c->pending--;
    if (c->conn_closed || c->closing) {
        c->replaying = 0;
        on_resume_free(&c->resume, drop_frame);
        maybe_free(c);
        return;
    }
    if (error) {
        cm_log_warn("resume query failed; closing with 1013", "error", error, NULL);
        c->replaying = 0;
        on_resume_free(&c->resume, drop_frame);
        on_client_close(c, ON_WS_CLOSE_TRY_AGAIN);
        return;
    }
    int n = PQntuples(res);
    cm_buf_t b = CM_BUF_INIT;
    int64_t *replayed = n > 0 ? cm_malloc((size_t)n * sizeof *replayed) : NULL;
    size_t nreplayed = 0;
    if (n > 0 && !replayed) {
        c->replaying = 0;
        on_resume_free(&c->resume, drop_frame);
        on_client_close(c, ON_WS_CLOSE_INTERNAL);
        return;
    }
    for (int i = 0; i < n && !c->closing; i++) {
        int64_t id = strtoll(PQgetvalue(res, i, 0), NULL, 10);
        on_event_t ev;
        if (on_event_from_row(id, PQgetvalue(res, i, 1), PQgetvalue(res, i, 2),
                              PQgetvalue(res, i, 3),
                              PQgetisnull(res, i, 4) ? NULL : PQgetvalue(res, i, 4), &ev) != 0)
            continue;
        if (on_resume_replayed(&c->resume, id) == 1) {
            cm_buf_reset(&b);
            if (on_event_frame(&ev, &b) == 0) {
                if (send_text(c, b.data, b.len) == 0)
                    cm_counter_inc(c->app->m.ws_messages_sent);
                /* Rows come in id order (ORDER BY order_events.id): the array stays sorted. */
                if (nreplayed == 0 || replayed[nreplayed - 1] < id)
                    replayed[nreplayed++] = id;
            }
        }
        on_event_clear(&ev);
    }
    cm_buf_free(&b);
    if (nreplayed > 0) {
        uint64_t grace = (uint64_t)c->app->cfg.lookback_ms + REPLAYED_GRACE_MARGIN_MS;
        uint64_t pings = 2 * (uint64_t)c->app->cfg.ws_ping_interval_ms;
        if (grace < pings)
            grace = pings;
        if (grace < REPLAYED_GRACE_MIN_MS)
            grace = REPLAYED_GRACE_MIN_MS;
        cm_free(c->replayed);
        c->replayed = replayed;
        c->nreplayed = nreplayed;
        c->replayed_until_ms = uv_now(c->app->loop) + grace;
    } else {
        cm_free(replayed);
    }
    /* The contract replays at most RESUME_LIMIT events: say so rather than leave a silent
     * gap, so a client can fetch the rest another way (or warn its user). */
    if (n >= RESUME_LIMIT && !c->closing && nreplayed > 0) {
        char note[128];
        int len = snprintf(note, sizeof note,
                           "{\"type\":\"resume_truncated\",\"limit\":%d,"
                           "\"last_replayed_event_id\":%" PRId64 "}",
                           RESUME_LIMIT, replayed[nreplayed - 1]);
        (void)send_text(c, note, (size_t)len);
    }
    c->replaying = 0;
    on_resume_finish(&c->resume, emit_held, c);
}

/*
 * The resume replay: the user's events with id > last_event_id, and, when the client sent
 * recent_event_ids, the events from its smallest listed id up to last_event_id that it does
 * not list (ids commit out of order: a lower id can commit after the client saw a higher one).
 *
 * Limit (last_event_id alone): an event with an id below last_event_id that committed after
 * the client saw last_event_id is not replayed; with last_event_id alone the server cannot
 * tell it from the lower ids the client already has, and the contract wants no duplicate.
 * With recent_event_ids the replay is exact for ids from the smallest listed one up (a client
 * that lists the ids it received in the last seconds covers any transaction shorter than
 * that); a late committer below the smallest listed id is still missed. Live events below
 * last_event_id are handled the same way (on_client_deliver).
 */
static void start_resume(on_client_t *c)
{
    char from[24], limit[16], floor_s[24];
    snprintf(from, sizeof from, "%" PRId64, c->resume_from);
    snprintf(limit, sizeof limit, "%d", RESUME_LIMIT);
    cm_buf_t listed = CM_BUF_INIT;
    int rc = 0;
    if (c->recent) {
        snprintf(floor_s, sizeof floor_s, "%" PRId64, c->recent[0]);
        rc = cm_buf_append(&listed, "{", 1);
        for (size_t i = 0; i < c->nrecent && rc == 0; i++) {
            char one[24];
            int n = snprintf(one, sizeof one, "%s%" PRId64, i ? "," : "", c->recent[i]);
            rc = cm_buf_append(&listed, one, (size_t)n);
        }
        if (rc == 0)
            rc = cm_buf_append(&listed, "}", 2); /* with the NUL */
    }
    if (rc != 0) {
        cm_buf_free(&listed);
        on_client_close(c, ON_WS_CLOSE_INTERNAL);
        return;
    }
    const char *params[5] = {c->claims.read_all ? NULL : c->claims.sub, from, limit,
                             c->recent ? floor_s : NULL, c->recent ? listed.data : NULL};
    on_resume_start(&c->resume);
    c->replaying = 1;
    rc = cm_pg_query(c->app->pg,
                     "SELECT id::text, user_id, event_type, payload::text, "
                     "extract(epoch FROM created_at)::text FROM order_events "
                     "WHERE ($1::text IS NULL OR user_id = $1) AND (id > $2::bigint OR "
                     "(id >= $4::bigint AND id < $2::bigint AND NOT id = ANY($5::bigint[]))) "
                     "ORDER BY order_events.id LIMIT $3::int",
                     5, params, QUERY_TIMEOUT_MS, resume_done, c);
    cm_buf_free(&listed);
    if (rc != 0) {
        cm_log_warn("cannot resume now (Postgres unavailable); closing with 1013", NULL);
        c->replaying = 0;
        on_resume_free(&c->resume, drop_frame);
        on_client_close(c, ON_WS_CLOSE_TRY_AGAIN);
        return;
    }
    c->pending++;
    cm_counter_inc(c->app->m.resumes);
}

void on_client_start(on_client_t *c)
{
    if (c->started || c->closing || c->conn_closed)
        return;
    c->started = 1;
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "type", "welcome");
    cJSON_AddStringToObject(j, "user_id", c->claims.sub);
    if (c->resume_from >= 0) {
        /* A 64-bit id as a JSON integer: cJSON's doubles would print 9.2e18. */
        char id[24];
        snprintf(id, sizeof id, "%" PRId64, c->resume_from);
        cJSON_AddRawToObject(j, "resumed_from", id);
    } else {
        cJSON_AddNullToObject(j, "resumed_from");
    }
    char *s = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    if (!s) {
        on_client_close(c, ON_WS_CLOSE_INTERNAL);
        return;
    }
    int rc = send_text(c, s, strlen(s));
    cJSON_free(s);
    if (rc != 0)
        return;
    uint64_t interval = (uint64_t)c->app->cfg.ws_ping_interval_ms;
    uv_timer_start(&c->ping_timer, on_ping_timer, interval, interval);
    if (c->resume_from >= 0)
        start_resume(c);
}

/* ---- WebSocket callbacks ------------------------------------------------------------------- */

static void ws_on_text(on_ws_t *ws, const char *data, size_t len, void *ud)
{
    (void)ws;
    on_client_t *c = ud;
    cJSON *j = cJSON_ParseWithLength(data, len);
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(j, "type");
    /* Browsers cannot send protocol pings, hence the application-level one. */
    if (cJSON_IsString(type) && strcmp(type->valuestring, "ping") == 0 && c->started)
        (void)send_text(c, "{\"type\":\"pong\"}", 15);
    cJSON_Delete(j);
}

static void ws_on_activity(on_ws_t *ws, void *ud)
{
    (void)ws;
    on_client_t *c = ud;
    c->last_rx_ms = uv_now(c->app->loop);
}

static int ws_write(on_ws_t *ws, const uint8_t *data, size_t len, void *ud)
{
    (void)ws;
    on_client_t *c = ud;
    if (!c->conn || c->conn_closed)
        return UV_EPIPE;
    return cm_http_conn_write(c->conn, data, len);
}

static const on_ws_callbacks_t ws_cbs = {ws_on_text, ws_on_activity, ws_write};

static void raw_on_read(cm_http_conn_t *conn, const char *data, ssize_t n, void *ud)
{
    (void)conn;
    on_client_t *c = ud;
    if (n <= 0 || c->conn_closed)
        return; /* EOF or error: on_close follows */
    c->last_rx_ms = uv_now(c->app->loop);
    int rc = on_ws_feed(c->ws, (const uint8_t *)data, (size_t)n);
    if (rc != 0 || on_ws_finished(c->ws)) {
        if (!c->closing)
            uv_timer_start(&c->ping_timer, on_ping_timer, CLOSE_DEADLINE_MS, 0);
        finish(c);
    }
}

static void raw_on_close(cm_http_conn_t *conn, void *ud)
{
    (void)conn;
    on_client_t *c = ud;
    c->conn_closed = 1;
    c->conn = NULL;
    c->closing = 1;
    on_hub_leave(c->app->hub, c);
    uv_close((uv_handle_t *)&c->ping_timer, timer_closed);
    uv_close((uv_handle_t *)&c->expiry_timer, timer_closed);
    maybe_free(c);
}

static const cm_http_raw_cbs_t raw_cbs = {raw_on_read, raw_on_close};

/* ---- the upgrade request ------------------------------------------------------------------- */

static int cmp_id(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Parses recent_event_ids ("1,5,9": positive ids, none above `last`, at most RECENT_MAX) into
 * a sorted unique array the caller frees. Returns 0, UV_EINVAL or UV_ENOMEM. */
static int parse_recent(const char *text, int64_t last, int64_t **out, size_t *count)
{
    int64_t *ids = cm_malloc(RECENT_MAX * sizeof *ids);
    if (!ids)
        return UV_ENOMEM;
    size_t n = 0;
    const char *p = text;
    for (;;) {
        if (*p < '0' || *p > '9' || n == RECENT_MAX)
            goto bad;
        char *end = NULL;
        errno = 0;
        long long v = strtoll(p, &end, 10);
        if (errno || v <= 0 || v > last)
            goto bad;
        ids[n++] = v;
        if (*end == '\0')
            break;
        if (*end != ',')
            goto bad;
        p = end + 1;
    }
    qsort(ids, n, sizeof *ids, cmp_id);
    size_t u = 0;
    for (size_t i = 0; i < n; i++)
        if (u == 0 || ids[u - 1] != ids[i])
            ids[u++] = ids[i];
    *out = ids;
    *count = u;
    return 0;
bad:
    cm_free(ids);
    return UV_EINVAL;
}

/* Non-zero when the comma list `value` holds `token` (case-insensitive, RFC 9110 §5.6.1). */
static int has_token(const char *value, const char *token)
{
    size_t tl = strlen(token);
    const char *p = value;
    while (*p) {
        while (*p == ' ' || *p == '\t' || *p == ',')
            p++;
        size_t n = strcspn(p, ",");
        size_t m = n;
        while (m > 0 && (p[m - 1] == ' ' || p[m - 1] == '\t'))
            m--;
        if (m == tl && strncasecmp(p, token, tl) == 0)
            return 1;
        p += n;
    }
    return 0;
}

static void reject(cm_http_request_t *req, on_app_t *app, int status, const char *code,
                   const char *message, const char *headers)
{
    cm_counter_inc(app->m.ws_rejected);
    cm_log_debug("websocket upgrade refused", "code", code, "peer", cm_http_conn_peer(req->conn),
                 NULL);
    cm_http_respond_error(req, status, code, message, headers);
}

void on_client_handle_upgrade(cm_http_request_t *req, void *ud)
{
    on_app_t *app = ud;
    static const char upgrade_hdrs[] =
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n";
    if (app->stopping) {
        reject(req, app, 503, "shutting_down", "the notifier is shutting down",
               "Retry-After: 1\r\n");
        return;
    }
    const char *upgrade = cm_http_header(req, "Upgrade");
    const char *connection = cm_http_header(req, "Connection");
    if (!upgrade || !connection || !has_token(upgrade, "websocket") ||
        !has_token(connection, "upgrade")) {
        reject(req, app, 426, "upgrade_required", "this endpoint speaks WebSocket only",
               upgrade_hdrs);
        return;
    }
    const char *version = cm_http_header(req, "Sec-WebSocket-Version");
    if (!version || strcmp(version, "13") != 0) {
        reject(req, app, 426, "unsupported_version", "WebSocket version 13 is required",
               upgrade_hdrs);
        return;
    }
    if (!on_config_origin_allowed(&app->cfg, cm_http_header(req, "Origin"))) {
        reject(req, app, 403, "origin_not_allowed", "origin not allowed", NULL);
        return;
    }

    /* The token: Authorization: Bearer first (RFC 6750 §2.1), then ?access_token (§2.3). */
    char token[TOKEN_MAX + 1];
    size_t token_len = 0;
    const char *auth = cm_http_header(req, "Authorization");
    if (auth && strncasecmp(auth, "Bearer ", 7) == 0) {
        const char *t = auth + 7;
        while (*t == ' ')
            t++;
        token_len = strlen(t);
        if (token_len > TOKEN_MAX)
            token_len = 0;
        else
            memcpy(token, t, token_len + 1);
    } else {
        int n = cm_http_query_param(req, "access_token", token, sizeof token);
        token_len = n > 0 ? (size_t)n : 0;
    }
    if (token_len == 0) {
        reject(req, app, 401, "missing_token", "a bearer token is required",
               "WWW-Authenticate: Bearer realm=\"order-notifier\"\r\n");
        return;
    }
    on_jwt_claims_t claims;
    int rc = on_jwt_verify(token, token_len, app->cfg.jwt_secret, strlen(app->cfg.jwt_secret),
                           (int64_t)time(NULL), &claims);
    if (rc != 0) {
        reject(req, app, 401, "invalid_token", on_jwt_strerror(rc),
               "WWW-Authenticate: Bearer realm=\"order-notifier\", error=\"invalid_token\"\r\n");
        return;
    }

    const char *key = cm_http_header(req, "Sec-WebSocket-Key");
    char accept[ON_WS_ACCEPT_LEN];
    if (!key || on_ws_accept_key(key, strlen(key), accept) != 0) {
        reject(req, app, 400, "bad_request", "missing or invalid Sec-WebSocket-Key", NULL);
        return;
    }
    int64_t resume_from = -1;
    char last[32];
    rc = cm_http_query_param(req, "last_event_id", last, sizeof last);
    if (rc != UV_ENOENT) {
        char *end = NULL;
        errno = 0;
        long long v = rc > 0 ? strtoll(last, &end, 10) : -1;
        if (rc <= 0 || *end || errno || v < 0 || last[0] == '-' || last[0] == '+') {
            reject(req, app, 400, "invalid_last_event_id",
                   "last_event_id must be a non-negative integer", NULL);
            return;
        }
        resume_from = v;
    }
    int64_t *recent = NULL;
    size_t nrecent = 0;
    char *recent_text = cm_malloc(RECENT_TEXT_MAX);
    rc = recent_text ? cm_http_query_param(req, "recent_event_ids", recent_text, RECENT_TEXT_MAX)
                     : UV_ENOMEM;
    if (rc != UV_ENOENT) {
        if (rc >= 0)
            rc = resume_from >= 0 ? parse_recent(recent_text, resume_from, &recent, &nrecent)
                                  : UV_EINVAL;
        if (rc == UV_ENOMEM) {
            cm_free(recent_text);
            cm_http_respond_error(req, 503, "out_of_memory", "out of memory", NULL);
            return;
        }
        if (rc < 0) {
            cm_free(recent_text);
            reject(req, app, 400, "invalid_recent_event_ids",
                   "recent_event_ids must be up to 256 comma-separated ids, none above "
                   "last_event_id (which it requires)",
                   NULL);
            return;
        }
    }
    cm_free(recent_text);
    if (on_hub_clients(app->hub) >= (size_t)app->cfg.ws_max_connections) {
        cm_free(recent);
        reject(req, app, 503, "too_many_connections", "connection limit reached",
               "Retry-After: 1\r\n");
        return;
    }

    on_client_t *c = cm_calloc(1, sizeof *c);
    if (!c || on_ws_new(&ws_cbs, c, MAX_CLIENT_MESSAGE, &c->ws) != 0) {
        cm_free(c);
        cm_free(recent);
        cm_http_respond_error(req, 503, "out_of_memory", "out of memory", NULL);
        return;
    }
    c->app = app;
    c->claims = claims;
    c->resume_from = resume_from;
    c->recent = recent;
    c->nrecent = nrecent;
    char head[256];
    int hl = snprintf(head, sizeof head,
                      "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
                      accept);
    if (cm_http_upgrade(req, head, (size_t)hl, &raw_cbs, c, &c->conn) != 0) {
        on_ws_free(c->ws);
        cm_free(c->recent);
        cm_free(c);
        return;
    }
    uv_timer_init(app->loop, &c->ping_timer);
    uv_timer_init(app->loop, &c->expiry_timer);
    c->ping_timer.data = c;
    c->expiry_timer.data = c;
    c->pending = 2;
    c->last_rx_ms = uv_now(app->loop);
    arm_expiry(c);
    if (on_hub_join(app->hub, c) != 0)
        on_client_close(c, ON_WS_CLOSE_INTERNAL);
}
