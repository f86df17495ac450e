/*
 * client.h: one WebSocket client of GET /ws/orders, from the upgrade request to the close.
 *
 * Before the upgrade (docs/openapi.yaml): 426 without a WebSocket upgrade, 403 for an Origin not in
 * WS_ALLOWED_ORIGINS, 401 for a missing or bad token, 503 at WS_MAX_CONNECTIONS. After it:
 * `welcome`, then with last_event_id the user's missed events (up to 1000, id order), then live
 * events, no duplicate. Protocol pings every WS_PING_INTERVAL_MS, close after two silent
 * intervals; 1008 when the token expires; 1013 when unsent data passes
 * WS_SEND_QUEUE_MAX_BYTES; 1001 on shutdown.
 *
 * Lifetime: the client is freed once its connection's on_close has fired, its timers have
 * closed and no query it started is pending.
 */
#ifndef ON_CLIENT_H
#define ON_CLIENT_H

#include "app.h"
#include "dedup.h"
#include "frame.h"
#include "gate.h"
#include "jwt.h"

#include "cm/http.h"
#include "cm/ws.h"

#include <stdint.h>
#include <uv.h>

/* The close codes under the names the notifier's delivery and resume code uses. */
enum {
    ON_WS_CLOSE_GOING_AWAY = CM_WS_CLOSE_GOING_AWAY,
    ON_WS_CLOSE_POLICY = CM_WS_CLOSE_POLICY,
    ON_WS_CLOSE_INTERNAL = CM_WS_CLOSE_INTERNAL,
    ON_WS_CLOSE_TRY_AGAIN = CM_WS_CLOSE_TRY_AGAIN,
};

typedef struct on_client on_client_t;
struct on_client {
    on_app_t *app;
    cm_http_conn_t *conn; /* the session's, for logs; NULL once closed */
    cm_ws_t *ws;          /* the WebSocket session, NULL once closed (or for SSE) */
    struct cm_sse *sse;   /* the SSE stream, NULL once closed (or for a WebSocket) */
    on_jwt_claims_t claims;
    int64_t resume_from; /* last_event_id, or -1 */
    /* recent_event_ids: ids <= last_event_id the client says it has, sorted ascending, unique
     * (NULL: none given). From recent[0] up, an id below last_event_id that is not listed is
     * one the client has not seen: a late committer, replayed or delivered live. */
    int64_t *recent;
    size_t nrecent;
    struct on_hub_member *member; /* the hub's record of this client, NULL when not in it */
    /* state */
    int started;   /* welcome sent */
    int replaying; /* resume read in flight: live frames are held in `gate` */
    on_gate_t gate;
    /* Ids this client got from its resume replay, sorted ascending. A live copy of one (it was
     * committed before the replay query but published after it, or re-published by a catch-up)
     * is dropped here rather than in the entry, whose other sockets still need it. Kept until
     * replayed_until_ms (loop time), then freed. */
    int64_t *replayed;
    size_t nreplayed;
    uint64_t replayed_until_ms;
    int closing;     /* close frame queued or connection closing */
    int conn_closed; /* on_close fired */
    int pending;     /* queries and open timers that borrow the client */
    uint64_t last_rx_ms;
    uv_timer_t ping_timer;   /* pings, idle check, and the hard-close deadline */
    uv_timer_t expiry_timer; /* token exp */
};

/* GET /ws/orders handler; `ud` is the on_app_t. */
void on_client_handle_upgrade(cm_http_request_t *req, void *ud);
/* GET /sse/orders handler: the same stream as Server-Sent Events (one `id:` per event, the
 * same JSON in `data:`, comment heartbeats, Last-Event-ID resumes); `ud` is the on_app_t. */
void on_client_handle_sse(cm_http_request_t *req, void *ud);
/* Once the client's subscription is in effect (the hub says so): welcome, then resume. */
void on_client_start(on_client_t *c);
/* Sends an event frame (or holds it while a resume is being replayed). `f` is borrowed. */
void on_client_deliver(on_client_t *c, on_frame_t *f);
/* Starts the closing handshake with `code`; the connection closes after it is flushed (hard
 * after a few seconds if the peer does not read). */
void on_client_close(on_client_t *c, uint16_t code);

#endif
