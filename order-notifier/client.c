#include "client.h"

#include "event.h"
#include "gate.h"
#include "hub.h"
#include "outbox.h"
#include "request.h"

#include "cm/alloc.h"
#include "cm/buf.h"
#include "cm/log.h"
#include "cm/sse.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

/* Client messages above this close with 1009 (docs/asyncapi.yaml). */
#define MAX_CLIENT_MESSAGE 4096
/* Messages a client may send before its welcome (they are answered after it): an app ping or
 * two is normal, a stream of them is not (1008). */
#define EARLY_MESSAGES_MAX (2 * MAX_CLIENT_MESSAGE)
/* A closing connection that does not drain its queue in this time is closed hard. */
#define CLOSE_DEADLINE_MS 5000
#define RESUME_LIMIT 1000
/* Most ids a client may list in recent_event_ids (they travel in the request line). */
#define RECENT_MAX 256
#define RECENT_TEXT_MAX (RECENT_MAX * 21)
#define TOKEN_MAX 4096
/* How long a resumed client remembers the ids it replayed: at least a minute (or two ping
 * intervals), and longer than NOTIFIER_CATCHUP_LOOKBACK_MS, because a catch-up only
 * re-publishes events created within that look-back, and every replayed event was created
 * before the resume. */
#define REPLAYED_GRACE_MIN_MS 60000
#define REPLAYED_GRACE_MARGIN_MS 10000

/* ---- frames --------------------------------------------------------------------------------- */

static void drop_frame(void *data)
{
    on_frame_unref(data);
}

/* ---- life ------------------------------------------------------------------------------------ */

/* For logs: the peer, also once the connection is gone. */
static const char *peer_of(const on_client_t *c)
{
    return c->conn ? cm_http_conn_peer(c->conn) : "-";
}

static void maybe_free(on_client_t *c)
{
    if (!c->conn_closed || c->pending > 0)
        return;
    cm_free(c->replayed);
    cm_free(c->recent);
    cm_free(c);
}

static void timer_closed(uv_handle_t *h)
{
    on_client_t *c = h->data;
    c->pending--;
    maybe_free(c);
}

static void on_ping_timer(uv_timer_t *t);
static int sent(on_client_t *c, int rc);

/* The WebSocket session is over: cm_ws writes what is queued (its close frame last), then
 * closes the TCP connection; a peer that does not read is cut off at the deadline. */
static void finish(on_client_t *c)
{
    c->closing = 1;
    if (!c->conn_closed)
        uv_timer_start(&c->ping_timer, on_ping_timer, CLOSE_DEADLINE_MS, 0);
}

void on_client_close(on_client_t *c, uint16_t code)
{
    if (c->closing || c->conn_closed)
        return;
    if (c->sse)
        cm_sse_close(c->sse); /* EventSource reconnects by itself, with Last-Event-ID */
    else
        (void)cm_ws_close(c->ws, code, NULL);
    finish(c);
}

static void on_ping_timer(uv_timer_t *t)
{
    on_client_t *c = t->data;
    if (c->conn_closed)
        return;
    if (c->closing) {
        cm_log_debug("closing a connection that did not drain in time", "peer", peer_of(c), NULL);
        if (c->sse)
            cm_sse_abort(c->sse);
        else
            cm_ws_abort(c->ws);
        return;
    }
    if (c->sse) {
        /* A comment line keeps proxies from timing the stream out; a peer that went away
         * shows as a queue that no longer drains. */
        (void)sent(c, cm_sse_comment(c->sse, "ping"));
        return;
    }
    uint64_t interval = (uint64_t)c->app->cfg.ws_ping_interval_ms;
    if (uv_now(c->app->loop) - c->last_rx_ms >= 2 * interval) {
        cm_log_info("closing a silent client", "peer", peer_of(c), "user", c->claims.sub, NULL);
        on_client_close(c, ON_WS_CLOSE_GOING_AWAY);
        return;
    }
    (void)sent(c, cm_ws_send(c->ws, CM_WS_OP_PING, NULL, 0));
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

static void slow_consumer(on_client_t *c)
{
    char q[24];
    snprintf(q, sizeof q, "%zu", c->sse ? cm_sse_queued_bytes(c->sse) : cm_ws_queued_bytes(c->ws));
    cm_log_warn("slow consumer: closing with 1013", "user", c->claims.sub, "queued_bytes", q,
                "peer", peer_of(c), NULL);
    cm_counter_inc(c->app->m.ws_slow_closes);
}

/* Acts on a cm_ws send's result: WS_SEND_QUEUE_MAX_BYTES passed (the frame is queued) closes
 * with 1013; any other failure means the session is already going. Returns 0 while the client
 * is still open. */
static int sent(on_client_t *c, int rc)
{
    if (rc == UV_ENOBUFS) {
        slow_consumer(c);
        on_client_close(c, ON_WS_CLOSE_TRY_AGAIN);
        return rc;
    }
    if (rc != 0 && !c->closing)
        finish(c);
    return rc;
}

/* Sends one message that is not an event (welcome, pong, resume_truncated): for SSE a
 * message without an id (so Last-Event-ID stays the last event's), told apart by its JSON
 * "type" as on the WebSocket. Returns 0 while the client is still open. */
static int send_text(on_client_t *c, const char *data, size_t len)
{
    if (c->closing)
        return UV_EPIPE;
    if (c->sse)
        return sent(c, cm_sse_send(c->sse, NULL, NULL, data, len));
    return sent(c, cm_ws_send_text(c->ws, data, len));
}

static void release_frame(void *arg)
{
    on_frame_unref(arg);
}

/* Queues an event frame by reference (its bytes are shared by every client it goes to). */
static int queue_frame(on_client_t *c, on_frame_t *f)
{
    if (!c->sse)
        return cm_ws_send_frame(c->ws, f->ws);
    size_t len = 0;
    const char *bytes = on_frame_sse(f, &len);
    if (!bytes)
        return UV_ENOMEM;
    on_frame_ref(f);
    int rc = cm_sse_send_ref(c->sse, bytes, len, release_frame, f);
    if (rc != 0 && rc != UV_ENOBUFS)
        on_frame_unref(f); /* not queued: nothing will release it */
    return rc;
}

/* Sends an event; `live` ones are observed in the delivery histogram (a replayed one is as
 * old as the client's absence). */
static void send_frame(on_client_t *c, on_frame_t *f, int live)
{
    if (c->closing)
        return;
    if (sent(c, queue_frame(c, f)) != 0 && c->closing)
        return;
    cm_counter_inc(c->app->m.ws_messages_sent);
    if (live && f->created_at > 0) {
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
        int rc = on_gate_live(&c->gate, f->id, f);
        if (rc == 0)
            return; /* held until the replay below it is out */
        on_frame_unref(f);
        if (rc == ON_GATE_DUP)
            return;
    }
    send_frame(c, f, 1);
}

/* ---- resume ------------------------------------------------------------------------------- */

static void emit_held(int64_t id, void *data, void *ud)
{
    (void)id;
    on_client_t *c = ud;
    if (!c->closing)
        send_frame(c, data, 1);
    on_frame_unref(data);
}

static void resume_row(on_event_t *ev, void *ud)
{
    on_client_t *c = ud;
    if (c->closing || c->conn_closed) {
        on_event_clear(ev);
        return;
    }
    /* Live events held below this row go first: the client sees one stream in id order. */
    if (on_gate_row(&c->gate, ev->id, emit_held, drop_frame, c) != 0 && !c->closing) {
        on_frame_t *f = on_frame_from_event(ev);
        if (f)
            send_frame(c, f, 0);
        on_frame_unref(f);
        /* Rows come in id order: the array stays sorted. */
        if (c->nreplayed < RESUME_LIMIT &&
            (c->nreplayed == 0 || c->replayed[c->nreplayed - 1] < ev->id))
            c->replayed[c->nreplayed++] = ev->id;
    }
    on_event_clear(ev);
}

static void resume_done(int status, int truncated, void *ud)
{
    on_client_t *c = ud;
    c->pending--;
    c->replaying = 0;
    if (c->conn_closed || c->closing) {
        on_gate_free(&c->gate, drop_frame);
        maybe_free(c);
        return;
    }
    if (status != 0) {
        cm_log_warn("resume query failed; closing with 1013", "error", uv_strerror(status), NULL);
        on_gate_free(&c->gate, drop_frame);
        on_client_close(c, ON_WS_CLOSE_TRY_AGAIN);
        return;
    }
    /* A catch-up or replay may publish a replayed event again later: this client drops it
     * (the entry cannot: its other sockets still need their live copy). */
    uint64_t grace = (uint64_t)c->app->cfg.lookback_ms + REPLAYED_GRACE_MARGIN_MS;
    uint64_t pings = 2 * (uint64_t)c->app->cfg.ws_ping_interval_ms;
    if (grace < pings)
        grace = pings;
    if (grace < REPLAYED_GRACE_MIN_MS)
        grace = REPLAYED_GRACE_MIN_MS;
    c->replayed_until_ms = uv_now(c->app->loop) + grace;
    /* The contract replays at most RESUME_LIMIT events: say so rather than leave a silent
     * gap, so a client can fetch the rest another way (or warn its user). */
    if (truncated && c->nreplayed > 0) {
        char note[128];
        int len = snprintf(note, sizeof note,
                           "{\"type\":\"resume_truncated\",\"limit\":%d,"
                           "\"last_replayed_event_id\":%" PRId64 "}",
                           RESUME_LIMIT, c->replayed[c->nreplayed - 1]);
        (void)send_text(c, note, (size_t)len);
    }
    on_gate_release(&c->gate, emit_held, drop_frame, c);
}

/*
 * The resume replay: the user's events with id > last_event_id, and, when the client sent
 * recent_event_ids, the events from its smallest listed id up to last_event_id that it does
 * not list (ids commit out of order: a lower id can commit after the client saw a higher one).
 * Live events are held meanwhile and merged in id order (gate.h).
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
    int64_t *skip = NULL;
    size_t nskip = 0;
    if (c->recent) {
        skip = cm_malloc((c->nrecent + 1) * sizeof *skip);
        if (skip) {
            memcpy(skip, c->recent, c->nrecent * sizeof *skip);
            skip[c->nrecent] = c->resume_from;
            nskip = c->nrecent + 1;
        }
    }
    c->replayed = cm_malloc(RESUME_LIMIT * sizeof *c->replayed);
    if ((c->recent && !skip) || !c->replayed) {
        cm_free(skip);
        on_client_close(c, ON_WS_CLOSE_INTERNAL);
        return;
    }
    c->nreplayed = 0;
    c->replayed_until_ms = UINT64_MAX;
    on_outbox_query_t q = {
        .after_id = c->recent ? c->recent[0] - 1 : c->resume_from,
        .user_id = c->claims.read_all ? NULL : c->claims.sub,
        .skip = skip,
        .nskip = nskip,
        .limit = RESUME_LIMIT,
    };
    on_gate_hold(&c->gate);
    c->replaying = 1;
    int rc = on_outbox_read(c->app->pg, &q, resume_row, resume_done, c, NULL);
    cm_free(skip);
    if (rc != 0) {
        cm_log_warn("cannot resume now (Postgres unavailable); closing with 1013", NULL);
        c->replaying = 0;
        on_gate_free(&c->gate, drop_frame);
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
    /* Messages the client sent before the welcome (an app ping right after the 101) were kept
     * by cm_ws; they come now, behind the welcome. */
    if (c->ws)
        cm_ws_start(c->ws);
    uint64_t interval = (uint64_t)c->app->cfg.ws_ping_interval_ms;
    uv_timer_start(&c->ping_timer, on_ping_timer, interval, interval);
    if (c->resume_from >= 0)
        start_resume(c);
}

/* ---- WebSocket callbacks ------------------------------------------------------------------- */

static void ws_on_message(cm_ws_t *ws, int opcode, const char *data, size_t len, void *ud)
{
    (void)ws;
    on_client_t *c = ud;
    if (opcode != CM_WS_OP_TEXT)
        return; /* binary messages are not part of the protocol */
    cJSON *j = cJSON_ParseWithLength(data, len);
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(j, "type");
    /* Browsers cannot send protocol pings, hence the application-level one. */
    if (cJSON_IsString(type) && strcmp(type->valuestring, "ping") == 0 && c->started)
        (void)send_text(c, "{\"type\":\"pong\"}", 15);
    cJSON_Delete(j);
}

static void ws_on_activity(cm_ws_t *ws, void *ud)
{
    (void)ws;
    on_client_t *c = ud;
    c->last_rx_ms = uv_now(c->app->loop);
}

/* cm_ws ends the session itself on a protocol error, the client's close, or pings that would
 * queue past WS_SEND_QUEUE_MAX_BYTES (1013: a slow consumer like any other). */
static void ws_on_closing(cm_ws_t *ws, uint16_t code, void *ud)
{
    (void)ws;
    on_client_t *c = ud;
    if (code == ON_WS_CLOSE_TRY_AGAIN)
        slow_consumer(c);
    finish(c);
}

/* The connection has closed (either transport): out of the hub, timers closed, then freed. */
static void client_closed(on_client_t *c)
{
    c->conn_closed = 1;
    c->conn = NULL;
    c->ws = NULL;
    c->sse = NULL;
    c->closing = 1;
    on_hub_leave(c->app->hub, c->member);
    c->member = NULL;
    uv_close((uv_handle_t *)&c->ping_timer, timer_closed);
    uv_close((uv_handle_t *)&c->expiry_timer, timer_closed);
    maybe_free(c);
}

static void ws_on_close(cm_ws_t *ws, void *ud)
{
    (void)ws;
    client_closed(ud);
}

static const cm_ws_callbacks_t ws_cbs = {ws_on_message, ws_on_activity, ws_on_closing, ws_on_close};

/* ---- the upgrade request ------------------------------------------------------------------- */

static int origin_ok(const char *origin, void *ud)
{
    on_app_t *app = ud;
    return on_config_origin_allowed(&app->cfg, origin);
}

/* A client for an accepted request; `sr` is taken over. NULL (out of memory) after answering
 * `req`. */
static on_client_t *client_new(cm_http_request_t *req, on_app_t *app, on_stream_request_t *sr)
{
    on_client_t *c = cm_calloc(1, sizeof *c);
    if (!c) {
        cm_free(sr->recent);
        cm_http_respond_error(req, 503, "out_of_memory", "out of memory", NULL);
        return NULL;
    }
    c->app = app;
    on_gate_init(&c->gate);
    c->claims = sr->claims;
    c->resume_from = sr->resume_from;
    c->recent = sr->recent;
    c->nrecent = sr->nrecent;
    return c;
}

static void sink_start(void *ud)
{
    on_client_start(ud);
}

static void sink_deliver(void *ud, on_frame_t *f)
{
    on_client_deliver(ud, f);
}

static void sink_close(void *ud, uint16_t code)
{
    on_client_close(ud, code);
}

static const on_hub_sink_t hub_sink = {sink_start, sink_deliver, sink_close};

/* The connection is the client's now: timers, and into the hub, which starts it. */
static void client_join(on_client_t *c)
{
    on_app_t *app = c->app;
    uv_timer_init(app->loop, &c->ping_timer);
    uv_timer_init(app->loop, &c->expiry_timer);
    c->ping_timer.data = c;
    c->expiry_timer.data = c;
    c->pending = 2;
    c->last_rx_ms = uv_now(app->loop);
    arm_expiry(c);
    if (on_hub_join(app->hub, c->claims.sub, c->claims.read_all, &hub_sink, c, &c->member) != 0)
        on_client_close(c, ON_WS_CLOSE_INTERNAL);
}

static int refuse_stopping(cm_http_request_t *req, on_app_t *app)
{
    if (!app->stopping)
        return 0;
    on_stream_reject(req, app, 503, "shutting_down", "the notifier is shutting down",
                     "Retry-After: 1\r\n");
    return 1;
}

void on_client_handle_upgrade(cm_http_request_t *req, void *ud)
{
    on_app_t *app = ud;
    if (refuse_stopping(req, app))
        return;
    /* RFC 6455 §4.2.1 (method, HTTP version, Upgrade, version, key) and the Origin list come
     * before the token: a request that cannot become a WebSocket is not worth verifying. */
    cm_ws_refusal_t why;
    if (cm_ws_handshake_check(req, origin_ok, app, &why) != 0) {
        on_stream_reject(req, app, why.status, why.code, why.message, why.headers);
        return;
    }
    on_stream_request_t sr;
    if (on_stream_request_parse(req, app, NULL, &sr) != 0)
        return;
    on_client_t *c = client_new(req, app, &sr);
    if (!c)
        return;
    cm_ws_config_t wc;
    cm_ws_config_defaults(&wc);
    wc.max_message = MAX_CLIENT_MESSAGE;
    wc.send_queue_max = (size_t)app->cfg.ws_send_queue_max;
    wc.early_max = EARLY_MESSAGES_MAX;
    if (cm_ws_accept(req, &wc, &ws_cbs, c, &c->ws) != 0) {
        cm_free(c->recent);
        cm_free(c);
        return;
    }
    c->conn = cm_ws_conn(c->ws);
    client_join(c);
}

/* ---- Server-Sent Events ------------------------------------------------------------------ */

static void sse_on_close(cm_sse_t *s, void *ud)
{
    (void)s;
    client_closed(ud);
}

static const cm_sse_callbacks_t sse_cbs = {sse_on_close};

void on_client_handle_sse(cm_http_request_t *req, void *ud)
{
    on_app_t *app = ud;
    if (refuse_stopping(req, app))
        return;
    if (strcmp(req->method_name, "GET") != 0) {
        on_stream_reject(req, app, 405, "method_not_allowed", "the order stream is a GET",
                         "Allow: GET\r\n");
        return;
    }
    if (!on_config_origin_allowed(&app->cfg, cm_http_header(req, "Origin"))) {
        on_stream_reject(req, app, 403, "origin_not_allowed", "origin not allowed", NULL);
        return;
    }
    /* EventSource resumes by itself: it sends the id of the last event it got. */
    on_stream_request_t sr;
    if (on_stream_request_parse(req, app, cm_http_header(req, "Last-Event-ID"), &sr) != 0)
        return;
    on_client_t *c = client_new(req, app, &sr);
    if (!c)
        return;
    cm_sse_config_t sc;
    cm_sse_config_defaults(&sc);
    sc.send_queue_max = (size_t)app->cfg.ws_send_queue_max;
    if (cm_sse_accept(req, &sc, &sse_cbs, c, &c->sse) != 0) {
        cm_free(c->recent);
        cm_free(c);
        return;
    }
    c->conn = cm_sse_conn(c->sse);
    client_join(c);
}
