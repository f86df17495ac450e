/*
 * cm/router.h: exact-path request routing on top of cm/http.h.
 *
 * Paths are matched byte for byte against req->path (no parameters, no percent-decoding, no
 * trailing-slash folding): the daemons expose a handful of fixed paths and anything looser
 * would only widen what an attacker can reach.
 */
#ifndef CM_ROUTER_H
#define CM_ROUTER_H

#include "cm/http.h"

typedef struct cm_router cm_router_t;

/* Method bits for cm_router_add(). */
enum {
    CM_ROUTE_GET = 1,
    CM_ROUTE_HEAD = 2,
    CM_ROUTE_POST = 4,
    CM_ROUTE_PUT = 8,
    CM_ROUTE_DELETE = 16,
    CM_ROUTE_PATCH = 32,
    CM_ROUTE_OPTIONS = 64,
};

/* Returns an empty router (caller frees with cm_router_free), or NULL on allocation failure. */
cm_router_t *cm_router_new(void);
/* Frees the router; NULL is a no-op. No request may be dispatched afterwards. */
void cm_router_free(cm_router_t *r);

/*
 * Routes `methods` (CM_ROUTE_* bits) on the exact `path` (copied; also the metrics label set in
 * req->route, e.g. "/api/markets/price") to `fn(req, ud)` (`ud` borrowed). HEAD is allowed
 * wherever GET is (RFC 9110 section 9.3.2). Returns 0, UV_EINVAL (no methods, no fn, path not
 * starting with '/'), UV_EEXIST (path already routed), UV_ENOMEM.
 */
int cm_router_add(cm_router_t *r, unsigned methods, const char *path, cm_http_handler_fn fn,
                  void *ud);

/*
 * Use as cm_http_config.handler with handler_ud = the router: sets req->route (the route's path,
 * or "unmatched"), then calls the route's handler, or answers 404 `not_found` for unknown paths
 * and 405 `method_not_allowed` with an `Allow` header (RFC 9110 section 15.5.6) for known paths
 * with another method.
 */
void cm_router_dispatch(cm_http_request_t *req, void *router);

#endif
