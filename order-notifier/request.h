/*
 * request.h: what a request for the order stream asks for (GET /ws/orders, GET /sse/orders):
 * the token's claims and where to resume. Both transports check it the same way
 * (docs/openapi.yaml lists the checks in order).
 */
#ifndef ON_REQUEST_H
#define ON_REQUEST_H

#include "app.h"
#include "jwt.h"

#include "cm/http.h"

#include <stddef.h>
#include <stdint.h>

typedef struct on_stream_request {
    on_jwt_claims_t claims;
    int64_t resume_from; /* last_event_id (or SSE's Last-Event-ID), -1: none */
    int64_t *recent;     /* recent_event_ids sorted ascending, unique; owned (NULL: none) */
    size_t nrecent;
} on_stream_request_t;

/*
 * Reads the token (Authorization: Bearer, else ?access_token), the resume point (`last_id`
 * when not NULL, e.g. the Last-Event-ID header, else ?last_event_id) and ?recent_event_ids,
 * and checks the connection limit. Returns 0 with *out filled (free out->recent), or non-zero
 * after answering `req` itself (401, 400 or 503, counted in ws_handshakes_rejected_total).
 */
int on_stream_request_parse(cm_http_request_t *req, on_app_t *app, const char *last_id,
                            on_stream_request_t *out);

/* Answers `req` with an error and counts it as a refused stream request. */
void on_stream_reject(cm_http_request_t *req, on_app_t *app, int status, const char *code,
                      const char *message, const char *headers);

#endif
