/*
 * hub.h: the WebSocket clients of this replica and their Redis subscriptions.
 *
 * One entry per connected user holds that user's sockets and the SUBSCRIBE to
 * `orders:user:<id>` (made for the first socket, dropped after the last); sockets whose token
 * has scope orders:read:all share one entry on `orders:all`. Each entry de-duplicates event ids
 * (every id it delivered within the look-back window plus a margin, dedup.h) so that an event
 * published to its channel twice (a new leader's catch-up, the publisher's re-send of what
 * Redis did not confirm, the replay after a Redis reconnect) reaches its sockets once, and
 * builds each frame once for all its sockets. What one socket got another way (its resume replay)
 * is that socket's business (client.c): the entry's other sockets still need the live copy.
 *
 * A SUBSCRIBE is only known to be in effect when something published after it arrives, so a
 * new entry publishes a private sync marker on its channel and the sockets waiting on it get
 * their welcome (and start their resume) once the marker comes back: nothing committed after
 * the welcome can be missed. After a reconnect of the subscribing link the hub replays from
 * `order_events` (every row of the outage's window, paged: outbox.h) what its users may have
 * missed while it was down, holding live events until the replay is merged in (gate.h).
 */
#ifndef ON_HUB_H
#define ON_HUB_H

#include "app.h"
#include "event.h"
#include "frame.h"

#include <stddef.h>
#include <stdint.h>

typedef struct on_hub on_hub_t;

/* What the hub needs of a client: told when its subscription is in effect, handed each event,
 * asked to close at shutdown. The client's own state stays the client's. */
typedef struct on_hub_sink {
    void (*start)(void *ud);                  /* from the loop, once, before any deliver */
    void (*deliver)(void *ud, on_frame_t *f); /* `f` borrowed for the call */
    void (*close)(void *ud, uint16_t code);
} on_hub_sink_t;

/* The hub's record of one joined client (owned by the hub). */
typedef struct on_hub_member on_hub_member_t;

/* Creates the hub (borrows `app`; app->redis_sub, redis_pub and pg must exist). Returns 0 and
 * *out, or UV_ENOMEM. */
int on_hub_new(on_app_t *app, on_hub_t **out);
/* Releases the hub once every client has left; `done(ud)` fires from the loop. */
void on_hub_close(on_hub_t *h, void (*done)(void *ud), void *ud);

/*
 * Adds a connected client of `user_id` (borrowed; or of every user with `read_all`) to its
 * entry (SUBSCRIBE on the first one). `sink` is copied, `ud` passed to it. sink->start fires
 * when the subscription is in effect (later, from the loop; never from inside this call).
 * Returns 0 and *out (for on_hub_leave), or UV_ENOMEM (the client is then not in the hub).
 */
int on_hub_join(on_hub_t *h, const char *user_id, int read_all, const on_hub_sink_t *sink, void *ud,
                on_hub_member_t **out);
/* Removes a client (UNSUBSCRIBE after the user's last one); no sink call after it. NULL is a
 * no-op. */
void on_hub_leave(on_hub_t *h, on_hub_member_t *m);

/* Connected WebSocket clients. */
size_t on_hub_clients(const on_hub_t *h);
/* Starts the closing handshake with `code` on every client (SIGTERM: 1001). */
void on_hub_close_all(on_hub_t *h, uint16_t code);

/* The subscribing Redis link changed state (from cm_redis on_state). */
void on_hub_redis_state(on_hub_t *h, int up);

/* A Redis message (an event or a sync marker) for entry `ud` (the hub's subscription
 * callback; public for tests). */
void on_hub_message(cm_redis_t *r, const char *channel, const char *payload, size_t len, void *ud);

#endif
