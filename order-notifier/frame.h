/*
 * frame.h: one event as it goes to clients, encoded once and shared by every socket it goes
 * to (reference counted): the WebSocket frame, and the Server-Sent Event built on first use.
 */
#ifndef ON_FRAME_H
#define ON_FRAME_H

#include "cm/ws.h"

#include <stddef.h>
#include <stdint.h>

typedef struct on_frame {
    int refs;
    int64_t id;
    double created_at; /* commit-side timestamp (s), for the delivery histogram */
    int64_t order_id;  /* 0: unknown */
    cm_ws_frame_t *ws;
    char *sse; /* the same event for SSE clients, encoded on first use (owned) */
    size_t sse_len;
} on_frame_t;

/* A frame with one reference holding `len` bytes of `data` (copied, encoded), or NULL. */
on_frame_t *on_frame_new(int64_t id, double created_at, const char *data, size_t len);
struct on_event;
/* The client frame of an event (on_event_frame), with its id, time and order; NULL on ENOMEM. */
on_frame_t *on_frame_from_event(const struct on_event *ev);
void on_frame_ref(on_frame_t *f);
/* Drops a reference (NULL is a no-op); the last one frees the frame. */
void on_frame_unref(on_frame_t *f);
/* The frame as a Server-Sent Event ("id: N" and the same JSON in data), owned by the frame;
 * NULL on ENOMEM. */
const char *on_frame_sse(on_frame_t *f, size_t *len);

#endif
